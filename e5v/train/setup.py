"""What a training run is built from, checked before anything expensive: the data as general contrastive rows
(with the number of positives and hard negatives every row gives), the loss settings, the model with its LoRA
(optionally continued from an earlier stage's adapter), the DeepSpeed engine and the step batches."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from e5v.errors import ConfigError, DataError

log = logging.getLogger("e5v.train")

SCOPES = ("global", "sub_batch")


# ---------------------------------------------------------------------- data
def _count_problem(counts: list[int], ids: list[str], want: int | None, what: str, key: str) -> int:
    """How many ``what`` every row contributes: ``want`` (rows with fewer refuse, naming the first), or the
    one count all rows share when ``want`` is None."""
    if not counts:
        raise DataError("no training rows")
    low, high = min(counts), max(counts)
    if want is None:
        if low != high:
            raise ConfigError(
                f"the training rows have between {low} and {high} {what} each; set {key}=<n> (each row then gives "
                f"its first n; rows with fewer refuse) or 0 where that is allowed"
            )
        return low
    if want < 0:
        raise ConfigError(f"{key}={want}: must be >= 0")
    if low < want:
        short = [n for n, c in enumerate(counts) if c < want]
        raise DataError(
            f"{len(short)} training row(s) have fewer than {key}={want} {what} (first: {ids[short[0]]} with "
            f"{counts[short[0]]}); lower {key}, or mine / add more"
        )
    if high > want:
        log.info("%s=%d: rows with more %s use their first %d (%d row(s) have more)", key, want, what, want,
                 sum(c > want for c in counts))
    return want


@dataclass
class RowPlan:
    positives: int  # per query (P)
    negatives: int  # hard negatives per query (K)
    sub_batch: int | None  # homogeneous sub-batch size (rows of one dataset), None: the whole global batch
    scope: str  # in-batch candidates: global | sub_batch
    dims: list[int] | None  # Matryoshka prefixes (the full width last), None: off
    dim_weights: list[float] | None


def load_rows(cfg: Any) -> tuple[Any, Any]:
    """(what the data loader returned, the same as contrastive rows / a mixture)."""
    from e5v.config import instantiate
    from e5v.data.contrastive import as_rows

    raw = instantiate(cfg.data.loader)
    return raw, as_rows(raw)


def row_plan(cfg: Any, rows: Any, global_batch: int) -> RowPlan:
    d, loss = cfg.data, cfg.loss
    ids = list(rows.ids) if len(getattr(rows, "ids", [])) == len(rows) else [f"row {i}" for i in range(len(rows))]
    P = _count_problem([len(p) for p in rows.positives], ids, d.get("positives_per_query"), "positives",
                       "data.positives_per_query")
    if P < 1:
        raise ConfigError("data.positives_per_query must be >= 1 (every query needs a positive)")
    K = _count_problem([len(n) for n in rows.negatives], ids, d.get("negatives_per_query"), "hard negatives",
                       "data.negatives_per_query")
    mined = (d.get("loader") or {}).get("mined")
    if mined and K == 0:
        raise ConfigError(f"data.loader.mined={mined} but data.negatives_per_query=0: the mined negatives would go "
                          "unused; set data.negatives_per_query=<k> (e.g. data.loader.mined_k)")
    if K == 0 and any(len(n) for n in rows.negatives):
        log.info("data.negatives_per_query=0: the hard negatives of %d row(s) are not used (in-batch negatives "
                 "only)", sum(bool(len(n)) for n in rows.negatives))  # chosen in the config: said, not warned
    sub = d.get("sub_batch")
    own = getattr(rows, "sub_batch", None)  # a Mixture built with its own sub-batch size
    if sub is None:
        sub = own
    elif own is not None and own != sub:
        raise ConfigError(f"data.sub_batch={sub} but the data loader was given sub_batch={own}; set one of them")
    if sub is not None and (not isinstance(sub, int) or sub < 1 or global_batch % sub):
        raise ConfigError(f"data.sub_batch={sub!r}: must divide trainer.global_batch={global_batch} (or be null)")
    scope = str(loss.get("negatives_scope", "global"))
    if scope not in SCOPES:
        raise ConfigError(f"loss.negatives_scope={scope!r}: must be one of {SCOPES}")
    if scope == "sub_batch" and sub is None:
        raise ConfigError("loss.negatives_scope=sub_batch needs data.sub_batch (the homogeneous sub-batch size)")
    dims, weights = loss.get("matryoshka_dims"), loss.get("matryoshka_weights")
    return RowPlan(P, K, sub, scope, list(dims) if dims else None, list(weights) if weights else None)


def matryoshka_dims(plan: RowPlan, width: int) -> tuple[list[int] | None, list[float] | None]:
    """The prefixes the loss sums over, the model's full width last (added when not listed), and their weights."""
    if not plan.dims:
        return None, None
    from e5v.matryoshka import check_dims

    dims = check_dims(plan.dims, width)
    weights = plan.dim_weights
    if dims[-1] != width:
        dims = [*dims, width]
        weights = [*weights, 1.0] if weights else None
    if weights is not None and len(weights) != len(dims):
        raise ConfigError(f"loss.matryoshka_weights has {len(plan.dim_weights or [])} value(s) for "
                          f"{len(plan.dims)} dims {plan.dims}: give one weight per dim")
    return dims, weights


