"""The CPU runner: the whole decoder forward in C (forward.c) behind the engine's Runner protocol.

    from bitnet158.kernels.cpu.runner import CpuRunner
    runner = CpuRunner(model, batch=1, max_len=512, head="bf16")    # or head="int8"
    logits = runner.prefill(tokens, pos)     # [B, T] -> fp32 [B, V] (last position of each row)
    logits = runner.decode(tok, pos)         # [B]    -> fp32 [B, V]
    runner = CpuRunner.from_pretrained("path/to/model", head="int8")  # keeps only the kernel copy

Importing this module registers it with ``bitnet158.engine`` as "cpu" (priority 10), so
``make_runner(model)`` / ``generate`` / ``chat`` / ``serve`` use it on CPU whenever the C library
loads (``BITNET158_CPU_HEAD=int8`` selects the int8 head there). At construction the runner
converts every projection to the kernel layout (B3, 1.6 bits/weight, where AVX-512 VBMI decodes it,
else T16, 2 bits; ``layout=`` overrides) into one arena on huge pages (q|k|v and gate|up fused),
copies the norms to fp32 and keeps a reference to the embedding table, which the bf16 head reads
in place (tied weights: one copy; moved onto huge pages in place). ``head="int8"`` quantizes the head per row
(absmax, fp32 row scales) and, when tied, serves the embedding lookup from that table too, so the
bf16 table can be freed. Compute is fp32; the KV cache is bf16 for bf16/fp16 models (as the
reference keeps it), fp32 for fp32 models. Nothing is allocated per token; decode buffers are sized
once for ``batch`` tokens, prefill buffers (up to ``prefill_chunk`` tokens per call) per prefill.
"""

from __future__ import annotations

import ctypes
import gc
import os
from ctypes import POINTER, Structure, c_float, c_int, c_void_p

import torch

from ...errors import ConfigError
from . import (HEAD_KINDS, LAYOUTS, binding, collapse_huge, convert, huge_empty, kpad, layout_bytes, layout_native,
               pad16, quantize_rows_int8)

PREFILL_CHUNK = 128   # tokens per forward call during prefill (bounds the activation buffers)


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


def _projection(mod) -> tuple[torch.Tensor, float]:
    """(HF packed uint8 [out/4, in], gamma) of a PackedLinear, or of a BitLinear ternarized now."""
    from ... import quant
    if hasattr(mod, "weight_scale"):
        return mod.weight, float(mod.weight_scale.float().reshape(-1)[0])
    w_t, gamma = quant.ternarize(mod.weight.detach())
    return quant.pack_hf(w_t), float(gamma)


def _groups(blk) -> list[tuple[str, list]]:
    """The kernel matrices of one block: q|k|v and gate|up fused (one pass over their input)."""
    at, mlp = blk.self_attn, blk.mlp
    return [("qkv", [at.q_proj, at.k_proj, at.v_proj]), ("o", [at.o_proj]),
            ("gu", [mlp.gate_proj, mlp.up_proj]), ("down", [mlp.down_proj])]


def _fused_bytes(mods, layout: str) -> int:
    if len({m.in_features for m in mods}) != 1:
        raise ValueError("fused projections must share in_features")
    return sum(layout_bytes(m.out_features, m.in_features, layout) for m in mods)


