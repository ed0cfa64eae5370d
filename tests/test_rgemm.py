"""The packed per-step kernels (src/cylstm/_rgemm.h), float32 and float64, against a
wider-precision product, on the shapes that exercise their edges: row blocks of 8 and
their remainders 1..7, panels of 16 (float32) or 8 (float64) columns and a ragged last
panel, K = 1, both packing layouts; and each ISA level. Also how float64 packs into the
kernels' float32 scratch (wpack): only when the scratch holds the doubles and there is
no projection, else BLAS, never a write past the scratch."""
import numpy as np
import pytest

from cylstm import _lstm

pytestmark = [
    pytest.mark.skipif(_lstm.rgemm_level() == 0,
                       reason="this CPU runs BLAS for the per-step products"),
    # the SIMD levels of conftest's kernel_level fixture (BLAS is the oracle here)
    pytest.mark.parametrize("kernel_level", [1, 2], ids=["avx2", "avx512"], indirect=True),
]

SHAPES = [(M, N, K) for M in (1, 2, 3, 4, 5, 7, 8, 9, 16, 17)
          for N, K in ((1, 1), (8, 5), (16, 3), (20, 7), (64, 32), (100, 13), (257, 40))]

MATMUL = {np.float32: _lstm._packed_matmul_f32, np.float64: _lstm._packed_matmul_f64}
WIDER = {np.float32: np.float64, np.float64: np.longdouble}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("trans", [True, False], ids=["W^T", "W"])
def test_packed_kernel_matches_blas(kernel_level, trans, dtype):
    rng = np.random.default_rng(0)
    for M, N, K in SHAPES:
        a = rng.standard_normal((M, K)).astype(dtype)
        w = rng.standard_normal((N, K) if trans else (K, N)).astype(dtype)
        W = w.T if trans else w
        want = a.astype(WIDER[dtype]) @ W.astype(WIDER[dtype])
        got = MATMUL[dtype](a, w, trans)
        assert got.shape == (M, N) and got.dtype == dtype
        # one FMA chain over K per element: error ~ K * eps * |a||w|
        bound = 4 * K * np.finfo(dtype).eps * (np.abs(a) @ np.abs(W))
        assert np.all(np.abs(got - want) <= bound + 1e-300), (M, N, K)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_rows_do_not_depend_on_their_neighbours(kernel_level, dtype):
    """A row's result is the same whether it is computed alone or in any row block:
    what makes results independent of how threads split the batch."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((17, 40)).astype(dtype)
    w = rng.standard_normal((100, 40)).astype(dtype)
    mm = MATMUL[dtype]
    full = mm(a, w, True)
    for i in range(17):
        assert np.array_equal(mm(a[i:i + 1], w, True), full[i:i + 1])
    assert np.array_equal(mm(a[3:12], w, True), full[3:12])
    assert np.array_equal(mm(a[9:13], w, True), full[9:13])


def _forward_f64(p, wpack):
    """_lstm.lstm_forward in float64 inference mode on problem p, with this wpack."""
    x, w_ih, w_hh, w_hr = p["x"], p["w_ih"], p["w_hh"], p.get("w_hr")
    T, B, _ = x.shape
    H, Hp = w_hh.shape[0] // 4, w_hh.shape[1]
    P = 0 if w_hr is None else w_hr.shape[0]
    y, h, c = np.empty((T, B, Hp)), np.zeros((B, Hp)), np.zeros((B, H))
    _lstm.lstm_forward(
        y=y, h=h, c=c, gates=np.empty((T, B, 4 * H)), c_cache=None, tc_cache=None,
        m_cache=None, hz=np.empty((B, 4 * H)), mbuf=np.empty((B, H)) if P else None,
        hp=np.empty((B, P)) if P else None, x=x, w_ih=w_ih, w_hh=w_hh, w_hr=w_hr,
        bias=None, lengths=np.full(B, T, np.int32), reverse=False, n_parts=2,
        n_threads=1, wpack=wpack, rmask=None, hm=None, hm_cache=None)
    return y


@pytest.mark.parametrize("proj", [0, 3], ids=["no-proj", "proj"])
def test_float64_packs_only_into_scratch_that_holds_it(kernel_level, proj):
    """float64 packs W_hh's doubles into the float32 scratch when pack_floats_for says
    it fits (the panels are there afterwards, the result is BLAS's to rounding). Given
    float32-sized scratch, or a projection (W_hr's slot would overlap W_hh's doubles),
    the kernel runs BLAS instead: the same bits as no scratch, and nothing written but
    the slots' 16-byte headers."""
    from conftest import make_layer_problem
    T, B, I, H = 6, 5, 4, 8
    p = make_layer_problem(T, B, I, H, seed=3, proj_size=proj or None)
    Hp = proj or H
    shapes = [(Hp, 4 * H)] + ([(H, Hp)] if proj else [])
    blas = _forward_f64(p, None)
    n64 = _lstm.pack_floats_for(shapes, np.float64)
    assert n64 == (0 if proj else 2 * 8 * 4 * H + 32)     # doubles twice, plus the slack
    # with a projection: room for both matrices' doubles, still refused; without one:
    # the float32 size, too small for doubles
    n = _lstm.pack_floats_for(shapes, np.float32) * (4 if proj else 1)
    for size, packs in ((n64, True), (n, False)):
        if size == 0:
            continue
        wpack = np.full(size + 64, np.nan, np.float32)      # + a tail that must stay NaN
        y = _forward_f64(p, wpack[:size])
        assert np.all(np.isnan(wpack[size:]))
        written = np.flatnonzero(~np.isnan(wpack[:size]))
        if packs:
            assert written.size >= 2 * Hp * 4 * H             # the panels
            assert np.abs(y - blas).max() <= 1e-14 * np.abs(blas).max()
        else:
            assert np.array_equal(y, blas)
            assert written.size <= 8            # the 16-byte headers of the two slots
