"""The preparation flow shared by every dataset: idempotent, resumable, atomic, verified.

For one dataset (``<root>/<dir>``):

1. ``<dir>/.complete`` exists with the current manifest version: nothing to do (no download).
2. Staged datasets (everything the script produces itself): a non-empty ``<dir>`` without a marker is
   verified as it is and adopted when it passes (a copy prepared by hand is never overwritten without
   ``--force``). Otherwise downloads go to ``<root>/.downloads/<name>/`` (kept until success, so an
   interrupted run resumes), the converted data is built in ``<root>/.staging/<name>/``, verified,
   and renamed into place in one step.
3. In-place datasets (CIRR, FashionIQ: the images may be the user's) add missing files one by one,
   each written atomically, and never delete anything.
4. The counts are checked against the manifest and the lock; the marker is written last.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from e5v.data.atomic import atomic_write_text
from e5v.data.paths import UnsafePathError, safe_join
from e5v.errors import E5VError
from scripts.data.fetch import CHUNK, Fetcher, FetchError
from scripts.data.manifest import DatasetSpec, FileSpec, Lock, Manifest, SourceSpec, VerifyError, check_counts

MARKER = ".complete"
DOWNLOADS = ".downloads"
STAGING = ".staging"


class PrepError(E5VError, RuntimeError):
    """Preparation cannot go on; the message says why and what to do."""


class ManualStepRequired(E5VError, RuntimeError):
    """Something only the user can obtain is missing (e.g. licensed images); the message is the recipe."""


@dataclass
class Outcome:
    name: str
    status: str  # prepared | already | adopted | verified | manual | failed
    message: str = ""
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status in ("prepared", "already", "adopted", "verified")


@dataclass
class PrepContext:
    root: Path
    manifest: Manifest
    fetcher: Fetcher
    force: bool = False
    keep_downloads: bool = False
    relock: bool = False
    out: Callable[[str], None] = print
    lock: Lock = field(init=False)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # downloads of the current dataset

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = Lock(self.root)

    def say(self, name: str, msg: str) -> None:
        self.out(f"[{name}] {msg}")

    def dataset_dir(self, spec: DatasetSpec) -> Path:
        try:
            return safe_join(self.root, spec.dir, where=f"manifest dataset '{spec.name}'")
        except UnsafePathError as e:
            raise PrepError(str(e)) from e

    def downloads(self, name: str) -> Path:
        return self.root / DOWNLOADS / name


class Dataset:
    """One dataset's download, conversion and verification (subclasses live in scripts/data/<name>.py)."""

    name: ClassVar[str]
    in_place: ClassVar[bool] = False

    def build(self, ctx: PrepContext, spec: DatasetSpec, source: SourceSpec, out: Path, dl: Path) -> None:
        raise NotImplementedError

    def verify(self, ctx: PrepContext, spec: DatasetSpec, out: Path) -> dict[str, int]:
        """Offline check of ``out`` through the real loaders; returns the counts. Raises VerifyError."""
        raise NotImplementedError

    def pending(self, ctx: PrepContext, spec: DatasetSpec, out: Path) -> str | None:
        """What the user still has to provide by hand (the recipe), or None when nothing is missing."""
        return None


# ----------------------------------------------------------------------------- files


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_file(ctx: PrepContext, dataset: str, source: SourceSpec, spec: FileSpec, path: Path) -> None:
    """Size and sha256 of a download against the manifest and the lock; a bad file is deleted."""
    size = path.stat().st_size
    digest = sha256_file(path)
    locked = None if ctx.relock else ctx.lock.file(dataset, source.name, spec.name)
    problems = []
    if spec.size is not None and size != spec.size:
        problems.append(f"size {size:,} bytes, the manifest expects {spec.size:,}")
    if spec.sha256 and digest != spec.sha256:
        problems.append(f"sha256 {digest}, the manifest expects {spec.sha256}")
    if locked and (locked.get("sha256") != digest or locked.get("size") != size):
        problems.append(
            f"sha256 {digest[:12]}... ({size:,} bytes) differs from the first run's "
            f"{str(locked.get('sha256'))[:12]}... ({locked.get('size')} bytes) in {ctx.lock.path}"
        )
    if problems:
        path.unlink(missing_ok=True)
        raise VerifyError(
            f"{dataset}: download '{spec.name}' ({source.repo_id or spec.url}) has {'; '.join(problems)}. "
            "The file was deleted; run again to re-download. If upstream changed on purpose, rerun with "
            "--relock to record the new file (and update scripts/data_manifest.json)."
        )
    ctx.files[spec.name] = {"sha256": digest, "size": size}


