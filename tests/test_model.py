"""The training layer: Linear / Dropout / LastStep, Sequential, initialisers, callbacks.

Gradients are checked against central differences in float64; training against a
stated loss on a small task; the failure modes (NaN loss, Ctrl-C) against the weights
of the last completed step."""

import math

import numpy as np
import pytest

import cylstm
from cylstm import callbacks as cb
from conftest import FD_EPS, rel_err

FD_TOL = 1e-6


def numeric_grad(f, arr, idx):
    """Central differences of f() with respect to arr.flat[idx] (perturbed in place)."""
    out = np.empty(len(idx))
    flat = arr.reshape(-1)
    for n, k in enumerate(idx):
        v = flat[k]
        flat[k] = v + FD_EPS
        lp = f()
        flat[k] = v - FD_EPS
        lm = f()
        flat[k] = v
        out[n] = (lp - lm) / (2 * FD_EPS)
    return out


# ---- layers -------------------------------------------------------------------------------

@pytest.mark.parametrize("lead", [(5,), (3, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_backward_matches_finite_differences(lead, bias):
    rng = np.random.default_rng(0)
    lin = cylstm.Linear(6, 4, bias=bias, dtype="float64", seed=1)
    x = rng.standard_normal(lead + (6,))
    dy = rng.standard_normal(lead + (4,))
    lin.zero_grad()
    y = lin(x)
    np.testing.assert_allclose(y, x @ lin.params["weight"].T
                               + (lin.params["bias"] if bias else 0), rtol=1e-12)
    dx = lin.backward(dy)
    f = lambda: float(np.sum(lin.forward(x) * dy))
    for name, p in lin.params.items():
        idx = np.arange(p.size)
        assert rel_err(lin.grads[name].reshape(-1), numeric_grad(f, p, idx)) < FD_TOL, name
    assert rel_err(dx.reshape(-1), numeric_grad(f, x, np.arange(x.size))) < FD_TOL


def test_linear_accumulates_and_validates():
    lin = cylstm.Linear(3, 2, dtype="float64", seed=0)
    x, dy = np.ones((4, 3)), np.ones((4, 2))
    lin(x)
    lin.backward(dy)
    once = lin.flat_grads.copy()
    lin(x)
    lin.backward(dy)
    np.testing.assert_array_equal(lin.flat_grads, 2 * once)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 3\)"):
        lin(np.ones((4, 5)))
    with pytest.raises(ValueError, match="dy must have shape"):
        lin.backward(np.ones((5, 2)))
    with pytest.raises(TypeError, match="in_features must be an int"):
        cylstm.Linear(2.5, 3)


def test_dropout_masks_scales_and_is_identity_in_eval():
    d = cylstm.Dropout(0.25, seed=3)
    x = np.ones((200, 50))
    y = d(x)
    kept = y != 0
    assert 0.7 < kept.mean() < 0.8
    np.testing.assert_allclose(y[kept], 1 / 0.75)
    dy = np.arange(x.size, dtype=float).reshape(x.shape)
    np.testing.assert_array_equal(d.backward(dy), dy * (y / x))     # the same mask
    d.eval()
    assert d(x) is x or np.array_equal(d(x), x)
    with pytest.raises(ValueError, match=r"p must be a float in \[0, 1\)"):
        cylstm.Dropout(1.0)


@pytest.mark.parametrize("r", [0, 2])
def test_last_step_picks_last_valid_step_and_routes_gradient(r):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5, 4))
    lengths = np.array([5, 2, 1])
    ls = cylstm.LastStep(reverse_features=r)
    y = ls.forward(x, lengths)
    for b, n in enumerate(lengths):
        np.testing.assert_array_equal(y[b, :4 - r], x[b, n - 1, :4 - r])
        np.testing.assert_array_equal(y[b, 4 - r:], x[b, 0, 4 - r:])
    dy = rng.standard_normal(y.shape)
    dx = ls.backward(dy)
    f = lambda: float(np.sum(ls.forward(x, lengths) * dy))
    assert rel_err(dx.reshape(-1), numeric_grad(f, x, np.arange(x.size))) < FD_TOL


