"""The training loop's bookkeeping (d4func/train/loop.py), from a mutation audit: the step arithmetic checked
directly, the round schedule (gradient steps paid from the train credit, checkpoints, the agent's start, the step
training rows are logged at), env seeds at a resume, episode returns and log rewinds on tiny Reach runs."""

import json
from pathlib import Path

import pytest
import torch
from helpers.states import final_payload

from d4func.data.replay import END_FRAME_KEY
from d4func.train import checkpoint
from d4func.train.evaluation import eval_env_seed, resume_env_seed, run_episodes
from d4func.train.loop import next_multiple, train
from d4func.train.run_config import load_run_config
from d4func.train.run_logs import read_metrics

REACH = str(Path(__file__).resolve().parents[1] / "experiments/configs/reach.yaml")


def _reach_online(run_dir, *overrides: str):
    """Online Reach in 5-step rounds, training from the round that completes the 10-step prefill on; evaluations,
    GIFs and periodic checkpoints off unless `overrides` turn them on."""
    return load_run_config(REACH, [
        f"run_dir={run_dir}", "loop.mode=online", "loop.offline_data=null", "loop.prefill_steps=10",
        "loop.collect_steps=5", "loop.train_ratio=0.8", "loop.agent_start=1000", "loop.env_steps=20",
        "loop.eval_every=100000", "loop.gif_every=100000", "loop.checkpoint_every=100000", "env.eval_episodes=0",
        "replay.batch_size=2", *overrides])


def _reach_dataset(path: Path, steps: int) -> Path:
    """A Reach dataset of `steps` demonstrator steps at 16x16, recorded by `d4func collect`."""
    from d4func.cli import main

    assert main(["collect", "--env", "reach", "--out", str(path), "--steps", str(steps), "--image-size", "16",
                 "--action-repeat", "1"]) == 0
    return path


def _reach_offline(run_dir, data: Path, *overrides: str):
    """Offline Reach on `data`; evaluations, GIFs and periodic checkpoints off unless `overrides` turn them on."""
    return load_run_config(REACH, [
        f"run_dir={run_dir}", f"loop.offline_data={data}", "loop.eval_every=1000", "loop.gif_every=1000",
        "loop.checkpoint_every=1000", "env.eval_episodes=0", "replay.batch_size=2", *overrides])


def test_next_multiple_is_the_first_multiple_strictly_after_the_step():
    # Strictly after: an evaluation run at a multiple must not be due again at the same step.
    assert [next_multiple(step, 5) for step in (0, 1, 4, 5, 9, 10)] == [5, 5, 5, 10, 10, 15]


def test_resume_env_seeds_are_new_at_every_resume_point_and_never_the_evaluation_seed():
    # Each resume that starts new episodes must start new worlds: the seed depends on how far the run had got.
    for seed in (0, 7, 2**31):
        seeds = [resume_env_seed(seed, env_steps) for env_steps in (0, 15, 30, 10**6)]
        assert len(set(seeds)) == len(seeds)
        assert seed not in seeds and eval_env_seed(seed) not in seeds
        assert all(0 <= s < 2**32 for s in seeds)


def test_gradient_steps_are_paid_from_whole_credit_only(tmp_path):
    # 0.3 gradient steps per env step: a 5-step round earns 1.5. Each round pays the whole steps it has (1, then
    # 2, then 1) and carries the half over; it never borrows a step it has not earned.
    cfg = _reach_online(tmp_path, "loop.train_ratio=0.3", "loop.log_every=1")
    summary = train(cfg, progress=False)
    assert summary["grad_steps"] == 4 and summary["train_credit"] == pytest.approx(0.5)
    steps = [row["step"] for row in read_metrics(tmp_path) if "world_model/loss" in row]
    assert steps == [10, 15, 15, 20]


def test_online_training_rows_are_logged_at_the_env_step_of_their_round(tmp_path):
    # Online, the x axis of every logged scalar is env steps (as episode returns and evaluations use), not the
    # gradient step count: 4 gradient steps per round, logged at the round's env step.
    train(_reach_online(tmp_path, "loop.log_every=2"), progress=False)
    steps = [row["step"] for row in read_metrics(tmp_path) if "world_model/loss" in row]
    assert steps == [10, 10, 15, 15, 20, 20]


