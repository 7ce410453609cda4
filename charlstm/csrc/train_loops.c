/* charlstm's native recurrent layers for training: the time loops of forward and backward in C,
 * for the LSTM, the peephole LSTM (one weight per unit), the coupled LSTM, the GRU in torch's form and in
 * Cho et al.'s, and the RNN.
 *
 * charlstm/fused.py runs one layer over a window as a torch.autograd.Function whose
 * loops call a few torch operations per step. Here each loop is one call, so that a
 * step costs its recurrent product and little more: the pointwise work is done in
 * registers right after each panel's product, and the threads (OpenMP) share every
 * step's panels, meeting once per step in the forward and twice in the backward.
 * What is one big product over the window (the input projection, the weight
 * gradients, the input gradient) stays with torch (fused.py).
 *
 * Equations (../shared/EQUATIONS.md); `pre` is W x_t + b, U the recurrent weights, in torch's gate order:
 *   lstm      (i, f, g, o)  i, f, o = sigmoid, g = tanh of pre + U h_{t-1};  c_t = f c_{t-1} + i g;  h_t = o tanh(c_t)
 *   peephole  (i, f, g, o)  as lstm with p_i c_{t-1} added to i's and p_f c_{t-1} to f's pre-activation,
 *                           p_o c_t to o's
 *   coupled   (f, g, o)     as lstm with i = 1 - f
 *   gru       (r, z, n)     r, z = sigmoid(pre + U h + b_h);  n = tanh(pre_n + r (U_n h + b_hn));
 *                           h_t = (1 - z) n + z h_{t-1}
 *   gru cho   (r, z, n)     r, z = sigmoid(pre + U_rz h);  n = tanh(pre_n + U_n (r h));  h_t = (1 - z) h_{t-1} + z n
 *                           (two products per step: U_n needs all of r h first)
 *   rnn       (one)         h_t = tanh(pre + U h_{t-1})
 * Backward, with dh the gradient reaching h_t and dc the one carried back to c_t:
 *   lstm      dc += dh o (1 - tanh(c)^2);  dpre_i = dc g i (1 - i), dpre_f = dc c_{t-1} f (1 - f),
 *             dpre_g = dc i (1 - g^2), dpre_o = dh tanh(c) o (1 - o);  dc_{t-1} = dc f
 *   peephole  as lstm, with dc += dpre_o p_o before the others and dc_{t-1} += dpre_i p_i + dpre_f p_f
 *   coupled   dpre_f = dc (c_{t-1} - g) f (1 - f), dpre_g = dc (1 - f)(1 - g^2)
 *   gru       dpre_n = dh (1 - z)(1 - n^2), dpre_r = dpre_n hn r (1 - r), dpre_z = dh (h_{t-1} - n) z (1 - z);
 *             the recurrent side's gradient is (dpre_r, dpre_z, dpre_n r), and h_{t-1} gets dh z directly
 *   gru cho   dpre_n = dh z (1 - n^2), dpre_z = dh (n - h_{t-1}) z (1 - z);  d(r h) = dpre_n U_n;
 *             dpre_r = d(r h) h_{t-1} r (1 - r);  dh_{t-1} += dh (1 - z) + d(r h) r + (dpre_r, dpre_z) U_rz
 *   rnn       dpre = dh (1 - h_t^2)
 *   all       dh_{t-1} += (recurrent gradient) U
 */
#include "simd.h"

#include <string.h>

