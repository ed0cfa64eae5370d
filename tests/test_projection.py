"""Projection (PyTorch's proj_size; W_hr (P, H), h_t = (o_t * tanh(c_t)) W_hr^T):

* the NumPy reference with w_hr / dw_hr against central finite differences (one layer,
  lengths, reverse, with and without state and bias);
* the compiled kernels (cylstm.functional) against the reference, forward and backward,
  float32/float64, reverse, ragged lengths, with/without h0/c0, T=1, B=1, batches that
  are and are not a multiple of the work parts;
* thread-count invariance (bitwise, threads(1) vs threads(2)) and exact accumulation
  (two backward calls give exactly 2x every gradient, dw_hr included);
* the stacked module (2 layers, bidirectional, proj_size=2, ragged lengths, a given
  state) against central finite differences in float64, every element of dx, dh0, dc0
  and of every parameter gradient; and the module against the reference composed layer
  by layer."""
import numpy as np
import pytest

import cylstm
from cylstm import functional as F
from cylstm import reference as ref
from cylstm._threads import N_PARTS

from conftest import KERNEL_TOL, as_dtype, assert_close, padded_mask, rel_err
from test_kernels import _ragged

DTYPES = [np.float32, np.float64]
FD_EPS = 1e-6
FD_TOL = 1e-6


def make_proj_problem(T, B, I, H, P, *, seed, dtype=np.float64, bias=True, state=True):
    """Random single-layer problem with a projection: x (T, B, I), w_ih (4H, I),
    w_hh (4H, P), b_ih, b_hh (4H,) or None, w_hr (P, H), h0 (B, P), c0 (B, H) or None."""
    rng = np.random.default_rng(seed)
    k = 1 / np.sqrt(H)
    p = dict(
        x=rng.standard_normal((T, B, I)),
        w_ih=rng.uniform(-k, k, (4 * H, I)),
        w_hh=rng.uniform(-k, k, (4 * H, P)),
        b_ih=rng.uniform(-k, k, 4 * H) if bias else None,
        b_hh=rng.uniform(-k, k, 4 * H) if bias else None,
        h0=rng.standard_normal((B, P)) if state else None,
        c0=rng.standard_normal((B, H)) if state else None,
        w_hr=rng.uniform(-k, k, (P, H)),
    )
    return {n: (None if v is None else v.astype(dtype)) for n, v in p.items()}


def proj_grad_buffers(p):
    """Zeroed gradient buffers for the weights in p, dw_hr included."""
    return dict(
        dw_ih=np.zeros_like(p["w_ih"]),
        dw_hh=np.zeros_like(p["w_hh"]),
        db_ih=None if p["b_ih"] is None else np.zeros_like(p["b_ih"]),
        db_hh=None if p["b_hh"] is None else np.zeros_like(p["b_hh"]),
        dw_hr=np.zeros_like(p["w_hr"]),
    )


