"""Encode throughput: our Embedder vs the released inference recipe, same model, same inputs, same run.

  python -m scripts.bench_encode                                      # tiny backbone, CPU
  python -m scripts.bench_encode --backbone llava_next_8b_shape --dtype bfloat16 \\
      --n-text 4096 --n-image 512 --n-released 64                     # one GPU: MFU + paper-suite estimate

The released recipe: one item per forward through the full ``LlavaNextForConditionalGeneration`` with
``output_hidden_states=True`` (vocabulary logits and every layer's states computed), no length
sorting, the processor called per item, then ``hidden_states[-1][:, -1]``. Ours: ``Embedder`` (length-
sorted left-padded batches under a token budget, decoder only, prompts tokenized once, images
preprocessed in DataLoader workers on CUDA). Both run on the same model object in the same dtype, on
the same inputs, alternating over ``--rounds`` rounds (order reversed every other round); the
figures are medians over rounds. In the same rounds: ours with packed batches (``packing=true``: the same
batches, rows packed without padding; ``--no-packed`` skips it) and, with ``--compile``, ours with the
decoder under ``torch.compile`` (its warm-up, the first compiled call, timed apart). MFU counts model FLOPs as described in :mod:`scripts.benchlib` (real
tokens only, no logits). The paper-suite estimate divides the suite's item counts by the measured
items/s (the inputs here: captions of 1-4 sentences, images of 300-1100 px on the GPU).
Appends to docs/benchmarks.md; with $OUT set, writes $OUT/bench_encode.json.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from typing import Any

import numpy as np
import torch

from scripts import benchlib

KINDS = ("text", "image", "interleaved")
EDIT = "make the largest shape blue and move it to the left"


def released_recipe(emb: Any, kind: str, items: list) -> None:
    """Embed ``items`` one per forward, as the released evaluation code does."""
    model, proc = emb.model, emb.processor
    dev, dtype = emb.backbone.device, emb.backbone.dtype
    with torch.no_grad():
        for it in items:
            if kind == "text":
                enc = proc.tokenizer([emb.prompt.render("text", it)], return_tensors="pt")
            elif kind == "image":
                enc = proc(text=[emb.prompt.render("image")], images=[it], return_tensors="pt")
            else:
                enc = proc(text=[emb.prompt.render("cirr_query", it[1])], images=[it[0]], return_tensors="pt")
            enc = {k: (v.to(dev, dtype) if v.is_floating_point() else v.to(dev)) for k, v in enc.items()}
            out = model(**enc, output_hidden_states=True)
            _ = out.hidden_states[-1][:, -1].float().cpu()


def ours(emb: Any, kind: str, items: list, batch_size: int) -> None:
    if kind == "text":
        emb.encode_text(items, batch_size=batch_size)
    elif kind == "image":
        emb.encode_image(items, batch_size=batch_size)
    else:
        emb.encode_interleaved(items, batch_size=batch_size)


def make_inputs(n_text: int, n_image: int, seed: int, image_px: tuple[int, int]) -> tuple[list[str], list[Any]]:
    from e5v.mini.world import sample_scenes

    rng = random.Random(seed)
    scenes = sample_scenes(max(n_text, n_image), seed=seed, max_objects=3)
    texts = [" ".join([s.caption()] * rng.randint(1, 4)) for s in scenes[:n_text]]  # varied lengths
    lo, hi = image_px
    images = []
    for s in scenes[:n_image]:
        w, h = rng.randint(lo, hi), rng.randint(lo, hi)  # several aspect ratios -> several anyres grids
        images.append(s.render(w, h))
    return texts, images


def padding_share(emb: Any, kind: str, items: list, batch_size: int) -> float:
    """Share of padded positions in ours' (length-sorted, left-padded) batches: what packing can remove."""
    if kind == "text":
        enc = emb._text_items(items, "text", None)
    elif kind == "image":
        enc = emb._image_items([(im, None) for im in items], "image", None, fixed_prompt=emb.prompt.render("image"))
    else:
        enc = emb._image_items(list(items), "cirr_query", None)
    batches = list(emb._batches(enc, batch_size))
    total = sum(len(b) * b[0].length for b in batches)
    return 1.0 - sum(it.length for it in enc) / total if total else 0.0


