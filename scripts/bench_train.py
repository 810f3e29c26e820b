"""Training throughput: samples/s, tokens/s, MFU and peak memory per step, plain vs GradCache.

  python -m scripts.bench_train                                   # tiny backbone on CPU
  python -m scripts.bench_train --backbone llava_next_8b_shape --global-batch 768 --micro 32 \\
      --precision bf16 --activation-checkpointing --rounds 1      # one GPU, LoRA r=64 (GPU check)

All variants run in this process through the real ``Trainer`` (DeepSpeed ZeRO-2, LoRA) on the same
machine: "plain" takes one forward of --micro rows per optimizer step (the largest batch that fits
without GradCache), "grad_cache" reaches --global-batch per step in chunks of --micro; "plain_packed"
and "grad_cache_packed" are the same with packed batches (``trainer.packing=true``: each forward's rows
packed without padding; the others run ``trainer.packing=false``). Each round
builds a fresh trainer per variant and times --steps steps after --warmup; the variant order is
reversed every other round, so a slow first build (DeepSpeed op compilation, cold caches, a
neighbour's load) does not fall on one variant. Figures: median step time over every timed step.

FLOPs (:mod:`scripts.benchlib`): tokens are real (non-padding) tokens, counted once per row. MFU uses
the 6N convention, 3 x forward FLOPs (language model matmuls incl. LoRA + causal attention at the
step's mean row length). HFU counts what runs: forward + backward of activations (frozen base) = 2
forward-equivalents, +1 with activation checkpointing (recompute), +1 with GradCache (the no-grad
pass). Padding is reported, not credited. Appends to docs/benchmarks.md; $OUT/bench_train.json.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from typing import Any

import torch

from scripts import benchlib


VARIANTS = ("plain", "grad_cache", "plain_packed", "grad_cache_packed")


def _overrides(args: argparse.Namespace, grad_cache: bool, tmp: str, packed: bool = False) -> list[str]:
    global_batch = args.global_batch if grad_cache else args.micro
    out = [
        "experiment=tiny_cpu",
        f"backbone={args.backbone}",
        "logger=none",
        "run_name=bench",
        f"paths.output_dir={tmp}/out",
        f"paths.data_dir={tmp}/data",
        f"trainer.global_batch={global_batch}",
        f"trainer.micro_batch={args.micro}",
        f"trainer.grad_cache={str(grad_cache).lower()}",
        f"trainer.precision={args.precision}",
        f"trainer.activation_checkpointing={str(args.activation_checkpointing).lower()}",
        f"trainer.max_steps={args.steps + args.warmup + 1}",
        f"lora.r={args.lora_r}",
        f"lora.alpha={args.lora_alpha}",
        f"data.loader.n_rows={max(2048, 2 * args.global_batch)}",
        f"trainer.packing={str(packed).lower()}",
    ]
    if packed and args.pack_tokens:
        out.append(f"trainer.pack_tokens={args.pack_tokens}")
    if args.backbone == "llava_next_8b_shape":
        if args.layers:
            out.append(f"backbone.num_hidden_layers={args.layers}")
        out.append(f"backbone.attn_implementation={args.attn}")
    return out


def _padding(trainer: Any, step: int) -> tuple[int, int, int]:
    """(real tokens, positions, rows) of the forwards of the step's batches (each row once): positions
    counts the padding of padded batches and the fill of packed ones."""
    from e5v import packing

    real = total = n = 0
    for chunk in trainer.batches.chunks(step):
        for b in chunk.batches:
            real += packing.real_tokens(b)
            total += b["input_ids"].numel()
            n += int(b["last_index"].numel()) if packing.is_packed(b) else b["input_ids"].shape[0]
    return real, total, n


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
        real, padded, n_rows = _padding(trainer, 0)
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
        "padding": (padded - real) / padded if padded else 0.0,
        "rows_per_step": n_rows,
        "pack_tokens": pack_tokens,
        "flops": fl,
    }


def summarise(name: str, runs: list[dict[str, Any]], args: argparse.Namespace, peak: float | None) -> dict[str, Any]:
    times = [t for r in runs for t in r["times"]]
    tokens = [t for r in runs for t in r["tokens"]]
    fl: benchlib.LlavaFlops = runs[0]["flops"]
    step_s = benchlib.median(times)
    tok_step = sum(tokens) / len(tokens)
    rows = runs[0]["rows_per_step"]
    mean_len = tok_step / rows
    fwd = 2.0 * fl.lm_matmul_params * tok_step + rows * (fl.lm_sequence(mean_len) - 2.0 * fl.lm_matmul_params * mean_len)
    model_flops = 3.0 * fwd
    hw_fwd_equiv = 2 + int(args.activation_checkpointing) + int(name.startswith("grad_cache"))
    hw_flops = hw_fwd_equiv * fwd
    return {
        "variant": name,
        "global_batch": runs[0]["global_batch"],
        "step_s": step_s,
        "spread": benchlib.spread(times),
        "samples_s": runs[0]["global_batch"] / step_s,
        "tokens_s": tok_step / step_s,
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


def _packed_note(rows: dict[str, dict[str, Any]]) -> str:
    widths = sorted({r["pack_tokens"] for r in rows.values() if r["pack_tokens"]})
    return f" Packed variants: trainer.packing=true, packs of at most {widths[0]} tokens." if widths else ""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variant(s) {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            runs[name].append(run_variant(args, name.startswith("grad_cache"), name.endswith("_packed")))
    peak = benchlib.peak_flops() if torch.cuda.is_available() else None
    rows = {n: summarise(n, runs[n], args, peak) for n in names}
    info = benchlib.machine()
    lines = [
        f"### Training: {args.backbone} on {info['device']}",
        "",
        benchlib.machine_line(info),
        "",
        f"LoRA r={args.lora_r}, {args.precision}, micro batch {args.micro} (x3 texts: anchor, positive, hard "
        f"negative), activation checkpointing {'on' if args.activation_checkpointing else 'off'}, DeepSpeed ZeRO-2. "
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
