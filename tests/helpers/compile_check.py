"""torch.compile vs eager, in its own process: compiling imports triton, which must stay out of the pytest process
(other tests render DMControl with EGL there; see d4func/train/precision.py).

`python compile_check.py small`: a small functional loss + gradient, backend aot_eager (dynamo and AOT autograd, no
C++ codegen; seconds), compiled as a step and as the loop compiles it (`compiled_grad_fn`). `python compile_check.py
graph_breaks`: `torch._dynamo.explain` over the dynamics and tokenizer forwards must find one graph each (the
eager-only value checks are skipped while tracing). `python compile_check.py loop`: the loop's `gradient_step` with
compiled losses (`compiled_grad_fn`, aot_eager) against eager (about a minute). `python compile_check.py
dynamics_loss [DEVICE]`: the world-model loss and gradient compiled as the loop does (inductor) on DEVICE (default
cpu). `python compile_check.py dynamics`: the whole `dynamics_train_step` compiled (inductor; minutes on CPU).
Exits non-zero with the mismatch on failure; prints `ok <seconds>` on success.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import torch
from tensordict import TensorDict

from d4func.functional import grad_and_value, init, template
from d4func.train.precision import PrecisionConfig, compile_step, compiled_grad_fn


def small() -> None:
    params = TensorDict(dict(init(torch.nn.Linear(8, 4), 0).items()), [])
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))

    def step(p, x):
        def loss_fn(p, x):
            return torch.tanh(x @ p["weight"].T + p["bias"]).square().mean()

        return grad_and_value(loss_fn)(p, x)

    compiled = compile_step(step, PrecisionConfig(compile=True), backend="aot_eager")
    assert compiled is not step
    grads_c, loss_c = compiled(params, x)
    grads_e, loss_e = step(params, x)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-7)
    for key in ("weight", "bias"):
        torch.testing.assert_close(grads_c[key], grads_e[key], rtol=1e-5, atol=1e-7, msg=key)

    # The loop's form: the loss compiled inside grad_fn, the rest of the step eager.
    assert compiled_grad_fn(grad_and_value, PrecisionConfig()) is grad_and_value
    loss_grad = compiled_grad_fn(grad_and_value, PrecisionConfig(compile=True), backend="aot_eager")

    def loss_fn(p, x):
        return torch.tanh(x @ p["weight"].T + p["bias"]).square().mean()

    grads_c, loss_c = loss_grad(loss_fn)(params, x)
    grads_e, loss_e = grad_and_value(loss_fn)(params, x)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-7)
    for key in ("weight", "bias"):
        torch.testing.assert_close(grads_c[key], grads_e[key], rtol=1e-5, atol=1e-7, msg=key)


def graph_breaks() -> None:
    import torch._dynamo as dynamo

    from d4func.functional import apply
    from d4func.train.phases import build_models, init_states
    from d4func.train.run_config import load_run_config

    root = Path(__file__).parents[2]
    for overrides in ([], ["dynamics.action_dim=0", "dynamics.n_actions=5", "heads.action_dim=0", "heads.n_actions=5"]):
        cfg = load_run_config(str(root / "experiments/configs/debug.yaml"), overrides)
        models = build_models(cfg)
        states = init_states(cfg, models)
        gen = torch.Generator().manual_seed(0)
        b, t, dyn = 2, 3, cfg.dynamics
        z = torch.rand(b, t, dyn.latent_tokens, dyn.latent_dim, generator=gen) * 2 - 1
        tau, d = torch.full((b, t), 0.5), torch.full((b, t), 0.25)
        if dyn.n_actions:
            actions = torch.randint(0, dyn.n_actions, (b, t), generator=gen)
        else:
            actions = torch.rand(b, t, dyn.action_dim, generator=gen) * 2 - 1
        dyn_params = states["world_model"]["params"]["dynamics"]
        found = dynamo.explain(lambda *a, p=dyn_params, m=models.dynamics: apply(m, p, *a))(z, tau, d, actions)
        assert found.graph_break_count == 0, [str(r.reason)[:200] for r in found.break_reasons]
    tok = cfg.tokenizer
    frames = torch.rand(b, t, tok.channels, tok.height, tok.width, generator=gen)
    tok_params = states["tokenizer"]["params"]
    found = dynamo.explain(lambda x: apply(models.tokenizer, tok_params, x, mode="autoencode"))(frames)
    assert found.graph_break_count == 0, [str(r.reason)[:200] for r in found.break_reasons]


def loop() -> None:
    """The loop's `gradient_step` with every phase's loss compiled (`compiled_grad_fn`, backend aot_eager): the
    same metrics as eager over 6 steps (imagination from step 1), and no new graphs after the second step (a
    recompile per step would end in dynamo's recompile limit and a silent fall back to eager)."""
    from torch._dynamo.utils import counters

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from d4func.train import phases as training
    from d4func.train.run_config import load_run_config
    from helpers.benchmark_scripts import load_run_all

    root = Path(__file__).parents[2]
    cfg = load_run_config(str(root / "experiments/configs/debug.yaml"), [])
    models = training.build_models(cfg)
    batch = load_run_all().random_replay_batch(cfg, torch.Generator().manual_seed(0))
    metrics, graphs = {}, []
    for name in ("eager", "compiled"):
        grad_fn = compiled_grad_fn(grad_and_value, PrecisionConfig(compile=name == "compiled"), backend="aot_eager")
        states, step_gen = training.init_states(cfg, models), torch.Generator().manual_seed(1)
        metrics[name] = []
        for i in range(6):
            states, m = training.gradient_step(cfg, models, states, batch, step_gen, i, i >= 1, grad_fn=grad_fn)
            metrics[name].append(m)
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[6] > 0 and graphs[8:] == [graphs[7]] * 4, f"graphs after each compiled step: {graphs[6:]}"
    for step, (eager, compiled) in enumerate(zip(metrics["eager"], metrics["compiled"], strict=True)):
        assert eager.keys() == compiled.keys()
        for key, value in eager.items():
            assert abs(compiled[key] - value) <= 1e-4 * max(1.0, abs(value)), (step, key, value, compiled[key])


def _toy_dynamics(device: str) -> tuple:
    """The toy world model (`helpers.toy_training.CFG`), its params, and a batch of latents and actions on `device`,
    with float32 matmuls on both sides of a comparison (no TF32)."""
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from d4func.dynamics import Dynamics
    from helpers.toy_training import CFG

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model = template(Dynamics, CFG)
    z = (torch.rand(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device)
    actions = (torch.rand(2, 4, 2, generator=torch.Generator().manual_seed(1)) * 2 - 1).to(device)
    return model, init(model, 0).to(device), z, actions


def dynamics_loss(device: str = "cpu") -> None:
    """The world-model loss and its gradient compiled as the loop compiles them (`compiled_grad_fn`, inductor), on
    DEVICE, against eager. Loss and gradients are compared, not params after an AdamW step: its first update is
    about lr * sign(gradient), so rounding noise in a near-zero gradient would look like a compile bug."""
    from d4func.train.dynamics_step import dynamics_loss as loss_fn

    model, params, z, actions = _toy_dynamics(device)
    # Eager first: it fills tensordict's lazily built caches, which would otherwise make the second compiled call
    # recompile (a guard on their size).
    eager = grad_and_value(functools.partial(loss_fn, model=model), has_aux=True)
    compiled = compiled_grad_fn(grad_and_value, PrecisionConfig(compile=True))(
        functools.partial(loss_fn, model=model), has_aux=True)
    grads_e, (loss_e, _) = eager(params, z, actions, torch.Generator(device=device).manual_seed(3))
    for _ in range(2):  # the second call runs the cached graphs
        grads_c, (loss_c, _) = compiled(params, z, actions, torch.Generator(device=device).manual_seed(3))
    # Inductor's GPU kernels (triton) reduce in another order than eager CUDA kernels: a looser bound there.
    rtol, atol = (1e-5, 1e-7) if torch.device(device).type == "cpu" else (1e-3, 1e-5)
    torch.testing.assert_close(loss_c, loss_e, rtol=rtol, atol=atol)
    for key in grads_e.keys(include_nested=True, leaves_only=True):
        torch.testing.assert_close(grads_c.get(key), grads_e.get(key), rtol=rtol, atol=atol, msg=str(key))


def dynamics() -> None:
    model, params, z, actions = _toy_dynamics("cpu")  # puts tests/ on the path for helpers.toy_training
    from d4func.train.dynamics_step import dynamics_train_step
    from d4func.train.state import new_train_state
    from helpers.toy_training import OPT

    state = new_train_state(params)
    step = functools.partial(dynamics_train_step, model=model, opt=OPT, ema_decay=0.9)
    compiled = compile_step(step, PrecisionConfig(compile=True))
    for _ in range(2):  # the second call runs the cached graphs
        new_c, metrics_c = compiled(state, z, actions, torch.Generator().manual_seed(3))
    new_e, metrics_e = step(state, z, actions, torch.Generator().manual_seed(3))
    for name in metrics_e:
        torch.testing.assert_close(metrics_c[name], metrics_e[name], rtol=1e-4, atol=1e-6, msg=name)
    for key in new_e.keys(include_nested=True, leaves_only=True):
        torch.testing.assert_close(new_c.get(key), new_e.get(key), rtol=1e-4, atol=1e-6, msg=str(key))


if __name__ == "__main__":
    torch.set_num_threads(1)
    start = time.perf_counter()
    modes = {"small": small, "graph_breaks": graph_breaks, "loop": loop, "dynamics_loss": dynamics_loss,
             "dynamics": dynamics}
    modes[sys.argv[1]](*sys.argv[2:])
    print(f"ok {time.perf_counter() - start:.1f}")