def model_flops(emb: Any, kind: str, items: list) -> tuple[float, int]:
    """(forward model FLOPs, real tokens) of embedding ``items`` once (benchlib's counting)."""
    fl = benchlib.LlavaFlops.from_model(emb.model)
    if kind == "text":
        enc = emb._text_items(items, "text", None)
        images: list[Any] = []
    elif kind == "image":
        enc = emb._image_items([(im, None) for im in items], "image", None, fixed_prompt=emb.prompt.render("image"))
        images = items
    else:
        enc = emb._image_items(list(items), "cirr_query", None)
        images = [p[0] for p in items]
    total = sum(fl.lm_sequence(it.length) for it in enc)
    for im in images:
        w, h = im.size
        total += fl.vision_tiles(benchlib.anyres_tiles(emb.processor, h, w))
    return total, sum(it.length for it in enc)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="tiny", choices=["tiny", "llava_next_8b_shape"])
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--n-text", type=int, default=512)
    ap.add_argument("--n-image", type=int, default=96)
    ap.add_argument("--n-released", type=int, default=None,
                    help="items for the (slow) released recipe (default: all)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-batch-tokens", type=int, default=None,
                    help="token budget per batch (default: 65536 on CUDA)")
    ap.add_argument("--num-workers", type=int, default=None,
                    help="image DataLoader workers (default: 4 on CUDA, 0 on CPU)")
    ap.add_argument("--max-tiles", type=int, default=None, help="restrict anyres grids (fewer image tokens)")
    ap.add_argument("--attn", default="sdpa", help="attention implementation (sdpa | auto | flash_attention_2 | eager)")
    ap.add_argument("--layers", type=int, default=None, help="shrink the 8B shape to this many layers (quick checks)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per variant (median reported)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads for both variants (default: 1 on CPU, see benchlib.set_threads; "
                    "0 = torch default)")
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of text,image,interleaved")
    ap.add_argument("--no-packed", action="store_true", help="skip the packed variant of ours")
    ap.add_argument("--pack-tokens", type=int, default=None,
                    help="tokens per packed row (default: the backbone's, Backbone.default_pack_tokens)")
    ap.add_argument("--compile", action="store_true", help="also ours with torch.compile on the decoder")
    ap.add_argument("--no-append", action="store_true", help="do not append to docs/benchmarks.md")
    args = ap.parse_args(argv)
    os.environ.setdefault("E5V_NO_PROGRESS", "1")
    benchlib.set_threads(args.threads)
    from e5v import Embedder
    from e5v.backbones.base import resolve_device

    cuda = resolve_device(args.device).type == "cuda"
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    kw: dict[str, Any] = {"attn_implementation": args.attn}
    if args.layers:
        kw["num_hidden_layers"] = args.layers
    if args.max_tiles:
        kw["max_tiles"] = args.max_tiles
    budget = args.max_batch_tokens if args.max_batch_tokens is not None else (65536 if cuda else None)
    workers = args.num_workers if args.num_workers is not None else (4 if cuda else 0)
    t_load = time.perf_counter()
    emb = Embedder.from_pretrained(
        args.backbone, dtype=dtype, device=args.device, batch_size=args.batch_size,
        max_batch_tokens=budget or None, num_workers=workers, packing="false", **kw,
    )
    t_load = time.perf_counter() - t_load
    packed = None if args.no_packed else Embedder(
        emb.backbone, emb.prompt, batch_size=args.batch_size, max_batch_tokens=budget or None, num_workers=workers,
        packing="true", pack_tokens=args.pack_tokens,
    )

    def compiled(kind: str, items: list) -> None:  # ours, the decoder compiled (eager again for the others)
        emb.backbone.compile_decoder(True)
        try:
            ours(emb, kind, items, args.batch_size)
        finally:
            emb.backbone.compile_decoder(False)
    px = (32, 96) if args.backbone == "tiny" else (300, 1100)
    texts, images = make_inputs(args.n_text, args.n_image, seed=0, image_px=px)
    inputs = {"text": texts, "image": images, "interleaved": [(im, EDIT) for im in images]}
    peak = benchlib.peak_flops() if cuda else None
    info = benchlib.machine()
    rows: list[dict[str, Any]] = []
    for kind in [k.strip() for k in args.kinds.split(",") if k.strip()]:
        items = inputs[kind]
        n_rel = min(len(items), args.n_released or len(items))
        ours(emb, kind, items[: args.batch_size], args.batch_size)  # warm-up (kernels, workers, caches)
        released_recipe(emb, kind, items[: min(4, n_rel)])
        variants = {
            "ours": lambda: ours(emb, kind, items, args.batch_size),
            "released": lambda: released_recipe(emb, kind, items[:n_rel]),
        }
        if packed is not None:
            ours(packed, kind, items[: args.batch_size], args.batch_size)
            variants["packed"] = lambda: ours(packed, kind, items, args.batch_size)
        warmup_s = None
        if args.compile:  # the first compiled call of this input kind compiles: timed apart, not in the rounds
            benchlib.sync()
            t = time.perf_counter()
            compiled(kind, items[: args.batch_size])
            benchlib.sync()
            warmup_s = time.perf_counter() - t
            variants["compiled"] = lambda: compiled(kind, items)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = benchlib.alternate(variants, args.rounds)
        t_ours, t_rel = benchlib.median(times["ours"]), benchlib.median(times["released"])
        flops, tokens = model_flops(emb, kind, items)
        ips_ours, ips_rel = len(items) / t_ours, n_rel / t_rel
        rows.append(
            {
                "kind": kind,
                "items": len(items),
                "released_items": n_rel,
                "ours_items_s": ips_ours,
                "released_items_s": ips_rel,
                "speedup": ips_ours / ips_rel,
                "ours_tokens_s": tokens / t_ours,
                "ours_tflops_s": flops / t_ours / 1e12,
                "mfu": flops / t_ours / peak if peak else None,
                "spread_ours": benchlib.spread(times["ours"]),
                "spread_released": benchlib.spread(times["released"]),
                "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                "rounds_ours_s": times["ours"],
                "rounds_released_s": times["released"],
                "padding": padding_share(emb, kind, items, args.batch_size),
                "packed_items_s": len(items) / benchlib.median(times["packed"]) if "packed" in times else None,
                "packed_vs_padded": t_ours / benchlib.median(times["packed"]) if "packed" in times else None,
                "spread_packed": benchlib.spread(times["packed"]) if "packed" in times else None,
                "compiled_items_s": len(items) / benchlib.median(times["compiled"]) if "compiled" in times else None,
                "compiled_vs_eager": t_ours / benchlib.median(times["compiled"]) if "compiled" in times else None,
                "spread_compiled": benchlib.spread(times["compiled"]) if "compiled" in times else None,
                "compile_warmup_s": warmup_s,
            }
        )
    rates = {r["kind"]: r["ours_items_s"] for r in rows}
    rel_rates = {r["kind"]: r["released_items_s"] for r in rows}
    suite_h = benchlib.paper_suite_hours(rates) if set(rates) == set(KINDS) else None
    suite_rel_h = benchlib.paper_suite_hours(rel_rates) if set(rel_rates) == set(KINDS) else None

    layers = f", {args.layers} layers" if args.layers else ""
    title = f"### Encoding: {args.backbone} ({dtype}{layers}) on {info['device']}"
    lines = [
        title,
        "",
        benchlib.machine_line(info),
        "",
        f"Ours: batch {args.batch_size}, token budget {budget or 'none'}, {workers} image workers, attention "
        f"{args.attn}{', max_tiles ' + str(args.max_tiles) if args.max_tiles else ''}. Released recipe: one item "
        f"per full forward with all hidden states and logits. Median of {args.rounds} alternating rounds "
        f"(spread = largest deviation from the median). Model load {t_load:.1f} s.",
        "",
        "| input | items (released) | ours items/s | released items/s | speed-up | ours tokens/s | ours TFLOP/s | MFU | spread ours / released |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['items']} ({r['released_items']}) | {r['ours_items_s']:.1f} | "
            f"{r['released_items_s']:.1f} | **{r['speedup']:.2f}x** | {r['ours_tokens_s']:.0f} | "
            f"{r['ours_tflops_s']:.2f} | {benchlib.pct(r['mfu'])} | {r['spread_ours']} / {r['spread_released']} |"
        )
    if suite_h is not None:
        counts = benchlib.paper_suite_counts()
        lines += [
            "",
            f"Paper suite estimate (encode {counts['text']} texts, {counts['image']} images, "
            f"{counts['interleaved']} image+text queries once, at these rates): ours **{suite_h:.2f} h**, "
            f"released recipe {suite_rel_h:.2f} h.",
        ]
    if cuda:
        lines.append(f"Peak GPU memory (encoding): {max(r['peak_mem_gb'] for r in rows):.1f} GiB.")
    if packed is not None or args.compile:
        lines += [
            "",
            f"Same rounds: ours with packed batches (packing=true, rows per pack up to "
            f"{args.pack_tokens or emb.backbone.default_pack_tokens()} tokens) and, with --compile, ours with the "
            "decoder compiled (its first call, which compiles, timed apart). Ratios: tokens/s over ours padded (eager).",
            "",
            "| input | padding in ours' batches | packed items/s | packed / padded | compiled items/s | compiled / eager "
            "| compile warm-up (s) | spread packed / compiled |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            def f(v: Any, fmt: str) -> str:
                return "" if v is None else format(v, fmt)

            lines.append(
                f"| {r['kind']} | {100 * r['padding']:.1f}% | {f(r['packed_items_s'], '.1f')} | "
                f"**{f(r['packed_vs_padded'], '.2f')}x** | {f(r['compiled_items_s'], '.1f')} | "
                f"{f(r['compiled_vs_eager'], '.2f')}{'x' if r['compiled_vs_eager'] else ''} | "
                f"{f(r['compile_warmup_s'], '.1f')} | {r['spread_packed'] or ''} / {r['spread_compiled'] or ''} |"
            )
    md = "\n".join(lines)
    data = {
        "machine": info,
        "args": vars(args),
        "dtype": dtype,
        "rows": rows,
        "paper_suite_hours": suite_h,
        "paper_suite_hours_released": suite_rel_h,
        "model_load_s": t_load,
    }
    benchlib.emit("bench_encode", md, data, append=not args.no_append)
    return data


if __name__ == "__main__":
    main()
