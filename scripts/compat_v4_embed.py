"""Embed with transformers 4.x exactly as the E5-V release README does (run with the 4.x venv's python).

  .venv-tf4/bin/python scripts/compat_v4_embed.py MODEL_DIR REQUEST.json OUT.json

REQUEST.json: {"text_prompts": [...], "image_prompt": "...<image>...", "images": [paths],
"pixel_values": optional .npz with pixel_values_i / image_sizes_i per image}; prompts are rendered by
the caller (e5v/prompts.py). The recipe: LlavaNextProcessor + LlavaNextForConditionalGeneration
from the directory, the processor called with padding=True (left padding from the tokenizer config),
embedding = hidden_states[-1][:, -1, :]. Writes {"text": [[...]], "image": [[...]],
"image_given_pixels": [[...]], "pixel_max_abs_diff": [...], "versions": {...}, ...}.
Standalone on purpose: imports neither e5v nor anything transformers 5 has renamed. Fails (exit 1) if
4.x reports any missing, unexpected or mismatched weight, since 4.x would otherwise embed with random
ones and only log a warning.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    import numpy as np
    import tokenizers
    import torch
    import transformers
    from PIL import Image
    from transformers import AutoTokenizer, LlavaNextForConditionalGeneration, LlavaNextProcessor

    model_dir, request_path, out_path = argv
    req = json.loads(open(request_path, encoding="utf-8").read())
    processor = LlavaNextProcessor.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)  # the plain tokenizer path must load too
    model, info = LlavaNextForConditionalGeneration.from_pretrained(
        model_dir, torch_dtype=torch.float32, output_loading_info=True, use_safetensors=True
    )
    bad = {k: v for k, v in info.items() if v}
    if bad:
        print(f"transformers {transformers.__version__} loaded {model_dir} with {bad}", file=sys.stderr)
        return 1
    model.eval()
    if processor.tokenizer.padding_side != "left" or tokenizer.padding_side != "left":
        print("tokenizer padding_side is not 'left'", file=sys.stderr)
        return 1
    out: dict[str, object] = {
        "versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                     "torch": torch.__version__},
        "rope_theta": getattr(model.config.text_config, "rope_theta", None),
        "text_ids": tokenizer(req["text_prompts"])["input_ids"],
        "chat_template": tokenizer.chat_template,
    }
    with torch.no_grad():
        text_inputs = processor(req["text_prompts"], return_tensors="pt", padding=True)
        h = model(**text_inputs, output_hidden_states=True, return_dict=True).hidden_states[-1][:, -1, :]
        out["text"] = h.float().tolist()
        images = [Image.open(p).convert("RGB") for p in req["images"]]
        if images:
            img_inputs = processor([req["image_prompt"]] * len(images), images, return_tensors="pt", padding=True)
            h = model(**img_inputs, output_hidden_states=True, return_dict=True).hidden_states[-1][:, -1, :]
            out["image"] = h.float().tolist()
        else:
            out["image"] = []
        # The same 4.x model on pixel values preprocessed by the caller (transformers 5's image
        # processor): separates how the checkpoint is read from how 4.x preprocesses images.
        out["image_given_pixels"], out["pixel_max_abs_diff"] = [], []
        if req.get("pixel_values"):
            arrays = np.load(req["pixel_values"])
            ids = processor([req["image_prompt"]], return_tensors="pt")
            for i in range(len(images)):
                ours = processor.image_processor([images[i]], return_tensors="np")["pixel_values"]
                given = arrays[f"pixel_values_{i}"]
                diff = float(np.abs(ours - given).max()) if ours.shape == given.shape else -1.0  # -1: shapes differ
                out["pixel_max_abs_diff"].append(diff)
                pv = torch.from_numpy(given)
                sizes = torch.from_numpy(arrays[f"image_sizes_{i}"])
                h = model(**ids, pixel_values=pv, image_sizes=sizes, output_hidden_states=True,
                          return_dict=True).hidden_states[-1][:, -1, :]
                out["image_given_pixels"].append(h[0].float().tolist())
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
