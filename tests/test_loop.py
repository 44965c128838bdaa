"""The training loop end to end on the debug config: online on DMControl and Crafter, offline on a recorded
dataset, resume, the acting policy inside TorchRL collectors, and config errors that name the bad key."""

import json
import math
import os
import shutil
import time

import pytest
import torch
from helpers.logs import csv_logs
from helpers.states import assert_states_equal, final_payload
from omegaconf.errors import ConfigKeyError, ValidationError

from d4func.cli import main
from d4func.data.replay import END_FRAME_KEY
from d4func.train import checkpoint
from d4func.train.compat import check_first_batch
from d4func.train.loop import train
from d4func.train.phases import build_models, init_states
from d4func.train.run_config import load_run_config
from d4func.train.run_lock import LOCK_NAME
from d4func.train.run_logs import read_metrics
from d4func.train.state import NonFiniteLossError

DEBUG = "experiments/configs/debug.yaml"
REACH = "experiments/configs/reach.yaml"
SHORT = ["loop.env_steps=200", "loop.prefill_steps=50", "loop.collect_steps=50", "loop.agent_start=100",
         "loop.train_ratio=0.05", "loop.eval_every=200", "loop.checkpoint_every=100", "loop.gif_every=200",
         "env.eval_max_steps=15"]
CRAFTER = ["env.name=crafter", "dynamics.action_dim=0", "dynamics.n_actions=17", "heads.action_dim=0",
           "heads.n_actions=17"]  # the debug config on Crafter: 17 discrete actions


def test_online_loop_on_dmc_writes_checkpoint_logs_gif_and_resumes(tmp_path, monkeypatch):
    from d4func.train import checkpoint as checkpoint_module

    synced = []  # the replay files fsynced before each checkpoint
    sync = checkpoint_module.sync_replay_files
    monkeypatch.setattr(checkpoint_module, "sync_replay_files", lambda rb: synced.append(sync(rb)) or synced[-1])
    # Through the command line, as a user runs it.
    assert main(["train", "--config", DEBUG, "--quiet", f"run_dir={tmp_path}", *SHORT]) == 0
    assert synced and all(tmp_path / "replay" / "storage" / "pixels.memmap" in files for files in synced)
    summary = json.loads((tmp_path / "summary.json").read_text())
    # training starts with the batch that completes the 50 prefill steps; 4 batches x 50 steps x 0.05 = 10
    assert summary["env_steps"] == 200 and summary["grad_steps"] == 10
    assert set(summary["params"]) == {"tokenizer", "world_model", "agent"}  # imagination ran
    assert len(summary["eval"]["returns"]) == 1
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.pt"))[-1] == "ckpt-000000000200.pt"
    assert list((tmp_path / "gifs").glob("*.gif"))
    rows = read_metrics(tmp_path)
    assert any("world_model/loss" in row for row in rows) and any("eval/mean_return" in row for row in rows)
    assert any("agent/policy_loss" in row or "agent/loss" in row for row in rows)
    spreads = [row["tokenizer/latent_spread"] for row in rows if "world_model/loss" in row]
    assert spreads and all(spread > 0 for spread in spreads)  # unmasked, on every gradient step's batch
    assert (tmp_path / "logs" / "scalars").is_dir()  # TorchRL's CSV logger

    # The replay as of the newest checkpoint: all 200 transitions. The storage metadata on disk records only the
    # first extend, so a bare make_replay(path=...) samples from those alone, and warns.
    from d4func.data.replay import StaleReplayPositionWarning, make_replay
    from d4func.train.checkpoint import open_run_replay

    replay = open_run_replay(tmp_path, seed=0)
    assert replay.share_next_pixels and int((~replay[: len(replay)][END_FRAME_KEY]).sum()) == 200
    with pytest.raises(ValueError, match="rank=1"):
        open_run_replay(tmp_path, rank=1)  # a single-process run has rank 0 only
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        open_run_replay(tmp_path / "logs")
    with pytest.warns(StaleReplayPositionWarning, match=r"kept in the checkpoints of .*open_run_replay"):
        assert len(make_replay(load_run_config(DEBUG).replay.capacity, 8, 2, path=tmp_path / "replay")) < 200

    # Resume: the same run directory with a larger budget continues from the checkpoint, never from scratch.
    resumed = train(load_run_config(DEBUG, [f"run_dir={tmp_path}", *SHORT, "loop.env_steps=250"]), progress=False)
    assert resumed["env_steps"] == 250 and resumed["grad_steps"] == 12
    # DMControl resumes exactly: the interrupted episode goes on under its own id, its step count unbroken.
    assert resumed["next_traj_id"] == summary["next_traj_id"] == 1
    steps = open_run_replay(tmp_path)[:]
    ids, counts = steps.get(("collector", "traj_ids")), steps.get("step_count").reshape(-1)
    assert torch.equal(ids.unique(), torch.tensor([0])) and torch.equal(counts, torch.arange(counts.numel()))
    assert counts.numel() >= 250


def test_online_loop_on_crafter(tmp_path):
    # Episodes of at most 60 steps: 200 env steps end several (a random player rarely dies that soon).
    overrides = [f"run_dir={tmp_path}", *SHORT, *CRAFTER, "env.eval_episodes=0", "env.max_episode_steps=60"]
    cfg = load_run_config(DEBUG, overrides)
    summary = train(cfg, progress=False)
    assert summary["env_steps"] == 200 and summary["grad_steps"] == 10
    rows = read_metrics(tmp_path)
    episodes = [row for row in rows if "episode/return" in row]
    assert len(episodes) >= 3
    assert all("episode/achievements" in row and "episode/crafter_score" in row for row in episodes)
    # A resume keeps every finished episode's achievements, so the logged score stays one over all training
    # episodes; the world's state is in the checkpoint, so the interrupted episode goes on under its own id.
    saved = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(tmp_path)).payload
    assert len(saved["online"]["episode"]["achievements"]) == len(episodes)
    assert "env" in saved["online"]
    resumed = train(load_run_config(DEBUG, [*overrides, "loop.env_steps=300"]), progress=False)
    assert resumed["env_steps"] == 300
    rows = read_metrics(tmp_path)
    episodes = [row for row in rows if "episode/return" in row]
    saved = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(tmp_path)).payload
    assert len(saved["online"]["episode"]["achievements"]) == len(episodes) > 3
    # Every trajectory but the newest ran to its end (its final frame stored): none was abandoned at the resume.
    steps = checkpoint.open_run_replay(tmp_path)[:]
    ids, ends = steps.get(("collector", "traj_ids")).reshape(-1), steps.get(END_FRAME_KEY).reshape(-1)
    counts = steps.get("step_count").reshape(-1)
    for traj in ids.unique()[:-1].tolist():
        assert bool(ends[ids == traj][-1]) and torch.equal(counts[ids == traj], torch.arange(int((ids == traj).sum())))


def _collect_cartpole(data, steps: int):
    """A random-policy cartpole dataset at the debug config's size, recorded through the command line."""
    assert main(["collect", "--env", "dmc:cartpole-swingup", "--out", str(data), "--steps", str(steps),
                 "--image-size", "32", "--action-repeat", "4"]) == 0
    return data


@pytest.fixture(scope="module")
def cartpole_data(tmp_path_factory):
    """One 60-step cartpole dataset for the offline tests that only read it."""
    return _collect_cartpole(tmp_path_factory.mktemp("cartpole") / "data", steps=60)


def test_offline_loop_on_a_recorded_dataset(tmp_path, cartpole_data, capsys):
    data = cartpole_data
    cfg = load_run_config(DEBUG, [f"run_dir={tmp_path / 'run'}", "loop.mode=offline", f"loop.offline_data={data}",
                                  "loop.offline_steps=6", "loop.agent_start=3", "loop.eval_every=6",
                                  "loop.gif_every=6", "loop.checkpoint_every=3", "env.eval_max_steps=10",
                                  "loop.eval_bc=true"])
    summary = train(cfg, progress=False)
    assert summary["grad_steps"] == 6 and "agent" in summary["params"]
    assert summary["eval"]["returns"]
    capsys.readouterr()
    # `d4func eval` starts its episodes as the run's own evaluations did (the run's evaluation seed); `--bc` acts
    # with the BC head alone, as the run's eval_bc evaluations
    episodes = str(len(summary["eval"]["returns"]))
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--episodes", episodes]) == 0
    assert json.loads(capsys.readouterr().out)["returns"] == summary["eval"]["returns"]
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--episodes", episodes, "--bc"]) == 0
    bc = json.loads(capsys.readouterr().out)
    assert bc["policy"] == "bc" and bc["returns"] == summary["eval"]["bc"]["returns"]
    assert summary["eval"]["bc"]["returns"] != summary["eval"]["returns"]  # else --bc could be ignored unnoticed
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--episodes", "0"]) == 2
    assert "--episodes must be >= 1, got 0" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--threads", "-1"]) == 2
    assert "--threads must be >= 0 (0: torch's default), got -1" in capsys.readouterr().err
    threads = torch.get_num_threads()
    try:  # the run's loop.threads (1 in the debug config) unless --threads says otherwise
        assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--episodes", "1", "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
        assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--episodes", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--env", "dmc:cartpole-swingup@0,1"]) == 2
    assert "'dmc:cartpole-swingup@0,1' gives" in capsys.readouterr().err  # not a shape error inside the policy
    broken = tmp_path / "run" / "ckpt-broken.pt"
    broken.write_bytes(b"not a checkpoint")
    assert main(["eval", "--checkpoint", str(broken)]) == 2
    assert "cannot be read" in capsys.readouterr().err


