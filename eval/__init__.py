"""Evaluation: benchmarks, metrics, FAISS indexes, reports."""
