"""Losses (value and gradient in one call) and the metrics that go with them.

Each loss returns ``(loss, gradient)``: the gradient of the returned loss with respect
to the prediction, ready to hand to the layer below's ``backward``. Softmax
cross-entropy runs in the compiled kernel ``cylstm._ops.softmax_xent`` (forward and
backward in one pass over the rows, multithreaded, bitwise identical for any thread
count); MSE is a few NumPy lines.

Masks. ``mask`` marks which positions count: 0 (or False) = ignored, e.g. the padded
steps of a ragged batch; any other finite non-negative value is a weight. For
cross-entropy the targets equal to ``ignore_index`` are ignored as well. An ignored
position has loss 0 and gradient 0 whatever its prediction and target hold (padding
may be NaN; cross-entropy never even reads its logits).

Empty selections. When every position is ignored (or there are none), the loss is 0.0
and the gradient is all zeros, for every reduction. (PyTorch's mean gives NaN there, a
0/0; for a training loop, a batch with nothing to learn from should change nothing.)

The classes ``CrossEntropyLoss`` and ``MSELoss`` keep the gradient of their last
``forward`` for ``backward()``, for a Keras-like training loop.
"""

import math
import numbers

import numpy as np

from . import _ops
from ._check import FLOATS as _FLOATS
from ._check import as_array, out_array
from ._check import shape_str as _shape
from ._threads import N_PARTS, get_num_threads

__all__ = [
    "softmax_cross_entropy", "mse", "accuracy", "perplexity", "bits_per_char",
    "CrossEntropyLoss", "MSELoss",
]

_KERNEL_INTS = (np.dtype(np.int32), np.dtype(np.int64))
_REDUCTIONS = ("mean", "sum", "none")


# ---- validation -----------------------------------------------------------------------------

def _float_array(a, name):
    """a as a float32/float64 ndarray (a list or scalar becomes one); other dtypes are a
    TypeError (a loss takes the network's output dtype as it is)."""
    if not isinstance(a, np.ndarray):
        try:
            a = np.asarray(a)
        except Exception as e:
            raise TypeError(f"{name} must be an array, got {type(a).__name__}: {e}") from None
        if a.dtype.kind in "iub":      # a list of Python numbers: take it as float64
            a = a.astype(np.float64)
    if a.dtype.kind == "f" and a.dtype.itemsize in (4, 8) and not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))          # big-endian data: same values
    if a.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a float32 or float64 array, got dtype {a.dtype}")
    return a


def _int_array(a, name, shape):
    """a as an int32/int64 C-contiguous array of exactly `shape` (other integer dtypes are
    converted; floats and bools are a TypeError)."""
    a = as_array(a, name, "an array of integers")
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers (class indices), got dtype {a.dtype}")
    if a.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {_shape(shape)}, got {_shape(a.shape)}")
    if a.dtype not in _KERNEL_INTS:
        if a.dtype.kind == "u" and a.size and a.max() > np.iinfo(np.int64).max:
            raise ValueError(f"{name} has a value {a.max()} beyond the int64 range")
        a = a.astype(np.int64)
    return np.ascontiguousarray(a)


def _mask_array(mask, shape, dtype, name="mask"):
    """mask (None, or bools/reals of a shape that broadcasts to `shape`) as a C-contiguous
    `dtype` array of `shape`, or None. Finite and >= 0 is checked by the caller's kernel
    or here."""
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold bools or real weights, got dtype {m.dtype}")
    try:
        m = np.broadcast_to(m, shape)
    except ValueError:
        raise ValueError(f"{name} must have shape {_shape(shape)} (or broadcast to it), "
                         f"got {_shape(m.shape)}") from None
    return np.ascontiguousarray(m, dtype=dtype)


def _reduction(reduction):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return reduction


def _ignore_index(ignore_index):
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    ignore_index = int(ignore_index)
    if not -2**63 <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    return ignore_index


