"""`experiments/latent_mlp_reference.py`: the transitions it trains on, its open-loop rollout, its figures against
the baselines they name, and a run on a tiny online Reach run that leaves the run directory as it was."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from einops import rearrange
from helpers.scripts import load_experiment_script
from helpers.tiny_runs import tiny_online_reach_run
from hypothesis import given, settings
from hypothesis import strategies as st

from d4func.functional import apply, init, template
from d4func.tokenizer import TokenizerConfig

REPO = Path(__file__).resolve().parents[1]
SEED = 1


ref = load_experiment_script("latent_mlp_reference")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tiny_online_reach_run(tmp_path_factory.mktemp("reach_run"))


def _zeroed(params):
    """`NextFrameMLP` params whose last layer is zero: the MLP then carries the last frame forward exactly."""
    params = params.clone()
    last = max(int(key.split(".")[1]) for key in params.flatten_keys(".").keys())
    params["net", str(last), "weight"].zero_()
    params["net", str(last), "bias"].zero_()
    return params


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 5), steps=st.integers(2, 8), history=st.integers(1, 4), seed=st.integers(0, 100))
def test_training_transitions_pair_a_history_with_the_action_after_it_and_the_frame_after_that(rows, steps, history,
                                                                                             seed):
    # Frame (b, t) holds the value 100 b + t everywhere; action (b, t) holds 100 b + t + 0.5.
    times = torch.arange(steps, dtype=torch.float32)
    values = 100 * torch.arange(rows, dtype=torch.float32)[:, None] + times
    latents = values[:, :, None, None].expand(rows, steps, 3, 2).clone()
    actions = (values + 0.5)[:, :, None].expand(rows, steps, 2).clone()
    if steps <= history:
        with pytest.raises(ValueError, match=f"history of {history}"):
            ref.training_transitions(latents, actions, history, torch.Generator().manual_seed(seed))
        return
    inputs, action, target = ref.training_transitions(latents, actions, history, torch.Generator().manual_seed(seed))
    assert inputs.shape == (rows, history, 3, 2) and action.shape == (rows, 2) and target.shape == (rows, 3, 2)
    for b in range(rows):
        t = int(target[b, 0, 0] - 100 * b)
        assert history <= t < steps
        assert inputs[b, :, 0, 0].tolist() == [100 * b + s for s in range(t - history, t)]
        assert action[b].tolist() == [100 * b + t - 1 + 0.5] * 2  # the action after the history's last frame


@pytest.mark.parametrize("discrete", [False, True])
def test_rollout_feeds_each_generated_frame_back_as_the_newest_history_frame(discrete):
    action_size = 5 if discrete else 2
    model = template(ref.NextFrameMLP, 3, 4, action_size, 16, discrete, 2)
    params = init(model, 0)
    history = torch.randn(2, 2, 3, 4)
    actions = torch.randint(0, 5, (2, 3)) if discrete else torch.rand(2, 3, 2) * 2 - 1
    frames = ref.rollout(model, params, history, actions)
    assert frames.shape == (2, 3, 3, 4)
    first = apply(model, params, history, actions[:, 0])
    second = apply(model, params, torch.stack([history[:, 1], first], dim=1), actions[:, 1])
    torch.testing.assert_close(frames[:, 0], first)
    torch.testing.assert_close(frames[:, 1], second)
    # Zero change: every frame of the rollout is the history's last one.
    copied = ref.rollout(model, _zeroed(params), history, actions)
    torch.testing.assert_close(copied, history[:, -1:].expand_as(copied))


def _conv_input(frames: torch.Tensor) -> torch.Tensor:
    """Frames `[B, h, C, H, W]` in `representation(run, "pixels")`'s layout `[B, h, 1, C*H*W]`."""
    return frames.flatten(2)[:, :, None]


