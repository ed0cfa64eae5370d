"""Parity with torch.nn.LSTM: the same weights (loaded from torch's state_dict, tensors
directly) give the same outputs, final states and gradients (of a random linear loss),
across layers, directions, packed variable lengths, batch_first, bias and dtypes.

Without torch these tests skip; CI sets CYLSTM_REQUIRE_TORCH=1, which turns a missing
or broken torch into a failure instead of a silent skip."""
import os

import numpy as np
import pytest

if os.environ.get("CYLSTM_REQUIRE_TORCH", "") not in ("", "0"):
    import torch  # noqa: E402  (must be importable: no skip in CI)
else:
    torch = pytest.importorskip("torch")

import cylstm

from conftest import rel_err

# docs/math.md: float32 under 1e-5 relative to the largest magnitude, float64 under 1e-10.
TOL = {"float32": 1e-5, "float64": 1e-10}
TORCH_DTYPE = {"float32": torch.float32, "float64": torch.float64}

T, B, I, H = 6, 5, 3, 4
LENGTHS = [6, 2, 5, 1, 4]      # unsorted: needs enforce_sorted=False


def build(num_layers, bidirectional, bias, batch_first, dtype, seed):
    torch.manual_seed(seed)
    tm = torch.nn.LSTM(I, H, num_layers=num_layers, bias=bias, batch_first=batch_first,
                       bidirectional=bidirectional, dtype=TORCH_DTYPE[dtype])
    cm = cylstm.LSTM(I, H, num_layers=num_layers, bias=bias, batch_first=batch_first,
                     bidirectional=bidirectional, dtype=dtype, seed=seed + 1)
    assert not np.allclose(cm.params["weight_hh_l0"],
                           tm.weight_hh_l0.detach().numpy())   # loading is what aligns them
    assert cm.load_state_dict(tm.state_dict()) is cm
    return tm, cm


def torch_run(tm, x, state, lengths, R1, R2, R3, batch_first):
    """torch forward (packed when lengths are given) and backward of
    sum(y R1) + sum(h_n R2) + sum(c_n R3)."""
    xt = torch.tensor(x, requires_grad=True)
    st = None
    if state is not None:
        st = tuple(torch.tensor(s, requires_grad=True) for s in state)
    if lengths is None:
        y, (h_n, c_n) = tm(xt, st)
    else:
        packed = torch.nn.utils.rnn.pack_padded_sequence(
            xt, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=False)
        yp, (h_n, c_n) = tm(packed, st)
        y, _ = torch.nn.utils.rnn.pad_packed_sequence(yp, batch_first=batch_first,
                                                      total_length=x.shape[1 if batch_first else 0])
    loss = (y * torch.tensor(R1)).sum() + (h_n * torch.tensor(R2)).sum() \
        + (c_n * torch.tensor(R3)).sum()
    tm.zero_grad()
    loss.backward()
    out = dict(y=y, h_n=h_n, c_n=c_n, dx=xt.grad)
    if st is not None:
        out.update(dh0=st[0].grad, dc0=st[1].grad)
    out.update({name: p.grad for name, p in tm.named_parameters()})
    return {k: v.detach().numpy() for k, v in out.items()}


def cylstm_run(cm, x, state, lengths, R1, R2, R3):
    y, (h_n, c_n) = cm(x, state, lengths)
    cm.zero_grad()
    dx, (dh0, dc0) = cm.backward(R1, (R2, R3))
    out = dict(y=y, h_n=h_n, c_n=c_n, dx=dx)
    if state is not None:
        out.update(dh0=dh0, dc0=dc0)
    out.update({k: v.copy() for k, v in cm.grads.items()})
    return out


def assert_matches_torch(got, want, dtype, T, lengths, batch_first):
    """Every result of torch (`want`) against cylstm's (`got`): same shape, cylstm's dtype,
    relative difference under TOL[dtype]; with lengths (T steps, packed in torch), the
    padded positions of y and dx are exactly zero."""
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert got[name].dtype == np.dtype(dtype), name
        assert np.abs(want[name]).max() > 0, name        # not a vacuous comparison
        err = rel_err(got[name], want[name])
        assert err < TOL[dtype], f"{name}: relative difference {err:.2e} (tol {TOL[dtype]:.0e})"
    if lengths is not None:
        t_axis = 1 if batch_first else 0
        pad = np.moveaxis(np.arange(T)[:, None] >= np.array(lengths), 0, t_axis)
        assert np.all(got["y"][pad] == 0) and np.all(got["dx"][pad] == 0)


