"""The prefill W2A8 GEMM (:mod:`bitnet158.kernels.triton.gemm_i8`) against the exact reference.

On CPU the kernels run under ``TRITON_INTERPRET=1`` on small awkward shapes: 1-3 segments, K not a
multiple of the K tile (masked), M and N not multiples of their tiles (masked loads and
stores), several program groups. On CUDA the same cases run compiled, plus every 2B4T projection
shape at prefill row counts (bit-exact, and equal to the register-operand kernel of
:mod:`.gemm_tc`).

    python3 -m pytest -q tests/kernels/test_gemm_i8.py
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from bitnet158 import quant  # noqa: E402
from bitnet158.kernels.triton import common, gemm_i8, gemm_tc, w2a8  # noqa: E402
from w2a8_cases import check_linear, segmented as _segmented  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and not common.INTERPRET:
    pytest.skip("Triton kernels were imported before TRITON_INTERPRET=1 was set", allow_module_level=True)


def _i8(bm, bn, bk, gm=2, nw=4, ns=2, tma=False, nprog=0):
    cfg = dict(kind="i8", BM=bm, BN=bn, BK=bk, GROUP_M=gm, num_warps=nw, num_stages=ns)
    if tma:
        cfg.update(TMA=True, NPROG=nprog, WS=False)
    return cfg


def _check(M, segs, K, cfg, seed=0):
    return check_linear(w2a8.w2a8_linear, M, segs, K, DEV, cfg, seed)


# compiled (sm_90 wgmma) tiles are 64 rows and 32 K at least; the interpreter takes 16
T = 16 if common.INTERPRET else 64
CASES = [  # (M, segments, K, config)
    (9, (16,), 64, _i8(T, T, 32)),                        # one tile, M masked
    (20, (3, 5, 9), 100, _i8(T, T, 32)),                  # 3 unaligned segments, ragged K
    (37, (16, 16), 128, _i8(T, 2 * T, 64, gm=1)),         # several row tiles, wide columns
    (5, (4,), 36, _i8(T, T, 32)),                         # K not a multiple of 4 (or of BK)
    (70, (6, 2, 8), 96, _i8(T, T, 32, gm=3)),             # a short last group, 3 segments
]


@pytest.mark.parametrize("M,segs,K,cfg", CASES)
def test_gemm_i8_exact(M, segs, K, cfg):
    _check(M, segs, K, cfg)


# the descriptor (TMA) kernel needs 16-byte rows: K % 16 == 0; its loads zero-fill past M, N and K
TMA_CASES = [
    (9, (16,), 64, _i8(T, T, 32, tma=True)),                          # one tile, M past the end
    (20, (3, 5, 9), 112, _i8(T, T, 32, tma=True)),                    # 3 unaligned segments, K % BK != 0
    (37, (16, 16), 128, _i8(T, 2 * T, 64, gm=1, tma=True)),           # several row tiles, wide columns
    (70, (6, 2, 8), 96, _i8(T, T, 32, gm=3, tma=True, nprog=2)),      # persistent: 2 programs, 5x4 tiles
    (37, (3, 5, 9), 48, _i8(T, T, 32, tma=True, nprog=-1)),           # persistent, one program an SM
]


class _Forbidden:
    """Stands in for a kernel that must not be launched."""

    def __init__(self, name):
        self.name = name

    def __getitem__(self, grid):
        raise AssertionError(f"{self.name} was launched")


@pytest.fixture
def descriptor_only(monkeypatch):
    """Fails a test whose descriptor config would fall back to the pointer kernel."""
    monkeypatch.setattr(gemm_i8, "_i8_gemm_scaled", _Forbidden("the pointer kernel"))


@pytest.mark.parametrize("M,segs,K,cfg", TMA_CASES)
def test_gemm_i8_descriptor_exact(M, segs, K, cfg, monkeypatch):
    pointer = {k: v for k, v in cfg.items() if k not in ("TMA", "NPROG", "WS")}
    y_ptr = _check(M, segs, K, pointer)
    monkeypatch.setattr(gemm_i8, "_i8_gemm_scaled", _Forbidden("the pointer kernel"))
    assert torch.equal(_check(M, segs, K, cfg), y_ptr)


def test_descriptor_kernel_strided_rows(descriptor_only):
    """Activation rows that are a view into a wider buffer (row stride 80 > K = 48): the descriptor
    takes the stride, and the result equals the contiguous one."""
    gen = torch.Generator().manual_seed(7)
    segs, K, M = (3, 5), 48, 21
    w, g, _ = _segmented(segs, K, gen)
    wide = torch.randint(-128, 128, (M, 80), generator=gen, dtype=torch.int8)
    s = torch.rand(M, generator=gen) * 50 + 1
    cfg = _i8(T, T, 32, tma=True)
    args = (s.to(DEV), w.to(DEV), g.to(DEV), segs)
    y_view = w2a8.w2a8_linear(wide.to(DEV)[:, 16:16 + K], *args, config=cfg)
    y_cont = w2a8.w2a8_linear(wide[:, 16:16 + K].contiguous().to(DEV), *args, config=cfg)
    assert torch.equal(y_view, y_cont)


def test_descriptor_kernel_needs_aligned_rows(monkeypatch):
    """K = 36 (rows of 36 bytes): no descriptor can describe it, the pointer kernel runs instead."""
    monkeypatch.setattr(gemm_i8, "_i8_gemm_desc", _Forbidden("the descriptor kernel"))
    _check(5, (4,), 36, _i8(T, T, 32, tma=True))


def test_i8_dict_rejects_a_malformed_entry():
    with pytest.raises(ValueError, match="7 fields"):
        gemm_i8.i8_dict((128, 256, 128, 8, 8, 3, 1))


def test_i8_dict_fields():
    assert gemm_i8.i8_dict((128, 256, 128, 8, 8, 3)) == _i8(128, 256, 128, 8, 8, 3)
    assert gemm_i8.i8_dict((128, 256, 128, 8, 8, 3, 1, -1, 0)) == _i8(128, 256, 128, 8, 8, 3, tma=True, nprog=-1)


def test_unpack_every_byte_value():
    """All 256 byte values (code 3 too, which the format never writes) unpack as ``quant.unpack_hf``,
    each field to its output row."""
    w = torch.arange(256, dtype=torch.uint8).reshape(4, 64)
    w8 = gemm_i8.unpack_i8(w.to(DEV), 4, 4)
    assert torch.equal(w8.cpu(), quant.unpack_hf(w))


def test_unpack_segments_in_output_order():
    gen = torch.Generator().manual_seed(3)
    w, _, w_ts = _segmented((3, 5), 40, gen)
    w8 = gemm_i8.unpack_i8(w.to(DEV), 3, 8)
    assert torch.equal(w8.cpu(), torch.cat(w_ts))


def test_config_rule():
    for M, N, K in ((2048, 3840, 2560), (600, 2560, 6912)):
        cfg = gemm_i8.i8_config(M, N, K)
        assert cfg["kind"] == "i8" and cfg["BM"] >= 64 and cfg["BN"] >= 64 and cfg["BK"] >= 32


def test_pick_config_switches_at_threshold(monkeypatch):
    monkeypatch.setattr(w2a8, "I8_MIN_M", 512)
    assert w2a8.pick_config(511, 640, 2560)["kind"] == "tc"
    assert w2a8.pick_config(512, 640, 2560)["kind"] == "i8"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("M", [300, 2048])
@pytest.mark.parametrize("segs,K", [((640, 160, 160), 2560), ((640,), 2560), ((1728, 1728), 2560),
                                    ((640,), 6912)])
@pytest.mark.parametrize("cfg", [None, (128, 256, 128, 8, 8, 3, 1, 0, 0), (128, 128, 128, 8, 8, 4, 1, -1, 0)],
                         ids=["table", "tma", "tma_persistent"])
def test_gemm_i8_2b4t_shapes(M, segs, K, cfg):
    y = _check(M, segs, K, gemm_i8.i8_config(M, 4 * sum(segs), K) if cfg is None else gemm_i8.i8_dict(cfg))
    gen = torch.Generator().manual_seed(M * 131 + K)
    w, g, _ = _segmented(segs, K, gen)
    x_q = torch.randint(-128, 128, (M, K), generator=gen, dtype=torch.int8)
    s = torch.rand(M, generator=gen) * 50 + 1
    y_tc = w2a8.w2a8_linear(x_q.cuda(), s.cuda(), w.cuda(), g.cuda(), segs,
                            config=gemm_tc.tc_config(M, sum(segs), K))
    assert torch.equal(y, y_tc)


def test_persistent_config_fits_shared_memory():
    """The table's persistent gate|up tile fits with a bf16 output and not with fp32 (the sm_90
    compile needs 278552 bytes of 232448): an fp32 output runs it one tile a program."""
    cfg = gemm_i8.i8_config(2048, 13824, 2560)
    assert cfg["NPROG"] == -1
    assert gemm_i8.persistent_fits(cfg, 2)
    assert not gemm_i8.persistent_fits(cfg, 4)
