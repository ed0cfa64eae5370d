"""Hostile input, property-based (hypothesis), over every public entry point: cylstm.LSTM
(forward, backward, step, initial_state, load_state_dict), cylstm.functional,
cylstm.reference, cylstm.Embedding, cylstm.losses, cylstm.optim.

The property everywhere: either a correct result (checked against cylstm.reference, a
NumPy formula, or the same call on a plain C-contiguous array of the right dtype) or a
ValueError/TypeError whose message names the argument. Never a crash: pytest runs with
faulthandler (a segfault prints the C-level traceback and fails the run) and this
module arms a watchdog that dumps every thread's stack and exits if a test hangs.
test_validation.py has the hand-written cases and the first LSTM-forward fuzz; this
file widens it to memory layouts, every entry point, magnitudes up to 1e30 and NaN/Inf.

CYLSTM_FUZZ_EXAMPLES=N multiplies nothing but sets every property's example count
(default: a CI-sized budget); the bounds-checked build (CYLSTM_DEBUG=1) was run with a
large N by hand (see the README's "Reliability").
"""
import faulthandler
import os
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cylstm
from cylstm import functional as F
from cylstm import losses, optim, reference

from conftest import KERNEL_TOL, rel_err

N = int(os.environ.get("CYLSTM_FUZZ_EXAMPLES", "0"))


