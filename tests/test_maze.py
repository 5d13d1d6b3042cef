"""Tests for the maze-navigation environment (warpopt.envs.maze)."""

import warnings

import numpy as np
import pytest

gym = pytest.importorskip("gymnasium")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from warpopt.envs import ACTION_DELTAS, OBS_DIM, MazeEnv, MazeVectorEnv, maze_layout  # noqa: E402

UP, DOWN, LEFT, RIGHT = 0, 1, 2, 3


def _free_cells(size):
    return [tuple(c) for c in np.argwhere(~maze_layout(size))]


def _is_free(size, pos):
    return not maze_layout(size)[int(pos[0]), int(pos[1])]


# ---------------------------------------------------------------------------- layout
@pytest.mark.parametrize("size", [5, 9, 11, 13])
def test_layout(size):
    walls = maze_layout(size)
    assert walls.shape == (size, size) and walls.dtype == bool
    assert walls[0].all() and walls[-1].all() and walls[:, 0].all() and walls[:, -1].all()
    centre = size // 2
    assert not walls[centre, centre]
    for r in range(1, size - 1):
        for c in range(1, size - 1):
            expected = r % 2 == 0 and c % 2 == 0 and (r, c) != (centre, centre)
            assert walls[r, c] == expected, (r, c)
    interior = (size - 2) ** 2
    pillars = ((size - 3) // 2) ** 2 - (1 if centre % 2 == 0 else 0)
    assert (~walls).sum() == interior - pillars
    env = MazeEnv(size=size)
    np.testing.assert_array_equal(env.layout, walls)
    assert len(env.free_cells) == interior - pillars


def test_default_size_is_11_with_65_free_cells():
    env = MazeEnv()
    assert env.layout.shape == (11, 11)
    assert len(env.free_cells) == 65


@pytest.mark.parametrize("size", [3, 4, 10, 0, -1])
def test_invalid_size(size):
    with pytest.raises(ValueError):
        maze_layout(size)
    with pytest.raises(ValueError):
        MazeEnv(size=size)


def test_invalid_arguments():
    with pytest.raises(ValueError):
        MazeEnv(episode_length=0)
    with pytest.raises(ValueError):
        MazeVectorEnv(num_envs=0)
    with pytest.raises(ValueError):
        MazeEnv(render_mode="human")


# ---------------------------------------------------------------------------- reset
@pytest.mark.parametrize("size", [9, 11, 13])
def test_reset_start_and_goal(size):
    env = MazeEnv(size=size)
    centre = (size // 2, size // 2)
    goals = set()
    for seed in range(40):
        obs, info = env.reset(seed=seed)
        assert env.agent_pos == centre and tuple(info["agent_pos"]) == centre
        goal = tuple(info["goal_pos"])
        assert goal == env.goal_pos and goal != centre and _is_free(size, goal)
        goals.add(goal)
        assert obs.dtype == np.float32 and obs.shape == (OBS_DIM,)
        assert obs[9] == 0 and obs[10] == 1 and obs[11] == 0 and obs[12] == 0
        assert not obs[13:].any()
        assert env.observation_space.contains(obs)
    assert len(goals) > 10  # goals vary across episodes


def test_step_before_reset_raises():
    with pytest.raises(RuntimeError):
        MazeEnv().step(0)
    with pytest.raises(RuntimeError):
        MazeVectorEnv(2).step(np.zeros(2, dtype=np.int64))


# ---------------------------------------------------------------------------- dynamics
@pytest.mark.parametrize("action", [UP, DOWN, LEFT, RIGHT])
def test_moves(action):
    env = MazeEnv()
    env.reset(seed=0)
    env.set_state(agent_pos=(3, 3), goal_pos=(9, 9))
    _, reward, terminated, truncated, info = env.step(action)
    assert reward == 0.0 and not terminated and not truncated
    expected = {UP: (-1, 0), DOWN: (1, 0), LEFT: (0, -1), RIGHT: (0, 1)}[action]
    assert tuple(ACTION_DELTAS[action]) == expected
    assert tuple(info["agent_pos"]) == (3 + expected[0], 3 + expected[1])


@pytest.mark.parametrize(
    "start, action",
    [((1, 1), UP), ((1, 1), LEFT), ((9, 9), DOWN), ((9, 9), RIGHT), ((1, 2), DOWN), ((3, 4), UP)],
)
@pytest.mark.parametrize("penalty", [0.0, 0.5])
def test_wall_bump_stays(start, action, penalty):
    env = MazeEnv(wall_penalty=penalty)
    env.reset(seed=1)
    env.set_state(agent_pos=start, goal_pos=(5, 5))
    obs, reward, _, _, info = env.step(action)
    assert tuple(info["agent_pos"]) == start
    assert reward == -penalty
    assert obs[12] == np.float32(-penalty)
    assert env.observation_space.contains(obs)


@pytest.mark.parametrize("action", [UP, DOWN, LEFT, RIGHT])
def test_goal_reward_and_teleport(action):
    env = MazeEnv()
    env.reset(seed=3)
    goal = (5, 5)
    start = (5 - ACTION_DELTAS[action][0], 5 - ACTION_DELTAS[action][1])
    env.set_state(agent_pos=start, goal_pos=goal)
    obs, reward, terminated, truncated, info = env.step(action)
    assert reward == 10.0 and obs[12] == 10.0
    assert not terminated and not truncated
    landed = tuple(info["agent_pos"])
    assert landed != goal and _is_free(11, landed)
    assert tuple(info["goal_pos"]) == goal == env.goal_pos  # goal fixed for the episode


def test_goal_reward_configurable():
    env = MazeEnv(goal_reward=3.5)
    env.reset(seed=0)
    env.set_state(agent_pos=(3, 3), goal_pos=(3, 4))
    _, reward, _, _, _ = env.step(RIGHT)
    assert reward == 3.5


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.sampled_from([5, 9, 11, 13]))
def test_teleport_never_lands_on_wall_or_goal(seed, size):
    env = MazeEnv(size=size, episode_length=10_000)
    env.reset(seed=seed)
    picker = np.random.default_rng(seed)
    free = _free_cells(size)
    for _ in range(100):
        goal = free[picker.integers(len(free))]
        options = [
            (a, (goal[0] - ACTION_DELTAS[a][0], goal[1] - ACTION_DELTAS[a][1]))
            for a in range(4)
            if _is_free(size, (goal[0] - ACTION_DELTAS[a][0], goal[1] - ACTION_DELTAS[a][1]))
        ]
        action, start = options[picker.integers(len(options))]
        env.set_state(agent_pos=start, goal_pos=goal)
        _, reward, _, _, info = env.step(action)
        landed = tuple(info["agent_pos"])
        assert reward == 10.0
        assert _is_free(size, landed) and landed != goal


def test_teleport_covers_all_non_goal_cells():
    env = MazeEnv(size=5, episode_length=10_000)
    env.reset(seed=0)
    landed = set()
    for _ in range(400):
        env.set_state(agent_pos=(1, 1), goal_pos=(1, 2))
        _, _, _, _, info = env.step(RIGHT)
        landed.add(tuple(info["agent_pos"]))
    assert landed == set(_free_cells(5)) - {(1, 2)}


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.sampled_from([5, 11]))
def test_random_walk_invariants(seed, size):
    env = MazeEnv(size=size, episode_length=150)
    env.reset(seed=seed)
    actions = np.random.default_rng(seed).integers(0, 4, size=150)
    for a in actions:
        before = env.agent_pos
        _, reward, _, _, info = env.step(a)
        pos = tuple(info["agent_pos"])
        assert _is_free(size, pos) and pos != tuple(info["goal_pos"])
        if reward == 0.0:  # plain move or bump: at most one cell away
            assert abs(pos[0] - before[0]) + abs(pos[1] - before[1]) <= 1


