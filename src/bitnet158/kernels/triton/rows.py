"""Row reductions of the GPU sampler, float32 [n, V]: softmax, argmax and top-p's boundary.

    p = softmax(x)                 # x [n, V] -> [n, V]
    i = argmax(x)                  # x [n, V] -> long [n]: the first index of the maximum (NaN the maximum)
    t = race(probs, state)         # probs [n, V], state int64 [n, 2] (key, draw) -> long [n], drawn
    k = first_reaching(ps, p)      # ps [n, V] (probabilities, most likely first) -> long [n]
    v = top_p_last(x, probs, p)    # x, probs [n, V] -> [n]: the last logit top-p keeps, no sort
    t = race_top_p(x, probs, p, state)  # -> long [n]: race's winner among the tokens top-p keeps

Each row is cut into ``BLOCK``-element chunks, one program a (row, chunk), and the chunks' partial
results are combined in a fixed order (``tl.sum`` / ``tl.max`` trees over the padded chunk list).
So a row's floating-point result depends on the row and ``V`` only, never on how many rows run
together: a request drawn alone and the same request drawn in a batch of 64 get the same bits,
which torch's own reductions do not promise (``torch.cumsum`` of one row is cub's scan, of a
batch of rows another kernel). At batch 1 the 126 chunks of a 128256-logit row run on as many
SMs, where torch reduces a single row with one thread block (``torch.softmax`` 44 us,
``torch.argmax`` 28 us on an H100).

``race`` draws an id from each row by the exponential race (``argmax(p_i / q_i)`` with
``q_i ~ Exp(1)`` picks i with probability ``p_i / sum(p)``), its variates from Triton's Philox
keyed by the row's own key and draw number, computed where they are used: one launch for all
rows instead of one ``exponential_`` launch a row from each request's ``torch.Generator``. A
row's ids depend on its probabilities, key and draw number only.

``first_reaching`` is top-p's cut: the first position whose mass before it (the sum of every
probability ahead of it, exclusive) is not below ``p``, or ``V`` where none is: the length of the
leading run of positions kept. The mass before a
position is the chunk's prefix (the sum of the earlier chunks' sums) plus a scan of the chunk's
earlier elements; the first such position is taken with an integer ``atomic_min``, exact in any
order (the sampler's cut with ``sampling.SORTED_CUT``).

``top_p_last`` is the same cut without sorting the row (the sampler's default): the smallest
logit whose tokens have less than ``p`` of mass among larger logits, found 4 bits a round over the
logits' order-preserving 32-bit keys (each chunk's mass and count per digit among the keys that
agree with the row's prefix so far, folded in a fixed tree by the row's last program to finish;
the lowest digit whose mass of larger keys is below ``p`` extends the prefix).

``race_top_p`` is top-p's draw without the cut (the sampler's default): the race's winner over
the tokens above a candidate, accepted once the mass above it is below ``p`` (a round a launch,
usually two rounds; the cut digit by digit only for the rows left after ``NUCLEUS_ROUNDS``).

Tests: ``tests/kernels/test_triton_rows.py`` (interpreter on CPU, compiled on CUDA).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cdiv, next_pow2

BLOCK = 1024        # a program's slice of a row: 126 programs a row at V = 128256
WARPS = 4
# top-p's rounds (the cut's digits, the draw's rounds) can launch up to this many programs in all,
# each then looping over several chunks of its row (many rows: fewer programs a row), since most of
# these launches find their rows done and exit at once (64 rows, H100: the cut's 8 launches of 8064
# programs took 78 us after the draw's rounds); 0, the default: a program a chunk, the configuration
# timed on the GPU (the narrower launches are not timed yet)
ROUND_PROGRAMS = 0


def row_programs(n: int, nb: int) -> int:
    """Programs a row for top-p's rounds over n rows of nb chunks (the chunks' partials are kept
    per chunk and folded in chunk order, so a row's bits do not depend on it)."""
    return nb if ROUND_PROGRAMS <= 0 else max(1, min(nb, cdiv(ROUND_PROGRAMS, n)))


