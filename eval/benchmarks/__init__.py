"""Benchmark families: one small class each on the shared retrieval core (:mod:`eval.benchmarks.base`)."""

from __future__ import annotations

from eval.benchmarks.base import Benchmark, BenchmarkResult, Context, retrieve

__all__ = ["Benchmark", "BenchmarkResult", "Context", "retrieve"]
