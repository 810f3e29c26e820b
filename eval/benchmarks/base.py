"""One interface for every benchmark, and the retrieval core they share.

A benchmark is built from its config (``configs/benchmark/<name>.yaml``, ``_target_`` = its class)
and run in two steps: :meth:`Benchmark.embed` (every rank: encoding is sharded and collective) and
:meth:`Benchmark.score` (rank 0 only: FAISS ranking, metrics, files). Metric keys are bare
(``t2i_R@1``); the runner prefixes them with the benchmark name (``flickr30k/t2i_R@1``).

Everything else about a benchmark lives on its class too: which data it reads and the ``make`` target
that prepares it (:meth:`Benchmark.check_data`, :attr:`Benchmark.make_target`) and each metric's chance
level (:meth:`Benchmark.chance`, from the pure helpers of :mod:`eval.metrics`). The paper's numbers and
table layout (:mod:`eval.paper`) concern only the paper's benchmarks; any other benchmark is reported in
results.md's "All metrics" table with its chance levels.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from e5v import distributed as dist
from eval.index import IndexSpec, SearchResult, rank
from eval.loaders import MissingDatasetError
from eval.metrics import ranked_recall

log = logging.getLogger(__name__)


@dataclass
class Context:
    """What a benchmark may use: the cached encoder, the index spec, a renderer, the output folder."""

    encoder: Any  # eval.encode.Encoder
    index: IndexSpec = field(default_factory=IndexSpec)
    output_dir: Path | None = None
    renderer_factory: Any = None  # () -> eval.render.CaptionRenderer
    progress: bool = True
    _renderer: Any = None

    @property
    def renderer(self) -> Any:
        if self._renderer is None:
            if self.renderer_factory is None:
                raise RuntimeError("this benchmark renders captions but no renderer was configured")
            self._renderer = self.renderer_factory()
        return self._renderer


@dataclass
class BenchmarkResult:
    name: str
    family: str
    metrics: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)
    chance: dict[str, float] = field(default_factory=dict)  # metric -> its value for random embeddings


class Benchmark:
    """Base class: subclasses set ``family`` and implement ``embed``, ``score`` and ``chance`` (and, when a
    ``make`` target prepares their data, set ``make_target``)."""

    family = "base"

    def __init__(self, name: str, root: str | Path, **options: Any) -> None:
        self.name = name
        self.root = Path(root)
        if options:
            raise TypeError(f"benchmark '{name}': unknown option(s) {sorted(options)}")

    @property
    def dataset(self) -> str:
        """The data set's name in messages and in its ``make data-<name>`` target."""
        return self.name

    make_target: str | None = None
    """The ``make`` target that prepares this benchmark's data (``data-cirr``); None: none does, and a
    missing-data error only says to point ``root`` at a copy. The runner puts it into every missing-data
    error of this benchmark, whichever loader raised it."""

    def check_data(self) -> None:
        """Raise :class:`eval.loaders.MissingDatasetError` (or ``DataFormatError``) when this benchmark's data
        is not usable; run for every selected benchmark before the model loads. The base checks the root
        folder; families check what their loader reads (annotations, image files) without embedding."""
        if not self.root.is_dir():
            raise MissingDatasetError(self.dataset, self.root, "dataset folder", self.make_target or "")

    def chance(self, metric: str, info: Mapping[str, Any]) -> float | None:
        """The expected value of ``metric`` for random embeddings, from this benchmark's result ``info``
        (what :meth:`score` recorded: gallery sizes, positives per query); None when it has no closed form.
        Raises ValueError for a metric this benchmark never reports. The base knows none."""
        return None

    def chance_levels(self, result: BenchmarkResult) -> dict[str, float]:
        """{metric: chance level} for every metric of ``result`` that has one."""
        levels = {m: self.chance(m, result.info) for m in result.metrics}
        return {m: float(v) for m, v in levels.items() if v is not None}

    def embed(self, ctx: Context) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def score(self, state: Any, ctx: Context) -> BenchmarkResult:  # pragma: no cover - interface
        raise NotImplementedError

    def run(self, ctx: Context) -> BenchmarkResult | None:
        """Embed on every rank, score on rank 0 with each metric's chance level (other ranks return None)."""
        state = self.embed(ctx)
        if not dist.is_main():
            return None
        result = self.score(state, ctx)
        result.chance = result.chance or self.chance_levels(result)
        return result

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, root={str(self.root)!r})"


def recall_cutoff(metric: str, prefix: str = "") -> int | None:
    """k of a recall metric named ``<prefix>R@<k>`` (``t2i_R@5`` -> 5 with prefix ``t2i_``); None otherwise."""
    head, sep, k = metric.partition("R@")
    if not sep or head != prefix or not k.lstrip("-").isdigit():
        return None
    return int(k)


def search_info(res: SearchResult, n_query: int, n_gallery: int) -> dict[str, Any]:
    info: dict[str, Any] = {"n_query": n_query, "n_gallery": n_gallery, "index": res.spec}
    if res.recall_vs_exact is not None:
        info["index_recall_vs_exact"] = res.recall_vs_exact
    return info


def retrieve(
    queries: np.ndarray,
    gallery: np.ndarray,
    positives: Sequence[Iterable[int]],
    ks: Sequence[int],
    spec: IndexSpec,
    prefix: str = "",
) -> tuple[dict[str, float], dict[str, Any]]:
    """Rank ``gallery`` for each query through FAISS and compute R@k (x100) against ``positives``.

    Returns ``({prefix + "R@k": value}, info)``; info holds sizes, the index description and, for an
    approximate index, its recall against exact search on the same queries.
    """
    n = len(gallery)
    k = min(max(ks), n)
    res = rank(queries, gallery, k, spec)
    valid = [kk for kk in ks if kk <= n]
    rec = ranked_recall(res.ids, positives, valid) if valid else {}
    # a cut-off at or beyond the gallery size: every query (each has a positive) is a hit
    rec = {f"R@{kk}": rec.get(f"R@{kk}", 100.0) for kk in ks}
    metrics = {f"{prefix}{key}": val for key, val in rec.items()}
    info = search_info(res, len(queries), len(gallery))
    return metrics, info
