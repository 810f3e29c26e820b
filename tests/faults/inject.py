"""Run an entry point with a fault installed inside the process (used by the fault-injection tests).

    E5V_INJECT=<fault>:<n> python tests/faults/inject.py train|eval [hydra overrides ...]

Faults (``n`` is a training step, or a number of committed cache shards):
  kill-before-rename:N   SIGKILL once checkpoint N is completely written, just before its rename into place
  kill-mid-write:N       SIGKILL half way through writing checkpoint N's optimizer file (a torn file)
  enospc-in-save:N       checkpoint N's optimizer file fails half way with ENOSPC (disk full)
  sigterm-after-step:N   SIGTERM (what SLURM sends first) to itself after step N
  kill-after-step:N      SIGKILL after step N (and its checkpoint, when one is due)
  nan-at-step:N          the loss of step N is NaN
  kill-after-shards:N    SIGKILL after N embedding-cache shards were committed (evaluation)
"""

from __future__ import annotations

import errno
import io
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _partial(step: int) -> str:
    return f".partial-step-{step:06d}"


def _after_step(n: int, action: Callable[[], None]) -> None:
    """Run ``action`` once step ``n`` is done and saved: the training loop asks its stop flag right then."""
    from e5v.train import signals
    from e5v.train import trainer as train

    real_step, real_requested = train.Trainer.train_step, signals.StopOnSignal.requested
    finished = [0]

    def train_step(self: Any) -> Any:
        out = real_step(self)
        finished[0] = self.step + 1  # the loop counts this step just after
        return out

    def requested(self: Any) -> bool:
        if finished[0] == n:
            action()
        return real_requested(self)

    train.Trainer.train_step = train_step  # type: ignore[method-assign]
    signals.StopOnSignal.requested = requested  # type: ignore[method-assign]


def install(fault: str, n: int) -> None:
    if fault == "kill-before-rename":
        real_rename = Path.rename

        def rename(self: Path, target: Any) -> Any:
            if self.name == _partial(n):
                _die()
            return real_rename(self, target)

        Path.rename = rename  # type: ignore[method-assign]
    elif fault in ("kill-mid-write", "enospc-in-save"):
        import torch

        real_save = torch.save

        def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
            name = str(f)
            if _partial(n) in name and "optim_states" in name:
                buf = io.BytesIO()
                real_save(obj, buf, *args, **kwargs)
                data = buf.getvalue()
                with open(name, "wb") as out:
                    out.write(data[: len(data) // 2])
                    out.flush()
                    if fault == "kill-mid-write":
                        _die()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
            return real_save(obj, f, *args, **kwargs)

        torch.save = save
    elif fault == "sigterm-after-step":
        _after_step(n, lambda: os.kill(os.getpid(), signal.SIGTERM))
    elif fault == "kill-after-step":
        _after_step(n, _die)
    elif fault == "nan-at-step":
        from e5v.train import trainer as train

        real_loss = train.Trainer.loss_of

        def loss_of(self: Any, reps: Any, offset: int) -> Any:
            loss, acc = real_loss(self, reps, offset)
            return (loss * float("nan") if self.step + 1 == n else loss), acc

        train.Trainer.loss_of = loss_of  # type: ignore[method-assign]
    elif fault == "kill-after-shards":
        from eval.cache import Namespace

        real_put = Namespace.put
        committed = [0]

        def put(self: Namespace, keys: Any, embeddings: Any) -> Any:
            out = real_put(self, keys, embeddings)
            if out is not None:
                committed[0] += 1
                if committed[0] >= n:
                    _die()
            return out

        Namespace.put = put  # type: ignore[method-assign]
    else:
        raise SystemExit(f"inject.py: unknown fault {fault!r}")


def main() -> None:
    spec = os.environ.get("E5V_INJECT", "")
    fault, _, n = spec.partition(":")
    install(fault, int(n or 0))
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "train":
        from e5v.train import main as entry

        sys.argv = ["e5v-train", *args]
    elif mode == "eval":
        from eval.cli import main as entry

        sys.argv = ["e5v-eval", *args]
    else:
        raise SystemExit(f"inject.py: mode must be train or eval, got {mode!r}")
    entry()


if __name__ == "__main__":
    main()
