"""Optimisers over a model's parameter arena: SGD, Adam, AdamW, RMSprop, and global
gradient-norm clipping.

Every parameter of a model lives in one flat array and every gradient in another of the
same layout (docs/architecture.md, "One arena"), so a step is one compiled
kernel over one array (src/cylstm/_optim.pyx), not a loop over tensors::

    lstm = cylstm.LSTM(8, 32)
    opt = cylstm.optim.Adam(lstm, lr=1e-3)           # or Adam(lstm.flat_params, lstm.flat_grads)
    for x, target in batches:
        y, _ = lstm(x)
        opt.zero_grad()
        lstm.backward(2 * (y - target) / y.size)
        opt.step()

The update rules are torch.optim's (SGD, Adam, AdamW, RMSprop), with the operations in
the same order (see each class), so in float64 the parameters agree with torch to a few
units in the last place after many steps. Each step

* updates ``params`` in place and never writes ``grads`` (except when clipping),
* allocates no arrays: the state buffers are allocated once, at construction,
* runs in parallel over fixed parts of the arena (``cylstm._threads.N_PARTS``), so the
  result is bitwise identical for any thread count (``cylstm.threads(n)``).

``lr`` is a settable attribute (validated), for learning-rate schedules. The other
hyper-parameters are read-only; ``load_state_dict`` restores them with the state.
"""

import math
import numbers

import numpy as np

from . import _optim
from ._threads import N_PARTS, get_num_threads

__all__ = ["clip_grad_norm", "SGD", "Adam", "AdamW", "RMSprop"]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# ---------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------

def _arena_array(a, name, *, owner=""):
    """Check that `a` is a writeable, C-contiguous float32/float64 ndarray; return its
    flat (N,) view (a view, never a copy: the optimiser writes through it)."""
    where = f"{owner}: " if owner else ""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{where}{name} must be a numpy.ndarray (a model's flat_params / "
                        f"flat_grads), got {type(a).__name__}")
    if a.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{where}{name} must have dtype float32 or float64, got {a.dtype}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{where}{name} must be C-contiguous (it is updated in place, so "
                         f"it cannot be converted); got strides {a.strides} for shape "
                         f"{a.shape}")
    if not a.flags.writeable:
        raise ValueError(f"{where}{name} must be writeable (it is updated in place)")
    return a.reshape(-1)


def _real(value, name, owner):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be finite, got {value}")
    return value


def _at_least(value, name, owner, low=0.0):
    value = _real(value, name, owner)
    if not value >= low:
        raise ValueError(f"{owner}: {name} must be >= {low}, got {value}")
    return value


def _positive(value, name, owner):
    value = _real(value, name, owner)
    if not value > 0:
        raise ValueError(f"{owner}: {name} must be > 0, got {value}")
    return value


def _unit(value, name, owner, *, closed=False):
    """0 <= value < 1 (or <= 1 when closed)."""
    value = _real(value, name, owner)
    if not (0 <= value <= 1 if closed else 0 <= value < 1):
        raise ValueError(f"{owner}: {name} must be in [0, 1{']' if closed else ')'}, "
                         f"got {value}")
    return value


def _clip_norm(value, owner):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: clip_norm must be a real number or None, "
                        f"got {type(value).__name__}")
    value = float(value)
    if not value > 0:      # also rejects NaN; +inf is allowed and never clips
        raise ValueError(f"{owner}: clip_norm must be > 0 or None, got {value}")
    return value


def _flag(value, name, owner):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{owner}: {name} must be a bool, got {type(value).__name__}")
    return bool(value)


# ---------------------------------------------------------------------------------------
# Clipping
# ---------------------------------------------------------------------------------------

def _norm(flat):
    return math.sqrt(_optim.sumsq(flat, N_PARTS, get_num_threads()))


def _clip_flat(flat, max_norm, norm=None):
    """Clip in place; ``norm``: flat's norm if the caller has it already (one pass fewer)."""
    if norm is None:
        norm = _norm(flat)
    if math.isfinite(norm):
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            _optim.scale(flat, coef, N_PARTS, get_num_threads())
    return norm


