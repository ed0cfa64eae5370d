"""The streaming step of LSTM.step: T = 1, every layer in one compiled call, the weights
read in place. Dimensions and equation numbers as in _lstm.pyx (and docs/math.md):
    B  batch rows   I  input features   H  hidden units   G = 4H   P  projection (0: none)
    Hp = P if P > 0 else H
Per layer: (1) z = (x W_ih^T + b) + h W_hh^T, (2) the gates, (3) c = f c + i g,
(4) m = o tanh(c), (5) h = m W_hr^T with a projection, else h = m.

Parallel structure: the hidden units of a layer are cut into n_parts fixed parts (the
machine's cores, from _parallel.pxd's rules), each computing the rows of the four gates
that belong to its units, so a thread owns its slice of the weights; parts never depend
on the thread count, so results are bitwise the same for any number of threads.
"""

from cython cimport floating
from cython.parallel cimport prange
from cpython.buffer cimport PyBUF_C_CONTIGUOUS, PyBUF_FORMAT, PyBuffer_Release, PyObject_GetBuffer
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.string cimport memcpy

from cylstm._blas cimport gemm
from cylstm._isa cimport on_level_change
from cylstm._parallel cimport (MIN_HELPER_MACS, MIN_PARALLEL_MACS, blas_single_enter,
                               blas_single_exit, fallback_pin, note_team, split, team)


from cylstm._kernels cimport (cy_act_f32, cy_act_select, cy_sigmoid_add_f64,
                              cy_tanh_add_f64, cy_cell_fns, cy_cell_select,
                              cy_dot_rows_fn, cy_dot_select)

cdef extern from "_helper.h" nogil:
    ctypedef void (*cy_part_fn)(const void* job, int part, int helper) noexcept nogil
    void cy_helper_run(const void* job, size_t size, int n_parts, cy_part_fn fn,
                       cy_part_fn collect, int reverse)
    void cy_helper_quiesce()
    int cy_helper_available()
    void cy_helper_set_delay(long long ns)
    void cy_helper_set_stay_awake(int on)
    ctypedef struct cy_helper_t:
        unsigned long long helped, taken_back, alone
        long long caller_ns, wait_ns
        int started
    cy_helper_t cy_helper_g

cdef cy_act_f32 _act
cdef cy_cell_fns _cell
cdef cy_dot_rows_fn _dot = NULL            # NULL at level 0: BLAS


cdef void _use_level(int level) noexcept nogil:
    global _act, _cell, _dot
    _act = cy_act_select(level)
    _cell = cy_cell_select(level)
    _dot = cy_dot_select(level)


on_level_change(_use_level)


def _kernel_levels():
    """Test hook: the level of each per-level kernel this module calls now."""
    levels = {}
    for lvl in range(3):
        if cy_act_select(lvl).sigmoid_add == _act.sigmoid_add:
            levels["activations"] = lvl
        if cy_cell_select(lvl).cell_f32 == _cell.cell_f32:
            levels["cell"] = lvl
        if cy_dot_select(lvl) == _dot:
            levels.setdefault("dot", lvl)       # level 0 has none (BLAS)
    return levels


cdef inline void _check(bint ok, str what) except *:
    if not ok:
        raise ValueError(f"cylstm._step: inconsistent shapes in kernel arguments ({what})")


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
    # (1) as (x W_ih^T + b) + h W_hh^T, reading the weights in place (the sequence
    # forward sums x and h in one product on packed weights, so the two agree to
    # rounding; docs/math.md); BLAS gets whole rows [0, G)
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
            _act.sigmoid_add(zb + u0, hz + <Py_ssize_t> b * G + u0, n)
            _act.sigmoid_add(zb + H + u0, hz + <Py_ssize_t> b * G + H + u0, n)
            _act.tanh_add(zb + 2 * H + u0, hz + <Py_ssize_t> b * G + 2 * H + u0, n)
            _act.sigmoid_add(zb + 3 * H + u0, hz + <Py_ssize_t> b * G + 3 * H + u0, n)
        else:
            cy_sigmoid_add_f64(zb + u0, hz + <Py_ssize_t> b * G + u0, n)
            cy_sigmoid_add_f64(zb + H + u0, hz + <Py_ssize_t> b * G + H + u0, n)
            cy_tanh_add_f64(zb + 2 * H + u0, hz + <Py_ssize_t> b * G + 2 * H + u0, n)
            cy_sigmoid_add_f64(zb + 3 * H + u0, hz + <Py_ssize_t> b * G + 3 * H + u0, n)
        if floating is float:                                              # (3) (4)
            _cell.cell_f32(cb + u0, mb + u0, NULL, zb + u0, n, H)
        else:
            _cell.cell_f64(cb + u0, mb + u0, NULL, zb + u0, n, H)


