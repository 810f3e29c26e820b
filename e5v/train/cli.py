"""Contrastive LoRA training through DeepSpeed (ZeRO-2 by default): E5-V's text-only recipe (stage 1), image-caption
pairs (the paper's Table 7), or stage 2: multimodal, instruction-conditioned rows (MMEB-train, JSONL) with hard
negatives, from the stage-1 LoRA (docs/training.md).

Run (one process, CPU or one GPU):   e5v-train experiment=tiny_cpu
Stage 2 from a stage-1 run:           e5v-train experiment=stage2_tiny lora.init_from=outputs/train/<stage-1 run>
Several GPUs / nodes:                 torchrun --nproc_per_node 8 -m e5v.train experiment=paper
                                      deepspeed --hostfile hosts --module e5v.train experiment=paper
Global batch 768 on one GPU:          e5v-train experiment=single_gpu_768   (GradCache)

Each global step: this rank's share of the global batch of NLI triplets is encoded with the training
prompt, positives and hard negatives are gathered from every rank (gradients flow back), and the
InfoNCE loss over the global batch is minimised. With ``trainer.grad_cache=true`` the local share is
encoded in chunks without grad, the loss and its gradient w.r.t. the embeddings are taken on the
whole batch, then each chunk is re-encoded with grad (same RNG state, so the same dropout) and the
cached embedding gradients are back-propagated: the parameter gradients of the full batch at the
memory cost of one chunk.

Image-caption data (``data=mini_pairs``, ``data=llava_pretrain_558k``): anchors are images in the
prompt's IMAGE body (``<image>\nSummary above image in one word: `` in the chat wrapper), run through
the full MLLM (frozen vision tower and projector, LoRA language model), positives are captions in the
training template, and there are no hard negatives (InfoNCE over the global batch's positives).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from e5v import distributed as D
from e5v.train.trainer import train


def _strip_launcher_args() -> None:
    """The deepspeed launcher appends --local_rank=N; Hydra would reject it."""
    keep = []
    for a in sys.argv[1:]:
        if a.startswith("--local_rank"):
            os.environ["LOCAL_RANK"] = a.split("=", 1)[1] if "=" in a else os.environ.get("LOCAL_RANK", "0")
            continue
        keep.append(a)
    sys.argv[1:] = keep


def main() -> None:
    """Console entry point (``e5v-train``). A mistake the user can fix (ConfigError, DataError, a missing
    file ...) ends as one line ``e5v-train: error: ...`` (exit 1, no traceback; HYDRA_FULL_ERROR=1 shows it)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from e5v.cli.errors import cli_errors, print_help_preface
    from e5v.config import config_dir

    _strip_launcher_args()
    print_help_preface("\n\n".join((__doc__ or "").split("\n\n")[:2]))  # --help: what it does, examples

    with cli_errors("e5v-train"):

        @hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
        def _run(cfg: Any) -> None:
            from e5v import console
            from e5v.cli.hydra_run import promote_invocation
            from e5v.provenance import scrub_hydra_outputs

            # quiet console, everything in <run>/train.log (verbose=true: everything on the console too)
            console.setup_run(HydraConfig.get().runtime.output_dir, "train", bool(cfg.get("verbose")), D.rank())
            with cli_errors("e5v-train"):  # inside the app: Hydra would print its own traceback otherwise
                scrub_hydra_outputs(HydraConfig.get())  # Hydra saved the command line: drop secrets from its copies
                try:
                    summary = train(cfg, HydraConfig.get().runtime.output_dir,
                                    on_start=lambda: promote_invocation(HydraConfig.get()))
                    if D.is_main():
                        print(json.dumps(summary, indent=2))
                finally:
                    D.shutdown()
                    console.close()

        _run()


if __name__ == "__main__":
    main()
