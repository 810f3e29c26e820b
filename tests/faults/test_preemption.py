"""Guarantee 1, pre-emption: a training process killed at any step and restarted loses at most the steps since
its last checkpoint, and the restarted run's losses and final adapter equal an uninterrupted run's; SIGTERM
(what SLURM sends first) writes a checkpoint of the current step before the process exits.

Fast cousins in tests/test_train.py: test_resume_after_kill_is_exact (kill at step 3, plain and GradCache)
and test_sigterm_writes_a_checkpoint_then_exits.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from faultkit import adapter, assert_same_adapter, checkpoint_names, metrics, run_dir, run_train, trainer_state

MAX_STEPS = 10
SAVE_EVERY = 3
COMMON = (f"trainer.max_steps={MAX_STEPS}", f"trainer.save_every={SAVE_EVERY}", "logger=none",
          "trainer.micro_batch=16")  # default keep_checkpoints=2: rotation is part of what is tested


def kill_points(n: int = 5) -> list[tuple[int, int]]:
    """(seed, step): the random step 1..MAX_STEPS-1 each seed draws, for the first ``n`` seeds that draw
    different steps (step MAX_STEPS is the end of the run)."""
    out: dict[int, int] = {}
    seed = 0
    while len(out) < n:
        k = random.Random(seed).randint(1, MAX_STEPS - 1)
        if k not in out.values():
            out[seed] = k
        seed += 1
    return list(out.items())


@pytest.mark.slow
def test_sigkill_at_random_steps_loses_at_most_one_interval(tmp_path: Path) -> None:
    ref_out = tmp_path / "ref"
    run_train(ref_out, *COMMON)
    ref = run_dir(ref_out)
    ref_losses = trainer_state(ref, MAX_STEPS)["losses"]
    ref_adapter = adapter(ref, MAX_STEPS)
    report = []
    worst_loss = worst_weight = 0.0
    for seed, k in kill_points():
        out = tmp_path / f"kill{seed}"
        p = run_train(out, *COMMON, inject=f"kill-after-step:{k}", check=False)
        assert p.returncode == -9, (k, p.stderr[-2000:])  # SIGKILL: no handler ran
        run = run_dir(out)
        steps_done = [r["step"] for r in metrics(run)]
        assert steps_done == list(range(1, k + 1))
        saved = [int(n.split("-")[1]) for n in checkpoint_names(run) if n.startswith("step-")]
        newest = max(saved, default=0)
        lost = k - newest
        assert 0 <= lost < SAVE_EVERY, (k, saved)  # never more than the checkpoint interval
        assert not [n for n in checkpoint_names(run) if n.startswith(".partial")]
        run_train(out, *COMMON)  # the same command again: resume=auto
        after = [r["step"] for r in metrics(run)]
        assert after == list(range(1, MAX_STEPS + 1))  # resumed right after the checkpoint, each step logged once
        losses = trainer_state(run, MAX_STEPS)["losses"]
        np.testing.assert_allclose(losses, ref_losses, atol=1e-6, rtol=0)
        final = adapter(run, MAX_STEPS)
        assert_same_adapter(ref_adapter, final)
        worst_loss = max(worst_loss, float(np.max(np.abs(np.subtract(losses, ref_losses)))))
        worst_weight = max(worst_weight, max(float((final[n] - ref_adapter[n]).abs().max()) for n in final))
        # the steps redone after the restart reproduce the ones the killed process had logged
        first = {r["step"]: r["train/loss"] for r in metrics(run)[:k]}
        redone = {r["step"]: r["train/loss"] for r in metrics(run)[k:] if r["step"] <= k}
        for s, v in redone.items():
            assert abs(first[s] - v) <= 1e-6, (s, first[s], v)
        report.append((seed, k, newest, lost))
    lost_more = [r for r in report if r[3] >= SAVE_EVERY]
    print(f"\nkilled at {len(report)} random steps {[r[1] for r in report]}; steps lost {[r[3] for r in report]}; "
          f"{len(lost_more)} runs lost more than the checkpoint interval ({SAVE_EVERY}); max |loss - reference| "
          f"{worst_loss:.1e}, max |adapter - reference| {worst_weight:.1e}")
    assert not lost_more and len(report) == 5


@pytest.mark.slow
def test_sigterm_at_a_random_step_checkpoints_it_and_resume_is_exact(tmp_path: Path) -> None:
    k = random.Random(7).randint(1, MAX_STEPS - 1)
    if k % SAVE_EVERY == 0:  # a step that is NOT a regular save point, so the SIGTERM save is the only one
        k += 1
    ref_out = tmp_path / "ref"
    run_train(ref_out, *COMMON)
    out = tmp_path / "term"
    p = run_train(out, *COMMON, inject=f"sigterm-after-step:{k}", check=False)
    assert p.returncode == 143, p.stderr[-3000:]
    assert "SIGTERM received: checkpoint written at step" in p.stderr + p.stdout
    run = run_dir(out)
    assert f"step-{k:06d}" in checkpoint_names(run)  # nothing lost at all
    assert [r["step"] for r in metrics(run)] == list(range(1, k + 1))
    run_train(out, *COMMON)
    assert [r["step"] for r in metrics(run)] == list(range(1, MAX_STEPS + 1))  # no step redone
    np.testing.assert_allclose(trainer_state(run, MAX_STEPS)["losses"],
                               trainer_state(run_dir(ref_out), MAX_STEPS)["losses"], atol=1e-6, rtol=0)
    assert_same_adapter(adapter(run_dir(ref_out), MAX_STEPS), adapter(run, MAX_STEPS))
