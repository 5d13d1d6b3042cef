"""Recurrent A2C task learners for maze navigation (WarpGrad paper, Appendix I and C "Warp-RNN").

All agents share one task learner: a basic tanh RNN (adapt parameters ``W``, ``V``, ``b``) whose
state feeds separate linear policy and value heads. They differ in how the RNN is modulated:

- ``rnn``: h_t = tanh(V h_{t-1} + W x_t + b).
- ``warp-rnn`` (Eq. 16): h_t = tanh(U²_h V U¹_h h_{t-1} + U²_x W U¹_x x_t + U_b b), each U a
  diagonal gate computed from the hidden state z_t of a meta-LSTM reading [x_t, h_{t-1}]. The
  meta-LSTM and its projections P are the warp layer (``cell.meta``): designated with
  ``warpopt.warp(agent, designate=...)`` they stay fixed during task updates and are
  meta-learned with the continual algorithm (Algorithm 3).
- ``hyper-rnn``: the same architecture, but the meta-LSTM is trained with every task update
  (a HyperNetwork; controls for the meta-LSTM's capacity).
- ``tnets-rnn``: h_t = tanh(T_h V h_{t-1} + T_x W x_t + T_b b) with linear meta-learned
  projections (``cell.tnet``, identity-initialised), trained like the Warp-RNN.

Gate parameterisation. The paper writes U = diag(tanh(P z_t)). With that form U = I is not
reachable (|tanh| < 1) and a random P scales every pre-activation by a random factor in (-1, 1)
at the start of training. We use ``gate="shifted"`` by default: U = diag(1 + tanh(P z_t)) with
P (weight and bias) zero-initialised, so U = I exactly at initialisation (the Warp-RNN starts as
the plain RNN: WarpGrad's identity-initialised warp layers), and U ranges over (0, 2) as P is
meta-learned. ``gate="paper"`` gives the paper's diag(tanh(P z_t)) with PyTorch's default init.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

__all__ = ["RNNCore", "PlainRNNCell", "MetaLSTMGates", "WarpRNNCell", "TNetProjections", "TNetsRNNCell",
           "A2CAgent", "make_agent", "warp_agent", "a2c_loss", "run_episodes", "MODELS", "WARP_MODULES"]

MODELS = ("warp-rnn", "rnn", "hyper-rnn", "tnets-rnn")
#: submodules designated as warp layers (model partitioning, Appendix A (a)); None: not warped.
WARP_MODULES: dict[str, Optional[list[str]]] = {
    "warp-rnn": ["cell.meta"], "tnets-rnn": ["cell.tnet"], "rnn": None, "hyper-rnn": None}


class RNNCore(nn.Module):
    """The task-adaptable RNN weights: input W (H x I), recurrent V (H x H), bias b (H).

    Initialised like ``torch.nn.RNNCell``: U(-1/sqrt(H), 1/sqrt(H)); a single bias.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        bound = 1.0 / math.sqrt(hidden_size)
        self.W = nn.Parameter(torch.empty(hidden_size, input_size).uniform_(-bound, bound))
        self.V = nn.Parameter(torch.empty(hidden_size, hidden_size).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.empty(hidden_size).uniform_(-bound, bound))


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


class MetaLSTMGates(nn.Module):
    """The meta-LSTM and its gate projections P: z_t = LSTM([x_t, h_{t-1}], (z, c)_{t-1}).

    Returns the five diagonal gates (U¹_h, U²_h, U¹_x, U²_x, U_b) of Eq. 16 as vectors.
    ``gate="shifted"``: U = 1 + tanh(P z), P zero-initialised (U = I at init; see module doc);
    ``gate="paper"``: U = tanh(P z), P with PyTorch's default init.
    """

    def __init__(self, input_size: int, hidden_size: int, meta_hidden: int = 100, gate: str = "shifted") -> None:
        super().__init__()
        if gate not in ("shifted", "paper"):
            raise ValueError(f"gate must be 'shifted' or 'paper', got {gate!r}")
        self.gate, self.meta_hidden = gate, meta_hidden
        self.sizes = [hidden_size, hidden_size, input_size, hidden_size, hidden_size]
        self.lstm = nn.LSTMCell(input_size + hidden_size, meta_hidden)
        self.proj = nn.Linear(meta_hidden, sum(self.sizes))
        if gate == "shifted":
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, h: torch.Tensor, zc: tuple[torch.Tensor, torch.Tensor]):
        z, c = self.lstm(torch.cat([x, h], dim=1), zc)
        g = torch.tanh(self.proj(z))
        if self.gate == "shifted":
            g = 1.0 + g
        return torch.split(g, self.sizes, dim=1), (z, c)


class WarpRNNCell(nn.Module):
    """Eq. 16: h_t = tanh(U²_h V U¹_h h_{t-1} + U²_x W U¹_x x_t + U_b b); state = (h, z, c)."""

    def __init__(self, input_size: int, hidden_size: int, meta_hidden: int = 100, gate: str = "shifted") -> None:
        super().__init__()
        self.core = RNNCore(input_size, hidden_size)
        # Drawn from a forked RNG: the task learner (core and heads) gets exactly the plain RNN's
        # initialisation under the same seed, so with U = I the two agents are the same function.
        with torch.random.fork_rng(devices=[]):
            self.meta = MetaLSTMGates(input_size, hidden_size, meta_hidden, gate)
        self.hidden_size = hidden_size

    def initial_state(self, batch: int, device: Any = None) -> Any:
        zeros = lambda n: torch.zeros(batch, n, device=device)  # noqa: E731
        return zeros(self.hidden_size), zeros(self.meta.meta_hidden), zeros(self.meta.meta_hidden)

    def output(self, state: Any) -> torch.Tensor:
        return state[0]

    def forward(self, x: torch.Tensor, state: Any) -> Any:
        h, z, c = state
        (u1h, u2h, u1x, u2x, ub), (z, c) = self.meta(x, h, (z, c))
        k = self.core
        pre = u2h * ((u1h * h) @ k.V.t()) + u2x * ((u1x * x) @ k.W.t()) + ub * k.b
        return torch.tanh(pre), z, c


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
    if names is None:
        return agent
    import warpopt

    return warpopt.warp(agent, designate=names)


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

