"""The trainable encoder: the MLLM's language model with LoRA, everything else frozen.

What is trained and what is frozen is the backbone's contract (:class:`e5v.backbones.base.Backbone`):
LoRA targets are matched by MODULE PATH inside the decoder's layers (LLaVA-NeXT and Qwen2-VL
``model.language_model.layers.N.{self_attn,mlp}.{q,k,v,o,gate,up,down}_proj``, Phi-3-V
``model.layers.N.{self_attn,mlp}.{qkv,o,gate_up,down}_proj`` as released): a bare ``q_proj`` would also
hit a CLIP tower's attention. The vision tower and projector stay loaded (so the adapter applies to the
full MLLM and merging is a plain peft merge) but are frozen and outside the optimizer. Text-only training
(the E5-V recipe) never runs them; image-caption training (the paper's Table 7 setting) runs them,
frozen and in eval mode, to embed the image anchors. The forward is the backbone's own, the one the
embedder runs (:class:`Encoder`).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from e5v.errors import E5VError

log = logging.getLogger(__name__)

ADAPTER_META = "e5v_adapter.json"


def _family(model_or_backbone: Any) -> tuple[Any, torch.nn.Module]:
    """(the Backbone or Backbone class, the HF model) of a loaded Backbone or a bare HF model."""
    from e5v.backbones.base import Backbone

    if isinstance(model_or_backbone, Backbone):
        return model_or_backbone, model_or_backbone.model
    from e5v.backbones.registry import family_of

    return family_of(model_or_backbone), model_or_backbone


class Encoder(torch.nn.Module):
    """The (peft) MLLM as one module for the DeepSpeed engine: ``forward(**batch)`` is the backbone's own
    forward (:meth:`e5v.backbones.base.Backbone.forward`: final-norm state at the last token, (B, d)),
    so training and inference embed through the same code. ``batch`` comes from the backbone's
    :class:`~e5v.backbones.base.Inputs` (text, or images with the frozen tower filling the image tokens)."""

    def __init__(self, model: torch.nn.Module, backbone: Any):
        super().__init__()
        self.model = model
        self.backbone = backbone  # the contract (a dataclass, not a submodule): its model IS self.model, wrapped

    def train(self, mode: bool = True) -> Encoder:
        """The frozen modules (vision tower, projector) stay in eval mode (no dropout) whatever ``mode`` is."""
        super().train(mode)
        if mode:
            for sub in self.backbone.frozen(self.model):
                sub.eval()
        return self

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward(batch, self.model)


def add_lora(
    model: Any,
    r: int = 64,
    alpha: int = 16,
    dropout: float = 0.05,
    targets: list[str] | tuple[str, ...] | None = None,
    activation_checkpointing: bool = False,
) -> torch.nn.Module:
    """Freeze everything, then add trainable LoRA to the language model's projections.

    ``model``: a loaded :class:`~e5v.backbones.base.Backbone` or its Hugging Face model (its family is
    then found from ``config.model_type``). ``targets``: projection names; None = the family's own
    (released) targets. Returns the peft model; LoRA is injected into the HF model in place."""
    from peft import LoraConfig, get_peft_model

    family, hf = _family(model)
    hf.requires_grad_(False)
    regex = family.lora_target_regex(list(targets) if targets else None)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", target_modules=regex)
    peft_model = get_peft_model(hf, cfg)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    bad = [n for n in trainable if not family.in_language_model(n)]
    if bad or not trainable:
        raise RuntimeError(f"LoRA targets {regex} reached modules outside the language model ({bad[:3]}) or "
                           "none at all")
    if activation_checkpointing:
        from e5v.backbones.base import hf_model, submodule

        lm = submodule(hf_model(peft_model), family.language_model_path)
        kwargs = {"use_reentrant": False}  # re-entrant checkpointing needs inputs that require grad
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2x
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return peft_model


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def save_adapter(peft_model: torch.nn.Module, out_dir: str | Path, meta: dict[str, Any]) -> Path:
    """LoRA weights as safetensors (peft layout) + our metadata (base backbone config, prompt)."""
    out_dir = Path(out_dir)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    (out_dir / ADAPTER_META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return out_dir


def read_adapter_meta(adapter_dir: str | Path) -> dict[str, Any]:
    f = Path(adapter_dir) / ADAPTER_META
    if not f.is_file():
        raise FileNotFoundError(f"{adapter_dir} has no {ADAPTER_META}: not an adapter saved by e5v training")
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f}: not valid JSON ({e}); the adapter's metadata is damaged") from None


# ---------------------------------------------------------------------- which base an adapter belongs to
class AdapterBaseError(E5VError, ValueError):
    """An adapter and a base model that do not belong together. The message is one line: the adapter,
    both bases, and the fix."""


# Backbone options that say HOW or WHERE weights load, not WHICH weights: ignored when comparing bases.
# Every other key (the model: name_or_path or a builtin loader; revision; seed; sizes; recipe;
# num_hidden_layers ...) identifies the weights, and a difference in any of them is another base.
RUNTIME_KEYS = frozenset(
    {"cache_dir", "local_files_only", "attn_implementation", "max_tiles", "trust_remote_code", "quantize",
     "dtype", "device", "family"}
)


def _builtin(name: str) -> Any:
    """The registry row of a builtin name (``Embedder.from_pretrained("tiny")``), else None. Only bare
    identifiers are looked up (hub ids and paths never are), so most calls import nothing."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", name) or Path(name).exists():
        return None
    from e5v.backbones import registry

    return registry.get(name) if registry.is_builtin(name) else None


