"""Search: FAISS exact and approximate indexes vs a dense matmul + top-k, on synthetic 4096-d embeddings.

  python -m scripts.bench_search                                 # galleries of 10^4, 10^5, 10^6 (IVF-PQ); 15-45 min on 2 cores
  python -m scripts.bench_search --sizes 10000,100000            # without the 10^6 run (about half the time)
  python -m scripts.bench_search --sizes 2000 --dim 64 --queries 100 --no-append   # smoke test

Data (``Synthetic``): unit vectors with a decaying spectrum in a 256-d latent space mapped to 4096-d,
plus noise; queries are gallery points moved in latent space. Deterministic from the seed.

Per gallery size, k = 10, the same queries for every method:
- dense: torch ``q @ g.T`` + ``topk`` in float32 (exact; the reference), on CUDA when present;
- faiss flat: ``IndexFlatIP`` (exact; GPU with faiss-gpu); its ids must equal dense's;
- IVF-Flat (nlist ~ 4 sqrt(n), at most 1,024, several nprobe), HNSW (M=32, several efSearch), IVF-PQ
  (m = 64 sub-quantizers x 8 bits = 64 B per vector; ``--pq-m 64,256`` adds 256 B), the IVF indexes
  sharing one trained coarse quantizer and one assignment pass: recall@10 = mean share of the exact
  top 10 found; for IVF-PQ also the share of the exact top 10 among its top 100 (the candidates an
  exact re-rank from the embedding cache would take);
- 10^6: vectors are generated in chunks and never held in float32 at once; exact top 10 by a streamed
  dense search; only the compressed IVF-PQ index is built (float32 flat at 10^6 needs 16 GB: built
  only with --flat-1m and enough free memory).
Memory = bytes the index holds (vectors or codes + ids + graph links), from the index layout.
Appends to docs/benchmarks.md; $OUT/bench_search.json.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scripts import benchlib

K = 10
RERANK = 100  # compressed indexes: share of the exact top 10 among their top 100 (re-ranked exactly afterwards)


# ---------------------------------------------------------------------- data
class Synthetic:
    """Unit vectors with a decaying spectrum, as real embedding sets have (a random 4096-d cloud has no
    neighbours worth finding, and well separated clusters make every index look perfect):
    ``x = normalise(W z + e)``, ``z`` in ``latent`` dimensions with variances ``1/i``, ``W`` a random
    (latent -> dim) map, ``e`` small isotropic noise. Queries are gallery points moved in latent space
    (a caption is not its image), so their exact top 10 is a neighbourhood, not a duplicate. Generated
    chunk by chunk from (seed, chunk index): any chunk can be regenerated without keeping the gallery."""

    def __init__(self, n: int, dim: int, seed: int = 0, chunk: int = 50_000, latent: int = 256) -> None:
        self.n, self.dim, self.seed, self.chunk = n, dim, seed, chunk
        self.latent = min(latent, dim)
        rng = np.random.default_rng([seed, 0])
        self.scale = (1.0 / np.sqrt(np.arange(1, self.latent + 1))).astype(np.float32)  # std of each latent axis
        self.w = (rng.standard_normal((self.latent, dim), dtype=np.float32) / math.sqrt(dim)).astype(np.float32)
        self.noise = 0.02  # isotropic noise norm relative to the signal

    def _embed(self, z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = (z * self.scale) @ self.w
        signal = np.linalg.norm(x, axis=1, keepdims=True)
        x += rng.standard_normal(x.shape, dtype=np.float32) * (self.noise / math.sqrt(self.dim)) * signal
        return _unit(x)

    def _latent(self, i: int) -> np.ndarray:
        start, stop = i * self.chunk, min(self.n, (i + 1) * self.chunk)
        return np.random.default_rng([self.seed, 1, i]).standard_normal((stop - start, self.latent), dtype=np.float32)

    def chunk_at(self, i: int) -> np.ndarray:
        return self._embed(self._latent(i), np.random.default_rng([self.seed, 3, i]))

    @property
    def n_chunks(self) -> int:
        return (self.n + self.chunk - 1) // self.chunk

    def all(self) -> np.ndarray:
        return np.concatenate([self.chunk_at(i) for i in range(self.n_chunks)])

    def queries(self, nq: int, shift: float = 0.3) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 2])
        src = np.sort(rng.choice(self.n, size=min(nq, self.n), replace=False))
        z = []
        for i in range(self.n_chunks):
            lo = i * self.chunk
            sel = src[(src >= lo) & (src < lo + self.chunk)] - lo
            if len(sel):
                z.append(self._latent(i)[sel])
        zq = np.concatenate(z)
        zq = zq + shift * rng.standard_normal(zq.shape, dtype=np.float32)
        return self._embed(zq, rng)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32, copy=False)


# ---------------------------------------------------------------------- methods
def dense_topk(q: torch.Tensor, g: torch.Tensor, k: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    scores, ids = [], []
    for s in range(0, len(q), block):
        top = torch.topk(q[s : s + block] @ g.T, k, dim=1)
        scores.append(top.values)
        ids.append(top.indices)
    return torch.cat(scores).cpu().numpy(), torch.cat(ids).cpu().numpy()


def streamed_exact(data: Synthetic, q: np.ndarray, k: int, device: torch.device) -> tuple[np.ndarray, float]:
    """Exact top-k over a gallery generated chunk by chunk; returns (ids, seconds of search only)."""
    qt = torch.from_numpy(q).to(device)
    best_s = torch.full((len(q), k), -math.inf, device=device)
    best_i = torch.zeros((len(q), k), dtype=torch.long, device=device)
    spent = 0.0
    for c in range(data.n_chunks):
        g = torch.from_numpy(data.chunk_at(c)).to(device)
        benchlib.sync()
        t0 = time.perf_counter()
        s, i = torch.topk(qt @ g.T, min(k, len(g)), dim=1)
        cat_s, cat_i = torch.cat([best_s, s], 1), torch.cat([best_i, i + c * data.chunk], 1)
        best_s, pos = torch.topk(cat_s, k, dim=1)
        best_i = torch.gather(cat_i, 1, pos)
        benchlib.sync()
        spent += time.perf_counter() - t0
    return best_i.cpu().numpy(), spent


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    hits = [len(set(a[a >= 0].tolist()) & set(e.tolist())) / len(e) for a, e in zip(approx, exact)]
    return float(np.mean(hits))


def timed(fn: Any, repeats: int) -> tuple[float, Any]:
    """Best of ``repeats`` calls (search is deterministic; the best run has the least interference)."""
    best, out = math.inf, None
    for _ in range(repeats):
        benchlib.sync()
        t0 = time.perf_counter()
        out = fn()
        benchlib.sync()
        best = min(best, time.perf_counter() - t0)
    return best, out


def faiss_gpu(faiss: Any, index: Any, use_gpu: bool) -> Any:
    return faiss.index_cpu_to_all_gpus(index) if use_gpu else index


def bench_size(n: int, args: argparse.Namespace, faiss: Any, device: torch.device, use_gpu: bool) -> list[dict[str, Any]]:
    data = Synthetic(n, args.dim, seed=args.seed)
    q = data.queries(args.queries)
    nq, d = len(q), args.dim
    rows: list[dict[str, Any]] = []

    def row(method: str, build_s: float, search_s: float, recall: float | None, mem: float, note: str = "",
            recall_100: float | None = None) -> None:
        rows.append(
            {
                "n": n, "method": method, "build_s": build_s, "search_s_per_1k": 1000 * search_s / nq,
                "qps": nq / search_s, "recall_at_10": recall, "recall_10_at_100": recall_100, "memory_bytes": mem,
                "note": note,
            }
        )
        print(f"  n={n:>8} {method:<26} build {build_s:7.2f}s  search {1000 * search_s / nq:8.3f}s/1k  "
              f"recall {recall if recall is not None else float('nan'):.3f}  mem {mem / 2**20:9.1f} MiB {note}", flush=True)

    nlist = args.nlist or int(max(16, min(4 * math.sqrt(n), n / 39, 1024)))
    n_train = min(n, 50 * nlist)  # FAISS wants >= 39 points per cell; k-means cost grows with this
    free = _mem_available()
    big = n * d * 4 > 0.4 * free  # the float32 gallery would not sit comfortably in memory
    if not big:
        g = data.all()
        gt = torch.from_numpy(g).to(device)
        qt = torch.from_numpy(q).to(device)
        t_dense, (_, exact) = timed(lambda: dense_topk(qt, gt, K), args.repeats)
        row("dense matmul+topk (fp32)", 0.0, t_dense, 1.0, n * d * 4)
        del gt
        t0 = time.perf_counter()
        flat = faiss_gpu(faiss, _flat(faiss, g), use_gpu)
        b = time.perf_counter() - t0
        t_flat, (_, ids) = timed(lambda: flat.search(q, K), args.repeats)
        row("faiss flat (exact)", b, t_flat, recall_at_k(ids, exact), n * d * 4,
            f"{t_flat / t_dense:.2f}x dense time")
        del flat
        train = g[:n_train]
    else:
        g = None
        exact, t_dense = streamed_exact(data, q, K, device)
        row("dense matmul+topk (streamed)", 0.0, t_dense, 1.0, 0, "gallery generated in chunks")
        train = np.concatenate([data.chunk_at(i) for i in range(min(data.n_chunks, n_train // data.chunk + 1))])
        train = train[:n_train]
        if args.flat_1m and n * d * 4 < 0.5 * free:
            flat = _flat(faiss, None, d)
            t0 = time.perf_counter()
            for c in range(data.n_chunks):
                flat.add(data.chunk_at(c))
            b = time.perf_counter() - t0
            t_flat, (_, ids) = timed(lambda: flat.search(q, K), 1)
            row("faiss flat (exact)", b, t_flat, recall_at_k(ids, exact), n * d * 4)
            del flat

    # IVF: one coarse quantizer trained once and one assignment pass, shared by IVF-Flat and IVF-PQ
    ip = faiss.METRIC_INNER_PRODUCT
    t0 = time.perf_counter()
    quantizer = faiss.IndexFlatIP(d)
    ivf = faiss.IndexIVFFlat(quantizer, d, nlist, ip)
    ivf.cp.niter = 10
    ivf.train(train)
    pqs = []
    for m_req in args.pq_m:
        m = min(m_req, max(1, d // 4))
        while d % m:
            m -= 1
        if any(m == x[1] for x in pqs):
            continue
        t1 = time.perf_counter()
        pq = faiss.IndexIVFPQ(quantizer, d, nlist, m, 8, ip)  # coarse quantizer already trained: PQ only
        pq.pq.cp.niter = 10
        pq.train(train)
        pqs.append([pq, m, time.perf_counter() - t1])
    t_coarse = time.perf_counter() - t0 - sum(x[2] for x in pqs)
    t_assign = 0.0
    t_add = [0.0] * (len(pqs) + 1)
    chunks = [g] if not big else None
    for c in range(1 if not big else data.n_chunks):
        x = chunks[0] if chunks else data.chunk_at(c)
        ids0 = np.arange(len(x), dtype=np.int64) + (0 if chunks else c * data.chunk)
        t1 = time.perf_counter()
        _, assign = quantizer.search(x, 1)
        assign = np.ascontiguousarray(assign.ravel().astype(np.int64))
        t_assign += time.perf_counter() - t1
        targets = ([ivf] if not big else []) + [p_[0] for p_ in pqs]
        for j, index in enumerate(targets):
            t1 = time.perf_counter()
            index.add_core(len(x), faiss.swig_ptr(x), faiss.swig_ptr(ids0), faiss.swig_ptr(assign))
            t_add[j if not big else j + 1] += time.perf_counter() - t1
    shared = t_coarse + t_assign
    if not big:
        ivf_s = faiss_gpu(faiss, ivf, use_gpu)
        for nprobe in args.nprobe:
            _set_nprobe(faiss, ivf_s, nprobe)
            t, (_, ids) = timed(lambda: ivf_s.search(q, K), args.repeats)
            row(f"IVF-Flat nlist={nlist} nprobe={nprobe}", shared + t_add[0], t, recall_at_k(ids, exact),
                n * (d * 4 + 8) + nlist * d * 4)
        del ivf_s
        if n <= args.hnsw_max:
            hnsw = faiss.IndexHNSWFlat(d, args.hnsw_m, ip)
            hnsw.hnsw.efConstruction = args.ef_construction
            t0 = time.perf_counter()
            hnsw.add(g)
            b = time.perf_counter() - t0
            for ef in args.ef_search:
                hnsw.hnsw.efSearch = ef
                t, (_, ids) = timed(lambda: hnsw.search(q, K), args.repeats)
                row(f"HNSW M={args.hnsw_m} efC={args.ef_construction} ef={ef}", b, t, recall_at_k(ids, exact),
                    n * (d * 4 + args.hnsw_m * 2 * 4 * 1.05))
            del hnsw
    for j, (pq, m, t_train) in enumerate(pqs):
        pq_s = faiss_gpu(faiss, pq, use_gpu and m <= 96)  # faiss-gpu PQ takes few enough sub-quantizers
        for nprobe in args.nprobe:
            _set_nprobe(faiss, pq_s, nprobe)
            t, (_, ids) = timed(lambda: pq_s.search(q, K), args.repeats)
            _, ids100 = pq_s.search(q, min(RERANK, n))  # candidates an exact re-rank would take
            row(f"IVF-PQ m={m}x8b nlist={nlist} nprobe={nprobe}", shared + t_train + t_add[j + 1], t,
                recall_at_k(ids, exact), n * (m + 8) + nlist * d * 4, f"{m} B/vector ({4 * d // m}x smaller)",
                recall_at_k(ids100, exact))
    return rows


def _flat(faiss: Any, g: np.ndarray | None, d: int | None = None) -> Any:
    index = faiss.IndexFlatIP(g.shape[1] if g is not None else int(d or 0))
    if g is not None:
        index.add(g)
    return index


def _set_nprobe(faiss: Any, index: Any, nprobe: int) -> None:
    try:
        index.nprobe = nprobe
    except AttributeError:  # GPU index wrappers
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)


def _mem_available() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--queries", type=int, default=1000, help="queries (the 10^6 run uses --queries-1m)")
    ap.add_argument("--queries-1m", type=int, default=200)
    ap.add_argument("--nlist", type=int, default=None, help="IVF cells (default ~4 sqrt(n))")
    ap.add_argument("--nprobe", default="16,64")
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--ef-construction", type=int, default=40)
    ap.add_argument("--ef-search", default="64,128")
    ap.add_argument("--hnsw-max", type=int, default=100_000, help="largest gallery to build HNSW for")
    ap.add_argument("--pq-m", default="64", help="IVF-PQ sub-quantizers (bytes per vector), comma-separated (e.g. 64,256)")
    ap.add_argument("--flat-1m", action="store_true", help="also build float32 flat at 10^6 if memory allows")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch and FAISS threads (default: their own)")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args(argv)
    args.nprobe = [int(x) for x in str(args.nprobe).split(",")]
    args.ef_search = [int(x) for x in str(args.ef_search).split(",")]
    args.pq_m = [int(x) for x in str(args.pq_m).split(",")]
    from eval.index import _faiss

    faiss = _faiss()  # as evaluation configures it (BLAS block size for exact search)

    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    use_gpu = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    rows: list[dict[str, Any]] = []
    for n in [int(float(x)) for x in args.sizes.split(",") if x.strip()]:
        sub = argparse.Namespace(**vars(args))
        if n >= 1_000_000:
            sub.queries = args.queries_1m
            sub.repeats = 1
        print(f"gallery {n} x {args.dim}", flush=True)
        rows += bench_size(n, sub, faiss, device, use_gpu)
    info = benchlib.machine()
    info["faiss"] = faiss.__version__
    info["faiss_gpu"] = use_gpu
    lines = [
        f"### Search: {args.dim}-d synthetic embeddings, k={K}, on {info['device']}",
        "",
        benchlib.machine_line(info) + f" | faiss {faiss.__version__} ({'GPU' if use_gpu else 'CPU'}, "
        f"{faiss.omp_get_max_threads()} threads, BLAS gallery block {faiss.cvar.distance_compute_blas_database_bs})",
        "",
        "Recall@10 against the exact top 10; for compressed indexes also the share of the exact top 10 among "
        f"their top {RERANK} (what an exact re-rank of {RERANK} candidates, read from the embedding cache on disk, "
        "would recover). Search time per 1,000 queries (best of repeats); memory = what the index holds.",
        "",
        f"| gallery | method | build (s) | search (s / 1k q) | recall@10 | top-10 in top {RERANK} | memory (MiB) | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rec = "n/a" if r["recall_at_10"] is None else f"{r['recall_at_10']:.3f}"
        rec100 = "" if r["recall_10_at_100"] is None else f"{r['recall_10_at_100']:.3f}"
        lines.append(
            f"| {r['n']:,} | {r['method']} | {r['build_s']:.1f} | {r['search_s_per_1k']:.3f} | {rec} | {rec100} | "
            f"{r['memory_bytes'] / 2**20:,.0f} | {r['note']} |"
        )
    md = "\n".join(lines)
    data = {"machine": info, "args": vars(args), "rows": rows}
    benchlib.emit("bench_search", md, data, append=not args.no_append)
    return data


if __name__ == "__main__":
    main()