def _logits_targets(logits, targets):
    """(logits as (..., C), targets as (...) int array) validated; shapes unchanged."""
    logits = _float_array(logits, "logits")
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape (..., C) with C >= 1 classes, "
                         f"got {_shape(logits.shape)}")
    lead = logits.shape[:-1]
    if np.ndim(targets) != len(lead):
        raise ValueError(f"targets must have shape {_shape(lead)} (logits {_shape(logits.shape)} "
                         f"without its class axis), got {_shape(np.shape(targets))}")
    targets = _int_array(targets, "targets", lead)
    return logits, targets


# ---- cross-entropy --------------------------------------------------------------------------

def _cross_entropy(logits, targets, mask, ignore_index, reduction, out=None, grad=True):
    """The kernel call behind softmax_cross_entropy and accuracy-as-a-by-product.

    Returns (loss, dlogits, n_counted, n_correct); dlogits is None with ``grad=False``
    (evaluation: the same loss and counts, bitwise, without computing a gradient)."""
    reduction = _reduction(reduction)
    ignore_index = _ignore_index(ignore_index)
    logits, targets = _logits_targets(logits, targets)
    shape, C = logits.shape, logits.shape[-1]
    dtype = logits.dtype
    lead = shape[:-1]
    N = targets.size
    z = np.ascontiguousarray(logits).reshape(N, C)
    t = targets.reshape(N)
    w = _mask_array(mask, lead, dtype)
    if w is not None:
        w = w.reshape(N)
    scratch = None
    if not grad:
        dz, scratch = None, np.empty((N_PARTS, C), dtype)
    elif out is None:
        dz = np.empty((N, C), dtype)
    else:
        out_array(out, shape, dtype, logits,
                  "logits (the kernel reads a row's logits after writing its gradient)")
        dz = out.reshape(N, C)
    row_loss = np.empty(N, dtype) if reduction == "none" else None
    total, wsum, counted, correct = _ops.softmax_xent(
        dlogits=dz, row_loss=row_loss,
        block_loss=np.empty(N_PARTS, np.float64),
        block_stats=np.empty((N_PARTS, 2), np.int64),
        logits=z, targets=t, weight=w, ignore_index=ignore_index,
        mean=reduction == "mean", n_parts=N_PARTS, n_threads=get_num_threads(),
        scratch=scratch,
    )
    if reduction == "none":
        loss = row_loss.reshape(lead)
    elif reduction == "sum":
        loss = float(total)
    else:
        loss = float(total / wsum) if wsum > 0 else 0.0
    return loss, None if dz is None else dz.reshape(shape), int(counted), int(correct)


def softmax_cross_entropy(logits, targets, mask=None, ignore_index=-100, reduction="mean",
                          *, out=None):
    """Softmax cross-entropy of ``logits`` (..., C) against class indices ``targets``
    (...), and its gradient.

    For every position n (all leading axes flattened) with weight w_n (``mask``; 1 when
    None) that counts (w_n != 0 and y_n != ignore_index)::

        loss_n = logsumexp_j(z_nj) - z_{n,y_n}
               = m_n + log(sum_j exp(z_nj - m_n)) - z_{n,y_n},   m_n = max_j z_nj
        "sum":  L = sum_n w_n loss_n
        "mean": L = sum_n w_n loss_n / sum_n w_n     (a 0/1 mask: the mean over counted)
        "none": L_n = w_n loss_n  (an array of the targets' shape; 0 where ignored)
        dL/dz_nj = w_n * scale * (softmax(z_n)_j - [j == y_n]),
                   scale = 1 / sum_n w_n for "mean", else 1

    With no mask this is exactly ``torch.nn.functional.cross_entropy`` (reduction "mean"
    / "sum" / "none", same ``ignore_index``) on ``logits.reshape(-1, C)``. Computed in
    the logits' dtype; the loss is summed in float64. Finite logits of any size are safe
    (the row max is subtracted). When nothing counts, the loss is 0 and the gradient 0.

    Parameters: logits float32/float64 (..., C); targets integers (...), each in
    0..C-1 or equal to ``ignore_index``; mask None or bools/finite weights >= 0 of shape
    (...) (or broadcasting to it); ``out`` an optional C-contiguous array of the logits'
    shape and dtype to receive the gradient (not overlapping the logits). Returns
    ``(loss, dlogits)``: ``loss`` a float (an array for "none"), ``dlogits`` of the
    logits' shape and dtype.
    """
    loss, dz, _, _ = _cross_entropy(logits, targets, mask, ignore_index, reduction, out)
    return loss, dz


