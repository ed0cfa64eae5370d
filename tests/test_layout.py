"""Layouts: inference reads x in place and writes y in place, whatever its layout.

An eval-mode LSTM reads a batch-first x through a transposed view (no time-major copy)
and every layer writes straight into its output (the last one into the batch-first
result, each direction into its half): the same bits as the same input made
C-contiguous, time-major, with no copy of x or y on the way."""
import contextlib
import tracemalloc

import numpy as np
import pytest

import cylstm
from cylstm import functional as F


def _model(batch_first, D, L, P, dtype):
    return cylstm.LSTM(6, 8, num_layers=L, bidirectional=D == 2, proj_size=P,
                       batch_first=batch_first, dtype=dtype, seed=4).eval()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("D,L,P", [(1, 1, 0), (2, 2, 0), (1, 2, 3), (2, 1, 3)],
                         ids=["plain", "bidi-stacked", "stacked-proj", "bidi-proj"])
def test_batch_first_in_place_is_bitwise_the_time_major_path(D, L, P, dtype, input_path):
    """A batch-first x (read through a transposed view) and the same values as a
    C-contiguous time-major array give the same bits, y batch-first C-contiguous."""
    T, B = 9, 5
    x = np.random.default_rng(1).normal(size=(B, T, 6)).astype(dtype)
    bf, tm = _model(True, D, L, P, dtype), _model(False, D, L, P, dtype)
    y_bf, (h_bf, c_bf) = bf(x)
    y_tm, (h_tm, c_tm) = tm(np.ascontiguousarray(x.transpose(1, 0, 2)))
    assert y_bf.flags.c_contiguous and y_bf.shape == (B, T, D * (P or 8))
    assert np.array_equal(y_bf, y_tm.transpose(1, 0, 2))
    assert np.array_equal(h_bf, h_tm) and np.array_equal(c_bf, c_tm)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_functional_reads_strided_x_and_writes_strided_out(reverse, input_path):
    """lstm_layer_forward in inference on a transposed and a sliced x (last axis
    contiguous), writing into a slice of a wider batch-first output: the same bits as
    contiguous arrays, and nothing outside the slice is written."""
    T, B, I, H = 7, 4, 5, 6
    r = np.random.default_rng(2)
    w_ih, w_hh, b = r.normal(size=(4 * H, I)), r.normal(size=(4 * H, H)), r.normal(size=4 * H)
    lengths = np.array([7, 3, 5, 1])
    wide = r.normal(size=(B, T, 2 * I))
    x = wide[:, :, I:].transpose(1, 0, 2)          # (T, B, I), strides (2I, 2TI, 1)
    want, h_want, c_want, _ = F.lstm_layer_forward(
        np.ascontiguousarray(x), w_ih, w_hh, b, b, lengths=lengths, reverse=reverse,
        training=False)
    result = np.full((B, T, 3 * H), np.nan)
    out = result.transpose(1, 0, 2)[:, :, H:2 * H]
    y, h, c, _ = F.lstm_layer_forward(x, w_ih, w_hh, b, b, lengths=lengths, reverse=reverse,
                                      training=False, out=out)
    assert y is out and np.array_equal(y, want)
    assert np.array_equal(h, h_want) and np.array_equal(c, c_want)
    assert np.isnan(result[:, :, :H]).all() and np.isnan(result[:, :, 2 * H:]).all()


def test_out_with_overlapping_rows_or_a_strided_last_axis_is_refused():
    T, B, I, H = 3, 2, 4, 5
    r = np.random.default_rng(3)
    w_ih, w_hh = r.normal(size=(4 * H, I)), r.normal(size=(4 * H, H))
    x = r.normal(size=(T, B, I))
    overlapping = np.lib.stride_tricks.as_strided(np.zeros(T * H + B), (T, B, H), (8 * H, 8, 8))
    strided = np.zeros((T, B, 2 * H))[:, :, ::2]
    for out in (overlapping, strided):
        with pytest.raises(ValueError, match="out must be"):
            F.lstm_layer_forward(x, w_ih, w_hh, training=False, out=out)


