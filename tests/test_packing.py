"""Packed sequences (e5v.packing): the layout; packed forwards and gradients equal padded ones on the tiny LM
(fp32); through the backbone contract and the Embedder, packed embeddings equal padded ones (fp32, 1e-5) for every
family and input kind that packs, and the others fall back to padded batches, saying so. Packed training
gradients: tests/test_train.py and tests/test_train_pairs.py (``_probe(..., packed_too=True)``)."""

from __future__ import annotations

import random

import numpy as np
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


# ---------------------------------------------------------------------- packed batches in the backbone contract
def test_pack_padded_moves_tokens_and_reorders_images() -> None:
    from e5v.packing import pack_padded

    # three left-padded rows of 2, 3 and 1 tokens; one "image" tensor per row
    batch = {
        "input_ids": torch.tensor([[0, 5, 6], [7, 8, 9], [0, 0, 4]]),
        "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1]]),
        "position_ids": torch.tensor([[0, 0, 1], [0, 1, 2], [0, 0, 0]]),
        "pixel_values": torch.tensor([[10.0], [20.0], [30.0]]),
    }
    out = pack_padded(batch, pad_id=0, max_tokens=4, row_keys=("pixel_values",))
    want = pack_rows([[5, 6], [7, 8, 9], [4]], 4, 0)  # the same layout as packing the token lists
    assert torch.equal(out["input_ids"], want.input_ids) and torch.equal(out["position_ids"], want.position_ids)
    assert out["last_index"].tolist() == want.ends.tolist() and out["lengths"].tolist() == [2, 3, 1]
    # rows in the packs' flattened order: [7,8,9] (row 1), [4] (row 2), [5,6] (row 0)
    assert out["pixel_values"].squeeze(1).tolist() == [20.0, 30.0, 10.0]
    assert "attention_mask" not in out
    with pytest.raises(ValueError, match="image_grid_thw"):
        pack_padded({**batch, "image_grid_thw": torch.ones(3, 3)}, 0)  # an input without a packing rule
    with pytest.raises(ValueError, match="LEFT-padded"):
        pack_padded({**batch, "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])}, 0,
                    row_keys=("pixel_values",))


def test_packing_settings() -> None:
    from e5v.packing import check_pack_tokens, packing_mode, saving

    modes = [packing_mode(v) for v in ("auto", True, False, "TRUE", "false")]
    assert modes == ["auto", "true", "false", "true", "false"]
    with pytest.raises(ValueError, match="packing must be one of"):
        packing_mode("yes please")
    assert check_pack_tokens(None) is None and check_pack_tokens(64) == 64
    with pytest.raises(ValueError, match="pack_tokens"):
        check_pack_tokens(0)
    assert saving([10, 10, 10, 10]) == 0.0  # equal lengths: nothing to remove (2 rows per pack of 20)
    assert saving([40, 10, 10, 10, 10]) == pytest.approx(1 - 1 * 80 / (5 * 40))  # all in one pack of 80


TEXTS = ["a red circle", "two blue squares near a big tree on the left", "x", "a small dog is running",
         "one two three four five six seven eight nine ten eleven twelve", "tiny"]
EDIT = "make the largest shape blue and move it to the left"

# every family that packs, each input kind it packs; the other tiny variants of those families run in `make test-all`
PACKED = [("tiny", ("text", "image", "interleaved")), ("tiny_smolvlm", ("text", "image", "interleaved")),
          ("tiny_phi3_v", ("text", "image", "interleaved")),
          ("tiny_qwen2_vl", ("text",)), ("tiny_qwen3_vl", ("text",)),
          pytest.param("tiny_mistral", ("text", "image", "interleaved"), marks=pytest.mark.slow),
          pytest.param("tiny_qwen2_5_vl", ("text",), marks=pytest.mark.slow),
          pytest.param("tiny_smolvlm_idefics3", ("text", "image", "interleaved"), marks=pytest.mark.slow)]


def _encode(emb, kind: str, images: list) -> np.ndarray:
    if kind == "text":
        return emb.encode_text(TEXTS, normalize=False)
    if kind == "image":
        return emb.encode_image(images, normalize=False)
    return emb.encode_interleaved([(im, EDIT if i % 2 else "blue") for i, im in enumerate(images)], normalize=False)


def _forwards(emb, kind: str, images: list) -> list[tuple[int, int]]:
    """(rows, packed rows) of each forward the packed Embedder runs for these inputs."""
    if kind == "text":
        items = emb._text_items(TEXTS, "text", None)
    elif kind == "image":
        items = emb._image_items([(im, None) for im in images], "image", None, fixed_prompt=emb.prompt.render("image"))
    else:
        items = emb._image_items([(im, "blue") for im in images], "cirr_query", None)
    prep = emb._preparer(0.0)
    return [(len(b), prep(b).tensors["input_ids"].shape[0]) for b in emb._batches(items, emb.batch_size)]


@pytest.mark.parametrize("name,kinds", PACKED)
def test_packed_embeddings_equal_padded(name: str, kinds: tuple[str, ...], images) -> None:
    """fp32: the packed Embedder (rows of several inputs each, positions restarting) == the padded one, 1e-5,
    for every input kind the family packs; the kinds it does not pack fall back to padded batches, saying so."""
    from e5v import Embedder

    padded = Embedder.from_pretrained(name, device="cpu", batch_size=4, packing="false")
    packed = Embedder(padded.backbone, padded.prompt, batch_size=4, packing="true", pack_tokens=160)
    for kind in ("text", "image", "interleaved"):
        ref = _encode(padded, kind, images)
        got = _encode(packed, kind, images)
        assert packed.last_packed == (kind in kinds), kind
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0, err_msg=f"{name} {kind}")
        if kind in kinds:
            forwards = _forwards(packed, kind, images)
            assert any(p < r for r, p in forwards), (kind, forwards)  # packs of several rows, not one row each
    assert not padded.last_packed