# ---- mean squared error ---------------------------------------------------------------------

def _mse_mask(mask, shape, dtype):
    """mask of shape shape[:k] (a prefix: e.g. (T, B) for pred (T, B, F)) or broadcasting
    to `shape` from the right, as a `dtype` array broadcastable against pred."""
    m = np.asarray(mask)
    if m.dtype.kind not in "biuf":
        raise TypeError(f"mask must hold bools or real weights, got dtype {m.dtype}")
    if m.ndim <= len(shape) and m.shape == tuple(shape[:m.ndim]):
        m = m.reshape(m.shape + (1,) * (len(shape) - m.ndim))    # leading dims: broadcast right
    try:
        np.broadcast_shapes(m.shape, shape)
        m = np.broadcast_to(m, shape)
    except ValueError:
        raise ValueError(f"mask must have the leading shape of pred {_shape(shape)} (e.g. "
                         f"{_shape(shape[:-1])}) or broadcast to it, "
                         f"got {_shape(np.shape(mask))}") from None
    m = m.astype(dtype, copy=False)
    if not np.all(np.isfinite(m)) or np.any(m < 0):
        raise ValueError("mask must be finite and >= 0 (0 = ignored)")
    return m


def mse(pred, target, mask=None, reduction="mean"):
    """Mean squared error and its gradient with respect to ``pred``.

    With d = pred - target and weights w (``mask`` broadcast over the trailing feature
    axes; 1 when None), summing over every element k::

        "sum":  L = sum_k w_k d_k^2                 dL/dpred = 2 w d
        "mean": L = sum_k w_k d_k^2 / sum_k w_k     dL/dpred = 2 w d / sum_k w_k
        "none": L_k = w_k d_k^2 (pred's shape)      dL/dpred = 2 w d  (of sum_k L_k)

    With no mask, "mean" is exactly ``torch.nn.MSELoss()`` (the mean over all elements).
    A mask of shape (T, B) for pred (T, B, F) counts each of its F features, so the mean
    is over counted elements. When nothing counts the loss is 0 and the gradient 0.

    pred: float32/float64 array; target: reals of pred's shape (converted to its dtype);
    mask: None, or bools / finite weights >= 0 of a leading shape of pred (or
    broadcasting to it). Returns ``(loss, dpred)``: a float (an array for "none") and an
    array of pred's shape and dtype. The loss is summed in float64.
    """
    reduction = _reduction(reduction)
    pred = _float_array(pred, "pred")
    dtype = pred.dtype
    target = np.asarray(target)
    if target.dtype.kind not in "biuf":
        raise TypeError(f"target must hold real numbers, got dtype {target.dtype}")
    if target.shape != pred.shape:
        raise ValueError(f"target must have pred's shape {_shape(pred.shape)}, "
                         f"got {_shape(target.shape)}")
    d = pred - target.astype(dtype, copy=False)
    if mask is None:
        count = float(d.size)
        sq = d * d
        grad = 2 * d
    else:
        w = _mse_mask(mask, pred.shape, dtype)
        count = float(np.sum(w, dtype=np.float64))
        keep = w != 0                   # masked positions may hold anything (NaN padding)
        with np.errstate(invalid="ignore", over="ignore"):
            wd = np.where(keep, w * d, 0).astype(dtype, copy=False)
            sq = np.where(keep, wd * d, 0).astype(dtype, copy=False)
        grad = 2 * wd
    if reduction == "none":
        return sq, grad
    total = float(np.sum(sq, dtype=np.float64))
    if reduction == "sum":
        return total, grad
    if count == 0:
        return 0.0, np.zeros_like(grad)
    grad *= dtype.type(1 / count)
    return total / count, grad


# ---- metrics --------------------------------------------------------------------------------

