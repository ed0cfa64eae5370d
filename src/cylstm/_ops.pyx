"""Compiled kernels for the losses, the embedding and the linear layer: softmax
cross-entropy (forward and backward in one pass), the embedding gather / scatter-add
pair, and Linear's forward and backward.

Dimension legend (used in every shape comment):
    N  rows (every leading position flattened: T*B for a sequence)
    C  classes (logit columns)        V  vocabulary rows      D  embedding features
    I  Linear input features         O  Linear output features
    P  fixed work parts (n_parts: the machine's cores, never the thread count)
Every array is C-contiguous unless its comment says otherwise (the embedding's dout).
Outputs come first, then inputs, then sizes. The Python layer (cylstm/losses.py,
cylstm/embedding.py) validates and allocates the arrays; the kernels run without the GIL
(the own product kernel, cy_bgemm, allocates its small B buffer itself). Each `def` still checks what would make it
read or write out of bounds (shapes, and target / index values, in one serial O(N)
pass before the parallel one) and raises ValueError naming the argument.

Softmax cross-entropy, per counted row n (w_n != 0 and y_n != ignore_index):
    (1) m_n = max_j z_nj                                          (stable log-sum-exp)
    (2) e_nj = exp(z_nj - m_n),  s_n = sum_j e_nj                 (s_n in [1, C])
    (3) loss_n = m_n + log(s_n) - z_{n,y_n}                       (in float64)
    (4) L = sum_n w_n loss_n * scale;  scale = 1 / sum_n w_n (mean) or 1 (sum)
Backward, same pass:
    (4') dz_nj = w_n * scale * (e_nj / s_n - [j == y_n])
An uncounted row (w_n = 0, or y_n == ignore_index) has loss 0 and dz_n = 0; its logits
are never read, so padding may hold anything.

Embedding:
    (5) forward     out[n] = weight[idx[n]]                         (N, D) <- (V, D)
    (5') backward   dweight[v] += S_v,  S_v = sum_{n : idx[n] = v} dout[n]
                    Each S_v is summed first (over the positions in increasing n: a walk
                    of the rows in order into per-index scratch sums, or for a large
                    table a walk grouped by a stable argsort) and added to dweight once, so two backward
                    calls give exactly twice one (adding dout[n] into dweight one at a
                    time would not, with repeated indices), and from zero the result is
                    bitwise np.add.at's. Rows idx[n] == padding_idx add nothing.

Linear, y = x W^T + b:
    (6)  forward     y = x W^T + b                     (N, O) <- (N, I), W (O, I), b (O,)
    (6') backward    dx = dy W;  dW += dy^T x;  db += S,  S_o = sum_n dy_no (float64)
Every product is a single-threaded BLAS gemm inside cylstm's own OpenMP team (the pin
of _lstm.pyx), so no BLAS thread pool runs beside the team, or, in the backward, the own
float32 kernel cy_bgemm (rule: _linear_own). y and dx are cut into P fixed row blocks,
one product each; dW and db into P fixed blocks of its O rows, each one product over
all N rows (and the bias sums in row order): every element is computed by the same
call for any number of threads, so results are bitwise the same.

Parallel structure and reproducibility. Cross-entropy and the gather split the rows
into P fixed blocks; each row is independent, and the loss is summed in float64 per
block, then the block sums in block order. The scatter-add splits the D feature columns
into P blocks instead: each thread owns its columns and walks all N rows (in order, or
grouped by a stable argsort of the index), so no two threads write one element (repeated
indices are safe) and every element's sum has one fixed order. Row blocks depend only
on N and P, and who sums a column changes no sum, so results are bitwise identical for
any number of threads.
"""

from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport exp, log, isfinite
from libc.stdint cimport int32_t, int64_t
from libc.string cimport memcpy, memset

from cylstm._blas cimport affine_rows, gemm
from cylstm._isa cimport on_level_change
from cylstm._kernels cimport cy_bgemm_fn, cy_bgemm_select
from cylstm._parallel cimport (MIN_PARALLEL_COPY, MIN_PARALLEL_MACS, MIN_PARALLEL_XENT,
                               blas_single_enter, blas_single_exit, note_team, split,
                               team)


ctypedef fused index_t:
    int32_t
    int64_t


