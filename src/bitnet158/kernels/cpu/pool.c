/* pool.c — a small persistent thread pool: workers spin briefly on a generation counter, then sleep.
 *
 * bn_pool_run(fn, ctx, items) splits [0, items) into 2 contiguous chunks per thread, claimed
 * dynamically (the caller works too), and returns when every chunk is done. Spinning first keeps the ~300 hand-offs of a
 * decode step at well under a microsecond each; sleeping after ~2 ms, or at once after
 * bn_pool_park (the end of a forward), keeps idle workers off the CPU (and out of torch's way)
 * between calls. BITNET158_CPU_PIN=1 pins worker i to the i-th allowed CPU
 * (off by default: on a shared machine a pinned worker cannot move away from a busy CPU, while the
 * dynamic chunks below already keep the caller busy when a worker is descheduled).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define BN_PAUSE() _mm_pause()
#else
#define BN_PAUSE() ((void)0)
#endif

#include "pool.h"

#define BN_MAX_THREADS 64

static struct {
    int n;                         /* threads including the caller */
    pthread_t th[BN_MAX_THREADS];
    _Atomic unsigned gen;          /* bumped once per job */
    _Atomic int done;              /* chunks finished in the current job */
    _Atomic int sleeping;
    _Atomic int stop;
    _Atomic int park;              /* set by bn_pool_park: sleep now instead of spinning */
    bn_task fn;
    void *ctx;
    int items, nchunks;
    _Atomic uint64_t claim;        /* (job generation << 32) | next chunk */
    pthread_mutex_t mu;
    pthread_cond_t cv;
} P = {.n = 1, .mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static void pin(int tid) {
#ifdef __linux__
    cpu_set_t avail, one;
    if (sched_getaffinity(0, sizeof avail, &avail)) return;
    int seen = 0;
    for (int c = 0; c < CPU_SETSIZE; c++) {
        if (!CPU_ISSET(c, &avail)) continue;
        if (seen++ == tid) {
            CPU_ZERO(&one);
            CPU_SET(c, &one);
            pthread_setaffinity_np(pthread_self(), sizeof one, &one);
            return;
        }
    }
#else
    (void)tid;
#endif
}

static unsigned start_gen;  /* P.gen when the workers were created: no job can be missed */

/* Claim and run chunks of job `gen` until none is left. A claim is a CAS on (gen << 32 | next),
 * so a thread that wakes late can never take a chunk of a later job. */
static void work(unsigned gen, int tid) {
    const bn_task fn = P.fn;
    void *const ctx = P.ctx;
    const int items = P.items, nch = P.nchunks;
    uint64_t cur = atomic_load(&P.claim);
    for (;;) {
        if ((unsigned)(cur >> 32) != gen || (int)(uint32_t)cur >= nch) return;
        if (!atomic_compare_exchange_weak(&P.claim, &cur, cur + 1)) continue;
        const int c = (int)(uint32_t)cur;
        const int i0 = (int)((long long)items * c / nch), i1 = (int)((long long)items * (c + 1) / nch);
        if (i1 > i0) fn(ctx, i0, i1, tid);
        atomic_fetch_add_explicit(&P.done, 1, memory_order_release);
        cur = atomic_load(&P.claim);
    }
}

static void *worker(void *arg) {
    const int tid = (int)(intptr_t)arg;
    const char *e = getenv("BITNET158_CPU_PIN");
    if (e && e[0] == '1') pin(tid);
    unsigned seen = start_gen;
    for (;;) {
        double t0 = 0.0;
        int spins = 0;
        while (atomic_load_explicit(&P.gen, memory_order_acquire) == seen) {
            BN_PAUSE();
            const int park = atomic_load_explicit(&P.park, memory_order_relaxed);
            if (++spins == 256 || park) {
                spins = 0;
                if (t0 == 0.0 && !park) t0 = now_s();
                else if (park || now_s() - t0 > 2e-3) {
                    pthread_mutex_lock(&P.mu);
                    atomic_fetch_add(&P.sleeping, 1);
                    while (atomic_load(&P.gen) == seen) pthread_cond_wait(&P.cv, &P.mu);
                    atomic_fetch_sub(&P.sleeping, 1);
                    pthread_mutex_unlock(&P.mu);
                }
            }
        }
        seen = atomic_load_explicit(&P.gen, memory_order_acquire);
        if (atomic_load(&P.stop)) return NULL;
        work(seen, tid);
    }
}

static void pool_stop(void) {
    if (P.n <= 1) return;
    atomic_store(&P.stop, 1);
    atomic_fetch_add(&P.gen, 1);
    pthread_mutex_lock(&P.mu);
    pthread_cond_broadcast(&P.cv);
    pthread_mutex_unlock(&P.mu);
    for (int i = 1; i < P.n; i++) pthread_join(P.th[i], NULL);
    atomic_store(&P.stop, 0);
    P.n = 1;
}

int bn_pool_threads(void) { return P.n; }

/* Let the workers sleep right away rather than spin for ~2 ms: called when a whole forward returns
 * to Python, whose own work between tokens (sampling, argmax: torch's threads) then gets the cores.
 * The next bn_pool_run wakes them (the caller starts on its chunks meanwhile). */
void bn_pool_park(void) { atomic_store_explicit(&P.park, 1, memory_order_relaxed); }

int bn_pool_set_threads(int n) {
    if (n < 1) n = 1;
    if (n > BN_MAX_THREADS) n = BN_MAX_THREADS;
    if (n == P.n) return n;
    pool_stop();
    P.n = n;
    start_gen = atomic_load(&P.gen);
    for (int i = 1; i < n; i++)
        if (pthread_create(&P.th[i], NULL, worker, (void *)(intptr_t)i)) { P.n = i; break; }
    return P.n;
}

void bn_pool_run(bn_task fn, void *ctx, int items) {
    if (items <= 0) return;
    if (P.n == 1 || items == 1) {
        fn(ctx, 0, items, 0);
        return;
    }
    /* Chunks are claimed dynamically: when a worker is descheduled (a busy machine) the caller
     * does its share instead of spinning. Two chunks per thread keep each one's memory stream long. */
    const int nch = items < 2 * P.n ? items : 2 * P.n;
    atomic_store_explicit(&P.park, 0, memory_order_relaxed);
    P.fn = fn;
    P.ctx = ctx;
    P.items = items;
    P.nchunks = nch;
    atomic_store(&P.done, 0);
    const unsigned gen = atomic_load(&P.gen) + 1;
    atomic_store(&P.claim, (uint64_t)gen << 32);
    atomic_store(&P.gen, gen);            /* seq_cst: pairs with the sleeper's check under P.mu */
    if (atomic_load(&P.sleeping)) {
        pthread_mutex_lock(&P.mu);
        pthread_cond_broadcast(&P.cv);
        pthread_mutex_unlock(&P.mu);
    }
    work(gen, 0);
    for (unsigned spins = 1; atomic_load_explicit(&P.done, memory_order_acquire) != nch; spins++) {
        BN_PAUSE();
        if ((spins & 255) == 0) sched_yield();
    }
}
