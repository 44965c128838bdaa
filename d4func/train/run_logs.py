"""A run's logs: scalars through a TorchRL logger (CSV or TensorBoard) plus `metrics.jsonl`, rewound with its
checkpoints on resume, and read back for plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

from d4func.durable_files import replace_text
from d4func.train.run_config import RunConfig


class RunLogger:
    """Scalars through a TorchRL logger (CSV or TensorBoard) plus a JSON-lines copy for plots.

    `rows` counts the lines of `metrics.jsonl`; checkpoints record it, and `rewind(rows)` on resume drops the lines
    (and CSV rows) that a killed process logged after its last checkpoint, so the resumed run's logs read as an
    uninterrupted run's. TensorBoard event files cannot be cut; there the resumed writer purges events past the
    checkpoint's step when TensorBoard reads them (`SummaryWriter(purge_step=...)`).
    """

    def __init__(self, cfg: RunConfig, run_dir: Path, enabled: bool = True) -> None:
        from torchrl.record.loggers import CSVLogger, TensorboardLogger

        self.enabled = enabled  # data-parallel runs: rank 0 only
        self.rows = 0
        if not enabled:
            return
        self.kind = cfg.loop.logger
        if self.kind == "tensorboard":
            self.logger = TensorboardLogger(exp_name="logs", log_dir=str(run_dir))
        else:
            self.logger = CSVLogger(exp_name="logs", log_dir=str(run_dir))
        self.jsonl_path = run_dir / "metrics.jsonl"
        if self.jsonl_path.exists():
            self.rows = len(self.jsonl_path.read_text().splitlines())
        self.jsonl = open(self.jsonl_path, "a")  # noqa: SIM115 (closed in close())

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        for name, value in metrics.items():
            if math.isfinite(value):
                self.logger.log_scalar(name, value, step=step)
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        self.rows += 1

    def rewind(self, rows: int, step: int) -> None:
        """Keep the first `rows` lines of `metrics.jsonl` (those a checkpoint at `step` had seen) and, for the CSV
        logger, the matching rows of each scalar's file; call before anything new is logged."""
        if not self.enabled or rows >= self.rows:
            return
        self.jsonl.close()
        kept = self.jsonl_path.read_text().splitlines()[:rows]
        replace_text(self.jsonl_path, "".join(line + "\n" for line in kept))
        self.jsonl = open(self.jsonl_path, "a")  # noqa: SIM115 (closed in close())
        self.rows = rows
        if self.kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.logger.experiment.close()
            self.logger.experiment = SummaryWriter(log_dir=self.logger.experiment.get_logdir(), purge_step=step + 1)
            return
        # The CSV logger writes one row per finite value to `logs/scalars/<name>.csv`, in metrics.jsonl's order.
        kept_per_name: dict[str, int] = {}
        for line in kept:
            for name, value in json.loads(line).items():
                if name != "step" and math.isfinite(value):
                    kept_per_name[name] = kept_per_name.get(name, 0) + 1
        scalars = Path(self.logger.experiment.log_dir) / "scalars"
        for path in scalars.rglob("*.csv"):
            name = path.relative_to(scalars).with_suffix("").as_posix()
            csv_rows = path.read_text().splitlines()[:kept_per_name.get(name, 0)]
            if csv_rows:
                replace_text(path, "".join(row + "\n" for row in csv_rows))
            else:  # a scalar first logged after the checkpoint
                path.unlink()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """The rows of a run's `metrics.jsonl` (every logged scalar, with its step)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl: is it a d4func run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def metric_series(rows: list[dict[str, float]], key: str) -> list[tuple[int, float]]:
    """(step, value) of every row that logged `key`."""
    return [(int(row["step"]), float(row[key])) for row in rows if key in row]


def plot_returns(run_dir: Path) -> Path | None:
    """`returns.png` from the logged episode and evaluation returns (a small PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    train = metric_series(rows, "episode/return")
    evals = metric_series(rows, "eval/mean_return")
    bc_evals = metric_series(rows, "eval/bc_mean_return")
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), ".", alpha=0.5, label="training episodes")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="evaluation")
    if bc_evals:
        ax.plot(*zip(*bc_evals, strict=True), "s--", label="BC head alone")
    ax.set_xlabel("env steps")
    ax.set_ylabel("return")
    ax.legend()
    fig.tight_layout()
    path = run_dir / "returns.png"
    fig.savefig(path)
    plt.close(fig)
    return path
