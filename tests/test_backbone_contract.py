"""The backbone contract, on every registered backbone with a tiny offline variant (``registry.tiny_names()``):
the registry and its YAMLs agree; text, image and image+text embeddings are batch invariant (1e-5) and equal a
plain Hugging Face recipe per item (1e-5, fp32); LoRA reaches the language model only; training and the
Embedder embed the same (parity by construction, 1e-5), one step leaves the vision tower bit-identical, a
merged adapter embeds the same; Qwen's multimodal rotary positions under left padding; Phi-3-V's one-string
processor calls (each chunk with its BOS, negative image ids) and the release's LoRA targets on tiny_phi3_v (the
hub's layout; its forward is checked against the hub's remote code by scripts/phi3v_remote_parity.py); the README
"Extend" steps walked with a throwaway backbone; bad input names the backbone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import make_image
from e5v.backbones import registry
from e5v.config import REPO_ROOT, compose, config_dir

TINY = registry.tiny_names()
# One fast smoke per family in `make test`; the other tiny variants' heavier tests are marked slow (make test-all).
FAST = {"tiny", "tiny_phi3_v", "tiny_qwen2_vl", "tiny_qwen3_vl", "tiny_smolvlm"}


def per_backbone(names: list[str] | None = None) -> list[Any]:
    return [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in (names or TINY)]
TEXTS = ["a red circle", "two blue squares near a big tree on the left", "x", "a small dog is running"]
EDIT = "make the largest shape blue and move it to the left"


def _images() -> list[Any]:
    return [make_image(w, h, seed=i) for i, (w, h) in enumerate([(40, 40), (90, 30), (30, 90), (64, 64), (200, 120),
                                                                 (16, 16)])]


class _Loaded(dict):
    """name -> Embedder (the prompt set its config selects), loaded on first use."""

    def __missing__(self, name: str) -> Any:
        from e5v import Embedder

        self[name] = Embedder.from_pretrained(name, device="cpu", batch_size=3)
        return self[name]


@pytest.fixture(scope="module")
def loaded() -> dict[str, Any]:
    return _Loaded()


# ---------------------------------------------------------------------- the registry and its YAMLs
def test_backbone_registry_matches_the_configs() -> None:
    table = registry.specs()
    assert {"tiny", "tiny_mistral", "tiny_phi3_v", "tiny_qwen2_vl", "tiny_qwen2_5_vl", "tiny_qwen3_vl", "tiny_smolvlm",
            "tiny_smolvlm_idefics3"} <= set(TINY)
    assert {"llava_next", "phi3_v", "qwen2_vl", "qwen3_vl", "smolvlm"} <= {n for n, s in table.items() if s.model_types}
    assert registry.for_model_type("idefics3").name == "smolvlm"  # the hub's SmolVLM-256M/500M-Instruct are idefics3
    yamls = {p.stem for p in (config_dir() / "backbone").glob("*.yaml")}
    for name, spec in table.items():
        if spec.builtin:  # every builtin has its YAML, naming the same loader with the same fixed arguments
            assert name in yamls, name
            node = compose("embed", [f"backbone={name}"]).backbone
            assert node._target_ == spec.target, name
            assert all(node.get(k) == v for k, v in spec.kwargs.items()), name
            assert registry.for_target(node._target_, dict(node)) is spec
    for name in yamls:  # every YAML loads through a registered row
        node = compose("embed", [f"backbone={name}"]).backbone
        spec = registry.for_target(node._target_, dict(node))
        assert spec is not None, name
        assert spec.builtin or spec.model_types, name


def test_backbone_unknown_name_is_one_line_listing_the_names() -> None:
    with pytest.raises(registry.UnknownBackboneError) as err:
        registry.get("tiny_qwen")
    line = str(err.value)
    assert "\n" not in line and "'tiny_qwen'" in line and all(n in line for n in TINY)
    from e5v.backbones import auto

    with pytest.raises(auto.ModelNotFoundError, match=r"did you mean tiny_qwen\d"):  # the closest builtin name
        auto.load("tiny_qwen")


@pytest.mark.parametrize("name", per_backbone())
def test_backbone_default_prompt_is_the_configs(name: str, loaded: dict[str, Any]) -> None:
    emb = loaded[name]
    assert emb.prompt.name == emb.backbone.default_prompt() == compose("embed", [f"backbone={name}"]).prompt.name


# ---------------------------------------------------------------------- encode: invariance and HF parity
@pytest.mark.parametrize("name", per_backbone())
def test_backbone_batch_invariance_and_plain_hf_parity(name: str, loaded: dict[str, Any]) -> None:
    """Batched (length-sorted, left padded, batch 3) == one at a time == ``model(**processor(...),
    output_hidden_states=True).hidden_states[-1][:, -1]`` per item, for text, images and image+text."""
    emb = loaded[name]
    b, images = emb.backbone, _images()
    pairs = [(im, EDIT if i % 2 else "blue") for i, im in enumerate(images)]
    batched = {
        "text": emb.encode_text(TEXTS, normalize=False),
        "image": emb.encode_image(images, normalize=False),
        "interleaved": emb.encode_interleaved(pairs, normalize=False),
    }
    single = {
        "text": np.concatenate([emb.encode_text([t], normalize=False) for t in TEXTS]),
        "image": np.concatenate([emb.encode_image([im], normalize=False) for im in images]),
        "interleaved": np.concatenate([emb.encode_interleaved([p], normalize=False) for p in pairs]),
    }
    plain: dict[str, list[np.ndarray]] = {"text": [], "image": [], "interleaved": []}
    with torch.no_grad():
        for t in TEXTS:
            enc = b.tokenizer([emb.prompt.render("text", t)], return_tensors="pt")
            plain["text"].append(b.model(**enc, output_hidden_states=True).hidden_states[-1][:, -1].numpy())
        for kind, items in (("image", [(im, None) for im in images]), ("interleaved", pairs)):
            for im, t in items:
                prompt = emb.prompt.render("image") if kind == "image" else emb.prompt.render("cirr_query", t)
                enc = b.processor(text=[prompt], images=[im], return_tensors="pt")
                plain[kind].append(b.model(**enc, output_hidden_states=True).hidden_states[-1][:, -1].numpy())
    for kind in batched:
        assert np.abs(batched[kind] - single[kind]).max() < 1e-5, (name, kind)
        assert np.abs(batched[kind] - np.concatenate(plain[kind])).max() < 1e-5, (name, kind)


# ---------------------------------------------------------------------- training side
@pytest.mark.parametrize("name", TINY)
def test_backbone_lora_reaches_the_language_model_only(name: str) -> None:
    from e5v.lora import add_lora

    b = registry.get(name).load(device="cpu")
    n_layers = len(b.language_model().layers)
    peft_model = add_lora(b, r=2, alpha=4, dropout=0.0)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(b.in_language_model(n) and "lora_" in n for n in trainable)
    targeted = {n.split(".lora_")[0].split(".")[-1] for n in trainable}
    assert targeted == set(b.lora_targets) and len(trainable) == 2 * n_layers * len(b.lora_targets)
    assert b.frozen() and not any(p.requires_grad for m in b.frozen() for p in m.parameters())


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> dict[str, Any]:
    """tests/helpers/backbone_probe.py on the tiny backbones whose tests were selected (the fast ones in
    `make test`, every one with slow tests), in one subprocess (DeepSpeed wants a launcher env)."""
    names = sorted({item.callspec.params["name"] for item in request.session.items
                    if "probe" in getattr(item, "fixturenames", ()) and hasattr(item, "callspec")})
    tmp = tmp_path_factory.mktemp("backbone-probe")
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", E5V_NO_PROGRESS="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("RANK", None)
    p = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "helpers" / "backbone_probe.py"),
                        str(tmp / "probe.json"), str(tmp / "data"), *names],
                       cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads((tmp / "probe.json").read_text())


@pytest.mark.parametrize("name", per_backbone())
def test_backbone_train_inference_parity(name: str, probe: dict[str, Any]) -> None:
    """The trainer's embeddings (its batch, through the DeepSpeed engine, after one step) == the Embedder's."""
    r = probe[name]
    assert r["text_max_diff"] < 1e-5, r
    assert r["image_max_diff"] is None or r["image_max_diff"] < 1e-5, r


@pytest.mark.parametrize("name", per_backbone())
def test_backbone_one_training_step_keeps_the_vision_tower_bit_identical(name: str, probe: dict[str, Any]) -> None:
    r = probe[name]
    assert np.isfinite(r["loss"]) and r["lora_changed"] > 0 and r["outside_lm_trainable"] == []
    assert r["frozen_tower_params"] > 0 and r["frozen_changed"] == [] and r["frozen_with_grad"] == []


@pytest.mark.parametrize("name", per_backbone())
def test_backbone_merged_adapter_embeds_the_same(name: str, probe: dict[str, Any]) -> None:
    r = probe[name]
    assert r["merge_max_diff"] < 1e-5, r
    assert registry.for_model_type(r["merged_family"]).model_types  # loaded back through its family row


# ---------------------------------------------------------------------- Qwen: multimodal rotary positions
@pytest.mark.parametrize("name", per_backbone([n for n in TINY if n.startswith("tiny_qwen")]))
def test_backbone_qwen_rope_index_under_left_padding(name: str, loaded: dict[str, Any]) -> None:
    """The model's own get_rope_index with the attention mask: a left-padded row gets the positions it has
    alone, and text rows get exactly the mask's positions (what text batches pass)."""
    from e5v.backbones.batching import positions_from_mask

    emb = loaded[name]
    inner, inputs = emb.backbone.model.model, emb.inputs
    ids = inputs.tokenize([emb.prompt.render("text", t) for t in TEXTS])
    batch = inputs.text(ids)
    rope, _ = inner.get_rope_index(batch["input_ids"], torch.zeros_like(batch["input_ids"]),
                                   attention_mask=batch["attention_mask"])
    m = batch["attention_mask"].bool()
    assert torch.equal(rope[:, m], positions_from_mask(batch["attention_mask"])[None].expand(3, -1, -1)[:, m])
    images = _images()[:3]
    prompt = emb.prompt.render("image")
    padded = inputs.prompt_images(prompt, images)
    assert (padded["attention_mask"] == 0).any()  # images of several sizes: rows are left padded
    pos, _ = inner.get_rope_index(padded["input_ids"], padded["mm_token_type_ids"],
                                  image_grid_thw=padded["image_grid_thw"], attention_mask=padded["attention_mask"])
    for r, im in enumerate(images):
        one = inputs.prompt_images(prompt, [im])
        alone, _ = inner.get_rope_index(one["input_ids"], one["mm_token_type_ids"],
                                        image_grid_thw=one["image_grid_thw"], attention_mask=one["attention_mask"])
        keep = padded["attention_mask"][r].bool()
        assert torch.equal(pos[:, r, keep], alone[:, 0]), r
        assert pos[1:, r, keep].ne(pos[0, r, keep]).any()  # image tokens: height/width rows differ from time


