"""Compiled LSTM kernels: one layer, one direction, the whole sequence, forward and
backward. The streaming step (T = 1, every layer) is _step.pyx; the cell math is
_cell.h; the thread policy is _parallel.pxd; the ISA levels are _isa.h.

Dimension legend (used in every shape comment):
    T  time steps      B  batch rows      I  input features
    H  hidden units    G = 4H, gate pre-activations in PyTorch's order [i | f | g | o]
    P  projection size (PyTorch's proj_size; 0 = none);  Hp = P if P > 0 else H
Weights are PyTorch's: W_ih (G, I), W_hh (G, Hp), W_hr (P, H); b = b_ih + b_hh (G,).
The state h and the output y have Hp features, the cell c has H.
Every array is C-contiguous and time-major (T, B, .). Outputs come first, then inputs,
then sizes. The Python layer (cylstm/functional.py) validates and allocates; the kernels
here trust their arguments, allocate nothing and run without the GIL.

Forward, per step t, numbered as in docs/math.md and cylstm/reference.py (the backward
refers to these numbers):
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
Recurrent dropout (docs/math.md, "Recurrent dropout and weight dropout"): with a mask
r (B, Hp), (1) reads h_{t-1} * r instead of h_{t-1}, (1') becomes
dh_{t-1} = (dz W_hh) * r and dW_hh += dz^T (h_{t-1} * r)                    (1r) (1r').

Variable lengths (PyTorch's packed semantics): row b is active at loop step s < L = lengths[b];
its time index is t = s forward and t = L-1-s in reverse, so reverse runs over each
sequence's own valid steps, with no packing or copying. At an inactive step the state
is frozen and y[t=s, b] = 0 (for s >= L, t = s walks exactly the padded positions).

Parallel structure. Batch rows are independent sequences, so the batch is cut into fixed
chunks and each OpenMP thread runs the *whole* time loop of its chunks: per step one
single-threaded GEMM h_{t-1} W_hh^T on its own rows, then its fused gate math. There is no
barrier between steps at all (why not one multithreaded GEMM per step: the comment below).
The large GEMMs (input projection before the loop; dW_ih, dW_hh, db, dx after it) run
over fixed row blocks in a prange, each block one single-threaded GEMM.
Chunk and block boundaries depend only on the shapes and on `n_parts` (fixed per process
by the Python layer from the machine's core count, never from the thread count), and
shared gradients are written only by the block that owns their rows, so results are
bitwise identical for any number of threads (team sizes and thresholds: _parallel.pxd).
"""

from cython cimport floating
from cython.parallel cimport prange
from libc.string cimport memcpy, memset

from cylstm._blas cimport gemm
from cylstm._isa cimport on_level_change
from cylstm._parallel cimport (MIN_PARALLEL_MACS, blas_single_enter, blas_single_exit,
                               note_team, split, team)


# Why each thread runs the whole time loop of its own batch chunk ("chunked") instead of
# one multithreaded GEMM over all B rows per step followed by a prange over the gates
# ("shared"): the shared design needs two barriers per step, and at 2 threads
# OpenBLAS's threads and the OpenMP team fight for the cores at each of them (medium
# float32 forward on 2 cores: 33 ms chunked, about 1 s shared). At 1 thread the shared
# design would win 10-30%, because OpenBLAS packs its operands on every call and the
# chunked design's GEMMs re-pack W_hh; the per-step kernel on weights packed once per
# call (_rgemm.h) removes that cost. See docs/benchmarking.md.


# ----------------------------------------------------------------------------------------
# Per-level kernels (_isa.h): activations, cell, per-step products
# ----------------------------------------------------------------------------------------

from libc.stdint cimport int64_t

from cylstm._kernels cimport (cy_act_f32, cy_act_select, cy_act_f64, cy_act_select_f64,
                              cy_cell_fns, cy_cell_select,
                              cy_gemm_packed_fn, cy_packed_size, cy_pack_f32,
                              cy_rgemm_select, cy_gemm_packed64_fn, cy_packed_size_f64,
                              cy_pack_f64, cy_rgemm64_select)

cdef cy_act_f32 _act
cdef cy_act_f64 _act64
cdef cy_cell_fns _cell
cdef cy_gemm_packed_fn _rgemm = NULL       # NULL at level 0: BLAS
cdef cy_gemm_packed64_fn _rgemm64 = NULL   # NULL at level 0: BLAS
cdef int _level = 0