def _fused(mods, layout: str, out: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Convert matrices (each padded to 16 rows) one after another into ``out`` (a slice of the
    weight arena) -> (gamma per 16-row tile, row offset of each matrix)."""
    gs, offs, off, byte = [], [], 0, 0
    for mod in mods:
        n, size = pad16(mod.out_features), layout_bytes(mod.out_features, mod.in_features, layout)
        packed, gamma = _projection(mod)
        convert(packed, layout, out=out[byte:byte + size])
        gs.append(torch.full((n // 16,), gamma, dtype=torch.float32))
        offs.append(off)
        off, byte = off + n, byte + size
    return torch.cat(gs), offs


def default_layout() -> str:
    """B3 (1.6 bits/weight) where a vector path decodes it (AVX-512 VBMI), else T16 (2 bits, every
    path; the scalar path runs both); ``BITNET158_CPU_LAYOUT=t16|b3`` overrides."""
    env = os.environ.get("BITNET158_CPU_LAYOUT")
    if env:
        if env not in LAYOUTS:
            raise ConfigError(f"BITNET158_CPU_LAYOUT={env!r}: expected one of {', '.join(LAYOUTS)}")
        return env
    return "b3" if binding.lib().bn_get_isa() != b"scalar" and layout_native("b3") else "t16"


def supports(model) -> bool:
    """Whether this runner can run ``model`` (CPU, the library loads, relu2 Llama-style blocks)."""
    cfg = model.config
    return (model.device.type == "cpu" and getattr(cfg, "hidden_act", "relu2") == "relu2"
            and cfg.head_dim % 2 == 0 and binding.lib() is not None)


class CpuRunner:
    """Runner protocol (``bitnet158.engine.runner``) over the C forward. See the module docstring."""

    name = "cpu"

    def __init__(self, model, batch: int = 1, max_len: int | None = None, head: str = "bf16",
                 kv_dtype: torch.dtype | None = None, prefill_chunk: int = PREFILL_CHUNK,
                 threads: int | None = None, layout: str | None = None):
        lib = binding.lib()
        if lib is None:
            raise RuntimeError(f"CpuRunner: C kernels unavailable ({binding.error()})")
        if head not in ("bf16", "int8"):
            raise ValueError(f"CpuRunner: head={head!r} (expected 'bf16' or 'int8')")
        layout = layout or default_layout()
        if layout not in LAYOUTS:
            raise ValueError(f"CpuRunner: layout={layout!r} (expected 't16' or 'b3')")
        self.layout = layout
        self._lib = lib
        lib.bn_set_threads(int(threads or torch.get_num_threads()))
        cfg = model.config
        self.config = cfg
        self.batch = int(batch)
        self.max_len = min(max_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.vocab_size = cfg.vocab_size
        self.device = torch.device("cpu")
        self.head_kind = head
        self.prefill_chunk = max(1, int(prefill_chunk))
        mdtype = model.dtype
        kv_dtype = kv_dtype or (torch.float32 if mdtype == torch.float32 else torch.bfloat16)
        if kv_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"CpuRunner: kv_dtype={kv_dtype} (expected float32 or bfloat16)")
        D, H, Hkv, hd, F = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size
        keep = []                                          # every tensor the C side points into

        def f32(t):
            t = t.detach().float().contiguous()
            keep.append(t)
            return t.data_ptr()

        with torch.no_grad():
            layers = (_Layer * cfg.num_hidden_layers)()
            s_pad = pad16(self.max_len)                     # K is cached in blocks of 16 positions
            kv_shape = (self.batch, Hkv, s_pad, hd)
            self._kv = []
            # every ternary matrix of the model in one arena on huge pages, in the order decode reads it
            total = sum(_fused_bytes(mods, layout) for blk in model.model.layers for _, mods in _groups(blk))
            arena, byte = huge_empty(total), 0
            keep.append(arena)
            self.ternary_bytes = total
            for i, blk in enumerate(model.model.layers):
                L = layers[i]
                for name, mods in _groups(blk):
                    size = _fused_bytes(mods, layout)
                    w = arena[byte:byte + size]
                    gam, offs = _fused(mods, layout, w)
                    byte += size
                    keep.append(gam)
                    setattr(L, "w" + name, w.data_ptr())
                    setattr(L, "g" + name, gam.data_ptr())
                    if name == "qkv":
                        qkv_off = offs
                    elif name == "gu":
                        gu_off = offs
                kc = torch.empty(kv_shape, dtype=kv_dtype)    # untouched pages are not resident
                vc = torch.empty(kv_shape, dtype=kv_dtype)
                self._kv.append((kc, vc))
                L.kc, L.vc = kc.data_ptr(), vc.data_ptr()
                L.ln_in, L.ln_post = f32(blk.input_layernorm.weight), f32(blk.post_attention_layernorm.weight)
                L.ln_attn, L.ln_ffn = f32(blk.self_attn.attn_sub_norm.weight), f32(blk.mlp.ffn_sub_norm.weight)
            M = _Model()
            M.n_layers, M.d, M.h, M.hkv, M.hd, M.f = cfg.num_hidden_layers, D, H, Hkv, hd, F
            M.vocab, M.batch, M.max_len = cfg.vocab_size, self.batch, s_pad
            M.kv_bf16 = int(kv_dtype == torch.bfloat16)
            M.layout = int(layout == "b3")
            M.eps, M.attn_scale = cfg.rms_norm_eps, hd ** -0.5
            M.q_off, M.k_off, M.v_off = qkv_off
            M.nqkv = qkv_off[2] + pad16(Hkv * hd)
            M.f_pad = gu_off[1]
            M.kp_d, M.kp_q, M.kp_f = kpad(D, layout), kpad(H * hd, layout), kpad(F, layout)
            # RoPE tables as the reference uses them: fp32, rounded through the model dtype
            M.rope_cos = f32(model.rope_cos[:s_pad].to(mdtype))
            M.rope_sin = f32(model.rope_sin[:s_pad].to(mdtype))
            M.ln_final = f32(model.model.norm.weight)
            emb = model.model.embed_tokens.weight.detach()
            head_w = model.head_weight.detach()
            tied = head_w.data_ptr() == emb.data_ptr()
            if head == "int8":
                hq, hs = quantize_rows_int8(head_w, out=huge_empty(head_w.numel()).view(torch.int8).view(head_w.shape))
                keep += [hq, hs]
                M.head, M.head_kind, M.head_scale, M.head_round_bf16 = hq.data_ptr(), HEAD_KINDS[torch.int8], hs.data_ptr(), 0
                if tied:                                   # one int8 table serves both ends
                    M.embed, M.embed_kind, M.embed_scale = hq.data_ptr(), HEAD_KINDS[torch.int8], hs.data_ptr()
            else:
                hw = head_w if head_w.dtype in (torch.bfloat16, torch.float32) else head_w.float()
                hw = hw.contiguous()
                collapse_huge(hw)          # the model's own table, moved onto huge pages in place
                keep.append(hw)
                M.head, M.head_kind, M.head_scale = hw.data_ptr(), HEAD_KINDS[hw.dtype], None
                M.head_round_bf16 = int(hw.dtype == torch.bfloat16)
            if not (head == "int8" and tied):
                ew = emb if emb.dtype in (torch.bfloat16, torch.float32) else emb.float()
                ew = ew.contiguous()
                keep.append(ew)
                M.embed, M.embed_kind, M.embed_scale = ew.data_ptr(), HEAD_KINDS[ew.dtype], None
            M.layers = layers
            self.head_bytes = (hq.numel() + 4 * hs.numel()) if head == "int8" else hw.numel() * hw.element_size()
            self._keep, self._layers, self._M = keep, layers, M
            self._buffers()
        if lib.bn_model_sizeof() != ctypes.sizeof(_Model) or lib.bn_layer_sizeof() != ctypes.sizeof(_Layer):
            raise RuntimeError("CpuRunner: C struct layout mismatch (rebuild the extension)")

    def _buffers(self) -> None:
        """The decode activation buffers (``batch`` tokens per call, kept), the attention scratch, and
        the sizes the prefill buffers use (allocated per prefill call and freed after it, so ~17 MB
        of 2B4T prefill activations are not resident while decoding)."""
        c, M = self.config, self._M
        self._ldt = max(M.kp_d, M.kp_q, M.kp_f, pad16(c.intermediate_size))
        threads = self._lib.bn_get_threads()
        self._scratch = torch.empty(max(threads, 64), 4 * M.max_len)
        M.scratch, M.ldt = self._scratch.data_ptr(), self._ldt
        self._dec = self._alloc(max(1, self.batch))
        self._point(self._dec)
        self._out_ids = torch.arange(max(1, self.batch), dtype=torch.int32)   # decode: every token's logits
        self._row_ids: dict[tuple, torch.Tensor] = {}

    def _alloc(self, max_m: int) -> tuple[dict, int]:
        """Activation buffers for up to max_m tokens per call."""
        c, M = self.config, self._M
        nq = c.num_attention_heads * c.head_dim
        kp = max(M.kp_d, M.kp_q, M.kp_f)
        bufs = dict(
            x=torch.empty(max_m, c.hidden_size), t=torch.empty(max_m, self._ldt), qkv=torch.empty(max_m, M.nqkv),
            att=torch.empty(max_m, nq), gu=torch.empty(max_m, 2 * M.f_pad), hout=torch.empty(max_m, c.hidden_size),
            xq=torch.empty(max_m, kp, dtype=torch.int8), sx=torch.empty(max_m), sa=torch.empty(max_m, dtype=torch.int32))
        return bufs, max_m

    def _point(self, bufs: tuple[dict, int]) -> None:
        for k, v in bufs[0].items():
            setattr(self._M, k, v.data_ptr())
        self._M.max_m = bufs[1]

    # ------------------------------------------------------------------ Runner protocol
    def reset(self) -> None:
        """Forget every row (slots past a row's position are never read, so nothing is zeroed)."""

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

    def _check(self, tokens: torch.Tensor, pos: torch.Tensor) -> None:
        hi, lo = int(pos.max()), int(pos.min())
        if hi >= self.max_len or lo < 0:
            raise ValueError(f"runner: position {hi if hi >= self.max_len else lo} outside the KV cache "
                             f"(max_len={self.max_len})")
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size:
            raise ValueError(f"runner: token id outside the vocabulary (size {self.vocab_size})")

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, pos [B, T] -> float32 logits [B, V] of the last position of each row."""
        if tokens.dim() != 2 or pos.shape != tokens.shape:
            raise ValueError(f"runner: tokens {list(tokens.shape)} and pos {list(pos.shape)} must both be [B, T]")
        B, T = tokens.shape
        r = self._rows(rows, B)
        self._check(tokens, pos)        # before any chunk runs: a bad position leaves the cache as it was
        tok32 = tokens.to(torch.int32).contiguous()
        pos32 = pos.to(torch.int32).contiguous()
        row32 = torch.tensor(r, dtype=torch.int32)[:, None].expand(B, T).contiguous()
        bufs = self._dec if B * T <= self._dec[1] else self._alloc(max(B, min(B * T, self.prefill_chunk)))
        self._point(bufs)
        try:
            cols = max(1, self._M.max_m // B)
            logits = torch.empty(B, self.vocab_size, dtype=torch.float32)
            for c0 in range(0, T, cols):
                c1 = min(T, c0 + cols)
                last = c1 == T
                tk, ps, rw = (a[:, c0:c1].contiguous() for a in (tok32, pos32, row32))
                n = c1 - c0
                out_idx = torch.arange(B, dtype=torch.int32) * n + (n - 1)
                rc = self._lib.bn_forward(ctypes.byref(self._M), B * n, tk.data_ptr(), ps.data_ptr(), rw.data_ptr(),
                                          B if last else 0, out_idx.data_ptr(), logits.data_ptr())
                if rc:
                    raise RuntimeError(f"CpuRunner: bn_forward failed ({rc})")
        finally:
            self._point(self._dec)           # the prefill buffers (if any) are freed on return
        return logits

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, pos [B] -> float32 logits [B, V]. One C call; the C side checks every token,
        position and row before it runs anything (the checks here only word the error)."""
        tok32 = tokens.reshape(-1).to(torch.int32).contiguous()
        pos32 = pos.reshape(-1).to(torch.int32).contiguous()
        B = tok32.numel()
        if pos32.numel() != B or B > self._M.max_m:
            return self.prefill(tokens.reshape(-1, 1), pos.reshape(-1, 1), rows)
        r = self._rows(rows, B)
        if int(pos32.max()) >= self.max_len:     # the C side knows only the padded cache length
            self._check(tok32, pos32)
        row32 = self._row_ids.get(tuple(r))
        if row32 is None:
            row32 = self._row_ids.setdefault(tuple(r), torch.tensor(r, dtype=torch.int32))
        logits = torch.empty(B, self.vocab_size, dtype=torch.float32)
        rc = self._lib.bn_forward(ctypes.byref(self._M), B, tok32.data_ptr(), pos32.data_ptr(), row32.data_ptr(),
                                  B, self._out_ids.data_ptr(), logits.data_ptr())
        if rc:
            self._check(tok32, pos32)
            raise RuntimeError(f"CpuRunner: bn_forward failed ({rc})")
        return logits

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_pretrained(cls, path, batch: int = 1, max_len: int | None = None, head: str = "bf16",
                        **kw) -> "CpuRunner":
        """Load a checkpoint, convert it and drop the torch model: only the kernel copy stays resident."""
        from ... import checkpoint
        model = checkpoint.load(path)
        runner = cls(model, batch=batch, max_len=max_len, head=head, **kw)
        del model
        release_memory()
        return runner

    def nbytes(self) -> int:
        """Bytes held by the runner's weights and KV cache (KV counted at full size)."""
        seen, total = set(), 0
        for t in [*self._keep, *(x for kv in self._kv for x in kv)]:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total


@torch.no_grad()
def with_int8_head(model):
    """``model`` with its head (and, when tied, its embedding) replaced in place by the dequantized
    per-row int8 table the ``head="int8"`` runner uses: ``perplexity(with_int8_head(m), ...)`` measures
    the int8 head's cost with any torch code path (same numbers up to fp32 summation order)."""
    w = model.head_weight
    q, s = quantize_rows_int8(w)
    for i in range(0, w.shape[0], 8192):
        w[i:i + 8192] = (q[i:i + 8192].float() * s[i:i + 8192, None]).to(w.dtype)
    return model


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), e.g. after dropping a model."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _register() -> None:
    try:
        from ...engine import register_runner
    except ImportError:
        return
    def factory(model, batch=1, max_len=None):
        return CpuRunner(model, batch, max_len, head=os.environ.get("BITNET158_CPU_HEAD", "bf16"))

    register_runner("cpu", factory=factory, available=supports, priority=10)


_register()

__all__ = ["CpuRunner", "supports", "release_memory", "with_int8_head", "PREFILL_CHUNK"]
