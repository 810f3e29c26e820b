"""Train/inference parity, one training step, frozen towers and merge, for each named backbone, in one process
(the DeepSpeed engine needs the launcher environment; tests/test_backbone_contract.py runs this as a subprocess).

  python tests/helpers/backbone_probe.py OUT.json DATA_DIR tiny tiny_qwen2_vl ...

For each backbone (its configs/backbone/<name>.yaml, fp32, LoRA dropout 0, the fixed training template):
1. ``trainer.train_step()`` once (LoRA moves; the frozen vision tower / projector must not);
2. the trainer's embeddings of a batch (its own rows order and padding, through the DeepSpeed engine)
   vs ``Embedder(trainer.backbone, trainer.prompt)`` on the same sentences (length-sorted, other padding),
   texts in the training template; images in the image prompt for backbones that take images;
3. the adapter saved, merged with ``e5v.lora.merge_to_dir``, the merged folder loaded through the registry
   (its model type) and embedding the same as the unmerged LoRA model.
Writes {name: {"text_max_diff", "image_max_diff", "merge_max_diff", "loss", "lora_changed", "lora_total",
"frozen_tower_params", "frozen_changed", "frozen_with_grad", "outside_lm_trainable"}} as JSON.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


def probe(name: str, data_dir: str, work: Path) -> dict:
    from e5v import Embedder
    from e5v.config import compose
    from e5v.lora import merge_to_dir
    from e5v.train import Trainer

    cfg = compose("train", [
        "experiment=tiny_cpu", f"backbone={name}", "data=mini_nli", f"paths.data_dir={data_dir}", "logger=none",
        f"run_name=probe-{name}", "trainer.precision=fp32", "lora.quantize=null", "lora.dropout=0", "lora.r=4",
        "trainer.global_batch=8", "trainer.micro_batch=8", "trainer.max_steps=1", "optim.warmup_steps=0",
        "prompt.train_mode=fixed", "trainer.attend_padding=false",
    ])
    trainer = Trainer(cfg, work / name)
    trainer.setup()
    model = trainer.engine.module.model
    towers = {f"{i}.{n}": p for i, m in enumerate(trainer.backbone.frozen(model)) for n, p in m.named_parameters()}
    before = {n: p.detach().clone() for n, p in towers.items()}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    outside = [n for n in lora if not trainer.backbone.in_language_model(n)]
    with_grad: set[str] = set()

    hook_calls = []

    def hook(t: Trainer) -> None:
        hook_calls.append(1)
        with_grad.update(n for n, p in towers.items() if p.grad is not None)

    from grad_probe import before_update

    before_update(trainer, hook)
    loss = trainer.train_step()["loss"]
    trainer.step += 1
    assert hook_calls, "the before-update hook did not run"
    named = dict(model.named_parameters())
    lora_changed = sum(not torch.equal(named[n].detach(), v) for n, v in lora.items())
    frozen_changed = sorted(n for n, v in before.items() if not torch.equal(towers[n].detach(), v))

    # parity: the trainer's forward (engine, its batch) vs the Embedder's (sorted, padded otherwise)
    trainer.encoder.eval()
    rows = trainer.sampler.rows(0)[:7]
    d = trainer.raw_data  # the NLI triplets as loaded
    sentences = [col[i] for col in (d.anchors, d.positives, d.negatives) for i in rows]
    emb = Embedder(trainer.backbone, trainer.prompt, batch_size=5)
    assert trainer.texts_for(rows) == [trainer.prompt.render("train", s) for s in sentences]  # no cut
    with torch.no_grad():
        ours = trainer.encode(rows).reshape(-1, trainer.backbone.hidden_size).numpy()
    ref = emb.encode_text(sentences, template="train", normalize=False)
    out = {"text_max_diff": float(np.abs(ours - ref).max()), "loss": loss, "lora_changed": lora_changed,
           "lora_total": len(lora), "frozen_tower_params": len(towers), "frozen_changed": frozen_changed,
           "frozen_with_grad": sorted(with_grad), "outside_lm_trainable": outside, "image_max_diff": None}
    images = None
    if "image" in trainer.backbone.modalities:
        from e5v.mini.world import sample_scenes

        images = [s.render(24 + 13 * k, 60 - 7 * k) for k, s in enumerate(sample_scenes(5, seed=3))]
        with torch.no_grad():
            mine = trainer._forward(trainer.inputs.prompt_images(trainer.prompt.render("image"), images)).numpy()
        theirs = emb.encode_image(images, batch_size=2, normalize=False)  # other batches, other padding
        out["image_max_diff"] = float(np.abs(mine - theirs).max())

    # merge: the saved adapter folded into the weights, loaded back through the registry
    adapter = trainer.save() / "adapter"
    merged_dir = merge_to_dir(adapter, work / f"{name}-merged")
    merged = Embedder.from_pretrained(str(merged_dir), prompt=trainer.prompt, device="cpu", batch_size=5)
    diff = np.abs(merged.encode_text(sentences[:7], template="train", normalize=False) - ref[:7]).max()
    if images is not None:
        diff = max(diff, np.abs(merged.encode_image(images, normalize=False) - theirs).max())
    out["merge_max_diff"] = float(diff)
    out["merged_family"] = merged.backbone.family
    return out


def main() -> None:
    out, data_dir, names = sys.argv[1], sys.argv[2], sys.argv[3:]
    from e5v import distributed as D

    D.init_from_env()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            results[name] = probe(name, data_dir, Path(tmp))
    Path(out).write_text(json.dumps(results, indent=1))
    D.shutdown()


if __name__ == "__main__":
    main()