def test_checkpoints_are_written_at_every_multiple_of_checkpoint_every(tmp_path):
    cfg = _reach_online(tmp_path, "loop.env_steps=30", "loop.checkpoint_every=10", "loop.keep_checkpoints=10")
    train(cfg, progress=False)
    assert sorted(path.name for path in tmp_path.glob("ckpt-*.pt")) == [
        f"ckpt-{step:012d}.pt" for step in (10, 20, 30)]


def test_imagination_starts_at_agent_start_online_and_offline(tmp_path):
    # "From loop.agent_start on": online the round that reaches that env step trains the agent, offline the
    # gradient step whose count (from 0) reaches it.
    online = train(_reach_online(tmp_path / "online", "loop.env_steps=15", "loop.agent_start=15"), progress=False)
    assert "agent" in online["params"]
    assert int(final_payload(tmp_path / "online")["states"]["agent"]["step"]) == 4  # the last round's 4 steps

    data = _reach_dataset(tmp_path / "data", 40)
    offline = train(_reach_offline(tmp_path / "offline", data, "loop.offline_steps=3", "loop.agent_start=2"),
                    progress=False)
    assert "agent" in offline["params"]
    assert int(final_payload(tmp_path / "offline")["states"]["agent"]["step"]) == 1  # step 2 of 0, 1, 2


def test_gifs_leave_the_training_batches_as_they_were(tmp_path):
    # A GIF samples replay rows; it must not advance the sampler, or loop.gif_every would change the run.
    train(_reach_online(tmp_path / "gifs", "loop.gif_every=5"), progress=False)
    train(_reach_online(tmp_path / "none"), progress=False)
    assert len(list((tmp_path / "gifs" / "gifs").glob("*.gif"))) == 3
    with_gifs, without = final_payload(tmp_path / "gifs"), final_payload(tmp_path / "none")
    for name in ("tokenizer", "world_model"):
        for key, value in without["states"][name]["params"].items(True, True):
            assert torch.equal(with_gifs["states"][name]["params"][key], value), (name, key)


def test_logged_episode_returns_are_the_rewards_of_each_stored_episode(tmp_path):
    # Every finished training episode logs its own return: the sum of its stored rewards, counted from 0 again.
    summary = train(_reach_online(tmp_path, "loop.env_steps=40"), progress=False)
    logged = [row["episode/return"] for row in read_metrics(tmp_path) if "episode/return" in row]
    replay = checkpoint.open_run_replay(tmp_path)
    steps = replay[: len(replay)]
    steps = steps[~steps.get(END_FRAME_KEY).reshape(-1)]
    ids = steps.get(("collector", "traj_ids")).reshape(-1)
    rewards, dones = steps.get(("next", "reward")).reshape(-1), steps.get(("next", "done")).reshape(-1)
    finished = [traj for traj in ids.unique().tolist() if bool(dones[ids == traj].any())]
    assert summary["episodes"] == len(finished) == len(logged) >= 3  # Reach episodes last 12 steps
    assert logged == [float(rewards[ids == traj].sum()) for traj in finished]


