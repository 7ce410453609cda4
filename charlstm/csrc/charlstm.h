/* What charlstm's native kernels share: the cell kinds, the weight types, the two structs that
 * Python fills (mirrored by charlstm/native/abi.py and checked against abi.c's tables when the
 * library is loaded) and the panel product (panels.c).
 *
 * A panel is 8G columns of a weight matrix stored row after row, (K, 8G): the G gates of 8
 * hidden units side by side, so that a pass over a panel ends with everything those units'
 * update needs. A matrix is its panels one after the other, (P, K, 8G). */
#ifndef CHARLSTM_H
#define CHARLSTM_H

#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>

#define CHARLSTM_ABI 2           /* raise with any change of the structs, enums or entry points */

/* cell kinds; abi.c names them, abi.py's KINDS must list the same names in this order */
enum { LSTM, PEEPHOLE, COUPLED, GRU, RNN, GRU_CHO, PEEPHOLE_FULL, KIND_COUNT };
/* weight types of the sampling step (the training loops are float32) */
enum { F32, F16, I8, PRECISION_COUNT };

/* A weight matrix in panels, (P, K, 8G) in the net's type; int8: the rows of each panel in pairs,
 * (P, K/2, 8G, 2), and s holds a scale per column, (P, 8G) (the weight is q * s); else s is NULL. */
typedef struct {
    const void *w;
    const float *s;
} Mat;

/* The sampling step's model and state (sample_step.c). */
typedef struct {
    int32_t kind, L, H, V, B;    /* cell kind, layers, hidden units, vocabulary, streams */
    int32_t precision;           /* F32, F16 or I8: the type of every Mat */
    int32_t threads;             /* threads sharing out each step (OpenMP; 1 without it) */
    int32_t reserved;
    const float *table;          /* (V, H/8, 8G) layer 0's input pre-activation per character (cho: r, z) */
    const float *table2;         /* cho: (V, H/8, 8) n's */
    const Mat *w;                /* L: layer 0 U^T (H/8, H, 8G); k >= 1 [W; U]^T (H/8, 2H, 8G); gru, cho: W^T alone */
    const Mat *wh;               /* gru, cho: L recurrent U^T (H/8, H, 8G) (cho: r, z); else NULL */
    const Mat *w2, *wh2;         /* cho: L W_n^T (k >= 1), U_n^T (H/8, H, 8) */
    const Mat *pif, *po;         /* peephole full: L P_if^T (H/8, H, 16) and P_o^T (H/8, H, 8) */
    const float *const *b;       /* L: layer k >= 1's biases (H/8, 8G) (gru: b_ih; cho: r, z); b[0] unused */
    const float *const *bh;      /* gru: L b_hh (H/8, 24) or NULL (no biases) */
    const float *const *b2;      /* cho: L b_n (H/8, 8), k >= 1 */
    const float *const *peep;    /* peephole diag: L (3, H) p_i, p_f, p_o */
    Mat head;                    /* (Vp/32, H, 32), V padded to Vp with zero columns */
    const float *head_b;         /* (Vp,) */
    float *aux;                  /* (2, B, H) scratch */
    float *z;                    /* (B, L*H) the hidden states of all layers of each stream side by side */
    float *c;                    /* (L, B, H) the lstm family's cell states */
    float *logits;               /* (B, V) */
    float *hnew;                 /* (B, H) scratch */
} Net;

/* One layer's window for the training loops (train_loops.c), every array float32. */
typedef struct {
    int32_t kind, T, B, H, threads;
    int32_t units;       /* units per forward panel: 8, or 16 for the rnn (two vectors a pass; H a multiple of 16) */
    float *gates;        /* (T, B, G*H) in: W x_t + b; out: the activated gates, torch's order (rnn: h_t) */
    const float *wf;     /* (H/8, H, 8G) U^T in panels of 8 units, gates in slot order (cho: U_rz^T; rnn: (H/units, H, units)) */
    const float *wb;     /* (ceil(H/32), G*H, 32) U in panels of 32 output units, the last maybe narrower */
    const float *bh;     /* gru: b_hh (3H) or NULL */
    const float *peep;   /* peephole diag: (3, H) p_i, p_f, p_o */
    float *hs;           /* (T + 1, B, H) h_{-1} = h0 .. h_{T-1} */
    float *cs;           /* (T + 1, B, H) c_{-1} = c0 .. (lstm family; else NULL) */
    float *tcs;          /* (T, B, H) tanh(c_t) (lstm family); gru: U_n h_{t-1} + b_hn; else NULL */
    const float *dhs;    /* (T, B, H) gradient arriving at each h_t from above */
    float *dpre;         /* (T, B, G*H) out: gradient of the pre-activations W x_t + b */
    float *dph;          /* gru: (T, B, 3H) out: gradient of U h_{t-1} + b_hh; else NULL */
    float *dh;           /* (B, H) out: gradient of h0 */
    float *dc;           /* (B, H) in: gradient of c_T; out: that of c0 (gru, cho: scratch; rnn: NULL) */
    const float *wf2;    /* cho: U_n^T (H/8, H, 8) */
    const float *wb2;    /* cho: U_n (ceil(H/32), H, 32) (wb holds U_rz) */
    float *rh;           /* cho: (T, B, H) r * h_{t-1} */
    float *drh;          /* cho: (B, H) scratch */
    const float *pf;     /* peephole full: P_if^T (H/8, H, 16) */
    const float *po;     /* peephole full: P_o^T (H/8, H, 8) */
    const float *pbf;    /* peephole full: P_if (ceil(H/32), 2H, 32) */
    const float *pbo;    /* peephole full: P_o (ceil(H/32), H, 32) */
} Seq;

#define HIDDEN __attribute__((visibility("hidden")))

/* acc[j][0 .. G-1] += x_j (K) @ one panel (K rows of 8G weights at element `off` of w), for g
 * streams whose inputs are `stride` floats apart (panels.c); int8: `scale` is the panel's 8G
 * column scales. */
HIDDEN void charlstm_panel(int precision, const void *w, size_t off, const float *scale, int K, int G,
                           const float *x, size_t stride, __m256 (*acc)[4], int g);

HIDDEN int charlstm_gates(int kind);
/* which of the cell's gate blocks sits in slot s of a panel: table 0 the training loops', 1 the step's */
HIDDEN int charlstm_slot_block(int table, int kind, int s);

#endif