def fuzz(default):
    return settings(max_examples=N or default, deadline=None, derandomize=not N,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(autouse=True, scope="module")
def _watchdog():
    """A hang (a kernel that never returns) fails CI with every thread's stack instead of
    stalling it: after 10 minutes, dump the tracebacks and exit the process."""
    faulthandler.dump_traceback_later(600, exit=True, file=sys.stderr)
    yield
    faulthandler.cancel_dump_traceback_later()


OK_ERRORS = (ValueError, TypeError)
REAL = ["float32", "float64", "float16", "int8", "int64", "uint16", "bool", ">f8"]
HOSTILE = REAL + ["complex64", "complex128", "object", "U1"]
LAYOUTS = ["C", "F", "strided", "negative", "readonly", "transposed-copy"]


def make_array(rng, shape, dtype, layout="C", scale=1.0):
    """An array of `shape` and `dtype` in the given memory layout; reals drawn N(0, scale)
    (ints small, float16 clipped to its range)."""
    dtype = np.dtype(dtype) if dtype not in ("object", "U1") else dtype
    vals = rng.standard_normal(shape) * scale
    if dtype == "object":
        a = np.empty(shape, object)
        a[...] = vals
    elif dtype == "U1":
        a = np.full(shape, "a")
    elif dtype.kind == "b":
        a = vals > 0
    elif dtype.kind in "iu":
        a = np.clip(np.round(vals), 0 if dtype.kind == "u" else -100, 100).astype(dtype)
    elif dtype == np.float16:
        a = np.clip(vals, -6e4, 6e4).astype(dtype)
    else:
        a = vals.astype(dtype)
    if layout == "F" and a.ndim:          # (asfortranarray makes a 0-d array 1-d)
        a = np.asfortranarray(a)
    elif layout == "strided" and a.ndim:
        big = np.zeros(tuple(2 * d for d in a.shape), a.dtype)
        big[tuple(slice(None, None, 2) for _ in a.shape)] = a
        a = big[tuple(slice(None, None, 2) for _ in a.shape)]
    elif layout == "negative" and a.ndim:
        a = np.ascontiguousarray(a[(slice(None, None, -1),) * a.ndim])[(slice(None, None, -1),) * a.ndim]
    elif layout == "readonly":
        a = a.copy()
        a.setflags(write=False)
    elif layout == "transposed-copy" and a.ndim:
        a = np.ascontiguousarray(a.T).T
    return a


def is_real(a):
    return isinstance(a, (np.ndarray, np.generic)) and a.dtype.kind in "biuf"


def clean(a, dtype):
    """What the library should see: a plain C-contiguous copy in the model's dtype."""
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(np.asarray(a).astype(dtype))


def expect(valid, call, names):
    """Run call(); if it raises ValueError/TypeError the input must be invalid and the
    message must name one of `names`; if it returns, the input must be valid."""
    try:
        out = call()
    except OK_ERRORS as e:
        assert not valid, f"valid input rejected: {e!r}"
        assert any(n in str(e) for n in names), f"message does not name {names}: {e}"
        return None
    assert valid, "invalid input accepted"
    return out


def shape_near(data, want, *, empty=True, last=False):
    """`want`, or a nearby wrong shape: another rank, a dimension off by one (only the
    last one when `last`) or zero."""
    kind = data.draw(st.sampled_from(["right", "right", "rank", "dim", "zero"] if empty
                                     else ["right", "right", "rank", "dim"]))
    if kind == "right":
        return tuple(want), True
    if kind == "rank":
        r = data.draw(st.sampled_from([k for k in range(4) if k != len(want)]))
        return tuple(data.draw(st.integers(1, 3)) for _ in range(r)), False
    if not want:
        return (1,), False
    k = data.draw(st.integers(0, len(want) - 1)) if kind == "zero" or not last else len(want) - 1
    s = list(want)
    s[k] = 0 if kind == "zero" else s[k] + data.draw(st.sampled_from([-1, 1] if s[k] else [1]))
    return tuple(s), tuple(s) == tuple(want)


# ---------------------------------------------------------------- cylstm.LSTM

_MODELS = {}
I, H = 3, 5


def lstm_model(dtype, L, D, P, batch_first):
    key = (dtype, L, D, P, batch_first)
    if key not in _MODELS:
        _MODELS[key] = cylstm.LSTM(I, H, num_layers=L, bidirectional=D == 2, proj_size=P,
                                   batch_first=batch_first, dtype=dtype, seed=3)
    return _MODELS[key].train()


@fuzz(150)
@given(data=st.data())
def test_lstm_forward_backward_hostile_layouts_dtypes_states_and_lengths(data):
    """x, state, lengths, dy, dstate each drawn with a hostile dtype/layout/shape; valid
    calls equal (bitwise) the call on clean arrays, and are finite for |x| <= 1e30."""
    dtype = data.draw(st.sampled_from(["float32", "float64"]))
    L, D, P = data.draw(st.sampled_from([(1, 1, 0), (2, 2, 0), (1, 1, 2), (2, 1, 2)]))
    bf = data.draw(st.booleans())
    lstm = lstm_model(dtype, L, D, P, bf)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    T, B = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 4))
    Hp = P or H
    scale = data.draw(st.sampled_from([1.0, 1e3, 1e30, -1e30]))
    xs, ok_x = shape_near(data, (B, T, I) if bf else (T, B, I))
    xd = data.draw(st.sampled_from(REAL + ["complex64", "object"] if data.draw(st.booleans())
                                   else ["float32", "float64"]))
    x = make_array(rng, xs, xd, data.draw(st.sampled_from(LAYOUTS)), scale)
    if len(xs) == 3:        # a changed T (or B) is still a valid x; what else must match
        (Bx, Tx) = xs[:2] if bf else xs[1::-1]
        ok_x = xs[2] == I and Tx >= 1 and Bx >= 1
    ok_x = ok_x and is_real(x)
    state, ok_s = None, True
    if data.draw(st.booleans()):
        parts = []
        for size in (Hp, H):
            s, ok = shape_near(data, (L * D, B, size), empty=False)
            sd = data.draw(st.sampled_from(["float64", "float32", "int8", "complex64"]))
            parts.append(make_array(rng, s, sd, data.draw(st.sampled_from(LAYOUTS))))
            ok_s = ok_s and ok and is_real(parts[-1])
        state = tuple(parts)
    lengths = None
    lk = data.draw(st.sampled_from(["none", "valid", "valid", "range", "shape", "float"]))
    if lk == "valid":
        ldt = data.draw(st.sampled_from(["int64", "uint8", "int32"]))
        lengths = make_array(rng, (B,), "int64", data.draw(st.sampled_from(LAYOUTS)))
        lengths = rng.integers(1, T + 1, B).astype(ldt)
    elif lk == "range":
        lengths = rng.integers(-1, T + 2, B)
    elif lk == "shape":
        lengths = np.ones(B + 1, np.int64)
    elif lk == "float":
        lengths = np.ones(B)
    ok_l = lengths is None or (len(xs) == 3 and lengths.dtype.kind in "iu"
                               and lengths.shape == (Bx,) and lengths.min() >= 1
                               and lengths.max() <= Tx)
    if len(xs) == 3 and Bx != B:
        ok_s = ok_s and state is None
    if len(xs) == 2:            # unbatched (T, I): one sequence, no lengths, 2-D states
        ok_x = xs[1] == I and xs[0] >= 1 and is_real(x)
        ok_s = state is None
    valid = ok_x and ok_s and ok_l
    names = ("x", "state", "lengths")
    got = expect(valid, lambda: lstm(x, state, lengths), names)
    if got is None:
        return
    y, (h_n, c_n) = got
    xc = clean(x, dtype)
    want_y, (want_h, want_c) = lstm(xc, None if state is None else
                                    tuple(clean(s, dtype) for s in state), lengths)
    assert np.array_equal(y, want_y) and np.array_equal(h_n, want_h) and np.array_equal(c_n, want_c)
    if np.all(np.isfinite(xc)):
        assert np.all(np.isfinite(y)) and np.all(np.isfinite(h_n)) and np.all(np.isfinite(c_n))
    # backward: the cache now is that of the clean call (same numbers)
    dys, ok_dy = shape_near(data, y.shape, empty=False)
    dy = make_array(rng, dys, data.draw(st.sampled_from(["float64", "float32", "int8", "object"])),
                    data.draw(st.sampled_from(LAYOUTS)))
    ok_dy = ok_dy and is_real(dy)
    dstate = None
    if data.draw(st.booleans()):
        dstate = (make_array(rng, h_n.shape, "float64", data.draw(st.sampled_from(LAYOUTS))),
                  make_array(rng, c_n.shape, "float64", "C"))
    lstm.zero_grad()
    got = expect(ok_dy, lambda: lstm.backward(dy, dstate), ("dy",))
    if got is None:
        return
    dx, (dh0, dc0) = got
    grads = lstm.flat_grads.copy()
    lstm.zero_grad()
    wdx, (wdh0, wdc0) = lstm.backward(clean(dy, dtype), None if dstate is None else
                                      tuple(clean(s, dtype) for s in dstate))
    assert np.array_equal(dx, wdx) and np.array_equal(dh0, wdh0) and np.array_equal(dc0, wdc0)
    assert np.array_equal(grads, lstm.flat_grads)
    if np.all(np.isfinite(xc)):
        for a in (dx, dh0, dc0, grads):
            assert np.all(np.isfinite(a))


