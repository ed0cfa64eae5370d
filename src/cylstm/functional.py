"""Array-level LSTM layer: validation at the edge, layout, workspaces, dispatch.

The same functions, with the same arguments, as ``cylstm.reference`` (the NumPy twin),
computed by the compiled kernels in ``cylstm._lstm``. One layer, one direction, the
whole sequence, time-major:

    y, h_n, c_n, cache = lstm_layer_forward(x, w_ih, w_hh, b_ih, b_hh, h0, c0,
                                            lengths=None, reverse=False, training=True)
    dx, dh0, dc0 = lstm_layer_backward(cache, dy, dh_n, dc_n,
                                       dw_ih=..., dw_hh=..., db_ih=..., db_hh=...)

Shapes: x (T, B, I); w_ih (4H, I); w_hh (4H, H); b_ih, b_hh (4H,); h0, c0 (B, H);
lengths (B,) ints in 1..T; y, dy (T, B, H). Gate order [i | f | g | o] (PyTorch's).
``recurrent_mask`` (B, H) or None: recurrent dropout, the product of (1) reads
h_{t-1} * recurrent_mask (docs/math.md, "Recurrent dropout and weight dropout"); the
caller draws and scales it, and it applies whenever given (training or not).

Dtypes: the weights decide (float32 or float64, all the same). Inputs of another real
dtype (ints, bools, float16, the other float) are converted to it; complex, object and
string arrays are rejected. Non-contiguous inputs are copied to C order.

Backward *accumulates* (+=) into the gradient buffers ``dw_ih``, ``dw_hh``, ``db_ih``,
``db_hh``, which must be C-contiguous arrays of the weights' dtype and shapes; zero
them before the first backward (``LSTM.zero_grad()`` does). ``x`` and ``y`` are kept
by reference in the cache: do not modify them between forward and backward.
"""

import math

import numpy as np

from . import _lstm, _ops
from ._check import FLOATS as _FLOATS
from ._check import checkpoint_every as _checkpoint_every
from ._check import real_array
from ._check import shape_str as _shape
from . import _threads
from ._threads import N_PARTS, PACK_MIN_STEPS, blas_single_threaded, get_num_threads

__all__ = ["lstm_layer_forward", "lstm_layer_backward", "LayerCache", "Workspace",
           "Tokens", "token_table", "segment_steps", "block_steps"]

_INT32_MAX = 2**31 - 1


# ---- validation -----------------------------------------------------------------------------

def _as_array(a, name, dtype, shape):
    """a as a C-contiguous `dtype` array of exactly `shape` (ints may be None = any)."""
    # the common case, checked without building messages or a generator: this runs a
    # few times in every layer call, which for a short sequence costs as much as a step
    if type(a) is np.ndarray and a.dtype == dtype and a.flags.c_contiguous:
        got = a.shape
        if len(got) == len(shape):
            for g, exp in zip(got, shape):
                if exp is not None and g != exp:
                    break
            else:
                return a
    a = real_array(a, name)
    want = "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"
    if a.ndim != len(shape):
        raise ValueError(f"{name} must have shape {want} ({len(shape)}-D), got {_shape(a)}")
    for got, exp in zip(a.shape, shape):
        if exp is not None and got != exp:
            raise ValueError(f"{name} must have shape {want}, got {_shape(a)}")
    return np.ascontiguousarray(a, dtype=dtype)


