"""Parity with torch.nn.LSTM over the full grid of module options, projection included:
num_layers {1, 2, 3} x bidirectional x proj_size {0, P} x batch_first x initial state
{None, given} x lengths {None, ragged packed} x dtype {float32, float64} -- the full
product for BOTH dtypes (384 cases, a few seconds) -- plus bias=False on a covering subset,
unbatched (T, I) input with a projection, and state_dict exchange with proj_size
(weight_hr_l{k}[_reverse]) in both directions.

Every case compares y, h_n, c_n and, after backward of the random linear loss
sum(y R1) + sum(h_n R2) + sum(c_n R3), dx, dh0, dc0 (when a state is given) and every
parameter gradient by name (torch's .grad against lstm.grads).

Without torch these tests skip; CYLSTM_REQUIRE_TORCH=1 makes a missing torch a failure
(the pattern of test_torch_parity.py, whose torch_run / cylstm_run / assert_matches_torch
this file reuses)."""
import os

import numpy as np
import pytest

if os.environ.get("CYLSTM_REQUIRE_TORCH", "") not in ("", "0"):
    import torch  # noqa: E402  (must be importable: no skip in CI)
else:
    torch = pytest.importorskip("torch")

import cylstm

from conftest import rel_err, torch_names
from test_torch_parity import TOL, TORCH_DTYPE, assert_matches_torch, cylstm_run, torch_run

# TOL (test_torch_parity.py), from docs/math.md: float32 under 1e-5 relative to the
# largest magnitude, float64 under 1e-10.
# torch warns (once) that oneDNN has no projection and it uses its default implementation.
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")

# I, H, P all different (and D*P != H), so a transposed or mis-sized weight cannot
# go unnoticed; the second layer's input is P (or 2P) features.
T, B, I, H, P = 5, 4, 3, 5, 2
LENGTHS = [5, 2, 4, 1]         # unsorted, includes T and 1: needs enforce_sorted=False


def build(num_layers, bidirectional, proj_size, bias, batch_first, dtype, seed):
    torch.manual_seed(seed)
    kw = dict(num_layers=num_layers, bias=bias, batch_first=batch_first,
              bidirectional=bidirectional, proj_size=proj_size)
    tm = torch.nn.LSTM(I, H, dtype=TORCH_DTYPE[dtype], **kw)
    cm = cylstm.LSTM(I, H, dtype=dtype, seed=seed + 1, **kw)
    assert not np.allclose(cm.params["weight_ih_l0"], tm.weight_ih_l0.detach().numpy())
    assert cm.load_state_dict(tm.state_dict()) is cm
    return tm, cm


def compare(num_layers, bidirectional, proj_size, batch_first, with_state, packed, dtype,
            bias=True, seed=0, unbatched=False):
    tm, cm = build(num_layers, bidirectional, proj_size, bias, batch_first, dtype, seed)
    L, D, Hp = num_layers, 2 if bidirectional else 1, proj_size or H
    rng = np.random.default_rng(seed + 100)
    if unbatched:
        xshape, hshape, cshape, yshape = (T, I), (L * D, Hp), (L * D, H), (T, D * Hp)
    else:
        xshape = (B, T, I) if batch_first else (T, B, I)
        hshape, cshape = (L * D, B, Hp), (L * D, B, H)
        yshape = (B, T, D * Hp) if batch_first else (T, B, D * Hp)
    x = rng.standard_normal(xshape).astype(dtype)
    state = None
    if with_state:
        state = (rng.standard_normal(hshape).astype(dtype),
                 rng.standard_normal(cshape).astype(dtype))
    R1 = rng.standard_normal(yshape).astype(dtype)
    R2 = rng.standard_normal(hshape).astype(dtype)
    R3 = rng.standard_normal(cshape).astype(dtype)
    lengths = LENGTHS if packed else None

    want = torch_run(tm, x, state, lengths, R1, R2, R3, batch_first)
    got = cylstm_run(cm, x, state, lengths, R1, R2, R3)
    names = [n for n, _ in tm.named_parameters()]
    assert list(cm.grads) == names                       # every parameter, torch's order
    assert any(n.startswith("weight_hr") for n in names) == bool(proj_size)
    assert set(got) == set(want)
    assert {"y", "h_n", "c_n", "dx"} <= set(got)
    assert with_state == ("dh0" in got and "dc0" in got)
    assert_matches_torch(got, want, dtype, T, lengths, batch_first)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("packed", [False, True], ids=["full", "packed"])