@fuzz(40)
@given(data=st.data())
def test_lstm_step_and_initial_state(data):
    dtype = data.draw(st.sampled_from(["float32", "float64"]))
    L, P = data.draw(st.sampled_from([(1, 0), (2, 2)]))
    lstm = lstm_model(dtype, L, 1, P, False)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    batch = data.draw(st.one_of(st.integers(-1, 4), st.sampled_from([2.0, "2", None, True])))
    ok_b = isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1
    state = expect(ok_b, lambda: lstm.initial_state(batch), ("batch",))
    if state is None:
        return
    xs, ok = shape_near(data, (batch, I))
    xd = data.draw(st.sampled_from(HOSTILE))
    x_t = make_array(rng, xs, xd, data.draw(st.sampled_from(LAYOUTS)),
                     data.draw(st.sampled_from([1.0, 1e30, -1e30])))
    y = expect(ok and is_real(x_t), lambda: lstm.step(x_t, state).copy(), ("x_t",))
    if y is None:
        return
    want, _ = lstm.eval()(clean(x_t, dtype)[None])
    lstm.train()
    assert rel_err(y, want[0]) < KERNEL_TOL[np.dtype(dtype)] * 10
    assert np.all(np.isfinite(y))


@fuzz(60)
@given(data=st.data())
def test_lstm_load_state_dict(data):
    """Any entry of a wrong shape, a non-real dtype, a non-finite value, or an unknown/
    missing key: an error naming it, and the model unchanged. Otherwise loaded exactly
    (as converted to the model's dtype)."""
    dtype = data.draw(st.sampled_from(["float32", "float64"]))
    lstm = cylstm.LSTM(I, H, num_layers=2, bidirectional=True, dtype=dtype, seed=4)
    before = lstm.flat_params.copy()
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    sd = {k: rng.uniform(-1, 1, v.shape) for k, v in lstm.state_dict().items()}
    name = data.draw(st.sampled_from(sorted(sd)))
    kind = data.draw(st.sampled_from(["ok", "ok", "shape", "dtype", "nan", "inf", "overflow",
                                      "extra", "missing", "layout"]))
    valid, names = True, (name,)
    if kind == "shape":
        s, valid = shape_near(data, sd[name].shape)
        sd[name] = np.zeros(s)
    elif kind == "dtype":
        d = data.draw(st.sampled_from(["complex64", "object", "U1"]))
        sd[name], valid = make_array(rng, sd[name].shape, d), False
    elif kind in ("nan", "inf"):
        sd[name].flat[0], valid = np.nan if kind == "nan" else -np.inf, False
    elif kind == "overflow":
        sd[name].flat[-1] = 1e300
        valid = dtype == "float64"
    elif kind == "extra":
        sd["weight_ih_l9"], valid, names = np.zeros(3), False, ("weight_ih_l9",)
    elif kind == "missing":
        del sd[name]
        valid = False
    elif kind == "layout":
        sd[name] = make_array(rng, sd[name].shape, data.draw(st.sampled_from(REAL)),
                              data.draw(st.sampled_from(LAYOUTS)))
    if kind in ("extra", "missing"):     # KeyError by design (a dict's missing key)
        with pytest.raises(KeyError, match="weight_ih_l9" if kind == "extra" else name):
            lstm.load_state_dict(sd)
        assert np.array_equal(lstm.flat_params, before)
        return
    if expect(valid, lambda: lstm.load_state_dict(sd), names) is None:
        assert np.array_equal(lstm.flat_params, before)
        return
    for k, v in sd.items():
        assert np.array_equal(lstm.params[k], clean(v, dtype))


