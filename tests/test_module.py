"""cylstm.LSTM, the module: parameter arena and names, initialisation, layouts
(batch_first, unbatched), state and lengths, train/eval, zero_grad, state_dict round trips,
aliasing of returned arrays, the thread-setting API, and finite differences through the
whole module (1 layer; 2 layers bidirectional), plus a composition check against the
NumPy reference layer by layer."""
import os
import subprocess
import sys

import numpy as np
import pytest

import cylstm
from cylstm import reference as ref
from cylstm._threads import N_PARTS

from conftest import (KERNEL_TOL, assert_close, module_finite_differences, module_run,
                      padded_mask, torch_names)

DTYPES = ["float64", "float32"]


def inputs(T, B, I, H, L, D, *, seed, dtype="float64"):
    """x (T, B, I), state ((L*D, B, H), (L*D, B, H))."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    h0 = rng.standard_normal((L * D, B, H)).astype(dtype)
    c0 = rng.standard_normal((L * D, B, H)).astype(dtype)
    return x, (h0, c0)


def loss_grads(T, B, H, L, D, *, seed, dtype="float64"):
    """dy (T, B, D*H) and dstate for L = sum(y R1) + sum(h_n R2) + sum(c_n R3)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((T, B, D * H)).astype(dtype),
            (rng.standard_normal((L * D, B, H)).astype(dtype),
             rng.standard_normal((L * D, B, H)).astype(dtype)))


# ---------------------------------------------------------------- parameters

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,D,bias", [(1, 1, True), (2, 2, True), (3, 1, False), (2, 2, False)])
def test_parameter_names_shapes_and_views(L, D, bias, dtype):
    I, H = 3, 5
    lstm = cylstm.LSTM(I, H, num_layers=L, bias=bias, bidirectional=D == 2, dtype=dtype,
                       seed=0)
    names = torch_names(L, D == 2, bias)
    assert list(lstm.params) == names and list(lstm.grads) == names
    assert list(lstm.state_dict()) == names
    for name in names:
        layer = int(name.split("_l")[1].split("_")[0])
        in_size = I if layer == 0 else D * H
        want = {"weight_ih": (4 * H, in_size), "weight_hh": (4 * H, H),
                "bias_ih": (4 * H,), "bias_hh": (4 * H,)}[name.rsplit("_l", 1)[0]]
        assert lstm.params[name].shape == want and lstm.grads[name].shape == want
        assert lstm.params[name].dtype == np.dtype(dtype) == lstm.grads[name].dtype
    assert lstm.flat_params.shape == lstm.flat_grads.shape == \
        (sum(p.size for p in lstm.params.values()),)
    # the arena is exactly the parameters, in order, with no gaps or overlaps
    assert np.array_equal(np.concatenate([p.ravel() for p in lstm.params.values()]),
                          lstm.flat_params)
    offset = 0
    for name in names:
        p, g = lstm.params[name], lstm.grads[name]
        assert np.shares_memory(p, lstm.flat_params) and np.shares_memory(g, lstm.flat_grads)
        before = lstm.flat_params.copy()
        p[...] = 7
        changed = np.flatnonzero(lstm.flat_params != before)
        assert np.all(lstm.flat_params[offset:offset + p.size] == 7)
        assert changed.min() >= offset and changed.max() < offset + p.size
        g[...] = 3
        assert np.all(lstm.flat_grads[offset:offset + p.size] == 3)
        assert np.sum(lstm.flat_grads != 0) == offset + p.size    # earlier ones stay 3
        offset += p.size
    # writing the arena is seen through the views
    lstm.flat_params[...] = -1
    assert all(np.all(p == -1) for p in lstm.params.values())


