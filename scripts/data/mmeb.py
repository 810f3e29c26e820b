"""MMEB-V1 evaluation data (``TIGER-Lab/MMEB-eval``: 36 task parquets + ``images.zip``) into ``<root>/mmeb/``.

Layout produced (what :mod:`eval.loaders.mmeb` reads): ``<Task>/test-00000-of-00001.parquet`` as downloaded,
and ``images/<path>`` for every image path a parquet names (only those are extracted from ``images.zip``).
The verification counts what an evaluation will encode: unique (instruction, text, image) items with an image
and text-only ones (the numbers behind the time estimate in docs/evaluation.md, section "MMEB").
The archive's member names are matched to the parquet paths as they are, or with their first folder dropped
(an archive that wraps everything in one top folder). Every download is hashed into the lock (sizes and
sha256, ``<data root>/.manifest-lock.json``); a second run does nothing; an interrupted download resumes.
"""

from __future__ import annotations

import os
from pathlib import Path

from e5v.data.paths import safe_join
from scripts.data.archives import extract_zip
from scripts.data.common import Dataset, PrepContext, PrepError, fetch_snapshot
from scripts.data.manifest import DatasetSpec, SourceSpec, VerifyError

PARQUET = "test-00000-of-00001.parquet"
ZIP = "images.zip"
IMAGE_DIR = "images"


def needed_images(out: Path, tasks: list[str]) -> set[str]:
    """Every image path the tasks' parquets name (queries and candidates)."""
    import pyarrow.parquet as pq

    paths: set[str] = set()
    for t in tasks:
        table = pq.read_table(out / t / PARQUET, columns=["qry_img_path", "tgt_img_path"])
        paths.update(p for p in table.column("qry_img_path").to_pylist() if p)
        for lst in table.column("tgt_img_path").to_pylist():
            paths.update(p for p in lst or [] if p)
    return paths


def member_mapper(wanted: set[str]):  # type: ignore[no-untyped-def]
    def select(member: str) -> str | None:
        if member in wanted:
            return member
        tail = member.split("/", 1)[1] if "/" in member else None
        return tail if tail in wanted else None

    return select


class Mmeb(Dataset):
    name = "mmeb"

    def build(self, ctx: PrepContext, spec: DatasetSpec, source: SourceSpec, out: Path, dl: Path) -> None:
        from eval.loaders.mmeb import V1_ORDER

        files = fetch_snapshot(ctx, self.name, source, dl)
        archive = None
        for p in files:
            rel = p.relative_to(dl).as_posix()
            if rel == ZIP:
                archive = p
                continue
            task = rel.split("/", 1)[0]
            if task not in V1_ORDER:
                continue  # a file of another subset: not one of the 36 V1 tasks
            target = safe_join(out, rel, where=f"hub snapshot of {source.repo_id}")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(p, target)
        missing = [t for t in V1_ORDER if not (out / t / PARQUET).is_file()]
        if missing:
            raise PrepError(f"mmeb: {source.repo_id} has no {PARQUET} for task(s) {missing}")
        if archive is None:
            raise PrepError(f"mmeb: {source.repo_id} has no {ZIP}")
        wanted = needed_images(out, V1_ORDER)
        n = extract_zip(archive, out / IMAGE_DIR, member_mapper(wanted))
        ctx.say(self.name, f"extracted {n:,} of the {len(wanted):,} images the 36 tasks name from {ZIP}")

    def verify(self, ctx: PrepContext, spec: DatasetSpec, out: Path) -> dict[str, int]:
        from eval.loaders import DataError, MissingDataError
        from eval.loaders.mmeb import V1_ORDER, load_local_task

        queries = candidates = 0
        images: set[str] = set()
        items: set[tuple[str, str, str]] = set()  # unique (instruction, text, image): what gets encoded
        for t in V1_ORDER:
            try:
                task = load_local_task(out, t, IMAGE_DIR)
            except (DataError, MissingDataError) as e:
                raise VerifyError(str(e)) from e
            queries += len(task.queries)
            for q in task.queries:
                candidates += len(q.candidates)
                for it in (q.query, *q.candidates):
                    items.add((it.instruction, it.text, it.image_key))
                    if it.image is not None:
                        images.add(it.image_key)
        with_image = sum(1 for i in items if i[2])
        return {"tasks": len(V1_ORDER), "queries": queries, "candidates": candidates, "images": len(images),
                "items_with_image": with_image, "text_items": len(items) - with_image}
