"""Phase 2 (agent finetuning) and phase 3 (imagination) with a tiny world model: target alignment and masking,
rollouts, gradient flow, a return-improvement check and the continuous-action stability guard."""

from __future__ import annotations

import dataclasses
import functools
import json

import pytest
import torch
from helpers.frozen_target import frozen_target_loss
from helpers.scripts import load_experiment_script
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tensordict import TensorDict

from d4func.config import TransformerConfig
from d4func.distributions import (
    BoundedNormal,
    Categorical,
    bounded_normal_min_entropy,
    kl_divergence,
    twohot_log_prob,
    twohot_mean,
)
from d4func.dynamics import Dynamics, DynamicsConfig, actions_into_frames
from d4func.functional import apply, grad_and_value, init, template
from d4func.heads import AgentHeads, HeadsConfig, policy_dist
from d4func.imagination import (
    ImaginationConfig,
    Rollout,
    _slide,
    commit_frames,
    imagination_loss,
    imagine,
    world_model_fn,
)
from d4func.optim import AdamWConfig
from d4func.train.agent_step import (
    FINETUNE_TERMS,
    FinetuneConfig,
    agent_finetune_loss,
    agent_finetune_step,
    imagination_params,
    imagination_step,
    init_finetune_loss_rms,
    new_imagination_state,
)
from d4func.train.dynamics_step import dynamics_loss
from d4func.train.state import new_train_state
from d4func.transformer import empty_cache

torch.set_num_threads(1)
A_CONT, N_DISC = 2, 4


def make(discrete: bool, n_agent: int = 1, mtp: int = 3, seed: int = 0, steps: int = 1):
    dyn_cfg = DynamicsConfig(
        transformer=TransformerConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, time_every=2),
        latent_tokens=4, latent_dim=4, pack=2, n_registers=1, n_agent_tokens=n_agent,
        action_dim=0 if discrete else A_CONT, n_actions=N_DISC if discrete else 0, k_max=4, sampling_steps=steps,
    )
    model = template(Dynamics, dyn_cfg)
    heads = template(AgentHeads, HeadsConfig.for_dynamics(dyn_cfg, hidden=32, mtp=mtp, n_bins=33, bins_low=-3.0,
                                                          bins_high=3.0))
    params = TensorDict({"dynamics": init(model, seed), "heads": init(heads, seed + 1)})
    return model, heads, params


