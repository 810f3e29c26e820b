"""Archive extraction for the preparation scripts: only selected members, only inside the destination."""

from __future__ import annotations

import shutil
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from e5v.data.atomic import atomic_write
from e5v.data.paths import UnsafePathError, safe_join
from scripts.data.common import PrepError
from scripts.data.fetch import CHUNK


def _member_target(archive: Path, dest: Path, rel: str, member: str) -> Path:
    try:
        return safe_join(dest, rel, where=f"{archive.name}: member {member}")
    except UnsafePathError as e:
        raise PrepError(f"{archive}: refusing to extract ({e}); the archive is damaged or hostile") from e


def extract_tar(archive: Path, dest: Path, select: Callable[[str], str | None]) -> int:
    """Extract the regular files whose member name ``select`` maps to a relative path (None: skip).
    Every target goes through safe_join (no absolute paths, no ``..``); links and devices are skipped."""
    n = 0
    with tarfile.open(archive) as tf:
        for m in tf.getmembers():
            rel = select(m.name) if m.isfile() else None
            if rel is None:
                continue
            target = _member_target(archive, dest, rel, m.name)
            src = tf.extractfile(m)
            assert src is not None
            atomic_write(target, lambda f, s=src: shutil.copyfileobj(s, f, CHUNK))
            n += 1
    return n


def extract_zip(archive: Path, dest: Path, select: Callable[[str], str | None]) -> int:
    n = 0
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as e:
        archive.unlink(missing_ok=True)
        raise PrepError(f"{archive} is not a valid zip ({e}); it was deleted: run again to re-download") from e
    with zf:
        for info in zf.infolist():
            rel = None if info.is_dir() else select(info.filename)
            if rel is None:
                continue
            target = _member_target(archive, dest, rel, info.filename)
            with zf.open(info) as src:
                atomic_write(target, lambda f, s=src: shutil.copyfileobj(s, f, CHUNK))
            n += 1
    return n
