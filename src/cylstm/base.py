"""The layer interface: what every layer implements, and all that models, trainers,
initialisers and model files use of a layer.

A new layer subclasses ``Layer`` (or ``Parametrised`` when it has parameters) and
implements the methods below; ``Sequential``, ``cylstm.init``, ``cylstm.io`` and the
training loop then handle it with no change, because none of them looks at a layer's
type. Arrays are batch-first: (B, T, F) per step, (B, F) per sequence.

Structure (read once, when a model chains its layers)
    dtype             np.float32 / np.float64, or None for a layer that keeps its
                      input's dtype (Dropout, LastStep)
    takes_tokens      True: integer ids in; such a layer can only come first
    recurrent         True: carries a state from call to call, which the model hands
                      back in (streaming with ``step``, truncated BPTT)
    connect(spec)     the ``Features`` coming in -> the ``Features`` going out; raises
                      ValueError when the layer cannot take them (spec is None for the
                      model's input)
Compute
    forward_batch(x, lengths=None, state=None) -> (y, final state or None)
                      lengths (B,) or None: valid steps of each sequence; padding never
                      reaches a state, and outputs at padded steps are zero or ignored
    backward_batch(dy) -> dx, or None when nothing lies below (integer input);
                      parameter gradients are *accumulated* into ``grads``
    step(x_t, state) -> y_t    one time step of B streams, eval mode
    initial_state(batch)       (recurrent layers) the state ``step`` starts from
    token_batch(x), takes_token_batch
                      optional: a first layer with ``token_batch`` (the Embedding)
                      hands its ids, as a ``TokenBatch``, to a second layer whose
                      ``takes_token_batch`` is True (the LSTM); that layer's
                      forward_batch then gets the TokenBatch and either uses the
                      table itself (its backward_batch then returns None, the first
                      layer's gradient accumulated) or calls ``embed()``;
                      ``token_batch`` may return None (then the first layer's forward
                      runs as usual)
Parameters (``Parametrised`` implements these from ``_layout``)
    _layout           [(name, shape)] in arena order; empty for a layer without any
    params / grads    {name: view}; flat_params / flat_grads the arrays behind them
    _bind(fp, fg)     move the parameters into slices of a model's arena
    zero_grad(), state_dict(), load_state_dict(d, strict=True)
    init_roles()      [(name, role)] telling ``cylstm.init`` what each parameter is:
                      "table" (embedding rows), "weight" (input-side weights),
                      "recurrent" (weights applied to the state), "bias",
                      "forget_bias" (a gate bias that Keras's scheme starts at 1 on the
                      forget gate); ``init_fan`` is PyTorch's fan for its U(-k, k)
    after_init()      re-establish invariants after an initialiser wrote the values
Modes, randomness and files
    train(mode=True), eval(), training
    seed_streams(rng) take a random stream (dropout masks) from a seeded model
    get_config()      the constructor's keyword arguments, plain JSON;
                      ``from_config(config)`` rebuilds the layer from them
Every class defined as a subclass of ``Layer`` is registered by its name, so model
files can name it (``registered()``).
"""

import math
from typing import NamedTuple, Optional

import numpy as np

from ._check import to_numpy

__all__ = ["Layer", "Parametrised", "Features", "registered"]

_REGISTRY = {}


def registered():
    """{class name: class} of every Layer subclass (and model class) defined so far."""
    return dict(_REGISTRY)


def _register(cls):
    _REGISTRY.setdefault(cls.__name__, cls)
    return cls


class Features(NamedTuple):
    """What flows between two layers: ``size`` features (None: not known), of which the
    last ``reverse`` run backwards in time (a bidirectional LSTM's reverse direction),
    one vector per step (``per_step``) or one per sequence."""
    size: Optional[int]
    reverse: int = 0
    per_step: bool = True


