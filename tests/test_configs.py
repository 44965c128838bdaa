"""Every config shipped in experiments/configs loads under the schema of the script it is written for, and every
loop config can start training (its first batch fits its replay): a key renamed or removed in d4func fails here,
not in a user's run of a documented command."""

from pathlib import Path

import pytest
from helpers.scripts import load_experiment_script

from d4func.config import load_config
from d4func.train.compat import check_first_batch
from d4func.train.run_config import RunConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "experiments/configs").glob("*.yaml"))
# Configs of the standalone experiment scripts, by file-name prefix: (script in experiments/, its config class).
# Every other config is a `d4func train` RunConfig.
SCRIPT_SCHEMAS = {
    "agent_toy": ("imagination_toy", "ToyConfig"),
    "dynamics_": ("train_dynamics", "TrainDynamicsConfig"),
    "tokenizer_": ("train_tokenizer", "TrainTokenizerConfig"),
}


def schema_for(config: Path) -> type:
    for prefix, (script, class_name) in SCRIPT_SCHEMAS.items():
        if config.stem.startswith(prefix):
            return getattr(load_experiment_script(script), class_name)
    return RunConfig


def test_the_shipped_configs_include_the_readme_demo_and_every_script_schema():
    names = {config.name for config in CONFIGS}
    assert {"dmc_cartpole.yaml", "reach.yaml", "results_reach_online.yaml"} <= names
    for prefix in SCRIPT_SCHEMAS:
        assert any(name.startswith(prefix) for name in names), prefix


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.name)
def test_every_shipped_config_loads_under_its_scripts_schema(config: Path):
    schema = schema_for(config)
    cfg = load_config(schema, str(config), [])
    assert isinstance(cfg, schema)
    if isinstance(cfg, RunConfig):
        check_first_batch(cfg)


def test_a_config_written_for_another_script_is_refused_naming_the_key():
    tokenizer_config = next(config for config in CONFIGS if config.stem.startswith("tokenizer_"))
    with pytest.raises(Exception, match=r"Key '\w+' not in 'RunConfig'"):
        load_config(RunConfig, str(tokenizer_config), [])
