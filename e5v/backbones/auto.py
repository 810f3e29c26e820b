"""Pick the adapter for a name, hub id or local directory, and the prompt set that matches it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from e5v.backbones.base import Backbone

# Names that are not hub ids: built offline.
BUILTIN = {"tiny", "tiny_world", "llava_next_8b_shape"}


def model_type_of(name_or_path: str, revision: str | None = None, local_files_only: bool | None = None) -> str:
    """Read ``model_type`` from config.json without importing remote code."""
    path = Path(name_or_path)
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a save_pretrained model directory")
    else:
        from huggingface_hub import hf_hub_download

        cfg_file = Path(
            hf_hub_download(str(name_or_path), "config.json", revision=revision, local_files_only=bool(local_files_only))
        )
    try:
        return str(json.loads(cfg_file.read_text())["model_type"])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_file}: cannot read model_type ({e})") from e


def load(name_or_path: str, **kwargs: Any) -> Backbone:
    """Load any supported backbone; dispatches on the builtin names or on config.json's model_type."""
    if name_or_path == "tiny":
        from e5v.backbones import tiny

        return tiny.load(**kwargs)
    if name_or_path == "tiny_world":
        from e5v.backbones import tiny_world

        return tiny_world.load(**kwargs)
    if name_or_path == "llava_next_8b_shape":
        from e5v.backbones import shape

        return shape.load(**kwargs)
    mtype = model_type_of(name_or_path, kwargs.get("revision"), kwargs.get("local_files_only"))
    if mtype == "llava_next":
        from e5v.backbones import llava_next

        return llava_next.load(name_or_path, **kwargs)
    if mtype == "phi3_v":
        from e5v.backbones import phi3_v

        return phi3_v.load(name_or_path, **kwargs)
    raise ValueError(
        f"{name_or_path}: model_type '{mtype}' has no adapter; supported: llava_next, phi3_v "
        "(add one under e5v/backbones/)"
    )


def default_prompt(backbone: Backbone) -> str:
    """The prompt config whose chat wrapper matches the backbone's language model."""
    if backbone.family == "phi3_v":
        return "e5v_phi3"
    text_cfg = getattr(backbone.model.config, "text_config", None)
    if text_cfg is not None and getattr(text_cfg, "model_type", "") == "mistral":
        return "e5v_mistral"
    return "e5v_llama3"
