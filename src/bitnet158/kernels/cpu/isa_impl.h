/* isa_impl.h — the kernels, written once and compiled once per instruction set.
 *
 * Included by isa_scalar.c / isa_avx2.c / isa_avxvnni.c / isa_avx512.c, each of which sets
 * ISA_NAME and one of ISA_SCALAR, ISA_AVX2 (vpmaddubsw, int16 partial sums), ISA_AVXVNNI
 * (256-bit vpdpbusd) or ISA_AVX512 (512-bit vpdpbusd), plus a `#pragma GCC target` so that one
 * shared library runs on any x86-64 and picks the path at run time (core.c).
 * The float helpers (rmsnorm, attention) are plain C that the compiler vectorizes for each target.
 */
#include <math.h>
#include <string.h>
#include "bitnet_cpu.h"
#if !defined(ISA_SCALAR)
#include <immintrin.h>
#endif

#define BN_CAT2(a, b) a##_##b
#define BN_CAT(a, b) BN_CAT2(a, b)
#define FN(x) BN_CAT(x, ISA_NAME)
#define BN_STR1(x) #x
#define BN_STR(x) BN_STR1(x)
#define INLINE static inline __attribute__((always_inline))

static inline int32_t FN(ld32)(const int8_t *p) { int32_t v; memcpy(&v, p, 4); return v; }

/* ------------------------------------------------------------------ activation quantization
 * Exactly quant.act_quant: amax = max|x| (fp32), clamped to >= 1e-5; s = 127 / amax the way torch
 * evaluates `127 / tensor` (reciprocal, then multiply: two roundings); q = clamp(round_half_even(
 * x * s), -128, 127). Rounding uses the current mode (round-to-nearest-even by default).       */
static void FN(act_quant)(const float *x, int k, int kp, int8_t *q, float *s_out, int32_t *sa_out) {
    float amax = 0.0f;
    int i = 0;
#if defined(ISA_AVX512)
    __m512 vm = _mm512_setzero_ps();
    for (; i + 16 <= k; i += 16) vm = _mm512_max_ps(vm, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
    amax = _mm512_reduce_max_ps(vm);
#elif defined(ISA_AVX2) || defined(ISA_AVXVNNI)
    __m256 vm = _mm256_setzero_ps();
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (; i + 8 <= k; i += 8) vm = _mm256_max_ps(vm, _mm256_and_ps(absmask, _mm256_loadu_ps(x + i)));
    float t8[8];
    _mm256_storeu_ps(t8, vm);
    for (int j = 0; j < 8; j++) amax = t8[j] > amax ? t8[j] : amax;
#endif
    for (; i < k; i++) { float a = fabsf(x[i]); amax = a > amax ? a : amax; }
    if (!(amax >= 1e-5f)) amax = 1e-5f;
    volatile float r = 1.0f / amax;      /* keep the two roundings of torch's 127 / t */
    const float s = r * 127.0f;
    int32_t sa = 0;
    i = 0;
#if defined(ISA_AVX512)
    const __m512 vs = _mm512_set1_ps(s);
    const __m512i lo = _mm512_set1_epi32(-128), hi = _mm512_set1_epi32(127);
    __m512i vsum = _mm512_setzero_si512();
    for (; i < k; i += 16) {
        __mmask16 mk = (k - i) >= 16 ? 0xffff : (__mmask16)((1u << (k - i)) - 1);
        __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, x + i), vs));
        v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
        vsum = _mm512_add_epi32(vsum, v);
        _mm_mask_storeu_epi8(q + i, mk, _mm512_cvtepi32_epi8(v));
    }
    sa = _mm512_reduce_add_epi32(vsum);
#elif defined(ISA_AVX2) || defined(ISA_AVXVNNI)
    const __m256 vs = _mm256_set1_ps(s);
    const __m256i lo = _mm256_set1_epi32(-128), hi = _mm256_set1_epi32(127);
    __m256i vsum = _mm256_setzero_si256();
    for (; i + 8 <= k; i += 8) {
        __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), vs));
        v = _mm256_min_epi32(_mm256_max_epi32(v, lo), hi);
        vsum = _mm256_add_epi32(vsum, v);
        int32_t t[8];
        _mm256_storeu_si256((__m256i *)t, v);
        for (int j = 0; j < 8; j++) q[i + j] = (int8_t)t[j];
    }
    int32_t t8i[8];
    _mm256_storeu_si256((__m256i *)t8i, vsum);
    for (int j = 0; j < 8; j++) sa += t8i[j];
#endif
    for (; i < k; i++) {
        float v = nearbyintf(x[i] * s);
        v = v < -128.0f ? -128.0f : (v > 127.0f ? 127.0f : v);
        q[i] = (int8_t)v;
        sa += (int32_t)v;
    }
    for (i = k; i < kp; i++) q[i] = 0;
    *s_out = s;
    *sa_out = sa;
}

/* ------------------------------------------------------------------ ternary x int8 GEMM
 * Epilogue shared by every path: acc holds sum_k u*a; subtract Σa, then scale like the reference
 * (`acc.float() * (gamma / s_x)`, fp32, no fused multiply-add).                                  */
static inline void FN(epilogue)(const bn_gemm *g, int t, int m, const int32_t *acc16) {
    const int n0 = t * 16;
    const int nv = g->n - n0 < 16 ? g->n - n0 : 16;
    const int32_t sa = g->sa[m];
    if (g->mode == BN_OUT_I32) {
        int32_t *o = (int32_t *)g->out + (size_t)m * g->ldo + n0;
        for (int r = 0; r < nv; r++) o[r] = acc16[r] - sa;
        return;
    }
    const float sc = g->tile_gamma[t] / g->sx[m];
    float *o = (float *)g->out + (size_t)m * g->ldo + n0;
    if (g->mode == BN_OUT_F32_ADD)
        for (int r = 0; r < nv; r++) { float y = (float)(acc16[r] - sa) * sc; o[r] = o[r] + y; }
    else
        for (int r = 0; r < nv; r++) o[r] = (float)(acc16[r] - sa) * sc;
}

#if defined(ISA_AVX512)
/* Software prefetch distance on each weight stream while decoding: bn_pf bytes ahead (core.c,
 * default 512, bn_set_prefetch). On the 2-core Xeon this was tuned on (2 MB pages, runner.py),
 * 512 bytes ahead gave the B3 decode ~10 % more than 1024 or 2048 and ~15 % more than none; past
 * the end of a buffer it is harmless (prefetches never fault). */
