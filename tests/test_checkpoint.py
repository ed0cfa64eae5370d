"""Checkpointed BPTT (checkpoint_every): the forward keeps the state at segment starts,
backward recomputes each segment; outputs and gradients are bitwise those of the full
cache, by construction (the same kernel calls on the same values: docs/math.md,
"Checkpointed BPTT"), across every option, and memory follows its formula."""
import itertools
import tracemalloc

import numpy as np
import pytest

import cylstm
from cylstm import functional as F

from test_memory import numpy_bytes, traced  # noqa: F401  (fixture)
from test_text import _tiny_train


def _layer_problem(dtype, T, B, I, H, P, ragged, rmask, state, seed=1):
    r = np.random.default_rng(seed)
    Hp = P or H
    w = dict(w_ih=r.normal(size=(4 * H, I)) * .3, w_hh=r.normal(size=(4 * H, Hp)) * .3,
             b_ih=r.normal(size=4 * H), b_hh=r.normal(size=4 * H),
             w_hr=r.normal(size=(P, H)) * .3 if P else None)
    w = {k: None if v is None else v.astype(dtype) for k, v in w.items()}
    x = r.normal(size=(T, B, I)).astype(dtype)
    lengths = np.sort(r.integers(1, T + 1, B))[::-1].copy() if ragged else None
    mask = (r.random((B, Hp)) < .7).astype(dtype) / .7 if rmask else None
    h0 = r.normal(size=(B, Hp)).astype(dtype) if state else None
    c0 = r.normal(size=(B, H)).astype(dtype) if state else None
    dy = r.normal(size=(T, B, Hp)).astype(dtype)
    dh_n = r.normal(size=(B, Hp)).astype(dtype)
    dc_n = r.normal(size=(B, H)).astype(dtype)
    return w, x, lengths, mask, h0, c0, dy, dh_n, dc_n


def _layer_step(problem, reverse, checkpoint_every, twice=False):
    """y, h_n, c_n, dx, dh0, dc0 and the gradients of one training step (two backward
    calls into the same buffers with twice)."""
    w, x, lengths, mask, h0, c0, dy, dh_n, dc_n = problem
    y, h_n, c_n, cache = F.lstm_layer_forward(
        x, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], h0, c0, lengths, reverse, True,
        w["w_hr"], mask, checkpoint_every=checkpoint_every)
    grads = {k: np.zeros_like(v) for k, v in w.items() if v is not None}
    for _ in range(2 if twice else 1):
        dx, dh0, dc0 = F.lstm_layer_backward(
            cache, dy, dh_n, dc_n, dw_ih=grads["w_ih"], dw_hh=grads["w_hh"],
            db_ih=grads["b_ih"], db_hh=grads["b_hh"], dw_hr=grads.get("w_hr"))
    return dict(y=y, h_n=h_n, c_n=c_n, dx=dx, dh0=dh0, dc0=dc0, **grads), cache


def _assert_bitwise(got, want):
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert np.array_equal(got[k], want[k]), \
            f"{k}: max |diff| {np.max(np.abs(got[k] - want[k]))}"


