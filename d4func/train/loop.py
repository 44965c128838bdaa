"""The training loop: DreamerV3-style online training (collect -> train world model -> imagine -> train agent) and
offline training from a recorded dataset, both from one `RunConfig`.

Every gradient step updates each phase once, on one replay batch: tokenizer, world model (dynamics, BC and reward
heads) and, from `loop.agent_start` on, imagination (`phases.gradient_step`).

Online, `loop.train_ratio` gradient steps follow every collected env step (fractions carry over); the acting
policy (`acting.WorldModelPolicy`) runs inside a TorchRL `Collector` and acts at random for the first
`loop.prefill_steps` steps. Offline, there is no env: `loop.offline_steps` gradient steps on the dataset, with
`loop.agent_start` counted in gradient steps; evaluation episodes run when the dataset's env can be built.

State at the edges: the replay (memmapped, reopened on resume), the envs, the logger and the checkpoints
(`run_dir/ckpt-*.pt`, atomic, every `loop.checkpoint_every` steps, optionally every
`loop.checkpoint_every_minutes`, and at exit, Ctrl-C included). A NaN or inf stops
training with the last good state saved.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tensordict import TensorDictBase
from torch import Tensor
from torchrl.envs import EnvBase
from tqdm import tqdm

from d4func.durable_files import replace_text
from d4func.envs.resumable import get_env_state, set_env_state, supports_resume_state
from d4func.functional import count_params, grad_and_value
from d4func.train import checkpoint
from d4func.train import distributed as dp
from d4func.train.acting import WorldModelPolicy
from d4func.train.compat import check_dataset_fits, check_env_fits, check_first_batch, check_resume_config
from d4func.train.evaluation import (
    ENV_SEED_BITS,
    acting_params,
    crafter_score_of,
    eval_env_seed,
    make_eval_policy,
    resume_env_seed,
    run_episodes,
    write_gif,
)
from d4func.train.interrupts import Terminated, interrupts_deferred, sigterm_raises, sigterm_recorded
from d4func.train.phases import (
    TOKENIZER_CADENCE,
    build_models,
    gradient_step,
    init_states,
    make_lpips_fn,
    replay_batch,
)
from d4func.train.precision import compiled_grad_fn, load_compiler_before_rendering, wrap_step
from d4func.train.run_config import RunConfig, resolve_device
from d4func.train.run_lock import hold_run_dir
from d4func.train.run_logs import RunLogger, plot_returns
from d4func.train.state import NonFiniteLossError

if TYPE_CHECKING:
    from torchrl.collectors import Collector


class Trainer:
    """Holds the edges of one run (envs, replay, logger, checkpoints) around the pure train states."""

    def __init__(self, cfg: RunConfig, dist_info: dp.DistInfo | None = None) -> None:
        self.cfg = cfg
        # Data parallel (torchrun): every rank trains on its own batches, gradients are averaged, rank 0 alone
        # writes config, logs, GIFs, evaluations and checkpoints (holding every rank's RNG states).
        self.dist = dist_info
        self.is_main = dist_info is None or dist_info.is_main
        self.sigterm_received: Callable[[], bool] | None = None  # data parallel, while training: see `training`
        self.lpips_fn = make_lpips_fn(cfg)  # before anything is written: missing weights stop the run at once
        if cfg.loop.threads:
            torch.set_num_threads(cfg.loop.threads)
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config_file = self.run_dir / "config.json"
        if self.is_main:
            # Rank 0 alone reads and rewrites config.json; an error here ends rank 0, and torchrun stops the rest.
            newest = checkpoint.latest_checkpoint(self.run_dir)
            if newest is not None:
                # config.json, or (deleted, or lost in a copy) the config of the checkpoint the run will resume from:
                # the newest readable one, damaged ones moved aside as the resume (`restore`) moves them.
                saved = (json.loads(config_file.read_text()) if config_file.exists() else
                         checkpoint.newest_readable_checkpoint(self.run_dir, move_aside=True).payload["config"])
                changed = check_resume_config(saved, checkpoint.config_to_dict(cfg), str(self.run_dir))
                if changed:
                    warnings.warn(f"resuming {self.run_dir} with a changed config (so it will not equal an "
                                  f"uninterrupted run): {'; '.join(changed)}", stacklevel=2)
            # Atomically: a process killed mid-write must not leave a config.json that blocks every later start.
            # Unchanged text is not rewritten (a finished run's rerun leaves its files as they were).
            text = json.dumps(checkpoint.config_to_dict(cfg), indent=2)
            if not (config_file.exists() and config_file.read_text() == text):
                replace_text(config_file, text)
        if dist_info is not None:
            torch.distributed.barrier()
        torch.manual_seed(cfg.seed)
        self.device = dist_info.device if dist_info is not None else resolve_device(cfg.device)
        self.models = build_models(cfg)
        self.states = {name: state.to(self.device) for name, state in init_states(cfg, self.models).items()}
        if dist_info is not None:
            # Every rank initialised the same params from cfg.seed (rank 0's are broadcast anyway); from here on the
            # global RNG (the prefill's random actions draw from it) gets a stream of its own on each rank.
            torch.manual_seed(self.rank_seed(cfg.seed, "global"))
        # Noise for the train steps is drawn where the batch lives (a CUDA generator for CUDA tensors); each
        # data-parallel rank draws its own stream.
        self.generator = torch.Generator(device=self.device).manual_seed(self.rank_seed(cfg.seed + 3, "train"))
        # bf16 autocast, fused-attention-only SDPA and torch.compile, each behind a `precision` flag; with all
        # flags off these are `grad_and_value` and `gradient_step` themselves. torch.compile compiles each phase's
        # loss (forward and backward), not the whole step (precision.py's module doc says why).
        load_compiler_before_rendering(cfg.precision)  # the envs are built after this
        grad_fn = dp.data_parallel_grad_and_value if dist_info is not None else grad_and_value
        self.grad_fn = compiled_grad_fn(grad_fn, cfg.precision)
        self.step_fn = wrap_step(gradient_step, replace(cfg.precision, compile=False), self.device)
        # next_traj_id: episode ids in the replay must never repeat; a resumed run's collector counts from 0 again,
        # so its ids are shifted past every id already stored.
        # round_pending: from the end of a round (online: its batch stored, counting its env steps; offline: a
        # gradient step, 1) until its evaluation, GIF and checkpoint are done, and 0 otherwise, so a run stopped in
        # between owes them on resume; round_done: which of those checks it has done (ROUND_EVALUATED, ROUND_GIF).
        self.counters = {"env_steps": 0, "grad_steps": 0, "episodes": 0, "next_traj_id": 0, "train_credit": 0.0,
                         "round_pending": 0, "round_done": 0}
        self.logger = RunLogger(cfg, self.run_dir, enabled=self.is_main)
        self.replay = None
        self.dataset_id: str | None = None  # offline: the dataset's `dataset_id` (datasets from before it: None)
        self.extra_generators: dict[str, torch.Generator] = {}  # e.g. the acting policy's (online)
        self.online_state = None  # online: a callable giving the collector's runtime state for checkpoints
        self.logs_at_checkpoint: tuple[int, int] | None = None  # (rows, step) for rewind_logs
        self.last_save = time.monotonic()  # for loop.checkpoint_every_minutes: the run's start, then each save

    def rank_seed(self, seed: int, stream: str, bits: int = 63) -> int:
        """`seed` in a single process; a per-rank `bits`-bit seed of `stream` under data parallelism."""
        return seed if self.dist is None else dp.rank_seed(seed, self.dist.rank, stream, bits)

    @contextmanager
    def training(self, bar: tqdm, *close: Callable[[], Any]) -> Iterator[None]:
        """Around a loop's training: a checkpoint at exit, then `close` and the progress bar closed, then (data
        parallel) every rank's params checked bitwise equal, as each applied the same updates.

        The exit save is skipped after a NaN stop (`train_steps` already saved the last good state, RNGs rewound)
        and, under data parallelism, after Ctrl-C or an error on this rank: that save is a collective the other
        ranks, stopped elsewhere, would never match, so the process ends instead and torchrun stops the others. A
        single process saves after Ctrl-C and carries on to its final evaluation; after SIGTERM (raised as
        `Terminated` within this block: interrupts.py) it saves and re-raises, for the caller to stop. Data-parallel
        ranks note a SIGTERM and stop together at the next step boundary (`stop_if_terminated`), save together,
        and re-raise.
        """
        save_at_exit = True
        try:
            if self.dist is None:
                with sigterm_raises():
                    yield
            else:
                with sigterm_recorded() as received:  # acted on at step boundaries: stop_if_terminated
                    self.sigterm_received = received
                    yield
        except KeyboardInterrupt as interrupt:
            terminated = isinstance(interrupt, Terminated)
            # Data parallel: a Terminated comes from stop_if_terminated, on every rank at the same step boundary,
            # so the collective exit save is safe; a Ctrl-C lands on each rank wherever it is.
            save_at_exit = self.dist is None or terminated
            what = "terminated (SIGTERM)" if terminated else "interrupted"
            bar.write(f"{what}: saving a checkpoint" if save_at_exit else
                      f"{what}: data-parallel ranks keep their last periodic checkpoint")
            if self.dist is not None or terminated:
                raise
        except Exception as error:
            save_at_exit = self.dist is None and not isinstance(error, NonFiniteLossError)
            raise
        finally:
            # Nothing trained or stored yet (stopped in the first round): a checkpoint would name a replay that
            # holds nothing, and a rerun starting over is the same run.
            if save_at_exit and (self.counters["env_steps"] or self.counters["grad_steps"]):
                self.save()
            for fn in close:
                fn()
            bar.close()
        if self.dist is not None:
            for name, state in self.states.items():
                dp.check_in_sync(state["params"], f"{name} params")

    def stop_if_terminated(self) -> None:
        """Data parallel: raise `Terminated` on every rank if any rank got a SIGTERM (one all-reduce; called at step
        and batch boundaries, which every rank passes in the same order). A single process raises at once instead."""
        if self.dist is None or self.sigterm_received is None:
            return
        flag = torch.tensor([float(self.sigterm_received())], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() > 0:
            raise Terminated("SIGTERM on a data-parallel rank: every rank stops at this step")

    def checkpoint_time_due(self) -> bool:
        """Whether `loop.checkpoint_every_minutes` have passed since the last save (or the run's start); off at 0.
        Data parallel: rank 0's clock decides for every rank (one broadcast, at a boundary every rank passes in the
        same order), since the save is a collective that rank 0 writes."""
        minutes = self.cfg.loop.checkpoint_every_minutes
        if not minutes:
            return False
        due = time.monotonic() - self.last_save >= minutes * 60
        if self.dist is not None:
            flag = torch.tensor([float(due)], device=self.device)
            torch.distributed.broadcast(flag, src=0)
            due = bool(flag.item())
        return due

    def sync_states(self) -> None:
        """Data parallel: every rank takes rank 0's states (after init or resume), then all stay equal."""
        if self.dist is not None:
            self.states = {name: dp.broadcast_tree(state) for name, state in self.states.items()}

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def generators(self) -> dict[str, torch.Generator]:
        return {"train": self.generator, **self.extra_generators}

    def own_part(self) -> dict[str, Any]:
        """What differs between data-parallel ranks: counters (episodes, trajectory ids), the replay position and
        the online collector's state."""
        part: dict[str, Any] = {"counters": dict(self.counters)}
        if self.is_main:  # the logging rank: how far its logs had got (see RunLogger.rewind)
            part["log_rows"] = self.logger.rows
        if self.replay is not None:  # online: length and cursor; both: the sampler's RNG (exact resume)
            part["replay"] = checkpoint.replay_position(self.replay)
            if self.dataset_id is not None:  # offline: which recording (resuming on another one is refused)
                part["replay"]["dataset_id"] = self.dataset_id
            if self.cfg.loop.mode == "online":  # the transitions it counts reach the disk before the checkpoint
                checkpoint.sync_replay_files(self.replay)
        if self.online_state is not None:
            part["online"] = self.online_state()
        return part

    def save(self, states: dict[str, TensorDictBase] | None = None) -> Path:
        part = self.own_part()
        payload = {
            "states": dict(states if states is not None else self.states),
            "config": checkpoint.config_to_dict(self.cfg),
            "tokenizer_cadence": TOKENIZER_CADENCE,
            **part,
        }
        step = self.counters["env_steps"] if self.cfg.loop.mode == "online" else self.counters["grad_steps"]
        if self.dist is None:
            path = checkpoint.save_checkpoint(self.run_dir, step, payload, keep_last=self.cfg.loop.keep_checkpoints,
                                              generators=self.generators())
            self.saved(part)
            return path
        # Collectives, on every rank: each rank's RNGs and own part, gathered on rank 0, which writes.
        rng = dp.gather_rng_states(self.generators())
        parts: list[Any] | None = [None] * self.dist.world_size if self.is_main else None
        torch.distributed.gather_object(part, parts, dst=0)
        path = self.run_dir / checkpoint.checkpoint_name(step)
        if self.is_main:
            path = checkpoint.save_checkpoint(self.run_dir, step, {**payload, "ranks": parts},
                                              keep_last=self.cfg.loop.keep_checkpoints, rng=rng)
        torch.distributed.barrier()  # no rank reads or moves on before the file is there
        self.saved(part)
        return path

    def saved(self, part: dict[str, Any]) -> None:
        """Once a checkpoint is on disk: online, the replay's journal lets go of the writes it counts; and
        `loop.checkpoint_every_minutes` counts from here (from a save's end: a save slower than the interval does not
        make every round save again)."""
        if self.cfg.loop.mode == "online" and part.get("replay", {}).get("written") is not None:
            self.replay.forget_overwrites_before(part["replay"]["written"])
        self.last_save = time.monotonic()

    def try_resume(self, rewind_logs: bool = True) -> dict[str, Any] | None:
        """Restore the newest checkpoint (states, and this rank's counters, RNGs and replay position); returns the
        payload with this rank's own part. The logs go back to what the checkpoint had seen, now or, with
        `rewind_logs=False`, at `rewind_logs()` (a finished run that only reports does not touch them)."""
        found = checkpoint.restore(self.run_dir, self.generators())
        # Ranks that each read run_dir (several nodes, or a damaged newest checkpoint one rank fell back past) could
        # resume different steps: their counters and RNGs would then belong to different points of the run.
        dp.check_ranks_agree(None if found is None else found.step, f"which checkpoint of {self.run_dir} to resume")
        if found is None:
            self.forget_logs()
            return None
        payload = checkpoint.rank_payload(found.payload, self.dist.rank if self.dist is not None else 0)
        cadence = payload.get("tokenizer_cadence", "every-nth-counted-from-0")
        if cadence != TOKENIZER_CADENCE and self.cfg.loop.tokenizer_every > 1:
            warnings.warn(f"checkpoint {found.path} updated the tokenizer on the steps of cadence {cadence!r}, this "
                          f"version on {TOKENIZER_CADENCE!r} (loop.tokenizer_every={self.cfg.loop.tokenizer_every}): "
                          "the resumed run updates its tokenizer on other steps than its first part did, so it will "
                          "not equal an uninterrupted run", stacklevel=2)
        if "log_rows" in payload:  # older checkpoints did not record it: their logs stay as they are
            self.logs_at_checkpoint = (payload["log_rows"], found.step)
        if rewind_logs:
            self.rewind_logs()
        self.states = {name: state.to(self.device) for name, state in payload["states"].items()}
        self.counters.update(payload["counters"])
        if self.replay is not None and "replay" in payload:
            if self.cfg.loop.mode == "offline":
                self.check_same_dataset(payload["replay"])
            checkpoint.restore_replay_position(self.replay, payload["replay"])
            if self.cfg.loop.mode == "online":
                # A process killed after this checkpoint may have written past it: what it overwrote on a wrapped
                # ring comes back from the journal; what remains of its writes would stay sampled under the episode
                # ids this run hands out again, so it is retired.
                self.replay.undo_unrecorded_overwrites()
                self.replay.retire_unrecorded_writes(payload["counters"]["next_traj_id"])
        return payload

    def rewind_logs(self) -> None:
        """The logs back to the resumed checkpoint's (`try_resume`), before anything new is logged."""
        if self.logs_at_checkpoint is not None:
            self.logger.rewind(*self.logs_at_checkpoint)
            self.logs_at_checkpoint = None

    def check_same_dataset(self, position: dict[str, Any]) -> None:
        """An offline run resumes on the recording its checkpoint names (`dataset_id`), and a dataset is never
        written to: another id, or another length (datasets from before ids), means it was recorded again."""
        saved_id = position.get("dataset_id")
        if saved_id is not None and saved_id != self.dataset_id:
            raise ValueError(f"dataset {self.cfg.loop.offline_data} is not the recording the run trained on "
                             f"(dataset_id {self.dataset_id}, the checkpoint's {saved_id}): it was recorded again "
                             "or replaced. Restore it, or start a fresh run_dir")
        if position["len"] != len(self.replay):
            raise ValueError(f"dataset {self.cfg.loop.offline_data} holds {len(self.replay)} stored entries, but "
                             f"the run's checkpoint recorded {position['len']}: it changed since the run started. "
                             "Restore it, or start a fresh run_dir")

    def forget_logs(self) -> None:
        """A run that starts over (no checkpoint to resume) drops the log lines of the attempt it replaces."""
        if self.logger.rows:
            warnings.warn(f"{self.run_dir} holds no checkpoint: the run starts over and drops the "
                          f"{self.logger.rows} lines its metrics.jsonl held", stacklevel=3)
            self.logger.rewind(0, -1)

    # ---- training ----------------------------------------------------------------------------------------------
    def train_steps(self, n: int, agent_active: bool, from_credit: bool = False,
                    opens_round: bool = False) -> dict[str, float]:
        """`n` gradient steps. `from_credit`: they were paid from `counters["train_credit"]` (online); whatever
        stops them early (a NaN, Ctrl-C, an error) puts the unfinished ones back before any checkpoint is saved, so
        a resume from that checkpoint still runs them. `opens_round` (offline, one step per round): each step's
        commit also marks its round's checks (evaluation, GIF) as owed, so an interrupt that fires as the commit
        ends still leaves them owed to the resumed run."""
        metrics: dict[str, float] = {}
        finished = 0
        returned = False
        before: dict[str, TensorDictBase] = self.states
        rng_before: dict[str, Tensor] = {}
        replay_before: dict[str, Any] | None = None

        def return_unfinished() -> None:
            nonlocal returned
            if from_credit and not returned:
                self.counters["train_credit"] += n - finished
                returned = True

        def rewind() -> None:
            """Back to just before the unfinished step: states, RNGs and the replay sampler (offline, a resume then
            draws the same batch and noise again)."""
            self.states = before
            for name, gen in self.generators().items():
                gen.set_state(rng_before[name])
            checkpoint.restore_replay_position(self.replay, replay_before)

        try:
            for _ in range(n):
                before = self.states
                rng_before = {name: gen.get_state() for name, gen in self.generators().items()}
                replay_before = checkpoint.replay_position(self.replay)  # its sampler's RNG, before this batch
                batch = {k: v.to(self.device, non_blocking=True)
                         for k, v in replay_batch(self.replay.sample(), self.cfg.replay.final_frame).items()}
                try:
                    states, metrics = self.step_fn(self.cfg, self.models, self.states, batch, self.generator,
                                                   self.counters["grad_steps"], agent_active, self.lpips_fn,
                                                   self.grad_fn)
                except NonFiniteLossError as error:
                    rewind()
                    replay_before = None  # rewound already
                    return_unfinished()
                    path = self.save(before)
                    raise NonFiniteLossError(
                        f"{error} (loop gradient step {self.counters['grad_steps']}); the last good state, with the "
                        f"RNG and replay-sampler states from before this step, is saved in {path}"
                    ) from error
                # The step's states, its count, its commit and its log line land together: an interrupt between
                # them would rewind the states but keep the count, or keep the step but lose its line (interrupts.py).
                with interrupts_deferred():
                    self.states = states
                    self.counters["grad_steps"] += 1
                    if opens_round:
                        self.counters["round_pending"], self.counters["round_done"] = 1, 0
                    finished += 1
                    replay_before = None  # this step is complete: nothing to rewind
                    if self.counters["grad_steps"] % self.cfg.loop.log_every == 0:
                        self.logger.log(metrics, self.counters["env_steps"] or self.counters["grad_steps"])
                self.stop_if_terminated()
        except BaseException:
            # Ctrl-C or an error inside a step: `training`'s exit save then holds the state from before it, with
            # the RNGs and the sampler that drew its batch, so a resume runs that step as it would have run.
            if replay_before is not None:
                rewind()
            return_unfinished()
            raise
        return metrics

    def evaluate(self, env: EnvBase, step: int) -> dict[str, Any]:
        """Episodes of the acting policy (greedy unless `loop.eval_greedy=false`); with `loop.eval_bc`, also of
        the behaviour-cloning head trained on the same data (`eval/bc_*`: the "BC alone" baseline, side by side in
        one run). Before imagination starts the acting policy is the BC head, so one set of episodes serves both."""
        def episodes(states: dict[str, TensorDictBase]) -> dict[str, Any]:
            # Every evaluation replays the same starting states (the eval env is reseeded): evaluations are
            # comparable across training and between the policies, and a resumed run evaluates as an uninterrupted
            # one.
            env.set_seed(eval_env_seed(self.cfg.seed))
            policy = make_eval_policy(self.cfg, self.models, states, env.action_spec)
            return run_episodes(env, policy, self.cfg.env.eval_episodes, self.cfg.env.eval_max_steps)

        result = episodes(self.states)
        scalars = {"eval/mean_return": result["mean_return"]}
        if "crafter_score" in result:
            scalars["eval/crafter_score"] = result["crafter_score"]
        if self.cfg.loop.eval_bc:
            bc_result = result
            if "agent" in self.states:
                bc_result = episodes({name: state for name, state in self.states.items() if name != "agent"})
            result = {**result, "bc": bc_result}
            scalars["eval/bc_mean_return"] = bc_result["mean_return"]
            if "crafter_score" in bc_result:
                scalars["eval/bc_crafter_score"] = bc_result["crafter_score"]
        self.logger.log(scalars, step)
        return result

    def gif(self, step: int) -> Path:
        # The GIF's rows leave the replay sampler's RNG where it was, so GIFs never change the training batches
        # (loop.gif_every may change on resume without breaking exact resume).
        position = checkpoint.replay_position(self.replay)
        sample = self.replay.sample()
        checkpoint.restore_replay_position(self.replay, position)
        return write_gif(self.cfg, self.models, self.states, sample, self.run_dir / "gifs" /
                         f"real_vs_imagined_{step:08d}.gif")

    def summary(self, started: float, extra: dict[str, Any]) -> dict[str, Any]:
        out = {
            **self.counters,
            "wall_seconds": time.perf_counter() - started,
            "params": {name: count_params(state["params"]) for name, state in self.states.items()},
            **extra,
        }
        if self.is_main:
            replace_text(self.run_dir / "summary.json", json.dumps(out, indent=2, default=float))  # read back on rerun
        return out


