"""Recurrent dropout and weight dropout (docs/math.md, "Recurrent dropout and weight
dropout"): the kernels against the NumPy reference with a fixed mask (float32 and
float64, lengths, both directions, projection, initial states, every SIMD level); the
reference against central finite differences; the whole module against the reference
with the masks replayed from the documented stream order; thread-count invariance;
p = 0 is the plain path bitwise; eval ignores both; reproducible from the seed; bad
probabilities; model files; Sequential.fit."""
import copy as copy_module
import pickle

import numpy as np
import pytest

import cylstm
from cylstm import functional as F
from cylstm import reference as R

from conftest import (KERNEL_TOL, assert_close, check_layer_finite_differences,
                      grad_buffers, make_layer_problem, module_inputs, module_run,
                      output_grads)


def _mask(shape, p, seed, dtype):
    rng = np.random.default_rng(seed)
    return ((rng.random(shape) < 1 - p) / (1 - p)).astype(dtype)


def _layer_run(mod, p, mask, lengths, reverse, dy, dh, dc):
    y, h, c, cache = mod.lstm_layer_forward(**p, lengths=lengths, reverse=reverse,
                                            recurrent_mask=mask)
    g = grad_buffers(p)
    dx, dh0, dc0 = mod.lstm_layer_backward(cache, dy, dh, dc, **g)
    return dict(y=y, h=h, c=c, dx=dx, dh0=dh0, dc0=dc0,
                **{k: v for k, v in g.items() if v is not None})


