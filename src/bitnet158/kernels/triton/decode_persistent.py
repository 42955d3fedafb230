"""Batch-1 decode, one persistent kernel a layer: its stages separated by grid-wide barriers.

The 9-kernel step spends most of a token in latency: each kernel ramps up, waits for the one
before it, reads its input row and drains. Here a layer is one launch of ``NPROG`` programs (at
most one an SM, so all of them are resident at once), which run the layer's five stages in turn:

    S0  h = x (+ d); every program: input_layernorm + int8 quant of h (recomputed, the row is
        2560 wide), then its tiles of the fused q|k|v GEMV               -> qkv
    S1  attention: (KV head, cache chunk) items spread over the programs (RoPE, cache write,
        partial softmax); the last chunk of a KV head to finish merges its GQA group -> o
    S2  every program: attn_sub_norm + quant of o; its tiles of o_proj   -> d
    S3  h = x + d; every program: post_attention_layernorm + quant; its tiles of gate|up -> gu
    S4  every program: relu(g)^2 * u, ffn_sub_norm + quant; its tiles of down_proj -> d

Between two stages every program arrives at a barrier (a per-layer atomic counter: stage s is
open once it reaches ``s * NPROG``) and, before it waits, loads what the next stage reads that
no program of this layer writes: its first weight tile, the norm weight, the first cache tile of
its attention item. The barrier's latency overlaps those loads, as programmatic dependent launch
overlaps the next layer's first tile with this layer's last stage. The residual row ping-pongs
between ``x0`` and ``x1`` (program 0 stores ``h``; every program reads the other buffer):
a layer reads x0 and d (the first layer: the embedding row in x1) and leaves x in x0 and the
down projection's output in d.

Options of ``config`` (measured on an H100, docs/gpu-engine.md): ``num_warps`` (16 timed faster
than 8), ``split`` (each stage its own launch with PDL: faster than one launch, slower than the
9-kernel step), ``SPIN`` (how the barrier polls: 0.91-0.96 us a barrier either way),
``PREFETCH`` (bulk L2 prefetch of this layer's (1) or the next layer's (2) weights: 2 was
slower, 1 has not been timed; with every weight L2-resident the step gains only 16 %, so the
stages are not waiting on DRAM).

Numerics are those of the unfused step (``decode_layer._prologue`` and ``_masked_fields`` are
the fused step's norm + quant and GEMV, ``attention._chunk_merge`` the one-kernel attention), so
only the order of fp32 sums can differ from it.

Under ``TRITON_INTERPRET=1`` programs run one after another and a barrier would never open, so
there each stage is its own launch (``FIRST == LAST``); the tests check the stages that way, and
on a GPU the whole layer in one launch against them.

    step = PersistentStep(runner)            # buffers for a TritonRunner's model (batch 1)
    logits = step(tok, pos, rows)            # one decode step: [1] -> float32 [1, V]

Tests: ``tests/kernels/test_decode_persistent.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import _chunk_merge
from .common import INTERPRET, PDL, cdiv, gdc_launch_dependents, gdc_wait, next_pow2, sm_count
from .decode_layer import _masked_fields, _pack_row, _prologue

_pdl = dict(launch_pdl=True) if PDL else {}


@triton.jit
def _grid_sync(bar_ptr, target, SPIN: tl.constexpr):
    """Arrive at the layer's counter and wait until ``target`` programs have arrived. The arrivals
    are release read-modify-writes; the wait polls with acquire loads (``SPIN`` 1: polling
    read-modify-writes would queue behind the arrivals at the counter's L2 slice) or with acquire
    atomics (``SPIN`` 0). Either way it ends on an acquire that read the last arrival, which
    orders every program's stores before the barrier with every load after it."""
    tl.debug_barrier()                                  # this program's warps are done storing
    n = tl.atomic_add(bar_ptr, 1, sem="acq_rel") + 1
    if SPIN == 1:
        while n < target:
            n = tl.inline_asm_elementwise("ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [bar_ptr],
                                          dtype=tl.int32, is_pure=False, pack=1)
    elif SPIN == 2:
        # thread 0 polls alone (the others leave the loop at once and wait at the CTA barrier
        # below, which orders their loads after its acquire): 1 poller an SM instead of 256
        while n < target:
            n = tl.inline_asm_elementwise(
                "{ .reg .pred p; .reg .u32 t; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0; "
                "@p ld.acquire.gpu.global.b32 $0, [$1]; @!p mov.b32 $0, $2; }",
                "=r,l,r", [bar_ptr, target], dtype=tl.int32, is_pure=False, pack=1)
    else:
        while n < target:
            n = tl.atomic_add(bar_ptr, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def _prefetch_l2(w_ptr, NBYTES: tl.constexpr, pid, NPROG: tl.constexpr, N: tl.constexpr):
    """Ask L2 for this program's share (1/NPROG) of the NBYTES at w_ptr: N consecutive pieces, a
    bulk prefetch each (sm_90 ``cp.async.bulk.prefetch.L2``: asynchronous, nothing waits on it).
    Pieces are multiples of 16 bytes at 16-byte offsets; a last partial 16 bytes is left out."""
    PIECE: tl.constexpr = (NBYTES + NPROG * N * 16 - 1) // (NPROG * N * 16) * 16
    start = (pid * N + tl.arange(0, N)) * PIECE
    size = tl.maximum(tl.minimum(NBYTES - start, PIECE), 0) // 16 * 16
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [w_ptr.to(tl.pointer_type(tl.uint8)) + start, size], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_layer(pq_ptr, po_ptr, pgu_ptr, pd_ptr, pid, NQ: tl.constexpr, NO: tl.constexpr,
                    NGU: tl.constexpr, ND: tl.constexpr, NPROG: tl.constexpr, N: tl.constexpr):
    """This program's share of a layer's packed weights (byte sizes NQ, NO, NGU, ND; 0: skip)."""
    if NQ > 0:
        _prefetch_l2(pq_ptr, NQ, pid, NPROG, N)
    _prefetch_l2(po_ptr, NO, pid, NPROG, N)
    _prefetch_l2(pgu_ptr, NGU, pid, NPROG, N)
    _prefetch_l2(pd_ptr, ND, pid, NPROG, N)


@triton.jit
def _tile(w_ptr, t, K4: tl.constexpr, R: tl.constexpr, BR: tl.constexpr, BK4: tl.constexpr):
    """Packed int32 weights of tile t: rows t*BR .. t*BR+BR-1 of [R, K4] -> [BR, BK4] (0 outside)."""
    rows = t * BR + tl.arange(0, BR)
    k0 = tl.arange(0, BK4)
    return tl.load(w_ptr + rows[:, None] * K4 + k0[None, :], mask=(rows < R)[:, None] & (k0 < K4)[None, :],
                   other=0)


@triton.jit
def _norm_w(nw_ptr, K: tl.constexpr, BK4: tl.constexpr):
    offs = tl.arange(0, 4 * BK4)
    return tl.load(nw_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)


@triton.jit
def _row_gemv(a_ptr, d_ptr, h_ptr, nw, w0, w_ptr, g_ptr, out_ptr, pid, eps, K: tl.constexpr,
              R: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, BR: tl.constexpr, BK4: tl.constexpr,
              TILES: tl.constexpr, NPROG: tl.constexpr, MODE: tl.constexpr, STORE_H: tl.constexpr,
              INTERP: tl.constexpr):
    """Norm + quant of the row (``decode_layer._prologue`` mode MODE, norm weight nw), then this
    program's tiles pid, pid + NPROG, ... of the packed [R, K/4] int32 weights (tile pid: w0,
    loaded already; each next tile is loaded before the current one is multiplied)."""
    offs = tl.arange(0, 4 * BK4)
    q, s = _prologue(a_ptr, d_ptr, h_ptr, nw, 0, 0, 0, 0, K, offs, offs < K, pid == 0, eps, MODE, STORE_H,
                     INTERP)
    xb, sumx = _pack_row(q, BK4)
    w = w0
    for j in tl.static_range(TILES):
        t = pid + j * NPROG
        if j + 1 < TILES:
            w_next = _tile(w_ptr, t + NPROG, K // 4, R, BR, BK4)
        rows = t * BR + tl.arange(0, BR)
        _masked_fields(w, xb, sumx, s, rows, rows < R, P1, P2, R, g_ptr, out_ptr, INTERP)
        if j + 1 < TILES:
            w = w_next


@triton.jit
def _kv_first(kc_ptr, vc_ptr, sc_b, sc_h, sc_s, row, pos, item, n_items, HKV: tl.constexpr, D: tl.constexpr,
              CHUNK: tl.constexpr, BLOCK_N: tl.constexpr):
    """The older slots (< pos: written by earlier steps) of the first tile of attention item
    ``item`` (KV head item % HKV, chunk item // HKV) -> k0, v0 [BLOCK_N, D]."""
    g = item % HKV
    n0 = (item // HKV) * CHUNK + tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    m = ((n0 < pos) & (item < n_items))[:, None]
    base = row * sc_b + g * sc_h + n0[:, None] * sc_s + d[None, :]
    return tl.load(kc_ptr + base, mask=m, other=0.0), tl.load(vc_ptr + base, mask=m, other=0.0)


@triton.jit
def _attention(qkv_ptr, o_ptr, kc_ptr, vc_ptr, sc_b, sc_h, sc_s, row, pos, cos_ptr, sin_ptr, po_ptr, pml_ptr,
               gcnt_ptr, scale, k0, v0, pid, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
               GROUP: tl.constexpr, GP: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
               NCH: tl.constexpr, NCHP: tl.constexpr, ITEMS: tl.constexpr, NPROG: tl.constexpr,
               IEEE: tl.constexpr, INTERP: tl.constexpr):
    """This program's attention items pid, pid + NPROG, ... of the HKV * (pos // CHUNK + 1) active
    ones (item pid's first tile: k0, v0, loaded already)."""
    n_items = HKV * (pos // CHUNK + 1)
    d = tl.arange(0, D)
    dt = kc_ptr.dtype.element_ty
    for j in tl.static_range(ITEMS):
        item = pid + j * NPROG
        if item < n_items:
            if j > 0:
                k0, v0 = _kv_first(kc_ptr, vc_ptr, sc_b, sc_h, sc_s, row, pos, item, n_items, HKV, D, CHUNK,
                                   BLOCK_N)
            g = item % HKV
            c = item // HKV
            _chunk_merge(qkv_ptr, kc_ptr + row * sc_b + g * sc_h, vc_ptr + row * sc_b + g * sc_h, sc_s, g, c,
                         pos, c * CHUNK, d, k0, v0, cos_ptr, sin_ptr, po_ptr, pml_ptr, gcnt_ptr + g, o_ptr, 0,
                         scale, H, HKV, D, GROUP, GP, CHUNK, BLOCK_N, NCH, NCHP, dt, IEEE, INTERP)


@triton.jit
def _layer(x0_ptr, x1_ptr, d_ptr, qkv_ptr, o_ptr, gu_ptr,
           wqkv_ptr, gqkv_ptr, wo_ptr, go_ptr, wgu_ptr, ggu_ptr, wd_ptr, gd_ptr,
           nin_ptr, nattn_ptr, npost_ptr, nffn_ptr,
           kc_ptr, vc_ptr, sc_b, sc_h, sc_s, rows_ptr, pos_ptr, cos_ptr, sin_ptr, po_ptr, pml_ptr, gcnt_ptr,
           bar_ptr, pfq_ptr, pfo_ptr, pfgu_ptr, pfd_ptr, scale, eps,
           HID: tl.constexpr, FFN: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
           GROUP: tl.constexpr, GP: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
           NCH: tl.constexpr, NCHP: tl.constexpr, ITEMS: tl.constexpr,
           BR_QKV: tl.constexpr, BR_O: tl.constexpr, BR_GU: tl.constexpr, BR_DOWN: tl.constexpr,
           T_QKV: tl.constexpr, T_O: tl.constexpr, T_GU: tl.constexpr, T_DOWN: tl.constexpr,
           BKH: tl.constexpr, BKF: tl.constexpr, NPROG: tl.constexpr, SPIN: tl.constexpr,
           PREFETCH: tl.constexpr, PF_N: tl.constexpr, HAS_D: tl.constexpr,
           FIRST: tl.constexpr, LAST: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
           INTERP: tl.constexpr):
    """Stages FIRST..LAST of one layer (module docstring) for the row at rows[0], pos[0]."""
    pid = tl.program_id(0)
    R_QKV: tl.constexpr = (H + 2 * HKV) * D // 4
    R_O: tl.constexpr = HID // 4
    R_GU: tl.constexpr = FFN // 2
    row = tl.load(rows_ptr)                          # host-written before the step: safe pre-wait
    pos = tl.load(pos_ptr)
    n_items = HKV * (pos // CHUNK + 1)
    # weights into L2 before the wait (PREFETCH 1: this layer's o, gate|up, down; 2: all of the
    # next layer's), so that the stages find them in L2 (measured slower: module docstring)
    if FIRST == 0 and PREFETCH > 0 and not INTERP:
        NQ: tl.constexpr = 0 if PREFETCH == 1 else R_QKV * HID
        _prefetch_layer(pfq_ptr, pfo_ptr, pfgu_ptr, pfd_ptr, pid, NQ, R_O * HID, R_GU * HID, R_O * FFN, NPROG, PF_N)
    # what stage FIRST reads that no kernel of this step writes, before the wait
    if FIRST == 0:
        w_a = _tile(wqkv_ptr, pid, HID // 4, R_QKV, BR_QKV, BKH)
        nw_a = _norm_w(nin_ptr, HID, BKH)
    elif FIRST == 1:
        k0, v0 = _kv_first(kc_ptr, vc_ptr, sc_b, sc_h, sc_s, row, pos, pid, n_items, HKV, D, CHUNK, BLOCK_N)
    elif FIRST == 2:
        w_a = _tile(wo_ptr, pid, HID // 4, R_O, BR_O, BKH)
        nw_a = _norm_w(nattn_ptr, HID, BKH)
    elif FIRST == 3:
        w_a = _tile(wgu_ptr, pid, HID // 4, R_GU, BR_GU, BKH)
        nw_a = _norm_w(npost_ptr, HID, BKH)
    else:
        w_a = _tile(wd_ptr, pid, FFN // 4, R_O, BR_DOWN, BKF)
        nw_a = _norm_w(nffn_ptr, FFN, BKF)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    if FIRST <= 0 and LAST >= 0:                    # S0: q|k|v of (x + d), h stored to x1
        if HAS_D:
            _row_gemv(x0_ptr, d_ptr, x1_ptr, nw_a, w_a, wqkv_ptr, gqkv_ptr, qkv_ptr, pid, eps, HID, R_QKV,
                      H * D // 4, (H + HKV) * D // 4, BR_QKV, BKH, T_QKV, NPROG, 1, True, INTERP)
        else:                                       # the first layer: the embedding row is in x1
            _row_gemv(x1_ptr, d_ptr, x1_ptr, nw_a, w_a, wqkv_ptr, gqkv_ptr, qkv_ptr, pid, eps, HID, R_QKV,
                      H * D // 4, (H + HKV) * D // 4, BR_QKV, BKH, T_QKV, NPROG, 0, False, INTERP)
        if LAST > 0:
            k0, v0 = _kv_first(kc_ptr, vc_ptr, sc_b, sc_h, sc_s, row, pos, pid, n_items, HKV, D, CHUNK,
                               BLOCK_N)
            _grid_sync(bar_ptr, NPROG, SPIN)
    if FIRST <= 1 and LAST >= 1:                    # S1: attention -> o
        _attention(qkv_ptr, o_ptr, kc_ptr, vc_ptr, sc_b, sc_h, sc_s, row, pos, cos_ptr, sin_ptr, po_ptr, pml_ptr,
                   gcnt_ptr, scale, k0, v0, pid, H, HKV, D, GROUP, GP, CHUNK, BLOCK_N, NCH, NCHP, ITEMS, NPROG,
                   IEEE, INTERP)
        if LAST > 1:
            w_a = _tile(wo_ptr, pid, HID // 4, R_O, BR_O, BKH)
            nw_a = _norm_w(nattn_ptr, HID, BKH)
            _grid_sync(bar_ptr, 2 * NPROG, SPIN)
    if FIRST <= 2 and LAST >= 2:                    # S2: d = o_proj(attn_sub_norm(o))
        _row_gemv(o_ptr, o_ptr, o_ptr, nw_a, w_a, wo_ptr, go_ptr, d_ptr, pid, eps, HID, R_O, R_O, R_O,
                  BR_O, BKH, T_O, NPROG, 0, False, INTERP)
        if LAST > 2:
            w_a = _tile(wgu_ptr, pid, HID // 4, R_GU, BR_GU, BKH)
            nw_a = _norm_w(npost_ptr, HID, BKH)
            _grid_sync(bar_ptr, 3 * NPROG, SPIN)
    if FIRST <= 3 and LAST >= 3:                    # S3: gu = gate|up(x + d)
        _row_gemv(x1_ptr, d_ptr, x0_ptr, nw_a, w_a, wgu_ptr, ggu_ptr, gu_ptr, pid, eps, HID, R_GU, FFN // 4,
                  R_GU, BR_GU, BKH, T_GU, NPROG, 1, True, INTERP)
        if LAST > 3:
            w_a = _tile(wd_ptr, pid, FFN // 4, R_O, BR_DOWN, BKF)
            nw_a = _norm_w(nffn_ptr, FFN, BKF)
            _grid_sync(bar_ptr, 4 * NPROG, SPIN)
    if FIRST <= 4 and LAST >= 4:                    # S4: d = down(ffn_sub_norm(relu(g)^2 * u))
        _row_gemv(gu_ptr, gu_ptr, gu_ptr, nw_a, w_a, wd_ptr, gd_ptr, d_ptr, pid, eps, FFN, R_O, R_O, R_O,
                  BR_DOWN, BKF, T_DOWN, NPROG, 2, False, INTERP)


@triton.jit
def _sync_chain(bar_ptr, N: tl.constexpr, NPROG: tl.constexpr, SPIN: tl.constexpr):
    """N grid barriers in a row (bench/gpu_persistent.py times one barrier with it)."""
    for i in range(N):
        _grid_sync(bar_ptr, (i + 1) * NPROG, SPIN)


# packed rows a tile per projection, warps a program: chosen for 132 programs at 2B4T shapes
# (q|k|v 960 packed rows in 120 tiles, o 640 in 80, gate|up 3456 in 216, down 640 in 160);
# SPIN / PREFETCH: see the module docstring. 16 warps timed faster (ctx 1024: 2.29-2.34 against
# 2.61-2.67 ms, three calls) but its logits have not been checked on a GPU, so 8 stays the default
DEFAULT_CONFIG = dict(BR_QKV=8, BR_O=8, BR_GU=16, BR_DOWN=4, SPIN=1, PREFETCH=0, num_warps=8)


class PersistentStep:
    """One batch-1 decode step of a :class:`~.runner.TritonRunner`: the embedding row, one
    ``_layer`` launch a layer (five launches a layer under the interpreter), the final norm and
    head. Buffers are the runner's (cache, attention partials) plus the rows between stages."""

    def __init__(self, runner, nprog: int | None = None, config: dict | None = None):
        if runner.mode != "w2a8":
            raise ValueError("persistent decode step: needs the W2A8 runner (linear='w2a8')")
        cfg = runner.cfg
        self.r = runner
        dev, dt = runner.device, runner.dtype
        self.hid, self.ffn = cfg.hidden_size, cfg.intermediate_size
        if self.hid % 4 or self.ffn % 4:
            raise ValueError(f"persistent decode step: hidden {self.hid} / intermediate {self.ffn} "
                             f"sizes must be multiples of 4")
        if nprog is None:
            nprog = sm_count(dev) if dev.type == "cuda" else 3
        if dev.type == "cuda" and not 1 <= nprog <= sm_count(dev):
            # the barriers need every program resident at once: at most one an SM is guaranteed
            raise ValueError(f"persistent decode step: nprog={nprog} must be 1..{sm_count(dev)} (SMs)")
        self.nprog = nprog
        unknown = sorted(set(config or {}) - set(DEFAULT_CONFIG) - {"split"})
        if unknown:
            raise ValueError(f"persistent decode step: unknown config keys {unknown}; known: "
                             f"{sorted(DEFAULT_CONFIG)} and 'split'")
        self.config = dict(DEFAULT_CONFIG, **(config or {}))
        for key in ("SPIN", "PREFETCH"):
            if self.config[key] not in (0, 1, 2):
                raise ValueError(f"persistent decode step: config {key}={self.config[key]!r} is not 0, 1 or 2")
        cap = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else (9, 0)
        if self.config["PREFETCH"] and cap[0] < 9:
            # cp.async.bulk.prefetch.L2 is an sm_90 instruction: ptxas rejects it for older GPUs
            raise ValueError(f"persistent decode step: config PREFETCH={self.config['PREFETCH']} needs an "
                             f"sm_90 (Hopper) or newer GPU; this one is sm_{cap[0]}{cap[1]}")
        # each stage its own launch (PDL between them) instead of barriers: the interpreter's
        # way, and on a GPU a comparison for the one-launch layer
        self.split = bool(self.config.pop("split", False))
        H, HKV, D = runner.H, runner.HKV, runner.D
        self.qkv = torch.zeros((H + 2 * HKV) * D, dtype=dt, device=dev)
        self.o = torch.zeros(H * D, dtype=dt, device=dev)
        self.gu = torch.zeros(2 * self.ffn, dtype=dt, device=dev)
        self.d = torch.zeros(self.hid, dtype=dt, device=dev)
        self.x1 = torch.zeros(self.hid, dtype=dt, device=dev)
        # one barrier counter a layer, zeroed after the last layer of every step
        self.bar = torch.zeros(max(len(runner.layers), 1), dtype=torch.int32, device=dev)
        self.int_w = [{k: L[k].packed.view(torch.int32) for k in ("qkv", "o", "gu", "down")}
                      for L in runner.layers]

    def _consts(self, has_d: bool, first: int, last: int) -> dict:
        r, a, c = self.r, self.r.attn, self.config
        H, HKV, D = r.H, r.HKV, r.D
        rows = dict(QKV=(H + 2 * HKV) * D // 4, O=self.hid // 4, GU=self.ffn // 2, DOWN=self.hid // 4)
        tiles = {f"T_{k}": cdiv(cdiv(n, c[f"BR_{k}"]), self.nprog) for k, n in rows.items()}
        return dict(HID=self.hid, FFN=self.ffn, H=H, HKV=HKV, D=D, GROUP=a.group, GP=max(16, next_pow2(a.group)),
                    CHUNK=a.chunk, BLOCK_N=a.block_n, NCH=a.nch, NCHP=next_pow2(a.nch),
                    ITEMS=cdiv(HKV * a.nch, self.nprog), BR_QKV=c["BR_QKV"], BR_O=c["BR_O"], BR_GU=c["BR_GU"],
                    BR_DOWN=c["BR_DOWN"], BKH=next_pow2(self.hid // 4), BKF=next_pow2(self.ffn // 4),
                    NPROG=self.nprog, SPIN=c["SPIN"], PREFETCH=c["PREFETCH"], PF_N=32 * c["num_warps"],
                    HAS_D=has_d, FIRST=first, LAST=last,
                    IEEE=r.dtype == torch.float32, PDL=PDL, INTERP=INTERPRET, num_warps=c["num_warps"],
                    **tiles)

    def layer(self, i: int, x0: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, has_d: bool,
              stages: tuple[int, int] | None = None) -> None:
        """Layer i on the residual row x0 [hidden] (and self.d when ``has_d``): stages 0..4 in one
        launch, or each its own launch under the interpreter (``stages``: one range to run)."""
        r, L, W = self.r, self.r.layers[i], self.int_w[i]
        # the weights PREFETCH asks L2 for: this layer's (1) or the next one's (2; the last layer: its own)
        P = self.int_w[i + 1] if self.config["PREFETCH"] == 2 and i + 1 < len(self.int_w) else W
        kc, vc = r.k_cache[i], r.v_cache[i]
        split = INTERPRET or self.split
        ranges = [stages] if stages else ([(s, s) for s in range(5)] if split else [(0, 4)])
        for first, last in ranges:
            _layer[(self.nprog,)](
                x0, self.x1, self.d, self.qkv, self.o, self.gu,
                W["qkv"], L["qkv"].gammas, W["o"], L["o"].gammas, W["gu"], L["gu"].gammas, W["down"],
                L["down"].gammas, L["in_norm"], L["attn_norm"], L["post_norm"], L["ffn_norm"],
                kc, vc, kc.stride(0), kc.stride(1), kc.stride(2), rows, pos, r.cos, r.sin, r.attn.po,
                r.attn.pml, r.attn.gcnt, self.bar[i:], P["qkv"], P["o"], P["gu"], P["down"], r.D ** -0.5, r.eps,
                **self._consts(has_d, first, last), **_pdl)

    def __call__(self, tok: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor, out=None) -> torch.Tensor:
        """tok long [1], pos / rows int32 [1] (device buffers) -> float32 logits [1, V] (in ``out``
        when given)."""
        r = self.r
        x0 = r.x_buf[0]
        self.x1.copy_(torch.nn.functional.embedding(tok, r.embed)[0])
        for i in range(len(r.layers)):
            self.layer(i, x0, rows, pos, has_d=i > 0)
        self.bar.zero_()
        return r._head(r.x_buf[:1], self.d[None], out)


__all__ = ["PersistentStep", "DEFAULT_CONFIG"]
