"""DeepMind Control Suite from pixels as a TorchRL env (single or multi-camera).

The world model sees only frames (paper Sec. 4: agents learn from pixels), so the env returns rendered images
and no proprioceptive state. Each step yields

- ``"pixels"``: float32 in [0, 1], ``[C, H, W]`` for one camera or ``[n_cams, C, H, W]`` for several cameras
  (the tokenizer's multi-camera path concatenates the cameras' tokens, plan Sec. 6);
- ``"reward"`` (``[1]`` float32, summed over the repeated physics steps), ``"done"``, ``"terminated"`` and
  ``"truncated"`` (``[1]`` bool; DMC episodes end by time limit, i.e. truncated);
- ``"step_count"`` (``[1]`` int64, agent steps since reset) and ``"is_init"`` (``[1]`` bool, True on the first
  observation of an episode), which the replay sampler and the acting policy use to find episode boundaries.

Actions are float32 in [-1, 1]; tasks whose native bounds differ are rescaled affinely before stepping. An action
that is not finite, lies outside [-1, 1] by more than :data:`ACTION_TOLERANCE`, or has the wrong shape raises a
``ValueError`` naming it (clipping it instead would hide a broken policy, and a NaN would only surface later as
MuJoCo's ``mjWARN_BADCTRL``, which does not name the value).

Design choice: action repeat and multi-camera rendering live in one ``dm_env`` wrapper beneath TorchRL's
``DMControlWrapper`` rather than in TorchRL's ``FrameSkipTransform``: the transform would render a frame on
every repeated physics step only to discard it, and software (EGL on CPU) rendering dominates the step cost.
"""

from __future__ import annotations

import os

# EGL is the renderer that works headless here (osmesa does not); set before dm_control is imported anywhere.
os.environ.setdefault("MUJOCO_GL", "egl")

from collections import OrderedDict  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchrl.envs import (  # noqa: E402
    Compose,
    DoubleToFloat,
    InitTracker,
    StepCounter,
    ToTensorImage,
    TransformedEnv,
)
from torchrl.envs.libs.dm_control import DMControlWrapper  # noqa: E402

from d4func.envs.resumable import numpy_random_state, set_numpy_random_state  # noqa: E402

# isort: split
# dm_control after torchrl on purpose: torchrl -> tensordict imports torch._dynamo, which loads triton; importing
# triton after dm_control (EGL) segfaults in triton's native library load (seen: torch 2.14, mujoco 3.17).
from dm_control import suite  # noqa: E402
from dm_control.suite.wrappers import pixels  # noqa: E402
from dm_env import Environment, StepType, TimeStep, specs  # noqa: E402

if TYPE_CHECKING:
    from dm_control.mujoco import Physics
    from dm_control.rl.control import Environment as ControlEnvironment
    from numpy.typing import ArrayLike

__all__ = ["ACTION_TOLERANCE", "MultiCameraRepeatWrapper", "ResumableDMControlWrapper", "check_unit_action",
           "innermost_control", "make_dmc_env", "parse_dmc_name", "physics_state", "restore_physics_state"]

# Slack beyond [-1, 1] that is clipped rather than rejected: float32 rounding of an action drawn at the bound
# (e.g. low + u * (high - low), or a rescaled sample) can land a few ulps outside the box.
ACTION_TOLERANCE = 1e-6


def check_unit_action(action: ArrayLike, shape: tuple[int, ...], tolerance: float = ACTION_TOLERANCE) -> np.ndarray:
    """``action`` as float64 of ``shape``, clipped to [-1, 1]; raises ``ValueError`` naming any entry that is not
    finite or lies outside [-1, 1] by more than ``tolerance``, or a shape other than ``shape``."""
    action = np.asarray(action, dtype=np.float64)
    if action.shape != tuple(shape):
        raise ValueError(f"DMC action must have shape {tuple(shape)}, got shape {action.shape}: {action.tolist()}")
    bad = ~np.isfinite(action) | (np.abs(action) > 1.0 + tolerance)
    if bad.any():
        entries = ", ".join(
            f"{float(action[idx])!r} at index {idx[0] if len(idx) == 1 else idx}"
            for idx in (tuple(int(i) for i in where) for where in np.argwhere(bad))
        )
        raise ValueError(
            f"DMC action entries must be finite and in [-1, 1] (tolerance {tolerance:g}), got {entries} "
            f"in action {action.tolist()}"
        )
    return np.clip(action, -1.0, 1.0)


