"""Self-forcing (`DynamicsConfig.self_forcing`, `objectives.self_forced_latents`): which frame is replaced, by what
sample, read through which history, and that it reaches both training losses and is refused without teacher
forcing."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from d4func.dynamics import Dynamics, DynamicsConfig
from d4func.functional import init, template
from d4func.objectives import add_noise, self_forced_latents, teacher_forcing_levels
from d4func.train.dynamics_step import dynamics_loss
from d4func.transformer import TransformerConfig


def _teacher_rows(batch: int, frames: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d, tau, counted) of teacher forcing for `batch` rows of `frames` frames."""
    gen = torch.Generator().manual_seed(seed)
    d = torch.full((batch, frames), 0.5)
    tau = torch.rand(batch, frames, generator=gen)
    return teacher_forcing_levels(d, tau, 0.75, 0.25, gen)


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 6), frames=st.integers(1, 7), fraction=st.sampled_from([0.0, 0.3, 1.0]),
       steps=st.sampled_from([1, 2, 4]), seed=st.integers(0, 1000))
def test_only_the_frame_before_the_target_of_chosen_rows_becomes_the_models_sample(batch, frames, fraction, steps,
                                                                                  seed):
    d, tau, counted = _teacher_rows(batch, frames, seed)
    z_clean = torch.randn(batch, frames, 3, 2, generator=torch.Generator().manual_seed(seed + 1))
    z_tau = add_noise(z_clean, tau, torch.randn_like(z_clean))
    constant = torch.full_like(z_clean, 7.0)
    # A model whose prediction is a constant: K Euler steps from noise end exactly on it (the last step has size
    # 1 - its level), as the sampler's do.
    out = self_forced_latents(lambda z, t, s: constant, z_clean, z_tau, tau, d, counted, fraction, steps,
                              torch.Generator().manual_seed(seed + 2))
    target = counted.float().argmax(dim=1)
    changed = (out != z_clean).flatten(2).any(dim=2)  # [B, T]
    for row in range(batch):
        for frame in range(frames):
            if changed[row, frame]:
                assert frame == int(target[row]) - 1 and frame >= 1
                torch.testing.assert_close(out[row, frame], constant[row, frame])
    if fraction == 1.0:  # every row with two frames before its target
        assert changed.sum(dim=1).tolist() == [int(t >= 2) for t in target.tolist()]
    if fraction == 0.0:
        assert not changed.any()


def test_the_sample_reads_the_history_as_training_holds_it_and_steps_from_noise():
    batch, frames, steps = 4, 6, 2
    d, tau, counted = _teacher_rows(batch, frames, 0)
    target = counted.float().argmax(dim=1)
    z_clean = torch.randn(batch, frames, 3, 2)
    z_tau = add_noise(z_clean, tau, torch.randn_like(z_clean))
    calls = []

    def record(z, t, s):
        calls.append((z.clone(), t.clone(), s.clone()))
        return torch.zeros_like(z)

    self_forced_latents(record, z_clean, z_tau, tau, d, counted, 1.0, steps, torch.Generator().manual_seed(0))
    assert len(calls) == steps
    for k, (z, t, s) in enumerate(calls):
        for row in range(batch):
            c = int(target[row])
            if c < 2:
                continue
            assert torch.equal(z[row, :c - 1], z_tau[row, :c - 1])  # the history as the graded pass reads it
            assert torch.equal(t[row, :c - 1], tau[row, :c - 1]) and torch.equal(s[row, :c - 1], d[row, :c - 1])
            assert float(t[row, c - 1]) == k / steps and float(s[row, c - 1]) == 1 / steps


def test_no_gradient_reaches_the_model_through_its_sample():
    d, tau, counted = _teacher_rows(3, 5, 1)
    weight = torch.ones((), requires_grad=True)
    z_clean = torch.randn(3, 5, 2, 2)
    out = self_forced_latents(lambda z, t, s: weight * z, z_clean, z_clean, tau, d, counted, 1.0, 2)
    assert not out.requires_grad


def _tiny(self_forcing: float, forcing: str = "teacher") -> tuple[Dynamics, torch.Tensor]:
    cfg = DynamicsConfig(transformer=TransformerConfig(d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, time_every=2),
                         latent_tokens=2, latent_dim=4, pack=1, n_registers=1, action_dim=2, k_max=4,
                         sampling_steps=2, forcing=forcing, self_forcing=self_forcing)
    model = template(Dynamics, cfg)
    return model, init(model, 0)