# A step reads every weight once (2 MiB at H = I = 256 float32): with few rows it is
# bound by memory, and one core's L2 cannot hold it all. Split by hidden units, each
# thread reads only its slice, which stays in its own L2 from one step to the next.
# An OpenMP team splits it from MIN_PARALLEL_MACS (_parallel.pxd) on, like everything
# else. Smaller steps (B = 1, I = H = 256 is 0.5 M multiply-adds) share their parts with
# the helper thread below instead: with another process on the other core, an OpenMP
# region waits for the scheduler to run its second thread (a step then takes
# milliseconds instead of ~10 us), the helper is never waited for.

cdef struct StepLayer:        # one layer's arrays, held alive by the StepRunner
    const void* w_ih            # (G, I_l), I_l = I for layer 0, else Hp
    const void* w_hh            # (G, Hp)
    const void* b_ih            # (G,) or NULL (no bias)
    const void* b_hh            # (G,) or NULL
    const void* w_hr            # (P, H) or NULL (no projection)
    void* y                     # (B, Hp) OUT
    void* h                     # (B, Hp) INOUT
    void* c                     # (B, H) INOUT


cdef inline void _step_part(floating* m, const StepLayer* lp, floating* z, floating* hz,
                            floating* bsum, const floating* inp, const floating* h,
                            int B, int I, int H, int Hp, int n_parts, int p,
                            bint blas, bint back) noexcept nogil:
    """Part p of n_parts of a layer's hidden units."""
    if blas:
        blas_single_enter()
    _step_units(m, <floating*> lp.c, z, hz, bsum, inp, h, <const floating*> lp.w_ih,
                <const floating*> lp.w_hh, <const floating*> lp.b_ih, <const floating*> lp.b_hh,
                B, I, H, Hp, split(H, n_parts, p), split(H, n_parts, p + 1), back)
    if blas:
        blas_single_exit()


# ---- The helper thread (_helper.h) ------------------------------------------------------
#
# Below MIN_PARALLEL_MACS a step's parts go to the caller and to one helper thread that
# the caller never waits for (it takes a late part back and computes it itself), so a
# B = 1 step uses two cores without the stall of an OpenMP barrier on a busy machine.
# The helper computes into its own buffers (z2, hz2, bsum2, m2, c2) and the caller copies
# a finished part's units of m and c out of them (_helper_collect). Every buffer a job
# names belongs to the StepRunner, which waits for the helper before freeing them.

cdef struct StepJob:          # one layer of one step, copied by value for the helper
    StepLayer layer
    const float* inp            # (B, I) the layer's input (a runner buffer, never x_t)
    float* m                    # (B, H) OUT, the caller's
    float* z                    # (B, G) the caller's scratch
    float* hz
    float* bsum                 # (G,)
    float* z2                   # (B, G) the helper's scratch
    float* hz2
    float* bsum2                # (G,)
    float* m2                   # (B, H) the helper's m and c
    float* c2
    int nB, nI, nH, nHp, n_parts      # B, I (of this layer), H, Hp
    bint back


cdef void _helper_part(const void* job, int p, int helper) noexcept nogil:
    """Part p of a StepJob: into the layer's m and c (caller), or into m2 and c2 from a
    copy of c's units (helper)."""
    cdef const StepJob* j = <const StepJob*> job
    cdef int H = j.nH, u0 = split(H, j.n_parts, p), u1 = split(H, j.n_parts, p + 1), b
    cdef float* c = <float*> j.layer.c
    if not helper:
        _step_units(j.m, c, j.z, j.hz, j.bsum, j.inp, <const float*> j.layer.h,
                    <const float*> j.layer.w_ih, <const float*> j.layer.w_hh,
                    <const float*> j.layer.b_ih, <const float*> j.layer.b_hh,
                    j.nB, j.nI, H, j.nHp, u0, u1, j.back)
        return
    for b in range(j.nB):
        memcpy(j.c2 + <Py_ssize_t> b * H + u0, c + <Py_ssize_t> b * H + u0,
               (u1 - u0) * sizeof(float))
    _step_units(j.m2, j.c2, j.z2, j.hz2, j.bsum2, j.inp, <const float*> j.layer.h,
                <const float*> j.layer.w_ih, <const float*> j.layer.w_hh,
                <const float*> j.layer.b_ih, <const float*> j.layer.b_hh,
                j.nB, j.nI, H, j.nHp, u0, u1, j.back)


