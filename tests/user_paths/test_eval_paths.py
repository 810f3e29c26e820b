"""Ordinary moves on the evaluation side that used to give a wrong result with exit code 0, or lose hours
(issue 12, items 3 and 4; issue 13, item 10): an adapter evaluated on eval's default base instead of the one
it was trained on, a size-mismatch dump, a dataset missing for a late benchmark, a late failure losing the
report of the benchmarks that had finished.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
MINI = {"images": 4, "cirr_groups": 2, "fiq_images": 4, "sts_pairs": 3}


def overrides(tmp: Path, mini: Path, *extra: str) -> list[str]:
    """suite=mini on small generated data, its own cache and output; NO backbone: eval.yaml's default."""
    return [
        "suite=mini",
        f"suite.mini.dir={mini}",
        *[f"suite.mini.{k}={v}" for k, v in MINI.items()],
        f"cache.dir={tmp / 'cache'}",
        f"render.cache_dir={tmp / 'rendered'}",
        "embedder.device=cpu",
        "progress=false",
        "report.plot=false",
        "report.history=null",
        *extra,
    ]


def compose_eval(tmp: Path, mini: Path, *extra: str) -> Any:
    from e5v.config import compose

    return compose("eval", overrides(tmp, mini, *extra))


def tiny_config(seed: int = 0) -> dict[str, Any]:
    """The resolved backbone config training records for backbone=tiny (what e5v_adapter.json holds)."""
    from omegaconf import OmegaConf

    from e5v.config import compose

    return OmegaConf.to_container(compose("eval", ["backbone=tiny", f"backbone.seed={seed}"]).backbone, resolve=True)


