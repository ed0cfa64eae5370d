"""Tests of the pure-NumPy reference LSTM layer (cylstm.reference), the oracle that the
compiled kernels are compared against: finite differences, padding, direction,
batched vs step-by-step, gradient accumulation, float32 and overflow safety."""
import warnings

import numpy as np
import pytest

from cylstm import reference as ref

from conftest import check_layer_finite_differences, grad_buffers, make_layer_problem, rel_err

T, B, I, H = 5, 4, 3, 4
RAGGED = [T, 1, T - 2, 3]  # includes the extremes T and 1


def make_problem(seed, **kw):
    """Random x (T, B, I), weights, biases and initial state, PyTorch-like magnitudes
    (conftest.make_layer_problem at this file's sizes)."""
    return make_layer_problem(T, B, I, H, seed=seed, **kw)


def sequence_reversed(x, lengths):
    """Reverse each sequence's valid prefix in time, leave the padding in place."""
    out = x.copy()
    for b, L in enumerate(lengths):
        out[:L, b] = x[:L, b][::-1]
    return out


# ---------------------------------------------------------------- finite differences

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("state", [True, False])
@pytest.mark.parametrize("lengths", [None, RAGGED], ids=["full", "ragged"])
@pytest.mark.parametrize("reverse", [False, True])
def test_gradients_match_central_finite_differences(reverse, lengths, state, bias):
    """Every element of every gradient against central differences of
    L = sum(y R1) + sum(h_n R2) + sum(c_n R3), float64."""
    p = make_problem(seed=1, bias=bias, state=state)
    rng = np.random.default_rng(2)
    R1, R2, R3 = rng.standard_normal((T, B, H)), rng.standard_normal((B, H)), rng.standard_normal((B, H))

    def loss(q):
        y, h_n, c_n, _ = ref.lstm_layer_forward(**q, lengths=lengths, reverse=reverse, training=False)
        return np.sum(y * R1) + np.sum(h_n * R2) + np.sum(c_n * R3)

    y, h_n, c_n, cache = ref.lstm_layer_forward(**p, lengths=lengths, reverse=reverse)
    g = grad_buffers(p)
    dx, dh0, dc0 = ref.lstm_layer_backward(cache, R1, R2, R3, **g)
    analytic = dict(x=dx, w_ih=g["dw_ih"], w_hh=g["dw_hh"], h0=dh0, c0=dc0)
    if bias:
        analytic.update(b_ih=g["db_ih"], b_hh=g["db_hh"])

    # without a given state, differentiate w.r.t. explicit zeros (what None means)
    q = dict(p)
    if not state:
        q["h0"], q["c0"] = np.zeros((B, H)), np.zeros((B, H))
    check_layer_finite_differences(loss, q, analytic)


def test_missing_final_gradients_mean_zeros():
    """dh_n=None / dc_n=None is the same as passing zeros."""
    p = make_problem(seed=3)
    dy = np.random.default_rng(4).standard_normal((T, B, H))
    _, _, _, cache = ref.lstm_layer_forward(**p, lengths=RAGGED)
    g1, g2 = grad_buffers(p), grad_buffers(p)
    out1 = ref.lstm_layer_backward(cache, dy, **g1)
    out2 = ref.lstm_layer_backward(cache, dy, np.zeros((B, H)), np.zeros((B, H)), **g2)
    for a, b in zip(list(out1) + list(g1.values()), list(out2) + list(g2.values())):
        assert np.array_equal(a, b)


# ---------------------------------------------------------------- forward math

