"""Benchmark the embedding cache: the same e5v-eval command run cold (empty cache), then warm.

Run:  python -m scripts.bench_eval [--repeats 2] [--workdir DIR] [--no-paper-warm] [-- extra e5v-eval overrides]

Each run is a fresh process (`python -m eval.cli backbone=tiny suite=mini ...`), as a user would
type it twice. The tiny model and the mini data are prepared first (untimed), so "cold" measures
encoding every item and "warm" measures reading them back. Prints wall times, the in-process
suite time from results.json, the number of items encoded, and the cold/warm ratios.

Paper suite, fully cached (estimate, ``--no-paper-warm`` to skip): what a warm ``e5v-eval
suite=paper`` still does is read every embedding back from the cache and rank. Measured here: the
cache read rate (4096-d float32 shards written and read through ``eval.cache``, scaled to the suite's
144,209 unique items) and every exact FAISS search of the suite at its real query x gallery sizes
through ``eval.index.rank`` (synthetic vectors), plus the warm mini run's fixed cost (process start,
config, data loading). Appends to docs/benchmarks.md; $OUT/bench_eval.json.
Exit status 1 when the warm run encoded anything (the cache missed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts import benchlib

REPO = Path(__file__).resolve().parents[1]

# Every search of `e5v-eval suite=paper`: (what, queries, gallery, k). Retrieval keeps the top 10,
# CIRR ranks its whole gallery (recall subsets), FashionIQ the top 50; I2I repeats T2I/I2T's sizes.
PAPER_SEARCHES = [
    ("flickr30k t2i", 5000, 1000, 10), ("flickr30k i2t", 1000, 5000, 10),
    ("coco t2i", 25000, 5000, 10), ("coco i2t", 5000, 25000, 10),
    ("i2i flickr30k c2i", 5000, 1000, 10), ("i2i flickr30k i2c", 1000, 5000, 10),
    ("i2i coco c2i", 25000, 5000, 10), ("i2i coco i2c", 5000, 25000, 10),
    ("cirr val", 4181, 2297, 2297), ("cirr test1", 4148, 2315, 51),
    ("fashioniq dress", 2017, 3817, 50), ("fashioniq shirt", 2038, 6346, 50), ("fashioniq toptee", 1961, 5373, 50),
]


def run_once(work: Path, cache: Path, tag: str, extra: list[str], env: dict[str, str]) -> dict[str, float]:
    run_dir = work / "runs" / tag
    cmd = [
        sys.executable,
        "-m",
        "eval.cli",
        "backbone=tiny",
        "suite=mini",
        "embedder.device=cpu",
        "progress=false",
        f"suite.mini.dir={work / 'mini'}",
        f"cache.dir={cache}",
        f"render.cache_dir={cache / 'rendered'}",
        f"hydra.run.dir={run_dir}",
        f"report.history={work / 'history.jsonl'}",
        *extra,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{tag}: e5v-eval failed (exit {proc.returncode})")
    res = json.loads((run_dir / "results.json").read_text())
    return {
        "wall_s": wall,
        "suite_s": res["timing"]["total_s"],
        "encoded": res["cache"]["encoded"],
        "unique": res["cache"]["unique"],
        "model_loaded": res["cache"]["model_loaded"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2, help="cold+warm pairs (each cold run gets a fresh cache)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep files here (default: a temporary folder)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of the eval processes (default: 1 on CPU, see benchlib.set_threads; 0 = torch default)")
    ap.add_argument("--no-paper-warm", action="store_true", help="skip the fully-cached paper suite estimate")
    ap.add_argument("--cache-sample", type=int, default=20000, help="items written/read to time the cache")
    ap.add_argument("--no-append", action="store_true", help="do not append to docs/benchmarks.md")
    ap.add_argument("overrides", nargs="*", help="extra e5v-eval overrides, e.g. suite.mini.images=32")
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-eval-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        WANDB_MODE="offline",
        E5V_NO_PROGRESS="1",
        E5V_CACHE=str(work / "e5v-cache"),
        PYTHONPATH=os.pathsep.join(x for x in (str(REPO), os.environ.get("PYTHONPATH", "")) if x),
    )
    threads = benchlib.set_threads(args.threads)  # this process (the paper-warm searches) ...
    if args.threads != 0:
        env["OMP_NUM_THREADS"] = str(threads)  # ... and the e5v-eval processes, which torch reads at start
    # untimed setup: build the tiny model and the mini data once
    os.environ.update(E5V_CACHE=env["E5V_CACHE"])
    from e5v.backbones import tiny
    from e5v.mini import eval_data as mini_data

    tiny.ensure_tiny(seed=0)
    mini_sizes = {k: v for k, v in mini_data.DEFAULTS.items()}
    for o in args.overrides:
        if o.startswith("suite.mini.") and "=" in o:
            key, val = o[len("suite.mini.") :].split("=", 1)
            if key in mini_sizes:
                mini_sizes[key] = int(val)
    mini_data.ensure(work / "mini", seed=0, **mini_sizes)

    rows = []
    for r in range(args.repeats):
        cache = work / f"cache-{r}"
        shutil.rmtree(cache, ignore_errors=True)
        cold = run_once(work, cache, f"cold-{r}", args.overrides, env)
        warm = run_once(work, cache, f"warm-{r}", args.overrides, env)
        rows.append((cold, warm))
        print(
            f"[{r}] cold {cold['wall_s']:.2f} s (suite {cold['suite_s']:.2f} s, "
            f"encoded {cold['encoded']}/{cold['unique']}), "
            f"warm {warm['wall_s']:.2f} s (suite {warm['suite_s']:.2f} s, encoded {warm['encoded']}, "
            f"model loaded: {warm['model_loaded']})"
        )
    cold_wall = statistics.median(c["wall_s"] for c, _ in rows)
    warm_wall = statistics.median(w["wall_s"] for _, w in rows)
    cold_suite = statistics.median(c["suite_s"] for c, _ in rows)
    warm_suite = statistics.median(w["suite_s"] for _, w in rows)
    paper = None if args.no_paper_warm else paper_warm_estimate(work, args.cache_sample, warm_wall)
    info = benchlib.machine()
    lines = [
        f"### Evaluation: mini suite cold vs warm cache, tiny backbone, on {info['device']}",
        "",
        benchlib.machine_line(info),
        "",
        f"`e5v-eval backbone=tiny suite=mini` run twice as fresh processes (cold: empty embedding cache; warm: "
        f"every item cached, model never loaded), median of {args.repeats}.",
        "",
        "| run | command wall (s) | suite in-process (s) | items encoded |",
        "|---|---|---|---|",
        f"| cold | {cold_wall:.2f} | {cold_suite:.2f} | {rows[0][0]['encoded']} |",
        f"| warm | {warm_wall:.2f} | {warm_suite:.2f} | {rows[0][1]['encoded']} |",
        "",
        f"cold/warm: **{cold_wall / warm_wall:.1f}x** per command, {cold_suite / warm_suite:.1f}x in-process.",
    ]
    if paper:
        lines += [
            "",
            f"Paper suite fully cached (estimate on this machine): **{paper['total_s']:.0f} s** = cache read "
            f"{paper['read_s']:.1f} s ({paper['items']:,} items at {paper['read_items_s']:,.0f} items/s) + exact FAISS "
            f"searches {paper['search_s']:.1f} s ({len(PAPER_SEARCHES)} searches at the paper's sizes, FAISS "
            f"{'GPU' if paper['faiss_gpu'] else 'CPU'}) + fixed cost {paper['fixed_s']:.1f} s (the warm mini command).",
        ]
    md = "\n".join(lines)
    data = {
        "machine": info,
        "cold_wall_s": cold_wall,
        "warm_wall_s": warm_wall,
        "cold_suite_s": cold_suite,
        "warm_suite_s": warm_suite,
        "runs": rows,
        "paper_warm": paper,
        "workdir": str(work),
    }
    benchlib.emit("bench_eval", md, data, append=not args.no_append)
    if any(w["encoded"] for _, w in rows):
        raise SystemExit("the warm run encoded items: the cache missed")


def paper_warm_estimate(work: Path, sample: int, fixed_s: float, dim: int = 4096) -> dict[str, object]:
    """Seconds a fully cached paper-suite run would spend reading embeddings and searching."""
    import numpy as np

    from eval.cache import EmbeddingCache
    from eval.index import IndexSpec, _want_gpu, rank

    from eval.index import _faiss

    _faiss().omp_set_num_threads(os.cpu_count() or 1)  # FAISS on every core, as an evaluation would run it
    rng = np.random.default_rng(0)
    root = work / "paper-warm-cache"
    shutil.rmtree(root, ignore_errors=True)
    cache = EmbeddingCache(root)
    ns = cache.namespace("f" * 32, "p" * 32, {"what": "bench"})
    keys = [f"{i:032x}" for i in range(sample)]
    for s in range(0, sample, 256):  # shards as eval writes them
        part = keys[s : s + 256]
        ns.put(part, rng.standard_normal((len(part), dim), dtype=np.float32))
    fresh = EmbeddingCache(root).namespace("f" * 32, "p" * 32, {"what": "bench"})
    t0 = time.perf_counter()
    fresh.load()
    got = fresh.get(keys)
    read_s = time.perf_counter() - t0
    assert got.shape == (sample, dim)
    shutil.rmtree(root, ignore_errors=True)
    counts = benchlib.paper_suite_counts()
    items = sum(counts.values())
    read_items_s = sample / read_s
    search_s = 0.0
    spec = IndexSpec(kind="exact")
    per: dict[str, float] = {}
    for name, nq, ng, k in PAPER_SEARCHES:
        q = rng.standard_normal((nq, dim), dtype=np.float32)
        g = rng.standard_normal((ng, dim), dtype=np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        t0 = time.perf_counter()
        rank(q, g, k, spec)
        per[name] = time.perf_counter() - t0
        search_s += per[name]
        print(f"  paper search {name}: {nq} x {ng}, k={k}: {per[name]:.2f} s", flush=True)
    return {
        "items": items,
        "read_items_s": read_items_s,
        "read_s": items / read_items_s,
        "search_s": search_s,
        "searches": per,
        "fixed_s": fixed_s,
        "total_s": items / read_items_s + search_s + fixed_s,
        "faiss_gpu": _want_gpu(spec),
    }


if __name__ == "__main__":
    main()
