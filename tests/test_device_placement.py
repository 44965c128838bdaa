"""Device placement of the learner, checked without a GPU: every phase of a gradient step, KV-cached generation and
decoding, and the loop's hand-offs of params to the CPU (acting policy, GIF) run on a stand-in accelerator
(`helpers/stand_in_device.py`: tensors that report `meta` and compute on the CPU) that raises wherever a GPU would,
on a tensor made on the CPU and mixed with the batch's or a draw away from its generator's device, and otherwise
computes what the CPU does (bit for bit but through SDPA).

`tests/test_gpu.py` checks the same code on a real GPU when one is lent; CI has none, so without these tests a
`torch.zeros(n)` missing its `device=` would first show on someone's GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.alexnet import alexnet_file
from helpers.benchmark_scripts import load_run_all
from helpers.stand_in_device import (
    STAND_IN,
    DevicePlacementError,
    StandIn,
    device_generator,
    on_cpu,
    stand_in_device,
)
from tensordict import TensorDict

from d4func.envs.registry import make_env
from d4func.imagination import world_model_fn
from d4func.sampler import generate
from d4func.tokenizer import decode, encode
from d4func.train.evaluation import acting_params, make_eval_policy, run_episodes, write_gif
from d4func.train.phases import build_models, gradient_step, init_states
from d4func.train.run_config import load_run_config

REPO = Path(__file__).parents[1]


def test_the_stand_in_raises_where_a_gpu_would_and_computes_what_the_cpu_does() -> None:
    x = torch.linspace(-1, 1, 6).reshape(2, 3)
    with stand_in_device() as device:
        on_device = x.to(device)
        assert isinstance(on_device, StandIn) and on_device.device == STAND_IN
        y = torch.tanh(on_device * 2 + torch.tensor(0.5))  # a CPU scalar beside a device tensor: CUDA allows it
        assert y.device == STAND_IN
        with pytest.raises(DevicePlacementError, match="cpu"):
            _ = on_device + torch.ones(3)  # made without device=: on a GPU this mixes devices
        with pytest.raises(DevicePlacementError, match="generator on cpu"):
            torch.rand(3, generator=torch.Generator().manual_seed(1), device=device)
        drawn = torch.rand(3, generator=device_generator(), device=device)
        back = y.cpu()
    assert not isinstance(back, StandIn) and torch.equal(back, torch.tanh(x * 2 + 0.5))
    assert torch.equal(on_cpu(drawn), torch.rand(3, generator=device_generator()))


# Each case takes code paths the others do not: continuous vs discrete actions, one camera vs two, the opt-in
# dynamics and tokenizer options, the LPIPS term, SDPA; rows with the appended final frame (every case but Reach,
# whose config pins replay.final_frame=false) and without it.
CASES = {
    "debug": ("debug.yaml", []),
    "debug_options": ("debug.yaml", [
        "dynamics.forcing=teacher", "dynamics.loss_weight=uniform", "dynamics.noise_scale=0.3",
        "dynamics.previous_frame_skip=true", "dynamics.action_film=true", "dynamics.latent_positions=true",
        "dynamics.self_forcing=0.5", "dynamics.transformer.zero_init_residual=true",
        "tokenizer.latent_attention=local", "imagination.center_advantages=true"]),
    "debug_context_noise": ("debug.yaml", ["dynamics.clean_context_fraction=0.5", "finetune.bc_coef=2"]),
    # No logit cap: attention goes through scaled_dot_product_attention (the GPU's fused kernels) and its masks.
    "debug_sdpa": ("debug.yaml", ["tokenizer.encoder.logit_cap=null", "tokenizer.decoder.logit_cap=null",
                                  "dynamics.transformer.logit_cap=null"]),
    "reach_discrete": ("reach.yaml", []),
    "two_cameras": ("dmc_multicam.yaml", [
        "tokenizer.encoder.d_model=32", "tokenizer.decoder.d_model=32", "dynamics.transformer.d_model=32",
        "dynamics.transformer.n_layers=2", "heads.d_model=32", "replay.batch_size=2"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_phase_of_a_gradient_step_stays_on_the_learners_device(case: str, tmp_path: Path) -> None:
    config, overrides = CASES[case]
    lpips = []
    if case == "debug":
        lpips = ["tokenizer_loss.lpips_weight=0.2", f"tokenizer_loss.lpips_backbone_path={alexnet_file(tmp_path)}"]
    cfg = load_run_config(str(REPO / "experiments/configs" / config), [f"run_dir={tmp_path}", *overrides, *lpips])
    models = build_models(cfg)
    batch = load_run_all().random_replay_batch(cfg, torch.Generator().manual_seed(0))
    lpips_fn = None
    if lpips:
        from d4func.lpips_loss import make_lpips

        lpips_fn = make_lpips("alex", backbone_path=cfg.tokenizer_loss.lpips_backbone_path)

    def two_steps(states, batch, lpips_fn):
        generator = device_generator()
        for step in range(2):  # the second step reads optimizer moments and EMA the first one wrote
            states, metrics = gradient_step(cfg, models, states, batch, generator, step, True, lpips_fn=lpips_fn)
        return states, metrics

    on_cpu_states, on_cpu_metrics = two_steps(init_states(cfg, models), batch, lpips_fn)
    with stand_in_device() as device:
        states = {name: state.to(device) for name, state in init_states(cfg, models).items()}
        device_batch = {key: value.to(device) for key, value in batch.items()}
        device_lpips = lpips_fn.to(device) if lpips_fn is not None else None
        states, metrics = two_steps(states, device_batch, device_lpips)
        off = [(name, key, leaf.device) for name, state in states.items()
               for key, leaf in state.items(True, True) if leaf.device != STAND_IN]
        assert not off, f"train state left the device: {off}"
    assert set(states) == {"tokenizer", "world_model", "agent"}
    # Bit for bit, except through SDPA: on a CPU tensor it runs the CPU's flash kernel, on the stand-in its math
    # decomposition (the same attention up to float rounding).
    same = torch.equal if case != "debug_sdpa" else lambda a, b: torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert metrics.keys() == on_cpu_metrics.keys()
    unequal = [key for key in metrics if not same(torch.tensor(metrics[key]), torch.tensor(on_cpu_metrics[key]))]
    assert not unequal, [(key, metrics[key], on_cpu_metrics[key]) for key in unequal]
    for name, state in states.items():
        flat = on_cpu(dict(state.flatten_keys(".").items()))
        reference = dict(on_cpu_states[name].flatten_keys(".").items())
        assert flat.keys() == reference.keys()
        unequal = [key for key in flat if not same(flat[key], reference[key])]
        assert not unequal, f"{name}: {unequal[:5]}"


@pytest.mark.parametrize("config", ["debug.yaml", "reach.yaml"])
def test_kv_cached_generation_and_decoding_stay_on_the_device(config: str, tmp_path: Path) -> None:
    cfg = load_run_config(str(REPO / "experiments/configs" / config), [f"run_dir={tmp_path}"])
    models = build_models(cfg)
    states = init_states(cfg, models)
    batch = load_run_all().random_replay_batch(cfg, torch.Generator().manual_seed(1))
    tok, dyn = states["tokenizer"]["params"], states["world_model"]["params", "dynamics"]
    horizon = 4

    def roll(tok, dyn, frames, actions):
        context = encode(models.tokenizer, tok, frames[:, :3])
        latents = generate(world_model_fn(models.dynamics, dyn), context, actions[:, :3 + horizon], horizon,
                           device_generator(), cfg.dynamics, window=5)
        return decode(models.tokenizer, tok, latents)

    expected = roll(tok, dyn, batch["frames"], batch["actions"])
    with stand_in_device() as device:
        frames = roll(tok.to(device), dyn.to(device), batch["frames"].to(device), batch["actions"].to(device))
        assert frames.device == STAND_IN
    assert frames.shape == expected.shape
    assert torch.equal(on_cpu(frames), expected)


def test_the_acting_policy_and_the_gif_get_cpu_params_from_a_learner_on_the_device(tmp_path: Path) -> None:
    """The loop's hand-offs: envs, the acting policy and the GIF's predictions run on the CPU whatever the learner's
    device (`evaluation.acting_params`, `write_gif`), and act as they would from a learner on the CPU."""
    cfg = load_run_config(str(REPO / "experiments/configs/reach.yaml"), [f"run_dir={tmp_path}"])
    models = build_models(cfg)
    batch = load_run_all().random_replay_batch(cfg, torch.Generator().manual_seed(2))
    sample = TensorDict({"pixels": batch["frames"], "action": batch["actions"],
                         "next": {"reward": batch["rewards"][..., None], "done": batch["is_last"][..., None]}},
                        batch_size=batch["frames"].shape[:2])
    env = make_env("reach", seed=0, image_size=cfg.env.image_size, action_repeat=cfg.env.action_repeat)

    def episodes(states):
        env.set_seed(11)
        return run_episodes(env, make_eval_policy(cfg, models, states, env.action_spec), episodes=2, max_steps=12)

    cpu_states, _ = gradient_step(cfg, models, init_states(cfg, models), batch, device_generator(), 0, True)
    expected = episodes(cpu_states)
    with stand_in_device() as device:
        states = {name: state.to(device) for name, state in init_states(cfg, models).items()}
        states, _ = gradient_step(cfg, models, states, {k: v.to(device) for k, v in batch.items()},
                                  device_generator(), 0, True)
        for params in acting_params(states):
            leaves = list(params.values(True, True))
            assert leaves and not any(isinstance(leaf, StandIn) or leaf.device.type != "cpu" for leaf in leaves)
        played = episodes(states)
        gif = write_gif(cfg, models, states, sample, tmp_path / "real_vs_imagined.gif")
    assert played["returns"] == expected["returns"]
    assert gif.stat().st_size > 0