# ---------------------------------------------------------------- cylstm.functional / reference

@fuzz(120)
@given(data=st.data())
def test_functional_layer_against_the_reference(data):
    """lstm_layer_forward/backward with hostile x, h0, c0, lengths, weights and layouts:
    valid calls agree with cylstm.reference (which sees clean arrays)."""
    wdtype = data.draw(st.sampled_from(["float32", "float64"]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    T, B, Iw, Hw = (data.draw(st.integers(1, 5)), data.draw(st.integers(1, 4)),
                    data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4)))
    P = data.draw(st.sampled_from([0, 0] + list(range(1, Hw))))
    Hp = P or Hw
    k = 1 / np.sqrt(Hw)
    w = dict(w_ih=rng.uniform(-k, k, (4 * Hw, Iw)), w_hh=rng.uniform(-k, k, (4 * Hw, Hp)),
             b_ih=rng.uniform(-k, k, 4 * Hw), b_hh=rng.uniform(-k, k, 4 * Hw),
             w_hr=rng.uniform(-k, k, (P, Hw)) if P else None)
    w = {n: None if v is None else v.astype(wdtype) for n, v in w.items()}
    if data.draw(st.booleans()):
        w["b_ih"] = w["b_hh"] = None
    ok_w, wnames = True, ()
    bad_w = data.draw(st.sampled_from([None] * 4 + ["w_ih", "w_hh", "b_ih"]))
    if bad_w and w[bad_w] is not None:
        s, ok_w = shape_near(data, w[bad_w].shape)
        w[bad_w] = np.zeros(s, wdtype)
        ok_w = ok_w and min(s) >= 1
        wnames = (bad_w, "b_hh", "w_hr") if bad_w != "w_ih" else ("w_ih",)
    scale = data.draw(st.sampled_from([1.0, 1e30, -1e30]))
    xs, ok_x = shape_near(data, (T, B, Iw), last=True)
    x = make_array(rng, xs, data.draw(st.sampled_from(HOSTILE)),
                   data.draw(st.sampled_from(LAYOUTS)), scale)
    wi = w["w_ih"]
    if bad_w == "w_ih" and wi.ndim == 2 and wi.shape[0] == 4 * Hw and wi.shape[1] >= 1:
        ok_w = True              # another I is a valid weight: x must then match it
    if len(xs) == 3:
        ok_x = xs[0] >= 1 and xs[1] >= 1 and wi.ndim == 2 and xs[2] == wi.shape[1]
    ok_x = ok_x and is_real(x)
    h0 = c0 = None
    ok_s = True
    if data.draw(st.booleans()):
        hs, ok_h = shape_near(data, (B, Hp), empty=False)
        h0 = make_array(rng, hs, data.draw(st.sampled_from(REAL)), data.draw(st.sampled_from(LAYOUTS)))
        c0 = make_array(rng, (B, Hw), wdtype, data.draw(st.sampled_from(LAYOUTS)))
        ok_s = ok_h
    lengths = None
    if data.draw(st.booleans()):
        lengths = rng.integers(1, T + 1, B).astype(data.draw(st.sampled_from(["int8", "uint32", "int64"])))
    reverse = data.draw(st.booleans())
    valid = ok_w and ok_x and ok_s
    got = expect(valid, lambda: F.lstm_layer_forward(x, h0=h0, c0=c0, lengths=lengths,
                                                     reverse=reverse, **w),
                 wnames + ("x", "h0", "c0"))
    if got is None:
        return
    y, h, c, cache = got
    cw = {n: None if v is None else v for n, v in w.items()}
    ry, rh, rc, rcache = reference.lstm_layer_forward(
        clean(x, wdtype), h0=None if h0 is None else clean(h0, wdtype),
        c0=None if c0 is None else clean(c0, wdtype), lengths=lengths, reverse=reverse, **cw)
    tol = KERNEL_TOL[np.dtype(wdtype)] * 10
    for a, b in ((y, ry), (h, rh), (c, rc)):
        assert np.all(np.isfinite(a))
        # saturated gates at |x| = 1e30: values like 1e-38 vs 0, so an absolute floor
        assert rel_err(a, b) < tol if scale == 1.0 else np.allclose(a, b, rtol=tol, atol=tol)
    dy = make_array(rng, (T, B, Hp), data.draw(st.sampled_from(REAL)),
                    data.draw(st.sampled_from(LAYOUTS)))
    g = {f"d{n}": np.zeros_like(v) for n, v in w.items() if v is not None}
    rg = {n: np.zeros_like(v) for n, v in g.items()}
    dx, dh0, dc0 = F.lstm_layer_backward(cache, dy, **g)
    rdx, rdh0, rdc0 = reference.lstm_layer_backward(rcache, clean(dy, wdtype), **rg)
    for n, a, b in [("dx", dx, rdx), ("dh0", dh0, rdh0), ("dc0", dc0, rdc0)] + \
            [(n, g[n], rg[n]) for n in g]:
        assert np.all(np.isfinite(a)), n
        if scale == 1.0:      # at 1e30 both are finite but saturated: rounding dominates
            assert rel_err(a, b) < tol, n


