"""README "Extend", a benchmark: the steps walked with a throwaway benchmark defined here (a tiny text
retrieval on generated data), from its module and YAML to results.json / results.md with its chance level."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import pytest

from e5v.config import compose, config_dir
from eval.loaders import MissingDataError
from eval.runner import evaluate, select_benchmarks

# Step 1: the benchmark's module (its loader inside; a shared on-disk format would go to eval/loaders/).
THROWAWAY = '''
"""Text retrieval (test only): each query retrieves its document among all documents.
Layout: <root>/pairs.json = [{"query": ..., "document": ...}, ...]."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from eval.benchmarks.base import Benchmark, BenchmarkResult, Context, recall_cutoff, retrieve
from eval.loaders import field, read_json
from eval.metrics import chance_recall


def load_pairs(root: Path) -> list[tuple[str, str]]:
    path = root / "pairs.json"
    rows = read_json(path, "mine", "pairs file")
    return [(field(r, "query", path, i, str), field(r, "document", path, i, str)) for i, r in enumerate(rows)]


class TextRetrieval(Benchmark):
    family = "text_retrieval"

    def __init__(self, name: str, root: str | Path, ks: list[int] = (1, 5), **options: Any) -> None:
        super().__init__(name, root, **options)
        self.ks = [int(k) for k in ks]

    def check_data(self) -> None:
        load_pairs(self.root)

    def embed(self, ctx: Context) -> tuple[Any, Any]:
        pairs = load_pairs(self.root)
        return ctx.encoder.text([q for q, _ in pairs]), ctx.encoder.text([d for _, d in pairs])

    def score(self, state: tuple[Any, Any], ctx: Context) -> BenchmarkResult:
        queries, documents = state
        positives = [[i] for i in range(len(documents))]
        metrics, info = retrieve(queries, documents, positives, self.ks, ctx.index)
        return BenchmarkResult(self.name, self.family, metrics, info)

    def chance(self, metric: str, info: Mapping[str, Any]) -> float:
        if (k := recall_cutoff(metric)) is not None:
            return chance_recall(k, int(info["n_gallery"]))
        raise ValueError(f"{self.name}: no metric {metric!r}")
'''

# Step 2: its YAML. Step 3: a suite that holds it (or `+benchmark@benchmark.mine=mine` on the command line).
BENCHMARK_YAML = """# Throwaway text retrieval (test only)
_target_: throwaway_benchmark.TextRetrieval
root: ${paths.data_dir}/mine
ks: [1, 5]
"""
SUITE_YAML = """# @package _global_
# Throwaway suite (test only):  e5v-eval backbone=tiny suite=mine
defaults:
  - /benchmark@benchmark.mine: mine

suite:
  name: mine
  mini: null

embedder:
  dtype: float32
"""

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]


@pytest.fixture
def throwaway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "throwaway_benchmark.py").write_text(THROWAWAY)
    configs = tmp_path / "configs"
    shutil.copytree(config_dir(), configs)
    (configs / "benchmark" / "mine.yaml").write_text(BENCHMARK_YAML)
    (configs / "suite" / "mine.yaml").write_text(SUITE_YAML)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("E5V_CONFIG_DIR", str(configs))
    try:
        yield importlib.import_module("throwaway_benchmark")
    finally:
        sys.modules.pop("throwaway_benchmark", None)


def _overrides(tmp: Path, *extra: str) -> list[str]:
    return ["backbone=tiny", f"paths.data_dir={tmp / 'data'}", f"cache.dir={tmp / 'cache'}", "embedder.device=cpu",
            "progress=false", "report.history=null", "report.plot=false", f"output_dir={tmp / 'out'}", *extra]


def test_benchmark_extend_steps_with_a_throwaway_benchmark(throwaway, tiny_dir: Path, tmp_path: Path) -> None:
    # missing data: the benchmark declares no `make` target, so the error points at `root` and names none
    # (the loader's read_json alone would have suggested `make data-mine`)
    with pytest.raises(MissingDataError, match=r"mine: pairs file not found at .*Point the benchmark's `root`") as e:
        evaluate(compose("eval", _overrides(tmp_path, "suite=mine")), output_dir=tmp_path / "out")
    assert "make data-mine" not in str(e.value)

    pairs = [{"query": f"a {c} square", "document": f"The shape is a square and it is {c}."} for c in COLOURS]
    (tmp_path / "data" / "mine").mkdir(parents=True)
    (tmp_path / "data" / "mine" / "pairs.json").write_text(json.dumps(pairs))

    # Step 3, either way: its own suite, or added to any suite from the command line
    cli = compose("eval", _overrides(tmp_path, "suite=paper", "+benchmark@benchmark.mine=mine", "benchmarks=[mine]"))
    assert type(select_benchmarks(cli)["mine"]) is throwaway.TextRetrieval

    res = evaluate(compose("eval", _overrides(tmp_path, "suite=mine")), output_dir=tmp_path / "out")
    n = len(COLOURS)
    assert set(res["metrics"]["mine"]) == {"R@1", "R@5"}
    assert res["chance"]["mine"] == {"R@1": 100.0 / n, "R@5": 500.0 / n}
    assert res["info"]["mine"]["n_gallery"] == n and not res["comparison"]  # not one of the paper's tables
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["metrics"]["mine"] == res["metrics"]["mine"] and saved["chance"] == res["chance"]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| benchmark | metric | ours | paper | chance |" in md
    assert f"| mine | R@1 | {res['metrics']['mine']['R@1']:.2f} | - | 12.50 |" in md
    assert f"| mine | R@5 | {res['metrics']['mine']['R@5']:.2f} | - | 62.50 |" in md
