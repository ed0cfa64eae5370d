"""Compiled LSTM kernels: one layer, one direction, the whole sequence.

Dimension legend (used in every shape comment):
    T  time steps      B  batch rows      I  input features
    H  hidden units    G = 4H, gate pre-activations in PyTorch's order [i | f | g | o]
    P  projection size (PyTorch's proj_size; 0 = none);  Hp = P if P > 0 else H
Weights are PyTorch's: W_ih (G, I), W_hh (G, Hp), W_hr (P, H); b = b_ih + b_hh (G,).
The state h and the output y have Hp features, the cell c has H.
Every array is C-contiguous and time-major (T, B, .). Outputs come first, then inputs,
then sizes. The Python layer (cylstm/functional.py) validates and allocates; the kernels
here trust their arguments, allocate nothing and run without the GIL.

Forward, per step t (the backward refers to these numbers):
    (1) z_t = (x_t W_ih^T + b) + h_{t-1} W_hh^T             (B, G)
    (2) i = sigmoid(z[i])  f = sigmoid(z[f])  g = tanh(z[g])  o = sigmoid(z[o])
    (3) c_t = f * c_{t-1} + i * g
    (4) m_t = o * tanh(c_t)
    (5) h_t = m_t W_hr^T with a projection, else h_t = m_t
Backward, per step (dh = dL/dh_t, dc = dL/dc_t accumulated from later steps):
    (5') dm = dh W_hr with a projection (after the loop dW_hr += dh^T m), else dm = dh
    (4') do = dm * tanh(c_t);  dc += dm * o * (1 - tanh(c_t)^2)
    (3') di = dc * g;  dg = dc * i;  df = dc * c_{t-1};  dc_{t-1} = dc * f
    (2') dz = [di i(1-i), df f(1-f), dg (1-g^2), do o(1-o)]
    (1') dh_{t-1} = dz W_hh;  after the loop: dW_ih += dz^T x, dW_hh += dz^T h_{t-1},
         db += sum dz, dx = dz W_ih (one GEMM or reduction each over all T*B rows).

Variable lengths (PyTorch's packed semantics): row b is active at loop step s < L = lengths[b];
its time index is t = s forward and t = L-1-s in reverse, so reverse runs over each
sequence's own valid steps, with no packing or copying. At an inactive step the state
is frozen and y[t=s, b] = 0 (for s >= L, t = s walks exactly the padded positions).

Parallel structure. Batch rows are independent sequences, so the batch is cut into fixed
chunks and each OpenMP thread runs the *whole* time loop of its chunks: per step one
single-threaded GEMM h_{t-1} W_hh^T on its own rows, then its fused gate math. There is no
barrier between steps at all. The alternative the design asked to measure, one
multithreaded GEMM per step followed by a prange over the gates, needs two barriers per
step; the figures that decided it are in the comment below.
The large GEMMs (input projection before the loop; dW_ih, dW_hh, db, dx after it) run
over fixed row blocks in a prange, each block one single-threaded GEMM.
Chunk and block boundaries depend only on the shapes and on `n_parts` (fixed per process
by the Python layer from the machine's core count, never from the thread count), and
shared gradients are written only by the block that owns their rows, so results are
bitwise identical for any number of threads.
"""

from cython cimport floating
from cython.parallel cimport prange
from cpython.pythread cimport (PyThread_type_lock, PyThread_allocate_lock,
                               PyThread_acquire_lock, PyThread_release_lock, WAIT_LOCK)
from cpython.buffer cimport PyBUF_C_CONTIGUOUS, PyBUF_FORMAT, PyBuffer_Release, PyObject_GetBuffer
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.string cimport memcpy, memset

from cylstm._blas cimport gemm
from cylstm._openmp_helpers cimport CYLSTM_OPENMP, omp_get_max_threads


# Time loop design, measured (bench/chunking.py in commit 3bee9f6; float32 forward, median
# ms, 2-core Xeon, OpenBLAS 0.3.30; blocks of reps alternating with pauses):
#   chunked = per-thread batch chunks, each its own GEMM + gates, no per-step barrier
#   shared  = one OpenBLAS GEMM over all B rows per step, then a prange over the gates
#             config     1 thread: chunked / shared     2 threads: chunked / shared
#             tiny           0.111 / 0.161                  0.135 / 0.229
#             small          11.3  / 7.80                   6.29  / 972
#             medium         57.5  / 42.1                   33.1  / 1031
#             large          298   / 267                    214   / 1110
# At 2 threads the shared design collapses: OpenBLAS's threads and the OpenMP team
# fight for the cores at two barriers per step. At 1 thread it wins 10-30%, because the
# chunked design's two GEMMs per step pack W_hh twice (OpenBLAS packs its operands on
# every call; BENCH.md). Chunked it is; a recurrent product on weights packed once
# removes that 1-thread cost and is the next step for speed.


# BLAS threads. All of cylstm's parallelism is its own OpenMP threads, each calling a
# single-threaded BLAS; a BLAS that spawned its own threads inside them would
# oversubscribe the cores (measured: large forward 490 ms at 1 thread, 802 ms at 2).
# OpenBLAS >= 0.3.27 has openblas_set_num_threads_local(), meant to hold only the
# calling thread to n threads. In scipy's pthreads OpenBLAS 0.3.30 it acts on the whole
# process (another thread reads the new count), so "each OpenMP thread sets 1 on entry
# and restores on exit" raced: thread A saves 2 and sets 1, thread B saves that 1, A
# restores 2, B restores 1, and the process was left at 1 (tests/test_concurrency.py
# caught it). So the pin is reference-counted under one lock: the first thread in saves
# the count and sets 1, the last one out restores it, whatever the interleaving of the
# OpenMP threads of one call or of concurrent calls from several Python threads. While
# any kernel runs, BLAS calls elsewhere in the process are single-threaded too.
# cylstm._threads finds the symbol in the BLAS behind scipy.linalg.cython_blas and
# registers it here; without it, _threads pins that BLAS to one thread around each call.
ctypedef int (*_set_local_fn)(int) noexcept nogil
cdef _set_local_fn _blas_set_local = NULL
cdef PyThread_type_lock _pin_lock = PyThread_allocate_lock()
cdef int _pin_count = 0           # threads inside a kernel region, under _pin_lock
cdef int _pin_saved = 0           # the count the first of them found


def _register_blas_set_local(size_t address):
    """Register openblas_set_num_threads_local (its address), or 0 to unregister."""
    global _blas_set_local
    _blas_set_local = <_set_local_fn> address


cdef int _blas_single_enter() noexcept nogil:
    global _pin_count, _pin_saved
    if _blas_set_local == NULL:
        return 0
    PyThread_acquire_lock(_pin_lock, WAIT_LOCK)
    if _pin_count == 0:
        _pin_saved = _blas_set_local(1)
    _pin_count += 1
    PyThread_release_lock(_pin_lock)
    return 0


cdef void _blas_single_exit(int previous) noexcept nogil:
    global _pin_count
    if _blas_set_local == NULL:
        return
    PyThread_acquire_lock(_pin_lock, WAIT_LOCK)
    _pin_count -= 1
    if _pin_count == 0:
        _blas_set_local(_pin_saved)
    PyThread_release_lock(_pin_lock)


def openmp_enabled():
    """True when the kernels were compiled with OpenMP (multicore), False if serial."""
    return bool(CYLSTM_OPENMP)


def openmp_max_threads():
    """omp_get_max_threads(): OMP_NUM_THREADS if set, else the usable cores (1 if serial)."""
    return omp_get_max_threads()


# ----------------------------------------------------------------------------------------
# Elementwise pieces
# ----------------------------------------------------------------------------------------

