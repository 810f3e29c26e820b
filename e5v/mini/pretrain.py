"""Pretrain the tiny LLaVA-NeXT on the mini world with the ordinary next-token loss: the ``tiny_world`` backbone.

Why a training loop of its own: this is the stand-in for LLaVA-NeXT's own GENERATIVE pretraining (the
step before E5-V), not E5-V training. Its loss is the next-token loss on chat-formatted answers
(captions, one-word answers, paraphrases), computed by the Hugging Face model from ``labels``; the
contrastive trainer (:mod:`e5v.train`: prompts, last-token embeddings, InfoNCE, LoRA, DeepSpeed) has
none of that. It exists so that the mini-world replication can test E5-V's claims on a model that has
learnt to describe images and sentences at all. Pretraining data, all generated from the seed
(:mod:`e5v.mini.world`), in the Llama-3 chat format (the loss is on the answers only):

* image captioning: ``<image>`` + "Describe the image." -> a caption of the scene;
* one-word questions about an image or a sentence: "What is in the picture? Answer with one word."
  -> one attribute (colour, shape or size) of one object; the instruction wording differs from the
  E5-V prompts, which the model never sees in pretraining;
* sentence rewriting: a caption -> a paraphrase (text-only language modelling).

The vision tower, projector and language model are all trained (from the random tiny model). The
result is saved with ``save_pretrained`` into a folder (:func:`ensure`: the shipped copy in
``e5v/assets/tiny_world`` when intact, else built once into the cache, atomically) together with
``e5v_tiny_world.json`` (recipe, seed, final loss, weights sha256).

The backbone itself (its registry row and loader, ``_target_: e5v.backbones.tiny_world.load``) is
:mod:`e5v.backbones.tiny_world`, like every backbone: the registry finds backbones as the modules of
``e5v/backbones/``. It calls :func:`ensure` here and loads the folder through the same LLaVA-NeXT path
as real checkpoints. Build by hand: ``python -m e5v.mini.pretrain --out DIR``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from e5v.backbones import batching, llava_next, tiny
from e5v.mini.world import paraphrase, sample_scenes

log = logging.getLogger(__name__)

WORLD_VERSION = 1
WORLD_SIZES: dict[str, Any] = {
    **tiny.DEFAULT_SIZES,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vision_hidden_size": 64,
    "vision_intermediate_size": 128,
    "vision_layers": 2,
    "vision_heads": 4,
    "image_grid_pinpoints": [[32, 64], [64, 32]],  # at most 2 tiles + the base view: ~40 image tokens
}
RECIPE: dict[str, Any] = {"steps": 2500, "batch": 16, "lr": 1e-3, "warmup": 100, "pool": 1200, "image_px": 64}
# The seed-0 build ships with the package (3.4 MB, sha256 in its e5v_tiny_world.json) so that the demo
# and the replication need not pretrain; ``python -m e5v.mini.pretrain --out DIR`` rebuilds it.
ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny_world"

HEAD = "<|start_header_id|>user<|end_header_id|>\n\n"
MID = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
END = "<|eot_id|>"

IMAGE_ONE_WORD = (
    "What is in the picture? Answer with one word.",
    "Name one thing you see, in one word.",
    "Give a single word for this picture.",
)
TEXT_ONE_WORD = (
    "What is this sentence about? Answer with one word.",
    "Name one thing the text mentions, in one word.",
    "Give a single word for this text.",
)


def _one_word(scene: Any, rng: random.Random) -> str:
    o = rng.choice(scene.objects)
    return rng.choice([o.colour, o.shape, o.size])


def examples(seed: int, pool: int, image_px: int) -> tuple[list[tuple[Any, str, str]], list[tuple[str, str]]]:
    """(image, prompt, answer) and (prompt, answer) pools from the mini world."""
    rng = random.Random(seed + 7)
    scenes = sample_scenes(pool, seed=seed + 100, max_objects=3)
    image_ex, text_ex = [], []
    for s in scenes:
        img = s.render(image_px, image_px)
        image_ex.append((img, "<image>\nDescribe the image.", s.caption()))
        image_ex.append((img, "<image>\n" + rng.choice(IMAGE_ONE_WORD), _one_word(s, rng)))
        sentence = rng.choice([s.caption(), paraphrase(s, rng)])
        text_ex.append((sentence + "\n" + rng.choice(TEXT_ONE_WORD), _one_word(s, rng)))
        text_ex.append((s.caption() + "\nRewrite the sentence.", paraphrase(s, rng)))
    return image_ex, text_ex


def _batch(processor: Any, items: list[tuple], with_images: bool) -> dict[str, torch.Tensor]:
    """Chat-formatted batch with labels on the answer tokens only (left padded, positions from 0)."""
    tok = processor.tokenizer
    prompts = [HEAD + it[-2] + MID for it in items]
    answers = [it[-1] + END for it in items]
    full = [p + a for p, a in zip(prompts, answers)]
    if with_images:
        enc = processor(text=full, images=[it[0] for it in items], padding=True, return_tensors="pt")
    else:
        enc = tok(full, padding=True, return_tensors="pt")
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    for i, a in enumerate(answers):
        n_answer = len(tok(a, add_special_tokens=False)["input_ids"])
        labels[i, : labels.shape[1] - n_answer] = -100
    enc = dict(enc)
    enc["labels"] = labels
    enc["position_ids"] = batching.positions_from_mask(enc["attention_mask"])
    return enc


def pretrain(out: str | Path, seed: int = 0, recipe: dict[str, Any] | None = None, progress: bool = True) -> Path:
    """Build the tiny model, pretrain it on the mini world, save it to ``out``."""
    r = {**RECIPE, **(recipe or {})}
    out = Path(out)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        base = tiny.save_tiny(Path(tmp) / "base", seed=seed, **{k: v for k, v in WORLD_SIZES.items()
                                                                 if k in tiny.DEFAULT_SIZES})
        backbone = llava_next.load(str(base), dtype="float32", device="cpu", local_files_only=True, family="tiny")
    model, processor = backbone.model, backbone.processor
    model.train()
    model.requires_grad_(True)
    image_ex, text_ex = examples(seed, r["pool"], r["image_px"])
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=0.01)
    total = r["steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / r["warmup"]) * max(0.05, 1 - s / total)
    )
    torch.manual_seed(seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="pretrain tiny_world", unit="step")
    losses: list[float] = []
    for step in range(total):
        with_images = step % 2 == 0
        pool = image_ex if with_images else text_ex
        items = [pool[rng.randrange(len(pool))] for _ in range(r["batch"])]
        batch = _batch(processor, items, with_images)
        out_ = model(**batch, use_cache=False)
        opt.zero_grad(set_to_none=True)
        out_.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(out_.loss))
        if bar is not None:
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    if bar is not None:
        bar.close()
    del gen
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, is_main_process=True)
    processor.save_pretrained(out)
    weights = (out / "model.safetensors").read_bytes()
    meta = {
        "version": WORLD_VERSION,
        "seed": seed,
        "recipe": r,
        "sizes": WORLD_SIZES,
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "first_loss": sum(losses[:20]) / 20,
        "seconds": round(time.time() - t0, 1),
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    (out / "e5v_tiny_world.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def fingerprint(seed: int, recipe: dict[str, Any]) -> str:
    blob = json.dumps({"v": WORLD_VERSION, "tiny": tiny.TINY_VERSION, "seed": seed, "recipe": recipe,
                       "sizes": WORLD_SIZES}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def folder(seed: int = 0, cache_dir: str | Path | None = None, recipe: dict[str, Any] | None = None) -> Path:
    """Where the pretrained model is: the shipped copy when it is there and intact, else the cache."""
    r = {**RECIPE, **(recipe or {})}
    name = f"seed{seed}-{fingerprint(seed, r)}"
    shipped = ASSET_DIR / name
    if (shipped / "e5v_tiny_world.json").is_file() and _intact(shipped):
        return shipped
    root = Path(cache_dir) if cache_dir else tiny.cache_root() / "tiny_world"
    return root / name


def ensure(seed: int = 0, cache_dir: str | Path | None = None, recipe: dict[str, Any] | None = None) -> Path:
    """Directory of the pretrained model (built once into the cache, atomically, then reused)."""
    r = {**RECIPE, **(recipe or {})}
    from e5v.data.atomic import build_dir_once

    target = folder(seed, cache_dir, r)
    if target.parent == ASSET_DIR:
        return target
    if not (target / "e5v_tiny_world.json").is_file():
        log.warning("building tiny_world (seed %d): pretraining on the mini world, a few minutes on CPU", seed)
    return build_dir_once(target, lambda tmp: pretrain(tmp, seed=seed, recipe=r), "e5v_tiny_world.json")


def _intact(path: Path) -> bool:
    """The weights match the sha256 recorded when they were built."""
    meta = json.loads((path / "e5v_tiny_world.json").read_text())
    digest = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    if digest != meta.get("weights_sha256"):
        log.warning("%s: weights sha256 %s does not match the recorded %s; rebuilding in the cache",
                    path, digest[:12], str(meta.get("weights_sha256"))[:12])
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Pretrain the tiny_world backbone on the mini world (CPU, minutes).")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default: the cache)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=RECIPE["steps"])
    args = ap.parse_args(argv)
    recipe = {"steps": args.steps}
    path = pretrain(args.out, args.seed, recipe) if args.out else ensure(args.seed, recipe=recipe)
    print(json.dumps(json.loads((path / "e5v_tiny_world.json").read_text()), indent=2))
    print(f"saved to {path}")


if __name__ == "__main__":
    main()
