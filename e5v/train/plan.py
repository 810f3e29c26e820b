"""The batch plan and the checks a training config passes before any data or model is touched: numeric ranges,
global = micro x chunks x world, the gradient scale, the optimizer and the DeepSpeed config."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from e5v import packing
from e5v.errors import ConfigError

__all__ = ["BatchPlan", "plan_batches", "validate_config", "gradient_scale", "build_optimizer", "deepspeed_config"]


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    world: int
    local: int  # rows per rank per optimizer step
    micro: int  # rows per forward
    chunks: int  # forwards (with grad) per rank per optimizer step
    grad_cache: bool

    @property
    def negatives_per_loss(self) -> int:
        """How many positives (and as many hard negatives) each anchor is contrasted with."""
        return self.global_batch if self.grad_cache else self.micro * self.world


# (key, kind, low, low_inclusive, high, high_inclusive): checked before anything is built.
_RANGES: tuple[tuple[str, type, float | None, bool, float | None, bool], ...] = (
    ("loss.temperature", float, 0.0, False, None, False),
    ("optim.lr", float, 0.0, False, None, False),
    ("optim.eps", float, 0.0, False, None, False),
    ("optim.weight_decay", float, 0.0, True, None, False),
    ("optim.warmup_steps", int, 0, True, None, False),
    ("optim.max_grad_norm", float, 0.0, False, None, False),
    ("trainer.max_steps", int, 1, True, None, False),
    ("trainer.global_batch", int, 1, True, None, False),
    ("trainer.micro_batch", int, 1, True, None, False),
    ("trainer.save_every", int, 1, True, None, False),
    ("trainer.zero_stage", int, 0, True, 3, True),
    ("lora.r", int, 1, True, None, False),
    ("lora.alpha", float, 0.0, False, None, False),
    ("lora.dropout", float, 0.0, True, 1.0, False),
    ("seed", int, 0, True, None, False),
)


def _range_text(low: float | None, low_in: bool, high: float | None, high_in: bool) -> str:
    if high is None:
        return f"{'>=' if low_in else '>'} {low}"
    return f"in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"


def validate_config(cfg: Any) -> None:
    """Every numeric training option in its range, before any data or model is touched: one line naming
    the key, the value and the allowed range (a negative temperature trains "fine" and means nothing)."""
    from omegaconf import OmegaConf

    for key, kind, low, low_in, high, high_in in _RANGES:
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is int and ok_type and float(value) != int(value):
            ok_type = False
        allowed = _range_text(low, low_in, high, high_in)
        if not ok_type:
            raise ConfigError(f"{key}={value!r}: expected {'an integer' if kind is int else 'a number'} {allowed}")
        v = float(value)
        if math.isnan(v) or (low is not None and (v < low or (v == low and not low_in))) or (
            high is not None and (v > high or (v == high and not high_in))
        ):
            raise ConfigError(f"{key}={value}: must be {allowed}")
    betas = OmegaConf.select(cfg, "optim.betas", default=None)
    if betas is not None and (len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas)):
        raise ConfigError(f"optim.betas={list(betas)}: must be two numbers in [0, 1)")
    keep = OmegaConf.select(cfg, "trainer.keep_checkpoints", default=None)
    if keep is not None and (not isinstance(keep, int) or keep < 1):
        raise ConfigError(f"trainer.keep_checkpoints={keep!r}: must be an integer >= 1 (or null to keep all)")
    try:
        packing.packing_mode(OmegaConf.select(cfg, "trainer.packing", default="auto"))
        packing.check_pack_tokens(OmegaConf.select(cfg, "trainer.pack_tokens", default=None))
    except ValueError as e:
        raise ConfigError(f"trainer.{e}") from None
    epochs = OmegaConf.select(cfg, "trainer.epochs", default=None)
    if epochs is not None and (not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1):
        raise ConfigError(f"trainer.epochs={epochs!r}: must be an integer >= 1 (or null to use trainer.max_steps)")
    workers = OmegaConf.select(cfg, "trainer.num_workers", default="auto")
    if workers != "auto" and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 0):
        raise ConfigError(f"trainer.num_workers={workers!r}: must be auto or an integer >= 0")


def plan_batches(global_batch: int, micro: int, world: int, grad_cache: bool) -> BatchPlan:
    """Check global = micro x chunks x world up front, with the fix in the message."""
    if global_batch % world:
        raise ConfigError(
            f"trainer.global_batch={global_batch} is not divisible by the world size {world}; "
            f"use a multiple of {world}"
        )
    local = global_batch // world
    if local % micro:
        raise ConfigError(
            f"trainer.global_batch={global_batch} over {world} process(es) gives {local} rows per process, "
            f"not divisible by trainer.micro_batch={micro}; choose a micro batch that divides {local}"
        )
    return BatchPlan(global_batch, world, local, micro, local // micro, grad_cache)


GRADIENT_SCALES = ("exact", "release")


def gradient_scale(setting: Any, world: int) -> float:
    """The factor on the loss before backward. ``exact`` (1): the gradient of the global-batch loss, whatever
    the number of processes. ``release``: 1 / world size, what the released code gets (each rank computes
    the loss of the whole gathered batch with only its own rows differentiable, then DeepSpeed averages
    over ranks). A number: that factor (e.g. 0.03125 = the paper's 32 GPUs, on any number of processes)."""
    if isinstance(setting, str):
        if setting == "exact":
            return 1.0
        if setting == "release":
            return 1.0 / world
    elif isinstance(setting, (int, float)) and not isinstance(setting, bool) and 0 < float(setting) <= 1:
        return float(setting)
    raise ConfigError(f"loss.gradient_scale={setting!r}: must be exact, release or a number in (0, 1]")


# optim keys the trainer reads (the schedule, DeepSpeed's clipping); the rest are the optimizer's arguments
OPTIM_TRAINER_KEYS = ("warmup_steps", "max_grad_norm")


def build_optimizer(optim: Any, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer of ``optim`` (configs/optim/: a ``_target_`` with ``_partial_: true``) over ``params``."""
    from omegaconf import OmegaConf

    from e5v.config import instantiate

    node = OmegaConf.masked_copy(optim, [k for k in optim if k not in OPTIM_TRAINER_KEYS])
    return instantiate(node, _convert_="all")(params)


def deepspeed_config(cfg: Any, plan: BatchPlan) -> dict[str, Any]:
    t = cfg.trainer
    prec = str(t.precision)
    if prec not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"trainer.precision must be fp32, bf16 or fp16, got {prec!r}")
    conf: dict[str, Any] = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro,
        "gradient_accumulation_steps": plan.chunks,
        "gradient_clipping": float(cfg.optim.max_grad_norm),
        "zero_optimization": {"stage": int(t.zero_stage)},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if prec == "bf16":
        conf["bf16"] = {"enabled": True}
    elif prec == "fp16":
        conf["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000}
    return conf