typedef struct {
    int32_t kind, T, B, H, threads;
    float *gates;        /* (T, B, G*H) in: W x_t + b; out: the activated gates, torch's order (rnn: h_t) */
    const float *wf;     /* (H/8, H, 8G) U^T in panels of 8 units, gates in panel order (see SLOT) */
    const float *wb;     /* (H/32, G*H, 32) U in panels of 32 output units (backward) */
    const float *bh;     /* gru: b_hh (3H) or NULL */
    const float *peep;   /* peephole: (3, H) p_i, p_f, p_o */
    float *hs;           /* (T + 1, B, H) h_{-1} = h0 .. h_{T-1} */
    float *cs;           /* (T + 1, B, H) c_{-1} = c0 .. (lstm family; else NULL) */
    float *tcs;          /* (T, B, H) tanh(c_t) (lstm family); gru: U_n h_{t-1} + b_hn; rnn: NULL */
    const float *dhs;    /* (T, B, H) gradient arriving at each h_t from above */
    float *dpre;         /* (T, B, G*H) out: gradient of the pre-activations W x_t + b */
    float *dph;          /* gru: (T, B, 3H) out: gradient of U h_{t-1} + b_hh; else NULL (= dpre) */
    float *dh;           /* (B, H) in: zeros; out: gradient of h0 */
    float *dc;           /* (B, H) in: gradient of c_T; out: gradient of c0 (gru, gru cho: scratch; rnn: NULL) */
    const float *wf2;    /* gru cho: U_n^T (H/8, H, 8) (wf holds U_rz^T (H/8, H, 16)) */
    const float *wb2;    /* gru cho: U_n (H/32, H, 32) (wb holds U_rz (H/32, 2H, 32)) */
    float *rh;           /* gru cho: (T, B, H) r * h_{t-1} */
    float *drh;          /* gru cho: (B, H) scratch, the gradient of r * h_{t-1} */
} Seq;

#define GROUP 32

static inline int min_int(int a, int b) { return a < b ? a : b; }

/* Which of torch's gate blocks sits in slot s of a panel: sigmoid gates first, then the rest
 * (lstm, peephole: i, f, o, g; coupled: f, o, g; gru: r, z, n). */
INLINE int slot_block(int kind, int s) {
    static const int lstm[4] = {0, 1, 3, 2}, coupled[3] = {0, 2, 1};
    if (kind == LSTM || kind == PEEPHOLE) return lstm[s];
    if (kind == COUPLED) return coupled[s];
    return s;
}

#define LD(p) _mm256_loadu_ps(p)
#define ST(p, v) _mm256_storeu_ps(p, v)

/* Forward, step t, panel p (8 units) for streams s0 .. s0 + g - 1. */
INLINE void forward_panel(const Seq *q, int kind, int t, int p, int s0, int g) {
    const int B = q->B, H = q->H, G = gates_of(kind);
    const size_t GH = (size_t)G * H, u = 8 * (size_t)p;
    __m256 acc[GROUP][4];
    for (int j = 0; j < g; j++) {
        const float *row = q->gates + ((size_t)t * B + s0 + j) * GH + u;
        for (int s = 0; s < G; s++) {
            if (kind == GRU) {      /* the recurrent bias goes with U h; n's input part waits for r */
                __m256 b = q->bh ? LD(q->bh + s * H + u) : _mm256_setzero_ps();
                acc[j][s] = s < 2 ? _mm256_add_ps(LD(row + s * H), b) : b;
            } else {
                acc[j][s] = LD(row + slot_block(kind, s) * H);
            }
        }
    }
    panel_rows(q->wf, (size_t)p * H * 8 * G, H, G, q->hs + ((size_t)t * B + s0) * H, H, acc, g, 0);
    const __m256 one = _mm256_set1_ps(1.0f);
    for (int j = 0; j < g; j++) {
        const size_t r = (size_t)t * B + s0 + j;
        float *row = q->gates + r * GH + u;
        if (kind == RNN) {
            __m256 h = tanh8(acc[j][0]);
            ST(row, h);
            ST(q->hs + (r + B) * H + u, h);
            continue;
        }
        if (kind == GRU) {
            __m256 rr = sigmoid8(acc[j][0]), z = sigmoid8(acc[j][1]), hn = acc[j][2];
            __m256 n = tanh8(_mm256_fmadd_ps(rr, hn, LD(row + 2 * H)));
            __m256 hp = LD(q->hs + r * H + u);
            ST(row, rr);
            ST(row + H, z);
            ST(row + 2 * H, n);
            ST(q->tcs + r * H + u, hn);
            ST(q->hs + (r + B) * H + u, _mm256_fmadd_ps(z, _mm256_sub_ps(hp, n), n));
            continue;
        }
        __m256 cp = LD(q->cs + r * H + u), c, i, f, o, gg;
        if (kind == PEEPHOLE) {
            i = sigmoid8(_mm256_fmadd_ps(LD(q->peep + u), cp, acc[j][0]));
            f = sigmoid8(_mm256_fmadd_ps(LD(q->peep + H + u), cp, acc[j][1]));
            gg = tanh8(acc[j][3]);
            c = _mm256_fmadd_ps(i, gg, _mm256_mul_ps(f, cp));
            o = sigmoid8(_mm256_fmadd_ps(LD(q->peep + 2 * H + u), c, acc[j][2]));
        } else if (kind == COUPLED) {
            f = sigmoid8(acc[j][0]);
            o = sigmoid8(acc[j][1]);
            gg = tanh8(acc[j][2]);
            i = _mm256_sub_ps(one, f);
            c = _mm256_fmadd_ps(f, _mm256_sub_ps(cp, gg), gg);
        } else {
            i = sigmoid8(acc[j][0]);
            f = sigmoid8(acc[j][1]);
            o = sigmoid8(acc[j][2]);
            gg = tanh8(acc[j][3]);
            c = _mm256_fmadd_ps(i, gg, _mm256_mul_ps(f, cp));
        }
        __m256 tc = tanh8(c);
        if (kind == COUPLED) {
            ST(row, f);
            ST(row + H, gg);
            ST(row + 2 * H, o);
        } else {
            ST(row, i);
            ST(row + H, f);
            ST(row + 2 * H, gg);
            ST(row + 3 * H, o);
        }
        ST(q->cs + (r + B) * H + u, c);
        ST(q->tcs + r * H + u, tc);
        ST(q->hs + (r + B) * H + u, _mm256_mul_ps(o, tc));
    }
}