cdef void _use_level(int level) noexcept nogil:
    global _act, _act64, _cell, _rgemm, _rgemm64, _level
    _act = cy_act_select(level)
    _act64 = cy_act_select_f64(level)
    _cell = cy_cell_select(level)
    _rgemm = cy_rgemm_select(level)
    _rgemm64 = cy_rgemm64_select(level)
    _level = level


on_level_change(_use_level)


def _kernel_levels():
    """Test hook: the level of each per-level kernel this module calls now."""
    levels = {}
    cdef cy_act_f64 act64
    for lvl in range(3):
        act, cell, rg = cy_act_select(lvl), cy_cell_select(lvl), cy_rgemm_select(lvl)
        act64 = cy_act_select_f64(lvl)
        if act.sigmoid_add == _act.sigmoid_add and act.tanh_add == _act.tanh_add:
            levels["activations"] = lvl
        if (act64.sigmoid_add == _act64.sigmoid_add
                and act64.tanh_add == _act64.tanh_add):
            levels["activations_f64"] = lvl
        if (cell.cell_f32 == _cell.cell_f32 and cell.gate_grads_f32 == _cell.gate_grads_f32
                and cell.cell_f64 == _cell.cell_f64
                and cell.gate_grads_f64 == _cell.gate_grads_f64):
            levels["cell"] = lvl
        if rg == _rgemm:
            levels.setdefault("rgemm", lvl)     # level 0 has none (BLAS)
        if cy_rgemm64_select(lvl) == _rgemm64:
            levels.setdefault("rgemm_f64", lvl)
    return levels


cdef inline void _activate_gates(floating* z, const floating* hz, int H) noexcept nogil:
    """z (G,) := [sigmoid, sigmoid, tanh, sigmoid](z + hz), gate blocks [i|f|g|o]   (1)(2)"""
    if floating is float:
        _act.sigmoid_add(z, hz, 2 * H)
        _act.tanh_add(z + 2 * H, hz + 2 * H, H)
        _act.sigmoid_add(z + 3 * H, hz + 3 * H, H)
    else:
        _act64.sigmoid_add(z, hz, 2 * H)
        _act64.tanh_add(z + 2 * H, hz + 2 * H, H)
        _act64.sigmoid_add(z + 3 * H, hz + 3 * H, H)


def _activations_f32(const float[::1] x):
    """Test hook: (sigmoid(x), tanh(x)) through the float32 row functions the kernels use."""
    import numpy as np
    n = x.shape[0]
    zeros = np.zeros(n, np.float32)
    sig = np.array(x, dtype=np.float32)
    th = np.array(x, dtype=np.float32)
    cdef float[::1] s = sig, t = th, z = zeros
    if n:
        _act.sigmoid_add(&s[0], &z[0], n)
        _act.tanh_add(&t[0], &z[0], n)
    return sig, th


def _activations_f64(const double[::1] x):
    """Test hook: (sigmoid(x), tanh(x)) through the float64 row functions the kernels use
    at the current level."""
    import numpy as np
    n = x.shape[0]
    zeros = np.zeros(n, np.float64)
    sig = np.array(x, dtype=np.float64)
    th = np.array(x, dtype=np.float64)
    cdef double[::1] s = sig, t = th, z = zeros
    if n:
        _act64.sigmoid_add(&s[0], &z[0], n)
        _act64.tanh_add(&t[0], &z[0], n)
    return sig, th


def rgemm_level():
    """Which per-step kernel runs (float32 and float64 alike): 2 AVX-512, 1 AVX2+FMA,
    0 BLAS."""
    return _level if _rgemm != NULL else 0


def _set_rgemm_level(int level):
    """Test hook: cylstm._isa.set_level(level), capped at what the CPU supports."""
    from cylstm import _isa
    _isa.set_level(min(level, _isa.cpu_level()))


# Packed panels start on a 64-byte boundary, so that the kernel's 64-byte loads never
# straddle two cache lines: the scratch has this many floats of slack to align in, and
# to keep a 16-byte header just before the panels (_wpack_slot). (NumPy's large arrays
# start 16 bytes past a page.)
cdef enum:
    _PACK_SLACK = 32
    _PACK_HEADER = 4            # floats: two int64


