"""The fused training block (RMSNorm + int8 quant + grouped BitLinear GEMM) against the reference.

Both backends (``triton`` under ``TRITON_INTERPRET=1`` on CPU, ``torch``) of
:mod:`bitnet158.kernels.norm_bitlinear` are compared with ``model.RMSNorm`` followed by
``layers.BitLinear`` modules: integers exactly, the forward within fp32 rounding, every gradient
(input, norm weight, projection weights) within 1e-5 relative in fp32, on awkward shapes. Also: the
kernels one by one, the model swap (``FusedBlock``), the per-version weight cache, and
``torch.compile`` (aot_eager: the autograd functions trace without graph breaks).

    python3 -m pytest -q tests/kernels/test_norm_bitlinear.py
"""

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bitnet158 import quant  # noqa: E402
from bitnet158.config import ModelConfig  # noqa: E402
from bitnet158.kernels import bitlinear_train as bt  # noqa: E402
from bitnet158.kernels import norm_bitlinear as nb  # noqa: E402
from bitnet158.layers import BitLinear  # noqa: E402
from bitnet158.model import RMSNorm, Transformer, init_weights  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
HAVE_TRITON = bt._tk is not None and nb._nq is not None and bt.triton_usable(torch.empty(0, device=DEV))
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="Triton not installed (or imported "
                                  "before TRITON_INTERPRET=1 was set)")
BACKENDS = [pytest.param("triton", marks=needs_triton), "torch"]


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def _group(D, Ns, seed, x_dtype=torch.float32):
    """A reference (RMSNorm, [BitLinear]) group and copies of its parameters."""
    gen = torch.Generator().manual_seed(seed)
    norm = RMSNorm(D, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(D, generator=gen) + 0.5)
    lins = []
    for n in Ns:
        lin = BitLinear(D, n)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n, D, generator=gen) * 0.05)
        lins.append(lin.to(DEV))
    return norm.to(DEV), lins, gen


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,D,Ns", [(1, 37, (4,)), (3, 70, (20, 8, 8)), (17, 45, (36, 36)),
                                    (5, 129, (12,)), (17, 16, (4, 20, 12))])
def test_group_forward_and_grads_match_reference(backend, M, D, Ns):
    norm, lins, gen = _group(D, Ns, seed=M * 7 + D)
    x = (torch.randn(2, M, D, generator=gen) * 3).to(DEV)
    x1 = x.clone().requires_grad_()
    y_ref = torch.cat([lin(norm(x1)) for lin in lins], -1)
    gy = torch.randn(y_ref.shape, generator=gen).to(DEV)
    (y_ref * gy).sum().backward()
    nw = norm.weight.detach().clone().requires_grad_()
    ws = [lin.weight.detach().clone().requires_grad_() for lin in lins]
    x2 = x.clone().requires_grad_()
    y = nb.NormBitLinearFunction.apply(x2, nw, 1e-5, backend, *ws)
    assert y.shape == y_ref.shape
    assert _rel(y, y_ref) <= 1e-5
    (y * gy).sum().backward()
    assert _rel(x2.grad, x1.grad) <= 1e-5
    assert _rel(nw.grad, norm.weight.grad) <= 1e-5
    for w, lin in zip(ws, lins):
        assert _rel(w.grad, lin.weight.grad) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_bf16_input_close(backend):
    """bf16 activations (the sub-norms' inputs under autocast): the h.to(bf16) rounding is kept."""
    norm, lins, gen = _group(64, (32, 16), seed=3)
    x = (torch.randn(9, 64, generator=gen) * 2).to(DEV).to(torch.bfloat16)
    y_ref = torch.cat([lin(norm(x)) for lin in lins], -1)
    y = nb.norm_bitlinear(x, norm, [lin.weight for lin in lins], backend)
    assert _rel(y.float(), y_ref.float()) <= 1e-5


@needs_triton
@pytest.mark.parametrize("D,dtype", [(37, torch.float32), (70, torch.bfloat16), (256, torch.float32)])
def test_rms_quant_kernel_matches_torch(D, dtype):
    from bitnet158.kernels.triton import norm_quant_train as nq
    gen = torch.Generator().manual_seed(D)
    x = (torch.randn(33, D, generator=gen) * 4).to(dtype).to(DEV)
    w = (torch.rand(D, generator=gen) + 0.5).to(DEV)
    q, s, r = nq.rms_quant(x, w, 1e-5)
    q0, s0, r0 = nb._rms_quant_torch(x, w, 1e-5)
    # rstd may differ in its last bit from torch's rsqrt; the integers then move by at most one step
    assert (q.int() - q0.int()).abs().max() <= 1
    assert (q != q0).float().mean() <= 0.01
    assert _rel(s, s0) <= 1e-6 and _rel(r, r0) <= 1e-6
    # given the exact normed row, the quantization itself is exact
    y = w * (x.float() * r[:, None]).to(dtype)
    qq, ss = quant.act_quant(y)
    assert torch.equal(qq, q) and torch.equal(ss.reshape(-1), s)


@needs_triton
def test_rms_backward_kernel_matches_torch():
    from bitnet158.kernels.triton import norm_quant_train as nq
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(21, 45, generator=gen) * 2).to(DEV)
    w = (torch.rand(45, generator=gen) + 0.5).to(DEV)
    r = torch.rsqrt(x.pow(2).mean(-1) + 1e-5)
    gy = torch.randn(21, 45, generator=gen).to(DEV)
    gx, gw = nq.rms_backward(x, w, r, gy, rows=4)                  # 6 programs, the last one partial
    gx0, gw0 = nb._rms_backward_torch(x, w, r, gy)
    assert _rel(gx, gx0) <= 1e-6 and _rel(gw, gw0) <= 1e-6


