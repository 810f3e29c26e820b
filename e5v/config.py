"""Config helpers: where the Hydra configs live, and composing them outside a Hydra app."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


PACKAGE_CONFIGS = Path(__file__).resolve().parent / "configs"


def config_dir() -> Path:
    """The Hydra configs: ``e5v/configs/`` inside the package (a checkout's top-level ``configs/`` is a link to
    it, so the files a user edits are the ones every entry point reads, and a wheel ships them); override
    with ``E5V_CONFIG_DIR``."""
    d = Path(os.environ.get("E5V_CONFIG_DIR", PACKAGE_CONFIGS))
    if not (d / "embed.yaml").is_file():
        raise FileNotFoundError(
            f"config directory {d} not found (expected {d / 'embed.yaml'}); reinstall the package (its configs "
            "ship inside it) or set E5V_CONFIG_DIR to a folder holding embed.yaml, train.yaml and eval.yaml"
        )
    return d


def compose(config_name: str, overrides: list[str] | None = None) -> Any:
    """Compose ``configs/<config_name>.yaml`` with command-line style overrides (no Hydra app needed)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []))


def embedder_defaults() -> dict[str, Any]:
    """The Embedder's option defaults: ``configs/embedder/default.yaml``, the one place they are written
    (``e5v-encode`` takes its option defaults from here; ``Embedder``'s keyword defaults are tested equal)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(config_dir() / "embedder" / "default.yaml"))


def instantiate(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that re-raises the target's own exception instead of Hydra's wrapper,
    so the user sees e.g. "bad.csv: missing column(s) ['hard_neg']" as the error itself."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as err:
        if err.__cause__ is not None:
            raise err.__cause__ from None
        raise


def _register_resolvers() -> None:
    """``${e5v_run_hash:}`` (train.yaml's run_name) and ``${e5v_invocation:}`` resolve wherever configs are
    composed. Registered here without importing the training package: it is imported when one resolves."""
    from omegaconf import OmegaConf

    def _run_hash(*, _root_: Any) -> str:
        from e5v.train.run_identity import config_hash

        return config_hash(_root_)

    def _invocation() -> str:
        from e5v.train.run_identity import invocation_stamp

        return invocation_stamp()

    if not OmegaConf.has_resolver("e5v_invocation"):
        OmegaConf.register_new_resolver("e5v_invocation", _invocation)
    if not OmegaConf.has_resolver("e5v_run_hash"):
        OmegaConf.register_new_resolver("e5v_run_hash", _run_hash)


_register_resolvers()
