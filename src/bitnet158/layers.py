"""The two linear layers of a BitNet b1.58 model.

- :class:`BitLinear` trains: latent float weights, fake-quantized forward (absmean ternary weight,
  absmax int8 activation) with straight-through gradients — the "online" checkpoint layout.
- :class:`PackedLinear` infers: 2-bit weights in the released Hugging Face layout (uint8
  ``[out/4, in]``) and the absmean ``weight_scale`` multiplier; it calls the fastest kernel that
  :mod:`bitnet158.kernels` offers for the input's device, the torch reference otherwise.

Both keep the parameter names of the checkpoint (``weight``, ``weight_scale``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels, quant


class BitLinear(nn.Linear):
    """Training-time BitLinear: ``F.linear(ste(act_dequant(x)), ste(ternary_dequant(W)))``."""

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = quant.ste(self.weight, quant.ternary_dequant(self.weight))
        x = quant.ste(x, quant.act_dequant(x))
        return F.linear(x, w.to(x.dtype))

    @torch.no_grad()
    def to_packed(self) -> "PackedLinear":
        """Ternarize the latent weight once (absmean) into an inference layer."""
        w_t, gamma = quant.ternarize(self.weight)
        return PackedLinear.from_ternary(w_t, gamma)


class PackedLinear(nn.Module):
    """Inference BitLinear over 2-bit packed weights.

    Buffers: ``weight`` uint8 [out/4, in] (HF block layout), ``weight_scale`` fp32 [1] = gamma,
    always a multiplier here (the inverse-scale ``bitlinear`` convention is converted at load).
    ``y = (x_q @ W_t^T) * gamma / s_x``.
    """

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        if out_features % 4:
            raise ValueError(f"PackedLinear: out_features={out_features} is not a multiple of 4")
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight", torch.zeros(out_features // 4, in_features, dtype=torch.uint8,
                                                   device=device))
        self.register_buffer("weight_scale", torch.ones(1, dtype=torch.float32, device=device))
        self.kernel_state = None  # a backend's own copy/layout of the weights, built lazily

    @classmethod
    def from_ternary(cls, w_t: torch.Tensor, gamma: torch.Tensor | float) -> "PackedLinear":
        out, inp = w_t.shape
        m = cls(inp, out, device=w_t.device)
        m.weight.copy_(quant.pack_hf(w_t))
        m.weight_scale.fill_(float(gamma))
        return m

    def ternary(self) -> torch.Tensor:
        """W_t int8 [out, in]."""
        return quant.unpack_hf(self.weight)

    def invalidate(self) -> None:
        """Drop any backend layout (call after changing ``weight`` or ``weight_scale``)."""
        self.kernel_state = None

    def _apply(self, fn, recurse=True):  # .to(device) etc. must rebuild backend layouts
        self.kernel_state = None
        return super()._apply(fn, recurse)

    def __getstate__(self):  # copies and pickles rebuild backend layouts (a backend is a module)
        state = self.__dict__.copy()
        state["kernel_state"] = None
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.packed_linear(x, self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=2"
