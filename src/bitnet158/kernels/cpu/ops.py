"""The C kernels on torch tensors: layout conversion, huge-page buffers, GEMM/linear/head calls.

    from bitnet158.kernels import cpu
    w16 = cpu.convert(layer.weight)          # HF uint8 [N/4, K] -> kernel layout (T16; "b3": 1.6 bits)
    q, s, sa = cpu.act_quant(x)              # == quant.act_quant(x), plus the row sums of q
    acc = cpu.gemm_i32(w16, N, q)            # == quant.int_matmul(q, W_t), exactly
    y = cpu.linear(x, w16, N, gamma)         # == quant.bitlinear_ref (fp32)

Every name here is also reachable as ``bitnet158.kernels.cpu.<name>`` (loaded on first use, so that
``bitnet158.kernels.cpu`` itself imports without torch). Layout conversion, huge-page buffers, the
int8 head quantization and the bandwidth probe are the numpy functions of :mod:`.cmodel` (the
torch-free engine's) on tensor views. Tests: tests/kernels/test_cpu_kernels.py.
"""

from __future__ import annotations

import torch

from . import LAYOUTS, _layout, _lib, cmodel, kpad, layout_bytes, pad16


def convert(packed: torch.Tensor, layout: str = "t16", out: torch.Tensor | None = None) -> torch.Tensor:
    """HF packed uint8 [N/4, K] -> a kernel layout (bitnet_cpu.h), uint8 [layout_bytes(N, K)].

    ``out``: a uint8 buffer of exactly that many bytes to convert into (e.g. a slice of an arena)."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"convert: expected uint8 [out/4, in], got {packed.dtype} {list(packed.shape)}")
    size = layout_bytes(packed.shape[0] * 4, packed.shape[1], layout)
    if out is None:
        out = torch.empty(size, dtype=torch.uint8)
    elif out.dtype != torch.uint8 or out.numel() != size or not out.is_contiguous():
        raise ValueError(f"convert: out must be {size} contiguous uint8, got {out.dtype} {list(out.shape)}")
    cmodel.convert(packed.contiguous().numpy(), layout, out.numpy())
    return out


def huge_empty(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 [nbytes] buffer on transparent huge pages where the OS allows it
    (:func:`.cmodel.huge_array`, shared with torch)."""
    return torch.from_numpy(cmodel.huge_array(nbytes))


def collapse_huge(t: torch.Tensor) -> bool:
    """Move an already-written tensor onto huge pages in place (MADV_COLLAPSE); False if refused."""
    return _lib().bn_advise_huge(t.data_ptr(), t.numel() * t.element_size(), 1) > 0


def act_quant(x: torch.Tensor, kp: int | None = None):
    """x [M, K] -> (x_q int8 [M, K], s fp32 [M, 1], Σx_q int32 [M]); identical to quant.act_quant."""
    xf = x.detach().float().contiguous()
    m, k = xf.shape
    kp = kp or pad16(k)
    q = torch.empty(m, kp, dtype=torch.int8)
    s = torch.empty(m, 1, dtype=torch.float32)
    sa = torch.empty(m, dtype=torch.int32)
    _lib().bn_act_quant(xf.data_ptr(), m, k, kp, q.data_ptr(), s.data_ptr(), sa.data_ptr())
    return q[:, :k], s, sa


def gemm_i32(w16: torch.Tensor, n: int, x_q: torch.Tensor, layout: str = "t16") -> torch.Tensor:
    """Exact int32 [M, N] = x_q int8 [M, K] @ W_t^T, with W in a kernel layout (from :func:`convert`)."""
    m, k = x_q.shape
    kp = kpad(k, layout)
    if w16.numel() != layout_bytes(n, k, layout):
        raise ValueError(f"gemm_i32: weight buffer of {w16.numel()} bytes does not match N={n}, K={k} "
                         f"in layout {layout}")
    xq = torch.zeros(m, kp, dtype=torch.int8)
    xq[:, :k] = x_q
    sa = torch.zeros(m, dtype=torch.int32)       # raw Σu·a - Σa needs Σa: compute it exactly
    sa += x_q.to(torch.int32).sum(dim=1, dtype=torch.int32)
    out = torch.empty(m, n, dtype=torch.int32)
    _lib().bn_gemm_i32(w16.data_ptr(), n, kp, xq.data_ptr(), m, sa.data_ptr(), out.data_ptr(), _layout(layout))
    return out


def linear(x: torch.Tensor, w16: torch.Tensor, n: int, gamma: float) -> torch.Tensor:
    """The BitLinear forward x [M, K] -> fp32 [M, N], as quant.bitlinear_ref (fp32)."""
    xf = x.detach().float().contiguous()
    m, k = xf.shape
    kp = pad16(k)
    tg = torch.full((pad16(n) // 16,), float(gamma), dtype=torch.float32)
    y = torch.empty(m, n, dtype=torch.float32)
    q = torch.empty(m, kp, dtype=torch.int8)
    s = torch.empty(m, dtype=torch.float32)
    sa = torch.empty(m, dtype=torch.int32)
    _lib().bn_linear(xf.data_ptr(), m, k, w16.data_ptr(), n, kp, tg.data_ptr(), y.data_ptr(),
                     q.data_ptr(), s.data_ptr(), sa.data_ptr(), LAYOUTS["t16"])
    return y


HEAD_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}


def head_gemv(w: torch.Tensor, x: torch.Tensor, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 [M, V] = x fp32 [M, D] @ W^T, W [V, D] fp32 / bf16 / int8 (then times row_scale [V])."""
    if w.dtype not in HEAD_KINDS:
        raise ValueError(f"head_gemv: weight dtype {w.dtype} (expected fp32, bf16 or int8)")
    if (w.dtype == torch.int8) != (row_scale is not None):
        raise ValueError("head_gemv: row_scale is required for (and only for) int8 weights")
    w = w.contiguous()
    xf = x.detach().float().contiguous()
    v, d = w.shape
    out = torch.empty(xf.shape[0], v, dtype=torch.float32)
    rs = row_scale.float().contiguous() if row_scale is not None else None
    _lib().bn_head_gemv(w.data_ptr(), HEAD_KINDS[w.dtype], rs.data_ptr() if rs is not None else None,
                        v, d, xf.data_ptr(), xf.shape[0], out.data_ptr())
    return out


def quantize_rows_int8(w: torch.Tensor, chunk: int = 8192,
                       out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8: W [V, D] -> (q int8 [V, D], scale fp32 [V]); W ≈ q * scale[:, None]
    (:func:`.cmodel.quantize_rows_int8`, the head="int8" engines' own). ``out``: an int8 [V, D]
    tensor to write q into."""
    q = torch.empty(w.shape, dtype=torch.int8) if out is None else out
    scale = cmodel.quantize_rows_int8(lambda i0, i1: w[i0:i1].detach().float().numpy(), w.shape[0], w.shape[1],
                                      q.numpy(), chunk)
    return q, torch.from_numpy(scale)


bandwidth = cmodel.bandwidth
HUGE = cmodel.HUGE


__all__ = ["convert", "huge_empty", "collapse_huge", "act_quant", "gemm_i32", "linear", "HEAD_KINDS",
           "head_gemv", "quantize_rows_int8", "bandwidth", "HUGE"]
