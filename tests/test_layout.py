"""The package's shape: the embedding library imports without the training package (training builds on the
library, not the other way round), no import circle between the config, run-identity and run-log modules, and no
class grows past what fits in one head."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIBRARY = ["e5v.config", "e5v.embedder", "e5v.run_folder", "e5v.prompts", "e5v.backbones.auto", "e5v.lora", "e5v.provenance",
           "e5v.data.contrastive", "e5v.data.mixture", "e5v.matryoshka", "e5v.cli.encode"]


def _imported_after(module: str) -> list[str]:
    """The e5v modules loaded after importing ``module`` (comma-separated names: all of them) in a fresh interpreter."""
    code = f"import sys, {module}; print('\\n'.join(sorted(m for m in sys.modules if m.startswith('e5v'))))"
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout.split()


def test_the_embedding_library_does_not_import_training() -> None:
    """Not at import, nor later (e5v.lora reads a run folder through e5v.run_folder): no module outside e5v/train
    imports it anywhere, except the two config resolvers of train.yaml's run name (called only when it resolves)."""
    found = []
    for f in (REPO / "e5v").rglob("*.py"):
        if f.relative_to(REPO / "e5v").parts[0] == "train":
            continue
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            found += [f"{f.relative_to(REPO)}:{node.lineno}" for n in names if n == "e5v.train" or n.startswith("e5v.train.")]
    assert [x.split(":")[0] for x in found] == ["e5v/config.py", "e5v/config.py"], found
    training = [m for m in _imported_after(", ".join(LIBRARY)) if m == "e5v.train" or m.startswith("e5v.train.")]
    assert not training, f"importing the library imports {training}"


def test_the_former_import_circle_imports_from_any_end() -> None:
    """config -> run_identity -> run_log -> config was a circle (config imported run_identity to register its
    resolvers): each of them imports first in a fresh interpreter, and importing config no longer loads training."""
    for module in ("e5v.train.run_identity", "e5v.train.run_log", "e5v.provenance", "e5v.train.trainer"):
        assert module in _imported_after(module)
    assert "e5v.train.run_identity" not in _imported_after("e5v.config")  # resolvers import it when one resolves


def test_no_class_is_longer_than_about_250_lines() -> None:
    long = []
    for root in ("e5v", "eval"):
        for f in (REPO / root).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 270:
                    long.append(f"{f.relative_to(REPO)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def test_the_training_app_keeps_its_job_name() -> None:
    """e5v-train's entry moved to e5v/train/cli.py; Hydra names a job after its module, so train.yaml names it:
    sweeps still go to outputs/sweeps/train/ (docs/sweeps.md)."""
    p = subprocess.run([sys.executable, "-m", "e5v.train", "--cfg", "hydra", "--package", "hydra.job"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "\nname: train\n" in f"\n{p.stdout}", p.stdout[:500]
