"""Training BitLinear as one autograd function: int8 forward, straight-through backward.

:class:`bitnet158.layers.BitLinear` (the reference) builds its forward out of fake-quant torch
ops, ``F.linear(ste(x_q / s_x), ste(W_t * gamma))``, and autograd keeps the float input and the
float dequantized weight alive for backward. :class:`FusedBitLinearFunction` computes the same
function differently:

- forward: the absmean ternary weight once per call (``W_t`` int8 [N, K] + ``gamma`` fp32), the
  per-token absmax int8 activations (``x_q`` int8 [M, K] + ``s_x`` fp32 [M, 1]) and the integer
  product with the scales in the epilogue, ``y = (x_q @ W_t^T) * (gamma / s_x)``
  (``quant.bitlinear_ref``'s fp32 ops);
- saved for backward: only ``x_q`` (int8), ``s_x``, ``W_t`` (int8) and ``gamma``;
- backward (straight-through estimator, torch matmuls in the gradient's dtype):
  ``grad_x = grad_y @ (W_t * gamma)``, ``grad_W = grad_y^T @ (x_q / s_x)``.

Backends: ``"triton"`` (:mod:`bitnet158.kernels.triton.bitlinear_train`: act-quant kernel + int8
``tl.dot`` GEMM; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), ``"torch"`` (no
Triton needed: ``quant.act_quant`` + ``quant.int_matmul``), ``"auto"`` = Triton where it can run.
Both are exact in integers. GPU speed has not been measured yet.

Use it on a model without touching the training loop::

    from bitnet158.kernels.bitlinear_train import use_fused_bitlinear
    use_fused_bitlinear(model)            # every BitLinear becomes a FusedBitLinear, in place

Tests: ``python3 -m pytest -q tests/kernels/test_bitlinear_train.py`` (CPU: Triton interpreter).
This module imports without Triton.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import quant
from ..layers import BitLinear

try:  # Triton is optional: without it only the torch backend exists
    from .triton import bitlinear_train as _tk
except ImportError:  # pragma: no cover - exercised where Triton is not installed
    _tk = None

BACKENDS = ("auto", "triton", "torch")


# ---------------------------------------------------------------- backend choice

def triton_usable(x: torch.Tensor) -> bool:
    """The Triton kernels can run on x: a CUDA tensor, or any tensor under the interpreter."""
    return _tk is not None and _tk.usable(x)


def _resolve(backend: str, x: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"fused BitLinear: backend={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        return "triton" if triton_usable(x) else "torch"
    if backend == "triton" and not triton_usable(x):
        raise RuntimeError("fused BitLinear: backend='triton' needs Triton and a CUDA tensor "
                           "(or TRITON_INTERPRET=1 set before Triton is imported)")
    return backend


# ---------------------------------------------------------------- the autograd function

class FusedBitLinearFunction(torch.autograd.Function):
    """``y = BitLinear(x; W)`` with int8 forward and STE backward; see the module docstring.

    ``apply(x [..., K], weight [N, K], backend)`` -> y [..., N] in x's dtype.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        K = x.shape[-1]
        if weight.shape[-1] != K:
            raise ValueError(f"fused BitLinear: weight has in_features={weight.shape[-1]}, "
                             f"input has {K}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, K)                                        # [M, K]
        be = _resolve(backend, x)
        w_t, gamma = quant.ternarize(weight)                         # int8 [N, K], fp32 scalar
        if be == "triton":
            y, x_q, s = _tk.forward_int8(x2, w_t, gamma, x.dtype)   # [M, N], int8 [M, K], [M, 1]
        else:
            x_q, s = quant.act_quant(x2)                             # int8 [M, K], fp32 [M, 1]
            y = (quant.int_matmul(x_q, w_t).float() * (gamma / s)).to(x.dtype)
        ctx.save_for_backward(x_q, s, w_t, gamma)
        ctx.x_shape = x.shape
        ctx.w_dtype = weight.dtype
        return y.reshape(*lead, w_t.shape[0])

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x_q, s, w_t, gamma = ctx.saved_tensors
        g2 = grad_y.reshape(-1, grad_y.shape[-1])                    # [M, N]
        dt = grad_y.dtype
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            # the dequantized weight as the reference forms it: W_t / (1 / gamma), in the grad dtype
            w_deq = (w_t.float() / (1.0 / gamma)).to(ctx.w_dtype).to(dt)  # [N, K]
            grad_x = (g2 @ w_deq).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            x_deq = (x_q.float() / s).to(dt)                         # [M, K]
            grad_w = (g2.t() @ x_deq).to(ctx.w_dtype)                # [N, K]
        return grad_x, grad_w, None


def fused_bitlinear(x: torch.Tensor, weight: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Functional form of :class:`FusedBitLinearFunction`."""
    return FusedBitLinearFunction.apply(x, weight, backend)


# ---------------------------------------------------------------- module and model swap

class FusedBitLinear(BitLinear):
    """Drop-in :class:`BitLinear` (same ``weight`` parameter) running :func:`fused_bitlinear`."""

    backend: str = "auto"

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None,
                 backend: str = "auto"):
        super().__init__(in_features, out_features, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_bitlinear(x, self.weight, self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend}"


def use_fused_bitlinear(model: nn.Module, backend: str = "auto") -> int:
    """Turn every :class:`BitLinear` of ``model`` into a :class:`FusedBitLinear`, in place.

    The modules keep their identity and parameters (optimizer state, hooks and wrappers stay
    valid): only their class changes. Returns the number of modules switched.
    """
    if backend not in BACKENDS:
        raise ValueError(f"use_fused_bitlinear: backend={backend!r} is not one of {BACKENDS}")
    n = 0
    for m in model.modules():
        if isinstance(m, BitLinear):
            if type(m) is BitLinear:
                m.__class__ = FusedBitLinear
                n += 1
            if isinstance(m, FusedBitLinear):
                m.backend = backend
    return n


def use_reference_bitlinear(model: nn.Module) -> int:
    """Undo :func:`use_fused_bitlinear`: FusedBitLinear modules become plain BitLinear again."""
    n = 0
    for m in model.modules():
        if type(m) is FusedBitLinear:
            m.__class__ = BitLinear
            n += 1
    return n
