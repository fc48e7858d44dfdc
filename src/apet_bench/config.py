"""Hydra config helpers: where the configs live, group checks, availability, composing in code.

Config groups (``configs/``): ``model/``, ``method/``, ``benchmark/``, ``experiment/``; ``budget`` is a
top-level value (see :mod:`apet_bench.budget`). A group option whose issue has not landed yet has
``available: false`` and ``issue: N``; choosing it fails with a one-line "not available yet" error.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "GROUPS",
    "ConfigError",
    "check_group_overrides",
    "compose",
    "config_dir",
    "group_options",
]

GROUPS = ("model", "method", "benchmark", "experiment")


class ConfigError(ValueError):
    """A bad configuration value; the message is one line and names the value."""


def config_dir() -> Path:
    """The ``configs/`` directory: ``$APET_BENCH_CONFIG_DIR`` or the repository's (editable install)."""
    env = os.environ.get("APET_BENCH_CONFIG_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "configs"
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"config directory {str(path)!r} has no config.yaml (set APET_BENCH_CONFIG_DIR)")
    return path


def group_options(group: str) -> list[str]:
    """Names of the options of a config group (the YAML files in ``configs/<group>/``)."""
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def check_group_overrides(overrides: Sequence[str]) -> None:
    """Reject ``group=value`` overrides naming an option that does not exist, before Hydra sees them.

    Handles sweeps (``method=<a>,<b>``) and ``+``/``~`` prefixes. ``experiment=null`` is allowed.

    Raises
    ------
    ConfigError
        ``unknown method 'foo' (available: <the YAML files of configs/method/>)``.
    """
    for ov in overrides:
        if "=" not in ov or ov.startswith("-"):
            continue
        key, value = ov.split("=", 1)
        key = key.lstrip("+~")
        if key not in GROUPS:
            continue
        options = group_options(key)
        values = value
        for prefix in ("choice(", "range("):
            if values.startswith(prefix):
                values = values[len(prefix):].rstrip(")")
        for v in (x.strip() for x in values.split(",")):
            if key == "experiment" and v in ("null", ""):
                continue
            if v not in options:
                raise ConfigError(f"unknown {key} {v!r} (available: {', '.join(options)})")


def compose(overrides: Sequence[str] = ()) -> Any:
    """Compose the config in code (tests, the lmms-eval CLI path), as ``run.py`` would.

    Returns
    -------
    omegaconf.DictConfig
        The composed config, ``hydra`` node removed.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    check_group_overrides(overrides)
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))
