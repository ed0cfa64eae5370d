"""Compiled optimiser kernels: one update over a whole parameter arena.

Dimension legend (used in every shape comment):
    N  elements of the arena: params, grads and every state buffer are flat (N,)
       C-contiguous arrays of one dtype (docs/architecture.md)
    P  fixed work parts (n_parts, cylstm._threads.N_PARTS); part p is [lo_p, hi_p)
Outputs come first (INOUT: state read and written in place), then inputs, then scalars
and sizes. The Python layer (cylstm/optim.py) validates, allocates the state once, and
computes every scalar (bias corrections, step sizes) in Python floats exactly as
torch.optim does; the kernels trust their arguments, allocate nothing and run without
the GIL. Scalars arrive as doubles and are rounded once to the array dtype, as torch
rounds a Python scalar to the tensor's dtype.

Update equations, per element, in torch.optim's operation order (its `_single_tensor_*`
functions, torch 2.13), so float64 results agree with torch to rounding. `wd` is the
weight decay; every line is one rounded operation on left-to-right products:
  SGD      (1) g = grad + wd * p                                  (only if wd != 0)
           (2) buf = g on the first step, else buf = buf * momentum + g   (momentum != 0)
           (3) d = g + momentum * buf if nesterov, else d = buf   (momentum != 0; else d = g)
           (4) p = p + (-lr) * d
  Adam     (1) g = grad + wd * p                                  (only if wd != 0)
  AdamW    (1) p = p * (1 - lr * wd);  g = grad                   (decoupled decay)
  both     (2) m = lerp(m, g, 1 - beta1)    lerp(a, b, w) = a + w (b - a) for w < 0.5,
                                                           else b - (b - a)(1 - w)
           (3) v = v * beta2;  v = v + ((1 - beta2) * g) * g
           (4) denom = sqrt(v) / sqrt(1 - beta2^t) + eps
           (5) p = p + ((-lr / (1 - beta1^t)) * m) / denom
  RMSprop  (1) g = grad + wd * p                                  (only if wd != 0)
           (2) v = v * alpha;  v = v + ((1 - alpha) * g) * g
           (3) avg = sqrt(v) + eps
           (4) momentum > 0: buf = buf * momentum + g / avg;  p = p + (-lr) * buf
               else:         p = p + ((-lr) * g) / avg
The grads are never written (torch's L2 term makes a new tensor, not grad +=).

Parallel structure. Every element is independent, so the arena is cut into n_parts fixed
contiguous parts and a prange runs one part per iteration. The squared norm is
reduced per part in float64 (eight interleaved accumulators, combined in a fixed order)
and the part sums are added in part order. Part boundaries depend only on N and n_parts
(never on the thread count), so every result, the norm included, is bitwise identical
for any number of threads.
"""

from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt

from cylstm._parallel cimport (MIN_PARALLEL_ELEMS, MIN_PARALLEL_PASS, note_team, split,
                               team)


# Every loop here vectorises. The Adam and RMSprop loops need -fno-math-errno (setup.py,
# this module only): otherwise sqrt keeps a branch that sets errno, and the loop stays
# scalar. sqrt and division are correctly rounded in either form, so the results are
# the same bits. Where the arrays come from memory it changes little (Adam on 1M
# float32 reads and writes ~16 MB: 4.5 ms on one thread of a 2-core Xeon either way);
# the char model's 363k parameters stay in cache between steps, and there Adam with
# clipping went from 1.0 to 0.5 ms a step (2 threads, Zen 4).
# The norm's part sums live on the stack: at most _MAX_PARTS parts.
cdef enum:
    _MAX_PARTS = 256


cdef inline int _parts(int n_parts) noexcept nogil:
    return max(1, min(n_parts, _MAX_PARTS))


cdef inline int _team(int n_threads, int parts, Py_ssize_t n) noexcept nogil:
    return team(n_threads, parts, <double> n, MIN_PARALLEL_ELEMS)


cdef inline int _pass_team(int n_threads, int parts, Py_ssize_t n) noexcept nogil:
    return team(n_threads, parts, <double> n, MIN_PARALLEL_PASS)


