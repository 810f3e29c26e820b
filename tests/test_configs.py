"""Every config group composes (and instantiates where that is offline), every experiment runs one
training step on the tiny backbone, and every reproduce-* make target composes (dry run)."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from e5v.config import compose, config_dir, instantiate

REPO = Path(__file__).resolve().parents[1]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["prompt", "data", "loss", "optim", "trainer", "lora", "logger", "experiment"])
def test_train_groups_compose(group: str) -> None:
    opts = options(group)
    assert opts, group
    for opt in opts:
        cfg = compose("train", [f"{group}={opt}", "run_name=x"])
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


@pytest.mark.parametrize("name", options("prompt"))
def test_every_prompt_builds(name: str) -> None:
    from e5v.prompts import PromptSet

    p = PromptSet.from_config(compose("embed", [f"prompt={name}"]).prompt)
    assert "<sent>" in p.bodies["text"] and p.render("text", "x")


def test_data_groups_instantiate(tmp_path) -> None:
    cfg = compose("train", ["data=mini_nli", f"paths.data_dir={tmp_path}", "run_name=x"])
    t = instantiate(cfg.data.loader)
    assert len(t) == 512 and t.negatives is not None
    csv = tmp_path / "nli" / "nli_for_simcse.csv"
    csv.parent.mkdir()
    csv.write_text("sent0,sent1,hard_neg\na,b,c\n")
    cfg = compose("train", ["data=nli", f"paths.data_dir={tmp_path}", "run_name=x"])
    assert instantiate(cfg.data.loader).anchors == ["a"]


def test_optimizer_and_logger_build_from_their_target() -> None:
    import torch

    from e5v.provenance import WandbLogger, wandb_logger
    from e5v.train import build_optimizer

    for opt in options("optim"):
        cfg = compose("train", ["experiment=tiny_cpu", f"optim={opt}", "optim.lr=1e-3", "run_name=x"])
        built = build_optimizer(cfg.optim, [torch.nn.Parameter(torch.zeros(2))])
        assert type(built).__name__ == cfg.optim._target_.rsplit(".", 1)[1] and built.defaults["lr"] == 1e-3
    adamw = build_optimizer(compose("train", ["run_name=x"]).optim, [torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(adamw, torch.optim.AdamW)
    assert (adamw.defaults["lr"], tuple(adamw.defaults["betas"]), adamw.defaults["eps"]) == (4e-4, (0.9, 0.999), 1e-8)
    for name, run in (("train", ["run_name=x"]), ("eval", [])):
        wb = wandb_logger(compose(name, ["logger=wandb", "logger.wandb.group=g", *run]))
        assert isinstance(wb, WandbLogger) and (wb.project, wb.group, wb.mode) == ("e5v", "g", "offline")
        assert wandb_logger(compose(name, ["logger=none", *run])) is None
    with pytest.raises(TypeError, match="projcet"):  # a typo in the logger fails, not silently ignored
        wandb_logger(compose("train", ["+logger.wandb.projcet=p", "run_name=x"]))


def test_unknown_key_and_option_fail_before_any_model(tmp_path) -> None:
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="trainer.max_stepz"):
        compose("train", ["trainer.max_stepz=3"])
    with pytest.raises(ConfigCompositionException, match="backbone"):
        compose("train", ["backbone=tinyy"])


def test_every_experiment_runs_one_step(tmp_path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", E5V_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    names = options("experiment")
    p = subprocess.run([sys.executable, "tests/helpers/one_step.py", str(tmp_path / "o"), str(tmp_path / "d"), *names],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    rows = {r["experiment"]: r for r in (json.loads(x) for x in p.stdout.splitlines() if x.startswith("{"))}
    assert set(rows) == set(names)
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows.values())
    assert rows["paper"]["train_mode"] == "faithful" and rows["single_gpu_768"]["grad_cache"] is True
    assert rows["stage2"]["grad_cache"] is True and rows["stage2_tiny"]["grad_cache"] is False


@pytest.mark.parametrize("target", ["reproduce-zero-shot", "reproduce-e5v", "reproduce-train", "eval", "eval-mini",
                                    "train"])
def test_make_targets_compose(target: str) -> None:
    out = subprocess.run(["make", "-n", target, "GPUS=8", "NODES=4"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    calls = [line for line in out.splitlines() if " -m e5v.train" in line or " -m eval.cli" in line]
    assert calls, out
    for line in calls:
        args = shlex.split(line)
        module = args[args.index("-m") + 1]
        overrides = [a for a in args[args.index("-m") + 2 :] if "=" in a]
        cfg = compose("train" if module == "e5v.train" else "eval", overrides)
        assert cfg.backbone._target_.startswith("e5v.backbones.")
        if target == "reproduce-train" and module == "e5v.train":
            assert cfg.trainer.global_batch == 768 and cfg.prompt.train_mode == "faithful"
        if "--nproc_per_node" in args:
            assert args[args.index("--nproc_per_node") + 1] == "8" and args[args.index("--nnodes") + 1] == "4"


def test_help_lists_every_target() -> None:
    out = subprocess.run(["make"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    makefile = (REPO / "Makefile").read_text()
    documented = set(re.findall(r"^([a-zA-Z0-9_-]+):.*## ", makefile, flags=re.M))
    assert {"setup", "test", "demo", "reproduce-e5v", "reproduce-train"} <= documented
    for t in documented:
        assert re.search(rf"^  {re.escape(t)}\s", out, flags=re.M), t


def test_embedder_group_is_the_one_source_of_defaults() -> None:
    """configs/embedder/default.yaml holds the Embedder's defaults: embed.yaml composes it, eval.yaml composes
    embedder/eval (the same plus float16, raise, no bar), e5v-encode's options default to it, and
    Embedder(...)'s keyword defaults equal it (a changed default in one place fails here)."""
    import inspect

    from e5v.cli.encode import build_parser
    from e5v.config import embedder_defaults
    from e5v.embedder import EMBEDDER_OPTIONS, Embedder

    d = embedder_defaults()
    assert set(d) == {"dtype", "device", *EMBEDDER_OPTIONS}
    sig = inspect.signature(Embedder.__init__).parameters
    assert {k: sig[k].default for k in EMBEDDER_OPTIONS} == {k: d[k] for k in EMBEDDER_OPTIONS}
    fp = inspect.signature(Embedder.from_pretrained).parameters
    assert (fp["dtype"].default, fp["device"].default) == (d["dtype"], d["device"])
    assert OmegaConf.to_container(compose("embed").embedder) == d
    ev = OmegaConf.to_container(compose("eval").embedder)
    assert ev == {**d, "dtype": "float16", "on_bad_image": "raise", "progress": False}
    assert compose("eval", ["embedder.batch_size=7"]).embedder.batch_size == 7
    args = build_parser().parse_args(["--texts", "x.txt", "--out", "o"])
    pin = {"auto": None, "true": True, "false": False}
    got = {"dtype": args.dtype, "device": args.device, "batch_size": args.batch_size, "max_length": args.max_length,
           "on_bad_image": args.on_bad_image, "max_batch_tokens": args.max_batch_tokens,
           "num_workers": args.num_workers, "pin_memory": pin[args.pin_memory], "packing": args.packing,
           "pack_tokens": args.pack_tokens, "compile": args.compile, "dim": args.dim}
    assert got == {k: d[k] for k in got}


def test_unknown_embedder_option_is_named() -> None:
    from e5v.embedder import Embedder

    cfg = compose("embed", ["backbone=tiny", "+embedder.batchsize=4"])
    with pytest.raises(ValueError, match=r"unknown embedder option\(s\) embedder\.batchsize"):
        Embedder.from_config(cfg)
