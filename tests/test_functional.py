"""Functional core: init, apply, gradients, vmap over params, EMA, AdamW, train state, configs; LPIPS loading."""


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict
from torch import nn

from d4func.config import TransformerConfig, load_config
from d4func.functional import (
    apply,
    count_params,
    ema_update,
    grad_and_value,
    init,
    make_train_state,
    template,
    tree_norm,
)
from d4func.optim import AdamWConfig, adamw_init, adamw_update, clip_gradients
from d4func.train.state import NonFiniteLossError, apply_gradients, check_finite, new_train_state
from d4func.transformer import BlockCausalTransformer, TokenLayout

CFG = TransformerConfig(d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, time_every=2)
LAYOUT = TokenLayout.of(patches=4, latents=2)


def leaves_equal(a, b):
    return all(torch.equal(a.get(k), b.get(k)) for k in a.keys(True, True)) and set(a.keys(True, True)) == set(
        b.keys(True, True)
    )


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), global_seed=st.integers(0, 2**31 - 1))
def test_init_depends_only_on_seed_and_leaves_global_rng_alone(seed, global_seed):
    model = template(BlockCausalTransformer, CFG)
    torch.manual_seed(global_seed)
    before = torch.random.get_rng_state()
    first = init(model, seed)
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.rand(100)  # move the global RNG on
    second = init(model, seed)
    assert leaves_equal(first, second)
    other = init(model, seed + 1)
    assert not torch.equal(first["layers", "0", "attn", "q_proj", "weight"], other["layers", "0", "attn", "q_proj",
                                                                                      "weight"])


def test_template_holds_no_readable_weights():
    model = template(BlockCausalTransformer, CFG)
    assert all(p.is_meta for p in model.parameters())
    params = init(model, 0)
    assert all(not p.is_meta for p in params.values(True, True))
    assert all(p.is_meta for p in model.parameters())  # init does not fill the template
    with pytest.raises(RuntimeError, match="final_norm.weight"):  # an error, never a read of the template
        apply(model, params.exclude(("final_norm", "weight")), torch.randn(1, 1, 6, 32))


def test_init_rejects_modules_it_cannot_initialise():
    class Raw(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.empty(3))

    with pytest.raises(TypeError, match="reset_parameters"):
        init(template(Raw), 0)

    class WithBuffer(nn.Linear):
        def __init__(self):
            super().__init__(2, 2)
            self.register_buffer("table", torch.zeros(2))

    with pytest.raises(TypeError, match="buffers"):
        init(template(WithBuffer), 0)


def test_apply_equals_stateful_forward_with_same_weights():
    model = template(BlockCausalTransformer, CFG)
    params = init(model, 3)
    stateful = BlockCausalTransformer(CFG)
    params.clone().to_module(stateful)
    x = torch.randn(2, 3, LAYOUT.n_tokens, 32)
    mask = LAYOUT.space_mask("encoder")
    torch.testing.assert_close(apply(model, params, x, mask)[0], stateful(x, mask)[0])
    assert count_params(params) == sum(p.numel() for p in stateful.parameters())


def test_gradients_match_torch_func_and_stateful_backward():
    model = template(BlockCausalTransformer, CFG)
    params = init(model, 0)
    x = torch.randn(2, 3, LAYOUT.n_tokens, 32)

    def loss_fn(p, inputs):
        return apply(model, p, inputs)[0].square().mean()

    ours, value = grad_and_value(loss_fn)(params, x)
    theirs, their_value = torch.func.grad_and_value(loss_fn)(params, x)
    torch.testing.assert_close(value, their_value)
    assert tree_norm(ours - theirs) < 1e-5 * tree_norm(theirs)
    stateful = BlockCausalTransformer(CFG)
    params.clone().to_module(stateful)
    stateful(x)[0].square().mean().backward()
    for name, p in stateful.named_parameters():
        torch.testing.assert_close(ours.get(tuple(name.split("."))), p.grad, atol=1e-6, rtol=1e-4)
    # The params themselves are untouched.
    assert all(not p.requires_grad for p in params.values(True, True))


