"""Fetch the small metadata files of every configured hub checkpoint into tests/fixtures/hub/ (needs the hub).

  python -m scripts.fetch_hub_fixtures                 # every configs/backbone/*.yaml that names a hub id
  python -m scripts.fetch_hub_fixtures qwen2_vl_2b phi3_v --revision-from-config
  make hub-fixtures                                     # the same as the first line

For each checkpoint: config.json, the processor / preprocessor / tokenizer configs, chat templates,
special_tokens_map.json, generation_config.json (those the repository has; never tokenizer.json, vocabularies
or weights), and the weight names: ``model.safetensors.index.json`` for sharded checkpoints, else
``weight_keys.txt`` (name, dtype, shape per tensor) read from the single file's safetensors header over HTTP
(``huggingface_hub.get_safetensors_metadata``: a few kB, no weights downloaded). SOURCE.md records the hub
revision (commit sha) each file came from. Files already there are replaced only with ``--overwrite``; the
previous SOURCE.md notes are kept below the new table.

The tests (tests/test_hub_checkpoints.py) build shrunk, random, loadable copies from these files and take
each through the user's path; a checkpoint whose fixture lacks a file its loader needs is skipped with a
message naming this command. This machine's CI has no hub access: run this where the hub is reachable and
commit the result.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "hub"
SMALL_FILES = ("config.json", "preprocessor_config.json", "processor_config.json", "tokenizer_config.json",
               "chat_template.json", "chat_template.jinja", "special_tokens_map.json", "generation_config.json",
               "video_preprocessor_config.json", "model.safetensors.index.json")


def configured() -> dict[str, str]:
    """configs/backbone/<name>.yaml -> the hub id it names."""
    from e5v.config import config_dir

    out = {}
    for f in sorted((config_dir() / "backbone").glob("*.yaml")):
        m = re.search(r"^\s*name_or_path:\s*([\w.-]+/[\w.-]+)\s*$", f.read_text(), re.M)
        if m:
            out[f.stem] = m.group(1)
    return out


def fetch(hub_id: str, revision: str | None, overwrite: bool) -> list[str]:
    from huggingface_hub import HfApi, get_safetensors_metadata, hf_hub_download

    api = HfApi()
    info = api.model_info(hub_id, revision=revision)
    sha = info.sha
    names = {s.rfilename for s in info.siblings or []}
    dest = FIXTURES / hub_id.replace("/", "__")
    dest.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in SMALL_FILES:
        if name not in names:
            continue
        if (dest / name).exists() and not overwrite:
            rows.append(f"| {name} | kept (already here; --overwrite to replace) | |")
            continue
        local = hf_hub_download(hub_id, name, revision=sha)
        (dest / name).write_bytes(Path(local).read_bytes())
        rows.append(f"| {name} | https://huggingface.co/{hub_id}/blob/{sha}/{name} | {sha} |")
    if "model.safetensors.index.json" not in names and "model.safetensors" in names:
        if overwrite or not (dest / "weight_keys.txt").exists():
            meta = get_safetensors_metadata(hub_id, revision=sha)
            lines = [f"# tensor names of {hub_id}@{sha} model.safetensors (safetensors header): name, dtype, shape"]
            for fm in meta.files_metadata.values():
                for key, t in sorted(fm.tensors.items()):
                    lines.append(f"{key}\t{t.dtype}\t{list(t.shape)}")
            (dest / "weight_keys.txt").write_text("\n".join(lines) + "\n")
            rows.append(f"| weight_keys.txt | safetensors header of https://huggingface.co/{hub_id}/blob/{sha}/model.safetensors | {sha} |")
    source = dest / "SOURCE.md"
    previous = source.read_text() if source.is_file() else ""
    table = "\n".join(["| file | source | hub revision |", "|---|---|---|", *rows])
    source.write_text(f"# {hub_id}: provenance\n\nFetched by scripts/fetch_hub_fixtures.py on "
                      f"{_dt.date.today().isoformat()} from the hub at revision {sha}.\n\n{table}\n"
                      + (f"\n## Earlier notes\n\n{previous}" if previous else ""))
    return [r.split(" | ")[0].strip("| ") for r in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="configs/backbone names (default: every one naming a hub id)")
    parser.add_argument("--overwrite", action="store_true", help="replace files already in the fixture folder")
    parser.add_argument("--revision-from-config", action="store_true",
                        help="fetch at the backbone YAML's backbone.revision when it pins one (default: main)")
    args = parser.parse_args(argv)
    table = configured()
    unknown = sorted(set(args.names) - set(table))
    if unknown:
        print(f"error: not a configured hub backbone: {', '.join(unknown)}; known: {', '.join(table)}", file=sys.stderr)
        return 2
    done: set[str] = set()
    for name in args.names or list(table):
        hub_id = table[name]
        if hub_id in done:
            continue
        revision = None
        if args.revision_from_config:
            from e5v.config import compose

            revision = compose("embed", [f"backbone={name}"]).backbone.get("revision")
        try:
            files = fetch(hub_id, revision, args.overwrite)
        except Exception as err:  # network, gated repo, unknown id: one line each, go on with the others
            print(f"{hub_id}: not fetched ({type(err).__name__}: {str(err).splitlines()[0]})", file=sys.stderr)
            continue
        done.add(hub_id)
        print(f"{hub_id}: {', '.join(files) or 'nothing new'}")
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
