/* Row-invariant product of activation rows with a weight kept in quantized blocks.
 *
 * The weight stays in the GGUF's quantized form, regrouped at load time into
 * panels of 32 output columns (see engine/kernels/blocks.py, which writes this
 * layout). Each panel is a run of groups; a group covers G consecutive inputs
 * k (G = 32, or 16 for Q6_K) for the panel's 32 columns:
 *
 *   BLOCK_NIB4 (Q4_0, Q4_1, Q4_K):  scale[32], offset[32], then for each of the
 *       32 k one 16-byte row whose byte j holds column j in its low nibble and
 *       column j + 16 in its high nibble: w = scale * q + offset;
 *   BLOCK_INT8 (Q8_0, Q6_K):         scale[32], then for each of the G k 32
 *       signed bytes, one per column: w = scale * q.
 *
 * Scales and offsets are half floats where the format's are (Q4_0, Q4_1,
 * Q8_0) and single floats where they are products of two stored numbers
 * (Q4_K's d * sc and dmin * m, Q6_K's d * scale), computed at load. Each
 * weight is widened in registers to the very float the GGUF's reference
 * de-quantization gives (scale * q is exact in single precision for every
 * format but Q6_K, whose one rounding is this same product), and is then
 * multiplied exactly as the float32 kernel multiplies its panels: one
 * accumulator per output, one fused multiply-add per k in order, bias last.
 * So a product equals the float32 kernel's on the de-quantized weight, bit
 * for bit, and rows stay independent of their neighbours.
 *
 * Up to eight rows are computed straight from the blocks (a decode step reads
 * a sixth of the float32 bytes); a longer input (a prompt) widens each panel
 * once into a per-thread buffer and runs the float32 routine on it for all
 * rows, so a prefill costs no more than the float32 kernel's.
 */
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "kernel.h"

#define BLOCK_NIB4 0
#define BLOCK_INT8 1
/* Q4_0: NIB4 with offset -8 * scale. Products are NIB4's (scale * q - 8 * scale is
   exact); a row lookup computes scale * (q - 8) as the reference does, so that even
   the sign of a zero weight under a negative scale is the reference's. */
#define BLOCK_NIB4_CENTERED 2
#define FUSED_ROWS 8

/* ------------------------------------------------------------ widening in registers */

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    uint32_t bits;
    if (exponent == 0x1f) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        bits = sign;
    } else {  /* subnormal half: a normal float */
        exponent = 113;
        while (!(mantissa & 0x400)) { mantissa <<= 1; exponent--; }
        bits = sign | (exponent << 23) | ((mantissa & 0x3ff) << 13);
    }
    float out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

/* 16 scales (half or single floats) from p as floats. */
static inline vec16 load_scales(const uint8_t *p, int half) {
    if (!half) return *(const vec16_unaligned *)p;
#if defined(__AVX512F__)
    return (vec16)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#elif defined(__F16C__)
    __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16)));
    vec16 out;
    memcpy(&out, &lo, 32);
    memcpy((char *)&out + 32, &hi, 32);
    return out;
#else
    vec16 out;
    for (int i = 0; i < 16; i++) {
        uint16_t h;
        memcpy(&h, p + 2 * i, 2);
        out[i] = half_to_float(h);
    }
    return out;
#endif
}

/* The 16 bytes at p as two vectors of small whole floats: low nibbles, high nibbles. */
static inline void widen_nibbles(const uint8_t *p, vec16 *low, vec16 *high) {
#if defined(__AVX512F__)
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    *low = (vec16)_mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
    *high = (vec16)_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
#elif defined(__AVX2__)
    __m128i bytes = _mm_loadu_si128((const __m128i *)p);
    __m256i a = _mm256_cvtepu8_epi32(bytes), b = _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8));
    __m256i nib = _mm256_set1_epi32(15);
    __m256 parts[4] = {_mm256_cvtepi32_ps(_mm256_and_si256(a, nib)),
                       _mm256_cvtepi32_ps(_mm256_and_si256(b, nib)),
                       _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4)),
                       _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4))};
    memcpy(low, parts, 64);
    memcpy(high, parts + 2, 64);
#else
    for (int i = 0; i < 16; i++) {
        (*low)[i] = (float)(p[i] & 15);
        (*high)[i] = (float)(p[i] >> 4);
    }
#endif
}

