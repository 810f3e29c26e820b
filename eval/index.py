"""FAISS search: exact inner product by default, approximate (IVF-Flat, IVF-PQ, HNSW) by config.

Every benchmark ranks through :func:`rank`. Embeddings are L2-normalised before they get here, so
inner product = cosine. Results are re-ordered by (score desc, gallery index asc) so that ties break
as in :func:`eval.metrics.stable_ranking`. With an approximate index, :func:`rank` also runs exact
search on the same queries and reports the approximate index's recall against it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from e5v.errors import ConfigError

log = logging.getLogger(__name__)

KINDS = ("exact", "ivf_flat", "ivf_pq", "hnsw")
GPU_MAX_K = 2048  # faiss-gpu's k-selection limit; larger k (full CIRR rankings) runs on the CPU


@dataclass
class IndexSpec:
    """How to build the search index (``configs/index/*.yaml``)."""

    kind: str = "exact"
    nlist: int = 1024  # IVF cells (clamped to the gallery size / 39 for small galleries)
    nprobe: int = 32  # IVF cells visited per query
    pq_m: int = 64  # IVF-PQ sub-quantizers (must divide the dimension; reduced when it does not)
    pq_nbits: int = 8  # bits per sub-quantizer code (clamped for small galleries)
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    use_gpu: str | bool = "auto"  # auto: use faiss-gpu when installed and a GPU is visible
    check_k: int = 10  # approximate index: recall@check_k against exact search is reported
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"index.kind must be one of {KINDS}, got {self.kind!r} (configs/index/)")

    @classmethod
    def from_config(cls, cfg: Any) -> IndexSpec:
        if cfg is None:
            return cls()
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        except ImportError:  # pragma: no cover
            pass
        cfg = dict(cfg)
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        unknown = set(cfg) - known - {"_target_", "name"}
        if unknown:
            raise ConfigError(f"unknown index option(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: v for k, v in cfg.items() if k in known})

    @property
    def exact(self) -> bool:
        return self.kind == "exact"

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        if self.exact:
            return {"kind": "exact", "use_gpu": d["use_gpu"]}
        keep = {
            "ivf_flat": ("nlist", "nprobe"),
            "ivf_pq": ("nlist", "nprobe", "pq_m", "pq_nbits"),
            "hnsw": ("hnsw_m", "ef_construction", "ef_search"),
        }
        return {"kind": self.kind, **{k: d[k] for k in keep[self.kind]}, "use_gpu": d["use_gpu"]}


@dataclass
class SearchResult:
    scores: np.ndarray  # (nq, k) float32, descending per row
    ids: np.ndarray  # (nq, k) int64 gallery indices, -1 = empty slot
    spec: dict[str, Any]
    recall_vs_exact: float | None = None  # approximate index only: mean overlap with exact top-check_k


# Exact CPU search multiplies queries by gallery blocks of this many vectors (FAISS's default, 1,024,
# makes 4096-d matrix products too small to run at BLAS speed: exact search measured 2x slower than a
# dense matmul + top-k; 16,384 brings it level, for a 4,096 x 16,384 float32 scratch block of 256 MiB).
BLAS_DATABASE_BLOCK = 16384
_FAISS_DEFAULT_BLOCK = 1024


def _faiss() -> Any:
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is noise
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss-cpu is a requirement of eval
        raise ImportError("FAISS is needed for evaluation: pip install faiss-cpu (or faiss-gpu)") from e
    cvar = getattr(faiss, "cvar", None)
    if cvar is not None and getattr(cvar, "distance_compute_blas_database_bs", None) == _FAISS_DEFAULT_BLOCK:
        cvar.distance_compute_blas_database_bs = BLAS_DATABASE_BLOCK  # only when nobody changed it
    return faiss


def _want_gpu(spec: IndexSpec) -> bool:
    faiss = _faiss()
    n_gpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if spec.use_gpu in (True, "true", "True"):
        if n_gpu == 0:
            raise RuntimeError("index.use_gpu=true but FAISS sees no GPU (install faiss-gpu on a CUDA machine)")
        return True
    return spec.use_gpu == "auto" and n_gpu > 0


def _as_f32(x: np.ndarray, what: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{what} must be 2-D (n, d), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or inf")
    return x


def build_index(gallery: np.ndarray, spec: IndexSpec, k: int | None = None) -> Any:
    """A FAISS inner-product index over ``gallery`` (n, d), trained when the kind needs it.

    Exact search moves to the GPU(s) with faiss-gpu (``use_gpu``), unless ``k`` exceeds what GPU
    search supports."""
    faiss = _faiss()
    gallery = _as_f32(gallery, "gallery")
    n, d = gallery.shape
    if n == 0:
        raise ValueError("cannot build an index over an empty gallery")
    ip = faiss.METRIC_INNER_PRODUCT
    if spec.kind == "exact":
        index = faiss.IndexFlatIP(d)
    elif spec.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, int(spec.hnsw_m), ip)
        index.hnsw.efConstruction = int(spec.ef_construction)
        index.hnsw.efSearch = int(spec.ef_search)
    else:
        nlist = max(1, min(int(spec.nlist), n // 39 or 1))
        if nlist != spec.nlist:
            log.info(
                "index: nlist %d -> %d for a gallery of %d (FAISS wants >= 39 points per cell)", spec.nlist, nlist, n
            )
        quantizer = faiss.IndexFlatIP(d)
        if spec.kind == "ivf_flat":
            index = faiss.IndexIVFFlat(quantizer, d, nlist, ip)
        else:
            m = int(spec.pq_m)
            while d % m:
                m -= 1
            nbits = max(1, min(int(spec.pq_nbits), int(math.log2(max(2.0, n / 39)))))  # >= 39 points per centroid
            if (m, nbits) != (spec.pq_m, spec.pq_nbits):
                log.info(
                    "index: IVF-PQ m=%d nbits=%d (asked %d/%d) for d=%d, n=%d", m, nbits, spec.pq_m, spec.pq_nbits, d, n
                )
            index = faiss.IndexIVFPQ(quantizer, d, nlist, m, nbits, ip)
        index.train(gallery)
        index.nprobe = min(int(spec.nprobe), nlist)
    if spec.exact and _want_gpu(spec) and (k is None or k <= GPU_MAX_K):
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(gallery)
    return index


def _order_ties(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by (score desc, id asc); empty slots (-1) go last."""
    key_ids = np.where(ids < 0, np.iinfo(np.int64).max, ids)
    key_scores = np.where(ids < 0, np.inf, -scores.astype(np.float64))
    order = np.lexsort((key_ids, key_scores), axis=1)
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def search(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, ids) per query, ties ordered by lower gallery index."""
    queries = _as_f32(queries, "queries")
    k = int(min(k, index.ntotal))
    if len(queries) == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    scores, ids = index.search(queries, k)
    return _order_ties(scores, ids.astype(np.int64))


def rank(queries: np.ndarray, gallery: np.ndarray, k: int, spec: IndexSpec | None = None) -> SearchResult:
    """Rank ``gallery`` for every query through a FAISS index built from ``spec`` (exact by default)."""
    spec = spec or IndexSpec()
    index = build_index(gallery, spec, k)
    scores, ids = search(index, queries, k)
    recall = None
    if not spec.exact:
        exact_idx = build_index(gallery, IndexSpec(kind="exact", use_gpu=spec.use_gpu), k)
        kk = min(int(spec.check_k), index.ntotal, ids.shape[1])
        _, exact_ids = search(exact_idx, queries, kk)
        recall = approx_recall(ids[:, :kk], exact_ids)
    return SearchResult(scores=scores, ids=ids, spec=spec.describe(), recall_vs_exact=recall)


def approx_recall(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean fraction of the exact top-k found in the approximate top-k (x100): FAISS's
    ``knn_intersection_measure`` (empty slots, -1, never match: the exact top-k has none)."""
    from faiss.contrib.evaluation import knn_intersection_measure

    if approx_ids.shape != exact_ids.shape:
        raise ValueError(f"shape mismatch {approx_ids.shape} vs {exact_ids.shape}")
    if approx_ids.size == 0:
        return 100.0
    return float(100.0 * knn_intersection_measure(approx_ids, exact_ids))