# (T, B, checkpoint_every): several segments of one or more blocks each, a last partial
# segment, the rounding of k up to a whole block (k=1), and "auto".
SEGMENTINGS = [(50, 64, 8), (50, 64, 16), (40, 64, "auto"), (130, 32, 64), (30, 100, 1)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("ragged", [False, True], ids=["full", "ragged"])
@pytest.mark.parametrize("P", [0, 3], ids=["noproj", "proj"])
def test_layer_gradients_are_bitwise_those_of_the_full_cache(dtype, reverse, ragged, P, input_path):
    for (T, B, k), rmask, state in itertools.product(SEGMENTINGS, [False, True],
                                                     [False, True]):
        assert F.segment_steps(k, T, B) is not None        # really checkpointed
        problem = _layer_problem(dtype, T, B, 5, 7, P, ragged, rmask, state)
        full, full_cache = _layer_step(problem, reverse, None)
        ckpt, ckpt_cache = _layer_step(problem, reverse, k)
        assert full_cache.segment is None and full_cache.gates is not None
        assert ckpt_cache.segment is not None and ckpt_cache.gates is None
        _assert_bitwise(ckpt, full)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("P", [0, 3], ids=["noproj", "proj"])
def test_blocks_with_and_without_ended_rows_are_bitwise_with_checkpointing(dtype, reverse, P):
    """Lengths in S..2S, unsorted: a block where every row runs (its products read the
    rows in place), one with ended rows (the products run over the running rows,
    gathered) and one where every row has ended, each its own segment or in one."""
    T, B = 80, 64
    S = F.block_steps(B)
    problem = list(_layer_problem(dtype, T, B, 5, 7, P, False, True, True))
    lengths = np.random.default_rng(3).integers(S, 2 * S + 1, B)
    lengths[0], lengths[1] = S, 2 * S
    problem[2] = lengths
    full, _ = _layer_step(problem, reverse, None)
    for k in (S, 2 * S):
        ckpt, cache = _layer_step(problem, reverse, k)
        assert cache.segment == k
        _assert_bitwise(ckpt, full)


def test_two_backward_calls_add_twice_with_checkpointing():
    problem = _layer_problem(np.float64, 50, 64, 5, 7, 0, True, True, True)
    once, _ = _layer_step(problem, True, 8)
    twice, _ = _layer_step(problem, True, 8, twice=True)
    for k in ("w_ih", "w_hh", "b_ih", "b_hh"):
        np.testing.assert_allclose(twice[k], 2 * once[k], rtol=1e-13, atol=1e-13)


def test_checkpointed_gradients_match_the_reference(input_path):
    """Not only equal to the compiled full cache: right (against the NumPy reference)."""
    from cylstm import reference as R
    problem = _layer_problem(np.float64, 40, 64, 4, 6, 0, True, False, True)
    w, x, lengths, mask, h0, c0, dy, dh_n, dc_n = problem
    got, _ = _layer_step(problem, True, 8)
    y, h_n, c_n, cache = R.lstm_layer_forward(x, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"],
                                              h0, c0, lengths, True, True)
    g = {k: np.zeros_like(v) for k, v in w.items() if v is not None}
    dx, dh0, dc0 = R.lstm_layer_backward(cache, dy, dh_n, dc_n, dw_ih=g["w_ih"],
                                         dw_hh=g["w_hh"], db_ih=g["b_ih"], db_hh=g["b_hh"])
    for name, want in dict(y=y, dx=dx, dh0=dh0, dc0=dc0, **g).items():
        np.testing.assert_allclose(got[name], want, rtol=1e-9, atol=1e-11, err_msg=name)


def test_segment_steps_rounds_to_whole_blocks_and_validates():
    S = F.block_steps(8)
    assert S == 256 and F.block_steps(64) == 32 and F.block_steps(5000) == 1
    assert F.segment_steps(None, 1000, 8) is None
    assert F.segment_steps(1, 1000, 8) == S                 # rounded up to a block
    assert F.segment_steps(257, 1000, 8) == 2 * S
    assert F.segment_steps("auto", 100_000, 8) == 512       # ceil(sqrt(T)) = 317 -> 512
    assert F.segment_steps(999, 1000, 8) is None            # one segment: the full cache
    assert F.segment_steps("auto", 10, 8) is None
    for bad, err in ((0, ValueError), (-3, ValueError), ("often", ValueError),
                     (2.5, TypeError), (True, TypeError), ([4], TypeError)):
        with pytest.raises(err, match="checkpoint_every"):
            F.segment_steps(bad, 100, 8)
        with pytest.raises(err, match="checkpoint_every"):
            cylstm.LSTM(3, 4, checkpoint_every=bad)


def _module_step(lstm, x, lengths, dy, state):
    lstm.zero_grad()
    y, (h, c) = lstm(x, state, lengths)
    dx, (dh0, dc0) = lstm.backward(dy, (np.ones_like(h), np.ones_like(c)))
    return dict(y=y, h=h, c=c, dx=dx, dh0=dh0, dc0=dc0, grads=lstm.flat_grads.copy())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_module_with_every_option_is_bitwise_with_checkpointing(dtype, input_path):
    """Stacked, bidirectional, projection, ragged lengths, initial states, dropout between
    layers, recurrent and weight dropout, batch_first; same seed -> same masks."""
    T, B, I, H = 45, 70, 6, 9
    r = np.random.default_rng(3)
    x = r.normal(size=(B, T, I)).astype(dtype)
    lengths = r.integers(1, T + 1, B)
    dy = r.normal(size=(B, T, 2 * 4)).astype(dtype)
    state = (r.normal(size=(4, B, 4)).astype(dtype), r.normal(size=(4, B, H)).astype(dtype))
    out = []
    for k in (None, 7):
        lstm = cylstm.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=4,
                           batch_first=True, dropout=0.3, recurrent_dropout=0.25,
                           weight_dropout=0.2, dtype=dtype, seed=11, checkpoint_every=k)
        out.append(_module_step(lstm, x, lengths, dy, state))
    _assert_bitwise(out[1], out[0])