cdef extern from *:
    """
    #if defined(__GNUC__)   /* the gate row functions it also defines are unused here */
    #pragma GCC diagnostic push
    #pragma GCC diagnostic ignored "-Wunused-function"
    #pragma GCC diagnostic ignored "-Wunused-variable"
    #endif
    #include "_activations.h"
    #if defined(__GNUC__)
    #pragma GCC diagnostic pop
    #endif
    /* Row pieces of the softmax, in C so that they vectorise: the max and the sum run
     * in 8 fixed lanes (an order that is part of the code, not of the vector width, so
     * every ISA level and every thread count gives the same bits; no FMA can enter a
     * max or a sum), and the float32 exponential is the Cephes-based cy_exp_nonpos_f32
     * of _activations.h (a few float32 ulps; its argument z - m is <= 0), compiled per
     * ISA level (_isa.h). float64 keeps libm's exp. With plain scalar loops in Cython
     * (glibc expf, a latency-bound float64 sum) the whole kernel was about three times
     * slower on float32 logits (2000, 500). */
    #define CY_OPS_LANES 8
    /* a read prefetch of the cache line at p (nothing where the compiler has none) */
    #if defined(__GNUC__) || defined(__clang__)
    #define cy_prefetch(p) __builtin_prefetch((const void *) (p), 0, 3)
    #else
    #define cy_prefetch(p) ((void) (p))
    #endif
    #if defined(__SSE2__) || defined(_M_X64)
    #include <emmintrin.h>
    /* MAXPS(a, b) is exactly a > b ? a : b, lane by lane: the plain-C loop below, which
     * GCC 12 will not vectorise without -ffinite-math-only (0.18 vs 1.43 ns/element). */
    #define CY_OPS_MAX_LANES(T, V, LOADU, STOREU, MAX, W)                              \
        V acc[CY_OPS_LANES / W];                                                        \
        T tmp[CY_OPS_LANES];                                                            \
        for (k = 0; k < CY_OPS_LANES / W; k++) acc[k] = LOADU(z + k * W);               \
        for (j = CY_OPS_LANES; j + CY_OPS_LANES <= n; j += CY_OPS_LANES)                \
            for (k = 0; k < CY_OPS_LANES / W; k++)                                      \
                acc[k] = MAX(LOADU(z + j + k * W), acc[k]);                             \
        for (k = 0; k < CY_OPS_LANES / W; k++) STOREU(tmp + k * W, acc[k]);
    #define CY_OPS_MAX_LANES_float                                                      \
        CY_OPS_MAX_LANES(float, __m128, _mm_loadu_ps, _mm_storeu_ps, _mm_max_ps, 4)
    #define CY_OPS_MAX_LANES_double                                                     \
        CY_OPS_MAX_LANES(double, __m128d, _mm_loadu_pd, _mm_storeu_pd, _mm_max_pd, 2)
    #else
    #define CY_OPS_MAX_LANES_PLAIN(T)                                                   \
        T tmp[CY_OPS_LANES];                                                            \
        for (k = 0; k < CY_OPS_LANES; k++) tmp[k] = z[k];                               \
        for (j = CY_OPS_LANES; j + CY_OPS_LANES <= n; j += CY_OPS_LANES)                \
            for (k = 0; k < CY_OPS_LANES; k++)                                          \
                tmp[k] = z[j + k] > tmp[k] ? z[j + k] : tmp[k];
    #define CY_OPS_MAX_LANES_float CY_OPS_MAX_LANES_PLAIN(float)
    #define CY_OPS_MAX_LANES_double CY_OPS_MAX_LANES_PLAIN(double)
    #endif
    /* max_j z[j], n >= 1 (NaN may or may not survive: the caller detects it later) */
    #define CY_OPS_MAX_BODY(T)                                                           \
        T m = z[0];                                                                      \
        int j = 0, k;                                                                    \
        if (n >= CY_OPS_LANES) {                                                         \
            CY_OPS_MAX_LANES_##T                                                         \
            for (k = 0; k < CY_OPS_LANES; k++) m = tmp[k] > m ? tmp[k] : m;              \
        }                                                                                \
        for (; j < n; j++) m = z[j] > m ? z[j] : m;                                      \
        return m;
    /* e[j] = exp(z[j] - m) for j < n; returns sum_j e[j] in float64 (fixed lanes) */
    #define CY_OPS_EXP_SUM_BODY(EXP)                                                     \
        double lane[CY_OPS_LANES] = {0}, s = 0;                                          \
        int j, k;                                                                        \
        for (j = 0; j < n; j++) e[j] = EXP(z[j] - m);                                    \
        for (j = 0; j + CY_OPS_LANES <= n; j += CY_OPS_LANES)                            \
            for (k = 0; k < CY_OPS_LANES; k++) lane[k] += (double) e[j + k];             \
        for (k = 0; k < CY_OPS_LANES; k++) s += lane[k];                                 \
        for (; j < n; j++) s += (double) e[j];                                           \
        return s;
    /* e[j] *= a, j < n */
    #define CY_OPS_SCALE_BODY for (int j = 0; j < n; j++) e[j] *= a;
    CY_PER_LEVEL(float, cy_ops_max_f32, (const float *restrict z, int n),
                 CY_OPS_MAX_BODY(float))
    CY_PER_LEVEL(double, cy_ops_exp_sum_f32,
                 (float *restrict e, const float *restrict z, float m, int n),
                 CY_OPS_EXP_SUM_BODY(cy_exp_nonpos_f32))
    CY_PER_LEVEL(void, cy_ops_scale_f32, (float *restrict e, float a, int n),
                 CY_OPS_SCALE_BODY)
    static inline double cy_ops_max_f64(const double *restrict z, int n)
    { CY_OPS_MAX_BODY(double) }
    static inline double cy_ops_exp_sum_f64(double *restrict e, const double *restrict z,
                                            double m, int n)
    { CY_OPS_EXP_SUM_BODY(exp) }
    static inline void cy_ops_scale_f64(double *restrict e, double a, int n)
    { CY_OPS_SCALE_BODY }
    typedef struct {
        float (*max)(const float *restrict, int);
        double (*exp_sum)(float *restrict, const float *restrict, float, int);
        void (*scale)(float *restrict, float, int);
    } cy_ops_rows_f32;
    static inline cy_ops_rows_f32 cy_ops_select(int level)
    {
        cy_ops_rows_f32 t = {cy_ops_max_f32_by_level[level],
                             cy_ops_exp_sum_f32_by_level[level],
                             cy_ops_scale_f32_by_level[level]};
        return t;
    }
    """
    ctypedef struct cy_ops_rows_f32:
        float (*max)(const float* z, int n) noexcept nogil
        double (*exp_sum)(float* e, const float* z, float m, int n) noexcept nogil
        void (*scale)(float* e, float a, int n) noexcept nogil
    cy_ops_rows_f32 cy_ops_select(int level) noexcept nogil
    double cy_ops_max_f64(const double* z, int n) noexcept nogil
    double cy_ops_exp_sum_f64(double* e, const double* z, double m, int n) noexcept nogil
    void cy_ops_scale_f64(double* e, double a, int n) noexcept nogil
    void cy_prefetch(const void* p) noexcept nogil