INLINE void forward(const Seq *q, int kind) {
    const int P = q->H / 8, groups = (q->B + GROUP - 1) / GROUP;
    for (int t = 0; t < q->T; t++) {
        #pragma omp for schedule(static)
        for (int pg = 0; pg < P * groups; pg++) {
            const int p = pg % P, s0 = (pg / P) * GROUP;
            forward_panel(q, kind, t, p, s0, min_int(q->B - s0, GROUP));
        }
    }
}

/* Backward, step t, the pointwise part for stream s: the gradients of the pre-activations,
 * and what is carried back to step t - 1 without U (dc; for the gru, dh z, kept in dc). */
INLINE void backward_pointwise(const Seq *q, int kind, int t, int s) {
    const int B = q->B, H = q->H, G = gates_of(kind);
    const size_t GH = (size_t)G * H, r = (size_t)t * B + s, sh = (size_t)s * H;
    const __m256 one = _mm256_set1_ps(1.0f);
    for (int u = 0; u < H; u += 8) {
        const float *a = q->gates + r * GH + u;
        float *d = q->dpre + r * GH + u;
        __m256 dh = _mm256_add_ps(LD(q->dhs + r * H + u), LD(q->dh + sh + u));
        if (kind == RNN) {
            __m256 h = LD(a);
            ST(d, _mm256_mul_ps(dh, _mm256_fnmadd_ps(h, h, one)));
            continue;
        }
        if (kind == GRU) {
            __m256 rr = LD(a), z = LD(a + H), n = LD(a + 2 * H), hn = LD(q->tcs + r * H + u);
            __m256 hp = LD(q->hs + r * H + u);
            __m256 dn = _mm256_mul_ps(_mm256_mul_ps(dh, _mm256_sub_ps(one, z)), _mm256_fnmadd_ps(n, n, one));
            __m256 dr = _mm256_mul_ps(_mm256_mul_ps(dn, hn), _mm256_mul_ps(rr, _mm256_sub_ps(one, rr)));
            __m256 dz = _mm256_mul_ps(_mm256_mul_ps(dh, _mm256_sub_ps(hp, n)), _mm256_mul_ps(z, _mm256_sub_ps(one, z)));
            float *e = q->dph + r * GH + u;
            ST(d, dr);
            ST(d + H, dz);
            ST(d + 2 * H, dn);
            ST(e, dr);
            ST(e + H, dz);
            ST(e + 2 * H, _mm256_mul_ps(dn, rr));
            ST(q->dc + sh + u, _mm256_mul_ps(dh, z));
            continue;
        }
        __m256 tc = LD(q->tcs + r * H + u), cp = LD(q->cs + r * H + u), dc0 = LD(q->dc + sh + u);
        if (kind == COUPLED) {
            __m256 f = LD(a), g = LD(a + H), o = LD(a + 2 * H);
            __m256 dc = _mm256_fmadd_ps(_mm256_mul_ps(dh, o), _mm256_fnmadd_ps(tc, tc, one), dc0);
            __m256 omf = _mm256_sub_ps(one, f);
            ST(d, _mm256_mul_ps(_mm256_mul_ps(dc, _mm256_sub_ps(cp, g)), _mm256_mul_ps(f, omf)));
            ST(d + H, _mm256_mul_ps(_mm256_mul_ps(dc, omf), _mm256_fnmadd_ps(g, g, one)));
            ST(d + 2 * H, _mm256_mul_ps(_mm256_mul_ps(dh, tc), _mm256_mul_ps(o, _mm256_sub_ps(one, o))));
            ST(q->dc + sh + u, _mm256_mul_ps(dc, f));
            continue;
        }
        __m256 i = LD(a), f = LD(a + H), g = LD(a + 2 * H), o = LD(a + 3 * H);
        __m256 d_o = _mm256_mul_ps(_mm256_mul_ps(dh, tc), _mm256_mul_ps(o, _mm256_sub_ps(one, o)));
        __m256 dc = _mm256_fmadd_ps(_mm256_mul_ps(dh, o), _mm256_fnmadd_ps(tc, tc, one), dc0);
        if (kind == PEEPHOLE) dc = _mm256_fmadd_ps(d_o, LD(q->peep + 2 * H + u), dc);
        __m256 d_i = _mm256_mul_ps(_mm256_mul_ps(dc, g), _mm256_mul_ps(i, _mm256_sub_ps(one, i)));
        __m256 d_f = _mm256_mul_ps(_mm256_mul_ps(dc, cp), _mm256_mul_ps(f, _mm256_sub_ps(one, f)));
        ST(d, d_i);
        ST(d + H, d_f);
        ST(d + 2 * H, _mm256_mul_ps(_mm256_mul_ps(dc, i), _mm256_fnmadd_ps(g, g, one)));
        ST(d + 3 * H, d_o);
        __m256 carry = _mm256_mul_ps(dc, f);
        if (kind == PEEPHOLE)
            carry = _mm256_fmadd_ps(d_f, LD(q->peep + H + u), _mm256_fmadd_ps(d_i, LD(q->peep + u), carry));
        ST(q->dc + sh + u, carry);
    }
}

