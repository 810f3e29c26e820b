"""CIRR composed image retrieval (paper Table 2 / Table 6).

Query = reference image + modification text (``cirr_query`` prompt); gallery = every image of the
split (``cirr_gallery`` prompt). The reference is removed from its own ranking. ``val``: Recall@k
over the gallery and Recall_subset@k over the query's ``img_set`` members minus the reference.
``test1``: no targets; writes the evaluation-server files ``cirr_test1_recall.json`` (top 50) and
``cirr_test1_recall_subset.json`` (top 3) into the run folder.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from e5v.data.atomic import atomic_write_text
from eval.benchmarks.base import Benchmark, BenchmarkResult, Context, recall_cutoff, search_info
from eval.index import IndexSpec, rank
from eval.loaders.cirr import CirrData, load_cirr
from eval.metrics import chance_recall, cirr_recall

log = logging.getLogger(__name__)


@dataclass
class _State:
    data: CirrData
    queries: np.ndarray
    gallery: np.ndarray


class Cirr(Benchmark):
    family = "cirr"

    def __init__(
        self,
        name: str,
        root: str | Path,
        split: str = "val",
        image_dir: str = ".",
        ks: tuple[int, ...] | list[int] = (1, 5, 10, 50),
        subset_ks: tuple[int, ...] | list[int] = (1, 2, 3),
        submission_top: int = 50,
        submission_subset_top: int = 3,
        query_template: str = "cirr_query",
        gallery_template: str = "cirr_gallery",
        **options: Any,
    ) -> None:
        super().__init__(name, root, **options)
        self.split, self.image_dir = split, image_dir
        self.ks, self.subset_ks = [int(k) for k in ks], [int(k) for k in subset_ks]
        self.submission_top, self.submission_subset_top = int(submission_top), int(submission_subset_top)
        self.query_template, self.gallery_template = query_template, gallery_template

    @property
    def dataset(self) -> str:
        return "cirr"

    make_target = "data-cirr"

    def chance(self, metric: str, info: Mapping[str, Any]) -> float | None:
        """R@k: the target among the gallery minus the reference; the subset recalls (and ``avg``) depend
        on each query's group and have none here."""
        if (k := recall_cutoff(metric)) is not None:
            return chance_recall(k, int(info["n_gallery"]) - 1)  # the reference is removed from its ranking
        if metric.startswith("R_subset@") or metric == "avg":
            return None
        raise ValueError(f"{self.name}: no metric {metric!r} (its metrics: R@k, R_subset@k, avg)")

    def check_data(self) -> None:
        load_cirr(self.root, self.split, self.image_dir)  # annotations + every gallery image's file (seconds)

    def embed(self, ctx: Context) -> _State:
        data = load_cirr(self.root, self.split, self.image_dir)
        enc = ctx.encoder
        gallery = enc.image(data.gallery, template=self.gallery_template)
        by_name = dict(zip(data.gallery_names, data.gallery))
        pairs = [(by_name[q.reference], q.caption) for q in data.queries]
        queries = enc.interleaved(pairs, template=self.query_template)
        return _State(data, queries, gallery)

    def _rankings(self, state: _State, ctx: Context) -> tuple[list[list[str]], list[list[str]], dict[str, Any]]:
        """(ranked names for R@k, full exact ranking for the subset metrics, info)."""
        names = np.asarray(state.data.gallery_names)
        n = len(names)
        exact = rank(state.queries, state.gallery, n, IndexSpec(kind="exact", use_gpu=ctx.index.use_gpu))
        full = [names[row[row >= 0]].tolist() for row in exact.ids]
        if ctx.index.exact:
            return full, full, search_info(exact, len(state.queries), n)
        k = min(n, max(max(self.ks), self.submission_top) + 1)  # +1: the reference is removed afterwards
        approx = rank(state.queries, state.gallery, k, ctx.index)
        ranked = [names[row[row >= 0]].tolist() for row in approx.ids]
        return ranked, full, search_info(approx, len(state.queries), n)

    def score(self, state: _State, ctx: Context) -> BenchmarkResult:
        data = state.data
        ranked, full, info = self._rankings(state, ctx)
        refs = [q.reference for q in data.queries]
        info = {**info, "split": self.split}
        if self.split == "test1":
            info["files"] = self._write_submission(data.queries, ranked, full, ctx.output_dir)
            return BenchmarkResult(self.name, self.family, {}, info)
        metrics = cirr_recall(
            ranked,
            refs,
            [q.target for q in data.queries],  # type: ignore[misc]
            [q.members for q in data.queries],
            ks=self.ks,
            subset_ks=self.subset_ks,
            subset_ranked_names=full,
        )
        if "R@5" in metrics and "R_subset@1" in metrics:  # the CIRR paper's "Avg"
            metrics["avg"] = (metrics["R@5"] + metrics["R_subset@1"]) / 2
        return BenchmarkResult(self.name, self.family, metrics, info)

    def _write_submission(
        self, queries: list[Any], ranked: list[list[str]], full: list[list[str]], out: Path | None
    ) -> list[str]:
        """Evaluation-server JSONs: {"version": "rc2", "metric": ..., "<pairid>": [names]}."""
        recall: dict[str, Any] = {"version": "rc2", "metric": "recall"}
        subset: dict[str, Any] = {"version": "rc2", "metric": "recall_subset"}
        for q, r, f in zip(queries, ranked, full):
            recall[str(q.pairid)] = [g for g in r if g != q.reference][: self.submission_top]
            members = set(q.members) - {q.reference}
            subset[str(q.pairid)] = [g for g in f if g in members][: self.submission_subset_top]
        if out is None:
            log.warning("cirr test1: no output folder, submission files not written")
            return []
        files = []
        for tag, obj in (("recall", recall), ("recall_subset", subset)):
            path = Path(out) / f"{self.name}_{tag}.json"
            atomic_write_text(path, json.dumps(obj) + "\n")
            files.append(path.name)
        log.info("cirr test1: wrote %s; upload them to the CIRR evaluation server", ", ".join(files))
        return files
