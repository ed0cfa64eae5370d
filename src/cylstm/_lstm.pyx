"""Compiled LSTM kernels: one layer, one direction, the whole sequence.

Dimension legend (used in every shape comment):
    T  time steps      B  batch rows      I  input features
    H  hidden units    G = 4H, gate pre-activations in PyTorch's order [i | f | g | o]
Weights are PyTorch's: W_ih (G, I), W_hh (G, H); b = b_ih + b_hh (G,).
Every array is C-contiguous and time-major (T, B, .). Outputs come first, then inputs,
then sizes. The Python layer (cylstm/functional.py) validates and allocates; the kernels
here trust their arguments, allocate nothing and run without the GIL.

Forward, per step t (the backward refers to these numbers):
    (1) z_t = (x_t W_ih^T + b) + h_{t-1} W_hh^T             (B, G)
    (2) i = sigmoid(z[i])  f = sigmoid(z[f])  g = tanh(z[g])  o = sigmoid(z[o])
    (3) c_t = f * c_{t-1} + i * g
    (4) h_t = o * tanh(c_t)
Backward, per step (dh = dL/dh_t, dc = dL/dc_t accumulated from later steps):
    (4') do = dh * tanh(c_t);  dc += dh * o * (1 - tanh(c_t)^2)
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
step and was slower everywhere (figures: see `_CHUNKED_VS_SHARED` below).
The large GEMMs (input projection before the loop; dW_ih, dW_hh, db, dx after it) run
over fixed row blocks in a prange, each block one single-threaded GEMM.
Chunk and block boundaries depend only on the shapes and on `n_parts` (fixed per process
by the Python layer from the machine's core count, never from the thread count), and
shared gradients are written only by the block that owns their rows, so results are
bitwise identical for any number of threads.
"""

from cython cimport floating
from cython.parallel cimport prange
from libc.string cimport memcpy, memset

from cylstm._blas cimport gemm
from cylstm._openmp_helpers cimport CYLSTM_OPENMP, omp_get_max_threads


# Forward time loop, measured on this 2-core machine (median ms, float32, forward only,
# 2 threads): chunked (per-thread GEMM + gates, no per-step barrier) vs shared (one
# 2-thread OpenBLAS GEMM per step, then prange over the gates). Filled in from
# bench/chunking.py; see the module docstring.
_CHUNKED_VS_SHARED = None


# BLAS threads. All of cylstm's parallelism is its own OpenMP threads, each calling a
# single-threaded BLAS; a BLAS that spawned its own threads inside them would
# oversubscribe the cores (measured: large forward 490 ms at 1 thread, 802 ms at 2).
# OpenBLAS >= 0.3.27 has openblas_set_num_threads_local(), which holds only the
# calling thread to n threads: each OpenMP thread sets 1 on entry and restores on exit,
# leaving the rest of the process (scipy.linalg in another thread) untouched.
# cylstm._threads finds the symbol in the BLAS behind scipy.linalg.cython_blas and
# registers it here; without it, _threads pins that BLAS to one thread around each call.
ctypedef int (*_set_local_fn)(int) noexcept nogil
cdef _set_local_fn _blas_set_local = NULL


def _register_blas_set_local(size_t address):
    """Register openblas_set_num_threads_local (its address), or 0 to unregister."""
    global _blas_set_local
    _blas_set_local = <_set_local_fn> address


cdef inline int _blas_single_enter() noexcept nogil:
    return _blas_set_local(1) if _blas_set_local != NULL else 0


cdef inline void _blas_single_exit(int previous) noexcept nogil:
    if _blas_set_local != NULL:
        _blas_set_local(previous)


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


