"""Phi-3-V, native (e5v/backbones/phi3_v*.py), against the hub checkpoint's own files
(tests/fixtures/hub/microsoft__Phi-3-vision-128k-instruct: config.json, preprocessor_config.json, the weight key
list): the tiny variant has the hub's layout, the hub's config loads and reads back as the remote code reads it,
the HD transform's sizes and token counts follow the hub's formula, a checkpoint whose keys do not match is
refused. The forward against the hub's remote code itself: scripts/phi3v_remote_parity.py (slow test below, when
the hub's .py files are given in E5V_PHI3V_REMOTE_CODE)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_image
from e5v.config import REPO_ROOT

HUB = Path(__file__).parent / "fixtures" / "hub" / "microsoft__Phi-3-vision-128k-instruct"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from e5v.backbones import phi3_v

    return phi3_v.tiny_folder({"seed": 0, "cache_dir": str(tmp_path_factory.mktemp("tiny"))}, build=True)


def _layerless(keys: set[str]) -> set[str]:
    return {re.sub(r"\.layers\.\d+\.", ".layers.N.", k) for k in keys}


def test_phi3_v_tiny_has_the_hub_checkpoints_layout(tiny: Path) -> None:
    """Weight names (layer indices aside), config.json's keys, architectures, auto_map, embd_layer and
    img_processor (plus the tiny tower), preprocessor_config.json's keys: the hub's."""
    from safetensors import safe_open

    hub_keys = set(json.loads((HUB / "model.safetensors.index.json").read_text())["weight_map"])
    with safe_open(str(tiny / "model.safetensors"), "pt") as f:
        ours = set(f.keys())
    assert _layerless(ours) == _layerless(hub_keys)
    hub_cfg, cfg = (json.loads((d / "config.json").read_text()) for d in (HUB, tiny))
    ignore = {"_name_or_path", "_attn_implementation", "torch_dtype", "transformers_version", "dtype"}
    # Phi-3's defaults that transformers writes out (the remote config has the same defaults)
    assert set(hub_cfg) - ignore <= set(cfg) and set(cfg) - set(hub_cfg) <= {"dtype", "pad_token_id", "embd_pdrop",
                                                                           "resid_pdrop"}
    for k in ("architectures", "auto_map", "embd_layer", "model_type", "hidden_act", "rope_theta"):
        assert cfg[k] == hub_cfg[k], k
    assert {k: v for k, v in cfg["img_processor"].items() if k != "e5v_vision_config"}.keys() == hub_cfg[
        "img_processor"].keys()
    assert cfg["rope_scaling"].keys() == hub_cfg["rope_scaling"].keys() and cfg["rope_scaling"]["type"] == "su"
    hub_pre, pre = (json.loads((d / "preprocessor_config.json").read_text()) for d in (HUB, tiny))
    assert set(pre) - {"crop_size"} == set(hub_pre) and pre["auto_map"] == hub_pre["auto_map"]


def test_phi3_v_hub_config_loads_and_writes_back_as_the_remote_code_reads_it(tmp_path: Path) -> None:
    from e5v.backbones.phi3_v_model import CLIP_VIT_L14_336, Phi3VForCausalLM, load_config, rope_attention_factor, \
        vision_config

    cfg = load_config(str(HUB))
    assert cfg.rope_parameters["rope_type"] == "longrope" and cfg.rope_parameters["original_max_position_embeddings"] == 4096
    assert rope_attention_factor(cfg) == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    v = vision_config(cfg)
    assert {k: getattr(v, k) for k in CLIP_VIT_L14_336} == CLIP_VIT_L14_336
    written = cfg.to_dict()  # the hub's three-field rope_scaling (its config class refuses any other)
    hub = json.loads((HUB / "config.json").read_text())
    assert written["rope_scaling"] == hub["rope_scaling"] and "rope_parameters" not in written
    assert written["rope_theta"] == hub["rope_theta"]
    with torch.device("meta"):
        model = Phi3VForCausalLM(cfg)
    hub_keys = set(json.loads((HUB / "model.safetensors.index.json").read_text())["weight_map"])
    assert set(model.state_dict()) == hub_keys  # the real model's every weight name, all 32 + 24 layers
    n = sum(p.numel() for p in model.parameters())
    assert 4.1e9 < n < 4.2e9, n  # Phi-3-vision-128k-instruct: 4.2B
    bad = dict(hub, rope_scaling={**hub["rope_scaling"], "type": "yarn"})
    with pytest.raises(ValueError, match="yarn"):
        load_config(bad)
    with pytest.raises(ValueError, match="img_processor"):
        load_config({**hub, "img_processor": {**hub["img_processor"], "image_dim_out": 32}})


@pytest.mark.parametrize("size,hd,tokens", [
    ((40, 40), (1344, 1344), 2509),   # square: 4 x 4 crops (num_crops 16)
    ((500, 333), (1344, 1008), 1921),  # 4 wide, 3 high: (12 + 1) * 144 + 1 + (3 + 1) * 12
    ((90, 30), (2016, 672), 1909),     # ratio 3: scale 6 (6 * ceil(6 / 3) = 12 <= 16; 7 * 3 > 16), 6 wide, 2 high
    ((30, 90), (672, 2016), 1957),     # portrait: transposed for the resize, 2 wide, 6 high
    ((700, 120), (2688, 672), 2485),   # ratio 5.8: scale 8, 8 x 2 = 16 crops, height 460 padded to 672
])
def test_phi3_v_hd_transform_sizes_and_tokens(size: tuple[int, int], hd: tuple[int, int], tokens: int) -> None:
    """The hub's image processor settings (num_crops 16, 336 px crops, 144 tokens per crop): HD size, image sizes,
    token counts from the size and from the processor, crops (global view first), zero padding."""
    from e5v.backbones.phi3_v_processing import Phi3VImageProcessor

    ip = Phi3VImageProcessor.from_pretrained(str(HUB))
    assert (ip.num_crops, ip.crop_size, ip.num_img_tokens) == (16, 336, 144)
    assert ip.hd_size(*size) == hd and ip.calc_num_image_tokens_from_image_size(*size) == tokens
    out = ip([make_image(*size, seed=1)])
    w, h = hd
    assert out["image_sizes"].tolist() == [[h, w]] and out["num_img_tokens"] == [tokens]
    crops = (h // 336) * (w // 336)
    assert out["pixel_values"].shape == (1, 17, 3, 336, 336)
    assert out["pixel_values"][0, : crops + 1].abs().sum((1, 2, 3)).gt(0).all()
    assert not out["pixel_values"][0, crops + 1:].any()


def test_phi3_v_processor_text_alone_is_the_tokenizer(tiny: Path) -> None:
    from e5v.backbones import phi3_v

    b = phi3_v.load(str(tiny), device="cpu", local_files_only=True)
    prompt = "<|user|>\nA dog.\nSummary above sentence in one word:<|end|>\n<|assistant|>\n"
    assert b.processor(prompt)["input_ids"].tolist() == [b.tokenizer(prompt)["input_ids"]]
    assert b.processor(prompt)["input_ids"][0, 0] == b.tokenizer.bos_token_id
    with pytest.raises(ValueError, match="image tags"):
        b.processor(prompt.replace("A dog.", "<|image_2|>"), [make_image(30, 30, seed=0)])
    assert b.tokenizer.padding_side == "left"


def test_phi3_v_refuses_a_checkpoint_whose_keys_are_not_the_hubs(tiny: Path, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    from e5v.backbones import phi3_v

    d = tmp_path / "renamed"
    shutil.copytree(tiny, d)
    w = load_file(str(d / "model.safetensors"))
    w["model.vision_embed_tokens.img_processor.embeddings.class_embedding"] = w.pop(
        "model.vision_embed_tokens.img_processor.vision_model.embeddings.class_embedding")  # a transformers-5 name
    save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="class_embedding"):
        phi3_v.load(str(d), device="cpu", local_files_only=True)


def test_phi3_v_memory_estimate_at_the_real_shape() -> None:
    """scripts/phi3v_memory.py on the hub's config: 32 images of 4 x 4 crops, bf16."""
    from scripts.phi3v_memory import HUB_CONFIG, estimate

    e = estimate(json.loads(HUB_CONFIG.read_text()))
    assert e["tokens_per_image"] - 20 == 2509 and e["params_billion"] == pytest.approx(4.15, abs=0.01)
    gb = e["GB"]
    assert gb["released_logits_fp32"] == pytest.approx(e["tokens"] * 32064 * 4 / 1e9, rel=1e-2)
    assert gb["ours_peak"] < 16 < 26 < gb["released_extra"] < gb["released_peak"]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("E5V_PHI3V_REMOTE_CODE"),
                    reason="set E5V_PHI3V_REMOTE_CODE to a folder with the hub's Phi-3-V .py files")
def test_phi3_v_equals_the_hubs_remote_code_under_transformers_4_44(tmp_path: Path) -> None:
    """scripts/phi3v_remote_parity.py: fp32, 1e-5, text / images / image+text, one LoRA step (builds a ~3 GB
    transformers-4.44 environment once; skips if the package registry is unreachable)."""
    p = subprocess.run([sys.executable, "-m", "scripts.phi3v_remote_parity", "--remote-code",
                        os.environ["E5V_PHI3V_REMOTE_CODE"], "--work", str(tmp_path / "work")],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=3000)
    if p.returncode == 3:
        pytest.skip("the package registry is unreachable")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
