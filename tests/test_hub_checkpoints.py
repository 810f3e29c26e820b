"""Every configured hub checkpoint, shrunk from its REAL files (tests/fixtures/hub/, tests/helpers/hub_layout.py),
through the path a user takes: load by folder, e5v-encode, e5v-eval suite=mini, one e5v-train step, e5v-merge,
reload. A loader that expects our idea of a checkpoint (a model_type, a key name, a processor class, a token id)
instead of the hub's fails here."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from e5v.config import REPO_ROOT
from scripts.fetch_hub_fixtures import configured

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
import hub_layout  # noqa: E402


HUB = configured()  # configs/backbone/<name>.yaml -> the hub id it names (builtins name none)
# What the user path needs from a fixture (the files a loader reads); a checkpoint whose fixture lacks one is
# skipped by name with the command that fetches it (no hub here: tests/fixtures/hub/README.md).
NEEDED = ("config.json", "tokenizer_config.json", "preprocessor_config.json")
FETCH = "python -m scripts.fetch_hub_fixtures {name} (where the hub is reachable), then commit tests/fixtures/hub/"


def _missing(name: str) -> list[str]:
    d = hub_layout.fixture_dir(HUB[name])
    return [f for f in NEEDED if not (d / f).is_file()]


def _complete(names: list[str], slow: set[str] | None = None) -> list[Any]:
    out = []
    for n in names:
        marks = [pytest.mark.slow] if slow is not None and n not in slow else []
        if _missing(n):
            marks.append(pytest.mark.skip(reason=f"{HUB[n]}: no public copy of {', '.join(_missing(n))} here; "
                                                 + FETCH.format(name=n)))
        out.append(pytest.param(n, marks=marks))
    return out


# make test: loading, encoding, one training step, merge and reload for every checkpoint with a complete
# fixture; e5v-eval suite=mini for one checkpoint per family whose real image geometry is cheap on a CPU
# (Phi-3-V's 336 px HD crops cost ~45 s for the mini suite: make test-all; tiny_phi3_v's eval is in make test).
EVAL_FAST = {"llava_next_mistral_7b", "qwen2_vl_2b", "qwen2_5_vl_3b", "smolvlm_256m", "qwen3_vl_2b"}


def test_hub_every_configured_checkpoint_has_a_fixture_with_provenance() -> None:
    assert {"e5v", "llava_next_llama3_8b", "llava_next_mistral_7b", "phi3_v", "qwen2_vl_2b", "smolvlm_256m",
            "qwen3_vl_2b"} <= set(HUB)
    for name, hub_id in HUB.items():
        d = hub_layout.fixture_dir(hub_id)
        assert (d / "SOURCE.md").is_file(), f"{d}/SOURCE.md missing ({name})"
        source = (d / "SOURCE.md").read_text()
        for f in sorted(p.name for p in d.iterdir()):
            assert f == "SOURCE.md" or f in source, f"{d}/SOURCE.md does not say where {f} came from"
        for f in (d / "config.json", d / "tokenizer_config.json", d / "model.safetensors.index.json"):
            if f.is_file():
                json.loads(f.read_text())


@pytest.mark.parametrize("name", sorted(n for n in HUB if (hub_layout.fixture_dir(HUB[n]) / "config.json").is_file()))
def test_hub_config_selects_the_family_that_loads_it(name: str, tmp_path: Path) -> None:
    """The real config.json: its model_type resolves to the family the backbone YAML loads with; the shrunk
    model builds from it; the family's LoRA targets and frozen modules exist in that model, LoRA only in the
    language model; weights under the hub's key names where the fixture has the key list."""
    import torch

    from e5v.backbones import registry
    from e5v.config import compose

    hub_cfg = json.loads((hub_layout.fixture_dir(HUB[name]) / "config.json").read_text())
    spec = registry.for_model_type(hub_cfg["model_type"])
    cfg = compose("embed", [f"backbone={name}"])
    assert spec.target == cfg.backbone._target_, (hub_cfg["model_type"], spec.target, cfg.backbone._target_)
    family = spec.family
    model = hub_layout.random_model(hub_layout.shrink_config(hub_cfg), tmp_path, seed=0)
    # the prompt set the family picks for this model (as Embedder.from_pretrained(folder) does) is the YAML's
    assert family.default_prompt(SimpleNamespace(model=model, prompt_name=family.prompt_name)) == cfg.prompt.name
    names = [n for n, _ in model.named_modules()]
    regex = re.compile(family.lora_target_regex())
    targets = [n for n in names if regex.fullmatch(n)]
    assert targets and all(family.in_language_model(n + ".weight") for n in targets), targets[:5]
    for target in family.lora_targets:
        assert any(n.endswith("." + target) for n in targets), f"LoRA target {target} matches nothing"
    for path in family.frozen_modules:
        assert path in names, f"frozen module {path} not in the model"
    keys = hub_layout.hub_keys(hub_layout.fixture_dir(HUB[name]))
    if keys is not None:
        hub_layout.check_keys(set(hub_layout.saved_state_keys(model)), keys, tmp_path)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_hub_shrink_keeps_everything_but_sizes() -> None:
    """Only widths, depths and the size-bound lists (rope sections, deepstack/full-attention indexes) change."""
    sized = {"hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
             "num_hidden_layers", "projection_dim", "depth", "embed_dim", "num_heads", "out_hidden_size",
             "fullatt_block_indexes", "deepstack_visual_indexes", "mrope_section", "long_factor", "short_factor",
             "image_dim_out", "e5v_vision_config"}

    def walk(a: Any, b: Any, path: str) -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            return [p for k in set(a) | set(b) for p in walk(a.get(k), b.get(k), f"{path}.{k}")]
        return [] if a == b or path.rsplit(".", 1)[-1] in sized else [path]

    for hub_id in sorted(set(HUB.values())):
        if not (hub_layout.fixture_dir(hub_id) / "config.json").is_file():
            continue
        cfg = json.loads((hub_layout.fixture_dir(hub_id) / "config.json").read_text())
        assert walk(cfg, hub_layout.shrink_config(cfg), "") == [], hub_id


