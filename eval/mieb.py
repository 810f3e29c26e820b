"""MIEB through mteb: run a MIEB benchmark (default ``MIEB(lite)``) with our mteb encoder, offline.

    python -m eval.mieb prepare                         # once, with network: fill the HF datasets cache
    python -m eval.mieb check                           # offline: is every task's dataset cached?
    python -m eval.mieb run --model royokong/e5-v --dtype float16 --device cuda
    python -m eval.mieb run --model tiny --tasks CUB200I2IRetrieval,STS13VisualSTS --out /tmp/mieb
    make data-mieb / make eval-mieb ARGS="--model outputs/train/merged"

``run`` checks that every task's dataset is in the local Hugging Face cache *before* the model loads,
then calls ``mteb.evaluate`` with :class:`e5v.integrations.mteb_encoder.E5VEncoder`. The run folder
(default ``outputs/eval/mieb/<benchmark>/<date_time>/``) holds mteb's own result files under
``mteb/results/<model>/<revision>/<Task>.json`` (mteb's result cache: rerunning with the same ``--out``
resumes, finished tasks are read back) and, beside them, ``results.json`` / ``results.md``: one row per
task (type, main metric, score x100), the mean per task type and over tasks, the mteb and datasets
versions, the model's mteb name and revision (a content fingerprint unless ``--revision``), the prompt
body used for each input kind of each task, the git state.

Datasets: mteb loads each task's dataset with ``datasets.load_dataset(<repo>, revision=<pinned sha>)``.
``prepare`` calls each task's ``load_data()`` once with network, which fills ``$HF_HOME`` (the hub files
and the datasets arrow cache); afterwards ``run`` works with ``HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1``
(``make eval-mieb`` sets them) on this machine, or on another that gets a copy of ``$HF_HOME``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eval.loaders import MissingDatasetError

DEFAULT_BENCHMARK = "MIEB(lite)"
MAKE_TARGET = "data-mieb"


class MiebDataMissing(MissingDatasetError):
    """Some MIEB task datasets are not in the local Hugging Face cache (offline runs cannot fetch them)."""

    def __init__(self, missing: Sequence[dict[str, str]], total: int, cache_dir: Path) -> None:
        first = missing[0]
        names = ",".join(r["task"] for r in missing[:6]) + (f",... (+{len(missing) - 6})" if len(missing) > 6 else "")
        super().__init__("mieb", cache_dir, f"{len(missing)} of {total} task dataset(s)", MAKE_TARGET)
        self.missing = list(missing)
        self.args = (
            f"mieb: {len(missing)} of {total} task dataset(s) not in the Hugging Face cache {cache_dir} (first "
            f"{first['task']}: {first['repo']}@{first['revision'][:12]}; {names}). Fetch them once with network: "
            f"`make {MAKE_TARGET}` (docs/evaluation.md, 'MIEB (mteb)'), or set HF_HOME to a cache that holds them.",
        )


# ---------------------------------------------------------------------------------------------- tasks
def resolve_tasks(benchmark: str | None = DEFAULT_BENCHMARK, tasks: Sequence[str] | None = None) -> list[Any]:
    """mteb task objects: the named ``tasks`` (mteb task names) if given, else the benchmark's tasks."""
    import mteb

    from e5v.errors import ConfigError

    try:
        if tasks:
            return list(mteb.get_tasks(tasks=list(tasks)))
        return list(mteb.get_benchmark(benchmark or DEFAULT_BENCHMARK).tasks)
    except KeyError as e:
        what = f"--tasks {','.join(tasks)}" if tasks else f"--benchmark {benchmark}"
        raise ConfigError(f"eval.mieb {what}: {str(e.args[0] if e.args else e).removeprefix('KeyError: ')} "
                          f"(mteb {mteb.__version__}; names as in mteb.get_tasks() / mteb.get_benchmarks())") from None


def leaf_tasks(tasks: Sequence[Any]) -> list[Any]:
    """Aggregate tasks (e.g. VisualSTS17Multilingual) replaced by the tasks they average."""
    out: list[Any] = []
    for t in tasks:
        subs = getattr(t.metadata, "tasks", None) or getattr(t, "tasks", None)
        out.extend(leaf_tasks(subs) if subs else [t])
    return out


def dataset_refs(tasks: Sequence[Any]) -> list[dict[str, str]]:
    """One ``{"task", "repo", "revision"}`` per leaf task (the dataset mteb pins for it)."""
    refs = []
    for t in leaf_tasks(tasks):
        ds = t.metadata.dataset or {}
        refs.append({"task": t.metadata.name, "repo": str(ds.get("path")), "revision": str(ds.get("revision"))})
    return refs


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def datasets_cache_dir() -> Path:
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE)


