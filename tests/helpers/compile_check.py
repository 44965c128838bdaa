"""torch.compile vs eager, in its own process: compiling imports triton, which must stay out of the pytest process
(other tests render DMControl with EGL there; see d4func/train/precision.py).

`python compile_check.py small`: a small functional loss + gradient, backend aot_eager (dynamo and AOT autograd, no
C++ codegen; seconds). `python compile_check.py graph_breaks`: `torch._dynamo.explain` over the dynamics and
tokenizer forwards must find one graph each (the eager-only value checks are skipped while tracing). `python
compile_check.py dynamics`: the real `dynamics_train_step` with the default inductor
backend (minutes on CPU). Exits non-zero with the mismatch on failure; prints `ok <seconds>` on success.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import torch
from tensordict import TensorDict

from d4func.functional import grad_and_value, init, template
from d4func.train.precision import PrecisionConfig, compile_step


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


def graph_breaks() -> None:
    import torch._dynamo as dynamo

    from d4func.functional import apply
    from d4func.train.loop import build_models, init_states
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


def dynamics() -> None:
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from d4func.dynamics import Dynamics
    from d4func.train.dynamics_step import dynamics_train_step
    from d4func.train.state import new_train_state
    from helpers.toy_training import CFG, OPT

    model = template(Dynamics, CFG)
    state = new_train_state(init(model, 0))
    z = torch.rand(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    actions = torch.rand(2, 4, 2, generator=torch.Generator().manual_seed(1)) * 2 - 1
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
    {"small": small, "graph_breaks": graph_breaks, "dynamics": dynamics}[sys.argv[1]]()
    print(f"ok {time.perf_counter() - start:.1f}")