def test_rows_logged_at_multiples_of_tokenizer_every_carry_the_tokenizer_metrics(tmp_path, cartpole_data):
    import warnings

    def config(steps: int):
        return load_run_config(DEBUG, [
            f"run_dir={tmp_path}", "loop.mode=offline", f"loop.offline_data={cartpole_data}",
            f"loop.offline_steps={steps}", "loop.agent_start=100", "loop.eval_every=100", "loop.gif_every=100",
            "loop.checkpoint_every=100", "env.eval_episodes=0", "loop.tokenizer_every=2", "loop.log_every=2"])

    train(config(4), progress=False)
    rows = read_metrics(tmp_path)
    assert [row["step"] for row in rows] == [2, 4]
    assert all("tokenizer/loss" in row and "world_model/loss" in row for row in rows)

    # Checkpoints record the cadence, and one that does resumes silently (4 -> 6 steps). One from before the entry
    # existed (its tokenizer updated on steps 1, 3, ... counted from 0) resumes with a warning naming both.
    blob = torch.load(checkpoint.latest_checkpoint(tmp_path), weights_only=True)
    assert blob["payload"]["tokenizer_cadence"] == "every-nth-counted-from-1"
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*cadence.*")
        train(config(6), progress=False)
    path = checkpoint.latest_checkpoint(tmp_path)
    blob = torch.load(path, weights_only=True)
    del blob["payload"]["tokenizer_cadence"]
    torch.save(blob, path)
    with pytest.warns(UserWarning, match="'every-nth-counted-from-0'.*'every-nth-counted-from-1'"):
        train(config(8), progress=False)


def test_resuming_an_offline_run_on_a_dataset_recorded_again_is_refused(tmp_path):
    data = tmp_path / "data"

    def record(steps: int, with_id: bool = True) -> None:
        shutil.rmtree(data, ignore_errors=True)
        assert main(["collect", "--env", "reach", "--out", str(data), "--steps", str(steps), "--image-size", "16",
                     "--action-repeat", "1"]) == 0
        if not with_id:  # as written before datasets carried one
            meta = json.loads((data / "dataset.json").read_text())
            del meta["dataset_id"]
            (data / "dataset.json").write_text(json.dumps(meta))

    def run(name: str, steps: int) -> None:
        train(load_run_config(REACH, [
            f"run_dir={tmp_path / name}", "loop.mode=offline", f"loop.offline_data={data}", "loop.agent_start=100",
            "loop.eval_every=100", "loop.gif_every=100", "loop.checkpoint_every=2", "env.eval_episodes=0",
            f"loop.offline_steps={steps}"]), progress=False)

    record(30)
    run("a", 2)
    record(30)  # the same path and size, recorded again
    with pytest.raises(ValueError, match="is not the recording the run trained on"):
        run("a", 4)
    record(30, with_id=False)
    with pytest.raises(ValueError, match="is not the recording the run trained on"):
        run("a", 4)
    # Without ids on either side, the length tells them apart: 30 and 40 steps of 12-step episodes, each episode
    # stored with its final frame (the last one where the recording cut it): 30 + 3 and 40 + 4 entries.
    run("b", 2)
    record(40, with_id=False)
    with pytest.raises(ValueError, match="holds 44 stored entries, but the run's checkpoint recorded 33"):
        run("b", 4)


