"""Every config file composes; group checks and availability give one-line errors."""

import pytest
from omegaconf import OmegaConf

from apet_bench.config import (
    GROUPS,
    ConfigError,
    check_group_overrides,
    compose,
    config_dir,
    group_options,
)


@pytest.mark.parametrize("group", GROUPS)
def test_every_config_file_composes(group):
    options = group_options(group)
    assert options, f"configs/{group}/ is empty"
    for opt in options:
        cfg = compose([f"{group}={opt}"])
        c = OmegaConf.to_container(cfg, resolve=True)
        if group != "experiment":
            assert c[group]["name"] == opt, f"configs/{group}/{opt}.yaml must have name: {opt}"
            assert isinstance(c[group]["available"], bool)
            if not c[group]["available"]:
                assert isinstance(c[group]["issue"], int)


def test_defaults():
    c = OmegaConf.to_container(compose([]), resolve=True)
    assert c["model"]["name"] == "tiny_llava15" and c["method"]["name"] == "none"
    assert c["benchmark"]["name"] == "demo" and c["budget"] == 64


def test_paper_command_parses():
    cfg = compose(["model=qwen25vl", "method=fastv", "budget=0.1"])
    assert cfg.budget == 0.1 and cfg.model.name == "qwen25vl" and cfg.method.name == "fastv"


@pytest.mark.parametrize("override,bad", [("model=foo", "foo"), ("method=none,bogus", "bogus"),
                                          ("benchmark=nope", "nope"), ("experiment=zz", "zz")])
def test_unknown_group_option(override, bad):
    with pytest.raises(ConfigError) as ei:
        check_group_overrides([override])
    assert repr(bad) in str(ei.value) and "\n" not in str(ei.value)


def test_demo_experiment_sweeps_none_and_random():
    cfg = compose(["experiment=demo"])
    assert cfg.model.name == "tiny_llava15" and cfg.benchmark.name == "demo"
    raw = OmegaConf.load(config_dir() / "experiment" / "demo.yaml")
    assert raw.hydra.mode == "MULTIRUN"
    assert raw.hydra.sweeper.params.method.split(",") == ["none", "random"]


@pytest.mark.parametrize("group", ["model", "method", "benchmark"])
def test_load_group_is_the_node_run_py_composes(group):
    from apet_bench.config import load_group

    for opt in group_options(group):
        expected = OmegaConf.to_container(compose([f"{group}={opt}"])[group], resolve=True)
        got = load_group(group, opt)
        assert got == expected
        got["name"] = "changed"  # a copy: the cache is not affected
        assert load_group(group, opt)["name"] == opt


def test_load_group_and_experiment_errors_name_the_value():
    from apet_bench.config import load_experiment, load_group

    with pytest.raises(ConfigError, match="unknown model 'nosuch' .*llava15"):
        load_group("model", "nosuch")
    with pytest.raises(ConfigError, match="unknown config group 'colour'"):
        load_group("colour", "red")
    with pytest.raises(ConfigError, match="unknown experiment 'table99'"):
        load_experiment("table99")


def test_load_experiment_gives_the_preset_choices_and_its_sweep():
    from apet_bench.config import load_experiment

    t1 = load_experiment("table1")
    assert t1["model"]["name"] == "llava15" and t1["benchmark"]["name"] == "mme" and t1["tiny_limit"] == 40
    assert "apet" in t1["sweep"]["method"].split(",") and "mme" in t1["sweep"]["benchmark"].split(",")
    assert load_experiment("demo")["sweep"]["method"] == "none,random"


def test_load_group_inside_a_running_hydra_app_keeps_its_state():
    """A ``@hydra.main`` job that reads a group config keeps its own Hydra global state."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from apet_bench.config import load_group

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        before = GlobalHydra.instance().hydra
        assert before is not None
        import apet_bench.config as config_module

        config_module._compose_isolated.cache_clear()
        config_module._load_group_cached.cache_clear()
        assert load_group("method", "random")["name"] == "random"
        assert GlobalHydra.instance().hydra is before
    assert not GlobalHydra.instance().is_initialized()
