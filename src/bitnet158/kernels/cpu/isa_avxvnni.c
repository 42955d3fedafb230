/* isa_avxvnni.c — AVX2 + AVX-VNNI path: 256-bit vpdpbusd, int32 accumulation (Alder Lake and later). */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma,f16c,bmi2,avxvnni")
#define ISA_AVXVNNI 1
#define ISA_NAME avxvnni
#include "isa_impl.h"
#endif