STAGES = {"test_hub_checkpoint_loads_and_encodes_from_its_real_layout": ("load", "encode"),
          "test_hub_checkpoint_evaluates_the_mini_suite": ("eval",),
          "test_hub_checkpoint_trains_merges_and_reloads": ("train",)}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> dict[str, Any]:
    """tests/helpers/hub_path.py once for every selected (checkpoint, stage): one subprocess (DeepSpeed wants a
    launcher environment), each shrunk checkpoint built once."""
    plan: dict[str, set[str]] = {}
    for item in request.session.items:
        stages = STAGES.get(getattr(item, "originalname", ""))
        if (stages and "hub" in getattr(item, "fixturenames", ()) and hasattr(item, "callspec")
                and not item.get_closest_marker("skip")):
            plan.setdefault(item.callspec.params["name"], set()).update(stages)
    tmp = tmp_path_factory.mktemp("hub")
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", E5V_NO_PROGRESS="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("RANK", None)
    args = [f"{n}={','.join(sorted(st))}" for n, st in sorted(plan.items())]
    p = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "helpers" / "hub_path.py"), str(tmp / "out.json"),
                        str(tmp / "work"), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stderr[-5000:]
    return json.loads((tmp / "out.json").read_text())


@pytest.mark.parametrize("name", _complete(sorted(HUB)))
def test_hub_checkpoint_loads_and_encodes_from_its_real_layout(name: str, hub: dict[str, Any]) -> None:
    r = hub[name]
    assert r["prompt"] == r["expected_prompt"], r          # the family's prompt, found from the hub's config.json
    assert r["text_shape"] == [3, r["hidden_size"]] and r["finite"], r
    assert r["text_batch_diff"] < 1e-5, r                   # left padding changes nothing
    if "image_shape" in r:
        assert r["image_shape"] == [3, r["hidden_size"]] and r["pair_shape"] == [1, r["hidden_size"]], r
        assert r["image_batch_diff"] < 1e-5, r
    assert r["texts_rc"] == 0 and r["texts_shape"] == [3, r["hidden_size"]], r
    assert r["images_rc"] == 0 and r["images_shape"] == [3, r["hidden_size"]], r


