"""Embedding: a lookup table of V vectors of D features, as ``torch.nn.Embedding``.

    forward     out[..., :] = weight[indices[...], :]          (..., D) from (V, D)
    backward    grad[v, :] += sum of dout[n, :] over the positions n with indices[n] = v

Both run in the compiled kernels of ``cylstm._ops`` without the GIL. The backward is a
scatter-add that stays deterministic with repeated indices: the D feature columns are
cut into fixed blocks, each thread owns its columns and walks all positions in order,
summing each index's rows in a small scratch table (or, for a table too large for a
core's cache, grouped by index through a stable argsort: the same order), so no two
threads ever write one element and every sum has one fixed order (bitwise identical
for any thread count). Each row's sum is added to
``grad`` once, so two backward calls give exactly twice one, and from zero the result
is bitwise ``np.add.at(grad, indices, dout)``.

Parameters can live in a model's arena: pass ``weight=`` and ``grad=`` views and the
layer uses them as its storage (initialising them in place) instead of allocating.
"""

import math
import numbers

import numpy as np

from . import _ops
from ._threads import N_PARTS, get_num_threads
from ._check import FLOATS as _FLOATS
from ._check import positive_int as _positive_int
from ._check import as_array, float_dtype, shape_str as _shape
from .base import Features, Parametrised

__all__ = ["Embedding", "TokenBatch"]

_KERNEL_INTS = (np.dtype(np.int32), np.dtype(np.int64))


