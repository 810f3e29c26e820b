"""Downloaders behind one small interface, so that tests (and air-gapped clusters) can swap the network out.

* :class:`NetworkFetcher`: Hugging Face hub files and snapshots through ``huggingface_hub``
  (``repo_type="dataset"``, into a local folder, resumed by the hub client), plain HTTPS through
  ``urllib`` with ``Range`` resume of a ``.part`` file that is renamed into place only when complete.
* :class:`MirrorFetcher`: the same calls served from a local folder laid out as
  ``<mirror>/hub/<repo_id>/<path>`` and ``<mirror>/url/<host>/<path>`` (``--mirror DIR``). It records
  every call in ``calls``, which is what the tests assert on.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from pathlib import Path
from typing import Protocol
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit
from urllib.request import Request, urlopen

from e5v.data.atomic import atomic_write
from e5v.data.paths import UnsafePathError, safe_join
from e5v.errors import E5VError

CHUNK = 1 << 20
USER_AGENT = "e5v-prepare-data/1 (+https://github.com; research data preparation)"


class FetchError(E5VError, RuntimeError):
    """A download failed; the message names the source and what to do."""


class Fetcher(Protocol):
    def hub_file(self, repo_id: str, filename: str, revision: str, dest_dir: Path) -> Path:
        """Download ``filename`` of dataset repo ``repo_id`` to ``dest_dir/filename``; return that path."""
        ...

    def hub_snapshot(self, repo_id: str, revision: str, patterns: list[str], dest_dir: Path) -> Path:
        """Download the files of dataset repo ``repo_id`` matching ``patterns`` under ``dest_dir``; return it."""
        ...

    def url(self, url: str, dest: Path) -> Path:
        """Download ``url`` to ``dest`` (resumable); return ``dest``."""
        ...


def _progress_enabled() -> bool:
    return not os.environ.get("E5V_NO_PROGRESS")


class NetworkFetcher:
    """The real thing: huggingface_hub for hub sources, urllib for HTTPS files."""

    def __init__(self, timeout: float = 60.0) -> None:
        self.timeout = timeout

    @staticmethod
    def _hub_error(repo_id: str, what: str, err: Exception) -> FetchError:
        hint = (
            "HF_HUB_OFFLINE=1 is set: unset it to download"
            if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0")
            else "check the network (and HF_TOKEN if the repository is gated), or use --mirror DIR"
        )
        return FetchError(f"hub dataset {repo_id}: could not download {what} ({type(err).__name__}: {err}); {hint}")

    def hub_file(self, repo_id: str, filename: str, revision: str, dest_dir: Path) -> Path:
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(
                repo_id, filename, repo_type="dataset", revision=revision, local_dir=str(dest_dir)
            )
        except Exception as e:  # noqa: BLE001 - every hub failure gets the same actionable message
            raise self._hub_error(repo_id, filename, e) from e
        return Path(str(path))

    def hub_snapshot(self, repo_id: str, revision: str, patterns: list[str], dest_dir: Path) -> Path:
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(
                repo_id,
                repo_type="dataset",
                revision=revision,
                allow_patterns=list(patterns) or None,
                local_dir=str(dest_dir),
            )
        except Exception as e:  # noqa: BLE001
            raise self._hub_error(repo_id, f"files matching {patterns}", e) from e
        return Path(str(path))

    def url(self, url: str, dest: Path) -> Path:
        return download_url(url, dest, timeout=self.timeout)


def download_url(url: str, dest: Path, timeout: float = 60.0, _retry: bool = True) -> Path:
    """HTTPS download into ``dest.part`` (continued with a Range request if it exists), then renamed."""
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urlopen(Request(url, headers=headers), timeout=timeout)  # noqa: S310 - https URLs from the manifest
    except HTTPError as e:
        if e.code == 416 and have and _retry:  # the partial file is stale or complete: start over once
            part.unlink()
            return download_url(url, dest, timeout, _retry=False)
        raise FetchError(f"{url}: HTTP {e.code} {e.reason}") from e
    except (URLError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise FetchError(f"{url}: {reason}; check the network, or use --mirror DIR") from e
    with resp:
        if have and getattr(resp, "status", 200) != 206:
            have = 0  # the server ignored the Range header: restart from zero
        length = resp.headers.get("Content-Length")
        total = int(length) + have if length and length.isdigit() else None
        bar = None
        if _progress_enabled():
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=dest.name, dynamic_ncols=True)
        try:
            with part.open("ab" if have else "wb") as f:
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
                f.flush()
                os.fsync(f.fileno())
        finally:
            if bar is not None:
                bar.close()
    if total is not None and part.stat().st_size != total:
        raise FetchError(
            f"{url}: got {part.stat().st_size:,} of {total:,} bytes; run the same command again to resume"
        )
    os.replace(part, dest)
    return dest


def _copy(src: Path, dest: Path) -> Path:
    with src.open("rb") as f:
        atomic_write(dest, lambda out: shutil.copyfileobj(f, out, CHUNK))
    return dest


class MirrorFetcher:
    """Serve every download from a local folder (``--mirror``; the tests' fake network)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.calls: list[tuple[str, str]] = []

    def _src(self, rel: str, what: str) -> Path:
        try:
            p = safe_join(self.root, rel, where=what)
        except UnsafePathError as e:
            raise FetchError(str(e)) from e
        if not p.exists():
            raise FetchError(f"mirror {self.root}: {what} not found at {p}")
        return p

    def hub_file(self, repo_id: str, filename: str, revision: str, dest_dir: Path) -> Path:
        self.calls.append(("hub_file", f"{repo_id}/{filename}"))
        src = self._src(f"hub/{repo_id}/{filename}", f"hub file {repo_id}/{filename}")
        dest_dir.mkdir(parents=True, exist_ok=True)
        return _copy(src, safe_join(dest_dir, filename, where=f"hub file {repo_id}/{filename}"))

    def hub_snapshot(self, repo_id: str, revision: str, patterns: list[str], dest_dir: Path) -> Path:
        self.calls.append(("hub_snapshot", repo_id))
        base = self._src(f"hub/{repo_id}", f"hub repository {repo_id}")
        for src in sorted(p for p in base.rglob("*") if p.is_file()):
            rel = src.relative_to(base).as_posix()
            if not patterns or any(fnmatch.fnmatch(rel, pat) for pat in patterns):
                _copy(src, dest_dir / rel)
        return dest_dir

    def url(self, url: str, dest: Path) -> Path:
        self.calls.append(("url", url))
        parts = urlsplit(url)
        src = self._src(f"url/{parts.netloc}{parts.path}", f"file for {url}")
        return _copy(src, dest)


__all__ = ["FetchError", "Fetcher", "MirrorFetcher", "NetworkFetcher", "download_url"]
