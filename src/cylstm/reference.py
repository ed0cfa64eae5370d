"""Pure-NumPy reference ("oracle") for one LSTM layer, one direction.

This is the slow, obviously-correct twin of the compiled kernels: every test of
the kernels compares against it, and it is itself checked against finite
differences. The math, gate order and weight layout are PyTorch's
torch.nn.LSTM (see docs/math.md). Equation numbers are the kernels' (_lstm.pyx, _cell.h):
    (1) z = x W_ih^T + h_{t-1} W_hh^T + b       (2) the gates i, f, g, o
    (3) c_t = f c_{t-1} + i g                    (4) m_t = o tanh(c_t)
    (5) h_t = m_t W_hr^T with a projection, else h_t = m_t
and the backward's (5')-(1') take the same steps in reverse. With recurrent dropout
(a mask r, docs/math.md) (1) reads h_{t-1} r, and (1') gives dh_{t-1} = (dz W_hh) r and
dW_hh += dz^T (h_{t-1} r): (1r), (1r').

Dimensions: T time steps, B batch, I input features, H hidden units, G = 4H.
Gate order of every (.., 4H) array: [i | f | g | o] = [0:H | H:2H | 2H:3H | 3H:4H].
Arrays are time-major: x is (T, B, I), y is (T, B, H).

Variable lengths and direction are handled by one "schedule": at step s = 0..T-1
sequence b reads time t = tidx[s, b] and is live when s < lengths[b]. Forward
reads t = s; reverse reads t = lengths[b]-1-s. So padded steps are always the
trailing steps of the loop, where the state is frozen and no gradient flows.
"""
from typing import NamedTuple

import numpy as np


def _sigmoid(x):
    """Logistic function that never exponentiates a positive number (no overflow)."""
    e = np.exp(-np.abs(x))  # in (0, 1]
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def _schedule(T, B, lengths, reverse):
    """Step order -> time order. Returns tidx (T, B) int: the time index sequence b
    reads at step s (a permutation of 0..T-1 for every b, padded steps on padded
    times); live (T, B) bool: step s is a valid step of sequence b."""
    L = np.full(B, T) if lengths is None else np.asarray(lengths, dtype=np.intp)  # (B,)
    s = np.arange(T)[:, None]  # (T, 1)
    live = s < L  # (T, B)
    tidx = (L - 1 - s) % T if reverse else np.broadcast_to(s, (T, B))  # (T, B)
    return tidx, live


class _Cache(NamedTuple):
    """What lstm_layer_backward needs. Arrays in STEP order (see module docstring).
    x and the weights are references to the caller's arrays, not copies:
    do not modify them between forward and backward."""
    x: np.ndarray  # (T, B, I) input, time order
    w_ih: np.ndarray  # (4H, I)
    w_hh: np.ndarray  # (4H, H)
    tidx: np.ndarray  # (T, B) int, time index read at each step
    live: np.ndarray  # (T, B) bool, step is valid for that sequence
    h: np.ndarray  # (T+1, B, H) h[0] = h0, h[s+1] = state after step s (frozen when not live)
    c: np.ndarray  # (T+1, B, H) same for the cell state
    gates: np.ndarray  # (T, B, 4H) activated gates [i|f|g|o] at each step
    w_hr: object = None  # (P, H) projection weights, or None
    rmask: object = None  # (B, Hp) recurrent dropout mask, or None


def lstm_layer_forward(x, w_ih, w_hh, b_ih=None, b_hh=None, h0=None, c0=None,
                       lengths=None, reverse=False, training=True, w_hr=None,
                       recurrent_mask=None):
    """One LSTM layer, one direction, whole sequence, time-major.

    x       (T, B, I)  input
    w_ih    (4H, I)    input weights, gate rows [i|f|g|o]
    w_hh    (4H, H)    recurrent weights
    b_ih    (4H,)      input bias, or None (no bias; then b_hh is None too)
    b_hh    (4H,)      recurrent bias, or None
    h0, c0  (B, H)     initial state, or None (zeros)
    lengths (B,)       int in 1..T, or None (every sequence has T steps)
    reverse bool       run each sequence from t = lengths[b]-1 down to t = 0
    training bool      if False, return cache=None
    w_hr    (P, H)     projection (PyTorch's proj_size = P): h_t = (o tanh c_t) W_hr^T,
                       and then w_hh is (4H, P) and h0, h_n, y have P features; or None
    recurrent_mask (B, H) recurrent dropout: (1) reads h_{t-1} * recurrent_mask (h0
                       included), for every step; or None

    Returns (y, h_n, c_n, cache):
    y (T, B, H) outputs, 0 at padded positions; h_n, c_n (B, H) state after the
    last valid step (after t = 0 when reverse); cache for lstm_layer_backward.
    Everything is computed in x.dtype.
    """
    T, B, I = x.shape
    H, Hp = w_hh.shape[0] // 4, w_hh.shape[1]  # cell size, state size (P with projection)
    dt = x.dtype
    tidx, live = _schedule(T, B, lengths, reverse)
    cols = np.arange(B)  # (B,) batch index, broadcasts against tidx
    h = np.zeros((B, Hp), dt) if h0 is None else h0  # (B, Hp)
    c = np.zeros((B, H), dt) if c0 is None else c0  # (B, H)

    xs = x[tidx, cols]  # (T, B, I) input in step order
    zx = xs @ w_ih.T  # (T, B, 4H) input projection, one GEMM for all steps
    if b_ih is not None:
        zx = zx + (b_ih + b_hh)
    hs = np.empty((T + 1, B, Hp), dt); hs[0] = h
    cs = np.empty((T + 1, B, H), dt); cs[0] = c
    gates = np.empty((T, B, 4 * H), dt)
    r = 1 if recurrent_mask is None else recurrent_mask  # (B, Hp) or 1
    for s in range(T):
        m = live[s][:, None]  # (B, 1)
        z = zx[s] + (h * r) @ w_hh.T  # (1) (1r) z = x W_ih^T + (h r) W_hh^T + b_ih + b_hh
        i = _sigmoid(z[:, 0:H])  # (2) input gate
        f = _sigmoid(z[:, H:2 * H])  # (2) forget gate
        g = np.tanh(z[:, 2 * H:3 * H])  # (2) candidate
        o = _sigmoid(z[:, 3 * H:4 * H])  # (2) output gate
        c = np.where(m, f * c + i * g, c)  # (3) c_t = f c_{t-1} + i g   (frozen when padded)
        mt = o * np.tanh(c)  # (4) m_t = o tanh(c_t)
        if w_hr is not None:
            mt = mt @ w_hr.T  # (5) projection h_t = m_t W_hr^T
        h = np.where(m, mt, h)  # h_t                          (frozen when padded)
        gates[s] = np.concatenate([i, f, g, o], axis=1)
        hs[s + 1], cs[s + 1] = h, c

    y = np.empty((T, B, Hp), dt)
    y[tidx, cols] = np.where(live[..., None], hs[1:], 0)  # back to time order, zeros when padded
    cache = (_Cache(x, w_ih, w_hh, tidx, live, hs, cs, gates, w_hr, recurrent_mask)
             if training else None)
    return y, h, c, cache