/* The 16 signed bytes at p as a vector of whole floats. */
static inline vec16 widen_bytes(const int8_t *p) {
#if defined(__AVX512F__)
    return (vec16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#elif defined(__AVX2__)
    __m128i bytes = _mm_loadu_si128((const __m128i *)p);
    __m256 parts[2] = {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)),
                       _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8)))};
    vec16 out;
    memcpy(&out, parts, 64);
    return out;
#else
    vec16 out;
    for (int i = 0; i < 16; i++) out[i] = (float)p[i];
    return out;
#endif
}

/* ------------------------------------------------------------ layout */

typedef struct {
    int kind, half;
    ptrdiff_t group;        /* inputs per group: 32, or 16 */
    ptrdiff_t group_bytes;  /* bytes per group of one panel */
    ptrdiff_t panel_bytes;  /* bytes per panel */
} layout;

static int describe(int kind, int half, ptrdiff_t group, ptrdiff_t k_len, layout *out) {
    ptrdiff_t scale = half ? 2 : 4;
    if (group <= 0 || k_len % group != 0) return -1;
    if (kind == BLOCK_NIB4_CENTERED) kind = BLOCK_NIB4;
    out->kind = kind;
    out->half = half;
    out->group = group;
    if (kind == BLOCK_NIB4 && group == 32) out->group_bytes = 2 * PANEL * scale + group * 16;
    else if (kind == BLOCK_INT8) out->group_bytes = PANEL * scale + group * PANEL;
    else return -1;
    out->panel_bytes = (k_len / group) * out->group_bytes;
    return 0;
}

/* Bytes of a weight of n_len outputs and k_len inputs in this layout; -1 if it has none. */
ptrdiff_t blockgemm_bytes(int kind, int half, ptrdiff_t group, ptrdiff_t n_len, ptrdiff_t k_len) {
    layout l;
    if (describe(kind, half, group, k_len, &l) != 0) return -1;
    return ((n_len + PANEL - 1) / PANEL) * l.panel_bytes;
}

/* The 32 weights of input k (at offset kk in its group) of one group, widened. */
static inline void group_weights(const layout *l, const uint8_t *grp, ptrdiff_t kk,
                                 vec16 s_lo, vec16 s_hi, vec16 o_lo, vec16 o_hi,
                                 vec16 *w_lo, vec16 *w_hi) {
    ptrdiff_t scale = l->half ? 2 : 4;
    if (l->kind == BLOCK_NIB4) {
        vec16 q_lo, q_hi;
        widen_nibbles(grp + 2 * PANEL * scale + kk * 16, &q_lo, &q_hi);
        *w_lo = s_lo * q_lo + o_lo;  /* s * q is exact: one rounding, fused or not */
        *w_hi = s_hi * q_hi + o_hi;
    } else {
        const int8_t *q = (const int8_t *)(grp + PANEL * scale + kk * PANEL);
        *w_lo = s_lo * widen_bytes(q);
        *w_hi = s_hi * widen_bytes(q + 16);
    }
}

static inline void group_scales(const layout *l, const uint8_t *grp, vec16 *s_lo, vec16 *s_hi,
                                vec16 *o_lo, vec16 *o_hi) {
    ptrdiff_t scale = l->half ? 2 : 4;
    *s_lo = load_scales(grp, l->half);
    *s_hi = load_scales(grp + 16 * scale, l->half);
    if (l->kind == BLOCK_NIB4) {
        *o_lo = load_scales(grp + PANEL * scale, l->half);
        *o_hi = load_scales(grp + PANEL * scale + 16 * scale, l->half);
    } else {
        *o_lo = (vec16){0};
        *o_hi = (vec16){0};
    }
}

/* ------------------------------------------------------------ few rows: from the blocks */

