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

import numpy as np

from . import _lstm
from ._check import FLOATS as _FLOATS
from ._check import real_array
from ._check import shape_str as _shape
from ._threads import N_PARTS, PACK_MIN_STEPS, blas_single_threaded, get_num_threads

__all__ = ["lstm_layer_forward", "lstm_layer_backward", "LayerCache", "Workspace"]

_INT32_MAX = 2**31 - 1


# ---- validation -----------------------------------------------------------------------------

def _as_array(a, name, dtype, shape):
    """a as a C-contiguous `dtype` array of exactly `shape` (ints may be None = any)."""
    if (type(a) is np.ndarray and a.dtype == dtype and a.ndim == len(shape)
            and a.flags.c_contiguous
            and all(exp is None or got == exp for got, exp in zip(a.shape, shape))):
        return a                    # the common case, checked without building messages
    a = real_array(a, name)
    want = "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"
    if a.ndim != len(shape):
        raise ValueError(f"{name} must have shape {want} ({len(shape)}-D), got {_shape(a)}")
    for got, exp in zip(a.shape, shape):
        if exp is not None and got != exp:
            raise ValueError(f"{name} must have shape {want}, got {_shape(a)}")
    return np.ascontiguousarray(a, dtype=dtype)


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
        bias = b_ih + b_hh   # added once; the kernel fuses it into the input projection
    return dtype, H, Hp, w_ih, w_hh, bias, w_hr


def _finite_padding(x, lengths):
    """x, or a copy with zeros at padded positions when any of those is not finite.

    Backward forms dW_ih over all T*B rows, where padded rows have dz = 0; but 0 * NaN is
    NaN, and PyTorch never reads padding. Checking costs a pass over the padding only.
    """
    T = x.shape[0]
    if lengths.min() == T:
        return x
    pad = np.arange(T)[:, None] >= lengths[None, :]          # (T, B)
    if np.isfinite(x[pad]).all():
        return x
    x = x.copy()
    x[pad] = 0
    return x


def _wpack(ws, dtype, shapes, T):
    """float32 scratch for the recurrent weights packed once per call (see _rgemm.h),
    or None (short sequences, a CPU without AVX2, or float64 with a projection: the
    kernels use BLAS)."""
    if T < PACK_MIN_STEPS:
        return None
    n = _lstm.pack_floats_for(shapes, dtype)
    return ws.get("wpack", (n,), np.float32) if n else None


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

    def clear(self):
        self._arrays.clear()

    @property
    def nbytes(self):
        return sum(a.nbytes for a in self._arrays.values())


class LayerCache:
    """What ``lstm_layer_backward`` needs from one training-mode forward (time order).

    gates (T, B, 4H) activated [i|f|g|o]; c, tc (T, B, H) c_t and tanh(c_t); m (T, B, H)
    o * tanh(c_t) with a projection (else None); y (T, B, Hp) and x (T, B, I) by
    reference; h0 (B, Hp) or None; c0 (B, H); the weights, lengths (B,) int32 and the
    direction; rmask (B, Hp) the recurrent dropout mask and hm (T, B, Hp) the masked
    h_{t-1} at each time (dW_hh's operand), both None without one. Memory:
    (6 + [3 with a projection]) * T*B*H elements, [T*B*Hp with a mask], plus y and x.
    """

    __slots__ = ("x", "y", "gates", "c", "tc", "m", "h0", "c0", "w_ih", "w_hh", "w_hr",
                 "has_bias", "lengths", "reverse", "dtype", "rmask", "hm")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)


# ---- forward / backward ---------------------------------------------------------------------

