"""Optional int8 output head: per-row absmax int8 weights, bf16 activations, fp32 logits.

The bf16 head (128256 x 2560) is 56 % of the bytes a 2B4T decode step reads; an int8 copy with
one fp32 scale per vocabulary row halves that (0.33 GB instead of 0.66 GB). It is an
approximation of the model (weights rounded to 8 bits, ~0.4 % relative error per weight), so it
is off by default: ``TritonRunner(model, int8_head=True)``.

    w_q, w_s = quantize_head(weight)            # int8 [V, D], fp32 [V]
    logits = int8_head(x, w_q, w_s)             # x [M, D] -> fp32 [M, V] (split-tile kernel)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, PDL, gdc_launch_dependents, gdc_wait

_pdl = dict(launch_pdl=True) if PDL else {}


@triton.jit
def _head_kernel(x_ptr, w_ptr, ws_ptr, out_ptr, V, D, stride_x, stride_o, M,
                 MB: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr, PDL: tl.constexpr):
    """BV vocabulary rows of the whole D (one tile, loaded before the wait) for MB rows of x."""
    rows = tl.program_id(0) * BV + tl.arange(0, BV)
    pid_m = tl.program_id(1)
    ds = tl.arange(0, BD)
    rmask = rows < V
    w = tl.load(w_ptr + rows[:, None] * D + ds[None, :], mask=rmask[:, None] & (ds < D)[None, :],
                other=0).to(tl.float32)                                                 # [BV, BD]
    sc = tl.load(ws_ptr + rows, mask=rmask, other=0.0)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    for mi in tl.static_range(MB):
        m = pid_m * MB + mi
        x = tl.load(x_ptr + m * stride_x + ds, mask=(ds < D) & (m < M), other=0.0).to(tl.float32)
        y = tl.sum(w * x[None, :], axis=1) * sc
        tl.store(out_ptr + m * stride_o + rows, y, mask=rmask & (m < M))


@triton.jit
def _head_split(x_ptr, w_ptr, ws_ptr, out_ptr, V, D, stride_x, stride_o, M,
                MB: tl.constexpr, BV: tl.constexpr, BD1: tl.constexpr, BD2: tl.constexpr,
                PDL: tl.constexpr):
    """BV vocabulary rows as two column tiles [BV, BD1] + [BV, BD2] (D = 2560 = 2048 + 512: no
    masked lanes), both loaded before the wait; fewer, larger programs than ``_head_kernel``,
    so the activation row is re-read from L2 fewer times."""
    rows = tl.program_id(0) * BV + tl.arange(0, BV)
    pid_m = tl.program_id(1)
    rmask = rows < V
    d1 = tl.arange(0, BD1)
    d2 = BD1 + tl.arange(0, BD2)
    w1 = tl.load(w_ptr + rows[:, None] * D + d1[None, :], mask=rmask[:, None] & (d1 < D)[None, :], other=0)
    w2 = tl.load(w_ptr + rows[:, None] * D + d2[None, :], mask=rmask[:, None] & (d2 < D)[None, :], other=0)
    sc = tl.load(ws_ptr + rows, mask=rmask, other=0.0)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    for mi in tl.static_range(MB):
        m = pid_m * MB + mi
        x1 = tl.load(x_ptr + m * stride_x + d1, mask=(d1 < D) & (m < M), other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + m * stride_x + d2, mask=(d2 < D) & (m < M), other=0.0).to(tl.float32)
        y = tl.sum(w1.to(tl.float32) * x1[None, :], axis=1) + tl.sum(w2.to(tl.float32) * x2[None, :], axis=1)
        tl.store(out_ptr + m * stride_o + rows, y * sc, mask=rmask & (m < M))


# (rows a program, warps) of the split kernel; None: the one-tile kernel. On an H100 (2B4T head,
# batch 1, bench/gpu_decode.py) the split kernel at (8, 4) took 0.065-0.11 ms less a step than the
# one-tile kernel in three runs ((16, 8) as fast in one of them): 1.286 ms against 1.351 (ctx 1024).
HEAD_CONFIG: tuple[int, int] | None = (8, 4)


def quantize_head(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[V, D] float -> (int8 [V, D], fp32 scale [V]) with w ~ w_q * scale, scale = max|row| / 127."""
    w_q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for r in range(0, weight.shape[0], 8192):                  # bounded fp32 temporaries
        wf = weight[r:r + 8192].float()
        s = wf.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        w_q[r:r + 8192] = (wf / s[:, None]).round().clamp(-127, 127).to(torch.int8)
        scale[r:r + 8192] = s
    return w_q, scale


def int8_head(x: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None,
              config: tuple[int, int] | None = None):
    """x [M, D] (any float dtype) -> fp32 logits [M, V] = (x . w_q[v]) * scale[v].

    ``config``: (rows a program, warps) of ``_head_split``; ``()`` the one-tile ``_head_kernel``;
    None: ``HEAD_CONFIG``.
    """
    M, D = x.shape
    V = w_q.shape[0]
    if w_q.shape[1] != D:
        raise ValueError(f"int8_head: head has {w_q.shape[1]} columns, activations {D}")
    out = out if out is not None else torch.empty((M, V), dtype=torch.float32, device=x.device)
    config = HEAD_CONFIG if config is None else config
    if config:
        bv, nw = config
        bd1 = 1 << (D.bit_length() - 1)                        # D = bd1 + rest, rest < bd1
        bd2 = triton.next_power_of_2(max(D - bd1, 1))
        mb = min(M, 8)
        _head_split[(triton.cdiv(V, bv), triton.cdiv(M, mb))](
            x, w_q, scale, out, V, D, x.stride(0), out.stride(0), M, MB=mb, BV=bv, BD1=bd1, BD2=bd2,
            PDL=PDL, num_warps=nw, **_pdl)
        return out
    bd = triton.next_power_of_2(D)
    bv = max(1, min(16, 16384 // bd))
    mb = min(M, 8)
    _head_kernel[(triton.cdiv(V, bv), triton.cdiv(M, mb))](
        x, w_q, scale, out, V, D, x.stride(0), out.stride(0), M, MB=mb, BV=bv, BD=bd, PDL=PDL,
        num_warps=8 if bd >= 2048 else 4, **_pdl)
    return out


__all__ = ["quantize_head", "int8_head", "INTERPRET"]
