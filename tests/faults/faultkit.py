"""Helpers shared by the fault-injection tests (not a conftest: ``from conftest import make_image`` must keep
resolving to tests/conftest.py).

Training runs in subprocesses, as in tests/test_train.py; a fault that needs code inside the process
(kill during a checkpoint save, disk full while writing) is installed by ``inject.py``, which patches
the writer and then runs the ordinary entry point.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import IO, Any

REPO = Path(__file__).resolve().parents[2]
INJECT = Path(__file__).with_name("inject.py")

# A short run that still has two checkpoints before its end: 32 rows per step, a save every 2 steps.
SHORT = ("trainer.save_every=2", "logger=none", "trainer.keep_checkpoints=null", "trainer.micro_batch=16")


def env(extra: dict[str, str] | None = None) -> dict[str, str]:
    out = dict(os.environ)
    out.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", E5V_NO_PROGRESS="1",
        TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
    )
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "E5V_INJECT"):
        out.pop(k, None)
    out.update(extra or {})
    return out


def run_train(out: Path, *overrides: str, inject: str | None = None, extra_env: dict[str, str] | None = None,
              check: bool = True) -> subprocess.CompletedProcess[str]:
    """``e5v-train experiment=tiny_cpu`` into ``out`` (run directory ``out/train/run``), optionally with a fault
    installed by inject.py (``inject="kill-before-rename:4"`` ...)."""
    args = ["experiment=tiny_cpu", f"paths.output_dir={out}", f"paths.data_dir={out.parent / 'data'}", "run_name=run",
            *overrides]
    e = env(extra_env)
    if inject:
        e["E5V_INJECT"] = inject
        cmd = [sys.executable, str(INJECT), "train", *args]
    else:
        cmd = [sys.executable, "-m", "e5v.train", *args]
    p = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"training failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def run_dir(out: Path) -> Path:
    return out / "train" / "run"


def metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def checkpoint_names(run: Path) -> list[str]:
    root = run / "checkpoints"
    return sorted(d.name for d in root.iterdir()) if root.is_dir() else []


def trainer_state(run: Path, step: int) -> dict[str, Any]:
    return json.loads((run / "checkpoints" / f"step-{step:06d}" / "trainer_state.json").read_text())


def adapter(run: Path, step: int) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / f"step-{step:06d}" / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a: dict[str, Any], b: dict[str, Any], atol: float = 1e-6) -> None:
    import torch

    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=atol, rtol=0)


# ---------------------------------------------------------------------- a full disk, in-process
class FullFile:
    """A file object (binary or text) that accepts ``budget`` bytes (characters), then fails like a full disk."""

    def __init__(self, f: IO[Any], budget: int) -> None:
        self._f, self.budget = f, budget

    def write(self, data: Any) -> int:
        if len(data) > self.budget:
            self._f.write(data[: self.budget])
            self.budget = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget -= len(data)
        return self._f.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> FullFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.close()


class DiskFullOs:
    """Stands in for the ``os`` module inside :mod:`e5v.data.atomic`: files it opens fill up after ``budget``
    bytes. ``monkeypatch.setattr("e5v.data.atomic.os", DiskFullOs(100))``."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.opened = 0

    def fdopen(self, fd: int, mode: str = "r", *args: Any, **kwargs: Any) -> FullFile:
        self.opened += 1
        return FullFile(os.fdopen(fd, mode, *args, **kwargs), self.budget)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