cdef inline void _check(bint ok, str what) except *:
    if not ok:
        raise ValueError(f"cylstm._optim: inconsistent kernel arguments ({what})")


# ----------------------------------------------------------------------------------------
# SGD
# ----------------------------------------------------------------------------------------

cdef void _sgd_part(
    floating* p,                # (N,) INOUT parameters
    floating* buf,              # (N,) INOUT momentum buffer, or NULL when momentum == 0
    const floating* grad,       # (N,)
    floating neg_lr, floating momentum, floating wd,
    bint nesterov, bint first, Py_ssize_t lo, Py_ssize_t hi,
) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating g, d
    for i in range(lo, hi):
        g = grad[i]
        if wd != 0:
            g = g + wd * p[i]                           # (1)
        d = g
        if buf != NULL:
            if first:
                buf[i] = g                              # (2) first step: a copy of g
            else:
                buf[i] = buf[i] * momentum + g          # (2)
            d = g + momentum * buf[i] if nesterov else buf[i]   # (3)
        p[i] = p[i] + neg_lr * d                        # (4)


def sgd_step(
    *,
    floating[::1] param,        # (N,) INOUT
    floating[::1] momentum_buffer,  # (N,) INOUT, or None when momentum == 0
    const floating[::1] grad,   # (N,)
    double lr, double momentum, double weight_decay, bint nesterov, bint first,
    int n_parts, int n_threads,
):
    """SGD with momentum (dampening 0), Nesterov and L2 weight decay, in place.
    `first` marks the first step (the momentum buffer becomes a copy of g)."""
    cdef Py_ssize_t N = param.shape[0]
    cdef int parts = _parts(n_parts), q
    cdef floating* bp = NULL
    _check(grad.shape[0] == N and n_threads >= 1, "param/grad")
    if momentum != 0:
        _check(momentum_buffer is not None and momentum_buffer.shape[0] == N,
               "momentum_buffer")
        if N > 0:
            bp = &momentum_buffer[0]
    if N == 0:
        return
    with nogil:
        for q in prange(parts, schedule="static", num_threads=_team(n_threads, parts, N)):
            note_team()
            _sgd_part(&param[0], bp, &grad[0], <floating> -lr, <floating> momentum,
                      <floating> weight_decay, nesterov, first,
                      split(N, parts, q), split(N, parts, q + 1))


# ----------------------------------------------------------------------------------------
# Adam / AdamW
# ----------------------------------------------------------------------------------------

cdef void _adam_part(
    floating* p,                # (N,) INOUT parameters
    floating* m,                # (N,) INOUT first moment (exp_avg)
    floating* v,                # (N,) INOUT second moment (exp_avg_sq)
    const floating* grad,       # (N,)
    floating w1,                # 1 - beta1 (the lerp weight)
    floating beta2, floating w2,    # beta2, 1 - beta2
    floating bc2_sqrt, floating eps, floating neg_step_size,
    floating wd, floating decay,    # L2 term (Adam) or decoupled factor 1 - lr*wd (AdamW)
    bint decoupled, Py_ssize_t lo, Py_ssize_t hi,
) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating g, mi, vi, denom
    cdef bint small = w1 < <floating> 0.5
    cdef floating w1c = <floating> 1 - w1     # torch's lerp: opmath(1) - weight
    for i in range(lo, hi):
        g = grad[i]
        if decoupled:
            if wd != 0:
                p[i] = p[i] * decay                     # (1) AdamW
        elif wd != 0:
            g = g + wd * p[i]                           # (1) Adam
        mi = m[i]
        mi = mi + w1 * (g - mi) if small else g - (g - mi) * w1c     # (2)
        m[i] = mi
        vi = v[i] * beta2
        vi = vi + w2 * g * g                            # (3)
        v[i] = vi
        denom = sqrt(vi) / bc2_sqrt + eps               # (4)
        p[i] = p[i] + neg_step_size * mi / denom        # (5)


