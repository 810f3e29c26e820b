"""The model side of evaluation: a lazily loaded Embedder and its fingerprint.

The fingerprint identifies what produced an embedding: a hash of every state-dict tensor (after any
adapter is applied) plus the backbone config, dtype and max_length (not the device: CPU and GPU
results share entries). Hashing an 8B model takes a while, so the result is memoised in
``fingerprints.json`` under a key made of the config and the (path, size, mtime) of the weight
files; a later run with unchanged files gets the fingerprint without loading the model, and when
every embedding is cached the model never loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from e5v.errors import E5VError
from eval.memo import StatMemo, file_stamp

__all__ = ["ModelHandle", "PromptMismatchError", "checkpoint_kind", "load_checkpoint", "prompt_chosen"]

log = logging.getLogger(__name__)

# Backbone options that do not change the computation (the weights hash covers revisions).
_IGNORED_BACKBONE_KEYS = {"cache_dir", "local_files_only", "revision"}
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".json", ".model", ".txt", ".pt"}


def load_checkpoint(embedder: Any, path: str | os.PathLike, base: str | None = None) -> Any:
    """Fold a training checkpoint's LoRA adapter into ``embedder``'s model (in place).

    ``path`` is an adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) or a
    training step directory holding ``adapter/`` (its manifest verified first, before the model is
    touched). Merged Hugging Face directories are loaded as backbones instead (``checkpoint=DIR`` sets
    ``backbone.name_or_path``). The base check (:func:`e5v.lora.check_adapter_base`) is the caller's.
    """
    from e5v.lora import load_adapter_into_embedder, resolve_adapter

    return load_adapter_into_embedder(embedder, resolve_adapter(path), base=base)


def _plain(cfg: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def default_backbone() -> dict[str, Any] | None:
    """The backbone ``configs/eval.yaml`` selects when nothing else does (its defaults list), unresolved;
    None when it cannot be read."""
    from omegaconf import DictConfig, OmegaConf

    from e5v.config import config_dir

    try:
        d = config_dir()
        choice = next(
            (str(x["backbone"]) for x in OmegaConf.load(d / "eval.yaml").get("defaults", [])
             if isinstance(x, DictConfig) and "backbone" in x),
            None,
        )
        if choice is None:
            return None
        raw = OmegaConf.load(d / "backbone" / f"{choice}.yaml")
        # shared bases it includes (`- base/llava_next@_here_`, `- /backbone/base/qwen2_vl@backbone`), first
        bases = [OmegaConf.load(d / "backbone" / "base" / f"{str(x).split('@')[0].rsplit('base/', 1)[1]}.yaml")
                 for x in raw.get("defaults", []) if isinstance(x, str) and "base/" in x]
    except (OSError, ValueError, KeyError, IndexError):
        return None
    node = raw.backbone if isinstance(raw.get("backbone"), DictConfig) else raw  # a `@package _global_` file
    node = OmegaConf.merge(*bases, {k: v for k, v in node.items() if k != "defaults"})
    out = OmegaConf.to_container(node, resolve=False)
    return dict(out) if isinstance(out, dict) else None  # type: ignore[arg-type]


def backbone_chosen(cfg: Any) -> bool:
    """Whether the backbone was CHOSEN rather than left at eval.yaml's default: named on the command line
    (``backbone=...`` or a weight-identifying ``backbone.KEY=...``; seen through Hydra inside ``e5v-eval``)
    or different from the default in a weight-identifying key (an experiment file, ``compose`` overrides).
    Overrides of load options only (:data:`e5v.lora.RUNTIME_KEYS`: attn_implementation, cache_dir ...) do
    not count. When in doubt (no readable default) the backbone counts as chosen: the strict check runs."""
    from e5v.lora import RUNTIME_KEYS, base_identity

    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            for o in HydraConfig.get().overrides.task:
                key = str(o).split("=", 1)[0].lstrip("+~")
                if key == "backbone" or (key.startswith("backbone.") and key.split(".")[1] not in RUNTIME_KEYS):
                    return True
    except ImportError:  # pragma: no cover - hydra is a dependency of eval
        pass
    default = default_backbone()
    if default is None:
        return True
    try:
        return base_identity(default) != base_identity(_plain(cfg.backbone))
    except Exception:  # noqa: BLE001 - an unresolvable default: be strict
        return True


def default_prompt_name() -> str | None:
    """The prompt config ``configs/eval.yaml`` selects when nothing else does (its defaults list); None when it
    cannot be read."""
    from omegaconf import DictConfig, OmegaConf

    from e5v.config import config_dir

    try:
        return next((str(x["prompt"]) for x in OmegaConf.load(config_dir() / "eval.yaml").get("defaults", [])
                     if isinstance(x, DictConfig) and "prompt" in x), None)
    except (OSError, ValueError, KeyError):
        return None


def _prompt_text(prompt: Any) -> tuple[Any, ...]:
    """What a prompt config renders: wrapper, bodies, image token (its name and training options aside)."""
    p = dict(_plain(prompt) or {})
    return p.get("wrapper"), sorted((p.get("bodies") or {}).items()), p.get("image_token")


def prompt_chosen(cfg: Any) -> bool:
    """Whether the prompt was CHOSEN rather than left at eval.yaml's default: named on the command line
    (``prompt=...``, ``prompt.KEY=...``, ``prompt/bodies=...``; seen through Hydra inside ``e5v-eval``) or
    rendering other strings than the default prompt (a backbone config that selects its own, ``compose``
    overrides). When in doubt (no readable default) the prompt counts as chosen: the strict check runs."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            for o in HydraConfig.get().overrides.task:
                key = str(o).split("=", 1)[0].lstrip("+~")
                if key == "prompt" or key.startswith(("prompt.", "prompt/")):
                    return True
    except ImportError:  # pragma: no cover - hydra is a dependency of eval
        pass
    name = default_prompt_name()
    if name is None:
        return True
    try:
        from omegaconf import DictConfig, OmegaConf

        from e5v.config import config_dir

        d = config_dir() / "prompt"
        raw = OmegaConf.load(d / f"{name}.yaml")  # read, not composed: this may run inside the Hydra app
        bodies = [OmegaConf.load(d / "bodies" / f"{x['bodies']}.yaml") for x in raw.get("defaults", [])
                  if isinstance(x, DictConfig) and "bodies" in x]
        raw.bodies = OmegaConf.merge(*bodies, raw.get("bodies") or {})  # before resolving: nodes may point at them
        default = OmegaConf.to_container(raw, resolve=True)
        return _prompt_text(cfg.prompt) != _prompt_text(default)
    except Exception:  # noqa: BLE001 - an unreadable default: be strict
        return True


