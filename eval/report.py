"""The run report: ``results.json``, ``results.md`` (the paper's tables with ours beside them) and a
PNG chart, plus the W&B summary when a logger is configured. With ``matryoshka_dims``, results.md also
has a table with one column per embedding dimension (:mod:`eval.dims`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from e5v.data.atomic import atomic_write, atomic_write_text
from eval.paper import PAPER, REFERENCE_LABEL, SUMMARY, TABLES, paper_value

if TYPE_CHECKING:  # pragma: no cover
    from e5v.provenance import WandbLogger

log = logging.getLogger(__name__)


def summary_avg(metrics: dict[str, dict[str, float]]) -> float | None:
    """Table 6's average: the mean of its eleven numbers, when all are present."""
    vals = [metrics.get(c.benchmark, {}).get(c.metric) for c in SUMMARY]
    if any(v is None for v in vals):
        return None
    return float(sum(vals) / len(vals))  # type: ignore[arg-type]


def comparison_rows(metrics: dict[str, dict[str, float]], reference: str) -> list[dict[str, Any]]:
    """One row per table column where we have a number: table, column, benchmark, metric, paper, ours, diff."""
    ours_all = {**metrics, "summary": {"avg": summary_avg(metrics)} if summary_avg(metrics) is not None else {}}
    rows = []
    for table in TABLES:
        for col in table.columns:
            ours = ours_all.get(col.benchmark, {}).get(col.metric)
            if ours is None:
                continue
            paper = paper_value(reference, col.benchmark, col.metric)
            diff = ours - paper if (paper is not None and table.comparable) else None
            rows.append(
                {
                    "table": table.title,
                    "column": col.label,
                    "benchmark": col.benchmark,
                    "metric": col.metric,
                    "paper": paper,
                    "ours": ours,
                    "diff": diff,
                }
            )
    return rows


