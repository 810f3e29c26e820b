"""Path safety: dataset files may only name paths inside their data root."""

from __future__ import annotations

import os
from pathlib import Path

from e5v.errors import DataError


class UnsafePathError(DataError):
    """A data file names a path outside its data root (absolute, ``..``, or a symlink out)."""


def safe_join(root: str | os.PathLike, relative: str | os.PathLike, where: str = "") -> Path:
    """``root / relative``, refusing absolute paths, ``..`` escapes and symlinks that leave ``root``."""
    rel = str(relative)
    ctx = f" ({where})" if where else ""
    if not rel:
        raise UnsafePathError(f"empty path{ctx}")
    if os.path.isabs(rel) or (len(rel) > 1 and rel[1] == ":"):
        raise UnsafePathError(f"absolute path {rel!r} is not allowed{ctx}; paths must be relative to {root}")
    root_real = Path(os.path.realpath(root))
    target = Path(os.path.realpath(root_real / rel))
    if target != root_real and root_real not in target.parents:
        raise UnsafePathError(f"path {rel!r} escapes the data root {root_real}{ctx}")
    return target
