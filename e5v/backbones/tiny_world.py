"""``tiny_world``: the tiny LLaVA-NeXT pretrained on the mini world (shipped; demo, replication).

This module is the backbone: its registry row and its loader (``_target_: e5v.backbones.tiny_world.load``),
here like every backbone because the registry finds backbones as the modules of ``e5v/backbones/``.
The pretraining and the folder it builds (the shipped copy in ``e5v/assets/tiny_world``, else built
once into the cache) are :mod:`e5v.mini.pretrain`; the folder loads through the same LLaVA-NeXT path as
real checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from e5v.backbones import llava_next, registry
from e5v.mini import pretrain


def load(
    seed: int = 0,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = "cpu",
    cache_dir: str | None = None,
    attn_implementation: str | None = "sdpa",
    max_tiles: int | None = None,
    recipe: dict[str, Any] | None = None,
) -> llava_next.LlavaNextBackbone:
    path = pretrain.ensure(seed=seed, cache_dir=cache_dir, recipe=dict(recipe or {}))
    backbone = llava_next.load(
        str(path), dtype=dtype, device=device, local_files_only=True, attn_implementation=attn_implementation,
        max_tiles=max_tiles, family="tiny_world",
    )
    backbone.info["seed"] = seed
    return backbone


def _folder(cfg: Any, build: bool = False) -> Path:
    fn = pretrain.ensure if build else pretrain.folder
    return fn(int(cfg.get("seed") or 0), cfg.get("cache_dir"), dict(cfg.get("recipe") or {}))


registry.register(registry.BackboneSpec(
    name="tiny_world", loader=load, builtin=True, folder=_folder, build=lambda cfg: _folder(cfg, build=True),
    description="the tiny LLaVA-NeXT pretrained on the mini world (shipped; demo, replication)",
))