@pytest.mark.parametrize("name", per_backbone([n for n in TINY if n.startswith(("tiny_qwen", "tiny_smolvlm"))]))
def test_backbone_prompt_is_the_models_own_chat_template(name: str, loaded: dict[str, Any]) -> None:
    """Beyond the paper, the E5-V prompt is what the model's own chat template renders for one user message
    (generation prompt added): image first, then the body's text; or the text alone."""
    emb = loaded[name]
    p = emb.prompt
    for owner in (emb.tokenizer, emb.backbone.processor):  # the processor's renders too (no video processor here)
        body = p.body("image").replace("<image>", "")
        message = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": body}]}
        chat = owner.apply_chat_template([message], add_generation_prompt=True, tokenize=False)
        assert chat == p.render("image"), type(owner).__name__
        text = p.body("text").replace("<sent>", "a dog").lstrip(" ")  # a template may put the space itself
        chat = owner.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": text}]}],
                                         add_generation_prompt=True, tokenize=False)
        assert chat == p.render("text", "a dog"), type(owner).__name__


# ---------------------------------------------------------------------- the hub's own chat templates
FIXTURES = Path(__file__).parent / "fixtures" / "hub"
# (tiny variant with the checkpoint's processor class, hub checkpoint whose files it is checked against)
HUB_FILES = [("tiny_smolvlm_idefics3", "HuggingFaceTB/SmolVLM-256M-Instruct"),
                 ("tiny_smolvlm_idefics3", "HuggingFaceTB/SmolVLM-500M-Instruct"),
                 ("tiny_qwen3_vl", "Qwen/Qwen3-VL-2B-Instruct"), ("tiny_qwen3_vl", "Qwen/Qwen3-VL-4B-Instruct"),
                 ("tiny_qwen3_vl", "Qwen/Qwen3-VL-8B-Instruct")]