def test_a_resume_that_starts_new_episodes_does_not_replay_the_runs_first_starts(tmp_path, monkeypatch):
    # Stopped while collecting, the checkpoint keeps no env state: the resumed run starts new episodes, from a
    # reseeded env. Seeded as at the start, it would replay the first episodes' starting states.
    from d4func.train import loop

    calls = {"n": 0}
    real_forward = loop.WorldModelPolicy.forward

    def interrupted_on_the_18th(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 18:  # while collecting the fourth round (env steps 15-20)
            raise KeyboardInterrupt
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(loop.WorldModelPolicy, "forward", interrupted_on_the_18th)
    train(_reach_online(tmp_path, "loop.env_steps=60"), progress=False)
    stopped = final_payload(tmp_path)
    assert "env" not in stopped["online"]
    monkeypatch.setattr(loop.WorldModelPolicy, "forward", real_forward)
    train(_reach_online(tmp_path, "loop.env_steps=60"), progress=False)
    replay = checkpoint.open_run_replay(tmp_path)
    steps = replay[: len(replay)]
    ids = steps.get(("collector", "traj_ids")).reshape(-1)
    starts = steps.get("step_count").reshape(-1) == 0
    first_frames = {int(traj): steps.get("pixels")[(ids == traj) & starts][0] for traj in ids[starts].unique()}
    # The episodes the first part started, paired with the resumed run's first ones.
    before = [traj for traj in sorted(first_frames) if traj < stopped["counters"]["next_traj_id"]]
    resumed = [traj for traj in sorted(first_frames) if traj >= stopped["counters"]["next_traj_id"]]
    assert len(before) == 2 and len(resumed) >= 2
    assert not all(torch.equal(first_frames[a], first_frames[b]) for a, b in zip(before, resumed[:2], strict=True))


def test_a_tensorboard_rewind_keeps_the_events_of_the_checkpoints_own_step(tmp_path):
    # The checkpoint at step 2 had seen the rows logged at step 2: TensorBoard must purge only what came after.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from d4func.train.run_logs import RunLogger

    cfg = load_run_config(REACH, ["loop.logger=tensorboard"])
    logger = RunLogger(cfg, tmp_path)
    for step in (1, 2, 3, 4):
        logger.log({"x": float(step)}, step)
    logger.logger.experiment.flush()
    logger.close()
    logger = RunLogger(cfg, tmp_path)  # the resumed process
    logger.rewind(2, step=2)
    logger.log({"x": 30.0}, 3)
    logger.logger.experiment.close()
    logger.close()
    events = EventAccumulator(str(tmp_path / "logs"))
    events.Reload()
    assert [(event.step, event.value) for event in events.Scalars("x")] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_the_prefill_acts_at_random_for_exactly_prefill_steps(tmp_path):
    # The acting policy's generator is drawn from only when the models act. A run that ends with its prefill never
    # touches it; the collector's dry call of the policy must not count as one of the prefill's steps.
    fresh = torch.Generator().manual_seed(load_run_config(REACH).seed + 5).get_state()

    def acting_rng(run_dir):
        return checkpoint.load_checkpoint(checkpoint.latest_checkpoint(run_dir)).rng[0]["generators"]["acting"]

    train(_reach_online(tmp_path / "prefill", "loop.env_steps=10"), progress=False)
    assert torch.equal(acting_rng(tmp_path / "prefill")["state"], fresh)
    train(_reach_online(tmp_path / "past", "loop.env_steps=15"), progress=False)
    assert not torch.equal(acting_rng(tmp_path / "past")["state"], fresh)  # the models acted after the prefill


def test_returns_plot_needs_evaluations_or_training_episodes(tmp_path):
    # An offline-style log (evaluations, no training episodes) still gets its plot; a log with neither gets none.
    from d4func.train.run_logs import plot_returns

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in (
        {"step": 5, "world_model/loss": 1.0}, {"step": 10, "eval/mean_return": 2.0},
        {"step": 20, "eval/mean_return": 3.0})))
    assert plot_returns(tmp_path) == tmp_path / "returns.png" and (tmp_path / "returns.png").stat().st_size > 0
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 5, "world_model/loss": 1.0}) + "\n")
    assert plot_returns(tmp_path) is None


def test_previous_summary_reports_only_the_keys_asked_for(tmp_path):
    # A finished run's rerun takes its evaluation from summary.json, never its stale counters or timings.
    from d4func.train.loop import previous_summary

    assert previous_summary(tmp_path, ("eval",)) == {}
    (tmp_path / "summary.json").write_text(json.dumps({"eval": {"mean_return": 1.5}, "wall_seconds": 9.0,
                                                       "grad_steps": 3}))
    assert previous_summary(tmp_path, ("eval", "returns_plot")) == {"eval": {"mean_return": 1.5}}


def test_an_online_run_without_evaluation_episodes_logs_no_evaluation(tmp_path):
    # env.eval_episodes=0 turns evaluation off, as offline: evaluations of no episodes used to log a return of 0
    # at every eval_every and in the summary, indistinguishable from a policy that scores 0.
    summary = train(_reach_online(tmp_path, "loop.eval_every=10", "loop.eval_bc=true"), progress=False)
    assert summary["eval"] == {}
    assert not [key for row in read_metrics(tmp_path) for key in row if key.startswith("eval/")]
    evaluated = train(_reach_online(tmp_path / "evaluated", "loop.eval_every=10", "env.eval_episodes=1"),
                      progress=False)
    assert len(evaluated["eval"]["returns"]) == 1
    assert [row["step"] for row in read_metrics(tmp_path / "evaluated") if "eval/mean_return" in row] == [10, 20]


