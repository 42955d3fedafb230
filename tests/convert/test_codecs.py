"""Block codecs against independent references: the gguf package's TQ1_0/TQ2_0/Q6_K code and
bitnet.cpp's documented I2_S byte layout."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants

from bitnet158.convert import headquant, i2s, tq


def _ternary(rows, k, seed=0):
    return np.random.default_rng(seed).integers(-1, 2, size=(rows, k)).astype(np.int8)


@pytest.mark.parametrize("kind,gtype", [("tq2_0", T.TQ2_0), ("tq1_0", T.TQ1_0)])
def test_tq_matches_gguf_package(kind, gtype):
    pack, unpack, size = tq.PACKERS[kind]
    w = _ternary(6, 768)
    gamma = 0.0371
    data = pack(w, gamma)
    assert data.shape == (6, 3 * size) and data.dtype == np.uint8
    # the package's own quantizer (block absmax d = 1 here) writes the same code bytes
    ref = quants.quantize(w.astype(np.float32), gtype).reshape(-1, size)
    assert np.array_equal(data.reshape(-1, size)[:, :-2], ref[:, :-2])
    # and its dequantizer reads back code * f16(gamma) exactly
    assert np.array_equal(quants.dequantize(data, gtype), w.astype(np.float32) * np.float32(np.float16(gamma)))
    w2, d = unpack(data, 6, 768)
    assert np.array_equal(w2, w) and d.shape == (6, 3)
    assert tq.tensor_scale(w2, d, "t") == float(np.float16(gamma))


def test_tq_scale_rules():
    w = _ternary(2, 512)
    w[0, :256] = 0                                     # an all-zero block may carry d = 0
    data = quants.quantize(w.astype(np.float32) * 0.5, T.TQ2_0)   # absmax quantizer: d = 0.5 or 0
    w2, d = tq.unpack_tq2_0(data, 2, 512)
    assert np.array_equal(w2, w) and float(d.min()) == 0.0
    assert tq.tensor_scale(w2, d, "t") == 0.5
    x = w.astype(np.float32)
    x[1] *= 2                                          # two different per-block scales
    w3, d3 = tq.unpack_tq2_0(quants.quantize(x, T.TQ2_0), 2, 512)
    with pytest.raises(ValueError, match="different scales"):
        tq.tensor_scale(w3, d3, "t")
    with pytest.raises(ValueError, match="multiple of 256"):
        tq.pack_tq2_0(_ternary(4, 128), 1.0)
    with pytest.raises(ValueError, match="not ternary"):
        tq.pack_tq1_0(np.full((1, 256), 2, dtype=np.int8), 1.0)


def test_i2s_byte_layout():
    rows, k = 3, 256
    w = _ternary(rows, k, seed=1)
    gamma = 0.0123
    data = i2s.pack_i2s(w, gamma)
    assert data.size == rows * k // 4 + 32 == i2s.nbytes(rows, k)
    flat = w.reshape(-1)
    for b in range(flat.size // 128):                  # 128-weight blocks of 32 bytes
        for j in range(128):
            byte = data[32 * b + j % 32]
            code = (byte >> (6 - 2 * (j // 32))) & 3   # group 0 in the top bits
            assert code == flat[128 * b + j] + 1
    assert np.frombuffer(data[-32:-28].tobytes(), "<f4")[0] == np.float32(gamma)
    assert not data[-28:].any()
    w2, g2 = i2s.unpack_i2s(data, rows, k)
    assert np.array_equal(w2, w) and g2 == float(np.float32(gamma))
    bad = data.copy()
    bad[0] |= 0xC0                                     # code 3
    with pytest.raises(ValueError, match="code 3"):
        i2s.unpack_i2s(bad, rows, k)
    with pytest.raises(ValueError, match="multiple of 128"):
        i2s.pack_i2s(_ternary(2, 64), 1.0)


def test_head_types_dequantize_with_gguf_package():
    x = (np.random.default_rng(2).standard_normal((40, 512)) * 0.05).astype(np.float32)
    x[3, :16] = 0.0                                    # an all-zero sub-block
    for kind, tol in (("f32", 0), ("f16", 1e-3), ("bf16", 1e-2), ("q8_0", 1e-2), ("q6_k", 3e-2)):
        data, t = headquant.quantize_float(x, kind)
        assert data.nbytes == headquant.nbytes(t, 40, 512)
        y = headquant.dequantize_float(data, t, 40, 512)
        rel = np.sqrt(((y - x) ** 2).mean() / (x ** 2).mean())
        assert rel <= tol, (kind, rel)
    with pytest.raises(ValueError, match="multiple of 256"):
        headquant.quantize_float(x[:, :96], "q6_k")


def test_numpy_hf_layout_matches_reference():
    import torch

    from bitnet158 import quant
    from bitnet158.convert.hf_layout import pack_hf_np, unpack_hf_np

    w = _ternary(12, 40, seed=4)
    p = pack_hf_np(w)
    assert np.array_equal(p, quant.pack_hf(torch.from_numpy(w)).numpy())
    assert np.array_equal(unpack_hf_np(p), w)
    assert np.array_equal(unpack_hf_np(p), quant.unpack_hf(torch.from_numpy(p)).numpy())
