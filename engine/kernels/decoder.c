/* The engine's own forward pass of a LLaMA model kept in quantized blocks.
 *
 * One call computes a whole pass over some new tokens, each at its own place
 * in the KV cache (a decode step: one new token per row; a prefill: every
 * token of the prompts; a teacher-forced pass), for every layer: RMS norm, the query/key/value products, rotary embedding, the KV
 * cache write, attention over the row's own cache, the output product and
 * residual, RMS norm, the gate/up products, SiLU times up, the down
 * product and residual; then the final norm and the output head. The products
 * are blockgemm.c's; everything between them is defined here, so the step's
 * floats are the engine's (they differ from transformers' operators in the
 * last bits) and the execution profile names this pass ("fused-step/2": /1
 * was the same decode step after transformers' prefill). Any change to the
 * arithmetic below needs a new version.
 *
 * Every number of a row is computed from that row alone, in a fixed order:
 *   - sums of squares, dot products and lane reductions take 16-lane vectors
 *     in index order, then the 16 lanes in order, then any tail in order;
 *   - a token attends to its row's unmasked cache positions up to its own,
 *     in ascending order (padding is skipped, not weighted by zero), so a
 *     left-padded row in a batch computes exactly what it computes alone, and
 *     a prompt token in a prefill what it would in a step of its own;
 *   - the products give every token the same floats however many share them
 *     (blockgemm.c), so a prefill's tokens equal a token-by-token pass's;
 *   - exp is the polynomial below, not the C library's (whose last bit may
 *     change between library versions).
 * The rotary tables (cos, sin) come from the caller, which builds them with
 * the model's own rotary module, so every rope scaling that module knows
 * works here.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernel.h"

/* One decoder layer: its products and its two norm weights (`hidden` floats). The
   products that share an input are given as parts laid end to end in one output row:
   query | key | value in one to three parts, gate | up in one or two (one where the
   loader fused them into one weight). */
typedef struct {
    const bound_weight *attention_in[3], *mlp_in[2], *o, *down;
    int32_t attention_parts, mlp_parts;
    const float *input_norm, *post_norm;
} step_layer;

typedef struct {
    int32_t layers, hidden, heads, kv_heads, head_dim, intermediate;
    float eps, scaling;
    const float *final_norm;
    const bound_weight *head;
    const step_layer *layer;
} step_model;

/* ------------------------------------------------------------ arithmetic */

static inline float lanes_sum(vec16 v) {
    float s = 0.0f;
    for (int i = 0; i < 16; i++) s += v[i];
    return s;
}

