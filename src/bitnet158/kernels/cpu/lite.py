"""The C engine straight from a model folder, without torch: numpy, ctypes and the safetensors file.

    from bitnet158.kernels.cpu.lite import LiteRunner
    runner = LiteRunner("path/to/bitnet-b1.58-2B-4T", head="int8")   # the engine's Runner protocol
    logits = runner.prefill(tokens, pos)                 # int [B, T] -> float32 numpy [B, V]

    from bitnet158.engine import generate                # the same generation loop as every engine
    ids = list(generate(runner, prompt_ids, SamplingParams(max_new_tokens=32)))

Why: ``import torch`` alone keeps ~0.23 GB resident; the released 2B4T's weights in the kernel layout
are 1.08 GB (bf16 head) / 0.75 GB (int8 head), so a process that never loads torch stays well under
1.3 / 0.95 GB. Greedy generation never imports torch; sampling and the repetition penalty use the
engine's torch sampler (the same draws for the same seed as every other engine).

The folder is validated by the same rules and messages as :mod:`bitnet158.checkpoint` (shared in
:mod:`bitnet158.folder`). Packed folders (the released ``offline`` autobitlinear layout, and the
inverse-scale ``bitlinear`` one) run directly; ``online`` master-weight folders need the torch loader
(ternarization at load) and are refused with a message saying so. The computation is the one of
:class:`~.runner.CpuRunner` (one :class:`~.cmodel.CModel`), so the logits equal the torch-side C
engine's (tests/kernels/test_cpu_lite.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import CheckpointError
from ... import folder as hf
from ...safetensors_io import array_refs, load_array
from . import binding
from .cmodel import (PREFILL_CHUNK, CModel, bf16_to_f32, collapse_huge, f32_to_bf16, huge_array, release_memory,
                     round_to, rope_tables)

DTYPES = ("bfloat16", "float16", "float32")


def _f32(a: np.ndarray, dtype: str) -> np.ndarray:
    """A stored array (bf16 as uint16 bits) as float32."""
    return bf16_to_f32(a) if dtype == "bfloat16" else np.asarray(a, dtype=np.float32)


class FolderSource:
    """A validated packed model folder as a :class:`~.cmodel.CModel` weight source (cmodel's docstring)."""

    def __init__(self, path, dtype: str | None = None):
        folder = hf.resolve(path)
        cfg = hf.read_config(folder)
        layout = hf.file_layout(cfg)
        if layout == "master":
            raise CheckpointError(f"{folder}: config.json says quantization_mode 'online' (float master "
                                  "weights): the torch-free engine runs packed folders only; load it with "
                                  "bitnet158.load (ternarizes at load) or save it packed first")
        refs, sources = array_refs(folder)
        infos = {n: hf.TensorInfo(r.dtype, r.shape, r.dtype.startswith(("float", "bfloat"))) for n, r in refs.items()}
        self._refs = refs
        hf.validate(cfg, infos, self._scalar, sources, folder)
        self.folder, self.config, self.layout = folder, cfg, layout
        self.dtype = dtype or cfg.dtype
        if self.dtype not in DTYPES:
            raise CheckpointError(f"{folder}: dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        self.tied = cfg.tie_word_embeddings

    def close(self) -> None:
        """Forget the tensor index (the C copy of the weights stays)."""
        self._refs = {}

    def _read(self, name: str, i0: int = 0, i1: int | None = None) -> np.ndarray:
        """Rows i0:i1 of a stored tensor as float32 (read from the file now)."""
        ref = self._refs[name]
        return _f32(load_array(ref, i0, i1), ref.dtype)

    def _scalar(self, name: str) -> float:
        return float(self._read(name).reshape(-1)[0])

    def projection(self, prefix: str) -> tuple[np.ndarray, float]:
        """(HF packed uint8 [out/4, in], gamma) with gamma the multiplier (bitlinear: 1 / the file's)."""
        s = self._scalar(prefix + ".weight_scale")
        gamma = float(np.float32(s)) if self.layout == "packed" else float(np.float32(1.0 / s))
        return load_array(self._refs[prefix + ".weight"]), gamma

    def vector(self, name: str) -> np.ndarray:
        return round_to(self._read(name), self.dtype)

    def rope(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        c = self.config
        cos, sin = rope_tables(c.head_dim, n, c.rope_theta)
        return round_to(cos, self.dtype), round_to(sin, self.dtype)

    def table(self, name: str) -> np.ndarray:
        """The embedding / head in the model dtype as the C head reads it (bf16 bits, else float32),
        read from the file onto huge pages (a bf16 file table straight into place)."""
        ref = self._refs[name]
        shape, kind = ref.shape, (np.uint16 if self.dtype == "bfloat16" else np.float32)
        out = huge_array(shape[0] * shape[1] * np.dtype(kind).itemsize).view(kind).reshape(shape)
        if ref.dtype == "bfloat16" and self.dtype == "bfloat16":
            load_array(ref, out=out)
        else:
            for i in range(0, shape[0], 8192):        # chunks: no full float32 temporary
                r = round_to(self._read(name, i, min(i + 8192, shape[0])), self.dtype)
                out[i:i + 8192] = f32_to_bf16(r) if kind is np.uint16 else r
        collapse_huge(out)
        return out

    def rows(self, name: str, i0: int, i1: int) -> np.ndarray:
        return round_to(self._read(name, i0, i1), self.dtype)


class LiteRunner(CModel):
    """A packed model folder converted into the C engine: the engine's Runner protocol over numpy
    arrays (``arrays = "numpy"``). ``prefill`` / ``decode`` take integer arrays and return float32
    numpy logits; ``rows`` is a list of cache rows.

    ``head``: "bf16" (the model's table) or "int8" (per-row absmax, ~half the bytes per token);
    default ``BITNET158_CPU_HEAD``, else bf16;
    ``max_len``: KV cache positions (default: the model's context; pages are resident only once
    written); ``dtype``: the rounding of norms / embeddings (default: the config's); ``threads``: C
    workers (default: one per physical core, or ``OMP_NUM_THREADS``); ``layout``: the kernel weight
    layout ("b3" | "t16", default: ``BITNET158_CPU_LAYOUT``, else the fastest this CPU runs natively).
    """

    arrays = "numpy"
    device = "cpu"

    def __init__(self, path, batch: int = 1, max_len: int | None = None, head: str | None = None,
                 dtype: str | None = None, threads: int | None = None, layout: str | None = None,
                 prefill_chunk: int = PREFILL_CHUNK):
        if binding.lib() is None:
            raise RuntimeError(f"LiteRunner: C kernels unavailable ({binding.error()})")
        source = FolderSource(path, dtype)
        self.folder, self.dtype = source.folder, source.dtype
        super().__init__(source, batch=batch, max_len=max_len, head=head, prefill_chunk=prefill_chunk,
                         threads=threads, layout=layout, name="LiteRunner")
        source.close()               # only the C copy stays resident
        release_memory()

    @classmethod
    def from_pretrained(cls, path, **kw) -> "LiteRunner":
        return cls(path, **kw)

    def reset(self) -> None:
        """Forget every row (slots past a row's position are never read, so nothing is zeroed)."""


def supported(path) -> bool:
    """True when ``path`` is a packed folder and the C kernels load (the torch-free engine can run it)."""
    try:
        cfg = hf.read_config(Path(path))
    except Exception:  # noqa: BLE001 - not a readable local folder: let the caller's loader explain
        return False
    return hf.file_layout(cfg) != "master" and binding.lib() is not None


__all__ = ["LiteRunner", "FolderSource", "supported"]