@pytest.mark.parametrize("name", _complete(sorted(HUB), slow=EVAL_FAST))
def test_hub_checkpoint_evaluates_the_mini_suite(name: str, hub: dict[str, Any]) -> None:
    r = hub[name]
    assert {"flickr30k", "coco", "i2i_flickr30k", "cirr", "fashioniq", "sts"} <= set(r["eval_benchmarks"]), r
    assert r["eval_in_range"], r


@pytest.mark.parametrize("name", _complete(sorted(HUB)))
def test_hub_checkpoint_trains_merges_and_reloads(name: str, hub: dict[str, Any]) -> None:
    r = hub[name]
    assert r["loss"] == r["loss"] and r["merge_rc"] == 0, r   # a finite loss; e5v-merge exits 0
    assert r["merged_prompt"] == r["adapter_prompt"], r       # the merged folder records the prompt it trained with
    assert r["adapter_moved"] > 0 and r["reload_max_diff"] < 1e-5, r


def test_hub_key_check_and_token_ids_can_fail(tmp_path: Path) -> None:
    """The layout checks are real: a key under another name, a missing layer, a token at another id all raise."""
    hub = {"model.layers.0.w", "model.layers.1.w", "model.layers.2.w", "model.norm.weight", "lm_head.weight"}
    hub_layout.check_keys({"model.layers.0.w", "model.layers.1.w", "model.norm.weight", "lm_head.weight"}, hub, tmp_path)
    for saved in ({"model.language_model.layers.0.w", "model.language_model.layers.1.w", "model.norm.weight",
                   "lm_head.weight"},                                   # our idea of the names, not the hub's
                  {"model.layers.0.w", "model.layers.1.w", "model.norm.weight"}):   # tied where the hub is not
        with pytest.raises(AssertionError, match="not under the hub's names"):
            hub_layout.check_keys(saved, hub, tmp_path)
    tok_cfg = {"added_tokens_decoder": {"0": {"content": "<unk>", "special": True},
                                        "1": {"content": "<s>", "special": True},
                                        "700": {"content": "<image>", "special": True}},
               "bos_token": "<s>", "add_bos_token": True}
    hub_layout.build_tokenizer_json(tok_cfg, tmp_path, sentencepiece=True)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "tokenizer_class": "PreTrainedTokenizerFast"}))
    hub_layout.check_tokenizer_ids(tmp_path, tok_cfg)
    moved = {**tok_cfg, "added_tokens_decoder": {**tok_cfg["added_tokens_decoder"],
                                                 "701": {"content": "<image>", "special": True}}}
    with pytest.raises(AssertionError, match="other ids than the hub's"):
        hub_layout.check_tokenizer_ids(tmp_path, moved)


def test_hub_readme_table_matches_the_fixtures() -> None:
    """README's 'Real layouts' table: one row per configured hub checkpoint; 'tested' exactly where the
    fixture has what the test needs, every missing needed file named."""
    text = (REPO_ROOT / "README.md").read_text()
    rows = {}
    for line in text[text.index("**Real layouts.**"):].splitlines():
        m = re.match(r"^\| `(\w+)` \| `([^`]+)` \| (.*?) \| (.*?) \| (.*?) \|$", line)
        if m:
            rows[m.group(1)] = m.groups()[1:]
        elif rows and not line.startswith("|"):
            break
    assert set(rows) == set(HUB), sorted(set(rows) ^ set(HUB))
    for name, (hub_id, path, config, missing) in rows.items():
        assert hub_id == HUB[name], name
        assert ("**tested**" in path) == (not _missing(name)), (name, path, _missing(name))
        has_config = (hub_layout.fixture_dir(hub_id) / "config.json").is_file()
        assert config.startswith("tested") == has_config, (name, config)
        for f in _missing(name):
            assert f in missing or "all" in missing, (name, f, missing)


