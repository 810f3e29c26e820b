"""What a training run is, and that its folder stays true to it (issue 21, items 2, 4 and 5, and the training
side of its traceback list): the data's content is part of a run (an edited CSV refuses a resume), the
learning-rate schedule's length is part of it (a raised ``trainer.max_steps`` refuses, naming both lengths and
the learning rates), a refused or 'nothing to train' re-run leaves the run's record as it was (Hydra's copy of
each invocation goes to its own folder), and bad CSVs and output folders end in one line.

The fast tests put a checkpoint on disk the way training writes it, but without DeepSpeed
(``faultkit.FakeEngine``): the refusals under test all come before any model or engine is built. The slow
test walks the same moves on a real run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "faults"))
from faultkit import FakeEngine, fake_adapter, metrics, run_dir, run_train  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cli_errors import assert_cli_error, run_cli  # noqa: E402

RUN = ("experiment=tiny_cpu", "run_name=run", "logger=none")


def compose_train(out: Path, *extra: str) -> Any:
    from e5v.config import compose

    return compose("train", [*RUN, f"paths.output_dir={out}", f"paths.data_dir={out.parent / 'data'}", *extra])


def fake_run(out: Path, step: int, *extra: str, max_steps: int | None = None, data: dict | None = None) -> Path:
    """``out/train/run`` holding a checkpoint at ``step`` as training writes it (state, manifest, adapter files;
    a stand-in optimizer state), trained with ``extra`` overrides on the data they name; returns the run folder."""
    from e5v.train import checkpoint as ckpt
    from e5v.train import run_identity
    from e5v.config import instantiate

    cfg = compose_train(out, *extra)
    run = run_dir(out)
    state = {
        "config": run_identity.shaping_config(cfg),
        "step": step,
        "max_steps": int(max_steps or cfg.trainer.max_steps),
        "world_size": 1,
        "data": {"step": step, "epoch": 0, "batch_in_epoch": step, "steps_per_epoch": 16},
        "losses": [1.0] * step,
    }
    identity = getattr(run_identity, "data_identity", None)  # (getattr: the same moves run on code without it)
    if data is not None or identity is not None:
        state["data_identity"] = data or identity(instantiate(cfg.data.loader))
    ckpt.save(FakeEngine(), run / "checkpoints", step, state, fake_adapter)
    return run


def setup_error(out: Path, *extra: str) -> str:
    """Trainer.setup() on ``extra``: the ConfigError's message (the model is never loaded)."""
    from e5v.errors import ConfigError
    from e5v.train import Trainer

    trainer = Trainer(compose_train(out, *extra), run_dir(out))
    with pytest.raises(ConfigError) as e:
        trainer.setup()
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert not hasattr(trainer, "engine")  # refused before DeepSpeed and the model
    return msg


# ---------------------------------------------------------------- 2. the data's content is part of a run
def write_csv(path: Path, rows: int = 64, word: str = "circle") -> Path:
    path.write_text("sent0,sent1,hard_neg\n" + "".join(
        f"a red {word} number {i},a {word} that is red {i},a blue square {i}\n" for i in range(rows)))
    return path


def test_resume_over_an_edited_csv_is_refused_naming_both_hashes(tmp_path: Path) -> None:
    csv = write_csv(tmp_path / "mine.csv")
    own = ("data=nli", f"data.loader.path={csv}")
    run = fake_run(tmp_path / "out", 40, *own)  # a finished 40-step run on that CSV
    write_csv(csv, word="triangle")  # edited in place: same path, same config, other rows
    msg = setup_error(tmp_path / "out", *own)
    assert "trained on other data" in msg and str(csv) in msg
    assert "new run_name" in msg and "allow_config_change=true" in msg
    from e5v.config import instantiate
    from e5v.train.run_identity import data_identity

    before = json.loads((run / "checkpoints" / "step-000040" / "trainer_state.json").read_text())["data_identity"]
    after = data_identity(instantiate(compose_train(tmp_path / "out", *own).data.loader))
    assert after["rows"] == before["rows"] == 64 and after["sha256"] != before["sha256"]
    assert before["sha256"][:12] in msg and after["sha256"][:12] in msg
    # the same data (restored) resumes: here, a finished run with nothing to train
    write_csv(csv)
    from e5v.train import Trainer

    t = Trainer(compose_train(tmp_path / "out", *own), run_dir(tmp_path / "out"))
    t.setup()
    assert t.already_complete and not hasattr(t, "engine")


def test_allow_config_change_continues_on_changed_data_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from e5v.train import Trainer

    csv = write_csv(tmp_path / "mine.csv")
    own = ("data=nli", f"data.loader.path={csv}")
    fake_run(tmp_path / "out", 40, *own)
    write_csv(csv, rows=80)  # rows appended
    t = Trainer(compose_train(tmp_path / "out", *own, "trainer.max_steps=40", "allow_config_change=true"),
                run_dir(tmp_path / "out"))
    with caplog.at_level("WARNING", logger="e5v.train"):
        t.setup()
    assert "on changed data" in caplog.text and "64 rows" in caplog.text and "80 rows" in caplog.text
    assert any(c.startswith("data: ") for c in t.resume.config_changes)


