"""The C kernels as a :mod:`bitnet158.kernels` backend for single ``PackedLinear`` calls on CPU.

Registered when this module is imported (``bitnet158.kernels`` imports it; torch is imported on
first use, so that import stays torch-free); ``available(x)`` is
False when the library could not be loaded (one warning), for non-CPU tensors and under autograd,
so the torch reference serves those. Results are bitwise those of ``quant.bitlinear_ref`` in fp32
(same integer product, same ``acc * (gamma / s_x)`` epilogue), then cast to ``x``'s dtype.
The whole-model engine (:mod:`.runner`) is much faster than layer-by-layer calls: use it for
generation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import LAYOUTS, binding, pad16

if TYPE_CHECKING:
    import torch

name = "cpu-c"


def available(x) -> bool:
    import torch
    if x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()):
        return False
    return binding.lib() is not None


def prepare(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(T16 weights, gamma per 16-row tile) built once from the HF layout (one layer at a time:
    the 2-bit layout, which every ISA path runs natively)."""
    import torch
    from . import convert
    n = layer.out_features
    w16 = convert(layer.weight)
    tg = torch.full((pad16(n) // 16,), float(layer.weight_scale.float().reshape(-1)[0]), dtype=torch.float32)
    return w16, tg


def forward(x, layer, state):
    import torch
    w16, tg = state
    lib = binding.lib()
    k, n = layer.in_features, layer.out_features
    if x.shape[-1] != k:
        raise ValueError(f"PackedLinear: input has {x.shape[-1]} features, layer expects {k}")
    lead = x.shape[:-1]
    xf = x.detach().reshape(-1, k).float().contiguous()
    m = xf.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    if m:
        kp = pad16(k)
        q = torch.empty(m, kp, dtype=torch.int8)
        s = torch.empty(m, dtype=torch.float32)
        sa = torch.empty(m, dtype=torch.int32)
        lib.bn_linear(xf.data_ptr(), m, k, w16.data_ptr(), n, kp, tg.data_ptr(), y.data_ptr(),
                      q.data_ptr(), s.data_ptr(), sa.data_ptr(), LAYOUTS["t16"])
    return y.reshape(*lead, n).to(x.dtype)


def _register() -> None:
    import sys

    from ... import kernels
    if not any(getattr(b, "name", None) == name for b in kernels._BACKENDS):   # (backends() loads torch)
        kernels.register(sys.modules[__name__])


_register()
