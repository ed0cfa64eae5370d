"""Sequential: a stack of layers trained with fit / evaluate / predict, Keras-style.

    model = cylstm.Sequential([
        cylstm.LSTM(8, 64, batch_first=True),
        cylstm.LastStep(),                 # each sequence's last valid step
        cylstm.Linear(64, 10),
    ], seed=0)
    model.compile(loss="cross_entropy", optimizer="adam", lr=3e-3, metrics=["accuracy"])
    history = model.fit(x, y, batch_size=32, epochs=10, validation_split=0.1)
    model.evaluate(x_test, y_test); model.predict(x_test); model.save("m.npz")

Data is batch-first: row n of x is one sequence. x is a float array (N, T, F), an int
array (N, T) when the first layer is an Embedding, or a list of N arrays of different
lengths (padded here, lengths kept). ``lengths`` (N,) marks the valid steps of padded
arrays. Targets y are per sequence ((N,) class indices or (N, K) values) when the
model ends in one vector per sequence (after LastStep), or per step ((N, T) / (N, T, K),
or a list) when it keeps every step (sequence labelling, language models); padded steps
never count in the loss or the metrics.

Every LSTM in the stack gets the lengths (PyTorch's packed semantics), so the padding
never leaks into the state. An LSTM built with batch_first=False works too (the model
transposes around it). All parameters live in one arena (``flat_params``,
``flat_grads``), named "<layer index>.<parameter>" as torch.nn.Sequential names them.
"""

import functools
import math
import numbers
import sys
import time
from typing import NamedTuple

import numpy as np

from . import init as _init
from . import io as _io
from . import losses as _losses
from . import optim as _optim
from ._check import as_array
from ._check import positive_int as _positive_int
from ._threads import loop_hold
from .base import Layer, Parametrised, arena, registered
from .callbacks import Callback
from .layers import Linear, _ragged_order

__all__ = ["Sequential", "History", "Stats", "StepResult", "pad_sequences"]

_BUILTIN_LAYERS = ("Embedding", "LSTM", "Dropout", "LastStep", "Linear")
_OPTIMIZERS = {"sgd": _optim.SGD, "adam": _optim.Adam, "adamw": _optim.AdamW,
               "rmsprop": _optim.RMSprop}
_LOSSES = ("cross_entropy", "mse")
_METRICS = {"cross_entropy": ("accuracy", "perplexity", "bpc"), "mse": ("rmse", "mae")}


def pad_sequences(seqs, dtype=None, name="x"):
    """A list of N arrays (T_n, ...) -> (padded (N, max T_n, ...), lengths (N,) int64).
    Padding is zero. Every array needs at least one step and the same trailing shape."""
    if len(seqs) == 0:
        raise ValueError(f"{name} is an empty list; it needs at least one sequence")
    arrays = []
    for n, s in enumerate(seqs):
        a = np.asarray(s) if dtype is None else np.asarray(s, dtype=dtype)
        if a.ndim < 1 or a.shape[0] < 1:
            raise ValueError(f"{name}[{n}] must have at least one step, got shape {a.shape}")
        if a.dtype.kind not in "biuf":
            raise TypeError(f"{name}[{n}] must hold real numbers, got dtype {a.dtype}")
        if arrays and a.shape[1:] != arrays[0].shape[1:]:
            raise ValueError(f"{name}[{n}] has shape {a.shape}; every sequence needs the "
                             f"trailing shape {arrays[0].shape[1:]} of {name}[0]")
        arrays.append(a)
    lengths = np.array([a.shape[0] for a in arrays], np.int64)
    out = np.zeros((len(arrays), int(lengths.max())) + arrays[0].shape[1:],
                   np.result_type(*arrays))
    for n, a in enumerate(arrays):
        out[n, :a.shape[0]] = a
    return out, lengths