_HUB_SNAPSHOT = re.compile(r"models--([^/\\]+)--([^/\\]+)[/\\]snapshots[/\\]")


def _as_dict(base: Any) -> dict[str, Any]:
    if isinstance(base, (str, Path)):
        return {"name_or_path": str(base)}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(base, DictConfig):
            return dict(OmegaConf.to_container(base, resolve=True))  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover
        pass
    return dict(base)


def _model_name(name: str) -> str:
    """A hub id as is; a local directory as its absolute path, or as the hub id when it is a hub-cache snapshot."""
    m = _HUB_SNAPSHOT.search(str(Path(name).resolve()) if Path(name).is_dir() else name)
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    return str(Path(name).resolve()) if Path(name).is_dir() else name


def base_identity(base: Any) -> dict[str, Any]:
    """What identifies a base's WEIGHTS, from a backbone config (mapping / DictConfig) or a name_or_path.

    ``{"model": hub id | absolute local dir | builtin loader, **other identifying keys}``: the loader
    (``_target_``) of a named model does not matter, the name does; builtin random/tiny models are their
    loader plus ``seed`` (default 0); :data:`RUNTIME_KEYS` and unset values (None, empty) are left out.
    """
    b = _as_dict(base)
    name, target = b.get("name_or_path"), b.get("_target_")
    spec = _builtin(str(name)) if name is not None else None
    if spec is not None:  # a builtin name: its loader and fixed arguments, as its config file would give
        target, name = spec.target, None
        b = {**dict(spec.kwargs), **b}
    ident: dict[str, Any] = {"model": _model_name(str(name)) if name is not None else str(target)}
    if name is None and str(target).startswith("e5v.backbones."):  # builtins are seeded, seed 0 by default
        ident["seed"] = 0
    for k, v in b.items():
        if k in RUNTIME_KEYS or k in ("_target_", "name_or_path") or k.startswith("_"):
            continue
        if v is None or (isinstance(v, (dict, list, tuple)) and not v):
            continue
        ident[k] = v
    return ident


def base_label(base: Any) -> str:
    """Short human name of a base: ``royokong/e5-v``, ``tiny (seed 1)``, ``org/model@rev``."""
    ident = base if isinstance(base, dict) and "model" in base else base_identity(base)
    model = str(ident["model"])
    if model.startswith("e5v.backbones."):  # a builtin: its registered name
        from e5v.backbones import registry

        spec = registry.for_target(model, ident)
        model = spec.name if spec is not None else model.rsplit(".", 2)[-2]
    label = f"{model}@{ident['revision']}" if ident.get("revision") else model
    return f"{label} (seed {ident['seed']})" if "seed" in ident else label


def _differences(a: dict[str, Any], b: dict[str, Any]) -> str:
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys)


def adapter_base(adapter_dir: str | Path) -> dict[str, Any] | None:
    """The backbone config the adapter was trained on (``e5v_adapter.json`` "backbone"); None without one."""
    if not (Path(adapter_dir) / ADAPTER_META).is_file():
        return None
    base = read_adapter_meta(adapter_dir).get("backbone")
    return dict(base) if isinstance(base, dict) and base else None


