"""Data preparation (scripts/prepare_data.py) against fixtures in each source format, served by a local
mirror: download -> verify -> convert -> load through the REAL loaders; a second run is a no-op."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prepkit import (
    MINI_SIZES,
    REPO,
    caption_rows,
    cirr_annotations,
    coco_karpathy,
    fashioniq_sources,
    hf_caption_parquet,
    hub_path,
    nlphuji_flickr,
    senteval_tar,
    tree,
    write_manifest,
)

from e5v.mini.eval_data import generate
from eval.loaders.captions import load_captions
from eval.loaders.cirr import load_cirr
from eval.loaders.fashioniq import CATEGORIES, load_fashioniq
from eval.loaders.senteval import TASKS, load_sts
from scripts.data.fetch import MirrorFetcher
from scripts.prepare_data import parse_args, run


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("mini"), seed=5, **MINI_SIZES)


def prep(root: Path, manifest: Path, mirror: Path, *argv: str) -> tuple[int, MirrorFetcher]:
    fetcher = MirrorFetcher(mirror)
    rc = run(parse_args([*argv, "--data-root", str(root), "--manifest", str(manifest)]), fetcher)
    return rc, fetcher


def assert_noop(root: Path, manifest: Path, mirror: Path, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Second run: no download call, no file rewritten, and it says so."""
    before = tree(root)
    capsys.readouterr()
    rc, fetcher = prep(root, manifest, mirror, name)
    assert rc == 0 and fetcher.calls == []
    assert tree(root) == before
    assert "nothing to do" in capsys.readouterr().out


# ------------------------------------------------------------------------------ NLI


def nli_mirror(tmp: Path, rows: int = 40) -> Path:
    from e5v.mini.train_data import write_mini_nli

    mirror = tmp / "mirror"
    write_mini_nli(hub_path(mirror, "princeton-nlp/datasets-for-simcse", "nli_for_simcse.csv"), n_rows=rows, seed=2)
    return mirror


def test_nli_prepares_loads_through_the_training_config_and_is_idempotent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from e5v.config import compose, instantiate

    mirror, root = nli_mirror(tmp_path), tmp_path / "data"
    manifest = write_manifest(tmp_path, {"nli": {"rows": 40}})
    rc, fetcher = prep(root, manifest, mirror, "nli")
    assert rc == 0
    assert fetcher.calls == [("hub_file", "princeton-nlp/datasets-for-simcse/nli_for_simcse.csv")]
    # configs/data/nli.yaml's default path, under paths.data_dir, through the real loader
    cfg = compose("train", [f"paths.data_dir={root}"])
    triplets = instantiate(cfg.data.loader)
    assert len(triplets) == 40 and triplets.negatives is not None
    marker = json.loads((root / "nli" / ".complete").read_text())
    assert marker["counts"] == {"rows": 40} and marker["manifest_version"] == 1
    lock = json.loads((root / ".manifest-lock.json").read_text())["datasets"]["nli"]["hub"]
    assert lock["counts"] == {"rows": 40}
    assert len(lock["files"]["nli_for_simcse.csv"]["sha256"]) == 64
    assert not (root / ".downloads" / "nli").exists() and not (root / ".staging" / "nli").exists()
    assert_noop(root, manifest, mirror, "nli", capsys)


