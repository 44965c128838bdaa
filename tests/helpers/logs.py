"""Reading a run's logs in tests."""

from pathlib import Path


def csv_logs(run_dir: Path) -> dict[str, str]:
    """Every scalar file of TorchRL's CSV logger in a run, by scalar name (`a/b.csv` for scalar `a/b`)."""
    scalars = run_dir / "logs" / "scalars"
    return {path.relative_to(scalars).as_posix(): path.read_text() for path in sorted(scalars.rglob("*.csv"))}