def toy_batch(discrete: bool, batch: int, steps: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random latents and uniformly random actions; the reward of a transition depends only on its action
    (discrete: +1 for action 0, -0.25 otherwise; continuous: the first action component)."""
    latents = torch.randn(batch, steps, 4, 4, generator=gen).tanh()
    if discrete:
        actions = torch.randint(0, N_DISC, (batch, steps), generator=gen)
        rewards = torch.where(actions == 0, 1.0, -0.25)
    else:
        actions = torch.rand(batch, steps, A_CONT, generator=gen) * 2 - 1
        rewards = actions[..., 0]
    return {"latents": latents, "actions": actions, "rewards": rewards}


def with_constant_heads(heads: AgentHeads, params: TensorDict, seed: int) -> TensorDict:
    """Policy and reward heads that ignore their input: zero output weights, random per-offset biases."""
    gen = torch.Generator().manual_seed(seed)
    params = params.clone()
    for name in ("policy", "reward"):
        weight = params["heads", name, "out", "weight"]
        params["heads", name, "out", "weight"] = torch.zeros_like(weight)
        params["heads", name, "out", "bias"] = torch.randn(weight.shape[0], generator=gen)
    return params


def episode_ends(batch: int, steps: int, ends: dict[int, int]) -> torch.Tensor:
    is_last = torch.zeros(batch, steps, dtype=torch.bool)
    for row, k in ends.items():
        is_last[row, k] = True
    return is_last


# --- phase 2: finetuning -----------------------------------------------------------------------------------------


@settings(max_examples=8, deadline=None)
@given(discrete=st.booleans(), k=st.integers(0, 5), seed=st.integers(0, 999))
@example(discrete=True, k=0, seed=840)  # the terms' changes cancel in the total loss there
def test_data_after_an_episode_end_changes_no_loss_term(discrete, k, seed):
    model, heads, params = make(discrete, mtp=3, seed=seed % 3)
    gen = torch.Generator().manual_seed(seed)
    batch = toy_batch(discrete, 3, 7, gen)
    batch["rewards"] = torch.randn(3, 7, generator=gen)
    is_last = episode_ends(3, 7, {0: k, 2: 6})
    other = {key: value.clone() for key, value in batch.items()}
    # Row 0 ends at frame k: its later frames, the actions into them and every reward from step k on (the reward
    # of the transition out of the last frame has no frame in the row) are outside the episode.
    other["latents"][0, k + 1 :] = torch.randn(other["latents"][0, k + 1 :].shape, generator=gen)
    other["actions"][0, k + 1 :] = other["actions"][0, k + 1 :].flip(0) if discrete else -other["actions"][0, k + 1 :]
    other["rewards"][0, k:] += 10.0

    def loss(b):
        return agent_finetune_loss(params, b["latents"], b["actions"], b["rewards"], is_last,
                                   torch.Generator().manual_seed(7), model=model, heads=heads)

    (l1, m1), (l2, m2) = loss(batch), loss(other)
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    for name in m1:
        torch.testing.assert_close(m1[name], m2[name], rtol=1e-5, atol=1e-6, msg=name)
    # Without the episode end the same change is seen (the check above can fail). The reward head starts at exactly
    # zero (uniform logits: every target costs the same), and a frame drawn at tau = 0 with a bootstrap target does
    # not depend on its clean latents, so give the reward head non-zero outputs: the shifted rewards[k] (a target
    # of frame k + 1) must then change the reward term. Terms, not the total: their changes can cancel in the sum
    # (seed 840, k = 0, discrete: dynamics -0.065, reward +0.067, total -2e-5).
    no_end = episode_ends(3, 7, {2: 6})
    live = params.clone()
    live["heads", "reward", "out", "weight"] = torch.randn(live["heads", "reward", "out", "weight"].shape,
                                                           generator=torch.Generator().manual_seed(seed))
    ma = agent_finetune_loss(live, batch["latents"], batch["actions"], batch["rewards"], no_end,
                             torch.Generator().manual_seed(7), model=model, heads=heads)[1]
    mb = agent_finetune_loss(live, other["latents"], other["actions"], other["rewards"], no_end,
                             torch.Generator().manual_seed(7), model=model, heads=heads)[1]
    assert not torch.allclose(ma["reward_ce"], mb["reward_ce"])


def _reference_terms(heads, params, batch, is_last, discrete, action_valid=None):
    """BC and reward losses of input-independent heads, from explicit loops over (row, step, offset)."""
    cfg = heads.cfg
    L = cfg.mtp
    policy_bias = params["heads", "policy", "out", "bias"].reshape(L, -1)
    reward_bias = params["heads", "reward", "out", "bias"].reshape(L, -1)
    bins = cfg.bins()
    actions, rewards = batch["actions"], batch["rewards"]
    rows, steps = rewards.shape
    nll, ce = [], []
    for b in range(rows):
        end = next((t for t in range(steps) if is_last[b, t]), steps - 1)  # last frame of the row's episode
        for t in range(end + 1):
            for n in range(L):
                took_action = action_valid is None or bool(action_valid[b, t + n]) if t + n < steps else False
                if t + n <= end and took_action:  # the action at frame t + n, within the episode
                    if discrete:
                        dist = Categorical(policy_bias[n], unimix=cfg.unimix)
                        nll.append(-dist.log_prob(actions[b, t + n]))
                    else:
                        loc, std = policy_bias[n].chunk(2)
                        dist = BoundedNormal.from_raw(loc, std, cfg.min_std, cfg.max_std)
                        nll.append(-dist.log_prob(actions[b, t + n]))
                if 1 <= t + n <= end:  # the reward into frame t + n: rewards[t + n - 1]
                    ce.append(-twohot_log_prob(reward_bias[n], bins, rewards[b, t + n - 1]))
    return torch.stack(nll).mean(), torch.stack(ce).mean()


@pytest.mark.parametrize("discrete", [True, False])
def test_bc_and_reward_targets_are_aligned_and_masked(discrete):
    model, heads, params = make(discrete, mtp=3)
    params = with_constant_heads(heads, params, seed=3)
    gen = torch.Generator().manual_seed(0)
    batch = toy_batch(discrete, 3, 6, gen)
    batch["rewards"] = torch.randn(3, 6, generator=gen)
    is_last = episode_ends(3, 6, {0: 2, 1: 5})
    _, metrics = agent_finetune_loss(params, batch["latents"], batch["actions"], batch["rewards"], is_last, gen,
                                     model=model, heads=heads)
    bc, reward = _reference_terms(heads, params, batch, is_last, discrete)
    torch.testing.assert_close(metrics["bc_nll"], bc)
    torch.testing.assert_close(metrics["reward_ce"], reward)


@pytest.mark.parametrize("discrete", [True, False])
def test_final_frame_rows_learn_the_last_reward_and_clone_no_action_there(discrete):
    from d4func.train.phases import replay_batch

    model, heads, params = make(discrete, mtp=3)
    gen = torch.Generator().manual_seed(1)
    rows, steps = 3, 5
    toy = toy_batch(discrete, rows, steps, gen)
    pixels = torch.rand(rows, steps + 1, 3, 4, 4, generator=gen)  # frames 0..T: the row's and the one after
    done = torch.zeros(rows, steps, 1, dtype=torch.bool)
    done[1, -1] = True  # row 1 ends its episode: its last reward is that episode's terminal one
    sample = TensorDict({"pixels": pixels[:, :-1], "action": toy["actions"],
                         "next": {"pixels": pixels[:, 1:], "reward": torch.randn(rows, steps, 1, generator=gen),
                                  "done": done}}, batch_size=[rows, steps])
    plain, final = replay_batch(sample), replay_batch(sample, final_frame=True)
    assert torch.equal(final["frames"], pixels) and torch.equal(final["frames"][:, :steps], plain["frames"])
    assert torch.equal(final["actions"][:, :steps], plain["actions"]) and not final["actions"][:, steps].any()
    assert torch.equal(final["rewards"][:, :steps], plain["rewards"])
    assert final["action_valid"].tolist() == [[True] * steps + [False]] * rows
    assert final["is_last"].tolist() == [[False] * steps + [row == 1] for row in range(rows)]
    with pytest.raises(ValueError, match="replay.final_frame=false"):
        replay_batch(sample.exclude(("next", "pixels")), final_frame=True)

    # The loss: no BC target at the appended frame, and the row's last reward is a target (at that frame).
    constant = with_constant_heads(heads, params, seed=3)
    latents = torch.randn(rows, steps + 1, 4, 4, generator=gen).tanh()
    _, metrics = agent_finetune_loss(constant, latents, final["actions"], final["rewards"], final["is_last"], gen,
                                     model=model, heads=heads, action_valid=final["action_valid"])
    bc, reward = _reference_terms(heads, constant, final, final["is_last"], discrete, final["action_valid"])
    torch.testing.assert_close(metrics["bc_nll"], bc)
    torch.testing.assert_close(metrics["reward_ce"], reward)

    def loss(actions, rewards):
        return agent_finetune_loss(params, latents, actions, rewards, final["is_last"],
                                   torch.Generator().manual_seed(7), model=model, heads=heads,
                                   action_valid=final["action_valid"])[0]

    live = params.clone()
    live["heads", "reward", "out", "weight"] = torch.randn(live["heads", "reward", "out", "weight"].shape,
                                                           generator=gen)
    params = live
    other_action = final["actions"].clone()
    other_action[:, steps] = 1 if discrete else 0.5  # the appended frame's placeholder action: read by nothing
    torch.testing.assert_close(loss(other_action, final["rewards"]), loss(final["actions"], final["rewards"]))
    last_reward = final["rewards"].clone()
    last_reward[:, steps - 1] += 5.0  # the reward of each row's last transition: now a target
    assert not torch.allclose(loss(final["actions"], last_reward), loss(final["actions"], final["rewards"]))
    with pytest.raises(ValueError, match="action_valid must be bool"):
        agent_finetune_loss(params, latents, final["actions"], final["rewards"], final["is_last"], gen, model=model,
                            heads=heads, action_valid=final["action_valid"][:, :steps])


@pytest.mark.parametrize("clean_context, forcing, loss_weight, self_forcing",
                         [(0.0, "diffusion", "ramp", 0.0), (0.5, "diffusion", "ramp", 0.0),
                          (0.0, "teacher", "ramp", 0.0), (0.0, "teacher", "uniform", 0.0),
                          (0.0, "diffusion", "uniform", 0.0), (0.0, "teacher", "uniform", 1.0),
                          (0.0, "teacher", "ramp", 0.5)])
def test_dynamics_term_equals_dynamics_loss_without_padding(clean_context, forcing, loss_weight, self_forcing):
    model, heads, params = make(True)
    model.cfg = dataclasses.replace(model.cfg, clean_context_fraction=clean_context, forcing=forcing,
                                    loss_weight=loss_weight, self_forcing=self_forcing)
    batch = toy_batch(True, 2, 5, torch.Generator().manual_seed(0))
    _, metrics = agent_finetune_loss(params, batch["latents"], batch["actions"], batch["rewards"], None,
                                     torch.Generator().manual_seed(4), model=model, heads=heads)
    actions_in, mask = actions_into_frames(batch["actions"])
    reference, reference_metrics = dynamics_loss(params["dynamics"], batch["latents"], actions_in,
                                                 torch.Generator().manual_seed(4), model=model, action_mask=mask)
    torch.testing.assert_close(metrics["dynamics_loss"], reference)
    # the split by target kind counts the same frames (teacher forcing: the target frames only)
    for name in ("flow_mse", "bootstrap_mse"):
        torch.testing.assert_close(metrics[name], reference_metrics[name], msg=name)


def test_clean_context_option_reaches_the_finetune_loss():
    model, heads, params = make(True)
    batch = toy_batch(True, 4, 5, torch.Generator().manual_seed(0))

    def dynamics_term(fraction: float) -> torch.Tensor:
        model.cfg = dataclasses.replace(model.cfg, clean_context_fraction=fraction)
        _, metrics = agent_finetune_loss(params, batch["latents"], batch["actions"], batch["rewards"], None,
                                         torch.Generator().manual_seed(4), model=model, heads=heads)
        return metrics["dynamics_loss"]

    assert not torch.equal(dynamics_term(0.0), dynamics_term(1.0))


def test_finetune_gradients_reach_dynamics_policy_and_reward_but_not_value():
    model, heads, params = make(False, mtp=2)
    # The reward output starts at zero (so only it would get gradient at first): make it non-zero.
    w = params["heads", "reward", "out", "weight"]
    params["heads", "reward", "out", "weight"] = 0.1 * torch.randn(w.shape, generator=torch.Generator().manual_seed(2))
    batch = toy_batch(False, 2, 5, torch.Generator().manual_seed(0))
    grads, _ = grad_and_value(agent_finetune_loss, has_aux=True)(
        params, batch["latents"], batch["actions"], batch["rewards"], None, torch.Generator().manual_seed(1),
        model=model, heads=heads)
    for key, grad in grads.items(include_nested=True, leaves_only=True):
        if key[:2] == ("heads", "value"):
            assert torch.count_nonzero(grad) == 0, key
        else:
            assert torch.count_nonzero(grad) > 0, key


def test_finetune_loss_weighs_each_term_by_its_own_coefficient():
    model, heads, params = make(False, mtp=2)
    batch = toy_batch(False, 2, 5, torch.Generator().manual_seed(0))
    cfg = FinetuneConfig(dynamics_coef=0.7, bc_coef=1.3, reward_coef=0.4)
    loss, metrics = agent_finetune_loss(params, batch["latents"], batch["actions"], batch["rewards"], None,
                                        torch.Generator().manual_seed(1), model=model, heads=heads, cfg=cfg)
    assert metrics["reward_ce"] > 0 and metrics["bc_nll"] != 0
    torch.testing.assert_close(loss, 0.7 * metrics["dynamics_loss"] + 1.3 * metrics["bc_nll"]
                               + 0.4 * metrics["reward_ce"])


def test_normalized_finetune_first_step_weighs_each_term_by_its_coefficient_over_its_own_value():
    """`FinetuneConfig.normalize`: the statistics are updated with the batch before dividing, so on the first step
    each term is divided by exactly its own value: the loss is the sum of the coefficients, and its gradient is the
    unnormalised loss's with each coefficient divided by its term's value. The reported terms stay raw."""
    model, heads, params = make(False, mtp=2)
    params = params.clone()
    w = params["heads", "reward", "out", "weight"]  # zero at init: give the reward term a gradient too
    params["heads", "reward", "out", "weight"] = 0.1 * torch.randn(w.shape, generator=torch.Generator().manual_seed(2))
    batch = toy_batch(False, 2, 5, torch.Generator().manual_seed(0))

    def finetune(p, cfg, loss_rms=None):
        return agent_finetune_loss(p, batch["latents"], batch["actions"], batch["rewards"], None,
                                   torch.Generator().manual_seed(1), model=model, heads=heads, cfg=cfg,
                                   loss_rms=loss_rms)

    coefs = {"dynamics_coef": 0.7, "bc_coef": 1.3, "reward_coef": 0.4}
    normalized = FinetuneConfig(**coefs, normalize=True)
    loss, metrics = finetune(params, normalized, init_finetune_loss_rms())
    _, raw = finetune(params, FinetuneConfig(**coefs))
    torch.testing.assert_close(loss, torch.tensor(0.7 + 1.3 + 0.4))
    for name in ("dynamics_loss", "bc_nll", "reward_ce"):
        torch.testing.assert_close(metrics[name], raw[name], msg=name)
    assert set(metrics["loss_rms"].keys()) == set(FINETUNE_TERMS)
    assert all(metrics["loss_rms"][name, "count"].item() == 1 for name in FINETUNE_TERMS)

    grads = torch.func.grad(lambda p: finetune(p, normalized, init_finetune_loss_rms())[0])(params)
    by_value = FinetuneConfig(dynamics_coef=0.7 / float(raw["dynamics_loss"]), bc_coef=1.3 / float(raw["bc_nll"]),
                              reward_coef=0.4 / float(raw["reward_ce"]))
    reference = torch.func.grad(lambda p: finetune(p, by_value)[0])(params)
    for key, grad in grads.items(include_nested=True, leaves_only=True):
        torch.testing.assert_close(grad, reference[key], atol=1e-6, rtol=1e-4, msg=str(key))


def test_normalized_finetune_steps_keep_the_running_statistics_and_need_them():
    model, heads, params = make(True, mtp=2)
    gen = torch.Generator().manual_seed(0)
    cfg = FinetuneConfig(normalize=True, rms_decay=0.9)
    state = new_train_state(params, with_ema=False)
    with pytest.raises(KeyError, match="init_finetune_loss_rms"):
        agent_finetune_step(state, toy_batch(True, 4, 5, gen), gen, model=model, heads=heads, opt=AdamWConfig(),
                            cfg=cfg)
    batch = toy_batch(True, 4, 5, gen)
    with pytest.raises(ValueError, match="normalize=True needs loss_rms"):
        agent_finetune_loss(params, batch["latents"], batch["actions"], batch["rewards"], None, gen, model=model,
                            heads=heads, cfg=cfg)
    with pytest.raises(ValueError, match="normalize=False needs loss_rms"):
        agent_finetune_loss(params, batch["latents"], batch["actions"], batch["rewards"], None, gen, model=model,
                            heads=heads, loss_rms=init_finetune_loss_rms())

    state["loss_rms"] = init_finetune_loss_rms()
    seen = {name: [] for name in FINETUNE_TERMS}
    for _ in range(3):
        state, metrics = agent_finetune_step(state, toy_batch(True, 4, 5, gen), gen, model=model, heads=heads,
                                             opt=AdamWConfig(lr=1e-2), cfg=cfg)
        for name, metric in zip(FINETUNE_TERMS, ("dynamics_loss", "bc_nll", "reward_ce"), strict=True):
            seen[name].append(float(metrics[metric]))
        assert "loss_rms" not in metrics  # the statistics go to the state, not to the logs
    for name in FINETUNE_TERMS:
        ema = 0.0
        for value in seen[name]:
            ema = 0.9 * ema + 0.1 * value**2
        assert state["loss_rms", name, "count"].item() == 3
        assert state["loss_rms", name, "mean_sq"].item() == pytest.approx(ema, rel=1e-5)
    with pytest.raises(ValueError, match="rms_decay must lie in"):
        FinetuneConfig(normalize=True, rms_decay=1.0)


def test_finetune_dynamics_gradient_stops_at_the_bootstrap_target_and_bc_trains_the_transformer():
    """With only the dynamics term, the gradient is that of shortcut forcing against targets from a frozen copy
    (the paper's sg on the bootstrap target). With only behaviour cloning, the gradient reaches the dynamics
    transformer through the agent tokens: phase 2 shapes the world model's representation for the policy."""
    model, heads, params = make(False, mtp=2)
    params = params.clone()
    w = params["heads", "policy", "out", "weight"]  # the fresh output layer is zero: no gradient would pass it
    params["heads", "policy", "out", "weight"] = 0.3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(3))
    batch = toy_batch(False, 2, 5, torch.Generator().manual_seed(0))
    frozen = params["dynamics"].clone()
    actions_in, mask = actions_into_frames(batch["actions"])

    def finetune(p, cfg, aux=False):
        loss, metrics = agent_finetune_loss(p, batch["latents"], batch["actions"], batch["rewards"], None,
                                            torch.Generator().manual_seed(3), model=model, heads=heads, cfg=cfg)
        return (loss, metrics) if aux else loss

    assert finetune(params, FinetuneConfig(), aux=True)[1]["bootstrap_mse"] > 0  # these draws hold bootstrap frames

    only_dynamics = torch.func.grad(finetune)(params, FinetuneConfig(bc_coef=0.0, reward_coef=0.0))
    reference = torch.func.grad(frozen_target_loss)(params["dynamics"], model, frozen, batch["latents"], actions_in,
                                                    mask, 3)
    for key, grad in only_dynamics["dynamics"].items(include_nested=True, leaves_only=True):
        torch.testing.assert_close(grad, reference[key], atol=1e-6, rtol=1e-5, msg=str(key))
    only_bc = torch.func.grad(finetune)(params, FinetuneConfig(dynamics_coef=0.0, reward_coef=0.0))
    transformer = only_bc["dynamics", "transformer"]
    assert sum(int(torch.count_nonzero(g)) for g in transformer.values(include_nested=True, leaves_only=True)) > 0


# --- phase 3: rollouts ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("discrete", "n_agent", "steps"), [(True, 1, 1), (False, 2, 2)])
def test_rollout_shapes_and_reproducibility(discrete, n_agent, steps):
    model, heads, params = make(discrete, n_agent=n_agent, steps=steps)
    batch = toy_batch(discrete, 3, 4, torch.Generator().manual_seed(0))
    rollout = imagine(model, heads, params, batch["latents"], batch["actions"], torch.Generator().manual_seed(1),
                      horizon=5)
    assert rollout.features.shape == (3, 6, n_agent, 32)
    assert rollout.actions.shape == ((3, 5) if discrete else (3, 5, A_CONT))
    assert rollout.rewards.shape == rollout.continues.shape == (3, 5)
    assert rollout.latents.shape == (3, 5, 4, 4)
    assert not rollout.features.requires_grad and torch.isfinite(rollout.latents).all()
    if discrete:
        assert rollout.actions.dtype == torch.int64 and 0 <= rollout.actions.min() and rollout.actions.max() < N_DISC
    else:
        assert rollout.actions.abs().max() <= 1.0
    again = imagine(model, heads, params, batch["latents"], batch["actions"], torch.Generator().manual_seed(1),
                    horizon=5)
    torch.testing.assert_close(again.latents, rollout.latents)
    other = imagine(model, heads, params, batch["latents"], batch["actions"], torch.Generator().manual_seed(2),
                    horizon=5)
    assert not torch.allclose(other.latents, rollout.latents)


def test_commit_frames_signal_level_spans_clean_frames_to_pure_noise():
    """The default level is tau_ctx; at 1 the agent tokens read the clean frames whatever the noise, at 0 only the
    noise: the frames change nothing (the diagnostic experiments/bc_probe.py reads the BC head with)."""
    model, _, params = make(False)
    cfg = model.cfg
    batch = toy_batch(False, 2, 4, torch.Generator().manual_seed(0))
    actions_in, mask_in = actions_into_frames(batch["actions"])
    model_fn = world_model_fn(model, params["dynamics"])

    def agent(latents, seed, **level):
        out, _ = commit_frames(model_fn, cfg, latents, actions_in, mask_in, empty_cache(2),
                               torch.Generator().manual_seed(seed), **level)
        return out

    other = batch["latents"].flip(0)
    torch.testing.assert_close(agent(batch["latents"], 1), agent(batch["latents"], 1, signal_level=cfg.context_signal))
    torch.testing.assert_close(agent(batch["latents"], 1, signal_level=1.0), agent(batch["latents"], 2,
                                                                                    signal_level=1.0))
    torch.testing.assert_close(agent(batch["latents"], 1, signal_level=0.0), agent(other, 1, signal_level=0.0))
    assert not torch.allclose(agent(batch["latents"], 1, signal_level=1.0), agent(other, 1, signal_level=1.0))
    assert not torch.allclose(agent(batch["latents"], 1), agent(batch["latents"], 2))
    with pytest.raises(ValueError, match="signal_level must be in \\[0, 1\\], got 1.5"):
        agent(batch["latents"], 1, signal_level=1.5)


def test_a_window_cuts_the_context_as_generation_does():
    """With window W, imagination keeps the last W - 1 context frames beside the first imagined one, as
    `sampler.generate` does: a frame older than that changes nothing, the newest context frame does."""
    model, heads, params = make(False)
    batch = toy_batch(False, 2, 4, torch.Generator().manual_seed(0))

    def rollout(latents):
        return imagine(model, heads, params, latents, batch["actions"], torch.Generator().manual_seed(1), horizon=3,
                       window=3)

    base = rollout(batch["latents"])
    old, new = batch["latents"].clone(), batch["latents"].clone()
    old[:, 0] += 1.0
    new[:, -1] += 1.0
    torch.testing.assert_close(rollout(old).features, base.features)
    torch.testing.assert_close(rollout(old).latents, base.latents)
    assert not torch.allclose(rollout(new).features[:, 0], base.features[:, 0])


def _biased_policy(params: TensorDict, heads: AgentHeads, bias: torch.Tensor) -> TensorDict:
    params = params.clone()
    weight = params["heads", "policy", "out", "weight"]
    params["heads", "policy", "out", "weight"] = torch.zeros_like(weight)
    params["heads", "policy", "out", "bias"] = bias.repeat(heads.cfg.mtp)
    return params


def _favouring(params: TensorDict, heads: AgentHeads, action: int) -> TensorDict:
    """A discrete policy that ignores its input and puts nearly all its mass on `action`."""
    bias = torch.full((N_DISC,), -30.0)
    bias[action] = 30.0
    return _biased_policy(params, heads, bias)


def test_rollout_actions_come_from_the_policy_and_drive_the_world_model():
    model, heads, params = make(True)
    batch = toy_batch(True, 4, 3, torch.Generator().manual_seed(0))
    latents = {}
    for favourite in (1, 3):
        # Sampling (not the mode): unimix leaves every other action 0.25 % per step, so allow a stray one.
        rollout = imagine(model, heads, _favouring(params, heads, favourite), batch["latents"], batch["actions"],
                          torch.Generator().manual_seed(5), horizon=6)
        assert (rollout.actions == favourite).float().mean() > 0.95
        latents[favourite] = rollout.latents
    # Same noise, different actions: the imagined frames differ, so the actions reach the dynamics model.
    assert not torch.allclose(latents[1], latents[3])

    model, heads, params = make(False)
    batch = toy_batch(False, 4, 3, torch.Generator().manual_seed(0))
    bias = torch.tensor([8.0, -8.0, -8.0, -8.0])  # loc -> (+1, -1), std -> min_std
    rollout = imagine(model, heads, _biased_policy(params, heads, bias), batch["latents"], batch["actions"],
                      torch.Generator().manual_seed(5), horizon=6)
    assert (rollout.actions[..., 0] > 0.5).all() and (rollout.actions[..., 1] < -0.5).all()


def test_rollout_window_forgets_frames_beyond_it_and_a_wide_window_changes_nothing():
    model, heads, params = make(True)
    batch = toy_batch(True, 3, 4, torch.Generator().manual_seed(0))
    params = _favouring(params, heads, 2)  # greedy: the same action whatever the frames

    def roll(context, window):
        return imagine(model, heads, params, context, batch["actions"], torch.Generator().manual_seed(3), horizon=5,
                       greedy=True, window=window)

    changed = batch["latents"].clone()
    changed[:, 0] += 1.0
    unbounded = roll(batch["latents"], None)
    torch.testing.assert_close(roll(batch["latents"], 4 + 5).latents, unbounded.latents)
    assert not torch.allclose(roll(changed, None).latents, unbounded.latents)
    # With a window of 3 frames the first imagined frame already reads only context frames 2 and 3.
    narrow, narrow_changed = roll(batch["latents"], 3), roll(changed, 3)
    torch.testing.assert_close(narrow_changed.latents, narrow.latents)
    torch.testing.assert_close(narrow_changed.rewards, narrow.rewards)
    assert not torch.allclose(narrow.latents, unbounded.latents)
    with pytest.raises(ValueError, match="window must be >= 2"):
        roll(batch["latents"], 1)


def test_commit_frames_renoises_to_the_context_level_with_the_smallest_step():
    """The agent observes a frame as the sampler keeps its context (paper Sec. 3.2): re-noised to tau_ctx with the
    generator's next draw, and with step size d_min."""
    model, heads, params = make(True)
    cfg = model.cfg
    latents = toy_batch(True, 2, 3, torch.Generator().manual_seed(0))["latents"]
    calls = []

    def recording(z, tau, d, actions=None, mask=None, cache=None):
        calls.append((z, tau, d))
        return None, torch.zeros(z.shape[0], z.shape[1], 1, 32), cache

    commit_frames(recording, cfg, latents, None, None, None, torch.Generator().manual_seed(7))
    z, tau, d = calls[0]
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(7)) * cfg.noise_scale
    torch.testing.assert_close(tau, torch.full((2, 3), cfg.context_signal))
    torch.testing.assert_close(d, torch.full((2, 3), cfg.d_min))
    torch.testing.assert_close(z, cfg.context_signal * latents + (1 - cfg.context_signal) * noise)


