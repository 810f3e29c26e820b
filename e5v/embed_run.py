"""The Embedder's run: items -> length-sorted batches -> CPU tensors -> the backbone's forward -> embeddings.

Batches are formed longest first (``batch_size`` rows, or fewer when ``max_batch_tokens`` caps the padded
size); each batch becomes CPU tensors through the backbone's :class:`~e5v.backbones.base.Inputs` (padded, or
packed when the backbone packs that input kind and it saves enough), in this process or in DataLoader
workers; on the device the last-token state is taken, cut to the first ``dim`` coordinates (Matryoshka) and
L2-normalised when asked. Results come back in input order, float32. Used by
:class:`e5v.embedder.Embedder`; tests: tests/test_embedder.py, tests/test_embedder_perf.py, tests/test_packing.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from e5v import matryoshka
from e5v import packing as packing_lib
from e5v.backbones.base import Backbone, Inputs
from e5v.data.images import BadImageError, load_image
from e5v.embed_items import PromptItem, Skipped

FLUSH_ROWS = 8192  # embeddings kept on the device before one copy to the host (8192 x 4096 fp32 = 128 MiB)


@dataclass
class Prepared:
    """One batch ready for the model: CPU tensors, the batch positions kept, the bad images met."""

    tensors: dict[str, torch.Tensor]
    kept: list[int]  # positions in the batch (not item indices)
    bad: list[Skipped] = field(default_factory=list)


def length_sorted_batches(items: list[PromptItem], batch_size: int, budget: int | None) -> Iterator[list[PromptItem]]:
    """Longest first; a batch closes at ``batch_size`` rows or when its padded size (rows x its first,
    longest, row) would pass ``budget`` tokens (a row longer than the budget goes alone)."""
    order = sorted(items, key=lambda it: (-it.length, it.index))
    batch: list[PromptItem] = []
    for it in order:
        over = budget is not None and (len(batch) + 1) * batch[0].length > budget if batch else False
        if batch and (len(batch) >= batch_size or over):
            yield batch
            batch = []
        batch.append(it)
    if batch:
        yield batch


class EncodeRun:
    """One encode call's batching, preparing and forward passes, from the Embedder's current settings.

    ``on_bad`` receives each image that fails to decode (it raises, or records the skip). ``packed`` says
    whether any batch ran packed (None until :meth:`embeddings` starts)."""

    def __init__(
        self,
        backbone: Backbone,
        inputs: Inputs,
        *,
        on_bad: Callable[[int, BadImageError], None],
        max_batch_tokens: int | None = None,
        packing: str = "false",
        pack_tokens: int | None = None,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        progress: bool | None = None,
    ) -> None:
        self.backbone = backbone
        self.inputs = inputs
        self.on_bad = on_bad
        self.max_batch_tokens = max_batch_tokens
        self.packing = packing
        self.pack_tokens = pack_tokens
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.progress = progress
        self.packed: bool | None = None

    def batches(self, items: list[PromptItem], batch_size: int) -> Iterator[list[PromptItem]]:
        return length_sorted_batches(items, batch_size, self.max_batch_tokens)

    def preparer(self, pack: float | None = None) -> Preparer:
        width = self.pack_tokens or (self.backbone.default_pack_tokens() if pack is not None else None)
        return Preparer(self.inputs, pack, width)

    def kept(self, batch: list[PromptItem], prep: Prepared) -> list[PromptItem]:
        for bad in prep.bad:
            self.on_bad(bad.index, BadImageError(bad.source, bad.reason))
        return [batch[k] for k in prep.kept]

    def pin(self) -> bool:
        if self.pin_memory is not None:
            return bool(self.pin_memory) and torch.cuda.is_available()
        return self.backbone.device.type == "cuda"

    def to_device(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device, dtype = self.backbone.device, self.backbone.dtype
        non_blocking = device.type == "cuda" and self.pin()
        out = {}
        for k, v in tensors.items():
            if non_blocking and not v.is_pinned():
                v = v.pin_memory()
            v = v.to(device, non_blocking=non_blocking)
            if v.is_floating_point():
                v = v.to(dtype)
            out[k] = v
        return out

    def prepared_batches(
        self, batches: list[list[PromptItem]], pack: float | None = None
    ) -> Iterator[tuple[list[PromptItem], Prepared]]:
        """(batch, prepared) pairs in order; image batches go through DataLoader workers when asked."""
        prep = self.preparer(pack)
        if self.num_workers == 0 or batches[0][0].image is None:
            for b in batches:
                yield b, prep(b)
            return
        from torch.utils.data import DataLoader

        loader = DataLoader(
            BatchList(batches, prep),
            batch_size=None,  # each dataset element is already a batch
            num_workers=min(self.num_workers, len(batches)),
            pin_memory=self.pin(),
            collate_fn=_identity,
            persistent_workers=False,
        )
        yield from zip(batches, loader)

    @torch.inference_mode()
    def embeddings(
        self, items: list[PromptItem], batch_size: int, normalize: bool, kind: str, dim: int | None, width: int
    ) -> np.ndarray:
        """(n_kept, width) float32 in input order; ``dim``: Matryoshka prefix (None: the full state)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        batches = list(self.batches(items, batch_size))
        pack = self.backbone.pack_threshold(kind, self.packing) if batches else None
        self.packed = False
        show = self.progress if self.progress is not None else len(batches) > 1
        results: dict[int, np.ndarray] = {}
        pending: list[tuple[torch.Tensor, list[PromptItem]]] = []
        stream: Any = self.prepared_batches(batches, pack) if batches else iter(())
        if show and not os.environ.get("E5V_NO_PROGRESS"):
            from tqdm.auto import tqdm

            stream = tqdm(stream, total=len(batches), desc="encode", unit="batch")
        self.backbone.model.eval()
        for batch, prepared in stream:
            kept = self.kept(batch, prepared)
            if not kept:
                continue
            self.packed |= packing_lib.is_packed(prepared.tensors)
            states = self.backbone.last_token_states(self.to_device(prepared.tensors)).float()  # (B, d)
            states = matryoshka.prefix(states, dim, normalize)  # (B, dim or d), L2-normalised when asked
            pending.append((states, kept))  # copied to the host in groups: no device sync per batch
            if sum(len(k) for _, k in pending) >= FLUSH_ROWS:
                _flush(pending, results)
        _flush(pending, results)
        if not results:
            return np.zeros((0, width), dtype=np.float32)
        return np.stack([results[i] for i in sorted(results)]).astype(np.float32, copy=False)


