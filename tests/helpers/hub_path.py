"""The user's path on shrunk copies of the real hub checkpoints (tests/helpers/hub_layout.py), one process.

  python tests/helpers/hub_path.py OUT.json WORK_DIR CONFIG_NAME[=STAGE,STAGE] ...   (stages: load,encode,eval,train;
                                                                                   default all four)

CONFIG_NAME is a ``configs/backbone/<name>.yaml`` that names a hub id; its fixture folder is
``tests/fixtures/hub/<org>__<name>/``. For each:

* ``load``: build the shrunk copy, load it with ``Embedder.from_pretrained(folder)`` (the family found from
  the hub's config.json, the processor from the hub's processor files), embed texts and images of several
  sizes; record the family, the prompt, the widths and, per item, whether one-at-a-time equals batched;
* ``encode``: ``e5v-encode --model FOLDER --prompt P --texts / --images`` (the console script's main);
* ``eval``: ``e5v-eval backbone=NAME backbone.name_or_path=FOLDER suite=mini`` (small sizes);
* ``train``: ``e5v-train experiment=tiny_cpu backbone=NAME backbone.name_or_path=FOLDER`` one step, its
  adapter saved; ``e5v-merge ADAPTER OUT``; the merged folder reloaded and compared with the adapter applied
  to the base (``Embedder.from_pretrained(FOLDER, adapter=...)``) on texts and images.
Writes {name: {...figures...}} as JSON.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "eval"))

import hub_layout  # noqa: E402

# the mini suite at its smallest (every benchmark family still runs): real image geometry costs tokens
EVAL_SIZES = {"images": 4, "cirr_groups": 2, "fiq_images": 6, "sts_pairs": 2}
TEXTS = ["A dog runs on the beach.", "Two people ride bicycles down a quiet street at night.", "A cat."]


def images() -> list[Any]:
    from e5v.mini.world import sample_scenes

    return [s.render(w, h) for s, (w, h) in zip(sample_scenes(3, seed=5), [(64, 48), (40, 90), (120, 120)])]


def target(name: str) -> tuple[str, str, Path]:
    from e5v.config import compose

    cfg = compose("embed", [f"backbone={name}"])
    hub_id = str(cfg.backbone.name_or_path)
    return hub_id, str(cfg.prompt.name), hub_layout.fixture_dir(hub_id)


def stage_load(name: str, folder: Path, prompt: str) -> dict[str, Any]:
    from e5v import Embedder

    emb = Embedder.from_pretrained(str(folder), device="cpu", dtype="float32", batch_size=3)
    out: dict[str, Any] = {"family": emb.backbone.family, "prompt": emb.prompt.name, "expected_prompt": prompt,
                           "hidden_size": emb.backbone.hidden_size}
    batched = emb.encode_text(TEXTS, normalize=False)
    single = np.concatenate([emb.encode_text([t], normalize=False) for t in TEXTS])
    out["text_shape"] = list(batched.shape)
    out["text_batch_diff"] = float(np.abs(batched - single).max())
    if "image" in emb.backbone.modalities:
        ims = images()
        batched = emb.encode_image(ims, normalize=False)
        single = np.concatenate([emb.encode_image([im], normalize=False) for im in ims])
        out["image_shape"] = list(batched.shape)
        out["image_batch_diff"] = float(np.abs(batched - single).max())
        pairs = emb.encode_interleaved([(ims[0], "make it blue")], template="cirr_query", normalize=False)
        out["pair_shape"] = list(pairs.shape)
    out["finite"] = bool(np.isfinite(batched).all())
    return out


def stage_encode(name: str, folder: Path, prompt: str, work: Path) -> dict[str, Any]:
    from e5v.cli.encode import main as encode

    (work / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    imdir = work / "images"
    imdir.mkdir(exist_ok=True)
    for i, im in enumerate(images()):
        im.save(imdir / f"{i}.png")
    out: dict[str, Any] = {}
    for kind, src in (("texts", work / "texts.txt"), ("images", imdir)):
        dest = work / f"encode-{kind}"
        rc = encode(["--model", str(folder), "--prompt", prompt, f"--{kind}", str(src), "--out", str(dest),
                     "--device", "cpu", "--dtype", "float32"])
        out[f"{kind}_rc"] = rc
        out[f"{kind}_shape"] = list(np.load(dest / "embeddings.npy").shape) if rc == 0 else None
    return out


def stage_eval(name: str, folder: Path, work: Path) -> dict[str, Any]:
    from eval.runner import evaluate

    from evalkit import compose_eval

    cfg = compose_eval(work / "eval", work / "mini", f"backbone={name}", f"backbone.name_or_path={folder}",
                       "embedder.dtype=float32", sizes=EVAL_SIZES)
    res = evaluate(cfg, output_dir=work / "eval" / "out")
    return {"eval_benchmarks": sorted(res["metrics"]),
            "eval_in_range": all(-100.0 <= v <= 100.0 for m in res["metrics"].values() for v in m.values())}


def stage_train(name: str, folder: Path, work: Path, data_dir: Path) -> dict[str, Any]:
    import torch

    from e5v import Embedder
    from e5v.cli.merge import main as merge
    from e5v.config import compose
    from e5v.train import Trainer

    cfg = compose("train", [
        "experiment=tiny_cpu", f"backbone={name}", f"backbone.name_or_path={folder}", "data=mini_nli",
        f"paths.data_dir={data_dir}", "logger=none", f"run_name=hub-{name}", "trainer.precision=fp32",
        "lora.quantize=null", "lora.dropout=0", "lora.r=4", "trainer.global_batch=4", "trainer.micro_batch=4",
        "trainer.max_steps=1", "optim.warmup_steps=0",
    ])
    trainer = Trainer(cfg, work / "train")
    trainer.setup()
    loss = trainer.train_step()["loss"]
    trainer.step += 1
    adapter = trainer.save() / "adapter"
    del trainer
    merged = work / "merged"
    rc = merge([str(adapter), str(merged)])
    out: dict[str, Any] = {"loss": float(loss), "merge_rc": rc}
    if rc != 0:
        return out
    a = Embedder.from_pretrained(str(folder), adapter=str(adapter), device="cpu", dtype="float32", batch_size=3)
    m = Embedder.from_pretrained(str(merged), device="cpu", dtype="float32", batch_size=3)
    out["merged_prompt"], out["adapter_prompt"] = m.prompt.name, a.prompt.name
    diff = float(np.abs(a.encode_text(TEXTS, normalize=False) - m.encode_text(TEXTS, normalize=False)).max())
    if "image" in a.backbone.modalities:
        ims = images()
        diff = max(diff, float(np.abs(a.encode_image(ims, normalize=False)
                                      - m.encode_image(ims, normalize=False)).max()))
    out["reload_max_diff"] = diff
    base = Embedder.from_pretrained(str(folder), device="cpu", dtype="float32", batch_size=3)
    out["adapter_moved"] = float(np.abs(a.encode_text(TEXTS, normalize=False)
                                        - base.encode_text(TEXTS, normalize=False)).max())
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


def main() -> None:
    out_json, work_root = Path(sys.argv[1]), Path(sys.argv[2])
    plan = {}
    for arg in sys.argv[3:]:
        name, _, stages = arg.partition("=")
        plan[name] = set(stages.split(",")) if stages else {"load", "encode", "eval", "train"}
    from e5v import distributed as D

    training = any("train" in st for st in plan.values())
    if training:
        D.init_from_env()
    results: dict[str, Any] = {}
    for name, stages in plan.items():
        hub_id, prompt, fixture = target(name)
        work = work_root / name
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        folder = hub_layout.build(fixture, work_root / "built" / fixture.name)
        r: dict[str, Any] = {"hub_id": hub_id, "build_s": round(time.perf_counter() - t0, 1)}
        for stage in ("load", "encode", "eval", "train"):
            if stage not in stages:
                continue
            t0 = time.perf_counter()
            if stage == "load":
                r.update(stage_load(name, folder, prompt))
            elif stage == "encode":
                r.update(stage_encode(name, folder, prompt, work))
            elif stage == "eval":
                r.update(stage_eval(name, folder, work))
            else:
                r.update(stage_train(name, folder, work, work_root / "data"))
            r[f"{stage}_s"] = round(time.perf_counter() - t0, 1)
        results[name] = r
        out_json.write_text(json.dumps(results, indent=1))
    if training:
        D.shutdown()


if __name__ == "__main__":
    main()
