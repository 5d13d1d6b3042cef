"""The maze experiment's agents (WarpGrad Section 4.2, Appendix I): recurrent A2C learners, the loss, the rollout.

All agents share one task learner: a basic tanh RNN (adapt parameters ``W``, ``V``, ``b``) whose
state feeds separate linear policy and value heads. They differ in how the RNN is modulated:

- ``rnn``: h_t = tanh(V h_{t-1} + W x_t + b).
- ``warp-rnn`` (Eq. 16): the library's :class:`warpopt.rnn.WarpRNNCell`, whose meta-LSTM gates
  (``cell.meta``) are the warp layer, designated with ``warpopt.warp(agent, designate=...)``:
  fixed during task updates, meta-learned with the continual algorithm (Algorithm 3).
- ``hyper-rnn``: the same architecture, but the meta-LSTM is trained with every task update
  (a HyperNetwork; controls for the meta-LSTM's capacity).
- ``tnets-rnn``: h_t = tanh(T_h V h_{t-1} + T_x W x_t + T_b b) with linear meta-learned
  projections (``cell.tnet``, identity-initialised), trained like the Warp-RNN.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import nn

import harness  # noqa: F401  (puts the checkout's warpopt on the path)
import warpopt
from warpopt.rnn import RNNCore, WarpRNNCell

MODELS = ("warp-rnn", "rnn", "hyper-rnn", "tnets-rnn")
#: submodules designated as warp layers (model partitioning, Appendix A (a)); None: not warped.
WARP_MODULES: dict[str, Optional[list[str]]] = {
    "warp-rnn": ["cell.meta"], "tnets-rnn": ["cell.tnet"], "rnn": None, "hyper-rnn": None}


class PlainRNNCell(nn.Module):
    """h_t = tanh(V h_{t-1} + W x_t + b); state = h."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.core = RNNCore(input_size, hidden_size)
        self.hidden_size = hidden_size

    def initial_state(self, batch: int, device: Any = None) -> Any:
        return torch.zeros(batch, self.hidden_size, device=device)

    def output(self, state: Any) -> torch.Tensor:
        return state

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        c = self.core
        return torch.tanh(h @ c.V.t() + x @ c.W.t() + c.b)




class TNetProjections(nn.Module):
    """T-Nets-style linear projections T_h, T_x, T_b (H x H each), identity-initialised."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.T_h = nn.Parameter(torch.eye(hidden_size))
        self.T_x = nn.Parameter(torch.eye(hidden_size))
        self.T_b = nn.Parameter(torch.eye(hidden_size))


class TNetsRNNCell(PlainRNNCell):
    """h_t = tanh(T_h V h_{t-1} + T_x W x_t + T_b b); state = h."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__(input_size, hidden_size)
        self.tnet = TNetProjections(hidden_size)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        c, t = self.core, self.tnet
        return torch.tanh((h @ c.V.t()) @ t.T_h.t() + (x @ c.W.t()) @ t.T_x.t() + t.T_b @ c.b)




