"""The compiled kernels (cylstm.functional) against the NumPy reference (cylstm.reference),
forward and backward, float32 and float64, over directions, ragged lengths, initial
states, biases and edge sizes; batched vs step-by-step; thread-count invariance (bitwise);
gradient accumulation; padding; cache immutability; workspace reuse; gate activations
over a dense grid (docs/math.md), float64's the same bits at every ISA level."""
import numpy as np
import pytest

import cylstm
from cylstm import functional as F
from cylstm import reference as ref
from cylstm._threads import N_PARTS

from conftest import (KERNEL_TOL, as_dtype, assert_close, grad_buffers, make_layer_problem,
                      output_grads, padded_mask, rel_err)

DTYPES = [np.float32, np.float64]


def _ragged(T, B, seed):
    """B lengths in 1..T including T and 1 (when B >= 2), several active per step."""
    rng = np.random.default_rng(seed)
    L = rng.integers(1, T + 1, size=B)
    L[0] = T
    if B > 1:
        L[1] = 1
    return [int(v) for v in L]


def _blocky(T, B, seed):
    """B lengths in S..2S (S = the time block's steps, T > 2S), unsorted: the first
    block has every row active (its products read the rows in place), the second
    has ended rows (they run over the active rows, gathered), the last none at all."""
    S = F.block_steps(B)
    assert T > 2 * S
    L = np.random.default_rng(seed).integers(S, 2 * S + 1, size=B)
    L[0], L[-1] = 2 * S, S
    return [int(v) for v in L]


# (T, B, I, H, lengths); B_MANY is larger than the number of work parts and (for
# N_PARTS > 1) not divisible by it; B_DIV is a multiple of it.
B_MANY = 2 * N_PARTS + 1
B_DIV = 3 * N_PARTS
SIZES = {
    "ragged": (6, 6, 3, 5, [6, 1, 3, 6, 2, 5]),
    "full": (6, 6, 3, 5, None),
    "T1": (1, 3, 2, 3, None),
    "T1-lengths": (1, 3, 2, 3, [1, 1, 1]),
    "B1": (5, 1, 3, 4, None),
    "B1-short": (5, 1, 3, 4, [3]),
    "T1B1": (1, 1, 2, 3, None),
    "B-many-parts": (4, B_MANY, 3, 4, _ragged(4, B_MANY, seed=99)),
    "B-divisible": (3, B_DIV, 2, 3, _ragged(3, B_DIV, seed=98)),
    "blocks": (80, 64, 3, 4, _blocky(80, 64, seed=97)),       # 3 time blocks of 32 steps
}


def run_compiled(p, lengths, reverse, dy, dh_n, dc_n, **kw):
    y, h_n, c_n, cache = F.lstm_layer_forward(**p, lengths=lengths, reverse=reverse, **kw)
    g = grad_buffers(p)
    dx, dh0, dc0 = F.lstm_layer_backward(cache, dy, dh_n, dc_n, **g)
    return dict(y=y, h_n=h_n, c_n=c_n, dx=dx, dh0=dh0, dc0=dc0,
                **{k: v for k, v in g.items() if v is not None})


def run_reference(p, lengths, reverse, dy, dh_n, dc_n):
    y, h_n, c_n, cache = ref.lstm_layer_forward(**p, lengths=lengths, reverse=reverse)
    g = grad_buffers(p)
    dx, dh0, dc0 = ref.lstm_layer_backward(cache, dy, dh_n, dc_n, **g)
    return dict(y=y, h_n=h_n, c_n=c_n, dx=dx, dh0=dh0, dc0=dc0,
                **{k: v for k, v in g.items() if v is not None})


# ---------------------------------------------------------------- compiled vs reference

