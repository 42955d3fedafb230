/* isa_avx512.c — AVX-512 (F/BW/VL) + VNNI path: 512-bit vpdpbusd over 16-row tiles. */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma,f16c,bmi2,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#define ISA_AVX512 1
#define ISA_NAME avx512
#include "isa_impl.h"
#endif
