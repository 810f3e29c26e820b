"""What a real tiny training run and an evaluation of its checkpoint leave on disk, with W&B on (offline),
WANDB_API_KEY / HF_TOKEN set to fake secrets and secret-looking keys on the command line:

* guarantee 7: no secret appears in any file of either run directory (saved configs, run_info.json, Hydra's
  .hydra copies, results.json, W&B's offline files and logs) nor in what the processes printed;
* guarantee 4: the training CSV's bad rows are skipped and counted, in the log and in train_info.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from faultkit import REPO, env, run_dir, run_train, scan_for

pytestmark = pytest.mark.slow  # a real training run and an evaluation of it (~30 s on 2 cores)

SECRETS = {
    "WANDB_API_KEY": "wandbFAKEKEY0123456789abcdef0123456789abcd",
    "HF_TOKEN": "hf_FAKEtokenFAKEtokenFAKEtoken01",
    "cli_api_key": "cliFAKEapikey4242",
    "cli_token": "cliFAKEtoken4343",
}
CLI = [f"+logger.wandb.api_key={SECRETS['cli_api_key']}", f"+hf_token={SECRETS['cli_token']}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> dict[str, Any]:
    from e5v.mini.train_data import write_mini_nli

    base = tmp_path_factory.mktemp("outputs")
    csv = write_mini_nli(base / "nli.csv", n_rows=64)
    with open(csv, "a", encoding="utf-8") as f:
        f.write('"  ",a paraphrase,a contradiction\n')  # whitespace-only anchor
        f.write("an anchor,," + "x" + "\n")  # missing positive
        f.write("an anchor,a paraphrase," + "very long " * 600 + "\n")  # 6,000 characters
    secret_env = {"WANDB_API_KEY": SECRETS["WANDB_API_KEY"], "HF_TOKEN": SECRETS["HF_TOKEN"]}
    out = base / "out"
    train = run_train(out, "data=nli", f"data.loader.path={csv}", f"+data.loader.cache_dir={base / 'hf'}",
                      "trainer.max_steps=2", "trainer.save_every=2", "logger=wandb", *CLI, extra_env=secret_env)
    eval_dir = base / "eval"
    ev = subprocess.run(
        [sys.executable, "-m", "eval.cli", "backbone=tiny", "suite=mini", f"suite.mini.dir={base / 'mini'}",
         "suite.mini.images=4", "suite.mini.cirr_groups=2", "suite.mini.fiq_images=4", "suite.mini.sts_pairs=2",
         f"cache.dir={base / 'cache'}", f"render.cache_dir={base / 'rendered'}", "embedder.device=cpu",
         "progress=false", "report.plot=false", f"report.history={base / 'history.jsonl'}", "benchmarks=[sts]",
         f"checkpoint={run_dir(out)}", "logger=wandb", *CLI, f"hydra.run.dir={eval_dir}"],
        cwd=REPO, env=env(secret_env), capture_output=True, text=True, timeout=300,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    return {"base": base, "train": run_dir(out), "eval": eval_dir, "train_proc": train, "eval_proc": ev}


def test_no_secret_reaches_any_file_or_log(runs: dict[str, Any]) -> None:
    train, ev = runs["train"], runs["eval"]
    assert list((train / "wandb").glob("offline-run-*")) and list((ev / "wandb").glob("offline-run-*"))
    assert (train / ".hydra" / "overrides.yaml").is_file() and (ev / "results.json").is_file()
    leaks = scan_for(runs["base"], list(SECRETS.values()))
    assert not leaks, leaks
    for p in (runs["train_proc"], runs["eval_proc"]):
        printed = p.stdout + p.stderr
        assert not [s for s in SECRETS.values() if s in printed]
    # redacted, not dropped: the key is still visible, so the reader knows one was set
    assert "+logger.wandb.api_key=<redacted>" in (train / ".hydra" / "overrides.yaml").read_text()
    assert "+hf_token=<redacted>" in json.dumps(json.loads((train / "run_info.json").read_text())["argv"])
    results = json.loads((ev / "results.json").read_text())
    assert results["config"]["logger"]["wandb"]["api_key"] == "<redacted>"
    assert results["run"]["checkpoint"] is not None  # the adapter was evaluated (its manifest verified)


def test_skipped_training_rows_are_counted_in_the_log_and_train_info(runs: dict[str, Any]) -> None:
    info = json.loads((runs["train"] / "train_info.json").read_text())
    assert info["data"]["rows"] == 64
    assert info["data"]["skipped"] == {"missing": 1, "empty": 1, "too_long": 1}
    printed = runs["train_proc"].stdout + runs["train_proc"].stderr
    assert "skipped 3 bad row(s)" in printed