def test_a_window_keeps_the_last_frames_and_the_actions_into_them():
    """With a context of 4 frames and a window of 3, imagination starts from frames 2 and 3 and the actions into
    them (taken after frames 1 and 2): frames 0-1 and the action after frame 0 change nothing, the action after
    frame 2 changes the first policy feature. A context exactly as long as the window is cut too (the window holds
    the frame being generated). An action mask of False hides its action; imagined continuations are all 1."""
    model, heads, params = make(False)
    batch = toy_batch(False, 2, 4, torch.Generator().manual_seed(0))

    def first_feature(latents, actions, window=3, mask=None):
        rollout = imagine(model, heads, params, latents, actions, torch.Generator().manual_seed(3), horizon=2,
                          window=window, context_action_mask=mask)
        assert (rollout.continues == 1).all()
        return rollout.features[:, 0]

    base = first_feature(batch["latents"], batch["actions"])
    early = batch["latents"].clone()
    early[:, :2] += 1.0
    torch.testing.assert_close(first_feature(early, batch["actions"]), base)
    for index, matters in ((0, False), (1, True), (2, True)):
        changed = batch["actions"].clone()
        changed[:, index] = -changed[:, index]
        moved = not torch.allclose(first_feature(batch["latents"], changed), base, atol=1e-5)
        assert moved == matters, index
    three = batch["latents"][:, 1:]
    shifted = three.clone()
    shifted[:, 0] += 1.0
    torch.testing.assert_close(first_feature(shifted, batch["actions"][:, 1:]),
                               first_feature(three, batch["actions"][:, 1:]))
    # Between imagined frames the cache slides to window - 1 steps, so each new frame sees a window in all.
    cache = commit_frames(world_model_fn(model, params["dynamics"]), model.cfg, batch["latents"], None, None,
                          empty_cache(2), torch.Generator().manual_seed(0))[1]
    assert _slide(cache, 3)["valid"].shape[1] == 2 and _slide(cache, None)["valid"].shape[1] == 4
    hidden = torch.zeros(2, 4, dtype=torch.bool)
    changed = batch["actions"].clone()
    changed[:, 2] = -changed[:, 2]
    torch.testing.assert_close(first_feature(batch["latents"], changed, mask=hidden),
                               first_feature(batch["latents"], batch["actions"], mask=hidden))


