"""A training run's log, rank 0 only: ``metrics.jsonl`` always (one line per step, lines past a resumed
checkpoint dropped), W&B when configured; the run directory gets ``run_info.json`` (git SHA + dirty flag,
package versions, host, command: :func:`e5v.provenance.provenance`) and ``config.yaml`` (the resolved config,
secrets redacted; an earlier different one kept as ``config.until-step-N.yaml``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from e5v.provenance import end_with_newline, provenance, redact, wandb_logger


class RunLogger:
    """``resume_step``: the step training continues from (0 for a fresh run); metric lines of later steps
    (written before a kill, after the checkpoint) and torn lines are dropped, so that each step appears
    once in ``metrics.jsonl``. None leaves the file as it is (appending)."""

    def __init__(self, cfg: Any, out_dir: str | Path, enabled: bool = True, resume_step: int | None = None):
        from omegaconf import OmegaConf

        self.enabled = enabled
        self.out = Path(out_dir)
        self.wandb = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        resolved = redact(OmegaConf.to_container(cfg, resolve=True))
        keep_previous_config(self.out / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(resolved)), resume_step or 0)
        info = provenance()
        (self.out / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
        self.metrics_path = self.out / "metrics.jsonl"
        end_with_newline(self.metrics_path)  # a line torn by a kill stays one bad line, not two
        if resume_step is not None:
            drop_steps_after(self.metrics_path, resume_step)
        self.metrics_file = self.metrics_path.open("a", encoding="utf-8")
        wb = wandb_logger(cfg)
        if wb is not None:
            self.wandb = wb.start(self.out, {**resolved, "provenance": info}, resume="allow")

    def log_info(self, info: dict[str, Any]) -> None:
        if not self.enabled:
            return
        (self.out / "train_info.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
        if self.wandb is not None:
            self.wandb.config.update({"train_info": info}, allow_val_change=True)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        try:
            self.metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
            self.metrics_file.flush()
        except OSError as e:
            raise OSError(e.errno, f"could not append step {step} to {self.metrics_path}: {e.strerror or e}") from e
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def log_artifact(self, path: str | Path, name: str, kind: str = "model") -> bool:
        """Upload a directory (e.g. the final LoRA adapter) as a W&B artifact; False when W&B is off."""
        if not self.enabled or self.wandb is None:
            return False
        import wandb

        art = wandb.Artifact(name=name, type=kind)
        art.add_dir(str(path))
        self.wandb.log_artifact(art)
        return True

    def finish(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.metrics_file.close()
        if self.wandb is not None:
            from e5v.console import captured

            self.wandb.summary.update(summary)
            with captured("W&B finish"):  # its run summary: the run's log file, not the console
                self.wandb.finish()


def keep_previous_config(path: Path, text: str, step: int) -> None:
    """Write the run's ``config.yaml``; a different earlier one (a resume with allow_config_change=true)
    is kept as ``config.until-step-N.yaml`` so the folder still says what produced each part."""
    from e5v.data.atomic import atomic_write_text

    if path.is_file():
        old = path.read_text(encoding="utf-8")
        if old == text:
            return
        if step > 0:
            atomic_write_text(path.with_name(f"config.until-step-{step:06d}.yaml"), old)
    atomic_write_text(path, text)


def drop_steps_after(path: Path, step: int) -> int:
    """Remove lines of ``path`` (JSON lines with a ``step``) whose step is beyond ``step``, and lines that do
    not parse (torn by a kill). Returns how many were removed."""
    from e5v.data.atomic import atomic_write_text

    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            ok = int(json.loads(line).get("step", 0)) <= step
        except (ValueError, AttributeError, TypeError):
            ok = False
        if ok:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))
    return dropped


def train_info(trainer: Any) -> dict[str, Any]:
    """``train_info.json`` (and W&B's config): the batch plan, the rows per query, the data as read, the stage a
    run continues (``init_from``: the earlier adapter's path, sha256, run and W&B run id)."""
    from dataclasses import asdict

    rows, data = trainer.rows, trainer.data
    datasets = getattr(data, "datasets", None)
    return {
        "trainable_parameters": trainer.n_trainable,
        "plan": asdict(trainer.plan),
        "negatives_per_anchor": trainer.plan.negatives_per_loss,
        "rows_per_query": {"positives": rows.positives, "hard_negatives": rows.negatives, "sub_batch": rows.sub_batch,
                           "negatives_scope": rows.scope, "matryoshka_dims": trainer.dims},
        "deepspeed": trainer.deepspeed_conf,
        "data": {
            "source": getattr(data, "source", None),
            "anchor_kind": trainer.anchor_kind,
            "rows": len(data),
            "sha256": trainer.data_identity["sha256"],  # of the rows as read (e5v.train.run_identity.data_identity)
            "skipped": dict(getattr(data, "skipped", {}) or {}),
            **({"datasets": {d.name: len(d) for d in datasets}} if datasets else {}),
        },
        **({"init_from": trainer.init_from} if trainer.init_from else {}),
    }


def step_metrics(trainer: Any, m: dict[str, float], seconds: float) -> dict[str, float]:
    """One step's ``train/*`` metrics (averaged over ranks), after ``trainer.step`` was advanced."""
    from e5v import distributed as D

    metrics = {
        "train/loss": D.all_reduce_mean(m["loss"]),
        "train/acc": D.all_reduce_mean(m["acc"]),
        "train/lr": trainer.scheduler.get_last_lr()[0],
        "train/grad_norm": _float(trainer.engine.get_global_grad_norm()),
        "train/samples_per_s": trainer.plan.global_batch / seconds,
        "train/tokens_per_s": D.all_reduce_mean(m["tokens"]) * D.world_size() / seconds,
        "train/peak_mem_gb": peak_memory_gb(),
        "train/epoch": trainer.sampler.position(trainer.step - 1)["epoch"],
    }
    if "gradcache_replay_err" in m:
        metrics["train/gradcache_replay_err"] = m["gradcache_replay_err"]
    return metrics


def _float(x: Any) -> float:
    if x is None:
        return float("nan")
    return float(x.item() if hasattr(x, "item") else x)


def peak_memory_gb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