# ---------------------------------------------------------------- Embedding

@fuzz(80)
@given(data=st.data())
def test_embedding_forward_backward(data):
    dtype = data.draw(st.sampled_from(["float32", "float64"]))
    V, Dm = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 4))
    pad = data.draw(st.sampled_from([None, 0, -1]))
    emb = cylstm.Embedding(V, Dm, dtype=dtype, seed=1, padding_idx=pad)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    shape = tuple(data.draw(st.integers(0, 3)) for _ in range(data.draw(st.integers(0, 3))))
    idt = data.draw(st.sampled_from(["int64", "int32", "int8", "uint8", "uint64", "int16",
                                     "float64", "bool", "object", "U1"]))
    hi = data.draw(st.sampled_from([V, V, V + 1]))
    lo = 0 if idt[0] in "ub" else data.draw(st.sampled_from([0, 0, -1]))
    vals = rng.integers(lo, max(hi, lo + 1), size=shape)
    idx = vals.astype("U3") if idt == "U1" else vals.astype(idt)
    if data.draw(st.booleans()) and idx.ndim:
        idx = idx[(slice(None, None, -1),) * idx.ndim]
    valid = idx.dtype.kind in "iu" and (idx.size == 0 or (idx.min() >= 0 and idx.max() < V))
    out = expect(valid, lambda: emb(idx), ("indices",))
    if out is None:
        return
    assert np.array_equal(out, emb.weight[np.asarray(idx, np.int64)])
    ds, ok = shape_near(data, out.shape)
    dout = make_array(rng, ds, data.draw(st.sampled_from(HOSTILE)), data.draw(st.sampled_from(LAYOUTS)))
    ok = ok and is_real(dout)
    emb.zero_grad()
    if expect(ok, lambda: emb.backward(dout), ("dout",)) is None and not ok:
        assert not emb.grad.any()
        return
    want = np.zeros_like(emb.grad)
    np.add.at(want, np.asarray(idx, np.int64).reshape(-1), clean(dout, dtype).reshape(-1, Dm))
    if pad is not None:
        want[pad % V] = 0
    assert rel_err(emb.grad, want) < KERNEL_TOL[np.dtype(dtype)] * 10


# ---------------------------------------------------------------- losses

def _np_xent(z, t, w):
    z = z.astype(np.float64)
    m = z.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]
    return np.take_along_axis(lse[..., None] - z, t[..., None], -1)[..., 0] * w