def test_packing_capabilities_and_fallback(embedder, caplog) -> None:
    from e5v.backbones.llava_next import LlavaNextBackbone
    from e5v.backbones.phi3_v import Phi3VBackbone
    from e5v.backbones.qwen2_vl import Qwen2VLBackbone
    from e5v.backbones.qwen3_vl import Qwen3VLBackbone
    from e5v.backbones.smolvlm import SmolVLMBackbone

    assert LlavaNextBackbone.packable == SmolVLMBackbone.packable == Phi3VBackbone.packable == ("text", "image",
                                                                                                "interleaved")
    assert Qwen2VLBackbone.packable == Qwen3VLBackbone.packable == ("text",)
    assert "rotary" in Qwen2VLBackbone.packing_note
    b = embedder.backbone
    assert b.pack_threshold("text", "false") is None and b.pack_threshold("text", "true") == 0.0
    assert b.pack_threshold("text", "auto") is None  # CPU: padded (docs/performance.md)
    qwen = Qwen2VLBackbone.__new__(Qwen2VLBackbone)  # the policy only needs the class facts and the model
    qwen.model, qwen.family = b.model, "qwen2_vl"
    import logging

    with caplog.at_level(logging.WARNING, logger="e5v.backbones.base"):
        assert qwen.pack_threshold("image", "true") is None and qwen.pack_threshold("text", "true") == 0.0
    assert "cannot pack image inputs exactly" in caplog.text and "rotary" in caplog.text
    eager = LlavaNextBackbone.__new__(LlavaNextBackbone)
    eager.model = type("M", (), {"config": type("C", (), {"_attn_implementation": "paged_attention"})()})()
    assert not eager.can_pack("text")[0]


def test_packing_options_from_config(tiny_dir) -> None:
    from e5v import Embedder
    from e5v.config import compose

    emb = Embedder.from_config(compose("embed", ["backbone=tiny", "embedder.device=cpu", "embedder.packing=true",
                                                 "embedder.pack_tokens=256"]))
    assert (emb.packing, emb.pack_tokens, emb.compile) == ("true", 256, False)
    with pytest.raises(ValueError, match="packing"):
        Embedder(emb.backbone, emb.prompt, packing="sometimes")
    assert compose("train", ["experiment=tiny_cpu"]).trainer.packing == "auto"
