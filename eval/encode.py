"""Cached, sharded encoding: the only way benchmarks get embeddings.

Each request (texts, images, or image+text pairs under one prompt template) is keyed by content.
Items already in the :mod:`eval.cache` are read back; the rest are split across ranks, encoded in
shards of ``shard_size`` (each shard committed to the cache as soon as it is done, so a killed run
resumes from there), gathered on every rank, and returned in request order. Embeddings are cached
RAW; ``normalize=True`` L2-normalises on the way out.

A namespace is keyed on the model fingerprint (weights, backbone config, dtype, max_length: see
:mod:`eval.model`) AND on :func:`runtime_identity`, everything else that changes the numbers fed to
or computed by the model: the image-processor backend (torchvision or PIL classes resize
differently), the transformers, tokenizers, torch, torchvision and Pillow versions, and the bytes of
the checkpoint's processor and tokenizer files. The device is deliberately left out (CPU and GPU
runs of one setup share entries; their forward passes differ at float tolerance only).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from e5v import distributed as dist
from e5v.errors import ConfigError, E5VError
from e5v.provenance import package_version
from eval.cache import EmbeddingCache, sha
from eval.memo import StatMemo, file_stamp

log = logging.getLogger(__name__)


class FileHasher:
    """sha256 of file contents (32 hex), memoised while the file's (path, size, mtime) stays the same
    (:class:`eval.memo.StatMemo` in a JSON file)."""

    def __init__(self, memo_file: str | os.PathLike | None = None) -> None:
        self.memo = StatMemo(memo_file, "file-hash memo")

    def __call__(self, path: Path) -> str:
        try:
            stamp = file_stamp(path, resolve=False)
        except FileNotFoundError:
            raise FileNotFoundError(f"image file not found: {path}") from None
        key = str(path)
        digest = self.memo.get(key, stamp)
        if digest is not None:
            return str(digest)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()[:32]
        self.memo.put(key, stamp, digest)
        return digest

    def save(self) -> None:
        self.memo.save()


@dataclass
class ImageRef:
    """An image on disk (``path``) or in memory as encoded bytes (``data``, e.g. from a parquet file)."""

    path: Path | None = None
    data: bytes | None = None
    label: str = ""
    _key: str | None = field(default=None, repr=False)

    def content_key(self, hasher: FileHasher | None = None) -> str:
        if self._key is None:
            if self.data is not None:
                self._key = hashlib.sha256(self.data).hexdigest()[:32]
            elif self.path is not None:
                self._key = (hasher or FileHasher())(self.path)
            else:
                raise ValueError(f"image {self.label!r} has neither a path nor bytes")
        return self._key

    def open(self) -> Any:
        """What the Embedder takes: the path, or a lazily decoded PIL image for in-memory bytes."""
        if self.path is not None:
            return str(self.path)
        from PIL import Image, UnidentifiedImageError

        from e5v.data.images import BadImageError

        name = self.label or "<image bytes>"
        if not self.data:
            raise BadImageError(name, "no image bytes (0 bytes)")
        try:
            img = Image.open(io.BytesIO(self.data))
        except Image.DecompressionBombError as e:
            raise BadImageError(name, f"decompression bomb refused by PIL's limit ({e})") from e
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise BadImageError(name, f"cannot identify image ({e})") from e
        img.filename = name  # type: ignore[attr-defined]  # errors while decoding name it too
        return img


@dataclass
class EncodeStats:
    requested: int = 0
    unique: int = 0
    cached: int = 0
    encoded: int = 0

    def add(self, other: EncodeStats) -> None:
        self.requested += other.requested
        self.unique += other.unique
        self.cached += other.cached
        self.encoded += other.encoded


class NonFiniteEmbedding(E5VError, ValueError):
    """The model returned NaN/inf for some items; ``items`` names them (text, image label or path)."""

    def __init__(self, label: str, items: list[str], total: int) -> None:
        self.items = items
        shown = "; ".join(items[:5]) + (f"; ... ({len(items) - 5} more)" if len(items) > 5 else "")
        super().__init__(
            f"{label}: the model returned NaN/inf embeddings for {len(items)} of {total} item(s): {shown}. Nothing "
            "was cached or scored; check the model weights/dtype (float16 overflow?) and these inputs"
        )


def describe_item(kind: str, payload: Any) -> str:
    """A short, human-readable id for an encoding request item."""

    def image(ref: Any) -> str:
        if isinstance(ref, ImageRef):
            return ref.label or (str(ref.path) if ref.path is not None else "<image bytes>")
        return str(ref)

    def text(t: Any) -> str:
        t = str(t)
        return repr(t if len(t) <= 80 else t[:77] + "...")

    if kind == "text":
        return f"text {text(payload)}"
    if kind == "image":
        return f"image {image(payload)}"
    im, t = payload
    return f"image {image(im)} + text {text(t)}"


# Files that define how inputs become model inputs (pixels, token ids) without changing the weights.
PREPROCESSING_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
)


def _public(version: str | None) -> str | None:
    """``2.5.1+cu124`` -> ``2.5.1``: the CPU and CUDA builds of one release run the same preprocessing."""
    return version.split("+", 1)[0] if version else version


def image_backend() -> str:
    """``torchvision`` or ``pil``: the image-processor classes the backbones pick (a usable torchvision
    selects transformers' torchvision processors, else the PIL ones). Imports torchvision only when it
    is installed, to tell a usable one from a mismatched one."""
    if importlib.util.find_spec("torchvision") is None:
        return "pil"
    from e5v.backbones.base import has_torchvision

    return "torchvision" if has_torchvision() else "pil"


def preprocessing_files_digest(model: Any) -> str | None:
    """sha256 over the processor/tokenizer files of the model's checkpoint directory (local folder or
    local hub snapshot, never the network); ``None`` for models built in code (tiny) or not found.
    Same weights with another tokenizer or image-processor config make other embeddings."""
    get_cfg = getattr(model, "backbone_config", None)
    if not callable(get_cfg):
        return None
    b = get_cfg()
    name = b.get("name_or_path")
    if not name:
        return None
    folder = Path(str(name))
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(name), revision=b.get("revision"), local_files_only=True))
        except Exception:  # not in the local hub cache
            return None
    parts: list[str | bytes] = []
    for fname in PREPROCESSING_FILES:
        f = folder / fname
        if f.is_file():
            parts += [fname, f.read_bytes()]
    return sha(*parts, n=64) if parts else None


def runtime_identity(model: Any = None) -> dict[str, Any]:
    """What besides the model fingerprint and the prompt changes an embedding (see the module doc)."""
    backend = image_backend()
    return {
        "image_backend": backend,
        "transformers": package_version("transformers"),
        "tokenizers": package_version("tokenizers"),
        "torch": _public(package_version("torch")),
        "torchvision": _public(package_version("torchvision")) if backend == "torchvision" else None,
        "pillow": package_version("pillow"),
        "preprocessing_files": preprocessing_files_digest(model),
    }


def namespace_fingerprint(model_fingerprint: str, runtime: dict[str, Any]) -> str:
    """The cache namespace's fingerprint: the model's, salted with the runtime identity."""
    return sha("namespace", model_fingerprint, json.dumps(runtime, sort_keys=True), n=64)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError("an embedding has zero norm and cannot be normalised")
    return (x / norms).astype(np.float32)


class Encoder:
    """Embeddings through the cache. ``model`` is an :class:`eval.model.ModelHandle`; ``runtime``
    overrides :func:`runtime_identity` (tests)."""

    def __init__(
        self,
        model: Any,
        prompt: Any,
        cache: EmbeddingCache,
        shard_size: int = 256,
        hasher: FileHasher | None = None,
        progress: bool = True,
        runtime: dict[str, Any] | None = None,
        whole_chunks: bool = False,
    ) -> None:
        if shard_size < 1:
            raise ConfigError(f"cache.shard_size must be >= 1, got {shard_size}")
        self.model = model
        self.prompt = prompt
        self.cache = cache
        self.shard_size = int(shard_size)
        self.hasher = hasher or FileHasher()
        self.progress = progress and not os.environ.get("E5V_NO_PROGRESS")
        self.stats: dict[str, EncodeStats] = {}
        self._runtime = runtime
        # whole_chunks: ranks take whole chunks of ``shard_size`` missing items (cut the same way for any number of
        # processes), so every item is embedded in the same batch and the embeddings are bitwise the same on 1 or N
        # processes (e5v-mine); False: every world_size-th item (balanced, equal at float tolerance only)
        self.whole_chunks = bool(whole_chunks)

    @property
    def runtime(self) -> dict[str, Any]:
        if self._runtime is None:
            self._runtime = runtime_identity(self.model)
        return self._runtime

    # ------------------------------------------------------------------ public
    def text(
        self, texts: Sequence[str], template: str = "text", category: str | None = None, normalize: bool = True
    ) -> np.ndarray:
        keys = [sha("text", t) for t in texts]
        return self._get("text", template, category, keys, list(texts), normalize)

    def sts(self, sentences: Sequence[str]) -> np.ndarray:
        """STS protocol: the ``sts`` template, raw embeddings."""
        return self.text(sentences, template="sts", normalize=False)

    def image(
        self, images: Sequence[ImageRef], template: str = "image", category: str | None = None, normalize: bool = True
    ) -> np.ndarray:
        keys = [sha("image", im.content_key(self.hasher)) for im in images]
        return self._get("image", template, category, keys, list(images), normalize)

    def interleaved(
        self, pairs: Sequence[tuple[ImageRef, str]], template: str, category: str | None = None, normalize: bool = True
    ) -> np.ndarray:
        keys = [sha("pair", im.content_key(self.hasher), t) for im, t in pairs]
        return self._get("pair", template, category, keys, list(pairs), normalize)

    def total_stats(self) -> dict[str, int]:
        tot = EncodeStats()
        for s in self.stats.values():
            tot.add(s)
        return dict(vars(tot))

    # ------------------------------------------------------------------ core
    def _namespace(self, template: str, category: str | None) -> Any:
        template_text = self.prompt.template(template, category)
        prompt_key = sha("prompt", template_text)
        model_fp = self.model.fingerprint  # first: it may load the model (and fetch its files)
        desc = {
            "template": template,
            "category": category,
            "prompt": template_text,
            "fingerprint": model_fp,
            "runtime": self.runtime,
        }
        return self.cache.namespace(namespace_fingerprint(model_fp, self.runtime), prompt_key, desc)

    def _encode_chunk(self, kind: str, template: str, category: str | None, payloads: list[Any]) -> np.ndarray:
        emb = self.model.embedder
        if kind == "text":
            out = emb.encode_text(payloads, normalize=False, template=template, category=category)
        elif kind == "image":
            out = emb.encode_image([p.open() for p in payloads], normalize=False, template=template, category=category)
        else:
            out = emb.encode_interleaved(
                [(im.open(), t) for im, t in payloads], template=template, normalize=False, category=category
            )
        if out.shape[0] != len(payloads):
            raise RuntimeError(
                f"the embedder returned {out.shape[0]} rows for {len(payloads)} inputs (skipped images?)"
            )
        return out

    def _get(
        self, kind: str, template: str, category: str | None, keys: list[str], payloads: list[Any], normalize: bool
    ) -> np.ndarray:
        ns = self._namespace(template, category)
        label = f"{template}" + (f"/{category}" if category else "")
        by_key: dict[str, Any] = {}
        for k, p in zip(keys, payloads):
            by_key.setdefault(k, p)  # duplicates (same content) are encoded once, from the first
        missing = dist.broadcast_object(ns.missing(keys))
        stats = self.stats.setdefault(label, EncodeStats())
        n_unique = len(by_key)
        stats.requested += len(keys)
        stats.unique += n_unique
        stats.cached += n_unique - len(missing)
        stats.encoded += len(missing)
        log.info(
            "%s: %d items (%d unique), %d cached, %d to encode",
            label,
            len(keys),
            n_unique,
            n_unique - len(missing),
            len(missing),
        )
        if missing:
            if self.whole_chunks:
                chunks = [missing[i : i + self.shard_size] for i in range(0, len(missing), self.shard_size)]
                my_chunks = dist.shard(chunks)
                step = self.shard_size * dist.world_size()  # items done by all ranks per round (bar)
            else:
                mine = dist.shard(missing)
                my_chunks = [mine[i : i + self.shard_size] for i in range(0, len(mine), self.shard_size)]
                step = 0
            bar = None
            if self.progress and dist.is_main():
                from tqdm.auto import tqdm

                bar = tqdm(total=len(missing), desc=f"encode {label}", unit="item")
            done_keys: list[str] = []
            done_rows: list[np.ndarray] = []
            for chunk in my_chunks:
                payloads = [by_key[k] for k in chunk]
                arr = self._encode_chunk(kind, template, category, payloads)
                bad = ~np.isfinite(arr).all(axis=1)
                if bad.any():  # before the cache: a NaN never becomes a silent wrong score
                    raise NonFiniteEmbedding(
                        label, [describe_item(kind, p) for p, b in zip(payloads, bad) if b], len(payloads)
                    )
                ns.put(chunk, arr)
                done_keys.extend(chunk)
                done_rows.append(arr)
                if bar is not None:
                    bar.update(min(step, len(missing) - bar.n) if step else len(chunk) * dist.world_size())
            if bar is not None:
                bar.close()
            if dist.is_dist():
                mine_arr = np.concatenate(done_rows) if done_rows else None
                gathered = dist.all_gather_object((done_keys, mine_arr))
                ns.load()  # shards other ranks wrote (shared filesystem)
                for other_keys, other_arr in gathered:
                    if other_keys:
                        ns.put(other_keys, other_arr)  # only what is still absent (another filesystem)
        out = ns.get(keys)
        return l2_normalize(out) if normalize else out
