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


def _mmeb(overall: float, by_dim: dict[int, float] | None = None) -> dict:
    """A stage-2 run's metrics: MMEB-mini overall and, when given, its prefix scores (``mmeb@k``)."""
    m: dict = {"mmeb": {"overall/hit@1": overall}}
    for k, v in (by_dim or {}).items():
        m[f"mmeb@{k}"] = {"overall/hit@1": v}
    return m


def test_stage2_claims_and_dimension_table(tmp_path) -> None:
    """6a-6c against hand-computed differences; the by-dimension table and the outputs from synthetic runs."""
    stage1 = [30.0, 32.0, 31.0]
    inbatch = [(40.0, {16: 30.0, 32: 35.0, 64: 38.0}), (44.0, {16: 31.0, 32: 36.0, 64: 42.0}),
               (41.0, {16: 29.0, 32: 37.0, 64: 40.0})]
    mined = [42.0, 43.0, 45.0]
    mrl = [(39.0, {16: 36.0, 32: 38.0, 64: 39.0}), (43.0, {16: 37.0, 32: 40.0, 64: 42.0}),
           (40.0, {16: 35.5, 32: 38.0, 64: 40.0})]
    runs = []
    for seed in range(3):
        e5v = {"seed": seed, "prompt": "e5v_llama3", "setting": "E5-V prompts"}
        runs += [{**e5v, "phase": "after", "metrics": {**_metrics(50.0), **_mmeb(stage1[seed])}},
                 {**e5v, "phase": "stage2", "metrics": _mmeb(*inbatch[seed]), "width": 128},
                 {**e5v, "phase": "stage2_mined", "metrics": _mmeb(mined[seed])},
                 {**e5v, "phase": "stage2_mrl", "metrics": _mmeb(*mrl[seed]), "width": 128}]
    found = {c["claim"][:2]: c for c in R.claims(runs, {})}
    expected = {"6a": [i[0] - s for i, s in zip(inbatch, stage1)],  # +10 +12 +10: mean 10.67, sd 1.15: holds
                "6b": [m - i[0] for m, i in zip(mined, inbatch)],  # +2 -1 +4: not every seed
                "6c": [m[1][16] - i[1][16] for m, i in zip(mrl, inbatch)]}  # +6 +6 +6.5
    for name, diffs in expected.items():
        c = found[name]
        assert list(c["per_seed"].values()) == pytest.approx(diffs), name
        mean = sum(diffs) / 3
        sd = (sum((d - mean) ** 2 for d in diffs) / 2) ** 0.5
        assert c["mean"] == pytest.approx(mean) and c["sd"] == pytest.approx(sd)
        assert c["holds"] == (min(diffs) > 0 and mean > 2 * sd), name
    assert found["6a"]["holds"] and not found["6b"]["holds"] and found["6c"]["holds"]
    # the table by dimension: the two models scored at every size, full width last
    rows = dict(R.dim_rows(runs))
    assert set(rows) == {R.STAGE2_PHASES["stage2"], R.STAGE2_PHASES["stage2_mrl"]}
    cells = rows[R.STAGE2_PHASES["stage2_mrl"]]
    assert list(cells) == ["16", "32", "64", "full"]
    assert cells["16"][0] == pytest.approx((36.0 + 37.0 + 35.5) / 3) and cells["full"][0] == pytest.approx(122 / 3)
    # results.json of an evaluation with matryoshka_dims: only MMEB-mini's prefix scores are kept
    res = {"matryoshka": {"width": 128, "metrics": {"16": {"mmeb": {"overall/hit@1": 1.0}, "sts": {"avg": 2.0}}}}}
    assert R.dim_metrics(res) == {"mmeb@16": {"overall/hit@1": 1.0}} and R.dim_metrics({}) == {}
    chance = {c: 10.0 for c, *_ in R.COLUMNS} | {"avg": 10.0, "MMEB-mini overall": 15.0}
    meta = {"seeds": [0, 1, 2], "steps": 40, "suite": R.MINI, "seconds": 1.0, "command": "test"}
    text = R.write_outputs(tmp_path, runs, chance, meta, [("E5-V prompts", "e5v_llama3")])
    assert "| stage 2, Matryoshka [16, 32] | 36.2 +- 0.8 | 38.7 +- 1.2 | 40.3 +- 1.5 | 40.7 +- 2.1 |" in text
    assert "128 dims (full)" in text
    rec = json.loads((tmp_path / "results.json").read_text())
    assert [r["training"] for r in rec["dims_table"]] == [R.STAGE2_PHASES["stage2"], R.STAGE2_PHASES["stage2_mrl"]]


def test_recorded_result_is_complete() -> None:
    """docs/replication_results.json: three seeds, every setting and phase, the claims computed from its runs."""
    rec = replication.recorded()
    assert rec["seeds"] == [0, 1, 2]
    phases = {(r["seed"], r["prompt"], r["phase"]) for r in rec["runs"]}
    for seed in (0, 1, 2):
        for _, prompt in R.SETTINGS:
            assert {(seed, prompt, "before"), (seed, prompt, "after")} <= phases
    if rec.get("stage2"):  # stage 2 (claims 6a-6c): three models per seed, from the seed's text-only adapter
        for seed in (0, 1, 2):
            assert {(seed, "e5v_llama3", p) for p in R.STAGE2_PHASES} <= phases
        assert {c["claim"][:2] for c in rec["claims"]} >= {"6a", "6b", "6c"}
        assert [r["training"] for r in rec["dims_table"]] == [R.STAGE2_PHASES["stage2"], R.STAGE2_PHASES["stage2_mrl"]]
    recomputed = R.claims(rec["runs"], rec["chance"])
    assert [(c["claim"], round(c["mean"], 6)) for c in recomputed] == [
        (c["claim"], round(c["mean"], 6)) for c in rec["claims"]]
    # the recorded time stays that of a CPU run (docs/replication.md states it and the machine's load)
    assert rec["seconds"] < 60 * 60


@pytest.mark.slow
def test_reduced_replication_keeps_the_claims(tmp_path) -> None:
    """Seed 0, no prompt vs E5-V prompts (+ Table 7 and stage 2 when recorded), the recorded sizes and steps."""
    rec = replication.recorded()
    args = ["--seeds", "0", "--settings", "none", "e5v_llama3", "--steps", str(rec["steps"]), "--out", str(tmp_path)]
    if not any(r["phase"] == "pairs" for r in rec["runs"]):
        args.append("--no-table7")
    if not rec.get("stage2"):
        args.append("--no-stage2")
    result = R.main(args)
    for f in ("table.md", "table.png", "results.json"):
        assert (tmp_path / f).is_file(), f
    assert "| chance |" in (tmp_path / "table.md").read_text()
    checked = replication.check(result["claims"])
    # zero-shot prompts vs none and vs chance, and text-only training's effect must be among them
    assert {"1a zero-shot: E5-V prompts vs no prompt", "1b zero-shot: E5-V prompts vs chance",
            "2a text-only training (E5-V): text-image"} <= set(checked), checked
    assert json.loads((tmp_path / "results.json").read_text())["seeds"] == [0]
