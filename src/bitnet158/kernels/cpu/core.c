/* core.c — the C API of the CPU engine: ISA dispatch, layout conversion, linear, head, bandwidth.
 *
 * Loaded from Python with ctypes (binding.py); no Python C-API. Every entry point is plain C with
 * pointer + int arguments. The whole-model forward lives in forward.c.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "bitnet_cpu.h"
#include "core.h"
#include "pool.h"

const bn_ops *bn_cur = &bn_ops_scalar;
int bn_cpu_vbmi, bn_cpu_bf16;
int bn_pf = 512;

/* Prefetch distance of the decode kernels in bytes (multiple of 64; 0 turns prefetching into a
 * touch of the line being read). Returns the value in effect. */
int bn_set_prefetch(int bytes) {
    if (bytes >= 0 && bytes <= (1 << 16)) bn_pf = bytes / 64 * 64;
    return bn_pf;
}
uint8_t bn_b3_tab[5][128] __attribute__((aligned(64)));
uint8_t bn_b3_u[256][5];

static void b3_tables(void) {
    for (int m = 0; m < 128; m++)
        for (int i = 0, v = m + 121; i < 5; i++, v /= 3) bn_b3_tab[i][m] = m < 122 ? (uint8_t)(v % 3) : 1;
    for (int b = 0; b < 256; b++)
        for (int i = 0; i < 5; i++) {
            const int u = bn_b3_tab[i][b & 127];
            bn_b3_u[b][i] = (uint8_t)(b & 128 ? 2 - u : u);
        }
}

/* ------------------------------------------------------------------ dispatch */
int bn_isa_supported(const char *name) {
    if (!strcmp(name, "scalar")) return 1;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (!strcmp(name, "avx2")) return avx2;
    if (!strcmp(name, "avxvnni")) {
        /* __builtin_cpu_supports("avxvnni") needs gcc >= 11; read CPUID leaf 7 subleaf 1 EAX[4]. */
        unsigned a, b, c, d;
        __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(1));
        return avx2 && ((a >> 4) & 1);
    }
    if (!strcmp(name, "avx512"))
        return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("avx512vnni");
#endif
    return 0;
}

static const bn_ops *find(const char *name) {
    if (!strcmp(name, "scalar")) return &bn_ops_scalar;
#if defined(__x86_64__) || defined(__i386__)
    if (!strcmp(name, "avx2")) return &bn_ops_avx2;
    if (!strcmp(name, "avxvnni")) return &bn_ops_avxvnni;
    if (!strcmp(name, "avx512")) return &bn_ops_avx512;
#endif
    return NULL;
}

/* Best first. */
static const char *ORDER[] = {"avx512", "avxvnni", "avx2", "scalar"};

const char *bn_best_isa(void) {
    for (size_t i = 0; i < sizeof ORDER / sizeof *ORDER; i++)
        if (bn_isa_supported(ORDER[i])) return ORDER[i];
    return "scalar";
}

int bn_set_isa(const char *name) {
    const bn_ops *o = find(name);
    if (!o || !bn_isa_supported(name)) return -1;
    bn_cur = o;
    return 0;
}

const char *bn_get_isa(void) { return bn_cur->name; }

int bn_init(int threads) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    bn_cpu_vbmi = __builtin_cpu_supports("avx512vbmi") != 0;
    bn_cpu_bf16 = __builtin_cpu_supports("avx512bf16") != 0;
#endif
    b3_tables();
    bn_set_isa(bn_best_isa());
    return bn_pool_set_threads(threads);
}

int bn_set_threads(int n) { return bn_pool_set_threads(n); }
int bn_get_threads(void) { return bn_pool_threads(); }

/* ------------------------------------------------------------------ layout conversion
 * HF packed P uint8 [N/4][K] (field f of row r = row f*R + r, stored w+1) -> T16 (bitnet_cpu.h).
 * out must hold (Np/16) * (Kp/16) * 64 bytes; padding rows/columns get u = 1 (w = 0).           */
typedef struct { const uint8_t *P; int N, K; uint8_t *out; } cv_ctx;

/* Row n of W in P: the packed row that holds it and the shift of its 2-bit field; NULL past N
 * (padding rows). */
static const uint8_t *hf_row(const cv_ctx *c, int n, int *sh) {
    *sh = n < c->N ? 2 * (n / (c->N / 4)) : 0;
    return n < c->N ? c->P + (size_t)(n % (c->N / 4)) * c->K : NULL;
}

