"""Shrunk copies of the REAL hub checkpoints, built from their own files (tests/fixtures/hub/<org>__<name>/).

A fixture folder holds a checkpoint's small files as the hub serves them (config.json, processor /
preprocessor / tokenizer configs with the chat template, generation_config.json) and its weight key list
(model.safetensors.index.json's weight_map, or weight_keys.txt), with SOURCE.md saying where each came from.
:func:`build` turns one into a loadable folder that differs from the real checkpoint only in size:

* config.json: the hub's JSON with the depths and widths shrunk (:func:`shrink_config`), nothing else touched
  (model_type, architectures, special token ids, vocabulary size, rope settings with their sections scaled
  to the smaller head, image geometry, tied embeddings, the hub's own key spellings);
* every other metadata file copied byte for byte;
* tokenizer.json: a tiny BPE (byte-level, or metaspace for sentencepiece tokenizers) whose added tokens sit
  at the hub's ids (tokenizer_config.json's added_tokens_decoder), padded with unused entries up to them;
* weights: random, written under the hub's key names: the model class named by ``architectures`` (or the
  family's own module for Phi-3-V) saves through transformers' reverse key mapping, and the saved names
  must equal the fixture's key list restricted to the shrunk layer counts (:func:`check_keys`), else the
  build fails. So a loader that expects our idea of a checkpoint instead of the hub's fails its test.

  python tests/helpers/hub_layout.py OUT_DIR FIXTURE_NAME     # build one, print the folder
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hub"
REPO = Path(__file__).resolve().parents[2]
COPIED = ("preprocessor_config.json", "processor_config.json", "tokenizer_config.json", "chat_template.json",
          "chat_template.jinja", "special_tokens_map.json", "generation_config.json",
          "video_preprocessor_config.json")

# The shrunk sizes: text width 64 (4 heads of 16, 2 KV heads), vision width 32 (2 heads), 2 layers each.
TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "num_hidden_layers": 2}
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2}


def fixture_dir(hub_id: str) -> Path:
    return FIXTURES / hub_id.replace("/", "__")


def fixture_names() -> list[str]:
    return sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").is_file()) if FIXTURES.is_dir() else []


def _scale_sections(sections: list[int], half: int) -> list[int]:
    """mrope sections (summing to head_dim/2) rescaled to a smaller head, every section kept >= 1."""
    total = sum(sections)
    out = [max(1, round(s * half / total)) for s in sections]
    out[-1] += half - sum(out)
    assert sum(out) == half and min(out) >= 1, (sections, half, out)
    return out


def _rope(rope: dict[str, Any] | None, head_dim: int) -> dict[str, Any] | None:
    """Rope settings for the shrunk head: mrope sections and per-frequency factor lists rescaled, rest kept."""
    if not isinstance(rope, dict):
        return rope
    rope = dict(rope)
    if "mrope_section" in rope:
        rope["mrope_section"] = _scale_sections(list(rope["mrope_section"]), head_dim // 2)
    for key in ("long_factor", "short_factor"):  # Phi-3 longrope ('su'): one factor per rotary frequency
        if isinstance(rope.get(key), list):
            rope[key] = [rope[key][round(i * (len(rope[key]) - 1) / max(1, head_dim // 2 - 1))]
                         for i in range(head_dim // 2)]
    return rope


def _shrink_text(cfg: dict[str, Any], layers: int = 2) -> None:
    cfg.update(TEXT, num_hidden_layers=layers)
    for key in ("rope_scaling", "rope_parameters"):
        if key in cfg:
            cfg[key] = _rope(cfg[key], TEXT["head_dim"])


def shrink_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The hub config with depths and widths shrunk; every other key as the hub has it."""
    cfg = json.loads(json.dumps(cfg))
    mt = cfg["model_type"]
    if mt == "llava_next":
        _shrink_text(cfg.setdefault("text_config", {}))
        cfg.setdefault("vision_config", {}).update(VISION, projection_dim=32)
    elif mt in ("qwen2_vl", "qwen2_5_vl"):
        _shrink_text(cfg)                      # the hub's text keys at the top level ...
        if isinstance(cfg.get("text_config"), dict):  # ... and, in newer revisions, also nested
            _shrink_text(cfg["text_config"])
        v = cfg.setdefault("vision_config", {})
        if mt == "qwen2_vl":                   # vision width embed_dim; hidden_size = the LM's width
            v.update(depth=2, embed_dim=32, num_heads=2, hidden_size=TEXT["hidden_size"])
        else:                                  # width hidden_size, out_hidden_size = the LM's width
            v.update(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                     out_hidden_size=TEXT["hidden_size"], fullatt_block_indexes=[1])
    elif mt == "qwen3_vl":
        v = cfg.setdefault("vision_config", {})
        n_deep = len(v.get("deepstack_visual_indexes", [])) or 3
        _shrink_text(cfg.setdefault("text_config", {}), layers=max(2, n_deep))
        v.update(depth=n_deep + 1, hidden_size=32, intermediate_size=64, num_heads=2,
                 out_hidden_size=TEXT["hidden_size"], deepstack_visual_indexes=list(range(1, n_deep + 1)))
    elif mt in ("idefics3", "smolvlm"):
        _shrink_text(cfg.setdefault("text_config", {}))
        cfg.setdefault("vision_config", {}).update(VISION)
    elif mt == "phi3_v":
        _shrink_text(cfg)
        for key in ("rope_scaling",):
            cfg[key] = _rope(cfg.get(key), TEXT["head_dim"])
        img = cfg.setdefault("img_processor", {})
        img["image_dim_out"] = VISION["hidden_size"]
        # the hub names its tower by model (CLIP ViT-L/14-336, 336 px, patch 14); the shrunk tower's widths
        # go in the one key the family reads for a tower other than that model's (geometry kept)
        img["e5v_vision_config"] = {k: v for k, v in VISION.items()}
    else:
        raise ValueError(f"no shrink rule for model_type {mt!r}: add one in {__file__}")
    return cfg