def assert_layer_results_close(got, want, dtype, *, zero_dw_hh):
    """Every result of `want` (a float64 reference run) against `got` (a `dtype` kernel
    run) within KERNEL_TOL. zero_dw_hh: T == 1 without an initial state, where
    h_{t-1} = 0 at every step, so dw_hh must be exactly zero in both."""
    tol = KERNEL_TOL[np.dtype(dtype)]
    for name in want:
        assert got[name].dtype == dtype, name
        if name == "dw_hh" and zero_dw_hh:   # h_{t-1} = 0 at every step
            assert np.all(got[name] == 0) and np.all(want[name] == 0)
            continue
        assert np.abs(want[name]).max() > 0, name   # the comparison is not vacuous
        assert_close(got[name], want[name], tol, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("state", [True, False], ids=["h0c0", "nostate"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("size", list(SIZES), ids=list(SIZES))
def test_compiled_matches_reference(size, reverse, state, bias, dtype, input_path):
    """Forward (y, h_n, c_n) and backward (dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh).
    The reference runs in float64 on the same values, so a float32 kernel is measured
    against the exact answer, not against another float32 rounding."""
    T, B, I, H, lengths = SIZES[size]
    p = make_layer_problem(T, B, I, H, seed=1, dtype=dtype, bias=bias, state=state)
    dy, dh_n, dc_n = output_grads(T, B, H, seed=2, dtype=dtype)
    got = run_compiled(p, lengths, reverse, dy, dh_n, dc_n)
    want = run_reference(as_dtype(p, np.float64), lengths, reverse,
                         *(a.astype(np.float64) for a in (dy, dh_n, dc_n)))
    assert set(got) == set(want)
    assert_layer_results_close(got, want, dtype, zero_dw_hh=T == 1 and not state)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_missing_state_and_final_gradients_mean_zeros(reverse, dtype):
    """h0/c0 = None is the same as zeros, dh_n/dc_n = None the same as zeros (bitwise)."""
    T, B, I, H, lengths = SIZES["ragged"]
    p = make_layer_problem(T, B, I, H, seed=3, dtype=dtype, state=False)
    dy, _, _ = output_grads(T, B, H, seed=4, dtype=dtype)
    z = np.zeros((B, H), dtype)
    a = run_compiled(p, lengths, reverse, dy, None, None)
    b = run_compiled({**p, "h0": z, "c0": z}, lengths, reverse, dy, z, z)
    for name in a:
        assert np.array_equal(a[name], b[name]), name


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("size", ["ragged", "full"])
def test_inference_mode_gives_the_training_forward(size, dtype, input_path):
    """training=False returns no cache and the same y, h_n, c_n: bitwise where both run
    the same products, to rounding where inference projects a ragged batch's active rows
    only (their places in the BLAS calls differ from the training forward's, which
    changes a row's rounding on some OpenBLAS kernels)."""
    T, B, I, H, lengths = SIZES[size]
    p = make_layer_problem(T, B, I, H, seed=5, dtype=dtype)
    same_bits = lengths is None or input_path
    for reverse in (False, True):
        y, h, c, cache = F.lstm_layer_forward(**p, lengths=lengths, reverse=reverse)
        y2, h2, c2, cache2 = F.lstm_layer_forward(**p, lengths=lengths, reverse=reverse,
                                                  training=False)
        assert cache is not None and cache2 is None
        for u, v in ((y, y2), (h, h2), (c, c2)):
            if same_bits:
                assert np.array_equal(u, v)
            else:
                assert_close(v, u, KERNEL_TOL[np.dtype(dtype)], "inference vs training")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("order", [False, True], ids=["in-order", "row_order"])
def test_ragged_inference_projects_the_active_rows(order, reverse, dtype, monkeypatch,
                                                   two_thread_teams):
    """With the input projected before the loop, a ragged inference projects only the
    rows that are still running, gathered to their places (_lstm.pyx, "Active rows"):
    over several time blocks, in both directions and in another row order, the results
    are the reference's, padding is never read, and any thread count gives the same bits."""
    monkeypatch.setattr(F, "_FORCE_INPUT_IN_STEP", False)
    T, B, I, H = 70, 64, 3, 5                     # block_steps(64) = 32: three blocks
    lengths = _ragged(T, B, seed=40)
    p = make_layer_problem(T, B, I, H, seed=41, dtype=dtype)
    # row_order: kernel row b runs sequence row_order[b] of x and y with lengths[b],
    # h0[b], c0[b] (those in the kernel's order)
    row_order = np.random.default_rng(42).permutation(B) if order else np.arange(B)
    pad = np.empty((T, B), bool)
    pad[:, row_order] = padded_mask(T, lengths)   # in x's and y's order
    junk = p["x"].copy()
    junk[pad] = np.nan

    def infer(x, n, ws=None, k=None):
        with cylstm.threads(n):
            out = F.lstm_layer_forward(**{**p, "x": x}, lengths=lengths, reverse=reverse,
                                       training=False, workspace=ws, checkpoint_every=k,
                                       row_order=row_order if order else None)
        return out[:3]

    ws = F.Workspace()
    infer(p["x"], 1, ws)
    gates = ws._arrays["gates"].reshape(-1, 4 * H)
    gates[:] = np.nan
    got = infer(p["x"], 1, ws)
    # the projections sit at the active rows' places, the rest of the scratch untouched
    n_active = int(np.sum(lengths))
    assert not np.isnan(gates[:n_active]).any() and np.isnan(gates[n_active:]).all()
    for a, b in zip(got, infer(junk, 2)):
        assert np.array_equal(a, b)
    for a, b in zip(got, infer(p["x"], 2, k=32)):     # segments of one time block each
        assert np.array_equal(a, b)
    yk, h_n, c_n, _ = ref.lstm_layer_forward(
        **as_dtype({**p, "x": p["x"][:, row_order]}, np.float64), lengths=lengths,
        reverse=reverse)
    y = np.empty_like(yk)
    y[:, row_order] = yk
    tol = KERNEL_TOL[np.dtype(dtype)]
    assert_close(got[0], y, tol, "y")
    assert_close(got[1], h_n, tol, "h_n")
    assert_close(got[2], c_n, tol, "c_n")
    assert np.all(got[0][pad] == 0)


def test_out_argument_receives_y():
    T, B, I, H, lengths = SIZES["ragged"]
    p = make_layer_problem(T, B, I, H, seed=6)
    y, h, c, _ = F.lstm_layer_forward(**p, lengths=lengths)
    out = np.full((T, B, H), np.nan)
    y2, h2, c2, _ = F.lstm_layer_forward(**p, lengths=lengths, out=out)
    assert y2 is out
    assert np.array_equal(out, y) and np.array_equal(h2, h) and np.array_equal(c2, c)


# ---------------------------------------------------------------- padding

@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_padded_positions(reverse, dtype, input_path):
    """y and dx are exactly 0 at padded positions and nonzero elsewhere; dy at padded
    positions is ignored bit for bit; h_n/c_n are the state at each sequence's last valid
    step (equal to running that sequence alone, truncated)."""
    T, B, I, H, lengths = SIZES["ragged"]
    p = make_layer_problem(T, B, I, H, seed=7, dtype=dtype)
    dy, dh_n, dc_n = output_grads(T, B, H, seed=8, dtype=dtype)
    pad = padded_mask(T, lengths)
    assert pad.any() and (~pad).sum(axis=1).min() >= 2   # several sequences active per step
    a = run_compiled(p, lengths, reverse, dy, dh_n, dc_n)
    assert np.all(a["y"][pad] == 0) and np.all(a["dx"][pad] == 0)
    assert np.all(a["y"][~pad] != 0) and np.all(a["dx"][~pad] != 0)

    junk = np.where(pad[..., None], np.asarray(1e3, dtype), dy)
    b = run_compiled(p, lengths, reverse, junk, dh_n, dc_n)
    for name in a:
        assert np.array_equal(a[name], b[name]), name

    tol = 10 * KERNEL_TOL[np.dtype(dtype)]
    for j, L in enumerate(lengths):
        s = slice(j, j + 1)
        one = {**p, "x": p["x"][:L, s], "h0": p["h0"][s], "c0": p["c0"][s]}
        y1, h1, c1, _ = F.lstm_layer_forward(**one, reverse=reverse)
        assert_close(a["y"][:L, s], y1, tol, f"y[:, {j}]")
        assert_close(a["h_n"][s], h1, tol, f"h_n[{j}]")
        assert_close(a["c_n"][s], c1, tol, f"c_n[{j}]")


@pytest.mark.parametrize("fill", [1e30, np.inf, np.nan], ids=["1e30", "inf", "nan"])
def test_padded_input_values_are_never_read(fill, input_path):
    """Whatever x holds at padded positions (PyTorch's packed input has no values there
    at all), every output and every gradient is bitwise the same as with zero padding:
    "no gradient flows through the padded steps" (docs/math.md)."""
    T, B, I, H, lengths = SIZES["ragged"]
    p = make_layer_problem(T, B, I, H, seed=30)
    dy, dh_n, dc_n = output_grads(T, B, H, seed=31)
    pad = padded_mask(T, lengths)
    for reverse in (False, True):
        res = []
        for value in (0.0, fill):
            x = p["x"].copy()
            x[pad] = value
            res.append(run_compiled({**p, "x": x}, lengths, reverse, dy, dh_n, dc_n))
        for name in res[0]:
            assert np.array_equal(res[0][name], res[1][name]), f"reverse={reverse}: {name}"


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_full_lengths_equal_no_lengths(reverse):
    T, B, I, H, _ = SIZES["B-many-parts"]
    p = make_layer_problem(T, B, I, H, seed=34, dtype=np.float32)
    outs = output_grads(T, B, H, seed=35, dtype=np.float32)
    a = run_compiled(p, None, reverse, *outs)
    b = run_compiled(p, np.full(B, T), reverse, *outs)
    for name in a:
        assert np.array_equal(a[name], b[name]), name


@pytest.mark.parametrize("which", ["h0", "c0"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_only_one_initial_state_given(which, reverse):
    """h0 without c0 (or c0 without h0): the missing one is zeros."""
    T, B, I, H, lengths = SIZES["ragged"]
    p = make_layer_problem(T, B, I, H, seed=32)
    other = "c0" if which == "h0" else "h0"
    dy, dh_n, dc_n = output_grads(T, B, H, seed=33)
    got = run_compiled({**p, other: None}, lengths, reverse, dy, dh_n, dc_n)
    want = run_reference({**p, other: np.zeros((B, H))}, lengths, reverse, dy, dh_n, dc_n)
    for name in want:
        assert_close(got[name], want[name], KERNEL_TOL[np.dtype(np.float64)], name)


# ---------------------------------------------------------------- batched vs step-by-step

@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_batched_equals_step_by_step(reverse, dtype):
    """T calls with T=1 carrying (h, c), in the direction's time order, equal one call;
    the backward through those calls, accumulating into one set of buffers, equals the
    whole-sequence backward."""
    T, B, I, H = 6, B_MANY, 3, 4
    p = make_layer_problem(T, B, I, H, seed=9, dtype=dtype)
    dy, dh_n, dc_n = output_grads(T, B, H, seed=10, dtype=dtype)
    w = {k: p[k] for k in ("w_ih", "w_hh", "b_ih", "b_hh")}
    whole = run_compiled(p, None, reverse, dy, dh_n, dc_n)

    order = list(range(T))[::-1] if reverse else list(range(T))
    h, c, caches, ys = p["h0"], p["c0"], {}, np.empty((T, B, H), dtype)
    for t in order:
        yt, h, c, caches[t] = F.lstm_layer_forward(p["x"][t:t + 1], **w, h0=h, c0=c,
                                                   reverse=reverse)
        ys[t] = yt[0]
    tol = 10 * KERNEL_TOL[np.dtype(dtype)]
    assert_close(ys, whole["y"], tol, "y")
    assert_close(h, whole["h_n"], tol, "h_n")
    assert_close(c, whole["c_n"], tol, "c_n")

    g = grad_buffers(p)
    dh, dc, dx = dh_n, dc_n, np.empty((T, B, I), dtype)
    for t in reversed(order):
        dxt, dh, dc = F.lstm_layer_backward(caches[t], dy[t:t + 1], dh, dc, **g)
        dx[t] = dxt[0]
    assert_close(dx, whole["dx"], tol, "dx")
    assert_close(dh, whole["dh0"], tol, "dh0")
    assert_close(dc, whole["dc0"], tol, "dc0")
    for k, v in g.items():
        assert_close(v, whole[k], tol, k)


# ---------------------------------------------------------------- threads

@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("blocks", [False, True], ids=["one-block", "three-blocks"])
def test_results_are_bitwise_identical_for_any_thread_count(
        reverse, dtype, blocks, two_thread_teams, kernel_level, input_path):
    """threads(1), threads(2) and the default give identical forward and gradients.
    Medium size, so that the batch really is chunked and the GEMMs are blocked; with
    three time blocks, one of every kind (see _blocky)."""
    T, B, I, H = (80, 64, 8, 16) if blocks else (20, 9, 16, 32)
    lengths = _blocky(T, B, seed=10) if blocks else _ragged(T, B, seed=11)
    p = make_layer_problem(T, B, I, H, seed=12, dtype=dtype)
    dy, dh_n, dc_n = output_grads(T, B, H, seed=13, dtype=dtype)

    results = {}
    for n in (1, 2, None):
        with cylstm.threads(n):
            if n == 1:
                assert cylstm.get_num_threads() == 1
            results[n] = run_compiled(p, lengths, reverse, dy, dh_n, dc_n)
    for n in (2, None):
        for name, v in results[1].items():
            assert np.array_equal(v, results[n][name]), f"threads({n}): {name}"
    # and the answer is right, not merely reproducible
    want = run_reference(as_dtype(p, np.float64), lengths, reverse,
                         *(a.astype(np.float64) for a in (dy, dh_n, dc_n)))
    for name in want:
        assert_close(results[1][name], want[name], KERNEL_TOL[np.dtype(dtype)], name)


def test_set_num_threads_does_not_change_results(two_thread_teams):
    """The process-wide setting (set_num_threads) is bitwise neutral too."""
    T, B, I, H = 12, 7, 8, 16
    p = make_layer_problem(T, B, I, H, seed=14, dtype=np.float32)
    dy, dh_n, dc_n = output_grads(T, B, H, seed=15, dtype=np.float32)
    lengths = _ragged(T, B, seed=16)
    cylstm.set_num_threads(1)
    a = run_compiled(p, lengths, True, dy, dh_n, dc_n)
    cylstm.set_num_threads(2)
    b = run_compiled(p, lengths, True, dy, dh_n, dc_n)
    for name in a:
        assert np.array_equal(a[name], b[name]), name


# ---------------------------------------------------------------- accumulation

def test_fresh_and_zeroed_gradient_buffers_are_zero():
    lstm = cylstm.LSTM(3, 4, num_layers=2, bidirectional=True, dtype="float64", seed=0)
    assert lstm.grads and all(np.all(g == 0) for g in lstm.grads.values())
    assert np.all(lstm.flat_grads == 0)
    x = np.random.default_rng(17).standard_normal((5, 2, 3))
    y, _ = lstm(x)
    lstm.backward(np.ones_like(y))
    assert all(np.abs(g).max() > 0 for g in lstm.grads.values())
    lstm.zero_grad()
    assert all(np.all(g == 0) for g in lstm.grads.values())
    for g in lstm.grads.values():   # still views into the arena after zero_grad
        assert np.shares_memory(g, lstm.flat_grads)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("state", [False, True], ids=["nostate", "h0c0"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_two_backward_calls_give_exactly_twice_the_gradient(reverse, state, bias):
    """float64: backward twice on one cache gives bitwise 2 * (one backward's gradient)
    in every buffer, the same dx/dh0/dc0 both times, and leaves the cache (and dy, dh_n,
    dc_n) untouched."""
    T, B, I, H, lengths = SIZES["ragged"]
    p = make_layer_problem(T, B, I, H, seed=18, bias=bias, state=state)
    dy, dh_n, dc_n = output_grads(T, B, H, seed=19)
    _, _, _, cache = F.lstm_layer_forward(**p, lengths=lengths, reverse=reverse)
    snapshot = {s: np.array(getattr(cache, s), copy=True) for s in cache.__slots__
                if isinstance(getattr(cache, s), np.ndarray)}
    args = [a.copy() for a in (dy, dh_n, dc_n)]

    g1 = grad_buffers(p)
    out1 = F.lstm_layer_backward(cache, dy, dh_n, dc_n, **g1)
    g2 = grad_buffers(p)
    out2a = F.lstm_layer_backward(cache, dy, dh_n, dc_n, **g2)
    out2b = F.lstm_layer_backward(cache, dy, dh_n, dc_n, **g2)

    for s, before in snapshot.items():
        assert np.array_equal(before, getattr(cache, s)), f"cache.{s} modified"
    for a, b in zip(args, (dy, dh_n, dc_n)):
        assert np.array_equal(a, b)
    for a, b, c in zip(out1, out2a, out2b):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    for k, v in g1.items():
        if v is None:
            continue
        assert np.abs(v).max() > 0, k
        bad = int(np.sum(g2[k] != 2 * v))
        assert bad == 0, f"{k}: {bad} of {v.size} elements differ from exactly 2x"


def test_backward_adds_onto_existing_buffer_contents():
    """Accumulation is +=, not =: pre-filled buffers keep their content."""
    T, B, I, H, lengths = SIZES["ragged"]
    p = make_layer_problem(T, B, I, H, seed=20)
    dy, dh_n, dc_n = output_grads(T, B, H, seed=21)
    _, _, _, cache = F.lstm_layer_forward(**p, lengths=lengths)
    g1 = grad_buffers(p)
    F.lstm_layer_backward(cache, dy, dh_n, dc_n, **g1)
    g3 = {k: np.full_like(v, 0.5) for k, v in g1.items()}
    F.lstm_layer_backward(cache, dy, dh_n, dc_n, **g3)
    for k in g1:
        assert_close(g3[k], 0.5 + g1[k], 1e-14, k)


# ---------------------------------------------------------------- workspace

@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_workspace_reuse(dtype):
    """Two forwards (and backwards) with one Workspace and one shape give identical
    results, equal to those without a workspace; then a different shape, and a different
    dtype, through the same workspace are still right."""
    ws = F.Workspace()
    T, B, I, H, lengths = SIZES["ragged"]
    p = make_layer_problem(T, B, I, H, seed=22, dtype=dtype)
    dy, dh_n, dc_n = output_grads(T, B, H, seed=23, dtype=dtype)

    def run(p, lengths, dy, dh_n, dc_n):
        y, h, c, cache = F.lstm_layer_forward(**p, lengths=lengths, reverse=True,
                                              workspace=ws)
        g = grad_buffers(p)
        dx, dh0, dc0 = F.lstm_layer_backward(cache, dy, dh_n, dc_n, workspace=ws, **g)
        return dict(y=y, h_n=h, c_n=c, dx=dx, dh0=dh0, dc0=dc0, **g)

    first = run(p, lengths, dy, dh_n, dc_n)
    assert ws.nbytes > 0
    second = run(p, lengths, dy, dh_n, dc_n)
    plain = run_compiled(p, lengths, True, dy, dh_n, dc_n)
    for name in first:
        assert np.array_equal(first[name], second[name]), name
        assert np.array_equal(first[name], plain[name]), name

    for (T2, B2, dt) in ((9, 4, dtype), (3, 8, dtype),
                         (4, 5, np.float64 if dtype == np.float32 else np.float32)):
        p2 = make_layer_problem(T2, B2, I, H, seed=24, dtype=dt)
        L2 = _ragged(T2, B2, seed=25)
        outs = output_grads(T2, B2, H, seed=26, dtype=dt)
        got = run(p2, L2, *outs)
        want = run_reference(as_dtype(p2, np.float64), L2, True,
                             *(a.astype(np.float64) for a in outs))
        for name in want:
            assert got[name].dtype == dt
            assert_close(got[name], want[name], KERNEL_TOL[np.dtype(dt)], name)


@pytest.mark.parametrize("proj", [False, True], ids=["noproj", "proj"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_padding_of_a_reused_workspace_is_never_read(dtype, reverse, proj):
    """No result depends on what a reused workspace held: with every float scratch
    (caches, the active rows' gathered x and h_{t-1}, dz, dx's scratch) filled with NaN
    between two runs, forward and backward over ragged lengths (time blocks of every
    kind) give bitwise what a fresh workspace gives."""
    T, B, I, H, lengths = SIZES["blocks"]
    P = 3 if proj else None
    p = make_layer_problem(T, B, I, H, seed=27, dtype=dtype, proj_size=P)
    outs = output_grads(T, B, H, seed=28, dtype=dtype, proj_size=P)
    ws = F.Workspace()

    def run():
        y, h, c, cache = F.lstm_layer_forward(**p, lengths=lengths, reverse=reverse,
                                              workspace=ws)
        g = grad_buffers(p)
        dx, dh0, dc0 = F.lstm_layer_backward(cache, *outs, workspace=ws, **g)
        return dict(y=y, h_n=h, c_n=c, dx=dx, dh0=dh0, dc0=dc0,
                    **{k: v for k, v in g.items() if v is not None})

    first = run()
    poisoned = 0
    for a in ws._arrays.values():
        if a.dtype.kind == "f":
            a.fill(np.nan)
            poisoned += a.size
    assert poisoned > 0
    second = run()
    for name, want in first.items():
        assert np.isfinite(want).all(), name
        assert np.array_equal(second[name], want), name


# ---------------------------------------------------------------- gate activations

def _gate_probe(z, dtype):
    """Run the kernel so that every gate's pre-activation is exactly z (B = z.size):
    I = H = 1, W_ih = 1, no bias, zero initial state. Returns the cache."""
    z = np.asarray(z, dtype)
    x = z.reshape(1, -1, 1)
    w_ih = np.ones((4, 1), dtype)
    w_hh = np.zeros((4, 1), dtype)
    _, _, _, cache = F.lstm_layer_forward(x, w_ih, w_hh)
    return cache


def _exact_sigmoid(z):
    z = np.asarray(z, np.longdouble)
    return np.where(z >= 0, 1 / (1 + np.exp(-z)), np.exp(z) / (1 + np.exp(z)))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_gate_activations_over_a_dense_grid(dtype, kernel_level):
    """Activated gates (cache.gates) and tanh(c_t) (cache.tc) within a few ulps of the
    exact value, relative, over a dense grid of pre-activations, including both sides of
    every branch point of a fast implementation (0, 1e-4, 0.625, ...)."""
    eps = np.finfo(dtype).eps
    grid = np.concatenate([
        np.linspace(-85, 85, 20001),
        np.linspace(-1, 1, 4001),
        np.geomspace(1e-30, 1, 600), -np.geomspace(1e-30, 1, 600),
        [0.0, 1e-4, -1e-4, 0.625, -0.625, 0.6249, 0.6251, 9.0, -9.0],
    ]).astype(dtype)
    cache = _gate_probe(grid, dtype)
    gates = cache.gates[0].astype(np.longdouble)         # (B, 4) [i | f | g | o]
    z = grid.astype(np.longdouble)
    sig, th = _exact_sigmoid(z), np.tanh(z)
    for j, want in ((0, sig), (1, sig), (2, th), (3, sig)):
        err = np.abs(gates[:, j] - want) / np.maximum(np.abs(want), np.finfo(dtype).tiny)
        worst = int(np.argmax(err))
        assert err[worst] <= 4 * eps, \
            f"gate {'ifgo'[j]} at z={grid[worst]!r}: {float(err[worst]) / eps:.1f} ulp"
    c = cache.c[0, :, 0].astype(np.longdouble)
    tc = cache.tc[0, :, 0].astype(np.longdouble)
    want = np.tanh(c)
    err = np.abs(tc - want) / np.maximum(np.abs(want), np.finfo(dtype).tiny)
    assert err.max() <= 4 * eps, f"tanh(c): {float(err.max()) / eps:.1f} ulp"
    # c = i * g exactly as the forward computes it (zero initial state)
    assert_close(c, sig * th, 4 * eps, "c")


def test_float64_activations_are_the_same_bits_at_every_level():
    """float64 sigmoid and tanh (_activations.h) give the same bits at every ISA level
    (no FMA contraction), which lets the streaming step, which calls the baseline ones,
    equal the sequence forward bit for bit; and over the whole range of a double,
    subnormal results included, they are within 2 ulps of the exact value (4 allowed)."""
    from cylstm import _isa, _lstm
    grid = np.concatenate([np.linspace(-800, 800, 40001), np.linspace(-1, 1, 40001),
                           np.geomspace(1e-300, 700, 3000), -np.geomspace(1e-300, 760, 3000),
                           [0.0, -0.0, 1e300, -1e300, np.inf, -np.inf, np.nan]])
    runs = []
    for lvl in range(_isa.cpu_level() + 1):
        with _isa.use_level(lvl):
            runs.append(_lstm._activations_f64(grid))
    for sig, th in runs[1:]:
        assert np.array_equal(sig, runs[0][0], equal_nan=True)
        assert np.array_equal(th, runs[0][1], equal_nan=True)
    sig, th = runs[0]
    assert np.isnan(sig[-1]) and np.isnan(th[-1])
    z = grid[:-1].astype(np.longdouble)
    with np.errstate(over="ignore", invalid="ignore"):      # the branch np.where drops
        want_sig = _exact_sigmoid(z)
    tiny, eps = np.finfo(np.float64).tiny, np.finfo(np.float64).eps
    for got, want in ((sig[:-1], want_sig), (th[:-1], np.tanh(z))):
        normal = np.abs(want) >= tiny
        err = np.abs(got[normal] - want[normal]) / np.abs(want[normal])
        assert err.max() <= 4 * eps, f"{float(err.max()) / eps:.1f} ulp"
        # subnormal results: within one subnormal step (2^-1074)
        assert np.all(np.abs(got[~normal] - want[~normal]) <= 2.0 ** -1074)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_gate_activations_saturate_without_nan_or_inf(dtype, kernel_level):
    """Huge and infinite pre-activations saturate (sigmoid -> 0/1, tanh -> +-1) with no
    NaN or Inf; a NaN pre-activation gives NaN gates (it is not silently hidden)."""
    big = np.finfo(dtype).max
    z = np.array([1e4, -1e4, 1e30, -1e30, big, -big, np.inf, -np.inf], dtype)
    g = _gate_probe(z, dtype).gates[0]
    tiny = np.finfo(dtype).tiny
    pos = z > 0
    for j in (0, 1, 3):
        assert np.all(np.isfinite(g[:, j]))
        assert np.all(g[pos, j] == 1)
        assert np.all((g[~pos, j] >= 0) & (g[~pos, j] <= 2 * tiny))
    assert np.array_equal(g[:, 2], np.where(pos, 1, -1).astype(dtype))
    gn = _gate_probe(np.array([np.nan, 0.5], dtype), dtype).gates[0]
    assert np.all(np.isnan(gn[0])) and np.all(np.isfinite(gn[1]))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_huge_inputs_give_finite_results(reverse, dtype):
    """Inputs of +-1e30 saturate every gate: outputs and gradients stay finite."""
    T, B, I, H, lengths = SIZES["ragged"]
    p = make_layer_problem(T, B, I, H, seed=27, dtype=dtype)
    sign = np.sign(np.random.default_rng(28).standard_normal((T, B, I)))
    p["x"] = (1e30 * sign).astype(dtype)
    dy, dh_n, dc_n = output_grads(T, B, H, seed=29, dtype=dtype)
    r = run_compiled(p, lengths, reverse, dy, dh_n, dc_n)
    for name, v in r.items():
        assert np.all(np.isfinite(v)), name
    assert np.all(np.abs(r["y"]) <= 1) and np.all(np.abs(r["h_n"]) <= 1)
    assert np.all(np.abs(r["c_n"]) <= np.abs(p["c0"]) + T)
    want = run_reference(as_dtype(p, np.float64), lengths, reverse,
                         *(a.astype(np.float64) for a in (dy, dh_n, dc_n)))
    for name in ("y", "h_n", "c_n"):
        assert rel_err(r[name], want[name]) < KERNEL_TOL[np.dtype(dtype)], name
