"""bitnet.cpp's I2_S tensor type: 2-bit ternary codes plus one float32 scale per tensor.

    data = pack_i2s(w_t, gamma)           # w_t int8 [rows, K] -> uint8 [rows*K/4 + 32]
    w_t, gamma = unpack_i2s(data, rows, K)

I2_S is not an upstream ggml type: it exists in Microsoft's bitnet.cpp fork of llama.cpp, where
``GGML_TYPE_I2_S = 36`` (``LLAMA_FTYPE_MOSTLY_I2_S = 40``). The ``gguf`` Python package does not
know it, so the writer is given the raw type id and byte count, and the reader here parses it.

Byte layout (bitnet.cpp's x86 layout: ``quantize_i2_s`` with ``QK_I2_S = 128`` as built with
its default ``gemm-config.h``, which defines ``ACT_PARALLEL``; ``dequantize_row_i2_s`` reads the
same 128-weight blocks. Two other bitnet.cpp builds write other orders and would misread these
files: ARM NEON builds pack 64-weight blocks, and x86 builds with ``ACT_PARALLEL`` removed pack 4
rows per byte, column by column):

- The tensor's weights are taken in row-major order (row = output feature, K = input features:
  ggml ``ne0 = K``), ``n = rows * K`` with ``K % 128 == 0``, and cut into blocks of 128.
- Block ``b`` takes 32 bytes at offset ``32*b``. Weight ``j`` (0..127) of the block is stored as
  code ``w + 1`` (0 -> -1, 1 -> 0, 2 -> +1; 3 unused) in byte ``j % 32`` at bits
  ``6 - 2*(j // 32)`` .. ``7 - 2*(j // 32)`` — group 0 (weights 0..31) in the top two bits.
- After the ``n / 4`` packed bytes comes a 32-byte trailer: the scale as little-endian float32
  in bytes 0..3, zeros after (bitnet.cpp reads only the first float; the rest keeps the next
  tensor 32-byte aligned). The tensor's size is therefore ``n / 4 + 32`` bytes, which is what
  bitnet.cpp's ``ggml_nbytes`` returns for I2_S.
- The scale multiplies: a weight's value is ``(code - 1) * scale``. bitnet.cpp's quantizer sets
  it to max|W| of an already-ternarized ``W_t * gamma``, i.e. gamma, the absmean multiplier; its
  matmul computes ``(sum(code * x_q) - sum(x_q)) / s_x * scale``.
"""

from __future__ import annotations

import numpy as np

from .tq import ternary_codes

GGML_TYPE_I2_S = 36
LLAMA_FTYPE_MOSTLY_I2_S = 40
QK_I2_S = 128
TRAILER = 32


def nbytes(rows: int, k: int) -> int:
    """On-disk size of a [rows, K] I2_S tensor."""
    return rows * k // 4 + TRAILER


def pack_i2s(w_t: np.ndarray, gamma: float, what: str = "tensor") -> np.ndarray:
    """Ternary int8 [rows, K] (K % 128 == 0) and the multiplier -> uint8 [rows*K/4 + 32]."""
    u = ternary_codes(w_t, what, QK_I2_S, "I2_S", "f16")
    g = u.reshape(-1, 4, 32)                                              # [block, group, byte]
    packed = (g[:, 0] << 6) | (g[:, 1] << 4) | (g[:, 2] << 2) | g[:, 3]   # [block, 32]
    trailer = np.zeros(TRAILER, dtype=np.uint8)
    trailer[:4] = np.array([gamma], dtype="<f4").view(np.uint8)
    return np.concatenate([packed.reshape(-1), trailer])


def unpack_i2s(data: np.ndarray, rows: int, k: int, what: str = "tensor") -> tuple[np.ndarray, float]:
    """uint8 [rows*K/4 + 32] -> (ternary int8 [rows, K], scale). Code 3 is an error."""
    data = np.asarray(data, dtype=np.uint8).reshape(-1)
    n = rows * k
    if k % QK_I2_S:
        raise ValueError(f"{what}: I2_S row length {k} is not a multiple of {QK_I2_S}")
    if data.size < n // 4 + 4:
        raise ValueError(f"{what}: I2_S data holds {data.size} bytes, expected {n // 4 + TRAILER}")
    b = data[: n // 4].reshape(-1, 1, 32)
    u = (b >> np.array([6, 4, 2, 0], dtype=np.uint8).reshape(1, 4, 1)) & np.uint8(3)  # [blk, grp, 32]
    if u.size and u.max() > 2:
        raise ValueError(f"{what}: I2_S data holds code 3, which no ternary weight maps to")
    w = u.reshape(rows, k).astype(np.int8) - np.int8(1)
    scale = float(np.ascontiguousarray(data[n // 4: n // 4 + 4]).view("<f4")[0])
    return w, scale
