/* charlstm's native sampling step (x86-64, AVX2 + FMA + F16C): lstm, peephole (one weight
 * per unit), coupled, gru (both forms) and rnn.
 *
 * Generating text costs one step per character: every layer's gates from its
 * input and its previous h, then the head's logits, then the next character
 * chosen. With one stream the step reads every weight once per character and
 * does two flops with it, so its speed is how fast the weights stream from
 * cache, plus what each operation costs to start. Torch spends ~18 operations
 * per character (see sample.py), and its one-row product reads weights at
 * ~30 GB/s here; this file does the whole chunk of characters in one call, so
 * the cost is the weight reads alone, and it can read them as float16 (half
 * the bytes, converted to float32 in registers; all arithmetic is float32).
 *
 * The equations are those of ../shared/EQUATIONS.md (W x + U h + b per gate), e.g. the lstm's
 *   i, f, o = sigmoid(.), g = tanh(.);   c' = f * c + i * g,   h' = o * tanh(c')
 * and the others as panel_streams writes them.
 *
 * Layout (prepared by charlstm/native.py): the G gate blocks are grouped in
 * panels of 8 hidden units, each panel holding the G gates of its units side
 * by side (8G floats), so one panel's products end in the registers that its
 * units' update needs.
 *   table   (V, H/8, 8G)       layer 0's input pre-activation of each character (embedding and biases folded in;
 *                              the gru's: b_ih only)
 *   w[0]    (H/8, H, 8G)       layer 0's recurrent weights U (the gru: unused)
 *   w[k]    (H/8, 2H, 8G)      layer k >= 1: [W; U] (its input is [h of layer k-1, its own h]); the gru: W alone
 *   wh[k]   (H/8, H, 24)       the gru's U, every layer (its n gate needs U_n h apart)
 *   b[k]    (H/8, 8G)          layer k >= 1: the biases that add (the gru: b_ih); bh[k] the gru's b_hh
 *   peep[k] (3, H)             peephole weights of i, f, o (zeros for a gate without one)
 *   head_w  (Vp/32, H, 32)     the head, V padded to Vp (a multiple of 32) with zero columns
 *   head_b  (Vp,)
 * State: z (B, L*H) the hidden states of all layers of each stream side by side,
 * c (L, B, H) (the lstm family's), logits (B, V); scratch hnew (B, H).
 */
#include <stdint.h>
#include <string.h>

typedef struct {
    int32_t kind;                /* LSTM, PEEPHOLE (one weight per unit), COUPLED, GRU (torch's form), RNN, GRU_CHO */
    int32_t L, H, V, B;          /* layers, hidden units, vocabulary, streams */
    int32_t half;                /* weights (not biases, not the table) stored as float16 */
    int32_t threads;             /* threads sharing out each step (OpenMP; 1 without it) */
    const float *table;          /* (V, H/8, 8G) layer 0's input pre-activation per character */
    const void *const *w;        /* L: layer 0 U^T (H/8, H, 8G); layer k >= 1 [W; U]^T (H/8, 2H, 8G),
                                    for the gru W^T alone (H/8, H, 24) */
    const void *const *wh;       /* gru: L recurrent U^T (H/8, H, 24); else NULL */
    const float *const *b;       /* L: layer k >= 1's biases (H/8, 8G) (gru: b_ih); b[0] unused */
    const float *const *bh;      /* gru: L recurrent biases b_hh (H/8, 24); else NULL */
    const float *const *peep;    /* peephole: L weights (3, H) p_i, p_f, p_o; else NULL */
    /* gru cho: r, z and n apart (n's product needs all of r * h first): table, w, wh and b hold
     * the r, z blocks (16 columns a panel), these the n block (8): */
    const float *table2;         /* (V, H/8, 8) */
    const void *const *w2;       /* L: W_n^T (H/8, H, 8) for k >= 1 */
    const void *const *wh2;      /* L: U_n^T (H/8, H, 8) */
    const float *const *b2;      /* L: b_n (H/8, 8) for k >= 1 */
    float *aux;                  /* (2, B, H) scratch: r * h, and z */
    const void *head_w;
    const float *head_b;
    float *z, *c, *logits, *hnew;
} Net;

#include "simd.h"

#define LD(p) _mm256_loadu_ps(p)
#define ST(p, v) _mm256_storeu_ps(p, v)

/* Streams are taken GROUP at a time (the accumulators of a group stay on the stack), and
 * within a group six at a time through each half of a panel; one stream alone takes
 * panel_one, whose sets of accumulators keep the multiply-adds busy. */
#define GROUP 32

/* One panel p (8 units) of layer k for streams s0 .. s0 + g - 1 (g <= GROUP): the gates'
 * pre-activations, then the cell's update of h (into hnew) and c. Slots of a panel, as
 * sample.py's FastStep orders the gates: lstm i, f, o, g; peephole i, f, g, o; coupled
 * f, o, g; gru r, z, n; rnn one. (The cho gru takes cho_rz_panel and cho_n_panel.) */
