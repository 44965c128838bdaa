"""`experiments/train_dynamics.py` end to end at a tiny budget: metrics JSON, CSV logs and the real-vs-generated GIF."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.scripts import load_experiment_script

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


def test_context_must_leave_a_frame_to_predict():
    script = load_experiment_script("train_dynamics")
    seq_len = script.ShapesWorldModelConfig().seq_len
    script.TrainDynamicsConfig(context=seq_len - 1)  # the longest context that still predicts one frame
    for context in (0, seq_len):
        with pytest.raises(ValueError, match=f"context={context} must lie in"):
            script.TrainDynamicsConfig(context=context)


def test_dmc_source_scores_copying_the_second_last_frame(tmp_path, monkeypatch):
    """The dmc branch computes its own next-frame figures: the copy-last baseline must predict the last frame of each
    clip from the one before it. The dataset and training are replaced by a 1-step shapes world model and fixed
    moving-shapes clips (what the branch receives from `dmc_world_model`)."""
    script = load_experiment_script("train_dynamics")
    wm = dataclasses.replace(script.ShapesWorldModelConfig(), tokenizer_steps=1, dynamics_steps=1, batch=2,
                             eval_clips=2)
    model = script.train_shapes_world_model(wm, progress=False)
    frames, actions = script.moving_shapes_batch(wm.shapes, 8, wm.seq_len, torch.Generator().manual_seed(5))
    monkeypatch.setattr(script, "dmc_world_model", lambda cfg, log, progress: (model, lambda _: (frames, actions)))
    monkeypatch.setattr(sys, "argv", ["train_dynamics.py", "--quiet", "source=dmc", f"run_dir={tmp_path}",
                                      "world_model.tokenizer_steps=1", "world_model.dynamics_steps=1", "threads=1"])
    script.main()
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["source"] == "dmc"
    assert result["psnr_copy_last"] == pytest.approx(float(script.psnr(frames[:, -2:-1], frames[:, -1:])))
    assert {"psnr_k1", "psnr_k2", "psnr_k4"} <= set(result)
