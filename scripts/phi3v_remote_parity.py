"""Our native Phi-3-V (transformers 5) against the hub's own remote code (transformers 4.44), fp32, on a random
checkpoint of the real layout.

Run (the hub's five .py files are not shipped here: get them from the checkpoint you use, e.g.
``huggingface-cli download microsoft/Phi-3-vision-128k-instruct --include "*.py" --local-dir DIR``):

  python -m scripts.phi3v_remote_parity --remote-code DIR [--venv PATH] [--work DIR] [--seed 0]

1. creates (once) a side environment with transformers 4.44.2, tokenizers 0.19.1, torch 2.13.0 and
   torchvision 0.28.0 (the hub's image processor imports it; pip's PyPI build, hence ``--isolated``: a CPU-only
   torch found through local pip settings cannot load it), ~3 GB, reused after;
2. builds a random Phi-3-V in the hub's layout with e5v's own builder (``e5v.backbones.phi3_v.save_tiny``: the
   hub's config fields, weight names, preprocessor config) at the real crop geometry (CLIP width 1024, 336 px
   crops, 14 px patches, 144 tokens per crop, the hub's code asserts them) with a 2-layer tower and a 2-layer,
   192-wide Phi-3 (head 96, the hub's 48 LongRoPE factors per list), ``original_max_position_embeddings`` 256
   so that image inputs take the long factors and texts the short ones;
3. ours: the Embedder (batches of 4, left padded) for texts, images of 7 sizes (2 to 4 crops) and image+text;
   one training step (LoRA r=4 on the release's targets, B drawn so that A gets a gradient too; a text batch
   and an image+text batch), its LoRA gradients for the InfoNCE loss (temperature 0.05, as configs/loss) and
   for a fixed random cotangent on the states (the backward pass alone);
4. the hub's: its processor and ``Phi3VForCausalLM`` (scripts/phi3v_remote_side.py), one item at a time as the
   release embeds, ``hidden_states[-1][:, -1]``; our batches given to its model; the same LoRA step;
5. prints the max abs differences and fails (exit 1) if a processor output differs, a state differs by more
   than ``--tol`` (1e-5), or the LoRA gradients (relative: per tensor, max abs difference over max abs value,
   the worst tensor) differ from the hub's, or from the same step in float64, by more than ``--tol`` or by more
   than twice the hub's own distance to float64, whichever is larger (summing over ~3,000 tokens, fp32
   gradients carry ~1e-5 of rounding on either side).

Exit codes: 0 pass, 1 mismatch, 2 bad arguments or the side environment could not be built, 3 the package
registry is unreachable. Measured figures and the command: docs/backbones.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SIDE_REQUIREMENTS = ("torch==2.13.0", "torchvision==0.28.0", "transformers==4.44.2", "tokenizers==0.19.1",
                     "safetensors>=0.4.3", "pillow", "numpy<2")
REMOTE_FILES = ("configuration_phi3_v.py", "image_embedding_phi3_v.py", "image_processing_phi3_v.py",
                "modeling_phi3_v.py", "processing_phi3_v.py")
# the real crop geometry (the hub's code asserts 336 px crops of 24 x 24 patches, CLIP width 1024), small depths
SIZES: dict[str, Any] = {
    "vocab_size": 640, "hidden_size": 192, "intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 131072,
    "original_max_position_embeddings": 256,
    "vision_image_size": 336, "vision_patch_size": 14, "vision_hidden_size": 1024, "vision_intermediate_size": 256,
    "vision_layers": 2, "vision_heads": 16, "num_crops": 4,
}
TEXTS = ["A small red circle at the top.", "Two blue squares.",
         "A man is walking a brown dog in the street near a large house with many trees.", "cat"]
EDITS = ["make it blue", "remove the dog", "two of them, on the left", "darker"]
# HD grids at num_crops 4 (columns x rows): 2x2, 3x1, 1x4, 2x2, 2x1, 4x1, 2x2 (the hub's code also runs CLIP on the
# zero crops up to 5 per image; ours skips them)
IMAGE_SIZES = ((40, 40), (90, 30), (30, 200), (500, 333), (250, 100), (700, 120), (64, 96))
LORA = {"r": 4, "alpha": 8}
TAU = 0.05  # configs/loss: the InfoNCE temperature


def make_images(work: Path) -> list[Path]:
    from PIL import Image

    out = []
    for i, (w, h) in enumerate(IMAGE_SIZES):
        p = work / "images" / f"{i}_{w}x{h}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB").save(p)
        out.append(p)
    return out


def side_checkpoint(ckpt: Path, out: Path) -> Path:
    """The checkpoint as transformers 4.44 / tokenizers 0.19 read it: the same weights and configs, the
    tokenizer files in the older format (e5v.export_compat's conversion)."""
    from e5v.export_compat import v4_tokenizer_config, v4_tokenizer_json

    shutil.copytree(ckpt, out)
    tok = json.loads((out / "tokenizer.json").read_text())
    (out / "tokenizer.json").write_text(json.dumps(v4_tokenizer_json(tok)))
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    jinja = out / "chat_template.jinja"
    (out / "tokenizer_config.json").write_text(json.dumps(v4_tokenizer_config(
        cfg, jinja.read_text() if jinja.is_file() else None)))
    return out


def contrastive(q: Any, d: Any, tau: float) -> Any:
    import torch.nn.functional as F  # noqa: N812
    import torch

    logits = F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).T / tau
    return F.cross_entropy(logits, torch.arange(q.shape[0]))