def train_online(cfg: RunConfig, progress: bool = True, dist_info: dp.DistInfo | None = None) -> dict[str, Any]:
    from torchrl.collectors import Collector

    from d4func.data.replay import save_replay
    from d4func.envs.registry import make_env

    check_first_batch(cfg)
    trainer = Trainer(cfg, dist_info)
    started = time.perf_counter()
    # Data parallel: every rank collects from its own env into its own replay; rank 0 alone evaluates.
    env_seed = trainer.rank_seed(cfg.seed, "env", bits=ENV_SEED_BITS)
    env = make_env(cfg.env.name, seed=env_seed, image_size=cfg.env.image_size, action_repeat=cfg.env.action_repeat,
                   max_episode_steps=cfg.env.max_episode_steps)
    eval_env = None
    # `env.eval_episodes=0` turns evaluation off, as offline: no env built for it, no eval rows logged (episodes
    # of nothing would log a return of 0).
    if trainer.is_main and cfg.env.eval_episodes:
        eval_env = make_env(cfg.env.name, seed=eval_env_seed(cfg.seed), image_size=cfg.env.image_size,
                            action_repeat=cfg.env.action_repeat, max_episode_steps=cfg.env.max_episode_steps)
    check_env_fits(cfg, env, cfg.env.name)
    rank = 0 if dist_info is None else dist_info.rank
    replay_dir = checkpoint.run_replay_dir(trainer.run_dir, rank)
    newest = checkpoint.latest_checkpoint(trainer.run_dir)
    if newest is not None and not (replay_dir / "storage").exists():
        # Starting over here would leave the old run's later checkpoints beside the new run's, and the next start
        # would resume one of them on the new replay.
        raise ValueError(f"{trainer.run_dir} holds checkpoints (newest {newest.name}) but no replay storage in "
                         f"{replay_dir}: an online run resumes from both. Put the replay back, or start in a fresh "
                         "run_dir")
    resuming = newest is not None
    # Each rank looks at its own replay (and, on several nodes, possibly its own view of run_dir).
    dp.check_ranks_agree(resuming, f"whether {trainer.run_dir} holds a run to resume (a checkpoint and this rank's "
                                   "replay storage)")
    if not resuming and replay_dir.exists():
        # A run stopped before its first checkpoint: no checkpoint records a position in this replay, and its
        # episode ids would clash with the new run's. The run starts over, so does its replay.
        warnings.warn(f"{trainer.run_dir} holds no checkpoint: the run starts over and its replay {replay_dir}, "
                      "written before any checkpoint, is removed", stacklevel=2)
        shutil.rmtree(replay_dir)
    trainer.replay = checkpoint.reopen_run_replay(replay_dir, cfg.replay.capacity, cfg.replay.seq_len,
                                                  cfg.replay.batch_size, seed=trainer.rank_seed(cfg.seed + 4, "replay"))
    if trainer.replay.entries_written is not None:  # replays from before entries were numbered: retired instead
        trainer.replay.keep_overwritten_entries()  # exact resume after a kill on a wrapped ring (overwrite_journal)
    policy = WorldModelPolicy(trainer.models.tokenizer, trainer.models.dynamics, trainer.models.heads,
                              env.action_spec, context=cfg.replay.row_frames,
                              seed=trainer.rank_seed(cfg.seed + 5, "acting"))
    trainer.extra_generators["acting"] = policy.generator
    if resuming:
        payload = trainer.try_resume(rewind_logs=False)  # rewound below, unless the run is finished
    else:
        payload = None
        trainer.forget_logs()
    trainer.sync_states()
    progress = progress and trainer.is_main
    counters = trainer.counters
    policy.random_until = max(0, cfg.loop.prefill_steps - counters["env_steps"])
    policy.update_params(*acting_params(trainer.states))
    remaining = cfg.loop.env_steps - counters["env_steps"]
    # A checkpoint saved mid-round (Ctrl-C, a NaN stop) owes the rest of that round: its unfinished gradient steps,
    # then the evaluation, GIF and checkpoint due at this step, as an uninterrupted run takes them before collecting
    # on. The resumed run does the same, so it continues exactly, also when that round was the run's last.
    if payload is None or "round_pending" in payload["counters"]:
        owed = resuming and bool(counters["round_pending"])
    else:  # a checkpoint from before the counter: only a round's unpaid gradient steps tell that it was cut short
        owed = resuming and counters["env_steps"] >= cfg.loop.prefill_steps and counters["train_credit"] >= 1
        counters["round_pending"] = (counters["env_steps"] % cfg.loop.collect_steps or cfg.loop.collect_steps
                                     if owed else 0)
    if remaining <= 0 and not owed:
        # Finished: its logs and summary (with the final evaluation, logged after the last checkpoint) stand. A
        # fresh run of loop.env_steps=0 has nothing to stand on: it collects, trains and evaluates nothing.
        for opened in (env, eval_env):
            if opened is not None:
                opened.close()
        trainer.logger.close()
        if not resuming:
            return trainer.summary(started, {"eval": {}, "note": "loop.env_steps=0: nothing collected or trained"})
        return trainer.summary(started, {**previous_summary(trainer.run_dir, ("eval", "returns_plot")),
                                         "note": "already trained to loop.env_steps"})
    trainer.rewind_logs()
    exact = supports_resume_state(env)
    continues_episode = exact and payload is not None and "env" in payload.get("online", {})
    if payload is not None and counters["env_steps"] and not continues_episode:
        # A resume that cannot continue the interrupted episode starts new ones: seeded as at the start, the env
        # would replay the run's first worlds (Crafter) or initial states (DMC) after every resume.
        env.set_seed(resume_env_seed(env_seed, counters["env_steps"]))
    collector = None  # none when the run only owes its last round's gradient steps: nothing is left to collect
    if remaining > 0:
        rng_before = (torch.random.get_rng_state(), policy.generator.get_state())
        collector = Collector(env, policy, frames_per_batch=cfg.loop.collect_steps, total_frames=remaining)
        # The collector calls the policy once while it builds its buffers (torchrl 0.14). Undo that dry run, so
        # the prefill counts real steps only and the RNGs stand where the checkpoint left them (exact resume).
        torch.random.set_rng_state(rng_before[0])
        policy.generator.set_state(rng_before[1])
        policy.steps_taken = 0
        policy.reset_context()
    bar = tqdm(total=cfg.loop.env_steps, initial=counters["env_steps"], desc="env steps", disable=not progress)
    episode = {"return": 0.0, "last_return": float("nan"), "achievements": [], "id_offset": counters["next_traj_id"]}
    saved_replay = resuming
    if payload is not None and "online" in payload:
        if continues_episode and collector is not None:
            restore_collector_state(collector, payload["online"])  # continue the interrupted episode, not a new one
            policy.load_window(payload["online"].get("acting_window"))  # and act on its recent frames, as before
            episode.update({k: payload["online"]["episode"][k] for k in ("return", "last_return", "id_offset")})
        episode["achievements"] = list(payload["online"]["episode"]["achievements"])
    # Whether the env, the replay and the counters agree: not while the collector is stepping the env for a batch
    # the replay has not received. A checkpoint taken then (the exit save after a second Ctrl-C: the first waits
    # for the batch) keeps no collector state, and the resumed run starts a new episode instead of stitching a gap
    # into this one.
    at_batch_boundary = True

    def online_state() -> dict[str, Any]:
        finished = {"achievements": list(episode["achievements"])}
        if collector is None:  # the env has not moved since the checkpoint this run resumed: keep its state
            saved = payload["online"] if payload is not None and "online" in payload else {}
            return {**saved, "episode": {**saved.get("episode", {}), **finished}}
        if exact and at_batch_boundary:
            return {**collector_state(collector), "acting_window": policy.window_state(),
                    "episode": {**episode, **finished}}
        # The interrupted episode is lost (the env cannot save it, or it is mid-batch), but not the finished ones'
        # achievements: `episode/crafter_score` stays a score over every training episode across a resume.
        return {"episode": finished}

    trainer.online_state = online_state

    def first_due(every: int, done: int = 0) -> int:
        """The next env step at which something done every `every` steps is due: the owed round's own step when
        the round crossed a multiple of `every` (as the uninterrupted run found it due there) and had not done it
        (`done`, a `round_done` flag) before it was stopped."""
        round_start = counters["env_steps"] - (counters["round_pending"] if owed else 0)
        due_now = (owed and not counters["round_done"] & done
                   and counters["env_steps"] // every > round_start // every)
        return next_multiple(counters["env_steps"], every) - (every if due_now else 0)

    next_eval, next_ckpt, next_gif = (first_due(cfg.loop.eval_every, ROUND_EVALUATED),
                                      first_due(cfg.loop.checkpoint_every), first_due(cfg.loop.gif_every, ROUND_GIF))
    eval_result: dict[str, Any] = {}
    last_eval_step = last_gif_step = -1
    tick = time.perf_counter()

    def train_and_check(n: int) -> None:
        """The end of a round, once `n` env steps are stored and credited: the gradient steps they pay for, then
        whatever evaluation, GIF and checkpoint is due."""
        nonlocal tick, next_eval, next_gif, next_ckpt, eval_result, last_eval_step, last_gif_step
        if counters["env_steps"] >= cfg.loop.prefill_steps:
            steps = int(counters["train_credit"])
            counters["train_credit"] -= steps
            trainer.train_steps(steps, counters["env_steps"] >= cfg.loop.agent_start, from_credit=True)
            policy.update_params(*acting_params(trainer.states))
        now = time.perf_counter()
        bar.update(n)
        bar.set_postfix({"return": f"{episode['last_return']:.1f}", "steps/s": f"{n / max(now - tick, 1e-9):.1f}",
                         "grad": counters["grad_steps"]})
        tick = now
        # Each is due from the first multiple of its interval on (held back until the first gradient step), then
        # from the multiple after the step it ran at: the rule first_due applies on resume.
        if counters["env_steps"] >= next_eval and counters["grad_steps"]:
            if eval_env is not None:
                eval_result = trainer.evaluate(eval_env, counters["env_steps"])
            last_eval_step = counters["env_steps"]
            next_eval = next_multiple(counters["env_steps"], cfg.loop.eval_every)
            counters["round_done"] |= ROUND_EVALUATED
        if counters["env_steps"] >= next_gif and counters["grad_steps"]:
            if trainer.is_main:
                trainer.gif(counters["env_steps"])
            last_gif_step = counters["env_steps"]
            next_gif = next_multiple(counters["env_steps"], cfg.loop.gif_every)
            counters["round_done"] |= ROUND_GIF
        counters["round_pending"] = 0  # before the checkpoint: a run resumed from it owes nothing of this round
        if counters["env_steps"] >= next_ckpt:
            trainer.save()
            next_ckpt = next_multiple(counters["env_steps"], cfg.loop.checkpoint_every)
        elif trainer.checkpoint_time_due():  # between the step-based ones, which keep their schedule
            trainer.save()

    def stop_notice() -> None:
        bar.write(f"stopping once the batch being collected is stored (at most loop.collect_steps="
                  f"{cfg.loop.collect_steps} env steps), so that the run resumes exactly; Ctrl-C again stops now "
                  "and the resumed run starts a new episode")

    # The collector closes the env when it shuts down; without one, close it here.
    with trainer.training(bar, env.close if collector is None else collector.shutdown):
        if owed:
            train_and_check(0)  # no new env steps: only the owed credit
        stream = iter(collector) if collector is not None else None
        while stream is not None:
            # Ctrl-C and SIGTERM are held while the collector steps the env and until the batch is stored and
            # counted, so that a stop lands where the env, the replay and the counters agree and the resumed run
            # continues the episode exactly; a second one stops at once (interrupts.py).
            with interrupts_deferred(repeat_stops_now=True, notice=stop_notice):
                at_batch_boundary = False  # the collector steps the env from here until the batch is stored
                try:
                    batch = next(stream)
                except StopIteration:
                    at_batch_boundary = True
                    break
                # Stored and counted as one: even a second Ctrl-C lands before or after, never between.
                with interrupts_deferred():
                    batch = batch.reshape(-1)
                    ids = batch.get(("collector", "traj_ids")) + episode["id_offset"]
                    batch.set(("collector", "traj_ids"), ids)
                    counters["next_traj_id"] = max(counters["next_traj_id"], int(ids.max()) + 1)
                    trainer.replay.extend(batch)
                    if not saved_replay:
                        # Records the storage layout once; positions go into checkpoints (open_run_replay reads them).
                        save_replay(trainer.replay, position_kept_in=f"the checkpoints of {trainer.run_dir}")
                        saved_replay = True
                    n = batch.numel()
                    counters["env_steps"] += n
                    counters["round_pending"], counters["round_done"] = n, 0
                    if counters["env_steps"] >= cfg.loop.prefill_steps:
                        # Paid by train_and_check, or on resume. Rounded so that a credit meant to be whole is whole:
                        # summed in floats, ten rounds of 0.1 make 0.999..., which would pay its step a round late.
                        counters["train_credit"] = round(counters["train_credit"] + n * cfg.loop.train_ratio, 9)
                    at_batch_boundary = True
                    rewards = batch.get(("next", "reward")).reshape(-1)
                    dones = batch.get(("next", "done")).reshape(-1)
                    achievements = batch.get(("next", "achievements"), None)  # Crafter: unlocked so far this episode
                    for i, (r, d) in enumerate(zip(rewards.tolist(), dones.tolist(), strict=True)):
                        episode["return"] += r
                        if d:
                            counters["episodes"] += 1
                            episode["last_return"] = episode["return"]
                            scalars = {"episode/return": episode["return"]}
                            if achievements is not None:
                                unlocked = achievements.reshape(rewards.numel(), -1)[i]
                                episode["achievements"].append(unlocked)
                                scalars["episode/achievements"] = float(unlocked.sum())
                                scalars["episode/crafter_score"] = crafter_score_of(episode["achievements"])
                            trainer.logger.log(scalars, counters["env_steps"])
                            episode["return"] = 0.0
            trainer.stop_if_terminated()  # the batch is stored and counted: a stop here owes only its training
            train_and_check(n)
    if eval_env is not None and counters["grad_steps"] and last_eval_step != counters["env_steps"]:
        eval_result = trainer.evaluate(eval_env, counters["env_steps"])
    if trainer.is_main and counters["grad_steps"] and last_gif_step != counters["env_steps"]:
        trainer.gif(counters["env_steps"])
    if eval_env is not None:  # a DMControl env holds a rendering context; a sweep of runs in one process adds up
        eval_env.close()
    trainer.logger.close()
    plot = plot_returns(trainer.run_dir) if trainer.is_main else None
    return trainer.summary(started, {"eval": eval_result, "returns_plot": str(plot) if plot else None})


ROUND_EVALUATED, ROUND_GIF = 1, 2  # counters["round_done"] flags


def next_multiple(step: int, every: int) -> int:
    """The first multiple of `every` after `step`."""
    return (step // every + 1) * every


def previous_summary(run_dir: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """`keys` of the run's summary.json, where it has them."""
    path = run_dir / "summary.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    return {key: saved[key] for key in keys if key in saved}


def collector_state(collector: Collector) -> dict[str, Any]:
    """What a single-env TorchRL `Collector` carries between batches: the current step (observation, flags, the
    running trajectory id), the next trajectory id, and the env's runtime state. Reads the collector's private
    `_carrier` and `_traj_pool` (torchrl 0.14; `tests/test_loop.py` checks exact resume through them)."""
    return {
        "carrier": collector._carrier.clone(),
        "traj_pool": collector._traj_pool.state_dict(),
        "env": get_env_state(collector.env),
    }


def restore_collector_state(collector: Collector, state: dict[str, Any]) -> None:
    set_env_state(collector.env, state["env"])
    collector._traj_pool.load_state_dict(state["traj_pool"])
    collector._carrier.update(state["carrier"])


def train_offline(cfg: RunConfig, progress: bool = True, dist_info: dp.DistInfo | None = None) -> dict[str, Any]:
    from d4func.data.offline import load_offline, read_metadata

    trainer = Trainer(cfg, dist_info)
    started = time.perf_counter()
    metadata = read_metadata(cfg.loop.offline_data)
    check_dataset_fits(cfg, metadata, str(cfg.loop.offline_data))
    trainer.replay = load_offline(cfg.loop.offline_data, cfg.replay.seq_len, cfg.replay.batch_size,
                                  seed=trainer.rank_seed(cfg.seed + 4, "replay"))
    trainer.dataset_id = metadata.get("dataset_id")
    # Without a shared run_dir one rank could resume while another starts over: stop instead of hanging.
    dp.check_ranks_agree(checkpoint.latest_checkpoint(trainer.run_dir) is not None,
                         f"whether {trainer.run_dir} holds a checkpoint to resume")
    payload = trainer.try_resume(rewind_logs=False)  # rewound below, unless the run is finished
    trainer.sync_states()
    counters = trainer.counters
    if payload is not None and counters["grad_steps"] >= cfg.loop.offline_steps and not counters["round_pending"]:
        # Finished: its logs, last GIF and checkpoint and its summary (with the final evaluation, taken after the
        # last checkpoint) stand; a rerun only reports them, as online.
        trainer.logger.close()
        return trainer.summary(started, {**previous_summary(trainer.run_dir, ("eval", "dataset")),
                                         "note": "already trained to loop.offline_steps"})
    trainer.rewind_logs()
    progress = progress and trainer.is_main
    eval_env = None
    env_name = (metadata.get("env_config") or {}).get("name")
    if env_name and cfg.env.eval_episodes and trainer.is_main:
        from d4func.envs.registry import make_env

        eval_env = make_env(env_name, seed=eval_env_seed(cfg.seed), image_size=cfg.env.image_size,
                            action_repeat=cfg.env.action_repeat, max_episode_steps=cfg.env.max_episode_steps)
        check_env_fits(cfg, eval_env, f"{env_name} (the env of dataset {cfg.loop.offline_data})")
    bar = tqdm(total=cfg.loop.offline_steps, initial=counters["grad_steps"], desc="gradient steps",
               disable=not progress)
    eval_result: dict[str, Any] = {}
    last_eval_step = last_gif_step = -1

    def checks(step: int) -> None:
        """What gradient step `step` makes due, each once (`round_done` survives a Ctrl-C in between)."""
        nonlocal eval_result, last_eval_step, last_gif_step
        if eval_env is not None and step % cfg.loop.eval_every == 0 and not counters["round_done"] & ROUND_EVALUATED:
            eval_result = trainer.evaluate(eval_env, step)
            last_eval_step = step
            bar.set_postfix({"eval_return": f"{eval_result['mean_return']:.1f}"})
            counters["round_done"] |= ROUND_EVALUATED
        if step % cfg.loop.gif_every == 0 and trainer.is_main and not counters["round_done"] & ROUND_GIF:
            trainer.gif(step)
            last_gif_step = step
            counters["round_done"] |= ROUND_GIF
        counters["round_pending"] = counters["round_done"] = 0  # before the checkpoint: nothing more is owed
        if step % cfg.loop.checkpoint_every == 0 or trainer.checkpoint_time_due():
            trainer.save()

    with trainer.training(bar):
        if counters["round_pending"]:  # stopped during the checks of its last step: they come first
            checks(counters["grad_steps"])
        while counters["grad_steps"] < cfg.loop.offline_steps:
            trainer.train_steps(1, counters["grad_steps"] >= cfg.loop.agent_start, opens_round=True)
            bar.update(1)
            checks(counters["grad_steps"])
    # As online, nothing is evaluated or drawn before the first gradient step (loop.offline_steps=0 would score
    # the untrained initial policy and log it as the run's evaluation).
    if eval_env is not None and counters["grad_steps"] and last_eval_step != counters["grad_steps"]:
        eval_result = trainer.evaluate(eval_env, counters["grad_steps"])
    if counters["grad_steps"] and last_gif_step != counters["grad_steps"] and trainer.is_main:
        trainer.gif(counters["grad_steps"])
    if eval_env is not None:
        eval_env.close()
    trainer.logger.close()
    return trainer.summary(started, {"eval": eval_result, "dataset": str(cfg.loop.offline_data)})


DIST_TIMEOUT_S = 4 * 3600.0


def launched_by_torchrun() -> bool:
    """True in a process that torchrun started as one of several ranks (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def train(cfg: RunConfig, progress: bool = True) -> dict[str, Any]:
    """Run the loop the config asks for; resumes from `run_dir`'s newest checkpoint when there is one.

    Under `torchrun --nproc_per_node=N` the N processes train data-parallel: gloo on CPU, NCCL with one GPU per
    process when `device` is "cuda". Each rank samples its own `replay.batch_size` rows, so the effective batch is
    N times larger. Online, each rank also collects from its own env (seeded per rank) into its own replay, so
    `loop.env_steps` counts per rank and the run takes N times the env steps."""
    run = train_offline if cfg.loop.mode == "offline" else train_online
    if not launched_by_torchrun():
        with hold_run_dir(cfg.run_dir):  # one process per run_dir (run_lock.py)
            return run(cfg, progress)
    # Rank 0 evaluates and writes GIFs while the others wait in their next all-reduce: allow for long evaluations.
    info = dp.init_distributed(device=resolve_device(cfg.device).type, timeout_s=DIST_TIMEOUT_S)
    try:
        # The job's global rank 0 holds the run_dir for all its ranks; an error here ends rank 0, and torchrun the rest.
        with hold_run_dir(cfg.run_dir) if info.is_main else nullcontext():
            return run(cfg, progress, info)
    finally:
        dp.shutdown_distributed()
