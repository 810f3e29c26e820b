"""Run a suite of benchmarks from a composed ``configs/eval.yaml`` and write the report.

:func:`evaluate` is the library entry (tests call it with :func:`e5v.config.compose`);
``e5v-eval`` (:mod:`eval.run`) is the Hydra app around it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from eval import dist
from eval.benchmarks.base import Benchmark, BenchmarkResult, Context
from eval.cache import EmbeddingCache
from eval.encode import Encoder, FileHasher
from eval.index import IndexSpec
from eval.model import ModelHandle

log = logging.getLogger(__name__)


def select_benchmarks(cfg: DictConfig) -> dict[str, Benchmark]:
    """Instantiate the suite's benchmarks, filtered by ``benchmarks=[...]`` when given."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    available = dict(cfg.get("benchmark") or {})
    if not available:
        raise ValueError("no benchmark configured: pick a suite (suite=paper | suite=mini) or add benchmark configs")
    wanted = cfg.get("benchmarks")
    names = (
        list(available)
        if wanted in (None, "all")
        else [str(n) for n in (wanted if not isinstance(wanted, str) else [wanted])]
    )
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"benchmarks {unknown} are not in suite '{cfg.suite.name}'; available: {sorted(available)}")
    out = {}
    for name in names:
        node = available[name]
        try:
            bench = instantiate(node, name=name, _convert_="all")
        except InstantiationException as err:
            raise (err.__cause__ or err) from None
        if not isinstance(bench, Benchmark):
            raise TypeError(f"benchmark '{name}': {node.get('_target_')} is not an eval Benchmark")
        out[name] = bench
    return out


def _renderer_factory(cfg: DictConfig) -> Any:
    def make() -> Any:
        from eval.render import CaptionRenderer, RenderSpec

        r = OmegaConf.to_container(cfg.render, resolve=True)
        cache_dir = r.pop("cache_dir")
        return CaptionRenderer(RenderSpec(**r), cache_dir)

    return make


def evaluate(cfg: DictConfig, output_dir: str | Path | None = None) -> dict[str, Any] | None:
    """Run every selected benchmark; rank 0 writes the report and returns the results dict."""
    from e5v.prompts import PromptSet

    from e5v.run_log import missing_values

    missing = missing_values(cfg)
    if missing:  # before any model or data work
        raise ValueError(f"missing required value(s) {missing}: set them on the command line (key=value)")
    t_start = time.perf_counter()
    cache_root = Path(str(cfg.cache.dir))
    model = ModelHandle(cfg, memo_dir=cache_root if cfg.cache.enabled else None)
    if dist.env_world_size() > 1:
        model.prebuild()
    distributed = dist.init(str(cfg.embedder.device))
    if not dist.is_main():
        logging.getLogger("eval").setLevel(logging.WARNING)  # rank 0 logs progress; others only warnings
    try:
        benches = select_benchmarks(cfg)  # before any data work: a typo fails at once
        mini = cfg.suite.get("mini")
        if mini:
            from eval.mini_data import ensure

            m = OmegaConf.to_container(mini, resolve=True)
            ensure(m.pop("dir"), seed=int(m.pop("seed", 0)), **m)
        prompt = PromptSet.from_config(cfg.prompt)
        cache = EmbeddingCache(cache_root, enabled=bool(cfg.cache.enabled))
        hasher = FileHasher(cache_root / "file_hashes.json" if cfg.cache.enabled else None)
        encoder = Encoder(
            model, prompt, cache, shard_size=int(cfg.cache.shard_size), hasher=hasher, progress=bool(cfg.progress)
        )
        out_dir = Path(output_dir) if output_dir is not None else None
        ctx = Context(
            encoder=encoder,
            index=IndexSpec.from_config(cfg.index),
            output_dir=out_dir,
            renderer_factory=_renderer_factory(cfg),
            progress=bool(cfg.progress),
        )
        results: dict[str, BenchmarkResult] = {}
        timing: dict[str, float] = {}
        for name, bench in benches.items():
            log.info("== %s (%s) ==", name, type(bench).__name__)
            t0 = time.perf_counter()
            res = bench.run(ctx)
            timing[name] = time.perf_counter() - t0
            if res is not None:
                results[name] = res
                log.info("%s: %s", name, ", ".join(f"{k}={v:.2f}" for k, v in res.metrics.items()))
        hasher.save()
        timing["total_s"] = time.perf_counter() - t_start
        if not dist.is_main():
            return None
        return _finish(cfg, results, timing, ctx, model, out_dir)
    finally:
        if distributed:
            dist.shutdown()


