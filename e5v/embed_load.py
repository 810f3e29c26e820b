"""Loading for :meth:`e5v.embedder.Embedder.from_pretrained`: the backbone (a name, a folder, or the base a LoRA
adapter records, checked against the adapter before any weights load) and the prompt it should use (the one
recorded with the checkpoint, else the family's). Tests: tests/test_lora.py, tests/user_paths/
test_checkpoint_use_paths.py (``.venv/bin/python -m pytest -q tests/user_paths/test_checkpoint_use_paths.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e5v.backbones.base import Backbone
from e5v.prompts import PromptSet


@dataclass
class Loaded:
    """What from_pretrained builds an Embedder from; ``adapter_dir`` / ``label``: the adapter still to fold in."""

    backbone: Backbone
    prompt: PromptSet
    adapter_dir: Path | None = None
    label: str | None = None


def load(
    name_or_path: str | None,
    prompt: str | PromptSet | None,
    dtype: str,
    device: str | None,
    adapter: str | os.PathLike | None,
    allow_other_base: bool,
    kwargs: dict[str, Any],
) -> Loaded:
    """The backbone and prompt for ``Embedder.from_pretrained`` (``kwargs``: the backbone loader's options)."""
    from e5v.backbones import auto

    backbone = adapter_dir = label = None
    if adapter is not None:
        from e5v import lora

        adapter_dir = lora.resolve_adapter(adapter)
        fix = "load the base it was trained on, or pass allow_other_base=True if this base holds the same weights"
        if name_or_path is None:
            recorded = lora.adapter_base(adapter_dir)
            if recorded is None:
                raise lora.AdapterBaseError(
                    f"adapter {adapter_dir} has no {lora.ADAPTER_META} recording its base: pass the base as "
                    "name_or_path (and allow_other_base=True, since it cannot be checked)"
                )
            base = {**recorded, **kwargs}
            lora.check_adapter_base(adapter_dir, base, allow_other_base, fix=fix)
            from omegaconf import OmegaConf

            from e5v.config import instantiate

            backbone = instantiate(OmegaConf.create(base), dtype=dtype, device=device)
        else:
            base = {"name_or_path": name_or_path, **kwargs}
            lora.check_adapter_base(adapter_dir, base, allow_other_base, fix=fix)
        label = lora.base_label(base)
    elif name_or_path is None:
        raise TypeError("Embedder.from_pretrained() needs name_or_path (or adapter=...)")
    if backbone is None:
        backbone = auto.load(name_or_path, dtype=dtype, device=device, **kwargs)
    if prompt is None:  # the one the checkpoint was trained with (adapter or e5v-merge record), else the family's
        prompt = recorded_prompt(adapter_dir, name_or_path) or auto.default_prompt(backbone)
    if isinstance(prompt, str):
        from e5v.prompts import load_prompt

        prompt = load_prompt(prompt)
    return Loaded(backbone, prompt, adapter_dir, label)


def recorded_prompt(adapter_dir: Path | None, name_or_path: Any) -> PromptSet | None:
    """The prompt recorded with a checkpoint: an adapter's ``e5v_adapter.json``, or the ``e5v_merged.json`` that
    e5v-merge writes into a merged folder; None without a record."""
    import json

    record = None
    if adapter_dir is not None:
        record = Path(adapter_dir) / "e5v_adapter.json"
    elif name_or_path is not None and Path(str(name_or_path)).is_dir():
        record = Path(str(name_or_path)) / "e5v_merged.json"
    if record is None or not record.is_file():
        return None
    try:
        trained = json.loads(record.read_text()).get("prompt")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(trained, dict) or not trained.get("wrapper"):
        return None
    from omegaconf import OmegaConf

    return PromptSet.from_config(OmegaConf.create(trained))


__all__ = ["Loaded", "load", "recorded_prompt"]
