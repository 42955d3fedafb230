"""Triton row kernel of the fused head loss: logits chunk -> per-row NLL and, in place, its gradient.

:mod:`bitnet158.train.losses` computes the head ``logits = h @ W^T`` a chunk of rows at a time. For
each chunk this kernel reads the logits (the GEMM's dtype, bf16 under autocast) and

- pass 1: online max / sum of exp over the row in fp32 -> ``lse``; ``nll = lse - logits[label]``;
- pass 2 (``WRITE_GRAD``): overwrites the logits with ``scale_row * (softmax - onehot(label))`` in
  the logits' dtype, the gradient of ``scale_row * nll`` w.r.t. the logits.

Rows whose label is ``ignore_index`` get ``nll = 0`` and a zero gradient. ``scale`` is read from a
device tensor (``1 / n_valid`` for a mean, ``1`` for a sum, ``-grad`` per row for the DPO
log-probs), so nothing waits on the host. The fp32 logits chunk of the torch formulation
(``logits.float()``, then softmax, then the one-hot update: three [c, V] fp32 tensors) never exists.

Tests: ``python3 -m pytest -q tests/train/test_fused_losses.py`` (CPU: Triton interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, cast


@triton.jit
def _ce_rows_kernel(z_ptr, y_ptr, nll_ptr, sc_ptr, V, stride_z, sc_stride, ignore_index,
                    BLOCK: tl.constexpr, V_ITERS: tl.constexpr, WRITE_GRAD: tl.constexpr,
                    INTERP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride_z
    label = tl.load(y_ptr + row)
    valid = label != ignore_index
    lab = tl.where(valid, label, 0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK,), tl.float32)
    for it in range(0, V_ITERS):                                     # pass 1: lanewise online lse
        o = it * BLOCK + offs
        z = tl.load(base + o, mask=o < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, z)
        alpha = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))
        s = s * alpha + tl.where(z == float("-inf"), 0.0, tl.exp(z - m_new))
        m = m_new
    mx = tl.max(m, axis=0)
    tot = tl.sum(s * tl.where(m == float("-inf"), 0.0, tl.exp(m - mx)), axis=0)
    lse = mx + tl.log(tot)
    zl = tl.load(base + lab).to(tl.float32)
    tl.store(nll_ptr + row, tl.where(valid, lse - zl, 0.0))
    if WRITE_GRAD:                                                   # pass 2: the gradient, in place
        sc = tl.load(sc_ptr + row * sc_stride)
        sc = tl.where(valid, sc, 0.0)
        for it in range(0, V_ITERS):
            o = it * BLOCK + offs
            msk = o < V
            z = tl.load(base + o, mask=msk, other=0.0).to(tl.float32)
            p = tl.exp(z - lse)
            p = tl.where(o == lab, p - 1.0, p) * sc
            tl.store(base + o, cast(p, z_ptr.dtype.element_ty, INTERP), mask=msk)


def ce_rows(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor | None = None,
            ignore_index: int = -100, write_grad: bool = True) -> torch.Tensor:
    """logits [c, V] (unit column stride; overwritten by the gradient when ``write_grad``),
    labels [c] int64, scale fp32 [] or [c] -> nll fp32 [c]."""
    c, V = logits.shape
    if logits.stride(-1) != 1:
        raise ValueError("ce_rows: logits need unit column stride")
    nll = torch.empty(c, dtype=torch.float32, device=logits.device)
    if scale is None:
        scale = torch.ones((), dtype=torch.float32, device=logits.device)
    sc = scale.float().contiguous()
    block = min(4096, triton.next_power_of_2(V))
    _ce_rows_kernel[(c,)](logits, labels.contiguous(), nll, sc, V, logits.stride(0),
                          1 if sc.numel() > 1 else 0, ignore_index, BLOCK=block,
                          V_ITERS=triton.cdiv(V, block), WRITE_GRAD=write_grad, INTERP=INTERPRET,
                          num_warps=8 if block >= 2048 else 4)
    return nll