def _model(kind, dtype="float64", seed=0):
    if kind == "classify":
        layers = [cylstm.LSTM(3, 5, batch_first=True, dtype=dtype),
                  cylstm.LastStep(), cylstm.Linear(5, 4, dtype=dtype)]
    elif kind == "bidirectional":
        layers = [cylstm.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2,
                              dtype=dtype),                      # time-major inside
                  cylstm.Dropout(0.0), cylstm.LastStep(), cylstm.Linear(4, 3, dtype=dtype)]
    elif kind == "tokens":
        layers = [cylstm.Embedding(7, 3, dtype=dtype),
                  cylstm.LSTM(3, 5, batch_first=True, dtype=dtype),
                  cylstm.Linear(5, 7, dtype=dtype)]
    else:                                                       # regression per step
        layers = [cylstm.LSTM(3, 4, batch_first=True, dtype=dtype),
                  cylstm.Linear(4, 2, dtype=dtype)]
    return cylstm.Sequential(layers, seed=seed)


def _data(kind, rng, N=4, T=6):
    lengths = rng.integers(1, T + 1, N)
    lengths[0] = T
    if kind == "tokens":
        x = rng.integers(0, 7, (N, T))
        y = rng.integers(0, 7, (N, T))
        return x, y, lengths, "cross_entropy"
    x = rng.standard_normal((N, T, 3))
    if kind in ("classify", "bidirectional"):
        return x, rng.integers(0, 4 if kind == "classify" else 3, N), lengths, "cross_entropy"
    return x, rng.standard_normal((N, T, 2)), lengths, "mse"


@pytest.mark.parametrize("kind", ["classify", "bidirectional", "tokens", "regression"])
def test_sequential_gradient_matches_finite_differences(kind):
    rng = np.random.default_rng(2)
    model = _model(kind)
    x, y, lengths, loss = _data(kind, rng)
    model.compile(loss=loss, optimizer="sgd", lr=0.1)
    xb, yb, lb = model._take(np.arange(len(x)), *model._inputs(x, lengths)[:1], y, lengths)
    model.train()
    model.zero_grad()
    out, _ = model._forward(xb, lb)
    _, dout, *_ = model._loss(out, yb, lb)
    model._backward(dout)
    analytic = model.flat_grads.copy()
    assert np.abs(analytic).max() > 0

    def f():
        return model.eval_step(xb, yb, lb).loss
    model.eval()
    idx = np.unique(np.linspace(0, model.flat_params.size - 1, 60).astype(int))
    num = numeric_grad(f, model.flat_params, idx)
    assert rel_err(analytic[idx], num) < FD_TOL


def test_arena_is_shared_and_named_like_torch_sequential():
    model = _model("tokens", "float32")
    names = list(model.params)
    assert names[:3] == ["0.weight", "1.weight_ih_l0", "1.weight_hh_l0"]
    assert names[-2:] == ["2.weight", "2.bias"]
    for name, p in model.params.items():
        assert np.shares_memory(p, model.flat_params), name
    for name, g in model.grads.items():
        assert np.shares_memory(g, model.flat_grads), name
    assert model.num_parameters == sum(p.size for p in model.params.values())
    # the layers' own views are the arena's
    assert np.shares_memory(model.layers[1].params["weight_hh_l0"], model.flat_params)
    assert np.shares_memory(model.layers[0].weight, model.flat_params)