#define BN_PF ((size_t)bn_pf)
/* The head (decode) reads its rows one after another, one stream per thread, prefetched 2 KB
 * ahead: on that Xeon a 2-thread read of 5 KB rows ran ~20-25 % faster as one stream than as 4
 * interleaved row streams (the previous 4-row blocking), and the head GEMV likewise. */
#define BN_PF_HEAD 2048

INLINE void FN(store_tile)(const bn_gemm *g, int t, int m, __m512i acc) {
    const int n0 = t * 16, nv = g->n - n0;
    if (nv < 16) { int32_t tmp[16]; _mm512_storeu_si512(tmp, acc); FN(epilogue)(g, t, m, tmp); return; }
    acc = _mm512_sub_epi32(acc, _mm512_set1_epi32(g->sa[m]));
    if (g->mode == BN_OUT_I32) { _mm512_storeu_si512((int32_t *)g->out + (size_t)m * g->ldo + n0, acc); return; }
    float *o = (float *)g->out + (size_t)m * g->ldo + n0;
    __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(g->tile_gamma[t] / g->sx[m]));
    if (g->mode == BN_OUT_F32_ADD) y = _mm512_add_ps(_mm512_loadu_ps(o), y);
    _mm512_storeu_ps(o, y);
}

/* TB tiles x MB tokens; two accumulators per pair (f even / odd) to halve the dependency chains.
 * int32 lanes cannot overflow: |sum| <= 2 * 128 * Kp < 2^31 for Kp < 2^22.                      */
INLINE void FN(kblk)(const bn_gemm *g, int t, const int TB, int m, const int MB) {
    const int ks = g->kp >> 4;
    const size_t ts = (size_t)ks * 64;
    const uint8_t *w = g->w + (size_t)t * ts;
    const int8_t *x = g->xq + (size_t)m * g->kp;
    const __m512i m3 = _mm512_set1_epi8(3);
    __m512i acc[4][4], acc2[4][4];
#pragma GCC unroll 4
    for (int a = 0; a < TB; a++)
#pragma GCC unroll 4
        for (int b = 0; b < MB; b++) { acc[a][b] = _mm512_setzero_si512(); acc2[a][b] = _mm512_setzero_si512(); }
    for (int s = 0; s < ks; s++) {
        __m512i u[4][4];
        if (MB == 1)                      /* decode streams the weights: fetch ahead (BN_PF) */
#pragma GCC unroll 4
            for (int a = 0; a < TB; a++) _mm_prefetch((const char *)(w + a * ts + (size_t)s * 64 + BN_PF), _MM_HINT_T0);
#pragma GCC unroll 4
        for (int a = 0; a < TB; a++) {
            __m512i v = _mm512_loadu_si512(w + a * ts + (size_t)s * 64);
            u[a][0] = _mm512_and_si512(v, m3);
            u[a][1] = _mm512_and_si512(_mm512_srli_epi16(v, 2), m3);
            u[a][2] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m3);
            u[a][3] = _mm512_and_si512(_mm512_srli_epi16(v, 6), m3);
        }
#pragma GCC unroll 4
        for (int b = 0; b < MB; b++) {
            const int8_t *xa = x + (size_t)b * g->kp + s * 16;
            const __m512i b0 = _mm512_set1_epi32(FN(ld32)(xa)), b1 = _mm512_set1_epi32(FN(ld32)(xa + 4));
            const __m512i b2 = _mm512_set1_epi32(FN(ld32)(xa + 8)), b3 = _mm512_set1_epi32(FN(ld32)(xa + 12));
#pragma GCC unroll 4
            for (int a = 0; a < TB; a++) {
                acc[a][b] = _mm512_dpbusd_epi32(acc[a][b], u[a][0], b0);
                acc2[a][b] = _mm512_dpbusd_epi32(acc2[a][b], u[a][1], b1);
                acc[a][b] = _mm512_dpbusd_epi32(acc[a][b], u[a][2], b2);
                acc2[a][b] = _mm512_dpbusd_epi32(acc2[a][b], u[a][3], b3);
            }
        }
    }
#pragma GCC unroll 4
    for (int a = 0; a < TB; a++)
#pragma GCC unroll 4
        for (int b = 0; b < MB; b++) FN(store_tile)(g, t + a, m + b, _mm512_add_epi32(acc[a][b], acc2[a][b]));
}

static void FN(gemm)(const bn_gemm *g, int t0, int t1) {
    const int M = g->m;
    int t = t0;
    if (M == 1) {
        for (; t + 4 <= t1; t += 4) FN(kblk)(g, t, 4, 0, 1);
        for (; t < t1; t++) FN(kblk)(g, t, 1, 0, 1);
        return;
    }
    for (; t + 2 <= t1; t += 2) {
        int m = 0;
        for (; m + 4 <= M; m += 4) FN(kblk)(g, t, 2, m, 4);
        for (; m + 2 <= M; m += 2) FN(kblk)(g, t, 2, m, 2);
        for (; m < M; m++) FN(kblk)(g, t, 2, m, 1);
    }
    for (; t < t1; t++) {
        int m = 0;
        for (; m + 4 <= M; m += 4) FN(kblk)(g, t, 1, m, 4);
        for (; m < M; m++) FN(kblk)(g, t, 1, m, 1);
    }
}

/* B3 (bitnet_cpu.h): per 64-byte step and digit i, one vpermi2b on the low 7 bits (table
 * bn_b3_tab[i], two registers), 2 - u where bit 7 is set (one masked subtract), one vpdpbusd
 * against a[20s+4i .. +3]. The same int32 bound as T16 (u in {0,1,2}). Needs AVX-512 VBMI. */
