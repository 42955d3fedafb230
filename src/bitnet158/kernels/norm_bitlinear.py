"""The fused training block: RMSNorm + int8 quantization + the BitLinear projections that read it.

In the BitNet block every BitLinear reads an RMSNorm's output: q/k/v read ``input_layernorm``, o
reads ``attn_sub_norm``, gate/up read ``post_attention_layernorm``, down reads ``ffn_sub_norm``.
:class:`NormBitLinearFunction` runs one such group as a single autograd function:

- forward: RMSNorm and per-token absmax quantization in one row kernel (the normed activations are
  never written: ``x_q`` int8 [M, D], ``s_x`` fp32 [M], ``rstd`` fp32 [M]), then ONE int8 GEMM over
  the group's concatenated ternary weights (q|k|v or gate|up; ``gamma`` one per output column) with
  the scales in the epilogue; ``y`` [M, sum N] in autocast's dtype;
- saved for backward: the block input x, ``rstd``, ``x_q``, ``s_x``, the int8 ``W_t`` and the gammas;
- backward (straight-through estimator): ``gh = gy @ (W_t * gamma)`` (one GEMM for the group, in the
  gradient's dtype), ``grad_W = gy^T @ (x_q / s_x)`` (one GEMM, split per weight), then the RMSNorm
  backward kernel gives grad x and the norm weight's gradient.

The function equals the reference ``RMSNorm`` -> ``BitLinear`` x n (same fp32 ops and roundings in
the forward; gradients within fp32 rounding). :class:`FusedBlock` is a :class:`model.Block` whose
training forward uses it four times per layer; ``use_fused_bitlinear(model)`` swaps it in.

Backends as :mod:`.bitlinear_train`: ``"triton"`` (kernels in ``triton/norm_quant_train.py`` and
``triton/bitlinear_train.py``), ``"torch"`` (the same math in torch ops), ``"auto"``.

Tests: ``python3 -m pytest -q tests/kernels/test_norm_bitlinear.py`` (CPU: Triton interpreter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import quant
from ..model import Block, apply_rope, attend
from . import bitlinear_train as bt

try:
    from .triton import norm_quant_train as _nq
except ImportError:  # pragma: no cover - no Triton: the torch backend only
    _nq = None


# ---------------------------------------------------------------- torch reference pieces

def _rms_quant_torch(x2: torch.Tensor, w: torch.Tensor, eps: float):
    """model.RMSNorm then quant.act_quant: x [M, D] -> (x_q int8, s_x fp32 [M], rstd fp32 [M])."""
    xf = x2.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)           # [M, 1]
    y = w * (xf * r).to(x2.dtype)
    x_q, s = quant.act_quant(y)
    return x_q, s.reshape(-1), r.reshape(-1)


def _rms_backward_torch(x2, w, r, gy):
    xf, gy = x2.float(), gy.float()
    xhat = xf * r[:, None]
    gw = (gy * xhat.to(x2.dtype).float()).sum(0)
    gh = gy * w.float()
    gx = r[:, None] * (gh - xhat * (gh * xhat).mean(-1, keepdim=True))
    return gx.to(x2.dtype), gw


def int8_gemm_scaled(x_q, s, w_t, g_col, out_dt, be: str) -> torch.Tensor:
    """``(x_q @ W_t^T) * (gamma[n] / s[m])`` -> [M, N] out_dt; exact integers on every path."""
    if be == "triton":
        if bt.GEMM == "bf16" and x_q.is_cuda:
            # cuBLAS on integer-valued bf16 operands with an fp32 result: exact too (|sum| < 2**24)
            acc = torch.mm(x_q.to(torch.bfloat16), w_t.to(torch.bfloat16).t(), out_dtype=torch.float32)
            return (acc * (g_col / s[:, None])).to(out_dt)
        return bt._tk.int8_linear(x_q, s, w_t, g_col, out_dtype=out_dt)
    return (quant.int_matmul(x_q, w_t).float() * (g_col / s[:, None])).to(out_dt)


# ---------------------------------------------------------------- the autograd function

class NormBitLinearFunction(torch.autograd.Function):
    """``cat([BitLinear(RMSNorm(x); W_i) for i])``: ``apply(x [..., D], norm_w [D], eps, backend,
    W_1 [N_1, D], ...)`` -> y [..., N_1 + ... + N_n]."""

    @staticmethod
    def forward(ctx, x, norm_w, eps: float, backend: str, *weights):
        D = x.shape[-1]
        for i, w in enumerate(weights):
            if w.shape[-1] != D:
                raise ValueError(f"fused norm+BitLinear: weight {i} has in_features={w.shape[-1]}, "
                                 f"input has {D}")
        be = bt._resolve(backend, x)
        ydt = torch.promote_types(norm_w.dtype, x.dtype)             # the normed output's dtype
        out_dt = bt._out_dtype(x, ydt)
        lead = x.shape[:-1]
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, D)
            if not x2.is_contiguous():
                x2 = x2.contiguous()
            tw = [bt.ternary_weight(w, be) for w in weights]        # [(int8 [N_i, D], gamma_i)]
            w_t = tw[0][0] if len(tw) == 1 else torch.cat([t for t, _ in tw])       # int8 [N, D]
            g_col = (tw[0][1] if len(tw) == 1 else
                     torch.cat([g.reshape(1).expand(t.shape[0]) for t, g in tw]))  # fp32 [N] or []
            if be == "triton":
                x_q, s, r = _nq.rms_quant(x2, norm_w, eps)
            else:
                x_q, s, r = _rms_quant_torch(x2, norm_w, eps)
            y = int8_gemm_scaled(x_q, s, w_t, g_col, out_dt, be)      # [M, N]
        ctx.save_for_backward(x2, norm_w, r, x_q, s, w_t, g_col)
        ctx.be, ctx.lead = be, lead
        ctx.splits = [t.shape[0] for t, _ in tw]
        ctx.w_dtypes = [w.dtype for w in weights]
        return y.reshape(*lead, w_t.shape[0])

    @staticmethod
    def backward(ctx, gy):
        x2, norm_w, r, x_q, s, w_t, g_col = ctx.saved_tensors
        g2 = gy.reshape(-1, gy.shape[-1])                              # [M, N]
        if not g2.is_contiguous():
            g2 = g2.contiguous()
        dt = g2.dtype
        need_x, need_nw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_w = ctx.needs_input_grad[4:]
        grad_x = grad_nw = None
        grads_w = [None] * len(need_w)
        if need_x or need_nw:
            wdt = ctx.w_dtypes[0]
            w_deq = bt.dequant_weight(w_t, g_col, wdt, dt)            # [N, D], transient
            gh = g2 @ w_deq                                            # [M, D]: grad of the normed y
            del w_deq
            if ctx.be == "triton":
                grad_x, grad_nw = _nq.rms_backward(x2, norm_w, r, gh)
            else:
                grad_x, grad_nw = _rms_backward_torch(x2, norm_w, r, gh)
            del gh
            grad_x = grad_x.reshape(*ctx.lead, x2.shape[-1])
            grad_nw = grad_nw.to(norm_w.dtype)
        if any(need_w):
            x_deq = bt.dequant_act(x_q, s.reshape(-1, 1), dt)          # [M, D], transient
            gw = g2.t() @ x_deq                                        # [N, D]
            del x_deq
            for i, part in enumerate(gw.split(ctx.splits)):
                if need_w[i]:
                    grads_w[i] = part.to(ctx.w_dtypes[i])
        return (grad_x, grad_nw, None, None, *grads_w)


def norm_bitlinear(x: torch.Tensor, norm, weights, backend: str = "auto") -> torch.Tensor:
    """``cat([BitLinear_i(norm(x))], -1)`` for an RMSNorm module ``norm`` and BitLinear weights."""
    return NormBitLinearFunction.apply(x, norm.weight, norm.eps, backend, *weights)


# ---------------------------------------------------------------- the block

class FusedBlock(Block):
    """:class:`model.Block` whose training forward runs :func:`norm_bitlinear` four times.

    With a KV cache (inference) it falls back to the reference forward of its modules.
    """

    fused_backend: str = "auto"

    def forward(self, x, cos, sin, mask, cache, pos, length, impl):
        if cache is not None:
            return super().forward(x, cos, sin, mask, cache, pos, length, impl)
        be = self.fused_backend
        a, f = self.self_attn, self.mlp
        B, T, _ = x.shape
        nq, nkv, hd = a.n_heads * a.head_dim, a.n_kv * a.head_dim, a.head_dim
        qkv = norm_bitlinear(x, self.input_layernorm, (a.q_proj.weight, a.k_proj.weight,
                                                       a.v_proj.weight), be)     # [B, T, nq+2nkv]
        q, k, v = qkv.split([nq, nkv, nkv], dim=-1)
        q = q.reshape(B, T, a.n_heads, hd).transpose(1, 2)                        # [B, H, T, hd]
        k = k.reshape(B, T, a.n_kv, hd).transpose(1, 2)                           # [B, Hkv, T, hd]
        v = v.reshape(B, T, a.n_kv, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = attend(q, k, v, mask, impl).transpose(1, 2).reshape(B, T, nq)        # the reference attention
        h = x + norm_bitlinear(o, a.attn_sub_norm, (a.o_proj.weight,), be)
        gu = norm_bitlinear(h, self.post_attention_layernorm, (f.gate_proj.weight, f.up_proj.weight), be)
        g, u = gu.split([f.gate_proj.out_features, f.up_proj.out_features], dim=-1)
        m = F.relu(g).square() * u
        return h + norm_bitlinear(m, f.ffn_sub_norm, (f.down_proj.weight,), be)
