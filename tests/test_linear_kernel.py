"""Linear's compiled kernels (_ops.linear_forward / linear_backward) and the one thread
policy of a training step: NumPy's reference to rounding, finite differences, bitwise
the same for any thread count and while NumPy's BLAS is busy in another thread."""
import threading

import numpy as np
import pytest

import cylstm
from cylstm import _ops
from cylstm._threads import N_PARTS

from conftest import assert_close, check_in_place_finite_differences

TOL = {np.float32: 1e-5, np.float64: 1e-12}


def _problem(N, I, O, dtype, seed=0):
    rng = np.random.default_rng(seed)
    lin = cylstm.Linear(I, O, dtype=dtype, seed=seed)
    x = rng.standard_normal((N, I)).astype(dtype)
    dy = rng.standard_normal((N, O)).astype(dtype)
    return lin, x, dy


def _fwd_bwd(lin, x, dy):
    lin.train()
    lin.zero_grad()
    y = lin.forward(x)
    dx = lin.backward(dy)
    return y, dx, lin.flat_grads.copy()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N,I,O,bias", [(7, 5, 3, True), (1, 1, 1, False), (0, 4, 3, True),
                                        (600, 64, 40, True), (33, 256, 81, False)])
def test_linear_matches_numpy(dtype, N, I, O, bias):
    rng = np.random.default_rng(1)
    lin = cylstm.Linear(I, O, bias=bias, dtype=dtype, seed=2)
    x = rng.standard_normal((N, I)).astype(dtype)
    dy = rng.standard_normal((N, O)).astype(dtype)
    W = lin.params["weight"].astype(np.float64)
    b = lin.params["bias"].astype(np.float64) if bias else 0.0
    y, dx, _ = _fwd_bwd(lin, x, dy)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    assert y.dtype == dx.dtype == dtype
    assert_close(y, x64 @ W.T + b, TOL[dtype], "y") if N else None
    assert y.shape == (N, O) and dx.shape == (N, I)
    if N:
        assert_close(dx, dy64 @ W, TOL[dtype], "dx")
        assert_close(lin.grads["weight"], dy64.T @ x64, TOL[dtype], "dW")
        if bias:
            assert_close(lin.grads["bias"], dy64.sum(axis=0), TOL[dtype], "db")
    else:
        assert not lin.flat_grads.any()


def test_linear_accumulates_and_keeps_leading_axes():
    lin, x, dy = _problem(12, 6, 4, np.float64)
    x3, dy3 = x.reshape(3, 4, 6), dy.reshape(3, 4, 4)
    lin.zero_grad()
    y = lin.forward(x3)
    assert y.shape == (3, 4, 4)
    dx = lin.backward(dy3)
    assert dx.shape == (3, 4, 6)
    once = lin.flat_grads.copy()
    lin.forward(x3)
    lin.backward(dy3)
    assert_close(lin.flat_grads, 2 * once, 1e-14, "accumulated grads")


@pytest.mark.parametrize("train", [True, False])
def test_linear_forward_into_out_is_bitwise_the_plain_forward(train):
    lin, x, dy = _problem(24, 6, 5, np.float32)
    x3 = x.reshape(4, 6, 6)
    lin.train(train)
    want = lin.forward(x3)
    out = np.full((4, 6, 5), np.nan, np.float32)
    assert lin.forward(x3, out=out) is out
    np.testing.assert_array_equal(out, want)
    if train:                                   # the backward of an out= forward works
        lin.zero_grad()
        np.testing.assert_array_equal(lin.backward(dy.reshape(4, 6, 5)),
                                      (lin.forward(x3), lin.backward(dy.reshape(4, 6, 5)))[1])
    big = np.zeros((8, 6, 5), np.float32)       # a slice of rows of a wider result
    lin.forward(x3, out=big[2:6])
    np.testing.assert_array_equal(big[2:6], want)
    assert not big[:2].any() and not big[6:].any()


def test_linear_forward_out_is_checked():
    lin, x, _ = _problem(6, 4, 3, np.float32)
    for bad in (np.empty((6, 4), np.float32), np.empty((6, 3), np.float64),
                np.empty((3, 6), np.float32).T, [[0.0] * 3] * 6,
                np.broadcast_to(np.zeros(3, np.float32), (6, 3))):
        with pytest.raises(ValueError, match="out must be a writeable C-contiguous float32"):
            lin.forward(x, out=bad)
    both = np.zeros((6, 4), np.float32)
    with pytest.raises(ValueError, match="must not overlap x"):
        cylstm.Linear(4, 4, seed=0).forward(both, out=both)


