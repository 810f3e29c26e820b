"""The trainer: contrastive LoRA training through DeepSpeed (ZeRO-2 by default): E5-V's text-only recipe, or
image-caption pairs (the paper's Table 7 comparison) when the data's ``anchor_kind`` is ``image``.

Run (one process, CPU or one GPU):   e5v-train experiment=tiny_cpu
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

import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from e5v import distributed as D
from e5v import packing
from e5v.errors import ConfigError, E5VError
from e5v.provenance import require_values
from e5v.train import checkpoint as ckpt
from e5v.train.batches import Chunk, ChunkPreparer, StepBatches
from e5v.train.losses import info_nce_hard_negatives
from e5v.train.resume import ResumeGuard
from e5v.train.plan import build_optimizer, deepspeed_config, gradient_scale, plan_batches, validate_config
from e5v.train.signals import StopOnSignal

__all__ = ["Trainer", "TrainingDiverged", "train"]

log = logging.getLogger("e5v.train")


ANCHOR_KINDS = ("text", "image")


class TrainingDiverged(E5VError, RuntimeError):
    """A non-finite loss: training stops without saving; the message names the last good checkpoint."""


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
        self.resume = ResumeGuard(cfg, self.ckpt_root, self.epochs, self.max_steps)
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
        from e5v.train.run_identity import data_identity

        cfg = self.cfg
        self.resume.find()  # a stale or mismatched run refuses before any data or model work
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
        self.resume.check_data(self.data_identity)  # an edited data file refuses before any model is loaded
        self.sampler = StepSampler(len(self.data), self.plan.global_batch, int(cfg.seed))
        if self.epochs is not None:  # the released script's schedule: whole epochs, linear decay to 0 at the end
            self.max_steps = int(self.epochs) * self.sampler.steps_per_epoch
            log.info("trainer.epochs=%d: %d steps (%d per epoch, last partial batch dropped)", self.epochs,
                     self.max_steps, self.sampler.steps_per_epoch)
            self.resume.check_length(self.max_steps)
        if self.resume.path is not None and self.resume.step >= self.max_steps:
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
        """How a step's rows become model batches (:mod:`e5v.train.batches`): packed where the backbone packs
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
        :class:`~e5v.train.batches.Chunk` or the row indices (prepared here; a bad image raises, naming it).

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
            from e5v.train.grad_cache import grad_cache_step

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
        from e5v.train.run_identity import shaping_config

        return {
            "config": shaping_config(self.cfg),  # what a resumption must match (e5v.train.run_identity)
            "step": self.step,
            "max_steps": self.max_steps,
            "world_size": D.world_size(),
            "data": self.sampler.position(self.step),
            "data_identity": self.data_identity,  # the rows trained on (e5v.train.run_identity.data_identity)
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

    def maybe_resume(self) -> None:
        path = self.resume.path
        if path is None:
            return
        state = ckpt.load(self.engine, path)
        self.step, self.losses = int(state["step"]), list(state["losses"])
        log.info("resumed from %s at step %d", path, self.step)

    def fit(self) -> dict[str, Any]:
        from e5v.train.run_log import RunLogger

        if self.already_complete:  # the run's files (config.yaml, run_info.json, metrics) stay as the run left them
            log.warning("run already complete: %s is at step %d = the run's %d steps; nothing to train (use a new "
                        "run_name for another run)", self.resume.path, self.resume.step, self.max_steps)
            losses = self.resume.state.get("losses") or []
            return {"steps": self.resume.step, "final_loss": losses[-1] if losses else None, "already_complete": True}
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
                    "sha256": self.data_identity["sha256"],  # of the rows as read (e5v.train.run_identity.data_identity)
                    "skipped": dict(getattr(self.data, "skipped", {}) or {}),
                },
            }
        )
        save_every = int(self.cfg.trainer.save_every)
        stop = StopOnSignal()
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
                    "train/peak_mem_gb": peak_memory_gb(),
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
        if self.already_complete and self.resume.path is not None:
            return self.resume.path / "adapter"
        last = ckpt.latest_checkpoint(self.ckpt_root, check=False)  # just written by this process
        assert last is not None
        return last / "adapter"


def _float(x: Any) -> float:
    if x is None:
        return float("nan")
    return float(x.item() if hasattr(x, "item") else x)


def peak_memory_gb() -> float:
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
