"""The C decoder on numpy buffers: one model struct, built from any source of HF-layout weights.

    from bitnet158.kernels.cpu.cmodel import CModel
    core = CModel(source, batch=1, max_len=512, head="bf16")   # or head="int8"
    logits = core.prefill(tokens, pos)     # int [B, T] -> float32 numpy [B, V] (last position)
    logits = core.decode(tok, pos)         # int [B]    -> float32 numpy [B, V]

Both CPU engines are this class: :class:`~.runner.CpuRunner` (torch tensors in and out, the
generic engine's runner) feeds it a torch model, :mod:`.lite` (no torch at all) a model folder read
with numpy. ``source`` provides, for ``source.config`` (a ModelConfig) and ``source.dtype``
("bfloat16" | "float16" | "float32", the dtype the model computes in):

- ``projection(prefix) -> (packed uint8 [out/4, in], gamma)``  HF-packed ternary weight, multiplier
- ``vector(name) -> float32 [n]``           a norm weight, its values rounded through ``dtype``
- ``rope(n) -> (cos, sin)``                 float32 [n, head_dim], rounded through ``dtype``
- ``table(name) -> bf16 bits uint16 | float32 [V, D]``   the embedding / head as the bf16 head reads it
  (``"model.embed_tokens.weight"`` or ``"lm_head.weight"``; a table it returns is kept as is)
- ``rows(name, i0, i1) -> float32 [i1 - i0, D]``  rows of that table (the int8 head quantizes them)
- ``tied``                                   the head is the embedding table

Every projection is converted into one arena on huge pages, in the order decode reads it (q|k|v and
gate|up fused); norms are fp32; the KV cache is bf16 for bf16/fp16 models, fp32 for fp32 models.
Design and figures: docs/cpu-engine.md. Tests: tests/kernels/test_cpu_runner.py, test_cpu_lite.py.
"""

from __future__ import annotations

import ctypes
import os
from ctypes import POINTER, Structure, c_float, c_int, c_void_p

import numpy as np

from ...errors import ConfigError
from . import LAYOUTS, binding, kpad, layout_bytes, layout_native, pad16

PREFILL_CHUNK = 128   # tokens per forward call during prefill (bounds the activation buffers)
HUGE = 2 << 20
HEAD_KINDS = {"f32": 0, "bf16": 1, "int8": 2}          # bitnet_cpu.h BN_W_*
# the kernel matrices of one block: q|k|v and gate|up fused (one pass over their input)
GROUPS = (("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")), ("o", ("self_attn.o_proj",)),
          ("gu", ("mlp.gate_proj", "mlp.up_proj")), ("down", ("mlp.down_proj",)))


class _Layer(Structure):
    _fields_ = [(n, c_void_p) for n in ("wqkv", "wo", "wgu", "wdown", "gqkv", "go", "ggu", "gdown",
                                        "ln_in", "ln_post", "ln_attn", "ln_ffn", "kc", "vc")]


class _Model(Structure):
    _fields_ = [*[(n, c_int) for n in ("n_layers", "d", "h", "hkv", "hd", "f", "vocab", "batch",
                                       "max_len", "kv_bf16", "layout")],
                ("eps", c_float), ("attn_scale", c_float),
                *[(n, c_int) for n in ("q_off", "k_off", "v_off", "nqkv", "f_pad", "kp_d", "kp_q", "kp_f")],
                ("rope_cos", c_void_p), ("rope_sin", c_void_p),
                ("embed", c_void_p), ("embed_kind", c_int), ("embed_scale", c_void_p),
                ("head", c_void_p), ("head_kind", c_int), ("head_scale", c_void_p),
                ("head_round_bf16", c_int),
                ("ln_final", c_void_p), ("layers", POINTER(_Layer)),
                ("max_m", c_int), ("ldt", c_int),
                *[(n, c_void_p) for n in ("x", "t", "qkv", "att", "gu", "hout", "scratch", "xq", "sx", "sa")]]


# ---------------------------------------------------------------- numpy helpers (no torch)

def ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def huge_array(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 [nbytes], 2 MB-aligned and advised MADV_HUGEPAGE before the first
    touch (the untouched slack is never resident); plain memory where the OS refuses."""
    base = np.empty(nbytes + HUGE, dtype=np.uint8)
    off = -ptr(base) % HUGE
    view = base[off:off + nbytes]
    binding.lib().bn_advise_huge(ptr(view), nbytes, 0)
    return view


def collapse_huge(a: np.ndarray) -> bool:
    """Move an already-written array onto huge pages in place (MADV_COLLAPSE); False if refused."""
    return binding.lib().bn_advise_huge(ptr(a), a.nbytes, 1) > 0


def convert(packed: np.ndarray, layout: str, out: np.ndarray) -> np.ndarray:
    """HF packed uint8 [N/4, K] -> the kernel layout (bitnet_cpu.h) in ``out`` (uint8 [layout_bytes])."""
    p = np.ascontiguousarray(packed)
    n, k = p.shape[0] * 4, p.shape[1]
    if p.dtype != np.uint8 or out.nbytes != layout_bytes(n, k, layout) or not out.flags.c_contiguous:
        raise ValueError(f"convert: {p.dtype} {list(p.shape)} into {out.nbytes} bytes ({layout})")
    lib = binding.lib()
    (lib.bn_convert_b3 if LAYOUTS[layout] else lib.bn_convert_hf)(ptr(p), n, k, ptr(out))
    return out


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) -> float32, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), round to nearest even as torch's ``.to(bfloat16)``."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = ((u + np.uint32(0x7FFF) + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    if nan.any():
        r[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return r


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded through ``dtype`` (as ``t.to(dtype).float()``), float32 out."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "bfloat16":
        return bf16_to_f32(f32_to_bf16(x))
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    return x


def rope_tables(head_dim: int, n: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin float32 [n, head_dim] as ``model.rope_tables`` (inv_freq bitwise equal; cos/sin
    rounded once from float64, within 1 fp32 ulp of torch's and equal after a bf16 rounding)."""
    e = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv = np.float32(1.0) / (float(theta) ** e.astype(np.float64)).astype(np.float32)
    freqs = np.arange(n, dtype=np.float32)[:, None] * inv[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1).astype(np.float64)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def quantize_rows_int8(rows, v: int, d: int, out: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Per-row absmax int8 of a [v, d] table read by ``rows(i0, i1) -> float32``: q into ``out``
    (int8 [v, d]), returns the fp32 scales [v] (W ≈ q * scale[:, None])."""
    scale = np.empty(v, dtype=np.float32)
    for i in range(0, v, chunk):                 # chunks: never a full fp32 copy of the table
        wf = rows(i, min(v, i + chunk))
        s = np.maximum(np.abs(wf).max(axis=1), np.float32(1e-12)) / np.float32(127.0)
        out[i:i + len(wf)] = np.clip(np.rint(wf / s[:, None]), -127, 127).astype(np.int8)
        scale[i:i + len(wf)] = s
    return scale


def bandwidth(nbytes: int = 1 << 30, reps: int = 3, huge: bool = True) -> float:
    """Streaming-read bandwidth in GB/s with the current thread count (the decode floor): a 512-bit
    load loop with software prefetch over ``nbytes`` on huge pages (``huge=False``: plain 4 KB
    pages, the way memory from a default allocation is mapped), best of ``reps``."""
    buf = huge_array(nbytes) if huge else np.empty(nbytes, dtype=np.uint8)
    buf.fill(1)
    return float(binding.lib().bn_bandwidth(ptr(buf), nbytes, reps))


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), e.g. after dropping a model."""
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------- the model

def default_layout() -> str:
    """B3 (1.6 bits/weight) where a vector path decodes it (AVX-512 VBMI), else T16 (2 bits, every
    path; the scalar path runs both); ``BITNET158_CPU_LAYOUT=t16|b3`` overrides."""
    env = os.environ.get("BITNET158_CPU_LAYOUT")
    if env:
        if env not in LAYOUTS:
            raise ConfigError(f"BITNET158_CPU_LAYOUT={env!r}: expected one of {', '.join(LAYOUTS)}")
        return env
    return "b3" if binding.lib().bn_get_isa() != b"scalar" and layout_native("b3") else "t16"


HEADS = ("bf16", "int8")


def default_head() -> str:
    """The head precision when none is asked for: ``BITNET158_CPU_HEAD`` (bf16 | int8), else bf16."""
    env = os.environ.get("BITNET158_CPU_HEAD") or "bf16"
    if env not in HEADS:
        raise ConfigError(f"BITNET158_CPU_HEAD={env!r}: expected one of {', '.join(HEADS)}")
    return env


class CModel:
    """The C forward over numpy buffers (see the module docstring). ``name`` words the errors."""

    def __init__(self, source, batch: int = 1, max_len: int | None = None, head: str | None = None,
                 kv_bf16: bool | None = None, prefill_chunk: int = PREFILL_CHUNK, threads: int | None = None,
                 layout: str | None = None, name: str = "CpuRunner"):
        lib = binding.lib()
        if lib is None:
            raise RuntimeError(f"{name}: C kernels unavailable ({binding.error()})")
        head = head or default_head()
        if head not in HEADS:
            raise ValueError(f"{name}: head={head!r} (expected 'bf16' or 'int8')")
        layout = layout or default_layout()
        if layout not in LAYOUTS:
            raise ValueError(f"{name}: layout={layout!r} (expected 't16' or 'b3')")
        if lib.bn_model_sizeof() != ctypes.sizeof(_Model) or lib.bn_layer_sizeof() != ctypes.sizeof(_Layer):
            raise RuntimeError(f"{name}: C struct layout mismatch (rebuild the extension)")
        self.name, self.layout, self._lib = name, layout, lib
        lib.bn_set_threads(int(threads or binding.default_threads()))
        cfg = self.config = source.config
        self.batch = int(batch)
        self.max_len = min(max_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.vocab_size = cfg.vocab_size
        self.head_kind = head
        self.prefill_chunk = max(1, int(prefill_chunk))
        kv_bf16 = source.dtype != "float32" if kv_bf16 is None else kv_bf16
        D, H, Hkv, hd, F = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size
        shapes = {"self_attn.q_proj": (H * hd, D), "self_attn.k_proj": (Hkv * hd, D), "self_attn.v_proj": (Hkv * hd, D),
                  "self_attn.o_proj": (D, H * hd), "mlp.gate_proj": (F, D), "mlp.up_proj": (F, D), "mlp.down_proj": (D, F)}
        keep = self._keep = []                         # every array the C side points into

        def hold(a: np.ndarray) -> int:           # fp32 vectors and tables the C side reads
            a = np.ascontiguousarray(a, dtype=np.float32)
            keep.append(a)
            return ptr(a)

        def group_bytes(names) -> int:
            return sum(layout_bytes(*shapes[n], layout) for n in names)

        layers = self._layers = (_Layer * cfg.num_hidden_layers)()
        s_pad = pad16(self.max_len)                    # K is cached in blocks of 16 positions
        kv_shape = (self.batch, Hkv, s_pad, hd)
        self._kv = []
        # every ternary matrix of the model in one arena on huge pages, in the order decode reads it
        total = cfg.num_hidden_layers * sum(group_bytes(names) for _, names in GROUPS)
        arena, byte = huge_array(total), 0
        keep.append(arena)
        self.ternary_bytes = total
        offs = {}
        for i in range(cfg.num_hidden_layers):
            L, p = layers[i], f"model.layers.{i}."
            for gname, names in GROUPS:
                gam, off, start = [], [], byte
                for n in names:                        # each matrix padded to 16 rows
                    rows, size = pad16(shapes[n][0]), layout_bytes(*shapes[n], layout)
                    packed, gamma = source.projection(p + n)
                    convert(packed, layout, arena[byte:byte + size])
                    del packed
                    gam.append(np.full(rows // 16, gamma, dtype=np.float32))
                    off.append(sum(pad16(shapes[m][0]) for m in names[:len(off)]))
                    byte += size
                offs[gname] = off
                setattr(L, "w" + gname, ptr(arena[start:]))
                setattr(L, "g" + gname, hold(np.concatenate(gam)))
            dt = np.uint16 if kv_bf16 else np.float32
            kc, vc = np.empty(kv_shape, dtype=dt), np.empty(kv_shape, dtype=dt)   # untouched: not resident
            self._kv.append((kc, vc))
            L.kc, L.vc = ptr(kc), ptr(vc)
            L.ln_in, L.ln_post = hold(source.vector(p + "input_layernorm.weight")), hold(source.vector(p + "post_attention_layernorm.weight"))
            L.ln_attn, L.ln_ffn = hold(source.vector(p + "self_attn.attn_sub_norm.weight")), hold(source.vector(p + "mlp.ffn_sub_norm.weight"))
        M = self._M = _Model()
        M.n_layers, M.d, M.h, M.hkv, M.hd, M.f = cfg.num_hidden_layers, D, H, Hkv, hd, F
        M.vocab, M.batch, M.max_len = cfg.vocab_size, self.batch, s_pad
        M.kv_bf16, M.layout = int(kv_bf16), LAYOUTS[layout]
        M.eps, M.attn_scale = cfg.rms_norm_eps, hd ** -0.5
        M.q_off, M.k_off, M.v_off = offs["qkv"]
        M.nqkv = offs["qkv"][2] + pad16(Hkv * hd)
        M.f_pad = offs["gu"][1]
        M.kp_d, M.kp_q, M.kp_f = kpad(D, layout), kpad(H * hd, layout), kpad(F, layout)
        cos, sin = source.rope(s_pad)
        M.rope_cos, M.rope_sin = hold(cos), hold(sin)
        M.ln_final = hold(source.vector("model.norm.weight"))
        self._head(source, head)
        M.layers = layers
        self._buffers()

    def _head(self, source, head: str) -> None:
        """The head table (bf16/fp32 as the model holds it, or per-row int8) and the embedding."""
        M, V, D = self._M, self.config.vocab_size, self.config.hidden_size
        hname = "model.embed_tokens.weight" if source.tied else "lm_head.weight"
        if head == "int8":
            hq = huge_array(V * D).view(np.int8).reshape(V, D)
            hs = quantize_rows_int8(lambda i0, i1: source.rows(hname, i0, i1), V, D, hq)
            self._keep += [hq, hs]
            M.head, M.head_kind, M.head_scale, M.head_round_bf16 = ptr(hq), HEAD_KINDS["int8"], ptr(hs), 0
            if source.tied:                                # one int8 table serves both ends
                M.embed, M.embed_kind, M.embed_scale = ptr(hq), HEAD_KINDS["int8"], ptr(hs)
            self.head_bytes = hq.nbytes + hs.nbytes
        else:
            hw = source.table(hname)
            kind = "bf16" if hw.dtype == np.uint16 else "f32"
            self._keep.append(hw)
            M.head, M.head_kind, M.head_scale = ptr(hw), HEAD_KINDS[kind], None
            M.head_round_bf16 = int(kind == "bf16")
            self.head_bytes = hw.nbytes
        if not (head == "int8" and source.tied):
            ew = hw if head == "bf16" and source.tied else source.table("model.embed_tokens.weight")
            self._keep.append(ew)
            M.embed, M.embed_kind, M.embed_scale = ptr(ew), HEAD_KINDS["bf16" if ew.dtype == np.uint16 else "f32"], None

    def _buffers(self) -> None:
        """The decode activation buffers (``batch`` tokens per call, kept), the attention scratch, and
        the sizes the prefill buffers use (allocated per prefill call and freed after it, so ~17 MB
        of 2B4T prefill activations are not resident while decoding)."""
        c, M = self.config, self._M
        self._ldt = max(M.kp_d, M.kp_q, M.kp_f, pad16(c.intermediate_size))
        self._scratch = np.empty((max(self._lib.bn_get_threads(), 64), 4 * M.max_len), dtype=np.float32)
        M.scratch, M.ldt = ptr(self._scratch), self._ldt
        self._dec = self._alloc(max(1, self.batch))
        self._point(self._dec)
        self._out_ids = np.arange(max(1, self.batch), dtype=np.int32)   # decode: every token's logits
        self._row_ids: dict[tuple, np.ndarray] = {}

    def _alloc(self, max_m: int) -> tuple[dict, int]:
        """Activation buffers for up to max_m tokens per call."""
        c, M, f = self.config, self._M, np.float32
        kp = max(M.kp_d, M.kp_q, M.kp_f)
        bufs = dict(
            x=np.empty((max_m, c.hidden_size), f), t=np.empty((max_m, self._ldt), f), qkv=np.empty((max_m, M.nqkv), f),
            att=np.empty((max_m, c.num_attention_heads * c.head_dim), f), gu=np.empty((max_m, 2 * M.f_pad), f),
            hout=np.empty((max_m, c.hidden_size), f), xq=np.empty((max_m, kp), np.int8), sx=np.empty(max_m, f),
            sa=np.empty(max_m, np.int32))
        return bufs, max_m

    def _point(self, bufs: tuple[dict, int]) -> None:
        for k, v in bufs[0].items():
            setattr(self._M, k, ptr(v))
        self._M.max_m = bufs[1]

    # ------------------------------------------------------------------ calls
    def _rows(self, rows, n: int) -> list[int]:
        if rows is None:
            if n != self.batch:
                raise ValueError(f"runner: got {n} rows but the runner has batch={self.batch}; "
                                 f"pass rows= to run on a subset")
            return list(range(n))
        r = [int(i) for i in rows]
        if len(r) != n:
            raise ValueError(f"runner: rows has {len(r)} entries for {n} input rows")
        if any(not 0 <= i < self.batch for i in r):
            raise ValueError(f"runner: rows {r} out of range for batch={self.batch}")
        return r

    def _check(self, tokens: np.ndarray, pos: np.ndarray) -> None:
        hi, lo = int(pos.max()), int(pos.min())
        if hi >= self.max_len or lo < 0:
            raise ValueError(f"runner: position {hi if hi >= self.max_len else lo} outside the KV cache "
                             f"(max_len={self.max_len})")
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size:
            raise ValueError(f"runner: token id outside the vocabulary (size {self.vocab_size})")

    def prefill(self, tokens, pos, rows=None, lengths=None) -> np.ndarray:
        """tokens, pos int [B, T] -> float32 logits [B, V] of the last position of each row (with
        ``lengths`` int [B]: of column ``lengths[b] - 1``; the columns after it are padding and do
        not run)."""
        tokens, pos = np.asarray(tokens), np.asarray(pos)
        if tokens.ndim != 2 or pos.shape != tokens.shape:
            raise ValueError(f"runner: tokens {list(tokens.shape)} and pos {list(pos.shape)} must both be [B, T]")
        B, T = tokens.shape
        r = self._rows(rows, B)
        self._check(tokens, pos)        # before any chunk runs: a bad position leaves the cache as it was
        tok32, pos32 = tokens.astype(np.int32), pos.astype(np.int32)
        row32 = np.ascontiguousarray(np.broadcast_to(np.array(r, dtype=np.int32)[:, None], (B, T)))
        if lengths is not None:      # engine.runner.check_lengths's checks, without torch
            n = np.asarray(lengths, dtype=np.int64).reshape(-1)
            if n.size != B:
                raise ValueError(f"runner: lengths has {n.size} entries for {B} rows")
            bad = n[(n < 1) | (n > T)]
            if bad.size:
                raise ValueError(f"runner: lengths {bad.tolist()} outside 1..{T} (the prefill's {T} columns)")
            if (n < T).any():
                return self._prefill_ragged(tok32, pos32, row32, n - 1)
        bufs = self._dec if B * T <= self._dec[1] else self._alloc(max(B, min(B * T, self.prefill_chunk)))
        self._point(bufs)
        try:
            cols = max(1, self._M.max_m // B)
            logits = np.empty((B, self.vocab_size), dtype=np.float32)
            for c0 in range(0, T, cols):
                c1 = min(T, c0 + cols)
                last = c1 == T
                tk, ps, rw = (np.ascontiguousarray(a[:, c0:c1]) for a in (tok32, pos32, row32))
                n = c1 - c0
                out_idx = np.arange(B, dtype=np.int32) * n + (n - 1)
                rc = self._lib.bn_forward(ctypes.byref(self._M), B * n, ptr(tk), ptr(ps), ptr(rw),
                                          B if last else 0, ptr(out_idx), ptr(logits))
                if rc:
                    raise RuntimeError(f"{self.name}: bn_forward failed ({rc})")
        finally:
            self._point(self._dec)           # the prefill buffers (if any) are freed on return
        return logits

    def _prefill_ragged(self, tok32, pos32, row32, last) -> np.ndarray:
        """Rows of different lengths: only the real tokens run (row b's columns ``0..last[b]``),
        column by column (a row's earlier positions never come in a later call than its later
        ones), in calls of at most ``max_m`` tokens; each row's logits from its last token's call."""
        B, T = tok32.shape
        real = np.arange(T)[:, None] <= last[None, :]                                  # [T, B]
        t_idx, b_idx = np.nonzero(real)                                                # column-major
        flat = [np.ascontiguousarray(a.T[real]) for a in (tok32, pos32, row32)]       # [n] each
        n = t_idx.size
        is_end = t_idx == last[b_idx]                           # [n] a row's last real token
        end = np.empty(B, dtype=np.int64)                       # flat index of each row's last token
        end[b_idx[is_end]] = np.nonzero(is_end)[0]
        bufs = self._dec if n <= self._dec[1] else self._alloc(max(B, min(n, self.prefill_chunk)))
        self._point(bufs)
        try:
            m = self._M.max_m
            logits = np.empty((B, self.vocab_size), dtype=np.float32)
            for c0 in range(0, n, m):
                c1 = min(n, c0 + m)
                outs = np.nonzero((end >= c0) & (end < c1))[0]                        # rows ending here
                out_idx = np.ascontiguousarray(end[outs] - c0, dtype=np.int32)
                got = np.empty((max(1, outs.size), self.vocab_size), dtype=np.float32)
                tk, ps, rw = (np.ascontiguousarray(a[c0:c1]) for a in flat)
                rc = self._lib.bn_forward(ctypes.byref(self._M), c1 - c0, ptr(tk), ptr(ps), ptr(rw),
                                          int(outs.size), ptr(out_idx), ptr(got))
                if rc:
                    raise RuntimeError(f"{self.name}: bn_forward failed ({rc})")
                logits[outs] = got[:outs.size]
        finally:
            self._point(self._dec)
        return logits

    def decode(self, tokens, pos, rows=None) -> np.ndarray:
        """tokens, pos int [B] -> float32 logits [B, V]. One C call; the C side checks every token,
        position and row before it runs anything (the checks here only word the error)."""
        tok32 = np.ascontiguousarray(tokens, dtype=np.int32).reshape(-1)
        pos32 = np.ascontiguousarray(pos, dtype=np.int32).reshape(-1)
        B = tok32.size
        if pos32.size != B or B > self._M.max_m:
            return self.prefill(tok32.reshape(-1, 1), pos32.reshape(-1, 1), rows)
        r = self._rows(rows, B)
        if int(pos32.max()) >= self.max_len:     # the C side knows only the padded cache length
            self._check(tok32, pos32)
        row32 = self._row_ids.get(tuple(r))
        if row32 is None:
            row32 = self._row_ids.setdefault(tuple(r), np.array(r, dtype=np.int32))
        logits = np.empty((B, self.vocab_size), dtype=np.float32)
        rc = self._lib.bn_forward(ctypes.byref(self._M), B, ptr(tok32), ptr(pos32), ptr(row32),
                                  B, ptr(self._out_ids), ptr(logits))
        if rc:
            self._check(tok32, pos32)
            raise RuntimeError(f"{self.name}: bn_forward failed ({rc})")
        return logits

    def nbytes(self) -> int:
        """Bytes held by the weights and KV cache (KV counted at full size)."""
        seen, total = set(), 0
        for a in [*self._keep, *(x for kv in self._kv for x in kv)]:
            if ptr(a) not in seen:
                seen.add(ptr(a))
                total += a.nbytes
        return total


__all__ = ["CModel", "PREFILL_CHUNK", "HEAD_KINDS", "GROUPS", "huge_array", "collapse_huge", "convert",
           "bf16_to_f32", "f32_to_bf16", "round_to", "rope_tables", "quantize_rows_int8", "bandwidth", "default_layout", "default_head", "ptr",
           "release_memory"]
