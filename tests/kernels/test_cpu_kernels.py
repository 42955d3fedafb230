"""The C CPU kernels against the torch reference (bitnet158.quant): integers exactly, every ISA path.

    python3 -m pytest -q tests/kernels/test_cpu_kernels.py
"""

from __future__ import annotations

import warnings

import pytest
import torch

from bitnet158 import kernels, quant
from bitnet158.kernels import cpu
from bitnet158.kernels.cpu import backend, binding
from bitnet158.errors import ConfigError
from bitnet158.layers import PackedLinear

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"C kernels unavailable: {binding.error()}")

ISAS = cpu.supported_isas() if cpu.available() else []


@pytest.fixture(params=ISAS)
def isa(request):
    cpu.set_isa(request.param)
    yield request.param
    cpu.set_isa(None)


def _ternary(n, k, g):
    return torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=g)


# M tokens, N rows (some not a multiple of the 16-row tile), K (some not a multiple of the block)
SHAPES = [(1, 64, 64), (2, 20, 40), (3, 68, 100), (5, 16, 33), (17, 160, 2560), (128, 48, 272),
          (1, 160, 6912), (4, 36, 7)]


@pytest.fixture(params=list(cpu.LAYOUTS) if cpu.available() else [])
def layout(request):
    return request.param


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_gemm_exact_random(isa, layout, m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    w = _ternary(n, k, g)
    x_q = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    acc = cpu.gemm_i32(cpu.convert(quant.pack_hf(w), layout), n, x_q, layout)
    assert torch.equal(acc, quant.int_matmul(x_q, w))


def test_gemm_exact_adversarial(isa, layout):
    """Extreme sums: every activation at a bound against all-+1 / all--1 / all-0 weights (u = 2 / 0 / 1),
    K long (the int16 / int32 bounds matter) and a multiple of neither 16 nor 20, every token-block
    remainder; for B3 also every one of the 243 five-digit codes (both signs) in one row."""
    n, k = 68, 6912 + 8                           # 5 tiles: a 4-tile decode block and a single tile
    codes = torch.tensor([[(c // 3 ** i) % 3 - 1 for i in range(5)] for c in range(243)], dtype=torch.int8)
    for wsign in (1, -1, 0):
        w = torch.full((n, k), wsign, dtype=torch.int8)
        w[-1, ::3] = -wsign if wsign else 1       # one mixed row
        # rows 1 and -2: the 243 codes, digit i of code c at k = 20s + 4i + j (one B3 byte each)
        for c in range(243):
            s, j = divmod(c, 4)
            w[1, 20 * s + 4 * torch.arange(5) + j] = codes[c]
            w[-2, 20 * s + 4 * torch.arange(5) + j] = codes[c]
        wl = cpu.convert(quant.pack_hf(w), layout)
        for fill in (127, -128, -127):
            x_all = torch.full((128, k), fill, dtype=torch.int8)
            x_all[1::2, 1::2] = 127 if fill < 0 else -128   # alternating tokens
            for m in (1, 2, 3, 5, 17, 128):
                x_q = x_all[:m].contiguous()
                acc = cpu.gemm_i32(wl, n, x_q, layout)
                assert torch.equal(acc, quant.int_matmul(x_q, w)), (wsign, fill, m)


def test_b3_bytes_and_native_paths():
    """B3 is 1.6 bits per weight; AVX-512 VBMI and scalar decode it natively (others run scalar)."""
    assert cpu.layout_bytes(2560, 2560, "b3") * 5 == cpu.layout_bytes(2560, 2560, "t16") * 4
    assert cpu.kpad(6912, "b3") == 6920 and cpu.kpad(6912) == 6912
    w = torch.zeros(16, 20, dtype=torch.int8)
    assert torch.equal(cpu.convert(quant.pack_hf(w), "b3"), torch.zeros(64, dtype=torch.uint8))  # 121 -> 0
    w[0, 0] = -1                                      # v = 120 < 121: sign bit, magnitude 1
    assert int(cpu.convert(quant.pack_hf(w), "b3")[0]) == 0x81
    try:
        cpu.set_isa("scalar")
        assert cpu.layout_native("b3")
        for name in cpu.supported_isas():
            cpu.set_isa(name)
            assert cpu.layout_native("t16")
    finally:
        cpu.set_isa(None)
    with pytest.raises(ConfigError, match="layout"):
        cpu.kpad(16, "t8")


def test_huge_page_buffers():
    """Arena helpers: a 2 MB-aligned writable view of exactly the size asked; collapse never fails loudly."""
    t = cpu.huge_empty(5 << 20)
    assert t.numel() == 5 << 20 and t.data_ptr() % (2 << 20) == 0
    t.fill_(7)
    assert int(t[-1]) == 7
    cpu.collapse_huge(t)                              # may be refused (old kernel): returns a bool
    assert int(t.sum(dtype=torch.int64)) == 7 * (5 << 20)


def test_convert_padding_is_zero_weight():
    """Padding rows/columns are w = 0 (u = 1): a row past N contributes nothing."""
    w = torch.ones(4, 5, dtype=torch.int8)
    t16 = cpu.convert(quant.pack_hf(w))
    assert t16.numel() == 16 * 16 // 4
    fields = torch.stack([(t16 >> (2 * f)) & 3 for f in range(4)])
    assert int((fields == 2).sum()) == 20 and int((fields == 1).sum()) == 256 - 20


@pytest.mark.parametrize("k", [1, 7, 16, 100, 2560, 6913])
def test_act_quant_identical(isa, k):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(9, k, generator=g) * torch.logspace(-6, 3, 9)[:, None]
    x[0] = 0.0                                          # amax clamp (1e-5)
    q, s, sa = cpu.act_quant(x)
    q_ref, s_ref = quant.act_quant(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert torch.equal(sa, q_ref.to(torch.int32).sum(1, dtype=torch.int32))


def test_act_quant_ties_round_half_even(isa):
    """x * s lands exactly on .5: 127/amax with amax = 127 gives s = 1 and ties round to even."""
    ties = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 3.5, 4.5])
    x = torch.cat([ties, torch.tensor([127.0])])[None].repeat(3, 1)
    x[1, -1] = -127.0
    q, s, _ = cpu.act_quant(x)
    q_ref, s_ref = quant.act_quant(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert q[0, :6].tolist() == [0, 2, 2, 0, -2, -2]


def test_act_quant_scale_like_torch():
    """s = 127 / amax as torch evaluates it (reciprocal then multiply) across many magnitudes."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4096, 16, generator=g) * torch.logspace(-4, 4, 4096)[:, None]
    _, s, _ = cpu.act_quant(x)
    assert torch.equal(s, quant.act_scale(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_reference(isa, dtype):
    g = torch.Generator().manual_seed(3)
    w = _ternary(100, 300, g)
    layer = PackedLinear.from_ternary(w, 0.0123)
    x = torch.randn(2, 5, 300, generator=g).to(dtype)
    y = backend.forward(x, layer, backend.prepare(layer))
    y_ref = quant.bitlinear_ref(x, w, layer.weight_scale)
    assert y.dtype == dtype and torch.equal(y, y_ref)   # same integers, same fp32 epilogue


def test_packed_linear_dispatches_to_c():
    layer = PackedLinear.from_ternary(torch.ones(16, 32, dtype=torch.int8), 1.0)
    with torch.no_grad():
        layer(torch.randn(1, 32))
    assert layer.kernel_state[0] is backend and kernels.select(torch.randn(1)) is backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("m", [1, 3, 5])
@pytest.mark.parametrize("x_bf16", [False, True])
def test_head_gemv(isa, dtype, m, x_bf16):
    """x_bf16: inputs that are bf16 values (as the runner's final hidden state): the AVX512-BF16 path."""
    g = torch.Generator().manual_seed(m)
    w = torch.randn(203, 70, generator=g)
    x = torch.randn(m, 70, generator=g)
    if x_bf16:
        x = x.to(torch.bfloat16).float()
    if dtype == torch.int8:
        wq, sc = cpu.quantize_rows_int8(w)
        out = cpu.head_gemv(wq, x, sc)
        ref = (x.double() @ wq.double().t()) * sc.double()
    else:
        wd = w.to(dtype)
        out = cpu.head_gemv(wd, x)
        ref = x.double() @ wd.double().t()
    tol = 2e-4 if dtype == torch.int8 else 1e-5     # int8: the input is requantized to int16
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=10 * tol)


def test_head_int8_extreme_sum(isa):
    """Every int8 weight at +-127 against a constant input: the row sum passes 2^31 in the int16
    products of the vector path (2560 x 127 x 32767), so it must be summed wider."""
    w = torch.full((9, 2560), 127, dtype=torch.int8)
    w[1] = -127
    w[2, ::2] = -127
    sc = torch.full((9,), 0.5)
    x = torch.full((2, 2560), 3.0)
    out = cpu.head_gemv(w, x, sc)
    ref = (x.double() @ w.double().t()) * 0.5
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-3)


def test_fallback_when_library_missing(monkeypatch):
    """No library: one warning, PackedLinear falls back to the torch reference."""
    monkeypatch.setenv("BITNET158_CPU_KERNELS", "1")
    monkeypatch.setattr(binding, "_built", lambda: None)
    monkeypatch.setenv("BITNET158_CPU_JIT", "0")
    binding._reset_for_tests()
    try:
        w = torch.randint(-1, 2, (8, 16), dtype=torch.int8)
        layer = PackedLinear.from_ternary(w, 0.5)
        x = torch.randn(2, 16)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            with torch.no_grad():
                y1, y2 = layer(x), layer(x)
        assert sum("C CPU kernels unavailable" in str(r.message) for r in rec) == 1
        assert kernels.select(x).name == "torch"
        assert torch.equal(y1, quant.bitlinear_ref(x, w, layer.weight_scale)) and torch.equal(y1, y2)
    finally:
        monkeypatch.undo()
        binding._reset_for_tests()
    assert cpu.available()


def test_disable_env(monkeypatch):
    monkeypatch.setenv("BITNET158_CPU_KERNELS", "0")
    binding._reset_for_tests()
    try:
        assert binding.lib() is None and "BITNET158_CPU_KERNELS" in binding.error()
    finally:
        monkeypatch.undo()
        binding._reset_for_tests()


def test_set_isa_rejects_unknown():
    with pytest.raises(ConfigError, match="not supported"):
        cpu.set_isa("neon-on-x86")
    assert cpu.isa() == cpu.supported_isas()[-1]
