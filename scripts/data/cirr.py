"""CIRR (rc2) val + test1 into ``<root>/cirr/``: annotations from the official repository (branch
``cirr_dataset``, MIT); the images are NLVR2's, which its terms do not let a script fetch, so the user
requests them and this step verifies them and says exactly what is still missing.

Layout read by :mod:`eval.loaders.cirr`: ``captions/cap.rc2.{val,test1}.json``,
``image_splits/split.rc2.{val,test1}.json`` (names -> ``./dev/<name>.png`` / ``./test1/<name>.png``),
and the images at those paths under ``<root>/cirr/``.
"""

from __future__ import annotations

from pathlib import Path

from eval.loaders import DataFormatError, MissingDataError
from eval.loaders.cirr import SPLITS, load_cirr
from scripts.data.common import Dataset, PrepContext, place_url_files
from scripts.data.manifest import DatasetSpec, SourceSpec, VerifyError

NLVR2_PAGE = "https://github.com/lil-lab/nlvr/tree/master/nlvr2#direct-image-download"
NLVR2_FORM = "https://goo.gl/forms/yS29stWnFWzrDBFH3"
NLVR2_EMAIL = "nlvr@googlegroups.com"
FOLDER = {"val": "dev", "test1": "test1"}


def missing_images(out: Path) -> dict[str, tuple[int, list[str]]]:
    """Per split: (gallery size, relative paths of the images not on disk)."""
    result = {}
    for split in SPLITS:
        data = load_cirr(out, split, check_images=False)
        miss = [str(ref.path.relative_to(out.resolve())) for ref in data.gallery if ref.path and not ref.path.is_file()]
        result[split] = (len(data.gallery), miss)
    return result


def instructions(out: Path, missing: dict[str, tuple[int, list[str]]]) -> str:
    lines = [
        "CIRR annotations are in place, but images are missing. The images are NLVR2's; its terms do not allow",
        "redistribution, so this script cannot download them.",
    ]
    for split, (total, miss) in missing.items():
        if miss:
            lines.append(f"  {split}: {len(miss):,} of {total:,} images missing (e.g. {out / miss[0]})")
    lines += [
        "To get them:",
        f"  1. Request access to the NLVR2 images from its authors: fill in the Google Form ({NLVR2_FORM})",
        f"     linked at {NLVR2_PAGE}; it asks for your details and your",
        f"     agreement to their Terms of Service (answers take about a week; questions: {NLVR2_EMAIL}).",
        "  2. From what they send, put the dev and test1 images (train is not needed) at",
        f"       {out}/dev/<name>.png     e.g. {out}/dev/dev-0-0-img0.png",
        f"       {out}/test1/<name>.png   e.g. {out}/test1/test1-0-0-img0.png",
        "     (the names are the keys of image_splits/split.rc2.{val,test1}.json).",
    ]
    raw = out / "img_raw"
    if (raw / "dev").is_dir() or (raw / "test1").is_dir():
        lines.append(
            f"     You have the official layout under {raw}: `mv {raw}/dev {raw}/test1 {out}/`, or keep it and set "
            "benchmark.cirr.image_dir=img_raw benchmark.cirr_test1.image_dir=img_raw."
        )
    lines.append("  3. Run `make data-cirr` again: it checks every image and marks the dataset complete.")
    return "\n".join(lines)


class Cirr(Dataset):
    name = "cirr"
    in_place = True

    def build(self, ctx: PrepContext, spec: DatasetSpec, source: SourceSpec, out: Path, dl: Path) -> None:
        place_url_files(ctx, self.name, source, out, dl)

    def verify(self, ctx: PrepContext, spec: DatasetSpec, out: Path) -> dict[str, int]:
        counts = {}
        try:
            for split in SPLITS:
                data = load_cirr(out, split, check_images=False)
                counts[f"{split}_queries"] = len(data.queries)
                counts[f"{split}_images"] = len(data.gallery)
        except (MissingDataError, DataFormatError) as e:
            raise VerifyError(str(e)) from e
        return counts

    def pending(self, ctx: PrepContext, spec: DatasetSpec, out: Path) -> str | None:
        missing = missing_images(out)
        if any(miss for _, miss in missing.values()):
            return instructions(out, missing)
        return None
