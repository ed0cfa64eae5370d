"""Input validation at the edge: bad input raises ValueError or
TypeError whose message names the argument; acceptable-but-unusual input (other real
dtypes, non-contiguous, negative strides, Fortran order, read-only) gives exactly the
result of the plain C-contiguous array; random shapes and dtypes never crash."""
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import cylstm
from cylstm import functional as F

from conftest import grad_buffers, make_layer_problem

T, B, I, H = 5, 3, 4, 6   # all different, so that no transposition passes by accident


def model(dtype="float64", **kw):
    return cylstm.LSTM(I, H, dtype=dtype, seed=0, **kw)


def rand(*shape, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def state(L=1, D=1, b=B, seed=1, dtype=np.float64):
    return rand(L * D, b, H, seed=seed, dtype=dtype), rand(L * D, b, H, seed=seed + 1, dtype=dtype)


def run(lstm, x, st=None, lengths=None, dy=None, dst=None):
    y, (h_n, c_n) = lstm(x, st, lengths)
    lstm.zero_grad()
    dx, (dh0, dc0) = lstm.backward(np.ones_like(y) if dy is None else dy, dst)
    return dict(y=y, h_n=h_n, c_n=c_n, dx=dx, dh0=dh0, dc0=dc0,
                **{k: v.copy() for k, v in lstm.grads.items()})


def assert_same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert np.array_equal(a[k], b[k]), k


# ---------------------------------------------------------------- x

@pytest.mark.parametrize("shape", [(I,), (2, T, B, I), (), (T, B, I, 1)])
def test_x_of_wrong_rank(shape):
    with pytest.raises(ValueError, match="x"):
        model()(np.zeros(shape))
    p = make_layer_problem(T, B, I, H, seed=0)
    with pytest.raises(ValueError, match="x"):
        F.lstm_layer_forward(np.zeros(shape), p["w_ih"], p["w_hh"])


@pytest.mark.parametrize("batch_first", [False, True])
def test_x_of_wrong_feature_size(batch_first):
    with pytest.raises(ValueError, match="x"):
        model(batch_first=batch_first)(np.zeros((T, B, I + 1)))
    with pytest.raises(ValueError, match="x"):
        model()(np.zeros((T, I - 1)))
    p = make_layer_problem(T, B, I, H, seed=0)
    with pytest.raises(ValueError, match="x"):
        F.lstm_layer_forward(np.zeros((T, B, I + 1)), p["w_ih"], p["w_hh"])


@pytest.mark.parametrize("shape", [(0, B, I), (T, 0, I), (0, I), (0, 0, I)])
def test_empty_sequence_or_batch(shape):
    with pytest.raises(ValueError, match="x"):
        model()(np.zeros(shape))
    with pytest.raises(ValueError, match="x"):
        model(batch_first=True)(np.zeros(shape))
    if len(shape) == 3:
        p = make_layer_problem(T, B, I, H, seed=0)
        with pytest.raises(ValueError, match="x"):
            F.lstm_layer_forward(np.zeros(shape), p["w_ih"], p["w_hh"])


@pytest.mark.parametrize("bad", [
    np.zeros((T, B, I), np.complex128), np.zeros((T, B, I), np.complex64),
    np.full((T, B, I), 0.5, dtype=object), np.full((T, B, I), "a"),
    np.zeros((T, B, I), "datetime64[s]"),
], ids=["complex128", "complex64", "object", "str-array", "datetime"])
def test_x_of_non_real_dtype_is_a_type_error(bad):
    with pytest.raises(TypeError, match="x"):
        model()(bad)
    p = make_layer_problem(T, B, I, H, seed=0)
    with pytest.raises(TypeError, match="x"):
        F.lstm_layer_forward(bad, p["w_ih"], p["w_hh"])


@pytest.mark.parametrize("bad", ["abc", None], ids=["str", "None"])
def test_x_that_is_not_an_array_is_a_type_error(bad):
    """A string (or other non-numeric object) is the wrong *type* of x, as in the
    functional layer: TypeError, not a complaint about its rank."""
    p = make_layer_problem(T, B, I, H, seed=0)
    with pytest.raises(TypeError, match="x"):
        F.lstm_layer_forward(bad, p["w_ih"], p["w_hh"])
    with pytest.raises(TypeError, match="x"):
        model()(bad)


@pytest.mark.parametrize("xdtype", [np.float32, np.float16, np.int32, np.int64, np.uint8, bool])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_other_real_dtypes_are_converted(dtype, xdtype):
    """x of another real dtype gives the model's dtype and exactly the result of
    converting x first."""
    x = (3 * rand(T, B, I, seed=2)).astype(xdtype)
    a = run(model(dtype), x)
    b = run(model(dtype), x.astype(dtype))
    assert a["y"].dtype == np.dtype(dtype) and a["dx"].dtype == np.dtype(dtype)
    assert_same(a, b)


def test_functional_converts_inputs_to_the_weights_dtype():
    p = make_layer_problem(T, B, I, H, seed=3)           # float64 weights
    x32 = p["x"].astype(np.float32)
    y, h, c, cache = F.lstm_layer_forward(x32, p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"],
                                          p["h0"].astype(np.float32), p["c0"])
    assert y.dtype == h.dtype == c.dtype == np.float64
    y2, _, _, _ = F.lstm_layer_forward(x32.astype(np.float64), p["w_ih"], p["w_hh"],
                                       p["b_ih"], p["b_hh"],
                                       p["h0"].astype(np.float32).astype(np.float64), p["c0"])
    assert np.array_equal(y, y2)
    p32 = {k: v.astype(np.float32) for k, v in p.items()}
    y3, _, _, _ = F.lstm_layer_forward(p["x"], p32["w_ih"], p32["w_hh"], p32["b_ih"],
                                       p32["b_hh"])
    assert y3.dtype == np.float32


# ---------------------------------------------------------------- layouts

@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("L,D", [(1, 1), (2, 2)])
def test_non_contiguous_inputs_give_the_contiguous_result(L, D, batch_first):
    lstm = model(num_layers=L, bidirectional=D == 2, batch_first=batch_first)
    shape = (B, T, I) if batch_first else (T, B, I)
    x = rand(*shape, seed=4)
    st = state(L, D, seed=5)
    lengths = np.array([5, 1, 3])
    dy = rand(*shape[:2], D * H, seed=7)
    dst = state(L, D, seed=8)
    want = run(lstm, x, st, lengths, dy, dst)

    big = rand(2 * shape[0], shape[1], 2 * I, seed=9)
    big[::2, :, ::2] = x
    variants = {
        "strided": big[::2, :, ::2],
        "fortran": np.asfortranarray(x),
        "neg-strides": np.ascontiguousarray(x[::-1, ::-1, ::-1])[::-1, ::-1, ::-1],
        "transposed": np.ascontiguousarray(x.transpose(2, 1, 0)).transpose(2, 1, 0),
    }
    for name, xv in variants.items():
        assert not xv.flags.c_contiguous and np.array_equal(xv, x), name
        got = run(lstm, xv, tuple(np.asfortranarray(s) for s in st), lengths[::-1][::-1],
                  np.asfortranarray(dy), tuple(s[:, ::-1][:, ::-1] for s in dst))
        assert_same(got, want)
    # a negatively strided x is a different sequence: it must match its own copy
    rev = x[::-1]
    assert_same(run(lstm, rev, st, lengths), run(lstm, np.ascontiguousarray(rev), st, lengths))


def test_read_only_inputs_work():
    lstm = model(num_layers=2, bidirectional=True)
    x = rand(T, B, I, seed=10)
    st = state(2, 2, seed=11)
    dy = rand(T, B, 2 * H, seed=12)
    lengths = np.array([5, 2, 4])
    want = run(lstm, x, st, lengths, dy, st)
    for a in (x, *st, dy, lengths):
        a.setflags(write=False)
    assert_same(run(lstm, x, st, lengths, dy, st), want)
    y, _ = lstm.eval()(x, st, lengths)
    assert np.array_equal(y, want["y"])
    # the functional layer, with read-only weights, state and output gradients
    p = make_layer_problem(T, B, I, H, seed=13)
    y1, _, _, cache = F.lstm_layer_forward(**p, lengths=lengths)
    g1 = grad_buffers(p)
    r1 = F.lstm_layer_backward(cache, dy[..., :H], **g1)
    for v in p.values():
        v.setflags(write=False)
    y2, _, _, cache = F.lstm_layer_forward(**p, lengths=lengths)
    g2 = grad_buffers(p)
    r2 = F.lstm_layer_backward(cache, dy[..., :H], **g2)
    assert np.array_equal(y1, y2)
    for a, b in zip([*r1, *g1.values()], [*r2, *g2.values()]):
        assert np.array_equal(a, b)


# ---------------------------------------------------------------- state

def test_state_of_wrong_shape():
    lstm = model(num_layers=2, bidirectional=True)
    x = rand(T, B, I, seed=14)
    good = state(2, 2)
    bad_shapes = [(2 * 2, B + 1, H), (2 * 2, B - 1, H), (2, B, H), (2 * 2, B, H + 1), (B, H)]
    for shape in bad_shapes:
        for pair in ((np.zeros(shape), good[1]), (good[0], np.zeros(shape))):
            with pytest.raises(ValueError, match="state"):
                lstm(x, pair)
    for bad in (good[0], [good[0]], (good[0], good[1], good[1]), "hc"):
        with pytest.raises(TypeError, match="state"):
            lstm(x, bad)
    with pytest.raises(TypeError, match="state"):
        lstm(x, (good[0], np.zeros(good[1].shape, np.complex128)))
    # unbatched input takes an unbatched state
    with pytest.raises(ValueError, match="state"):
        lstm(x[:, 0], good)
    p = make_layer_problem(T, B, I, H, seed=15)
    for name in ("h0", "c0"):
        with pytest.raises(ValueError, match=name):
            F.lstm_layer_forward(**{**p, name: np.zeros((B + 1, H))})
        with pytest.raises(ValueError, match=name):
            F.lstm_layer_forward(**{**p, name: np.zeros((B, H - 1))})


# ---------------------------------------------------------------- lengths

@pytest.mark.parametrize("lengths", [[5, 0, 3], [5, 6, 3], [5, -1, 3], [0, 0, 0], [-5, 2, 2]])
def test_lengths_out_of_range(lengths):
    with pytest.raises(ValueError, match="lengths"):
        model()(rand(T, B, I), None, lengths)
    with pytest.raises(ValueError, match="lengths"):
        model()(rand(T, B, I), None, np.array(lengths, np.int64))
    p = make_layer_problem(T, B, I, H, seed=16)
    with pytest.raises(ValueError, match="lengths"):
        F.lstm_layer_forward(**p, lengths=lengths)


@pytest.mark.parametrize("lengths", [[5, 5], [5, 5, 5, 5], [[5, 5, 5]], 5, np.array([], np.int64)],
                         ids=["short", "long", "2-D", "scalar", "empty"])
def test_lengths_of_wrong_length(lengths):
    with pytest.raises(ValueError, match="lengths"):
        model()(rand(T, B, I), None, lengths)
    p = make_layer_problem(T, B, I, H, seed=17)
    with pytest.raises(ValueError, match="lengths"):
        F.lstm_layer_forward(**p, lengths=lengths)


@pytest.mark.parametrize("lengths", [[5.0, 2.0, 3.0], np.array([5, 2, 3], np.float32),
                                     [True, True, True], ["5", "2", "3"], [5 + 0j, 2, 3]],
                         ids=["float-list", "float32", "bool", "str", "complex"])
def test_non_integer_lengths_are_a_type_error(lengths):
    with pytest.raises(TypeError, match="lengths"):
        model()(rand(T, B, I), None, lengths)
    p = make_layer_problem(T, B, I, H, seed=18)
    with pytest.raises(TypeError, match="lengths"):
        F.lstm_layer_forward(**p, lengths=lengths)


def test_integer_lengths_of_any_integer_type():
    want = run(model(), rand(T, B, I), None, [5, 2, 3])
    for dt in (np.int8, np.uint8, np.int32, np.uint64, np.int64):
        assert_same(run(model(), rand(T, B, I), None, np.array([5, 2, 3], dt)), want)


def test_lengths_with_unbatched_input():
    with pytest.raises(ValueError, match="lengths"):
        model()(rand(T, I), None, [T])


# ---------------------------------------------------------------- backward arguments

@pytest.mark.parametrize("batch_first", [False, True])
def test_backward_with_gradients_of_the_wrong_shape(batch_first):
    lstm = model(num_layers=2, batch_first=batch_first)
    x = rand(*((B, T, I) if batch_first else (T, B, I)))
    y, (h_n, c_n) = lstm(x)
    for shape in (y.shape[::-1], y.shape[:2] + (H + 1,), y.shape[:2], (T + 1, B, H)):
        with pytest.raises(ValueError, match="dy"):
            lstm.backward(np.zeros(shape))
    for pair in ((np.zeros((1, B, H)), c_n), (h_n, np.zeros((2, B + 1, H)))):
        with pytest.raises(ValueError, match="dstate"):
            lstm.backward(np.zeros(y.shape), pair)
    with pytest.raises(TypeError, match="dstate"):
        lstm.backward(np.zeros(y.shape), h_n)
    with pytest.raises(TypeError, match="dy"):
        lstm.backward(np.zeros(y.shape, np.complex128))
    # nothing above consumed the cache: a good call still works
    dx, _ = lstm.backward(np.ones(y.shape))
    assert dx.shape == x.shape


def test_functional_backward_arguments():
    p = make_layer_problem(T, B, I, H, seed=19)
    _, _, _, cache = F.lstm_layer_forward(**p)
    dy = rand(T, B, H, seed=20)
    g = grad_buffers(p)
    with pytest.raises(ValueError, match="dy"):
        F.lstm_layer_backward(cache, dy[:, :, :-1], **g)
    with pytest.raises(ValueError, match="dh_n"):
        F.lstm_layer_backward(cache, dy, np.zeros((B, H + 1)), **g)
    with pytest.raises(ValueError, match="dc_n"):
        F.lstm_layer_backward(cache, dy, None, np.zeros((B + 1, H)), **g)
    bad_buffers = {
        "dw_ih": [np.zeros((4 * H, I + 1)), np.zeros((4 * H, I), np.float32),
                  np.zeros((I, 4 * H)).T, np.zeros((4 * H, I)).copy(order="F")],
        "dw_hh": [np.zeros((4 * H, H), np.float32), np.zeros((4 * H, 2 * H))[:, ::2]],
        "db_ih": [np.zeros(4 * H + 1)],
        "db_hh": [np.zeros(8 * H)[::2]],
    }
    for name, bads in bad_buffers.items():
        for bad in bads:
            with pytest.raises(ValueError, match=name):
                F.lstm_layer_backward(cache, dy, **{**grad_buffers(p), name: bad})
    ro = np.zeros((4 * H, I))
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="dw_ih"):
        F.lstm_layer_backward(cache, dy, **{**g, "dw_ih": ro})
    with pytest.raises(TypeError, match="dw_hh"):
        F.lstm_layer_backward(cache, dy, **{**g, "dw_hh": np.zeros((4 * H, H)).tolist()})
    with pytest.raises(ValueError, match="db_ih"):
        F.lstm_layer_backward(cache, dy, dw_ih=g["dw_ih"], dw_hh=g["dw_hh"])
    _, _, _, nb_cache = F.lstm_layer_forward(p["x"], p["w_ih"], p["w_hh"])
    with pytest.raises(ValueError, match="db_ih"):
        F.lstm_layer_backward(nb_cache, dy, **g)
    with pytest.raises(TypeError, match="cache"):
        F.lstm_layer_backward(None, dy, **g)
    with pytest.raises(TypeError, match="cache"):
        F.lstm_layer_backward(F.lstm_layer_forward(**p, training=False)[3], dy, **g)
    assert all(np.all(v == 0) for v in g.values())   # failed calls accumulated nothing


