"""The benchmark suite's script `benchmarks/run_all.py` as a module, for tests that time or reuse its pieces (its
replay-shaped random batch, the paper-scale figures)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

RUN_ALL = Path(__file__).resolve().parents[2] / "benchmarks" / "run_all.py"
MODULE_NAME = "d4func_benchmarks_run_all"


def load_run_all() -> ModuleType:
    """`benchmarks/run_all.py`, loaded once per process."""
    if MODULE_NAME in sys.modules:
        return sys.modules[MODULE_NAME]
    spec = importlib.util.spec_from_file_location(MODULE_NAME, RUN_ALL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
