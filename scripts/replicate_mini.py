"""Mini-world replication of E5-V's Tables 6 and 7 on a CPU: prompts vs no prompt, before and after
text-only training, and text-only vs image-caption training.

Run:  make replicate-mini     (or: python -m scripts.replicate_mini [--seeds 0 1 2] [--steps 40] [--out DIR]
                                   [--no-table7] [--no-stage2])

Backbone: ``tiny_world`` (the tiny LLaVA-NeXT pretrained on the mini world with the next-token loss;
shipped in ``e5v/assets/tiny_world``). For each seed, the mini suite (text-image both ways, image-image
with rendered captions, composed retrieval, STS; data seed = seed, shared by every setting of the seed)
is evaluated for each prompt setting of Table 6

* last token without prompt (``prompt=none``: the bare input, no chat wrapper),
* generic prompt (``prompt=generic_llama3``: chat wrapper, no "in one word" instruction),
* E5-V prompts (``prompt=e5v_llama3``),

zero-shot and after training on mini NLI TEXT triplets with that prompt's training template
(training seed = seed). Table 7: the E5-V prompts are also trained on mini-world IMAGE-CAPTION pairs
(``data=mini_pairs``, LLaVA-Pretrain's format; images never in the evaluation) for the same steps.
The E5-V prompt runs also evaluate MMEB-mini (MMEB-V1's four meta-tasks in the mini world,
:mod:`e5v.mini.mmeb_data`): does text-only training move MMEB, as the paper finds for its own benchmarks?

Stage 2 (``--no-stage2`` skips it): from each seed's E5-V text-only adapter, ``experiment=stage2_tiny`` on the
seed's mini MMEB-train (:mod:`e5v.mini.stage2_data`: training scenes with two objects, disjoint from MMEB-mini's
three-object scenes and every other evaluation set) three ways, the same steps and seed: in-batch negatives only;
with :data:`MINE_K` hard negative per row mined by the stage-1 adapter (``e5v-mine``, :func:`mine_negatives`);
with the Matryoshka loss (``loss.matryoshka_dims`` :data:`MATRYOSHKA_DIMS`). Each is evaluated on MMEB-mini only
(the in-batch and Matryoshka models also on their first :data:`EVAL_DIMS` coordinates); claims 6a-6c.

Writes to --out: table.md (laid out like the paper's tables, mean +- std over seeds, with each
metric's chance level, and every claim answered with per-seed differences), results.json, table.png
(and stage2.png with stage 2). ``--record`` also copies them to docs/ (docs/replication_results.json is what
the slow test's margins come from; docs/img/replicate_mini.png, replicate_mini_stage2.png).

Tested by ``.venv/bin/python -m pytest -q tests/test_replicate_mini.py`` (``-m slow`` for the reduced re-run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

SETTINGS = [  # (label, prompt config)
    ("last token, no prompt", "none"),
    ("generic prompt", "generic_llama3"),
    ("E5-V prompts", "e5v_llama3"),
]
# phases: zero-shot, after text-only training, after image-caption training (Table 7, E5-V prompts only)
PHASES = {"before": "none (zero-shot)", "after": "text-only (NLI)", "pairs": "image-caption pairs"}
# stage 2 (E5-V prompt only, MMEB-mini only): continued from the seed's text-only ("after") adapter on mini MMEB-train
STAGE2_PHASES = {"stage2": "stage 2, in-batch negatives", "stage2_mined": "stage 2, + 1 mined hard negative",
                 "stage2_mrl": "stage 2, Matryoshka [16, 32]"}
PAIRS_PROMPT = "e5v_llama3"
# (column label, benchmark, metric); each metric's chance level comes with the results (Benchmark.chance)
COLUMNS = [
    ("Flickr T->I R@5", "flickr30k", "t2i_R@5"),
    ("Flickr I->T R@5", "flickr30k", "i2t_R@5"),
    ("COCO T->I R@5", "coco", "t2i_R@5"),
    ("COCO I->T R@5", "coco", "i2t_R@5"),
    ("CIRR R@5", "cirr", "R@5"),
    ("FIQ R@10", "fashioniq", "avg_R@10"),
    ("I2I-Flickr T->I R@5", "i2i_flickr30k", "t2i_R@5"),
    ("I2I-Flickr I->T R@5", "i2i_flickr30k", "i2t_R@5"),
    ("STS", "sts", "avg"),
]
# MMEB-mini (e5v.mini.mmeb_data: 13 tasks in MMEB-V1's layout, Hit@1 on each query's own candidates), its own
# table: the columns above and their "avg" stay the paper's benchmarks. Evaluated for the MMEB_PROMPTS settings.
MMEB_COLUMNS = [
    ("MMEB-mini overall", "mmeb", "overall/hit@1"),
    ("MMEB-mini classification", "mmeb", "classification/hit@1"),
    ("MMEB-mini VQA", "mmeb", "vqa/hit@1"),
    ("MMEB-mini retrieval", "mmeb", "retrieval/hit@1"),
    ("MMEB-mini grounding", "mmeb", "grounding/hit@1"),
]
# MMEB-mini overall on the first k coordinates (eval.dims: the same vectors cut and re-normalised); the stage-2
# in-batch and Matryoshka models are scored at every EVAL_DIMS size below tiny_world's width (128)
EVAL_DIMS = [16, 32, 64]
MATRYOSHKA_DIMS = [16, 32]  # the Matryoshka loss' prefixes (the full width is added by the trainer)
DIM_COLUMNS = [(f"MMEB-mini overall @{k}", f"mmeb@{k}", "overall/hit@1") for k in EVAL_DIMS]
MMEB_PROMPTS = ("e5v_llama3",)  # the claim's setting; the others skip MMEB-mini (time: 21 evaluations in all)
GROUPS = {  # the claims' metric groups (means of columns)
    "avg": [c for c, *_ in COLUMNS],
    "text-image": ["Flickr T->I R@5", "Flickr I->T R@5", "COCO T->I R@5", "COCO I->T R@5"],
    "composed": ["CIRR R@5", "FIQ R@10"],
    "image-image": ["I2I-Flickr T->I R@5", "I2I-Flickr I->T R@5"],
    "STS": ["STS"],
    "MMEB-mini": ["MMEB-mini overall"],
    **{f"MMEB-mini@{k}": [f"MMEB-mini overall @{k}"] for k in EVAL_DIMS},
}
# Suite sizes: 64 Flickr/COCO-style images (5-7 captions each), 12 CIRR groups (48 queries),
# 32 FashionIQ images per category, 32 STS pairs per subset; MMEB-mini: 16 queries per task (208 in all),
# 8 candidates per retrieval / grounding query (about 9 s more per E5-V evaluation on 2 quiet cores).
MINI = ["suite.mini.images=64", "suite.mini.cirr_groups=12", "suite.mini.fiq_images=32", "suite.mini.sts_pairs=32",
        "suite.mini.mmeb_queries=16", "suite.mini.mmeb_candidates=8"]
# the suite's benchmarks but mmeb, in suite/paper.yaml's order (the settings that skip MMEB-mini)
PAPER_BENCHMARKS = ["flickr30k", "coco", "i2i_flickr30k", "i2i_coco", "cirr", "cirr_test1", "fashioniq", "sts"]
TRAIN_STEPS = 40
STAGE2_PROMPT = "e5v_llama3"  # stage 2 continues this prompt's stage-1 (text-only NLI) adapter
MINE_K = 1
MINE_RATIO: float | None = None  # no score-ratio filter: see docs/replication.md "Stage 2" (evidence on tiny_world)
# (claim, metric group, (setting, phase) minus (setting, phase)); "chance" is the chance row.
CLAIMS = [
    ("1a zero-shot: E5-V prompts vs no prompt", "avg", ("e5v_llama3", "before"), ("none", "before")),
    ("1b zero-shot: E5-V prompts vs chance", "avg", ("e5v_llama3", "before"), ("chance", "")),
    ("1c zero-shot: E5-V prompts vs no prompt, text-image", "text-image", ("e5v_llama3", "before"), ("none", "before")),
    ("1d zero-shot: E5-V prompts vs no prompt, composed", "composed", ("e5v_llama3", "before"), ("none", "before")),
    ("1e zero-shot: E5-V prompts vs generic prompt", "avg", ("e5v_llama3", "before"), ("generic_llama3", "before")),
    ("2a text-only training (E5-V): text-image", "text-image", ("e5v_llama3", "after"), ("e5v_llama3", "before")),
    ("2b text-only training (E5-V): composed", "composed", ("e5v_llama3", "after"), ("e5v_llama3", "before")),
    ("2c text-only training (E5-V): image-image", "image-image", ("e5v_llama3", "after"), ("e5v_llama3", "before")),
    ("2d text-only training (E5-V): STS", "STS", ("e5v_llama3", "after"), ("e5v_llama3", "before")),
    ("3a after training: E5-V prompts vs no prompt", "avg", ("e5v_llama3", "after"), ("none", "after")),
    ("3b after training: E5-V prompts vs generic prompt", "avg", ("e5v_llama3", "after"), ("generic_llama3", "after")),
    ("4a Table 7: text-only vs image-caption training", "avg", ("e5v_llama3", "after"), ("e5v_llama3", "pairs")),
    ("4b Table 7: image-caption training vs zero-shot", "avg", ("e5v_llama3", "pairs"), ("e5v_llama3", "before")),
    ("5a text-only training (E5-V) moves MMEB-mini overall", "MMEB-mini", ("e5v_llama3", "after"),
     ("e5v_llama3", "before")),
    ("5c zero-shot: E5-V prompts vs chance, MMEB-mini overall", "MMEB-mini", ("e5v_llama3", "before"), ("chance", "")),
    ("5b Table 7 on MMEB-mini: image-caption vs text-only training", "MMEB-mini", ("e5v_llama3", "pairs"),
     ("e5v_llama3", "after")),
    ("6a stage 2 (in-batch) over stage 1 alone, MMEB-mini overall", "MMEB-mini", ("e5v_llama3", "stage2"),
     ("e5v_llama3", "after")),
    ("6b stage 2: mined hard negatives vs in-batch only, MMEB-mini overall", "MMEB-mini",
     ("e5v_llama3", "stage2_mined"), ("e5v_llama3", "stage2")),
    ("6c stage 2: Matryoshka vs plain, MMEB-mini overall at 16 dims", "MMEB-mini@16", ("e5v_llama3", "stage2_mrl"),
     ("e5v_llama3", "stage2")),
]


def evaluate(run_dir: Path, name: str, data_dir: Path, overrides: list[str],
             on_benchmark: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """The mini suite (``suite=mini`` at the :data:`MINI` sizes, data in ``data_dir``, no history line) into
    ``run_dir/name``; ``overrides`` choose the backbone, prompt, checkpoint ... (:mod:`scripts.demo` uses it too;
    ``on_benchmark``: see :func:`eval.runner.evaluate`)."""
    from e5v.config import compose
    from eval.runner import evaluate as run_eval

    cfg = compose("eval", [
        "suite=mini", f"paths.output_dir={run_dir}", f"paths.data_dir={data_dir}", "report.history=null",
        "progress=false", *MINI, *overrides,
    ])
    res = run_eval(cfg, output_dir=run_dir / name, on_benchmark=on_benchmark)
    assert res is not None
    return res


def train(out_dir: Path, overrides: list[str], experiment: str = "tiny_cpu") -> dict[str, Any]:
    """``experiment=tiny_cpu`` (or ``experiment``, e.g. ``stage2_tiny``) training (DeepSpeed, gloo on CPU) with
    ``overrides`` into ``out_dir``; returns its summary (steps, final loss, adapter). :mod:`scripts.demo` uses it
    too."""
    from e5v import distributed as D
    from e5v.config import compose
    from e5v.train import train as run_train

    cfg = compose("train", [f"experiment={experiment}", *overrides])
    try:
        return run_train(cfg, out_dir)
    finally:
        D.shutdown()


def train_setting(train_dir: Path, prompt: str, seed: int, steps: int, data_dir: Path, data: str = "mini_nli") -> str:
    """Text-only (``mini_nli``) or image-caption (``mini_pairs``) training of tiny_world; returns the adapter."""
    return str(train(train_dir, [
        "backbone=tiny_world", f"prompt={prompt}", f"data={data}", f"seed={seed}", f"data.loader.seed={seed}",
        f"trainer.max_steps={steps}", f"paths.output_dir={train_dir}", f"paths.data_dir={data_dir}",
        "run_name=replicate", "logger=none", f"trainer.save_every={steps}",
    ])["adapter"])


# ---------------------------------------------------------------------------------------- stage 2
def stage2_overrides(train_dir: Path, init_from: str, seed: int, steps: int, data_dir: Path) -> list[str]:
    """``experiment=stage2_tiny`` on tiny_world with the E5-V prompt (instruction kept, as the experiment sets),
    continuing the seed's stage-1 adapter, on the seed's mini MMEB-train (in-batch negatives only)."""
    return [
        "backbone=tiny_world", f"prompt={STAGE2_PROMPT}", "prompt.mmeb.instruction=keep", f"lora.init_from={init_from}",
        f"seed={seed}", f"data.loader.seed={seed}", f"trainer.max_steps={steps}", f"paths.output_dir={train_dir}",
        f"paths.data_dir={data_dir}", "run_name=replicate", "logger=none", f"trainer.save_every={steps}",
    ]


def train_stage2(train_dir: Path, init_from: str, seed: int, steps: int, data_dir: Path,
                 extra: list[str] | None = None) -> str:
    """One stage-2 run (:func:`stage2_overrides` + ``extra``); returns its adapter."""
    return str(train(train_dir, [*stage2_overrides(train_dir, init_from, seed, steps, data_dir), *(extra or [])],
                     experiment="stage2_tiny")["adapter"])


def mine_negatives(out_dir: Path, checkpoint: str, seed: int, data_dir: Path, k: int | None = None,
                   ratio: float | None | str = "default") -> dict[str, Any]:
    """``e5v-mine`` with the stage-1 adapter over the seed's mini MMEB-train (E5-V prompt, instruction kept as
    stage 2 renders it), :data:`MINE_K` negatives per row at ``max_score_ratio`` :data:`MINE_RATIO`; returns the
    provenance record (per-dataset counts)."""
    from e5v.config import compose
    from eval.mining import mine

    r = MINE_RATIO if ratio == "default" else ratio

    cfg = compose("mine", [
        "data=mini_mmeb_train", "backbone=tiny_world", f"checkpoint={checkpoint}", f"prompt={STAGE2_PROMPT}",
        "prompt.mmeb.instruction=keep", f"paths.data_dir={data_dir}", f"data.loader.seed={seed}", f"k={MINE_K if k is None else k}",
        f"max_score_ratio={'null' if r is None else r}", "progress=false",
    ])
    rec = mine(cfg, out_dir)
    assert rec is not None
    return rec


def dim_metrics(res: dict[str, Any]) -> dict[str, Any]:
    """An evaluation's MMEB-mini prefix scores (results.json ``matryoshka``) as ``{"mmeb@16": {metric: value}}``."""
    per_dim = (res.get("matryoshka") or {}).get("metrics") or {}
    return {f"{bench}@{k}": vals for k, benches in per_dim.items() for bench, vals in benches.items()
            if bench == "mmeb"}


