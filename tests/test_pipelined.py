"""One sequence (B = 1) in inference with the input projected before the loop: the
projection runs in pieces of _lstm._PIECE_STEPS steps beside the time loop, each piece
claimed by whichever thread reaches it first (_lstm.pyx, "B = 1 inference"). These tests
hold it to the NumPy reference, to the same bits for any thread count and whoever
projected a piece, and check which calls take it.
"""
import numpy as np
import pytest

import cylstm
from cylstm import _lstm, reference
from cylstm import functional as F

from conftest import KERNEL_TOL, assert_close, make_layer_problem

PIECE = 8       # _lstm._PIECE_STEPS


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
    y, h, c, kw = _recorded(p["x"], p, reverse=reverse)
    assert kw["ipack"] is not None          # the pipelined path ran
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
def test_bitwise_for_any_thread_count(hoisted, two_thread_teams, T):
    """1 thread projects every piece itself; with 2 the other part takes some: the same
    bits (each piece is the packed kernel on the same rows, whoever runs it)."""
    p = make_layer_problem(T, 1, 24, 32, seed=3, dtype=np.float32)
    with cylstm.threads(1):
        want = _recorded(p["x"], p)[:3]
    before = _lstm._piece_counts()
    with cylstm.threads(2):
        for _ in range(20):
            got = _recorded(p["x"], p)[:3]
            for g, w in zip(got, want):
                assert np.array_equal(g, w)
    after = _lstm._piece_counts()
    pieces = -(-T // PIECE)
    assert after[0] + after[1] - before[0] - before[1] == 20 * pieces
    if T >= 40:     # many pieces: the other thread must have taken some
        assert after[1] > before[1]


@needs_kernels
def test_same_bits_as_the_projection_before_the_loop(hoisted):
    """The pipelined projection and the one before the loop (BLAS) agree to rounding;
    the kernel's ipack switch is the only difference between the two calls."""
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
    """x read in place through its strides, or gathered (not C-contiguous)."""
    p = make_layer_problem(19, 1, 7, 8, seed=7, dtype=np.float32)
    want = _recorded(p["x"], p)[:3]
    wide = np.zeros((19, 1, 11), np.float32)
    wide[:, :, 2:9] = p["x"]
    got = _recorded(wide[:, :, 2:9], p)
    assert got[3]["ipack"] is not None
    for g, w in zip(got[:3], want):
        assert np.array_equal(g, w)


@needs_kernels
def test_which_calls_take_it(hoisted):
    """B = 1 inference with full lengths and packed weights only: not B = 2, not
    training, not a ragged single sequence (lengths < T), not T < PACK_MIN_STEPS."""
    p = make_layer_problem(12, 1, 4, 5, seed=9, dtype=np.float32)
    assert _recorded(p["x"], p)[3]["ipack"] is not None
    assert _recorded(p["x"], p, lengths=[12])[3]["ipack"] is not None
    assert _recorded(p["x"], p, lengths=[7])[3]["ipack"] is None
    short = make_layer_problem(3, 1, 4, 5, seed=9, dtype=np.float32)
    assert _recorded(short["x"], short)[3]["ipack"] is None
    two = make_layer_problem(12, 2, 4, 5, seed=9, dtype=np.float32)
    assert _recorded(two["x"], two)[3]["ipack"] is None


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
    """An LSTM whose B = 1 shapes hoist the projection by the rule (weights past 256 kB):
    eval mode takes the pipeline, training mode the projection before the loop, and both
    give the reference's numbers; a second eval call (prepared) gives the same bits."""
    lstm = cylstm.LSTM(160, 96, bidirectional=bidirectional, seed=1)
    assert not F.input_in_step(160, 96, 96, np.float32, 1)
    x = np.random.default_rng(2).standard_normal((21, 1, 160)).astype(np.float32)
    y_train, (h_train, c_train) = lstm(x)
    lstm.eval()
    y_eval, (h_eval, c_eval) = lstm(x)
    y_again, _ = lstm(x)
    assert np.array_equal(y_eval, y_again)
    assert_close(y_eval, y_train, 1e-5, "y")
    assert_close(h_eval, h_train, 1e-5, "h_n")
    assert_close(c_eval, c_train, 1e-5, "c_n")
