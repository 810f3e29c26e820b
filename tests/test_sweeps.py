"""Hyper-parameter sweeps: configs/hparams_search with the basic launcher (real 2x2 multiruns on the tiny
backbone), the SLURM launcher config (rendered to an sbatch script, never submitted), and
scripts/collect_sweep.py."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from scripts import collect_sweep

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", E5V_NO_PROGRESS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _rows(sweep: Path) -> tuple[list[str], list[dict[str, str]]]:
    with (sweep / "sweep_results.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _compose(config: str, overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config, overrides, return_hydra_config=True)


@pytest.mark.slow  # make test time (25 s); the sweep configs' composition stays in make test
def test_training_sweep_2x2_runs_and_collects_four_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cmd = [
        sys.executable, "-m", "e5v.train", "hparams_search=train_lr_temperature", "experiment=tiny_cpu",
        "trainer.max_steps=2", "trainer.save_every=2", "optim.warmup_steps=0",
        "optim.lr=1e-3,1e-2", "loss.temperature=0.05,0.1",  # replaces the config's 3x3 grid
        f"paths.output_dir={tmp_path / 'out'}", f"paths.data_dir={tmp_path / 'data'}",
    ]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-4000:]
    sweep = tmp_path / "out" / "sweeps" / "lr_x_temperature"
    jobs = sorted(d for d in sweep.iterdir() if (d / ".hydra" / "overrides.yaml").is_file())
    assert len(jobs) == 4
    final_loss, grid = {}, set()
    for d in jobs:
        cfg = OmegaConf.load(d / "config.yaml")  # resolved config the job ran with (and gave to wandb.init)
        num = int(d.name.split("_", 1)[0])
        assert cfg.logger.wandb.group == "lr_x_temperature" and cfg.logger.wandb.name == f"lr_x_temperature-{num}"
        assert list((d / "wandb").glob("offline-run-*")), d  # one W&B run per job
        grid.add((cfg.optim.lr, cfg.loss.temperature))
        final_loss[d.name] = json.loads((d / "metrics.jsonl").read_text().splitlines()[-1])["train/loss"]
    assert grid == {(1e-3, 0.05), (1e-3, 0.1), (1e-2, 0.05), (1e-2, 0.1)}
    assert len(set(final_loss.values())) == 4  # every job trained with its own lr x temperature

    assert collect_sweep.main([str(sweep)]) == 0
    md = capsys.readouterr().out
    assert "sorted by train/loss (ascending)" in md
    assert len([line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| job")]) == 4
    header, rows = _rows(sweep)
    assert len(rows) == 4 and {"optim.lr", "loss.temperature", "train/loss"} <= set(header)
    assert header.index("optim.lr") < header.index("trainer.max_steps")  # varying overrides first
    losses = [float(r["train/loss"]) for r in rows]
    assert losses == sorted(losses)
    for r in rows:
        assert float(r["train/loss"]) == pytest.approx(final_loss[r["dir"]], rel=1e-12)
        assert f"optim.lr={r['optim.lr']}" in r["dir"] and f"loss.temperature={r['loss.temperature']}" in r["dir"]
        assert r["status"] == "ok" and float(r["train/steps"]) == 2


@pytest.mark.slow
def test_eval_prompt_sweep_2x2_on_the_mini_suite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cmd = [
        sys.executable, "-m", "eval.cli", "hparams_search=eval_prompts", "backbone=tiny", "suite=mini",
        "benchmarks=[flickr30k,sts]", "prompt=e5v_llama3,none", "index=exact,hnsw",
        f"suite.mini.dir={tmp_path / 'mini'}", "suite.mini.images=6", "suite.mini.sts_pairs=3",
        f"cache.dir={tmp_path / 'cache'}", f"render.cache_dir={tmp_path / 'render'}",
        f"report.history={tmp_path / 'history.jsonl'}", "embedder.device=cpu", "progress=false", "report.plot=false",
        f"paths.output_dir={tmp_path / 'out'}",
    ]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-4000:]
    sweep = tmp_path / "out" / "sweeps" / "eval_prompts"
    assert collect_sweep.main([str(sweep), "--metrics", "sts/*,flickr30k/t2i_R@1"]) == 0
    header, rows = _rows(sweep)
    assert len(rows) == 4 and header[1:3] == ["prompt", "index"]  # the varying overrides, then the shared ones
    assert header.index("sts/avg") + 1 == header.index("flickr30k/t2i_R@1")  # sort metric first among metrics
    avgs = [float(r["sts/avg"]) for r in rows]
    assert avgs == sorted(avgs, reverse=True)
    by_prompt = {r["prompt"]: float(r["sts/avg"]) for r in rows}
    assert set(by_prompt) == {"e5v_llama3", "none"} and by_prompt["e5v_llama3"] != by_prompt["none"]
    for r in rows:
        res = json.loads((sweep / r["dir"] / "results.json").read_text())
        assert float(r["sts/avg"]) == pytest.approx(res["metrics"]["sts"]["avg"], rel=1e-12)
        assert res["config"]["logger"]["wandb"]["group"] == "eval_prompts"
        assert res["run"]["prompt"] == r["prompt"]


def test_sweep_configs_compose() -> None:
    t = _compose("train", ["hparams_search=train_lr_temperature"])
    assert str(t.hydra.mode) == "RunMode.MULTIRUN"
    assert dict(t.hydra.sweeper.params) == {"optim.lr": "1e-4,2e-4,4e-4", "loss.temperature": "0.02,0.05,0.1"}
    assert t.logger.wandb.group == "lr_x_temperature" and t.hydra.sweep.dir.endswith("/sweeps/lr_x_temperature")
    e = _compose("eval", ["hparams_search=eval_prompts"])
    assert dict(e.hydra.sweeper.params) == {"prompt": "e5v_llama3,generic_llama3,none"}
    assert e.logger.wandb.group == "eval_prompts"  # logger switched on from eval.yaml's `none`
    for name in ("generic_llama3", "none"):
        assert _compose("eval", [f"prompt={name}"]).prompt is not None


def test_slurm_launcher_renders_an_sbatch_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compose hydra/launcher=slurm, build the plugin's launcher and render the sbatch file submitit would
    submit; nothing is submitted (srun detection is stubbed)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    import submitit
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from submitit.slurm.slurm import SlurmExecutor

    monkeypatch.setenv("E5V_SLURM_PARTITION", "gpu-a100")
    cfg = _compose("train", ["hparams_search=train_lr_temperature", "hydra/launcher=slurm",
                             f"paths.output_dir={tmp_path}", "hydra.launcher.gpus_per_node=4",
                             "hydra.launcher.timeout_min=90", "hydra.launcher.setup=[source .venv/bin/activate]"])
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    params = dict(launcher.params)
    folder = params.pop("submitit_folder")
    assert folder == f"{tmp_path}/sweeps/lr_x_temperature/.submitit/%j"
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    ex.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})  # unknown keys raise
    sbatch = ex._executor._make_submission_file_text("python -m e5v.train", "uid")
    for line in ("--partition=gpu-a100", "--gpus-per-node=4", "--time=90", "--ntasks-per-node=1", "--mem=64GB",
                 "--cpus-per-task=8"):
        assert f"#SBATCH {line}\n" in sbatch, line
    assert "source .venv/bin/activate" in sbatch


def _fake_job(root: Path, name: str, num: int, overrides: list[str], results: dict[str, Any] | None = None,
              train: list[dict[str, Any]] | None = None) -> Path:
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (d / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  job:\n    num: {num}\n")
    if results is not None:
        (d / "results.json").write_text(json.dumps({"metrics": results}))
    if train is not None:
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    return d


def test_collect_sorts_filters_and_reports_jobs_without_metrics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = tmp_path / "sweep"
    _fake_job(sweep, "0", 0, ["prompt=a", "suite=mini"], {"sts": {"avg": 50.0, "STS12": 30.0}})
    _fake_job(sweep, "1", 1, ["prompt=b", "suite=mini"], {"sts": {"avg": 70.0, "STS12": 40.0}})
    _fake_job(sweep, "2", 2, ["prompt=c", "suite=mini"])  # failed: no metrics
    # training job with an eval afterwards; a stale results.json inside checkpoints/ is ignored
    j = _fake_job(sweep, "3", 3, ["+prompt=d", "suite=mini"], {"sts": {"avg": 60.0, "STS12": 35.0}},
                  [{"step": 1, "train/loss": 2.0}, {"step": 2, "train/loss": 1.5, "train/acc": 0.5}])
    (j / "checkpoints" / "step-2").mkdir(parents=True)
    (j / "checkpoints" / "step-2" / "results.json").write_text(json.dumps({"metrics": {"sts": {"avg": 99.0}}}))

    jobs = collect_sweep.collect(sweep)
    assert [x.num for x in jobs] == [0, 1, 2, 3] and jobs[3].overrides["prompt"] == "d"
    assert jobs[3].metrics == {"train/loss": 1.5, "train/acc": 0.5, "train/steps": 2.0, "sts/avg": 60.0, "sts/STS12": 35.0}
    assert collect_sweep.default_sort(jobs) == "sts/avg"
    assert collect_sweep.main([str(sweep), "--metrics", "sts/avg", "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "sweep_results.md").read_text()
    assert "Shared overrides: `suite=mini`" in md and "STS12" not in md
    table = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| job")]
    assert [line.split(" | ")[1] for line in table] == ["b", "d", "a", "c"]  # descending, no-metrics last
    assert table[-1].split(" | ")[3] == "no metrics"
    capsys.readouterr()
    assert collect_sweep.main([str(sweep), "--sort", "sts/STS12", "--ascending"]) == 0
    _, rows = _rows(sweep)
    assert [r["prompt"] for r in rows] == ["a", "d", "b", "c"] and rows[0]["sts/STS12"] == "30.0"
    assert collect_sweep.main([str(sweep), "--sort", "flickr30k/t2i_R@1"]) == 1
    assert "no job has metric 'flickr30k/t2i_R@1'" in capsys.readouterr().err
    assert collect_sweep.main([str(tmp_path / "empty")]) == 1
    assert "not found" in capsys.readouterr().err
