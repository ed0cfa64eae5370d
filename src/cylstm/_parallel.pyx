"""The compiled half of cylstm's thread policy (cylstm/_threads.py is the Python half).

Every kernel module cimports team(), split(), the MIN_PARALLEL_* thresholds, note_team()
and the BLAS pin from here (see _parallel.pxd and docs/architecture.md, "Thread policy").
"""

from cpython.pythread cimport (PyThread_type_lock, PyThread_allocate_lock,
                               PyThread_acquire_lock, PyThread_release_lock, WAIT_LOCK)
from cython.parallel cimport prange

cdef extern from *:
    """
    /* Relaxed atomics: note_team() runs in every thread of a region. */
    #if defined(__GNUC__) || defined(__clang__)
    static inline void CY_ATOMIC_MAX(int *p, int v) {
        int o = __atomic_load_n(p, __ATOMIC_RELAXED);
        while (o < v && !__atomic_compare_exchange_n(p, &o, v, 1, __ATOMIC_RELAXED,
                                                     __ATOMIC_RELAXED)) {}
    }
    #else
    static inline void CY_ATOMIC_MAX(int *p, int v) { if (*p < v) *p = v; }
    #endif
    """
    void CY_ATOMIC_MAX(int* p, int v) noexcept nogil


# Multiplies every MIN_PARALLEL_* threshold. 1 in normal use; tests set 0 so that their
# small shapes form real teams (cylstm._threads.force_parallel()).
cdef double _work_scale = 1.0
# A forked child of a process whose OpenMP runtime had started a thread pool runs every
# kernel on one thread: GNU libgomp's pool does not survive fork, and a team of two in
# the child waits forever for threads that are not there (cylstm/_threads.py warns).
# A one-thread region is safe there: libgomp's gomp_team_start returns before it
# touches the pool when the team has one thread (tests/test_fork.py checks it).
cdef bint _serial_only = False
# The largest team any region has run with (omp_get_num_threads() inside the region).
cdef int _max_team = 0


cdef int team(int n_threads, int n_parts, double work, double minimum) noexcept nogil:
    """Threads worth waking for n_parts parts of `work` units in all (`minimum`: the
    kernel's MIN_PARALLEL_* threshold)."""
    if _serial_only or work < minimum * _work_scale:
        return 1
    return max(1, min(n_threads, n_parts))


cdef void note_team() noexcept nogil:
    """Record the size of the current team; call from inside a parallel region."""
    CY_ATOMIC_MAX(&_max_team, omp_get_num_threads())


def openmp_enabled():
    """True when the kernels were compiled with OpenMP (multicore), False if serial."""
    return bool(CYLSTM_OPENMP)


def openmp_max_threads():
    """omp_get_max_threads(): OMP_NUM_THREADS if set, else the usable cores (1 if serial)."""
    return omp_get_max_threads()


def run_pair(f0, f1):
    """[f0(), f1()] run at once on a team of two OpenMP threads: this thread and a
    worker of its own OpenMP pool, each calling one with the GIL held (the kernels they
    call release it, and any region they open runs inside that thread alone, a nested
    region of one thread). For the two directions of a bidirectional layer on two
    threads (cylstm.layers._both_directions): a Python helper thread there competes for
    the cores with this thread's pool worker, which spins for a while after each region
    (libgomp), and a small layer then ran no faster than the directions one after the
    other; the pool worker itself costs nothing to wake. Sequential in a serial build or
    a forked child. An exception from either is raised after both have run (f0's, with
    f1's as its context, when both raise); so a KeyboardInterrupt in this thread waits
    for the other call to end.
    """
    cdef int i
    results = [None, None]
    errors = [None, None]
    calls = (f0, f1)
    if _serial_only or not CYLSTM_OPENMP:
        for i in range(2):
            _call_into(calls, i, results, errors)
    else:
        with nogil:
            for i in prange(2, num_threads=2, schedule="static", chunksize=1):
                note_team()            # a forked child must then run serially
                with gil:
                    _call_into(calls, i, results, errors)
    if errors[0] is not None:
        if errors[1] is not None and errors[0].__context__ is None:
            errors[0].__context__ = errors[1]     # shown as "During handling of ..."
        raise errors[0]
    if errors[1] is not None:
        raise errors[1]
    return results


cdef void _call_into(tuple calls, int i, list results, list errors) noexcept:
    """results[i] = calls[i](), or errors[i] = what it raised (names local to the call,
    so the two threads of run_pair share nothing but the lists' own slots)."""
    try:
        results[i] = calls[i]()
    except BaseException as exc:
        errors[i] = exc


