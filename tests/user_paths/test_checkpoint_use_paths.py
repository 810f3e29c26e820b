"""Using what training wrote (issue 21, items 1 and 3 and the checkpoint side of its traceback list): a merged
folder is evaluated with the prompt recorded in it, as an adapter is, or refused in one line; a chosen prompt
with another chat wrapper is refused (allow_other_base does not cover it); a prompt whose image token the
model does not know is one line; an adapter stays usable when the optimizer state ``ds/`` is gone;
``e5v-merge --base <other> --allow-other-base`` merges; ``e5v-encode --texts`` drops a byte-order mark.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "faults"))
from faultkit import FakeEngine  # noqa: E402
from test_eval_paths import compose_eval, tiny_config  # noqa: E402


def trained_meta(backbone: str) -> dict[str, Any]:
    """What training records in e5v_adapter.json for ``e5v-train experiment=tiny_cpu backbone=<backbone>``."""
    from omegaconf import OmegaConf

    from e5v.config import compose

    r = OmegaConf.to_container(compose("train", ["experiment=tiny_cpu", f"backbone={backbone}", "run_name=x"]),
                               resolve=True)
    return {"backbone": r["backbone"], "prompt": r["prompt"], "lora": r["lora"], "step": 4}


def random_adapter(backbone: str, meta: dict[str, Any], seed: int = 0) -> Any:
    """A LoRA model on ``backbone`` with random non-zero B (so it changes the embeddings); returns a writer
    ``f(folder)`` that saves it as training does."""
    import torch

    from e5v.config import compose, instantiate
    from e5v.lora import add_lora, save_adapter

    b = instantiate(compose("eval", [f"backbone={backbone}"]).backbone, dtype=torch.float32, device="cpu")
    torch.manual_seed(seed)
    peft_model = add_lora(b, r=4, alpha=16, dropout=0.0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return lambda d: save_adapter(peft_model, d, meta)


def save_run(run: Path, write_adapter: Any, steps: tuple[int, ...] = (2, 4)) -> Path:
    """``run/checkpoints/step-*`` as training writes them: adapter, a stand-in ``ds/``, state, manifest."""
    from e5v.train import checkpoint as ckpt

    for step in steps:
        ckpt.save(FakeEngine(), run / "checkpoints", step, {"step": step, "max_steps": 4, "world_size": 1},
                  write_adapter)
    return run


@pytest.fixture(scope="module")
def area(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    return tmp_path_factory.mktemp("ckptuse")


@pytest.fixture(scope="module")
def mistral_run(area: Path) -> Path:
    """A tiny_mistral run (its adapter records prompt e5v_mistral, as training writes it)."""
    return save_run(area / "mistral_run", random_adapter("tiny_mistral", trained_meta("tiny_mistral")), steps=(4,))


@pytest.fixture(scope="module")
def mistral_merged(area: Path, mistral_run: Path) -> Path:
    from e5v.lora import merge_to_dir, resolve_adapter

    return merge_to_dir(resolve_adapter(mistral_run), area / "mistral_merged")


# ---------------------------------------------------------------- 1. the recorded prompt, merged or not
def test_merged_folder_is_evaluated_with_its_recorded_prompt_as_the_adapter_is(
    area: Path, mistral_run: Path, mistral_merged: Path
) -> None:
    from eval.runner import evaluate

    assert json.loads((mistral_merged / "e5v_merged.json").read_text())["prompt"]["name"] == "e5v_mistral"
    res = {}
    for name, ckpt in (("merged", mistral_merged), ("adapter", mistral_run)):
        # eval.yaml's defaults: backbone e5v, prompt e5v_llama3; nothing chosen on the command line
        cfg = compose_eval(area / name, area / "mini", f"checkpoint={ckpt}", "benchmarks=[sts,flickr30k]")
        res[name] = evaluate(cfg, output_dir=area / name / "out")
        assert res[name]["run"]["prompt"] == "e5v_mistral", name
        assert "prompt `e5v_mistral`" in (area / name / "out" / "results.md").read_text()
    assert res["merged"]["metrics"].keys() == res["adapter"]["metrics"].keys()
    for bench, metrics in res["adapter"]["metrics"].items():
        for k, v in metrics.items():
            assert res["merged"]["metrics"][bench][k] == pytest.approx(v, abs=1e-6), (bench, k)


def test_embedder_and_encode_take_the_merged_folders_recorded_prompt(mistral_merged: Path) -> None:
    from e5v import Embedder

    assert Embedder.from_pretrained(str(mistral_merged), device="cpu").prompt.name == "e5v_mistral"


@pytest.mark.parametrize("allow", [False, True])
def test_a_chosen_prompt_with_another_wrapper_is_refused_in_one_line(
    area: Path, mistral_run: Path, mistral_merged: Path, allow: bool
) -> None:
    """Also with allow_other_base=true (the old message's advice, which went on to a wrong result or, on a
    Qwen adapter, a 61-line processor error): the base may be another, the prompt may not."""
    from e5v.errors import E5VError
    from eval.runner import evaluate

    for ckpt, record in ((mistral_merged, mistral_merged / "e5v_merged.json"),
                         (mistral_run, mistral_run / "checkpoints" / "step-000004" / "adapter" / "e5v_adapter.json")):
        cfg = compose_eval(area / "refused", area / "mini", f"checkpoint={ckpt}", "prompt=generic_llama3",
                           "benchmarks=[sts]", f"allow_other_base={str(allow).lower()}")
        with pytest.raises(E5VError) as e:
            evaluate(cfg, output_dir=area / "refused" / "out")
        msg = str(e.value)
        assert type(e.value).__name__ == "PromptMismatchError", msg
        assert "\n" not in msg and str(record) in msg and "'e5v_mistral'" in msg and "'generic_llama3'" in msg, msg
        assert "use prompt=e5v_mistral" in msg
    assert not (area / "refused").exists()


def test_the_default_prompt_named_on_the_command_line_counts_as_chosen(area: Path, mistral_merged: Path) -> None:
    from test_cli_errors import assert_cli_error, run_cli
    from test_eval_paths import overrides

    args = overrides(area / "cli", area / "mini", f"checkpoint={mistral_merged}", "prompt=e5v_llama3",
                     "allow_other_base=true", f"hydra.run.dir={area / 'cli' / 'run'}")
    line = assert_cli_error(run_cli("e5v-eval", *args), "e5v-eval")
    assert "'e5v_mistral'" in line and "'e5v_llama3'" in line and "use prompt=e5v_mistral" in line
    assert not (area / "cli" / "run" / "results.json").exists()


def test_a_prompt_whose_image_token_the_model_lacks_is_one_line(tiny_dir: Path) -> None:
    from PIL import Image

    from e5v import Embedder
    from e5v.prompts import PromptConfigError

    emb = Embedder.from_pretrained("tiny_qwen2_vl", prompt="e5v_llama3", device="cpu")
    with pytest.raises(PromptConfigError) as e:
        emb.encode_image([Image.new("RGB", (32, 32))])
    msg = str(e.value)
    assert "\n" not in msg and "'<image>'" in msg and "<|image_pad|>" in msg and "e5v_qwen2_vl" in msg, msg
    assert emb.encode_text(["text still works"]).shape[0] == 1


# ---------------------------------------------------------------- a run whose optimizer state is gone
def test_adapter_stays_usable_without_the_optimizer_state(tmp_path: Path, tiny_dir: Path) -> None:
    import shutil

    from e5v.train.checkpoint import CheckpointCorrupt
    from e5v.cli.merge import main as merge
    from e5v.lora import resolve_adapter
    from eval.model import ModelHandle

    run = save_run(tmp_path / "run", random_adapter("tiny", {"backbone": tiny_config(0), "step": 4}))
    step2, step4 = run / "checkpoints" / "step-000002", run / "checkpoints" / "step-000004"
    shutil.rmtree(step4 / "ds")  # the optimizer state is gone (disk quota, a cleanup script ...)
    assert resolve_adapter(run) == step4 / "adapter" and resolve_adapter(step4) == step4 / "adapter"
    handle = ModelHandle(compose_eval(tmp_path, tmp_path / "mini", f"checkpoint={run}"))
    assert handle.checkpoint == str(step4) and handle.checkpoint_step == 4
    assert merge([str(run), str(tmp_path / "merged")]) == 0 and (tmp_path / "merged" / "model.safetensors").is_file()
    # a damaged adapter: one line naming its file and the step that is still whole
    (step4 / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointCorrupt) as e:
        resolve_adapter(step4)
    msg = str(e.value)
    assert "\n" not in msg and "adapter/adapter_model.safetensors: missing" in msg
    assert f"{step2} has an intact adapter" in msg
    assert resolve_adapter(run) == step2 / "adapter"  # the run folder: the newest intact adapter
    (step2 / "adapter" / "adapter_config.json").write_text("{}")
    from e5v.lora import CheckpointUnusable

    with pytest.raises(CheckpointUnusable) as e:
        resolve_adapter(run)
    msg = str(e.value)
    assert "\n" not in msg and "no checkpoint under" in msg and "step-000004: adapter/adapter_model.safetensors" in msg
    assert "step-000002: adapter/adapter_config.json" in msg


# ---------------------------------------------------------------- e5v-merge --base <other> --allow-other-base
def test_merge_onto_another_base_folder_when_allowed(tmp_path: Path, tiny_dir: Path) -> None:
    from e5v import Embedder
    from e5v.backbones import tiny
    from e5v.cli.merge import main as merge

    other = tiny.ensure_tiny(seed=1)  # a folder; the adapter records the builtin tiny loader (no folder)
    run = save_run(tmp_path / "run", random_adapter("tiny", {"backbone": tiny_config(0), "step": 4}), steps=(4,))
    out = tmp_path / "merged"
    assert merge([str(run), str(out), "--base", str(other), "--allow-other-base"]) == 0
    emb = Embedder.from_pretrained(str(out), device="cpu")
    assert emb.encode_text(["a red circle"]).shape == (1, emb.dim)
    with pytest.raises(SystemExit) as e:  # not allowed: refused in one line, before loading
        merge([str(run), str(tmp_path / "refused"), "--base", str(other)])
    assert "--allow-other-base" in str(e.value.code) and "\n" not in str(e.value.code)


# ---------------------------------------------------------------- 3. e5v-encode --texts and a byte-order mark
def test_encode_texts_drops_a_byte_order_mark(tmp_path: Path, embedder: Any) -> None:
    from e5v.cli.encode import build_parser, main

    texts = ["A red circle above a blue square.", "Two green triangles."]
    f = tmp_path / "windows.txt"
    f.write_bytes(("\ufeff" + "\n".join(texts) + "\n").encode("utf-8"))
    assert main(["--model", "tiny", "--device", "cpu", "--texts", str(f), "--out", str(tmp_path / "out")]) == 0
    got = np.load(tmp_path / "out" / "embeddings.npy")
    np.testing.assert_allclose(got, embedder.encode_text(texts), atol=1e-5)
    jl = tmp_path / "q.jsonl"
    jl.write_bytes(b"\xef\xbb\xbf" + json.dumps({"image": "a.png", "text": "x"}).encode() + b"\n")
    from e5v.cli.encode import read_jsonl

    assert read_jsonl(jl, None)[1] == ["0"]
    help_out = build_parser().format_help()
    assert "must be empty" not in help_out and "holding no embeddings" in help_out
