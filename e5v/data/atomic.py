"""Atomic file writes: a killed process never leaves a half-written file under the final name.

A write that fails (disk full, quota, I/O error) removes its temporary file, leaves whatever was at
``path`` before untouched, and raises an ``OSError`` with the same errno whose message names ``path``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temporary file in the same directory, fsync, then rename onto ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _naming(e, path) from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise _naming(e, path) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _naming(err: OSError, path: Path) -> OSError:
    """The same kind of error (errno kept, so ``ENOSPC`` stays ``ENOSPC``), saying what was not written."""
    message = f"{err.strerror or err}: could not write {path} (the previous file, if any, is intact)"
    return OSError(err.errno, message) if err.errno else OSError(message)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def build_dir_once(target: str | os.PathLike, build: Callable[[Path], object], marker: str) -> Path:
    """Return ``target``, building it first if ``target/marker`` is missing.

    ``build(tmp)`` fills a temporary sibling directory, which is then renamed onto ``target``: readers
    never see a half-built directory, and when two processes race, the loser's identical copy is dropped.
    """
    target = Path(target)
    if (target / marker).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race
            if not (target / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