def thresholds():
    """The named work sizes of _parallel.pxd, by name."""
    return {"MIN_PARALLEL_MACS": MIN_PARALLEL_MACS, "MIN_HELPER_MACS": MIN_HELPER_MACS,
            "MIN_PARALLEL_XENT": MIN_PARALLEL_XENT,
            "MIN_PARALLEL_COPY": MIN_PARALLEL_COPY, "MIN_PARALLEL_ELEMS": MIN_PARALLEL_ELEMS,
            "MIN_PARALLEL_PASS": MIN_PARALLEL_PASS,
            "PACK_MIN_STEPS": PACK_MIN_STEPS}


def max_team():
    """The largest OpenMP team a kernel region has run with in this process (0: none)."""
    return _max_team


def _reset_max_team():
    global _max_team
    _max_team = 0


def set_min_work_scale(double scale):
    """Scale every MIN_PARALLEL_* threshold (1: normal; 0: any work forms a team).
    Returns the previous scale. Results do not depend on it, only who computes."""
    global _work_scale
    if not scale >= 0:
        raise ValueError(f"scale must be >= 0, got {scale}")
    previous = _work_scale
    _work_scale = scale
    return previous


def _set_serial_only(bint on):
    global _serial_only
    _serial_only = on


def serial_only():
    """True when every kernel runs on one thread (a forked child; see _threads.py)."""
    return bool(_serial_only)


# ---- BLAS threads -----------------------------------------------------------------------
#
# All of cylstm's parallelism is its own OpenMP threads, each calling a single-threaded
# BLAS; a BLAS that spawned its own threads inside them would oversubscribe the cores.
# OpenBLAS >= 0.3.27 has openblas_set_num_threads_local(), meant to hold only the calling
# thread to n threads; in scipy's pthreads OpenBLAS it acts on the whole process (another
# thread reads the new count), so "each OpenMP thread sets 1 on entry and restores on
# exit" races (A saves 2 and sets 1, B saves that 1, A restores 2, B restores 1: the
# process is left at 1; tests/test_concurrency.py checks it). Hence the pin is reference
# counted under one lock: the first thread in saves the count and sets 1, the last one
# out restores it, whatever the interleaving of the OpenMP threads of one call or of
# concurrent calls from several Python threads. While any kernel runs, BLAS calls
# elsewhere in the process are single-threaded too. cylstm._threads finds the symbol in
# the BLAS behind scipy.linalg.cython_blas and registers it here; without one, _threads
# pins that BLAS to one thread around each call (threadpoolctl) instead.

ctypedef int (*_set_local_fn)(int) noexcept nogil
cdef _set_local_fn _blas_set_local = NULL
cdef PyThread_type_lock _pin_lock = PyThread_allocate_lock()
cdef int _pin_count = 0           # threads inside a kernel region, under _pin_lock
cdef int _pin_saved = 0           # the count the first of them found


def _register_blas_set_local(size_t address):
    """Register openblas_set_num_threads_local (its address), or 0 to unregister."""
    global _blas_set_local
    _blas_set_local = <_set_local_fn> address


# The threadpoolctl pin _threads.py uses when there is no thread-local setter, for the
# entry points that pin BLAS themselves (StepRunner.run: a step is too short for a
# Python `with` around it); None when the setter is registered.
cdef object _fallback_pin = None


def _register_fallback_pin(pin):
    global _fallback_pin
    _fallback_pin = pin


cdef object fallback_pin():
    return _fallback_pin


def blas_set_local_registered():
    """True when the kernels hold BLAS to one thread themselves (thread-local setter)."""
    return _blas_set_local != NULL


cdef void blas_single_enter() noexcept nogil:
    global _pin_count, _pin_saved
    if _blas_set_local == NULL:
        return
    PyThread_acquire_lock(_pin_lock, WAIT_LOCK)
    if _pin_count == 0:
        _pin_saved = _blas_set_local(1)
    _pin_count += 1
    PyThread_release_lock(_pin_lock)


cdef void blas_single_exit() noexcept nogil:
    global _pin_count
    if _blas_set_local == NULL:
        return
    PyThread_acquire_lock(_pin_lock, WAIT_LOCK)
    _pin_count -= 1
    if _pin_count == 0:
        _blas_set_local(_pin_saved)
    PyThread_release_lock(_pin_lock)


def _after_fork_in_child():
    """In a forked child, only the forking thread exists: a pin lock another thread
    held at fork would never be released, so the child gets a fresh one, and a pin those
    threads held is undone (their kernel calls do not continue in the child)."""
    global _pin_lock, _pin_count
    _pin_lock = PyThread_allocate_lock()        # the old one may be held: leak it
    if _pin_count > 0 and _blas_set_local != NULL:
        _blas_set_local(_pin_saved)
    _pin_count = 0
