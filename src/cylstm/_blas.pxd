# Row-major BLAS for cylstm, over scipy.linalg.cython_blas (fused float/double).
#
# Every BLAS call in cylstm goes through this file; kernels never cimport
# scipy.linalg.cython_blas directly. scipy hands out Fortran (column-major)
# routines by pointer, so no BLAS link flags are needed. A row-major product
# C = op(A) op(B) is the column-major product C^T = op(B)^T op(A)^T: swap the
# operands and m/n, never copy. scipy's prototypes lack `const`; it is cast
# away here and only here.

from cython cimport floating
from libc.string cimport memcpy
from scipy.linalg.cython_blas cimport sgemm, dgemm


cdef inline void gemm(bint trans_a, bint trans_b, int m, int n, int k,
                      floating alpha, const floating* a, int lda,
                      const floating* b, int ldb,
                      floating beta, floating* c, int ldc) noexcept nogil:
    """C (m, n) := alpha*op(A)@op(B) + beta*C, row-major; op(A) (m, k), op(B) (k, n)."""
    cdef char ta = b'T' if trans_b else b'N'   # column-major: B^T comes first
    cdef char tb = b'T' if trans_a else b'N'
    cdef int i, j
    if m <= 0 or n <= 0:
        return
    if k <= 0:                      # empty sum: C := beta*C (BLAS would reject lda=0)
        for i in range(m):
            for j in range(n):
                c[i * ldc + j] = 0 if beta == 0 else beta * c[i * ldc + j]
        return
    if floating is float:
        sgemm(&ta, &tb, &n, &m, &k, &alpha, <float*> b, &ldb, <float*> a, &lda,
              &beta, c, &ldc)
    else:
        dgemm(&ta, &tb, &n, &m, &k, &alpha, <double*> b, &ldb, <double*> a, &lda,
              &beta, c, &ldc)


cdef inline void affine_rows(floating* y, const floating* x, const floating* w,
                             const floating* bias, Py_ssize_t r0, Py_ssize_t r1,
                             int I, int O) noexcept nogil:
    """Rows [r0, r1) of Y (N, O) := X (N, I) @ W^T + b, W (O, I), b (O,) or NULL: the
    input projection of an LSTM and a Linear layer's forward. The bias is copied into
    the rows first and the GEMM adds to it (beta = 1), so no second pass is needed."""
    cdef Py_ssize_t r
    cdef floating beta = 0
    if r1 <= r0:
        return
    if bias != NULL:
        beta = 1
        for r in range(r0, r1):
            memcpy(y + r * O, bias, O * sizeof(floating))
    gemm(False, True, <int> (r1 - r0), O, I, 1, x + r0 * I, I, w, I, beta, y + r0 * O, O)