def _storage(a, name, shape, dtype):
    """A caller's preallocated parameter or gradient array, checked to be usable in place."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy array (a view to use as storage), "
                        f"got {type(a).__name__}")
    if a.shape != shape or a.dtype != dtype or not a.flags.c_contiguous or not a.flags.writeable:
        raise ValueError(f"{name} must be a writeable C-contiguous {dtype} array of shape "
                         f"{_shape(shape)}, got {'' if a.flags.writeable else 'read-only '}"
                         f"{'' if a.flags.c_contiguous else 'non-contiguous '}{a.dtype} "
                         f"{_shape(a.shape)}")
    return a


def _rows3(a, D):
    """a (..., D) as an (A, C, D) view whose row n is a's n-th row in C order, with the
    last axis contiguous: in place for a batch-first view of a time-major array (the
    LSTM's dx), a copy only where no such view exists."""
    if a.ndim != 3:                     # a view where the leading axes flatten in place
        a = a.reshape(math.prod(a.shape[:-1]), 1, D)
    if (D < 2 or a.strides[2] == a.itemsize) and all(
            st % a.itemsize == 0 for st in a.strides[:2]):
        return a
    return np.ascontiguousarray(a)


class Embedding(Parametrised):
    """A (V, D) table of learned vectors looked up by integer index.

    ``Embedding(num_embeddings, embedding_dim, dtype="float32", seed=None,
    padding_idx=None, *, weight=None, grad=None)``

    * ``weight`` (V, D) starts as N(0, 1) draws (``torch.nn.Embedding``'s init) from
      ``np.random.default_rng(seed)``; ``grad`` (V, D) starts at zero.
    * ``padding_idx`` (PyTorch's): that row starts at zero and never gets a gradient,
      so training leaves it as it is. A negative value counts from the end (V + idx).
    * ``weight=`` / ``grad=``: optional preallocated C-contiguous (V, D) arrays of
      ``dtype`` (e.g. views into a model's parameter arena) that the layer uses as its
      storage instead of allocating; they are initialised in place, as above. Use
      ``load_state_dict`` to put given values in.

    ``forward(indices)`` takes integers of any shape (...) in 0..V-1 and returns
    (..., D); ``backward(dout)`` accumulates (+=) into ``grad`` and returns None.
    """

    def __init__(self, num_embeddings, embedding_dim, dtype="float32", seed=None,
                 padding_idx=None, *, weight=None, grad=None):
        V = self.num_embeddings = _positive_int(num_embeddings, "num_embeddings")
        D = self.embedding_dim = _positive_int(embedding_dim, "embedding_dim")
        self.dtype = dt = float_dtype(dtype)
        if padding_idx is not None:
            if isinstance(padding_idx, bool) or not isinstance(padding_idx, numbers.Integral):
                raise TypeError(f"padding_idx must be an int or None, "
                                f"got {type(padding_idx).__name__}")
            if not -V <= padding_idx < V:
                raise ValueError(f"padding_idx must be in -{V}..{V - 1} (num_embeddings={V}), "
                                 f"got {padding_idx}")
            padding_idx = int(padding_idx) % V
        self.padding_idx = padding_idx
        if weight is not None:
            weight = _storage(weight, "weight", (V, D), dt)
        if grad is not None:
            grad = _storage(grad, "grad", (V, D), dt)
        if weight is not None and grad is not None and np.shares_memory(weight, grad):
            raise ValueError("weight and grad must not overlap in memory")
        self._layout = [("weight", (V, D))]
        self._make_arena()
        if weight is not None or grad is not None:      # the caller's storage
            self._bind(self.flat_params if weight is None else weight.reshape(-1),
                       self.flat_grads if grad is None else grad.reshape(-1))
        # N(0, 1) like torch.nn.Embedding; drawn in float64 so float32 and float64 tables
        # of one seed agree to rounding.
        self.weight[...] = np.random.default_rng(seed).standard_normal((V, D))
        self.after_init()
        self.training = True
        self._indices = None            # flat int32/int64 copy of the last forward's
        self._indices_shape = None
        self._order = None              # stable argsort of _indices (large tables), by backward

    # ---- parameters ----------------------------------------------------------------------

    @property
    def weight(self):
        """The (V, D) table (a view into ``flat_params``)."""
        return self.params["weight"]

    @property
    def grad(self):
        """The (V, D) gradient (a view into ``flat_grads``, accumulated by backward)."""
        return self.grads["weight"]

    def get_config(self):
        """The constructor's arguments (JSON-able), without seed and storage."""
        return dict(num_embeddings=self.num_embeddings, embedding_dim=self.embedding_dim,
                    dtype=self.dtype.name, padding_idx=self.padding_idx)

    # ---- the layer interface (cylstm.base.Layer) --------------------------------------

    takes_tokens = True

    def connect(self, spec):
        if spec is not None:
            raise ValueError("an Embedding must be the first layer (it takes token ids)")
        return Features(self.embedding_dim, 0, True)

    def init_roles(self):
        return [("weight", "table")]

    def after_init(self):
        if self.padding_idx is not None:
            self.weight[self.padding_idx] = 0

    # ---- forward / backward --------------------------------------------------------------

    def _check_indices(self, indices):
        """indices as a flat int32/int64 C-contiguous copy, and their shape."""
        indices = as_array(indices, "indices", "an array of integers")
        if indices.dtype.kind not in "iu":
            raise TypeError(f"indices must hold integers, got dtype {indices.dtype}")
        shape = indices.shape
        if indices.dtype in _KERNEL_INTS:
            flat = np.array(indices, copy=True, order="C").reshape(-1)
        else:
            if (indices.dtype.kind == "u" and indices.size
                    and indices.max() > np.iinfo(np.int64).max):
                raise ValueError(f"indices must be in 0..{self.num_embeddings - 1} "
                                 f"(num_embeddings={self.num_embeddings}), got {indices.max()}")
            flat = indices.astype(np.int64).reshape(-1)
        return flat, shape

    def token_batch(self, indices):
        """The batch's ids (B, T) as a TokenBatch, for a next layer that takes them
        (``takes_token_batch``) instead of this layer's output; see TokenBatch. None
        when the output is not the table's rows (a subclass with its own forward): the
        model then runs this layer's forward."""
        cls = type(self)
        if any(getattr(cls, f) is not getattr(Embedding, f)
               for f in ("forward", "backward", "forward_batch", "backward_batch")):
            return None
        return TokenBatch(self, indices)

    def forward(self, indices):
        """out[..., :] = weight[indices[...], :]: integers (...) in 0..V-1 -> (..., D).
        Keeps a copy of the indices for backward."""
        flat, shape = self._check_indices(indices)
        out = np.empty((flat.size, self.embedding_dim), self.dtype)
        _ops.embedding_forward(out=out, weight=self.weight, indices=flat,
                               n_parts=N_PARTS, n_threads=get_num_threads())
        self._indices, self._indices_shape, self._order = flat, shape, None
        return out.reshape(shape + (self.embedding_dim,))

    def backward(self, dout):
        """grad[indices[n]] += dout[n] for the last forward's indices (repeated indices
        add up; the padding_idx row gets nothing). dout: (..., D), the forward output's
        shape, converted to the table's dtype. Returns None (there is no input gradient
        for integer indices)."""
        if self._indices is None:
            raise RuntimeError("Embedding.backward() needs a forward() first")
        want = self._indices_shape + (self.embedding_dim,)
        if not isinstance(dout, np.ndarray):
            try:
                dout = np.asarray(dout)
            except Exception as e:
                raise TypeError(f"dout must be an array, got {type(dout).__name__}: {e}") from None
        if dout.dtype.kind not in "biuf":
            raise TypeError(f"dout must hold real numbers, got dtype {dout.dtype}")
        if dout.shape != want:
            raise ValueError(f"dout must have shape {_shape(want)} (the forward output's), "
                             f"got {_shape(dout.shape)}")
        dout = _rows3(dout.astype(self.dtype, copy=False), self.embedding_dim)
        # A small table's group sums stay in cache: the kernel walks dout in order, no sort.
        scratch = _ops.scatter_scratch(self.num_embeddings, self.embedding_dim, self.dtype,
                                       N_PARTS)
        if scratch is None and self._order is None:     # a large one: grouped by index
            # A stable sort's permutation is unique, so sorting the indices as int16 (radix
            # sort, where they fit: 3200 of them 9 us against 33) gives the same order.
            keys = (self._indices.astype(np.int16) if self.num_embeddings <= 1 << 15
                    else self._indices)
            self._order = np.argsort(keys, kind="stable").astype(np.int64, copy=False)
        acc, seen = scratch or (None, None)
        _ops.embedding_backward(
            dweight=self.grad, dout=dout, indices=self._indices,
            order=None if scratch else self._order, acc=acc, seen=seen,
            padding_idx=-1 if self.padding_idx is None else self.padding_idx,
            n_parts=N_PARTS, n_threads=get_num_threads(),
        )
        return None

    def __repr__(self):
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return (f"Embedding({self.num_embeddings}, {self.embedding_dim}, "
                f"dtype={self.dtype.name!r}{pad})")


class TokenBatch:
    """A batch of token ids (B, T) that an Embedding hands to the layer after it, in
    place of the vectors it would look up (``Sequential`` does this when that layer's
    ``takes_token_batch`` is True).

    The next layer either takes the ids and the table itself (an LSTM projects the
    table once, E W_ih^T + b, instead of every embedded row: cylstm.functional,
    ``token_table``), and then its backward accumulates the Embedding's gradient and
    returns None; or it calls ``embed()``, which is the Embedding's forward (its
    backward then follows as usual). The ids are checked here, with the Embedding's
    messages, so both ways refuse the same input.
    """

    __slots__ = ("embedding", "ids")

    def __init__(self, embedding, indices):
        flat, shape = embedding._check_indices(indices)
        if len(shape) != 2:
            raise ValueError(f"indices must have shape (B, T), got {_shape(shape)}")
        V = embedding.num_embeddings
        if flat.size:
            lo, hi = int(flat.min()), int(flat.max())
            if lo < 0 or hi >= V:
                n = int(np.argmax((flat < 0) | (flat >= V)))
                raise ValueError(f"indices must be in 0..{V - 1} (num_embeddings={V}), "
                                 f"got {flat[n]} at flat position {n}")
        self.embedding = embedding
        self.ids = flat.reshape(shape)          # (B, T), a private copy

    @property
    def shape(self):
        return self.ids.shape

    def time_major(self, order=None):
        """The ids (T, B) int32, C-contiguous, the batch's rows in ``order`` if given."""
        ids = self.ids if order is None else self.ids[order]
        return np.ascontiguousarray(ids.T, dtype=np.int32)

    def embed(self):
        """The Embedding's output (B, T, D) for these ids: its forward, which readies its
        backward."""
        return self.embedding.forward(self.ids)
