"""The thread policy's switches: below the named work sizes a kernel call runs on one
thread; force_parallel() makes every call form a real team (what the thread-count
invariance tests run under); the largest team is recorded from inside the regions."""
import numpy as np
import pytest

import cylstm
from cylstm import _parallel, _threads


def _tiny_call():
    model = cylstm.LSTM(4, 8, seed=1)
    x = np.random.default_rng(2).standard_normal((3, 4, 4)).astype(np.float32)
    y, _ = model(x)
    model.backward(np.ones_like(y))
    return y


def test_small_work_runs_on_one_thread_unless_forced():
    if not cylstm.openmp_enabled() or _threads.N_PARTS < 2:
        pytest.skip("a team of two needs an OpenMP build and two usable cores")
    _parallel._reset_max_team()
    with cylstm.threads(2):
        y1 = _tiny_call()
    assert _threads.max_team() <= 1              # below MIN_PARALLEL_MACS: no team
    with cylstm.threads(2), _threads.force_parallel():
        y2 = _tiny_call()
    assert _threads.max_team() == 2              # a team of two really ran
    assert np.array_equal(y1, y2)
    _parallel._reset_max_team()
    with cylstm.threads(1), _threads.force_parallel():
        _tiny_call()
    assert _threads.max_team() == 1              # threads(1) forms no team, forced or not


def test_force_parallel_restores_the_scale_and_thresholds_are_named():
    before = _parallel.set_min_work_scale(1.0)
    assert before == 1.0
    with _threads.force_parallel():
        assert _parallel.set_min_work_scale(0.0) == 0.0
    assert _parallel.set_min_work_scale(1.0) == 1.0
    with pytest.raises(ValueError):
        _parallel.set_min_work_scale(-1)
    t = _parallel.thresholds()
    assert set(t) == {"MIN_PARALLEL_MACS", "MIN_HELPER_MACS", "MIN_PARALLEL_XENT", "MIN_PARALLEL_COPY",
                      "MIN_PARALLEL_ELEMS", "MIN_PARALLEL_PASS", "PACK_MIN_STEPS"}
    assert _threads.PACK_MIN_STEPS == t["PACK_MIN_STEPS"] == cylstm.functional.PACK_MIN_STEPS


def test_run_pair_runs_both_at_once_and_raises_what_they_raise():
    """_parallel.run_pair (a bidirectional layer's two directions on two threads): both
    results in order, from two different threads of a team of two that really
    overlap (each waits until the other has started, so a pair run one after the other
    would time out), and an exception from either is raised after both ran."""
    import threading
    if not cylstm.openmp_enabled() or _threads.N_PARTS < 2:
        pytest.skip("a team of two needs an OpenMP build and two usable cores")
    started = [threading.Event(), threading.Event()]

    def call(i):
        started[i].set()
        assert started[1 - i].wait(timeout=30), "the other call did not run at once"
        return i, threading.get_ident()
    (a, ta), (b, tb) = _parallel.run_pair(lambda: call(0), lambda: call(1))
    assert (a, b) == (0, 1) and ta != tb and threading.get_ident() in (ta, tb)

    ran = []

    def fails():
        ran.append("f0")
        raise KeyError("f0")
    with pytest.raises(KeyError, match="f0"):
        _parallel.run_pair(fails, lambda: ran.append("f1"))
    assert sorted(ran) == ["f0", "f1"]
    with pytest.raises(ValueError, match="f1"):
        _parallel.run_pair(lambda: 0, lambda: (_ for _ in ()).throw(ValueError("f1")))

    def raises(e):
        raise e
    with pytest.raises(KeyError) as info:
        _parallel.run_pair(lambda: raises(KeyError("a")), lambda: raises(ValueError("b")))
    assert isinstance(info.value.__context__, ValueError)      # neither is lost


def test_bidirectional_layer_on_two_threads_is_bitwise_one_thread(monkeypatch):
    """The pair path of a bidirectional layer (forward and backward) gives the bits of
    the directions run one after the other."""
    if not cylstm.openmp_enabled() or _threads.N_PARTS < 2:
        pytest.skip("the pair path needs an OpenMP build and two usable cores")
    pairs = []
    real = _parallel.run_pair
    monkeypatch.setattr(_parallel, "run_pair",
                        lambda f0, f1: pairs.append(1) or real(f0, f1))
    lstm = cylstm.LSTM(16, 32, bidirectional=True, seed=3)
    x = np.random.default_rng(4).standard_normal((40, 9, 16)).astype(np.float32)
    lengths = np.random.default_rng(5).integers(1, 41, 9)
    out = {}
    for n in (1, 2):
        lstm.zero_grad()
        with cylstm.threads(n):
            y, (h, c) = lstm(x, lengths=lengths)
            dx, _ = lstm.backward(np.ones_like(y))
        out[n] = (y, h, c, dx, lstm.flat_grads.copy())
    assert len(pairs) == 2                  # threads(2): forward and backward ran as pairs
    for u, v in zip(out[1], out[2]):
        assert np.array_equal(u, v)
