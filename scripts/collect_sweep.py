"""Gather every job of a Hydra sweep into one table (Markdown + CSV), sorted by a metric.

  python -m scripts.collect_sweep outputs/sweeps/lr_x_temperature                 # training: final train/loss
  python -m scripts.collect_sweep outputs/sweeps/eval_prompts --sort sts/avg
  python -m scripts.collect_sweep outputs/sweeps/eval_prompts --metrics 'flickr30k/*' --out reports/

A job is a folder holding ``.hydra/overrides.yaml`` (basic launcher and SLURM alike). Its metrics come
from ``results.json`` (evaluation: ``metrics_flat``, e.g. ``sts/avg``) and ``metrics.jsonl`` (training:
the last ``train/loss``, ``train/acc`` and the step count). The overrides that differ between jobs are
columns (the shared ones are listed above the Markdown table; the CSV has them all). Writes
``sweep_results.md`` and ``sweep_results.csv`` (into the sweep folder unless ``--out``) and prints the
Markdown. Jobs without metrics (failed, still running) are listed last with status ``no metrics``.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from e5v.errors import E5VError

TRAIN_KEYS = ("train/loss", "train/acc")
SKIP_DIRS = {"checkpoints", "wandb", ".submitit", ".hydra"}


class SweepError(E5VError, ValueError):
    """The sweep folder cannot be collected (no jobs, unreadable files); the message names it."""


@dataclass
class Job:
    num: int
    dir: Path
    overrides: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return "ok" if self.metrics else "no metrics"


def _overrides(path: Path) -> dict[str, str]:
    """``.hydra/overrides.yaml``: a YAML list of ``key=value`` strings (``+``/``~`` prefixes dropped)."""
    from omegaconf import OmegaConf

    try:
        items = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as e:  # noqa: BLE001 - any parse failure gets the file named
        raise SweepError(f"{path}: not a Hydra overrides file ({e})") from e
    if not isinstance(items, list):
        raise SweepError(f"{path}: expected a YAML list of key=value overrides")
    out = {}
    for item in items:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def _job_num(job_dir: Path) -> int:
    from omegaconf import OmegaConf

    hydra_yaml = job_dir / ".hydra" / "hydra.yaml"
    if hydra_yaml.is_file():
        num = OmegaConf.load(hydra_yaml).hydra.job.get("num")
        if isinstance(num, int):
            return num
    head = job_dir.name.split("_", 1)[0]
    return int(head) if head.isdigit() else -1


def _results(job_dir: Path) -> dict[str, float]:
    """``metrics_flat`` of the newest results.json in the job folder (not inside checkpoints or wandb)."""
    found = [
        p for p in job_dir.rglob("results.json") if not SKIP_DIRS & set(p.relative_to(job_dir).parts[:-1])
    ]
    if not found:
        return {}
    path = max(found, key=lambda p: p.stat().st_mtime)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SweepError(f"{path}: not valid JSON ({e}); the job was probably interrupted while writing") from e
    flat = data.get("metrics_flat")
    if flat is None:
        flat = {f"{b}/{m}": v for b, ms in (data.get("metrics") or {}).items() for m, v in ms.items()}
    return {str(k): float(v) for k, v in flat.items() if isinstance(v, (int, float))}


def _train_metrics(job_dir: Path) -> dict[str, float]:
    path = job_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    last: dict[str, Any] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            print(f"warning: {path}:{n} is not JSON (interrupted write?); skipped", file=sys.stderr)
            continue
        if "train/loss" in rec:
            last = rec
    out = {k: float(last[k]) for k in TRAIN_KEYS if k in last}
    if "step" in last:
        out["train/steps"] = float(last["step"])
    return out


def collect(sweep_dir: Path) -> list[Job]:
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise SweepError(f"sweep folder {sweep_dir} not found (the sweep's hydra.sweep.dir)")
    jobs = []
    for ov in sorted(sweep_dir.rglob(".hydra/overrides.yaml")):
        job_dir = ov.parent.parent
        if SKIP_DIRS & set(job_dir.relative_to(sweep_dir).parts):
            continue
        metrics = {**_train_metrics(job_dir), **_results(job_dir)}
        jobs.append(Job(_job_num(job_dir), job_dir, _overrides(ov), metrics))
    if not jobs:
        raise SweepError(f"{sweep_dir}: no job folder (a folder with .hydra/overrides.yaml) below it")
    return sorted(jobs, key=lambda j: (j.num, str(j.dir)))


def default_sort(jobs: list[Job]) -> str | None:
    """An evaluation average (``sts/avg``, ``fashioniq/avg_R@10``...) when there is one, else train/loss."""
    keys = sorted({k for j in jobs for k in j.metrics})
    evals = [k for k in keys if not k.startswith("train/")]
    if not evals:
        return "train/loss" if "train/loss" in keys else None
    avg = [k for k in evals if k.rsplit("/", 1)[-1].startswith("avg")]
    return (avg or evals)[0]


def sort_jobs(jobs: list[Job], metric: str | None, ascending: bool | None) -> tuple[list[Job], bool]:
    """Jobs with the metric first (ascending for losses, descending otherwise, unless told), then the rest."""
    if metric is None:
        return jobs, True
    if ascending is None:
        ascending = "loss" in metric
    have = [j for j in jobs if metric in j.metrics and math.isfinite(j.metrics[metric])]
    rest = [j for j in jobs if j not in have]
    have.sort(key=lambda j: j.metrics[metric], reverse=not ascending)
    return have + rest, ascending


def columns(jobs: list[Job], patterns: list[str] | None, metric: str | None) -> tuple[list[str], list[str], list[str]]:
    """(varying override keys, constant override keys, metric keys)."""
    keys = list(dict.fromkeys(k for j in jobs for k in j.overrides))
    varying = [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]
    constant = [k for k in keys if k not in varying]
    names = sorted({k for j in jobs for k in j.metrics})
    if patterns:
        names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]
    if metric and metric in names:
        names = [metric] + [n for n in names if n != metric]
    return varying, constant, names


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.4g}"


def markdown(sweep_dir: Path, jobs: list[Job], metric: str | None, ascending: bool, patterns: list[str] | None) -> str:
    varying, constant, names = columns(jobs, patterns, metric)
    order = f", sorted by {metric} ({'ascending' if ascending else 'descending'})" if metric else ""
    lines = [f"# Sweep {sweep_dir}", "", f"{len(jobs)} jobs{order}."]
    if constant:
        shared = ", ".join(f"`{k}={jobs[0].overrides[k]}`" for k in constant)
        lines += ["", f"Shared overrides: {shared}"]
    head = ["job", *varying, *names, "status", "dir"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for j in jobs:
        row = [str(j.num), *(j.overrides.get(k, "") for k in varying), *(_fmt(j.metrics.get(n)) for n in names),
               j.status, j.dir.relative_to(sweep_dir).as_posix()]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines) + "\n"


def to_csv(sweep_dir: Path, jobs: list[Job], metric: str | None, patterns: list[str] | None) -> str:
    varying, constant, names = columns(jobs, patterns, metric)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["job", *varying, *constant, *names, "status", "dir"])
    for j in jobs:
        w.writerow([j.num, *(j.overrides.get(k, "") for k in varying + constant),
                    *(repr(j.metrics[n]) if n in j.metrics else "" for n in names),
                    j.status, j.dir.relative_to(sweep_dir).as_posix()])
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir", type=Path, help="the sweep folder (hydra.sweep.dir), e.g. outputs/sweeps/NAME")
    ap.add_argument("--sort", default=None, help="metric to sort by (default: train/loss, else the first */avg)")
    order = ap.add_mutually_exclusive_group()
    order.add_argument("--ascending", dest="ascending", action="store_true", default=None)
    order.add_argument("--descending", dest="ascending", action="store_false")
    ap.add_argument("--metrics", default=None, help="comma-separated glob patterns of metric columns, e.g. 'sts/*'")
    ap.add_argument("--out", type=Path, default=None, help="folder for sweep_results.{md,csv} (default: the sweep)")
    args = ap.parse_args(argv)
    from e5v.data.atomic import atomic_write_text

    try:
        jobs = collect(args.sweep_dir)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    metric = args.sort or default_sort(jobs)
    if args.sort and not any(args.sort in j.metrics for j in jobs):
        known = sorted({k for j in jobs for k in j.metrics})
        print(f"error: no job has metric '{args.sort}'; known metrics: {known}", file=sys.stderr)
        return 1
    patterns = [p.strip() for p in args.metrics.split(",")] if args.metrics else None
    jobs, ascending = sort_jobs(jobs, metric, args.ascending)
    md = markdown(args.sweep_dir, jobs, metric, ascending, patterns)
    out = args.out or args.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "sweep_results.md", md)
    atomic_write_text(out / "sweep_results.csv", to_csv(args.sweep_dir, jobs, metric, patterns))
    print(md)
    print(f"wrote {out / 'sweep_results.md'} and {out / 'sweep_results.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
