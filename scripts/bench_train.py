"""Training throughput: samples/s, tokens/s, MFU and peak memory per step, plain vs GradCache, padded vs packed.

  python -m scripts.bench_train                                   # stage 1 (mini NLI), tiny backbone on CPU
  python -m scripts.bench_train --data stage2                     # stage 2 (mini MMEB-train), tiny backbone on CPU
  python -m scripts.bench_train --backbone llava_next_8b_shape --global-batch 768 --micro 32 \\
      --precision bf16 --activation-checkpointing --rounds 1      # one GPU, LoRA r=64 (GPU check)

Data (``--data``): ``stage1`` trains on mini NLI triplets (``experiment=tiny_cpu``: anchor, positive, hard
negative, all text); ``stage2`` on the mini MMEB-train mixture (``experiment=stage2_tiny lora.init_from=null``:
image queries, image + text queries, text queries; image, text and crop positives; homogeneous sub-batches of
one subset each), generated once per run into ``--data-dir`` (default: a temporary folder) before any timing.

All variants run in this process through the real ``Trainer`` (DeepSpeed ZeRO-2, LoRA) on the same
machine: "plain" takes one forward of --micro rows per optimizer step (the largest batch that fits
without GradCache), "grad_cache" reaches --global-batch per step in chunks of --micro; "plain_packed"
and "grad_cache_packed" are the same with packed batches (``trainer.packing=true``: each forward's rows
packed without padding, image batches included where the backbone packs them; the others run
``trainer.packing=false``). Each round builds a fresh trainer per variant and times --steps steps after
--warmup; the variant order is reversed every other round, so a slow first build (DeepSpeed op
compilation, cold caches, a neighbour's load) does not fall on one variant. Figures: median step time over
every timed step. Padded and packed variants of one kind train on the same rows (same seed, same steps).

Token and FLOP counts come from the timed steps' own batches (prepared again after the timing): tokens are
real (non-padding) tokens, counted once per item; padding = the share of the forwards' positions that are
padding (packed: the fill of the packs). FLOPs (:mod:`scripts.benchlib`): MFU uses the 6N convention for the
language model, 3 x its forward FLOPs (matmuls incl. LoRA + causal attention at each item's own length), plus
one forward of the frozen vision tower + projector per real anyres tile (no gradient flows into it). HFU counts
what runs: language model forward + backward of activations (frozen base) = 2 forward-equivalents, +1 with
activation checkpointing (recompute), +1 with GradCache (the no-grad pass, which also runs the vision tower
again). Padding is reported, not credited. Appends to docs/benchmarks.md; $OUT/bench_train.json.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from scripts import benchlib


VARIANTS = ("plain", "grad_cache", "plain_packed", "grad_cache_packed")
#: --data: the experiment and the data each names (module docstring)
DATA = {
    "stage1": "mini NLI triplets (experiment=tiny_cpu)",
    "stage2": "mini MMEB-train mixture (experiment=stage2_tiny, lora.init_from=null)",
}
#: mini MMEB-train subsets (e5v.mini.stage2_data.SUBSETS); rows per subset are sized from the global batch
STAGE2_SUBSETS = 5


def stage2_rows_per_subset(global_batch: int) -> int:
    """Rows per mini MMEB-train subset: the generator's default (256), or enough for two global batches."""
    from e5v.mini.stage2_data import DEFAULT_ROWS

    need = -(-2 * global_batch // STAGE2_SUBSETS)
    return max(DEFAULT_ROWS, -(-need // 8) * 8)


def _overrides(args: argparse.Namespace, grad_cache: bool, tmp: str, packed: bool = False) -> list[str]:
    global_batch = args.global_batch if grad_cache else args.micro
    if args.data == "stage2":
        data = [
            "experiment=stage2_tiny",
            "lora.init_from=null",
            f"paths.data_dir={args.data_dir}",
            f"data.loader.n_rows={stage2_rows_per_subset(args.global_batch)}",
        ]
    else:
        data = [
            "experiment=tiny_cpu",
            f"paths.data_dir={tmp}/data",
            f"data.loader.n_rows={max(2048, 2 * args.global_batch)}",
        ]
    out = [
        *data,
        f"backbone={args.backbone}",
        "logger=none",
        "run_name=bench",
        f"paths.output_dir={tmp}/out",
        f"trainer.global_batch={global_batch}",
        f"trainer.micro_batch={args.micro}",
        f"trainer.grad_cache={str(grad_cache).lower()}",
        f"trainer.precision={args.precision}",
        f"trainer.activation_checkpointing={str(args.activation_checkpointing).lower()}",
        f"trainer.max_steps={args.steps + args.warmup + 1}",
        f"lora.r={args.lora_r}",
        f"lora.alpha={args.lora_alpha}",
        f"trainer.packing={str(packed).lower()}",
    ]
    if packed and args.pack_tokens:
        out.append(f"trainer.pack_tokens={args.pack_tokens}")
    if args.backbone == "llava_next_8b_shape":
        if args.layers:
            out.append(f"backbone.num_hidden_layers={args.layers}")
        out.append(f"backbone.attn_implementation={args.attn}")
    return out


def item_lengths(batch: dict[str, torch.Tensor]) -> list[int]:
    """Real tokens of each item (row) of a model batch: a packed batch's segment lengths, else the attention
    mask's row sums (left padding), else the full width."""
    from e5v import packing

    if packing.LENGTHS in batch:
        return [int(n) for n in batch[packing.LENGTHS].tolist()]
    mask = batch.get("attention_mask")
    if mask is not None:
        return [int(n) for n in mask.sum(1).tolist()]
    return [int(batch["input_ids"].shape[1])] * int(batch["input_ids"].shape[0])


def image_tiles(batch: dict[str, torch.Tensor], processor: Any) -> int:
    """Real anyres tiles of the images of a LLaVA-NeXT batch (the base view + the grid of each image, at most the
    batch's tile slots); padded tile slots do not count."""
    sizes = batch.get("image_sizes")
    if sizes is None:
        return 0
    slots = int(batch["pixel_values"].shape[1]) if batch["pixel_values"].ndim == 5 else 1
    return sum(min(benchlib.anyres_tiles(processor, int(h), int(w)), slots) for h, w in sizes.tolist())


def step_stats(trainer: Any, steps: range, fl: benchlib.LlavaFlops | None = None) -> dict[str, float]:
    """Per-step means over ``steps`` of the batches this rank forwards (each item once, GradCache's second pass
    not counted): real tokens, positions (padding of padded batches, the fill of packed ones included), items,
    items with an image and their real tokens, tiles, and (with ``fl``) the forward FLOPs of the language model
    (each item at its own length) and of the vision tower + projector."""
    keys = ("real", "positions", "items", "image_items", "image_real", "tiles", "lm_fwd", "vision_fwd")
    tot = dict.fromkeys(keys, 0.0)
    for step in steps:
        # prepared here, not in the data workers (no restart): a step's batches are a function of its rows
        for chunk in trainer.batches.prepare_step(step):
            for b in chunk.check().batches:
                lengths = item_lengths(b)
                real = sum(lengths)
                tot["real"] += real
                tot["positions"] += b["input_ids"].numel()
                tot["items"] += len(lengths)
                if "pixel_values" in b:
                    tot["image_items"] += len(lengths)
                    tot["image_real"] += real
                    tiles = image_tiles(b, trainer.processor)
                    tot["tiles"] += tiles
                    if fl is not None:
                        tot["vision_fwd"] += fl.vision_tiles(tiles)
                if fl is not None:
                    tot["lm_fwd"] += sum(fl.lm_sequence(n) for n in lengths)
    n = max(1, len(steps))
    return {k: v / n for k, v in tot.items()}


def run_variant(args: argparse.Namespace, grad_cache: bool, packed: bool = False) -> dict[str, Any]:
    """Build a trainer, time ``args.steps`` optimizer steps after ``args.warmup``; free everything."""
    from e5v import distributed as D
    from e5v.config import compose
    from e5v.train.run_log import peak_memory_gb
    from e5v.train.trainer import Trainer

    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose("train", _overrides(args, grad_cache, tmp, packed))
        D.init_from_env()
        t0 = time.perf_counter()
        trainer = Trainer(cfg, tmp)
        trainer.setup()
        setup_s = time.perf_counter() - t0
        fl = benchlib.LlavaFlops.from_model(trainer.peft_model.base_model.model)
        times: list[float] = []
        tokens: list[int] = []
        pack_tokens = trainer.preparer.pack_tokens if packed else None
        for i in range(args.warmup + args.steps):
            if cuda and i == args.warmup:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            benchlib.sync()
            t = time.perf_counter()
            m = trainer.train_step()
            benchlib.sync()
            dt = time.perf_counter() - t
            trainer.step += 1
            if i >= args.warmup:
                times.append(dt)
                tokens.append(int(m["tokens"]))
        peak = peak_memory_gb()
        # the timed steps' batches, prepared again (outside the timing): tokens, padding, items, FLOPs
        stats = step_stats(trainer, range(args.warmup, args.warmup + args.steps), fl)
        if abs(stats["real"] * len(tokens) - sum(tokens)) > 0.5:  # the same batches, counted twice
            raise RuntimeError(f"the timed steps' batches hold {stats['real'] * len(tokens):.0f} real tokens but "
                               f"the trainer counted {sum(tokens)}: scripts/bench_train.py counts items differently "
                               "from Trainer._forward (packing.real_tokens); fix item_lengths")
        groups = trainer.preparer.groups
        trainer.batches.close()
        engine = trainer.engine
        del trainer
        if hasattr(engine, "destroy"):
            engine.destroy()
        del engine
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return {
        "global_batch": args.global_batch if grad_cache else args.micro,
        "times": times,
        "tokens": tokens,
        "setup_s": setup_s,
        "peak_mem_gb": peak,
        "padding": 1.0 - stats["real"] / stats["positions"] if stats["positions"] else 0.0,
        "stats": stats,
        "groups": groups,
        "pack_tokens": pack_tokens,
    }


def summarise(name: str, runs: list[dict[str, Any]], args: argparse.Namespace, peak: float | None) -> dict[str, Any]:
    times = [t for r in runs for t in r["times"]]
    tokens = [t for r in runs for t in r["tokens"]]
    st = runs[0]["stats"]  # the same rows every round
    step_s = benchlib.median(times)
    tok_step = sum(tokens) / len(tokens)
    model_flops = 3.0 * st["lm_fwd"] + st["vision_fwd"]
    grad_cache = name.startswith("grad_cache")
    hw_fwd_equiv = 2 + int(args.activation_checkpointing) + int(grad_cache)
    hw_flops = hw_fwd_equiv * st["lm_fwd"] + (1 + int(grad_cache)) * st["vision_fwd"]
    return {
        "variant": name,
        "global_batch": runs[0]["global_batch"],
        "step_s": step_s,
        "spread": benchlib.spread(times),
        "samples_s": runs[0]["global_batch"] / step_s,
        "tokens_s": tok_step / step_s,
        "tokens_step": tok_step,
        "items_step": st["items"],
        "items_per_row": runs[0]["groups"],
        "image_items_share": st["image_items"] / st["items"] if st["items"] else 0.0,
        "image_tokens_share": st["image_real"] / st["real"] if st["real"] else 0.0,
        "tiles_step": st["tiles"],
        "model_tflops_s": model_flops / step_s / 1e12,
        "mfu": model_flops / step_s / peak if peak else None,
        "hfu": hw_flops / step_s / peak if peak else None,
        "peak_mem_gb": max(r["peak_mem_gb"] for r in runs),
        "padding": runs[0]["padding"],
        "setup_s": [r["setup_s"] for r in runs],
        "steps_timed": len(times),
        "pack_tokens": runs[0]["pack_tokens"],
        "step_times_s": times,
    }


def prepare_stage2_data(args: argparse.Namespace) -> Path:
    """Generate the mini MMEB-train the stage-2 variants read (where and how large their config says), once."""
    from e5v.config import compose
    from e5v.mini.stage2_data import ensure

    loader = compose("train", _overrides(args, False, args.data_dir)).data.loader
    return ensure(loader.root, n_rows=int(loader.n_rows), seed=int(loader.seed))


def _items_note(args: argparse.Namespace, rows: dict[str, dict[str, Any]]) -> str:
    groups = next(iter(rows.values()))["items_per_row"]
    if args.data == "stage1" and groups == 3:
        return "x3 texts: anchor, positive, hard negative"
    return f"x{groups} items per row: query, positive{'s' if groups > 2 else ''}"


def _data_lines(args: argparse.Namespace, rows: dict[str, dict[str, Any]]) -> list[str]:
    """Stage 2: what the rows hold per step (items, the share with an image and of their real tokens, tiles);
    padded and packed variants of a kind train on the same rows, so the padded one speaks for both."""
    if args.data != "stage2":
        return []
    per = "; ".join(
        f"{r['variant'].removesuffix('_packed')} ({r['global_batch']} rows): {r['items_step']:.0f} items, "
        f"{100 * r['image_items_share']:.0f}% with an image holding {100 * r['image_tokens_share']:.0f}% of the "
        f"{r['tokens_step']:.0f} real tokens, {r['tiles_step']:.0f} anyres tiles"
        for name, r in rows.items() if not (name.endswith("_packed") and name.removesuffix("_packed") in rows))
    return [
        f"Rows: {DATA['stage2']}, {stage2_rows_per_subset(args.global_batch)} rows per subset, homogeneous "
        f"sub-batches of one subset each. Per step: {per}. MFU also credits one vision-tower forward per tile.",
        "",
    ]


def _packed_note(rows: dict[str, dict[str, Any]]) -> str:
    widths = sorted({r["pack_tokens"] for r in rows.values() if r["pack_tokens"]})
    return f" Packed variants: trainer.packing=true, packs of at most {widths[0]} tokens." if widths else ""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="stage1", choices=list(DATA),
                    help="; ".join(f"{k}: {v}" for k, v in DATA.items()))
    ap.add_argument("--data-dir", default=None,
                    help="stage2: paths.data_dir that holds (or receives) the generated mini MMEB-train "
                         "(default: a temporary folder, removed at the end)")
    ap.add_argument("--backbone", default="tiny", choices=["tiny", "llava_next_8b_shape"])
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds (a fresh trainer per variant each)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--lora-r", type=int, default=64)
    ap.add_argument("--lora-alpha", type=int, default=16)
    ap.add_argument("--layers", type=int, default=None, help="shrink the 8B shape to this many layers")
    ap.add_argument("--attn", default="sdpa", help="8B shape attention implementation (sdpa | auto | flash_attention_2)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    ap.add_argument("--pack-tokens", type=int, default=None,
                    help="tokens per packed row (default: the backbone's, Backbone.default_pack_tokens)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: 1 on CPU, see benchlib.set_threads; 0 = torch default)")
    ap.add_argument("--no-append", action="store_true", help="do not append to docs/benchmarks.md")
    args = ap.parse_args(argv)
    os.environ.setdefault("E5V_NO_PROGRESS", "1")
    benchlib.set_threads(args.threads)
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if args.data_dir and args.data != "stage2":
        raise SystemExit(f"--data-dir is for --data stage2 (the generated mini MMEB-train); --data {args.data} "
                         "generates its rows per variant: drop --data-dir")
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variant(s) {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as data_tmp:
        if args.data == "stage2":
            args.data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else data_tmp
            prepare_stage2_data(args)  # generated once, before any timing (every variant reads the same rows)
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                runs[name].append(run_variant(args, name.startswith("grad_cache"), name.endswith("_packed")))
    peak = benchlib.peak_flops() if torch.cuda.is_available() else None
    rows = {n: summarise(n, runs[n], args, peak) for n in names}
    info = benchlib.machine()
    lines = [
        f"### Training{' (stage 2, mini MMEB-train)' if args.data == 'stage2' else ''}: {args.backbone} on "
        f"{info['device']}",
        "",
        benchlib.machine_line(info),
        "",
        *_data_lines(args, rows),
        f"LoRA r={args.lora_r}, {args.precision}, micro batch {args.micro} ({_items_note(args, rows)}), "
        f"activation checkpointing {'on' if args.activation_checkpointing else 'off'}, DeepSpeed ZeRO-2. "
        f"Median of {args.steps} steps after {args.warmup} warm-up, x{args.rounds} alternating rounds "
        f"(a fresh trainer each). Padding = share of padded positions in the forwards (packed: the fill of "
        f"the packs; never credited).{_packed_note(rows)}",
        "",
        "| variant | global batch | s/step | samples/s | tokens/s | MFU | HFU | peak mem (GiB) | padding | spread |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows.values():
        lines.append(
            f"| {r['variant']} | {r['global_batch']} | {r['step_s']:.3f} | {r['samples_s']:.1f} | {r['tokens_s']:.0f} | "
            f"{benchlib.pct(r['mfu'])} | {benchlib.pct(r['hfu'])} | {r['peak_mem_gb']:.2f} | "
            f"{100 * r['padding']:.0f}% | {r['spread']} |"
        )
    ratio = None
    if "plain" in rows and "grad_cache" in rows:
        # per-sample cost of GradCache relative to plain (the price of a global-batch-wide contrast)
        ratio = rows["plain"]["samples_s"] / rows["grad_cache"]["samples_s"]
        lines += [
            "",
            f"GradCache overhead: plain samples/s / GradCache samples/s = **{ratio:.2f}x** (a "
            f"{rows['grad_cache']['global_batch']}-row contrastive batch in the memory of {args.micro} rows"
            f"{'' if torch.cuda.is_available() else '; peak mem on CPU is the process max RSS'}).",
        ]
    packing = {n: rows[f"{n}_packed"]["tokens_s"] / rows[n]["tokens_s"]
               for n in ("plain", "grad_cache") if n in rows and f"{n}_packed" in rows}
    if packing:
        lines += ["", "Packed vs padded, tokens/s (same step rows, same run): " + ", ".join(
            f"{n} **{v:.2f}x**" for n, v in packing.items()) + "."]
    md = "\n".join(lines)
    data = {"machine": info, "args": vars(args), "rows": rows, "gradcache_overhead": ratio,
            "packed_vs_padded": packing}
    benchlib.emit("bench_train", md, data, append=not args.no_append)
    from e5v import distributed as D

    D.shutdown()
    return data


if __name__ == "__main__":
    main()