def test_count_mismatch_fails_and_leaves_nothing_in_place(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mirror, root = nli_mirror(tmp_path), tmp_path / "data"
    rc, _ = prep(root, write_manifest(tmp_path, {"nli": {"rows": 41}}), mirror, "nli")
    out = capsys.readouterr().out
    assert rc == 1 and "rows = 40, the manifest expects 41" in out
    assert not (root / "nli").exists()


def test_lock_catches_a_changed_upstream_file_and_relock_accepts_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mirror, root = nli_mirror(tmp_path), tmp_path / "data"
    manifest = write_manifest(tmp_path, {"nli": {"rows": {"min": 10, "max": 100}}})
    assert prep(root, manifest, mirror, "nli")[0] == 0
    src = hub_path(mirror, "princeton-nlp/datasets-for-simcse", "nli_for_simcse.csv")
    src.write_text(src.read_text() + "an anchor,a positive,a negative\n")
    capsys.readouterr()
    rc, _ = prep(root, manifest, mirror, "nli", "--force")
    out = capsys.readouterr().out
    assert rc == 1 and "differs from the first run's" in out and ".manifest-lock.json" in out
    assert len((root / "nli" / "nli_for_simcse.csv").read_text().splitlines()) == 41  # old copy kept
    rc, _ = prep(root, manifest, mirror, "nli", "--force", "--relock")
    assert rc == 0 and len((root / "nli" / "nli_for_simcse.csv").read_text().splitlines()) == 42
    lock = json.loads((root / ".manifest-lock.json").read_text())["datasets"]["nli"]["hub"]
    assert lock["counts"] == {"rows": 41}
    # --check re-verifies offline: a truncated file no longer matches the lock
    csv_path = root / "nli" / "nli_for_simcse.csv"
    csv_path.write_text("\n".join(csv_path.read_text().splitlines()[:-1]) + "\n")
    capsys.readouterr()
    rc, fetcher = prep(root, manifest, mirror, "nli", "--check")
    assert rc == 1 and fetcher.calls == [] and "rows = 40, but the first run recorded 41" in capsys.readouterr().out


def test_existing_copy_is_adopted_or_protected_and_stale_staging_is_cleaned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mirror, root = nli_mirror(tmp_path), tmp_path / "data"
    manifest = write_manifest(tmp_path, {"nli": {"rows": 40}})
    (root / "nli").mkdir(parents=True)
    shutil.copy(hub_path(mirror, "princeton-nlp/datasets-for-simcse", "nli_for_simcse.csv"), root / "nli")
    rc, fetcher = prep(root, manifest, mirror, "nli")
    assert rc == 0 and fetcher.calls == [] and "found an existing copy" in capsys.readouterr().out
    # a hand-made folder that does not verify is never overwritten without --force
    (root / "nli" / ".complete").unlink()
    (root / "nli" / "nli_for_simcse.csv").write_text("a,b\nx,y\n")
    rc, fetcher = prep(root, manifest, mirror, "nli")
    assert rc == 1 and fetcher.calls == [] and "--force" in capsys.readouterr().out
    assert (root / "nli" / "nli_for_simcse.csv").read_text() == "a,b\nx,y\n"
    # an interrupted earlier conversion left a staging folder: it is discarded
    (root / ".staging" / "nli").mkdir(parents=True)
    (root / ".staging" / "nli" / "half-written.tmp").write_text("junk")
    rc, _ = prep(root, manifest, mirror, "nli", "--force")
    assert rc == 0 and not (root / ".staging" / "nli").exists()
    assert sorted(p.name for p in (root / "nli").iterdir()) == [".complete", "nli_for_simcse.csv"]


def test_manifest_version_bump_reverifies_and_rebuilds_only_what_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mirror, root = nli_mirror(tmp_path), tmp_path / "data"
    manifest = write_manifest(tmp_path, {"nli": {"rows": 40}})
    assert prep(root, manifest, mirror, "nli")[0] == 0
    m = json.loads(manifest.read_text())
    m["version"] = 2
    manifest.write_text(json.dumps(m))
    rc, fetcher = prep(root, manifest, mirror, "nli")  # stale marker, data still verifies: adopted
    assert rc == 0 and fetcher.calls == [] and "prepared under manifest v1, now v2" in capsys.readouterr().out
    assert json.loads((root / "nli" / ".complete").read_text())["manifest_version"] == 2
    m["version"] = 3
    m["datasets"]["nli"]["counts"] = {"rows": {"min": 35, "max": 45}}
    manifest.write_text(json.dumps(m))
    (root / "nli" / "nli_for_simcse.csv").write_text("sent0,sent1,hard_neg\n" + "a,b,c\n" * 20)  # now too short
    (root / ".manifest-lock.json").unlink()
    rc, fetcher = prep(root, manifest, mirror, "nli")  # ours (stale marker) and failing: rebuilt from the source
    assert rc == 0 and len(fetcher.calls) == 1 and "no longer verifies" in capsys.readouterr().out
    assert len((root / "nli" / "nli_for_simcse.csv").read_text().splitlines()) == 41


# ------------------------------------------------------------------------------ SentEval


def test_senteval_tar_extracts_sts_and_sick_only(tmp_path: Path, mini: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mirror, root = tmp_path / "mirror", tmp_path / "data"
    senteval_tar(mirror, mini)
    expected = {t: len(load_sts(mini / "senteval", t)) for t in TASKS}
    manifest = write_manifest(tmp_path, {"senteval": expected})
    rc, _ = prep(root, manifest, mirror, "sts")  # alias
    assert rc == 0
    assert sorted(p.name for p in (root / "senteval").iterdir()) == [".complete", "SICK", "STS"]
    for t in TASKS:
        got, want = load_sts(root / "senteval", t), load_sts(mini / "senteval", t)
        assert (got.sent_a, got.gold) == (want.sent_a, want.gold)
    assert_noop(root, manifest, mirror, "senteval", capsys)


def test_hostile_archive_member_is_refused(tmp_path: Path, mini: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mirror, root = tmp_path / "mirror", tmp_path / "data"
    senteval_tar(mirror, mini, hostile=True)
    rc, _ = prep(root, write_manifest(tmp_path, {"senteval": {}}), mirror, "senteval")
    assert rc == 1 and "refusing to extract" in capsys.readouterr().out
    assert not list(tmp_path.rglob("evil.txt")) and not (root / "senteval").exists()


# ------------------------------------------------------------------------------ Flickr30K / COCO


def test_flickr30k_royokong_parquet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mirror, root = tmp_path / "mirror", tmp_path / "data"
    rows = caption_rows(3)
    hf_caption_parquet(mirror, "royokong/flickr30k_test", rows)
    manifest = write_manifest(tmp_path, {"flickr30k": {"images": 3, "captions": 15}})
    rc, fetcher = prep(root, manifest, mirror, "flickr30k")
    assert rc == 0 and fetcher.calls == [("hub_snapshot", "royokong/flickr30k_test")]
    assert not (root / "flickr30k" / "README.md").exists()  # allow_patterns: parquet only
    # the benchmark config's arguments (annotation file absent -> HF layout)
    d = load_captions(root / "flickr30k", "flickr30k", annotation="dataset_flickr30k.json", image_dir="flickr30k-images")
    assert len(d.images) == 3 and d.captions[:2] == rows[0][2][:2] and d.images[2].data == rows[2][1]
    assert_noop(root, manifest, mirror, "flickr30k", capsys)


def test_flickr30k_nlphuji_csv_and_zip_become_the_karpathy_layout(tmp_path: Path) -> None:
    mirror, root = tmp_path / "mirror", tmp_path / "data"
    rows = caption_rows(5)
    nlphuji_flickr(mirror, test=rows[:3], train=rows[3:])
    manifest = write_manifest(tmp_path, {"flickr30k": {"images": 3, "captions": 15}})
    rc, _ = prep(root, manifest, mirror, "flickr30k", "--source", "nlphuji")
    assert rc == 0
    assert sorted(p.name for p in (root / "flickr30k" / "flickr30k-images").iterdir()) == [r[0] for r in rows[:3]]
    d = load_captions(root / "flickr30k", "flickr30k", annotation="dataset_flickr30k.json", image_dir="flickr30k-images")
    assert [im.label for im in d.images] == [r[0] for r in rows[:3]] and len(d.captions) == 15
    assert json.loads((root / "flickr30k" / ".complete").read_text())["source"] == "nlphuji"


def test_coco_royokong_parquet_first_five_and_all(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mirror, root = tmp_path / "mirror", tmp_path / "data"
    hf_caption_parquet(mirror, "royokong/coco_test", caption_rows(3, extra_on=1))
    counts = {"images": 3, "captions_first5": 15, "captions": 16}
    manifest = write_manifest(tmp_path, {"coco": counts})
    assert prep(root, manifest, mirror, "coco")[0] == 0
    assert json.loads((root / "coco" / ".complete").read_text())["counts"] == counts
    first5 = load_captions(root / "coco", "coco", annotation="dataset_coco.json", max_captions=5)
    every = load_captions(root / "coco", "coco", annotation="dataset_coco.json")
    assert (len(first5.captions), len(every.captions)) == (15, 16)
    assert_noop(root, manifest, mirror, "coco", capsys)


def test_coco_karpathy_annotations_and_val2014_zip(tmp_path: Path) -> None:
    mirror, root = tmp_path / "mirror", tmp_path / "data"
    rows = caption_rows(4, extra_on=0)
    coco_karpathy(mirror, test=rows[:3], other=rows[3:])
    manifest = write_manifest(tmp_path, {"coco": {"images": 3, "captions_first5": 15, "captions": 16}})
    rc, fetcher = prep(root, manifest, mirror, "coco", "--source", "karpathy")
    assert rc == 0 and [c[0] for c in fetcher.calls] == ["url", "url"]
    assert len(list((root / "coco" / "val2014").iterdir())) == 3  # the non-test image is not extracted
    d = load_captions(root / "coco", "coco", annotation="dataset_coco.json", image_dir=".", max_captions=5)
    assert len(d.images) == 3 and d.captions[0] == rows[0][2][0] and d.images[0].path.parent.name == "val2014"


# ------------------------------------------------------------------------------ CIRR / FashionIQ


def test_cirr_annotations_then_manual_images_then_complete(
    tmp_path: Path, mini: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mirror, root = tmp_path / "mirror", tmp_path / "data"
    cirr_annotations(mirror, mini)
    val, test1 = load_cirr(mini / "cirr", "val"), load_cirr(mini / "cirr", "test1")
    counts = {"val_queries": len(val.queries), "val_images": len(val.gallery),
              "test1_queries": len(test1.queries), "test1_images": len(test1.gallery)}
    manifest = write_manifest(tmp_path, {"cirr": counts})
    rc, fetcher = prep(root, manifest, mirror, "cirr")
    out = capsys.readouterr().out
    assert rc == 2 and len(fetcher.calls) == 4
    assert "goo.gl/forms/yS29stWnFWzrDBFH3" in out and "nlvr@googlegroups.com" in out
    assert f"{len(val.gallery)} of {len(val.gallery)} images missing" in out
    assert str(root / "cirr" / "dev" / "dev-0-0-img0.png") in out and "make data-cirr" in out
    assert not (root / "cirr" / ".complete").exists()
    # the user puts the NLVR2 images in place; annotations are not downloaded again
    for folder in ("dev", "test1"):
        shutil.copytree(mini / "cirr" / folder, root / "cirr" / folder)
    rc, fetcher = prep(root, manifest, mirror, "cirr")
    assert rc == 0 and fetcher.calls == []
    d = load_cirr(root / "cirr", "val")  # check_images=True
    assert [q.pairid for q in d.queries] == [q.pairid for q in val.queries]
    assert_noop(root, manifest, mirror, "cirr", capsys)


def test_fashioniq_annotations_and_hub_images_keep_present_ones(
    tmp_path: Path, mini: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mirror, root = tmp_path / "mirror", tmp_path / "data"
    fashioniq_sources(mirror, mini, as_jpeg="dress")
    counts = {}
    for cat in CATEGORIES:
        d = load_fashioniq(mini / "fashioniq", cat)
        counts |= {f"{cat}_queries": len(d.queries), f"{cat}_images": len(d.gallery)}
    manifest = write_manifest(tmp_path, {"fashioniq": counts})
    mine = root / "fashioniq" / "images" / "B00SH0000.png"  # already there (user's copy): kept as is
    mine.parent.mkdir(parents=True)
    mine.write_bytes((mini / "fashioniq" / "images" / "B00SH0000.png").read_bytes())
    before = mine.stat().st_mtime_ns
    rc, fetcher = prep(root, manifest, mirror, "fashioniq")
    assert rc == 0 and fetcher.calls[-1] == ("hub_snapshot", "royokong/fashioniq_val_imgs")
    assert mine.stat().st_mtime_ns == before
    imgs = root / "fashioniq" / "images"
    assert (imgs / "B00DR0000.jpg").is_file() and not (imgs / "B00DR0000.png").exists()  # JPEG bytes kept
    for cat in CATEGORIES:
        got, want = load_fashioniq(root / "fashioniq", cat), load_fashioniq(mini / "fashioniq", cat)
        assert got.gallery_names == want.gallery_names and len(got.queries) == len(want.queries)
    assert_noop(root, manifest, mirror, "fashioniq", capsys)


# ------------------------------------------------------------------------------ downloader, CLI


class _Resp:
    def __init__(self, data: bytes, status: int, fail_after: int | None = None) -> None:
        self.data, self.status, self.fail_after, self.pos = data, status, fail_after, 0
        self.headers = {"Content-Length": str(len(data))}

    def read(self, n: int) -> bytes:
        if self.fail_after is not None and self.pos >= self.fail_after:
            raise TimeoutError("connection dropped")
        chunk = self.data[self.pos : self.pos + min(n, 1000)]
        self.pos += len(chunk)
        return chunk

    def __enter__(self) -> _Resp:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def test_https_download_resumes_a_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from scripts.data import fetch

    payload = bytes(range(256)) * 40  # 10,240 bytes
    ranges: list[str | None] = []

    def fake_urlopen(req: object, timeout: float) -> _Resp:
        rng = req.get_header("Range")  # type: ignore[attr-defined]
        ranges.append(rng)
        if rng is None:
            return _Resp(payload, 200, fail_after=3000)
        start = int(rng.removeprefix("bytes=").rstrip("-"))
        return _Resp(payload[start:], 206)

    monkeypatch.setattr(fetch, "urlopen", fake_urlopen)
    dest = tmp_path / "dl" / "file.bin"
    with pytest.raises(TimeoutError):
        fetch.download_url("https://example.org/file.bin", dest)
    assert not dest.exists() and (tmp_path / "dl" / "file.bin.part").stat().st_size == 3000
    assert fetch.download_url("https://example.org/file.bin", dest) == dest
    assert dest.read_bytes() == payload and ranges == [None, "bytes=3000-"]
    assert not (tmp_path / "dl" / "file.bin.part").exists()
    fetch.download_url("https://example.org/file.bin", dest)  # complete: no request at all
    assert len(ranges) == 2


def test_cli_help_and_mirror_run_in_a_subprocess(tmp_path: Path) -> None:
    env = {**os.environ, "E5V_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    h = subprocess.run([sys.executable, "-m", "scripts.prepare_data", "--help"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert h.returncode == 0 and "--data-root" in h.stdout and "fashioniq" in h.stdout
    mirror = nli_mirror(tmp_path, rows=12)
    manifest = write_manifest(tmp_path, {"nli": {"rows": 12}})
    cmd = [sys.executable, "-m", "scripts.prepare_data", "nli", "--mirror", str(mirror),
           "--data-root", str(tmp_path / "data"), "--manifest", str(manifest)]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "prepared in" in r.stdout and (tmp_path / "data" / "nli" / ".complete").is_file()
    bad = subprocess.run([sys.executable, "-m", "scripts.prepare_data", "imagenet"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown dataset 'imagenet'" in bad.stderr


def test_network_fetcher_uses_dataset_repos_and_explains_offline_failures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    from scripts.data.fetch import FetchError, NetworkFetcher

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FetchError, match="HF_HUB_OFFLINE=1 is set: unset it to download"):
        NetworkFetcher().hub_file("princeton-nlp/datasets-for-simcse", "nli_for_simcse.csv", "main", tmp_path)
    seen: dict[str, object] = {}

    def fake_snapshot(repo_id: str, **kw: object) -> str:
        seen.update(repo_id=repo_id, **kw)
        return str(kw["local_dir"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert NetworkFetcher().hub_snapshot("royokong/coco_test", "main", ["*.parquet"], tmp_path) == tmp_path
    assert seen == {"repo_id": "royokong/coco_test", "repo_type": "dataset", "revision": "main",
                    "allow_patterns": ["*.parquet"], "local_dir": str(tmp_path)}