cdef void _helper_collect(const void* job, int p, int helper) noexcept nogil:
    """Copy part p's units of m and c from the helper's buffers into the layer's."""
    cdef const StepJob* j = <const StepJob*> job
    cdef int H = j.nH, u0 = split(H, j.n_parts, p), u1 = split(H, j.n_parts, p + 1), b
    cdef Py_ssize_t o
    for b in range(j.nB):
        o = <Py_ssize_t> b * H + u0
        memcpy(j.m + o, j.m2 + o, (u1 - u0) * sizeof(float))
        memcpy(<float*> j.layer.c + o, j.c2 + o, (u1 - u0) * sizeof(float))


# 0: never (every part on the caller), 1: below MIN_PARALLEL_MACS from MIN_HELPER_MACS
# on, 2: every float32 step with two parts or more (test hook)
cdef int _helper_mode = 1


def _set_helper_mode(int mode):
    """Test/benchmark hook: 0 never use the step's helper thread, 1 by work size (the
    default), 2 always (where the step splits into parts and may use 2 threads), with a
    helper that never naps, so that every job goes through the hand-over.
    Returns the previous mode."""
    global _helper_mode
    if mode not in (0, 1, 2):
        raise ValueError(f"mode must be 0, 1 or 2, got {mode}")
    previous = _helper_mode
    _helper_mode = mode
    cy_helper_set_stay_awake(mode == 2)
    return previous


def _helper_stats():
    """Test/benchmark hook: parts the helper computed, parts the caller took back from
    it, jobs run without it (it napped, sat out the last jobs, served another caller, or
    could not start), and
    the caller's time in its own parts and after them (waiting, taking back, copying)."""
    return {"helped": cy_helper_g.helped, "taken_back": cy_helper_g.taken_back,
            "alone": cy_helper_g.alone, "caller_ns": cy_helper_g.caller_ns,
            "wait_ns": cy_helper_g.wait_ns, "started": cy_helper_g.started,
            "available": bool(cy_helper_available())}


def _set_helper_delay(long long ns):
    """Test hook: the helper sleeps ns nanoseconds in every part it takes (a helper the
    OS does not schedule); 0 turns it off."""
    cy_helper_set_delay(ns)


cdef void _step_layers(
    const StepLayer* layers,    # (L,) each layer's arrays
    floating* z,                # (B, G) scratch
    floating* hz,               # (B, G) scratch
    floating* bsum,             # (G,) scratch
    floating* mbuf,             # (B, H) scratch (P > 0 only)
    floating* xbuf,             # (B, I) a copy of x for the helper
    floating* helper_bufs,      # (2 B G + G + 2 B H,) z2, hz2, bsum2, m2, c2
    const floating* x,          # (B, I) layer 0's input
    int L, int B, int I, int H, int P, int n_parts, int n_threads, bint back,
) noexcept nogil:
    """Every layer of one step (1)-(5)."""
    cdef int Hp = P if P > 0 else H, layer, p, pp, Il, nt, G = 4 * H
    cdef bint blas = True, helper
    cdef const StepLayer* lp
    cdef floating* y
    cdef floating* h
    cdef floating* m
    cdef const floating* inp = x
    cdef double work
    cdef StepJob job
    if floating is float:
        blas = _dot == NULL
    for layer in range(L):
        lp = layers + layer
        y = <floating*> lp.y
        h = <floating*> lp.h
        m = mbuf if P > 0 else y
        Il = I if layer == 0 else Hp
        if blas:
            n_parts = 1             # BLAS: one call over all rows, as the sequence forward
        work = <double> B * 4 * H * (Il + Hp)
        nt = team(n_threads, n_parts, work, MIN_PARALLEL_MACS)
        helper = False
        if floating is float:
            if not blas and n_parts > 1 and _helper_mode != 0:
                if _helper_mode == 2:
                    helper = team(n_threads, n_parts, 1, 0) > 1
                else:
                    helper = nt == 1 and team(n_threads, n_parts, work, MIN_HELPER_MACS) > 1
        if helper:
            if floating is float:
                if layer == 0:      # the helper may still read it after this call
                    memcpy(xbuf, x, <size_t> B * I * sizeof(float))
                    inp = xbuf
                job.layer = lp[0]
                job.inp = inp
                job.m, job.z, job.hz, job.bsum = m, z, hz, bsum
                job.z2 = helper_bufs
                job.hz2 = job.z2 + <Py_ssize_t> B * G
                job.bsum2 = job.hz2 + <Py_ssize_t> B * G
                job.m2 = job.bsum2 + G
                job.c2 = job.m2 + <Py_ssize_t> B * H
                job.nB, job.nI, job.nH, job.nHp = B, Il, H, Hp
                job.n_parts, job.back = n_parts, back
                cy_helper_run(&job, sizeof(StepJob), n_parts, _helper_part, _helper_collect,
                              back)
        elif nt > 1:
            for p in prange(n_parts, schedule="static", num_threads=nt):
                note_team()
                _step_part(m, lp, z, hz, bsum, inp, h, B, Il, H, Hp, n_parts, p, blas, back)
        else:                   # no OpenMP region: even a 1-thread one allocates a team
            for pp in range(n_parts):
                p = n_parts - 1 - pp if back else pp
                _step_part(m, lp, z, hz, bsum, inp, h, B, Il, H, Hp, n_parts, p, blas, back)
        if P > 0:                                                          # (5)
            if blas:
                blas_single_enter()
            _rows_wt(B, P, H, mbuf, H, <const floating*> lp.w_hr, y, P)
            if blas:
                blas_single_exit()
        memcpy(h, y, <size_t> B * Hp * sizeof(floating))
        inp = y


