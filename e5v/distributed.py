"""Rank helpers, object collectives for sharded evaluation, and an all-gather that keeps gradients
flowing to every rank's slice; used by training and evaluation alike.

Everything is a no-op in a single process (no process group), so library code calls these
unconditionally. :func:`rank` and :func:`world_size` are the process group's once it exists and the
launcher's (``RANK``, ``WORLD_SIZE``) before, so "rank 0 only" decisions taken before the group is
joined (logging, files) are already right; work is split with :func:`shard`, which splits only across
a joined group (the results must be gathered back).

Importing this module does not import torch (a warm evaluation served from the cache never does): a
process group cannot exist before ``torch.distributed`` is imported, so until then there is none.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)
T = TypeVar("T")


def _dist() -> Any:
    """``torch.distributed`` once torch is imported, else None (then no process group exists)."""
    return sys.modules.get("torch.distributed")


def is_dist() -> bool:
    d = _dist()
    return d is not None and d.is_available() and d.is_initialized()


def rank() -> int:
    return _dist().get_rank() if is_dist() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return _dist().get_world_size() if is_dist() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_dist():
        _dist().barrier()


def shard(items: Sequence[T]) -> list[T]:
    """This process's share of ``items`` (every ``world_size``-th, from its rank); all of them without a
    process group. Every rank must pass the same sequence."""
    if not is_dist():
        return list(items)
    return list(items[rank() :: world_size()])


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a collective: all ranks must call it)."""
    if not is_dist():
        return obj
    box = [obj if rank() == 0 else None]
    _dist().broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a collective: all ranks must call it)."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * world_size()
    _dist().all_gather_object(out, obj)
    return out


@functools.cache
def _gather_function() -> Any:
    """The autograd function behind :func:`gather_with_grad` (built on first use: torch is imported then).

    Kept rather than ``torch.distributed.nn.functional.all_gather`` or
    ``_functional_collectives.all_gather_tensor_autograd``: both give the same gradients here but warn
    (FutureWarning, deprecated) on every call in torch 2.13, and the replacement they name lives in a
    private module whose autograd support depends on the torch version."""
    import torch
    import torch.distributed as dist

    class GatherWithGrad(torch.autograd.Function):
        """all_gather whose backward sums every rank's gradient for this rank's slice (a reduce-scatter)."""

        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # x: (n_local, ...) -> (world * n_local, ...)
            ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
            parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, x.contiguous())
            return torch.cat(parts, dim=0)

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
            grad = grad.contiguous().clone()
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
            return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]

    return GatherWithGrad


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, rank order. The local slice IS ``x`` for autograd,
    and gradients that other ranks' losses send to this rank's rows flow back here too, so a loss
    averaged over ranks has exactly the gradient of the same loss on one process with the global batch.
    Every rank must pass the same shape. No-op without a process group."""
    if not is_dist() or world_size() == 1:
        return x
    return _gather_function().apply(x)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0 (no autograd)."""
    if not is_dist() or world_size() == 1:
        return x
    import torch

    parts = [torch.empty_like(x) for _ in range(world_size())]
    _dist().all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def collective_device() -> torch.device:
    """Where small tensors for collectives must live: the current GPU under NCCL, else the CPU."""
    import torch

    if is_dist() and _dist().get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(value: float) -> float:
    if not is_dist():
        return value
    import torch

    t = torch.tensor([value], dtype=torch.float64, device=collective_device())
    _dist().all_reduce(t)
    return float(t.item()) / world_size()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (a collective: all ranks must call it)."""
    if not is_dist():
        return flag
    import torch

    t = torch.tensor([1.0 if flag else 0.0], device=collective_device())
    _dist().all_reduce(t)
    return bool(t.item() > 0)


def init_from_env(backend: str | None = None) -> None:
    """Initialise the default process group from launcher env vars (torchrun/deepspeed); single process
    without them. Sets the single-process env DeepSpeed expects when no launcher is used."""
    if is_dist():
        return
    import torch
    import torch.distributed as dist

    if "RANK" not in os.environ:
        single = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                  "MASTER_PORT": str(_free_port())}
        for key, value in single.items():
            if key not in os.environ:  # shutdown() removes what we set: child processes must not inherit
                _SET_BY_US.append(key)  # a port this process may still hold
                os.environ[key] = value
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)


def join_launched_group(device: str = "auto") -> bool:
    """Join the process group when a launcher (torchrun) started several processes (``WORLD_SIZE`` > 1):
    nccl on CUDA, gloo for ``device="cpu"`` or without CUDA. Returns whether this run is distributed;
    one process: nothing happens (no group, unlike :func:`init_from_env`, which DeepSpeed needs)."""
    if world_size() <= 1:
        return False
    if not is_dist():
        import torch

        use_cuda = device != "cpu" and torch.cuda.is_available()
        init_from_env("nccl" if use_cuda else "gloo")
        log.info("distributed: rank %d of %d (%s)", rank(), world_size(), _dist().get_backend())
    return True


def shutdown() -> None:
    """Barrier + destroy: without it, multi-process gloo runs can abort at exit."""
    if is_dist():
        _dist().barrier()
        _dist().destroy_process_group()
        _release_deepspeed_groups()
    while _SET_BY_US:
        os.environ.pop(_SET_BY_US.pop(), None)


_SET_BY_US: list[str] = []  # env vars init_from_env set for a launcher-less single process


def _release_deepspeed_groups() -> None:
    """DeepSpeed caches process-group handles in module globals; once the world group is destroyed they
    are stale, and the next ``deepspeed.initialize`` in this process (a Hydra multirun with the basic
    launcher runs every job in one process) fails with "Group ... is not registered". Drop them."""
    groups = sys.modules.get("deepspeed.utils.groups")
    release = getattr(groups, "_release_process_group_references", None)
    if release is not None:
        release(group=None)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
