/* What the library says about itself, so that Python can check it before calling anything
 * (charlstm/native/abi.py): the ABI version, the kind and type names in enum order, every
 * struct's field names, offsets and size, and the slot tables (which gate block sits in which
 * slot of a panel). */
#include <stddef.h>

#include "charlstm.h"

static const char *const KIND_NAMES[KIND_COUNT] = {"lstm", "peephole", "coupled", "gru", "rnn", "gru_cho",
                                                   "peephole_full"};
static const char *const PRECISION_NAMES[PRECISION_COUNT] = {"fp32", "fp16", "int8"};
static const int GATES[KIND_COUNT] = {4, 4, 3, 3, 1, 3, 4};

/* SLOTS[table][kind][s]: the training loops' panels put the sigmoid gates first (lstm, peephole:
 * i, f, o, g; coupled: f, o, g); the sampling step's follow stepweights.py (lstm i, f, o, g;
 * coupled f, o, g; the peepholes torch's i, f, g, o). */
static const int SLOTS[2][KIND_COUNT][4] = {
    {{0, 1, 3, 2}, {0, 1, 3, 2}, {0, 2, 1}, {0, 1, 2}, {0}, {0, 1, 2}, {0, 1, 3, 2}},
    {{0, 1, 3, 2}, {0, 1, 2, 3}, {0, 2, 1}, {0, 1, 2}, {0}, {0, 1, 2}, {0, 1, 2, 3}},
};

int charlstm_gates(int kind) { return GATES[kind]; }
int charlstm_slot_block(int table, int kind, int s) { return SLOTS[table][kind][s]; }

typedef struct {
    const char *name;
    int64_t offset;
} Field;

#define FIELD(S, f) {#f, (int64_t)offsetof(S, f)}

static const Field MAT_FIELDS[] = {FIELD(Mat, w), FIELD(Mat, s), {NULL, sizeof(Mat)}};
static const Field NET_FIELDS[] = {
    FIELD(Net, kind), FIELD(Net, L), FIELD(Net, H), FIELD(Net, V), FIELD(Net, B), FIELD(Net, precision),
    FIELD(Net, threads), FIELD(Net, reserved), FIELD(Net, table), FIELD(Net, table2), FIELD(Net, w),
    FIELD(Net, wh), FIELD(Net, w2), FIELD(Net, wh2), FIELD(Net, pif), FIELD(Net, po), FIELD(Net, b),
    FIELD(Net, bh), FIELD(Net, b2), FIELD(Net, peep), FIELD(Net, head), FIELD(Net, head_b), FIELD(Net, aux),
    FIELD(Net, z), FIELD(Net, c), FIELD(Net, logits), FIELD(Net, hnew), {NULL, sizeof(Net)}};
static const Field SEQ_FIELDS[] = {
    FIELD(Seq, kind), FIELD(Seq, T), FIELD(Seq, B), FIELD(Seq, H), FIELD(Seq, threads), FIELD(Seq, units),
    FIELD(Seq, gates), FIELD(Seq, wf), FIELD(Seq, wb), FIELD(Seq, bh), FIELD(Seq, peep), FIELD(Seq, hs),
    FIELD(Seq, cs), FIELD(Seq, tcs), FIELD(Seq, dhs), FIELD(Seq, dpre), FIELD(Seq, dph), FIELD(Seq, dh),
    FIELD(Seq, dc), FIELD(Seq, wf2), FIELD(Seq, wb2), FIELD(Seq, rh), FIELD(Seq, drh), FIELD(Seq, pf),
    FIELD(Seq, po), FIELD(Seq, pbf), FIELD(Seq, pbo), {NULL, sizeof(Seq)}};
static const Field *const STRUCTS[] = {MAT_FIELDS, NET_FIELDS, SEQ_FIELDS};

int32_t charlstm_abi_version(void) { return CHARLSTM_ABI; }

/* The name of kind k (NULL past the last). */
const char *charlstm_kind_name(int32_t k) { return k >= 0 && k < KIND_COUNT ? KIND_NAMES[k] : NULL; }

/* The name of weight type k (NULL past the last). */
const char *charlstm_precision_name(int32_t k) { return k >= 0 && k < PRECISION_COUNT ? PRECISION_NAMES[k] : NULL; }

/* Field i of struct `which` (0 Mat, 1 Net, 2 Seq): its name and, in *offset, its offset; past the
 * last field NULL and the struct's size. */
const char *charlstm_field(int32_t which, int32_t i, int64_t *offset) {
    if (which < 0 || which > 2 || i < 0) return NULL;
    const Field *f = STRUCTS[which];
    int n = 0;
    while (f[n].name) n++;
    if (i > n) return NULL;
    *offset = f[i].offset;
    return f[i].name;
}

/* The gate block in slot s of kind k's panels (table 0: the training loops, 1: the sampling
 * step); -1 past the kind's gates or for a bad argument. */
int32_t charlstm_slot(int32_t table, int32_t k, int32_t s) {
    if (table < 0 || table > 1 || k < 0 || k >= KIND_COUNT || s < 0 || s >= GATES[k]) return -1;
    return SLOTS[table][k][s];
}
