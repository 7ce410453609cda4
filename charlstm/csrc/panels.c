/* The panel product of charlstm's native kernels (AVX2 + FMA + F16C): acc += x @ panel, for
 * float32 or float16 weights (converted in registers; float32 arithmetic), or int8 weights.
 *
 * Every kernel spends its time here, so this is the one place compiled with the loop shapes
 * as constants: one copy per weight type x number of streams (1-6) x vectors (1-2) for several
 * streams, and per weight type x gates (1-4) for one stream. The kernels call it once per panel,
 * which costs nothing beside a pass over K rows.
 *
 * int8: converting each weight to float32 costs two instructions beside its multiply-add, so the
 * int8 product multiplies integers instead. Each stream's x is rounded to int16 (its largest
 * |x| to Q = min(32767, (2^31 - 1) / (127 K)), so that no sum of K products overflows int32),
 * pairs of rows are multiplied and added by one vpmaddwd (16 products), and each column's int32
 * sum is scaled back to float32 at the end by its weight scale and x's. An int8 panel stores its
 * rows in pairs, (K/2, 8G, 2): the two rows of each column side by side. */
#include "charlstm.h"
#include "simd.h"

#define NOINLINE static __attribute__((noinline))
/* unrolled before the arrays of accumulators are split into registers (else gcc -O3 keeps them
 * in memory too, a store per multiply-add, half the speed) */
#define DO_PRAGMA(x) _Pragma(#x)
#define UNROLL(n) DO_PRAGMA(GCC unroll n)

INLINE __m256 load8(const void *w, size_t i, int prec) {
    if (prec == F16)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + i)));
    return _mm256_loadu_ps((const float *)w + i);
}

/* ---------------------------------------------------------------- float32, float16 */

/* One stream, a panel of G vectors (rows 8G long). One stream's multiply-adds would wait for
 * each other (each accumulator's previous one), so consecutive rows go to separate sets of
 * accumulators, summed at the end: eight sets for one vector, four for two, two for 3 or 4. */
INLINE void one(const void *w, size_t off, int K, int G, const float *x, __m256 acc[4], int prec) {
    const int U = G == 1 ? 8 : G == 2 ? 4 : 2, width = 8 * G;
    __m256 a[8][4];
    UNROLL(8) for (int u = 0; u < U; u++)
        UNROLL(4) for (int c = 0; c < G; c++) a[u][c] = u == 0 ? acc[c] : _mm256_setzero_ps();
    int k = 0;
    for (; k + U <= K; k += U)
        UNROLL(8) for (int u = 0; u < U; u++) {
            const size_t o = off + (size_t)(k + u) * width;
            const __m256 xb = _mm256_broadcast_ss(x + k + u);
            UNROLL(4) for (int c = 0; c < G; c++) a[u][c] = _mm256_fmadd_ps(xb, load8(w, o + 8 * c, prec), a[u][c]);
        }
    for (; k < K; k++) {
        const size_t o = off + (size_t)k * width;
        const __m256 xb = _mm256_broadcast_ss(x + k);
        UNROLL(4) for (int c = 0; c < G; c++) a[0][c] = _mm256_fmadd_ps(xb, load8(w, o + 8 * c, prec), a[0][c]);
    }
    UNROLL(4) for (int c = 0; c < G; c++) {
        __m256 t = a[0][c];
        UNROLL(8) for (int u = 1; u < U; u++) t = _mm256_add_ps(t, a[u][c]);
        acc[c] = t;
    }
}

/* acc[j][col .. col + nc - 1] += x_j (K) @ nc vectors of 8 columns of a panel whose rows are
 * `width` floats long, for R <= 6 streams whose inputs are `stride` floats apart: each weight
 * vector is loaded once for all R streams, and the R * nc accumulators stay in registers. */
INLINE void rows(const void *w, size_t off, int K, int width, const float *x, size_t stride, __m256 (*acc)[4],
                 int col, int nc, int R, int prec) {
    __m256 a[6][2];
    UNROLL(6) for (int j = 0; j < R; j++)
        UNROLL(2) for (int c = 0; c < nc; c++) a[j][c] = acc[j][col + c];
    for (int k = 0; k < K; k++) {
        const size_t o = off + (size_t)k * width + (size_t)col * 8;
        const __m256 w0 = load8(w, o, prec), w1 = nc == 2 ? load8(w, o + 8, prec) : w0;
        UNROLL(6) for (int j = 0; j < R; j++) {
            const __m256 xj = _mm256_broadcast_ss(x + (size_t)j * stride + k);
            a[j][0] = _mm256_fmadd_ps(xj, w0, a[j][0]);
            if (nc == 2) a[j][1] = _mm256_fmadd_ps(xj, w1, a[j][1]);
        }
    }
    UNROLL(6) for (int j = 0; j < R; j++)
        UNROLL(2) for (int c = 0; c < nc; c++) acc[j][col + c] = a[j][c];
}

