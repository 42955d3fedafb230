/* forward.c — the whole BitNet b1.58 decoder forward in C, for decode (m = batch rows) and prefill.
 *
 * One call runs m tokens (each with its own KV-cache row and position) through every layer:
 *   x = embed(tok)
 *   per layer:  n = rmsnorm(x)           -> int8 once -> fused q|k|v GEMM (one pass over xq)
 *               RoPE(q, k); k, v -> cache[row, :, pos]   (fp32 or bf16 cache)
 *               o = attention(q, cache[0..pos])          (per token x KV group, fp32 softmax)
 *               o = rmsnorm_sub(o) -> int8 -> o_proj GEMM, residual added in its epilogue
 *               m = rmsnorm(x)       -> int8 once -> fused gate|up GEMM
 *               h = relu(g)^2 * u -> rmsnorm_sub -> int8 -> down GEMM, residual in epilogue
 *   final rmsnorm of the selected tokens, head GEMV -> fp32 logits.
 * All buffers belong to the caller (allocated once by runner.py); nothing is allocated here.
 * Every parallel step is one bn_pool_run (tiles, tokens or token x head items).
 */
#include <math.h>
#include <string.h>
#include <time.h>

#include "bitnet_cpu.h"
#include "core.h"
#include "pool.h"

typedef struct {
    const uint8_t *wqkv, *wo, *wgu, *wdown;      /* T16 or B3 weights; q|k|v and gate|up fused */
    const float *gqkv, *go, *ggu, *gdown;        /* gamma per 16-row tile */
    const float *ln_in, *ln_post, *ln_attn, *ln_ffn;
    void *kc, *vc;           /* K [batch][hkv][max_len/16][hd][16], V [batch][hkv][max_len][hd] */
} bn_layer;

typedef struct {
    int n_layers, d, h, hkv, hd, f, vocab, batch, max_len, kv_bf16;   /* max_len: multiple of 16 */
    int layout;                      /* BN_LAYOUT_T16 or BN_LAYOUT_B3, for every projection */
    float eps, attn_scale;
    int q_off, k_off, v_off, nqkv;   /* column offsets of q, k, v in the fused output (16-aligned) */
    int f_pad;                       /* gate rows padded to 16; up starts at column f_pad */
    int kp_d, kp_q, kp_f;            /* padded K (to 16, or 20 for B3) of the projections reading d, h*hd, f */
    const float *rope_cos, *rope_sin;                       /* [max_pos][hd] */
    const void *embed; int embed_kind; const float *embed_scale;   /* [vocab][d] */
    const void *head; int head_kind; const float *head_scale;      /* [vocab][d] */
    int head_round_bf16;             /* round the final hidden to bf16 first (as h.to(bf16)) */
    const float *ln_final;
    const bn_layer *layers;
    int max_m, ldt;                  /* buffer capacity in tokens; row stride of t */
    float *x, *t, *qkv, *att, *gu, *hout, *scratch;
    int8_t *xq;
    float *sx;
    int32_t *sa;
} bn_model;

typedef struct {
    const bn_model *M;
    const bn_layer *L;
    int m, step;
    const int32_t *tok, *pos, *row, *out_idx;
} fw_ctx;

enum { ST_EMBED, ST_NORM_IN, ST_ROPE_KV, ST_NORM_ATTN, ST_NORM_POST, ST_FFN_ACT };

static void embed_row(const bn_model *M, int tok, float *x) {
    const size_t off = (size_t)tok * M->d;
    if (M->embed_kind == BN_W_BF16) {
        const uint16_t *e = (const uint16_t *)M->embed + off;
        for (int i = 0; i < M->d; i++) x[i] = bn_bf16_to_f32(e[i]);
    } else if (M->embed_kind == BN_W_I8) {
        const int8_t *e = (const int8_t *)M->embed + off;
        const float s = M->embed_scale[tok];
        for (int i = 0; i < M->d; i++) x[i] = (float)e[i] * s;
    } else {
        memcpy(x, (const float *)M->embed + off, sizeof(float) * M->d);
    }
}

static void rope(float *v, const float *c, const float *s, int hd) {
    const int half = hd / 2;
    for (int i = 0; i < half; i++) {
        const float a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * s[i];
        v[i + half] = b * c[i + half] + a * s[i + half];
    }
}

