"""Embedding (cylstm.embedding) and its compiled gather / scatter-add kernels
(cylstm._ops): forward is exactly table[idx]; backward is exactly np.add.at (repeated
indices); parity with torch.nn.Embedding including padding_idx (CI sets
CYLSTM_REQUIRE_TORCH=1 to make a missing torch a failure); bitwise thread invariance;
accumulation; preallocated storage; state dicts; bad input."""
import os

import numpy as np
import pytest

import cylstm
from cylstm import _ops
from cylstm._threads import N_PARTS
from cylstm.embedding import Embedding

DTYPES = ["float32", "float64"]


def _torch():
    if os.environ.get("CYLSTM_REQUIRE_TORCH", "") not in ("", "0"):
        import torch   # must be importable: no skip in CI
        return torch
    return pytest.importorskip("torch")


def add_at_reference(V, D, idx, dout, dtype, padding_idx=None):
    g = np.zeros((V, D), dtype)
    idx = np.asarray(idx).reshape(-1)
    dout = np.asarray(dout, dtype).reshape(-1, D)
    keep = idx != (-1 if padding_idx is None else padding_idx)
    np.add.at(g, idx[keep], dout[keep])
    return g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (1,), (7,), (4, 3), (2, 3, 2), (0,), (3, 0)])
def test_forward_is_exactly_table_lookup(dtype, shape):
    emb = Embedding(11, 5, dtype=dtype, seed=0)
    idx = np.random.default_rng(1).integers(0, 11, size=shape)
    out = emb(idx)
    assert out.shape == shape + (5,) and out.dtype == np.dtype(dtype)
    assert np.array_equal(out, emb.weight[idx])


