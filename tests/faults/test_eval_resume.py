"""Guarantee 3, interrupted evaluation: a run stopped part way (killed, Ctrl-C) keeps every finished cache shard;
the next run encodes only the rest and reports exactly the numbers of an uninterrupted run.

Existing: tests/eval/test_eval_cache.py::test_interrupted_encoding_resumes_from_last_shard (the encoder alone,
with a fake model).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from faultkit import INJECT, REPO, env, eval_cfg, eval_overrides

BENCHMARKS = "benchmarks=[flickr30k,cirr,sts]"  # images, image+text pairs and texts
SHARD = 4


def committed_items(cache: Path) -> int:
    return sum(len(json.loads(f.read_text())["keys"]) for f in cache.rglob("shard-*.json"))


@pytest.fixture(scope="module")
def area(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    return tmp_path_factory.mktemp("evalresume")


@pytest.fixture(scope="module")
def reference(area: Path) -> dict[str, Any]:
    from eval.runner import evaluate

    cfg = eval_cfg(area, area / "mini", area / "cache-ref", BENCHMARKS, f"cache.shard_size={SHARD}")
    return evaluate(cfg, output_dir=area / "ref")


def test_interrupted_evaluation_resumes_from_the_cache_with_the_same_numbers(
    area: Path, reference: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from eval.cache import Namespace
    from eval.runner import evaluate

    cache = tmp_path / "cache"
    cfg = eval_cfg(area, area / "mini", cache, BENCHMARKS, f"cache.shard_size={SHARD}")
    real_put = Namespace.put
    commits = [0]

    def put_then_stop(self: Namespace, keys: Any, embeddings: Any) -> Any:
        out = real_put(self, keys, embeddings)
        if out is not None:
            commits[0] += 1
            if commits[0] == 5:
                raise KeyboardInterrupt("simulated stop after 5 shards")
        return out

    monkeypatch.setattr(Namespace, "put", put_then_stop)
    with pytest.raises(KeyboardInterrupt):
        evaluate(cfg, output_dir=tmp_path / "first")
    assert not (tmp_path / "first" / "results.json").exists()  # no half report
    done = committed_items(cache)
    assert done > 0
    monkeypatch.setattr(Namespace, "put", real_put)
    resumed = evaluate(cfg, output_dir=tmp_path / "second")
    assert resumed["metrics"] == reference["metrics"]  # the same numbers, exactly
    assert resumed["cache"]["cached"] == reference["cache"]["cached"] + done
    assert resumed["cache"]["encoded"] == reference["cache"]["encoded"] - done
    print(f"\ninterrupted after {done} of {reference['cache']['encoded']} items; the resumed run encoded "
          f"{resumed['cache']['encoded']}; {len(resumed['metrics_flat'])} metrics identical to the reference")


@pytest.mark.slow
def test_evaluation_killed_with_sigkill_resumes_with_the_same_numbers(
    area: Path, reference: dict[str, Any], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    args = eval_overrides(area, area / "mini", cache, BENCHMARKS, f"cache.shard_size={SHARD}")
    killed = subprocess.run(
        [sys.executable, str(INJECT), "eval", *args, f"hydra.run.dir={tmp_path / 'first'}"],
        cwd=REPO, env=env({"E5V_INJECT": "kill-after-shards:6"}), capture_output=True, text=True, timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert len(list(cache.rglob("shard-*.json"))) == 6 and not (tmp_path / "first" / "results.json").exists()
    done = committed_items(cache)
    again = subprocess.run(
        [sys.executable, "-m", "eval.cli", *args, f"hydra.run.dir={tmp_path / 'second'}"],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    res = json.loads((tmp_path / "second" / "results.json").read_text())
    assert res["metrics"] == reference["metrics"]
    assert res["cache"]["encoded"] == reference["cache"]["encoded"] - done