def save_random_adapter(step_dir: Path, backbone: dict[str, Any], step: int = 10, seed: int = 0) -> Path:
    """A LoRA adapter as training writes it (random non-zero B, so it changes the model) in a step folder."""
    import torch

    from e5v.backbones import tiny
    from e5v.lora import add_lora, save_adapter

    torch.manual_seed(seed)
    peft_model = add_lora(tiny.load(seed=0, device="cpu").model, r=4, alpha=16, dropout=0.0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_adapter(peft_model, step_dir / "adapter", {"backbone": backbone, "step": step})
    (step_dir / "trainer_state.json").write_text(json.dumps({"step": step}))
    return step_dir


@pytest.fixture(scope="module")
def area(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    return tmp_path_factory.mktemp("evalpaths")


@pytest.fixture(scope="module")
def step_dir(area: Path) -> Path:
    """An adapter trained (so its metadata says) on tiny seed 0."""
    return save_random_adapter(area / "run" / "checkpoints" / "step-000010", tiny_config(0))


# ---------------------------------------------------------------- 3. an adapter runs on the base it was trained on
def test_adapter_is_evaluated_on_its_recorded_base_by_default(area: Path, step_dir: Path) -> None:
    from eval.runner import evaluate

    res = evaluate(compose_eval(area, area / "mini", f"checkpoint={step_dir}", "benchmarks=[sts]"),
                   output_dir=area / "default")
    run = res["run"]
    assert run["backbone"] == "tiny (seed 0)" and run["base"] == "tiny (seed 0)"  # not royokong/e5-v
    assert run["checkpoint"] == str(step_dir) and run["checkpoint_step"] == 10 and run["checkpoint_kind"] == "adapter"
    assert run["base_identity"] == {"model": "e5v.backbones.tiny.load", "seed": 0}
    assert res["status"]["complete"] is True
    md = (area / "default" / "results.md").read_text()
    assert f"checkpoint `{step_dir}` (adapter, step 10) on base `tiny (seed 0)`" in md
    # the very same model as naming the base explicitly: same fingerprint, same numbers
    same = evaluate(compose_eval(area, area / "mini", "backbone=tiny", f"checkpoint={step_dir}", "benchmarks=[sts]"),
                    output_dir=area / "explicit")
    assert same["run"]["model_fingerprint"] == run["model_fingerprint"]
    assert same["metrics"] == res["metrics"]


def test_adapter_on_an_explicit_other_base_is_refused_naming_both(area: Path, step_dir: Path) -> None:
    from e5v.lora import AdapterBaseError
    from eval.runner import evaluate

    cfg = compose_eval(area / "refused", area / "mini", "backbone=tiny", "backbone.seed=1", f"checkpoint={step_dir}",
                       "benchmarks=[sts]")
    with pytest.raises(AdapterBaseError) as e:
        evaluate(cfg, output_dir=area / "refused" / "out")
    msg = str(e.value)
    assert "\n" not in msg
    assert "tiny (seed 0)" in msg and "tiny (seed 1)" in msg and str(step_dir) in msg
    assert "drop the backbone override" in msg and "allow_other_base=true" in msg
    assert not (area / "refused").exists()  # refused before any cache, data or model work


def test_allow_other_base_evaluates_the_chosen_base(
    area: Path, step_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from eval.runner import evaluate

    cfg = compose_eval(area, area / "mini", "backbone=tiny", "backbone.seed=1", f"checkpoint={step_dir}",
                       "benchmarks=[sts]", "allow_other_base=true")
    with caplog.at_level("WARNING", logger="e5v.lora"):
        res = evaluate(cfg, output_dir=area / "allowed")
    assert res["run"]["backbone"] == "tiny (seed 1)" and res["run"]["base_identity"]["seed"] == 1
    assert "allow_other_base" in caplog.text and "tiny (seed 0)" in caplog.text


def test_cli_refuses_an_explicitly_named_default_backbone(area: Path, step_dir: Path) -> None:
    """`backbone=e5v` typed on the command line is a choice even though it is eval's default (Hydra overrides)."""
    args = overrides(area / "cli", area / "mini", "backbone=e5v", f"checkpoint={step_dir}", "benchmarks=[sts]",
                     f"hydra.run.dir={area / 'cli' / 'run'}")
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "eval.cli", *args], cwd=REPO, env={**os.environ, **env},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "tiny (seed 0)" in p.stderr and "royokong/e5-v" in p.stderr and "allow_other_base=true" in p.stderr
    assert not (area / "cli" / "run" / "results.json").exists()


def test_adapter_that_does_not_fit_the_base_fails_in_one_line(step_dir: Path) -> None:
    from e5v import Embedder
    from e5v.lora import AdapterBaseError

    with pytest.raises(AdapterBaseError) as e:  # allowed past the config check: the shapes still differ
        Embedder.from_pretrained("tiny", device="cpu", sizes={"hidden_size": 48, "intermediate_size": 96},
                                 adapter=step_dir, allow_other_base=True)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 700
    assert str(step_dir / "adapter") in msg and "does not fit base tiny" in msg and "tiny (seed 0)" in msg
    assert "shape(s) differ" in msg


def test_embedder_from_pretrained_with_adapter(step_dir: Path) -> None:
    from e5v import Embedder
    from e5v.lora import AdapterBaseError, load_adapter_into_embedder, resolve_adapter

    texts = ["A small red circle at the top.", "Two blue squares."]
    recorded = Embedder.from_pretrained(adapter=step_dir, device="cpu")  # the base from e5v_adapter.json
    named = Embedder.from_pretrained("tiny", adapter=step_dir.parent.parent, device="cpu")  # a run folder works too
    by_hand = load_adapter_into_embedder(Embedder.from_pretrained("tiny", device="cpu"), resolve_adapter(step_dir))
    plain = Embedder.from_pretrained("tiny", device="cpu").encode_text(texts)
    np.testing.assert_allclose(recorded.encode_text(texts), by_hand.encode_text(texts), atol=1e-6)
    np.testing.assert_allclose(named.encode_text(texts), by_hand.encode_text(texts), atol=1e-6)
    assert not np.allclose(recorded.encode_text(texts), plain, atol=1e-3)
    refused = r"trained on base tiny \(seed 0\) but would be applied to tiny \(seed 1\)"
    with pytest.raises(AdapterBaseError, match=refused):
        Embedder.from_pretrained("tiny", seed=1, adapter=step_dir, device="cpu")  # refused before loading


def test_merge_refuses_another_base_unless_allowed(tmp_path: Path, tiny_dir: Path) -> None:
    from e5v.backbones import tiny
    from e5v.lora import AdapterBaseError, merge_to_dir

    other = tiny.ensure_tiny(seed=1)
    step = save_random_adapter(tmp_path / "step-000004", {"_target_": "e5v.backbones.llava_next.load",
                                                          "name_or_path": str(tiny_dir), "revision": None})
    adapter = step / "adapter"
    with pytest.raises(AdapterBaseError) as e:
        merge_to_dir(adapter, tmp_path / "refused", base=str(other))
    msg = str(e.value)
    assert "\n" not in msg and str(tiny_dir) in msg and str(other) in msg and "--allow-other-base" in msg
    assert not (tmp_path / "refused").exists()
    assert (merge_to_dir(adapter, tmp_path / "same", base=str(tiny_dir)) / "model.safetensors").is_file()
    assert (merge_to_dir(adapter, tmp_path / "other", base=str(other), allow_other_base=True)
            / "model.safetensors").is_file()


# ---------------------------------------------------------------- 4. data checked first, the report kept
def test_missing_data_of_later_benchmarks_fails_before_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from e5v.config import compose
    from eval.loaders import MissingDataError
    from e5v.mini.eval_data import generate
    from eval.model import ModelHandle
    from eval.runner import evaluate

    mini = generate(tmp_path / "mini", seed=0, **MINI)
    split = json.loads((mini / "cirr" / "image_splits" / "split.rc2.val.json").read_text())
    (mini / "cirr" / next(iter(split.values()))).unlink()  # annotations there, one image not
    cfg = compose("eval", [
        "backbone=tiny", "suite=paper", f"paths.data_dir={tmp_path / 'data'}",
        f"benchmark.sts.root={mini / 'senteval'}", f"benchmark.cirr.root={mini / 'cirr'}",
        "benchmarks=[sts,cirr,fashioniq,flickr30k]",
        f"cache.dir={tmp_path / 'c'}", "embedder.device=cpu", "progress=false",
    ])
    monkeypatch.setattr(ModelHandle, "embedder", property(lambda self: pytest.fail("the model was loaded")))
    monkeypatch.setattr(ModelHandle, "fingerprint", property(lambda self: pytest.fail("the model was hashed")))
    with pytest.raises(MissingDataError) as e:
        evaluate(cfg, output_dir=tmp_path / "out")
    msg = str(e.value)
    assert "3 of 4 selected benchmark(s)" in msg
    for name, target in (("cirr", "data-cirr"), ("fashioniq", "data-fashioniq"), ("flickr30k", "data-flickr30k")):
        assert f"  - {name}: " in msg and f"make {target}" in msg
    assert "image '" in msg  # the missing CIRR image is named
    assert "benchmarks=[sts]" in msg  # how to run what is there
    assert not (tmp_path / "out").exists()


def test_a_late_failure_keeps_the_finished_benchmarks_in_a_partial_report(
    area: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from eval.benchmarks.cirr import Cirr
    from eval.runner import evaluate

    def boom(self: Any, ctx: Any) -> Any:
        raise RuntimeError("simulated failure in cirr")

    monkeypatch.setattr(Cirr, "embed", boom)
    cfg = compose_eval(area, area / "mini", "backbone=tiny", "benchmarks=[sts,fashioniq,cirr,coco]")
    with pytest.raises(RuntimeError, match="simulated failure"):
        evaluate(cfg, output_dir=tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(saved["metrics"]) == {"sts", "fashioniq"}
    assert saved["status"] == {"complete": False, "finished": ["sts", "fashioniq"], "pending": ["cirr", "coco"],
                               "failed": "cirr", "error": "RuntimeError: simulated failure in cirr"}
    md = (tmp_path / "out" / "results.md").read_text()
    assert "INCOMPLETE: 2 of 4 benchmarks finished" in md and "stopped at **cirr**" in md
    assert "| sts | avg |" in md
