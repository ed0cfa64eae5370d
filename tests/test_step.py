"""The streaming API: ``state = lstm.initial_state(B[, state=(h0, c0)])``;
``y_t = lstm.step(x_t, state)``. Stepping through a sequence gives the whole-sequence
forward (y[t] and the final h_n, c_n) to rounding (LSTM.step: a step and a sequence
may use differently blocked products) -- for stacked and projected models and a given
initial state; the errors (bidirectional model, a state of
another model, x_t of the wrong shape); y_t is a buffer of the state, overwritten by the
next call; and a step allocates no arrays (tracemalloc)."""
import tracemalloc

import numpy as np
import pytest

import cylstm

from conftest import rel_err


def sequence(lstm, T, B, *, seed):
    """x (T, B, I) and an initial state (h0 (L, B, Hp), c0 (L, B, H)) for lstm."""
    rng = np.random.default_rng(seed)
    L, H, Hp = lstm.num_layers, lstm.hidden_size, lstm.state_size
    x = rng.standard_normal((T, B, lstm.input_size)).astype(lstm.dtype)
    h0 = rng.standard_normal((L, B, Hp)).astype(lstm.dtype)
    c0 = rng.standard_normal((L, B, H)).astype(lstm.dtype)
    return x, (h0, c0)


def stream(lstm, x, state):
    """Step through x; returns the stacked copies of every y_t."""
    return np.stack([lstm.step(x[t], state).copy() for t in range(x.shape[0])])


# (B, I, H): "small" as the rest of the suite; "medium" has H = 32 (and, stacked, a layer
# input of 32 features), where the products are long enough for different GEMM code
# paths to round differently.
STEP_SIZES = {"small": (4, 3, 5), "medium": (8, 8, 32)}
STEP_MODELS = [(1, 0), (3, 0), (1, 2), (3, 2)]        # (num_layers, proj_size small/8)


def check_steps_against_forward(size, L, P, with_state, dtype):
    """Step through a T=6 sequence (eval and train mode: step ignores the mode) and
    compare every y_t and the final state with the sequence forward, to rounding:
    1e-5 (float32) or 1e-12 (float64) of the largest magnitude."""
    tol = 1e-5 if np.dtype(dtype) == np.float32 else 1e-12
    T = 6
    B, I, H = STEP_SIZES[size]
    P = P if size == "small" else 8 * P           # medium: proj_size 16
    lstm = cylstm.LSTM(I, H, num_layers=L, proj_size=P, dtype=dtype, seed=1)
    x, st = sequence(lstm, T, B, seed=2)
    st = st if with_state else None

    def same(got, want, what):
        assert rel_err(got, want) < tol, f"{what}: {rel_err(got, want):.2e}"

    for mode in ("eval", "train"):
        getattr(lstm, mode)()
        y, (h_n, c_n) = lstm(x, st)
        state = lstm.initial_state(B) if st is None else lstm.initial_state(B, state=st)
        assert isinstance(state, cylstm.LSTMState) and state.batch == B
        assert state.h.shape == (L, B, P or H) and state.c.shape == (L, B, H)
        if st is None:
            assert np.all(state.h == 0) and np.all(state.c == 0)
        else:
            assert np.array_equal(state.h, st[0]) and np.array_equal(state.c, st[1])
            assert not np.shares_memory(state.h, st[0])       # a copy of the given state
        ys = stream(lstm, x, state)
        assert ys.dtype == np.dtype(dtype) and ys.shape == y.shape == (T, B, P or H)
        same(ys, y, "y")
        same(state.h, h_n, "h_n")
        same(state.c, c_n, "c_n")
    if st is not None:
        assert np.array_equal(st[0], sequence(lstm, T, B, seed=2)[1][0])   # not modified