cdef cy_ops_rows_f32 _rows
cdef cy_bgemm_fn _bgemm = NULL      # Linear backward's float32 products; NULL below 2: BLAS


cdef void _use_level(int level) noexcept nogil:
    global _rows, _bgemm
    _rows = cy_ops_select(level)
    _bgemm = cy_bgemm_select(level)


on_level_change(_use_level)


def _kernel_levels():
    """Test hook: the level of the softmax row functions this module calls now, and of
    Linear backward's own product kernel (0: none, BLAS)."""
    for lvl in range(3):
        if cy_ops_select(lvl).exp_sum == _rows.exp_sum:
            return {"softmax": lvl, "bgemm": 2 if _bgemm != NULL else 0}


# ----------------------------------------------------------------------------------------
# Softmax cross-entropy
# ----------------------------------------------------------------------------------------

cdef void _xent_block(
    floating* dlogits,          # (N, C) OUT rows [r0, r1), or NULL: no gradient     (4')
    floating* ebuf,             # (C,) this block's scratch row when dlogits is NULL
    floating* row_loss,         # (N,) OUT w_n loss_n, or NULL
    double* block_loss,         # (P,) OUT [p]: sum of w_n loss_n over the block, float64
    int64_t* block_stats,       # (P, 2) OUT [p]: argmax hits, first non-finite row or -1
    const floating* logits,     # (N, C)
    const index_t* targets,     # (N,)
    const floating* weight,     # (N,) or NULL (all 1)
    int64_t ignore_index,
    double scale,
    Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t C, int p,
) noexcept nogil:
    """Loss, gradient and argmax hits of rows [r0, r1), run by one thread."""
    cdef Py_ssize_t n, j, arg
    cdef int64_t t, correct = 0, bad = -1
    cdef double acc = 0, s, w, loss
    cdef floating m, inv
    cdef const floating* z
    cdef floating* dz
    for n in range(r0, r1):
        z = logits + n * C
        # without a gradient the exponentials (2) only feed the sum: one scratch row
        dz = ebuf if dlogits == NULL else dlogits + n * C
        t = targets[n]
        w = 1 if weight == NULL else weight[n]
        if t == ignore_index or w == 0:
            if dlogits != NULL:
                memset(dz, 0, C * sizeof(floating))
            if row_loss != NULL:
                row_loss[n] = 0
            continue
        if floating is float:
            m = _rows.max(z, <int> C)                                       # (1)
            s = _rows.exp_sum(dz, z, m, <int> C)                            # (2)
        else:
            m = cy_ops_max_f64(z, <int> C)
            s = cy_ops_exp_sum_f64(dz, z, m, <int> C)
        if z[t] == m:               # argmax hit: the first maximum is the target
            arg = 0
            while z[arg] != m:
                arg += 1
            if arg == t:
                correct += 1
        loss = <double> m + log(s) - <double> z[t]                          # (3)
        if not isfinite(loss):      # NaN or +-Inf among the logits: reported after
            if bad < 0:
                bad = n
            loss = 0
        acc += w * loss
        if row_loss != NULL:
            row_loss[n] = <floating> (w * loss)
        if dlogits == NULL:
            continue
        inv = <floating> (w * scale / s)                                    # (4')
        if floating is float:
            _rows.scale(dz, inv, <int> C)
        else:
            cy_ops_scale_f64(dz, inv, <int> C)
        dz[t] = dz[t] - <floating> (w * scale)
    block_loss[p] = acc
    block_stats[2 * p] = correct
    block_stats[2 * p + 1] = bad


