"""e5v-encode: embed a text file, an image folder, or a JSONL of {image, text} pairs.

Examples:
  e5v-encode --model tiny --texts sentences.txt --out runs/texts
  e5v-encode --model royokong/e5-v --images photos/ --out runs/photos --dtype float16 --device cuda
  e5v-encode --model royokong/e5-v --jsonl queries.jsonl --template cirr_query --out runs/cirr

Writes OUT/embeddings.npy (n, d) float32, OUT/ids.txt (one id per row, same order) and OUT/meta.json.
Text file: one text per line (ids = line numbers from 0). Image folder: every image file below it,
sorted (ids = relative paths). JSONL: one object per line with "image" (path relative to the JSONL's
folder, or --data-root) and "text", optional "id" (default: line number from 0).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="e5v-encode",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--texts", type=Path, help="UTF-8 text file, one input per line")
    src.add_argument("--images", type=Path, help="folder of images (searched recursively)")
    src.add_argument("--jsonl", type=Path, help='JSONL with {"image": path, "text": str[, "id": ...]} per line')
    p.add_argument("--out", type=Path, required=True, help="output folder (must be empty unless --overwrite)")
    p.add_argument("--model", default="royokong/e5-v", help="hub id, local directory, 'tiny' or 'llava_next_8b_shape'")
    p.add_argument("--prompt", default=None, help="prompt config name (default: the one matching the backbone)")
    p.add_argument("--template", default=None, help="prompt body: text/image (default), sts, cirr_query, ...")
    p.add_argument("--category", default=None, help="FashionIQ category for fashioniq_* templates")
    p.add_argument("--revision", default=None, help="hub revision (commit) to load")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=None, help="token cap per input (text is shortened, template kept)")
    p.add_argument("--no-normalize", action="store_true", help="write raw embeddings (default: L2-normalised)")
    p.add_argument("--on-bad-image", choices=["raise", "skip"], default="raise")
    p.add_argument("--data-root", type=Path, default=None, help="root for JSONL image paths (default: the JSONL's folder)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow checkpoint code (phi3_v only)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out")
    return p


def read_texts(path: Path) -> tuple[list[str], list[str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise SystemExit(f"{path}: not valid UTF-8 ({e})") from e
    except FileNotFoundError:
        raise SystemExit(f"{path}: file not found") from None
    for i, line in enumerate(lines):
        if not line.strip():
            raise SystemExit(f"{path}:{i + 1}: empty line; remove it (every line is one input)")
    return lines, [str(i) for i in range(len(lines))]


def read_images(folder: Path) -> tuple[list[Path], list[str]]:
    if not folder.is_dir():
        raise SystemExit(f"{folder}: not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise SystemExit(f"{folder}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files, [str(p.relative_to(folder)) for p in files]


def read_jsonl(path: Path, root: Path | None) -> tuple[list[tuple[Path, str]], list[str]]:
    from e5v.data.paths import safe_join

    root = root or path.parent
    pairs, ids = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SystemExit(f"{path}: file not found") from None
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}:{n + 1}: invalid JSON ({e})") from e
        for key in ("image", "text"):
            if not isinstance(row.get(key), str):
                raise SystemExit(f"{path}:{n + 1}: key '{key}' must be a string (got {row.get(key)!r})")
        pairs.append((safe_join(root, row["image"], where=f"{path}:{n + 1}"), row["text"]))
        ids.append(str(row.get("id", n)))
    if len(set(ids)) != len(ids):
        raise SystemExit(f"{path}: duplicate ids")
    return pairs, ids


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out: Path = args.out
    targets = [out / "embeddings.npy", out / "ids.txt", out / "meta.json"]
    if any(t.exists() for t in targets) and not args.overwrite:
        raise SystemExit(f"{out} already holds embeddings; pass --overwrite to replace them")

    import numpy as np

    from e5v import Embedder
    from e5v.data.atomic import atomic_write, atomic_write_text

    if args.texts:
        inputs, ids = read_texts(args.texts)
    elif args.images:
        inputs, ids = read_images(args.images)
    else:
        inputs, ids = read_jsonl(args.jsonl, args.data_root)

    kwargs = {"revision": args.revision} if args.revision else {}
    if args.trust_remote_code:
        kwargs["trust_remote_code"] = True
    emb = Embedder.from_pretrained(
        args.model,
        prompt=args.prompt,
        dtype=args.dtype,
        device=args.device,
        batch_size=args.batch_size,
        max_length=args.max_length,
        on_bad_image=args.on_bad_image,
        progress=True,
        **kwargs,
    )
    normalize = not args.no_normalize
    if args.texts:
        vectors = emb.encode_text(inputs, normalize=normalize, template=args.template or "text", category=args.category)
    elif args.images:
        vectors = emb.encode_image(inputs, normalize=normalize, template=args.template or "image", category=args.category)
    else:
        vectors = emb.encode_interleaved(
            inputs, template=args.template or "cirr_query", normalize=normalize, category=args.category
        )
    skipped = {s.index for s in emb.last_skipped}
    kept_ids = [i for n, i in enumerate(ids) if n not in skipped]
    assert len(kept_ids) == len(vectors)
    atomic_write(out / "embeddings.npy", lambda f: np.save(f, vectors))
    atomic_write_text(out / "ids.txt", "".join(f"{i}\n" for i in kept_ids))
    meta = {
        "model": args.model,
        "prompt": emb.prompt.name,
        "template": args.template,
        "dtype": args.dtype,
        "normalized": normalize,
        "count": len(kept_ids),
        "dim": int(vectors.shape[1]),
        "truncated": [ids[i] for i in emb.last_truncated],
        "skipped": [{"id": ids[s.index], "source": s.source, "reason": s.reason} for s in emb.last_skipped],
    }
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    print(f"wrote {len(kept_ids)} x {vectors.shape[1]} embeddings to {out}" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
