"""Guarantee 6, config safety: an unknown key, a misspelled group option or a missing required value fails
before any model is loaded (Hydra's own message for the first two); a global batch that does not divide
fails at start.

Existing: tests/test_configs.py::test_unknown_key_and_option_fail_before_any_model (compose level),
tests/test_train.py::test_global_batch_must_divide (the CLI), tests/eval/test_eval_configs.py::
test_coco_caption_option_and_typos (unknown benchmark options).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from e5v.config import compose
from faultkit import REPO, env


def test_train_cli_typo_fails_with_hydras_message_and_writes_nothing(tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "e5v.train", "experiment=tiny_cpu", f"paths.output_dir={tmp_path / 'out'}",
         "trainer.max_stepz=3"],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=120,
    )
    assert p.returncode != 0
    assert "Could not override 'trainer.max_stepz'" in p.stderr and "Key 'max_stepz' is not in struct" in p.stderr
    assert "Loading weights" not in p.stderr and not (tmp_path / "out").exists()  # no run directory, no model


def test_eval_cli_misspelled_group_option_lists_the_choices(tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "eval.cli", "backbone=tiny", "suite=mnii", f"paths.output_dir={tmp_path / 'out'}"],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=120,
    )
    assert p.returncode != 0
    assert "Could not find 'suite/mnii'" in p.stderr and "mini" in p.stderr and "paper" in p.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("config", "override", "needle"), [
    ("train", "backbone=tiny_wrld", "Could not find 'backbone/tiny_wrld'"),
    ("train", "optim.lrr=1e-3", "Key 'lrr' is not in struct"),
    ("eval", "index=hnws", "Could not find 'index/hnws'"),
    ("eval", "cache.shard_sise=8", "Key 'shard_sise' is not in struct"),
])
def test_typos_fail_at_composition(config: str, override: str, needle: str) -> None:
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        compose(config, [override, "run_name=x"] if config == "train" else [override])
    assert needle in str(err.value) or needle in str(err.value.__cause__)


def test_missing_required_value_fails_before_the_model_is_built(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``???`` anywhere (here lora.r, read only after the model is loaded) stops the Trainer at construction."""
    from e5v.errors import ConfigError
    from e5v.train import trainer as train

    cfg = compose("train", ["experiment=tiny_cpu", "run_name=x", "lora.r=???", f"paths.output_dir={tmp_path}"])
    built: list[str] = []
    monkeypatch.setattr(train.Trainer, "setup", lambda self: built.append("model"))
    with pytest.raises(ConfigError, match=r"missing required value\(s\) \['lora\.r'\]"):
        train.Trainer(cfg, tmp_path / "run")
    assert built == []


def test_missing_required_value_fails_before_evaluation_loads_anything(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import eval.runner as runner

    cfg = compose("eval", ["backbone=tiny", "suite=mini", "embedder.dtype=???", f"cache.dir={tmp_path / 'c'}"])
    monkeypatch.setattr(runner, "ModelHandle", lambda *a, **k: pytest.fail("a model handle was built"))
    with pytest.raises(ValueError, match=r"missing required value\(s\) \['embedder\.dtype'\]"):
        runner.evaluate(cfg, output_dir=tmp_path / "out")
    assert not (tmp_path / "c").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("global_batch", "micro", "world", "needle"), [
    (30, 8, 1, "not divisible by trainer.micro_batch=8"),
    (32, 8, 3, "not divisible by the world size 3"),
    (96, 16, 4, "gives 24 rows per process, not divisible by trainer.micro_batch=16"),
])
def test_global_batch_that_does_not_divide_fails_at_start(global_batch: int, micro: int, world: int,
                                                          needle: str) -> None:
    from e5v.train import ConfigError, plan_batches

    with pytest.raises(ConfigError, match=needle):
        plan_batches(global_batch, micro, world, grad_cache=False)
    ok = plan_batches(768, 24, 32, grad_cache=False)  # the paper's arithmetic
    assert (ok.local, ok.chunks, ok.negatives_per_loss) == (24, 1, 768)