def test_inference_copies_neither_x_nor_y():
    """After a warm-up call, an eval-mode batch-first forward allocates y, h_n and c_n
    and nothing else of x's or y's size (tracemalloc, NumPy's domain)."""
    T, B, I, H = 50, 64, 32, 32
    lstm = cylstm.LSTM(I, H, batch_first=True, seed=1).eval()
    x = np.random.default_rng(4).normal(size=(B, T, I)).astype(np.float32)
    lstm(x)                                            # workspaces
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        y, (h, c) = lstm(x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # beyond y: the states and small arrays (lengths, zero initial states), far less
    # than a copy of x (400 kB) or of y
    assert peak <= y.nbytes + 65536 < y.nbytes + x.nbytes, (peak, y.nbytes, x.nbytes)


def test_the_input_path_rule():
    """The input's product goes inside the step when [W_ih | W_hh] fits the cache and a
    chunk has 8 rows or more, or the weights are small; the rule reads the batch and the
    machine, never the thread count."""
    from cylstm import _lstm, _threads
    rule = _lstm.input_in_step
    mib = 1 << 20
    assert rule(64, 256, 1024, 4, 2 * mib, 16)          # the char model, 2 MiB L2
    assert not rule(64, 256, 1024, 4, 1 * mib, 16)      # 1.25 MiB of weights, 1 MiB L2
    assert not rule(64, 256, 1024, 4, 2 * mib, 4)       # few rows a chunk
    assert not rule(128, 256, 1024, 8, 2 * mib, 16)     # float64: 3 MiB
    assert rule(32, 64, 256, 4, 2 * mib, 1)             # 96 kB of weights: always
    with cylstm.threads(1):
        one = F.input_in_step(64, 256, 256, np.float32, 32)
    assert one == F.input_in_step(64, 256, 256, np.float32, 32) == rule(
        64, 256, 1024, 4, _threads.STEP_WEIGHT_BYTES, -(-32 // min(32, _threads.N_PARTS)))


def test_the_step_weight_budget_is_the_l2_unless_measured_otherwise(tmp_path):
    """How many bytes of weights a step may stream (the budget of the rule above): one
    core's L2, and 8 of them on AMD Zen 4 (family 25 with AVX-512) and Zen 5 (family 26),
    where the step's 8-row blocks stay near peak with weights read from L3 (figures:
    _threads._step_weight_bytes)."""
    from cylstm import _isa, _threads
    mib = 1 << 20
    assert _threads._step_weight_bytes(mib, ("AuthenticAMD", 26), 2) == 8 * mib
    assert _threads._step_weight_bytes(mib, ("AuthenticAMD", 26), 1) == 8 * mib
    assert _threads._step_weight_bytes(mib, ("AuthenticAMD", 25), 2) == 8 * mib   # Zen 4
    assert _threads._step_weight_bytes(mib, ("AuthenticAMD", 25), 1) == mib   # Zen 3
    assert _threads._step_weight_bytes(mib, ("AuthenticAMD", 27), 2) == mib   # not measured
    assert _threads._step_weight_bytes(2 * mib, ("GenuineIntel", 6), 2) == 2 * mib
    assert _threads._step_weight_bytes(mib, ("", 0), 0) == mib
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\n"
                    "model\t\t: 2\n\nprocessor\t: 1\nvendor_id\t: GenuineIntel\n")
    assert _threads._cpu_id(str(info)) == ("AuthenticAMD", 26)
    assert _threads._cpu_id(str(tmp_path / "missing")) == ("", 0)
    assert _threads.STEP_WEIGHT_BYTES == _threads._step_weight_bytes(
        _threads.L2_BYTES, _threads._cpu_id(), _isa.cpu_level())


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_row_order_runs_another_order_in_place(reverse, input_path):
    """row_order = o runs sequence o[b] as kernel row b with x and y in the caller's
    order: the same bits as permuting x, lengths and the state by hand and back."""
    T, B, I, H = 8, 5, 3, 4
    r = np.random.default_rng(5)
    w_ih, w_hh, b = r.normal(size=(4 * H, I)), r.normal(size=(4 * H, H)), r.normal(size=4 * H)
    x = r.normal(size=(T, B, I))
    lengths = np.array([3, 8, 1, 6, 8])
    o = np.array([1, 3, 0, 4, 2])
    h0, c0 = r.normal(size=(B, H)), r.normal(size=(B, H))
    want, hw, cw, _ = F.lstm_layer_forward(np.ascontiguousarray(x[:, o]), w_ih, w_hh, b, b,
                                           h0[o], c0[o], lengths[o], reverse, training=False)
    y, h, c, _ = F.lstm_layer_forward(x, w_ih, w_hh, b, b, h0[o], c0[o], lengths[o], reverse,
                                      training=False, row_order=o)
    back = np.argsort(o)
    assert np.array_equal(y, want[:, back]) and np.array_equal(h, hw) and np.array_equal(c, cw)
    with pytest.raises(ValueError, match="row_order"):
        F.lstm_layer_forward(x, w_ih, w_hh, row_order=o)                 # training
    with pytest.raises(ValueError, match="row_order"):
        F.lstm_layer_forward(x, w_ih, w_hh, training=False, row_order=[0, 1, 1, 2, 3])


def test_ragged_inference_copies_neither_x_nor_y():
    """An eval-mode forward of a ragged batch in an unsorted order runs the sorted order
    in place: no copy of x or y (the lengths-sorted copies it made before)."""
    T, B, I, H = 50, 64, 32, 32
    lstm = cylstm.LSTM(I, H, seed=1).eval()
    x = np.random.default_rng(4).normal(size=(T, B, I)).astype(np.float32)
    lengths = np.random.default_rng(5).integers(1, T + 1, B)
    lstm(x, lengths=lengths)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        y, _ = lstm(x, lengths=lengths)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= y.nbytes + 65536 < y.nbytes + x.nbytes, (peak, y.nbytes, x.nbytes)


def test_out_sharing_memory_with_x_is_refused():
    """The kernel writes y while later steps still read x: an out that overlaps x is
    refused rather than read after it was written."""
    T, B, H = 4, 3, 5
    r = np.random.default_rng(6)
    w_ih, w_hh = r.normal(size=(4 * H, H)), r.normal(size=(4 * H, H))
    buf = r.normal(size=(T + 1, B, H))
    with pytest.raises(ValueError, match="share memory"):
        F.lstm_layer_forward(buf[1:], w_ih, w_hh, training=False, out=buf[:-1])


@contextlib.contextmanager
def _copies():
    """The names of the arrays functional._as_array (the copy _as_rows falls back to)
    is called on inside the block."""
    copied, as_array = [], F._as_array

    def spy(a, name, *args):
        copied.append(name)
        return as_array(a, name, *args)
    F._as_array = spy
    try:
        yield copied
    finally:
        F._as_array = as_array


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("ragged,reverse,P,k", [(False, False, 0, None), (True, True, 0, None),
                                               (True, False, 3, 2), (False, True, 0, 3)],
                         ids=["plain", "ragged-reverse", "ragged-proj-ckpt", "reverse-ckpt"])
def test_backward_reads_strided_dy_in_place(dtype, ragged, reverse, P, k):
    """lstm_layer_backward reads dy in place when its last axis is contiguous: a
    transposed batch-first dy, one half of a wider one, negative and zero row strides
    all give the bits of the same values made C-contiguous."""
    T, B, I, H = 7, 4, 5, 6
    Hp = P or H
    r = np.random.default_rng(5)
    w_ih, w_hh = r.normal(size=(4 * H, I)).astype(dtype), r.normal(size=(4 * H, Hp)).astype(dtype)
    b = r.normal(size=4 * H).astype(dtype)
    w_hr = r.normal(size=(P, H)).astype(dtype) if P else None
    lengths = np.array([7, 3, 5, 1]) if ragged else None
    x = r.normal(size=(T, B, I)).astype(dtype)
    wide = r.normal(size=(B, T, 3 * Hp)).astype(dtype)
    views = [wide[:, :, Hp:2 * Hp].transpose(1, 0, 2),           # batch-first half, (T, B, Hp)
             wide[::-1, ::-1, :Hp].transpose(1, 0, 2),           # negative row strides
             np.broadcast_to(wide[:1, :1, :Hp], (T, B, Hp))]     # one row for every row
    for dy in views:
        assert not dy.flags.c_contiguous
        runs = []
        for d in (np.ascontiguousarray(dy), dy):
            _, _, _, cache = F.lstm_layer_forward(x, w_ih, w_hh, b, b, lengths=lengths,
                                                  reverse=reverse, w_hr=w_hr,
                                                  checkpoint_every=k)
            g = [np.zeros_like(w_ih), np.zeros_like(w_hh), np.zeros_like(b), np.zeros_like(b),
                 np.zeros_like(w_hr) if P else None]
            with _copies() as copied:
                dx, dh0, dc0 = F.lstm_layer_backward(cache, d, dw_ih=g[0], dw_hh=g[1],
                                                     db_ih=g[2], db_hh=g[3], dw_hr=g[4])
            assert "dy" not in copied                   # read in place, not copied
            runs.append([dx, dh0, dc0] + [a for a in g if a is not None])
        for a, b_ in zip(*runs):
            assert a.tobytes() == b_.tobytes()


def test_batch_first_backward_copies_neither_dy_nor_dx():
    """A batch-first layer's backward takes dy through a transposed view and hands dx
    back as one (the Embedding below reads it in place): the bits of the time-major
    layer, dx a view of a time-major array."""
    T, B = 9, 5
    r = np.random.default_rng(6)
    x = r.normal(size=(B, T, 6)).astype(np.float32)
    dy = r.normal(size=(B, T, 8)).astype(np.float32)
    bf = cylstm.LSTM(6, 8, batch_first=True, seed=4)
    tm = cylstm.LSTM(6, 8, seed=4)
    bf(x)
    with _copies() as copied:
        dx_bf, (dh_bf, dc_bf) = bf.backward(dy)
    assert "dy" not in copied
    tm(np.ascontiguousarray(x.transpose(1, 0, 2)))
    dx_tm, (dh_tm, dc_tm) = tm.backward(np.ascontiguousarray(dy.transpose(1, 0, 2)))
    assert dx_bf.shape == (B, T, 6) and dx_bf.transpose(1, 0, 2).flags.c_contiguous
    assert np.array_equal(dx_bf, dx_tm.transpose(1, 0, 2))
    assert np.array_equal(dh_bf, dh_tm) and np.array_equal(dc_bf, dc_tm)
    assert bf.flat_grads.tobytes() == tm.flat_grads.tobytes()