def test_imagination_gradients_reach_only_policy_and_value():
    model, heads, params = make(True, mtp=2)
    batch = toy_batch(True, 3, 3, torch.Generator().manual_seed(0))
    # Non-zero reward and value outputs, so that a leak through rewards or returns would show.
    params = params.clone()
    gen = torch.Generator().manual_seed(1)
    for name in ("reward", "value"):
        w = params["heads", name, "out", "weight"]
        params["heads", name, "out", "weight"] = 0.3 * torch.randn(w.shape, generator=gen)
    prior = params["heads", "policy"].clone().apply(lambda x: x + 0.05)

    def loss(p):
        rollout = imagine(model, heads, p, batch["latents"], batch["actions"], torch.Generator().manual_seed(2),
                          horizon=3)
        return imagination_loss(p["heads"], rollout, heads=heads, prior_policy=prior,
                                slow_value=params["heads", "value"], cfg=ImaginationConfig(horizon=3))

    grads, (_, metrics) = grad_and_value(loss, has_aux=True)(params)
    assert metrics["kl"] > 0
    for key, grad in grads.items(include_nested=True, leaves_only=True):
        if key[:2] in (("heads", "policy"), ("heads", "value")):
            assert torch.count_nonzero(grad) > 0, key
        else:
            assert torch.count_nonzero(grad) == 0, key


