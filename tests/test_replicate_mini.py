"""The mini-world replication (scripts/replicate_mini.py): claim arithmetic (fast), the recorded
three-seed result's consistency (fast) and a reduced re-run asserting the claims that held (slow)."""

from __future__ import annotations

import json

import pytest

from helpers import replication
from scripts import replicate_mini as R


def _metrics(v: float) -> dict:
    """A metrics dict where every column of the table scores ``v``."""
    m: dict = {}
    for _, bench, key in R.COLUMNS:
        m.setdefault(bench, {})[key] = v
    return m


def test_claims_arithmetic() -> None:
    runs = []
    for seed, (none, e5v, trained) in enumerate([(20.0, 40.0, 50.0), (22.0, 40.0, 21.0), (20.0, 39.0, 45.0)]):
        runs += [
            {"seed": seed, "prompt": "none", "phase": "before", "metrics": _metrics(none)},
            {"seed": seed, "prompt": "e5v_llama3", "phase": "before", "metrics": _metrics(e5v)},
            {"seed": seed, "prompt": "e5v_llama3", "phase": "after", "metrics": _metrics(trained)},
        ]
    chance = {c: 10.0 for c, *_ in R.COLUMNS}
    found = {c["claim"]: c for c in R.claims(runs, chance)}
    a = found["1a zero-shot: E5-V prompts vs no prompt"]
    assert a["per_seed"] == {0: 20.0, 1: 18.0, 2: 19.0} and a["mean"] == 19.0 and a["sd"] == 1.0 and a["holds"]
    assert found["1b zero-shot: E5-V prompts vs chance"]["per_seed"] == {0: 30.0, 1: 30.0, 2: 29.0}
    t = found["2a text-only training (E5-V): text-image"]
    assert t["per_seed"] == {0: 10.0, 1: -19.0, 2: 6.0} and not t["holds"] and t["min"] == -19.0
    # positive in every seed but within two standard deviations of zero: does not hold
    runs[-1]["metrics"] = _metrics(60.0)
    runs[2]["metrics"] = _metrics(41.0)
    runs[5]["metrics"] = _metrics(41.0)
    t = {c["claim"]: c for c in R.claims(runs, chance)}["2a text-only training (E5-V): text-image"]
    assert t["min"] > 0 and t["mean"] < 2 * t["sd"] and not t["holds"]
    # claims needing runs that are absent (generic prompt, Table 7) are not reported
    assert not any("generic" in n or "Table 7" in n for n in found)


def test_recorded_result_is_complete() -> None:
    """docs/replication_results.json: three seeds, every setting and phase, the claims computed from its runs."""
    rec = replication.recorded()
    assert rec["seeds"] == [0, 1, 2]
    phases = {(r["seed"], r["prompt"], r["phase"]) for r in rec["runs"]}
    for seed in (0, 1, 2):
        for _, prompt in R.SETTINGS:
            assert {(seed, prompt, "before"), (seed, prompt, "after")} <= phases
    recomputed = R.claims(rec["runs"], rec["chance"])
    assert [(c["claim"], round(c["mean"], 6)) for c in recomputed] == [
        (c["claim"], round(c["mean"], 6)) for c in rec["claims"]]
    assert rec["seconds"] < 15 * 60


@pytest.mark.slow
def test_reduced_replication_keeps_the_claims(tmp_path) -> None:
    """Seed 0, no prompt vs E5-V prompts (+ Table 7 when recorded), the recorded sizes and steps."""
    rec = replication.recorded()
    args = ["--seeds", "0", "--settings", "none", "e5v_llama3", "--steps", str(rec["steps"]), "--out", str(tmp_path)]
    if not any(r["phase"] == "pairs" for r in rec["runs"]):
        args.append("--no-table7")
    result = R.main(args)
    for f in ("table.md", "table.png", "results.json"):
        assert (tmp_path / f).is_file(), f
    assert "| chance |" in (tmp_path / "table.md").read_text()
    checked = replication.check(result["claims"])
    # zero-shot prompts vs none and vs chance, and text-only training's effect must be among them
    assert {"1a zero-shot: E5-V prompts vs no prompt", "1b zero-shot: E5-V prompts vs chance",
            "2a text-only training (E5-V): text-image"} <= set(checked), checked
    assert json.loads((tmp_path / "results.json").read_text())["seeds"] == [0]