cdef inline void _tanh_row(floating* out, const floating* x, int n) noexcept nogil:
    if floating is float:
        cy_tanh_f32_array(out, x, n)
    else:
        cy_tanh_f64_array(out, x, n)


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
    floating* y,                # (T, B, H) OUT
    floating* h,                # (B, H) INOUT running h
    floating* c,                # (B, H) INOUT running c
    floating* gates,            # (T, B, G) INOUT: in x W_ih^T + b, out activated i, f, g, o
    floating* c_cache,          # (T, B, H) OUT c_t, or NULL (inference)
    floating* tc_cache,         # (T, B, H) OUT tanh(c_t), or NULL (inference)
    const floating* hz,         # (B, G) h_{t-1} W_hh^T of this step
    const int* lengths,         # (B,) in 1..T
    int B, int H, int s, int b, bint reverse,
) noexcept nogil:
    """Loop step s of batch row b: gates, cell and output, from hz = h_{t-1} W_hh^T."""
    cdef int j, t, L = lengths[b]
    cdef Py_ssize_t ho
    cdef floating* z
    cdef floating* hb = h + <Py_ssize_t> b * H
    cdef floating* cb = c + <Py_ssize_t> b * H
    if s >= L:                         # padded position t = s: frozen state, zero output
        memset(y + (<Py_ssize_t> s * B + b) * H, 0, H * sizeof(floating))
        return
    t = L - 1 - s if reverse else s
    ho = (<Py_ssize_t> t * B + b) * H
    z = gates + (<Py_ssize_t> t * B + b) * 4 * H
    _activate_gates(z, hz + <Py_ssize_t> b * 4 * H, H)                       # (1) (2)
    for j in range(H):
        cb[j] = z[H + j] * cb[j] + z[j] * z[2 * H + j]                      # (3)
    _tanh_row(hb, cb, H)                               # h := tanh(c_t), then times o
    if c_cache != NULL:
        memcpy(c_cache + ho, cb, H * sizeof(floating))
        memcpy(tc_cache + ho, hb, H * sizeof(floating))
    for j in range(H):
        hb[j] = z[3 * H + j] * hb[j]                                         # (4)
    memcpy(y + ho, hb, H * sizeof(floating))


cdef void _forward_chunk(
    floating* y,                # (T, B, H) OUT, rows [r0, r1)
    floating* h,                # (B, H) INOUT: in h0, out h_n
    floating* c,                # (B, H) INOUT: in c0, out c_n
    floating* gates,            # (T, B, G) INOUT: in x W_ih^T + b, out activated gates
    floating* c_cache,          # (T, B, H) OUT or NULL
    floating* tc_cache,         # (T, B, H) OUT or NULL
    floating* hz,               # (B, G) scratch: h_{t-1} W_hh^T
    const floating* w_hh,       # (G, H)
    const int* lengths,         # (B,) in 1..T
    int T, int B, int H, int r0, int r1, bint reverse,
) noexcept nogil:
    """The whole time loop for batch rows [r0, r1), run by one thread."""
    cdef int G = 4 * H
    cdef int s, b, maxlen = 0
    for b in range(r0, r1):
        if lengths[b] > maxlen:
            maxlen = lengths[b]
    for s in range(T):
        if s < maxlen:                 # rows past their length need no product  (1)
            gemm(False, True, r1 - r0, G, H, 1, h + <Py_ssize_t> r0 * H, H, w_hh, H,
                 0, hz + <Py_ssize_t> r0 * G, G)
        for b in range(r0, r1):
            _forward_row(y, h, c, gates, c_cache, tc_cache, hz, lengths, B, H, s, b, reverse)


