"""A random AlexNet trunk in torchvision's checkpoint layout, for LPIPS without ImageNet weights (none can be
downloaded here)."""

from __future__ import annotations

from pathlib import Path

import torch


def alexnet_state(**changes) -> dict[str, torch.Tensor]:
    """`features.<i>.weight/bias` of AlexNet's five conv layers; `changes` replace entries (None drops one)."""
    gen = torch.Generator().manual_seed(0)
    shapes = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3), 10: (256, 256, 3, 3)}
    state = {}
    for index, shape in shapes.items():
        state[f"features.{index}.weight"] = torch.randn(shape, generator=gen) * 0.05
        state[f"features.{index}.bias"] = torch.zeros(shape[0])
    state.update(changes)
    return {key: value for key, value in state.items() if value is not None}


def alexnet_file(directory: Path) -> Path:
    """`alexnet_state()` saved as `directory/alexnet.pth`, a file `make_lpips(backbone_path=...)` loads."""
    path = directory / "alexnet.pth"
    torch.save(alexnet_state(), path)
    return path
