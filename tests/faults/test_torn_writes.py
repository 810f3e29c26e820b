"""Guarantee 2, torn writes: a process killed while writing a checkpoint, an embedding-cache shard or a results
file never leaves a file that is later read as valid. Readers check sizes, checksums and fingerprints, name
the damaged file, and recompute or fall back to the previous checkpoint.

Existing: tests/eval/test_eval_cache.py::test_bad_shards_are_dropped_and_reencoded (truncated .npy, wrong
fingerprint, shape mismatch, pickled object, bad JSON record).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from e5v.train import checkpoint as ckpt
from faultkit import (
    REPO,
    SHORT,
    CountingModel,
    FakeEngine,
    checkpoint_names,
    env,
    metrics,
    minimal_results,
    run_dir,
    run_train,
    save_fake_checkpoint,
)


# ---------------------------------------------------------------------- checkpoints, end to end
@pytest.mark.slow  # make test time (76 s); `make test-faults` and `make test-all` run it
def test_kill_during_checkpoint_save_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    out = tmp_path / "out"
    p = run_train(out, "trainer.max_steps=4", *SHORT, inject="kill-before-rename:4", check=False)
    assert p.returncode == -9, p.stderr[-3000:]
    run = run_dir(out)
    # everything of step 4 was written, but it never became a checkpoint: the previous one is the newest
    assert checkpoint_names(run) == [".partial-step-000004", "step-000002"]
    assert ckpt.latest_checkpoint(run / "checkpoints") == run / "checkpoints" / "step-000002"
    killed = {r["step"]: r["train/loss"] for r in metrics(run)}
    assert sorted(killed) == [1, 2, 3, 4]
    run_train(out, "trainer.max_steps=4", *SHORT)  # resume=auto
    assert checkpoint_names(run) == ["step-000002", "step-000004"]  # the partial directory was replaced
    steps = [r["step"] for r in metrics(run)]
    assert steps == [1, 2, 3, 4]  # resumed from step 2, steps 3-4 redone (and logged once)
    for r in metrics(run)[2:]:  # ... and redone exactly (same batches, RNG, optimizer state)
        assert abs(r["train/loss"] - killed[r["step"]]) <= 1e-6
    ckpt.verify(run / "checkpoints" / "step-000004")


@pytest.mark.slow
def test_file_torn_mid_write_in_a_checkpoint_save_is_never_used(tmp_path: Path) -> None:
    out = tmp_path / "out"
    p = run_train(out, "trainer.max_steps=4", *SHORT, inject="kill-mid-write:4", check=False)
    assert p.returncode == -9, p.stderr[-3000:]
    run = run_dir(out)
    torn = run / "checkpoints" / ".partial-step-000004" / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    assert torn.is_file() and torn.stat().st_size > 0  # really half a file on disk
    assert checkpoint_names(run) == [".partial-step-000004", "step-000002"]
    killed = {r["step"]: r["train/loss"] for r in metrics(run)}
    run_train(out, "trainer.max_steps=4", *SHORT)
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]  # steps 3-4 redone, logged once
    for r in metrics(run)[2:]:
        assert abs(r["train/loss"] - killed[r["step"]]) <= 1e-6


@pytest.mark.slow
def test_damaged_newest_checkpoint_on_disk_resume_falls_back_naming_the_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    p = run_train(out, "trainer.max_steps=6", *SHORT, inject="kill-after-step:5", check=False)
    assert p.returncode == -9
    run = run_dir(out)
    assert checkpoint_names(run) == ["step-000002", "step-000004"]
    killed = {r["step"]: r["train/loss"] for r in metrics(run)}
    optim = run / "checkpoints" / "step-000004" / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[:-100])  # truncated after the fact (bad disk, copy cut short)
    p = run_train(out, "trainer.max_steps=6", *SHORT)
    log = p.stdout + p.stderr  # Hydra logs to stdout and train.log
    assert "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt" in log and "falling back" in log
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5, 6]  # resumed from step 2, not the damaged 4
    for r in metrics(run)[2:5]:
        assert abs(r["train/loss"] - killed[r["step"]]) <= 1e-6
    ckpt.verify(run / "checkpoints" / "step-000004")  # rewritten whole


# ---------------------------------------------------------------------- checkpoints: the manifest
DAMAGES = {
    "truncated adapter": ("adapter/adapter_model.safetensors", lambda b: b[:-10]),
    "truncated optimizer": ("ds/zero_pp_rank_0_mp_rank_00_optim_states.pt", lambda b: b[: len(b) // 2]),
    "flipped byte in optimizer": ("ds/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                  lambda b: b[:10] + bytes([b[10] ^ 0xFF]) + b[11:]),
    "missing rng": ("rng-rank0.safetensors", None),
    "garbage trainer_state.json": ("trainer_state.json", lambda b: b"{\"step\": 4, \"loss"),
    "garbage manifest": ("manifest.json", lambda b: b"not json"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_checkpoint_is_detected_named_and_skipped(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "checkpoints"
    save_fake_checkpoint(root, 2)
    newest = save_fake_checkpoint(root, 4)
    assert ckpt.latest_checkpoint(root) == newest
    rel, edit = DAMAGES[damage]
    f = newest / rel
    if edit is None:
        f.unlink()
    else:
        f.write_bytes(edit(f.read_bytes()))
    with pytest.raises(ckpt.CheckpointCorrupt) as err:
        ckpt.verify(newest)
    assert err.value.file == rel and str(newest) in str(err.value) and rel in str(err.value)
    with caplog.at_level(logging.WARNING, logger="e5v.train.checkpoint"):
        assert ckpt.latest_checkpoint(root) == root / "step-000002"  # falls back
        assert ckpt.resume_point(root) == root / "step-000002"
    assert rel in caplog.text and "falling back" in caplog.text
    engine = FakeEngine()
    with pytest.raises(ckpt.CheckpointCorrupt, match=rel.replace(".", r"\.")):  # an explicit resume=<path>
        ckpt.load(engine, newest)
    assert engine.loaded == []  # refused before DeepSpeed read anything


def test_evaluating_a_damaged_checkpoint_names_the_file_or_falls_back(tmp_path: Path) -> None:
    from e5v.lora import resolve_checkpoint
    from eval.model import load_checkpoint

    run = tmp_path / "run"
    save_fake_checkpoint(run / "checkpoints", 2)
    newest = save_fake_checkpoint(run / "checkpoints", 4)
    weights = newest / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])
    assert resolve_checkpoint(run) == run / "checkpoints" / "step-000002"  # checkpoint=<run dir>: the last good one
    with pytest.raises(ckpt.CheckpointCorrupt, match=r"adapter/adapter_model\.safetensors: size"):
        load_checkpoint(None, newest)  # checkpoint=<that step>: refused before the model is touched
    with pytest.raises(ckpt.CheckpointCorrupt, match=r"adapter/adapter_model\.safetensors"):
        load_checkpoint(None, newest / "adapter")


def test_every_checkpoint_damaged_means_a_fresh_start_not_a_bad_resume(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    only = save_fake_checkpoint(root, 2)
    (only / "trainer_state.json").write_text("")
    assert ckpt.latest_checkpoint(root) is None and ckpt.resume_point(root) is None


def test_checkpoints_without_a_manifest_still_load(tmp_path: Path) -> None:
    """Checkpoints written before manifests existed are accepted when their state file parses."""
    root = tmp_path / "checkpoints"
    old = save_fake_checkpoint(root, 2)
    (old / ckpt.MANIFEST).unlink()
    assert ckpt.verify(old)["step"] == 2 and ckpt.latest_checkpoint(root) == old


# ---------------------------------------------------------------------- cache shards and results files
TEAR = r'''
import fnmatch, io, os, signal, sys
import numpy as np
import e5v.data.atomic as atomic
target, n_writes = sys.argv[1], int(sys.argv[2])
seen = [0]
real = atomic.atomic_write
def tearing(path, write):
    if fnmatch.fnmatch(os.path.basename(str(path)), target):
        seen[0] += 1
        if seen[0] == n_writes:
            buf = io.BytesIO()
            write(buf)
            def half(f):
                data = buf.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real(path, half)
    return real(path, write)
atomic.atomic_write = tearing
'''

ENCODE = TEAR + r'''
import eval.cache
eval.cache.atomic_write = tearing
sys.path.insert(0, "tests/faults")
from faultkit import CountingModel
from e5v.prompts import load_prompt
from eval.cache import EmbeddingCache
from eval.encode import Encoder
Encoder(CountingModel(), load_prompt("e5v_llama3"), EmbeddingCache(sys.argv[3]), shard_size=3, progress=False).text(
    [f"sentence {i}" for i in range(10)])
'''


@pytest.mark.parametrize(("target", "n_writes", "committed"), [
    ("shard-*.npy", 3, 2),   # killed half way through the 3rd shard's array
    ("shard-*.json", 2, 1),  # the 2nd shard's array is whole, its commit record torn
])
def test_cache_shard_torn_by_a_kill_is_ignored_and_recomputed(tmp_path: Path, target: str, n_writes: int,
                                                              committed: int) -> None:
    from e5v.prompts import load_prompt
    from eval.cache import EmbeddingCache
    from eval.encode import Encoder

    cache = tmp_path / "cache"
    p = subprocess.run([sys.executable, "-c", ENCODE, target, str(n_writes), str(cache)], cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -9, p.stderr[-2000:]
    leftovers = [f.name for f in cache.rglob("*.tmp")]
    assert len(leftovers) == 1  # the torn file, never under a name a reader looks at
    assert len(list(cache.rglob("shard-*.json"))) == committed
    texts = [f"sentence {i}" for i in range(10)]
    model = CountingModel()
    out = Encoder(model, load_prompt("e5v_llama3"), EmbeddingCache(cache), shard_size=3, progress=False).text(
        texts, normalize=False)
    assert model.encoded == texts[3 * committed :]  # only what was never committed is recomputed
    fresh = Encoder(CountingModel(), load_prompt("e5v_llama3"), EmbeddingCache(tmp_path / "fresh"),
                    shard_size=3, progress=False).text(texts, normalize=False)
    np.testing.assert_array_equal(out, fresh)


WRITE_RESULTS = TEAR + r'''
import json
from pathlib import Path
sys.path.insert(0, "tests/faults")
from faultkit import minimal_results
from eval import report
report.write(minimal_results(99.0), Path(sys.argv[3]), make_plot=False)
'''


def test_results_file_torn_by_a_kill_leaves_the_previous_one(tmp_path: Path) -> None:
    from eval import report

    out = tmp_path / "run"
    report.write(minimal_results(50.0), out, make_plot=False)
    before = (out / "results.json").read_bytes()
    p = subprocess.run([sys.executable, "-c", WRITE_RESULTS, "results.json", "1", str(out)], cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -9, p.stderr[-2000:]
    assert (out / "results.json").read_bytes() == before  # the old file, whole
    assert json.loads(before)["metrics"]["sts"]["avg"] == 50.0
    assert len(list(out.glob(".results.json.*.tmp"))) == 1


def test_jsonl_line_torn_by_a_kill_stays_one_bad_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """metrics.jsonl (training) and the results history (evaluation) are appended to: a kill can cut the last
    line; the next append starts a new line, so exactly one line is unreadable and the readers skip it."""
    from omegaconf import OmegaConf

    from e5v.train.run_log import RunLogger
    from eval import report

    run = tmp_path / "train"
    logger = RunLogger(OmegaConf.create({"logger": None}), run)
    logger.log({"train/loss": 1.0}, step=1)
    logger.finish({})
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "train/lo')  # what a SIGKILL mid-write leaves
    logger = RunLogger(OmegaConf.create({"logger": None}), run)  # the resumed process
    logger.log({"train/loss": 0.5}, step=2)
    logger.finish({})
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["step"] == 1 and json.loads(lines[2])["step"] == 2
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[1])
    monkeypatch.syspath_prepend(str(REPO))
    from scripts.collect_sweep import _train_metrics

    assert _train_metrics(run)["train/loss"] == 0.5  # the sweep collector skips the torn line

    history = tmp_path / "history.jsonl"
    history.write_text('{"time": "x", "run_di')
    report.append_history(history, minimal_results(), tmp_path / "eval")
    last = history.read_text().splitlines()[-1]
    assert json.loads(last)["metrics"] == {"sts/avg": 50.0}
