"""The CPU engine: packed ternary kernels in plain C (AVX-512 VNNI / AVX-VNNI / AVX2 / scalar).

    from bitnet158.kernels import cpu
    cpu.available()                  # the C library loaded (built by pip install)
    cpu.isa(), cpu.supported_isas()  # 'avx512', ['scalar', 'avx2', 'avxvnni', 'avx512']
    cpu.set_isa("scalar")            # force a path (tests); cpu.set_isa(None) -> best again
    w16 = cpu.convert(layer.weight)  # HF uint8 [N/4, K] -> kernel layout (bitnet_cpu.h, "T16")
    wb3 = cpu.convert(layer.weight, "b3")   # 1.6 bits/weight (5 ternary digits per byte)
    q, s, sa = cpu.act_quant(x)      # == quant.act_quant(x), plus the row sums of q
    acc = cpu.gemm_i32(w16, N, q)    # == quant.int_matmul(q, W_t), exactly
    acc = cpu.gemm_i32(wb3, N, q, "b3")
    cpu.layout_native("b3")          # the current ISA path has a native B3 kernel (AVX-512 VBMI)

The whole-model engine is :mod:`bitnet158.kernels.cpu.runner` (``engine.make_runner`` picks it on
CPU); :mod:`bitnet158.kernels.cpu.backend` serves single ``PackedLinear`` calls. Design and
measured speed: docs/cpu-engine.md.
"""

from __future__ import annotations

from ...errors import ConfigError
from . import binding

ISAS = binding.ISAS


def available() -> bool:
    return binding.lib() is not None


def _lib():
    lib = binding.lib()
    if lib is None:
        raise RuntimeError(f"bitnet158 C CPU kernels unavailable: {binding.error()}")
    return lib


def isa() -> str:
    return _lib().bn_get_isa().decode()


def supported_isas() -> list[str]:
    lib = _lib()
    return [n for n in ISAS if lib.bn_isa_supported(n.encode())]


def set_isa(name: str | None) -> str:
    """Force an instruction-set path ('scalar', 'avx2', 'avxvnni', 'avx512'); None = the best."""
    lib = _lib()
    name = name or lib.bn_best_isa().decode()
    if lib.bn_set_isa(name.encode()):
        raise ConfigError(f"set_isa({name!r}): not supported on this CPU "
                          f"(supported: {', '.join(supported_isas())})")
    return name


def set_threads(n: int) -> int:
    """Worker threads for every kernel (the caller counts as one). Returns the count in effect."""
    return _lib().bn_set_threads(int(n))


def threads() -> int:
    return _lib().bn_get_threads()


def pad16(n: int) -> int:
    return (n + 15) // 16 * 16


LAYOUTS = {"t16": 0, "b3": 1}   # bitnet_cpu.h: 2 bits/weight (every path) / 1.6 bits (VBMI + scalar)


def _layout(layout: str) -> int:
    if layout not in LAYOUTS:
        raise ConfigError(f"layout={layout!r}: expected one of {', '.join(LAYOUTS)}")
    return LAYOUTS[layout]


def _kstep(layout: str) -> int:
    """Columns of K per 64-byte step of a 16-row tile: 16 (T16) or 20 (B3: 5 digits x 4 bytes per lane)."""
    return 20 if _layout(layout) else 16


def kpad(k: int, layout: str = "t16") -> int:
    """K padded for a layout: to 16 (T16) or 20 (B3)."""
    q = _kstep(layout)
    return (k + q - 1) // q * q


def layout_bytes(n: int, k: int, layout: str = "t16") -> int:
    """Bytes of an [n, k] ternary matrix in a kernel layout: 64 per (16-row tile, K step)."""
    return pad16(n) // 16 * (kpad(k, layout) // _kstep(layout)) * 64


def layout_native(layout: str) -> bool:
    """Whether the current ISA path runs ``layout`` natively (B3 elsewhere runs the scalar kernel)."""
    return bool(_lib().bn_layout_native(_layout(layout)))


_TORCH_OPS = ("convert", "huge_empty", "collapse_huge", "act_quant", "gemm_i32", "linear", "HEAD_KINDS",
              "head_gemv", "quantize_rows_int8", "bandwidth", "HUGE")


def __getattr__(name: str):
    """The torch-tensor helpers (:mod:`.ops`), imported on first use: this package imports without
    torch, so the torch-free engine (:mod:`.lite`) never loads it."""
    if name in _TORCH_OPS:
        from . import ops
        return getattr(ops, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["available", "isa", "supported_isas", "set_isa", "set_threads", "threads", "convert",
           "act_quant", "gemm_i32", "linear", "head_gemv", "quantize_rows_int8", "bandwidth", "pad16",
           "LAYOUTS", "kpad", "layout_bytes", "layout_native", "huge_empty", "collapse_huge"]