cdef extern from "_activations.h" nogil:
    void cy_sigmoid_add_f32(float* z, const float* hz, int n)
    void cy_tanh_add_f32(float* z, const float* hz, int n)
    void cy_tanh_f32_array(float* out, const float* x, int n)
    void cy_sigmoid_add_f64(double* z, const double* hz, int n)
    void cy_tanh_add_f64(double* z, const double* hz, int n)
    void cy_tanh_f64_array(double* out, const double* x, int n)
    void cy_cell_f32(float* c, float* m, float* tc, const float* z, int H, int gs)
    void cy_cell_f64(double* c, double* m, double* tc, const double* z, int H, int gs)
    void cy_gate_grads_f32(float* dz, float* dc, const float* z, const float* tc,
                           const float* cprev, const float* dm, int H)
    void cy_gate_grads_f64(double* dz, double* dc, const double* z, const double* tc,
                           const double* cprev, const double* dm, int H)


cdef inline void _activate_gates(floating* z, const floating* hz, int H) noexcept nogil:
    """z (G,) := [sigmoid, sigmoid, tanh, sigmoid](z + hz), gate blocks [i|f|g|o]   (1)(2)"""
    if floating is float:
        cy_sigmoid_add_f32(z, hz, 2 * H)
        cy_tanh_add_f32(z + 2 * H, hz + 2 * H, H)
        cy_sigmoid_add_f32(z + 3 * H, hz + 3 * H, H)
    else:
        cy_sigmoid_add_f64(z, hz, 2 * H)
        cy_tanh_add_f64(z + 2 * H, hz + 2 * H, H)
        cy_sigmoid_add_f64(z + 3 * H, hz + 3 * H, H)


def _activations_f32(const float[::1] x):
    """Test hook: (sigmoid(x), tanh(x)) through the float32 row functions the kernels use."""
    import numpy as np
    n = x.shape[0]
    zeros = np.zeros(n, np.float32)
    sig = np.array(x, dtype=np.float32)
    th = np.array(x, dtype=np.float32)
    cdef float[::1] s = sig, t = th, z = zeros
    if n:
        cy_sigmoid_add_f32(&s[0], &z[0], n)
        cy_tanh_add_f32(&t[0], &z[0], n)
    return sig, th


# ----------------------------------------------------------------------------------------
# Per-step products: float32 on weights packed once per call (_rgemm.h), else BLAS
# ----------------------------------------------------------------------------------------

cdef extern from "_rgemm.h" nogil:
    ctypedef void (*cy_gemm_packed_fn)(int, int, int, const float*, int, const float*,
                                       float*, int) noexcept nogil
    size_t cy_packed_size(int K, int N)
    void cy_pack_f32(float* packed, const float* w, int K, int N, int ldw, int trans)
    int cy_rgemm_level()
    cy_gemm_packed_fn cy_rgemm_select(int level)
    ctypedef void (*cy_dot_rows_fn)(int, int, int, const float*, int, const float*, int,
                                    float*, int) noexcept nogil
    cy_dot_rows_fn cy_dot_select(int level)

cdef int _rgemm_lvl = cy_rgemm_level()
cdef cy_gemm_packed_fn _rgemm = cy_rgemm_select(_rgemm_lvl)
cdef cy_dot_rows_fn _dot = cy_dot_select(_rgemm_lvl)    # the streaming step's products


def rgemm_level():
    """Which per-step float32 kernel runs: 2 AVX-512, 1 AVX2+FMA, 0 BLAS."""
    return _rgemm_lvl if _rgemm != NULL else 0


def _set_rgemm_level(int level):
    """Test hook: force a kernel level (0 = BLAS); never above what the CPU supports."""
    global _rgemm_lvl, _rgemm, _dot
    _rgemm_lvl = min(level, cy_rgemm_level())
    _rgemm = cy_rgemm_select(_rgemm_lvl)
    _dot = cy_dot_select(_rgemm_lvl)


# Packed panels start on a 64-byte boundary, so that the kernel's 64-byte loads never
# straddle two cache lines: the scratch has this many floats of slack to align in.
# (NumPy's large arrays start 16 bytes past a page.)
cdef enum:
    _PACK_SLACK = 16


def pack_floats(int K, int N):
    """Floats of scratch that packing a (K, N) weight for the per-step kernel needs
    (0 when the per-step kernel is BLAS)."""
    return cy_packed_size(K, N) + _PACK_SLACK if _rgemm != NULL and K > 0 and N > 0 else 0


def _packed_matmul_f32(const float[:, ::1] a, const float[:, ::1] w, bint trans):
    """Test hook: A (M, K) @ op(W) through the packed per-step kernel; op(W) = W^T if
    trans (w is (N, K)), else W (w is (K, N)). Raises if this CPU has no such kernel."""
    import numpy as np
    cdef int M = a.shape[0], K = a.shape[1], N = w.shape[0] if trans else w.shape[1]
    if _rgemm == NULL:
        raise RuntimeError("no packed kernel on this CPU (rgemm_level() == 0)")
    if (w.shape[1] if trans else w.shape[0]) != K or M < 1 or N < 1 or K < 1:
        raise ValueError("shapes do not match")
    packed = np.empty(cy_packed_size(K, N), np.float32)
    out = np.empty((M, N), np.float32)
    cdef float[::1] pk = packed
    cdef float[:, ::1] c = out
    cy_pack_f32(&pk[0], &w[0, 0], K, N, w.shape[1], trans)
    _rgemm(M, N, K, &a[0, 0], K, &pk[0], &c[0, 0], N)
    return out


def _dot_matmul_f32(const float[:, ::1] a, const float[:, ::1] w):
    """Test hook: A (M, K) @ W^T, W (N, K), through the streaming step's dot kernel on
    unpacked weights. Raises if this CPU has no such kernel."""
    import numpy as np
    cdef int M = a.shape[0], K = a.shape[1], N = w.shape[0]
    if _dot == NULL:
        raise RuntimeError("no dot kernel on this CPU (rgemm_level() == 0)")
    if w.shape[1] != K or M < 1 or N < 1 or K < 1:
        raise ValueError("shapes do not match")
    out = np.empty((M, N), np.float32)
    cdef float[:, ::1] c = out
    _dot(M, N, K, &a[0, 0], K, &w[0, 0], K, &c[0, 0], N)
    return out


cdef float* _wpack_slot(float[::1] wpack, int K, int N, int Kr, int Nr) except? NULL:
    """Start of the packed (K, N) recurrent weight in the caller's scratch (the packed
    (Kr, Nr) projection follows it), or NULL when there is no scratch or no kernel."""
    if wpack is None or pack_floats(K, N) == 0:
        return NULL
    _check(<size_t> wpack.shape[0] >= cy_packed_size(K, N) + _PACK_SLACK
           + (cy_packed_size(Kr, Nr) if Kr > 0 and Nr > 0 else 0), "wpack")
    return &wpack[0] + ((64 - (<size_t> &wpack[0] & 63)) & 63) // sizeof(float)


cdef inline void _rec_mm(int m, int n, int k, const floating* a, int lda,
                         const floating* w, int ldw, bint w_trans, const float* packed,
                         floating* c, int ldc) noexcept nogil:
    """C (m, n) = A (m, k) @ op(W), op(W) (k, n); from the packed W when there is one."""
    if floating is float:
        if packed != NULL:
            _rgemm(m, n, k, a, lda, packed, c, ldc)
            return
    gemm(False, w_trans, m, n, k, 1, a, lda, w, ldw, 0, c, ldc)


cdef inline float* _pack(float* dst, const floating* w, int K, int N, int ldw,
                         bint trans) noexcept nogil:
    """Pack op(W) (K, N) into dst for _rec_mm (float32 with a kernel), or return NULL."""
    if floating is float:
        if dst != NULL and _rgemm != NULL and K > 0 and N > 0:
            cy_pack_f32(dst, w, K, N, ldw, trans)
            return dst
    return NULL


