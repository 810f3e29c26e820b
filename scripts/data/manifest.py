"""The data manifest (``scripts/data_manifest.json``: what to download, what it must contain) and the
local lock (``<data root>/.manifest-lock.json``: what the first successful run actually found).

Counts in the manifest are exact integers, ``{"min": a, "max": b}`` ranges, or ``null`` (unknown). Every
count and every downloaded file's size and sha256 is written to the lock on the first success; later
runs (``--force`` re-downloads, ``--check``) must reproduce the lock exactly, so a silently changed
upstream file is caught even where the manifest could not say what to expect.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from e5v.data.atomic import atomic_write_text
from e5v.errors import E5VError

MANIFEST = Path(__file__).resolve().parents[1] / "data_manifest.json"
LOCK_NAME = ".manifest-lock.json"


class ManifestError(E5VError, ValueError):
    """The manifest file itself is malformed."""


class VerifyError(E5VError, ValueError):
    """Data on disk (or a download) does not match what the manifest or the lock expects."""


@dataclass(frozen=True)
class FileSpec:
    name: str  # relative name under the source (hub filename, or the path the file takes locally)
    url: str | None = None
    sha256: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class SourceSpec:
    name: str
    kind: str
    repo_id: str | None = None
    revision: str = "main"
    allow_patterns: tuple[str, ...] = ()
    files: tuple[FileSpec, ...] = ()

    def file(self, name: str) -> FileSpec:
        for f in self.files:
            if f.name == name:
                return f
        raise ManifestError(f"source '{self.name}' lists no file '{name}' (files: {[f.name for f in self.files]})")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    dir: str
    title: str
    licence: str
    default_source: str
    sources: dict[str, SourceSpec]
    counts: dict[str, Any] = field(default_factory=dict)

    def source(self, name: str | None) -> SourceSpec:
        key = name or self.default_source
        if key not in self.sources:
            raise ManifestError(f"{self.name}: unknown source '{key}'; choose one of {sorted(self.sources)}")
        return self.sources[key]


@dataclass(frozen=True)
class Manifest:
    version: int
    datasets: dict[str, DatasetSpec]
    path: Path

    def dataset(self, name: str) -> DatasetSpec:
        if name not in self.datasets:
            raise ManifestError(f"{self.path}: no dataset '{name}' (datasets: {sorted(self.datasets)})")
        return self.datasets[name]


def _need(node: dict[str, Any], key: str, where: str, path: Path) -> Any:
    if not isinstance(node, dict) or key not in node:
        raise ManifestError(f"{path}: {where} has no key '{key}'")
    return node[key]


def load_manifest(path: Path | str = MANIFEST) -> Manifest:
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"manifest {path} not found") from None
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from e
    version = _need(raw, "version", "the top level", path)
    if not isinstance(version, int) or version < 1:
        raise ManifestError(f"{path}: 'version' must be a positive integer, got {version!r}")
    datasets: dict[str, DatasetSpec] = {}
    for name, d in _need(raw, "datasets", "the top level", path).items():
        sources = {}
        for sname, s in _need(d, "sources", f"dataset '{name}'", path).items():
            files = tuple(
                FileSpec(fname, f.get("url"), f.get("sha256"), f.get("size"))
                for fname, f in (s.get("files") or {}).items()
            )
            sources[sname] = SourceSpec(
                sname,
                _need(s, "kind", f"dataset '{name}' source '{sname}'", path),
                s.get("repo_id"),
                s.get("revision") or "main",
                tuple(s.get("allow_patterns") or ()),
                files,
            )
        default = _need(d, "default_source", f"dataset '{name}'", path)
        if default not in sources:
            raise ManifestError(f"{path}: dataset '{name}' default_source '{default}' is not one of {sorted(sources)}")
        for key, want in (d.get("counts") or {}).items():
            if not (want is None or isinstance(want, int) or (isinstance(want, dict) and {"min", "max"} <= set(want))):
                raise ManifestError(
                    f"{path}: dataset '{name}' count '{key}' must be an integer, {{min, max}} or null, got {want!r}"
                )
        datasets[name] = DatasetSpec(
            name,
            _need(d, "dir", f"dataset '{name}'", path),
            d.get("title", name),
            d.get("licence", "see docs/data.md"),
            default,
            sources,
            dict(d.get("counts") or {}),
        )
    return Manifest(version, datasets, path)


def check_counts(name: str, expected: dict[str, Any], got: dict[str, int], locked: dict[str, int] | None) -> None:
    """Every manifest count must be met; every locked count must be reproduced exactly."""
    problems = []
    for key, want in expected.items():
        if key not in got:
            problems.append(f"count '{key}' was not computed")
            continue
        have = got[key]
        if isinstance(want, int) and have != want:
            problems.append(f"{key} = {have:,}, the manifest expects {want:,}")
        elif isinstance(want, dict) and not (want["min"] <= have <= want["max"]):
            problems.append(f"{key} = {have:,}, the manifest expects {want['min']:,} to {want['max']:,}")
    for key, want in (locked or {}).items():
        if key in got and got[key] != want:
            problems.append(f"{key} = {got[key]:,}, but the first run recorded {want:,} in {LOCK_NAME}")
    if problems:
        raise VerifyError(f"{name}: " + "; ".join(problems))


class Lock:
    """``<root>/.manifest-lock.json``: ``datasets -> name -> source -> {files, counts, manifest_version, time}``."""

    def __init__(self, root: Path) -> None:
        self.path = root / LOCK_NAME
        self.data: dict[str, Any] = {"about": "written by scripts/prepare_data.py; see docs/data.md", "datasets": {}}
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise VerifyError(
                    f"{self.path}: not valid JSON ({e}); delete it to record the current data afresh"
                ) from e
            self.data.setdefault("datasets", {})

    def entry(self, dataset: str, source: str) -> dict[str, Any]:
        return dict(self.data["datasets"].get(dataset, {}).get(source, {}))

    def file(self, dataset: str, source: str, name: str) -> dict[str, Any] | None:
        return self.entry(dataset, source).get("files", {}).get(name)

    def record(
        self,
        dataset: str,
        source: str,
        manifest_version: int,
        counts: dict[str, int],
        files: dict[str, dict[str, Any]],
    ) -> None:
        old = self.entry(dataset, source)
        merged_files = {**old.get("files", {}), **files}
        self.data["datasets"].setdefault(dataset, {})[source] = {
            "manifest_version": manifest_version,
            "counts": {**old.get("counts", {}), **counts},
            "files": merged_files,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write_text(self.path, json.dumps(self.data, indent=2, sort_keys=True) + "\n")

    def forget(self, dataset: str, source: str) -> None:
        if self.data["datasets"].get(dataset, {}).pop(source, None) is not None:
            atomic_write_text(self.path, json.dumps(self.data, indent=2, sort_keys=True) + "\n")


__all__ = [
    "DatasetSpec",
    "FileSpec",
    "LOCK_NAME",
    "Lock",
    "MANIFEST",
    "Manifest",
    "ManifestError",
    "SourceSpec",
    "VerifyError",
    "check_counts",
    "load_manifest",
]