def test_centered_advantages_give_pmpo_both_signs_while_the_value_lags_and_leave_the_value_loss_alone():
    model, heads, params = make(True)
    batch = toy_batch(True, 6, 3, torch.Generator().manual_seed(0))
    params = params.clone()
    gen = torch.Generator().manual_seed(1)
    # Rewards well above 0 and a value head that still predicts 0: every plain advantage is positive.
    params["heads", "reward", "out", "weight"] = 0.3 * torch.randn(params["heads", "reward", "out", "weight"].shape,
                                                                   generator=gen)
    params["heads", "value", "out", "weight"].zero_()
    params["heads", "value", "out", "bias"].zero_()
    rollout = imagine(model, heads, params, batch["latents"], batch["actions"], torch.Generator().manual_seed(2),
                      horizon=4)
    rollout = rollout._replace(rewards=rollout.rewards.abs() + 1.0)

    def loss(center: bool):
        return imagination_loss(params["heads"], rollout, heads=heads, prior_policy=params["heads", "policy"],
                                slow_value=params["heads", "value"],
                                cfg=ImaginationConfig(horizon=4, center_advantages=center))

    _, plain = loss(False)
    _, centered = loss(True)
    assert plain["frac_pos"] == 1.0 == centered["uncentered_frac_pos"]
    assert centered["uncentered_adv_mean"] == pytest.approx(float(plain["adv_mean"]))
    assert 0.0 < centered["frac_pos"] < 1.0 and 0.0 < centered["frac_neg"] < 1.0
    assert abs(float(centered["adv_mean"])) < 1e-5
    assert centered["value_loss"] == plain["value_loss"] and centered["imagined_return"] == plain["imagined_return"]


