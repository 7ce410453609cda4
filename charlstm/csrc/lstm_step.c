/* charlstm's native sampling step for the LSTM (x86-64, AVX2 + FMA + F16C).
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
 * The equations are those of ../shared/EQUATIONS.md for the LSTM:
 *   i = sigmoid(.), f = sigmoid(.), o = sigmoid(.), g = tanh(.)   (the rows of W x + U h + b)
 *   c' = f * c + i * g,   h' = o * tanh(c')
 *
 * Layout (prepared by charlstm/native.py): the gate columns are grouped in
 * panels of 8 hidden units, each panel holding the i, f, o and g columns of
 * its units side by side (32 floats), so one panel's products end in the
 * registers that its units' update needs.
 *   table   (V, H/8, 32)       layer 0's input pre-activation of each character (embedding and biases folded in)
 *   w[0]    (H/8, H, 32)       layer 0's recurrent weights U
 *   w[k]    (H/8, 2H, 32)      layer k >= 1: [W; U] (its input is [h of layer k-1, its own h])
 *   b[k]    (H/8, 32)          layer k >= 1: b_ih + b_hh
 *   head_w  (Vp/32, H, 32)     the head, V padded to Vp (a multiple of 32) with zero columns
 *   head_b  (Vp,)
 * State: z (B, L*H) the hidden states of all layers of each stream side by side,
 * c (L, B, H), logits (B, V); scratch hnew (B, H).
 */
#include <stdint.h>
#include <string.h>

typedef struct {
    int32_t L, H, V, B;          /* layers, hidden units, vocabulary, streams */
    int32_t half;                /* weights (not biases, not the table) stored as float16 */
    int32_t threads;             /* threads sharing out each step (OpenMP; 1 without it) */
    const float *table;
    const void *const *w;        /* L pointers */
    const float *const *b;       /* L pointers (b[0] unused) */
    const void *head_w;
    const float *head_b;
    float *z, *c, *logits, *hnew;
} Net;

#include "simd.h"

/* The LSTM update of 8 units from their gates' pre-activations (i, f, o, g). */
INLINE void update(const __m256 a[4], float *c, float *h) {
    __m256 i = sigmoid8(a[0]), f = sigmoid8(a[1]), o = sigmoid8(a[2]), g = tanh8(a[3]);
    __m256 cn = _mm256_fmadd_ps(i, g, _mm256_mul_ps(f, _mm256_loadu_ps(c)));
    _mm256_storeu_ps(c, cn);
    _mm256_storeu_ps(h, _mm256_mul_ps(o, tanh8(cn)));
}

/* Streams are taken GROUP at a time (the accumulators of a group stay on the stack), and
 * within a group six at a time through each half of a panel; one stream alone takes
 * panel_one, whose eight accumulators keep the multiply-adds busy. */
#define GROUP 32

/* One panel p of layer k for streams s0 .. s0 + g - 1 (g <= GROUP): gates, then the update. */
INLINE void panel_streams(const Net *n, int k, int p, int s0, int g, const int64_t *x, int half) {
    const int H = n->H, B = n->B, P = H / 8, LH = n->L * H;
    const int K = k == 0 ? H : 2 * H;
    const int col = k == 0 ? 0 : (k - 1) * H;                     /* where the layer's input starts in z */
    const size_t off = (size_t)p * K * 32;
    const float *z = n->z + (size_t)s0 * LH + col;
    __m256 acc[GROUP][4];
    for (int j = 0; j < g; j++)
        load_init(acc[j], k == 0 ? n->table + ((size_t)x[s0 + j] * P + p) * 32 : n->b[k] + (size_t)p * 32);
    if (g == 1) {
        panel_one(n->w[k], off, K, z, acc[0], half);
    } else {
        panel_rows(n->w[k], off, K, 4, z, LH, acc, g, half);
    }
    float *c = n->c + ((size_t)k * B + s0) * H + 8 * p;
    float *h = n->hnew + (size_t)s0 * H + 8 * p;
    for (int j = 0; j < g; j++)
        update(acc[j], c + (size_t)j * H, h + (size_t)j * H);
}

/* Feed characters x (B,) through every layer and compute the logits (B, V).
 * Called by every thread of a parallel region (or outside one): the panels,
 * streams and head columns are shared out by the `omp for` loops, each of
 * which ends in a barrier. */
INLINE void step(const Net *n, const int64_t *x, int half) {
    const int L = n->L, H = n->H, V = n->V, B = n->B, P = H / 8, LH = L * H;
    const int groups = (B + GROUP - 1) / GROUP;
    for (int k = 0; k < L; k++) {
        #pragma omp for schedule(static)
        for (int pg = 0; pg < P * groups; pg++) {
            const int p = pg % P, s0 = (pg / P) * GROUP;
            panel_streams(n, k, p, s0, B - s0 < GROUP ? B - s0 : GROUP, x, half);
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
        panel_one(n->head_w, (size_t)q * H * 32, H, top, a, half);
        for (int j = 0; j < 4; j++) _mm256_storeu_ps(out + 8 * j, a[j]);
        int m = V - 32 * q < 32 ? V - 32 * q : 32;
        memcpy(n->logits + (size_t)s * V + 32 * q, out, sizeof(float) * m);
    }
}

/* n characters per stream: each is argmax(noise + logits / temperature) (the Gumbel-max draw;
 * noise (n, B, V)), or argmax(logits) where noise is NULL; ids (n, B). */
INLINE void generate(const Net *n, int count, const float *noise, float inv_t, int64_t *ids, int half) {
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
        step(n, x, half);
    }
}

void charlstm_step(const Net *n, const int64_t *x) {
    #pragma omp parallel num_threads(n->threads)
    {
        if (n->half) step(n, x, 1); else step(n, x, 0);
    }
}

void charlstm_generate(const Net *n, int count, const float *noise, float inv_t, int64_t *ids) {
    #pragma omp parallel num_threads(n->threads)
    {
        if (n->half) generate(n, count, noise, inv_t, ids, 1); else generate(n, count, noise, inv_t, ids, 0);
    }
}
