"""Run an entry point with a fault installed inside the process (used by the fault-injection tests).

    E5V_INJECT=<fault>:<n> python tests/faults/inject.py train|eval [hydra overrides ...]

Faults (``n`` is a training step, or a number of committed cache shards):
  kill-before-rename:N   SIGKILL once checkpoint N is completely written, just before its rename into place
  kill-mid-write:N       SIGKILL half way through writing checkpoint N's optimizer file (a torn file)
  enospc-in-save:N       checkpoint N's optimizer file fails half way with ENOSPC (disk full)
  sigterm-after-step:N   SIGTERM (what SLURM sends first) to itself after step N
  kill-after-shards:N    SIGKILL after N embedding-cache shards were committed (evaluation)
"""

from __future__ import annotations

import errno
import io
import os
import signal
import sys
from pathlib import Path
from typing import Any


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _partial(step: int) -> str:
    return f".partial-step-{step:06d}"


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
        import e5v.train as train

        real_point = train._fault_point

        def point(step: int) -> None:
            real_point(step)
            if step == n:
                os.kill(os.getpid(), signal.SIGTERM)

        train._fault_point = point
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
        from eval.run import main as entry

        sys.argv = ["e5v-eval", *args]
    else:
        raise SystemExit(f"inject.py: mode must be train or eval, got {mode!r}")
    entry()


if __name__ == "__main__":
    main()