def _finish(
    cfg: DictConfig,
    results: dict[str, BenchmarkResult],
    timing: dict[str, float],
    ctx: Context,
    model: ModelHandle,
    out_dir: Path | None,
) -> dict[str, Any]:
    from e5v.config import REPO_ROOT
    from e5v.run_log import redact
    from eval import report

    metrics = {n: r.metrics for n, r in results.items() if r.metrics}
    info = {n: r.info for n, r in results.items()}
    reference = str(cfg.report.reference)
    resolved = OmegaConf.to_container(cfg, resolve=False)
    font = ctx._renderer.describe() if ctx._renderer is not None else None
    out: dict[str, Any] = {
        "metrics": metrics,
        "metrics_flat": {f"{b}/{m}": v for b, ms in metrics.items() for m, v in ms.items()},
        "paper": {"reference": reference, "values": report.PAPER[reference]},
        "comparison": report.comparison_rows(metrics, reference),
        "info": info,
        "timing": timing,
        "cache": {
            **ctx.encoder.total_stats(),
            "model_loaded": model.loaded,
            "per_template": {k: vars(v) for k, v in ctx.encoder.stats.items()},
        },
        "index": ctx.index.describe() | {"check_k": ctx.index.check_k},
        "font": font,
        "run": {
            "suite": str(cfg.suite.name),
            "backbone": _backbone_label(model),
            "prompt": str(cfg.prompt.name),
            "dtype": str(cfg.embedder.dtype),
            "checkpoint": cfg.get("checkpoint"),
            "world_size": dist.world_size(),
            "model_fingerprint": model.fingerprint,
        },
        "git": report.git_info(REPO_ROOT),
        "versions": report.package_versions(),
        "config": redact(_resolvable(resolved, cfg)),  # no api_key/token values in results or W&B
    }
    if out_dir is not None:
        files = report.write(out, out_dir, make_plot=bool(cfg.report.plot))
        log.info("report: %s", ", ".join(str(p) for p in files.values()))
        if cfg.report.get("history"):
            report.append_history(Path(str(cfg.report.history)), out, out_dir)
        wandb_cfg = _wandb_config(cfg.get("logger"))
        if wandb_cfg is not None:
            out["wandb_dir"] = report.log_wandb(out, wandb_cfg, out_dir)
    return out


def _wandb_config(logger: Any) -> dict[str, Any] | None:
    """``logger.wandb`` (configs/logger/wandb.yaml) as a dict, or None when W&B is off (logger=none)."""
    if not logger:
        return None
    node = logger.get("wandb")
    if not node:
        return None
    return dict(OmegaConf.to_container(node, resolve=True))


def _backbone_label(model: ModelHandle) -> str:
    b = model.backbone_config()
    if b.get("name_or_path"):
        return str(b["name_or_path"])
    target = str(b.get("_target_", "?")).rsplit(".", 2)
    label = target[-2] if len(target) >= 2 else target[0]
    return f"{label} (seed {b['seed']})" if "seed" in b else label


def _resolvable(raw: Any, cfg: DictConfig) -> Any:
    """The config, resolved where possible (``${hydra:...}`` only resolves inside the Hydra app)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - fall back to the unresolved form
        return raw