def softmax_xent(
    *,
    # (logits comes first among the float arrays: Cython picks the float32 or float64
    # version from the first one, and dlogits may be None)
    const floating[:, ::1] logits,      # (N, C)
    floating[:, ::1] dlogits,           # (N, C) OUT dL/dlogits, not overlapping logits (4'),
                                        # or None: the loss and hits only (evaluation)
    floating[::1] row_loss,             # (N,) OUT w_n loss_n (reduction "none"), or None
    double[::1] block_loss,             # (P,) scratch: per-block float64 loss sums
    int64_t[:, ::1] block_stats,        # (P, 2) scratch: per-block hits, first bad row
    const index_t[::1] targets,         # (N,) in 0..C-1, or ignore_index
    const floating[::1] weight,         # (N,) finite, >= 0 (0 = not counted), or None
    int64_t ignore_index,
    bint mean,                          # scale = 1 / sum of counted weights, else 1
    int n_parts,
    int n_threads,
    floating[:, ::1] scratch=None,      # (P, C) scratch rows, needed when dlogits is None
):
    """Softmax cross-entropy forward and backward in one pass over the rows.

    Returns (loss_sum, weight_sum, n_counted, n_correct): the float64 sum of w_n loss_n
    over counted rows (not yet scaled), the sum of their weights, how many rows counted,
    and how many of those have argmax_j z_nj == y_n (ties: the first maximum).
    dlogits holds the gradient of loss_sum * scale; with dlogits None nothing but the
    returned figures is computed (bitwise the same ones: the same row functions run on
    the same values), which saves writing an (N, C) array and its scaling pass when
    only the loss is wanted. Raises ValueError naming `targets`
    (a value outside 0..C-1 that is not ignore_index), `weight` (negative or not finite),
    or `logits` (a counted row with NaN or +Inf, or -Inf at its target).
    """
    cdef Py_ssize_t N = logits.shape[0], C = logits.shape[1], n, bad = -1
    cdef int p
    cdef int64_t t, counted = 0, correct = 0
    cdef double w, wsum = 0, total = 0, scale = 1
    cdef const floating* w_p = NULL
    cdef floating* rl_p = NULL
    cdef floating* dz_p = NULL
    cdef floating* sc_p = NULL
    if dlogits is not None:
        if dlogits.shape[0] != N or dlogits.shape[1] != C:
            raise ValueError(f"softmax_xent: dlogits ({dlogits.shape[0]}, "
                             f"{dlogits.shape[1]}) must match logits ({N}, {C})")
    elif scratch is None or scratch.shape[0] < n_parts or scratch.shape[1] != C:
        raise ValueError(f"softmax_xent: without dlogits, scratch must have shape "
                         f"(n_parts, {C}) = ({n_parts}, {C})")
    if targets.shape[0] != N:
        raise ValueError(f"softmax_xent: targets ({targets.shape[0]},) must match "
                         f"logits ({N}, {C})")
    if C < 1 or C > 2147483647:
        raise ValueError(f"logits must have 1..2**31-1 class columns, got ({N}, {C})")
    if n_parts < 1 or n_threads < 1 or block_loss.shape[0] < n_parts \
            or block_stats.shape[0] < n_parts or block_stats.shape[1] != 2:
        raise ValueError("softmax_xent: n_parts/n_threads >= 1 and block scratch of n_parts rows")
    if weight is not None:
        if weight.shape[0] != N:
            raise ValueError(f"weight must have shape ({N},), got ({weight.shape[0]},)")
        w_p = &weight[0] if N else NULL
    if row_loss is not None:
        if row_loss.shape[0] != N:
            raise ValueError(f"row_loss must have shape ({N},), got ({row_loss.shape[0]},)")
        rl_p = &row_loss[0] if N else NULL
    if N == 0:
        return 0.0, 0.0, 0, 0
    with nogil:                 # serial O(N) check and the denominator of the mean   (4)
        for n in range(N):
            w = 1 if w_p == NULL else w_p[n]
            if not (w >= 0 and isfinite(w)):
                bad = n
                break
            t = targets[n]
            if t == ignore_index or w == 0:
                continue
            if t < 0 or t >= C:
                bad = n
                break
            wsum += w
            counted += 1
    if bad >= 0:
        w = 1 if w_p == NULL else w_p[bad]
        if not (w >= 0 and isfinite(w)):
            raise ValueError(f"weight (the mask) must be finite and >= 0, got {w} at row {bad}")
        raise ValueError(
            f"targets must be class indices in 0..{C - 1} (logits have C={C} classes) or "
            f"ignore_index={ignore_index}, got {targets[bad]} at flat position {bad}")
    if mean and wsum > 0:
        scale = 1 / wsum
    if dlogits is not None:
        dz_p = &dlogits[0, 0]
    else:
        sc_p = &scratch[0, 0]
    with nogil:
        for p in prange(n_parts, schedule="static",
                        num_threads=team(n_threads, n_parts, <double> N * C,
                                         MIN_PARALLEL_XENT)):
            note_team()
            _xent_block(dz_p, NULL if sc_p == NULL else sc_p + p * C, rl_p,
                        &block_loss[0], &block_stats[0, 0],
                        &logits[0, 0], &targets[0], w_p, ignore_index, scale,
                        split(N, n_parts, p), split(N, n_parts, p + 1), C, p)
    for p in range(n_parts):                        # fixed order: bitwise reproducible
        if block_stats[p, 1] >= 0:
            n = block_stats[p, 1]
            raise ValueError(f"logits must be finite in counted rows: row {n} (flat) "
                             f"gives a non-finite loss (NaN or +Inf in it, or -Inf at "
                             f"its target {targets[n]})")
        total += block_loss[p]
        correct += block_stats[p, 0]
    return total, wsum, counted, correct


# ----------------------------------------------------------------------------------------
# Embedding: gather forward, scatter-add backward
# ----------------------------------------------------------------------------------------

cdef Py_ssize_t _first_bad_index(const index_t* idx, Py_ssize_t N, Py_ssize_t V) noexcept nogil:
    """First n with idx[n] outside 0..V-1, or -1."""
    cdef Py_ssize_t n
    for n in range(N):
        if idx[n] < 0 or idx[n] >= V:
            return n
    return -1


cdef inline void _raise_bad_index(const index_t[::1] indices, Py_ssize_t n, Py_ssize_t V) except *:
    raise ValueError(f"indices must be in 0..{V - 1} (num_embeddings={V}), "
                     f"got {indices[n]} at flat position {n}")


cdef void _gather_block(
    floating* out,              # (N, D) OUT rows [r0, r1)
    const floating* weight,     # (V, D)
    const index_t* idx,         # (N,) in 0..V-1
    Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t D,
) noexcept nogil:
    cdef Py_ssize_t n
    for n in range(r0, r1):
        memcpy(out + n * D, weight + <Py_ssize_t> idx[n] * D, D * sizeof(floating))


