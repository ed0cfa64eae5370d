"""Losses and metrics (cylstm.losses) and the compiled cross-entropy kernel (cylstm._ops):
against a plain NumPy implementation, against torch when it is installed (CI sets
CYLSTM_REQUIRE_TORCH=1, which turns a missing torch into a failure instead of a skip),
against central finite differences (float64), with huge logits, masks, ignore_index,
nothing to count, bitwise thread invariance, and bad input."""
import math
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cylstm
from cylstm import _ops
from cylstm import losses as L
from cylstm._threads import N_PARTS

from conftest import rel_err

DTYPES = [np.float32, np.float64]
TOL = {np.float32: 1e-5, np.float64: 1e-12}


def _torch():
    if os.environ.get("CYLSTM_REQUIRE_TORCH", "") not in ("", "0"):
        import torch   # must be importable: no skip in CI
        return torch
    return pytest.importorskip("torch")


# ---- a plain NumPy reference ----------------------------------------------------------------

def ref_cross_entropy(logits, targets, mask=None, ignore_index=-100, reduction="mean"):
    """softmax cross-entropy in float64, the textbook way (one row at a time)."""
    C = logits.shape[-1]
    z = np.asarray(logits, np.float64).reshape(-1, C)
    t = np.asarray(targets).reshape(-1)
    w = np.ones(len(t)) if mask is None else np.broadcast_to(
        np.asarray(mask, np.float64), np.shape(targets)).reshape(-1)
    loss = np.zeros(len(t))
    grad = np.zeros_like(z)
    for n in range(len(t)):
        if t[n] == ignore_index or w[n] == 0:
            continue
        m = z[n].max()
        p = np.exp(z[n] - m)
        lse = m + np.log(p.sum())
        loss[n] = w[n] * (lse - z[n, t[n]])
        grad[n] = w[n] * p / p.sum()
        grad[n, t[n]] -= w[n]
    wsum = sum(w[n] for n in range(len(t)) if t[n] != ignore_index and w[n] != 0)
    if reduction == "mean":
        scale = 1 / wsum if wsum > 0 else 0.0
        return loss.sum() * scale, (grad * scale).reshape(np.shape(logits))
    if reduction == "sum":
        return loss.sum(), grad.reshape(np.shape(logits))
    return loss.reshape(np.shape(targets)), grad.reshape(np.shape(logits))


def problem(shape, C, *, seed, dtype=np.float64, scale=2.0, ignore_frac=0.0):
    rng = np.random.default_rng(seed)
    z = (scale * rng.standard_normal(shape + (C,))).astype(dtype)
    t = rng.integers(0, C, size=shape)
    if ignore_frac:
        t[rng.random(shape) < ignore_frac] = -100
    return z, t


SHAPES = {"NC": (7,), "TBC": (4, 3), "one-row": (), "N1": (1,)}


