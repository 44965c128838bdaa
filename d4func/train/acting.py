"""The acting policy: the functional tokenizer, dynamics model and policy head as a TorchRL policy module.

State lives here, at the edge (DESIGN principle 4): per environment, the tokenizer encoder's and the dynamics
model's time-layer KV caches (a sliding window of `context` frames: `transformer.keep_last_steps`, which says
where a trimmed cache differs from encoding the window afresh), and the window itself: the last `context` raw
frames with the actions that led into them. Each call

1. encodes the new frame with the tokenizer's cache (`tokenizer.encode_step`: the tokenizer is causal in time);
2. commits it to the dynamics model's cache at the context signal level, with the action that led into it
   (`imagination.commit_frames` — the same call imagination uses, so the policy sees real and imagined frames
   alike), reading the agent tokens;
3. samples an action from the policy head (or takes its mode with `greedy=True`).

On an episode start (`is_init`) an env's caches and window forget everything before (`transformer.reset_cache`).
Until `random_until` steps have been taken the module acts uniformly at random (replay prefill) without touching
the models. Parameters are replaced with `update_params` after each training round; nothing is copied into
modules. Caches computed with old weights (or none, after the random prefill) are rebuilt from the window by
observing its frames again with the new weights, so a policy acts after every update with the history a training
row shows, not from a single frame. The window is runtime state: `window_state` / `load_window` carry it through a
checkpoint, so a resumed run acts as an uninterrupted one.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torch import Tensor
from torchrl.data import TensorSpec

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
        action_spec: TensorSpec,
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
        self._caches: dict[str, TensorDict | None] | None = None
        self._window: dict[str, Tensor] | None = None

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
        caches were computed with the old weights: they are dropped and rebuilt from the window on the next call."""
        self.tokenizer_params = tokenizer_params
        self.agent_params = agent_params
        self._caches = None

    def reset_context(self) -> None:
        """Forget every env's history (caches and window): the next call starts new episodes."""
        self._caches = None
        self._window = None

    def window_state(self) -> dict[str, Tensor] | None:
        """The window of recent frames and actions (None before the first call), for a checkpoint."""
        return None if self._window is None else {key: value.clone() for key, value in self._window.items()}

    def load_window(self, window: dict[str, Tensor] | None) -> None:
        """Continue from a saved `window_state`: the next call rebuilds the caches from it."""
        if window is not None and set(window) != WINDOW_KEYS:
            raise ValueError(f"an acting window holds {sorted(WINDOW_KEYS)}, got {sorted(window)}")
        self._window = None if window is None else {key: value.clone() for key, value in window.items()}
        self._caches = None

    def _random_action(self, batch_shape: torch.Size) -> Tensor:
        return self.action_spec.rand(batch_shape)

    @torch.no_grad()
    def forward(self, td: TensorDictBase) -> TensorDictBase:
        tokenizer = self._models[0]
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
        starts = self._remember(frames, starts)
        self.steps_taken += n_envs
        if self.steps_taken <= self.random_until or self.agent_params is None:
            action = self._random_action(torch.Size([n_envs]))
            self._caches = None  # no model has seen these frames: the first model call rebuilds from the window
        else:
            agent_out = self._observe_newest(starts) if self._caches is not None else self._rebuild()
            dist = policy_dist(self._models[2], self.agent_params["heads", "policy"], agent_out)
            action = dist.mode() if self.greedy else dist.sample(self.generator)
            action = action.to(self.action_spec.dtype)
        self._window["prev_action"] = action.clone()
        td.set("action", action[0] if unbatched else action)
        return td

    def _remember(self, frames: Tensor, starts: Tensor) -> Tensor:
        """Slide the window by the new frame [E, ...] and the action that led into it (none on an episode start)
        -> the episode starts, every env's when the window is new."""
        n_envs = frames.shape[0]
        window = self._window
        # A new window for new envs, and for a saved one that does not fit these frames and actions (a resume under a
        # changed replay.seq_len, image size or action space): sliding would keep its old length and the rebuild
        # would read the wrong slots, or the new frames would be cast to the old dtype.
        if window is None or not self._window_fits(window, frames):
            starts = torch.ones_like(starts)
            self._caches = None
            prev = self._random_action(torch.Size([n_envs])).zero_()
            window = {"frames": torch.zeros((n_envs, self.context, *frames.shape[1:]), dtype=frames.dtype),
                      "actions": torch.zeros((n_envs, self.context, *prev.shape[1:]), dtype=prev.dtype),
                      "has_action": torch.zeros(n_envs, self.context, dtype=torch.bool),
                      "length": torch.zeros(n_envs, dtype=torch.long), "prev_action": prev}
        has_action = ~starts & (window["length"] > 0)

        def slide(old: Tensor, new: Tensor) -> Tensor:
            return torch.cat([old[:, 1:], new[:, None].to(old.dtype)], dim=1)

        self._window = {
            "frames": slide(window["frames"], frames),
            "actions": slide(window["actions"], torch.where(expand_like(has_action, window["prev_action"]),
                                                            window["prev_action"], 0)),
            "has_action": slide(window["has_action"], has_action),
            "length": torch.where(starts, 1, (window["length"] + 1).clamp(max=self.context)),
            "prev_action": window["prev_action"],
        }
        return starts

    def _window_fits(self, window: dict[str, Tensor], frames: Tensor) -> bool:
        """Whether a window can slide on by these frames `[E, ...]` and this policy's actions."""
        action = self.action_spec.zero(torch.Size([frames.shape[0]]))  # not rand: that would draw from the global RNG
        return (window["frames"].shape == (frames.shape[0], self.context, *frames.shape[1:])
                and window["frames"].dtype == frames.dtype
                and window["prev_action"].shape == action.shape and window["prev_action"].dtype == action.dtype)

    def _observe(self, frames: Tensor, starts: Tensor, actions: Tensor, has_action: Tensor) -> Tensor:
        """Frames `[E, n, ...]` per env into the caches (after forgetting an env's history where `starts`), with the
        actions that led into them -> the newest frame's agent tokens."""
        tokenizer, dynamics, _ = self._models
        n_envs = frames.shape[0]
        if self._caches is None:
            self._caches = {"tokenizer": None, "dynamics": empty_cache(n_envs)}
        elif bool(starts.any()):
            self._caches = {"tokenizer": reset_cache(self._caches["tokenizer"],
                                                     starts.repeat_interleave(tokenizer.cfg.n_cameras)),
                            "dynamics": reset_cache(self._caches["dynamics"], starts)}
        latents, tok_cache = encode_step(tokenizer, self.tokenizer_params, frames, self._caches["tokenizer"])
        model_fn = world_model_fn(dynamics, self.agent_params["dynamics"])
        agent_out, dyn_cache = commit_frames(model_fn, dynamics.cfg, latents, actions, has_action,
                                             self._caches["dynamics"], self.generator)
        # Keep context-1 steps so the next call sees `context` frames, as many as a training row holds.
        self._caches = {"tokenizer": keep_last_steps(tok_cache, self.context - 1),
                        "dynamics": keep_last_steps(dyn_cache, self.context - 1)}
        return agent_out[:, -1]

    def _observe_newest(self, starts: Tensor) -> Tensor:
        window = self._window
        return self._observe(window["frames"][:, -1:], starts, window["actions"][:, -1:],
                             window["has_action"][:, -1:])

    def _rebuild(self) -> Tensor:
        """Fresh caches from the window: its frames observed again, oldest first, with the current weights.

        The window holds at most `context` frames, so no cache is trimmed on the way and one call per model observes
        them all, as a training row is encoded. Like a row's, the window's first frame is encoded without the frames
        before it and without the action into it, where acting had both: the latents and agent tokens differ by that. An
        env with a shorter history (a recent episode start) starts at its first frame of this episode: the window is
        cut there, and the frames before are observed by every env and forgotten by that one (`reset_cache`)."""
        window = self._window
        first = self.context - window["length"]
        cuts = sorted(set(first.tolist()))
        # A training row's first frame has no action leading into it (dynamics.actions_into_frames): nor has the
        # window's, whose action came from a frame that has slid out.
        has_action = window["has_action"].clone()
        has_action[:, 0] = False
        self._caches = None
        agent_out = None
        for begin, end in zip(cuts, [*cuts[1:], self.context], strict=True):
            span = slice(begin, end)
            agent_out = self._observe(window["frames"][:, span], first == begin, window["actions"][:, span],
                                      has_action[:, span])
        return agent_out


WINDOW_KEYS = {"frames", "actions", "has_action", "length", "prev_action"}


def expand_like(mask: Tensor, like: Tensor) -> Tensor:
    """A per-env mask [E] broadcast against a per-env tensor [E, ...]."""
    return mask.reshape(mask.shape + (1,) * (like.dim() - 1))


def agent_params_from_states(world_model_state: TensorDictBase, agent_state: TensorDictBase | None) -> TensorDict:
    """Acting params: the world model's dynamics and reward head with the imagination-trained policy and value
    heads when there are any (before imagination starts, the behaviour-cloning policy head acts)."""
    params = world_model_state["params"]
    heads = params["heads"].clone(recurse=False)
    if agent_state is not None:
        heads["policy"] = agent_state["params", "policy"]
        heads["value"] = agent_state["params", "value"]
    return TensorDict({"dynamics": params["dynamics"], "heads": heads})
