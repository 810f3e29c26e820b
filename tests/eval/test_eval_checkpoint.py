from __future__ import annotations

import json

import pytest

from e5v.lora import resolve_checkpoint
from eval.model import checkpoint_kind


def test_run_dir_resolves_to_newest_complete_step(tmp_path) -> None:
    run = tmp_path / "run"
    for step in (2, 4):
        d = run / "checkpoints" / f"step-{step:06d}" / "adapter"
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text("{}")
        (d.parent / "trainer_state.json").write_text(json.dumps({"step": step}))
    (run / "checkpoints" / ".partial-step-000006").mkdir()  # an interrupted save is never picked
    assert resolve_checkpoint(run) == run / "checkpoints" / "step-000004"
    assert resolve_checkpoint(run / "checkpoints") == run / "checkpoints" / "step-000004"
    assert checkpoint_kind(resolve_checkpoint(run)) == "adapter"
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    assert resolve_checkpoint(merged) == merged and checkpoint_kind(merged) == "merged"
    empty = tmp_path / "empty" / "checkpoints" / "step-000001"
    empty.mkdir(parents=True)  # no trainer_state.json: incomplete
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path / "empty")