# ---- cross-entropy: values and gradients ----------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_cross_entropy_matches_numpy_reference(dtype, reduction, shape):
    z, t = problem(shape, 5, seed=1, dtype=dtype, ignore_frac=0.2 if shape else 0.0)
    loss, dz = L.softmax_cross_entropy(z, t, reduction=reduction)
    want_loss, want_dz = ref_cross_entropy(z, t, reduction=reduction)
    assert dz.shape == z.shape and dz.dtype == dtype
    assert rel_err(loss, want_loss) < TOL[dtype]
    assert rel_err(dz, want_dz) < TOL[dtype]
    if reduction == "none":
        assert loss.shape == t.shape and loss.dtype == dtype
    else:
        assert isinstance(loss, float)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_with_mask_weights_matches_reference(dtype, reduction):
    z, t = problem((5, 4), 6, seed=2, dtype=dtype, ignore_frac=0.2)
    rng = np.random.default_rng(3)
    w = rng.uniform(0.5, 2.0, (5, 4))
    w[rng.random((5, 4)) < 0.3] = 0
    loss, dz = L.softmax_cross_entropy(z, t, mask=w, reduction=reduction)
    want_loss, want_dz = ref_cross_entropy(z, t, w, reduction=reduction)
    assert rel_err(loss, want_loss) < TOL[dtype]
    assert rel_err(dz, want_dz) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_cross_entropy_matches_torch(dtype, reduction, ignore_index):
    torch = _torch()
    z, t = problem((6, 3), 5, seed=4, dtype=dtype, ignore_frac=0.25)
    t[t == -100] = ignore_index
    loss, dz = L.softmax_cross_entropy(z, t, ignore_index=ignore_index, reduction=reduction)
    zt = torch.tensor(z.reshape(-1, 5), requires_grad=True)
    lt = torch.nn.functional.cross_entropy(zt, torch.tensor(t.reshape(-1)),
                                           ignore_index=ignore_index, reduction=reduction)
    lt.sum().backward()
    assert rel_err(np.asarray(loss).reshape(-1), lt.detach().numpy().reshape(-1)) < TOL[dtype] * 10
    assert rel_err(dz.reshape(-1, 5), zt.grad.numpy()) < TOL[dtype] * 10


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_gradient_vs_finite_differences(reduction):
    z, t = problem((3, 4), 5, seed=5, ignore_frac=0.2)
    w = np.random.default_rng(6).uniform(0.0, 2.0, (3, 4))
    w[0, 1] = 0
    _, dz = L.softmax_cross_entropy(z, t, mask=w, reduction=reduction)
    eps = 1e-6
    num = np.zeros_like(z)
    for k in np.ndindex(*z.shape):
        zp = z.copy()
        zp[k] += eps
        zm = z.copy()
        zm[k] -= eps
        num[k] = (L.softmax_cross_entropy(zp, t, mask=w, reduction=reduction)[0]
                  - L.softmax_cross_entropy(zm, t, mask=w, reduction=reduction)[0]) / (2 * eps)
    assert np.abs(num).max() > 0
    assert rel_err(dz, num) < 1e-7


@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_logits_give_finite_exact_results(dtype):
    z = np.array([[1e30, -1e30, 0.0], [1e30, -1e30, 0.0], [-1e30, -1e30, 1e30]], dtype)
    t = np.array([0, 1, 1])
    loss, dz = L.softmax_cross_entropy(z, t, reduction="none")
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(dz))
    assert loss[0] == 0 and rel_err(loss[1], 2e30) < 1e-6 and rel_err(loss[2], 2e30) < 1e-6
    want = np.array([[0, 0, 0], [1, -1, 0], [0, -1, 1]], dtype)
    assert np.abs(dz - want).max() < 1e-30
    mean, dmean = L.softmax_cross_entropy(z, t)
    assert math.isfinite(mean) and np.all(np.isfinite(dmean))


