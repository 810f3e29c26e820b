"""Tiny fixtures in each dataset's SOURCE format, laid out as a --mirror folder (no network anywhere).

``<mirror>/hub/<repo_id>/<file>`` for hub sources and ``<mirror>/url/<host>/<path>`` for HTTPS files; the
real manifest's repo ids and URLs are kept, so the tests also show which remote paths would be fetched.
Image, caption and STS content comes from :mod:`e5v.mini.eval_data` (the real evaluation formats).
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from scripts.data.manifest import MANIFEST

REPO = Path(__file__).resolve().parents[2]

MINI_SIZES = {"images": 4, "cirr_groups": 2, "fiq_images": 6, "sts_pairs": 3}


def real_manifest() -> dict[str, Any]:
    return json.loads(MANIFEST.read_text(encoding="utf-8"))


def write_manifest(tmp: Path, counts: dict[str, dict[str, Any]]) -> Path:
    """The real manifest with the counts of the named datasets replaced by the fixtures' sizes."""
    m = real_manifest()
    for name, c in counts.items():
        m["datasets"][name]["counts"] = c
    path = tmp / "manifest.json"
    path.write_text(json.dumps(m, indent=1))
    return path


def source_files(dataset: str, source: str) -> dict[str, Any]:
    return real_manifest()["datasets"][dataset]["sources"][source]


def hub_path(mirror: Path, repo_id: str, name: str) -> Path:
    p = mirror / "hub" / repo_id / name
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def url_path(mirror: Path, url: str) -> Path:
    u = urlsplit(url)
    p = mirror / "url" / u.netloc / u.path.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def jpeg(seed: int, size: tuple[int, int] = (24, 16)) -> bytes:
    import numpy as np
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def caption_rows(n: int, extra_on: int | None = None) -> list[tuple[str, bytes, list[str]]]:
    """``(filename, jpeg bytes, captions)``: 5 captions each, 6 for image ``extra_on``."""
    out = []
    for i in range(n):
        caps = [f"photo {i} caption {k}." for k in range(6 if i == extra_on else 5)]
        out.append((f"{1000 + i}.jpg", jpeg(i), caps))
    return out


def hf_caption_parquet(mirror: Path, repo_id: str, rows: list[tuple[str, bytes, list[str]]]) -> None:
    """The royokong re-upload layout: data/test-*.parquet with ``image`` (struct bytes/path) and ``text``."""
    write_parquet(
        hub_path(mirror, repo_id, "data/test-00000-of-00001.parquet"),
        [{"image": {"bytes": b, "path": f}, "text": caps} for f, b, caps in rows],
    )
    hub_path(mirror, repo_id, "README.md").write_text("dataset card (must not be copied)\n")


def nlphuji_flickr(mirror: Path, test: list[tuple[str, bytes, list[str]]], train: list[tuple[str, bytes, list[str]]]) -> None:
    import csv

    repo = "nlphuji/flickr30k"
    with hub_path(mirror, repo, "flickr_annotations_30k.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["raw", "sentids", "split", "filename", "img_id"])
        for split, rows in (("train", train), ("test", test)):
            for i, (fn, _, caps) in enumerate(rows):
                w.writerow([json.dumps(caps), json.dumps(list(range(5 * i, 5 * i + len(caps)))), split, fn, i])
    with zipfile.ZipFile(hub_path(mirror, repo, "flickr30k-images.zip"), "w") as z:
        for fn, b, _ in train + test:
            z.writestr(f"flickr30k-images/{fn}", b)


def coco_karpathy(mirror: Path, test: list[tuple[str, bytes, list[str]]], other: list[tuple[str, bytes, list[str]]]) -> None:
    files = source_files("coco", "karpathy")["files"]
    images, anns = [], []
    for i, (fn, _, caps) in enumerate(test):
        images.append({"id": 500 + i, "file_name": f"COCO_val2014_{fn}"})
        anns += [{"image_id": 500 + i, "id": 10 * i + k, "caption": c} for k, c in enumerate(caps)]
    url_path(mirror, files["coco_test_karpathy.json"]["url"]).write_text(json.dumps({"images": images, "annotations": anns}))
    with zipfile.ZipFile(url_path(mirror, files["val2014.zip"]["url"]), "w") as z:
        for fn, b, _ in test + other:
            z.writestr(f"val2014/COCO_val2014_{fn}", b)


def senteval_tar(mirror: Path, mini: Path, prefix: str = "SentEval/data/downstream/", hostile: bool = False) -> Path:
    path = hub_path(mirror, "princeton-nlp/datasets-for-simcse", "senteval.tar")
    with tarfile.open(path, "w") as tf:
        for sub in ("STS", "SICK"):
            tf.add(mini / "senteval" / sub, arcname=prefix + sub)
        junk = b"positive review\n"
        info = tarfile.TarInfo(prefix + "MR/rt-polarity.pos")
        info.size = len(junk)
        tf.addfile(info, io.BytesIO(junk))
        if hostile:
            info = tarfile.TarInfo(prefix + "STS/../../../../evil.txt")
            info.size = len(junk)
            tf.addfile(info, io.BytesIO(junk))
    return path


def cirr_annotations(mirror: Path, mini: Path) -> None:
    for name, f in source_files("cirr", "github")["files"].items():
        shutil.copy(mini / "cirr" / name, url_path(mirror, f["url"]))


def fashioniq_sources(mirror: Path, mini: Path, as_jpeg: str = "dress") -> None:
    from PIL import Image

    src = source_files("fashioniq", "github+hub")
    for name, f in src["files"].items():
        shutil.copy(mini / "fashioniq" / name, url_path(mirror, f["url"]))
    rows = []
    for p in sorted((mini / "fashioniq" / "images").glob("*.png")):
        data = p.read_bytes()
        cat = {"DR": "dress", "SH": "shirt", "TO": "toptee"}[p.stem[3:5]]
        if cat == as_jpeg:
            buf = io.BytesIO()
            Image.open(p).convert("RGB").save(buf, format="JPEG")
            data = buf.getvalue()
        rows.append({"img": {"bytes": data, "path": p.name}, "id": p.stem, "category": cat})
    write_parquet(hub_path(mirror, src["repo_id"], "data/val-00000-of-00001.parquet"), rows)


def tree(root: Path) -> dict[str, int]:
    """Every file under ``root`` with its mtime (ns): equal before and after a no-op run."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}
