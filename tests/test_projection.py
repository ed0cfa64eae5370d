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
  by layer (test_module.check_against_composed_reference, which handles w_hr)."""
import numpy as np
import pytest

import cylstm
from cylstm import functional as F
from cylstm import reference as ref
from cylstm._threads import N_PARTS

from conftest import (KERNEL_TOL, as_dtype, assert_close, check_layer_finite_differences,
                      grad_buffers, make_layer_problem, module_finite_differences,
                      module_inputs, output_grads, padded_mask)
from test_kernels import _ragged, assert_layer_results_close
from test_module import check_against_composed_reference

DTYPES = [np.float32, np.float64]


def run_layer(mod, p, lengths, reverse, dy, dh_n, dc_n):
    """Forward and backward of one layer with `mod` (functional or reference)."""
    y, h_n, c_n, cache = mod.lstm_layer_forward(**p, lengths=lengths, reverse=reverse)
    g = grad_buffers(p)
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
    p = make_layer_problem(RT, RB, RI, RH, proj_size=RP, seed=1, bias=bias, state=state)
    R1, R2, R3 = output_grads(RT, RB, RH, proj_size=RP, seed=2)

    def loss(q):
        y, h_n, c_n, _ = ref.lstm_layer_forward(**q, lengths=lengths, reverse=reverse,
                                                training=False)
        return np.sum(y * R1) + np.sum(h_n * R2) + np.sum(c_n * R3)

    y, h_n, c_n, cache = ref.lstm_layer_forward(**p, lengths=lengths, reverse=reverse)
    assert y.shape == (RT, RB, RP) and h_n.shape == (RB, RP) and c_n.shape == (RB, RH)
    g = grad_buffers(p)
    dx, dh0, dc0 = ref.lstm_layer_backward(cache, R1, R2, R3, **g)
    analytic = dict(x=dx, w_ih=g["dw_ih"], w_hh=g["dw_hh"], w_hr=g["dw_hr"], h0=dh0, c0=dc0)
    if bias:
        analytic.update(b_ih=g["db_ih"], b_hh=g["db_hh"])
    q = dict(p)
    if not state:    # differentiate with respect to the explicit zeros None means
        q["h0"], q["c0"] = np.zeros((RB, RP)), np.zeros((RB, RH))
    check_layer_finite_differences(loss, q, analytic)
    if lengths is not None:
        pad = padded_mask(RT, lengths)
        assert np.all(y[pad] == 0) and np.all(dx[pad] == 0)


def test_reference_projection_one_step_written_out():
    """T=1: h = (o tanh(c)) W_hr^T with W_hh acting on the P-feature h0 (docs/math.md)."""
    p = make_layer_problem(1, RB, RI, RH, proj_size=RP, seed=3)
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
    p = make_layer_problem(T, B, I, H, proj_size=P, seed=4, dtype=dtype, state=state)
    dy, dh_n, dc_n = output_grads(T, B, H, proj_size=P, seed=5, dtype=dtype)
    got = run_layer(F, p, lengths, reverse, dy, dh_n, dc_n)
    want = run_layer(ref, as_dtype(p, np.float64), lengths, reverse,
                     *(a.astype(np.float64) for a in (dy, dh_n, dc_n)))
    assert set(got) == set(want) and "dw_hr" in got
    assert got["y"].shape == (T, B, P) and got["h_n"].shape == (B, P)
    assert got["dh0"].shape == (B, P) and got["dc0"].shape == (B, H)
    assert_layer_results_close(got, want, dtype, zero_dw_hh=T == 1 and not state)
    if lengths is not None:
        pad = padded_mask(T, lengths)
        assert np.all(got["y"][pad] == 0) and np.all(got["dx"][pad] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_compiled_with_projection_no_bias(reverse, dtype):
    T, B, I, H, P, lengths = PROJ_SIZES["ragged"]
    p = make_layer_problem(T, B, I, H, proj_size=P, seed=6, dtype=dtype, bias=False)
    outs = output_grads(T, B, H, proj_size=P, seed=7, dtype=dtype)
    got = run_layer(F, p, lengths, reverse, *outs)
    want = run_layer(ref, as_dtype(p, np.float64), lengths, reverse,
                     *(a.astype(np.float64) for a in outs))
    assert set(got) == set(want) and "db_ih" not in got
    for name in want:
        assert_close(got[name], want[name], KERNEL_TOL[np.dtype(dtype)], name)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_projection_results_are_bitwise_identical_for_any_thread_count(
        reverse, dtype, two_thread_teams, kernel_level):
    """threads(1), threads(2) and the default: identical y, states and every gradient,
    dw_hr included. Medium size so the batch is chunked and the GEMMs are blocked."""
    T, B, I, H, P = 20, 9, 16, 32, 8
    lengths = _ragged(T, B, seed=8)
    p = make_layer_problem(T, B, I, H, proj_size=P, seed=9, dtype=dtype)
    outs = output_grads(T, B, H, proj_size=P, seed=10, dtype=dtype)
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
    p = make_layer_problem(T, B, I, H, proj_size=P, seed=11, state=state)
    dy, dh_n, dc_n = output_grads(T, B, H, proj_size=P, seed=12)
    for mod in (F, ref):
        _, _, _, cache = mod.lstm_layer_forward(**p, lengths=lengths, reverse=reverse)
        if mod is F:
            snapshot = {s: np.array(getattr(cache, s), copy=True) for s in cache.__slots__
                        if isinstance(getattr(cache, s), np.ndarray)}
        g1, g2 = grad_buffers(p), grad_buffers(p)
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
    check_against_composed_reference(lstm, x, st, lengths, dy, dst, dtype)
