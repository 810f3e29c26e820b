"""Provenance shared by training and evaluation: git state, package versions, host and command line;
secret redaction (configs, command lines, Hydra's copies, W&B); the W&B run factory; required-value checks.

Keys that look like secrets are never written: values under such keys are replaced by ``<redacted>`` in
saved configs, in the recorded command line, in Hydra's own copies (``.hydra/``) and in what W&B records.
The training run's own log (``metrics.jsonl``, ``config.yaml``, ``run_info.json``) is
:mod:`e5v.train.run_log`.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from e5v.config import REPO_ROOT

log = logging.getLogger(__name__)

# Recorded in run_info.json (training) and results.json (evaluation); the ones not installed are left out.
PACKAGES = ("e5v", "torch", "transformers", "tokenizers", "peft", "deepspeed", "accelerate", "hydra-core", "datasets",
            "faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "scipy", "wandb", "numpy", "pillow")
# A key is secret when its last word is one of these (api_key, WANDB_API_KEY, hf_token, db.password, ...);
# "token" alone is not enough when it names a vocabulary token (image_token, pad_token) or a count.
_SECRET_TAIL = re.compile(r"(?:^|[^a-z0-9])(api[_-]?key|apikey|access[_-]?key|secret[_-]?key|secret|password|passwd|"
                          r"credentials?|token)$", re.I)
_NOT_SECRET_TOKEN = re.compile(r"(?:^|[^a-z0-9])(image|pad|eos|bos|unk|sep|cls|mask|special|vocab|start|end)[_-]token$",
                               re.I)
# key=value (or key: value) inside a string: a command-line override, Hydra's override_dirname
_ASSIGNMENT = re.compile(r"(?P<key>[\w.+~@/-]+)(?P<sep>\s*[=:]\s*)")
_VALUE = re.compile(r"\"[^\"]*\"|'[^']*'|[^\s,'\"\]}]*")
REDACTED = "<redacted>"


def missing_values(cfg: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose value is ``???`` (OmegaConf's missing marker), without resolving interpolations."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    out: list[str] = []
    keys = list(cfg.keys()) if isinstance(cfg, DictConfig) else list(range(len(cfg)))
    for k in keys:
        full = f"{prefix}{k}" if isinstance(cfg, DictConfig) else f"{prefix.rstrip('.')}[{k}]"
        if OmegaConf.is_missing(cfg, k):
            out.append(full)
            continue
        if OmegaConf.is_interpolation(cfg, k):
            continue
        node = cfg._get_node(k)
        if isinstance(node, (DictConfig, ListConfig)) and not node._is_none():
            out.extend(missing_values(node, full + "."))
    return out


def require_values(cfg: Any) -> None:
    """Raise :class:`e5v.errors.ConfigError` naming every ``???`` left in ``cfg`` (before any data or model
    work: a forgotten value must not surface after the model loaded)."""
    from e5v.errors import ConfigError

    missing = missing_values(cfg)
    if missing:
        hints = "".join(f"; {MISSING_HINTS[k]}" for k in missing if k in MISSING_HINTS)
        raise ConfigError(f"missing required value(s) {missing}: set them on the command line (key=value){hints}")


# What a required value means, for the keys a newcomer meets first
MISSING_HINTS = {
    "lora.init_from": "lora.init_from=<the stage-1 run, step or adapter folder> continues its LoRA, or "
                      "lora.init_from=null trains stage 2 from the base model",
}


def git_info(root: Path = REPO_ROOT) -> dict[str, Any]:
    """``{"sha": HEAD, "dirty": tracked files changed}`` of the checkout at ``root``; both None outside a git
    checkout (an installed wheel) or without git."""

    def run(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        return {"sha": run("rev-parse", "HEAD") or None,
                "dirty": bool(run("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name``; None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def package_versions() -> dict[str, str]:
    """The Python version and the installed version of each of :data:`PACKAGES` (those installed)."""
    versions = {p: package_version(p) for p in PACKAGES}
    return {"python": platform.python_version(), **{p: v for p, v in versions.items() if v is not None}}


def is_secret_key(key: str) -> bool:
    """``api_key``, ``logger.wandb.api_key``, ``WANDB_API_KEY``, ``hf_token``, ``password`` ...; not
    ``image_token`` or ``max_batch_tokens``."""
    k = str(key).lstrip("+~")
    return bool(_SECRET_TAIL.search(k)) and not _NOT_SECRET_TOKEN.search(k)


def redact_text(text: str) -> str:
    """``logger.wandb.api_key=abc`` -> ``logger.wandb.api_key=<redacted>`` wherever it occurs in ``text``."""

    out: list[str] = []
    pos = 0
    for m in _ASSIGNMENT.finditer(text):
        if m.start() < pos or not is_secret_key(m["key"]):
            continue
        value = _VALUE.match(text, m.end())
        end = value.end() if value else m.end()
        if end > m.end():
            out.append(text[pos : m.end()] + REDACTED)
            pos = end
    out.append(text[pos:])
    return "".join(out)


def redact(obj: Any) -> Any:
    """Drop values under secret-looking keys (api_key, token, ...) from a nested config, and secret
    ``key=value`` assignments inside strings (command lines, Hydra override lists)."""
    if isinstance(obj, dict):
        return {k: (REDACTED if is_secret_key(str(k)) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


@contextlib.contextmanager
def redacted_argv() -> Iterator[None]:
    """``sys.argv`` with secret overrides redacted while a third party (W&B) records the command line."""
    saved = sys.argv
    sys.argv = [redact_text(a) for a in saved]
    try:
        yield
    finally:
        sys.argv = saved


class WandbLogger:
    """W&B settings from ``logger.wandb`` (configs/logger/wandb.yaml builds this through its ``_target_``);
    :meth:`start` opens the run, for training and evaluation alike. ``api_key`` is accepted only so that
    a key given on the command line is redacted everywhere: W&B reads its key from ``wandb login`` or
    ``WANDB_API_KEY``."""

    def __init__(self, project: str | None = "e5v", entity: str | None = None, name: str | None = None,
                 group: str | None = None, tags: list[str] | tuple[str, ...] = (), mode: str | None = None,
                 id: str | None = None, log_adapter: bool = False, api_key: str | None = None) -> None:
        self.project, self.entity, self.name, self.group = project or "e5v", entity, name, group
        self.tags, self.mode, self.id, self.log_adapter = list(tags or []), mode or None, id, bool(log_adapter)
        if api_key:
            log.warning(
                "logger.wandb.api_key is not used (W&B reads its key from `wandb login` or WANDB_API_KEY); "
                "it is redacted from every file this run writes")

    def start(self, out_dir: str | Path, config: dict[str, Any], tags: list[str] | tuple[str, ...] = (),
              **init: Any) -> Any:
        """``wandb.init`` into ``out_dir`` with ``config`` and these settings (the command line W&B records
        is redacted); ``init``: further ``wandb.init`` arguments (``job_type``, ``resume`` ...)."""
        import wandb

        from e5v.console import captured

        with redacted_argv(), captured("W&B start"):  # W&B records the command line: no secrets in it
            return wandb.init(project=self.project, entity=self.entity, name=self.name, group=self.group,
                              tags=[*self.tags, *tags], mode=self.mode, id=self.id, dir=str(out_dir), config=config,
                              **init)


def wandb_logger(cfg: Any) -> WandbLogger | None:
    """``cfg.logger.wandb`` built through its ``_target_``; None when W&B is off (``logger=none``)."""
    from e5v.config import instantiate

    node = (cfg.get("logger") or {}).get("wandb")
    return instantiate(node) if node else None


def scrub_hydra_outputs(hydra_cfg: Any) -> list[Path]:
    """Rewrite Hydra's saved copies of the config and command line (``<run>/.hydra/*.yaml`` and a sweep's
    ``multirun.yaml``) with secret values redacted. Returns the files that changed."""
    import yaml

    from e5v.data.atomic import atomic_write_text

    candidates: list[Path] = []
    out_dir = Path(str(hydra_cfg.runtime.output_dir))
    sub = hydra_cfg.get("output_subdir")
    if sub:
        candidates += sorted((out_dir / str(sub)).glob("*.yaml"))
    try:
        sweep_dir = hydra_cfg.sweep.dir
    except Exception:  # noqa: BLE001 - unresolvable outside a multirun
        sweep_dir = None
    if sweep_dir:
        candidates.append(Path(str(sweep_dir)) / "multirun.yaml")
    changed = []
    for f in candidates:
        if not f.is_file():
            continue
        text = f.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
        clean = redact(data)
        if clean != data:
            atomic_write_text(f, yaml.safe_dump(clean, sort_keys=False, allow_unicode=True))
            changed.append(f)
    return changed


def provenance() -> dict[str, Any]:
    return {
        "git": git_info(),
        "packages": package_versions(),
        "host": platform.node(),
        "platform": platform.platform(),
        "argv": [redact_text(a) for a in sys.argv],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def end_with_newline(path: Path) -> None:
    """If ``path`` ends in a partial line (the writer was killed mid-line), terminate it."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            if f.tell() == 0:
                return
            f.seek(-1, 2)
            last = f.read(1)
    except FileNotFoundError:
        return
    if last != b"\n":
        with open(path, "ab") as f:
            f.write(b"\n")


def state_dict_sha256(model: Any) -> str:
    """sha256 over every state-dict tensor (name, dtype, shape, bytes) of the model as loaded: what the
    evaluation fingerprint and the mteb revision identify a model by.

    A content hash of what was loaded (weights after any adapter, in their loaded dtype), not of files:
    sizes and mtimes, or safetensors headers (names, dtypes, shapes, offsets), are identical for two
    fine-tunes of one architecture, so they cannot tell checkpoints apart. The cost is one pass over the
    weights (an 8B fp16 model: ~16 GB through sha256, roughly 10-30 s); it is not memoised on the model,
    whose weights may still change in place (an adapter merged later): callers keep the result."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            flat = t.reshape(-1).contiguous().cpu()
            h.update(flat.view(torch.uint8).numpy().data)
    return h.hexdigest()