def test_chain_and_dtype_errors():
    with pytest.raises(ValueError, match=r"takes 7 features but the layer before gives 5"):
        cylstm.Sequential([cylstm.LSTM(3, 5), cylstm.Linear(7, 2)])
    with pytest.raises(TypeError, match="one dtype"):
        cylstm.Sequential([cylstm.LSTM(3, 5), cylstm.Linear(5, 2, dtype="float64")])
    with pytest.raises(ValueError, match="Embedding must be the first layer"):
        cylstm.Sequential([cylstm.Linear(3, 3), cylstm.Embedding(4, 3)])
    with pytest.raises(TypeError, match="Sequential takes"):
        cylstm.Sequential([object()])
    with pytest.raises(TypeError, match=r"layers\[1\] is a Sequential"):   # model(x) exists,
        cylstm.Sequential([cylstm.LSTM(3, 5), _model("classify")])   # but not as a layer
    model = _model("classify", "float32")
    with pytest.raises(RuntimeError, match="compile"):
        model.fit(np.zeros((2, 3, 3)), [0, 1])
    model.compile(loss="cross_entropy", metrics=["accuracy"])
    with pytest.raises(ValueError, match=r"x must have shape \(N, T, features\)"):
        model.fit(np.zeros((2, 3)), [0, 1], verbose=0)
    with pytest.raises(ValueError, match=r"y must have one entry per sequence \(2\)"):
        model.fit(np.zeros((2, 3, 3)), [0, 1, 2], verbose=0)
    with pytest.raises(ValueError, match=r"lengths must be in 1\.\.3"):
        model.fit(np.zeros((2, 3, 3)), [0, 1], lengths=[3, 4], verbose=0)
    with pytest.raises(ValueError, match="metric 'rmse' does not go with"):
        model.compile(loss="cross_entropy", metrics=["rmse"])


def test_calling_the_model_is_predict_on_one_batch():
    """model(x), as with a torch module, gives predict's output for x as one batch, in
    eval mode, lengths included; no AttributeError for a missing forward."""
    model = _model("classify", "float32")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 4, 3)).astype(np.float32)
    lengths = np.array([4, 1, 3, 2, 4])
    model.train()
    out = model(x, lengths=lengths)
    assert not model.training
    assert out.tobytes() == model.predict(x, batch_size=5, lengths=lengths).tobytes()
    assert model(x[:1]).shape == model.predict(x[:1]).shape
    with pytest.raises(ValueError, match=r"x must have shape"):
        model(np.zeros((2, 3)))


# ---- fitting ------------------------------------------------------------------------------

def _parity_task(n=256, seed=0):
    """Sequences of +-1 of random length 3..12: class 1 when the sum is positive."""
    rng = np.random.default_rng(seed)
    seqs = [rng.choice([-1.0, 1.0], size=(rng.integers(3, 13), 1)) for _ in range(n)]
    y = np.array([int(s.sum() > 0) for s in seqs])
    return seqs, y


def _classifier(seed=0):
    return cylstm.Sequential([cylstm.LSTM(1, 16, batch_first=True), cylstm.LastStep(),
                              cylstm.Linear(16, 2)], seed=seed,
                             loss="cross_entropy", optimizer="adam", lr=2e-2,
                             metrics=["accuracy"])


def test_fit_learns_a_ragged_task_to_a_stated_loss():
    seqs, y = _parity_task()
    model = _classifier()
    hist = model.fit(seqs, y, batch_size=32, epochs=30, verbose=0,
                     validation_split=0.25)
    assert hist.history["loss"][-1] < 0.1
    assert hist.history["val_accuracy"][-1] >= 0.95
    assert set(hist.history) == {"loss", "accuracy", "val_loss", "val_accuracy", "lr"}
    assert hist.epoch == list(range(30))
    probs = model.predict(seqs[:5])
    assert probs.shape == (5, 2)
    ev = model.evaluate(seqs, y)
    assert set(ev) == {"loss", "accuracy"} and ev["accuracy"] >= 0.95
    assert not model.training


def test_padded_arrays_with_lengths_equal_a_list_of_sequences():
    seqs, y = _parity_task(64)
    x, lengths = cylstm.pad_sequences(seqs)
    a, b = _classifier(3), _classifier(3)
    a.fit(seqs, y, epochs=2, verbose=0)
    b.fit(x, y, lengths=lengths, epochs=2, verbose=0)
    np.testing.assert_array_equal(a.flat_params, b.flat_params)
    # padding values never matter
    x2 = x.copy()
    x2[np.arange(x.shape[1])[None, :] >= lengths[:, None]] = 1e6
    np.testing.assert_array_equal(a.predict(seqs), b.predict(x2, lengths=lengths))


