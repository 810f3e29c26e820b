"""`make demo` end to end (slow: ~2-4 min on 2 cores): report files exist and mini STS rises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_trains_and_sts_rises(tmp_path) -> None:
    out = tmp_path / "demo"
    p = subprocess.run([sys.executable, "scripts/demo.py", "--out", str(out)], cwd=REPO, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "| STS avg (Spearman) |" in p.stdout
    for f in ("report.md", "report.png", "summary.json", "before/results.json", "after/results.json"):
        assert (out / f).is_file(), f
    s = json.loads((out / "summary.json").read_text())
    assert s["after"]["sts"]["avg"] > s["before"]["sts"]["avg"] + 10
    assert list((out / "train" / "wandb").glob("offline-run-*"))
