"""On-disk embedding cache: never encode the same item twice.

Layout under ``<cache root>/embeddings/``::

    <fingerprint>/<prompt key>/namespace.json           what the namespace holds
    <fingerprint>/<prompt key>/shard-<id>.npy            (n, d) float32 RAW embeddings
    <fingerprint>/<prompt key>/shard-<id>.json           item keys (row order), shape, dtype, fingerprint

A namespace is one (fingerprint, exact prompt template) pair, where the fingerprint is the model's
salted with the runtime that prepares its inputs (image-processor backend, library versions,
processor files: :func:`eval.encode.runtime_identity`); an item key is a hash of the item's content
(text, image bytes, or both). Raw (unnormalised) embeddings are stored, so retrieval
(normalised), STS (raw) and FashionIQ (raw sums) share entries. Shards are written atomically, the
``.npy`` first and the ``.json`` last (the json is the commit record), so an interrupted encoding
resumes from the last finished shard. Every shard is validated on read (shape, dtype, fingerprint,
prompt key, finite values); a bad one is reported, removed, and its items re-encoded. No pickle.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from e5v.data.atomic import atomic_write, atomic_write_text
from e5v.errors import E5VError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def sha(*parts: str | bytes, n: int = 32) -> str:
    """Hex digest of the parts (length-prefixed, so ("ab", "c") != ("a", "bc"))."""
    h = hashlib.sha256()
    for p in parts:
        b = p.encode("utf-8") if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:n]


class CacheError(E5VError, RuntimeError):
    """A cache shard is unreadable or does not match its record (it is set aside and re-encoded)."""


class Namespace:
    """The cached embeddings of one model fingerprint under one prompt template."""

    def __init__(
        self, root: Path, fingerprint: str, prompt_key: str, description: dict[str, Any], persist: bool = True
    ) -> None:
        self.persist = persist  # False: an in-memory namespace (cache disabled), still no double encoding
        self.fingerprint = fingerprint
        self.prompt_key = prompt_key
        self.dir = root / fingerprint[:32] / prompt_key
        self.description = description
        self._index: dict[str, tuple[Path, int]] = {}
        self._arrays: dict[Path, np.ndarray] = {}
        self._loaded = False
        self.dim: int | None = None

    # ------------------------------------------------------------------ reading
    def _validate(self, meta_path: Path) -> tuple[list[str], Path]:
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CacheError(f"unreadable shard record ({e})") from e
        for key in ("keys", "shape", "dtype", "fingerprint", "prompt_key", "format"):
            if key not in meta:
                raise CacheError(f"shard record lacks '{key}'")
        if meta["format"] != FORMAT_VERSION:
            raise CacheError(f"format {meta['format']} != {FORMAT_VERSION}")
        if meta["fingerprint"] != self.fingerprint or meta["prompt_key"] != self.prompt_key:
            raise CacheError("fingerprint or prompt key does not match its folder")
        npy = meta_path.with_suffix(".npy")
        try:
            arr = np.load(npy, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CacheError(f"unreadable array {npy.name} ({e})") from e
        keys = meta["keys"]
        if arr.dtype != np.float32 or meta["dtype"] != "float32":
            raise CacheError(f"dtype {arr.dtype} (record {meta['dtype']}), expected float32")
        if arr.ndim != 2 or list(arr.shape) != list(meta["shape"]) or arr.shape[0] != len(keys):
            raise CacheError(f"array shape {arr.shape} does not match the record {meta['shape']} / {len(keys)} keys")
        if self.dim is not None and arr.shape[1] != self.dim:
            raise CacheError(f"dimension {arr.shape[1]} differs from the namespace's {self.dim}")
        if not np.isfinite(arr).all():
            raise CacheError("array contains NaN or inf")
        self.dim = int(arr.shape[1])
        self._arrays[npy] = arr
        return keys, npy

    def load(self) -> None:
        """Read and validate every committed shard of this namespace (in-memory namespaces: no-op)."""
        if not self.persist:
            self._loaded = True
            return
        self._index.clear()
        self._arrays.clear()
        self._loaded = True
        if not self.dir.is_dir():
            return
        for meta_path in sorted(self.dir.glob("shard-*.json")):
            try:
                keys, npy = self._validate(meta_path)
            except CacheError as e:
                log.warning("cache: dropping bad shard %s (%s); its items will be re-encoded", meta_path, e)
                meta_path.unlink(missing_ok=True)
                meta_path.with_suffix(".npy").unlink(missing_ok=True)
                continue
            for row, key in enumerate(keys):
                self._index.setdefault(key, (npy, row))

    def _ensure(self) -> None:
        if not self._loaded:
            self.load()

    def missing(self, keys: Iterable[str]) -> list[str]:
        """Keys (unique, first-seen order) that are not cached."""
        self._ensure()
        seen: set[str] = set()
        out = []
        for k in keys:
            if k not in self._index and k not in seen:
                seen.add(k)
                out.append(k)
        return out

    def get(self, keys: Sequence[str]) -> np.ndarray:
        """Stacked raw embeddings for ``keys`` (all must be cached). (n, d) float32."""
        self._ensure()
        if not keys:
            return np.zeros((0, self.dim or 0), np.float32)
        absent = [k for k in keys if k not in self._index]
        if absent:
            raise KeyError(f"{len(absent)} item(s) not in the cache namespace {self.dir} (e.g. {absent[0]})")
        out = np.empty((len(keys), self.dim or 0), np.float32)
        for i, k in enumerate(keys):
            npy, row = self._index[k]
            out[i] = self._arrays[npy][row]
        return out

    def __contains__(self, key: str) -> bool:
        self._ensure()
        return key in self._index

    # ------------------------------------------------------------------ writing
    def put(self, keys: Sequence[str], embeddings: np.ndarray) -> Path | None:
        """Commit one shard (atomic: .npy then .json). Keys already cached are skipped."""
        self._ensure()
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[0] != len(keys):
            raise ValueError(f"{len(keys)} keys for embeddings of shape {embeddings.shape}")
        if self.dim is not None and embeddings.shape[1] != self.dim:
            raise ValueError(f"dimension {embeddings.shape[1]} differs from the namespace's {self.dim}")
        fresh = [i for i, k in enumerate(keys) if k not in self._index]
        if not fresh:
            return None
        keys = [keys[i] for i in fresh]
        arr = np.ascontiguousarray(embeddings[fresh])
        if not np.isfinite(arr).all():
            raise ValueError("refusing to cache NaN/inf embeddings")
        if not self.persist:
            mem = Path(f"<memory>/{uuid.uuid4().hex}")
            self.dim = int(arr.shape[1])
            self._arrays[mem] = arr
            for row, key in enumerate(keys):
                self._index[key] = (mem, row)
            return None
        self.dir.mkdir(parents=True, exist_ok=True)
        ns_file = self.dir / "namespace.json"
        if not ns_file.is_file():
            atomic_write_text(ns_file, json.dumps(self.description, indent=2, sort_keys=True) + "\n")
        shard = self.dir / f"shard-{uuid.uuid4().hex[:16]}"
        npy, meta = shard.with_suffix(".npy"), shard.with_suffix(".json")

        def write_npy(f: Any) -> None:
            buf = io.BytesIO()
            np.save(buf, arr, allow_pickle=False)
            f.write(buf.getvalue())

        atomic_write(npy, write_npy)
        record = {
            "format": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "prompt_key": self.prompt_key,
            "shape": list(arr.shape),
            "dtype": "float32",
            "keys": list(keys),
        }
        atomic_write_text(meta, json.dumps(record) + "\n")
        self.dim = int(arr.shape[1])
        self._arrays[npy] = arr
        for row, key in enumerate(keys):
            self._index[key] = (npy, row)
        return npy


class EmbeddingCache:
    """Namespaces under one root (``paths.cache_dir/embeddings`` by default)."""

    def __init__(self, root: str | os.PathLike, enabled: bool = True) -> None:
        self.root = Path(root)
        self.enabled = enabled
        self._namespaces: dict[tuple[str, str], Namespace] = {}

    def namespace(self, fingerprint: str, prompt_key: str, description: dict[str, Any]) -> Namespace:
        key = (fingerprint, prompt_key)
        if key not in self._namespaces:
            self._namespaces[key] = Namespace(self.root, fingerprint, prompt_key, description, persist=self.enabled)
        return self._namespaces[key]

    def reload(self) -> None:
        for ns in self._namespaces.values():
            if ns.persist:
                ns._loaded = False