static void store_kv(void *cache, int bf16, size_t off, const float *src, int n, int stride) {
    if (bf16) {
        uint16_t *d = (uint16_t *)cache + off;
        for (int i = 0; i < n; i++) d[(size_t)i * stride] = bn_f32_to_bf16(src[i]);
    } else {
        float *d = (float *)cache + off;
        for (int i = 0; i < n; i++) d[(size_t)i * stride] = src[i];
    }
}

/* Per-token steps; items are tokens. */
static void token_task(void *c_, int i0, int i1, int tid) {
    (void)tid;
    const fw_ctx *c = c_;
    const bn_model *M = c->M;
    const bn_layer *L = c->L;
    for (int i = i0; i < i1; i++) {
        float *x = M->x + (size_t)i * M->d;
        float *t = M->t + (size_t)i * M->ldt;
        switch (c->step) {
        case ST_EMBED:
            embed_row(M, c->tok[i], x);
            break;
        case ST_NORM_IN:
        case ST_NORM_POST:
            bn_cur->rmsnorm(x, c->step == ST_NORM_IN ? L->ln_in : L->ln_post, M->d, M->eps, t);
            bn_cur->act_quant(t, M->d, M->kp_d, M->xq + (size_t)i * M->kp_d, M->sx + i, M->sa + i);
            break;
        case ST_ROPE_KV: {
            float *q = M->qkv + (size_t)i * M->nqkv;
            const int p = c->pos[i];
            const float *cs = M->rope_cos + (size_t)p * M->hd, *sn = M->rope_sin + (size_t)p * M->hd;
            for (int h = 0; h < M->h; h++) rope(q + M->q_off + h * M->hd, cs, sn, M->hd);
            for (int g = 0; g < M->hkv; g++) {
                float *k = q + M->k_off + g * M->hd;
                rope(k, cs, sn, M->hd);
                const size_t slab = ((size_t)c->row[i] * M->hkv + g) * M->max_len * M->hd;
                store_kv(L->vc, M->kv_bf16, slab + (size_t)p * M->hd, q + M->v_off + g * M->hd, M->hd, 1);
                /* K in blocks of 16 positions: [S/16][hd][16] */
                store_kv(L->kc, M->kv_bf16, slab + (size_t)(p / 16) * M->hd * 16 + p % 16, k, M->hd, 16);
            }
            break;
        }
        case ST_NORM_ATTN: {
            const int nq = M->h * M->hd;
            bn_cur->rmsnorm(M->att + (size_t)i * nq, L->ln_attn, nq, M->eps, t);
            bn_cur->act_quant(t, nq, M->kp_q, M->xq + (size_t)i * M->kp_q, M->sx + i, M->sa + i);
            break;
        }
        case ST_FFN_ACT: {
            const float *g = M->gu + (size_t)i * 2 * M->f_pad, *u = g + M->f_pad;
            bn_cur->relu2_mul(g, u, M->f, t);
            bn_cur->rmsnorm(t, L->ln_ffn, M->f, M->eps, t);
            bn_cur->act_quant(t, M->f, M->kp_f, M->xq + (size_t)i * M->kp_f, M->sx + i, M->sa + i);
            break;
        }
        }
    }
}

/* Optional per-stage wall-clock profile (bn_prof_enable(1); bn_prof_get(double[BN_NPROF])). */
enum { P_NORMQ, P_QKV, P_ROPE, P_ATTN, P_O, P_GU, P_FFNACT, P_DOWN, P_HEAD, BN_NPROF };
static int prof_on;
static double prof_s[BN_NPROF];

static inline double tnow(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}
#define PROF(stage, stmt)                                                          \
    do {                                                                           \
        if (prof_on) { double t_ = tnow(); stmt; prof_s[stage] += tnow() - t_; }   \
        else { stmt; }                                                             \
    } while (0)

void bn_prof_enable(int on) { prof_on = on; if (on) memset(prof_s, 0, sizeof prof_s); }
int bn_prof_get(double *out) { memcpy(out, prof_s, sizeof prof_s); return BN_NPROF; }

static void attn_task(void *c, int i0, int i1, int tid) { bn_cur->attention((const bn_attn *)c, i0, i1, tid); }

static void run_tokens(fw_ctx *c, int step) {
    c->step = step;
    bn_pool_run(token_task, c, c->m);
}

static void gemm(const bn_model *M, const uint8_t *w, const float *gam, int n, int kp, int m, void *out,
                 int ldo, int mode) {
    bn_gemm g = {.w = w, .tile_gamma = gam, .n = n, .kp = kp, .xq = M->xq, .m = m, .sx = M->sx,
                 .sa = M->sa, .out = out, .ldo = ldo, .mode = mode, .layout = M->layout};
    bn_gemm_run(&g);
}