def test_truncation_exactly_at_episode_length():
    for length in (1, 7, 200):
        env = MazeEnv(episode_length=length)
        env.reset(seed=5)
        rng = np.random.default_rng(0)
        for t in range(1, length + 1):
            obs, _, terminated, truncated, _ = env.step(int(rng.integers(4)))
            assert terminated is False
            assert truncated is (t == length)
            assert obs[11] == np.float32(t / length)
            assert env.elapsed_steps == t
        with pytest.raises(RuntimeError):
            env.step(0)
        obs, _ = env.reset()
        assert obs[11] == 0 and env.elapsed_steps == 0


def test_invalid_action():
    env = MazeEnv()
    env.reset(seed=0)
    for bad in (4, -1, 1.5):
        with pytest.raises(ValueError):
            env.step(bad)


def test_set_state_validation():
    env = MazeEnv()
    env.reset(seed=0)
    with pytest.raises(ValueError):
        env.set_state(agent_pos=(2, 2))  # pillar
    with pytest.raises(ValueError):
        env.set_state(agent_pos=(0, 3))  # border
    with pytest.raises(ValueError):
        env.set_state(agent_pos=(3, 3), goal_pos=(3, 3))


# ---------------------------------------------------------------------------- observation
def test_observation_layout_along_trajectory():
    env = MazeEnv(wall_penalty=0.25)
    walls = maze_layout(11)
    obs, info = env.reset(seed=11)
    rng = np.random.default_rng(11)
    prev_reward, prev_action = 0.0, None
    hits = 0
    for t in range(1, 201):
        r, c = info["agent_pos"]
        np.testing.assert_array_equal(obs[:9], walls[r - 1 : r + 2, c - 1 : c + 2].reshape(-1))
        assert obs[4] == 0  # the agent's own cell
        assert obs[9] == 0 and obs[10] == 1
        assert obs[11] == np.float32((t - 1) / 200)
        assert obs[12] == np.float32(prev_reward)
        expected_onehot = np.zeros(4, dtype=np.float32)
        if prev_action is not None:
            expected_onehot[prev_action] = 1
        np.testing.assert_array_equal(obs[13:], expected_onehot)
        # steer towards the goal half of the time so that rewards occur
        if rng.random() < 0.5:
            gr, gc = info["goal_pos"]
            action = (UP if gr < r else DOWN) if rng.random() < 0.5 else (LEFT if gc < c else RIGHT)
        else:
            action = int(rng.integers(4))
        obs, prev_reward, _, _, info = env.step(action)
        prev_action = action
        hits += prev_reward > 0
    assert hits > 0