#define FUSED(ROWS)                                                                         \
static void fused_##ROWS(const layout *l, ptrdiff_t k_len, const float *x, ptrdiff_t ldx,    \
                         const uint8_t *panel, const float *bias, float *y, ptrdiff_t ldy,  \
                         ptrdiff_t columns) {                                               \
    vec16 lo[ROWS], hi[ROWS];                                                               \
    for (int r = 0; r < ROWS; r++) { lo[r] = (vec16){0}; hi[r] = (vec16){0}; }              \
    ptrdiff_t groups = k_len / l->group;                                                    \
    for (ptrdiff_t g = 0; g < groups; g++) {                                                \
        const uint8_t *grp = panel + g * l->group_bytes;                                    \
        __builtin_prefetch(grp + l->group_bytes);                                           \
        __builtin_prefetch(grp + l->group_bytes + 64);                                      \
        vec16 s_lo, s_hi, o_lo, o_hi;                                                       \
        group_scales(l, grp, &s_lo, &s_hi, &o_lo, &o_hi);                                   \
        const float *xg = x + g * l->group;                                                 \
        for (ptrdiff_t kk = 0; kk < l->group; kk++) {                                       \
            if ((kk & 3) == 0) __builtin_prefetch(grp + 2 * l->group_bytes + kk * 16);      \
            vec16 w_lo, w_hi;                                                               \
            group_weights(l, grp, kk, s_lo, s_hi, o_lo, o_hi, &w_lo, &w_hi);                \
            for (int r = 0; r < ROWS; r++) {                                                \
                float xv = xg[r * ldx + kk];                                                \
                lo[r] += xv * w_lo;                                                         \
                hi[r] += xv * w_hi;                                                         \
            }                                                                               \
        }                                                                                   \
    }                                                                                       \
    store_rows(ROWS, lo, hi, bias, y, ldy, columns);                                        \
}

FUSED(1) FUSED(2) FUSED(3) FUSED(4) FUSED(5) FUSED(6) FUSED(7) FUSED(8)

typedef void (*fused_fn)(const layout *, ptrdiff_t, const float *, ptrdiff_t, const uint8_t *,
                         const float *, float *, ptrdiff_t, ptrdiff_t);
static const fused_fn fused[FUSED_ROWS + 1] = {
    0, fused_1, fused_2, fused_3, fused_4, fused_5, fused_6, fused_7, fused_8,
};

/* ------------------------------------------------------------ many rows: widen, then float32 */

static __thread float *scratch;
static __thread size_t scratch_floats;

static float *widened_panel(const layout *l, ptrdiff_t k_len, const uint8_t *panel) {
    size_t need = (size_t)k_len * PANEL;
    if (need > scratch_floats) {
        free(scratch);
        scratch = NULL;
        scratch_floats = 0;
        if (posix_memalign((void **)&scratch, 64, need * sizeof(float)) != 0) return NULL;
        scratch_floats = need;
    }
    ptrdiff_t groups = k_len / l->group;
    for (ptrdiff_t g = 0; g < groups; g++) {
        const uint8_t *grp = panel + g * l->group_bytes;
        vec16 s_lo, s_hi, o_lo, o_hi;
        group_scales(l, grp, &s_lo, &s_hi, &o_lo, &o_hi);
        for (ptrdiff_t kk = 0; kk < l->group; kk++) {
            vec16 w_lo, w_hi;
            group_weights(l, grp, kk, s_lo, s_hi, o_lo, o_hi, &w_lo, &w_hi);
            float *w = scratch + (g * l->group + kk) * PANEL;
            *(vec16_unaligned *)w = w_lo;
            *(vec16_unaligned *)(w + 16) = w_hi;
        }
    }
    return scratch;
}

static void panel_rows(const layout *l, ptrdiff_t m_len, ptrdiff_t k_len, const float *x,
                       ptrdiff_t ldx, const uint8_t *panel, const float *bias, float *y,
                       ptrdiff_t ldy, ptrdiff_t columns) {
    float *widened = m_len > FUSED_ROWS ? widened_panel(l, k_len, panel) : NULL;
    if (widened) {
        panel_product(m_len, k_len, x, ldx, widened, bias, y, ldy, columns);
        return;
    }
    ptrdiff_t m = 0;  /* few rows (or no memory for the buffer): straight from the blocks */
    for (; m + FUSED_ROWS <= m_len; m += FUSED_ROWS)
        fused[FUSED_ROWS](l, k_len, x + m * ldx, ldx, panel, bias, y + m * ldy, ldy, columns);
    if (m < m_len)
        fused[m_len - m](l, k_len, x + m * ldx, ldx, panel, bias, y + m * ldy, ldy, columns);
}

typedef struct {
    layout l;
    ptrdiff_t m_len, n_len, k_len, ldx, ldy, panels;
    const float *x, *bias;
    const uint8_t *blocks;
    float *y;
    long units;
} block_product;