def _row_strides(a):
    """(st, sb): the strides in elements of the rows a[t, b, :] of a 3-D array, or None
    when its last axis is not contiguous. A length-1 axis's stride never matters (NumPy
    leaves it arbitrary); it is taken as C-contiguous's."""
    T, B, n = a.shape
    s = a.itemsize
    if (n > 1 and a.strides[2] != s) or (T > 1 and a.strides[0] % s) or (B > 1 and a.strides[1] % s):
        return None
    return (a.strides[0] // s if T > 1 else B * n), (a.strides[1] // s if B > 1 else n)


def _as_rows(x, name, dtype, I, lead=(None, None)):
    """x (T, B, I) of `dtype` as it is when its last axis is contiguous (a transposed
    batch-first array, say), else as a C-contiguous copy: what the inference kernel and
    backward's dy read in place. ``lead``: the two leading sizes it must have (None:
    any)."""
    if (type(x) is np.ndarray and x.dtype == dtype and x.ndim == 3 and x.shape[2] == I
            and (lead[0] is None or x.shape[0] == lead[0])
            and (lead[1] is None or x.shape[1] == lead[1])
            and _row_strides(x) is not None):
        return x
    return _as_array(x, name, dtype, tuple(lead) + (I,))


def _rows_disjoint(a):
    """Whether the rows a[t, b, :] of a 3-D array never overlap (the smaller stride spans
    a row, the larger all rows of the smaller); False when its last axis is not
    contiguous."""
    T, B, n = a.shape
    strides = _row_strides(a)
    if strides is None:
        return False
    st, sb = abs(strides[0]), abs(strides[1])
    if T == 1:
        return B == 1 or sb >= n
    if B == 1:
        return st >= n
    return st >= n and sb >= T * st if st <= sb else sb >= n and st >= B * sb


def _weight_dtype(w_ih, w_hh):
    for name, w in (("w_ih", w_ih), ("w_hh", w_hh)):
        if not isinstance(w, np.ndarray):
            raise TypeError(f"{name} must be a numpy array, got {type(w).__name__}")
        if w.dtype not in _FLOATS:
            raise TypeError(f"{name} must be float32 or float64, got dtype {w.dtype}")
    if w_ih.dtype != w_hh.dtype:
        raise TypeError(f"w_ih and w_hh must have one dtype, got {w_ih.dtype} and {w_hh.dtype}")
    return w_ih.dtype


def _lengths(lengths, T, B):
    """lengths as an int32 (B,) array with values in 1..T (all T when None)."""
    if lengths is None:
        return np.full(B, T, dtype=np.int32)
    try:
        lengths = np.asarray(lengths)
    except Exception as e:         # ragged nested lists
        raise TypeError(f"lengths must be a ({B},) array of integers, got {e}") from None
    if lengths.dtype.kind not in "iu":
        raise TypeError(f"lengths must be integers, got dtype {lengths.dtype}")
    if lengths.shape != (B,):
        raise ValueError(f"lengths must have shape ({B},) (one per sequence), got {_shape(lengths)}")
    if B and (lengths.min() < 1 or lengths.max() > T):
        raise ValueError(
            f"lengths must be in 1..{T} (T), got values in {lengths.min()}..{lengths.max()}"
        )
    return lengths.astype(np.int32)


def _check_weights(w_ih, w_hh, b_ih, b_hh, w_hr):
    """Validated (dtype, H, Hp, w_ih, w_hh, bias = b_ih + b_hh or None, w_hr or None)."""
    # The common case (a model's own weights: C-contiguous, one float dtype, biases,
    # no projection) in straight-line checks: this runs in every layer call, and for a
    # short sequence the general path below costs as much as several steps.
    if (w_hr is None and type(w_ih) is np.ndarray and type(w_hh) is np.ndarray
            and type(b_ih) is np.ndarray and type(b_hh) is np.ndarray):
        dtype = w_hh.dtype
        sh, si = w_hh.shape, w_ih.shape
        if (dtype in _FLOATS and w_ih.dtype == dtype and b_ih.dtype == dtype
                and b_hh.dtype == dtype and len(sh) == 2 and len(si) == 2
                and sh[1] >= 1 and si[1] >= 1 and sh[0] == 4 * sh[1] and si[0] == sh[0]
                and b_ih.shape == (sh[0],) and b_hh.shape == (sh[0],)
                and w_ih.flags.c_contiguous and w_hh.flags.c_contiguous
                and b_ih.flags.c_contiguous and b_hh.flags.c_contiguous):
            return dtype, sh[1], sh[1], w_ih, w_hh, b_ih + b_hh, None
    dtype = _weight_dtype(w_ih, w_hh)
    if w_hr is None:
        if w_hh.ndim != 2 or w_hh.shape[0] != 4 * w_hh.shape[1] or w_hh.shape[1] < 1:
            raise ValueError(f"w_hh must have shape (4H, H) with H >= 1, got {_shape(w_hh)}")
        H = Hp = w_hh.shape[1]
    else:
        if not isinstance(w_hr, np.ndarray) or w_hr.dtype != dtype:
            raise TypeError(f"w_hr must be a numpy array of the weights' dtype {dtype}")
        if w_hr.ndim != 2 or w_hr.shape[0] < 1 or w_hr.shape[1] < 1:
            raise ValueError(f"w_hr must have shape (P, H) with P, H >= 1, got {_shape(w_hr)}")
        H, Hp = w_hr.shape[1], w_hr.shape[0]
        if Hp >= H:
            raise ValueError(f"w_hr (P, H) needs P < H (as PyTorch's proj_size), got {_shape(w_hr)}")
        if w_hh.shape != (4 * H, Hp):
            raise ValueError(f"w_hh must have shape (4H, P) = ({4 * H}, {Hp}) with "
                             f"w_hr {_shape(w_hr)}, got {_shape(w_hh)}")
        w_hr = np.ascontiguousarray(w_hr)
    w_ih = _as_array(w_ih, "w_ih", dtype, (4 * H, None))
    if w_ih.shape[1] < 1:      # the kernels take &x[0, 0, 0]: an empty axis reads out of bounds
        raise ValueError(f"w_ih must have shape (4H, I) with I >= 1, got {_shape(w_ih)}")
    w_hh = np.ascontiguousarray(w_hh)
    if (b_ih is None) != (b_hh is None):
        raise ValueError("b_ih and b_hh must both be given or both be None")
    bias = None
    if b_ih is not None:
        b_ih = _as_array(b_ih, "b_ih", dtype, (4 * H,))
        b_hh = _as_array(b_hh, "b_hh", dtype, (4 * H,))
        bias = b_ih + b_hh   # added once, to each step's products
    return dtype, H, Hp, w_ih, w_hh, bias, w_hr


def _wpack(ws, dtype, n, T, name="wpack"):
    """Scratch of n elements of the weights' dtype for the weights in the form the
    per-step products read, made once per call (packed, see _rgemm.h), or None (short
    sequences, or nothing to pack: BLAS reads the weights in place)."""
    if T < PACK_MIN_STEPS or not n:
        return None
    return ws.get_at_least(name, n, dtype)


#: True or False forces the forward's input path (tests); None follows input_in_step's rule.
_FORCE_INPUT_IN_STEP = None


def input_in_step(I, Hp, H, dtype, B):
    """Whether the forward computes the input's product inside each step or before the
    loop, for B sequences (see _lstm.input_in_step: [W_ih | W_hh] within
    _threads.STEP_WEIGHT_BYTES, a core's L2 on most machines, and chunks of 8 rows or
    more or small weights). The two agree to rounding; each is exact
    under checkpointing and thread counts (the rule reads the shapes and the machine,
    never the thread count)."""
    if _FORCE_INPUT_IN_STEP is not None:
        return _FORCE_INPUT_IN_STEP
    rows = -(-B // min(B, N_PARTS))            # the largest batch chunk of a thread
    return _lstm.input_in_step(I, Hp, 4 * H, np.dtype(dtype).itemsize,
                               _threads.STEP_WEIGHT_BYTES, rows)


def _piece_pack(ws, args, I, H, dtype, B, in_step):
    """Scratch for W_ih^T packed, with which the kernel projects one sequence's input
    in pieces (_lstm.pyx, "B = 1 inference": beside the loop in inference, before it in
    training, the same bits either way), or None: B > 1, the input's product in the
    step, weights not packed (short sequences, no kernel), recurrent dropout. Every
    forward of a B = 1 layer passes it (training, inference, a checkpointed segment's
    recomputation), so that they all project alike."""
    if B != 1 or in_step or args["wpack"] is None or args["rmask"] is not None:
        return None
    n = _lstm.pack_size(I, 4 * H, dtype)
    return ws.get_at_least("ipack", n, dtype) if n else None


def _forward_scratch(ws, dtype, T, B, I, H, Hp, proj, fused, wpack="wpack"):
    """The forward kernel's scratch: each step's rows [x_t | h_{t-1}] (xh; h_{t-1} alone
    when not fused), their products (hz), the projection's buffers and the weights
    packed for the step's product ([W_ih | W_hh]^T or W_hh^T, and W_hr^T)."""
    return dict(
        xh=ws.get("xh", (B, (I if fused else 0) + Hp), dtype),
        hz=ws.get("hz", (B, 4 * H), dtype),
        mbuf=ws.get("mbuf", (B, H), dtype) if proj else None,
        hp=ws.get("hp", (B, Hp), dtype) if proj else None,
        wpack=_wpack(ws, dtype, _lstm.forward_pack_size(I, Hp, 4 * H, dtype, fused)
                     + (_lstm.pack_size(H, Hp, dtype) if proj else 0), T, name=wpack),
        fused=fused,
    )


def _kernel_bias(ws, bias, H, dtype):
    """b_ih + b_hh, or zeros for a layer without bias (the kernel adds one either way)."""
    if bias is not None:
        return bias
    zeros = ws.get("bias0", (4 * H,), dtype)
    zeros[...] = 0
    return zeros


def _workspace_arg(workspace):
    if workspace is None:
        return Workspace()
    if not isinstance(workspace, Workspace):
        raise TypeError(f"workspace must be a cylstm.functional.Workspace or None, "
                        f"got {type(workspace).__name__}")
    return workspace


# ---- workspaces and cache -------------------------------------------------------------------

class Workspace:
    """Scratch arrays reused across calls of the same shape (one per layer and direction).

    ``get(name, shape, dtype)`` returns the array it gave last time for that name when
    shape and dtype match, else a new one. Kernels allocate nothing; the caller owns this.
    """

    def __init__(self):
        self._arrays = {}

    def get(self, name, shape, dtype):
        a = self._arrays.get(name)
        if a is None or a.shape != tuple(shape) or a.dtype != dtype:
            a = np.empty(shape, dtype=dtype)
            self._arrays[name] = a
        return a

    def full_lengths(self, T, B):
        """lengths = T for all B sequences, int32, read-only (the kernels only read it, a
        layer cache may keep it): made once per shape instead of at every call."""
        a = self._arrays.get("lengths_full")
        if a is None or a.shape != (B,) or a[0] != T:
            a = np.full(B, T, dtype=np.int32)
            a.flags.writeable = False
            self._arrays["lengths_full"] = a
        return a

    def get_at_least(self, name, n, dtype):
        """The first n elements of a 1-D scratch that only grows: callers whose sizes
        differ (forward's and backward's packed weights) share it without reallocating
        it at every call."""
        a = self._arrays.get(name)
        if a is None or a.ndim != 1 or a.shape[0] < n or a.dtype != dtype:
            a = np.empty((n,), dtype=dtype)
            self._arrays[name] = a
        return a[:n]

    def clear(self):
        self._arrays.clear()

    @property
    def nbytes(self):
        return sum(a.nbytes for a in self._arrays.values())


class LayerCache:
    """What ``lstm_layer_backward`` needs from one training-mode forward.

    Per-step arrays are in loop-step order (docs/math.md, "Loop steps and time"): gates
    (T, B, 4H) activated [i|f|g|o]; c, tc (T, B, H) c_t and tanh(c_t); m (T, B, H)
    o * tanh(c_t) with a projection (else None); hprev (T, B, Hp) the h_{t-1} the
    recurrent product read (masked with recurrent dropout); xg (T, B, I) the input in
    loop-step order (reverse only), else x (T, B, I) by reference. c0 (B, H); rmask
    (B, Hp) or None; the weights, lengths (B,) int32 and the direction.

    Checkpointed (``segment`` = k steps): gates, c, tc, m, hprev and xg are None; h_ck
    (ceil(T/k), B, Hp) and c_ck (ceil(T/k), B, H) hold the state entering each segment,
    from which backward recomputes the segment's caches just before it needs them.
    Token input (``tokens``, a Tokens): x and xg are None; token_table (V, 4H) the
    projected table the gates were filled from (recomputed segments read it again).
    """

    __slots__ = ("x", "xg", "gates", "c", "tc", "m", "hprev", "c0", "w_ih", "w_hh", "w_hr",
                 "bias", "lengths", "reverse", "dtype", "rmask", "segment", "h_ck", "c_ck",
                 "shape", "tokens", "token_table")

    def __init__(self, **kw):
        for k in self.__slots__:
            setattr(self, k, kw.pop(k, None))
        if kw:
            raise TypeError(f"unknown LayerCache fields {sorted(kw)}")


def block_steps(B):
    """Loop steps per time block of a batch of B sequences: backward computes the
    weight gradients and dx block by block (cylstm._lstm), and checkpoint segments are
    whole blocks."""
    return _lstm.block_steps(B)


class Tokens:
    """Token input of a layer: the ids an Embedding looks up, and that Embedding's table.

    ids (T, B) int32, time-major, C-contiguous, in 0..V-1 (the caller checks them; the
    kernels check again); table (V, I) the Embedding's weight (the layer's x_t is
    table[ids[t]]); grad (V, I) the Embedding's gradient, accumulated (+=) by
    ``lstm_layer_backward``; padding_idx the row that gets no gradient, or -1. See
    ``token_table`` for when a layer takes its input this way.
    """

    __slots__ = ("ids", "table", "grad", "padding_idx")

    def __init__(self, ids, table, grad, padding_idx=-1):
        self.ids, self.table, self.grad, self.padding_idx = ids, table, grad, padding_idx


def token_table(V, T, B, I):
    """Whether an Embedding of V rows and I features feeding a layer of T steps and B
    sequences runs through a table of projected rows (E W_ih^T + b,
    V x 4H, read by id in the time loop) instead of the embedded x.

    The embedded path's three input products (x W_ih^T, dz^T x, dz W_ih) cost 3 T B I
    multiply-adds per gate column; the table's cost 3 V I, plus zeroing and adding the
    backward's nc = min(B, N_PARTS) per-chunk sums of dz by id (nc V). The table runs
    when it costs at most half, and when those nc sums (nc V x 4H) take no more memory
    than the gates cache (T B x 4H). The two ways agree to rounding; each gives the same
    bits for any thread count and with or without checkpointing."""
    nc = min(B, N_PARTS)
    return 2 * V * (3 * I + nc) <= 3 * T * B * I and nc * V <= T * B


def segment_steps(checkpoint_every, T, B):
    """Steps per checkpoint segment for ``checkpoint_every`` (None, an int >= 1 or
    "auto") with T steps and B sequences, or None when nothing is checkpointed.

    "auto" asks for ceil(sqrt(T)) steps, which makes the checkpoints (T/k states) and one
    segment's caches (k steps) about the same size. The request is rounded up to a whole
    number of time blocks (block_steps(B)); a segment as long as the sequence is the
    full cache, so it returns None then.
    """
    checkpoint_every = _checkpoint_every(checkpoint_every)
    if checkpoint_every is None:
        return None
    k = math.isqrt(max(T - 1, 0)) + 1 if checkpoint_every == "auto" else checkpoint_every
    S = _lstm.block_steps(B)
    k = -(-k // S) * S
    return None if k >= T else k


def _caches(ws, dtype, n, B, I, H, Hp, proj, reverse, prefix=""):
    """The per-step cache of n loop steps, from the workspace."""
    return dict(
        gates=ws.get(prefix + "gates", (n, B, 4 * H), dtype),
        c_cache=ws.get(prefix + "c", (n, B, H), dtype),
        tc_cache=ws.get(prefix + "tc", (n, B, H), dtype),
        m_cache=ws.get(prefix + "m", (n, B, H), dtype) if proj else None,
        hprev=ws.get(prefix + "hprev", (n, B, Hp), dtype),
        xg=ws.get(prefix + "xg", (n, B, I), dtype) if reverse else None,
    )


# ---- forward / backward ---------------------------------------------------------------------

def lstm_layer_forward(x, w_ih, w_hh, b_ih=None, b_hh=None, h0=None, c0=None,
                       lengths=None, reverse=False, training=True, w_hr=None,
                       recurrent_mask=None, *, checkpoint_every=None, workspace=None,
                       out=None, row_order=None, tokens=None, _prepare=None):
    """One LSTM layer, one direction, whole sequence (see the module docstring).

    x (T, B, I); w_ih (4H, I); w_hh (4H, H); b_ih, b_hh (4H,) or both None; h0, c0
    (B, H) or None (zeros); lengths (B,) in 1..T or None; reverse runs each sequence
    from its last valid step to t = 0; w_hr (P, H) a projection (PyTorch's proj_size),
    with which w_hh is (4H, P) and h0, h_n, y have P features; recurrent_mask (B, Hp)
    or None, multiplying h_{t-1} (h0 included) in the recurrent product.
    checkpoint_every: None (keep every step's cache), k >= 1 or "auto" (keep the state
    every k steps, rounded up to whole time blocks; see segment_steps): backward then
    recomputes each segment, and its gradients are bitwise those of the full cache.
    Returns (y (T, B, Hp), h_n (B, Hp), c_n (B, H), cache), cache None unless training;
    Hp = P or H. ``workspace`` (a Workspace) reuses scratch and, in training mode, the
    cache arrays: a later forward with the same workspace then invalidates the earlier
    cache. ``out``: an optional writeable (T, B, Hp) array of the weights' dtype whose
    last axis is contiguous and whose rows do not overlap (a batch-first array
    transposed, or a slice of a wider output) that receives y. In inference x may be
    such a view too (its last axis contiguous): the kernel reads it in place.
    ``row_order`` (inference only): a permutation of the B sequences; the kernel runs
    sequence row_order[b] as its row b (lengths, h0, c0, h_n and c_n are in that order;
    x and y stay in the caller's), so a batch runs in another order without copies.
    ``tokens`` (a Tokens, with x None): the input is tokens.table[tokens.ids] (T, B, I),
    projected through a table (token_table says when that pays);
    backward then accumulates the Embedding's gradient into tokens.grad and returns no dx.
    ``_prepare`` (a list; cylstm.layers' prepared inference): an inference call that ran
    as one kernel call appends that call's keyword arguments to it.
    """
    dtype, H, Hp, w_ih, w_hh, bias, w_hr = _check_weights(w_ih, w_hh, b_ih, b_hh, w_hr)
    I = w_ih.shape[1]
    if tokens is not None:
        x = _check_tokens(tokens, x, I, dtype)
        T, B = tokens.ids.shape
    else:
        x = (_as_array(x, "x", dtype, (None, None, I)) if training
             else _as_rows(x, "x", dtype, I))
        T, B, _ = x.shape
    if row_order is not None:
        if training:
            raise ValueError("row_order is for inference only (training=False)")
        row_order = np.ascontiguousarray(row_order, dtype=np.int32)
        if row_order.shape != (B,) or not np.array_equal(np.sort(row_order), np.arange(B)):
            raise ValueError(f"row_order must be a permutation of the {B} "
                             f"sequences, got {_shape(row_order)}")
    if T < 1 or B < 1:
        raise ValueError(f"x must have at least one step and one sequence, got {_shape(x)}")
    if T * B * max(4 * H, I) > _INT32_MAX:
        raise ValueError(f"x ({T}, {B}, {I}) with H={H} is too large for 32-bit BLAS indexing")
    ws = _workspace_arg(workspace)
    full = lengths is None
    lengths = ws.full_lengths(T, B) if full else _lengths(lengths, T, B)
    k = segment_steps(checkpoint_every, T, B)
    reverse = bool(reverse)
    h = np.zeros((B, Hp), dtype) if h0 is None else _as_array(h0, "h0", dtype, (B, Hp)).copy()
    c = np.zeros((B, H), dtype) if c0 is None else _as_array(c0, "c0", dtype, (B, H)).copy()
    c0_kept = c.copy() if training else None
    rmask = None
    if recurrent_mask is not None:
        # a copy: the cache keeps it for backward, whatever the caller does to its array
        rmask = _as_array(recurrent_mask, "recurrent_mask", dtype, (B, Hp)).copy()
    if out is None:
        y = np.empty((T, B, Hp), dtype)
    else:
        if (not isinstance(out, np.ndarray) or out.shape != (T, B, Hp) or out.dtype != dtype
                or not out.flags.writeable or not _rows_disjoint(out)):
            raise ValueError(f"out must be a writeable {dtype} array of shape ({T}, {B}, {Hp}) "
                             f"with a contiguous last axis and rows that do not overlap, got "
                             f"{type(out).__name__} {getattr(out, 'dtype', '')} "
                             f"{np.shape(out)} strides {getattr(out, 'strides', None)}")
        if tokens is None and np.may_share_memory(out, x):
            raise ValueError("out must not share memory with x: the kernel writes y while "
                             "later steps still read x")
        y = out
    proj = w_hr is not None
    fused = tokens is None and input_in_step(I, Hp, H, dtype, B)
    args = dict(
        x=x, w_ih=w_ih, w_hh=w_hh, w_hr=w_hr, bias=_kernel_bias(ws, bias, H, dtype),
        lengths=lengths, reverse=reverse, n_parts=N_PARTS, n_threads=get_num_threads(),
        rmask=rmask, **_forward_scratch(ws, dtype, T, B, I, H, Hp, proj, fused),
    )
    args["ipack"] = _piece_pack(ws, args, I, H, dtype, B, fused or tokens is not None)
    cache = None
    with blas_single_threaded:
        if tokens is not None:
            # the table E W_ih^T + b once, which the time loop reads by id in place of
            # step (1) (_lstm.pyx, "Token input")
            table = _token_table(ws, tokens.table, w_ih, args["bias"], dtype)
            args.update(token_table=table, token_ids=tokens.ids, steps=T)
        if training and k is None:
            cc = _caches(ws, dtype, T, B, I, H, Hp, proj, reverse and tokens is None)
            _lstm.lstm_forward(y=y, h=h, c=c, s0=0, s1=T, **cc, **args)
            cache = LayerCache(x=None if reverse else x, xg=cc["xg"], gates=cc["gates"],
                               c=cc["c_cache"], tc=cc["tc_cache"], m=cc["m_cache"],
                               hprev=cc["hprev"])
        else:
            # Inference, or the checkpointed training forward: segment by segment,
            # keeping (when training) the state entering each; without the input in
            # the step, one segment's projected input and (reverse) x in step order.
            n = T if k is None else k
            gates = None if fused or tokens is not None else ws.get("gates", (n, B, 4 * H),
                                                                    dtype)
            # Ragged inference projects the active rows only (_lstm.pyx, "Active rows"),
            # gathered into xg. Not in training: a checkpointed forward must give the
            # bits that backward's recomputation of each segment (in place) gives.
            active = {} if (training or fused or tokens is not None or full
                            or lengths.min() == T) else dict(
                cpos=ws.get("cpos", (n * B,), np.int32),
                crow=ws.get("crow", (n * B,), np.int32),
                coff=ws.get("coff", (n + 1,), np.int32))
            xg = (ws.get("xg", (n, B, I), dtype)
                  if tokens is None and not fused and (
                      reverse or not x.flags.c_contiguous or row_order is not None or active)
                  else None)
            if training:
                n_seg = -(-T // k)
                h_ck = ws.get("h_ck", (n_seg, B, Hp), dtype)
                c_ck = ws.get("c_ck", (n_seg, B, H), dtype)
                cache = LayerCache(x=x, segment=k, h_ck=h_ck, c_ck=c_ck)
            for j, s0 in enumerate(range(0, T, n)):
                s1 = min(T, s0 + n)
                if training:
                    h_ck[j], c_ck[j] = h, c
                kw = dict(y=y, h=h, c=c, s0=s0, s1=s1,
                          gates=None if gates is None else gates[:s1 - s0],
                          xg=None if xg is None else xg[:s1 - s0], c_cache=None,
                          tc_cache=None, m_cache=None, hprev=None,
                          rows=row_order, **active, **args)
                _lstm.lstm_forward(**kw)
            if _prepare is not None and not training and tokens is None and n == T:
                _prepare.append(kw)
    if training:
        if tokens is not None:
            cache.tokens, cache.token_table = tokens, table
        cache.c0, cache.w_ih, cache.w_hh, cache.w_hr = c0_kept, w_ih, w_hh, w_hr
        cache.bias, cache.lengths, cache.reverse, cache.dtype = bias, lengths, reverse, dtype
        cache.rmask, cache.shape = rmask, (T, B, I, H, Hp)
    return y, h, c, cache


def _token_table(ws, emb, w_ih, bias, dtype):
    """A = E W_ih^T + b (V, 4H), the rows a token input's loop reads: a Linear forward."""
    table = ws.get("token_table", (emb.shape[0], w_ih.shape[0]), dtype)
    _ops.linear_forward(out=table, x=emb, weight=w_ih, bias=bias, n_parts=N_PARTS,
                        n_threads=get_num_threads())
    return table


def _check_tokens(tokens, x, I, dtype):
    """A Tokens argument checked against the layer; returns None (the x to pass on)."""
    if not isinstance(tokens, Tokens):
        raise TypeError(f"tokens must be a cylstm.functional.Tokens, got {type(tokens).__name__}")
    if x is not None:
        raise ValueError("pass x=None with tokens (the input is tokens.table[tokens.ids])")
    ids, table, grad = tokens.ids, tokens.table, tokens.grad
    if not (isinstance(ids, np.ndarray) and ids.dtype == np.int32 and ids.ndim == 2
            and ids.flags.c_contiguous and ids.shape[0] >= 1 and ids.shape[1] >= 1):
        raise ValueError(f"tokens.ids must be a C-contiguous int32 array (T, B), got "
                         f"{getattr(ids, 'dtype', type(ids).__name__)} {_shape(ids)}")
    for name, a in (("table", table), ("grad", grad)):
        if not (isinstance(a, np.ndarray) and a.dtype == dtype and a.ndim == 2
                and a.shape[1] == I and a.flags.c_contiguous
                and a.shape == table.shape):
            raise ValueError(f"tokens.{name} must be a C-contiguous {dtype} array (V, {I}), "
                             f"got {getattr(a, 'dtype', type(a).__name__)} {_shape(a)}")
    if not grad.flags.writeable:
        raise ValueError("tokens.grad must be writeable")
    if not -1 <= tokens.padding_idx < table.shape[0]:
        raise ValueError(f"tokens.padding_idx must be -1 or a row of the table, "
                         f"got {tokens.padding_idx}")
    return None


def _grad_buffer(g, name, dtype, shape):
    if not isinstance(g, np.ndarray):
        raise TypeError(f"{name} must be a numpy array to accumulate into, got {type(g).__name__}")
    if g.shape != shape or g.dtype != dtype or not g.flags.c_contiguous or not g.flags.writeable:
        raise ValueError(
            f"{name} must be a writeable C-contiguous {dtype} array of shape "
            f"({', '.join(map(str, shape))}), got {g.dtype} {_shape(g)}"
        )
    return g


def lstm_layer_backward(cache, dy, dh_n=None, dc_n=None, *, dw_ih, dw_hh, db_ih=None,
                        db_hh=None, dw_hr=None, workspace=None):
    """BPTT through one layer and direction. Accumulates (+=) into dw_ih (4H, I),
    dw_hh (4H, Hp), db_ih, db_hh (4H,) (None when the layer has no bias) and dw_hr (P, H)
    (with a projection). dy (T, B, Hp); dh_n (B, Hp), dc_n (B, H) or None (zeros).
    Returns (dx (T, B, I), dh0 (B, Hp), dc0 (B, H)); with token input (the forward's
    ``tokens``) dx is None and the Embedding's gradient is accumulated into tokens.grad.
    The cache is not modified: calling backward twice adds the gradient twice. A
    checkpointed cache recomputes its segments in the workspace's scratch."""
    if not isinstance(cache, LayerCache):
        raise TypeError(
            "cache must be the LayerCache returned by a training-mode "
            f"cylstm.functional.lstm_layer_forward, got {type(cache).__name__}"
        )
    dtype = cache.dtype
    T, B, I, H, Hp = cache.shape
    proj = cache.w_hr is not None
    # read in place when its last axis is contiguous (a batch-first dy transposed, one
    # direction's half): a 3.2 MB copy per char-model update saved
    dy = _as_rows(dy, "dy", dtype, Hp, (T, B))
    dh_n = np.zeros((B, Hp), dtype) if dh_n is None else _as_array(dh_n, "dh_n", dtype, (B, Hp))
    dc = np.zeros((B, H), dtype) if dc_n is None else _as_array(dc_n, "dc_n", dtype, (B, H)).copy()
    dw_ih = _grad_buffer(dw_ih, "dw_ih", dtype, (4 * H, I))
    dw_hh = _grad_buffer(dw_hh, "dw_hh", dtype, (4 * H, Hp))
    if proj:
        if dw_hr is None:
            raise ValueError("the layer has a projection: pass dw_hr to accumulate into")
        dw_hr = _grad_buffer(dw_hr, "dw_hr", dtype, (Hp, H))
    elif dw_hr is not None:
        raise ValueError("the layer has no projection: dw_hr must be None")
    if cache.bias is not None:
        if db_ih is None or db_hh is None:
            raise ValueError("the layer has biases: pass db_ih and db_hh to accumulate into")
        db_ih = _grad_buffer(db_ih, "db_ih", dtype, (4 * H,))
        db_hh = _grad_buffer(db_hh, "db_hh", dtype, (4 * H,))
    elif db_ih is not None or db_hh is not None:
        raise ValueError("the layer has no bias: db_ih and db_hh must be None")
    ws = _workspace_arg(workspace)
    reverse = cache.reverse
    k = cache.segment
    n = T if k is None else k
    part_rows = -(-block_steps(B) * B // N_PARTS)
    # Ragged lengths: the products after the time loop run over the active rows only
    # (_lstm.pyx, "Active rows"), gathered into this scratch.
    tokens = cache.tokens
    # token input: dz in place for every row (no compaction), scattered by token after
    ragged = cache.lengths.min() < T and tokens is None
    active = dict(
        cpos=ws.get("cpos", (n * B,), np.int32), crow=ws.get("crow", (n * B,), np.int32),
        coff=ws.get("coff", (n + 1,), np.int32), xc=ws.get("xc", (n * B, I), dtype),
        hc=ws.get("hc", (n * B, Hp), dtype),
    ) if ragged else {}
    # dx is written at the active rows' times only (reverse or ragged): padding stays zero
    dx = None if tokens is not None else (np.zeros if reverse or ragged else np.empty)(
        (T, B, I), dtype)
    dh = np.empty((B, Hp), dtype)
    fixed = dict(
        dx=dx, dh=dh, dc=dc, dw_ih=dw_ih, dw_hh=dw_hh, dw_hr=dw_hr, db_ih=db_ih, db_hh=db_hh,
        dw_ih_tmp=ws.get("dw_ih_tmp", (4 * H, I), dtype),
        dw_hh_tmp=ws.get("dw_hh_tmp", (4 * H, Hp), dtype),
        dw_hr_tmp=ws.get("dw_hr_tmp", (Hp, H), dtype) if proj else None,
        db_tmp=ws.get("db_tmp", (4 * H,), dtype),
        dxg=(ws.get("dxg", (N_PARTS * part_rows, I), dtype)
             if (reverse or ragged) and tokens is None else None),
        dzs=ws.get("dzs", (B, 4 * H), dtype), dhbuf=ws.get("dhbuf", (B, Hp), dtype),
        dm=ws.get("dm", (B, H), dtype) if proj else None,
        dy=dy, dh_n=dh_n, x=cache.x, w_ih=cache.w_ih, w_hh=cache.w_hh, w_hr=cache.w_hr,
        lengths=cache.lengths, reverse=reverse, n_parts=N_PARTS, n_threads=get_num_threads(),
        wpack=_wpack(ws, dtype, _lstm.pack_size(4 * H, Hp, dtype)
                     + (_lstm.pack_size(Hp, H, dtype) if proj else 0), T),
        rmask=cache.rmask, own_wide=_threads.BACKWARD_OWN_WIDE, input_grads=tokens is None,
        **active,
    )
    dz = ws.get("dz", (n, B, 4 * H), dtype)
    dhp = ws.get("dhp", (n, B, Hp), dtype) if proj else None
    if tokens is not None:      # each batch chunk's S (V, 4H): dz summed by token id
        V = tokens.table.shape[0]
        fixed.update(token_ssum=ws.get("token_chunks", (min(B, N_PARTS), V, 4 * H), dtype),
                     token_ids=tokens.ids)
    with blas_single_threaded:
        if k is None:
            _lstm.lstm_backward(
                s0=0, s1=T, first=True, last=True, dz=dz, dhp=dhp, gates=cache.gates,
                c_cache=cache.c, tc_cache=cache.tc, m_cache=cache.m, hprev=cache.hprev,
                xg=cache.xg, c_start=cache.c0, **fixed)
        else:
            # Segments from the last: recompute the segment's caches from the state that
            # entered it (the same kernel calls as the forward made), then its backward.
            cc = _caches(ws, dtype, k, B, I, H, Hp, proj, reverse and tokens is None,
                         prefix="seg_")
            h = ws.get("seg_state_h", (B, Hp), dtype)
            c = ws.get("seg_state_c", (B, H), dtype)
            fwd = dict(
                x=cache.x, w_ih=cache.w_ih, w_hh=cache.w_hh, w_hr=cache.w_hr,
                bias=_kernel_bias(ws, cache.bias, H, dtype), lengths=cache.lengths,
                reverse=reverse, n_parts=N_PARTS, n_threads=get_num_threads(),
                rmask=cache.rmask,
                **_forward_scratch(ws, dtype, T, B, I, H, Hp, proj,
                                   tokens is None and input_in_step(I, Hp, H, dtype, B),
                                   wpack="wpack_fwd"),
            )
            fwd["ipack"] = _piece_pack(ws, fwd, I, H, dtype, B, tokens is not None or
                                       input_in_step(I, Hp, H, dtype, B))
            if tokens is not None:
                fwd.update(token_table=cache.token_table, token_ids=tokens.ids, steps=T)
            n_seg = cache.h_ck.shape[0]
            for j in range(n_seg - 1, -1, -1):
                s0, s1 = j * k, min(T, (j + 1) * k)
                seg = {name: None if a is None else a[:s1 - s0] for name, a in cc.items()}
                h[...], c[...] = cache.h_ck[j], cache.c_ck[j]
                _lstm.lstm_forward(y=None, h=h, c=c, s0=s0, s1=s1, **seg, **fwd)
                _lstm.lstm_backward(
                    s0=s0, s1=s1, first=j == n_seg - 1, last=j == 0, dz=dz[:s1 - s0],
                    dhp=None if dhp is None else dhp[:s1 - s0], c_start=cache.c_ck[j],
                    **seg, **fixed)
        if tokens is not None:      # dW_ih and the Embedding's gradient from S
            _lstm.token_grads(
                demb=tokens.grad, dw_ih=dw_ih, ssum=ws.get("token_ssum", (V, 4 * H), dtype),
                chunks=fixed["token_ssum"],
                demb_tmp=ws.get("token_demb", tokens.table.shape, dtype),
                dw_tmp=fixed["dw_ih_tmp"], emb=tokens.table, w_ih=cache.w_ih,
                padding_idx=tokens.padding_idx, n_parts=N_PARTS, n_threads=fixed["n_threads"])
    return dx, dh, dc
