"""The LSTM module: torch.nn.LSTM's API, parameters in one arena, NumPy in and out."""

import math
import numbers

import numpy as np

from . import functional as F

__all__ = ["LSTM"]


def _positive_int(value, name, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _to_numpy(value, key):
    """A state-dict value as a NumPy array: arrays, torch tensors (.numpy()), __array__."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "cpu"):     # a torch tensor, duck-typed
        value = value.detach().cpu()
    if hasattr(value, "numpy"):
        try:
            return np.asarray(value.numpy())
        except Exception:
            pass
    try:
        return np.asarray(value)
    except Exception as e:
        raise TypeError(f"state dict entry {key!r} cannot be read as an array: {e}") from None


class LSTM:
    """A multi-layer LSTM with exactly ``torch.nn.LSTM``'s semantics, shapes and names.

    ``y, (h_n, c_n) = lstm(x, state=None, lengths=None)``
        x (T, B, I), or (B, T, I) with ``batch_first``, or unbatched (T, I);
        state (h0, c0) each (L*D, B, H) or None (zeros); lengths (B,) in 1..T for
        PyTorch's packed semantics (outputs zero and state frozen past a length).
        y (T, B, D*H); h_n, c_n (L*D, B, H). L = num_layers, D = 2 if bidirectional.
    ``dx, (dh0, dc0) = lstm.backward(dy, dstate=None)``
        after a training-mode forward: dy like y, dstate (dh_n, dc_n) or None;
        *accumulates* into ``lstm.grads`` (call ``zero_grad()`` between steps).

    Parameters live in one contiguous array (``lstm.flat_params``), gradients in another
    (``lstm.flat_grads``); ``lstm.params`` / ``lstm.grads`` are dicts of views into them
    with PyTorch's names (``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``,
    ``bias_hh_l0``, ``..._reverse``). ``load_state_dict`` copies into the views.
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, dtype="float32", seed=None):
        self.input_size = _positive_int(input_size, "input_size")
        self.hidden_size = _positive_int(hidden_size, "hidden_size")
        self.num_layers = _positive_int(num_layers, "num_layers")
        self.proj_size = _positive_int(proj_size, "proj_size", minimum=0)
        if self.proj_size:
            raise NotImplementedError("proj_size > 0 is not implemented yet (tracked separately)")
        if not isinstance(dropout, numbers.Real) or isinstance(dropout, bool) \
                or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        self.dropout = float(dropout)
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.bidirectional = bool(bidirectional)
        try:
            self.dtype = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"dtype must be 'float32' or 'float64', got {dtype!r}") from None
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be 'float32' or 'float64', got {self.dtype}")
        self.training = True
        self._rng = np.random.default_rng(seed)

        # One arena for parameters, one for gradients (llm.c); named views into both.
        self._layout = []                      # (name, shape) in PyTorch's order
        H, D = self.hidden_size, self.num_directions
        for layer in range(self.num_layers):
            in_size = self.input_size if layer == 0 else H * D
            for d in range(D):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                self._layout += [(f"weight_ih{sfx}", (4 * H, in_size)),
                                 (f"weight_hh{sfx}", (4 * H, H))]
                if self.bias:
                    self._layout += [(f"bias_ih{sfx}", (4 * H,)), (f"bias_hh{sfx}", (4 * H,))]
        total = sum(math.prod(shape) for _, shape in self._layout)
        self.flat_params = np.zeros(total, self.dtype)
        self.flat_grads = np.zeros(total, self.dtype)
        self.params, self.grads = {}, {}
        offset = 0
        for name, shape in self._layout:
            n = math.prod(shape)
            self.params[name] = self.flat_params[offset:offset + n].reshape(shape)
            self.grads[name] = self.flat_grads[offset:offset + n].reshape(shape)
            offset += n
        self._workspaces = {}                  # (layer, direction) -> F.Workspace
        self._caches = None                    # what backward needs from the last forward
        self.reset_parameters()

    # ---- bookkeeping ---------------------------------------------------------------------

    @property
    def num_directions(self):
        return 2 if self.bidirectional else 1

    def reset_parameters(self):
        """PyTorch's default: every weight and bias uniform in [-1/sqrt(H), 1/sqrt(H)]."""
        k = 1.0 / math.sqrt(self.hidden_size)
        for name, _ in self._layout:
            p = self.params[name]
            p[...] = self._rng.uniform(-k, k, size=p.shape)

    def train(self, mode=True):
        """Training mode: forward keeps the cache backward needs, dropout is active."""
        self.training = bool(mode)
        if not self.training:
            self._caches = None
        return self

    def eval(self):
        """Inference mode: forward keeps no cache, dropout is off."""
        return self.train(False)

    def zero_grad(self):
        """Set every gradient to zero (backward accumulates)."""
        self.flat_grads[...] = 0

    def state_dict(self):
        """A dict of copies of the parameters, with torch.nn.LSTM's names and order."""
        return {name: self.params[name].copy() for name, _ in self._layout}

    def load_state_dict(self, state_dict, strict=True):
        """Copy parameters in from a dict of arrays (or torch tensors; torch is never
        imported). Every key is checked before anything is copied, so a bad dict leaves
        the model unchanged. Unknown or missing keys are errors when ``strict``."""
        if not hasattr(state_dict, "keys"):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        keys = set(state_dict.keys())
        names = set(self.params)
        missing, unexpected = sorted(names - keys), sorted(keys - names)
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        staged = {}
        for name in sorted(names & keys):
            a = _to_numpy(state_dict[name], name)
            if a.dtype.kind not in "biuf":
                raise TypeError(f"state dict entry {name!r} must be real numbers, got {a.dtype}")
            if a.shape != self.params[name].shape:
                raise ValueError(f"state dict entry {name!r} has shape {a.shape}, "
                                 f"expected {self.params[name].shape}")
            staged[name] = a
        for name, a in staged.items():
            np.copyto(self.params[name], a, casting="unsafe")
        return self

    def _weights(self, layer, d):
        sfx = f"_l{layer}" + ("_reverse" if d else "")
        p, g = self.params, self.grads
        if self.bias:
            b = (p[f"bias_ih{sfx}"], p[f"bias_hh{sfx}"])
            db = (g[f"bias_ih{sfx}"], g[f"bias_hh{sfx}"])
        else:
            b = db = (None, None)
        return (p[f"weight_ih{sfx}"], p[f"weight_hh{sfx}"]) + b, \
               (g[f"weight_ih{sfx}"], g[f"weight_hh{sfx}"]) + db

    def _workspace(self, layer, d):
        ws = self._workspaces.get((layer, d))
        if ws is None:
            ws = self._workspaces[(layer, d)] = F.Workspace()
        return ws

    # ---- forward / backward --------------------------------------------------------------

    def __call__(self, x, state=None, lengths=None):
        return self.forward(x, state, lengths)

    def _state(self, state, name, B, unbatched):
        L, D, H = self.num_layers, self.num_directions, self.hidden_size
        if state is None:
            return None, None
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise TypeError(f"{name} must be a pair (h, c) or None, got {type(state).__name__}")
        out = []
        for part, a in zip("hc", state):
            shape = (L * D, H) if unbatched else (L * D, B, H)
            a = F._as_array(a, f"{name}[{'hc'.index(part)}] ({part})", self.dtype, shape)
            out.append(a[:, None, :] if unbatched else a)
        return out[0], out[1]

    def forward(self, x, state=None, lengths=None):
        """Run the whole sequence. Returns (y, (h_n, c_n)); see the class docstring."""
        if not isinstance(x, np.ndarray):
            try:
                x = np.asarray(x)
            except Exception as e:
                raise TypeError(f"x must be an array, got {type(x).__name__}: {e}") from None
        if x.dtype.kind not in "biuf":
            raise TypeError(f"x must hold real numbers (float32/float64, or ints/bools to "
                            f"convert), got dtype {x.dtype}")
        unbatched = x.ndim == 2
        if x.ndim not in (2, 3):
            want = "(B, T, I)" if self.batch_first else "(T, B, I)"
            raise ValueError(f"x must have shape {want} or unbatched (T, I), got {F._shape(x)}")
        if unbatched:
            x = x[:, None, :]
            if lengths is not None:
                raise ValueError("lengths needs batched input; unbatched x is one sequence")
        elif self.batch_first:
            x = x.transpose(1, 0, 2)
        xt = F._as_array(x, "x", self.dtype, (None, None, self.input_size))
        T, B, _ = xt.shape
        if T < 1 or B < 1:
            raise ValueError(f"x must have at least one step and one sequence, got {F._shape(x)}")
        if self.training and np.may_share_memory(xt, x):
            xt = xt.copy()   # the cache keeps x: never alias the caller's array
        lengths = F._lengths(lengths, T, B)
        h0, c0 = self._state(state, "state", B, unbatched)

        L, D, H = self.num_layers, self.num_directions, self.hidden_size
        h_n = np.empty((L * D, B, H), self.dtype)
        c_n = np.empty((L * D, B, H), self.dtype)
        caches, masks = [], []
        inp = xt
        for layer in range(L):
            outs = []
            for d in range(D):
                (w_ih, w_hh, b_ih, b_hh), _ = self._weights(layer, d)
                k = layer * D + d
                y, h_n[k], c_n[k], cache = F.lstm_layer_forward(
                    inp, w_ih, w_hh, b_ih, b_hh,
                    None if h0 is None else h0[k], None if c0 is None else c0[k],
                    lengths, reverse=bool(d), training=self.training,
                    workspace=self._workspace(layer, d))
                outs.append(y)
                caches.append(cache)
            inp = outs[0] if D == 1 else np.concatenate(outs, axis=2)
            if self.training and self.dropout > 0 and layer < L - 1:
                keep = 1.0 - self.dropout        # inverted dropout between layers only
                mask = (self._rng.random(inp.shape) < keep).astype(self.dtype) / keep
                inp = inp * mask
                masks.append(mask)
        self._caches = (caches, masks, T, B, unbatched) if self.training else None

        y = inp
        if unbatched:
            y, h_n, c_n = y[:, 0, :], h_n[:, 0, :], c_n[:, 0, :]
        elif self.batch_first:
            y = y.transpose(1, 0, 2)
        if self.training and D == 1:
            y = y.copy()     # the last layer's y is in the cache: the caller gets its own
        return np.ascontiguousarray(y), (h_n, c_n)

    def backward(self, dy, dstate=None):
        """Backpropagate through the last training-mode forward; accumulates into grads.

        dy like the forward's y; dstate (dh_n, dc_n) like its state, or None (zeros).
        Returns (dx, (dh0, dc0)) shaped like x and the state.
        """
        if self._caches is None:
            raise RuntimeError("backward needs a forward in training mode first "
                               "(lstm.train(); y, state = lstm(x); lstm.backward(dy))")
        caches, masks, T, B, unbatched = self._caches
        L, D, H = self.num_layers, self.num_directions, self.hidden_size
        if unbatched:
            dy = F._as_array(dy, "dy", self.dtype, (T, D * H))[:, None, :]
        elif self.batch_first:
            dy = F._as_array(dy, "dy", self.dtype, (B, T, D * H)).transpose(1, 0, 2)
        else:
            dy = F._as_array(dy, "dy", self.dtype, (T, B, D * H))
        dh_n, dc_n = self._state(dstate, "dstate", B, unbatched)
        dh0 = np.empty((L * D, B, H), self.dtype)
        dc0 = np.empty((L * D, B, H), self.dtype)
        for layer in range(L - 1, -1, -1):
            if layer < L - 1 and masks:
                dy = dy * masks[layer]
            dx = None
            for d in range(D):
                k = layer * D + d
                _, (dw_ih, dw_hh, db_ih, db_hh) = self._weights(layer, d)
                dyd = dy if D == 1 else np.ascontiguousarray(dy[:, :, d * H:(d + 1) * H])
                dxd, dh0[k], dc0[k] = F.lstm_layer_backward(
                    caches[k], dyd, None if dh_n is None else dh_n[k],
                    None if dc_n is None else dc_n[k], dw_ih=dw_ih, dw_hh=dw_hh,
                    db_ih=db_ih, db_hh=db_hh, workspace=self._workspace(layer, d))
                dx = dxd if dx is None else dx + dxd
            dy = dx
        dx = dy
        if unbatched:
            return dx[:, 0, :], (dh0[:, 0, :], dc0[:, 0, :])
        if self.batch_first:
            dx = np.ascontiguousarray(dx.transpose(1, 0, 2))
        return dx, (dh0, dc0)