# what a chat template writes itself between the role and a message that starts with text (SmolVLM: "User: ",
# "User:" before an image), so the message's text is the E5-V body without it
TEMPLATE_SPACE = {"e5v_smolvlm": " ", "e5v_qwen3_vl": ""}


def hub_chat_template(hub_id: str) -> str | None:
    """The checkpoint's chat template from its fixture files (chat_template.jinja / .json, tokenizer_config.json)."""
    d = FIXTURES / hub_id.replace("/", "__")
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        if (d / name).is_file() and "chat_template" in (cfg := json.loads((d / name).read_text(encoding="utf-8"))):
            return str(cfg["chat_template"])
    return None


def _messages(body: str, space: str) -> list[dict[str, Any]]:
    """One user message holding an E5-V body: the image (the body's leading <image>), then its text."""
    content: list[dict[str, Any]] = []
    if body.startswith("<image>"):
        content.append({"type": "image"})
        body = body.removeprefix("<image>")
    else:
        assert body.startswith(space), body
        body = body.removeprefix(space)
    assert "<image>" not in body
    return [{"role": "user", "content": [*content, {"type": "text", "text": body}]}]


@pytest.mark.parametrize("name,hub_id", HUB_FILES)
def test_backbone_every_prompt_is_what_the_hub_chat_template_renders(name: str, hub_id: str,
                                                                     loaded: dict[str, Any]) -> None:
    """README item: each E5-V prompt (every body: text, image, CIRR, FashionIQ, STS, training) equals what the
    checkpoint's OWN chat template, from its hub files, renders through our processor's ``apply_chat_template``
    for one user message with the generation prompt."""
    template = hub_chat_template(hub_id)
    if template is None:
        pytest.skip(f"no chat template of {hub_id} in {FIXTURES} yet")
    emb = loaded[name]
    p = emb.prompt
    for kind in p.bodies:
        body = p.body(kind).replace("<sent>", "a dog.").replace("{X}", "dress")
        chat = emb.backbone.processor.apply_chat_template(_messages(body, TEMPLATE_SPACE[p.name]),
                                                          chat_template=template, add_generation_prompt=True,
                                                          tokenize=False)
        text = "a dog." if "<sent>" in p.body(kind) else None
        assert chat == p.render(kind, text, category="dress" if "{X}" in p.body(kind) else None), (hub_id, kind)


