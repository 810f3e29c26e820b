"""e5v-merge: fold a trained LoRA adapter into the full MLLM and save a Hugging Face directory.

  e5v-merge outputs/train/RUN OUT                                   # the run's newest complete checkpoint
  e5v-merge outputs/train/RUN/checkpoints/step-001000 OUT           # one step (its adapter/ folder)
  e5v-merge outputs/train/RUN/checkpoints/step-001000/adapter OUT   # the adapter folder itself
  e5v-merge ADAPTER OUT --base /models/llama3-llava-next-8b-hf --allow-other-base   # a local copy of the base

OUT must not exist or be empty; it and the adapter are checked before anything loads. The output
(safetensors + processor) loads with Embedder.from_pretrained(OUT) and with transformers'
LlavaNextForConditionalGeneration.from_pretrained(OUT). Errors are one line (E5V_FULL_ERROR=1 for a traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from e5v.cli.errors import UserError, cli_main

PROG = "e5v-merge"


def check_input(path: Path) -> None:
    """The plain mistakes, in the user's terms, before e5v.lora.resolve_adapter looks inside."""
    if not path.exists():
        raise UserError(
            f"{path}: no such folder (give an adapter folder, a checkpoint step folder or a training run folder)"
        )
    if not path.is_dir():
        raise UserError(f"{path} is a file; give an adapter folder, a checkpoint step folder or a training run folder")
    ckpts = path / "checkpoints"
    if ckpts.is_dir() and not any(c.name.startswith("step-") for c in ckpts.iterdir()):
        raise UserError(f"{path}: the run has no checkpoint yet ({ckpts} holds no step-* folder)")
    if (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise UserError(f"{path} is a full model (config.json), not a LoRA adapter: there is nothing to merge")


def check_output(out: Path) -> None:
    """OUT is new or an empty folder, its parent can be written, no half-written merge is in the way."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file; choose a new folder")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"output {out} is not empty; choose a new folder")
    partial = out.with_name(f".{out.name}.partial")
    if partial.exists():
        raise UserError(f"{partial} is left from an interrupted merge; delete it, then run again")
    base = out.absolute().parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise UserError(f"output {out}: {base} is a file, so the folder cannot be created")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"output {out}: {base} is not writable")


@cli_main(PROG)
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("adapter", help="adapter folder, checkpoint step folder (checkpoints/step-N) or training run folder")
    p.add_argument("out", help="new output folder (must not exist or be empty)")
    p.add_argument("--base", default=None, help="override the base model (hub id or local dir) recorded in the adapter")
    p.add_argument("--allow-other-base", action="store_true",
                   help="with --base: accept a base other than the recorded one (e.g. a local copy of the same "
                   "weights)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args(argv)
    if args.allow_other_base and not args.base:
        raise UserError("--allow-other-base only applies with --base (the adapter's recorded base is used otherwise)")

    check_input(Path(args.adapter))
    out = Path(args.out)
    check_output(out)
    if args.base:
        from e5v.backbones.auto import check_model

        check_model(args.base)
    from e5v.lora import merge_to_dir, resolve_adapter

    adapter = resolve_adapter(args.adapter)  # run folder -> newest complete step; step folder -> adapter/ (verified)
    if adapter != Path(args.adapter):
        print(f"{PROG}: merging {adapter}", file=sys.stderr)
    merged = merge_to_dir(adapter, out, base=args.base, dtype=args.dtype, allow_other_base=args.allow_other_base)
    print(f"merged {adapter} into {merged}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