#define ROWS_CASE(P, r)                                                   \
    case r:                                                               \
        if (nc == 2) rows(w, off, K, width, x, stride, acc, col, 2, r, P); \
        else rows(w, off, K, width, x, stride, acc, col, 1, r, P);         \
        break;

/* The copies with constant shapes, per weight type P. */
#define DEFINE_PRODUCTS(NAME, P)                                                                          \
    NOINLINE void rows_##NAME(const void *w, size_t off, int K, int width, const float *x, size_t stride,  \
                              __m256 (*acc)[4], int col, int nc, int R) {                                 \
        switch (R) {                                                                                      \
        ROWS_CASE(P, 6) ROWS_CASE(P, 5) ROWS_CASE(P, 4) ROWS_CASE(P, 3) ROWS_CASE(P, 2) ROWS_CASE(P, 1)   \
        }                                                                                                 \
    }                                                                                                     \
    NOINLINE void one_##NAME(const void *w, size_t off, int K, int G, const float *x, __m256 acc[4]) {    \
        switch (G) {                                                                                      \
        case 1: one(w, off, K, 1, x, acc, P); break;                                                      \
        case 2: one(w, off, K, 2, x, acc, P); break;                                                      \
        case 3: one(w, off, K, 3, x, acc, P); break;                                                      \
        default: one(w, off, K, 4, x, acc, P); break;                                                     \
        }                                                                                                 \
    }

DEFINE_PRODUCTS(f32, F32)
DEFINE_PRODUCTS(f16, F16)

/* ---------------------------------------------------------------- int8 */

/* x (K floats, K a multiple of 8) rounded to int16, as K/2 pairs (one int32 each) in q; returns the
 * factor that turns the int32 sums back into x's scale (0 where x is all zeros). */
static float quantize(const float *x, int K, int32_t *q) {
    __m256 m = _mm256_setzero_ps();
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int k = 0; k < K; k += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)));
    float lanes[8], top = 0.0f;
    _mm256_storeu_ps(lanes, m);
    for (int i = 0; i < 8; i++) top = lanes[i] > top ? lanes[i] : top;
    if (!(top > 0.0f)) {                          /* zeros (or NaN: the step's output says so anyway) */
        for (int k = 0; k < K / 2; k++) q[k] = 0;
        return 0.0f;
    }
    const float Q = 2147483647.0f / (127.0f * (float)K) < 32767.0f ? 2147483647.0f / (127.0f * (float)K) - 1.0f
                                                                    : 32767.0f;
    const __m256 s = _mm256_set1_ps(Q / top);
    for (int k = 0; k < K; k += 8) {
        const __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), s));      /* nearest */
        _mm_storeu_si128((__m128i *)(q + k / 2),
                         _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
    }
    return top / Q;
}

/* 16 int8 weights (two rows of 8 columns) as int16 */
INLINE __m256i load16(const int8_t *w) { return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w)); }

/* acc[j][col + c] += (int32 sum s) * (column scales) * (x_j's factor) */
INLINE __m256 scaled(__m256i s, const float *scale, float dq, __m256 acc) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(_mm256_loadu_ps(scale), _mm256_set1_ps(dq)), acc);
}

/* One stream, a panel of G vectors: K/2 row pairs of 8G columns. */
INLINE void one_int(const int8_t *w, const float *scale, int K, int G, const int32_t *q, float dq, __m256 acc[4]) {
    const int W2 = 16 * G;                        /* bytes per pair of rows */
    __m256i s[4];
    UNROLL(4) for (int c = 0; c < G; c++) s[c] = _mm256_setzero_si256();
    for (int kp = 0; kp < K / 2; kp++) {
        const __m256i xb = _mm256_set1_epi32(q[kp]);
        UNROLL(4) for (int c = 0; c < G; c++)
            s[c] = _mm256_add_epi32(s[c], _mm256_madd_epi16(load16(w + (size_t)kp * W2 + 16 * c), xb));
    }
    UNROLL(4) for (int c = 0; c < G; c++) acc[c] = scaled(s[c], scale + 8 * c, dq, acc[c]);
}

/* R <= 4 streams (their pairs `qs` apart in q), nc vectors from column block col, of a panel of width columns
 * (four, not six as in rows: each product needs a register of its own before it is added). */
