"""Token input: an Embedding feeding an LSTM through a projected table (E W_ih^T + b, one
row per step) instead of the embedded vectors (cylstm.functional, Tokens / token_table; in cylstm._lstm the table read by id in the
forward's loop, dz summed by id in the backward's, token_grads).

The table path against the embedded path (the same model with the token pass turned
off): outputs, every gradient (the Embedding's included) and predictions agree to
rounding, float32 and float64, one or two directions, ragged lengths, padding_idx, two
layers with dropout, a projection, checkpointing. Against finite differences and torch
(nn.Embedding + nn.LSTM) directly. Bitwise: any thread count, checkpointed or not, two
backward calls add twice one. The policy (token_table) decides, and is what runs. Bad
ids are refused with the Embedding's messages, before anything changes."""
import os

import numpy as np
import pytest

import cylstm
from cylstm import functional as F
from cylstm.embedding import TokenBatch
from cylstm.model import Sequential

V = 13


def _torch():
    if os.environ.get("CYLSTM_REQUIRE_TORCH", "") not in ("", "0"):
        import torch   # must be importable: no skip in CI
        return torch
    return pytest.importorskip("torch")


@pytest.fixture
def table_calls(monkeypatch):
    """Counts the table path's table projections, to prove which path ran."""
    calls = []
    real = F._token_table

    def spy(ws, emb, *args):
        calls.append(emb.shape)
        return real(ws, emb, *args)
    monkeypatch.setattr(F, "_token_table", spy)
    return calls


def _model(dtype="float32", bidirectional=False, padding_idx=None, num_layers=1,
           proj_size=0, checkpoint_every=None, dropout=0.0, batch_first=True, E=6, H=8):
    D = 2 if bidirectional else 1
    m = cylstm.Sequential([
        cylstm.Embedding(V, E, dtype=dtype, padding_idx=padding_idx),
        cylstm.LSTM(E, H, num_layers=num_layers, dtype=dtype, batch_first=batch_first,
                    bidirectional=bidirectional, proj_size=proj_size, dropout=dropout,
                    checkpoint_every=checkpoint_every),
        cylstm.Linear(D * (proj_size or H), V, dtype=dtype)], seed=3)
    m.compile(loss="cross_entropy", optimizer="sgd", lr=0.1)
    return m


def _step_results(m, x, y, lengths, table, monkeypatch):
    """(output, every gradient, predictions) of one training forward/backward, with the
    token pass on (table) or off."""
    if not table:
        monkeypatch.setattr(Sequential, "_token_pass", lambda self: False)
    try:
        m.train()
        for layer in m.layers:
            layer.zero_grad()
        out, _ = m._forward(x, lengths)
        _, dout, *_ = m._loss(out, y, lengths)
        m._backward(dout)
        grads = m.flat_grads.copy()
        m.eval()
        pred = m.predict(x, lengths=lengths)
    finally:
        monkeypatch.undo()
    return out.copy(), grads, pred


def _batch(B, T, ragged, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, V, (B, T))
    y = rng.integers(0, V, (B, T))
    lengths = rng.integers(1, T + 1, B) if ragged else None
    return x, y, lengths


def _close(a, b, dtype):
    tol = 2e-5 if dtype == "float32" else 1e-12
    scale = max(1.0, float(np.max(np.abs(b))))
    assert np.max(np.abs(a - b)) <= tol * scale


CASES = [
    dict(),
    dict(bidirectional=True),
    dict(padding_idx=2),
    dict(bidirectional=True, padding_idx=-1, batch_first=False),
    dict(num_layers=2, dropout=0.3),
    dict(proj_size=3),
    dict(checkpoint_every=4),
    dict(bidirectional=True, checkpoint_every="auto"),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("ragged", [False, True], ids=["full", "ragged"])
@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items())
                         or "plain")