cdef void _adam_run(
    floating[::1] param, floating[::1] exp_avg, floating[::1] exp_avg_sq,
    const floating[::1] grad, double beta1, double beta2, double eps, double weight_decay,
    double step_size, double bias_correction2_sqrt, bint decoupled, double decay,
    int n_parts, int n_threads,
) except *:
    cdef Py_ssize_t N = param.shape[0]
    cdef int parts = _parts(n_parts), q
    _check(grad.shape[0] == N and exp_avg.shape[0] == N and exp_avg_sq.shape[0] == N
           and n_threads >= 1, "param/grad/exp_avg/exp_avg_sq")
    if N == 0:
        return
    with nogil:
        for q in prange(parts, schedule="static", num_threads=_team(n_threads, parts, N)):
            note_team()
            _adam_part(&param[0], &exp_avg[0], &exp_avg_sq[0], &grad[0],
                       <floating> (1 - beta1), <floating> beta2, <floating> (1 - beta2),
                       <floating> bias_correction2_sqrt, <floating> eps,
                       <floating> -step_size, <floating> weight_decay, <floating> decay,
                       decoupled, split(N, parts, q), split(N, parts, q + 1))


def adam_step(
    *,
    floating[::1] param,        # (N,) INOUT
    floating[::1] exp_avg,      # (N,) INOUT
    floating[::1] exp_avg_sq,   # (N,) INOUT
    const floating[::1] grad,   # (N,)
    double beta1, double beta2, double eps, double weight_decay,
    double step_size,           # lr / (1 - beta1^t)
    double bias_correction2_sqrt,   # (1 - beta2^t) ** 0.5
    int n_parts, int n_threads,
):
    """One Adam step with L2 weight decay (g += wd*p), in place; see the module
    docstring for the equations. The caller computes the bias-corrected scalars."""
    _adam_run(param, exp_avg, exp_avg_sq, grad, beta1, beta2, eps, weight_decay,
              step_size, bias_correction2_sqrt, False, 1.0, n_parts, n_threads)


def adamw_step(
    *,
    floating[::1] param,        # (N,) INOUT
    floating[::1] exp_avg,      # (N,) INOUT
    floating[::1] exp_avg_sq,   # (N,) INOUT
    const floating[::1] grad,   # (N,)
    double lr, double beta1, double beta2, double eps, double weight_decay,
    double step_size,           # lr / (1 - beta1^t)
    double bias_correction2_sqrt,   # (1 - beta2^t) ** 0.5
    int n_parts, int n_threads,
):
    """One AdamW step: p *= 1 - lr*wd (decoupled decay, factor rounded once from a
    double as torch does), then Adam without the L2 term; in place."""
    _adam_run(param, exp_avg, exp_avg_sq, grad, beta1, beta2, eps, weight_decay,
              step_size, bias_correction2_sqrt, True, 1 - lr * weight_decay,
              n_parts, n_threads)


# ----------------------------------------------------------------------------------------
# RMSprop (not centered)
# ----------------------------------------------------------------------------------------

cdef void _rmsprop_part(
    floating* p,                # (N,) INOUT parameters
    floating* v,                # (N,) INOUT square_avg
    floating* buf,              # (N,) INOUT momentum buffer, or NULL when momentum == 0
    const floating* grad,       # (N,)
    floating alpha, floating w, floating eps, floating neg_lr, floating momentum,
    floating wd, Py_ssize_t lo, Py_ssize_t hi,
) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating g, vi, avg
    for i in range(lo, hi):
        g = grad[i]
        if wd != 0:
            g = g + wd * p[i]                           # (1)
        vi = v[i] * alpha
        vi = vi + w * g * g                             # (2)
        v[i] = vi
        avg = sqrt(vi) + eps                            # (3)
        if buf != NULL:
            buf[i] = buf[i] * momentum + g / avg        # (4)
            p[i] = p[i] + neg_lr * buf[i]
        else:
            p[i] = p[i] + neg_lr * g / avg              # (4)


