"""Contrastive losses as pure functions on embeddings (no model, no process group inside)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