def test_functional_weight_and_out_arguments():
    p = make_layer_problem(T, B, I, H, seed=21)
    with pytest.raises(TypeError, match="w_ih"):
        F.lstm_layer_forward(**{**p, "w_ih": p["w_ih"].astype(np.float32)})
    with pytest.raises(TypeError, match="w_hh"):
        F.lstm_layer_forward(**{**p, "w_hh": p["w_hh"].astype(np.int64)})
    with pytest.raises(TypeError, match="w_ih"):
        F.lstm_layer_forward(**{**p, "w_ih": p["w_ih"].tolist()})
    with pytest.raises(ValueError, match="w_hh"):
        F.lstm_layer_forward(**{**p, "w_hh": np.zeros((4 * H, H + 1))})
    with pytest.raises(ValueError, match="w_ih"):
        F.lstm_layer_forward(**{**p, "w_ih": np.zeros((4 * H + 4, I))})
    with pytest.raises(ValueError, match="b_ih"):
        F.lstm_layer_forward(**{**p, "b_hh": None})
    with pytest.raises(ValueError, match="b_hh"):
        F.lstm_layer_forward(**{**p, "b_hh": np.zeros(4 * H + 1)})
    for out in (np.zeros((T, B, H + 1)), np.zeros((T, B, H), np.float32),
                np.zeros((H, B, T)).T):
        with pytest.raises(ValueError, match="out"):
            F.lstm_layer_forward(**p, out=out)