def check_adapter_base(
    adapter_dir: str | Path, base: Any, allow_other_base: bool = False, fix: str | None = None
) -> dict[str, Any] | None:
    """Refuse to apply an adapter to a base other than the one it was trained on.

    ``base``: the backbone config (mapping / DictConfig) or name_or_path about to be loaded. Compared
    with the recorded base on :func:`base_identity`. Returns the recorded backbone config (None for an
    adapter without ``e5v_adapter.json``). A difference, or no record at all, raises
    :class:`AdapterBaseError` (one line naming the adapter, both bases and ``fix``) unless
    ``allow_other_base``, which logs a warning instead.
    """
    fix = fix or "load the base it was trained on, or pass allow_other_base=True if this base holds the same weights"
    recorded = adapter_base(adapter_dir)
    have = base_identity(base)
    if recorded is None:
        msg = (f"adapter {adapter_dir} has no {ADAPTER_META} recording the base it was trained on, so it cannot "
               f"be checked against {base_label(have)}")
        if allow_other_base:
            log.warning("%s; applying it anyway (allow_other_base)", msg)
            return None
        raise AdapterBaseError(f"{msg}: {fix}")
    want = base_identity(recorded)
    if want == have:
        return recorded
    trained_on, applied_to = base_label(want), base_label(have)
    if trained_on == applied_to:  # the names alone do not tell them apart: say which keys differ
        applied_to = f"{applied_to} ({_differences(want, have)})"
    msg = f"adapter {adapter_dir} was trained on base {trained_on} but would be applied to {applied_to}"
    if allow_other_base:
        log.warning("%s; applying it anyway (allow_other_base)", msg)
        return recorded
    raise AdapterBaseError(f"{msg}; its numbers would be wrong: {fix}")


def adapter_step(adapter_dir: str | Path) -> int | None:
    """The training step an adapter was saved at (its metadata, else the step directory's trainer_state)."""
    p = Path(adapter_dir)
    try:
        step = read_adapter_meta(p).get("step")
        if step is not None:
            return int(step)
    except (FileNotFoundError, ValueError):
        pass
    state = p.parent / "trainer_state.json"
    try:
        return int(json.loads(state.read_text())["step"]) if state.is_file() else None
    except (ValueError, KeyError, TypeError):
        return None


class CheckpointUnusable(E5VError, FileNotFoundError):
    """No step of a run holds an intact adapter; the message lists what is damaged in each."""


def resolve_checkpoint(path: str | Path) -> Path:
    """A training run directory (holding ``checkpoints/``) or its ``checkpoints/`` folder resolves to the
    newest step whose ADAPTER is intact (its manifest's ``adapter/`` files: the optimizer state ``ds/`` is
    needed to resume training, not to evaluate or merge); anything else is returned as given."""
    from e5v.run_folder import ADAPTER_PART, damage_report, latest_checkpoint, list_checkpoints

    p = Path(path)
    for root in (p / "checkpoints", p):
        if root.is_dir() and any(c.name.startswith("step-") for c in root.iterdir()):
            latest = latest_checkpoint(root, part=ADAPTER_PART)
            if latest is None and not list_checkpoints(root):
                raise CheckpointUnusable(f"{p}: no complete checkpoint under {root} (no step-* folder holds "
                                         "trainer_state.json: the run was stopped before its first save)")
            if latest is None:
                raise CheckpointUnusable(
                    f"{p}: no checkpoint under {root} has an intact adapter ({damage_report(root, ADAPTER_PART)}); "
                    "give an adapter folder that is whole (a copy of one, or the merged model), or re-train"
                )
            return latest
    return p


def resolve_adapter(path: str | Path) -> Path:
    """The adapter directory of ``path``: an adapter directory, a training step directory holding
    ``adapter/`` (its manifest verified: a truncated or altered file fails here, naming it) or a run
    directory (its newest complete step)."""
    from e5v.run_folder import ADAPTER_PART, MANIFEST, CheckpointCorrupt, verify

    p = resolve_checkpoint(path)
    adapter = p / "adapter" if (p / "adapter" / "adapter_config.json").is_file() else p
    step_dir = adapter.parent if adapter.name == "adapter" else None
    if step_dir is not None and (step_dir / MANIFEST).is_file():
        try:
            verify(step_dir, ADAPTER_PART)  # the adapter's files only: ds/ (optimizer state) is for resuming
        except CheckpointCorrupt as e:
            raise CheckpointCorrupt(step_dir, e.file, f"{e.reason}; {_usable_instead(step_dir)}") from None
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{path}: no LoRA adapter here (expected adapter_config.json, or adapter/adapter_config.json in a "
            "training step directory)"
        )
    return adapter