@triton.jit
def _load_chunk(x_ptr, V, other, BLOCK: tl.constexpr):
    """Program (row, c)'s chunk of row ``row`` of x [n, V]: (row, offsets, in-row mask, values)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < V
    return row, offs, ok, tl.load(x_ptr + row * V + offs, mask=ok, other=other)


@triton.jit
def _softmax_part(x_ptr, pm_ptr, ps_ptr, V, NB, BLOCK: tl.constexpr):
    """Chunk (row, c): its maximum m_c (NaN if it holds one) and sum of exp(x - m_c)."""
    row, offs, ok, x = _load_chunk(x_ptr, V, float("-inf"), BLOCK)
    c = tl.program_id(1)
    nan = x != x
    m = tl.max(tl.where(nan, float("-inf"), x), 0)
    m0 = tl.where(m == float("-inf"), 0.0, m)                    # a fully masked chunk sums to 0
    s = tl.sum(tl.where(ok & (x > float("-inf")), tl.exp(x - m0), 0.0), 0)
    m = tl.where(tl.max(nan.to(tl.int32), 0) > 0, float("nan"), m)
    tl.store(pm_ptr + row * NB + c, m)
    tl.store(ps_ptr + row * NB + c, s)


@triton.jit
def _softmax_out(x_ptr, pm_ptr, ps_ptr, out_ptr, V, NB, BLOCK: tl.constexpr, NBP: tl.constexpr):
    """Chunk (row, c) of exp(x - m) / s; every program folds the row's NB partials itself."""
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, NBP)
    pm = tl.load(pm_ptr + row * NB + j, mask=j < NB, other=float("-inf"))       # [NBP]
    ps = tl.load(ps_ptr + row * NB + j, mask=j < NB, other=0.0)
    nan = pm != pm
    m = tl.max(tl.where(nan, float("-inf"), pm), 0)
    m0 = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(tl.where(pm > float("-inf"), ps * tl.exp(pm - m0), 0.0), 0)
    m0 = tl.where(tl.max(nan.to(tl.int32), 0) > 0, float("nan"), m0)           # NaN anywhere: NaN row
    row, offs, ok, x = _load_chunk(x_ptr, V, float("-inf"), BLOCK)
    tl.store(out_ptr + row * V + offs, tl.exp(x - m0) / s, mask=ok)


@triton.jit
def _chunk_argmax(x, offs, ok):
    """A chunk's maximum and the first index holding it (NaN as the maximum: the first NaN)."""
    nan = ok & (x != x)
    first_nan = tl.min(tl.where(nan, offs, 2147483647), 0)
    m = tl.max(tl.where(nan | ~ok, float("-inf"), x), 0)
    first_max = tl.min(tl.where(ok & (x == m), offs, 2147483647), 0)
    has_nan = first_nan < 2147483647
    return tl.where(has_nan, float("nan"), m), tl.where(has_nan, first_nan, first_max)


@triton.jit
def _argmax_part(x_ptr, pv_ptr, pi_ptr, V, NB, BLOCK: tl.constexpr):
    """Chunk (row, c): its maximum and the first index holding it (the first NaN if any)."""
    row, offs, ok, x = _load_chunk(x_ptr, V, float("-inf"), BLOCK)
    v, i = _chunk_argmax(x, offs, ok)
    tl.store(pv_ptr + row * NB + tl.program_id(1), v)
    tl.store(pi_ptr + row * NB + tl.program_id(1), i)


