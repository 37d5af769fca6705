/* Row-invariant product of a few activation rows with a packed weight matrix.
 *
 * y[M][N] = x[M][K] . W[N][K]^T (+ bias[N]), where W is stored packed as
 * P[ceil(N/32)][K][32]: panel b holds output columns 32b..32b+31 for every k,
 * so one panel is one contiguous stream, zero-padded past N.
 *
 * Every output element is computed the same way whatever M is: an accumulator
 * starting at zero takes one fused multiply-add per k, in order 0..K-1, and the
 * bias is added last. A row's result therefore does not depend on which other
 * rows share the call, so a job decoded in a batch gets the same floats as the
 * job decoded alone. Rows are taken eight at a time (the weight panel is read
 * once for all of them and stays in L2 between row groups); a remainder of one
 * to seven rows has its own unrolled routine with the same arithmetic.
 *
 * The panels are shared among a small pool of worker threads owned by this
 * library. OpenMP would do, but in a process where several threads run
 * parallel regions (the engine's job threads beside the main thread) libgomp
 * puts idle workers to sleep at once, and waking them costs tens of
 * microseconds per call on a virtual machine: more than a decode step's small
 * products take. These workers spin for a couple of milliseconds between
 * calls (the length of a decode step's run of products), then sleep.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef float vec16 __attribute__((vector_size(64)));
typedef float vec16_unaligned __attribute__((vector_size(64), aligned(4)));

#define PANEL 32
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
    vec16 b_lo = (vec16){0}, b_hi = (vec16){0};                                      \
    if (bias) {                                                                      \
        b_lo = *(const vec16_unaligned *)bias;                                       \
        b_hi = *(const vec16_unaligned *)(bias + 16);                                \
    }                                                                                \
    for (int r = 0; r < ROWS; r++) {                                                 \
        float out[PANEL];                                                            \
        *(vec16_unaligned *)out = lo[r] + b_lo;                                      \
        *(vec16_unaligned *)(out + 16) = hi[r] + b_hi;                               \
        memcpy(y + r * ldy, out, (size_t)columns * sizeof(float));                   \
    }                                                                                \
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

typedef struct {
    ptrdiff_t m_len, n_len, k_len, ldx, ldy, panels;
    const float *x, *packed, *bias;
    float *y;
    int parts;
} product;

static void run_panels(const product *t, ptrdiff_t first, ptrdiff_t last) {
    for (ptrdiff_t p = first; p < last; p++) {
        const float *panel = t->packed + p * t->k_len * PANEL;
        const float *panel_bias = t->bias ? t->bias + p * PANEL : NULL;
        ptrdiff_t n0 = p * PANEL;
        ptrdiff_t columns = t->n_len - n0 < PANEL ? t->n_len - n0 : PANEL;
        ptrdiff_t m = 0;
        for (; m + 8 <= t->m_len; m += 8)
            row_group_8(t->k_len, t->x + m * t->ldx, t->ldx, panel, panel_bias,
                        t->y + m * t->ldy + n0, t->ldy, columns);
        if (m < t->m_len)
            row_groups[t->m_len - m](t->k_len, t->x + m * t->ldx, t->ldx, panel, panel_bias,
                                     t->y + m * t->ldy + n0, t->ldy, columns);
    }
}

static void run_part(const product *t, int part) {
    ptrdiff_t per = (t->panels + t->parts - 1) / t->parts;
    ptrdiff_t first = part * per, last = first + per < t->panels ? first + per : t->panels;
    if (first < last) run_panels(t, first, last);
}

/* ------------------------------------------------------------------ the pool */

#define MAX_WORKERS 63
/* Pause-loop iterations a worker spins before it sleeps: a couple of milliseconds. */
#define SPIN_LIMIT 40000

static product current;
static atomic_long generation;     /* bumped once per product handed to the pool */
static atomic_int unfinished;      /* workers still busy with the current product */
static atomic_int sleepers;        /* workers blocked on wake_up */
static int workers;                /* workers started */
static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t sleep_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake_up = PTHREAD_COND_INITIALIZER;
static int fork_handler_set;
static long born_at[MAX_WORKERS + 1];  /* the generation current when each worker was started */