def cached(repo: str, revision: str, hub_dir: Path | None = None, ds_dir: Path | None = None) -> bool:
    """Whether ``repo`` is in the local HF caches: the hub snapshot of that revision, or an arrow cache
    that ``datasets`` wrote for the repo (either lets ``load_dataset`` work offline)."""
    hub_dir = hub_dir or hub_cache_dir()
    ds_dir = ds_dir or datasets_cache_dir()
    snap = hub_dir / f"datasets--{repo.replace('/', '--')}" / "snapshots" / revision
    if snap.is_dir() and any(snap.iterdir()):
        return True
    arrow = ds_dir / repo.replace("/", "___")
    return arrow.is_dir() and any(arrow.rglob("*.arrow"))


def check_cached(tasks: Sequence[Any], hub_dir: Path | None = None, ds_dir: Path | None = None) -> list[dict[str, str]]:
    """Raise :class:`MiebDataMissing` (one line: the first missing task, its repo@revision, how many
    are missing, the command that fetches them) unless every leaf task's dataset is cached."""
    refs = dataset_refs(tasks)
    missing = [r for r in refs if not cached(r["repo"], r["revision"], hub_dir, ds_dir)]
    if missing:
        raise MiebDataMissing(missing, len(refs), hub_dir or hub_cache_dir())
    return refs


def prepare(tasks: Sequence[Any], log: Any = print) -> list[dict[str, Any]]:
    """Load every leaf task's data once (needs network for what is not cached yet): fills the HF caches.
    Resumable: cached tasks load from the cache. Returns one status row per task."""
    rows = []
    for t in leaf_tasks(tasks):
        name, t0 = t.metadata.name, time.time()
        try:
            t.load_data()
            status = "ok"
        except Exception as e:  # noqa: BLE001 - report every task, then fail
            status = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        rows.append({"task": name, "status": status, "seconds": round(time.time() - t0, 1)})
        log(f"{name}: {status} ({rows[-1]['seconds']} s)")
        if hasattr(t, "unload_data"):
            t.unload_data()
    return rows


# ---------------------------------------------------------------------------------------------- results
def task_rows(task_results: Sequence[Any], tasks: Sequence[Any]) -> list[dict[str, Any]]:
    """One row per task result: name, type, main metric, main score (mean over splits/subsets), x100."""
    meta = {t.metadata.name: t.metadata for t in tasks}
    rows = []
    for tr in task_results:
        m = meta.get(tr.task_name)
        ttype = m.type if m is not None else tr.task_type
        main = m.main_score if m is not None else None
        try:
            score = float(tr.get_score())
        except Exception:  # noqa: BLE001 - an aggregate with a missing part has no score
            score = None
        rows.append({
            "task": tr.task_name,
            "type": str(ttype),
            "main_score": main,
            "score": None if score is None else round(100 * score, 4),
            "splits": sorted(tr.scores),
            "evaluation_time_s": tr.evaluation_time,
        })
    return rows