@pytest.mark.parametrize("discrete", [False, True])
def test_conv_reference_reads_the_pixels_layout_and_its_actions(discrete):
    action_size = 5 if discrete else 2
    shape = (6, 12, 10)  # two cameras' channels stacked, a frame that is not square
    model = template(ref.NextFrameConv, shape, action_size, 8, discrete, 2)
    params = init(model, 0)
    history = _conv_input(torch.rand(3, 2, *shape))
    actions = [torch.tensor([0, 1, 4]), torch.tensor([2, 2, 3])] if discrete else [torch.rand(3, 2) * 2 - 1,
                                                                                    torch.rand(3, 2) * 2 - 1]
    out = apply(model, params, history, actions[0])
    assert out.shape == (3, 1, 6 * 12 * 10)
    assert not torch.allclose(out, apply(model, params, history, actions[1]))  # the action reaches the output
    zeroed = params.clone()
    zeroed["out", "weight"].zero_()
    zeroed["out", "bias"].zero_()
    torch.testing.assert_close(apply(model, zeroed, history, actions[0]), history[:, -1])  # copies the last frame


def _latent_grid_input(frames: torch.Tensor) -> torch.Tensor:
    """Frames `[B, h, Dz, lh, lw]` as a local tokenizer's latents `[B, h, lh*lw, Dz]` (latent j owns block j, raster
    order)."""
    return rearrange(frames, "b h c y x -> b h (y x) c")


def _grid_of_output(out: torch.Tensor, layout: str, shape: tuple[int, int, int]) -> torch.Tensor:
    if layout == "pixels":
        return out.reshape(out.shape[0], *shape)
    return rearrange(out, "b (y x) c -> b c y x", y=shape[1], x=shape[2])


@settings(max_examples=10, deadline=None)
@given(column=st.integers(0, 5), seed=st.integers(0, 100), layout=st.sampled_from(["pixels", "latent_grid"]))
def test_conv_reference_sees_a_pixel_only_within_its_receptive_field(column, seed, layout):
    """Dilations 1, 2, 4, 8, 1, 1 and the 3x3 output layer reach 18 pixels to either side: a change in one column
    moves no output more than 18 columns away, and does move one within reach (a pixel reads its whole arm). On the
    latent grid the same holds in latent columns: the raster order is read as the grid."""
    reach = sum(ref.NextFrameConv.DILATIONS) + 1
    assert reach == 18
    shape = (3, 4, 40)
    model = template(ref.NextFrameConv, shape, 2, 4, False, 1, layout)
    params = init(model, seed)
    frames = torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(seed))
    changed = frames.clone()
    changed[..., column] += 1.0
    action = torch.zeros(1, 2)
    as_input = _conv_input if layout == "pixels" else _latent_grid_input
    delta = apply(model, params, as_input(changed), action) - apply(model, params, as_input(frames), action)
    moved = _grid_of_output(delta, layout, shape).abs().amax(dim=(0, 1, 2)) > 0  # per column
    assert not moved[column + reach + 1:].any()
    assert moved[column + reach - 2:column + reach + 1].any()


@pytest.mark.parametrize("discrete", [False, True])
def test_conv_reference_on_the_latent_grid_reads_and_returns_latents_and_its_actions(discrete):
    action_size = 5 if discrete else 2
    latent_dim, rows, cols = 8, 2, 3
    model = template(ref.NextFrameConv, (latent_dim, rows, cols), action_size, 8, discrete, 2, "latent_grid")
    params = init(model, 0)
    history = torch.rand(4, 2, rows * cols, latent_dim)
    actions = [torch.tensor([0, 1, 4, 2]), torch.tensor([2, 2, 3, 0])] if discrete else [torch.rand(4, 2) * 2 - 1,
                                                                                         torch.rand(4, 2) * 2 - 1]
    out = apply(model, params, history, actions[0])
    assert out.shape == (4, rows * cols, latent_dim)
    assert not torch.allclose(out, apply(model, params, history, actions[1]))
    zeroed = params.clone()
    zeroed["out", "weight"].zero_()
    zeroed["out", "bias"].zero_()
    torch.testing.assert_close(apply(model, zeroed, history, actions[0]), history[:, -1])
    with pytest.raises(ValueError, match="'tokens'"):
        ref.NextFrameConv((latent_dim, rows, cols), action_size, 8, discrete, 2, "tokens")