def test_table_path_matches_embedded_path(dtype, ragged, kw, table_calls, monkeypatch):
    # T >= V: the policy takes the table whatever the core count (token_table)
    x, y, lengths = _batch(5, 16, ragged)
    m = _model(dtype, **kw)
    # the same seeded dropout masks for both runs: a fresh model each
    a = _step_results(m, x, y, lengths, True, monkeypatch)
    assert table_calls, "the table path did not run"
    n = len(table_calls)
    b = _step_results(_model(dtype, **kw), x, y, lengths, False, monkeypatch)
    assert len(table_calls) == n, "the embedded path ran the table"
    for u, v in zip(a, b):
        _close(u, v, dtype)
    emb_grad = a[1][:V * 6].reshape(V, 6)
    assert np.any(emb_grad != 0)
    if kw.get("padding_idx") is not None:
        assert np.all(emb_grad[kw["padding_idx"]] == 0)


def _functional_pair(dtype, reverse, ragged, seed=0):
    rng = np.random.default_rng(seed)
    T, B, I, H = 7, 4, 5, 6
    emb = rng.standard_normal((V, I)).astype(dtype)
    w = [rng.uniform(-0.4, 0.4, s).astype(dtype) for s in ((4 * H, I), (4 * H, H), (4 * H,),
                                                            (4 * H,))]
    ids = rng.integers(0, V, (T, B)).astype(np.int32)
    lengths = rng.integers(1, T + 1, B) if ragged else None
    R = rng.standard_normal((T, B, H)).astype(dtype)
    return emb, w, ids, lengths, R


def _loss_and_grads(emb, w, ids, lengths, R, reverse, tokens):
    dtype = emb.dtype
    dw = [np.zeros_like(a) for a in w]
    demb = np.zeros_like(emb)
    if tokens:
        tok = F.Tokens(ids, emb, demb)
        y, _, _, cache = F.lstm_layer_forward(None, *w, lengths=lengths, reverse=reverse,
                                              tokens=tok)
    else:
        y, _, _, cache = F.lstm_layer_forward(emb[ids], *w, lengths=lengths, reverse=reverse)
    dx, _, _ = F.lstm_layer_backward(cache, R, dw_ih=dw[0], dw_hh=dw[1], db_ih=dw[2],
                                     db_hh=dw[3])
    if tokens:
        assert dx is None
    else:
        np.add.at(demb, ids.reshape(-1), dx.reshape(-1, emb.shape[1]).astype(dtype))
    return float(np.sum(y.astype(np.float64) * R)), dw, demb


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("ragged", [False, True])
def test_functional_tokens_match_embedded_x_and_finite_differences(reverse, ragged):
    emb, w, ids, lengths, R = _functional_pair("float64", reverse, ragged)
    la, dwa, dea = _loss_and_grads(emb, w, ids, lengths, R, reverse, True)
    lb, dwb, deb = _loss_and_grads(emb, w, ids, lengths, R, reverse, False)
    assert abs(la - lb) < 1e-12
    for a, b in zip(dwa + [dea], dwb + [deb]):
        assert np.allclose(a, b, rtol=1e-11, atol=1e-12)
    # central differences on entries of E and W_ih, through the table path
    eps = 1e-6
    for arr, grad, idx in ((emb, dea, [(ids[0, 0], 1), (ids[-1, -1], 4)]),
                           (w[0], dwa[0], [(0, 0), (3 * 6 + 2, 3)])):
        for i in idx:
            keep = arr[i]
            arr[i] = keep + eps
            lp = _loss_and_grads(emb, w, ids, lengths, R, reverse, True)[0]
            arr[i] = keep - eps
            lm = _loss_and_grads(emb, w, ids, lengths, R, reverse, True)[0]
            arr[i] = keep
            assert abs((lp - lm) / (2 * eps) - grad[i]) < 1e-6 * max(1.0, abs(grad[i]))


