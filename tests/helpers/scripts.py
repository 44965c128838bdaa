"""Load a script of experiments/ (not a package) as a module, for tests of its functions and config classes."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def load_experiment_script(name: str) -> ModuleType:
    """`experiments/<name>.py`, executed afresh and registered as `sys.modules[name]`: dataclasses resolve their
    string annotations through sys.modules."""
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
