"""The backward's own float32 product (src/cylstm/_rgemm.h, cy_bgemm_avx512):
C = [C +] op(A) @ B, the weight gradients' x^T dz and h^T dz (op(A) = A^T) and dx = dz W_ih
(op(A) = A), against a float64 product; and the properties the backward's bitwise claims
rest on: an element's value does not depend on which rows and columns are computed with
it (threads split the columns of dW and the rows of dx), and accumulating K in two calls
gives the bits of one call (time blocks, checkpointed segments)."""
import numpy as np
import pytest

from cylstm import _lstm

# AVX-512 only (conftest's fixture reports a skip where the CPU lacks it)
avx512 = pytest.mark.parametrize("kernel_level", [2], ids=["avx512"], indirect=True)

# rows: 1-6 (one block), 7-11 (two near-equal blocks), more; columns: whole groups of 4
# panels of 16, a partial last panel, fewer than 4 panels; K: 1, around the 512-row pass
SHAPES = [(M, N, K) for M in (1, 2, 3, 5, 6, 7, 9, 11, 12, 13, 20)
          for N, K in ((1, 1), (15, 3), (16, 7), (17, 40), (64, 511), (65, 512), (100, 513),
                       (257, 30))]


def _operands(rng, M, N, K, ta, pad=3):
    """a as the backward passes it: rows with a stride wider than the row (dz's columns
    of one thread), b (K, N), c (M, N)."""
    shape = (K, M) if ta else (M, K)
    wide = rng.standard_normal((shape[0], shape[1] + pad)).astype(np.float32)
    a = wide[:, pad:]
    b = rng.standard_normal((K, N)).astype(np.float32)
    c = rng.standard_normal((M, N)).astype(np.float32)
    return a, b, c


@avx512
@pytest.mark.parametrize("accumulate", [False, True], ids=["C=", "C+="])
@pytest.mark.parametrize("ta", [True, False], ids=["A^T", "A"])
def test_product_matches_float64(kernel_level, ta, accumulate):
    rng = np.random.default_rng(0)
    for M, N, K in SHAPES:
        a, b, c = _operands(rng, M, N, K, ta)
        A = (a.T if ta else a).astype(np.float64)
        want = A @ b + (c if accumulate else 0)
        got = c.copy()
        _lstm._backward_product(a, b, got, ta, accumulate)
        # one FMA chain per element: error ~ K * eps * (|A| |B| + |C|)
        bound = 4 * (K + 1) * np.finfo(np.float32).eps * (
            np.abs(A) @ np.abs(b) + (np.abs(c) if accumulate else 0))
        assert np.all(np.abs(got - want) <= bound), (M, N, K)


@avx512
@pytest.mark.parametrize("ta", [True, False], ids=["A^T", "A"])
def test_empty_sum(kernel_level, ta):
    """K = 0 (a time block with no active row): C stays, or becomes 0."""
    rng = np.random.default_rng(1)
    a, b, c = _operands(rng, 5, 20, 0, ta)
    got = c.copy()
    _lstm._backward_product(a, b, got, ta, True)
    assert np.array_equal(got, c)
    _lstm._backward_product(a, b, got, ta, False)
    assert np.array_equal(got, np.zeros_like(c))


@avx512
@pytest.mark.parametrize("ta", [True, False], ids=["A^T", "A"])
def test_an_element_does_not_depend_on_its_neighbours(kernel_level, ta):
    """Any rows x columns window gives the bits of the whole product: the threads' split
    of dW's columns and dx's rows never changes a value."""
    rng = np.random.default_rng(2)
    M, N, K = 19, 150, 600
    a, b, _ = _operands(rng, M, N, K, ta)
    full = np.empty((M, N), np.float32)
    _lstm._backward_product(a, b, full, ta, False)
    for m0, m1 in ((0, 1), (0, 7), (3, 12), (5, 19), (18, 19)):
        for n0, n1 in ((0, 16), (0, 150), (16, 80), (7, 93), (149, 150), (64, 150)):
            sa = a[:, m0:m1] if ta else a[m0:m1]
            part = np.empty((m1 - m0, n1 - n0), np.float32)
            _lstm._backward_product(sa, np.ascontiguousarray(b[:, n0:n1]), part, ta, False)
            assert np.array_equal(part, full[m0:m1, n0:n1]), (m0, m1, n0, n1)


@avx512
@pytest.mark.parametrize("ta", [True, False], ids=["A^T", "A"])
def test_accumulating_in_two_calls_gives_the_bits_of_one(kernel_level, ta):
    """C over K1 rows, then += the next K2 rows: the same bits as one call over K1 + K2
    (the weight-gradient sums across time blocks and checkpointed segments)."""
    rng = np.random.default_rng(3)
    M, N, K = 13, 70, 1300
    a, b, _ = _operands(rng, M, N, K, ta)
    one = np.empty((M, N), np.float32)
    _lstm._backward_product(a, b, one, ta, False)
    for k1 in (1, 300, 512, 700, 1024, 1299):
        two = np.empty((M, N), np.float32)
        if ta:
            _lstm._backward_product(a[:k1], b[:k1], two, ta, False)
            _lstm._backward_product(a[k1:], b[k1:], two, ta, True)
        else:
            _lstm._backward_product(a[:, :k1], b[:k1], two, ta, False)
            _lstm._backward_product(a[:, k1:], b[k1:], two, ta, True)
        assert np.array_equal(two, one), k1


def test_refused_below_avx512():
    """Below level 2 the backward runs BLAS, and the hook says there is no kernel."""
    from cylstm import _isa
    with _isa.use_level(0):
        with pytest.raises(RuntimeError, match="level"):
            _lstm._backward_product(np.ones((2, 2), np.float32), np.ones((2, 2), np.float32),
                                    np.ones((2, 2), np.float32), False, False)
