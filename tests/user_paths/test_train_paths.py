"""Ordinary moves on the training side that used to give a wrong result with exit code 0 (issue 12, items
1, 2, 5, 6, 7, 8): a user's CSV regenerated, a changed config silently resuming an old run, mini data for
training and evaluation colliding, out-of-range options training anyway, Ctrl-C losing the step, metrics
written twice after a resume, files unreadable to teammates.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "faults"))
from faultkit import REPO, env, metrics, run_dir, run_train  # noqa: E402

SHORT = ("logger=none", "trainer.keep_checkpoints=null", "trainer.micro_batch=16")


# ---------------------------------------------------------------- 1. generators never overwrite user files
USER_CSV = "sent0,sent1,hard_neg\nmy anchor,my positive,my negative\n" * 40


@pytest.mark.parametrize("loader", ["mini_nli", "mini_pairs"])
def test_generator_refuses_to_overwrite_a_users_file(tmp_path: Path, loader: str) -> None:
    from e5v.config import compose, instantiate

    mine = tmp_path / ("data.csv" if loader == "mini_nli" else "pairs.json")
    text = USER_CSV if loader == "mini_nli" else json.dumps([{"id": "a", "image": "a.jpg", "conversations": []}])
    mine.write_text(text)
    cfg = compose("train", ["experiment=tiny_cpu", f"data={loader}", f"paths.data_dir={tmp_path}", "run_name=x",
                            f"data.loader.path={mine}"])
    with pytest.raises(FileExistsError) as e:
        instantiate(cfg.data.loader)
    assert str(mine) in str(e.value) and "refusing to overwrite" in str(e.value)
    assert mine.read_text() == text  # untouched


def test_generator_regenerates_only_what_it_wrote(tmp_path: Path) -> None:
    from e5v.data.atomic import NotGeneratedError
    from e5v.mini.train_data import write_mini_nli

    f = write_mini_nli(tmp_path / "nli.csv", n_rows=16, seed=0)
    first = f.read_text()
    write_mini_nli(f, n_rows=32, seed=1)  # its own file, other parameters: regenerated
    assert f.read_text() != first and len(f.read_text().splitlines()) == 33
    f.write_text(f.read_text() + "hand,edited,row\n")  # edited by hand: no longer the generator's
    edited = f.read_text()
    with pytest.raises(NotGeneratedError, match="edited since"):
        write_mini_nli(f, n_rows=16, seed=0)
    assert f.read_text() == edited


# ---------------------------------------------------------------- 5. training and evaluation mini data apart
def test_train_mini_data_and_eval_mini_data_do_not_collide(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from e5v.config import compose, instantiate
    from e5v.mini.eval_data import ensure

    train = compose("train", ["experiment=tiny_cpu", f"paths.data_dir={tmp_path}", "run_name=x"])
    pairs = compose("train", ["experiment=tiny_cpu", "data=mini_pairs", f"paths.data_dir={tmp_path}", "run_name=x"])
    ev = compose("eval", ["backbone=tiny", "suite=mini", f"paths.data_dir={tmp_path}"])
    mini = OmegaConf.to_container(ev.suite.mini, resolve=True)
    instantiate(train.data.loader)  # `e5v-train experiment=tiny_cpu` first ...
    instantiate(pairs.data.loader, n_rows=16)
    out = ensure(mini.pop("dir"), seed=int(mini.pop("seed")), **mini)  # ... then `make eval-mini`
    assert (out / "mini.json").is_file()
    instantiate(train.data.loader)  # and training again afterwards
    eval_dir = Path(ev.suite.mini.dir).resolve()
    for p in (Path(train.data.loader.path), Path(pairs.data.loader.path), Path(pairs.data.loader.image_root)):
        assert eval_dir not in p.resolve().parents, p


# ---------------------------------------------------------------- 6. range checks before anything loads
@pytest.mark.parametrize("override,key", [
    ("loss.temperature=-1", "loss.temperature"),
    ("loss.temperature=0", "loss.temperature"),
    ("trainer.micro_batch=0", "trainer.micro_batch"),
    ("trainer.micro_batch=-4", "trainer.micro_batch"),
    ("trainer.max_steps=0", "trainer.max_steps"),
    ("optim.lr=0", "optim.lr"),
    ("optim.warmup_steps=-1", "optim.warmup_steps"),
    ("lora.r=0", "lora.r"),
    ("lora.dropout=1.5", "lora.dropout"),
    ("trainer.global_batch=2.5", "trainer.global_batch"),
    ("optim.max_grad_norm=-1", "optim.max_grad_norm"),
])
def test_out_of_range_options_refuse_before_anything_is_built(tmp_path: Path, override: str, key: str) -> None:
    from e5v.config import compose
    from e5v.train import ConfigError, Trainer

    cfg = compose("train", ["experiment=tiny_cpu", f"paths.output_dir={tmp_path}", "run_name=x", override])
    with pytest.raises(ConfigError) as e:
        Trainer(cfg, tmp_path / "run")  # the constructor: no data, no model
    msg = str(e.value)
    assert msg.startswith(f"{key}=") and ("must be" in msg or "expected" in msg), msg
    assert "\n" not in msg
    assert not (tmp_path / "run").exists()


def test_valid_default_configs_pass_validation(tmp_path: Path) -> None:
    from e5v.config import compose
    from e5v.train import validate_config

    for exp in ("tiny_cpu", "paper", "single_gpu_768"):
        validate_config(compose("train", [f"experiment={exp}", "run_name=x"]))


# ---------------------------------------------------------------- 2 + 7. resume only the same config; metrics once
def test_changed_config_refuses_to_resume_and_same_config_resumes_with_metrics_once(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = run_dir(out)
    # killed after step 3; the last checkpoint is step 2
    p = run_train(out, *SHORT, "trainer.max_steps=4", "trainer.save_every=2",
                  inject="kill-after-step:3", check=False)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert [m["step"] for m in metrics(run)] == [1, 2, 3]
    config_before = (run / "config.yaml").read_text()

    t0 = time.perf_counter()
    p = run_train(out, *SHORT, "trainer.max_steps=4", "trainer.save_every=2", "optim.lr=1e-4",
                  "loss.temperature=0.1", check=False)
    refused_in = time.perf_counter() - t0
    assert p.returncode != 0
    assert "optim.lr: 0.002 -> 0.0001" in p.stderr and "loss.temperature: 0.05 -> 0.1" in p.stderr, p.stderr[-3000:]
    assert "run_name" in p.stderr and "allow_config_change=true" in p.stderr
    assert (run / "config.yaml").read_text() == config_before  # the folder still describes its adapter
    assert refused_in < 60, refused_in  # before DeepSpeed and the model (generous: a loaded CI machine)

    # the same config resumes at step 2; step 3 is logged once
    p = run_train(out, *SHORT, "trainer.max_steps=4", "trainer.save_every=2")
    steps = [m["step"] for m in metrics(run)]
    assert steps == [1, 2, 3, 4], steps
    state = json.loads((run / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["config"]["optim.lr"] == 0.002 and "trainer.max_steps" not in state["config"]


def test_default_run_name_carries_the_config_hash() -> None:
    def run_name(*overrides: str) -> str:
        p = subprocess.run([sys.executable, "-m", "e5v.train", "experiment=tiny_cpu", *overrides, "--cfg", "job",
                            "--resolve", "--package", "run_name"], cwd=REPO, env=env(), capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        return p.stdout.strip().splitlines()[-1]

    base = run_name()
    assert base.startswith("tiny-mini_nli-") and len(base.rsplit("-", 1)[1]) == 8, base
    # the run's folder: not named by its length (resuming it on another schedule is refused, naming both)
    assert run_name("trainer.max_steps=80", "logger=none") == base
    assert run_name("optim.lr=1e-4") != base  # a changed hyperparameter is a new run


def test_ctrl_c_checkpoints_the_current_step_and_exits_without_a_traceback(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = run_dir(out)
    args = ["experiment=tiny_cpu", f"paths.output_dir={out}", f"paths.data_dir={tmp_path / 'data'}", "run_name=run",
            *SHORT, "trainer.max_steps=500", "trainer.save_every=1000"]
    proc = subprocess.Popen([sys.executable, "-m", "e5v.train", *args], cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (
            (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip()
        ):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    saved = sorted(d.name for d in (run / "checkpoints").iterdir() if d.name.startswith("step-"))
    assert saved, err[-2000:]
    step = int(saved[-1].split("-")[1])
    assert 1 <= step < 500 and [m["step"] for m in metrics(run)][-1] == step
    assert "run the same command again to resume" in err


# ---------------------------------------------------------------- 8. the umask is respected
def test_written_files_and_folders_follow_the_umask(tmp_path: Path) -> None:
    from e5v.data.atomic import atomic_write_text, build_dir_once
    from e5v.mini.eval_data import ensure
    from e5v.mini.train_data import write_mini_nli

    old = os.umask(0o022)
    try:
        f = atomic_write_text(tmp_path / "results.json", "{}")
        d = build_dir_once(tmp_path / "built", lambda p: (p / "m").write_text("x"), "m")
        csv = write_mini_nli(tmp_path / "mini" / "nli.csv", n_rows=8)
        mini = ensure(tmp_path / "eval_mini", seed=0, images=4, cirr_groups=1, fiq_images=4, sts_pairs=2)
        os.umask(0o027)
        g = atomic_write_text(tmp_path / "group.json", "{}")
    finally:
        os.umask(old)
    for path, mode in ((f, 0o644), (d, 0o755), (csv, 0o644), (mini, 0o755), (g, 0o640)):
        assert stat.S_IMODE(path.stat().st_mode) == mode, (path, oct(path.stat().st_mode))


# ---------------------------------------------------------------- 10. make clean keeps trained runs
def test_make_clean_keeps_trained_checkpoints_unless_asked(tmp_path: Path) -> None:
    for d in ("outputs/train/run/checkpoints/step-000040", "outputs/sweeps/s/0", "outputs/eval/mini/x", "outputs/demo/t"):
        (tmp_path / d).mkdir(parents=True)
    make = ["make", "-s", "-f", str(REPO / "Makefile"), "clean"]
    subprocess.run(make, cwd=tmp_path, check=True, capture_output=True)
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["sweeps", "train"]
    assert (tmp_path / "outputs/train/run/checkpoints/step-000040").is_dir()
    subprocess.run([*make, "ALL=1"], cwd=tmp_path, check=True, capture_output=True)
    assert not (tmp_path / "outputs").exists()
