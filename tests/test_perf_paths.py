"""Fast paths added for speed, checked against the NumPy reference and BLAS (never timed).

* The streaming step's dot kernel (_rgemm.h, C = A @ W^T on unpacked weights) against a
  float64 product, on shapes that exercise its edges (row pairs and their remainder, groups
  of 4 weight rows and the remainder, K tails of 1..31), at each ISA level; a row of C is
  the same bits whatever block it is computed in (what makes threads not matter).
* LSTM.step (_step.StepRunner): every layer of one step against the reference
  (cylstm.reference, float64 math) in float32 and float64, with and without biases and a
  projection, at a size whose weights are split across threads by hidden units, at each
  ISA level including BLAS; bitwise the same for 1 and 2 threads; and it always reads
  the current weights (in-place updates, load_state_dict, a replaced parameter array,
  a replaced state array).
"""
import numpy as np
import pytest

import cylstm
from cylstm import _isa, _lstm, _parallel, _step, _threads, reference

from conftest import rel_err

KERNEL_LEVELS = [lvl for lvl in (1, 2) if lvl <= _lstm.rgemm_level()]


@pytest.fixture
def level(kernel_level):
    """Every per-step kernel level (conftest's kernel_level)."""
    return kernel_level


# ---- the dot kernel -----------------------------------------------------------------------

DOT_SHAPES = [(M, N, K) for M in (1, 2, 3, 5) for N in (1, 3, 4, 7, 64)
              for K in (1, 7, 8, 15, 16, 17, 31, 32, 33, 40, 64, 100)]


@pytest.mark.parametrize("lvl", KERNEL_LEVELS, ids=lambda v: {1: "avx2", 2: "avx512"}[v])
def test_dot_kernel_matches_a_float64_product(lvl):
    before = _lstm.rgemm_level()
    _lstm._set_rgemm_level(lvl)
    try:
        rng = np.random.default_rng(0)
        for M, N, K in DOT_SHAPES:
            a = rng.standard_normal((M, K)).astype(np.float32)
            w = rng.standard_normal((N, K)).astype(np.float32)
            want = a.astype(np.float64) @ w.T.astype(np.float64)
            got = _step._dot_matmul_f32(a, w)
            assert got.shape == (M, N) and got.dtype == np.float32
            bound = 4 * K * np.finfo(np.float32).eps * (np.abs(a) @ np.abs(w.T))
            assert np.all(np.abs(got - want) <= bound + 1e-30), (M, N, K)
    finally:
        _lstm._set_rgemm_level(before)


@pytest.mark.parametrize("lvl", KERNEL_LEVELS, ids=lambda v: {1: "avx2", 2: "avx512"}[v])
def test_dot_kernel_rows_do_not_depend_on_their_block(lvl):
    """An element of C is the same bits computed alone, in any row pair, in any group of
    weight rows: splitting the hidden units across threads cannot change a result."""
    before = _lstm.rgemm_level()
    _lstm._set_rgemm_level(lvl)
    try:
        rng = np.random.default_rng(1)
        a = rng.standard_normal((5, 45)).astype(np.float32)
        w = rng.standard_normal((23, 45)).astype(np.float32)
        full = _step._dot_matmul_f32(a, w)
        for i in range(5):
            for n0, n1 in ((0, 23), (3, 4), (5, 18), (22, 23)):
                assert np.array_equal(_step._dot_matmul_f32(a[i:i + 1], w[n0:n1]),
                                      full[i:i + 1, n0:n1])
        assert np.array_equal(_step._dot_matmul_f32(a[1:4], w[2:21]), full[1:4, 2:21])
    finally:
        _lstm._set_rgemm_level(before)


