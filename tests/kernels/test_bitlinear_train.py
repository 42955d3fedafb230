"""The fused training BitLinear against the reference :class:`bitnet158.layers.BitLinear`.

Both backends of :mod:`bitnet158.kernels.bitlinear_train` are checked: ``triton`` (the act-quant
kernel + int8 ``tl.dot`` GEMM; on CPU under ``TRITON_INTERPRET=1``, set here before Triton is
imported) and ``torch`` (no Triton). Integers are compared exactly, the scaled forward bit-for-bit
with ``quant.bitlinear_ref`` and within fp32 tolerance of BitLinear's fake-quant forward, the
gradients w.r.t. input and weight within 1e-5 relative of BitLinear's autograd (fp32), on awkward
shapes (K not a multiple of 16/32, M = 1, 3, 17, N = 4, 20, 36).

    python3 -m pytest -q tests/kernels/test_bitlinear_train.py
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bitnet158 import quant  # noqa: E402
from bitnet158.config import ModelConfig  # noqa: E402
from bitnet158.kernels import bitlinear_train as bt  # noqa: E402
from bitnet158.layers import BitLinear  # noqa: E402
from bitnet158.model import Transformer, init_weights  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
HAVE_TRITON = bt._tk is not None and bt.triton_usable(torch.empty(0, device=DEV))
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="Triton not installed (or imported "
                                  "before TRITON_INTERPRET=1 was set)")
BACKENDS = [pytest.param("triton", marks=needs_triton), "torch"]
SHAPES = [(1, 4, 37), (3, 20, 70), (17, 36, 45), (3, 36, 129), (17, 4, 16)]  # (M, N, K)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def _pair(N, K, seed, dtype=torch.float32):
    """A reference BitLinear and a FusedBitLinear with the same weight."""
    gen = torch.Generator().manual_seed(seed)
    ref = BitLinear(K, N, dtype=dtype)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(N, K, generator=gen) * 0.05)
    fused = bt.FusedBitLinear(K, N, dtype=dtype)
    fused.load_state_dict(ref.state_dict())
    return ref.to(DEV), fused.to(DEV), gen


@needs_triton
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_int8_gemm_exact(M, N, K):
    gen = torch.Generator().manual_seed(M * 100 + N + K)
    x_q = torch.randint(-128, 128, (M, K), generator=gen, dtype=torch.int8)
    w_t = torch.randint(-1, 2, (N, K), generator=gen, dtype=torch.int8)
    acc = quant.int_matmul(x_q, w_t)
    one = torch.ones(())
    y_int = bt._tk.int8_linear(x_q.to(DEV), torch.ones(M, 1, device=DEV), w_t.to(DEV), one.to(DEV))
    assert torch.equal(y_int.cpu().to(torch.int32), acc)        # the int32 sums, exactly
    s = torch.rand(M, 1, generator=gen) * 50 + 1
    gamma = torch.rand((), generator=gen) + 0.01
    y = bt._tk.int8_linear(x_q.to(DEV), s.to(DEV), w_t.to(DEV), gamma.to(DEV))
    assert torch.equal(y.cpu(), acc.float() * (gamma / s))       # epilogue = the reference's ops


@needs_triton
def test_int8_gemm_small_blocks_many_k_tiles():
    gen = torch.Generator().manual_seed(7)
    x_q = torch.randint(-128, 128, (19, 83), generator=gen, dtype=torch.int8)
    w_t = torch.randint(-1, 2, (21, 83), generator=gen, dtype=torch.int8)
    y = bt._tk.int8_linear(x_q.to(DEV), torch.ones(19, device=DEV), w_t.to(DEV), torch.ones((), device=DEV),
                           block=(16, 16, 16))
    assert torch.equal(y.cpu().to(torch.int32), quant.int_matmul(x_q, w_t))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_forward_and_grads_match_bitlinear(backend, M, N, K):
    ref, fused, gen = _pair(N, K, seed=M + 10 * N + K)
    fused.backend = backend
    x = (torch.randn(M, K, generator=gen) * 2).to(DEV)
    g = torch.randn(M, N, generator=gen).to(DEV)
    xr = x.clone().requires_grad_(True)
    xf = x.clone().requires_grad_(True)
    y_ref = ref(xr)
    y = fused(xf)
    # the saved state is the int8 one
    x_q, s, w_t, gamma = y.grad_fn.saved_tensors
    assert (x_q.dtype, w_t.dtype, s.dtype, gamma.dtype) == (torch.int8, torch.int8, torch.float32, torch.float32)
    # integers exact (before scaling) against the reference quantizers
    x_q_ref, s_ref = quant.act_quant(x.cpu())
    w_t_ref, gamma_ref = quant.ternarize(ref.weight.detach().cpu())
    assert torch.equal(x_q.cpu(), x_q_ref) and torch.equal(s.cpu(), s_ref)
    assert torch.equal(w_t.cpu(), w_t_ref) and torch.equal(gamma.cpu(), gamma_ref)
    # scaled forward: bit-for-bit the reference inference math, within fp32 rounding of BitLinear
    assert torch.equal(y.detach().cpu(), quant.bitlinear_ref(x.cpu(), w_t_ref, gamma_ref))
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5 * float(y_ref.detach().abs().max()))
    (y_ref * g).sum().backward()
    (y * g).sum().backward()
    assert _rel(xf.grad, xr.grad) <= 1e-5
    assert _rel(fused.weight.grad, ref.weight.grad) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_noncontiguous_input(backend):
    ref, fused, gen = _pair(20, 70, seed=3)
    fused.backend = backend
    base = torch.randn(2, 70, 3, generator=gen).to(DEV)
    x = base.transpose(1, 2)                                      # [2, 3, 70], column stride 3
    xr = x.detach().clone().requires_grad_(True)
    xf = x.detach().clone().requires_grad_(True)
    y_ref, y = ref(xr), fused(xf)
    assert y.shape == (2, 3, 20)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    y_ref.square().sum().backward()
    y.square().sum().backward()
    assert _rel(xf.grad, xr.grad) <= 1e-5 and _rel(fused.weight.grad, ref.weight.grad) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_close_to_reference(backend):
    ref, fused, gen = _pair(36, 45, seed=5, dtype=torch.bfloat16)
    fused.backend = backend
    x = torch.randn(17, 45, generator=gen).to(DEV, torch.bfloat16)
    xr, xf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_ref, y = ref(xr), fused(xf)
    assert y.dtype == torch.bfloat16 and fused.weight.dtype == torch.bfloat16
    assert _rel(y.float(), y_ref.float()) <= 2e-2
    y_ref.float().sum().backward()
    y.float().sum().backward()
    assert fused.weight.grad.dtype == torch.bfloat16
    assert _rel(xf.grad.float(), xr.grad.float()) <= 2e-2
    assert _rel(fused.weight.grad.float(), ref.weight.grad.float()) <= 2e-2


def test_torch_fallback_without_triton(monkeypatch):
    monkeypatch.setattr(bt, "_tk", None)
    ref, fused, gen = _pair(4, 37, seed=11)
    x = torch.randn(3, 37, generator=gen).to(DEV)
    assert not bt.triton_usable(x)
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-6)      # auto -> torch
    fused.backend = "triton"
    with pytest.raises(RuntimeError, match="backend='triton'"):
        fused(x)


@needs_triton
def test_gpus_older_than_sm80_train_on_torch(monkeypatch):
    """On an sm_75 GPU (T4) the fused layer's automatic backend is torch, and asking for Triton
    by name says which GPU and why."""
    from bitnet158.kernels.triton import bitlinear_train as tk, common
    monkeypatch.setattr(tk, "INTERPRET", False)
    monkeypatch.setattr(common, "_capability", lambda index: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")

    class OnT4:  # what the backend choice reads of a tensor
        is_cuda, device = True, torch.device("cuda", 0)
    assert not bt.triton_usable(OnT4()) and bt._resolve("auto", OnT4()) == "torch"
    with pytest.raises(RuntimeError, match="sm_80 or newer GPU.*Tesla T4 is sm_75"):
        bt._resolve("triton", OnT4())


def test_bad_arguments():
    _, fused, _ = _pair(4, 37, seed=1)
    fused.backend = "cuda"
    with pytest.raises(ValueError, match="backend='cuda'"):
        fused(torch.randn(2, 37, device=DEV))
    fused.backend = "torch"
    with pytest.raises(ValueError, match="in_features=37"):
        fused(torch.randn(2, 36, device=DEV))
    with pytest.raises(ValueError, match="use_fused_bitlinear"):
        bt.use_fused_bitlinear(torch.nn.Linear(2, 2), backend="fast")


def test_use_fused_bitlinear_swaps_a_model_in_place():
    """Logits and every parameter gradient of a tiny model equal the reference path's."""
    torch.manual_seed(0)
    model = init_weights(Transformer(ModelConfig.from_name("tiny")))
    tokens = torch.randint(0, 512, (2, 9))

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(tokens)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    logits_ref, grads_ref = step()
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    n_bitlinear = sum(type(m) is BitLinear for m in model.modules())
    assert bt.use_fused_bitlinear(model, backend="torch") == n_bitlinear == 14
    assert all(type(m) is not BitLinear for m in model.modules())
    assert all(p is params[n] for n, p in model.named_parameters())       # same parameters
    assert list(model.state_dict()) == keys                               # same checkpoint names
    logits, grads = step()
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)
    for n in grads_ref:
        assert _rel(grads[n], grads_ref[n]) <= 1e-5, n
    assert bt.use_reference_bitlinear(model) == n_bitlinear
    assert sum(type(m) is BitLinear for m in model.modules()) == n_bitlinear


def test_imports_and_trains_where_triton_is_absent():
    """A fresh interpreter in which ``import triton`` fails: the torch backend still trains."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch\n"
            "from bitnet158.kernels import bitlinear_train as bt\n"
            "assert bt._tk is None\n"
            "m = bt.FusedBitLinear(37, 20); x = torch.randn(3, 37, requires_grad=True)\n"
            "m(x).sum().backward()\n"
            "assert x.grad.shape == (3, 37) and m.weight.grad.shape == (20, 37)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
