"""Every config shipped in experiments/configs loads under the schema of the script it is written for, and every
loop config can start training (its first batch fits its replay): a key renamed or removed in d4func fails here,
not in a user's run of a documented command."""

import re
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


def test_the_larger_reach_config_is_the_documented_command():
    """results_reach_online_4x64.yaml names only what it changes (`base:`); it must load as the overrides that
    docs/results.md section 1 ran on results_reach_online.yaml."""
    documented = ["dynamics.transformer.d_model=64", "dynamics.transformer.n_layers=4",
                  "dynamics.transformer.n_heads=4", "dynamics.transformer.n_kv_heads=2", "heads.d_model=64",
                  "heads.hidden=128", "loop.env_steps=8000", "run_dir=runs/reach_online_4x64"]
    configs = REPO / "experiments/configs"
    assert load_config(RunConfig, str(configs / "results_reach_online_4x64.yaml")) == load_config(
        RunConfig, str(configs / "results_reach_online.yaml"), documented)


def _write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def test_a_config_merges_over_its_base_key_by_key_through_a_chain(tmp_path):
    _write(tmp_path / "shared/root.yaml", "seed: 3\nreplay: {batch_size: 8, seq_len: 12}\nloop: {env_steps: 500}\n")
    _write(tmp_path / "shared/middle.yaml", "base: root.yaml\nreplay: {batch_size: 4}\n")
    leaf = _write(tmp_path / "runs/leaf.yaml", "base: ../shared/middle.yaml\nloop: {env_steps: 700}\n")
    cfg = load_config(RunConfig, leaf, ["replay.seq_len=10"])
    assert (cfg.seed, cfg.replay.batch_size, cfg.replay.seq_len, cfg.loop.env_steps) == (3, 4, 10, 700)
    assert cfg.replay.capacity == RunConfig().replay.capacity  # untouched keys keep the schema's defaults


@pytest.mark.parametrize(("files", "message"), [
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, r"base 'a.yaml' leads back to a config already read"),
    ({"a.yaml": "base: a.yaml\n"}, r"leads back"),
    ({"a.yaml": "base: missing.yaml\n"}, r"its base '.*missing.yaml' is not a file"),
    ({"a.yaml": "base: [b.yaml]\n"}, r"base must name a YAML file relative to it, got \['b.yaml'\]"),
])
def test_a_bad_base_is_refused_naming_it(tmp_path, files, message):
    for name, text in files.items():
        _write(tmp_path / name, text)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_config(RunConfig, str(tmp_path / "a.yaml"))


def test_a_config_written_for_another_script_is_refused_naming_the_key():
    tokenizer_config = next(config for config in CONFIGS if config.stem.startswith("tokenizer_"))
    with pytest.raises(Exception, match=r"Key '\w+' not in 'RunConfig'"):
        load_config(RunConfig, str(tokenizer_config), [])


REACH = str(REPO / "experiments/configs/reach.yaml")


# Each value one step past a limit is refused with a message naming the field and the value; the values at the
# limits load (the test after this one), so an off-by-one in either direction fails.
PAST_LIMITS = [
    (["env.eval_episodes=-1"], "EnvConfig.eval_episodes must be >= 0, got -1"),
    (["env.max_episode_steps=0"], "EnvConfig.max_episode_steps must be >= 1 or None, got 0"),
    (["loop.threads=-1"], "LoopConfig.threads must be >= 0, got -1"),
    (["loop.train_ratio=-0.5"], "LoopConfig.train_ratio must be >= 0, got -0.5"),
    (["loop.offline_data=null"], "LoopConfig.offline_data must name a dataset directory in offline mode"),
    (["device=gpu"], "RunConfig.device must name a torch device, got 'gpu'"),
    (["heads.n_actions=4"], "RunConfig: heads.n_actions=4 must equal dynamics.n_actions=3"),
    (["tokenizer.width=32"], "RunConfig: tokenizer.width=32 must equal env.image_size=16"),
    (["imagination.horizon=32"], "imagination.horizon=32 is far beyond the training context replay.seq_len=8"),
    (["tokenizer.channels=1", "tokenizer_loss.lpips_weight=0.1"], "lpips_weight=0.1 needs RGB frames, but "
                                                                  "tokenizer.channels=1"),
    (["dynamics.transformer.logit_cap=0"], "TransformerConfig.logit_cap must be positive or None, got 0.0"),
    # Both used to load and fail only after the prefill: an EMA decay past 1 at the first gradient step, naming no
    # key; an eps of 0 as NaN params (0 / 0 for a head no phase-2 step trains), saved as the "last good state".
    (["optim.ema_decay=1.5"], "OptimConfig.ema_decay must lie in [0, 1], got 1.5"),
    (["optim.ema_decay=-0.1"], "OptimConfig.ema_decay must lie in [0, 1], got -0.1"),
    (["optim.world_model.eps=0"], "AdamWConfig.eps must be > 0, got 0.0"),
    # Centred on a batch of one rollout, every advantage is 0: PMPO trained nothing, with no error or warning.
    (["imagination.center_advantages=true", "replay.batch_size=1"],
     "imagination.center_advantages=true needs replay.batch_size >= 2"),
]


@pytest.mark.parametrize(("overrides", "message"), PAST_LIMITS, ids=[overrides[-1] for overrides, _ in PAST_LIMITS])
def test_a_run_config_value_past_its_limit_is_refused_naming_it(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(RunConfig, REACH, overrides)


def test_run_config_values_at_their_limits_load():
    # reach.yaml trains on rows of 8 steps: an imagined rollout may span up to 4 rows (horizon + its start frame).
    cfg = load_config(RunConfig, REACH, ["env.eval_episodes=0", "env.max_episode_steps=1", "loop.threads=0",
                                         "loop.train_ratio=0", "imagination.horizon=31", "device=cuda:1",
                                         "dynamics.transformer.logit_cap=null", "optim.ema_decay=1"])
    assert (cfg.env.eval_episodes, cfg.env.max_episode_steps, cfg.loop.train_ratio, cfg.imagination.horizon) == (
        0, 1, 0, 31)
    assert load_config(RunConfig, REACH, ["optim.ema_decay=0"]).optim.ema_decay == 0
    load_config(RunConfig, REACH, ["imagination.center_advantages=true", "replay.batch_size=2"])
    load_config(RunConfig, REACH, ["imagination.center_advantages=true", "replay.batch_size=1",
                                   "imagination.policy_coef=0"])  # value warm-up only: no PMPO to centre