static void convert_task(void *c_, int t0, int t1, int tid) {
    (void)tid;
    const cv_ctx *c = c_;
    const int K = c->K, kp = (K + 15) / 16 * 16, ks = kp / 16, kfull = K / 16;
    for (int t = t0; t < t1; t++) {
        for (int r = 0; r < 16; r++) {
            int sh;
            const uint8_t *src = hf_row(c, 16 * t + r, &sh);
            uint8_t *dst = c->out + (size_t)t * ks * 64 + r * 4;
            for (int s = 0; s < ks; s++, dst += 64) {
                const uint8_t *x = src ? src + 16 * s : NULL;
                for (int j = 0; j < 4; j++) {
                    uint8_t byte = 0;
                    if (x && s < kfull) {          /* fast path: whole step inside K */
                        for (int f = 0; f < 4; f++) byte |= (uint8_t)(((x[4 * f + j] >> sh) & 3) << (2 * f));
                    } else {
                        for (int f = 0; f < 4; f++) {
                            const int k = 16 * s + 4 * f + j;
                            const int u = (src && k < K) ? (src[k] >> sh) & 3 : 1;
                            byte |= (uint8_t)(u << (2 * f));
                        }
                    }
                    dst[j] = byte;
                }
            }
        }
    }
}

int bn_convert_hf(const uint8_t *P, int N, int K, uint8_t *out) {
    if (N % 4) return -1;
    cv_ctx c = {P, N, K, out};
    bn_pool_run(convert_task, &c, (N + 15) / 16);
    return 0;
}

/* HF packed -> B3 (bitnet_cpu.h): out holds (Np/16) * (Kp/20) * 64 bytes; padding is w = 0. */
static void convert_b3_task(void *c_, int t0, int t1, int tid) {
    (void)tid;
    const cv_ctx *c = c_;
    const int K = c->K, ks = (K + 19) / 20;
    for (int t = t0; t < t1; t++) {
        for (int r = 0; r < 16; r++) {
            int sh;
            const uint8_t *src = hf_row(c, 16 * t + r, &sh);
            uint8_t *dst = c->out + (size_t)t * ks * 64 + r * 4;
            for (int s = 0; s < ks; s++, dst += 64)
                for (int j = 0; j < 4; j++) {
                    int v = 0;
                    for (int i = 4; i >= 0; i--) {
                        const int k = 20 * s + 4 * i + j;
                        v = 3 * v + ((src && k < K) ? (src[k] >> sh) & 3 : 1);
                    }
                    dst[j] = (uint8_t)(v >= 121 ? v - 121 : 0x80 | (121 - v));
                }
        }
    }
}

int bn_convert_b3(const uint8_t *P, int N, int K, uint8_t *out) {
    if (N % 4) return -1;
    cv_ctx c = {P, N, K, out};
    bn_pool_run(convert_b3_task, &c, (N + 15) / 16);
    return 0;
}

/* Whether the current ISA path has a native kernel for `layout` (else B3 runs the scalar one). */
int bn_layout_native(int layout) {
    if (layout == BN_LAYOUT_T16) return 1;
    if (bn_cur->gemm_b3 == NULL) return 0;
#if defined(__x86_64__) || defined(__i386__)
    if (bn_cur == &bn_ops_avx512) return bn_cpu_vbmi;     /* vpermi2b needs AVX-512 VBMI */
#endif
    return 1;
}

/* Ask for transparent huge pages on the 2 MB-aligned interior of [p, p + n): before the first
 * touch (MADV_HUGEPAGE: faults then map 2 MB pages) or, with collapse, for memory already
 * written (MADV_COLLAPSE, Linux >= 6.1: copied into huge pages in place, no second copy kept).
 * Fewer TLB misses and longer hardware-prefetch streams on the weights: 10-25 % more read
 * bandwidth on the 2-core Xeon this was tuned on. Returns the bytes advised, or -1. */
long long bn_advise_huge(void *p, size_t n, int collapse) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t H = (uintptr_t)2 << 20;
    const uintptr_t a = ((uintptr_t)p + H - 1) & ~(H - 1), e = ((uintptr_t)p + n) & ~(H - 1);
    if (e <= a) return 0;
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
    if (madvise((void *)a, e - a, collapse ? MADV_COLLAPSE : MADV_HUGEPAGE)) return -1;
    return (long long)(e - a);
#else
    (void)p; (void)n; (void)collapse;
    return -1;
#endif
}

/* ------------------------------------------------------------------ activation quantization */
typedef struct { const float *x; int k, kp, ldx; int8_t *q; float *s; int32_t *sa; } aq_ctx;

