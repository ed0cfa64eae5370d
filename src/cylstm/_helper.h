/* One helper thread that shares small jobs with the thread that calls, and never makes
 * it wait for a thread the OS has not scheduled.
 *
 * Why: a streaming step (LSTM.step at B = 1, I = H = 256) reads 2 MiB of weights and
 * computes little. Split by hidden units over two cores, each core reads its half from
 * its own L2, and the step takes less than half the time (see _step.pyx). An OpenMP
 * region would give that on an idle machine, but its end is a barrier: when another
 * process holds the second core, the caller waits for the scheduler to run its partner,
 * and a 15 us step takes milliseconds.
 *
 * How: the caller publishes a job (a small struct copied by value, a part function and
 * the number of parts), then claims parts from the first one upwards while the helper,
 * if it is awake, claims them from the last one downwards. Each part's state is one
 * atomic word: FREE -> CALLER, or FREE -> HELPER -> DONE. The helper computes into its
 * own buffers (named in the job) and the caller copies a DONE part out (`collect`).
 * When the caller has finished its parts and a part is still HELPER after about twice
 * the time the caller's own part took, the caller takes it back (HELPER -> CALLER) and
 * computes it itself; the helper's late result then fails its HELPER -> DONE exchange
 * and is thrown away. So a call never waits longer than that, whatever the scheduler
 * does, and the results are the same bits whoever computes a part (the part function
 * is the same code on the same inputs).
 *
 * Rules for a job's part function, which may run late on the helper after the call
 * returned: in helper mode it writes only the helper's own buffers; every pointer in
 * the job stays valid until cy_helper_quiesce() returns (the owner calls it before
 * freeing them); it reads no memory the caller's user may free (copy such inputs into
 * owned buffers first). Reading inputs the caller is changing gives garbage that is
 * thrown away, never stored.
 *
 * The helper spins (pause, then sched_yield, so it gives way to the caller if both land
 * on one core) for CY_HELPER_SPIN_NS after its last job, then naps and polls, and after
 * a long idle time sleeps on a condition variable; a call that finds it asleep wakes it
 * but does not wait for it (the parts are claimed by whoever comes first). One job runs at a time: a second thread that
 * calls meanwhile runs its parts alone. POSIX threads only; elsewhere every part runs
 * on the caller.
 */
#ifndef CYLSTM_HELPER_H
#define CYLSTM_HELPER_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef void (*cy_part_fn)(const void *job, int part, int helper);

#define CY_HELPER_MAX_PARTS 64
#define CY_HELPER_JOB_BYTES 512

#if (defined(__unix__) || defined(__APPLE__)) && (defined(__GNUC__) || defined(__clang__))
#define CY_HAVE_HELPER 1
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CY_PAUSE() _mm_pause()
#else
#define CY_PAUSE() ((void) 0)
#endif
#else
#define CY_HAVE_HELPER 0
#endif

/* How long the helper keeps polling for the next job before it naps: a stream of
 * steps with up to this much of the caller's own work between them keeps it awake. */
#define CY_HELPER_SPIN_NS 200000LL
/* Then it naps (a quarter of its idle time, at most CY_HELPER_NAP_MAX_NS) and polls
 * again, until it has been idle this long; then it sleeps until a caller signals it.
 * Why not sleep at once: waking a sleeping thread costs the caller a system call that,
 * in a virtual machine, took ~40 us (an interrupt to an idle virtual CPU), more than a
 * whole step; a napping helper finds the next job by itself, within a nap. */
#define CY_HELPER_NAP_MAX_NS 2000000LL
#define CY_HELPER_NAP_UNTIL_NS 1000000000LL
/* For this long after a job the helper only polls (pause); then it also yields the core
 * between polls, in case it shares one with the caller. */
#define CY_HELPER_YIELD_NS 20000LL
/* A job the helper finds later than this after it was published (it was napping) is
 * left to the caller. */
#define CY_HELPER_LATE_NS 2000LL
#define CY_HELPER_MISSES 4
#define CY_HELPER_PROBE 16
/* The caller waits for a part the helper holds at most twice its own part's time plus
 * this, then computes the part itself. */
#define CY_HELPER_SLACK_NS 3000LL

#if defined(__GNUC__) || defined(__clang__)
#define CY_ALIGNED64 __attribute__((aligned(64)))   /* apart from the lines the other writes */
#else
#define CY_ALIGNED64
#endif

enum { CY_PART_FREE = 0, CY_PART_CALLER = 1, CY_PART_HELPER = 2, CY_PART_DONE = 3 };