def test_minus_inf_at_a_non_target_logit_is_allowed():
    z = np.array([[0.0, -np.inf, 0.0]])
    loss, dz = L.softmax_cross_entropy(z, [0])
    assert loss == pytest.approx(math.log(2)) and np.allclose(dz, [[-0.5, 0, 0.5]])


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_and_ignored_rows_contribute_nothing(dtype):
    z, t = problem((6, 4), 5, seed=7, dtype=dtype)
    mask = np.ones((6, 4), bool)
    mask[4:, :] = False                 # padded steps
    t2 = t.copy()
    t2[0, 0] = -100                     # an ignored target
    z_pad = z.copy()
    z_pad[4:] = np.nan                  # padding may hold anything
    z_pad[0, 0] = np.inf
    t2[5, 3] = 99                       # a padded target out of range is never read
    loss, dz = L.softmax_cross_entropy(z_pad, t2, mask=mask)
    keep = mask.copy()
    keep[0, 0] = False
    want, dwant = L.softmax_cross_entropy(z[keep], t[keep])
    assert rel_err(loss, want) < TOL[dtype]
    assert np.all(dz[~keep] == 0)
    assert rel_err(dz[keep], dwant) < TOL[dtype]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nothing_counted_gives_zero_loss_and_zero_grad(reduction):
    # A documented choice: 0 and a zero gradient (torch's mean is NaN there, 0/0).
    z, t = problem((3, 2), 4, seed=8)
    for tt, mask in [(np.full_like(t, -100), None), (t, np.zeros(t.shape))]:
        loss, dz = L.softmax_cross_entropy(z, tt, mask=mask, reduction=reduction)
        assert np.all(np.asarray(loss) == 0) and np.all(dz == 0)
    loss, dz = L.softmax_cross_entropy(np.zeros((0, 4)), np.zeros(0, int), reduction=reduction)
    assert np.all(np.asarray(loss) == 0) and dz.shape == (0, 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_bitwise_identical_for_any_thread_count(
        dtype, reduction, two_thread_teams, kernel_level):
    # N*C above the kernel's one-thread threshold (2**14), N not a multiple of N_PARTS.
    z, t = problem((601,), 97, seed=9, dtype=dtype, ignore_frac=0.1)
    mask = np.random.default_rng(10).random(601) < 0.9
    runs = []
    for n in (1, 2, None):
        with cylstm.threads(n):
            ce = L.CrossEntropyLoss(reduction=reduction)
            loss = ce(z, t, mask)
            runs.append((np.asarray(loss), ce.backward(), ce.n_correct))
    for loss, dz, hits in runs[1:]:
        assert loss.tobytes() == runs[0][0].tobytes()
        assert dz.tobytes() == runs[0][1].tobytes()
        assert hits == runs[0][2]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_without_gradient_the_loss_and_counts_are_bitwise_the_same(
        dtype, reduction, two_thread_teams, kernel_level):
    # what evaluate uses: dlogits None, one scratch row per block
    z, t = problem((7, 89), 97, seed=21, dtype=dtype, ignore_frac=0.1)
    z[0, 3, 5] = np.inf                   # a non-finite logit in an ignored row is fine
    t[0, 3] = -100
    mask = np.random.default_rng(22).random((7, 89)) < 0.8
    for n in (1, 2):
        with cylstm.threads(n):
            want = L._cross_entropy(z, t, mask, -100, reduction)
            got = L._cross_entropy(z, t, mask, -100, reduction, grad=False)
        assert got[1] is None and want[1] is not None
        assert np.asarray(got[0]).tobytes() == np.asarray(want[0]).tobytes()
        assert got[2:] == want[2:] and want[3] > 0
    z[1, 2, 0] = np.nan                   # a counted bad row still raises
    t[1, 2], mask[1, 2] = 0, True
    with pytest.raises(ValueError, match="logits must be finite"):
        L._cross_entropy(z, t, mask, -100, reduction, grad=False)


def test_int32_and_other_integer_targets_and_layouts_give_the_same_result():
    z, t = problem((5, 4), 6, seed=11)
    want = L.softmax_cross_entropy(z, t)
    for tt in (t.astype(np.int32), t.astype(np.uint8), t.astype(np.int16), t.tolist(),
               t.astype(">i8")):
        got = L.softmax_cross_entropy(z, tt)
        assert got[0] == want[0] and np.array_equal(got[1], want[1])
    zf = np.asfortranarray(z)
    zs = np.ascontiguousarray(z[:, ::-1])[:, ::-1]          # negative strides
    zb = z.astype(">f8")                                     # big-endian
    for zz in (zf, zs, z.tolist(), zb):
        got = L.softmax_cross_entropy(zz, t)
        assert got[0] == want[0] and np.array_equal(got[1], want[1])


def test_out_receives_the_gradient():
    z, t = problem((4,), 3, seed=12)
    out = np.full_like(z, 7.0)
    loss, dz = L.softmax_cross_entropy(z, t, out=out)
    assert dz is out or np.shares_memory(dz, out)
    assert np.array_equal(out, L.softmax_cross_entropy(z, t)[1])
    with pytest.raises(ValueError, match="out"):
        L.softmax_cross_entropy(z, t, out=np.empty((4, 3), np.float32))
    with pytest.raises(ValueError, match="overlap"):
        L.softmax_cross_entropy(z, t, out=z)


# ---- cross-entropy: bad input ---------------------------------------------------------------

@pytest.mark.parametrize("bad", [5, -1, 10**6, -101])
def test_out_of_range_targets_raise(bad):
    z, t = problem((4,), 5, seed=13)
    t[2] = bad
    with pytest.raises(ValueError, match="targets"):
        L.softmax_cross_entropy(z, t)
    with pytest.raises(ValueError, match="targets"):
        L.accuracy(z, t)
    with pytest.raises(ValueError, match="targets"):
        L.softmax_cross_entropy(z, t.astype(np.int32))


def test_non_finite_logits_in_counted_rows_raise():
    z, t = problem((4,), 5, seed=14)
    for v in (np.nan, np.inf):
        zz = z.copy()
        zz[1, 2] = v
        with pytest.raises(ValueError, match="logits"):
            L.softmax_cross_entropy(zz, t)
    zz = z.copy()
    zz[1, t[1]] = -np.inf              # -inf at the target: infinite loss
    with pytest.raises(ValueError, match="logits"):
        L.softmax_cross_entropy(zz, t)


@pytest.mark.parametrize("logits, targets, err, name", [
    (np.zeros((3, 4), np.int64), [0, 1, 2], TypeError, "logits"),
    (np.zeros((3, 4), np.float16), [0, 1, 2], TypeError, "logits"),
    (np.zeros((3, 4), complex), [0, 1, 2], TypeError, "logits"),
    (np.zeros((3, 4)), [0.0, 1.0, 2.0], TypeError, "targets"),
    (np.zeros((3, 4)), np.array([True, False, True]), TypeError, "targets"),
    (np.zeros((3, 4)), [0, 1], ValueError, "targets"),
    (np.zeros((3, 4)), [[0, 1, 2]], ValueError, "targets"),
    (np.zeros((3, 0)), [0, 1, 2], ValueError, "logits"),
    (np.float64(1.0), 0, ValueError, "logits"),
])
def test_bad_logits_or_targets(logits, targets, err, name):
    with pytest.raises(err, match=name):
        L.softmax_cross_entropy(logits, targets)


@pytest.mark.parametrize("mask, err", [
    (np.ones(4), ValueError), (np.array([1.0, -1.0, 1.0]), ValueError),
    (np.array([1.0, np.nan, 1.0]), ValueError), (np.array(["a", "b", "c"]), TypeError),
])
def test_bad_mask(mask, err):
    with pytest.raises(err, match="mask"):
        L.softmax_cross_entropy(np.zeros((3, 4)), [0, 1, 2], mask=mask)


def test_bad_reduction_and_ignore_index():
    with pytest.raises(ValueError, match="reduction"):
        L.softmax_cross_entropy(np.zeros((3, 4)), [0, 1, 2], reduction="avg")
    with pytest.raises(TypeError, match="ignore_index"):
        L.softmax_cross_entropy(np.zeros((3, 4)), [0, 1, 2], ignore_index=1.5)
    with pytest.raises(ValueError, match="reduction"):
        L.CrossEntropyLoss(reduction="max")


def test_kernel_checks_its_own_shapes():
    z = np.zeros((3, 4))
    kw = dict(row_loss=None, block_loss=np.empty(N_PARTS),
              block_stats=np.empty((N_PARTS, 2), np.int64),
              logits=z, weight=None, ignore_index=-100, mean=True, n_parts=N_PARTS, n_threads=1)
    with pytest.raises(ValueError):
        _ops.softmax_xent(dlogits=np.empty((2, 4)), targets=np.zeros(3, np.int64), **kw)
    with pytest.raises(ValueError):
        _ops.softmax_xent(dlogits=np.empty((3, 4)), targets=np.zeros(2, np.int64), **kw)
    with pytest.raises(ValueError, match="targets"):
        _ops.softmax_xent(dlogits=np.empty((3, 4)), targets=np.array([0, 4, 0]), **kw)
    for scratch in (None, np.empty((N_PARTS, 3)), np.empty((N_PARTS - 1, 4))):
        with pytest.raises(ValueError, match="scratch must have shape"):
            _ops.softmax_xent(dlogits=None, scratch=scratch, targets=np.zeros(3, np.int64),
                              **kw)


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(0, 4), min_size=0, max_size=3), C=st.integers(1, 6),
       seed=st.integers(0, 2**16), reduction=st.sampled_from(["mean", "sum", "none"]),
       masked=st.booleans())