@triton.jit
def _race_keys(p, st_ptr, row, offs):
    """The race's keys p / q of a chunk, q ~ Exp(1) from Philox keyed by the row's (key, draw):
    element i's variate is counter (i, draw) of stream key, whatever else runs."""
    key = tl.load(st_ptr + 2 * row)
    draw = tl.load(st_ptr + 2 * row + 1)
    r = tl.randint(key, (draw << 32) + offs.to(tl.int64))                     # uint32 [BLOCK]
    u = ((r >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)                 # 24 bits in (0, 1)
    return p / -tl.log(u)


@triton.jit
def _race_part(p_ptr, st_ptr, pv_ptr, pi_ptr, V, NB, BLOCK: tl.constexpr):
    """Chunk (row, c) of the exponential race argmax(p / q)."""
    row, offs, ok, p = _load_chunk(p_ptr, V, 0.0, BLOCK)
    v, i = _chunk_argmax(_race_keys(p, st_ptr, row, offs), offs, ok)
    tl.store(pv_ptr + row * NB + tl.program_id(1), v)
    tl.store(pi_ptr + row * NB + tl.program_id(1), i)


@triton.jit
def _fold_first_max(pv_ptr, pi_ptr, row, NB, NBP: tl.constexpr):
    """Row's chunk maxima folded: the first index of a NaN, else of the largest chunk maximum
    (indices are global, so the smallest of the tied ones is the first). Loads through L2 (a
    kernel's last program reads what the others stored)."""
    j = tl.arange(0, NBP)
    v = tl.load(pv_ptr + row * NB + j, mask=j < NB, other=float("-inf"), cache_modifier=".cg")
    i = tl.load(pi_ptr + row * NB + j, mask=j < NB, other=2147483647, cache_modifier=".cg")
    nan = v != v
    first_nan = tl.min(tl.where(nan, i, 2147483647), 0)
    m = tl.max(tl.where(nan, float("-inf"), v), 0)
    first_max = tl.min(tl.where((j < NB) & (v == m), i, 2147483647), 0)
    return tl.where(first_nan < 2147483647, first_nan, first_max).to(tl.int64)


@triton.jit
def _argmax_fold(pv_ptr, pi_ptr, out_ptr, NB, NBP: tl.constexpr):
    """Row: the index of its maximum from the chunks' (value, first index)."""
    row = tl.program_id(0).to(tl.int64)
    tl.store(out_ptr + row, _fold_first_max(pv_ptr, pi_ptr, row, NB, NBP))


@triton.jit
def _chunk_sum(x_ptr, cs_ptr, V, NB, BLOCK: tl.constexpr):
    """Chunk (row, c): the sum of its elements."""
    row, offs, ok, x = _load_chunk(x_ptr, V, 0.0, BLOCK)
    tl.store(cs_ptr + row * NB + tl.program_id(1), tl.sum(x, 0))


@triton.jit
def _first_reaching(x_ptr, cs_ptr, out_ptr, p, V, NB, BLOCK: tl.constexpr, NBP: tl.constexpr):
    """Chunk (row, c): the first position whose exclusive prefix sum reaches p, into out[row]
    by atomic_min (out starts at V)."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    j = tl.arange(0, NBP)
    before = tl.sum(tl.load(cs_ptr + row * NB + j, mask=j < c, other=0.0), 0)  # earlier chunks
    offs = c * BLOCK + tl.arange(0, BLOCK)
    prev = tl.load(x_ptr + row * V + offs - 1, mask=(offs > c * BLOCK) & (offs < V), other=0.0)
    mass = before + tl.cumsum(prev, 0)           # [BLOCK] exclusive: non-decreasing in the chunk
    hit = (offs < V) & ~(mass < p)               # NaN mass ends the run too, as on the CPU
    first = tl.min(tl.where(hit, offs, 2147483647), 0)
    if first < 2147483647:
        tl.atomic_min(out_ptr + row, first.to(tl.int64))


@triton.jit
def _order_keys(x):
    """float32 -> int64 keys in [0, 2^32) in the floats' order (negatives: every bit flipped;
    the rest: the sign bit set)."""
    b = x.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    return tl.where(b >= 0x80000000, b ^ 0xFFFFFFFF, b ^ 0x80000000)


@triton.jit
def _last_of_row(cnt_ptr, row, programs):
    """Whether this program is the last of its row's ``programs`` to finish (its stores before are
    visible to that one, which resets the counter when it is done)."""
    tl.debug_barrier()
    return tl.atomic_add(cnt_ptr + row, 1) == programs - 1      # acq_rel: our partials are visible


@triton.jit
def _round_chunk(x_ptr, p_ptr, row, k, V, NB, BLOCK: tl.constexpr):
    """This program's k-th chunk of its row in a round, c = its id + k * programs a row: (c, offsets,
    in-row mask, logits, probabilities); nothing is loaded for c past the row's last chunk."""
    c = tl.program_id(1) + k * tl.num_programs(1)
    offs = c * BLOCK + tl.arange(0, BLOCK)
    ok = (offs < V) & (c < NB)
    x = tl.load(x_ptr + row * V + offs, mask=ok, other=float("-inf"))
    return c, offs, ok, x, tl.load(p_ptr + row * V + offs, mask=ok, other=0.0)


