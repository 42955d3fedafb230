/* bitnet_cpu.h — shared declarations of the plain-C CPU engine of bitnet158.
 *
 * Weight layout "T16" (converted once at load from the Hugging Face layout, see core.c):
 *   a ternary matrix W [N, K] is padded to Np = ceil(N/16)*16 rows and Kp = ceil(K/16)*16 columns
 *   with zeros and stored as u = w + 1 in {0, 1, 2}, 2 bits each, in tiles of 16 rows:
 *     byte  (t, s, b) at offset ((t * Kp/16) + s) * 64 + b,  b = r*4 + j  (r = row 0..15, j = 0..3)
 *     bits  2f..2f+1 of that byte hold u[16t + r, 16s + 4f + j]   (f = 0..3)
 *   So after `(byte >> 2f) & 3`, the 64 bytes of one step are 16 rows x 4 consecutive k: one
 *   `vpdpbusd` against the 4 activations a[16s+4f .. +3] broadcast to every 32-bit lane gives each
 *   row's partial sum in its own lane — no horizontal reduction, one activation load for 16 rows.
 *   sum_k u*a = sum_k w*a + sum_k a, so the kernels subtract the token's Σa at the end.
 *
 * Weight layout "B3" (1.6 bits per weight: 5 ternary digits per byte, 20 % fewer bytes than T16):
 *   W [N, K] padded to Np = ceil(N/16)*16 rows and Kp = ceil(K/20)*20 columns, tiles of 16 rows:
 *     byte  (t, s, b) at offset ((t * Kp/20) + s) * 64 + b,  b = r*4 + j  (r = row 0..15, j = 0..3)
 *     holds the 5 weights w_i = W[16t + r, 20s + 4i + j], i = 0..4, as v = sum_i (w_i + 1) * 3^i
 *     in [0, 242], sign-folded: v >= 121 -> byte = v - 121; v < 121 -> byte = 0x80 | (121 - v)
 *     (negating all five weights maps v to 242 - v, and v = 121 is all zeros).
 *   Decoding digit i of 64 bytes is one 128-entry table lookup on the low 7 bits (vpermi2b:
 *   bn_b3_tab[i][m] = digit i of m + 121) and, where bit 7 is set, u -> 2 - u. The 64 decoded
 *   bytes of digit i are again 16 rows x 4 consecutive k (k = 20s + 4i + j): the same vpdpbusd
 *   against a[20s+4i .. +3] as T16, the same Σa correction.
 *
 * Each ISA file (isa_*.c) includes isa_impl.h and exports one bn_ops table.
 */
#ifndef BITNET_CPU_H
#define BITNET_CPU_H

#include <stddef.h>
#include <stdint.h>

#define BN_OUT_I32 0      /* out[m, n] = int32 exact  sum_k w*a                                  */
#define BN_OUT_F32 1      /* out[m, n] = float(acc) * (gamma / s_x[m])     (quant.bitlinear_ref)   */
#define BN_OUT_F32_ADD 2  /* out[m, n] += float(acc) * (gamma / s_x[m])    (fused residual add)    */

#define BN_LAYOUT_T16 0
#define BN_LAYOUT_B3 1

#define BN_W_F32 0
#define BN_W_BF16 1
#define BN_W_I8 2

typedef struct {
    const uint8_t *w;          /* T16 [Np/16][Kp/16][64] or B3 [Np/16][Kp/20][64] weights           */
    const float *tile_gamma;   /* [Np/16] gamma multiplier of each 16-row tile                      */
    int n, kp;                 /* valid output rows; padded K (multiple of 16, of 20 for B3)        */
    const int8_t *xq;          /* activations [m][kp], zero padded past K                          */
    int m;
    const float *sx;           /* [m] activation scales s_x = 127/absmax                            */
    const int32_t *sa;         /* [m] sum of the int8 activations                                   */
    void *out;                 /* int32 or float [m][ldo]                                           */
    int ldo, mode;
    int layout;                /* BN_LAYOUT_T16 or BN_LAYOUT_B3                                     */
} bn_gemm;

typedef struct {
    const void *w;             /* [rows][d] fp32 / bf16 / int8                                      */
    int kind;                  /* BN_W_*                                                            */
    const float *row_scale;    /* [rows] for int8                                                   */
    int d;
    const float *x;            /* inputs [m][ldx] fp32                                              */
    int m, ldx;
    float *out;                /* [m][ldo]                                                          */
    int ldo;
} bn_head;

typedef struct {
    const float *q;            /* [m][ldq], head h at q + h*hd                                       */
    int ldq;
    const void *kc, *vc;       /* fp32 or bf16 caches: K [B][Hkv][S/16][hd][16], V [B][Hkv][S][hd]     */
    int kv_bf16, S, hd, H, Hkv;   /* S: cache slots, a multiple of 16                                */
    const int32_t *row, *pos;  /* [m] cache row and position of each token                          */
    float *out;                /* [m][ldo], head h at out + h*hd                                     */
    int ldo;
    float *scratch;            /* [threads][4 * S]                                                  */
    float scale;
    int hb;                    /* heads per item (divides H / Hkv; 1, 2 or 4)                       */
} bn_attn;

typedef struct {
    const char *name;
    /* x [k] fp32 -> q [kp] int8 (zero padded), *s = 127/absmax (as torch computes it), *sa = Σq   */
    void (*act_quant)(const float *x, int k, int kp, int8_t *q, float *s, int32_t *sa);
    void (*gemm)(const bn_gemm *g, int t0, int t1);              /* tiles [t0, t1), all m tokens */
    void (*gemm_b3)(const bn_gemm *g, int t0, int t1);           /* B3 layout; NULL: none native */
    void (*head)(const bn_head *h, int r0, int r1);              /* rows [r0, r1), all m tokens  */
    void (*rmsnorm)(const float *x, const float *w, int n, float eps, float *y);
    void (*attention)(const bn_attn *a, int i0, int i1, int tid);  /* items: token x group x H/Hkv/hb */
    void (*relu2_mul)(const float *g, const float *u, int n, float *t);
    uint64_t (*stream_read)(const uint8_t *p, size_t n);         /* memory bandwidth probe       */
} bn_ops;

extern const bn_ops bn_ops_scalar;

/* Set once by bn_init (core.c): CPU features checked at run time, B3 decode tables. */
extern int bn_cpu_vbmi, bn_cpu_bf16;
extern int bn_pf;                    /* software prefetch distance on decode weight streams (bytes) */
extern uint8_t bn_b3_tab[5][128];    /* digit i (u = w + 1) of m + 121, m = 0..121; 1 past that  */
extern uint8_t bn_b3_u[256][5];      /* the five u of a whole B3 byte, sign applied (scalar path) */
#if defined(__x86_64__) || defined(__i386__)
extern const bn_ops bn_ops_avx2;
extern const bn_ops bn_ops_avxvnni;
extern const bn_ops bn_ops_avx512;
#endif

/* bf16 <-> fp32 (round to nearest even, as torch's .to(bfloat16)) */
static inline float bn_bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)h << 16;
    return v.f;
}
static inline uint16_t bn_f32_to_bf16(float f) {
    union { uint32_t u; float f; } v;
    v.f = f;
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40);  /* NaN */
    v.u += 0x7fffu + ((v.u >> 16) & 1u);
    return (uint16_t)(v.u >> 16);
}

#endif