@fuzz(120)
@given(data=st.data())
def test_losses_hostile_logits_targets_masks(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    lead = tuple(data.draw(st.integers(0, 3)) for _ in range(data.draw(st.integers(0, 2))))
    C = data.draw(st.integers(0, 4))
    ld = data.draw(st.sampled_from(["float32", "float64", "float32", "float16", "int64",
                                    "complex64", "object"]))
    scale = data.draw(st.sampled_from([1.0, 1e30, -1e30]))
    logits = make_array(rng, lead + (C,), ld, data.draw(st.sampled_from(LAYOUTS)), scale)
    ts, ok_t = shape_near(data, lead)
    td = data.draw(st.sampled_from(["int64", "int32", "uint8", "int8", "float64", "bool"]))
    tmax = data.draw(st.sampled_from([C, C, C + 1]))
    targets = rng.integers(0, max(tmax, 1), size=ts).astype(td)
    if data.draw(st.booleans()) and targets.size:
        targets.flat[0] = -100 if td not in ("uint8", "bool") else targets.flat[0]
    mk = data.draw(st.sampled_from(["none", "bool", "weights", "negative", "nan", "shape"]))
    mask = {"none": None, "bool": rng.random(lead) > 0.3, "weights": rng.random(lead),
            "negative": -rng.random(lead) - 0.1, "nan": np.full(lead, np.nan),
            "shape": np.ones(lead + (2,))}[mk]
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]))
    counted = None
    ok = (logits.dtype in (np.float32, np.float64) and C >= 1 and ok_t
          and targets.dtype.kind in "iu")
    if ok:
        w = np.ones(lead) if mask is None else np.broadcast_to(np.asarray(mask, np.float64), lead) \
            if mk != "shape" else None
        ok = w is not None and (mk not in ("negative", "nan") or targets.size == 0 or
                                not np.any((targets != -100)))
        if ok and mk in ("negative", "nan") and w.size:
            ok = False
        if ok:
            counted = (targets != -100) & (w != 0)
            tc = targets[counted]
            ok = tc.size == 0 or (tc.min() >= 0 and tc.max() < C)
    names = ("logits", "targets", "mask", "weight")
    got = expect(ok, lambda: losses.softmax_cross_entropy(logits, targets, mask,
                                                          reduction=reduction),
                 names)
    if got is None:
        return
    loss, dz = got
    assert dz.shape == logits.shape and np.all(np.isfinite(dz))
    ref = np.where(counted, _np_xent(logits, np.where(counted, targets, 0).astype(np.int64), w), 0)
    if reduction == "none":
        assert rel_err(loss, ref) < 1e-4
    else:
        tot = ref.sum()
        wsum = np.sum(np.where(counted, w, 0))
        want = tot if reduction == "sum" else (tot / wsum if counted.any() else 0.0)
        assert np.isfinite(loss) and abs(loss - want) <= 1e-4 * max(1.0, abs(want))
    acc = losses.accuracy(logits, targets, mask)
    assert 0.0 <= acc <= 1.0


@fuzz(80)
@given(data=st.data())
def test_mse_hostile(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    shape = tuple(data.draw(st.integers(0, 3)) for _ in range(data.draw(st.integers(1, 3))))
    pd = data.draw(st.sampled_from(["float32", "float64", "int64", "complex64", "float16"]))
    scale = data.draw(st.sampled_from([1.0, 1e10]))
    pred = make_array(rng, shape, pd, data.draw(st.sampled_from(LAYOUTS)), scale)
    ts, ok_t = shape_near(data, shape)
    target = make_array(rng, ts, data.draw(st.sampled_from(REAL + ["complex64", "U1"])),
                        data.draw(st.sampled_from(LAYOUTS)))
    ok = pred.dtype in (np.float32, np.float64) and ok_t and is_real(target)
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]))
    got = expect(ok, lambda: losses.MSELoss(reduction)(pred, target), ("pred", "target"))
    if got is None:
        return
    d = pred.astype(np.float64) - clean(target, pred.dtype).astype(np.float64)
    want = {"sum": (d * d).sum(), "mean": (d * d).mean() if d.size else 0.0, "none": d * d}[reduction]
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("bad", [np.array([1j]), np.array(["a"]), "1.0", [1.0], True,
                                 np.array([1.0], object)])
def test_perplexity_and_bits_per_char_reject_non_reals(bad):
    """Regression: complex arrays lost their imaginary part with a warning, and string
    arrays raised numpy's "could not convert string to float" without naming mean_ce."""
    for f in (losses.perplexity, losses.bits_per_char):
        with pytest.raises(TypeError, match="mean_ce"):
            f(bad)


# ---------------------------------------------------------------- optim

HYPER_VALUES = [0.1, 0.0, -1.0, np.nan, np.inf, 1.5, "0.1", None, True, (0.9, 0.99),
                np.float32(0.01), 10**400 if False else 1e308]