def test_fit_gives_bitwise_the_same_weights_with_checkpointing():
    r = np.random.default_rng(5)
    x = r.integers(0, 20, size=(48, 150))
    y = np.roll(x, -1, axis=1)
    assert F.segment_steps("auto", 150, 16) is not None      # really checkpointed
    weights = []
    for k in (None, "auto"):
        model = cylstm.text.char_model(20, 8, 16, num_layers=2, dropout=0.1,
                                       recurrent_dropout=0.1, seed=4, checkpoint_every=k)
        model.compile(loss="cross_entropy", optimizer="adam", lr=1e-2, clip_norm=1.0)
        model.fit(x, y, batch_size=16, epochs=2, verbose=0)
        weights.append(model.flat_params.copy())
    assert np.array_equal(weights[0], weights[1])


def test_checkpointed_training_is_thread_count_invariant(two_thread_teams, input_path):
    problem = _layer_problem(np.float32, 50, 64, 5, 12, 0, True, True, True)
    runs = []
    for n in (1, 2):
        with cylstm.threads(n):
            runs.append(_layer_step(problem, True, 16)[0])
    _assert_bitwise(runs[1], runs[0])


def test_model_files_keep_checkpoint_every(tmp_path):
    model = cylstm.Sequential([cylstm.LSTM(3, 5, checkpoint_every="auto", batch_first=True)])
    model.save(tmp_path / "m.npz")
    assert cylstm.load(tmp_path / "m.npz").layers[0].checkpoint_every == "auto"
    assert "checkpoint_every='auto'" in repr(model.layers[0])


