"""Packed sequences (e5v.packing): the layout, and packed forwards and gradients equal padded ones (fp32)."""

from __future__ import annotations

import random

import pytest
import torch

from e5v.packing import pack_rows, padding_waste, plan_packs


def test_plan_packs_places_every_row_once_within_the_budget() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(1, 40) for _ in range(200)] + [90]  # one row longer than a pack
    packs = plan_packs(lengths, 64)
    placed = sorted(i for p in packs for i in p)
    assert placed == list(range(len(lengths)))
    for p in packs:
        assert sum(lengths[i] for i in p) <= 64 or len(p) == 1
    assert sum(lengths) / (len(packs) * 64) > 0.9  # first-fit decreasing fills packs well
    with pytest.raises(ValueError, match="row 1 is empty"):
        plan_packs([3, 0], 8)


def test_pack_rows_layout() -> None:
    b = pack_rows([[5, 6], [7, 8, 9], [4]], max_tokens=4, pad_id=0)
    # longest first: [7,8,9]+[4] in pack 0, [5,6] in pack 1 (+ a fill segment of 2)
    assert b.input_ids.tolist() == [[7, 8, 9, 4], [5, 6, 0, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2, 0], [0, 1, 0, 1]]
    assert b.ends.tolist() == [5, 2, 3] and b.starts.tolist() == [4, 0, 3]
    assert b.real_tokens == 6
    assert padding_waste([2, 3, 1], batch=3) == pytest.approx(1 - 6 / 9)


@pytest.fixture(scope="module")
def lm(tiny_dir):
    from transformers import LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    return model.model.language_model


def _rows(n: int, seed: int) -> list[list[int]]:
    g = random.Random(seed)
    return [[1] + [g.randint(6, 500) for _ in range(g.randint(1, 30))] for _ in range(n)]


def _padded(lm, rows: list[list[int]]) -> torch.Tensor:
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])  # left padding, as the Embedder
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return lm(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state[:, -1]


def _packed(lm, rows: list[list[int]], max_tokens: int) -> torch.Tensor:
    b = pack_rows(rows, max_tokens, pad_id=0)
    assert b.shape[0] > 1  # several packs, with fill segments
    h = lm(input_ids=b.input_ids, attention_mask=None, position_ids=b.position_ids, use_cache=False).last_hidden_state
    return b.gather(h)


def test_packed_states_equal_padded(lm) -> None:
    rows = _rows(24, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(_packed(lm, rows, 96), _padded(lm, rows), atol=1e-5, rtol=0)


def test_packed_gradients_equal_padded(lm) -> None:
    rows = _rows(12, seed=2)
    target = torch.randn(12, lm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    params = [p for p in lm.parameters()]

    def grads(states: torch.Tensor) -> list[torch.Tensor]:
        loss = torch.nn.functional.cosine_embedding_loss(states, target, torch.ones(12))
        return torch.autograd.grad(loss, params, allow_unused=True)

    for a, b in zip(grads(_packed(lm, rows, 64)), grads(_padded(lm, rows))):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
