/* charlstm's native sampling step (x86-64, AVX2 + FMA + F16C): every cell kind, with float32,
 * float16 or int8 weights (converted in registers; all arithmetic float32).
 *
 * Generating text costs one step per character: every layer's gates from its input and its
 * previous h, then the head's logits, then the next character chosen. With one stream the step
 * reads every weight once per character and does two flops with it, so its speed is how fast
 * the weights stream from cache; one call does a whole chunk of characters, so nothing else is
 * paid per character (docs/sampling.md).
 *
 * The equations are those of ../shared/EQUATIONS.md (W x + U h + b per gate), e.g. the lstm's
 *   i, f, o = sigmoid(.), g = tanh(.);   c' = f * c + i * g,   h' = o * tanh(c')
 * and the others as the functions below write them. Layout (charlstm/native/step.py packs it):
 * the Net struct of charlstm.h. Slots of a panel, as stepweights.py orders the gates: lstm i, f,
 * o, g; peephole (both forms) i, f, g, o; coupled f, o, g; gru (both forms) r, z, n; rnn one.
 * Two kinds need a layer's whole result before the rest of it, so their layers take two passes
 * with the threads meeting between: the cho gru (U_n multiplies r * h) and the full peephole
 * (o looks at the new c through P_o).
 */
#include <string.h>

#include "charlstm.h"
#include "simd.h"

/* Streams are taken GROUP at a time (the accumulators of a group stay on the stack). */
#define GROUP 32

/* acc[j] += x_j @ panel p of matrix m (K rows, G gates), streams j < g. */
static void product(const Net *n, const Mat *m, int p, int K, int G, const float *x, size_t stride,
                    __m256 (*acc)[4], int g) {
    const size_t W = 8 * (size_t)G;
    charlstm_panel(n->precision, m->w, (size_t)p * K * W, m->s ? m->s + (size_t)p * W : NULL, K, G, x, stride,
                   acc, g);
}

/* Layer 0's input part (a row of the table per character) or a layer's bias: the start of acc. */
INLINE void start(const Net *n, const float *table, const float *const *b, int G, int k, int p, int s0, int g,
                  const int64_t *x, __m256 (*acc)[4]) {
    const int W = 8 * G, P = n->H / 8;
    for (int j = 0; j < g; j++) {
        const float *init = k == 0 ? table + ((size_t)x[s0 + j] * P + p) * W : b[k] + (size_t)p * W;
        for (int c = 0; c < G; c++) acc[j][c] = LD(init + 8 * c);
    }
}

/* h (and c) of one stream's 8 units from the gates' pre-activations a (and, gru, rec: U h + b_hh). */
INLINE void update(const Net *n, int kind, int k, int s, size_t u, const __m256 *a, const __m256 *rec) {
    const int H = n->H, B = n->B;
    const size_t BH = (size_t)B * H;
    float *h = n->hnew + (size_t)s * H + u;
    float *c = n->c + ((size_t)k * B + s) * H + u;
    const float *hp = n->z + (size_t)s * n->L * H + (size_t)k * H + u;
    if (kind == RNN) {
        ST(h, tanh8(a[0]));
    } else if (kind == GRU) {
        __m256 r = sigmoid8(_mm256_add_ps(a[0], rec[0])), zg = sigmoid8(_mm256_add_ps(a[1], rec[1]));
        __m256 nn = tanh8(_mm256_fmadd_ps(r, rec[2], a[2]));
        ST(h, _mm256_fmadd_ps(zg, _mm256_sub_ps(LD(hp), nn), nn));              /* (1 - z) n + z h */
    } else if (kind == PEEPHOLE_FULL) {                                         /* c' now, o in o_panel */
        __m256 cp = LD(c), i = sigmoid8(a[0]), f = sigmoid8(a[1]);
        ST(n->aux + (size_t)s * H + u, _mm256_fmadd_ps(i, tanh8(a[2]), _mm256_mul_ps(f, cp)));
        ST(n->aux + BH + (size_t)s * H + u, a[3]);
    } else {
        __m256 cp = LD(c), cn, o;
        if (kind == LSTM) {
            __m256 i = sigmoid8(a[0]), f = sigmoid8(a[1]);
            o = sigmoid8(a[2]);
            cn = _mm256_fmadd_ps(i, tanh8(a[3]), _mm256_mul_ps(f, cp));
        } else if (kind == COUPLED) {
            __m256 f = sigmoid8(a[0]), gg = tanh8(a[2]);
            o = sigmoid8(a[1]);
            cn = _mm256_fmadd_ps(f, _mm256_sub_ps(cp, gg), gg);                 /* f c + (1 - f) g */
        } else {                                                                /* peephole, diag */
            const float *pk = n->peep[k];
            __m256 i = sigmoid8(_mm256_fmadd_ps(LD(pk + u), cp, a[0]));
            __m256 f = sigmoid8(_mm256_fmadd_ps(LD(pk + H + u), cp, a[1]));
            cn = _mm256_fmadd_ps(i, tanh8(a[2]), _mm256_mul_ps(f, cp));
            o = sigmoid8(_mm256_fmadd_ps(LD(pk + 2 * H + u), cn, a[3]));
        }
        ST(c, cn);
        ST(h, _mm256_mul_ps(o, tanh8(cn)));
    }
}