def test_cli_takes_checkpoint_every_and_recurrent_dropout(tmp_path):
    (tmp_path / "tiny.txt").write_text("a stitch in time saves nine. " * 40)
    out = _tiny_train("--epochs", "1", "--checkpoint-every", "auto",
                      "--recurrent-dropout", "0.2", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lstm = cylstm.load(tmp_path / "m.npz").layers[1]
    assert lstm.checkpoint_every == "auto" and lstm.recurrent_dropout == 0.2
    for option, value in (("--checkpoint-every", "0"), ("--checkpoint-every", "often"),
                          ("--recurrent-dropout", "1")):
        bad = _tiny_train(option, value, cwd=tmp_path, model="bad.npz")
        assert bad.returncode == 2 and option in bad.stderr, bad.stderr
        assert not (tmp_path / "bad.npz").exists()


# ---- memory -------------------------------------------------------------------------------

def checkpointed_bytes(T, B, I, H, s, k, fused=True):
    """The README's checkpointed formula (one layer and direction, no projection):
    (what a training forward keeps, what backward adds), beyond x, y, dy, dx and the
    states. k = segment_steps(checkpoint_every, T, B); fused: the input's product in
    the step (else one segment's projected input, and the step's rows are h alone)."""
    n_seg = -(-T // k)
    forward = s * (n_seg * B * 2 * H + 4 * B * H + B * H
                   + (B * (I + H) if fused else B * H + k * B * 4 * H))
    backward = s * (k * B * 11 * H + 7 * B * H + 4 * H * (I + H + 1))
    return forward, backward


@pytest.mark.parametrize("T,B,I,H,ck", [(400, 8, 16, 32, "auto"), (300, 64, 8, 20, 8)])
def test_checkpointed_memory_follows_its_formula(T, B, I, H, ck, traced,  # noqa: F811
                                                 input_path):
    """tracemalloc (NumPy's domain), float64 functional layer: what the forward keeps
    and what backward adds equal the formula within 2% + 4 kB."""
    from cylstm import _lstm
    k = F.segment_steps(ck, T, B)
    want_fwd, want_bwd = checkpointed_bytes(T, B, I, H, 8, k, input_path)
    # the packed weights (0 without a kernel): forward's; backward's (its recomputing
    # forward's packing is kept under another name, so backward adds backward's size)
    want_fwd += 8 * _lstm.forward_pack_size(I, H, 4 * H, np.float64, input_path)
    want_bwd += 8 * _lstm.pack_size(4 * H, H, np.float64)
    r = np.random.default_rng(2)
    x = r.normal(size=(T, B, I))
    w_ih, w_hh = r.normal(size=(4 * H, I)), r.normal(size=(4 * H, H))
    b = np.zeros(4 * H)
    dy = np.ones((T, B, H))
    g = [np.zeros_like(a) for a in (w_ih, w_hh, b, b)]
    ws = F.Workspace()
    base = numpy_bytes()
    y, h, c, cache = F.lstm_layer_forward(x, w_ih, w_hh, b, b, checkpoint_every=ck,
                                          workspace=ws)
    fwd = numpy_bytes() - base - y.nbytes - h.nbytes - c.nbytes
    base = numpy_bytes()
    dx, dh0, dc0 = F.lstm_layer_backward(cache, dy, dw_ih=g[0], dw_hh=g[1], db_ih=g[2],
                                         db_hh=g[3], workspace=ws)
    bwd = numpy_bytes() - base - dx.nbytes - dh0.nbytes - dc0.nbytes
    print(f"k={k}: forward keeps {fwd} B (formula {want_fwd}), backward adds {bwd} B "
          f"(formula {want_bwd})")
    for got, want in ((fwd, want_fwd), (bwd, want_bwd)):
        assert abs(got - want) <= 0.02 * want + 4096, (got, want)


def test_a_hundred_thousand_steps_train_within_a_gibibyte(traced):  # noqa: F811
    """T = 100,000, B = 8, I = 32, H = 256, float32, checkpoint_every="auto": the peak of
    a training step (forward and backward) beyond the caller's x, y, dy and dx stays
    under 1 GiB; the full cache would need about 9 GiB."""
    T, B, I, H = 100_000, 8, 32, 256
    r = np.random.default_rng(0)
    lstm = cylstm.LSTM(I, H, seed=1, checkpoint_every="auto")
    x = r.standard_normal((T, B, I), dtype=np.float32)
    dy = np.full((T, B, H), 1e-3, np.float32)
    made = x.nbytes + dy.nbytes        # allocated below and the caller's: dx (T, B, I), y (T, B, H)
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    y, _ = lstm(x)
    dx, _ = lstm.backward(dy)
    peak = tracemalloc.get_traced_memory()[1] - base - made
    assert dx.nbytes + y.nbytes == made
    full_cache = 4 * T * B * (4 * H + 3 * H + I) + 4 * T * B * 4 * H
    print(f"peak beyond x, y, dy, dx: {peak / 2**20:.1f} MiB; full cache {full_cache / 2**30:.1f} GiB")
    assert peak < 2**30
    assert full_cache > 8 * 2**30
    assert np.isfinite(lstm.flat_grads).all() and np.abs(lstm.flat_grads).max() > 0
