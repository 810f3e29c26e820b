"""Encode throughput: our Embedder vs the released inference recipe, same model, same inputs, same run.

  python scripts/bench_encode.py                                          # tiny backbone, CPU
  python scripts/bench_encode.py --backbone llava_next_8b_shape --dtype bfloat16 --n-text 2048 \
      --n-image 256 --batch-size 64                                       # GPU (MFU reported)

The released recipe: one item per forward through the full ``LlavaNextForConditionalGeneration`` with
``output_hidden_states=True`` (vocabulary logits and every layer's states computed), no length
sorting, then ``hidden_states[-1][:, -1]``. Ours: length-sorted left-padded batches through the
decoder only. MFU = 2 x (parameters used) x (tokens/s) / peak dense bf16 FLOP/s (forward only;
attention FLOPs not credited). Figures are appended to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import random
import time

import numpy as np
import torch

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import platform

    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def released_recipe(emb, kind: str, items: list) -> float:
    """Seconds to embed ``items`` one per forward, as the released evaluation code does."""
    model, proc = emb.model, emb.processor
    dev = emb.backbone.device
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        for it in items:
            if kind == "text":
                enc = proc.tokenizer([emb.prompt.render("text", it)], return_tensors="pt")
            elif kind == "image":
                enc = proc(text=[emb.prompt.render("image")], images=[it], return_tensors="pt")
            else:
                enc = proc(text=[emb.prompt.render("cirr_query", it[1])], images=[it[0]], return_tensors="pt")
            enc = {k: (v.to(dev, emb.backbone.dtype) if v.is_floating_point() else v.to(dev)) for k, v in enc.items()}
            out = model(**enc, output_hidden_states=True)
            _ = out.hidden_states[-1][:, -1].float().cpu()
    sync()
    return time.perf_counter() - t0


def ours(emb, kind: str, items: list, batch_size: int) -> float:
    sync()
    t0 = time.perf_counter()
    if kind == "text":
        emb.encode_text(items, batch_size=batch_size)
    elif kind == "image":
        emb.encode_image(items, batch_size=batch_size)
    else:
        emb.encode_interleaved(items, batch_size=batch_size)
    sync()
    return time.perf_counter() - t0


def make_inputs(n_text: int, n_image: int, seed: int, image_px: tuple[int, int]):
    from e5v.data.mini_world import sample_scenes

    rng = random.Random(seed)
    scenes = sample_scenes(max(n_text, n_image), seed=seed, max_objects=3)
    texts = []
    for s in scenes[:n_text]:  # varied lengths, as real captions are
        texts.append(" ".join([s.caption()] * rng.randint(1, 4)))
    lo, hi = image_px
    images = []
    for s in scenes[:n_image]:
        w, h = rng.randint(lo, hi), rng.randint(lo, hi)  # several aspect ratios -> several anyres grids
        images.append(s.render(w, h))
    return texts, images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="tiny", choices=["tiny", "llava_next_8b_shape"])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--n-text", type=int, default=512)
    ap.add_argument("--n-image", type=int, default=96)
    ap.add_argument("--n-released", type=int, default=None, help="items for the (slow) released recipe (default: all)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--layers", type=int, default=None, help="shrink the 8B shape to this many layers")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("E5V_NO_PROGRESS", "1")
    from e5v import Embedder

    kw = {"num_hidden_layers": args.layers} if args.layers else {}
    emb = Embedder.from_pretrained(args.backbone, dtype=args.dtype, device=args.device, batch_size=args.batch_size, **kw)
    px = (32, 96) if args.backbone == "tiny" else (300, 1100)
    texts, images = make_inputs(args.n_text, args.n_image, seed=0, image_px=px)
    pairs = [(im, "make the largest shape blue and move it to the left") for im in images]
    n_params = sum(p.numel() for p in emb.model.model.language_model.parameters())
    flops_peak = next((v for k, v in PEAK_BF16.items() if k in device_name()), None)
    rows = []
    for kind, items in (("text", texts), ("image", images), ("interleaved", pairs)):
        ours(emb, kind, items[: args.batch_size], args.batch_size)  # warm-up
        n_rel = min(len(items), args.n_released or len(items))
        released_recipe(emb, kind, items[: min(4, n_rel)])  # warm-up
        t_ours = ours(emb, kind, items, args.batch_size)
        t_rel = released_recipe(emb, kind, items[:n_rel])
        ips_ours, ips_rel = len(items) / t_ours, n_rel / t_rel
        if kind == "text":
            tokens = sum(len(emb.tokenizer(emb.prompt.render("text", t))["input_ids"]) for t in items)
        else:
            tokens = sum(emb._image_tokens(im if kind == "image" else im[0]) + 30 for im in items)
        mfu = 2 * n_params * tokens / t_ours / flops_peak if flops_peak else float("nan")
        rows.append((kind, len(items), ips_ours, ips_rel, ips_ours / ips_rel, mfu))
    lines = [
        f"### Encoding, {args.backbone} ({args.dtype}) on {device_name()} ({time.strftime('%Y-%m-%d')})",
        "",
        f"Batch size {args.batch_size}; released recipe = one item per full forward with all hidden states.",
        "",
        "| input | items | ours items/s | released items/s | speed-up | MFU (ours) |",
        "|---|---|---|---|---|---|",
    ]
    for kind, n, a, b, r, mfu in rows:
        mfu_s = "n/a" if np.isnan(mfu) else f"{100 * mfu:.1f}%"
        lines.append(f"| {kind} | {n} | {a:.1f} | {b:.1f} | {r:.2f}x | {mfu_s} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_append:
        path = os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks.md")
        new = not os.path.exists(path)
        with open(path, "a", encoding="utf-8") as f:
            if new:
                f.write("# Benchmarks\n\nFigures appended by `make bench` scripts; each block is one run on one machine.\n\n")
            f.write(text + "\n")


if __name__ == "__main__":
    main()