/* Denormal inputs and results are taken as zero (the MXCSR's DAZ and FTZ bits) while
   the kernel runs: on x86 every arithmetic step that meets a denormal otherwise
   takes a slow microcode path, and a few prompts drive activations that low. */
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

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static void *worker_main(void *arg) {
    int part = (int)(intptr_t)arg;
    long seen = born_at[part];  /* not a fresh load: a product may already be waiting */
    enter_flush();              /* a worker runs nothing else, so it keeps the mode */
    for (;;) {
        long now;
        int spins = 0;
        while ((now = atomic_load_explicit(&generation, memory_order_acquire)) == seen) {
            if (++spins < SPIN_LIMIT) { relax(); continue; }
            pthread_mutex_lock(&sleep_lock);
            atomic_fetch_add(&sleepers, 1);
            while (atomic_load(&generation) == seen) pthread_cond_wait(&wake_up, &sleep_lock);
            atomic_fetch_sub(&sleepers, 1);
            pthread_mutex_unlock(&sleep_lock);
            spins = 0;
        }
        seen = now;
        if (part < current.parts) run_part(&current, part);
        atomic_fetch_sub_explicit(&unfinished, 1, memory_order_release);
    }
    return NULL;
}

/* A forked child has none of the parent's workers: it starts its own. */
static void forget_pool_in_child(void) {
    workers = 0;
    atomic_store(&unfinished, 0);
    atomic_store(&sleepers, 0);
    pthread_mutex_init(&call_lock, NULL);
    pthread_mutex_init(&sleep_lock, NULL);
    pthread_cond_init(&wake_up, NULL);
}

/* Called with call_lock held: start workers until `wanted` run; returns how many do. */
static int start_workers(int wanted) {
    if (!fork_handler_set) {
        pthread_atfork(NULL, NULL, forget_pool_in_child);
        fork_handler_set = 1;
    }
    if (wanted > MAX_WORKERS) wanted = MAX_WORKERS;
    while (workers < wanted) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        born_at[workers + 1] = atomic_load(&generation);
        int failed = pthread_create(&thread, &attr, worker_main, (void *)(intptr_t)(workers + 1));
        pthread_attr_destroy(&attr);
        if (failed) break;
        workers++;
    }
    return workers;
}

/* y = x . W^T (+ bias). x: M rows of K floats, ldx apart; packed: the weight as
   described above; bias: ceil(N/32)*32 floats (zero-padded) or NULL; y: M rows
   of N floats, ldy apart. The panels are split among `threads` threads (the
   caller and up to threads - 1 pool workers); while another thread uses the
   pool, the caller computes the whole product itself. */
void rowgemm(ptrdiff_t m_len, ptrdiff_t n_len, ptrdiff_t k_len,
             const float *x, ptrdiff_t ldx, const float *packed, const float *bias,
             float *y, ptrdiff_t ldy, int threads) {
    product t = {m_len, n_len, k_len, ldx, ldy, (n_len + PANEL - 1) / PANEL,
                 x, packed, bias, y, 1};
    if (threads > t.panels) threads = (int)t.panels;
    unsigned saved = enter_flush();
    if (threads <= 1 || pthread_mutex_trylock(&call_lock) != 0) {
        run_panels(&t, 0, t.panels);
        leave_flush(saved);
        return;
    }
    int pool = start_workers(threads - 1);
    t.parts = pool + 1 < threads ? pool + 1 : threads;
    current = t;
    atomic_store_explicit(&unfinished, pool, memory_order_relaxed);
    atomic_fetch_add(&generation, 1);              /* publishes `current` to the workers */
    if (atomic_load(&sleepers) > 0) {
        pthread_mutex_lock(&sleep_lock);
        pthread_cond_broadcast(&wake_up);
        pthread_mutex_unlock(&sleep_lock);
    }
    run_part(&t, 0);
    while (atomic_load_explicit(&unfinished, memory_order_acquire) > 0) relax();
    pthread_mutex_unlock(&call_lock);
    leave_flush(saved);
}
