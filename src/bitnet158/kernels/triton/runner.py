"""The GPU runner: W2A8 Triton kernels, a static KV cache and one CUDA graph per decode step.

    from bitnet158.engine import make_runner
    runner = make_runner(model.cuda(), batch=8)          # picked automatically on CUDA
    logits = runner.prefill(tokens, pos)                 # [B, T] -> float32 [B, V] (last position)
    logits = runner.decode(tokens, pos)                  # [B]    -> float32 [B, V]

Decode step of a layer (9 kernels, batch rows at their own positions)::

    norm_quant(x + d)  -> qkv = W2A8(fused q|k|v)  -> attention partials (RoPE, cache write)
    -> combine + attn_sub_norm + quant -> d = W2A8(o)  -> norm_quant(x + d) -> gu = W2A8(gate|up)
    -> relu(g)^2*u + ffn_sub_norm + quant -> d = W2A8(down)

then the final norm and the bf16 head (cuBLAS). Two fused steps of 5 kernels a layer are
selectable for batch 1 (``step="tail"`` / ``"prologue"``, :mod:`.decode_layer`)::

    QKV -> attention (partials + merge + attn_sub_norm + quant in one kernel) -> O (+ x += d, norm,
    quant) -> gate|up (+ relu^2 gate, ffn_sub_norm, quant) -> down (+ x += d, next norm, quant)

with each norm + quant in the last program of the kernel before it ("tail"), or recomputed by
every program of the GEMV after it ("prologue"); ``step="persistent"`` runs a layer as one kernel
of one program an SM whose stages are separated by grid barriers (:mod:`.decode_persistent`).
All three measured slower than the 9-kernel step on an H100 (a kernel boundary with PDL costs ~0.8
us; the fused kernels lose more than that inside, the persistent one's stages on one program an SM
are slower still), so ``"unfused"`` is the default. The whole step is captured in a CUDA graph per
number of rows (with ``runner.decode_spans``, per number of rows and attention span: the cache
slots up to which the attention launches programs and merges chunks, 256, 1024, 4096, ... slots,
the smallest that holds every position), with tokens, positions and cache rows in device buffers,
so any prompt and output length replays the same graph (or one of a few). Prefill runs the same
kernels (tensor-core W2A8 GEMM) with SDPA attention, RoPE and the cache write in one kernel
(``attention.rope_cache_write``). Eager, a 2048-token prefill's ~400 launches cost the host more
time than the GPU needs for them (H100), so with CUDA graphs (``runner.prefill_graphs``, on by
default: 19.2 -> 16.2 ms on an H100) a prompt chunk at consecutive positions is padded to a
multiple of ``PREFILL_ALIGN`` tokens and, from the second time its padded shape comes, replays a
CUDA graph of that shape. The padding tokens come after every prompt token, so causal attention
keeps them out of the prompt's logits; they write cache slots past the prompt, which a decode step
or the next chunk overwrites before reading them. q/k/v and gate/up weights are concatenated once
at load and the model's own buffers become views of them: the packed weights exist once.

``int8_head=True`` reads an int8 copy of the head with per-row scales (half the head's bytes,
an approximation of the model). ``linear="bf16"`` builds the comparison pipeline of the
benchmark instead: the same graph, cache, attention and norms, but every projection a cuBLAS
``F.linear`` on dequantized bf16 weights.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import torch
import torch.nn.functional as F

from ... import quant
from ...engine.runner import check_cache_fits, check_lengths, check_pos, on_host, register_runner
from ...errors import ConfigError
from . import decode_layer, decode_persistent
from .attention import DecodeAttention, rope_cache_write
from .common import device_current, gpu_unsupported
from .head import int8_head, quantize_head
from .norm_quant import norm_quant
from .unpack_ahead import UnpackAhead
from .w2a8 import Workspace, uses_unpacked, w2a8_linear


class _Linear:
    """One (possibly fused) projection: packed uint8 [R, K] with per-segment gammas, or bf16 [N, K]."""

    def __init__(self, mods, mode: str, dtype):
        self.segs = tuple(m.weight.shape[0] for m in mods)
        with torch.no_grad():
            if len(mods) == 1 or mode != "w2a8":
                packed = mods[0].weight.contiguous() if len(mods) == 1 else None
            else:
                packed = torch.cat([m.weight for m in mods])
                r0 = 0
                for m, r in zip(mods, self.segs):      # the modules now view the fused tensor
                    m._buffers["weight"] = packed[r0:r0 + r]
                    m.invalidate()
                    r0 += r
            self.gammas = torch.cat([m.weight_scale.reshape(1) for m in mods]).float().contiguous()
            self.packed = packed if mode == "w2a8" else None
            self.dense = None
            if mode == "bf16":
                self.dense = torch.cat([(quant.unpack_hf(m.weight).float() * m.weight_scale.float())
                                        .to(dtype) for m in mods])

    def __call__(self, x_or_q, s=None, ws=None, out_dtype=None, w8=None):
        if self.dense is not None:
            return F.linear(x_or_q, self.dense)
        return w2a8_linear(x_or_q, s, self.packed, self.gammas, self.segs, out_dtype=out_dtype, ws=ws, w8=w8)


STEPS = ("unfused", "tail", "prologue", "persistent")
# Measured on an H100 (bench/gpu_decode.py, batch 1, ctx 1024): unfused 1.35-1.38 ms, tail
# 1.74 ms, prologue 1.64 ms; bench/gpu_persistent.py: persistent 2.29-2.67 ms against unfused
# 1.31-1.32 ms; the others stay selectable (docs/gpu-engine.md says why).
DEFAULT_STEP = "unfused"
# prefill graphs: chunk lengths padded up to a multiple of PREFILL_ALIGN tokens (at most
# PREFILL_ALIGN - 1 tokens of extra work), a continuation's attention over the cache up to a
# multiple of PREFILL_SPAN slots; a graph per (rows, padded length, slots, from 0), captured the
# second time its shape comes; at most PREFILL_GRAPHS kept (least recently used dropped), all
# sharing one memory pool (they replay one at a time; outputs are copied out)
PREFILL_ALIGN = 64
PREFILL_SPAN = 512
PREFILL_GRAPHS = 32
PREFILL_GRAPHS_DEFAULT = True     # H100, 2048 tokens: 19.2 -> 16.2 ms (host-bound eager)
# decode graphs per (rows, span): a step whose positions all lie below ``span`` launches the
# attention's partial programs and merges chunks up to that slot only (the 9-kernel step; the
# fused and persistent steps read the whole cache). Spans grow DECODE_SPAN_GROWTH-fold from
# DECODE_SPAN_MIN slots; one at or past the cache is the whole cache. So a row count has a few
# graphs (3 at 2B4T's 4096 slots: 256, 1024, all), each replayed for the smallest span that
# holds the step's positions.
DECODE_SPANS_DEFAULT = True       # H100 (2026-12-07, bench/gpu.py): batch 1 ctx 128 / 1024 1.105 / 1.145 ms
                                  # a step with spans against 1.145 / 1.168 over the whole cache
DECODE_SPAN_MIN = 256
DECODE_SPAN_GROWTH = 4
# prefill projections on the int8 GEMM path (from w2a8.I8_MIN_M rows) get their weights unpacked on
# a side stream two projections ahead (unpack_ahead.UnpackAhead) instead of in line before each
# GEMM: True always, "graphs" in captured prefills only (an eager prefill is bound by the host's
# launches, to which the side stream's events add), False never. H100 (2026-12-07, bench/gpu.py,
# two rounds alternating): a 2048-token prefill graph 13.90 / 13.89 ms against 14.17 / 14.13 in line
PREFILL_UNPACK_AHEAD: bool | str = "graphs"
TAIL_STYLES = {"qkv": "w8", "o": "w8", "gu": "w8", "down": "w8"}      # the best whole step of those tried
DEFAULT_GEMV = "w2a8"


class TritonRunner:
    """Runner protocol of :mod:`bitnet158.engine.runner` on CUDA (or CPU under TRITON_INTERPRET=1)."""

    name = "triton"

    def __init__(self, model, batch: int = 1, max_len: int | None = None, linear: str = "w2a8",
                 graphs: bool | None = None, int8_head: bool = False, step: str | None = None):
        if not model.packed:
            raise ConfigError("triton runner: the model must be packed (call model.pack() or load "
                              "with packed=True)")
        if linear not in ("w2a8", "bf16"):
            raise ConfigError(f"triton runner: linear={linear!r} is not 'w2a8' or 'bf16'")
        why = gpu_unsupported(model.device)
        if why:
            raise ConfigError(f"triton runner: {why}; use backend='torch'")
        cfg = model.config
        self.model = model.eval()
        self.cfg = cfg
        self.batch = batch
        self.max_len = min(max_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.vocab_size = cfg.vocab_size
        self.device = model.device
        self.dtype = model.dtype
        check_cache_fits(cfg, batch, self.max_len, self.dtype, self.device, "triton runner")
        self.mode = linear
        self.eps = cfg.rms_norm_eps
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        # decode step (the fused ones up to ``fused_max_rows`` rows, more rows run "unfused"):
        #   "unfused":  9 kernels a layer (norm_quant kernels, attention partials + combine)
        #   "tail":     5 kernels a layer, norm + quant in the last program of the previous kernel
        #   "prologue": 5 kernels a layer, norm + quant recomputed by every GEMV program
        #   "persistent": 1 kernel a layer, its stages separated by grid barriers (batch 1)
        step = DEFAULT_STEP if step is None else step
        if step not in STEPS:
            raise ConfigError(f"triton runner: step={step!r} is not one of {STEPS}")
        self.step = step if linear == "w2a8" else "unfused"
        self.fused_style = "half"        # block shapes of the prologue GEMVs (decode_layer.fused_config)
        self.attn_warps = 8              # warps of the one-kernel attention
        self.fused_max_rows = 1          # the prologue step at batch 2 and 8: 1.6-1.7x slower (H100)
        self.cnt = torch.zeros(1, dtype=torch.int32, device=self.device)   # tail counter, kept zero
        # block shapes of the tail GEMVs per projection (decode_layer.tail_config styles)
        self.tail_styles = dict(TAIL_STYLES)
        # decode GEMVs (M <= 8) of the unfused step: "w2a8" (w2a8._gemv_dp4a) or "masked" (the
        # tail kernel without its tail: each 2-bit field masked in place, 2 integer ops a field)
        self.gemv = DEFAULT_GEMV
        self._persistent = None          # decode_persistent.PersistentStep, built on first use
        dev, dt = self.device, self.dtype
        self.layers = []
        for blk in model.model.layers:
            a, m = blk.self_attn, blk.mlp
            self.layers.append(dict(
                in_norm=blk.input_layernorm.weight.detach().to(dt),
                post_norm=blk.post_attention_layernorm.weight.detach().to(dt),
                attn_norm=a.attn_sub_norm.weight.detach().to(dt),
                ffn_norm=m.ffn_sub_norm.weight.detach().to(dt),
                qkv=_Linear([a.q_proj, a.k_proj, a.v_proj], linear, dt),
                o=_Linear([a.o_proj], linear, dt),
                gu=_Linear([m.gate_proj, m.up_proj], linear, dt),
                down=_Linear([m.down_proj], linear, dt)))
        self.final_norm = model.model.norm.weight.detach().to(dt)
        self.embed = model.model.embed_tokens.weight
        self.head = model.head_weight
        self.head_q = None
        if int8_head:          # int8 rows + fp32 row scales; the embedding lookup stays bf16
            self.head_q, self.head_s = quantize_head(self.head.detach())
        self.cos = model.rope_cos.float().contiguous()     # fp32 [P, D]
        self.sin = model.rope_sin.float().contiguous()
        H, HKV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.H, self.HKV, self.D = H, HKV, D
        shape = (batch, HKV, self.max_len, D)
        self.k_cache = [torch.zeros(shape, dtype=dt, device=dev) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=dt, device=dev) for _ in self.layers]
        self.attn = DecodeAttention(H, HKV, D, batch, self.max_len, dev)
        widest = max(4 * sum(lin.segs) for L in self.layers for lin in
                     (L["qkv"], L["o"], L["gu"], L["down"]))
        self.ws = Workspace(dev, numel=max(batch, 64) * widest)     # split-K sums for M <= 64
        # static decode buffers (views [:n] are used for n rows)
        self.tok_buf = torch.zeros(batch, dtype=torch.long, device=dev)
        self.pos_buf = torch.zeros(batch, dtype=torch.int32, device=dev)
        self.rows_buf = torch.zeros(batch, dtype=torch.int32, device=dev)
        self._all_rows = torch.arange(batch, device=dev)                    # rows=None: every row
        self.x_buf = torch.zeros((batch, cfg.hidden_size), dtype=dt, device=dev)
        self.x2_buf = torch.zeros((batch, cfg.hidden_size), dtype=dt, device=dev)   # fused: ping-pong
        self._graphs: dict[tuple, tuple] = {}        # (rows, span) -> (graph, logits)
        self.decode_spans = DECODE_SPANS_DEFAULT
        # prefill chunks replay a graph per padded shape (with CUDA graphs, PREFILL_GRAPHS_DEFAULT)
        self.prefill_graphs = self.graphs and PREFILL_GRAPHS_DEFAULT
        self.unpack_ahead = PREFILL_UNPACK_AHEAD
        self._side = None                # the unpack-ahead side stream, made on first use
        self._prefill_graphs: OrderedDict = OrderedDict()
        self._prefill_seen: set = set()
        self._pool = None                # memory pool of every captured graph (_graph_memory)
        self._graph_out = None           # [batch, V] float32 logits of every captured graph

    # ------------------------------------------------------------------ helpers
    def reset(self) -> None:
        """Forget every row (slots are overwritten before they are read, so nothing is zeroed)."""

    def _rows(self, rows, n: int) -> torch.Tensor:
        """Cache rows of n input rows, checked: ``rows`` on the host, or every row (None) on the
        device; the caller copies them where the call needs them (one copy, no wait)."""
        if rows is None:
            if n != self.batch:
                raise ValueError(f"triton runner: got {n} rows but the runner has batch={self.batch}; "
                                 f"pass rows= to run on a subset")
            return self._all_rows[:n]
        rows = on_host(torch.as_tensor(rows)).long().reshape(-1)       # checked on the host
        if rows.numel() != n:
            raise ValueError(f"triton runner: rows has {rows.numel()} entries for {n} input rows")
        if n and (int(rows.min()) < 0 or int(rows.max()) >= self.batch):
            raise ValueError(f"triton runner: rows {rows.tolist()} out of range for batch={self.batch}")
        return rows

    def _lin(self, lin: _Linear, q, s, ahead=None, j: int = 0):
        """q [M, K] -> [M, N] through ``lin``; ``ahead`` (an :class:`UnpackAhead` started with the
        prefill's projections) supplies projection j's unpacked weights and is told it is queued."""
        if ahead is not None:
            out = lin(q, s, ws=self.ws, out_dtype=self.dtype, w8=ahead.take(j))
            ahead.done(j)
            return out
        if (self.gemv == "masked" and lin.packed is not None and q.shape[0] <= 8
                and decode_layer.supported(q.shape[0], q.shape[1]) and q.stride(0) % 4 == 0):
            return decode_layer.linear_tail(q, s, lin.packed, lin.gammas, lin.segs, self.cnt,
                                            out_dtype=self.dtype)
        return lin(q, s, ws=self.ws, out_dtype=self.dtype)

    def _nq(self, x, w, **kw):
        """Norm (+ quant for W2A8; the normed row for the bf16 pipeline) -> args of the next linear."""
        if self.mode == "w2a8":
            return norm_quant(x, w, self.eps, **kw)
        return (norm_quant(x, w, self.eps, quant=False, **kw), None)

    def _head(self, x, delta, out=None):
        """Final norm + head -> float32 logits [n, V], written into ``out`` when given."""
        y = norm_quant(x, self.final_norm, self.eps, residual=delta, h_out=x, quant=False)
        if self.head_q is not None:
            return int8_head(y, self.head_q, self.head_s, out=out)
        logits = F.linear(y.to(self.head.dtype), self.head)
        return logits.float() if out is None else out.copy_(logits)

    def _graph_memory(self):
        """(pool, logits buffer) shared by every captured graph: they replay one at a time, each
        writes its intermediates before reading them, and each caller copies its logits rows out,
        so a graph per batch size or prompt shape adds no memory of its own (a [n, V] output each
        would be 33 MB at 64 rows of 2B4T)."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
            self._graph_out = torch.empty((self.batch, self.head.shape[0]), dtype=torch.float32,
                                          device=self.device)
        return self._pool, self._graph_out

    # ------------------------------------------------------------------ decode
    def _step_kind(self, n: int) -> str:
        if self.step == "unfused" or n > self.fused_max_rows or not self.layers:
            return "unfused"
        return self.step if self._fusable(n) else "unfused"

    def _fusable(self, n: int) -> bool:
        return all(
            decode_layer.supported(n, L[k].packed.shape[1]) for L in self.layers[:1]
                                  for k in ("qkv", "o", "gu", "down"))

    def _fl(self, lin: _Linear, a, norm_w, **kw):
        return decode_layer.fused_linear(a, norm_w, lin.packed, lin.gammas, lin.segs, self.eps,
                                         style=self.fused_style, **kw)

    def _decode_step_fused(self, tok, pos, rows, out=None):
        """5 kernels a layer: QKV(x + d) -> attention -> O(sub-norm) -> gate|up(x + d) -> down(relu^2).

        The residual stream ping-pongs between two buffers (a program never writes the row other
        programs of the same kernel read); the embedding lookup folds into layer 0's prologues.
        """
        n = tok.shape[0]
        bufs = (self.x_buf[:n], self.x2_buf[:n])
        cur = None                       # index of the buffer holding x; None: the embedding row
        if self.embed.dtype != self.dtype:
            bufs[0].copy_(F.embedding(tok, self.embed))
            cur = 0
        d = None
        for i, L in enumerate(self.layers):
            if cur is None:
                qkv = self._fl(L["qkv"], self.embed, L["in_norm"], mode=0, tok=tok)
            elif d is None:
                qkv = self._fl(L["qkv"], bufs[cur], L["in_norm"], mode=0)
            else:
                qkv = self._fl(L["qkv"], bufs[cur], L["in_norm"], mode=1, d=d, h_out=bufs[1 - cur])
                cur = 1 - cur
            o = self.attn.fused(qkv, self.k_cache[i], self.v_cache[i], rows, pos, self.cos, self.sin,
                                num_warps=self.attn_warps)
            d = self._fl(L["o"], o, L["attn_norm"], mode=0)
            if cur is None:
                gu = self._fl(L["gu"], self.embed, L["post_norm"], mode=1, tok=tok, d=d, h_out=bufs[0])
                cur = 0
            else:
                gu = self._fl(L["gu"], bufs[cur], L["post_norm"], mode=1, d=d, h_out=bufs[1 - cur])
                cur = 1 - cur
            d = self._fl(L["down"], gu, L["ffn_norm"], mode=2)
        return self._head(bufs[cur], d, out)

    def _decode_step_tail(self, tok, pos, rows, out=None):
        """5 kernels a layer: QKV -> attention (+ attn_sub_norm, quant) -> O (+ x += d, norm, quant)
        -> gate|up (+ relu^2 gate, ffn_sub_norm, quant) -> down (+ x += d, next input_layernorm,
        quant): each norm + quant runs in the last program of the kernel before it."""
        n = tok.shape[0]
        x = self.x_buf[:n]
        x.copy_(F.embedding(tok, self.embed))
        last = len(self.layers) - 1
        q, s = norm_quant(x, self.layers[0]["in_norm"], self.eps)
        st = self.tail_styles

        def tail(q, s, lin, **kw):
            return decode_layer.linear_tail(q, s, lin.packed, lin.gammas, lin.segs, self.cnt, eps=self.eps,
                                            out_dtype=self.dtype, **kw)
        for i, L in enumerate(self.layers):
            qkv = tail(q, s, L["qkv"], style=st["qkv"])
            _, q, s = self.attn.fused(qkv, self.k_cache[i], self.v_cache[i], rows, pos, self.cos, self.sin,
                                      num_warps=self.attn_warps, norm_weight=L["attn_norm"], eps=self.eps)
            _, q, s = tail(q, s, L["o"], tail=1, res=x, norm_w=L["post_norm"], style=st["o"])
            _, q, s = tail(q, s, L["gu"], tail=2, norm_w=L["ffn_norm"], style=st["gu"])
            if i < last:
                _, q, s = tail(q, s, L["down"], tail=1, res=x, norm_w=self.layers[i + 1]["in_norm"],
                               style=st["down"])
            else:
                d = tail(q, s, L["down"], style=st["down"])
        return self._head(x, d, out)

    def _span(self, n: int, hi: int) -> int | None:
        """Cache slots the decode step's attention covers when no position exceeds ``hi``
        (``DECODE_SPAN_MIN`` times a power of ``DECODE_SPAN_GROWTH``); None: the whole cache."""
        if not self.decode_spans or self._step_kind(n) != "unfused":
            return None
        span = DECODE_SPAN_MIN
        while span <= hi:
            span *= DECODE_SPAN_GROWTH
        return span if span < self.max_len else None

    def _decode_step(self, tok, pos, rows, out=None, span=None):
        """tok long [n], pos int32 [n], rows int32 [n] (device buffers) -> float32 logits [n, V]
        (in ``out`` when given); ``span``: every position lies below it (see ``_span``)."""
        n = tok.shape[0]
        kind = self._step_kind(n)
        if kind == "prologue":
            return self._decode_step_fused(tok, pos, rows, out)
        if kind == "tail":
            return self._decode_step_tail(tok, pos, rows, out)
        if kind == "persistent":
            if self._persistent is None:
                self._persistent = decode_persistent.PersistentStep(self)
            return self._persistent(tok, pos, rows, out)
        x = self.x_buf[:n]
        x.copy_(F.embedding(tok, self.embed))
        delta = None
        for i, L in enumerate(self.layers):
            q, s = self._nq(x, L["in_norm"], residual=delta, h_out=x if delta is not None else None)
            qkv = self._lin(L["qkv"], q, s)
            if self.mode == "w2a8":
                q, s = self.attn(qkv, self.k_cache[i], self.v_cache[i], rows, pos, self.cos, self.sin,
                                 L["attn_norm"], self.eps, span=span)
            else:
                q, s = self.attn(qkv, self.k_cache[i], self.v_cache[i], rows, pos, self.cos, self.sin,
                                 L["attn_norm"], self.eps, quant=False, span=span), None
            delta = self._lin(L["o"], q, s)
            q, s = self._nq(x, L["post_norm"], residual=delta, h_out=x)
            gu = self._lin(L["gu"], q, s)
            q, s = self._nq(gu, L["ffn_norm"], gated=True)
            delta = self._lin(L["down"], q, s)
        return self._head(x, delta, out)

    @torch.inference_mode()
    @device_current
    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, pos [n] -> float32 logits [n, V]; one graph replay on CUDA."""
        n = tokens.shape[0]
        if pos.numel() != n:
            raise ValueError(f"triton runner: decode got {n} tokens but {pos.numel()} positions")
        r = self._rows(rows, n)
        span = self._span(n, check_pos(pos, self.max_len, "triton runner"))
        self.tok_buf[:n].copy_(tokens.reshape(-1), non_blocking=True)   # from the host: no wait
        self.pos_buf[:n].copy_(pos.reshape(-1), non_blocking=True)
        self.rows_buf[:n].copy_(r, non_blocking=True)
        args = (self.tok_buf[:n], self.pos_buf[:n], self.rows_buf[:n])
        if not self.graphs:
            return self._decode_step(*args, span=span)
        if (n, span) not in self._graphs:
            pool, out = self._graph_memory()
            step = functools.partial(self._decode_step, span=span)
            self._graphs[n, span] = self._capture(args + (out[:n],), step, pool=pool)
        g, out = self._graphs[n, span]
        g.replay()
        return out.clone()

    def _capture(self, args, step=None, pool=None):
        """Warm up (compiles kernels; writes the same KV values the replay writes) and capture
        ``step(*args)`` (default: the decode step) -> (graph, its output)."""
        step = step or self._decode_step
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step(*args)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            out = step(*args)
        return g, out

    # ------------------------------------------------------------------ prefill
    @device_current
    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor | None = None,
                lengths: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """tokens, pos [B, T] -> float32 logits [B, V] of each row's last position (with
        ``lengths``: of position ``lengths[b] - 1``, the padding after it run and its slots
        overwritten later)."""
        if tokens.dim() != 2:
            raise ValueError(f"triton runner: prefill tokens must be [rows, T], got shape "
                             f"{tuple(tokens.shape)}")
        B, T = tokens.shape
        if T == 0:
            raise ValueError("triton runner: prefill got no tokens (tokens has shape "
                             f"{tuple(tokens.shape)})")
        r = self._rows(rows, B).to(self.device, non_blocking=True)
        pos = on_host(pos).long()                          # every check below on the host copy
        if pos.dim() == 1:
            pos = pos[None]
        if pos.shape == (1, T):                            # one row of positions for every row
            pos = pos.expand(B, T)
        if pos.shape != (B, T):
            raise ValueError(f"triton runner: pos has shape {tuple(pos.shape)}, tokens {(B, T)}")
        hi = check_pos(pos, self.max_len, "triton runner")
        last = check_lengths(lengths, B, T, "triton runner")              # host list or None
        last = torch.full((B,), T - 1, dtype=torch.long) if last is None else torch.tensor(last)
        start = pos[:, 0]
        steps = bool((pos == start[:, None] + torch.arange(T)).all())                # consecutive
        starts = start.tolist()
        fresh = steps and not any(starts)                                             # causal from 0
        tokens = tokens.to(self.device, non_blocking=True)
        if steps and self.prefill_graphs and self.device.type == "cuda":
            out = self._prefill_graph(tokens, start.to(self.device, non_blocking=True), max(starts), r, fresh,
                                      last)
            if out is not None:
                return out
        flat = (torch.arange(B) * T + last).to(self.device, non_blocking=True)          # [B] b * T + t
        return self._prefill(tokens, pos.to(self.device, non_blocking=True), r, fresh, hi + 1, last=flat)

    def _padded_shape(self, T: int, s_max: int, fresh: bool) -> tuple[int, int]:
        """(Tp, Lp): the T new tokens padded to a multiple of PREFILL_ALIGN (never past the cache
        for the row starting furthest in, ``s_max``), and the cache slots the attention reads:
        Tp from position 0, else max start + T rounded up to a multiple of PREFILL_SPAN."""
        Tp = min(-(-T // PREFILL_ALIGN) * PREFILL_ALIGN, self.max_len - s_max)
        if fresh:
            return Tp, Tp
        return Tp, min(-(-(s_max + T) // PREFILL_SPAN) * PREFILL_SPAN, self.max_len)

    def _pad_inputs(self, tokens, start, r, bufs, last=None) -> None:
        """Copy a prompt chunk [B, T] (row b at positions start[b] + t) and its rows into a graph's
        static buffers; padding tokens (id 0) continue each row's positions. ``last`` (host long
        [B], default T - 1): the column of each row's last real token, whose logits it returns."""
        B, T = tokens.shape
        Tp = bufs["tok"].shape[1]
        bufs["tok"][:, :T].copy_(tokens)
        bufs["tok"][:, T:].zero_()
        bufs["pos"].copy_(start[:, None] + torch.arange(Tp, device=self.device))
        bufs["rows"].copy_(r)
        last = torch.full((B,), T - 1, dtype=torch.long) if last is None else last
        bufs["last"].copy_(torch.arange(B) * Tp + last, non_blocking=True)

    def _prefill_bufs(self, B: int, Tp: int) -> dict:
        dev = self.device
        return dict(tok=torch.zeros((B, Tp), dtype=torch.long, device=dev),
                    pos=torch.zeros((B, Tp), dtype=torch.long, device=dev),
                    rows=torch.zeros(B, dtype=torch.long, device=dev),
                    last=torch.zeros(B, dtype=torch.long, device=dev))

    def _prefill_padded(self, bufs, fresh: bool, Lp: int, out=None) -> torch.Tensor:
        return self._prefill(bufs["tok"], bufs["pos"], bufs["rows"], fresh, Lp, last=bufs["last"], out=out)

    def _prefill_graph(self, tokens, start, s_max: int, r, fresh: bool, last=None) -> torch.Tensor | None:
        """A prompt chunk [B, T] at consecutive positions from ``start`` [B] (the largest:
        ``s_max``) through its padded shape's graph, captured the second time the shape comes;
        None the first time (the caller runs it eagerly: one-off shapes never pay a capture)."""
        B, T = tokens.shape
        Tp, Lp = self._padded_shape(T, s_max, fresh)
        key = (B, Tp, Lp, fresh)
        entry = self._prefill_graphs.get(key)
        if entry is None:
            if key not in self._prefill_seen:
                self._prefill_seen.add(key)
                return None
            bufs = self._prefill_bufs(B, Tp)
            self._pad_inputs(tokens, start, r, bufs, last)
            pool, out = self._graph_memory()
            g, out = self._capture((bufs, fresh, Lp, out[:B]), self._prefill_padded, pool=pool)
            entry = self._prefill_graphs[key] = (g, out, bufs)
            while len(self._prefill_graphs) > PREFILL_GRAPHS:
                self._prefill_graphs.popitem(last=False)
        else:
            self._prefill_graphs.move_to_end(key)
            self._pad_inputs(tokens, start, r, entry[2], last)
        entry[0].replay()
        return entry[1].clone()

    @torch.inference_mode()
    def _prefill(self, tokens, pos, r, fresh: bool, L_: int, last=None, out=None) -> torch.Tensor:
        """The prefill's device work, without host synchronization (a CUDA graph can capture it):
        tokens, pos long [B, T], r long [B] cache rows, L_: cache slots a continuing chunk's
        attention reads (at least the last real position + 1); ``last`` long [B]: the flat index
        (b * T + t) whose logits each row returns (default: t = T - 1), into ``out`` when given."""
        B, T = tokens.shape
        H, HKV, D = self.H, self.HKV, self.D
        x = F.embedding(tokens, self.embed).reshape(B * T, -1).contiguous()
        pos32 = pos.to(torch.int32).reshape(-1).contiguous()                        # [B*T]
        r32 = r.to(torch.int32)
        if not fresh:
            keys = torch.arange(L_, device=self.device)
            mask = (keys[None, None, :] <= pos[:, :, None])[:, None]                   # [B, 1, T, L]
        delta = None
        ahead = self._ahead(B * T)
        lin = functools.partial(self._lin, ahead=ahead)
        for i, Ly in enumerate(self.layers):
            if delta is not None:
                q, s = self._nq(x, Ly["in_norm"], residual=delta, h_out=x)
            else:
                q, s = self._nq(x, Ly["in_norm"])
            qkv = lin(Ly["qkv"], q, s, j=4 * i)                                         # [B*T, (H+2Hkv)D]
            # RoPE of q and k, k and v written into the cache: one kernel
            qr, kr = rope_cache_write(qkv, self.k_cache[i], self.v_cache[i], r32, pos32, self.cos,
                                      self.sin, H, HKV, D)
            qh = qr.view(B, T, H, D).transpose(1, 2)                                    # [B, H, T, D]
            if fresh:
                kh = kr.view(B, T, HKV, D).transpose(1, 2)
                vh = qkv.view(B, T, -1)[..., (H + HKV) * D:].view(B, T, HKV, D).transpose(1, 2)
                o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=T > 1, enable_gqa=True)
            else:
                kc, vc = self.k_cache[i][r, :, :L_], self.v_cache[i][r, :, :L_]
                o = F.scaled_dot_product_attention(qh, kc, vc, attn_mask=mask, enable_gqa=True)
            o = o.transpose(1, 2).reshape(B * T, H * D)
            q, s = self._nq(o, Ly["attn_norm"])
            delta = lin(Ly["o"], q, s, j=4 * i + 1)
            q, s = self._nq(x, Ly["post_norm"], residual=delta, h_out=x)
            gu = lin(Ly["gu"], q, s, j=4 * i + 2)
            q, s = self._nq(gu, Ly["ffn_norm"], gated=True)
            delta = lin(Ly["down"], q, s, j=4 * i + 3)
        if ahead is not None:
            ahead.finish()
        if last is None:
            last = torch.arange(B, device=self.device) * T + (T - 1)
        return self._head(x[last].contiguous(), delta[last].contiguous(), out)

    def _ahead(self, M: int) -> UnpackAhead | None:
        """An :class:`UnpackAhead` started with the prefill's projections (4 a layer, in call
        order) when ``unpack_ahead`` says so (True; "graphs": while a CUDA graph is captured) and
        every one of them runs the int8 GEMM at M rows."""
        if not self.unpack_ahead or self.mode != "w2a8":
            return None
        if self.unpack_ahead == "graphs" and not (self.device.type == "cuda"
                                                  and torch.cuda.is_current_stream_capturing()):
            return None
        lins = [Ly[k] for Ly in self.layers for k in ("qkv", "o", "gu", "down")]
        if not all(uses_unpacked(M, *lin.packed.shape) for lin in lins):
            return None
        if self._side is None and self.device.type == "cuda":
            self._side = torch.cuda.Stream(self.device)
        ahead = UnpackAhead(self._side)
        ahead.start(lins)
        return ahead

    # ------------------------------------------------------------------ sizes
    def weight_bytes(self) -> dict:
        """Resident bytes of the projection weights and of the head (the embedding when tied)."""
        lin = 0
        for L in self.layers:
            for k in ("qkv", "o", "gu", "down"):
                t = L[k].packed if L[k].packed is not None else L[k].dense
                lin += t.numel() * t.element_size()
        if self.head_q is not None:
            return dict(linear=lin, head=self.head_q.numel() + 4 * self.head_s.numel())
        return dict(linear=lin, head=self.head.numel() * self.head.element_size())


def _available(model) -> bool:
    try:
        return model.device.type == "cuda" and model.packed and gpu_unsupported(model.device) is None
    except Exception:  # pragma: no cover - odd model objects
        return False


register_runner("triton", lambda model, batch, max_len: TritonRunner(model, batch, max_len),
                _available, priority=20)

__all__ = ["TritonRunner"]