def fetch_hub_file(ctx: PrepContext, dataset: str, source: SourceSpec, name: str, dl: Path) -> Path:
    ctx.say(dataset, f"downloading {name} from hub dataset {source.repo_id}@{source.revision}")
    path = ctx.fetcher.hub_file(str(source.repo_id), name, source.revision, dl)
    check_file(ctx, dataset, source, source.file(name), path)
    return path


def fetch_url(ctx: PrepContext, dataset: str, source: SourceSpec, name: str, dl: Path) -> Path:
    spec = source.file(name)
    if not spec.url:
        raise PrepError(f"{ctx.manifest.path}: {dataset} source '{source.name}' file '{name}' has no 'url'")
    dl.mkdir(parents=True, exist_ok=True)
    dest = safe_join(dl, name, where=f"manifest file of {dataset}")
    ctx.say(dataset, f"downloading {spec.url}")
    path = ctx.fetcher.url(spec.url, dest)
    check_file(ctx, dataset, source, spec, path)
    return path


def fetch_snapshot(ctx: PrepContext, dataset: str, source: SourceSpec, dl: Path) -> list[Path]:
    """Files of a hub snapshot matching the source's patterns, sorted; each hashed into the lock."""
    import fnmatch

    pats = list(source.allow_patterns)
    ctx.say(dataset, f"downloading {pats or 'all files'} from hub dataset {source.repo_id}@{source.revision}")
    folder = ctx.fetcher.hub_snapshot(str(source.repo_id), source.revision, pats, dl)
    files = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and not rel.startswith(".cache/") and (not pats or any(fnmatch.fnmatch(rel, x) for x in pats)):
            check_file(ctx, dataset, source, FileSpec(rel), p)
            files.append(p)
    if not files:
        raise PrepError(f"{dataset}: hub dataset {source.repo_id} has no file matching {pats}")
    return files


def place_url_files(ctx: PrepContext, dataset: str, source: SourceSpec, out: Path, dl: Path) -> None:
    """In-place datasets: every URL file of the source at ``out/<name>``. A file already there is kept
    when it is valid JSON and matches the manifest/lock (its hash goes to the lock); else re-downloaded."""
    for spec in source.files:
        target = safe_join(out, spec.name, where=f"manifest file of {dataset}")
        if target.is_file() and not ctx.force:
            try:
                read_json(target, dataset)
                check_file(ctx, dataset, source, spec, target)
                continue
            except VerifyError as e:
                ctx.say(dataset, f"{e}; downloading it again")
                target.unlink(missing_ok=True)
        path = fetch_url(ctx, dataset, source, spec.name, dl)
        read_json(path, dataset)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)