def test_imagination_loss_equals_its_terms_written_out_with_explicit_indices():
    """The whole phase-3 loss against a by-hand rebuild: R_t = r_t + gamma c_t ((1 - lam) V_{t+1} + lam R_{t+1}),
    R_H = V_H; A_t = R_t - V_t; weights w_t = prod_{i<t} c_i; PMPO on log pi(a_t | h_t) with the reverse KL to the
    prior at the acting states h_0..h_{H-1}; twohot CE of V_t towards R_t and, at the same states, towards the slow
    value's mean. gamma != lam, a termination mid-rollout and non-default coefficients, so swapping gamma and lam,
    comparing with V_{t+1}, reading the slow value one step late, not shifting the continuation weights or dropping a
    coefficient each changes the value."""
    model, heads, params = make(False)
    gen = torch.Generator().manual_seed(0)
    params = params.clone()
    for name in ("value", "policy"):  # heads whose outputs vary with the state
        w = params["heads", name, "out", "weight"]
        params["heads", name, "out", "weight"] = 0.5 * torch.randn(w.shape, generator=gen)
    slow = params["heads", "value"].clone().apply(lambda x: x + 0.1 * torch.randn(x.shape, generator=gen))
    prior = params["heads", "policy"].clone().apply(lambda x: x + 0.2 * torch.randn(x.shape, generator=gen))
    batch, horizon = 3, 4
    features = torch.randn(batch, horizon + 1, 1, 32, generator=gen)
    rollout = Rollout(features=features, actions=torch.rand(batch, horizon, A_CONT, generator=gen) * 1.8 - 0.9,
                      rewards=torch.randn(batch, horizon, generator=gen),
                      continues=torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 1.0]]),
                      latents=torch.zeros(batch, horizon, 4, 4))
    cfg = ImaginationConfig(horizon=horizon, gamma=0.8, lam=0.6, alpha=0.4, beta=0.2, slow_reg=0.5, policy_coef=0.7,
                            value_coef=1.3)
    loss, _ = imagination_loss(params["heads"], rollout, heads=heads, prior_policy=prior, slow_value=slow, cfg=cfg)

    bins = heads.cfg.bins(features.device)
    value_logits = apply(heads.value, params["heads", "value"], features)
    values = twohot_mean(value_logits, bins)
    r, c = rollout.rewards, rollout.continues
    returns = [values[:, horizon]]
    for t in reversed(range(horizon)):
        returns.insert(0, r[:, t] + cfg.gamma * c[:, t] * ((1 - cfg.lam) * values[:, t + 1] + cfg.lam * returns[0]))
    returns = torch.stack(returns[:horizon], dim=1)
    advantages = returns - values[:, :horizon]
    weights = torch.stack([c[:, :t].prod(dim=1) for t in range(horizon)], dim=1)
    policy = policy_dist(heads, params["heads", "policy"], features[:, :horizon])
    log_probs = policy.log_prob(rollout.actions)
    kl = kl_divergence(policy, policy_dist(heads, prior, features[:, :horizon]))
    pos, neg = weights * (advantages > 0), weights * (advantages < 0)
    policy_loss = (-cfg.alpha * (pos * log_probs).sum() / pos.sum() + (1 - cfg.alpha) * (neg * log_probs).sum()
                   / neg.sum() + cfg.beta * (weights * kl).sum() / weights.sum())
    slow_mean = twohot_mean(apply(heads.value, slow, features[:, :horizon]), bins)
    ce = -twohot_log_prob(value_logits[:, :horizon], bins, returns)
    ce_slow = -twohot_log_prob(value_logits[:, :horizon], bins, slow_mean)
    value_term = ((weights * ce).sum() + cfg.slow_reg * (weights * ce_slow).sum()) / weights.sum()
    assert pos.sum() > 0 and neg.sum() > 0 and weights.min() == 0  # both PMPO sets and a termination are exercised
    torch.testing.assert_close(loss, cfg.policy_coef * policy_loss + cfg.value_coef * value_term, atol=1e-5,
                               rtol=1e-5)