@pytest.mark.parametrize("name,hub_id", HUB_FILES)
def test_backbone_tiny_processor_is_the_hub_checkpoints(name: str, hub_id: str, loaded: dict[str, Any]) -> None:
    """The tiny variant's processor is the class the checkpoint's processor files name, and its image processor
    has the checkpoint's geometry and normalisation (patch, merge and temporal patch sizes, mean, std)."""
    d = FIXTURES / hub_id.replace("/", "__")
    files = {f: json.loads((d / f).read_text()) for f in ("processor_config.json", "preprocessor_config.json")
             if (d / f).is_file()}
    if not files:
        pytest.skip(f"no processor files of {hub_id} in {FIXTURES} yet")
    proc = loaded[name].backbone.processor
    assert {cfg["processor_class"] for cfg in files.values()} == {type(proc).__name__}
    pre = files.get("preprocessor_config.json", {})
    if "patch_size" in pre:
        ip = proc.image_processor
        assert [getattr(ip, k) for k in ("patch_size", "merge_size", "temporal_patch_size")] == [
            pre[k] for k in ("patch_size", "merge_size", "temporal_patch_size")]
        assert (list(ip.image_mean), list(ip.image_std)) == (pre["image_mean"], pre["image_std"])
        assert type(ip).__name__.removesuffix("Pil") == pre["image_processor_type"].removesuffix("Fast")