def test_config_errors_name_the_bad_key_or_value(tmp_path, capsys):
    with pytest.raises(ConfigKeyError, match="bogus"):
        load_run_config(DEBUG, ["loop.bogus=1"])
    with pytest.raises(ValidationError, match="loop.train_ratio"):
        load_run_config(DEBUG, ["loop.train_ratio=fast"])
    with pytest.raises(ValueError, match="dynamics.latent_dim=3"):
        load_run_config(DEBUG, ["dynamics.latent_dim=3"])
    with pytest.raises(ValueError, match="'sideways'"):
        load_run_config(DEBUG, ["loop.mode=sideways"])
    # the first batch is drawn after the round that completes the prefill: 2 x 4 steps, no row of 8 + 1
    code = main(["train", "--config", DEBUG, "--quiet", f"run_dir={tmp_path / 'short'}", "loop.prefill_steps=5",
                 "loop.collect_steps=4"])
    assert code == 2 and "training starts after 8 env steps" in capsys.readouterr().err
    check_first_batch(load_run_config(DEBUG, ["loop.prefill_steps=0", "loop.collect_steps=50"]))  # one 50-step round
    reach_online = ["loop.mode=online", "loop.offline_data=null"]
    with pytest.raises(ValueError, match=r"last at most 12 env steps \(Reach's episode length\), fewer than a row's "
                       "replay.seq_len=16"):
        check_first_batch(load_run_config(REACH, [*reach_online, "replay.seq_len=16"]))
    with pytest.raises(ValueError, match=r"at most 6 env steps \(env.max_episode_steps\)"):
        check_first_batch(load_run_config(REACH, [*reach_online, "env.max_episode_steps=6"]))
    with pytest.raises(ValueError, match="replay.capacity=12 entries cannot hold a round .* at least 109"):
        check_first_batch(load_run_config(REACH, [*reach_online, "replay.capacity=12"]))
    with pytest.raises(ValueError, match="context_len=8 must be < seq_len=8"):
        load_run_config(REACH, ["replay.context_len=8"])
    # LPIPS's trunk needs RGB frames of a least side: refused at load, not at the first tokenizer step
    with pytest.raises(ValueError, match="lpips_net='alex' needs frames of side >= 31, got 16x16"):
        load_run_config(REACH, ["tokenizer_loss.lpips_weight=0.2"])
    with pytest.raises(ValueError, match="lpips_net must be one of"):
        load_run_config(REACH, ["tokenizer_loss.lpips_net=resnet"])
    assert main(["train", "--config", DEBUG, "loop.bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("env: {name: [unclosed\n")
    (tmp_path / "list.yaml").write_text("- env\n- replay\n")
    for config, message in [(tmp_path / "bad.yaml", "is not valid YAML"), (tmp_path, "is not a file"),
                            (tmp_path / "list.yaml", "must hold a mapping of sections")]:
        assert main(["train", "--config", str(config)]) == 2
        assert message in capsys.readouterr().err
    assert main(["collect", "--env", "reach", "--out", str(tmp_path / "bad.yaml" / "data"), "--steps", "3"]) == 2
    assert "NotADirectoryError" in capsys.readouterr().err
    # a two-camera env under the single-camera debug tokenizer stops before training, naming both shapes
    code = main(["train", "--config", DEBUG, "--quiet", f"run_dir={tmp_path / 'cams'}",
                 "env.name=dmc:cartpole-swingup@0,1"])
    err = capsys.readouterr().err
    assert code == 2 and "[2, 3, 32, 32]" in err and "tokenizer.n_cameras=1" in err


def test_acting_policy_runs_in_a_torchrl_collector():
    from torchrl.collectors import Collector

    from d4func.envs.registry import make_env
    from d4func.train.acting import WorldModelPolicy, agent_params_from_states

    cfg = load_run_config(DEBUG)
    models = build_models(cfg)
    states = init_states(cfg, models)
    env = make_env(cfg.env.name, seed=0, image_size=cfg.env.image_size, action_repeat=cfg.env.action_repeat)
    policy = WorldModelPolicy(models.tokenizer, models.dynamics, models.heads, env.action_spec, context=4, seed=0)
    policy.update_params(states["tokenizer"]["params"], agent_params_from_states(states["world_model"], None))
    collector = Collector(env, policy, frames_per_batch=12, total_frames=24)
    batches = list(collector)
    collector.shutdown()
    assert len(batches) == 2
    actions = torch.cat([b.get("action") for b in batches])
    assert actions.shape == (24, 1) and actions.abs().max() <= 1.0 and actions.std() > 0
    # the policy kept a bounded context: the caches never grow beyond the window
    assert policy._caches["dynamics"]["valid"].shape[1] <= 3


def test_acting_keeps_as_many_frames_as_a_training_row_holds():
    from d4func.envs.registry import make_env
    from d4func.train.evaluation import make_eval_policy

    for final_frame, frames in (("true", 9), ("false", 8)):
        cfg = load_run_config(DEBUG, [f"replay.final_frame={final_frame}"])
        assert cfg.replay.seq_len == 8 and cfg.replay.row_frames == frames
        models = build_models(cfg)
        env = make_env(cfg.env.name, seed=0, image_size=cfg.env.image_size, action_repeat=cfg.env.action_repeat)
        assert make_eval_policy(cfg, models, init_states(cfg, models), env.action_spec).context == frames


@pytest.mark.parametrize("name", ["debug", "dmc_cartpole", "crafter", "dmc_multicam", "offline"])
def test_shipped_run_configs_load(name):
    cfg = load_run_config(f"experiments/configs/{name}.yaml")
    assert cfg.tokenizer.latent_tokens == cfg.dynamics.latent_tokens
    assert (cfg.dynamics.n_actions == 17) == (cfg.env.name == "crafter")


def test_lpips_without_backbone_weights_stops_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))  # no cached ImageNet weights here
    code = main(["train", "--config", DEBUG, f"run_dir={tmp_path / 'run'}", "tokenizer_loss.lpips_weight=0.2"])
    assert code == 2
    assert "LPIPS" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("normalize", [False, True])
def test_offline_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, normalize):
    data = _collect_cartpole(tmp_path / "data", steps=40)
    common = [f"finetune.normalize={str(normalize).lower()}", "loop.mode=offline", f"loop.offline_data={data}",
              "loop.agent_start=2", "loop.eval_every=1000",
              "loop.checkpoint_every=1000", "env.eval_episodes=0", "loop.log_every=1",
              # Learning-rate schedules whose warmup and decay the split at step 3 falls inside: the resumed run
              # must pick each curve up at its saved update count.
              "optim.tokenizer.warmup_steps=2", "optim.tokenizer.schedule=cosine", "optim.tokenizer.decay_steps=4",
              "optim.world_model.schedule=linear", "optim.world_model.decay_steps=3",
              "optim.agent.warmup_steps=3", "optim.agent.schedule=linear", "optim.agent.decay_steps=2"]
    whole = load_run_config(DEBUG, [f"run_dir={tmp_path / 'whole'}", *common, "loop.offline_steps=5",
                                    "loop.gif_every=1000"])
    train(whole, progress=False)
    first = load_run_config(DEBUG, [f"run_dir={tmp_path / 'split'}", *common, "loop.offline_steps=3",
                                    "loop.gif_every=1000"])
    train(first, progress=False)  # stops at 3 with a checkpoint
    torch.manual_seed(1234)  # scramble the global RNG: the resumed run must not depend on it
    # A GIF at step 4 of the resumed run only: GIFs must not move the replay sampler (gif_every may change freely)
    second = load_run_config(DEBUG, [f"run_dir={tmp_path / 'split'}", *common, "loop.offline_steps=5",
                                     "loop.gif_every=2"])
    train(second, progress=False)
    assert (tmp_path / "split" / "gifs" / "real_vs_imagined_00000004.gif").exists()
    logged = [row["step"] for row in read_metrics(tmp_path / "split")]
    assert logged == [1, 2, 3, 4, 5]  # the second run resumed at step 3; a restart would log steps 1-3 again

    from d4func.train.checkpoint import latest_checkpoint, load_checkpoint

    a = load_checkpoint(latest_checkpoint(tmp_path / "whole")).payload["states"]
    b = load_checkpoint(latest_checkpoint(tmp_path / "split")).payload["states"]
    assert set(a) == {"tokenizer", "world_model", "agent"}
    assert_states_equal(a, b)
    # finetune.normalize's running statistics are part of the state, saved and resumed with it.
    assert ("loss_rms" in b["world_model"].keys()) == normalize
    if normalize:
        assert b["world_model"]["loss_rms", "dynamics", "count"].item() == 5


@pytest.mark.slow  # ~15 s: two Crafter worker processes (the single-process collector is tested above)
def test_acting_policy_runs_in_a_multi_process_collector():
    from functools import partial

    from torchrl.collectors import MultiSyncCollector

    from d4func.envs.registry import make_env
    from d4func.train.acting import WorldModelPolicy, agent_params_from_states

    cfg = load_run_config(DEBUG, CRAFTER)
    models = build_models(cfg)
    states = init_states(cfg, models)
    makers = [partial(make_env, "crafter", seed=seed, image_size=cfg.env.image_size) for seed in (0, 1)]
    policy = WorldModelPolicy(models.tokenizer, models.dynamics, models.heads, makers[0]().action_spec, context=4,
                              seed=0)
    policy.update_params(states["tokenizer"]["params"], agent_params_from_states(states["world_model"], None))
    collector = MultiSyncCollector(makers, policy, frames_per_batch=16, total_frames=32)
    try:
        batches = list(collector)
    finally:
        collector.shutdown()
    assert len(batches) == 2
    actions = torch.cat([b.get("action").reshape(-1) for b in batches])
    assert actions.dtype == torch.int64 and actions.numel() == 32
    assert actions.min() >= 0 and actions.max() < 17 and actions.unique().numel() > 1
    assert torch.cat([b.get(("collector", "traj_ids")).reshape(-1) for b in batches]).unique().numel() == 2


def test_online_resume_with_a_seeded_env_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    # Reach keeps its whole runtime state (d4func.envs.resumable), so the resumed run continues the interrupted
    # episode: 5-step rounds against 12-step episodes put the stop mid-episode.
    common = ["loop.mode=online", "loop.offline_data=null", "loop.prefill_steps=10", "loop.collect_steps=5",
              "loop.train_ratio=0.4", "loop.agent_start=20", "loop.eval_every=1000", "loop.gif_every=1000",
              "loop.checkpoint_every=1000", "loop.log_every=1", "env.eval_episodes=1", "replay.batch_size=2",
              "loop.eval_bc=false"]
    reach = "experiments/configs/reach.yaml"
    train(load_run_config(reach, [f"run_dir={tmp_path / 'whole'}", *common, "loop.env_steps=35"]), progress=False)
    train(load_run_config(reach, [f"run_dir={tmp_path / 'split'}", *common, "loop.env_steps=20"]), progress=False)
    torch.manual_seed(1234)  # scramble the global RNG: the resumed run must not depend on it
    train(load_run_config(reach, [f"run_dir={tmp_path / 'split'}", *common, "loop.env_steps=35"]), progress=False)

    from d4func.train.checkpoint import latest_checkpoint, load_checkpoint

    whole = load_checkpoint(latest_checkpoint(tmp_path / "whole")).payload
    split = load_checkpoint(latest_checkpoint(tmp_path / "split")).payload
    assert whole["counters"] == split["counters"] and whole["counters"]["grad_steps"] == 12
    assert_states_equal(whole["states"], split["states"])
    assert set(whole["states"]) == {"tokenizer", "world_model", "agent"}

    # same losses and episode returns, row by row: a restart instead of a resume would repeat rows
    assert _train_rows(tmp_path / "whole") == _train_rows(tmp_path / "split")


@pytest.mark.slow  # ~30 s each; the default suite checks the same continuation in the loop tests above
@pytest.mark.parametrize("env", [[], CRAFTER], ids=["dmc", "crafter"])
def test_online_resume_continues_the_episode_bitwise(tmp_path, env):
    # DMControl envs keep their physics, step count and task RNG in the checkpoint (ResumableDMControlWrapper),
    # Crafter its whole world (crafter_state): a run stopped mid-episode and resumed equals the uninterrupted one,
    # episode returns and losses included.
    common = [*env, "loop.prefill_steps=10", "loop.collect_steps=5", "loop.train_ratio=0.4", "loop.agent_start=20",
              "loop.eval_every=1000", "loop.gif_every=1000", "loop.checkpoint_every=1000", "loop.log_every=1",
              "env.eval_episodes=0", "env.max_episode_steps=12", "replay.batch_size=2", "loop.eval_bc=false"]
    train(load_run_config(DEBUG, [f"run_dir={tmp_path / 'whole'}", *common, "loop.env_steps=30"]), progress=False)
    train(load_run_config(DEBUG, [f"run_dir={tmp_path / 'split'}", *common, "loop.env_steps=20"]), progress=False)
    torch.manual_seed(1234)  # scramble the global RNG: the resumed run must not depend on it
    train(load_run_config(DEBUG, [f"run_dir={tmp_path / 'split'}", *common, "loop.env_steps=30"]), progress=False)
    whole, split = final_payload(tmp_path / "whole"), final_payload(tmp_path / "split")
    assert whole["counters"] == split["counters"] and whole["counters"]["grad_steps"] == 10
    assert_states_equal(whole["states"], split["states"])
    rows = _train_rows(tmp_path / "whole")
    assert rows == _train_rows(tmp_path / "split")
    assert sum("episode/return" in row for row in rows) == 2  # episodes of 12 steps: the stop at 20 was mid-episode


def test_loop_runs_under_bf16_autocast_and_keeps_float32_state(tmp_path):
    data = _collect_cartpole(tmp_path / "data", steps=30)
    common = ["loop.mode=offline", f"loop.offline_data={data}", "loop.offline_steps=3", "loop.agent_start=1",
              "loop.log_every=1", "loop.gif_every=1000", "loop.eval_every=1000", "env.eval_episodes=0"]

    def world_model_losses(run: str) -> list[float]:
        rows = read_metrics(tmp_path / run)
        return [row["world_model/loss"] for row in rows if "world_model/loss" in row]

    train(load_run_config(DEBUG, [f"run_dir={tmp_path / 'run'}", *common, "precision.bf16=true"]), progress=False)
    train(load_run_config(DEBUG, [f"run_dir={tmp_path / 'fp32'}", *common]), progress=False)
    from d4func.train.checkpoint import latest_checkpoint, load_checkpoint

    states = load_checkpoint(latest_checkpoint(tmp_path / "run")).payload["states"]
    for name, state in states.items():
        for key, value in state["params"].items(include_nested=True, leaves_only=True):
            assert value.dtype == torch.float32 and torch.isfinite(value).all(), (name, key)
    losses = world_model_losses("run")
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    # The flag reaches the step: bf16 compute changes the losses of the same seeded run.
    assert losses != world_model_losses("fp32")


def test_cli_reads_overrides_on_both_sides_of_quiet_and_reports_a_bad_key_in_one_line(tmp_path, capsys):
    assert main(["train", "--config", DEBUG, f"run_dir={tmp_path}", "--quiet", "loop.bogus_key=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "d4func train: ConfigKeyError: Key 'bogus_key' not in 'LoopConfig'", err
    with pytest.raises(SystemExit):  # an option it does not know is still refused by argparse
        main(["train", "--config", DEBUG, "--bogus-flag"])


@pytest.mark.parametrize("seed", [-1, 2**31])
def test_a_run_seed_out_of_range_is_named(tmp_path, seed):
    with pytest.raises(ValueError, match=f"RunConfig.seed must be in .*got {seed}"):
        load_run_config(DEBUG, [f"run_dir={tmp_path}", f"seed={seed}"])


def test_cuda_device_without_cuda_names_the_device(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    cfg = load_run_config(DEBUG, [f"run_dir={tmp_path}", "device=cuda"])
    with pytest.raises(ValueError, match="device='cuda'"):
        train(cfg, progress=False)


@pytest.mark.slow
def test_online_loop_with_torch_compile_on_dmc(tmp_path):
    # precision.compile loads triton before the DMControl env sets up EGL (the other order has crashed here), then
    # compiles the gradient step. Slow on CPU (minutes of compilation), hence not in the default suite.
    cfg = load_run_config(DEBUG, [f"run_dir={tmp_path}", *SHORT, "loop.env_steps=100", "precision.compile=true"])
    summary = train(cfg, progress=False)
    assert summary["env_steps"] == 100 and summary["grad_steps"] > 0
    assert math.isfinite(summary["eval"]["mean_return"])


def test_nan_in_the_loop_stops_naming_phase_and_step_with_the_last_good_state_saved(tmp_path, cartpole_data, capsys):
    # A learning rate of 1e6 blows the world model up within a few steps.
    run = tmp_path / "run"
    args = ["train", "--config", DEBUG, "--quiet", f"run_dir={run}", "loop.mode=offline",
            f"loop.offline_data={cartpole_data}", "loop.offline_steps=50", "loop.agent_start=1000",
            "loop.checkpoint_every=1000", "loop.gif_every=1000", "env.eval_episodes=0", "optim.world_model.lr=1e6"]
    assert main(args) == 3  # one line, no traceback
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "NonFiniteLossError" in err
    assert "world_model phase: non-finite" in err
    failed_at = int(err.split("loop gradient step ")[1].split(")")[0])
    latest = checkpoint.latest_checkpoint(run)
    assert latest is not None and latest.name == f"ckpt-{failed_at:012d}.pt" and failed_at < 50
    loaded = checkpoint.load_checkpoint(latest)
    assert loaded.payload["counters"]["grad_steps"] == failed_at
    world_model = loaded.payload["states"]["world_model"]
    assert int(world_model["step"]) == failed_at  # the state from before the failing update
    assert all(torch.isfinite(leaf).all() for leaf in world_model["params"].values(True, True))


def _reach_online_with_credit(run_dir, *overrides: str):
    """Online Reach, 5 env steps per round at train ratio 0.8: each round pays for 4 gradient steps up front from
    counters["train_credit"], earned from the round that completes the prefill (env steps 5-10) on."""
    return load_run_config("experiments/configs/reach.yaml", [
        f"run_dir={run_dir}", "loop.mode=online", "loop.offline_data=null", "loop.prefill_steps=10",
        "loop.collect_steps=5", "loop.train_ratio=0.8", "loop.agent_start=1000", "loop.env_steps=200",
        "loop.eval_every=100000", "loop.gif_every=100000", "loop.checkpoint_every=100000", "env.eval_episodes=0",
        "replay.batch_size=2", *overrides])


def _assert_unfinished_steps_are_owed(run_dir) -> None:
    counters = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(run_dir)).payload["counters"]
    earned = 0.8 * (counters["env_steps"] - 5)
    assert counters["grad_steps"] + counters["train_credit"] == pytest.approx(earned)
    assert counters["train_credit"] >= 1  # at least the step that was stopped is owed


def test_nan_in_the_online_loop_saves_the_unfinished_steps_of_its_round_as_credit(tmp_path):
    # The state saved at a NaN stop must still owe the steps its round did not finish (a resume then runs them).
    with pytest.raises(NonFiniteLossError, match="loop gradient step"):
        train(_reach_online_with_credit(tmp_path, "optim.world_model.lr=1e6"), progress=False)
    _assert_unfinished_steps_are_owed(tmp_path)


def test_ctrl_c_in_the_middle_of_a_round_saves_its_unfinished_steps_as_credit(tmp_path, monkeypatch):
    from d4func.train import loop

    calls = {"n": 0}
    real_step = loop.gradient_step

    def interrupted_on_the_sixth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # the second step of the second training round
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "gradient_step", interrupted_on_the_sixth)
    summary = train(_reach_online_with_credit(tmp_path), progress=False)  # one process: saves, then ends
    assert summary["grad_steps"] == 5
    _assert_unfinished_steps_are_owed(tmp_path)


def test_resume_refuses_a_config_that_changes_the_models_and_warns_on_other_changes(tmp_path, cartpole_data):
    common = [f"run_dir={tmp_path}", "loop.mode=offline", f"loop.offline_data={cartpole_data}",
              "loop.agent_start=1000", "loop.gif_every=1000", "loop.eval_every=1000", "env.eval_episodes=0"]
    train(load_run_config(DEBUG, [*common, "loop.offline_steps=2"]), progress=False)
    saved_config = (tmp_path / "config.json").read_text()
    with pytest.raises(ValueError, match=r"tokenizer.latent_dim: 8 -> 4.*another run_dir"):
        train(load_run_config(DEBUG, [*common, "loop.offline_steps=3", "tokenizer.latent_dim=4",
                                      "dynamics.latent_dim=4"]), progress=False)
    with pytest.raises(ValueError, match=r"seed: 0 -> 1"):
        train(load_run_config(DEBUG, [*common, "loop.offline_steps=3", "seed=1"]), progress=False)
    assert (tmp_path / "config.json").read_text() == saved_config  # a refused resume leaves the run as it was
    (tmp_path / "config.json").unlink()  # lost: the newest checkpoint's own config is compared instead
    with pytest.raises(ValueError, match=r"seed: 0 -> 1"):
        train(load_run_config(DEBUG, [*common, "loop.offline_steps=3", "seed=1"]), progress=False)
    with pytest.warns(UserWarning, match=r"optim.world_model.lr: 0.0003 -> 0.0001"):
        summary = train(load_run_config(DEBUG, [*common, "loop.offline_steps=3", "optim.world_model.lr=1e-4"]),
                        progress=False)
    assert summary["grad_steps"] == 3


def test_a_run_whose_newest_checkpoint_is_damaged_resumes_from_the_one_before(tmp_path, cartpole_data):
    # With config.json lost too: the config to compare is the readable checkpoint's, not the damaged one's.
    common = [f"run_dir={tmp_path}", "loop.mode=offline", f"loop.offline_data={cartpole_data}",
              "loop.agent_start=1000", "loop.gif_every=1000", "loop.eval_every=1000", "env.eval_episodes=0",
              "loop.checkpoint_every=1", "loop.keep_checkpoints=2"]
    train(load_run_config(DEBUG, [*common, "loop.offline_steps=2"]), progress=False)
    damaged = tmp_path / checkpoint.checkpoint_name(2)
    damaged.write_bytes(damaged.read_bytes()[:1000])
    (tmp_path / "config.json").unlink()
    with pytest.warns(UserWarning, match=rf"renamed to {checkpoint.checkpoint_name(2)}.unreadable"):
        summary = train(load_run_config(DEBUG, [*common, "loop.offline_steps=3"]), progress=False)
    assert summary["grad_steps"] == 3
    assert [path.name for path in checkpoint.list_checkpoints(tmp_path)] == [
        checkpoint.checkpoint_name(2), checkpoint.checkpoint_name(3)]  # step 2 trained again from step 1


def test_a_dataset_that_does_not_fit_the_models_is_named(tmp_path, cartpole_data):
    common = [f"run_dir={tmp_path}", "loop.mode=offline", f"loop.offline_data={cartpole_data}"]
    with pytest.raises(ValueError, match=rf"dataset {cartpole_data} holds frames of shape \[3, 32, 32\].*height=64"):
        train(load_run_config(DEBUG, [*common, "env.image_size=64", "tokenizer.height=64", "tokenizer.width=64"]),
              progress=False)
    with pytest.raises(ValueError, match=rf"dataset {cartpole_data} holds continuous actions.*n_actions=17"):
        train(load_run_config(DEBUG, [*common, "dynamics.action_dim=0", "dynamics.n_actions=17",
                                      "heads.action_dim=0", "heads.n_actions=17"]), progress=False)
    # Recorded at action repeat 4: evaluating at 2 would score the agent in dynamics it never saw.
    with pytest.raises(ValueError, match=r"recorded at action_repeat=4 but env.action_repeat=2"):
        train(load_run_config(DEBUG, [*common, "env.action_repeat=2"]), progress=False)


def test_online_loop_with_two_cameras(tmp_path):
    # The shipped multi-camera config, at 32 px: both cameras' frames go through the replay, the tokenizer (one
    # stream per camera) and the acting policy; the GIF and an evaluation come out as on one camera.
    cfg = load_run_config("experiments/configs/dmc_multicam.yaml", [
        f"run_dir={tmp_path}", "env.image_size=32", "tokenizer.height=32", "tokenizer.width=32",
        "loop.env_steps=100", "loop.prefill_steps=50", "loop.collect_steps=50", "loop.train_ratio=0.02",
        "loop.agent_start=50", "loop.eval_every=100", "loop.gif_every=100", "loop.checkpoint_every=100",
        "env.eval_max_steps=8", "loop.threads=1"])
    summary = train(cfg, progress=False)
    assert summary["env_steps"] == 100 and summary["grad_steps"] == 2 and "agent" in summary["params"]
    assert len(summary["eval"]["returns"]) == 1
    assert list((tmp_path / "gifs").glob("*.gif"))
    replay = checkpoint.open_run_replay(tmp_path)
    assert tuple(replay.storage[:1]["pixels"].shape) == (1, 2, 3, 32, 32)  # both cameras stored


@pytest.mark.parametrize("kind", ["csv", "tensorboard"])
def test_run_logger_rewind_drops_rows_logged_after_the_checkpoint(tmp_path, kind):
    """A checkpoint records how many rows were logged; rewinding to it leaves metrics.jsonl (and the CSV files)
    exactly as a logger that never logged the later rows would, non-finite values included."""
    from d4func.train.run_logs import RunLogger

    cfg = load_run_config(DEBUG, [f"loop.logger={kind}"])
    rows = [({"a/x": 1.0, "b": 2.0}, 1), ({"a/x": float("nan"), "b": 3.0}, 2), ({"a/x": 4.0}, 3),
            ({"a/x": 5.0, "b": 6.0}, 4), ({"c": 7.0}, 5)]
    for name, (keep, later) in {"rewound": (2, 3), "reference": (2, 0)}.items():
        logger = RunLogger(cfg, tmp_path / name)
        for metrics, step in rows[:keep + later]:
            logger.log(metrics, step)
        logger.close()
        logger = RunLogger(cfg, tmp_path / name)  # a resumed process opens the same files
        assert logger.rows == keep + later
        logger.rewind(keep, step=rows[keep - 1][1])
        assert logger.rows == keep
        logger.log({"a/x": 9.0, "b": 9.0}, 3)
        logger.close()
    jsonl = {name: (tmp_path / name / "metrics.jsonl").read_text() for name in ("rewound", "reference")}
    assert jsonl["rewound"] == jsonl["reference"] and len(jsonl["rewound"].splitlines()) == 3
    if kind == "csv":
        rewound = csv_logs(tmp_path / "rewound")
        assert rewound["a/x.csv"] == "1,1.0\n3,9.0\n"  # the NaN row was never written to CSV
        assert rewound["b.csv"] == "1,2.0\n2,3.0\n3,9.0\n"
        assert rewound == csv_logs(tmp_path / "reference")  # c.csv, logged only after the checkpoint, is gone


def test_online_loop_with_noise_scale_and_previous_frame_skip(tmp_path):
    """The opt-in dynamics options through the whole online loop on Reach: the acting policy's KV cache carries the
    skip across episode resets and sliding windows, imagination and the world-model losses use the scaled noise."""
    reach = "experiments/configs/reach.yaml"
    cfg = load_run_config(reach, [f"run_dir={tmp_path}", "loop.mode=online", "loop.offline_data=null",
                                  "loop.prefill_steps=10", "loop.collect_steps=10", "loop.train_ratio=0.3",
                                  "loop.agent_start=20", "loop.env_steps=60", "loop.eval_every=60",
                                  "loop.gif_every=100000", "loop.checkpoint_every=100000", "loop.log_every=1",
                                  "env.eval_episodes=1", "replay.batch_size=2", "dynamics.noise_scale=0.3",
                                  "dynamics.previous_frame_skip=true"])
    summary = train(cfg, progress=False)
    assert summary["env_steps"] == 60 and summary["grad_steps"] == 18 and summary["episodes"] >= 2
    assert set(summary["params"]) == {"tokenizer", "world_model", "agent"}
    saved = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(tmp_path)).payload["config"]["dynamics"]
    assert saved["noise_scale"] == 0.3 and saved["previous_frame_skip"] is True
    rows = read_metrics(tmp_path)
    assert all(math.isfinite(row["world_model/loss"]) for row in rows if "world_model/loss" in row)


def _interrupting(real, on_call: int, generator_arg: int | None = None):
    """`real`, except that call number `on_call` raises KeyboardInterrupt (Ctrl-C), after drawing from the
    generator among its positional arguments when `generator_arg` says which one (as a step that had begun)."""
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == on_call:
            if generator_arg is not None:
                torch.rand(3, generator=args[generator_arg])
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    return wrapped


def _train_rows(run_dir) -> list[dict]:
    rows = read_metrics(run_dir)
    return [row for row in rows if "world_model/loss" in row or "episode/return" in row]


def test_ctrl_c_inside_an_offline_step_resumes_as_an_uninterrupted_run(tmp_path, monkeypatch):
    # The exit save after Ctrl-C must hold the state from before the interrupted step with the replay sampler and
    # generator from before it too: its batch had been drawn and its noise begun.
    from d4func.train import loop

    data = _collect_cartpole(tmp_path / "data", steps=40)
    common = ["loop.mode=offline", f"loop.offline_data={data}", "loop.agent_start=2", "loop.eval_every=1000",
              "loop.checkpoint_every=1000", "loop.gif_every=1000", "env.eval_episodes=0", "loop.log_every=1",
              "loop.offline_steps=5"]
    train(load_run_config(DEBUG, [f"run_dir={tmp_path / 'whole'}", *common]), progress=False)
    real_step = loop.gradient_step
    monkeypatch.setattr(loop, "gradient_step", _interrupting(real_step, 4, generator_arg=4))
    assert train(load_run_config(DEBUG, [f"run_dir={tmp_path / 'split'}", *common]), progress=False)[
        "grad_steps"] == 3
    monkeypatch.setattr(loop, "gradient_step", real_step)
    train(load_run_config(DEBUG, [f"run_dir={tmp_path / 'split'}", *common]), progress=False)
    whole, split = final_payload(tmp_path / "whole"), final_payload(tmp_path / "split")
    assert whole["counters"] == split["counters"]
    assert_states_equal(whole["states"], split["states"])
    assert _train_rows(tmp_path / "whole") == _train_rows(tmp_path / "split")


def test_ctrl_c_as_a_step_is_counted_keeps_the_step_and_resumes_as_an_uninterrupted_run(tmp_path, monkeypatch):
    # A Ctrl-C that lands after a step has returned, while the loop takes its new states and counts it: the exit
    # save must hold that step with its count (before, the states were rewound and the count kept).
    from helpers.interrupts import ctrl_c_as_grad_steps_reach

    data = _collect_cartpole(tmp_path / "data", steps=40)
    common = ["loop.mode=offline", f"loop.offline_data={data}", "loop.agent_start=2", "loop.eval_every=1000",
              "loop.checkpoint_every=1000", "loop.gif_every=1000", "env.eval_episodes=0", "loop.log_every=1",
              "loop.offline_steps=5"]
    train(load_run_config(DEBUG, [f"run_dir={tmp_path / 'whole'}", *common]), progress=False)
    with ctrl_c_as_grad_steps_reach(monkeypatch, 3):
        assert train(load_run_config(DEBUG, [f"run_dir={tmp_path / 'split'}", *common]), progress=False)[
            "grad_steps"] == 3
    saved = final_payload(tmp_path / "split")
    assert saved["counters"]["grad_steps"] == 3
    train(load_run_config(DEBUG, [f"run_dir={tmp_path / 'split'}", *common]), progress=False)
    whole, split = final_payload(tmp_path / "whole"), final_payload(tmp_path / "split")
    assert whole["counters"] == split["counters"]
    assert_states_equal(whole["states"], split["states"])
    assert _train_rows(tmp_path / "whole") == _train_rows(tmp_path / "split")


@pytest.mark.parametrize("stopped_at", [6, 18])
def test_ctrl_c_in_the_middle_of_an_online_round_resumes_as_an_uninterrupted_run(tmp_path, monkeypatch, stopped_at):
    # Stopped in the second step of a round: the resume takes the round's owed steps before collecting on, as the
    # uninterrupted run did, with the same params acting afterwards. Step 18 lies in the last round (env steps
    # 25-30): the resume has nothing left to collect but still owes that round's steps and final evaluation.
    from d4func.train import loop

    short = ["loop.env_steps=30", "loop.log_every=1"]
    train(_reach_online_with_credit(tmp_path / "whole", *short), progress=False)
    real_step = loop.gradient_step
    monkeypatch.setattr(loop, "gradient_step", _interrupting(real_step, stopped_at, generator_arg=4))
    assert train(_reach_online_with_credit(tmp_path / "split", *short), progress=False)["grad_steps"] == (
        stopped_at - 1)
    monkeypatch.setattr(loop, "gradient_step", real_step)
    train(_reach_online_with_credit(tmp_path / "split", *short), progress=False)
    whole, split = final_payload(tmp_path / "whole"), final_payload(tmp_path / "split")
    assert whole["counters"] == split["counters"]
    assert_states_equal(whole["states"], split["states"])
    assert _train_rows(tmp_path / "whole") == _train_rows(tmp_path / "split")


def test_a_ctrl_c_while_collecting_finishes_the_batch_and_resumes_as_an_uninterrupted_run(tmp_path, monkeypatch):
    # A Ctrl-C (a real SIGINT) while the collector steps the env for env steps 15-20: the loop stores and counts
    # that batch first, so the exit save holds the env mid-episode and the resumed run ends bitwise where an
    # uninterrupted one does.
    import signal

    from d4func.train import loop

    calls = {"n": 0}
    real_forward = loop.WorldModelPolicy.forward

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 18:
            os.kill(os.getpid(), signal.SIGINT)
        return real_forward(*args, **kwargs)

    short = ["loop.env_steps=30", "loop.log_every=1"]
    train(_reach_online_with_credit(tmp_path / "whole", *short), progress=False)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(loop.WorldModelPolicy, "forward", forward)
            train(_reach_online_with_credit(tmp_path / "split", *short), progress=False)
    finally:
        signal.signal(signal.SIGINT, previous)
    saved = final_payload(tmp_path / "split")
    assert saved["counters"]["env_steps"] == 20 and "env" in saved["online"]
    train(_reach_online_with_credit(tmp_path / "split", *short), progress=False)
    whole, split = final_payload(tmp_path / "whole"), final_payload(tmp_path / "split")
    assert whole["counters"] == split["counters"]
    assert_states_equal(whole["states"], split["states"])
    assert _train_rows(tmp_path / "whole") == _train_rows(tmp_path / "split")


def test_ctrl_c_while_collecting_never_stitches_a_gap_into_an_episode(tmp_path, monkeypatch):
    # Stopped at once while the collector steps the env for a batch the replay never receives (a second Ctrl-C,
    # here a KeyboardInterrupt raised in the policy): the checkpoint keeps no env state, and the resumed run starts
    # a new episode (a new id) rather than continuing the old one from an env that had moved on.
    from d4func.train import loop

    real_forward = loop.WorldModelPolicy.forward
    monkeypatch.setattr(loop.WorldModelPolicy, "forward", _interrupting(real_forward, 18))
    train(_reach_online_with_credit(tmp_path, "loop.env_steps=30"), progress=False)
    saved = final_payload(tmp_path)
    assert saved["counters"]["env_steps"] == 15 and "env" not in saved["online"]
    monkeypatch.setattr(loop.WorldModelPolicy, "forward", real_forward)
    train(_reach_online_with_credit(tmp_path, "loop.env_steps=30"), progress=False)
    replay = checkpoint.open_run_replay(tmp_path)
    steps = replay[: len(replay)]
    ids, counts = steps.get(("collector", "traj_ids")), steps.get("step_count").reshape(-1)
    for traj in ids.unique():
        mine = counts[ids == traj]
        assert torch.equal(mine, torch.arange(int(mine[0]), int(mine[0]) + mine.numel())), (int(traj), mine)


def test_an_online_run_dir_with_checkpoints_but_no_replay_is_refused(tmp_path):
    train(_reach_online_with_credit(tmp_path, "loop.env_steps=20"), progress=False)
    shutil.rmtree(tmp_path / "replay")
    with pytest.raises(ValueError, match=r"holds checkpoints \(newest ckpt-0+20.pt\) but no replay storage"):
        train(_reach_online_with_credit(tmp_path, "loop.env_steps=30"), progress=False)


def test_a_resumed_online_run_retires_what_a_killed_process_wrote_past_its_checkpoint(tmp_path):
    # The killed process's rows past the checkpoint, on a ring that has wrapped, under the episode ids the resumed
    # run hands out again: without retiring them, slices would join them to the resumed run's episodes.
    from d4func.data.replay import RETIRED_TRAJ_BASE, with_episode_end_frames

    train(_reach_online_with_credit(tmp_path, "loop.env_steps=40", "replay.capacity=30"), progress=False)
    payload = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(tmp_path)).payload
    replay = checkpoint.open_run_replay(tmp_path)
    assert len(replay) == 30  # wrapped: 40 steps and 3 end frames through 30 slots
    stale = replay.stored_transitions()[-6:]  # a copy of the newest steps as the killed run's next episode
    stale.set(("collector", "traj_ids"), torch.full((6,), payload["counters"]["next_traj_id"]))
    stale.set("step_count", torch.arange(6)[:, None])
    stale["next", "pixels"][:-1] = stale["pixels"][1:]
    stale["next", "done"][-1] = True
    replay.extend(stale)
    numbered = with_episode_end_frames(stale).shape[0]
    train(_reach_online_with_credit(tmp_path, "loop.env_steps=45", "replay.capacity=30"), progress=False)
    replay = checkpoint.open_run_replay(tmp_path)
    ids = replay.storage._storage[: len(replay)]["collector", "traj_ids"]
    # the resumed run's 5 steps overwrote the first of the killed run's 7 entries; the rest stay, retired
    assert 0 < int((ids >= RETIRED_TRAJ_BASE).sum()) < numbered
    resumed = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(tmp_path)).payload
    assert resumed["counters"]["env_steps"] == 45
    assert resumed["counters"]["grad_steps"] > payload["counters"]["grad_steps"]


