"""Run a suite of benchmarks from a composed ``configs/eval.yaml`` and write the report.

:func:`evaluate` is the library entry (tests call it with :func:`e5v.config.compose`);
``e5v-eval`` (:mod:`eval.cli`, ``python -m eval.cli``) is the Hydra app around it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from e5v.errors import ConfigError
from e5v import distributed as dist
from eval.benchmarks.base import Benchmark, BenchmarkResult, Context
from eval.cache import EmbeddingCache
from eval.dims import DimResults, requested_dims
from eval.dims import flat as flat_dims
from eval.encode import Encoder, FileHasher
from eval.index import IndexSpec
from eval.model import ModelHandle

log = logging.getLogger(__name__)


def select_benchmarks(cfg: DictConfig) -> dict[str, Benchmark]:
    """Instantiate the suite's benchmarks, filtered by ``benchmarks=[...]`` when given."""
    from e5v.config import instantiate

    available = dict(cfg.get("benchmark") or {})
    if not available:
        raise ConfigError("no benchmark configured: pick a suite (suite=paper | suite=mini) or add benchmark configs")
    wanted = cfg.get("benchmarks")
    names = (
        list(available)
        if wanted in (None, "all")
        else [str(n) for n in (wanted if not isinstance(wanted, str) else [wanted])]
    )
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ConfigError(f"benchmarks {unknown} are not in suite '{cfg.suite.name}'; available: {sorted(available)}")
    out = {}
    for name in names:
        node = available[name]
        bench = instantiate(node, name=name, _convert_="all")  # a typo'd option raises the benchmark's own error
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


def check_data(benches: dict[str, Benchmark]) -> None:
    """Check every selected benchmark's data (before the model loads); one error lists every problem, each
    missing dataset with its benchmark's ``make`` target (:attr:`Benchmark.make_target`)."""
    from eval.loaders import DataFormatError, MissingBenchmarkData, MissingDataError, MissingDatasetError

    problems: dict[str, Exception] = {}
    for name, bench in benches.items():
        try:
            bench.check_data()
        except MissingDatasetError as e:
            problems[name] = e.retarget(bench.make_target)
        except (MissingDataError, DataFormatError) as e:
            problems[name] = e
    if problems:
        raise MissingBenchmarkData(problems, [n for n in benches if n not in problems])


def evaluate(
    cfg: DictConfig, output_dir: str | Path | None = None, on_benchmark: Callable[[int, int], None] | None = None
) -> dict[str, Any] | None:
    """Run every selected benchmark; rank 0 writes the report and returns the results dict.
    ``on_benchmark(done, total)``: called once the benchmarks are chosen (done=0) and after each one
    (the demo's progress bar).

    Before any weights load: the config's required values, the benchmark names, the adapter's base
    (:class:`eval.model.ModelHandle`) and every selected benchmark's data (:func:`check_data`). The
    report is rewritten after every finished benchmark, marked incomplete until the last one, so a
    late failure keeps what was done."""
    from e5v.prompts import PromptSet
    from e5v.provenance import require_values

    require_values(cfg)  # before any model or data work
    t_start = time.perf_counter()
    benches = select_benchmarks(cfg)  # before any data work: a typo fails at once
    cache_root = Path(str(cfg.cache.dir))
    model = ModelHandle(cfg, memo_dir=cache_root if cfg.cache.enabled else None)  # checks an adapter's base
    dims, width = requested_dims(cfg, model)  # matryoshka_dims: a size above the config's width fails here
    by_dim = DimResults(dims, width) if dims else None
    if dist.world_size() > 1:  # launched with several processes, before the group is joined
        model.prebuild()
    distributed = dist.join_launched_group(str(cfg.embedder.device))
    if not dist.is_main():
        logging.getLogger("eval").setLevel(logging.WARNING)  # rank 0 logs progress; others only warnings
    try:
        mini = cfg.suite.get("mini")
        if mini:
            from e5v.mini.eval_data import ensure

            m = OmegaConf.to_container(mini, resolve=True)
            ensure(m.pop("dir"), seed=int(m.pop("seed", 0)), **m)
        check_data(benches)  # every benchmark's data, before the model loads
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
        finished: list[str] = []
        if on_benchmark is not None:
            on_benchmark(0, len(benches))
        for name, bench in benches.items():
            log.info("== %s (%s) ==", name, type(bench).__name__)
            t0 = time.perf_counter()
            try:
                res = bench.run(ctx)
                timing[name] = time.perf_counter() - t0
                if by_dim is not None:  # the same vectors' prefixes, from the cache
                    by_dim.run(name, bench, ctx, res, out_dir)
            except BaseException as err:
                hasher.save()
                if finished and dist.is_main():
                    status = _status(benches, finished, failed=name, error=err)
                    _write_partial(cfg, results, timing, ctx, model, out_dir, t_start, status, by_dim)
                raise
            finished.append(name)
            if res is not None:
                results[name] = res
                log.info("%s: %s", name, ", ".join(f"{k}={v:.2f}" for k, v in res.metrics.items()))
            hasher.save()
            if on_benchmark is not None:
                on_benchmark(len(finished), len(benches))
            if dist.is_main() and len(finished) < len(benches):
                _write_partial(cfg, results, timing, ctx, model, out_dir, t_start, _status(benches, finished), by_dim)
        timing["total_s"] = time.perf_counter() - t_start
        if not dist.is_main():
            return None
        return _finish(cfg, results, timing, ctx, model, out_dir, status=_status(benches, finished), by_dim=by_dim)
    finally:
        if distributed:
            dist.shutdown()