def pack_floats(int K, int N):
    """Floats of scratch that packing a (K, N) float32 weight for the per-step kernel
    needs (0 when the per-step kernel is BLAS)."""
    return cy_packed_size(K, N) + _PACK_SLACK if _rgemm != NULL and K > 0 and N > 0 else 0


def pack_floats_for(shapes, dtype):
    """Floats of float32 scratch (lstm_forward's and lstm_backward's wpack) that packing
    the recurrent weights `shapes`, [(K, N) of W_hh] + [(K, N) of W_hr] with a
    projection, needs in `dtype`; 0 when that dtype's per-step products run on BLAS.

    float64 packs doubles into the same float32 scratch, at twice the floats, and only
    without a projection: the kernels place W_hr's panels at W_hh's start plus W_hh's
    float32 size, inside W_hh's double panels, so with a projection both run on BLAS
    (see _pack)."""
    import numpy as np
    dt = np.dtype(dtype)
    if dt == np.float32:
        return sum(pack_floats(K, N) for K, N in shapes)
    if dt != np.float64 or _rgemm64 == NULL or len(shapes) != 1:
        return 0
    K, N = shapes[0]
    return 2 * cy_packed_size_f64(K, N) + _PACK_SLACK if K > 0 and N > 0 else 0


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


def _packed_matmul_f64(const double[:, ::1] a, const double[:, ::1] w, bint trans):
    """Test hook: _packed_matmul_f32 in float64, through the float64 packed kernel."""
    import numpy as np
    cdef int M = a.shape[0], K = a.shape[1], N = w.shape[0] if trans else w.shape[1]
    if _rgemm64 == NULL:
        raise RuntimeError("no packed kernel on this CPU (rgemm_level() == 0)")
    if (w.shape[1] if trans else w.shape[0]) != K or M < 1 or N < 1 or K < 1:
        raise ValueError("shapes do not match")
    packed = np.empty(cy_packed_size_f64(K, N), np.float64)
    out = np.empty((M, N), np.float64)
    cdef double[::1] pk = packed
    cdef double[:, ::1] c = out
    cy_pack_f64(&pk[0], &w[0, 0], K, N, w.shape[1], trans)
    _rgemm64(M, N, K, &a[0, 0], K, &pk[0], &c[0, 0], N)
    return out



cdef float* _wpack_slot(float[::1] wpack, int K, int N, int Kr, int Nr) except? NULL:
    """Start of the packed (K, N) recurrent weight in the caller's scratch (the packed
    (Kr, Nr) projection follows it), or NULL when there is no scratch or no kernel.

    This function is not specialised per dtype (its arguments have none), so it checks
    the float32 size, and float64 is decided later, in _pack and _rec_mm, from a header
    written here: the start is 64-byte aligned with _PACK_HEADER floats before it that
    hold [floats from the start to the end of the scratch, state] (_PK_*)."""
    cdef float* start
    if wpack is None or pack_floats(K, N) == 0:
        return NULL
    _check(<size_t> wpack.shape[0] >= cy_packed_size(K, N) + _PACK_SLACK
           + (cy_packed_size(Kr, Nr) if Kr > 0 and Nr > 0 else 0), "wpack")
    start = &wpack[0] + _PACK_HEADER
    start += ((64 - (<size_t> start & 63)) & 63) // sizeof(float)
    _set_header(start, wpack.shape[0] - (start - &wpack[0]),
                _PK_PROJ if Kr > 0 and Nr > 0 else _PK_SLOT)
    return start


# States of a packed slot's header (_wpack_slot). Only _PK_F64 lets _rec_mm read float64
# panels at a slot: _wpack_slot cannot refuse float64 itself, and the callers derive the
# projection's slot (W_hh's slot plus W_hh's float32 size) and hand it to _rec_mm even
# when _pack has packed nothing there.
cdef enum:
    _PK_SLOT = 0                # a slot, nothing packed in float64
    _PK_PROJ = 1                # the same, with a projection after it
    _PK_F64 = 2                 # float64 panels packed here


cdef inline void _set_header(float* slot, int64_t floats, int64_t state) noexcept nogil:
    cdef int64_t header[2]
    header[0] = floats
    header[1] = state
    memcpy(slot - _PACK_HEADER, header, sizeof(header))


cdef inline int64_t _header(const float* slot, int which) noexcept nogil:
    cdef int64_t header[2]
    memcpy(header, slot - _PACK_HEADER, sizeof(header))
    return header[which]


