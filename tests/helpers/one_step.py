"""Run ONE training step of each named experiment on the tiny backbone (CPU-safe overrides).

  python tests/helpers/one_step.py OUT_DIR DATA_DIR paper single_gpu_768 tiny_cpu
Prints one JSON line per experiment: {"experiment", "loss", "grad_cache", "train_mode"}.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    out, data, names = sys.argv[1], sys.argv[2], sys.argv[3:]
    from e5v import distributed as D
    from e5v.config import compose
    from e5v.train import Trainer

    D.init_from_env()
    for name in names:
        # stage 2 (multimodal rows from a stage-1 LoRA): the mini MMEB-train, a fresh LoRA
        data_cfg = (["data=mini_mmeb_train", "data.loader.n_rows=16", "lora.init_from=null"] if name.startswith("stage2")
                    else ["data=mini_nli"])
        cfg = compose("train", [
            f"experiment={name}", "backbone=tiny", *data_cfg, f"paths.data_dir={data}", "logger=none",
            "run_name=one-step", "trainer.precision=fp32", "lora.quantize=null", "trainer.global_batch=16",
            "trainer.micro_batch=8", "trainer.max_steps=1", "lora.r=4",
        ])
        trainer = Trainer(cfg, f"{out}/{name}")
        trainer.setup()
        m = trainer.train_step()
        print(json.dumps({"experiment": name, "loss": m["loss"], "grad_cache": bool(cfg.trainer.grad_cache),
                          "train_mode": cfg.prompt.train_mode}), flush=True)
    D.shutdown()


if __name__ == "__main__":
    main()