#define B3_TGT __attribute__((target("avx512vbmi")))
B3_TGT INLINE void FN(kblk_b3)(const bn_gemm *g, int t, const int TB, int m, const int MB) {
    const int ks = g->kp / 20;
    const size_t ts = (size_t)ks * 64;
    const uint8_t *w = g->w + (size_t)t * ts;
    const int8_t *x = g->xq + (size_t)m * g->kp;
    __m512i tl[5], th[5];
#pragma GCC unroll 5
    for (int i = 0; i < 5; i++) {
        tl[i] = _mm512_load_si512(bn_b3_tab[i]);
        th[i] = _mm512_load_si512(bn_b3_tab[i] + 64);
    }
    const __m512i two = _mm512_set1_epi8(2);
    __m512i acc[4][4], acc2[4][4];
#pragma GCC unroll 4
    for (int a = 0; a < TB; a++)
#pragma GCC unroll 4
        for (int b = 0; b < MB; b++) { acc[a][b] = _mm512_setzero_si512(); acc2[a][b] = _mm512_setzero_si512(); }
    for (int s = 0; s < ks; s++) {
        if (MB == 1)
#pragma GCC unroll 4
            for (int a = 0; a < TB; a++) _mm_prefetch((const char *)(w + a * ts + (size_t)s * 64 + BN_PF), _MM_HINT_T0);
#pragma GCC unroll 4
        for (int a = 0; a < TB; a++) {
            const __m512i v = _mm512_loadu_si512(w + a * ts + (size_t)s * 64);
            const __mmask64 neg = _mm512_movepi8_mask(v);
#pragma GCC unroll 5
            for (int i = 0; i < 5; i++) {
                __m512i u = _mm512_permutex2var_epi8(tl[i], v, th[i]);
                u = _mm512_mask_sub_epi8(u, neg, two, u);
#pragma GCC unroll 4
                for (int b = 0; b < MB; b++) {
                    const __m512i xb = _mm512_set1_epi32(FN(ld32)(x + (size_t)b * g->kp + 20 * s + 4 * i));
                    if (i & 1) acc2[a][b] = _mm512_dpbusd_epi32(acc2[a][b], u, xb);
                    else acc[a][b] = _mm512_dpbusd_epi32(acc[a][b], u, xb);
                }
            }
        }
    }
#pragma GCC unroll 4
    for (int a = 0; a < TB; a++)
#pragma GCC unroll 4
        for (int b = 0; b < MB; b++) FN(store_tile)(g, t + a, m + b, _mm512_add_epi32(acc[a][b], acc2[a][b]));
}

/* Decode (one token), 4 tiles at a time. Each digit is written as load -> vpermi2b -> masked
 * subtract -> vpdpbusd in inline assembly so that the index register vpermi2b overwrites is a
 * fresh load of the (L1-resident) weight vector rather than a register copy: with the ten table
 * registers live, the compiler otherwise adds a vector move per digit, which costs an ALU slot
 * (16 instead of 21 vector ALU operations per 320 weights; ~10 % faster decode). */
typedef struct { char c[64]; } bn_blk64;
#define B3_DIG(i, ACC)                                \
    "vmovdqu64 %[wm], %[u]\n\t"                       \
    "vpermi2b %[h" #i "], %[l" #i "], %[u]\n\t"      \
    "vpsubb %[u], %[two], %[u]%{%[k]%}\n\t"           \
    "vpdpbusd %[x" #i "], %[u], %[" #ACC "]\n\t"
B3_TGT static void FN(gemv_b3)(const bn_gemm *g, int t0, int t1) {
    const int ks = g->kp / 20;
    const size_t ts = (size_t)ks * 64;
    __m512i tl[5], th[5];
#pragma GCC unroll 5
    for (int i = 0; i < 5; i++) {
        tl[i] = _mm512_load_si512(bn_b3_tab[i]);
        th[i] = _mm512_load_si512(bn_b3_tab[i] + 64);
    }
    const __m512i two = _mm512_set1_epi8(2);
    int t = t0;
    for (; t + 4 <= t1; t += 4) {
        const uint8_t *w = g->w + (size_t)t * ts;
        __m512i acc[4], acc2[4];
#pragma GCC unroll 4
        for (int a = 0; a < 4; a++) { acc[a] = _mm512_setzero_si512(); acc2[a] = _mm512_setzero_si512(); }
        for (int s = 0; s < ks; s++) {
            __m512i xb[5];
#pragma GCC unroll 5
            for (int i = 0; i < 5; i++) xb[i] = _mm512_set1_epi32(FN(ld32)(g->xq + 20 * s + 4 * i));
#pragma GCC unroll 4
            for (int a = 0; a < 4; a++) _mm_prefetch((const char *)(w + a * ts + (size_t)s * 64 + BN_PF), _MM_HINT_T0);
#pragma GCC unroll 4
            for (int a = 0; a < 4; a++) {
                __m512i u;
                __mmask64 k;
                __asm__("vmovdqu64 %[wm], %[u]\n\t"
                        "vpmovb2m %[u], %[k]\n\t"
                        "vpermi2b %[h0], %[l0], %[u]\n\t"
                        "vpsubb %[u], %[two], %[u]%{%[k]%}\n\t"
                        "vpdpbusd %[x0], %[u], %[A]\n\t"
                        B3_DIG(1, B) B3_DIG(2, A) B3_DIG(3, B) B3_DIG(4, A)
                        : [A] "+v"(acc[a]), [B] "+v"(acc2[a]), [u] "=&v"(u), [k] "=&Yk"(k)
                        : [wm] "m"(*(const bn_blk64 *)(w + a * ts + (size_t)s * 64)),
                          [l0] "v"(tl[0]), [h0] "v"(th[0]), [l1] "v"(tl[1]), [h1] "v"(th[1]),
                          [l2] "v"(tl[2]), [h2] "v"(th[2]), [l3] "v"(tl[3]), [h3] "v"(th[3]),
                          [l4] "v"(tl[4]), [h4] "v"(th[4]), [two] "v"(two),
                          [x0] "v"(xb[0]), [x1] "v"(xb[1]), [x2] "v"(xb[2]), [x3] "v"(xb[3]), [x4] "v"(xb[4]));
            }
        }
#pragma GCC unroll 4
        for (int a = 0; a < 4; a++) FN(store_tile)(g, t + a, 0, _mm512_add_epi32(acc[a], acc2[a]));
    }
    for (; t < t1; t++) FN(kblk_b3)(g, t, 1, 0, 1);
}

B3_TGT static void FN(gemm_b3)(const bn_gemm *g, int t0, int t1) {
    const int M = g->m;
    int t = t0;
    if (M == 1) {
        FN(gemv_b3)(g, t0, t1);
        return;
    }
    for (; t < t1; t++) {                 /* one decode of a step serves up to 4 tokens */
        int m = 0;
        for (; m + 4 <= M; m += 4) FN(kblk_b3)(g, t, 1, m, 4);
        for (; m + 2 <= M; m += 2) FN(kblk_b3)(g, t, 1, m, 2);
        for (; m < M; m++) FN(kblk_b3)(g, t, 1, m, 1);
    }
}
#define BN_GEMM_B3 FN(gemm_b3)