def clip_grad_norm(grads, max_norm):
    """Scale ``grads`` in place so that their global L2 norm is at most ``max_norm``;
    return the norm before clipping, as a Python float.

    ``grads`` is a model's flat gradient array (or a model: its ``.flat_grads`` is
    used), float32 or float64, C-contiguous and writeable. As
    ``torch.nn.utils.clip_grad_norm_``::

        norm = sqrt(sum(g_i^2))
        coef = max_norm / (norm + 1e-6)
        if coef < 1:  g *= coef

    The sum of squares is accumulated in float64 over fixed parts of the array and
    summed in part order, so the norm is the same bits for any thread count (and more
    accurate than a float32 accumulation). ``max_norm`` must be > 0; ``inf`` never clips.

    A NaN or infinite norm (a NaN or Inf in the gradients, or an overflow) is returned
    and nothing is scaled: the gradients are left as they are, not multiplied by NaN as
    torch would. Check ``math.isfinite(norm)`` to skip such a step.
    """
    if not isinstance(grads, np.ndarray) and hasattr(grads, "flat_grads"):
        grads = grads.flat_grads
    flat = _arena_array(grads, "grads", owner="clip_grad_norm")
    if isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real):
        raise TypeError(f"clip_grad_norm: max_norm must be a real number, "
                        f"got {type(max_norm).__name__}")
    max_norm = float(max_norm)
    if not max_norm > 0:
        raise ValueError(f"clip_grad_norm: max_norm must be > 0, got {max_norm}")
    return _clip_flat(flat, max_norm)


# ---------------------------------------------------------------------------------------
# The optimisers
# ---------------------------------------------------------------------------------------