/* One panel p (8 units) of layer k for streams s0 .. s0 + g - 1 (g <= GROUP): the gates'
 * pre-activations, then each stream's update (every kind but the cho gru). */
INLINE void kind_panel(const Net *n, int kind, int k, int p, int s0, int g, const int64_t *x) {
    const int H = n->H, LH = n->L * H, G = kind == LSTM || kind == PEEPHOLE || kind == PEEPHOLE_FULL ? 4
                                            : kind == RNN ? 1 : 3;
    const float *zs = n->z + (size_t)s0 * LH;                    /* stream s0's hidden states, all layers */
    __m256 acc[GROUP][4], rec[GROUP][4];
    start(n, n->table, n->b, G, k, p, s0, g, x, acc);
    if (kind == GRU) {                       /* input and recurrent parts apart: r multiplies U_n h + b_hn */
        if (k > 0) product(n, &n->w[k], p, H, G, zs + (size_t)(k - 1) * H, LH, acc, g);
        for (int j = 0; j < g; j++)
            for (int c = 0; c < G; c++)
                rec[j][c] = n->bh ? LD(n->bh[k] + (size_t)p * 8 * G + 8 * c) : _mm256_setzero_ps();
        product(n, &n->wh[k], p, H, G, zs + (size_t)k * H, LH, rec, g);
    } else {                                 /* layer 0: U h; above: [W; U] [h below; h] */
        const int K = k == 0 ? H : 2 * H;
        product(n, &n->w[k], p, K, G, zs + (size_t)(k == 0 ? 0 : k - 1) * H, LH, acc, g);
        if (kind == PEEPHOLE_FULL)           /* i and f see c_{t-1} through P_if */
            product(n, &n->pif[k], p, H, 2, n->c + ((size_t)k * n->B + s0) * H, H, acc, g);
    }
    for (int j = 0; j < g; j++) update(n, kind, k, s0 + j, 8 * (size_t)p, acc[j], rec[j]);
}

/* kind_panel with the kind a constant: its update's branches go, and its loops over the gates unroll. */
static void panel_streams(const Net *n, int k, int p, int s0, int g, const int64_t *x) {
    switch (n->kind) {
    case LSTM: kind_panel(n, LSTM, k, p, s0, g, x); break;
    case PEEPHOLE: kind_panel(n, PEEPHOLE, k, p, s0, g, x); break;
    case PEEPHOLE_FULL: kind_panel(n, PEEPHOLE_FULL, k, p, s0, g, x); break;
    case COUPLED: kind_panel(n, COUPLED, k, p, s0, g, x); break;
    case GRU: kind_panel(n, GRU, k, p, s0, g, x); break;
    default: kind_panel(n, RNN, k, p, s0, g, x); break;
    }
}

/* The full peephole's second pass: o from its pre-activation and P_o c', then h'. */
static void o_panel(const Net *n, int k, int p, int s0, int g) {
    const int H = n->H;
    const size_t u = 8 * (size_t)p, BH = (size_t)n->B * H;
    __m256 acc[GROUP][4];
    for (int j = 0; j < g; j++) acc[j][0] = LD(n->aux + BH + (size_t)(s0 + j) * H + u);
    product(n, &n->po[k], p, H, 1, n->aux + (size_t)s0 * H, H, acc, g);
    for (int j = 0; j < g; j++) {
        const size_t o = (size_t)(s0 + j) * H + u;
        __m256 cn = LD(n->aux + o);
        ST(n->c + (size_t)k * BH + o, cn);
        ST(n->hnew + o, _mm256_mul_ps(sigmoid8(acc[j][0]), tanh8(cn)));
    }
}

