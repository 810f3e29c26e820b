"""Training checkpoints: atomic, complete-or-absent, loadable without arbitrary pickle.

Layout of ``<run>/checkpoints/step-000100/``:
  adapter/                      LoRA adapter (safetensors, peft layout) + e5v_adapter.json
  ds/                           DeepSpeed engine state: module (trainable params only), optimizer
                                partitions per rank, LR scheduler (torch format, loaded with
                                ``weights_only=True`` and an allowlist of three DeepSpeed data classes)
  rng-rank{R}.safetensors       torch CPU (+ CUDA) RNG state of each rank
  trainer_state.json            step, data position, losses so far, world size, config fingerprint

Everything is written under ``checkpoints/.partial-step-000100`` and renamed into place by rank 0
after every rank has finished, so a kill during a save leaves the previous checkpoint whole and no
directory named ``step-*`` is ever incomplete.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from e5v import distributed as D

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{6,})$")
STATE_FILE = "trainer_state.json"


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / STATE_FILE).is_file():
            out.append((int(m.group(1)), d))
    return sorted(out)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint (its state file parses), or None."""
    for _, d in reversed(list_checkpoints(root)):
        try:
            json.loads((d / STATE_FILE).read_text())
            return d
        except (OSError, json.JSONDecodeError) as e:
            log.warning("ignoring damaged checkpoint %s (%s)", d, e)
    return None


def _safe_torch_engine() -> Any:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch engine, but loading with ``weights_only=True`` (no arbitrary code)."""

        def load(self, path: str, map_location: Any = None) -> Any:
            from deepspeed.runtime.fp16.loss_scaler import LossScaler
            from deepspeed.runtime.zero.config import ZeroStageEnum
            from deepspeed.utils.tensor_fragment import fragment_address

            with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
                return torch.load(path, map_location=map_location, weights_only=True)

    return SafeTorchCheckpointEngine(None)


def use_safe_loading(engine: Any) -> None:
    engine.checkpoint_engine = _safe_torch_engine()


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(
    engine: Any,
    root: str | Path,
    step: int,
    state: dict[str, Any],
    save_adapter_fn: Any,
    keep: int | None = None,
    gather: Any = None,
) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    from safetensors.torch import save_file

    root = Path(root)
    final = root / step_dir_name(step)
    partial = root / f".partial-{step_dir_name(step)}"
    if D.is_main():
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
    D.barrier()
    engine.save_checkpoint(str(partial), tag="ds", save_latest=False, exclude_frozen_parameters=True)
    save_file(rng_state(), str(partial / f"rng-rank{D.rank()}.safetensors"))
    D.barrier()
    if gather is not None:  # ZeRO-3: every rank joins the gather of the partitioned LoRA weights
        with gather():
            if D.is_main():
                save_adapter_fn(partial / "adapter")
    elif D.is_main():
        save_adapter_fn(partial / "adapter")
    D.barrier()
    if D.is_main():
        (partial / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        if final.exists():  # a checkpoint of the same step from an earlier attempt
            shutil.rmtree(final)
        partial.rename(final)
        if keep:
            for _, old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    D.barrier()
    return final


def load(engine: Any, ckpt: str | Path) -> dict[str, Any]:
    """Collective: restore engine (module, optimizer, scheduler) and this rank's RNG; return the state."""
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    state = json.loads((ckpt / STATE_FILE).read_text())
    if state.get("world_size") != D.world_size():
        raise RuntimeError(
            f"{ckpt} was written by {state.get('world_size')} process(es); resume with the same number "
            f"(now {D.world_size()}): ZeRO optimizer partitions are per rank"
        )
    use_safe_loading(engine)
    path, _ = engine.load_checkpoint(
        str(ckpt), tag="ds", load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {ckpt / 'ds'}")
    rng_file = ckpt / f"rng-rank{D.rank()}.safetensors"
    set_rng_state(load_file(str(rng_file)))
    return state
