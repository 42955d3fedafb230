"""ctypes binding of the C CPU engine (``_bitnet_cpu*.so``, built by ``pip install`` from setup.py).

    from bitnet158.kernels.cpu import binding
    lib = binding.lib()            # the loaded library, or None (then the torch reference runs)

Lookup order: ``$BITNET158_CPU_LIB`` if set (a library built elsewhere, for development); the
extension built next to this file by ``pip install`` / ``pip install -e``; else a
copy compiled on first use with the system C compiler into ``~/.cache/bitnet158`` (same flags, keyed
by a hash of the sources; ``BITNET158_CPU_JIT=0`` turns that off). If neither works a single warning
is issued and callers fall back to the torch reference. ``BITNET158_CPU_KERNELS=0`` disables the
library altogether.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import os
import subprocess
import sys
import tempfile
import threading
import warnings
from ctypes import POINTER, c_char_p, c_double, c_float, c_int, c_longlong, c_size_t, c_void_p
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = ("core.c", "forward.c", "pool.c", "isa_scalar.c", "isa_avx2.c", "isa_avxvnni.c", "isa_avx512.c")
HEADERS = ("bitnet_cpu.h", "isa_impl.h", "core.h", "pool.h")
CFLAGS = ["-O3", "-std=gnu11", "-fopenmp-simd", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared"]
ISAS = ("scalar", "avx2", "avxvnni", "avx512")

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_warned = False
_error: str | None = None


def _warn(msg: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"bitnet158: C CPU kernels unavailable ({msg}); using the torch reference "
                      f"(slow). Reinstall with a C compiler present: pip install -e .", RuntimeWarning,
                      stacklevel=3)


def _set_prefetch(handle: ctypes.CDLL) -> None:
    """``BITNET158_CPU_PREFETCH``: bytes ahead on the decode weight streams. A bad value is reported
    and the default kept (it must not turn the kernels off)."""
    env = os.environ.get("BITNET158_CPU_PREFETCH")
    if not env:
        return
    try:
        n = int(env)
    except ValueError:
        n = -1
    if not 0 <= n <= 1 << 16:
        warnings.warn(f"bitnet158: BITNET158_CPU_PREFETCH={env!r} is not a byte count in 0..65536; "
                      f"keeping {handle.bn_set_prefetch(-1)}", RuntimeWarning, stacklevel=4)
        return
    handle.bn_set_prefetch(n)


def _built() -> Path | None:
    override = os.environ.get("BITNET158_CPU_LIB")      # a library built elsewhere (development)
    if override:
        return Path(override)
    for suf in importlib.machinery.EXTENSION_SUFFIXES:
        p = HERE / f"_bitnet_cpu{suf}"
        if p.exists():
            return p
    return None


def _jit() -> Path:
    """Compile the sources once into the user cache (keyed by their hash)."""
    h = hashlib.sha256()
    for f in (*SOURCES, *HEADERS):
        h.update((HERE / f).read_bytes())
    h.update(" ".join(CFLAGS).encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bitnet158"
    out = cache / f"libbitnet_cpu-{h.hexdigest()[:16]}.so"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    cc = os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        tmp_out = Path(tmp) / out.name
        cmd = [cc, *CFLAGS, *[str(HERE / s) for s in SOURCES], "-o", str(tmp_out), "-lm", "-lpthread"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise OSError(f"{cc} failed: {r.stderr.strip()[-400:]}")
        os.replace(tmp_out, out)
    return out


def _declare(lib: ctypes.CDLL) -> None:
    P = c_void_p
    sig = {
        "bn_init": (c_int, [c_int]),
        "bn_isa_supported": (c_int, [c_char_p]),
        "bn_best_isa": (c_char_p, []),
        "bn_set_isa": (c_int, [c_char_p]),
        "bn_get_isa": (c_char_p, []),
        "bn_set_threads": (c_int, [c_int]),
        "bn_get_threads": (c_int, []),
        "bn_convert_hf": (c_int, [P, c_int, c_int, P]),
        "bn_convert_b3": (c_int, [P, c_int, c_int, P]),
        "bn_layout_native": (c_int, [c_int]),
        "bn_set_prefetch": (c_int, [c_int]),
        "bn_advise_huge": (c_longlong, [P, c_size_t, c_int]),
        "bn_act_quant": (None, [P, c_int, c_int, c_int, P, P, P]),
        "bn_gemm_i32": (None, [P, c_int, c_int, P, c_int, P, P, c_int]),
        "bn_linear": (None, [P, c_int, c_int, P, c_int, c_int, P, P, P, P, P, c_int]),
        "bn_head_gemv": (None, [P, c_int, P, c_int, c_int, P, c_int, P]),
        "bn_bandwidth": (c_double, [P, c_size_t, c_int]),
        "bn_forward": (c_int, [P, c_int, P, P, P, c_int, P, P]),
        "bn_model_sizeof": (c_int, []),
        "bn_prof_enable": (None, [c_int]),
        "bn_prof_get": (c_int, [P]),
        "bn_layer_sizeof": (c_int, []),
    }
    for name, (res, args) in sig.items():
        f = getattr(lib, name)
        f.restype, f.argtypes = res, args


def default_threads() -> int:
    """The worker count the library starts with: ``torch.get_num_threads()`` when torch is loaded
    (the torch engines set it); else ``OMP_NUM_THREADS``, else the physical cores this process may
    run on (one per core, as torch's default; hyper-threads add nothing to a memory-bound decode)."""
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_num_threads"):
        return max(1, torch.get_num_threads())
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for c in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            cores.add(str(c))
    return max(1, len(cores))


def lib() -> ctypes.CDLL | None:
    """The loaded library (initialised with :func:`default_threads`), or None after one warning."""
    global _lib, _tried, _error
    if _lib is not None or _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("BITNET158_CPU_KERNELS", "1") == "0":
            _error = "disabled by BITNET158_CPU_KERNELS=0"
            return None
        try:
            path = _built()
            if path is None:
                if os.environ.get("BITNET158_CPU_JIT", "1") == "0":
                    raise OSError("extension not built and BITNET158_CPU_JIT=0")
                path = _jit()
            handle = ctypes.CDLL(str(path))
            _declare(handle)
            handle.bn_init(default_threads())
            _set_prefetch(handle)
            _lib = handle
        except Exception as e:  # noqa: BLE001 - any failure means: use the reference
            _error = str(e)
            _warn(_error)
    return _lib


def error() -> str | None:
    """Why the library is unavailable (None when it loaded)."""
    return _error


def _reset_for_tests() -> None:
    """Forget the loaded state (tests monkeypatch the loader)."""
    global _lib, _tried, _warned, _error
    _lib, _tried, _warned, _error = None, False, False, None


def ptr(t) -> int:
    """Address of a contiguous torch tensor's data."""
    return t.data_ptr()


__all__ = ["lib", "error", "default_threads", "ptr", "ISAS", "POINTER", "c_float"]
