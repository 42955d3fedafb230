/* isa_avx2.c — AVX2 + FMA path: vpmaddubsw with int16 partial sums (bound proven in isa_impl.h). */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma,f16c,bmi2")
#define ISA_AVX2 1
#define ISA_NAME avx2
#include "isa_impl.h"
#endif