def _flush(pending: list[tuple[torch.Tensor, list[PromptItem]]], results: dict[int, np.ndarray]) -> None:
    if not pending:
        return
    arr = torch.cat([states for states, _ in pending]).cpu().numpy()
    rows = [it for _, kept in pending for it in kept]
    for row, it in zip(arr, rows):
        results[it.index] = row
    pending.clear()


class Preparer:
    """Turns a batch of items into CPU tensors through the backbone's :class:`~e5v.backbones.base.Inputs`
    (text: the ids tokenized once up front, left padded or packed; images: decoded here, bad files reported,
    then the family's processor call, packed when asked). ``pack``: None = padded; a number = packed when that
    removes at least this share of the batch's tokens. Picklable (holds only the Inputs and the packing
    settings), so it also runs in DataLoader workers."""

    def __init__(self, inputs: Inputs, pack: float | None = None, pack_tokens: int | None = None) -> None:
        self.inputs = inputs
        self.pack = pack
        self.pack_tokens = pack_tokens

    def __call__(self, batch: list[PromptItem]) -> Prepared:
        if batch[0].image is None:
            ids = [it.ids for it in batch]
            if self.pack is None:
                tensors = self.inputs.text(ids)
            else:
                tensors = self.inputs.pack_text(ids, self.pack_tokens, self.pack)
            return Prepared(tensors, list(range(len(batch))))
        kept: list[int] = []
        images: list[Any] = []
        bad: list[Skipped] = []
        for k, it in enumerate(batch):
            try:
                images.append(load_image(it.image, it.index))
                kept.append(k)
            except BadImageError as e:
                bad.append(Skipped(it.index, e.source, e.reason))
        if not kept:
            return Prepared({}, [], bad)
        rows = [(batch[k].ids, batch[k].prompt) for k in kept]
        tensors = self.inputs.images(rows, images)
        if self.pack is not None:
            tensors = self.inputs.pack(tensors, self.pack_tokens, self.pack)
        return Prepared(tensors, kept, bad)


class BatchList(torch.utils.data.Dataset):
    """Dataset view of precomputed batches: element i = batch i prepared (in a worker process)."""

    def __init__(self, batches: list[list[PromptItem]], prepare: Preparer) -> None:
        self.batches = batches
        self.prepare = prepare

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Prepared:
        return self.prepare(self.batches[i])


def _identity(x: Any) -> Any:
    return x


__all__ = ["FLUSH_ROWS", "BatchList", "EncodeRun", "Prepared", "Preparer", "length_sorted_batches"]
