"""Training batches: the rows of one optimizer step -> CPU tensors per chunk, ready for the engine.

Each chunk (``trainer.micro_batch`` rows) becomes one or two model batches through the backbone's
:class:`~e5v.backbones.base.Inputs`, as the Embedder builds them:

* every row's query, positives and hard negatives (:class:`~e5v.data.contrastive.ContrastiveRows`: text, image or
  image + text each), rendered with their dataset's templates;
* the items with an image: decoded and preprocessed, each in its own rendered prompt, ONE batch (padded or packed);
* the text-only items: tokenized, ONE batch, left padded (positions from each row's first real token) or packed
  (:mod:`e5v.packing`), or the released script's batch bug for bug (``trainer.attend_padding=true``, text only).
  NLI triplets are all text (one batch: anchors, positives, negatives); image-caption pairs give an image batch
  (the queries) and a text batch (the captions), as before.

:class:`StepBatches` prepares a step's chunks in the training process (``num_workers=0``) or in DataLoader
worker processes that run ahead of the model (decoding and preprocessing images overlap the forward and
backward passes). Either way the batches of a step depend only on the step (the sampler's rows for it):
workers deliver steps in order, a step's batch is a pure function of its rows, so the batches are the
same with any number of workers (tested) and a resumed run picks up at its step. GradCache encodes each
chunk twice (no-grad pass, then replay): both passes take the same prepared tensors, decoded once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from e5v.data.images import BadImageError

log = logging.getLogger(__name__)


def release_padding(groups: list[list[list[int]]], pad_id: int, multiple: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The released script's batch, exactly (``trainer.attend_padding=true``): ``groups`` are the token ids of
    anchors, positives and (optionally) negatives. Each group is left-padded to a multiple of ``multiple``
    (its collator's ``pad_to_multiple_of=8``): anchors and negatives with ``pad_id`` (EOS), positives with
    0 (its ``-100`` label padding, set to 0); then every row is left-padded with ``pad_id`` to the longest
    group; the attention mask is ``ids > 0``. So EOS pads are ATTENDED (anchors, negatives, and the extra
    padding of positives), the positives' own pads are masked, and so is any real token of id 0.
    Positions are 0..L-1 for every row (the model's default), not restarted at the first real token.
    Returns (ids, mask), both (sum of group sizes, L)."""
    padded = []
    for g, rows in enumerate(groups):
        fill = 0 if g == 1 else pad_id
        width = max(len(r) for r in rows)
        width = -(-width // multiple) * multiple
        padded.append([[fill] * (width - len(r)) + list(r) for r in rows])
    longest = max(len(g[0]) for g in padded)
    ids = torch.tensor([[pad_id] * (longest - len(r)) + r for g in padded for r in g], dtype=torch.long)
    return ids, (ids > 0).long()


@dataclass
class Chunk:
    """One chunk's model batches (CPU tensors) and how their outputs map back to the chunk's items.

    A chunk of b rows has ``groups`` items per row: the query, P positives, K hard negatives (group-major: all
    queries, then every row's first positive, ...). Items with an image go to one image batch (first), text-only
    items to one text batch; ``order[j]`` is the position in the concatenated batch outputs of item j
    (None: they are already in item order)."""

    rows: np.ndarray
    batches: list[dict[str, torch.Tensor]] = field(default_factory=list)
    bad_image: tuple[str, str] | None = None  # (source, reason): raised in the training process, naming the file
    groups: int = 0
    order: torch.Tensor | None = None

    def check(self) -> Chunk:
        if self.bad_image is not None:
            raise BadImageError(*self.bad_image)
        return self

    def pin_memory(self) -> Chunk:  # DataLoader(pin_memory=True) calls this on custom batch types
        self.batches = [{k: v.pin_memory() for k, v in b.items()} for b in self.batches]
        return self


def templates_of(data: Any, row: int) -> dict[str, str]:
    """The kind -> prompt body table of ``row``'s dataset (a Mixture's rows carry their dataset's)."""
    of = getattr(data, "templates_of", None)
    return of(int(row)) if callable(of) else data.templates


class ChunkPreparer:
    """rows -> :class:`Chunk` for general contrastive rows (:class:`~e5v.data.contrastive.ContrastiveRows` or a
    :class:`~e5v.data.mixture.Mixture`): every row's query, its first ``positives`` positives and first
    ``negatives`` hard negatives, each rendered by its kind with its dataset's template (``train``: the training
    template, cut to ``train_max_tokens``; else that prompt body, the MMEB evaluation's rendering). Holds the data
    columns, the prompt set, the backbone's Inputs and the batch settings only, so DataLoader workers run it
    (forked: the data columns are not copied)."""

    def __init__(
        self,
        data: Any,
        prompt: Any,
        inputs: Any,
        positives: int = 1,
        negatives: int = 0,
        pack_text: float | None = None,
        pack_images: float | None = None,
        pack_tokens: int | None = None,
        attend_padding: bool = False,
        release_pad_id: int | None = None,
    ) -> None:
        self.data, self.prompt, self.inputs = data, prompt, inputs
        self.positives, self.negatives = int(positives), int(negatives)
        # None: padded; a number: packed when that removes at least this share of the batch's tokens
        self.pack_text, self.pack_images, self.pack_tokens = pack_text, pack_images, pack_tokens
        self.attend_padding, self.release_pad_id = attend_padding, release_pad_id
        self.keep_instruction = prompt.keep_instruction

    @property
    def groups(self) -> int:
        return 1 + self.positives + self.negatives

    def items_for(self, rows: Sequence[int]) -> list[tuple[Any, dict[str, str]]]:
        """(item, its dataset's templates) of ``rows``, group-major: queries, positive 1, ..., negative K."""
        d = self.data
        out = [(d.queries[i], templates_of(d, i)) for i in rows]
        for j in range(self.positives):
            out += [(d.positives[i][j], templates_of(d, i)) for i in rows]
        for k in range(self.negatives):
            out += [(d.negatives[i][k], templates_of(d, i)) for i in rows]
        return out

    def render(self, item: Any, templates: dict[str, str]) -> str:
        kind = item.kind(self.keep_instruction)
        text = item.text_with(self.keep_instruction, self.prompt.instruction_separator)
        return self.prompt.render_item(templates[kind], text, kind != "text", tokenizer=self.inputs.tokenizer)

    def texts_for(self, rows: Sequence[int]) -> list[str]:
        """The rendered prompts of ``rows``' items, group-major (text triplets: anchors, positives, negatives)."""
        return [self.render(it, t) for it, t in self.items_for(rows)]

    def text_batch(self, ids: list[list[int]]) -> dict[str, torch.Tensor]:
        if self.pack_text is None:
            return self.inputs.text(ids)
        return self.inputs.pack_text(ids, self.pack_tokens, self.pack_text)

    def __call__(self, rows: Sequence[int]) -> Chunk:
        from e5v.data.images import load_image

        rows = np.asarray(rows)
        items = self.items_for(rows)
        prompts = [self.render(it, t) for it, t in items]
        with_image = [j for j, (it, _) in enumerate(items) if it.image is not None]
        text_only = [j for j, (it, _) in enumerate(items) if it.image is None]
        batches: list[dict[str, torch.Tensor]] = []
        if with_image:
            try:
                images = [load_image(items[j][0].image, int(rows[j % len(rows)])) for j in with_image]
            except BadImageError as e:
                return Chunk(rows, bad_image=(e.source, e.reason))
            ids = self.inputs.tokenize([prompts[j] for j in with_image])
            batch = self.inputs.images([(i, prompts[j]) for i, j in zip(ids, with_image)], images)
            if self.pack_images is not None:
                batch = self.inputs.pack(batch, self.pack_tokens, self.pack_images)
            batches.append(batch)
        if text_only:
            ids = self.inputs.tokenize([prompts[j] for j in text_only])
            if self.attend_padding:  # the released script's batch, bug for bug (model's default positions)
                n = len(rows)
                ids_t, mask = release_padding([ids[i : i + n] for i in range(0, len(ids), n)], int(self.release_pad_id))
                batches.append({"input_ids": ids_t, "attention_mask": mask})
            else:
                batches.append(self.text_batch(ids))
        flat = with_image + text_only  # item index of each output row, in batch order
        order = None
        if flat != list(range(len(items))):
            order = torch.empty(len(items), dtype=torch.long)
            order[torch.tensor(flat)] = torch.arange(len(items))
        return Chunk(rows, batches, groups=self.groups, order=order)


class _Steps(torch.utils.data.Dataset):
    """Element i = the chunks of step ``start + i`` for one rank (prepared in a worker)."""

    def __init__(self, batches: StepBatches, start: int, stop: int) -> None:
        self.batches, self.start, self.stop = batches, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, i: int) -> tuple[int, list[Chunk]]:
        step = self.start + i
        return step, self.batches.prepare_step(step)


