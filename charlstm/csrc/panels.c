/* The panel product of charlstm's native kernels (AVX2 + FMA + F16C): acc += x @ panel, for
 * float32, float16 or int8 weights (converted to float32 in registers; all arithmetic float32).
 *
 * Every kernel spends its time here, so this is the one place compiled with the loop shapes
 * as constants: one copy per weight type x number of streams (1-6) x vectors (1-2) for several
 * streams, and per weight type x gates (1-4) for one stream. The kernels call it once per panel,
 * which costs nothing beside a pass over K rows. */
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
    if (prec == I8)
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)w + i))));
    return _mm256_loadu_ps((const float *)w + i);
}

/* The sums of int8 weights start from zero and are scaled into acc at the end; float sums
 * start from acc. */
INLINE __m256 start(const __m256 a, int prec) { return prec == I8 ? _mm256_setzero_ps() : a; }
INLINE __m256 finish(__m256 sum, __m256 a, const float *scale, int prec) {
    return prec == I8 ? _mm256_fmadd_ps(sum, _mm256_loadu_ps(scale), a) : sum;
}

/* One stream, a panel of G vectors (rows 8G long). One stream's multiply-adds would wait for
 * each other (each accumulator's previous one), so consecutive rows go to separate sets of
 * accumulators, summed at the end: eight sets for one vector, four for two, two for 3 or 4. */
INLINE void one(const void *w, size_t off, const float *scale, int K, int G, const float *x, __m256 acc[4],
                int prec) {
    const int U = G == 1 ? 8 : G == 2 ? 4 : 2, width = 8 * G;
    __m256 a[8][4];
    UNROLL(8) for (int u = 0; u < U; u++)
        UNROLL(4) for (int c = 0; c < G; c++) a[u][c] = u == 0 ? start(acc[c], prec) : _mm256_setzero_ps();
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
        acc[c] = finish(t, acc[c], scale + 8 * c, prec);
    }
}

/* acc[j][col .. col + nc - 1] += x_j (K) @ nc vectors of 8 columns of a panel whose rows are
 * `width` floats long, for R <= 6 streams whose inputs are `stride` floats apart: each weight
 * vector is loaded once for all R streams, and the R * nc accumulators stay in registers. */
INLINE void rows(const void *w, size_t off, const float *scale, int K, int width, const float *x, size_t stride,
                 __m256 (*acc)[4], int col, int nc, int R, int prec) {
    __m256 a[6][2];
    UNROLL(6) for (int j = 0; j < R; j++)
        UNROLL(2) for (int c = 0; c < nc; c++) a[j][c] = start(acc[j][col + c], prec);
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
        UNROLL(2) for (int c = 0; c < nc; c++) acc[j][col + c] = finish(a[j][c], acc[j][col + c], scale + 8 * (col + c), prec);
}

#define ROWS_CASE(P, r)                                                          \
    case r:                                                                      \
        if (nc == 2) rows(w, off, scale, K, width, x, stride, acc, col, 2, r, P); \
        else rows(w, off, scale, K, width, x, stride, acc, col, 1, r, P);         \
        break;

/* The copies with constant shapes, per weight type P. */
#define DEFINE_PRODUCTS(NAME, P)                                                                         \
    NOINLINE void rows_##NAME(const void *w, size_t off, const float *scale, int K, int width, const float *x, \
                              size_t stride, __m256 (*acc)[4], int col, int nc, int R) {                 \
        switch (R) {                                                                                     \
        ROWS_CASE(P, 6) ROWS_CASE(P, 5) ROWS_CASE(P, 4) ROWS_CASE(P, 3) ROWS_CASE(P, 2) ROWS_CASE(P, 1)  \
        }                                                                                                \
    }                                                                                                    \
    NOINLINE void one_##NAME(const void *w, size_t off, const float *scale, int K, int G, const float *x, \
                             __m256 acc[4]) {                                                            \
        switch (G) {                                                                                     \
        case 1: one(w, off, scale, K, 1, x, acc, P); break;                                              \
        case 2: one(w, off, scale, K, 2, x, acc, P); break;                                              \
        case 3: one(w, off, scale, K, 3, x, acc, P); break;                                              \
        default: one(w, off, scale, K, 4, x, acc, P); break;                                             \
        }                                                                                                \
    }

DEFINE_PRODUCTS(f32, F32)
DEFINE_PRODUCTS(f16, F16)
DEFINE_PRODUCTS(i8, I8)

typedef void (*RowsFn)(const void *, size_t, const float *, int, int, const float *, size_t, __m256 (*)[4], int, int,
                       int);
typedef void (*OneFn)(const void *, size_t, const float *, int, int, const float *, __m256 *);

void charlstm_panel(int precision, const void *w, size_t off, const float *scale, int K, int G, const float *x,
                    size_t stride, __m256 (*acc)[4], int g) {
    static const RowsFn rows_of[PRECISION_COUNT] = {rows_f32, rows_f16, rows_i8};
    static const OneFn one_of[PRECISION_COUNT] = {one_f32, one_f16, one_i8};
    if (g == 1) {
        one_of[precision](w, off, scale, K, G, x, acc[0]);
        return;
    }
    for (int j = 0; j < g; j += 6)           /* six streams at a time, two vectors at a time */
        for (int c = 0; c < G; c += 2)
            rows_of[precision](w, off, scale, K, 8 * G, x + (size_t)j * stride, stride, acc + j, c,
                               G - c < 2 ? G - c : 2, g - j < 6 ? g - j : 6);
}
