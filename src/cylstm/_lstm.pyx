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
    (1) z_t = [x_t | h_{t-1}] [W_ih | W_hh]^T + b           (B, G)
        one product per step over both inputs (K = I + Hp), then + b ("fused"); or,
        when W_ih and W_hh do not fit a core's L2 together (8 of them on Zen 4 and 5:
        _threads.STEP_WEIGHT_BYTES) or a thread's chunk has few rows (input_in_step),
        x_t W_ih^T + b for all steps before the loop and the step's product h_{t-1} W_hh^T
        (one sequence, B = 1: in pieces of 8 steps on the packed kernel, in inference
        beside the loop; _pipelined_part)
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
         db += sum dz, dx = dz W_ih (GEMMs over time blocks, see "Time blocks").
Recurrent dropout (docs/math.md, "Recurrent dropout and weight dropout"): with a mask
r (B, Hp), (1) reads h_{t-1} * r instead of h_{t-1}, (1') becomes
dh_{t-1} = (dz W_hh) * r and dW_hh += dz^T (h_{t-1} * r)                    (1r) (1r').

Variable lengths (PyTorch's packed semantics): row b is active at loop step s < L = lengths[b];
its time index is t = s forward and t = L-1-s in reverse, so reverse runs over each
sequence's own valid steps, with no packing or copying. At an inactive step the state
is frozen and y[t=s, b] = 0 (for s >= L, t = s walks exactly the padded positions).
Per-step arrays (gates, caches, dz) are kept in loop-step order; y, dy, x and dx are in
time order. Each step copies its rows [x_t | h_{t-1}] (h_{t-1} alone when not fused)
into a scratch (xh), whatever their times; in reverse x is also kept in loop-step order
(xg) when training or when projected before the loop, so that those products read
contiguous rows.

Segments. Both kernels run a range of loop steps [s0, s1), carrying the state (h, c
forward; dh, dc backward) in their INOUT arguments between calls: one call over [0, T)
is the whole layer; checkpointed BPTT (cylstm.functional) keeps only the state at
segment starts and recomputes each segment's caches just before its backward.

Parallel structure. Batch rows are independent sequences, so the batch is cut into fixed
chunks and each OpenMP thread runs the *whole* time loop of its chunks: per step one
single-threaded product [x_t | h_{t-1}] [W_ih | W_hh]^T on its own rows, then its fused
gate math. There is no barrier between steps at all (why not one multithreaded GEMM per
step: the comment below). Fused, the input is part of the step's product rather than
one GEMM over all T*B rows before the loop: that GEMM writes T*B*G pre-activations to
memory for the loop to read back (105 MB at T=100, B=256, H=256; at K = I = 64 it ran
at about 115 GFLOP/s per core), while the step's product runs at the speed of the
recurrent one on weights already in cache. When the weights do not fit in cache, each
step would stream I*G more of them from L3, and with few rows a chunk they cost more
than they save; the GEMMs before the loop win then (figures: input_in_step). Those GEMMs (not fused) and the large GEMMs of backward (dW_ih, dW_hh,
db, dx) run over time blocks (block_steps), each cut into fixed row parts in a prange,
each part one single-threaded GEMM.
Chunk and block boundaries depend only on the shapes and on `n_parts` (fixed per process
by the Python layer from the machine's core count, never from the thread count), and
shared gradients are written only by the block that owns their rows, so results are
bitwise identical for any number of threads (team sizes and thresholds: _parallel.pxd).
"""

from cython cimport floating
from cython.parallel cimport prange
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset

from cylstm._blas cimport affine_rows, gemm
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


from cylstm._kernels cimport (cy_act_f32, cy_act_select, cy_act_f64, cy_act_select_f64,
                              cy_cell_fns, cy_cell_select,
                              cy_gemm_packed_fn, cy_packed_size, cy_pack_f32, cy_pack_rows_f32,
                              cy_rgemm_select, cy_gemm_packed64_fn, cy_packed_size_f64,
                              cy_pack_f64, cy_pack_rows_f64, cy_rgemm64_select,
                              cy_bgemm_fn, cy_bgemm_select, cy_pack_level)

cdef cy_act_f32 _act
cdef cy_act_f64 _act64
cdef cy_cell_fns _cell
cdef cy_gemm_packed_fn _rgemm = NULL       # NULL at level 0: BLAS
cdef cy_gemm_packed64_fn _rgemm64 = NULL   # NULL at level 0: BLAS
cdef cy_bgemm_fn _bgemm = NULL             # the backward's float32 products; NULL below 2: BLAS
cdef int _level = 0


cdef void _use_level(int level) noexcept nogil:
    global _act, _act64, _cell, _rgemm, _rgemm64, _bgemm, _level, cy_pack_level
    _act = cy_act_select(level)
    _act64 = cy_act_select_f64(level)
    _cell = cy_cell_select(level)
    _rgemm = cy_rgemm_select(level)
    _rgemm64 = cy_rgemm64_select(level)
    _bgemm = cy_bgemm_select(level)
    cy_pack_level = level
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
        if cy_bgemm_select(lvl) == _bgemm:
            levels.setdefault("bgemm", lvl)     # levels 0 and 1 have none (BLAS)
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


def _activations(const floating[::1] x):
    """Test hook: (sigmoid(x), tanh(x)) through the row functions of x's dtype that the
    kernels use at the current level."""
    import numpy as np
    dtype = np.float32 if floating is float else np.float64
    n = x.shape[0]
    zeros = np.zeros(n, dtype)
    sig = np.array(x, dtype=dtype)
    th = np.array(x, dtype=dtype)
    cdef floating[::1] s = sig, t = th, z = zeros
    if n:
        if floating is float:
            _act.sigmoid_add(&s[0], &z[0], n)
            _act.tanh_add(&t[0], &z[0], n)
        else:
            _act64.sigmoid_add(&s[0], &z[0], n)
            _act64.tanh_add(&t[0], &z[0], n)
    return sig, th


_activations_f32 = _activations_f64 = _activations


def rgemm_level():
    """Which per-step kernel runs (float32 and float64 alike): 2 AVX-512, 1 AVX2+FMA,
    0 BLAS."""
    return _level if _rgemm != NULL else 0


def _set_rgemm_level(int level):
    """Test hook: cylstm._isa.set_level(level), capped at what the CPU supports."""
    from cylstm import _isa
    _isa.set_level(min(level, _isa.cpu_level()))


# Packed panels start on a 64-byte boundary, so that the kernel's 64-byte loads never
# straddle two cache lines: the scratch has 64 bytes of slack to align in. (NumPy's
# large arrays start 16 bytes past a page.)
cdef enum:
    _PACK_SLACK_BYTES = 64


cdef inline size_t _packed_elems(int K, int N, size_t itemsize) noexcept nogil:
    """Elements of the packed (K, N) weight in a dtype of `itemsize` bytes."""
    return cy_packed_size(K, N) if itemsize == 4 else cy_packed_size_f64(K, N)


def pack_size(int K, int N, dtype):
    """Elements of scratch, in `dtype` (float32 or float64), that packing a (K, N)
    weight for the per-step kernel needs (0 when that dtype's per-step products run on
    BLAS: no kernel at this ISA level)."""
    import numpy as np
    cdef size_t itemsize = np.dtype(dtype).itemsize
    cdef bint kernel = (_rgemm != NULL) if itemsize == 4 else (_rgemm64 != NULL)
    if K <= 0 or N <= 0 or not kernel:
        return 0
    return _packed_elems(K, N, itemsize) + _PACK_SLACK_BYTES // itemsize


def forward_pack_size(int I, int Hp, int G, dtype, bint fused=True):
    """Elements of scratch, in `dtype`, for the forward's weights. Fused (the input's
    product inside each step's): [W_ih | W_hh] packed (I + Hp, G) for the per-step
    kernel, or, without one (level 0), the two matrices side by side, (G, I + Hp)
    row-major, so that each step is still one BLAS call. Not fused: W_hh packed."""
    if not fused:
        return pack_size(Hp, G, dtype)
    n = pack_size(I + Hp, G, dtype)
    return n if n else G * (I + Hp)


def input_in_step(int I, int Hp, int G, Py_ssize_t itemsize, Py_ssize_t cache_bytes,
                  int rows):
    """Whether the forward computes x_t W_ih^T inside each step's product (fused) rather
    than as GEMMs over every step before the loop, for chunks of `rows` batch rows per
    thread: when [W_ih | W_hh] fits in `cache_bytes` (the core's L2, or more where the
    core reads weights from L3 fast enough: cylstm._threads.STEP_WEIGHT_BYTES) and
    either a chunk has 8 rows or more or the weights are small (<= 256 kB). Fused,
    each step reads both weights from cache and no T*B*G pre-activations go through
    memory; but every step streams the I*G extra weights through the core, which a
    chunk of few rows cannot amortise, and which comes from L3 when they do not fit.
    2 threads, inference, float32 unless said, hoisted vs fused:
    T=100 B=32 I=128 H=384 16.9 vs 22.6 ms and H=256 float64 19.5 vs 28.9 (not in L2);
    B=1 I=64 H=256 0.93 vs 1.11 ms, B=8 I=128 H=256 2.37 vs 2.81 (4 rows a chunk);
    B=16 I=64 H=128 1.27 vs 1.10, B=32 I=128 H=256 7.8 vs 7.5, B=256 I=64 H=256 67.7 vs
    58.5 (8 rows or more); T=50 B=4 I=32 H=64 0.133 vs 0.120 (96 kB of weights). (Those
    on a 2 MiB-L2 Intel Xeon; a Zen 5's figures are with STEP_WEIGHT_BYTES.)"""
    cdef Py_ssize_t nbytes = <Py_ssize_t> G * (I + Hp) * itemsize
    return nbytes <= cache_bytes and (rows >= 8 or nbytes <= 256 * 1024)


def pack_floats(int K, int N):
    """pack_size(K, N, float32)."""
    import numpy as np
    return pack_size(K, N, np.float32)


cdef inline floating* _pack_aligned(floating* p) noexcept nogil:
    """The first 64-byte boundary at or after p, within the _PACK_SLACK_BYTES of slack
    that packing scratch has (NumPy aligns arrays to their item size at least)."""
    return p + ((_PACK_SLACK_BYTES - (<size_t> p & (_PACK_SLACK_BYTES - 1)))
                & (_PACK_SLACK_BYTES - 1)) // sizeof(floating)


def _packed_product(const floating[:, ::1] a, const floating[:, ::1] w, bint trans,
                    int reps):
    """Test and benchmark hook: (A (M, K) @ op(W), seconds per call) through the packed
    per-step kernel of a's dtype (the kernels' own _pack and _rec_mm), op(W) = W^T if
    trans (w is (N, K)), else W (w is (K, N)). W is packed once into 64-byte aligned
    scratch, as _wpack_slot places the time loop's weights, and the product runs `reps`
    times back to back, as the loop's steps run it (bench/rgemm_rows.py). Raises if this
    CPU has no such kernel."""
    import time
    import numpy as np
    cdef int M = a.shape[0], K = a.shape[1], N = w.shape[0] if trans else w.shape[1], i
    cdef bint kernel = (_rgemm != NULL) if floating is float else (_rgemm64 != NULL)
    if not kernel:
        raise RuntimeError("no packed kernel on this CPU (rgemm_level() == 0)")
    if (w.shape[1] if trans else w.shape[0]) != K or M < 1 or N < 1 or K < 1 or reps < 1:
        raise ValueError("shapes do not match, or reps < 1")
    dtype = np.float32 if floating is float else np.float64
    packed = np.empty(pack_size(K, N, dtype), dtype)
    out = np.empty((M, N), dtype)
    cdef floating[::1] pk = packed
    cdef floating[:, ::1] c = out
    cdef const floating* pw = _pack(_pack_aligned(&pk[0]), &w[0, 0], K, N, w.shape[1], trans)
    t0 = time.perf_counter()
    with nogil:
        for i in range(reps):
            _rec_mm(M, N, K, &a[0, 0], K, &w[0, 0], w.shape[1], trans, pw, &c[0, 0], N)
    return out, (time.perf_counter() - t0) / reps


def _pack_panels(const floating[:, ::1] w, int k0=0, int Kt=0, int reps=1,
                 double fill=0.0):
    """Test and benchmark hook: (W^T packed as rows [k0, k0 + K) of (Kt, N) panels,
    seconds per pack), w being W (N, K) (PyTorch's layout), exactly as the forward packs
    [W_ih | W_hh] (_pack_rows), at the current ISA level; Kt = 0 means K. The panels are
    returned flat, one panel of Kt rows of a panel's width after another, in scratch
    first filled with `fill`: rows outside [k0, k0 + K) must keep it."""
    import time
    import numpy as np
    cdef int N = w.shape[0], K = w.shape[1], i
    Kt = Kt or K
    if N < 1 or K < 1 or k0 < 0 or k0 + K > Kt or reps < 1:
        raise ValueError("shapes do not match, or reps < 1")
    dtype = np.float32 if floating is float else np.float64
    out = np.full(_packed_elems(Kt, N, sizeof(floating)), fill, dtype)
    cdef floating[::1] pk = out
    t0 = time.perf_counter()
    with nogil:
        for i in range(reps):
            _pack_rows(&pk[0], &w[0, 0], K, N, K, k0, Kt)
    return out, (time.perf_counter() - t0) / reps


def _packed_matmul(a, w, trans):
    """Test hook: A (M, K) @ op(W) through the packed per-step kernel (_packed_product)."""
    return _packed_product(a, w, trans, 1)[0]


_packed_matmul_f32 = _packed_matmul_f64 = _packed_matmul


def _backward_product(const float[:, :] a, const float[:, ::1] b, float[:, ::1] c, bint ta,
                      bint accumulate, int reps=1):
    """Test and benchmark hook: c (M, N) = [c +] op(a) @ b through the backward's own
    float32 kernel, op(a) = a^T if ta (a is (K, M)) else a (a is (M, K)); a's rows may
    have any stride (its last axis contiguous), as the backward's dz columns. Runs
    `reps` times (accumulating each time if asked) and returns the seconds per call.
    Raises if this CPU level has no such kernel (bgemm is BLAS there)."""
    import time
    cdef int M = a.shape[1] if ta else a.shape[0], K = a.shape[0] if ta else a.shape[1]
    cdef int N = b.shape[1], i
    if _bgemm == NULL:
        raise RuntimeError("no backward kernel at this level (level < 2)")
    if a.shape[1] > 1 and a.strides[1] != sizeof(float):
        raise ValueError("a's last axis must be contiguous")
    if b.shape[0] != K or c.shape[0] != M or c.shape[1] != N or reps < 1:
        raise ValueError("shapes do not match, or reps < 1")
    cdef int lda = a.strides[0] // sizeof(float)
    if M == 0 or N == 0:
        return 0.0
    t0 = time.perf_counter()
    with nogil:
        for i in range(reps):
            _bgemm(ta, M, N, K, &a[0, 0] if a.shape[0] and a.shape[1] else NULL, lda,
                   &b[0, 0] if K and N else NULL, N, &c[0, 0], N, accumulate)
    return (time.perf_counter() - t0) / reps



cdef floating* _wpack_slot(floating[::1] wpack, int K, int N, int Kr, int Nr) except? NULL:
    """Start of the packed (K, N) recurrent weight in the caller's scratch, 64-byte
    aligned (the packed (Kr, Nr) projection follows it), or NULL when there is no
    scratch or no kernel for this dtype."""
    cdef size_t item = sizeof(floating)
    cdef bint kernel = (_rgemm != NULL) if item == 4 else (_rgemm64 != NULL)
    if wpack is None or not kernel or K <= 0 or N <= 0:
        return NULL
    _check(<size_t> wpack.shape[0] >= _packed_elems(K, N, item) + _PACK_SLACK_BYTES // item
           + (_packed_elems(Kr, Nr, item) if Kr > 0 and Nr > 0 else 0), "wpack")
    return _pack_aligned(&wpack[0])


cdef inline void _rec_mm(int m, int n, int k, const floating* a, int lda,
                         const floating* w, int ldw, bint w_trans, const floating* packed,
                         floating* c, int ldc) noexcept nogil:
    """C (m, n) = A (m, k) @ op(W), op(W) (k, n); from the packed W when there is one."""
    if packed != NULL:
        if floating is float:
            _rgemm(m, n, k, a, lda, packed, c, ldc)
        else:
            _rgemm64(m, n, k, a, lda, packed, c, ldc)
        return
    gemm(False, w_trans, m, n, k, 1, a, lda, w, ldw, 0, c, ldc)


cdef inline floating* _pack(floating* dst, const floating* w, int K, int N, int ldw,
                            bint trans) noexcept nogil:
    """Pack op(W) (K, N) into dst for _rec_mm, or return NULL (no kernel: BLAS)."""
    if dst == NULL or K <= 0 or N <= 0:
        return NULL
    if floating is float:
        if _rgemm == NULL:
            return NULL
        cy_pack_f32(dst, w, K, N, ldw, trans)
    else:
        if _rgemm64 == NULL:
            return NULL
        cy_pack_f64(dst, w, K, N, ldw, trans)
    return dst


cdef inline void _pack_rows(floating* dst, const floating* w, int K, int N, int ldw, int k0,
                            int Kt) noexcept nogil:
    """Pack W^T (K, N), w being W (N, K) (PyTorch's layout), as rows [k0, k0 + K) of
    packed (Kt, N) panels: [W_ih^T; W_hh^T] is two calls. dst must not be NULL."""
    if floating is float:
        cy_pack_rows_f32(dst, w, K, N, ldw, True, k0, Kt)
    else:
        cy_pack_rows_f64(dst, w, K, N, ldw, True, k0, Kt)


# ----------------------------------------------------------------------------------------
# Time blocks, and the rows of a block in loop-step order
# ----------------------------------------------------------------------------------------

# The input projection before the loop (when not fused), backward's weight gradients
# and dx (after its time loop) run over *time blocks* of block_steps(B) loop steps,
# each a fixed set of B * steps rows, and the weight gradients are accumulated block by
# block, last block first. A block is large enough (>= _BLOCK_ROWS rows) that its GEMMs
# run near the speed of one GEMM over all T*B rows. Blocks are what make checkpointed
# BPTT exact: a segment of whole blocks recomputed from its checkpoint has the very
# caches of the full forward (the same per-step products, the same projection blocks),
# and its backward issues exactly the BLAS calls, on exactly the values, that the
# full-cache backward issues for those blocks, so its gradients are bitwise the same
# (docs/math.md, "Checkpointed BPTT").
cdef enum:
    _BLOCK_ROWS = 2048


cpdef int block_steps(int B) noexcept nogil:
    """Loop steps per time block for a batch of B rows: ceil(2048 / B), at least 1.
    Checkpoint segments are whole numbers of blocks."""
    if B < 1:
        return _BLOCK_ROWS
    return max(1, (<int> _BLOCK_ROWS + B - 1) // B)


cdef inline int _time_of(const int* lengths, int s, int b, bint reverse) noexcept nogil:
    """Time index of loop step s of row b, or -1 where row b has ended (s >= L)."""
    cdef int L = lengths[b]
    if s >= L:
        return -1
    return L - 1 - s if reverse else s


cdef void _gather_rows(
    floating* dst,              # (rows, n) OUT: row q <- src at (step s_first + r // B,
                                #   b = r % B), r = q, or crow[q] with crow
    const floating* src,        # (T, B, n) time order, row (t, b) at t * st + b * sb
    const int* lengths,         # (B,)
    int s_first, int q0, int q1, int B, int n, bint reverse, Py_ssize_t st, Py_ssize_t sb,
    const int* rowmap,          # (B,) the source row of kernel row b, or NULL (b itself)
    const int* crow=NULL,       # place -> sl * B + b (_active_rows; s_first the segment's
                                #   first step): only the active rows, compactly
) noexcept nogil:
    """Rows [q0, q1) of a block in loop-step order: x at each row's own time, zeros where
    the row has ended (so that padding never reaches a product)."""
    cdef int q, r, t
    for q in range(q0, q1):
        r = q if crow == NULL else crow[q]
        t = _time_of(lengths, s_first + r // B, r % B, reverse)
        if t < 0:
            memset(dst + <Py_ssize_t> q * n, 0, n * sizeof(floating))
        else:
            memcpy(dst + <Py_ssize_t> q * n, src + t * st + _row(rowmap, r % B) * sb,
                   n * sizeof(floating))


cdef void _scatter_rows(
    floating* dst,              # (T, B, n) OUT at the active rows' times
    const floating* src,        # (q1 - q0, n) rows [q0, q1) of a block, loop-step order
    const int* lengths,
    int s_first, int q0, int q1, int B, int n, bint reverse,
) noexcept nogil:
    """The inverse of _gather_rows for the rows that are active; ended rows' times are
    left as they are."""
    cdef int q, t
    for q in range(q0, q1):
        t = _time_of(lengths, s_first + q // B, q % B, reverse)
        if t >= 0:
            memcpy(dst + (<Py_ssize_t> t * B + q % B) * n, src + <Py_ssize_t> (q - q0) * n,
                   n * sizeof(floating))


# ----------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------

cdef inline void _cell_row(
    floating* m,                # (B, H) OUT row b: m_t = o * tanh(c_t) (h itself if P == 0)
    floating* c,                # (B, H) INOUT running c
    floating* z,                # (G,) INOUT row b of the step's products in, activated out
    floating* gates,            # (n, B, G) OUT activated i, f, g, o, or NULL (inference)
    floating* c_cache,          # (n, B, H) OUT c_t, or NULL (inference)
    floating* tc_cache,         # (n, B, H) OUT tanh(c_t), or NULL
    floating* m_cache,          # (n, B, H) OUT m_t, or NULL (inference, or P == 0)
    const floating* add,        # (G,) b when z holds the input's product too, else the
                                #   row's x_t W_ih^T + b (projected before the loop)
    int B, int H, int sl, int b,
) noexcept nogil:
    """Gates, cell and m_t of batch row b at segment step sl (an active step), given its
    step's product z ([x_t | h_{t-1}] [W_ih | W_hh]^T, or h_{t-1} W_hh^T)."""
    cdef Py_ssize_t ho = (<Py_ssize_t> sl * B + b) * H
    cdef floating* mb = m + <Py_ssize_t> b * H
    cdef floating* cb = c + <Py_ssize_t> b * H
    _activate_gates(z, add, H)                                               # (1) (2)
    if gates != NULL:
        memcpy(gates + (<Py_ssize_t> sl * B + b) * 4 * H, z, 4 * H * sizeof(floating))
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


cdef inline int _rows_per_tile(int G, size_t item) noexcept nogil:
    """Batch rows whose step is computed together: the product of a tile of rows, then
    their gate math, while the tile's z rows (at most ~64 kB) are still in cache. A whole
    chunk at once streams z through memory at large B (T=100, B=1024, I=64, H=256
    inference on 2 threads: 235 ms untiled, 223 ms tiled; no difference at B=256). A
    multiple of the product kernel's 8-row blocks; it groups rows only, never changes a
    value."""
    return max(8, <int> (65536 // (G * item)) // 8 * 8)


cdef void _forward_chunk(
    floating* y,                # (T, B, Hp) OUT at each row's times, rows [r0, r1), row
                                #   (t, b) at t * yst + b * ysb; or NULL
    floating* h,                # (B, Hp) INOUT: state at step s0 in, at s1 out
    floating* c,                # (B, H) INOUT
    floating* gates,            # (n, B, G) OUT activated gates (training), or NULL
    const floating* xproj,      # (n, B, G) x_t W_ih^T + b projected before the loop (may
                                #   be gates itself), or NULL: the input is in the step
    const int* xpos,            # (n, B) the place of row (sl, b) in xproj when it holds
                                #   the active rows only (cpos of _active_rows), or NULL
    const floating* ttab,       # (V, G) token input: E W_ih^T + b (token_table), read by
                                #   id instead of xproj; or NULL
    const int* tids,            # (T, B) the ids (time order, the caller's rows), with ttab
    floating* c_cache,          # (n, B, H) OUT or NULL (inference)
    floating* tc_cache,         # (n, B, H) OUT or NULL
    floating* m_cache,          # (n, B, H) OUT or NULL
    floating* hprev,            # (n, B, Hp) OUT the product's h_{t-1} (masked with rmask),
                                #   0 where a row has ended; or NULL (inference)
    floating* xg,               # (n, B, I) OUT x in loop-step order, 0 where a row has
                                #   ended (training in reverse), or NULL
    floating* xh,               # (B, Ix + Hp) scratch: the rows [x_t | h_{t-1}] of a step
                                #   (Ix = I), or h_{t-1} alone (Ix = 0, xproj given)
    floating* z,                # (B, G) scratch: the step's products, then its gates
    floating* mbuf,             # (B, H) scratch: m_t before the projection (P > 0 only)
    floating* hp,               # (B, P) scratch: m_t W_hr^T (P > 0 only)
    const floating* rmask,      # (B, Hp) recurrent dropout mask, or NULL
    const floating* x,          # (T, B, I) time order, row (t, b) at t * xst + b * xsb
    const floating* w_ih,       # (G, I)
    const floating* w_hh,       # (G, Hp)
    const floating* w_hr,       # (P, H) or NULL
    const floating* bias,       # (G,) b_ih + b_hh (zeros for a layer without bias)
    const floating* w_packed,   # [W_ih^T; W_hh^T] (Ix + Hp, G) packed for _rec_mm, or NULL
    const floating* w_cat,      # [W_ih | W_hh] (G, Ix + Hp) for BLAS, or NULL
    const floating* whr_packed, # W_hr^T packed, or NULL
    const int* lengths,         # (B,) in 1..T
    int s0, int s1, int B, int I, int Ix, int H, int P, int r0, int r1, bint reverse,
    Py_ssize_t xst, Py_ssize_t xsb, Py_ssize_t yst, Py_ssize_t ysb,
    const int* rowmap,          # (B,) the row of x and y that kernel row b reads and
                                #   writes, or NULL (b itself)
) noexcept nogil:
    """Loop steps [s0, s1) for batch rows [r0, r1), run by one thread. Per-step arrays
    (gates, caches) are indexed by the segment step sl = s - s0; x and y by time."""
    cdef int G = 4 * H, Hp = P if P > 0 else H, K = Ix + Hp
    # Tiles only on the packed kernel with the input in the step (input_in_step's
    # rule: the weights in L2, or on Zen 4 and 5 read from L3 fast enough), since every tile
    # reads all of them; BLAS re-packs them at every call. Otherwise the whole chunk at
    # once.
    cdef int R = _rows_per_tile(G, sizeof(floating)) \
        if w_packed != NULL and Ix > 0 else r1 - r0
    cdef int s, sl, b, t, hi, j, rb, re, pe
    cdef Py_ssize_t ro
    cdef floating* m = mbuf if P > 0 else h
    cdef floating* xr
    cdef const floating* add
    for s in range(s0, s1):
        sl = s - s0
        hi = _active_end(lengths, r0, r1, s)
        rb = r0
        while rb < r1:
            re = min(rb + R, r1)
            pe = min(re, hi)           # rows [rb, pe) need a product      (1) (1r)
            for b in range(rb, re):
                t = _time_of(lengths, s, b, reverse)
                xr = xh + <Py_ssize_t> b * K
                ro = <Py_ssize_t> sl * B + b
                if t < 0:              # ended: the caches hold zeros, never stale memory
                    if b < pe:         # a product row whose result is never read
                        memset(xr, 0, K * sizeof(floating))
                    if hprev != NULL:
                        memset(hprev + ro * Hp, 0, Hp * sizeof(floating))
                    if xg != NULL:
                        memset(xg + ro * I, 0, I * sizeof(floating))
                    continue
                if Ix > 0:
                    memcpy(xr, x + t * xst + _row(rowmap, b) * xsb, I * sizeof(floating))
                    if xg != NULL:
                        memcpy(xg + ro * I, xr, I * sizeof(floating))
                # h_{t-1} as the product reads it, masked with recurrent dropout; h
                # itself stays the state that (3)-(5) carry on and the output, which
                # dropout must not touch. Training caches it: dW_hh reads it.
                if rmask != NULL:
                    for j in range(Hp):
                        xr[Ix + j] = h[<Py_ssize_t> b * Hp + j] * rmask[<Py_ssize_t> b * Hp + j]
                else:
                    memcpy(xr + Ix, h + <Py_ssize_t> b * Hp, Hp * sizeof(floating))
                if hprev != NULL:
                    memcpy(hprev + ro * Hp, xr + Ix, Hp * sizeof(floating))
            if pe > rb:
                _step_mm(pe - rb, G, Ix, Hp, xh + <Py_ssize_t> rb * K, w_ih, w_hh, w_packed,
                         w_cat, z + <Py_ssize_t> rb * G)
            for b in range(rb, re):
                if s >= lengths[b]:    # ended: state frozen; time s is padding, output 0
                    ro = <Py_ssize_t> sl * B + b
                    if y != NULL:
                        memset(y + s * yst + _row(rowmap, b) * ysb, 0, Hp * sizeof(floating))
                    if c_cache != NULL:
                        memset(gates + ro * G, 0, G * sizeof(floating))
                        memset(c_cache + ro * H, 0, H * sizeof(floating))
                        memset(tc_cache + ro * H, 0, H * sizeof(floating))
                    if m_cache != NULL:  # read by the dW_hr GEMM over the block's rows
                        memset(m_cache + ro * H, 0, H * sizeof(floating))
                    continue
                if ttab != NULL:       # token input: the row of the id at this time
                    t = _time_of(lengths, s, b, reverse)
                    add = ttab + <Py_ssize_t> G * tids[<Py_ssize_t> t * B + _row(rowmap, b)]
                elif xproj == NULL:
                    add = bias
                else:
                    add = xproj + G * (<Py_ssize_t> sl * B + b if xpos == NULL
                                       else xpos[<Py_ssize_t> sl * B + b])
                _cell_row(m, c, z + <Py_ssize_t> b * G, gates, c_cache, tc_cache, m_cache,
                          add, B, H, sl, b)
                if P == 0 and y != NULL:
                    t = _time_of(lengths, s, b, reverse)
                    memcpy(y + t * yst + _row(rowmap, b) * ysb, m + <Py_ssize_t> b * H,
                           H * sizeof(floating))
            rb = re
        if P > 0 and hi > r0:                                                # (5)
            _rec_mm(hi - r0, P, H, mbuf + <Py_ssize_t> r0 * H, H, w_hr, H, True,
                    whr_packed, hp + <Py_ssize_t> r0 * P, P)
            for b in range(r0, r1):
                t = _time_of(lengths, s, b, reverse)
                if t >= 0:             # ended rows keep their frozen h
                    memcpy(h + <Py_ssize_t> b * P, hp + <Py_ssize_t> b * P, P * sizeof(floating))
                    if y != NULL:
                        memcpy(y + t * yst + _row(rowmap, b) * ysb, hp + <Py_ssize_t> b * P,
                               P * sizeof(floating))


cdef inline void _step_mm(int m, int G, int I, int Hp, const floating* xh,
                          const floating* w_ih, const floating* w_hh,
                          const floating* w_packed, const floating* w_cat,
                          floating* z) noexcept nogil:
    """z (m, G) = [x_t | h_{t-1}] (m, I + Hp) @ [W_ih | W_hh]^T, or with I = 0 (the
    input projected before the loop) h_{t-1} W_hh^T                               (1)
    One FMA chain per element over k = 0 .. I + Hp - 1 on the packed weights; without
    them one BLAS call on [W_ih | W_hh] side by side (w_cat, (G, I + Hp)); without that
    (short sequences) x W_ih^T, then += h W_hh^T."""
    cdef int K = I + Hp
    if w_packed != NULL:
        _rec_mm(m, G, K, xh, K, NULL, 0, False, w_packed, z, G)
        return
    if w_cat != NULL:
        gemm(False, True, m, G, K, 1, xh, K, w_cat, K, 0, z, G)
        return
    if I > 0:
        gemm(False, True, m, G, I, 1, xh, K, w_ih, I, 0, z, G)
    gemm(False, True, m, G, Hp, 1, xh + I, K, w_hh, Hp, 1 if I > 0 else 0, z, G)


def lstm_forward(
    *,
    # (the first argument is never None: Cython picks the dtype from it)
    floating[:, ::1] h,                 # (B, Hp) INOUT: state at step s0 in, at s1 out
    floating[:, ::1] c,                 # (B, H) INOUT
    floating[:, :, :] y,                # (T, B, Hp) OUT, last axis contiguous, or None (a
                                        #   recomputing forward)
    floating[:, :, ::1] gates,          # (n, B, G) OUT activated gates in training; scratch
                                        #   for the projected input in inference unless
                                        #   fused, else None; n = s1 - s0
    floating[:, :, ::1] c_cache,        # (n, B, H) OUT or None (inference)
    floating[:, :, ::1] tc_cache,       # (n, B, H) OUT or None (inference)
    floating[:, :, ::1] m_cache,        # (n, B, H) OUT with a projection in training, else None
    floating[:, :, ::1] hprev,          # (n, B, Hp) OUT in training, else None
    floating[:, :, ::1] xg,             # (n, B, I) OUT x in loop-step order: in reverse when
                                        #   training, and when not fused in reverse or for
                                        #   an x that is not C-contiguous; else None
    floating[:, ::1] xh,                # (B, I + Hp) scratch if fused, else (B, Hp)
    floating[:, ::1] hz,                # (B, G) scratch
    floating[:, ::1] mbuf,              # (B, H) scratch with a projection, else None
    floating[:, ::1] hp,                # (B, P) scratch with a projection, else None
    const floating[:, :, :] x,          # (T, B, I), last axis contiguous (a batch-first array
                                        #   transposed, say; C-contiguous in training), or
                                        #   None when projected
    const floating[:, ::1] w_ih,        # (G, I)
    const floating[:, ::1] w_hh,        # (G, Hp)
    const floating[:, ::1] w_hr,        # (P, H) or None (no projection)
    const floating[::1] bias,           # (G,) b_ih + b_hh; zeros for a layer without bias
    const int[::1] lengths,             # (B,) in 1..T
    bint reverse,
    bint fused,                         # the input's product inside each step's (input_in_step)
    int n_parts,
    int n_threads,
    floating[::1] wpack=None,           # scratch: forward_pack_size(I, Hp, G, fused) + pack_size(H, P)
    const floating[:, ::1] rmask,       # (B, Hp) recurrent dropout mask, or None
    int s0,                             # first loop step: a multiple of block_steps(B)
    int s1,                             # end: a multiple of block_steps(B), or T
    const int[::1] rows=None,           # (B,) inference only: kernel row b reads x[:, rows[b]]
                                        #   and writes y[:, rows[b]] (a permutation), so a
                                        #   batch runs in another order without copies
    int[::1] cpos=None,                 # (n * B,) scratch, inference only, or None: with
                                        #   ragged lengths and the input projected before
                                        #   the loop, it runs over the active rows only
    int[::1] crow=None,                 # (n * B,) scratch, with cpos
    int[::1] coff=None,                 # (n + 1,) scratch, with cpos
    const floating[:, ::1] token_table=None,  # (V, G) token input (x None): E W_ih^T + b
                                        #   (a Linear forward on E), read by id in the loop
                                        #   instead of step (1); never fused
    const int[:, ::1] token_ids=None,   # (T, B) with token_table: ids, time order, the
                                        #   caller's rows (rows maps kernel rows to them)
    int steps=0,                        # T when x is None
    floating[::1] ipack=None,           # scratch at B = 1, or None: pack_size(I, G) for
                                        #   W_ih^T packed; with it inference projects the
                                        #   input in pieces beside the loop
                                        #   (_pipelined_part), training before it
):
    """One LSTM layer, one direction, loop steps [s0, s1) (all of them: s0 = 0, s1 = T);
    see the module docstring.

    Callers pass every argument by keyword (cylstm.functional does); shapes are checked
    again here so that a wrong call raises instead of reading out of bounds.
    """
    cdef int T = steps if x is None else x.shape[0], B = h.shape[0], I = w_ih.shape[1]
    cdef int G = w_hh.shape[0], H = w_hh.shape[0] // 4, Hp = w_hh.shape[1]
    cdef int P = 0 if w_hr is None else w_hr.shape[0]
    cdef int Ix = I if fused else 0     # input columns of the step's product
    cdef int S = block_steps(B), n = s1 - s0, nb = (n + S - 1) // S
    cdef int p, n_chunks, kb, bs, be, q0, q1, g, nb_p
    cdef bint training = c_cache is not None
    cdef const floating* w_hr_p = NULL
    cdef const floating* bias_p = &bias[0]
    cdef floating* y_p = NULL
    cdef floating* g_p = NULL
    cdef floating* cc_p = NULL
    cdef floating* tc_p = NULL
    cdef floating* m_p = NULL
    cdef floating* hpv_p = NULL
    cdef floating* xg_p = NULL
    cdef floating* mbuf_p = NULL
    cdef floating* hp_p = NULL
    cdef floating* w_pk = NULL
    cdef floating* w_cat = NULL
    cdef floating* whr_pk = NULL
    cdef const floating* rm_p = NULL
    cdef Py_ssize_t item = sizeof(floating), xst, xsb, yst = 0, ysb = 0
    cdef bint gather                    # the projection reads x gathered into xg
    cdef const int* rows_p = NULL
    cdef int* cpos_p = NULL             # set when the projection runs over active rows
    cdef int* crow_p = NULL
    cdef int* coff_p = NULL
    cdef int c0, nrows
    cdef const floating* x_p = NULL
    cdef const floating* ttab_p = NULL
    cdef const int* tids_p = NULL
    cdef bint tokens = token_table is not None
    cdef floating* ipk = NULL           # W_ih^T packed: the projection in pieces (B = 1)
    cdef bint pipe = False              # ... beside the loop (inference)
    cdef int* pstate = NULL             # each piece's CY_PIECE_* state
    cdef int n_pieces = 0

    _check(0 <= s0 < s1 <= T and s0 % S == 0 and (s1 % S == 0 or s1 == T), "s0/s1")
    _check(G == 4 * H and Hp == (P if P > 0 else H) and _is(w_ih.shape, G, I), "weights")
    _check(bias is not None and bias.shape[0] == G, "bias")
    if tokens:         # the loop reads the table by id; x is never read
        _check(x is None and not fused and cpos is None and token_ids is not None
               and _is(token_ids.shape, T, B) and token_table.shape[1] == G, "token input")
        if not _ids_in_range(&token_ids[0, 0], <Py_ssize_t> T * B, token_table.shape[0]):
            raise ValueError(f"token ids must be in 0..{token_table.shape[0] - 1}")
        ttab_p = &token_table[0, 0]
        tids_p = &token_ids[0, 0]
        xst = xsb = 0
        gather = False
    else:
        _check(x is not None and x.shape[1] == B and x.shape[2] == I, "x")
        _check(_row_strides(x.shape, x.strides, item, &xst, &xsb), "x strides")
        x_p = &x[0, 0, 0]
        # C-contiguous as NumPy says it (the stride of a length-1 axis does not matter)
        gather = not ((T == 1 or xst == <Py_ssize_t> B * I) and (B == 1 or xsb == I))
        _check(not (training and gather), "x (training: C-contiguous)")
    if rows is not None:
        _check(not training and rows.shape[0] == B and _permutation(rows), "rows")
        rows_p = &rows[0]
    gather = not tokens and (gather or reverse or rows_p != NULL)
    if y is not None:
        _check(_is(y.shape, T, B, Hp) and _row_strides(y.shape, y.strides, item, &yst, &ysb)
               and _rows_disjoint(T, B, Hp, yst, ysb), "y")
        y_p = &y[0, 0, 0]
    if rmask is not None:
        _check(_is(rmask.shape, B, Hp), "rmask")
        rm_p = &rmask[0, 0]
    w_pk = _wpack_slot(wpack, Ix + Hp, G, H, P)
    if w_pk != NULL:
        whr_pk = w_pk + _packed_elems(Ix + Hp, G, sizeof(floating))
    elif wpack is not None and fused:  # no per-step kernel: BLAS on [W_ih | W_hh]
        _check(<size_t> wpack.shape[0] >= <size_t> G * (I + Hp), "wpack")
        w_cat = &wpack[0]
    _check(_is(h.shape, B, Hp) and _is(c.shape, B, H), "h/c")
    _check(_is(hz.shape, B, G) and _is(xh.shape, B, Ix + Hp), "hz/xh")
    _check(lengths.shape[0] == B and n_parts >= 1 and n_threads >= 1
           and _lengths_ok(&lengths[0], B, T), "lengths/n_parts")
    if training or not (fused or tokens):
        _check(gates is not None and _is(gates.shape, n, B, G), "gates")
        g_p = &gates[0, 0, 0]
        if not tokens and (reverse or (gather and not fused)):
            _check(xg is not None and _is(xg.shape, n, B, I), "xg")
            xg_p = &xg[0, 0, 0]
    if training:
        _check(tc_cache is not None and hprev is not None and _is(c_cache.shape, n, B, H)
               and _is(tc_cache.shape, n, B, H) and _is(hprev.shape, n, B, Hp), "cache")
        cc_p = &c_cache[0, 0, 0]
        tc_p = &tc_cache[0, 0, 0]
        hpv_p = &hprev[0, 0, 0]
    if P > 0:
        _check(_is(w_hr.shape, P, H) and mbuf is not None and hp is not None
               and _is(mbuf.shape, B, H) and _is(hp.shape, B, P), "projection")
        w_hr_p = &w_hr[0, 0]
        mbuf_p = &mbuf[0, 0]
        hp_p = &hp[0, 0]
        if training:
            _check(m_cache is not None and _is(m_cache.shape, n, B, H), "m_cache")
            m_p = &m_cache[0, 0, 0]
    if cpos is not None and not fused:
        _check(not training and crow is not None and coff is not None and xg is not None
               and cpos.shape[0] >= n * B and crow.shape[0] >= n * B
               and coff.shape[0] >= n + 1 and _is(xg.shape, n, B, I), "active rows scratch")
        if _active_rows(&cpos[0], &crow[0], &coff[0], &lengths[0], s0, n, B) < n * B:
            # Ragged: project the active rows only, gathered to their places (the
            # padding's products would never be read). xg holds them compactly.
            cpos_p, crow_p, coff_p = &cpos[0], &crow[0], &coff[0]
            xg_p = &xg[0, 0, 0]
    if (ipack is not None and w_pk != NULL and not fused and not tokens and B == 1
            and cpos_p == NULL and rm_p == NULL):
        ipk = _wpack_slot(ipack, I, G, 0, 0)
        if ipk != NULL:
            n_pieces = (n + _PIECE_STEPS - 1) // _PIECE_STEPS
            # a call that keeps caches projects the same rows before the loop, one
            # call a part (the loop writes the activated gates over them): same bits
            pipe = not training
            if pipe:
                pstate = <int*> calloc(n_pieces, sizeof(int))
                if pstate == NULL:
                    raise MemoryError()
    n_chunks = min(B, n_parts)
    with nogil:
        if w_pk != NULL:               # [W_ih^T; W_hh^T], or W_hh^T alone (Ix = 0)
            if Ix > 0:
                _pack_rows(w_pk, &w_ih[0, 0], I, G, I, 0, I + Hp)
            _pack_rows(w_pk, &w_hh[0, 0], Hp, G, Hp, Ix, Ix + Hp)
            if P > 0:
                whr_pk = _pack(whr_pk, w_hr_p, H, P, H, True)
        elif w_cat != NULL:
            for g in range(G):
                memcpy(w_cat + <Py_ssize_t> g * (I + Hp), &w_ih[g, 0], I * sizeof(floating))
                memcpy(w_cat + <Py_ssize_t> g * (I + Hp) + I, &w_hh[g, 0], Hp * sizeof(floating))
        if ipk != NULL:
            _pack(ipk, &w_ih[0, 0], I, G, I, True)
        if pipe:
            # B = 1: one chunk, so one thread runs the loop while a second projects the
            # input ahead of it, piece by piece (_pipelined_part)
            for p in prange(2, schedule="static",
                            num_threads=team(n_threads, 2, <double> n * G * (I + Hp + P),
                                             MIN_PARALLEL_MACS)):
                note_team()
                blas_single_enter()
                _pipelined_part(p, pstate, n_pieces, y_p, &h[0, 0], &c[0, 0], g_p, xg_p,
                                &xh[0, 0], &hz[0, 0], mbuf_p, hp_p, x_p, &w_ih[0, 0],
                                &w_hh[0, 0], w_hr_p, bias_p, w_pk, ipk,
                                whr_pk if P > 0 else NULL, &lengths[0], s0, s1, I, H, P,
                                reverse, gather, xst, xsb, yst, ysb, rows_p)
                blas_single_exit()
            free(pstate)
        elif not fused and not tokens:
            # x_t W_ih^T + b for every step before the loop, block by block         (1)
            for p in prange(n_parts, schedule="static",
                            num_threads=team(n_threads, n_parts, <double> n * B * G * I,
                                             MIN_PARALLEL_MACS)):
                note_team()
                blas_single_enter()
                if ipk != NULL:
                    # B = 1: the rows inference projects in pieces, in one call a part
                    # (each element is the same FMA chain however the rows are grouped,
                    # and one call streams W_ih^T once instead of once a piece)
                    bs = s0 + split(n, n_parts, p)
                    be = s0 + split(n, n_parts, p + 1)
                    if be > bs:
                        _project_piece(g_p, xg_p, x_p, ipk, bias_p, &lengths[0], s0, bs, be,
                                       I, G, reverse, gather, xst, xsb, rows_p)
                        cy_piece_counted(0, be - bs)
                    nb_p = 0
                else:
                    nb_p = nb
                for kb in range(nb_p):
                    bs = s0 + kb * S
                    be = min(bs + S, s1)
                    if cpos_p != NULL:     # the block's active rows, at their places
                        c0 = coff_p[bs - s0]
                        nrows = coff_p[be - s0] - c0
                        q0 = c0 + split(nrows, n_parts, p)
                        q1 = c0 + split(nrows, n_parts, p + 1)
                        _gather_rows(xg_p, x_p, &lengths[0], s0, q0, q1, B, I,
                                     reverse, xst, xsb, rows_p, crow_p)
                        affine_rows(g_p, xg_p, &w_ih[0, 0], bias_p, q0, q1, I, G)
                        continue
                    q0 = split((be - bs) * B, n_parts, p)
                    q1 = split((be - bs) * B, n_parts, p + 1)
                    if gather:
                        _gather_rows(xg_p + <Py_ssize_t> (bs - s0) * B * I, x_p,
                                     &lengths[0], bs, q0, q1, B, I, reverse, xst, xsb,
                                     rows_p)
                    affine_rows(g_p + <Py_ssize_t> (bs - s0) * B * G,
                                (xg_p + <Py_ssize_t> (bs - s0) * B * I) if gather
                                else x_p + <Py_ssize_t> bs * B * I,
                                &w_ih[0, 0], bias_p, q0, q1, I, G)
                blas_single_exit()
        if not pipe:
            for p in prange(n_chunks, schedule="static",
                            num_threads=team(n_threads, n_chunks, <double> n * B * G * (Ix + Hp + P),
                                             MIN_PARALLEL_MACS)):
                note_team()
                blas_single_enter()
                _forward_chunk(y_p, &h[0, 0], &c[0, 0], g_p if training else NULL,
                               NULL if fused or tokens else g_p, cpos_p, ttab_p, tids_p,
                               cc_p, tc_p, m_p, hpv_p,
                               xg_p if fused else NULL, &xh[0, 0], &hz[0, 0], mbuf_p, hp_p, rm_p,
                               x_p, &w_ih[0, 0], &w_hh[0, 0], w_hr_p, bias_p,
                               w_pk, w_cat, whr_pk if (P > 0 and w_pk != NULL) else NULL,
                               &lengths[0], s0, s1, B, I, Ix, H, P, split(B, n_chunks, p),
                               split(B, n_chunks, p + 1), reverse, xst, xsb, yst, ysb, rows_p)
                blas_single_exit()


# ----------------------------------------------------------------------------------------
# B = 1 inference: the input projection pipelined beside the time loop
# ----------------------------------------------------------------------------------------

# One sequence is one chunk: its time loop runs on one thread and would leave the other
# cores idle. Where the input is projected before the loop (input_in_step), a second
# thread projects it in pieces of _PIECE_STEPS steps while the first runs the steps, so
# the projection leaves the loop's path instead of running, on every thread, before it.
# T = 100, I = H = 256, 2 threads, 2-core AMD EPYC Zen 4 (bench/ab.py's "single", runs
# of 15-25 rounds): 1.11-1.20x (2.02 -> 1.80 ms in one); with OpenBLAS on its Haswell
# kernels 1.12-1.37x, as the pieces run on cylstm's AVX-512 kernel there too.
# Where the input's product is in the step (small weights, the tiny config) this was
# tried with the projection pipelined instead: each step then reads W_hh alone (0.58
# instead of 0.87 us at I = 32, H = 64), but handing each step's projected row from the
# other core's cache took back most of it (tiny 1.00x in bench/ab.py), so the rule
# stays as it is.
#
# A piece is claimed by whoever comes first (a compare-exchange on its state: FREE ->
# CLAIMED -> DONE): the loop's thread, when it reaches a piece still FREE, projects it
# itself, so it never waits for a thread that has not started; it waits only for a
# piece the other thread is projecting, which that thread is running now. With a team
# of one, prange runs part 0 (the loop, projecting every piece itself) and then part 1
# (nothing left). Every piece is the packed kernel over its rows, one FMA chain per
# element (_rgemm.h), then + bias: the same bits whoever projects it and however many
# threads run, and the piece size is a constant. A full-cache training forward and a
# checkpointed segment's recomputation project the same rows on the same kernel before
# their loops, one call a part (the checkpointed training forward, which keeps no
# caches, runs the pieces beside its loop like inference), so inference still gives
# the training forward's bits (docs/math.md). Taken when the weights are packed (an
# ISA level with the kernels, T >= PACK_MIN_STEPS) and there is no recurrent dropout;
# a ragged inference (lengths < T) projects its active rows instead, while training
# keeps every row in place and takes it with any lengths.
cdef enum:
    # rows of one piece: the AVX-512 kernel's 8-row block (AVX2's blocks are 6 rows at
    # most); the loop's thread projects the first piece itself, so this is also what the
    # first step waits for
    _PIECE_STEPS = 8

cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #if defined(__x86_64__) || defined(__i386__)
    #include <immintrin.h>
    #define CY_PIECE_PAUSE() _mm_pause()
    #else
    #define CY_PIECE_PAUSE() ((void) 0)
    #endif
    enum { CY_PIECE_FREE = 0, CY_PIECE_CLAIMED = 1, CY_PIECE_DONE = 2 };
    static inline int cy_piece_claim(int *s)
    {
        int want = CY_PIECE_FREE;
        return __atomic_compare_exchange_n(s, &want, CY_PIECE_CLAIMED, 0, __ATOMIC_ACQ_REL,
                                           __ATOMIC_ACQUIRE);
    }
    static inline void cy_piece_done(int *s) { __atomic_store_n(s, CY_PIECE_DONE, __ATOMIC_RELEASE); }
    #if defined(__unix__) || defined(__APPLE__)
    #include <sched.h>
    #define CY_PIECE_YIELD() sched_yield()
    #else
    #define CY_PIECE_YIELD() ((void) 0)
    #endif
    /* A piece takes microseconds; past ~16k polls the other thread has lost its core,
     * and this one gives way rather than burn its time slice. */
    static inline void cy_piece_wait(int *s)
    {
        unsigned k = 0;
        while (__atomic_load_n(s, __ATOMIC_ACQUIRE) != CY_PIECE_DONE)
            if (++k < 16384)
                CY_PIECE_PAUSE();
            else
                CY_PIECE_YIELD();
    }
    #define CY_PIECE_SHARED 1
    static long long cy_piece_count[2];     /* steps projected by part 0 and by part 1 */
    static inline void cy_piece_counted(int part, int steps) { __atomic_fetch_add(&cy_piece_count[part], steps, __ATOMIC_RELAXED); }
    #else   /* no atomics known here: the loop's thread projects every piece */
    static inline int cy_piece_claim(int *s) { if (*s) return 0; *s = 1; return 1; }
    static inline void cy_piece_done(int *s) { *s = 2; }
    static inline void cy_piece_wait(int *s) { (void) s; }
    #define CY_PIECE_SHARED 0
    static long long cy_piece_count[2];
    static inline void cy_piece_counted(int part, int steps) { cy_piece_count[part] += steps; }
    #endif
    """
    bint CY_PIECE_SHARED
    long long cy_piece_count[2]
    void cy_piece_counted(int part, int steps) noexcept nogil
    bint cy_piece_claim(int* s) noexcept nogil
    void cy_piece_done(int* s) noexcept nogil
    void cy_piece_wait(int* s) noexcept nogil


cdef void _project_piece(
    floating* xproj,            # (n, G) OUT rows [ps - s0, pe - s0): x_t W_ih^T + b
    floating* xg,               # (n, I) scratch when gather, else NULL
    const floating* x,          # (T, 1, I) time order, row t at t * xst (+ b * xsb)
    const floating* w_ih_pk,    # W_ih^T packed (I, G)
    const floating* bias,       # (G,)
    const int* lengths,         # (1,)
    int s0, int ps, int pe, int I, int G, bint reverse, bint gather,
    Py_ssize_t xst, Py_ssize_t xsb, const int* rowmap,
) noexcept nogil:
    """Loop steps [ps, pe) of the input projection of one sequence (B = 1)."""
    cdef int m = pe - ps, r, j
    cdef const floating* a
    cdef floating* out = xproj + <Py_ssize_t> (ps - s0) * G
    if gather:         # x in loop-step order (reverse, strided, or padding zeroed)
        _gather_rows(xg + <Py_ssize_t> (ps - s0) * I, x, lengths, ps, 0, m, 1, I, reverse,
                     xst, xsb, rowmap)
        a = xg + <Py_ssize_t> (ps - s0) * I
    else:
        a = x + <Py_ssize_t> ps * I
    _rec_mm(m, G, I, a, I, NULL, 0, False, w_ih_pk, out, G)
    for r in range(m):
        for j in range(G):
            out[<Py_ssize_t> r * G + j] += bias[j]


cdef void _pipelined_part(
    int part,                   # 0: the time loop (projecting the pieces it reaches
                                #   unclaimed); 1: the projection of pieces 1, 2, ...
    int* state,                 # (n_pieces,) each piece's CY_PIECE_* state, all FREE
    int n_pieces,
    floating* y, floating* h, floating* c,
    floating* xproj,            # (n, 1, G) scratch: the projected input
    floating* xg,               # (n, 1, I) scratch when gather, else NULL
    floating* xh, floating* z, floating* mbuf, floating* hp,
    const floating* x, const floating* w_ih, const floating* w_hh, const floating* w_hr,
    const floating* bias,
    const floating* w_packed,   # W_hh^T packed
    const floating* w_ih_pk,    # W_ih^T packed
    const floating* whr_packed,
    const int* lengths,
    int s0, int s1, int I, int H, int P, bint reverse, bint gather,
    Py_ssize_t xst, Py_ssize_t xsb, Py_ssize_t yst, Py_ssize_t ysb, const int* rowmap,
) noexcept nogil:
    """One of the two parts of a B = 1 inference call, loop steps [s0, s1) (see above)."""
    cdef int G = 4 * H, q, ps, pe
    if part == 1:
        if CY_PIECE_SHARED:
            for q in range(1, n_pieces):
                ps = s0 + q * _PIECE_STEPS
                if cy_piece_claim(&state[q]):
                    _project_piece(xproj, xg, x, w_ih_pk, bias, lengths, s0, ps,
                                   min(ps + _PIECE_STEPS, s1), I, G, reverse, gather, xst,
                                   xsb, rowmap)
                    cy_piece_done(&state[q])
                    cy_piece_counted(1, min(ps + _PIECE_STEPS, s1) - ps)
        return
    for q in range(n_pieces):
        ps = s0 + q * _PIECE_STEPS
        pe = min(ps + _PIECE_STEPS, s1)
        if cy_piece_claim(&state[q]):
            _project_piece(xproj, xg, x, w_ih_pk, bias, lengths, s0, ps, pe, I, G, reverse,
                           gather, xst, xsb, rowmap)
            cy_piece_done(&state[q])
            cy_piece_counted(0, pe - ps)
        else:
            cy_piece_wait(&state[q])
        _forward_chunk(y, h, c, NULL, xproj + <Py_ssize_t> (ps - s0) * G, NULL, NULL, NULL,
                       NULL, NULL, NULL, NULL, NULL, xh, z, mbuf, hp, NULL, x, w_ih, w_hh,
                       w_hr, bias, w_packed, NULL, whr_packed, lengths, ps, pe, 1, I, 0, H,
                       P, 0, 1, reverse, xst, xsb, yst, ysb, rowmap)


def _piece_counts():
    """Test and benchmark hook: (steps of B = 1 projections that the loop's thread
    projected, or a training forward before its loop; steps the other part of an
    inference projected) since the process started."""
    return int(cy_piece_count[0]), int(cy_piece_count[1])


# ----------------------------------------------------------------------------------------
# Backward (BPTT)
# ----------------------------------------------------------------------------------------

cdef void _backward_chunk(
    floating* dz,               # (n, B, G) OUT dL/dz: every row in place, zero where a row
                                #   has ended; with cpos, at the active rows' places only
    floating* dhp,              # (n, B, P) OUT dL/dh_t with a projection (0 where ended), or NULL
    floating* dzs,              # (B, G) scratch: dz of the current step
    floating* dhs,              # (B, Hp) INOUT: dz_{s+1} W_hh of the later step (from the
                                #   previous segment's call at s = s1 - 1); out: at s0
    floating* dc,               # (B, H) INOUT: dL/dc at step s1 in, at s0 out
    floating* dhbuf,            # (B, Hp) scratch: dL/dh_t of this step
    floating* dm,               # (B, H) scratch: dL/dm_t = dh W_hr (P > 0 only)
    const floating* dy,         # (T, B, Hp) time order: row (t, b) at t * dyt + b * dyb
    const floating* dh_n,       # (B, Hp)
    const floating* gates,      # (n, B, G) activated
    const floating* c_cache,    # (n, B, H)
    const floating* tc_cache,   # (n, B, H)
    const floating* c_start,    # (B, H) the state c entering step s0 (c0 when s0 = 0)
    const floating* w_hh,       # (G, Hp)
    const floating* w_hr,       # (P, H) or NULL
    const floating* whh_packed, # W_hh packed for _rec_mm, or NULL (BLAS)
    const floating* whr_packed, # W_hr packed, or NULL
    const floating* rmask,      # (B, Hp) recurrent dropout mask, or NULL
    const int* lengths,         # (B,)
    const int* cpos,            # (n, B) a row's place among the active rows, or NULL
                                #   (every row of dz in place); see "Active rows"
    const int* coff,            # (n + 1,) active rows before each step, or NULL
    const floating* xs,         # (n, B, I) the segment's x in loop-step order
    const floating* hprev,      # (n, B, Hp) the forward's h_{t-1} cache
    floating* xc,               # (rows, I) OUT x of the active rows of ragged blocks
    floating* hc,               # (rows, Hp) OUT h_{t-1} of the same rows
    floating* ssum,             # (V, G) INOUT token input: this chunk's S, dz summed by id
                                #   (steps from the last, rows in order); or NULL
    const int* tids,            # (T, B) the ids, time order, with ssum
    int s0, int s1, int B, int I, int H, int P, int r0, int r1, int S, bint reverse,
    Py_ssize_t dyt, Py_ssize_t dyb,
) noexcept nogil:
    """BPTT over loop steps [s1 - 1 .. s0] for batch rows [r0, r1), run by one thread."""
    cdef int G = 4 * H, Hp = P if P > 0 else H
    cdef int s, sl, b, t, j, L, hi, q
    cdef bint gather = False
    cdef Py_ssize_t zo, ho, hpo, ro
    cdef const floating* z
    cdef const floating* cprev
    cdef const floating* dhin
    cdef const floating* dmb
    cdef floating* dcb
    cdef floating* dzb
    cdef floating* srow
    memset(dzs + <Py_ssize_t> r0 * G, 0, (r1 - r0) * G * sizeof(floating))
    for s in range(s1 - 1, s0 - 1, -1):
        sl = s - s0
        if cpos != NULL:               # this step's block is ragged: dz compact, x and h gathered
            gather = _block_ragged(coff, sl, s1 - s0, S, B)
        # dL/dh_t = dy_t + (this row's dz W_hh of the later step, or dh_n at its last step)
        for b in range(r0, r1):
            L = lengths[b]
            if s >= L:                 # ended: no gradient, the state passes through
                if cpos == NULL:       # (compact: the row has no place in dz)
                    memset(dz + (<Py_ssize_t> sl * B + b) * G, 0, G * sizeof(floating))
                if P > 0:
                    memset(dhp + (<Py_ssize_t> sl * B + b) * P, 0, P * sizeof(floating))
                continue
            t = L - 1 - s if reverse else s
            hpo = <Py_ssize_t> t * dyt + <Py_ssize_t> b * dyb
            dhin = <const floating*> dhs + <Py_ssize_t> b * Hp if s + 1 < L \
                else dh_n + <Py_ssize_t> b * Hp
            for j in range(Hp):
                dhbuf[<Py_ssize_t> b * Hp + j] = dy[hpo + j] + dhin[j]
            if P > 0:
                memcpy(dhp + (<Py_ssize_t> sl * B + b) * P, dhbuf + <Py_ssize_t> b * P,
                       P * sizeof(floating))
        hi = _active_end(lengths, r0, r1, s)
        if hi == r0:
            continue
        if P > 0:                                                            # (5')
            _rec_mm(hi - r0, H, P, dhbuf + <Py_ssize_t> r0 * P, P, w_hr, H, False,
                    whr_packed, dm + <Py_ssize_t> r0 * H, H)
        for b in range(r0, r1):
            if s >= lengths[b]:
                continue
            ro = <Py_ssize_t> sl * B + b
            zo = ro * G
            ho = ro * H
            z = gates + zo
            cprev = c_cache + ho - <Py_ssize_t> B * H if s > s0 else c_start + <Py_ssize_t> b * H
            dmb = (<const floating*> dm if P > 0 else dhbuf) + <Py_ssize_t> b * H
            dcb = dc + <Py_ssize_t> b * H
            dzb = dzs + <Py_ssize_t> b * G
            if floating is float:                                            # (4') (3') (2')
                _cell.gate_grads_f32(dzb, dcb, z, tc_cache + ho, cprev, dmb, H)
            else:
                _cell.gate_grads_f64(dzb, dcb, z, tc_cache + ho, cprev, dmb, H)
            if ssum != NULL:           # token input: S[id] += dz while the row is in cache
                t = lengths[b] - 1 - s if reverse else s
                srow = ssum + <Py_ssize_t> G * tids[<Py_ssize_t> t * B + b]
                for j in range(G):
                    srow[j] += dzb[j]
            if cpos == NULL:
                memcpy(dz + zo, dzb, G * sizeof(floating))
            else:
                q = cpos[ro]           # == ro in a block where every row is active
                memcpy(dz + <Py_ssize_t> q * G, dzb, G * sizeof(floating))
                if gather:
                    memcpy(xc + <Py_ssize_t> q * I, xs + ro * I, I * sizeof(floating))
                    memcpy(hc + <Py_ssize_t> q * Hp, hprev + ro * Hp, Hp * sizeof(floating))
        _rec_mm(hi - r0, Hp, G, dzs + <Py_ssize_t> r0 * G, G, w_hh, Hp, False,    # (1')
                whh_packed, dhs + <Py_ssize_t> r0 * Hp, Hp)
        if rmask != NULL:              # h_{t-1} entered (1) masked                 (1r')
            for b in range(r0, hi):
                ro = <Py_ssize_t> b * Hp
                for j in range(Hp):
                    dhs[ro + j] *= rmask[ro + j]


# Active rows. With ragged lengths a block's dW_ih, dW_hh, db and dx products run over
# its active rows only (rows with s < L; ended rows have dz = 0 and add nothing), so the
# padding costs nothing there: with lengths uniform in 1..T half of each product's rows
# would be zeros. Backward's time loop writes each active row's dz at its place among
# the segment's active rows, in loop-step then row order (a block's rows start at
# coff[its first step]), and (in a block with ended rows) copies that row's x and
# h_{t-1} to the same place of xc and hc; the products read those, and dx goes back to
# each row's time. A block whose rows are all active keeps every row in place (its
# place is its own index) and reads x and h_{t-1} where they are. dW_hr keeps the
# block's full rows: dL/dh_t and m_t are zero at ended rows (both loops write the
# zeros), so those rows add nothing there either. The places depend only on the
# lengths, so the products and their results are the same for any thread count and
# under checkpointing (a segment is whole blocks).
# An inference that projects the input before the loop uses the same places
# (lstm_forward's cpos): x of the active rows gathered to their places in xg, their
# projections at the same places of the gates scratch, which the time loop reads
# through cpos. The training forward keeps every row in place, since its gates scratch
# is the activated-gates cache that the loop writes in place as it goes (a compact row
# of a later step would be overwritten before it is read).

cdef int _active_rows(int* cpos, int* crow, int* coff, const int* lengths,
                      int s0, int n, int B) noexcept nogil:
    """Places of the active rows of loop steps [s0, s0 + n): cpos[sl * B + b] for row b
    at segment step sl (-1 when ended), crow the inverse (place -> sl * B + b), coff[sl]
    the places before step sl (coff[n] = all). Returns coff[n]."""
    cdef int sl, b, q = 0
    for sl in range(n):
        coff[sl] = q
        for b in range(B):
            if s0 + sl < lengths[b]:
                cpos[<Py_ssize_t> sl * B + b] = q
                crow[q] = sl * B + b
                q += 1
            else:
                cpos[<Py_ssize_t> sl * B + b] = -1
    coff[n] = q
    return q


cdef inline bint _block_ragged(const int* coff, int sl, int n, int S, int B) noexcept nogil:
    """Whether the block holding segment step sl has an ended row. Rows only end as s
    grows, so that is whether its last step does."""
    cdef int last = min((sl // S + 1) * S, n) - 1
    return coff[last + 1] - coff[last] < B


cdef inline void _add_block(floating* acc, const floating* part, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t k
    for k in range(n):
        acc[k] += part[k]


# The backward's own product kernel (_rgemm.h, cy_bgemm) runs every large product where
# OpenBLAS would not run AVX-512 kernels, and only the thin ones where it would: there,
# with I = 64 (the char model) it was 1.11-1.15x OpenBLAS's SkylakeX kernels alone, while
# on every product the I = H = 512 training step took 244.1 ms against 235.2 (Zen 5,
# 2 threads; medium: the same).
cdef enum:
    _BGEMM_THIN = 64


cdef inline void _dx_product(bint own, int m, int I, int G, const floating* dz,
                             const floating* w_ih, floating* out) noexcept nogil:
    """out (m, I) = dz (m, G) @ W_ih (G, I)                                            (1')
    through the backward's own kernel (own: float32 at level 2) or BLAS."""
    if floating is float:
        if own:
            _bgemm(0, m, I, G, dz, G, w_ih, I, out, I, 0)
            return
    gemm(False, False, m, I, G, 1, dz, G, w_ih, I, 0, out, I)


cdef inline void _w_product(bint own, int n, int K, int rows, int G, const floating* dz,
                            const floating* a, floating* c, bint acc) noexcept nogil:
    """c (n, K) = [c +] dz^T @ a: dz (rows, n) (row stride G) the block's gate-gradient
    columns of one part, a (rows, K) its x or h_{t-1}: those rows of a weight gradient,
    through the backward's own kernel (own) or BLAS                                   (1')"""
    if floating is float:
        if own:
            _bgemm(1, n, K, rows, dz, G, a, K, c, K, acc)
            return
    gemm(True, False, n, K, rows, 1, dz, G, a, K, 1 if acc else 0, c, K)


cdef void _weight_grads_block(
    floating* dw_ih_tmp,        # (G, I) INOUT rows [g0, g1): the running sum of dz^T x
    floating* dw_hh_tmp,        # (G, Hp) INOUT rows [g0, g1): dz^T h_{t-1}
    floating* dw_hr_tmp,        # (P, H) INOUT rows [q0, q1): dh^T m, or NULL
    floating* db_tmp,           # (G,) INOUT [g0, g1): sum of dz, or NULL (no bias)
    const floating* dz,         # (rows, G) the block's dz (its active rows, or all)
    const floating* x,          # (rows, I) the same rows' x, or NULL (no dW_ih)
    const floating* hprev,      # (rows, Hp) the same rows' h_{t-1} as the product read it
    const floating* dhp,        # (prows, P) dL/dh_t at every row of the block, or NULL
    const floating* m_cache,    # (prows, H) m_t, or NULL
    int rows, int prows, int I, int H, int P, int g0, int g1, int q0, int q1, bint first,
    bint own_i,                 # the own kernel for dW_ih (float32, level 2), else BLAS
    bint own_h,                 # and for dW_hh
) noexcept nogil:
    """Adds one time block to the running weight-gradient sums              (1') (5').

    The first block of a backward (its last in time) overwrites (beta = 0), so the sums
    need no zeroing; lstm_backward adds them to the gradients once, at the end: BLAS with
    beta = 1 adds its K-blocks to C one at a time, so accumulating into the gradient
    itself would make two backward calls differ from 2x one call.
    """
    cdef int G = 4 * H, Hp = P if P > 0 else H
    cdef int j
    cdef Py_ssize_t k
    cdef floating beta = 0 if first else 1
    if P > 0 and q1 > q0:              # dW_hr += dh^T m
        gemm(True, False, q1 - q0, H, prows, 1, dhp + q0, P, m_cache, H, beta,
             dw_hr_tmp + <Py_ssize_t> q0 * H, H)
    if g1 <= g0:
        return
    if x != NULL:              # NULL: the input's gradients are not wanted (tokens)
        _w_product(own_i, g1 - g0, I, rows, G, dz + g0, x, dw_ih_tmp + <Py_ssize_t> g0 * I,
                   not first)                                                   # dz^T x
    _w_product(own_h, g1 - g0, Hp, rows, G, dz + g0, hprev, dw_hh_tmp + <Py_ssize_t> g0 * Hp,
               not first)                                                       # dz^T h_{t-1}
    # db += sum dz (b_ih and b_hh have the same gradient). Rows in order, each summed into
    # the part's columns: reading dz column by column instead (stride G) took 15% of a
    # medium training step.
    if db_tmp != NULL:
        if first:
            memset(db_tmp + g0, 0, (g1 - g0) * sizeof(floating))
        for k in range(rows):
            for j in range(g0, g1):
                db_tmp[j] += dz[k * G + j]


def lstm_backward(
    *,
    # (the first argument is never None: Cython picks the dtype from it)
    floating[:, ::1] dh,                # (B, Hp) INOUT: carried between segments; dh0 at the end
    floating[:, :, ::1] dx,             # (T, B, I) OUT at the active rows' times in [s0, s1);
                                        #   zeros elsewhere are the caller's (reverse, ragged);
                                        #   None without input_grads
    floating[:, ::1] dc,                # (B, H) INOUT: dL/dc_n in, dc0 at the end
    floating[:, ::1] dw_ih,             # (G, I) INOUT, accumulated (+=) by the last call
    floating[:, ::1] dw_hh,             # (G, Hp) INOUT, accumulated (+=)
    floating[:, ::1] dw_hr,             # (P, H) INOUT += with a projection, else None
    floating[::1] db_ih,                # (G,) INOUT += or None (no bias)
    floating[::1] db_hh,                # (G,) INOUT += or None (no bias)
    floating[:, ::1] dw_ih_tmp,         # (G, I) running sums, carried between segments
    floating[:, ::1] dw_hh_tmp,         # (G, Hp)
    floating[:, ::1] dw_hr_tmp,         # (P, H) with a projection, else None
    floating[::1] db_tmp,               # (G,)
    floating[:, :, ::1] dz,             # (n, B, G) scratch
    floating[:, :, ::1] dhp,            # (n, B, P) scratch with a projection, else None
    floating[:, ::1] dxg,               # (n_parts * ceil(S*B / n_parts), I) scratch: reverse, or
                                        #   with cpos (ragged); else None
    floating[:, ::1] dzs,               # (B, G) scratch
    floating[:, ::1] dhbuf,             # (B, Hp) scratch
    floating[:, ::1] dm,                # (B, H) scratch with a projection, else None
    const floating[:, :, :] dy,         # (T, B, Hp) its last axis contiguous, any row
                                        #   strides (read only: a batch-first array
                                        #   transposed, one direction's half, a broadcast)
    const floating[:, ::1] dh_n,        # (B, Hp)
    const floating[:, :, ::1] gates,    # (n, B, G) from lstm_forward over [s0, s1)
    const floating[:, :, ::1] c_cache,  # (n, B, H)
    const floating[:, :, ::1] tc_cache, # (n, B, H)
    const floating[:, :, ::1] m_cache,  # (n, B, H) with a projection, else None
    const floating[:, :, ::1] hprev,    # (n, B, Hp)
    const floating[:, :, ::1] x,        # (T, B, I) the forward's input (forward direction),
                                        #   or None without input_grads
    const floating[:, :, ::1] xg,       # (n, B, I) from lstm_forward (reverse), else None
    const floating[:, ::1] c_start,     # (B, H) the state c entering step s0 (c0 when s0 = 0)
    const floating[:, ::1] w_ih,        # (G, I)
    const floating[:, ::1] w_hh,        # (G, Hp)
    const floating[:, ::1] w_hr,        # (P, H) or None
    const int[::1] lengths,             # (B,)
    bint reverse,
    int n_parts,
    int n_threads,
    floating[::1] wpack=None,           # scratch: pack_size(G, Hp) + pack_size(P, H) elements
    const floating[:, ::1] rmask,       # (B, Hp) the forward's recurrent dropout mask, or None
    int[::1] cpos=None,                 # (n * B,) scratch for ragged lengths, or None: the
                                        #   products then run over every row ("Active rows")
    int[::1] crow=None,                 # (n * B,) scratch, with cpos
    int[::1] coff=None,                 # (n + 1,) scratch, with cpos
    floating[:, ::1] xc=None,           # (n * B, I) scratch, with cpos
    floating[:, ::1] hc=None,           # (n * B, Hp) scratch, with cpos
    int s0,                             # as the forward's; segments go last to first
    int s1,
    bint first,                         # the first call of this backward (s1 = T)
    bint last,                          # the last call (s0 = 0): add the sums to the gradients
    bint own_wide=True,                 # float32 at level 2: the own kernel for every large
                                        #   product, else only for the thin ones (I or
                                        #   Hp <= 64): _threads.BACKWARD_OWN_WIDE
    bint input_grads=True,              # False: neither dx nor dW_ih (token input: the loop
                                        #   sums dz by id into token_ssum, and token_grads
                                        #   makes them from that); then no ragged compaction
    floating[:, :, ::1] token_ssum=None,  # (min(B, n_parts), V, G) INOUT token input: S of
                                        #   each batch chunk (zeroed by the first call)
    const int[:, ::1] token_ids=None,   # (T, B) with token_ssum: the ids, time order
):
    """BPTT through one layer and direction over loop steps [s0, s1). A whole backward is
    one call (s0 = 0, s1 = T, first and last), or one call per segment from the last
    (checkpointed BPTT, cylstm.functional), which gives bitwise the same gradients."""
    cdef int T = dy.shape[0], B = dy.shape[1], I = w_ih.shape[1]
    cdef int G = w_hh.shape[0], H = w_hh.shape[0] // 4, Hp = w_hh.shape[1]
    cdef int P = 0 if w_hr is None else w_hr.shape[0]
    cdef int S = block_steps(B), n = s1 - s0
    cdef int p, n_chunks, bs, be, nb, k, q0, q1, g0, g1, r0, r1, part_rows, rows, c0, q, ro
    cdef bint blk_first, ragged, own_i = False, own_h = False
    cdef Py_ssize_t dyt = 0, dyb = 0      # dy's row strides (elements)
    cdef int* cpos_p = NULL
    cdef int* crow_p = NULL
    cdef int* coff_p = NULL
    cdef floating* xc_p = NULL
    cdef floating* hc_p = NULL
    cdef const floating* bx_p
    cdef const floating* bh_p
    cdef floating* dxs_p
    cdef const floating* w_hr_p = NULL
    cdef const floating* m_p = NULL
    cdef const floating* x_p = NULL
    cdef floating* dbt_p = NULL
    cdef floating* dw_hr_tmp_p = NULL
    cdef floating* dhp_p = NULL
    cdef floating* dm_p = NULL
    cdef floating* dxg_p = NULL
    cdef floating* whh_pk = NULL
    cdef floating* whr_pk = NULL
    cdef const floating* rm_p = NULL
    cdef floating* ssum_p = NULL        # token input: the chunks' S
    cdef const int* tids_p = NULL
    cdef Py_ssize_t tvg = 0

    _check(0 <= s0 < s1 <= T and s0 % S == 0 and (s1 % S == 0 or s1 == T)
           and (not first or s1 == T) and (not last or s0 == 0), "s0/s1/first/last")
    _check(G == 4 * H and Hp == (P if P > 0 else H), "weights")
    if rmask is not None:
        _check(_is(rmask.shape, B, Hp), "rmask")
        rm_p = &rmask[0, 0]
    whh_pk = _wpack_slot(wpack, G, Hp, P, H)
    if whh_pk != NULL:
        whr_pk = whh_pk + _packed_elems(G, Hp, sizeof(floating))
    _check(_is(dw_ih.shape, G, I) and _is(dw_hh.shape, G, Hp), "weight grads")
    _check(_is(dw_ih_tmp.shape, G, I) and _is(dw_hh_tmp.shape, G, Hp), "weight grad sums")
    _check((not input_grads or _is(dx.shape, T, B, I)) and _is(dy.shape, T, B, Hp)
           and _row_strides(dy.shape, dy.strides, sizeof(floating), &dyt, &dyb), "dx/dy")
    _check(input_grads or (cpos is None and dx is None), "input_grads")
    if token_ssum is not None:
        _check(not input_grads and token_ids is not None and _is(token_ids.shape, T, B)
               and token_ssum.shape[0] == min(B, n_parts) and token_ssum.shape[2] == G,
               "token input")
        if not _ids_in_range(&token_ids[0, 0], <Py_ssize_t> T * B, token_ssum.shape[1]):
            raise ValueError(f"token ids must be in 0..{token_ssum.shape[1] - 1}")
        ssum_p = &token_ssum[0, 0, 0]
        tids_p = &token_ids[0, 0]
        tvg = <Py_ssize_t> token_ssum.shape[1] * G
    _check(_is(c_cache.shape, n, B, H) and _is(tc_cache.shape, n, B, H)
           and _is(hprev.shape, n, B, Hp), "cache")
    _check(_is(dz.shape, n, B, G) and _is(gates.shape, n, B, G), "dz/gates")
    _check(_is(dh.shape, B, Hp) and _is(dh_n.shape, B, Hp) and _is(dhbuf.shape, B, Hp)
           and _is(dc.shape, B, H) and _is(c_start.shape, B, H), "states")
    _check(_is(dzs.shape, B, G) and db_tmp.shape[0] == G, "dzs/db_tmp")
    _check(lengths.shape[0] == B and n_parts >= 1 and n_threads >= 1
           and _lengths_ok(&lengths[0], B, T), "lengths/n_parts")
    part_rows = (S * B + n_parts - 1) // n_parts
    if cpos is not None:
        _check(crow is not None and coff is not None and xc is not None and hc is not None
               and cpos.shape[0] >= n * B and crow.shape[0] >= n * B and coff.shape[0] >= n + 1
               and xc.shape[0] >= n * B and xc.shape[1] == I and hc.shape[0] >= n * B
               and hc.shape[1] == Hp and dxg is not None
               and _is(dxg.shape, n_parts * part_rows, I), "active rows scratch")
        cpos_p, crow_p, coff_p = &cpos[0], &crow[0], &coff[0]
        xc_p, hc_p = &xc[0, 0], &hc[0, 0]
        dxg_p = &dxg[0, 0]
        _active_rows(cpos_p, crow_p, coff_p, &lengths[0], s0, n, B)
    if not input_grads:
        pass                    # x_p stays NULL: no dz^T x, no dx
    elif reverse:
        _check(xg is not None and _is(xg.shape, n, B, I) and dxg is not None
               and _is(dxg.shape, n_parts * part_rows, I), "xg/dxg")
        x_p = &xg[0, 0, 0]
        dxg_p = &dxg[0, 0]
    else:
        _check(x is not None and _is(x.shape, T, B, I), "x")
        x_p = &x[0, 0, 0] + <Py_ssize_t> s0 * B * I
    if db_ih is not None:
        _check(db_hh is not None and db_ih.shape[0] == G and db_hh.shape[0] == G, "bias grads")
        dbt_p = &db_tmp[0]
    if P > 0:
        _check(_is(w_hr.shape, P, H) and dw_hr is not None and _is(dw_hr.shape, P, H)
               and dw_hr_tmp is not None and _is(dw_hr_tmp.shape, P, H)
               and dhp is not None and _is(dhp.shape, n, B, P) and dm is not None
               and _is(dm.shape, B, H) and m_cache is not None
               and _is(m_cache.shape, n, B, H), "projection")
        w_hr_p = &w_hr[0, 0]
        m_p = &m_cache[0, 0, 0]
        dw_hr_tmp_p = &dw_hr_tmp[0, 0]
        dhp_p = &dhp[0, 0, 0]
        dm_p = &dm[0, 0]
    n_chunks = min(B, n_parts)
    nb = (n + S - 1) // S
    if floating is float:         # which products run on the own kernel, the rest on BLAS
        if _bgemm != NULL:
            own_i = own_wide or I <= _BGEMM_THIN          # dW_ih and dx
            own_h = own_wide or Hp <= _BGEMM_THIN         # dW_hh
    with nogil:
        whh_pk = _pack(whh_pk, &w_hh[0, 0], G, Hp, Hp, False)
        if P > 0 and whh_pk != NULL:
            whr_pk = _pack(whr_pk, w_hr_p, P, H, H, False)
        for p in prange(n_chunks, schedule="static",
                        num_threads=team(n_threads, n_chunks, <double> n * B * G * (Hp + P),
                                         MIN_PARALLEL_MACS)):
            note_team()
            blas_single_enter()
            if ssum_p != NULL and first:
                memset(ssum_p + p * tvg, 0, tvg * sizeof(floating))
            _backward_chunk(&dz[0, 0, 0], dhp_p, &dzs[0, 0], &dh[0, 0], &dc[0, 0],
                            &dhbuf[0, 0], dm_p, &dy[0, 0, 0], &dh_n[0, 0], &gates[0, 0, 0],
                            &c_cache[0, 0, 0], &tc_cache[0, 0, 0], &c_start[0, 0], &w_hh[0, 0],
                            w_hr_p, whh_pk, whr_pk if P > 0 else NULL, rm_p, &lengths[0],
                            cpos_p, coff_p, x_p, &hprev[0, 0, 0], xc_p, hc_p,
                            (ssum_p + p * tvg) if ssum_p != NULL else NULL, tids_p,
                            s0, s1, B, I, H, P,
                            split(B, n_chunks, p), split(B, n_chunks, p + 1), S, reverse,
                            dyt, dyb)
            blas_single_exit()
        # Weight gradients and dx, block by block from the last: gradient rows [g0, g1)
        # and [q0, q1) and dx rows [r0, r1) of each block belong to part p alone.
        for p in prange(n_parts, schedule="static",
                        num_threads=team(n_threads, n_parts, <double> n * B * G * (I + Hp) * 3,
                                         MIN_PARALLEL_MACS)):
            note_team()
            blas_single_enter()
            g0 = split(G, n_parts, p)
            g1 = split(G, n_parts, p + 1)
            q0 = split(P, n_parts, p)
            q1 = split(P, n_parts, p + 1)
            for k in range(nb - 1, -1, -1):
                bs = s0 + k * S
                be = min(bs + S, s1)
                blk_first = first and k == nb - 1
                # the block's rows: its active ones gathered, or all of them in place
                ragged = cpos_p != NULL and _block_ragged(coff_p, k * S, n, S, B)
                c0 = k * S * B if cpos_p == NULL else coff_p[k * S]
                rows = (be - bs) * B if cpos_p == NULL else coff_p[be - s0] - c0
                bx_p = (xc_p + <Py_ssize_t> c0 * I) if ragged else \
                    (x_p + <Py_ssize_t> k * S * B * I if x_p != NULL else NULL)
                bh_p = (hc_p + <Py_ssize_t> c0 * Hp) if ragged \
                    else &hprev[0, 0, 0] + <Py_ssize_t> k * S * B * Hp
                _weight_grads_block(&dw_ih_tmp[0, 0], &dw_hh_tmp[0, 0], dw_hr_tmp_p, dbt_p,
                                    &dz[0, 0, 0] + <Py_ssize_t> c0 * G, bx_p, bh_p,
                                    (dhp_p + <Py_ssize_t> k * S * B * P) if P > 0 else NULL,
                                    (m_p + <Py_ssize_t> k * S * B * H) if P > 0 else NULL,
                                    rows, (be - bs) * B, I, H, P, g0, g1, q0, q1, blk_first,
                                    own_i, own_h)
                r0 = split(rows, n_parts, p)                                # dx = dz W_ih (1')
                r1 = split(rows, n_parts, p + 1)
                if not input_grads:
                    pass
                elif r1 > r0 and ragged:  # into this part's rows of the scratch, then to their times
                    dxs_p = dxg_p + <Py_ssize_t> p * part_rows * I
                    _dx_product(own_i, r1 - r0, I, G, &dz[0, 0, 0] + (<Py_ssize_t> c0 + r0) * G,
                                &w_ih[0, 0], dxs_p)
                    for q in range(r0, r1):
                        ro = crow_p[c0 + q]
                        memcpy(&dx[0, 0, 0] + (<Py_ssize_t> _time_of(&lengths[0], s0 + ro // B,
                                                                    ro % B, reverse) * B
                                               + ro % B) * I,
                               dxs_p + <Py_ssize_t> (q - r0) * I, I * sizeof(floating))
                elif r1 > r0:
                    if reverse:        # into this part's own rows of the scratch, then out
                        _dx_product(own_i, r1 - r0, I, G,
                                    &dz[0, 0, 0] + (<Py_ssize_t> k * S * B + r0) * G, &w_ih[0, 0],
                                    dxg_p + <Py_ssize_t> p * part_rows * I)
                        _scatter_rows(&dx[0, 0, 0], dxg_p + <Py_ssize_t> p * part_rows * I,
                                      &lengths[0], bs, r0, r1, B, I, True)
                    else:
                        _dx_product(own_i, r1 - r0, I, G,
                                    &dz[0, 0, 0] + (<Py_ssize_t> k * S * B + r0) * G, &w_ih[0, 0],
                                    &dx[0, 0, 0] + (<Py_ssize_t> bs * B + r0) * I)
            if last and input_grads:
                _add_block(&dw_ih[0, 0] + <Py_ssize_t> g0 * I, &dw_ih_tmp[0, 0] + <Py_ssize_t> g0 * I,
                           (g1 - g0) * <Py_ssize_t> I)
            if last:
                _add_block(&dw_hh[0, 0] + <Py_ssize_t> g0 * Hp, &dw_hh_tmp[0, 0] + <Py_ssize_t> g0 * Hp,
                           (g1 - g0) * <Py_ssize_t> Hp)
                if P > 0:
                    _add_block(&dw_hr[0, 0] + <Py_ssize_t> q0 * H, dw_hr_tmp_p + <Py_ssize_t> q0 * H,
                               (q1 - q0) * <Py_ssize_t> H)
                if dbt_p != NULL:
                    _add_block(&db_ih[0] + g0, dbt_p + g0, g1 - g0)
                    _add_block(&db_hh[0] + g0, dbt_p + g0, g1 - g0)
            blas_single_exit()


# ----------------------------------------------------------------------------------------
# Token input: an Embedding (V, I) feeding layer 0 (cylstm.functional, "Token input")
# ----------------------------------------------------------------------------------------
#
# x_t = E[id_t] makes the input's projection a lookup: x_t W_ih^T + b = (E W_ih^T + b)[id_t].
# With V token values and T*B rows, the table costs V*I*G multiply-adds instead of
# T*B*I*G, and the backward's input products follow the same way: with S (V, G) the sum
# of dz over the rows of each token value, dW_ih += S^T E and dE += S W_ih instead of
# dz^T x and dz W_ih over every row (at V = 81 and T*B = 3200, 40x fewer). The forward
# (cylstm.functional computes A with _ops.linear_forward: it is a Linear layer's forward
# on E) then reads the table by id inside the time loop (lstm_forward's token_table, token_ids;
# no gates scratch in inference), and the backward's time loop adds each row's dz to S
# while the row is in cache (lstm_backward's token_ssum: one S per batch chunk, summed
# in chunk order by token_grads), with no input products (input_grads=False).


cdef bint _lengths_ok(const int* lengths, int B, int T) noexcept nogil:
    """Every length in 1..T (the loops index time by them)."""
    cdef int b
    for b in range(B):
        if lengths[b] < 1 or lengths[b] > T:
            return False
    return True


cdef bint _ids_in_range(const int* ids, Py_ssize_t n, int V) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if ids[i] < 0 or ids[i] >= V:
            return False
    return True


def token_grads(
    *,
    floating[:, ::1] demb,              # (V, I) INOUT += S W_ih, except the padding row
    floating[:, ::1] dw_ih,             # (G, I) INOUT += S^T E
    floating[:, ::1] ssum,              # (V, G) OUT S, the chunks' sums added in order
    const floating[:, :, ::1] chunks,   # (n, V, G) each batch chunk's S (lstm_backward's
                                        #   token_ssum)
    floating[:, ::1] demb_tmp,          # (V, I) scratch
    floating[:, ::1] dw_tmp,            # (G, I) scratch
    const floating[:, ::1] emb,         # (V, I)
    const floating[:, ::1] w_ih,        # (G, I)
    int padding_idx,                    # a row of E that gets no gradient, or -1
    int n_parts,
    int n_threads,
):
    """The input's gradients of a layer fed by token ids: S as the chunks' sums added in
    chunk order (element parts), then S^T E and S W_ih, each product's rows in one fixed
    part; each result is added once (two backward calls add twice one)."""
    cdef int V = emb.shape[0], I = emb.shape[1], G = w_ih.shape[0], p, g0, g1, v, v0, v1
    cdef int nc = chunks.shape[0], k
    cdef Py_ssize_t e, e0, e1, VG = <Py_ssize_t> V * G
    _check(nc >= 1 and _is(chunks.shape, nc, V, G), "token_grads chunks")
    _check(_is(demb.shape, V, I) and _is(dw_ih.shape, G, I) and _is(ssum.shape, V, G)
           and _is(demb_tmp.shape, V, I) and _is(dw_tmp.shape, G, I) and _is(w_ih.shape, G, I)
           and n_parts >= 1 and n_threads >= 1 and -1 <= padding_idx < V,
           "token_grads shapes")
    with nogil:
        for p in prange(n_parts, schedule="static",                  # S = sum of chunks
                        num_threads=team(n_threads, n_parts, <double> nc * VG,
                                         MIN_PARALLEL_MACS)):
            note_team()
            e0 = split(VG, n_parts, p)
            e1 = split(VG, n_parts, p + 1)
            memcpy(&ssum[0, 0] + e0, &chunks[0, 0, 0] + e0, (e1 - e0) * sizeof(floating))
            for k in range(1, nc):
                for e in range(e0, e1):
                    (&ssum[0, 0])[e] += (&chunks[0, 0, 0])[<Py_ssize_t> k * VG + e]
        for p in prange(n_parts, schedule="static",
                        num_threads=team(n_threads, n_parts, <double> 2 * V * G * I,
                                         MIN_PARALLEL_MACS)):
            note_team()
            blas_single_enter()
            g0 = split(G, n_parts, p)
            g1 = split(G, n_parts, p + 1)
            if g1 > g0:                                                      # S^T E
                gemm(True, False, g1 - g0, I, V, 1, &ssum[0, 0] + g0, G, &emb[0, 0], I, 0,
                     &dw_tmp[0, 0] + <Py_ssize_t> g0 * I, I)
                _add_block(&dw_ih[0, 0] + <Py_ssize_t> g0 * I,
                           &dw_tmp[0, 0] + <Py_ssize_t> g0 * I, (g1 - g0) * <Py_ssize_t> I)
            v0 = split(V, n_parts, p)
            v1 = split(V, n_parts, p + 1)
            if v1 > v0:                                                      # S W_ih
                gemm(False, False, v1 - v0, I, G, 1, &ssum[0, 0] + <Py_ssize_t> v0 * G, G,
                     &w_ih[0, 0], I, 0, &demb_tmp[0, 0] + <Py_ssize_t> v0 * I, I)
                for v in range(v0, v1):
                    if v != padding_idx:
                        _add_block(&demb[0, 0] + <Py_ssize_t> v * I,
                                   &demb_tmp[0, 0] + <Py_ssize_t> v * I, I)
            blas_single_exit()


cdef inline Py_ssize_t _row(const int* rowmap, int b) noexcept nogil:
    return b if rowmap == NULL else rowmap[b]


cdef bint _permutation(const int[::1] rows) noexcept:
    """Whether rows holds each of 0 .. len(rows)-1 once."""
    cdef Py_ssize_t n = rows.shape[0], i
    cdef bytearray seen = bytearray(n)
    for i in range(n):
        if rows[i] < 0 or rows[i] >= n or seen[rows[i]]:
            return False
        seen[rows[i]] = 1
    return True


cdef bint _row_strides(Py_ssize_t* shape, Py_ssize_t* strides, Py_ssize_t item,
                       Py_ssize_t* st, Py_ssize_t* sb) noexcept:
    """The strides in elements of the rows (t, b) of a 3-D array into st and sb, True
    when its last axis is contiguous. The stride of a length-1 axis never matters (NumPy
    leaves it arbitrary): it is taken as C-contiguous's."""
    if (shape[2] > 1 and strides[2] != item) or (shape[0] > 1 and strides[0] % item) \
            or (shape[1] > 1 and strides[1] % item):
        return False
    st[0] = strides[0] // item if shape[0] > 1 else shape[1] * shape[2]
    sb[0] = strides[1] // item if shape[1] > 1 else shape[2]
    return True


cdef bint _rows_disjoint(Py_ssize_t T, Py_ssize_t B, Py_ssize_t n, Py_ssize_t st,
                         Py_ssize_t sb) noexcept:
    """Whether the T*B rows of n elements at t * st + b * sb never overlap: the smaller
    stride (in absolute value) spans a row, the larger spans all rows of the smaller."""
    st = -st if st < 0 else st
    sb = -sb if sb < 0 else sb
    if T == 1:
        return B == 1 or sb >= n
    if B == 1:
        return st >= n
    if st <= sb:
        return st >= n and sb >= T * st
    return sb >= n and st >= B * sb


cdef inline bint _is(Py_ssize_t* shape, Py_ssize_t a, Py_ssize_t b, Py_ssize_t c=-1) noexcept:
    """shape[:2] == (a, b), and shape[2] == c when c >= 0."""
    return shape[0] == a and shape[1] == b and (c < 0 or shape[2] == c)


cdef inline void _check(bint ok, str what) except *:
    if not ok:
        raise ValueError(f"cylstm._lstm: inconsistent shapes in kernel arguments ({what})")

