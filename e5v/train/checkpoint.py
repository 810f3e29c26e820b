"""Training checkpoints: atomic, complete-or-absent, loadable without arbitrary pickle.

Layout of ``<run>/checkpoints/step-000100/``:
  adapter/                      LoRA adapter (safetensors, peft layout) + e5v_adapter.json
  ds/                           DeepSpeed engine state: module (trainable params only), optimizer
                                partitions per rank, LR scheduler (torch format, loaded with
                                ``weights_only=True`` and an allowlist of three DeepSpeed data classes)
  rng-rank{R}.safetensors       torch CPU (+ CUDA) RNG state of each rank
  trainer_state.json            step, data position, losses so far, world size, config fingerprint
  manifest.json                 size and sha256 of every other file, written last

Everything is written under ``checkpoints/.partial-step-000100`` and renamed into place by rank 0
after every rank has finished, so a kill during a save leaves the previous checkpoint whole and no
directory named ``step-*`` is ever incomplete. A checkpoint damaged afterwards (a truncated or
edited file, a lost file) fails :func:`verify` with the file named; :func:`latest_checkpoint` then
falls back to the previous complete one. A save that fails (disk full) removes its partial directory
and raises :class:`CheckpointWriteError` naming the checkpoint; the previous one is untouched.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from e5v import distributed as D
from e5v.errors import E5VError
from e5v.run_folder import (  # noqa: F401  (the run folder's reading side, re-exported: ckpt.verify ...)
    ADAPTER_PART,
    MANIFEST,
    STATE_FILE,
    STEP_DIR,
    CheckpointCorrupt,
    damage_report,
    latest_checkpoint,
    list_checkpoints,
    step_dir_name,
    verify,
)
from e5v.run_folder import sha256_file as _sha256

log = logging.getLogger(__name__)

class CheckpointWriteError(E5VError, OSError):
    """Writing a checkpoint failed (e.g. disk full); the previous checkpoint is intact."""


def write_manifest(ckpt: str | Path) -> Path:
    """Record the size and sha256 of every file under ``ckpt`` (the commit record: written last)."""
    from e5v.data.atomic import atomic_write_text

    ckpt = Path(ckpt)
    files = {
        str(f.relative_to(ckpt)): {"size": f.stat().st_size, "sha256": _sha256(f)}
        for f in sorted(ckpt.rglob("*"))
        if f.is_file() and f.name != MANIFEST and not f.name.endswith(".tmp")
    }
    return atomic_write_text(ckpt / MANIFEST, json.dumps({"format": 1, "files": files}, indent=1) + "\n")


# What a use of a checkpoint needs: the LoRA adapter alone (evaluation, merging, Embedder) or everything
# (resuming training: the adapter, DeepSpeed's optimizer and scheduler state, the RNG states).
def _agree(value: int) -> int:
    """Rank 0's ``value`` on every rank (no-op in one process)."""
    if not D.is_dist():
        return value
    t = torch.tensor([value], dtype=torch.long, device=D.collective_device())
    torch.distributed.broadcast(t, src=0)
    return int(t.item())


def resume_point(root: str | Path) -> Path | None:
    """Collective :func:`latest_checkpoint`: rank 0 verifies (reads every file once), all ranks agree."""
    root = Path(root)
    found = latest_checkpoint(root) if D.is_main() else None
    m = STEP_DIR.match(found.name) if found is not None else None
    step = _agree(int(m.group(1)) if m else -1)
    return None if step < 0 else root / step_dir_name(step)


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
    root = Path(root)
    final = root / step_dir_name(step)
    partial = root / f".partial-{step_dir_name(step)}"
    try:
        _write_partial(engine, partial, state, save_adapter_fn, gather)
    except Exception as e:  # noqa: BLE001 - torch/safetensors report a full disk as RuntimeError & co.
        if D.is_main():  # free the space a full disk needs; the previous checkpoint was never touched
            shutil.rmtree(partial, ignore_errors=True)
        previous = latest_checkpoint(root, check=False)
        msg = (
            f"could not write checkpoint {final} ({type(e).__name__}: {e}); the partial files were removed and "
            f"the previous checkpoint {previous or '(none)'} is intact"
        )
        errno = getattr(e, "errno", None)
        raise (CheckpointWriteError(errno, msg) if errno else CheckpointWriteError(msg)) from e
    if D.is_main():
        if final.exists():  # a checkpoint of the same step from an earlier attempt
            shutil.rmtree(final)
        partial.rename(final)
        if keep:
            for _, old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    D.barrier()
    return final


def _write_partial(engine: Any, partial: Path, state: dict[str, Any], save_adapter_fn: Any, gather: Any) -> None:
    from safetensors.torch import save_file

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
        from e5v.data.atomic import atomic_write_text

        atomic_write_text(partial / STATE_FILE, json.dumps(state, indent=2) + "\n")
        write_manifest(partial)  # last: a partial directory without it was never finished


def load(engine: Any, ckpt: str | Path) -> dict[str, Any]:
    """Collective: restore engine (module, optimizer, scheduler) and this rank's RNG; return the state.

    Rank 0 first checks the files against the manifest; a damaged checkpoint raises
    :class:`CheckpointCorrupt` naming the file on every rank (before any rank starts loading)."""
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    problem: CheckpointCorrupt | None = None
    if D.is_main():
        try:
            verify(ckpt)
        except CheckpointCorrupt as e:
            problem = e
    if _agree(1 if problem is not None else 0):
        raise problem or CheckpointCorrupt(ckpt, "(see rank 0)", "failed verification on rank 0")
    state = json.loads((ckpt / STATE_FILE).read_text())
    if state.get("world_size") != D.world_size():
        raise RuntimeError(
            f"{ckpt} was written by {state.get('world_size')} process(es); resume with the same number "
            f"(now {D.world_size()}): ZeRO optimizer partitions are per rank"
        )
    use_safe_loading(engine)
    try:
        path, _ = engine.load_checkpoint(
            str(ckpt), tag="ds", load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    except (OSError, RuntimeError, ValueError, EOFError) as e:
        raise CheckpointCorrupt(ckpt, "ds/", f"DeepSpeed could not load it ({type(e).__name__}: {e})") from e
    if path is None:
        raise CheckpointCorrupt(ckpt, "ds/", "DeepSpeed could not load it (files missing)")
    rng_file = ckpt / f"rng-rank{D.rank()}.safetensors"
    try:
        set_rng_state(load_file(str(rng_file)))
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise CheckpointCorrupt(ckpt, rng_file.name, f"unreadable ({type(e).__name__}: {e})") from e
    return state
