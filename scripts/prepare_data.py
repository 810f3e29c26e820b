"""Download, verify and convert the paper's datasets into the layout the loaders read (docs/data.md).

  python -m scripts.prepare_data all                      # everything under data/ (or $E5V_DATA)
  python -m scripts.prepare_data nli senteval             # some datasets (make data-nli, make data-senteval)
  python -m scripts.prepare_data flickr30k --source nlphuji --data-root /datasets/e5v
  python -m scripts.prepare_data all --check              # re-verify what is on disk; never downloads
  python -m scripts.prepare_data --list                   # datasets, sources, licences, what is prepared
  python -m scripts.prepare_data coco --mirror /mnt/mirror   # serve downloads from a local mirror

A second run does nothing (each dataset folder holds a ``.complete`` marker). Interrupted downloads resume.
Exit status: 0 done, 2 a manual step is needed (CIRR's NLVR2 images: the message says what to request), 1 error.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from e5v.data.paths import UnsafePathError
from scripts.data import ALIASES, DATASETS, get
from scripts.data.common import ManualStepRequired, Outcome, PrepContext, PrepError, check, prepare, read_marker
from scripts.data.fetch import Fetcher, MirrorFetcher, NetworkFetcher
from scripts.data.manifest import MANIFEST, ManifestError, VerifyError, load_manifest


def default_data_root() -> Path:
    """The same default as ``paths.data_dir`` (configs/paths/default.yaml)."""
    if os.environ.get("E5V_DATA"):
        return Path(os.environ["E5V_DATA"])
    return Path(os.environ.get("E5V_ROOT", ".")) / "data"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    names = [*DATASETS, "all"]
    ap = argparse.ArgumentParser(
        prog="python -m scripts.prepare_data",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="datasets: " + ", ".join(DATASETS) + " (aliases: " + ", ".join(f"{k}={v}" for k, v in ALIASES.items())
        + "). Sources, sizes, licences and layouts: docs/data.md",
    )
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"dataset(s) to prepare: {', '.join(names)}")
    ap.add_argument("--data-root", type=Path, default=None, help="data root (default: $E5V_DATA or ./data)")
    ap.add_argument("--source", default=None, help="another source of ONE dataset (see --list), e.g. nlphuji")
    ap.add_argument("--force", action="store_true", help="prepare again even if marked complete (replaces the folder)")
    ap.add_argument("--check", action="store_true", help="verify the prepared data against the manifest and lock")
    ap.add_argument("--relock", action="store_true", help="accept changed upstream files: forget the lock entry")
    ap.add_argument("--keep-downloads", action="store_true", help="keep <root>/.downloads/<name> after success")
    ap.add_argument("--mirror", type=Path, default=None, help="serve downloads from DIR/hub/<repo>/... and DIR/url/<host>/...")
    ap.add_argument("--manifest", type=Path, default=MANIFEST, help=f"manifest file (default {MANIFEST.name})")
    ap.add_argument("--list", action="store_true", help="list datasets, sources and their state, then exit")
    args = ap.parse_args(argv)
    if not args.list and not args.names:
        ap.error("name a dataset (or all), or use --list")
    for n in args.names:
        if n != "all" and ALIASES.get(n, n) not in DATASETS:
            ap.error(f"unknown dataset '{n}'; choose from {', '.join(names)}")
    if args.source and (len(args.names) != 1 or args.names[0] == "all"):
        ap.error("--source applies to one dataset at a time")
    return args


def list_datasets(ctx: PrepContext) -> None:
    for name in DATASETS:
        spec = ctx.manifest.dataset(name)
        marker = read_marker(ctx.dataset_dir(spec))
        state = (
            f"prepared (manifest v{marker.get('manifest_version')}, source {marker.get('source')})"
            if marker
            else "not prepared"
        )
        sources = ", ".join(f"{s}{' (default)' if s == spec.default_source else ''}" for s in spec.sources)
        ctx.out(f"{name:10s} {spec.title}\n{'':10s} dir {ctx.dataset_dir(spec)}: {state}\n"
                f"{'':10s} sources: {sources}\n{'':10s} licence: {spec.licence}")


def run(args: argparse.Namespace, fetcher: Fetcher | None = None) -> int:
    """Library entry (tests pass a fetcher); returns the exit status."""
    try:
        manifest = load_manifest(args.manifest)
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if fetcher is None:
        fetcher = MirrorFetcher(args.mirror) if args.mirror else NetworkFetcher()
    ctx = PrepContext(
        root=(args.data_root or default_data_root()),
        manifest=manifest,
        fetcher=fetcher,
        force=args.force,
        keep_downloads=args.keep_downloads,
        relock=args.relock,
    )
    if args.list:
        list_datasets(ctx)
        return 0
    names = list(DATASETS) if "all" in args.names else list(dict.fromkeys(ALIASES.get(n, n) for n in args.names))
    outcomes: list[Outcome] = []
    for name in names:
        ds = get(name)
        try:
            outcomes.append(check(ctx, ds) if args.check else prepare(ctx, ds, args.source))
        except ManualStepRequired as e:
            ctx.say(name, f"MANUAL STEP NEEDED\n{e}")
            outcomes.append(Outcome(name, "manual", str(e)))
        except (PrepError, VerifyError, ManifestError, UnsafePathError) as e:
            ctx.say(name, f"FAILED: {e}")
            outcomes.append(Outcome(name, "failed", str(e)))
    if len(outcomes) > 1:
        ctx.out("summary: " + ", ".join(f"{o.name} {o.status}" for o in outcomes))
    if any(o.status == "failed" for o in outcomes):
        return 1
    return 2 if any(o.status == "manual" for o in outcomes) else 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