def check_inputs(rows: Any, backbone: Any, keep_instruction: bool) -> None:
    """The backbone must take every kind of item the rows hold (one line naming the backbone and the kind)."""
    from e5v.backbones.base import UnsupportedInputError

    kinds = set()
    for col in (rows.queries, *([it for its in rows.positives for it in its],), *([it for its in rows.negatives for it in its],)):
        kinds.update(it.kind(keep_instruction) for it in col)
    for kind, modality in (("image", "image"), ("pair", "interleaved")):
        if kind in kinds:
            try:
                backbone.require(modality)
            except UnsupportedInputError as e:
                raise ConfigError(f"the training rows hold {kind} items: {e}") from None


# ---------------------------------------------------------------------- model
def check_init_from(cfg: Any) -> None:
    """``lora.init_from``, when set: an intact adapter (run, step or adapter folder) trained on this base."""
    path = cfg.lora.get("init_from")
    if not path:
        return
    from e5v.lora import check_adapter_base, resolve_adapter

    check_adapter_base(resolve_adapter(path), cfg.backbone,
                       fix="train stage 2 on the stage-1 run's backbone (backbone=...), or lora.init_from=null")


def init_lora_from(peft_model: torch.nn.Module, path: str | os.PathLike, backbone_cfg: Any,
                   lora_cfg: Any = None) -> dict[str, Any]:
    """Continue an earlier stage's LoRA: copy its adapter weights (an adapter, step or run folder) into the fresh
    LoRA of the same shape. Every tensor must match by name and shape (same lora.r, targets and base), else one
    line with the fix. Returns the provenance recorded with the run (path, sha256, step, W&B run id)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from e5v.lora import adapter_step, check_adapter_base, resolve_adapter

    adapter = resolve_adapter(path)
    check_adapter_base(adapter, backbone_cfg)
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"lora.init_from={path}: {weights} not found (adapters are safetensors only)")
    fix = "use the stage-1 run's lora.r, lora.alpha and lora.targets"
    if lora_cfg is not None and (adapter / "adapter_config.json").is_file():
        import json

        saved = json.loads((adapter / "adapter_config.json").read_text())
        for key, ours in (("r", int(lora_cfg.r)), ("lora_alpha", float(lora_cfg.alpha))):
            if key in saved and float(saved[key]) != float(ours):  # alpha: same shapes, another scale
                raise ConfigError(f"lora.init_from={path}: the adapter has {key}={saved[key]}, this run "
                                  f"lora.{'alpha' if key == 'lora_alpha' else key}={ours}; {fix}")
    state = load_file(str(weights))
    own = {k for k, _ in peft_model.named_parameters() if "lora_" in k}
    try:
        result = set_peft_model_state_dict(peft_model, state)
    except RuntimeError as e:
        first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise ConfigError(f"lora.init_from={path}: the adapter does not fit this run's LoRA ({first}); {fix}") from None
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    unexpected = list(getattr(result, "unexpected_keys", []))
    if missing or unexpected or not own:
        raise ConfigError(
            f"lora.init_from={path}: the adapter does not fit this run's LoRA ({len(missing)} LoRA tensor(s) missing, "
            f"{len(unexpected)} unexpected, first: {(missing or unexpected or ['-'])[0]}); {fix}"
        )
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    run = adapter.parents[2] if adapter.name == "adapter" and adapter.parent.name.startswith("step-") else None
    return {"path": str(adapter), "sha256": digest, "step": adapter_step(adapter),
            "run": str(run) if run else None, "wandb_run_id": _wandb_run_id(run) if run else None}


def _wandb_run_id(run_dir: Path) -> str | None:
    """The W&B run id a training run folder recorded (``wandb/run-<time>-<id>``, newest), for linking stages."""
    runs = sorted((run_dir / "wandb").glob("*run-*-*")) if (run_dir / "wandb").is_dir() else []
    m = re.match(r".*run-\d{8}_\d{6}-(\w+)$", runs[-1].name) if runs else None
    return m.group(1) if m else None


def make_sampler(rows: Any, global_batch: int, seed: int, sub_batch: int | None) -> Any:
    """The step -> rows map: every sub-batch from one dataset (:class:`~e5v.data.mixture.MixtureSampler`); one
    dataset without sub-batches samples exactly as E5-V's stage 1 always has (:class:`~e5v.data.nli.StepSampler`)."""
    from e5v.data.mixture import MixtureSampler

    return MixtureSampler(rows, global_batch, seed, sub_batch=sub_batch)