def lstm_forward(
    *,
    floating[:, :, ::1] y,              # (T, B, H) OUT
    floating[:, ::1] h,                 # (B, H) INOUT: h0 in, h_n out
    floating[:, ::1] c,                 # (B, H) INOUT: c0 in, c_n out
    floating[:, :, ::1] gates,          # (T, B, G) OUT: activated gates (the cache)
    floating[:, :, ::1] c_cache,        # (T, B, H) OUT or None (inference)
    floating[:, :, ::1] tc_cache,       # (T, B, H) OUT or None (inference)
    floating[:, ::1] hz,                # (B, G) scratch
    const floating[:, :, ::1] x,        # (T, B, I)
    const floating[:, ::1] w_ih,        # (G, I)
    const floating[:, ::1] w_hh,        # (G, H)
    const floating[::1] bias,           # (G,) b_ih + b_hh, or None
    const int[::1] lengths,             # (B,) in 1..T
    bint reverse,
    int n_parts,
    int n_threads,
    bint shared_gemm=False,
):
    """One LSTM layer, one direction, over the whole sequence; see the module docstring.

    shared_gemm: the measured alternative (one multithreaded GEMM per step, then a
    prange over the gates), kept only for bench/chunking.py.

    Callers pass every argument by keyword (cylstm.functional does); shapes are checked
    again here so that a wrong call raises instead of reading out of bounds.
    """
    cdef int T = x.shape[0], B = x.shape[1], I = x.shape[2], H = w_hh.shape[1]
    cdef int G = 4 * H
    cdef int p, n_chunks, prev, s, b
    cdef bint training = c_cache is not None
    cdef const floating* bias_p = NULL
    cdef floating* cc_p = NULL
    cdef floating* tc_p = NULL

    _check(w_ih.shape[0] == G and w_ih.shape[1] == I and w_hh.shape[0] == G, "weights")
    _check(y.shape[0] == T and y.shape[1] == B and y.shape[2] == H, "y")
    _check(h.shape[0] == B and h.shape[1] == H and c.shape[0] == B and c.shape[1] == H, "h/c")
    _check(gates.shape[0] == T and gates.shape[1] == B and gates.shape[2] == G, "gates")
    _check(hz.shape[0] == B and hz.shape[1] == G, "hz")
    _check(lengths.shape[0] == B and n_parts >= 1 and n_threads >= 1, "lengths/n_parts")
    if bias is not None:
        _check(bias.shape[0] == G, "bias")
        bias_p = &bias[0]
    if training:
        _check(tc_cache is not None and c_cache.shape[0] == T and c_cache.shape[1] == B
               and c_cache.shape[2] == H and tc_cache.shape[0] == T
               and tc_cache.shape[1] == B and tc_cache.shape[2] == H, "cache")
        cc_p = &c_cache[0, 0, 0]
        tc_p = &tc_cache[0, 0, 0]
    if T == 0 or B == 0:
        return
    n_chunks = min(B, n_parts)
    with nogil:
        for p in prange(n_parts, schedule="static", num_threads=n_threads):
            prev = _blas_single_enter()
            _project_block(&gates[0, 0, 0], &x[0, 0, 0], &w_ih[0, 0], bias_p,
                           _split(T * B, n_parts, p), _split(T * B, n_parts, p + 1), I, G)
            _blas_single_exit(prev)
        if shared_gemm:
            prev = _blas_set_local(n_threads) if _blas_set_local != NULL else 0
            for s in range(T):
                gemm(False, True, B, G, H, 1, &h[0, 0], H, &w_hh[0, 0], H, 0, &hz[0, 0], G)
                for b in prange(B, schedule="static", num_threads=n_threads):
                    _forward_row(&y[0, 0, 0], &h[0, 0], &c[0, 0], &gates[0, 0, 0], cc_p, tc_p,
                                 &hz[0, 0], &lengths[0], B, H, s, b, reverse)
            _blas_single_exit(prev)
        else:
            for p in prange(n_chunks, schedule="static", num_threads=n_threads):
                prev = _blas_single_enter()
                _forward_chunk(&y[0, 0, 0], &h[0, 0], &c[0, 0], &gates[0, 0, 0], cc_p, tc_p,
                               &hz[0, 0], &w_hh[0, 0], &lengths[0], T, B, H,
                               _split(B, n_chunks, p), _split(B, n_chunks, p + 1), reverse)
                _blas_single_exit(prev)


# ----------------------------------------------------------------------------------------
# Backward (BPTT)
# ----------------------------------------------------------------------------------------