INLINE void rows_int(const int8_t *w, const float *scale, int K, int width, const int32_t *q, size_t qs,
                     const float *dq, __m256 (*acc)[4], int col, int nc, int R) {
    __m256i s[4][2];
    UNROLL(4) for (int j = 0; j < R; j++)
        UNROLL(2) for (int c = 0; c < nc; c++) s[j][c] = _mm256_setzero_si256();
    for (int kp = 0; kp < K / 2; kp++) {
        const int8_t *p = w + (size_t)kp * 2 * width + 16 * col;
        const __m256i w0 = load16(p), w1 = nc == 2 ? load16(p + 16) : w0;
        UNROLL(4) for (int j = 0; j < R; j++) {
            const __m256i xb = _mm256_set1_epi32(q[j * qs + kp]);
            s[j][0] = _mm256_add_epi32(s[j][0], _mm256_madd_epi16(w0, xb));
            if (nc == 2) s[j][1] = _mm256_add_epi32(s[j][1], _mm256_madd_epi16(w1, xb));
        }
    }
    UNROLL(4) for (int j = 0; j < R; j++)
        UNROLL(2) for (int c = 0; c < nc; c++)
            acc[j][col + c] = scaled(s[j][c], scale + 8 * (col + c), dq[j], acc[j][col + c]);
}

#define ROWS_INT_CASE(r)                                                          \
    case r:                                                                       \
        if (nc == 2) rows_int(w, scale, K, width, q, qs, dq, acc, col, 2, r);      \
        else rows_int(w, scale, K, width, q, qs, dq, acc, col, 1, r);              \
        break;

NOINLINE void rows_i8(const int8_t *w, const float *scale, int K, int width, const int32_t *q, size_t qs,
                      const float *dq, __m256 (*acc)[4], int col, int nc, int R) {
    switch (R) { ROWS_INT_CASE(4) ROWS_INT_CASE(3) ROWS_INT_CASE(2) ROWS_INT_CASE(1) }
}

NOINLINE void one_i8(const int8_t *w, const float *scale, int K, int G, const int32_t *q, float dq, __m256 acc[4]) {
    switch (G) {
    case 1: one_int(w, scale, K, 1, q, dq, acc); break;
    case 2: one_int(w, scale, K, 2, q, dq, acc); break;
    case 3: one_int(w, scale, K, 3, q, dq, acc); break;
    default: one_int(w, scale, K, 4, q, dq, acc); break;
    }
}

static void panel_i8(const int8_t *w, const float *scale, int K, int G, const float *x, size_t stride,
                     __m256 (*acc)[4], int g) {
    const size_t qs = (size_t)K / 2;
    int32_t q[4 * qs];                            /* four streams' x as int16 pairs */
    float dq[4];
    for (int j0 = 0; j0 < g; j0 += 4) {           /* four streams at a time, two vectors at a time */
        const int R = g - j0 < 4 ? g - j0 : 4;
        for (int j = 0; j < R; j++) dq[j] = quantize(x + (size_t)(j0 + j) * stride, K, q + j * qs);
        if (g == 1) {
            one_i8(w, scale, K, G, q, dq[0], acc[0]);
            return;
        }
        for (int c = 0; c < G; c += 2)
            rows_i8(w, scale, K, 8 * G, q, qs, dq, acc + j0, c, G - c < 2 ? G - c : 2, R);
    }
}

/* ---------------------------------------------------------------- dispatch */

typedef void (*RowsFn)(const void *, size_t, int, int, const float *, size_t, __m256 (*)[4], int, int, int);
typedef void (*OneFn)(const void *, size_t, int, int, const float *, __m256 *);

void charlstm_panel(int precision, const void *w, size_t off, const float *scale, int K, int G, const float *x,
                    size_t stride, __m256 (*acc)[4], int g) {
    if (precision == I8) {
        panel_i8((const int8_t *)w + off, scale, K, G, x, stride, acc, g);
        return;
    }
    const RowsFn rows_fn = precision == F16 ? rows_f16 : rows_f32;
    if (g == 1) {
        (precision == F16 ? one_f16 : one_f32)(w, off, K, G, x, acc[0]);
        return;
    }
    for (int j = 0; j < g; j += 6)           /* six streams at a time, two vectors at a time */
        for (int c = 0; c < G; c += 2)
            rows_fn(w, off, K, 8 * G, x + (size_t)j * stride, stride, acc + j, c, G - c < 2 ? G - c : 2,
                    g - j < 6 ? g - j : 6);
}
