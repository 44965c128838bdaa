"""Where a training run stands, read from its `run_dir` without disturbing it: `d4func status RUN_DIR`.

A run that trains for days is checked on from outside: how far it got (the newest checkpoint's counters against the
config's target), whether it is finished, whether a process trains in it now (its `run_dir/.lock`), what its last
evaluation and episode returned, and how old its newest checkpoint is (the work a kill would lose). `finished`
turns true with the checkpoint that counts the target, before the final evaluation and `summary.json`: a run is done
once it is finished and nothing holds it (`"running": false`). Everything comes
from the files a run writes: `config.json`, the checkpoints (read with `mmap`, so a large run's states are not read
into memory), `metrics.jsonl` and the lock. A job script can requeue on `"finished": false` and skip a run_dir that
`"running"` names.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from d4func.train import checkpoint
from d4func.train.run_lock import run_dir_holder

__all__ = ["last_logged", "run_status"]


def run_status(run_dir: str | Path) -> dict[str, Any]:
    """The state of the run in `run_dir` as a JSON-ready dict (keys in the module docstring's order); a
    FileNotFoundError when `run_dir` holds no `config.json` (not a run directory, or one that never started)."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{run_dir} holds no config.json: not a d4func run directory (or a run that never "
                                "started)")
    config = json.loads(config_file.read_text())
    loop = config["loop"]
    online = loop["mode"] == "online"
    counted, target = ("env_steps", loop["env_steps"]) if online else ("grad_steps", loop["offline_steps"])
    status: dict[str, Any] = {
        "run_dir": str(run_dir),
        "mode": loop["mode"],
        "data": config["env"]["name"] if online else loop["offline_data"],
        "target": {counted: target},
    }
    newest, saved_at = _newest_checkpoint(run_dir)
    counters = {} if newest is None else checkpoint.rank_payload(newest.payload, 0)["counters"]
    done = counters.get(counted, 0)
    status["progress"] = {key: counters[key] for key in ("env_steps", "grad_steps", "episodes") if key in counters}
    status["fraction_done"] = done / target if target else 1.0
    # A checkpoint that counts the target with nothing owed is the run's last (its final evaluation may follow).
    # Online checkpoints from before `round_pending` owe a round where gradient steps were left unpaid, as
    # `train_online` reads them.
    owed = counters.get("round_pending", online and done >= loop["prefill_steps"]
                        and counters.get("train_credit", 0.0) >= 1)
    status["finished"] = newest is not None and done >= target and not owed
    # The holder's note; false: no process holds the lock; null: it cannot be told here (no locks), with the reason.
    try:
        status["running"] = run_dir_holder(run_dir) or False
    except OSError as error:
        status["running"] = None
        status["running_unknown"] = str(error)
    status["checkpoints"] = {
        "count": len(checkpoint.list_checkpoints(run_dir)),
        "newest_step": None if newest is None else newest.step,
        "newest_age_s": None if saved_at is None else round(time.time() - saved_at, 1),
        "unreadable": sorted(path.name for path in run_dir.glob(f"ckpt-*.pt{checkpoint.UNREADABLE_SUFFIX}")),
    }
    status["last_eval"] = last_logged(run_dir, "eval/mean_return", "eval/crafter_score", "eval/bc_mean_return")
    status["last_episode"] = last_logged(run_dir, "episode/return", "episode/crafter_score")
    return status


def _newest_checkpoint(run_dir: Path, tries: int = 3) -> tuple[checkpoint.Checkpoint | None, float | None]:
    """The newest readable checkpoint (mmap: its states stay on disk) and when it was written. A live run may
    delete it between the two reads (`loop.keep_checkpoints`), having written a newer one: then look again."""
    for _ in range(tries):
        newest = checkpoint.newest_readable_checkpoint(run_dir, mmap=True)
        if newest is None:
            return None, None
        try:
            return newest, newest.path.stat().st_mtime
        except FileNotFoundError:
            continue
    return newest, None


def last_logged(run_dir: Path, key: str, *also: str) -> dict[str, Any] | None:
    """The newest `metrics.jsonl` row that logged `key`: its step, `key` and whichever of `also` it has; None if
    none did. A line the run is writing at this moment (no newline yet, or cut short by a kill) is skipped."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    for line in reversed(path.read_text().splitlines()):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if key in row:
            return {"step": row["step"], **{name: row[name] for name in (key, *also) if name in row}}
    return None