class MultiCameraRepeatWrapper(pixels.Wrapper):
    """``dm_env`` wrapper: action repeat, actions rescaled from [-1, 1], frames from one or several cameras.

    Subclasses dm_control's pixel wrapper so that TorchRL's ``DMControlWrapper`` accepts it (and seeds the
    task's RNG through it). ``step`` repeats the action ``action_repeat`` times, sums the rewards, multiplies
    the discounts, stops early at the end of an episode, and renders once at the end.
    """

    def __init__(
        self,
        env: ControlEnvironment,
        camera_ids: Sequence[int],
        height: int,
        width: int,
        action_repeat: int,
    ) -> None:
        camera_ids = tuple(int(c) for c in camera_ids)
        if len(camera_ids) == 0:
            raise ValueError("camera_ids must name at least one camera, got an empty tuple")
        n_cams = env.physics.model.ncam
        for c in camera_ids:
            if not 0 <= c < n_cams:
                raise ValueError(
                    f"camera id {c} out of range: this task has {n_cams} cameras (0..{n_cams - 1})"
                )
        if action_repeat < 1:
            raise ValueError(f"action_repeat must be >= 1, got {action_repeat}")
        super().__init__(
            env,
            pixels_only=True,
            render_kwargs={"height": height, "width": width, "camera_id": camera_ids[0]},
        )
        self._camera_ids = camera_ids
        self._height = height
        self._width = width
        self._action_repeat = action_repeat
        shape = (height, width, 3) if len(camera_ids) == 1 else (len(camera_ids), height, width, 3)
        self._observation_spec = OrderedDict(
            pixels=specs.BoundedArray(shape=shape, dtype=np.uint8, minimum=0, maximum=255, name="pixels")
        )

        native = env.action_spec()
        self._native_low = np.broadcast_to(np.asarray(native.minimum, dtype=np.float64), native.shape)
        self._native_high = np.broadcast_to(np.asarray(native.maximum, dtype=np.float64), native.shape)
        if not (np.all(np.isfinite(self._native_low)) and np.all(np.isfinite(self._native_high))):
            raise ValueError(f"action bounds must be finite to rescale to [-1, 1], got {native}")
        self._action_spec = specs.BoundedArray(
            shape=native.shape, dtype=np.float64, minimum=-1.0, maximum=1.0, name=native.name
        )

    def action_spec(self) -> specs.BoundedArray:
        return self._action_spec

    def _render(self) -> np.ndarray:
        frames = [
            self._env.physics.render(height=self._height, width=self._width, camera_id=c)
            for c in self._camera_ids
        ]
        return frames[0] if len(frames) == 1 else np.stack(frames, 0)

    def _add_pixel_observation(self, time_step: TimeStep) -> TimeStep:
        return time_step._replace(observation=OrderedDict(pixels=self._render()))

    def step(self, action: ArrayLike) -> TimeStep:
        action = check_unit_action(action, self._action_spec.shape)
        # [-1, 1] -> native [low, high]; identity for the usual DMC bounds.
        unit = (action + 1.0) * 0.5
        native = self._native_low + unit * (self._native_high - self._native_low)
        reward, discount = 0.0, 1.0
        for _ in range(self._action_repeat):
            time_step = self._env.step(native)
            reward += time_step.reward or 0.0
            discount *= 1.0 if time_step.discount is None else time_step.discount
            if time_step.step_type == StepType.LAST:
                break
        time_step = time_step._replace(reward=reward, discount=discount)
        return self._add_pixel_observation(time_step)


