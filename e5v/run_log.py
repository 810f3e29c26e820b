"""Run provenance and metric logging: metrics.jsonl always, W&B when configured; rank 0 only.

The run directory gets ``run_info.json`` (git SHA + dirty flag, package versions, host, command)
and ``config.yaml`` (the resolved config). Keys that look like secrets are never written.
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from e5v.config import REPO_ROOT

PACKAGES = ("torch", "transformers", "peft", "deepspeed", "accelerate", "hydra-core", "datasets", "faiss-cpu",
            "faiss-gpu", "wandb", "numpy", "pillow", "e5v")
SECRET_KEY = re.compile(r"(api_?key|token|secret|password)", re.I)


def git_info(root: Path = REPO_ROOT) -> dict[str, Any]:
    def run(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        sha = run("rev-parse", "HEAD")
        dirty = bool(run("status", "--porcelain", "--untracked-files=no"))
        return {"git_sha": sha or None, "git_dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None, "git_dirty": None}


def package_versions() -> dict[str, str]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            continue
    return out


def redact(obj: Any) -> Any:
    """Drop values under secret-looking keys (api_key, token, ...) from a nested config."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if SECRET_KEY.search(str(k)) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def provenance() -> dict[str, Any]:
    return {
        **git_info(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "host": platform.node(),
        "platform": platform.platform(),
        "argv": sys.argv,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


class RunLogger:
    def __init__(self, cfg: Any, out_dir: str | Path, enabled: bool = True):
        from omegaconf import OmegaConf

        self.enabled = enabled
        self.out = Path(out_dir)
        self.wandb = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        resolved = redact(OmegaConf.to_container(cfg, resolve=True))
        (self.out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))
        info = provenance()
        (self.out / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
        self.metrics_file = (self.out / "metrics.jsonl").open("a", encoding="utf-8")
        lg = cfg.get("logger") or {}
        if lg.get("wandb"):
            import wandb

            w = lg.wandb
            self.wandb = wandb.init(
                project=w.get("project"),
                entity=w.get("entity"),
                name=w.get("name"),
                group=w.get("group"),
                tags=list(w.get("tags") or []),
                mode=w.get("mode"),
                dir=str(self.out),
                config={**resolved, "provenance": info},
                resume="allow",
                id=w.get("id"),
            )

    def log_info(self, info: dict[str, Any]) -> None:
        if not self.enabled:
            return
        (self.out / "train_info.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
        if self.wandb is not None:
            self.wandb.config.update({"train_info": info}, allow_val_change=True)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        self.metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.metrics_file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def finish(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.metrics_file.close()
        if self.wandb is not None:
            self.wandb.summary.update(summary)
            self.wandb.finish()