@pytest.mark.parametrize("discrete", [False, True])
def test_attention_reference_reads_every_tokens_history_and_its_actions(discrete):
    """Unlike the conv net, every output token reads every input token: a change in one token's history moves them
    all. The action reaches the output, and a zero read-out copies the last frame."""
    action_size = 5 if discrete else 2
    tokens, latent_dim = 6, 4
    model = template(ref.NextFrameAttention, tokens, latent_dim, action_size, 16, discrete, 2)
    params = init(model, 0)
    history = torch.rand(3, 2, tokens, latent_dim, generator=torch.Generator().manual_seed(0))
    actions = [torch.tensor([0, 1, 4]), torch.tensor([2, 2, 3])] if discrete else [torch.rand(3, 2) * 2 - 1,
                                                                                    torch.rand(3, 2) * 2 - 1]
    out = apply(model, params, history, actions[0])
    assert out.shape == (3, tokens, latent_dim)
    assert not torch.allclose(out, apply(model, params, history, actions[1]))
    changed = history.clone()
    changed[:, 0, 2] += 1.0  # the older history frame of token 2 only
    moved = (apply(model, params, changed, actions[0]) - out).abs().amax(dim=(0, 2))
    assert bool((moved > 0).all())
    zeroed = params.clone()
    zeroed["out", "weight"].zero_()
    zeroed["out", "bias"].zero_()
    torch.testing.assert_close(apply(model, zeroed, history, actions[0]), history[:, -1])
    with pytest.raises(ValueError, match="width=10 must be divisible by heads=4"):
        ref.NextFrameAttention(tokens, latent_dim, action_size, 10, discrete, 2)


def test_conv_frame_shape_puts_a_local_tokenizers_latents_on_their_grid():
    def run_with(**tokenizer):
        base = {"height": 32, "width": 32, "channels": 3, "n_cameras": 1, "patch_size": 4, "n_latents": 16,
                "latent_dim": 8, "latent_attention": "local"}
        return SimpleNamespace(cfg=SimpleNamespace(tokenizer=TokenizerConfig(**{**base, **tokenizer})))

    # An 8x8 patch grid in 16 blocks of 2x2 patches: a 4x4 latent grid; one latent per patch: 8x8.
    assert ref.conv_frame_shape(run_with(), "latents") == ((8, 4, 4), "latent_grid")
    assert ref.conv_frame_shape(run_with(n_latents=64, latent_dim=4), "latents") == ((4, 8, 8), "latent_grid")
    assert ref.conv_frame_shape(run_with(n_cameras=2), "pixels") == ((6, 32, 32), "pixels")
    with pytest.raises(ValueError, match="n_cameras=2"):
        ref.conv_frame_shape(run_with(n_cameras=2), "latents")


def test_an_mlp_that_changes_nothing_scores_copy_last_and_explains_no_action(run_dir):
    run = ref.wmq.load_run(run_dir)
    for space in ref.SPACES:
        held_out, counterfactual = ref.held_out_data(run, ref.representation(run, space), episodes=2, clips=3,
                                                     horizon=3, seed=SEED, max_steps=200, history=2)
        tokens, dim = held_out["latents"].shape[2:]
        if space == "pixels":
            assert tokens == 1 and dim == 3 * run.cfg.env.image_size ** 2
        model = template(ref.NextFrameMLP, tokens, dim, run.cfg.dynamics.n_actions, 16, True, 2)
        figures = ref.measure(model, _zeroed(init(model, 0)), held_out, counterfactual)
        assert figures["latent_next_mse"] == pytest.approx(figures["latent_copy_last_mse"], rel=1e-6)
        assert figures["counterfactual_latent_r2"] == pytest.approx(0.0, abs=1e-6)
        assert len(figures["counterfactual_latent_r2_per_step"]) == 3


