"""The Hydra side of e5v-train and e5v-eval: the output folder checked before Hydra creates it, and Hydra's
copies of the config kept per invocation.

* :class:`OutputDirCheck` (a Hydra callback, ``hydra.callbacks.output_dir`` in ``configs/train.yaml`` and
  ``configs/eval.yaml``): Hydra creates the run folder itself, before any of our code runs, and reports a
  read-only or blocked path with a traceback; the callback runs first and stops with one line naming the
  folder and the key that sets it.
* Per invocation: ``configs/train.yaml`` sets ``hydra.output_subdir: .hydra/invocations/${e5v_invocation:}`` (:func:`e5v.train.run_identity.invocation_stamp`),
  so a re-run that is refused or has nothing to train never writes over the record of the invocation that
  trained; :func:`promote_invocation` copies an invocation's files to ``<run>/.hydra/`` when it starts
  training (what sweep tools read: ``.hydra/overrides.yaml``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

__all__ = ["OutputDirCheck", "output_dir_problem", "promote_invocation"]

def output_dir_problem(folder: str | os.PathLike, key: str) -> str | None:
    """Why ``folder`` cannot be created or written (one line naming it and ``key``, the setting that chose
    it), or None when it can."""
    target = Path(folder).absolute()
    p = target
    while not p.exists() and p != p.parent:
        p = p.parent
    fix = f"point {key} at a folder you can write"
    if not p.is_dir():
        return f"output folder {target} cannot be created: {p} is a file; {fix}"
    if not os.access(p, os.W_OK | os.X_OK):
        if p == target:
            return f"output folder {target} is not writable; {fix}"
        return f"output folder {target} cannot be created: {p} is not writable; {fix}"
    return None


class OutputDirCheck(Callback):
    """Before Hydra makes the run (or sweep) folder: one ``PROG: error: ...`` line if it cannot."""

    def __init__(self, prog: str, key: str = "paths.output_dir") -> None:
        self.prog, self.key = prog, key

    def _check(self, config: Any, node: str) -> None:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        from e5v.cli.errors import format_error

        HydraConfig.instance().set_config(config)  # ${hydra:...} in the folder name (run_job sets it again)
        try:
            folder = OmegaConf.select(config, node)
        except Exception:  # noqa: BLE001 - an unresolvable name is Hydra's to report
            return
        if not folder:
            return
        problem = output_dir_problem(str(folder), f"{self.key} (or {node})")
        if problem:
            raise SystemExit(format_error(self.prog, problem))

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")


def promote_invocation(hydra_cfg: Any) -> Path | None:
    """Copy this invocation's Hydra files (``<run>/<output_subdir>/*.yaml``) to ``<run>/.hydra/``: called when the
    invocation starts training, so ``.hydra/`` describes the invocation that trained. None when Hydra wrote no
    per-invocation copy (``output_subdir`` is ``.hydra`` itself or null)."""
    out_dir = Path(str(hydra_cfg.runtime.output_dir))
    sub = hydra_cfg.get("output_subdir")
    if not sub:
        return None
    src, dst = out_dir / str(sub), out_dir / ".hydra"
    if src.resolve() == dst.resolve() or not src.is_dir():
        return None
    from e5v.data.atomic import atomic_write_text

    for f in sorted(src.glob("*.yaml")):
        atomic_write_text(dst / f.name, f.read_text(encoding="utf-8"))
    return dst
