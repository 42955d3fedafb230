"""llama.cpp's ternary block types TQ2_0 and TQ1_0, packed from ternary codes (numpy, no torch).

    blocks = pack_tq2_0(w_t, gamma)        # w_t int8 [rows, K] in {-1,0,1}, K % 256 == 0
    w_t, d = unpack_tq2_0(blocks, rows, K) # -> int8 [rows, K], f16 scale per block [rows, K/256]

Both types cut every row into blocks of 256 weights and end each block with an f16 scale ``d``;
a weight's value is ``code * d`` with code in {-1, 0, +1}. For BitNet b1.58 the whole tensor
shares one scale, the absmean gamma (a **multiplier**), so every block gets ``d = f16(gamma)``.
(llama.cpp's own converter rebuilds per-block ``d`` from ``W / weight_scale`` — dividing by the
released multiplier — which gives garbage for the released 2B4T weights.)

Layouts, for one 256-weight block with trit ``u = w + 1`` in {0, 1, 2}:

- TQ2_0, 66 bytes = ``qs[64]`` + ``d``: weight ``j*128 + l*32 + m`` (j < 2, l < 4, m < 32) sits
  in bits ``2l..2l+1`` of ``qs[j*32 + m]``.
- TQ1_0, 54 bytes = ``qs[48]`` + ``qh[4]`` + ``d``: five trits per byte as a base-3 fraction.
  Byte ``m`` of ``qs[0:32]`` holds weights ``m + 32n`` (n < 5), of ``qs[32:48]`` holds weights
  ``160 + m + 16n``, of ``qh[0:4]`` holds weights ``240 + m + 4n`` (n < 4, fifth trit 0); the
  value ``v = sum u_n 3^(4-n)`` is stored as ``ceil(v * 256 / 243)``, and trit ``n`` reads back as
  ``((byte * 3^n mod 256) * 3) >> 8``.

The packers here work on integer codes directly (exact, and ~10x less memory than quantizing
floats); the tests check them byte for byte against the ``gguf`` package's own quantizer and
dequantizer.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
TQ2_0_BYTES = 66
TQ1_0_BYTES = 54
_POW3 = np.array([81, 27, 9, 3, 1], dtype=np.uint16)


def ternary_codes(w_t: np.ndarray, what: str, block: int = QK_K,
                  types: str = "TQ1_0/TQ2_0", other: str = "i2_s or f16") -> np.ndarray:
    """int8 [rows, K] ternary -> uint8 trits u = w + 1, checked (K a multiple of ``block``)."""
    w_t = np.asarray(w_t)
    if w_t.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D ternary weight, got shape {w_t.shape}")
    if w_t.shape[1] % block:
        raise ValueError(f"{what}: row length {w_t.shape[1]} is not a multiple of {block} "
                         f"({types} blocks); use --type {other} for this shape")
    u = (w_t.astype(np.int8) + np.int8(1)).view(np.uint8)
    if u.size and u.max() > 2:
        raise ValueError(f"{what}: weights are not ternary (-1, 0, +1)")
    return u


def _scale_bytes(gamma: float, n_blocks: int) -> np.ndarray:
    """f16(gamma) repeated per block as uint8 [n_blocks, 2]."""
    d = np.full((n_blocks, 1), gamma, dtype=np.float32).astype(np.float16)
    return d.view(np.uint8).reshape(n_blocks, 2)


def _block_scales(d_bytes: np.ndarray, rows: int, k: int) -> np.ndarray:
    return np.ascontiguousarray(d_bytes).view(np.float16).reshape(rows, k // QK_K)


# ---------------------------------------------------------------- TQ2_0

def pack_tq2_0(w_t: np.ndarray, gamma: float, what: str = "tensor") -> np.ndarray:
    """Ternary int8 [rows, K] and one scale -> uint8 [rows, K/256 * 66] (TQ2_0 rows)."""
    u = ternary_codes(w_t, what)
    rows, k = u.shape
    nb = rows * k // QK_K
    g = u.reshape(nb, 2, 4, 32)                                   # [block, half j, shift l, m]
    qs = g[:, :, 0] | (g[:, :, 1] << 2) | (g[:, :, 2] << 4) | (g[:, :, 3] << 6)   # [nb, 2, 32]
    out = np.concatenate([qs.reshape(nb, 64), _scale_bytes(gamma, nb)], axis=1)
    return out.reshape(rows, -1)


def unpack_tq2_0(data: np.ndarray, rows: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 TQ2_0 data -> (codes int8 [rows, K] incl. the never-written code 3 as +2, d f16 [rows, K/256])."""
    b = np.asarray(data, dtype=np.uint8).reshape(-1, TQ2_0_BYTES)
    qs = b[:, :64].reshape(-1, 2, 1, 32)
    u = (qs >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & np.uint8(3)
    w = (u.reshape(rows, k).astype(np.int8) - np.int8(1))
    return w, _block_scales(b[:, 64:], rows, k)


# ---------------------------------------------------------------- TQ1_0

def _base3_bytes(u: np.ndarray, width: int, trits: int) -> np.ndarray:
    """u [nb, trits*width] -> bytes [nb, width]: trit n of byte m is u[n*width + m]."""
    nb = u.shape[0]
    t = u.reshape(nb, trits, width).astype(np.uint16)
    v = (t * _POW3[:trits].reshape(1, trits, 1)).sum(axis=1, dtype=np.uint16)
    return ((v * 256 + 242) // 243).astype(np.uint8)       # ceil(v * 256 / 243), v <= 242


def pack_tq1_0(w_t: np.ndarray, gamma: float, what: str = "tensor") -> np.ndarray:
    """Ternary int8 [rows, K] and one scale -> uint8 [rows, K/256 * 54] (TQ1_0 rows)."""
    u = ternary_codes(w_t, what)
    rows, k = u.shape
    nb = rows * k // QK_K
    u = u.reshape(nb, QK_K)
    qs0 = _base3_bytes(u[:, :160], 32, 5)      # 32 bytes, weights m + 32n
    qs1 = _base3_bytes(u[:, 160:240], 16, 5)   # 16 bytes, weights 160 + m + 16n
    qh = _base3_bytes(u[:, 240:], 4, 4)        # 4 bytes, weights 240 + m + 4n (5th trit 0)
    out = np.concatenate([qs0, qs1, qh, _scale_bytes(gamma, nb)], axis=1)
    return out.reshape(rows, -1)


def _trits(b: np.ndarray, n: int) -> np.ndarray:
    """bytes [nb, W] -> trits [nb, n, W] (n-th base-3 digit, most significant first)."""
    mul = np.array([1, 3, 9, 27, 81][:n], dtype=np.uint8).reshape(1, n, 1)
    q = (b[:, None, :] * mul).astype(np.uint16)            # uint8 product wraps mod 256 (intended)
    return ((q * 3) >> 8).astype(np.uint8)


def unpack_tq1_0(data: np.ndarray, rows: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 TQ1_0 data -> (codes int8 [rows, K], d f16 [rows, K/256])."""
    b = np.asarray(data, dtype=np.uint8).reshape(-1, TQ1_0_BYTES)
    nb = b.shape[0]
    u = np.concatenate([_trits(b[:, :32], 5).reshape(nb, 160),
                        _trits(b[:, 32:48], 5).reshape(nb, 80),
                        _trits(b[:, 48:52], 4).reshape(nb, 16)], axis=1)
    w = u.reshape(rows, k).astype(np.int8) - np.int8(1)
    return w, _block_scales(b[:, 52:], rows, k)


PACKERS = {"tq2_0": (pack_tq2_0, unpack_tq2_0, TQ2_0_BYTES),
           "tq1_0": (pack_tq1_0, unpack_tq1_0, TQ1_0_BYTES)}


def nbytes(kind: str, rows: int, k: int) -> int:
    """Bytes of a [rows, K] tensor in TQ1_0/TQ2_0."""
    return rows * (k // QK_K) * PACKERS[kind][2]


def tensor_scale(w: np.ndarray, d: np.ndarray, what: str) -> float:
    """The one per-tensor multiplier of unpacked blocks: every block holding a nonzero weight must
    carry the same d (blocks of zeros may carry any d, e.g. 0 from an absmax quantizer)."""
    ds = np.unique(d.reshape(-1))
    if ds.size == 1 and ds[0] != 0:
        return float(ds[0])                              # the common case: one d everywhere
    used = np.any(w.reshape(-1, QK_K) != 0, axis=1)
    ds = np.unique(d.reshape(-1)[used].astype(np.float32))
    if ds.size == 0:
        return 0.0
    if ds.size > 1:
        raise ValueError(f"{what}: blocks carry {ds.size} different scales (e.g. {ds[0]:g}, "
                         f"{ds[-1]:g}); a BitNet b1.58 tensor has one per-tensor scale")
    return float(ds[0])