def test_per_step_targets_with_padding_are_masked():
    rng = np.random.default_rng(0)
    x = [rng.standard_normal((n, 3)) for n in (4, 2, 3)]
    y = [np.cumsum(s, axis=0)[:, :2] for s in x]
    model = cylstm.Sequential([cylstm.LSTM(3, 8, batch_first=True), cylstm.Linear(8, 2)],
                              seed=0, loss="mse", optimizer="adam", lr=1e-2,
                              metrics=["rmse", "mae"])
    first = model.evaluate(x, y)["loss"]
    model.fit(x, y, batch_size=3, epochs=50, verbose=0)
    assert model.evaluate(x, y)["loss"] < 0.5 * first
    out = model.predict(x)
    assert out.shape == (3, 4, 2)
    assert np.all(out[1, 2:] == 0) and np.all(out[2, 3:] == 0)


def test_same_seed_same_weights_bitwise_for_1_and_2_threads():
    seqs, y = _parity_task(96)
    results = []
    for n in (1, 2, 1):
        with cylstm.threads(n):
            m = cylstm.Sequential([cylstm.LSTM(1, 12, batch_first=True, dropout=0.0),
                                   cylstm.Dropout(0.2), cylstm.LastStep(),
                                   cylstm.Linear(12, 2)], seed=7,
                                  loss="cross_entropy", optimizer="adam", lr=1e-2)
            m.fit(seqs, y, batch_size=16, epochs=2, verbose=0)
            results.append(m.flat_params.copy())
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])
    other = cylstm.Sequential([cylstm.LSTM(1, 12, batch_first=True), cylstm.Dropout(0.2),
                               cylstm.LastStep(), cylstm.Linear(12, 2)], seed=8)
    assert not np.array_equal(results[0][:50], other.flat_params[:50])


class _Snapshot(cb.Callback):
    def on_batch_end(self, batch, logs):
        self.params = self.model.flat_params.copy()
        self.batches = batch + 1


def test_nan_loss_stops_training_with_the_last_good_weights():
    seqs, y = _parity_task(64)
    x, lengths = cylstm.pad_sequences(seqs)
    x[40, 0, 0] = np.nan                                # in the third batch of 16
    model = _classifier()
    snap = _Snapshot()
    with pytest.raises(FloatingPointError, match="the loss became nan.*last good step"):
        model.fit(x, y, lengths=lengths, batch_size=16, shuffle=False, epochs=1,
                  verbose=0, callbacks=[snap])
    assert snap.batches == 2
    np.testing.assert_array_equal(model.flat_params, snap.params)
    assert np.all(np.isfinite(model.predict(x[:8], lengths=lengths[:8])))


def test_keyboard_interrupt_leaves_the_last_completed_step():
    class Interrupt(_Snapshot):
        def on_batch_end(self, batch, logs):
            super().on_batch_end(batch, logs)
            if batch == 2:
                raise KeyboardInterrupt
    seqs, y = _parity_task(96)
    model = _classifier()
    snap = Interrupt()
    with pytest.raises(KeyboardInterrupt):
        model.fit(seqs, y, batch_size=16, epochs=3, verbose=0, callbacks=[snap])
    np.testing.assert_array_equal(model.flat_params, snap.params)
    assert not model.training
    assert model.predict(seqs[:4]).shape == (4, 2)
    model.fit(seqs, y, batch_size=16, epochs=1, verbose=0)          # and trains on


# ---- callbacks ----------------------------------------------------------------------------

class _Script(cb.Callback):
    """Replaces val_loss in the logs by a scripted sequence (callbacks share the logs)."""

    def __init__(self, values):
        self.values = values

    def on_epoch_end(self, epoch, logs):
        logs["val_loss"] = self.values[epoch]
        self.model.__dict__.setdefault("_seen", []).append(self.model.flat_params.copy())


def test_early_stopping_restores_the_best_weights():
    seqs, y = _parity_task(64)
    model = _classifier()
    script = _Script([1.0, 0.5, 0.7, 0.8, 0.9, 1.0, 1.1])
    stop = cb.EarlyStopping("val_loss", patience=2)
    hist = model.fit(seqs, y, epochs=7, verbose=0, callbacks=[script, stop])
    assert hist.epoch == [0, 1, 2, 3]                 # stopped after 2 epochs without gain
    assert stop.best_epoch == 1 and stop.stopped_epoch == 3
    np.testing.assert_array_equal(model.flat_params, model._seen[1])


