"""Which config changes may a resumed run make? Every leaf of the real run config, changed one at a time."""

from types import SimpleNamespace

import pytest
import torch

from d4func.train import checkpoint
from d4func.train.compat import (
    RESUME_FREE,
    RESUME_MUST_MATCH,
    check_dataset_fits,
    check_env_fits,
    check_first_batch,
    check_resume_config,
    config_changes,
    flatten_config,
)
from d4func.train.run_config import load_run_config

BASE = checkpoint.config_to_dict(load_run_config("experiments/configs/debug.yaml"))
LEAVES = sorted(flatten_config(BASE))


def _with(tree: dict, dotted: str, value) -> dict:
    out = dict(tree)
    head, _, rest = dotted.partition(".")
    out[head] = _with(tree[head], rest, value) if rest else value
    return out


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if value is None:
        return 7
    if isinstance(value, list):
        return [*value, 0]
    return f"{value}_other"


@pytest.mark.parametrize("key", LEAVES)
def test_each_changed_leaf_is_forbidden_free_or_reported_by_its_section(key):
    forbidden, reported = config_changes(BASE, _with(BASE, key, _changed(flatten_config(BASE)[key])))
    section_match = any(key == p or key.startswith(f"{p}.") for p in RESUME_MUST_MATCH)
    section_free = any(key == p or key.startswith(f"{p}.") for p in RESUME_FREE)
    assert len(forbidden) == int(section_match)
    assert len(reported) == int(not section_match and not section_free)
    for line in forbidden + reported:
        assert line.startswith(f"{key}: ")


@pytest.mark.parametrize("key", ["tokenizer.patch_size", "dynamics.transformer.n_heads", "heads.n_bins", "seed",
                                 "env.name", "device", "loop.mode", "finetune.normalize"])
def test_model_seed_env_and_device_changes_are_refused(key):
    forbidden, _ = config_changes(BASE, _with(BASE, key, _changed(flatten_config(BASE)[key])))
    assert len(forbidden) == 1


@pytest.mark.parametrize(("saved", "now", "same"), [("cuda", "cuda:0", True), ("cpu", "cpu:0", True),
                                                    ("cuda:0", "cuda:1", False), ("cpu", "cuda", False)])
def test_device_spellings_of_one_device_resume(saved, now, same):
    forbidden, _ = config_changes(_with(BASE, "device", saved), _with(BASE, "device", now))
    assert forbidden == ([] if same else [f"device: {saved!r} -> {now!r}"])


@pytest.mark.parametrize("key", ["loop.env_steps", "loop.offline_steps", "loop.gif_every", "env.eval_episodes"])
def test_budget_and_reporting_changes_pass_silently(key):
    assert config_changes(BASE, _with(BASE, key, _changed(flatten_config(BASE)[key]))) == ([], [])


def test_a_config_written_before_a_key_existed_resumes_with_its_default():
    older = _with(BASE, "env", {k: v for k, v in BASE["env"].items() if k != "max_episode_steps"})
    assert "env.max_episode_steps" not in flatten_config(older)
    assert check_resume_config(older, BASE, "runs/x") == []
    gone = _with(BASE, "loop", {**BASE["loop"], "removed_option": 1})  # a key d4func no longer has is named
    assert check_resume_config(gone, BASE, "runs/x") == ["loop.removed_option: 1 -> '<absent>'"]


def test_an_unchanged_config_resumes_silently_and_a_changed_model_is_refused_by_name():
    assert check_resume_config(BASE, BASE, "runs/x") == []
    changed = _with(BASE, "dynamics.transformer.d_model", 999)
    with pytest.raises(ValueError, match=r"runs/x .*dynamics.transformer.d_model: \d+ -> 999"):
        check_resume_config(BASE, changed, "runs/x")


def test_a_config_saved_before_final_frame_existed_keeps_the_old_row_layout():
    from d4func.train.run_config import saved_run_config

    current = checkpoint.config_to_dict(load_run_config("experiments/configs/debug.yaml"))
    saved = checkpoint.config_to_dict(load_run_config("experiments/configs/debug.yaml"))
    del saved["replay"]["final_frame"]  # as written by d4func before the option
    assert saved_run_config(saved).replay.final_frame is False and current["replay"]["final_frame"] is True
    assert check_resume_config(saved, current, "run") == ["replay.final_frame: False -> True"]


REACH = "experiments/configs/reach.yaml"
REACH_ONLINE = ["loop.mode=online", "loop.offline_data=null"]
CONTINUOUS = ["dynamics.n_actions=0", "heads.n_actions=0", "dynamics.action_dim=2", "heads.action_dim=2"]