def _loss(model: Dynamics, params: torch.Tensor, **kwargs) -> torch.Tensor:
    """`dynamics_loss` on one fixed batch of 4 rows of 6 frames, with one fixed generator."""
    z = torch.randn(4, 6, 2, 4, generator=torch.Generator().manual_seed(0)).tanh()
    actions = torch.rand(4, 6, 2, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return dynamics_loss(params, z, actions, torch.Generator().manual_seed(3), model=model, **kwargs)[0]


def test_self_forcing_changes_the_dynamics_loss_and_zero_is_teacher_forcing():
    model, params = _tiny(0.0)
    plain = _loss(model, params)
    model.cfg = dataclasses.replace(model.cfg, self_forcing=1.0)
    forced = _loss(model, params)
    assert torch.isfinite(forced) and not torch.allclose(forced, plain)


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_bad_self_forcing_values_are_named(value):
    with pytest.raises(ValueError, match=f"self_forcing must lie in \\[0, 1\\], got {value}"):
        _tiny(value)


def test_self_forcing_needs_teacher_forcing():
    with pytest.raises(ValueError, match="self_forcing=0.5 needs forcing='teacher'"):
        _tiny(0.5, forcing="diffusion")


def test_a_counted_mask_of_the_wrong_shape_is_named():
    d, tau, counted = _teacher_rows(3, 5, 0)
    z = torch.zeros(3, 4, 2, 2)
    with pytest.raises(ValueError, match=r"counted must be \[B, T\] = \[3, 4\], got \[3, 5\]"):
        self_forced_latents(lambda z, t, s: z, z, z, tau[:, :4], d[:, :4], counted, 0.5, 2)


@settings(max_examples=40, deadline=None)
@given(share=st.sampled_from([0.0, 0.25, 1.0]), start=st.integers(0, 50), update=st.integers(0, 100))
def test_self_forcing_applies_from_its_start_update_on(share, start, update):
    cfg = dataclasses.replace(_tiny(share)[0].cfg, self_forcing_start=start)
    assert cfg.self_forcing_at(update) == (share if update >= start else 0.0)


def test_a_negative_self_forcing_start_is_named():
    with pytest.raises(ValueError, match="self_forcing_start must be >= 0, got -1"):
        dataclasses.replace(_tiny(0.5)[0].cfg, self_forcing_start=-1)


def test_an_explicit_share_overrides_the_models_in_the_dynamics_loss():
    plain_model, params = _tiny(0.0)
    forced_model, _ = _tiny(1.0)
    plain = _loss(plain_model, params)
    forced = _loss(plain_model, params, self_forcing=1.0)
    assert torch.equal(_loss(forced_model, params, self_forcing=0.0), plain)
    assert torch.equal(forced, _loss(forced_model, params))
    assert not torch.allclose(forced, plain)


def test_the_loop_trains_without_self_forcing_before_its_start():
    from helpers.benchmark_scripts import load_run_all

    from d4func.train.phases import build_models, gradient_step, init_states
    from d4func.train.run_config import load_run_config

    teacher = ["dynamics.forcing=teacher", "dynamics.clean_context_fraction=0.0"]
    configs = {share: load_run_config("experiments/configs/debug.yaml",
                                      [*teacher, f"dynamics.self_forcing={share}", "dynamics.self_forcing_start=1"])
               for share in (0.0, 1.0)}
    batch = load_run_all().random_replay_batch(configs[0.0], torch.Generator().manual_seed(0))
    losses = {}
    for share, cfg in configs.items():
        models = build_models(cfg)
        states = init_states(cfg, models)
        for step in (0, 1):  # the same states at both steps: only the schedule differs
            _, metrics = gradient_step(cfg, models, states, batch, torch.Generator().manual_seed(5), step, False)
            losses[share, step] = metrics["world_model/dynamics_loss"]
    assert losses[1.0, 0] == losses[0.0, 0]  # before the start: plain teacher forcing, bit for bit
    assert losses[1.0, 1] != losses[0.0, 1]


def test_an_explicit_share_on_a_diffusion_forced_world_model_is_named():
    # The explicit `self_forcing` argument bypasses DynamicsConfig's check, so the loss checks it itself.
    from helpers.benchmark_scripts import load_run_all

    from d4func.tokenizer import encode
    from d4func.train.agent_step import agent_finetune_loss
    from d4func.train.phases import build_models, init_states, world_model_batch
    from d4func.train.run_config import load_run_config

    cfg = load_run_config("experiments/configs/debug.yaml", [])
    models = build_models(cfg)
    states = init_states(cfg, models)
    batch = load_run_all().random_replay_batch(cfg, torch.Generator().manual_seed(0))
    latents = encode(models.tokenizer, states["tokenizer"]["params"], batch["frames"])
    wm = world_model_batch(latents, batch)
    with pytest.raises(ValueError, match="self_forcing=0.5 needs forcing='teacher'.*got forcing='diffusion'"):
        agent_finetune_loss(states["world_model"]["params"], wm["latents"], wm["actions"], wm["rewards"], None,
                            torch.Generator().manual_seed(1), model=models.dynamics, heads=models.heads,
                            self_forcing=0.5)


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 6), length=st.integers(2, 8), rolled=st.integers(1, 4), seed=st.integers(0, 1000))
def test_a_rollout_of_several_frames_replaces_exactly_the_frames_before_the_target(batch, length, rolled, seed):
    d, tau, counted = _teacher_rows(batch, length, seed)
    z_clean = torch.randn(batch, length, 3, 2, generator=torch.Generator().manual_seed(seed + 1))
    z_tau = add_noise(z_clean, tau, torch.randn_like(z_clean))
    constant = torch.full_like(z_clean, 7.0)
    out = self_forced_latents(lambda z, t, s: constant, z_clean, z_tau, tau, d, counted, 1.0, 2,
                              torch.Generator().manual_seed(seed + 2), frames=rolled)
    target = counted.float().argmax(dim=1)
    changed = (out != z_clean).flatten(2).any(dim=2)  # [B, T]
    for row in range(batch):
        c = int(target[row])
        expected = [c - rolled <= f < c and c >= rolled + 1 for f in range(length)]
        assert changed[row].tolist() == expected
        assert torch.equal(out[row, changed[row]], constant[row, changed[row]])


