"""Training throughput: samples/s, tokens/s, MFU and peak memory per step, plain vs GradCache.

  python scripts/bench_train.py                                   # tiny backbone on CPU
  python scripts/bench_train.py --backbone llava_next_8b_shape --global-batch 768 --micro 32 \
      --precision bf16 --activation-checkpointing                 # one GPU, LoRA r=64 (GPU check)

Both variants run in this process on the same machine: "plain" takes one forward of --micro rows per
step (the largest batch that fits without GradCache), "grad_cache" reaches --global-batch per step in
chunks of --micro. MFU = 6 x (parameters) x (tokens/s) / peak dense bf16 FLOP/s of the device (the
usual convention: forward 2N + backward 4N per token; GradCache's extra no-grad forward and the
frozen base's skipped weight gradients are not credited). Figures are appended to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def peak_flops() -> float | None:
    name = device_name()
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    return None


def run_variant(args: argparse.Namespace, grad_cache: bool) -> dict[str, float]:
    from e5v import distributed as D
    from e5v.config import compose
    from e5v.train import Trainer

    global_batch = args.global_batch if grad_cache else args.micro
    overrides = [
        "experiment=tiny_cpu",
        f"backbone={args.backbone}",
        "logger=none",
        "run_name=bench",
        f"trainer.global_batch={global_batch}",
        f"trainer.micro_batch={args.micro}",
        f"trainer.grad_cache={str(grad_cache).lower()}",
        f"trainer.precision={args.precision}",
        f"trainer.activation_checkpointing={str(args.activation_checkpointing).lower()}",
        f"trainer.max_steps={args.steps + args.warmup}",
        f"lora.r={args.lora_r}",
        f"lora.alpha={args.lora_alpha}",
        f"data.loader.n_rows={max(2048, 2 * args.global_batch)}",
    ]
    if args.backbone == "llava_next_8b_shape" and args.layers:
        overrides.append(f"backbone.num_hidden_layers={args.layers}")
    cfg = compose("train", overrides)
    D.init_from_env()
    with tempfile.TemporaryDirectory() as tmp:
        cfg.paths.data_dir = f"{tmp}/data"
        trainer = Trainer(cfg, tmp)
        trainer.setup()
        n_params = sum(p.numel() for p in trainer.encoder.parameters())
        times, tokens = [], []
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            m = trainer.train_step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            trainer.step += 1
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
                tokens.append(m["tokens"])
        from e5v.train import _peak_memory_gb

        peak = _peak_memory_gb()
        del trainer
    step_s = statistics.median(times)
    tok_s = statistics.mean(tokens) / step_s
    flops = peak_flops()
    return {
        "global_batch": global_batch,
        "step_s": step_s,
        "samples_s": global_batch / step_s,
        "tokens_s": tok_s,
        "mfu": (6 * n_params * tok_s / flops) if flops else float("nan"),
        "peak_mem_gb": peak,
        "params": n_params,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="tiny", choices=["tiny", "llava_next_8b_shape"])
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--lora-r", type=int, default=64)
    ap.add_argument("--lora-alpha", type=int, default=16)
    ap.add_argument("--layers", type=int, default=None, help="shrink the 8B shape to this many layers")
    ap.add_argument("--no-append", action="store_true", help="do not append to docs/benchmarks.md")
    args = ap.parse_args()
    os.environ.setdefault("E5V_NO_PROGRESS", "1")

    rows = {name: run_variant(args, gc) for name, gc in (("plain", False), ("grad_cache", True))}
    dev = device_name()
    lines = [
        f"### Training, {args.backbone} on {dev} ({time.strftime('%Y-%m-%d')})",
        "",
        f"LoRA r={args.lora_r}, {args.precision}, micro batch {args.micro}, activation checkpointing "
        f"{'on' if args.activation_checkpointing else 'off'}, median of {args.steps} steps after {args.warmup} warm-up.",
        "",
        "| variant | global batch | s/step | samples/s | tokens/s | MFU | peak mem (GB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        mfu = "n/a" if r["mfu"] != r["mfu"] else f"{100 * r['mfu']:.1f}%"
        lines.append(
            f"| {name} | {r['global_batch']} | {r['step_s']:.3f} | {r['samples_s']:.1f} | {r['tokens_s']:.0f} | "
            f"{mfu} | {r['peak_mem_gb']:.2f} |"
        )
    ratio = rows["grad_cache"]["samples_s"] / rows["plain"]["samples_s"]
    lines += ["", f"GradCache / plain samples/s ratio: {ratio:.2f} (the price of a {rows['grad_cache']['global_batch']}-"
              f"row contrastive batch in the memory of {args.micro} rows)", ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_append:
        path = os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks.md")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        new = not os.path.exists(path)
        with open(path, "a", encoding="utf-8") as f:
            if new:
                f.write("# Benchmarks\n\nFigures appended by `make bench` scripts; each block is one run on one machine.\n\n")
            f.write(text + "\n")
    from e5v import distributed as D

    D.shutdown()


if __name__ == "__main__":
    main()
