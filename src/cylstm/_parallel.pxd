# cylstm's thread policy for the compiled kernels: OpenMP, team size, fixed parts, the
# thresholds below which a call stays on one thread, and the BLAS pin. Every kernel
# module cimports this; cylstm/_threads.py is its only Python owner. See
# docs/architecture.md, "Thread policy".
#
# Reproducibility rests on one rule: work is cut into parts that depend only on the
# shapes and on n_parts (the machine's usable cores, fixed per process by _threads.py),
# never on the thread count. team() only decides who computes a part, so every result
# is bitwise the same for any number of threads.

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define CYLSTM_OPENMP 1
    #else
    #define CYLSTM_OPENMP 0
    static int omp_get_max_threads(void) { return 1; }
    static int omp_get_num_threads(void) { return 1; }
    static int omp_get_thread_num(void) { return 0; }
    #endif
    """
    bint CYLSTM_OPENMP
    int omp_get_max_threads() noexcept nogil
    int omp_get_num_threads() noexcept nogil
    int omp_get_thread_num() noexcept nogil


# Work sizes below which a call runs on one thread, in the unit each kernel counts.
# Waking an OpenMP team costs more than it saves below them, and on a busy machine a
# 2-thread region also waits for the scheduler to run the second thread (a B = 1
# streaming step took 20 ms instead of 0.1 ms next to another busy process). They
# only choose who computes a part, never the parts, so results are the same either way.
cdef enum:
    # LSTM sequence and step: multiply-adds of the GEMMs of one region.
    MIN_PARALLEL_MACS = 1 << 20
    # A streaming step below MIN_PARALLEL_MACS shares its parts with the step's helper
    # thread (_helper.h), which the caller never waits for, from this many: below it
    # the hand-over costs about what the second core saves.
    MIN_HELPER_MACS = 1 << 17
    # Softmax cross-entropy: logits (an exp, a max and a scale each). Inside a training
    # step a cheap 2-thread region can wait milliseconds for a second thread the
    # scheduler has not run yet on a busy machine, while it saves ~0.1 ms on (3200, 81)
    # logits; so it starts at larger sizes than a standalone call would pick.
    MIN_PARALLEL_XENT = 1 << 19
    # Embedding gather / scatter-add: elements copied (a load and a store each); same
    # reasoning as the cross-entropy.
    MIN_PARALLEL_COPY = 1 << 20
    # Optimiser updates: arena elements. Not measured on an idle machine; set between
    # the copy and the cross-entropy cut-offs, as an update does a few flops per element.
    MIN_PARALLEL_ELEMS = 1 << 15
    # One read of each element (the gradient norm, the clipping scale): 356k float32
    # take 0.11 ms on one thread, so a team pays only for far larger arenas.
    MIN_PARALLEL_PASS = 1 << 20
    # Fewest time steps for which a float32 sequence call packs its recurrent weights
    # for the per-step kernel (_rgemm.h): packing copies the whole weight once, and
    # below this BLAS is cheaper (a streaming step, T = 1, at B = 1, H = 256: 183 us
    # packed vs 66 us with BLAS). Depends on T only, never on threads.
    PACK_MIN_STEPS = 4


cdef int team(int n_threads, int n_parts, double work, double minimum) noexcept nogil
cdef void note_team() noexcept nogil
cdef void blas_single_enter() noexcept nogil
cdef void blas_single_exit() noexcept nogil
cdef object fallback_pin()


cdef inline Py_ssize_t split(Py_ssize_t n, int parts, int p) noexcept nogil:
    """Start of part p when n items are cut into `parts` near-equal contiguous parts."""
    return (n * p) // parts