def proj_output_grads(T, B, H, P, *, seed, dtype=np.float64):
    """dL/dy (T, B, P), dL/dh_n (B, P), dL/dc_n (B, H) of a random linear loss."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((T, B, P)).astype(dtype),
            rng.standard_normal((B, P)).astype(dtype),
            rng.standard_normal((B, H)).astype(dtype))


def run_layer(mod, p, lengths, reverse, dy, dh_n, dc_n):
    """Forward and backward of one layer with `mod` (functional or reference)."""
    y, h_n, c_n, cache = mod.lstm_layer_forward(**p, lengths=lengths, reverse=reverse)
    g = proj_grad_buffers(p)
    dx, dh0, dc0 = mod.lstm_layer_backward(cache, dy, dh_n, dc_n, **g)
    return dict(y=y, h_n=h_n, c_n=c_n, dx=dx, dh0=dh0, dc0=dc0,
                **{k: v for k, v in g.items() if v is not None})


# ---------------------------------------------------------------- reference vs FD

RT, RB, RI, RH, RP = 5, 4, 3, 4, 2
RAGGED = [RT, 1, RT - 2, 3]


@pytest.mark.parametrize("state,bias", [(True, True), (False, True), (True, False)],
                         ids=["h0c0-bias", "nostate-bias", "h0c0-nobias"])
@pytest.mark.parametrize("lengths", [None, RAGGED], ids=["full", "ragged"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_reference_with_projection_matches_finite_differences(reverse, lengths, state, bias):
    """Every element of dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh and dw_hr of the
    reference against central differences of sum(y R1) + sum(h_n R2) + sum(c_n R3)."""
    p = make_proj_problem(RT, RB, RI, RH, RP, seed=1, bias=bias, state=state)
    R1, R2, R3 = proj_output_grads(RT, RB, RH, RP, seed=2)

    def loss(q):
        y, h_n, c_n, _ = ref.lstm_layer_forward(**q, lengths=lengths, reverse=reverse,
                                                training=False)
        return np.sum(y * R1) + np.sum(h_n * R2) + np.sum(c_n * R3)

    y, h_n, c_n, cache = ref.lstm_layer_forward(**p, lengths=lengths, reverse=reverse)
    assert y.shape == (RT, RB, RP) and h_n.shape == (RB, RP) and c_n.shape == (RB, RH)
    g = proj_grad_buffers(p)
    dx, dh0, dc0 = ref.lstm_layer_backward(cache, R1, R2, R3, **g)
    analytic = dict(x=dx, w_ih=g["dw_ih"], w_hh=g["dw_hh"], w_hr=g["dw_hr"], h0=dh0, c0=dc0)
    if bias:
        analytic.update(b_ih=g["db_ih"], b_hh=g["db_hh"])
    q = dict(p)
    if not state:    # differentiate with respect to the explicit zeros None means
        q["h0"], q["c0"] = np.zeros((RB, RP)), np.zeros((RB, RH))
    for name, grad in analytic.items():
        assert grad.shape == q[name].shape and np.all(np.isfinite(grad)), name
        num = np.zeros_like(grad)
        for k in np.ndindex(*grad.shape):
            v = q[name].copy()
            v[k] += FD_EPS
            lp = loss({**q, name: v})
            v[k] -= 2 * FD_EPS
            lm = loss({**q, name: v})
            num[k] = (lp - lm) / (2 * FD_EPS)
        assert np.abs(num).max() > 0, name
        err = rel_err(grad, num)
        assert err < FD_TOL, f"{name}: relative error {err:.2e}"
    if lengths is not None:
        pad = padded_mask(RT, lengths)
        assert np.all(y[pad] == 0) and np.all(dx[pad] == 0)


def test_reference_projection_one_step_written_out():
    """T=1: h = (o tanh(c)) W_hr^T with W_hh acting on the P-feature h0 (LSTM_MATH.md)."""
    p = make_proj_problem(1, RB, RI, RH, RP, seed=3)
    y, h_n, c_n, _ = ref.lstm_layer_forward(**p)
    z = p["x"][0] @ p["w_ih"].T + p["h0"] @ p["w_hh"].T + p["b_ih"] + p["b_hh"]
    sig = lambda v: 1 / (1 + np.exp(-v))
    H = RH
    i, f, g, o = sig(z[:, :H]), sig(z[:, H:2 * H]), np.tanh(z[:, 2 * H:3 * H]), sig(z[:, 3 * H:])
    c = f * p["c0"] + i * g
    h = (o * np.tanh(c)) @ p["w_hr"].T
    np.testing.assert_allclose(c_n, c, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(h_n, h, rtol=1e-13, atol=1e-15)
    np.testing.assert_array_equal(y[0], h_n)


# ---------------------------------------------------------------- compiled vs reference

B_MANY = 2 * N_PARTS + 1
B_DIV = 3 * N_PARTS
# (T, B, I, H, P, lengths)
PROJ_SIZES = {
    "ragged": (6, 6, 3, 5, 2, [6, 1, 3, 6, 2, 5]),
    "full": (6, 6, 3, 5, 3, None),
    "T1": (1, 3, 2, 3, 2, None),
    "T1-lengths": (1, 3, 2, 3, 1, [1, 1, 1]),
    "B1": (5, 1, 3, 4, 3, None),
    "B1-short": (5, 1, 3, 4, 2, [3]),
    "T1B1": (1, 1, 2, 3, 2, None),
    "B-many-parts": (4, B_MANY, 3, 4, 2, _ragged(4, B_MANY, seed=97)),
    "B-divisible": (3, B_DIV, 2, 5, 3, _ragged(3, B_DIV, seed=96)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("state", [True, False], ids=["h0c0", "nostate"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("size", list(PROJ_SIZES), ids=list(PROJ_SIZES))
def test_compiled_with_projection_matches_reference(size, reverse, state, dtype):
    """y, h_n, c_n, dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr; the reference runs in
    float64 on the same values (the exact answer for a float32 kernel)."""
    T, B, I, H, P, lengths = PROJ_SIZES[size]
    p = make_proj_problem(T, B, I, H, P, seed=4, dtype=dtype, state=state)
    dy, dh_n, dc_n = proj_output_grads(T, B, H, P, seed=5, dtype=dtype)
    got = run_layer(F, p, lengths, reverse, dy, dh_n, dc_n)
    want = run_layer(ref, as_dtype(p, np.float64), lengths, reverse,
                     *(a.astype(np.float64) for a in (dy, dh_n, dc_n)))
    assert set(got) == set(want) and "dw_hr" in got
    assert got["y"].shape == (T, B, P) and got["h_n"].shape == (B, P)
    assert got["dh0"].shape == (B, P) and got["dc0"].shape == (B, H)
    tol = KERNEL_TOL[np.dtype(dtype)]
    for name in want:
        assert got[name].dtype == dtype, name
        if name == "dw_hh" and T == 1 and not state:   # h_{t-1} = 0 at every step
            assert np.all(got[name] == 0) and np.all(want[name] == 0)
            continue
        assert np.abs(want[name]).max() > 0, name
        assert_close(got[name], want[name], tol, name)
    if lengths is not None:
        pad = padded_mask(T, lengths)
        assert np.all(got["y"][pad] == 0) and np.all(got["dx"][pad] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_compiled_with_projection_no_bias(reverse, dtype):
    T, B, I, H, P, lengths = PROJ_SIZES["ragged"]
    p = make_proj_problem(T, B, I, H, P, seed=6, dtype=dtype, bias=False)
    outs = proj_output_grads(T, B, H, P, seed=7, dtype=dtype)
    got = run_layer(F, p, lengths, reverse, *outs)
    want = run_layer(ref, as_dtype(p, np.float64), lengths, reverse,
                     *(a.astype(np.float64) for a in outs))
    assert set(got) == set(want) and "db_ih" not in got
    for name in want:
        assert_close(got[name], want[name], KERNEL_TOL[np.dtype(dtype)], name)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_projection_results_are_bitwise_identical_for_any_thread_count(reverse, dtype):
    """threads(1), threads(2) and the default: identical y, states and every gradient,
    dw_hr included. Medium size so the batch is chunked and the GEMMs are blocked."""
    T, B, I, H, P = 20, 9, 16, 32, 8
    lengths = _ragged(T, B, seed=8)
    p = make_proj_problem(T, B, I, H, P, seed=9, dtype=dtype)
    outs = proj_output_grads(T, B, H, P, seed=10, dtype=dtype)
    results = {}
    for n in (1, 2, None):
        with cylstm.threads(n):
            if n == 1:
                assert cylstm.get_num_threads() == 1
            results[n] = run_layer(F, p, lengths, reverse, *outs)
    assert "dw_hr" in results[1]
    for n in (2, None):
        for name, v in results[1].items():
            assert np.array_equal(v, results[n][name]), f"threads({n}): {name}"
    want = run_layer(ref, as_dtype(p, np.float64), lengths, reverse,
                     *(a.astype(np.float64) for a in outs))
    for name in want:
        assert_close(results[1][name], want[name], KERNEL_TOL[np.dtype(dtype)], name)


@pytest.mark.parametrize("state", [False, True], ids=["nostate", "h0c0"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_projection_two_backward_calls_give_exactly_twice_the_gradient(reverse, state):
    """float64, one cache: the second backward adds exactly the first's gradient to every
    buffer (bitwise 2x, dw_hr included), returns the same dx/dh0/dc0, and leaves the
    cache untouched. The same holds for the reference."""
    T, B, I, H, P, lengths = PROJ_SIZES["ragged"]
    p = make_proj_problem(T, B, I, H, P, seed=11, state=state)
    dy, dh_n, dc_n = proj_output_grads(T, B, H, P, seed=12)
    for mod in (F, ref):
        _, _, _, cache = mod.lstm_layer_forward(**p, lengths=lengths, reverse=reverse)
        if mod is F:
            snapshot = {s: np.array(getattr(cache, s), copy=True) for s in cache.__slots__
                        if isinstance(getattr(cache, s), np.ndarray)}
        g1, g2 = proj_grad_buffers(p), proj_grad_buffers(p)
        out1 = mod.lstm_layer_backward(cache, dy, dh_n, dc_n, **g1)
        out2a = mod.lstm_layer_backward(cache, dy, dh_n, dc_n, **g2)
        out2b = mod.lstm_layer_backward(cache, dy, dh_n, dc_n, **g2)
        for a, b, c in zip(out1, out2a, out2b):
            assert np.array_equal(a, b) and np.array_equal(a, c)
        for k, v in g1.items():
            assert np.abs(v).max() > 0, k
            bad = int(np.sum(g2[k] != 2 * v))
            assert bad == 0, f"{mod.__name__} {k}: {bad} of {v.size} elements not exactly 2x"
        if mod is F:
            for s, before in snapshot.items():
                assert np.array_equal(before, getattr(cache, s)), f"cache.{s} modified"


# ---------------------------------------------------------------- module

def module_inputs(lstm, T, B, *, seed):
    """x (T, B, I), state (h0 (L*D, B, Hp), c0 (L*D, B, H)), dy, dstate, float64."""
    LD, H, Hp = lstm.num_layers * lstm.num_directions, lstm.hidden_size, lstm.state_size
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, B, lstm.input_size)).astype(lstm.dtype)
    st = (rng.standard_normal((LD, B, Hp)).astype(lstm.dtype),
          rng.standard_normal((LD, B, H)).astype(lstm.dtype))
    dy = rng.standard_normal((T, B, lstm.num_directions * Hp)).astype(lstm.dtype)
    dst = (rng.standard_normal((LD, B, Hp)).astype(lstm.dtype),
           rng.standard_normal((LD, B, H)).astype(lstm.dtype))
    return x, st, dy, dst


def module_run(lstm, x, state, lengths, dy, dstate):
    y, (h_n, c_n) = lstm(x, state, lengths)
    lstm.zero_grad()
    dx, (dh0, dc0) = lstm.backward(dy, dstate)
    return dict(y=y, h_n=h_n, c_n=c_n, dx=dx, dh0=dh0, dc0=dc0,
                **{k: v.copy() for k, v in lstm.grads.items()})


def module_finite_differences(lstm, x, state, lengths, dy, dstate):
    """Every element of dx, dh0, dc0 and of every parameter gradient (lstm.grads by name)
    against central differences of sum(y dy) + sum(h_n dh) + sum(c_n dc); float64.
    (test_module.finite_difference_check, with the projection's state shapes.)"""
    got = module_run(lstm, x, state, lengths, dy, dstate)

    def loss():
        y, (h_n, c_n) = lstm(x, state, lengths)
        return np.sum(y * dy) + np.sum(h_n * dstate[0]) + np.sum(c_n * dstate[1])

    targets = {"dx": x, "dh0": state[0], "dc0": state[1], **lstm.params}
    assert set(targets) == set(got) - {"y", "h_n", "c_n"}
    lstm.eval()
    try:
        for name, arr in targets.items():
            grad = got[name]
            assert grad.shape == arr.shape, name
            num = np.zeros_like(grad)
            for k in np.ndindex(*arr.shape):
                v = arr[k]
                arr[k] = v + FD_EPS
                lp = loss()
                arr[k] = v - FD_EPS
                lm = loss()
                arr[k] = v
                num[k] = (lp - lm) / (2 * FD_EPS)
            assert np.abs(num).max() > 0, name
            err = rel_err(grad, num)
            assert err < FD_TOL, f"{name}: relative error {err:.2e}"
    finally:
        lstm.train()
    return got


@pytest.mark.parametrize("L,D,bias", [(2, 2, True), (2, 1, False), (1, 2, True)])
def test_module_with_projection_matches_finite_differences(L, D, bias):
    """num_layers=2, bidirectional, proj_size=2, ragged lengths, a given state (and two
    smaller variants): every element of every gradient, float64, rel error < 1e-6."""
    T, B, I, H, P = 4, 3, 3, 3, 2
    lengths = [4, 1, 3]
    lstm = cylstm.LSTM(I, H, num_layers=L, bidirectional=D == 2, proj_size=P, bias=bias,
                       dtype="float64", seed=13)
    assert any(k.startswith("weight_hr") for k in lstm.params)
    x, st, dy, dst = module_inputs(lstm, T, B, seed=14)
    got = module_finite_differences(lstm, x, st, lengths, dy, dst)
    assert got["y"].shape == (T, B, D * P) and got["dh0"].shape == (L * D, B, P)
    pad = padded_mask(T, lengths)
    assert np.all(got["y"][pad] == 0) and np.all(got["dx"][pad] == 0)


def composed_reference_proj(lstm, x, state, lengths, dy, dstate):
    """The module's math from cylstm.reference layer by layer (float64), with w_hr."""
    L, D, H, Hp = lstm.num_layers, lstm.num_directions, lstm.hidden_size, lstm.state_size
    Pm = {k: v.astype(np.float64) for k, v in lstm.params.items()}
    G = {k: np.zeros_like(v) for k, v in Pm.items()}
    T, B, _ = x.shape
    h0, c0 = (None, None) if state is None else (np.asarray(s, np.float64) for s in state)
    inp, caches = x.astype(np.float64), {}
    h_n, c_n = np.empty((L * D, B, Hp)), np.empty((L * D, B, H))
    for layer in range(L):
        outs = []
        for d in range(D):
            k, sfx = layer * D + d, f"_l{layer}" + ("_reverse" if d else "")
            y, h_n[k], c_n[k], caches[k] = ref.lstm_layer_forward(
                inp, Pm["weight_ih" + sfx], Pm["weight_hh" + sfx], Pm.get("bias_ih" + sfx),
                Pm.get("bias_hh" + sfx), None if h0 is None else h0[k],
                None if c0 is None else c0[k], lengths=lengths, reverse=bool(d),
                w_hr=Pm["weight_hr" + sfx])
            outs.append(y)
        inp = np.concatenate(outs, axis=2)
    out = dict(y=inp, h_n=h_n, c_n=c_n)
    g = np.asarray(dy, np.float64)
    dh0, dc0 = np.empty((L * D, B, Hp)), np.empty((L * D, B, H))
    for layer in reversed(range(L)):
        dx = 0
        for d in range(D):
            k, sfx = layer * D + d, f"_l{layer}" + ("_reverse" if d else "")
            dxd, dh0[k], dc0[k] = ref.lstm_layer_backward(
                caches[k], g[:, :, d * Hp:(d + 1) * Hp],
                np.asarray(dstate[0][k], np.float64), np.asarray(dstate[1][k], np.float64),
                dw_ih=G["weight_ih" + sfx], dw_hh=G["weight_hh" + sfx],
                db_ih=G.get("bias_ih" + sfx), db_hh=G.get("bias_hh" + sfx),
                dw_hr=G["weight_hr" + sfx])
            dx = dx + dxd
        g = dx
    out.update(dx=g, dh0=dh0, dc0=dc0, **G)
    return out


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("L,D,state,ragged", [(1, 1, False, True), (2, 1, True, True),
                                              (2, 2, True, True), (3, 2, False, False)])
def test_module_with_projection_matches_layerwise_reference(L, D, state, ragged, dtype):
    T, B, I, H, P = 5, 4, 3, 5, 2
    lstm = cylstm.LSTM(I, H, num_layers=L, bidirectional=D == 2, proj_size=P, dtype=dtype,
                       seed=15)
    x, st, dy, dst = module_inputs(lstm, T, B, seed=16)
    st = st if state else None
    lengths = [5, 2, 4, 1] if ragged else None
    got = module_run(lstm, x, st, lengths, dy, dst)
    want = composed_reference_proj(lstm, x, st, lengths, dy, dst)
    assert set(got) == set(want)
    tol = 10 * KERNEL_TOL[np.dtype(dtype)]
    for name in want:
        assert got[name].dtype == np.dtype(dtype), name
        assert got[name].shape == want[name].shape, name
        assert_close(got[name], want[name], tol, name)