def _in_loop_hold(fn):
    """Run fn inside ``loop_hold``: NumPy's BLAS on one thread and its huge-page hint off
    (cylstm._threads)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with loop_hold:
            return fn(*args, **kwargs)
    return wrapper


class History:
    """What ``fit`` returns: ``history[name]`` is the list of per-epoch values of "loss",
    each metric, "val_..." entries and "lr"; ``epoch`` the epochs run (from 0)."""

    def __init__(self):
        self.history, self.epoch = {}, []

    def _append(self, epoch, logs):
        self.epoch.append(epoch)
        for k, v in logs.items():
            self.history.setdefault(k, []).append(v)

    def __repr__(self):
        last = {k: round(v[-1], 4) for k, v in self.history.items()}
        return f"History({len(self.epoch)} epochs, last {last})"


class _Progress:
    """A one-line progress bar on a terminal: loss, metrics, sequences/s, ETA.

    verbose=0: silent. verbose=1: the live bar and a line per epoch, on a terminal
    only (silent in logs and pipes). verbose=2: a line per epoch, always."""

    def __init__(self, verbose, stream=None):
        self.stream = sys.stdout if stream is None else stream
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.live = verbose == 1 and tty
        self.lines = verbose == 2 or (verbose == 1 and tty)
        self._last_draw = 0.0

    def begin(self, epoch, epochs, total):
        self.epoch, self.epochs, self.total = epoch, epochs, total
        self.t0, self.done, self.rows = time.perf_counter(), 0, 0
        self.sum_loss, self.count = 0.0, 0

    def update(self, rows, loss, count):
        self.done += 1
        self.rows += rows
        self.sum_loss += loss * count
        self.count += count
        now = time.perf_counter()
        if self.live and (now - self._last_draw > 0.1 or self.done == self.total):
            self._last_draw = now
            el = now - self.t0
            width = 24
            fill = int(width * self.done / max(self.total, 1))
            eta = el / self.done * (self.total - self.done)
            loss_ = self.sum_loss / max(self.count, 1)
            self.stream.write(f"\rEpoch {self.epoch + 1}/{self.epochs} "
                              f"[{'=' * fill}{'.' * (width - fill)}] {self.done}/{self.total} "
                              f"loss {loss_:.4f}  {self.rows / max(el, 1e-9):,.0f} seq/s  "
                              f"ETA {eta:4.0f}s ")
            self.stream.flush()

    def end(self, logs):
        if not self.lines:
            return
        el = time.perf_counter() - self.t0
        items = "  ".join(f"{k} {v:.4g}" for k, v in logs.items())
        line = (f"Epoch {self.epoch + 1}/{self.epochs}  {el:.2f}s  "
                f"{self.rows / max(el, 1e-9):,.0f} seq/s  {items}")
        # On a terminal, overwrite the bar and clear the rest of its line.
        self.stream.write(f"\r{line}\x1b[K\n" if self.live else line + "\n")
        self.stream.flush()

    def abort(self):
        if self.live:
            self.stream.write("\n")
            self.stream.flush()


class StepResult(NamedTuple):
    """One batch's figures: the mean ``loss`` over ``count`` counted positions, the
    ``correct`` predictions and the summed ``abs_err`` among them, and ``states``: the
    final state of each recurrent layer (for the next batch of a stream)."""
    loss: float
    count: int
    correct: float
    abs_err: float
    states: list


class Stats:
    """Running sums over batches for one epoch: the loss and each metric. ``add`` takes
    a ``StepResult``; ``logs(metrics, prefix)`` gives {"loss": mean, metric: value}."""

    def __init__(self, loss):
        self.loss = loss
        self.sum_loss = self.count = self.correct = self.abs_err = 0.0

    def add(self, step):
        self.sum_loss += step.loss * step.count
        self.count += step.count
        self.correct += step.correct
        self.abs_err += step.abs_err

    def logs(self, metrics, prefix=""):
        mean = self.sum_loss / self.count if self.count else 0.0
        out = {prefix + "loss": mean}
        for m in metrics:
            if m == "accuracy":
                v = self.correct / self.count if self.count else 0.0
            elif m == "perplexity":
                v = _losses.perplexity(mean)
            elif m == "bpc":
                v = _losses.bits_per_char(mean)
            elif m == "rmse":
                v = math.sqrt(mean)
            else:                                   # mae
                v = self.abs_err / self.count if self.count else 0.0
            out[prefix + m] = float(v)
        return out


class Sequential(Parametrised):
    """Layers applied in order; see the module docstring.

    ``Sequential(layers, seed=None, init=None, loss=None, optimizer=None, metrics=(), **kw)``
    With ``seed``, every parameter is (re)initialised with the ``init`` scheme (default
    "pytorch"; see ``cylstm.init``) and the shuffling and dropout streams are derived
    from it, so a seeded run repeats bitwise (for any thread count). ``loss``,
    ``optimizer``, ``metrics`` and the keywords go to ``compile``.
    """

    def __init__(self, layers, seed=None, init=None, loss=None, optimizer=None, metrics=(),
                 **compile_kwargs):
        layers = list(layers)
        if not layers:
            raise ValueError("Sequential needs at least one layer")
        for i, layer in enumerate(layers):
            if isinstance(layer, Sequential):
                raise TypeError(f"layers[{i}] is a Sequential; a model takes layers, not "
                                f"models: pass its layers (model.layers) instead")
            if not isinstance(layer, Layer):
                raise TypeError(f"layers[{i}] is a {type(layer).__name__}; Sequential takes "
                                f"layers (cylstm.base.Layer: {', '.join(_BUILTIN_LAYERS)} "
                                f"or your own)")
        self.layers = layers
        self.seed = seed
        self.init = init
        self._check_chain()
        self._build_arena()
        if seed is not None or init is not None:
            _init.apply(self, "pytorch" if init is None else init, seed)
        self._seed_streams(seed)
        self.loss = self.optimizer = None
        self.metrics = ()
        self.stop_training = False
        self.training = True
        if loss is not None or optimizer is not None or compile_kwargs:
            self.compile(loss=loss, optimizer=optimizer, metrics=metrics, **compile_kwargs)

    # ---- structure -----------------------------------------------------------------------

    def _check_chain(self):
        """Each layer takes what the one before gives (``Layer.connect``); one dtype."""
        spec, dtypes = None, set()
        for i, layer in enumerate(self.layers):
            try:
                spec = layer.connect(spec)
            except ValueError as e:
                raise ValueError(f"layers[{i}]: {e}") from None
            if layer.dtype is not None:
                dtypes.add(np.dtype(layer.dtype))
        if len(dtypes) > 1:
            raise TypeError(f"all layers need one dtype, got {sorted(d.name for d in dtypes)}")
        self.dtype = dtypes.pop() if dtypes else np.dtype(np.float32)
        self.sequence_output = spec.per_step
        self.token_input = self.layers[0].takes_tokens

    def __getstate__(self):
        return self.__dict__.copy()

    def __setstate__(self, d):
        # copy.deepcopy / pickle copied each layer's arena on its own: put them back
        # into this model's one arena (same values), as _build_arena does.
        self.__dict__.update(d)
        self._bind_layers()

    def _build_arena(self):
        """One parameter arena and one gradient arena for the whole model; every layer's
        parameters become views into them (optimiser steps and clipping are then one
        operation over one array)."""
        layout = []
        for i, layer in enumerate(self.layers):
            layout += [(f"{i}.{name}", shape) for name, shape in getattr(layer, "_layout", [])]
        self._layout = layout
        self.flat_params, self.flat_grads, _, _ = arena(layout, self.dtype)
        self._bind_layers()

    def _bind_layers(self):
        offset = 0
        for layer in self.layers:
            n = sum(math.prod(s) for _, s in getattr(layer, "_layout", []))
            if n:
                layer._bind(self.flat_params[offset:offset + n],
                            self.flat_grads[offset:offset + n])
            offset += n

    @property
    def params(self):
        """{"<i>.<name>": view} of every parameter, in arena order."""
        return {f"{i}.{k}": v for i, l in enumerate(self.layers)
                for k, v in (l.params.items() if getattr(l, "_layout", None) else ())}

    @property
    def grads(self):
        return {f"{i}.{k}": v for i, l in enumerate(self.layers)
                for k, v in (l.grads.items() if getattr(l, "_layout", None) else ())}

    @property
    def num_parameters(self):
        return int(self.flat_params.size)

    def get_config(self):
        # The seed travels with the model so that a loaded checkpoint derives the same
        # shuffling and dropout streams per epoch (fit's initial_epoch resumes bitwise).
        seed = int(self.seed) if isinstance(self.seed, numbers.Integral) else None
        return {"layers": [{"type": type(l).__name__, "config": l.get_config()}
                           for l in self.layers],
                "loss": self.loss, "metrics": list(self.metrics), "seed": seed}

    @classmethod
    def from_config(cls, config):
        """A model of the layers ``get_config`` names (registered Layer classes)."""
        types = registered()
        model = cls([types[spec["type"]].from_config(spec["config"])
                     for spec in config["layers"]])
        if config.get("seed") is not None:   # the streams only: weights come from the file
            model.seed = config["seed"]
            model._seed_streams(model.seed)
        return model

    def _seed_streams(self, seed):
        streams = np.random.SeedSequence(seed).spawn(len(self.layers) + 1)
        self._rng = np.random.default_rng(streams[0])          # one key per epoch
        self._epoch_rng = self._rng                            # this epoch's shuffling
        if seed is not None:
            for layer, ss in zip(self.layers, streams[1:]):
                layer.seed_streams(np.random.default_rng(ss))

    def train(self, mode=True):
        self.training = bool(mode)
        for layer in self.layers:
            layer.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def __repr__(self):
        inner = "".join(f"\n  ({i}) {l!r}" for i, l in enumerate(self.layers))
        return f"Sequential({inner}\n)  # {self.num_parameters:,} parameters, {self.dtype}"

    def save(self, path, include_optimizer=True):
        """Write the model to one .npz file, atomically (see ``cylstm.io.save``)."""
        _io.save(self, path, include_optimizer=include_optimizer)

    # ---- compile -------------------------------------------------------------------------

    def compile(self, loss="cross_entropy", optimizer="adam", metrics=(), lr=None, **kwargs):
        """Choose the loss ("cross_entropy" or "mse"), the optimiser (a name: "sgd",
        "adam", "adamw", "rmsprop", with ``lr`` and keywords such as momentum,
        weight_decay, clip_norm; or an optimiser built on this model) and the metrics
        ("accuracy", "perplexity", "bpc" for cross-entropy; "rmse", "mae" for mse)."""
        if loss not in _LOSSES:
            raise ValueError(f"loss must be one of {_LOSSES}, got {loss!r}")
        if isinstance(metrics, str):
            metrics = (metrics,)
        for m in metrics:
            if m not in _METRICS[loss]:
                raise ValueError(f"metric {m!r} does not go with loss {loss!r}; "
                                 f"choose from {_METRICS[loss]}")
        if optimizer is None:
            optimizer = "adam"
        if isinstance(optimizer, str):
            cls = _OPTIMIZERS.get(optimizer.lower())
            if cls is None:
                raise ValueError(f"optimizer must be one of {sorted(_OPTIMIZERS)} or an "
                                 f"optimiser object, got {optimizer!r}")
            if lr is not None:
                kwargs["lr"] = lr
            if cls is _optim.SGD and "lr" not in kwargs:
                kwargs["lr"] = 0.01
            optimizer = cls(self, **kwargs)
        elif isinstance(optimizer, _optim.Optimizer):
            if optimizer.params is not self.flat_params or optimizer.grads is not self.flat_grads:
                raise ValueError("optimizer must be built on this model "
                                 "(e.g. cylstm.optim.Adam(model, lr=1e-3))")
            if lr is not None:
                optimizer.lr = lr
            if kwargs:
                raise TypeError(f"unexpected keywords {sorted(kwargs)} with an optimiser "
                                f"object")
        else:
            raise TypeError(f"optimizer must be a name or a cylstm.optim optimiser, "
                            f"got {type(optimizer).__name__}")
        self.loss, self.optimizer, self.metrics = loss, optimizer, tuple(metrics)
        return self

    # ---- data ----------------------------------------------------------------------------

    def _inputs(self, x, lengths, name="x"):
        """(x as an array (N, T, ...) of the model's input dtype, lengths (N,) or None)."""
        if isinstance(x, (list, tuple)):
            if lengths is not None:
                raise ValueError(f"lengths must be None when {name} is a list of sequences "
                                 f"(their lengths are taken from the arrays)")
            x, lengths = pad_sequences(x, name=name)
        else:
            x = as_array(x, name, "an array or a list of arrays")
        if self.token_input:
            if x.dtype.kind not in "iu":
                raise TypeError(f"{name} must hold integer token ids (the first layer is an "
                                f"Embedding), got dtype {x.dtype}")
            if x.ndim != 2:
                raise ValueError(f"{name} must have shape (N, T) of token ids, got {x.shape}")
        else:
            if x.dtype.kind not in "biuf":
                raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
            if x.ndim != 3:
                raise ValueError(f"{name} must have shape (N, T, features), got {x.shape}")
            x = x.astype(self.dtype, copy=False)
        N, T = x.shape[:2]
        if N < 1 or T < 1:
            raise ValueError(f"{name} must hold at least one sequence of one step, "
                             f"got shape {x.shape}")
        if lengths is not None:
            lengths = np.asarray(lengths)
            if lengths.dtype.kind not in "iu" or lengths.shape != (N,):
                raise ValueError(f"lengths must be ({N},) integers (one per sequence of "
                                 f"{name}), got {lengths.dtype} {lengths.shape}")
            if lengths.min() < 1 or lengths.max() > T:
                raise ValueError(f"lengths must be in 1..{T} (the steps of {name}), "
                                 f"got values in {lengths.min()}..{lengths.max()}")
            lengths = lengths.astype(np.int64)
        return x, lengths

    def _targets(self, y, N, T, name="y"):
        if isinstance(y, (list, tuple)) and len(y) and np.ndim(y[0]) >= 1 \
                and self.sequence_output:
            y, _ = pad_sequences(y, name=name)
            if y.shape[1] < T:
                y = np.concatenate([y, np.zeros((N, T - y.shape[1]) + y.shape[2:], y.dtype)], 1)
        y = np.asarray(y)
        if y.dtype.kind not in "biuf":
            raise TypeError(f"{name} must hold numbers, got dtype {y.dtype}")
        if y.ndim == 0 or y.shape[0] != N:
            raise ValueError(f"{name} must have one entry per sequence ({N}), got shape "
                             f"{y.shape}")
        if self.sequence_output and (y.ndim < 2 or y.shape[1] != T):
            raise ValueError(f"{name} must have one target per step, shape ({N}, {T}, ...), "
                             f"because the model outputs every step; got {y.shape}")
        if self.loss == "cross_entropy" and y.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integer class indices for cross_entropy, "
                            f"got dtype {y.dtype}")
        return y

    def _check_compiled(self):
        if self.loss is None:
            raise RuntimeError("call model.compile(loss=..., optimizer=...) before fit/evaluate")

    # ---- forward / backward --------------------------------------------------------------

    def _forward(self, x, lengths, states=None, into=None):
        """The stack on one batch; returns (output, [final state of each recurrent layer]).
        ``states``: None, or one state per recurrent layer, in order. ``into``: an array
        the last layer writes its output into (only when ``_writes_into()``)."""
        out, finals = x, []
        states = iter(()) if states is None else iter(states)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if i == last and into is not None:
                out = layer.forward(out, out=into)
                break
            if i == 0 and self._token_pass():
                tokens = layer.token_batch(out)    # the next layer looks the ids up
                if tokens is not None:
                    out = tokens
                    continue
            state = next(states, None) if layer.recurrent else None
            out, final = layer.forward_batch(out, lengths, state)
            if layer.recurrent:
                finals.append(final)
        return out, finals

    def _token_pass(self):
        """True when the first layer hands its token ids on (``token_batch``) to a second
        layer that takes them (``takes_token_batch``: an LSTM, which projects the
        Embedding's table instead of every embedded row; cylstm.embedding.TokenBatch)."""
        layers = self.layers
        return (len(layers) > 1 and getattr(layers[1], "takes_token_batch", False)
                and callable(getattr(layers[0], "token_batch", None)))

    def _writes_into(self):
        """True when the last layer is a plain Linear, whose forward can write straight
        into a slice of predict's result (a subclass may change forward: not assumed)."""
        last = type(self.layers[-1])
        return issubclass(last, Linear) and last.forward is Linear.forward \
            and last.forward_batch is Linear.forward_batch

    def _backward(self, dout):
        for layer in reversed(self.layers):
            dout = layer.backward_batch(dout)
            if dout is None:                       # integer input: nothing below it
                break

    def _loss(self, out, y, lengths, grad=True):
        """(mean loss, its gradient, positions counted, correct, sum |error|); with
        ``grad=False`` the cross-entropy gradient is not computed (None)."""
        mask = None
        if self.sequence_output and lengths is not None:
            mask = np.arange(out.shape[1])[None, :] < lengths[:, None]
        if self.loss == "cross_entropy":
            loss, dout, count, correct = _losses._cross_entropy(
                out, y, mask, -100, "mean", grad=grad)
            return loss, dout, count, correct, 0.0
        if y.shape != out.shape and y.size == out.size:
            y = y.reshape(out.shape)                 # (N,) targets for one output
        loss, dout = _losses.mse(out, y, mask)
        count = out.size if mask is None else int(mask.sum()) * (out.size // mask.size)
        err = np.abs(out - y.astype(out.dtype, copy=False))
        abs_err = float(err.sum() if mask is None else err[mask].sum())
        return loss, dout, count, 0, abs_err

    def _batches(self, N, batch_size, shuffle, lengths=None):
        """Row indices of each batch. A ragged batch comes in the order the LSTM kernels
        run fastest (layers._ragged_order: finished rows are skipped), so the LSTMs need
        not reorder it; the order of rows in a batch changes results only by rounding."""
        order = self._epoch_rng.permutation(N) if shuffle else np.arange(N)
        batches = [order[i:i + batch_size] for i in range(0, N, batch_size)]
        if lengths is None:
            return batches
        out = []
        for idx in batches:
            ragged = _ragged_order(lengths[idx].astype(np.int32))
            out.append(idx if ragged is None else idx[ragged])
        return out

    def _take(self, idx, x, y, lengths):
        """Rows idx, cut to the longest sequence among them (less padding to compute)."""
        lb = None if lengths is None else lengths[idx]
        T = x.shape[1] if lb is None else int(lb.max())
        yb = None if y is None else y[idx]
        if yb is not None and self.sequence_output:          # per-step targets (N, T, ...)
            yb = yb[:, :T]
        return np.ascontiguousarray(x[idx, :T]), yb, lb

    def train_step(self, x, y, lengths=None, states=None, callbacks=(), batch=0):
        """One optimiser step on one prepared batch; returns a ``StepResult``.

        x (B, T, ...) in the model's input dtype, y its targets, lengths (B,) or None,
        states: the recurrent layers' initial states (None: zeros). The order is
        forward, loss, backward, then every callback's ``on_gradients(batch, logs)``
        (logs: "loss", "count", "size", "correct", "abs_err"; a callback may change
        them), where gradients can be all-reduced across processes, clipped or logged,
        then the finiteness check and the optimiser step.
        A NaN/Inf loss or gradient raises FloatingPointError with the weights of the
        last good step untouched."""
        self.zero_grad()
        out, finals = self._forward(x, lengths, states)
        loss, count, correct, abs_err = float("nan"), 0, 0, 0.0
        if np.isfinite(out).all():
            loss, dout, count, correct, abs_err = self._loss(out, y, lengths)
        if math.isfinite(loss):
            self._backward(dout)
        # A non-finite loss still reaches the callbacks (zero gradients), so that processes
        # training together can agree to stop at the same step instead of waiting forever.
        logs = {"loss": loss, "count": count, "size": len(x), "correct": correct,
                "abs_err": abs_err}
        for cb in callbacks:
            cb.on_gradients(batch, logs)
        loss = logs["loss"]
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"the loss became {loss} at step {self.optimizer.step_count + 1}; training "
                f"stopped and the model keeps the weights of the last good step (lower the "
                f"learning rate, set clip_norm, or check the data for NaN/Inf)")
        norm = _optim._norm(self.flat_grads)
        if not math.isfinite(norm):
            raise FloatingPointError(
                f"the gradient norm became {norm} at step {self.optimizer.step_count + 1} "
                f"(loss {loss:.4g}); training stopped and the model keeps the weights of "
                f"the last good step (lower the learning rate or set clip_norm)")
        if self.optimizer.grads is self.flat_grads:         # clipping needs no second pass
            self.optimizer._step_with_norm(norm)
        else:
            self.optimizer.step()
        return StepResult(logs["loss"], logs["count"], logs["correct"], logs["abs_err"],
                          finals)

    def eval_step(self, x, y, lengths=None, states=None):
        """The loss and metric sums on one prepared batch, no update; a ``StepResult``."""
        out, finals = self._forward(x, lengths, states)
        # no gradient: for the char model at batches of 256 that is an (N, C) array
        # (8 MB) not written and a pass over it not made
        loss, _, count, correct, abs_err = self._loss(out, y, lengths, grad=False)
        return StepResult(loss, count, correct, abs_err, finals)

    # ---- the public loop -----------------------------------------------------------------

    def fit(self, x, y, batch_size=32, epochs=1, validation_data=None, validation_split=0.0,
            shuffle=True, callbacks=None, verbose=1, lengths=None, initial_epoch=0,
            distributed=None):
        """Train; returns a ``History``. See the module docstring for x, y and lengths.

        validation_data: (x_val, y_val) or (x_val, y_val, lengths_val), evaluated after
        every epoch ("val_loss", "val_<metric>"); validation_split: the fraction of
        sequences taken from the end of x (before shuffling) for validation instead.
        callbacks: ``cylstm.callbacks`` objects. verbose: 0 silent, 1 a progress bar on a
        terminal, 2 one line per epoch. Ctrl-C stops between steps, leaving the model in
        eval mode with the weights of the last completed step; a NaN/Inf loss raises
        FloatingPointError, also with the last good weights. initial_epoch: run epochs
        initial_epoch..epochs-1 with the shuffling and dropout streams of an uninterrupted
        run (resume a loaded checkpoint of a seeded model). distributed: "mpi" (or an
        mpi4py communicator, or ``cylstm.distributed.MPI(...)``) trains data-parallel
        across MPI ranks with batch_size the global batch; see ``cylstm.distributed``.
        """
        self._check_compiled()
        batch_size = _positive_int(batch_size, "batch_size")
        epochs = _positive_int(epochs, "epochs", minimum=0)
        x, lengths = self._inputs(x, lengths)
        N, T = x.shape[:2]
        y = self._targets(y, N, T)
        if not isinstance(validation_split, numbers.Real) or not 0 <= validation_split < 1:
            raise ValueError(f"validation_split must be in [0, 1), got {validation_split!r}")
        run = None
        if distributed is not None:
            from . import distributed as _distributed      # mpi4py only when asked for
            run = _distributed._Run(self, distributed)
            if run.sharded and validation_split > 0:
                raise ValueError("validation_split cannot be used with sharded data (each "
                                 "rank would split its own shard); pass validation_data "
                                 "as this rank's shard instead")
        val = None
        if validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) not in (2, 3):
                raise TypeError("validation_data must be (x_val, y_val) or "
                                "(x_val, y_val, lengths_val)")
            xv, lv = self._inputs(validation_data[0],
                                  validation_data[2] if len(validation_data) == 3 else None,
                                  "validation_data x")
            val = (xv, self._targets(validation_data[1], *xv.shape[:2], "validation_data y"), lv)
        elif validation_split > 0:
            n_val = int(round(N * validation_split))
            if not 0 < n_val < N:
                raise ValueError(f"validation_split={validation_split} of {N} sequences "
                                 f"leaves no training or no validation data")
            cut = N - n_val
            val = (x[cut:], y[cut:], None if lengths is None else lengths[cut:])
            x, y, lengths = x[:cut], y[:cut], None if lengths is None else lengths[:cut]
            N = cut

        if run is not None:
            return run.fit_arrays(x, y, lengths, val, batch_size, shuffle, epochs, callbacks,
                                  verbose, initial_epoch)

        def epoch_batches(epoch):
            for idx in self._batches(N, batch_size, shuffle, lengths):
                yield self._take(idx, x, y, lengths)

        def validate():
            return self._evaluate_arrays(*val, batch_size) if val is not None else None

        return self.fit_batches(epoch_batches, -(-N // batch_size), epochs, validate,
                                callbacks, verbose, initial_epoch=initial_epoch)

    @_in_loop_hold
    def fit_batches(self, epoch_batches, n_batches, epochs, validate=None, callbacks=None,
                    verbose=1, stateful=False, initial_epoch=0):
        """The epoch loop behind ``fit`` and ``cylstm.text.fit_text``, for trainers of
        your own: ``epoch_batches(epoch)`` yields prepared batches (x, y, lengths), about
        ``n_batches`` of them; ``validate()`` returns a ``Stats`` or None; callbacks and
        verbose as in ``fit``. With ``stateful``, each batch starts from the recurrent
        states the last one ended with (truncated BPTT over streams), reset at each
        epoch. ``initial_epoch``: start at that epoch (resuming), with the streams of
        the epochs before it drawn as if they had run. Returns a ``History``.

        Each epoch draws one key from the model's stream; the epoch's shuffling (and, for
        a seeded model, every layer's dropout stream) derive from that key alone, so the
        streams of epoch k are known without replaying the masks of epochs 0..k-1."""
        callbacks = list(callbacks or [])
        initial_epoch = _positive_int(initial_epoch, "initial_epoch", minimum=0)
        if initial_epoch > epochs:
            raise ValueError(f"initial_epoch must be at most epochs ({epochs}), "
                             f"got {initial_epoch}")
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be cylstm.callbacks.Callback objects, "
                                f"got {type(cb).__name__}")
            cb.set_model(self)
        if verbose not in (0, 1, 2):
            raise ValueError(f"verbose must be 0, 1 or 2, got {verbose!r}")
        history, bar = History(), _Progress(verbose)
        self.stop_training = False
        self.history = history
        for _ in range(initial_epoch):
            self._epoch_streams()
        for cb in callbacks:
            cb.on_train_begin({})
        try:
            for epoch in range(initial_epoch, epochs):
                self._epoch_streams()
                for cb in callbacks:
                    cb.on_epoch_begin(epoch, {})
                self.train()
                stats, states = Stats(self.loss), None
                bar.begin(epoch, epochs, n_batches)
                for b, (xb, yb, lb) in enumerate(epoch_batches(epoch)):
                    for cb in callbacks:
                        cb.on_batch_begin(b, {"size": len(xb)})
                    step = self.train_step(xb, yb, lb, states, callbacks, b)
                    if stateful:
                        states = [tuple(a.copy() for a in st) for st in step.states]
                    stats.add(step)
                    bar.update(len(xb), step.loss, step.count)
                    for cb in callbacks:
                        cb.on_batch_end(b, {"loss": step.loss, "size": len(xb)})
                logs = stats.logs(self.metrics)
                self.eval()
                vstats = validate()
                if vstats is not None:
                    logs.update(vstats.logs(self.metrics, "val_"))
                logs["lr"] = self.optimizer.lr
                for cb in callbacks:
                    cb.on_epoch_end(epoch, logs)
                history._append(epoch, logs)
                bar.end(logs)
                if self.stop_training:
                    break
        except BaseException:
            bar.abort()
            self.eval()
            raise
        for cb in callbacks:
            cb.on_train_end({})
        self.eval()
        return history

    def _epoch_streams(self):
        """Start an epoch's random streams from one key of the model's stream."""
        key = np.random.SeedSequence(int(self._rng.integers(2 ** 63)))
        children = key.spawn(len(self.layers) + 1)
        self._epoch_rng = np.random.default_rng(children[0])
        if self.seed is not None:
            for layer, ss in zip(self.layers, children[1:]):
                layer.seed_streams(np.random.default_rng(ss))

    def _evaluate_arrays(self, x, y, lengths, batch_size):
        self.eval()
        stats = Stats(self.loss)
        for idx in self._batches(len(x), batch_size, False, lengths):
            stats.add(self.eval_step(*self._take(idx, x, y, lengths)))
        return stats

    @_in_loop_hold
    def evaluate(self, x, y, batch_size=256, lengths=None):
        """The loss and metrics on (x, y), in eval mode: {"loss": ..., metric: ...}."""
        self._check_compiled()
        x, lengths = self._inputs(x, lengths)
        y = self._targets(y, *x.shape[:2])
        return self._evaluate_arrays(x, y, lengths, _positive_int(batch_size, "batch_size")
                                     ).logs(self.metrics)

    @_in_loop_hold
    def predict(self, x, batch_size=256, lengths=None):
        """The model's output for x, in eval mode (no caches kept), batch by batch:
        (N, ...) per sequence, or (N, T, ...) per step with zeros past each length."""
        batch_size = _positive_int(batch_size, "batch_size")
        x, lengths = self._inputs(x, lengths)
        self.eval()
        N, T = x.shape[:2]
        out = None
        # Every element of the result is written below (padding by the mask at the end),
        # so np.empty, not zeros. With a Linear last, its shape is known before the first
        # batch, and a batch of consecutive rows that spans every step gets its output
        # written straight into its rows of the result (no per-batch array and copy:
        # for the char model at batches of 256, 8 MB each).
        into = self._writes_into()
        if into:
            lin = self.layers[-1]
            out = np.empty((N,) + ((T,) if self.sequence_output else ()) +
                           (lin.out_features,), lin.dtype)
        for idx in self._batches(N, batch_size, False, lengths):
            xb, _, lb = self._take(idx, x, None, lengths)
            dest = None
            # consecutive rows in order (a ragged batch comes permuted: see _batches)
            if into and (np.diff(idx) == 1).all() and \
                    (not self.sequence_output or xb.shape[1] == T):
                dest = out[idx[0]:idx[0] + len(idx)]
            part = self._forward(xb, lb, into=dest)[0]
            if part is dest:
                continue
            if out is None:
                shape = part.shape[1:] if not self.sequence_output else \
                    (T,) + part.shape[2:]
                out = np.empty((N,) + shape, part.dtype)
            if self.sequence_output:
                out[idx, :part.shape[1]] = part
            else:
                out[idx] = part
        if self.sequence_output and lengths is not None:
            # layers after the LSTM (a bias) fill padding too
            out[np.arange(out.shape[1])[None, :] >= lengths[:, None]] = 0
        return out

    def forward(self, x, lengths=None):
        """``model(x)``: the output for x as one batch, in eval mode, as
        ``predict(x, batch_size=len(x), lengths=lengths)`` (the model has no backward of
        its own to feed: training goes through ``fit`` / ``train_step``)."""
        n = len(x) if hasattr(x, "__len__") else 0
        return self.predict(x, batch_size=max(1, n), lengths=lengths)

    # ---- streaming -----------------------------------------------------------------------

    def initial_state(self, batch):
        """Streaming state for ``batch`` streams: one state per recurrent layer."""
        return [l.initial_state(batch) for l in self.layers if l.recurrent]

    def step(self, x_t, states):
        """One step for every stream: x_t (B,) token ids or (B, F) -> output (B, ...).
        Updates ``states`` (from ``initial_state``) in place; eval mode."""
        if self.training:
            self.eval()
        out, states = x_t, iter(states)
        for layer in self.layers:
            out = layer.step(out, next(states) if layer.recurrent else None)
        return out