def test_two_backward_calls_add_twice_one():
    emb, w, ids, lengths, R = _functional_pair("float32", False, True)
    dw = [np.zeros_like(a) for a in w]
    demb = np.zeros_like(emb)
    _, _, _, cache = F.lstm_layer_forward(None, *w, lengths=lengths,
                                          tokens=F.Tokens(ids, emb, demb))
    F.lstm_layer_backward(cache, R, dw_ih=dw[0], dw_hh=dw[1], db_ih=dw[2], db_hh=dw[3])
    once = demb.copy(), dw[0].copy()
    F.lstm_layer_backward(cache, R, dw_ih=dw[0], dw_hh=dw[1], db_ih=dw[2], db_hh=dw[3])
    assert np.array_equal(demb, 2 * once[0]) and np.array_equal(dw[0], 2 * once[1])


@pytest.mark.parametrize("bidirectional", [False, True])
def test_fit_bitwise_for_any_thread_count_and_with_checkpointing(bidirectional, table_calls,
                                                                 two_thread_teams):
    rng = np.random.default_rng(5)
    x = rng.integers(0, V, (24, 30))
    y = rng.integers(0, V, (24, 30))
    runs = []
    for threads, ck in ((1, None), (2, None), (2, 8)):
        with cylstm.threads(threads):
            m = _model(bidirectional=bidirectional, checkpoint_every=ck, E=16, H=32)
            m.fit(x, y, batch_size=12, epochs=2, verbose=0)
            runs.append(m.flat_params.copy())
    assert table_calls
    assert runs[0].tobytes() == runs[1].tobytes() == runs[2].tobytes()


def test_policy_decides_and_large_vocabularies_embed(table_calls, monkeypatch):
    monkeypatch.setattr(F, "N_PARTS", 2)         # the policy counts the batch chunks
    assert F.token_table(81, 100, 32, 64)        # the char model
    assert F.token_table(40, 10, 10, 64) and not F.token_table(51, 10, 10, 64)   # nc V <= T B
    assert not F.token_table(10_000, 100, 32, 64)
    assert F.token_table(13, 8, 4, 6) and not F.token_table(13, 3, 2, 6)
    assert not F.token_table(13, 8, 4, 1)       # one feature: the table costs more
    monkeypatch.setattr(F, "N_PARTS", 64)        # 64 cores: 64 chunks' sums of dz by id
    assert F.token_table(81, 100, 64, 64) and not F.token_table(3200, 100, 64, 512)
    monkeypatch.setattr(F, "N_PARTS", 2)
    embedded = []
    real = cylstm.Embedding.forward
    monkeypatch.setattr(cylstm.Embedding, "forward",
                        lambda self, idx: embedded.append(1) or real(self, idx))
    m = _model()
    x, y, _ = _batch(2, 3, False)          # 6 rows < 2 V: the embedded path
    m.train_step(x, y)
    assert embedded and not table_calls
    x, y, _ = _batch(4, 8, False)          # 32 rows >= 2 V: the table
    embedded.clear()
    m.train_step(x, y)
    assert table_calls and not embedded


