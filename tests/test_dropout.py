"""Dropout between stacked layers (docs/math.md: training only, inverted, keep with 1-p,
kept values scaled by 1/(1-p), none after the last layer): eval is deterministic and
equals a dropout=0 model; training differs from eval; the masks come from the model's own
seeded stream (same seed, same masks; a new mask every forward); the empirical keep rate
and the 1/(1-p) scaling, measured through a second layer built to expose its input; and
the gradient through dropout against finite differences with a fixed mask."""
import numpy as np
import pytest

import cylstm

from conftest import check_in_place_finite_differences, module_inputs


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("L,D,P", [(2, 1, 0), (3, 2, 2)])
def test_eval_is_deterministic_and_equals_no_dropout(L, D, P, dtype):
    kw = dict(num_layers=L, bidirectional=D == 2, proj_size=P, dtype=dtype)
    drop = cylstm.LSTM(3, 5, dropout=0.5, seed=1, **kw)
    plain = cylstm.LSTM(3, 5, dropout=0.0, seed=2, **kw)
    plain.load_state_dict(drop.state_dict())
    x, st, _, _ = module_inputs(drop, 5, 4, seed=3)
    lengths = [5, 2, 4, 1]
    drop.eval()
    y1, (h1, c1) = drop(x, st, lengths)
    y2, (h2, c2) = drop(x, st, lengths)
    assert np.array_equal(y1, y2) and np.array_equal(h1, h2) and np.array_equal(c1, c2)
    for mode in ("eval", "train"):               # dropout=0: training is eval too
        getattr(plain, mode)()
        y0, (h0, c0) = plain(x, st, lengths)
        assert np.array_equal(y1, y0) and np.array_equal(h1, h0) and np.array_equal(c1, c0)
    # training with dropout differs from eval (in every layer above the first) ...
    drop.train()
    yt, (ht, ct) = drop(x, st, lengths)
    assert not np.allclose(yt, y1)
    D_ = 2 if D == 2 else 1
    assert np.array_equal(ht[:D_], h1[:D_]) and np.array_equal(ct[:D_], c1[:D_])  # layer 0
    assert not np.allclose(ht[D_:], h1[D_:])                                      # above it
    # ... and each training forward draws a new mask
    yt2, _ = drop(x, st, lengths)
    assert not np.allclose(yt2, yt)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_same_seed_same_masks(dtype):
    """Two models with one seed: bitwise identical training outputs and gradients over
    several forwards (the mask stream is reproducible). A model with the same weights but
    another seed draws other masks."""
    kw = dict(num_layers=3, bidirectional=True, proj_size=2, dropout=0.3, dtype=dtype)
    a = cylstm.LSTM(3, 5, seed=4, **kw)
    b = cylstm.LSTM(3, 5, seed=4, **kw)
    c = cylstm.LSTM(3, 5, seed=5, **kw)
    c.load_state_dict(a.state_dict())
    assert np.array_equal(a.flat_params, b.flat_params)
    x, st, dy, dst = module_inputs(a, 5, 3, seed=6)
    for _ in range(3):
        ya, sa = a(x, st, [5, 1, 3])
        yb, sb = b(x, st, [5, 1, 3])
        yc, _ = c(x, st, [5, 1, 3])
        assert np.array_equal(ya, yb)
        assert np.array_equal(sa[0], sb[0]) and np.array_equal(sa[1], sb[1])
        assert not np.allclose(ya, yc)
        a.zero_grad()
        b.zero_grad()
        dxa, _ = a.backward(dy, dst)
        dxb, _ = b.backward(dy, dst)
        assert np.array_equal(dxa, dxb) and np.array_equal(a.flat_grads, b.flat_grads)