def _identity(x: Any) -> Any:
    return x


class StepBatches:
    """The chunks of each optimizer step for one rank, prepared here or in ``num_workers`` DataLoader workers
    (steps delivered in order; ``prefetch`` steps per worker prepared ahead). Asking for a step other than
    the next one (a resumed run, a benchmark) restarts the workers at that step."""

    def __init__(
        self,
        prepare: ChunkPreparer,
        sampler: Any,
        micro: int,
        rank: int = 0,
        world: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
        stop: int | None = None,
        prefetch: int = 2,
    ) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.prepare, self.sampler, self.micro = prepare, sampler, int(micro)
        self.rank, self.world = rank, world
        self.num_workers, self.pin_memory, self.prefetch = int(num_workers), bool(pin_memory), int(prefetch)
        self.stop = stop
        self._stream: Iterator[tuple[int, list[Chunk]]] | None = None
        self._next = -1

    def chunk_rows(self, step: int) -> list[np.ndarray]:
        rows = self.sampler.rows(step, self.rank, self.world)
        return [rows[i : i + self.micro] for i in range(0, len(rows), self.micro)]

    def prepare_step(self, step: int) -> list[Chunk]:
        return [self.prepare(rows) for rows in self.chunk_rows(step)]

    def chunks(self, step: int) -> list[Chunk]:
        """This rank's chunks of ``step``, checked (a bad image raises here, naming its file)."""
        if self.num_workers == 0 or (self.stop is not None and step >= self.stop):
            return [c.check() for c in self.prepare_step(step)]
        if self._stream is None or step != self._next:
            self._open(step)
        assert self._stream is not None
        got, chunks = next(self._stream)
        if got != step:  # pragma: no cover - the loader delivers steps in order
            raise RuntimeError(f"training batches out of order: expected step {step}, got {got}")
        self._next = step + 1
        return [c.check() for c in chunks]

    def _open(self, step: int) -> None:
        from torch.utils.data import DataLoader

        self.close()
        stop = self.stop if self.stop is not None else step + 10**9
        loader = DataLoader(
            _Steps(self, step, stop),
            batch_size=None,  # an element is already a step's chunks
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=_identity,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch,
            persistent_workers=False,
            # its own generator: creating the loader must not draw from the global RNG (LoRA dropout, resume)
            generator=torch.Generator().manual_seed(0),
        )
        self._stream = iter(loader)
        self._next = step

    def close(self) -> None:
        """Stop the workers (if any)."""
        stream, self._stream = self._stream, None
        shutdown = getattr(stream, "_shutdown_workers", None)
        if callable(shutdown):
            shutdown()


__all__ = ["Chunk", "ChunkPreparer", "StepBatches", "release_padding"]
