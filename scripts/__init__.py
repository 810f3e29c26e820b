"""Entry points and data-preparation tools; run them from the repository root (each file's docstring says how)."""