static float dot(const float *a, const float *b, ptrdiff_t n) {
    vec16 acc = (vec16){0};
    ptrdiff_t i = 0;
    for (; i + 16 <= n; i += 16)
        acc += *(const vec16_unaligned *)(a + i) * *(const vec16_unaligned *)(b + i);
    float s = lanes_sum(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* e^x to about one unit in the last place; 0 below -87.3 (where it would be denormal). */
static inline float exp_fixed(float x) {
    if (x < -87.3f) return 0.0f;
    if (x > 88.7f) x = 88.7f;
    float n = __builtin_rintf(x * 1.44269504089f);
    float r = x - n * 0.693145751953125f - n * 1.42860682030941723e-6f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* y = weight * (x / sqrt(mean(x^2) + eps)), one row. */
static void rms_norm(const float *x, const float *weight, ptrdiff_t n, float eps, float *y) {
    float inverse = 1.0f / sqrtf(dot(x, x, n) / (float)n + eps);
    for (ptrdiff_t i = 0; i < n; i++) y[i] = weight[i] * (x[i] * inverse);
}

/* Rotary embedding of one head vector in place: the halves rotate against each other. */
static void rotate(float *x, const float *cos, const float *sin, ptrdiff_t dim) {
    ptrdiff_t half = dim / 2;
    for (ptrdiff_t i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* The residual add, row by row (so an element's code path never depends on the rows). */
static void add_rows(float *hidden, const float *update, ptrdiff_t rows, ptrdiff_t n) {
    for (ptrdiff_t r = 0; r < rows; r++)
        for (ptrdiff_t i = 0; i < n; i++) hidden[r * n + i] = hidden[r * n + i] + update[r * n + i];
}

/* The parts of a product with one input, each into its columns of rows `width` wide. */
static int project(const bound_weight *const *parts, int32_t count, ptrdiff_t rows,
                   const float *x, float *y, ptrdiff_t width, int threads) {
    int failed = 0;
    ptrdiff_t offset = 0;
    for (int32_t i = 0; i < count; i++) {
        failed |= blockgemm_into(parts[i], rows, x, y + offset, width, threads);
        offset += parts[i]->n_len;
    }
    return failed || offset != width;
}

/* ------------------------------------------------------------ attention */

typedef struct {
    const step_model *m;
    ptrdiff_t length, capacity, first;  /* first: the chunk's first token */
    const int64_t *at;        /* [tokens][2]: each token's row and cache position */
    const float *qkv;         /* [tokens][q | k | v], the queries rotated */
    const float *keys, *values;  /* this layer's cache: [rows][kv_heads][capacity][head_dim] */
    const int64_t *mask;      /* [rows][length], nonzero where a position is the row's */
    float *scores;            /* [chunk tokens * heads][length] */
    float *out;               /* [tokens][heads * head_dim] */
} attention_task;

/* One unit: one (token, head) of the chunk. Scores over the token's row's positions up to
   its own, in order, their softmax with the fixed exp, and the weighted sum of values in
   the same order. A token with no position to attend to (padding) gets zeros. */
static void attention_unit(const void *task, long unit) {
    const attention_task *t = task;
    const step_model *m = t->m;
    ptrdiff_t hd = m->head_dim, token = t->first + unit / m->heads, head = unit % m->heads;
    ptrdiff_t row = t->at[2 * token], last = t->at[2 * token + 1];
    ptrdiff_t kv = head / (m->heads / m->kv_heads);
    ptrdiff_t width = (ptrdiff_t)(m->heads + 2 * m->kv_heads) * hd;
    const float *q = t->qkv + token * width + head * hd;
    ptrdiff_t base = (row * m->kv_heads + kv) * t->capacity * hd;
    const float *keys = t->keys + base, *values = t->values + base;
    const int64_t *mask = t->mask + row * t->length;
    float *scores = t->scores + unit * t->length;
    float top = -INFINITY;
    for (ptrdiff_t j = 0; j <= last; j++) {
        if (!mask[j]) continue;
        float s = dot(q, keys + j * hd, hd) * m->scaling;
        scores[j] = s;
        if (s > top) top = s;
    }
    float total = 0.0f;
    for (ptrdiff_t j = 0; j <= last; j++) {
        if (!mask[j]) continue;
        scores[j] = exp_fixed(scores[j] - top);
        total += scores[j];
    }
    float *out = t->out + token * (ptrdiff_t)m->heads * hd + head * hd;
    if (total == 0.0f) {
        memset(out, 0, (size_t)hd * sizeof(float));
        return;
    }
    for (ptrdiff_t d0 = 0; d0 < hd; d0 += 16) {
        vec16 acc = (vec16){0};
        for (ptrdiff_t j = 0; j <= last; j++)
            if (mask[j]) acc += scores[j] * *(const vec16_unaligned *)(values + j * hd + d0);
        *(vec16_unaligned *)(out + d0) = acc / total;
    }
}

/* ------------------------------------------------------------ the pass */

/* Attention scores are kept for at most this many floats at once: a long pass computes
   its tokens' attention in chunks of tokens (each unit's floats are its own either way). */
#define SCORE_FLOATS ((ptrdiff_t)1 << 20)

static ptrdiff_t score_chunk(const step_model *m, ptrdiff_t tokens, ptrdiff_t length) {
    ptrdiff_t chunk = SCORE_FLOATS / ((ptrdiff_t)m->heads * length);
    if (chunk < 1) chunk = 1;
    return chunk < tokens ? chunk : tokens;
}

/* Where each of the pass's buffers starts in its work space, in floats, and the floats
   the work space takes: one layout for fused_forward_work and fused_forward. */
typedef struct {
    ptrdiff_t normed, qkv, attended, projected, gate_up, act, scores, head_in, total;
} work_layout;

static work_layout lay_out_work(const step_model *m, ptrdiff_t tokens, ptrdiff_t length,
                                ptrdiff_t head_rows) {
    ptrdiff_t h = m->hidden, inter = m->intermediate;
    ptrdiff_t q_width = (ptrdiff_t)m->heads * m->head_dim;
    ptrdiff_t qkv_width = q_width + 2 * (ptrdiff_t)m->kv_heads * m->head_dim;
    work_layout w;
    w.normed = 0;
    w.qkv = w.normed + tokens * h;
    w.attended = w.qkv + tokens * qkv_width;
    w.projected = w.attended + tokens * q_width;
    w.gate_up = w.projected + tokens * h;
    w.act = w.gate_up + tokens * 2 * inter;
    w.scores = w.act + tokens * inter;
    w.head_in = w.scores + score_chunk(m, tokens, length) * m->heads * length;
    w.total = w.head_in + head_rows * h;
    return w;
}

/* Floats of work space fused_forward needs for `tokens` tokens over a cache `length`
   long, with `head_rows` of them picked for the head (0: the head takes every token or
   none). */
ptrdiff_t fused_forward_work(const step_model *m, ptrdiff_t tokens, ptrdiff_t length,
                             ptrdiff_t head_rows) {
    return lay_out_work(m, tokens, length, head_rows).total;
}

/* A forward pass over `tokens` new tokens.
 *   hidden: [tokens][hidden], their embeddings (overwritten);
 *   cos, sin: [tokens][head_dim], the rotary tables at each token's position;
 *   at: [tokens][2], each token's cache row (< rows) and cache position (< length); NULL
 *       for a decode step: token r is row r's, at position length - 1 (tokens == rows);
 *   mask: [rows][length], nonzero where a cache position is the row's; a token attends to
 *         its row's masked-in positions up to its own, which the caller has filled or
 *         this pass fills;
 *   cache: [layers][2][rows][kv_heads][capacity][head_dim]; the pass writes each layer's
 *          key and value of every token at its place;
 *   work: fused_forward_work(...) floats;
 *   final: [tokens][hidden], the final norm's output (what the head multiplies);
 *   head_rows, head_count: the tokens whose logits are wanted, in order (a count below
 *       0: every token; 0: none);
 *   logits: [head_count, or tokens][head's outputs].
 * Returns 0, or -1 when the shapes do not fit (nothing computed). */
int fused_forward(const step_model *m, ptrdiff_t tokens, float *hidden, const float *cos,
                  const float *sin, const int64_t *at, const int64_t *mask, ptrdiff_t rows,
                  ptrdiff_t length, float *cache, ptrdiff_t capacity, float *work,
                  float *final, const int64_t *head_rows, ptrdiff_t head_count,
                  float *logits, int threads) {
    ptrdiff_t h = m->hidden, hd = m->head_dim, inter = m->intermediate;
    if (tokens <= 0 || rows <= 0 || length <= 0 || length > capacity || hd % 16 || hd % 2
        || m->kv_heads <= 0 || m->heads % m->kv_heads || (at == NULL && tokens != rows)
        || (head_count > 0 && head_rows == NULL))
        return -1;
    for (ptrdiff_t i = 0; at != NULL && i < tokens; i++)
        if (at[2 * i] < 0 || at[2 * i] >= rows || at[2 * i + 1] < 0 || at[2 * i + 1] >= length)
            return -1;
    for (ptrdiff_t i = 0; i < head_count; i++)
        if (head_rows[i] < 0 || head_rows[i] >= tokens) return -1;
    int64_t *own = NULL;
    if (at == NULL) {  /* a decode step: row r's token at the last position */
        own = malloc((size_t)tokens * 2 * sizeof(int64_t));
        if (own == NULL) return -1;
        for (ptrdiff_t r = 0; r < tokens; r++) {
            own[2 * r] = r;
            own[2 * r + 1] = length - 1;
        }
        at = own;
    }
    ptrdiff_t q_width = (ptrdiff_t)m->heads * hd, kv_width = (ptrdiff_t)m->kv_heads * hd;
    ptrdiff_t qkv_width = q_width + 2 * kv_width;
    work_layout w = lay_out_work(m, tokens, length, head_count > 0 ? head_count : 0);
    float *normed = work + w.normed, *qkv = work + w.qkv, *attended = work + w.attended;
    float *projected = work + w.projected, *gate_up = work + w.gate_up, *act = work + w.act;
    float *scores = work + w.scores, *head_in = work + w.head_in;
    ptrdiff_t chunk = score_chunk(m, tokens, length);
    ptrdiff_t slab = rows * kv_width * capacity;  /* one layer's keys (or values) */
    unsigned saved = enter_flush();
    int failed = 0;
    for (int32_t index = 0; index < m->layers && !failed; index++) {
        const step_layer *layer = &m->layer[index];
        float *keys = cache + (ptrdiff_t)index * 2 * slab, *values = keys + slab;
        for (ptrdiff_t r = 0; r < tokens; r++)
            rms_norm(hidden + r * h, layer->input_norm, h, m->eps, normed + r * h);
        failed |= project(layer->attention_in, layer->attention_parts, tokens, normed, qkv,
                          qkv_width, threads);
        for (ptrdiff_t r = 0; r < tokens; r++) {
            float *token = qkv + r * qkv_width;
            const float *c = cos + r * hd, *s = sin + r * hd;
            ptrdiff_t row = at[2 * r], slot = at[2 * r + 1];
            for (int32_t head = 0; head < m->heads; head++) rotate(token + head * hd, c, s, hd);
            for (int32_t kv = 0; kv < m->kv_heads; kv++) {
                ptrdiff_t place = ((row * m->kv_heads + kv) * capacity + slot) * hd;
                float *key = token + q_width + kv * hd;
                rotate(key, c, s, hd);
                memcpy(keys + place, key, (size_t)hd * sizeof(float));
                memcpy(values + place, token + q_width + kv_width + kv * hd,
                       (size_t)hd * sizeof(float));
            }
        }
        for (ptrdiff_t first = 0; first < tokens; first += chunk) {
            ptrdiff_t count = tokens - first < chunk ? tokens - first : chunk;
            attention_task task = {m, length, capacity, first, at, qkv, keys, values, mask,
                                   scores, attended};
            pool_run(attention_unit, &task, count * m->heads, threads);
        }
        failed |= blockgemm_bound(layer->o, tokens, attended, projected, threads);
        add_rows(hidden, projected, tokens, h);
        for (ptrdiff_t r = 0; r < tokens; r++)
            rms_norm(hidden + r * h, layer->post_norm, h, m->eps, normed + r * h);
        failed |= project(layer->mlp_in, layer->mlp_parts, tokens, normed, gate_up, 2 * inter,
                          threads);
        for (ptrdiff_t r = 0; r < tokens; r++) {
            const float *gate = gate_up + r * 2 * inter, *up = gate + inter;
            float *a = act + r * inter;
            for (ptrdiff_t i = 0; i < inter; i++)
                a[i] = gate[i] / (1.0f + exp_fixed(-gate[i])) * up[i];
        }
        failed |= blockgemm_bound(layer->down, tokens, act, projected, threads);
        add_rows(hidden, projected, tokens, h);
    }
    if (!failed) {
        for (ptrdiff_t r = 0; r < tokens; r++)
            rms_norm(hidden + r * h, m->final_norm, h, m->eps, final + r * h);
        if (head_count < 0) {
            failed |= blockgemm_bound(m->head, tokens, final, logits, threads);
        } else if (head_count > 0) {
            for (ptrdiff_t i = 0; i < head_count; i++)
                memcpy(head_in + i * h, final + head_rows[i] * h, (size_t)h * sizeof(float));
            failed |= blockgemm_bound(m->head, head_count, head_in, logits, threads);
        }
    }
    leave_flush(saved);
    free(own);
    return failed ? -1 : 0;
}