class PromptMismatchError(E5VError, ValueError):
    """A checkpoint evaluated with a prompt whose chat wrapper differs from the one it was trained with."""


def checkpoint_kind(path: str | os.PathLike) -> str:
    """``merged`` (a save_pretrained model directory) or ``adapter`` (a PEFT adapter directory, or a
    training step directory holding ``adapter/``)."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint={p} is not a directory")
    if (p / "adapter_config.json").is_file() or (p / "adapter" / "adapter_config.json").is_file():
        return "adapter"
    if (p / "config.json").is_file():
        return "merged"
    raise ValueError(f"checkpoint={p} has neither config.json (merged model) nor adapter_config.json (LoRA adapter)")


class ModelHandle:
    """Embedder + fingerprint for one composed eval config; loads the model only when needed."""

    def __init__(self, cfg: Any, memo_dir: str | os.PathLike | None = None) -> None:
        from omegaconf import DictConfig, OmegaConf

        self.cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(_plain(cfg))
        self.memo_file = Path(memo_dir) / "fingerprints.json" if memo_dir else None
        self.memo = StatMemo(self.memo_file, "fingerprint memo")
        self._embedder: Any = None
        self._fingerprint: str | None = None
        self.loaded = False
        ckpt = self.cfg.get("checkpoint")
        self.checkpoint = None
        if ckpt:  # a run directory -> its newest complete step (e5v.lora imports torch: only when one is given)
            from e5v.lora import resolve_checkpoint

            self.checkpoint = str(resolve_checkpoint(ckpt))
        self.checkpoint_kind = checkpoint_kind(self.checkpoint) if self.checkpoint else None
        self.checkpoint_step: int | None = None
        self._adapter_base: dict[str, Any] | None = None
        if self.checkpoint_kind == "adapter":
            self._choose_adapter_base()  # config level, before any weights are read
        if self.checkpoint_kind is not None:
            self._choose_prompt()

    # ------------------------------------------------------------------ config-level identity
    def _choose_adapter_base(self) -> None:
        """The base an adapter checkpoint is evaluated on: the one recorded in its ``e5v_adapter.json``
        unless the backbone was chosen (:func:`backbone_chosen`); a chosen backbone must be that same
        base (:func:`e5v.lora.check_adapter_base`) unless ``allow_other_base=true``."""
        from e5v.lora import RUNTIME_KEYS, adapter_base, adapter_step, base_label, check_adapter_base

        p = Path(self.checkpoint)  # type: ignore[arg-type]
        adapter = p / "adapter" if (p / "adapter" / "adapter_config.json").is_file() else p
        self.checkpoint_step = adapter_step(adapter)
        allow = bool(self.cfg.get("allow_other_base", False))
        chosen = dict(_plain(self.cfg.backbone))
        recorded = adapter_base(adapter)
        if recorded is not None and not backbone_chosen(self.cfg):
            base = dict(recorded)
            if base.get("_target_") == chosen.get("_target_"):  # same loader: this machine's load options
                base.update({k: v for k, v in chosen.items() if k in RUNTIME_KEYS and k in base})
            log.info("checkpoint %s: evaluating on the base it was trained on, %s (%s)",
                     self.checkpoint, base_label(base), adapter / "e5v_adapter.json")
            self._adapter_base = base
            return
        if recorded is None:
            fix = (f"set allow_other_base=true to apply it to {base_label(chosen)} anyway (only if it was "
                   "trained on that base)")
        else:
            fix = (f"drop the backbone override to evaluate on {base_label(recorded)} (the base recorded in "
                   f"{adapter / 'e5v_adapter.json'}), or set allow_other_base=true to use {base_label(chosen)} anyway")
        check_adapter_base(adapter, chosen, allow_other_base=allow, fix=fix)
        self._adapter_base = chosen

    def _record(self) -> Path | None:
        """The file that records what the checkpoint was trained with: an adapter's ``e5v_adapter.json``, a merged
        folder's ``e5v_merged.json`` (written by e5v-merge); None without one."""
        from e5v.lora import ADAPTER_META

        p = Path(self.checkpoint)  # type: ignore[arg-type]
        if self.checkpoint_kind == "adapter":
            adapter = p / "adapter" if (p / "adapter" / "adapter_config.json").is_file() else p
            f = adapter / ADAPTER_META
        else:
            f = p / "e5v_merged.json"
        return f if f.is_file() else None

    def _choose_prompt(self) -> None:
        """Adapters and merged folders alike: the prompt recorded with the checkpoint is the one evaluated, unless
        a prompt was chosen (:func:`prompt_chosen`); a chosen prompt must have the recorded chat wrapper, or the
        run refuses in one line (another wrapper gives other numbers with exit code 0). The adopted prompt
        replaces ``cfg.prompt``, so the report and results.json name it."""
        from omegaconf import OmegaConf, open_dict, read_write

        from e5v.lora import read_adapter_meta

        record = self._record()
        if record is None:
            return
        try:
            meta = read_adapter_meta(record.parent) if record.name != "e5v_merged.json" else json.loads(record.read_text())
        except (OSError, ValueError) as e:
            raise PromptMismatchError(f"{record}: unreadable ({e}); the checkpoint's record is damaged") from None
        trained = meta.get("prompt") if isinstance(meta, dict) else None
        if not isinstance(trained, dict) or not trained.get("wrapper"):
            return  # recorded before prompts were: eval's prompt stands
        ours = dict(_plain(self.cfg.prompt) or {})
        name = trained.get("name", "?")
        if not prompt_chosen(self.cfg):
            if _prompt_text(trained) != _prompt_text(ours):
                log.info("checkpoint %s: evaluating with the prompt it was trained with, '%s' (%s)", self.checkpoint,
                         name, record)
                with read_write(self.cfg), open_dict(self.cfg):
                    self.cfg.prompt = OmegaConf.create(trained)
            return
        if trained.get("wrapper") == ours.get("wrapper"):
            return
        raise PromptMismatchError(
            f"checkpoint {self.checkpoint} was trained with prompt '{name}' (recorded in {record}) but this run "
            f"evaluates prompt '{ours.get('name')}', whose chat wrapper differs, so its numbers would be wrong: "
            f"use prompt={name}, or leave prompt unset to take the recorded one"
        )

    def backbone_config(self) -> dict[str, Any]:
        if self._adapter_base is not None:
            return dict(self._adapter_base)
        b = dict(_plain(self.cfg.backbone))
        if self.checkpoint_kind == "merged":
            if "name_or_path" not in b:
                raise ValueError(
                    f"checkpoint={self.checkpoint} is a merged model directory but backbone "
                    f"'{b.get('_target_')}' takes no name_or_path; use a backbone that loads a folder (e5v, "
                    "llava_next_*, qwen2_vl_*, smolvlm_* ...)"
                )
            b["name_or_path"] = self.checkpoint
        return b

    def identity(self) -> dict[str, Any]:
        from e5v.backbones.base import dtype_name

        e = self.cfg.embedder
        b = {k: v for k, v in self.backbone_config().items() if k not in _IGNORED_BACKBONE_KEYS}
        ident = {
            "backbone": b,
            "dtype": dtype_name(str(e.dtype), str(e.device)),  # auto resolved: bf16 on a GPU, fp32 on the CPU
            "max_length": e.get("max_length"),
            "adapter": self.checkpoint if self.checkpoint_kind == "adapter" else None,
        }
        if e.get("dim") is not None:  # a Matryoshka prefix is another embedding (absent when unset: old keys hold)
            ident["dim"] = int(e.dim)
        return ident

    def _builtin_folder(self, b: dict[str, Any]) -> list[Path] | None:
        """A registered builtin's offline build folder (the registry row of the config's loader says where;
        its module is imported, no model is built). None: not a builtin built into a folder, or not built
        yet. The memo key also hashes the builtin's source and the torch / transformers versions."""
        from importlib import metadata

        from e5v.backbones import registry

        spec = registry.for_target(str(b.get("_target_", "")), b)
        if spec is None or spec.folder is None:
            return None
        import sys

        source = getattr(sys.modules.get(spec.loader.__module__), "__file__", None)
        self._extra_key = [
            hashlib.sha256(Path(source).read_bytes()).hexdigest() if source else None,
            metadata.version("torch"),
            metadata.version("transformers"),
        ]
        folder = spec.built_folder(b)
        return [folder] if folder is not None else None

    def _weight_dirs(self) -> list[Path] | None:
        b = self.backbone_config()
        target = str(b.get("_target_", ""))
        dirs: list[Path] = []
        if "name_or_path" not in b and target.startswith("e5v.backbones."):
            found = self._builtin_folder(b)
            if not found:
                return None  # not built yet (the model loads and builds it this time), or nothing on disk
            dirs = found
        elif "name_or_path" in b:
            p = Path(str(b["name_or_path"]))
            if p.is_dir():
                dirs.append(p)
            else:
                try:
                    from huggingface_hub import snapshot_download

                    dirs.append(
                        Path(
                            snapshot_download(str(b["name_or_path"]), revision=b.get("revision"), local_files_only=True)
                        )
                    )
                except Exception:  # not in the local hub cache: no memo, the model loads
                    return None
        else:
            return None
        if self.checkpoint_kind == "adapter":
            dirs.append(Path(self.checkpoint))  # type: ignore[arg-type]
        return dirs

    def _memo_key(self) -> tuple[str, list[Any]] | None:
        """(key, stamp) for the fingerprint memo: the key hashes the identity (backbone config, dtype, adapter,
        the builtin's source and versions); the stamp lists the weight files' (path, size, mtime)."""
        self._extra_key: list[Any] = []
        dirs = self._weight_dirs()
        if dirs is None:
            return None
        stamp = [file_stamp(f) for d in dirs for f in sorted(d.rglob("*"))
                 if f.is_file() and f.suffix in _WEIGHT_SUFFIXES]
        blob = json.dumps({"identity": self.identity(), "extra": self._extra_key}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest(), stamp

    # ------------------------------------------------------------------ public
    def prebuild(self) -> None:
        """Build what a builtin's loader writes to disk (the tiny models) BEFORE a process group exists:
        once torch.distributed is initialised, transformers' save_pretrained writes on rank 0 only,
        and another rank would install an incomplete model folder."""
        b = self.backbone_config()
        if "name_or_path" not in b and str(b.get("_target_", "")).startswith("e5v.backbones."):
            from e5v.backbones import registry

            spec = registry.for_target(str(b["_target_"]), b)
            if spec is not None and spec.build is not None:
                spec.build({**dict(spec.kwargs), **b})

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is not None:
            return self._fingerprint
        key = self._memo_key() if self.memo_file else None
        if key is not None and (hit := self.memo.get(*key)) is not None:
            self._fingerprint = str(hit)
            log.info("model fingerprint %s (memoised; weights unchanged)", self._fingerprint[:12])
            return self._fingerprint
        from e5v.provenance import state_dict_sha256

        emb = self.embedder
        blob = json.dumps({"weights": state_dict_sha256(emb.model), **self.identity()}, sort_keys=True, default=str)
        self._fingerprint = hashlib.sha256(blob.encode()).hexdigest()
        log.info("model fingerprint %s (hashed the state dict)", self._fingerprint[:12])
        if key is None and self.memo_file is not None:
            key = self._memo_key()  # weight files may exist only now (the tiny model is built on load)
        if key is not None:
            self.memo.put(*key, self._fingerprint)
            self.memo.save()
        return self._fingerprint

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            from omegaconf import OmegaConf

            from e5v import Embedder

            cfg = OmegaConf.create(
                {
                    "backbone": self.backbone_config(),
                    "prompt": _plain(self.cfg.prompt),
                    "embedder": _plain(self.cfg.embedder),
                }
            )
            if cfg.embedder.get("on_bad_image", "raise") != "raise":
                log.warning("evaluation needs every item embedded: embedder.on_bad_image forced to 'raise'")
                cfg.embedder.on_bad_image = "raise"
            log.info("loading the model (%s)", cfg.backbone.get("name_or_path", cfg.backbone.get("_target_")))
            emb = Embedder.from_config(cfg)
            if self.checkpoint_kind == "adapter":
                from e5v.lora import base_label

                base = base_label(self.backbone_config())
                emb = load_checkpoint(emb, self.checkpoint, base=base) or emb  # type: ignore[arg-type]
            emb.progress = False  # the cached encoder shows its own bar
            self._embedder = emb
            self.loaded = True
        return self._embedder
