"""Cost of the functional core: forward + backward of one transformer through `apply` vs a stateful module.

Both sides use the same weights, batch and loss. Repeats are interleaved (functional, stateful, functional, ...)
so that machine load drifts hit both alike; the figure is the ratio of median times. A third row times
`torch.func.grad_and_value` (the functorch transform) over the same `apply`, which is why d4func computes
gradients with autograd on the params leaves instead (docs/ARCHITECTURE.md).

    python benchmarks/functional_overhead.py [--out benchmarks/results/functional_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from d4func.config import TransformerConfig
from d4func.functional import apply, count_params, grad_and_value, init, template
from d4func.transformer import BlockCausalTransformer, TokenLayout


def median_ms(fn: Callable[[], object], times: list[float]) -> None:
    start = time.perf_counter()
    fn()
    times.append((time.perf_counter() - start) * 1e3)


CASE_NAMES = (
    "functional (apply + autograd on params leaves)",
    "stateful (nn.Module + .backward())",
    "functional (apply + torch.func.grad_and_value)",
)


def forward_backward_cases(
    d_model: int = 256, layers: int = 4, batch: int = 4, steps: int = 8
) -> tuple[dict[str, Callable[[], object]], dict[str, int]]:
    """The three forward + backward variants (`CASE_NAMES`, in that order) over the same weights and batch, and a
    description of the setting (params, tokens)."""
    cfg = TransformerConfig(d_model=d_model, n_layers=layers, n_heads=8, n_kv_heads=4, time_every=2)
    layout = TokenLayout.of(action=1, signal=1, latents=32, registers=4, agent=2)
    mask = layout.space_mask("world_model")
    model = template(BlockCausalTransformer, cfg)
    params = init(model, seed=0)
    stateful = BlockCausalTransformer(cfg)
    params.clone().to_module(stateful)
    x = torch.randn(batch, steps, layout.n_tokens, cfg.d_model, generator=torch.Generator().manual_seed(0))

    def loss_fn(p, inputs):
        return apply(model, p, inputs, mask)[0].square().mean()

    functional_grad = grad_and_value(loss_fn)
    functorch_grad = torch.func.grad_and_value(loss_fn)

    def run_stateful() -> None:
        stateful.zero_grad(set_to_none=True)
        stateful(x, mask)[0].square().mean().backward()

    fns = (lambda: functional_grad(params, x), run_stateful, lambda: functorch_grad(params, x))
    info = {"params": count_params(params), "d_model": d_model, "n_layers": layers, "batch": batch, "steps": steps,
            "tokens_per_step": layout.n_tokens}
    return dict(zip(CASE_NAMES, fns, strict=True)), info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/functional_overhead.json")
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cases, info = forward_backward_cases(args.d_model, args.layers, args.batch, args.steps)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in cases.items():
            median_ms(fn, times[name])
    medians = {name: statistics.median(values) for name, values in times.items()}
    names = list(cases)
    ratio = medians[names[0]] / medians[names[1]]
    ratio_functorch = medians[names[2]] / medians[names[1]]

    print(f"transformer: {info['params']:,} params, tokens [B={args.batch}, T={args.steps}, "
          f"N={info['tokens_per_step']}, D={args.d_model}], {args.threads} threads, {args.repeats} interleaved "
          "repeats")
    print(f"{'forward + backward':<50} {'median ms':>10} {'vs stateful':>12}")
    for name in names:
        print(f"{name:<50} {medians[name]:>10.2f} {medians[name] / medians[names[1]]:>12.3f}")
    print(f"ratio_functional_over_stateful = {ratio:.3f} (target <= 1.03)")

    result = {
        "ratio_functional_over_stateful": ratio,
        "ratio_functorch_grad_over_stateful": ratio_functorch,
        "median_ms_functional": medians[names[0]],
        "median_ms_stateful": medians[names[1]],
        "median_ms_functorch_grad": medians[names[2]],
        "params": info["params"],
        "config": {"d_model": args.d_model, "n_layers": args.layers, "batch": args.batch, "steps": args.steps,
                   "tokens_per_step": info["tokens_per_step"], "threads": args.threads, "repeats": args.repeats},
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
