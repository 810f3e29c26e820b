"""Shared pieces of the ``scripts/bench_*.py`` benchmarks: machine description, peak FLOP/s, FLOP
counting for LLaVA-NeXT, alternating repeated timing, and where figures go.

Not a benchmark itself: imported as ``scripts.benchlib`` (the benchmarks run as modules from the
repository root, ``python -m scripts.bench_encode``, as ``make bench`` does). Every benchmark prints a
Markdown block, appends it to ``docs/benchmarks.md`` (unless ``--no-append``) and, when the environment
variable ``OUT`` names a folder (the GPU check), writes its figures there as ``<name>.json`` too.

FLOP counting (used for every MFU figure; stated again in docs/performance.md):
- language model, per real (non-padding) token: 2 x its matmul parameters (q, k, v, o, gate, up,
  down of every layer; the embedding lookup and the LM head are excluded: embedding runs never
  project to the vocabulary), plus causal attention 2 x 2 x layers x hidden x (keys the token
  attends to, itself included);
- vision tower (CLIP), per tile of every image: 2 x matmul parameters of the layers up to the selected
  feature layer x (patches + CLS), plus bidirectional attention; projector: 2 x its parameters per
  patch feature. Padding rows, padded anyres tiles and recomputation are never credited;
- training adds the backward pass as 2 x the forward (the usual 6N convention, ``model`` FLOPs), and
  the hardware count (``hfu``) adds what really runs: activation-checkpointing recompute (+1 forward)
  and GradCache's no-grad first pass (+1 forward), with the frozen base's weight gradients skipped
  (backward = 1 x forward for frozen weights, 2 x for the trainable LoRA weights).
MFU = model FLOPs / time / the device's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH_MD = REPO / "docs" / "benchmarks.md"
HEADER = (
    "# Benchmarks\n\n"
    "Figures appended by the `scripts/bench_*.py` benchmarks (`make bench` on CPU, `scripts/gpu_check.sh` on a GPU).\n"
    "Each block is one run on one machine; ratios compare variants measured in that same run, alternating\n"
    "between them. How FLOPs are counted: docs/performance.md.\n\n"
)

# Dense bf16 tensor-core peak, FLOP/s (no sparsity). Matched against the CUDA device name.
PEAK_BF16: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("L4", 121e12),
]


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({cpu_model()}, {os.cpu_count()} cores)"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What ran the benchmark: host, CPU, accelerator, library versions, threads."""
    import torch

    info: dict[str, Any] = {
        "host": platform.node(),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "device": device_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    try:
        info["load_avg_1m"] = os.getloadavg()[0]
    except OSError:  # pragma: no cover
        pass
    return info


def machine_line(info: dict[str, Any] | None = None) -> str:
    m = info or machine()
    extra = f", load {m['load_avg_1m']:.1f}" if "load_avg_1m" in m else ""
    return (
        f"Machine: {m['device']} | host {m['host']} | torch {m['torch']} ({m['torch_threads']} threads{extra}) | "
        f"transformers {m.get('transformers', '?')} | {m['date']}"
    )


def peak_flops(name: str | None = None) -> float | None:
    """Dense bf16 peak of the CUDA device named ``name`` (default: this one); None on CPU / unknown."""
    name = name if name is not None else device_name()
    if name.startswith("CPU"):
        return None
    for key, value in PEAK_BF16:
        if key in name:
            return value
    return None


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def set_threads(n: int | None) -> int:
    """Pin torch's intra-op threads; both variants of a comparison run with the same setting.

    ``None``: 1 thread on a CPU-only machine, the torch default with CUDA; 0: the torch default. On the
    project's shared 2-core machines, 2 threads made both variants up to 20x slower whenever a
    neighbour was busy (OpenMP threads wait on each other), which turned ratios into noise; the tiny
    model's operations are too small to gain from a second thread anyway."""
    import torch

    if n is None and not torch.cuda.is_available():
        n = 1
    if n:
        torch.set_num_threads(int(n))
    return torch.get_num_threads()


# ---------------------------------------------------------------------- timing
def alternate(variants: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each variant over ``rounds`` rounds, the order reversed every other round, so
    a slow first run, a warming cache or a neighbour's load falls on every variant alike."""
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            sync()
            t0 = time.perf_counter()
            variants[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def spread(xs: Sequence[float]) -> str:
    """min-max of the rounds relative to the median, e.g. '±4%'."""
    if len(xs) < 2:
        return "1 run"
    m = median(xs)
    return f"±{100 * max(abs(max(xs) - m), abs(m - min(xs))) / m:.0f}%"


# ---------------------------------------------------------------------- FLOP counting
@dataclass(frozen=True)
class LlavaFlops:
    """Per-token and per-tile FLOP coefficients of one LLaVA-NeXT model (see the module docstring)."""

    lm_matmul_params: int
    lm_layers: int
    lm_hidden: int  # heads x head_dim (the attention width)
    vision_matmul_params_used: int
    vision_layers_used: int
    vision_hidden: int
    vision_tokens_per_tile: int
    projector_params: int

    @classmethod
    def from_model(cls, model: Any) -> LlavaFlops:
        cfg = model.config
        text, vision = cfg.text_config, cfg.vision_config
        inner = model.model if hasattr(model, "model") and hasattr(model.model, "language_model") else model
        lm = inner.language_model
        lm_mm = sum(p.numel() for n, p in lm.named_parameters() if p.ndim == 2 and "embed_tokens" not in n)
        n_vis_layers = int(vision.num_hidden_layers)
        layer = int(getattr(cfg, "vision_feature_layer", -1))
        used = n_vis_layers + 1 + layer if layer < 0 else layer  # hidden_states[k] = output of layer k
        used = max(1, min(n_vis_layers, used))
        per_layer = 0
        vt = inner.vision_tower
        for n, p in vt.named_parameters():
            if p.ndim == 2 and ".layers.0." in n:
                per_layer += p.numel()
        proj = sum(p.numel() for p in inner.multi_modal_projector.parameters() if p.ndim == 2)
        heads = int(text.num_attention_heads)
        head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
        side = int(vision.image_size) // int(vision.patch_size)
        return cls(
            lm_matmul_params=int(lm_mm),
            lm_layers=int(text.num_hidden_layers),
            lm_hidden=heads * head_dim,
            vision_matmul_params_used=int(per_layer * used),
            vision_layers_used=int(used),
            vision_hidden=int(vision.hidden_size),
            vision_tokens_per_tile=side * side + 1,
            projector_params=int(proj),
        )

    def lm_sequence(self, length: int) -> float:
        """Forward FLOPs of one causal sequence of ``length`` real tokens."""
        attended = length * (length + 1) / 2  # token i attends to i+1 keys
        return 2.0 * self.lm_matmul_params * length + 4.0 * self.lm_layers * self.lm_hidden * attended

    def vision_tiles(self, tiles: int) -> float:
        """Forward FLOPs of the vision tower + projector on ``tiles`` tiles of one image."""
        t = self.vision_tokens_per_tile
        per_tile = (
            2.0 * self.vision_matmul_params_used * t
            + 4.0 * self.vision_layers_used * self.vision_hidden * t * t
            + 2.0 * self.projector_params * (t - 1)
        )
        return per_tile * tiles


def anyres_tiles(processor: Any, height: int, width: int) -> int:
    """Tiles the LLaVA-NeXT image processor makes from an image: the base view + the anyres grid."""
    from transformers.image_processing_utils import select_best_resolution

    ip = processor.image_processor
    tile = int(ip.crop_size["height"] if isinstance(ip.crop_size, dict) else ip.crop_size.height)
    bh, bw = select_best_resolution((height, width), [list(p) for p in ip.image_grid_pinpoints])
    return 1 + (bh // tile) * (bw // tile)


# ---------------------------------------------------------------------- the paper suite, for estimates
# Unique items each family encodes in `e5v-eval suite=paper` (items shared through the embedding cache
# counted once): Flickr30K test 1,000 images / 5,000 captions, COCO 5K test 5,000 / 25,000 (first 5 per
# image), I2I: every caption rendered (5,000 + 25,000 images; the photos are cached from T2I), CIRR
# val 4,181 queries / 2,297 gallery, CIRR test1 4,148 / 2,315, FashionIQ val 6,016 queries embedded
# twice (both caption orders) / 15,536 gallery images, STS 18,850 pairs = 37,700 sentences (upper bound).
PAPER_SUITE = {
    "text": {"flickr30k captions": 5000, "coco captions": 25000, "sts sentences": 37700},
    "image": {
        "flickr30k images": 1000,
        "coco images": 5000,
        "i2i rendered captions": 30000,
        "cirr gallery": 2297 + 2315,
        "fashioniq gallery": 15536,
    },
    "interleaved": {"cirr queries": 4181 + 4148, "fashioniq queries (x2 orders)": 12032},
}


def paper_suite_counts() -> dict[str, int]:
    return {kind: sum(parts.values()) for kind, parts in PAPER_SUITE.items()}


def paper_suite_hours(items_per_s: dict[str, float]) -> float:
    """Hours to encode the whole paper suite once at the given items/s per input kind."""
    counts = paper_suite_counts()
    return sum(counts[k] / items_per_s[k] for k in counts) / 3600.0


# ---------------------------------------------------------------------- output
def append_markdown(text: str, path: Path = BENCH_MD) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", encoding="utf-8") as f:
        if new:
            f.write(HEADER)
        f.write(text.rstrip() + "\n\n")
    return path


def write_out(name: str, data: dict[str, Any], markdown: str | None = None) -> Path | None:
    """``$OUT/<name>.json`` (and ``<name>.md``) when ``OUT`` is set (the GPU check collects these)."""
    out = os.environ.get("OUT")
    if not out:
        return None
    path = Path(out) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    if markdown is not None:
        path.with_suffix(".md").write_text(markdown.rstrip() + "\n")
    return path


def emit(name: str, markdown: str, data: dict[str, Any], append: bool = True) -> None:
    """Print the Markdown block, append it to docs/benchmarks.md, write the figures to $OUT."""
    print(markdown.rstrip() + "\n", flush=True)
    if append:
        append_markdown(markdown)
    write_out(name, {"name": name, **data}, markdown)


def pct(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.1f}%"
