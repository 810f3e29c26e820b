"""Semantic textual similarity (paper Table 5): Spearman x100 of cosine vs gold.

STS12-16 use the SentEval "all" setting (all subsets of a year concatenated, one Spearman); STS-B and
SICK-R their test file. Sentences are embedded with the ``sts`` prompt (cleaned as released) RAW;
cosine is taken in the metric. ``avg`` is the mean over the configured tasks (7 in the paper).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from e5v.errors import ConfigError
from eval.benchmarks.base import Benchmark, BenchmarkResult, Context
from eval.loaders.senteval import TASKS, StsPairs, load_sts
from eval.metrics import CHANCE_SPEARMAN, sts_spearman


class Sts(Benchmark):
    family = "sts"

    def __init__(self, name: str, root: str | Path, tasks: tuple[str, ...] | list[str] = TASKS, **options: Any) -> None:
        super().__init__(name, root, **options)
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks:
            raise ConfigError(f"sts: tasks must be a non-empty subset of {TASKS}, got {list(tasks)}")
        self.tasks = list(tasks)

    @property
    def dataset(self) -> str:
        return "sts"

    make_target = "data-senteval"

    def chance(self, metric: str, info: Mapping[str, Any]) -> float:
        if metric in self.tasks or metric == "avg":
            return CHANCE_SPEARMAN
        raise ValueError(f"{self.name}: no metric {metric!r} (its metrics: {', '.join(self.tasks)}, avg)")

    def check_data(self) -> None:
        for task in self.tasks:  # small text files: read them all
            load_sts(self.root, task)

    def embed(self, ctx: Context) -> dict[str, tuple[StsPairs, np.ndarray, np.ndarray]]:
        out = {}
        for task in self.tasks:
            pairs = load_sts(self.root, task)
            emb = ctx.encoder.sts(pairs.sent_a + pairs.sent_b)
            n = len(pairs)
            out[task] = (pairs, emb[:n], emb[n:])
        return out

    def score(self, state: dict[str, tuple[StsPairs, np.ndarray, np.ndarray]], ctx: Context) -> BenchmarkResult:
        metrics = {task: sts_spearman(a, b, pairs.gold) for task, (pairs, a, b) in state.items()}
        metrics["avg"] = float(np.mean([metrics[t] for t in state]))
        info = {"n_pairs": {t: len(p) for t, (p, _, _) in state.items()}}
        return BenchmarkResult(self.name, self.family, metrics, info)