def test_random_shapes_match_the_reference(shape, C, seed, reduction, masked):
    shape = tuple(shape)
    z, t = problem(shape, C, seed=seed, ignore_frac=0.2 if shape else 0.0)
    mask = (np.random.default_rng(seed + 1).random(shape) < 0.7) if masked else None
    loss, dz = L.softmax_cross_entropy(z, t, mask=mask, reduction=reduction)
    want_loss, want_dz = ref_cross_entropy(z, t, mask, reduction=reduction)
    assert rel_err(loss, want_loss) < 1e-12 and rel_err(dz, want_dz) < 1e-12


# ---- mean squared error ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_matches_torch(dtype, reduction):
    torch = _torch()
    rng = np.random.default_rng(20)
    p, y = rng.standard_normal((2, 4, 3, 5)).astype(dtype)
    loss, dp = L.mse(p, y, reduction=reduction)
    pt = torch.tensor(p, requires_grad=True)
    lt = torch.nn.MSELoss(reduction=reduction)(pt, torch.tensor(y))
    lt.sum().backward()
    assert dp.dtype == dtype and dp.shape == p.shape
    assert rel_err(loss, lt.detach().numpy()) < TOL[dtype] * 10
    assert rel_err(dp, pt.grad.numpy()) < TOL[dtype] * 10


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mse_gradient_vs_finite_differences(reduction):
    rng = np.random.default_rng(21)
    p, y = rng.standard_normal((2, 3, 2, 4))
    mask = rng.uniform(0, 2, (3, 2))
    mask[1, 0] = 0
    _, dp = L.mse(p, y, mask, reduction)
    eps = 1e-6
    num = np.zeros_like(p)
    for k in np.ndindex(*p.shape):
        pp, pm = p.copy(), p.copy()
        pp[k] += eps
        pm[k] -= eps
        num[k] = (L.mse(pp, y, mask, reduction)[0] - L.mse(pm, y, mask, reduction)[0]) / (2 * eps)
    assert rel_err(dp, num) < 1e-7


