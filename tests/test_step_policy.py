"""The training step's thread policy: the gradient norm is computed once per step, and
every BLAS other than the kernels' own (NumPy's) is held to one thread during fit,
evaluate, predict and sample, then restored; the kernels' own BLAS is left alone; and
NumPy's huge-page hint is off during those calls, then restored."""
import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

import cylstm
from cylstm import _threads, optim


def _char_model(clip_norm=1.0):
    m = cylstm.text.char_model(11, 8, 16, seed=1)
    m.compile(loss="cross_entropy", optimizer="adam", lr=1e-2, clip_norm=clip_norm)
    return m


def _ids():
    ids = np.random.default_rng(2).integers(0, 11, size=(32, 13))
    return ids[:, :-1], ids[:, 1:]


@pytest.mark.parametrize("clip_norm", [1.0, None])
def test_gradient_norm_computed_once_per_step(monkeypatch, clip_norm):
    calls = []
    real = optim._norm

    def counting(flat):
        calls.append(flat.size)
        return real(flat)

    monkeypatch.setattr(optim, "_norm", counting)
    m = _char_model(clip_norm)
    x, y = _ids()
    m.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    assert len(calls) == 4                      # 4 batches, one norm each
    calls.clear()
    m.optimizer.step()                          # the public step still clips on its own
    assert len(calls) == (1 if clip_norm else 0)


def test_clipping_with_the_known_norm_is_bitwise_the_same():
    runs = []
    for known in (True, False):
        m = _char_model(1e-3)                   # small: every step clips
        x, y = _ids()
        if not known:
            # the optimiser computes the norm itself, as a user's own loop would
            m.optimizer._step_with_norm = lambda norm, f=m.optimizer._step_with_norm: f(None)
        m.fit(x, y, batch_size=8, epochs=2, verbose=0)
        runs.append(m.flat_params.copy())
    np.testing.assert_array_equal(*runs)


def _blas_threads():
    return {lib["filepath"]: lib["num_threads"] for lib in threadpool_info()
            if lib["user_api"] == "blas"}


def _own_paths():
    return {lib["filepath"] for lib in _threads._scipy_blas_libraries()}


class _Seen(cylstm.callbacks.Callback):
    def __init__(self):
        self.seen = []

    def on_batch_end(self, batch, logs):
        self.seen.append(_blas_threads())


@pytest.mark.parametrize("user_limit", [None, 2])
def test_other_blas_held_to_one_thread_during_the_calls_and_restored(user_limit):
    own = _own_paths()
    with threadpool_limits(limits=user_limit, user_api="blas"):
        before = _blas_threads()
        others = [p for p in before if p not in own]
        m = _char_model()
        x, y = _ids()
        seen = _Seen()
        m.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[seen])
        assert seen.seen
        for s in seen.seen:
            assert all(s[p] == 1 for p in others)
            assert all(s[p] == before[p] for p in own)    # the kernels' pin is theirs
        assert _blas_threads() == before
        m.evaluate(x, y)
        m.predict(x)
        vocab = cylstm.text.CharVocab("abcdefghij\n")
        cylstm.text.sample(m, vocab, prime="ab", length=5, seed=0)
        assert _blas_threads() == before


def test_concurrent_calls_restore_the_other_blas_once():
    before = _blas_threads()
    models = [_char_model() for _ in range(3)]
    x, y = _ids()
    barrier = threading.Barrier(3)
    errors = []

    def run(m):
        try:
            barrier.wait(10)
            for _ in range(3):
                m.fit(x, y, batch_size=8, epochs=1, verbose=0)
                m.predict(x)
        except BaseException as e:     # noqa: BLE001 (reported below)
            errors.append(e)

    ths = [threading.Thread(target=run, args=(m,)) for m in models]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    assert not errors
    assert _blas_threads() == before


def test_the_hold_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(cylstm._threads._OtherBlasHold, "enabled", False)
    before = _blas_threads()
    seen = _Seen()
    m = _char_model()
    m.fit(*_ids(), batch_size=8, epochs=1, verbose=0, callbacks=[seen])
    assert all(s == before for s in seen.seen)


# ---- NumPy's huge-page hint ---------------------------------------------------------------

def _hint():
    """NumPy's current madvise(MADV_HUGEPAGE) setting (read by setting it back)."""
    setter = _threads._madvise_setter()
    before = setter(True)
    setter(before)
    return before


class _SeenHint(cylstm.callbacks.Callback):
    def __init__(self):
        self.seen = []

    def on_batch_end(self, batch, logs):
        self.seen.append(_hint())


def test_numpy_has_the_hugepage_switch():
    """The switch exists in the NumPy CI installs (a private function: if a NumPy ever
    drops it, the hold becomes a no-op and this says so)."""
    assert _threads._madvise_setter() is not None


@pytest.mark.parametrize("start", [True, False])
def test_hugepage_hint_off_during_the_calls_and_restored(start):
    setter = _threads._madvise_setter()
    original = setter(start)
    try:
        m = _char_model()
        x, y = _ids()
        seen = _SeenHint()
        m.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[seen])
        assert seen.seen and not any(seen.seen)
        assert _hint() is start
        m.evaluate(x, y)
        m.predict(x)
        vocab = cylstm.text.CharVocab("abcdefghij\n")
        cylstm.text.sample(m, vocab, prime="ab", length=5, seed=0)
        assert _hint() is start
    finally:
        setter(original)


def test_the_hugepage_hold_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(cylstm._threads._HugePageHintHold, "enabled", False)
    setter = _threads._madvise_setter()
    original = setter(True)
    try:
        seen = _SeenHint()
        _char_model().fit(*_ids(), batch_size=8, epochs=1, verbose=0, callbacks=[seen])
        assert seen.seen and all(seen.seen)
    finally:
        setter(original)