@pytest.mark.parametrize("p", [0.25, 0.6])
def test_keep_rate_and_scaling(p):
    """Measure the mask between layer 0 and layer 1 of a 2-layer model, float64.

    Layer 1 is set up to expose its input element by element: W_hh_l1 = 0, biases 0
    except the forget gate's at -1000 (f = sigmoid(-1000) = 0 exactly in float64, so
    no step carries over into the next), and W_ih_l1 maps input feature j to unit j of
    the g gate only (rows of i, f, o zero, so i = o = 1/2). Then for every (t, b, j):
        y[t, b, j] = 1/2 tanh(1/2 tanh(u))   with u = (layer-0 output * mask)[t, b, j],
    which is 0 exactly when the entry was dropped (u = 0) and otherwise determines u.
    Layer 0's output (the same model in eval, layer 0 alone) has no exact zeros, so
    the fraction of exact zeros in y is the drop fraction, and on kept entries
    u = y0 / (1 - p) (inverted dropout). n = T*B*H = 4800 Bernoulli draws: the keep
    fraction must be within 5 sigma of 1 - p."""
    T, B, I, H = 6, 100, 3, 8
    two = cylstm.LSTM(I, H, num_layers=2, dropout=p, dtype="float64", seed=7)
    w = two.params
    w["weight_hh_l1"][...] = 0
    w["weight_ih_l1"][...] = 0
    w["weight_ih_l1"][2 * H:3 * H] = np.eye(H)          # g_j = tanh(input_j)
    w["bias_ih_l1"][...] = 0
    w["bias_hh_l1"][...] = 0
    w["bias_ih_l1"][H:2 * H] = -1000.0                  # forget gate exactly 0
    one = cylstm.LSTM(I, H, num_layers=1, dtype="float64", seed=8)
    one.load_state_dict({k: v for k, v in two.state_dict().items() if k.endswith("_l0")})

    x = np.random.default_rng(9).standard_normal((T, B, I))
    y0, _ = one.eval()(x)
    assert np.all(y0 != 0)
    expose = lambda u: 0.5 * np.tanh(0.5 * np.tanh(u))
    y_eval, _ = two.eval()(x)                            # no dropout: u = y0
    np.testing.assert_allclose(y_eval, expose(y0), rtol=1e-12, atol=0)

    y, _ = two.train()(x)
    kept = y != 0
    n = kept.size
    rate = kept.mean()
    sigma = np.sqrt(p * (1 - p) / n)
    assert abs(rate - (1 - p)) < 5 * sigma, f"keep rate {rate:.4f}, want {1 - p} +- {5 * sigma:.4f}"
    np.testing.assert_allclose(y[kept], expose(y0[kept] / (1 - p)), rtol=1e-12, atol=0)
    # the mask is per element, not per sequence/time step/feature
    for axis in range(3):
        assert not np.all(kept.all(axis=axis) | (~kept).all(axis=axis))


@pytest.mark.parametrize("L,D,P", [(2, 2, 2), (3, 1, 0)])
def test_gradient_through_dropout_matches_finite_differences(L, D, P):
    """Training-mode forward with a FIXED mask: the dropout stream is re-seeded
    (lstm._dropout_rng = default_rng(k)) before every forward, so the analytic backward
    and all finite-difference forwards see the same masks. Every element of dx, dh0, dc0
    and every parameter gradient, float64, rel error < 1e-6."""
    T, B, I, H = 4, 3, 3, 3
    lengths = [4, 1, 3]
    lstm = cylstm.LSTM(I, H, num_layers=L, bidirectional=D == 2, proj_size=P, dropout=0.5,
                       dtype="float64", seed=10)
    x, st, dy, dst = module_inputs(lstm, T, B, seed=11)

    def forward():
        lstm._dropout_rng = np.random.default_rng(12)
        return lstm(x, st, lengths)

    y, _ = forward()
    assert np.array_equal(y, forward()[0])               # the re-seeded mask is fixed
    assert not np.allclose(y, lstm.eval()(x, st, lengths)[0])   # and it drops something
    lstm.train()
    forward()
    lstm.zero_grad()
    dx, (dh0, dc0) = lstm.backward(dy, dst)
    got = dict(dx=dx, dh0=dh0, dc0=dc0, **{k: v.copy() for k, v in lstm.grads.items()})

    def loss():
        y, (h_n, c_n) = forward()
        return np.sum(y * dy) + np.sum(h_n * dst[0]) + np.sum(c_n * dst[1])

    targets = {"dx": x, "dh0": st[0], "dc0": st[1], **lstm.params}
    check_in_place_finite_differences(loss, targets, got)