# ---------------------------------------------------------------------------------------------- tokenizer
_CORPUS = [
    "A dog runs on the beach. A cat sleeps on a red sofa. Two people ride bicycles down a street.",
    "Summary above sentence in one word: Summary above image in one word: Represent the given image.",
    "The quick brown fox jumps over the lazy dog while a small bird sings in the green tree.",
    "Change the style of this shirt to blue with short sleeves; make it a puppy; a woman holding a child.",
    "user assistant system You are a helpful assistant. <image> picture circle square triangle",
]


def _added_tokens(tok_cfg: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {int(i): t for i, t in (tok_cfg.get("added_tokens_decoder") or {}).items()}


def _token(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _bos(tok_cfg: dict[str, Any]) -> str | None:
    """The token the hub tokenizer puts first: ``add_bos_token`` when the config says so; Llama-3's
    ``<|begin_of_text|>`` (its tokenizer.json's post-processor adds it; its tokenizer_config.json has no flag)."""
    bos = _token(tok_cfg.get("bos_token"))
    if "add_bos_token" in tok_cfg:
        return bos if tok_cfg["add_bos_token"] else None
    return bos if bos == "<|begin_of_text|>" else None


def build_tokenizer_json(tok_cfg: dict[str, Any], out: Path, sentencepiece: bool) -> None:
    """A tiny tokenizer whose added/special tokens have exactly the hub's ids (and the hub's flags)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    added = _added_tokens(tok_cfg)
    low = []  # added tokens at ids 0..k-1 (e.g. <unk> <s> </s>, or SmolVLM's <|endoftext|> <|im_start|> ...)
    while len(low) in added:
        low.append(added[len(low)]["content"])
    tok = Tokenizer(models.BPE(unk_token="<unk>" if "<unk>" in low else None, byte_fallback=False))
    if sentencepiece:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet: list[str] = []
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(low) + 400, special_tokens=low, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    spec = json.loads(tok.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    high = sorted(i for i in added if i >= len(low))
    first = high[0] if high else len(vocab)
    if len(vocab) > first:
        raise ValueError(f"the trained vocabulary ({len(vocab)}) overlaps the hub's added ids (from {first})")
    for i in range(len(vocab), first):   # unused entries up to the hub's first added id (never produced:
        vocab[f"<unused_{i}>"] = i        # no merge leads to them)
    entries = []
    for i in range(first, (high[-1] + 1) if high else first):
        t = added.get(i, {"content": f"<unused_added_{i}>", "special": False})
        entries.append({"id": i, "content": t["content"], "single_word": bool(t.get("single_word", False)),
                        "lstrip": bool(t.get("lstrip", False)), "rstrip": bool(t.get("rstrip", False)),
                        "normalized": bool(t.get("normalized", False)), "special": bool(t.get("special", True))})
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["id"] < len(low)] + entries
    bos = _bos(tok_cfg)
    if bos is not None:  # the hub tokenizer.json's post-processor puts BOS first (the tokenizer adds it)
        ids = {t["content"]: i for i, t in added.items()}
        spec["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [ids[bos]], "tokens": [bos]}},
        }
    Tokenizer.from_str(json.dumps(spec))  # parses
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))


def check_tokenizer_ids(folder: Path, tok_cfg: dict[str, Any]) -> None:
    """Every added token of the hub's tokenizer_config.json has its hub id in the built tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    wrong = {t["content"]: (i, tok.convert_tokens_to_ids(t["content"])) for i, t in _added_tokens(tok_cfg).items()
             if tok.convert_tokens_to_ids(t["content"]) != i}
    if wrong:
        raise AssertionError(f"{folder}: tokens at other ids than the hub's (hub, built): {wrong}")


# ------------------------------------------------------------------------------------------------ weights
def hub_keys(fixture: Path) -> set[str] | None:
    """The hub's weight names (None: the fixture has no key list; SOURCE.md says why)."""
    index = fixture / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    listing = fixture / "weight_keys.txt"
    if listing.is_file():
        return {ln.split()[0] for ln in listing.read_text().splitlines() if ln.strip() and not ln.startswith("#")}
    return None


_NUMBERED = re.compile(r"^(.*?\.(?:layers|blocks|deepstack_merger_list|layer))\.(\d+)\.")


def check_keys(saved: set[str], hub: set[str], where: Path) -> None:
    """The saved names equal the hub's, with numbered layers cut to the counts the shrunk model has."""
    counts: dict[str, int] = {}
    for k in saved:
        m = _NUMBERED.match(k)
        if m:
            counts[m.group(1)] = max(counts.get(m.group(1), 0), int(m.group(2)) + 1)
    expected = set()
    for k in hub:
        m = _NUMBERED.match(k)
        if m and m.group(1) in counts and int(m.group(2)) >= counts[m.group(1)]:
            continue
        expected.add(k)
    missing, extra = sorted(expected - saved), sorted(saved - expected)
    if missing or extra:
        raise AssertionError(f"{where}: weights not under the hub's names: missing {missing[:8]} "
                             f"({len(missing)}), not in the hub's list {extra[:8]} ({len(extra)})")


def random_model(small: dict[str, Any], folder: Path, seed: int) -> Any:
    """The model of the (shrunk) config dict with random weights from ``seed``, built by the class that loads
    it (transformers' class named in ``architectures``; Phi-3-V: the family's own module). ``folder`` gets the
    config.json it is read from. Attention: sdpa (a hub config may name flash-attention, absent on a CPU)."""
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(small, indent=2))
    if small["model_type"] == "phi3_v":
        from e5v.backbones import phi3_v
        from e5v.backbones.phi3_v_model import load_config

        config = load_config(str(folder))
        config._attn_implementation = "sdpa"
        return phi3_v.random_model(config, seed).float().eval()
    config = transformers.AutoConfig.from_pretrained(folder)
    arch = config.architectures[0]
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise ValueError(f"{folder}: architectures[0] {arch!r} is not a transformers class")
    torch.manual_seed(seed)
    return cls._from_config(config, attn_implementation="sdpa").float().eval()