cdef inline void _rec_mm(int m, int n, int k, const floating* a, int lda,
                         const floating* w, int ldw, bint w_trans, const float* packed,
                         floating* c, int ldc) noexcept nogil:
    """C (m, n) = A (m, k) @ op(W), op(W) (k, n); from the packed W when there is one
    (float64: doubles in the float32 scratch, when _pack put them there)."""
    if packed != NULL:
        if floating is float:
            _rgemm(m, n, k, a, lda, packed, c, ldc)
            return
        elif _header(packed, 1) == _PK_F64:
            _rgemm64(m, n, k, a, lda, <const double*> packed, c, ldc)
            return
    gemm(False, w_trans, m, n, k, 1, a, lda, w, ldw, 0, c, ldc)


cdef inline float* _pack(float* dst, const floating* w, int K, int N, int ldw,
                         bint trans) noexcept nogil:
    """Pack op(W) (K, N) into dst for _rec_mm, or return NULL (no kernel: BLAS).

    float64 packs W_hh's doubles (twice the floats) when the header says the scratch
    holds them and there is no projection (pack_floats_for sizes it so). With one it
    packs nothing, and marks the projection's slot, which the callers put at dst plus
    W_hh's float32 size and pass to _rec_mm all the same, as unpacked: W_hr's doubles
    would overlap W_hh's there."""
    if dst == NULL or K <= 0 or N <= 0:
        return NULL
    if floating is float:
        if _rgemm != NULL:
            cy_pack_f32(dst, w, K, N, ldw, trans)
            return dst
        return NULL
    else:
        if _header(dst, 1) == _PK_PROJ:
            _set_header(dst + cy_packed_size(K, N), 0, _PK_SLOT)
        elif (_rgemm64 != NULL and _header(dst, 1) == _PK_SLOT
                and <size_t> _header(dst, 0) >= 2 * cy_packed_size_f64(K, N)):
            cy_pack_f64(<double*> dst, w, K, N, ldw, trans)
            _set_header(dst, _header(dst, 0), _PK_F64)
            return dst
        return NULL


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
        _cell.cell_f32(cb, mb, tc_cache + ho if c_cache != NULL else NULL, z, H, H)
    else:
        _cell.cell_f64(cb, mb, tc_cache + ho if c_cache != NULL else NULL, z, H, H)
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
    floating* hm,               # (B, Hp) scratch: h_{t-1} * rmask (rmask only)
    floating* hm_cache,         # (T, B, Hp) OUT h_{t-1} * rmask at time t, 0 at padding,
                                #   or NULL (no rmask, or inference)
    const floating* rmask,      # (B, Hp) recurrent dropout mask, or NULL
    const floating* w_hh,       # (G, Hp)
    const floating* w_hr,       # (P, H) or NULL
    const float* whh_packed,    # W_hh^T packed for _rec_mm, or NULL (BLAS)
    const float* whr_packed,    # W_hr^T packed, or NULL
    const int* lengths,         # (B,) in 1..T
    int T, int B, int H, int P, int r0, int r1, bint reverse,
) noexcept nogil:
    """The whole time loop for batch rows [r0, r1), run by one thread."""
    cdef int G = 4 * H, Hp = P if P > 0 else H
    cdef int s, b, t, L, hi, j
    cdef Py_ssize_t ro
    cdef floating* m = mbuf if P > 0 else h
    cdef floating* hin = hm if rmask != NULL else h
    for s in range(T):
        hi = _active_end(lengths, r0, r1, s)
        if rmask != NULL:
            # The product reads a masked copy: h itself is the state (3)-(5) carry on
            # and the output, which dropout must not touch.                  (1r)
            for b in range(r0, hi):
                ro = <Py_ssize_t> b * Hp
                for j in range(Hp):
                    hm[ro + j] = h[ro + j] * rmask[ro + j]
                L = lengths[b]
                if hm_cache != NULL and s < L:   # dW_hh's operand, at the time of z_t
                    t = L - 1 - s if reverse else s
                    memcpy(hm_cache + (<Py_ssize_t> t * B + b) * Hp, hm + ro,
                           Hp * sizeof(floating))
        if hi > r0:                    # rows past their length need no product  (1)
            _rec_mm(hi - r0, G, Hp, hin + <Py_ssize_t> r0 * Hp, Hp, w_hh, Hp, True,
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
                if hm_cache != NULL:   # read by the dW_hh GEMM over all T*B rows
                    memset(hm_cache + (<Py_ssize_t> s * B + b) * Hp, 0, Hp * sizeof(floating))
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
    const floating[:, ::1] rmask,       # (B, Hp) recurrent dropout mask, or None
    floating[:, ::1] hm,                # (B, Hp) scratch with rmask, else None
    floating[:, :, ::1] hm_cache,       # (T, B, Hp) OUT with rmask in training, else None
):
    """One LSTM layer, one direction, over the whole sequence; see the module docstring.

    Callers pass every argument by keyword (cylstm.functional does); shapes are checked
    again here so that a wrong call raises instead of reading out of bounds.
    """
    cdef int T = x.shape[0], B = x.shape[1], I = x.shape[2]
    cdef int G = w_hh.shape[0], H = w_hh.shape[0] // 4, Hp = w_hh.shape[1]
    cdef int P = 0 if w_hr is None else w_hr.shape[0]
    cdef int p, n_chunks
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
    cdef const floating* rm_p = NULL
    cdef floating* hm_p = NULL
    cdef floating* hmc_p = NULL

    _check(G == 4 * H and Hp == (P if P > 0 else H) and _is(w_ih.shape, G, I), "weights")
    if rmask is not None:
        _check(_is(rmask.shape, B, Hp) and hm is not None and _is(hm.shape, B, Hp), "rmask/hm")
        rm_p = &rmask[0, 0]
        hm_p = &hm[0, 0]
        if training:
            _check(hm_cache is not None and _is(hm_cache.shape, T, B, Hp), "hm_cache")
            hmc_p = &hm_cache[0, 0, 0]
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
                        num_threads=team(n_threads, n_parts, <double> T * B * G * I,
                                         MIN_PARALLEL_MACS)):
            note_team()
            blas_single_enter()
            _project_block(&gates[0, 0, 0], &x[0, 0, 0], &w_ih[0, 0], bias_p,
                           split(T * B, n_parts, p), split(T * B, n_parts, p + 1), I, G)
            blas_single_exit()
        for p in prange(n_chunks, schedule="static",
                        num_threads=team(n_threads, n_chunks, <double> T * B * G * (Hp + P),
                                         MIN_PARALLEL_MACS)):
            note_team()
            blas_single_enter()
            _forward_chunk(&y[0, 0, 0], &h[0, 0], &c[0, 0], &gates[0, 0, 0], cc_p, tc_p, m_p,
                           &hz[0, 0], mbuf_p, hp_p, hm_p, hmc_p, rm_p, &w_hh[0, 0], w_hr_p,
                           whh_pk,
                           whr_pk if P > 0 else NULL, &lengths[0],
                           T, B, H, P, split(B, n_chunks, p), split(B, n_chunks, p + 1),
                           reverse)
            blas_single_exit()


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
    const floating* rmask,      # (B, Hp) recurrent dropout mask, or NULL
    const int* lengths,         # (B,)
    int T, int B, int H, int P, int r0, int r1, bint reverse,
) noexcept nogil:
    """BPTT for batch rows [r0, r1), run by one thread."""
    cdef int G = 4 * H, Hp = P if P > 0 else H
    cdef int s, b, t, tp, j, L, hi
    cdef Py_ssize_t zo, ho, hpo, ro
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
                _cell.gate_grads_f32(dzb, dcb, z, tc_cache + ho, cprev, dmb, H)
            else:
                _cell.gate_grads_f64(dzb, dcb, z, tc_cache + ho, cprev, dmb, H)
            memcpy(dz + zo, dzb, G * sizeof(floating))
        _rec_mm(hi - r0, Hp, G, dzs + <Py_ssize_t> r0 * G, G, w_hh, Hp, False,    # (1')
                whh_packed, dhs + <Py_ssize_t> r0 * Hp, Hp)
        if rmask != NULL:              # h_{t-1} entered (1) masked                 (1r')
            for b in range(r0, hi):
                ro = <Py_ssize_t> b * Hp
                for j in range(Hp):
                    dhs[ro + j] *= rmask[ro + j]


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
    const floating* hm_cache,   # (T*B, Hp) h_{t-1} * rmask at the time of z_t, or NULL
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
    # With recurrent dropout the forward kept the masked h_{t-1} (h0 included) row by
    # row at the time of z_t, so dW_hh is one GEMM over all rows                  (1r').
    if hm_cache != NULL:
        gemm(True, False, g1 - g0, Hp, T * B, 1, dz + g0, G, hm_cache, Hp, 0,
             dw_hh_tmp + oh, Hp)
    elif reverse:
        gemm(True, False, g1 - g0, Hp, (T - 1) * B, 1, dz + g0, G,
             y + <Py_ssize_t> B * Hp, Hp, 0, dw_hh_tmp + oh, Hp)
    else:
        gemm(True, False, g1 - g0, Hp, (T - 1) * B, 1, dz + <Py_ssize_t> B * G + g0, G,
             y, Hp, 0, dw_hh_tmp + oh, Hp)
    if h0 != NULL and hm_cache == NULL:
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
    const floating[:, ::1] rmask,       # (B, Hp) the forward's recurrent dropout mask, or None
    const floating[:, :, ::1] hm_cache,  # (T, B, Hp) from lstm_forward with rmask
):
    """BPTT through one layer and direction; accumulates into the weight gradients."""
    cdef int T = x.shape[0], B = x.shape[1], I = x.shape[2]
    cdef int G = w_hh.shape[0], H = w_hh.shape[0] // 4, Hp = w_hh.shape[1]
    cdef int P = 0 if w_hr is None else w_hr.shape[0]
    cdef int p, n_chunks
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
    cdef const floating* rm_p = NULL
    cdef const floating* hmc_p = NULL

    _check(G == 4 * H and Hp == (P if P > 0 else H) and _is(w_ih.shape, G, I), "weights")
    if rmask is not None:
        _check(_is(rmask.shape, B, Hp) and hm_cache is not None
               and _is(hm_cache.shape, T, B, Hp), "rmask/hm_cache")
        rm_p = &rmask[0, 0]
        hmc_p = &hm_cache[0, 0, 0]
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
                        num_threads=team(n_threads, n_chunks, <double> T * B * G * (Hp + P),
                                         MIN_PARALLEL_MACS)):
            note_team()
            blas_single_enter()
            _backward_chunk(&dz[0, 0, 0], dhp_p, &dzs[0, 0], &dh0[0, 0], &dc[0, 0],
                            &dhbuf[0, 0], dm_p, &dy[0, 0, 0], &dh_n[0, 0], &gates[0, 0, 0],
                            &c_cache[0, 0, 0], &tc_cache[0, 0, 0], &c0[0, 0], &w_hh[0, 0],
                            w_hr_p, whh_pk, whr_pk if P > 0 else NULL, rm_p, &lengths[0],
                            T, B, H, P,
                            split(B, n_chunks, p), split(B, n_chunks, p + 1), reverse)
            blas_single_exit()
        for p in prange(n_parts, schedule="static",
                        num_threads=team(n_threads, n_parts, <double> T * B * G * (I + Hp) * 2,
                                         MIN_PARALLEL_MACS)):
            note_team()
            blas_single_enter()
            _weight_grads_block(&dw_ih[0, 0], &dw_hh[0, 0], dw_hr_p, dbi_p, dbh_p,
                                &dw_ih_tmp[0, 0], &dw_hh_tmp[0, 0], dw_hr_tmp_p, &db_tmp[0],
                                &dz[0, 0, 0],
                                &dzs[0, 0], dhp_p, m_p, &x[0, 0, 0], &y[0, 0, 0], h0_p,
                                hmc_p, T, B, I, H, P, split(G, n_parts, p), split(G, n_parts, p + 1),
                                split(P, n_parts, p), split(P, n_parts, p + 1), reverse)
            # dx = dz W_ih                                                   (1')
            gemm(False, False, split(T * B, n_parts, p + 1) - split(T * B, n_parts, p),
                 I, G, 1, &dz[0, 0, 0] + <Py_ssize_t> split(T * B, n_parts, p) * G, G,
                 &w_ih[0, 0], I, 0, &dx[0, 0, 0] + <Py_ssize_t> split(T * B, n_parts, p) * I, I)
            blas_single_exit()


cdef inline bint _is(Py_ssize_t* shape, Py_ssize_t a, Py_ssize_t b, Py_ssize_t c=-1) noexcept:
    """shape[:2] == (a, b), and shape[2] == c when c >= 0."""
    return shape[0] == a and shape[1] == b and (c < 0 or shape[2] == c)


cdef inline void _check(bint ok, str what) except *:
    if not ok:
        raise ValueError(f"cylstm._lstm: inconsistent shapes in kernel arguments ({what})")