def read_json(path: Path, dataset: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VerifyError(f"{dataset}: {path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VerifyError(f"{dataset}: {path} is not valid UTF-8 JSON ({e}); delete it and run again") from e


# ----------------------------------------------------------------------------- markers


def read_marker(final: Path) -> dict[str, Any] | None:
    p = final / MARKER
    if not p.is_file():
        return None
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
        return m if isinstance(m, dict) else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def write_marker(ctx: PrepContext, spec: DatasetSpec, source: SourceSpec, final: Path, counts: dict[str, int]) -> None:
    marker = {
        "dataset": spec.name,
        "manifest_version": ctx.manifest.version,
        "source": source.name,
        "counts": counts,
        "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_text(final / MARKER, json.dumps(marker, indent=2) + "\n")


def _swap(staging: Path, final: Path) -> None:
    old = final.parent / f".old-{final.name}"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def _non_empty(d: Path) -> bool:
    return d.is_dir() and any(p.name != MARKER for p in d.iterdir())


# ----------------------------------------------------------------------------- the flow


def _counts_ok(ctx: PrepContext, spec: DatasetSpec, source: SourceSpec, counts: dict[str, int]) -> None:
    locked = None if ctx.relock else ctx.lock.entry(spec.name, source.name).get("counts")
    try:
        check_counts(spec.name, spec.counts, counts, locked)
    except VerifyError as e:
        raise VerifyError(
            f"{e}. The data is incomplete or the source changed: run again with --force to re-download; if the "
            f"source changed on purpose, update the counts in {ctx.manifest.path} (and its version), and use "
            f"--relock to replace the numbers recorded in {ctx.lock.path}"
        ) from e


def _adopt(
    ctx: PrepContext, ds: Dataset, spec: DatasetSpec, source: SourceSpec, final: Path, ours: bool
) -> Outcome | None:
    """A folder without a current marker: adopt it if it verifies. One of ours (stale marker) that does
    not verify is rebuilt (None); one made by hand is never replaced without --force."""
    try:
        counts = ds.verify(ctx, spec, final)
        _counts_ok(ctx, spec, source, counts)
    except VerifyError as e:
        if ours:
            ctx.say(ds.name, f"the copy in {final} no longer verifies ({e}); preparing it again")
            return None
        raise PrepError(
            f"{final} exists without a {MARKER} marker and does not verify ({e}). Move it away, or rerun "
            "with --force to replace it."
        ) from e
    ctx.lock.record(spec.name, source.name, ctx.manifest.version, counts, {})
    write_marker(ctx, spec, source, final, counts)
    msg = f"found an existing copy in {final} that verifies; marked complete, nothing downloaded"
    ctx.say(ds.name, msg)
    return Outcome(ds.name, "adopted", msg, counts)


def prepare(ctx: PrepContext, ds: Dataset, source_name: str | None = None) -> Outcome:
    spec = ctx.manifest.dataset(ds.name)
    source = spec.source(source_name)
    final = ctx.dataset_dir(spec)
    ctx.files = {}
    marker = read_marker(final)
    if marker and not ctx.force:
        if marker.get("manifest_version") == ctx.manifest.version:
            msg = (
                f"already prepared in {final} (manifest v{ctx.manifest.version}, source {marker.get('source')}); "
                "nothing to do (--check re-verifies, --force prepares again)"
            )
            ctx.say(ds.name, msg)
            return Outcome(ds.name, "already", msg, dict(marker.get("counts") or {}))
        ctx.say(ds.name, f"prepared under manifest v{marker.get('manifest_version')}, now v{ctx.manifest.version}: again")
    if ctx.relock:
        ctx.lock.forget(spec.name, source.name)
    if not ds.in_place and _non_empty(final) and not ctx.force:
        adopted = _adopt(ctx, ds, spec, source, final, ours=marker is not None)
        if adopted is not None:
            return adopted
    dl = ctx.downloads(ds.name)
    dl.mkdir(parents=True, exist_ok=True)
    if ds.in_place:
        final.mkdir(parents=True, exist_ok=True)
        (final / MARKER).unlink(missing_ok=True)
        out = final
    else:
        out = ctx.root / STAGING / ds.name
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
    try:
        ds.build(ctx, spec, source, out, dl)
    except FetchError as e:
        raise PrepError(f"{ds.name}: {e}") from e
    counts = ds.verify(ctx, spec, out)
    _counts_ok(ctx, spec, source, counts)
    todo = ds.pending(ctx, spec, out)
    if todo:
        raise ManualStepRequired(todo)
    if not ds.in_place:
        _swap(out, final)
    ctx.lock.record(spec.name, source.name, ctx.manifest.version, counts, ctx.files)
    write_marker(ctx, spec, source, final, counts)
    if not ctx.keep_downloads:
        shutil.rmtree(dl, ignore_errors=True)
    summary = ", ".join(f"{k} {v:,}" for k, v in counts.items())
    msg = f"prepared in {final}: {summary}"
    ctx.say(ds.name, msg)
    return Outcome(ds.name, "prepared", msg, counts)


def check(ctx: PrepContext, ds: Dataset) -> Outcome:
    """``--check``: verify what is on disk against the manifest and the lock; never downloads."""
    spec = ctx.manifest.dataset(ds.name)
    final = ctx.dataset_dir(spec)
    marker = read_marker(final) or {}
    source = spec.source(marker.get("source"))
    if not final.is_dir():
        raise VerifyError(f"{ds.name}: {final} does not exist; prepare it with `make data-{ds.name}`")
    counts = ds.verify(ctx, spec, final)
    _counts_ok(ctx, spec, source, counts)
    todo = ds.pending(ctx, spec, final)
    if todo:
        raise ManualStepRequired(todo)
    msg = f"{final} verifies: " + ", ".join(f"{k} {v:,}" for k, v in counts.items())
    ctx.say(ds.name, msg)
    return Outcome(ds.name, "verified", msg, counts)


__all__ = [
    "Dataset",
    "ManualStepRequired",
    "Outcome",
    "PrepContext",
    "PrepError",
    "check",
    "check_file",
    "fetch_hub_file",
    "fetch_snapshot",
    "fetch_url",
    "prepare",
    "read_json",
    "read_marker",
    "sha256_file",
]
