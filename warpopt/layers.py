"""The warp-layer zoo (Flennerhag et al., ICLR 2020, Appendix A and F, Table 3; Appendix J).

A warp layer ``omega`` is inserted after a task layer ``h`` so that the task learner
computes ``omega(h(x; theta); phi)``. Backpropagating through the fixed ``omega``
preconditions the task gradient (Eq. 2), i.e. gradient descent on ``theta`` becomes
Riemannian descent on the effective weights under ``G^{-1} = DOmega DOmega^T``
(Eq. 3-4).

Every layer here is *identity-initialised*: inserting it leaves the model's function
(and so, for linear warps, its gradients) unchanged until the warp is meta-learned.
Every class has the constructor ``Cls(channels, spatial_dims=..., **options)`` so
that the class, or a ``functools.partial`` of it, is a *warp layer factory*
``factory(channels, spatial_dims) -> nn.Module`` as consumed by
:func:`warpopt.warping.warp`.

``spatial_dims`` gives the layout of the activations the layer acts on:

====== ===================== ==============================
value  input shape           typical host
====== ===================== ==============================
0      ``(N, C)``            ``nn.Linear``
1      ``(N, C, L)``         ``nn.Conv1d``
2      ``(N, C, H, W)``      ``nn.Conv2d``
3      ``(N, C, D, H, W)``   ``nn.Conv3d``
====== ===================== ==============================

Layers without BatchNorm (``ConvWarp``, ``LinearWarp``, ``ScaleWarp``,
``MLPResidualWarp``) also accept ``(..., C)`` when ``spatial_dims=0``; this is how they warp
the output sequence ``(N, L, C)`` of a recurrent host. ``LSTMWarp`` acts on sequences only.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "TaskAdaptable",
    "TaskFiLM",
    "ConvWarp",
    "LinearWarp",
    "ScaleWarp",
    "ConvBNWarp",
    "ResidualWarp",
    "TwoLayerResidualWarp",
    "MLPResidualWarp",
    "LSTMWarp",
    "default_warp_layer",
]

# An eps whose complement is exactly representable in float32 and float64, so that a
# running variance of ``1 - eps`` gives ``sqrt(var + eps) == 1`` bit-exactly in both.
_EXACT_BN_EPS = 2.0**-17


def _check_dims(channels: int, spatial_dims: int) -> None:
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    if spatial_dims not in (0, 1, 2, 3):
        raise ValueError(f"spatial_dims must be 0, 1, 2 or 3, got {spatial_dims!r}")


def _check_kernel(kernel_size: int) -> None:
    # 'same' padding of k // 2 on both sides only preserves the shape for odd kernels.
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")


def _channel_view(vector: Tensor, spatial_dims: int) -> Tensor:
    """Reshape a ``(C,)`` vector to broadcast over ``(N, C, *spatial)`` (or ``(..., C)``)."""
    return vector.view(-1, *([1] * spatial_dims))


def _per_position(fn: Callable[[Tensor], Tensor], x: Tensor, spatial_dims: int) -> Tensor:
    """Apply a map over the channel dim at every position: ``(N, C, *S) -> (N, C', *S)``."""
    if spatial_dims == 0:
        return fn(x)
    y = fn(x.movedim(1, -1)).movedim(-1, 1)
    # Keep the input's exact strides: they steer later ops (a conv reads a 1-channel map with
    # channels-last strides as channels-last, and dropout draws its mask in memory order), so
    # a permuted output would change a dropout net's samples. `is_contiguous` cannot tell the
    # layouts apart when C = 1, hence the stride comparison.
    if y.shape == x.shape and y.stride() != x.stride():
        return torch.empty_like(x).copy_(y)
    return y.contiguous() if x.is_contiguous() else y


def _conv_module(c_in: int, c_out: int, spatial_dims: int, kernel_size: int, bias: bool) -> nn.Module:
    """A default-initialised conv with 'same' padding; a ``Linear`` for features."""
    if spatial_dims == 0:
        return nn.Linear(c_in, c_out, bias=bias)
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial_dims - 1]
    return conv(c_in, c_out, kernel_size, padding=kernel_size // 2, bias=bias)


def _batch_norm(channels: int, spatial_dims: int, eps: float = 1e-5) -> nn.modules.batchnorm._BatchNorm:
    norm = (nn.BatchNorm1d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[spatial_dims]
    return norm(channels, eps=eps)


class TaskAdaptable(nn.Module):
    """Marker base class for task-adaptable submodules of a warp layer.

    Parameters (and buffers) under a ``TaskAdaptable`` submodule of a warp layer are
    *adapt* parameters: they are updated during task adaptation like the task
    learner's own parameters, while the rest of the warp layer is held fixed and
    meta-learned (Appendix F, Table 3, "TA": FiLM task embeddings).
    """


class TaskFiLM(TaskAdaptable):
    """Task-adaptable FiLM conditioning: ``h * (1 + gamma) + beta`` (Table 3, "TA").

    ``gamma`` and ``beta`` have shape ``(C,)`` and start at 0, so the layer starts as
    the identity and acts as a task embedding adapted from 0 during each task.

    Shapes: ``(N, C, *spatial)`` -> same (``(..., C)`` when ``spatial_dims=0``).
    """

    def __init__(self, channels: int, spatial_dims: int = 2) -> None:
        super().__init__()
        _check_dims(channels, spatial_dims)
        self.spatial_dims = spatial_dims
        self.gamma = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, h: Tensor) -> Tensor:
        d = self.spatial_dims
        return h * (1 + _channel_view(self.gamma, d)) + _channel_view(self.beta, d)

    def extra_repr(self) -> str:
        return f"{self.gamma.numel()}, spatial_dims={self.spatial_dims}"


class ConvWarp(nn.Module):
    """Linear convolutional warp ``omega(x) = T * x + b`` (Table 3, "3x3 conv", the default).

    The kernel ``T`` of shape ``(C, C, k, ..., k)`` is the identity (Dirac) kernel and
    ``b = 0``; 'same' zero padding keeps the spatial shape. ``kernel_size=1`` gives the
    "1x1 conv" ablation. With ``spatial_dims=0`` this is a ``C x C`` linear map with
    identity weight acting on the last dim (a T-Nets projection with bias).

    Shapes: ``(N, C, *spatial)`` -> same (``(..., C)`` when ``spatial_dims=0``).
    Parameters: ``weight``, ``bias`` (if ``bias=True``).
    """

    def __init__(self, channels: int, spatial_dims: int = 2, kernel_size: int = 3, bias: bool = True) -> None:
        super().__init__()
        _check_dims(channels, spatial_dims)
        _check_kernel(kernel_size)
        self.spatial_dims = spatial_dims
        self.kernel_size = kernel_size if spatial_dims > 0 else 1
        shape = (channels, channels) + (self.kernel_size,) * spatial_dims
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        with torch.no_grad():
            if spatial_dims == 0:
                nn.init.eye_(self.weight)
            else:
                nn.init.dirac_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        if self.spatial_dims == 0:
            return F.linear(x, self.weight, self.bias)
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.spatial_dims - 1]
        return conv(x, self.weight, self.bias, padding=self.kernel_size // 2)

    def extra_repr(self) -> str:
        return (
            f"{self.weight.shape[0]}, spatial_dims={self.spatial_dims}, "
            f"kernel_size={self.kernel_size}, bias={self.bias is not None}"
        )


class LinearWarp(nn.Module):
    """T-Nets-style linear projection over channels, ``omega(x) = T x (+ b)`` (Sec. 2.1).

    ``T`` is a ``C x C`` matrix initialised to the identity. On feature maps it acts
    independently at every position (equivalent to a bias-free 1x1 conv), which
    induces the block-diagonal preconditioning ``T T^T`` of T-Nets (Lee & Choi, 2018).

    Shapes: ``(N, C, *spatial)`` -> same (``(..., C)`` when ``spatial_dims=0``).
    Parameters: ``weight`` ``(C, C)``, ``bias`` ``(C,)`` (if ``bias=True``).
    """

    def __init__(self, channels: int, spatial_dims: int = 0, bias: bool = False) -> None:
        super().__init__()
        _check_dims(channels, spatial_dims)
        self.spatial_dims = spatial_dims
        self.weight = nn.Parameter(torch.eye(channels))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return _per_position(lambda z: F.linear(z, self.weight, self.bias), x, self.spatial_dims)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, spatial_dims={self.spatial_dims}, bias={self.bias is not None}"


class ScaleWarp(nn.Module):
    """Channel-wise scale and shift ``omega(x) = s * x + b`` (Table 3, "Scaling", FiLM-like).

    ``s`` starts at 1 and ``b`` at 0. This induces a diagonal preconditioner.

    Shapes: ``(N, C, *spatial)`` -> same (``(..., C)`` when ``spatial_dims=0``).
    Parameters: ``weight`` (= ``s``) and ``bias`` (= ``b``), both ``(C,)``.
    """

    def __init__(self, channels: int, spatial_dims: int = 2) -> None:
        super().__init__()
        _check_dims(channels, spatial_dims)
        self.spatial_dims = spatial_dims
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        d = self.spatial_dims
        return x * _channel_view(self.weight, d) + _channel_view(self.bias, d)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, spatial_dims={self.spatial_dims}"


class ConvBNWarp(nn.Module):
    """Conv + BatchNorm (+ ReLU) warp (Table 3, "3x3 conv + BN" and "+ ReLU").

    ``omega(x) = [relu](BN(T * x))`` with a Dirac (identity, bias-free) conv ``T``.

    Identity at initialisation holds **in eval mode only**: the BN is set up with
    ``eps = 2**-17``, ``running_mean = 0``, ``running_var = 1 - eps`` (so that
    ``sqrt(running_var + eps) == 1`` exactly in float32 and float64) and affine
    weight 1 / bias 0. In train mode BN normalises with batch statistics, so the layer
    is *not* the identity, and every train-mode forward moves the running statistics
    away from these values (as does ``bn.reset_running_stats()``). With
    ``relu=True`` the identity additionally requires non-negative inputs, which holds
    when the layer is placed after a block's ReLU (the default placement of
    :func:`warpopt.warping.warp` in ``nn.Sequential`` blocks).

    Shapes: ``(N, C, *spatial)`` -> same (``(N, C)`` / ``(N, C, L)`` for ``spatial_dims=0``).
    Submodules: ``conv`` (:class:`ConvWarp`), ``bn``.
    """

    def __init__(self, channels: int, spatial_dims: int = 2, kernel_size: int = 3, relu: bool = False) -> None:
        super().__init__()
        _check_dims(channels, spatial_dims)
        self.relu = relu
        self.conv = ConvWarp(channels, spatial_dims, kernel_size, bias=False)
        self.bn = _batch_norm(channels, spatial_dims, eps=_EXACT_BN_EPS)
        running_var = self.bn.running_var
        assert running_var is not None  # _batch_norm tracks running statistics
        with torch.no_grad():
            running_var.fill_(1.0 - _EXACT_BN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(self.conv(x))
        return F.relu(y) if self.relu else y

    def extra_repr(self) -> str:
        return f"relu={self.relu}"


class ResidualWarp(nn.Module):
    """Residual warp ``omega(x) = relu(x + BN(conv(x)))`` (Table 3, "3x3 conv + BN + Res + ReLU").

    The BN's affine weight (gamma) and bias start at 0, so the residual branch outputs
    exactly 0 in train *and* eval mode and ``omega(x) = relu(x)``: the identity on
    non-negative inputs (place it after a block's ReLU, the default placement of
    :func:`warpopt.warping.warp` in ``nn.Sequential`` blocks). The conv keeps PyTorch's
    default initialisation, as in zero-gamma residual networks.

    Shapes: ``(N, C, *spatial)`` -> same (``(N, C)`` / ``(N, C, L)`` for ``spatial_dims=0``).
    Submodules: ``conv``, ``bn``.
    """

    def __init__(self, channels: int, spatial_dims: int = 2, kernel_size: int = 3) -> None:
        super().__init__()
        _check_dims(channels, spatial_dims)
        _check_kernel(kernel_size)
        self.conv = _conv_module(channels, channels, spatial_dims, kernel_size, bias=False)
        self.bn = _batch_norm(channels, spatial_dims)
        nn.init.zeros_(self.bn.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.bn(self.conv(x)))


class TwoLayerResidualWarp(nn.Module):
    """Two-layer residual warp block (Table 3, "2-layer 3x3 conv + BN + Res [+ TA]").

    ``omega(x) = x + BN2(conv2(relu(FiLM(BN1(conv1(x))))))`` where ``conv1`` maps
    ``C -> hidden`` and ``conv2`` maps ``hidden -> C``. Appendix F uses 128 then 64
    filters on 64-channel activations, hence ``hidden = 2 * channels`` by default.
    BN2's gamma and beta start at 0, so the block is exactly the identity in train and
    eval mode for any input.

    ``task_film=True`` inserts a :class:`TaskFiLM` (the "TA" row) between BN1 and the
    ReLU; its parameters are task-adaptable, i.e. adapt parameters, not warp ones.
    Without it, the ``film`` attribute is ``nn.Identity``.

    Shapes: ``(N, C, *spatial)`` -> same (``(N, C)`` / ``(N, C, L)`` for ``spatial_dims=0``).
    Submodules: ``conv1``, ``bn1``, ``film``, ``conv2``, ``bn2``.
    """

    def __init__(
        self,
        channels: int,
        spatial_dims: int = 2,
        hidden: int | None = None,
        kernel_size: int = 3,
        task_film: bool = False,
    ) -> None:
        super().__init__()
        _check_dims(channels, spatial_dims)
        _check_kernel(kernel_size)
        hidden = 2 * channels if hidden is None else hidden
        _check_dims(hidden, spatial_dims)
        self.conv1 = _conv_module(channels, hidden, spatial_dims, kernel_size, bias=False)
        self.bn1 = _batch_norm(hidden, spatial_dims)
        self.film: nn.Module = TaskFiLM(hidden, spatial_dims) if task_film else nn.Identity()
        self.conv2 = _conv_module(hidden, channels, spatial_dims, kernel_size, bias=False)
        self.bn2 = _batch_norm(channels, spatial_dims)
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.film(self.bn1(self.conv1(x))))
        return x + self.bn2(self.conv2(h))


class MLPResidualWarp(nn.Module):
    """Residual MLP warp block ``omega(x) = x + MLP(x)`` (Appendix J).

    The continual-learning task learner follows every non-linearity with a residual
    warp block of a 2-layer feed-forward net with 100 hidden tanh units. ``MLP`` has
    ``depth`` Linear layers (``C -> hidden -> ... -> hidden -> C``) separated by
    ``activation()``; the last Linear is zero-initialised, so the block starts as the
    identity for any input. On feature maps it acts at every position.

    Shapes: ``(N, C, *spatial)`` -> same (``(..., C)`` when ``spatial_dims=0``).
    Submodules: ``net`` (``nn.Sequential``).
    """

    def __init__(
        self,
        channels: int,
        spatial_dims: int = 0,
        hidden: int = 100,
        depth: int = 2,
        activation: Callable[[], nn.Module] = nn.Tanh,
    ) -> None:
        super().__init__()
        _check_dims(channels, spatial_dims)
        _check_dims(hidden, spatial_dims)
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive int, got {depth!r}")
        self.spatial_dims = spatial_dims
        widths = [channels] + [hidden] * (depth - 1) + [channels]
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(pairwise(widths)):
            if i > 0:
                layers.append(activation())
            linear = nn.Linear(c_in, c_out)
            layers.append(linear)
        self.net = nn.Sequential(*layers)
        nn.init.zeros_(linear.weight)  # the last Linear (depth >= 1, checked above)
        nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + _per_position(self.net, x, self.spatial_dims)


class LSTMWarp(nn.Module):
    """Recurrent warp layer ``omega(h)_t = h_t + P z_t``, ``z = LSTM(h)`` (Fig. 4c, Appendix A).

    Inserted after a task RNN/LSTM/GRU (``warp(model, layer=LSTMWarp)``), task and warp
    LSTMs interleave: "for recurrent networks, we can use stacked LSTMs to interleave warped
    layers" (Appendix A), our reading of the Warp-LSTM of Fig. 4c. Unlike a per-position warp,
    it mixes time steps: the task gradient at step t is preconditioned by what the warp LSTM
    carries from earlier steps. The projection ``P`` (``C x hidden``, with bias) is
    zero-initialised, so the layer is exactly the identity for any input at construction; the
    warp LSTM's own weights get meta-gradients once ``P`` has moved.

    Shapes: ``(N, L, C)`` -> same (batch first, as :func:`warpopt.warp` hands a recurrent
    host's output sequence to its warp). Submodules: ``lstm`` (``nn.LSTM``), ``proj``.
    """

    def __init__(self, channels: int, spatial_dims: int = 0, hidden: int | None = None, num_layers: int = 1) -> None:
        super().__init__()
        _check_dims(channels, spatial_dims)
        if spatial_dims != 0:
            raise ValueError(f"LSTMWarp warps feature sequences (spatial_dims=0), got spatial_dims={spatial_dims}")
        hidden = channels if hidden is None else hidden
        _check_dims(hidden, 0)
        self.lstm = nn.LSTM(channels, hidden, num_layers=num_layers, batch_first=True)
        self.proj = nn.Linear(hidden, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3:
            raise ValueError(
                f"LSTMWarp warps sequences of shape (batch, time, channels), got shape {tuple(x.shape)}; "
                "insert it after an nn.RNN/LSTM/GRU"
            )
        z, _ = self.lstm(x)
        return x + self.proj(z)


def default_warp_layer(channels: int, spatial_dims: int) -> nn.Module:
    """The default warp layer: a linear 3x3 :class:`ConvWarp` on maps (Table 3,
    "3x3 conv (default)"), an identity-initialised ``C x C`` linear map on features."""
    return ConvWarp(channels, spatial_dims, kernel_size=3)