def test_an_imagined_frame_is_denoised_under_its_own_action():
    """With a horizon of 1 the only imagined frame differs between two policies fixed on different actions: the
    action reaches the denoising calls of its frame, not only the commit that later frames see."""
    model, heads, params = make(True)
    batch = toy_batch(True, 4, 3, torch.Generator().manual_seed(0))
    frames = {}
    for favourite in (0, 2):
        rollout = imagine(model, heads, _favouring(params, heads, favourite), batch["latents"], batch["actions"],
                          torch.Generator().manual_seed(5), horizon=1, greedy=True)
        assert (rollout.actions == favourite).all()
        frames[favourite] = rollout.latents[:, 0]
    assert not torch.allclose(frames[0], frames[2], atol=1e-4)


def test_the_slow_value_moves_by_one_minus_its_decay_towards_the_new_value_params():
    model, heads, params = make(False)
    batch = toy_batch(False, 3, 3, torch.Generator().manual_seed(0))
    state = new_imagination_state(params)
    state["ema", "value"] = state["ema", "value"].apply(lambda x: x + 0.1)  # slow value apart from the value head
    cfg = ImaginationConfig(horizon=3, slow_decay=0.9)
    new_state, _ = imagination_step(state, {"latents": batch["latents"], "actions": batch["actions"]},
                                    torch.Generator().manual_seed(1), model=model, heads=heads,
                                    opt=AdamWConfig(lr=1e-2), cfg=cfg)
    expected = state["ema", "value"].apply(lambda old, new: 0.9 * old + 0.1 * new, new_state["params", "value"])
    for key, value in new_state["ema", "value"].items(include_nested=True, leaves_only=True):
        torch.testing.assert_close(value, expected[key], msg=str(key))


def test_imagination_step_trains_only_policy_and_value():
    model, heads, params = make(False)
    batch = toy_batch(False, 3, 3, torch.Generator().manual_seed(0))
    state = new_imagination_state(params)
    assert set(state["params"].keys()) == {"policy", "value"}
    new_state, metrics = imagination_step(state, {"latents": batch["latents"], "actions": batch["actions"]},
                                          torch.Generator().manual_seed(1), model=model, heads=heads,
                                          opt=AdamWConfig(lr=1e-2), cfg=ImaginationConfig(horizon=3))
    assert metrics["kl"] < 1e-6  # the prior is the policy it starts from (0 up to rounding)
    for name in ("entropy", "kl", "adv_mean", "adv_std", "adv_absmax", "frac_pos", "frac_neg", "value_loss",
                 "imagined_return", "grad_norm"):
        assert torch.isfinite(metrics[name]), name
    assert (new_state["frozen"] == state["frozen"]).all()
    assert not torch.equal(new_state["params", "policy", "inp", "weight"], state["params", "policy", "inp", "weight"])
    assert not torch.equal(new_state["ema", "value", "out", "weight"], state["ema", "value", "out", "weight"])
    full = imagination_params(new_state)
    assert (full["dynamics"] == params["dynamics"]).all()
    assert (full["heads", "reward"] == params["heads", "reward"]).all()


# --- phase 2 -> phase 3 on a toy task ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def finetuned_toy(discrete: bool):
    """Phase 2 on toy data whose reward depends only on the action (`toy_batch`): the reward head learns it."""
    model, heads, params = make(discrete, mtp=2)
    gen = torch.Generator().manual_seed(0)
    state = new_train_state(params, with_ema=False)
    first = last = None
    for _ in range(60 if discrete else 100):
        state, metrics = agent_finetune_step(state, toy_batch(discrete, 16, 8, gen), gen, model=model, heads=heads,
                                             opt=AdamWConfig(lr=1e-2), cfg=FinetuneConfig())
        first = metrics["reward_ce_0"] if first is None else first
        last = metrics["reward_ce_0"]
    return model, heads, state["params"], float(first), float(last)


def expected_imagined_return(model, heads, params, discrete: bool) -> float:
    """Mean undiscounted imagined reward sum of the sampling policy over 64 fixed contexts and a fixed seed."""
    contexts = toy_batch(discrete, 64, 2, torch.Generator().manual_seed(123))
    rollout = imagine(model, heads, params, contexts["latents"], contexts["actions"],
                      torch.Generator().manual_seed(321), horizon=3)
    return float(rollout.rewards.sum(1).mean())