# (tiny variant, the hub checkpoint whose config.json it shrinks)
TINY_OF_HUB = [("tiny_qwen3_vl", "Qwen/Qwen3-VL-4B-Instruct"),
               ("tiny_smolvlm_idefics3", "HuggingFaceTB/SmolVLM-256M-Instruct")]
# what shrinking may change: widths, depths, vocabulary and the lists sized by them; special token ids (the
# tiny tokenizer's); bookkeeping
SHRUNK = {"hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
          "num_hidden_layers", "depth", "num_heads", "out_hidden_size", "num_position_embeddings",
          "max_position_embeddings", "vocab_size", "mrope_section", "deepstack_visual_indexes"}
BOOKKEEPING = {"_name_or_path", "dtype", "torch_dtype", "transformers_version"}


@pytest.mark.parametrize("name,hub_id", TINY_OF_HUB)
def test_backbone_tiny_config_is_the_hub_config_shrunk(name: str, hub_id: str, loaded: dict[str, Any]) -> None:
    """The tiny variant's config is the checkpoint's config.json (as transformers reads it) with only sizes and
    token ids changed: same model type and architecture, activations, norms, rope settings, tied embeddings,
    image geometry; the size-bound lists keep their length (M-RoPE sections their proportion)."""
    d = FIXTURES / hub_id.replace("/", "__")
    if not (d / "config.json").is_file():
        pytest.skip(f"no config.json of {hub_id} in {FIXTURES} yet")
    from transformers import AutoConfig

    hub, tiny = AutoConfig.from_pretrained(d).to_dict(), loaded[name].backbone.model.config.to_dict()

    def walk(a: Any, b: Any, path: str) -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            return [p for k in sorted(set(a) | set(b)) for p in walk(a.get(k, "<absent>"), b.get(k, "<absent>"),
                                                                     f"{path}.{k}")]
        key = path.rsplit(".", 1)[-1]
        if a == b or key in BOOKKEEPING or key.endswith(("token_id", "token_ids")):
            return []
        if key in SHRUNK and (not isinstance(a, list) or (isinstance(b, list) and len(a) == len(b))):
            return []
        return [f"{path}: hub {a!r}, tiny {b!r}"]

    assert walk(hub, tiny, "") == []
    sections = [(c.get("text_config", {}).get("rope_parameters") or {}).get("mrope_section") for c in (hub, tiny)]
    if sections[0]:  # the rotary dimensions split over time, height, width in the hub's proportion
        share = [[x / sum(sec) for x in sec] for sec in sections]
        assert share[1] == pytest.approx(share[0], abs=0.02)


