"""Multi-token-prediction targets (paper Eq. 9-10) for phase-2 finetuning: the policy and reward heads at step t
are trained on the actions and rewards of steps t .. t+L-1, each only while it lies in t's episode."""

from __future__ import annotations

import torch
from torch import Tensor


def mtp_targets(x: Tensor, mask_is_last_or_done: Tensor, L: int = 8) -> tuple[Tensor, Tensor]:
    """Multi-token-prediction targets (paper Eq. 9-10): the policy and reward heads at step t predict a_{t+n} and
    r_{t+n} for several offsets n, from the same agent token h_t.

    Offsets are n = 0 .. L-1: n = 0 is the ordinary prediction the policy acts with and the reward head annotates
    imagined steps with, so it must be among the targets; n >= 1 are the extra MTP targets. `L` counts the
    predicted steps (L = 8 in the paper); the paper writes its sum as n = 0..L, so pass L = 9 for that literal
    count.

    x: [B, T, ...] per-step quantities (actions or rewards) in the dataset's per-step layout;
    mask_is_last_or_done: bool [B, T], True where step t is the last step of its episode (is_last or terminal),
    i.e. step t+1, if present, belongs to another episode.

    Returns (targets [B, T, L, ...] with targets[:, t, n] = x[:, t+n], valid bool [B, T, L]). valid[:, t, n] is
    False when t + n >= T (past the sequence end) or when an episode ends at some step in t .. t+n-1 (the target
    belongs to a later episode); invalid targets are zero-filled so they never leak values.
    """
    if x.dim() < 2:
        raise ValueError(f"x must be [B, T, ...], got shape {tuple(x.shape)}")
    if mask_is_last_or_done.shape != x.shape[:2]:
        raise ValueError(
            f"mask_is_last_or_done shape {tuple(mask_is_last_or_done.shape)} must be [B, T] = {tuple(x.shape[:2])}"
        )
    if mask_is_last_or_done.dtype != torch.bool:
        raise TypeError(f"mask_is_last_or_done must be bool, got {mask_is_last_or_done.dtype}")
    if L < 1:
        raise ValueError(f"L must be >= 1, got {L}")
    T = x.shape[1]
    steps = torch.arange(T, device=x.device)
    idx = steps[:, None] + torch.arange(L, device=x.device)[None, :]  # [T, L]: the target step t + n
    in_range = idx < T
    idx_c = idx.clamp(max=T - 1)
    # Episode ends strictly before each step; the target t+n is in t's episode iff no end lies in t .. t+n-1,
    # i.e. iff the count of ends strictly before t+n equals the count strictly before t.
    ends = mask_is_last_or_done.long()
    ends_before = ends.cumsum(dim=1) - ends  # [B, T]
    same_episode = ends_before[:, idx_c] == ends_before[:, :, None]  # [B, T, L]
    valid = same_episode & in_range[None]
    targets = x[:, idx_c]  # [B, T, L, ...]
    fill = valid.reshape(*valid.shape, *([1] * (x.dim() - 2)))
    targets = torch.where(fill, targets, torch.zeros_like(targets))
    return targets, valid
