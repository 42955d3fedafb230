"""The reference quantization math: packing round trips, scales, exactness of the integer product."""

import pytest
import torch

from bitnet158 import quant


def test_pack_unpack_roundtrip_and_block_layout():
    torch.manual_seed(0)
    w = torch.randint(-1, 2, (12, 7), dtype=torch.int8)
    p = quant.pack_hf(w)
    assert p.shape == (3, 7) and p.dtype == torch.uint8
    assert torch.equal(quant.unpack_hf(p), w)
    # field k of packed row r holds row k*R + r (blocks, not interleaved), stored as w+1
    r = 3
    for k in range(4):
        for row in range(r):
            assert torch.equal(((p[row] >> (2 * k)) & 3).to(torch.int8) - 1, w[k * r + row])


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 4"):
        quant.pack_hf(torch.zeros(6, 3, dtype=torch.int8))
    with pytest.raises(ValueError, match="ternary"):
        quant.pack_hf(torch.full((4, 3), 2, dtype=torch.int8))


def test_ternarize_absmean():
    w = torch.tensor([[0.1, -0.2, 0.3, -0.4]])
    w_t, gamma = quant.ternarize(w)
    assert torch.isclose(gamma, torch.tensor(0.25))
    assert w_t.tolist() == [[0, -1, 1, -1]]  # 0.4, -0.8 (rounds to -1), 1.2, -1.6 clamped


def test_act_quant_range_and_half_to_even():
    x = torch.tensor([[127.0, -127.0, 0.5, 1.5, 2.5]])
    x_q, s = quant.act_quant(x)
    assert s.item() == 1.0
    assert x_q.tolist() == [[127, -127, 0, 2, 2]]


def test_int_matmul_exact_at_extremes():
    k = 6912
    x = torch.full((3, k), -128, dtype=torch.int8)
    w = torch.ones(5, k, dtype=torch.int8)
    w[1] = -1
    acc = quant.int_matmul(x, w)
    ref = x.long() @ w.long().t()
    assert torch.equal(acc.long(), ref)


def test_bitlinear_ref_equals_fake_quant():
    torch.manual_seed(1)
    x = torch.randn(4, 33)
    w = torch.randn(8, 33) * 0.05
    w_t, g = quant.ternarize(w)
    y = quant.bitlinear_ref(x, w_t, g)
    y_fake = quant.act_dequant(x) @ quant.ternary_dequant(w).t()
    torch.testing.assert_close(y, y_fake, rtol=1e-5, atol=1e-5)