@triton.jit
def _cut_round(x_ptr, p_ptr, st_ptr, dn_ptr, pm_ptr, pc_ptr, a_ptr, last_ptr, cnt_ptr, p, V, NB,
               SHIFT: tl.constexpr, BLOCK: tl.constexpr, NBP: tl.constexpr, CPP: tl.constexpr):
    """One 4-bit digit of top-p's cut. Grid (n, programs a row), each program some chunks of its row
    (``row_programs``). Chunk (row, c): among its logits whose key agrees with the
    row's prefix above bit SHIFT + 4, the probability mass and the count of each digit at SHIFT.
    The row's last program to finish folds the chunks' (a fixed tree): the lowest digit holding a
    logit whose mass of larger keys (the row's mass above the prefix plus the higher digits') is
    below p extends the prefix; after the last digit, the prefix's float into last[row]. Rows
    whose ``done`` flag is set exit at once."""
    row = tl.program_id(0).to(tl.int64)
    if tl.load(dn_ptr + row) == 0:
        prefix = tl.load(st_ptr + row)
        d = tl.arange(0, 16)
        for k in range(CPP):
            c, offs, ok, x, pr = _round_chunk(x_ptr, p_ptr, row, k, V, NB, BLOCK)
            if c < NB:
                key = _order_keys(x)
                match = ok & ((key >> (SHIFT + 4)) == (prefix >> (SHIFT + 4)))
                hit = match[None, :] & (((key >> SHIFT) & 15)[None, :] == d[:, None])  # [16, BLOCK]
                base = (row * NB + c) * 16
                tl.store(pm_ptr + base + d, tl.sum(tl.where(hit, pr[None, :], 0.0), 1))
                tl.store(pc_ptr + base + d, tl.sum(hit.to(tl.int32), 1))
        if _last_of_row(cnt_ptr, row, tl.num_programs(1)):
            tl.debug_barrier()
            j = tl.arange(0, NBP)
            idx = (row * NB + j[:, None]) * 16 + d[None, :]                                        # [NBP, 16]
            m = tl.sum(tl.load(pm_ptr + idx, mask=(j < NB)[:, None], other=0.0, cache_modifier=".cg"), 0)
            c = tl.sum(tl.load(pc_ptr + idx, mask=(j < NB)[:, None], other=0, cache_modifier=".cg"), 0)
            above = tl.load(a_ptr + row) + tl.sum(tl.where(d[None, :] > d[:, None], m[None, :], 0.0), 1)
            pick = tl.min(tl.where((c > 0) & (above < p), d, 16), 0)
            pick = tl.where(pick < 16, pick, tl.max(tl.where(c > 0, d, 0), 0))     # NaN mass: the top digit
            prefix = prefix | (pick.to(tl.int64) << SHIFT)
            tl.store(st_ptr + row, prefix)
            tl.store(a_ptr + row, tl.sum(tl.where(d == pick, above, 0.0), 0))
            if SHIFT == 0:
                bits = tl.where(prefix >= 0x80000000, prefix ^ 0x80000000, prefix ^ 0xFFFFFFFF)
                tl.store(last_ptr + row, bits.to(tl.int32).to(tl.float32, bitcast=True))
            tl.atomic_xchg(cnt_ptr + row, 0)                                 # ready for the next round