class A2CAgent(nn.Module):
    """Recurrent actor-critic: a cell whose hidden state feeds a policy and a value head.

    ``forward(x, state) -> (logits (B, A), value (B,), new_state)``.
    """

    def __init__(self, cell: nn.Module, num_actions: int = 4) -> None:
        super().__init__()
        self.cell = cell
        self.policy = nn.Linear(cell.hidden_size, num_actions)
        self.value = nn.Linear(cell.hidden_size, 1)

    def initial_state(self, batch: int, device: Any = None) -> Any:
        return self.cell.initial_state(batch, device)

    def forward(self, x: torch.Tensor, state: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
        state = self.cell(x, state)
        h = self.cell.output(state)
        return self.policy(h), self.value(h).squeeze(-1), state


def make_agent(kind: str, input_size: int = 17, num_actions: int = 4, hidden_size: int = 100,
               meta_hidden: int = 100, gate: str = "shifted") -> A2CAgent:
    """An unwarped agent of the given kind (one of ``MODELS``)."""
    if kind == "rnn":
        cell: nn.Module = PlainRNNCell(input_size, hidden_size)
    elif kind in ("warp-rnn", "hyper-rnn"):
        cell = WarpRNNCell(input_size, hidden_size, meta_hidden, gate)
    elif kind == "tnets-rnn":
        cell = TNetsRNNCell(input_size, hidden_size)
    else:
        raise ValueError(f"unknown model {kind!r}; choose from {MODELS}")
    return A2CAgent(cell, num_actions)


def warp_agent(agent: A2CAgent, kind: str) -> nn.Module:
    """Partition the agent (``warpopt.warp(agent, designate=...)``) if the kind has warp layers."""
    names = WARP_MODULES[kind]
    return agent if names is None else warpopt.warp(agent, designate=names)


def a2c_loss(logits: torch.Tensor, values: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor,
             gamma: float = 0.9, value_weight: float = 0.1, entropy_weight: float = 0.03,
             entropy: str = "sumsq") -> torch.Tensor:
    """Advantage actor-critic loss of a batch of episodes, divided by the episode length.

    Shapes: logits (T, B, A), values (T, B), actions (T, B) int64, rewards (T, B). With
    R_t = r_t + γ R_{t+1} (R_T = 0, no bootstrap: episodes are truncated) and advantage
    A_t = R_t − V_t, the loss is (1/T) Σ_t mean_b[ −log π(a_t) sg(A_t) + w_v A_t² + w_e H_t ]
    where H_t is the entropy regulariser: ``"sumsq"`` = Σ_a π(a)² (the original
    implementation's penalty, minimal at the uniform policy) or ``"entropy"`` = −entropy.
    """
    T, B = rewards.shape
    returns = torch.empty_like(rewards)
    running = torch.zeros_like(rewards[0])
    for t in range(T - 1, -1, -1):
        running = rewards[t] + gamma * running
        returns[t] = running
    logp = torch.log_softmax(logits, dim=-1)
    advantage = returns - values
    policy = -(logp.gather(-1, actions.unsqueeze(-1)).squeeze(-1) * advantage.detach()).sum()
    value = advantage.pow(2).sum()
    probs = logp.exp()
    if entropy == "sumsq":
        reg = probs.pow(2).sum()
    elif entropy == "entropy":
        reg = (probs * logp).sum()
    else:
        raise ValueError(f"entropy must be 'sumsq' or 'entropy', got {entropy!r}")
    return (policy + value_weight * value + entropy_weight * reg) / (B * T)


def run_episodes(agent: nn.Module, env: Any, rng: np.random.Generator, device: Any = "cpu",
                 **loss_kwargs: Any) -> tuple[torch.Tensor, np.ndarray]:
    """Roll out one batch of episodes (``env``: a reset-able ``MazeVectorEnv``) and return the
    A2C loss and each episode's total reward. Actions are sampled on the host from ``rng``
    (inverse-CDF on the policy probabilities), so runs are reproducible on any device."""
    obs, _ = env.reset()
    B, T = env.num_envs, env.episode_length
    state = agent.initial_state(B, device)
    logits_t, values_t, actions_t, rewards_t = [], [], [], []
    for _ in range(T):
        x = torch.from_numpy(obs).to(device)
        logits, value, state = agent(x, state)
        probs = torch.softmax(logits.detach(), dim=-1).cpu().numpy()
        cdf = np.cumsum(probs, axis=1)
        u = rng.random((B, 1)) * cdf[:, -1:]
        actions = np.minimum((cdf < u).sum(axis=1), probs.shape[1] - 1)
        obs, rewards, _, _, _ = env.step(actions)
        logits_t.append(logits)
        values_t.append(value)
        actions_t.append(actions)
        rewards_t.append(rewards)
    actions_np = np.stack(actions_t)
    rewards_np = np.stack(rewards_t).astype(np.float32)
    loss = a2c_loss(torch.stack(logits_t), torch.stack(values_t),
                    torch.from_numpy(actions_np).to(device), torch.from_numpy(rewards_np).to(device),
                    **loss_kwargs)
    return loss, rewards_np.sum(axis=0)
