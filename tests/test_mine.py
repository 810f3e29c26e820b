"""e5v-mine (eval.mining): hard negatives against an independent brute-force search, the two filters, the run
folder (rerun skips, other params refuse, overwrite), the CLI, and 1 vs 2 processes byte-identical.

Run: .venv/bin/python -m pytest -q tests/test_mine.py   (~40 s on 2 cores, the torchrun run ~20 s of it)
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from e5v.data.contrastive import MMEB_TEMPLATES, ContrastiveRows, Item
from e5v.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
WORDS = "red blue green yellow black white small large round square dog cat bird car tree house".split()


# ------------------------------------------------------------------ data: a loader the data node instantiates
def load_rows(path: str, image_root: str | None = None, name: str = "rows") -> ContrastiveRows:
    """``_target_`` of the test data node: rows from a JSON list of {"q": item, "pos": [items]}."""
    raw = json.loads(Path(path).read_text())

    def it(d: dict[str, Any]) -> Item:
        img = d.get("image")
        return Item(text=d.get("text", ""), image=f"{image_root}/{img}" if img else None,
                    instruction=d.get("instruction", ""))

    return ContrastiveRows(name=name, queries=[it(r["q"]) for r in raw], positives=[[it(p) for p in r["pos"]] for r in raw],
                           negatives=[[] for _ in raw], source=str(path), templates=dict(MMEB_TEMPLATES),
                           image_root=image_root, ids=[f"{name}:{i}" for i in range(len(raw))])


def write_world(tmp: Path, n: int = 16) -> Path:
    """Text queries (with an instruction), 1-2 text positives, rows 2 and 3 sharing a positive, two image
    positives; images under tmp/data/images."""
    from PIL import Image

    rng = random.Random(0)
    img_dir = tmp / "data" / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        arr = np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(arr).save(img_dir / f"im{i}.png")
    rows = []
    for i in range(n):
        pos = [{"text": " ".join(rng.sample(WORDS, 5))}]
        if i % 4 == 0:
            pos.append({"text": " ".join(rng.sample(WORDS, 3))})
        rows.append({"q": {"text": " ".join(rng.sample(WORDS, 4)), "instruction": "Find a match."}, "pos": pos})
    rows[3]["pos"] = [dict(rows[2]["pos"][0])]  # a shared positive: one pool item, equal for both rows
    rows[5]["pos"] = [{"image": "im0.png"}]
    rows[6]["pos"] = [{"image": "im1.png", "text": "a photo"}]
    f = tmp / "data" / "rows.json"
    f.write_text(json.dumps(rows))
    return f


def overrides(tmp: Path, rows_file: Path, *extra: str) -> list[str]:
    return ["backbone=tiny", "embedder.dtype=float32", "embedder.batch_size=4", "cache.shard_size=8",
            f"paths.output_dir={tmp / 'out'}", f"paths.data_dir={tmp / 'data'}", "+data.name=rows",
            "+data.loader._target_=test_mine.load_rows", f"+data.loader.path={rows_file}",
            f"+data.loader.image_root={rows_file.parent / 'images'}", "progress=false", *extra]


def run_mine(tmp: Path, rows_file: Path, *extra: str) -> dict[str, Any]:
    from e5v.config import compose
    from eval.mining import mine

    return mine(compose("mine", overrides(tmp, rows_file, *extra)))


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


# ------------------------------------------------------------------ independent reference
def cached_embeddings(cfg_overrides: list[str], rows: ContrastiveRows, pool: list[Item]) -> tuple[np.ndarray, ...]:
    """The mined run's embeddings, read back from the embedding cache (same encoder, same bits): queries, pool."""
    from e5v.config import compose
    from e5v.prompts import PromptSet
    from eval.cache import EmbeddingCache
    from eval.encode import Encoder, ImageRef
    from eval.model import ModelHandle

    cfg = compose("mine", cfg_overrides)
    assert cfg.prompt.mmeb.instruction == "drop"  # what one() below renders
    model = ModelHandle(cfg, memo_dir=Path(cfg.cache.dir))
    enc = Encoder(model, PromptSet.from_config(cfg.prompt), EmbeddingCache(Path(cfg.cache.dir)), progress=False)

    def one(it: Item) -> np.ndarray:  # the e5v_llama3 prompt drops the instruction (mmeb.instruction: drop)
        if it.image is None:
            return enc.text([it.text], template="mmeb_text")[0]
        ref = ImageRef(path=Path(it.image), label=it.image)
        if it.text:
            return enc.interleaved([(ref, it.text)], template="mmeb_pair")[0]
        return enc.image([ref], template="mmeb_image")[0]

    stats_before = enc.total_stats()
    q = np.stack([one(x) for x in rows.queries]).astype(np.float64)
    p = np.stack([one(x) for x in pool]).astype(np.float64)
    assert enc.total_stats()["encoded"] == stats_before["encoded"] == 0  # everything came from the mined run's cache
    return q, p