/* The cho gru's first pass: r and z from the layer's input and h, then r * h and z into aux. */
static void cho_rz_panel(const Net *n, int k, int p, int s0, int g, const int64_t *x) {
    const int H = n->H, LH = n->L * H;
    const float *zs = n->z + (size_t)s0 * LH;
    const size_t u = 8 * (size_t)p, BH = (size_t)n->B * H;
    __m256 acc[GROUP][4];
    start(n, n->table, n->b, 2, k, p, s0, g, x, acc);
    if (k > 0) product(n, &n->w[k], p, H, 2, zs + (size_t)(k - 1) * H, LH, acc, g);
    product(n, &n->wh[k], p, H, 2, zs + (size_t)k * H, LH, acc, g);
    for (int j = 0; j < g; j++) {
        const size_t o = (size_t)(s0 + j) * H + u;
        ST(n->aux + o, _mm256_mul_ps(sigmoid8(acc[j][0]), LD(zs + (size_t)j * LH + (size_t)k * H + u)));
        ST(n->aux + BH + o, sigmoid8(acc[j][1]));
    }
}

/* The cho gru's second pass: n from the layer's input and r * h, then h' = (1 - z) h + z n. */
static void cho_n_panel(const Net *n, int k, int p, int s0, int g, const int64_t *x) {
    const int H = n->H, LH = n->L * H;
    const float *zs = n->z + (size_t)s0 * LH;
    const size_t u = 8 * (size_t)p, BH = (size_t)n->B * H;
    __m256 acc[GROUP][4];
    start(n, n->table2, n->b2, 1, k, p, s0, g, x, acc);
    if (k > 0) product(n, &n->w2[k], p, H, 1, zs + (size_t)(k - 1) * H, LH, acc, g);
    product(n, &n->wh2[k], p, H, 1, n->aux + (size_t)s0 * H, H, acc, g);
    for (int j = 0; j < g; j++) {
        const size_t o = (size_t)(s0 + j) * H + u;
        __m256 nn = tanh8(acc[j][0]), zg = LD(n->aux + BH + o), hp = LD(zs + (size_t)j * LH + (size_t)k * H + u);
        ST(n->hnew + o, _mm256_fmadd_ps(zg, _mm256_sub_ps(nn, hp), hp));
    }
}

#define FOR_PANELS(CALL)                                            \
    _Pragma("omp for schedule(static)")                             \
    for (int pg = 0; pg < P * groups; pg++) {                       \
        const int p = pg % P, s0 = (pg / P) * GROUP;                \
        const int g = B - s0 < GROUP ? B - s0 : GROUP;              \
        CALL;                                                       \
    }

/* Feed characters x (B,) through every layer and compute the logits (B, V). Called by every
 * thread of a parallel region: the panels, streams and head columns are shared out by the
 * `omp for` loops, each of which ends in a barrier. */
static void step(const Net *n, const int64_t *x) {
    const int L = n->L, H = n->H, V = n->V, B = n->B, P = H / 8, LH = L * H;
    const int groups = (B + GROUP - 1) / GROUP;
    for (int k = 0; k < L; k++) {
        if (n->kind == GRU_CHO) {
            FOR_PANELS(cho_rz_panel(n, k, p, s0, g, x))
            FOR_PANELS(cho_n_panel(n, k, p, s0, g, x))
        } else {
            FOR_PANELS(panel_streams(n, k, p, s0, g, x))
            if (n->kind == PEEPHOLE_FULL) {
                FOR_PANELS(o_panel(n, k, p, s0, g))
            }
        }
        /* every panel has read the old h: the new one replaces it */
        #pragma omp for schedule(static)
        for (int s = 0; s < B; s++)
            memcpy(n->z + (size_t)s * LH + (size_t)k * H, n->hnew + (size_t)s * H, sizeof(float) * H);
    }
    /* the head: logits = h of the last layer @ head_w + head_b */
    const int Q = (V + 31) / 32;
    #pragma omp for schedule(static)
    for (int sq = 0; sq < B * Q; sq++) {
        const int s = sq / Q, q = sq % Q;
        __m256 a[1][4];
        float out[32];
        for (int j = 0; j < 4; j++) a[0][j] = LD(n->head_b + (size_t)q * 32 + 8 * j);
        charlstm_panel(n->precision, n->head.w, (size_t)q * H * 32, n->head.s ? n->head.s + (size_t)q * 32 : NULL,
                       H, 4, n->z + (size_t)s * LH + (size_t)(L - 1) * H, 0, a, 1);
        for (int j = 0; j < 4; j++) ST(out + 8 * j, a[0][j]);
        const int m = V - 32 * q < 32 ? V - 32 * q : 32;
        memcpy(n->logits + (size_t)s * V + 32 * q, out, sizeof(float) * m);
    }
}