def test_mse_mask_counts_each_feature_of_a_counted_step():
    rng = np.random.default_rng(22)
    p, y = rng.standard_normal((2, 4, 3, 5))          # (T, B, F)
    mask = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]], bool)
    loss, dp = L.mse(p, y, mask)
    d = (p - y)[mask]                                  # (counted steps, F)
    assert loss == pytest.approx(np.mean(d ** 2), rel=1e-13)
    assert np.all(dp[~mask] == 0)
    assert np.allclose(dp[mask], 2 * d / d.size, rtol=1e-13, atol=0)
    p_pad = p.copy()
    p_pad[~mask] = np.nan                              # padding may hold anything
    y_pad = y.copy()
    y_pad[~mask] = np.inf
    loss_pad, dp_pad = L.mse(p_pad, y_pad, mask)
    assert loss_pad == loss and np.array_equal(dp_pad, dp)
    # a trailing-broadcast mask (F,) weights features
    w = np.array([1.0, 0.0, 2.0, 0.0, 1.0])
    loss, dp = L.mse(p, y, w)
    assert loss == pytest.approx(np.sum(w * (p - y) ** 2) / (w.sum() * 12), rel=1e-13)


def test_mse_nothing_counted_and_bad_input():
    p = np.ones((2, 3))
    assert L.mse(p, p * 0, mask=np.zeros(2))[0] == 0.0
    assert np.all(L.mse(p, p * 0, mask=np.zeros(2))[1] == 0)
    with pytest.raises(ValueError, match="target"):
        L.mse(p, np.ones((3, 2)))
    with pytest.raises(TypeError, match="pred"):
        L.mse(np.ones((2, 3), int), p)
    with pytest.raises(ValueError, match="mask"):
        L.mse(p, p, mask=np.ones(4))
    with pytest.raises(ValueError, match="mask"):
        L.mse(p, p, mask=-np.ones(2))