static void run_unit(const void *task, long unit) {
    const block_product *t = task;
    ptrdiff_t first, last;
    unit_panels(unit, t->units, t->panels, &first, &last);
    for (ptrdiff_t p = first; p < last; p++) {
        ptrdiff_t n0 = p * PANEL;
        panel_rows(&t->l, t->m_len, t->k_len, t->x, t->ldx, t->blocks + p * t->l.panel_bytes,
                   t->bias ? t->bias + n0 : NULL, t->y + n0, t->ldy,
                   panel_columns(t->n_len, p));
    }
}

/* y = x . W^T (+ bias) for a weight W of n_len outputs and k_len inputs kept as
   blocks (layout above). bias: ceil(N/32)*32 floats or NULL. Returns 0, or -1
   when the layout arguments describe no layout (nothing is computed). */
static int blockgemm(int kind, int half, ptrdiff_t group, ptrdiff_t m_len, ptrdiff_t n_len,
                     ptrdiff_t k_len, const float *x, ptrdiff_t ldx, const uint8_t *blocks,
                     const float *bias, float *y, ptrdiff_t ldy, int threads) {
    block_product t;
    if (describe(kind, half, group, k_len, &t.l) != 0) return -1;
    t.m_len = m_len; t.n_len = n_len; t.k_len = k_len; t.ldx = ldx; t.ldy = ldy;
    t.panels = (n_len + PANEL - 1) / PANEL;
    t.x = x; t.bias = bias; t.blocks = blocks; t.y = y;
    t.units = pool_units(t.panels, threads);
    pool_run(run_unit, &t, t.units, threads);
    return 0;
}

int blockgemm_bound(const bound_weight *w, ptrdiff_t m_len, const float *x, float *y,
                    int threads) {
    return blockgemm(w->kind, w->half, w->group, m_len, w->n_len, w->k_len, x, w->k_len,
                     w->blocks, w->bias, y, w->n_len, threads);
}

int blockgemm_into(const bound_weight *w, ptrdiff_t m_len, const float *x, float *y,
                   ptrdiff_t ldy, int threads) {
    return blockgemm(w->kind, w->half, w->group, m_len, w->n_len, w->k_len, x, w->k_len,
                     w->blocks, w->bias, y, ldy, threads);
}

/* The float32 values of weight rows (outputs) `rows[0..count)` into out[count][k_len]:
   an embedding lookup on a table kept as blocks. Returns 0, or -1 as blockgemm does. */
int blockgemm_rows(int kind, int half, ptrdiff_t group, ptrdiff_t n_len, ptrdiff_t k_len,
                   const uint8_t *blocks, const int64_t *rows, ptrdiff_t count, float *out) {
    layout l;
    if (describe(kind, half, group, k_len, &l) != 0) return -1;
    int centered = kind == BLOCK_NIB4_CENTERED;
    kind = l.kind;
    ptrdiff_t scale = half ? 2 : 4, groups = k_len / group;
    for (ptrdiff_t i = 0; i < count; i++) {
        int64_t row = rows[i];
        if (row < 0 || row >= n_len) return -1;
        const uint8_t *panel = blocks + (row / PANEL) * l.panel_bytes;
        int lane = (int)(row % PANEL);
        for (ptrdiff_t g = 0; g < groups; g++) {
            const uint8_t *grp = panel + g * l.group_bytes;
            float s, o = 0.0f;
            if (half) {
                uint16_t h;
                memcpy(&h, grp + 2 * lane, 2);
                s = half_to_float(h);
                if (kind == BLOCK_NIB4) {
                    memcpy(&h, grp + 2 * PANEL + 2 * lane, 2);
                    o = half_to_float(h);
                }
            } else {
                memcpy(&s, grp + 4 * lane, 4);
                if (kind == BLOCK_NIB4) memcpy(&o, grp + 4 * PANEL + 4 * lane, 4);
            }
            float *w = out + i * k_len + g * group;
            for (ptrdiff_t kk = 0; kk < group; kk++) {
                if (kind == BLOCK_NIB4) {
                    uint8_t byte = grp[2 * PANEL * scale + kk * 16 + (lane & 15)];
                    int q = lane < 16 ? byte & 15 : byte >> 4;
                    w[kk] = centered ? s * (float)(q - 8) : s * (float)q + o;
                } else {
                    w[kk] = s * (float)((const int8_t *)(grp + PANEL * scale))[kk * PANEL + lane];
                }
            }
        }
    }
    return 0;
}
