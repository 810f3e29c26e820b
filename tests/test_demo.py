"""`make demo` end to end (slow: about 3 minutes on 2 cores): report files exist, text-only training
lifts text-image retrieval, composed retrieval and STS by the margins of the recorded replication
(the demo is seed 0 of its E5-V row), and the console is short (a stage line or bar each, the table,
where things were written) while demo.log keeps the rest (the console helper's own rules: tests/test_console.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import replication
from scripts import replicate_mini as R

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_trains_and_retrieval_rises(tmp_path) -> None:
    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k != "E5V_NO_PROGRESS"}  # the console a user sees: bars too
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline")
    # bytes, not text=True: universal newlines would turn a progress bar's \r redraws into lines
    raw = subprocess.run([sys.executable, "-m", "scripts.demo", "--out", str(out)], cwd=REPO, capture_output=True,
                         timeout=900, env=env)
    p = subprocess.CompletedProcess(raw.args, raw.returncode, raw.stdout.decode(), raw.stderr.decode())
    assert p.returncode == 0, p.stderr[-4000:]
    assert "| STS |" in p.stdout and "| chance |" in p.stdout
    # a quiet console: lines as a terminal shows them (a bar redraws its own line)
    console = p.stdout + p.stderr
    lines = console.count("\n")
    assert lines <= 32, f"{lines} console lines:\n{console}"  # 26 + the 5 MMEB-mini rows of the table
    for noise in ("wandb:", "Setting accelerator to CPU", "Loading weights", "is_gradient_checkpointing",
                  "built successfully"):
        assert noise not in console, noise
    log = (out / "demo.log").read_text()
    for kept in ("wandb: Run summary", "Setting accelerator to CPU", "is_gradient_checkpointing",
                 "built successfully", "---- output of training ----"):
        assert kept in log, kept
    for f in ("report.md", "report.png", "summary.json", "before/results.json", "after/results.json"):
        assert (out / f).is_file(), f
    s = json.loads((out / "summary.json").read_text())
    runs = [{"seed": 0, "prompt": "e5v_llama3", "phase": ph, "metrics": s[k]} for ph, k in
            (("before", "before"), ("after", "after"))]
    found = R.claims(runs, {c: 0.0 for c, *_ in R.COLUMNS})
    checked = replication.check(found, names=["2a text-only training (E5-V): text-image",
                                              "2b text-only training (E5-V): composed",
                                              "2d text-only training (E5-V): STS"])
    assert "2a text-only training (E5-V): text-image" in checked
    assert list((out / "train" / "wandb").glob("offline-run-*"))
    # the demo IS seed 0 of the recorded replication's E5-V row: the same numbers before and after training
    rec = json.loads((REPO / "docs" / "replication_results.json").read_text())["runs"]
    for phase in ("before", "after"):
        row = next(r for r in rec if (r["seed"], r["prompt"], r["phase"]) == (0, "e5v_llama3", phase))
        for col, *_ in R.COLUMNS:
            assert R.column(s[phase], col) == pytest.approx(R.column(row["metrics"], col), abs=1e-6), (phase, col)
