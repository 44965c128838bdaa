"""The learning-rate schedule of AdamWConfig: hand-computed points, torch's own AdamW + LambdaLR as a reference,
and the properties a resumable run relies on (a pure function of the update count)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict
from torch import nn
from torch.func import grad_and_value

from d4func.config import load_config
from d4func.optim import AdamWConfig, adamw_init, adamw_update, learning_rate
from d4func.train.run_config import OptimConfig


def _lr(step: int, cfg: AdamWConfig) -> float:
    return float(learning_rate(step, cfg))


def test_constant_schedule_is_lr_at_every_step() -> None:
    cfg = AdamWConfig(lr=3e-4)
    for step in (0, 1, 999, 10**6):
        assert _lr(step, cfg) == pytest.approx(3e-4, rel=1e-6)


def test_warmup_ramps_linearly_then_holds() -> None:
    cfg = AdamWConfig(lr=1.0, warmup_steps=4)
    assert [_lr(s, cfg) for s in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_linear_decay_by_hand() -> None:
    # warmup 2 (0.5, 1.0), then 1.0 -> 0.2 over 4 updates: 1.0, 0.8, 0.6, 0.4, then held at 0.2.
    cfg = AdamWConfig(lr=1.0, warmup_steps=2, schedule="linear", decay_steps=4, final_lr_ratio=0.2)
    expected = [0.5, 1.0, 1.0, 0.8, 0.6, 0.4, 0.2, 0.2, 0.2]
    assert [_lr(s, cfg) for s in range(9)] == pytest.approx(expected, abs=1e-6)


def test_cosine_decay_by_hand() -> None:
    cfg = AdamWConfig(lr=2.0, schedule="cosine", decay_steps=4, final_lr_ratio=0.0)
    expected = [2.0 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(5)] + [0.0, 0.0]
    assert [_lr(s, cfg) for s in range(7)] == pytest.approx(expected, abs=1e-6)
    assert _lr(2, cfg) == pytest.approx(1.0)  # halfway down


@settings(max_examples=60, deadline=None)
@given(
    schedule=st.sampled_from(["constant", "linear", "cosine"]),
    warmup=st.integers(0, 50),
    decay=st.integers(1, 200),
    ratio=st.floats(0.0, 1.0),
    step=st.integers(0, 400),
)
def test_schedule_is_bounded_and_never_rises_after_warmup(schedule, warmup, decay, ratio, step) -> None:
    cfg = AdamWConfig(lr=1e-3, schedule=schedule, warmup_steps=warmup, decay_steps=decay, final_lr_ratio=ratio)
    now, later = _lr(step, cfg), _lr(step + 1, cfg)
    assert 0.0 <= now <= 1e-3 * (1 + 1e-6)
    if ratio > 1e-6 or schedule == "constant":
        assert now > 0.0  # only a decay to a zero floor stops the updates
    if step + 1 >= warmup:
        assert later <= now * (1 + 1e-6) + 1e-12
    else:
        assert later > now
    if schedule != "constant" and step >= warmup + decay:
        assert now == pytest.approx(1e-3 * ratio, abs=1e-9)


def test_tensor_and_int_steps_agree() -> None:
    """The train state holds the step as a tensor; experiments pass an int: one curve."""
    cfg = AdamWConfig(lr=1e-3, warmup_steps=10, schedule="cosine", decay_steps=100)
    for step in (0, 5, 10, 60, 200):
        assert float(learning_rate(torch.tensor(step), cfg)) == _lr(step, cfg)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_scheduled_adamw_matches_torch_adamw_with_lambda_lr(schedule: str) -> None:
    """Eight updates across warmup, decay and the floor against torch.optim.AdamW driven by LambdaLR with the
    same factor: the scheduled lr reaches the step size and the decoupled weight decay alike."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    params = TensorDict.from_module(net).detach().clone()
    cfg = AdamWConfig(lr=1e-2, weight_decay=0.1, decay_vectors=True, max_grad_norm=None, schedule=schedule,
                      warmup_steps=2, decay_steps=4, final_lr_ratio=0.3)
    reference = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(reference, lambda s: _lr(s, cfg) / cfg.lr)
    opt = adamw_init(params)
    for step in range(8):
        x, y = torch.randn(16, 4), torch.randn(16, 1)
        reference.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        used_lr = reference.param_groups[0]["lr"]
        reference.step()
        scheduler.step()
        grads, _ = grad_and_value(lambda p, x=x, y=y: ((torch.func.functional_call(
            net, dict(p.flatten_keys(".").items()), x) - y) ** 2).mean())(params)
        params, opt, metrics = adamw_update(params, grads, opt, step, cfg)
        assert float(metrics["lr"]) == pytest.approx(used_lr, rel=1e-6)
    for name, p in net.named_parameters():
        torch.testing.assert_close(params.get(tuple(name.split("."))), p.detach(), atol=1e-6, rtol=1e-5)


def test_the_schedule_changes_the_update() -> None:
    """Same gradients, same moments: a step at the decayed lr moves the params by ratio times as much."""
    params = TensorDict({"w": torch.zeros(3)})
    grads = TensorDict({"w": torch.tensor([1.0, -2.0, 0.5])})
    flat = AdamWConfig(lr=0.1, max_grad_norm=None)
    decayed = AdamWConfig(lr=0.1, max_grad_norm=None, schedule="linear", decay_steps=1, final_lr_ratio=0.25)
    moved_flat, _, _ = adamw_update(params, grads, adamw_init(params), 5, flat)
    moved_decayed, _, _ = adamw_update(params, grads, adamw_init(params), 5, decayed)
    torch.testing.assert_close(moved_decayed["w"], 0.25 * moved_flat["w"])


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"schedule": "exponential"}, "schedule"),
        ({"schedule": "cosine"}, "decay_steps"),  # a decay needs a length
        ({"schedule": "linear", "decay_steps": 0}, "decay_steps"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"decay_steps": -5}, "decay_steps"),
        ({"final_lr_ratio": 1.5}, "final_lr_ratio"),
        ({"final_lr_ratio": -0.1}, "final_lr_ratio"),
    ],
)
def test_bad_schedule_fields_are_refused_by_name(fields: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        AdamWConfig(**fields)


def test_schedule_fields_come_through_command_line_overrides() -> None:
    cfg = load_config(OptimConfig, overrides=["world_model.schedule=cosine", "world_model.decay_steps=6000",
                                              "world_model.warmup_steps=100"])
    assert cfg.world_model.schedule == "cosine" and cfg.world_model.decay_steps == 6000
    assert cfg.world_model.warmup_steps == 100 and cfg.agent.schedule == "constant"