def save_weights(model: Any, folder: Path) -> set[str]:
    """``model.save_pretrained`` (transformers writes a checkpoint's own key names: its conversion mapping,
    reversed) into ``folder``; the tensor names written."""
    from safetensors import safe_open

    tmp = folder / ".weights"
    model.save_pretrained(tmp, safe_serialization=True)
    names: set[str] = set()
    for f in sorted(tmp.glob("*.safetensors")) + sorted(tmp.glob("*.safetensors.index.json")):
        if f.suffix == ".safetensors":
            with safe_open(str(f), "pt") as st:
                names.update(st.keys())
        shutil.move(str(f), folder / f.name)
    shutil.rmtree(tmp)
    return names


def saved_state_keys(model: Any) -> set[str]:
    """The names a save of ``model`` writes (through a temporary folder)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return save_weights(model, Path(tmp))


def build(fixture: Path | str, out: Path | str, seed: int = 0) -> Path:
    """A shrunk, random, loadable copy of ``fixture``'s checkpoint in the hub's layout, at ``out``."""
    fixture, out = Path(fixture), Path(out)
    if not fixture.is_absolute() and not fixture.exists():
        fixture = FIXTURES / str(fixture)
    if (out / "config.json").is_file() and (out / ".built").is_file():
        return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    hub_cfg = json.loads((fixture / "config.json").read_text())
    small = shrink_config(hub_cfg)
    (out / "config.json").write_text(json.dumps(small, indent=2))
    for name in COPIED:
        if (fixture / name).is_file():
            shutil.copyfile(fixture / name, out / name)
    tok_cfg = json.loads((fixture / "tokenizer_config.json").read_text())
    sentencepiece = "Llama" in str(tok_cfg.get("tokenizer_class", "")) or "sp_model_kwargs" in tok_cfg
    build_tokenizer_json(tok_cfg, out, sentencepiece=sentencepiece)

    saved = save_weights(random_model(small, out, seed), out)
    (out / "config.json").write_text(json.dumps(small, indent=2))  # the hub's JSON, not transformers' rewrite
    keys = hub_keys(fixture)
    if keys is not None:
        check_keys(saved, keys, out)
    check_tokenizer_ids(out, tok_cfg)
    (out / ".built").write_text(json.dumps({"fixture": fixture.name, "seed": seed, "keys_checked": keys is not None}))
    return out


if __name__ == "__main__":
    print(build(FIXTURES / sys.argv[2], Path(sys.argv[1]) / sys.argv[2]))
