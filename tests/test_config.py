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
