"""One sequence (B = 1) with the input projected before the loop: inference projects it
in pieces of _lstm._PIECE_STEPS steps beside the time loop, each piece claimed by
whichever thread reaches it first, and training projects the same rows on the same
packed kernel (_lstm.pyx, "B = 1 inference"). These tests hold it to the NumPy
reference, to the same bits for any thread count and whoever projected a piece, to the
training forward's bits and the full cache's gradients, and check which calls take it.
"""
import numpy as np
import pytest

import cylstm
from cylstm import _lstm, reference
from cylstm import functional as F

from conftest import KERNEL_TOL, assert_close, make_layer_problem



@pytest.fixture
def hoisted(monkeypatch):
    """The input projected before the loop whatever the shapes (small ones would put it
    in the step)."""
    monkeypatch.setattr(F, "_FORCE_INPUT_IN_STEP", False)


def _recorded(x, p, **kw):
    """(y, h, c, the kernel arguments of the inference call) of functional's forward."""
    calls = []
    y, h, c, _ = F.lstm_layer_forward(x, p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"],
                                      p["h0"], p["c0"], training=False, w_hr=p.get("w_hr"),
                                      _prepare=calls, **kw)
    return y, h, c, (calls[0] if calls else None)


def _packed_kernels():
    return _lstm.pack_size(4, 16, np.float32) > 0


needs_kernels = pytest.mark.skipif(not _packed_kernels(),
                                   reason="no packed kernel on this CPU (ISA level 0)")


@needs_kernels
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("T", [4, 7, 8, 9, 23, 64])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("proj", [None, 3])
def test_matches_reference(hoisted, dtype, T, reverse, proj):
    p = make_layer_problem(T, 1, 5, 6, seed=T + 10 * reverse, dtype=dtype, proj_size=proj)
    before = sum(_lstm._piece_counts())
    y, h, c, kw = _recorded(p["x"], p, reverse=reverse)
    assert sum(_lstm._piece_counts()) - before == T     # every step's row, in pieces
    ry, rh, rc, _ = reference.lstm_layer_forward(
        p["x"].astype(np.float64), *(None if p[k] is None else p[k].astype(np.float64)
                                     for k in ("w_ih", "w_hh", "b_ih", "b_hh", "h0", "c0")),
        reverse=reverse, w_hr=None if proj is None else p["w_hr"].astype(np.float64))
    tol = KERNEL_TOL[np.dtype(dtype)]
    assert_close(y, ry, tol, "y")
    assert_close(h, rh, tol, "h_n")
    assert_close(c, rc, tol, "c_n")


@needs_kernels
@pytest.mark.parametrize("T", [9, 40, 200])
@pytest.mark.parametrize("variant", ["plain", "reverse", "strided", "proj", "float64"])
def test_bitwise_for_any_thread_count(hoisted, two_thread_teams, T, variant):
    """1 thread projects every piece itself; with 2 the other part takes some: the same
    bits (each piece is the packed kernel on the same rows, whoever runs it), also
    gathering x (reverse, strided) and with a projection or float64."""
    dtype = np.float64 if variant == "float64" else np.float32
    p = make_layer_problem(T, 1, 24, 32, seed=3, dtype=dtype,
                           proj_size=7 if variant == "proj" else None)
    x = p["x"]
    if variant == "strided":
        wide = np.zeros((T, 1, 30), dtype)
        wide[:, :, 3:27] = x
        x = wide[:, :, 3:27]
    kw = dict(reverse=variant == "reverse")
    with cylstm.threads(1):
        want = _recorded(x, p, **kw)[:3]
    before = _lstm._piece_counts()
    with cylstm.threads(2):
        for _ in range(20):
            got = _recorded(x, p, **kw)[:3]
            for g, w in zip(got, want):
                assert np.array_equal(g, w)
    after = _lstm._piece_counts()
    assert after[0] + after[1] - before[0] - before[1] == 20 * T
    if T >= 40:     # many pieces: the other thread must have taken some
        assert after[1] > before[1]


@needs_kernels
def test_agrees_with_the_blas_projection(hoisted):
    """Without ipack the kernel projects before the loop through BLAS: the two agree to
    rounding (bitwise on some OpenBLAS kernels, not on others)."""
    p = make_layer_problem(30, 1, 12, 16, seed=5, dtype=np.float32)
    y, h, c, kw = _recorded(p["x"], p)
    assert kw["ipack"] is not None
    kw = dict(kw, ipack=None, x=p["x"], y=np.empty_like(y), h=p["h0"].copy(),
              c=p["c0"].copy())
    _lstm.lstm_forward(**kw)
    assert_close(kw["y"], y, 1e-6, "y")
    assert_close(kw["h"], h, 1e-6, "h_n")


@needs_kernels
def test_strided_and_batch_first_input(hoisted):
    """x gathered (not C-contiguous), or a batch-first model's (1, T, I) read through
    its transpose: the same bits as the contiguous time-major input."""
    p = make_layer_problem(19, 1, 7, 8, seed=7, dtype=np.float32)
    want = _recorded(p["x"], p)[:3]
    wide = np.zeros((19, 1, 11), np.float32)
    wide[:, :, 2:9] = p["x"]
    got = _recorded(wide[:, :, 2:9], p)
    for g, w in zip(got[:3], want):
        assert np.array_equal(g, w)
    tm = cylstm.LSTM(7, 8, seed=4)
    bf = cylstm.LSTM(7, 8, seed=4, batch_first=True)
    tm.eval(), bf.eval()
    y_tm, (h_tm, _) = tm(p["x"])
    before = sum(_lstm._piece_counts())
    y_bf, (h_bf, _) = bf(np.ascontiguousarray(p["x"].transpose(1, 0, 2)))
    assert sum(_lstm._piece_counts()) - before == 19
    assert np.array_equal(y_bf[0], y_tm[:, 0]) and np.array_equal(h_bf, h_tm)