/* out[s] (B, H) = init[s] (or zeros) + x_s (K) @ a (K, H) matrix in panels of 32 output units
 * (H/32, K, 32), output panel p, streams s0 .. s0 + g - 1: the backward's products. */
INLINE void out_panel(const float *w, int K, const float *x, size_t stride, const float *init, float *out,
                      int H, int p, int s0, int g) {
    __m256 acc[GROUP][4];
    const size_t u = 32 * (size_t)p;
    for (int j = 0; j < g; j++)
        for (int c = 0; c < 4; c++)
            acc[j][c] = init ? LD(init + (size_t)(s0 + j) * H + u + 8 * c) : _mm256_setzero_ps();
    panel_rows(w, (size_t)p * K * 32, K, 4, x + (size_t)s0 * stride, stride, acc, g, 0);
    for (int j = 0; j < g; j++)
        for (int c = 0; c < 4; c++) ST(out + (size_t)(s0 + j) * H + u + 8 * c, acc[j][c]);
}

/* Backward, step t: dh_{t-1} = (recurrent gradient of step t) U, for output panel p (32 units),
 * streams s0 .. s0 + g - 1 (the gru adds its direct dh z, kept in dc). */
INLINE void backward_panel(const Seq *q, int kind, int t, int p, int s0, int g) {
    const size_t GH = (size_t)gates_of(kind) * q->H;
    const float *x = (kind == GRU ? q->dph : q->dpre) + (size_t)t * q->B * GH;
    out_panel(q->wb, (int)GH, x, GH, kind == GRU ? q->dc : NULL, q->dh, q->H, p, s0, g);
}

