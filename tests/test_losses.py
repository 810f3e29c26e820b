"""Loss, gather, GradCache and batch planning: pure functions, no DeepSpeed."""

from __future__ import annotations

import math

import pytest
import torch

from e5v import distributed as D
from e5v.train.grad_cache import grad_cache_step
from e5v.train.losses import info_nce_hard_negatives
from e5v.train import ConfigError, plan_batches


def test_info_nce_matches_hand_computation() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    p = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    n = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    t = 0.5
    loss, acc = info_nce_hard_negatives(a, p, n, temperature=t)
    # cosines: a0 . [p0, p1, n0, n1] = [1, 1/sqrt2, 0, -1]; a1 . [...] = [0, 1/sqrt2, 1, 0]
    s = 1 / math.sqrt(2)
    rows = [[1, s, 0, -1], [0, s, 1, 0]]
    targets = [0, 1]
    expected = 0.0
    for r, y in zip(rows, targets):
        logits = [x / t for x in r]
        expected += -(logits[y] - math.log(sum(math.exp(v) for v in logits)))
    assert loss.item() == pytest.approx(expected / 2, abs=1e-6)
    assert acc.item() == 0.5  # a1's best candidate is its hard negative n0


def test_info_nce_offset_and_no_negatives() -> None:
    torch.manual_seed(0)
    a, p, n = torch.randn(6, 8), torch.randn(6, 8), torch.randn(6, 8)
    full, _ = info_nce_hard_negatives(a, p, n, 0.05)
    halves = [info_nce_hard_negatives(a[i * 3 : (i + 1) * 3], p, n, 0.05, offset=i * 3)[0] for i in range(2)]
    assert ((halves[0] + halves[1]) / 2).item() == pytest.approx(full.item(), rel=1e-6)
    no_neg, _ = info_nce_hard_negatives(a, p, None, 0.05)
    assert no_neg.item() < full.item()  # fewer candidates, lower loss


def test_gather_is_noop_in_one_process() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    y = D.gather_with_grad(x)
    assert y is x
    assert D.gather_no_grad(x) is x and D.world_size() == 1 and D.rank() == 0


class _Tower(torch.nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(50, 16)
        self.lin = torch.nn.Linear(16, 16)
        self.drop = torch.nn.Dropout(dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (k, b, L) -> (k, b, 16)
        return self.lin(self.drop(self.emb(ids).mean(-2)))


def _loss(reps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return info_nce_hard_negatives(reps[0], reps[1], reps[2], 0.05)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_grad_cache_equals_full_batch() -> None:
    ids = torch.randint(0, 50, (3, 12, 5))
    full = _Tower(0.0)
    _loss(full(ids))[0].backward()
    chunked = _Tower(0.0)
    chunks = [slice(0, 4), slice(4, 8), slice(8, 12)]
    loss, _, replay = grad_cache_step(lambda c: chunked(ids[:, c]), chunks, _loss, lambda s, last: s.backward())
    gf, gc = _grads(full), _grads(chunked)
    for k in gf:
        torch.testing.assert_close(gc[k], gf[k], atol=1e-5, rtol=0)
    assert replay == 0.0 and loss.item() == pytest.approx(_loss(full(ids))[0].item(), rel=1e-6)


def test_grad_cache_replays_dropout_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    ids = torch.randint(0, 50, (3, 8, 5))
    chunks = [slice(0, 4), slice(4, 8)]
    m = _Tower(0.3)
    _, _, replay = grad_cache_step(lambda c: m(ids[:, c]), chunks, _loss, lambda s, last: s.backward())
    assert replay == 0.0
    m2 = _Tower(0.3)
    import e5v.train.grad_cache

    monkeypatch.setattr(e5v.train.grad_cache, "set_rng_state", lambda state: None)  # the replay keeps the RNG as it is
    _, _, replay_bad = grad_cache_step(lambda c: m2(ids[:, c]), chunks, _loss, lambda s, last: s.backward())
    assert replay_bad > 1e-3  # without the RNG replay the second pass sees other dropout masks


def test_plan_batches() -> None:
    p = plan_batches(768, 24, 32, grad_cache=False)
    assert (p.local, p.chunks, p.negatives_per_loss) == (24, 1, 768)
    g = plan_batches(768, 32, 1, grad_cache=True)
    assert (g.local, g.chunks, g.negatives_per_loss) == (768, 24, 768)
    with pytest.raises(ConfigError, match="not divisible by the world size 5"):
        plan_batches(768, 24, 5, grad_cache=False)
    with pytest.raises(ConfigError, match="micro_batch=7"):
        plan_batches(768, 7, 1, grad_cache=True)


def lr_factor(warmup: int, total: int):
    """The trainer's schedule (transformers' linear warmup then decay) as step -> lr multiplier."""
    from transformers import get_linear_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return get_linear_schedule_with_warmup(opt, warmup, total).lr_lambdas[0]


def test_lr_schedule() -> None:
    f = lr_factor(100, 1000)
    assert f(0) == 0 and f(50) == 0.5 and f(100) == 1.0
    assert f(550) == pytest.approx(0.5) and f(1000) == 0.0


def test_single_process_init_leaves_no_env_behind(monkeypatch) -> None:
    """A launcher-less run sets RANK/MASTER_PORT/... for itself and removes them at shutdown, so a child
    process started later (the demo after an in-process replication) never inherits a port in use."""
    import os

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # set by the user: kept
    D.init_from_env("gloo")
    try:
        assert os.environ["RANK"] == "0" and os.environ["MASTER_PORT"].isdigit()
    finally:
        D.shutdown()
    assert "RANK" not in os.environ and "MASTER_PORT" not in os.environ and "WORLD_SIZE" not in os.environ
    assert os.environ["MASTER_ADDR"] == "127.0.0.1"
    assert not D.is_dist()
