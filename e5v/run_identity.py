"""What identifies a training run's result: the configuration that shapes the adapter.

A run directory is resumed only when the configuration that shapes its result equals the one its
checkpoint was written with. Keys that cannot change the trained weights (where outputs go, logging,
how often to save, how many steps in total) may differ; everything else must match, or training
refuses, listing the differing keys. The default ``run_name`` carries a short hash of the same
configuration (``${e5v_run_hash:}``), so changing a hyperparameter starts a new run directory instead
of silently continuing the old one.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Top-level keys that never shape the trained weights.
IGNORED_TOP = ("paths", "logger", "resume", "run_name", "hydra", "allow_config_change", "hparams_search",
               "sweep_name", "verbose")
# Dotted keys that may change between a checkpoint and its resumption (the issue's "max_steps and
# things like logging"): total length, checkpoint cadence and retention, activation checkpointing
# (recomputation, same numbers), packing and data workers (the same batches and gradients, tested),
# download caches.
IGNORED_KEYS = ("trainer.max_steps", "trainer.save_every", "trainer.keep_checkpoints",
                "trainer.activation_checkpointing", "trainer.packing", "trainer.pack_tokens", "trainer.num_workers",
                "backbone.cache_dir", "backbone.local_files_only", "data.loader.cache_dir")


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: d}


def shaping_config(cfg: Any) -> dict[str, Any]:
    """The resolved configuration minus the keys that cannot change the result, flattened to dotted keys."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    top: dict[str, Any] = {}
    keys = cfg.keys() if isinstance(cfg, DictConfig) else dict(cfg).keys()
    for k in keys:
        if str(k) in IGNORED_TOP:
            continue
        v = cfg[k]
        top[str(k)] = OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) else v
    from e5v.run_log import redact

    flat = flatten(redact(top))  # secrets (api keys, tokens) never reach checkpoints or run names
    return {k: v for k, v in flat.items() if k not in IGNORED_KEYS}


def config_hash(cfg: Any, length: int = 8) -> str:
    blob = json.dumps(shaping_config(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every dotted key whose value differs (missing keys shown as <absent>)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if a != b:
            out.append(f"{k}: {a!r} -> {b!r}")
    return out


def register_resolvers() -> None:
    """``${e5v_run_hash:}``: the short hash of the root config's result-shaping part (for run names)."""
    from omegaconf import OmegaConf

    if OmegaConf.has_resolver("e5v_run_hash"):
        return

    def _run_hash(*, _root_: Any) -> str:
        return config_hash(_root_)

    OmegaConf.register_new_resolver("e5v_run_hash", _run_hash)