def _at_offset(a, offset):
    """A copy of a whose data starts `offset` floats past a 64-byte boundary."""
    buf = np.empty(a.size + 32, np.float32)
    start = (-buf.ctypes.data // 4) % 16 + offset
    out = buf[start:start + a.size].reshape(a.shape)
    out[...] = a
    assert out.ctypes.data % 64 == 4 * offset
    return out


@pytest.mark.parametrize("lvl", KERNEL_LEVELS, ids=lambda v: {1: "avx2", 2: "avx512"}[v])
def test_dot_kernel_gives_the_same_bits_at_any_alignment(lvl):
    """Weight rows off a 64-byte boundary take another load path (AVX-512: aligned loads
    and a permute); it must give exactly the bits of the aligned rows."""
    before = _lstm.rgemm_level()
    _lstm._set_rgemm_level(lvl)
    try:
        rng = np.random.default_rng(2)
        for M, N, K in ((1, 9, 64), (2, 8, 32), (3, 13, 80), (1, 4, 256), (2, 6, 45)):
            a = rng.standard_normal((M, K)).astype(np.float32)
            w = rng.standard_normal((N, K)).astype(np.float32)
            want = _step._dot_matmul_f32(a, _at_offset(w, 0))
            for offset in range(1, 16):
                got = _step._dot_matmul_f32(a, _at_offset(w, offset))
                assert np.array_equal(got, want), (M, N, K, offset)
            exact = a.astype(np.float64) @ w.T.astype(np.float64)
            bound = 4 * K * np.finfo(np.float32).eps * (np.abs(a) @ np.abs(w.T))
            assert np.all(np.abs(want - exact) <= bound)
    finally:
        _lstm._set_rgemm_level(before)


# ---- LSTM.step against the reference ------------------------------------------------------

def reference_steps(lstm, x, h0, c0):
    """Step the NumPy reference through x (T, B, I) layer by layer, T = 1 at a time:
    returns (ys (T, B, Hp), h (L, B, Hp), c (L, B, H)), in float64."""
    h, c = h0.astype(np.float64).copy(), c0.astype(np.float64).copy()
    ys = []
    for t in range(x.shape[0]):
        inp = x[t:t + 1].astype(np.float64)
        for layer in range(lstm.num_layers):
            (w_ih, w_hh, b_ih, b_hh, w_hr), _ = lstm._weights(layer, 0)
            f64 = [None if a is None else a.astype(np.float64)
                   for a in (w_ih, w_hh, b_ih, b_hh, w_hr)]
            y, h[layer], c[layer], _ = reference.lstm_layer_forward(
                inp, f64[0], f64[1], f64[2], f64[3], h[layer], c[layer],
                training=False, w_hr=f64[4])
            inp = y
        ys.append(inp[0])
    return np.stack(ys), h, c


# (B, I, H, L, P, bias): "big" (2 MiB of float32 weights, 2 M multiply-adds) runs on a
# thread team that splits the hidden units; every case splits them into parts (one per
# core) even on one thread; "odd" sizes leave tails everywhere in the kernel.
STEP_CASES = {
    "small": (3, 5, 6, 2, 0, True),
    "odd": (2, 37, 45, 2, 0, True),
    "proj": (3, 20, 33, 3, 7, True),
    "nobias": (1, 9, 17, 1, 0, False),
    "big": (4, 256, 256, 1, 0, True),
    "bigproj": (2, 200, 256, 2, 100, True),
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", list(STEP_CASES))
def test_step_matches_the_reference(case, dtype, level):
    B, I, H, L, P, bias = STEP_CASES[case]
    # (float64 always runs BLAS, so at levels 1 and 2 it checks that the level is ignored)
    tol = 1e-5 if dtype == "float32" else 1e-12
    lstm = cylstm.LSTM(I, H, num_layers=L, proj_size=P, bias=bias, dtype=dtype, seed=3)
    rng = np.random.default_rng(4)
    T = 3
    x = rng.standard_normal((T, B, I)).astype(dtype)
    h0 = rng.standard_normal((L, B, P or H)).astype(dtype)
    c0 = rng.standard_normal((L, B, H)).astype(dtype)
    want_y, want_h, want_c = reference_steps(lstm, x, h0, c0)
    _parallel._reset_max_team()
    for n in (1, 2):
        with cylstm.threads(n), _threads.force_parallel():     # real teams, however small
            state = lstm.initial_state(B, state=(h0, c0))
            ys = np.stack([lstm.step(x[t], state).copy() for t in range(T)])
        assert ys.dtype == np.dtype(dtype)
        assert rel_err(ys, want_y) < tol, rel_err(ys, want_y)
        assert rel_err(state.h, want_h) < tol and rel_err(state.c, want_c) < tol
        if n == 1:
            first = ys, state.h.copy(), state.c.copy()
        else:                          # bitwise the same on any number of threads
            assert np.array_equal(ys, first[0])
            assert np.array_equal(state.h, first[1]) and np.array_equal(state.c, first[2])
    # the float32 kernels split a step by hidden units; BLAS steps are one call
    if dtype == "float32" and level > 0 and _threads.N_PARTS >= 2 and cylstm.openmp_enabled():
        assert _threads.max_team() == 2


# ---- LSTM.step always reads the current weights and state ---------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_step_sees_weight_changes_in_place_and_replaced(dtype):
    """The compiled step keeps pointers to the model's weight arrays (never copies):
    in-place updates are seen at once; a replaced array makes it rebuild."""
    B, I, H = 2, 6, 8
    lstm = cylstm.LSTM(I, H, num_layers=2, dtype=dtype, seed=5)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((B, I)).astype(dtype)
    zeros = (np.zeros((2, B, H), dtype), np.zeros((2, B, H), dtype))

    def fresh_step():
        """What a step from zeros should give with the model's current weights."""
        y, _, _ = reference_steps(lstm, x[None], *zeros)
        return y[0]

    tol = 1e-5 if dtype == "float32" else 1e-12
    state = lstm.initial_state(B)
    assert rel_err(lstm.step(x, state), fresh_step()) < tol
    # in place: what an optimiser does to flat_params
    lstm.flat_params *= 0.5
    state.reset()
    assert rel_err(lstm.step(x, state), fresh_step()) < tol
    # load_state_dict copies into the same arrays
    sd = {k: rng.standard_normal(v.shape).astype(dtype) * 0.3
          for k, v in lstm.state_dict().items()}
    lstm.load_state_dict(sd)
    state.reset()
    assert rel_err(lstm.step(x, state), fresh_step()) < tol
    # a parameter array replaced by another object
    lstm.params["weight_hh_l1"] = lstm.params["weight_hh_l1"] * -1.0
    state.reset()
    assert rel_err(lstm.step(x, state), fresh_step()) < tol
    # the state's arrays replaced: the step updates the new ones
    state.h = np.zeros_like(state.h)
    state.c = np.zeros_like(state.c)
    y = lstm.step(x, state).copy()
    assert rel_err(y, fresh_step()) < tol and np.array_equal(state.h[-1], y)


def test_step_converts_x_t_as_before():
    """x_t of another dtype, non-contiguous, or a nested list is converted; the fast
    path (a C-contiguous array of the model's dtype) gives the same result."""
    B, I, H = 3, 4, 5
    lstm = cylstm.LSTM(I, H, dtype="float32", seed=7)
    x = np.random.default_rng(8).standard_normal((B, I))
    outs = []
    for xt in (x.astype(np.float32), x, np.asfortranarray(x), x.astype(np.float32).tolist(),
               x.astype(">f4")):
        state = lstm.initial_state(B)
        outs.append(lstm.step(xt, state).copy())
    for o in outs[1:]:
        assert np.array_equal(o, outs[0])
    state = lstm.initial_state(B)
    with pytest.raises(ValueError, match="x_t"):
        lstm.step(np.zeros((B, I + 1), np.float32), state)
    with pytest.raises(ValueError, match="x_t"):
        lstm.step(np.zeros((B + 1, I), np.float32), state)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_copied_state_steps_on_its_own_arrays(dtype):
    """copy.deepcopy of a state that has stepped (e.g. to branch a stream) works, and the
    copy's steps update the copy only, matching the original stepped the same way."""
    import copy
    import pickle
    lstm = cylstm.LSTM(4, 6, num_layers=2, dtype=dtype, seed=9)
    x = np.random.default_rng(10).standard_normal((3, 2, 4)).astype(dtype)
    state = lstm.initial_state(2)
    lstm.step(x[0], state)
    branch = copy.deepcopy(state)
    branch.model = lstm                     # deepcopy copied the model too; use this one
    shallow = copy.copy(state)
    assert shallow.h is state.h
    pickle.loads(pickle.dumps(state))
    before = state.h.copy(), state.c.copy()
    y_branch = lstm.step(x[1], branch).copy()
    assert np.array_equal(state.h, before[0]) and np.array_equal(state.c, before[1])
    y = lstm.step(x[1], state)
    assert np.array_equal(y, y_branch)
    assert np.array_equal(branch.h, state.h) and np.array_equal(branch.c, state.c)


def test_step_weight_order_changes_no_bit():
    """Successive steps read the weight blocks in alternating order (for the cache);
    results are the same bits as always reading them in one order."""
    lstm = cylstm.LSTM(40, 48, num_layers=2, proj_size=16, dtype="float32", seed=11)
    x = np.random.default_rng(12).standard_normal((5, 3, 40)).astype(np.float32)
    outs = []
    try:
        for snake in (True, False):
            _step._set_step_snake(snake)
            state = lstm.initial_state(3)
            outs.append(np.stack([lstm.step(x[t], state).copy() for t in range(5)]))
    finally:
        _step._set_step_snake(True)
    assert np.array_equal(outs[0], outs[1])