def test_checkpoint_and_schedules_and_user_hooks(tmp_path):
    seqs, y = _parity_task(32)
    model = _classifier()
    seen = []
    ckpt = cb.ModelCheckpoint(str(tmp_path / "m-{epoch:02d}.npz"), monitor="loss",
                              save_best_only=False)
    hook = cb.LambdaCallback(on_epoch_end=lambda e, logs: seen.append((e, logs["loss"])))
    hist = model.fit(seqs, y, epochs=4, verbose=0, batch_size=8,
                     callbacks=[cb.StepLR(2, gamma=0.5), ckpt, hook])
    np.testing.assert_allclose(hist.history["lr"], [2e-2, 2e-2, 1e-2, 1e-2])
    assert [e for e, _ in seen] == [0, 1, 2, 3]
    assert [p.rsplit("/", 1)[-1] for p in ckpt.saved] == [f"m-{e:02d}.npz" for e in (1, 2, 3, 4)]
    last = cylstm.load(ckpt.saved[-1])
    np.testing.assert_array_equal(last.flat_params, model.flat_params)

    model = _classifier()
    hist = model.fit(seqs, y, epochs=5, verbose=0, callbacks=[cb.CosineAnnealing(4, 1e-3)])
    want = [1e-3 + (2e-2 - 1e-3) * (1 + math.cos(math.pi * min(e, 4) / 4)) / 2
            for e in range(5)]
    np.testing.assert_allclose(hist.history["lr"], want)
    with pytest.raises(TypeError, match="unknown hook"):
        cb.LambdaCallback(on_epoch_ends=print)
    with pytest.raises(KeyError, match="monitor 'val_loss' is not in the epoch's logs"):
        _classifier().fit(seqs, y, epochs=1, verbose=0, callbacks=[cb.EarlyStopping()])


def test_progress_bar_is_quiet_off_a_terminal_and_one_line_per_epoch_at_verbose_2(capsys):
    seqs, y = _parity_task(32)
    _classifier().fit(seqs, y, epochs=2, verbose=1)
    assert capsys.readouterr().out == ""             # pytest's stdout is not a terminal
    _classifier().fit(seqs, y, epochs=2, verbose=2)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].startswith("Epoch 2/2") and "seq/s" in lines[1]
    assert "loss" in lines[0] and "accuracy" in lines[0]

    class Tty:
        def __init__(self):
            self.text = ""

        def isatty(self):
            return True

        def write(self, s):
            self.text += s

        def flush(self):
            pass
    from cylstm.model import _Progress
    bar, tty = _Progress(1, Tty()), None
    tty = bar.stream
    bar.begin(0, 1, 3)
    for _ in range(3):
        bar.update(10, 0.5, 10)
    bar.end({"loss": 0.5})
    assert "\r" in tty.text and "[" in tty.text and "seq/s" in tty.text
    assert tty.text.endswith("\n")


# ---- initialisers -------------------------------------------------------------------------

def test_initialisers():
    lstm = cylstm.LSTM(6, 5, proj_size=3)
    cylstm.init.keras(lstm, seed=0)
    H = 5
    b = lstm.params["bias_ih_l0"]
    np.testing.assert_array_equal(b[H:2 * H], 1)
    assert np.all(b[:H] == 0) and np.all(b[2 * H:] == 0)
    assert np.all(lstm.params["bias_hh_l0"] == 0)
    w = lstm.params["weight_hh_l0"].astype(np.float64)      # (4H, Hp): orthonormal columns
    np.testing.assert_allclose(w.T @ w, np.eye(3), atol=1e-6)
    a = math.sqrt(6 / (6 + 4 * H))
    assert np.abs(lstm.params["weight_ih_l0"]).max() <= a

    cylstm.init.normal(lstm, std=0.02, seed=1)
    assert np.all(lstm.params["bias_ih_l0"] == 0)
    assert abs(lstm.params["weight_ih_l0"].std() - 0.02) < 0.01

    cylstm.init.pytorch_default(lstm, seed=2)
    assert np.abs(lstm.flat_params).max() <= 1 / math.sqrt(5)
    again = cylstm.LSTM(6, 5, proj_size=3)
    cylstm.init.pytorch_default(again, seed=2)
    np.testing.assert_array_equal(again.flat_params, lstm.flat_params)

    m1 = cylstm.Sequential([cylstm.Embedding(9, 4), cylstm.LSTM(4, 5, batch_first=True),
                            cylstm.Linear(5, 9)], seed=4, init="keras")
    assert np.all(m1.params["2.bias"] == 0)
    assert np.abs(m1.params["0.weight"]).max() <= 0.05
    with pytest.raises(ValueError, match="init must be"):
        cylstm.init.apply(lstm, "xavier")