def test_first_batch_fits_exactly_at_the_episode_length_and_the_replay_capacity_limits():
    # Reach's episodes last 12 steps: a row of 12 transitions and the frame after them still fits in one.
    check_first_batch(load_run_config(REACH, [*REACH_ONLINE, "replay.seq_len=12"]))
    with pytest.raises(ValueError, match=r"at most 12 env steps .* replay.seq_len=13"):
        check_first_batch(load_run_config(REACH, [*REACH_ONLINE, "replay.seq_len=13"]))
    # A round of 100 steps beside a row of 8 and its next frame: 109 entries, no fewer.
    check_first_batch(load_run_config(REACH, [*REACH_ONLINE, "replay.capacity=109"]))
    with pytest.raises(ValueError, match="replay.capacity=108 entries .* at least 109"):
        check_first_batch(load_run_config(REACH, [*REACH_ONLINE, "replay.capacity=108"]))


def test_a_replay_that_can_wrap_to_two_short_episode_fragments_is_refused():
    # 5-step rounds and rows of 8 (9 entries with the frame after them): a round fits beside a row in 14 entries,
    # but Reach's 13-entry episodes wrap to the last 6 of one and the first 8 of the next at env step 20, and no row
    # can be drawn (TorchRL's "Did not find a single fragmented trajectory run"). 2 * 8 + 1 always holds one.
    small_rounds = [*REACH_ONLINE, "loop.prefill_steps=10", "loop.collect_steps=5"]
    check_first_batch(load_run_config(REACH, [*small_rounds, "replay.capacity=17"]))
    with pytest.raises(ValueError, match=r"replay.capacity=16 entries may hold.* replay.seq_len=8 .* at least 17"):
        check_first_batch(load_run_config(REACH, [*small_rounds, "replay.capacity=16"]))


def test_an_env_whose_actions_do_not_fit_the_models_is_named():
    from torchrl.data import Bounded

    from d4func.envs import make_env

    env = make_env("reach", seed=0, image_size=16, action_repeat=1)
    check_env_fits(load_run_config(REACH), env, "reach")  # 3 discrete actions, as reach.yaml's models
    more = ["dynamics.n_actions=4", "heads.n_actions=4"]
    with pytest.raises(ValueError, match=r"env 'reach' has 3 discrete actions but dynamics.n_actions=4"):
        check_env_fits(load_run_config(REACH, more), env, "reach")
    # A continuous env (a stand-in with specs only): its action width must be dynamics.action_dim.
    pixels = Bounded(0, 255, shape=(3, 16, 16), dtype=torch.uint8)
    arm = SimpleNamespace(observation_spec={"pixels": pixels}, action_spec=Bounded(-1.0, 1.0, shape=(2,)))
    check_env_fits(load_run_config(REACH, CONTINUOUS), arm, "arm")
    with pytest.raises(ValueError, match=r"env 'arm' has 3-dimensional actions but dynamics.action_dim=2"):
        check_env_fits(load_run_config(REACH, CONTINUOUS),
                       SimpleNamespace(observation_spec={"pixels": pixels}, action_spec=Bounded(-1.0, 1.0, shape=(3,))),
                       "arm")


def _metadata(action_dtype: str, action_shape: list[int], largest: int | None = None) -> dict:
    """A dataset.json of 16x16 RGB frames (no final frames stored, as reach.yaml's replay.final_frame=false)."""
    return {"entries": {"pixels": {"shape": [3, 16, 16], "dtype": "uint8"},
                        "action": {"shape": action_shape, "dtype": action_dtype}},
            "largest_discrete_action": largest, "longest_episode": 12}


def test_a_datasets_actions_are_checked_against_the_models_action_space():
    discrete = load_run_config(REACH)  # 3 discrete actions: indices 0 .. 2
    check_dataset_fits(discrete, _metadata("int64", [], largest=2), "d")
    with pytest.raises(ValueError, match=r"dataset d holds discrete action 3, but dynamics.n_actions=3 allows 0 .. 2"):
        check_dataset_fits(discrete, _metadata("int64", [], largest=3), "d")
    continuous = load_run_config(REACH, CONTINUOUS)
    check_dataset_fits(continuous, _metadata("float32", [2]), "d")
    with pytest.raises(ValueError, match=r"dataset d holds 3-dimensional actions but dynamics.action_dim=2"):
        check_dataset_fits(continuous, _metadata("float32", [3]), "d")
    with pytest.raises(ValueError, match=r"holds discrete actions \(int64\) but the config's dynamics.n_actions=0"):
        check_dataset_fits(continuous, _metadata("int64", [], largest=1), "d")
