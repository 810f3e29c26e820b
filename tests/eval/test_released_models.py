"""The released embedding models as configs (issue 22, part C): VLM2Vec-Qwen2VL-2B, GME-Qwen2-VL-2B and
Qwen3-VL-Embedding-2B. Their prompts render as each model's own code builds them (strings written out here from
the cited sources, and rendered independently through the checkpoint family's chat template), the token each pools
is the last one of the prompt (GME's appended <|endoftext|>, no EOS for the others), embeddings are the last
token's state, L2-normalised, of the card's dimension; their published MMEB numbers are consistent; and each runs
the MMEB-mini suite from a tiny copy (once the mmeb benchmark and its mini data exist)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from e5v.config import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "tests" / "helpers"))
import hub_layout  # noqa: E402

MODELS = {  # backbone config -> (prompt config, hub fixture the tiny copy is built from; None: the family's tiny)
    "vlm2vec_qwen2vl_2b": ("vlm2vec_qwen2vl", "Qwen__Qwen2-VL-2B-Instruct"),
    "gme_qwen2vl_2b": ("gme_qwen2vl", "Qwen__Qwen2-VL-2B-Instruct"),
    "qwen3_vl_embedding_2b": ("qwen3_vl_embedding", None),
}
VISION = "<|vision_start|><|image_pad|><|vision_end|>"
# An MMEB-V1 query (VLM2Vec's demo text; V1 texts hold the instruction) and a text target, as the mmeb loader gives
# them: the <|image_1|> placeholder removed, the image apart.
QUERY = "Represent the given image with the following question: What is in the image"
TARGET = "A cat and a dog"

# What each model's own code feeds its tokenizer, written out from the sources cited in its prompt config.
EXPECTED = {
    # VLM2Vec: bare text, <|image_pad|> alone where MMEB's <|image_1|> was (src/model/processor.py)
    "vlm2vec_qwen2vl_2b": ("<|image_pad|>\n" + QUERY, TARGET),
    # GME (gme_inference.py embed(); instruction in the user text as VLM2Vec's harness passes it)
    "gme_qwen2vl_2b": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + VISION + QUERY
        + "<|im_end|>\n<|im_start|>assistant\n<|endoftext|>",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + TARGET
        + "<|im_end|>\n<|im_start|>assistant\n<|endoftext|>",
    ),
    # Qwen3-VL-Embedding (format_model_input + apply_chat_template(add_generation_prompt=True), default instruction)
    "qwen3_vl_embedding_2b": (
        "<|im_start|>system\nRepresent the user's input.<|im_end|>\n<|im_start|>user\n" + VISION + QUERY
        + "<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>system\nRepresent the user's input.<|im_end|>\n<|im_start|>user\n" + TARGET
        + "<|im_end|>\n<|im_start|>assistant\n",
    ),
}


def _prompt(name: str) -> Any:
    from e5v.config import compose
    from e5v.prompts import PromptSet

    return PromptSet.from_config(compose("embed", [f"backbone={name}"]).prompt)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_released_backbone_selects_its_family_and_prompt(name: str) -> None:
    from e5v.config import compose

    cfg = compose("embed", [f"backbone={name}"])
    family = "qwen3_vl" if name.startswith("qwen3") else "qwen2_vl"
    assert cfg.backbone._target_ == f"e5v.backbones.{family}.load"
    assert cfg.prompt.name == MODELS[name][0]
    assert cfg.prompt.card.hub_id == cfg.backbone.name_or_path
    assert cfg.prompt.card.pooling == "last_token" and cfg.prompt.card.normalize is True


@pytest.mark.parametrize("name", sorted(MODELS))
def test_released_mmeb_prompts_render_as_the_model_builds_them(name: str) -> None:
    p = _prompt(name)
    query, target = EXPECTED[name]
    assert p.render("mmeb_pair", QUERY) == query
    assert p.render("mmeb_text", TARGET) == target
    assert "<|image_1|>" not in p.render("mmeb_pair", QUERY)
    # an image alone: the model's image form with nothing else in the user part
    assert p.render("mmeb_image").count(p.image_token) == 1
    # a V2-layout query, instruction apart from the text: the mmeb benchmark joins them as these models' harnesses
    # do ("<instruction> <text>", VLM2Vec process_input_text) before the body renders
    from eval.benchmarks.mmeb import item_text
    from eval.loaders.mmeb import Item

    node = p.extra["mmeb"]
    item = Item("Represent the given image with the following question:", "What is in the image")
    text = item_text(item, node["instruction"], node.get("separator", " "))
    assert p.render("mmeb_pair", text) == query


def _qwen2_template() -> str:
    return json.loads((hub_layout.FIXTURES / "Qwen__Qwen2-VL-2B-Instruct" / "tokenizer_config.json").read_text())[
        "chat_template"]


@pytest.mark.parametrize("name", ["gme_qwen2vl_2b", "qwen3_vl_embedding_2b"])
def test_released_chat_prompts_are_the_checkpoint_templates_rendering(name: str) -> None:
    """GME and Qwen3-VL-Embedding build their prompt as a conversation [system: instruction, user: image, text];
    rendered through the family's chat template (Qwen2-VL-2B-Instruct's hub file; Qwen3-VL's) it is our string
    (plus GME's hand-appended <|endoftext|>)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from e5v.backbones import qwen3_vl

    if name == "gme_qwen2vl_2b":
        template, system, tail = _qwen2_template(), "You are a helpful assistant.", "<|endoftext|>"
    else:
        template, system, tail = qwen3_vl.CHAT_TEMPLATE, "Represent the user's input.", ""
    p = _prompt(name)
    for content, rendered in (([{"type": "image"}, {"type": "text", "text": QUERY}], p.render("mmeb_pair", QUERY)),
                              ([{"type": "text", "text": TARGET}], p.render("mmeb_text", TARGET))):
        conv = [{"role": "system", "content": [{"type": "text", "text": system}]}, {"role": "user", "content": content}]
        out, _ = render_jinja_template(conversations=[conv], chat_template=template, add_generation_prompt=True)
        assert out[0] + tail == rendered


# ------------------------------------------------------------------------------------------ tiny copies
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each model's tiny copy: Qwen2-VL-2B-Instruct's real files shrunk (hub_layout), or the family's tiny."""
    from e5v.backbones import qwen3_vl

    root = tmp_path_factory.mktemp("released")
    qwen2 = hub_layout.build(hub_layout.FIXTURES / "Qwen__Qwen2-VL-2B-Instruct", root / "qwen2_vl_2b")
    qwen3 = qwen3_vl.tiny_folder({"seed": 0, "cache_dir": str(root / "tiny")}, build=True)
    return {n: (qwen2 if fx else qwen3) for n, (_, fx) in MODELS.items()}


def _embedder(name: str, folder: Path, *extra: str) -> Any:
    from e5v import Embedder
    from e5v.config import compose, instantiate

    cfg = compose("embed", [f"backbone={name}", f"backbone.name_or_path={folder}", "backbone.local_files_only=true",
                            "backbone.attn_implementation=sdpa", *extra])
    backbone = instantiate(cfg.backbone, dtype="float32", device="cpu")
    return Embedder(backbone, _prompt(name), batch_size=4, packing=False, progress=False)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_released_prompt_ends_with_the_token_the_model_pools(name: str, tiny: dict[str, Path]) -> None:
    """The Embedder pools the prompt's last token: it must be the one the model's own code pools. GME: the
    <|endoftext|> it writes into the string (Qwen2-VL-2B's id 151643, from the hub's tokenizer_config.json);
    VLM2Vec and Qwen3-VL-Embedding: the prompt's own last token, nothing appended by the tokenizer (transformers 5
    adds no EOS to Qwen text: mteb PR #5237's pitfall does not apply, and must not start to)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny[name])
    _, target = EXPECTED[name]
    ids = tok(target)["input_ids"]
    assert ids == tok(target, add_special_tokens=False)["input_ids"]   # the tokenizer adds nothing
    if name == "gme_qwen2vl_2b":
        added = json.loads((hub_layout.FIXTURES / "Qwen__Qwen2-VL-2B-Instruct" / "tokenizer_config.json").read_text())
        eot = next(int(i) for i, t in added["added_tokens_decoder"].items() if t["content"] == "<|endoftext|>")
        assert eot == 151643 and ids[-1] == eot and tok.decode(ids[-2:-1]) == "\n"
    elif name == "qwen3_vl_embedding_2b":
        assert tok.decode(ids).endswith("<|im_start|>assistant\n") and tok.decode(ids[-1:]) == "\n"
    else:
        assert tok.decode(ids) == TARGET and TARGET.endswith(tok.decode(ids[-1:])) and ids[-1] not in tok.all_special_ids


@pytest.mark.parametrize("name", sorted(MODELS))
def test_released_model_embeds_the_last_token_normalised(name: str, tiny: dict[str, Path]) -> None:
    """Through the harness (Embedder, the model's MMEB bodies) = an independent plain-transformers forward of the
    same prompt string: the last position's final hidden state, L2-normalised; dimension = hidden size."""
    import torch
    from PIL import Image

    emb = _embedder(name, tiny[name])
    image = Image.fromarray((np.arange(48 * 64 * 3) % 251).astype(np.uint8).reshape(48, 64, 3))
    got_q = emb.encode_interleaved([(image, QUERY)], template="mmeb_pair")
    got_t = emb.encode_text([TARGET], template="mmeb_text")
    model, proc = emb.backbone.model, emb.backbone.processor
    want = []
    for text, images in ((EXPECTED[name][0], [image]), (EXPECTED[name][1], None)):
        inputs = dict(proc(text=[text], images=images, return_tensors="pt"))
        if name == "vlm2vec_qwen2vl_2b" and images:   # VLM2Vec's code: 1-D positions over its bare <|image_pad|>
            inputs["position_ids"] = torch.arange(inputs["input_ids"].shape[1]).expand(3, 1, -1)
        with torch.no_grad():
            h = model.model(**inputs).last_hidden_state[0, -1]
        want.append((h / h.norm()).numpy())
    hidden = model.config.text_config.hidden_size
    assert got_q.shape == got_t.shape == (1, hidden)
    assert np.allclose(np.linalg.norm(got_q, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(got_q[0], want[0], atol=2e-5)
    np.testing.assert_allclose(got_t[0], want[1], atol=2e-5)
    if name == "vlm2vec_qwen2vl_2b":   # the position option matters: Qwen2-VL's own 3-D positions differ
        assert emb.backbone.image_positions == "text"
        mrope = _embedder(name, tiny[name], "backbone.image_positions=mrope")
        assert np.abs(mrope.encode_interleaved([(image, QUERY)], template="mmeb_pair") - got_q).max() > 1e-4  # 2.4e-4 here; parity is 2e-5
    if MODELS[name][1]:   # the card's dimension is the real checkpoint's hidden size
        real = json.loads((hub_layout.FIXTURES / MODELS[name][1] / "config.json").read_text())
        assert _prompt(name).extra["card"]["dim"] == real["hidden_size"] == 1536


# --------------------------------------------------------------------------------------- published numbers
def test_published_numbers_are_self_consistent() -> None:
    """Each published overall equals the task-weighted mean of its meta-task scores (MMEB-V1 / V2 image: 10
    classification, 10 VQA, 12 retrieval, 4 grounding tasks; IND 20 / OOD 16), to the rounding of the inputs:
    a typo in a transcribed number fails here."""
    from e5v.config import config_dir
    from eval.published import PUBLISHED, published_for_backbone, published_value

    weights = {"classification": 10, "vqa": 10, "retrieval": 12, "grounding": 4}
    checked = 0
    for key, p in PUBLISHED.items():
        assert p.backbone is None or (config_dir() / "backbone" / f"{p.backbone}.yaml").is_file(), key
        assert published_for_backbone(p.backbone) is p and published_for_backbone(p.hub_id) is p
        assert p.prompt is None or published_for_backbone("/some/folder", p.prompt) is p
        for nums, prefix in ((p.v1, ""), (p.v2, "image/")):
            metas = [nums.get(f"{prefix}{m}/hit@1") for m in weights]
            if None in metas or f"{prefix}overall/hit@1" not in nums:
                continue
            mean = sum(w * v for w, v in zip(weights.values(), metas)) / 36
            assert abs(mean - nums[f"{prefix}overall/hit@1"]) <= 0.1, (key, prefix, mean)
            checked += 1
        if "ind/hit@1" in p.v1:
            assert abs((20 * p.v1["ind/hit@1"] + 16 * p.v1["ood/hit@1"]) / 36 - p.v1["overall/hit@1"]) <= 0.1
    assert checked == 4
    assert published_value("e5v", "overall/hit@1") == 13.3
    assert published_value("qwen3_vl_embedding_2b", "all/score", "v2") == 73.2
    assert published_value("gme_qwen2vl_2b", "overall/hit@1") is None   # not published: absent, never 0


def test_report_section_puts_our_mmeb_scores_beside_the_published_ones() -> None:
    from eval.published import mmeb_section

    lines = mmeb_section({"mmeb": {"overall/hit@1": 61.25, "vqa/hit@1": 50.0}}, "vlm2vec_qwen2vl_2b")
    rows = {ln.split(" | ")[0]: ln for ln in lines if ln.startswith("| ")}
    assert rows["| **ours** (`vlm2vec_qwen2vl_2b`)"].endswith("| — | 50.0 | — | — | — | — | 61.2 |")   # 61.25 -> 61.2
    assert rows["| VLM2Vec (Qwen2-VL-2B) (this model, published)"].endswith("| 60.1 |")
    assert rows["| E5-V (published)"].endswith("| 21.8 | 4.9 | 11.5 | 19.0 | 14.9 | 11.5 | 13.3 |")
    assert mmeb_section({"flickr30k": {"t2i_R@1": 1.0}}, "e5v") == []   # no MMEB run: no section


# ------------------------------------------------------------------------------------------- MMEB-mini
def _mmeb_ready() -> str | None:
    if not (REPO_ROOT / "eval" / "benchmarks" / "mmeb.py").is_file():
        return "eval/benchmarks/mmeb.py (engineer A's mmeb benchmark) does not exist yet"
    if not (REPO_ROOT / "configs" / "benchmark" / "mmeb.yaml").is_file():
        return "configs/benchmark/mmeb.yaml does not exist yet"
    if not (REPO_ROOT / "e5v" / "mini" / "mmeb_data.py").is_file():
        return "e5v/mini/mmeb_data.py (engineer B's MMEB-mini data) does not exist yet"
    return None


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_released_model_runs_the_mmeb_mini_suite(name: str, tiny: dict[str, Path], tmp_path: Path) -> None:
    """e5v-eval backbone=<model> benchmarks=[mmeb] suite=mini, from the tiny copy, through eval.runner.evaluate:
    per-task, per-meta-task and overall Hit@1 in [0, 100]."""
    reason = _mmeb_ready()
    if reason:
        pytest.skip(reason)
    sys.path.insert(0, str(REPO_ROOT / "tests" / "eval"))
    from evalkit import compose_eval

    from eval.runner import evaluate

    cfg = compose_eval(tmp_path, tmp_path / "mini", f"backbone={name}", f"backbone.name_or_path={tiny[name]}",
                       "backbone.local_files_only=true", "backbone.attn_implementation=sdpa", "benchmarks=[mmeb]")
    res = evaluate(cfg, output_dir=tmp_path / "out")
    m = res["metrics"]["mmeb"]
    assert "overall/hit@1" in m and all(f"{meta}/hit@1" in m for meta in ("classification", "vqa", "retrieval",
                                                                          "grounding")), sorted(m)
    assert all(0.0 <= v <= 100.0 for k, v in m.items() if k.endswith("hit@1"))
    report = (tmp_path / "out" / "results.md").read_text()
    assert "## MMEB-V1 beside published numbers" in report and f"| **ours** (`{tiny[name]}`) |" in report
    if name == "vlm2vec_qwen2vl_2b":   # found by its prompt config: its own published row is marked
        assert "| VLM2Vec (Qwen2-VL-2B) (this model, published) |" in report
