"""Margins for the replication claims, from the recorded three-seed run (docs/replication_results.json).

A claim that held in every recorded seed is asserted on a reduced run with the threshold
``max(0, mean - 3 * sd)`` of its per-seed differences: a regression that removes the effect fails,
seed-to-seed noise does not. Claims that did not hold are not asserted (see docs/replication.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RECORDED = REPO / "docs" / "replication_results.json"


def recorded() -> dict[str, Any]:
    return json.loads(RECORDED.read_text())


def held_claims() -> dict[str, dict[str, Any]]:
    return {c["claim"]: c for c in recorded()["claims"] if c["holds"]}


def threshold(claim: dict[str, Any]) -> float:
    return max(0.0, float(claim["mean"]) - 3.0 * float(claim["sd"]))


def check(found: list[dict[str, Any]], names: list[str] | None = None) -> list[str]:
    """Assert every recorded-and-held claim present in ``found`` (claims of a reduced run); return the
    names checked. ``names`` restricts to those claims."""
    ref = held_claims()
    checked, failures = [], []
    for c in found:
        name = c["claim"]
        if name not in ref or (names is not None and name not in names):
            continue
        t = threshold(ref[name])
        checked.append(name)
        if not c["min"] > t:
            failures.append(f"{name}: {c['min']:+.1f} <= threshold {t:+.1f} "
                            f"(recorded {ref[name]['mean']:+.1f} +- {ref[name]['sd']:.1f})")
    assert not failures, "claims that held in the recorded run fail now:\n" + "\n".join(failures)
    return checked