# ---------------------------------------------------------------- constructor

@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(input_size=0), ValueError, "input_size"),
    (dict(input_size=-3), ValueError, "input_size"),
    (dict(input_size=2.5), TypeError, "input_size"),
    (dict(input_size="3"), TypeError, "input_size"),
    (dict(input_size=True), TypeError, "input_size"),
    (dict(hidden_size=0), ValueError, "hidden_size"),
    (dict(hidden_size=4.0), TypeError, "hidden_size"),
    (dict(hidden_size=None), TypeError, "hidden_size"),
    (dict(num_layers=0), ValueError, "num_layers"),
    (dict(num_layers=1.0), TypeError, "num_layers"),
    (dict(proj_size=-1), ValueError, "proj_size"),
    (dict(dtype="float16"), TypeError, "dtype"),
    (dict(dtype="int32"), TypeError, "dtype"),
    (dict(dtype="complex128"), TypeError, "dtype"),
    (dict(dtype="no-such-dtype"), TypeError, "dtype"),
    (dict(dtype=np.int64), TypeError, "dtype"),
    (dict(dropout=-0.1), ValueError, "dropout"),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(dropout=1.5), ValueError, "dropout"),
    (dict(dropout=float("nan")), ValueError, "dropout"),
    (dict(dropout="0.5"), (ValueError, TypeError), "dropout"),
    (dict(dropout=None), (ValueError, TypeError), "dropout"),
])
def test_constructor_rejects_bad_arguments(kwargs, exc, match):
    args = dict(input_size=3, hidden_size=4)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        cylstm.LSTM(**args)