@pytest.mark.parametrize("itype", [np.int32, np.int64, np.uint8, np.int16, np.uint64, list])
def test_integer_index_types(itype):
    emb = Embedding(9, 3, seed=2)
    idx = np.array([[0, 8, 3], [3, 3, 1]])
    idx_t = idx.tolist() if itype is list else idx.astype(itype)
    out = emb(idx_t)
    assert np.array_equal(out, emb.weight[idx])
    emb.backward(np.ones_like(out))
    assert np.array_equal(emb.grad, add_at_reference(9, 3, idx, np.ones((2, 3, 3)), np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding_idx", [None, 3])
def test_backward_is_exactly_add_at_with_duplicates(dtype, padding_idx):
    V, D = 6, 7
    rng = np.random.default_rng(3)
    idx = rng.integers(0, V, size=(9, 4))           # many duplicates
    idx[0, :] = 3
    emb = Embedding(V, D, dtype=dtype, seed=4, padding_idx=padding_idx)
    dout = rng.standard_normal((9, 4, D))
    emb(idx)
    assert emb.backward(dout) is None
    want = add_at_reference(V, D, idx, dout, dtype, padding_idx)
    assert np.array_equal(emb.grad, want)           # same order of additions: exact
    if padding_idx is not None:
        assert np.all(emb.grad[padding_idx] == 0)


def test_backward_accumulates_and_zero_grad():
    emb = Embedding(5, 4, dtype="float64", seed=5)
    idx = np.array([1, 1, 4, 0, 1])
    dout = np.random.default_rng(6).standard_normal((5, 4))
    emb(idx)
    emb.backward(dout)
    once = emb.grad.copy()
    emb.backward(dout)
    assert np.array_equal(emb.grad, 2 * once)
    emb.zero_grad()
    assert np.all(emb.grad == 0)
    assert np.all(Embedding(5, 4).grad == 0)        # a fresh layer starts at zero


@pytest.mark.parametrize("dtype", DTYPES)
def test_bitwise_identical_for_any_thread_count(dtype, two_thread_teams):
    # N*D above the kernels' one-thread threshold (2**16); D not a multiple of N_PARTS.
    V, D, N = 40, 67, 1501
    rng = np.random.default_rng(7)
    idx = rng.integers(0, V, size=N)
    dout = rng.standard_normal((N, D)).astype(dtype)
    runs = []
    for n in (1, 2, None):
        with cylstm.threads(n):
            emb = Embedding(V, D, dtype=dtype, seed=8, padding_idx=0)
            out = emb(idx)
            emb.backward(dout)
            runs.append((out, emb.grad.copy()))
    for out, grad in runs[1:]:
        assert out.tobytes() == runs[0][0].tobytes()
        assert grad.tobytes() == runs[0][1].tobytes()
    assert np.array_equal(runs[0][1], add_at_reference(V, D, idx, dout, dtype, 0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding_idx", [None, 2, -1])
def test_matches_torch_embedding(dtype, padding_idx):
    torch = _torch()
    V, D = 8, 5
    torch.manual_seed(0)
    tm = torch.nn.Embedding(V, D, padding_idx=padding_idx, dtype=getattr(torch, dtype))
    emb = Embedding(V, D, dtype=dtype, seed=1, padding_idx=padding_idx)
    if padding_idx is not None:
        assert np.all(emb.weight[padding_idx] == 0)
        assert np.all(tm.weight.detach().numpy()[padding_idx] == 0)
    assert emb.load_state_dict(tm.state_dict()) is emb      # tensors, directly
    rng = np.random.default_rng(2)
    idx = rng.integers(0, V, size=(6, 3))
    idx[0] = [2, 7, 7]
    dout = rng.standard_normal((6, 3, D)).astype(dtype)
    yt = tm(torch.tensor(idx))
    (yt * torch.tensor(dout)).sum().backward()
    assert np.array_equal(emb(idx), yt.detach().numpy())
    emb.backward(dout)
    tol = 1e-6 if dtype == "float32" else 1e-13
    assert np.allclose(emb.grad, tm.weight.grad.numpy(), rtol=tol, atol=tol)
    if padding_idx is not None:
        assert np.all(emb.grad[padding_idx] == 0)


def test_init_is_standard_normal_seeded_and_padding_row_zero():
    a = Embedding(300, 100, seed=9)
    b = Embedding(300, 100, seed=9)
    c = Embedding(300, 100, dtype="float64", seed=9, padding_idx=-2)
    assert np.array_equal(a.weight, b.weight)
    assert a.weight.dtype == np.float32 and c.weight.dtype == np.float64
    assert abs(a.weight.mean()) < 0.02 and abs(a.weight.std() - 1) < 0.02
    assert c.padding_idx == 298 and np.all(c.weight[298] == 0)
    assert np.allclose(c.weight[:298], a.weight[:298], rtol=1e-7, atol=0)
    assert not np.array_equal(Embedding(300, 100, seed=10).weight, a.weight)


def test_preallocated_storage_views():
    V, D = 5, 3
    arena = np.full(2 * V * D + 4, 9.0)
    gflat = np.full(V * D, 9.0)
    w = arena[4:4 + V * D].reshape(V, D)
    g = gflat.reshape(V, D)
    emb = Embedding(V, D, dtype="float64", seed=11, weight=w, grad=g, padding_idx=1)

    def same_memory(a, b):
        return a.__array_interface__["data"] == b.__array_interface__["data"] \
            and a.shape == b.shape and a.strides == b.strides
    assert same_memory(emb.weight, w) and same_memory(emb.grad, g)
    assert np.array_equal(w, Embedding(V, D, dtype="float64", seed=11, padding_idx=1).weight)
    assert np.all(g == 0) and np.all(arena[:4] == 9) and np.all(arena[4 + V * D:] == 9)
    emb(np.array([0, 2, 2]))
    emb.backward(np.ones((3, D)))
    assert gflat.reshape(V, D)[2, 0] == 2
    new = np.arange(V * D, dtype=np.float32).reshape(V, D)
    emb.load_state_dict({"weight": new})                  # copied in, never rebound
    assert same_memory(emb.weight, w) and np.array_equal(arena[4:4 + V * D], new.ravel())
    bad = [
        (dict(weight=np.zeros((V, D), np.float32)), ValueError),       # wrong dtype
        (dict(weight=np.zeros((D, V))), ValueError),                   # wrong shape
        (dict(weight=np.zeros((V, 2 * D))[:, ::2]), ValueError),       # not contiguous
        (dict(weight=np.zeros((V, D)).copy().view()), None),
        (dict(grad=[[0.0] * D] * V), TypeError),                       # not an array
        (dict(weight=w, grad=w), ValueError),                          # overlapping
    ]
    ro = np.zeros((V, D))
    ro.flags.writeable = False
    bad.append((dict(grad=ro), ValueError))
    for kw, err in bad:
        if err is None:
            Embedding(V, D, dtype="float64", **kw)
            continue
        with pytest.raises(err, match="weight|grad"):
            Embedding(V, D, dtype="float64", **kw)


def test_params_grads_state_dict():
    emb = Embedding(4, 2, seed=12)
    assert emb.params["weight"] is emb.weight and emb.grads["weight"] is emb.grad
    sd = emb.state_dict()
    assert list(sd) == ["weight"] and not np.shares_memory(sd["weight"], emb.weight)
    other = Embedding(4, 2, seed=13).load_state_dict(sd)
    assert np.array_equal(other.weight, emb.weight)
    with pytest.raises(KeyError):
        other.load_state_dict({"weight": sd["weight"], "bias": np.zeros(2)})
    with pytest.raises(KeyError):
        other.load_state_dict({})
    other.load_state_dict({}, strict=False)
    with pytest.raises(ValueError, match="weight"):
        other.load_state_dict({"weight": np.zeros((2, 4))})
    with pytest.raises(TypeError):
        other.load_state_dict([("weight", sd["weight"])])
    assert "Embedding(4, 2" in repr(emb)
    assert emb.eval().training is False and emb.train().training is True


@pytest.mark.parametrize("idx, err", [
    (np.array([0, 5]), ValueError),
    (np.array([-1, 0]), ValueError),
    (np.array([[0], [2**40]]), ValueError),
    (np.array([2**64 - 1], np.uint64), ValueError),
    (np.array([0.0, 1.0]), TypeError),
    (np.array([True, False]), TypeError),
    ([0, "a"], TypeError),
])
def test_bad_indices_raise_and_change_nothing(idx, err):
    emb = Embedding(5, 3, seed=14)
    good = np.array([1, 2])
    emb(good)
    with pytest.raises(err, match="indices"):
        emb(idx)
    emb.backward(np.ones((2, 3)))                           # still the last good forward
    assert np.array_equal(emb.grad, add_at_reference(5, 3, good, np.ones((2, 3)), np.float32))


def test_bad_dout_and_order_of_calls():
    emb = Embedding(5, 3)
    with pytest.raises(RuntimeError, match="forward"):
        emb.backward(np.ones((1, 3)))
    emb(np.array([[1, 2]]))
    with pytest.raises(ValueError, match="dout"):
        emb.backward(np.ones((2, 3)))
    with pytest.raises(TypeError, match="dout"):
        emb.backward(np.array([[["a"] * 3] * 2]))
    emb.backward(np.ones((1, 2, 3), np.float64))            # other real dtypes convert
    assert emb.grad.dtype == np.float32 and emb.grad[1, 0] == 1


@pytest.mark.parametrize("args, kw, err", [
    ((0, 3), {}, ValueError), ((3, 0), {}, ValueError), ((3.0, 2), {}, TypeError),
    ((3, 2), dict(dtype="int32"), TypeError), ((3, 2), dict(dtype="float16"), TypeError),
    ((3, 2), dict(padding_idx=3), ValueError), ((3, 2), dict(padding_idx=-4), ValueError),
    ((3, 2), dict(padding_idx=1.0), TypeError),
])
def test_bad_constructor_arguments(args, kw, err):
    with pytest.raises(err):
        Embedding(*args, **kw)


def test_kernels_check_their_own_arguments():
    w = np.zeros((4, 3))
    idx = np.array([0, 1], np.int64)
    order = np.array([0, 1], np.int64)
    with pytest.raises(ValueError):
        _ops.embedding_forward(out=np.empty((3, 3)), weight=w, indices=idx,
                               n_parts=N_PARTS, n_threads=1)
    with pytest.raises(ValueError, match="indices"):
        _ops.embedding_forward(out=np.empty((2, 3)), weight=w, indices=np.array([0, 4]),
                               n_parts=N_PARTS, n_threads=1)
    kw = dict(dweight=w, n_parts=N_PARTS, n_threads=1)
    with pytest.raises(ValueError):
        _ops.embedding_backward(dout=np.empty((2, 1, 2)), indices=idx, order=order,
                                padding_idx=-1, **kw)
    with pytest.raises(ValueError):
        _ops.embedding_backward(dout=np.empty((2, 1, 3)), indices=idx, order=order[:1],
                                padding_idx=-1, **kw)
    with pytest.raises(ValueError, match="padding_idx"):
        _ops.embedding_backward(dout=np.empty((2, 1, 3)), indices=idx, order=order,
                                padding_idx=4, **kw)
    with pytest.raises(ValueError, match="indices"):
        _ops.embedding_backward(dout=np.empty((2, 1, 3)),
                                indices=np.array([-1, 0], np.int32),
                                order=order, padding_idx=-1, **kw)
    with pytest.raises(ValueError, match="order"):
        _ops.embedding_backward(dout=np.empty((2, 1, 3)), indices=idx,
                                order=np.array([0, 2]),
                                padding_idx=-1, **kw)


def test_any_order_gives_the_right_sums():
    # the order only groups equal indices; any permutation sums the same values
    V, D, N = 5, 4, 12
    rng = np.random.default_rng(15)
    idx = rng.integers(0, V, N)
    dout = rng.integers(-8, 8, (N, D)).astype(np.float64)   # exact sums in any order
    want = add_at_reference(V, D, idx, dout, np.float64)
    for order in (np.arange(N), rng.permutation(N), np.argsort(idx, kind="stable")):
        g = np.zeros((V, D))
        _ops.embedding_backward(dweight=g, dout=dout[:, None], indices=idx,
                                order=order.astype(np.int64), padding_idx=-1,
                                n_parts=N_PARTS, n_threads=1)
        assert np.array_equal(g, want)


@pytest.mark.parametrize("itype", [np.int32, np.int64])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("V,D", [(3, 1), (40, 67), (9, 150), (5, 64)])
def test_walk_and_sorted_walk_give_the_same_bits(dtype, itype, V, D, two_thread_teams):
    """Without an order the kernel walks dout in row order and sums each index's rows in
    scratch: the same sums, bit for bit, as walking the stable argsort's groups, for D
    over several 64-column chunks, padding, a strided dout and either thread count. The
    scratch starts with garbage: a sum must never read what it did not write."""
    rng = np.random.default_rng(V * D)
    idx = rng.integers(0, V, (7, 61)).astype(itype)                 # (B, T)
    tm = (rng.standard_normal((61, 7, D)) * 10.0 ** rng.integers(-6, 6, (61, 7, 1))
          ).astype(dtype)                                          # values that round
    dout = tm.transpose(1, 0, 2)                                    # read in place
    order = np.argsort(idx.ravel(), kind="stable").astype(np.int64)
    acc, seen = _ops.scatter_scratch(V, D, dtype, N_PARTS)
    for pad in (-1, V // 2):
        base = rng.standard_normal((V, D)).astype(dtype)            # accumulate onto it
        runs = []
        for n in (1, 2):
            for how in ("sorted", "walk"):
                acc.fill(np.nan)
                seen.fill(1)
                g = base.copy()
                _ops.embedding_backward(
                    dweight=g, dout=dout, indices=idx.ravel(), padding_idx=pad,
                    n_parts=N_PARTS, n_threads=n,
                    **(dict(order=order) if how == "sorted" else dict(acc=acc, seen=seen)))
                runs.append(g)
        for g in runs[1:]:
            assert g.tobytes() == runs[0].tobytes()
        want = base + add_at_reference(V, D, idx, dout, dtype, None if pad < 0 else pad)
        np.testing.assert_allclose(runs[0], want, rtol=1e-4 if dtype == np.float32 else 1e-12,
                                   atol=1e-6)
        if pad >= 0:
            assert np.array_equal(runs[0][pad], base[pad])


def test_scatter_scratch_is_the_one_rule_for_the_walk():
    """The walk's sums of one part stay within 64 KiB; above, the layer sorts; the kernel
    refuses a walk without (enough) scratch."""
    assert _ops.scatter_scratch(256, 64, np.float32, 2)[0].shape == (2, 256 * 64)
    assert _ops.scatter_scratch(257, 64, np.float32, 2) is None
    assert _ops.scatter_scratch(128, 64, np.float64, 1)[1].shape == (1, 128)
    assert _ops.scatter_scratch(129, 300, np.float64, 1) is None      # 64 columns a pass
    assert _ops.scatter_scratch(8192, 2, np.float32, 1) is not None
    for V, D in ((256, 64), (257, 64)):                     # either way: np.add.at's bits
        emb = Embedding(V, D, seed=1)
        idx = np.random.default_rng(2).integers(0, V, (5, 40))
        dout = np.random.default_rng(3).standard_normal((5, 40, D)).astype(np.float32)
        emb(idx)
        emb.backward(dout)
        assert np.array_equal(emb.grad, add_at_reference(V, D, idx, dout, np.float32))
        assert (emb._order is None) == (V == 256)
    acc, seen = _ops.scatter_scratch(4, 3, np.float64, N_PARTS)
    kw = dict(dweight=np.zeros((4, 3)), dout=np.zeros((2, 1, 3)),
              indices=np.array([0, 1], np.int64), padding_idx=-1, n_parts=N_PARTS,
              n_threads=1)
    for bad in (dict(), dict(acc=acc), dict(acc=np.zeros((N_PARTS, 5)), seen=seen),
                dict(acc=acc, seen=np.zeros((N_PARTS, 3), np.uint8))):
        with pytest.raises(ValueError, match="scatter_scratch"):
            _ops.embedding_backward(**kw, **bad)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_reads_a_strided_dout_in_place(dtype):
    """dout as the LSTM gives it to a batch-first model (a transposed view of a time-major
    array): the same bits as its contiguous copy, and no copy made."""
    emb = cylstm.Embedding(7, 5, dtype=dtype, seed=0)
    idx = np.random.default_rng(1).integers(0, 7, (4, 9))          # (B, T)
    tm = np.random.default_rng(2).standard_normal((9, 4, 5)).astype(dtype)   # (T, B, D)
    dout = tm.transpose(1, 0, 2)
    assert not dout.flags.c_contiguous
    from cylstm.embedding import _rows3
    assert np.shares_memory(_rows3(dout, 5), dout)                  # read in place
    assert np.shares_memory(_rows3(tm.reshape(-1, 5), 5), tm)
    emb.forward(idx)
    emb.backward(np.ascontiguousarray(dout))
    want = emb.grad.copy()
    emb.zero_grad()
    emb.forward(idx)
    emb.backward(dout)
    assert np.array_equal(emb.grad, want)
    np.testing.assert_allclose(want, add_at_reference(7, 5, idx.ravel(),
                                                      dout.reshape(-1, 5), np.float64),
                               rtol=1e-5)
    for view in (tm[::-1].transpose(1, 0, 2), tm.transpose(1, 0, 2)[::-1, ::2][:, :5],
                 np.broadcast_to(tm[:1, :1], (4, 9, 5))):       # negative, zero strides
        ids = idx[:view.shape[0], :view.shape[1]]
        for d in (np.ascontiguousarray(view), view):
            emb.zero_grad()
            emb.forward(ids)
            emb.backward(d)
            if d is not view:
                want = emb.grad.copy()
        assert np.array_equal(emb.grad, want)


@pytest.mark.parametrize("V", [32768, 32769])
def test_backward_order_is_the_stable_argsort(V):
    """Up to 32768 rows backward sorts the indices as int16: the same permutation."""
    emb = cylstm.Embedding(V, 2, seed=0)
    idx = np.random.default_rng(3).integers(0, V, 5000)
    idx[:3] = [V - 1, 0, V - 1]
    emb.forward(idx)
    emb.backward(np.ones((5000, 2), np.float32))
    assert np.array_equal(emb._order, np.argsort(idx, kind="stable"))