def embedding_forward(
    *,
    floating[:, ::1] out,               # (N, D) OUT: out[n] = weight[idx[n]]      (5)
    const floating[:, ::1] weight,      # (V, D)
    const index_t[::1] indices,         # (N,) in 0..V-1
    int n_parts,
    int n_threads,
):
    """Gather rows of the table: out[n] = weight[indices[n]]."""
    cdef Py_ssize_t N = indices.shape[0], V = weight.shape[0], D = weight.shape[1], bad
    cdef int p
    if out.shape[0] != N or out.shape[1] != D:
        raise ValueError(f"embedding_forward: out must have shape ({N}, {D}), "
                         f"got ({out.shape[0]}, {out.shape[1]})")
    if n_parts < 1 or n_threads < 1:
        raise ValueError("embedding_forward: n_parts and n_threads must be >= 1")
    if N == 0 or D == 0:
        if N:
            bad = _first_bad_index(&indices[0], N, V)
            if bad >= 0:
                _raise_bad_index(indices, bad, V)
        return
    with nogil:
        bad = _first_bad_index(&indices[0], N, V)
    if bad >= 0:
        _raise_bad_index(indices, bad, V)
    with nogil:
        for p in prange(n_parts, schedule="static",
                        num_threads=team(n_threads, n_parts, <double> N * D,
                                         MIN_PARALLEL_COPY)):
            note_team()
            _gather_block(&out[0, 0], &weight[0, 0], &indices[0],
                          split(N, n_parts, p), split(N, n_parts, p + 1), D)


# The scatter-add sums each group of equal indices in a small array on the thread's own
# stack, _SCATTER_COLS columns at a time, and column blocks start at multiples of
# _SCATTER_ALIGN elements (whole cache lines of the rows when D is a multiple of it).
# Who sums a column never changes its value: every element's sum runs over the same
# groups in the same order. A shared (D,) scratch row for the sums instead made two
# threads slower than one (both wrote one cache line at every group); with the stack
# arrays, float32 V=65, D=128, N=6400 takes about 0.2 ms on two threads of a 2-core
# Xeon (np.add.at: 30 times that).
# Where one part's group sums fit in _SCATTER_WALK_BYTES, the walk in row order
# (_scatter_walk_block) needs no sort and reads dout's rows in order. Zen 5, float32,
# D=64, N=3200, 2 threads: V=81 41 us against 44 + 9 for the argsort; V=256 35 against
# 44; with N=32000 and V=256, 276 against 421. It stays ahead up to sums of about 2 MiB
# a part, and falls behind beyond the L2 (V=50000, D=256: 215 against 146); the bound
# is kept low so that the per-call scratch (N_PARTS x 64 KiB) stays small.
cdef enum:
    _SCATTER_COLS = 64
    _SCATTER_ALIGN = 16
    _SCATTER_AHEAD = 64
    _SCATTER_WALK_BYTES = 64 * 1024


