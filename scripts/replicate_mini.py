"""Mini-world replication of E5-V's Table 6 on a CPU: prompts vs no prompt, before and after text-only training.

Run:  make replicate-mini     (or: python scripts/replicate_mini.py [--seeds 0 1 2] [--steps 40] [--out DIR])

Backbone: ``tiny_world`` (the tiny LLaVA-NeXT pretrained on the mini world with the next-token loss;
built once into the cache). For each seed and each prompt setting of Table 6

* last token without prompt (``prompt=none``: the bare input, no chat wrapper),
* generic prompt (``prompt=generic_llama3``: chat wrapper, no "in one word" instruction),
* E5-V prompts (``prompt=e5v_llama3``),

the mini suite (text-image, image-image with rendered captions, composed retrieval, STS; data seed =
seed) is evaluated zero-shot, the model is trained on mini NLI TEXT triplets with that prompt's
training template (training seed = seed), and evaluated again. Writes table.md (laid out like the
paper's Table 6, mean +- std over seeds, with each metric's chance level), results.json and table.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

SETTINGS = [
    ("last token, no prompt", "none"),
    ("generic prompt", "generic_llama3"),
    ("E5-V prompts", "e5v_llama3"),
]
# (column label, benchmark, metric, chance kind)
COLUMNS = [
    ("Flickr T->I R@5", "flickr30k", "t2i_R@5", "t2i"),
    ("Flickr I->T R@5", "flickr30k", "i2t_R@5", "i2t"),
    ("COCO T->I R@5", "coco", "t2i_R@5", "t2i"),
    ("COCO I->T R@5", "coco", "i2t_R@5", "i2t"),
    ("CIRR R@5", "cirr", "R@5", "cirr"),
    ("FIQ R@10", "fashioniq", "avg_R@10", "fiq"),
    ("I2I-Flickr T->I R@5", "i2i_flickr30k", "t2i_R@5", "t2i"),
    ("I2I-Flickr I->T R@5", "i2i_flickr30k", "i2t_R@5", "i2t"),
    ("STS", "sts", "avg", "sts"),
]
MINI = ["suite.mini.images=32", "suite.mini.cirr_groups=6", "suite.mini.fiq_images=24", "suite.mini.sts_pairs=16"]


def chance(kind: str, k: int, info: dict[str, Any]) -> float:
    """Expected score (x100) of random embeddings for one column, from the benchmark's sizes."""
    if kind == "sts":
        return 0.0
    if kind in ("t2i", "i2t"):
        n_img, n_cap = info["n_images"], info["n_captions"]
        if kind == "t2i":
            return 100.0 * min(k, n_img) / n_img
        c = n_cap / n_img  # captions per image (the i2t hit: any of them in the top k)
        c_int = max(1, round(c))
        miss = math.comb(n_cap - c_int, k) / math.comb(n_cap, k) if n_cap - c_int >= k else 0.0
        return 100.0 * (1 - miss)
    if kind == "cirr":
        return 100.0 * min(k, info["n_gallery"] - 1) / (info["n_gallery"] - 1)
    if kind == "fiq":
        sizes = [v["n_gallery"] for c, v in info.items() if isinstance(v, dict) and "n_gallery" in v]
        return 100.0 * statistics.mean(min(k, n) / n for n in sizes)
    raise ValueError(kind)


def evaluate(out: Path, name: str, prompt: str, seed: int, extra: list[str]) -> dict[str, Any]:
    from e5v.config import compose
    from eval.runner import evaluate as run_eval

    cfg = compose("eval", [
        "backbone=tiny_world", f"prompt={prompt}", "suite=mini", f"paths.output_dir={out}",
        f"paths.data_dir={out / 'data'}", f"suite.mini.seed={seed}", "report.history=null", "progress=false",
        "report.plot=false", *MINI, *extra,
    ])
    res = run_eval(cfg, output_dir=out / name)
    assert res is not None
    return res


def train(out: Path, prompt: str, seed: int, steps: int) -> str:
    from e5v import distributed as D
    from e5v.config import compose
    from e5v.train import train as run_train

    cfg = compose("train", [
        "experiment=tiny_cpu", "backbone=tiny_world", f"prompt={prompt}", f"seed={seed}", f"data.loader.seed={seed}",
        f"trainer.max_steps={steps}", f"paths.output_dir={out}", f"paths.data_dir={out / 'data'}",
        "run_name=replicate", "logger=none", f"trainer.save_every={steps}",
    ])
    try:
        return str(run_train(cfg, out / "train")["adapter"])
    finally:
        D.shutdown()


