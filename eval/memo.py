"""One memo for results that stay valid while files are unchanged: a JSON file of ``key -> (stamp, value)``.

A stamp is what the files looked like when the value was computed (:func:`file_stamp`: resolved path, size,
mtime in ns); a lookup returns the value only while the stamp is the same, so an edited, replaced or
rebuilt file is recomputed. Two users: the model fingerprint (a state-dict hash of weight files,
:mod:`eval.model`) and image content hashes (:class:`eval.encode.FileHasher`). An unreadable memo file, or
one in an older format, is a miss, never an error. Saving merges with what other processes wrote meanwhile.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from e5v import distributed as dist
from e5v.data.atomic import atomic_write_text

log = logging.getLogger(__name__)


def file_stamp(path: str | os.PathLike, resolve: bool = True) -> list[Any]:
    """[path, size, mtime_ns] of a file (FileNotFoundError when it is gone)."""
    p = Path(path)
    st = p.stat()
    return [str(p.resolve() if resolve else p), st.st_size, st.st_mtime_ns]


class StatMemo:
    """``get(key, stamp)`` -> the value ``put`` stored under the same key and stamp, else None; ``save()``
    writes the new entries (main rank only; merged with the file's current content). ``file=None``: in memory."""

    def __init__(self, file: str | os.PathLike | None, what: str = "memo") -> None:
        self.file = Path(file) if file else None
        self.what = what
        self._data = self._read()
        self._new: dict[str, dict[str, Any]] = {}

    def _read(self) -> dict[str, Any]:
        if self.file is None or not self.file.is_file():
            return {}
        try:
            data = json.loads(self.file.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"a JSON {type(data).__name__}, not an object")
            return data
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable %s %s (%s)", self.what, self.file, e)
            return {}

    def get(self, key: str, stamp: Any) -> Any:
        rec = self._new.get(key) or self._data.get(key)
        if isinstance(rec, dict) and rec.get("stamp") == stamp:
            return rec.get("value")
        return None

    def put(self, key: str, stamp: Any, value: Any) -> None:
        self._new[key] = {"stamp": stamp, "value": value}

    def save(self) -> None:
        if self.file is None or not self._new or not dist.is_main():
            return
        self._data = {**self._read(), **self._new}
        atomic_write_text(self.file, json.dumps(self._data, indent=1, sort_keys=True) + "\n")
        self._new = {}
