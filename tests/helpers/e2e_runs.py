"""The end-to-end learning test's training runs (`experiments/reach_e2e.py`), started when the test is collected.

Each seed trains for about 3 minutes in a process of its own with one thread. The rest of the suite runs with one
thread too (tests/conftest.py), so in a full run the two seeds go one after the other on the core the suite
leaves idle, and the test, placed last, only waits for what is left: the suite's wall time drops by about the
runs' length. Run alone, the test starts both seeds side by side. Either way every seed runs the same command in a
fresh process, so its result does not depend on what else runs beside it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SEEDS = (0, 1)
TIMEOUT_S = 1800  # for both seeds together, one after the other on a loaded machine


class Runs:
    """The seeds' `reach_e2e.py` processes, in sequence on a background thread or side by side."""

    def __init__(self, side_by_side: bool) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="d4func-e2e-"))
        self.side_by_side = side_by_side
        self.outputs: dict[int, tuple[int, str]] = {}
        self.procs: list[subprocess.Popen] = []
        self.lock = threading.Lock()
        self.stopped = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _start(self, seed: int) -> subprocess.Popen | None:
        with self.lock:
            if self.stopped:
                return None
            with open(self.root / f"seed{seed}.log", "w") as log:  # a file: a pipe could fill and stall the run
                proc = subprocess.Popen(
                    [sys.executable, "experiments/reach_e2e.py", "--seeds", str(seed), "--run-dir",
                     str(self.root / str(seed))],
                    cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=subprocess.STDOUT)
            self.procs.append(proc)
            return proc

    def _run(self) -> None:
        if self.side_by_side:
            started = {seed: self._start(seed) for seed in SEEDS}
            for seed, proc in started.items():
                if proc is not None:
                    self.outputs[seed] = (proc.wait(), self._log(seed))
            return
        for seed in SEEDS:
            proc = self._start(seed)
            if proc is None:
                return
            self.outputs[seed] = (proc.wait(), self._log(seed))

    def _log(self, seed: int) -> str:
        return (self.root / f"seed{seed}.log").read_text()

    def results(self) -> list[dict[str, Any]]:
        """Each seed's row of `result.json`, once its run has ended; a failed run fails with its output's tail."""
        self.thread.join(TIMEOUT_S)
        if self.thread.is_alive():
            self.stop()
            raise TimeoutError(f"the end-to-end runs took longer than {TIMEOUT_S} s")
        rows = []
        for seed in SEEDS:
            code, out = self.outputs[seed]
            assert code == 0, out[-3000:]
            rows.append(json.loads((self.root / str(seed) / "result.json").read_text())["seeds"][0])
        return rows

    def metrics_file(self, seed: int) -> Path:
        return self.root / str(seed) / f"seed{seed}" / "train" / "metrics.jsonl"

    def stop(self) -> None:
        """End the runs still going (an interrupted or failed session) and remove their files."""
        with self.lock:
            self.stopped = True
            for proc in self.procs:
                if proc.poll() is None:
                    proc.kill()
        shutil.rmtree(self.root, ignore_errors=True)


_runs: Runs | None = None


def start(side_by_side: bool) -> Runs:
    global _runs
    if _runs is None:
        _runs = Runs(side_by_side)
    return _runs


def stop() -> None:
    global _runs
    if _runs is not None:
        _runs.stop()
        _runs = None