# ---------------------------------------------------------------------- checkpoints without DeepSpeed
class FakeEngine:
    """The two methods :mod:`e5v.train.checkpoint` calls on a DeepSpeed engine, writing/reading plain files."""

    def __init__(self, payload: bytes = b"optimizer-state" * 64, fail: OSError | None = None) -> None:
        self.payload, self.fail = payload, fail
        self.loaded: list[str] = []
        self.checkpoint_engine: Any = None

    def save_checkpoint(self, save_dir: str, tag: str, **_: Any) -> None:
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        (d / "mp_rank_00_model_states.pt").write_bytes(b"model" * 32)
        with open(d / "zero_pp_rank_0_mp_rank_00_optim_states.pt", "wb") as f:
            f.write(self.payload[: len(self.payload) // 2])
            if self.fail is not None:
                raise self.fail
            f.write(self.payload[len(self.payload) // 2 :])

    def load_checkpoint(self, load_dir: str, tag: str, **_: Any) -> tuple[str, dict[str, Any]]:
        self.loaded.append(load_dir)
        return load_dir, {}


def fake_adapter(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + b"w" * 256)
    (out / "adapter_config.json").write_text("{}")
    return out


def save_fake_checkpoint(root: Path, step: int, engine: FakeEngine | None = None, **kwargs: Any) -> Path:
    from e5v.train import checkpoint as ckpt

    state = {"step": step, "max_steps": 10, "world_size": 1, "losses": [1.0] * step}
    return ckpt.save(engine or FakeEngine(), root, step, state, fake_adapter, **kwargs)


class CountingModel:
    """A ModelHandle stand-in for :class:`eval.encode.Encoder`: deterministic text embeddings (8-d), and the
    list of texts it was asked to encode."""

    def __init__(self, fingerprint: str = "f" * 64) -> None:
        import numpy as np

        self.fingerprint = fingerprint
        self.encoded: list[str] = []

        def encode_text(texts: list[str], **_: Any) -> Any:
            self.encoded.extend(texts)
            return np.stack([np.arange(8, dtype=np.float32) + len(t) for t in texts])

        self.embedder = SimpleNamespace(encode_text=encode_text)


def minimal_results(value: float = 50.0) -> dict[str, Any]:
    """The smallest results dict :func:`eval.report.write` renders (one STS metric)."""
    return {
        "metrics": {"sts": {"avg": value}},
        "metrics_flat": {"sts/avg": value},
        "paper": {"reference": "e5v", "values": {}},
        "comparison": [],
        "info": {"sts": {}},
        "timing": {"sts": 1.0, "total_s": 1.0},
        "cache": {"requested": 1, "unique": 1, "cached": 0, "encoded": 1},
        "index": {"kind": "exact"},
        "font": None,
        "run": {"suite": "mini", "backbone": "tiny", "prompt": "e5v_llama3", "dtype": "float32", "checkpoint": None,
                "world_size": 1, "model_fingerprint": "f" * 64},
        "git": {"sha": None, "dirty": None},
        "versions": {},
        "config": {},
    }


def scan_for(root: Path, needles: list[str]) -> dict[str, list[str]]:
    """{needle: [files under root whose bytes contain it]} for every needle found."""
    found: dict[str, list[str]] = {}
    for f in sorted(root.rglob("*")):
        if not f.is_file() or f.is_symlink():
            continue
        data = f.read_bytes()
        for n in needles:
            if n.encode() in data:
                found.setdefault(n, []).append(str(f.relative_to(root)))
    return found


# ---------------------------------------------------------------------- evaluation on the mini world
SMALL_EVAL = {"images": 8, "cirr_groups": 2, "fiq_images": 8, "sts_pairs": 3}
TINY_EVAL = {"images": 4, "cirr_groups": 2, "fiq_images": 4, "sts_pairs": 2}


def eval_overrides(tmp: Path, mini: Path, cache: Path, *extra: str, sizes: dict[str, int] | None = None) -> list[str]:
    """Tiny backbone, generated mini data of ``sizes``, its own embedding cache; no plot, no history."""
    return [
        "backbone=tiny",
        "suite=mini",
        f"suite.mini.dir={mini}",
        *[f"suite.mini.{k}={v}" for k, v in (sizes or SMALL_EVAL).items()],
        f"cache.dir={cache}",
        f"render.cache_dir={tmp / 'rendered'}",
        "embedder.device=cpu",
        "progress=false",
        "report.plot=false",
        "report.history=null",
        *extra,
    ]


def eval_cfg(tmp: Path, mini: Path, cache: Path, *extra: str, sizes: dict[str, int] | None = None) -> Any:
    from e5v.config import compose

    return compose("eval", eval_overrides(tmp, mini, cache, *extra, sizes=sizes))
