"""FashionIQ composed image retrieval, val split (paper Table 3 / Table 6).

Per category (dress, shirt, toptee): the candidate image + the two relative captions retrieve the
target among the category's gallery (reference NOT removed). The query is embedded twice, captions
in both orders (each stripped of ``.?, `` and joined by ``, ``); the two RAW embeddings are summed,
then L2-normalised. R@10 and R@50 per category and their unweighted mean over the categories.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from e5v.prompts import fashioniq_caption
from eval.benchmarks.base import Benchmark, BenchmarkResult, Context, recall_cutoff, retrieve
from eval.encode import l2_normalize
from eval.loaders.fashioniq import CATEGORIES, FiqData, load_fashioniq
from eval.metrics import chance_recall


@dataclass
class _Cat:
    data: FiqData
    queries: np.ndarray
    gallery: np.ndarray


class FashionIQ(Benchmark):
    family = "fashioniq"

    def __init__(
        self,
        name: str,
        root: str | Path,
        categories: tuple[str, ...] | list[str] = CATEGORIES,
        image_pattern: str = "images/{name}.png",
        ks: tuple[int, ...] | list[int] = (10, 50),
        both_orders: bool = True,
        query_template: str = "fashioniq_query",
        gallery_template: str = "fashioniq_gallery",
        **options: Any,
    ) -> None:
        super().__init__(name, root, **options)
        unknown = [c for c in categories if c not in CATEGORIES]
        if unknown or not categories:
            raise ValueError(
                f"fashioniq: categories must be a non-empty subset of {CATEGORIES}, got {list(categories)}"
            )
        self.categories = list(categories)
        self.image_pattern = image_pattern
        self.ks = [int(k) for k in ks]
        self.both_orders = bool(both_orders)
        self.query_template, self.gallery_template = query_template, gallery_template

    @property
    def dataset(self) -> str:
        return "fashioniq"

    make_target = "data-fashioniq"

    def chance(self, metric: str, info: Mapping[str, Any]) -> float:
        """``<cat>_R@k``: the target among the category's gallery; ``avg_R@k``: the mean over the categories."""
        for cat in self.categories:
            if (k := recall_cutoff(metric, f"{cat}_")) is not None:
                return chance_recall(k, int(info[cat]["n_gallery"]))
        if (k := recall_cutoff(metric, "avg_")) is not None:
            sizes = [int(v["n_gallery"]) for v in info.values() if isinstance(v, Mapping) and "n_gallery" in v]
            if not sizes:
                raise ValueError(f"{self.name}: the chance of {metric} needs per-category info with n_gallery")
            return float(np.mean([chance_recall(k, n) for n in sizes]))
        raise ValueError(f"{self.name}: no metric {metric!r} (its metrics: <category>_R@k, avg_R@k)")

    def check_data(self) -> None:
        for cat in self.categories:  # annotations + every image file of each category
            load_fashioniq(self.root, cat, self.image_pattern)

    def embed(self, ctx: Context) -> dict[str, _Cat]:
        enc = ctx.encoder
        out = {}
        for cat in self.categories:
            data = load_fashioniq(self.root, cat, self.image_pattern)
            gallery = enc.image(data.gallery, template=self.gallery_template, category=cat)
            refs = [data.candidates[q.candidate] for q in data.queries]
            fwd = [fashioniq_caption(q.captions) for q in data.queries]
            q = enc.interleaved(list(zip(refs, fwd)), template=self.query_template, category=cat, normalize=False)
            if self.both_orders:
                rev = [fashioniq_caption(q.captions[::-1]) for q in data.queries]
                q = q + enc.interleaved(
                    list(zip(refs, rev)), template=self.query_template, category=cat, normalize=False
                )
            out[cat] = _Cat(data, l2_normalize(q), gallery)
        return out

    def score(self, state: dict[str, _Cat], ctx: Context) -> BenchmarkResult:
        metrics: dict[str, float] = {}
        info: dict[str, Any] = {}
        for cat, s in state.items():
            pos_of = {n: i for i, n in enumerate(s.data.gallery_names)}
            positives = [[pos_of[q.target]] for q in s.data.queries]
            m, inf = retrieve(s.queries, s.gallery, positives, self.ks, ctx.index, prefix=f"{cat}_")
            metrics.update(m)
            info[cat] = {"n_query": inf["n_query"], "n_gallery": inf["n_gallery"]}
            if s.data.duplicates:
                info[cat]["duplicate_gallery_names_merged"] = s.data.duplicates
            if "index_recall_vs_exact" in inf:
                info[cat]["index_recall_vs_exact"] = inf["index_recall_vs_exact"]
            info["index"] = inf["index"]
        for k in self.ks:
            metrics[f"avg_R@{k}"] = float(np.mean([metrics[f"{c}_R@{k}"] for c in state]))
        return BenchmarkResult(self.name, self.family, metrics, info)