@triton.jit
def _nucleus_round(x_ptr, p_ptr, st_ptr, cand_ptr, dn_ptr, last_ptr, pm_ptr, pv_ptr, pi_ptr, cnt_ptr, out_ptr,
                   p, V, NB, FLOOR: tl.constexpr, BLOCK: tl.constexpr, NBP: tl.constexpr, CPP: tl.constexpr):
    """One round of top-p's draw. Grid (n, programs a row), each program some chunks of its row
    (``row_programs``). Chunk (row, c): the tokens whose logit is above the row's
    candidate's (all of them before the first candidate; FLOOR: at or above the cut ``last``),
    their probability mass and their race winner. The row's last program to finish folds them: if
    the mass above the candidate is below p, the candidate is the draw (done); else the race's
    winner above it is the next candidate (FLOOR: the winner is the draw). Rows whose ``done``
    flag is set exit at once."""
    row = tl.program_id(0).to(tl.int64)
    if tl.load(dn_ptr + row) == 0:
        cand = tl.load(cand_ptr + row)
        if FLOOR:
            t = tl.load(last_ptr + row)
        else:
            t = tl.load(x_ptr + row * V + tl.maximum(cand, 0))                 # the candidate's logit
        for k in range(CPP):
            c, offs, ok, x, pr = _round_chunk(x_ptr, p_ptr, row, k, V, NB, BLOCK)
            if c < NB:
                if FLOOR:
                    keep = ok & (x >= t)
                else:
                    keep = tl.where(cand < 0, ok, ok & (x > t))
                v, i = _chunk_argmax(tl.where(keep, _race_keys(pr, st_ptr, row, offs), -1.0), offs, ok)
                tl.store(pm_ptr + row * NB + c, tl.sum(tl.where(keep, pr, 0.0), 0))
                tl.store(pv_ptr + row * NB + c, v)
                tl.store(pi_ptr + row * NB + c, i)
        if _last_of_row(cnt_ptr, row, tl.num_programs(1)):
            tl.debug_barrier()
            j = tl.arange(0, NBP)
            mass = tl.sum(tl.load(pm_ptr + row * NB + j, mask=j < NB, other=0.0, cache_modifier=".cg"), 0)
            win = _fold_first_max(pv_ptr, pi_ptr, row, NB, NBP)
            if FLOOR:
                tl.store(out_ptr + row, win)
                tl.store(dn_ptr + row, 1)
            elif (cand >= 0).to(tl.int32) * (mass < p).to(tl.int32) > 0:
                tl.store(out_ptr + row, cand)
                tl.store(dn_ptr + row, 1)
            else:
                tl.store(cand_ptr + row, win)
            tl.atomic_xchg(cnt_ptr + row, 0)                                 # ready for the next round


