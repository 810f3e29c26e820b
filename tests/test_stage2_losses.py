"""Stage-2 contrastive loss (e5v.train.losses.contrastive_loss) against a loop reference written here.

Run: ``.venv/bin/python -m pytest -q tests/test_stage2_losses.py``
"""

from __future__ import annotations

import math

import pytest
import torch

from e5v.train.losses import contrastive_loss, info_nce_hard_negatives

T = 0.05


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).sum())


def _reference(
    q: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor | None,
    t: float,
    offset: int,
    groups: list[int] | None,
    dims: list[int] | None,
    weights: list[float] | None,
) -> tuple[torch.Tensor, float]:
    """Explicit loops: for every query, positive and candidate, -log softmax over the visible candidates."""
    p_count, n, d = pos.shape
    k_count = 0 if neg is None else neg.shape[0]
    # candidate list: (slot, row, vector); slots < P are positives
    cands = [(j, g, pos[j, g]) for j in range(p_count) for g in range(n)]
    if neg is not None:
        cands += [(p_count + k, g, neg[k, g]) for k in range(k_count) for g in range(n)]
    dims = dims or [d]
    weights = weights or [1.0] * len(dims)
    total = torch.zeros((), dtype=torch.float32)
    acc = 0.0
    for dim, w in zip(dims, weights):
        terms = []
        hits = 0
        for i in range(q.shape[0]):
            g = offset + i
            qv = _unit(q[i, :dim].float())
            for j in range(p_count):
                logits = []
                target_logit = None
                for slot, row, vec in cands:
                    if slot < p_count and row == g and slot != j:
                        continue  # g's other positives are not negatives
                    if groups is not None and groups[row] != groups[g]:
                        continue  # another sub-batch
                    s = (qv * _unit(vec[:dim].float())).sum() / t
                    if slot == j and row == g:
                        target_logit = s
                    else:
                        logits.append(s)
                assert target_logit is not None
                every = torch.stack([target_logit, *logits])
                terms.append(-(target_logit - torch.logsumexp(every, dim=0)))
                hits += int(all(target_logit.item() > x.item() for x in logits))
        total = total + w * torch.stack(terms).mean()
        acc = hits / len(terms)
    return total, acc


def _tensors(b: int, n: int, p_count: int, k_count: int, d: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, d, generator=gen, requires_grad=True)
    pos = torch.randn(p_count, n, d, generator=gen, requires_grad=True)
    neg = torch.randn(k_count, n, d, generator=gen, requires_grad=True) if k_count else None
    return [x for x in (q, pos, neg) if x is not None]


def _grads(loss: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, leaves))


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


CASES = [
    # (P, K, b, n, offset, groups, dims, weights)
    (1, 0, 4, 4, 0, None, None, None),
    (1, 1, 4, 4, 0, None, None, None),
    (1, 2, 3, 6, 3, None, None, None),
    (2, 0, 3, 6, 2, None, None, None),
    (2, 1, 5, 5, 0, None, None, None),
    (2, 2, 2, 6, 4, None, None, None),
    (3, 0, 4, 4, 0, None, None, None),
    (3, 1, 3, 6, 3, None, None, None),
    (3, 2, 4, 4, 0, None, None, None),
    (2, 1, 6, 6, 0, [0, 0, 1, 1, 1, 2], None, None),
    (3, 2, 3, 6, 3, [1, 0, 1, 0, 1, 0], None, None),
    (1, 1, 4, 4, 0, None, [4, 8, 16], None),
    (2, 2, 3, 6, 1, [0, 0, 0, 1, 1, 1], [3, 7, 16], [0.5, 1.0, 2.0]),
    (3, 0, 4, 4, 0, None, [5, 11], [1.0, 0.25]),
]


@pytest.mark.parametrize("p_count,k_count,b,n,offset,groups,dims,weights", CASES)
def test_matches_loop_reference_values_and_gradients(
    p_count: int,
    k_count: int,
    b: int,
    n: int,
    offset: int,
    groups: list[int] | None,
    dims: list[int] | None,
    weights: list[float] | None,
) -> None:
    leaves = _tensors(b, n, p_count, k_count, 16, seed=p_count * 100 + k_count * 10 + offset)
    q, pos = leaves[0], leaves[1]
    neg = leaves[2] if k_count else None
    gt = torch.tensor(groups) if groups is not None else None
    loss, acc = contrastive_loss(q, pos, neg, T, offset=offset, groups=gt, dims=dims, dim_weights=weights)
    ref, ref_acc = _reference(q, pos, neg, T, offset, groups, dims, weights)
    _close(loss, ref)
    assert acc.item() == pytest.approx(ref_acc, abs=1e-6)
    assert not acc.requires_grad
    for a, r in zip(_grads(loss, leaves), _grads(ref, leaves)):
        _close(a, r)


@pytest.mark.parametrize("k_count", [0, 1])
@pytest.mark.parametrize("offset", [0, 3])
def test_single_positive_equals_stage1_loss(k_count: int, offset: int) -> None:
    leaves = _tensors(3, 6, 1, k_count, 8, seed=7 + offset)
    q, pos = leaves[0], leaves[1]
    neg = leaves[2] if k_count else None
    new, new_acc = contrastive_loss(q, pos, neg, T, offset=offset)
    old, old_acc = info_nce_hard_negatives(q, pos[0], None if neg is None else neg[0], T, offset)
    _close(new, old)
    assert new_acc.item() == old_acc.item()
    for a, r in zip(_grads(new, leaves), _grads(old, leaves)):
        _close(a, r)
    if k_count == 0:  # an empty (0, n, d) negatives tensor means the same as None
        empty, _ = contrastive_loss(q, pos, torch.zeros(0, 6, 8), T, offset=offset)
        _close(empty, old)