# ---------------------------------------------------------------------- SmolVLM: idefics3-typed == smolvlm-typed
def test_backbone_smolvlm_idefics3_typed_embeds_as_smolvlm_typed(loaded: dict[str, Any]) -> None:
    """The hub's SmolVLM-256M/500M-Instruct are idefics3-typed: they load through the SmolVLM family with
    transformers' Idefics3 classes (model, processor, image processor), under the hub's weight names, and with
    the same weights embed EXACTLY as the smolvlm-typed model (difference 0) for text, images and image+text."""
    smol, idef = loaded["tiny_smolvlm"], loaded["tiny_smolvlm_idefics3"]
    assert (type(smol.backbone.model).__name__, type(smol.backbone.processor).__name__) == (
        "SmolVLMForConditionalGeneration", "SmolVLMProcessor")
    assert (type(idef.backbone.model).__name__, type(idef.backbone.processor).__name__,
            type(idef.backbone.processor.image_processor).__name__.removesuffix("Pil")) == (
        "Idefics3ForConditionalGeneration", "Idefics3Processor", "Idefics3ImageProcessor")
    assert idef.backbone.family == "tiny_smolvlm_idefics3" and idef.prompt.name == "e5v_smolvlm"
    a, b = smol.backbone.model.state_dict(), idef.backbone.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same weights, the same names
    assert {k.split(".")[1] for k in b if k.startswith("model.")} == {"vision_model", "connector", "text_model"}
    assert {k for k in b if not k.startswith("model.")} == {"lm_head.weight"}
    images = _images()
    pairs = [(im, EDIT if i % 2 else "blue") for i, im in enumerate(images)]
    for run in (lambda e: e.encode_text(TEXTS, normalize=False), lambda e: e.encode_image(images, normalize=False),
                lambda e: e.encode_interleaved(pairs, normalize=False)):
        assert np.array_equal(run(smol), run(idef))


def test_backbone_smolvlm_family_refuses_an_idefics3_checkpoint_without_smolvlm_chat_tokens(
        loaded: dict[str, Any]) -> None:
    """idefics3 is also Idefics3-8B's model type, whose chat template is Llama-3's: a tokenizer without SmolVLM's
    chat tokens is refused by name instead of embedding the wrong prompts."""
    from e5v.backbones.smolvlm import check_chat_tokens

    check_chat_tokens(loaded["tiny_smolvlm_idefics3"].tokenizer, "tiny")  # SmolVLM's: passes
    with pytest.raises(ValueError, match=r"no <\|im_start\|>, <end_of_utterance> token.*not a SmolVLM"):
        check_chat_tokens(loaded["tiny"].tokenizer, "llama3-tokenizer")


# ---------------------------------------------------------------------- Phi-3-V: one string per processor call
def test_backbone_phi3_v_processor_one_string_per_item(loaded: dict[str, Any]) -> None:
    """tiny_phi3_v: the processor takes ONE string (a list of several raises TypeError, as the hub's does); every
    chunk around <|image_1|> is tokenized with its own BOS (the hub's code keeps them) and the tag becomes
    num_img_tokens copies of -1; our inputs call it once per item, left pad the items, zero-pad the crops and
    give positions from the mask; the token count from the image size equals the processor's."""
    b = loaded["tiny_phi3_v"].backbone
    proc, tok = b.processor, b.tokenizer
    images = _images()[:3]
    prompt = "<|user|>\n<|image_1|>\nSummary above image in one word:<|end|>\n<|assistant|>\n"
    with pytest.raises(TypeError):
        proc([prompt] * 3, images)
    before, after = prompt.split("<|image_1|>")
    alone = [proc(prompt, [im]) for im in images]
    for a in alone:
        ids = a["input_ids"][0].tolist()
        n = ids.count(-1)
        assert ids == tok(before)["input_ids"] + [-1] * n + tok(after)["input_ids"] and ids[0] == tok.bos_token_id
        assert a["pixel_values"].shape[1] == proc.image_processor.num_crops + 1  # zero-padded to num_crops + 1
    calls = []
    real = type(proc).__call__
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(proc), "__call__", lambda self, text, images=None, **kw: (
            calls.append((type(text), len(images))), real(self, text, images, **kw))[1])
        batch = b.inputs().prompt_images(prompt, images)
    assert calls == [(str, 1)] * 3
    width = max(a["input_ids"].shape[1] for a in alone)
    for r, a in enumerate(alone):
        n = a["input_ids"].shape[1]
        assert torch.equal(batch["input_ids"][r, width - n:], a["input_ids"][0])
        assert batch["attention_mask"][r].sum() == n and batch["position_ids"][r, -1] == n - 1
        assert torch.equal(batch["pixel_values"][r], a["pixel_values"][0])
    counts = b.inputs().image_tokens([(im.size[1], im.size[0]) for im in images])
    assert counts == [int((a["input_ids"] < 0).sum()) for a in alone]


