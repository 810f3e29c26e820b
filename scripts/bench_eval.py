"""Benchmark the embedding cache: the same e5v-eval command run cold (empty cache), then warm.

Run:  python scripts/bench_eval.py [--repeats 2] [--workdir DIR] [-- extra e5v-eval overrides]

Each run is a fresh process (`python -m eval.run backbone=tiny suite=mini ...`), as a user would
type it twice. The tiny model and the mini data are prepared first (untimed), so "cold" measures
encoding every item and "warm" measures reading them back. Prints wall times, the in-process
suite time from results.json, the number of items encoded, and the cold/warm ratios.
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

REPO = Path(__file__).resolve().parents[1]


def run_once(work: Path, cache: Path, tag: str, extra: list[str], env: dict[str, str]) -> dict[str, float]:
    run_dir = work / "runs" / tag
    cmd = [
        sys.executable,
        "-m",
        "eval.run",
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
    ap.add_argument("--repeats", type=int, default=1, help="cold+warm pairs (each cold run gets a fresh cache)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep files here (default: a temporary folder)")
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
        PYTHONPATH=str(REPO),
    )
    # untimed setup: build the tiny model and the mini data once
    os.environ.update(E5V_CACHE=env["E5V_CACHE"])
    sys.path.insert(0, str(REPO))
    from e5v.backbones import tiny
    from eval import mini_data

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
    print("\n| run  | command wall (s) | suite in-process (s) |")
    print("|------|------------------|----------------------|")
    print(f"| cold | {cold_wall:16.2f} | {cold_suite:20.2f} |")
    print(f"| warm | {warm_wall:16.2f} | {warm_suite:20.2f} |")
    print(
        f"\ncold/warm ratio: {cold_wall / warm_wall:.1f}x per command, {cold_suite / warm_suite:.1f}x in-process "
        f"(target >= 5x); files in {work}"
    )
    if any(w["encoded"] for _, w in rows):
        raise SystemExit("the warm run encoded items: the cache missed")


if __name__ == "__main__":
    main()
