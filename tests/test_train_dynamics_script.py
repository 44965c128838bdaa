"""`experiments/train_dynamics.py` end to end at a tiny budget: metrics JSON, CSV logs and the real-vs-generated GIF."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~12 s: an experiment script end to end in a subprocess
def test_train_dynamics_script_on_shapes(tmp_path):
    proc = subprocess.run(
        [sys.executable, "experiments/train_dynamics.py", "--config", "experiments/configs/dynamics_shapes.yaml",
         "--quiet", f"run_dir={tmp_path}", "world_model.tokenizer_steps=2", "world_model.dynamics_steps=2",
         "world_model.eval_clips=4", "threads=1"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert {"psnr_k1", "psnr_k2", "psnr_k4", "psnr_copy_last"} <= set(result)
    assert (tmp_path / "real_vs_generated.gif").stat().st_size > 0
    assert any((tmp_path / "logs").rglob("*.csv"))  # per-term losses through TorchRL's CSV logger