def test_ctrl_c_during_an_evaluation_that_a_round_made_due_resumes_with_that_evaluation(tmp_path, monkeypatch):
    # Train ratio 0.1: each 5-step round earns half a gradient step, so the round that reaches step 25 leaves no
    # whole step unpaid. Its evaluation (due from step 24, every 12) is stopped by Ctrl-C: the resumed run must
    # still hold it at step 25, as the uninterrupted run did, and then continue exactly.
    from d4func.train import loop

    short = ["loop.env_steps=40", "loop.train_ratio=0.1", "loop.eval_every=12", "env.eval_episodes=1",
             "env.eval_max_steps=3", "loop.eval_bc=false", "loop.log_every=1"]
    train(_reach_online_with_credit(tmp_path / "whole", *short), progress=False)
    real_evaluate = loop.Trainer.evaluate
    monkeypatch.setattr(loop.Trainer, "evaluate", _interrupting(real_evaluate, 2))
    train(_reach_online_with_credit(tmp_path / "split", *short), progress=False)
    stopped = final_payload(tmp_path / "split")["counters"]
    assert stopped["env_steps"] == 25 and stopped["train_credit"] < 1 and stopped["round_pending"] == 5
    monkeypatch.setattr(loop.Trainer, "evaluate", real_evaluate)
    train(_reach_online_with_credit(tmp_path / "split", *short), progress=False)
    whole, split = final_payload(tmp_path / "whole"), final_payload(tmp_path / "split")
    assert whole["counters"] == split["counters"]
    assert_states_equal(whole["states"], split["states"])

    assert [step for step, _ in _eval_steps(tmp_path / "whole")] == [15, 25, 40]
    assert _eval_steps(tmp_path / "whole") == _eval_steps(tmp_path / "split")
    assert _train_rows(tmp_path / "whole") == _train_rows(tmp_path / "split")