class Optimizer:
    """Base class: holds the arena (params, grads), the step count, the state buffers
    and the hyper-parameters. Subclasses define ``_HYPER`` (names, in signature order),
    ``_check_hyper`` and ``_update``."""

    _HYPER = ()

    def __init__(self, params, grads, hyper):
        name = type(self).__name__
        if grads is None:
            if hasattr(params, "flat_params") and hasattr(params, "flat_grads"):
                params, grads = params.flat_params, params.flat_grads
            else:
                raise TypeError(f"{name}: grads is required unless the first argument is a "
                                f"model with .flat_params and .flat_grads, got "
                                f"{type(params).__name__}")
        elif not isinstance(grads, np.ndarray) and hasattr(params, "flat_params"):
            raise TypeError(f"{name}: the first argument is a model, so pass the "
                            f"hyper-parameters by keyword: {name}(model, lr=...); "
                            f"got grads={grads!r}")
        self._params = _arena_array(params, "params", owner=name)
        self._grads = _arena_array(grads, "grads", owner=name)
        if params.shape != grads.shape:
            raise ValueError(f"{name}: params and grads must have the same shape, got "
                             f"params {params.shape} and grads {grads.shape}")
        if params.dtype != grads.dtype:
            raise TypeError(f"{name}: params and grads must have the same dtype, got "
                            f"params {params.dtype} and grads {grads.dtype}")
        if self._params.size and np.may_share_memory(self._params, self._grads):
            raise ValueError(f"{name}: params and grads must be different arrays "
                             f"(they share memory)")
        self.params, self.grads = params, grads
        self._hyper = self._check_hyper(dict(hyper))
        self._state = {}
        self._step = 0
        self._ensure_state()

    def __getstate__(self):
        d = self.__dict__.copy()
        del d["_params"], d["_grads"]
        return d

    def __setstate__(self, d):
        # copy.deepcopy / pickle: the flat views are rebuilt on the copied arrays, so
        # the copy updates its own model's arena, not a detached copy of it
        self.__dict__.update(d)
        self._params, self._grads = self.params.reshape(-1), self.grads.reshape(-1)

    # -- hyper-parameters -----------------------------------------------------------------

    @property
    def lr(self):
        """Learning rate (settable, >= 0, finite), read at every step."""
        return self._hyper["lr"]

    @lr.setter
    def lr(self, value):
        self._hyper["lr"] = _at_least(value, "lr", type(self).__name__)

    @property
    def clip_norm(self):
        """Global gradient-norm bound applied before each step, or None (read-only)."""
        return self._hyper["clip_norm"]

    @property
    def hyper_parameters(self):
        """A copy of the hyper-parameters, by name."""
        return dict(self._hyper)

    @property
    def step_count(self):
        """Steps taken so far (restored by load_state_dict)."""
        return self._step

    def __getattr__(self, name):
        # Read-only access to the other hyper-parameters (momentum, betas, ...).
        hyper = self.__dict__.get("_hyper")
        if hyper is not None and name in hyper:
            return hyper[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name, value):
        if name in type(self)._HYPER and name not in ("lr",):
            raise AttributeError(f"{type(self).__name__}.{name} is read-only (only lr is "
                                 f"settable); build a new optimiser or use load_state_dict")
        object.__setattr__(self, name, value)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self._hyper.items())
        return (f"{type(self).__name__}({args}; {self._params.size} {self._params.dtype} "
                f"parameters, step {self._step})")

    # -- state ----------------------------------------------------------------------------

    def _buffer_names(self, hyper):
        """Names of the state buffers these hyper-parameters need."""
        raise NotImplementedError

    def _ensure_state(self):
        """Allocate (zeroed) any buffer the hyper-parameters need and do not have yet;
        drop the ones they no longer need. Never called by step()."""
        need = self._buffer_names(self._hyper)
        for key in list(self._state):
            if key not in need:
                del self._state[key]
        for key in need:
            if key not in self._state:
                self._state[key] = np.zeros_like(self._params)

    # -- the public methods ---------------------------------------------------------------

    def zero_grad(self):
        """Set every gradient to zero, in place."""
        self._grads.fill(0)

    def step(self):
        """One update of params, in place (see the class docstring for the equations).

        With clip_norm set, the gradients are first clipped in place to that global norm
        (clip_grad_norm) and the norm before clipping is returned; otherwise None.
        A non-finite norm leaves the gradients unscaled, and the update then carries the
        NaN/Inf into params: call clip_grad_norm yourself first to skip such steps.
        """
        return self._step_with_norm(None)

    def _step_with_norm(self, norm):
        """``step()`` for a caller that has just computed the norm of the gradients as
        they are (Sequential.train_step checks it is finite): clipping reuses it."""
        if self._hyper["clip_norm"] is not None:
            norm = _clip_flat(self._grads, self._hyper["clip_norm"], norm)
        else:
            norm = None
        self._step += 1
        self._update(N_PARTS, get_num_threads())
        return norm

    def state_dict(self):
        """A checkpoint: {"optimizer": class name, "step": int, every hyper-parameter by
        name, every state buffer by name (a copy, a (N,) NumPy array)}."""
        d = {"optimizer": type(self).__name__, "step": self._step}
        d.update(self._hyper)
        for key, buf in self._state.items():
            d[key] = buf.copy()
        return d

    def load_state_dict(self, state):
        """Restore a checkpoint made by ``state_dict()`` of the same optimiser class and
        arena size: step count, hyper-parameters and buffers (copied into this
        optimiser's own buffers, converted to its dtype). Everything is checked before
        anything changes. Values may also be 0-d arrays (as from ``np.load``).
        Returns self."""
        name = type(self).__name__
        if not hasattr(state, "keys"):
            raise TypeError(f"{name}.load_state_dict: state must be a dict, "
                            f"got {type(state).__name__}")
        state = dict(state)
        kind = state.get("optimizer")
        if kind is not None and not isinstance(kind, str):
            kind = str(np.asarray(kind))
        if kind != name:
            raise ValueError(f"{name}.load_state_dict: this state is from optimizer "
                             f"{kind!r}, not {name!r}")
        hyper = {}
        for key in self._HYPER:
            if key not in state:
                raise ValueError(f"{name}.load_state_dict: missing key {key!r}")
            hyper[key] = _plain(state[key])
        hyper = self._check_hyper(hyper)
        if "step" not in state:
            raise ValueError(f"{name}.load_state_dict: missing key 'step'")
        step = _plain(state["step"])
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"{name}.load_state_dict: step must be an int >= 0, got {step!r}")
        need = self._buffer_names(hyper)
        unknown = set(state) - {"optimizer", "step"} - set(self._HYPER) - set(need)
        if unknown:
            raise ValueError(f"{name}.load_state_dict: unexpected keys {sorted(unknown)} "
                             f"(expected buffers {list(need)})")
        buffers = {}
        for key in need:
            if key not in state:
                raise ValueError(f"{name}.load_state_dict: missing buffer {key!r}")
            b = np.asarray(state[key])
            if b.shape != self._params.shape:
                raise ValueError(f"{name}.load_state_dict: buffer {key!r} has shape "
                                 f"{b.shape}, wanted {self._params.shape}")
            if not np.issubdtype(b.dtype, np.floating):
                raise TypeError(f"{name}.load_state_dict: buffer {key!r} must be a float "
                                f"array, got dtype {b.dtype}")
            buffers[key] = b
        self._hyper = hyper
        self._step = int(step)
        self._ensure_state()
        for key, b in buffers.items():
            np.copyto(self._state[key], b, casting="same_kind")
        return self


