"""The reference side of scripts/phi3v_remote_parity.py: runs in the transformers 4.44 environment (not ours),
with the hub's own Phi-3-V code (the .py files the user downloaded from the checkpoint). Not run directly.

  SIDE_PYTHON scripts/phi3v_remote_side.py REQUEST.json OUT.npz

Imports the hub's files as a package from ``request["remote_code"]`` (no ``trust_remote_code`` download path),
loads the checkpoint with its ``Phi3VForCausalLM`` (eager attention, fp32) and ``Phi3VProcessor``, and writes:

* ``proc_<i>_*``: the hub processor's outputs for every item (prompt, and its image);
* ``state_<i>``: the last token of the last (post-norm) hidden state, the hub processor's inputs, one item at a
  time (the release's recipe); ``given_<name>``: the same on the tensors the parity script gives (its batches);
* ``grad_<loss>_<module>/A|B`` and ``loss_<loss>``: one training step's LoRA gradients (the script's LoRA weights)
  on the given training batches, for the parity script's contrastive loss (``infonce``) and for a fixed
  cotangent on the states (``linear``: the backward pass alone).

One shim, not in the model's math: the hub's image embedding builds CLIP ViT-L/14-336 from a module constant;
the tiny checkpoint's tower (``img_processor.e5v_vision_config``: fewer layers, narrower MLP) is set on that
constant before the model is built. Nothing else of the hub's code is changed.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

FILES = ("configuration_phi3_v.py", "image_embedding_phi3_v.py", "image_processing_phi3_v.py",
         "modeling_phi3_v.py", "processing_phi3_v.py")


def import_remote(code_dir: Path, tower: dict, tmp: Path) -> dict:
    pkg = tmp / "phi3v_hub_code"
    pkg.mkdir()
    for f in FILES:
        shutil.copyfile(code_dir / f, pkg / f)
    (pkg / "__init__.py").write_text("")
    sys.path.insert(0, str(tmp))
    emb = importlib.import_module("phi3v_hub_code.image_embedding_phi3_v")
    for k, v in tower.items():  # the shim: the tiny tower on the hub's CLIP constant
        setattr(emb.CLIP_VIT_LARGE_PATCH14_336_CONFIG, k, v)
    return {m: importlib.import_module(f"phi3v_hub_code.{m}") for m in
            ("configuration_phi3_v", "modeling_phi3_v", "processing_phi3_v", "image_processing_phi3_v")}


class LoRALinear(torch.nn.Module):
    """base(x) + B(A(x)) * scaling: LoRA as peft computes it (no dropout)."""

    def __init__(self, base: torch.nn.Linear, a: np.ndarray, b: np.ndarray, scaling: float) -> None:
        super().__init__()
        self.base, self.scaling = base, scaling
        self.A = torch.nn.Parameter(torch.from_numpy(a).clone())
        self.B = torch.nn.Parameter(torch.from_numpy(b).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.A), self.B) * self.scaling


def last_states(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"].clone(),  # the hub's code clamps input_ids in place
                attention_mask=batch["attention_mask"], position_ids=batch.get("position_ids"),
                pixel_values=batch.get("pixel_values"), image_sizes=batch.get("image_sizes"),
                output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1][:, -1]


def contrastive(q: torch.Tensor, d: torch.Tensor, tau: float) -> torch.Tensor:
    logits = F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).T / tau
    return F.cross_entropy(logits, torch.arange(q.shape[0]))


def main() -> None:
    req = json.loads(Path(sys.argv[1]).read_text())
    given = dict(np.load(req["tensors"]))
    out: dict[str, np.ndarray] = {}
    import transformers

    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        mods = import_remote(Path(req["remote_code"]), req["tower"], Path(tmp))
        cfg = mods["configuration_phi3_v"].Phi3VConfig.from_pretrained(req["checkpoint"])
        model, info = mods["modeling_phi3_v"].Phi3VForCausalLM.from_pretrained(
            req["checkpoint"], config=cfg, torch_dtype=torch.float32, attn_implementation="eager",
            output_loading_info=True)
        model.eval()
        wte_shared = model.model.vision_embed_tokens.wte is model.model.embed_tokens
        # what Phi3VProcessor.from_pretrained resolves through the hub's auto_map: its image processor from
        # preprocessor_config.json, and LlamaTokenizerFast (its tokenizer_class, fast) from the tokenizer files
        processor = mods["processing_phi3_v"].Phi3VProcessor(
            image_processor=mods["image_processing_phi3_v"].Phi3VImageProcessor.from_pretrained(req["checkpoint"]),
            tokenizer=transformers.LlamaTokenizerFast.from_pretrained(req["checkpoint"]))
        for i, item in enumerate(req["items"]):
            if item["image"] is None:
                enc = processor(item["prompt"], return_tensors="pt")
            else:
                with Image.open(item["image"]) as im:
                    enc = processor(item["prompt"], [im.convert("RGB")], return_tensors="pt")
            for k in ("input_ids", "pixel_values", "image_sizes"):
                if k in enc:
                    out[f"proc_{i}_{k}"] = enc[k].numpy()
            out[f"state_{i}"] = last_states(model, dict(enc)).numpy()

        def batch(name: str) -> dict:
            return {k.split("/", 1)[1]: torch.from_numpy(v) for k, v in given.items() if k.startswith(name + "/")}

        for name in req["given"]:
            out[f"given_{name}"] = last_states(model, batch(name)).numpy()

        # one training step's LoRA gradients
        lora = dict(np.load(req["lora"]))
        model.requires_grad_(False)  # only the LoRA matrices are trained
        wrapped = {}
        for path in req["lora_modules"]:
            parent, leaf = path.rsplit(".", 1)
            owner = model.get_submodule(parent)
            wrapped[path] = LoRALinear(getattr(owner, leaf), lora[f"{path}/A"], lora[f"{path}/B"], req["scaling"])
            setattr(owner, leaf, wrapped[path])
        cot = {k: torch.from_numpy(v) for k, v in np.load(req["cotangents"]).items()}
        with torch.enable_grad():
            q = last_states(model, batch(req["train"][0]))
            d = last_states(model, batch(req["train"][1]))
            losses = {"infonce": contrastive(q, d, req["tau"]), "linear": (q * cot["q"]).sum() + (d * cot["d"]).sum()}
            for name, loss in losses.items():
                for m in wrapped.values():
                    m.A.grad = m.B.grad = None
                loss.backward(retain_graph=True)
                out[f"loss_{name}"] = np.array(loss.item())
                for path, m in wrapped.items():
                    out[f"grad_{name}_{path}/A"], out[f"grad_{name}_{path}/B"] = m.A.grad.numpy(), m.B.grad.numpy()
    np.savez(sys.argv[2], **out)
    Path(sys.argv[2] + ".json").write_text(json.dumps({
        "transformers": transformers.__version__, "torch": torch.__version__,
        "loading_info": {k: sorted(v) for k, v in info.items()}, "wte_shared_with_embed_tokens": wte_shared,
        "model_class": f"{type(model).__module__}.{type(model).__name__}"}))


if __name__ == "__main__":
    main()