#elif defined(ISA_AVX2) || defined(ISA_AVXVNNI)
/* 256-bit paths work on half tiles: bytes [32h, 32h+32) of each 64-byte step hold rows 8h..8h+7.
 *
 * AVX2 (vpmaddubsw) int16 bound: u in {0,1,2}, a in [-128,127], so one vpmaddubsw lane
 * u0*a0 + u1*a1 lies in [-512, 508] (never saturates). One step adds 4 of them (f = 0..3):
 * [-2048, 2032]. Flushing to int32 (vpmaddwd with ones) every BN_FLUSH = 8 steps keeps every int16
 * partial sum in [-16384, 16256], inside int16 with room to spare: the int16 adds never wrap.  */
#define BN_FLUSH 8
INLINE void FN(store_half)(const bn_gemm *g, int t, int h, int m, __m256i acc, int32_t *tile) {
    (void)g; (void)t; (void)m;
    _mm256_storeu_si256((__m256i *)(tile + 8 * h), acc);
}

INLINE void FN(kblk)(const bn_gemm *g, int t, int m, const int MB) {
    const int ks = g->kp >> 4;
    const uint8_t *w = g->w + (size_t)t * ks * 64;
    const int8_t *x = g->xq + (size_t)m * g->kp;
    const __m256i m3 = _mm256_set1_epi8(3);
#if defined(ISA_AVX2)
    const __m256i ones = _mm256_set1_epi16(1);
#endif
    int32_t tile[4][16];
    for (int h = 0; h < 2; h++) {
        __m256i acc[4];
#pragma GCC unroll 4
        for (int b = 0; b < MB; b++) acc[b] = _mm256_setzero_si256();
        for (int s0 = 0; s0 < ks; s0 += BN_FLUSH) {
            const int s1 = s0 + BN_FLUSH < ks ? s0 + BN_FLUSH : ks;
#if defined(ISA_AVX2)
            __m256i a16[4];
#pragma GCC unroll 4
            for (int b = 0; b < MB; b++) a16[b] = _mm256_setzero_si256();
#endif
            for (int s = s0; s < s1; s++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(w + (size_t)s * 64 + 32 * h));
#pragma GCC unroll 4
                for (int f = 0; f < 4; f++) {
                    const __m256i u = _mm256_and_si256(_mm256_srli_epi16(v, 2 * f), m3);
#pragma GCC unroll 4
                    for (int b = 0; b < MB; b++) {
                        const __m256i av = _mm256_set1_epi32(FN(ld32)(x + (size_t)b * g->kp + s * 16 + 4 * f));
#if defined(ISA_AVX2)
                        a16[b] = _mm256_add_epi16(a16[b], _mm256_maddubs_epi16(u, av));
#else
                        acc[b] = _mm256_dpbusd_avx_epi32(acc[b], u, av);
#endif
                    }
                }
            }
#if defined(ISA_AVX2)
#pragma GCC unroll 4
            for (int b = 0; b < MB; b++) acc[b] = _mm256_add_epi32(acc[b], _mm256_madd_epi16(a16[b], ones));
#endif
        }
#pragma GCC unroll 4
        for (int b = 0; b < MB; b++) FN(store_half)(g, t, h, m + b, acc[b], tile[b]);
    }
    for (int b = 0; b < MB; b++) FN(epilogue)(g, t, m + b, tile[b]);
}

static void FN(gemm)(const bn_gemm *g, int t0, int t1) {
    const int M = g->m;
    for (int t = t0; t < t1; t++) {
        int m = 0;
        for (; m + 4 <= M; m += 4) FN(kblk)(g, t, m, 4);
        for (; m < M; m++) FN(kblk)(g, t, m, 1);
    }
}

#else  /* scalar */
static void FN(gemm)(const bn_gemm *g, int t0, int t1) {
    const int ks = g->kp >> 4;
    for (int t = t0; t < t1; t++) {
        const uint8_t *w = g->w + (size_t)t * ks * 64;
        for (int m = 0; m < g->m; m++) {
            const int8_t *x = g->xq + (size_t)m * g->kp;
            int32_t acc[16] = {0};
            for (int s = 0; s < ks; s++) {
                const uint8_t *ws = w + (size_t)s * 64;
                const int8_t *xs = x + s * 16;
                for (int r = 0; r < 16; r++) {
                    int32_t sum = 0;
                    for (int j = 0; j < 4; j++) {
                        const int byte = ws[r * 4 + j];
                        for (int f = 0; f < 4; f++) sum += ((byte >> (2 * f)) & 3) * xs[4 * f + j];
                    }
                    acc[r] += sum;
                }
            }
            FN(epilogue)(g, t, m, acc);
        }
    }
}

/* B3 on the same loop structure: byte -> its five u (bn_b3_u), k = 20s + 4i + j. */
static void FN(gemm_b3)(const bn_gemm *g, int t0, int t1) {
    const int ks = g->kp / 20;
    for (int t = t0; t < t1; t++) {
        const uint8_t *w = g->w + (size_t)t * ks * 64;
        for (int m = 0; m < g->m; m++) {
            const int8_t *x = g->xq + (size_t)m * g->kp;
            int32_t acc[16] = {0};
            for (int s = 0; s < ks; s++) {
                const uint8_t *ws = w + (size_t)s * 64;
                const int8_t *xs = x + s * 20;
                for (int r = 0; r < 16; r++) {
                    int32_t sum = 0;
                    for (int j = 0; j < 4; j++) {
                        const uint8_t *u = bn_b3_u[ws[r * 4 + j]];
                        for (int i = 0; i < 5; i++) sum += u[i] * xs[4 * i + j];
                    }
                    acc[r] += sum;
                }
            }
            FN(epilogue)(g, t, m, acc);
        }
    }
}
#define BN_GEMM_B3 FN(gemm_b3)
#endif

/* ------------------------------------------------------------------ head: out[m, r] = x[m] . W[r]
 * fp32 accumulation; bf16 rows widened by a 16-bit shift, int8 rows converted and scaled per row. */
static inline float FN(dot_row)(const bn_head *h, const float *x, int r) {
    const int d = h->d;
    float acc = 0.0f;
    if (h->kind == BN_W_BF16) {
        const uint16_t *w = (const uint16_t *)h->w + (size_t)r * d;
#pragma omp simd reduction(+ : acc)
        for (int i = 0; i < d; i++) acc += x[i] * bn_bf16_to_f32(w[i]);
    } else if (h->kind == BN_W_I8) {
        const int8_t *w = (const int8_t *)h->w + (size_t)r * d;
#pragma omp simd reduction(+ : acc)
        for (int i = 0; i < d; i++) acc += x[i] * (float)w[i];
        acc *= h->row_scale[r];
    } else {
        const float *w = (const float *)h->w + (size_t)r * d;
#pragma omp simd reduction(+ : acc)
        for (int i = 0; i < d; i++) acc += x[i] * w[i];
    }
    return acc;
}