def test_a_fresh_online_run_of_no_env_steps_says_so_and_writes_nothing(tmp_path):
    # It used to report "already trained to loop.env_steps", as a rerun of a finished run does.
    summary = train(_reach_online(tmp_path / "run", "loop.env_steps=0", "env.eval_episodes=1"), progress=False)
    assert summary["note"] == "loop.env_steps=0: nothing collected or trained"
    assert summary["env_steps"] == summary["grad_steps"] == 0 and summary["eval"] == {}
    assert read_metrics(tmp_path / "run") == [] and not list((tmp_path / "run").glob("ckpt-*"))


def test_run_episodes_refuses_fewer_than_one_episode():
    with pytest.raises(ValueError, match="episodes must be >= 1, got 0"):
        run_episodes(None, None, 0)


def test_an_offline_run_of_no_gradient_steps_evaluates_nothing(tmp_path):
    # As online, nothing is evaluated or drawn before the first gradient step: loop.offline_steps=0 used to score
    # the untrained initial policy and log it (and write its GIF) as the run's final evaluation.
    data = _reach_dataset(tmp_path / "data", 24)

    def offline(run_dir: Path, steps: int):
        return _reach_offline(run_dir, data, f"loop.offline_steps={steps}", "env.eval_episodes=1")

    summary = train(offline(tmp_path / "none", 0), progress=False)
    assert summary["grad_steps"] == 0 and summary["eval"] == {}
    assert read_metrics(tmp_path / "none") == [] and not (tmp_path / "none" / "gifs").exists()
    one = train(offline(tmp_path / "one", 1), progress=False)  # the final evaluation and GIF after a step
    assert len(one["eval"]["returns"]) == 1 and len(list((tmp_path / "one" / "gifs").iterdir())) == 1


def test_every_kept_ema_follows_its_params(tmp_path):
    # With optim.ema_decay=0 an EMA is its params' latest value. One the loop never updated would still hold the
    # initial weights, and be checkpointed beside the params as if it were trained.
    train(_reach_online(tmp_path, "optim.ema_decay=0", "loop.tokenizer_every=1"), progress=False)
    states = final_payload(tmp_path)["states"]
    for name in ("tokenizer", "world_model"):
        assert "ema" in states[name].keys(), name
        for key, value in states[name]["params"].items(True, True):
            assert torch.equal(states[name]["ema"][key], value), (name, key)


def test_an_offline_ctrl_c_as_a_step_commits_still_evaluates_that_step_on_resume(tmp_path, monkeypatch):
    # The interrupt fires as the step's commit ends, before the loop reaches that step's checks: the exit save must
    # still owe them, so the resumed run evaluates the step as the uninterrupted run did (it used to skip it).
    from helpers.interrupts import ctrl_c_as_grad_steps_reach

    data = _reach_dataset(tmp_path / "data", 40)
    common = ["loop.offline_steps=5", "loop.eval_every=3", "env.eval_episodes=1", "loop.log_every=1"]
    train(_reach_offline(tmp_path / "whole", data, *common), progress=False)
    with ctrl_c_as_grad_steps_reach(monkeypatch, 3):
        assert train(_reach_offline(tmp_path / "split", data, *common), progress=False)["grad_steps"] == 3
    train(_reach_offline(tmp_path / "split", data, *common), progress=False)

    def evaluated(run_dir):
        return [(row["step"], row["eval/mean_return"]) for row in read_metrics(run_dir) if "eval/mean_return" in row]

    assert [step for step, _ in evaluated(tmp_path / "whole")] == [3, 5]
    assert evaluated(tmp_path / "split") == evaluated(tmp_path / "whole")


def test_a_credit_summed_from_fractions_pays_each_whole_step_on_time(tmp_path):
    # 0.1 gradient steps per env step, one env step per round, credit from step 10 on: rounds 10 .. 29 earn
    # exactly 2 steps. Summed in plain floats, ten 0.1s make 0.999..., and the run ended a step short.
    cfg = _reach_online(tmp_path, "loop.train_ratio=0.1", "loop.collect_steps=1", "loop.env_steps=29")
    summary = train(cfg, progress=False)
    assert summary["grad_steps"] == 2 and summary["train_credit"] == 0
