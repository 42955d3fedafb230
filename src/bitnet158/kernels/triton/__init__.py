"""GPU backend of :mod:`bitnet158.kernels`: Triton W2A8 kernels for PackedLinear on CUDA tensors.

Importing this package registers the backend (``name = "triton"``) with
``bitnet158.kernels.register``; it raises ImportError where Triton is not installed, which the
kernel registry and the engine treat as "not available". The whole-model GPU engine is
:mod:`bitnet158.kernels.triton.runner`.

    y = layer(x.cuda())          # PackedLinear on CUDA -> act_quant kernel + W2A8 GEMV/GEMM
"""

from __future__ import annotations

import torch
import triton  # noqa: F401  (ImportError here means: no GPU backend)

from .. import register
from .common import gpu_unsupported, on_device
from .norm_quant import act_quant
from .w2a8 import w2a8_linear

name = "triton"


def available(x: torch.Tensor) -> bool:
    """CUDA tensors on sm_80 or newer (older GPUs fall through to the torch reference)."""
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and x.shape[-1] > 0
            and gpu_unsupported(x.device) is None)


def prepare(layer):
    """The HF layout is the kernel layout: keep a contiguous view and the fp32 gamma."""
    return layer.weight.contiguous(), layer.weight_scale.reshape(1).float().contiguous()


def forward(x: torch.Tensor, layer, state) -> torch.Tensor:
    w, gamma = state
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    with on_device(x.device):
        q, s = act_quant(x2)
        y = w2a8_linear(q, s, w, gamma, (w.shape[0],), out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])


register(__import__(__name__, fromlist=["name"]))

__all__ = ["act_quant", "w2a8_linear", "available", "prepare", "forward"]