#if defined(ISA_AVX512)
INLINE __m512 FN(ldw)(const bn_head *h, int r, int i, __mmask16 mk) {
    if (h->kind == BN_W_BF16) {
        const uint16_t *p = (const uint16_t *)h->w + (size_t)r * h->d + i;
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, p)), 16));
    }
    if (h->kind == BN_W_I8) {
        const int8_t *p = (const int8_t *)h->w + (size_t)r * h->d + i;
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, p)));
    }
    return _mm512_maskz_loadu_ps(mk, (const float *)h->w + (size_t)r * h->d + i);
}

/* 4 rows x up to 4 tokens at a time: each weight vector loaded once serves every token. */
INLINE void FN(head4)(const bn_head *h, int r, int m, const int MB) {
    __m512 acc[4][4];
#pragma GCC unroll 4
    for (int a = 0; a < 4; a++)
#pragma GCC unroll 4
        for (int b = 0; b < MB; b++) acc[a][b] = _mm512_setzero_ps();
    const int d = h->d;
    for (int i = 0; i < d; i += 16) {
        const __mmask16 mk = d - i >= 16 ? 0xffff : (__mmask16)((1u << (d - i)) - 1);
        __m512 xv[4];
#pragma GCC unroll 4
        for (int b = 0; b < MB; b++) xv[b] = _mm512_maskz_loadu_ps(mk, h->x + (size_t)(m + b) * h->ldx + i);
#pragma GCC unroll 4
        for (int a = 0; a < 4; a++) {
            const __m512 wv = FN(ldw)(h, r + a, i, mk);
#pragma GCC unroll 4
            for (int b = 0; b < MB; b++) acc[a][b] = _mm512_fmadd_ps(xv[b], wv, acc[a][b]);
        }
    }
    for (int a = 0; a < 4; a++) {
        const float sc = h->kind == BN_W_I8 ? h->row_scale[r + a] : 1.0f;
        for (int b = 0; b < MB; b++) {
            float v = _mm512_reduce_add_ps(acc[a][b]);
            h->out[(size_t)(m + b) * h->ldo + r + a] = h->kind == BN_W_I8 ? v * sc : v;
        }
    }
}

/* int8 head: the fp32 input is requantized to int16 per token (absmax/32767: relative error
 * <= 1.5e-5 of the largest element, far below the int8 weights' own) so that one vpmovsxbw +
 * one vpdpwssd handle 32 weights; the fp32 path would need 3 uops per 16. One row at a time
 * (BN_PF_HEAD), two accumulators. int32 lanes: each lane of a0 + a1 sums d/16 products of
 * |w| <= 127 and |x| <= 32767, so |lane| <= 4161409 * 512 < 2^31 for d <= 8192 (BN_HEAD_I16_MAXD;
 * longer rows take the fp32 path); the 16 lanes are summed in int64 (their total can pass 2^31:
 * 2560 x 127 x 32767 ~ 1.1e10 when every weight and input sits at its bound).              */
#define BN_HEAD_I16_MAXD 8192
static void FN(head_i8)(const bn_head *h, int r0, int r1) {
    int16_t xq[BN_HEAD_I16_MAXD] __attribute__((aligned(64)));
    const int d = h->d, d32 = d / 32 * 32;
    for (int m = 0; m < h->m; m++) {
        const float *x = h->x + (size_t)m * h->ldx;
        float amax = 0.0f;
        for (int i = 0; i < d; i++) { const float a = fabsf(x[i]); amax = a > amax ? a : amax; }
        const float sq = amax > 0.0f ? 32767.0f / amax : 0.0f, inv = amax > 0.0f ? amax / 32767.0f : 0.0f;
        for (int i = 0; i < d; i++) xq[i] = (int16_t)nearbyintf(x[i] * sq);
        for (int r = r0; r < r1; r++) {
            const int8_t *w = (const int8_t *)h->w + (size_t)r * d;
            __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
            int i = 0;
            for (; i + 64 <= d32; i += 64) {
                _mm_prefetch((const char *)(w + i) + BN_PF_HEAD, _MM_HINT_T0);
                const __m512i wv = _mm512_loadu_si512(w + i);
                a0 = _mm512_dpwssd_epi32(a0, _mm512_cvtepi8_epi16(_mm512_castsi512_si256(wv)), _mm512_load_si512(xq + i));
                a1 = _mm512_dpwssd_epi32(a1, _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(wv, 1)), _mm512_load_si512(xq + i + 32));
            }
            for (; i < d32; i += 32)
                a0 = _mm512_dpwssd_epi32(a0, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + i))), _mm512_load_si512(xq + i));
            const __m512i acc = _mm512_add_epi32(a0, a1);
            int64_t sum = _mm512_reduce_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(acc))) +
                          _mm512_reduce_add_epi64(_mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(acc, 1)));
            for (i = d32; i < d; i++) sum += (int32_t)w[i] * xq[i];
            h->out[(size_t)m * h->ldo + r] = (float)sum * inv * h->row_scale[r];
        }
    }
}

/* bf16 head on AVX512-BF16 when the input rows are bf16 values (the runner rounds the final hidden
 * state to bf16 first, as the reference's h.to(bfloat16) does): vdpbf16ps multiplies 32 bf16 pairs
 * into 16 fp32 sums, one instruction per 32 weights instead of widen + shift + FMA per 16. The
 * products are exact in fp32 either way; only the fp32 summation order differs (and bf16
 * denormals count as zero). NR rows x MB tokens per block, each weight vector serves MB tokens. */
