"""Run ONE training step and save the full gradients of every LoRA parameter (before the update).

  python tests/helpers/grad_probe.py OUT.safetensors key=value ...          (one process)
  torchrun --nproc_per_node 2 tests/helpers/grad_probe.py OUT.safetensors ... (two processes)
  python tests/helpers/grad_probe.py OUT.safetensors --packed-too ...       (padded, then packed)

``--packed-too``: the step runs with padded batches (``trainer.packing=false``, written to OUT), then the LoRA
weights are put back and the SAME step runs again with packed batches (``trainer.packing=true``, written to
OUT with ``.packed`` before the suffix; its metadata records the rows and packed rows of every forward).
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
    packed_too = "--packed-too" in overrides
    overrides = [o for o in overrides if o != "--packed-too"] + (["trainer.packing=false"] if packed_too else [])
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
    trainable = [p for p in trainer.engine.module.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in trainable]
    m = trainer.train_step()
    if D.is_main():
        save_file(grads, out)
        print(f"loss={m['loss']:.6f} params={len(grads)}")
    if packed_too:
        padded = dict(grads)
        grads.clear()
        with torch.no_grad():  # the same weights as the padded step (the update changed them)
            for p, v in zip(trainable, start):
                p.copy_(v)
        trainer.cfg.trainer.packing = "true"
        trainer.cfg.trainer.pack_tokens = trainer.cfg.trainer.get("pack_tokens") or 256  # several rows per pack
        trainer.batches = trainer._step_batches()
        assert trainer.pack_text is not None, "the backbone did not pack text"
        chunks = trainer.batches.chunks(0)
        # (model rows, (packed rows, width)) of each forward; a padded forward has no last_index
        shapes = [(int(b["last_index"].numel()) if "last_index" in b else -1, tuple(b["input_ids"].shape))
                  for c in chunks for b in c.batches]
        m = trainer.train_step()  # trainer.step is still 0: the same rows
        if D.is_main():
            assert grads.keys() == padded.keys()
            meta = {"forwards": repr(shapes), "packed_text": str(trainer.pack_text),
                    "packed_images": str(trainer.pack_images)}
            save_file(grads, out.replace(".safetensors", ".packed.safetensors"), metadata=meta)
            print(f"packed loss={m['loss']:.6f} forwards={shapes}")
    D.shutdown()


if __name__ == "__main__":
    main()
