# The only place in cylstm that touches omp_*. Without -fopenmp the fallbacks
# below keep the module importable and serial (a direct `cimport openmp` would
# fail at import time in such a build); prange then runs as a plain loop.

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define CYLSTM_OPENMP 1
    #else
    #define CYLSTM_OPENMP 0
    static int omp_get_max_threads(void) { return 1; }
    static int omp_get_thread_num(void) { return 0; }
    #endif
    """
    bint CYLSTM_OPENMP
    int omp_get_max_threads() noexcept nogil
    int omp_get_thread_num() noexcept nogil