@pytest.mark.parametrize("discrete", [True, False])
def test_imagination_training_raises_expected_imagined_return(discrete):
    model, heads, params, ce_first, ce_last = finetuned_toy(discrete)
    assert ce_last < 0.5 * ce_first  # phase 2 learned the reward
    state = new_imagination_state(params)
    before = expected_imagined_return(model, heads, imagination_params(state), discrete)
    gen = torch.Generator().manual_seed(1)
    cfg = ImaginationConfig(horizon=3, gamma=0.9)
    for _ in range(20):
        batch = toy_batch(discrete, 16, 2, gen)
        state, metrics = imagination_step(state, {"latents": batch["latents"], "actions": batch["actions"]}, gen,
                                          model=model, heads=heads, opt=AdamWConfig(lr=5e-3), cfg=cfg)
    after = expected_imagined_return(model, heads, imagination_params(state), discrete)
    # Best possible: 3 (discrete, always action 0) or about 3 (continuous, first component at +1); the BC prior,
    # fitted to uniform actions, starts near 0.2 (discrete) and 0 (continuous).
    # (Over init seeds 0-4: discrete 0.12-0.17 -> 2.75-2.87, continuous -0.17-0.11 -> 1.67-2.34.)
    assert after > before + 1.0, (before, after)
    assert metrics["kl"] > 0


def test_continuous_pmpo_stays_bounded_and_the_entropy_floor_acts():
    """Issue 5, point 5: without a KL anchor and with a large step size, PMPO on continuous actions keeps finite
    losses and a std within the bounds (the entropy cannot fall below the bound's floor); the optional entropy
    floor of `ImaginationConfig` keeps the entropy higher than the same run without it."""
    model, heads, params, _, _ = finetuned_toy(False)
    min_entropy = bounded_normal_min_entropy(heads.cfg.min_std, A_CONT)
    entropies = {}
    for floor in (None, 1.0):
        state = new_imagination_state(params)
        gen = torch.Generator().manual_seed(2)
        cfg = ImaginationConfig(horizon=3, gamma=0.9, beta=0.0, entropy_floor=floor, entropy_floor_coef=10.0)
        for _ in range(12):
            batch = toy_batch(False, 16, 2, gen)
            state, metrics = imagination_step(state, {"latents": batch["latents"], "actions": batch["actions"]},
                                              gen, model=model, heads=heads, opt=AdamWConfig(lr=3e-2), cfg=cfg)
            assert all(torch.isfinite(v) for v in metrics.values())
            assert metrics["entropy"] >= min_entropy - 1e-4
        rollout = imagine(model, heads, imagination_params(state), batch["latents"], batch["actions"], gen, horizon=3)
        policy = policy_dist(heads, state["params", "policy"], rollout.features)
        assert (policy.std >= heads.cfg.min_std - 1e-6).all() and (policy.std <= heads.cfg.max_std + 1e-6).all()
        entropies[floor] = float(policy.entropy().mean())
    assert entropies[None] < 0.5, entropies  # PMPO alone sharpens the policy a lot here...
    assert entropies[1.0] > entropies[None] + 0.5, entropies  # ...and the floor holds it up


# --- issue 5, point 6: the toy task of experiments/imagination_toy.py -----------------------------------------------


def test_toy_experiment_runs_end_to_end():
    toy = load_experiment_script("imagination_toy")
    cfg = dataclasses.replace(toy.ToyConfig(), n_episodes=16, finetune_steps=3, value_warmup=1, imagine_steps=2,
                              imagine_batch=4, eval_envs=8)
    lines = []
    summary = toy.run(cfg, seed=0, log=lines.append)
    assert {"random", "behaviour", "oracle", "bc", "imagination", "gain"} <= summary.keys()
    assert summary["oracle"]["mean"] > summary["random"]["mean"]  # the task rewards heading for B
    assert [json.loads(line)["phase"] for line in lines][-1] == "summary"
    # The environment: B is the only rewarded cell, the behaviour data heads mostly for A.
    gen = torch.Generator().manual_seed(0)
    data = toy.collect(cfg, 256, gen)
    assert data["latents"].shape == (256, cfg.episode_len, 3, cfg.grid + cfg.height)
    assert 0.15 < data["to_b"].float().mean() < 0.35


def test_toy_gain_is_imagination_minus_bc_paired_and_the_warmup_trains_the_value_alone(monkeypatch):
    toy = load_experiment_script("imagination_toy")
    cfg = dataclasses.replace(toy.ToyConfig(), n_episodes=16, finetune_steps=1, value_warmup=2, imagine_steps=2,
                              imagine_batch=4, eval_envs=4, eval_every=100)
    # Real returns stubbed per evaluation: BC's (the first two calls, sample and greedy), then imagination's.
    bc, imagined = torch.tensor([0.0, 1.0, 0.0, 3.0]), torch.tensor([2.0, 2.0, 1.0, 2.0])
    calls = []

    def stub_returns(*args):
        calls.append(args)
        return bc if len(calls) <= 2 else imagined

    monkeypatch.setattr(toy, "agent_returns", stub_returns)
    policy_coefs = []
    real_step = toy.imagination_step

    def recording_step(state, batch, gen, *, cfg, **kwargs):
        policy_coefs.append(cfg.policy_coef)
        return real_step(state, batch, gen, cfg=cfg, **kwargs)

    monkeypatch.setattr(toy, "imagination_step", recording_step)
    summary = toy.run(cfg, seed=0, log=lambda line: None)
    for mode in ("sample", "greedy"):
        assert summary["gain"][mode] == toy.mean_and_se(imagined - bc)  # per episode, same start states
        assert summary["gain"][mode]["mean"] == 0.75
    assert policy_coefs == [0.0, 0.0] + [cfg.imagination.policy_coef] * 2
    assert cfg.imagination.policy_coef > 0


def test_toy_oracle_walks_to_the_rewarded_target_and_stays():
    toy = load_experiment_script("imagination_toy")
    cfg = toy.ToyConfig()
    # On the corridor any start is at most grid - 1 moves from B; every later step on B pays 1.
    returns = toy.scripted_returns(cfg, "oracle", 256, torch.Generator().manual_seed(0))
    assert returns.min() >= cfg.episode_len - (cfg.grid - 1)


@pytest.mark.slow
def test_imagination_beats_bc_on_the_toy_task():
    """`python experiments/imagination_toy.py --seed 0` (about 5 minutes on one busy CPU core): the policy after
    imagination training earns more real return than the BC policy it started from, by more than three standard
    errors of the paired per-episode difference (same 512 start states)."""
    toy = load_experiment_script("imagination_toy")
    summary = toy.run(toy.ToyConfig(), seed=0, log=lambda line: None)
    for mode in ("sample", "greedy"):
        gain = summary["gain"][mode]
        assert gain["mean"] > 3 * gain["se"], (mode, summary)
