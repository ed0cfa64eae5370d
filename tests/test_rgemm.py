"""The packed per-step kernels (src/cylstm/_rgemm.h), float32 and float64, against a
wider-precision product, on the shapes that exercise their edges: every row-block size
1..8 (blocks of 8, and 9-11 rows left cut in two), panels of 16 (float32) or 8
(float64) columns and a ragged last panel, K = 1, both packing layouts; and each ISA
level. Also how float64 packs into the
kernels' float32 scratch (wpack): only when the scratch holds the doubles and there is
no projection, else BLAS, never a write past the scratch."""
import numpy as np
import pytest

from cylstm import _isa, _lstm

pytestmark = [
    pytest.mark.skipif(_lstm.rgemm_level() == 0,
                       reason="this CPU runs BLAS for the per-step products"),
    # the SIMD levels of conftest's kernel_level fixture (BLAS is the oracle here)
    pytest.mark.parametrize("kernel_level", [1, 2], ids=["avx2", "avx512"], indirect=True),
]

SHAPES = [(M, N, K) for M in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 14, 16, 17, 19)
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


def _packed_reference(w, k0, Kt, width, fill):
    """W^T (K, N), w being W (N, K), as rows [k0, k0 + K) of (Kt, N) panels of `width`
    columns, zero-padded past N, flat, the other rows left at `fill`: what the forward's
    packing must write, and nothing else."""
    N, K = w.shape
    out = np.full((-(-N // width), Kt, width), fill, w.dtype)
    for p in range(out.shape[0]):
        cols = w[p * width:(p + 1) * width].T
        out[p, k0:k0 + K] = 0
        out[p, k0:k0 + K, :cols.shape[1]] = cols
    return out.ravel()


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_packing_is_an_exact_transposed_copy(kernel_level, dtype):
    """The transposing pack (8 x 8 or 4 x 4 register blocks from level 1 on, element by
    element at the edges and at level 0, which this CPU runs too) puts every weight where
    the panel layout says and zeros past N, at every edge: N and K around the block and
    panel sizes, and a pack into the middle rows of taller panels ([W_ih | W_hh] is two
    such packs), which leaves the other rows (NaN here) alone."""
    rng = np.random.default_rng(3)
    width = 16 if dtype == np.float32 else 8
    for level in (0, kernel_level):
        with _isa.use_level(level):
            for N in (1, 3, 4, 7, 8, 9, 15, 16, 17, 24, 33, 100):
                for K in (1, 3, 4, 5, 7, 8, 9, 16, 17, 40):
                    for k0, extra in ((0, 0), (3, 5), (8, 1)):
                        w = rng.standard_normal((N, K)).astype(dtype)
                        Kt = k0 + K + extra
                        got, _ = _lstm._pack_panels(w, k0, Kt, fill=np.nan)
                        want = _packed_reference(w, k0, Kt, width, np.nan)
                        assert np.array_equal(got, want, equal_nan=True), (
                            level, N, K, k0, extra)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_rows_do_not_depend_on_their_neighbours(kernel_level, dtype):
    """A row's result is the same whether it is computed alone or in any row block:
    what makes results independent of how threads split the batch."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((17, 40)).astype(dtype)
    mm = MATMUL[dtype]
    # N = 257: whole groups of panels and a ragged last one for the few-row paths (1-6
    # rows take several panels at once, AVX2's 1-2 rows groups of full panels, also
    # after its 6-row blocks: 7, 8, 13, 14 rows), and 9-11 rows, cut in two blocks
    for n in (100, 257):
        w = rng.standard_normal((n, 40)).astype(dtype)
        full = mm(a, w, True)
        for m in (*range(1, 12), 13, 14):
            for i in range(17 - m + 1):
                assert np.array_equal(mm(a[i:i + m], w, True), full[i:i + m]), (n, m, i)
        assert np.array_equal(mm(a[3:12], w, True), full[3:12])
        assert np.array_equal(mm(a[9:13], w, True), full[9:13])


def _forward(p, wpack, dtype, fused):
    """_lstm.lstm_forward in inference mode on problem p (in dtype), with this wpack; the
    input's product inside each step (fused) or projected before the loop."""
    x, w_ih, w_hh = (p[k].astype(dtype) for k in ("x", "w_ih", "w_hh"))
    w_hr = None if p.get("w_hr") is None else p["w_hr"].astype(dtype)
    T, B, I = x.shape
    H, Hp = w_hh.shape[0] // 4, w_hh.shape[1]
    P = 0 if w_hr is None else w_hr.shape[0]
    y, h, c = (np.empty((T, B, Hp), dtype), np.zeros((B, Hp), dtype),
               np.zeros((B, H), dtype))
    _lstm.lstm_forward(
        y=y, h=h, c=c, gates=None if fused else np.empty((T, B, 4 * H), dtype),
        c_cache=None, tc_cache=None, m_cache=None, hprev=None, xg=None,
        xh=np.empty((B, (I if fused else 0) + Hp), dtype), hz=np.empty((B, 4 * H), dtype),
        mbuf=np.empty((B, H), dtype) if P else None,
        hp=np.empty((B, P), dtype) if P else None, x=x, w_ih=w_ih, w_hh=w_hh,
        w_hr=w_hr, bias=np.zeros(4 * H, dtype), lengths=np.full(B, T, np.int32),
        reverse=False, fused=fused, n_parts=2, n_threads=1, wpack=wpack, rmask=None,
        s0=0, s1=T)
    return y


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("proj", [0, 3], ids=["no-proj", "proj"])
@pytest.mark.parametrize("fused", [True, False], ids=["in-step", "hoisted"])
def test_packed_weights_live_in_scratch_of_the_weights_dtype(kernel_level, dtype, proj,
                                                             fused):
    """Given forward_pack_size (+ pack_size for W_hr) elements of scratch in the weights'
    dtype, the kernels pack [W_ih | W_hh]^T (fused) or W_hh^T (and W_hr^T) there and
    agree with BLAS (no scratch) to rounding; nothing past the scratch is touched; a
    scratch one element short is refused."""
    from conftest import make_layer_problem
    T, B, I, H = 6, 5, 4, 8
    p = make_layer_problem(T, B, I, H, seed=3, proj_size=proj or None)
    Hp = proj or H
    K = (I if fused else 0) + Hp
    n = _lstm.pack_size(K, 4 * H, dtype) + (_lstm.pack_size(H, Hp, dtype) if proj else 0)
    blas = _forward(p, None, dtype, fused)
    tol = 1e-5 if dtype == np.float32 else 1e-13
    if kernel_level == 0:
        assert n == 0
        m = _lstm.forward_pack_size(I, Hp, 4 * H, dtype, fused)
        if not fused:                  # W_hh is read in place by BLAS
            assert m == 0
            return
        # no kernel: the scratch holds [W_ih | W_hh] side by side, one BLAS call a step
        assert m == 4 * H * (I + Hp)
        y = _forward(p, np.empty(m, dtype), dtype, fused)
        assert np.abs(y - blas).max() <= tol * np.abs(blas).max()
        with pytest.raises(ValueError, match="wpack"):
            _forward(p, np.empty(m - 1, dtype), dtype, fused)
        return
    assert n == _lstm.forward_pack_size(I, Hp, 4 * H, dtype, fused) + (
        _lstm.pack_size(H, Hp, dtype) if proj else 0)
    wpack = np.full(n + 64, np.nan, dtype)               # + a tail that must stay NaN
    y = _forward(p, wpack[:n], dtype, fused)
    assert np.all(np.isnan(wpack[n:]))
    assert np.flatnonzero(~np.isnan(wpack[:n])).size >= K * 4 * H + (H * Hp if proj else 0)
    assert np.abs(y - blas).max() <= tol * np.abs(blas).max()
    with pytest.raises(ValueError, match="wpack"):
        _forward(p, wpack[:n - (_lstm.pack_size(H, Hp, dtype) if proj else 1) - 16], dtype,
                 fused)