def test_render_ansi():
    env = MazeEnv(size=5, render_mode="ansi")
    env.reset(seed=0)
    env.set_state(agent_pos=(1, 1), goal_pos=(3, 3))
    assert env.render() == "#####\n#A..#\n#...#\n#..G#\n#####\n"
    assert MazeEnv().render() is None


# ---------------------------------------------------------------------------- seeding
def _rollout(env, seed, steps=400):
    obs, info = env.reset(seed=seed)
    rng = np.random.default_rng(1234)
    out = [obs, info["goal_pos"]]
    for _ in range(steps):
        obs, reward, _, truncated, info = env.step(int(rng.integers(4)))
        out += [obs, reward, info["agent_pos"], info["goal_pos"]]
        if truncated:
            obs, info = env.reset()
            out += [obs, info["goal_pos"]]
    return out


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_determinism_and_seed_sensitivity():
    a = _rollout(MazeEnv(size=5), seed=42)
    b = _rollout(MazeEnv(size=5), seed=42)
    c = _rollout(MazeEnv(size=5), seed=43)
    assert _same(a, b)
    assert not _same(a, c)
    env = MazeEnv()
    goals = {s: [tuple(env.reset(seed=s)[1]["goal_pos"])] for s in (0, 1)}
    for s in (0, 1):
        env.reset(seed=s)
        goals[s] += [tuple(env.reset()[1]["goal_pos"]) for _ in range(5)]
    assert goals[0] != goals[1]


