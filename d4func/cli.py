"""The `d4func` command line.

    d4func train --config experiments/configs/dmc_cartpole.yaml [key.sub=value ...]
    d4func eval --checkpoint runs/dmc_cartpole [--episodes 5]
    d4func status runs/dmc_cartpole
    d4func collect --env dmc:cartpole-swingup --out data/cartpole --steps 5000 --action-repeat 4 [--seed 0]
    d4func import --episodes recorded/ --out data/robot [--pixels front,wrist] [--rewards-on arrival]
    d4func merge data/cartpole_a data/cartpole_b --out data/cartpole_ab

Exit codes: 0 done; 2 a config or input error (bad key or value, missing or existing file, a dataset or env that
does not fit the models), printed as one line; 3 training stopped on a NaN / inf, with the last good state saved
(one line naming the phase, loss term and step); 4 an I/O error (disk full, a read-only or lost mount), in one
line naming the errno and file; 143 (128 + SIGTERM) training terminated by SIGTERM, a
scheduler's preemption, with its state saved for the same command to resume. Set D4FUNC_TRACEBACK=1 to get the
full traceback instead of the line (exit code 1 then).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from omegaconf.errors import OmegaConfBaseException

from d4func.train.interrupts import Terminated
from d4func.train.state import NonFiniteLossError

EXIT_INPUT_ERROR = 2
EXIT_NON_FINITE = 3
EXIT_IO_ERROR = 4  # the disk or filesystem failed (full, read-only, gone): the newest checkpoint is the state kept
EXIT_TERMINATED = 128 + 15  # the shell's code for a process ended by SIGTERM, which this one handled


def _train(args: argparse.Namespace) -> int:
    from d4func.train.loop import train
    from d4func.train.run_config import load_run_config

    cfg = load_run_config(args.config, args.overrides)
    summary = train(cfg, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary (rank 0's) rather than one per rank
        print(json.dumps(summary, indent=2, default=str))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from d4func.envs.registry import make_env
    from d4func.train import checkpoint
    from d4func.train.compat import check_env_fits
    from d4func.train.evaluation import eval_env_seed, make_eval_policy, run_env_name, run_episodes
    from d4func.train.phases import build_models
    from d4func.train.run_config import saved_run_config

    if args.episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {args.episodes}")
    if args.threads is not None and args.threads < 0:
        raise ValueError(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    path = Path(args.checkpoint)
    # A run directory: its newest checkpoint that loads (a damaged one is skipped with a warning, as a resume would).
    loaded = checkpoint.load_checkpoint(path) if path.is_file() else checkpoint.newest_readable_checkpoint(path)
    if loaded is None:
        raise FileNotFoundError(f"no checkpoint (ckpt-*.pt) in {str(path)!r}")
    ckpt_path = loaded.path
    cfg = saved_run_config(loaded.payload["config"])
    # As the run's own evaluations: its env (an offline run's dataset's), starting states (its evaluation seed),
    # episode length and cap, greedy or not.
    env_name = args.env or run_env_name(cfg)
    env = make_env(env_name, seed=eval_env_seed(cfg.seed) if args.seed is None else args.seed,
                   image_size=cfg.env.image_size, action_repeat=cfg.env.action_repeat,
                   max_episode_steps=cfg.env.max_episode_steps)
    check_env_fits(cfg, env, env_name)
    # As many threads as the run trained with (loop.threads): two evaluations side by side at torch's default
    # each take every core and run several times slower than with one thread each.
    threads = cfg.loop.threads if args.threads is None else args.threads
    if threads:
        torch.set_num_threads(threads)
    models = build_models(cfg)
    states = {name: state for name, state in loaded.payload["states"].items() if not (args.bc and name == "agent")}
    policy = make_eval_policy(cfg, models, states, env.action_spec)
    result = run_episodes(env, policy, args.episodes, cfg.env.eval_max_steps)
    print(json.dumps({"checkpoint": str(ckpt_path), "step": loaded.step, "policy": "bc" if args.bc else "acting",
                      **result}, indent=2))
    return 0


def _status(args: argparse.Namespace) -> int:
    from d4func.train.run_status import run_status

    print(json.dumps(run_status(args.run_dir), indent=2))
    return 0


def _collect(args: argparse.Namespace) -> int:
    from d4func.data.offline import collect

    metadata = collect(args.env, args.out, args.steps, seed=args.seed, image_size=args.image_size,
                       action_repeat=args.action_repeat)
    print(json.dumps(metadata, indent=2, default=str))
    return 0


def _import(args: argparse.Namespace) -> int:
    from d4func.data.import_episodes import import_npz_episodes

    source = Path(args.episodes)
    if not source.exists():
        raise FileNotFoundError(f"{str(source)!r} does not exist")
    files = sorted(source.glob("*.npz")) if source.is_dir() else [source]
    if not files:
        raise FileNotFoundError(f"no .npz files in {str(source)!r}")
    keys = {"pixels": args.pixels.split(",") if "," in args.pixels else args.pixels, "action": args.action,
            "reward": args.reward, "is_first": args.is_first}
    if args.terminated is not None:  # named: every file must hold it (a misspelling would mean "never terminal")
        keys["terminated"] = args.terminated
    env_config = None
    if args.env:
        from d4func.envs.registry import env_config as make_env_config

        env_config = make_env_config(args.env, seed=0, image_size=args.image_size, action_repeat=args.action_repeat)
    metadata = import_npz_episodes(files, args.out, keys=keys, join_chunks=args.join_chunks,
                                   channels_last=not args.channels_first,
                                   rewards_on=args.rewards_on, env_config=env_config, source=args.source)
    print(json.dumps(metadata, indent=2, default=str))
    return 0


def _merge(args: argparse.Namespace) -> int:
    from d4func.data.merge_datasets import merge_datasets

    metadata = merge_datasets(args.datasets, args.out)
    print(json.dumps(metadata, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="d4func", description="Dreamer 4 in functional PyTorch",
        epilog=f"exit codes: 0 done, {EXIT_INPUT_ERROR} config or input error, {EXIT_NON_FINITE} training stopped "
        f"on NaN/inf (last good state saved), {EXIT_IO_ERROR} I/O error (disk full, lost mount), {EXIT_TERMINATED} "
        "terminated by SIGTERM (state saved); "
        "D4FUNC_TRACEBACK=1 shows tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="online or offline training from a YAML config")
    train.add_argument("--config", required=True, help="YAML file, e.g. experiments/configs/debug.yaml")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. loop.env_steps=1000")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("eval", help="evaluation episodes of a checkpoint, as the run evaluates (greedy "
                                   "unless it set loop.eval_greedy=false; its env, episode length and step cap)")
    evaluate.add_argument("--checkpoint", required=True, help="a run directory or a ckpt-*.pt file")
    evaluate.add_argument("--episodes", type=int, default=5)
    evaluate.add_argument("--seed", type=int, default=None, help="the eval env's seed (default: the run's own "
                          "evaluation seed, so the episodes start as its logged evaluations did)")
    evaluate.add_argument("--env", default=None, help="override the run's env name")
    evaluate.add_argument("--bc", action="store_true", help="the behaviour-cloning policy head alone, as the run's "
                          "loop.eval_bc evaluations (without it: the imagination-trained policy, once there is one)")
    evaluate.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: the run's "
                          "loop.threads; 0: torch's default)")
    evaluate.set_defaults(run=_eval)

    status = commands.add_parser("status", help="where a run stands: progress against its target, finished or "
                                 "not, the process training in it, its newest checkpoint's age, its last evaluation "
                                 "(JSON; reads the run_dir without disturbing a run in it)")
    status.add_argument("run_dir", help="a run directory (the config's run_dir)")
    status.set_defaults(run=_status)

    collect = commands.add_parser("collect", help="record random-policy episodes as an offline dataset")
    collect.add_argument("--env", required=True, help="dmc:DOMAIN-TASK, dmc:DOMAIN-TASK@0,1, crafter or reach")
    collect.add_argument("--out", required=True, help="dataset directory")
    collect.add_argument("--steps", type=int, required=True)
    collect.add_argument("--seed", type=int, default=0)
    collect.add_argument("--image-size", type=int, default=64)
    collect.add_argument("--action-repeat", type=int, default=2)
    collect.set_defaults(run=_collect)

    imports = commands.add_parser(
        "import", help="write recorded episodes (one .npz per episode) as an offline dataset",
        description="Each .npz file holds one episode: frames [T + 1, H, W, C] uint8 (or float in [0, 1]; the "
        "frame after the last action included, so the last reward is learned; [T, ...] imports too and then needs "
        "replay.final_frame=false), actions [T, A] in [-1, 1] or [T] integer indices, rewards [T], optionally a "
        "terminated flag. See "
        "d4func.data.import_episodes for the layouts. DreamerV3's replay: --pixels image --terminated is_terminal "
        "--rewards-on arrival --join-chunks.")
    imports.add_argument("--episodes", required=True, help="a directory of .npz files (sorted by name) or one file")
    imports.add_argument("--out", required=True, help="dataset directory (must not exist yet)")
    imports.add_argument("--pixels", default="pixels", help="frames array; several cameras as a,b")
    imports.add_argument("--action", default="action", help="actions array")
    imports.add_argument("--reward", default="reward", help="rewards array")
    imports.add_argument("--terminated", default=None, help="terminal flag(s); when not given, an array "
                         "'terminated' is read where present (False elsewhere)")
    imports.add_argument("--is-first", default="is_first", help="episode-start flags, where present: a file is "
                         "split into episodes at them; not joined across files unless --join-chunks")
    imports.add_argument("--join-chunks", action="store_true", help="the files are DreamerV3 replay chunks "
                         "({time}-{uuid}-{successor}-{length}.npz): follow the successor links, so an episode that "
                         "goes on in the next chunk imports whole")
    imports.add_argument("--rewards-on", choices=["action", "arrival"], default="action",
                         help="action: reward[t] follows action[t] (TorchRL); arrival: reward[t] came on "
                         "arriving at frame t (DreamerV3)")
    imports.add_argument("--channels-first", action="store_true", help="frames are [T, C, H, W]")
    imports.add_argument("--env", default=None, help="the env the data comes from (e.g. dmc:cartpole-swingup), "
                         "so offline runs evaluate in it; without one they only train")
    imports.add_argument("--image-size", type=int, default=64, help="with --env: its frame size")
    imports.add_argument("--action-repeat", type=int, default=2, help="with --env: its action repeat")
    imports.add_argument("--source", default="imported", help="who acted (stored as the dataset's policy)")
    imports.set_defaults(run=_import)

    merge = commands.add_parser("merge", help="merge datasets of one env (e.g. recorded side by side) into one",
                                description="Writes the episodes of every DATASET, in order, as one new dataset "
                                "(frames, actions, rewards, episode ends; env-specific entries such as Crafter's "
                                "achievements are left out, with a warning). See d4func.data.merge_datasets.")
    merge.add_argument("datasets", nargs="+", metavar="DATASET", help="dataset directories, two or more")
    merge.add_argument("--out", required=True, help="the merged dataset's directory (must not exist yet)")
    merge.set_defaults(run=_merge)
    return parser


def _traceback_wanted() -> bool:
    """D4FUNC_TRACEBACK=1: errors the command would report in one line raise with their full traceback instead."""
    return os.environ.get("D4FUNC_TRACEBACK", "").lower() in ("1", "true", "yes")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse takes one run of positionals: overrides after an option (`... a=1 --quiet b=2`) come back unparsed.
    if extra and hasattr(args, "overrides") and all("=" in arg and not arg.startswith("-") for arg in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.run(args)
    except Terminated:
        # The loop saved the run's state before re-raising: a requeued job resumes it with the same command.
        config = getattr(args, "config", None)
        sys.stderr.write(f"d4func {args.command}: terminated by SIGTERM; the run's state is saved, and the same "
                         f"command{f' (--config {config})' if config else ''} resumes it\n")
        sys.stderr.flush()
        return EXIT_TERMINATED
    except (OmegaConfBaseException, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
            NonFiniteLossError) as error:
        # Config and input errors, and a NaN / inf stop (its state is saved): one clear line naming the bad key,
        # value or loss term, no traceback (unless asked for: a ValueError deep in a run may be a bug).
        if _traceback_wanted():
            raise  # the full traceback, exit code 1
        # OmegaConf appends full_key / reference_type / object_type lines: the first line names the key already.
        message = (str(error).strip().splitlines() or [""])[0]
        # One write with its newline: print() writes the two apart on an unbuffered stderr (PYTHONUNBUFFERED), and
        # torchrun's ranks, stopping together on one NaN, then ran their lines into one.
        sys.stderr.write(f"d4func {args.command}: {type(error).__name__}: {message}\n")
        sys.stderr.flush()
        return EXIT_NON_FINITE if isinstance(error, NonFiniteLossError) else EXIT_INPUT_ERROR
    except OSError as error:
        # Not the input but the machine: a full disk, a read-only or vanished mount, a failing device. One line
        # with the errno and the file; a checkpoint write that failed left the previous checkpoints whole.
        if _traceback_wanted():
            raise
        kept = ("the newest complete checkpoint is the state kept, and the same command resumes from it once the "
                "cause is fixed" if args.command == "train" else "run the command again once the cause is fixed")
        sys.stderr.write(f"d4func {args.command}: I/O error: {error}; {kept}\n")
        sys.stderr.flush()
        return EXIT_IO_ERROR


if __name__ == "__main__":
    sys.exit(main())