def lstm_layer_backward(cache, dy, dh_n=None, dc_n=None, *, dw_ih, dw_hh, db_ih=None, db_hh=None,
                        dw_hr=None):
    """Backpropagation through time for lstm_layer_forward. Does not modify cache.

    cache          from lstm_layer_forward(..., training=True)
    dy     (T, B, H)  dL/dy; values at padded positions are ignored
    dh_n   (B, H)     dL/dh_n, or None (zeros)
    dc_n   (B, H)     dL/dc_n, or None (zeros)
    dw_ih  (4H, I)    INOUT, accumulated (+=)
    dw_hh  (4H, H)    INOUT, accumulated (+=)
    db_ih  (4H,)      INOUT, accumulated (+=), or None (layer without bias)
    db_hh  (4H,)      INOUT, accumulated (+=), or None
    dw_hr  (P, H)     INOUT, accumulated (+=), when the forward had a projection
    (with a projection, H in dy, dh_n, dh0 and dw_hh's second axis is P)

    Returns (dx, dh0, dc0): dx (T, B, I), 0 at padded positions; dh0, dc0 (B, H).
    """
    x, w_ih, w_hh, tidx, live, hs, cs, gates, w_hr, rmask = cache
    r = 1 if rmask is None else rmask  # (B, Hp) or 1
    T, B, I = x.shape
    H, Hp = w_hh.shape[0] // 4, w_hh.shape[1]
    dt = x.dtype
    cols = np.arange(B)
    dys = np.where(live[..., None], dy[tidx, cols], 0)  # (T, B, H) step order, padded ignored
    dh = np.zeros((B, Hp), dt) if dh_n is None else dh_n  # (B, Hp) dL/dh flowing back in time
    dc = np.zeros((B, H), dt) if dc_n is None else dc_n  # (B, H) dL/dc flowing back in time
    dz = np.empty((T, B, 4 * H), dt)  # (T, B, 4H) dL/dz at every step
    dwhr = None if w_hr is None else np.zeros_like(w_hr)  # (P, H) this call's dW_hr
    for s in reversed(range(T)):
        m = live[s][:, None]  # (B, 1)
        i, f, g, o = (gates[s, :, k * H:(k + 1) * H] for k in range(4))
        dh = dh + dys[s]
        tc = np.tanh(cs[s + 1])
        dm = dh  # dL/dm_t
        if w_hr is not None:
            dwhr += np.where(m, dh, 0).T @ (o * tc)  # (5') dW_hr += dh^T m_t (live rows)
            dm = dh @ w_hr  # (5')
        do = dm * tc  # (4')
        dct = dc + dm * o * (1 - tc * tc)  # (4') through tanh(c_t)
        di = dct * g  # (3')
        dg = dct * i  # (3')
        df = dct * cs[s]  # (3')
        dzs = np.concatenate([di * i * (1 - i),  # (2') sigmoid' = i (1 - i)
                              df * f * (1 - f),  # (2')
                              dg * (1 - g * g),  # (2') tanh' = 1 - g^2
                              do * o * (1 - o)], axis=1)  # (2')
        dz[s] = np.where(m, dzs, 0)  # padded step: no gradient into z
        dh = np.where(m, (dz[s] @ w_hh) * r, dh)  # (1') (1r') dh_{t-1}; padded: passed through
        dc = np.where(m, dct * f, dc)  # (3') dc_{t-1}; padded step passes dc through

    # weight gradients: one GEMM / reduction over all T*B rows (padded rows have dz = 0)
    dz2 = dz.reshape(T * B, 4 * H)
    xs = np.where(live[:, :, None], x[tidx, cols], 0)  # padding is never read, even NaN
    dw_ih += dz2.T @ xs.reshape(T * B, I)  # (1')
    dw_hh += dz2.T @ (hs[:-1] * r).reshape(T * B, Hp)  # (1') (1r')
    if w_hr is not None:
        dw_hr += dwhr
    if db_ih is not None:
        db = dz2.sum(axis=0)
        db_ih += db
        db_hh += db
    dx = np.empty((T, B, I), dt)
    dx[tidx, cols] = dz @ w_ih  # (1') back to time order; padded rows are 0 since dz is
    return dx, dh, dc