@needs_kernels
def test_which_calls_take_it(hoisted):
    """B = 1 with full lengths, packed weights and no recurrent dropout, in inference and
    in training: not B = 2, not a ragged inference (lengths < T: its active rows), not
    T < PACK_MIN_STEPS, not with a recurrent mask."""
    def steps(x, p, training=False, **kw):
        before = sum(_lstm._piece_counts())
        F.lstm_layer_forward(x, p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"], p["h0"],
                             p["c0"], training=training, **kw)
        return sum(_lstm._piece_counts()) - before

    p = make_layer_problem(12, 1, 4, 5, seed=9, dtype=np.float32)
    assert steps(p["x"], p) == 12
    assert steps(p["x"], p, training=True) == 12
    assert steps(p["x"], p, lengths=[12]) == 12
    assert steps(p["x"], p, lengths=[7]) == 0
    assert steps(p["x"], p, training=True, lengths=[7]) == 12
    mask = np.ones((1, 5), np.float32)
    assert steps(p["x"], p, training=True, recurrent_mask=mask) == 0
    short = make_layer_problem(3, 1, 4, 5, seed=9, dtype=np.float32)
    assert steps(short["x"], short) == 0
    two = make_layer_problem(12, 2, 4, 5, seed=9, dtype=np.float32)
    assert steps(two["x"], two) == 0 and steps(two["x"], two, training=True) == 0


@needs_kernels
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_training_gives_the_inference_bits(hoisted, reverse, threads):
    """The training forward projects the same rows on the same kernel: y, h_n, c_n are
    the inference's bits whatever BLAS runs (docs/math.md). A checkpointed step (at
    B = 1 a segment is 2048 steps: T = 2100 makes two) runs the pieces beside the loop
    and recomputes its segments the same way: the full cache's gradients, bit for bit."""
    from cylstm import _threads
    T = 2100
    p = make_layer_problem(T, 1, 6, 8, seed=13, dtype=np.float32)
    args = (p["x"], p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"], p["h0"], p["c0"])
    dy = np.random.default_rng(14).standard_normal((T, 1, 8)).astype(np.float32)
    with cylstm.threads(threads), _threads.force_parallel():
        inf = F.lstm_layer_forward(*args, reverse=reverse, training=False)[:3]
        grads = []
        for k in (None, 2048):
            before = sum(_lstm._piece_counts())
            out = F.lstm_layer_forward(*args, reverse=reverse, checkpoint_every=k)
            assert (out[3].segment is None) == (k is None)
            for a, b in zip(out[:3], inf):
                assert np.array_equal(a, b)
            g = {n: np.zeros_like(p[n]) for n in ("w_ih", "w_hh", "b_ih", "b_hh")}
            dx, dh0, dc0 = F.lstm_layer_backward(out[3], dy, dw_ih=g["w_ih"],
                                                 dw_hh=g["w_hh"], db_ih=g["b_ih"],
                                                 db_hh=g["b_hh"])
            # projected: the forward's T steps, and a checkpointed backward's T again
            assert sum(_lstm._piece_counts()) - before == (T if k is None else 2 * T)
            grads.append(dict(g, dx=dx, dh0=dh0, dc0=dc0))
    for n in grads[0]:
        assert np.array_equal(grads[0][n], grads[1][n]), n


@needs_kernels
def test_ragged_single_sequence_matches_reference(hoisted):
    """lengths < T at B = 1 goes the active-rows way; still the reference's numbers."""
    p = make_layer_problem(20, 1, 4, 5, seed=11, dtype=np.float64)
    y, h, c, _ = _recorded(p["x"], p, lengths=[13])
    ry, rh, rc, _ = reference.lstm_layer_forward(
        p["x"], p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"], p["h0"], p["c0"], lengths=[13])
    assert_close(y, ry, 1e-12, "y")
    assert_close(h, rh, 1e-12, "h_n")


@needs_kernels
@pytest.mark.parametrize("bidirectional", [False, True])
def test_module_eval_matches_training_forward(bidirectional):
    """An LSTM whose B = 1 shapes project the input before the loop by the rule
    (weights past 256 kB): eval mode runs the pieces beside the loop, training mode
    before it, with the same bits; a second eval call (prepared) too."""
    lstm = cylstm.LSTM(160, 96, bidirectional=bidirectional, seed=1)
    assert not F.input_in_step(160, 96, 96, np.float32, 1)
    x = np.random.default_rng(2).standard_normal((21, 1, 160)).astype(np.float32)
    y_train, (h_train, c_train) = lstm(x)
    lstm.eval()
    before = sum(_lstm._piece_counts())
    y_eval, (h_eval, c_eval) = lstm(x)
    assert sum(_lstm._piece_counts()) - before == (2 if bidirectional else 1) * 21
    y_again, _ = lstm(x)
    assert np.array_equal(y_eval, y_again)
    assert np.array_equal(y_eval, y_train)
    assert np.array_equal(h_eval, h_train) and np.array_equal(c_eval, c_train)