# Work below this many multiply-adds runs on one thread: waking a team costs more, and
# on a busy machine a 2-thread region waits for the scheduler to run the second thread
# (a B = 1 streaming step took 20 ms instead of 0.1 ms next to another busy process).
# Only who computes a part changes, never the parts, so results stay bitwise the same.
cdef enum:
    _MIN_PARALLEL_MACS = 1 << 20


cdef inline int _team(int n_threads, int n_parts, double macs) noexcept nogil:
    """Threads worth waking for n_parts parts of `macs` multiply-adds in all."""
    if macs < _MIN_PARALLEL_MACS:
        return 1
    return min(n_threads, n_parts)


cdef inline int _split(int n, int parts, int p) noexcept nogil:
    """Start of part p when n items are cut into `parts` near-equal contiguous parts."""
    return <int> ((<long long> n * p) // parts)


# ----------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------

cdef void _project_block(
    floating* gates,            # (T*B, G) OUT rows [r0, r1): x W_ih^T + b      (1)
    const floating* x,          # (T*B, I)
    const floating* w_ih,       # (G, I)
    const floating* bias,       # (G,) or NULL
    int r0, int r1, int I, int G,
) noexcept nogil:
    cdef int r, j
    cdef floating beta = 0
    if bias != NULL:
        beta = 1
        for r in range(r0, r1):
            for j in range(G):
                gates[<Py_ssize_t> r * G + j] = bias[j]
    gemm(False, True, r1 - r0, G, I, 1, x + <Py_ssize_t> r0 * I, I, w_ih, I,
         beta, gates + <Py_ssize_t> r0 * G, G)


cdef inline void _forward_row(
    floating* m,                # (B, H) OUT row b: m_t = o * tanh(c_t) (h itself if P == 0)
    floating* c,                # (B, H) INOUT running c
    floating* gates,            # (T, B, G) INOUT: in x W_ih^T + b, out activated i, f, g, o
    floating* c_cache,          # (T, B, H) OUT c_t, or NULL (inference)
    floating* tc_cache,         # (T, B, H) OUT tanh(c_t), or NULL
    floating* m_cache,          # (T, B, H) OUT m_t, or NULL (inference, or P == 0)
    const floating* hz,         # (B, G) h_{t-1} W_hh^T of this step
    int B, int H, int t, int b,
) noexcept nogil:
    """Gates, cell and m_t of batch row b at time t (an active step), given hz."""
    cdef Py_ssize_t ho = (<Py_ssize_t> t * B + b) * H
    cdef floating* z = gates + (<Py_ssize_t> t * B + b) * 4 * H
    cdef floating* mb = m + <Py_ssize_t> b * H
    cdef floating* cb = c + <Py_ssize_t> b * H
    _activate_gates(z, hz + <Py_ssize_t> b * 4 * H, H)                       # (1) (2)
    if floating is float:                                                    # (3) (4)
        cy_cell_f32(cb, mb, tc_cache + ho if c_cache != NULL else NULL, z, H, H)
    else:
        cy_cell_f64(cb, mb, tc_cache + ho if c_cache != NULL else NULL, z, H, H)
    if c_cache != NULL:
        memcpy(c_cache + ho, cb, H * sizeof(floating))
    if m_cache != NULL:
        memcpy(m_cache + ho, mb, H * sizeof(floating))


cdef inline int _active_end(const int* lengths, int r0, int r1, int s) noexcept nogil:
    """End of the shortest prefix [r0, end) of rows holding every row still running at
    iteration s (lengths[b] > s); r0 when none is. The per-step products run over that
    prefix only. Rows past their length are never read again until the state they
    froze is read at the end, so leaving their product rows stale is safe. With rows
    sorted by decreasing length (cylstm.LSTM orders the batch so for ragged lengths)
    the prefix is exactly the running rows, so finished sequences cost nothing."""
    cdef int hi = r1
    while hi > r0 and lengths[hi - 1] <= s:
        hi -= 1
    return hi


cdef void _forward_chunk(
    floating* y,                # (T, B, Hp) OUT, rows [r0, r1)
    floating* h,                # (B, Hp) INOUT: in h0, out h_n
    floating* c,                # (B, H) INOUT: in c0, out c_n
    floating* gates,            # (T, B, G) INOUT: in x W_ih^T + b, out activated gates
    floating* c_cache,          # (T, B, H) OUT or NULL
    floating* tc_cache,         # (T, B, H) OUT or NULL
    floating* m_cache,          # (T, B, H) OUT or NULL
    floating* hz,               # (B, G) scratch: h_{t-1} W_hh^T
    floating* mbuf,             # (B, H) scratch: m_t before the projection (P > 0 only)
    floating* hp,               # (B, P) scratch: m_t W_hr^T (P > 0 only)
    const floating* w_hh,       # (G, Hp)
    const floating* w_hr,       # (P, H) or NULL
    const float* whh_packed,    # W_hh^T packed for _rec_mm, or NULL (BLAS)
    const float* whr_packed,    # W_hr^T packed, or NULL
    const int* lengths,         # (B,) in 1..T
    int T, int B, int H, int P, int r0, int r1, bint reverse,
) noexcept nogil:
    """The whole time loop for batch rows [r0, r1), run by one thread."""
    cdef int G = 4 * H, Hp = P if P > 0 else H
    cdef int s, b, t, L, hi
    cdef floating* m = mbuf if P > 0 else h
    for s in range(T):
        hi = _active_end(lengths, r0, r1, s)
        if hi > r0:                    # rows past their length need no product  (1)
            _rec_mm(hi - r0, G, Hp, h + <Py_ssize_t> r0 * Hp, Hp, w_hh, Hp, True,
                    whh_packed, hz + <Py_ssize_t> r0 * G, G)
        for b in range(r0, r1):
            L = lengths[b]
            if s >= L:                 # padded position t = s: state frozen, output zero
                memset(y + (<Py_ssize_t> s * B + b) * Hp, 0, Hp * sizeof(floating))
                if c_cache != NULL:    # the cache holds zeros there, never stale memory
                    memset(gates + (<Py_ssize_t> s * B + b) * G, 0, G * sizeof(floating))
                    memset(c_cache + (<Py_ssize_t> s * B + b) * H, 0, H * sizeof(floating))
                    memset(tc_cache + (<Py_ssize_t> s * B + b) * H, 0, H * sizeof(floating))
                if m_cache != NULL:    # read by the dW_hr GEMM over all T*B rows
                    memset(m_cache + (<Py_ssize_t> s * B + b) * H, 0, H * sizeof(floating))
                continue
            t = L - 1 - s if reverse else s
            _forward_row(m, c, gates, c_cache, tc_cache, m_cache, hz, B, H, t, b)
            if P == 0:
                memcpy(y + (<Py_ssize_t> t * B + b) * H, m + <Py_ssize_t> b * H,
                       H * sizeof(floating))
        if P > 0 and hi > r0:                                                # (5)
            _rec_mm(hi - r0, P, H, mbuf + <Py_ssize_t> r0 * H, H, w_hr, H, True,
                    whr_packed, hp + <Py_ssize_t> r0 * P, P)
            for b in range(r0, r1):
                L = lengths[b]
                if s < L:              # inactive rows keep their frozen h
                    t = L - 1 - s if reverse else s
                    memcpy(h + <Py_ssize_t> b * P, hp + <Py_ssize_t> b * P, P * sizeof(floating))
                    memcpy(y + (<Py_ssize_t> t * B + b) * P, hp + <Py_ssize_t> b * P,
                           P * sizeof(floating))


def lstm_forward(
    *,
    floating[:, :, ::1] y,              # (T, B, Hp) OUT
    floating[:, ::1] h,                 # (B, Hp) INOUT: h0 in, h_n out
    floating[:, ::1] c,                 # (B, H) INOUT: c0 in, c_n out
    floating[:, :, ::1] gates,          # (T, B, G) OUT: activated gates (the cache)
    floating[:, :, ::1] c_cache,        # (T, B, H) OUT or None (inference)
    floating[:, :, ::1] tc_cache,       # (T, B, H) OUT or None (inference)
    floating[:, :, ::1] m_cache,        # (T, B, H) OUT with a projection in training, else None
    floating[:, ::1] hz,                # (B, G) scratch
    floating[:, ::1] mbuf,              # (B, H) scratch with a projection, else None
    floating[:, ::1] hp,                # (B, P) scratch with a projection, else None
    const floating[:, :, ::1] x,        # (T, B, I)
    const floating[:, ::1] w_ih,        # (G, I)
    const floating[:, ::1] w_hh,        # (G, Hp)
    const floating[:, ::1] w_hr,        # (P, H) or None (no projection)
    const floating[::1] bias,           # (G,) b_ih + b_hh, or None
    const int[::1] lengths,             # (B,) in 1..T
    bint reverse,
    int n_parts,
    int n_threads,
    float[::1] wpack=None,              # float32 scratch: pack_floats(Hp, G) + pack_floats(H, P)
):
    """One LSTM layer, one direction, over the whole sequence; see the module docstring.

    Callers pass every argument by keyword (cylstm.functional does); shapes are checked
    again here so that a wrong call raises instead of reading out of bounds.
    """
    cdef int T = x.shape[0], B = x.shape[1], I = x.shape[2]
    cdef int G = w_hh.shape[0], H = w_hh.shape[0] // 4, Hp = w_hh.shape[1]
    cdef int P = 0 if w_hr is None else w_hr.shape[0]
    cdef int p, n_chunks, prev
    cdef bint training = c_cache is not None
    cdef const floating* bias_p = NULL
    cdef const floating* w_hr_p = NULL
    cdef floating* cc_p = NULL
    cdef floating* tc_p = NULL
    cdef floating* m_p = NULL
    cdef floating* mbuf_p = NULL
    cdef floating* hp_p = NULL
    cdef float* whh_pk = NULL
    cdef float* whr_pk = NULL

    _check(G == 4 * H and Hp == (P if P > 0 else H) and _is(w_ih.shape, G, I), "weights")
    whh_pk = _wpack_slot(wpack, Hp, G, H, P)
    if whh_pk != NULL:
        whr_pk = whh_pk + cy_packed_size(Hp, G)
    _check(_is(y.shape, T, B, Hp) and _is(h.shape, B, Hp) and _is(c.shape, B, H), "y/h/c")
    _check(_is(gates.shape, T, B, G) and _is(hz.shape, B, G), "gates/hz")
    _check(lengths.shape[0] == B and n_parts >= 1 and n_threads >= 1, "lengths/n_parts")
    if bias is not None:
        _check(bias.shape[0] == G, "bias")
        bias_p = &bias[0]
    if training:
        _check(tc_cache is not None and _is(c_cache.shape, T, B, H)
               and _is(tc_cache.shape, T, B, H), "cache")
        cc_p = &c_cache[0, 0, 0]
        tc_p = &tc_cache[0, 0, 0]
    if P > 0:
        _check(_is(w_hr.shape, P, H) and mbuf is not None and hp is not None
               and _is(mbuf.shape, B, H) and _is(hp.shape, B, P), "projection")
        w_hr_p = &w_hr[0, 0]
        mbuf_p = &mbuf[0, 0]
        hp_p = &hp[0, 0]
        if training:
            _check(m_cache is not None and _is(m_cache.shape, T, B, H), "m_cache")
            m_p = &m_cache[0, 0, 0]
    if T == 0 or B == 0:
        return
    n_chunks = min(B, n_parts)
    with nogil:
        whh_pk = _pack(whh_pk, &w_hh[0, 0], Hp, G, Hp, True)
        if P > 0 and whh_pk != NULL:
            whr_pk = _pack(whr_pk, w_hr_p, H, P, H, True)
        for p in prange(n_parts, schedule="static",
                        num_threads=_team(n_threads, n_parts, <double> T * B * G * I)):
            prev = _blas_single_enter()
            _project_block(&gates[0, 0, 0], &x[0, 0, 0], &w_ih[0, 0], bias_p,
                           _split(T * B, n_parts, p), _split(T * B, n_parts, p + 1), I, G)
            _blas_single_exit(prev)
        for p in prange(n_chunks, schedule="static",
                        num_threads=_team(n_threads, n_chunks, <double> T * B * G * (Hp + P))):
            prev = _blas_single_enter()
            _forward_chunk(&y[0, 0, 0], &h[0, 0], &c[0, 0], &gates[0, 0, 0], cc_p, tc_p, m_p,
                           &hz[0, 0], mbuf_p, hp_p, &w_hh[0, 0], w_hr_p, whh_pk,
                           whr_pk if P > 0 else NULL, &lengths[0],
                           T, B, H, P, _split(B, n_chunks, p), _split(B, n_chunks, p + 1),
                           reverse)
            _blas_single_exit(prev)


# ----------------------------------------------------------------------------------------
# Streaming step: T = 1, every layer, the weights read in place
# ----------------------------------------------------------------------------------------

cdef inline void _rows_wt(int m, int n, int k, const floating* a, int lda,
                          const floating* w, floating* c, int ldc) noexcept nogil:
    """C (m, n) = A (m, k) @ W^T, W (n, k) read in place: the dot kernel for float32 on
    a CPU that has it, else BLAS."""
    if floating is float:
        if _dot != NULL:
            _dot(m, n, k, a, lda, w, k, c, ldc)
            return
    gemm(False, True, m, n, k, 1, a, lda, w, k, 0, c, ldc)


cdef void _step_units(
    floating* m,                # (B, H) OUT units [u0, u1) of m_t = o * tanh(c_t)
    floating* c,                # (B, H) INOUT units [u0, u1) of c
    floating* z,                # (B, G) scratch: x W_ih^T, then the activated gates
    floating* hz,               # (B, G) scratch: h W_hh^T + b
    floating* bsum,             # (G,) scratch: b_ih + b_hh
    const floating* x,          # (B, I)
    const floating* h,          # (B, Hp) h_{t-1}
    const floating* w_ih,       # (G, I)
    const floating* w_hh,       # (G, Hp)
    const floating* b_ih,       # (G,) or NULL
    const floating* b_hh,       # (G,) or NULL
    int B, int I, int H, int Hp, int u0, int u1, bint back,
) noexcept nogil:
    """One step (1)-(4) for hidden units [u0, u1) of every batch row: the rows of the
    four gates that belong to those units, so a thread owns its slice of the weights.
    back: read the weight blocks in the reverse order (see StepRunner.run)."""
    cdef int G = 4 * H, n = u1 - u0, qq, q, b, j, r0
    cdef bint blas = True
    cdef floating* zb
    cdef floating* cb
    cdef floating* mb
    if floating is float:
        blas = _dot == NULL
    # (1) as the sequence forward computes it, (x W_ih^T + b) + h W_hh^T, so that with
    # BLAS (float64) a step equals a sequence bitwise; BLAS gets whole rows [0, G)
    for qq in range(1 if blas else 4):
        q = 3 - qq if back and not blas else qq
        r0 = q * H + u0
        if blas:
            n = G
        for j in range(r0, r0 + n):
            bsum[j] = b_ih[j] + b_hh[j] if b_ih != NULL else 0
        if blas:
            for b in range(B):
                memcpy(z + <Py_ssize_t> b * G, bsum, G * sizeof(floating))
            gemm(False, True, B, G, I, 1, x, I, w_ih, I, 1 if b_ih != NULL else 0, z, G)
            gemm(False, True, B, G, Hp, 1, h, Hp, w_hh, Hp, 0, hz, G)
        else:
            if back:
                _rows_wt(B, n, Hp, h, Hp, w_hh + <Py_ssize_t> r0 * Hp, hz + r0, G)
                _rows_wt(B, n, I, x, I, w_ih + <Py_ssize_t> r0 * I, z + r0, G)
            else:
                _rows_wt(B, n, I, x, I, w_ih + <Py_ssize_t> r0 * I, z + r0, G)
                _rows_wt(B, n, Hp, h, Hp, w_hh + <Py_ssize_t> r0 * Hp, hz + r0, G)
            for b in range(B):
                for j in range(r0, r0 + n):
                    z[<Py_ssize_t> b * G + j] += bsum[j]
    n = u1 - u0
    for b in range(B):
        zb = z + <Py_ssize_t> b * G
        cb = c + <Py_ssize_t> b * H
        mb = m + <Py_ssize_t> b * H
        if floating is float:                                              # (2)
            cy_sigmoid_add_f32(zb + u0, hz + <Py_ssize_t> b * G + u0, n)
            cy_sigmoid_add_f32(zb + H + u0, hz + <Py_ssize_t> b * G + H + u0, n)
            cy_tanh_add_f32(zb + 2 * H + u0, hz + <Py_ssize_t> b * G + 2 * H + u0, n)
            cy_sigmoid_add_f32(zb + 3 * H + u0, hz + <Py_ssize_t> b * G + 3 * H + u0, n)
        else:
            cy_sigmoid_add_f64(zb + u0, hz + <Py_ssize_t> b * G + u0, n)
            cy_sigmoid_add_f64(zb + H + u0, hz + <Py_ssize_t> b * G + H + u0, n)
            cy_tanh_add_f64(zb + 2 * H + u0, hz + <Py_ssize_t> b * G + 2 * H + u0, n)
            cy_sigmoid_add_f64(zb + 3 * H + u0, hz + <Py_ssize_t> b * G + 3 * H + u0, n)
        if floating is float:                                              # (3) (4)
            cy_cell_f32(cb + u0, mb + u0, NULL, zb + u0, n, H)
        else:
            cy_cell_f64(cb + u0, mb + u0, NULL, zb + u0, n, H)


# A step reads every weight once (2 MiB at H = I = 256 float32): with few rows it is
# bound by memory, and one core's 2 MiB L2 cannot hold it all. Split by hidden units,
# each thread reads only its slice, which stays in its own L2 from one step to the next.
# The split is used from the same size on as everything else (_MIN_PARALLEL_MACS), not
# earlier: B = 1, I = H = 256 (0.5 M multiply-adds) took 19-27 us on 2 threads vs
# 47-52 us on 1 (medians, busy 2-core machine), but in 2 of 8 runs the 2-thread median
# was 8-12 ms: with another process on the other core, every region waited for the
# scheduler to run the second thread. A helper that the caller never waits for (it
# takes the parts the helper has not claimed) would keep the gain without the stall.
# A B = 128, H = 32 step took 12 ms on 2 threads next to other processes, 20 us on one.
cdef enum:
    _NPTR = 9                   # pointers per layer in StepRunner


cdef inline bint _step_team_worth(int B, Py_ssize_t n_weights, size_t itemsize) noexcept nogil:
    """Whether a layer step with B rows on n_weights weights is worth a thread team."""
    return <double> B * n_weights >= _MIN_PARALLEL_MACS


cdef inline void _step_part(floating* m, char** lp, floating* z, floating* hz,
                            floating* bsum, const floating* inp, const floating* h,
                            int B, int I, int H, int Hp, int n_parts, int p,
                            bint blas, bint back) noexcept nogil:
    """Part p of n_parts of a layer's hidden units; lp: the layer's pointers."""
    cdef int prev = _blas_single_enter() if blas else 0
    _step_units(m, <floating*> lp[8], z, hz, bsum, inp, h, <const floating*> lp[0],
                <const floating*> lp[1], <const floating*> lp[2], <const floating*> lp[3],
                B, I, H, Hp, _split(H, n_parts, p), _split(H, n_parts, p + 1), back)
    if blas:
        _blas_single_exit(prev)


cdef void _step_layers(
    char** ptrs,                # per layer, _NPTR pointers (see StepRunner)
    floating* z,                # (B, G) scratch
    floating* hz,               # (B, G) scratch
    floating* bsum,             # (G,) scratch
    floating* mbuf,             # (B, H) scratch (P > 0 only)
    const floating* x,          # (B, I) layer 0's input
    int L, int B, int I, int H, int P, int n_parts, int n_threads, bint back,
) noexcept nogil:
    """Every layer of one step; see StepRunner for the pointers of a layer."""
    cdef int Hp = P if P > 0 else H, layer, p, pp, prev, Il, team
    cdef bint blas = True
    cdef char** lp
    cdef floating* y
    cdef floating* h
    cdef floating* m
    cdef const floating* inp = x
    if floating is float:
        blas = _dot == NULL
    for layer in range(L):
        lp = ptrs + layer * _NPTR
        y = <floating*> lp[6]
        h = <floating*> lp[7]
        m = mbuf if P > 0 else y
        Il = I if layer == 0 else Hp
        if blas:
            n_parts = 1             # BLAS: one call over all rows, as the sequence forward
        team = min(n_threads, n_parts) if _step_team_worth(B, 4 * H * (Il + Hp),
                                                           sizeof(floating)) else 1
        if team > 1:
            for p in prange(n_parts, schedule="static", num_threads=team):
                _step_part(m, lp, z, hz, bsum, inp, h, B, Il, H, Hp, n_parts, p, blas, back)
        else:                   # no OpenMP region: even a 1-thread one allocates a team
            for pp in range(n_parts):
                p = n_parts - 1 - pp if back else pp
                _step_part(m, lp, z, hz, bsum, inp, h, B, Il, H, Hp, n_parts, p, blas, back)
        if P > 0:                                                          # (5)
            prev = _blas_single_enter() if blas else 0
            _rows_wt(B, P, H, mbuf, H, <const floating*> lp[4], y, P)
            if blas:
                _blas_single_exit(prev)
        memcpy(h, y, <size_t> B * Hp * sizeof(floating))
        inp = y


# Successive steps read the weights in alternating order, so that the blocks read last
# by one step, still in L2, are read first by the next (with 2 MiB of weights in a 2 MiB
# L2, one order always evicts what the next step reads first). Each element is computed
# the same way in either order. Measured (B = 1, I = H = 256 float32, 1 thread, one
# process alternating the two, medians of 10 x 500 steps): 49.3 us one order, 38.7 us
# alternating.
cdef bint _step_snake = True


def _set_step_snake(bint on):
    """Test/benchmark hook: alternate the step's weight order (True) or not."""
    global _step_snake
    _step_snake = on


cdef class StepRunner:
    """The compiled body of ``LSTM.step`` for one ``LSTMState``.

    Built once per state from the arrays it uses, each checked here (dtype, shape,
    C-contiguity); it keeps them alive and holds their data pointers, so a step costs no
    argument parsing. Weights are read in place, never copied, so in-place changes
    (optimisers, load_state_dict) are always seen; ``run`` returns None instead of
    stepping when any weight, h or c array is no longer the object it was built on
    (the caller then builds a new runner). Per layer: w_ih (G, I_l), w_hh (G, Hp),
    b_ih, b_hh (G,) or None, w_hr (P, H) or None, y (B, Hp) OUT, h (B, Hp) INOUT,
    c (B, H) INOUT.
    """
    cdef list keys              # the parameter names it reads
    cdef list weights           # the arrays they named when it was built
    cdef list keep              # every array a pointer points into
    cdef object h_all, c_all, out
    cdef char** ptrs
    cdef int nL, nB, nI, nH, nP, f32
    cdef bint back              # read this step's weight blocks in reverse order
    cdef void* z                # (B, G) scratch
    cdef void* hz               # (B, G) scratch
    cdef void* bsum             # (G,) scratch
    cdef void* mbuf             # (B, H) scratch

    def __cinit__(self):
        self.ptrs = NULL

    def __dealloc__(self):
        if self.ptrs != NULL:
            PyMem_Free(self.ptrs)

    def __init__(self, list keys, dict params, h_all, c_all, y_all, int I, int H, int P,
                 dtype):
        import numpy as np
        cdef int L = len(keys), B = h_all.shape[1], Hp = P if P > 0 else H, G = 4 * H
        cdef int layer, k
        self.nL, self.nB, self.nI, self.nH, self.nP = L, B, I, H, P
        dtype = np.dtype(dtype)
        self.f32 = dtype == np.float32
        _check(dtype in (np.float32, np.float64), "dtype")
        self.keys, self.weights, self.keep = keys, [], []
        self.h_all, self.c_all = h_all, c_all
        self.ptrs = <char**> PyMem_Malloc(L * _NPTR * sizeof(char*))
        if self.ptrs == NULL:
            raise MemoryError()

        def arr(a, shape, what):
            ok = (isinstance(a, np.ndarray) and a.dtype == dtype and a.shape == shape
                  and a.flags.c_contiguous)
            if not ok:
                raise ValueError(f"StepRunner: {what} must be a C-contiguous {dtype} "
                                 f"array of shape {shape}")
            self.keep.append(a)
            return a

        for a, shape, what in ((h_all, (L, B, Hp), "h"), (c_all, (L, B, H), "c"),
                               (y_all, (L, 1, B, Hp), "y")):
            arr(a, shape, what)
            if not a.flags.writeable:
                raise ValueError(f"StepRunner: {what} must be writeable")
        for layer in range(L):
            Il = I if layer == 0 else Hp
            shapes = ((G, Il), (G, Hp), (G,), (G,), (P, H))
            ws = []
            for k in range(5):
                key = keys[layer][k]
                w = None if key is None else params[key]
                if w is not None:
                    arr(w, shapes[k], key)
                ws.append(w)
            _check((ws[2] is None) == (ws[3] is None) and (ws[4] is None) == (P == 0),
                   "bias/projection")
            self.weights.append(ws)
            for k in range(5):
                self.ptrs[layer * _NPTR + k] = NULL if ws[k] is None else \
                    <char*> <size_t> ws[k].ctypes.data
            self.ptrs[layer * _NPTR + 6] = <char*> <size_t> y_all[layer].ctypes.data
            self.ptrs[layer * _NPTR + 7] = <char*> <size_t> h_all[layer].ctypes.data
            self.ptrs[layer * _NPTR + 8] = <char*> <size_t> c_all[layer].ctypes.data
            self.ptrs[layer * _NPTR + 5] = NULL
        self.out = y_all[L - 1, 0]
        scratch = [np.empty(n, dtype) for n in (B * G, B * G, G, B * H)]
        self.keep += scratch
        addr = [<size_t> a.ctypes.data for a in scratch]
        self.z, self.hz = <void*> <size_t> addr[0], <void*> <size_t> addr[1]
        self.bsum, self.mbuf = <void*> <size_t> addr[2], <void*> <size_t> addr[3]
        flat = [(name, w) for names, ws in zip(keys, self.weights)
                for name, w in zip(names, ws) if name is not None]
        self.keys = [name for name, _ in flat]
        self.weights = [w for _, w in flat]

    def run(self, x, dict params, h_all, c_all, int n_parts, int n_threads):
        """Step every layer on x (B, I); returns the last layer's y (B, Hp) (a buffer of
        the state), None when the runner is stale, or NotImplemented when x is not a
        C-contiguous (B, I) buffer of the dtype (convert it and call again); in both
        cases nothing has been touched."""
        cdef Py_ssize_t i
        cdef Py_buffer view
        cdef int itemsize = 4 if self.f32 else 8
        cdef char fmt = 102 if self.f32 else 100      # 'f' or 'd', the buffer's format
        if h_all is not self.h_all or c_all is not self.c_all:
            return None
        for i in range(len(self.keys)):
            if params.get(self.keys[i]) is not self.weights[i]:
                return None
        _check(n_parts >= 1 and n_threads >= 1, "n_parts/n_threads")
        # x's buffer directly: a typed memoryview would cost more than a small step
        try:
            PyObject_GetBuffer(x, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT)
        except (TypeError, BufferError, ValueError):
            return NotImplemented
        try:
            if not (view.itemsize == itemsize and view.format != NULL
                    and view.format[0] == fmt and view.format[1] == 0
                    and view.ndim == 2 and view.shape[0] == self.nB
                    and view.shape[1] == self.nI):
                return NotImplemented
            with nogil:
                if self.f32:
                    _step_layers(self.ptrs, <float*> self.z, <float*> self.hz,
                                 <float*> self.bsum, <float*> self.mbuf,
                                 <const float*> view.buf, self.nL, self.nB, self.nI,
                                 self.nH, self.nP, n_parts, n_threads, self.back)
                else:
                    _step_layers(self.ptrs, <double*> self.z, <double*> self.hz,
                                 <double*> self.bsum, <double*> self.mbuf,
                                 <const double*> view.buf, self.nL, self.nB, self.nI,
                                 self.nH, self.nP, n_parts, n_threads, self.back)
        finally:
            PyBuffer_Release(&view)
        self.back = _step_snake and not self.back
        return self.out


# ----------------------------------------------------------------------------------------
# Backward (BPTT)
# ----------------------------------------------------------------------------------------

cdef void _backward_chunk(
    floating* dz,               # (T, B, G) OUT dL/dz, zero at padded positions
    floating* dhp,              # (T, B, P) OUT dL/dh_t with a projection (0 at padding), or NULL
    floating* dzs,              # (B, G) scratch: dz of the current step; after the loop,
                                #   dz of each row's first processed step (pairs with h0)
    floating* dhs,              # (B, Hp) OUT: dz_s W_hh per step; after the loop dh0
    floating* dc,               # (B, H) INOUT: in dL/dc_n, out dc0
    floating* dhbuf,            # (B, Hp) scratch: dL/dh_t of this step
    floating* dm,               # (B, H) scratch: dL/dm_t = dh W_hr (P > 0 only)
    const floating* dy,         # (T, B, Hp)
    const floating* dh_n,       # (B, Hp)
    const floating* gates,      # (T, B, G) activated
    const floating* c_cache,    # (T, B, H)
    const floating* tc_cache,   # (T, B, H)
    const floating* c0,         # (B, H)
    const floating* w_hh,       # (G, Hp)
    const floating* w_hr,       # (P, H) or NULL
    const float* whh_packed,    # W_hh packed for _rec_mm, or NULL (BLAS)
    const float* whr_packed,    # W_hr packed, or NULL
    const int* lengths,         # (B,)
    int T, int B, int H, int P, int r0, int r1, bint reverse,
) noexcept nogil:
    """BPTT for batch rows [r0, r1), run by one thread."""
    cdef int G = 4 * H, Hp = P if P > 0 else H
    cdef int s, b, t, tp, j, L, hi
    cdef Py_ssize_t zo, ho, hpo
    cdef const floating* z
    cdef const floating* cprev
    cdef const floating* dhin
    cdef const floating* dmb
    cdef floating* dcb
    cdef floating* dzb
    memset(dzs + <Py_ssize_t> r0 * G, 0, (r1 - r0) * G * sizeof(floating))
    for s in range(T - 1, -1, -1):
        # dL/dh_t = dy_t + (this row's dz W_hh of the later step, or dh_n at its last step)
        for b in range(r0, r1):
            L = lengths[b]
            if s >= L:                 # padded: no gradient, the state passes through
                memset(dz + (<Py_ssize_t> s * B + b) * G, 0, G * sizeof(floating))
                if P > 0:
                    memset(dhp + (<Py_ssize_t> s * B + b) * P, 0, P * sizeof(floating))
                continue
            t = L - 1 - s if reverse else s
            hpo = (<Py_ssize_t> t * B + b) * Hp
            dhin = <const floating*> dhs + <Py_ssize_t> b * Hp if s + 1 < L \
                else dh_n + <Py_ssize_t> b * Hp
            for j in range(Hp):
                dhbuf[<Py_ssize_t> b * Hp + j] = dy[hpo + j] + dhin[j]
            if P > 0:
                memcpy(dhp + hpo, dhbuf + <Py_ssize_t> b * P, P * sizeof(floating))
        hi = _active_end(lengths, r0, r1, s)
        if hi == r0:
            continue
        if P > 0:                                                            # (5')
            _rec_mm(hi - r0, H, P, dhbuf + <Py_ssize_t> r0 * P, P, w_hr, H, False,
                    whr_packed, dm + <Py_ssize_t> r0 * H, H)
        for b in range(r0, r1):
            L = lengths[b]
            if s >= L:
                continue
            t = L - 1 - s if reverse else s
            tp = t + 1 if reverse else t - 1                   # time of h_{t-1}, c_{t-1}
            zo = (<Py_ssize_t> t * B + b) * G
            ho = (<Py_ssize_t> t * B + b) * H
            z = gates + zo
            cprev = c_cache + (<Py_ssize_t> tp * B + b) * H if s > 0 else c0 + <Py_ssize_t> b * H
            dmb = (<const floating*> dm if P > 0 else dhbuf) + <Py_ssize_t> b * H
            dcb = dc + <Py_ssize_t> b * H
            dzb = dzs + <Py_ssize_t> b * G
            if floating is float:                                            # (4') (3') (2')
                cy_gate_grads_f32(dzb, dcb, z, tc_cache + ho, cprev, dmb, H)
            else:
                cy_gate_grads_f64(dzb, dcb, z, tc_cache + ho, cprev, dmb, H)
            memcpy(dz + zo, dzb, G * sizeof(floating))
        _rec_mm(hi - r0, Hp, G, dzs + <Py_ssize_t> r0 * G, G, w_hh, Hp, False,    # (1')
                whh_packed, dhs + <Py_ssize_t> r0 * Hp, Hp)


cdef inline void _add_block(floating* acc, const floating* part, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t k
    for k in range(n):
        acc[k] += part[k]


cdef void _weight_grads_block(
    floating* dw_ih,            # (G, I) INOUT +=, rows [g0, g1)
    floating* dw_hh,            # (G, Hp) INOUT +=, rows [g0, g1)
    floating* dw_hr,            # (P, H) INOUT +=, rows [q0, q1), or NULL
    floating* db_ih,            # (G,) INOUT +=, or NULL
    floating* db_hh,            # (G,) INOUT +=, or NULL
    floating* dw_ih_tmp,        # (G, I) scratch: this call's dW_ih
    floating* dw_hh_tmp,        # (G, Hp) scratch: this call's dW_hh
    floating* dw_hr_tmp,        # (P, H) scratch: this call's dW_hr, or NULL
    floating* db_tmp,           # (G,) scratch: this call's db
    const floating* dz,         # (T*B, G)
    const floating* dzs,        # (B, G) dz of each row's first processed step
    const floating* dhp,        # (T*B, P) dL/dh_t, or NULL
    const floating* m_cache,    # (T*B, H) m_t, or NULL
    const floating* x,          # (T*B, I)
    const floating* y,          # (T*B, Hp)
    const floating* h0,         # (B, Hp) or NULL (zeros)
    int T, int B, int I, int H, int P, int g0, int g1, int q0, int q1, bint reverse,
) noexcept nogil:
    """Gradient rows [g0, g1) of W_ih, W_hh, b_ih, b_hh and [q0, q1) of W_hr     (1') (5').

    Each is computed in full into scratch and then added to the gradient in one pass:
    BLAS with beta = 1 adds its K-blocks to C one at a time, and dW_hh has two parts,
    so accumulating in place would make two backward calls differ from 2x one call.
    """
    cdef int G = 4 * H, Hp = P if P > 0 else H
    cdef int j
    cdef Py_ssize_t k, TB = <Py_ssize_t> T * B
    cdef Py_ssize_t oi = <Py_ssize_t> g0 * I, oh = <Py_ssize_t> g0 * Hp
    if P > 0 and q1 > q0:              # dW_hr = dh^T m
        gemm(True, False, q1 - q0, H, T * B, 1, dhp + q0, P, m_cache, H, 0,
             dw_hr_tmp + <Py_ssize_t> q0 * H, H)
        _add_block(dw_hr + <Py_ssize_t> q0 * H, dw_hr_tmp + <Py_ssize_t> q0 * H,
                   (q1 - q0) * <Py_ssize_t> H)
    if g1 <= g0:
        return
    # dW_ih = dz^T x
    gemm(True, False, g1 - g0, I, T * B, 1, dz + g0, G, x, I, 0, dw_ih_tmp + oi, I)
    # dW_hh = dz^T h_{t-1}. Inside a sequence h_{t-1} is y at the neighbouring time
    # (t-1 forward, t+1 reverse); at a padded neighbour y is 0, which is exactly right
    # for a reverse row's first step, whose h_{t-1} is h0, added from dzs below.
    if reverse:
        gemm(True, False, g1 - g0, Hp, (T - 1) * B, 1, dz + g0, G,
             y + <Py_ssize_t> B * Hp, Hp, 0, dw_hh_tmp + oh, Hp)
    else:
        gemm(True, False, g1 - g0, Hp, (T - 1) * B, 1, dz + <Py_ssize_t> B * G + g0, G,
             y, Hp, 0, dw_hh_tmp + oh, Hp)
    if h0 != NULL:
        gemm(True, False, g1 - g0, Hp, B, 1, dzs + g0, G, h0, Hp, 1, dw_hh_tmp + oh, Hp)
    _add_block(dw_ih + oi, dw_ih_tmp + oi, (g1 - g0) * <Py_ssize_t> I)
    _add_block(dw_hh + oh, dw_hh_tmp + oh, (g1 - g0) * <Py_ssize_t> Hp)
    # db_ih += sum dz, db_hh += sum dz (the two biases have the same gradient). Rows in
    # order, each summed into the block's columns: reading dz column by column instead
    # (stride G) took 15% of a medium training step.
    if db_ih != NULL:
        memset(db_tmp + g0, 0, (g1 - g0) * sizeof(floating))
        for k in range(TB):
            for j in range(g0, g1):
                db_tmp[j] += dz[k * G + j]
        for j in range(g0, g1):
            db_ih[j] += db_tmp[j]
            db_hh[j] += db_tmp[j]


def lstm_backward(
    *,
    floating[:, :, ::1] dx,             # (T, B, I) OUT
    floating[:, ::1] dh0,               # (B, Hp) OUT
    floating[:, ::1] dc,                # (B, H) INOUT: in dL/dc_n, out dc0
    floating[:, ::1] dw_ih,             # (G, I) INOUT, accumulated (+=)
    floating[:, ::1] dw_hh,             # (G, Hp) INOUT, accumulated (+=)
    floating[:, ::1] dw_hr,             # (P, H) INOUT += with a projection, else None
    floating[::1] db_ih,                # (G,) INOUT += or None (no bias)
    floating[::1] db_hh,                # (G,) INOUT += or None (no bias)
    floating[:, ::1] dw_ih_tmp,         # (G, I) scratch
    floating[:, ::1] dw_hh_tmp,         # (G, Hp) scratch
    floating[:, ::1] dw_hr_tmp,         # (P, H) scratch with a projection, else None
    floating[::1] db_tmp,               # (G,) scratch
    floating[:, :, ::1] dz,             # (T, B, G) scratch
    floating[:, :, ::1] dhp,            # (T, B, P) scratch with a projection, else None
    floating[:, ::1] dzs,               # (B, G) scratch
    floating[:, ::1] dhbuf,             # (B, Hp) scratch
    floating[:, ::1] dm,                # (B, H) scratch with a projection, else None
    const floating[:, :, ::1] dy,       # (T, B, Hp)
    const floating[:, ::1] dh_n,        # (B, Hp)
    const floating[:, :, ::1] gates,    # (T, B, G) from lstm_forward
    const floating[:, :, ::1] c_cache,  # (T, B, H) from lstm_forward
    const floating[:, :, ::1] tc_cache, # (T, B, H) from lstm_forward
    const floating[:, :, ::1] m_cache,  # (T, B, H) from lstm_forward with a projection, else None
    const floating[:, :, ::1] y,        # (T, B, Hp) from lstm_forward, unmodified
    const floating[:, :, ::1] x,        # (T, B, I) the forward's input, unmodified
    const floating[:, ::1] h0,          # (B, Hp) or None (zeros)
    const floating[:, ::1] c0,          # (B, H) zeros when the forward had none
    const floating[:, ::1] w_ih,        # (G, I)
    const floating[:, ::1] w_hh,        # (G, Hp)
    const floating[:, ::1] w_hr,        # (P, H) or None
    const int[::1] lengths,             # (B,)
    bint reverse,
    int n_parts,
    int n_threads,
    float[::1] wpack=None,              # float32 scratch: pack_floats(G, Hp) + pack_floats(P, H)
):
    """BPTT through one layer and direction; accumulates into the weight gradients."""
    cdef int T = x.shape[0], B = x.shape[1], I = x.shape[2]
    cdef int G = w_hh.shape[0], H = w_hh.shape[0] // 4, Hp = w_hh.shape[1]
    cdef int P = 0 if w_hr is None else w_hr.shape[0]
    cdef int p, n_chunks, prev
    cdef const floating* h0_p = NULL
    cdef const floating* w_hr_p = NULL
    cdef const floating* m_p = NULL
    cdef floating* dbi_p = NULL
    cdef floating* dbh_p = NULL
    cdef floating* dw_hr_p = NULL
    cdef floating* dw_hr_tmp_p = NULL
    cdef floating* dhp_p = NULL
    cdef floating* dm_p = NULL
    cdef float* whh_pk = NULL
    cdef float* whr_pk = NULL

    _check(G == 4 * H and Hp == (P if P > 0 else H) and _is(w_ih.shape, G, I), "weights")
    whh_pk = _wpack_slot(wpack, G, Hp, P, H)
    if whh_pk != NULL:
        whr_pk = whh_pk + cy_packed_size(G, Hp)
    _check(_is(dw_ih.shape, G, I) and _is(dw_hh.shape, G, Hp), "weight grads")
    _check(_is(dw_ih_tmp.shape, G, I) and _is(dw_hh_tmp.shape, G, Hp), "weight grad scratch")
    _check(_is(dx.shape, T, B, I) and _is(dy.shape, T, B, Hp) and _is(y.shape, T, B, Hp),
           "x/dx/y/dy")
    _check(_is(c_cache.shape, T, B, H) and _is(tc_cache.shape, T, B, H), "cache")
    _check(_is(dz.shape, T, B, G) and _is(gates.shape, T, B, G), "dz/gates")
    _check(_is(dh0.shape, B, Hp) and _is(dh_n.shape, B, Hp) and _is(dhbuf.shape, B, Hp)
           and _is(dc.shape, B, H) and _is(c0.shape, B, H), "states")
    _check(_is(dzs.shape, B, G) and db_tmp.shape[0] == G, "dzs/db_tmp")
    _check(lengths.shape[0] == B and n_parts >= 1 and n_threads >= 1, "lengths/n_parts")
    if h0 is not None:
        _check(_is(h0.shape, B, Hp), "h0")
        h0_p = &h0[0, 0]
    if db_ih is not None:
        _check(db_hh is not None and db_ih.shape[0] == G and db_hh.shape[0] == G, "bias grads")
        dbi_p = &db_ih[0]
        dbh_p = &db_hh[0]
    if P > 0:
        _check(_is(w_hr.shape, P, H) and dw_hr is not None and _is(dw_hr.shape, P, H)
               and dw_hr_tmp is not None and _is(dw_hr_tmp.shape, P, H)
               and dhp is not None and _is(dhp.shape, T, B, P) and dm is not None
               and _is(dm.shape, B, H) and m_cache is not None
               and _is(m_cache.shape, T, B, H), "projection")
        w_hr_p = &w_hr[0, 0]
        m_p = &m_cache[0, 0, 0]
        dw_hr_p = &dw_hr[0, 0]
        dw_hr_tmp_p = &dw_hr_tmp[0, 0]
        dhp_p = &dhp[0, 0, 0]
        dm_p = &dm[0, 0]
    if T == 0 or B == 0:
        return
    n_chunks = min(B, n_parts)
    with nogil:
        whh_pk = _pack(whh_pk, &w_hh[0, 0], G, Hp, Hp, False)
        if P > 0 and whh_pk != NULL:
            whr_pk = _pack(whr_pk, w_hr_p, P, H, H, False)
        for p in prange(n_chunks, schedule="static",
                        num_threads=_team(n_threads, n_chunks, <double> T * B * G * (Hp + P))):
            prev = _blas_single_enter()
            _backward_chunk(&dz[0, 0, 0], dhp_p, &dzs[0, 0], &dh0[0, 0], &dc[0, 0],
                            &dhbuf[0, 0], dm_p, &dy[0, 0, 0], &dh_n[0, 0], &gates[0, 0, 0],
                            &c_cache[0, 0, 0], &tc_cache[0, 0, 0], &c0[0, 0], &w_hh[0, 0],
                            w_hr_p, whh_pk, whr_pk if P > 0 else NULL, &lengths[0], T, B, H, P,
                            _split(B, n_chunks, p), _split(B, n_chunks, p + 1), reverse)
            _blas_single_exit(prev)
        for p in prange(n_parts, schedule="static",
                        num_threads=_team(n_threads, n_parts, <double> T * B * G * (I + Hp) * 2)):
            prev = _blas_single_enter()
            _weight_grads_block(&dw_ih[0, 0], &dw_hh[0, 0], dw_hr_p, dbi_p, dbh_p,
                                &dw_ih_tmp[0, 0], &dw_hh_tmp[0, 0], dw_hr_tmp_p, &db_tmp[0],
                                &dz[0, 0, 0],
                                &dzs[0, 0], dhp_p, m_p, &x[0, 0, 0], &y[0, 0, 0], h0_p,
                                T, B, I, H, P, _split(G, n_parts, p), _split(G, n_parts, p + 1),
                                _split(P, n_parts, p), _split(P, n_parts, p + 1), reverse)
            # dx = dz W_ih                                                   (1')
            gemm(False, False, _split(T * B, n_parts, p + 1) - _split(T * B, n_parts, p),
                 I, G, 1, &dz[0, 0, 0] + <Py_ssize_t> _split(T * B, n_parts, p) * G, G,
                 &w_ih[0, 0], I, 0, &dx[0, 0, 0] + <Py_ssize_t> _split(T * B, n_parts, p) * I, I)
            _blas_single_exit(prev)


cdef inline bint _is(Py_ssize_t* shape, Py_ssize_t a, Py_ssize_t b, Py_ssize_t c=-1) noexcept:
    """shape[:2] == (a, b), and shape[2] == c when c >= 0."""
    return shape[0] == a and shape[1] == b and (c < 0 or shape[2] == c)


cdef inline void _check(bint ok, str what) except *:
    if not ok:
        raise ValueError(f"cylstm._lstm: inconsistent shapes in kernel arguments ({what})")
