/* The kernel's worker pool: products split into units taken from a shared counter.
 *
 * A product is posted as (function, task, number of units). The caller and
 * the workers take units by advancing one atomic word that holds the
 * product's generation and the next unit, so a thread only ever runs a unit
 * of the product it read, and a worker that the system deschedules (other
 * work on the machine) delays the product by the one unit it holds, not by a
 * fixed share of the work. The caller takes units too; when none are left it
 * waits for the ones in flight: it spins for 30 microseconds, then yields its
 * core (so a worker descheduled on it can run) for 3 milliseconds, then sleeps
 * in short naps.
 *
 * Workers idle between products wait the same way (the products of one
 * decode step follow each other within microseconds), then sleep on a
 * condition variable. OpenMP would do the splitting, but in a process
 * where several threads run parallel regions libgomp puts idle workers to
 * sleep at once, and waking them costs more than a decode step's small
 * products take.
 *
 * A posted product lives in a ring of slots indexed by generation. A worker
 * reads the slot of the generation it saw, then claims a unit with a
 * compare-and-swap on that same generation: if the caller has moved on (and
 * might be rewriting the slot), the swap fails and what was read is dropped.
 * The caller returns only when every unit it posted is done, so the buffers
 * a unit writes are alive while it runs. */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>

#include "kernel.h"

#define MAX_WORKERS 63
#define RING 64
/* How long a waiting thread spins (pause instructions), then yields its core
   (which returns at once when nobody else wants it), before it sleeps: a worker
   on the condition variable, the caller in short naps. */
#define SPIN_NS 30000L
#define YIELD_NS 3000000L
#define CALLER_NAP_NS 20000L

typedef struct {
    unit_fn run;
    const void *task;
    long units;
    int helpers;  /* workers 1..helpers may take units of this product */
} posted;

static posted ring[RING];
static _Atomic uint64_t claim;  /* generation << 32 | next unit */
static atomic_long done;        /* units finished of the newest product */
static uint32_t generation;     /* written under call_lock only */
static atomic_int sleepers;
static int workers;
static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t sleep_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake_up = PTHREAD_COND_INITIALIZER;
static int fork_handler_set;


static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static void nap(long nanoseconds) {
    struct timespec pause = {0, nanoseconds};
    nanosleep(&pause, NULL);
}

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

/* One step of waiting that began at `since` (0: not yet timed): spin, then yield;
   returns 1 once the waiter should sleep instead. Time is read every 64 calls. */
static int keep_waiting(long *since, unsigned *calls) {
    if ((++*calls & 63) != 0 || *since == 0) {
        if (*since == 0) *since = now_ns();
        relax();
        return 0;
    }
    long waited = now_ns() - *since;
    if (waited < SPIN_NS) { relax(); return 0; }
    if (waited < SPIN_NS + YIELD_NS) { sched_yield(); return 0; }
    return 1;
}

/* Take and run units of the product in generation `gen` (read from `slot`)
   until none are left or the product is no longer the newest. */
static void take_units(uint32_t gen, const posted *slot) {
    for (;;) {
        uint64_t seen = atomic_load_explicit(&claim, memory_order_acquire);
        if ((uint32_t)(seen >> 32) != gen) return;
        long unit = (long)(uint32_t)seen;
        if (unit >= slot->units) return;
        if (!atomic_compare_exchange_weak_explicit(&claim, &seen, seen + 1,
                                                   memory_order_acq_rel, memory_order_acquire))
            continue;
        slot->run(slot->task, unit);
        atomic_fetch_add_explicit(&done, 1, memory_order_release);
    }
}

static void *worker_main(void *arg) {
    int index = (int)(intptr_t)arg;
    uint32_t finished = (uint32_t)(atomic_load(&claim) >> 32);  /* nothing before our birth */
    enter_flush();  /* a worker runs nothing else, so it keeps the mode */
    for (;;) {
        uint64_t seen;
        long since = 0;
        unsigned calls = 0;
        while ((uint32_t)((seen = atomic_load_explicit(&claim, memory_order_acquire)) >> 32)
               == finished) {
            if (!keep_waiting(&since, &calls)) continue;
            pthread_mutex_lock(&sleep_lock);
            atomic_fetch_add(&sleepers, 1);
            while ((uint32_t)(atomic_load(&claim) >> 32) == finished)
                pthread_cond_wait(&wake_up, &sleep_lock);
            atomic_fetch_sub(&sleepers, 1);
            pthread_mutex_unlock(&sleep_lock);
            since = 0;
        }
        uint32_t gen = (uint32_t)(seen >> 32);
        /* A copy of the slot, read with relaxed atomics: if the slot is being rewritten
           for a later product, the claim below fails and the copy is dropped. */
        const posted *slot = &ring[gen % RING];
        posted copy;
        copy.run = __atomic_load_n(&slot->run, __ATOMIC_RELAXED);
        copy.task = __atomic_load_n(&slot->task, __ATOMIC_RELAXED);
        copy.units = __atomic_load_n(&slot->units, __ATOMIC_RELAXED);
        copy.helpers = __atomic_load_n(&slot->helpers, __ATOMIC_RELAXED);
        if (index <= copy.helpers) take_units(gen, &copy);
        finished = gen;
    }
    return NULL;
}

/* A forked child has none of the parent's workers: it starts its own. */
static void forget_pool_in_child(void) {
    workers = 0;
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
        int failed = pthread_create(&thread, &attr, worker_main, (void *)(intptr_t)(workers + 1));
        pthread_attr_destroy(&attr);
        if (failed) break;
        workers++;
    }
    return workers;
}

long pool_units(long panels, int threads) {
    if (threads <= 1) return 1;
    long units = (long)threads * 16;
    return units < panels ? units : panels;
}

void pool_run(unit_fn run, const void *task, long units, int threads) {
    unsigned saved = enter_flush();
    if (threads <= 1 || units <= 1 || pthread_mutex_trylock(&call_lock) != 0) {
        for (long unit = 0; unit < units; unit++) run(task, unit);
        leave_flush(saved);
        return;
    }
    int helpers = start_workers(threads - 1);
    if (helpers > threads - 1) helpers = threads - 1;
    uint32_t gen = ++generation;
    posted *slot = &ring[gen % RING];
    __atomic_store_n(&slot->run, run, __ATOMIC_RELAXED);
    __atomic_store_n(&slot->task, task, __ATOMIC_RELAXED);
    __atomic_store_n(&slot->units, units, __ATOMIC_RELAXED);
    __atomic_store_n(&slot->helpers, helpers, __ATOMIC_RELAXED);
    atomic_store_explicit(&done, 0, memory_order_relaxed);
    /* Publishes the product. Sequentially consistent, not just a release: the load of
       `sleepers` below must not pass it, or a worker going to sleep at this moment could
       miss both the product and the wake-up (it would sit out this product). */
    atomic_store(&claim, (uint64_t)gen << 32);
    if (atomic_load(&sleepers) > 0) {
        pthread_mutex_lock(&sleep_lock);
        pthread_cond_broadcast(&wake_up);
        pthread_mutex_unlock(&sleep_lock);
    }
    take_units(gen, slot);
    long since = 0;
    unsigned calls = 0;
    while (atomic_load_explicit(&done, memory_order_acquire) < units)
        if (keep_waiting(&since, &calls)) nap(CALLER_NAP_NS);
    pthread_mutex_unlock(&call_lock);
    leave_flush(saved);
}
