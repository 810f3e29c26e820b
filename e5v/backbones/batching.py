"""Left padding and position ids: the one place where a batch of token ids becomes model tensors.

Every caller (the embedder, the trainer, the tiny_world pretraining, every backbone family) pads on
the LEFT, so position -1 is each row's real last token, and gives each row positions that start at 0
on its first real token, so an item's embedding does not depend on what it is batched with.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) input ids left padded with ``pad_id`` and the matching 0/1 attention mask (int64)."""
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), int(pad_id), dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for r, s in enumerate(seqs):
        if len(s):
            ids[r, width - len(s) :] = s
            mask[r, width - len(s) :] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) position ids: 0 on each row's first attended token, then +1 per attended token; left
    padding gets 0 (it is masked out anyway)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def with_positions(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with ``position_ids`` from its ``attention_mask`` (in place, returned for chaining)."""
    tensors["position_ids"] = positions_from_mask(tensors["attention_mask"])
    return tensors


def text_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``position_ids`` of left-padded token id lists."""
    ids, mask = left_pad(seqs, pad_id)
    return with_positions({"input_ids": ids, "attention_mask": mask})


def pad_rows(tensors: Sequence[torch.Tensor], pad_value: float | int) -> torch.Tensor:
    """Left pad (B_i, L_i, ...) tensors along dim 1 to the longest and concatenate along dim 0."""
    width = max(t.shape[1] for t in tensors)
    out = []
    for t in tensors:
        if t.shape[1] < width:
            fill = t.new_full((t.shape[0], width - t.shape[1], *t.shape[2:]), pad_value)
            t = torch.cat([fill, t], dim=1)
        out.append(t)
    return torch.cat(out, dim=0)


__all__ = ["left_pad", "pad_rows", "positions_from_mask", "text_batch", "with_positions"]