def brute_force(q: np.ndarray, pool: np.ndarray, pool_keys: list[tuple], positives: list[list[tuple]],
                pos_vecs: list[np.ndarray], k: int, ratio: float | None, min_rank: int, search_k: int
                ) -> tuple[list[list[int]], list[list[float]], list[float], dict[str, int]]:
    """The selection rule written out with numpy: full score matrix, stable sort, the filters in order."""
    counts = {"dropped_equal": 0, "dropped_ratio": 0, "short_rows": 0}
    ids, scores, pos_scores = [], [], []
    for i in range(len(q)):
        s = pool @ q[i]
        order = sorted(range(len(s)), key=lambda j: (-s[j], j))[:search_k]
        ps = float(max(v @ q[i] for v in pos_vecs[i]))
        pos_scores.append(ps)
        kept, survivors = [], 0
        for j in order:
            if pool_keys[j] in positives[i]:
                counts["dropped_equal"] += 1
                continue
            if ratio is not None and s[j] > ratio * ps:
                counts["dropped_ratio"] += 1
                continue
            survivors += 1
            if survivors > min_rank and len(kept) < k:
                kept.append(j)
        ids.append(kept)
        scores.append([float(s[j]) for j in kept])
        counts["short_rows"] += len(kept) < k
    return ids, scores, pos_scores, counts


def key(it: Item, root: str) -> tuple:
    img = None if it.image is None else os.path.relpath(it.image, root)
    return it.text, img, it.instruction


def check_against_reference(mined: list[dict[str, Any]], exp_ids: list[list[int]], exp_scores: list[list[float]],
                            exp_pos: list[float], pool: list[Item], root: str) -> None:
    assert len(mined) == len(exp_ids)
    for i, (line, ids, sc, ps) in enumerate(zip(mined, exp_ids, exp_scores, exp_pos)):
        assert line["id"] == f"rows:{i}"
        got = [(n["text"], n["image"], n["instruction"]) for n in line["negatives"]]
        want = [key(pool[j], root) for j in ids]
        assert len(got) == len(want) and np.allclose(line["scores"], sc, atol=2e-5), (i, line["scores"], sc)
        # float32 FAISS vs float64 numpy: equal lists, or two candidates tied within 2e-5 swapped
        for pos in (t for t in range(len(got)) if got[t] != want[t]):
            assert any(abs(sc[pos] - sc[o]) < 2e-5 for o in range(len(sc)) if o != pos), (i, got, want, sc)
        assert line["scores"] == sorted(line["scores"], reverse=True)
        assert abs(line["positive_score"] - ps) < 2e-5


def unique_positives(rows: ContrastiveRows) -> list[Item]:
    seen: dict[tuple, Item] = {}
    for ps in rows.positives:
        for p in ps:
            seen.setdefault((p.text, p.image, p.instruction), p)
    return list(seen.values())