def test_grad_and_value_with_aux_and_unused_leaves():
    params = TensorDict({"a": torch.tensor([1.0, 2.0]), "b": {"c": torch.tensor(3.0)}})
    grads, (value, aux) = grad_and_value(lambda p: ((p["a"] ** 2).sum(), {"half": p["a"].sum() / 2}), True)(params)
    torch.testing.assert_close(grads["a"], torch.tensor([2.0, 4.0]))
    torch.testing.assert_close(grads["b", "c"], torch.tensor(0.0))
    assert value.item() == 5.0 and aux["half"].item() == 1.5 and not aux["half"].requires_grad
    with pytest.raises(ValueError, match="scalar"):
        grad_and_value(lambda p: p["a"])(params)


def test_vmap_over_stacked_params_equals_loop():
    model = template(BlockCausalTransformer, CFG)
    stacked = torch.stack([init(model, seed) for seed in range(3)])
    x = torch.randn(2, 2, LAYOUT.n_tokens, 32)
    mask = LAYOUT.space_mask("encoder")
    batched = torch.func.vmap(lambda p: apply(model, p, x, mask)[0])(stacked)
    for i in range(3):
        torch.testing.assert_close(batched[i], apply(model, stacked[i], x, mask)[0], atol=1e-5, rtol=1e-4)


def test_ema_update():
    ema = TensorDict({"w": torch.zeros(3)})
    params = TensorDict({"w": torch.ones(3)})
    torch.testing.assert_close(ema_update(ema, params, 0.9)["w"], torch.full((3,), 0.1))
    torch.testing.assert_close(ema_update(ema, params, 0.0)["w"], params["w"])
    assert torch.equal(ema["w"], torch.zeros(3))  # pure: the input is unchanged
    with pytest.raises(ValueError, match="1.5"):
        ema_update(ema, params, 1.5)


@pytest.mark.parametrize("weight_decay, decay_vectors", [(0.0, False), (0.1, False), (0.1, True)])
def test_adamw_matches_torch_optim(weight_decay, decay_vectors):
    # By default decay leaves the biases alone: torch with a second parameter group of no decay for them.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    params = TensorDict.from_module(net).detach().clone()
    matrices = [p for p in net.parameters() if p.dim() >= 2]
    vectors = [p for p in net.parameters() if p.dim() < 2]
    reference = torch.optim.AdamW([{"params": matrices},
                                   {"params": vectors, "weight_decay": weight_decay if decay_vectors else 0.0}],
                                  lr=1e-2, weight_decay=weight_decay, eps=1e-8)
    cfg = AdamWConfig(lr=1e-2, weight_decay=weight_decay, max_grad_norm=None, decay_vectors=decay_vectors)
    opt = adamw_init(params)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    for step in range(5):
        reference.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        reference.step()
        grads, _ = grad_and_value(lambda p: ((torch.func.functional_call(net, dict(p.flatten_keys(".").items()), x)
                                              - y) ** 2).mean())(params)
        params, opt, _ = adamw_update(params, grads, opt, step, cfg)
    for name, p in net.named_parameters():
        torch.testing.assert_close(params.get(tuple(name.split("."))), p.detach(), atol=1e-6, rtol=1e-5)


