"""Resuming a run: find the checkpoint to continue from and refuse, before anything is built, when it was
trained with another result-shaping config (:mod:`e5v.train.run_identity`), on other data (edited in place),
or on another learning-rate schedule length; ``allow_config_change=true`` continues, saying what changed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from e5v.errors import ConfigError
from e5v.train import checkpoint as ckpt

log = logging.getLogger("e5v.train")


class ResumeGuard:
    """``path`` / ``step`` / ``state``: the checkpoint a run continues from (None / 0 / {} for a fresh run);
    ``config_changes``: what differs from it (allowed by ``allow_config_change=true``)."""

    def __init__(self, cfg: Any, ckpt_root: Path, epochs: int | None, max_steps: int) -> None:
        self.cfg, self.ckpt_root, self.epochs, self.max_steps = cfg, ckpt_root, epochs, max_steps
        self.path: Path | None = None
        self.step = 0
        self.state: dict[str, Any] = {}
        self.config_changes: list[str] = []

    def find(self) -> None:
        """Find the checkpoint to resume from and refuse, before anything is built, when its result-shaping
        config differs from this run's (listing the keys), or when it is already past ``max_steps``."""
        import json as _json

        from e5v.train.run_identity import differences, shaping_config

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
        self.path, self.step, self.state = path, int(state.get("step", 0)), state
        if self.epochs is None:
            self.check_length(self.max_steps)

    def check_data(self, data_identity: dict[str, Any]) -> None:
        """Refuse to resume over other training data than the checkpoint's (a CSV edited in place, another
        hub file or limit), unless ``allow_config_change=true``: the data is part of the result."""
        from e5v.train.run_identity import data_differences

        path = self.path
        if path is None:
            return
        saved = self.state.get("data_identity")
        if not saved:
            log.warning("%s records no data hash (written by an older version): resuming without checking that the "
                        "training data is unchanged", path)
            return
        if saved.get("sha256") == data_identity["sha256"]:
            return
        change = data_differences(saved, data_identity)
        if not bool(self.cfg.get("allow_config_change", False)):
            raise ConfigError(
                f"{path} was trained on other data ({change}): the data changed since (edited in place?). Use a new "
                "run_name to train on the data as it is now, restore the data to resume, or set "
                "allow_config_change=true to continue this run on the new data"
            )
        log.warning("resuming %s on changed data (allow_config_change=true): %s", path, change)
        self.config_changes.append(f"data: {change}")

    def check_length(self, max_steps: int) -> None:
        """Once this run's length is known: the checkpoint must not be past it, and it must have been trained
        on the same learning-rate schedule (linear decay to 0 at the LAST step: resuming a 40-step run for 80
        steps would restart the lr from 0 up the 80-step line), unless the steps trained so far lie within the
        warmup (the schedules agree there) or ``allow_config_change=true``."""
        from e5v.train.run_identity import schedule_lr

        self.max_steps = max_steps

        path, done = self.path, self.step
        if path is None:
            return
        key = "trainer.epochs" if self.epochs is not None else "trainer.max_steps"
        if done > self.max_steps:
            raise ConfigError(
                f"{path} is at step {done}, beyond the {self.max_steps} steps of this run "
                f"({key}); train longer or use a new run_name"
            )
        planned = self.state.get("max_steps")
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


def trainer_state(trainer: Any) -> dict[str, Any]:
    """What a checkpoint records for resuming (``trainer_state.json``): the result-shaping config, the step and
    the run's length, the data position and identity, the losses so far, the batch plan."""
    from dataclasses import asdict

    from e5v import distributed as D
    from e5v.train.run_identity import shaping_config

    return {
        "config": shaping_config(trainer.cfg),  # what a resumption must match (e5v.train.run_identity)
        "step": trainer.step,
        "max_steps": trainer.max_steps,
        "world_size": D.world_size(),
        "data": trainer.sampler.position(trainer.step),
        "data_identity": trainer.data_identity,  # the rows trained on (e5v.train.run_identity.data_identity)
        "losses": trainer.losses,
        "plan": asdict(trainer.plan),
    }