def build_backbone(cfg: Any) -> Any:
    from e5v.backbones.base import resolve_dtype
    from e5v.config import instantiate

    device = "cuda" if torch.cuda.is_available() else "cpu"
    load_dtype = resolve_dtype(str(cfg.trainer.precision))  # fp32 | bf16 | fp16 (checked in deepspeed_config)
    extra = {"quantize": cfg.lora.quantize} if cfg.lora.get("quantize") else {}
    return instantiate(cfg.backbone, dtype=load_dtype, device=device, **extra)


def build_engine(cfg: Any, backbone: Any, max_steps: int, ds_conf: dict[str, Any]) -> tuple[Any, ...]:
    """LoRA on the backbone (continued from ``lora.init_from`` when set), the optimizer, the schedule (linear
    warmup from 0 over optim.warmup_steps, linear decay to 0 at the last step) and the DeepSpeed engine.
    Returns (peft_model, encoder, engine, scheduler, trainable parameter count, init_from provenance or None)."""
    import deepspeed
    from transformers import get_linear_schedule_with_warmup

    from e5v.lora import Encoder, add_lora, trainable_parameters
    from e5v.train import checkpoint as ckpt
    from e5v.train.plan import build_optimizer

    lo = cfg.lora
    peft_model = add_lora(
        backbone, r=int(lo.r), alpha=int(lo.alpha), dropout=float(lo.dropout),
        targets=list(lo.targets) if lo.get("targets") else None,  # None: the backbone's released targets
        activation_checkpointing=bool(cfg.trainer.activation_checkpointing),
    )
    init = init_lora_from(peft_model, lo.init_from, cfg.backbone, lo) if lo.get("init_from") else None
    if init:
        log.info("LoRA continued from %s (step %s)", init["path"], init["step"])
    encoder = Encoder(peft_model, backbone)
    encoder.train()
    params = trainable_parameters(encoder)
    optimizer = build_optimizer(cfg.optim, params)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.optim.warmup_steps), max_steps)
    engine, _, _, scheduler = deepspeed.initialize(model=encoder, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_conf)
    ckpt.use_safe_loading(engine)
    return peft_model, encoder, engine, scheduler, sum(p.numel() for p in params), init


