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
The model struct, arena, head tables and prefill chunking are :class:`~.cmodel.CModel`, shared with
the torch-free engine (:mod:`.lite`); this class reads the torch model into it and converts the
tensors at the boundary.
"""

from __future__ import annotations

import numpy as np
import torch

from . import binding
from .cmodel import PREFILL_CHUNK, CModel, collapse_huge, default_layout, release_memory


def supports(model) -> bool:
    """Whether this runner can run ``model`` (CPU, the library loads, relu2 Llama-style blocks)."""
    cfg = model.config
    return (model.device.type == "cpu" and getattr(cfg, "hidden_act", "relu2") == "relu2"
            and cfg.head_dim % 2 == 0 and binding.lib() is not None)


def _np(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor (bf16 as its uint16 bit patterns); the view keeps ``t`` alive."""
    t = t.detach().contiguous()
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


class _TorchSource:
    """A torch ``Transformer`` as a :class:`~.cmodel.CModel` weight source (cmodel's docstring)."""

    def __init__(self, model):
        self.model, self.config = model, model.config
        self.dtype = str(model.dtype).removeprefix("torch.")
        self._mods = dict(model.named_modules())
        self.tied = model.head_weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    def projection(self, prefix: str) -> tuple[np.ndarray, float]:
        """(HF packed uint8 [out/4, in], gamma) of a PackedLinear, or of a BitLinear ternarized now."""
        from ... import quant
        mod = self._mods[prefix]
        if hasattr(mod, "weight_scale"):
            return _np(mod.weight), float(mod.weight_scale.float().reshape(-1)[0])
        w_t, gamma = quant.ternarize(mod.weight.detach())
        return _np(quant.pack_hf(w_t)), float(gamma)

    def vector(self, name: str) -> np.ndarray:
        return _np(self.model.get_parameter(name).detach().float())

    def rope(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The reference's own tables, rounded through the model dtype (as it applies them)."""
        m = self.model
        return _np(m.rope_cos[:n].to(m.dtype).float()), _np(m.rope_sin[:n].to(m.dtype).float())

    def _weight(self, name: str) -> torch.Tensor:
        return self.model.head_weight.detach() if name == "lm_head.weight" else self.model.get_parameter(name).detach()

    def table(self, name: str) -> np.ndarray:
        """The model's own bf16/fp32 table (moved onto huge pages in place); fp16 widened to fp32."""
        w = self._weight(name)
        w = (w if w.dtype in (torch.bfloat16, torch.float32) else w.float()).contiguous()
        a = _np(w)
        collapse_huge(a)
        return a

    def rows(self, name: str, i0: int, i1: int) -> np.ndarray:
        return self._weight(name)[i0:i1].float().numpy()


class CpuRunner:
    """Runner protocol (``bitnet158.engine.runner``) over the C forward: torch tensors in and out
    around a :class:`~.cmodel.CModel` built from the model. See the module docstring."""

    name = "cpu"

    def __init__(self, model, batch: int = 1, max_len: int | None = None, head: str | None = None,
                 kv_dtype: torch.dtype | None = None, prefill_chunk: int = PREFILL_CHUNK,
                 threads: int | None = None, layout: str | None = None):
        if kv_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"CpuRunner: kv_dtype={kv_dtype} (expected float32 or bfloat16)")
        if binding.lib() is None:
            raise RuntimeError(f"CpuRunner: C kernels unavailable ({binding.error()})")
        with torch.no_grad():
            self._wrap(CModel(_TorchSource(model), batch=batch, max_len=max_len, head=head,
                              kv_bf16=None if kv_dtype is None else kv_dtype == torch.bfloat16,
                              prefill_chunk=prefill_chunk, threads=threads or torch.get_num_threads(),
                              layout=layout or default_layout(), name="CpuRunner"))

    def _wrap(self, core: CModel) -> None:
        c = self._core = core
        self.config, self.batch, self.max_len, self.vocab_size = c.config, c.batch, c.max_len, c.vocab_size
        self.layout, self.head_kind, self.prefill_chunk = c.layout, c.head_kind, c.prefill_chunk
        self.ternary_bytes, self.head_bytes = c.ternary_bytes, c.head_bytes
        self.device = torch.device("cpu")
        self._lib, self._M = c._lib, c._M

    # ------------------------------------------------------------------ Runner protocol
    def reset(self) -> None:
        """Forget every row (slots past a row's position are never read, so nothing is zeroed)."""

    @staticmethod
    def _rows(rows):
        return None if rows is None else [int(i) for i in rows]

    def prefill(self, tokens: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor | None = None,
                lengths: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """tokens, pos [B, T] -> float32 logits [B, V] of the last position of each row (with
        ``lengths``: of position ``lengths[b] - 1``; the padding after it does not run)."""
        if tokens.dim() != 2 or pos.shape != tokens.shape:
            raise ValueError(f"runner: tokens {list(tokens.shape)} and pos {list(pos.shape)} must both be [B, T]")
        if lengths is not None:
            lengths = torch.as_tensor(lengths).reshape(-1).cpu().numpy()
        return torch.from_numpy(self._core.prefill(tokens.to(torch.int32).numpy(), pos.to(torch.int32).numpy(),
                                                   self._rows(rows), lengths))

    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, pos [B] -> float32 logits [B, V] (one C call)."""
        return torch.from_numpy(self._core.decode(tokens.reshape(-1).to(torch.int32).numpy(),
                                                  pos.reshape(-1).to(torch.int32).numpy(), self._rows(rows)))

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_pretrained(cls, path, batch: int = 1, max_len: int | None = None, head: str | None = None,
                        **kw) -> "CpuRunner":
        """The runner of a checkpoint folder, only the kernel copy resident. A packed folder is read
        straight into the C model (no torch model is built: lower peak memory); a master-weight
        folder is loaded (ternarized) with the torch loader first."""
        from . import lite
        if lite.supported(path):
            kv = kw.get("kv_dtype")
            source, self = lite.FolderSource(path), cls.__new__(cls)
            self._wrap(CModel(source, batch=batch, max_len=max_len, head=head,
                              kv_bf16=None if kv is None else kv == torch.bfloat16,
                              threads=kw.get("threads") or torch.get_num_threads(), layout=kw.get("layout"),
                              prefill_chunk=kw.get("prefill_chunk", PREFILL_CHUNK), name="CpuRunner"))
            source.close()
            release_memory()
            return self
        from ... import checkpoint
        model = checkpoint.load(path)
        runner = cls(model, batch=batch, max_len=max_len, head=head, **kw)
        del model
        release_memory()
        return runner

    def nbytes(self) -> int:
        """Bytes held by the runner's weights and KV cache (KV counted at full size)."""
        return self._core.nbytes()


@torch.no_grad()
def with_int8_head(model):
    """``model`` with its head (and, when tied, its embedding) replaced in place by the dequantized
    per-row int8 table the ``head="int8"`` runner uses: ``perplexity(with_int8_head(m), ...)`` measures
    the int8 head's cost with any torch code path (same numbers up to fp32 summation order)."""
    w = model.head_weight
    from .ops import quantize_rows_int8
    q, s = quantize_rows_int8(w)
    for i in range(0, w.shape[0], 8192):
        w[i:i + 8192] = (q[i:i + 8192].float() * s[i:i + 8192, None]).to(w.dtype)
    return model


def _register() -> None:
    try:
        from ...engine import register_runner
    except ImportError:
        return
    def factory(model, batch=1, max_len=None):
        return CpuRunner(model, batch, max_len)          # head: BITNET158_CPU_HEAD, else bf16

    register_runner("cpu", factory=factory, available=supports, priority=10)


_register()

__all__ = ["CpuRunner", "supports", "release_memory", "with_int8_head", "PREFILL_CHUNK"]
