"""The backbone registry: ONE table, name -> :class:`BackboneSpec`.

Every module of ``e5v/backbones/`` registers its rows when imported (``register(BackboneSpec(...))``);
the table is complete once :func:`specs` has imported them all (modules are found on disk, so a new
backbone module needs no edit anywhere else). Two kinds of rows:

* a **family** (``model_types`` set): checkpoints whose ``config.json`` has that ``model_type`` load
  through it, from a hub id or a local folder (``llava_next``, ``phi3_v``, ``qwen2_vl`` ...);
* a **builtin** (``builtin=True``): a name that loads by itself, built offline from a seed (``tiny``,
  ``tiny_mistral``, ``tiny_qwen2_vl`` ...) or random (``llava_next_8b_shape``).

Each row names its loader (the function a ``configs/backbone/<name>.yaml`` ``_target_`` points at) and
the fixed keyword arguments it is called with. Everything else a backbone does (prompts, processor
calls, forward, LoRA targets, frozen modules) is the :class:`e5v.backbones.base.Backbone` subclass the
loader returns. This module imports nothing heavy.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from e5v.errors import E5VError

# Modules of e5v/backbones that hold the contract or helpers, not backbones.
_NOT_BACKBONES = {"auto", "base", "batching", "registry", "phi3_v_model", "phi3_v_processing"}


@dataclass(frozen=True)
class BackboneSpec:
    """One registry row.

    Args:
        name: the registered name (a builtin name, or the family name).
        loader: the function that returns a loaded :class:`~e5v.backbones.base.Backbone`.
        kwargs: fixed keyword arguments of ``loader`` for this name (e.g. ``{"variant": "mistral"}``).
        model_types: ``config.json`` model types this row loads from a path or hub id (families only).
        family: the :class:`~e5v.backbones.base.Backbone` subclass the loader returns (family rows), so a
            bare Hugging Face model's LoRA targets and frozen modules can be found from its model type.
        builtin: loads by name alone (no path, no hub).
        tiny: a tiny offline variant: built on the CPU in seconds, run by the test suite.
        folder: for builtins built into a folder: ``f(backbone_config) -> Path`` where it is (or will be),
            so evaluation can memoise the weights fingerprint without loading the model.
        build: ``f(backbone_config) -> Path``: build that folder once (before a process group exists).
        description: one line for listings.
    """

    name: str
    loader: Callable[..., Any]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    model_types: tuple[str, ...] = ()
    family: type | None = None
    builtin: bool = False
    tiny: bool = False
    folder: Callable[[Mapping[str, Any]], Path] | None = None
    build: Callable[[Mapping[str, Any]], Path] | None = None
    description: str = ""

    @property
    def target(self) -> str:
        """The loader as a Hydra ``_target_`` string."""
        return f"{self.loader.__module__}.{self.loader.__qualname__}"

    def load(self, **kwargs: Any) -> Any:
        return self.loader(**{**dict(self.kwargs), **kwargs})

    def built_folder(self, config: Mapping[str, Any]) -> Path | None:
        """The offline build folder of ``config`` if it exists (None: not built yet, or not built offline)."""
        if self.folder is None:
            return None
        path = self.folder({**dict(self.kwargs), **dict(config)})
        return path if path.is_dir() else None


_REGISTRY: dict[str, BackboneSpec] = {}
_discovered = False


class UnknownBackboneError(E5VError, KeyError):
    """A backbone name that is not registered. ``str()`` is one line listing the registered names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def register(spec: BackboneSpec, replace: bool = False) -> BackboneSpec:
    """Add a row. A name registered twice with another spec is refused unless ``replace``."""
    old = _REGISTRY.get(spec.name)
    if old is not None and old != spec and not replace:
        raise ValueError(f"backbone name {spec.name!r} is already registered (by {old.target})")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def _discover() -> None:
    """Import every backbone module once (each registers its rows)."""
    global _discovered
    if _discovered:
        return
    import e5v.backbones as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name.startswith("_") or mod.name in _NOT_BACKBONES:
            continue
        importlib.import_module(f"{pkg.__name__}.{mod.name}")
    _discovered = True


def specs() -> dict[str, BackboneSpec]:
    """The whole table (every backbone module imported), by name."""
    _discover()
    return dict(_REGISTRY)


def names(builtin: bool | None = None) -> list[str]:
    """Registered names, sorted; ``builtin=True``: only those that load by name alone."""
    return sorted(n for n, s in specs().items() if builtin is None or s.builtin == builtin)


def tiny_names() -> list[str]:
    """Builtins with a tiny offline variant (what the CPU test suite runs every contract test on)."""
    return sorted(n for n, s in specs().items() if s.tiny)


def get(name: str) -> BackboneSpec:
    """The row registered as ``name``; :class:`UnknownBackboneError` (one line, listing the names) otherwise."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    table = specs()
    if name in table:
        return table[name]
    raise UnknownBackboneError(
        f"unknown backbone {name!r}; registered names: {', '.join(sorted(table))} "
        "(or a hub id / local model folder of a registered family)"
    )


def is_builtin(name: str) -> bool:
    """Whether ``name`` is a registered builtin (loads by name alone)."""
    try:
        return get(str(name)).builtin
    except UnknownBackboneError:
        return False


def for_model_type(model_type: str) -> BackboneSpec:
    """The family row that loads checkpoints of ``model_type``."""
    for spec in specs().values():
        if model_type in spec.model_types:
            return spec
    families = sorted({t for s in specs().values() for t in s.model_types})
    raise ValueError(
        f"model_type '{model_type}' has no adapter; supported: {', '.join(families)} "
        "(add one: a module in e5v/backbones/ and a configs/backbone/ YAML; README 'Extend')"
    )


def family_of(model: Any) -> type:
    """The Backbone subclass for a (possibly peft-wrapped) Hugging Face model, from its config's model type."""
    get_base = getattr(model, "get_base_model", None)
    inner = get_base() if callable(get_base) and hasattr(model, "peft_config") else model
    spec = for_model_type(str(getattr(getattr(inner, "config", None), "model_type", "")))
    if spec.family is None:
        raise ValueError(f"registry row {spec.name!r} names no Backbone class (family=...)")
    return spec.family


def for_target(target: str, config: Mapping[str, Any] | None = None) -> BackboneSpec | None:
    """The row whose loader is the Hydra ``_target_`` ``target`` (and whose fixed kwargs ``config`` has,
    when several rows share a loader). Imports only the loader's module. None when no row matches."""
    module = str(target).rsplit(".", 1)[0]
    try:
        importlib.import_module(module)
    except ImportError:
        return None
    config = dict(config or {})
    candidates = [s for s in _REGISTRY.values() if s.target == target]
    for spec in sorted(candidates, key=lambda s: -len(s.kwargs)):
        if all(k in config and config[k] == v for k, v in spec.kwargs.items()):
            return spec
    return next((s for s in candidates if not s.kwargs), None)


__all__ = [
    "BackboneSpec",
    "UnknownBackboneError",
    "family_of",
    "for_model_type",
    "for_target",
    "get",
    "is_builtin",
    "names",
    "register",
    "specs",
    "tiny_names",
    "unregister",
]