def _usable_instead(step_dir: Path) -> str:
    """What else the run of ``step_dir`` holds with an intact adapter (for the damaged-adapter message)."""
    from e5v.run_folder import ADAPTER_PART, CheckpointCorrupt, list_checkpoints, verify

    for _, d in reversed(list_checkpoints(step_dir.parent)):
        if d == step_dir:
            continue
        try:
            verify(d, ADAPTER_PART)
            return f"{d} has an intact adapter: use that step instead"
        except CheckpointCorrupt:
            continue
    return "no other step of this run has an intact adapter"


def apply_adapter(
    model: torch.nn.Module, adapter_dir: str | Path, merge: bool = True, base: str | None = None
) -> torch.nn.Module:
    """Load a saved adapter onto a base LLaVA-NeXT model; merged into the weights by default.

    An adapter whose tensor shapes do not fit ``model`` raises :class:`AdapterBaseError` (one line:
    the adapter, ``base`` or the model's name, the base it was trained on, the first mismatch)."""
    from peft import PeftModel

    if not (Path(adapter_dir) / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"{adapter_dir}/adapter_model.safetensors not found (adapters are safetensors only)")
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip().startswith("size mismatch")]
        if not lines:
            raise
        try:
            recorded = adapter_base(adapter_dir)
        except (OSError, ValueError):
            recorded = None
        trained = f"; it was trained on {base_label(recorded)}" if recorded else ""
        name = base or str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
        raise AdapterBaseError(
            f"adapter {adapter_dir} does not fit base {name}: {len(lines)} tensor shape(s) differ "
            f"(first: {lines[0].rstrip('.')}){trained}"
        ) from None
    return peft_model.merge_and_unload() if merge else peft_model


def load_adapter_into_embedder(embedder: Any, adapter_dir: str | Path, base: str | None = None) -> Any:
    """Fold a training adapter into an Embedder's model in place (what evaluation of a checkpoint needs).

    No base check here: callers run :func:`check_adapter_base` first (before loading the model)."""
    embedder.backbone.model = apply_adapter(embedder.backbone.model, adapter_dir, merge=True, base=base).eval()
    return embedder


def merge_to_dir(
    adapter_dir: str | Path,
    out_dir: str | Path,
    base: str | None = None,
    dtype: str = "float32",
    allow_other_base: bool = False,
) -> Path:
    """Fold the adapter into the full MLLM and save a Hugging Face directory (safetensors + processor).

    ``base`` replaces the recorded base's name_or_path (e.g. a local copy); a base other than the one
    the adapter was trained on is refused (:func:`check_adapter_base`) unless ``allow_other_base``.
    """
    from omegaconf import OmegaConf

    from e5v.config import instantiate
    from e5v.data.atomic import atomic_write_text

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):  # before minutes of loading
        raise FileExistsError(f"{out} is not empty; choose a new directory")
    meta = read_adapter_meta(adapter_dir)
    bcfg = OmegaConf.create(meta["backbone"])
    # --base: the recorded loader with another folder / hub id (its revision and options kept) when it loads one;
    # a builtin name, or a recorded builtin (tiny: built from a seed, no folder), loads through the registry
    by_name = bool(base) and ("name_or_path" not in bcfg or _builtin(str(base)) is not None)
    if base:
        if not by_name:
            bcfg.name_or_path = base
        check_adapter_base(
            adapter_dir, {"name_or_path": base} if by_name else bcfg, allow_other_base,
            fix=f"drop --base to merge onto the recorded base, or pass --allow-other-base if {base} holds the "
            "same weights (e.g. a local copy)",
        )
    if by_name:
        from e5v.backbones import auto

        backbone = auto.load(str(base), dtype=dtype, device="cpu")
    else:
        backbone = instantiate(bcfg, dtype=dtype, device="cpu")
    merged = apply_adapter(backbone.model, adapter_dir, merge=True, base=base_label(base if by_name else bcfg))
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new directory")
    tmp = out.with_name(f".{out.name}.partial")
    backbone.save_pretrained(tmp, merged)  # weights + processor files (+ the family's export fix-ups)
    atomic_write_text(tmp / "e5v_merged.json", json.dumps({"adapter": str(adapter_dir), **meta}, indent=2, default=str))
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out
