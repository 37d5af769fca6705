/* Row-invariant product of activation rows with a packed float32 weight.
 *
 * y[M][N] = x[M][K] . W[N][K]^T (+ bias[N]), where W is stored packed as
 * P[ceil(N/32)][K][32]: panel b holds output columns 32b..32b+31 for every k,
 * so one panel is one contiguous stream, zero-padded past N.
 *
 * Every output element is computed the same way whatever M is (see kernel.h):
 * one accumulator, one fused multiply-add per k in order, the bias last. Rows
 * are taken eight at a time (the weight panel is read once for all of them and
 * stays in L2 between row groups); a remainder of one to seven rows has its
 * own unrolled routine with the same arithmetic. The panels are shared among
 * the pool's threads in units (pool.c). The block kernel (blockgemm.c) widens
 * quantized panels into this same routine for long inputs.
 */
#include <string.h>

#include "kernel.h"

/* Prefetch this many floats ahead in the panel stream (8 KiB), so that the next
   rows of the weight are on their way from memory while these are multiplied. */
#define PREFETCH_AHEAD 2048

#define ROW_GROUP(ROWS)                                                              \
static void row_group_##ROWS(ptrdiff_t k_len, const float *x, ptrdiff_t ldx,         \
                             const float *panel, const float *bias, float *y,        \
                             ptrdiff_t ldy, ptrdiff_t columns) {                     \
    vec16 lo[ROWS], hi[ROWS];                                                        \
    for (int r = 0; r < ROWS; r++) { lo[r] = (vec16){0}; hi[r] = (vec16){0}; }       \
    for (ptrdiff_t k = 0; k < k_len; k++) {                                          \
        const float *w = panel + k * PANEL;                                          \
        __builtin_prefetch(w + PREFETCH_AHEAD);                                      \
        __builtin_prefetch(w + PREFETCH_AHEAD + 16);                                 \
        vec16 w_lo = *(const vec16_unaligned *)w;                                    \
        vec16 w_hi = *(const vec16_unaligned *)(w + 16);                             \
        for (int r = 0; r < ROWS; r++) {                                             \
            float xv = x[r * ldx + k];                                               \
            lo[r] += xv * w_lo;                                                      \
            hi[r] += xv * w_hi;                                                      \
        }                                                                            \
    }                                                                                \
    store_rows(ROWS, lo, hi, bias, y, ldy, columns);                                 \
}

ROW_GROUP(1) ROW_GROUP(2) ROW_GROUP(3) ROW_GROUP(4)
ROW_GROUP(5) ROW_GROUP(6) ROW_GROUP(7) ROW_GROUP(8)

typedef void (*row_group_fn)(ptrdiff_t, const float *, ptrdiff_t, const float *,
                             const float *, float *, ptrdiff_t, ptrdiff_t);
static const row_group_fn row_groups[9] = {
    0, row_group_1, row_group_2, row_group_3, row_group_4,
    row_group_5, row_group_6, row_group_7, row_group_8,
};

/* The panel width, so the caller can check it packed weights the same way. */
int rowgemm_panel_width(void) { return PANEL; }

void panel_product(ptrdiff_t m_len, ptrdiff_t k_len, const float *x, ptrdiff_t ldx,
                   const float *panel, const float *bias, float *y, ptrdiff_t ldy,
                   ptrdiff_t columns) {
    ptrdiff_t m = 0;
    for (; m + 8 <= m_len; m += 8)
        row_group_8(k_len, x + m * ldx, ldx, panel, bias, y + m * ldy, ldy, columns);
    if (m < m_len)
        row_groups[m_len - m](k_len, x + m * ldx, ldx, panel, bias, y + m * ldy, ldy, columns);
}

typedef struct {
    ptrdiff_t m_len, n_len, k_len, ldx, ldy, panels;
    const float *x, *packed, *bias;
    float *y;
    long units;
} product;

static void run_unit(const void *task, long unit) {
    const product *t = task;
    ptrdiff_t first, last;
    unit_panels(unit, t->units, t->panels, &first, &last);
    for (ptrdiff_t p = first; p < last; p++) {
        ptrdiff_t n0 = p * PANEL;
        panel_product(t->m_len, t->k_len, t->x, t->ldx, t->packed + p * t->k_len * PANEL,
                      t->bias ? t->bias + n0 : NULL, t->y + n0, t->ldy,
                      panel_columns(t->n_len, p));
    }
}

/* y = x . W^T (+ bias). x: M rows of K floats, ldx apart; packed: the weight as
   described above; bias: ceil(N/32)*32 floats (zero-padded) or NULL; y: M rows
   of N floats, ldy apart; up to `threads` threads. */
void rowgemm(ptrdiff_t m_len, ptrdiff_t n_len, ptrdiff_t k_len,
             const float *x, ptrdiff_t ldx, const float *packed, const float *bias,
             float *y, ptrdiff_t ldy, int threads) {
    product t = {m_len, n_len, k_len, ldx, ldy, (n_len + PANEL - 1) / PANEL,
                 x, packed, bias, y, 1};
    t.units = pool_units(t.panels, threads);
    pool_run(run_unit, &t, t.units, threads);
}
