"""The packed per-step float32 kernel (src/cylstm/_rgemm.h) against BLAS, on the shapes
that exercise its edges: row blocks of 8 and their remainders 1..7, panel groups of 16
columns and a ragged last panel, K = 1, both packing layouts; and each ISA level."""
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
          for N, K in ((1, 1), (16, 3), (20, 7), (64, 32), (100, 13), (257, 40))]


@pytest.mark.parametrize("trans", [True, False], ids=["W^T", "W"])
def test_packed_kernel_matches_blas(kernel_level, trans):
    rng = np.random.default_rng(0)
    for M, N, K in SHAPES:
        a = rng.standard_normal((M, K)).astype(np.float32)
        w = rng.standard_normal((N, K) if trans else (K, N)).astype(np.float32)
        want = a.astype(np.float64) @ (w.T if trans else w).astype(np.float64)
        got = _lstm._packed_matmul_f32(a, w, trans)
        assert got.shape == (M, N)
        # one float32 FMA chain over K per element: error ~ K * eps * |a||w|
        bound = 4 * K * np.finfo(np.float32).eps * (np.abs(a) @ np.abs(w.T if trans else w))
        assert np.all(np.abs(got - want) <= bound + 1e-30), (M, N, K)


def test_rows_do_not_depend_on_their_neighbours(kernel_level):
    """A row's result is the same whether it is computed alone or in any row block:
    what makes results independent of how threads split the batch."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((17, 40)).astype(np.float32)
    w = rng.standard_normal((100, 40)).astype(np.float32)
    full = _lstm._packed_matmul_f32(a, w, True)
    for i in range(17):
        assert np.array_equal(_lstm._packed_matmul_f32(a[i:i + 1], w, True), full[i:i + 1])
    assert np.array_equal(_lstm._packed_matmul_f32(a[3:12], w, True), full[3:12])