def _eval_steps(run_dir) -> list[tuple[int, float]]:
    rows = read_metrics(run_dir)
    return [(row["step"], row["eval/mean_return"]) for row in rows if "eval/mean_return" in row]


def test_ctrl_c_in_the_first_round_leaves_a_run_dir_that_starts_over(tmp_path, monkeypatch):
    # Nothing stored and nothing trained: no checkpoint is written (it would name an empty replay and make the
    # run_dir refuse every later start), and the rerun is the run from the start.
    from d4func.train import loop

    real_forward = loop.WorldModelPolicy.forward
    monkeypatch.setattr(loop.WorldModelPolicy, "forward", _interrupting(real_forward, 3))
    assert train(_reach_online_with_credit(tmp_path / "split", "loop.env_steps=20"), progress=False)["env_steps"] == 0
    assert checkpoint.latest_checkpoint(tmp_path / "split") is None
    monkeypatch.setattr(loop.WorldModelPolicy, "forward", real_forward)
    train(_reach_online_with_credit(tmp_path / "split", "loop.env_steps=20"), progress=False)
    train(_reach_online_with_credit(tmp_path / "whole", "loop.env_steps=20"), progress=False)
    assert_states_equal(final_payload(tmp_path / "whole")["states"], final_payload(tmp_path / "split")["states"])


