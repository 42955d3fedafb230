"""The torch reference backend: unpack the 2-bit weights and run :func:`bitnet158.quant.bitlinear_ref`.

Exact integer product (fp32 accumulation of int8 values, see ``quant.int_matmul``), any device.
It keeps the int8 ternary matrix (1 byte/weight) after the first call so that decoding does not
unpack every step.
"""

from __future__ import annotations

import torch

from .. import quant

name = "torch"


def available(x: torch.Tensor) -> bool:
    return True


def prepare(layer) -> torch.Tensor:
    return quant.unpack_hf(layer.weight)  # int8 [out, in]


def forward(x: torch.Tensor, layer, w_t: torch.Tensor) -> torch.Tensor:
    return quant.bitlinear_ref(x, w_t, layer.weight_scale)
