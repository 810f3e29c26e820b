"""Resolve a backbone by registered name, hub id or local directory (through the one registry table,
:mod:`e5v.backbones.registry`), with one-line errors before transformers runs, and the prompt set that
matches it."""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any

from e5v.backbones import registry
from e5v.backbones.base import Backbone
from e5v.errors import E5VError


class ModelNotFoundError(E5VError, FileNotFoundError):
    """``name_or_path`` is neither a model folder, a builtin name, nor a hub id that can be fetched or is cached."""


def builtin_names() -> list[str]:
    """Registered names that load by themselves (no path, no hub id)."""
    return registry.names(builtin=True)


def known_hint() -> str:
    return (
        "a model is a folder holding config.json (save_pretrained or e5v-merge output), a registered builtin "
        f"name ({', '.join(builtin_names())}) or a Hugging Face hub id such as royokong/e5-v"
    )


def _backbone_configs() -> dict[str, str]:
    """configs/backbone/<name>.yaml -> its ``name_or_path`` (for "did you mean" hints; empty if unreadable)."""
    out: dict[str, str] = {}
    try:
        from e5v.config import config_dir

        for f in sorted((config_dir() / "backbone").glob("*.yaml")):
            m = re.search(r"^\s*name_or_path:\s*([^\s#]+)", f.read_text(encoding="utf-8"), re.M)
            if m and "$" not in m.group(1):
                out[f.stem] = m.group(1)
    except (OSError, ValueError):
        pass
    return out


def _suggest(name: str) -> str:
    """``did you mean ...?`` from the backbone configs, the builtin names and the folder's siblings."""
    configs = _backbone_configs()
    if name in configs:
        return f"did you mean {configs[name]} (configs/backbone/{name}.yaml)?"
    path = Path(name)
    try:
        if path.name and path.parent.is_dir():
            siblings = [p.name for p in path.parent.iterdir() if p.is_dir()]
            close = difflib.get_close_matches(path.name, siblings, n=1, cutoff=0.75)
            if close and close[0] != path.name:
                return f"did you mean {path.parent / close[0]}?"
    except OSError:
        pass
    close = difflib.get_close_matches(name, sorted((set(builtin_names()) | set(configs.values())) - {name}), n=1,
                                      cutoff=0.75)
    return f"did you mean {close[0]}?" if close else ""


def _not_found(name: str, why: str = "", hint: str = "") -> ModelNotFoundError:
    suggestion = _suggest(name)
    lines = [f"no such directory, and not a known model name: {name}" + (f" ({why})" if why else "")]
    lines.append("hint: " + " ".join(x for x in (suggestion, hint or known_hint()) if x))
    return ModelNotFoundError("\n".join(lines))


def _looks_like_path(name: str) -> bool:
    """A name the user meant as a local path: absolute, ./ ../ ~, Windows-style, trailing slash, an invalid
    hub id, or a first component that is a local folder."""
    if name.startswith(("/", ".", "~", "\\")) or name.endswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return True
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(name)
    except ValueError:
        return True
    return "/" in name and Path(name.split("/", 1)[0]).is_dir()


def _local_dir_problem(path: Path) -> str:
    if (path / "adapter_config.json").is_file() or (path / "adapter" / "adapter_config.json").is_file():
        return (f"{path} holds a LoRA adapter, not a full model (no config.json)\n"
                f"hint: merge it first (e5v-merge {path} OUT) or evaluate it with e5v-eval checkpoint={path}")
    if (path / "checkpoints").is_dir() or any(p.name.startswith("step-") for p in path.iterdir()):
        return (f"{path} is a training run, not a model (no config.json)\n"
                f"hint: merge its last checkpoint first (e5v-merge {path} OUT) or evaluate it with "
                f"e5v-eval checkpoint={path}")
    suggestion = _suggest(str(path)) if not path.is_absolute() else ""
    return f"{path} has no config.json: not a save_pretrained model directory" + (
        f"\nhint: {suggestion}" if suggestion else ""
    )


def locate_config(name_or_path: str, revision: str | None = None, local_files_only: bool | None = None) -> Path:
    """The ``config.json`` of a local model folder or hub id (downloaded or from the cache), checked before
    transformers is called: a mistyped path, an unknown name, an uncached hub id while offline, a gated
    or missing repository each raise :class:`ModelNotFoundError` with one line and a hint."""
    name = str(name_or_path)
    if not name.strip():
        raise ModelNotFoundError(f"empty model name\nhint: {known_hint()}")
    path = Path(name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(_local_dir_problem(path))
        return path / "config.json"
    if path.exists():
        raise ModelNotFoundError(f"{name} is a file, not a model folder\nhint: {known_hint()}")
    if _looks_like_path(name):
        raise _not_found(name)
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = bool(local_files_only) or bool(constants.HF_HUB_OFFLINE)
    try:
        return Path(hf_hub_download(name, "config.json", revision=revision, local_files_only=offline))
    except GatedRepoError:
        raise ModelNotFoundError(
            f"{name} is a gated model on the Hugging Face hub\n"
            f"hint: accept its terms at https://huggingface.co/{name}, then log in with `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise _not_found(name, "the Hugging Face hub has no such model, or it is private",
                         "check the spelling; for a private model log in with `hf auth login`") from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"{name} has no revision {revision!r} on the Hugging Face hub") from None
    except RemoteEntryNotFoundError:
        raise ModelNotFoundError(
            f"{name}: the hub repository has no config.json; it is not a transformers model"
        ) from None
    except LocalEntryNotFoundError:
        if offline:
            why = ("HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else "local_files_only") + \
                ", and as a hub id it is not in the local cache"
            fix = f"download it once while online (hf download {name}) or pass its local folder"
            raise _not_found(name, why, fix) from None
        raise ModelNotFoundError(
            f"cannot reach the Hugging Face hub to fetch {name}, and it is not in the local cache\n"
            "hint: check the network (and HF_ENDPOINT), or pass a local model folder"
        ) from None


def check_model(name_or_path: str, revision: str | None = None, local_files_only: bool | None = None) -> None:
    """Raise :class:`ModelNotFoundError` (one line + hint) unless ``name_or_path`` is a builtin name, a model
    folder, or a hub id that is cached or (online) exists; cheap enough to run before anything loads."""
    if not registry.is_builtin(str(name_or_path)):
        locate_config(name_or_path, revision, local_files_only)


def model_type_of(name_or_path: str, revision: str | None = None, local_files_only: bool | None = None) -> str:
    """Read ``model_type`` from config.json without importing remote code."""
    cfg_file = locate_config(name_or_path, revision, local_files_only)
    try:
        return str(json.loads(cfg_file.read_text())["model_type"])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_file}: cannot read model_type ({e})") from e


def load(name_or_path: str, **kwargs: Any) -> Backbone:
    """Load any registered backbone: a builtin name, or a hub id / local folder whose config.json
    ``model_type`` a registered family loads."""
    name = str(name_or_path)
    if registry.is_builtin(name):
        return registry.get(name).load(**kwargs)
    mtype = model_type_of(name, kwargs.get("revision"), kwargs.get("local_files_only"))
    try:
        spec = registry.for_model_type(mtype)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    return spec.load(name_or_path=name, **kwargs)


def default_prompt(backbone: Backbone) -> str:
    """The prompt config whose chat wrapper matches the backbone's language model (the backbone says)."""
    return backbone.default_prompt()
