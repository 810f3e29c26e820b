"""e5v-merge: fold a trained LoRA adapter into the full MLLM and save a Hugging Face directory.

  e5v-merge outputs/train/RUN/checkpoints/step-001000/adapter outputs/merged/my-e5v
  e5v-merge ADAPTER OUT --base /models/llama3-llava-next-8b-hf   # base weights from a local copy

The output (safetensors + processor) loads with Embedder.from_pretrained(OUT) and with
transformers' LlavaNextForConditionalGeneration.from_pretrained(OUT).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="e5v-merge", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("adapter", help="adapter directory written by e5v-train (checkpoints/step-N/adapter)")
    p.add_argument("out", help="new output directory (must not exist or be empty)")
    p.add_argument("--base", default=None, help="override the base model (hub id or local dir) recorded in the adapter")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args(argv)
    from e5v.lora import merge_to_dir

    out = merge_to_dir(args.adapter, args.out, base=args.base, dtype=args.dtype)
    print(f"merged {args.adapter} into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