def test_check_env():
    from gymnasium.utils.env_checker import check_env

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(MazeEnv())
    # The only acceptable warning: no spec, so alternative render modes cannot be checked.
    assert all("render modes" in str(w.message) for w in caught), [str(w.message) for w in caught]

    env_id = "warpopt-test/Maze-v0"
    if env_id not in gym.registry:
        gym.register(id=env_id, entry_point=MazeEnv)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(gym.make(env_id, render_mode="ansi").unwrapped)


# ---------------------------------------------------------------------------- vector env
def test_vector_spaces_and_shapes():
    venv = MazeVectorEnv(num_envs=30)
    assert isinstance(venv, gym.vector.VectorEnv)
    assert venv.num_envs == 30
    assert venv.single_action_space == gym.spaces.Discrete(4)
    assert venv.single_observation_space == MazeEnv().observation_space
    assert venv.observation_space.shape == (30, OBS_DIM)
    assert venv.action_space == gym.spaces.MultiDiscrete([4] * 30)
    obs, infos = venv.reset(seed=0)
    assert obs.shape == (30, OBS_DIM) and obs.dtype == np.float32
    assert venv.observation_space.contains(obs)
    assert infos["agent_pos"].shape == (30, 2) and infos["goal_pos"].shape == (30, 2)
    venv.action_space.seed(0)
    obs, rewards, terms, truncs, infos = venv.step(venv.action_space.sample())
    assert rewards.shape == terms.shape == truncs.shape == (30,)
    assert terms.dtype == truncs.dtype == bool
    assert venv.observation_space.contains(obs)
    with pytest.raises(ValueError):
        venv.step(np.zeros(29, dtype=np.int64))
    with pytest.raises(ValueError):
        venv.step(np.full(30, 4))
    with pytest.raises(ValueError):
        venv.reset(seed=[1, 2])


def _independent_rollout(num_envs, seeds, actions, **kw):
    envs = [MazeEnv(**kw) for _ in range(num_envs)]
    first = [e.reset(seed=s) for e, s in zip(envs, seeds)]
    trace = [(np.stack([o for o, _ in first]), np.stack([i["agent_pos"] for _, i in first]))]
    need_reset = False
    for acts in actions:
        if need_reset:  # next-step autoreset, as MazeVectorEnv does it
            res = [e.reset() for e in envs]
            obs = np.stack([o for o, _ in res])
            rew, trunc = np.zeros(num_envs), np.zeros(num_envs, dtype=bool)
            pos = np.stack([i["agent_pos"] for _, i in res])
            need_reset = False
        else:
            res = [e.step(int(a)) for e, a in zip(envs, acts)]
            obs = np.stack([r[0] for r in res])
            rew = np.array([r[1] for r in res])
            trunc = np.array([r[3] for r in res])
            pos = np.stack([r[4]["agent_pos"] for r in res])
            need_reset = bool(trunc.all())
        trace.append((obs, rew, trunc, pos))
    return trace


def _vector_rollout(venv, seed, actions):
    obs, info = venv.reset(seed=seed)
    trace = [(obs, info["agent_pos"])]
    for acts in actions:
        obs, rew, term, trunc, info = venv.step(acts)
        assert not term.any()
        trace.append((obs, rew, trunc, info["agent_pos"]))
    return trace


@pytest.mark.parametrize("size, length", [(5, 20), (11, 200)])
def test_vector_equals_independent_envs(size, length):
    num_envs, steps = 6, 2 * length + 25
    actions = np.random.default_rng(7).integers(0, 4, size=(steps, num_envs))
    kw = dict(size=size, episode_length=length, wall_penalty=0.1)
    ref = _independent_rollout(num_envs, [100 + i for i in range(num_envs)], actions, **kw)
    got = _vector_rollout(MazeVectorEnv(num_envs, **kw), 100, actions)
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    assert sum((r[1] >= 10 - 1e-9).sum() for r in ref[1:]) > 0  # teleports were exercised


