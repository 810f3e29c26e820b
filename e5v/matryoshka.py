"""Matryoshka embeddings: the first ``dim`` coordinates of an embedding, re-normalised, as a smaller embedding.

A model trained with a Matryoshka loss (:func:`e5v.train.losses.contrastive_loss` with ``dims``) keeps most of
its quality on a prefix of its vectors; evaluation scores each listed prefix from the same full vectors
(``e5v-eval ... matryoshka_dims=[16,32]``, no re-encoding) and the embedder can return a prefix directly.

* :func:`prefix`: ``(..., d) -> (..., dim)`` for numpy arrays and torch tensors, L2-normalised on request;
* :func:`check_dims`: a validated, strictly increasing list of prefix sizes (:class:`e5v.errors.ConfigError`).

Tested by ``.venv/bin/python -m pytest -q tests/test_stage2_losses.py tests/eval/test_matryoshka_eval.py``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

import numpy as np

from e5v.errors import ConfigError

ArrayT = TypeVar("ArrayT")


def _check_one(dim: Any, full: int | None, key: str) -> int:
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
        raise ConfigError(f"{key}: {dim!r} is not an int; give prefix sizes as positive integers, e.g. [256, 1024]")
    dim = int(dim)
    if dim < 1:
        raise ConfigError(f"{key}: {dim} must be >= 1")
    if full is not None and dim > full:
        raise ConfigError(f"{key}: {dim} exceeds the embedding width {full}; give prefix sizes <= {full}")
    return dim


def check_dims(dims: Iterable[Any] | None, full: int | None, key: str = "dims") -> list[int]:
    """``dims`` as a list of ints, checked: each >= 1 and <= ``full`` (the embedding width; None: unknown, not
    checked), strictly increasing. ``None`` -> ``[]`` (off). Raises :class:`ConfigError` naming ``key`` and
    the offending value."""
    if dims is None:
        return []
    if isinstance(dims, (str, bytes)) or not isinstance(dims, Iterable):
        raise ConfigError(f"{key}: {dims!r} is not a list of prefix sizes, e.g. [256, 1024] (null: off)")
    raw = list(dims)
    if not raw:
        raise ConfigError(f"{key}: [] is empty; list at least one prefix size, or null for none")
    out: list[int] = []
    for d in raw:
        k = _check_one(d, full, key)
        if out and k <= out[-1]:
            raise ConfigError(f"{key}: {k} after {out[-1]} in {raw!r}; list the prefix sizes strictly increasing")
        out.append(k)
    return out


def prefix(x: ArrayT, dim: int | None, normalize: bool = True) -> ArrayT:
    """The first ``dim`` coordinates of ``x`` (``(..., d)``, numpy or torch), L2-normalised along the last axis
    when ``normalize``; ``dim`` None or ``d``: the whole vector (still normalised when asked). Torch tensors
    are normalised in float32 and returned in their own dtype (a zero prefix stays zero, as
    ``torch.nn.functional.normalize``); a numpy row whose prefix has zero norm raises ValueError."""
    width = int(x.shape[-1])  # type: ignore[attr-defined]
    if dim is not None:
        dim = _check_one(dim, width, "dim")
    if isinstance(x, np.ndarray):
        out = x if dim is None or dim == width else x[..., :dim]
        if not normalize:
            return out  # type: ignore[return-value]
        norms = np.linalg.norm(out.astype(np.float64, copy=False), axis=-1, keepdims=True)
        if (norms == 0).any():
            raise ValueError(f"an embedding's first {out.shape[-1]} coordinates are all zero: cannot normalise")
        dtype = out.dtype if np.issubdtype(out.dtype, np.floating) else np.float32
        return (out / norms).astype(dtype, copy=False)  # type: ignore[return-value]
    import torch

    if not isinstance(x, torch.Tensor):
        raise TypeError(f"prefix takes a numpy array or a torch tensor, not {type(x).__name__}")
    t = x if dim is None or dim == width else x[..., :dim]
    if not normalize:
        return t  # type: ignore[return-value]
    return torch.nn.functional.normalize(t.float(), dim=-1).to(t.dtype)  # type: ignore[return-value]


__all__ = ["check_dims", "prefix"]
