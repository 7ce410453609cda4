/* charlstm's native recurrent layers for training: the time loops of forward and backward in C,
 * for every cell kind (float32).
 *
 * charlstm/fused.py runs one layer over a window as a torch.autograd.Function whose loops call a
 * few torch operations per step. Here each loop is one call, so that a step costs its recurrent
 * product and little more: the pointwise work is done right after each panel's product, and the
 * threads (OpenMP) share every step's panels, meeting once or twice per step. What is one big
 * product over the window (the input projection, the weight gradients, the input gradient)
 * stays with torch (fused_native.py).
 *
 * Equations (../shared/EQUATIONS.md); `pre` is W x_t + b, U the recurrent weights, in torch's gate order:
 *   lstm      (i, f, g, o)  i, f, o = sigmoid, g = tanh of pre + U h_{t-1};  c_t = f c_{t-1} + i g;  h_t = o tanh(c_t)
 *   peephole  (i, f, g, o)  as lstm with P_i(c_{t-1}) added to i's and P_f(c_{t-1}) to f's pre-activation,
 *                           P_o(c_t) to o's: p * c (diag form) or U_p c (full form: o needs all of c_t first,
 *                           so a step takes two passes)
 *   coupled   (f, g, o)     as lstm with i = 1 - f
 *   gru       (r, z, n)     r, z = sigmoid(pre + U h + b_h);  n = tanh(pre_n + r (U_n h + b_hn));
 *                           h_t = (1 - z) n + z h_{t-1}
 *   gru cho   (r, z, n)     r, z = sigmoid(pre + U_rz h);  n = tanh(pre_n + U_n (r h));  h_t = (1 - z) h_{t-1} + z n
 *                           (two products per step: U_n needs all of r h first)
 *   rnn       (one)         h_t = tanh(pre + U h_{t-1})
 * Backward, with dh the gradient reaching h_t and dc the one carried back to c_t:
 *   lstm      dc += dh o (1 - tanh(c)^2);  dpre_i = dc g i (1 - i), dpre_f = dc c_{t-1} f (1 - f),
 *             dpre_g = dc i (1 - g^2), dpre_o = dh tanh(c) o (1 - o);  dc_{t-1} = dc f
 *   peephole  as lstm, with dc += P_o^T dpre_o before the others and dc_{t-1} += P_i^T dpre_i + P_f^T dpre_f
 *   coupled   dpre_f = dc (c_{t-1} - g) f (1 - f), dpre_g = dc (1 - f)(1 - g^2)
 *   gru       dpre_n = dh (1 - z)(1 - n^2), dpre_r = dpre_n hn r (1 - r), dpre_z = dh (h_{t-1} - n) z (1 - z);
 *             the recurrent side's gradient is (dpre_r, dpre_z, dpre_n r), and h_{t-1} gets dh z directly
 *   gru cho   dpre_n = dh z (1 - n^2), dpre_z = dh (n - h_{t-1}) z (1 - z);  d(r h) = dpre_n U_n;
 *             dpre_r = d(r h) h_{t-1} r (1 - r);  dh_{t-1} += dh (1 - z) + d(r h) r + (dpre_r, dpre_z) U_rz
 *   rnn       dpre = dh (1 - h_t^2)
 *   all       dh_{t-1} += (recurrent gradient) U
 */
#include <string.h>

#include "charlstm.h"
#include "simd.h"

#define GROUP 32

static inline int min_int(int a, int b) { return a < b ? a : b; }

/* Every panel of 8 units (forward) or 32 (backward) for every group of streams, shared among the threads. */
#define FOR_PANELS(WIDTH, CALL)                                     \
    _Pragma("omp for schedule(static)")                             \
    for (int pg = 0; pg < P##WIDTH * groups; pg++) {                \
        const int p = pg % P##WIDTH, s0 = (pg / P##WIDTH) * GROUP;  \
        const int g = min_int(q->B - s0, GROUP);                    \
        CALL;                                                       \
    }
#define FOR_STREAMS(CALL)                                           \
    _Pragma("omp for schedule(static)")                             \
    for (int s = 0; s < q->B; s++) {                                \
        CALL;                                                       \
    }

/* acc[j] += x_j @ panel p of a float32 matrix in forward panels (K rows, G gates of 8 units). */
static void product(const float *w, int p, int K, int G, const float *x, size_t stride, __m256 (*acc)[4], int g) {
    charlstm_panel(F32, w, (size_t)p * K * 8 * G, NULL, K, G, x, stride, acc, g);
}