def test_last_step_after_a_bidirectional_lstm_is_its_final_h_n():
    rng = np.random.default_rng(5)
    lstm = cylstm.LSTM(3, 6, num_layers=2, bidirectional=True, proj_size=4, batch_first=True)
    model = cylstm.Sequential([lstm, cylstm.LastStep()])
    assert model.layers[1].reverse_features == 4
    x = rng.standard_normal((5, 7, 3)).astype(np.float32)
    lengths = np.array([7, 1, 4, 6, 2])
    out = model.predict(x, lengths=lengths)
    _, (h_n, _) = lstm(x, lengths=lengths)
    np.testing.assert_array_equal(out, np.concatenate([h_n[-2], h_n[-1]], axis=1))


def test_validation_data_with_lengths_and_a_list():
    seqs, y = _parity_task(96)
    x, lengths = cylstm.pad_sequences(seqs)
    a, b = _classifier(1), _classifier(1)
    ha = a.fit(seqs[:64], y[:64], epochs=2, verbose=0, validation_data=(seqs[64:], y[64:]))
    hb = b.fit(seqs[:64], y[:64], epochs=2, verbose=0,
               validation_data=(x[64:], y[64:], lengths[64:]))
    assert ha.history["val_loss"] == hb.history["val_loss"]
    assert ha.history["val_loss"][-1] == pytest.approx(a.evaluate(seqs[64:], y[64:])["loss"])
    with pytest.raises(TypeError, match="validation_data must be"):
        a.fit(seqs, y, verbose=0, validation_data=(seqs,))


def test_per_sequence_targets_as_wide_as_the_steps_are_not_cut():
    """y (N, K) with K == T belongs to the sequence, not to its steps."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 4, 2))
    lengths = np.array([2, 3, 2, 1, 2, 3])            # batches are cut to 3 steps or fewer
    y = rng.standard_normal((6, 4))
    model = cylstm.Sequential([cylstm.LSTM(2, 5, batch_first=True), cylstm.LastStep(),
                               cylstm.Linear(5, 4)], seed=0, loss="mse", optimizer="sgd")
    ev = model.evaluate(x, y, lengths=lengths)
    want = np.mean((model.predict(x, lengths=lengths) - y) ** 2)
    assert ev["loss"] == pytest.approx(want, rel=1e-5)


def test_deepcopy_and_pickle_keep_one_arena_per_copy():
    import copy
    import pickle
    seqs, y = _parity_task(64)
    model = _classifier()
    model.fit(seqs, y, epochs=1, verbose=0)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        np.testing.assert_array_equal(twin.predict(seqs), model.predict(seqs))
        assert not np.shares_memory(twin.flat_params, model.flat_params)
        for name, p in twin.params.items():
            assert np.shares_memory(p, twin.flat_params), name
        assert twin.optimizer.params is twin.flat_params
        assert np.shares_memory(twin.optimizer._params, twin.flat_params)
        before = model.flat_params.copy()
        twin.fit(seqs, y, epochs=1, verbose=0)                 # trains the copy only
        np.testing.assert_array_equal(model.flat_params, before)
        assert not np.array_equal(twin.flat_params, before)
    lstm = copy.deepcopy(cylstm.LSTM(3, 4, num_layers=2))
    for name, p in lstm.params.items():
        assert np.shares_memory(p, lstm.flat_params), name
    lstm(np.ones((2, 1, 3)))


class _NanEmpty:
    """numpy with np.empty filled with NaN: an element predict leaves unwritten shows."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def empty(shape, dtype=float, **kw):
        return np.full(shape, np.nan, dtype)


