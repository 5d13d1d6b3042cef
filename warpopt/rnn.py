"""The Warp-RNN cell (WarpGrad paper, Eq. 16, Appendices C and I): a recurrent warp layer.

h_t = tanh(U²_h V U¹_h h_{t-1} + U²_x W U¹_x x_t + U_b b): a basic tanh RNN whose task-adaptable
weights W, V, b (:class:`RNNCore`) are modulated by diagonal gates U computed from the hidden
state z_t of a meta-LSTM reading [x_t, h_{t-1}] (:class:`MetaLSTMGates`). Designate the
meta-LSTM as the warp layer, ``warpopt.warp(model, designate=["<path>.meta"])``, and it stays
fixed during task updates and is meta-learned (the paper uses the continual Algorithm 3). Used
as-is with ``meta`` trained at every step it is a HyperRNN (a HyperNetwork). The maze agents
built on it (A2C, the plain and T-Nets RNN baselines) live beside ``examples/maze.py``.

``cell(x [B, I], state) -> state``, ``cell.initial_state(B)``, ``cell.output(state) -> h [B, H]``;
state = (h, z, c).

Gate parameterisation. The paper writes U = diag(tanh(P z_t)). With that form U = I is not
reachable (|tanh| < 1) and a random P scales every pre-activation by a random factor in (-1, 1)
at the start of training. We use ``gate="shifted"`` by default: U = diag(1 + tanh(P z_t)) with
P (weight and bias) zero-initialised, so U = I exactly at initialisation (the Warp-RNN starts as
the plain RNN: WarpGrad's identity-initialised warp layers), and U ranges over (0, 2) as P is
meta-learned. ``gate="paper"`` gives the paper's diag(tanh(P z_t)) with PyTorch's default init.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["RNNCore", "MetaLSTMGates", "WarpRNNCell"]


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
