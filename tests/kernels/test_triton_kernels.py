"""Triton kernels against the torch reference (:mod:`bitnet158.quant`, :mod:`bitnet158.model`).

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` (set here before they are imported) on
small awkward shapes; with CUDA the same tests run compiled, plus 2B4T shapes (marked ``cuda``).
Integer results are compared exactly; scaled outputs bit-for-bit where the reference's fp32 ops are
reproduced. Skipped cleanly when Triton is not installed.

    python3 -m pytest -q tests/kernels/test_triton_kernels.py
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from bitnet158 import quant  # noqa: E402
from bitnet158.model import RMSNorm  # noqa: E402
from bitnet158.kernels.triton import common, gemm_i8, norm_quant as nq, w2a8  # noqa: E402
from bitnet158.kernels.triton.attention import DecodeAttention, rope_cache_write  # noqa: E402
from w2a8_cases import segmented as _segmented  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and not common.INTERPRET:
    pytest.skip("Triton kernels were imported before TRITON_INTERPRET=1 was set", allow_module_level=True)


def _reference(x_q, s, w_ts, gammas, dtype):
    accs = [quant.int_matmul(x_q, w_t) for w_t in w_ts]
    ys = [(a.float() * (g.float() / s)).to(dtype) for a, g in zip(accs, gammas)]
    return torch.cat(accs, 1), torch.cat(ys, 1)


CASES = [  # (M, segments (packed rows each), K, config or None); split-K cases stay small
    (1, (6,), 36, None),
    (3, (10, 2, 4), 68, None),
    (2, (5, 3), 68, dict(kind="gemv", BR=4, BK4=4, MB=1, num_warps=4)),     # K in 5 tiles
    (5, (16,), 132, dict(kind="gemv", BR=8, BK4=16, MB=2, num_warps=4)),    # 2 rows a program
    (2, (5, 3, 2), 68, dict(kind="gemv", BR=4, BK4=4, MB=1, num_warps=4, JOINT=True)),  # one reduction, 5 K tiles
    (3, (6,), 36, dict(kind="gemv", BR=2, BK4=16, MB=3, num_warps=4, JOINT=True)),      # rows masked, 3 a program
    (1, (7, 2), 68, dict(kind="gemv", BR=1, BK4=4, MB=1, num_warps=8, JOINT=True)),     # one row a program
    (6, (4, 4), 100, dict(kind="dot", BM=16, BR=16, BK=32, SPLIT_K=3, num_warps=4, num_stages=2)),
    (20, (4, 2), 64, None),                                                  # dot, split-K
    (37, (3, 5, 9), 96, None),
]


@pytest.mark.parametrize("M,segs,K,cfg", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_w2a8_linear_exact(M, segs, K, cfg, dtype):
    gen = torch.Generator().manual_seed(M * 1000 + K)
    w, g, w_ts = _segmented(segs, K, gen)
    x = torch.randn(M, K, generator=gen) * 3
    x_q, s = quant.act_quant(x)
    acc, ref = _reference(x_q, s, w_ts, g, dtype)
    # integer check: unit scales give the int32 sums exactly (|acc| < 2^24 is exact in fp32)
    ones = torch.ones(M, 1)
    y_int = w2a8.w2a8_linear(x_q.to(DEV), ones.to(DEV), w.to(DEV), torch.ones_like(g).to(DEV), segs,
                             out_dtype=torch.float32, config=cfg)
    assert torch.equal(y_int.cpu().to(torch.int32), acc)
    y = w2a8.w2a8_linear(x_q.to(DEV), s.to(DEV), w.to(DEV), g.to(DEV), segs, out_dtype=dtype, config=cfg)
    assert torch.equal(y.cpu(), ref)
    ws = w2a8.workspace(DEV)                      # split-K leaves its workspace clean for replays
    assert int(ws.ws.abs().sum()) == 0 and int(ws.cnt.abs().sum()) == 0


def test_w2a8_linear_fp32_output():
    test_w2a8_linear_exact(2, (3, 1), 40, None, torch.float32)


def test_w2a8_rejects_bad_shapes():
    w = torch.zeros(4, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="in_features"):
        w2a8.w2a8_linear(torch.zeros(1, 12, dtype=torch.int8), torch.ones(1), w, torch.ones(1), (4,))
    with pytest.raises(ValueError, match="segments"):
        w2a8.w2a8_linear(torch.zeros(1, 8, dtype=torch.int8), torch.ones(1), w, torch.ones(2), (3, 2))


@pytest.mark.parametrize("M,D", [(1, 7), (5, 100), (3, 257)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_act_quant_exact(M, D, dtype):
    x = (torch.randn(M, D) * 4).to(dtype)
    x[0, 0] = 0.5                                       # ties land on .5 after scaling sometimes
    q, s = nq.act_quant(x.to(DEV))
    rq, rs = quant.act_quant(x)
    assert torch.equal(q.cpu(), rq) and torch.equal(s.cpu(), rs.view(-1))


def test_act_quant_ties_round_half_even():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5]])   # s = 1: y * s are exact ties
    q, _ = nq.act_quant(x.to(DEV))
    assert q.cpu().tolist() == [[127, 0, 2, 2, 0, -2, 4]]


@pytest.mark.parametrize("mode", ["plain", "residual", "gated"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_norm_quant_matches_reference(mode, dtype):
    torch.manual_seed(1)
    M, D = 4, 96
    norm = RMSNorm(D, 1e-5).to(dtype)
    norm.weight.data = (torch.rand(D) + 0.5).to(dtype)
    x = (torch.randn(M, 2 * D if mode == "gated" else D) * 2).to(dtype)
    d = (torch.randn(M, D)).to(dtype)
    if mode == "gated":
        h = torch.relu(x[:, :D]).square() * x[:, D:]
    elif mode == "residual":
        h = x + d
    else:
        h = x
    ref_y = norm(h)
    rq, rs = quant.act_quant(ref_y)
    xd = x.clone().to(DEV)
    kw = dict(residual=d.to(DEV), h_out=xd) if mode == "residual" else dict(gated=mode == "gated")
    q, s = nq.norm_quant(xd, norm.weight.to(DEV), 1e-5, **kw)
    if mode == "residual":
        assert torch.equal(xd.cpu(), h)
    # 1/sqrt vs rsqrt and the order of the fp32 sum may move a value by one ulp: allow rare +-1
    diff = (q.cpu().int() - rq.int()).abs()
    assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= max(2, q.numel() // 200)
    torch.testing.assert_close(s.cpu(), rs.view(-1), rtol=1e-6, atol=0)
    y = nq.norm_quant(x.clone().to(DEV), norm.weight.to(DEV), 1e-5, quant=False,
                      **({"residual": d.to(DEV)} if mode == "residual" else {"gated": mode == "gated"}))
    torch.testing.assert_close(y.cpu().float(), ref_y.float(), rtol=1e-2, atol=1e-2)


def _attn_reference(qkv, kc, vc, pos, cos_t, sin_t, H, HKV, D, norm):
    """Reference: model.apply_rope, cache write, softmax attention over 0..pos, attn_sub_norm."""
    from bitnet158.model import apply_rope
    B = qkv.shape[0]
    dt = qkv.dtype
    out = []
    for b in range(B):
        p = int(pos[b])
        cos = cos_t[p].to(dt)[None, None, None]
        sin = sin_t[p].to(dt)[None, None, None]
        q = apply_rope(qkv[b, :H * D].view(1, H, 1, D), cos, sin)
        k = apply_rope(qkv[b, H * D:(H + HKV) * D].view(1, HKV, 1, D), cos, sin)
        v = qkv[b, (H + HKV) * D:].view(1, HKV, 1, D)
        kc[b, :, p] = k[0, :, 0]
        vc[b, :, p] = v[0, :, 0]
        K = kc[b:b + 1, :, :p + 1].repeat_interleave(H // HKV, 1)
        V = vc[b:b + 1, :, :p + 1].repeat_interleave(H // HKV, 1)
        o = torch.nn.functional.scaled_dot_product_attention(q, K, V)
        out.append(norm(o.reshape(1, H * D)))
    return torch.cat(out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("chunk", [16, 32])           # 32: two tiles a chunk (a run-time loop compiled)
@pytest.mark.parametrize("prefetch", [True, False])   # first tile loaded before the wait, or not
@pytest.mark.parametrize("merge_block", [0, 1])       # 1: the merge loops over the live chunks
def test_decode_attention(dtype, chunk, prefetch, merge_block):
    from bitnet158.model import rope_tables
    torch.manual_seed(2)
    H, HKV, D, B, S = 4, 2, 16, 3, 40
    cos_t, sin_t = rope_tables(D, S, 10000.0)
    qkv = torch.randn(B, (H + 2 * HKV) * D).to(dtype)
    kc = torch.randn(B, HKV, S, D).to(dtype)
    vc = torch.randn(B, HKV, S, D).to(dtype)
    pos = torch.tensor([0, 17, 39], dtype=torch.int32)
    norm = RMSNorm(H * D, 1e-5).to(dtype)
    norm.weight.data = (torch.rand(H * D) + 0.5).to(dtype)
    ref = _attn_reference(qkv, kc.clone(), vc.clone(), pos, cos_t, sin_t, H, HKV, D, norm)
    att = DecodeAttention(H, HKV, D, B, S, DEV, chunk=chunk, block_n=16, prefetch=prefetch,
                          merge_block=merge_block)
    assert att.merge_block == merge_block
    kd, vd = kc.clone().to(DEV), vc.clone().to(DEV)
    rows = torch.arange(B, dtype=torch.int32, device=DEV)
    y = att(qkv.to(DEV), kd, vd, rows, pos.to(DEV), cos_t.to(DEV), sin_t.to(DEV), norm.weight.to(DEV),
            1e-5, quant=False)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(y.cpu().float(), ref.float(), rtol=tol, atol=tol)
    kr, vr = kc.clone(), vc.clone()
    _attn_reference(qkv, kr, vr, pos, cos_t, sin_t, H, HKV, D, norm)
    assert torch.equal(vd.cpu(), vr)
    # RoPE'd keys: bit-exact in bf16 (common.rnd_add keeps the rounding between the products and
    # the add, which the compiler otherwise fused into an fma); fp32 compiled may fma (one ulp)
    torch.testing.assert_close(kd.cpu(), kr, rtol=1e-6, atol=1e-6)
    if common.INTERPRET or dtype == torch.bfloat16:
        assert torch.equal(kd.cpu(), kr)
    assert int(att.cnt.abs().sum()) == 0                                # row counters left at zero
    q, s = att(qkv.to(DEV), kd, vd, rows, pos.to(DEV), cos_t.to(DEV), sin_t.to(DEV),
               norm.weight.to(DEV), 1e-5)
    rq, _ = quant.act_quant(ref)
    assert int((q.cpu().int() - rq.int()).abs().max()) <= 2


@pytest.mark.parametrize("merge_block", [0, 2])
def test_decode_attention_span(merge_block):
    """A call told that every position lies below ``span`` launches and merges only the chunks up
    to it (2 of the cache's 5 here) and gives the whole-cache call's result; one span past the
    cache is the whole cache. The same for the one-kernel attention."""
    from bitnet158.model import rope_tables
    torch.manual_seed(3)
    H, HKV, D, B, S = 4, 2, 16, 2, 80
    cos_t, sin_t = rope_tables(D, S, 10000.0)
    qkv = torch.randn(B, (H + 2 * HKV) * D)
    kc, vc = torch.randn(B, HKV, S, D), torch.randn(B, HKV, S, D)
    pos = torch.tensor([3, 20], dtype=torch.int32)
    norm = RMSNorm(H * D, 1e-5)
    norm.weight.data = torch.rand(H * D) + 0.5
    ref = _attn_reference(qkv, kc.clone(), vc.clone(), pos, cos_t, sin_t, H, HKV, D, norm)
    att = DecodeAttention(H, HKV, D, B, S, DEV, chunk=16, block_n=16, merge_block=merge_block)
    assert (att.nch, att.chunks(21), att.chunks(32), att.chunks(33), att.chunks(1000), att.chunks(None)) == \
        (5, 2, 2, 3, 5, 5)
    rows = torch.arange(B, dtype=torch.int32, device=DEV)
    args = (rows, pos.to(DEV), cos_t.to(DEV), sin_t.to(DEV), norm.weight.to(DEV), 1e-5)
    outs = []
    for span in (21, None):
        kd, vd = kc.clone().to(DEV), vc.clone().to(DEV)
        att.po.fill_(float("nan"))                           # chunks past the span are never read
        outs.append(att(qkv.to(DEV), kd, vd, *args, quant=False, span=span).cpu())
        torch.testing.assert_close(outs[-1], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    fused = []                                               # the one-kernel attention, the same way
    for span in (21, None):
        kd, vd = kc.clone().to(DEV), vc.clone().to(DEV)
        fused.append(att.fused(qkv.to(DEV), kd, vd, *args[:4], span=span, norm_weight=args[4], eps=1e-5)[0].cpu())
    torch.testing.assert_close(fused[0], fused[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefill_rope_cache_write(dtype):
    """RoPE of q and k and the cache write of a prefill against model.apply_rope + index_put: two
    rows (cache rows 2 and 0) of 5 tokens, one from position 0 and one continuing at 3."""
    from bitnet158.model import apply_rope, rope_tables
    torch.manual_seed(3)
    H, HKV, D, B, T, S = 6, 3, 16, 2, 5, 12
    cos_t, sin_t = rope_tables(D, S, 10000.0)
    qkv = torch.randn(B * T, (H + 2 * HKV) * D).to(dtype)
    rows = torch.tensor([2, 0])
    pos = torch.stack([torch.arange(T), torch.arange(3, 3 + T)])                      # [B, T]
    kc, vc = torch.randn(3, HKV, S, D).to(dtype), torch.randn(3, HKV, S, D).to(dtype)
    x = qkv.view(B, T, -1)
    cos, sin = cos_t[pos].to(dtype)[:, None], sin_t[pos].to(dtype)[:, None]              # [B, 1, T, D]
    rq = apply_rope(x[..., :H * D].view(B, T, H, D).transpose(1, 2), cos, sin)
    rk = apply_rope(x[..., H * D:(H + HKV) * D].view(B, T, HKV, D).transpose(1, 2), cos, sin)
    rkc, rvc = kc.clone(), vc.clone()
    rkc[rows[:, None], :, pos] = rk.transpose(1, 2)
    rvc[rows[:, None], :, pos] = x[..., (H + HKV) * D:].view(B, T, HKV, D)
    kd, vd = kc.to(DEV), vc.to(DEV)
    q, k = rope_cache_write(qkv.to(DEV), kd, vd, rows.to(DEV, torch.int32), pos.reshape(-1).to(DEV, torch.int32),
                            cos_t.to(DEV), sin_t.to(DEV), H, HKV, D)
    q = q.cpu().view(B, T, H, D).transpose(1, 2)
    k = k.cpu().view(B, T, HKV, D).transpose(1, 2)
    assert torch.equal(vd.cpu(), rvc)
    if common.INTERPRET or dtype == torch.bfloat16:
        assert torch.equal(q, rq) and torch.equal(k, rk) and torch.equal(kd.cpu(), rkc)
    else:   # compiled fp32: x*cos + rot(x)*sin may contract to an fma (one fp32 ulp)
        for a, b in ((q, rq), (k, rk), (kd.cpu(), rkc)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("M", [1, 3, 8, 9, 64, 300, 2048])
@pytest.mark.parametrize("segs,K", [((640, 160, 160), 2560), ((640,), 2560), ((1728, 1728), 2560),
                                    ((640,), 6912)])
def test_w2a8_2b4t_shapes_exact(M, segs, K):
    gen = torch.Generator().manual_seed(M + K)
    w, g, w_ts = _segmented(segs, K, gen)
    x_q = torch.randint(-128, 128, (M, K), generator=gen, dtype=torch.int8)
    s = torch.rand(M, 1, generator=gen) * 50 + 1
    acc, ref = _reference(x_q, s, w_ts, g, torch.bfloat16)
    y_int = w2a8.w2a8_linear(x_q.cuda(), torch.ones(M).cuda(), w.cuda(), torch.ones_like(g).cuda(), segs,
                             out_dtype=torch.float32)
    assert torch.equal(y_int.cpu().to(torch.int32), acc)
    y = w2a8.w2a8_linear(x_q.cuda(), s.cuda(), w.cuda(), g.cuda(), segs, out_dtype=torch.bfloat16)
    assert torch.equal(y.cpu(), ref)
    if M <= w2a8.GEMV_MAX_M:   # the GEMV with its four fields in one reduction
        y = w2a8.w2a8_linear(x_q.cuda(), s.cuda(), w.cuda(), g.cuda(), segs, out_dtype=torch.bfloat16,
                             config=dict(w2a8.pick_config(M, sum(segs), K), JOINT=True))
        assert torch.equal(y.cpu(), ref)
    if M <= 8:  # the GEMV at 1 and 2 activation rows a program (programs over the rows)
        for mb in (1, 2):
            y = w2a8.w2a8_linear(x_q.cuda(), s.cuda(), w.cuda(), g.cuda(), segs, out_dtype=torch.bfloat16,
                                 config=dict(w2a8.pick_config(1, sum(segs), K), MB=mb))
            assert torch.equal(y.cpu(), ref), mb
    if M > 8:   # the Triton tensor-core kernel too, whatever the default picks at this M
        cfg = w2a8.pick_config(min(M, 64), sum(segs), K) if M <= 64 else dict(
            kind="dot", BM=128, BR=64, BK=128, SPLIT_K=1, num_warps=8, num_stages=3)
        y = w2a8.w2a8_linear(x_q.cuda(), s.cuda(), w.cuda(), g.cuda(), segs, out_dtype=torch.bfloat16,
                             config=cfg)
        assert torch.equal(y.cpu(), ref)


def test_unpack_and_scale_kernels_exact():
    """The pieces of the large-M path (int8 unpack in output order, per-segment scaling)."""
    gen = torch.Generator().manual_seed(5)
    segs, K, M = (3, 2, 1), 40, 7
    w, g, w_ts = _segmented(segs, K, gen)
    R = sum(segs)
    w8 = gemm_i8.unpack_i8(w.to(DEV), 3, 5)
    assert torch.equal(w8.cpu(), torch.cat(w_ts))
    x_q, s = quant.act_quant(torch.randn(M, K, generator=gen))
    acc, ref = _reference(x_q, s, w_ts, g, torch.bfloat16)
    out = torch.empty(M, 4 * R, dtype=torch.bfloat16, device=DEV)
    w2a8._scale_rows[(1, 1)](acc.to(DEV), s.reshape(-1).to(DEV), g.to(DEV), out, M, 4 * R, 12, 20,
                             out.stride(0), BM=8, BN=32, INTERP=common.INTERPRET)
    assert torch.equal(out.cpu(), ref)


def test_int8_head():
    from bitnet158.kernels.triton.head import int8_head, quantize_head
    torch.manual_seed(3)
    w = torch.randn(37, 48).bfloat16()
    x = torch.randn(3, 48).bfloat16()
    w_q, s = quantize_head(w.to(DEV))
    y = int8_head(x.to(DEV), w_q, s).cpu()
    ref_q = x.float() @ (w_q.cpu().float() * s.cpu()[:, None]).t()      # the int8 model exactly
    torch.testing.assert_close(y, ref_q, rtol=1e-5, atol=1e-4)
    ref = x.float() @ w.float().t()                                      # the bf16 head, approximately
    assert float((y - ref).norm() / ref.norm()) < 1e-2


def test_merge_warps():
    """Per-call warps of the decode attention's chunk merge: 8 for few programs, 1 for many up to
    32 chunks, more as the tile grows."""
    from bitnet158.kernels.triton.attention import merge_warps
    assert merge_warps(20, 64) == 8
    assert merge_warps(64 * 20, 32) == 1
    assert merge_warps(64 * 20, 64) == 2
    assert merge_warps(64 * 20, 16) == 1