def lstm_layer_forward(x, w_ih, w_hh, b_ih=None, b_hh=None, h0=None, c0=None,
                       lengths=None, reverse=False, training=True, w_hr=None,
                       recurrent_mask=None, *, workspace=None, out=None):
    """One LSTM layer, one direction, whole sequence (see the module docstring).

    x (T, B, I); w_ih (4H, I); w_hh (4H, H); b_ih, b_hh (4H,) or both None; h0, c0
    (B, H) or None (zeros); lengths (B,) in 1..T or None; reverse runs each sequence
    from its last valid step to t = 0; w_hr (P, H) a projection (PyTorch's proj_size),
    with which w_hh is (4H, P) and h0, h_n, y have P features; recurrent_mask (B, Hp)
    or None, multiplying h_{t-1} (h0 included) in the recurrent product. Returns (y (T, B, Hp),
    h_n (B, Hp), c_n (B, H), cache), cache None unless training; Hp = P or H. ``workspace`` (a Workspace) reuses scratch and,
    in training mode, the cache arrays: a later forward with the same workspace then
    invalidates the earlier cache. ``out``: an optional C-contiguous (T, B, H) array of
    the weights' dtype that receives y (used to write straight into a wider output).
    """
    dtype, H, Hp, w_ih, w_hh, bias, w_hr = _check_weights(w_ih, w_hh, b_ih, b_hh, w_hr)
    I = w_ih.shape[1]
    x = _as_array(x, "x", dtype, (None, None, I))
    T, B, _ = x.shape
    if T < 1 or B < 1:
        raise ValueError(f"x must have at least one step and one sequence, got {_shape(x)}")
    if T * B * max(4 * H, I) > _INT32_MAX:
        raise ValueError(f"x {_shape(x)} with H={H} is too large for 32-bit BLAS indexing")
    lengths = _lengths(lengths, T, B)
    h = np.zeros((B, Hp), dtype) if h0 is None else _as_array(h0, "h0", dtype, (B, Hp)).copy()
    c = np.zeros((B, H), dtype) if c0 is None else _as_array(c0, "c0", dtype, (B, H)).copy()
    h0_kept = None if h0 is None else h.copy()
    c0_kept = c.copy() if training else None
    rmask = None
    if recurrent_mask is not None:
        # a copy: the cache keeps it for backward, whatever the caller does to its array
        rmask = _as_array(recurrent_mask, "recurrent_mask", dtype, (B, Hp)).copy()
    ws = _workspace_arg(workspace)
    if out is None:
        y = np.empty((T, B, Hp), dtype)
    else:
        if (not isinstance(out, np.ndarray) or out.shape != (T, B, Hp) or out.dtype != dtype
                or not out.flags.c_contiguous or not out.flags.writeable):
            raise ValueError(f"out must be a writeable C-contiguous {dtype} array of shape "
                             f"({T}, {B}, {Hp}), got {type(out).__name__} "
                             f"{getattr(out, 'dtype', '')} {np.shape(out)}")
        y = out
    gates = ws.get("gates", (T, B, 4 * H), dtype)
    c_cache = ws.get("c", (T, B, H), dtype) if training else None
    tc_cache = ws.get("tc", (T, B, H), dtype) if training else None
    proj = w_hr is not None
    m_cache = ws.get("m", (T, B, H), dtype) if training and proj else None
    hm_cache = ws.get("hm_cache", (T, B, Hp), dtype) if training and rmask is not None else None
    with blas_single_threaded:
        _lstm.lstm_forward(
            y=y, h=h, c=c, gates=gates, c_cache=c_cache, tc_cache=tc_cache, m_cache=m_cache,
            hz=ws.get("hz", (B, 4 * H), dtype),
            mbuf=ws.get("mbuf", (B, H), dtype) if proj else None,
            hp=ws.get("hp", (B, Hp), dtype) if proj else None,
            x=x, w_ih=w_ih, w_hh=w_hh, w_hr=w_hr, bias=bias, lengths=lengths,
            reverse=bool(reverse), n_parts=N_PARTS, n_threads=get_num_threads(),
            wpack=_wpack(ws, dtype, [(Hp, 4 * H)] + ([(H, Hp)] if proj else []), T),
            rmask=rmask, hm=ws.get("hm", (B, Hp), dtype) if rmask is not None else None,
            hm_cache=hm_cache,
        )
    cache = None
    if training:
        x = _finite_padding(x, lengths)
        cache = LayerCache(x=x, y=y, gates=gates, c=c_cache, tc=tc_cache, m=m_cache,
                           h0=h0_kept, c0=c0_kept, w_ih=w_ih, w_hh=w_hh, w_hr=w_hr,
                           has_bias=bias is not None, rmask=rmask, hm=hm_cache,
                           lengths=lengths, reverse=bool(reverse), dtype=dtype)
    return y, h, c, cache


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
    Returns (dx (T, B, I), dh0 (B, Hp), dc0 (B, H)).
    The cache is not modified: calling backward twice adds the gradient twice."""
    if not isinstance(cache, LayerCache):
        raise TypeError(
            "cache must be the LayerCache returned by a training-mode "
            f"cylstm.functional.lstm_layer_forward, got {type(cache).__name__}"
        )
    dtype = cache.dtype
    T, B, Hp = cache.y.shape
    H = cache.c.shape[2]
    I = cache.x.shape[2]
    proj = cache.w_hr is not None
    dy = _as_array(dy, "dy", dtype, (T, B, Hp))
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
    if cache.has_bias:
        if db_ih is None or db_hh is None:
            raise ValueError("the layer has biases: pass db_ih and db_hh to accumulate into")
        db_ih = _grad_buffer(db_ih, "db_ih", dtype, (4 * H,))
        db_hh = _grad_buffer(db_hh, "db_hh", dtype, (4 * H,))
    elif db_ih is not None or db_hh is not None:
        raise ValueError("the layer has no bias: db_ih and db_hh must be None")
    ws = _workspace_arg(workspace)
    dx = np.empty((T, B, I), dtype)
    dh0 = np.empty((B, Hp), dtype)
    with blas_single_threaded:
        _lstm.lstm_backward(
            dx=dx, dh0=dh0, dc=dc, dw_ih=dw_ih, dw_hh=dw_hh, dw_hr=dw_hr, db_ih=db_ih,
            db_hh=db_hh, dw_ih_tmp=ws.get("dw_ih_tmp", (4 * H, I), dtype),
            dw_hh_tmp=ws.get("dw_hh_tmp", (4 * H, Hp), dtype),
            dw_hr_tmp=ws.get("dw_hr_tmp", (Hp, H), dtype) if proj else None,
            db_tmp=ws.get("db_tmp", (4 * H,), dtype),
            dz=ws.get("dz", (T, B, 4 * H), dtype),
            dhp=ws.get("dhp", (T, B, Hp), dtype) if proj else None,
            dzs=ws.get("dzs", (B, 4 * H), dtype), dhbuf=ws.get("dhbuf", (B, Hp), dtype),
            dm=ws.get("dm", (B, H), dtype) if proj else None,
            dy=dy, dh_n=dh_n, gates=cache.gates, c_cache=cache.c, tc_cache=cache.tc,
            m_cache=cache.m, y=cache.y, x=cache.x, h0=cache.h0, c0=cache.c0,
            w_ih=cache.w_ih, w_hh=cache.w_hh, w_hr=cache.w_hr, lengths=cache.lengths,
            reverse=cache.reverse, n_parts=N_PARTS, n_threads=get_num_threads(),
            wpack=_wpack(ws, dtype, [(4 * H, Hp)] + ([(Hp, H)] if proj else []), T),
            rmask=cache.rmask, hm_cache=cache.hm,
        )
    return dx, dh0, dc
