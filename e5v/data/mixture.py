"""Dataset mixtures for stage-2 training: several :class:`~e5v.data.contrastive.ContrastiveRows` as one flat
set of rows, and a sampler whose global batches are made of homogeneous sub-batches.

* :class:`Mixture`: the datasets' columns concatenated (``queries``, ``positives``, ``negatives``, ``ids``),
  ``dataset_index`` (which dataset each flat row comes from), ``offsets`` (where each dataset starts),
  the per-row ``templates_of`` / ``image_root_of``, sampling ``weights`` and the ``sub_batch`` size.
* :class:`MixtureSampler`: the interface of :class:`e5v.data.nli.StepSampler` (``rows(step, rank, world)``,
  ``steps_per_epoch``, ``position(step)``) plus ``groups(step)``. Each run of ``sub_batch`` consecutive rows
  of a global batch comes from ONE dataset, chosen by weight (VLM2Vec's "interleaved sub-batching": in-batch
  negatives of one task are meaningful, a mix of tasks makes them trivial); within a dataset, rows are drawn
  without replacement through its own shuffled order, reshuffled when it runs out. Everything is a pure
  function of ``(seed, step)``: a resumed run, or a run on another number of processes, sees the same batches.
  One dataset: exactly :class:`~e5v.data.nli.StepSampler` (today's runs unchanged).
* :func:`load_mixture`: the ``_target_`` of ``configs/data/mmeb_train.yaml`` (several MMEB-train subsets).

Run: library only; ``python -c "from e5v.data.mixture import Mixture"``.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from e5v.data.contrastive import ContrastiveRows, Item, load_jsonl_rows, load_mmeb_train
from e5v.data.nli import StepSampler
from e5v.errors import ConfigError, DataError


class Mixture:
    """Several datasets as one flat list of rows (dataset after dataset, in the order given)."""

    def __init__(self, datasets: list[ContrastiveRows], weights: list[float] | dict[str, float] | None = None,
                 sub_batch: int | None = None) -> None:
        datasets = list(datasets)
        if not datasets:
            raise ConfigError("a mixture needs at least one dataset")
        names = [d.name for d in datasets]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"dataset names in a mixture must be unique; {dup} appear more than once: give each "
                              "dataset its own name (data.loader.datasets[i].name)")
        for d in datasets:
            if not len(d):
                raise DataError(f"dataset {d.name!r} ({d.source}) has no rows")
        self.datasets = datasets
        if weights is None:
            w = [float(len(d)) for d in datasets]
        elif isinstance(weights, dict):
            unknown = sorted(set(weights) - set(names))
            missing = [n for n in names if n not in weights]
            if unknown or missing:
                raise ConfigError(f"mixture weights: unknown dataset(s) {unknown}, missing {missing}; the datasets "
                                  f"are {names}")
            w = [float(weights[n]) for n in names]
        else:
            w = [float(x) for x in weights]
            if len(w) != len(datasets):
                raise ConfigError(f"{len(w)} mixture weight(s) for {len(datasets)} datasets ({names}); give one "
                                  "weight per dataset, or null (proportional to the sizes)")
        if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
            raise ConfigError(f"mixture weights must be finite, >= 0 and not all 0; got {dict(zip(names, w))}")
        self.weights = w
        if sub_batch is not None and (not isinstance(sub_batch, int) or sub_batch < 1):
            raise ConfigError(f"data.sub_batch must be a positive integer or null, got {sub_batch!r}")
        self.sub_batch = sub_batch
        self.queries: list[Item] = [q for d in datasets for q in d.queries]
        self.positives: list[list[Item]] = [p for d in datasets for p in d.positives]
        self.negatives: list[list[Item]] = [n for d in datasets for n in d.negatives]
        self.ids: list[str] = []
        for d in datasets:
            self.ids.extend(d.ids if len(d.ids) == len(d) else [f"{d.name}:{i}" for i in range(len(d))])
        if len(set(self.ids)) != len(self.ids):
            seen: set[str] = set()
            first = next(i for i in self.ids if i in seen or seen.add(i))  # type: ignore[func-returns-value]
            raise DataError(f"row id {first!r} appears in more than one row of the mixture {names}; row ids must be "
                            "unique (mined negatives are joined on them)")
        sizes = np.array([len(d) for d in datasets], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.dataset_index = np.repeat(np.arange(len(datasets)), sizes)
        self.name = "+".join(names)
        self.source = "; ".join(d.source for d in datasets)
        self.skipped = {d.name: dict(d.skipped) for d in datasets}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.datasets]

    @property
    def probabilities(self) -> np.ndarray:
        """The weights normalised: each dataset's chance of supplying a sub-batch."""
        w = np.asarray(self.weights, dtype=np.float64)
        return w / w.sum()

    @property
    def anchor_kind(self) -> str:
        """``image`` when every dataset's queries are images alone, else ``text``."""
        return "image" if all(d.anchor_kind == "image" for d in self.datasets) else "text"

    def dataset_of(self, i: int) -> ContrastiveRows:
        return self.datasets[int(self.dataset_index[i])]

    def templates_of(self, i: int) -> dict[str, str]:
        """The prompt bodies flat row ``i`` is rendered with (its dataset's)."""
        return self.dataset_of(i).templates

    def image_root_of(self, i: int) -> str | None:
        return self.dataset_of(i).image_root

    def identity_payload(self) -> dict[str, Any]:
        """What the run identity hashes: every dataset's payload, the weights and the sub-batch size."""
        return {"datasets": [d.identity_payload() for d in self.datasets], "weights": list(self.weights),
                "sub_batch": self.sub_batch}


