# The BLAS pin of _lstm.pyx ("BLAS threads"), shared with the other kernel modules:
# one reference count for the whole process, so kernels of different modules running
# at once save and restore the BLAS thread count once.
cdef int _blas_single_enter() noexcept nogil
cdef void _blas_single_exit(int previous) noexcept nogil