LAYER_CASES = [  # (lengths, reverse, proj, state)
    (None, False, None, True),
    ([12, 3, 7, 1, 12], False, None, True),
    ([12, 3, 7, 1, 12], True, None, False),
    ([5, 12, 2, 9, 4], True, 3, True),
    (None, False, 3, False),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("lengths,reverse,proj,state", LAYER_CASES)
def test_kernels_match_reference(lengths, reverse, proj, state, dtype, kernel_level,
                                 input_path):
    T, B, I, H = 12, 5, 4, 6
    p = make_layer_problem(T, B, I, H, seed=1, dtype=dtype, state=state, proj_size=proj)
    Hp = proj or H
    mask = _mask((B, Hp), 0.4, 2, dtype)
    assert 0 < np.count_nonzero(mask) < mask.size
    dy, dh, dc = output_grads(T, B, H, seed=3, dtype=dtype, proj_size=proj)
    got = _layer_run(F, p, mask, lengths, reverse, dy, dh, dc)
    want = _layer_run(R, as64(p), mask.astype(np.float64), lengths, reverse,
                      dy.astype(np.float64), dh.astype(np.float64), dc.astype(np.float64))
    assert set(got) == set(want)
    for k in got:
        assert got[k].dtype == dtype, k
        assert_close(got[k], want[k], KERNEL_TOL[np.dtype(dtype)], k)
    # the mask really acts: without it the results differ
    plain = _layer_run(F, p, None, lengths, reverse, dy, dh, dc)
    assert not np.allclose(plain["y"], got["y"])


def as64(p):
    return {k: None if v is None else v.astype(np.float64) for k, v in p.items()}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mask_of_ones_is_the_plain_path(dtype):
    """The masked product of h * 1 is the plain product bitwise; dW_hh comes from
    another GEMM shape (one over all rows), so it agrees to rounding."""
    T, B, I, H = 9, 4, 3, 5
    p = make_layer_problem(T, B, I, H, seed=4, dtype=dtype, proj_size=2)
    dy, dh, dc = output_grads(T, B, H, seed=5, dtype=dtype, proj_size=2)
    ones = np.ones((B, 2), dtype)
    lengths = [9, 2, 5, 9]
    a = _layer_run(F, p, ones, lengths, True, dy, dh, dc)
    b = _layer_run(F, p, None, lengths, True, dy, dh, dc)
    for k in a:
        if k == "dw_hh":
            assert_close(a[k], b[k], KERNEL_TOL[np.dtype(dtype)], k)
        else:
            assert np.array_equal(a[k], b[k]), k


@pytest.mark.parametrize("lengths,reverse,proj,state", [
    ([4, 1, 3], False, None, True), ([4, 1, 3], True, 2, True), (None, True, None, False)])
def test_reference_finite_differences(lengths, reverse, proj, state):
    """(1r') against central differences of sum(y dy) + sum(h_n dh) + sum(c_n dc),
    float64, the mask fixed; every parameter, input and initial state."""
    T, B, I, H = 4, 3, 2, 3
    p = make_layer_problem(T, B, I, H, seed=6, state=state, proj_size=proj)
    Hp = proj or H
    mask = _mask((B, Hp), 0.5, 7, np.float64)
    assert 0 < np.count_nonzero(mask) < mask.size
    dy, dh, dc = output_grads(T, B, H, seed=8, proj_size=proj)

    def loss(q):
        y, h, c, _ = R.lstm_layer_forward(**q, lengths=lengths, reverse=reverse,
                                          recurrent_mask=mask, training=False)
        return np.sum(y * dy) + np.sum(h * dh) + np.sum(c * dc)

    got = _layer_run(R, p, mask, lengths, reverse, dy, dh, dc)
    analytic = {"x": got["dx"], "w_ih": got["dw_ih"], "w_hh": got["dw_hh"],
                "b_ih": got["db_ih"], "b_hh": got["db_hh"]}
    if state:
        analytic.update(h0=got["dh0"], c0=got["dc0"])
    if proj:
        analytic["w_hr"] = got["dw_hr"]
    check_layer_finite_differences(loss, p, analytic)


def test_weight_dropout_finite_differences():
    """(1w'): dL/dW_hh = (dL/dW_hh') * M_w for L(W_hh) = loss(W_hh * M_w), float64, with
    recurrent dropout too; the reference computes dL/dW_hh'."""
    T, B, I, H = 4, 3, 2, 3
    p = make_layer_problem(T, B, I, H, seed=9)
    wmask = _mask(p["w_hh"].shape, 0.5, 10, np.float64)
    rmask = _mask((B, H), 0.3, 11, np.float64)
    dy, dh, dc = output_grads(T, B, H, seed=12)

    def loss(q):
        y, h, c, _ = R.lstm_layer_forward(**{**q, "w_hh": q["w_hh"] * wmask},
                                          lengths=[4, 2, 3], recurrent_mask=rmask,
                                          training=False)
        return np.sum(y * dy) + np.sum(h * dh) + np.sum(c * dc)

    got = _layer_run(R, {**p, "w_hh": p["w_hh"] * wmask}, rmask, [4, 2, 3], False,
                     dy, dh, dc)
    check_layer_finite_differences(loss, p, {"w_hh": got["dw_hh"] * wmask})


# ---------------------------------------------------------------- the module

def _replayed_masks(lstm, seed, B):
    """The masks an LSTM built with ``seed`` draws in its first training forward,
    replayed from the stream in the order docs/math.md states (dropout between layers
    is 0 here, so nothing else is drawn)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[1])
    dt, Hp, H = lstm.dtype, lstm.state_size, lstm.hidden_size
    out = {}
    for layer in range(lstm.num_layers):
        for d in range(lstm.num_directions):
            k = layer * lstm.num_directions + d
            if lstm.weight_dropout > 0:
                q = 1 - lstm.weight_dropout
                out["w", k] = (rng.random((4 * H, Hp)) < q).astype(dt) / dt.type(q)
            if lstm.recurrent_dropout > 0:
                q = 1 - lstm.recurrent_dropout
                out["r", k] = (rng.random((B, Hp)) < q).astype(dt) / dt.type(q)
    return out


def _reference_module(lstm, masks, x, st, lengths, dy, dst):
    """The module's forward and backward from the reference layer by layer, float64."""
    L, D, Hp = lstm.num_layers, lstm.num_directions, lstm.state_size
    P = {k: v.astype(np.float64) for k, v in lstm.params.items()}
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    st = [a.astype(np.float64) for a in st]
    dst = [a.astype(np.float64) for a in dst]
    out = {"h_n": np.zeros_like(st[0]), "c_n": np.zeros_like(st[1]),
           "dh0": np.zeros_like(st[0]), "dc0": np.zeros_like(st[1])}
    grads = {k: np.zeros_like(v) for k, v in P.items()}
    caches, inp = [], x
    for layer in range(L):
        ys = []
        for d in range(D):
            k, sfx = layer * D + d, lstm._suffix(layer, d)
            w_hh = P[f"weight_hh{sfx}"]
            if ("w", k) in masks:
                w_hh = w_hh * masks["w", k]
            rm = masks.get(("r", k))
            y, out["h_n"][k], out["c_n"][k], cache = R.lstm_layer_forward(
                inp, P[f"weight_ih{sfx}"], w_hh, P.get(f"bias_ih{sfx}"),
                P.get(f"bias_hh{sfx}"), st[0][k], st[1][k], lengths, reverse=bool(d),
                w_hr=P.get(f"weight_hr{sfx}"),
                recurrent_mask=None if rm is None else rm.astype(np.float64))
            ys.append(y)
            caches.append(cache)
        inp = np.concatenate(ys, axis=2)
    out["y"] = inp
    g = dy
    for layer in range(L - 1, -1, -1):
        dx = 0
        for d in range(D):
            k, sfx = layer * D + d, lstm._suffix(layer, d)
            dw_hh = np.zeros_like(grads[f"weight_hh{sfx}"])
            res = R.lstm_layer_backward(
                caches[k], np.ascontiguousarray(g[:, :, d * Hp:(d + 1) * Hp]),
                dst[0][k], dst[1][k], dw_ih=grads[f"weight_ih{sfx}"], dw_hh=dw_hh,
                db_ih=grads.get(f"bias_ih{sfx}"), db_hh=grads.get(f"bias_hh{sfx}"),
                dw_hr=grads.get(f"weight_hr{sfx}"))
            grads[f"weight_hh{sfx}"] += dw_hh * masks["w", k] if ("w", k) in masks else dw_hh
            dx = dx + res[0]
            out["dh0"][k], out["dc0"][k] = res[1], res[2]
        g = dx
    out["dx"] = g
    out.update(grads)
    return out


MODULE_CASES = [  # (num_layers, bidirectional, proj_size, recurrent_dropout, weight_dropout)
    (1, False, 0, 0.3, 0.0),
    (2, True, 0, 0.3, 0.0),
    (2, False, 2, 0.0, 0.4),
    (3, True, 2, 0.25, 0.5),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("L,bidi,P,rp,wp", MODULE_CASES)
def test_module_matches_reference_with_replayed_masks(L, bidi, P, rp, wp, dtype):
    lstm = cylstm.LSTM(3, 5, num_layers=L, bidirectional=bidi, proj_size=P, dtype=dtype,
                       seed=13, recurrent_dropout=rp, weight_dropout=wp)
    before = lstm.flat_params.copy()
    x, st, dy, dst = module_inputs(lstm, 7, 4, seed=14)
    lengths = [7, 2, 5, 3]                     # ragged: the module reorders the batch
    masks = _replayed_masks(lstm, 13, 4)
    got = module_run(lstm, x, st, lengths, dy, dst)
    want = _reference_module(lstm, masks, x, st, lengths, dy, dst)
    assert set(got) == set(want)
    for k in got:
        assert_close(got[k], want[k], KERNEL_TOL[lstm.dtype], k)
    assert np.array_equal(lstm.flat_params, before)      # W_hh itself never written
    if wp:     # dropped weights get no gradient
        for k, m in masks.items():
            if k[0] == "w":
                sfx = lstm._suffix(k[1] // lstm.num_directions, k[1] % lstm.num_directions)
                assert np.all(lstm.grads[f"weight_hh{sfx}"][m == 0] == 0)


def test_backward_accumulates_with_weight_dropout():
    """Two backward calls give twice one (the masked gradient is added, not assigned)."""
    lstm = cylstm.LSTM(3, 5, num_layers=2, dtype="float64", seed=15, weight_dropout=0.5,
                       recurrent_dropout=0.2)
    x, st, dy, dst = module_inputs(lstm, 6, 3, seed=16)
    lstm(x, st)
    lstm.zero_grad()
    lstm.backward(dy, dst)
    once = lstm.flat_grads.copy()
    lstm.backward(dy, dst)
    assert_close(lstm.flat_grads, 2 * once, 1e-14, "twice")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bidi", [False, True])
def test_thread_count_invariance(bidi, dtype, two_thread_teams, kernel_level):
    """Bitwise the same on 1 and 2 threads. A bidirectional layer runs its directions
    on one thread each, so the unidirectional model (run first) forms the team of two."""
    runs = []
    for n in (1, 2):
        for b in sorted({False, bidi}):
            lstm = cylstm.LSTM(4, 6, num_layers=2, bidirectional=b, proj_size=3, dtype=dtype,
                               seed=17, recurrent_dropout=0.3, weight_dropout=0.3)
            x, st, dy, dst = module_inputs(lstm, 9, 6, seed=18)
            cylstm.set_num_threads(n)
            runs.append(module_run(lstm, x, st, [9, 4, 7, 1, 9, 3], dy, dst))
    half = len(runs) // 2
    for one, two in zip(runs[:half], runs[half:]):
        for k in one:
            assert np.array_equal(one[k], two[k]), k


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_p_zero_is_the_plain_path_bitwise(dtype):
    kw = dict(num_layers=2, bidirectional=True, proj_size=2, dropout=0.3, dtype=dtype)
    a = cylstm.LSTM(3, 5, seed=19, **kw)
    b = cylstm.LSTM(3, 5, seed=19, recurrent_dropout=0.0, weight_dropout=0.0, **kw)
    x, st, dy, dst = module_inputs(a, 6, 4, seed=20)
    for _ in range(2):      # the stream is left as the plain path leaves it
        ra, rb = module_run(a, x, st, [6, 2, 5, 1], dy, dst), module_run(b, x, st, [6, 2, 5, 1], dy, dst)
        for k in ra:
            assert np.array_equal(ra[k], rb[k]), k


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_eval_ignores_both(dtype):
    kw = dict(num_layers=2, bidirectional=True, dtype=dtype)
    drop = cylstm.LSTM(3, 5, seed=21, recurrent_dropout=0.5, weight_dropout=0.5, **kw)
    plain = cylstm.LSTM(3, 5, seed=22, **kw)
    plain.load_state_dict(drop.state_dict())
    x, st, _, _ = module_inputs(drop, 6, 4, seed=23)
    drop.eval()
    plain.eval()
    ya, (ha, ca) = drop(x, st, [6, 2, 5, 1])
    yb, (hb, cb) = plain(x, st, [6, 2, 5, 1])
    assert np.array_equal(ya, yb) and np.array_equal(ha, hb) and np.array_equal(ca, cb)
    drop.train()
    yt, _ = drop(x, st, [6, 2, 5, 1])
    assert not np.allclose(yt, ya)
    # the streaming step is inference: no mask either
    uni = cylstm.LSTM(3, 5, seed=24, recurrent_dropout=0.5, weight_dropout=0.5, dtype=dtype)
    s = uni.initial_state(4)
    steps = np.stack([uni.step(x[t], s).copy() for t in range(6)])
    uni.eval()
    assert_close(steps, uni(x)[0], KERNEL_TOL[uni.dtype] * 10, "step")


def test_reproducible_from_seed_and_fresh_masks_each_call():
    kw = dict(num_layers=2, recurrent_dropout=0.3, weight_dropout=0.3, dtype="float64")
    a, b, c = (cylstm.LSTM(3, 5, seed=s, **kw) for s in (25, 25, 26))
    c.load_state_dict(a.state_dict())
    x, st, _, _ = module_inputs(a, 5, 3, seed=27)
    ys = []
    for _ in range(2):
        ya, _ = a(x, st)
        yb, _ = b(x, st)
        yc, _ = c(x, st)
        assert np.array_equal(ya, yb) and not np.allclose(ya, yc)
        ys.append(ya)
    assert not np.allclose(ys[0], ys[1])


@pytest.mark.parametrize("name", ["recurrent_dropout", "weight_dropout"])
@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "0.2", True, None])
def test_bad_probability(name, bad):
    with pytest.raises(ValueError, match=name):
        cylstm.LSTM(3, 5, **{name: bad})


def test_bad_recurrent_mask():
    p = make_layer_problem(3, 2, 2, 4, seed=28)
    with pytest.raises(ValueError, match="recurrent_mask"):
        F.lstm_layer_forward(**p, recurrent_mask=np.ones((2, 3)))
    with pytest.raises(TypeError, match="recurrent_mask"):
        F.lstm_layer_forward(**p, recurrent_mask=np.ones((2, 4), complex))


def test_config_repr_save_load(tmp_path):
    lstm = cylstm.LSTM(3, 5, num_layers=2, recurrent_dropout=0.25, weight_dropout=0.5)
    cfg = lstm.get_config()
    assert cfg["recurrent_dropout"] == 0.25 and cfg["weight_dropout"] == 0.5
    assert "recurrent_dropout=0.25" in repr(lstm) and "weight_dropout=0.5" in repr(lstm)
    for copy in (pickle.loads(pickle.dumps(lstm)), copy_module.deepcopy(lstm)):
        assert copy.get_config() == cfg
    cylstm.save(lstm, tmp_path / "l.npz")
    back = cylstm.load(tmp_path / "l.npz")
    assert back.recurrent_dropout == 0.25 and back.weight_dropout == 0.5
    assert np.array_equal(back.flat_params, lstm.flat_params)
    model = cylstm.Sequential([cylstm.LSTM(3, 4, batch_first=True, recurrent_dropout=0.2,
                                           weight_dropout=0.3), cylstm.Linear(4, 2)], seed=0)
    cylstm.save(model, tmp_path / "m.npz")
    layer = cylstm.load(tmp_path / "m.npz").layers[0]
    assert layer.recurrent_dropout == 0.2 and layer.weight_dropout == 0.3


def test_sequential_fit_reproducible_with_both():
    rng = np.random.default_rng(29)
    seqs = [rng.standard_normal((rng.integers(3, 9), 2)) for _ in range(48)]
    y = np.array([int(s[:, 0].sum() > 0) for s in seqs])

    def fit():
        model = cylstm.Sequential(
            [cylstm.LSTM(2, 8, batch_first=True, recurrent_dropout=0.2, weight_dropout=0.2),
             cylstm.LastStep(), cylstm.Linear(8, 2)], seed=30, loss="cross_entropy",
            optimizer="adam", lr=2e-2)
        first = model.evaluate(seqs, y)["loss"]
        hist = model.fit(seqs, y, batch_size=16, epochs=15, verbose=0)
        return model, first, hist

    a, first, hist = fit()
    assert np.all(np.isfinite(hist.history["loss"]))
    assert a.evaluate(seqs, y)["loss"] < first
    b, _, _ = fit()
    assert np.array_equal(a.flat_params, b.flat_params)
