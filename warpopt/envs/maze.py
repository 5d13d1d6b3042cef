"""Maze navigation environment (Miconi et al. 2018/2019; WarpGrad paper, Appendix I).

An ``N x N`` grid (``N`` odd, default 11) with a wall border and a pillar on every interior cell
whose row and column are both even; the centre cell is always free. Each episode picks a goal
uniformly among the free cells other than the centre and keeps it for the whole episode. The agent
starts at the centre and acts for ``episode_length`` steps (200); there is no terminal state, the
episode is truncated after the last step. Actions: 0 up (row - 1), 1 down (row + 1), 2 left
(col - 1), 3 right (col + 1). Moving into a wall leaves the agent in place and costs
``wall_penalty`` (0 by default). Entering the goal yields ``goal_reward`` (+10) and teleports the
agent to a uniformly random free cell other than the goal (never into a wall or pillar).

Observation (``float32``, 17 values)::

    [0:9]   3x3 neighbourhood around the agent, row-major, 1.0 = wall (index 4 is the agent's cell)
    [9]     unused, always 0
    [10]    bias, always 1
    [11]    steps taken so far / episode_length
    [12]    reward received on the previous step (0 after reset)
    [13:17] one-hot of the previous action (all zeros after reset)

Randomness is drawn only from the episode's generator: one draw for the goal at reset and one
draw per teleport. :class:`MazeVectorEnv` gives every sub-episode its own generator created
exactly as :meth:`MazeEnv.reset` creates one, so ``MazeVectorEnv(B).reset(seed=s)`` reproduces the
trajectories of ``B`` :class:`MazeEnv` reset with seeds ``s, s + 1, ..., s + B - 1``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

try:
    import gymnasium as gym
    from gymnasium import spaces
    from gymnasium.utils import seeding
    from gymnasium.vector import VectorEnv
    from gymnasium.vector.utils import batch_space
except ImportError as exc:  # pragma: no cover - exercised only without gymnasium
    raise ImportError("warpopt.envs requires gymnasium>=1.0; install it with `pip install warpopt[examples]`") from exc

# gymnasium >= 1.1 names the autoreset modes with an enum; 1.0 used the plain string.
_NEXT_STEP: Any = getattr(getattr(gym.vector, "AutoresetMode", None), "NEXT_STEP", "NextStep")

__all__ = ["MazeEnv", "MazeVectorEnv", "maze_layout", "OBS_DIM", "ACTION_DELTAS"]

OBS_DIM = 17
#: (row, col) displacement of actions 0 up, 1 down, 2 left, 3 right.
ACTION_DELTAS = np.array([[-1, 0], [1, 0], [0, -1], [0, 1]], dtype=np.int64)
ACTION_DELTAS.setflags(write=False)

# Row/column offsets of the 3x3 neighbourhood in row-major order.
_NB_ROWS = np.repeat(np.arange(-1, 2), 3)
_NB_COLS = np.tile(np.arange(-1, 2), 3)


def _check_size(size: int) -> int:
    if isinstance(size, bool) or int(size) != size or size < 5 or size % 2 == 0:
        raise ValueError(f"size must be odd and at least 5, got {size}")
    return int(size)


def maze_layout(size: int = 11) -> np.ndarray:
    """Boolean ``(size, size)`` wall map (``True`` = wall) of the maze.

    Border cells are walls, interior cells with an even row and an even column are pillars, and the
    centre cell ``(size // 2, size // 2)`` is cleared. ``size`` must be odd and at least 5.
    """
    size = _check_size(size)
    idx = np.arange(size)
    walls = np.zeros((size, size), dtype=bool)
    walls[0, :] = walls[-1, :] = walls[:, 0] = walls[:, -1] = True
    even = idx % 2 == 0
    walls[1:-1, 1:-1] |= np.logical_and.outer(even, even)[1:-1, 1:-1]
    walls[size // 2, size // 2] = False
    return walls


class _Geometry(NamedTuple):
    layout: np.ndarray  # (size, size) bool, True = wall
    free: np.ndarray  # (F, 2) free cells, row-major order
    free_index: np.ndarray  # (size, size) index into ``free``; -1 on walls
    goal_cells: np.ndarray  # (F - 1, 2) free cells except the centre
    centre: tuple[int, int]


@functools.cache
def _geometry(size: int) -> _Geometry:
    layout = maze_layout(size)
    free = np.argwhere(~layout)
    free_index = np.full(layout.shape, -1, dtype=np.int64)
    free_index[free[:, 0], free[:, 1]] = np.arange(len(free))
    centre = (size // 2, size // 2)
    goal_cells = free[(free != centre).any(axis=1)]
    for arr in (layout, free, free_index, goal_cells):  # cached and shared: keep read-only
        arr.setflags(write=False)
    return _Geometry(layout, free, free_index, goal_cells, centre)


def _draw_goal(rng: np.random.Generator, geo: _Geometry) -> np.ndarray:
    """One draw: a free cell other than the centre."""
    return geo.goal_cells[int(rng.integers(len(geo.goal_cells)))].copy()


def _draw_teleport(rng: np.random.Generator, geo: _Geometry, goal: np.ndarray) -> np.ndarray:
    """One draw: a free cell other than ``goal`` (uniform over the remaining F - 1 cells)."""
    k = int(rng.integers(len(geo.free) - 1))
    if k >= geo.free_index[goal[0], goal[1]]:
        k += 1
    return geo.free[k].copy()


def _single_observation_space(goal_reward: float, wall_penalty: float) -> spaces.Box:
    low = np.zeros(OBS_DIM, dtype=np.float32)
    high = np.ones(OBS_DIM, dtype=np.float32)
    # [9] (always 0) and [10] (always 1) keep the loose [0, 1] bounds: degenerate low == high
    # bounds are legal but make gymnasium's env checker warn.
    low[12] = min(0.0, -wall_penalty, goal_reward)
    high[12] = max(0.0, -wall_penalty, goal_reward)
    return spaces.Box(low=low, high=high, dtype=np.float32)


class _MazeConfig:
    """Configuration and read-only views shared by :class:`MazeEnv` and :class:`MazeVectorEnv`."""

    _goal: np.ndarray | None = None
    _t: int = 0

    def _configure(self, size: int, episode_length: int, goal_reward: float, wall_penalty: float) -> None:
        self.size = _check_size(size)
        if int(episode_length) != episode_length or episode_length < 1:
            raise ValueError(f"episode_length must be a positive integer, got {episode_length!r}")
        if not (np.isfinite(goal_reward) and np.isfinite(wall_penalty)):
            raise ValueError("goal_reward and wall_penalty must be finite")
        self.episode_length = int(episode_length)
        self.goal_reward = float(goal_reward)
        self.wall_penalty = float(wall_penalty)
        self._geo = _geometry(self.size)

    @property
    def layout(self) -> np.ndarray:
        """Read-only boolean wall map (``True`` = wall)."""
        return self._geo.layout

    @property
    def free_cells(self) -> np.ndarray:
        """Read-only ``(F, 2)`` array of the free cells in row-major order."""
        return self._geo.free

    @property
    def elapsed_steps(self) -> int:
        """Steps taken in the current episode."""
        return self._t

    def _require_reset(self, position: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """``(position, goal)``: the agent position(s) passed in and the goal(s), both set by
        ``reset()``; raises before the first ``reset()``."""
        if position is None or self._goal is None:
            raise RuntimeError("call reset() before using the environment")
        return position, self._goal


def _integers(value: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    """``value`` as an int64 array of ``shape``, or ``None`` unless it is exactly that: integers
    (Python or numpy, not bools, floats, ``None`` or objects) in that shape."""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError):  # ragged nesting
        return None
    if arr.shape != shape or not np.issubdtype(arr.dtype, np.integer):
        return None
    if isinstance(value, (list, tuple)) and any(  # [True, 2] becomes an int array
        isinstance(v, (bool, np.bool_)) for v in np.asarray(value, dtype=object).reshape(-1)
    ):
        return None
    return arr.astype(np.int64)  # a copy: the caller's array may change later


def _check_cell(geo: _Geometry, pos: Any, what: str) -> np.ndarray:
    cell = _integers(pos, (2,))
    if cell is None:
        raise ValueError(f"{what} must be two integers (row, col), got {pos!r}")
    n = geo.layout.shape[0]
    if not (0 <= cell[0] < n and 0 <= cell[1] < n):
        raise ValueError(
            f"{what} {tuple(int(v) for v in cell)} is outside the {n}x{n} maze (rows and columns 0..{n - 1})"
        )
    if geo.layout[cell[0], cell[1]]:
        raise ValueError(f"{what} {tuple(int(v) for v in cell)} is a wall; choose a free cell (see free_cells)")
    return cell


class MazeEnv(_MazeConfig, gym.Env):
    """Single maze-navigation episode stream (see the module docstring for the full spec).

    Args:
        size: side of the square grid, odd and >= 5 (paper text: 11; original code: 13).
        episode_length: steps per episode; ``truncated`` is True on the last one.
        goal_reward: reward for entering the goal.
        wall_penalty: amount subtracted from the reward when a move hits a wall.
        render_mode: ``None`` or ``"ansi"`` (text grid: ``#`` wall, ``A`` agent, ``G`` goal).

    ``info`` (from ``reset`` and ``step``) holds ``agent_pos`` and ``goal_pos`` as ``(row, col)``
    int64 arrays, the agent's position after the step (i.e. after any teleport).
    """

    # gymnasium's API: a class-level dict (``gym.Env.metadata: dict[str, Any]``), overridden as such.
    metadata: dict[str, Any] = {"render_modes": ["ansi"], "render_fps": 4}  # noqa: RUF012

    def __init__(
        self,
        size: int = 11,
        episode_length: int = 200,
        goal_reward: float = 10.0,
        wall_penalty: float = 0.0,
        render_mode: str | None = None,
    ) -> None:
        super().__init__()
        self._configure(size, episode_length, goal_reward, wall_penalty)
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"unsupported render_mode {render_mode!r}")
        self.render_mode = render_mode
        self.observation_space = _single_observation_space(self.goal_reward, self.wall_penalty)
        self.action_space = spaces.Discrete(4)
        self._agent: np.ndarray | None = None
        self._prev_reward = 0.0
        self._prev_action = -1

    @property
    def agent_pos(self) -> tuple[int, int]:
        agent, _ = self._require_reset(self._agent)
        return int(agent[0]), int(agent[1])

    @property
    def goal_pos(self) -> tuple[int, int]:
        _, goal = self._require_reset(self._agent)
        return int(goal[0]), int(goal[1])

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self._goal = _draw_goal(self.np_random, self._geo)
        self._agent = np.array(self._geo.centre, dtype=np.int64)
        self._t = 0
        self._prev_reward = 0.0
        self._prev_action = -1
        return self._observation(), self._info()

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        agent, goal = self._require_reset(self._agent)
        if self._t >= self.episode_length:
            raise RuntimeError("the episode is over (truncated); call reset() before step()")
        checked = _integers(action, ())
        if checked is None or not 0 <= checked < 4:
            raise ValueError(
                f"invalid action {action!r}: expected an integer in the action space "
                f"{self.action_space} (0 up, 1 down, 2 left, 3 right)"
            )
        a = int(checked)
        target = agent + ACTION_DELTAS[a]
        if self._geo.layout[target[0], target[1]]:
            reward = 0.0 - self.wall_penalty
        else:
            reward = 0.0
            agent = target
        if agent[0] == goal[0] and agent[1] == goal[1]:
            reward += self.goal_reward
            agent = _draw_teleport(self.np_random, self._geo, goal)
        self._agent = agent
        self._t += 1
        self._prev_reward = reward
        self._prev_action = a
        truncated = self._t >= self.episode_length
        return self._observation(), reward, False, truncated, self._info()

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        agent, goal = self._require_reset(self._agent)
        grid = np.where(self._geo.layout, "#", ".").astype("<U1")
        grid[goal[0], goal[1]] = "G"
        grid[agent[0], agent[1]] = "A"
        return "\n".join("".join(row) for row in grid) + "\n"

    def set_state(self, agent_pos: Any = None, goal_pos: Any = None) -> np.ndarray:
        """Place the agent and/or the goal (testing and debugging hook).

        Both must be free cells and must differ. Neither the step counter, the previous
        reward/action nor the random generator are touched. Returns the current observation.
        """
        agent, goal = self._require_reset(self._agent)
        if agent_pos is not None:
            agent = _check_cell(self._geo, agent_pos, "agent_pos")
        if goal_pos is not None:
            goal = _check_cell(self._geo, goal_pos, "goal_pos")
        if np.array_equal(agent, goal):
            raise ValueError("the agent cannot be placed on the goal")
        self._agent, self._goal = agent.copy(), goal.copy()
        return self._observation()

    def _observation(self) -> np.ndarray:
        agent, _ = self._require_reset(self._agent)
        obs = np.zeros(OBS_DIM, dtype=np.float32)
        r, c = int(agent[0]), int(agent[1])
        obs[:9] = self._geo.layout[r - 1 : r + 2, c - 1 : c + 2].reshape(-1)
        obs[10] = 1.0
        obs[11] = self._t / self.episode_length
        obs[12] = self._prev_reward
        if self._prev_action >= 0:
            obs[13 + self._prev_action] = 1.0
        return obs

    def _info(self) -> dict[str, Any]:
        agent, goal = self._require_reset(self._agent)
        return {"agent_pos": agent.copy(), "goal_pos": goal.copy()}


class MazeVectorEnv(_MazeConfig, VectorEnv):
    """``num_envs`` synchronised maze episodes stepped with vectorised numpy (gymnasium 1.x API).

    All sub-episodes share the step counter: they start together on :meth:`reset` and are all
    truncated on the same step. The next call to :meth:`step` after a truncation resets every
    sub-episode (gymnasium's next-step autoreset: the actions are ignored, rewards are 0 and the
    returned observations are initial ones); calling :meth:`reset` yourself works as well.

    Seeding follows :class:`gymnasium.vector.SyncVectorEnv`: ``reset(seed=s)`` seeds sub-episode
    ``i`` with ``s + i``; a list gives one seed (or ``None``) per sub-episode; ``None`` keeps the
    existing generators. Each sub-episode owns a generator built like ``MazeEnv.reset(seed=...)``
    builds one, so trajectories equal those of independent :class:`MazeEnv` instances. Movement,
    rewards and observations are vectorised; only the (rare) goal/teleport draws loop, over the
    affected sub-episodes.

    ``infos`` holds ``agent_pos`` and ``goal_pos`` as ``(num_envs, 2)`` arrays (plus the all-True
    ``_agent_pos``/``_goal_pos`` masks of the gymnasium convention).
    """

    # gymnasium's API: a class-level dict (``VectorEnv.metadata: dict[str, Any]``), overridden as such.
    metadata: dict[str, Any] = {"autoreset_mode": _NEXT_STEP, "render_modes": []}  # noqa: RUF012

    def __init__(
        self,
        num_envs: int = 30,
        size: int = 11,
        episode_length: int = 200,
        goal_reward: float = 10.0,
        wall_penalty: float = 0.0,
    ) -> None:
        if int(num_envs) != num_envs or num_envs < 1:
            raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
        self._configure(size, episode_length, goal_reward, wall_penalty)
        self.num_envs = int(num_envs)
        obs_space = _single_observation_space(self.goal_reward, self.wall_penalty)
        self.single_observation_space = obs_space
        self.single_action_space = spaces.Discrete(4)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._rngs: list[np.random.Generator] = []  # one per sub-episode from the first reset()
        self._pos: np.ndarray | None = None  # the rest of the state is set by _reset_state()
        self._needs_reset = False

    @property
    def agent_pos(self) -> np.ndarray:
        pos, _ = self._require_reset(self._pos)
        return pos.copy()

    @property
    def goal_pos(self) -> np.ndarray:
        _, goal = self._require_reset(self._pos)
        return goal.copy()

    def reset(
        self,
        *,
        seed: int | Sequence[int | None] | None = None,
        options: dict[str, Any] | None = None,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        if seed is None:
            seeds: list[int | None] = [None] * self.num_envs
        elif isinstance(seed, (int, np.integer)):
            seeds = [int(seed) + i for i in range(self.num_envs)]
        else:
            seeds = list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"expected {self.num_envs} seeds, got {len(seeds)}")
        previous: list[np.random.Generator | None] = list(self._rngs) or [None] * self.num_envs
        self._rngs = [
            rng if s is None and rng is not None else seeding.np_random(s)[0] for s, rng in zip(seeds, previous)
        ]
        self._reset_state()
        return self._observation(), self._info()

    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        pos, goal = self._require_reset(self._pos)
        acts = _integers(actions, (self.num_envs,))
        if acts is None or acts.min() < 0 or acts.max() > 3:
            raise ValueError(
                f"invalid actions {actions!r}: expected an integer array of shape ({self.num_envs},), "
                f"each in the action space {self.single_action_space} (0 up, 1 down, 2 left, 3 right)"
            )
        done = np.zeros(self.num_envs, dtype=bool)
        if self._needs_reset:
            self._reset_state()
            rewards = np.zeros(self.num_envs, dtype=np.float64)
            return self._observation(), rewards, done, done.copy(), self._info()

        target = pos + ACTION_DELTAS[acts]
        blocked = self._geo.layout[target[:, 0], target[:, 1]]
        pos = np.where(blocked[:, None], pos, target)
        rewards = np.where(blocked, 0.0 - self.wall_penalty, 0.0)
        hit = np.all(pos == goal, axis=1)
        if hit.any():
            rewards[hit] += self.goal_reward
            for i in np.flatnonzero(hit):
                pos[i] = _draw_teleport(self._rngs[i], self._geo, goal[i])
        self._pos = pos
        self._t += 1
        self._prev_reward = rewards.copy()
        self._prev_action = acts
        truncated = np.full(self.num_envs, self._t >= self.episode_length)
        self._needs_reset = bool(truncated[0])
        return self._observation(), rewards, done, truncated, self._info()

    def set_state(self, agent_pos: Any = None, goal_pos: Any = None) -> np.ndarray:
        """Place agents and/or goals, each an ``(num_envs, 2)`` array (testing/debugging hook).

        Same rules as :meth:`MazeEnv.set_state`, per sub-episode. Returns the observations.
        """
        current_pos, current_goal = self._require_reset(self._pos)
        shape = (self.num_envs, 2)
        pos = current_pos if agent_pos is None else _integers(agent_pos, shape)
        goal = current_goal if goal_pos is None else _integers(goal_pos, shape)
        if pos is None or goal is None:
            raise ValueError(
                f"positions must be integer (row, col) arrays of shape {shape}, got "
                f"agent_pos={agent_pos!r}, goal_pos={goal_pos!r}"
            )
        for p, g in zip(pos, goal):
            _check_cell(self._geo, p, "agent_pos")
            _check_cell(self._geo, g, "goal_pos")
            if np.array_equal(p, g):
                raise ValueError("an agent cannot be placed on its goal")
        self._pos, self._goal = pos.copy(), goal.copy()
        return self._observation()

    def _reset_state(self) -> None:
        self._goal = np.stack([_draw_goal(rng, self._geo) for rng in self._rngs])
        self._pos = np.tile(np.array(self._geo.centre, dtype=np.int64), (self.num_envs, 1))
        self._t = 0
        self._prev_reward = np.zeros(self.num_envs, dtype=np.float64)
        self._prev_action = np.full(self.num_envs, -1, dtype=np.int64)
        self._needs_reset = False

    def _observation(self) -> np.ndarray:
        pos, _ = self._require_reset(self._pos)
        obs = np.zeros((self.num_envs, OBS_DIM), dtype=np.float32)
        rows = pos[:, 0:1] + _NB_ROWS
        cols = pos[:, 1:2] + _NB_COLS
        obs[:, :9] = self._geo.layout[rows, cols]
        obs[:, 10] = 1.0
        obs[:, 11] = self._t / self.episode_length
        obs[:, 12] = self._prev_reward
        moved = np.flatnonzero(self._prev_action >= 0)
        obs[moved, 13 + self._prev_action[moved]] = 1.0
        return obs

    def _info(self) -> dict[str, Any]:
        pos, goal = self._require_reset(self._pos)
        mask = np.ones(self.num_envs, dtype=bool)
        info = {"agent_pos": pos.copy(), "goal_pos": goal.copy()}
        return {**info, "_agent_pos": mask, "_goal_pos": mask.copy()}