INLINE void backward(const Seq *q, int kind) {
    const int P = q->H / 32, groups = (q->B + GROUP - 1) / GROUP;
    for (int t = q->T - 1; t >= 0; t--) {
        #pragma omp for schedule(static)
        for (int s = 0; s < q->B; s++)
            backward_pointwise(q, kind, t, s);
        #pragma omp for schedule(static)
        for (int pg = 0; pg < P * groups; pg++) {
            const int p = pg % P, s0 = (pg / P) * GROUP;
            backward_panel(q, kind, t, p, s0, min_int(q->B - s0, GROUP));
        }
    }
}

/* ---------------------------------------------------------------- gru, cho form */

/* Forward, step t, first product: r and z of panel p (8 units, slots r, z), and r * h_{t-1}. */
INLINE void cho_rz_panel(const Seq *q, int t, int p, int s0, int g) {
    const int B = q->B, H = q->H;
    const size_t GH = 3 * (size_t)H, u = 8 * (size_t)p;
    __m256 acc[GROUP][4];
    for (int j = 0; j < g; j++) {
        const float *row = q->gates + ((size_t)t * B + s0 + j) * GH + u;
        acc[j][0] = LD(row);
        acc[j][1] = LD(row + H);
    }
    panel_rows(q->wf, (size_t)p * H * 16, H, 2, q->hs + ((size_t)t * B + s0) * H, H, acc, g, 0);
    for (int j = 0; j < g; j++) {
        const size_t r = (size_t)t * B + s0 + j;
        float *row = q->gates + r * GH + u;
        __m256 rr = sigmoid8(acc[j][0]);
        ST(row, rr);
        ST(row + H, sigmoid8(acc[j][1]));
        ST(q->rh + r * H + u, _mm256_mul_ps(rr, LD(q->hs + r * H + u)));
    }
}

/* Forward, step t, second product: n of panel p from r * h_{t-1}, then h_t. */
INLINE void cho_n_panel(const Seq *q, int t, int p, int s0, int g) {
    const int B = q->B, H = q->H;
    const size_t GH = 3 * (size_t)H, u = 8 * (size_t)p;
    __m256 acc[GROUP][4];
    for (int j = 0; j < g; j++)
        acc[j][0] = LD(q->gates + ((size_t)t * B + s0 + j) * GH + 2 * (size_t)H + u);
    panel_rows(q->wf2, (size_t)p * H * 8, H, 1, q->rh + ((size_t)t * B + s0) * H, H, acc, g, 0);
    for (int j = 0; j < g; j++) {
        const size_t r = (size_t)t * B + s0 + j;
        float *row = q->gates + r * GH + u;
        __m256 n = tanh8(acc[j][0]), z = LD(row + H), hp = LD(q->hs + r * H + u);
        ST(row + 2 * H, n);
        ST(q->hs + (r + B) * H + u, _mm256_fmadd_ps(z, _mm256_sub_ps(n, hp), hp));    /* (1 - z) h + z n */
    }
}

INLINE void forward_cho(const Seq *q) {
    const int P = q->H / 8, groups = (q->B + GROUP - 1) / GROUP;
    for (int t = 0; t < q->T; t++) {
        #pragma omp for schedule(static)
        for (int pg = 0; pg < P * groups; pg++)
            cho_rz_panel(q, t, pg % P, (pg / P) * GROUP, min_int(q->B - (pg / P) * GROUP, GROUP));
        #pragma omp for schedule(static)
        for (int pg = 0; pg < P * groups; pg++)
            cho_n_panel(q, t, pg % P, (pg / P) * GROUP, min_int(q->B - (pg / P) * GROUP, GROUP));
    }
}