/* Run m tokens; write fp32 logits [n_out][vocab] of tokens out_idx[0..n_out) (n_out may be 0).
 * Returns 0, or -1 if m exceeds the buffers, -2 for a position/row outside the cache. */
int bn_forward(const bn_model *M, int m, const int32_t *tok, const int32_t *pos, const int32_t *row, int n_out,
               const int32_t *out_idx, float *logits) {
    if (m < 1 || m > M->max_m || n_out > M->max_m) return -1;
    for (int i = 0; i < m; i++) {
        if (pos[i] < 0 || pos[i] >= M->max_len || row[i] < 0 || row[i] >= M->batch) return -2;
        if (tok[i] < 0 || tok[i] >= M->vocab) return -3;
    }
    fw_ctx c = {.M = M, .m = m, .tok = tok, .pos = pos, .row = row, .out_idx = out_idx};
    run_tokens(&c, ST_EMBED);
    const int nq = M->h * M->hd;
    /* attention items: the heads of a KV group together (they share K/V reads), split in halves
     * only while there are fewer items than threads: 2B4T decode (5 groups of 4 heads, 2 threads)
     * ran attention ~20 % faster as 5 whole groups than as 10 half groups, imbalance included */
    const int rep = M->h / M->hkv;
    int hb = rep % 4 == 0 ? 4 : rep % 2 == 0 ? 2 : 1;
    while (hb > 1 && m * M->hkv * (rep / hb) < bn_pool_threads()) hb /= 2;
    for (int l = 0; l < M->n_layers; l++) {
        const bn_layer *L = &M->layers[l];
        c.L = L;
        PROF(P_NORMQ, run_tokens(&c, ST_NORM_IN));
        PROF(P_QKV, gemm(M, L->wqkv, L->gqkv, M->nqkv, M->kp_d, m, M->qkv, M->nqkv, BN_OUT_F32));
        PROF(P_ROPE, run_tokens(&c, ST_ROPE_KV));
        bn_attn a = {.q = M->qkv + M->q_off, .ldq = M->nqkv, .kc = L->kc, .vc = L->vc, .kv_bf16 = M->kv_bf16,
                     .S = M->max_len, .hd = M->hd, .H = M->h, .Hkv = M->hkv, .row = row, .pos = pos,
                     .out = M->att, .ldo = nq, .scratch = M->scratch, .scale = M->attn_scale, .hb = hb};
        PROF(P_ATTN, bn_pool_run(attn_task, &a, m * M->hkv * (rep / hb)));
        PROF(P_NORMQ, run_tokens(&c, ST_NORM_ATTN));
        PROF(P_O, gemm(M, L->wo, L->go, M->d, M->kp_q, m, M->x, M->d, BN_OUT_F32_ADD));
        PROF(P_NORMQ, run_tokens(&c, ST_NORM_POST));
        PROF(P_GU, gemm(M, L->wgu, L->ggu, 2 * M->f_pad, M->kp_d, m, M->gu, 2 * M->f_pad, BN_OUT_F32));
        PROF(P_FFNACT, run_tokens(&c, ST_FFN_ACT));
        PROF(P_DOWN, gemm(M, L->wdown, L->gdown, M->d, M->kp_f, m, M->x, M->d, BN_OUT_F32_ADD));
    }
    if (n_out <= 0) { bn_pool_park(); return 0; }
    for (int j = 0; j < n_out; j++) {
        float *h = M->hout + (size_t)j * M->d;
        bn_cur->rmsnorm(M->x + (size_t)out_idx[j] * M->d, M->ln_final, M->d, M->eps, h);
        if (M->head_round_bf16)
            for (int i = 0; i < M->d; i++) h[i] = bn_bf16_to_f32(bn_f32_to_bf16(h[i]));
    }
    bn_head hd = {.w = M->head, .kind = M->head_kind, .row_scale = M->head_scale, .d = M->d, .x = M->hout,
                  .m = n_out, .ldx = M->d, .out = logits, .ldo = M->vocab};
    PROF(P_HEAD, bn_head_run(&hd, M->vocab));
    bn_pool_park();
    return 0;
}

/* Final-normed hidden state of selected tokens (for tests and embeddings): copies hout. */
int bn_model_sizeof(void) { return (int)sizeof(bn_model); }
int bn_layer_sizeof(void) { return (int)sizeof(bn_layer); }