def run_stage2(run_dir: Path, label: str, seed: int, steps: int, data_dir: Path, stage1: str,
               log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Stage 2 of one seed from its stage-1 adapter ``stage1``: in-batch only, with mined hard negatives (mined by
    ``stage1``), with the Matryoshka loss; each evaluated on MMEB-mini (the in-batch and Matryoshka models also
    at :data:`EVAL_DIMS`). The stage-2 adapters are evaluated with the prompt recorded with them (instruction
    kept, as they were trained)."""
    setting = ["backbone=tiny_world", f"suite.mini.seed={seed}", "report.plot=false", "benchmarks=[mmeb]"]
    dims = f"matryoshka_dims=[{','.join(map(str, EVAL_DIMS))}]"
    out = []

    def one(phase: str, adapter: str, extra: list[str], mined: dict[str, Any] | None = None) -> None:
        res = evaluate(run_dir, phase, data_dir, [*setting, f"checkpoint={adapter}", *extra])
        run = {"seed": seed, "prompt": STAGE2_PROMPT, "setting": label, "phase": phase,
               "metrics": {**res["metrics"], **dim_metrics(res)}}
        if res.get("matryoshka"):
            run["width"] = res["matryoshka"]["width"]
        if mined is not None:
            run["mined"] = mined
        out.append(run)

    log(f"seed {seed}, stage 2 in-batch ({steps} steps from the text-only adapter)")
    one("stage2", train_stage2(run_dir / "train_stage2", stage1, seed, steps, data_dir), [dims])
    log(f"seed {seed}, mining {MINE_K} hard negative(s) per row with the text-only adapter")
    rec = mine_negatives(run_dir / "mined", stage1, seed, data_dir)
    counts = {name: {k: d[k] for k in ("rows", "short_rows", "dropped_equal", "dropped_ratio")}
              for name, d in rec["per_dataset"].items()}
    log(f"seed {seed}, stage 2 with the mined negatives ({steps} steps)")
    mined = ["data.loader.mined=" + str(run_dir / "mined"), f"data.loader.mined_k={MINE_K}",
             f"data.negatives_per_query={MINE_K}"]
    one("stage2_mined", train_stage2(run_dir / "train_stage2_mined", stage1, seed, steps, data_dir, mined), [],
        mined=counts)
    log(f"seed {seed}, stage 2 with the Matryoshka loss {MATRYOSHKA_DIMS} ({steps} steps)")
    mrl = [f"loss.matryoshka_dims=[{','.join(map(str, MATRYOSHKA_DIMS))}]"]
    one("stage2_mrl", train_stage2(run_dir / "train_stage2_mrl", stage1, seed, steps, data_dir, mrl), [dims])
    return out


# ---------------------------------------------------------------------------------------- numbers
def column(metrics: dict[str, Any], col: str) -> float:
    _, bench, key = next(c for c in COLUMNS + MMEB_COLUMNS + DIM_COLUMNS if c[0] == col)
    return float(metrics[bench][key])


def has_columns(metrics: dict[str, Any], cols: list[str]) -> bool:
    """Whether a run measured every column of ``cols`` (MMEB-mini runs only for :data:`MMEB_PROMPTS`, and
    records made before it have none)."""
    spec = {c: (bench, key) for c, bench, key in COLUMNS + MMEB_COLUMNS + DIM_COLUMNS}
    return all(spec[c][1] in metrics.get(spec[c][0], {}) for c in cols)


def chance_row(results: dict[str, Any]) -> dict[str, float]:
    """Each column's chance level, as the evaluation recorded it (results.json ``chance``), and their mean
    ("avg": the paper's benchmarks only); MMEB-mini's columns when the evaluation ran it."""
    row = {c: float(results["chance"][bench][key]) for c, bench, key in COLUMNS}
    row["avg"] = statistics.mean(row[c] for c, *_ in COLUMNS)
    mmeb = results["chance"].get("mmeb", {})
    row.update({c: float(mmeb[key]) for c, _, key in MMEB_COLUMNS if key in mmeb})
    return row


def group_value(runs: list[dict[str, Any]], chance: dict[str, float], seed: int, prompt: str, phase: str,
                group: str) -> float | None:
    cols = GROUPS[group]
    if prompt == "chance":
        return statistics.mean(chance[c] for c in cols) if all(c in chance for c in cols) else None
    run = next((r for r in runs if (r["seed"], r["prompt"], r["phase"]) == (seed, prompt, phase)), None)
    if run is None or not has_columns(run["metrics"], cols):
        return None
    return statistics.mean(column(run["metrics"], c) for c in cols)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def claims(runs: list[dict[str, Any]], chance: dict[str, float]) -> list[dict[str, Any]]:
    """Each claim's difference per seed, mean, sd, min. ``holds``: positive for every seed AND the mean
    is more than two standard deviations above zero (one seed: positive)."""
    out = []
    for name, group, a, b in CLAIMS:
        diffs = {}
        for seed in sorted({r["seed"] for r in runs}):
            va, vb = group_value(runs, chance, seed, *a, group), group_value(runs, chance, seed, *b, group)
            if va is not None and vb is not None:
                diffs[seed] = va - vb
        if not diffs:
            continue
        mean, sd = _mean_sd(list(diffs.values()))
        out.append({"claim": name, "metric": group, "a": list(a), "b": list(b), "per_seed": diffs, "mean": mean,
                    "sd": sd, "min": min(diffs.values()), "holds": min(diffs.values()) > 0 and mean > 2 * sd})
    return out


def table_rows(runs: list[dict[str, Any]], chosen: list[tuple[str, str]]) -> list[tuple[str, str, dict[str, Any]]]:
    """(setting label, training label, {column: (mean, sd)}) in the paper's order."""
    rows = []
    for label, prompt in chosen:
        for phase in PHASES:
            sel = [r for r in runs if r["prompt"] == prompt and r["phase"] == phase]
            if not sel:
                continue
            cells = {c: _mean_sd([column(r["metrics"], c) for r in sel]) for c, *_ in COLUMNS}
            cells["avg"] = _mean_sd([statistics.mean(column(r["metrics"], c) for c, *_ in COLUMNS) for r in sel])
            rows.append((label, PHASES[phase], cells))
    return rows


def mmeb_rows(runs: list[dict[str, Any]], chosen: list[tuple[str, str]]) -> list[tuple[str, str, dict[str, Any]]]:
    """MMEB-mini's table: (setting label, training label, {column: (mean, sd)}) for the runs that have it."""
    cols = [c for c, *_ in MMEB_COLUMNS]
    rows = []
    phases = {**PHASES, **STAGE2_PHASES}
    for label, prompt in chosen:
        for phase in phases:
            sel = [r for r in runs if r["prompt"] == prompt and r["phase"] == phase and has_columns(r["metrics"], cols)]
            if sel:
                rows.append((label, phases[phase], {c: _mean_sd([column(r["metrics"], c) for r in sel]) for c in cols}))
    return rows


def dim_rows(runs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """MMEB-mini overall by embedding size: (training label, {"16": (mean, sd), ..., "full": (mean, sd)}) for the
    runs scored at every :data:`EVAL_DIMS` size (the stage-2 in-batch and Matryoshka models)."""
    cols = [c for c, *_ in DIM_COLUMNS]
    phases = {**PHASES, **STAGE2_PHASES}
    rows = []
    for phase, training in phases.items():
        sel = [r for r in runs if r["phase"] == phase and has_columns(r["metrics"], [*cols, "MMEB-mini overall"])]
        if sel:
            cells = {str(k): _mean_sd([column(r["metrics"], c) for r in sel]) for k, c in zip(EVAL_DIMS, cols)}
            cells["full"] = _mean_sd([column(r["metrics"], "MMEB-mini overall") for r in sel])
            rows.append((training, cells))
    return rows


# ---------------------------------------------------------------------------------------- outputs
def write_outputs(out: Path, runs: list[dict[str, Any]], chance: dict[str, float], meta: dict[str, Any],
                  chosen: list[tuple[str, str]]) -> str:
    rows = table_rows(runs, chosen)
    found = claims(runs, chance)
    cols = [c for c, *_ in COLUMNS] + ["avg"]
    lines = [
        "# Mini-world replication of E5-V Tables 6 and 7 (tiny_world backbone, CPU)",
        "",
        f"Seeds {meta['seeds']}; training: {meta['steps']} steps (global batch 32, LoRA r=8) on mini NLI text "
        "triplets or, for Table 7, mini image-caption pairs. Scores x100, mean +- std over seeds.",
        "",
        "| setting | training | " + " | ".join(cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for label, training, cells in rows:
        lines.append(f"| {label} | {training} | " + " | ".join(f"{cells[c][0]:.1f} +- {cells[c][1]:.1f}" for c in cols) + " |")
    lines.append("| chance | - | " + " | ".join(f"{chance[c]:.1f}" for c in cols) + " |")
    mrows = mmeb_rows(runs, chosen)
    if mrows:
        mcols = [c for c, *_ in MMEB_COLUMNS]
        lines += ["", "## MMEB-mini (Hit@1 x100 on each query's own candidate list; chance = mean of 1/len(candidates))",
                  "", "| setting | training | " + " | ".join(c.removeprefix("MMEB-mini ") for c in mcols) + " |",
                  "|---|---|" + "---|" * len(mcols)]
        for label, training, cells in mrows:
            lines.append(f"| {label} | {training} | "
                         + " | ".join(f"{cells[c][0]:.1f} +- {cells[c][1]:.1f}" for c in mcols) + " |")
        if all(c in chance for c in mcols):
            lines.append("| chance | - | " + " | ".join(f"{chance[c]:.1f}" for c in mcols) + " |")
    drows = dim_rows(runs)
    if drows:
        width = next((r["width"] for r in runs if "width" in r), "full")
        lines += ["", "## MMEB-mini overall by embedding size (first k coordinates, re-normalised; Hit@1 x100)", "",
                  "| training | " + " | ".join(f"{k} dims" for k in EVAL_DIMS) + f" | {width} dims (full) |",
                  "|---|" + "---|" * (len(EVAL_DIMS) + 1)]
        for training, cells in drows:
            lines.append(f"| {training} | " + " | ".join(f"{m:.1f} +- {sd:.1f}" for m, sd in cells.values()) + " |")
    lines += ["", "## Claims (difference of the metric group's mean score; holds = positive in every seed and mean > 2 sd)", "",
              "| claim | metric | per seed | mean +- sd | holds |", "|---|---|---|---|---|"]
    for c in found:
        per = ", ".join(f"{v:+.1f}" for v in c["per_seed"].values())
        lines.append(f"| {c['claim']} | {c['metric']} | {per} | {c['mean']:+.1f} +- {c['sd']:.1f} | "
                     f"{'yes' if c['holds'] else '**no**'} |")
    total = f"Total time {meta['seconds']:.0f} s"
    if meta.get("stage2"):
        total += f" (stage 2: {meta['stage2']['seconds']:.0f} s)"
    if meta.get("load"):
        total += f"; load average {meta['load']['start'][0]:.1f} at the start, {meta['load']['end'][0]:.1f} at the end"
    lines += ["", total + ".", ""]
    text = "\n".join(lines)
    (out / "table.md").write_text(text)
    payload = {"runs": runs, "chance": chance, "claims": found,
               "table": [{"setting": l, "training": t, "cells": c} for l, t, c in rows],
               "mmeb_table": [{"setting": l, "training": t, "cells": c} for l, t, c in mrows],
               "dims_table": [{"training": t, "cells": c} for t, c in drows], **meta}
    (out / "results.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    plot(out / "table.png", runs, chance, chosen)
    if drows:
        plot_stage2(out / "stage2.png", runs, chance, drows)
    return text


def plot(path: Path, runs: list[dict[str, Any]], chance: dict[str, float], chosen: list[tuple[str, str]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return
    seeds = sorted({r["seed"] for r in runs})
    panels = ["text-image", "composed", "image-image", "STS"]
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 4.2), sharey=True)
    colours = {"before": "#9ecae1", "after": "#3182bd", "pairs": "#fd8d3c"}
    present = [ph for ph in PHASES if any(r["phase"] == ph for r in runs)]
    width = 0.8 / len(present)
    for ax, group in zip(axes, panels):
        x = np.arange(len(chosen))
        for j, phase in enumerate(present):
            means, sds, xs = [], [], []
            for i, (_, prompt) in enumerate(chosen):
                vals = [v for s in seeds if (v := group_value(runs, chance, s, prompt, phase, group)) is not None]
                if vals:
                    m, sd = _mean_sd(vals)
                    means.append(m), sds.append(sd), xs.append(x[i] + (j - (len(present) - 1) / 2) * width)
            if means:
                ax.bar(xs, means, width, yerr=sds, capsize=3, color=colours[phase], label=PHASES[phase])
        ax.axhline(statistics.mean(chance[c] for c in GROUPS[group]), color="gray", ls="--", lw=1, label="chance")
        ax.set_xticks(x, [label for label, _ in chosen], rotation=15)
        ax.set_title(f"{group} ({', '.join(GROUPS[group]) if group != 'STS' else 'Spearman'})", fontsize=8)
    axes[0].set_ylabel(f"score x100 (mean +- sd over {len(seeds)} seed(s))")
    axes[0].legend(fontsize=7, title="training", title_fontsize=7)
    fig.suptitle("E5-V's claims in the mini world (tiny_world backbone): prompts and text-only training")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_stage2(path: Path, runs: list[dict[str, Any]], chance: dict[str, float],
                drows: list[tuple[str, dict[str, Any]]]) -> None:
    """Stage 2 on MMEB-mini: overall Hit@1 per training (stage 1, stage 2 in-batch / mined / Matryoshka) and
    overall by embedding size for the models scored at every size."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    seeds = sorted({r["seed"] for r in runs})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    phases = [("after", PHASES["after"])] + list(STAGE2_PHASES.items())
    bars = []
    for phase, training in phases:
        vals = [v for s in seeds if (v := group_value(runs, chance, s, STAGE2_PROMPT, phase, "MMEB-mini")) is not None]
        if vals:
            bars.append((training.replace(", ", ",\n"), *_mean_sd(vals)))
    ax1.bar(range(len(bars)), [m for _, m, _ in bars], yerr=[sd for *_, sd in bars], capsize=3, color="#3182bd")
    ax1.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=7)
    if "MMEB-mini overall" in chance:
        ax1.axhline(chance["MMEB-mini overall"], color="gray", ls="--", lw=1, label="chance")
        ax1.legend(fontsize=7)
    ax1.set_ylabel(f"MMEB-mini overall Hit@1 x100 (mean +- sd, {len(seeds)} seed(s))")
    ax1.set_title("stage 1 (text-only NLI) and stage 2 (mini MMEB-train)", fontsize=9)
    for training, cells in drows:
        xs = list(range(len(cells)))
        ax2.errorbar(xs, [m for m, _ in cells.values()], yerr=[sd for _, sd in cells.values()], capsize=3,
                     marker="o", label=training)
        ax2.set_xticks(xs, [k for k in cells])
    ax2.set_xlabel("embedding size (first k coordinates)")
    ax2.set_title("MMEB-mini overall by embedding size", fontsize=9)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=TRAIN_STEPS, help="training steps per run")
    ap.add_argument("--settings", nargs="+", default=[p for _, p in SETTINGS], help="prompt configs to run")
    ap.add_argument("--no-table7", action="store_true", help="skip the image-caption training runs")
    ap.add_argument("--no-stage2", action="store_true",
                    help="skip stage 2 (mining + three stage-2 runs on mini MMEB-train, MMEB-mini; claims 6a-6c)")
    ap.add_argument("--out", type=Path, default=Path("outputs/replicate_mini") / time.strftime("%Y-%m-%d_%H-%M-%S"))
    ap.add_argument("--record", action="store_true",
                    help="also copy results.json and table.png into docs/ (replication_results.json, img/)")
    ap.add_argument("--from-results", type=Path, default=None,
                    help="re-write table.md/png and the claims from an earlier results.json (no runs)")
    args = ap.parse_args(argv)
    if args.from_results:
        return rewrite(args.from_results, args.out.resolve(), args.record)
    unknown = sorted(set(args.settings) - {p for _, p in SETTINGS})
    if unknown:
        ap.error(f"unknown setting(s) {unknown}: choose from {[p for _, p in SETTINGS]}")
    os.environ.setdefault("E5V_NO_PROGRESS", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    out = args.out.resolve()
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty; pass a new --out")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    load_start = os.getloadavg()  # the machine's load (1, 5, 15 min) at the start and end, recorded with the time
    chosen = [(label, p) for label, p in SETTINGS if p in args.settings]
    runs: list[dict[str, Any]] = []
    chance: dict[str, float] = {}
    stage2_seconds = 0.0

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.0f} s] {msg}", flush=True)

    for seed in args.seeds:
        seed_dir = out / f"seed{seed}"
        data_dir = seed_dir / "data"  # one mini world per seed, shared by every setting
        for label, prompt in chosen:
            run_dir = seed_dir / prompt
            setting = ["backbone=tiny_world", f"prompt={prompt}", f"suite.mini.seed={seed}", "report.plot=false"]
            if prompt not in MMEB_PROMPTS:
                setting.append(f"benchmarks=[{','.join(PAPER_BENCHMARKS)}]")
            log(f"seed {seed}, {label}: zero-shot eval")
            before = evaluate(run_dir, "before", data_dir, setting)
            chance = {**chance_row(before), **chance}
            log(f"seed {seed}, {label}: text-only training ({args.steps} steps)")
            adapter = train_setting(run_dir / "train", prompt, seed, args.steps, data_dir)
            after = evaluate(run_dir, "after", data_dir, [*setting, f"checkpoint={adapter}"])
            adapter_after = adapter
            runs += [{"seed": seed, "prompt": prompt, "setting": label, "phase": "before", "metrics": before["metrics"]},
                     {"seed": seed, "prompt": prompt, "setting": label, "phase": "after", "metrics": after["metrics"]}]
            if prompt == PAIRS_PROMPT and not args.no_table7:
                log(f"seed {seed}, {label}: image-caption training ({args.steps} steps, Table 7)")
                adapter = train_setting(run_dir / "train_pairs", prompt, seed, args.steps, data_dir, data="mini_pairs")
                pairs = evaluate(run_dir, "after_pairs", data_dir, [*setting, f"checkpoint={adapter}"])
                runs.append({"seed": seed, "prompt": prompt, "setting": label, "phase": "pairs",
                             "metrics": pairs["metrics"]})
            if prompt == STAGE2_PROMPT and not args.no_stage2:
                t2 = time.time()
                runs += run_stage2(run_dir, label, seed, args.steps, data_dir, adapter_after, log)
                stage2_seconds += time.time() - t2
    meta = {"seeds": args.seeds, "steps": args.steps, "suite": MINI, "seconds": time.time() - t0,
            "load": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()],
                     "cpus": os.cpu_count()},
            "stage2": None if args.no_stage2 or STAGE2_PROMPT not in args.settings else {
                "experiment": "stage2_tiny", "data": "mini_mmeb_train", "mine_k": MINE_K,
                "max_score_ratio": MINE_RATIO, "matryoshka_dims": MATRYOSHKA_DIMS, "eval_dims": EVAL_DIMS,
                "seconds": stage2_seconds},
            "command": "python -m scripts.replicate_mini " + " ".join(argv if argv is not None else sys.argv[1:])}
    text = write_outputs(out, runs, chance, meta, chosen)
    print()
    print(text)
    print(f"outputs: {out}/table.md, table.png, results.json")
    if args.record:
        record(out)
    return {"out": str(out), "runs": runs, "chance": chance, "claims": claims(runs, chance)}


def record(out: Path) -> None:
    shutil.copyfile(out / "results.json", REPO / "docs" / "replication_results.json")
    shutil.copyfile(out / "table.png", REPO / "docs" / "img" / "replicate_mini.png")
    print("recorded: docs/replication_results.json, docs/img/replicate_mini.png")
    if (out / "stage2.png").is_file():
        shutil.copyfile(out / "stage2.png", REPO / "docs" / "img" / "replicate_mini_stage2.png")
        print("recorded: docs/img/replicate_mini_stage2.png")


def rewrite(results: Path, out: Path, do_record: bool) -> dict[str, Any]:
    """Table, plot and claims again from a results.json (e.g. after changing how claims are judged)."""
    rec = json.loads(results.read_text())
    meta = {k: rec[k] for k in ("seeds", "steps", "suite", "seconds", "load", "stage2", "command") if k in rec}
    prompts = {r["prompt"] for r in rec["runs"]}
    chosen = [(label, p) for label, p in SETTINGS if p in prompts]
    out.mkdir(parents=True, exist_ok=True)
    text = write_outputs(out, rec["runs"], rec["chance"], meta, chosen)
    print(text)
    if do_record:
        record(out)
    return {"out": str(out), "runs": rec["runs"], "chance": rec["chance"], "claims": claims(rec["runs"], rec["chance"])}


if __name__ == "__main__":
    main()
