"""Which config changes may a resumed run make? Every leaf of the real run config, changed one at a time."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


@settings(max_examples=60, deadline=None)
@given(key=st.sampled_from(LEAVES))
def test_each_changed_leaf_is_forbidden_free_or_reported_by_its_section(key):
    forbidden, reported = config_changes(BASE, _with(BASE, key, _changed(flatten_config(BASE)[key])))
    section_match = any(key == p or key.startswith(f"{p}.") for p in RESUME_MUST_MATCH)
    section_free = any(key == p or key.startswith(f"{p}.") for p in RESUME_FREE)
    assert len(forbidden) == int(section_match)
    assert len(reported) == int(not section_match and not section_free)
    for line in forbidden + reported:
        assert line.startswith(f"{key}: ")


def test_an_unchanged_config_resumes_silently_and_a_changed_model_is_refused_by_name():
    assert check_resume_config(BASE, BASE, "runs/x") == []
    changed = _with(BASE, "dynamics.transformer.d_model", 999)
    with pytest.raises(ValueError, match=r"runs/x .*dynamics.transformer.d_model: \d+ -> 999"):
        check_resume_config(BASE, changed, "runs/x")