typedef struct {
    /* written by the caller that holds `slot`; read by the helper (a sequence lock:
     * odd while the caller writes the job, the job's number once published) */
    uint64_t seq CY_ALIGNED64;
    int n_parts;
    size_t size;
    cy_part_fn fn;
    long long published;    /* cy_now_ns() when the caller published the job */
    unsigned char job[CY_HELPER_JOB_BYTES];
    /* (seq << 2) | CY_PART_*: claims are compare-exchanges on these */
    uint64_t state[CY_HELPER_MAX_PARTS] CY_ALIGNED64;
    int slot CY_ALIGNED64;   /* 1 while a caller owns the helper */
    int busy;               /* 1 while the helper may be inside a part function */
    int parked;             /* 1 while the helper sleeps (or is about to) */
    int napping;            /* 1 while the helper naps or sleeps: jobs run alone */
    unsigned ping;          /* calls that ran alone while it napped: wakes its polling */
    int started;            /* 0 not yet, 1 running, -1 could not start */
    long long delay_ns;     /* test hook: the helper sleeps this long in each part */
    int stay_awake;         /* test hook: the helper never naps */
    unsigned missed;        /* jobs in a row the helper took no part of (caller only) */
    unsigned probes;        /* jobs run alone since then (caller only) */
    /* statistics (test and benchmark hooks), updated by the caller only */
    unsigned long long helped, taken_back, alone;
    long long caller_ns, wait_ns;   /* summed over jobs: the caller's own parts, then the rest */
#if CY_HAVE_HELPER
    pthread_mutex_t mu;
    pthread_cond_t cv;
#endif
} cy_helper_t;

static cy_helper_t cy_helper_g;

#if CY_HAVE_HELPER

static inline long long cy_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long) ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline uint64_t cy_part_word(uint64_t seq, int s) { return (seq << 2) | (uint64_t) s; }

static void cy_helper_park(uint64_t last)
{
    cy_helper_t *g = &cy_helper_g;
    pthread_mutex_lock(&g->mu);
    /* Dekker with the caller: it stores seq, then loads parked; this stores parked,
     * then loads seq; with both sequentially consistent one of them sees the other */
    unsigned ping = __atomic_load_n(&g->ping, __ATOMIC_SEQ_CST);
    __atomic_store_n(&g->parked, 1, __ATOMIC_SEQ_CST);
    while (__atomic_load_n(&g->seq, __ATOMIC_SEQ_CST) == last
           && __atomic_load_n(&g->ping, __ATOMIC_SEQ_CST) == ping)
        pthread_cond_wait(&g->cv, &g->mu);
    __atomic_store_n(&g->parked, 0, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&g->mu);
}

