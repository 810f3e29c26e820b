"""``max_tiles``: what capping the anyres grid costs in fidelity and buys in image tokens and speed.

  python -m scripts.bench_tiles                 # tiny model on CPU + the 8B shape's token counts

Two parts:
1. LLaVA-NeXT-8B (``llava_next_8b_shape``'s processor, no model needed): image tokens per image for
   common photo sizes under each ``max_tiles`` (the encode cost of an image is about proportional).
2. Tiny model (random weights, CPU): images of many sizes embedded at full resolution and with each
   cap; cosine of every capped embedding to its full-resolution one, how much of each image's top-10
   neighbours (image-to-image, cosine) survives the cap, and images/s.
The tiny model is untrained: its cosines show how far the cap moves an embedding through this
architecture, not retrieval accuracy of a trained model (measure that with ``e5v-eval
backbone.max_tiles=N``). Appends to docs/benchmarks.md; $OUT/bench_tiles.json.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from typing import Any

import numpy as np

from scripts import benchlib

PHOTO_SIZES = [(500, 375), (375, 500), (640, 480), (800, 400), (1024, 768), (336, 336), (300, 600)]


def shape_tokens(max_tiles: int | None) -> dict[tuple[int, int], int]:
    from e5v.backbones import llava_next, shape, tiny

    tok = tiny.build_tokenizer()
    cfg = shape.build_config(tok.convert_tokens_to_ids("<image>"))
    ip = tiny.build_image_processor({"vision_image_size": 336, "image_grid_pinpoints": shape.PINPOINTS})
    proc = llava_next.build_processor(cfg, tok, ip, max_tiles=max_tiles)
    return {
        (w, h): int(proc._get_num_multimodal_tokens(image_sizes=[[h, w]])["num_image_tokens"][0])
        for w, h in PHOTO_SIZES
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-image", type=int, default=96)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("E5V_NO_PROGRESS", "1")
    benchlib.set_threads(args.threads)

    caps_8b: list[int | None] = [None, 3, 2]
    toks = {c: shape_tokens(c) for c in caps_8b}

    from e5v import Embedder
    from e5v.mini.world import sample_scenes

    rng = random.Random(0)
    images = [s.render(rng.randint(24, 128), rng.randint(24, 128)) for s in sample_scenes(args.n_image, seed=1, max_objects=3)]
    full = Embedder.from_pretrained("tiny", device="cpu", batch_size=32)
    rows = []
    ref = None
    for cap in (None, 2):
        emb = full if cap is None else Embedder.from_pretrained("tiny", device="cpu", batch_size=32, max_tiles=cap)
        emb.encode_image(images[:8])
        t0 = time.perf_counter()
        x = emb.encode_image(images)
        dt = time.perf_counter() - t0
        n_tok = float(np.mean([emb._image_tokens(im) for im in images]))
        if ref is None:
            ref = x
        cos = (x * ref).sum(1)
        sims, sims_ref = x @ x.T, ref @ ref.T
        np.fill_diagonal(sims, -2)
        np.fill_diagonal(sims_ref, -2)
        top, top_ref = np.argsort(-sims, 1)[:, :10], np.argsort(-sims_ref, 1)[:, :10]
        overlap = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top, top_ref)]))
        rows.append({"max_tiles": cap, "tokens": n_tok, "images_s": len(images) / dt, "cos_mean": float(cos.mean()),
                     "cos_min": float(cos.min()), "top10_overlap": overlap})
    info = benchlib.machine()
    lines = [
        "### max_tiles: image tokens (LLaVA-NeXT-8B) and embedding change (tiny model)",
        "",
        benchlib.machine_line(info),
        "",
        "Image tokens per image, LLaVA-NeXT-8B processor (336 px tiles, up to 4 grid tiles + the base view):",
        "",
        "| image (w x h) | " + " | ".join("full" if c is None else f"max_tiles={c}" for c in caps_8b) + " |",
        "|---|" + "---|" * len(caps_8b),
    ]
    for w, h in PHOTO_SIZES:
        lines.append(f"| {w} x {h} | " + " | ".join(str(toks[c][(w, h)]) for c in caps_8b) + " |")
    lines += [
        "",
        f"Tiny model (random weights, 32 px tiles, grids of 2 or 4 tiles), {len(images)} images of 24-128 px:",
        "",
        "| max_tiles | image tokens (mean) | images/s | cosine to full (mean / min) | image-to-image top-10 kept |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {'full' if r['max_tiles'] is None else r['max_tiles']} | {r['tokens']:.0f} | {r['images_s']:.0f} | "
            f"{r['cos_mean']:.4f} / {r['cos_min']:.4f} | {100 * r['top10_overlap']:.0f}% |"
        )
    md = "\n".join(lines)
    data = {"machine": info, "shape_tokens": {str(c): {f"{w}x{h}": v for (w, h), v in t.items()} for c, t in toks.items()},
            "tiny": rows}
    benchlib.emit("bench_tiles", md, data, append=not args.no_append)
    return data


if __name__ == "__main__":
    main()
