"""Environments for the WarpGrad experiments (requires the optional ``gymnasium`` dependency)."""

from warpopt.envs.maze import ACTION_DELTAS, OBS_DIM, MazeEnv, MazeVectorEnv, maze_layout

__all__ = ["MazeEnv", "MazeVectorEnv", "maze_layout", "OBS_DIM", "ACTION_DELTAS"]
