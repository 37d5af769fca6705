/* What the kernel's C files share: the vector types, the panel width, the
 * float32 panel routine, and the worker pool that splits a product into units.
 *
 * A weight is multiplied by activation rows panel by panel: a panel is 32
 * output columns. Every output element is one accumulator that starts at zero
 * and takes one fused multiply-add per input index k, in order 0..K-1, with
 * the bias added last; so a row's result never depends on how many rows share
 * the call, nor on which thread computed its panel. */
#ifndef AITBC_KERNEL_H
#define AITBC_KERNEL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef float vec16 __attribute__((vector_size(64)));
typedef float vec16_unaligned __attribute__((vector_size(64), aligned(4)));

#define PANEL 32

/* The end of a row group: each row's two accumulators plus the bias (NULL: none),
   its first `columns` outputs stored at y, ldy apart. One definition, so the float32
   and block routines finish every output the same way. */
static inline void store_rows(int rows, const vec16 *lo, const vec16 *hi, const float *bias,
                              float *y, ptrdiff_t ldy, ptrdiff_t columns) {
    vec16 b_lo = (vec16){0}, b_hi = (vec16){0};
    if (bias) {
        b_lo = *(const vec16_unaligned *)bias;
        b_hi = *(const vec16_unaligned *)(bias + 16);
    }
    for (int r = 0; r < rows; r++) {
        float out[PANEL];
        *(vec16_unaligned *)out = lo[r] + b_lo;
        *(vec16_unaligned *)(out + 16) = hi[r] + b_hi;
        memcpy(y + r * ldy, out, (size_t)columns * sizeof(float));
    }
}

/* y[m][0..columns) = x[m] . panel (+ bias) for m < m_len, where panel holds
   k_len rows of PANEL floats (one per output column, zero-padded). */
void panel_product(ptrdiff_t m_len, ptrdiff_t k_len, const float *x, ptrdiff_t ldx,
                   const float *panel, const float *bias, float *y, ptrdiff_t ldy,
                   ptrdiff_t columns);

/* One unit of a product: computes its share of the outputs, touching nothing else. */
typedef void (*unit_fn)(const void *task, long unit);

/* Run units 0..units-1 of `task` on up to `threads` threads (the caller and
   pool workers). Units are taken one at a time from a shared counter, so a
   worker that the system deschedules holds back only the unit it took. When
   another thread is using the pool, the caller runs every unit itself. Returns
   when every unit is done. Denormals are flushed to zero while units run. */
void pool_run(unit_fn run, const void *task, long units, int threads);

/* Units to cut `panels` panels into for `threads` threads: small enough that a
   late thread leaves little behind, large enough to pay for taking one. */
long pool_units(long panels, int threads);

/* The panels [*first, *last) that unit `unit` of `units` computes, of `panels` in all. */
static inline void unit_panels(long unit, long units, ptrdiff_t panels, ptrdiff_t *first,
                               ptrdiff_t *last) {
    *first = panels * unit / units;
    *last = panels * (unit + 1) / units;
}

/* The output columns of panel p of a weight with n_len outputs: PANEL, fewer in the last. */
static inline ptrdiff_t panel_columns(ptrdiff_t n_len, ptrdiff_t p) {
    return n_len - p * PANEL < PANEL ? n_len - p * PANEL : PANEL;
}

/* Denormal inputs and results are taken as zero (the MXCSR's DAZ and FTZ bits) while
   units run: on x86 every arithmetic step that meets a denormal otherwise takes a
   slow microcode path, and a few prompts drive activations that low. */
#if defined(__x86_64__) || defined(__i386__)
#define FLUSH_DENORMALS 0x8040u
static inline unsigned enter_flush(void) {
    unsigned saved = __builtin_ia32_stmxcsr();
    __builtin_ia32_ldmxcsr(saved | FLUSH_DENORMALS);
    return saved;
}
static inline void leave_flush(unsigned saved) { __builtin_ia32_ldmxcsr(saved); }
#else
static inline unsigned enter_flush(void) { return 0; }
static inline void leave_flush(unsigned saved) { (void)saved; }
#endif

/* A weight kept as blocks (blockgemm.c's layout), as the caller binds it once
   (engine/kernels/blocks.py), so that a product passes five arguments, not thirteen. */
typedef struct {
    int32_t kind, half;
    ptrdiff_t group, n_len, k_len;
    const uint8_t *blocks;
    const float *bias;
} bound_weight;

/* y = x . W^T (+ bias) for m_len contiguous rows of x (k_len floats each) into
   m_len contiguous rows of y (n_len floats each). Returns 0, or -1 when the weight
   describes no layout. */
int blockgemm_bound(const bound_weight *w, ptrdiff_t m_len, const float *x, float *y,
                    int threads);

/* The same product into rows of y that are ldy floats apart (a part of a wider row). */
int blockgemm_into(const bound_weight *w, ptrdiff_t m_len, const float *x, float *y,
                   ptrdiff_t ldy, int threads);

#endif