#define BF_TGT __attribute__((target("avx512bf16")))
BF_TGT INLINE void FN(hbf)(const bn_head *h, const uint16_t *xb, int r, const int NR, int m0, const int MB) {
    const int d = h->d, d32 = d / 32 * 32;
    const uint16_t *w = (const uint16_t *)h->w + (size_t)r * d;
    __m512 acc[4][4];
#pragma GCC unroll 4
    for (int a = 0; a < NR; a++)
#pragma GCC unroll 4
        for (int b = 0; b < MB; b++) acc[a][b] = _mm512_setzero_ps();
    for (int i = 0; i < d32; i += 32) {
#pragma GCC unroll 4
        for (int a = 0; a < NR; a++) _mm_prefetch((const char *)(w + (size_t)a * d + i) + BN_PF_HEAD, _MM_HINT_T0);
#pragma GCC unroll 4
        for (int a = 0; a < NR; a++) {
            const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + (size_t)a * d + i);
#pragma GCC unroll 4
            for (int b = 0; b < MB; b++)
                acc[a][b] = _mm512_dpbf16_ps(acc[a][b], wv, (__m512bh)_mm512_loadu_si512(xb + (size_t)b * d + i));
        }
    }
    if (d32 < d) {
        const __mmask32 mk = (__mmask32)((1ull << (d - d32)) - 1);
#pragma GCC unroll 4
        for (int a = 0; a < NR; a++) {
            const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mk, w + (size_t)a * d + d32);
#pragma GCC unroll 4
            for (int b = 0; b < MB; b++)
                acc[a][b] = _mm512_dpbf16_ps(acc[a][b], wv, (__m512bh)_mm512_maskz_loadu_epi16(mk, xb + (size_t)b * d + d32));
        }
    }
#pragma GCC unroll 4
    for (int a = 0; a < NR; a++)
#pragma GCC unroll 4
        for (int b = 0; b < MB; b++) h->out[(size_t)(m0 + b) * h->ldo + r + a] = _mm512_reduce_add_ps(acc[a][b]);
}

BF_TGT static void FN(head_bf16)(const bn_head *h, int r0, int r1) {
    uint16_t xb[4 * BN_HEAD_I16_MAXD] __attribute__((aligned(64)));
    const int d = h->d;
    for (int m0 = 0; m0 < h->m; m0 += 4) {
        const int mb = h->m - m0 < 4 ? h->m - m0 : 4;
        for (int b = 0; b < mb; b++)
            for (int i = 0; i < d; i++) {
                uint32_t u;
                memcpy(&u, h->x + (size_t)(m0 + b) * h->ldx + i, 4);
                xb[(size_t)b * d + i] = (uint16_t)(u >> 16);      /* exact: checked by the caller */
            }
        int r = r0;
        if (mb == 4) {
            for (; r + 4 <= r1; r += 4) FN(hbf)(h, xb, r, 4, m0, 4);
            for (; r < r1; r++) FN(hbf)(h, xb, r, 1, m0, 4);
        } else {
            for (int b = 0; b < mb; b++) {
                for (int rr = r0; rr < r1; rr++) FN(hbf)(h, xb + (size_t)b * d, rr, 1, m0 + b, 1);
            }
        }
    }
}

/* Whether every input value is a bf16 value (low 16 bits zero): then vdpbf16ps is exact per product. */
static int FN(x_is_bf16)(const bn_head *h) {
    for (int m = 0; m < h->m; m++) {
        const uint32_t *x = (const uint32_t *)(const void *)(h->x + (size_t)m * h->ldx);
        uint32_t any = 0;
        for (int i = 0; i < h->d; i++) any |= x[i] & 0xffffu;
        if (any) return 0;
    }
    return 1;
}

static void FN(head)(const bn_head *h, int r0, int r1) {
    if (h->kind == BN_W_I8 && h->d <= BN_HEAD_I16_MAXD) { FN(head_i8)(h, r0, r1); return; }
    if (h->kind == BN_W_BF16 && bn_cpu_bf16 && h->d <= BN_HEAD_I16_MAXD && FN(x_is_bf16)(h)) {
        FN(head_bf16)(h, r0, r1);
        return;
    }
    int r = r0;
    for (; r + 4 <= r1; r += 4) {
        int m = 0;
        for (; m + 4 <= h->m; m += 4) FN(head4)(h, r, m, 4);
        for (; m < h->m; m++) FN(head4)(h, r, m, 1);
    }
    for (; r < r1; r++)
        for (int m = 0; m < h->m; m++) h->out[(size_t)m * h->ldo + r] = FN(dot_row)(h, h->x + (size_t)m * h->ldx, r);
}
#else
static void FN(head)(const bn_head *h, int r0, int r1) {
    for (int r = r0; r < r1; r++)
        for (int m = 0; m < h->m; m++) h->out[(size_t)m * h->ldo + r] = FN(dot_row)(h, h->x + (size_t)m * h->ldx, r);
}
#endif

/* ------------------------------------------------------------------ float helpers */
/* y = w * (x * rsqrt(mean(x^2) + eps)), fp32 like model.RMSNorm (y may alias x). */
static void FN(rmsnorm)(const float *x, const float *w, int n, float eps, float *y) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
#pragma omp simd
    for (int i = 0; i < n; i++) y[i] = w[i] * (x[i] * r);
}

#if defined(ISA_AVX512)
/* exp(x) for x <= 0 (softmax): 2^n * P(r), r = x - n ln2 (Cody-Waite split), degree-6 polynomial;
 * relative error ~2 ulp; x below -87 gives 0. */
static inline __m512 FN(exp16)(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, n);
}
#endif

/* Causal attention of one (token, head) over cache slots 0..pos of the token's row, scores in sc.
 * K is cached in blocks of 16 positions, [S/16][hd][16], so the scores of 16 positions are 16-wide
 * FMAs against a broadcast q[d] (no horizontal sums); V is [S][hd], accumulated 16-wide over d. */
static void FN(attn_head)(const bn_attn *a, int m, int h, float *sc) {
    const int hd = a->hd, rep = a->H / a->Hkv;
    const int g = h / rep;
    const int p = a->pos[m];
    const size_t base = ((size_t)a->row[m] * a->Hkv + g) * (size_t)a->S * hd;
    const float *q = a->q + (size_t)m * a->ldq + (size_t)h * hd;
    const int nblk = p / 16 + 1;
    for (int blk = 0; blk < nblk; blk++) {
        const size_t kb = base + (size_t)blk * hd * 16;
#if defined(ISA_AVX512)
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        if (a->kv_bf16) {
            const uint16_t *k = (const uint16_t *)a->kc + kb;
            for (int d = 0; d < hd; d += 2) {
                const __m512i k2 = _mm512_loadu_si512(k + d * 16);       /* rows d, d+1 */
                const __m512 klo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(k2)), 16));
                const __m512 khi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(k2, 1)), 16));
                acc0 = _mm512_add_ps(acc0, _mm512_mul_ps(_mm512_set1_ps(q[d]), klo));
                acc1 = _mm512_add_ps(acc1, _mm512_mul_ps(_mm512_set1_ps(q[d + 1]), khi));
            }
        } else {
            const float *k = (const float *)a->kc + kb;
            for (int d = 0; d < hd; d += 2) {
                acc0 = _mm512_add_ps(acc0, _mm512_mul_ps(_mm512_set1_ps(q[d]), _mm512_loadu_ps(k + d * 16)));
                acc1 = _mm512_add_ps(acc1, _mm512_mul_ps(_mm512_set1_ps(q[d + 1]), _mm512_loadu_ps(k + d * 16 + 16)));
            }
        }
        _mm512_storeu_ps(sc + blk * 16, _mm512_mul_ps(_mm512_add_ps(acc0, acc1), _mm512_set1_ps(a->scale)));