def test_ctrl_c_during_a_rounds_gif_neither_repeats_nor_drops_its_evaluation(tmp_path, monkeypatch):
    from d4func.train import loop

    short = ["loop.env_steps=30", "loop.eval_every=15", "loop.gif_every=15", "env.eval_episodes=1",
             "env.eval_max_steps=3", "loop.eval_bc=false", "loop.log_every=1"]
    train(_reach_online_with_credit(tmp_path / "whole", *short), progress=False)
    real_gif = loop.Trainer.gif
    monkeypatch.setattr(loop.Trainer, "gif", _interrupting(real_gif, 1))  # the GIF at env step 15
    train(_reach_online_with_credit(tmp_path / "split", *short), progress=False)
    stopped = final_payload(tmp_path / "split")["counters"]
    assert stopped["round_pending"] == 5 and stopped["round_done"] == loop.ROUND_EVALUATED
    monkeypatch.setattr(loop.Trainer, "gif", real_gif)
    train(_reach_online_with_credit(tmp_path / "split", *short), progress=False)
    assert [step for step, _ in _eval_steps(tmp_path / "whole")] == [15, 30]
    assert _eval_steps(tmp_path / "split") == _eval_steps(tmp_path / "whole")
    assert sorted(p.name for p in (tmp_path / "split" / "gifs").iterdir()) == sorted(
        p.name for p in (tmp_path / "whole" / "gifs").iterdir())


