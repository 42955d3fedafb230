"""The tensor-core W2A8 GEMM (:mod:`bitnet158.kernels.triton.gemm_tc`) against the exact reference.

On CPU the kernel runs under ``TRITON_INTERPRET=1`` on small awkward shapes: 1-3 segments aligned
and not aligned to the row tile, odd K (masked K tiles), several M tiles, 1, 2 or 4 of a packed
row's fields a program, split-K with and without a ragged last K range. On CUDA the same cases run compiled, plus every 2B4T projection shape at
batched-decode and prefill row counts at the tuned block shapes (bit-exact).

    python3 -m pytest -q tests/kernels/test_gemm_tc.py
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from bitnet158 import quant  # noqa: E402
from bitnet158.kernels.triton import common, gemm_tc, w2a8  # noqa: E402
from w2a8_cases import check_linear  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and not common.INTERPRET:
    pytest.skip("Triton kernels were imported before TRITON_INTERPRET=1 was set", allow_module_level=True)


def _check(M, segs, K, cfg, seed=0):
    check_linear(w2a8.w2a8_linear, M, segs, K, DEV, cfg, seed)
    ws = w2a8.workspace(DEV)                  # split-K leaves its scratch clean for graph replays
    assert int(ws.ws.abs().sum()) == 0 and int(ws.cnt.abs().sum()) == 0


def _tc(bm, br, bk, split, nw=4, ns=2, f=4):
    return dict(kind="tc", BM=bm, BR=br, BK=bk, F=f, SPLIT_K=split, num_warps=nw, num_stages=ns)


# the interpreter takes any tile >= 16; compiled (sm_90 wgmma) the row tile is 64 a warpgroup
SMALL = 16 if common.INTERPRET else 64

CASES = [  # (M, segments, K, config)
    (9, (16,), 64, _tc(16, SMALL, 32, 1)),                  # one tile, aligned
    (20, (3, 5, 9), 100, _tc(16, SMALL, 32, 3)),            # 3 unaligned segments, split-K, ragged K
    (37, (16, 16), 128, _tc(16, SMALL, 64, 1)),             # 3 M tiles, 2 aligned segments
    (5, (4,), 36, _tc(16, SMALL, 32, 1)),                   # K not a multiple of 4 (or of BK)
    (33, (8, 8), 192, _tc(32, SMALL, 32, 4)),               # split-K over 4 programs, 2 M tiles
    (9, (16, 8), 64, _tc(16, SMALL, 32, 1, f=1)),           # one field a program (4 programs a tile)
    (20, (3, 5, 9), 100, _tc(16, SMALL, 32, 2, f=2)),       # two fields a program, split-K, ragged K
    (40, (16,), 160, _tc(16, SMALL, 32, 5, f=1)),           # one field a program, split over 5
    (70, (6, 2), 64, None),                                 # the default block shapes
]


@pytest.mark.parametrize("M,segs,K,cfg", CASES)
def test_gemm_tc_exact(M, segs, K, cfg):
    _check(M, segs, K, cfg)


def test_unpack_every_byte_value():
    """All 256 byte values (code 3 too, which the format never writes): the kernel's signed unpack
    of field j is ((b >> 2j) & 3) - 1, as ``quant.unpack_hf``."""
    gen = torch.Generator().manual_seed(7)
    M, K = 16, 256
    w = torch.randint(0, 256, (16, K), generator=gen, dtype=torch.uint8)
    w[0] = torch.arange(256, dtype=torch.uint8)
    x_q = torch.randint(-128, 128, (M, K), generator=gen, dtype=torch.int8)
    acc = x_q.long() @ quant.unpack_hf(w).long().t()
    y = w2a8.w2a8_linear(x_q.to(DEV), torch.ones(M, device=DEV), w.to(DEV), torch.ones(1, device=DEV),
                         (16,), out_dtype=torch.float32, config=_tc(16, SMALL, 64, 1))
    assert torch.equal(y.cpu().long(), acc)


def test_config_table_and_buckets():
    assert [gemm_tc.m_bucket(m) for m in (5, 16, 17, 64, 65, 300, 512, 513, 4096)] == \
        [16, 16, 32, 64, 128, 512, 512, 2048, 2048]
    for M, R, K in ((8, 960, 2560), (64, 640, 6912), (2048, 3456, 2560), (300, 640, 2560)):
        cfg = gemm_tc.tc_config(M, R, K)
        assert cfg["kind"] == "tc" and cfg["BR"] % 64 == 0 and cfg["BM"] >= 16 and cfg["F"] in (1, 2, 4)
        assert cfg["SPLIT_K"] >= 1 and K // cfg["BK"] >= cfg["SPLIT_K"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("M", [8, 16, 40, 64, 100, 2048])
@pytest.mark.parametrize("segs,K", [((640, 160, 160), 2560), ((640,), 2560), ((1728, 1728), 2560),
                                    ((640,), 6912)])
def test_gemm_tc_2b4t_shapes(M, segs, K):
    _check(M, segs, K, gemm_tc.tc_config(M, sum(segs), K))