INLINE void backward_cho(const Seq *q) {
    const int B = q->B, H = q->H, P = H / 32, groups = (B + GROUP - 1) / GROUP;
    const size_t GH = 3 * (size_t)H;
    const __m256 one = _mm256_set1_ps(1.0f);
    for (int t = q->T - 1; t >= 0; t--) {
        const float *dpre_t = q->dpre + (size_t)t * B * GH;
        #pragma omp for schedule(static)
        for (int s = 0; s < B; s++) {              /* dpre_n, dpre_z, and dh (1 - z) into dc */
            const size_t r = (size_t)t * B + s, sh = (size_t)s * H;
            for (int u = 0; u < H; u += 8) {
                const float *a = q->gates + r * GH + u;
                float *d = q->dpre + r * GH + u;
                __m256 z = LD(a + H), n = LD(a + 2 * H), hp = LD(q->hs + r * H + u);
                __m256 dh = _mm256_add_ps(LD(q->dhs + r * H + u), LD(q->dh + sh + u));
                ST(d + 2 * H, _mm256_mul_ps(_mm256_mul_ps(dh, z), _mm256_fnmadd_ps(n, n, one)));
                ST(d + H, _mm256_mul_ps(_mm256_mul_ps(dh, _mm256_sub_ps(n, hp)), _mm256_mul_ps(z, _mm256_sub_ps(one, z))));
                ST(q->dc + sh + u, _mm256_mul_ps(dh, _mm256_sub_ps(one, z)));
            }
        }
        #pragma omp for schedule(static)           /* d(r h) = dpre_n U_n */
        for (int pg = 0; pg < P * groups; pg++)
            out_panel(q->wb2, H, dpre_t + 2 * (size_t)H, GH, NULL, q->drh, H, pg % P, (pg / P) * GROUP,
                      min_int(B - (pg / P) * GROUP, GROUP));
        #pragma omp for schedule(static)
        for (int s = 0; s < B; s++) {              /* dpre_r, and d(r h) r into dc */
            const size_t r = (size_t)t * B + s, sh = (size_t)s * H;
            for (int u = 0; u < H; u += 8) {
                __m256 rr = LD(q->gates + r * GH + u), drh = LD(q->drh + sh + u), hp = LD(q->hs + r * H + u);
                ST(q->dpre + r * GH + u, _mm256_mul_ps(_mm256_mul_ps(drh, hp), _mm256_mul_ps(rr, _mm256_sub_ps(one, rr))));
                ST(q->dc + sh + u, _mm256_fmadd_ps(drh, rr, LD(q->dc + sh + u)));
            }
        }
        #pragma omp for schedule(static)           /* dh_{t-1} = dc + (dpre_r, dpre_z) U_rz */
        for (int pg = 0; pg < P * groups; pg++)
            out_panel(q->wb, 2 * H, dpre_t, GH, q->dc, q->dh, H, pg % P, (pg / P) * GROUP,
                      min_int(B - (pg / P) * GROUP, GROUP));
    }
}

void charlstm_rnn_forward(const Seq *q) {
    #pragma omp parallel num_threads(q->threads)
    switch (q->kind) {
    case LSTM: forward(q, LSTM); break;
    case PEEPHOLE: forward(q, PEEPHOLE); break;
    case COUPLED: forward(q, COUPLED); break;
    case GRU: forward(q, GRU); break;
    case GRU_CHO: forward_cho(q); break;
    default: forward(q, RNN); break;
    }
}

void charlstm_rnn_backward(const Seq *q) {
    #pragma omp parallel num_threads(q->threads)
    switch (q->kind) {
    case LSTM: backward(q, LSTM); break;
    case PEEPHOLE: backward(q, PEEPHOLE); break;
    case COUPLED: backward(q, COUPLED); break;
    case GRU: backward(q, GRU); break;
    case GRU_CHO: backward_cho(q); break;
    default: backward(q, RNN); break;
    }
}
