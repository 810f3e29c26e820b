"""The embedded default: E5-V end to end on a CPU in a few minutes, offline.

Run:  make demo      (or: python -m scripts.demo [--out outputs/demo] [--steps 40] [--backbone tiny_world] [-v])

Time: 1 min 48 s for `make demo` from a fresh clone (setup included, warm package caches), 2 idle CPU cores,
2026-12-07 (README.md has the breakdown).

1. generate the mini world (coloured shapes: captions, composed-retrieval edits, rendered captions,
   graded sentence pairs, NLI triplets) in the real datasets' on-disk formats;
2. evaluate ``tiny_world`` (the tiny LLaVA-NeXT pretrained on the mini world with the next-token loss,
   shipped in e5v/assets) with the E5-V prompts on every benchmark family (suite=mini), zero-shot;
3. train it on mini NLI TEXT triplets through the DeepSpeed engine (LoRA, InfoNCE, gloo on CPU);
4. evaluate the trained adapter on the same suite;
5. print a before/after table with each metric's chance level and write report.md, report.png and
   offline W&B runs.

The console shows one line per stage (a progress bar where it takes long), the table and where things
were written; everything else (W&B summaries, DeepSpeed's and gcc's output, each evaluation's detail)
goes to <out>/demo.log (e5v.console). ``-v`` prints it on the console too.

What it shows: the prompts alone put text and images in one space (zero-shot scores well above
chance), and training on text pairs alone lifts text-image retrieval, composed retrieval and STS.
This run is seed 0 of the E5-V row of ``make replicate-mini`` (docs/replication.md has all seeds): the same
training seeds, so the same numbers as that record (tests/test_demo.py checks it; ``--seed N`` for another).
``--backbone tiny`` runs the random (unpretrained) tiny model instead: the plumbing only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from scripts.replicate_mini import MMEB_COLUMNS, chance_row, evaluate, train  # the replication's suite, training, chance

# (benchmark, metric, label) rows of the before/after table; labels are replicate_mini's columns
ROWS = [
    ("flickr30k", "t2i_R@5", "Flickr T->I R@5"),
    ("flickr30k", "i2t_R@5", "Flickr I->T R@5"),
    ("coco", "t2i_R@5", "COCO T->I R@5"),
    ("i2i_flickr30k", "t2i_R@5", "I2I-Flickr T->I R@5"),
    ("cirr", "R@5", "CIRR R@5"),
    ("fashioniq", "avg_R@10", "FIQ R@10"),
    ("sts", "avg", "STS"),
    # MMEB-mini (e5v.mini.mmeb_data): Hit@1 on each query's own candidate list, overall and per meta-task
    *[(bench, key, label) for label, bench, key in MMEB_COLUMNS],
]
BAR = "{desc}: {n_fmt}/{total_fmt} benchmarks [{elapsed}]"


def metric(result: dict[str, Any], bench: str, key: str) -> float:
    return float(result["metrics"].get(bench, {}).get(key, float("nan")))


def write_report(out: Path, before: dict, after: dict, train: dict, seconds: dict[str, float], backbone: str) -> str:
    chance = chance_row(before)
    lines = [
        f"# E5-V demo: {backbone} backbone, mini world, text-only training",
        "",
        f"Training: {train['steps']} steps on mini NLI triplets (DeepSpeed ZeRO-2, gloo on CPU), final loss "
        f"{train['final_loss']:.3f}; adapter `{train['adapter']}`.",
        "",
        "| metric | zero-shot | after text-only training | change | chance |",
        "|---|---|---|---|---|",
    ]
    for bench, key, label in ROWS:
        b, a = metric(before, bench, key), metric(after, bench, key)
        lines.append(f"| {label} | {b:.1f} | {a:.1f} | {a - b:+.1f} | {chance[label]:.1f} |")
    note = (
        "Scores x100. The prompts alone already place text and images in one space (compare with chance);"
        " training on text pairs alone moves image retrieval, composed retrieval and STS. Image-image"
        " retrieval (captions rendered as images) stays at chance: the tiny vision tower cannot read text."
        " MMEB-mini: MMEB-V1's four meta-tasks on the mini world (Hit@1, 13 tasks)."
        if backbone == "tiny_world" else
        "Scores x100. The tiny backbone has no pretraining, so retrieval involving images stays near chance;"
        " training on text pairs alone moves sentence similarity (STS)."
    )
    lines += [
        "",
        note,
        "",
        "Time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()),
        "",
    ]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        labels = [r[2] for r in ROWS]
        b = [metric(before, r[0], r[1]) for r in ROWS]
        a = [metric(after, r[0], r[1]) for r in ROWS]
        x = np.arange(len(labels))
        fig, ax = plt.subplots(figsize=(9, 4))
        ax.bar(x - 0.2, b, 0.4, label="zero-shot")
        ax.bar(x + 0.2, a, 0.4, label="after text-only training")
        ax.set_xticks(x, labels, rotation=25, ha="right")
        ax.set_ylabel("score (x100)")
        c = [chance[r[2]] for r in ROWS]
        ax.scatter(x, c, marker="_", s=400, color="gray", label="chance", zorder=3)
        ax.set_title(f"E5-V demo: {backbone} backbone on the mini suite")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "report.png", dpi=100)
        plt.close(fig)
    except ImportError:
        pass
    return text


def eval_stage(label: str, out: Path, name: str, overrides: list[str]) -> dict[str, Any]:
    """One evaluation of the mini suite: one progress bar over its benchmarks on the console."""
    from e5v import console

    bar = console.progress(total=None, desc=label, unit="benchmark", bar_format=BAR)

    def tick(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        with console.captured(label):
            return evaluate(out, name, out / "data", overrides, on_benchmark=tick)
    finally:
        bar.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("outputs/demo") / time.strftime("%Y-%m-%d_%H-%M-%S"))
    ap.add_argument("--steps", type=int, default=40, help="training steps")
    ap.add_argument("--seed", type=int, default=0,
                    help="training seed (sampling order, LoRA init, dropout); 0 = the recorded replication's seed 0")
    ap.add_argument("--backbone", default="tiny_world", choices=["tiny_world", "tiny"],
                    help="tiny_world: pretrained on the mini world (default); tiny: random weights")
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="W&B, DeepSpeed, transformers and gcc output on the console too (always in <out>/demo.log)")
    args = ap.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    out: Path = args.out.resolve()
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty; pass a new --out")
    out.mkdir(parents=True, exist_ok=True)

    from e5v import console

    log_path = out / "demo.log"
    # quiet: our stage lines, bars, warnings and the table on the console; everything else in demo.log
    console.setup(log_path, verbose=args.verbose, level=logging.INFO if args.verbose else logging.WARNING)
    try:
        run(args, out)
    except BaseException:
        console.echo(f"the demo stopped; its full log: {log_path}")
        raise
    finally:
        console.close()


def run(args: argparse.Namespace, out: Path) -> None:
    from e5v import console

    console.echo(f"E5-V demo: {args.backbone} on the mini world, CPU, offline -> {out}")
    seconds: dict[str, float] = {}
    t = time.time()
    before = eval_stage("[1/3] zero-shot eval (E5-V prompts)", out, "before",
                        [f"backbone={args.backbone}", "logger=wandb"])
    seconds["eval before"] = time.time() - t

    t = time.time()
    console.echo(f"[2/3] text-only training: {args.steps} steps on mini NLI triplets (LoRA, DeepSpeed on CPU, gloo)")
    with console.captured("training"):
        summary = train(out / "train", [f"backbone={args.backbone}", f"trainer.max_steps={args.steps}",
                                        f"paths.output_dir={out}", f"paths.data_dir={out / 'data'}", "run_name=demo",
                                        f"seed={args.seed}", f"data.loader.seed={args.seed}", "logger=wandb"])
    seconds["train"] = time.time() - t

    t = time.time()
    after = eval_stage("[3/3] eval of the trained adapter", out, "after",
                       [f"backbone={args.backbone}", "logger=wandb", f"checkpoint={summary['adapter']}"])
    seconds["eval after"] = time.time() - t

    report = write_report(out, before, after, summary, seconds, args.backbone)
    (out / "summary.json").write_text(
        json.dumps({"before": before["metrics"], "after": after["metrics"], "train": summary, "seconds": seconds},
                   indent=2, default=str) + "\n"
    )
    console.echo()
    console.echo(report.rstrip())
    console.echo()
    console.echo(f"written to {out}: report.md, report.png, summary.json; before/, train/, after/ (each run's "
                 "config, metrics, offline W&B run); demo.log (everything else; -v shows it here)")


if __name__ == "__main__":
    main()