def test_backbone_phi3_v_lora_on_the_releases_targets() -> None:
    """LoRA exactly on model.layers.{i}.{self_attn.qkv_proj, self_attn.o_proj, mlp.gate_up_proj, mlp.down_proj}
    (ft_llm.py's Phi-3 targets), by the hub's module names; never the image embedding or lm_head."""
    from e5v.lora import add_lora

    b = registry.get("tiny_phi3_v").load(device="cpu")
    peft_model = add_lora(b, r=2, alpha=4, dropout=0.0)
    targeted = sorted({n.split(".lora_")[0].replace("base_model.model.", "") for n, p in peft_model.named_parameters()
                       if p.requires_grad})
    released = sorted(f"model.layers.{i}.{m}" for i in range(2) for m in (
        "mlp.gate_up_proj", "mlp.down_proj", "self_attn.o_proj", "self_attn.qkv_proj"))
    assert targeted == released


# ---------------------------------------------------------------------- README "Extend", walked
THROWAWAY = '''
"""A throwaway backbone family for the test: a text-only view of the tiny LLaVA-NeXT."""
from e5v.backbones import registry, tiny
from e5v.backbones.llava_next import LlavaNextBackbone


class TextOnly(LlavaNextBackbone):
    modalities = ("text",)
    prompt_name = "generic_llama3"


def load(seed=0, dtype="float32", device="cpu", cache_dir=None):
    b = tiny.load(seed=seed, dtype=dtype, device=device, cache_dir=cache_dir)
    return TextOnly(model=b.model, processor=b.processor, family="throwaway_text", name_or_path="throwaway_text")


registry.register(registry.BackboneSpec(name="throwaway_text", loader=load, builtin=True,
                                        description="test only"))
'''


def test_backbone_extend_steps_with_a_throwaway_backbone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README "Extend": (1) one module registering its row, (2) one YAML; then it embeds by name and by config,
    takes LoRA on its language model, and refuses the input kinds it does not take, naming itself."""
    (tmp_path / "throwaway_backbone.py").write_text(THROWAWAY)
    configs = tmp_path / "configs"
    shutil.copytree(config_dir(), configs)
    (configs / "backbone" / "throwaway_text.yaml").write_text(
        "# test only\n_target_: throwaway_backbone.load\nseed: 0\ncache_dir: ${paths.cache_dir}/tiny\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("E5V_CONFIG_DIR", str(configs))
    import importlib

    mod = importlib.import_module("throwaway_backbone")
    try:
        from e5v import Embedder
        from e5v.backbones.base import UnsupportedInputError
        from e5v.lora import add_lora

        by_name = Embedder.from_pretrained("throwaway_text", device="cpu")
        assert by_name.prompt.name == "generic_llama3"
        cfg = compose("embed", ["backbone=throwaway_text", "prompt=generic_llama3", "embedder.device=cpu"])
        by_config = Embedder.from_config(cfg)
        assert type(by_config.backbone) is mod.TextOnly
        np.testing.assert_allclose(by_name.encode_text(TEXTS), by_config.encode_text(TEXTS), atol=1e-6)
        assert registry.for_target(cfg.backbone._target_, dict(cfg.backbone)).name == "throwaway_text"
        with pytest.raises(UnsupportedInputError, match=r"throwaway_text.*cannot take images"):
            by_name.encode_image(_images()[:1])
        with pytest.raises(UnsupportedInputError, match=r"throwaway_text.*cannot take image\+text"):
            by_name.encode_interleaved([(_images()[0], "a")])
        assert add_lora(by_name.backbone, r=2).print_trainable_parameters() is None
    finally:
        registry.unregister("throwaway_text")
        sys.modules.pop("throwaway_backbone", None)
