"""The trainer: one optimizer step is this rank's share of the global batch of contrastive rows (a query, P
positives, K hard negatives each: NLI triplets, image-caption pairs, stage-2 rows) encoded through the backbone's
own forward, every rank's positives and negatives gathered with their gradients, and the loss over the global batch
(:mod:`e5v.train.losses`); with ``trainer.grad_cache=true`` in chunks (:mod:`e5v.train.grad_cache`). How to run it,
and the recipes: :mod:`e5v.train.cli` (``e5v-train --help``), docs/training.md.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from e5v import distributed as D
from e5v import packing
from e5v.errors import E5VError
from e5v.provenance import require_values
from e5v.train import checkpoint as ckpt
from e5v.train.batches import Chunk, StepBatches
from e5v.train.losses import contrastive_loss, info_nce_hard_negatives
from e5v.train.resume import ResumeGuard, trainer_state
from e5v.train.setup import candidate_groups
from e5v.train.plan import deepspeed_config, gradient_scale, plan_batches, validate_config
from e5v.train.signals import StopOnSignal

__all__ = ["Trainer", "TrainingDiverged", "train"]

log = logging.getLogger("e5v.train")


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
        self.epochs = t.get("epochs")  # checked in validate_config
        self.max_steps = int(t.max_steps) if self.epochs is None else 0  # epochs: set once the data is loaded
        self.deepspeed_conf = deepspeed_config(cfg, self.plan)
        self.resolved = OmegaConf.to_container(cfg, resolve=True)
        self.losses: list[float] = []
        self.step = 0
        self.resume = ResumeGuard(cfg, self.ckpt_root, self.epochs, self.max_steps)
        self.already_complete = False  # resumed at trainer.max_steps: nothing to train, nothing loaded or written
        self.on_start: Callable[[], Any] | None = None  # called (rank 0) when training starts: see train()
        self._tokens = 0  # real tokens of the current step (counted in _forward)
        self._loss_groups: torch.Tensor | None = None  # sub-batch ids of the current loss's rows (negatives_scope)
        self.dims: list[int] | None = None
        self.dim_weights: list[float] | None = None
        self.init_from: dict[str, Any] | None = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from e5v.prompts import PromptSet
        from e5v.train import setup as S
        from e5v.train.run_identity import data_identity

        cfg = self.cfg
        self.resume.find()  # a stale or mismatched run refuses before any data or model work
        self.prompt = PromptSet.from_config(cfg.prompt)
        # data first: a bad file fails before any model is loaded
        self.raw_data, self.data = S.load_rows(cfg)
        self.rows = S.row_plan(cfg, self.data, self.plan.global_batch)
        self.anchor_kind = self.data.anchor_kind  # image: every query an image alone (image-caption pairs)
        self.data_identity = data_identity(self.raw_data)  # what this run trains on (recorded in every checkpoint)
        self.resume.check_data(self.data_identity)  # an edited data file refuses before any model is loaded
        S.check_init_from(cfg)  # the earlier stage's adapter exists, is whole and fits the base, before any model loads
        self.sampler = S.make_sampler(self.data, self.plan.global_batch, int(cfg.seed), self.rows.sub_batch)
        if self.epochs is not None:  # the released script's schedule: whole epochs, linear decay to 0 at the end
            self.max_steps = int(self.epochs) * self.sampler.steps_per_epoch
            log.info("trainer.epochs=%d: %d steps (%d per epoch, last partial batch dropped)", self.epochs,
                     self.max_steps, self.sampler.steps_per_epoch)
            self.resume.check_length(self.max_steps)
        if self.resume.path is not None and self.resume.step >= self.max_steps:
            self.already_complete = True  # fit() says so; no model, no engine, no file of the run touched
            return
        torch.manual_seed(int(cfg.seed) + D.rank())
        # The backbone's contract does everything model-specific, as in the Embedder: tokenizing, padding,
        # packing, positions, processor calls (self.inputs), LoRA targets and frozen modules (add_lora), the forward.
        self.backbone = S.build_backbone(cfg)
        S.check_inputs(self.data, self.backbone, self.prompt.keep_instruction)
        self.inputs = self.backbone.inputs()
        self.tokenizer = self.backbone.tokenizer
        self.processor, self.pad_id = self.backbone.processor, self.backbone.pad_token_id
        self.dims, self.dim_weights = S.matryoshka_dims(self.rows, self.backbone.hidden_size)
        self.batches = self._step_batches()
        parts = S.build_engine(cfg, self.backbone, self.max_steps, self.deepspeed_conf)
        self.peft_model, self.encoder, self.engine, self.scheduler, self.n_trainable, self.init_from = parts
        self.adapter_meta = {
            "backbone": self.resolved["backbone"],
            "prompt": self.resolved["prompt"],
            "lora": self.resolved["lora"],
            **({"init_from": self.init_from} if self.init_from else {}),
        }

    def _step_batches(self) -> StepBatches:
        from e5v.train.setup import step_batches

        self.preparer, batches = step_batches(self.cfg, self.backbone, self.data, self.prompt, self.sampler,
                                              self.plan.micro, self.rows, self.max_steps)
        self.pack_text, self.pack_images = self.preparer.pack_text, self.preparer.pack_images
        return batches

    def texts_for(self, rows: Any) -> list[str]:
        """The rendered prompts of ``rows``' items, group-major (text triplets: anchors, positives, negatives)."""
        return self.preparer.texts_for(rows)

    def encode(self, chunk: Chunk | Any) -> torch.Tensor:
        """(k, b, d): k = 1 + P + K groups (the queries, each row's P positives, its K hard negatives), e.g. 3 for
        NLI triplets, 2 for image-caption pairs. ``chunk``: a prepared :class:`~e5v.train.batches.Chunk` or the
        row indices (prepared here; a bad image raises, naming it).

        A deterministic function of the rows and the torch RNG state (LoRA dropout), as GradCache needs."""
        if not isinstance(chunk, Chunk):
            chunk = self.preparer(chunk).check()
        reps = torch.cat([self._forward(b).float() for b in chunk.batches])  # (k * b, d) in batch order
        if chunk.order is not None:
            reps = reps[chunk.order]  # item order: group-major
        return reps.view(chunk.groups, len(chunk.rows), reps.shape[-1])

    def _forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One engine forward of a batch from the backbone's Inputs (padded or packed): (B, d) last-token
        states, through the backbone's own forward (the Embedder's)."""
        device = self.engine.device
        non_blocking = device.type == "cuda"
        reps = self.engine(**{k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()})
        self._tokens += packing.real_tokens(batch)
        return reps

    def loss_of(self, reps: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of this rank's queries ``reps[0]`` against every rank's positives and hard negatives (gathered
        with their gradients). One positive, at most one negative per row, no sub-batch scope, no Matryoshka:
        the released InfoNCE, exactly; otherwise :func:`~e5v.train.losses.contrastive_loss`."""
        P, K, T = self.rows.positives, self.rows.negatives, float(self.cfg.loss.temperature)
        positives = [D.gather_with_grad(reps[1 + j]) for j in range(P)]
        negatives = [D.gather_with_grad(reps[1 + P + k]) for k in range(K)]
        groups = self._loss_groups
        if P == 1 and K <= 1 and groups is None and self.dims is None:
            return info_nce_hard_negatives(reps[0], positives[0], negatives[0] if K else None, T, offset)
        return contrastive_loss(reps[0], torch.stack(positives), torch.stack(negatives) if K else None, T, offset,
                                groups=groups, dims=self.dims, dim_weights=self.dim_weights)

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
            for c, chunk in enumerate(chunks):
                reps = self.encode(chunk)
                self._loss_groups = candidate_groups(self.sampler, self.step, self.plan, self.rows.scope, c)
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

            self._loss_groups = candidate_groups(self.sampler, self.step, self.plan, self.rows.scope)
            loss, acc, replay = grad_cache_step(self.encode, chunks, scaled_loss, backward, check=self.check_finite)
            losses.append(loss.item() / self.grad_scale)
            accs.append(acc.item())
            extra["gradcache_replay_err"] = replay
            self._tokens //= 2  # each row was encoded twice (no-grad pass + replay); count it once
        return {"loss": sum(losses) / len(losses), "acc": sum(accs) / len(accs), "tokens": self._tokens, **extra}

    # ------------------------------------------------------------------ loop
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
            trainer_state(self),
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
        from e5v.train.run_log import RunLogger, step_metrics, train_info

        if self.already_complete:  # the run's files (config.yaml, run_info.json, metrics) stay as the run left them
            log.warning("run already complete: %s is at step %d = the run's %d steps; nothing to train (use a new "
                        "run_name for another run)", self.resume.path, self.resume.step, self.max_steps)
            losses = self.resume.state.get("losses") or []
            return {"steps": self.resume.step, "final_loss": losses[-1] if losses else None, "already_complete": True}
        self.maybe_resume()
        if self.on_start is not None and D.is_main():
            self.on_start()  # e5v-train: this invocation's Hydra files become the run's .hydra/
        logger = RunLogger(self.cfg, self.out, enabled=D.is_main(), resume_step=self.step)
        logger.log_info(train_info(self))
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
                metrics = step_metrics(self, m, dt)
                self.losses.append(metrics["train/loss"])
                logger.log(metrics, step=self.step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", acc=f"{metrics['train/acc']:.2f}")
                if self.step % save_every == 0 or self.step == self.max_steps:
                    self.save()
                if stop.requested():
                    self._stop(stop, logger)
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

    def _stop(self, stop: StopOnSignal, logger: Any) -> None:
        """SIGTERM / Ctrl-C: a checkpoint at this step (unless just written), then exit 143 / 130."""
        if not any(step == self.step for step, _ in ckpt.list_checkpoints(self.ckpt_root)):
            self.save()
        if D.is_main():
            print(f"\n{stop.name} received: checkpoint written at step {self.step} in {self.ckpt_root}; "
                  "run the same command again to resume", file=sys.stderr, flush=True)
        logger.finish({"steps": self.step, "interrupted": True})
        raise SystemExit(stop.exit_code)

    def final_adapter(self) -> Path:
        if self.already_complete and self.resume.path is not None:
            return self.resume.path / "adapter"
        last = ckpt.latest_checkpoint(self.ckpt_root, check=False)  # just written by this process
        assert last is not None
        return last / "adapter"


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
