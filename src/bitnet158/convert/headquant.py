"""Float tensors (embedding / head) in the GGUF types a user may pick: F32, F16, BF16, Q8_0, Q6_K.

    data, ggml_type = quantize_float(x, "q8_0")    # x float32 [rows, K] -> uint8 rows
    x = dequantize_float(data, ggml_type, rows, K)

F16/F32/BF16 and Q8_0 use the ``gguf`` package (its Q8_0 matches ggml's reference quantizer bit
for bit). The package cannot quantize Q6_K, so :func:`quantize_q6_k` does it here: per 16-weight
sub-block the scale is chosen so that the weight of largest magnitude lands on -32 (the
``make_qx_quants`` starting point of ggml's reference, without its iterative refinement), the 16
sub-scales become int8 against one f16 super-scale. Error is within a few percent of ggml's.
Large tensors are processed in row chunks, so a 128256 x 2560 head needs no float32 copy.

Q6_K block (256 weights, 210 bytes): ``ql[128]`` (low 4 bits), ``qh[64]`` (high 2 bits),
``scales[16]`` int8, ``d`` f16; weight ``h*128 + s*64 + b`` (b < 64) has low bits
``(ql[h*64 + b] >> 4s) & 15`` and weight ``h*128 + k*32 + m`` has high bits
``(qh[h*32 + m] >> 2k) & 3``; value ``d * scales[i // 16] * (q - 32)``.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants

HEAD_TYPES = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q6_k": T.Q6_K}
_CHUNK_ROWS = 4096


def nbytes(ggml_type: T, rows: int, k: int) -> int:
    block, size = GGML_QUANT_SIZES[ggml_type]
    return rows * (k // block) * size


def check_shape(ggml_type: T, k: int, what: str) -> None:
    block = GGML_QUANT_SIZES[ggml_type][0]
    if k % block:
        raise ValueError(f"{what}: row length {k} is not a multiple of {block} ({ggml_type.name} "
                         "blocks); pick --head f16")


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """float32 [rows, K] (K % 256 == 0) -> uint8 [rows, K/256 * 210]."""
    rows, k = x.shape
    nb = rows * k // 256
    sub = x.reshape(nb, 16, 16).astype(np.float32)                     # [block, sub-block, 16]
    idx = np.abs(sub).argmax(axis=-1)[..., None]
    vmax = np.take_along_axis(sub, idx, axis=-1)[..., 0]               # signed max-magnitude value
    scale = vmax / -32.0                                               # [nb, 16]
    sidx = np.abs(scale).argmax(axis=-1)[:, None]
    max_scale = np.take_along_axis(scale, sidx, axis=-1)               # [nb, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(max_scale == 0, 0.0, -128.0 / max_scale)
    sc = np.clip(np.rint(iscale * scale), -128, 127).astype(np.int8)  # [nb, 16]
    d = np.where(iscale == 0, 0.0, 1.0 / np.where(iscale == 0, 1.0, iscale)).astype(np.float16)
    step = d.astype(np.float32) * sc.astype(np.float32)                # [nb, 16]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(step[..., None] == 0, 0.0, sub / step[..., None])
    L = (np.clip(np.rint(q), -32, 31) + 32).astype(np.uint8).reshape(nb, 2, 128)  # [blk, half, 128]
    lo, hi = L & np.uint8(15), L >> np.uint8(4)
    ql = (lo[:, :, :64] | (lo[:, :, 64:] << 4)).reshape(nb, 128)
    h = hi.reshape(nb, 2, 4, 32)
    qh = (h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)).reshape(nb, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(nb, 2)], axis=1)
    return out.reshape(rows, -1)


def quantize_float(x: np.ndarray, kind: str, what: str = "tensor") -> tuple[np.ndarray, T]:
    """x float [rows, K] -> (data, ggml type): float types as their numpy dtype, quantized as uint8."""
    if kind not in HEAD_TYPES:
        raise ValueError(f"{what}: type {kind!r} is not one of {', '.join(HEAD_TYPES)}")
    t = HEAD_TYPES[kind]
    rows, k = x.shape
    check_shape(t, k, what)
    if t == T.F32:
        return np.ascontiguousarray(x, dtype=np.float32), t
    if t == T.F16:
        return np.ascontiguousarray(x, dtype=np.float16), t
    out = np.empty((rows, nbytes(t, 1, k)), dtype=np.uint8)
    for r in range(0, rows, _CHUNK_ROWS):                     # row chunks: no full float32 copy
        chunk = np.asarray(x[r:r + _CHUNK_ROWS], dtype=np.float32)
        out[r:r + _CHUNK_ROWS] = quantize_q6_k(chunk) if t == T.Q6_K else quants.quantize(chunk, t)
    return out, t


def dequantize_float(data: np.ndarray, ggml_type: int, rows: int, k: int) -> np.ndarray:
    """Any type the ``gguf`` package dequantizes -> float32 [rows, K]."""
    return np.asarray(quants.dequantize(np.asarray(data), T(ggml_type)), dtype=np.float32).reshape(rows, k)
