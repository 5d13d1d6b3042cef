"""Kernels the replay may use: every op of the task forward must be twice differentiable.

The exact objective (Eq. 7) differentiates L_meta(θ_k − α ∇L_task(θ_k; φ); φ) with respect to
φ, i.e. it differentiates through ∇L_task: the backward pass of the task forward is itself
differentiated (a Hessian-vector product). MAML's θ0 gradient does the same over K steps.

Fused attention kernels have no double backward. ``F.scaled_dot_product_attention`` (called by
``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer`` and most hand-written or Hugging
Face-style attention blocks) picks a fused kernel when it can: flash attention on CPU, flash /
memory-efficient / cuDNN attention on GPU. Their backward is an opaque op, so the second
derivative fails ("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward
is not implemented"). The *math* backend computes attention from matmuls and a softmax, whose
backward is made of differentiable ops, on every device and dtype. :func:`replay_kernels`
selects it while the replay evaluates the model; the user's task loop keeps the fast kernels.

It also turns off the C++ inference fast path of ``nn.MultiheadAttention`` /
``nn.TransformerEncoderLayer`` (``torch.backends.mha``). That path only runs when nothing
needs a gradient (eval mode, no grad-requiring input or weight), which a training loop never
hits, so the task loop never takes it; turning it off keeps the replay on the same Python code
path as the recorded steps (and off an op without a ``vmap`` batching rule).

Recurrent layers: cuDNN's RNN/LSTM/GRU kernels have no double backward either (cuDNN does not
expose what it would need); PyTorch's own RNN kernels do, on CPU (oneDNN included) and GPU. For
a model containing ``nn.RNNBase`` modules the replay therefore turns cuDNN off (which also
sends that model's convolutions to PyTorch's native kernels during the replay only).
``torch.func.vmap`` has no batching rule for the fused RNN ops at all: see
:func:`unvectorisable`.

The selection is made when the forward runs; the backward of the math kernel is ordinary
autograd, so nothing needs to be active when the graph is later differentiated.

Activation checkpointing (``torch.utils.checkpoint``, any saved-tensor hooks) is refused: the
replay runs the forward with θ_k swapped in (``functional_call``) and differentiates it after
the call has returned, when a checkpoint's recomputation would read the live parameters
instead, a silently wrong meta-gradient. Inside :func:`replay_kernels` installing
saved-tensor hooks raises a ``RuntimeError`` that says so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["replay_kernels", "unvectorisable"]


@contextlib.contextmanager
def _math_attention() -> Iterator[None]:
    try:  # torch >= 2.3
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch: the (deprecated there later) CUDA-named flags, which cover CPU too
        with torch.backends.cuda.sdp_kernel(enable_flash=False, enable_math=True, enable_mem_efficient=False):
            yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


@contextlib.contextmanager
def _no_mha_fastpath() -> Iterator[None]:
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    previous = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(previous)


@contextlib.contextmanager
def _no_cudnn() -> Iterator[None]:
    previous = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False  # not cudnn.flags(): that would also reset benchmark/deterministic
    try:
        yield
    finally:
        torch.backends.cudnn.enabled = previous


_RECOMPUTATION = (
    "activation checkpointing (torch.utils.checkpoint) or other saved-tensor hooks in the model's "
    "forward cannot run while warpopt replays it (the exact objective, MAML): the recomputation "
    "would run after the replay has put the live parameters back, and differentiate those instead "
    "of the replayed θ_k. Turn checkpointing off in the model given to warpopt"
)


def _has_rnn(model: nn.Module | None) -> bool:
    return model is not None and any(isinstance(m, nn.RNNBase) for m in model.modules())


@contextlib.contextmanager
def replay_kernels(model: nn.Module | None = None, *, rnn: bool | None = None) -> Iterator[None]:
    """Context in which the replay evaluates ``model``: attention by the twice-differentiable
    math kernel, no ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` fast path, no
    cuDNN if ``model`` contains an RNN/LSTM/GRU (``rnn``: whether it does, when the caller
    already knows; saves walking the module tree at every forward), and no activation
    checkpointing (a ``RuntimeError`` saying why).

    These are process-wide flags in torch (not thread-local); they are restored on exit, also
    when the body raises. Nesting is safe.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(_math_attention())
        stack.enter_context(_no_mha_fastpath())
        if _has_rnn(model) if rnn is None else rnn:
            stack.enter_context(_no_cudnn())
        stack.enter_context(torch.autograd.graph.disable_saved_tensors_hooks(_RECOMPUTATION))
        yield


def unvectorisable(model: nn.Module) -> str | None:
    """Why ``torch.func.vmap`` cannot map ``model``'s forward, or None if it can (as far as
    known): the fused RNN/LSTM/GRU ops have no batching rule in torch."""
    names = sorted({type(m).__name__ for m in model.modules() if isinstance(m, nn.RNNBase)})
    if names:
        return f"torch.func.vmap has no batching rule for the fused recurrent op of {', '.join(names)}"
    return None