# ------------------------------------------------------------------ the selection on its own
def test_select_negatives_filters_by_hand() -> None:
    from eval.mining import MineParams, select_negatives

    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5], [0.95, 0.5, 0.4, -1.0, -1.0]], np.float32)
    ids = np.array([[3, 0, 4, 1, 2], [2, 0, 1, -1, -1]])
    pos_scores = np.array([0.84, 0.9], np.float32)
    # row 0: 3 equals a positive; ratio 0.95 * 0.84 = 0.798 drops 0 (0.8); min_rank 1 skips 4; keeps 1, 2
    sel = select_negatives(scores, ids, pos_scores, [{3}, set()], MineParams(k=2, max_score_ratio=0.95, min_rank=1))
    assert sel.ids[0] == [1, 2] and sel.scores[0] == pytest.approx([0.6, 0.5])
    # row 1: 2 above 0.855; 0 skipped by min_rank; keeps 1 only -> short
    assert sel.ids[1] == [1]
    assert sel.counts == {"rows": 2, "short_rows": 1, "dropped_equal": 1, "dropped_ratio": 2, "skipped_rank": 2}
    off = select_negatives(scores, ids, pos_scores, [{3}, set()], MineParams(k=3, max_score_ratio=None))
    assert off.ids == [[0, 4, 1], [2, 0, 1]] and off.counts["dropped_ratio"] == 0
    with pytest.raises(ConfigError, match="k must be"):
        MineParams(k=0)