def parse_dmc_name(name: str) -> tuple[str, str, tuple[int, ...]]:
    """``"cartpole-swingup"`` -> ``("cartpole", "swingup", (0,))``; ``"cartpole-swingup@0,1"`` -> cams (0, 1).

    The ``dmc:`` prefix used by ``d4func collect`` is accepted and stripped.
    """
    body = name.removeprefix("dmc:")
    cams: tuple[int, ...] = (0,)
    if "@" in body:
        body, cam_text = body.split("@", 1)
        try:
            cams = tuple(int(c) for c in cam_text.split(","))
        except ValueError as e:
            raise ValueError(
                f"bad camera list {cam_text!r} in env name {name!r}; expected e.g. '@0,1'"
            ) from e
    if body.count("-") != 1:
        raise ValueError(f"bad DMC env name {name!r}; expected 'domain-task' such as 'cartpole-swingup'")
    domain, task = body.split("-")
    return domain, task, cams


def innermost_control(dm_env: Environment) -> ControlEnvironment | None:
    """The innermost dm_control ``control.Environment`` beneath a ``dm_env`` (the one that counts steps toward the
    time limit), else None: wrappers delegate attribute reads to it, so look in each object's own ``__dict__``."""
    inner = dm_env
    while inner is not None and "_step_count" not in vars(inner):
        inner = getattr(inner, "_env", None)
    return inner


def physics_state(physics: Physics, control: ControlEnvironment | None = None) -> dict:
    """A DMControl episode's state mid-episode, as tensors and primitives: the physics state, its time, the solver's
    warm start (the next step's constraint solve starts from it, so without it a restored contact-rich state drifts
    from the original at round-off level) and, with `control`, the episode's step count (which the time limit
    reads)."""
    return {"physics": torch.from_numpy(physics.get_state().copy()), "time": float(physics.data.time),
            "warmstart": torch.from_numpy(physics.data.qacc_warmstart.copy()),
            "step_count": None if control is None else int(control._step_count)}


def restore_physics_state(physics: Physics, state: dict, control: ControlEnvironment | None = None) -> None:
    """Put back a `physics_state` (the step count too, where both it and `control` are given)."""
    with physics.reset_context():  # recomputes derived quantities (positions, contacts) from the state
        physics.set_state(state["physics"].numpy())
    physics.data.time = state["time"]  # reset_context zeroes it, and the warm start
    physics.data.qacc_warmstart[:] = state["warmstart"].numpy()
    if control is not None and state["step_count"] is not None:
        control._step_count = state["step_count"]


# Model arrays that suite tasks rewrite at each episode start (reacher's and fish's target geom, finger's target
# site, swimmer's target and its light, manipulator's and stacker's bodies, point_mass-hard's wrap, quadruped's
# terrain): the episode's layout lives in the model, not in the physics state, so a resume must carry them.
EPISODE_MODEL_FIELDS = ("body_pos", "body_quat", "geom_pos", "geom_quat", "geom_size", "geom_rgba", "site_pos",
                        "site_quat", "light_pos", "light_dir", "wrap_prm", "hfield_data")


def episode_model_state(physics: Physics) -> dict[str, torch.Tensor]:
    """Copies of the model arrays an episode start may rewrite (`EPISODE_MODEL_FIELDS`)."""
    return {name: torch.from_numpy(getattr(physics.model, name).copy()) for name in EPISODE_MODEL_FIELDS}


def restore_episode_model_state(physics: Physics, state: dict[str, torch.Tensor]) -> None:
    """Put back an `episode_model_state`; a changed terrain is uploaded to a rendering context already made (one
    made later reads the model as it is)."""
    hfield_changed = False
    for name, value in state.items():
        target = getattr(physics.model, name)
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(f"model field {name} has shape {tuple(target.shape)} in this env but "
                             f"{tuple(value.shape)} in the saved state: saved from another task?")
        hfield_changed |= name == "hfield_data" and not np.array_equal(target, value.numpy())
        target[...] = value.numpy()
    contexts = getattr(physics, "_contexts", None)
    if hfield_changed and contexts is not None:
        from dm_control.mujoco.wrapper.mjbindings import mjlib

        with contexts.gl.make_current() as ctx:
            for hfield in range(physics.model.nhfield):
                ctx.call(mjlib.mjr_uploadHField, physics.model.ptr, contexts.mujoco.ptr, hfield)