class MixtureSampler:
    """Maps a global step to the flat rows of its global batch; sub-batches of ``sub_batch`` rows each come
    from one dataset. ``sub_batch``: the argument, else the mixture's, else the whole global batch."""

    def __init__(self, mixture_or_rows: Mixture | ContrastiveRows | Any, global_batch: int, seed: int,
                 sub_batch: int | None = None) -> None:
        mix = mixture_or_rows
        if sub_batch is None:
            sub_batch = getattr(mix, "sub_batch", None) if isinstance(mix, Mixture) else None
        if sub_batch is None:
            sub_batch = global_batch
        if not isinstance(sub_batch, int) or sub_batch < 1:
            raise ConfigError(f"data.sub_batch must be a positive integer, got {sub_batch!r}")
        if global_batch % sub_batch:
            raise ConfigError(f"trainer.global_batch={global_batch} is not a multiple of data.sub_batch={sub_batch}; "
                              f"set the global batch to a multiple (e.g. {global_batch - global_batch % sub_batch or sub_batch}) "
                              "or choose a sub-batch that divides it")
        self.global_batch, self.seed, self.sub_batch = int(global_batch), int(seed), int(sub_batch)
        self.n_rows = len(mix)
        if isinstance(mix, Mixture) and len(mix.datasets) > 1:
            self.sizes = np.array([len(d) for d in mix.datasets], dtype=np.int64)
            self.offsets = mix.offsets
            self.p = mix.probabilities
            small = [(d.name, len(d)) for d in mix.datasets if len(d) < self.sub_batch]
            if small:
                raise DataError(f"dataset(s) {small} have fewer rows than data.sub_batch={self.sub_batch}: a sub-batch "
                                "comes from one dataset; lower data.sub_batch or drop them from the mixture")
            if self.n_rows < self.global_batch:
                raise DataError(f"only {self.n_rows} rows but the global batch is {global_batch}; lower "
                                "trainer.global_batch")
            self._single: StepSampler | None = None
            # nominal: the mixture's size over the global batch (datasets are reshuffled on their own)
            self.steps_per_epoch = self.n_rows // self.global_batch
            self._counts: list[np.ndarray] = [np.zeros(len(self.sizes), dtype=np.int64)]  # sub-batches before step
            self._perm: dict[int, dict[int, np.ndarray]] = {}
        else:
            self._single = StepSampler(self.n_rows, self.global_batch, self.seed)
            self.steps_per_epoch = self._single.steps_per_epoch

    # ------------------------------------------------------------------ schedule
    def sub_batch_datasets(self, step: int) -> np.ndarray:
        """Which dataset supplies each sub-batch of global batch ``step`` (a pure function of seed and step)."""
        if self._single is not None:
            return np.zeros(self.global_batch // self.sub_batch, dtype=np.int64)
        rng = np.random.default_rng([self.seed, int(step), 0x4D49])
        return rng.choice(len(self.sizes), size=self.global_batch // self.sub_batch, p=self.p)

    def _counts_before(self, step: int) -> np.ndarray:
        """Sub-batches each dataset supplied in steps ``0..step-1`` (cached, extended as needed)."""
        while len(self._counts) <= step:
            s = len(self._counts) - 1
            c = np.bincount(self.sub_batch_datasets(s), minlength=len(self.sizes))
            self._counts.append(self._counts[-1] + c)
        return self._counts[step]

    def _permutation(self, d: int, epoch: int) -> np.ndarray:
        """Dataset ``d``'s row order in its pass ``epoch``: a seeded permutation, except that the rows of the
        previous pass's last ``G-1`` sub-batches (G = sub-batches per global batch) are moved out of the first
        ``G-1`` sub-batches, so that a global batch that straddles two passes holds no row twice (whenever the
        dataset has at least ``2 * (global_batch - sub_batch)`` rows). Computed pass after pass (cached)."""
        cache = self._perm.setdefault(d, {})
        if epoch in cache:
            return cache[epoch]
        start = max((e for e in cache if e < epoch), default=None)
        if start is None:
            cache.clear()
            start = 0
            cache[0] = np.random.default_rng([self.seed, d, 0, 0x4D58]).permutation(int(self.sizes[d]))
        s, k = self.sub_batch, self.global_batch - self.sub_batch
        per_epoch = int(self.sizes[d]) // s
        for e in range(start + 1, epoch + 1):
            prev = cache[e - 1]
            perm = np.random.default_rng([self.seed, d, e, 0x4D58]).permutation(int(self.sizes[d]))
            if k:
                tail = set(prev[max(per_epoch * s - k, 0):per_epoch * s].tolist())
                head = [x for x in perm.tolist() if x not in tail][:k]
                chosen = set(head)
                perm = np.array(head + [x for x in perm.tolist() if x not in chosen], dtype=perm.dtype)
            cache[e] = perm
            for old in [x for x in cache if x < e - 1]:
                del cache[old]
        return cache[epoch]

    def global_rows(self, step: int) -> np.ndarray:
        """The flat row indices of global batch ``step``, sub-batch after sub-batch."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self._single is not None:
            return self._single.rows(step, 0, 1)
        used = self._counts_before(step).copy()
        out = np.empty(self.global_batch, dtype=np.int64)
        s = self.sub_batch
        for g, d in enumerate(self.sub_batch_datasets(step)):
            per_epoch = int(self.sizes[d]) // s  # sub-batches per pass; the remainder waits for the reshuffle
            epoch, k = divmod(int(used[d]), per_epoch)
            out[g * s:(g + 1) * s] = self.offsets[d] + self._permutation(int(d), epoch)[k * s:(k + 1) * s]
            used[d] += 1
        return out

    # ------------------------------------------------------------------ StepSampler's interface
    def rows(self, step: int, rank: int = 0, world: int = 1) -> np.ndarray:
        """Flat row indices for this rank's share of global batch ``step`` (0-based): a slice of it."""
        if self._single is not None:
            return self._single.rows(step, rank, world)
        batch = self.global_rows(step)
        local = self.global_batch // world
        return batch[rank * local:(rank + 1) * local]

    def groups(self, step: int) -> np.ndarray:
        """The sub-batch id (0, 1, ...) of each row of global batch ``step``; length ``global_batch``."""
        return np.repeat(np.arange(self.global_batch // self.sub_batch), self.sub_batch)

    def position(self, step: int) -> dict[str, Any]:
        """Step, epoch and batch in epoch, as StepSampler's; for a mixture the epoch is nominal
        (``steps_per_epoch`` = rows // global batch; each dataset reshuffles on its own)."""
        if self._single is not None:
            return self._single.position(step)
        epoch, k = divmod(step, self.steps_per_epoch)
        return {"step": step, "epoch": epoch, "batch_in_epoch": k, "steps_per_epoch": self.steps_per_epoch}


def load_mixture(datasets: list[dict[str, Any]], weights: list[float] | dict[str, float] | None = None,
                 sub_batch: int | None = None, mined: str | os.PathLike | None = None, mined_k: int | None = None,
                 **kwargs: Any) -> Mixture:
    """A mixture from a data config: ``datasets`` is a list of ``{path, image_root, name?, format?, ...}``
    (``format``: ``mmeb_train``, the default, or ``jsonl``; other keys go to that loader, overriding
    ``kwargs``, e.g. ``on_bad_row``, ``limit``, ``split``). ``mined``: one mined-negatives folder for all
    (each dataset's ``<name>.jsonl``), ``mined_k`` its negatives per row."""
    if not datasets:
        raise ConfigError("data.loader.datasets is empty; list at least one {path, image_root, name}")
    out = []
    for i, spec in enumerate(datasets):
        spec = dict(spec)
        fmt = spec.pop("format", "mmeb_train")
        if "path" not in spec:
            raise ConfigError(f"data.loader.datasets[{i}] has no 'path'")
        args = {**kwargs, **spec}
        if mined is not None:
            args.setdefault("mined", mined)
            args.setdefault("mined_k", mined_k)
        if fmt == "mmeb_train":
            if "image_root" not in args:
                raise ConfigError(f"data.loader.datasets[{i}] ({spec['path']}) has no 'image_root'")
            out.append(load_mmeb_train(**args))
        elif fmt == "jsonl":
            out.append(load_jsonl_rows(**args))
        else:
            raise ConfigError(f"data.loader.datasets[{i}].format={fmt!r}; known: mmeb_train, jsonl")
    return Mixture(out, weights=weights, sub_batch=sub_batch)


__all__ = ["Mixture", "MixtureSampler", "load_mixture"]