def test_checkpoint_records_what_it_trained_on(tmp_path: Path) -> None:
    """The identity is of the rows read: another limit or on_bad_row gives another hash; the path alone does not."""
    from e5v.data.nli import load_triplets
    from e5v.train.run_identity import data_identity

    a = write_csv(tmp_path / "a.csv")
    b = tmp_path / "copy.csv"
    b.write_bytes(a.read_bytes())
    ia, ib = data_identity(load_triplets(str(a))), data_identity(load_triplets(str(b)))
    assert ia["sha256"] == ib["sha256"] and ia["rows"] == 64 and ia["source"] == str(a)
    assert data_identity(load_triplets(str(a), limit=32))["sha256"] != ia["sha256"]


# ---------------------------------------------------------------- 5. the schedule's length is part of a run
def test_raising_max_steps_is_refused_naming_both_lengths_and_the_lr(tmp_path: Path) -> None:
    fake_run(tmp_path / "out", 40)  # experiment=tiny_cpu: 40 steps, warmup 4, lr 2e-3
    msg = setup_error(tmp_path / "out", "trainer.max_steps=80")
    from e5v.train.run_identity import schedule_lr

    assert "40-step learning-rate schedule" in msg and "asks for 80 steps (trainer.max_steps)" in msg, msg
    # the 40-step schedule ends at 0; the 80-step one would restart at lr * 40 / 76
    assert f"{schedule_lr(40, 80, 4, 2e-3):.3g}" in msg and f"{schedule_lr(40, 40, 4, 2e-3):.3g}" in msg
    assert schedule_lr(40, 40, 4, 2e-3) == 0.0 and schedule_lr(40, 80, 4, 2e-3) == pytest.approx(2e-3 * 40 / 76)
    assert "new run_name" in msg and "allow_config_change=true" in msg and "recomputed" in msg


def test_an_interrupted_run_resumed_with_another_length_is_refused_unless_within_warmup(tmp_path: Path) -> None:
    from e5v.train import Trainer

    fake_run(tmp_path / "a", 20)  # killed at step 20 of 40
    assert "40-step learning-rate schedule" in setup_error(tmp_path / "a", "trainer.max_steps=30")
    fake_run(tmp_path / "b", 3)  # killed inside the warmup (4 steps): both schedules gave steps 1-3 the same lr
    t = Trainer(compose_train(tmp_path / "b", "trainer.max_steps=80"), run_dir(tmp_path / "b"))
    t.resume.find()
    assert t.resume.config_changes == []


def test_allow_config_change_continues_on_the_recomputed_schedule(tmp_path: Path, caplog) -> None:
    from e5v.train import Trainer

    fake_run(tmp_path / "out", 40)
    t = Trainer(compose_train(tmp_path / "out", "trainer.max_steps=80", "allow_config_change=true"),
                run_dir(tmp_path / "out"))
    with caplog.at_level("WARNING", logger="e5v.train"):
        t.resume.find()
    assert "schedule recomputed for 80 steps" in caplog.text and t.resume.config_changes == ["schedule: 40 -> 80 steps"]