@needs_triton
def test_grouped_gemm_per_column_gamma_exact():
    gen = torch.Generator().manual_seed(5)
    M, N, K = 19, 40, 83
    x_q = torch.randint(-128, 128, (M, K), generator=gen, dtype=torch.int8)
    w_t = torch.randint(-1, 2, (N, K), generator=gen, dtype=torch.int8)
    s = torch.rand(M, generator=gen) * 50 + 1
    g = torch.rand(N, generator=gen) + 0.01
    y = bt._tk.int8_linear(x_q.to(DEV), s.to(DEV), w_t.to(DEV), g.to(DEV), block=(16, 16, 32))
    assert torch.equal(y.cpu(), quant.int_matmul(x_q, w_t).float() * (g / s[:, None]))


@needs_triton
@pytest.mark.parametrize("shape", [(4, 37), (36, 129), (300, 70)])
def test_ternarize_kernel(shape):
    w = (torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1])) * 0.03).to(DEV)
    q, g = bt._tk.ternarize(w, block=256)
    q0, g0 = quant.ternarize(w)
    assert torch.equal(q, q0)
    assert abs(float(g) - float(g0)) <= 1e-6 * float(g0)


@needs_triton
def test_dequant_rows_exact():
    gen = torch.Generator().manual_seed(2)
    x_q = torch.randint(-128, 128, (7, 45), generator=gen, dtype=torch.int8)
    s = torch.rand(7, 1, generator=gen) * 100 + 1
    got = bt._tk.dequant_rows(x_q.to(DEV), s.to(DEV), torch.bfloat16)
    assert torch.equal(got.cpu(), (x_q.float() / s).to(torch.bfloat16))


def _tiny_pair(seed=0):
    cfg = ModelConfig.from_name("tiny", dtype="float32")
    torch.manual_seed(seed)
    ref = init_weights(Transformer(cfg)).to(DEV)
    fused = init_weights(Transformer(cfg)).to(DEV)
    fused.load_state_dict(ref.state_dict())
    return cfg, ref, fused


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_block_model_matches_reference(backend):
    from bitnet158.kernels.norm_bitlinear import FusedBlock
    cfg, ref, fused = _tiny_pair()
    assert bt.use_fused_bitlinear(fused, backend=backend) == 14
    assert all(type(layer) is FusedBlock for layer in fused.model.layers)
    x = torch.randint(0, cfg.vocab_size, (2, 13), device=DEV)
    y = torch.randint(0, cfg.vocab_size, (2, 13), device=DEV)
    lr, lf = ref(x), fused(x)
    assert _rel(lf, lr) <= 1e-5
    F.cross_entropy(lr.reshape(-1, cfg.vocab_size), y.reshape(-1)).backward()
    F.cross_entropy(lf.reshape(-1, cfg.vocab_size), y.reshape(-1)).backward()
    for (n, p), (_, q) in zip(fused.named_parameters(), ref.named_parameters()):
        assert _rel(p.grad, q.grad) <= 1e-5, n
    # with a KV cache (generation) the block falls back to the reference modules
    cache = fused.new_cache(1, 16)
    out = fused(x[:1, :5], cache=cache)
    assert _rel(out, ref(x[:1, :5])) <= 1e-5
    bt.use_reference_bitlinear(fused)
    assert not any(type(layer) is FusedBlock for layer in fused.model.layers)


def test_weight_cache_once_per_version():
    lin = bt.FusedBitLinear(32, 8)
    w_t1, g1 = bt.ternary_weight(lin.weight, "torch")
    w_t2, _ = bt.ternary_weight(lin.weight, "torch")
    assert w_t1 is w_t2                                  # alive (held here): reused
    with torch.no_grad():
        lin.weight.mul_(2.0)                             # an in-place update bumps the version
    w_t3, g3 = bt.ternary_weight(lin.weight, "torch")
    assert w_t3 is not w_t1 and torch.allclose(g3, 2 * g1)
    del w_t1, w_t2, w_t3
    assert lin.weight._bitnet158_ternary[1]() is None   # nothing is held once unused


def test_weight_cache_held_until_the_weight_changes(monkeypatch):
    monkeypatch.setattr(bt, "HOLD_TERNARY", True)
    lin = bt.FusedBitLinear(32, 8)
    first = id(bt.ternary_weight(lin.weight, "torch")[0])
    assert id(bt.ternary_weight(lin.weight, "torch")[0]) == first     # held although unused between
    with torch.no_grad():
        lin.weight.add_(0.5)
    w_t, gamma = bt.ternary_weight(lin.weight, "torch")
    want, g0 = quant.ternarize(lin.weight)
    assert torch.equal(w_t, want) and torch.equal(gamma, g0)


def test_torch_compile_traces_without_graph_breaks():
    from torch._dynamo.utils import counters
    cfg, ref, fused = _tiny_pair(seed=1)
    bt.use_fused_bitlinear(fused, backend="torch")
    x = torch.randint(0, cfg.vocab_size, (2, 9), device=DEV)
    want = fused(x)
    want.sum().backward()
    gw = {n: p.grad.clone() for n, p in fused.named_parameters()}
    fused.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    counters.clear()
    got = torch.compile(fused, backend="aot_eager", fullgraph=True)(x)
    got.sum().backward()
    assert _rel(got, want) <= 1e-5
    for n, p in fused.named_parameters():
        assert _rel(p.grad, gw[n]) <= 1e-5, n
    torch._dynamo.reset()