def _plain(v):
    """0-d arrays (np.load) to Python scalars; 1-d pairs (betas) to tuples."""
    if isinstance(v, np.ndarray):
        if v.ndim == 0:
            v = v.item()
        else:
            v = tuple(v.reshape(-1).tolist())     # (object arrays hold plain Python values)
    elif isinstance(v, np.generic):
        v = v.item()
    elif isinstance(v, list):
        v = tuple(v)
    return v


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, Nesterov momentum and L2 weight decay;
    ``torch.optim.SGD`` (dampening 0, maximize False), element by element::

        g   = grad + weight_decay * p                       (if weight_decay != 0)
        buf = g                       on the first step     (if momentum != 0)
        buf = momentum * buf + g      afterwards
        d   = g + momentum * buf      if nesterov, else d = buf   (momentum != 0; else d = g)
        p   = p - lr * d

    ``SGD(params, grads, lr, ...)`` with the model's flat arrays, or ``SGD(model, lr=...)``.
    ``lr`` is required; momentum >= 0; nesterov needs momentum > 0; weight_decay >= 0;
    clip_norm: None, or clip the gradients to this global norm before each step.
    State: ``momentum_buffer`` (only when momentum != 0).
    """

    _HYPER = ("lr", "momentum", "nesterov", "weight_decay", "clip_norm")

    def __init__(self, params, grads=None, lr=None, momentum=0.0, nesterov=False,
                 weight_decay=0.0, clip_norm=None):
        if lr is None and (grads is None or isinstance(grads, np.ndarray)):
            raise TypeError("SGD: lr is required, e.g. SGD(model, lr=0.1)")
        super().__init__(params, grads, dict(lr=lr, momentum=momentum, nesterov=nesterov,
                                             weight_decay=weight_decay, clip_norm=clip_norm))

    def _check_hyper(self, h):
        o = "SGD"
        h = dict(lr=_at_least(h["lr"], "lr", o), momentum=_at_least(h["momentum"], "momentum", o),
                 nesterov=_flag(h["nesterov"], "nesterov", o),
                 weight_decay=_at_least(h["weight_decay"], "weight_decay", o),
                 clip_norm=_clip_norm(h["clip_norm"], o))
        if h["nesterov"] and h["momentum"] <= 0:
            raise ValueError("SGD: nesterov=True needs momentum > 0 (and zero dampening)")
        return h

    def _buffer_names(self, h):
        return ("momentum_buffer",) if h["momentum"] != 0 else ()

    def _update(self, n_parts, n_threads):
        h = self._hyper
        _optim.sgd_step(param=self._params, momentum_buffer=self._state.get("momentum_buffer"),
                        grad=self._grads, lr=h["lr"], momentum=h["momentum"],
                        weight_decay=h["weight_decay"], nesterov=h["nesterov"],
                        first=self._step == 1, n_parts=n_parts, n_threads=n_threads)


class Adam(Optimizer):
    """Adam with L2 weight decay and bias correction; ``torch.optim.Adam`` (amsgrad
    False), element by element, at step t = 1, 2, ...::

        g  = grad + weight_decay * p                         (if weight_decay != 0)
        m  = m + (1 - beta1) * (g - m)                       (torch's lerp)
        v  = beta2 * v + (1 - beta2) * g * g
        p  = p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    ``Adam(params, grads, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
    clip_norm=None)`` or ``Adam(model, lr=...)``. lr >= 0; 0 <= beta < 1; eps > 0;
    weight_decay >= 0. State: ``exp_avg`` (m) and ``exp_avg_sq`` (v), zeros at first.
    """

    _HYPER = ("lr", "betas", "eps", "weight_decay", "clip_norm")
    _DECOUPLED = False

    def __init__(self, params, grads=None, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0, clip_norm=None):
        super().__init__(params, grads, dict(lr=lr, betas=betas, eps=eps,
                                             weight_decay=weight_decay, clip_norm=clip_norm))

    def _check_hyper(self, h):
        o = type(self).__name__
        betas = h["betas"]
        if isinstance(betas, np.ndarray):
            betas = tuple(betas.tolist())
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"{o}: betas must be a pair (beta1, beta2), got {betas!r}")
        return dict(lr=_at_least(h["lr"], "lr", o),
                    betas=(_unit(betas[0], "betas[0]", o), _unit(betas[1], "betas[1]", o)),
                    eps=_positive(h["eps"], "eps", o),
                    weight_decay=_at_least(h["weight_decay"], "weight_decay", o),
                    clip_norm=_clip_norm(h["clip_norm"], o))

    def _buffer_names(self, h):
        return ("exp_avg", "exp_avg_sq")

    def _update(self, n_parts, n_threads):
        h = self._hyper
        beta1, beta2 = h["betas"]
        t = self._step
        # Python floats, in torch's order: step_size = lr / bc1, bc2 ** 0.5.
        bias_correction1 = 1 - beta1 ** t
        bias_correction2 = 1 - beta2 ** t
        step_size = h["lr"] / bias_correction1
        kw = dict(param=self._params, exp_avg=self._state["exp_avg"],
                  exp_avg_sq=self._state["exp_avg_sq"], grad=self._grads,
                  beta1=beta1, beta2=beta2, eps=h["eps"], weight_decay=h["weight_decay"],
                  step_size=step_size, bias_correction2_sqrt=bias_correction2 ** 0.5,
                  n_parts=n_parts, n_threads=n_threads)
        if self._DECOUPLED:
            _optim.adamw_step(lr=h["lr"], **kw)
        else:
            _optim.adam_step(**kw)


class AdamW(Adam):
    """Adam with decoupled weight decay; ``torch.optim.AdamW`` (amsgrad False), element
    by element, at step t = 1, 2, ...::

        p  = p * (1 - lr * weight_decay)
        m  = m + (1 - beta1) * (grad - m)                    (torch's lerp)
        v  = beta2 * v + (1 - beta2) * grad * grad
        p  = p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    ``AdamW(params, grads, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
    clip_norm=None)`` or ``AdamW(model, lr=...)``. State: ``exp_avg``, ``exp_avg_sq``.
    """

    _DECOUPLED = True

    def __init__(self, params, grads=None, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=1e-2, clip_norm=None):
        super().__init__(params, grads, lr=lr, betas=betas, eps=eps,
                         weight_decay=weight_decay, clip_norm=clip_norm)


class RMSprop(Optimizer):
    """RMSprop (not centered) with momentum and L2 weight decay; ``torch.optim.RMSprop``
    (centered False), element by element::

        g   = grad + weight_decay * p                        (if weight_decay != 0)
        v   = alpha * v + (1 - alpha) * g * g
        avg = sqrt(v) + eps
        momentum > 0:  buf = momentum * buf + g / avg;  p = p - lr * buf
        else:          p = p - lr * g / avg

    ``RMSprop(params, grads, lr=1e-2, alpha=0.99, eps=1e-8, momentum=0, weight_decay=0,
    clip_norm=None)`` or ``RMSprop(model, lr=...)``. lr >= 0; 0 <= alpha <= 1; eps > 0;
    momentum >= 0; weight_decay >= 0. State: ``square_avg`` (v) and, when momentum > 0,
    ``momentum_buffer``, zeros at first.
    """

    _HYPER = ("lr", "alpha", "eps", "momentum", "weight_decay", "clip_norm")

    def __init__(self, params, grads=None, lr=1e-2, alpha=0.99, eps=1e-8, momentum=0.0,
                 weight_decay=0.0, clip_norm=None):
        super().__init__(params, grads, dict(lr=lr, alpha=alpha, eps=eps, momentum=momentum,
                                             weight_decay=weight_decay, clip_norm=clip_norm))

    def _check_hyper(self, h):
        o = "RMSprop"
        return dict(lr=_at_least(h["lr"], "lr", o), alpha=_unit(h["alpha"], "alpha", o, closed=True),
                    eps=_positive(h["eps"], "eps", o),
                    momentum=_at_least(h["momentum"], "momentum", o),
                    weight_decay=_at_least(h["weight_decay"], "weight_decay", o),
                    clip_norm=_clip_norm(h["clip_norm"], o))

    def _buffer_names(self, h):
        return ("square_avg", "momentum_buffer") if h["momentum"] > 0 else ("square_avg",)

    def _update(self, n_parts, n_threads):
        h = self._hyper
        _optim.rmsprop_step(param=self._params, square_avg=self._state["square_avg"],
                            momentum_buffer=self._state.get("momentum_buffer"),
                            grad=self._grads, lr=h["lr"], alpha=h["alpha"], eps=h["eps"],
                            momentum=h["momentum"], weight_decay=h["weight_decay"],
                            n_parts=n_parts, n_threads=n_threads)