def _fmt(v: float | None, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def markdown(results: dict[str, Any]) -> str:
    metrics: dict[str, dict[str, float]] = results["metrics"]
    reference = results["paper"]["reference"]
    label = REFERENCE_LABEL.get(reference, reference)
    ours_all = {**metrics, "summary": {"avg": summary_avg(metrics)} if summary_avg(metrics) is not None else {}}
    run = results["run"]
    lines = [f"# E5-V evaluation: `{run['backbone']}`, suite `{run['suite']}`", ""]
    status = results.get("status") or {}
    if status and not status.get("complete", True):
        stopped = f"; stopped at **{status['failed']}**: `{status.get('error')}`" if status.get("failed") else ""
        lines.append(
            f"- **INCOMPLETE: {len(status['finished'])} of {len(status['finished']) + len(status['pending'])} "
            f"benchmarks finished** (pending: {', '.join(status['pending'])}){stopped}"
        )
    lines += [
        f"- prompt `{run['prompt']}`, dtype `{run['dtype']}`, {_checkpoint_line(run)}, processes {run['world_size']}",
        f"- git `{(results['git'].get('sha') or '?')[:12]}`{' (dirty)' if results['git'].get('dirty') else ''}, "
        f"index `{json.dumps(results['index'])}`",
        f"- cache: {results['cache']['cached']} of {results['cache']['unique']} unique items from the cache, "
        f"{results['cache']['encoded']} encoded; total {results['timing']['total_s']:.1f} s",
    ]
    if results.get("font"):
        f = results["font"]
        lines.append(
            f"- I2I captions rendered with **{f['font']}** (`{f['font_file']}`, sha256 {f['font_sha256']}); "
            f"the paper used {f['paper_font']}"
        )
    if run["suite"] == "mini":
        lines.append(
            "- **mini suite: generated data and (usually) a tiny random model; the paper's numbers are shown "
            "for layout only and are not comparable.**"
        )
    lines.append(f"\nEach table: the paper's {label}, ours, and ours minus the paper (x100 throughout).\n")
    for table in TABLES:
        cols = [c for c in table.columns if ours_all.get(c.benchmark, {}).get(c.metric) is not None]
        if not cols:
            continue
        lines.append(f"## {table.title}\n")
        lines.append("| | " + " | ".join(c.label for c in cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        paper = [paper_value(reference, c.benchmark, c.metric) for c in cols]
        ours = [ours_all[c.benchmark][c.metric] for c in cols]
        lines.append(f"| {label} | " + " | ".join(_fmt(p) for p in paper) + " |")
        lines.append("| ours | " + " | ".join(_fmt(o) for o in ours) + " |")
        if table.comparable:
            diffs = [None if p is None else o - p for p, o in zip(paper, ours)]
            lines.append("| diff | " + " | ".join(_fmt(d, signed=True) for d in diffs) + " |")
        if table.note:
            lines.append(f"\n{table.note}")
        lines.append("")
    from eval.published import mmeb_section  # MMEB-V1: ours beside the released models' and E5-V's published rows

    lines += mmeb_section(metrics, run["backbone"], run["suite"], run.get("prompt"))
    lines.append("## All metrics\n")
    chance: dict[str, dict[str, float]] = results.get("chance") or {}
    lines.append("| benchmark | metric | ours | paper | chance |")
    lines.append("|---|---|---|---|---|")
    for bench, ms in metrics.items():
        for m, v in ms.items():
            lines.append(f"| {bench} | {m} | {_fmt(v)} | {_fmt(paper_value(reference, bench, m))} | "
                         f"{_fmt(chance.get(bench, {}).get(m))} |")
    from eval.dims import markdown_section  # matryoshka_dims: one column per embedding dimension

    lines += ["", *markdown_section(results)] if results.get("matryoshka") else []
    lines.append("\n## Details\n")
    for bench, info in results["info"].items():
        t = results["timing"].get(bench)
        lines.append(f"- **{bench}** ({t:.1f} s): `{json.dumps(info, default=str)}`")
    for bench, info in results["info"].items():
        for key, val in info.items() if isinstance(info, dict) else []:
            if "index_recall_vs_exact" in str(key):
                lines.append(
                    f"- approximate index, {bench} {key}: {val:.2f}% of the exact "
                    f"top-{results['index'].get('check_k', 10)}"
                )
    return "\n".join(lines) + "\n"


def _checkpoint_line(run: dict[str, Any]) -> str:
    """``checkpoint `PATH` (adapter, step N) on base `BASE``` or ``checkpoint `-```."""
    ckpt = run.get("checkpoint")
    if not ckpt:
        return "checkpoint `-`"
    kind = run.get("checkpoint_kind") or "checkpoint"
    step = f", step {run['checkpoint_step']}" if run.get("checkpoint_step") is not None else ""
    base = f" on base `{run['base']}`" if kind == "adapter" and run.get("base") else ""
    return f"checkpoint `{ckpt}` ({kind}{step}){base}"


def plot(results: dict[str, Any], path: Path) -> Path | None:
    """Horizontal bars: ours vs the paper for every metric that has a paper number."""
    rows, seen = [], set()
    for r in results["comparison"]:  # Table 6 repeats numbers of Tables 1-5: plot each metric once
        if r["paper"] is not None and (r["benchmark"], r["metric"]) not in seen:
            seen.add((r["benchmark"], r["metric"]))
            rows.append(r)
    if not rows:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = [f"{r['benchmark']} {r['metric']}" for r in rows]
    h = max(3.0, 0.28 * len(rows) + 1.2)
    fig = Figure(figsize=(8, h))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    y = list(range(len(rows)))
    ax.barh(
        [i + 0.2 for i in y],
        [r["paper"] or 0 for r in rows],
        height=0.4,
        label=REFERENCE_LABEL.get(results["paper"]["reference"], "paper"),
        color="#9aa5b1",
    )
    ax.barh([i - 0.2 for i in y], [r["ours"] for r in rows], height=0.4, label="ours", color="#2f6fba")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(min(0.0, *(r["ours"] for r in rows)), 100)
    ax.set_xlabel("x100")
    ax.set_title(f"{results['run']['backbone']} ({results['run']['suite']}) vs the paper")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()

    def save(f: Any) -> None:
        fig.savefig(f, format="png", dpi=110)

    atomic_write(path, save)
    return path


def write(results: dict[str, Any], out_dir: Path, make_plot: bool = True) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": out_dir / "results.json", "md": out_dir / "results.md"}
    if make_plot:
        png = plot(results, out_dir / "results.png")
        if png is not None:
            files["png"] = png
    results["files"] = {k: p.name for k, p in files.items()}
    atomic_write_text(files["json"], json.dumps(results, indent=2, default=str, allow_nan=True) + "\n")
    atomic_write_text(files["md"], markdown(results))
    return files


def append_history(path: Path, results: dict[str, Any], out_dir: Path) -> None:
    """Append one line per run (time, run dir, git, model, flat metrics) to a JSONL file."""
    import time

    line = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "run_dir": str(out_dir),
        "suite": results["run"]["suite"],
        "backbone": results["run"]["backbone"],
        "checkpoint": results["run"].get("checkpoint"),
        "checkpoint_step": results["run"].get("checkpoint_step"),
        "model_fingerprint": results["run"]["model_fingerprint"],
        "git": results["git"],
        "metrics": results["metrics_flat"],
    }
    from e5v.provenance import end_with_newline

    path.parent.mkdir(parents=True, exist_ok=True)
    end_with_newline(path)  # a line torn by a kill stays one bad line, not two
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line, default=str) + "\n")


def log_wandb(results: dict[str, Any], logger: WandbLogger, out_dir: Path) -> str | None:
    """Summary metrics (``bench/metric``) and the comparison table to W&B; returns the run dir."""
    import wandb

    from e5v.console import captured

    config = {"run": results["run"], "index": results["index"], "config": results["config"]}
    run = logger.start(out_dir, config, tags=["eval", results["run"]["suite"]], job_type="eval")
    flat = {f"{b}/{m}": v for b, ms in results["metrics"].items() for m, v in ms.items()}
    flat.update(results.get("metrics_flat") or {})  # + <bench>@<k>/<metric> with matryoshka_dims
    run.summary.update(flat)
    cols = ["table", "column", "benchmark", "metric", "paper", "ours", "diff"]
    run.log({"paper_comparison": wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in results["comparison"]])})
    if (out_dir / "results.png").is_file():
        run.log({"paper_chart": wandb.Image(str(out_dir / "results.png"))})
    run_dir = str(run.dir)
    with captured("W&B finish"):  # its run summary: the run's log file, not the console
        run.finish()
    return run_dir


__all__ = ["PAPER", "comparison_rows", "log_wandb", "markdown", "plot", "write"]