cdef void _backward_chunk(
    floating* dz,               # (T, B, G) OUT dL/dz, zero at padded positions
    floating* dzs,              # (B, G) scratch: dz of the current step; after the loop,
                                #   dz of each row's first processed step (pairs with h0)
    floating* dhs,              # (B, H) OUT: dz_s W_hh per step; after the loop dh0
    floating* dc,               # (B, H) INOUT: in dL/dc_n, out dc0
    const floating* dy,         # (T, B, H)
    const floating* dh_n,       # (B, H)
    const floating* gates,      # (T, B, G) activated
    const floating* c_cache,    # (T, B, H)
    const floating* tc_cache,   # (T, B, H)
    const floating* c0,         # (B, H)
    const floating* w_hh,       # (G, H)
    const int* lengths,         # (B,)
    int T, int B, int H, int r0, int r1, bint reverse,
) noexcept nogil:
    cdef int G = 4 * H
    cdef int s, b, t, tp, j, L, maxlen = 0
    cdef Py_ssize_t zo, ho
    cdef floating ig, fg, gg, og, tc, dh, dcj, dzi, dzf, dzg, dzo
    cdef const floating* z
    cdef const floating* cprev
    cdef const floating* dhin
    for b in range(r0, r1):
        if lengths[b] > maxlen:
            maxlen = lengths[b]
    memset(dzs + <Py_ssize_t> r0 * G, 0, (r1 - r0) * G * sizeof(floating))
    for s in range(T - 1, -1, -1):
        for b in range(r0, r1):
            L = lengths[b]
            if s >= L:                 # padded: no gradient, state passes through
                memset(dz + (<Py_ssize_t> s * B + b) * G, 0, G * sizeof(floating))
                continue
            t = L - 1 - s if reverse else s
            tp = t + 1 if reverse else t - 1                   # time of h_{t-1}, c_{t-1}
            zo = (<Py_ssize_t> t * B + b) * G
            ho = (<Py_ssize_t> t * B + b) * H
            z = gates + zo
            cprev = c_cache + (<Py_ssize_t> tp * B + b) * H if s > 0 else c0 + <Py_ssize_t> b * H
            # dL/dh_t from later steps: this row's last GEMM, or dh_n at its last valid step
            dhin = <const floating*> dhs + <Py_ssize_t> b * H if s + 1 < L else dh_n + <Py_ssize_t> b * H
            for j in range(H):
                ig = z[j]
                fg = z[H + j]
                gg = z[2 * H + j]
                og = z[3 * H + j]
                tc = tc_cache[ho + j]
                dh = dy[ho + j] + dhin[j]
                dcj = dc[b * H + j] + dh * og * (1 - tc * tc)                # (4')
                dzi = dcj * gg * ig * (1 - ig)                               # (3') (2')
                dzf = dcj * cprev[j] * fg * (1 - fg)
                dzg = dcj * ig * (1 - gg * gg)
                dzo = dh * tc * og * (1 - og)
                dc[b * H + j] = dcj * fg
                dz[zo + j] = dzi
                dz[zo + H + j] = dzf
                dz[zo + 2 * H + j] = dzg
                dz[zo + 3 * H + j] = dzo
                dzs[b * G + j] = dzi
                dzs[b * G + H + j] = dzf
                dzs[b * G + 2 * H + j] = dzg
                dzs[b * G + 3 * H + j] = dzo
        if s < maxlen:                                                       # (1')
            gemm(False, False, r1 - r0, H, G, 1, dzs + <Py_ssize_t> r0 * G, G, w_hh, H,
                 0, dhs + <Py_ssize_t> r0 * H, H)


