"""Backbones: tiny determinism and round-trip through the real loading path, config groups, shape model,
processor fields that broke the released code, remote-code refusal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from e5v.backbones import llava_next, tiny
from e5v.config import compose, config_dir

BACKBONES = sorted(p.stem for p in (config_dir() / "backbone").glob("*.yaml"))
# The prompt set each backbone config selects (the tiny ones are also checked against the loaded
# backbone's own default_prompt() in tests/test_backbone_contract.py).
PROMPT_OF = {
    "llava_next_mistral_7b": "e5v_mistral",
    "tiny_mistral": "e5v_mistral",
    "phi3_v": "e5v_phi3",
    "tiny_phi3_v": "e5v_phi3",
    **{n: "e5v_qwen2_vl" for n in BACKBONES if n.startswith(("qwen2", "tiny_qwen2"))},
    **{n: "e5v_qwen3_vl" for n in BACKBONES if n.startswith(("qwen3", "tiny_qwen3"))},
    **{n: "e5v_smolvlm" for n in BACKBONES if "smolvlm" in n},
    # released embedding models: their own prompts (configs/prompt/<model>.yaml, tests/eval/test_released_models.py)
    "vlm2vec_qwen2vl_2b": "vlm2vec_qwen2vl",
    "gme_qwen2vl_2b": "gme_qwen2vl",
    "qwen3_vl_embedding_2b": "qwen3_vl_embedding",
}


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_tiny_is_deterministic_from_seed(tmp_path) -> None:
    a = tiny.load(seed=3, cache_dir=str(tmp_path / "a"), device="cpu")
    b = tiny.load(seed=3, cache_dir=str(tmp_path / "b"), device="cpu")
    c = tiny.load(seed=4, cache_dir=str(tmp_path / "c"), device="cpu")
    sa, sb, sc = state(a.model), state(b.model), state(c.model)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    assert a.tokenizer.get_vocab() == b.tokenizer.get_vocab()
    # the tokenizer has the chat special tokens as single tokens, and BOS first
    ids = a.tokenizer("<|start_header_id|>user<|end_header_id|><image>")["input_ids"]
    assert ids[0] == a.tokenizer.bos_token_id and len(ids) == 5


def test_tiny_round_trip_through_local_dir(tmp_path, embedder) -> None:
    """save_pretrained -> copy -> llava_next.load(local dir): same weights, same embeddings."""
    src = tiny.ensure_tiny(seed=0)
    dst = tmp_path / "copied-model"
    shutil.copytree(src, dst)
    assert (dst / "model.safetensors").is_file() and not list(dst.glob("*.bin"))
    loaded = llava_next.load(str(dst), device="cpu", local_files_only=True)
    sa, sb = state(embedder.model), state(loaded.model)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    from e5v import Embedder

    again = Embedder.from_pretrained(str(dst), device="cpu")  # auto-detects llava_next from config.json
    assert again.prompt.name == "e5v_llama3"
    texts = ["a red circle", "two blue squares"]
    np.testing.assert_allclose(again.encode_text(texts), embedder.encode_text(texts), atol=1e-6)


def test_processor_fields_set_even_if_saved_config_breaks_them(tmp_path, embedder) -> None:
    """The released code broke on processors with patch_size=None etc.; we derive them from the model."""
    dst = tmp_path / "broken-processor"
    shutil.copytree(tiny.ensure_tiny(seed=0), dst)
    cfg_file = dst / "processor_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update({"patch_size": None, "vision_feature_select_strategy": None, "num_additional_image_tokens": 0})
    cfg_file.write_text(json.dumps(cfg))
    b = llava_next.load(str(dst), device="cpu", local_files_only=True)
    p = b.processor
    vc = b.model.config.vision_config
    assert p.patch_size == vc.patch_size
    assert p.vision_feature_select_strategy == b.model.config.vision_feature_select_strategy == "default"
    assert p.num_additional_image_tokens == 1  # CLIP prepends CLS
    assert [list(x) for x in p.image_processor.image_grid_pinpoints] == [
        list(x) for x in b.model.config.image_grid_pinpoints
    ]
    assert b.tokenizer.padding_side == "left"


def test_max_tiles_restricts_grid(embedder) -> None:
    assert llava_next.restrict_pinpoints([[32, 64], [64, 32], [64, 64]], 32, 2) == [[32, 64], [64, 32]]
    with pytest.raises(ValueError, match="max_tiles"):
        llava_next.restrict_pinpoints([[64, 64]], 32, 1)


def test_wrong_model_type_and_missing_dir(tmp_path) -> None:
    from e5v.backbones import auto

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert' has no adapter"):
        auto.load(str(tmp_path))
    with pytest.raises(ValueError, match="not llava_next"):
        llava_next.load(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        auto.load(str(empty))


def test_phi3_v_loads_natively_and_refuses_remote_code() -> None:
    """Phi-3-V needs no remote code: its config has no trust_remote_code, and asking for it is refused (before any
    download or import) with the reason, as for every family."""
    from e5v.backbones import phi3_v

    cfg = compose("embed", ["backbone=phi3_v", "embedder.device=cpu"])
    assert cfg.prompt.name == "e5v_phi3" and "trust_remote_code" not in cfg.backbone
    with pytest.raises(ValueError, match="loads natively"):
        phi3_v.load("microsoft/Phi-3-vision-128k-instruct", trust_remote_code=True)


@pytest.mark.parametrize("name", BACKBONES)
def test_every_backbone_config_composes(name: str) -> None:
    cfg = compose("embed", [f"backbone={name}"])
    assert cfg.backbone._target_.startswith("e5v.backbones.")
    expected_prompt = PROMPT_OF.get(name, "e5v_llama3")
    assert cfg.prompt.name == expected_prompt


@pytest.mark.parametrize("name", ["e5v", "llava_next_llama3_8b", "llava_next_mistral_7b"])
def test_real_backbone_configs_load_a_local_copy(name: str, tmp_path) -> None:
    """The hub configs instantiate through the same loader; pointed at a local save_pretrained copy."""
    from e5v import Embedder

    dst = tmp_path / name
    shutil.copytree(tiny.ensure_tiny(seed=0), dst)
    cfg = compose("embed", [f"backbone={name}", f"backbone.name_or_path={dst}", "embedder.device=cpu"])
    emb = Embedder.from_config(cfg)
    assert emb.backbone.name_or_path == str(dst)
    assert emb.encode_text(["a dog"]).shape == (1, emb.dim)


def test_hub_id_offline_fails_fast() -> None:
    import time

    from e5v.backbones import auto

    t = time.time()
    with pytest.raises(Exception) as err:
        auto.load("royokong/e5-v", local_files_only=True)
    assert time.time() - t < 20
    assert "e5-v" in str(err.value) or "offline" in str(err.value).lower() or "local" in str(err.value).lower()


def test_shape_backbone_on_meta_has_8b_parameters() -> None:
    from e5v.backbones import shape

    model = shape.build_meta_model(shape.build_config(image_token_id=5))
    n = sum(p.numel() for p in model.parameters())
    assert all(p.is_meta for p in model.parameters())
    assert 8.3e9 < n < 8.4e9, n  # LLaVA-NeXT-8B: 8.36B parameters
    assert model.config.text_config.hidden_size == 4096


@pytest.mark.slow
def test_shape_backbone_materialises_and_embeds() -> None:
    """One layer of the 8B shape in bf16 on CPU (~3 GB): parameters real, embedding finite."""
    from e5v import Embedder
    from e5v.backbones import shape

    b = shape.load(dtype="bfloat16", device="cpu", num_hidden_layers=1)
    assert not any(p.is_meta for p in b.model.parameters())
    assert b.dtype == torch.bfloat16
    from e5v.prompts import load_prompt

    emb = Embedder(b, load_prompt("e5v_llama3"))
    x = emb.encode_text(["a dog runs"])
    assert x.shape == (1, 4096) and np.isfinite(x).all()


def test_shape_materialise_small() -> None:
    """Materialisation on a shrunken config: every parameter leaves meta, norms are 1, biases 0."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    from e5v.backbones import shape

    cfg = LlavaNextConfig(
        text_config=LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=4, num_key_value_heads=2),
        vision_config=CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=4),
        image_token_index=5,
        image_grid_pinpoints=[[32, 64]],
    )
    model = shape.materialise(shape.build_meta_model(cfg), torch.device("cpu"), torch.float32, seed=0)
    params = dict(model.named_parameters())
    assert not any(p.is_meta for p in params.values())
    assert torch.all(params["model.language_model.norm.weight"] == 1)
    w = params["model.language_model.layers.0.self_attn.q_proj.weight"]
    assert 0.015 < w.std().item() < 0.025
    inv_freq = model.model.language_model.rotary_emb.inv_freq
    assert torch.isfinite(inv_freq).all() and inv_freq[0] == 1.0


def test_max_tiles_embeds_consistently(tiny_dir) -> None:
    """Restricting the anyres grid changes processor AND model tile counts together."""
    from conftest import make_image
    from e5v import Embedder

    img = make_image(96, 96, seed=3)  # full grid: 64x64 (4 tiles); max_tiles=2: 32x64 or 64x32
    full = Embedder.from_pretrained("tiny", device="cpu")
    two = Embedder.from_pretrained("tiny", device="cpu", max_tiles=2)
    assert two.model.config.image_grid_pinpoints == [[32, 64], [64, 32]]
    assert two._image_tokens(img) < full._image_tokens(img)
    a, b = full.encode_image([img])[0], two.encode_image([img])[0]
    assert np.isfinite(b).all() and not np.allclose(a, b, atol=1e-4)
    np.testing.assert_allclose(two.encode_image([img, make_image(30, 70, 1)])[0], b, atol=1e-5)