@pytest.mark.parametrize("with_state", [False, True], ids=["nostate", "h0c0"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["tmajor", "bfirst"])
@pytest.mark.parametrize("proj_size", [0, P], ids=["noproj", f"proj{P}"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2, 3], ids=["L1", "L2", "L3"])
def test_grid(num_layers, bidirectional, proj_size, batch_first, with_state, packed, dtype):
    compare(num_layers, bidirectional, proj_size, batch_first, with_state, packed, dtype,
            seed=10)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("num_layers,bidirectional,proj_size,batch_first,with_state,packed", [
    (1, False, P, False, True, False),
    (1, True, P, True, False, True),
    (2, True, P, False, True, True),
    (3, False, P, True, True, True),
    (3, True, 0, False, False, True),
    (2, False, 0, True, True, False),
])
def test_no_bias(num_layers, bidirectional, proj_size, batch_first, with_state, packed, dtype):
    compare(num_layers, bidirectional, proj_size, batch_first, with_state, packed, dtype,
            bias=False, seed=11)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("with_state", [False, True], ids=["nostate", "h0c0"])
@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, False), (2, True)])
def test_unbatched_input_with_projection(num_layers, bidirectional, with_state, dtype):
    """x (T, I), state h0 (L*D, P), c0 (L*D, H): torch's unbatched semantics."""
    compare(num_layers, bidirectional, P, False, with_state, False, dtype, seed=12,
            unbatched=True)


# ---------------------------------------------------------------- state dicts with proj_size

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, True), (3, False)])
def test_state_dict_with_projection_from_and_to_torch(num_layers, bidirectional, bias):
    """weight_hr_l{k}[_reverse] keys with torch's names, order and shapes; torch -> cylstm
    copies every value exactly; cylstm's state_dict (torch.from_numpy of its copies) loads
    into a fresh torch model strictly, and that model gives the original's outputs."""
    kw = dict(num_layers=num_layers, bidirectional=bidirectional, proj_size=P, bias=bias)
    D = 2 if bidirectional else 1
    torch.manual_seed(20)
    tm = torch.nn.LSTM(I, H, dtype=torch.float64, **kw)
    cm = cylstm.LSTM(I, H, dtype="float64", seed=21, **kw)
    names = torch_names(num_layers, bidirectional, bias, proj=True)
    assert list(tm.state_dict()) == names                 # the documented order, in torch
    assert list(cm.state_dict()) == names == list(cm.params) == list(cm.grads)
    for name, v in tm.state_dict().items():
        assert cm.params[name].shape == tuple(v.shape), name
    for k in range(num_layers):
        for sfx in [f"_l{k}", f"_l{k}_reverse"][:D]:
            assert cm.params["weight_hr" + sfx].shape == (P, H)
            assert cm.params["weight_hh" + sfx].shape == (4 * H, P)
            assert cm.params["weight_ih" + sfx].shape == (4 * H, I if k == 0 else D * P)

    cm.load_state_dict(tm.state_dict())
    for name, v in tm.state_dict().items():
        assert np.array_equal(cm.params[name], v.numpy()), name

    # cylstm -> torch: a fresh torch model (other weights) loads cylstm's copies strictly
    torch.manual_seed(22)
    tm2 = torch.nn.LSTM(I, H, dtype=torch.float64, **kw)
    assert not torch.equal(tm2.weight_hr_l0, tm.weight_hr_l0)
    result = tm2.load_state_dict({k: torch.from_numpy(v) for k, v in cm.state_dict().items()})
    assert not result.missing_keys and not result.unexpected_keys
    for name, v in tm.state_dict().items():
        assert torch.equal(v, tm2.state_dict()[name]), name

    x = np.random.default_rng(23).standard_normal((T, B, I))
    with torch.no_grad():
        y1, (h1, c1) = tm(torch.from_numpy(x))
        y2, (h2, c2) = tm2(torch.from_numpy(x))
    assert torch.equal(y1, y2) and torch.equal(h1, h2) and torch.equal(c1, c2)
    y, (h_n, c_n) = cm.eval()(x)
    assert y.shape == (T, B, D * P) and h_n.shape == (num_layers * D, B, P)
    for got, want in ((y, y2), (h_n, h2), (c_n, c2)):
        assert rel_err(got, want.numpy()) < TOL["float64"]


def test_state_dict_projection_mismatch_is_refused():
    """A proj_size model's dict does not load into a model without projection (strict:
    unexpected weight_hr, and weight_hh has the wrong shape), and vice versa."""
    torch.manual_seed(24)
    tp = torch.nn.LSTM(I, H, proj_size=P)
    tn = torch.nn.LSTM(I, H)
    cn = cylstm.LSTM(I, H, seed=25)
    cp = cylstm.LSTM(I, H, proj_size=P, seed=26)
    before_n, before_p = cn.flat_params.copy(), cp.flat_params.copy()
    with pytest.raises(KeyError, match="weight_hr_l0"):
        cn.load_state_dict(tp.state_dict())
    with pytest.raises(KeyError, match="weight_hr_l0"):
        cp.load_state_dict(tn.state_dict())
    with pytest.raises(ValueError, match="weight_hh_l0"):    # non-strict: shapes still checked
        cn.load_state_dict(tp.state_dict(), strict=False)
    assert np.array_equal(cn.flat_params, before_n)
    assert np.array_equal(cp.flat_params, before_p)
