"""Packed sequences: many rows in one sequence, each attending only to itself, no padding.

Rows (token id lists, or the rows of a left-padded batch) are placed greedily, longest first, into packs
of at most ``max_tokens`` tokens (the backbones' default: :func:`attention_bounded_width`; without one, the
longest row). Each pack is one row of the batch; position ids restart at 0 for every segment. Called with
``attention_mask=None`` and ``use_cache=False``, transformers (>= 5) detects the segments from the
restarting position ids (``masking_utils.find_packed_sequence_indices``) and builds a block-diagonal
causal mask (SDPA, eager, flex) or runs variable-length kernels (FlashAttention-2), so each row is
computed exactly as alone. The embedding of row i is the hidden state at its last token,
``states.flatten(0, 1)[batch["last_index"][i]]`` (:func:`last_token`).

Images travel with their rows: per-row image tensors (LLaVA-NeXT ``pixel_values`` / ``image_sizes``, SmolVLM
``pixel_values`` / ``pixel_attention_mask``) are reordered into the order in which their rows appear in the
flattened packs, which is the order the model scatters image features into the image-token positions.

A pack that is shorter than the batch's longest is filled at its end with a dummy segment (pad ids,
positions from 0) whose outputs are never read. Which backbones and input kinds pack exactly is the
backbone's contract (:attr:`e5v.backbones.base.Backbone.packable`); the others fall back to padded batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

#: ``packing`` settings of the Embedder and the Trainer: ``true`` packs every batch wherever the backbone packs
#: that input kind exactly (a warning names what falls back to padding); ``false`` never; ``auto`` packs a batch
#: on a device of :data:`AUTO_PACK_DEVICES` when packing removes at least :data:`AUTO_MIN_SAVING` of the padded
#: forward's tokens (length-sorted encoding batches hold little padding and stay padded; training batches of
#: anchors, positives and negatives of mixed lengths pack).
PACKING_MODES = ("auto", "true", "false")
#: device types on which ``packing: auto`` packs (docs/performance.md: on the 2-core CPU the tiny model is
#: overhead-bound, packed and padded steps measure alike, so the padded path, the reference, stays)
AUTO_PACK_DEVICES = ("cuda",)
#: share of a padded forward's tokens that packing must remove for ``auto`` to pack that batch
AUTO_MIN_SAVING = 0.10
#: the attention a pack may add, as a share of a token's matmul FLOPs, which sets the default pack width
#: (:func:`attention_bounded_width`)
ATTENTION_SHARE = 0.10
#: keys of a packed batch besides the model inputs
LAST_INDEX, LENGTHS = "last_index", "lengths"


def packing_mode(value: object) -> str:
    """``auto`` | ``true`` | ``false`` from a config value (YAML booleans and their strings accepted)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value).strip().lower() if value is not None else "auto"
    if text in PACKING_MODES:
        return text
    raise ValueError(f"packing must be one of {PACKING_MODES} (or a boolean), got {value!r}")


def check_pack_tokens(value: object) -> int | None:
    """``pack_tokens``: None (the backbone's default width) or an integer >= 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"pack_tokens must be an integer >= 1 or null, got {value!r}")
    return int(value)


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

    def tensors(self) -> dict[str, torch.Tensor]:
        """The model inputs (ids, positions) plus ``last_index`` and ``lengths`` (rows, input order)."""
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, LAST_INDEX: self.ends,
                LENGTHS: self.ends - self.starts + 1}


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


@dataclass
class _Layout:
    packs: int
    width: int
    starts: torch.Tensor  # (rows,) flat index of each row's first token
    lengths: torch.Tensor  # (rows,)
    dest: torch.Tensor  # flat indices of every real token, rows in input order, tokens in order
    positions: torch.Tensor  # (packs * width,) position ids, fills included


def attention_bounded_width(layer_matmul_params: int, hidden: int, share: float = ATTENTION_SHARE) -> int:
    """The widest pack whose attention costs at most ``share`` of a token's matmul FLOPs. With SDPA or eager
    attention the block-diagonal mask is dense: a token attends over the whole pack, 4 x width x hidden FLOPs
    per layer, against 2 x the layer's matmul parameters (variable-length flash attention skips the masked
    blocks; the same width keeps its packs comparable). LLaVA-NeXT-8B (218M per layer, hidden 4,096): 2,662
    tokens; the tiny test models (37K, hidden 64): 28, so their rows pack only beside the longest row."""
    return max(1, int(share * 2 * layer_matmul_params / (4 * hidden)))


def pack_width(lengths: Sequence[int], max_tokens: int | None) -> int:
    """Tokens per pack: ``max_tokens``, or the longest row (a longer row always gets a pack of its own)."""
    return int(max_tokens) if max_tokens else max(int(n) for n in lengths)


def saving(lengths: Sequence[int], max_tokens: int | None = None) -> float:
    """Share of a left-padded forward's tokens (rows x longest) that packing these rows removes (can be < 0)."""
    lengths = [int(n) for n in lengths]
    packs = plan_packs(lengths, pack_width(lengths, max_tokens))
    width = max(sum(lengths[i] for i in p) for p in packs)
    return 1.0 - len(packs) * width / (len(lengths) * max(lengths))


