"""e5v-encode: embed a text file, an image folder, or a JSONL of {image, text} pairs.

Examples:
  e5v-encode --model tiny --texts sentences.txt --out runs/texts
  e5v-encode --model royokong/e5-v --images photos/ --out runs/photos --on-bad-image skip
  e5v-encode --model royokong/e5-v --jsonl queries.jsonl --template cirr_query --out runs/cirr

Writes OUT/embeddings.npy (n, d) float32, OUT/ids.txt (one id per row, same order) and OUT/meta.json.
Text file: one text per line, UTF-8 (a byte-order mark is dropped; ids = line numbers from 0); not a CSV:
write the text column to a .txt.
Image folder: every image file below it, sorted (ids = relative paths). JSONL: one object per line with
"image" (path relative to the JSONL's folder, or --data-root) and "text", optional "id" (default: line
number from 0; ids must be unique). An empty text file, image folder or JSONL is an error.

Bad images (empty, truncated, not an image, missing): by default the run stops and names every one
without writing anything; --on-bad-image skip embeds the others and lists the skipped files in meta.json.
Options are checked before the model loads. Errors are one line (E5V_FULL_ERROR=1 for a traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from e5v.cli.errors import UserError, cli_main
from e5v.config import embedder_defaults

PROG = "e5v-encode"
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DEFAULT_TEMPLATE = {"texts": "text", "images": "image", "jsonl": "cirr_query"}
JSONL_KEYS = ("image", "text", "id")
SKIP_HINT = (
    "hint: fix or remove them, or pass --on-bad-image skip to embed the others (the skipped are listed in meta.json)"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--texts", type=Path, help="UTF-8 text file, one input per line")
    src.add_argument("--images", type=Path, help="folder of images (searched recursively)")
    src.add_argument("--jsonl", type=Path, help='JSONL with {"image": path, "text": str[, "id": ...]} per line')
    p.add_argument("--out", type=Path, required=True,
                   help="output folder (new, or holding no embeddings: embeddings.npy, ids.txt and meta.json are "
                        "replaced only with --overwrite; other files there are left alone)")
    p.add_argument("--model", default="royokong/e5-v", help="hub id, local directory or a registered builtin name (tiny, tiny_qwen2_vl, ...)")
    p.add_argument("--prompt", default=None, help="prompt config name (default: the one matching the backbone)")
    p.add_argument("--template", default=None,
                   help="prompt body: text (default for --texts), image (--images), cirr_query (--jsonl), sts, ...")
    p.add_argument("--category", default=None,
                   help="FashionIQ category (dress, shirt, toptee) for fashioniq_* templates")
    p.add_argument("--revision", default=None, help="hub revision (commit) to load")
    # option defaults: configs/embedder/default.yaml (the Embedder's one set of defaults)
    d = embedder_defaults()
    p.add_argument("--dtype", default=d["dtype"], choices=["auto", "float32", "bfloat16", "float16"],
                   help=f"auto: bfloat16 on CUDA (float16 on GPUs without bf16), float32 on CPU (default {d['dtype']})")
    p.add_argument("--device", default=d["device"], help=f"auto (CUDA when available) | cpu | cuda | cuda:N "
                                                         f"(default {d['device']})")
    p.add_argument("--batch-size", type=int, default=d["batch_size"],
                   help=f"inputs per forward pass (>= 1; default {d['batch_size']})")
    p.add_argument("--max-length", type=int, default=d["max_length"],
                   help="token cap per input (>= 1; text is shortened, template kept; default: the model's limit)")
    p.add_argument("--max-batch-tokens", type=int, default=d["max_batch_tokens"],
                   help="cap on padded tokens per batch (rows x longest, >= 1; e.g. 65536 for LLaVA-NeXT-8B images "
                        "on one GPU; default: --batch-size alone decides)")
    p.add_argument("--num-workers", type=int, default=d["num_workers"],
                   help=f"DataLoader workers decoding images while the model runs (>= 0; default {d['num_workers']})")
    p.add_argument("--pin-memory", choices=["auto", "true", "false"],
                   default={None: "auto", True: "true", False: "false"}[d["pin_memory"]],
                   help="pinned host memory + non-blocking copies (auto: on CUDA)")
    p.add_argument("--packing", choices=["auto", "true", "false"], default=str(d["packing"]).lower(),
                   help="rows packed without padding, same embeddings (auto: on CUDA where it saves >= 10%% of a "
                        f"batch's tokens; default {str(d['packing']).lower()})")
    p.add_argument("--pack-tokens", type=int, default=d["pack_tokens"],
                   help="tokens per packed row (>= 1; default: the backbone's)")
    p.add_argument("--compile", action="store_true", default=d["compile"],
                   help="torch.compile the decoder (a warm-up per input kind; faster after it)")
    p.add_argument("--dim", type=int, default=d["dim"],
                   help="Matryoshka width: the first N coordinates of each embedding, re-normalised unless "
                        "--no-normalize (>= 1, at most the model's hidden size; default: the full width)")
    p.add_argument("--no-normalize", action="store_true", help="write raw embeddings (default: L2-normalised)")
    p.add_argument("--on-bad-image", choices=["raise", "skip"], default="raise",
                   help="raise (default): stop and name every bad image; skip: embed the others")
    p.add_argument("--data-root", type=Path, default=None,
                   help="root for JSONL image paths (default: the JSONL's folder)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="refused with the reason: every backbone loads natively (Phi-3-V too since issue 20)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the embeddings.npy, ids.txt and meta.json already in --out")
    return p


@dataclass
class Inputs:
    """What to embed: ``items`` (texts, image paths or (image, text) pairs), their ids, and per item a label
    naming where it came from (file, line, id) for error messages."""

    kind: str
    items: list[Any]
    ids: list[str]
    where: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- inputs
def _wrong_kind_hint(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "hint: for {image, text} rows use --jsonl"
    if suffix in IMAGE_EXTENSIONS:
        return "hint: for images pass their folder with --images"
    return ""


def read_texts(path: Path) -> tuple[list[str], list[str]]:
    if path.is_dir():
        raise UserError(f"--texts {path} is a folder; --texts takes a text file (for a folder of images use --images)")
    if path.suffix.lower() in (".csv", ".tsv", ".json", ".jsonl") or path.suffix.lower() in IMAGE_EXTENSIONS:
        raise UserError(
            f"--texts {path}: a {path.suffix} file is not a plain text file (one input per line, no header)\n"
            + (_wrong_kind_hint(path) or "hint: write the text column to a .txt file, one text per line")
        )
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark (Windows editors) is not text
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 ({e})") from None
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    if not lines:
        raise UserError(f"{path} is empty: nothing to encode (the file must hold one input per line)")
    empty = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if empty:
        more = f" ({len(empty)} empty lines in all)" if len(empty) > 1 else ""
        raise UserError(f"{path}:{empty[0]}: empty line{more}; remove it (every line is one input)")
    return lines, [str(i) for i in range(len(lines))]


def read_images(folder: Path) -> tuple[list[Path], list[str]]:
    if not folder.exists():
        raise UserError(f"--images {folder}: no such folder")
    if not folder.is_dir():
        hint = _wrong_kind_hint(folder) if folder.suffix.lower() not in IMAGE_EXTENSIONS else ""
        if folder.suffix.lower() == ".txt":
            hint = "hint: for a text file use --texts"
        msg = f"--images {folder} is not a folder (--images takes a folder of images)"
        raise UserError(msg + (f"\n{hint}" if hint else ""))
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UserError(f"{folder}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}): nothing to encode")
    return files, [str(p.relative_to(folder)) for p in files]


def read_jsonl(path: Path, root: Path | None) -> tuple[list[tuple[Path, str]], list[str], list[str]]:
    """(pairs, ids, labels naming file, line, id and image). Every row is checked: a JSON object with string
    ``image`` and ``text`` and an optional string or integer ``id``; ids are unique. Errors name the line and id."""
    from e5v.data.paths import safe_join

    if path.is_dir():
        raise UserError(f"--jsonl {path} is a folder; --jsonl takes a .jsonl file")
    root = root or path.parent
    pairs, ids, labels = [], [], []
    unknown: dict[str, int] = {}
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark is not part of line 1
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 ({e})") from None
    first_line: dict[str, int] = {}
    duplicates: list[tuple[int, str]] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: invalid JSON ({e})") from None
        if not isinstance(row, dict):
            raise UserError(
                f'{path}:{n}: each line must be a JSON object {{"image": ..., "text": ...}}, got {type(row).__name__}'
            )
        rid = row.get("id", n - 1)
        if "id" in row and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
            raise UserError(f"{path}:{n}: key 'id' must be a string or an integer (got {rid!r})")
        at = f"{path}:{n} (id {rid!r})" if "id" in row else f"{path}:{n}"
        for key in ("image", "text"):
            if key not in row:
                keys = ", ".join(row) or "none"
                raise UserError(
                    f"{at}: key '{key}' is missing (the row has: {keys}; expected: image, text and optional id)"
                )
            if not isinstance(row[key], str):
                raise UserError(f"{at}: key '{key}' must be a string (got {row[key]!r})")
        for k in row:
            if k not in JSONL_KEYS:
                unknown.setdefault(k, n)
        rid = str(rid)
        if rid in first_line:
            duplicates.append((n, rid))
        else:
            first_line[rid] = n
        pairs.append((safe_join(root, row["image"], where=f"{path}:{n}"), row["text"]))
        ids.append(rid)
        labels.append(f"{path}:{n} (id {rid!r}): {row['image']}")
    if duplicates:
        n, rid = duplicates[0]
        more = f" ({len(duplicates)} repeated ids in all)" if len(duplicates) > 1 else ""
        raise UserError(f"{path}:{n}: duplicate id {rid!r} (first on line {first_line[rid]}){more}; ids must be unique")
    if not pairs:
        raise UserError(f"{path} has no rows: nothing to encode")
    if unknown:
        listed = ", ".join(f"'{k}' (line {n})" for k, n in unknown.items())
        print(f"{PROG}: warning: {path}: ignoring unknown key(s) {listed}; rows take image, text and id",
              file=sys.stderr)
    return pairs, ids, labels


def read_inputs(args: argparse.Namespace) -> Inputs:
    if args.texts:
        texts, ids = read_texts(args.texts)
        return Inputs("texts", texts, ids, [f"{args.texts}:{i + 1}" for i in range(len(texts))])
    if args.images:
        files, ids = read_images(args.images)
        return Inputs("images", files, ids, [str(f) for f in files])
    pairs, ids, labels = read_jsonl(args.jsonl, args.data_root)
    return Inputs("jsonl", pairs, ids, labels)


# ---------------------------------------------------------------------------------------------- checks
def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_options(args: argparse.Namespace) -> None:
    """Numbers, output folder: one line naming the option, the value and what is allowed (no model loaded)."""
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be a whole number >= 1 (default 32)")
    if args.max_length is not None and args.max_length < 1:
        raise UserError(f"--max-length {args.max_length}: must be >= 1 (leave it out for the model's own limit)")
    if args.max_batch_tokens is not None and args.max_batch_tokens < 1:
        raise UserError(f"--max-batch-tokens {args.max_batch_tokens}: must be >= 1 (leave it out for no cap)")
    if args.num_workers < 0:
        raise UserError(f"--num-workers {args.num_workers}: must be >= 0 (0 = decode in the main process)")
    if args.pack_tokens is not None and args.pack_tokens < 1:
        raise UserError(f"--pack-tokens {args.pack_tokens}: must be >= 1 (leave it out for the backbone's width)")
    if args.dim is not None and args.dim < 1:
        raise UserError(f"--dim {args.dim}: must be >= 1 (leave it out for the full width)")
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; --out takes a folder (new, or one holding no embeddings yet)")
    targets = [out / "embeddings.npy", out / "ids.txt", out / "meta.json"]
    if any(t.exists() for t in targets) and not args.overwrite:
        raise UserError(f"{out} already holds embeddings; pass --overwrite to replace them")
    base = _nearest_existing(out)
    if not base.is_dir():
        raise UserError(f"--out {out}: {base} is a file, so the folder cannot be created")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {base} is not writable")


def check_template(args: argparse.Namespace, kind: str) -> str:
    """The template name for ``kind``, checked against the prompt's bodies (it must take this kind of input)."""
    import difflib

    from e5v.config import config_dir
    from e5v.prompts import CATEGORY, FASHIONIQ_WORD, IMAGE, SENT, load_prompt

    known_prompts = sorted(p.stem for p in (config_dir() / "prompt").glob("*.yaml"))
    if args.prompt is not None and args.prompt not in known_prompts:
        raise UserError(f"--prompt {args.prompt!r}: unknown prompt config; choose one of {', '.join(known_prompts)}")
    prompt = load_prompt(args.prompt or "e5v_llama3")  # the default prompts (Llama-3, Mistral, Phi-3) share bodies
    template = args.template or DEFAULT_TEMPLATE[kind]
    if template not in prompt.bodies:
        close = difflib.get_close_matches(template, list(prompt.bodies), n=1)
        raise UserError(
            f"--template {template!r}: unknown template; choose one of {', '.join(sorted(prompt.bodies))}"
            + (f" (did you mean {close[0]}?)" if close else "")
        )
    body = prompt.bodies[template]
    takes = (SENT in body, IMAGE in body)
    wanted = {"texts": (True, False), "images": (False, True), "jsonl": (True, True)}[kind]
    if takes != wanted:
        fits = sorted(k for k, b in prompt.bodies.items() if (SENT in b, IMAGE in b) == wanted and k != "train")
        what = {(True, False): "a text only", (False, True): "an image only", (True, True): "an image and a text"}
        raise UserError(
            f"--template {template!r} takes {what.get(takes, 'no input')}, but --{kind} gives {what[wanted]}; "
            f"use one of: {', '.join(fits) or 'none in this prompt'}"
        )
    if CATEGORY in body and not args.category:
        raise UserError(f"--template {template!r} needs --category (one of {', '.join(FASHIONIQ_WORD)})")
    if args.category and CATEGORY not in body:
        users = sorted(k for k, b in prompt.bodies.items() if CATEGORY in b)
        raise UserError(f"--category {args.category!r} is only used by the templates {', '.join(users)}; drop it")
    return template