cdef void _weight_grads_block(
    floating* dw_ih,            # (G, I) INOUT +=, rows [g0, g1)
    floating* dw_hh,            # (G, H) INOUT +=, rows [g0, g1)
    floating* db_ih,            # (G,) INOUT +=, or NULL
    floating* db_hh,            # (G,) INOUT +=, or NULL
    floating* dw_ih_tmp,        # (G, I) scratch: this call's dW_ih, rows [g0, g1)
    floating* dw_hh_tmp,        # (G, H) scratch: this call's dW_hh, rows [g0, g1)
    const floating* dz,         # (T*B, G)
    const floating* dzs,        # (B, G) dz of each row's first processed step
    const floating* x,          # (T*B, I)
    const floating* y,          # (T*B, H)
    const floating* h0,         # (B, H) or NULL (zeros)
    int T, int B, int I, int H, int g0, int g1, bint reverse,
) noexcept nogil:
    """Gradient rows [g0, g1) of W_ih, W_hh, b_ih, b_hh from all T*B rows of dz     (1').

    Each is computed in full into scratch and then added to the gradient in one pass:
    BLAS with beta = 1 adds its K-blocks to C one at a time, and dW_hh has two parts,
    so accumulating in place would make two backward calls differ from 2x one call.
    """
    cdef int G = 4 * H
    cdef int r, j
    cdef floating acc
    cdef Py_ssize_t k, TB = <Py_ssize_t> T * B
    cdef Py_ssize_t oi = <Py_ssize_t> g0 * I, oh = <Py_ssize_t> g0 * H
    if g1 <= g0:
        return
    # dW_ih = dz^T x
    gemm(True, False, g1 - g0, I, T * B, 1, dz + g0, G, x, I, 0, dw_ih_tmp + oi, I)
    # dW_hh = dz^T h_{t-1}. Inside a sequence h_{t-1} is y at the neighbouring time
    # (t-1 forward, t+1 reverse); at a padded neighbour y is 0, which is exactly right
    # for a reverse row's first step, whose h_{t-1} is h0, added from dzs below.
    if reverse:
        gemm(True, False, g1 - g0, H, (T - 1) * B, 1, dz + g0, G,
             y + <Py_ssize_t> B * H, H, 0, dw_hh_tmp + oh, H)
    else:
        gemm(True, False, g1 - g0, H, (T - 1) * B, 1, dz + <Py_ssize_t> B * G + g0, G,
             y, H, 0, dw_hh_tmp + oh, H)
    if h0 != NULL:
        gemm(True, False, g1 - g0, H, B, 1, dzs + g0, G, h0, H, 1, dw_hh_tmp + oh, H)
    for k in range((g1 - g0) * <Py_ssize_t> I):
        dw_ih[oi + k] += dw_ih_tmp[oi + k]
    for k in range((g1 - g0) * <Py_ssize_t> H):
        dw_hh[oh + k] += dw_hh_tmp[oh + k]
    # db_ih += sum dz, db_hh += sum dz (the two biases have the same gradient)
    if db_ih != NULL:
        for j in range(g0, g1):
            acc = 0
            for k in range(TB):
                acc = acc + dz[k * G + j]
            db_ih[j] += acc
            db_hh[j] += acc