# Successive steps read the weights in alternating order, so that the blocks read last
# by one step, still in L2, are read first by the next (with 2 MiB of weights in a 2 MiB
# L2, one order always evicts what the next step reads first). Each element is computed
# the same way in either order. Alternating makes a B = 1, I = H = 256 float32 step on
# one thread about a fifth faster.
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
    cdef StepLayer* layers
    cdef int nL, nB, nI, nH, nP, f32
    cdef bint back              # read this step's weight blocks in reverse order
    cdef void* z                # (B, G) scratch
    cdef void* hz               # (B, G) scratch
    cdef void* bsum             # (G,) scratch
    cdef void* mbuf             # (B, H) scratch
    cdef void* xbuf             # (B, I) x's copy for the helper thread
    cdef void* helper_bufs      # (2 B G + G + 2 B H,) the helper thread's buffers

    def __cinit__(self):
        self.layers = NULL

    def __dealloc__(self):
        # a part the helper thread computes late may still read this runner's arrays
        cy_helper_quiesce()
        if self.layers != NULL:
            PyMem_Free(self.layers)

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
        self.layers = <StepLayer*> PyMem_Malloc(L * sizeof(StepLayer))
        if self.layers == NULL:
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
            addr = [0 if w is None else w.ctypes.data for w in ws]
            self.layers[layer].w_ih = <const void*> <size_t> addr[0]
            self.layers[layer].w_hh = <const void*> <size_t> addr[1]
            self.layers[layer].b_ih = <const void*> <size_t> addr[2]
            self.layers[layer].b_hh = <const void*> <size_t> addr[3]
            self.layers[layer].w_hr = <const void*> <size_t> addr[4]
            self.layers[layer].y = <void*> <size_t> y_all[layer].ctypes.data
            self.layers[layer].h = <void*> <size_t> h_all[layer].ctypes.data
            self.layers[layer].c = <void*> <size_t> c_all[layer].ctypes.data
        self.out = y_all[L - 1, 0]
        scratch = [np.empty(n, dtype) for n in (B * G, B * G, G, B * H, B * I,
                                                2 * B * G + G + 2 * B * H)]
        self.keep += scratch
        addr = [<size_t> a.ctypes.data for a in scratch]
        self.z, self.hz = <void*> <size_t> addr[0], <void*> <size_t> addr[1]
        self.bsum, self.mbuf = <void*> <size_t> addr[2], <void*> <size_t> addr[3]
        self.xbuf, self.helper_bufs = <void*> <size_t> addr[4], <void*> <size_t> addr[5]
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
        pin = fallback_pin()         # BLAS held to one thread by threadpoolctl, or None
        if pin is not None:
            pin.__enter__()
        try:
            if not (view.itemsize == itemsize and view.format != NULL
                    and view.format[0] == fmt and view.format[1] == 0
                    and view.ndim == 2 and view.shape[0] == self.nB
                    and view.shape[1] == self.nI):
                return NotImplemented
            with nogil:
                if self.f32:
                    _step_layers(self.layers, <float*> self.z, <float*> self.hz,
                                 <float*> self.bsum, <float*> self.mbuf,
                                 <float*> self.xbuf, <float*> self.helper_bufs,
                                 <const float*> view.buf, self.nL, self.nB, self.nI,
                                 self.nH, self.nP, n_parts, n_threads, self.back)
                else:
                    _step_layers(self.layers, <double*> self.z, <double*> self.hz,
                                 <double*> self.bsum, <double*> self.mbuf,
                                 <double*> self.xbuf, <double*> self.helper_bufs,
                                 <const double*> view.buf, self.nL, self.nB, self.nI,
                                 self.nH, self.nP, n_parts, n_threads, self.back)
        finally:
            if pin is not None:
                pin.__exit__(None, None, None)
            PyBuffer_Release(&view)
        self.back = _step_snake and not self.back
        return self.out