def test_each_rolled_frame_reads_the_samples_before_it_at_their_noise_level():
    batch, length, rolled, steps = 5, 8, 3, 2
    d, tau, counted = _teacher_rows(batch, length, 4)
    target = counted.float().argmax(dim=1)
    z_clean = torch.randn(batch, length, 3, 2)
    z_tau = add_noise(z_clean, tau, torch.randn_like(z_clean))
    calls = []

    def record(z, t, s):  # every sample is the frame's index + 10, so each call shows what it reads
        calls.append(z.clone())
        index = torch.arange(z.shape[1], dtype=z.dtype)[None, :, None, None]
        return (index + 10.0).expand_as(z)

    out = self_forced_latents(record, z_clean, z_tau, tau, d, counted, 1.0, steps, torch.Generator().manual_seed(0),
                              frames=rolled)
    assert len(calls) == rolled * steps
    for row in range(batch):
        c = int(target[row])
        if c < rolled + 1:
            continue
        for n in range(rolled):  # the n-th rolled frame, c - rolled + n, sampled by calls n * steps ...
            for z in calls[n * steps:(n + 1) * steps]:
                for before in range(c - rolled, c - rolled + n):  # earlier rolled frames: sample at tau_ctx
                    level = tau[row, before]
                    torch.testing.assert_close(z[row, before], z_tau[row, before] + level * (before + 10.0
                                                                                          - z_clean[row, before]))
                assert torch.equal(z[row, :c - rolled], z_tau[row, :c - rolled])  # real frames as they were
        torch.testing.assert_close(out[row, c - rolled:c], torch.arange(c - rolled, c, dtype=out.dtype)[:, None, None]
                                   .expand(rolled, 3, 2) + 10.0)


def test_bad_self_forcing_frames_are_named():
    with pytest.raises(ValueError, match="self_forcing_frames must be >= 1, got 0"):
        dataclasses.replace(_tiny(0.5)[0].cfg, self_forcing_frames=0)
    from d4func.train.run_config import load_run_config

    with pytest.raises(ValueError, match="dynamics.self_forcing_frames=7 leaves no training row to self-force"):
        load_run_config("experiments/configs/debug.yaml", ["dynamics.forcing=teacher",
                        "dynamics.clean_context_fraction=0.0", "dynamics.self_forcing=0.5",
                        "dynamics.self_forcing_frames=7", "replay.seq_len=8", "replay.final_frame=false"])


def test_several_rolled_frames_reach_the_dynamics_loss():
    model, params = _tiny(1.0)
    one = _loss(model, params)
    model.cfg = dataclasses.replace(model.cfg, self_forcing_frames=2)
    two = _loss(model, params)
    assert torch.isfinite(two) and not torch.allclose(one, two)
