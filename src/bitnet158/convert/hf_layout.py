"""The Hugging Face 2-bit layout of ``quant.pack_hf`` / ``quant.unpack_hf``, in numpy.

    packed = pack_hf_np(w_t)      # int8 [out, in] in {-1,0,1} -> uint8 [out/4, in]
    w_t = unpack_hf_np(packed)    # and back

Field ``k`` (bits 2k..2k+1) of packed row ``r`` holds row ``k*R + r`` (``R = out/4``) as ``w + 1``.
The torch reference in ``quant`` is the spec (tests compare); these avoid its int16 temporaries
and run ~30x faster on the 2B4T shapes a conversion streams through.
"""

from __future__ import annotations

import numpy as np

_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1, 1)


def pack_hf_np(w: np.ndarray) -> np.ndarray:
    """Ternary int8 [out, in] (out % 4 == 0, values already checked) -> uint8 [out/4, in]."""
    out = w.shape[0]
    u = (w.astype(np.int8) + np.int8(1)).view(np.uint8).reshape(4, out // 4, *w.shape[1:])
    return u[0] | (u[1] << 2) | (u[2] << 4) | (u[3] << 6)


def unpack_hf_np(packed: np.ndarray) -> np.ndarray:
    """uint8 [out/4, in] -> ternary int8 [out, in] (a never-written code 3 reads as +2)."""
    u = (packed[None] >> _SHIFTS) & np.uint8(3)                  # [4, out/4, in]
    return u.reshape(-1, *packed.shape[1:]).view(np.int8) - np.int8(1)