@pytest.mark.parametrize("dtype", DTYPES)
def test_initialisation_range_and_reproducibility(dtype):
    """Every weight and bias uniform in [-1/sqrt(H), 1/sqrt(H)] (PyTorch's default),
    the same for the same seed, different for another seed."""
    H = 16
    a = cylstm.LSTM(4, H, num_layers=2, bidirectional=True, dtype=dtype, seed=123)
    b = cylstm.LSTM(4, H, num_layers=2, bidirectional=True, dtype=dtype, seed=123)
    c = cylstm.LSTM(4, H, num_layers=2, bidirectional=True, dtype=dtype, seed=124)
    k = 1 / np.sqrt(H)
    assert np.array_equal(a.flat_params, b.flat_params)
    assert not np.array_equal(a.flat_params, c.flat_params)
    for name, p in a.params.items():
        p = p.astype(np.float64)
        assert np.all(np.abs(p) <= k * (1 + 1e-6)), name
        assert p.min() < -0.8 * k and p.max() > 0.8 * k, name        # spread over the range
        assert abs(p.mean()) < 0.25 * k, name                          # and centred
    assert len(np.unique(a.flat_params)) > 0.99 * a.flat_params.size  # not constant
    a.flat_params[...] = 0
    a.reset_parameters()
    assert np.all(np.abs(a.flat_params) <= k * (1 + 1e-6)) and np.any(a.flat_params != 0)


# ---------------------------------------------------------------- against the reference

def composed_reference(lstm, x, state, lengths, dy, dstate):
    """The module's math assembled from cylstm.reference, layer by layer, float64; with a
    projection (proj_size > 0, state size Hp = P) each direction's w_hr / dw_hr too."""
    L, D, H, Hp = lstm.num_layers, lstm.num_directions, lstm.hidden_size, lstm.state_size
    proj = lstm.proj_size > 0
    P = {k: v.astype(np.float64) for k, v in lstm.params.items()}
    G = {k: np.zeros_like(v) for k, v in P.items()}
    T, B, _ = x.shape
    h0, c0 = (None, None) if state is None else (np.asarray(s, np.float64) for s in state)
    dh_n, dc_n = (None, None) if dstate is None else (np.asarray(s, np.float64) for s in dstate)
    inp, caches = x.astype(np.float64), {}
    h_n, c_n = np.empty((L * D, B, Hp)), np.empty((L * D, B, H))
    for layer in range(L):
        outs = []
        for d in range(D):
            k, sfx = layer * D + d, f"_l{layer}" + ("_reverse" if d else "")
            y, h_n[k], c_n[k], caches[k] = ref.lstm_layer_forward(
                inp, P["weight_ih" + sfx], P["weight_hh" + sfx], P.get("bias_ih" + sfx),
                P.get("bias_hh" + sfx), None if h0 is None else h0[k],
                None if c0 is None else c0[k], lengths=lengths, reverse=bool(d),
                w_hr=P["weight_hr" + sfx] if proj else None)
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
                caches[k], g[:, :, d * Hp:(d + 1) * Hp], None if dh_n is None else dh_n[k],
                None if dc_n is None else dc_n[k], dw_ih=G["weight_ih" + sfx],
                dw_hh=G["weight_hh" + sfx], db_ih=G.get("bias_ih" + sfx),
                db_hh=G.get("bias_hh" + sfx), dw_hr=G["weight_hr" + sfx] if proj else None)
            dx = dx + dxd
        g = dx
    out.update(dx=g, dh0=dh0, dc0=dc0, **G)
    return out


def check_against_composed_reference(lstm, x, state, lengths, dy, dstate, dtype):
    """The module (module_run) against composed_reference: the same results, each in
    `dtype` and the reference's shape, within 10 x KERNEL_TOL. Returns the module's."""
    got = module_run(lstm, x, state, lengths, dy, dstate)
    want = composed_reference(lstm, x, state, lengths, dy, dstate)
    assert set(got) == set(want)
    tol = 10 * KERNEL_TOL[np.dtype(dtype)]
    for name in want:
        assert got[name].dtype == np.dtype(dtype), name
        assert got[name].shape == want[name].shape, name
        assert_close(got[name], want[name], tol, name)
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,D,bias,state,ragged", [
    (1, 1, True, True, False), (1, 1, False, False, True), (2, 1, True, True, True),
    (1, 2, True, False, True), (2, 2, True, True, True), (3, 2, False, True, False),
])
def test_module_matches_layerwise_reference(L, D, bias, state, ragged, dtype):
    """Stacking, directions, initial states and lengths are passed through exactly as
    docs/math.md says: the module equals the reference composed by hand."""
    T, B, I, H = 5, 4, 3, 4
    lstm = cylstm.LSTM(I, H, num_layers=L, bias=bias, bidirectional=D == 2, dtype=dtype,
                       seed=1)
    x, st = inputs(T, B, I, H, L, D, seed=2, dtype=dtype)
    st = st if state else None
    lengths = [5, 2, 4, 1] if ragged else None
    dy, dst = loss_grads(T, B, H, L, D, seed=3, dtype=dtype)
    got = check_against_composed_reference(lstm, x, st, lengths, dy, dst, dtype)
    if ragged:
        pad = padded_mask(T, lengths)
        assert np.all(got["y"][pad] == 0) and np.all(got["dx"][pad] == 0)


