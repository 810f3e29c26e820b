"""Packed sequences: many rows in one sequence, each attending only to itself, no padding.

Rows (token id lists) are placed greedily, longest first, into packs of at most ``max_tokens`` tokens.
Each pack is one row of the batch; position ids restart at 0 for every segment. Called with
``attention_mask=None`` and ``use_cache=False``, transformers (>= 5) detects the segments from the
restarting position ids and builds a block-diagonal causal mask (SDPA, eager, flex) or runs variable-
length kernels (FlashAttention-2), so each row is computed exactly as alone. The embedding of row i is
the hidden state at its last token: ``states.flatten(0, 1)[batch.ends[i]]``.

A pack that is shorter than the batch's longest is filled at its end with a dummy segment (pad ids,
positions from 0) whose outputs are never read. Backbones whose position ids are not a plain 1-D
count (Qwen2-VL's multimodal rotary ids) cannot be packed this way and say so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (packs, L)
    position_ids: torch.Tensor  # (packs, L), restarting at 0 in every segment
    ends: torch.Tensor  # (rows,) index into the flattened (packs * L) tokens of each row's last token, input order
    starts: torch.Tensor  # (rows,) flat index of each row's first token
    real_tokens: int  # tokens of the rows (no fill)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)  # type: ignore[return-value]

    def gather(self, states: torch.Tensor) -> torch.Tensor:
        """(packs, L, d) hidden states -> (rows, d) last-token states in input order."""
        return states.reshape(-1, states.shape[-1])[self.ends.to(states.device)]


def plan_packs(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Row indices per pack: first-fit decreasing, at most ``max_tokens`` tokens per pack (a longer row gets a
    pack of its own). Deterministic for given lengths."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = int(lengths[i])
        if n < 1:
            raise ValueError(f"row {i} is empty: every packed row needs at least one token")
        for p, free in enumerate(room):
            if n <= free:
                packs[p].append(i)
                room[p] -= n
                break
        else:
            packs.append([i])
            room.append(max_tokens - n)
    return packs


def pack_rows(rows: Sequence[Sequence[int]], max_tokens: int, pad_id: int) -> PackedBatch:
    """Pack token-id rows into a (packs, L) batch; see the module docstring."""
    lengths = [len(r) for r in rows]
    packs = plan_packs(lengths, max_tokens)
    width = max(sum(lengths[i] for i in p) for p in packs)
    ids = torch.full((len(packs), width), int(pad_id), dtype=torch.long)
    pos = torch.zeros((len(packs), width), dtype=torch.long)
    ends = torch.empty(len(rows), dtype=torch.long)
    starts = torch.empty(len(rows), dtype=torch.long)
    for b, pack in enumerate(packs):
        at = 0
        for i in pack:
            n = lengths[i]
            ids[b, at : at + n] = torch.as_tensor(list(rows[i]), dtype=torch.long)
            pos[b, at : at + n] = torch.arange(n)
            starts[i], ends[i] = b * width + at, b * width + at + n - 1
            at += n
        if at < width:  # the fill: its own segment, never read
            pos[b, at:] = torch.arange(width - at)
    return PackedBatch(ids, pos, ends, starts, sum(lengths))


def padding_waste(lengths: Sequence[int], batch: int) -> float:
    """Fraction of the tokens of a left-padded forward (rows in order, ``batch`` per forward) that are pads."""
    total = real = 0
    for i in range(0, len(lengths), batch):
        chunk = lengths[i : i + batch]
        total += max(chunk) * len(chunk)
        real += sum(chunk)
    return 1.0 - real / total if total else 0.0
