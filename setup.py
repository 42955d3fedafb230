"""Build hook: compiles the plain-C CPU kernels (src/bitnet158/kernels/cpu/) into one shared library.

The library has no Python C-API and no torch ABI coupling: ``bitnet158.kernels.cpu.binding`` loads it
with ctypes. It is built without ``-march``: every instruction-set path (scalar, AVX2, AVX-VNNI,
AVX-512 VNNI) is compiled with per-file target pragmas and chosen at run time from CPUID, so one
build runs on any x86-64 (other architectures get the scalar path). ``optional=True``: if no C
compiler is present the install still succeeds and the package falls back to the torch reference.

    pip install .        # or: pip install -e .   (both build the library)
"""
import sys

from setuptools import Extension, setup

CPU = "src/bitnet158/kernels/cpu/"
SOURCES = ["core.c", "forward.c", "pool.c", "isa_scalar.c", "isa_avx2.c", "isa_avxvnni.c", "isa_avx512.c"]

ext_modules = []
if sys.platform != "win32":
    ext_modules.append(Extension(
        "bitnet158.kernels.cpu._bitnet_cpu",
        sources=[CPU + s for s in SOURCES],
        depends=[CPU + h for h in ("bitnet_cpu.h", "isa_impl.h", "core.h", "pool.h")],
        extra_compile_args=["-O3", "-std=gnu11", "-fopenmp-simd", "-ffp-contract=off", "-fno-math-errno"],
        libraries=["m", "pthread"],
        optional=True,
    ))

setup(ext_modules=ext_modules)
