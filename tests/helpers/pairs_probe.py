"""Image-caption training, probed in one process (tiny backbone, data=mini_pairs):

1. the trainer's image-anchor embeddings (before any update: LoRA B is zero) equal the Embedder's
   ``encode_image`` on the base model, row by row, although the trainer's batches are padded
   differently (rows in sampler order, not length-sorted);
2. after ``STEPS`` optimizer steps every frozen parameter (vision tower, projector, lm_head,
   embeddings, base weights) is bit-identical and never received a gradient, while LoRA moved.

  python tests/helpers/pairs_probe.py OUT.json STEPS key=value ...
Writes {"embed_max_diff", "rows", "padded_rows", "frozen", "frozen_changed", "frozen_with_grad",
"lora_changed", "lora_total", "losses", "towers_training", "lm_training"} as JSON.
"""

from __future__ import annotations

import json
import sys

import torch


def main() -> None:
    out, steps, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    from e5v import Embedder
    from e5v import distributed as D
    from e5v.config import compose
    from e5v.prompts import PromptSet
    from e5v.train import Trainer
    from grad_probe import before_update

    D.init_from_env()
    cfg = compose("train", ["experiment=tiny_cpu", "data=mini_pairs", "logger=none", "run_name=probe", *overrides])
    trainer = Trainer(cfg, "/tmp/unused-pairs-probe-dir")
    trainer.setup()
    assert trainer.anchor_kind == "image"

    model = trainer.engine.module.model
    towers_training = any(m.training for tower in trainer.backbone.frozen(model) for m in tower.modules())
    lm_training = trainer.backbone.language_model(model).training

    # 1. image anchors as the embedder computes them
    rows = trainer.sampler.rows(0)[:12]
    trainer._tokens = 0
    with torch.no_grad():
        reps = trainer.encode(rows)  # (2, b, d)
    emb = Embedder.from_pretrained("tiny", prompt=PromptSet.from_config(cfg.prompt), device="cpu", batch_size=5)
    ref = emb.encode_image([trainer.data.queries[i].image for i in rows], normalize=False)
    embed_diff = (reps[0] - torch.from_numpy(ref)).abs().max().item()
    from e5v.data.images import load_image

    mask = trainer.inputs.prompt_images(trainer.prompt.render("image"),
                                        [load_image(trainer.data.queries[i].image) for i in rows])["attention_mask"]
    padded_rows = int((mask == 0).any(dim=1).sum())  # left-padded rows (images with fewer tokens)
    assert reps.shape[0] == 2 and reps.shape[1] == len(rows)

    # 2. frozen parameters stay bit-identical through STEPS optimizer steps
    named = dict(trainer.engine.module.named_parameters())
    frozen = {n: p.detach().clone() for n, p in named.items() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in named.items() if p.requires_grad}
    with_grad: set[str] = set()

    def hook(t: Trainer) -> None:
        with_grad.update(n for n, p in t.engine.module.named_parameters() if not p.requires_grad and p.grad is not None)

    before_update(trainer, hook)
    losses = []
    for _ in range(steps):
        losses.append(trainer.train_step()["loss"])
        trainer.step += 1
    named = dict(trainer.engine.module.named_parameters())
    changed = sorted(n for n, v in frozen.items() if not torch.equal(named[n].detach(), v))
    lora_changed = sum(not torch.equal(named[n].detach(), v) for n, v in lora.items())
    result = {
        "embed_max_diff": embed_diff,
        "rows": len(rows),
        "padded_rows": padded_rows,
        "frozen": sorted(frozen),
        "frozen_changed": changed,
        "frozen_with_grad": sorted(with_grad),
        "lora_changed": lora_changed,
        "lora_total": len(lora),
        "losses": losses,
        "towers_training": towers_training,
        "lm_training": lm_training,
    }
    with open(out, "w") as f:
        json.dump(result, f)
    D.shutdown()


if __name__ == "__main__":
    main()