def test_vector_matches_gymnasium_sync_vector_env():
    num_envs, length, steps = 4, 15, 50
    sync = gym.vector.SyncVectorEnv(
        [lambda: MazeEnv(size=5, episode_length=length) for _ in range(num_envs)]
    )
    venv = MazeVectorEnv(num_envs, size=5, episode_length=length)
    o1, i1 = sync.reset(seed=9)
    o2, i2 = venv.reset(seed=9)
    np.testing.assert_array_equal(o1, o2)
    np.testing.assert_array_equal(i1["goal_pos"], i2["goal_pos"])
    rng = np.random.default_rng(0)
    for _ in range(steps):
        acts = rng.integers(0, 4, size=num_envs)
        r1, r2 = sync.step(acts), venv.step(acts)
        for x, y in zip(r1[:4], r2[:4]):
            np.testing.assert_array_equal(x, y)
        for key in ("agent_pos", "goal_pos", "_agent_pos"):
            np.testing.assert_array_equal(r1[4][key], r2[4][key])


def test_vector_seed_list_and_none():
    venv = MazeVectorEnv(3, size=5)
    obs_a, info_a = venv.reset(seed=[5, 6, 7])
    obs_b, info_b = MazeVectorEnv(3, size=5).reset(seed=5)
    np.testing.assert_array_equal(obs_a, obs_b)
    np.testing.assert_array_equal(info_a["goal_pos"], info_b["goal_pos"])
    # ``None`` continues each generator, exactly like MazeEnv.reset()
    single = MazeEnv(size=5)
    single.reset(seed=6)
    _, info_single = single.reset()
    _, info_vec = venv.reset()
    np.testing.assert_array_equal(info_vec["goal_pos"][1], info_single["goal_pos"])
    # different seeds give different goal sequences
    goals = lambda s: [MazeVectorEnv(8).reset(seed=s)[1]["goal_pos"]]  # noqa: E731
    assert not np.array_equal(goals(0), goals(1))


def test_vector_reset_with_a_bad_seed_changes_no_generator():
    """A seed list gymnasium rejects part-way raises before any sub-episode's generator is
    replaced: the next reset(seed=None) continues the generators of the last good reset."""
    venv, twin = MazeVectorEnv(3, size=5), MazeVectorEnv(3, size=5)
    venv.reset(seed=[5, 6, 7])
    twin.reset(seed=[5, 6, 7])
    with pytest.raises(gym.error.Error, match="Seed must be"):
        venv.reset(seed=[1, -1, 2])  # the first seed is valid, the second is not
    for _ in range(3):
        np.testing.assert_array_equal(venv.reset()[1]["goal_pos"], twin.reset()[1]["goal_pos"])


def test_vector_synchronised_truncation_and_autoreset():
    venv = MazeVectorEnv(5, episode_length=10)
    venv.reset(seed=0)
    acts = np.ones(5, dtype=np.int64)
    for t in range(1, 11):
        obs, rew, term, trunc, _ = venv.step(acts)
        assert not term.any()
        assert trunc.all() if t == 10 else not trunc.any()
        np.testing.assert_allclose(obs[:, 11], t / 10)
    obs, rew, term, trunc, info = venv.step(acts)  # autoreset step
    assert not (term.any() or trunc.any()) and not rew.any()
    assert (info["agent_pos"] == 5).all()
    assert (obs[:, 11] == 0).all() and not obs[:, 12:].any()
    assert venv.elapsed_steps == 0


def test_vector_goal_hits_teleport_to_free_cells():
    venv = MazeVectorEnv(4, episode_length=1000)
    venv.reset(seed=2)
    walls = maze_layout(11)
    rng = np.random.default_rng(0)
    for _ in range(50):
        venv.set_state(agent_pos=[[3, 3]] * 4, goal_pos=[[3, 4], [4, 3], [3, 2], [1, 3]])
        obs, rew, _, _, info = venv.step(np.array([RIGHT, DOWN, LEFT, rng.integers(4)]))
        np.testing.assert_array_equal(rew[:3], 10.0)
        pos = info["agent_pos"]
        assert not walls[pos[:, 0], pos[:, 1]].any()
        assert not np.all(pos == info["goal_pos"], axis=1).any()
        np.testing.assert_array_equal(obs[:, 12], rew.astype(np.float32))
    with pytest.raises(ValueError):
        venv.set_state(agent_pos=[[2, 2]] * 4)