# Where the release's prompt strings differ from what the checkpoint's own chat template renders, on purpose
# (README "Prompts"): the E5-V release wrote its Llama-3 wrapper by hand: " \n" after the assistant header,
# and a "\n" before the text only where its body has one (after <image> in the image/text bodies, not after the
# user header of a text-only message nor between <image> and a CIRR / FashionIQ instruction), while llava-hf's
# template writes "\n" before every text part.
def _llama3_release(hub: str, body: str) -> str:
    if not body.startswith("<image>"):
        hub = hub.replace("<|end_header_id|>\n\n\n", "<|end_header_id|>\n\n", 1)
    elif not body.startswith("<image>\n"):
        hub = hub.replace("<image>\n", "<image>", 1)
    return hub + " \n"


RELEASE_DIFFERS = {"llava-hf/llama3-llava-next-8b-hf": _llama3_release}
TEMPLATE_SPACE = {"e5v_smolvlm": " "}   # what a template writes itself between the role and a text part
# what a template writes itself before every text part (so a message's text starts after it)
TEXT_SEPARATOR = {"llava-hf/llama3-llava-next-8b-hf": "\n"}


def _hub_template(hub_id: str) -> str | None:
    d = hub_layout.fixture_dir(hub_id)
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    for f in ("chat_template.json", "tokenizer_config.json"):
        if (d / f).is_file() and "chat_template" in (cfg := json.loads((d / f).read_text(encoding="utf-8"))):
            return str(cfg["chat_template"])
    return None


@pytest.mark.parametrize("name", sorted(HUB))
def test_hub_prompts_are_what_the_checkpoints_chat_template_renders(name: str) -> None:
    """Every E5-V prompt of the backbone's prompt set (text, image, CIRR, FashionIQ, STS, training bodies) against
    the checkpoint's own chat template (its hub file) for one user message with the generation prompt: equal,
    or equal after the release's documented differences (RELEASE_DIFFERS, README)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from e5v.config import compose
    from e5v.prompts import load_prompt

    template = _hub_template(HUB[name])
    if template is None:
        pytest.skip(f"{HUB[name]}: no chat template in its fixture; " + FETCH.format(name=name))
    p = load_prompt(str(compose("embed", [f"backbone={name}"]).prompt.name))
    tok_cfg = hub_layout.fixture_dir(HUB[name]) / "tokenizer_config.json"
    special = json.loads(tok_cfg.read_text()) if tok_cfg.is_file() else {}
    extra = {k: hub_layout._token(special.get(k)) or "" for k in ("bos_token", "eos_token")}
    space = TEMPLATE_SPACE.get(p.name, "")
    for kind in p.bodies:
        body = p.body(kind).replace("<sent>", "a dog.").replace("{X}", "dress")
        if body.startswith("<image>"):   # the bodies' image placeholder (render() puts the model's token there)
            text = body.removeprefix("<image>").removeprefix(TEXT_SEPARATOR.get(HUB[name], ""))
            content = [{"type": "image"}, {"type": "text", "text": text}]
        else:
            assert body.startswith(space), (kind, body)
            content = [{"type": "text", "text": body.removeprefix(space)}]
        try:
            hub = render_jinja_template([[{"role": "user", "content": content}]], chat_template=template,
                                        add_generation_prompt=True, **extra)[0][0]
        except Exception:  # a template for string messages (Phi-3-V: image tags inline in the text)
            inline = body.replace("<image>", p.image_token)
            hub = render_jinja_template([[{"role": "user", "content": inline}]], chat_template=template,
                                        add_generation_prompt=True, **extra)[0][0]
        ours = p.render(kind, "a dog." if "<sent>" in p.body(kind) else None,
                        category="dress" if "{X}" in p.body(kind) else None)
        release = RELEASE_DIFFERS.get(HUB[name])
        assert ours == (release(hub, body) if release else hub), (name, kind, ours, hub)