@pytest.mark.parametrize("with_state", [False, True], ids=["zeros", "h0c0"])
@pytest.mark.parametrize("L,P", STEP_MODELS)
@pytest.mark.parametrize("size", ["small", "medium"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_steps_match_the_sequence_forward(size, dtype, L, P, with_state):
    """LSTM.step's documented contract: the sequence forward, to rounding. (Not bitwise:
    a sequence of >= functional.PACK_MIN_STEPS float32 steps runs the recurrent product
    on packed weights, a single step on BLAS; and the input product of a sequence is
    blocked over T*B rows, a step's over B.)"""
    check_steps_against_forward(size, L, P, with_state, dtype)


def test_stream_in_chunks_and_reset():
    """Steps continue a stream across calls (two halves = the whole stream, bitwise, and
    the sequence forward to rounding: the step's products and the sequence's differ in
    the order of their sums), and reset() starts new streams from zeros; lstm.step
    accepts other real dtypes and non-contiguous x_t (converted)."""
    T, B, I, H = 6, 3, 4, 6
    lstm = cylstm.LSTM(I, H, num_layers=2, proj_size=3, dtype="float64", seed=3).eval()
    x, st = sequence(lstm, T, B, seed=4)
    y, (h_n, c_n) = lstm(x, st)
    state = lstm.initial_state(B, state=st)
    first = stream(lstm, x[:3], state)
    second = stream(lstm, x[3:], state)
    whole = stream(lstm, x, lstm.initial_state(B, state=st))
    assert np.array_equal(np.concatenate([first, second]), whole)
    assert rel_err(whole, y) < 1e-13
    state.reset()
    assert np.all(state.h == 0) and np.all(state.c == 0)
    y0, _ = lstm(x)
    xf = np.asfortranarray(x[0].astype(np.float32))            # converted to C float64
    x32 = x[0].astype(np.float32)
    assert np.array_equal(lstm.step(xf, state), lstm.step(x32, lstm.initial_state(B)))
    assert rel_err(lstm.step(xf, lstm.initial_state(B)), lstm(x32[None])[0][0]) < 1e-13
    state.reset()
    assert rel_err(stream(lstm, x, state), y0) < 1e-13


def test_step_refuses_a_bidirectional_model():
    """initial_state refuses a bidirectional model; and step itself must refuse one too,
    even with an LSTMState made directly (the class is public): the reverse direction
    needs the future, so a step result can only be wrong."""
    bi = cylstm.LSTM(3, 4, bidirectional=True, dtype="float64", seed=5)
    with pytest.raises(ValueError, match="unidirectional"):
        bi.initial_state(2)
    for model in (bi, cylstm.LSTM(3, 4, num_layers=2, bidirectional=True, seed=5)):
        state = cylstm.LSTMState(model, 2)
        with pytest.raises(ValueError, match="unidirectional"):
            model.step(np.ones((2, 3), model.dtype), state)


def test_step_refuses_a_state_of_another_model():
    a = cylstm.LSTM(3, 4, dtype="float64", seed=6)
    b = cylstm.LSTM(3, 4, dtype="float64", seed=6)          # same config and weights
    state = a.initial_state(2)
    with pytest.raises(TypeError, match="state"):
        b.step(np.ones((2, 3)), state)
    for bad in (None, (np.zeros((1, 2, 4)), np.zeros((1, 2, 4))), b.initial_state(2).h):
        with pytest.raises(TypeError, match="state"):
            a.step(np.ones((2, 3)), bad)
    assert np.all(state.h == 0)


@pytest.mark.parametrize("shape", [(3,), (2, 4), (3, 3), (1, 2, 3), (2, 3, 1), (6,)])
def test_step_x_t_of_the_wrong_shape_raises_naming_x_t(shape):
    lstm = cylstm.LSTM(3, 4, num_layers=2, dtype="float64", seed=7)
    state = lstm.initial_state(2)
    before = state.h.copy(), state.c.copy()
    with pytest.raises(ValueError, match="x_t"):
        lstm.step(np.ones(shape), state)
    assert np.array_equal(state.h, before[0]) and np.array_equal(state.c, before[1])


def test_initial_state_validation():
    lstm = cylstm.LSTM(3, 5, num_layers=2, proj_size=2, dtype="float64", seed=8)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="batch"):
            lstm.initial_state(bad)
    for bad in (1.5, "2", True):
        with pytest.raises(TypeError, match="batch"):
            lstm.initial_state(bad)
    h_ok, c_ok = np.zeros((2, 3, 2)), np.zeros((2, 3, 5))
    lstm.initial_state(3, state=(h_ok, c_ok))
    with pytest.raises(ValueError):                          # h0 with H, not P, features
        lstm.initial_state(3, state=(np.zeros((2, 3, 5)), c_ok))
    with pytest.raises(ValueError):                          # another batch size
        lstm.initial_state(2, state=(h_ok, c_ok))


@pytest.mark.parametrize("P", [0, 2])
def test_returned_y_t_is_the_state_buffer_overwritten_by_the_next_step(P):
    """Documented: y_t is a buffer of the state; the next step writes the next y into the
    same memory (copy it to keep it). It is the last layer's h (= state.h[-1])."""
    lstm = cylstm.LSTM(3, 5, num_layers=2, proj_size=P, dtype="float64", seed=9)
    x, _ = sequence(lstm, 3, 2, seed=10)
    state = lstm.initial_state(2)
    y1 = lstm.step(x[0], state)
    kept = y1.copy()
    assert np.array_equal(y1, state.h[-1])
    y2 = lstm.step(x[1], state)
    assert np.shares_memory(y1, y2) and y1.__array_interface__["data"] == \
        y2.__array_interface__["data"]
    assert np.array_equal(y1, y2) and not np.array_equal(y1, kept)   # y1 now holds y_2
    assert not np.shares_memory(y2, x) and not np.shares_memory(y2, state.h)
    assert not np.shares_memory(y2, lstm.flat_params)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_step_allocates_no_arrays(dtype):
    """tracemalloc over 100 (and then 300 more) steps after the first one.

    * NumPy data buffers (tracemalloc domain np.lib.tracemalloc_domain): net 0 bytes.
    * All memory, net: < 20 KB and the same bound after 4x the calls (no growth).
    * Per call, peak above the memory at its start (temporaries included): < 8 KB,
      while the smallest array a step could make, (B, P) = 128 x 16 elements, is 8 KB
      (float32) or 16 KB (float64) -- so one temporary array per call would fail.
    (What remains per call is Python overhead: array views, the call frame.)"""
    B, I, H, P, L = 128, 8, 32, 16, 3
    lstm = cylstm.LSTM(I, H, num_layers=L, proj_size=P, dtype=dtype, seed=11).eval()
    x = np.random.default_rng(12).standard_normal((401, B, I)).astype(dtype)
    state = lstm.initial_state(B)
    lstm.step(x[0], state)
    smallest = B * P * np.dtype(dtype).itemsize
    assert smallest >= 8 * 1024
    peaks = np.zeros(400)                       # preallocated: the loop allocates nothing
    numpy_domain = [tracemalloc.DomainFilter(True, np.lib.tracemalloc_domain)]

    def numpy_bytes():
        snap = tracemalloc.take_snapshot().filter_traces(numpy_domain)
        return sum(s.size for s in snap.statistics("filename"))

    tracemalloc.start()
    try:
        np_before = numpy_bytes()
        base, _ = tracemalloc.get_traced_memory()
        nets = []
        for start, stop in ((1, 101), (101, 401)):
            for t in range(start, stop):
                cur, _ = tracemalloc.get_traced_memory()
                tracemalloc.reset_peak()
                lstm.step(x[t], state)
                peaks[t - 1] = tracemalloc.get_traced_memory()[1] - cur
            nets.append(tracemalloc.get_traced_memory()[0] - base)
        np_after = numpy_bytes()
    finally:
        tracemalloc.stop()
    assert np_after - np_before == 0, f"{np_after - np_before} bytes of arrays kept"
    assert nets[0] < 20 * 1024 and nets[1] < 20 * 1024, nets
    assert peaks.max() < 8 * 1024, f"a step peaked {peaks.max():.0f} bytes above its start"
    # and the steps computed the right thing: a replay with a fresh state (outside
    # tracemalloc) ends in the same state bitwise, close to the sequence forward
    # (bitwise equality with forward is test_steps_equal_the_sequence_forward_bitwise)
    state2 = lstm.initial_state(B)
    stream(lstm, x, state2)
    assert np.array_equal(state.h, state2.h) and np.array_equal(state.c, state2.c)
    y, (h_n, c_n) = lstm(x)
    tol = 1e-5 if dtype == "float32" else 1e-12
    assert rel_err(state.h, h_n) < tol and rel_err(state.c, c_n) < tol
