"""Make a merged LLaVA-NeXT directory that transformers 4.x reads the same as transformers 5.x.

The paper's released code (transformers 4.41) and mteb's E5-V wrapper (transformers <= 4.44.2,
tokenizers 0.19) load merged checkpoints with plain ``LlavaNextForConditionalGeneration`` /
``LlavaNextProcessor``. A directory written by transformers 5 differs from what they expect in four
ways, each of which 4.x would accept SILENTLY and then embed wrongly or fail:

* weights: 5.x saves the CLIP tower as ``vision_tower.embeddings.*``; 4.x expects
  ``vision_tower.vision_model.*`` and otherwise initialises a random tower with only a warning.
  5.x loads both spellings (its checkpoint conversion mapping strips ``vision_model.``), so the
  4.x names are written (header-only rewrite of each safetensors file, tensors copied as bytes).
* config: 5.x keeps ``rope_theta`` inside ``rope_parameters``; 4.x reads the top-level key and
  falls back to 10000 (Llama-3 uses 500000). Top-level ``rope_theta`` (+ ``rope_scaling`` for a
  non-default RoPE) and ``torch_dtype`` are added beside 5.x's keys.
* tokenizer: tokenizers >= 0.20 writes BPE merges as pairs, which tokenizers 0.19 cannot parse;
  merges are written as ``"a b"`` strings (both read them), and ``tokenizer_class`` becomes
  ``PreTrainedTokenizerFast`` (4.x has no ``TokenizersBackend``).
* processor: 4.x reads the image processor from ``preprocessor_config.json`` and a chat template
  from ``tokenizer_config.json`` / ``chat_template.json``; 5.x nests the former in
  ``processor_config.json`` and writes ``chat_template.jinja``. Both layouts are written.

What cannot be expressed for 4.x raises :class:`CompatError` naming what a 4.x user must do.
:func:`check` lists what is still incompatible in a directory (used by tests and the CLI).

  python -m e5v.export_compat MERGED_DIR          # convert an existing merged directory in place
  python -m e5v.export_compat MERGED_DIR --check  # only report (exit 1 if not 4.x-compatible)
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import struct
import sys
from pathlib import Path
from typing import Any

from e5v.data.atomic import atomic_write, atomic_write_text
from e5v.errors import E5VError

log = logging.getLogger(__name__)

# Prefixes of LlavaNextForConditionalGeneration's state dict in transformers 4.x (4.41 - 4.44).
V4_PREFIXES = ("language_model.model.", "language_model.lm_head.", "vision_tower.vision_model.",
               "multi_modal_projector.", "image_newline")
# transformers 5 module paths (in case a save is not mapped back) -> the 4.x names.
_V5_TO_V4 = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
)
# Vision towers whose 4.x module (CLIPVisionModel, SiglipVisionModel) holds everything under vision_model.
_VISION_MODEL_TYPES = {"clip_vision_model", "siglip_vision_model"}
V4_FIX = ("use transformers >= 5 (pip install 'transformers>=5'), or load this directory's weights "
          "yourself after checking them against the 4.x model's state dict")


class CompatError(E5VError, ValueError):
    """The directory cannot be made to load identically in transformers 4.x."""


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------- config
def v4_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` with the keys transformers 4.x reads added (5.x's keys kept)."""
    if config.get("model_type") != "llava_next":
        raise CompatError(f"model_type={config.get('model_type')!r}: only the transformers 4.x layout of llava_next "
                          f"is known here; {V4_FIX}")
    out = json.loads(json.dumps(config))
    if out.get("multimodal_projector_bias", True) is False:
        raise CompatError(f"multimodal_projector_bias=false: transformers 4.x always builds projector biases; {V4_FIX}")
    vision = out.get("vision_config") or {}
    if vision.get("model_type") not in _VISION_MODEL_TYPES:
        raise CompatError(f"vision tower {vision.get('model_type')!r} has no known 4.x weight layout; {V4_FIX}")
    text = out.get("text_config") or {}
    _text_v4(text)
    for sub in (out, text, vision):
        if "dtype" in sub and "torch_dtype" not in sub:
            sub["torch_dtype"] = sub["dtype"]
    return out


