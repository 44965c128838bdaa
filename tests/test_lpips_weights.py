"""LPIPS backbone files (`d4func.lpips_loss`): torchvision's AlexNet checkpoint is checked key by key before it
loads, and a missing file names where it was looked for. The weights are made here (no download)."""

from __future__ import annotations

import re

import pytest
import torch
from helpers.alexnet import alexnet_state


def test_lpips_backbone_files_are_checked_key_by_key_and_shape_by_shape(tmp_path):
    # A file that is not torchvision's AlexNet checkpoint must be refused naming the key at fault, not half-loaded:
    # a missing layer, or a tensor of another shape (a (1,) bias would broadcast silently into copy_).
    from d4func.lpips_loss import make_lpips

    for name, state, match in [
        ("missing", alexnet_state(**{"features.8.weight": None}), r"lacks \['features.8.weight'\]"),
        ("shape", alexnet_state(**{"features.3.bias": torch.zeros(1)}), r"features.3.bias has shape \(1,\), "
                                                                         r"expected \(192,\)"),
    ]:
        path = tmp_path / f"{name}.pth"
        torch.save(state, path)
        with pytest.raises(ValueError, match=match):
            make_lpips("alex", backbone_path=path)


def test_lpips_loads_a_checkpoint_wrapped_in_a_state_dict_key(tmp_path):
    # Checkpoints saved as {"state_dict": ...} (as training scripts often do) load like bare ones.
    from d4func.lpips_loss import make_lpips

    state = alexnet_state()
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": state}, path)
    trunk = dict(make_lpips("alex", backbone_path=path).lpips.net.named_parameters())
    assert torch.equal(trunk["slice2.3.weight"], state["features.3.weight"])


def test_missing_lpips_weights_name_the_path_that_was_looked_at(tmp_path, monkeypatch):
    # The error must say where the file was expected: the explicit lpips_backbone_path when one was given (not the
    # generic hub-cache advice), else the hub-cache path under TORCH_HOME.
    from d4func.lpips_loss import LPIPSWeightsMissing, make_lpips

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    wrong = tmp_path / "nope.pth"
    with pytest.raises(LPIPSWeightsMissing, match=re.escape(f"not found at lpips_backbone_path='{wrong}'")):
        make_lpips("alex", backbone_path=wrong)
    hub = tmp_path / "home" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    with pytest.raises(LPIPSWeightsMissing, match=re.escape(f"to {hub} (the torch hub cache")):
        make_lpips("alex")