def rmsprop_step(
    *,
    floating[::1] param,        # (N,) INOUT
    floating[::1] square_avg,   # (N,) INOUT
    floating[::1] momentum_buffer,  # (N,) INOUT, or None when momentum == 0
    const floating[::1] grad,   # (N,)
    double lr, double alpha, double eps, double momentum, double weight_decay,
    int n_parts, int n_threads,
):
    """One RMSprop step (centered=False), in place; see the module docstring."""
    cdef Py_ssize_t N = param.shape[0]
    cdef int parts = _parts(n_parts), q
    cdef floating* bp = NULL
    _check(grad.shape[0] == N and square_avg.shape[0] == N and n_threads >= 1,
           "param/grad/square_avg")
    if momentum > 0:
        _check(momentum_buffer is not None and momentum_buffer.shape[0] == N,
               "momentum_buffer")
        if N > 0:
            bp = &momentum_buffer[0]
    if N == 0:
        return
    with nogil:
        for q in prange(parts, schedule="static", num_threads=_team(n_threads, parts, N)):
            note_team()
            _rmsprop_part(&param[0], &square_avg[0], bp, &grad[0], <floating> alpha,
                          <floating> (1 - alpha), <floating> eps, <floating> -lr,
                          <floating> momentum, <floating> weight_decay,
                          split(N, parts, q), split(N, parts, q + 1))


# ----------------------------------------------------------------------------------------
# Global norm (for clipping) and scaling
# ----------------------------------------------------------------------------------------

cdef double _sumsq_part(const floating* x, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    """sum(x[lo:hi]^2) in float64: eight interleaved accumulators (lane k takes the
    elements lo + 8j + k), combined pairwise in a fixed order. Eight independent
    chains instead of one keep the adds pipelined; the order is still fixed."""
    cdef double a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0
    cdef double t
    cdef Py_ssize_t i = lo
    while i + 8 <= hi:
        a0 += <double> x[i] * <double> x[i]
        a1 += <double> x[i + 1] * <double> x[i + 1]
        a2 += <double> x[i + 2] * <double> x[i + 2]
        a3 += <double> x[i + 3] * <double> x[i + 3]
        a4 += <double> x[i + 4] * <double> x[i + 4]
        a5 += <double> x[i + 5] * <double> x[i + 5]
        a6 += <double> x[i + 6] * <double> x[i + 6]
        a7 += <double> x[i + 7] * <double> x[i + 7]
        i += 8
    while i < hi:
        t = <double> x[i]
        a0 += t * t
        i += 1
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


def sumsq(
    const floating[::1] x,      # (N,)
    int n_parts, int n_threads,
):
    """sum(x^2) as a Python float, accumulated in float64 per fixed part and summed in
    part order: the same bits for any thread count. NaN/Inf propagate."""
    cdef Py_ssize_t N = x.shape[0]
    cdef int parts = _parts(n_parts), q
    cdef double part_sums[_MAX_PARTS]
    cdef double total = 0
    _check(n_threads >= 1, "n_threads")
    if N == 0:
        return 0.0
    with nogil:
        for q in prange(parts, schedule="static", num_threads=_pass_team(n_threads, parts, N)):
            note_team()
            part_sums[q] = _sumsq_part(&x[0], split(N, parts, q), split(N, parts, q + 1))
        for q in range(parts):
            total = total + part_sums[q]
    return total


cdef void _scale_part(floating* x, floating c, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(lo, hi):
        x[i] = x[i] * c


def scale(
    floating[::1] x,            # (N,) INOUT
    double factor,              # rounded once to x's dtype
    int n_parts, int n_threads,
):
    """x *= factor, in place."""
    cdef Py_ssize_t N = x.shape[0]
    cdef int parts = _parts(n_parts), q
    _check(n_threads >= 1, "n_threads")
    if N == 0:
        return
    with nogil:
        for q in prange(parts, schedule="static", num_threads=_pass_team(n_threads, parts, N)):
            note_team()
            _scale_part(&x[0], <floating> factor, split(N, parts, q), split(N, parts, q + 1))