def _rows2d(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dtype != torch.float32 or x.dim() not in (1, 2) or x.shape[-1] == 0:
        raise ValueError(f"rows.{name}: expected a float32 [V] or [n, V] tensor, got {x.dtype} {tuple(x.shape)}")
    return x.reshape(-1, x.shape[-1]).contiguous()


def softmax(x: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim of float32 x [V] or [n, V] (NaN anywhere in a row: a NaN row)."""
    x2 = _rows2d(x, "softmax")
    n, V = x2.shape
    nb = cdiv(V, BLOCK)
    pm = torch.empty(n, nb, dtype=torch.float32, device=x2.device)
    ps = torch.empty_like(pm)
    out = torch.empty_like(x2)
    _softmax_part[(n, nb)](x2, pm, ps, V, nb, BLOCK=BLOCK, num_warps=WARPS)
    _softmax_out[(n, nb)](x2, pm, ps, out, V, nb, BLOCK=BLOCK, NBP=next_pow2(nb), num_warps=WARPS)
    return out.view(x.shape)


def _fold_argmax(part, x2: torch.Tensor, *args) -> torch.Tensor:
    n, V = x2.shape
    nb = cdiv(V, BLOCK)
    pv = torch.empty(n, nb, dtype=torch.float32, device=x2.device)
    pi = torch.empty(n, nb, dtype=torch.int32, device=x2.device)
    out = torch.empty(n, dtype=torch.long, device=x2.device)
    part[(n, nb)](x2, *args, pv, pi, V, nb, BLOCK=BLOCK, num_warps=WARPS)
    _argmax_fold[(n,)](pv, pi, out, nb, NBP=next_pow2(nb), num_warps=WARPS)
    return out


def argmax(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax(x, dim=-1) of float32 x [V] -> long [1], [n, V] -> long [n]."""
    return _fold_argmax(_argmax_part, _rows2d(x, "argmax"))


def race(probs: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """One id drawn from each row of probs float32 [V] / [n, V] -> long [1] / [n]: the exponential
    race ``argmax(p_i / q_i)``, q_i ~ Exp(1), with row r's variates from Philox stream
    ``state[r, 0]`` at counters ``(i, state[r, 1])`` (state: int64 [n, 2], key and draw number)."""
    p2 = _rows2d(probs, "race")
    if state.dtype != torch.long or tuple(state.shape) != (p2.shape[0], 2):
        raise ValueError(f"rows.race: state must be int64 [{p2.shape[0]}, 2] (key, draw), got "
                         f"{state.dtype} {tuple(state.shape)}")
    return _fold_argmax(_race_part, p2, state.contiguous())


def first_reaching(ps: torch.Tensor, p: float) -> torch.Tensor:
    """ps float32 [V] or [n, V] -> long [1] or [n]: the first position whose mass before it
    reaches p, V where none does (with ps sorted most likely first: how many tokens top-p keeps)."""
    x2 = _rows2d(ps, "first_reaching")
    n, V = x2.shape
    nb = cdiv(V, BLOCK)
    cs = torch.empty(n, nb, dtype=torch.float32, device=x2.device)
    out = torch.full((n,), V, dtype=torch.long, device=x2.device)
    _chunk_sum[(n, nb)](x2, cs, V, nb, BLOCK=BLOCK, num_warps=WARPS)
    _first_reaching[(n, nb)](x2, cs, out, float(p), V, nb, BLOCK=BLOCK, NBP=next_pow2(nb), num_warps=WARPS)
    return out


def _cut(x2: torch.Tensor, p2: torch.Tensor, p: float, done: torch.Tensor) -> torch.Tensor:
    """The last logit top-p keeps in each row of x2 [n, V] whose ``done`` flag is 0 -> float32 [n]
    (rows already done: undefined): 8 launches, 4 bits each, each a pass over x."""
    n, V = x2.shape
    nb = cdiv(V, BLOCK)
    dev = x2.device
    pm = torch.empty(n, nb, 16, dtype=torch.float32, device=dev)
    pc = torch.empty(n, nb, 16, dtype=torch.int32, device=dev)
    prefix = torch.zeros(n, dtype=torch.long, device=dev)
    above = torch.zeros(n, dtype=torch.float32, device=dev)
    last = torch.empty(n, dtype=torch.float32, device=dev)
    cnt = torch.zeros(n, dtype=torch.int32, device=dev)
    g = row_programs(n, nb)
    for shift in range(28, -1, -4):
        _cut_round[(n, g)](x2, p2, prefix, done, pm, pc, above, last, cnt, float(p), V, nb, SHIFT=shift,
                           BLOCK=BLOCK, NBP=next_pow2(nb), CPP=cdiv(nb, g), num_warps=WARPS)
    return last


def _pair(x: torch.Tensor, probs: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    x2, p2 = _rows2d(x, name), _rows2d(probs, name)
    if p2.shape != x2.shape:
        raise ValueError(f"rows.{name}: probs {tuple(probs.shape)} must have the logits' shape {tuple(x.shape)}")
    return x2, p2


def top_p_last(x: torch.Tensor, probs: torch.Tensor, p: float) -> torch.Tensor:
    """Top-p's cut without a sort: logits x and their probabilities float32 [V] / [n, V] -> float32
    [1] / [n], the smallest logit whose tokens have less than p of mass among the larger logits
    (the last value top-p keeps; keep ``x >= last``). Found digit by digit, 4 bits a round over
    the logits' order-preserving 32-bit keys: 8 launches, each a pass over x."""
    x2, p2 = _pair(x, probs, "top_p_last")
    return _cut(x2, p2, p, torch.zeros(x2.shape[0], dtype=torch.int32, device=x2.device))


# rounds of the candidate test before the cut digit by digit (which then runs for the rows left)
NUCLEUS_ROUNDS = 3


def race_top_p(x: torch.Tensor, probs: torch.Tensor, p: float, state: torch.Tensor,
               last: torch.Tensor | None = None, rounds: int | None = None) -> torch.Tensor:
    """Top-p's draw without masking the row: logits x and their probabilities float32 [V] / [n, V],
    state int64 [n, 2] (key, draw) -> long [1] / [n], the race's winner among the tokens top-p
    keeps (``race`` over ``probs`` with every token below the cut at 0: the same keys).

    The winner is looked for first: the race over the whole row gives a candidate; if the mass of
    the tokens with larger logits is below p the candidate is in the nucleus, and since the
    nucleus is a subset of the row it wins there too; else every token at or below it is out, and
    the race over the tokens above it gives the next candidate. A candidate is drawn by its
    probability, so it fails with probability at most 1 - p (a round is one pass over the row,
    testing one candidate and racing the next). After ``rounds`` (``NUCLEUS_ROUNDS``) passes, the
    rows left find the cut digit by digit and race above it. With ``last`` (the cut, float32 [n],
    e.g. from a sort) the race is run above it at once."""
    x2, p2 = _pair(x, probs, "race_top_p")
    n, V = x2.shape
    if state.dtype != torch.long or tuple(state.shape) != (n, 2):
        raise ValueError(f"rows.race_top_p: state must be int64 [{n}, 2] (key, draw), got "
                         f"{state.dtype} {tuple(state.shape)}")
    state = state.contiguous()
    nb, dev = cdiv(V, BLOCK), x2.device
    cand = torch.full((n,), -1, dtype=torch.long, device=dev)
    done = torch.zeros(n, dtype=torch.int32, device=dev)
    out = torch.empty(n, dtype=torch.long, device=dev)
    pm = torch.empty(n, nb, dtype=torch.float32, device=dev)
    pv = torch.empty(n, nb, dtype=torch.float32, device=dev)
    pi = torch.empty(n, nb, dtype=torch.int32, device=dev)

    cnt = torch.zeros(n, dtype=torch.int32, device=dev)
    g = row_programs(n, nb)

    def one_round(floor: bool, cut: torch.Tensor) -> None:
        _nucleus_round[(n, g)](x2, p2, state, cand, done, cut, pm, pv, pi, cnt, out, float(p), V, nb, FLOOR=floor,
                               BLOCK=BLOCK, NBP=next_pow2(nb), CPP=cdiv(nb, g), num_warps=WARPS)

    if last is not None and (last.dtype != torch.float32 or last.numel() != n):
        raise ValueError(f"rows.race_top_p: last (the cut) must be float32 with one value a row ({n}), got "
                         f"{last.dtype} {tuple(last.shape)}")
    if last is None:
        for _ in range(NUCLEUS_ROUNDS if rounds is None else rounds):
            one_round(False, pm)
        last = _cut(x2, p2, p, done)
    one_round(True, last.reshape(n).contiguous())
    return out


__all__ = ["BLOCK", "NUCLEUS_ROUNDS", "ROUND_PROGRAMS", "argmax", "first_reaching", "race", "race_top_p", "softmax", "top_p_last"]