class Layer:
    """See the module docstring. Defaults suit a parameter-free, stateless layer."""

    dtype = None
    takes_tokens = False
    recurrent = False
    _layout = ()
    training = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _register(cls)

    # ---- structure -------------------------------------------------------------------

    def connect(self, spec):
        return spec if spec is not None else Features(None)

    # ---- compute ---------------------------------------------------------------------

    def forward_batch(self, x, lengths=None, state=None):
        return self.forward(x), None

    def backward_batch(self, dy):
        return self.backward(dy)

    def step(self, x_t, state=None):
        return self.forward_batch(x_t)[0]

    # ---- parameters, randomness, modes, files -----------------------------------------

    def init_roles(self):
        return []

    def after_init(self):
        pass

    def seed_streams(self, rng):
        pass

    def train(self, mode=True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


# ---- the parameter arena ----------------------------------------------------------------

# Arenas start on a 64-byte boundary (a cache line, an AVX-512 vector), so a weight
# whose offset is a multiple of 64 bytes (most: 4H * I floats precede W_hh) has aligned
# rows. The streaming step's dot kernel reads such rows with plain aligned loads, and
# about a fifth faster than rows 16 bytes past a line (NumPy's own large arrays).
ARENA_ALIGN = 64


def zeros_aligned(n, dtype, align=ARENA_ALIGN):
    """A zeroed 1-D array of n elements whose data starts on an `align`-byte boundary."""
    dtype = np.dtype(dtype)
    raw = np.zeros(n * dtype.itemsize + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + n * dtype.itemsize].view(dtype)


def arena(layout, dtype):
    """(flat_params, flat_grads, params, grads): zeroed arenas for ``layout`` [(name, shape)]
    and dicts of named views into them."""
    total = sum(math.prod(shape) for _, shape in layout)
    fp, fg = zeros_aligned(total, dtype), zeros_aligned(total, dtype)
    return (fp, fg) + views(layout, fp, fg)


def views(layout, fp, fg):
    params, grads, offset = {}, {}, 0
    for name, shape in layout:
        n = math.prod(shape)
        params[name] = fp[offset:offset + n].reshape(shape)
        grads[name] = fg[offset:offset + n].reshape(shape)
        offset += n
    return params, grads


def _bind_arena(layout, old_fp, old_fg, fp, fg):
    """Copy a layer's arenas into new storage ``fp``/``fg`` (1-D, same size and dtype)
    and return (fp, fg, params, grads) with the views rebuilt on it."""
    for new, old in ((fp, old_fp), (fg, old_fg)):
        if new.shape != old.shape or new.dtype != old.dtype:
            raise ValueError(f"arena must be a {old.dtype} array of shape {old.shape}, got "
                             f"{new.dtype} {new.shape}")
        new[...] = old
    return (fp, fg) + views(layout, fp, fg)


def load_into(params, state_dict, strict):
    """Copy a state dict into the named views ``params``. Every key is checked before
    anything is copied, so a bad dict leaves the parameters unchanged."""
    if not hasattr(state_dict, "keys"):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    keys = set(state_dict.keys())
    names = set(params)
    missing, unexpected = sorted(names - keys), sorted(keys - names)
    if strict and (missing or unexpected):
        raise KeyError(f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
    staged = {}
    for name in sorted(names & keys):
        a = to_numpy(state_dict[name], name)
        if a.dtype.kind not in "biuf":
            raise TypeError(f"state dict entry {name!r} must be real numbers, got {a.dtype}")
        if a.shape != params[name].shape:
            raise ValueError(f"state dict entry {name!r} has shape {a.shape}, "
                             f"expected {params[name].shape}")
        dtype = params[name].dtype
        with np.errstate(over="ignore", invalid="ignore"):
            a = a.astype(dtype)               # a copy: 1e300 becomes inf in float32
        if not np.isfinite(a).all():
            raise ValueError(f"state dict entry {name!r} has NaN or Inf values (as "
                             f"{dtype}): a model with them computes only NaN")
        staged[name] = a
    for name, a in staged.items():
        np.copyto(params[name], a, casting="unsafe")


class Parametrised(Layer):
    """A layer with parameters: ``_layout`` [(name, shape)] in order, ``flat_params`` /
    ``flat_grads`` arenas, ``params`` / ``grads`` named views into them. A subclass calls
    ``_make_arena()`` once its ``_layout`` and ``dtype`` are set."""

    def _make_arena(self):
        self.flat_params, self.flat_grads, self.params, self.grads = arena(
            self._layout, self.dtype)

    def zero_grad(self):
        """Set every gradient to zero (backward accumulates)."""
        self.flat_grads[...] = 0

    def state_dict(self):
        """A dict of copies of the parameters, by name (PyTorch's), in arena order."""
        return {name: self.params[name].copy() for name, _ in self._layout}

    def load_state_dict(self, state_dict, strict=True):
        """Copy parameters in from a dict of arrays (or torch tensors; torch is never
        imported). Every key is checked before anything is copied, so a bad dict leaves
        the model unchanged. Unknown or missing keys are errors when ``strict``."""
        load_into(self.params, state_dict, strict)
        return self

    def _bind(self, flat_params, flat_grads):
        """Move parameters and gradients into the given arrays (a model's arena slices):
        values are copied, then every view is rebuilt on the new storage."""
        self.flat_params, self.flat_grads, self.params, self.grads = _bind_arena(
            self._layout, self.flat_params, self.flat_grads, flat_params, flat_grads)

    # copy.deepcopy and pickle copy each view as an array of its own; the copy rebuilds
    # its named views on its own arenas, so the one-arena promise holds for copies too.
    def __getstate__(self):
        d = self.__dict__.copy()
        d.pop("params", None)
        d.pop("grads", None)
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self.params, self.grads = views(self._layout, self.flat_params, self.flat_grads)