def _layout(lengths: Sequence[int], max_tokens: int | None) -> _Layout:
    lengths = [int(n) for n in lengths]
    if not lengths:
        raise ValueError("nothing to pack: no rows")
    packs = plan_packs(lengths, pack_width(lengths, max_tokens))
    width = max(sum(lengths[i] for i in p) for p in packs)
    starts = torch.empty(len(lengths), dtype=torch.long)
    positions = torch.empty(len(packs) * width, dtype=torch.long)
    for b, pack in enumerate(packs):
        at = b * width
        for i in pack:
            starts[i] = at
            positions[at : at + lengths[i]] = torch.arange(lengths[i])
            at += lengths[i]
        if at < (b + 1) * width:  # the fill: its own segment, never read
            positions[at : (b + 1) * width] = torch.arange((b + 1) * width - at)
    n = torch.tensor(lengths, dtype=torch.long)
    # every real token's flat index: its row's start + its offset within the row
    offsets = torch.arange(int(n.sum())) - torch.repeat_interleave(n.cumsum(0) - n, n)
    dest = torch.repeat_interleave(starts, n) + offsets
    return _Layout(len(packs), width, starts, n, dest, positions)


def pack_rows(rows: Sequence[Sequence[int]], max_tokens: int | None, pad_id: int) -> PackedBatch:
    """Pack token-id rows into a (packs, L) batch; see the module docstring. ``max_tokens`` None: the default
    width (:func:`pack_width`)."""
    lay = _layout([len(r) for r in rows], max_tokens)
    ids = torch.full((lay.packs * lay.width,), int(pad_id), dtype=torch.long)
    ids[lay.dest] = torch.as_tensor([t for r in rows for t in r], dtype=torch.long)
    return PackedBatch(ids.view(lay.packs, lay.width), lay.positions.view(lay.packs, lay.width),
                       lay.starts + lay.lengths - 1, lay.starts, int(lay.lengths.sum()))


def pack_padded(
    batch: dict[str, torch.Tensor],
    pad_id: int,
    max_tokens: int | None = None,
    token_keys: Sequence[str] = ("input_ids",),
    row_keys: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """A left-padded batch (``attention_mask`` 1 on each row's real tokens, at its end) -> the same rows packed.

    ``token_keys``: (B, L) per-token tensors moved with their tokens (``input_ids`` filled with ``pad_id``, others
    with 0); ``row_keys``: per-row tensors (dim 0 = row: one image per row) reordered into the rows' order in the
    flattened packs. Other keys (``attention_mask``, ``position_ids``) are replaced; any key not named raises,
    so a family's new input is never dropped silently. Returns ``input_ids``, ``position_ids``, the other
    token and row keys, ``last_index`` and ``lengths`` (rows, input order)."""
    mask = batch["attention_mask"]
    rows, width = mask.shape
    unknown = set(batch) - {*token_keys, *row_keys, "attention_mask", "position_ids"}
    if unknown:
        raise ValueError(f"cannot pack a batch with input(s) {sorted(unknown)}: the backbone's Inputs names no "
                         "packing rule for them (packed_token_keys / packed_row_keys)")
    lengths = mask.sum(1)
    expected = torch.arange(width).unsqueeze(0) >= (width - lengths).unsqueeze(1)
    if not torch.equal(mask.bool(), expected):
        raise ValueError("pack_padded needs a LEFT-padded batch (each row's real tokens at its end)")
    lay = _layout(lengths.tolist(), max_tokens)
    src = mask.reshape(-1).nonzero().squeeze(1)  # real tokens, rows in order, tokens in order
    out: dict[str, torch.Tensor] = {}
    for key in token_keys:
        if key not in batch:
            continue
        t = batch[key]
        flat = t.new_full((lay.packs * lay.width, *t.shape[2:]), pad_id if key == "input_ids" else 0)
        flat[lay.dest] = t.reshape(rows * width, *t.shape[2:])[src]
        out[key] = flat.view(lay.packs, lay.width, *t.shape[2:])
    order = torch.argsort(lay.starts)  # rows in the order their tokens appear in the flattened packs
    for key in row_keys:
        if key in batch:
            out[key] = batch[key][order]
    out["position_ids"] = lay.positions.view(lay.packs, lay.width)
    out[LAST_INDEX] = lay.starts + lay.lengths - 1
    out[LENGTHS] = lay.lengths
    return out


def is_packed(batch: dict[str, torch.Tensor]) -> bool:
    return LAST_INDEX in batch


def last_token(states: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, L, d) final hidden states -> (rows, d): position -1 of each row of a left-padded batch, or each
    segment's last token of a packed one (rows in input order)."""
    index = batch.get(LAST_INDEX)
    if index is None:
        return states[:, -1, :]
    return states.reshape(-1, states.shape[-1]).index_select(0, index.to(states.device))


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens of the rows of a batch, padding and fills not counted."""
    if LENGTHS in batch:
        return int(batch[LENGTHS].sum())
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def padding_waste(lengths: Sequence[int], batch: int) -> float:
    """Fraction of the tokens of a left-padded forward (rows in order, ``batch`` per forward) that are pads."""
    total = real = 0
    for i in range(0, len(lengths), batch):
        chunk = lengths[i : i + batch]
        total += max(chunk) * len(chunk)
        real += sum(chunk)
    return 1.0 - real / total if total else 0.0