static void *cy_helper_main(void *unused)
{
    cy_helper_t *g = &cy_helper_g;
    unsigned char job[CY_HELPER_JOB_BYTES];
    uint64_t last = __atomic_load_n(&g->seq, __ATOMIC_ACQUIRE);
    long long idle_since = cy_now_ns();
    unsigned spins = 0;
    int napping = 0;
    (void) unused;
    for (;;) {
        uint64_t s = __atomic_load_n(&g->seq, __ATOMIC_ACQUIRE);
        if (s == last || (s & 1)) {
            CY_PAUSE();
            if (++spins % 16)
                continue;
            long long idle = cy_now_ns() - idle_since;
            if (idle > CY_HELPER_SPIN_NS && !__atomic_load_n(&g->stay_awake, __ATOMIC_RELAXED)) {
                unsigned ping = __atomic_load_n(&g->ping, __ATOMIC_RELAXED);
                if (!napping) {
                    napping = 1;
                    __atomic_store_n(&g->napping, 1, __ATOMIC_SEQ_CST);
                }
                if (idle > CY_HELPER_NAP_UNTIL_NS) {
                    cy_helper_park(last);
                } else {
                    long long nap = idle / 4 < CY_HELPER_NAP_MAX_NS ? idle / 4
                                                                   : CY_HELPER_NAP_MAX_NS;
                    struct timespec ts = {0, (long) nap};
                    nanosleep(&ts, NULL);
                    if (__atomic_load_n(&g->ping, __ATOMIC_RELAXED) == ping)
                        continue;
                }
                /* calls came meanwhile: a stream (re)started, poll closely again */
                idle_since = cy_now_ns();
            } else if (idle > CY_HELPER_YIELD_NS) {
                sched_yield();
            }
            if (napping) {
                napping = 0;
                __atomic_store_n(&g->napping, 0, __ATOMIC_SEQ_CST);
            }
            continue;
        }
        /* read the job, then check that the caller did not start the next one meanwhile */
        int n = g->n_parts;
        size_t size = g->size;
        cy_part_fn fn = g->fn;
        long long published = g->published;
        if (size > sizeof job)
            size = sizeof job;
        memcpy(job, g->job, size);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(&g->seq, __ATOMIC_RELAXED) != s)
            continue;
        last = s;
        spins = 0;
        if (cy_now_ns() - published > CY_HELPER_LATE_NS) {
            /* found after a nap: the caller is well into its parts, and a part taken now
             * would make it wait; poll closely again for the next job */
            idle_since = cy_now_ns();
            continue;
        }
        if (n > CY_HELPER_MAX_PARTS)
            n = CY_HELPER_MAX_PARTS;
        __atomic_store_n(&g->busy, 1, __ATOMIC_SEQ_CST);
        for (int p = n - 1; p >= 0; p--) {
            uint64_t want = cy_part_word(s, CY_PART_FREE);
            if (!__atomic_compare_exchange_n(&g->state[p], &want,
                                             cy_part_word(s, CY_PART_HELPER), 0,
                                             __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
                continue;
            long long d = __atomic_load_n(&g->delay_ns, __ATOMIC_RELAXED);
            if (d > 0) {
                struct timespec ts = {(time_t) (d / 1000000000LL), (long) (d % 1000000000LL)};
                nanosleep(&ts, NULL);
            }
            fn(job, p, 1);
            want = cy_part_word(s, CY_PART_HELPER);
            __atomic_compare_exchange_n(&g->state[p], &want, cy_part_word(s, CY_PART_DONE),
                                        0, __ATOMIC_RELEASE, __ATOMIC_RELAXED);
        }
        __atomic_store_n(&g->busy, 0, __ATOMIC_SEQ_CST);
        idle_since = cy_now_ns();
        spins = 0;
    }
    return NULL;
}

/* In a forked child only the forking thread exists: the helper must be started anew,
 * and a lock or condition another thread held is rebuilt. */
static void cy_helper_after_fork_child(void)
{
    cy_helper_t *g = &cy_helper_g;
    g->started = 0;
    g->slot = 0;
    g->busy = 0;
    g->parked = 0;
    g->napping = 0;
    pthread_mutex_init(&g->mu, NULL);
    pthread_cond_init(&g->cv, NULL);
}

/* Start the helper once per process; call only while holding the slot. */
static int cy_helper_start(void)
{
    cy_helper_t *g = &cy_helper_g;
    static int atfork_done = 0;
    pthread_t t;
    pthread_attr_t attr;
    sigset_t all, old;
    if (g->started)
        return g->started > 0;
    if (!atfork_done) {
        pthread_mutex_init(&g->mu, NULL);
        pthread_cond_init(&g->cv, NULL);
        if (pthread_atfork(NULL, NULL, cy_helper_after_fork_child) != 0) {
            g->started = -1;
            return 0;
        }
        atfork_done = 1;
    }
    /* the helper takes no signals: Python's handlers belong to the main thread */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 1 << 20);
    int rc = pthread_create(&t, &attr, cy_helper_main, NULL);
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    g->started = rc == 0 ? 1 : -1;
    return rc == 0;
}

static inline int cy_helper_try_lock(void)
{
    int want = 0;
    return __atomic_compare_exchange_n(&cy_helper_g.slot, &want, 1, 0, __ATOMIC_ACQUIRE,
                                       __ATOMIC_RELAXED);
}

static inline void cy_helper_unlock(void)
{
    __atomic_store_n(&cy_helper_g.slot, 0, __ATOMIC_RELEASE);
}

/* Every part on the caller, the last one first if `reverse`. */
static void cy_helper_alone(const void *job, int n_parts, cy_part_fn fn, int reverse)
{
    for (int q = 0; q < n_parts; q++)
        fn(job, reverse ? n_parts - 1 - q : q, 0);
    __atomic_fetch_add(&cy_helper_g.alone, 1, __ATOMIC_RELAXED);
}

/* Run parts 0 .. n_parts-1 of `job` (size bytes, copied for the helper): fn(job, p, 0)
 * on the caller, fn(helper's copy, p, 1) on the helper followed by collect(job, p, 0)
 * on the caller. Returns when every part is in the caller's outputs. `reverse`: the
 * order of the parts when the caller runs them all (see StepRunner.run's snake order);
 * shared with the helper, the caller always starts from part 0 so that each thread
 * keeps the same parts, whose weights stay in its own L2. */