# ---- metrics --------------------------------------------------------------------------------

def test_accuracy_on_a_hand_example():
    z = np.array([[0.1, 0.9, 0.0],      # argmax 1
                  [2.0, 1.0, 2.0],      # tie: first maximum, 0
                  [0.0, 0.0, 5.0],      # argmax 2
                  [3.0, 0.0, 0.0]])     # argmax 0
    t = np.array([1, 2, 2, 1])
    assert L.accuracy(z, t) == 0.5
    assert L.accuracy(z, [1, 0, 2, -100]) == 1.0
    assert L.accuracy(z, t, mask=[1, 0, 1, 0]) == 1.0
    assert L.accuracy(z, np.full(4, -100)) == 0.0                  # nothing counted
    assert L.accuracy(z.reshape(2, 2, 3), t.reshape(2, 2)) == 0.5
    ce = L.CrossEntropyLoss()
    ce(z, t)
    assert (ce.n_correct, ce.n_counted) == (2, 4)                  # the kernel agrees


def test_perplexity_and_bits_per_char():
    assert L.perplexity(0.0) == 1.0
    assert L.perplexity(math.log(4)) == pytest.approx(4.0, rel=1e-15)
    assert L.perplexity(1e6) == math.inf
    assert L.bits_per_char(math.log(2)) == pytest.approx(1.0, rel=1e-15)
    assert L.bits_per_char(math.log(256)) == pytest.approx(8.0, rel=1e-15)
    assert L.bits_per_char(np.float32(0.0)) == 0.0
    assert np.allclose(L.perplexity(np.log([2.0, 3.0])), [2.0, 3.0])
    # a model that spreads its mass evenly over C classes has perplexity C
    loss, _ = L.softmax_cross_entropy(np.zeros((5, 7)), [0, 1, 2, 3, 4])
    assert L.perplexity(loss) == pytest.approx(7.0, rel=1e-14)
    assert L.bits_per_char(loss) == pytest.approx(math.log2(7), rel=1e-14)
    with pytest.raises(TypeError, match="mean_ce"):
        L.perplexity("1.0")
    with pytest.raises(ValueError, match="mean_ce"):
        L.bits_per_char(float("nan"))


# ---- loss objects ---------------------------------------------------------------------------

def test_loss_objects_keep_the_last_gradient():
    z, t = problem((3,), 4, seed=30)
    ce = L.CrossEntropyLoss(ignore_index=1)
    with pytest.raises(RuntimeError, match="forward"):
        ce.backward()
    loss = ce.forward(z, t)
    want = L.softmax_cross_entropy(z, t, ignore_index=1)
    assert loss == want[0] and np.array_equal(ce.backward(), want[1])
    assert "ignore_index=1" in repr(ce)
    m = L.MSELoss()
    y = np.ones_like(z)
    assert m(z, y) == L.mse(z, y)[0] and np.array_equal(m.backward(), L.mse(z, y)[1])
    assert L.MSELoss(reduction="sum")(z, y) == pytest.approx(np.sum((z - 1) ** 2), rel=1e-14)