def test_one_step_matches_the_equations_written_out():
    """T=1 against docs/math.md spelled out with the naive sigmoid (safe at these sizes)."""
    p = make_problem(seed=5)
    x = p["x"][:1]
    y, h_n, c_n, _ = ref.lstm_layer_forward(x, p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"], p["h0"], p["c0"])
    z = x[0] @ p["w_ih"].T + p["h0"] @ p["w_hh"].T + p["b_ih"] + p["b_hh"]
    sig = lambda v: 1 / (1 + np.exp(-v))
    i, f, g, o = sig(z[:, :H]), sig(z[:, H:2 * H]), np.tanh(z[:, 2 * H:3 * H]), sig(z[:, 3 * H:])
    c = f * p["c0"] + i * g
    h = o * np.tanh(c)
    np.testing.assert_allclose(c_n, c, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(h_n, h, rtol=1e-13, atol=1e-15)
    np.testing.assert_array_equal(y[0], h_n)


def test_batched_equals_step_by_step():
    """T calls with T=1 carrying (h, c) give the whole-sequence result, forward and backward."""
    p = make_problem(seed=6)
    rng = np.random.default_rng(7)
    dy, dh_n, dc_n = rng.standard_normal((T, B, H)), rng.standard_normal((B, H)), rng.standard_normal((B, H))
    w = dict(w_ih=p["w_ih"], w_hh=p["w_hh"], b_ih=p["b_ih"], b_hh=p["b_hh"])

    y, h_n, c_n, cache = ref.lstm_layer_forward(**p)
    g = grad_buffers(p)
    dx, dh0, dc0 = ref.lstm_layer_backward(cache, dy, dh_n, dc_n, **g)

    h, c, caches, ys = p["h0"], p["c0"], [], []
    for t in range(T):
        yt, h, c, ct = ref.lstm_layer_forward(p["x"][t:t + 1], **w, h0=h, c0=c)
        ys.append(yt)
        caches.append(ct)
    np.testing.assert_allclose(np.concatenate(ys), y, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(h, h_n, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(c, c_n, rtol=1e-12, atol=1e-14)

    gs = grad_buffers(p)  # every step accumulates into the same buffers
    dh, dc, dxs = dh_n, dc_n, [None] * T
    for t in reversed(range(T)):
        dxs[t], dh, dc = ref.lstm_layer_backward(caches[t], dy[t:t + 1], dh, dc, **gs)
    np.testing.assert_allclose(np.concatenate(dxs), dx, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dh, dh0, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dc, dc0, rtol=1e-12, atol=1e-14)
    for k in g:
        np.testing.assert_allclose(gs[k], g[k], rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- lengths and direction

@pytest.mark.parametrize("reverse", [False, True])
def test_padding_matches_one_sequence_at_a_time(reverse):
    """Padded outputs are exactly 0, padded dx is exactly 0, dy there is ignored, and every
    sequence equals running it alone, truncated to its own length (B=1, no lengths)."""
    p = make_problem(seed=8)
    rng = np.random.default_rng(9)
    dy, dh_n, dc_n = rng.standard_normal((T, B, H)), rng.standard_normal((B, H)), rng.standard_normal((B, H))
    pad = np.arange(T)[:, None] >= np.array(RAGGED)  # (T, B) padded positions

    y, h_n, c_n, cache = ref.lstm_layer_forward(**p, lengths=RAGGED, reverse=reverse)
    g = grad_buffers(p)
    dx, dh0, dc0 = ref.lstm_layer_backward(cache, dy, dh_n, dc_n, **g)
    assert pad.any() and np.all(y[pad] == 0) and np.all(dx[pad] == 0)
    assert np.all(y[~pad] != 0) and np.all(dx[~pad] != 0)

    # dy at padded positions is ignored, bit for bit
    g2 = grad_buffers(p)
    dx2, dh02, dc02 = ref.lstm_layer_backward(cache, np.where(pad[..., None], 0.0, dy), dh_n, dc_n, **g2)
    for a, b in zip([dx, dh0, dc0, *g.values()], [dx2, dh02, dc02, *g2.values()]):
        assert np.array_equal(a, b)

    gsum = grad_buffers(p)  # the batch gradient is the sum of the per-sequence ones
    for b, L in enumerate(RAGGED):
        s = slice(b, b + 1)
        yb, hb, cb, cacheb = ref.lstm_layer_forward(
            p["x"][:L, s], p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"], p["h0"][s], p["c0"][s], reverse=reverse)
        np.testing.assert_allclose(y[:L, s], yb, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(h_n[s], hb, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(c_n[s], cb, rtol=1e-12, atol=1e-14)
        dxb, dh0b, dc0b = ref.lstm_layer_backward(cacheb, dy[:L, s], dh_n[s], dc_n[s], **gsum)
        np.testing.assert_allclose(dx[:L, s], dxb, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(dh0[s], dh0b, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(dc0[s], dc0b, rtol=1e-12, atol=1e-14)
    for k in g:
        np.testing.assert_allclose(gsum[k], g[k], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("lengths", [None, RAGGED], ids=["full", "ragged"])
def test_reverse_is_forward_on_time_reversed_input(lengths):
    """reverse=True equals forward on each sequence's valid prefix reversed in time, with the
    outputs (and dx) reversed back; final states and weight gradients are equal."""
    p = make_problem(seed=10)
    rng = np.random.default_rng(11)
    dy, dh_n, dc_n = rng.standard_normal((T, B, H)), rng.standard_normal((B, H)), rng.standard_normal((B, H))
    L = [T] * B if lengths is None else lengths
    rev = lambda a: sequence_reversed(a, L)

    y, h_n, c_n, cache = ref.lstm_layer_forward(**p, lengths=lengths, reverse=True)
    g = grad_buffers(p)
    dx, dh0, dc0 = ref.lstm_layer_backward(cache, dy, dh_n, dc_n, **g)

    yf, hf, cf, cachef = ref.lstm_layer_forward(**{**p, "x": rev(p["x"])}, lengths=lengths)
    gf = grad_buffers(p)
    dxf, dh0f, dc0f = ref.lstm_layer_backward(cachef, rev(dy), dh_n, dc_n, **gf)

    assert not np.allclose(y, yf)  # direction matters for this input
    np.testing.assert_allclose(y, rev(yf), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(h_n, hf, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(c_n, cf, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dx, rev(dxf), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dh0, dh0f, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dc0, dc0f, rtol=1e-12, atol=1e-14)
    for k in g:
        np.testing.assert_allclose(g[k], gf[k], rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- accumulation

@pytest.mark.parametrize("reverse", [False, True])
def test_backward_accumulates_and_leaves_cache_unchanged(reverse):
    """Two backward calls on one cache give exactly twice one call's gradient (bitwise),
    the same dx/dh0/dc0 both times, and += onto whatever the buffers already hold."""
    p = make_problem(seed=12)
    rng = np.random.default_rng(13)
    dy, dh_n, dc_n = rng.standard_normal((T, B, H)), rng.standard_normal((B, H)), rng.standard_normal((B, H))
    _, _, _, cache = ref.lstm_layer_forward(**p, lengths=RAGGED, reverse=reverse)
    before = [np.array(a, copy=True) for a in cache]
    args = [np.array(a, copy=True) for a in (dy, dh_n, dc_n)]

    g1 = grad_buffers(p)
    out1 = ref.lstm_layer_backward(cache, dy, dh_n, dc_n, **g1)
    g2 = grad_buffers(p)
    ref.lstm_layer_backward(cache, dy, dh_n, dc_n, **g2)
    out2 = ref.lstm_layer_backward(cache, dy, dh_n, dc_n, **g2)

    for a, b in zip(before, cache):
        assert np.array_equal(a, b)  # cache untouched
    for a, b in zip(args, (dy, dh_n, dc_n)):
        assert np.array_equal(a, b)  # incoming gradients untouched
    for a, b in zip(out1, out2):
        assert np.array_equal(a, b)
    for k in g1:
        assert np.abs(g1[k]).max() > 0
        assert np.array_equal(2 * g1[k], g2[k]), k

    # pre-filled buffers receive +=, they are not overwritten
    g3 = {k: np.full_like(v, 0.5) for k, v in g1.items()}
    ref.lstm_layer_backward(cache, dy, dh_n, dc_n, **g3)
    for k in g1:
        assert np.array_equal(g3[k], 0.5 + g1[k]), k


def test_no_bias_leaves_no_bias_gradient():
    """A layer without bias accepts db_*=None; its weight gradients differ from the biased layer's."""
    p = make_problem(seed=14, bias=False)
    _, _, _, cache = ref.lstm_layer_forward(**p)
    g = grad_buffers(p)
    assert g["db_ih"] is None
    ref.lstm_layer_backward(cache, np.ones((T, B, H)), **g)
    assert np.all(np.isfinite(g["dw_ih"])) and np.abs(g["dw_ih"]).max() > 0


# ---------------------------------------------------------------- dtypes and numerics

@pytest.mark.parametrize("reverse", [False, True])
def test_float32_stays_float32_and_close_to_float64(reverse):
    p64 = make_problem(seed=15)
    p32 = {k: v.astype(np.float32) for k, v in p64.items()}
    rng = np.random.default_rng(16)
    dy, dh_n, dc_n = rng.standard_normal((T, B, H)), rng.standard_normal((B, H)), rng.standard_normal((B, H))

    res = {}
    for name, p in (("64", p64), ("32", p32)):
        dt = p["x"].dtype
        y, h_n, c_n, cache = ref.lstm_layer_forward(**p, lengths=RAGGED, reverse=reverse)
        g = grad_buffers(p)
        dx, dh0, dc0 = ref.lstm_layer_backward(
            cache, dy.astype(dt), dh_n.astype(dt), dc_n.astype(dt), **g)
        res[name] = [y, h_n, c_n, dx, dh0, dc0, *g.values()]
    for a64, a32 in zip(res["64"], res["32"]):
        assert a32.dtype == np.float32 and a64.dtype == np.float64
        assert rel_err(a32.astype(np.float64), a64) < 1e-5


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reverse", [False, True])
def test_huge_inputs_give_finite_results_without_warnings(dtype, reverse):
    """Entries of +-1e30 saturate every gate: no overflow, no NaN, no warning."""
    p = make_problem(seed=17, dtype=dtype)
    sign = np.sign(np.random.default_rng(18).standard_normal((T, B, I)))
    p["x"] = (1e30 * sign).astype(dtype)
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")
        y, h_n, c_n, cache = ref.lstm_layer_forward(**p, lengths=RAGGED, reverse=reverse)
        g = grad_buffers(p)
        dx, dh0, dc0 = ref.lstm_layer_backward(cache, np.ones((T, B, H), dtype), **g)
    for a in (y, h_n, c_n):
        assert a.dtype == dtype and np.all(np.isfinite(a))
    assert np.all(np.abs(y) <= 1) and np.all(np.abs(h_n) <= 1)  # |o tanh(c)| <= 1
    assert np.all(np.abs(c_n) <= np.abs(p["c0"]) + T)  # |c_t| <= |c_{t-1}| + 1
    for a in (dx, dh0, dc0, *g.values()):
        assert np.all(np.isfinite(a))
