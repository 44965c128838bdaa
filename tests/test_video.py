"""`d4func.train.video.write_comparison_gif`: real frames on top, imagined below, one column per clip (cameras side
by side within it), read back pixel by pixel."""

from __future__ import annotations

import tempfile
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from d4func.train.video import write_comparison_gif


def _read_gif(path: Path) -> np.ndarray:
    """`[T, rows, columns, 3]` uint8."""
    return np.stack(imageio.mimread(path))[..., :3]


def _hwc(frame: torch.Tensor) -> np.ndarray:
    """`[C, H, W]` frame in {0, 1} -> `[H, W, 3]` uint8, as the GIF stores it (two colours: no palette loss)."""
    return (frame.permute(1, 2, 0) * 255).to(torch.uint8).numpy()


@settings(max_examples=12, deadline=None)
@given(clips=st.integers(1, 3), steps=st.integers(2, 3), height=st.integers(2, 5), width=st.integers(2, 5),
       cameras=st.sampled_from([None, 2]), seed=st.integers(0, 2**16))
def test_gif_puts_real_over_imagined_and_clips_side_by_side(clips, steps, height, width, cameras, seed):
    gen = torch.Generator().manual_seed(seed)
    views = () if cameras is None else (cameras,)
    real, imagined = ((torch.rand(clips, steps, *views, 3, height, width, generator=gen) > 0.5).float()
                      for _ in range(2))
    # A GIF merges a frame equal to the one before it: keep every step's picture distinct.
    both = torch.stack([real, imagined]).transpose(0, 2).flatten(1)
    assume(all(not torch.equal(both[t], both[t + 1]) for t in range(steps - 1)))
    with tempfile.TemporaryDirectory() as tmp:
        pixels = _read_gif(write_comparison_gif(Path(tmp) / "sub" / "cmp.gif", real, imagined))
    panel = width * (cameras or 1)
    assert pixels.shape == (steps, 2 * height, clips * panel, 3)
    for t in range(steps):
        for b in range(clips):
            for k in range(cameras or 1):
                columns = slice(b * panel + k * width, b * panel + (k + 1) * width)
                at = (b, t) if cameras is None else (b, t, k)
                np.testing.assert_array_equal(pixels[t, :height, columns], _hwc(real[at]))
                np.testing.assert_array_equal(pixels[t, height:, columns], _hwc(imagined[at]))


def test_gif_frames_are_clamped_to_the_unit_range():
    real = torch.full((1, 2, 3, 2, 2), 2.0)
    real[:, 1] = -1.0
    with tempfile.TemporaryDirectory() as tmp:
        pixels = _read_gif(write_comparison_gif(Path(tmp) / "cmp.gif", real, real.clone()))
    assert (pixels[0] == 255).all() and (pixels[1] == 0).all()


def test_real_and_imagined_of_different_shapes_are_refused_naming_both(tmp_path):
    with pytest.raises(ValueError, match=r"real \(1, 2, 3, 4, 4\) and imagined \(1, 3, 3, 4, 4\) frames differ"):
        write_comparison_gif(tmp_path / "cmp.gif", torch.zeros(1, 2, 3, 4, 4), torch.zeros(1, 3, 3, 4, 4))
    assert not (tmp_path / "cmp.gif").exists()