def lstm_backward(
    *,
    floating[:, :, ::1] dx,             # (T, B, I) OUT
    floating[:, ::1] dh0,               # (B, H) OUT
    floating[:, ::1] dc,                # (B, H) INOUT: in dL/dc_n, out dc0
    floating[:, ::1] dw_ih,             # (G, I) INOUT, accumulated (+=)
    floating[:, ::1] dw_hh,             # (G, H) INOUT, accumulated (+=)
    floating[::1] db_ih,                # (G,) INOUT += or None (no bias)
    floating[::1] db_hh,                # (G,) INOUT += or None (no bias)
    floating[:, ::1] dw_ih_tmp,         # (G, I) scratch
    floating[:, ::1] dw_hh_tmp,         # (G, H) scratch
    floating[:, :, ::1] dz,             # (T, B, G) scratch
    floating[:, ::1] dzs,               # (B, G) scratch
    const floating[:, :, ::1] dy,       # (T, B, H)
    const floating[:, ::1] dh_n,        # (B, H)
    const floating[:, :, ::1] gates,    # (T, B, G) from lstm_forward
    const floating[:, :, ::1] c_cache,  # (T, B, H) from lstm_forward
    const floating[:, :, ::1] tc_cache, # (T, B, H) from lstm_forward
    const floating[:, :, ::1] y,        # (T, B, H) from lstm_forward, unmodified
    const floating[:, :, ::1] x,        # (T, B, I) the forward's input, unmodified
    const floating[:, ::1] h0,          # (B, H) or None (zeros)
    const floating[:, ::1] c0,          # (B, H) zeros when the forward had none
    const floating[:, ::1] w_ih,        # (G, I)
    const floating[:, ::1] w_hh,        # (G, H)
    const int[::1] lengths,             # (B,)
    bint reverse,
    int n_parts,
    int n_threads,
):
    """BPTT through one layer and direction; accumulates into dw_ih, dw_hh, db_ih, db_hh."""
    cdef int T = x.shape[0], B = x.shape[1], I = x.shape[2], H = w_hh.shape[1]
    cdef int G = 4 * H
    cdef int p, n_chunks, prev
    cdef const floating* h0_p = NULL
    cdef floating* dbi_p = NULL
    cdef floating* dbh_p = NULL

    _check(w_ih.shape[0] == G and w_ih.shape[1] == I and w_hh.shape[0] == G, "weights")
    _check(dw_ih.shape[0] == G and dw_ih.shape[1] == I and dw_hh.shape[0] == G
           and dw_hh.shape[1] == H, "weight grads")
    _check(_is(dx.shape, T, B, I) and _is(x.shape, T, B, I), "x/dx")
    _check(_is(dy.shape, T, B, H) and _is(y.shape, T, B, H) and _is(c_cache.shape, T, B, H)
           and _is(tc_cache.shape, T, B, H), "dy/y/cache")
    _check(_is(dz.shape, T, B, G) and _is(gates.shape, T, B, G), "dz/gates")
    _check(_is(dh0.shape, B, H) and _is(dc.shape, B, H) and _is(dh_n.shape, B, H)
           and _is(c0.shape, B, H), "states")
    _check(dzs.shape[0] == B and dzs.shape[1] == G, "dzs")
    _check(_is(dw_ih_tmp.shape, G, I) and _is(dw_hh_tmp.shape, G, H), "weight grad scratch")
    _check(lengths.shape[0] == B and n_parts >= 1 and n_threads >= 1, "lengths/n_parts")
    if h0 is not None:
        _check(h0.shape[0] == B and h0.shape[1] == H, "h0")
        h0_p = &h0[0, 0]
    if db_ih is not None:
        _check(db_hh is not None and db_ih.shape[0] == G and db_hh.shape[0] == G, "bias grads")
        dbi_p = &db_ih[0]
        dbh_p = &db_hh[0]
    if T == 0 or B == 0:
        return
    n_chunks = min(B, n_parts)
    with nogil:
        for p in prange(n_chunks, schedule="static", num_threads=n_threads):
            prev = _blas_single_enter()
            _backward_chunk(&dz[0, 0, 0], &dzs[0, 0], &dh0[0, 0], &dc[0, 0], &dy[0, 0, 0],
                            &dh_n[0, 0], &gates[0, 0, 0], &c_cache[0, 0, 0],
                            &tc_cache[0, 0, 0], &c0[0, 0], &w_hh[0, 0], &lengths[0],
                            T, B, H, _split(B, n_chunks, p), _split(B, n_chunks, p + 1),
                            reverse)
            _blas_single_exit(prev)
        for p in prange(n_parts, schedule="static", num_threads=n_threads):
            prev = _blas_single_enter()
            _weight_grads_block(&dw_ih[0, 0], &dw_hh[0, 0], dbi_p, dbh_p, &dw_ih_tmp[0, 0],
                                &dw_hh_tmp[0, 0], &dz[0, 0, 0],
                                &dzs[0, 0], &x[0, 0, 0], &y[0, 0, 0], h0_p, T, B, I, H,
                                _split(G, n_parts, p), _split(G, n_parts, p + 1), reverse)
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