def check_device_dtype(device: str, dtype: str) -> str:
    """Validate --device; resolve --dtype auto (bfloat16 on CUDA, float16 where bf16 is unsupported, float32 on CPU)."""
    import torch

    if device != "auto":
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError):
            raise UserError(f"--device {device!r}: not a device; use auto, cpu, cuda or cuda:N") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise UserError(f"--device {device}: CUDA is not available on this machine; use --device cpu (or auto)")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                                f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    else:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from e5v.backbones.base import dtype_name

    return dtype_name(dtype, dev)


def _short(reason: str) -> str:
    """``cannot identify image (PIL's long text naming the path again)`` -> ``cannot identify image``."""
    return reason.split(" (", 1)[0]


def bad_images_error(labels: list[str], reasons: list[str], total: int) -> UserError:
    listed = ", ".join(f"{w} ({_short(r)})" for w, r in zip(labels, reasons))
    if len(labels) == 1:
        head = f"bad image {labels[0]}: {_short(reasons[0])}"
    else:
        head = f"{len(labels)} of {total} images are bad: {listed}"
    return UserError(f"{head}\n{SKIP_HINT}")


def find_bad_images(inputs: Inputs) -> UserError | None:
    """Open every image's header (cheap, no decoding): missing, empty and non-image files. When one is bad the
    run fails anyway, so the others are then fully decoded too: the error names every bad file at once
    (truncated data included). With clean headers, truncated files are found while encoding."""
    from e5v.data.images import BadImageError, load_image, open_image

    paths = inputs.items if inputs.kind == "images" else [p for p, _ in inputs.items]
    bad: dict[int, str] = {}
    for i, p in enumerate(paths):
        try:
            open_image(p, i).close()
        except BadImageError as e:
            bad[i] = e.reason
    if not bad:
        return None
    rest = [i for i in range(len(paths)) if i not in bad]
    if len(rest) > 1000:
        print(f"{PROG}: {len(bad)} bad image(s); decoding the other {len(rest)} to name every bad one ...",
              file=sys.stderr)
    for i in rest:
        try:
            load_image(paths[i], i).close()
        except BadImageError as e:
            bad[i] = e.reason
    order = sorted(bad)
    return bad_images_error([inputs.where[i] for i in order], [bad[i] for i in order], len(paths))