def step_batches(cfg: Any, backbone: Any, rows: Any, prompt: Any, sampler: Any, micro: int, plan: RowPlan,
                 stop: int) -> tuple[Any, Any]:
    """How a step's rows become model batches (:mod:`e5v.train.batches`): packed where the backbone packs
    exactly (``trainer.packing``; never with ``attend_padding``, the released padded batch by definition),
    prepared in ``trainer.num_workers`` DataLoader workers (``auto``: 4 when there are images on CUDA, else 0).
    Returns (the chunk preparer, the step batches)."""
    from e5v import distributed as D
    from e5v import packing
    from e5v.train.batches import ChunkPreparer, StepBatches

    t = cfg.trainer
    setting = packing.packing_mode(t.get("packing", "auto"))
    attend = bool(t.attend_padding)
    images = any(q.image is not None for q in rows.queries) or any(
        it.image is not None for col in (rows.positives, rows.negatives) for its in col for it in its)
    if attend and images:
        raise ConfigError("trainer.attend_padding=true is the released script's text batch; these rows hold images")
    if attend and setting == "true":
        log.warning("trainer.packing=true is ignored: trainer.attend_padding=true trains on the released "
                    "script's padded batches by definition")
    # None: padded; a number: packed when that removes at least this share of a forward's tokens
    pack_text = None if attend else backbone.pack_threshold("text", setting)
    pack_images = backbone.pack_threshold("image", setting) if images else None
    workers = t.get("num_workers", "auto")
    if workers == "auto":
        workers = min(4, max(1, (os.cpu_count() or 2) - 1)) if backbone.device.type == "cuda" and images else 0
    eos = backbone.tokenizer.eos_token_id
    preparer = ChunkPreparer(
        rows, prompt, backbone.inputs(), plan.positives, plan.negatives, pack_text=pack_text, pack_images=pack_images,
        pack_tokens=packing.check_pack_tokens(t.get("pack_tokens")) or backbone.default_pack_tokens(),
        attend_padding=attend, release_pad_id=int(eos if eos is not None else backbone.pad_token_id),
    )

    def how(threshold: float | None) -> str:
        return "padded" if threshold is None else f"packed when that saves >= {threshold:.0%} of a forward's tokens"

    log.info("training batches: %d positive(s) and %d hard negative(s) per query; text %s; images %s; %d data "
             "worker(s)", plan.positives, plan.negatives, how(pack_text), how(pack_images) if images else "-", workers)
    batches = StepBatches(preparer, sampler, micro, D.rank(), D.world_size(), num_workers=int(workers),
                          pin_memory=backbone.device.type == "cuda", stop=stop)
    return preparer, batches


def candidate_groups(sampler: Any, step: int, plan: Any, scope: str, chunk: int | None = None) -> torch.Tensor | None:
    """Sub-batch id of every gathered row of one loss (``loss.negatives_scope=sub_batch``), else None: the whole
    global batch (GradCache: rank-major, as gathered), or chunk ``chunk`` of every rank (plain steps)."""
    if scope != "sub_batch":
        return None
    g = torch.as_tensor(sampler.groups(step), dtype=torch.long)
    if chunk is None:
        return g
    return torch.cat([g[r * plan.local + chunk * plan.micro : r * plan.local + (chunk + 1) * plan.micro]
                      for r in range(plan.world)])


__all__ = ["RowPlan", "candidate_groups", "build_backbone", "build_engine", "make_sampler", "step_batches", "check_inputs", "init_lora_from", "load_rows", "matryoshka_dims", "row_plan"]
