"""Training BitLinear as one autograd function: int8 forward, straight-through backward.

:class:`bitnet158.layers.BitLinear` (the reference) builds its forward out of fake-quant torch
ops, ``F.linear(ste(x_q / s_x), ste(W_t * gamma))``, and autograd keeps the float input and the
float dequantized weight alive for backward. :class:`FusedBitLinearFunction` computes the same
function differently:

- forward: the absmean ternary weight once per weight version (:func:`ternary_weight`: ``W_t``
  int8 [N, K] + ``gamma`` fp32), the per-token absmax int8 activations (``x_q`` int8 [M, K] +
  ``s_x`` fp32 [M, 1]) and the integer product with the scales in the epilogue,
  ``y = (x_q @ W_t^T) * (gamma / s_x)`` (``quant.bitlinear_ref``'s fp32 ops);
- saved for backward: only ``x_q`` (int8), ``s_x``, ``W_t`` (int8) and ``gamma``;
- backward (straight-through estimator, torch matmuls in the gradient's dtype, dequantized
  operands transient): ``grad_x = grad_y @ (W_t * gamma)``, ``grad_W = grad_y^T @ (x_q / s_x)``.

Inside the BitNet block the projections run grouped behind their RMSNorm
(:mod:`bitnet158.kernels.norm_bitlinear`, ``FusedBlock``); :func:`use_fused_bitlinear` swaps both
in. Backends: ``"triton"`` (:mod:`bitnet158.kernels.triton.bitlinear_train`; CUDA tensors, or CPU
tensors under ``TRITON_INTERPRET=1``), ``"torch"`` (no Triton needed: ``quant.act_quant`` +
``quant.int_matmul``), ``"auto"`` = Triton for CUDA tensors. Both are exact in integers. Step time
and memory on an H100: docs/fused-training.md (``bench/train_step.py``).

Use it on a model without touching the training loop::

    from bitnet158.kernels.bitlinear_train import use_fused_bitlinear
    use_fused_bitlinear(model)            # BitLinear -> FusedBitLinear, Block -> FusedBlock, in place

Tests: ``python3 -m pytest -q tests/kernels/test_bitlinear_train.py`` (CPU: Triton interpreter).
This module imports without Triton.
"""

from __future__ import annotations

import os
import weakref

import torch
from torch import nn

from .. import quant
from ..layers import BitLinear

try:  # Triton is optional: without it only the torch backend exists
    from .triton import bitlinear_train as _tk
except ImportError:  # pragma: no cover - exercised where Triton is not installed
    _tk = None

BACKENDS = ("auto", "triton", "torch")
# Forward product of the Triton backend: "triton" (int8 tensor-core kernel, scales in the epilogue) or
# "bf16" (cuBLAS on integer-valued bf16 operands with fp32 accumulation, exact too; scales in torch).
GEMM = os.environ.get("BITNET158_FUSED_GEMM", "triton")
# Hold each int8 ternary weight until its latent weight changes (see ternary_weight).
HOLD_TERNARY = os.environ.get("BITNET158_HOLD_TERNARY", "0") == "1"


# ---------------------------------------------------------------- backend choice

def triton_usable(x: torch.Tensor) -> bool:
    """The Triton kernels can run on x: a CUDA tensor, or any tensor under the interpreter."""
    return _tk is not None and _tk.usable(x)


def _resolve(backend: str, x: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"fused BitLinear: backend={backend!r} is not one of {BACKENDS}")
    if backend == "auto":   # Triton on CUDA; the interpreter only when asked for by name
        return "triton" if x.is_cuda and triton_usable(x) else "torch"
    if backend == "triton" and not triton_usable(x):
        why = _tk.gpu_unsupported(x.device) if _tk is not None and x.is_cuda else None
        raise RuntimeError("fused BitLinear: backend='triton' needs Triton and a CUDA tensor on an sm_80 or "
                           "newer GPU (or TRITON_INTERPRET=1 set before Triton is imported)"
                           + (f": {why}" if why else ""))
    return backend


# ---------------------------------------------------------------- ternary weight, once per version

def _ternarize(weight: torch.Tensor, be: str) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        if be == "triton":
            return _tk.ternarize(weight)
        return quant.ternarize(weight)