INLINE void panel_streams(const Net *n, int kind, int k, int p, int s0, int g, const int64_t *x, int half) {
    const int H = n->H, B = n->B, P = H / 8, LH = n->L * H, G = gates_of(kind), W = 8 * G;
    const float *zs = n->z + (size_t)s0 * LH;                    /* stream s0's hidden states, all layers */
    const size_t u = 8 * (size_t)p;
    __m256 acc[GROUP][4], rec[GROUP][4];
    for (int j = 0; j < g; j++) {
        const float *init = k == 0 ? n->table + ((size_t)x[s0 + j] * P + p) * W : n->b[k] + (size_t)p * W;
        for (int c = 0; c < G; c++) acc[j][c] = LD(init + 8 * c);
    }
    if (kind == GRU) {                       /* input and recurrent parts apart: r multiplies U_n h + b_hn */
        if (k > 0)
            panel_rows(n->w[k], (size_t)p * H * W, H, G, zs + (size_t)(k - 1) * H, LH, acc, g, half);
        for (int j = 0; j < g; j++)
            for (int c = 0; c < G; c++)
                rec[j][c] = n->bh ? LD(n->bh[k] + (size_t)p * W + 8 * c) : _mm256_setzero_ps();
        panel_rows(n->wh[k], (size_t)p * H * W, H, G, zs + (size_t)k * H, LH, rec, g, half);
    } else {                                 /* layer 0: U h; above: [W; U] [h below; h] */
        const int K = k == 0 ? H : 2 * H;
        panel_rows(n->w[k], (size_t)p * K * W, K, G, zs + (size_t)(k == 0 ? 0 : (k - 1) * H), LH, acc, g, half);
    }
    for (int j = 0; j < g; j++) {
        float *h = n->hnew + (size_t)(s0 + j) * H + u;
        float *c = n->c + ((size_t)k * B + s0 + j) * H + u;
        const __m256 *a = acc[j];
        if (kind == RNN) {
            ST(h, tanh8(a[0]));
        } else if (kind == GRU) {
            __m256 r = sigmoid8(_mm256_add_ps(a[0], rec[j][0])), zg = sigmoid8(_mm256_add_ps(a[1], rec[j][1]));
            __m256 nn = tanh8(_mm256_fmadd_ps(r, rec[j][2], a[2]));
            __m256 hp = LD(zs + (size_t)j * LH + (size_t)k * H + u);
            ST(h, _mm256_fmadd_ps(zg, _mm256_sub_ps(hp, nn), nn));          /* (1 - z) n + z h */
        } else {
            __m256 cp = LD(c), cn, o;
            if (kind == LSTM) {
                __m256 i = sigmoid8(a[0]), f = sigmoid8(a[1]), gg = tanh8(a[3]);
                o = sigmoid8(a[2]);
                cn = _mm256_fmadd_ps(i, gg, _mm256_mul_ps(f, cp));
            } else if (kind == COUPLED) {
                __m256 f = sigmoid8(a[0]), gg = tanh8(a[2]);
                o = sigmoid8(a[1]);
                cn = _mm256_fmadd_ps(f, _mm256_sub_ps(cp, gg), gg);         /* f c + (1 - f) g */
            } else {                                                       /* peephole */
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
}

/* The cho gru, layer k, panel p, streams s0 .. s0 + g - 1, first product: r and z from the
 * layer's input and h, then r * h and z into the scratch. */
INLINE void cho_rz_panel(const Net *n, int k, int p, int s0, int g, const int64_t *x, int half) {
    const int H = n->H, P = H / 8, LH = n->L * H;
    const float *zs = n->z + (size_t)s0 * LH;
    const size_t u = 8 * (size_t)p, BH = (size_t)n->B * H;
    __m256 acc[GROUP][4];
    for (int j = 0; j < g; j++) {
        const float *init = k == 0 ? n->table + ((size_t)x[s0 + j] * P + p) * 16 : n->b[k] + (size_t)p * 16;
        acc[j][0] = LD(init);
        acc[j][1] = LD(init + 8);
    }
    if (k > 0)
        panel_rows(n->w[k], (size_t)p * H * 16, H, 2, zs + (size_t)(k - 1) * H, LH, acc, g, half);
    panel_rows(n->wh[k], (size_t)p * H * 16, H, 2, zs + (size_t)k * H, LH, acc, g, half);
    for (int j = 0; j < g; j++) {
        const size_t o = (size_t)(s0 + j) * H + u;
        ST(n->aux + o, _mm256_mul_ps(sigmoid8(acc[j][0]), LD(zs + (size_t)j * LH + (size_t)k * H + u)));
        ST(n->aux + BH + o, sigmoid8(acc[j][1]));
    }
}

/* The cho gru, second product: n from the layer's input and r * h, then h' = (1 - z) h + z n. */
INLINE void cho_n_panel(const Net *n, int k, int p, int s0, int g, const int64_t *x, int half) {
    const int H = n->H, P = H / 8, LH = n->L * H;
    const float *zs = n->z + (size_t)s0 * LH;
    const size_t u = 8 * (size_t)p, BH = (size_t)n->B * H;
    __m256 acc[GROUP][4];
    for (int j = 0; j < g; j++)
        acc[j][0] = LD(k == 0 ? n->table2 + ((size_t)x[s0 + j] * P + p) * 8 : n->b2[k] + (size_t)p * 8);
    if (k > 0)
        panel_rows(n->w2[k], (size_t)p * H * 8, H, 1, zs + (size_t)(k - 1) * H, LH, acc, g, half);
    panel_rows(n->wh2[k], (size_t)p * H * 8, H, 1, n->aux + (size_t)s0 * H, H, acc, g, half);
    for (int j = 0; j < g; j++) {
        const size_t o = (size_t)(s0 + j) * H + u;
        __m256 nn = tanh8(acc[j][0]), zg = LD(n->aux + BH + o), hp = LD(zs + (size_t)j * LH + (size_t)k * H + u);
        ST(n->hnew + o, _mm256_fmadd_ps(zg, _mm256_sub_ps(nn, hp), hp));
    }
}

/* Feed characters x (B,) through every layer and compute the logits (B, V).
 * Called by every thread of a parallel region (or outside one): the panels,
 * streams and head columns are shared out by the `omp for` loops, each of
 * which ends in a barrier. */
INLINE void step(const Net *n, const int64_t *x, int kind, int half) {
    const int L = n->L, H = n->H, V = n->V, B = n->B, P = H / 8, LH = L * H;
    const int groups = (B + GROUP - 1) / GROUP;
    for (int k = 0; k < L; k++) {
        if (kind == GRU_CHO) {
            #pragma omp for schedule(static)
            for (int pg = 0; pg < P * groups; pg++) {
                const int s0 = (pg / P) * GROUP;
                cho_rz_panel(n, k, pg % P, s0, B - s0 < GROUP ? B - s0 : GROUP, x, half);
            }
            #pragma omp for schedule(static)
            for (int pg = 0; pg < P * groups; pg++) {
                const int s0 = (pg / P) * GROUP;
                cho_n_panel(n, k, pg % P, s0, B - s0 < GROUP ? B - s0 : GROUP, x, half);
            }
        } else {
            #pragma omp for schedule(static)
            for (int pg = 0; pg < P * groups; pg++) {
                const int p = pg % P, s0 = (pg / P) * GROUP;
                panel_streams(n, kind, k, p, s0, B - s0 < GROUP ? B - s0 : GROUP, x, half);
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
        const float *top = n->z + (size_t)s * LH + (size_t)(L - 1) * H;
        __m256 a[4];
        float out[32];
        load_init(a, n->head_b + (size_t)q * 32);
        panel_one(n->head_w, (size_t)q * H * 32, H, 4, top, a, half);
        for (int j = 0; j < 4; j++) _mm256_storeu_ps(out + 8 * j, a[j]);
        int m = V - 32 * q < 32 ? V - 32 * q : 32;
        memcpy(n->logits + (size_t)s * V + 32 * q, out, sizeof(float) * m);
    }
}

/* n characters per stream: each is argmax(noise + logits / temperature) (the Gumbel-max draw;
 * noise (n, B, V)), or argmax(logits) where noise is NULL; ids (n, B). */
INLINE void generate(const Net *n, int count, const float *noise, float inv_t, int64_t *ids, int kind, int half) {
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
        step(n, x, kind, half);
    }
}

/* The exported entry points: kind and weight type become constants of their own copy of the
 * step (so that each panel's loops unroll for its number of gates). */
#define DISPATCH(CALL_HALF)                                                  \
    switch (n->kind) {                                                       \
    case LSTM: CALL_HALF(LSTM); break;                                       \
    case PEEPHOLE: CALL_HALF(PEEPHOLE); break;                               \
    case COUPLED: CALL_HALF(COUPLED); break;                                 \
    case GRU: CALL_HALF(GRU); break;                                         \
    case GRU_CHO: CALL_HALF(GRU_CHO); break;                                 \
    default: CALL_HALF(RNN); break;                                          \
    }

void charlstm_step(const Net *n, const int64_t *x) {
#define STEP(K) do { if (n->half) step(n, x, K, 1); else step(n, x, K, 0); } while (0)
    #pragma omp parallel num_threads(n->threads)
    DISPATCH(STEP)
#undef STEP
}

void charlstm_generate(const Net *n, int count, const float *noise, float inv_t, int64_t *ids) {
#define GENERATE(K) do { if (n->half) generate(n, count, noise, inv_t, ids, K, 1); \
                         else generate(n, count, noise, inv_t, ids, K, 0); } while (0)
    #pragma omp parallel num_threads(n->threads)
    DISPATCH(GENERATE)
#undef GENERATE
}