def test_other_positives_are_masked_not_negatives() -> None:
    # Two rows, each with two identical positives equal to the query; without the mask the two copies
    # would compete and the loss could not go below log 2.
    e = torch.eye(4)
    q = e[:2].clone()
    pos = torch.stack([e[:2], e[:2]])  # (2, 2, 4)
    neg = e[2:4].unsqueeze(0)  # (1, 2, 4), orthogonal to both queries
    loss, acc = contrastive_loss(q, pos, neg, T)
    ref, _ = _reference(q, pos, neg, T, 0, None, None, None)
    _close(loss, ref)
    # by hand: visible logits for each (query, positive): target 1/T, the other row's 2 positives and the
    # 2 negatives at 0
    by_hand = -(1 / T - math.log(math.exp(1 / T) + 4))
    assert loss.item() == pytest.approx(by_hand, abs=1e-6)
    assert loss.item() < 1e-6 < math.log(2)
    assert acc.item() == 1.0


def test_groups_hide_other_sub_batches() -> None:
    leaves = _tensors(4, 4, 2, 1, 8, seed=3)
    q, pos, neg = leaves
    groups = torch.tensor([0, 0, 1, 1])
    loss, _ = contrastive_loss(q, pos, neg, T, groups=groups)
    # changing every candidate of sub-batch 1 leaves the queries of sub-batch 0 untouched
    pos2, neg2 = pos.detach().clone(), neg.detach().clone()
    pos2[:, 2:] = torch.randn(2, 2, 8)
    neg2[:, 2:] = torch.randn(1, 2, 8)
    a, _ = contrastive_loss(q[:2], pos, neg, T, groups=groups)
    b, _ = contrastive_loss(q[:2], pos2, neg2, T, groups=groups)
    _close(a, b)
    # one sub-batch of rows 0, 1 alone equals the grouped loss of those queries
    alone, _ = contrastive_loss(q[:2], pos[:, :2], neg[:, :2], T)
    _close(a, alone)
    # the grouped loss is the mean of the two sub-batches' losses computed alone
    other, _ = contrastive_loss(q[2:], pos[:, 2:], neg[:, 2:], T)
    _close(loss, (alone + other) / 2)
    ungrouped, _ = contrastive_loss(q, pos, neg, T)
    assert abs(ungrouped.item() - loss.item()) > 1e-3


def test_matryoshka_full_width_listed_equals_plain() -> None:
    q, pos, neg = _tensors(3, 3, 2, 2, 12, seed=5)
    plain, _ = contrastive_loss(q, pos, neg, T)
    listed, _ = contrastive_loss(q, pos, neg, T, dims=[12])
    _close(plain, listed)
    parts = [contrastive_loss(q[:, :k], pos[..., :k], neg[..., :k], T)[0] for k in (4, 12)]
    both, acc = contrastive_loss(q, pos, neg, T, dims=[4, 12], dim_weights=[3.0, 0.5])
    _close(both, 3.0 * parts[0] + 0.5 * parts[1])
    assert acc.item() == contrastive_loss(q, pos, neg, T)[1].item()  # accuracy at the largest dim


@pytest.mark.parametrize("groups", [None, [0, 1, 0, 1, 1, 0]])
@pytest.mark.parametrize("dims", [None, [4, 16]])
def test_two_ranks_weighted_sum_equals_full_batch(groups: list[int] | None, dims: list[int] | None) -> None:
    leaves = _tensors(6, 6, 2, 2, 16, seed=11)
    q, pos, neg = leaves
    gt = None if groups is None else torch.tensor(groups)
    full, _ = contrastive_loss(q, pos, neg, T, groups=gt, dims=dims)
    g_full = _grads(full, leaves)
    # each "rank" sees its own 3 queries and every row's candidates (as gathered)
    ranks = [contrastive_loss(q[s : s + 3], pos, neg, T, offset=s, groups=gt, dims=dims)[0] for s in (0, 3)]
    split = 0.5 * ranks[0] + 0.5 * ranks[1]
    _close(split, full)
    for a, r in zip(_grads(split, leaves), g_full):
        _close(a, r)


@pytest.mark.parametrize(
    "dims,weights,needle",
    [
        ([32, 16], None, "16"),
        ([16, 16], None, "16"),
        ([0, 8], None, "0"),
        ([8, 65], None, "65"),
        ([8.0], None, "8.0"),
        ([], None, "[]"),
        ([8, 16], [1.0], "[1.0]"),
        ([8, 16], [1.0, 0.0], "0.0"),
        ([8, 16], [1.0, -2.0], "-2.0"),
        (None, [1.0], "[1.0]"),
    ],
)
def test_bad_dims_are_refused(dims: list | None, weights: list | None, needle: str) -> None:
    q, pos = torch.randn(2, 64), torch.randn(1, 2, 64)
    with pytest.raises(ValueError) as err:
        contrastive_loss(q, pos, None, T, dims=dims, dim_weights=weights)
    assert needle in str(err.value)


def test_bad_shapes_are_refused() -> None:
    q, pos = torch.randn(2, 8), torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="offset 3"):
        contrastive_loss(q, pos, None, T, offset=3)
    with pytest.raises(ValueError, match="negatives"):
        contrastive_loss(q, pos, torch.randn(1, 3, 8), T)
    with pytest.raises(ValueError, match="groups"):
        contrastive_loss(q, pos, None, T, groups=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="positives"):
        contrastive_loss(q, torch.randn(4, 8), None, T)