/* ---------------------------------------------------------------- forward */

/* Forward, step t, panel p (8 units) for streams s0 .. s0 + g - 1 (every kind but the rnn and the
 * cho gru; the full peephole's o waits for o_panel). */
static void forward_panel(const Seq *q, int t, int p, int s0, int g) {
    const int kind = q->kind, B = q->B, H = q->H, G = charlstm_gates(kind);
    const size_t GH = (size_t)G * H, u = 8 * (size_t)p;
    __m256 acc[GROUP][4];
    for (int j = 0; j < g; j++) {
        const float *row = q->gates + ((size_t)t * B + s0 + j) * GH + u;
        for (int s = 0; s < G; s++) {
            if (kind == GRU) {      /* the recurrent bias goes with U h; n's input part waits for r */
                __m256 b = q->bh ? LD(q->bh + s * H + u) : _mm256_setzero_ps();
                acc[j][s] = s < 2 ? _mm256_add_ps(LD(row + s * H), b) : b;
            } else {
                acc[j][s] = LD(row + charlstm_slot_block(0, kind, s) * H);
            }
        }
    }
    product(q->wf, p, H, G, q->hs + ((size_t)t * B + s0) * H, H, acc, g);
    if (kind == PEEPHOLE_FULL)            /* i and f see c_{t-1} through P_if */
        product(q->pf, p, H, 2, q->cs + ((size_t)t * B + s0) * H, H, acc, g);
    const __m256 one = _mm256_set1_ps(1.0f);
    for (int j = 0; j < g; j++) {
        const size_t r = (size_t)t * B + s0 + j;
        float *row = q->gates + r * GH + u, *h = q->hs + (r + B) * H + u;
        const __m256 *a = acc[j];
        if (kind == GRU) {
            __m256 rr = sigmoid8(a[0]), z = sigmoid8(a[1]), hn = a[2];
            __m256 n = tanh8(_mm256_fmadd_ps(rr, hn, LD(row + 2 * H)));
            ST(row, rr);
            ST(row + H, z);
            ST(row + 2 * H, n);
            ST(q->tcs + r * H + u, hn);
            ST(h, _mm256_fmadd_ps(z, _mm256_sub_ps(LD(q->hs + r * H + u), n), n));
            continue;
        }
        __m256 cp = LD(q->cs + r * H + u), c, i, f, o, gg;
        if (kind == PEEPHOLE_FULL) {     /* slots i, f, o, g; o's pre-activation kept for o_panel */
            i = sigmoid8(a[0]);
            f = sigmoid8(a[1]);
            gg = tanh8(a[3]);
            ST(row, i);
            ST(row + H, f);
            ST(row + 2 * H, gg);
            ST(row + 3 * H, a[2]);
            ST(q->cs + (r + B) * H + u, _mm256_fmadd_ps(i, gg, _mm256_mul_ps(f, cp)));
            continue;
        }
        if (kind == PEEPHOLE) {
            i = sigmoid8(_mm256_fmadd_ps(LD(q->peep + u), cp, a[0]));
            f = sigmoid8(_mm256_fmadd_ps(LD(q->peep + H + u), cp, a[1]));
            gg = tanh8(a[3]);
            c = _mm256_fmadd_ps(i, gg, _mm256_mul_ps(f, cp));
            o = sigmoid8(_mm256_fmadd_ps(LD(q->peep + 2 * H + u), c, a[2]));
        } else if (kind == COUPLED) {
            f = sigmoid8(a[0]);
            o = sigmoid8(a[1]);
            gg = tanh8(a[2]);
            i = _mm256_sub_ps(one, f);
            c = _mm256_fmadd_ps(f, _mm256_sub_ps(cp, gg), gg);
        } else {
            i = sigmoid8(a[0]);
            f = sigmoid8(a[1]);
            o = sigmoid8(a[2]);
            gg = tanh8(a[3]);
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
        ST(h, _mm256_mul_ps(o, tc));
    }
}

/* The rnn at step t, panel p of q->units units (one or two vectors) for streams s0 .. s0 + g - 1:
 * h_t = tanh(pre + U h_{t-1}). Two vectors a pass let each x broadcast serve two multiply-adds. */
static void rnn_panel(const Seq *q, int t, int p, int s0, int g) {
    const int B = q->B, H = q->H, V = q->units / 8;
    const size_t u = (size_t)q->units * p;
    __m256 acc[GROUP][4];
    for (int j = 0; j < g; j++)
        for (int c = 0; c < V; c++) acc[j][c] = LD(q->gates + ((size_t)t * B + s0 + j) * H + u + 8 * c);
    charlstm_panel(F32, q->wf, (size_t)p * H * q->units, NULL, H, V, q->hs + ((size_t)t * B + s0) * H, H, acc, g);
    for (int j = 0; j < g; j++) {
        const size_t r = (size_t)t * B + s0 + j;
        for (int c = 0; c < V; c++) {
            __m256 hn = tanh8(acc[j][c]);
            ST(q->gates + r * H + u + 8 * c, hn);
            ST(q->hs + (r + B) * H + u + 8 * c, hn);
        }
    }
}

/* The full peephole's second pass at step t: o from its pre-activation and P_o c_t, then h_t. */
static void o_panel(const Seq *q, int t, int p, int s0, int g) {
    const int B = q->B, H = q->H;
    const size_t GH = 4 * (size_t)H, u = 8 * (size_t)p;
    __m256 acc[GROUP][4];
    for (int j = 0; j < g; j++) acc[j][0] = LD(q->gates + ((size_t)t * B + s0 + j) * GH + 3 * H + u);
    product(q->po, p, H, 1, q->cs + ((size_t)(t + 1) * B + s0) * H, H, acc, g);
    for (int j = 0; j < g; j++) {
        const size_t r = (size_t)t * B + s0 + j;
        __m256 o = sigmoid8(acc[j][0]), tc = tanh8(LD(q->cs + (r + B) * H + u));
        ST(q->gates + r * GH + 3 * H + u, o);
        ST(q->tcs + r * H + u, tc);
        ST(q->hs + (r + B) * H + u, _mm256_mul_ps(o, tc));
    }
}

/* The cho gru at step t, first product: r and z of panel p (slots r, z), and r * h_{t-1}. */
static void cho_rz_panel(const Seq *q, int t, int p, int s0, int g) {
    const int B = q->B, H = q->H;
    const size_t GH = 3 * (size_t)H, u = 8 * (size_t)p;
    __m256 acc[GROUP][4];
    for (int j = 0; j < g; j++) {
        const float *row = q->gates + ((size_t)t * B + s0 + j) * GH + u;
        acc[j][0] = LD(row);
        acc[j][1] = LD(row + H);
    }
    product(q->wf, p, H, 2, q->hs + ((size_t)t * B + s0) * H, H, acc, g);
    for (int j = 0; j < g; j++) {
        const size_t r = (size_t)t * B + s0 + j;
        float *row = q->gates + r * GH + u;
        __m256 rr = sigmoid8(acc[j][0]);
        ST(row, rr);
        ST(row + H, sigmoid8(acc[j][1]));
        ST(q->rh + r * H + u, _mm256_mul_ps(rr, LD(q->hs + r * H + u)));
    }
}

/* The cho gru at step t, second product: n of panel p from r * h_{t-1}, then h_t. */
static void cho_n_panel(const Seq *q, int t, int p, int s0, int g) {
    const int B = q->B, H = q->H;
    const size_t GH = 3 * (size_t)H, u = 8 * (size_t)p;
    __m256 acc[GROUP][4];
    for (int j = 0; j < g; j++) acc[j][0] = LD(q->gates + ((size_t)t * B + s0 + j) * GH + 2 * (size_t)H + u);
    product(q->wf2, p, H, 1, q->rh + ((size_t)t * B + s0) * H, H, acc, g);
    for (int j = 0; j < g; j++) {
        const size_t r = (size_t)t * B + s0 + j;
        float *row = q->gates + r * GH + u;
        __m256 n = tanh8(acc[j][0]), z = LD(row + H), hp = LD(q->hs + r * H + u);
        ST(row + 2 * H, n);
        ST(q->hs + (r + B) * H + u, _mm256_fmadd_ps(z, _mm256_sub_ps(n, hp), hp));    /* (1 - z) h + z n */
    }
}

static void forward(const Seq *q) {
    const int P8 = q->H / 8, PU = q->H / q->units, groups = (q->B + GROUP - 1) / GROUP;
    for (int t = 0; t < q->T; t++) {
        if (q->kind == RNN) {
            FOR_PANELS(U, rnn_panel(q, t, p, s0, g))
        } else if (q->kind == GRU_CHO) {
            FOR_PANELS(8, cho_rz_panel(q, t, p, s0, g))
            FOR_PANELS(8, cho_n_panel(q, t, p, s0, g))
        } else {
            FOR_PANELS(8, forward_panel(q, t, p, s0, g))
            if (q->kind == PEEPHOLE_FULL) {
                FOR_PANELS(8, o_panel(q, t, p, s0, g))
            }
        }
    }
}

/* ---------------------------------------------------------------- backward */

/* out[s] (B, H) = init[s] (or zeros) + x_s (K) @ a (K, H) matrix in panels of 32 output units
 * (the last one narrower where H is not a multiple of 32), output panel p, streams s0 .. s0 + g - 1. */
static void out_panel(const float *w, int K, const float *x, size_t stride, const float *init, float *out, int H,
                      int p, int s0, int g) {
    __m256 acc[GROUP][4];
    const size_t u = 32 * (size_t)p;
    const int nc = min_int(4, (H - 32 * p) / 8);
    for (int j = 0; j < g; j++)
        for (int c = 0; c < nc; c++)
            acc[j][c] = init ? LD(init + (size_t)(s0 + j) * H + u + 8 * c) : _mm256_setzero_ps();
    charlstm_panel(F32, w, (size_t)p * K * 32, NULL, K, nc, x + (size_t)s0 * stride, stride, acc, g);
    for (int j = 0; j < g; j++)
        for (int c = 0; c < nc; c++) ST(out + (size_t)(s0 + j) * H + u + 8 * c, acc[j][c]);
}

/* Backward, step t, the pointwise part for stream s: the gradients of the pre-activations, and
 * what is carried back to step t - 1 without U (dc; for the gru, dh z, kept in dc). The full
 * peephole's pass comes in two halves (ifg_pointwise after dc has P_o^T dpre_o). */
static void backward_pointwise(const Seq *q, int t, int s) {
    const int kind = q->kind, B = q->B, H = q->H, G = charlstm_gates(kind);
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
        if (kind == PEEPHOLE_FULL) {     /* dc waits for P_o^T d_o (full_dc), the rest for ifg_pointwise */
            ST(d + 3 * H, d_o);
            ST(q->dc + sh + u, dc);
            continue;
        }
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

/* The full peephole, stream s at step t, once dc is complete: the gradients of i, f and g, and f dc
 * carried back (P_if^T (dpre_i, dpre_f) is added by the panels after). */
static void ifg_pointwise(const Seq *q, int t, int s) {
    const int B = q->B, H = q->H;
    const size_t GH = 4 * (size_t)H, r = (size_t)t * B + s, sh = (size_t)s * H;
    const __m256 one = _mm256_set1_ps(1.0f);
    for (int u = 0; u < H; u += 8) {
        const float *a = q->gates + r * GH + u;
        float *d = q->dpre + r * GH + u;
        __m256 i = LD(a), f = LD(a + H), g = LD(a + 2 * H), cp = LD(q->cs + r * H + u), dc = LD(q->dc + sh + u);
        ST(d, _mm256_mul_ps(_mm256_mul_ps(dc, g), _mm256_mul_ps(i, _mm256_sub_ps(one, i))));
        ST(d + H, _mm256_mul_ps(_mm256_mul_ps(dc, cp), _mm256_mul_ps(f, _mm256_sub_ps(one, f))));
        ST(d + 2 * H, _mm256_mul_ps(_mm256_mul_ps(dc, i), _mm256_fnmadd_ps(g, g, one)));
        ST(q->dc + sh + u, _mm256_mul_ps(dc, f));
    }
}

/* Backward, step t: dh_{t-1} = (recurrent gradient of step t) U, for output panel p (32 units),
 * streams s0 .. s0 + g - 1 (the gru adds its direct dh z, kept in dc; the full peephole adds
 * P_if^T (dpre_i, dpre_f) to dc). */
static void backward_panel(const Seq *q, int t, int p, int s0, int g) {
    const int kind = q->kind, H = q->H;
    const size_t GH = (size_t)charlstm_gates(kind) * H;
    const float *x = (kind == GRU ? q->dph : q->dpre) + (size_t)t * q->B * GH;
    out_panel(q->wb, (int)GH, x, GH, kind == GRU ? q->dc : NULL, q->dh, H, p, s0, g);
    if (kind == PEEPHOLE_FULL) out_panel(q->pbf, 2 * H, x, GH, q->dc, q->dc, H, p, s0, g);
}

static void backward(const Seq *q) {
    const int H = q->H, P32 = (H + 31) / 32, groups = (q->B + GROUP - 1) / GROUP;
    const size_t GH = 4 * (size_t)H;
    for (int t = q->T - 1; t >= 0; t--) {
        FOR_STREAMS(backward_pointwise(q, t, s))
        if (q->kind == PEEPHOLE_FULL) {       /* dc += P_o^T dpre_o, then the gates that saw c_{t-1} */
            const float *x = q->dpre + (size_t)t * q->B * GH + 3 * (size_t)H;
            FOR_PANELS(32, out_panel(q->pbo, H, x, GH, q->dc, q->dc, H, p, s0, g))
            FOR_STREAMS(ifg_pointwise(q, t, s))
        }
        FOR_PANELS(32, backward_panel(q, t, p, s0, g))
    }
}

static void backward_cho(const Seq *q) {
    const int B = q->B, H = q->H, P32 = (H + 31) / 32, groups = (B + GROUP - 1) / GROUP;
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
        /* d(r h) = dpre_n U_n */
        FOR_PANELS(32, out_panel(q->wb2, H, dpre_t + 2 * (size_t)H, GH, NULL, q->drh, H, p, s0, g))
        #pragma omp for schedule(static)
        for (int s = 0; s < B; s++) {              /* dpre_r, and d(r h) r into dc */
            const size_t r = (size_t)t * B + s, sh = (size_t)s * H;
            for (int u = 0; u < H; u += 8) {
                __m256 rr = LD(q->gates + r * GH + u), drh = LD(q->drh + sh + u), hp = LD(q->hs + r * H + u);
                ST(q->dpre + r * GH + u, _mm256_mul_ps(_mm256_mul_ps(drh, hp), _mm256_mul_ps(rr, _mm256_sub_ps(one, rr))));
                ST(q->dc + sh + u, _mm256_fmadd_ps(drh, rr, LD(q->dc + sh + u)));
            }
        }
        /* dh_{t-1} = dc + (dpre_r, dpre_z) U_rz */
        FOR_PANELS(32, out_panel(q->wb, 2 * H, dpre_t, GH, q->dc, q->dh, H, p, s0, g))
    }
}

/* ---------------------------------------------------------------- checked entry points */

/* 0 where the window can be run, else a code: 1 bad kind, 2 bad sizes, 3 a missing array. */
static int seq_invalid(const Seq *q, int backward) {
    if (!q || q->kind < 0 || q->kind >= KIND_COUNT) return 1;
    if (q->T < 0 || q->B < 1 || q->H < 8 || q->H % 8 || q->threads < 1) return 2;
    if (q->units != 8 && !(q->units == 16 && q->kind == RNN && q->H % 16 == 0)) return 2;
    const int kind = q->kind, lstms = kind == LSTM || kind == PEEPHOLE || kind == COUPLED || kind == PEEPHOLE_FULL;
    if (!q->gates || !q->hs || (lstms && (!q->cs || !q->tcs)) || (kind == GRU && !q->tcs)) return 3;
    if (kind == PEEPHOLE && !q->peep) return 3;
    if (!backward)
        return !q->wf || (kind == GRU_CHO && (!q->wf2 || !q->rh)) || (kind == PEEPHOLE_FULL && (!q->pf || !q->po))
                   ? 3 : 0;
    if (!q->wb || !q->dhs || !q->dpre || !q->dh || ((lstms || kind == GRU || kind == GRU_CHO) && !q->dc)) return 3;
    if ((kind == GRU && !q->dph) || (kind == GRU_CHO && (!q->wb2 || !q->drh)) ||
        (kind == PEEPHOLE_FULL && (!q->pbf || !q->pbo)))
        return 3;
    return 0;
}

int charlstm_rnn_forward(const Seq *q) {
    const int bad = seq_invalid(q, 0);
    if (bad) return bad;
    #pragma omp parallel num_threads(q->threads)
    forward(q);
    return 0;
}

int charlstm_rnn_backward(const Seq *q) {
    const int bad = seq_invalid(q, 1);
    if (bad) return bad;
    memset(q->dh, 0, sizeof(float) * (size_t)q->B * q->H);
    #pragma omp parallel num_threads(q->threads)
    {
        if (q->kind == GRU_CHO) backward_cho(q);
        else backward(q);
    }
    return 0;
}
