"""The `d4func` command line's own logic, without training: each flag reaches the function it configures, the
summary is printed once under torchrun, and errors end as one line (or a traceback when asked for). The commands'
real runs are tested in test_loop.py, test_import_episodes.py and test_distributed.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from d4func import cli
from d4func.train import checkpoint
from d4func.train.evaluation import eval_env_seed
from d4func.train.run_config import load_run_config

REACH = str(Path(__file__).resolve().parents[1] / "experiments/configs/reach.yaml")


class _Stop(Exception):
    """Raised by a stand-in to end a command once it has been called (not an error the CLI catches)."""


@pytest.fixture
def reach_run(tmp_path):
    """A run directory whose checkpoint holds only a config: enough for `eval` to build its env."""
    cfg = load_run_config(REACH, ["loop.mode=online", "loop.offline_data=null", "seed=7", "env.max_episode_steps=9",
                                  "env.action_repeat=3"])
    checkpoint.save_checkpoint(tmp_path / "run", 5, {"config": checkpoint.config_to_dict(cfg)})
    return tmp_path / "run"


@pytest.fixture
def made_envs(monkeypatch):
    """The keyword arguments of every `make_env` call; the call then stops the command."""
    from d4func.envs import registry

    calls: list[dict] = []

    def make_env(name, **kwargs):
        calls.append({"name": name, **kwargs})
        raise _Stop

    monkeypatch.setattr(registry, "make_env", make_env)
    return calls


def test_eval_plays_in_the_runs_own_eval_env_unless_seed_or_env_are_given(reach_run, made_envs):
    with pytest.raises(_Stop):
        cli.main(["eval", "--checkpoint", str(reach_run)])
    # The run's evaluation seed and env settings, so the episodes start as its logged evaluations did.
    assert made_envs[-1] == {"name": "reach", "seed": eval_env_seed(7), "image_size": 16, "action_repeat": 3,
                             "max_episode_steps": 9}
    with pytest.raises(_Stop):
        cli.main(["eval", "--checkpoint", str(reach_run), "--seed", "123", "--env", "dmc:cartpole-swingup"])
    assert made_envs[-1]["seed"] == 123 and made_envs[-1]["name"] == "dmc:cartpole-swingup"


def test_train_prints_its_summary_on_rank_zero_only(monkeypatch, capsys):
    from d4func.train import loop

    monkeypatch.setattr(loop, "train", lambda cfg, progress: {"grad_steps": 4, "progress": progress})
    for rank, printed in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        assert cli.main(["train", "--config", REACH, "--quiet"]) == 0
        out = capsys.readouterr().out
        assert (json.loads(out) == {"grad_steps": 4, "progress": False}) if printed else out == "", (rank, out)


def test_an_input_error_is_one_line_unless_a_traceback_is_asked_for(tmp_path, monkeypatch, capsys):
    missing = str(tmp_path / "missing.yaml")
    monkeypatch.delenv("D4FUNC_TRACEBACK", raising=False)
    assert cli.main(["train", "--config", missing]) == cli.EXIT_INPUT_ERROR
    assert capsys.readouterr().err == f"d4func train: FileNotFoundError: config {missing!r} is not a file\n"
    monkeypatch.setenv("D4FUNC_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError, match="is not a file"):
        cli.main(["train", "--config", missing])


def test_import_passes_every_option_to_the_importer(tmp_path, monkeypatch):
    from d4func.data import import_episodes

    calls = []
    monkeypatch.setattr(import_episodes, "import_npz_episodes",
                        lambda files, out, **kwargs: calls.append((files, out, kwargs)) or {"episodes": 1})
    np.savez(tmp_path / "b.npz", x=np.zeros(1))
    np.savez(tmp_path / "a.npz", x=np.zeros(1))
    assert cli.main(["import", "--episodes", str(tmp_path), "--out", "data", "--pixels", "front,wrist",
                     "--terminated", "is_terminal", "--channels-first", "--rewards-on", "arrival", "--join-chunks",
                     "--source", "expert"]) == 0
    files, out, kwargs = calls[-1]
    assert [f.name for f in files] == ["a.npz", "b.npz"] and out == "data"  # sorted by name
    assert kwargs["keys"] == {"pixels": ["front", "wrist"], "action": "action", "reward": "reward",
                              "is_first": "is_first", "terminated": "is_terminal"}
    assert (kwargs["channels_last"], kwargs["rewards_on"], kwargs["join_chunks"], kwargs["source"]) == (
        False, "arrival", True, "expert")
    assert kwargs["env_config"] is None
    # The defaults: one camera named "pixels", channels last, no terminal flag named (read where present).
    assert cli.main(["import", "--episodes", str(tmp_path / "a.npz"), "--out", "data"]) == 0
    files, _, kwargs = calls[-1]
    assert [f.name for f in files] == ["a.npz"]
    assert kwargs["keys"]["pixels"] == "pixels" and "terminated" not in kwargs["keys"]
    assert (kwargs["channels_last"], kwargs["rewards_on"], kwargs["join_chunks"]) == (True, "action", False)


def test_an_error_line_is_written_whole_in_one_write(monkeypatch):
    # Under torchrun every rank stops on the same NaN and prints its line to one shared stderr; with an unbuffered
    # stderr (PYTHONUNBUFFERED) print() wrote the text and its newline apart, and two ranks' lines ran into one.
    writes: list[str] = []

    class Recorder:
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(cli.sys, "stderr", Recorder())
    assert cli.main(["train", "--config", REACH, "loop.no_such_key=1"]) == cli.EXIT_INPUT_ERROR
    assert len(writes) == 1 and writes[0].startswith("d4func train: ConfigKeyError: ") and writes[0].endswith("\n")
    assert "no_such_key" in writes[0] and writes[0].count("\n") == 1


def test_an_io_error_outside_training_does_not_promise_a_checkpoint(tmp_path, monkeypatch, capsys):
    import errno

    from d4func.data import offline

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "data"))

    monkeypatch.delenv("D4FUNC_TRACEBACK", raising=False)
    monkeypatch.setattr(offline, "collect", disk_full)
    capsys.readouterr()
    code = cli.main(["collect", "--env", "reach", "--out", str(tmp_path / "data"), "--steps", "3"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_IO_ERROR and len(lines) == 1, lines
    assert "No space left on device" in lines[0] and "checkpoint" not in lines[0]
    assert lines[0].endswith("run the command again once the cause is fixed")