/* n characters per stream: each is argmax(noise + logits / temperature) (the Gumbel-max draw;
 * noise (n, B, V)), or argmax(logits) where noise is NULL; ids (n, B). */
static void generate(const Net *n, int count, const float *noise, float inv_t, int64_t *ids) {
    const int B = n->B, V = n->V;
    for (int t = 0; t < count; t++) {
        int64_t *x = ids + (size_t)t * B;
        #pragma omp for schedule(static)
        for (int s = 0; s < B; s++) {
            const float *l = n->logits + (size_t)s * V;
            const float *q = noise ? noise + ((size_t)t * B + s) * V : NULL;
            int best = 0;
            float top = q ? q[0] + l[0] * inv_t : l[0];
            for (int v = 1; v < V; v++) {
                float u = q ? q[v] + l[v] * inv_t : l[v];
                if (u > top) { top = u; best = v; }
            }
            x[s] = best;
        }
        step(n, x);
    }
}

/* ---------------------------------------------------------------- checked entry points */

static int layers_missing(const Mat *m, int from, int L, int int8) {
    if (!m) return 1;
    for (int k = from; k < L; k++)
        if (!m[k].w || (int8 && !m[k].s)) return 1;
    return 0;
}

static int rows_missing(const float *const *b, int from, int L) {
    if (!b) return 1;
    for (int k = from; k < L; k++)
        if (!b[k]) return 1;
    return 0;
}

/* 0 where the net can be stepped, else a code: 1 bad kind or type, 2 bad sizes, 3 a missing array. */
static int net_invalid(const Net *n) {
    if (!n || n->kind < 0 || n->kind >= KIND_COUNT || n->precision < 0 || n->precision >= PRECISION_COUNT) return 1;
    if (n->L < 1 || n->H < 8 || n->H % 8 || n->V < 1 || n->B < 1 || n->threads < 1) return 2;
    const int kind = n->kind, L = n->L, i8 = n->precision == I8;
    if (!n->table || !n->head.w || (i8 && !n->head.s) || !n->head_b || !n->aux || !n->z || !n->c || !n->logits ||
        !n->hnew)
        return 3;
    const int gru = kind == GRU || kind == GRU_CHO;
    if (layers_missing(n->w, gru ? 1 : 0, L, i8) || rows_missing(n->b, 1, L)) return 3;
    if (gru && layers_missing(n->wh, 0, L, i8)) return 3;
    if (kind == GRU && n->bh && rows_missing(n->bh, 0, L)) return 3;
    if (kind == GRU_CHO && (!n->table2 || layers_missing(n->w2, 1, L, i8) || layers_missing(n->wh2, 0, L, i8) ||
                            rows_missing(n->b2, 1, L)))
        return 3;
    if (kind == PEEPHOLE && rows_missing(n->peep, 0, L)) return 3;
    if (kind == PEEPHOLE_FULL && (layers_missing(n->pif, 0, L, i8) || layers_missing(n->po, 0, L, i8))) return 3;
    return 0;
}

/* Feed characters x (B,) and leave the logits of the next ones in n->logits; 4 for an id out of range. */
int charlstm_step(const Net *n, const int64_t *x) {
    const int bad = net_invalid(n);
    if (bad) return bad;
    if (!x) return 3;
    for (int s = 0; s < n->B; s++)
        if (x[s] < 0 || x[s] >= n->V) return 4;
    #pragma omp parallel num_threads(n->threads)
    step(n, x);
    return 0;
}

/* count characters per stream into ids (count, B) from the pending logits (see generate). */
int charlstm_generate(const Net *n, int count, const float *noise, float inv_t, int64_t *ids) {
    const int bad = net_invalid(n);
    if (bad) return bad;
    if (count < 0 || (count > 0 && !ids)) return 2;
    #pragma omp parallel num_threads(n->threads)
    generate(n, count, noise, inv_t, ids);
    return 0;
}
