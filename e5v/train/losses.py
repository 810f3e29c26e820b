"""Contrastive losses as pure functions on embeddings (no model, no process group inside).

* :func:`info_nce_hard_negatives`: E5-V's stage-1 loss (one positive, one hard negative per row), as released;
* :func:`contrastive_loss`: stage 2 (several positives, any number of hard negatives, homogeneous sub-batches,
  Matryoshka prefixes).

Tested by ``.venv/bin/python -m pytest -q tests/test_losses.py tests/test_stage2_losses.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from e5v.matryoshka import check_dims


def info_nce_hard_negatives(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None,
    temperature: float = 0.05,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE with hard negatives, one direction (anchor -> candidates), as released.

    Args:
        anchors:   (b, d) this process's anchors.
        positives: (n, d) ALL positives of the global batch (n >= b), rank order.
        negatives: (n, d) ALL hard negatives of the global batch, or None.
        temperature: logits are cosine similarities divided by this (0.05 in the paper).
        offset: index of this process's first anchor in the global batch (rank * b); anchor i's own
            positive is ``positives[offset + i]``.

    Returns:
        (loss, accuracy): mean cross-entropy over the b anchors of logits
        ``[cos(a, p_j) for all j] ++ [cos(a, n_j) for all j]`` / temperature with target ``offset + i``,
        and the fraction of anchors whose top logit is their own positive.
    """
    a = F.normalize(anchors.float(), dim=-1)
    cands = positives if negatives is None else torch.cat([positives, negatives], dim=0)
    c = F.normalize(cands.float(), dim=-1)
    logits = a @ c.T / temperature  # (b, n) or (b, 2n)
    target = torch.arange(a.shape[0], device=a.device) + offset
    loss = F.cross_entropy(logits, target)
    acc = (logits.argmax(dim=-1) == target).float().mean()
    return loss, acc.detach()


def _check_dims(dims: list[int] | None, dim_weights: list[float] | None, d: int) -> tuple[list[int], list[float]]:
    """Validated Matryoshka prefix sizes (:func:`e5v.matryoshka.check_dims`: a ConfigError, also a ValueError)
    and weights; ``dims`` None means the full width with weight 1."""
    if dims is None:
        if dim_weights is not None:
            raise ValueError(f"dim_weights={list(dim_weights)!r} given without dims: list the prefix sizes in dims")
        return [d], [1.0]
    dims = check_dims(dims, d)
    if dim_weights is None:
        return dims, [1.0] * len(dims)
    weights = [float(w) for w in dim_weights]
    if len(weights) != len(dims):
        raise ValueError(f"dim_weights={weights!r} has {len(weights)} values for {len(dims)} dims={dims!r}")
    for w in weights:
        if not (w > 0 and math.isfinite(w)):
            raise ValueError(f"dim_weights: {w!r} must be a finite number > 0 (dim_weights={weights!r})")
    return dims, weights


def contrastive_loss(
    queries: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None,
    temperature: float = 0.05,
    offset: int = 0,
    groups: torch.Tensor | None = None,
    dims: list[int] | None = None,
    dim_weights: list[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage-2 InfoNCE: several positives per query, any number of hard negatives, sub-batch scope, Matryoshka.

    Args:
        queries:   (b, d) this process's queries; query i is global row ``offset + i``.
        positives: (P, n, d) P >= 1 positives of EVERY global row; ``positives[j, g]`` is row g's j-th positive.
        negatives: (K, n, d) K hard negatives of every global row, or None (K = 0).
        temperature: logits are cosines / temperature.
        offset: global index of this process's first query.
        groups: (n,) integer sub-batch id per global row, or None; a query only sees candidates (positives
            and hard negatives) of rows in its own sub-batch.
        dims: None (full width) or strictly increasing prefix sizes; the loss is the weighted sum over dims
            of the loss on the re-normalised first ``dim`` coordinates (the full width only if listed).
        dim_weights: one weight > 0 per dim (default 1 each).

    Candidates are ``cat(positives.reshape(P*n, d), negatives.reshape(K*n, d))``: row g's j-th positive is
    candidate ``j*n + g``. For query g and each j, cross-entropy over the candidates with g's other positives
    masked out, target ``j*n + g``; the loss per dim is the mean over the b*P (query, positive) pairs.

    Returns:
        (loss, accuracy): accuracy (detached) is the fraction of (query, positive) pairs whose positive
        scores strictly above every unmasked other candidate, at the largest dim.
    """
    if queries.dim() != 2:
        raise ValueError(f"queries must be (b, d), got shape {tuple(queries.shape)}")
    if positives.dim() != 3 or positives.shape[0] < 1:
        raise ValueError(f"positives must be (P, n, d) with P >= 1, got shape {tuple(positives.shape)}")
    b, d = queries.shape
    p_count, n, _ = positives.shape
    if positives.shape[2] != d:
        raise ValueError(f"positives width {positives.shape[2]} != queries width {d}")
    if negatives is not None:
        if negatives.dim() != 3 or tuple(negatives.shape[1:]) != (n, d):
            raise ValueError(f"negatives must be (K, {n}, {d}), got shape {tuple(negatives.shape)}")
        if negatives.shape[0] == 0:
            negatives = None
    if offset < 0 or offset + b > n:
        raise ValueError(f"offset {offset} + {b} queries exceeds the {n} global rows")
    if groups is not None and tuple(groups.shape) != (n,):
        raise ValueError(f"groups must be ({n},), got shape {tuple(groups.shape)}")
    dims_l, weights = _check_dims(dims, dim_weights, d)

    dev = queries.device
    cands = positives.reshape(p_count * n, d)
    if negatives is not None:
        cands = torch.cat([cands, negatives.reshape(-1, d)], dim=0)
    c_count = cands.shape[0]
    rows = torch.arange(b, device=dev) + offset  # (b,) global row of each query
    cand_row = torch.arange(c_count, device=dev) % n  # (C,) global row each candidate belongs to
    cand_pos = torch.arange(c_count, device=dev) // n  # (C,) slot; < P means a positive
    own = cand_row[None, :] == rows[:, None]  # (b, C)
    is_pos = (cand_pos < p_count)[None, :]
    # mask[j, i, c]: candidate c hidden from (query i, positive j)
    slots = torch.arange(p_count, device=dev)
    mask = (own & is_pos)[None, :, :] & (cand_pos[None, None, :] != slots[:, None, None])  # (P, b, C)
    if groups is not None:
        g = groups.to(dev)
        mask = mask | (g[cand_row][None, :] != g[rows][:, None])[None, :, :]
    target = slots[:, None] * n + rows[None, :]  # (P, b)

    total = queries.new_zeros((), dtype=torch.float32)
    acc = total
    for k, w in zip(dims_l, weights):
        q = F.normalize(queries[:, :k].float(), dim=-1)
        c = F.normalize(cands[:, :k].float(), dim=-1)
        logits = (q @ c.T / temperature)[None, :, :].expand(p_count, b, c_count)  # (P, b, C)
        logits = logits.masked_fill(mask, float("-inf"))
        loss_k = F.cross_entropy(logits.reshape(p_count * b, c_count), target.reshape(-1))
        total = total + w * loss_k
        with torch.no_grad():
            tgt = logits.gather(-1, target[..., None]).squeeze(-1)  # (P, b)
            others = logits.scatter(-1, target[..., None], float("-inf")).amax(dim=-1)
            acc = (tgt > others).float().mean()
    return total, acc.detach()
