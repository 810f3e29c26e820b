"""Contrastive LoRA training through DeepSpeed (ZeRO-2 by default): E5-V's text-only recipe, or
image-caption pairs (the paper's Table 7 comparison) when the data's ``anchor_kind`` is ``image``.

Run (one process, CPU or one GPU):   e5v-train experiment=tiny_cpu
Several GPUs / nodes:                 torchrun --nproc_per_node 8 -m e5v.train experiment=paper
                                      deepspeed --hostfile hosts e5v/train.py experiment=paper
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
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from e5v import checkpoint as ckpt
from e5v import distributed as D
from e5v import packing
from e5v.errors import ConfigError, E5VError
from e5v.losses import info_nce_hard_negatives
from e5v.run_log import require_values
from e5v.train_batches import Chunk, ChunkPreparer, StepBatches, release_padding

__all__ = ["Trainer", "train", "release_padding", "plan_batches", "validate_config"]

log = logging.getLogger("e5v.train")


ANCHOR_KINDS = ("text", "image")


class TrainingDiverged(E5VError, RuntimeError):
    """A non-finite loss: training stops without saving; the message names the last good checkpoint."""


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


class Trainer:
    def __init__(self, cfg: Any, out_dir: str | Path):
        from omegaconf import OmegaConf

        self.cfg = cfg
        self.out = Path(out_dir)
        self.ckpt_root = self.out / "checkpoints"
        require_values(cfg)  # before anything is built
        validate_config(cfg)
        t = cfg.trainer
        self.plan = plan_batches(int(t.global_batch), int(t.micro_batch), D.world_size(), bool(t.grad_cache))
        self.grad_scale = gradient_scale(cfg.loss.get("gradient_scale", "exact"), D.world_size())
        self.epochs = t.get("epochs")
        if self.epochs is not None and (not isinstance(self.epochs, int) or self.epochs < 1):
            raise ConfigError(f"trainer.epochs={self.epochs!r}: must be an integer >= 1 (or null to use trainer.max_steps)")
        self.max_steps = int(t.max_steps) if self.epochs is None else 0  # epochs: set once the data is loaded
        self.deepspeed_conf = deepspeed_config(cfg, self.plan)
        self.resolved = OmegaConf.to_container(cfg, resolve=True)
        self.losses: list[float] = []
        self.step = 0
        self._resume_path: Path | None = None
        self._resume_step = 0
        self._resume_state: dict[str, Any] = {}
        self.config_changes: list[str] = []
        self.already_complete = False  # resumed at trainer.max_steps: nothing to train, nothing loaded or written
        self.on_start: Callable[[], Any] | None = None  # called (rank 0) when training starts: see train()

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        import deepspeed
        from transformers import get_linear_schedule_with_warmup

        from e5v.config import instantiate
        from e5v.data.nli import StepSampler
        from e5v.lora import Encoder, add_lora, trainable_parameters
        from e5v.prompts import PromptSet
        from e5v.run_identity import data_identity

        cfg = self.cfg
        self.check_resume()  # a stale or mismatched run refuses before any data or model work
        self.prompt = PromptSet.from_config(cfg.prompt)
        # data first: a bad CSV fails before any model is loaded
        self.data = instantiate(cfg.data.loader)
        self.anchor_kind = str(getattr(self.data, "anchor_kind", "text"))
        if self.anchor_kind not in ANCHOR_KINDS:
            raise ConfigError(f"data anchor_kind must be one of {ANCHOR_KINDS}, got {self.anchor_kind!r}")
        if self.anchor_kind == "image":
            if self.data.negatives is not None:
                raise ConfigError("image-caption training takes no hard negatives (data negatives must be None)")
            self.image_prompt = self.prompt.render("image")  # validated before any model is loaded
        self.data_identity = data_identity(self.data)  # what this run trains on (recorded in every checkpoint)
        self.check_resume_data()  # an edited data file refuses before any model is loaded
        self.sampler = StepSampler(len(self.data), self.plan.global_batch, int(cfg.seed))
        if self.epochs is not None:  # the released script's schedule: whole epochs, linear decay to 0 at the end
            self.max_steps = int(self.epochs) * self.sampler.steps_per_epoch
            log.info("trainer.epochs=%d: %d steps (%d per epoch, last partial batch dropped)", self.epochs,
                     self.max_steps, self.sampler.steps_per_epoch)
            self.check_resume_step()
        if self._resume_path is not None and self._resume_step >= self.max_steps:
            self.already_complete = True  # fit() says so; no model, no engine, no file of the run touched
            return
        torch.manual_seed(int(cfg.seed) + D.rank())
        device = "cuda" if torch.cuda.is_available() else "cpu"
        from e5v.backbones.base import resolve_dtype

        load_dtype = resolve_dtype(str(cfg.trainer.precision))  # fp32 | bf16 | fp16 (checked in deepspeed_config)
        extra = {}
        if cfg.lora.get("quantize"):
            extra["quantize"] = cfg.lora.quantize
        backbone = instantiate(cfg.backbone, dtype=load_dtype, device=device, **extra)
        if self.anchor_kind == "image":
            from e5v.backbones.base import UnsupportedInputError

            try:
                backbone.require("image")
            except UnsupportedInputError as e:
                raise ConfigError(f"image-caption training: {e}") from None
        # The backbone's contract does everything model-specific, as in the Embedder: tokenizing, padding,
        # packing, positions, processor calls (self.inputs), LoRA targets and frozen modules (add_lora), the forward.
        self.backbone = backbone
        self.inputs = backbone.inputs()
        self.tokenizer = backbone.tokenizer
        self.processor, self.pad_id = backbone.processor, backbone.pad_token_id
        self.batches = self._step_batches()
        l = cfg.lora
        self.peft_model = add_lora(
            backbone,
            r=int(l.r),
            alpha=int(l.alpha),
            dropout=float(l.dropout),
            targets=list(l.targets) if l.get("targets") else None,  # None: the backbone's released targets
            activation_checkpointing=bool(cfg.trainer.activation_checkpointing),
        )
        self.encoder = Encoder(self.peft_model, backbone)
        self.encoder.train()
        params = trainable_parameters(self.encoder)
        optimizer = build_optimizer(cfg.optim, params)
        # linear warmup from 0 over optim.warmup_steps, then linear decay to 0 at the last step
        scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.optim.warmup_steps), self.max_steps)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.encoder, optimizer=optimizer, lr_scheduler=scheduler, config=self.deepspeed_conf
        )
        ckpt.use_safe_loading(self.engine)
        self.n_trainable = sum(p.numel() for p in params)
        self.adapter_meta = {
            "backbone": self.resolved["backbone"],
            "prompt": self.resolved["prompt"],
            "lora": self.resolved["lora"],
        }

    # ------------------------------------------------------------------ batches
    def _step_batches(self) -> StepBatches:
        """How a step's rows become model batches (:mod:`e5v.train_batches`): packed where the backbone packs
        exactly (``trainer.packing``; never with ``attend_padding``, the released padded batch by definition),
        prepared in ``trainer.num_workers`` DataLoader workers (``auto``: 4 for image anchors on CUDA, else 0)."""
        t, backbone = self.cfg.trainer, self.backbone
        setting = packing.packing_mode(t.get("packing", "auto"))
        attend = bool(t.attend_padding)
        if attend and setting == "true":
            log.warning("trainer.packing=true is ignored: trainer.attend_padding=true trains on the released "
                        "script's padded batches by definition")
        # None: padded; a number: packed when that removes at least this share of a forward's tokens
        self.pack_text = None if attend else backbone.pack_threshold("text", setting)
        self.pack_images = backbone.pack_threshold("image", setting) if self.anchor_kind == "image" else None
        workers = t.get("num_workers", "auto")
        if workers == "auto":
            cuda = backbone.device.type == "cuda"
            workers = min(4, max(1, (os.cpu_count() or 2) - 1)) if cuda and self.anchor_kind == "image" else 0
        eos = self.tokenizer.eos_token_id
        self.preparer = ChunkPreparer(
            self.data, self.prompt, self.inputs, self.anchor_kind, getattr(self, "image_prompt", None),
            pack_text=self.pack_text, pack_images=self.pack_images,
            pack_tokens=packing.check_pack_tokens(t.get("pack_tokens")) or backbone.default_pack_tokens(),
            attend_padding=attend, release_pad_id=int(eos if eos is not None else self.pad_id),
        )

        def how(threshold: float | None) -> str:
            return "padded" if threshold is None else f"packed when that saves >= {threshold:.0%} of a forward's tokens"

        log.info("training batches: text %s; images %s; %d data worker(s)", how(self.pack_text),
                 how(self.pack_images) if self.anchor_kind == "image" else "-", workers)
        return StepBatches(self.preparer, self.sampler, self.plan.micro, D.rank(), D.world_size(),
                           num_workers=int(workers), pin_memory=backbone.device.type == "cuda", stop=self.max_steps)

    def texts_for(self, rows: Any) -> list[str]:
        """Anchors, then positives, then negatives of ``rows``, rendered with the training template."""
        return self.preparer.texts_for(rows)

    def encode(self, chunk: Chunk | Any) -> torch.Tensor:
        """(k, b, d): k = 3 (anchor, positive, negative), 2 without hard negatives, or 2 for image-caption
        pairs (images in the image prompt through the full MLLM, then their captions). ``chunk``: a prepared
        :class:`~e5v.train_batches.Chunk` or the row indices (prepared here; a bad image raises, naming it).

        A deterministic function of the rows and the torch RNG state (LoRA dropout), as GradCache needs."""
        if not isinstance(chunk, Chunk):
            chunk = self.preparer(chunk).check()
        reps = [self._forward(b).float() for b in chunk.batches]
        if self.anchor_kind == "image":
            return torch.stack(reps)  # (2, b, d)
        return reps[0].view(-1, len(chunk.rows), reps[0].shape[-1])

    def _forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One engine forward of a batch from the backbone's Inputs (padded or packed): (B, d) last-token
        states, through the backbone's own forward (the Embedder's)."""
        device = self.engine.device
        non_blocking = device.type == "cuda"
        reps = self.engine(**{k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()})
        self._tokens += packing.real_tokens(batch)
        return reps

    def loss_of(self, reps: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        positives = D.gather_with_grad(reps[1])
        negatives = D.gather_with_grad(reps[2]) if reps.shape[0] > 2 else None
        return info_nce_hard_negatives(reps[0], positives, negatives, float(self.cfg.loss.temperature), offset)

    def check_finite(self, loss: torch.Tensor) -> None:
        if D.any_rank(not bool(torch.isfinite(loss).all())):
            last = ckpt.latest_checkpoint(self.ckpt_root)
            raise TrainingDiverged(
                f"non-finite loss at step {self.step + 1}; stopping without saving. The last good checkpoint "
                f"is {last or 'none (no checkpoint written yet)'}; lower optim.lr or check the data, then "
                "resume from it."
            )

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self) -> dict[str, float]:
        plan = self.plan
        chunks = self.batches.chunks(self.step)  # this rank's share, prepared (here or in data workers)
        self._tokens = 0
        losses, accs = [], []
        extra: dict[str, float] = {}
        if not plan.grad_cache:
            for chunk in chunks:
                reps = self.encode(chunk)
                loss, acc = self.loss_of(reps, offset=D.rank() * plan.micro)
                self.check_finite(loss)
                self.engine.backward(loss * self.grad_scale if self.grad_scale != 1.0 else loss)
                self.engine.step()
                losses.append(loss.item())
                accs.append(acc.item())
        else:
            from e5v.grad_cache import grad_cache_step

            def backward(surrogate: torch.Tensor, last: bool) -> None:
                self.engine.backward(surrogate, scale_wrt_gas=False)
                self.engine.step()

            def scaled_loss(reps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                loss, acc = self.loss_of(reps, offset=D.rank() * plan.local)
                return (loss * self.grad_scale if self.grad_scale != 1.0 else loss), acc

            loss, acc, replay = grad_cache_step(self.encode, chunks, scaled_loss, backward, check=self.check_finite)
            losses.append(loss.item() / self.grad_scale)
            accs.append(acc.item())
            extra["gradcache_replay_err"] = replay
            self._tokens //= 2  # each row was encoded twice (no-grad pass + replay); count it once
        return {"loss": sum(losses) / len(losses), "acc": sum(accs) / len(accs), "tokens": self._tokens, **extra}

    # ------------------------------------------------------------------ loop
    def trainer_state(self) -> dict[str, Any]:
        from e5v.run_identity import shaping_config

        return {
            "config": shaping_config(self.cfg),  # what a resumption must match (e5v.run_identity)
            "step": self.step,
            "max_steps": self.max_steps,
            "world_size": D.world_size(),
            "data": self.sampler.position(self.step),
            "data_identity": self.data_identity,  # the rows trained on (e5v.run_identity.data_identity)
            "losses": self.losses,
            "plan": asdict(self.plan),
        }

    def save(self) -> Path:
        from e5v.lora import save_adapter, trainable_parameters

        gather = None
        if int(self.cfg.trainer.zero_stage) == 3:
            import deepspeed

            params = trainable_parameters(self.encoder)
            gather = lambda: deepspeed.zero.GatheredParameters(params, modifier_rank=None)  # noqa: E731
        return ckpt.save(
            self.engine,
            self.ckpt_root,
            self.step,
            self.trainer_state(),
            lambda d: save_adapter(self.peft_model, d, {**self.adapter_meta, "step": self.step}),
            keep=self.cfg.trainer.get("keep_checkpoints"),
            gather=gather,
        )

    def check_resume(self) -> None:
        """Find the checkpoint to resume from and refuse, before anything is built, when its result-shaping
        config differs from this run's (listing the keys), or when it is already past ``max_steps``."""
        import json as _json

        from e5v.run_identity import differences, shaping_config

        mode = str(self.cfg.resume)
        if mode == "none":
            if ckpt.list_checkpoints(self.ckpt_root):
                raise ConfigError(
                    f"{self.ckpt_root} already holds checkpoints and resume=none; use resume=auto to continue "
                    "or a new run_name"
                )
            return
        # auto: the newest checkpoint whose files match its manifest (damaged ones are skipped, named in a warning)
        path = ckpt.resume_point(self.ckpt_root) if mode == "auto" else Path(mode)
        if path is None:
            return
        if not (path / ckpt.STATE_FILE).is_file():
            raise ConfigError(f"resume={path}: not a training checkpoint (no {ckpt.STATE_FILE})")
        state = _json.loads((path / ckpt.STATE_FILE).read_text())
        saved = state.get("config")
        if saved is None:
            log.warning("%s records no config (written by an older version): resuming without comparing configs", path)
        else:
            diff = differences(saved, shaping_config(self.cfg))
            if diff and not bool(self.cfg.get("allow_config_change", False)):
                raise ConfigError(
                    f"{path} was trained with another config ({len(diff)} difference(s): " + "; ".join(diff) + "). "
                    "Use a new run_name for a new run (the default run name carries a hash of these keys), or set "
                    "allow_config_change=true to continue this run with the new values"
                )
            if diff:
                log.warning("resuming %s with a changed config (allow_config_change=true): %s", path, "; ".join(diff))
            self.config_changes = diff
        self._resume_path, self._resume_step, self._resume_state = path, int(state.get("step", 0)), state
        if self.epochs is None:
            self.check_resume_step()

    def check_resume_data(self) -> None:
        """Refuse to resume over other training data than the checkpoint's (a CSV edited in place, another
        hub file or limit), unless ``allow_config_change=true``: the data is part of the result."""
        from e5v.run_identity import data_differences

        path = self._resume_path
        if path is None:
            return
        saved = self._resume_state.get("data_identity")
        if not saved:
            log.warning("%s records no data hash (written by an older version): resuming without checking that the "
                        "training data is unchanged", path)
            return
        if saved.get("sha256") == self.data_identity["sha256"]:
            return
        change = data_differences(saved, self.data_identity)
        if not bool(self.cfg.get("allow_config_change", False)):
            raise ConfigError(
                f"{path} was trained on other data ({change}): the data changed since (edited in place?). Use a new "
                "run_name to train on the data as it is now, restore the data to resume, or set "
                "allow_config_change=true to continue this run on the new data"
            )
        log.warning("resuming %s on changed data (allow_config_change=true): %s", path, change)
        self.config_changes.append(f"data: {change}")

    def check_resume_step(self) -> None:
        """Once this run's length is known: the checkpoint must not be past it, and it must have been trained
        on the same learning-rate schedule (linear decay to 0 at the LAST step: resuming a 40-step run for 80
        steps would restart the lr from 0 up the 80-step line), unless the steps trained so far lie within the
        warmup (the schedules agree there) or ``allow_config_change=true``."""
        from e5v.run_identity import schedule_lr

        path, done = self._resume_path, self._resume_step
        if path is None:
            return
        key = "trainer.epochs" if self.epochs is not None else "trainer.max_steps"
        if done > self.max_steps:
            raise ConfigError(
                f"{path} is at step {done}, beyond the {self.max_steps} steps of this run "
                f"({key}); train longer or use a new run_name"
            )
        planned = self._resume_state.get("max_steps")
        warmup = int(self.cfg.optim.warmup_steps)
        if planned is None or int(planned) == self.max_steps or done <= warmup:
            return
        planned, lr = int(planned), float(self.cfg.optim.lr)
        keep = f"trainer.max_steps={planned}" if self.epochs is None else "trainer.epochs as before"
        was, now = schedule_lr(done, planned, warmup, lr), schedule_lr(done, self.max_steps, warmup, lr)
        jump = (f"its learning rate at step {done + 1} would be {now:.3g} on the {self.max_steps}-step schedule where "
                f"the {planned}-step one gives {was:.3g}")
        if not bool(self.cfg.get("allow_config_change", False)):
            raise ConfigError(
                f"{path} (step {done}) was trained on a {planned}-step learning-rate schedule (linear decay to 0 at "
                f"step {planned}) and this run asks for {self.max_steps} steps ({key}): {jump}. Use {keep} to resume it "
                f"as planned, a new run_name for a run of {self.max_steps} steps, or allow_config_change=true to "
                f"continue on the schedule recomputed for {self.max_steps} steps"
            )
        log.warning("resuming %s on the schedule recomputed for %d steps (allow_config_change=true; it was planned for "
                    "%d): %s", path, self.max_steps, planned, jump)
        self.config_changes.append(f"schedule: {planned} -> {self.max_steps} steps")

    def maybe_resume(self) -> None:
        path = self._resume_path
        if path is None:
            return
        state = ckpt.load(self.engine, path)
        self.step, self.losses = int(state["step"]), list(state["losses"])
        log.info("resumed from %s at step %d", path, self.step)

    def fit(self) -> dict[str, Any]:
        from e5v.run_log import RunLogger

        if self.already_complete:  # the run's files (config.yaml, run_info.json, metrics) stay as the run left them
            log.warning("run already complete: %s is at step %d = the run's %d steps; nothing to train (use a new "
                        "run_name for another run)", self._resume_path, self._resume_step, self.max_steps)
            losses = self._resume_state.get("losses") or []
            return {"steps": self._resume_step, "final_loss": losses[-1] if losses else None, "already_complete": True}
        self.maybe_resume()
        if self.on_start is not None and D.is_main():
            self.on_start()  # e5v-train: this invocation's Hydra files become the run's .hydra/
        logger = RunLogger(self.cfg, self.out, enabled=D.is_main(), resume_step=self.step)
        logger.log_info(
            {
                "trainable_parameters": self.n_trainable,
                "plan": asdict(self.plan),
                "negatives_per_anchor": self.plan.negatives_per_loss,
                "deepspeed": self.deepspeed_conf,
                "data": {
                    "source": getattr(self.data, "source", None),
                    "anchor_kind": self.anchor_kind,
                    "rows": len(self.data),
                    "sha256": self.data_identity["sha256"],  # of the rows as read (e5v.run_identity.data_identity)
                    "skipped": dict(getattr(self.data, "skipped", {}) or {}),
                },
            }
        )
        save_every = int(self.cfg.trainer.save_every)
        stop = _StopOnSignal()
        bar = None
        if D.is_main() and not os.environ.get("E5V_NO_PROGRESS"):
            from e5v.console import progress

            bar = progress(total=self.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            while self.step < self.max_steps:
                t0 = time.perf_counter()
                m = self.train_step()
                dt = time.perf_counter() - t0
                self.step += 1
                loss = D.all_reduce_mean(m["loss"])
                self.losses.append(loss)
                metrics = {
                    "train/loss": loss,
                    "train/acc": D.all_reduce_mean(m["acc"]),
                    "train/lr": self.scheduler.get_last_lr()[0],
                    "train/grad_norm": _float(self.engine.get_global_grad_norm()),
                    "train/samples_per_s": self.plan.global_batch / dt,
                    "train/tokens_per_s": D.all_reduce_mean(m["tokens"]) * D.world_size() / dt,
                    "train/peak_mem_gb": _peak_memory_gb(),
                    "train/epoch": self.sampler.position(self.step - 1)["epoch"],
                }
                if "gradcache_replay_err" in m:
                    metrics["train/gradcache_replay_err"] = m["gradcache_replay_err"]
                logger.log(metrics, step=self.step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", acc=f"{metrics['train/acc']:.2f}")
                if self.step % save_every == 0 or self.step == self.max_steps:
                    self.save()
                if stop.requested():
                    if not any(step == self.step for step, _ in ckpt.list_checkpoints(self.ckpt_root)):
                        self.save()
                    if D.is_main():
                        print(f"\n{stop.name} received: checkpoint written at step {self.step} in {self.ckpt_root}; "
                              "run the same command again to resume", file=sys.stderr, flush=True)
                    logger.finish({"steps": self.step, "interrupted": True})
                    raise SystemExit(stop.exit_code)
        finally:
            stop.restore()
            self.batches.close()
            if bar is not None:
                bar.close()
        if not ckpt.list_checkpoints(self.ckpt_root) or ckpt.list_checkpoints(self.ckpt_root)[-1][0] != self.step:
            self.save()
        summary = {"steps": self.step, "final_loss": self.losses[-1] if self.losses else None}
        wandb_cfg = (self.cfg.get("logger") or {}).get("wandb") or {}
        if wandb_cfg.get("log_adapter"):
            logger.log_artifact(self.final_adapter(), name=f"adapter-{self.cfg.run_name}".replace("/", "-"))
        logger.finish(summary)
        return summary

    def final_adapter(self) -> Path:
        if self.already_complete and self._resume_path is not None:
            return self._resume_path / "adapter"
        last = ckpt.latest_checkpoint(self.ckpt_root, check=False)  # just written by this process
        assert last is not None
        return last / "adapter"


class _StopOnSignal:
    """SIGTERM (what SLURM and torchrun send first) or Ctrl-C (SIGINT) asks for a checkpoint at the end of
    the current step, then exit 143 / 130. A second Ctrl-C stops at once (KeyboardInterrupt). Every rank
    must agree before stopping, so the flag is all-reduced."""

    def __init__(self) -> None:
        import signal
        import threading

        self._flag = False
        self.name, self.exit_code = "SIGTERM", 143
        self._old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        import signal

        if signum == signal.SIGINT:
            if self._flag:  # the second Ctrl-C: the user wants out now
                raise KeyboardInterrupt
            self.name, self.exit_code = "Ctrl-C (SIGINT)", 130
            if D.is_main():
                print("\nCtrl-C: finishing this step and writing a checkpoint (Ctrl-C again to abort at once)",
                      file=sys.stderr, flush=True)
        self._flag = True

    def requested(self) -> bool:
        return D.any_rank(self._flag)

    def restore(self) -> None:
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)


def _float(x: Any) -> float:
    if x is None:
        return float("nan")
    return float(x.item() if hasattr(x, "item") else x)


def _peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def train(cfg: Any, out_dir: str | Path, on_start: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Library entry: checks, builds, trains; returns a summary (steps, final loss, adapter path). ``on_start``:
    called on rank 0 once training is about to start (not when refused, nor when there is nothing to train)."""
    from e5v.console import captured

    with captured("training set-up"):  # DeepSpeed's start and op build (gcc), model loading: the run's log
        D.init_from_env()
        trainer = Trainer(cfg, out_dir)
        trainer.setup()
    trainer.on_start = on_start
    summary = trainer.fit()
    summary["adapter"] = str(trainer.final_adapter())
    return summary


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
            from e5v.run_log import scrub_hydra_outputs

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
