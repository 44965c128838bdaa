"""Block-causal transformer: causality, modality masks, KV cache."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from d4func.config import TransformerConfig
from d4func.functional import apply, init, template
from d4func.transformer import BlockCausalTransformer, TokenLayout, drop_last_steps, keep_last_steps, reset_cache

LAYOUTS = {
    "encoder": TokenLayout.of(patches=5, latents=3),
    "decoder": TokenLayout.of(latents=3, queries=5),
    "world_model": TokenLayout.of(action=1, signal=1, latents=3, registers=2, agent=2),
    "full": TokenLayout.of(tokens=4),
}


def make_model(n_layers=4, time_every=2, n_heads=4, n_kv_heads=2, logit_cap=50.0, seed=0):
    cfg = TransformerConfig(
        d_model=32, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, time_every=time_every,
        logit_cap=logit_cap,
    )
    model = template(BlockCausalTransformer, cfg)
    return model, init(model, seed)


configs = st.fixed_dictionaries(
    {
        "n_layers": st.integers(3, 5),
        "time_every": st.integers(2, 3),
        "n_kv_heads": st.sampled_from([1, 2, 4]),
        "logit_cap": st.sampled_from([None, 30.0]),
        "seed": st.integers(0, 1000),
    }
)


@settings(max_examples=15, deadline=None)
@given(cfg=configs, mode=st.sampled_from(sorted(LAYOUTS)), steps=st.integers(2, 6), data=st.data())
def test_future_timesteps_never_change_past_outputs(cfg, mode, steps, data):
    model, params = make_model(**cfg)
    layout = LAYOUTS[mode]
    t = data.draw(st.integers(0, steps - 2), label="t")
    gen = torch.Generator().manual_seed(cfg["seed"])
    x = torch.randn(2, steps, layout.n_tokens, 32, generator=gen)
    changed = x.clone()
    changed[:, t + 1 :] = torch.randn(changed[:, t + 1 :].shape, generator=gen) * 3
    mask = layout.space_mask(mode)
    y, _ = apply(model, params, x, mask)
    y_changed, _ = apply(model, params, changed, mask)
    torch.testing.assert_close(y[:, : t + 1], y_changed[:, : t + 1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y[:, t + 1 :], y_changed[:, t + 1 :])


@pytest.mark.parametrize(
    ("mode", "hidden", "protected"),
    [
        ("world_model", "agent", ["action", "signal", "latents", "registers"]),
        ("encoder", "latents", ["patches"]),
        ("decoder", "queries", ["latents"]),
    ],
)
@settings(max_examples=8, deadline=None)
@given(cfg=configs)
def test_modality_isolation(cfg, mode, hidden, protected):
    """Tokens of `hidden` (agent tokens, encoder latents, decoder queries) never reach the `protected` modalities,
    at any timestep, through space or time layers."""
    model, params = make_model(**cfg)
    layout = LAYOUTS[mode]
    gen = torch.Generator().manual_seed(cfg["seed"])
    x = torch.randn(2, 4, layout.n_tokens, 32, generator=gen)
    changed = x.clone()
    changed[:, :, layout.slice(hidden)] += torch.randn(changed[:, :, layout.slice(hidden)].shape, generator=gen)
    mask = layout.space_mask(mode)
    y, _ = apply(model, params, x, mask)
    y_changed, _ = apply(model, params, changed, mask)
    for name in protected:
        part = layout.slice(name)
        torch.testing.assert_close(y[:, :, part], y_changed[:, :, part], atol=1e-5, rtol=1e-5)
    # ...while the hidden tokens themselves, and the readers, do respond.
    assert not torch.allclose(y[:, :, layout.slice(hidden)], y_changed[:, :, layout.slice(hidden)])


def test_agent_tokens_read_every_modality():
    model, params = make_model()
    layout = LAYOUTS["world_model"]
    x = torch.randn(1, 2, layout.n_tokens, 32)
    mask = layout.space_mask("world_model")
    y, _ = apply(model, params, x, mask)
    for name in ("action", "signal", "latents", "registers"):
        changed = x.clone()
        changed[:, :, layout.slice(name)] += 1.0
        y_changed, _ = apply(model, params, changed, mask)
        assert not torch.allclose(y[:, :, layout.slice("agent")], y_changed[:, :, layout.slice("agent")])


def test_space_masks_by_hand():
    layout = TokenLayout.of(a=1, agent=2)
    expected = torch.tensor([[1, 0, 0], [1, 1, 1], [1, 1, 1]], dtype=torch.bool)
    assert torch.equal(layout.space_mask("world_model"), expected)
    enc = TokenLayout.of(patches=2, latents=1).space_mask("encoder")
    assert torch.equal(enc, torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    dec = TokenLayout.of(latents=1, queries=2).space_mask("decoder")
    assert torch.equal(dec, torch.tensor([[1, 0, 0], [1, 1, 1], [1, 1, 1]], dtype=torch.bool))
    with pytest.raises(ValueError, match="'sideways'"):
        layout.space_mask("sideways")
    with pytest.raises(ValueError, match="unique"):
        TokenLayout((("a", 1), ("a", 2)))


@settings(max_examples=10, deadline=None)
@given(cfg=configs, steps=st.integers(1, 7), data=st.data())
def test_cached_step_by_step_equals_full_pass(cfg, steps, data):
    model, params = make_model(**cfg)
    layout = LAYOUTS["world_model"]
    mask = layout.space_mask("world_model")
    x = torch.randn(3, steps, layout.n_tokens, 32, generator=torch.Generator().manual_seed(cfg["seed"]))
    full, none_cache = apply(model, params, x, mask)
    assert none_cache is None
    # Feed the sequence in random-sized chunks (1 = frame by frame).
    cache, outputs, start = model.empty_cache(3), [], 0
    while start < steps:
        size = data.draw(st.integers(1, steps - start), label="chunk")
        out, cache = apply(model, params, x[:, start : start + size], mask, cache)
        outputs.append(out)
        start += size
    torch.testing.assert_close(torch.cat(outputs, 1), full, atol=1e-5, rtol=1e-4)
    assert int(cache["next_pos"][0]) == steps
    for index in model.time_layers:
        assert cache[f"layer_{index}", "k"].shape == (3, layout.n_tokens, cfg["n_kv_heads"], steps, 8)


def test_time_layer_placement_and_bad_inputs():
    model, params = make_model(n_layers=8, time_every=4)
    assert model.time_layers == [3, 7]
    with pytest.raises(ValueError, match="shape"):
        apply(model, params, torch.randn(2, 3, 32))
    with pytest.raises(ValueError, match="space_mask shape"):
        apply(model, params, torch.randn(1, 2, 4, 32), torch.ones(3, 3, dtype=torch.bool))


def test_reset_cache_makes_an_entry_start_afresh_and_leaves_others_alone():
    model, params = make_model()
    layout = LAYOUTS["world_model"]
    mask = layout.space_mask("world_model")
    x = torch.randn(2, 6, layout.n_tokens, 32)
    cache = model.empty_cache(2)
    _, cache = apply(model, params, x[:, :3], mask, cache)
    cache = reset_cache(cache, torch.tensor([True, False]))  # entry 0 starts a new episode at step 3
    after, _ = apply(model, params, x[:, 3:], mask, cache)
    fresh, _ = apply(model, params, x[:1, 3:], mask)
    full, _ = apply(model, params, x[1:], mask)
    torch.testing.assert_close(after[:1], fresh, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(after[1:], full[:, 3:], atol=1e-5, rtol=1e-4)


def test_sliding_window_equals_a_fresh_pass_over_the_window():
    # One space layer then one time layer: the cached keys of a step do not depend on earlier steps, so a window of
    # the last 3 cached steps must give exactly a fresh pass over those 3 steps plus the new one.
    model, params = make_model(n_layers=2, time_every=2)
    layout = LAYOUTS["world_model"]
    mask = layout.space_mask("world_model")
    x = torch.randn(2, 7, layout.n_tokens, 32)
    cache = model.empty_cache(2)
    for t in range(6):
        _, cache = apply(model, params, x[:, t : t + 1], mask, cache)
        cache = keep_last_steps(cache, 3)
    assert cache["valid"].shape == (2, 3) and int(cache["next_pos"][0]) == 6
    last, _ = apply(model, params, x[:, 6:], mask, cache)
    window, _ = apply(model, params, x[:, 3:], mask)
    torch.testing.assert_close(last, window[:, -1:], atol=1e-5, rtol=1e-4)
    full, _ = apply(model, params, x, mask)
    assert not torch.allclose(last, full[:, -1:], atol=1e-4)  # the window did forget steps 0..2


def test_blocks_are_the_pre_norm_formula_written_out():
    """A space layer then a time layer by hand, on one step: h = x + attn(rms(x) g1) (RoPE over token positions in
    the space layer, over time in the time layer), h + down(silu(a) * b) with (a, b) = gate_up(rms(h) g2), and
    rms(.) g_final at the end. Pins the pre-norm residual wiring, the final norm, SwiGLU and RoPE in space layers,
    none of which the invariance tests see."""
    model, params = make_model(n_layers=2, time_every=2, logit_cap=None)
    params = params.clone()
    gen = torch.Generator().manual_seed(1)
    gains = [("layers", i, name, "weight") for i in ("0", "1") for name in ("attn_norm", "mlp_norm")]
    for key in [*gains, ("final_norm", "weight")]:
        params[key] = 1.0 + 0.5 * torch.randn(params[key].shape, generator=gen)
    x = torch.randn(2, 1, 6, 32, generator=gen)
    y, _ = apply(model, params, x)

    def rms(t, gain):
        return t * torch.rsqrt(t.square().mean(-1, keepdim=True) + 1e-6) * gain

    def block(h, index, positions):
        layer = params["layers", str(index)]
        attended, _ = apply(model.layers[index].attn, layer["attn"], rms(h, layer["attn_norm", "weight"]), positions,
                            None, positions.numel() > 1 and index == 1)
        h = h + attended
        a, b = (rms(h, layer["mlp_norm", "weight"]) @ layer["mlp", "gate_up", "weight"].T).chunk(2, dim=-1)
        return h + (torch.nn.functional.silu(a) * b) @ layer["mlp", "down", "weight"].T

    space = block(x[:, 0], 0, torch.arange(6))  # [B, N, D]: tokens of the one step attend to each other
    time = block(space.reshape(12, 1, 32), 1, torch.arange(1)).reshape(2, 6, 32)  # each token over its one step
    torch.testing.assert_close(y[:, 0], rms(time, params["final_norm", "weight"]), atol=1e-5, rtol=1e-4)
    layer = params["layers", "0"]
    normed = rms(x[:, 0], layer["attn_norm", "weight"])
    with_rope, _ = apply(model.layers[0].attn, layer["attn"], normed, torch.arange(6))
    without_rope, _ = apply(model.layers[0].attn, layer["attn"], normed, None)
    assert not torch.allclose(without_rope, with_rope, atol=1e-4)  # positions matter in a space layer


def test_dropping_the_last_steps_equals_never_having_appended_them():
    """`drop_last_steps` undoes appending: the next step gets the position it would have had (RoPE over time is
    relative, so a position one too far would put every later frame one step further from its history)."""
    model, params = make_model(n_layers=2, time_every=2)
    layout = LAYOUTS["world_model"]
    mask = layout.space_mask("world_model")
    x = torch.randn(2, 5, layout.n_tokens, 32)
    _, short = apply(model, params, x[:, :3], mask, model.empty_cache(2))
    _, long = apply(model, params, x[:, :4], mask, model.empty_cache(2))
    dropped = drop_last_steps(long, 1)
    assert int(dropped["next_pos"][0]) == int(short["next_pos"][0]) == 3
    after_drop, _ = apply(model, params, x[:, 4:], mask, dropped)
    after_short, _ = apply(model, params, x[:, 4:], mask, short)
    torch.testing.assert_close(after_drop, after_short, atol=1e-5, rtol=1e-4)


def test_time_layers_know_the_order_of_the_history():
    """With one time layer, swapping two history steps changes the last step's output (RoPE over time); a time
    layer without positions would be a set operation over the history."""
    cfg = TransformerConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, time_every=2, logit_cap=None)
    model = template(BlockCausalTransformer, cfg)
    params = init(model, 0)
    x = torch.randn(2, 3, 4, 32)
    swapped = x[:, [1, 0, 2]]
    mask = TokenLayout.of(tokens=4).space_mask("full")
    y, _ = apply(model, params, x, mask)
    y_swapped, _ = apply(model, params, swapped, mask)
    assert not torch.allclose(y[:, -1], y_swapped[:, -1], atol=1e-4)


@settings(max_examples=8, deadline=None)
@given(cfg=configs, steps=st.integers(2, 6), data=st.data())
def test_modulation_is_a_per_step_film_of_every_norm(cfg, steps, data):
    """`modulation` (`[n_layers, 4, B, T, D]`, used by `DynamicsConfig.action_film`): zero is no modulation; a
    uniform scale c with no shift equals multiplying every block's norm gains by 1 + c (FiLM acts on the normed
    input); a change at step t+1 never reaches steps <= t; step-by-step cached decoding equals the full pass."""
    model, params = make_model(**cfg)
    layout = LAYOUTS["world_model"]
    mask = layout.space_mask("world_model")
    gen = torch.Generator().manual_seed(cfg["seed"])
    x = torch.randn(2, steps, layout.n_tokens, 32, generator=gen)
    shape = (cfg["n_layers"], 4, 2, steps, 32)
    plain, _ = apply(model, params, x, mask)
    torch.testing.assert_close(apply(model, params, x, mask, None, torch.zeros(shape))[0], plain)

    scale = torch.zeros(shape)
    scale[:, [0, 2]] = 0.7
    scaled_gains = params.clone()
    for index in range(cfg["n_layers"]):
        for norm in ("attn_norm", "mlp_norm"):
            scaled_gains["layers", str(index), norm, "weight"] = params["layers", str(index), norm, "weight"] * 1.7
    torch.testing.assert_close(apply(model, params, x, mask, None, scale)[0],
                               apply(model, scaled_gains, x, mask)[0], atol=1e-5, rtol=1e-4)

    film = 0.5 * torch.randn(shape, generator=gen)
    y, _ = apply(model, params, x, mask, None, film)
    t = data.draw(st.integers(0, steps - 2), label="t")
    changed = film.clone()
    changed[:, :, :, t + 1 :] = 0.5 * torch.randn(changed[:, :, :, t + 1 :].shape, generator=gen)
    y_changed, _ = apply(model, params, x, mask, None, changed)
    torch.testing.assert_close(y[:, : t + 1], y_changed[:, : t + 1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y[:, t + 1 :], y_changed[:, t + 1 :])

    cache, outputs = model.empty_cache(2), []
    for step in range(steps):
        out, cache = apply(model, params, x[:, step : step + 1], mask, cache, film[:, :, :, step : step + 1])
        outputs.append(out)
    torch.testing.assert_close(torch.cat(outputs, 1), y, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match=r"modulation must be \[n_layers, 4, B, T, D\]"):
        apply(model, params, x, mask, None, film[:, :2])


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000), n_layers=st.integers(2, 5))
def test_zero_init_residual_starts_every_block_as_the_identity_and_changes_nothing_else(seed, n_layers):
    cfg = TransformerConfig(d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, time_every=2)
    zero_cfg = TransformerConfig(d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, time_every=2,
                                 zero_init_residual=True)
    default = init(template(BlockCausalTransformer, cfg), seed).flatten_keys(".")
    model = template(BlockCausalTransformer, zero_cfg)
    params = init(model, seed)
    flat = params.flatten_keys(".")
    assert set(flat.keys()) == set(default.keys())  # same names: checkpoints and optimiser states carry over
    for key, value in flat.items():
        if key.endswith(("attn.out_proj.weight", "mlp.down.weight")):
            assert not value.any(), key
            assert default[key].any(), key
        else:  # drawn exactly as without the option, so a comparison at one seed is paired
            assert torch.equal(value, default[key]), key
    x = torch.randn(2, 3, 6, 32, generator=torch.Generator().manual_seed(seed))
    y, _ = apply(model, params, x)
    gain = params["final_norm", "weight"]
    torch.testing.assert_close(y, x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) * gain)


def test_zero_init_residual_branches_open_under_training():
    """Closed branches still get gradients (through the open input projections), so one step opens them."""
    cfg = TransformerConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, time_every=2, zero_init_residual=True)
    model = template(BlockCausalTransformer, cfg)
    params = init(model, 0)
    gen = torch.Generator().manual_seed(1)
    x, target = torch.randn(2, 3, 6, 32, generator=gen), torch.randn(2, 3, 6, 32, generator=gen)

    def loss(p):
        return (apply(model, p, x)[0] - target).square().mean()

    grads = torch.func.grad(loss)(params)
    for index in ("0", "1"):
        assert grads["layers", index, "attn", "out_proj", "weight"].abs().sum() > 0
        assert grads["layers", index, "mlp", "down", "weight"].abs().sum() > 0
    stepped = params.apply(lambda p, g: p - 0.1 * g, grads)
    assert loss(stepped) < loss(params)
    assert not torch.allclose(apply(model, stepped, x)[0], apply(model, params, x)[0])