def _batch_by_batch(model, x, lengths, batch):
    """predict's reference: each batch's forward, rows put back, padding zeroed."""
    outs = []
    for i in range(0, len(x), batch):
        lb = None if lengths is None else lengths[i:i + batch]
        T = x.shape[1] if lb is None else int(lb.max())
        part = model._forward(np.ascontiguousarray(x[i:i + batch, :T]), lb)[0]
        if model.sequence_output and T < x.shape[1]:
            part = np.concatenate([part, np.zeros((part.shape[0], x.shape[1] - T) +
                                                  part.shape[2:], part.dtype)], axis=1)
        outs.append(part)
    out = np.concatenate(outs)
    if model.sequence_output and lengths is not None:
        out[np.arange(x.shape[1])[None, :] >= lengths[:, None]] = 0
    return out


@pytest.mark.parametrize("case", ["tokens", "tokens ragged", "classifier ragged",
                                  "classifier", "lstm last", "lstm last ragged",
                                  "classifier permuted"])
@pytest.mark.parametrize("batch", [4, 5, 64])
def test_predict_writes_every_element_as_batch_by_batch(case, batch, monkeypatch):
    rng = np.random.default_rng(3)
    N, T = 11, 6
    lengths = rng.integers(1, T + 1, N) if "ragged" in case else None
    if case == "classifier permuted":
        # on 2 cores the first batch runs as rows [0, 2, 1, 3]: first and last in place
        lengths = np.array([6, 5, 4, 1] + [3] * (N - 4))
    if case.startswith("tokens"):
        model = cylstm.text.char_model(7, 3, 5, seed=0)
        x = rng.integers(0, 7, (N, T))
    else:
        x = rng.standard_normal((N, T, 3)).astype(np.float32)
        layers = [cylstm.LSTM(3, 5, batch_first=True)]
        if not case.startswith("lstm last"):
            layers += [cylstm.LastStep(), cylstm.Linear(5, 4)]
        model = cylstm.Sequential(layers, seed=0)
    # which batches the Linear writes into the result: every one of consecutive rows
    # spanning all steps (a ragged batch comes permuted, or cut to its longest row)
    wrote_into = []
    forward = cylstm.Linear.forward
    monkeypatch.setattr(cylstm.Linear, "forward", lambda self, h, out=None: (
        wrote_into.append(out is not None), forward(self, h, out=out))[1])
    monkeypatch.setattr(cylstm.model, "np", _NanEmpty())
    got = model.predict(x, batch_size=batch, lengths=lengths)
    monkeypatch.undo()
    model.eval()
    np.testing.assert_array_equal(got, _batch_by_batch(model, x, lengths, batch))
    want = [] if case.startswith("lstm last") else [
        bool(np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx)))) and
        (not model.sequence_output or lengths is None or lengths[idx].max() == T)
        for idx in model._batches(N, batch, False, lengths)]
    assert wrote_into == want
    if case in ("tokens", "classifier"):
        assert all(want)


@pytest.mark.parametrize("lengths", [None, [6, 2, 5, 6, 1, 3, 4]])
def test_evaluate_is_the_loss_of_predict(lengths):
    # evaluate computes no gradient; its loss and accuracy are the training loss's,
    # bitwise when the batch keeps its row order (a ragged one is permuted: the float64
    # row losses are summed in another order)
    rng = np.random.default_rng(4)
    model = cylstm.text.char_model(9, 3, 5, seed=1)
    model.compile(loss="cross_entropy", metrics=["accuracy"])
    x, y = rng.integers(0, 9, (7, 6)), rng.integers(0, 9, (7, 6))
    lengths = None if lengths is None else np.array(lengths)
    got = model.evaluate(x, y, batch_size=64, lengths=lengths)
    mask = None if lengths is None else np.arange(6)[None, :] < lengths[:, None]
    ce = cylstm.losses.CrossEntropyLoss()
    want = ce(model.predict(x, lengths=lengths), y, mask)
    assert got["loss"] == (want if lengths is None else pytest.approx(want, rel=1e-14))
    assert got["accuracy"] == ce.n_correct / ce.n_counted
