"""What identifies a training run's result: the configuration that shapes the adapter.

A run directory is resumed only when the configuration that shapes its result equals the one its
checkpoint was written with. Keys that cannot change the trained weights (where outputs go, logging,
how often to save, how many steps in total) may differ; everything else must match, or training
refuses, listing the differing keys. The default ``run_name`` carries a short hash of the same
configuration (``${e5v_run_hash:}``), so changing a hyperparameter starts a new run directory instead
of silently continuing the old one.

Two more things shape the result and are checked on resume (refused unless ``allow_config_change=true``):
the training data's CONTENT (:func:`data_identity`: a file edited in place keeps its path, hence its config)
and the learning-rate schedule's length (:func:`schedule_lr`: the linear decay reaches 0 at the last step,
so a run planned for 40 steps is not the first 40 steps of an 80-step run).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
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
    from e5v.provenance import redact

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


_STAMP: list[str] = []


def invocation_stamp() -> str:
    """``2026-12-07_12-05-49-12345``: when this process started its work (time + pid), the same on every call:
    names the folder of Hydra's copies of one invocation (``configs/train.yaml``: ``hydra.output_subdir``)."""
    if not _STAMP:
        _STAMP.append(time.strftime("%Y-%m-%d_%H-%M-%S") + f"-{os.getpid()}")
    return _STAMP[0]


def data_identity(data: Any) -> dict[str, Any]:
    """What a run trains on: ``{"source", "rows", "sha256"}``, the hash taken over the rows as read (after bad
    rows were skipped and ``limit`` applied): anchors, positives and hard negatives, in order. Image anchors
    count by their path relative to the image root (the data may move), not by their bytes. General contrastive rows
    and mixtures hash their ``identity_payload()`` (every item, instruction and template; weights and sub-batch). A CSV edited in
    place, another hub file, another ``limit`` or ``on_bad_row`` give another hash."""
    payload = getattr(data, "identity_payload", None)
    if callable(payload):  # general contrastive rows / a mixture (e5v.data.contrastive, e5v.data.mixture)
        blob = json.dumps(payload(), ensure_ascii=False, sort_keys=True)
        return {"source": str(getattr(data, "source", "?")), "rows": len(data),
                "sha256": hashlib.sha256(blob.encode("utf-8")).hexdigest()}
    root = getattr(data, "image_root", None)
    anchors = list(data.anchors)
    if root:
        prefix = str(root).rstrip(os.sep) + os.sep
        anchors = [a[len(prefix):] if str(a).startswith(prefix) else str(a) for a in anchors]
    negatives = getattr(data, "negatives", None)
    blob = json.dumps({"anchor_kind": str(getattr(data, "anchor_kind", "text")), "anchors": anchors,
                       "positives": list(data.positives), "negatives": list(negatives) if negatives is not None else None},
                      ensure_ascii=False)
    return {"source": str(getattr(data, "source", "?")), "rows": len(anchors),
            "sha256": hashlib.sha256(blob.encode("utf-8")).hexdigest()}


def data_differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """``nli.csv: 512 rows, sha256 1a2b3c4d5e6f -> 512 rows, sha256 9f8e7d6c5b4a`` (source named if it changed)."""
    src = old.get("source") if old.get("source") == new.get("source") else f"{old.get('source')} -> {new.get('source')}"
    return (f"{src}: {old.get('rows')} rows, sha256 {str(old.get('sha256'))[:12]} -> {new.get('rows')} rows, "
            f"sha256 {str(new.get('sha256'))[:12]}")


def schedule_lr(step: int, total: int, warmup: int, lr: float) -> float:
    """The learning rate the trainer's schedule (linear warmup from 0 over ``warmup`` steps, then linear decay
    to 0 at ``total``) gives at scheduler position ``step`` (the lr used by optimizer step ``step + 1``)."""
    if step < warmup:
        return lr * step / max(1, warmup)
    return lr * max(0.0, (total - step) / max(1, total - warmup))
