"""A training run's folder as the embedding library reads it: the ``checkpoints/step-N/`` folders, their manifest
(size and sha256 of every file, written last), and the checks that tell an intact adapter from a damaged one.
Training writes these folders (:mod:`e5v.train.checkpoint`); the library only reads them (an adapter given as a run
or step folder: :func:`e5v.lora.resolve_adapter`), so it never imports the training package.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

from e5v.errors import E5VError

log = logging.getLogger("e5v.train.checkpoint")  # the name a run's log and its readers have always used


STEP_DIR = re.compile(r"^step-(\d{6,})$")
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"


class CheckpointCorrupt(E5VError, RuntimeError):
    """A checkpoint's files do not match its manifest (or cannot be read). ``file`` names the culprit."""

    def __init__(self, ckpt: Path, file: str, reason: str) -> None:
        self.ckpt, self.file, self.reason = Path(ckpt), file, reason
        super().__init__(f"checkpoint {ckpt} is damaged: {file}: {reason}")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / STATE_FILE).is_file():
            out.append((int(m.group(1)), d))
    return sorted(out)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


ADAPTER_PART = "adapter/"


def verify(ckpt: str | Path, part: str | None = None) -> dict[str, Any]:
    """Check ``ckpt`` against its manifest (sizes first, then sha256); return its trainer state.

    ``part``: check only the files under that folder (``"adapter/"``: what evaluation and merging read; a
    missing or damaged optimizer state ``ds/`` does not make the adapter unusable). Raises
    :class:`CheckpointCorrupt` naming the first file that is missing, truncated or altered.
    Checkpoints written before manifests existed are checked for a readable state file only.
    """
    ckpt = Path(ckpt)
    man_file = ckpt / MANIFEST
    if man_file.is_file():
        try:
            files = {
                str(rel): (int(rec["size"]), str(rec["sha256"]))
                for rel, rec in json.loads(man_file.read_text())["files"].items()
            }
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointCorrupt(ckpt, MANIFEST, f"unreadable ({type(e).__name__}: {e})") from e
        if part is not None:
            files = {rel: rec for rel, rec in files.items() if rel.startswith(part)}
            if not files:
                raise CheckpointCorrupt(ckpt, part, f"the manifest lists no file under {part}")
        for rel, (want, _) in files.items():
            f = ckpt / rel
            if not f.is_file():
                raise CheckpointCorrupt(ckpt, rel, "missing")
            size = f.stat().st_size
            if size != want:
                raise CheckpointCorrupt(ckpt, rel, f"size {size} bytes, the manifest says {want}")
        for rel, (_, digest) in files.items():
            if sha256_file(ckpt / rel) != digest:
                raise CheckpointCorrupt(ckpt, rel, "sha256 differs from the manifest (altered or damaged)")
    try:
        state = json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointCorrupt(ckpt, STATE_FILE, f"unreadable ({e})") from e
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointCorrupt(ckpt, STATE_FILE, "holds no 'step'")
    return state


def latest_checkpoint(root: str | Path, check: bool = True, part: str | None = None) -> Path | None:
    """The newest complete checkpoint that passes :func:`verify` (or, ``check=False``, the newest by
    name), or None. Damaged ones are skipped with a warning naming the damaged file. ``part``: only
    those files need to be intact (``"adapter/"`` for evaluation and merging)."""
    for _, d in reversed(list_checkpoints(root)):
        if not check:
            return d
        try:
            verify(d, part)
            return d
        except CheckpointCorrupt as e:
            log.warning("ignoring %s; falling back to the previous checkpoint", e)
    return None


def damage_report(root: str | Path, part: str | None = None) -> str:
    """``step-000040: ds/x.pt missing; step-000020: ...``: why each checkpoint under ``root`` fails
    :func:`verify` (for an error that says what is left)."""
    out = []
    for _, d in reversed(list_checkpoints(root)):
        try:
            verify(d, part)
        except CheckpointCorrupt as e:
            out.append(f"{d.name}: {e.file}: {e.reason}")
    return "; ".join(out)


__all__ = ["ADAPTER_PART", "MANIFEST", "STATE_FILE", "STEP_DIR", "CheckpointCorrupt", "damage_report",
           "latest_checkpoint", "list_checkpoints", "sha256_file", "step_dir_name", "verify"]
