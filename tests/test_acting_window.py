"""The acting policy's window: after a parameter update (or the random prefill) the policy rebuilds its caches from
the recent frames, so it acts with the history it had, not from one frame."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict
from torchrl.data import Bounded

from d4func.heads import policy_dist
from d4func.train.acting import WorldModelPolicy, agent_params_from_states
from d4func.train.phases import build_models, init_states
from d4func.train.run_config import load_run_config

DEBUG = "experiments/configs/debug.yaml"
# A context at signal 1 (no re-noising) makes observing deterministic, so a rebuilt cache can be compared with the
# cache grown frame by frame.
CFG = load_run_config(DEBUG, ["dynamics.context_noise=0.0", "dynamics.forcing=teacher"])
MODELS = build_models(CFG)
STATES = init_states(CFG, MODELS)
PARAMS = (STATES["tokenizer"]["params"], agent_params_from_states(STATES["world_model"], None))


def make_policy(context: int = 4, random_until: int = 0) -> WorldModelPolicy:
    policy = WorldModelPolicy(MODELS.tokenizer, MODELS.dynamics, MODELS.heads, Bounded(-1.0, 1.0, shape=(1,)),
                              context=context, seed=0, greedy=True, random_until=random_until)
    policy.update_params(*PARAMS)
    return policy


def frames_of(seed: int, steps: int, n_envs: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((steps, n_envs, 3, 32, 32), generator=generator)


def act(policy: WorldModelPolicy, frames: torch.Tensor, is_init: torch.Tensor) -> torch.Tensor:
    td = TensorDict({"pixels": frames, "is_init": is_init[:, None]}, batch_size=[frames.shape[0]])
    return policy(td).get("action")


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), steps=st.integers(2, 6), context=st.integers(2, 6),
       starts=st.lists(st.tuples(st.integers(1, 5), st.integers(0, 1)), max_size=3),
       updates=st.sets(st.integers(1, 5)))
def test_rebuilt_caches_act_as_caches_grown_frame_by_frame(seed, steps, context, starts, updates):
    # While every episode fits in the window, the rebuild sees what acting saw. Past that they differ by design:
    # the causal tokenizer encodes a window's first frame without the frames before it, as it encodes a training
    # row's first frame, where acting had encoded it with its longer history.
    steps = min(steps, context)
    frames = frames_of(seed, steps, n_envs=2)
    is_init = torch.zeros(steps, 2, dtype=torch.bool)
    is_init[0] = True
    for step, env in starts:  # episodes restart at different steps in the two envs: ragged windows
        if step < steps:
            is_init[step, env] = True
    steady, updated = make_policy(context), make_policy(context)
    for step in range(steps):
        if step in updates:
            updated.update_params(*PARAMS)  # same weights: the rebuilt caches must give the same actions
        torch.testing.assert_close(act(updated, frames[step], is_init[step]), act(steady, frames[step], is_init[step]),
                                   rtol=1e-5, atol=1e-5)


def test_the_first_action_after_an_update_reads_the_frames_before_it():
    frames = frames_of(0, 4, n_envs=1)
    is_init = torch.tensor([[True], [False], [False], [False]])
    actions = []
    for first_frame in (frames[0], 1 - frames[0]):
        policy = make_policy(context=4)
        for step in range(4):
            if step == 3:
                policy.update_params(*PARAMS)
            action = act(policy, first_frame if step == 0 else frames[step], is_init[step])
        actions.append(action)
    assert not torch.allclose(actions[0], actions[1])  # before the window, an update left only the newest frame


def test_the_first_model_action_after_the_random_prefill_reads_the_prefill_frames():
    frames = frames_of(1, 4, n_envs=1)
    is_init = torch.tensor([[True], [False], [False], [False]])
    actions = []
    for first_frame in (frames[0], 1 - frames[0]):
        torch.manual_seed(0)  # the same random prefill actions (action_spec.rand draws from the global RNG)
        policy = make_policy(context=4, random_until=3)
        for step in range(4):
            action = act(policy, first_frame if step == 0 else frames[step], is_init[step])
        actions.append(action)
    assert not torch.allclose(actions[0], actions[1])


def test_a_saved_window_resumes_the_same_actions():
    frames = frames_of(2, 6, n_envs=2)
    is_init = torch.zeros(6, 2, dtype=torch.bool)
    is_init[0] = True
    is_init[2, 1] = True
    through = make_policy()
    for step in range(3):
        act(through, frames[step], is_init[step])
    resumed = make_policy()
    resumed.load_window(through.window_state())
    resumed.generator.set_state(through.generator.get_state())
    for step in range(3, 6):
        torch.testing.assert_close(act(resumed, frames[step], is_init[step]), act(through, frames[step], is_init[step]),
                                   rtol=1e-5, atol=1e-5)


def test_reset_context_forgets_the_window_and_a_bad_window_is_refused():
    policy = make_policy()
    act(policy, frames_of(3, 1, n_envs=1)[0], torch.tensor([True]))
    assert policy.window_state()["length"].tolist() == [1]
    policy.reset_context()
    assert policy.window_state() is None
    try:
        policy.load_window({"frames": torch.zeros(1)})
    except ValueError as error:
        assert "frames" in str(error) and "prev_action" in str(error)
    else:
        raise AssertionError("a window without its actions was accepted")


def test_a_window_saved_under_another_context_is_started_afresh():
    frames = frames_of(4, 3, n_envs=1)
    is_init = torch.tensor([[True], [False], [False]])
    saved = make_policy(context=5)
    for step in range(2):
        act(saved, frames[step], is_init[step])
    resumed = make_policy(context=3)  # e.g. a resume under a shorter replay.seq_len
    resumed.load_window(saved.window_state())
    act(resumed, frames[2], is_init[2])
    window = resumed.window_state()
    assert window["frames"].shape[1] == 3 and window["length"].tolist() == [1]  # a new episode from this frame


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), context=st.integers(2, 5), extra=st.integers(1, 4),
       restarts=st.lists(st.tuples(st.integers(1, 8), st.integers(0, 1)), max_size=2))
def test_a_slid_window_rebuilds_as_its_frames_observed_afresh(seed, context, extra, restarts):
    # Once episodes outgrow the window, the rebuild must see what a training row sees: the window's (or the
    # episode's) first frame without an action into it, every later frame with the action acting took before it.
    steps = context + extra
    frames = frames_of(seed, steps, n_envs=2)
    is_init = torch.zeros(steps, 2, dtype=torch.bool)
    is_init[0] = True
    for step, env in restarts:
        if step < steps:
            is_init[step, env] = True
    policy = make_policy(context)
    emitted = []
    for step in range(steps):
        if step == steps - 1:
            policy.update_params(*PARAMS)  # the last action comes from caches rebuilt from the window
        emitted.append(act(policy, frames[step], is_init[step]))
    last = steps - 1
    for env in range(2):
        episode_start = max(s for s in range(steps) if is_init[s, env])
        first = max(last - context + 1, episode_start)
        reference = make_policy(context)
        span = slice(first, steps)
        actions = torch.stack([emitted[s - 1][env] if s > first else torch.zeros(1) for s in range(first, steps)])
        agent_out = reference._observe(frames[span, env][None], torch.tensor([True]), actions[None],
                                       (torch.arange(first, steps) > first)[None])
        expected = policy_dist(MODELS.heads, PARAMS[1]["heads", "policy"], agent_out).mode()
        torch.testing.assert_close(emitted[-1][env], expected[0], rtol=1e-5, atol=1e-5)


def test_a_window_of_other_frames_or_actions_is_started_afresh():
    frames = frames_of(5, 2, n_envs=1)
    is_init = torch.tensor([[True], [False]])
    saved = make_policy()
    act(saved, frames[0], is_init[0])
    for mismatch in ("dtype", "action"):
        window = saved.window_state()
        resumed = make_policy()
        if mismatch == "dtype":  # e.g. a resume whose env now gives uint8 pixels
            window["frames"] = window["frames"].to(torch.float64)
        else:  # a resume under another action space
            window["prev_action"] = torch.zeros(1, 2)
            window["actions"] = torch.zeros(1, 4, 2)
        resumed.load_window(window)
        act(resumed, frames[1], is_init[1])
        resumed_window = resumed.window_state()
        assert resumed_window["length"].tolist() == [1], mismatch
        assert resumed_window["frames"].dtype == frames.dtype and resumed_window["prev_action"].shape == (1, 1)


def sensitive_params() -> tuple:
    """PARAMS with a policy head whose output layer is random at a moderate scale: the fresh head's output layer
    starts at zero, so its mode ignores the agent token and no action comparison could see a wiring error."""
    tokenizer_params, agent_params = PARAMS
    agent_params = agent_params.clone()
    weight = agent_params["heads", "policy", "out", "weight"]
    agent_params["heads", "policy", "out", "weight"] = 0.1 * torch.randn(weight.shape,
                                                                        generator=torch.Generator().manual_seed(0))
    return tokenizer_params, agent_params


def test_the_window_records_every_action_taken_as_the_action_into_the_next_frame():
    policy = WorldModelPolicy(MODELS.tokenizer, MODELS.dynamics, MODELS.heads, Bounded(-1.0, 1.0, shape=(1,)),
                              context=6, seed=0, greedy=False)
    policy.update_params(*sensitive_params())
    frames = frames_of(2, 5, n_envs=1)
    emitted = [act(policy, frames[step], torch.tensor([step == 0])) for step in range(5)]
    window = policy.window_state()
    torch.testing.assert_close(window["actions"][:, -4:], torch.stack(emitted[:4], dim=1))
    assert window["has_action"][0].tolist() == [False, False, True, True, True, True]  # an empty slot, then frame 0
    torch.testing.assert_close(window["prev_action"], emitted[4])
    assert len({round(float(a), 4) for a in emitted}) > 1  # sampled: the actions differ, so a shift would show


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), context=st.integers(2, 5))
def test_with_a_responsive_policy_rebuilt_caches_act_as_caches_grown_frame_by_frame(seed, context):
    """As the test above, with a policy head that reads the agent token, and an episode as long as the window:
    the newest frame must be observed under the action that led into it on both paths."""
    frames = frames_of(seed, context, n_envs=1)
    steady, updated = make_policy(context), make_policy(context)
    for policy in (steady, updated):
        policy.update_params(*sensitive_params())
    for step in range(context):
        updated.update_params(*sensitive_params())  # a rebuild before every action
        is_init = torch.tensor([step == 0])
        torch.testing.assert_close(act(updated, frames[step], is_init), act(steady, frames[step], is_init),
                                   rtol=1e-5, atol=1e-6)


def test_caches_keep_one_frame_less_than_the_context():
    """After more steps than the context, both caches hold context - 1 steps, so the next frame is observed beside
    as many frames as a training row holds."""
    policy = make_policy(context=3)
    frames = frames_of(3, 6, n_envs=1)
    for step in range(6):
        act(policy, frames[step], torch.tensor([step == 0]))
    assert policy._caches["tokenizer"]["valid"].shape[1] == 2
    assert policy._caches["dynamics"]["valid"].shape[1] == 2
