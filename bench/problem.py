"""The problem every implementation solves (a cylstm.LSTM's weights, the data), the NumPy
reference as a model, and the float64 oracle that verification compares against."""

import math
from typing import NamedTuple

import numpy as np

import cylstm
from cylstm import reference as ref

from cases import PARAM_NAMES

class Data(NamedTuple):
    x: np.ndarray               # (T, B, I)
    dy: np.ndarray              # (T, B, D*Hp) the training step's output gradient
    state: object               # (h0 (L*D, B, Hp), c0 (L*D, B, H)) or None (zeros)
    lengths: object             # (B,) int in 1..T, or None (every sequence has T steps)

    def first(self, T):
        """The first T steps (lengths clipped to T)."""
        lengths = None if self.lengths is None else np.minimum(self.lengths, T)
        return Data(self.x[:T], self.dy[:T], self.state, lengths)


class Problem(NamedTuple):
    lstm: object                # cylstm.LSTM with PyTorch's init
    params: dict                # copies of its parameters, by torch's names
    data: Data


def make_problem(case, seed=0):
    """cylstm.LSTM for the case, copies of its weights for the peers, and the data."""
    cfg = case.cfg
    lstm = cylstm.LSTM(cfg.I, cfg.H, num_layers=cfg.L, bidirectional=case.D == 2,
                       proj_size=case.P, dtype=case.dtype, seed=seed)
    rng = np.random.default_rng(seed + 1)
    dt, Hp = case.dtype, case.P or cfg.H
    x = rng.standard_normal((cfg.T, cfg.B, cfg.I)).astype(dt)
    dy = rng.standard_normal((cfg.T, cfg.B, case.D * Hp)).astype(dt)
    state = None
    if cfg.state:
        state = tuple(0.5 * rng.standard_normal((cfg.L * case.D, cfg.B, size)).astype(dt)
                      for size in (Hp, cfg.H))
    return Problem(lstm, lstm.state_dict(), Data(x, dy, state, lengths_for(case, seed)))


def lengths_for(case, seed=0):
    """(B,) lengths uniform in 1..T for the varlen variant (their own stream), else None."""
    if case.variant != "varlen":
        return None
    return np.random.default_rng(seed + 2).integers(1, case.cfg.T + 1, case.cfg.B)


class Reference:
    """The NumPy reference as a model: cylstm.reference's layer functions per layer and
    direction, on copies of the weights (torch's names), in `dtype`."""

    def __init__(self, params, L, D, dtype):
        self.L, self.D = L, D
        self.params = {k: v.astype(dtype) for k, v in params.items()}
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}

    def zero_grad(self):
        for g in self.grads.values():
            g[...] = 0

    def _of(self, store, layer, d):
        sfx = f"_l{layer}" + ("_reverse" if d else "")
        return [store.get(n + sfx) for n in PARAM_NAMES]

    def forward(self, x, state=None, lengths=None, training=False):
        """x (T, B, I) -> y (T, B, D*Hp), (h_n, c_n) each (L*D, B, .), caches."""
        caches, hs, cs = [], [], []
        inp = x
        for layer in range(self.L):
            outs = []
            for d in range(self.D):
                k = layer * self.D + d
                w_ih, w_hh, b_ih, b_hh, w_hr = self._of(self.params, layer, d)
                h0, c0 = (None, None) if state is None else (state[0][k], state[1][k])
                y, h, c, cache = ref.lstm_layer_forward(
                    inp, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths=lengths, reverse=bool(d),
                    training=training, w_hr=w_hr)
                outs.append(y)
                caches.append(cache)
                hs.append(h)
                cs.append(c)
            inp = outs[0] if self.D == 1 else np.concatenate(outs, axis=2)
        return inp, (np.stack(hs), np.stack(cs)), caches

    def backward(self, caches, dy):
        """dy (T, B, D*Hp) -> dx (T, B, I), (dh0, dc0); += into self.grads."""
        dh0, dc0 = [None] * len(caches), [None] * len(caches)
        for layer in reversed(range(self.L)):
            Hp = dy.shape[2] // self.D
            dx = 0
            for d in range(self.D):
                k = layer * self.D + d
                dw_ih, dw_hh, db_ih, db_hh, dw_hr = self._of(self.grads, layer, d)
                dxd, dh0[k], dc0[k] = ref.lstm_layer_backward(
                    caches[k], np.ascontiguousarray(dy[:, :, d * Hp:(d + 1) * Hp]),
                    dw_ih=dw_ih, dw_hh=dw_hh, db_ih=db_ih, db_hh=db_hh, dw_hr=dw_hr)
                dx = dx + dxd
            dy = dx
        return dy, (np.stack(dh0), np.stack(dc0))


def as_outputs(y, h, c, dx=None, dh0=None, dc0=None, grads=None):
    """The dict verification compares; grads by torch's parameter names."""
    out = {"y": y, "h_n": h, "c_n": c}
    for k, v in (("dx", dx), ("dh0", dh0), ("dc0", dc0)):
        if v is not None:
            out[k] = v
    out.update({"d" + k: g for k, g in (grads or {}).items()})
    return out


def oracle(case, params, data):
    """Everything verification compares, from the reference in float64."""
    f64 = lambda a: None if a is None else a.astype(np.float64)      # noqa: E731
    m = Reference(params, case.cfg.L, case.D, np.float64)
    st = None if data.state is None else tuple(map(f64, data.state))
    y, (h, c), caches = m.forward(f64(data.x), st, data.lengths, training=True)
    dx, (dh0, dc0) = m.backward(caches, f64(data.dy))
    return as_outputs(y, h, c, dx, dh0, dc0, m.grads)


def rel_err(a, b):
    """max |a - b| relative to the largest magnitude of either (tests' definition)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return math.inf
    scale = max(np.abs(a).max(), np.abs(b).max())
    return 0.0 if scale == 0 else float(np.abs(a - b).max() / scale)


def compare(got, want, tol):
    """Every array an implementation returned against the oracle's."""
    errs = {k: rel_err(got[k], want[k]) for k in got}
    worst = max(errs, key=errs.get)
    return {"max_rel_err": errs[worst], "worst": worst, "ok": errs[worst] <= tol,
            "errors": errs}