def accuracy(logits, targets, mask=None, ignore_index=-100):
    """Fraction of counted positions whose argmax class is the target::

        accuracy = #{n counted : argmax_j z_nj == y_n} / #{n counted}

    A position counts when its mask is non-zero (mask None: all) and its target is not
    ``ignore_index``; ties go to the first maximum (as ``np.argmax``). Targets of
    counted positions must be in 0..C-1. Returns a float; 0.0 when nothing counts."""
    ignore_index = _ignore_index(ignore_index)
    logits, targets = _logits_targets(logits, targets)
    C = logits.shape[-1]
    counted = targets != ignore_index
    if mask is not None:
        m = _mask_array(mask, targets.shape, np.float64)
        if not np.all(np.isfinite(m)) or np.any(m < 0):
            raise ValueError("mask must be finite and >= 0 (0 = ignored)")
        counted &= m != 0
    t = targets[counted]
    if t.size and (t.min() < 0 or t.max() >= C):
        bad = t[(t < 0) | (t >= C)][0]
        raise ValueError(f"targets must be class indices in 0..{C - 1} (logits have C={C} "
                         f"classes) or ignore_index={ignore_index}, got {bad}")
    n = int(counted.sum())
    if n == 0:
        return 0.0
    hits = np.argmax(logits.reshape(-1, C)[counted.reshape(-1)], axis=-1) == t  # 0-d lead too
    return float(hits.sum()) / n


def _real(x, name):
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (numbers.Real, np.ndarray)):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    if isinstance(x, np.ndarray) and x.dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
    x = np.asarray(x, dtype=np.float64)
    if np.any(np.isnan(x)):
        raise ValueError(f"{name} must not be NaN")
    return x


def perplexity(mean_ce):
    """exp(mean_ce): perplexity from a mean cross-entropy in nats (``inf`` on overflow).
    A float for a number, an array for an array."""
    x = _real(mean_ce, "mean_ce")
    with np.errstate(over="ignore"):
        p = np.exp(x)
    return float(p) if p.ndim == 0 else p


def bits_per_char(mean_ce):
    """mean_ce / ln 2: bits per character (or per token) from a mean cross-entropy in
    nats. A float for a number, an array for an array."""
    x = _real(mean_ce, "mean_ce")
    b = x / math.log(2)
    return float(b) if b.ndim == 0 else b


# ---- loss objects ---------------------------------------------------------------------------

class _Loss:
    """forward(...) -> loss, keeping the gradient; backward() -> that gradient."""

    def __init__(self, reduction="mean"):
        self.reduction = _reduction(reduction)
        self._grad = None

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def backward(self):
        """The gradient of the last forward's loss with respect to its prediction (a
        fresh array per forward; calling backward twice returns the same array)."""
        if self._grad is None:
            raise RuntimeError(f"{type(self).__name__}.backward() needs a forward() first")
        return self._grad


class CrossEntropyLoss(_Loss):
    """Softmax cross-entropy as an object: ``loss = ce(logits, targets, mask)``, then
    ``dlogits = ce.backward()``. See ``softmax_cross_entropy`` for the equations.

    After each forward, ``n_counted`` and ``n_correct`` hold how many positions counted
    and how many of them the argmax got right (so ``n_correct / n_counted`` is the
    batch accuracy, computed in the same pass)."""

    def __init__(self, ignore_index=-100, reduction="mean"):
        super().__init__(reduction)
        self.ignore_index = _ignore_index(ignore_index)
        self.n_counted = 0
        self.n_correct = 0

    def forward(self, logits, targets, mask=None):
        loss, self._grad, self.n_counted, self.n_correct = _cross_entropy(
            logits, targets, mask, self.ignore_index, self.reduction)
        return loss

    def __repr__(self):
        return f"CrossEntropyLoss(ignore_index={self.ignore_index}, reduction={self.reduction!r})"


class MSELoss(_Loss):
    """Mean squared error as an object: ``loss = mse_loss(pred, target, mask)``, then
    ``dpred = mse_loss.backward()``. See ``mse`` for the equations."""

    def forward(self, pred, target, mask=None):
        loss, self._grad = mse(pred, target, mask, self.reduction)
        return loss

    def __repr__(self):
        return f"MSELoss(reduction={self.reduction!r})"
