"""Hydra config helpers: where the configs live, group checks, availability, composing in code.

Config groups (``configs/``): ``model/``, ``method/``, ``benchmark/``, ``experiment/``; ``budget`` is a
top-level value (see :mod:`apet_bench.budget`). A group option whose issue has not landed yet has
``available: false`` and ``issue: N``; choosing it fails with a one-line "not available yet" error.
"""

from __future__ import annotations

import functools
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
    "load_experiment",
    "load_group",
    "run_keys",
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


def load_group(group: str, name: str, *, resolve: bool = True) -> dict[str, Any]:
    """One config group entry (``configs/<group>/<name>.yaml``) as Hydra composes it for ``run.py``.

    Composes the primary config with the override ``<group>=<name>`` (Hydra's compose API,
    facebookresearch/hydra v1.3 ``hydra/compose.py``) and returns the ``<group>`` node as a plain dict, so
    defaults lists, packages and interpolations behave as in a run. Results are cached per
    ``(group, name, resolve)``; each call returns a fresh copy. A Hydra app already running in this
    process (a ``@hydra.main`` job calling this) keeps its global state: it is set aside and restored.

    Raises
    ------
    ConfigError
        ``group`` is not a config group, or ``name`` is not one of its options (the message lists them).
    """
    import copy

    if group not in GROUPS:
        raise ConfigError(f"unknown config group {group!r} (groups: {', '.join(GROUPS)})")
    options = group_options(group)
    if name not in options:
        raise ConfigError(f"unknown {group} {name!r} (available: {', '.join(options)})")
    return copy.deepcopy(_load_group_cached(str(config_dir()), group, name, resolve))


def load_experiment(name: str) -> dict[str, Any]:
    """An experiment preset (``configs/experiment/<name>.yaml``) as Hydra composes it for ``run.py``.

    Returns
    -------
    dict
        The composed run config (interpolations unresolved, the ``model`` / ``benchmark`` / ``method`` the
        preset picks included) with ``sweep``: the preset's ``hydra.sweeper.params`` (``{}`` when none).

    Raises
    ------
    ConfigError
        ``name`` is not an experiment (the message lists them).
    """
    from omegaconf import OmegaConf

    options = group_options("experiment")
    if name not in options:
        raise ConfigError(f"unknown experiment {name!r} (available: {', '.join(options)})")
    cfg = _compose_isolated(str(config_dir()), (f"experiment={name}",), True)
    out = OmegaConf.to_container(cfg, resolve=False)
    hydra_node = out.pop("hydra", {}) or {}  # type: ignore[union-attr]
    out["sweep"] = dict(((hydra_node.get("sweeper") or {}).get("params")) or {})  # type: ignore[index]
    return out  # type: ignore[return-value]


def run_keys() -> list[str]:
    """The top-level keys ``run.py`` takes as overrides: those of the composed primary config
    (``configs/config.yaml`` with its defaults), the config groups and ``hydra``."""
    return sorted({*_compose_isolated(str(config_dir()), ()).keys(), *GROUPS, "hydra"})


@functools.lru_cache(maxsize=128)
def _load_group_cached(directory: str, group: str, name: str, resolve: bool) -> dict[str, Any]:
    from omegaconf import OmegaConf

    cfg = _compose_isolated(directory, (f"{group}={name}",))
    return dict(OmegaConf.to_container(cfg[group], resolve=resolve))  # type: ignore[arg-type]


@functools.lru_cache(maxsize=16)
def _compose_isolated(directory: str, overrides: tuple[str, ...], with_hydra: bool = False) -> Any:
    """Hydra compose of ``config`` in ``directory``; a Hydra app already running in this process keeps its
    global state (set aside, restored). Cached: callers must not modify the result."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    running = GlobalHydra.instance().hydra  # a @hydra.main app in progress, or None
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=directory, version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=with_hydra)
    finally:
        GlobalHydra.instance().hydra = running