@fuzz(120)
@given(data=st.data())
def test_optimisers_hostile_arguments_and_state(data):
    cls = data.draw(st.sampled_from([optim.SGD, optim.Adam, optim.AdamW, optim.RMSprop]))
    dtype = data.draw(st.sampled_from(["float32", "float64", "float16", "int64"]))
    n = data.draw(st.integers(0, 7))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    layout = data.draw(st.sampled_from(["C", "C", "strided", "readonly", "list"]))
    params = make_array(rng, (n,), dtype, layout if layout != "list" else "C")
    grads = make_array(rng, (n,), dtype, "C")
    if layout == "list":
        params = params.tolist()
    kw = {}
    for name in data.draw(st.lists(st.sampled_from(cls._HYPER), max_size=2, unique=True)):
        kw[name] = data.draw(st.sampled_from(HYPER_VALUES))
    if cls is optim.SGD and "lr" not in kw:
        kw["lr"] = 0.1
    try:
        opt = cls(params, grads, **kw)
    except OK_ERRORS as e:
        assert any(w in str(e) for w in ("params", "grads", *kw)), e
        return
    assert isinstance(params, np.ndarray) and params.dtype in (np.float32, np.float64)
    assert params.flags.writeable and params.flags.c_contiguous
    for v in kw.values():
        assert not isinstance(v, str)
    before = params.copy()
    opt.step()
    assert params.shape == before.shape
    sd = opt.state_dict()
    key = data.draw(st.sampled_from(sorted(k for k in sd)))
    bad = data.draw(st.sampled_from([None, "x", -1, np.nan, np.zeros(n + 1), np.zeros(3, object),
                                     (0.1, 0.2, 0.3), 10**30]))
    snapshot = (opt.step_count, opt.hyper_parameters, {k: v.copy() for k, v in opt._state.items()})
    try:
        opt.load_state_dict({**sd, key: bad})
    except OK_ERRORS as e:
        assert key in str(e) or "optimizer" in str(e) or key in ("lr", "eps", "step"), e
        assert opt.step_count == snapshot[0] and opt.hyper_parameters == snapshot[1]
        for k, v in snapshot[2].items():
            assert np.array_equal(opt._state[k], v, equal_nan=True)
        return
    opt.step()        # whatever was accepted, a step runs


# ---------------------------------------------------------------- NaN and Inf

@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("kw", [dict(), dict(num_layers=2, bidirectional=True),
                                dict(proj_size=2)], ids=["plain", "stacked-bidi", "proj"])
def test_nan_and_inf_input_stays_in_its_own_sequence(dtype, bad, kw):
    """Non-finite input is not rejected (as in PyTorch): it may make that sequence's
    outputs NaN, but never another sequence's forward outputs, dx, dh0 or dc0 (they are
    bitwise those of a clean batch), and nothing crashes or hangs. The weight gradients
    of such a batch are not finite (optim.clip_grad_norm returns a non-finite norm)."""
    lstm = cylstm.LSTM(I, H, seed=5, dtype=dtype, **kw)
    x = np.random.default_rng(6).standard_normal((6, 3, I)).astype(dtype)
    lengths = np.array([6, 4, 5])
    xb = x.copy()
    xb[2, 1, 0] = bad
    out = {}
    for name, xx in (("clean", x), ("bad", xb)):
        y, (h, c) = lstm(xx, None, lengths)
        dx, (dh, dc) = lstm.backward(np.ones_like(y), (np.ones_like(h), np.ones_like(c)))
        out[name] = (y, h, c, dx, dh, dc)
    others = [0, 2]
    for a, b in zip(out["clean"], out["bad"]):
        axis = 1 if a.ndim == 3 else 0
        assert np.array_equal(np.take(a, others, axis), np.take(b, others, axis))
    norm = optim.clip_grad_norm(lstm, 1.0)
    assert not np.isfinite(norm)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_extreme_finite_inputs_give_finite_everything(dtype):
    """|x| and initial states up to 1e30: gates saturate, nothing overflows, forward and
    backward finite in float32 and float64."""
    lstm = cylstm.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=2, seed=7, dtype=dtype)
    rng = np.random.default_rng(8)
    for scale in (1e30, -1e30, 1e15):
        x = (scale * np.sign(rng.standard_normal((5, 2, I)))).astype(dtype)
        st_ = (np.full((4, 2, 2), scale, dtype), np.full((4, 2, H), -scale, dtype))
        y, (h, c) = lstm(x, st_)            # huge states too: the forward stays finite
        assert all(np.all(np.isfinite(a)) for a in (y, h, c))
        # backward from ordinary states and dy: dW_ih = sum dz x^T is then ~1e30 * T*B,
        # inside float32's range. (Huge states make the true dW_hh = dz^T h0 ~ 1e60:
        # that overflow is the gradient's true size, not a bug.)
        y, (h, c) = lstm(x)
        dx, (dh, dc) = lstm.backward(np.ones_like(y), (np.ones_like(h), np.ones_like(c)))
        for a in (y, h, c, dx, dh, dc, lstm.flat_grads):
            assert np.all(np.isfinite(a))
        lstm.zero_grad()


