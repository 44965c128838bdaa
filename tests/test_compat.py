"""Which config changes may a resumed run make? Every leaf of the real run config, changed one at a time."""

import pytest

from d4func.train import checkpoint
from d4func.train.compat import RESUME_FREE, RESUME_MUST_MATCH, check_resume_config, config_changes, flatten_config
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
                                 "env.name", "device", "loop.mode"])
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
