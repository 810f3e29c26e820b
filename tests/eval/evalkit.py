"""Helpers shared by the eval tests (not a conftest: tests/conftest.py's module name stays unique)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from eval.encode import ImageRef, l2_normalize

# Small mini sizes: every family still runs, the tiny model encodes a few hundred items.
SMALL = {"images": 10, "cirr_groups": 3, "fiq_images": 12, "sts_pairs": 3}


def eval_overrides(tmp: Path, mini: Path, *extra: str, sizes: dict[str, int] | None = None) -> list[str]:
    sizes = sizes or SMALL
    return [
        "backbone=tiny",
        "suite=mini",
        f"suite.mini.dir={mini}",
        *[f"suite.mini.{k}={v}" for k, v in sizes.items()],
        f"cache.dir={tmp / 'cache'}",
        f"render.cache_dir={tmp / 'rendered'}",
        f"output_dir={tmp / 'out'}",
        "embedder.device=cpu",
        "progress=false",
        f"report.history={tmp / 'history.jsonl'}",
        *extra,
    ]


def compose_eval(tmp: Path, mini: Path, *extra: str, sizes: dict[str, int] | None = None) -> Any:
    from e5v.config import compose

    return compose("eval", eval_overrides(tmp, mini, *extra, sizes=sizes))


def _vec(key: str, dim: int) -> np.ndarray:
    seed = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


class FakeEncoder:
    """Encoder stand-in for benchmark logic tests: embeddings come from ``rule`` callbacks.

    ``text(t)``, ``image(label)`` and ``pair(label, text)`` return raw vectors; the default is a
    random vector seeded by the content, so unrelated items are nearly orthogonal.
    """

    def __init__(self, dim: int = 32, text: Any = None, image: Any = None, pair: Any = None, sts: Any = None) -> None:
        self.dim = dim
        self.rules = {"text": text, "image": image, "pair": pair, "sts": sts}
        self.calls: list[tuple[str, str, str | None, int]] = []

    def _get(self, kind: str, key: str, *args: Any) -> np.ndarray:
        rule = self.rules[kind]
        v = rule(*args) if rule else None
        return np.asarray(v, dtype=np.float32) if v is not None else _vec(f"{kind}|{key}", self.dim)

    def text(
        self, texts: list[str], template: str = "text", category: str | None = None, normalize: bool = True
    ) -> np.ndarray:
        self.calls.append(("text", template, category, len(texts)))
        out = np.stack([self._get("text", t, t) for t in texts])
        return l2_normalize(out) if normalize else out

    def sts(self, sentences: list[str]) -> np.ndarray:
        self.calls.append(("sts", "sts", None, len(sentences)))
        return np.stack([self._get("sts", s, s) for s in sentences])

    def image(
        self, images: list[ImageRef], template: str = "image", category: str | None = None, normalize: bool = True
    ) -> np.ndarray:
        self.calls.append(("image", template, category, len(images)))
        out = np.stack([self._get("image", im.label, im.label) for im in images])
        return l2_normalize(out) if normalize else out

    def interleaved(
        self, pairs: list[tuple[ImageRef, str]], template: str, category: str | None = None, normalize: bool = True
    ) -> np.ndarray:
        self.calls.append(("pair", template, category, len(pairs)))
        out = np.stack([self._get("pair", f"{im.label}|{t}", im.label, t) for im, t in pairs])
        return l2_normalize(out) if normalize else out
