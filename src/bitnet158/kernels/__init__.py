"""Fast paths for the ternary linear, behind one dispatch.

``packed_linear(x, layer)`` computes a :class:`~bitnet158.layers.PackedLinear` forward with the
best backend for ``x``'s device. Every backend is tested against :mod:`bitnet158.quant`.
Backends are tried in order; each has ``available(x) -> bool``, ``prepare(layer) -> state`` (its
own weight layout, cached on ``layer.kernel_state``) and ``forward(x, layer, state) -> y``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_BACKENDS: list = []  # fast backends, most preferred first; the reference is always last


def register(backend) -> None:
    """Add a fast backend ahead of the reference (later registrations win)."""
    _BACKENDS.insert(0, backend)


def backends() -> list:
    from . import reference
    return [*_BACKENDS, reference]


_gpu_loaded = False


def select(x: torch.Tensor):
    global _gpu_loaded
    from . import reference
    if x.is_cuda and not _gpu_loaded:  # the Triton backend registers itself on first CUDA use
        _gpu_loaded = True
        try:
            from . import triton as _triton_backend  # noqa: F401
        except ImportError:
            pass
    for b in _BACKENDS:
        if b.available(x):
            return b
    return reference


def packed_linear(x: torch.Tensor, layer) -> torch.Tensor:
    """y [..., out] = ternary linear of x [..., in] with ``layer``'s packed weights and scale."""
    b = select(x)
    st = layer.kernel_state
    if st is None or st[0] is not b:
        st = (b, b.prepare(layer))
        layer.kernel_state = st
    return b.forward(x, layer, st[1])


def _load_builtin() -> None:
    """Register the built-in fast backends (the C CPU kernels); each one checks availability lazily."""
    try:
        from .cpu import backend as _cpu_backend  # noqa: F401  (registers itself)
    except ImportError:
        pass


def __getattr__(name: str):
    """``quant`` and ``reference`` on first use: importing this package loads no torch (the
    torch-free CPU engine, ``kernels.cpu.lite``, lives below it)."""
    if name in ("quant", "reference"):
        return importlib.import_module(".reference" if name == "reference" else "..quant", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_load_builtin()

__all__ = ["packed_linear", "register", "backends", "select", "quant"]
