"""Guarantee 9, disk full: a write that fails with ENOSPC leaves the previous files intact (no temporary file
left behind, nothing half-written under a final name) and raises an error that names what could not be
written. The fault is injected by patching the writer (the file object fills up after a byte budget).
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest

from e5v.train import checkpoint as ckpt
from faultkit import (
    SHORT,
    CountingModel,
    DiskFullOs,
    FakeEngine,
    FullFile,
    checkpoint_names,
    fake_adapter,
    metrics,
    minimal_results,
    run_dir,
    run_train,
    save_fake_checkpoint,
)


def test_atomic_write_on_a_full_disk_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from e5v.data.atomic import atomic_write_text

    target = tmp_path / "state.json"
    atomic_write_text(target, '{"version": 1}\n')
    monkeypatch.setattr("e5v.data.atomic.os", DiskFullOs(budget=5))
    with pytest.raises(OSError) as err:
        atomic_write_text(target, '{"version": 2, "padding": "' + "x" * 1000 + '"}\n')
    assert err.value.errno == errno.ENOSPC and str(target) in str(err.value)
    assert target.read_text() == '{"version": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # the temporary file was removed


def test_results_json_on_a_full_disk_keeps_the_previous_report(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from eval import report

    report.write(minimal_results(50.0), tmp_path, make_plot=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr("e5v.data.atomic.os", DiskFullOs(budget=100))
    with pytest.raises(OSError, match=r"could not write .*results\.json") as err:
        report.write(minimal_results(99.0), tmp_path, make_plot=False)
    assert err.value.errno == errno.ENOSPC
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_cache_shard_on_a_full_disk_keeps_earlier_shards_and_resumes(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from e5v.prompts import load_prompt
    from eval.cache import EmbeddingCache
    from eval.encode import Encoder

    prompt = load_prompt("e5v_llama3")
    texts = [f"sentence {i}" for i in range(9)]
    enc = Encoder(CountingModel("d" * 64), prompt, EmbeddingCache(tmp_path), shard_size=3, progress=False)
    enc.text(texts[:3])  # one shard on disk
    committed = {p: p.read_bytes() for p in tmp_path.rglob("shard-*")}
    monkeypatch.setattr("e5v.data.atomic.os", DiskFullOs(budget=64))
    with pytest.raises(OSError, match=r"could not write .*shard-[0-9a-f]+\.npy") as err:
        enc.text(texts)
    assert err.value.errno == errno.ENOSPC
    assert {p: p.read_bytes() for p in tmp_path.rglob("shard-*")} == committed  # untouched, nothing new
    assert not list(tmp_path.rglob("*.tmp"))
    monkeypatch.undo()
    model = CountingModel("d" * 64)
    out = Encoder(model, prompt, EmbeddingCache(tmp_path), shard_size=3, progress=False).text(texts, normalize=False)
    assert model.encoded == texts[3:]  # the disk has room again: only the rest is encoded
    fresh = Encoder(CountingModel("d" * 64), prompt, EmbeddingCache(tmp_path / "fresh"), shard_size=3, progress=False)
    np.testing.assert_array_equal(out, fresh.text(texts, normalize=False))


@pytest.mark.parametrize("where", ["deepspeed state", "adapter", "trainer_state.json"])
def test_checkpoint_on_a_full_disk_keeps_the_previous_one(tmp_path: Path, where: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "checkpoints"
    previous = save_fake_checkpoint(root, 2)
    def full_adapter(out: Path) -> None:
        out.mkdir(parents=True)
        with open(out / "adapter_model.safetensors", "wb") as f:
            FullFile(f, budget=10).write(b"w" * 100)

    engine, write_adapter = FakeEngine(), fake_adapter
    if where == "deepspeed state":
        engine = FakeEngine(fail=OSError(errno.ENOSPC, "No space left on device"))
    elif where == "adapter":
        write_adapter = full_adapter
    else:
        monkeypatch.setattr("e5v.data.atomic.os", DiskFullOs(budget=8))
    state = {"step": 4, "max_steps": 10, "world_size": 1, "losses": [1.0] * 4}
    with pytest.raises(ckpt.CheckpointWriteError) as err:
        ckpt.save(engine, root, 4, state, write_adapter)
    msg = str(err.value)
    assert err.value.errno == errno.ENOSPC
    assert str(root / "step-000004") in msg and str(previous) in msg and "is intact" in msg
    monkeypatch.undo()
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"]  # partial directory removed: space freed
    ckpt.verify(previous)
    assert ckpt.latest_checkpoint(root) == previous


def test_metrics_log_on_a_full_disk_names_the_file_and_keeps_earlier_lines(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from e5v.train.run_log import RunLogger

    logger = RunLogger(OmegaConf.create({"logger": None}), tmp_path)
    logger.log({"train/loss": 1.0}, step=1)
    real = logger.metrics_file
    logger.metrics_file = FullFile(real, budget=0)  # type: ignore[assignment]
    with pytest.raises(OSError, match=r"could not append step 2 to .*metrics\.jsonl") as err:
        logger.log({"train/loss": 0.5}, step=2)
    assert err.value.errno == errno.ENOSPC
    real.close()
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]


@pytest.mark.slow
def test_training_on_a_full_disk_stops_clearly_and_resumes_when_there_is_room(tmp_path: Path) -> None:
    out = tmp_path / "out"
    p = run_train(out, "trainer.max_steps=4", *SHORT, inject="enospc-in-save:4", check=False)
    assert p.returncode != 0
    assert "could not write checkpoint" in p.stderr and "step-000004" in p.stderr
    assert "No space left on device" in p.stderr and "step-000002 is intact" in p.stderr
    run = run_dir(out)
    assert checkpoint_names(run) == ["step-000002"]
    ckpt.verify(run / "checkpoints" / "step-000002")
    run_train(out, "trainer.max_steps=4", *SHORT)  # space freed: the same command continues
    assert checkpoint_names(run) == ["step-000002", "step-000004"]
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]  # steps 3-4 redone, logged once
