"""Process-group helpers for sharded evaluation (torchrun; gloo on CPU, nccl on GPU).

One process: every helper is a no-op. Under torchrun (``WORLD_SIZE`` > 1) :func:`init` joins the
group; encoding work is split by rank and gathered with :func:`all_gather_object`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_initialized() -> bool:
    if env_world_size() <= 1:
        return False
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def init(device: str = "auto") -> bool:
    """Join the process group when launched by torchrun; returns True when this run is distributed."""
    if env_world_size() <= 1:
        return False
    dist = _dist()
    if dist.is_initialized():
        return True
    import torch

    use_cuda = device != "cpu" and torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    log.info("distributed eval: rank %d of %d (%s)", rank(), world_size(), backend)
    return True


def rank() -> int:
    return _dist().get_rank() if is_initialized() else 0


def world_size() -> int:
    return _dist().get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        _dist().barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not is_initialized():
        return obj
    box = [obj if is_main() else None]
    _dist().broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    _dist().all_gather_object(out, obj)
    return out


def shutdown() -> None:
    """Barrier then destroy the group (avoids aborts at exit seen with gloo)."""
    if is_initialized():
        dist = _dist()
        dist.barrier()
        dist.destroy_process_group()