static void aq_task(void *c_, int i0, int i1, int tid) {
    (void)tid;
    const aq_ctx *c = c_;
    for (int i = i0; i < i1; i++)
        bn_cur->act_quant(c->x + (size_t)i * c->ldx, c->k, c->kp, c->q + (size_t)i * c->kp, c->s + i, c->sa + i);
}

void bn_act_quant(const float *x, int m, int k, int kp, int8_t *q, float *s, int32_t *sa) {
    aq_ctx c = {x, k, kp, k, q, s, sa};
    bn_pool_run(aq_task, &c, m);
}

/* ------------------------------------------------------------------ GEMM / linear */
static void gemm_task(void *c, int t0, int t1, int tid) {
    (void)tid;
    bn_cur->gemm((const bn_gemm *)c, t0, t1);
}

static void gemm_b3_task(void *c, int t0, int t1, int tid) {
    (void)tid;
    (bn_layout_native(BN_LAYOUT_B3) ? bn_cur : &bn_ops_scalar)->gemm_b3((const bn_gemm *)c, t0, t1);
}

void bn_gemm_run(const bn_gemm *g) {
    bn_pool_run(g->layout == BN_LAYOUT_B3 ? gemm_b3_task : gemm_task, (void *)g, (g->n + 15) / 16);
}

/* Exact integers: out [m][n] int32 = x_q [m][kp] @ W^T (kp: K padded for the layout). */
void bn_gemm_i32(const uint8_t *w, int n, int kp, const int8_t *xq, int m, const int32_t *sa, int32_t *out,
                 int layout) {
    bn_gemm g = {.w = w, .tile_gamma = NULL, .n = n, .kp = kp, .xq = xq, .m = m, .sx = NULL, .sa = sa,
                 .out = out, .ldo = n, .mode = BN_OUT_I32, .layout = layout};
    bn_gemm_run(&g);
}

/* PackedLinear forward: x [m][k] fp32 -> y [m][n] fp32 = act_quant then (acc * (gamma / s_x)).
 * Scratch: q [m][kp] int8, s [m] fp32, sa [m] int32 (the caller's, so nothing is allocated here). */
void bn_linear(const float *x, int m, int k, const uint8_t *w, int n, int kp, const float *tile_gamma,
               float *y, int8_t *q, float *s, int32_t *sa, int layout) {
    bn_act_quant(x, m, k, kp, q, s, sa);
    bn_gemm g = {.w = w, .tile_gamma = tile_gamma, .n = n, .kp = kp, .xq = q, .m = m, .sx = s, .sa = sa,
                 .out = y, .ldo = n, .mode = BN_OUT_F32, .layout = layout};
    bn_gemm_run(&g);
}

/* ------------------------------------------------------------------ head */
static void head_task(void *c, int r0, int r1, int tid) {
    (void)tid;
    bn_cur->head((const bn_head *)c, r0, r1);
}

void bn_head_run(const bn_head *h, int rows) {
    /* split in blocks of 4 rows so the vector path sees whole blocks */
    bn_pool_run(head_task, (void *)h, rows);
}

void bn_head_gemv(const void *w, int kind, const float *row_scale, int rows, int d, const float *x, int m,
                  float *out) {
    bn_head h = {.w = w, .kind = kind, .row_scale = row_scale, .d = d, .x = x, .m = m, .ldx = d,
                 .out = out, .ldo = rows};
    bn_head_run(&h, rows);
}

/* ------------------------------------------------------------------ bandwidth probe */
typedef struct { const uint8_t *p; size_t n; uint64_t sink[64]; } bw_ctx;

static void bw_task(void *c_, int i0, int i1, int tid) {
    bw_ctx *c = c_;
    const size_t per = c->n / (size_t)bn_pool_threads() / 4096 * 4096;
    (void)i1;
    c->sink[tid] = bn_cur->stream_read(c->p + (size_t)i0 * per, per);
}

/* GB/s reading n bytes of p with all threads (best of `reps`). */
double bn_bandwidth(const uint8_t *p, size_t n, int reps) {
    bw_ctx c = {.p = p, .n = n};
    double best = 0.0;
    for (int r = 0; r < reps; r++) {
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        bn_pool_run(bw_task, &c, bn_pool_threads());
        clock_gettime(CLOCK_MONOTONIC, &b);
        const double dt = (b.tv_sec - a.tv_sec) + 1e-9 * (b.tv_nsec - a.tv_nsec);
        const size_t per = n / (size_t)bn_pool_threads() / 4096 * 4096;
        const double gbs = (double)per * bn_pool_threads() / dt / 1e9;
        if (gbs > best) best = gbs;
    }
    return best;
}