class _DropSkipWarning(logging.Filter):
    """In raise mode the embedder runs with skip (to find every bad image); its 'skipped' warning would mislead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("skipped ")


# ---------------------------------------------------------------------------------------------- main
@cli_main(PROG)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out: Path = args.out
    check_options(args)
    inputs = read_inputs(args)
    template = check_template(args, inputs.kind)
    from e5v.backbones.auto import check_model

    check_model(args.model, args.revision)
    if inputs.kind != "texts" and args.on_bad_image == "raise":
        bad = find_bad_images(inputs)
        if bad is not None:
            raise bad
    dtype = check_device_dtype(args.device, args.dtype)

    import numpy as np

    from e5v import Embedder
    from e5v.data.atomic import atomic_write, atomic_write_text

    kwargs = {"revision": args.revision} if args.revision else {}
    if args.trust_remote_code:
        kwargs["trust_remote_code"] = True
    emb = Embedder.from_pretrained(
        args.model,
        prompt=args.prompt,
        dtype=dtype,
        device=args.device,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_batch_tokens=args.max_batch_tokens,
        num_workers=args.num_workers,
        pin_memory={"auto": None, "true": True, "false": False}[args.pin_memory],
        packing=args.packing,
        pack_tokens=args.pack_tokens,
        compile=args.compile,
        dim=args.dim,
        on_bad_image="skip",  # every bad image is found; in raise mode they are all named below and nothing is written
        progress=True,
        **kwargs,
    )
    normalize = not args.no_normalize
    quiet = _DropSkipWarning()
    if args.on_bad_image == "raise":
        logging.getLogger("e5v.embedder").addFilter(quiet)
    try:
        if inputs.kind == "texts":
            vectors = emb.encode_text(inputs.items, normalize=normalize, template=template, category=args.category)
        elif inputs.kind == "images":
            vectors = emb.encode_image(inputs.items, normalize=normalize, template=template, category=args.category)
        else:
            vectors = emb.encode_interleaved(
                inputs.items, template=template, normalize=normalize, category=args.category
            )
    finally:
        logging.getLogger("e5v.embedder").removeFilter(quiet)
    ids = inputs.ids
    if emb.last_skipped and args.on_bad_image == "raise":
        bad = emb.last_skipped
        raise bad_images_error([inputs.where[s.index] for s in bad], [s.reason for s in bad], len(ids))
    skipped = {s.index for s in emb.last_skipped}
    kept_ids = [i for n, i in enumerate(ids) if n not in skipped]
    assert len(kept_ids) == len(vectors)
    if not kept_ids:
        raise UserError(f"nothing to write: all {len(ids)} images were skipped as bad "
                        f"(first: {inputs.where[emb.last_skipped[0].index]}: {_short(emb.last_skipped[0].reason)})")
    atomic_write(out / "embeddings.npy", lambda f: np.save(f, vectors))
    atomic_write_text(out / "ids.txt", "".join(f"{i}\n" for i in kept_ids))
    meta = {
        "model": args.model,
        "prompt": emb.prompt.name,
        "template": template,
        "dtype": dtype,
        "normalized": normalize,
        "options": {"batch_size": args.batch_size, "max_batch_tokens": args.max_batch_tokens,
                    "num_workers": args.num_workers, "packing": args.packing, "pack_tokens": args.pack_tokens,
                    "compile": args.compile, "dim": args.dim},
        "packed": emb.last_packed,  # whether any batch ran packed (same embeddings as padded, tested)
        "count": len(kept_ids),
        "dim": int(vectors.shape[1]),
        "truncated": [ids[i] for i in emb.last_truncated],
        "skipped": [{"id": ids[s.index], "source": s.source, "reason": s.reason} for s in emb.last_skipped],
    }
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    note = f" ({len(skipped)} skipped)" if skipped else ""
    print(f"wrote {len(kept_ids)} x {vectors.shape[1]} embeddings to {out}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