def compare(num_layers, bidirectional, bias, batch_first, with_state, packed, dtype,
            seed=0, unbatched=False):
    tm, cm = build(num_layers, bidirectional, bias, batch_first, dtype, seed)
    L, D = num_layers, 2 if bidirectional else 1
    rng = np.random.default_rng(seed + 100)
    if unbatched:
        xshape, sshape, yshape = (T, I), (L * D, H), (T, D * H)
    else:
        xshape = (B, T, I) if batch_first else (T, B, I)
        sshape = (L * D, B, H)
        yshape = (B, T, D * H) if batch_first else (T, B, D * H)
    x = rng.standard_normal(xshape).astype(dtype)
    state = None
    if with_state:
        state = tuple(rng.standard_normal(sshape).astype(dtype) for _ in range(2))
    R1 = rng.standard_normal(yshape).astype(dtype)
    R2, R3 = (rng.standard_normal(sshape).astype(dtype) for _ in range(2))
    lengths = LENGTHS if packed else None

    want = torch_run(tm, x, state, lengths, R1, R2, R3, batch_first)
    got = cylstm_run(cm, x, state, lengths, R1, R2, R3)
    assert set(got) == set(want)
    assert set(cm.grads) == {n for n, _ in tm.named_parameters()}
    assert_matches_torch(got, want, dtype, T, lengths, batch_first)


DT = pytest.mark.parametrize("dtype", ["float32", "float64"])


@DT
@pytest.mark.parametrize("with_state", [False, True], ids=["nostate", "h0c0"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_one_layer_one_direction(with_state, bias, dtype):
    compare(1, False, bias, False, with_state, False, dtype, seed=1)


@DT
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["tmajor", "bfirst"])
@pytest.mark.parametrize("with_state", [False, True], ids=["nostate", "h0c0"])
def test_packed_variable_lengths(with_state, batch_first, bidirectional, dtype):
    """pack_padded_sequence(enforce_sorted=False) / pad_packed_sequence(total_length=T)
    against lengths=: outputs zero past each length, h_n the state at the last valid step,
    the reverse direction over each sequence's own steps."""
    compare(1, bidirectional, True, batch_first, with_state, True, dtype, seed=2)


@DT
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_layers_and_directions(num_layers, bidirectional, dtype):
    compare(num_layers, bidirectional, True, False, True, False, dtype, seed=3)


@DT
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_two_layers_packed_batch_first_no_bias(bidirectional, dtype):
    compare(2, bidirectional, False, True, True, True, dtype, seed=4)


@DT
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_unbatched_input(bidirectional, dtype):
    compare(2, bidirectional, True, False, True, False, dtype, seed=5, unbatched=True)


def test_state_dict_names_order_and_round_trip():
    """cylstm's state_dict has torch's keys in torch's order, and loads back into torch."""
    tm, cm = build(2, True, True, False, "float32", seed=6)
    assert list(cm.state_dict()) == list(tm.state_dict())
    torch.manual_seed(7)
    tm2 = torch.nn.LSTM(I, H, num_layers=2, bidirectional=True)
    tm2.load_state_dict({k: torch.from_numpy(v) for k, v in cm.state_dict().items()})
    for k, v in tm.state_dict().items():
        assert torch.equal(v, tm2.state_dict()[k]), k
    # requires_grad parameters (not detached) load too
    cm2 = cylstm.LSTM(I, H, num_layers=2, bidirectional=True, seed=8)
    cm2.load_state_dict(dict(tm.named_parameters()))
    assert np.array_equal(cm2.flat_params, cm.flat_params)
    # a float32 torch model into a float64 cylstm model
    cm3 = cylstm.LSTM(I, H, num_layers=2, bidirectional=True, dtype="float64", seed=9)
    cm3.load_state_dict(tm.state_dict())
    assert np.array_equal(cm3.flat_params, cm.flat_params.astype(np.float64))
    # a wrong-shaped tensor is refused and names the key
    bad = dict(tm.state_dict())
    bad["weight_hh_l1_reverse"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="weight_hh_l1_reverse"):
        cm.load_state_dict(bad)