def _text_v4(text: dict[str, Any]) -> None:
    kind = text.get("model_type")
    rope = text.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        if "rope_theta" in text and float(text["rope_theta"]) != float(rope["rope_theta"]):
            raise CompatError(f"text_config.rope_theta={text['rope_theta']} disagrees with rope_parameters {rope}")
        text["rope_theta"] = rope["rope_theta"]
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            if kind != "llama":
                raise CompatError(f"RoPE type {rope_type!r} on a {kind!r} text model has no 4.x config key; {V4_FIX}")
            text["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    elif "rope_theta" not in text:
        raise CompatError("text_config has neither rope_theta nor rope_parameters.rope_theta: 4.x would assume 10000")
    if kind == "llama":
        hidden, heads = int(text["hidden_size"]), int(text["num_attention_heads"])
        if text.get("head_dim") not in (None, hidden // heads):
            raise CompatError(f"head_dim={text['head_dim']} != hidden_size/num_attention_heads: 4.x Llama "
                              f"ignores head_dim; {V4_FIX}")


# ---------------------------------------------------------------------- weights
def v4_key(key: str, vision_type: str | None = "clip_vision_model") -> str:
    """One state-dict key in the transformers 4.x layout."""
    for new, old in _V5_TO_V4:
        if key.startswith(new):
            key = old + key[len(new):]
            break
    if (vision_type in _VISION_MODEL_TYPES and key.startswith("vision_tower.")
            and not key.startswith("vision_tower.vision_model.")):
        key = "vision_tower.vision_model." + key[len("vision_tower."):]
    if not key.startswith(V4_PREFIXES):
        raise CompatError(f"weight {key!r} has no place in transformers 4.x's LlavaNextForConditionalGeneration")
    return key


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header dict, offset where the tensor bytes start)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def rename_safetensors(path: Path, rename: dict[str, str]) -> None:
    """Rewrite the header of one safetensors file with renamed keys; the tensor bytes are copied as is."""
    header, start = read_safetensors_header(path)
    meta = header.pop("__metadata__", None) or {}
    meta.setdefault("format", "pt")  # 4.x refuses files without it
    new = {"__metadata__": meta, **{rename.get(k, k): v for k, v in header.items()}}
    blob = json.dumps(new, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # tensor data stays 8-byte aligned

    def write(out: Any) -> None:
        out.write(struct.pack("<Q", len(blob)) + blob)
        with open(path, "rb") as src:
            src.seek(start)
            shutil.copyfileobj(src, out, 16 << 20)

    atomic_write(path, write)


def weight_files(model_dir: Path) -> tuple[list[Path], Path | None]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({model_dir / f for f in _read_json(index)["weight_map"].values()})
        return files, index
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise CompatError(f"{model_dir} has no model.safetensors(.index.json)")
    return [single], None


def v4_weights(model_dir: Path, vision_type: str) -> int:
    """Rename every weight to its 4.x name; returns how many keys changed."""
    files, index = weight_files(model_dir)
    changed = 0
    for f in files:
        header = read_safetensors_header(f)[0]
        rename = {k: v4_key(k, vision_type) for k in header if k != "__metadata__"}
        rename = {k: v for k, v in rename.items() if k != v}
        if rename or (header.get("__metadata__") or {}).get("format") != "pt":
            rename_safetensors(f, rename)
        changed += len(rename)
    if index is not None:
        data = _read_json(index)
        data["weight_map"] = {v4_key(k, vision_type): v for k, v in data["weight_map"].items()}
        _write_json(index, data)
    return changed


# ---------------------------------------------------------------------- tokenizer
def v4_tokenizer_json(tok: dict[str, Any]) -> dict[str, Any]:
    """tokenizer.json that tokenizers 0.19 parses: BPE merges as ``"a b"`` strings."""
    out = dict(tok)
    model = dict(out.get("model") or {})
    merges = model.get("merges")
    if model.get("type") == "BPE" and merges:
        legacy = []
        for m in merges:
            if isinstance(m, str):
                legacy.append(m)
                continue
            a, b = m
            if " " in a or " " in b:
                raise CompatError(f"BPE merge {m!r} contains a space, which tokenizers < 0.20 cannot read; a 4.x "
                                  "user must install transformers>=4.45 with tokenizers>=0.20")
            legacy.append(f"{a} {b}")
        model["merges"] = legacy
    out["model"] = model
    return out


def v4_tokenizer_config(cfg: dict[str, Any], chat_template: str | None) -> dict[str, Any]:
    out = dict(cfg)
    if out.get("tokenizer_class") in (None, "TokenizersBackend", "PreTrainedTokenizerFast"):
        out["tokenizer_class"] = "PreTrainedTokenizerFast"  # 5.x reads it as TokenizersBackend
    # 4.x's PreTrainedTokenizerFast also returns token_type_ids, which LLaVA-NeXT's forward rejects
    out.setdefault("model_input_names", ["input_ids", "attention_mask"])
    if chat_template is not None:
        out["chat_template"] = chat_template  # 5.x reads chat_template.jinja; keep 4.x's copy the same
    return out


# ---------------------------------------------------------------------- processor
def v4_image_processor(image_processor: dict[str, Any]) -> dict[str, Any]:
    out = dict(image_processor)
    # 4.x has only the PIL/numpy LlavaNextImageProcessor (no Fast / Pil variants).
    out["image_processor_type"] = "LlavaNextImageProcessor"
    out.setdefault("processor_class", "LlavaNextProcessor")
    return out


def make_transformers4_compatible(model_dir: str | Path) -> dict[str, Any]:
    """Post-process a 5.x ``save_pretrained`` LLaVA-NeXT directory in place (idempotent)."""
    d = Path(model_dir)
    config = _read_json(d / "config.json")
    new_config = v4_config(config)  # raises before anything is touched
    tok_path = d / "tokenizer.json"
    if not tok_path.is_file():
        raise CompatError(f"{d} has no tokenizer.json; 4.x loads fast tokenizers from it")
    new_tok = v4_tokenizer_json(_read_json(tok_path))

    renamed = v4_weights(d, new_config["vision_config"]["model_type"])
    _write_json(d / "config.json", new_config)
    _write_json(tok_path, new_tok)
    jinja = d / "chat_template.jinja"
    chat_template = jinja.read_text(encoding="utf-8") if jinja.is_file() else None
    tc = d / "tokenizer_config.json"
    _write_json(tc, v4_tokenizer_config(_read_json(tc) if tc.is_file() else {}, chat_template))
    proc_path = d / "processor_config.json"
    proc = _read_json(proc_path) if proc_path.is_file() else {}
    image_processor = proc.pop("image_processor", None)
    if image_processor is not None:
        # 4.x would pass this nested dict to LlavaNextProcessor(...) beside the loaded image processor
        _write_json(d / "preprocessor_config.json", v4_image_processor(image_processor))
        _write_json(proc_path, proc)
    elif not (d / "preprocessor_config.json").is_file():
        raise CompatError(f"{d} has no image processor config (processor_config.json or preprocessor_config.json)")
    if chat_template is not None:  # 4.x's processor reads it (5.x too, before the .jinja: same text)
        _write_json(d / "chat_template.json", {"chat_template": chat_template})
    problems = check(d)
    if problems:
        raise CompatError(f"{d} is still not transformers-4.x compatible: {problems}")
    report = {"transformers4_compatible": True, "renamed_weights": renamed}
    log.info("made %s loadable by transformers 4.x (%d weights renamed)", d, renamed)
    return report


# ---------------------------------------------------------------------- check
def check(model_dir: str | Path) -> list[str]:
    """What transformers 4.44 / tokenizers 0.19 would read differently from 5.x (empty: nothing known)."""
    d = Path(model_dir)
    problems: list[str] = []
    config = _read_json(d / "config.json")
    text = config.get("text_config") or {}
    rope = text.get("rope_parameters") or {}
    if "rope_theta" not in text:
        problems.append("text_config.rope_theta missing (4.x falls back to 10000)")
    elif "rope_theta" in rope and float(rope["rope_theta"]) != float(text["rope_theta"]):
        problems.append(f"text_config.rope_theta {text['rope_theta']} != rope_parameters {rope['rope_theta']}")
    if rope.get("rope_type", "default") != "default" and not text.get("rope_scaling"):
        problems.append("non-default RoPE without text_config.rope_scaling")
    vision_type = (config.get("vision_config") or {}).get("model_type")
    try:
        files, _ = weight_files(d)
        for f in files:
            header = read_safetensors_header(f)[0]
            if (header.get("__metadata__") or {}).get("format") != "pt":
                problems.append(f"{f.name}: no metadata format=pt")
            bad = [k for k in header if k != "__metadata__" and v4_key(k, vision_type) != k]
            if bad:
                problems.append(f"{f.name}: {len(bad)} weight(s) not in the 4.x layout, e.g. {bad[0]}")
    except CompatError as e:
        problems.append(str(e))
    tok = d / "tokenizer.json"
    if not tok.is_file():
        problems.append("tokenizer.json missing")
    else:
        problems += legacy_tokenizer_problems(_read_json(tok))
    tc = _read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else {}
    if tc.get("tokenizer_class") == "TokenizersBackend":
        problems.append("tokenizer_config.json: tokenizer_class TokenizersBackend does not exist in 4.x")
    if "token_type_ids" in tc.get("model_input_names", ["token_type_ids"]):
        problems.append("tokenizer_config.json: 4.x would return token_type_ids, which LLaVA-NeXT's forward rejects")
    if not (d / "preprocessor_config.json").is_file():
        problems.append("preprocessor_config.json missing (4.x's LlavaNextProcessor reads the image processor from it)")
    proc = d / "processor_config.json"
    if proc.is_file() and "image_processor" in _read_json(proc):
        problems.append("processor_config.json nests image_processor (4.x passes it to the processor twice)")
    if (d / "chat_template.jinja").is_file():
        template = (d / "chat_template.jinja").read_text(encoding="utf-8")
        if tc.get("chat_template") != template:
            problems.append("tokenizer_config.json's chat_template (read by 4.x) is not chat_template.jinja's")
        legacy = d / "chat_template.json"
        if not legacy.is_file() or _read_json(legacy).get("chat_template") != template:
            problems.append("chat_template.json (read by 4.x's processor) is not chat_template.jinja's")
    return problems


def legacy_tokenizer_problems(tok: dict[str, Any]) -> list[str]:
    """What tokenizers 0.19 cannot parse in a tokenizer.json (the parts newer versions changed)."""
    model = tok.get("model") or {}
    merges = model.get("merges") or []
    if model.get("type") == "BPE" and any(not (isinstance(m, str) and m.count(" ") == 1) for m in merges):
        return ["tokenizer.json: BPE merges are not 'a b' strings (tokenizers < 0.20 fails to parse it)"]
    return []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m e5v.export_compat", description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("--check", action="store_true", help="only report what 4.x would read differently")
    args = p.parse_args(argv)
    if args.check:
        problems = check(args.model_dir)
        for line in problems:
            print(line)
        print("transformers 4.x compatible" if not problems else f"{len(problems)} problem(s)")
        return 1 if problems else 0
    try:
        report = make_transformers4_compatible(args.model_dir)
    except CompatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
