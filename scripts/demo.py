"""The embedded default: E5-V embeddings end to end on the tiny offline backbone, on CPU.

Run:  make demo     (or: python scripts/demo.py --n 24 --out outputs/demo)

Generates a small procedural world (coloured shapes + captions), embeds captions (text prompt),
pictures (image prompt) and picture+edit queries (CIRR prompt) with one model, and reports
text->image retrieval and the similarity structure. The tiny backbone is random, so its numbers sit
near chance: the demo shows the plumbing, and the training/eval work turns it into a before/after.
Writes OUT/{texts,images,queries}.npy, OUT/summary.json and OUT/similarity.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def recall_at(scores: np.ndarray, k: int) -> float:
    """Fraction of rows whose own column (the diagonal) is in the top k."""
    ranks = (scores > np.diag(scores)[:, None]).sum(axis=1)
    return float((ranks < k).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=24, help="number of scenes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("outputs/demo"))
    args = ap.parse_args()

    from e5v import Embedder
    from e5v.data.atomic import atomic_write, atomic_write_text
    from e5v.data.mini_world import sample_scenes

    t0 = time.time()
    scenes = sample_scenes(args.n, seed=args.seed)
    captions = [s.caption() for s in scenes]
    pictures = [s.render() for s in scenes]
    emb = Embedder.from_pretrained("tiny", device="cpu", batch_size=8)
    t1 = time.time()
    texts = emb.encode_text(captions)
    images = emb.encode_image(pictures)
    queries = emb.encode_interleaved([(p, "make every shape blue") for p in pictures], template="cirr_query")
    t2 = time.time()

    scores = texts @ images.T
    summary = {
        "backbone": emb.backbone.name_or_path,
        "prompt": emb.prompt.name,
        "n": args.n,
        "dim": emb.dim,
        "t2i_R@1": recall_at(scores, 1),
        "t2i_R@5": recall_at(scores, 5),
        "chance_R@1": 1 / args.n,
        "chance_R@5": min(5, args.n) / args.n,
        "mean_cos_text_text": float((texts @ texts.T)[np.triu_indices(args.n, 1)].mean()),
        "mean_cos_text_image": float(scores.mean()),
        "load_s": round(t1 - t0, 2),
        "encode_s": round(t2 - t1, 2),
        "items_per_s": round(3 * args.n / max(t2 - t1, 1e-9), 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name, arr in (("texts", texts), ("images", images), ("queries", queries)):
        atomic_write(args.out / f"{name}.npy", lambda f, a=arr: np.save(f, a))
    atomic_write_text(args.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 4.2))
        im = ax.imshow(scores, cmap="viridis")
        ax.set_xlabel("image")
        ax.set_ylabel("caption")
        ax.set_title("cosine(caption, image), tiny random backbone")
        fig.colorbar(im)
        fig.tight_layout()
        fig.savefig(args.out / "similarity.png", dpi=100)
    except ImportError:
        pass

    print(f"\nE5-V demo on '{summary['backbone']}' ({emb.dim}-d, prompt {summary['prompt']}), {args.n} scenes")
    print(f"  example caption : {captions[0]}")
    print(f"  example prompt  : {emb.prompt.render('text', captions[0])!r}")
    print("  | metric          | ours   | chance |")
    print("  |-----------------|--------|--------|")
    print(f"  | text->image R@1 | {summary['t2i_R@1']:.3f}  | {summary['chance_R@1']:.3f}  |")
    print(f"  | text->image R@5 | {summary['t2i_R@5']:.3f}  | {summary['chance_R@5']:.3f}  |")
    print(f"  embedded {3 * args.n} inputs (text, image, image+text) in {summary['encode_s']} s "
          f"({summary['items_per_s']} items/s); outputs in {args.out}/")


if __name__ == "__main__":
    main()
