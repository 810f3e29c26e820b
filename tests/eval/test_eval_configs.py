"""Every eval config group composes and instantiates; typos fail loudly."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from e5v.config import REPO_ROOT, compose, config_dir
from eval.benchmarks.base import Benchmark
from eval.index import IndexSpec
from eval.runner import select_benchmarks

PAPER_SUITE = ["flickr30k", "coco", "i2i_flickr30k", "i2i_coco", "cirr", "cirr_test1", "fashioniq", "sts"]


def _names(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


@pytest.mark.parametrize("suite", _names("suite"))
def test_suites_compose_and_instantiate(suite: str, tmp_path: Path) -> None:
    cfg = compose("eval", ["backbone=tiny", f"suite={suite}", f"output_dir={tmp_path}"])
    assert cfg.suite.name == suite
    benches = select_benchmarks(cfg)
    expected = {"mini": PAPER_SUITE + ["mmeb"], "mmeb": ["mmeb"]}.get(suite, PAPER_SUITE)  # mini: + MMEB-mini
    assert list(benches) == expected
    assert all(isinstance(b, Benchmark) for b in benches.values())
    roots = {n: str(b.root) for n, b in benches.items()}
    if suite == "mmeb":  # MMEB-V1: all 36 tasks by default, the real data's folder, the paper's fp16
        assert len(benches["mmeb"].tasks) == 36 and roots["mmeb"].endswith("/mmeb")
        assert cfg.embedder.dtype == "float16"
    elif suite == "mini":
        assert all("/mini/" in r for r in roots.values()) and cfg.embedder.dtype == "float32"
    else:
        assert cfg.embedder.dtype == "float16" and roots["coco"].endswith("/coco")


def test_every_benchmark_file_is_in_the_paper_suite() -> None:
    """... or is one of the field's benchmarks beyond the paper (MMEB: docs/evaluation.md, section "MMEB")."""
    assert sorted(_names("benchmark")) == sorted(PAPER_SUITE + ["mmeb", "mmeb_v2_image", "mmeb_visdoc"])


def test_every_paper_benchmark_names_a_make_target_that_exists() -> None:
    """A benchmark owns the `make` target its missing-data errors name; each one is in the Makefile."""
    makefile = (REPO_ROOT / "Makefile").read_text()
    for name, bench in select_benchmarks(compose("eval", ["backbone=tiny"])).items():
        assert bench.make_target and f"\n{bench.make_target}:" in makefile, (name, bench.make_target)


@pytest.mark.parametrize("index", _names("index"))
def test_index_configs_build_a_spec(index: str) -> None:
    cfg = compose("eval", ["backbone=tiny", f"index={index}"])
    spec = IndexSpec.from_config(cfg.index)
    assert spec.kind == index and spec.describe()["kind"] == index


def test_coco_caption_option_and_typos() -> None:
    cfg = compose("eval", ["backbone=tiny", "benchmark.coco.max_captions=null"])
    assert select_benchmarks(cfg)["coco"].max_captions is None
    assert select_benchmarks(compose("eval", ["backbone=tiny"]))["coco"].max_captions == 5
    with pytest.raises(TypeError, match="unknown option"):
        select_benchmarks(compose("eval", ["backbone=tiny", "+benchmark.sts.taks=[STS12]"]))
    with pytest.raises(ConfigCompositionException):
        compose("eval", ["backbone=tiny", "suite=papr"])


def test_logger_defaults_to_none() -> None:
    cfg = compose("eval", ["backbone=tiny"])
    assert not (cfg.get("logger") or {}).get("wandb")
