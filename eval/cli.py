"""e5v-eval: evaluate a model on the paper's benchmarks (Hydra app over ``configs/eval.yaml``; the library
function it calls is :func:`eval.runner.evaluate`).

  e5v-eval backbone=tiny suite=mini                      # every family on generated data, CPU, offline
  e5v-eval suite=paper embedder.dtype=float16            # the released model on the paper's data
  e5v-eval suite=paper benchmarks=[flickr30k,sts]        # a subset of a suite
  e5v-eval backbone=llava_next_llama3_8b report.reference=llava_next_8b_prompt
  e5v-eval checkpoint=outputs/train/merged               # a merged save_pretrained directory
  torchrun --nproc_per_node 2 -m eval.cli backbone=tiny suite=mini hydra.run.dir=outputs/eval/ddp

Writes results.json, results.md and results.png into the Hydra run directory. A mistake you can fix is
reported in one line, "e5v-eval: error: ..." (HYDRA_FULL_ERROR=1 shows the traceback).
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from e5v.cli.errors import cli_errors, print_help_preface
from e5v.config import config_dir

PROG = "e5v-eval"
log = logging.getLogger("eval")


@hydra.main(config_path=str(config_dir()), config_name="eval", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    from e5v import console
    from e5v.distributed import rank
    from e5v.provenance import scrub_hydra_outputs
    from eval.runner import evaluate

    with cli_errors(PROG):  # inside the app: Hydra would print its own traceback otherwise
        scrub_hydra_outputs(HydraConfig.get())  # Hydra saved the command line: drop secrets from its copies
        out_dir = cfg.get("output_dir") or HydraConfig.get().runtime.output_dir
        # quiet console, everything in <run>/eval.log (verbose=true: everything on the console too)
        console.setup_run(out_dir, "eval", bool(cfg.get("verbose")), rank())
        try:
            results = evaluate(cfg, output_dir=out_dir)
        finally:
            console.close()
    if results is not None:
        print(f"\nresults in {out_dir}/results.md")
        for bench, metrics in results["metrics"].items():
            print(f"  {bench:>14}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))


def main() -> None:
    """Console entry point (``e5v-eval``). A mistake the user can fix (a missing data folder or checkpoint, a
    benchmark not in the suite ...) ends as one line ``e5v-eval: error: ...`` (exit 1, no traceback;
    HYDRA_FULL_ERROR=1 shows it)."""
    print_help_preface(__doc__)  # --help: what it does and examples before Hydra's config dump
    _app()


if __name__ == "__main__":
    sys.exit(main())