def test_constructor_accepts_numpy_scalars():
    """As torch.nn.LSTM does: numpy integers for sizes, numpy floats for dropout."""
    lstm = cylstm.LSTM(np.int64(3), np.int32(4), num_layers=np.int8(2))
    assert (lstm.input_size, lstm.hidden_size, lstm.num_layers) == (3, 4, 2)
    for p in (np.float64(0.25), np.float32(0.25), 0, 0.25):
        assert cylstm.LSTM(3, 4, num_layers=2, dropout=p).dropout == 0.25 * bool(p)


@pytest.mark.parametrize("proj", [4, 5, -1])
def test_projection_must_be_smaller_than_hidden(proj):
    with pytest.raises(ValueError, match="proj_size"):
        cylstm.LSTM(3, 4, proj_size=proj)


# ---------------------------------------------------------------- never a crash

_MODELS = {}


def _model(dtype, L, D, batch_first):
    key = (dtype, L, D, batch_first)
    if key not in _MODELS:
        _MODELS[key] = cylstm.LSTM(I, H, num_layers=L, bidirectional=D == 2,
                                   batch_first=batch_first, dtype=dtype, seed=1)
    return _MODELS[key]


X_DTYPES = ["float32", "float64", "float16", "int8", "int64", "uint16", "bool",
            "complex64", "object", "U1", ">f8"]


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_shapes_and_dtypes_never_crash(data):
    """Either correctly-shaped finite results (forward and backward) exactly when the
    input is valid, or ValueError/TypeError when it is not."""
    dtype = data.draw(st.sampled_from(["float32", "float64"]))
    L, D = data.draw(st.sampled_from([(1, 1), (2, 2), (1, 2)]))
    batch_first = data.draw(st.booleans())
    lstm = _model(dtype, L, D, batch_first)
    aim_valid = data.draw(st.booleans())          # half the examples are meant to work
    if aim_valid:
        rank = data.draw(st.sampled_from([2, 3]))
        shape = tuple(data.draw(st.integers(1, 4)) for _ in range(rank - 1)) + (I,)
        xdtype = data.draw(st.sampled_from([d for d in X_DTYPES
                                            if np.dtype(d).kind in "biuf"]))
    else:
        rank = data.draw(st.integers(0, 4))
        shape = [data.draw(st.integers(0, 4)) for _ in range(rank)]
        if rank and data.draw(st.booleans()):
            shape[-1] = I
        shape = tuple(shape)
        xdtype = data.draw(st.sampled_from(X_DTYPES))
    scale = data.draw(st.sampled_from([1.0, 1e3, 1e30]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    vals = rng.standard_normal(shape) * scale
    if xdtype == "object":
        x = np.empty(shape, object)
        x[...] = vals
    elif xdtype == "U1":
        x = np.full(shape, "a")
    elif xdtype in ("float16",):
        x = np.clip(vals, -6e4, 6e4).astype(xdtype)
    elif np.dtype(xdtype).kind in "iub":
        info = np.iinfo(xdtype) if np.dtype(xdtype).kind != "b" else None
        lo, hi = (0, 2) if info is None else (max(info.min, -100), min(info.max, 100))
        x = rng.integers(lo, hi, size=shape).astype(xdtype)
    else:
        x = vals.astype(xdtype)

    unbatched = rank == 2
    if rank == 3:
        Tx, Bx = (shape[1], shape[0]) if batch_first else (shape[0], shape[1])
    elif rank == 2:
        Tx, Bx = shape[0], 1
    else:
        Tx = Bx = None

    lkind = data.draw(st.sampled_from((["none", "valid"] if rank == 3 else ["none"])
                                      if aim_valid else
                                      ["none", "valid", "ints", "float", "wrong-len"]))
    lengths = None
    if lkind == "valid" and Tx and Bx:
        lengths = rng.integers(1, Tx + 1, size=Bx)
    elif lkind == "ints":
        lengths = rng.integers(-1, 7, size=Bx if Bx is not None else 2)
    elif lkind == "float":
        lengths = np.ones(Bx if Bx is not None else 2) * 1.0
    elif lkind == "wrong-len":
        lengths = np.ones((Bx or 0) + 1, np.int64)

    skind = data.draw(st.sampled_from(["none", "good"] if aim_valid else
                                      ["none", "good", "wrong"]))
    sshape = (L * D, H) if unbatched else (L * D, Bx if Bx is not None else 1, H)
    st_ = None
    if skind == "good":
        st_ = (rng.standard_normal(sshape), rng.standard_normal(sshape))
    elif skind == "wrong":
        st_ = (rng.standard_normal(sshape[:-1] + (H + 1,)), rng.standard_normal(sshape))

    valid = (
        rank in (2, 3) and np.dtype(xdtype).kind in "biuf" and shape[-1] == I
        and Tx >= 1 and Bx >= 1 and skind != "wrong"
        and (lengths is None or (not unbatched and lengths.dtype.kind in "iu"
                                 and lengths.shape == (Bx,)
                                 and lengths.min() >= 1 and lengths.max() <= Tx))
    )
    event("valid input" if valid else "invalid input")
    try:
        y, (h_n, c_n) = lstm(x, st_, lengths)
    except (ValueError, TypeError) as e:
        assert not valid, f"valid input rejected: {e!r}"
        return
    assert valid, "invalid input accepted"
    ys = (Tx, D * H) if unbatched else ((Bx, Tx, D * H) if batch_first else (Tx, Bx, D * H))
    ss = (L * D, H) if unbatched else (L * D, Bx, H)
    assert y.shape == ys and h_n.shape == ss and c_n.shape == ss
    for a in (y, h_n, c_n):
        assert a.dtype == np.dtype(dtype) and np.all(np.isfinite(a))
    dx, (dh0, dc0) = lstm.backward(np.ones(ys), (np.ones(ss), np.ones(ss)))
    assert dx.shape == shape and dh0.shape == ss and dc0.shape == ss
    for a in (dx, dh0, dc0):
        assert a.dtype == np.dtype(dtype) and np.all(np.isfinite(a))
    assert np.all(np.isfinite(lstm.flat_grads))
    lstm.zero_grad()


@pytest.mark.parametrize("shape,batch_first", [((3, 5), False), ((3, 5), True),
                                               ((2, 3, 5), False), ((2, 3, 5), True),
                                               ((2, 3, 4, 4), False)])
def test_lstm_input_error_names_the_shape_as_passed(shape, batch_first):
    lstm = cylstm.LSTM(4, 8, batch_first=batch_first)
    with pytest.raises(ValueError) as e:
        lstm(np.zeros(shape, np.float32))
    msg = str(e.value)
    assert f"got {shape}" in msg and "input_size = 4" in msg, msg
