"""Per-dimension (Matryoshka) scoring: every benchmark scored again on the first ``k`` coordinates of each embedding.

``e5v-eval ... matryoshka_dims=[16,32]`` runs each selected benchmark as usual, then once per listed ``k`` below the
embedding width through a :class:`PrefixEncoder`: the same cached vectors (the embedding cache, or its in-memory
namespaces when ``cache.enabled=false``) cut to their first ``k`` coordinates and re-normalised, so nothing is
encoded again. Raw requests (STS, FashionIQ's summed queries) get the raw prefix and are normalised by their
benchmark exactly as the full vectors are. The full width is always a row of the report; listing it costs nothing.

``results.json`` gains ``matryoshka`` (``dims``, ``width``, ``metrics`` per dimension as ``{"16": {bench: {metric:
value}}}``, the prefix runs' cache counts) and ``metrics_flat`` gains ``<bench>@<k>/<metric>`` for every dimension;
``results.md`` gains a table with one column per dimension (:func:`markdown_section`).

Tested by ``.venv/bin/python -m pytest -q tests/eval/test_matryoshka_eval.py``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from e5v.errors import ConfigError
from e5v.matryoshka import check_dims, prefix
from eval.encode import Encoder

log = logging.getLogger(__name__)

KEY = "matryoshka_dims"


def config_width(model: Any) -> int | None:
    """The embedding width the model's ``config.json`` states (the text model's ``hidden_size``: the last-token
    state every backbone pools), read from the weights folder without loading anything; None when there is no
    local folder yet (a builtin not built, a hub model not downloaded) or no such field."""
    try:
        dirs = model._weight_dirs()  # the folder the fingerprint memo reads too; None: not on disk
    except Exception:  # noqa: BLE001 - a hint only: the width is checked again on the vectors
        return None
    if not dirs:
        return None
    path = Path(dirs[0]) / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for node in (cfg.get("text_config"), cfg):
        if isinstance(node, dict) and isinstance(node.get("hidden_size"), int):
            return int(node["hidden_size"])
    return None


def requested_dims(cfg: Any, model: Any) -> tuple[list[int], int | None]:
    """(``matryoshka_dims`` checked, the width from the model's config or None); before any model loads: a size
    above a known width fails here, in one line."""
    raw = cfg.get(KEY)
    if raw is None:
        return [], None
    from omegaconf import OmegaConf

    if OmegaConf.is_config(raw):
        raw = OmegaConf.to_container(raw, resolve=True)
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = [raw]
    width = config_width(model)
    emb_dim = (cfg.get("embedder") or {}).get("dim")  # an Embedder that returns a prefix itself: that is the width
    if isinstance(emb_dim, int) and not isinstance(emb_dim, bool):
        width = emb_dim if width is None else min(width, emb_dim)
    return check_dims(raw, width, key=KEY), width


class PrefixEncoder:
    """The first ``dim`` coordinates of a full :class:`eval.encode.Encoder`'s embeddings, with its own stats.

    It shares the encoder's cache, model, prompt and hasher, so every item comes from the cache that the full
    run filled; ``stats`` counts what this view read (``encoded`` stays 0 unless an item was never embedded)."""

    def __init__(self, encoder: Encoder, dim: int) -> None:
        self.dim = int(dim)
        self.width: int | None = None
        self.full = Encoder(encoder.model, encoder.prompt, encoder.cache, shard_size=encoder.shard_size,
                            hasher=encoder.hasher, progress=encoder.progress, runtime=encoder.runtime)

    @property
    def stats(self) -> dict[str, Any]:
        return self.full.stats

    def total_stats(self) -> dict[str, int]:
        return self.full.total_stats()

    def _cut(self, raw: np.ndarray, normalize: bool) -> np.ndarray:
        if raw.shape[0]:
            self.width = int(raw.shape[1])
            if self.dim > self.width:
                raise ConfigError(
                    f"{KEY}: {self.dim} exceeds the embedding width {self.width}; give prefix sizes <= {self.width}"
                )
        return prefix(raw, self.dim, normalize=normalize)

    def text(
        self, texts: Any, template: str = "text", category: str | None = None, normalize: bool = True
    ) -> np.ndarray:
        return self._cut(self.full.text(texts, template=template, category=category, normalize=False), normalize)

    def sts(self, sentences: Any) -> np.ndarray:
        return self._cut(self.full.sts(sentences), normalize=False)

    def image(
        self, images: Any, template: str = "image", category: str | None = None, normalize: bool = True
    ) -> np.ndarray:
        return self._cut(self.full.image(images, template=template, category=category, normalize=False), normalize)

    def interleaved(
        self, pairs: Any, template: str, category: str | None = None, normalize: bool = True
    ) -> np.ndarray:
        return self._cut(
            self.full.interleaved(pairs, template=template, category=category, normalize=False), normalize
        )


class DimResults:
    """The prefix runs of one evaluation: ``{k: {benchmark: BenchmarkResult}}`` and their encoders' stats."""

    def __init__(self, dims: list[int], width: int | None) -> None:
        self.dims = list(dims)
        self.hint = width  # the width the model's config states (checked before the model loads), or None
        self.width: int | None = None  # the width of the vectors, once a prefix run has read them
        self.results: dict[int, dict[str, Any]] = {k: {} for k in dims}
        self.stats: dict[int, dict[str, int]] = {}
        self.timing: dict[str, float] = {}

    def run(self, name: str, bench: Any, ctx: Any, full: Any, out_dir: Path | None) -> None:
        """Score ``bench`` at every listed dimension below the width (the width itself: ``full``, the result of
        the plain run); all ranks call it (encoding reads are collective), rank 0 gets the results."""
        import dataclasses
        import time

        for k in self.dims:
            if self.width is not None and k == self.width:
                self.results[k][name] = full
                continue
            enc = PrefixEncoder(ctx.encoder, k)
            sub = dataclasses.replace(
                ctx, encoder=enc, output_dir=None if out_dir is None else out_dir / "matryoshka" / f"dim_{k}"
            )
            t0 = time.perf_counter()
            res = bench.run(sub)
            self.timing[f"{name}@{k}"] = time.perf_counter() - t0
            self.width = enc.width if enc.width is not None else self.width
            if self.width is not None and k == self.width:
                res = full  # the whole vector: the plain run's numbers, exactly
            self.results[k][name] = res
            tot = self.stats.setdefault(k, {})
            for key, v in enc.total_stats().items():
                tot[key] = tot.get(key, 0) + v
            if res is not None and res is not full:
                log.info("%s@%d: %s", name, k, ", ".join(f"{m}={v:.2f}" for m, v in res.metrics.items()))

    def report(self, metrics: dict[str, dict[str, float]]) -> dict[str, Any]:
        """The ``matryoshka`` record of results.json; ``metrics``: the plain (full-width) run's."""
        width = self.width if self.width is not None else self.hint
        table: dict[str, dict[str, dict[str, float]]] = {}
        for k in self.dims:
            if width is not None and k == width:
                continue
            table[str(k)] = {n: dict(r.metrics) for n, r in self.results[k].items() if r is not None and r.metrics}
        full_key = str(width) if width is not None else "full"
        table[full_key] = {n: dict(ms) for n, ms in metrics.items()}
        return {
            "listed": list(self.dims),
            "width": width,
            "dims": list(table),
            "metrics": table,
            "cache": {str(k): v for k, v in self.stats.items()},
        }


def flat(record: dict[str, Any]) -> dict[str, float]:
    """``<bench>@<k>/<metric>`` for every dimension of a ``matryoshka`` record (the full width included)."""
    return {f"{b}@{k}/{m}": v for k, ms in record["metrics"].items() for b, bm in ms.items() for m, v in bm.items()}


def markdown_section(results: dict[str, Any]) -> list[str]:
    """results.md's per-dimension table: one row per (benchmark, metric), one column per dimension."""
    rec = results.get("matryoshka")
    if not rec:
        return []

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}"

    dims = rec["dims"]
    width = rec.get("width")
    head = [f"{k} (full)" if str(k) == str(width) or k == "full" else str(k) for k in dims]
    lines = [
        "## Metrics per embedding dimension (Matryoshka)\n",
        "Each benchmark scored again on the first k coordinates of the same embeddings, re-normalised "
        "(no re-encoding).\n",
        "| benchmark | metric | " + " | ".join(head) + " |",
        "|---|---|" + "---|" * len(dims),
    ]
    full = rec["metrics"][dims[-1]]
    for bench, ms in full.items():
        for m in ms:
            vals = [rec["metrics"][k].get(bench, {}).get(m) for k in dims]
            lines.append(f"| {bench} | {m} | " + " | ".join(fmt(v) for v in vals) + " |")
    lines.append("")
    return lines


__all__ = ["DimResults", "PrefixEncoder", "config_width", "flat", "markdown_section", "requested_dims"]
