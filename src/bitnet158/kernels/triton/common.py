"""Helpers shared by the Triton kernels: exact roundings that also hold under ``TRITON_INTERPRET=1``.

The interpreter (CPU, numpy) differs from the GPU in two places that matter for exact parity with
the torch reference, so both are spelled out here behind the ``INTERP`` constexpr:

- fp32 -> bf16 casts: the interpreter truncates; the GPU rounds to nearest even. ``cast`` rounds
  the fp32 bits itself first (add 0x7FFF + lsb, clear the low half), then casts.
- ``rint`` (round half to even, as ``torch.round``): libdevice on the GPU; the interpreter has no
  libdevice, so it uses ``(y + 1.5*2^23) - 1.5*2^23``, exact in fp32 for |y| < 2^22.
"""

from __future__ import annotations

import contextlib
import functools
import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pdl_supported() -> bool:
    """Programmatic dependent launch: Hopper or newer, compiled kernels, not switched off."""
    if INTERPRET or os.environ.get("BITNET158_PDL", "1") == "0":
        return False
    try:
        import torch
        return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
    except Exception:  # pragma: no cover
        return False


# The kernels need int8 tensor-core dots and bf16 (Triton has neither below sm_80), and are compiled
# and checked for sm_80, sm_89 and sm_90 (``compile_check --arch``); timed on sm_90 only.
MIN_CAPABILITY = (8, 0)


def gpu_unsupported(device) -> str | None:
    """Why the engine cannot run on CUDA ``device`` (an older GPU than sm_80), else None.
    Not CUDA (the interpreter's CPU tensors) is never refused here."""
    import torch
    device = torch.device(device)
    if device.type != "cuda":
        return None
    cap = _capability(device.index if device.index is not None else torch.cuda.current_device())
    if cap >= MIN_CAPABILITY:
        return None
    name = torch.cuda.get_device_name(device)
    return (f"{name} is sm_{cap[0]}{cap[1]}; the Triton W2A8 kernels need sm_{MIN_CAPABILITY[0]}"
            f"{MIN_CAPABILITY[1]} or newer (int8 tensor-core dots, bf16)")


def on_device(device):
    """A context making CUDA ``device`` the current one: Triton launches, CUDA graphs, streams and
    events go to the current device, not to their tensors' (a model on cuda:1 would otherwise
    launch its kernels on cuda:0). A no-op off CUDA or where ``device`` is current already."""
    import torch
    device = torch.device(device)
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def device_current(method):
    """Decorator: run a runner method (``self.device``) under :func:`on_device`."""
    @functools.wraps(method)
    def run(self, *args, **kw):
        with on_device(self.device):
            return method(self, *args, **kw)
    return run


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    import torch
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device (persistent kernels launch one program each)."""
    import torch
    return torch.cuda.get_device_properties(device).multi_processor_count


# Kernels launched with PDL start while the previous kernel drains; each calls ``gdc_wait`` before
# touching anything an earlier kernel wrote (loads of weights may come first).
PDL = _pdl_supported()

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - Triton without grid dependency control
    PDL = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass

try:
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - very old Triton
    libdevice = None


def cdiv(a: int, b: int) -> int:
    """Host-side ceil(a / b). ``triton.cdiv`` is a constexpr function whose call costs microseconds
    on the host, which adds up over the launches of an eager prefill."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Host-side smallest power of two >= n (``triton.next_power_of_2`` without its call overhead)."""
    return 1 << max(n - 1, 0).bit_length()


@triton.jit
def cast(x, dt: tl.constexpr, INTERP: tl.constexpr):
    """fp32 x -> dtype dt with round-to-nearest-even on every backend."""
    if INTERP and dt == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True).to(dt)
    else:
        return x.to(dt)


@triton.jit
def rnd(x, dt: tl.constexpr, INTERP: tl.constexpr):
    """x rounded to dt's precision, kept in fp32 (for chains of model-dtype ops)."""
    return cast(x, dt, INTERP).to(tl.float32)


@triton.jit
def rnd_add(x, dt: tl.constexpr, INTERP: tl.constexpr):
    """``rnd`` for a product that an add consumes next. For bf16 the rounding is integer ops (as
    ``cast`` does under the interpreter), which the compiler cannot drop: compiled for sm_90
    (Triton 3.6), a bf16 round trip between a multiply and an add was optimized away and the
    pair became an fma, so ``rnd(a * b) + rnd(c * e)`` came out 1-2 bf16 ulps off torch's
    separately rounded ops (and nonzero where they cancel)."""
    if dt == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True)
    else:
        return rnd(x, dt, INTERP)


@triton.jit
def rint(y, INTERP: tl.constexpr):
    if INTERP:
        return (y + 12582912.0) - 12582912.0
    else:
        return libdevice.rint(y)


@triton.jit
def grouped_tile(t, n_m, n_n, GROUP_M: tl.constexpr):
    """Tile index t -> (row tile, column tile) of an [n_m, n_n] tile grid, walked in groups of
    ``GROUP_M`` row tiles so that consecutive programs share column (weight) tiles in L2."""
    width = GROUP_M * n_n                         # tiles per group of GROUP_M row tiles
    first_m = (t // width) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    return first_m + (t % width) % size_m, (t % width) // size_m