def test_matches_torch_embedding_and_lstm():
    torch = _torch()
    torch.manual_seed(0)
    E, H, B, T = 6, 8, 5, 16
    te, tl = torch.nn.Embedding(V, E, padding_idx=1), torch.nn.LSTM(E, H, batch_first=True)
    m = cylstm.Sequential([cylstm.Embedding(V, E, padding_idx=1),
                           cylstm.LSTM(E, H, batch_first=True)])
    m.layers[0].load_state_dict(te.state_dict())
    m.layers[1].load_state_dict(tl.state_dict())
    x, _, _ = _batch(B, T, False)
    dout = np.random.default_rng(4).standard_normal((B, T, H)).astype(np.float32)
    out, _ = m._forward(x, None)
    m._backward(dout)
    yt, _ = tl(te(torch.tensor(x)))
    (yt * torch.tensor(dout)).sum().backward()
    assert np.allclose(out, yt.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert np.allclose(m.layers[0].grad, te.weight.grad.numpy(), rtol=1e-4, atol=1e-5)
    assert np.allclose(m.layers[1].grads["weight_ih_l0"], tl.weight_ih_l0.grad.numpy(),
                       rtol=1e-4, atol=1e-5)
    assert np.all(m.layers[0].grad[1] == 0)


@pytest.mark.parametrize("bad, err, match", [
    (np.full((4, 8), V), ValueError, r"indices must be in 0\.\.12 \(num_embeddings=13\), "
                                     r"got 13 at flat position 0"),
    (-np.ones((4, 8), int), ValueError, r"indices must be in 0\.\.12"),
    (np.zeros((4, 8)), TypeError, "must hold integer"),
])
def test_bad_ids_are_refused_before_anything_changes(bad, err, match):
    m = _model()
    before = m.flat_params.copy()
    with pytest.raises(err, match=match):
        m.train_step(bad, np.zeros((4, 8), int))
    assert np.array_equal(m.flat_params, before)
    with pytest.raises(err, match=match):
        m.predict(bad)


def test_token_kernels_check_their_arguments():
    from cylstm import _lstm
    emb, w, ids, lengths, R = _functional_pair("float32", False, False)
    tok = F.Tokens(ids, emb, np.zeros_like(emb))
    with pytest.raises(ValueError, match="pass x=None"):
        F.lstm_layer_forward(emb[ids], *w, tokens=tok)
    with pytest.raises(ValueError, match="tokens.ids"):
        F.lstm_layer_forward(None, *w, tokens=F.Tokens(ids.astype(np.int64), emb, emb.copy()))
    with pytest.raises(ValueError, match="tokens.table"):
        F.lstm_layer_forward(None, *w, tokens=F.Tokens(ids, emb[:, :3].copy(), emb.copy()))
    with pytest.raises(TypeError, match="tokens must be"):
        F.lstm_layer_forward(None, *w, tokens=(ids, emb))
    bad = ids.copy()
    bad[2, 1] = V
    with pytest.raises(ValueError, match="token ids must be in 0..12"):
        F.lstm_layer_forward(None, *w, tokens=F.Tokens(bad, emb, np.zeros_like(emb)))
    # the kernels check for themselves (the Python layer is not their only caller)
    y, _, _, cache = F.lstm_layer_forward(None, *w, tokens=tok)
    cache.tokens.ids = bad
    with pytest.raises(ValueError, match="token ids must be in 0..12"):
        F.lstm_layer_backward(cache, R, dw_ih=np.zeros_like(w[0]), dw_hh=np.zeros_like(w[1]),
                              db_ih=np.zeros_like(w[2]), db_hh=np.zeros_like(w[3]))
    with pytest.raises(ValueError, match="token_grads"):
        _lstm.token_grads(demb=emb.copy(), dw_ih=w[0].copy(), ssum=np.zeros((V, 24), np.float32),
                          chunks=np.zeros((2, V, 23), np.float32), demb_tmp=emb.copy(),
                          dw_tmp=w[0].copy(), emb=emb, w_ih=w[0], padding_idx=-1,
                          n_parts=2, n_threads=1)


def test_token_batch_embeds_as_the_embedding_does():
    emb = cylstm.Embedding(V, 4, seed=0)
    x = np.random.default_rng(0).integers(0, V, (3, 5))
    tb = emb.token_batch(x)
    assert isinstance(tb, TokenBatch) and tb.shape == (3, 5)
    assert np.array_equal(tb.embed(), emb.weight[x])
    tm = tb.time_major([2, 0, 1])
    assert tm.dtype == np.int32 and tm.flags.c_contiguous
    assert np.array_equal(tm, x[[2, 0, 1]].T)
    with pytest.raises(ValueError, match=r"shape \(B, T\)"):
        emb.token_batch(x[0])


def test_subclasses_with_their_own_forward_get_the_embedded_path(table_calls):
    class Scaled(cylstm.Embedding):
        def forward(self, indices):
            return 2 * super().forward(indices)

    class Logged(cylstm.LSTM):
        seen = 0

        def forward(self, x, state=None, lengths=None):
            Logged.seen += 1
            return super().forward(x, state, lengths)

    x, y, _ = _batch(4, 8, False)
    for layers in ([Scaled(V, 6), cylstm.LSTM(6, 8, batch_first=True)],
                   [cylstm.Embedding(V, 6), Logged(6, 8, batch_first=True)]):
        m = cylstm.Sequential(layers + [cylstm.Linear(8, V)], seed=0)
        m.compile(loss="cross_entropy", optimizer="sgd")
        m.train_step(x, y)
        ref = cylstm.Embedding.forward(m.layers[0], x) * (2 if isinstance(layers[0], Scaled)
                                                          else 1)
        m.eval()
        want, _ = m.layers[1].forward_batch(ref)
        got, _ = m._forward(x, None)
        assert np.allclose(m.layers[2].forward(want), got, atol=1e-6)
    assert not table_calls and Logged.seen >= 2


def test_two_directions_add_into_two_buffers(table_calls, monkeypatch):
    # both directions of a bidirectional layer may run at once: each must add its part
    # of the Embedding's gradient into a buffer of its own (LSTM._backward)
    seen = []
    real = F._lstm.token_grads

    def spy(**kw):
        seen.append(kw["demb"].__array_interface__["data"][0])
        return real(**kw)
    monkeypatch.setattr(F._lstm, "token_grads", spy)
    x, y, _ = _batch(6, 16, False)
    m = _model(bidirectional=True)
    with cylstm.threads(2):
        m.train_step(x, y)
    assert table_calls and len(seen) == 2 and seen[0] != seen[1]
    caches = m.layers[1]._caches[0]
    assert caches[0].tokens is not caches[1].tokens


def test_subclasses_with_their_own_batch_methods_get_arrays(table_calls):
    class Doubled(cylstm.Embedding):
        def forward_batch(self, x, lengths=None, state=None):
            return 2 * self.forward(x), None

    class Arrays(cylstm.LSTM):
        def forward_batch(self, x, lengths=None, state=None):
            assert isinstance(x, np.ndarray)
            return super().forward_batch(x, lengths, state)

    x, y, _ = _batch(4, 16, False)
    for first, second, scale in ((Doubled(V, 6), cylstm.LSTM(6, 8, batch_first=True), 2),
                                 (cylstm.Embedding(V, 6), Arrays(6, 8, batch_first=True), 1)):
        m = cylstm.Sequential([first, second, cylstm.Linear(8, V)], seed=0)
        m.compile(loss="cross_entropy", optimizer="sgd")
        m.train_step(x, y)
        m.eval()
        want = m.layers[2].forward(m.layers[1].forward_batch(
            scale * cylstm.Embedding.forward(m.layers[0], x))[0])
        assert np.allclose(m._forward(x, None)[0], want, atol=1e-6)
    assert not table_calls


def test_kernels_refuse_lengths_out_of_range():
    emb, w, ids, lengths, R = _functional_pair("float32", False, True)
    _, _, _, cache = F.lstm_layer_forward(None, *w, lengths=lengths,
                                          tokens=F.Tokens(ids, emb, np.zeros_like(emb)))
    cache.lengths = cache.lengths.copy()
    cache.lengths[1] = 8                     # T = 7
    with pytest.raises(ValueError, match="lengths"):
        F.lstm_layer_backward(cache, R, dw_ih=np.zeros_like(w[0]), dw_hh=np.zeros_like(w[1]),
                              db_ih=np.zeros_like(w[2]), db_hh=np.zeros_like(w[3]))