def test_linear_finite_differences():
    lin, x, dy = _problem(5, 4, 3, np.float64, seed=3)
    _, dx, grads = _fwd_bwd(lin, x, dy)

    def loss():
        lin.eval()
        return float((lin.forward(x) * dy).sum())

    check_in_place_finite_differences(loss, {"params": lin.flat_params, "x": x},
                                      {"params": grads, "x": dx})


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear_bitwise_for_any_thread_count(dtype):
    # big enough that the kernels wake a team (N * I * O > 2**20)
    lin, x, dy = _problem(700, 64, 48, dtype, seed=4)
    runs = []
    for n in (1, 2, 1, None):
        with cylstm.threads(n):
            runs.append(_fwd_bwd(lin, x, dy))
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kernel_level", [2], ids=["avx512"], indirect=True)
@pytest.mark.parametrize("N,I,O", [(700, 64, 48), (37, 256, 81), (300, 17, 1030), (5, 3, 1)])
def test_linear_backward_products_on_the_own_kernel(kernel_level, N, I, O, two_thread_teams):
    """At AVX-512 the float32 backward runs its products on the LSTM backward's own kernel
    by one rule (_ops._linear_own): dW up to 1024 output rows, and dx too with own_wide
    (OpenBLAS on AVX2 code). Each product is then bitwise that kernel's whole product
    (rows and output rows split over the parts change no element), the same for 1 and 2
    threads, accumulates onto dW, and matches float64 to rounding."""
    from cylstm import _lstm
    rng = np.random.default_rng(N + O)
    x = rng.standard_normal((N, I)).astype(np.float32)
    dy = rng.standard_normal((N, O)).astype(np.float32)
    w = rng.standard_normal((O, I)).astype(np.float32)
    dw0 = rng.standard_normal((O, I)).astype(np.float32)          # += onto this
    own_dx = np.empty((N, I), np.float32)
    _lstm._backward_product(dy, w, own_dx, False, False)
    own_dw = dw0.copy()
    _lstm._backward_product(dy, x, own_dw, True, True)
    for own_wide in (False, True):
        runs = []
        for n in (1, 2):
            dx, dw, db = np.empty((N, I), np.float32), dw0.copy(), np.zeros(O, np.float32)
            with cylstm.threads(n):
                _ops.linear_backward(dx=dx, dweight=dw, dbias=db, scratch=np.empty(O),
                                     dy=dy, x=x, weight=w, n_parts=N_PARTS,
                                     n_threads=n, own_wide=own_wide)
            runs.append((dx, dw, db))
        for a, b in zip(runs[0], runs[1]):
            assert a.tobytes() == b.tobytes()
        dx, dw, db = runs[0]
        # (where BLAS runs instead its bits may or may not differ: nothing to assert)
        if own_wide or O <= 1024:
            assert dw.tobytes() == own_dw.tobytes()
        if own_wide:
            assert dx.tobytes() == own_dx.tobytes()
        x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
        assert_close(dx, dy64 @ w, TOL[np.float32], "dx")
        assert_close(dw, dw0 + dy64.T @ x64, TOL[np.float32], "dW")
        assert_close(db, dy64.sum(axis=0), TOL[np.float32], "db")


def test_linear_kernel_checks_shapes():
    x = np.zeros((3, 4), np.float32)
    w = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="linear_forward"):
        _ops.linear_forward(out=np.zeros((3, 3), np.float32), x=x, weight=w, bias=None,
                            n_parts=N_PARTS, n_threads=1)
    with pytest.raises(ValueError, match="linear_backward"):
        _ops.linear_backward(dx=None, dweight=np.zeros((2, 3), np.float32), dbias=None,
                             scratch=np.zeros(2), dy=np.zeros((3, 2), np.float32), x=x,
                             weight=w, n_parts=N_PARTS, n_threads=1)


# ---- NumPy's BLAS busy in another Python thread ------------------------------------------

class _Hammer:
    """A Python thread running NumPy matmuls (NumPy's own BLAS and its thread pool)
    until stopped."""

    def __enter__(self):
        self.stop = threading.Event()
        a = np.random.default_rng(0).standard_normal((300, 300))

        def run():
            while not self.stop.is_set():
                np.dot(a, a)

        self.th = threading.Thread(target=run, daemon=True)
        self.th.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.th.join()
        return False


def _char_fit(n_threads):
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 11, size=(48, 21))
    with cylstm.threads(n_threads):
        m = cylstm.text.char_model(11, 8, 32, seed=6)
        m.compile(loss="cross_entropy", optimizer="adam", lr=1e-2, clip_norm=1.0)
        m.fit(ids[:, :-1], ids[:, 1:], batch_size=16, epochs=2, verbose=0)
        out = m.predict(ids[:4, :-1])
    return m.flat_params.copy(), out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernels_bitwise_while_numpy_blas_is_busy(dtype):
    lin, x, dy = _problem(700, 64, 48, dtype, seed=7)
    lstm = cylstm.LSTM(16, 32, batch_first=True, dtype=dtype, seed=8)
    xs = np.random.default_rng(9).standard_normal((40, 10, 16)).astype(dtype)

    def compute():
        lstm.train()
        lstm.zero_grad()
        y, _ = lstm(xs)
        dx, _ = lstm.backward(np.ones_like(y))
        return [*_fwd_bwd(lin, x, dy), y, dx, lstm.flat_grads.copy()]

    quiet = compute()
    with _Hammer():
        busy = [compute() for _ in range(3)]
    for run in busy:
        for a, b in zip(quiet, run):
            np.testing.assert_array_equal(a, b)


def test_fit_bitwise_while_numpy_blas_is_busy_and_for_any_thread_count():
    quiet = _char_fit(2)
    with _Hammer():
        busy = _char_fit(2)
    one = _char_fit(1)
    for a, b, c in zip(quiet, busy, one):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