def test_nan_in_logits_of_counted_rows_raises_and_ignored_rows_may_hold_anything():
    z = np.zeros((3, 4))
    z[1] = np.nan
    with pytest.raises(ValueError, match="logits"):
        losses.softmax_cross_entropy(z, np.array([0, 1, 2]))
    loss, dz = losses.softmax_cross_entropy(z, np.array([0, -100, 2]))
    assert np.isfinite(loss) and np.all(dz[1] == 0)


# ---------------------------------------------------------------- regressions

def test_functional_out_and_workspace_arguments_name_themselves():
    """Regression: out=[...] and workspace=5 raised AttributeError; a read-only out raised
    Cython's "buffer source array is read-only" without naming out."""
    rng = np.random.default_rng(9)
    x, w_ih, w_hh = rng.standard_normal((4, 2, 3)), rng.standard_normal((8, 3)), rng.standard_normal((8, 2))
    ro = np.zeros((4, 2, 2))
    ro.setflags(write=False)
    for out in ([1.0], ro, np.zeros((4, 2, 2), np.float32)):
        with pytest.raises(ValueError, match="out"):
            F.lstm_layer_forward(x, w_ih, w_hh, out=out)
    with pytest.raises(TypeError, match="workspace"):
        F.lstm_layer_forward(x, w_ih, w_hh, workspace=5)
    _, _, _, cache = F.lstm_layer_forward(x, w_ih, w_hh)
    with pytest.raises(TypeError, match="workspace"):
        F.lstm_layer_backward(cache, np.ones((4, 2, 2)), dw_ih=np.zeros((8, 3)),
                              dw_hh=np.zeros((8, 2)), workspace={})


def test_accuracy_of_a_single_row_with_0d_targets():
    """Regression (found by a 1,000-example run): logits (C,) with a 0-d target gave
    IndexError in accuracy (softmax_cross_entropy took it)."""
    z = np.array([0.1, 2.0, -1.0], np.float32)
    assert losses.accuracy(z, np.int64(1)) == 1.0
    assert losses.accuracy(z, np.int64(0)) == 0.0
    assert losses.accuracy(z, np.int64(0), mask=False) == 0.0


def test_optimizer_load_state_dict_with_an_object_array_value():
    """Regression (found by a 1,000-example run): a hyper-parameter given as an object
    array (np.array([0.9, 0.99], object)) raised AttributeError from .item()."""
    opt = optim.Adam(np.zeros(3), np.zeros(3))
    sd = opt.state_dict()
    opt.load_state_dict({**sd, "betas": np.array([0.8, 0.9], object)})
    assert opt.betas == (0.8, 0.9)
    with pytest.raises(TypeError, match="betas"):
        opt.load_state_dict({**sd, "betas": np.array(["a", "b"], object)})


def test_functional_layer_with_zero_input_features_is_rejected():
    """Regression (found by the bounds-checked build, CYLSTM_DEBUG=1): w_ih (4H, 0) with
    x (T, B, 0) reached the kernel, which took &x[0, 0, 0] of an empty axis
    ("Out of bounds on buffer access"). cylstm.LSTM already refused input_size=0."""
    with pytest.raises(ValueError, match="w_ih"):
        F.lstm_layer_forward(np.zeros((3, 2, 0)), np.zeros((8, 0)), np.zeros((8, 2)))


def test_ragged_lengths_name_lengths():
    """Regression: a ragged nested list raised numpy's inhomogeneous-shape ValueError."""
    with pytest.raises(TypeError, match="lengths"):
        cylstm.LSTM(I, H)(np.zeros((4, 3, I)), None, [[1], [1, 2], 3])


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e300])
def test_load_state_dict_rejects_non_finite_values(bad):
    """Regression: NaN/Inf (or 1e300, Inf in float32) loaded silently; the model then
    computed only NaN. Now: a ValueError naming the key, the model unchanged."""
    lstm = cylstm.LSTM(I, H, seed=10)
    before = lstm.flat_params.copy()
    sd = lstm.state_dict()
    sd["weight_hh_l0"] = sd["weight_hh_l0"].astype(np.float64)
    sd["weight_hh_l0"][1, 1] = bad
    with pytest.raises(ValueError, match="weight_hh_l0"):
        lstm.load_state_dict(sd)
    assert np.array_equal(lstm.flat_params, before)
    emb = cylstm.Embedding(4, 2)
    w = emb.weight.copy()
    with pytest.raises(ValueError, match="weight"):
        emb.load_state_dict({"weight": np.full((4, 2), bad)})
    assert np.array_equal(emb.weight, w)
