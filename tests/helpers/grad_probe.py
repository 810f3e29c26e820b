"""Run ONE training step and save the full gradients of every LoRA parameter (before the update).

  python tests/helpers/grad_probe.py OUT.safetensors key=value ...          (one process)
  torchrun --nproc_per_node 2 tests/helpers/grad_probe.py OUT.safetensors ... (two processes)
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch


def before_update(trainer: Any, hook: Callable[[Any], None]) -> None:
    """Call ``hook(trainer)`` after the last backward of each optimizer step, just before the update: the
    engine's ``step`` on a gradient-accumulation boundary (patched on this trainer's engine only)."""
    engine = trainer.engine
    real_step = engine.step

    def step(*args: Any, **kwargs: Any) -> Any:
        if engine.is_gradient_accumulation_boundary():
            hook(trainer)
        return real_step(*args, **kwargs)

    engine.step = step


def main() -> None:
    out, overrides = sys.argv[1], sys.argv[2:]
    from deepspeed.utils import safe_get_full_grad
    from safetensors.torch import save_file

    from e5v import distributed as D
    from e5v.config import compose
    from e5v.train import Trainer

    D.init_from_env()
    cfg = compose("train", ["experiment=tiny_cpu", "logger=none", "run_name=probe", *overrides])
    trainer = Trainer(cfg, "/tmp/unused-probe-dir")
    trainer.setup()
    grads: dict[str, torch.Tensor] = {}

    def capture(t: Trainer) -> None:
        for name, p in t.engine.module.named_parameters():
            if p.requires_grad:
                g = safe_get_full_grad(p)
                grads[name] = g.detach().float().cpu().clone()

    before_update(trainer, capture)
    m = trainer.train_step()
    if D.is_main():
        save_file(grads, out)
        print(f"loss={m['loss']:.6f} params={len(grads)}")
    D.shutdown()


if __name__ == "__main__":
    main()
