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
