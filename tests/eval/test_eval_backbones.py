"""`e5v-eval backbone=<tiny variant> suite=mini` for every backbone family with a tiny offline variant (the
tiny LLaVA-NeXT-Llama one is tests/eval/test_eval_runner.py's): every benchmark family writes results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from e5v.backbones import registry
from e5v.config import REPO_ROOT
from eval.runner import evaluate

from evalkit import SMALL, compose_eval, eval_overrides

FAMILIES = ("flickr30k", "coco", "i2i_flickr30k", "i2i_coco", "cirr", "fashioniq", "sts")
FAST = {"tiny_qwen2_vl"}  # one fast smoke for the family that tiny (LLaVA-NeXT) does not cover
NAMES = [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in registry.tiny_names() if n != "tiny"]


@pytest.mark.parametrize("name", NAMES)
def test_backbone_eval_mini_suite_every_family(name: str, tmp_path: Path) -> None:
    cfg = compose_eval(tmp_path, tmp_path / "mini", f"backbone={name}")
    assert cfg.backbone._target_ == registry.get(name).target
    res = evaluate(cfg, output_dir=tmp_path / "out")
    assert set(FAMILIES) <= set(res["metrics"])
    for bench, metrics in res["metrics"].items():
        lo = -100.0 if bench == "sts" else 0.0
        assert metrics and all(lo <= v <= 100.0 for v in metrics.values()), bench
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["metrics"] == res["metrics"]
    # a second run finds the fingerprint memoised (the tiny build folder is known to the registry) and every
    # embedding cached: the model never loads
    again = evaluate(compose_eval(tmp_path, tmp_path / "mini", f"backbone={name}"), output_dir=tmp_path / "out2")
    assert again["metrics"] == res["metrics"] and again["cache"]["model_loaded"] is False


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in registry.tiny_names() if n != "tiny"])
def test_backbone_eval_cli_writes_results(name: str, tmp_path: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", E5V_NO_PROGRESS="1", PYTHONPATH=str(REPO_ROOT))
    args = [a for a in eval_overrides(tmp_path, tmp_path / "mini", sizes=SMALL) if not a.startswith("backbone=")]
    p = subprocess.run([sys.executable, "-m", "eval.cli", f"backbone={name}", *args], cwd=REPO_ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert set(FAMILIES) <= set(json.loads((tmp_path / "out" / "results.json").read_text())["metrics"])
