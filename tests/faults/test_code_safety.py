"""Guarantee 7, code safety: no remote model code runs (every family, Phi-3-V included, loads natively); model weights load from
safetensors only; every ``torch.load`` uses ``weights_only=True``; caches never use pickle; secrets never reach
logs or saved configs (the end-to-end scan of a real run directory is in test_run_outputs.py).

Existing: tests/test_backbones.py::test_phi3_v_loads_natively_and_refuses_remote_code,
tests/eval/test_eval_cache.py::test_bad_shards_are_dropped_and_reencoded[pickled_object] and
::test_shard_files_are_plain_npy_and_json.
"""

from __future__ import annotations

import ast
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from faultkit import REPO

SOURCES = sorted(p for d in ("e5v", "eval", "scripts") for p in (REPO / d).rglob("*.py"))
REMOTE_CODE_OPT_IN: set[str] = set()  # no file may pass trust_remote_code=True (Phi-3-V is native since issue 20)


def _calls(path: Path) -> list[tuple[str, ast.Call]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [(ast.unparse(node.func), node) for node in ast.walk(tree) if isinstance(node, ast.Call)]


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_sources_never_unpickle_and_torch_load_is_weights_only() -> None:
    assert len(SOURCES) > 30
    problems = []
    for path in SOURCES:
        rel = str(path.relative_to(REPO))
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                bad = [n for n in names if n and n.split(".")[0] in {"pickle", "cPickle", "dill", "cloudpickle",
                                                                    "joblib", "shelve", "marshal"}]
                if bad:
                    problems.append(f"{rel}:{node.lineno} imports {bad}")
        for func, call in _calls(path):
            if func.endswith("torch.load") and not _is_true(_kw(call, "weights_only")):
                problems.append(f"{rel}:{call.lineno} torch.load without weights_only=True")
            allow = _kw(call, "allow_pickle")
            if func.startswith(("np.", "numpy.")) and allow is not None and not (
                isinstance(allow, ast.Constant) and allow.value is False
            ):
                problems.append(f"{rel}:{call.lineno} {func} with allow_pickle")
            if func.endswith("save_pretrained") and _kw(call, "safe_serialization") is not None:
                if not _is_true(_kw(call, "safe_serialization")):
                    problems.append(f"{rel}:{call.lineno} save_pretrained without safetensors")
            if _is_true(_kw(call, "trust_remote_code")) and rel not in REMOTE_CODE_OPT_IN:
                problems.append(f"{rel}:{call.lineno} trust_remote_code=True outside the opt-in backbone")
    assert not problems, "\n".join(problems)


def test_model_weights_load_with_use_safetensors() -> None:
    """Every model load passes use_safetensors=True: a directory with only pickle weights is refused."""
    loads = []
    for path in SOURCES:
        for func, call in _calls(path):
            if func.endswith(".from_pretrained") and ("ForConditionalGeneration" in func or "AutoModel" in func):
                loads.append((str(path.relative_to(REPO)), call.lineno, _is_true(_kw(call, "use_safetensors"))))
    assert loads and all(ok for *_, ok in loads), loads


class _Payload:
    """Unpickling this runs code: it would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))  # type: ignore[return-value]


def test_pickle_only_model_directory_is_refused_without_running_it(tiny_dir: Path, tmp_path: Path) -> None:
    from e5v import Embedder

    d = tmp_path / "model"
    shutil.copytree(tiny_dir, d)
    for f in d.glob("*.safetensors*"):
        f.unlink()
    marker = tmp_path / "pwned"
    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump({"weights": _Payload(marker)}, f)
    with pytest.raises((OSError, ValueError)) as err:
        Embedder.from_pretrained(str(d), device="cpu")
    assert "safetensors" in str(err.value)
    assert not marker.exists()


def test_deepspeed_checkpoint_files_load_weights_only(tmp_path: Path) -> None:
    """A checkpoint file that would run code when unpickled is refused by the loader resume uses."""
    from e5v.train.checkpoint import _safe_torch_engine

    marker = tmp_path / "pwned"
    evil = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": _Payload(marker)}, evil)
    with pytest.raises(pickle.UnpicklingError):
        _safe_torch_engine().load(str(evil), map_location="cpu")
    assert not marker.exists()
    fine = tmp_path / "ok.pt"
    torch.save({"module": {"w": torch.ones(2)}, "step": 3}, fine)
    assert _safe_torch_engine().load(str(fine), map_location="cpu")["step"] == 3


def test_remote_code_backbone_in_a_local_directory_never_imports_it(tmp_path: Path) -> None:
    """A Phi-3-V folder in the hub's layout (config.json's auto_map naming the checkpoint's .py files) whose .py
    files would leave a marker: it loads natively and embeds, and none of them is imported; a folder with only
    those files and a bare config.json fails on the config, still importing nothing."""
    from e5v.backbones import auto, phi3_v

    marker = tmp_path / "pwned"
    hostile = f"open({str(marker)!r}, 'w').close()\n"
    d = tmp_path / "phi3"
    shutil.copytree(phi3_v.tiny_folder({"seed": 0, "cache_dir": str(tmp_path / "cache")}, build=True), d)
    for f in ("modeling_phi3_v.py", "configuration_phi3_v.py", "processing_phi3_v.py", "image_processing_phi3_v.py"):
        (d / f).write_text(hostile)
    assert json.loads((d / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"].startswith("modeling_phi3_v")
    b = auto.load(str(d), device="cpu")
    assert type(b.model).__module__ == "e5v.backbones.phi3_v_model"
    assert b.forward(b.inputs().text(b.inputs().tokenize(["a dog"]))).isfinite().all()
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({
        "model_type": "phi3_v", "auto_map": {"AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM"}}))
    (bare / "modeling_phi3_v.py").write_text(hostile)
    with pytest.raises(ValueError, match="img_processor"):
        auto.load(str(bare), device="cpu")
    assert not marker.exists()


def test_secrets_are_redacted_from_configs_command_lines_and_hydra_copies(tmp_path: Path) -> None:
    import yaml
    from omegaconf import OmegaConf

    from e5v.provenance import is_secret_key, redact, redact_text, scrub_hydra_outputs

    cfg = {"logger": {"wandb": {"api_key": "K1", "project": "p"}}, "hf_token": "K2", "db": {"password": "K3"},
           "prompt": {"image_token": "<image>"}, "trainer": {"train_max_tokens": 77}}
    clean = redact(cfg)
    assert "K1" not in str(clean) and "K2" not in str(clean) and "K3" not in str(clean)
    assert clean["prompt"]["image_token"] == "<image>" and clean["trainer"]["train_max_tokens"] == 77
    assert redact_text("+logger.wandb.api_key=K1 WANDB_API_KEY=K2 x=1") == (
        "+logger.wandb.api_key=<redacted> WANDB_API_KEY=<redacted> x=1")
    assert not is_secret_key("max_batch_tokens") and not is_secret_key("tokenizer") and is_secret_key("GH_TOKEN")
    hydra_dir = tmp_path / "run" / ".hydra"
    hydra_dir.mkdir(parents=True)
    (hydra_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    (hydra_dir / "overrides.yaml").write_text(yaml.safe_dump(["+logger.wandb.api_key=K1", "run_name=r"]))
    (hydra_dir / "hydra.yaml").write_text(yaml.safe_dump(
        {"hydra": {"job": {"override_dirname": "+hf_token=K2,run_name=r"}, "overrides": {"task": ["+hf_token=K2"]}}}))
    hc = OmegaConf.create({"runtime": {"output_dir": str(tmp_path / "run")}, "output_subdir": ".hydra",
                          "sweep": {"dir": str(tmp_path / "sweep")}})
    assert len(scrub_hydra_outputs(hc)) == 3
    text = "".join(f.read_text() for f in hydra_dir.glob("*.yaml"))
    assert "K1" not in text and "K2" not in text and "K3" not in text and "run_name=r" in text
    assert yaml.safe_load((hydra_dir / "overrides.yaml").read_text()) == ["+logger.wandb.api_key=<redacted>",
                                                                         "run_name=r"]


def test_evaluation_with_wandb_writes_no_secret(tiny_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process: WANDB_API_KEY and a secret config key never reach results.json or W&B's offline files."""
    from faultkit import TINY_EVAL, eval_cfg, scan_for
    from eval.runner import evaluate

    secrets = ["wandbFAKEKEY0123456789abcdef0123456789abcd", "cfgFAKEapikey77"]
    monkeypatch.setenv("WANDB_API_KEY", secrets[0])
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = eval_cfg(tmp_path, tmp_path / "mini", tmp_path / "cache", "benchmarks=[sts]", "logger=wandb",
                   "logger.wandb.mode=offline", f"+logger.wandb.api_key={secrets[1]}", sizes=TINY_EVAL)
    res = evaluate(cfg, output_dir=tmp_path / "out")
    assert res["config"]["logger"]["wandb"]["api_key"] == "<redacted>"
    assert list((tmp_path / "out" / "wandb").glob("offline-run-*"))
    assert scan_for(tmp_path, secrets) == {}