def add_published(rows: list[dict[str, Any]]) -> None:
    """Each row gains ``published``: royokong/e5-v's score for that task in mteb's results repository
    (:mod:`eval.mieb_published`; None where it has none) and ``diff`` = ours - published."""
    from eval.mieb_published import E5V_MIEB_LITE

    for r in rows:
        pub = E5V_MIEB_LITE.get(r["task"])
        r["published"] = None if pub is None else pub[0]
        r["published_same_dataset_revision"] = None if pub is None else pub[2]
        r["diff"] = None if pub is None or r["score"] is None else round(r["score"] - pub[0], 2)


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean score per task type and the means over tasks and over task types (None where a score is missing)."""
    by_type: dict[str, list[float]] = {}
    for r in rows:
        by_type.setdefault(r["type"], []).append(r["score"])
    type_means = {k: (None if any(v is None for v in vs) else _mean(vs)) for k, vs in sorted(by_type.items())}
    scores = [r["score"] for r in rows]
    pub = [r.get("published") for r in rows]
    return {
        "per_type": type_means,
        "mean_task_published": None if any(v is None for v in pub) else _mean(pub),
        "mean_task": None if any(s is None for s in scores) else _mean(scores),
        "mean_type": None if any(v is None for v in type_means.values()) else _mean(list(type_means.values())),
    }


def markdown(results: dict[str, Any]) -> str:
    run, s = results["run"], results["summary"]
    lines = [
        f"# {results['benchmark']} with {run['mteb_model_name']}",
        "",
        f"- model: `{run['model']}`, mteb revision `{run['mteb_revision']}`, prompt `{run['prompt']}`, "
        f"dtype `{run['dtype']}`",
        f"- mteb {results['versions']['mteb']}, datasets {results['versions']['datasets']}, "
        f"git {results['git'].get('sha')}{' (dirty)' if results['git'].get('dirty') else ''}",
        f"- mteb result files: `{results['mteb_results_dir']}`",
        "",
        "| task | type | metric | score (x100) | E5-V in mteb's results | diff |",
        "|---|---|---|---:|---:|---:|",
    ]

    def f(v: float | None, signed: bool = False) -> str:
        return "-" if v is None else (f"{v:+.2f}" if signed else f"{v:.2f}")

    for r in results["tasks"]:
        mark = "" if r.get("published_same_dataset_revision") in (True, None) else " *"
        lines.append(f"| {r['task']} | {r['type']} | {r['main_score']} | {f(r['score'])} | "
                     f"{f(r.get('published'))}{mark} | {f(r.get('diff'), True)} |")
    for fl in results.get("failed", []):
        lines.append(f"- FAILED {fl['task']}: {fl['error']}")
    lines += ["", "| task type | mean (x100) |", "|---|---:|"]
    for k, v in s["per_type"].items():
        lines.append(f"| {k} | {'-' if v is None else f'{v:.2f}'} |")
    for label, key in (("mean over tasks", "mean_task"), ("mean over task types", "mean_type")):
        v = s[key]
        lines.append(f"| **{label}** | {'-' if v is None else f'{v:.2f}'} |")
    if s.get("mean_task_published") is not None:
        lines.append(f"| E5-V in mteb's results, mean over these tasks | {s['mean_task_published']:.2f} |")
    lines += ["", "E5-V in mteb's results: royokong/e5-v through mteb's own wrapper (mteb 1.14-1.16; "
              "eval/mieb_published.py names the source); * = computed on another dataset revision than the one "
              "evaluated here.", "", "Prompt bodies per input kind (by task type):", ""]
    for ttype, plan in results["prompts"].items():
        lines.append(f"- {ttype}: " + "; ".join(f"{k} -> {v}" for k, v in plan.items()))
    return "\n".join(lines) + "\n"


def evaluate(
    encoder: Any,
    tasks: Sequence[Any],
    out_dir: Path,
    *,
    benchmark: str = DEFAULT_BENCHMARK,
    batch_size: int = 8,
    run_info: dict[str, Any] | None = None,
    overwrite: bool = False,
    raise_error: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """``mteb.evaluate`` into ``out_dir/mteb`` (resumable), then ``results.json`` / ``results.md`` beside it.

    A task that fails (``raise_error=False``) keeps a row with no score, its error in ``failed``, and the
    means over tasks become None: a partial run never reads as a complete one."""
    import datasets
    import mteb
    from mteb.cache import ResultCache

    from e5v.provenance import git_info

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = ResultCache(out_dir / "mteb")
    t0 = time.time()
    res = mteb.evaluate(
        encoder,
        list(tasks),
        cache=cache,
        encode_kwargs={"batch_size": batch_size, "show_progress_bar": progress},
        overwrite_strategy="always" if overwrite else "only-missing",
        show_progress_bar=progress,
        raise_error=raise_error,
    )
    meta = encoder.mteb_model_meta
    rows = task_rows(res.task_results, leaf_tasks(tasks) + list(tasks))
    failed = [{"task": e.task_name, "error": str(e.exception).strip().splitlines()[-1][:500]}
              for e in (res.exceptions or [])]
    done = {r["task"] for r in rows}
    for t in tasks:  # a task mteb returned nothing for: a row without score, in the task list's order
        m = t.metadata
        if m.name not in done:
            rows.append({"task": m.name, "type": str(m.type), "main_score": m.main_score, "score": None,
                         "splits": [], "evaluation_time_s": None})
            if not any(f["task"] == m.name for f in failed):
                failed.append({"task": m.name, "error": "no result returned by mteb"})
    order = {t.metadata.name: i for i, t in enumerate(tasks)}
    rows.sort(key=lambda r: order.get(r["task"], len(order)))
    add_published(rows)
    prompts: dict[str, dict[str, str]] = {}
    for t in leaf_tasks(tasks):
        prompts.setdefault(str(t.metadata.type), encoder.prompt_plan(t.metadata))
    results = {
        "benchmark": benchmark,
        "tasks": rows,
        "summary": summarise(rows),
        "prompts": prompts,
        "failed": failed,
        "run": {
            "mteb_model_name": meta.name,
            "mteb_revision": meta.revision,
            "model": (run_info or {}).get("model", meta.name),
            "prompt": getattr(encoder.embedder.prompt, "name", None),
            "dtype": str(getattr(encoder.embedder.model, "dtype", "")),
            "batch_size": batch_size,
            **(run_info or {}),
        },
        "versions": {"mteb": mteb.__version__, "datasets": datasets.__version__},
        "git": git_info(),
        "mteb_results_dir": str(cache.cache_path / "results" / meta.name.replace("/", "__") / meta.revision),
        "seconds": round(time.time() - t0, 1),
    }
    from e5v.data.atomic import atomic_write_text  # the house's torn-file-safe writer

    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    atomic_write_text(out_dir / "results.md", markdown(results))
    return results


# ---------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.mieb", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("prepare", "check", "run"):
        sp = sub.add_parser(name)
        sp.add_argument("--benchmark", default=DEFAULT_BENCHMARK, help="an mteb benchmark name (default MIEB(lite))")
        sp.add_argument("--tasks", default=None, help="comma-separated mteb task names (instead of the benchmark)")
        if name == "run":
            sp.add_argument("--model", default="royokong/e5-v", help="hub id, local dir, or builtin (tiny, tiny_world)")
            sp.add_argument("--revision", default=None, help="hub revision; also the mteb revision")
            sp.add_argument("--adapter", default=None, help="a LoRA adapter / training run folded in")
            sp.add_argument("--prompt", default=None, help="prompt config name (default: the backbone's)")
            sp.add_argument("--dtype", default="auto")
            sp.add_argument("--device", default="auto")
            sp.add_argument("--batch-size", type=int, default=8)
            sp.add_argument("--interleaved-template", default="cirr_query", help="prompt body for image+text inputs")
            sp.add_argument("--out", default=None, help="run folder (default outputs/eval/mieb/<bench>/<time>)")
            sp.add_argument("--overwrite", action="store_true", help="recompute tasks already in the run folder")
            sp.add_argument("--no-check", action="store_true", help="skip the cached-data check (online runs)")
            sp.add_argument("--progress", action="store_true", help="mteb's and the encoder's progress bars")
    return p


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s).strip("_")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    tasks = resolve_tasks(args.benchmark, names)
    bench = ",".join(names) if names else args.benchmark
    if args.cmd == "prepare":
        rows = prepare(tasks)
        bad = [r for r in rows if r["status"] != "ok"]
        print(f"{len(rows) - len(bad)}/{len(rows)} task datasets cached under {datasets_cache_dir()}")
        return 1 if bad else 0
    if args.cmd == "check":
        refs = check_cached(tasks)
        print(f"all {len(refs)} task datasets of {bench} are cached ({hub_cache_dir()}, {datasets_cache_dir()})")
        return 0
    if not args.no_check:
        check_cached(tasks)  # before any weights load
    from e5v.integrations.mteb_encoder import E5VEncoder

    kw: dict[str, Any] = {"dtype": args.dtype}
    if args.prompt:
        kw["prompt"] = args.prompt
    if args.adapter:
        kw["adapter"] = args.adapter
    encoder = E5VEncoder(args.model, revision=args.revision, device=args.device,
                         interleaved_template=args.interleaved_template, batch_size=args.batch_size, **kw)
    out = Path(args.out) if args.out else Path("outputs/eval/mieb") / _slug(bench) / time.strftime("%Y-%m-%d_%H-%M-%S")
    res = evaluate(encoder, tasks, out, benchmark=bench, batch_size=args.batch_size, progress=args.progress,
                   run_info={"model": args.model, "revision_arg": args.revision, "adapter": args.adapter,
                             "dtype_arg": args.dtype, "offline": os.environ.get("HF_DATASETS_OFFLINE") == "1"})
    s = res["summary"]
    print(f"{bench}: {len(res['tasks'])} tasks, mean {s['mean_task']} (x100); {out}/results.md")
    for fl in res["failed"]:
        print(f"FAILED {fl['task']}: {fl['error']}", file=sys.stderr)
    return 1 if res["failed"] else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:
        from e5v.errors import E5VError

        if not isinstance(e, E5VError):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