#else
        float acc[16];
        for (int l = 0; l < 16; l++) acc[l] = 0.0f;
        if (a->kv_bf16) {
            const uint16_t *k = (const uint16_t *)a->kc + kb;
            for (int d = 0; d < hd; d++) {
                const float qd = q[d];
#pragma omp simd
                for (int l = 0; l < 16; l++) acc[l] += qd * bn_bf16_to_f32(k[d * 16 + l]);
            }
        } else {
            const float *k = (const float *)a->kc + kb;
            for (int d = 0; d < hd; d++) {
                const float qd = q[d];
#pragma omp simd
                for (int l = 0; l < 16; l++) acc[l] += qd * k[d * 16 + l];
            }
        }
        for (int l = 0; l < 16; l++) sc[blk * 16 + l] = acc[l] * a->scale;
#endif
    }
    float mx = -INFINITY;
    for (int j = 0; j <= p; j++) mx = sc[j] > mx ? sc[j] : mx;
    float sum = 0.0f;
    int j0 = 0;
#if defined(ISA_AVX512)
    {
        __m512 vs = _mm512_setzero_ps();
        const __m512 vmx = _mm512_set1_ps(mx);
        for (; j0 + 16 <= p + 1; j0 += 16) {
            const __m512 e = FN(exp16)(_mm512_sub_ps(_mm512_loadu_ps(sc + j0), vmx));
            _mm512_storeu_ps(sc + j0, e);
            vs = _mm512_add_ps(vs, e);
        }
        sum = _mm512_reduce_add_ps(vs);
    }
#endif
    for (int j = j0; j <= p; j++) { sc[j] = expf(sc[j] - mx); sum += sc[j]; }
    const float inv = 1.0f / sum;
    float *o = a->out + (size_t)m * a->ldo + (size_t)h * hd;
    for (int d = 0; d < hd; d++) o[d] = 0.0f;
    for (int j = 0; j <= p; j++) {
        const float pj = sc[j] * inv;
        if (a->kv_bf16) {
            const uint16_t *v = (const uint16_t *)a->vc + base + (size_t)j * hd;
#pragma omp simd
            for (int d = 0; d < hd; d++) o[d] += pj * bn_bf16_to_f32(v[d]);
        } else {
            const float *v = (const float *)a->vc + base + (size_t)j * hd;
#pragma omp simd
            for (int d = 0; d < hd; d++) o[d] += pj * v[d];
        }
    }
}

#if defined(ISA_AVX512)
/* 16 fp32 values of the V cache from element offset off (bf16 cache: widened exactly). */
INLINE __m512 FN(vrow16)(const bn_attn *a, size_t off) {
    if (a->kv_bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)a->vc + off))), 16));
    return _mm512_loadu_ps((const float *)a->vc + off);
}

/* HB heads of one KV group at once (GQA): each K block and V row is loaded and widened once for
 * all of them. Scores, softmax and the V sum as attn_head, with FMAs; hd a multiple of 16. */
INLINE void FN(attn_grp)(const bn_attn *a, int m, int h0, const int HB, float *sc) {
    const int hd = a->hd, S = a->S, rep = a->H / a->Hkv, g = h0 / rep, p = a->pos[m];
    const size_t base = ((size_t)a->row[m] * a->Hkv + g) * (size_t)S * hd;
    const float *q[4];
#pragma GCC unroll 4
    for (int b = 0; b < HB; b++) q[b] = a->q + (size_t)m * a->ldq + (size_t)(h0 + b) * hd;
    const int nblk = p / 16 + 1;
    const __m512 vscale = _mm512_set1_ps(a->scale);
    for (int blk = 0; blk < nblk; blk++) {
        const size_t kb = base + (size_t)blk * hd * 16;
        __m512 acc0[4], acc1[4];
#pragma GCC unroll 4
        for (int b = 0; b < HB; b++) { acc0[b] = _mm512_setzero_ps(); acc1[b] = _mm512_setzero_ps(); }
        for (int d = 0; d < hd; d += 2) {
            __m512 klo, khi;
            if (a->kv_bf16) {
                /* the KV cache comes from memory each token: fetch the next block while this one runs */
                _mm_prefetch((const char *)((const uint16_t *)a->kc + kb + (size_t)hd * 16 + d * 16), _MM_HINT_T0);
                const __m512i k2 = _mm512_loadu_si512((const uint16_t *)a->kc + kb + d * 16);   /* rows d, d+1 */
                klo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(k2)), 16));
                khi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(k2, 1)), 16));
            } else {
                klo = _mm512_loadu_ps((const float *)a->kc + kb + d * 16);
                khi = _mm512_loadu_ps((const float *)a->kc + kb + d * 16 + 16);
            }
#pragma GCC unroll 4
            for (int b = 0; b < HB; b++) {
                acc0[b] = _mm512_fmadd_ps(_mm512_set1_ps(q[b][d]), klo, acc0[b]);
                acc1[b] = _mm512_fmadd_ps(_mm512_set1_ps(q[b][d + 1]), khi, acc1[b]);
            }
        }
#pragma GCC unroll 4
        for (int b = 0; b < HB; b++)
            _mm512_storeu_ps(sc + (size_t)b * S + blk * 16, _mm512_mul_ps(_mm512_add_ps(acc0[b], acc1[b]), vscale));
    }
    /* softmax of each head over slots 0..p (slots past p in the last block are masked out) */
    const __mmask16 last = (__mmask16)((1u << (p % 16 + 1)) - 1);
    float inv[4];