cdef inline Py_ssize_t _split_aligned(Py_ssize_t n, int parts, int p) noexcept nogil:
    """Start of block p of n columns, cut at multiples of _SCATTER_ALIGN (the last ends at n)."""
    cdef Py_ssize_t units = (n + _SCATTER_ALIGN - 1) // _SCATTER_ALIGN
    return min(n, _SCATTER_ALIGN * ((units * p) // parts))


cdef inline Py_ssize_t _row_at(int64_t n, Py_ssize_t inner, Py_ssize_t s0,
                               Py_ssize_t s1) noexcept nogil:
    """Offset of row n of an (A, inner, D) array with element strides s0, s1."""
    return n * s0 if inner == 1 else (n // inner) * s0 + (n % inner) * s1


cdef inline void _prefetch_row(const floating* p, Py_ssize_t w) noexcept nogil:
    """Prefetch the cache lines of p[0:w]."""
    cdef Py_ssize_t j = 0, line = 64 // <Py_ssize_t> sizeof(floating)
    while j < w:
        cy_prefetch(p + j)
        j += line
    cy_prefetch(p + w - 1)


cdef void _scatter_block(
    floating* dweight,          # (V, D) INOUT columns [d0, d1), +=                     (5')
    const floating* dout,       # (N, D): row n at (n // inner) * s0 + (n % inner) * s1
    const index_t* idx,         # (N,) in 0..V-1
    const int64_t* order,       # (N,) a stable argsort of idx: groups of equal indices
    int64_t padding_idx,        # rows with this index get nothing; -1 = none
    Py_ssize_t N, Py_ssize_t D, Py_ssize_t d0, Py_ssize_t d1,
    Py_ssize_t inner, Py_ssize_t s0, Py_ssize_t s1,
) noexcept nogil:
    """dweight[v, d0:d1] += sum of dout[n, d0:d1] over idx[n] = v, one add per group."""
    cdef floating acc[_SCATTER_COLS]
    cdef Py_ssize_t i, j, c0, w
    cdef int64_t v
    cdef floating* dst
    cdef const floating* src
    c0 = d0
    while c0 < d1:
        w = min(<Py_ssize_t> _SCATTER_COLS, d1 - c0)
        for i in range(min(N, _SCATTER_AHEAD)):
            _prefetch_row(dout + _row_at(order[i], inner, s0, s1) + c0, w)
        i = 0
        while i < N:
            v = idx[order[i]]
            src = dout + _row_at(order[i], inner, s0, s1) + c0
            for j in range(w):
                acc[j] = src[j]
            if i + _SCATTER_AHEAD < N:
                _prefetch_row(dout + _row_at(order[i + _SCATTER_AHEAD], inner, s0, s1) + c0, w)
            i += 1
            while i < N and idx[order[i]] == v:
                src = dout + _row_at(order[i], inner, s0, s1) + c0
                for j in range(w):
                    acc[j] = acc[j] + src[j]
                if i + _SCATTER_AHEAD < N:
                    _prefetch_row(dout + _row_at(order[i + _SCATTER_AHEAD], inner, s0, s1) + c0,
                                  w)
                i += 1
            if v != padding_idx:
                dst = dweight + v * D + c0
                for j in range(w):
                    dst[j] = dst[j] + acc[j]
        c0 += w


cdef void _scatter_walk_block(
    floating* dweight,          # (V, D) INOUT columns [d0, d1), +=                     (5')
    floating* acc,              # (V, _SCATTER_COLS) scratch: this part's group sums
    unsigned char* seen,        # (V,) scratch: group v has its first row in acc
    const floating* dout,       # (N, D): row n at (n // inner) * s0 + (n % inner) * s1
    const index_t* idx,         # (N,) in 0..V-1
    int64_t padding_idx,        # rows with this index get nothing; -1 = none
    Py_ssize_t N, Py_ssize_t V, Py_ssize_t D, Py_ssize_t d0, Py_ssize_t d1,
    Py_ssize_t inner, Py_ssize_t s0, Py_ssize_t s1,
) noexcept nogil:
    """_scatter_block's sums without the sort: the rows are read in increasing n, each
    added to its group's row of acc (the first one copied), so every group is summed in
    the same order as by a stable argsort, bit for bit; then each sum is added once."""
    cdef Py_ssize_t n, j, c0, w
    cdef int64_t v
    cdef floating* a
    cdef floating* dst
    cdef const floating* src
    c0 = d0
    while c0 < d1:
        w = min(<Py_ssize_t> _SCATTER_COLS, d1 - c0)
        memset(seen, 0, V)
        for n in range(N):
            v = idx[n]
            if v == padding_idx:
                continue
            src = dout + _row_at(n, inner, s0, s1) + c0
            a = acc + v * w
            if seen[v]:
                for j in range(w):
                    a[j] = a[j] + src[j]
            else:
                for j in range(w):
                    a[j] = src[j]
                seen[v] = 1
        for v in range(V):
            if seen[v]:
                dst = dweight + v * D + c0
                a = acc + v * w
                for j in range(w):
                    dst[j] = dst[j] + a[j]
        c0 += w


def scatter_scratch(Py_ssize_t V, Py_ssize_t D, dtype, int n_parts):
    """The scratch that lets embedding_backward walk the rows in order without a sort:
    (acc, seen) for a table of V rows of D floats of dtype, or None where one part's
    group sums (V rows of up to _SCATTER_COLS floats) would not stay in a core's cache
    (above _SCATTER_WALK_BYTES): there the sorted walk touches less memory. The rule
    that picks the walk is this one function."""
    import numpy as np
    dtype = np.dtype(dtype)
    w = min(D, <Py_ssize_t> _SCATTER_COLS)
    if V * w * dtype.itemsize > _SCATTER_WALK_BYTES:
        return None
    return (np.empty((n_parts, V * max(w, 1)), dtype), np.empty((n_parts, V), np.uint8))


def embedding_backward(
    *,
    floating[:, ::1] dweight,           # (V, D) INOUT: accumulated (+=)              (5')
    const floating[:, :, :] dout,       # (A, C, D) dL/dout, row n = (n // C, n % C), the
                                        #   last axis contiguous, any other strides (a
                                        #   batch-first view of a time-major array, say);
                                        #   a flat (N, D) array as (N, 1, D)
    const index_t[::1] indices,         # (N,) in 0..V-1, the forward's
    const int64_t[::1] order = None,    # (N,) np.argsort(indices, kind="stable"), or None
    int64_t padding_idx,                # 0..V-1: that row gets no gradient; -1: none
    int n_parts,
    int n_threads,
    floating[:, ::1] acc = None,        # (P, V * min(D, 64)) scatter_scratch()'s, when
    unsigned char[:, ::1] seen = None,  # (P, V)  order is None
):
    """Scatter-add: dweight[v] += sum of dout[n] over indices[n] == v.

    With ``order`` it walks the rows grouped by it (a stable argsort gives the sum order
    of np.add.at); any permutation of 0..N-1 gives the right sums, only their rounding
    and the number of adds differ. Values outside 0..N-1 raise ValueError. Without it,
    it walks the rows in order and sums each group in ``acc`` (``scatter_scratch``'s):
    bitwise the stable argsort's sums, without the sort, reading dout's rows in order."""
    cdef Py_ssize_t N = indices.shape[0], V = dweight.shape[0], D = dweight.shape[1]
    cdef Py_ssize_t n, bad = -1, inner = dout.shape[1], w = min(D, <Py_ssize_t> _SCATTER_COLS)
    cdef Py_ssize_t s0 = dout.strides[0] // <Py_ssize_t> sizeof(floating)
    cdef Py_ssize_t s1 = dout.strides[1] // <Py_ssize_t> sizeof(floating)
    cdef int p
    cdef bint walk = order is None
    if (dout.shape[0] * dout.shape[1] != N or dout.shape[2] != D
            or (not walk and order.shape[0] != N)
            or dout.strides[0] % sizeof(floating) or dout.strides[1] % sizeof(floating)
            or (D > 1 and dout.strides[2] != sizeof(floating))):
        raise ValueError(f"embedding_backward: dout must have ({N}, {D}) rows, its last "
                         f"axis contiguous, and order "
                         f"({N},), got ({dout.shape[0]}, {dout.shape[1]}, {dout.shape[2]}) "
                         f"and {'no order (the walk)' if walk else f'({order.shape[0]},)'}")
    if walk and (acc is None or seen is None or acc.shape[0] < n_parts
                 or acc.shape[1] < V * w or seen.shape[0] < n_parts or seen.shape[1] < V):
        raise ValueError(f"embedding_backward: without order, acc must be at least "
                         f"({n_parts}, {V * w}) and seen ({n_parts}, {V}) "
                         f"(scatter_scratch's)")
    if n_parts < 1 or n_threads < 1:
        raise ValueError("embedding_backward: n_parts and n_threads must be >= 1")
    if padding_idx < -1 or padding_idx >= V:
        raise ValueError(f"padding_idx must be in 0..{V - 1} or -1 (none), got {padding_idx}")
    if N == 0:
        return
    with nogil:
        bad = _first_bad_index(&indices[0], N, V)
        if bad < 0 and not walk:
            for n in range(N):
                if order[n] < 0 or order[n] >= N:
                    bad = N + n
                    break
    if bad >= N:
        raise ValueError(f"order must hold positions in 0..{N - 1}, got {order[bad - N]}")
    if bad >= 0:
        _raise_bad_index(indices, bad, V)
    if D == 0:
        return
    with nogil:
        for p in prange(n_parts, schedule="static",
                        num_threads=team(n_threads, n_parts, <double> N * D,
                                         MIN_PARALLEL_COPY)):
            note_team()
            if walk:
                _scatter_walk_block(&dweight[0, 0], &acc[p, 0], &seen[p, 0], &dout[0, 0, 0],
                                    &indices[0], padding_idx, N, V, D,
                                    _split_aligned(D, n_parts, p),
                                    _split_aligned(D, n_parts, p + 1), inner, s0, s1)
            else:
                _scatter_block(&dweight[0, 0], &dout[0, 0, 0], &indices[0], &order[0],
                               padding_idx, N, D, _split_aligned(D, n_parts, p),
                               _split_aligned(D, n_parts, p + 1), inner, s0, s1)


# ----------------------------------------------------------------------------------------
# Linear
# ----------------------------------------------------------------------------------------


# Linear's backward products on the LSTM backward's own float32 kernel (cy_bgemm, level 2),
# by one rule: both where OpenBLAS would run AVX2 code (own_wide, the LSTM's policy,
# cylstm._threads.BACKWARD_OWN_WIDE); elsewhere the weight gradient dy^T x up to
# _LINEAR_OWN_DW_ROWS output rows, where its long sum over N and few rows suit the own
# kernel better than OpenBLAS's SkylakeX code. One thread, N = 3200, Zen 5 (ms, OpenBLAS
# SkylakeX / own): dW I=256 O=81 0.675 / 0.396, I=256 O=256 1.57 / 1.27, I=512 O=1024
# 10.5 / 9.36, I=256 O=4096 22.1 / 23.2; dx (1600 rows) I=256 O=81 0.391 / 0.374, I=64
# O=9 0.015 / 0.035, I=512 O=1024 9.17 / 10.5: no rule, BLAS. With the Haswell kernels
# the own kernel was 1.4-3x faster on every one of these but the 0.015 ms one.
cdef enum:
    _LINEAR_OWN_DW_ROWS = 1024


cdef inline bint _linear_own(bint own_wide, bint weight_grad, Py_ssize_t O) noexcept nogil:
    """Whether a float32 Linear backward product runs on the own kernel (rule above)."""
    return _bgemm != NULL and (own_wide or (weight_grad and O <= _LINEAR_OWN_DW_ROWS))


cdef void _linear_bwd_block(
    floating* dx,               # (N, I) OUT rows [r0, r1), or NULL                 (6')
    floating* dw,               # (O, I) INOUT rows [o0, o1), +=
    floating* db,               # (O,) INOUT [o0, o1), +=, or NULL
    double* acc,                # (O,) scratch [o0, o1)
    const floating* dy,         # (N, O)
    const floating* x,          # (N, I)
    const floating* w,          # (O, I)
    Py_ssize_t N, int I, int O,
    Py_ssize_t r0, Py_ssize_t r1, int o0, int o1,
    bint own_dx, bint own_dw,   # on the own kernel (float32 only; _linear_own)
) noexcept nogil:
    cdef Py_ssize_t n
    cdef int o
    cdef const floating* row
    if dx != NULL and r1 > r0:
        if floating is float and own_dx:
            _bgemm(0, <int> (r1 - r0), I, O, dy + r0 * O, O, w, I, dx + r0 * I, I, 0)
        else:
            gemm(False, False, <int> (r1 - r0), I, O, 1, dy + r0 * O, O, w, I, 0,
                 dx + r0 * I, I)
    if o1 <= o0:
        return
    if floating is float and own_dw:
        _bgemm(1, o1 - o0, I, <int> N, dy + o0, O, x, I, dw + <Py_ssize_t> o0 * I, I, 1)
    else:
        gemm(True, False, o1 - o0, I, <int> N, 1, dy + o0, O, x, I, 1,
             dw + <Py_ssize_t> o0 * I, I)
    if db != NULL:
        for o in range(o0, o1):
            acc[o] = 0
        for n in range(N):
            row = dy + n * O
            for o in range(o0, o1):
                acc[o] += <double> row[o]
        for o in range(o0, o1):
            db[o] = db[o] + <floating> acc[o]


cdef inline int _linear_sizes(Py_ssize_t N, Py_ssize_t I, Py_ssize_t O, int n_parts,
                              int n_threads) except -1:
    if I > 2147483647 or O > 2147483647 or N > 2147483647:
        raise ValueError(f"linear: sizes must be below 2**31, got N={N}, I={I}, O={O}")
    if n_parts < 1 or n_threads < 1:
        raise ValueError("linear: n_parts and n_threads must be >= 1")
    return 0


def linear_forward(
    *,
    floating[:, ::1] out,               # (N, O) OUT y = x W^T + b                  (6)
    const floating[:, ::1] x,           # (N, I)
    const floating[:, ::1] weight,      # (O, I)
    const floating[::1] bias,           # (O,) or None
    int n_parts,
    int n_threads,
):
    """y = x W^T + b, row blocks of x in parallel (see the module docstring)."""
    cdef Py_ssize_t N = x.shape[0], I = x.shape[1], O = weight.shape[0]
    cdef const floating* b_p = NULL
    cdef int p
    if weight.shape[1] != I or out.shape[0] != N or out.shape[1] != O \
            or (bias is not None and bias.shape[0] != O):
        raise ValueError(f"linear_forward: x ({N}, {I}), weight ({O}, {weight.shape[1]}), "
                         f"out ({out.shape[0]}, {out.shape[1]}) and bias do not match")
    _linear_sizes(N, I, O, n_parts, n_threads)
    if N == 0 or O == 0:
        return
    if bias is not None:
        b_p = &bias[0]
    if I == 0:
        for p in range(N):
            if b_p != NULL:
                memcpy(&out[p, 0], b_p, O * sizeof(floating))
            else:
                memset(&out[p, 0], 0, O * sizeof(floating))
        return
    with nogil:
        for p in prange(n_parts, schedule="static",
                        num_threads=team(n_threads, n_parts, <double> N * I * O,
                                         MIN_PARALLEL_MACS)):
            note_team()
            blas_single_enter()
            affine_rows(&out[0, 0], &x[0, 0], &weight[0, 0], b_p,
                        split(N, n_parts, p), split(N, n_parts, p + 1), <int> I, <int> O)
            blas_single_exit()


def linear_backward(
    *,
    floating[:, ::1] dx,                # (N, I) OUT dy W, or None                  (6')
    floating[:, ::1] dweight,           # (O, I) INOUT += dy^T x
    floating[::1] dbias,                # (O,) INOUT += column sums of dy, or None
    double[::1] scratch,                # (O,) float64 scratch for the bias sums
    const floating[:, ::1] dy,          # (N, O)
    const floating[:, ::1] x,           # (N, I) the forward's input
    const floating[:, ::1] weight,      # (O, I)
    int n_parts,
    int n_threads,
    bint own_wide=False,                # OpenBLAS runs AVX2 code: every float32 product
                                        #   on the own kernel (_linear_own)
):
    """dx = dy W; dW += dy^T x; db += sum_n dy_n (see the module docstring)."""
    cdef Py_ssize_t N = x.shape[0], I = x.shape[1], O = weight.shape[0]
    cdef floating* dx_p = NULL
    cdef floating* db_p = NULL
    cdef int p
    cdef bint own_dx = _linear_own(own_wide, False, O), own_dw = _linear_own(own_wide, True, O)
    if weight.shape[1] != I or dy.shape[0] != N or dy.shape[1] != O \
            or dweight.shape[0] != O or dweight.shape[1] != I \
            or (dx is not None and (dx.shape[0] != N or dx.shape[1] != I)) \
            or (dbias is not None and dbias.shape[0] != O) or scratch.shape[0] < O:
        raise ValueError(f"linear_backward: dy ({dy.shape[0]}, {dy.shape[1]}), x ({N}, {I}), "
                         f"weight ({O}, {weight.shape[1]}) and the outputs do not match")
    _linear_sizes(N, I, O, n_parts, n_threads)
    if dx is not None and N and I:
        dx_p = &dx[0, 0]
        if O == 0:
            memset(dx_p, 0, N * I * sizeof(floating))
            dx_p = NULL
    if dbias is not None and O:
        db_p = &dbias[0]
    if N == 0 or O == 0 or (I == 0 and db_p == NULL):
        return
    if I == 0:                          # only the bias sums have work
        _linear_bwd_block(<floating*> NULL, <floating*> NULL, db_p, &scratch[0], &dy[0, 0], NULL, NULL,
                                    N, 0, <int> O, 0, 0, 0, <int> O, False, False)
        return
    with nogil:
        for p in prange(n_parts, schedule="static",
                        num_threads=team(n_threads, n_parts, <double> N * I * O * 2,
                                         MIN_PARALLEL_MACS)):
            note_team()
            blas_single_enter()
            _linear_bwd_block(dx_p, &dweight[0, 0], db_p, &scratch[0], &dy[0, 0], &x[0, 0],
                              &weight[0, 0], N, <int> I, <int> O,
                              split(N, n_parts, p), split(N, n_parts, p + 1),
                              <int> split(O, n_parts, p), <int> split(O, n_parts, p + 1),
                              own_dx, own_dw)
            blas_single_exit()