def _lora_key(param_name: str) -> str:
    """peft's ``base_model.model.<module>.lora_A.default.weight`` -> ``<module>/A`` (the hub's module names)."""
    return f"{param_name.removeprefix('base_model.model.').split('.lora_')[0]}/{'A' if '.lora_A.' in param_name else 'B'}"


def lora_step(b: Any, peft_model: Any, given: dict[str, Any], cot: dict[str, Any]) -> tuple[dict, dict]:
    """LoRA gradients of the InfoNCE loss between the two training batches and of a fixed cotangent on them."""
    q = b.forward(given["train_q"], model=peft_model)
    d = b.forward(given["train_d"], model=peft_model)
    losses = {"infonce": contrastive(q, d, TAU), "linear": (q * cot["q"]).sum() + (d * cot["d"]).sum()}
    grads: dict[str, dict[str, np.ndarray]] = {}
    for name, loss in losses.items():
        peft_model.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        grads[name] = {_lora_key(n): w.grad.double().numpy() for n, w in peft_model.named_parameters()
                       if w.requires_grad}
    return grads, {k: float(v.detach()) for k, v in losses.items()}


def ours(ckpt: Path, images: list[Path], seed: int) -> dict[str, Any]:
    """Our embeddings, per-item processor outputs, the batches given to the hub's model, the LoRA step."""
    import torch
    from PIL import Image

    from e5v import Embedder
    from e5v.lora import add_lora

    emb = Embedder.from_pretrained(str(ckpt), device="cpu", batch_size=4, packing="false")
    b, inputs, p = emb.backbone, emb.inputs, emb.prompt
    pil = [Image.open(f).convert("RGB") for f in images]
    pairs = [(im, EDITS[i % len(EDITS)]) for i, im in enumerate(pil)]
    items = ([{"kind": "text", "prompt": p.render("text", t), "image": None} for t in TEXTS]
             + [{"kind": "image", "prompt": p.render("image"), "image": str(f)} for f in images]
             + [{"kind": "interleaved", "prompt": p.render("cirr_query", e), "image": str(f)}
                for f, (_, e) in zip(images, pairs)])
    states = np.concatenate([emb.encode_text(TEXTS, normalize=False), emb.encode_image(pil, normalize=False),
                             emb.encode_interleaved(pairs, normalize=False)])
    procs = []
    for it in items:
        if it["image"] is None:
            procs.append({"input_ids": np.asarray([inputs.tokenize([it["prompt"]])[0]])})
        else:
            enc = b.processor(it["prompt"], [pil[[str(f) for f in images].index(it["image"])]])
            procs.append({k: enc[k].numpy() for k in ("input_ids", "pixel_values", "image_sizes")})
    # the batches our Inputs build (left padded), for the hub's model, and the training step's
    given = {
        "text": inputs.text(inputs.tokenize([p.render("text", t) for t in TEXTS])),
        "image": inputs.prompt_images(p.render("image"), pil[:4]),
        "interleaved": inputs.images([(None, p.render("cirr_query", e)) for _, e in pairs[3:]], pil[3:]),
        "train_q": inputs.text(inputs.tokenize([p.render("train", t) for t in TEXTS])),
        "train_d": inputs.images([(None, p.render("cirr_query", e)) for _, e in pairs[:4]], pil[:4]),
    }
    with torch.no_grad():
        given_states = {k: b.forward(v).numpy() for k, v in given.items() if not k.startswith("train")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = add_lora(b, r=LORA["r"], alpha=LORA["alpha"], dropout=0.0)
        with torch.no_grad():  # B is zero at init: draw it, so that A gets a gradient too
            for n, w in peft_model.named_parameters():
                if "lora_B" in n:
                    w.normal_(0.0, 0.5)
    lora = {_lora_key(n): w.detach().numpy().copy() for n, w in peft_model.named_parameters() if w.requires_grad}
    modules = list(dict.fromkeys(k.rsplit("/", 1)[0] for k in lora))
    gen = torch.Generator().manual_seed(seed)
    cot = {"q": torch.randn(4, b.hidden_size, generator=gen), "d": torch.randn(4, b.hidden_size, generator=gen)}
    grads, losses = lora_step(b, peft_model, given, cot)
    # the rounding floor: the same step in float64 (our code; the norms and rotary tables stay fp32 inside)
    from e5v.backbones.phi3_v import load

    b64 = load(str(ckpt), dtype=torch.float64, device="cpu", local_files_only=True, attn_implementation="sdpa")
    peft64 = add_lora(b64, r=LORA["r"], alpha=LORA["alpha"], dropout=0.0)
    with torch.no_grad():
        for n, w in peft64.named_parameters():
            if w.requires_grad:
                w.copy_(torch.from_numpy(lora[_lora_key(n)]).double())
    grads64, _ = lora_step(b64, peft64, given, {k: v.double() for k, v in cot.items()})
    tower = json.loads((ckpt / "config.json").read_text())["img_processor"].get("e5v_vision_config", {})
    return {"items": items, "states": states, "procs": procs, "given": {k: {n: t.numpy() for n, t in v.items()}
            for k, v in given.items()}, "given_states": given_states, "lora": lora, "modules": modules,
            "grads": grads, "grads64": grads64, "loss": losses,
            "cotangents": {k: v.numpy() for k, v in cot.items()}, "tower": tower, "scaling": LORA["alpha"] / LORA["r"],
            "attn": b.info.get("attn_implementation")}


def run_side(python: Path, side_ckpt: Path, remote_code: Path, mine: dict[str, Any], work: Path) -> dict[str, Any]:
    tensors = {f"{k}/{n}": t for k, v in mine["given"].items() for n, t in v.items()}
    np.savez(work / "given.npz", **tensors)
    np.savez(work / "lora.npz", **mine["lora"])
    np.savez(work / "cotangents.npz", **mine["cotangents"])
    req = {"checkpoint": str(side_ckpt), "remote_code": str(remote_code), "tower": mine["tower"],
           "items": mine["items"], "tensors": str(work / "given.npz"), "given": sorted(mine["given_states"]),
           "lora": str(work / "lora.npz"), "lora_modules": mine["modules"], "scaling": mine["scaling"],
           "train": ["train_q", "train_d"], "tau": TAU, "cotangents": str(work / "cotangents.npz")}
    (work / "request.json").write_text(json.dumps(req))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = work / "side.npz"
    p = subprocess.run([str(python), str(REPO / "scripts" / "phi3v_remote_side.py"), str(work / "request.json"),
                        str(out)], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"the hub's code under transformers 4.44 failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return {"arrays": dict(np.load(out)), "info": json.loads(Path(str(out) + ".json").read_text())}


def compare(mine: dict[str, Any], side: dict[str, Any], tol: float) -> tuple[dict[str, Any], list[str]]:
    a, failures = side["arrays"], []
    kinds = [it["kind"] for it in mine["items"]]
    # the processor: same ids (exact), same image sizes, pixels
    ids_equal, px = True, 0.0
    for i, pr in enumerate(mine["procs"]):
        ids_equal &= np.array_equal(pr["input_ids"], a[f"proc_{i}_input_ids"])
        if "pixel_values" in pr:
            ids_equal &= np.array_equal(pr["image_sizes"], a[f"proc_{i}_image_sizes"])
            px = max(px, float(np.abs(pr["pixel_values"] - a[f"proc_{i}_pixel_values"]).max()))
    if not ids_equal:
        failures.append("the processors give other input ids or image sizes")
    if px > 1e-5:
        failures.append(f"the image processors' pixels differ by {px:.3g}")
    hub = np.concatenate([a[f"state_{i}"] for i in range(len(kinds))])
    fig: dict[str, Any] = {"processor_ids_equal": ids_equal, "pixel_max_abs_diff": px}
    for kind in ("text", "image", "interleaved"):
        sel = [i for i, k in enumerate(kinds) if k == kind]
        fig[kind] = float(np.abs(mine["states"][sel] - hub[sel]).max())
        fig[f"{kind}_given_batch"] = float(np.abs(mine["given_states"][kind] - a[f"given_{kind}"]).max())
        fig[f"{kind}_scale"] = float(np.abs(hub[sel]).max())
        for key in (kind, f"{kind}_given_batch"):
            if fig[key] > tol:
                failures.append(f"{key}: max abs diff {fig[key]:.3g} > {tol}")
    def rel(x: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> float:  # the worst tensor's max |x-y| / max |y|
        return max(float(np.abs(x[k] - y[k]).max() / max(np.abs(y[k]).max(), 1e-30)) for k in y)

    for name, grads in mine["grads"].items():
        hub_g = {k: a[f"grad_{name}_{k}"].astype(np.float64) for k in grads}
        ref = mine["grads64"][name]
        vs_hub, ours_floor, hub_floor = rel(grads, hub_g), rel(grads, ref), rel(hub_g, ref)
        fig[f"grad_{name}"] = {"ours_vs_hub": vs_hub, "ours_vs_float64": ours_floor, "hub_vs_float64": hub_floor,
                               "max_abs": max(float(np.abs(g).max()) for g in hub_g.values()),
                               "loss": mine["loss"][name], "loss_hub": float(a[f"loss_{name}"])}
        limit = max(tol, 2 * hub_floor)  # within tol, or within twice the hub's own fp32 rounding
        if max(vs_hub, ours_floor) > limit:
            failures.append(f"LoRA gradients ({name}): ours vs the hub's {vs_hub:.3g}, vs float64 {ours_floor:.3g} "
                            f"> {limit:.3g} (the hub's own distance to float64: {hub_floor:.3g})")
    fig["grad_tensors"] = len(mine["grads"]["linear"])
    info = side["info"]["loading_info"]
    unexpected, missing = info.get("unexpected_keys", []), info.get("missing_keys", [])
    if unexpected or set(missing) - {"model.vision_embed_tokens.wte.weight"} or not side["info"][
            "wte_shared_with_embed_tokens"]:
        failures.append(f"the hub's model does not load our checkpoint cleanly: {info}")
    fig["hub_loading"] = info
    return fig, failures


def main(argv: list[str] | None = None) -> int:
    from scripts.compat_v4 import EXIT_ENV, EXIT_MISMATCH, EXIT_UNREACHABLE, EnvError, ensure_v4_venv

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--remote-code", type=Path, required=True, help="folder with the hub's Phi-3-V .py files")
    ap.add_argument("--venv", type=Path, default=None, help="the side environment (default: <cache>/venv-tf4-phi3v)")
    ap.add_argument("--work", type=Path, default=None, help="a new folder for the checkpoint and arrays (default: temp)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=1e-5)
    args = ap.parse_args(argv)
    missing = [f for f in REMOTE_FILES if not (args.remote_code / f).is_file()]
    if missing:
        print(f"phi3v-parity: {args.remote_code} lacks {missing}: download the checkpoint's .py files", file=sys.stderr)
        return EXIT_ENV
    if args.work is not None and args.work.exists() and any(args.work.iterdir()):
        print(f"phi3v-parity: --work {args.work} is not empty; give a new folder", file=sys.stderr)
        return EXIT_ENV
    os.environ.setdefault("E5V_NO_PROGRESS", "1")
    from e5v.backbones.tiny import cache_root

    t0 = time.perf_counter()
    try:
        python = ensure_v4_venv(args.venv or cache_root() / "venv-tf4-phi3v", SIDE_REQUIREMENTS, ("--isolated",))
    except EnvError as e:
        print(f"phi3v-parity: cannot build the transformers 4.44 environment: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE if e.unreachable else EXIT_ENV
    t_env = time.perf_counter() - t0
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="e5v-phi3v-parity-")
    work = Path(args.work or tmp.name)  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    try:
        from transformers.utils import logging as hf_logging

        from e5v.backbones.phi3_v import save_tiny

        hf_logging.disable_progress_bar()
        ckpt = save_tiny(work / "checkpoint", seed=args.seed, sizes=SIZES)
        images = make_images(work)
        mine = ours(ckpt, images, args.seed)
        np.savez(work / "ours.npz", states=mine["states"], **{f"given_{k}": v for k, v in mine["given_states"].items()},
                 **{f"grad_{n}_{k}": v for n, g in mine["grads"].items() for k, v in g.items()},
                 **{f"grad64_{n}_{k}": v for n, g in mine["grads64"].items() for k, v in g.items()})
        side = run_side(python, side_checkpoint(ckpt, work / "checkpoint_4x"), args.remote_code.resolve(), mine,
                        work)
        fig, failures = compare(mine, side, args.tol)
    finally:
        if tmp is not None:
            tmp.cleanup()
    fig["versions"] = {"ours": {"transformers": __import__("transformers").__version__,
                                "torch": __import__("torch").__version__, "attention": mine["attn"]},
                       "hub": {k: side["info"][k] for k in ("transformers", "torch", "model_class")}}
    print(json.dumps(fig, indent=2))
    print(f"phi3v-parity: text {fig['text']:.2g} / images {fig['image']:.2g} / image+text {fig['interleaved']:.2g} "
          f"(one item at a time on the hub's side, its processor); our batches on its model {fig['text_given_batch']:.2g}"
          f" / {fig['image_given_batch']:.2g} / {fig['interleaved_given_batch']:.2g}; LoRA gradients (relative, "
          f"{fig['grad_tensors']} tensors) InfoNCE step {fig['grad_infonce']['ours_vs_hub']:.2g} (each side to float64: "
          f"{fig['grad_infonce']['ours_vs_float64']:.2g} ours, {fig['grad_infonce']['hub_vs_float64']:.2g} hub), "
          f"fixed cotangent {fig['grad_linear']['ours_vs_hub']:.2g}; pixels {fig['pixel_max_abs_diff']:.2g};"
          f" ids equal {fig['processor_ids_equal']}; {time.perf_counter() - t0:.0f} s ({t_env:.0f} s environment)")
    if failures:
        print("phi3v-parity FAILED: " + "; ".join(failures), file=sys.stderr)
        return EXIT_MISMATCH
    print(f"phi3v-parity passed (fp32, tolerance {args.tol})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