# ------------------------------------------------------------------ end to end, one process
def test_mined_negatives_equal_brute_force_and_filters(tmp_path: Path) -> None:
    rows_file = write_world(tmp_path)
    root = str(rows_file.parent / "images")
    rows = load_rows(str(rows_file), root)
    # k=3, ratio off: only the equal-to-positive filter
    rec = run_mine(tmp_path, rows_file, "k=3", "max_score_ratio=null")
    out = tmp_path / "out" / "mined" / "rows"
    pool = unique_positives(rows)
    q, p = cached_embeddings(overrides(tmp_path, rows_file), rows, pool)
    keys = [key(it, root) for it in pool]
    positives = [[key(x, root) for x in ps] for ps in rows.positives]
    pos_vecs = [[p[keys.index(k)] for k in ks] for ks in positives]
    search_k = min(3 * 4 + 2, len(pool))
    ids, sc, ps, counts = brute_force(q, p, keys, positives, pos_vecs, 3, None, 0, search_k)
    check_against_reference(read_lines(out / "rows.jsonl"), ids, sc, ps, pool, root)
    d = rec["per_dataset"]["rows"]
    assert d["dropped_equal"] == counts["dropped_equal"] == 16  # every row's own positives (rows 2/3: the shared one)
    assert d["dropped_ratio"] == 0 and d["short_rows"] == 0 and d["search_k"] == search_k
    lines = read_lines(out / "rows.jsonl")
    shared = key(rows.positives[2][0], root)
    assert all(tuple(n.values()) != shared for i in (2, 3) for n in lines[i]["negatives"])
    images = {n["image"] for line in lines for n in line["negatives"]} - {None}
    assert images <= {"im0.png", "im1.png"}  # relative to the image root
    # a ratio between two observed candidate/positive ratios: drops exactly the brute force's candidates
    cand = sorted({float(p[j] @ q[i]) / ps[i] for i in range(len(q)) for j in range(len(p))
                   if keys[j] not in positives[i]})
    gaps = [(cand[t + 1] - cand[t], t) for t in range(len(cand) // 3, 2 * len(cand) // 3)]
    _, t = max(gaps)
    ratio = round((cand[t] + cand[t + 1]) / 2, 7)
    rec = run_mine(tmp_path, rows_file, "k=3", f"max_score_ratio={ratio}", "min_rank=1", "overwrite=true")
    ids, sc, ps, counts = brute_force(q, p, keys, positives, pos_vecs, 3, ratio, 1, search_k)
    check_against_reference(read_lines(out / "rows.jsonl"), ids, sc, ps, pool, root)
    d = rec["per_dataset"]["rows"]
    assert d["dropped_ratio"] == counts["dropped_ratio"] > 0
    assert d["dropped_equal"] == counts["dropped_equal"]
    assert d["short_rows"] == counts["short_rows"] > 0  # the ratio leaves some rows short: counted, kept
    assert all(s <= ratio * line["positive_score"] + 1e-5 for line in read_lines(out / "rows.jsonl")
               for s in line["scores"])
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["params"] == {"k": 3, "search_k": None, "max_score_ratio": ratio, "min_rank": 1}
    assert prov["pool"] == "positives" and prov["data"]["rows"]["rows"] == 16
    assert prov["checkpoint"]["model_fingerprint"] and prov["prompt"]["name"]


def test_pool_file_equal_items_and_relative_images(tmp_path: Path) -> None:
    rows_file = write_world(tmp_path, n=8)
    root = str(rows_file.parent / "images")
    rows = load_rows(str(rows_file), root)
    pos0 = rows.positives[0][0]
    pool_items = [{"text": pos0.text}, {"text": pos0.text, "instruction": "Other."}, {"image": "im2.png"},
                  {"text": "tree house", "image": "im2.png"}, {"text": "green dog"}, {"text": "green dog"},
                  {"text": "small red car"}]
    pool_file = tmp_path / "pool.jsonl"
    pool_file.write_text("".join(json.dumps(x) + "\n" for x in pool_items))
    run_mine(tmp_path, rows_file, "k=6", "max_score_ratio=null", f"pool={pool_file}")
    lines = read_lines(tmp_path / "out" / "mined" / "rows" / "rows.jsonl")
    row0 = [tuple(n.values()) for n in lines[0]["negatives"]]
    assert (pos0.text, None, "") not in row0  # equal to row 0's positive: dropped
    assert (pos0.text, None, "Other.") in row0  # another instruction: another item, kept
    assert len(row0) == 5  # 6 unique pool items, one equal -> short of k=6
    assert ("", "im2.png", "") in row0 and ("tree house", "im2.png", "") in row0
    assert all(len(line["negatives"]) == 6 for line in lines[1:])  # other rows: every unique pool item
    # the training side reads the folder back (e5v.data.contrastive.attach_mined): the same items, images resolved
    from e5v.data.contrastive import attach_mined

    back = attach_mined(rows, tmp_path / "out" / "mined" / "rows")
    for line, negs in zip(lines, back.negatives):
        assert [(n.text, None if n.image is None else os.path.relpath(n.image, root), n.instruction) for n in negs] \
            == [tuple(x.values()) for x in line["negatives"]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"txt": "b"}\n')
    from e5v.errors import DataError

    with pytest.raises(DataError, match=r"bad.jsonl line 2: unknown key\(s\) \['txt'\]"):
        run_mine(tmp_path, rows_file, f"pool={bad}", "overwrite=true")


def test_rerun_skips_and_other_params_refuse(tmp_path: Path) -> None:
    rows_file = write_world(tmp_path, n=8)
    tiny = "max_score_ratio=null"  # the tiny model's cosines are all ~0.98: the default 0.95 would drop every candidate
    run_mine(tmp_path, rows_file, tiny)
    f = tmp_path / "out" / "mined" / "rows" / "rows.jsonl"
    prov = f.parent / "provenance.json"
    before = [(x.read_bytes(), x.stat().st_mtime_ns) for x in (f, prov)]
    rec = run_mine(tmp_path, rows_file, tiny)
    assert [(x.read_bytes(), x.stat().st_mtime_ns) for x in (f, prov)] == before  # skipped: nothing rewritten
    assert rec["per_dataset"]["rows"]["rows"] == 8
    with pytest.raises(ConfigError, match=r"mined with other params .*overwrite=true") as err:
        run_mine(tmp_path, rows_file, tiny, "k=2")
    assert "\n" not in str(err.value)
    data = json.loads(rows_file.read_text())
    data[0]["q"]["text"] = "changed query"
    rows_file.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="mined with other data"):
        run_mine(tmp_path, rows_file, tiny)
    rec = run_mine(tmp_path, rows_file, tiny, "k=2", "overwrite=true")
    assert all(len(x["negatives"]) == 2 for x in read_lines(f)) and rec["params"]["k"] == 2
    f.write_text(f.read_text().replace("rows:0", "rows:X"))  # edited by hand: mined again
    run_mine(tmp_path, rows_file, tiny, "k=2")
    assert read_lines(f)[0]["id"] == "rows:0"


def test_nli_triplets_mined_as_the_trainer_sees_them(tmp_path: Path) -> None:
    """data=mini_nli (Triplets): rows through as_rows (ids <source stem>:<i>, the ``train`` template)."""
    from e5v.config import compose, instantiate
    from e5v.data.contrastive import as_rows
    from eval.mining import mine

    cfg = compose("mine", ["backbone=tiny", "embedder.dtype=float32", "data=mini_nli", "data.loader.n_rows=24",
                           f"paths.data_dir={tmp_path / 'data'}", f"paths.output_dir={tmp_path / 'out'}",
                           "max_score_ratio=null", "k=2", "progress=false"])
    rec = mine(cfg)
    rows = as_rows(instantiate(cfg.data.loader))
    assert rows.templates == {"text": "train"} and list(rec["per_dataset"]) == [rows.name]
    lines = read_lines(tmp_path / "out" / "mined" / "mini_nli" / f"{rows.name}.jsonl")
    assert [x["id"] for x in lines] == rows.ids
    for line, pos in zip(lines, rows.positives):
        assert len(line["negatives"]) == 2 and all(n["text"] != pos[0].text for n in line["negatives"])


# ------------------------------------------------------------------ CLI
def _env(tmp: Path, cache: str = "cache") -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", E5V_NO_PROGRESS="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", E5V_CACHE=str(tmp / cache),
               PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def test_cli_help_and_one_line_errors(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "eval.mining", "--help"], cwd=REPO, env=_env(tmp_path),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "e5v-mine" in p.stdout and "max_score_ratio" in p.stdout
    p = subprocess.run([sys.executable, "-m", "eval.mining", "backbone=tiny", "data=nli",
                        f"paths.data_dir={tmp_path / 'nothing'}", f"paths.output_dir={tmp_path / 'out'}"],
                       cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    err = [x for x in p.stderr.splitlines() if x.strip() and not x.startswith("log: ")]  # (the log file's line)
    assert len(err) == 1 and err[0].startswith("e5v-mine: error: ") and "nli_for_simcse.csv" in err[0], p.stderr
    p = subprocess.run([sys.executable, "-m", "eval.mining", "backbone=tiny", f"paths.output_dir={tmp_path / 'out'}"],
                       cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    err = [x for x in p.stderr.splitlines() if x.strip() and not x.startswith("log: ")]
    assert p.returncode == 1 and len(err) == 1 and "choose data=" in err[0], p.stderr
    text = (REPO / "pyproject.toml").read_text()
    assert 'e5v-mine = "eval.mining:main"' in text


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_one_and_two_processes_write_identical_files(tmp_path: Path) -> None:
    rows_file = write_world(tmp_path, n=24)
    outs = {}
    for nproc in (1, 2):
        args = [a for a in overrides(tmp_path, rows_file, "k=3", f"out_dir={tmp_path / f'run{nproc}'}")
                if not a.startswith("paths.output_dir")]
        args += [f"paths.output_dir={tmp_path / f'out{nproc}'}", "embedder.device=cpu"]
        launch = ([sys.executable, "-m", "eval.mining"] if nproc == 1 else
                  [str(VENV_BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={_free_port()}", "-m", "eval.mining"])
        p = subprocess.run([*launch, *args], cwd=REPO, env=_env(tmp_path, f"cache{nproc}"), capture_output=True,
                           text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-4000:]
        outs[nproc] = tmp_path / f"run{nproc}"
    a, b = (outs[n] / "rows.jsonl" for n in (1, 2))
    assert a.read_bytes() == b.read_bytes()
    pa, pb = (json.loads((outs[n] / "provenance.json").read_text()) for n in (1, 2))
    for k in ("checkpoint", "prompt", "data", "pool", "params"):
        assert pa[k] == pb[k], k
    assert pa["per_dataset"]["rows"]["sha256"] == pb["per_dataset"]["rows"]["sha256"]
    # the embeddings themselves, bitwise: each run encoded into its own cache (rounded scores could hide a
    # difference; sharding item by item, as e5v-eval does, changes 6e-7 here and there on this data)
    one, two = (cached_rows(tmp_path / f"cache{n}" / "embeddings") for n in (1, 2))
    assert len(one) > 50 and one.keys() == two.keys()
    assert [k for k in one if not np.array_equal(one[k], two[k])] == []


def cached_rows(root: Path) -> dict[tuple[str, str], np.ndarray]:
    """Every cached embedding by (prompt folder, item key), read from the shard files."""
    out = {}
    for meta in root.rglob("shard-*.json"):
        record = json.loads(meta.read_text())
        arr = np.load(meta.with_suffix(".npy"), allow_pickle=False)
        out.update({(meta.parent.name, k): row for k, row in zip(record["keys"], arr)})
    return out
