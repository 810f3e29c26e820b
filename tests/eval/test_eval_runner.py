"""End to end on the tiny backbone and generated data: every family, the report, the cache, torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from e5v.config import REPO_ROOT
from eval.runner import evaluate

from evalkit import SMALL, compose_eval, eval_overrides

FAMILIES = ("flickr30k", "coco", "i2i_flickr30k", "i2i_coco", "cirr", "fashioniq", "sts")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("evalrun")


@pytest.fixture(scope="module")
def cold(base: Path, tiny_dir: Path) -> dict[str, Any]:
    """One cold in-process run of suite=mini (fresh embedding cache)."""
    cfg = compose_eval(base / "cold", base / "mini")
    return evaluate(cfg, output_dir=base / "cold" / "out")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", E5V_NO_PROGRESS="1", PYTHONPATH=str(REPO_ROOT))
    return env


def test_mini_suite_runs_every_family_and_writes_the_report(cold: dict[str, Any], base: Path) -> None:
    out = base / "cold" / "out"
    assert set(FAMILIES) <= set(cold["metrics"])
    for bench, metrics in cold["metrics"].items():
        lo = -100.0 if bench == "sts" else 0.0
        assert metrics and all(lo <= v <= 100.0 for v in metrics.values()), bench
    assert set(cold["metrics"]["flickr30k"]) == {f"{d}_R@{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)}
    assert set(cold["metrics"]["cirr"]) >= {"R@1", "R@50", "R_subset@1", "R_subset@3"}
    assert {"dress_R@10", "avg_R@50"} <= set(cold["metrics"]["fashioniq"])
    assert {"STS12", "SICKRelatedness", "avg"} <= set(cold["metrics"]["sts"])
    for name in (
        "results.json",
        "results.md",
        "results.png",
        "cirr_test1_recall.json",
        "cirr_test1_recall_subset.json",
    ):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    assert saved["metrics"] == cold["metrics"]
    assert saved["index"]["kind"] == "exact" and saved["font"]["font"].startswith("DejaVu Sans")
    assert saved["git"]["sha"] and "faiss-cpu" in saved["versions"] and saved["config"]["suite"]["name"] == "mini"
    md = (out / "results.md").read_text()
    for title in ("Table 1", "Table 3", "Table 4", "Table 5", "Table 6"):
        assert title in md
    assert "| E5-V (paper) | 79.50 | 95.00 | 97.60 |" in md and "| diff |" in md and "DejaVu Sans" in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = [json.loads(x) for x in (base / "cold" / "history.jsonl").read_text().splitlines()]
    assert history[0]["run_dir"] == str(out) and history[0]["metrics"] == saved["metrics_flat"]


def test_shared_gallery_is_encoded_once(cold: dict[str, Any]) -> None:
    image = cold["cache"]["per_template"]["image"]
    # i2i_flickr30k / i2i_coco reuse the photos embedded for flickr30k / coco (same prompt, same content)
    assert image["cached"] >= 2 * SMALL["images"]
    assert cold["cache"]["encoded"] > 0 and cold["cache"]["model_loaded"] is True


def test_second_run_is_served_from_the_cache_via_the_cli(cold: dict[str, Any], base: Path) -> None:
    run_dir = base / "warm"
    args = [a for a in eval_overrides(base / "cold", base / "mini") if not a.startswith("output_dir=")]
    proc = subprocess.run(
        [sys.executable, "-m", "eval.cli", *args, f"hydra.run.dir={run_dir}"],
        cwd=REPO_ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    warm = json.loads((run_dir / "results.json").read_text())
    assert warm["cache"]["encoded"] == 0 and warm["cache"]["model_loaded"] is False
    assert warm["metrics"] == cold["metrics"]
    assert (run_dir / ".hydra" / "config.yaml").is_file() and "results in" in proc.stdout


def test_benchmark_subset_and_unknown_name(cold: dict[str, Any], base: Path) -> None:
    cfg = compose_eval(base / "cold", base / "mini", "benchmarks=[sts,cirr]", "report.plot=false")
    res = evaluate(cfg, output_dir=base / "subset")
    assert list(res["metrics"]) == ["sts", "cirr"] and res["metrics"]["sts"] == cold["metrics"]["sts"]
    assert not (base / "subset" / "results.png").exists()
    with pytest.raises(ValueError, match=r"\['nope'\] are not in suite 'mini'; available: \["):
        evaluate(compose_eval(base / "cold", base / "mini", "benchmarks=[nope]"), output_dir=base / "x")


def test_approximate_index_states_its_recall(cold: dict[str, Any], base: Path) -> None:
    cfg = compose_eval(base / "cold", base / "mini", "index=hnsw", "benchmarks=[flickr30k,cirr]")
    res = evaluate(cfg, output_dir=base / "hnsw")
    assert res["index"]["kind"] == "hnsw"
    assert 0.0 <= res["info"]["flickr30k"]["t2i_index_recall_vs_exact"] <= 100.0
    assert "index_recall_vs_exact" in res["info"]["cirr"]
    assert "approximate index" in (base / "hnsw" / "results.md").read_text()


def test_wandb_offline_summary(cold: dict[str, Any], base: Path) -> None:
    out = base / "wandb"
    cfg = compose_eval(
        base / "cold",
        base / "mini",
        "logger=wandb",
        "logger.wandb.mode=offline",
        "benchmarks=[sts]",
        "report.plot=false",
    )
    res = evaluate(cfg, output_dir=out)
    assert res["wandb_dir"] and Path(res["wandb_dir"]).is_relative_to(out)
    assert list((out / "wandb").glob("offline-run-*"))


def test_checkpoint_merged_dir_and_adapter_hook(
    cold: dict[str, Any], base: Path, tiny_dir: Path, tmp_path: Path
) -> None:
    cfg = compose_eval(
        base / "cold", base / "mini", "backbone=e5v", f"checkpoint={tiny_dir}", "benchmarks=[sts]", "report.plot=false"
    )
    res = evaluate(cfg, output_dir=tmp_path / "merged")
    assert res["run"]["backbone"] == str(tiny_dir) and "sts" in res["metrics"]
    # a LoRA adapter as training writes it (random, non-zero B so it changes the model)
    import torch

    from e5v.backbones import tiny
    from e5v.lora import add_lora, save_adapter

    torch.manual_seed(0)
    peft_model = add_lora(tiny.load(seed=0, device="cpu").model, r=4, alpha=16, dropout=0.0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    step_dir = tmp_path / "step-000010"
    save_adapter(peft_model, step_dir / "adapter", {"backbone": {"_target_": "e5v.backbones.tiny.load"}})
    cfg = compose_eval(
        base / "cold", base / "mini", f"checkpoint={step_dir}", "benchmarks=[sts]", f"cache.dir={tmp_path / 'c2'}",
        "report.plot=false",
    )
    with_adapter = evaluate(cfg, output_dir=tmp_path / "adapter_out")
    plain = evaluate(compose_eval(base / "cold", base / "mini", "benchmarks=[sts]", f"cache.dir={tmp_path / 'c2'}",
                                  "report.plot=false"), output_dir=tmp_path / "plain_out")
    assert with_adapter["metrics"]["sts"] != plain["metrics"]["sts"]


def test_missing_data_fails_with_the_prepare_command(tmp_path: Path) -> None:
    from e5v.config import compose
    from eval.loaders import MissingDataError

    cfg = compose(
        "eval",
        [
            "backbone=tiny",
            "suite=paper",
            f"paths.data_dir={tmp_path}",
            "benchmarks=[cirr]",
            f"cache.dir={tmp_path / 'c'}",
            f"output_dir={tmp_path / 'o'}",
        ],
    )
    with pytest.raises(MissingDataError, match=r"make data-cirr"):
        evaluate(cfg, output_dir=tmp_path / "o")


def test_two_processes_give_the_same_metrics(cold: dict[str, Any], base: Path) -> None:
    run_dir = base / "ddp"
    args = [a for a in eval_overrides(base / "ddp_cache", base / "mini") if not a.startswith("output_dir=")]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "-m",
            "eval.cli",
            *args,
            f"hydra.run.dir={run_dir}",
            "report.plot=false",
        ],
        cwd=REPO_ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ddp = json.loads((run_dir / "results.json").read_text())
    assert ddp["run"]["world_size"] == 2 and ddp["cache"]["encoded"] == cold["cache"]["encoded"]
    assert ddp["metrics"] == cold["metrics"]
    assert ddp["run"]["model_fingerprint"] == cold["run"]["model_fingerprint"]


def test_disabled_cache_writes_nothing_but_still_shares_items(cold: dict[str, Any], base: Path, tmp_path: Path) -> None:
    cfg = compose_eval(
        tmp_path, base / "mini", "cache.enabled=false", "benchmarks=[flickr30k,i2i_flickr30k]", "report.plot=false"
    )
    res = evaluate(cfg, output_dir=tmp_path / "out")
    assert not (tmp_path / "cache").exists()
    assert res["cache"]["per_template"]["image"]["cached"] == SMALL["images"]  # the photos, within the run
    assert res["metrics"]["i2i_flickr30k"] == cold["metrics"]["i2i_flickr30k"]
