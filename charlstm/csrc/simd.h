/* Vector helpers shared by charlstm's native kernels (x86-64, AVX2 + FMA + F16C): loads of
 * float32 or float16 weights, exp / sigmoid / tanh on 8 lanes, and the panel products.
 *
 * A panel is 8G columns of a weight matrix stored row after row, (K, 8G): the G gates of
 * 8 hidden units side by side, so that a pass over a panel ends with everything those
 * units' update needs. The cell kinds are numbered alike in every kernel. */
#ifndef CHARLSTM_SIMD_H
#define CHARLSTM_SIMD_H

#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>

#define INLINE static inline __attribute__((always_inline))

enum { LSTM = 0, PEEPHOLE = 1, COUPLED = 2, GRU = 3, RNN = 4, GRU_CHO = 5 };

/* Gate blocks of a cell kind: 4 for the lstm and the peephole lstm, 3 for coupled and gru, 1 for rnn. */
INLINE int gates_of(int kind) { return kind == LSTM || kind == PEEPHOLE ? 4 : kind == RNN ? 1 : 3; }

INLINE __m256 load8(const void *w, size_t i, int half) {
    if (half)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + i)));
    return _mm256_loadu_ps((const float *)w + i);
}

/* exp(x) for float32 lanes: range reduction by ln 2 and a degree-6 polynomial
 * (relative error ~2e-7); inputs clamped to [-87.3, 88.3]. */
INLINE __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);      /* ln 2 in two parts */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

INLINE __m256 sigmoid8(__m256 x) {
    __m256 one = _mm256_set1_ps(1.0f);
    return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

/* tanh(x) = sign(x) (1 - e) / (1 + e) with e = exp(-2|x|) */
INLINE __m256 tanh8(__m256 x) {
    __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 ax = _mm256_andnot_ps(sign, x);
    __m256 e = exp8(_mm256_mul_ps(ax, _mm256_set1_ps(-2.0f)));
    __m256 one = _mm256_set1_ps(1.0f);
    __m256 t = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
    return _mm256_or_ps(t, _mm256_and_ps(sign, x));
}

/* acc[0 .. G-1] += x (K) @ one panel of G vectors (rows 8G floats long), one stream. One
 * stream's multiply-adds would wait for each other (each accumulator's previous one), so
 * consecutive rows go to separate sets of accumulators, summed at the end: two sets for
 * 3 or 4 vectors, eight for one. */
INLINE void panel_one(const void *w, size_t off, int K, int G, const float *x, __m256 acc[4], int half) {
    const int U = G == 1 ? 8 : 2, width = 8 * G;
    __m256 a[8][4];
    for (int u = 0; u < U; u++)
        for (int c = 0; c < G; c++) a[u][c] = u == 0 ? acc[c] : _mm256_setzero_ps();
    int k = 0;
    for (; k + U <= K; k += U)
        for (int u = 0; u < U; u++) {
            const size_t o = off + (size_t)(k + u) * width;
            const __m256 xb = _mm256_broadcast_ss(x + k + u);
            for (int c = 0; c < G; c++) a[u][c] = _mm256_fmadd_ps(xb, load8(w, o + 8 * c, half), a[u][c]);
        }
    for (; k < K; k++) {
        const size_t o = off + (size_t)k * width;
        const __m256 xb = _mm256_broadcast_ss(x + k);
        for (int c = 0; c < G; c++) a[0][c] = _mm256_fmadd_ps(xb, load8(w, o + 8 * c, half), a[0][c]);
    }
    for (int c = 0; c < G; c++) {
        __m256 t = a[0][c];
        for (int u = 1; u < U; u++) t = _mm256_add_ps(t, a[u][c]);
        acc[c] = t;
    }
}

/* acc[j][col .. col + nc - 1] += x_j (K) @ nc vectors of 8 columns of a panel whose rows are
 * `width` floats long (32 for 4 gates of 8 units, 24 for 3), for R <= 6 streams whose inputs
 * are `stride` floats apart: each weight vector is loaded once for all R streams, and the
 * R * nc accumulators stay in registers. */
INLINE void rows(const void *w, size_t off, int K, int width, const float *x, size_t stride, __m256 acc[][4],
                 int col, int nc, int R, int half) {
    __m256 a[6][2];
    for (int j = 0; j < R; j++)
        for (int c = 0; c < nc; c++) a[j][c] = acc[j][col + c];
    for (int k = 0; k < K; k++) {
        size_t o = off + (size_t)k * width + (size_t)col * 8;
        __m256 w0 = load8(w, o, half), w1 = nc == 2 ? load8(w, o + 8, half) : w0;
        for (int j = 0; j < R; j++) {
            __m256 xj = _mm256_broadcast_ss(x + (size_t)j * stride + k);
            a[j][0] = _mm256_fmadd_ps(xj, w0, a[j][0]);
            if (nc == 2) a[j][1] = _mm256_fmadd_ps(xj, w1, a[j][1]);
        }
    }
    for (int j = 0; j < R; j++)
        for (int c = 0; c < nc; c++) acc[j][col + c] = a[j][c];
}

/* `rows` with R and nc constants, so that its loops unroll and its arrays live in registers. */
#define ROWS_CASE(r)                                                          \
    case r:                                                                   \
        if (nc == 2) rows(w, off, K, width, x, stride, acc, col, 2, r, half); \
        else rows(w, off, K, width, x, stride, acc, col, 1, r, half);         \
        break;
INLINE void rows_n(const void *w, size_t off, int K, int width, const float *x, size_t stride, __m256 acc[][4],
                   int col, int nc, int R, int half) {
    switch (R) {
    ROWS_CASE(6) ROWS_CASE(5) ROWS_CASE(4) ROWS_CASE(3) ROWS_CASE(2)
    default:
        if (nc == 2) rows(w, off, K, width, x, stride, acc, col, 2, 1, half);
        else rows(w, off, K, width, x, stride, acc, col, 1, 1, half);
    }
}
#undef ROWS_CASE

/* acc[j][0 .. G-1] += x_j (K) @ one panel of G vectors (width 8G) at `off`, for g streams whose
 * inputs are `stride` floats apart: six streams at a time, two vectors at a time. */
INLINE void panel_rows(const void *w, size_t off, int K, int G, const float *x, size_t stride, __m256 acc[][4],
                       int g, int half) {
    if (g == 1) {
        panel_one(w, off, K, G, x, acc[0], half);
        return;
    }
    for (int j = 0; j < g; j += 6)
        for (int c = 0; c < G; c += 2)
            rows_n(w, off, K, 8 * G, x + (size_t)j * stride, stride, acc + j, c, G - c < 2 ? G - c : 2,
                   g - j < 6 ? g - j : 6, half);
}

INLINE void load_init(__m256 a[4], const float *p) {
    for (int j = 0; j < 4; j++) a[j] = _mm256_loadu_ps(p + 8 * j);
}

#endif