#pragma GCC unroll 4
    for (int b = 0; b < HB; b++) {
        float *s = sc + (size_t)b * S;
        __m512 vm = _mm512_set1_ps(-INFINITY);
        for (int blk = 0; blk < nblk; blk++)
            vm = _mm512_mask_max_ps(vm, blk + 1 < nblk ? 0xffff : last, vm, _mm512_loadu_ps(s + blk * 16));
        const __m512 vmx = _mm512_set1_ps(_mm512_reduce_max_ps(vm));
        __m512 vs = _mm512_setzero_ps();
        for (int blk = 0; blk < nblk; blk++) {
            __m512 e = FN(exp16)(_mm512_sub_ps(_mm512_loadu_ps(s + blk * 16), vmx));
            if (blk + 1 == nblk) e = _mm512_maskz_mov_ps(last, e);
            _mm512_storeu_ps(s + blk * 16, e);
            vs = _mm512_add_ps(vs, e);
        }
        inv[b] = 1.0f / _mm512_reduce_add_ps(vs);
    }
    /* out[h] = sum_j p_j V[j] / sum_j p_j, NV x 16 columns of d at a time held in registers */
    const int NV = HB <= 2 ? 8 : 4;     /* a constant once inlined */
    for (int d0 = 0; d0 < hd; d0 += NV * 16) {
        const int nv = (hd - d0) / 16 < NV ? (hd - d0) / 16 : NV;
        __m512 o[4][8];
#pragma GCC unroll 4
        for (int b = 0; b < HB; b++)
#pragma GCC unroll 8
            for (int v = 0; v < NV; v++) o[b][v] = _mm512_setzero_ps();
        for (int j = 0; j <= p; j++) {
            __m512 pj[4];
            if (a->kv_bf16 && d0 == 0)                 /* V row j + 8, ahead (2 KB for hd = 128) */
                for (int l = 0; l < hd * 2; l += 64)
                    _mm_prefetch((const char *)((const uint16_t *)a->vc + base + (size_t)(j + 8) * hd) + l, _MM_HINT_T0);
#pragma GCC unroll 4
            for (int b = 0; b < HB; b++) pj[b] = _mm512_set1_ps(sc[(size_t)b * S + j]);
            if (nv == NV) {
#pragma GCC unroll 8
                for (int v = 0; v < NV; v++) {
                    const __m512 vv = FN(vrow16)(a, base + (size_t)j * hd + d0 + 16 * v);
#pragma GCC unroll 4
                    for (int b = 0; b < HB; b++) o[b][v] = _mm512_fmadd_ps(pj[b], vv, o[b][v]);
                }
            } else {
                for (int v = 0; v < nv; v++) {
                    const __m512 vv = FN(vrow16)(a, base + (size_t)j * hd + d0 + 16 * v);
                    for (int b = 0; b < HB; b++) o[b][v] = _mm512_fmadd_ps(pj[b], vv, o[b][v]);
                }
            }
        }
#pragma GCC unroll 4
        for (int b = 0; b < HB; b++) {
            float *out = a->out + (size_t)m * a->ldo + (size_t)(h0 + b) * hd + d0;
            for (int v = 0; v < nv; v++) _mm512_storeu_ps(out + 16 * v, _mm512_mul_ps(o[b][v], _mm512_set1_ps(inv[b])));
        }
    }
}
#endif

/* Items are (token, KV group, slice of hb of the group's heads): item = (m * Hkv + g) * (rep / hb) + c.
 * Heads that share K/V are handled together where the vector path can (attn_grp). */
static void FN(attention)(const bn_attn *a, int i0, int i1, int tid) {
    const int rep = a->H / a->Hkv, hb = a->hb, per = rep / hb;
    float *sc = a->scratch + (size_t)tid * 4 * a->S;
    for (int it = i0; it < i1; it++) {
        const int m = it / (a->Hkv * per), r = it % (a->Hkv * per), h0 = (r / per) * rep + (r % per) * hb;
#if defined(ISA_AVX512)
        if (a->hd % 16 == 0) {
            if (hb == 4) { FN(attn_grp)(a, m, h0, 4, sc); continue; }
            if (hb == 2) { FN(attn_grp)(a, m, h0, 2, sc); continue; }
            if (hb == 1) { FN(attn_grp)(a, m, h0, 1, sc); continue; }
        }
#endif
        for (int h = h0; h < h0 + hb; h++) FN(attn_head)(a, m, h, sc);
    }
}

/* t[j] = relu(g[j])^2 * u[j] (the squared-ReLU gate), fp32 as the reference. */
static void FN(relu2_mul)(const float *g, const float *u, int n, float *t) {
#pragma omp simd
    for (int j = 0; j < n; j++) {
        const float r = g[j] > 0.0f ? g[j] : 0.0f;
        t[j] = (r * r) * u[j];
    }
}

/* Read n bytes as fast as possible (the bandwidth floor); returns a value so nothing is elided. */
static uint64_t FN(stream_read)(const uint8_t *p, size_t n) {
#if defined(ISA_AVX512)
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    size_t i = 0;
    for (; i + 256 <= n; i += 256) {
#pragma GCC unroll 4
        for (int l = 0; l < 4; l++) _mm_prefetch((const char *)(p + i + BN_PF + 64 * l), _MM_HINT_T0);
        a0 = _mm512_xor_si512(a0, _mm512_loadu_si512(p + i));
        a1 = _mm512_xor_si512(a1, _mm512_loadu_si512(p + i + 64));
        a2 = _mm512_xor_si512(a2, _mm512_loadu_si512(p + i + 128));
        a3 = _mm512_xor_si512(a3, _mm512_loadu_si512(p + i + 192));
    }
    a0 = _mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3));
    return (uint64_t)_mm512_reduce_add_epi64(a0);
#else
    uint64_t acc = 0;
    const size_t n8 = n / 8;
#pragma omp simd reduction(^ : acc)
    for (size_t i = 0; i < n8; i++) { uint64_t v; memcpy(&v, p + 8 * i, 8); acc ^= v; }
    return acc;
#endif
}

const bn_ops BN_CAT(bn_ops, ISA_NAME) = {
    .name = BN_STR(ISA_NAME),
    .act_quant = FN(act_quant),
    .gemm = FN(gemm),
#ifdef BN_GEMM_B3
    .gemm_b3 = BN_GEMM_B3,
#endif
    .head = FN(head),
    .rmsnorm = FN(rmsnorm),
    .attention = FN(attention),
    .relu2_mul = FN(relu2_mul),
    .stream_read = FN(stream_read),
};