def summarise(runs: list[dict[str, Any]], settings: list[tuple[str, str]]) -> dict[str, Any]:
    """mean and std over seeds for every (setting, phase, column)."""
    table: dict[str, Any] = {}
    for label, _ in settings:
        for phase in ("before", "after"):
            row = {}
            for col, bench, key, _ in COLUMNS:
                vals = [r[phase][bench][key] for r in runs if r["setting"] == label]
                row[col] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
            avgs = [statistics.mean(r[phase][b][k] for _, b, k, _ in COLUMNS) for r in runs if r["setting"] == label]
            row["avg"] = (statistics.mean(avgs), statistics.stdev(avgs) if len(avgs) > 1 else 0.0)
            table[f"{label} | {phase}"] = row
    return table


def write_outputs(
    out: Path, runs: list[dict[str, Any]], chance_row: dict[str, float], meta: dict[str, Any],
    settings: list[tuple[str, str]],
) -> str:
    table = summarise(runs, settings)
    cols = [c for c, *_ in COLUMNS] + ["avg"]
    lines = [
        "# Mini-world replication of E5-V Table 6 (tiny_world backbone, CPU)",
        "",
        f"Seeds {meta['seeds']}; text-only training: {meta['steps']} steps on mini NLI (global batch 32, LoRA r=8). "
        "Scores x100, mean +- std over seeds.",
        "",
        "| setting | training | " + " | ".join(cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for key, row in table.items():
        setting, phase = key.split(" | ")
        cells = [f"{row[c][0]:.1f} +- {row[c][1]:.1f}" for c in cols]
        lines.append(f"| {setting} | {'none' if phase == 'before' else 'text-only'} | " + " | ".join(cells) + " |")
    lines.append("| chance | - | " + " | ".join(f"{chance_row[c]:.1f}" for c in cols) + " |")
    lines += ["", f"Total time {meta['seconds']:.0f} s.", ""]
    text = "\n".join(lines)
    (out / "table.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"runs": runs, "table": table, "chance": chance_row, **meta},
                                                 indent=2, default=str) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharey=True)
        groups = [("text-image", ["Flickr T->I R@5", "Flickr I->T R@5", "COCO T->I R@5", "COCO I->T R@5"]),
                  ("image-image / composed", ["I2I-Flickr T->I R@5", "I2I-Flickr I->T R@5", "CIRR R@5", "FIQ R@10"]),
                  ("STS", ["STS"])]
        for ax, (title, gcols) in zip(axes, groups):
            x = np.arange(len(settings))
            for j, phase in enumerate(("before", "after")):
                means = [statistics.mean(table[f"{s} | {phase}"][c][0] for c in gcols) for s, _ in settings]
                stds = [statistics.mean(table[f"{s} | {phase}"][c][1] for c in gcols) for s, _ in settings]
                ax.bar(x + (j - 0.5) * 0.38, means, 0.38, yerr=stds, capsize=3,
                       label="zero-shot" if phase == "before" else "after text-only training")
            ax.axhline(statistics.mean(chance_row[c] for c in gcols), color="gray", ls="--", lw=1, label="chance")
            ax.set_xticks(x, [s for s, _ in settings], rotation=15)
            ax.set_title(title)
        axes[0].set_ylabel("score x100 (mean over metrics, seeds)")
        axes[0].legend(fontsize=8)
        fig.suptitle("E5-V claims in the mini world (tiny_world backbone)")
        fig.tight_layout()
        fig.savefig(out / "table.png", dpi=100)
        plt.close(fig)
    except ImportError:
        pass
    return text


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--settings", nargs="+", default=[p for _, p in SETTINGS], help="prompt configs to run")
    ap.add_argument("--out", type=Path, default=Path("outputs/replicate_mini") / time.strftime("%Y-%m-%d_%H-%M-%S"))
    args = ap.parse_args(argv)
    os.environ.setdefault("E5V_NO_PROGRESS", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    runs, chance_row = [], {}
    chosen = [(label, p) for label, p in SETTINGS if p in args.settings]
    for seed in args.seeds:
        for label, prompt in chosen:
            run_dir = out / f"seed{seed}" / prompt
            print(f"[seed {seed}] {label}: zero-shot eval, text-only training, eval", flush=True)
            before = evaluate(run_dir, "before", prompt, seed, [])
            adapter = train(run_dir, prompt, seed, args.steps)
            after = evaluate(run_dir, "after", prompt, seed, [f"checkpoint={adapter}"])
            runs.append({"seed": seed, "setting": label, "prompt": prompt,
                         "before": before["metrics"], "after": after["metrics"]})
            if not chance_row:
                info = before["info"]
                chance_row = {c: chance(kind, int(key.split("@")[1]) if "@" in key else 0, info[bench])
                              for c, bench, key, kind in COLUMNS}
                chance_row["avg"] = statistics.mean(chance_row[c] for c, *_ in COLUMNS)
    meta = {"seeds": args.seeds, "steps": args.steps, "seconds": time.time() - t0}
    text = write_outputs(out, runs, chance_row, meta, chosen)
    print()
    print(text)
    print(f"outputs: {out}/table.md, table.png, results.json")
    return {"out": str(out), "runs": runs, "chance": chance_row, "table": summarise(runs, chosen)}


if __name__ == "__main__":
    main()