def test_adamw_with_clipping_matches_torch_clip_grad_norm_then_adamw():
    """Clipping by the global norm over every leaf, then AdamW on the clipped gradients: five steps against
    `clip_grad_norm_` + `torch.optim.AdamW`, with a clip small enough to act and gradients whose norm changes."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    params = TensorDict.from_module(net).detach().clone()
    reference = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-8)
    cfg = AdamWConfig(lr=1e-2, weight_decay=0.1, max_grad_norm=0.05, decay_vectors=True)
    opt = adamw_init(params)
    for step in range(5):
        x, y = torch.randn(16, 4), torch.randn(16, 1) * (step + 1)
        reference.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        total = torch.nn.utils.clip_grad_norm_(net.parameters(), 0.05)
        reference.step()
        grads, _ = grad_and_value(lambda p, x=x, y=y: ((torch.func.functional_call(
            net, dict(p.flatten_keys(".").items()), x) - y) ** 2).mean())(params)
        params, opt, metrics = adamw_update(params, grads, opt, step, cfg)
        torch.testing.assert_close(metrics["grad_norm"], total, atol=1e-5, rtol=1e-5)
        assert total > 0.05  # the clip acted
    for name, p in net.named_parameters():
        torch.testing.assert_close(params.get(tuple(name.split("."))), p.detach(), atol=1e-6, rtol=1e-5)


def test_the_global_norm_is_the_l2_norm_over_all_leaves():
    grads = TensorDict({"a": torch.tensor([3.0, 0.0]), "b": {"c": torch.tensor([0.0, 4.0])}})
    torch.testing.assert_close(tree_norm(grads), torch.tensor(5.0))
    clipped, norm = clip_gradients(grads, AdamWConfig(max_grad_norm=1.0))
    torch.testing.assert_close(norm, torch.tensor(5.0))
    torch.testing.assert_close(clipped["a"], torch.tensor([0.6, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(clipped["b", "c"], torch.tensor([0.0, 0.8]), atol=1e-6, rtol=0)


def test_check_finite_stops_on_inf_as_on_nan_naming_each_term():
    check_finite({"loss": torch.tensor(1.0), "mse": torch.tensor([0.5, 2.0])}, 3)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 7"):
        check_finite({"loss": torch.tensor(float("inf")), "mse": torch.tensor(1.0)}, 7)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss, mse at step 2"):
        check_finite({"loss": torch.tensor(-float("inf")), "mse": torch.tensor([0.0, float("nan")])}, 2)


def test_apply_gradients_refuses_an_ema_it_would_leave_behind_or_one_it_lacks():
    # A kept EMA with no decay would stay at the initial weights and still be checkpointed; a decay with no EMA
    # would be ignored. Both are caller mistakes, named.
    grads = TensorDict({"w": torch.ones(2)})
    with_ema = new_train_state(TensorDict({"w": torch.zeros(2)}))
    with pytest.raises(ValueError, match="keeps an 'ema' entry but ema_decay is None"):
        apply_gradients(with_ema, grads, AdamWConfig())
    without = new_train_state(TensorDict({"w": torch.zeros(2)}), with_ema=False)
    with pytest.raises(ValueError, match=r"ema_decay=0.5 was given but the train state keeps no 'ema'"):
        apply_gradients(without, grads, AdamWConfig(), ema_decay=0.5)
    new_state, _ = apply_gradients(without, grads, AdamWConfig())
    assert "ema" not in new_state.keys()


def test_global_norm_clipping_and_train_state_step():
    params = TensorDict({"w": torch.zeros(4)})
    state = new_train_state(params)
    assert set(state.keys()) == {"params", "opt", "ema", "step"}
    grads = TensorDict({"w": torch.full((4,), 10.0)})  # norm 20
    new_state, metrics = apply_gradients(state, grads, AdamWConfig(lr=0.1, max_grad_norm=1.0), ema_decay=0.5)
    torch.testing.assert_close(metrics["grad_norm"], torch.tensor(20.0))
    assert new_state["step"].item() == 1 and state["step"].item() == 0
    # Adam's first step moves each coordinate by ~lr against the gradient sign, whatever the clipping.
    torch.testing.assert_close(new_state["params", "w"], torch.full((4,), -0.1), atol=1e-4, rtol=0)
    torch.testing.assert_close(new_state["ema", "w"], torch.full((4,), -0.05), atol=1e-4, rtol=0)


def test_per_part_clipping_clips_each_top_level_entry_by_its_own_norm():
    grads = TensorDict({"policy": TensorDict({"w": torch.full((4,), 0.1)}),  # norm 0.2: under the limit
                        "value": TensorDict({"w": torch.full((4,), 3.0)})})  # norm 6
    together, norm = clip_gradients(grads, AdamWConfig(max_grad_norm=1.0))
    apart, norm_apart = clip_gradients(grads, AdamWConfig(max_grad_norm=1.0, clip_per_part=True))
    torch.testing.assert_close(norm, norm_apart)  # the logged norm is the global one, before clipping
    # One global norm (~6.0) scales the policy's small gradient down too; per part it is left alone.
    assert together["policy", "w"][0] < 0.02
    torch.testing.assert_close(apart["policy", "w"], grads["policy", "w"])
    torch.testing.assert_close(torch.linalg.vector_norm(apart["value", "w"]), torch.tensor(1.0), atol=1e-5, rtol=0)


def test_config_errors_name_the_field_and_overrides_apply(tmp_path):
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        TransformerConfig(n_heads=8, n_kv_heads=3)
    with pytest.raises(ValueError, match="d_model=100"):
        TransformerConfig(d_model=100, n_heads=8)
    path = tmp_path / "t.yaml"
    path.write_text("d_model: 64\nn_heads: 4\nn_kv_heads: 2\n")
    cfg = load_config(TransformerConfig, str(path), ["n_layers=2", "time_every=2"])
    assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.n_layers, cfg.time_every) == (64, 4, 2, 2, 2)
    with pytest.raises(ValueError, match="n_layers=2 < time_every=4"):
        load_config(TransformerConfig, str(path), ["n_layers=2"])
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        load_config(TransformerConfig, str(path), ["n_kv_heads=3"])


def test_the_ema_holds_values_not_a_graph_or_an_alias_of_the_params():
    # The EMA is a slow copy of the params (DESIGN principle 1: state is data): it never carries the autograd
    # graph of the params it averages (that would keep every step's graph alive), and the train state's EMA
    # starts as its own copy, so writing into the params in place leaves it alone.
    params = TensorDict({"w": torch.ones(3, requires_grad=True) * 2.0})
    ema = ema_update(TensorDict({"w": torch.zeros(3)}), params, 0.5)
    assert not ema["w"].requires_grad and ema["w"].grad_fn is None
    torch.testing.assert_close(ema["w"], torch.ones(3))
    state = make_train_state(TensorDict({"w": torch.ones(3)}), TensorDict({}))
    state["params", "w"].add_(1.0)
    assert torch.equal(state["ema", "w"], torch.ones(3))


# ---------------------------------------------------------------------------------------------------------------
# LPIPS (the tokenizer loss's perceptual term, paper Sec. 3.1): loading weights from local files only
# ---------------------------------------------------------------------------------------------------------------


def test_default_weight_decay_shrinks_matrices_and_leaves_vectors_alone():
    # With a zero gradient AdamW's step is 0, so only decay can move a leaf: a norm gain or bias must stay put.
    params = TensorDict({"weight": torch.ones(3, 2), "gain": torch.ones(3), "bias": torch.full((3,), 0.5)})
    grads = params.apply(torch.zeros_like)
    for decay_vectors in (False, True):
        cfg = AdamWConfig(lr=0.1, weight_decay=0.5, max_grad_norm=None, decay_vectors=decay_vectors)
        new, _, _ = adamw_update(params, grads, adamw_init(params), 0, cfg)
        torch.testing.assert_close(new["weight"], torch.full((3, 2), 0.95))
        for name in ("gain", "bias"):
            expected = params[name] * 0.95 if decay_vectors else params[name]
            torch.testing.assert_close(new[name], expected, msg=f"{name}, decay_vectors={decay_vectors}")