def _status(
    benches: dict[str, Benchmark], finished: list[str], failed: str | None = None, error: BaseException | None = None
) -> dict[str, Any]:
    """The report's completion record: finished / pending benchmarks, and what stopped the run."""
    out: dict[str, Any] = {
        "complete": len(finished) == len(benches),
        "finished": list(finished),
        "pending": [n for n in benches if n not in finished],
    }
    if failed is not None:
        out["failed"] = failed
        out["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:500] if error is not None else None
    return out


def _write_partial(
    cfg: DictConfig,
    results: dict[str, BenchmarkResult],
    timing: dict[str, float],
    ctx: Context,
    model: ModelHandle,
    out_dir: Path | None,
    t_start: float,
    status: dict[str, Any],
    by_dim: DimResults | None = None,
) -> None:
    """An incomplete report (no plot, no history, no W&B); never raises over the run's own error."""
    if out_dir is None:
        return
    try:
        _finish(cfg, results, {**timing, "total_s": time.perf_counter() - t_start}, ctx, model, out_dir,
                status=status, by_dim=by_dim)
    except Exception as e:  # noqa: BLE001 - the report must not hide the error that stopped the run
        log.warning("could not write the partial report to %s: %s", out_dir, e)


def _finish(
    cfg: DictConfig,
    results: dict[str, BenchmarkResult],
    timing: dict[str, float],
    ctx: Context,
    model: ModelHandle,
    out_dir: Path | None,
    status: dict[str, Any] | None = None,
    by_dim: DimResults | None = None,
) -> dict[str, Any]:
    from e5v.provenance import git_info, package_versions, redact, wandb_logger
    from eval import report

    status = status or {"complete": True, "finished": list(results), "pending": []}
    complete = bool(status["complete"])
    metrics = {n: r.metrics for n, r in results.items() if r.metrics}
    info = {n: r.info for n, r in results.items()}
    reference = str(cfg.report.reference)
    resolved = OmegaConf.to_container(cfg, resolve=False)
    font = ctx._renderer.describe() if ctx._renderer is not None else None
    out: dict[str, Any] = {
        "status": status,
        "metrics": metrics,
        "metrics_flat": {f"{b}/{m}": v for b, ms in metrics.items() for m, v in ms.items()},
        "chance": {n: r.chance for n, r in results.items() if r.chance},  # each metric for random embeddings
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
            "backbone": backbone_label(model),
            "prompt": str(cfg.prompt.name),
            "dtype": _dtype_name(cfg),
            **checkpoint_info(cfg, model),
            "world_size": dist.world_size(),
            "model_fingerprint": model.fingerprint,
        },
        "git": git_info(),
        "versions": package_versions(),
        "config": redact(_resolvable(resolved, cfg)),  # no api_key/token values in results or W&B
    }
    if by_dim is not None:  # matryoshka_dims: every benchmark again on the vectors' first k coordinates
        out["matryoshka"] = by_dim.report(metrics)
        out["metrics_flat"].update(flat_dims(out["matryoshka"]))
        out["timing"] = {**timing, **by_dim.timing}
    if out_dir is not None:
        files = report.write(out, out_dir, make_plot=complete and bool(cfg.report.plot))
        if not complete:
            log.info("partial report (%d of %d benchmarks): %s", len(status["finished"]),
                     len(status["finished"]) + len(status["pending"]), files["json"])
            return out
        log.info("report: %s", ", ".join(str(p) for p in files.values()))
        if cfg.report.get("history"):
            report.append_history(Path(str(cfg.report.history)), out, out_dir)
        wandb = wandb_logger(cfg)
        if wandb is not None:
            out["wandb_dir"] = report.log_wandb(out, wandb, out_dir)
    return out


def checkpoint_info(cfg: DictConfig, model: ModelHandle) -> dict[str, Any]:
    """What was evaluated: the checkpoint as given and as resolved (a run dir -> its newest step), its
    kind and training step, and the base model it ran on (with the weight-identifying keys)."""
    base_id: Any = None
    if model.checkpoint:  # (e5v.lora imports torch: not for a plain warm run)
        try:
            from e5v.lora import base_identity

            base_id = base_identity(model.backbone_config())
        except Exception:  # noqa: BLE001 - a record, not a check
            base_id = None
    return {
        "checkpoint": model.checkpoint,
        "checkpoint_arg": cfg.get("checkpoint"),
        "checkpoint_kind": model.checkpoint_kind,
        "checkpoint_step": model.checkpoint_step,
        "base": backbone_label(model),
        "base_identity": base_id,
    }


def backbone_label(model: ModelHandle) -> str:
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


def _dtype_name(cfg: Any) -> str:
    """The embedder's dtype as it resolved on this machine (``auto``: bfloat16 on CUDA, float32 on the CPU)."""
    from e5v.backbones.base import dtype_name

    return dtype_name(str(cfg.embedder.dtype), str(cfg.embedder.device))
