"""GPU-path flags on CPU: bf16 autocast, SDPA use without a logit cap, and torch.compile agreeing with eager."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from d4func.config import TransformerConfig
from d4func.dynamics import Dynamics, DynamicsConfig
from d4func.functional import apply, grad_and_value, init, template
from d4func.optim import AdamWConfig
from d4func.train.dynamics_step import dynamics_loss, dynamics_train_step
from d4func.train.precision import (
    PrecisionConfig,
    autocast,
    check_attention_config,
    compile_step,
    compiled_grad_fn,
    precision_context,
    sdpa_backends,
    wrap_step,
)
from d4func.train.state import new_train_state

torch.set_num_threads(1)
HELPERS = Path(__file__).parent / "helpers"


def _dynamics(logit_cap: float | None = 50.0) -> tuple[Dynamics, torch.Tensor]:
    tcfg = TransformerConfig(d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, time_every=2, logit_cap=logit_cap)
    cfg = DynamicsConfig(transformer=tcfg, latent_tokens=4, latent_dim=4, pack=2, n_registers=1, action_dim=2,
                         k_max=4, sampling_steps=2)
    model = template(Dynamics, cfg)
    return model, init(model, 0)


def _inputs(batch: int = 2, steps: int = 3):
    gen = torch.Generator().manual_seed(0)
    z = torch.rand(batch, steps, 4, 4, generator=gen) * 2 - 1
    tau = torch.full((batch, steps), 0.5)
    d = torch.full((batch, steps), 0.25)
    actions = torch.rand(batch, steps, 2, generator=gen) * 2 - 1
    return z, tau, d, actions


def test_bf16_autocast_computes_in_bf16_and_keeps_float32_state() -> None:
    model, params = _dynamics()
    z, tau, d, actions = _inputs()
    off = PrecisionConfig()
    on = PrecisionConfig(bf16=True)
    with autocast(off, "cpu"):
        ref = apply(model, params, z, tau, d, actions)[0]
    with precision_context(on, "cpu"):
        low = apply(model, params, z, tau, d, actions)[0]
    assert ref.dtype == torch.float32 and low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.05)
    assert not torch.equal(low.float(), ref)  # it really ran in lower precision

    loss_fn = functools.partial(dynamics_loss, model=model)
    grads32, (loss32, _) = grad_and_value(loss_fn, has_aux=True)(params, z, actions, torch.Generator().manual_seed(1))
    with precision_context(on, "cpu"):
        grads16, (loss16, _) = grad_and_value(loss_fn, has_aux=True)(params, z, actions,
                                                                    torch.Generator().manual_seed(1))
    assert all(g.dtype == torch.float32 for g in grads16.values(include_nested=True, leaves_only=True))
    torch.testing.assert_close(loss16.float(), loss32, rtol=0.05, atol=1e-3)
    cos = torch.nn.functional.cosine_similarity(
        torch.cat([g.flatten() for g in grads16.values(True, True)]),
        torch.cat([g.flatten() for g in grads32.values(True, True)]), dim=0)
    assert cos > 0.98, f"bf16 gradient direction drifted: cosine {cos:.4f}"


def test_wrap_step_honours_the_flags() -> None:
    model, params = _dynamics()
    step = functools.partial(dynamics_train_step, model=model, opt=AdamWConfig())
    assert wrap_step(step, PrecisionConfig(), "cpu") is step
    assert compile_step(step, PrecisionConfig()) is step
    z, _, _, actions = _inputs()
    state = new_train_state(params, with_ema=False)
    ref_state, ref = step(state, z, actions, torch.Generator().manual_seed(2))
    low_state, low = wrap_step(step, PrecisionConfig(bf16=True), "cpu")(state, z, actions,
                                                                        torch.Generator().manual_seed(2))
    assert low_state["params"]["latent_out"]["weight"].dtype == torch.float32
    assert low["loss"] != ref["loss"]
    torch.testing.assert_close(low["loss"].float(), ref["loss"], rtol=0.05, atol=1e-3)


@pytest.mark.parametrize("logit_cap, expected_calls", [(None, 2), (50.0, 0)])
def test_sdpa_carries_attention_exactly_when_there_is_no_logit_cap(monkeypatch, logit_cap, expected_calls) -> None:
    """No cap: every layer's attention goes through F.scaled_dot_product_attention (flash / memory-efficient
    kernels on GPU); a soft cap needs the logits, so no layer may use it."""
    calls = []
    original = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("is_causal", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model, params = _dynamics(logit_cap)
    z, tau, d, actions = _inputs()
    apply(model, params, z, tau, d, actions)
    assert len(calls) == expected_calls  # n_layers = 2: one space layer, one time layer
    if expected_calls:
        assert True in calls, "the causal time layer should take SDPA's own causal path (flash-eligible)"


def test_fused_attention_only_rejects_a_logit_cap() -> None:
    with pytest.raises(ValueError, match="logit_cap=50.0"):
        check_attention_config(TransformerConfig(logit_cap=50.0), PrecisionConfig(fused_attention_only=True))
    check_attention_config(TransformerConfig(logit_cap=None), PrecisionConfig(fused_attention_only=True))
    check_attention_config(TransformerConfig(logit_cap=50.0), PrecisionConfig())
    with pytest.raises(ValueError, match="'fastest'"):
        PrecisionConfig(compile_mode="fastest")
    with pytest.raises(ValueError, match="'mps'"):
        autocast(PrecisionConfig(bf16=True), "mps")


def _compile_check(what: str, timeout: float) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(HELPERS / "compile_check.py"), what], env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stderr[-4000:]


def test_compiled_loss_and_grad_match_eager() -> None:
    """The compile wiring (dynamo + AOT autograd, no C++ codegen) on a small functional loss and its gradient, in a
    subprocess: compiling imports triton, kept out of this process where other tests render with EGL."""
    _compile_check("small", timeout=300)


# ~18 s of tracing; test_compiled_loss_and_grad_match_eager keeps compile's correctness in the default suite.
@pytest.mark.slow
def test_model_forwards_trace_without_graph_breaks() -> None:
    """Dynamics (continuous and discrete actions) and tokenizer forwards are one graph each under torch.compile:
    the input value checks (ranges, NaN), which would break the graph and sync the device on every call, run only
    in eager calls. Before that the dynamics forward broke into 10 graphs."""
    _compile_check("graph_breaks", timeout=300)


# ~1 minute of tracing (three phases' losses); compiled_grad_fn's wiring is in the default suite's "small" check.
@pytest.mark.slow
def test_loop_gradient_step_with_compiled_losses_matches_eager() -> None:
    """What `precision.compile=true` runs in the loop: every phase's loss compiled, the same metrics as eager over
    six steps, and no recompiles once the imagination phase has run."""
    _compile_check("loop", timeout=900)


@pytest.mark.slow
def test_compiled_dynamics_train_step_matches_eager() -> None:
    """The real step under torch.compile (inductor, C++ codegen on CPU): minutes to compile, hence slow."""
    _compile_check("dynamics", timeout=1800)


def test_world_model_latents_are_float32_encodes_even_inside_bf16_autocast() -> None:
    """The train step runs under bf16 autocast, but the latents it hands the world model must be the float32
    encode acting sees: an encode under autocast rounds its matmuls to bf16 before `.float()` could help."""
    from d4func.tokenizer import Tokenizer, TokenizerConfig, encode
    from d4func.train.phases import world_model_latents

    tiny = TransformerConfig(d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, time_every=2)
    model = template(Tokenizer, TokenizerConfig(height=8, width=8, patch_size=4, n_latents=2, latent_dim=4,
                                                encoder=tiny, decoder=tiny))
    params = init(model, 0)
    frames = torch.rand(2, 3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    reference = encode(model, params, frames)
    with autocast(PrecisionConfig(bf16=True), "cpu"):
        rounded = encode(model, params, frames).float()
        latents = world_model_latents(model, params, frames)
    assert not torch.equal(rounded, reference), "autocast did not change the encode: the test checks nothing"
    assert latents.dtype == torch.float32 and not latents.requires_grad
    torch.testing.assert_close(latents, reference, rtol=0, atol=0)


def test_sdpa_backends_on_cuda_forbid_the_math_kernel_only_when_asked() -> None:
    """SDPA's backend switches are process-wide flags, so their setting is checked without a GPU."""
    from torch.nn.attention import SDPBackend

    before = torch.backends.cuda.math_sdp_enabled()
    with sdpa_backends(PrecisionConfig(fused_attention_only=True), "cuda"):
        assert not torch.backends.cuda.math_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
        order = torch._C._get_sdp_priority_order()  # private, but the order is the point of sdpa_backends
    assert torch.backends.cuda.math_sdp_enabled() == before  # put back after the block
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    assert order[:3] == [backend.value for backend in fused], order
    with sdpa_backends(PrecisionConfig(), "cuda"):
        assert torch.backends.cuda.math_sdp_enabled()  # the fallback stays allowed, last
        assert torch._C._get_sdp_priority_order()[:4] == [b.value for b in [*fused, SDPBackend.MATH]]
    with precision_context(PrecisionConfig(fused_attention_only=True), "cuda"):
        assert not torch.backends.cuda.math_sdp_enabled()


def test_wrap_step_honours_fused_attention_only_and_compile_on_their_own(monkeypatch) -> None:
    seen = []

    def step(x):
        seen.append(torch.backends.cuda.math_sdp_enabled())
        return x + 1

    assert wrap_step(step, PrecisionConfig(fused_attention_only=True), "cuda")(1) == 2
    assert seen == [False], "fused_attention_only alone must still forbid the math kernel inside the step"
    compiled = []

    def fake_compile(fn, **kwargs):
        compiled.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)  # the wiring only: what is compiled, with which mode
    assert wrap_step(step, PrecisionConfig(compile=True, compile_mode="max-autotune"), "cpu")(1) == 2
    assert compiled == [{"mode": "max-autotune"}]
    calls = []

    def grad_fn(loss_fn, has_aux=False):
        calls.append(has_aux)
        return loss_fn

    loss_grad = compiled_grad_fn(grad_fn, PrecisionConfig(compile=True, compile_mode="reduce-overhead"),
                                 backend="aot_eager")
    assert loss_grad(step, has_aux=True)(1) == 2
    assert calls == [True] and compiled[-1] == {"mode": "reduce-overhead", "backend": "aot_eager"}