class ResumableDMControlWrapper(DMControlWrapper):
    """TorchRL's ``DMControlWrapper`` with the runtime state of an episode (``d4func.envs.resumable``), so an online
    run resumed from a checkpoint continues the interrupted episode, and the episodes after it start from the same
    random initial states, bitwise as an uninterrupted run.

    The state: `physics_state` (physics, time, solver warm start, step count toward the time limit), the model
    arrays the episode's start rewrote (`EPISODE_MODEL_FIELDS`: reacher's target, say), whether dm_control's next
    step resets, and the task's RNG (initial states of the next episodes). Tensors and primitives only:
    checkpoints load with ``weights_only=True``.
    """

    def _control(self):
        control = innermost_control(self._env)
        if control is None:
            raise TypeError(f"no dm_control control.Environment beneath {type(self._env).__name__}")
        return control

    def get_resume_state(self) -> dict:
        control = self._control()
        return {
            **physics_state(control.physics, control),
            "model": episode_model_state(control.physics),
            "reset_next_step": bool(control._reset_next_step),
            "task_random": numpy_random_state(control.task.random),
        }

    def set_resume_state(self, state: dict) -> None:
        control = self._control()
        if "model" in state:  # states saved before it was kept hold none (their resumed episodes keep a new layout)
            restore_episode_model_state(control.physics, state["model"])
        restore_physics_state(control.physics, state, control)
        control._reset_next_step = state["reset_next_step"]
        set_numpy_random_state(control.task.random, state["task_random"])


def make_dmc_env(
    domain: str,
    task: str,
    image_size: int = 64,
    action_repeat: int = 2,
    camera_ids: tuple[int, ...] = (0,),
    seed: int = 0,
    device: torch.device | str = "cpu",
    *,
    time_limit: float | None = None,
    max_steps: int | None = None,
) -> TransformedEnv:
    """A DMC task from pixels rendered directly at ``image_size`` (no resize), with action repeat.

    ``seed`` seeds the task's RNG (initial states): the same seed and actions give the same episodes.
    ``time_limit`` (seconds of simulated time) overrides the task's episode length (cartpole: 10 s = 1000
    physics-control steps = 500 agent steps at action repeat 2); short limits make short episodes for tests.
    ``max_steps`` instead truncates episodes after that many agent steps (TorchRL's ``StepCounter``).
    See the module docstring for the keys and shapes of each step.
    """
    if (domain, task) not in suite.ALL_TASKS:
        raise ValueError(f"unknown DMC task {domain!r}-{task!r}; see dm_control.suite.ALL_TASKS")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if time_limit is not None and time_limit <= 0:
        raise ValueError(f"time_limit must be positive seconds, got {time_limit}")
    task_kwargs = {"random": seed}
    if time_limit is not None:
        task_kwargs["time_limit"] = time_limit
    raw = suite.load(domain, task, task_kwargs=task_kwargs)
    wrapped = MultiCameraRepeatWrapper(
        raw, camera_ids=camera_ids, height=image_size, width=image_size, action_repeat=action_repeat
    )
    base = ResumableDMControlWrapper(wrapped, device=device)
    base.set_seed(seed)
    env = TransformedEnv(
        base,
        Compose(
            # uint8 [..., H, W, 3] -> float32 [..., 3, H, W] in [0, 1] (x / 255)
            ToTensorImage(in_keys=["pixels"]),
            # DMC specs are float64; the models run in float32
            DoubleToFloat(),
            StepCounter(max_steps=max_steps),
            InitTracker(),
        ),
    )
    low, high = env.action_spec.space.low, env.action_spec.space.high
    if not (bool((low == -1).all()) and bool((high == 1).all())):
        raise RuntimeError(f"action spec must be [-1, 1] after rescaling, got [{low}, {high}]")
    return env
