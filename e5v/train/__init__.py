"""Training, apart from the embedding library: the trainer (:mod:`.trainer`), its batch plan and checks
(:mod:`.plan`), resume guards (:mod:`.resume`), batches (:mod:`.batches`), losses (:mod:`.losses`), GradCache
(:mod:`.grad_cache`), checkpoints (:mod:`.checkpoint`), run identity (:mod:`.run_identity`) and run log
(:mod:`.run_log`). The library (``e5v.embedder``, ``e5v.backbones``, ``e5v.prompts``) never imports this package;
this package builds on it.

Run: ``e5v-train experiment=...`` or ``python -m e5v.train`` / ``torchrun ... -m e5v.train`` /
``deepspeed --module e5v.train`` (the launchers' form).

Names are loaded on first use, so ``import e5v.train.run_identity`` (config resolvers) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Trainer": "trainer",
    "TrainingDiverged": "trainer",
    "train": "trainer",
    "BatchPlan": "plan",
    "plan_batches": "plan",
    "validate_config": "plan",
    "gradient_scale": "plan",
    "build_optimizer": "plan",
    "deepspeed_config": "plan",
    "release_padding": "batches",
    "main": "cli",
    "ConfigError": "plan",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
