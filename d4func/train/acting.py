"""The acting policy: the functional tokenizer, dynamics model and policy head as a TorchRL policy module.

State lives here, at the edge (DESIGN principle 4): per environment, the tokenizer encoder's and the dynamics
model's time-layer KV caches (a sliding window of `context` frames: `transformer.keep_last_steps`, which says
where a trimmed cache differs from encoding the window afresh) and the previous action. Each call

1. encodes the new frame with the tokenizer's cache (`tokenizer.encode_step`: the tokenizer is causal in time);
2. commits it to the dynamics model's cache at the context signal level, with the action that led into it
   (`imagination.commit_frames` — the same call imagination uses, so the policy sees real and imagined frames
   alike), reading the agent tokens;
3. samples an action from the policy head (or takes its mode with `greedy=True`).

On an episode start (`is_init`) an env's caches forget everything before (`transformer.reset_cache`). Until
`random_until` steps have been taken the module acts uniformly at random (replay prefill) without touching the
models. Parameters are replaced with `update_params` after each training round; nothing is copied into modules.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torch import Tensor

from d4func.dynamics import Dynamics
from d4func.heads import AgentHeads, policy_dist
from d4func.imagination import commit_frames, world_model_fn
from d4func.tokenizer import Tokenizer, encode_step
from d4func.transformer import empty_cache, keep_last_steps, reset_cache


class WorldModelPolicy(TensorDictModuleBase):
    """Reads `"pixels"` (`[E, C, H, W]`, `[E, K, C, H, W]` for K cameras, or without the env axis) and
    `"is_init"`; writes `"action"`."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        dynamics: Dynamics,
        heads: AgentHeads,
        action_spec,
        *,
        context: int,
        seed: int = 0,
        greedy: bool = False,
        random_until: int = 0,
    ) -> None:
        super().__init__()
        self.in_keys = ["pixels", "is_init"]
        self.out_keys = ["action"]
        # Templates on the meta device; kept out of nn.Module registration so `parameters()` stays empty.
        object.__setattr__(self, "_models", (tokenizer, dynamics, heads))
        self.action_spec = action_spec
        self.context = context
        self.greedy = greedy
        self.random_until = random_until
        self.steps_taken = 0
        self.generator = torch.Generator().manual_seed(seed)
        self.tokenizer_params: TensorDictBase | None = None
        self.agent_params: TensorDictBase | None = None
        self._state: dict[str, object] | None = None

    def __getstate__(self) -> dict:
        # Multi-process collectors pickle the policy into their workers: send the model configs, not the meta-device
        # templates (meta tensors cannot be shared), and rebuild the templates on arrival.
        # A torch.Generator does not survive torch's shared-memory pickling either: send its state as bytes. Every
        # worker then starts from the same generator state (their envs, seeded apart, make the trajectories differ).
        state = dict(self.__dict__)
        state["_models"] = tuple(model.cfg for model in self._models)
        state["generator"] = bytes(self.generator.get_state().numpy())
        return state

    def __setstate__(self, state: dict) -> None:
        from d4func.functional import template

        configs = state.pop("_models")
        generator = torch.Generator()
        generator.set_state(torch.frombuffer(bytearray(state.pop("generator")), dtype=torch.uint8))
        self.__dict__.update(state)
        self.generator = generator
        models = tuple(template(cls, cfg) for cls, cfg in zip((Tokenizer, Dynamics, AgentHeads), configs,
                                                              strict=True))
        object.__setattr__(self, "_models", models)

    def update_params(self, tokenizer_params: TensorDictBase, agent_params: TensorDictBase) -> None:
        """New weights: tokenizer params and agent params {"dynamics", "heads": {"policy", ...}}. The context
        caches were computed with the old weights, so they are dropped (each env restarts its context)."""
        self.tokenizer_params = tokenizer_params
        self.agent_params = agent_params
        self._state = None

    def reset_context(self) -> None:
        self._state = None

    def _random_action(self, batch_shape: torch.Size) -> Tensor:
        return self.action_spec.rand(batch_shape)

    @torch.no_grad()
    def forward(self, td: TensorDictBase) -> TensorDictBase:
        tokenizer, dynamics, heads = self._models
        pixels = td.get("pixels")
        image_dims = 4 if tokenizer.cfg.n_cameras > 1 else 3
        unbatched = pixels.ndim == image_dims
        if pixels.ndim not in (image_dims, image_dims + 1):
            raise ValueError(f"pixels must be [E, ...image] or [...image] with image rank {image_dims}, got shape "
                             f"{tuple(pixels.shape)}")
        frames = pixels[None] if unbatched else pixels
        n_envs = frames.shape[0]
        is_init = td.get("is_init", None)
        starts = torch.ones(n_envs, dtype=torch.bool) if is_init is None else is_init.reshape(n_envs, -1)[:, 0]
        self.steps_taken += n_envs
        if self.steps_taken <= self.random_until or self.agent_params is None:
            action = self._random_action(torch.Size([n_envs]))
            self._state = None
        else:
            action = self._act(frames, starts)
        td.set("action", action[0] if unbatched else action)
        return td

    def _act(self, frames: Tensor, starts: Tensor) -> Tensor:
        tokenizer, dynamics, heads = self._models
        n_envs = frames.shape[0]
        state = self._state
        if state is None or state["n_envs"] != n_envs:
            starts = torch.ones_like(starts)
            state = {"n_envs": n_envs, "tok_cache": None, "dyn_cache": None, "prev_action": None,
                     "has_prev": torch.zeros(n_envs, dtype=torch.bool)}
        if state["tok_cache"] is not None and bool(starts.any()):
            per_camera = starts.repeat_interleave(tokenizer.cfg.n_cameras)
            state["tok_cache"] = reset_cache(state["tok_cache"], per_camera)
            state["dyn_cache"] = reset_cache(state["dyn_cache"], starts)
        state["has_prev"] = state["has_prev"] & ~starts
        latents, tok_cache = encode_step(tokenizer, self.tokenizer_params, frames[:, None], state["tok_cache"])
        dyn_cache = state["dyn_cache"]
        if dyn_cache is None:
            dyn_cache = empty_cache(n_envs)
        prev = state["prev_action"]
        if prev is None:
            prev = self._random_action(torch.Size([n_envs])).zero_()
        model_fn = world_model_fn(dynamics, self.agent_params["dynamics"])
        agent_out, dyn_cache = commit_frames(model_fn, dynamics.cfg, latents, prev[:, None], state["has_prev"][:, None],
                                             dyn_cache, self.generator)
        dist = policy_dist(heads, self.agent_params["heads", "policy"], agent_out[:, -1])
        action = dist.mode() if self.greedy else dist.sample(self.generator)
        action = action.to(self.action_spec.dtype)
        # Keep context-1 steps so the next call sees `context` frames, as many as a training row holds.
        state["tok_cache"] = keep_last_steps(tok_cache, self.context - 1)
        state["dyn_cache"] = keep_last_steps(dyn_cache, self.context - 1)
        state["prev_action"] = action
        state["has_prev"] = torch.ones(n_envs, dtype=torch.bool)
        self._state = state
        return action


def agent_params_from_states(world_model_state: TensorDictBase, agent_state: TensorDictBase | None) -> TensorDict:
    """Acting params: the world model's dynamics and reward head with the imagination-trained policy and value
    heads when there are any (before imagination starts, the behaviour-cloning policy head acts)."""
    params = world_model_state["params"]
    heads = params["heads"].clone(recurse=False)
    if agent_state is not None:
        heads["policy"] = agent_state["params", "policy"]
        heads["value"] = agent_state["params", "value"]
    return TensorDict({"dynamics": params["dynamics"], "heads": heads})