static void cy_helper_run(const void *job, size_t size, int n_parts, cy_part_fn fn,
                          cy_part_fn collect, int reverse)
{
    cy_helper_t *g = &cy_helper_g;
    if (n_parts < 2 || n_parts > CY_HELPER_MAX_PARTS || size > CY_HELPER_JOB_BYTES
            || !cy_helper_try_lock()) {
        cy_helper_alone(job, n_parts, fn, reverse);
        return;
    }
    if (!cy_helper_start()) {
        cy_helper_unlock();
        cy_helper_alone(job, n_parts, fn, reverse);
        return;
    }
    /* A helper that took no part of the last CY_HELPER_MISSES jobs (its core is busy
     * with another process) is offered only every CY_HELPER_PROBE-th job meanwhile:
     * the caller alone runs its parts in the snake order, which keeps more of the
     * weights in its L2 than the fixed order of a shared job. */
    int absent = g->missed >= CY_HELPER_MISSES && ++g->probes % CY_HELPER_PROBE != 0;
    if (absent || __atomic_load_n(&g->napping, __ATOMIC_SEQ_CST)) {
        /* it would find the job too late: run alone, and tell it a stream is on */
        __atomic_fetch_add(&g->ping, 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&g->parked, __ATOMIC_SEQ_CST)) {
            pthread_mutex_lock(&g->mu);
            pthread_cond_signal(&g->cv);
            pthread_mutex_unlock(&g->mu);
        }
        cy_helper_unlock();
        cy_helper_alone(job, n_parts, fn, reverse);
        return;
    }
    /* publish: seq odd while the job is written, then the job's (even) number */
    uint64_t s = __atomic_load_n(&g->seq, __ATOMIC_RELAXED) + 2;
    __atomic_store_n(&g->seq, s - 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    memcpy(g->job, job, size);
    g->size = size;
    g->n_parts = n_parts;
    g->fn = fn;
    g->published = cy_now_ns();
    for (int p = 0; p < n_parts; p++)
        __atomic_store_n(&g->state[p], cy_part_word(s, CY_PART_FREE), __ATOMIC_RELAXED);
    __atomic_store_n(&g->seq, s, __ATOMIC_SEQ_CST);
    /* the caller's parts, from the first upwards */
    long long own = 0;
    for (int p = 0; p < n_parts; p++) {
        uint64_t want = cy_part_word(s, CY_PART_FREE);
        if (__atomic_compare_exchange_n(&g->state[p], &want, cy_part_word(s, CY_PART_CALLER),
                                        0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
            long long t0 = cy_now_ns();
            fn(job, p, 0);
            long long dt = cy_now_ns() - t0;
            g->caller_ns += dt;
            if (dt > own)
                own = dt;
        }
    }
    long long tw0 = cy_now_ns();
    /* the helper's: wait a little for each, else take it back */
    unsigned long long helped = g->helped;
    for (int p = 0; p < n_parts; p++) {
        uint64_t st = __atomic_load_n(&g->state[p], __ATOMIC_ACQUIRE);
        if (st == cy_part_word(s, CY_PART_CALLER))
            continue;
        if (st == cy_part_word(s, CY_PART_HELPER)) {
            long long deadline = cy_now_ns() + 2 * own + CY_HELPER_SLACK_NS;
            unsigned k = 0;
            while (st == cy_part_word(s, CY_PART_HELPER)
                   && ((++k % 64) || cy_now_ns() < deadline)) {
                CY_PAUSE();
                st = __atomic_load_n(&g->state[p], __ATOMIC_ACQUIRE);
            }
            if (st == cy_part_word(s, CY_PART_HELPER)
                    && __atomic_compare_exchange_n(&g->state[p], &st,
                                                   cy_part_word(s, CY_PART_CALLER), 0,
                                                   __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
                fn(job, p, 0);
                g->taken_back++;
                continue;
            }
            /* the exchange failed: st now holds DONE */
        }
        collect(job, p, 0);
        g->helped++;
    }
    g->wait_ns += cy_now_ns() - tw0;
    if (g->helped > helped) {
        g->missed = 0;
        g->probes = 0;
    } else {
        g->missed++;
    }
    cy_helper_unlock();
}

/* Wait until the helper is inside no part function: the owner of a job's buffers calls
 * this before freeing them (a part the caller took back may still be running late). */
static void cy_helper_quiesce(void)
{
    cy_helper_t *g = &cy_helper_g;
    if (g->started <= 0)
        return;
    while (!cy_helper_try_lock())
        sched_yield();
    while (__atomic_load_n(&g->busy, __ATOMIC_SEQ_CST))
        sched_yield();
    cy_helper_unlock();
}

#else   /* no POSIX threads: every part on the caller */

static void cy_helper_run(const void *job, size_t size, int n_parts, cy_part_fn fn,
                          cy_part_fn collect, int reverse)
{
    (void) size;
    (void) collect;
    for (int q = 0; q < n_parts; q++)
        fn(job, reverse ? n_parts - 1 - q : q, 0);
    cy_helper_g.alone++;
}

static void cy_helper_quiesce(void) {}

#endif

static int cy_helper_available(void) { return CY_HAVE_HELPER; }

/* test hooks: plain stores, read by the helper with relaxed loads */
static void cy_helper_set_delay(long long ns) { cy_helper_g.delay_ns = ns; }

static void cy_helper_set_stay_awake(int on) { cy_helper_g.stay_awake = on; }

#endif