# ---------------------------------------------------------------- layouts

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,D", [(1, 1), (2, 2)])
def test_batch_first_is_the_transpose(L, D, dtype):
    T, B, I, H = 5, 3, 3, 4
    kw = dict(num_layers=L, bidirectional=D == 2, dtype=dtype, seed=4)
    tm, bf = cylstm.LSTM(I, H, **kw), cylstm.LSTM(I, H, batch_first=True, **kw)
    x, st = inputs(T, B, I, H, L, D, seed=5, dtype=dtype)
    dy, dst = loss_grads(T, B, H, L, D, seed=6, dtype=dtype)
    lengths = [5, 1, 3]
    a = module_run(tm, x, st, lengths, dy, dst)
    b = module_run(bf, x.transpose(1, 0, 2), st, lengths, dy.transpose(1, 0, 2), dst)
    assert b["y"].shape == (B, T, D * H) and b["dx"].shape == (B, T, I)
    assert np.array_equal(b["y"], a["y"].transpose(1, 0, 2))
    assert np.array_equal(b["dx"], a["dx"].transpose(1, 0, 2))
    for name in a:
        if name not in ("y", "dx"):
            assert np.array_equal(a[name], b[name]), name


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("L,D", [(1, 1), (2, 2)])
def test_unbatched_input_equals_batch_of_one(L, D, batch_first):
    """x (T, I) with state (L*D, H) is one sequence: the B=1 result without the batch axis
    (batch_first does not apply to unbatched input, as in PyTorch)."""
    T, I, H = 4, 3, 4
    kw = dict(num_layers=L, bidirectional=D == 2, dtype="float64", seed=7)
    one, ref_m = cylstm.LSTM(I, H, batch_first=batch_first, **kw), cylstm.LSTM(I, H, **kw)
    x, (h0, c0) = inputs(T, 1, I, H, L, D, seed=8)
    dy, (dh, dc) = loss_grads(T, 1, H, L, D, seed=9)
    a = module_run(ref_m, x, (h0, c0), None, dy, (dh, dc))
    b = module_run(one, x[:, 0], (h0[:, 0], c0[:, 0]), None, dy[:, 0], (dh[:, 0], dc[:, 0]))
    assert b["y"].shape == (T, D * H) and b["h_n"].shape == (L * D, H)
    assert b["dx"].shape == (T, I) and b["dh0"].shape == (L * D, H)
    for name in ("y", "dx"):
        assert np.array_equal(b[name], a[name][:, 0]), name
    for name in ("h_n", "c_n", "dh0", "dc0"):
        assert np.array_equal(b[name], a[name][:, 0]), name
    for name in one.grads:
        assert np.array_equal(b[name], a[name]), name
    # and without a state
    y, (h_n, c_n) = one(x[:, 0])
    y1, (h1, c1) = ref_m(x)
    assert np.array_equal(y, y1[:, 0]) and np.array_equal(h_n, h1[:, 0])


# ---------------------------------------------------------------- train / eval

@pytest.mark.parametrize("dtype", DTYPES)
def test_train_and_eval(dtype):
    lstm = cylstm.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=dtype, seed=10)
    x, st = inputs(5, 2, 3, 4, 2, 2, seed=11, dtype=dtype)
    assert lstm.training
    y_train, (h_train, c_train) = lstm(x, st, [5, 3])
    assert lstm.eval() is lstm and not lstm.training
    with pytest.raises(RuntimeError):           # eval() drops the training cache
        lstm.backward(np.ones_like(y_train))
    y_eval, (h_eval, c_eval) = lstm(x, st, [5, 3])
    assert np.array_equal(y_eval, y_train)
    assert np.array_equal(h_eval, h_train) and np.array_equal(c_eval, c_train)
    with pytest.raises(RuntimeError):           # an eval forward keeps no cache
        lstm.backward(np.ones_like(y_eval))
    assert lstm.train() is lstm and lstm.training
    with pytest.raises(RuntimeError):           # still no training forward since
        lstm.backward(np.ones_like(y_eval))
    lstm(x, st, [5, 3])
    dx, _ = lstm.backward(np.ones_like(y_eval))
    assert dx.shape == x.shape and np.all(np.isfinite(dx))
    lstm.train(False)
    assert not lstm.training