def ternary_weight(weight: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(W_t int8 [N, K], gamma fp32 scalar) of ``weight``, computed once per weight version.

    The result is remembered on the parameter, keyed on its storage and version counter (every
    in-place update, the optimizer's step or an FSDP all-gather into the buffer, bumps it). By
    default through a weak reference: it lives as long as something holds it (the autograd graph of
    the forward that made it), so nothing is kept between steps; a forward recomputed under
    activation checkpointing, or the next micro-batch of a gradient accumulation, quantizes again.
    With ``HOLD_TERNARY = True`` the int8 weight is held until the weight changes: absmean runs once
    per optimizer step whatever the recomputation, at 1 byte per parameter (for FSDP: the unsharded
    int8 weight of every block on every rank).
    """
    be = _resolve(backend, weight)
    if torch.compiler.is_compiling():
        return _ternarize(weight, be)
    key = (weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape), be)
    hit = getattr(weight, "_bitnet158_ternary", None)
    if hit is not None and hit[0] == key:
        w_t = hit[1]() if isinstance(hit[1], weakref.ref) else hit[1]
        if w_t is not None:
            return w_t, hit[2]
    if hit is not None:
        weight._bitnet158_ternary = None                    # drop a held stale copy before making one
    w_t, gamma = _ternarize(weight, be)
    try:
        weight._bitnet158_ternary = (key, w_t if HOLD_TERNARY else weakref.ref(w_t), gamma)
    except (AttributeError, RuntimeError):  # pragma: no cover - a tensor type that takes no attributes
        pass
    return w_t, gamma


def _out_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype F.linear would return: autocast's where autocast is on, else ``dtype``."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return dtype


def dequant_weight(w_t: torch.Tensor, gamma: torch.Tensor, w_dtype: torch.dtype,
                   dt: torch.dtype) -> torch.Tensor:
    """``W_t * gamma`` as the reference forms it (``W_t / (1 / gamma)`` in fp32, then w's dtype,
    then the compute dtype); gamma a scalar or one per row [N]."""
    g = gamma.reshape(-1, 1) if gamma.numel() > 1 else gamma
    if dt == torch.float32 or w_dtype != torch.float32:
        return (w_t.float() / (1.0 / g)).to(w_dtype).to(dt)
    return w_t.to(dt) * (1.0 / (1.0 / g)).to(dt)           # bf16: +-bf16(gamma), no fp32 [N, K]


def dequant_act(x_q: torch.Tensor, s: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """``x_q / s_x`` in fp32, cast to dt: x_q int8 [M, K], s fp32 [M, 1] -> [M, K]."""
    if _tk is not None and dt != torch.float32 and x_q.is_cuda:
        return _tk.dequant_rows(x_q, s, dt)
    return (x_q.float() / s).to(dt)


# ---------------------------------------------------------------- the autograd function

class FusedBitLinearFunction(torch.autograd.Function):
    """``y = BitLinear(x; W)`` with int8 forward and STE backward; see the module docstring.

    ``apply(x [..., K], weight [N, K], backend)`` -> y [..., N] in x's dtype (autocast's dtype
    under autocast, as F.linear).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        K = x.shape[-1]
        if weight.shape[-1] != K:
            raise ValueError(f"fused BitLinear: weight has in_features={weight.shape[-1]}, "
                             f"input has {K}")
        lead = x.shape[:-1]
        be = _resolve(backend, x)
        out_dt = _out_dtype(x, x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, K)                                    # [M, K]
            w_t, gamma = ternary_weight(weight, be)                  # int8 [N, K], fp32 scalar
            if be == "triton":
                y, x_q, s = _tk.forward_int8(x2, w_t, gamma, out_dt)   # [M, N], int8 [M, K], [M, 1]
            else:
                x_q, s = quant.act_quant(x2)                         # int8 [M, K], fp32 [M, 1]
                y = (quant.int_matmul(x_q, w_t).float() * (gamma / s)).to(out_dt)
        ctx.save_for_backward(x_q, s, w_t, gamma)
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x.shape, x.dtype, weight.dtype
        return y.reshape(*lead, w_t.shape[0])

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x_q, s, w_t, gamma = ctx.saved_tensors
        g2 = grad_y.reshape(-1, grad_y.shape[-1])                    # [M, N]
        dt = grad_y.dtype
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            w_deq = dequant_weight(w_t, gamma, ctx.w_dtype, dt)      # [N, K], transient
            grad_x = (g2 @ w_deq).to(ctx.x_dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            x_deq = dequant_act(x_q, s, dt)                          # [M, K], transient
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


def use_fused_bitlinear(model: nn.Module, backend: str = "auto", fuse_norm: bool = True) -> int:
    """Switch ``model`` to the fused training path, in place; returns the BitLinear modules switched.

    Every :class:`BitLinear` becomes a :class:`FusedBitLinear`; with ``fuse_norm`` every
    :class:`model.Block` also becomes a :class:`norm_bitlinear.FusedBlock` (RMSNorm + quantization
    in one kernel, q|k|v and gate|up as one GEMM each). Only classes change: parameters, names,
    optimizer state and hooks stay valid. Call it before ``fully_shard``/DDP, activation
    checkpointing or ``torch.compile`` wrap the model.
    """
    if backend not in BACKENDS:
        raise ValueError(f"use_fused_bitlinear: backend={backend!r} is not one of {BACKENDS}")
    from ..model import Block
    from .norm_bitlinear import FusedBlock
    n = 0
    for m in model.modules():
        if isinstance(m, BitLinear):
            if type(m) is BitLinear:
                m.__class__ = FusedBitLinear
                n += 1
            if isinstance(m, FusedBitLinear):
                m.backend = backend
        if fuse_norm and type(m) is Block and all(
                isinstance(p, BitLinear) for p in (m.self_attn.q_proj, m.self_attn.o_proj, m.mlp.down_proj)):
            m.__class__ = FusedBlock
        if isinstance(m, FusedBlock):
            m.fused_backend = backend
    return n


def use_reference_bitlinear(model: nn.Module) -> int:
    """Undo :func:`use_fused_bitlinear`: the reference BitLinear and Block classes come back."""
    from ..model import Block
    from .norm_bitlinear import FusedBlock
    n = 0
    for m in model.modules():
        if type(m) is FusedBitLinear:
            m.__class__ = BitLinear
            n += 1
        elif type(m) is FusedBlock:
            m.__class__ = Block
    return n
