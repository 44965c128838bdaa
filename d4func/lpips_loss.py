"""LPIPS perceptual distance (paper Section 3.1: the tokenizer loss is MSE + 0.2 · LPIPS) without any download.

The `lpips` package ships its calibrated linear layers inside the wheel (`lpips/weights/v0.1/<net>.pth`), but its
backbone is torchvision's ImageNet classifier, whose weights torchvision would fetch from the internet. Here the
LPIPS module is built with a randomly initialised trunk (`pnet_rand=True`, so torchvision is never asked for
weights), then both parts are loaded from local files:

* the linear layers from the `lpips` package itself;
* the backbone from, in order: an explicit path (config `lpips_backbone_path`), or torchvision's own file name in
  the torch hub cache (`$TORCH_HOME/hub/checkpoints/`, e.g. `alexnet-owt-7be5be79.pth`).

When no backbone file exists, `make_lpips` raises `LPIPSWeightsMissing` explaining how to provide one.

The returned module is a frozen, stateless-in-use loss function (eval mode, no trainable weights): gradients flow
through it to its inputs only. It is a fixed edge of the system, not part of any params tree.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import lpips
import torch
from torch import Tensor, nn

from d4func.tokenizer_loss import LPIPS_MIN_SIDE

# torchvision's file name for each trunk's ImageNet weights (torchvision.models.*_Weights.IMAGENET1K_V1.url).
BACKBONE_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


class LPIPSWeightsMissing(FileNotFoundError):
    """The ImageNet backbone weights LPIPS needs are not on disk."""


def hub_checkpoint_path(net: str) -> Path:
    """Where torchvision would have cached the backbone weights of `net`."""
    _check_net(net)
    return Path(torch.hub.get_dir()) / "checkpoints" / BACKBONE_FILES[net]


def find_backbone_weights(net: str = "alex", backbone_path: str | os.PathLike | None = None) -> Path | None:
    """The backbone weight file: `backbone_path` if given (it must exist), else the torch hub cache's, else None."""
    _check_net(net)
    if backbone_path is not None:
        path = Path(backbone_path).expanduser()
        if not path.is_file():
            raise LPIPSWeightsMissing(f"LPIPS backbone weights not found at lpips_backbone_path={str(path)!r}")
        return path
    cached = hub_checkpoint_path(net)
    return cached if cached.is_file() else None


def missing_weights_message(net: str) -> str:
    return (
        f"LPIPS needs torchvision's ImageNet weights for its {net!r} trunk, and they cannot be downloaded here. "
        f"Provide them in one of two ways: copy the file {BACKBONE_FILES[net]} (from "
        f"https://download.pytorch.org/models/{BACKBONE_FILES[net]}, on a machine with network access) to "
        f"{hub_checkpoint_path(net)} (the torch hub cache; set TORCH_HOME to move it), or point the config key "
        f"lpips_backbone_path at it (train_tokenizer.py: loss.lpips_backbone_path=/path/to/{BACKBONE_FILES[net]}). "
        "To train without LPIPS, set the LPIPS weight to 0 (loss.lpips_weight=0)."
    )


def lpips_linear_weights_path(net: str, version: str = "0.1") -> Path:
    """The calibrated linear layers shipped inside the `lpips` package."""
    _check_net(net)
    path = Path(lpips.__file__).parent / "weights" / f"v{version}" / f"{net}.pth"
    if not path.is_file():
        raise FileNotFoundError(f"the lpips package has no linear-layer weights at {path}; reinstall lpips")
    return path


def make_lpips(
    net: str = "alex", backbone_path: str | os.PathLike | None = None, device: torch.device | str = "cpu"
) -> nn.Module:
    """A frozen LPIPS module, `module(x, y)` on images `[N, 3, H, W]` in [0, 1] -> distance `[N]`.

    Never downloads: raises `LPIPSWeightsMissing` (with instructions) when the backbone weights are not on disk.
    """
    path = find_backbone_weights(net, backbone_path)
    if path is None:
        raise LPIPSWeightsMissing(missing_weights_message(net))
    with warnings.catch_warnings():
        # pnet_rand=True makes lpips call torchvision with pretrained=False, which is deprecated but download-free.
        warnings.simplefilter("ignore", UserWarning)
        module = lpips.LPIPS(pretrained=False, net=net, version="0.1", pnet_rand=True, verbose=False)
    _load_backbone(module, torch.load(path, map_location="cpu", weights_only=True), str(path))
    linear = torch.load(lpips_linear_weights_path(net), map_location="cpu", weights_only=True)
    lin_keys = {name for name, _ in module.named_parameters() if name.startswith("lin")}
    if set(linear) != lin_keys:
        raise ValueError(f"lpips linear weights have keys {sorted(linear)}, expected {sorted(lin_keys)}")
    module.load_state_dict(linear, strict=False)
    return LPIPSDistance(module, net).to(device)


def _load_backbone(module: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Copy torchvision `features.<i>.<param>` weights into lpips' `net.slice<k>.<i>.<param>` (same layer index)."""
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    targets = {}
    for name, param in module.net.named_parameters():
        _, rest = name.split(".", 1)  # slice<k>.<i>.<...>, where <i> is the layer's index in `features`
        targets[f"features.{rest}"] = param
    missing = sorted(key for key in targets if key not in state)
    if missing:
        raise ValueError(f"LPIPS backbone file {source} lacks {missing}; is it torchvision's ImageNet checkpoint?")
    with torch.no_grad():
        for key, param in targets.items():
            if state[key].shape != param.shape:
                raise ValueError(
                    f"LPIPS backbone file {source}: {key} has shape {tuple(state[key].shape)}, "
                    f"expected {tuple(param.shape)}"
                )
            param.copy_(state[key])


class LPIPSDistance(nn.Module):
    """Frozen LPIPS in eval mode on [0, 1] images; returns one distance per image."""

    def __init__(self, module: nn.Module, net: str) -> None:
        super().__init__()
        self.net_name = net
        self.lpips = module.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> LPIPSDistance:
        # Always eval: the linear layers carry dropout that must stay off in a loss.
        return super().train(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS expects two [N, 3, H, W] images, got {tuple(x.shape)} and {tuple(y.shape)}")
        side = LPIPS_MIN_SIDE[self.net_name]
        if min(x.shape[-2:]) < side:
            raise ValueError(f"LPIPS with the {self.net_name!r} trunk needs images of side >= {side}, got {x.shape}")
        # normalize=True maps [0, 1] to the [-1, 1] range the package expects.
        return self.lpips(x, y, normalize=True).flatten()


def _check_net(net: str) -> None:
    if net not in BACKBONE_FILES:
        raise ValueError(f"unknown LPIPS trunk {net!r}; expected one of {sorted(BACKBONE_FILES)}")