def test_backward_before_any_forward_raises():
    with pytest.raises(RuntimeError):
        cylstm.LSTM(3, 4).backward(np.zeros((2, 1, 4), np.float32))


def test_dropout_only_between_layers_and_only_in_training():
    x, _ = inputs(6, 3, 3, 4, 1, 1, seed=12)
    one = cylstm.LSTM(3, 4, num_layers=1, dropout=0.5, dtype="float64", seed=13)
    y_t, _ = one(x)
    y_e, _ = one.eval()(x)
    assert np.array_equal(y_t, y_e)             # no dropout after the last layer
    two = cylstm.LSTM(3, 4, num_layers=2, dropout=0.5, dtype="float64", seed=13)
    y_e, _ = two.eval()(x)
    y_t, _ = two.train()(x)
    assert not np.allclose(y_t, y_e)
    dx, (dh0, dc0) = two.backward(np.ones_like(y_t))
    assert np.all(np.isfinite(dx)) and np.abs(two.flat_grads).max() > 0
    y_e2, _ = two.eval()(x)
    assert np.array_equal(y_e, y_e2)            # eval is deterministic


# ---------------------------------------------------------------- gradients and state dicts

def test_zero_grad_and_module_accumulation():
    """Backward accumulates into lstm.grads (no state, so bitwise 2x), zero_grad resets."""
    lstm = cylstm.LSTM(3, 4, num_layers=2, bidirectional=True, dtype="float64", seed=14)
    x, _ = inputs(5, 3, 3, 4, 2, 2, seed=15)
    dy, _ = loss_grads(5, 3, 4, 2, 2, seed=16)
    lstm(x, None, [5, 2, 4])
    dx1, _ = lstm.backward(dy)
    g1 = lstm.flat_grads.copy()
    assert np.abs(g1).max() > 0
    dx2, _ = lstm.backward(dy)
    assert np.array_equal(dx1, dx2)
    assert np.array_equal(lstm.flat_grads, 2 * g1)
    lstm.zero_grad()
    assert np.all(lstm.flat_grads == 0)
    lstm.backward(dy)
    assert np.array_equal(lstm.flat_grads, g1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_state_dict_copies_and_round_trip(dtype):
    kw = dict(num_layers=2, bidirectional=True, dtype=dtype)
    a = cylstm.LSTM(3, 4, seed=17, **kw)
    b = cylstm.LSTM(3, 4, seed=18, **kw)
    sd = a.state_dict()
    assert list(sd) == torch_names(2, True, True)
    for name, v in sd.items():
        assert isinstance(v, np.ndarray) and np.array_equal(v, a.params[name])
        assert not np.shares_memory(v, a.flat_params)
    before = a.flat_params.copy()
    for v in sd.values():
        v[...] = 0                               # copies: the model is unchanged
    assert np.array_equal(a.flat_params, before)
    assert b.load_state_dict(a.state_dict()) is b
    assert np.array_equal(b.flat_params, a.flat_params)
    x, st = inputs(4, 2, 3, 4, 2, 2, seed=19, dtype=dtype)
    assert np.array_equal(a(x, st)[0], b(x, st)[0])
    # other real dtypes are converted; lists work too
    c = cylstm.LSTM(3, 4, seed=20, **kw)
    c.load_state_dict({k: v.astype(np.float16).tolist() for k, v in a.state_dict().items()})
    assert np.array_equal(c.flat_params, a.flat_params.astype(np.float16).astype(dtype))


def test_load_state_dict_wrong_shape_names_the_key_and_changes_nothing():
    a = cylstm.LSTM(3, 4, num_layers=2, dtype="float64", seed=21)
    src = cylstm.LSTM(3, 4, num_layers=2, dtype="float64", seed=22).state_dict()
    before = a.flat_params.copy()
    for bad in ("weight_ih_l0", "bias_hh_l1", "weight_hh_l1"):
        sd = dict(src)
        sd[bad] = np.zeros(sd[bad].shape[::-1] if sd[bad].ndim == 2 else sd[bad].size + 1)
        with pytest.raises(ValueError, match=bad):
            a.load_state_dict(sd)
        assert np.array_equal(a.flat_params, before)


def test_load_state_dict_missing_and_unexpected_keys():
    a = cylstm.LSTM(3, 4, dtype="float64", seed=23)
    src = cylstm.LSTM(3, 4, dtype="float64", seed=24).state_dict()
    before = a.flat_params.copy()
    missing = {k: v for k, v in src.items() if k != "bias_hh_l0"}
    with pytest.raises(KeyError, match="bias_hh_l0"):
        a.load_state_dict(missing)
    with pytest.raises(KeyError, match="weight_ih_l1"):
        a.load_state_dict({**src, "weight_ih_l1": src["weight_ih_l0"]})
    assert np.array_equal(a.flat_params, before)
    # non-strict: loads what is there, ignores the rest
    a.load_state_dict({**missing, "extra": np.zeros(3)}, strict=False)
    for k in missing:
        assert np.array_equal(a.params[k], src[k])
    assert np.array_equal(a.params["bias_hh_l0"], before[-16:])
    with pytest.raises(TypeError):
        a.load_state_dict([("weight_ih_l0", src["weight_ih_l0"])])


# ---------------------------------------------------------------- aliasing

@pytest.mark.parametrize("L,D", [(1, 1), (2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("batch_first", [False, True])
def test_returned_and_passed_arrays_are_not_aliased_with_the_cache(L, D, batch_first):
    """Modifying y, h_n, c_n (returned) or x, the state, lengths (passed) in place between
    forward and backward changes nothing in the gradients."""
    T, B, I, H = 4, 3, 3, 4
    kw = dict(num_layers=L, bidirectional=D == 2, batch_first=batch_first,
              dtype="float64", seed=25)
    x, st = inputs(T, B, I, H, L, D, seed=26)
    if batch_first:
        x = np.ascontiguousarray(x.transpose(1, 0, 2))
    dy, dst = loss_grads(T, B, H, L, D, seed=27)
    if batch_first:
        dy = np.ascontiguousarray(dy.transpose(1, 0, 2))
    lengths = np.array([4, 2, 3])

    clean = cylstm.LSTM(I, H, **kw)
    want = module_run(clean, x.copy(), tuple(s.copy() for s in st), lengths.copy(), dy, dst)

    lstm = cylstm.LSTM(I, H, **kw)
    xs, sts, ls = x.copy(), tuple(s.copy() for s in st), lengths.copy()
    y, (h_n, c_n) = lstm(xs, sts, ls)
    assert np.array_equal(y, want["y"])
    for a in (y, h_n, c_n, xs, *sts):
        a[...] = 123.0
    ls[...] = 1
    dx, (dh0, dc0) = lstm.backward(dy, dst)
    assert np.array_equal(dx, want["dx"])
    assert np.array_equal(dh0, want["dh0"]) and np.array_equal(dc0, want["dc0"])
    for name, g in lstm.grads.items():
        assert np.array_equal(g, want[name]), name


# ---------------------------------------------------------------- threads API

def test_thread_settings():
    assert isinstance(cylstm.openmp_enabled(), bool)
    default = cylstm.get_num_threads()
    assert isinstance(default, int) and 1 <= default <= N_PARTS
    cap = (lambda n: min(n, N_PARTS)) if cylstm.openmp_enabled() else (lambda n: 1)
    cylstm.set_num_threads(1)
    assert cylstm.get_num_threads() == 1
    cylstm.set_num_threads(2)
    assert cylstm.get_num_threads() == cap(2)
    with cylstm.threads(1):
        assert cylstm.get_num_threads() == 1
        with cylstm.threads(2):
            assert cylstm.get_num_threads() == cap(2)
        assert cylstm.get_num_threads() == 1
    assert cylstm.get_num_threads() == cap(2)
    cylstm.set_num_threads(None)
    assert cylstm.get_num_threads() == default
    cylstm.set_num_threads(np.int64(1))          # any integer type is an int
    assert cylstm.get_num_threads() == 1


def test_threads_context_is_per_python_thread():
    """threads(n) affects only the calling Python thread; set_num_threads the process."""
    import threading
    seen = {}
    cylstm.set_num_threads(None)
    default = cylstm.get_num_threads()

    def worker():
        seen["n"] = cylstm.get_num_threads()

    with cylstm.threads(1):
        t = threading.Thread(target=worker)
        t.start()
        t.join()
        assert cylstm.get_num_threads() == 1
    assert seen["n"] == default


def test_threads_context_restores_on_exception():
    cylstm.set_num_threads(1)
    with pytest.raises(KeyError):
        with cylstm.threads(2):
            raise KeyError("boom")
    assert cylstm.get_num_threads() == 1
    with pytest.raises(KeyError):
        with cylstm.threads(1):
            with cylstm.threads(None):
                raise KeyError("boom")
    assert cylstm.get_num_threads() == 1


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (-1, ValueError), (1.5, TypeError),
                                     ("2", TypeError), (True, TypeError), (2.0, TypeError)])
def test_invalid_thread_counts(bad, exc):
    cylstm.set_num_threads(1)
    with pytest.raises(exc, match=r"\bn\b"):
        cylstm.set_num_threads(bad)
    with pytest.raises(exc, match=r"\bn\b"):
        with cylstm.threads(bad):
            pass
    assert cylstm.get_num_threads() == 1            # nothing changed


def test_default_thread_count_honours_omp_num_threads():
    code = "import cylstm; print(cylstm.get_num_threads())"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(
                             os.path.abspath(cylstm.__file__))))
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) == 1