# ---------------------------------------------------------------- 4. the run's record stays true
def test_refused_and_nothing_to_train_reruns_leave_the_runs_record(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = fake_run(out, 40)
    record = {"config.yaml": "optim:\n  lr: 0.002\n", ".hydra/config.yaml": "optim:\n  lr: 0.002\n",
              ".hydra/overrides.yaml": "- experiment=tiny_cpu\n", "run_info.json": "{}\n", "metrics.jsonl": "{}\n"}
    for name, text in record.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(text)
    args = (*RUN, f"paths.output_dir={out}", f"paths.data_dir={tmp_path / 'data'}")

    p = run_cli("e5v-train", *args, "optim.lr=1e-4")
    assert "optim.lr: 0.002 -> 0.0001" in assert_cli_error(p, "e5v-train")
    p = run_cli("e5v-train", *args)  # the same config: already complete, nothing loaded
    assert p.returncode == 0, p.stderr[-3000:]
    assert "already complete" in p.stderr + p.stdout or "already complete" in (run / "train.log").read_text()
    for name, text in record.items():
        assert (run / name).read_text() == text, name  # the record of what trained, untouched
    invocations = sorted((run / ".hydra" / "invocations").iterdir())
    assert len(invocations) == 2  # Hydra's copy of each invocation, in its own folder
    assert "lr: 0.0001" in (invocations[0] / "config.yaml").read_text() + (invocations[1] / "config.yaml").read_text()


# ---------------------------------------------------------------- tracebacks where a line was due
@pytest.mark.parametrize("text, expected", [
    ("sent0,sent1,hard_neg\n", "has a header (sent0, sent1, hard_neg) but no rows below it"),
    ("sent0,sent1,hard_neg\n\n\n", "has a header (sent0, sent1, hard_neg) but no rows below it"),
    ('sent0,sent1,hard_neg\na,b,c\nd,"e,f\ng,h,i\n', "line 3: a quoted field that starts on this line is never closed"),
])
def test_unusable_csv_is_one_line_naming_file_and_line(tmp_path: Path, text: str, expected: str) -> None:
    from e5v.data.nli import DataError, load_triplets

    f = tmp_path / "mine.csv"
    f.write_text(text)
    with pytest.raises(DataError) as e:
        load_triplets(str(f), cache_dir=str(tmp_path / "cache"))
    msg = str(e.value)
    assert msg.startswith(f"{f}: ") and expected in msg and "\n" not in msg, msg


def test_csv_with_a_byte_order_mark_reads_its_first_column(tmp_path: Path) -> None:
    from e5v.data.nli import load_triplets

    f = tmp_path / "excel.csv"
    f.write_bytes("\ufeffsent0,sent1,hard_neg\na,b,c\n".encode())
    assert load_triplets(str(f), cache_dir=str(tmp_path / "cache")).anchors == ["a"]


def test_unterminated_quote_in_training_csv_console_script(tmp_path: Path) -> None:
    f = tmp_path / "mine.csv"
    f.write_text('sent0,sent1,hard_neg\na,b,c\nd,"e,f\n')
    p = run_cli("e5v-train", *RUN, "data=nli", f"data.loader.path={f}", f"paths.output_dir={tmp_path / 'out'}")
    line = assert_cli_error(p, "e5v-train")
    assert str(f) in line and "line 3" in line and "never closed" in line


def test_output_folder_that_cannot_be_created_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocked = tmp_path / "afile"
    blocked.write_text("")
    for prog, extra in (("e5v-train", RUN), ("e5v-eval", ("backbone=tiny", "suite=mini", "benchmarks=[sts]"))):
        p = run_cli(prog, *extra, f"paths.output_dir={blocked / 'out'}")
        line = assert_cli_error(p, prog)
        assert f"{blocked} is a file" in line and "paths.output_dir" in line, line
    from e5v.cli.hydra_run import output_dir_problem

    ro = tmp_path / "ro"
    ro.mkdir()
    assert output_dir_problem(ro / "train" / "run", "paths.output_dir") is None
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ro else real_access(p, mode))
    msg = output_dir_problem(ro / "train" / "run", "paths.output_dir")
    assert msg == (f"output folder {ro / 'train' / 'run'} cannot be created: {ro} is not writable; point "
                   "paths.output_dir at a folder you can write")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="permissions do not bind root")
@pytest.mark.parametrize("prog, extra", [("e5v-train", RUN), ("e5v-eval", ("backbone=tiny", "suite=mini"))])
def test_read_only_output_folder_console_script(tmp_path: Path, prog: str, extra: tuple) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        line = assert_cli_error(run_cli(prog, *extra, f"paths.output_dir={ro}"), prog)
    finally:
        ro.chmod(0o755)
    assert f"{ro} is not writable" in line and "paths.output_dir" in line


# ---------------------------------------------------------------- the same moves on a real run
@pytest.mark.slow
def test_real_run_edited_data_raised_steps_and_its_record(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = run_dir(out)
    csv = write_csv(tmp_path / "mine.csv")
    own = ("data=nli", f"data.loader.path={csv}", "trainer.save_every=2", "trainer.micro_batch=16", "logger=none",
           "optim.warmup_steps=1")  # steps 2-4 on the decay: a longer schedule would have given them other lrs
    run_train(out, *own, "trainer.max_steps=4")
    record = {f: (run / f).read_text() for f in ("config.yaml", ".hydra/config.yaml", ".hydra/overrides.yaml")}
    assert "lr: 0.002" in record[".hydra/config.yaml"]
    # 4: a refused re-run and a re-run with nothing to train leave the record as it was
    p = run_train(out, *own, "trainer.max_steps=4", "optim.lr=1e-4", check=False)
    assert p.returncode == 1 and "optim.lr: 0.002 -> 0.0001" in p.stderr
    assert run_train(out, *own, "trainer.max_steps=4").returncode == 0
    assert {f: (run / f).read_text() for f in record} == record
    # 5: more steps: refused, naming both lengths; allowed, it continues from lr 0 back up, and says so
    p = run_train(out, *own, "trainer.max_steps=8", check=False)
    assert p.returncode == 1 and "4-step learning-rate schedule" in p.stderr and "asks for 8 steps" in p.stderr
    # 2: the CSV edited in place: refused, then allowed
    write_csv(csv, word="triangle")
    p = run_train(out, *own, "trainer.max_steps=4", check=False)
    assert p.returncode == 1 and "trained on other data" in p.stderr, p.stderr[-2000:]
    run_train(out, *own, "trainer.max_steps=8", "allow_config_change=true")
    lrs = {m["step"]: m["train/lr"] for m in metrics(run)}
    assert lrs[4] == 0.0 and lrs[5] > 0.0  # the recomputed schedule (what the refusal warned of)
    state = json.loads((run / "checkpoints" / "step-000008" / "trainer_state.json").read_text())
    assert state["max_steps"] == 8 and state["data_identity"]["rows"] == 64