def test_an_evaluation_schedule_below_the_prefill_resumes_as_it_runs(tmp_path):
    # eval_every (6) below prefill (15): the evaluations held back until the first gradient step must not come in
    # a catch-up burst that a resumed run, which recomputes the schedule, would skip.
    common = ["loop.prefill_steps=15", "loop.eval_every=6", "env.eval_episodes=1", "env.eval_max_steps=3",
              "loop.eval_bc=false", "loop.checkpoint_every=20", "loop.log_every=1"]
    train(_reach_online_with_credit(tmp_path / "whole", *common, "loop.env_steps=40"), progress=False)
    train(_reach_online_with_credit(tmp_path / "split", *common, "loop.env_steps=20"), progress=False)
    train(_reach_online_with_credit(tmp_path / "split", *common, "loop.env_steps=40"), progress=False)
    assert [step for step, _ in _eval_steps(tmp_path / "whole")] == [15, 20, 25, 30, 40]  # 6, 18, 24, 30, 36
    assert _eval_steps(tmp_path / "split") == _eval_steps(tmp_path / "whole")


def test_rerunning_a_finished_online_run_keeps_its_final_evaluation(tmp_path):
    over = ["loop.env_steps=30", "env.eval_episodes=1", "env.eval_max_steps=3", "loop.eval_bc=false"]
    train(_reach_online_with_credit(tmp_path, *over), progress=False)
    logged, summary = _eval_steps(tmp_path), json.loads((tmp_path / "summary.json").read_text())
    assert [step for step, _ in logged] == [30] and "eval" in summary
    again = train(_reach_online_with_credit(tmp_path, *over), progress=False)
    assert again["note"] == "already trained to loop.env_steps" and again["eval"] == summary["eval"]
    assert _eval_steps(tmp_path) == logged


def test_rerunning_a_finished_offline_run_only_reports_it(tmp_path):
    data = tmp_path / "data"
    assert main(["collect", "--env", "reach", "--out", str(data), "--steps", "60", "--image-size", "16",
                 "--action-repeat", "1"]) == 0
    cfg = load_run_config("experiments/configs/reach.yaml", [
        f"run_dir={tmp_path / 'run'}", f"loop.offline_data={data}", "loop.offline_steps=3", "loop.agent_start=1000",
        "loop.eval_every=2", "loop.gif_every=2", "loop.checkpoint_every=2", "env.eval_episodes=1",
        "env.eval_max_steps=3", "loop.eval_bc=false"])
    summary = train(cfg, progress=False)
    run = tmp_path / "run"
    # summary.json is rewritten by design, and .lock names each run's process (run_lock.py).
    files = {path: path.stat().st_mtime_ns for path in run.rglob("*")
             if path.is_file() and path.name not in ("summary.json", LOCK_NAME)}
    metrics = (run / "metrics.jsonl").read_text()
    again = train(cfg, progress=False)
    assert again["note"] == "already trained to loop.offline_steps" and again["eval"] == summary["eval"]
    assert again["grad_steps"] == 3
    assert (run / "metrics.jsonl").read_text() == metrics  # no second final evaluation logged
    assert {path: path.stat().st_mtime_ns for path in files} == files  # no GIF, checkpoint or log rewritten


def test_ctrl_c_during_an_offline_evaluation_resumes_with_that_evaluation(tmp_path, monkeypatch):
    from d4func.train import loop

    data = tmp_path / "data"
    assert main(["collect", "--env", "reach", "--out", str(data), "--steps", "120", "--image-size", "16",
                 "--action-repeat", "1"]) == 0
    common = [f"loop.offline_data={data}", "loop.offline_steps=6", "loop.agent_start=1000", "loop.eval_every=2",
              "env.eval_episodes=1", "env.eval_max_steps=3", "loop.eval_bc=false", "loop.checkpoint_every=1000",
              "loop.gif_every=1000", "loop.log_every=1", "replay.batch_size=2"]
    train(load_run_config(REACH, [f"run_dir={tmp_path / 'whole'}", *common]), progress=False)
    real_evaluate = loop.Trainer.evaluate
    monkeypatch.setattr(loop.Trainer, "evaluate", _interrupting(real_evaluate, 2))  # the evaluation at step 4
    train(load_run_config(REACH, [f"run_dir={tmp_path / 'split'}", *common]), progress=False)
    stopped = final_payload(tmp_path / "split")["counters"]
    assert stopped["grad_steps"] == 4 and stopped["round_pending"] == 1
    monkeypatch.setattr(loop.Trainer, "evaluate", real_evaluate)
    train(load_run_config(REACH, [f"run_dir={tmp_path / 'split'}", *common]), progress=False)
    assert [step for step, _ in _eval_steps(tmp_path / "whole")] == [2, 4, 6]
    assert _eval_steps(tmp_path / "split") == _eval_steps(tmp_path / "whole")
    assert_states_equal(final_payload(tmp_path / "whole")["states"], final_payload(tmp_path / "split")["states"])


def test_checkpoint_every_minutes_saves_between_the_step_based_checkpoints(tmp_path, cartpole_data):
    # A clock that is always due: offline, a checkpoint at every gradient step besides the step-based one at 4;
    # online, one at every round boundary (5 env steps each).
    offline = ["loop.mode=offline", f"loop.offline_data={cartpole_data}", "loop.offline_steps=5",
               "loop.agent_start=1000", "loop.eval_every=1000", "loop.gif_every=1000", "loop.checkpoint_every=4",
               "env.eval_episodes=0", "loop.keep_checkpoints=10"]
    train(load_run_config(DEBUG, [f"run_dir={tmp_path / 'off'}", *offline]), progress=False)
    assert _checkpoint_steps(tmp_path / "off") == [4, 5]  # the schedule, and the exit save
    train(load_run_config(DEBUG, [f"run_dir={tmp_path / 'timed'}", *offline, "loop.checkpoint_every_minutes=1e-9"]),
          progress=False)
    assert _checkpoint_steps(tmp_path / "timed") == [1, 2, 3, 4, 5]
    online = ["loop.env_steps=25", "loop.checkpoint_every=20", "loop.keep_checkpoints=10"]
    train(_reach_online_with_credit(tmp_path / "online", *online, "loop.checkpoint_every_minutes=1e-9"),
          progress=False)
    assert _checkpoint_steps(tmp_path / "online") == [5, 10, 15, 20, 25]
    train(_reach_online_with_credit(tmp_path / "untimed", *online), progress=False)
    assert _checkpoint_steps(tmp_path / "untimed") == [20, 25]
    # saving changes nothing of the run (the replay's journal pruned at each save included)
    timed, untimed = (checkpoint.load_checkpoint(checkpoint.latest_checkpoint(tmp_path / run)).payload
                      for run in ("online", "untimed"))
    assert timed["counters"] == untimed["counters"]
    assert_states_equal(timed["states"], untimed["states"])
    assert _train_rows(tmp_path / "online") == _train_rows(tmp_path / "untimed")
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(ValueError, match=f"checkpoint_every_minutes must be a finite number >= 0.*got {bad}"):
            load_run_config(DEBUG, [f"loop.checkpoint_every_minutes={bad}"])