# ---------------------------------------------------------------- finite differences

def finite_difference_check(lstm, x, state, lengths, seed):
    """Every element of dx, dh0, dc0 and every parameter gradient against central
    differences of sum(y R1) + sum(h_n R2) + sum(c_n R3), float64."""
    L, D, H = lstm.num_layers, lstm.num_directions, lstm.hidden_size
    T, B = x.shape[:2]
    dy, dst = loss_grads(T, B, H, L, D, seed=seed)
    module_finite_differences(lstm, x, state, lengths, dy, dst)


@pytest.mark.parametrize("state,lengths", [(True, None), (False, [4, 1, 3]), (True, [2, 4, 4])])
@pytest.mark.parametrize("bias", [True, False])
def test_finite_differences_one_layer(state, lengths, bias):
    lstm = cylstm.LSTM(3, 3, bias=bias, dtype="float64", seed=28)
    x, st = inputs(4, 3, 3, 3, 1, 1, seed=29)
    finite_difference_check(lstm, x, st if state else None, lengths, seed=30)


@pytest.mark.parametrize("L,D", [(2, 1), (1, 2), (2, 2)])
def test_finite_differences_stacked_and_bidirectional(L, D):
    lstm = cylstm.LSTM(3, 3, num_layers=L, bidirectional=D == 2, dtype="float64", seed=31)
    x, st = inputs(4, 3, 3, 3, L, D, seed=32)
    finite_difference_check(lstm, x, st, [4, 1, 3], seed=33)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_ragged_batches_run_length_sorted_with_the_same_results(dtype, monkeypatch):
    """Ragged batches are reordered so that the kernels skip finished rows. The results
    agree with the batch in its own order to rounding, not bitwise: a row's place in the
    hoisted BLAS GEMMs changes which micro-kernel (and so which summation order) computes
    it on some OpenBLAS kernels (Haswell's, for one)."""
    from cylstm import layers
    rng = np.random.default_rng(3)
    x = rng.standard_normal((12, 7, 5)).astype(dtype)
    lengths = np.array([3, 12, 1, 7, 12, 5, 9])
    dy = rng.standard_normal((12, 7, 2 * 6)).astype(dtype)
    assert layers._ragged_order(lengths.astype(np.int32)) is not None or cylstm._threads.N_PARTS == 1

    def run():
        lstm = cylstm.LSTM(5, 6, num_layers=2, bidirectional=True, seed=1, dtype=dtype)
        y, (h, c) = lstm(x, lengths=lengths)
        dx, (dh0, dc0) = lstm.backward(dy)
        return (y, h, c, dx, dh0, dc0, lstm.flat_grads.copy())
    sorted_run = run()
    monkeypatch.setattr(layers, "_ragged_order", lambda lengths: None)
    plain_run = run()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == "float32" else dict(rtol=1e-12, atol=1e-13)
    for a, b in zip(sorted_run, plain_run):
        np.testing.assert_allclose(a, b, **tol)
