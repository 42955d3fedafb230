"""Fused decode kernels (:mod:`bitnet158.kernels.triton.decode_layer`: GEMVs with a norm + quant
tail or prologue; ``_attn_fused``) and the fused decode steps of the Triton runner, against the
unfused kernels and the torch reference.

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` on small awkward shapes (odd row
counts, 1-3 segments, every prologue mode, the embedding gather, fp32 and bf16); with CUDA the
same tests run compiled, plus 2B4T shapes and whole decode steps (marked ``cuda``).

    python3 -m pytest -q tests/kernels/test_triton_decode_layer.py
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from bitnet158 import kernels, quant  # noqa: E402
from bitnet158.kernels.triton import common, decode_layer as dl, norm_quant as nq, w2a8  # noqa: E402
from bitnet158.kernels.triton.attention import DecodeAttention  # noqa: E402
from bitnet158.model import RMSNorm, apply_rope, rope_tables  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
if not CUDA and not common.INTERPRET:
    pytest.skip("Triton kernels were imported before TRITON_INTERPRET=1 was set", allow_module_level=True)


def _weights(segs, K, gen):
    parts, w_ts = [], []
    for r in segs:
        w_t = torch.randint(-1, 2, (4 * r, K), generator=gen, dtype=torch.int8)
        w_ts.append(w_t)
        parts.append(quant.pack_hf(w_t))
    g = torch.rand(len(segs), generator=gen) + 0.05
    return torch.cat(parts), g, w_ts


CASES = [  # (mode, M, segments, K, style, gather)
    (0, 1, (6,), 36, "wide", False),
    (0, 2, (5, 3), 68, "fat", True),          # embedding gather, 2 segments
    (1, 3, (10, 2, 4), 68, "fat", False),     # residual, 3 segments
    (1, 2, (7,), 40, "half", True),           # residual on a gathered row
    (2, 1, (5, 3), 40, "wide", False),        # relu^2 gate of a [g | u] row
    (2, 3, (9,), 100, "fat", False),
]


@pytest.mark.parametrize("mode,M,segs,K,style,gather,dtype",
                         [c + (torch.bfloat16,) for c in CASES] + [c + (torch.float32,) for c in CASES[2::3]])
def test_fused_linear_equals_norm_quant_then_w2a8(mode, M, segs, K, style, gather, dtype):
    gen = torch.Generator().manual_seed(mode * 100 + M * 10 + K)
    w, g, w_ts = _weights(segs, K, gen)
    width = 2 * K if mode == 2 else K
    table = (torch.randn(11, width, generator=gen) * 2).to(dtype)
    tok = torch.randint(0, 11, (M,), generator=gen)
    a = table[tok] if gather else table[:M]
    d = torch.randn(M, K, generator=gen).to(dtype)
    nw = (torch.rand(K, generator=gen) + 0.5).to(dtype)
    # unfused: norm_quant kernel, then the W2A8 GEMV (both tested against the reference)
    xa = a.clone().to(DEV)
    kw = dict(residual=d.to(DEV), h_out=xa) if mode == 1 else dict(gated=mode == 2)
    q, s = nq.norm_quant(xa, nw.to(DEV), 1e-5, **kw)
    ref = w2a8.w2a8_linear(q, s, w.to(DEV), g.to(DEV), segs, out_dtype=dtype)
    # integer products exact: the reference's int matmul on the same int8 row
    acc = torch.cat([quant.int_matmul(q.cpu(), w_t) for w_t in w_ts], 1)
    scale = torch.cat([g[i].expand(4 * r) for i, r in enumerate(segs)])
    exact = (acc.float() * (scale[None, :] / s.cpu()[:, None])).to(dtype)
    assert torch.equal(ref.cpu(), exact)
    h = torch.full((M, K), float("nan"), dtype=dtype, device=DEV)
    y = dl.fused_linear(table.to(DEV) if gather else a.to(DEV), nw.to(DEV), w.to(DEV), g.to(DEV), segs,
                        1e-5, mode=mode, d=d.to(DEV), h_out=h if mode == 1 else None,
                        tok=tok.to(DEV) if gather else None, style=style)
    assert torch.equal(y.cpu(), ref.cpu())
    if mode == 1:
        assert torch.equal(h.cpu(), xa.cpu())                  # h = x + d, stored once


def test_fused_linear_rejects_bad_shapes():
    w = torch.zeros(4, 40, dtype=torch.uint8, device=DEV)
    g = torch.ones(1, device=DEV)
    nw = torch.ones(40, device=DEV)
    with pytest.raises(ValueError, match="M=9"):
        dl.fused_linear(torch.zeros(9, 40, device=DEV), nw, w, g, (4,), 1e-5)
    with pytest.raises(ValueError, match="mode 2 needs 80"):
        dl.fused_linear(torch.zeros(1, 40, device=DEV), nw, w, g, (4,), 1e-5, mode=2)
    with pytest.raises(ValueError, match="residual"):
        dl.fused_linear(torch.zeros(1, 40, device=DEV), nw, w, g, (4,), 1e-5, mode=1)
    with pytest.raises(ValueError, match="segments"):
        dl.fused_linear(torch.zeros(1, 40, device=DEV), nw, w, g, (3,), 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("chunk,block_n", [(16, 16), (32, 16)])
def test_fused_attention(dtype, chunk, block_n):
    torch.manual_seed(2)
    H, HKV, D, B, S = 4, 2, 16, 3, 40
    cos_t, sin_t = rope_tables(D, S, 10000.0)
    qkv = torch.randn(B, (H + 2 * HKV) * D).to(dtype)
    kc = torch.randn(B, HKV, S, D).to(dtype)
    vc = torch.randn(B, HKV, S, D).to(dtype)
    pos = torch.tensor([0, 17, 39], dtype=torch.int32)
    rows = torch.tensor([2, 0, 1], dtype=torch.int32)           # rows map to other cache rows
    att = DecodeAttention(H, HKV, D, B, S, DEV, chunk=chunk, block_n=block_n)
    # the unfused kernels (partials + combine), norm weight 1, as the comparison
    k1, v1 = kc.clone().to(DEV), vc.clone().to(DEV)
    y_old = att(qkv.to(DEV), k1, v1, rows.to(DEV), pos.to(DEV), cos_t.to(DEV), sin_t.to(DEV),
                torch.ones(H * D, dtype=dtype, device=DEV), 1e-5, quant=False)
    k2, v2 = kc.clone().to(DEV), vc.clone().to(DEV)
    o = att.fused(qkv.to(DEV), k2, v2, rows.to(DEV), pos.to(DEV), cos_t.to(DEV), sin_t.to(DEV))
    assert torch.equal(k1, k2) and torch.equal(v1, v2)          # the same cache write
    assert int(att.gcnt.abs().sum()) == 0                       # counters left at zero
    norm = RMSNorm(H * D, 1e-5).to(dtype).to(DEV)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(norm(o).float(), y_old.float(), rtol=tol, atol=tol)
    # reference: apply_rope, softmax attention over slots 0..pos of the written cache
    for b in range(B):
        p, r = int(pos[b]), int(rows[b])
        cos, sin = cos_t[p].to(dtype)[None, None, None], sin_t[p].to(dtype)[None, None, None]
        q = apply_rope(qkv[b, :H * D].view(1, H, 1, D), cos, sin)
        K = k2[r:r + 1, :, :p + 1].cpu().repeat_interleave(H // HKV, 1)
        V = v2[r:r + 1, :, :p + 1].cpu().repeat_interleave(H // HKV, 1)
        ref = torch.nn.functional.scaled_dot_product_attention(q, K, V).reshape(H * D)
        torch.testing.assert_close(o[b].cpu().float(), ref.float(), rtol=tol, atol=tol)


TAIL_CASES = [  # (tail, M, segments, K)
    (0, 1, (6,), 36),
    (1, 3, (17,), 68),            # x += d, norm, quant
    (1, 2, (4, 4, 8), 64),        # 3 segments
    (2, 2, (5, 5), 40),           # relu^2 gate of [g | u]
    (2, 1, (9, 9), 100),
]


@pytest.mark.parametrize("tail,M,segs,K", TAIL_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_tail_equals_w2a8_then_norm_quant(tail, M, segs, K, dtype):
    gen = torch.Generator().manual_seed(tail * 100 + M * 10 + K)
    w, g, _ = _weights(segs, K, gen)
    R = sum(segs)
    x_q, s = quant.act_quant(torch.randn(M, K, generator=gen) * 3)
    x_q, s = x_q.to(DEV), s.to(DEV)
    ref = w2a8.w2a8_linear(x_q, s, w.to(DEV), g.to(DEV), segs, out_dtype=dtype)
    N = 4 * R if tail != 2 else 2 * R
    res = torch.randn(M, N, generator=gen).to(dtype).to(DEV)
    nw = (torch.rand(N, generator=gen) + 0.5).to(dtype).to(DEV)
    cnt = torch.zeros(1, dtype=torch.int32, device=DEV)
    r1 = res.clone()
    got = dl.linear_tail(x_q, s, w.to(DEV), g.to(DEV), segs, cnt, tail=tail, res=r1 if tail == 1 else None,
                         norm_w=nw, out_dtype=dtype)
    assert int(cnt) == 0                                       # left at zero for the next kernel
    if tail == 0:
        assert torch.equal(got, ref)
        return
    out, q, sq = got
    assert torch.equal(out, ref)
    r2 = res.clone()
    kw = dict(residual=ref, h_out=r2) if tail == 1 else dict(gated=True)
    rq, rs = nq.norm_quant(r2 if tail == 1 else ref, nw, 1e-5, **kw)
    if tail == 1:
        assert torch.equal(r1, r2)                             # x + d stored back to the residual
    diff = (q.cpu().int() - rq.cpu().int()).abs()              # the norm's fp32 sum order may differ
    assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= max(1, q.numel() // 200)
    if common.INTERPRET:
        assert torch.equal(q, rq) and torch.equal(sq, rs)
    else:
        torch.testing.assert_close(sq, rs, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_attention_sub_norm_quant(dtype):
    """With a norm weight the one-kernel attention also returns the normed, quantized row."""
    torch.manual_seed(4)
    H, HKV, D, B, S = 4, 2, 16, 3, 40
    cos_t, sin_t = (t.to(DEV) for t in rope_tables(D, S, 10000.0))
    qkv = torch.randn(B, (H + 2 * HKV) * D).to(dtype).to(DEV)
    kc = torch.randn(B, HKV, S, D).to(dtype).to(DEV)
    vc = torch.randn(B, HKV, S, D).to(dtype).to(DEV)
    pos = torch.tensor([0, 17, 39], dtype=torch.int32, device=DEV)
    rows = torch.arange(B, dtype=torch.int32, device=DEV)
    nw = (torch.rand(H * D) + 0.5).to(dtype).to(DEV)
    att = DecodeAttention(H, HKV, D, B, S, DEV, chunk=16, block_n=16)
    q_old, s_old = att(qkv, kc.clone(), vc.clone(), rows, pos, cos_t, sin_t, nw, 1e-5)
    o, q, s = att.fused(qkv, kc.clone(), vc.clone(), rows, pos, cos_t, sin_t, norm_weight=nw, eps=1e-5)
    assert int(att.cnt.abs().sum()) == 0 and int(att.gcnt.abs().sum()) == 0
    diff = (q.cpu().int() - q_old.cpu().int()).abs()
    assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= 2
    torch.testing.assert_close(s, s_old, rtol=1e-5, atol=0)
    if common.INTERPRET:
        assert torch.equal(q, q_old) and torch.equal(s, s_old)


@pytest.mark.parametrize("V,D", [(37, 48), (33, 64), (50, 40)])
def test_int8_head_kernels_agree(V, D):
    """The split-tile int8 head (the default) and the one-tile kernel: the same int8 model."""
    from bitnet158.kernels.triton.head import int8_head, quantize_head
    torch.manual_seed(V)
    w = torch.randn(V, D).bfloat16().to(DEV)
    x = torch.randn(3, D).bfloat16().to(DEV)
    w_q, sc = quantize_head(w)
    ref = x.float() @ (w_q.float() * sc[:, None]).t()
    for cfg in (None, (8, 4), (16, 8)):
        y = int8_head(x, w_q, sc, config=cfg) if cfg else int8_head(x, w_q, sc, config=())
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- runner

def _tiny(dtype, layers=1, device="cpu"):
    from bitnet158.config import ModelConfig
    from bitnet158.model import Transformer, init_weights
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", num_hidden_layers=layers)
    m = init_weights(Transformer(cfg), 0.05).pack().to(dtype)
    for name, p in m.named_parameters():
        if "norm" in name:
            p.data = (torch.rand_like(p.float()) + 0.5).to(dtype)
    return m.to(device).eval()


@pytest.fixture
def reference_kernels(monkeypatch):
    monkeypatch.setattr(kernels, "_BACKENDS", [])


def test_interpreted_tail_step_two_layers_matches_reference(reference_kernels):
    """The default 5-kernel step over 2 layers (the down projection's tail feeds layer 1)."""
    if CUDA:
        pytest.skip("the CUDA tests cover this")
    from bitnet158.engine.runner import TorchRunner
    from bitnet158.kernels.triton.runner import TritonRunner
    m = _tiny(torch.bfloat16, layers=2)
    ref = TorchRunner(m, batch=1, max_len=16)
    tr = TritonRunner(m, batch=1, max_len=16, graphs=False, step="tail")
    assert tr._step_kind(1) == "tail"
    toks = torch.randint(0, m.config.vocab_size, (1, 3))
    pos = torch.arange(3)[None]
    ref.prefill(toks, pos)
    tr.prefill(toks, pos)
    nt, p = torch.tensor([5]), torch.tensor([3])
    torch.testing.assert_close(tr.decode(nt, p), ref.decode(nt, p), rtol=1e-6, atol=1e-6)


def test_interpreted_unfused_step_with_masked_gemvs_matches_reference(reference_kernels):
    """``runner.gemv = "masked"``: the unfused step's GEMVs on the tail kernel (no tail)."""
    if CUDA:
        pytest.skip("the CUDA tests cover this")
    from bitnet158.engine.runner import TorchRunner
    from bitnet158.kernels.triton.runner import TritonRunner
    m = _tiny(torch.bfloat16)
    ref = TorchRunner(m, batch=1, max_len=16)
    tr = TritonRunner(m, batch=1, max_len=16, graphs=False)
    tr.gemv = "masked"
    toks = torch.randint(0, m.config.vocab_size, (1, 3))
    pos = torch.arange(3)[None]
    torch.testing.assert_close(tr.prefill(toks, pos), ref.prefill(toks, pos), rtol=1e-6, atol=1e-6)
    nt, p = torch.tensor([5]), torch.tensor([3])
    torch.testing.assert_close(tr.decode(nt, p), ref.decode(nt, p), rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("style", ["fat", "wide"])
@pytest.mark.parametrize("mode,segs,K", [(1, (640, 160, 160), 2560), (0, (640,), 2560),
                                         (1, (1728, 1728), 2560), (2, (640,), 6912)])
def test_fused_linear_2b4t_shapes(style, mode, segs, K):
    gen = torch.Generator().manual_seed(K + len(segs))
    w, g, _ = _weights(segs, K, gen)
    for M in ((1, 3) if style == "fat" else (1,)):
        a = torch.randn(M, 2 * K if mode == 2 else K, generator=gen).bfloat16().cuda()
        d = torch.randn(M, K, generator=gen).bfloat16().cuda()
        nw = (torch.rand(K, generator=gen) + 0.5).bfloat16().cuda()
        xa = a.clone()
        kw = dict(residual=d, h_out=xa) if mode == 1 else dict(gated=mode == 2)
        q, s = nq.norm_quant(xa, nw, 1e-5, **kw)
        ref = w2a8.w2a8_linear(q, s, w.cuda(), g.cuda(), segs)
        y = dl.fused_linear(a, nw, w.cuda(), g.cuda(), segs, 1e-5, mode=mode, d=d, style=style)
        # the norm's fp32 sum may be reduced in another order than norm_quant's: rare int8 flips
        diff = (y.float() - ref.float()).abs() > 1e-2 * ref.float().abs().max()
        assert int(diff.sum()) <= y.numel() // 100, f"M={M}: {int(diff.sum())} outputs differ"


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("tail,segs,K", [(0, (640, 160, 160), 2560), (1, (640,), 2560), (2, (1728, 1728), 2560),
                                         (1, (640,), 6912)])
def test_linear_tail_2b4t_shapes(tail, segs, K):
    for M in (1, 3):
        test_linear_tail_equals_w2a8_then_norm_quant(tail, M, segs, K, torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("batch", [1, 3])
def test_cuda_fused_greedy_tokens_identical(batch, reference_kernels):
    from bitnet158.engine.runner import TorchRunner
    from bitnet158.kernels.triton.runner import TritonRunner
    m = _tiny(torch.float32, layers=2, device="cuda")
    prompt = torch.randint(0, m.config.vocab_size, (batch, 9), device="cuda")

    def greedy(r):
        pos = torch.arange(9, device="cuda")[None].expand(batch, 9)
        logits, out = r.prefill(prompt, pos), []
        for i in range(40):
            out.append(logits.argmax(-1))
            logits = r.decode(out[-1], torch.full((batch,), 9 + i, device="cuda"))
        return torch.stack(out, 1), logits

    ref_toks, ref_last = greedy(TorchRunner(m, batch=batch, max_len=128))
    for step, style in (("tail", None), ("prologue", "wide"), ("unfused", None), ("masked", None)):
        r = TritonRunner(m, batch=batch, max_len=128, step="unfused" if step == "masked" else step)
        if step == "masked":
            r.gemv, step = "masked", "unfused"
        r.fused_max_rows = 8                                 # also the batched fused steps
        r.fused_style = style or r.fused_style
        assert r._step_kind(batch) == step
        toks, last = greedy(r)
        assert torch.equal(toks, ref_toks), (step, style)
        torch.testing.assert_close(last, ref_last, rtol=1e-4, atol=1e-4)