def test_data_parallel_ranks_save_on_rank_0s_clock(monkeypatch):
    # Each rank reads its own clock; if they decided alone, one rank would enter the collective save without the
    # others. Rank 0's decision is broadcast: a rank whose own clock says "not yet" saves when rank 0's says due.
    from types import SimpleNamespace

    from d4func.train.loop import Trainer

    def rank_0_says(due: float):
        def broadcast(tensor, src):
            assert src == 0
            tensor.fill_(due)
        return broadcast

    rank_1 = SimpleNamespace(cfg=load_run_config(DEBUG, ["loop.checkpoint_every_minutes=10"]),
                             last_save=time.monotonic(), dist=SimpleNamespace(rank=1), device=torch.device("cpu"))
    monkeypatch.setattr(torch.distributed, "broadcast", rank_0_says(1.0))
    assert Trainer.checkpoint_time_due(rank_1)
    rank_1.last_save -= 3600  # its own clock says due, rank 0's not
    monkeypatch.setattr(torch.distributed, "broadcast", rank_0_says(0.0))
    assert not Trainer.checkpoint_time_due(rank_1)
    rank_1.dist = None  # a single process goes by its own clock
    assert Trainer.checkpoint_time_due(rank_1)


class _Killed(BaseException):
    """A kill, as far as the loop can tell: no handler saves after it (BaseException, not Exception)."""


def _train_killed_at_save(cfg, counter: str, at: int, monkeypatch) -> None:
    """Train `cfg` until its first save with `counters[counter] >= at`, which dies instead, as a killed process
    would (the exit save after it dies too); saves before it are written. The real save is back afterwards."""
    from d4func.train.loop import Trainer

    real_save = Trainer.save

    def killed_from(self, *args, **kwargs):
        if self.counters[counter] >= at:
            raise _Killed
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "save", killed_from)
    with pytest.raises(_Killed):
        train(cfg, progress=False)
    monkeypatch.setattr(Trainer, "save", real_save)


def _checkpoint_steps(run_dir) -> list[int]:
    return sorted(int(path.stem.split("-")[1]) for path in run_dir.glob("ckpt-*.pt"))


def test_a_run_killed_rounds_after_its_checkpoint_on_a_wrapped_ring_resumes_exactly(tmp_path, monkeypatch):
    # The killed run saves at 40, then writes 4 more rounds over a 30-slot ring (overwriting entries the checkpoint
    # counts) and dies at 60 in place of its checkpoint. The resumed run samples the slots past its cursor before
    # rewriting them: it equals an uninterrupted run only if they hold what they held at 40 (the journal's undo).
    from d4func.data.overwrite_journal import JOURNAL_DIR, list_records

    settings = ["replay.capacity=30", "loop.checkpoint_every=20", "loop.keep_checkpoints=10"]
    _train_killed_at_save(_reach_online_with_credit(tmp_path / "killed", "loop.env_steps=100", *settings),
                          "env_steps", 60, monkeypatch)  # the exit save too: nothing is saved past 40
    assert _checkpoint_steps(tmp_path / "killed") == [20, 40]
    saved = checkpoint.load_checkpoint(tmp_path / "killed" / checkpoint.checkpoint_name(40))
    written = saved.payload["replay"]["written"]
    assert [first for first, _ in list_records(tmp_path / "killed" / "replay" / JOURNAL_DIR)] == [
        written, written + 5, written + 11, written + 16]  # one per round; the episode ending at 48 adds its end frame
    for run in ("killed", "whole"):
        train(_reach_online_with_credit(tmp_path / run, "loop.env_steps=70", *settings), progress=False)
    resumed, whole = (checkpoint.load_checkpoint(checkpoint.latest_checkpoint(tmp_path / run)).payload
                      for run in ("killed", "whole"))
    assert resumed["counters"] == whole["counters"] and whole["counters"]["env_steps"] == 70
    assert_states_equal(whole["states"], resumed["states"])
    assert _train_rows(tmp_path / "killed") == _train_rows(tmp_path / "whole")


def test_d4func_status_reads_where_a_run_stands(tmp_path, cartpole_data, capsys, monkeypatch):
    # A run killed at step 4 of 4 (its save there fails as a kill would): checkpoint 2 counts, unfinished, nobody
    # in it; then the rerun finishes it. A metrics line being written (no newline, cut short) is skipped.
    from d4func.train.run_lock import hold_run_dir

    run = tmp_path / "run"
    cfg = load_run_config(DEBUG, [f"run_dir={run}", "loop.mode=offline", f"loop.offline_data={cartpole_data}",
                                  "loop.offline_steps=4", "loop.agent_start=1000", "loop.checkpoint_every=2",
                                  "loop.eval_every=2", "loop.gif_every=1000", "env.eval_episodes=1",
                                  "env.eval_max_steps=5"])
    _train_killed_at_save(cfg, "grad_steps", 4, monkeypatch)
    with open(run / "metrics.jsonl", "a") as metrics:
        metrics.write('{"step": 4, "eval/mean_ret')
    assert main(["status", str(run)]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["mode"] == "offline" and status["data"] == str(cartpole_data)
    assert status["target"] == {"grad_steps": 4} and status["progress"]["grad_steps"] == 2
    assert status["fraction_done"] == 0.5 and status["finished"] is False and status["running"] is False
    assert status["checkpoints"]["count"] == 1 and status["checkpoints"]["newest_step"] == 2
    assert 0 <= status["checkpoints"]["newest_age_s"] < 600
    assert status["last_eval"]["step"] == 4 and "eval/mean_return" in status["last_eval"]  # logged past the save
    with hold_run_dir(run):
        assert main(["status", str(run)]) == 0
        assert json.loads(capsys.readouterr().out)["running"] == f"pid {os.getpid()} on {os.uname().nodename}"
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text().rsplit("\n", 1)[0] + "\n")
    train(cfg, progress=False)  # the rerun resumes from 2 and finishes
    assert main(["status", str(run)]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["finished"] is True and status["progress"]["grad_steps"] == 4 and status["fraction_done"] == 1.0
    assert main(["status", str(tmp_path)]) == 2
    assert "holds no config.json" in capsys.readouterr().err



@pytest.mark.parametrize(("mode", "counters", "ranks", "finished"), [
    ("offline", {"grad_steps": 6, "round_pending": 0}, False, True),
    ("offline", {"grad_steps": 6, "round_pending": 1}, False, False),  # its last step's checks are still owed
    ("offline", {"grad_steps": 5, "round_pending": 0}, False, False),
    ("online", {"env_steps": 300, "grad_steps": 6, "round_pending": 0}, False, True),  # env steps count, online
    ("online", {"env_steps": 200, "grad_steps": 60, "round_pending": 0}, False, False),
    ("online", {"env_steps": 300, "grad_steps": 6, "round_pending": 0}, True, True),  # rank 0's part, per rank
    ("online", {"env_steps": 300, "grad_steps": 6, "train_credit": 2.0}, False, False),  # from before round_pending
    ("online", {"env_steps": 300, "grad_steps": 6, "train_credit": 0.5}, False, True),
])
def test_status_counts_the_modes_target_and_what_a_run_still_owes(tmp_path, mode, counters, ranks, finished):
    from d4func.train.run_status import run_status

    cfg = load_run_config(DEBUG, [f"run_dir={tmp_path}", f"loop.mode={mode}", "loop.offline_data=data",
                                  "loop.offline_steps=6", "loop.env_steps=300"])
    (tmp_path / "config.json").write_text(json.dumps(checkpoint.config_to_dict(cfg)))
    full = {"episodes": 1, "next_traj_id": 1, "train_credit": 0.0, "env_steps": 0, **counters}
    payload = {"ranks": [{"counters": full}, {"counters": {**full, "episodes": 7}}]} if ranks else {"counters": full}
    checkpoint.save_checkpoint(tmp_path, 1, payload)
    status = run_status(tmp_path)
    assert status["finished"] is finished
    assert status["target"] == ({"env_steps": 300} if mode == "online" else {"grad_steps": 6})
    assert status["progress"]["episodes"] == 1 and status["running"] is False


def test_a_full_disk_ends_training_in_one_line_with_exit_code_4_and_the_run_resumes(tmp_path, cartpole_data, capsys,
                                                                                      monkeypatch):
    import errno

    from d4func import cli

    run = tmp_path / "run"
    args = ["train", "--config", DEBUG, "--quiet", f"run_dir={run}", "loop.mode=offline",
            f"loop.offline_data={cartpole_data}", "loop.offline_steps=6", "loop.agent_start=1000",
            "loop.checkpoint_every=2", "loop.eval_every=1000", "loop.gif_every=1000", "env.eval_episodes=0"]
    real_save = checkpoint.save_checkpoint

    def disk_full_from_4(run_dir, step, *rest, **kwargs):
        if step >= 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(run_dir / checkpoint.checkpoint_name(step)))
        return real_save(run_dir, step, *rest, **kwargs)

    monkeypatch.setattr(checkpoint, "save_checkpoint", disk_full_from_4)
    capsys.readouterr()
    assert cli.main(args) == cli.EXIT_IO_ERROR == 4
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0] and "ckpt-" in lines[0], lines
    assert _checkpoint_steps(run) == [2]  # whole: the failed writes left nothing behind
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    assert cli.main(args) == 0  # space again: the same command resumes from 2 and finishes
    assert checkpoint.load_checkpoint(checkpoint.latest_checkpoint(run)).payload["counters"]["grad_steps"] == 6