def test_train_reference_measures_on_the_clips_more_world_model_steps_uses_and_writes_nothing_into_the_run(
        run_dir, tmp_path):
    before = {str(p): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    out = tmp_path / "reference.json"
    result = ref.main(["--run", str(run_dir), "--steps", "3", "--eval-every", "2", "--episodes", "2", "--clips", "3",
                       "--horizon", "3", "--seed", str(SEED), "--width", "32", "--lr", "5e-4", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["lr"] == 5e-4  # the run's optim.world_model.lr is not
    rows = result["rows"]
    assert [row["step"] for row in rows] == [0, 2, 3]
    assert rows[0]["loss"] is None and all(math.isfinite(row["loss"]) for row in rows[1:])
    assert all(row["loss_copy_last"] > 0 for row in rows[1:])
    assert all(math.isfinite(row["counterfactual_latent_r2"]) for row in rows)
    # The copy-last baseline is the one more_world_model_steps.py reports for the same seed.
    run = ref.wmq.load_run(run_dir)
    frames, actions, rewards = ref.wmq.held_out_clips(run, 2, 3, 3, SEED, max_steps=200)
    more = ref.more_steps.measure(run, frames, actions, rewards, SEED)
    assert rows[0]["latent_copy_last_mse"] == more["latent_copy_last_mse"]
    after = {str(p): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    assert after == before


def test_bad_space_and_a_history_longer_than_the_context_are_named(run_dir):
    run = ref.wmq.load_run(run_dir)
    with pytest.raises(ValueError, match="'voxels'"):
        ref.representation(run, "voxels")
    context_len = run.cfg.replay.context_len
    with pytest.raises(ValueError, match=f"history={context_len + 1}"):
        ref.train_reference(run_dir, steps=1, eval_every=1, history=context_len + 1, episodes=1, clips=2)
    with pytest.raises(ValueError, match="width must be an int >= 1, got 0"):
        ref.train_reference(run_dir, steps=1, eval_every=1, width=0)
    with pytest.raises(ValueError, match="'transformer'"):
        ref.train_reference(run_dir, steps=1, eval_every=1, model_kind="transformer")
    with pytest.raises(ValueError, match="space='pixels' has one token a frame"):
        ref.train_reference(run_dir, steps=1, eval_every=1, model_kind="attention", space="pixels")
    # Reach's tokenizer lets every latent read every patch: its latents have no place on a grid.
    with pytest.raises(ValueError, match="latent_attention='global'"):
        ref.train_reference(run_dir, steps=1, eval_every=1, model_kind="conv")


def test_attention_reference_trains_on_the_run_latents(run_dir):
    result = ref.train_reference(run_dir, steps=2, eval_every=2, width=8, episodes=2, clips=3, horizon=3, seed=SEED,
                                 model_kind="attention", log=lambda _: None)
    assert result["model"] == "attention" and result["space"] == "latents"
    rows = result["rows"]
    assert [row["step"] for row in rows] == [0, 2]
    assert rows[1]["loss"] > 0 and math.isfinite(rows[1]["counterfactual_latent_r2"])
    assert rows[1]["latent_next_mse"] != rows[0]["latent_next_mse"]  # two updates changed the model


def test_conv_reference_trains_on_the_run_frames(run_dir):
    result = ref.train_reference(run_dir, steps=2, eval_every=2, width=4, space="pixels", episodes=2, clips=3,
                                 horizon=3, seed=SEED, model_kind="conv", log=lambda _: None)
    assert result["model"] == "conv" and result["space"] == "pixels"
    rows = result["rows"]
    assert [row["step"] for row in rows] == [0, 2]
    assert rows[1]["loss"] > 0 and rows[1]["loss_copy_last"] > 0
    assert math.isfinite(rows[1]["counterfactual_latent_r2"])
    assert rows[1]["latent_copy_last_mse"] == rows[0]["latent_copy_last_mse"]
