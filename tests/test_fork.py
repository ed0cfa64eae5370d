"""Forked children (multiprocessing's default start method on Linux) can use a model
whose parent already ran it. GNU OpenMP's thread pool does not survive fork, so a child
forked after the kernels ran a team of threads runs them on one thread and warns once;
the helper thread of a bidirectional layer and every lock another thread may hold at
fork are made afresh in the child. Every wait has a timeout, so a regression fails
instead of hanging."""
import multiprocessing as mp
import sys
import threading
import warnings

import numpy as np
import pytest

import cylstm
from cylstm import _parallel, _threads

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="fork start method")

TIMEOUT = 120


def _child(model, x, queue):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y, _ = model(x)
        y2, _ = model(x)                    # a second call: still no hang, no new warning
    queue.put((y, y2, [(w.category.__name__, str(w.message)) for w in caught],
               cylstm.get_num_threads()))


def _run_forked(model, x):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(model, x, queue))
    proc.start()
    try:
        got = queue.get(timeout=TIMEOUT)    # read before join: a child with queued data
    except Exception:                       # waits for it to be read before exiting
        proc.kill()
        pytest.fail("the forked child hung or failed")
    proc.join(30)
    assert proc.exitcode == 0
    return got


def _big_model_and_input():
    """Big enough that the parent's kernels really form a team of two."""
    model = cylstm.LSTM(64, 256, seed=0).eval()
    x = np.random.default_rng(0).standard_normal((50, 16, 64)).astype(np.float32)
    return model, x


def _needs_two_threads():
    if not cylstm.openmp_enabled() or _threads.N_PARTS < 2:
        pytest.skip("a team of two needs an OpenMP build and two usable cores")


def test_forked_child_runs_a_bidirectional_model():
    model = cylstm.LSTM(8, 16, num_layers=2, bidirectional=True, seed=0).eval()
    x = np.random.default_rng(0).standard_normal((12, 4, 8)).astype(np.float32)
    with cylstm.threads(2):
        y, _ = model(x)                     # the parent uses threads and the helper pool
    got, again, _, _ = _run_forked(model, x)
    assert np.array_equal(got, y) and np.array_equal(again, y)


def test_child_forked_after_a_team_runs_on_one_thread_and_says_so_once():
    _needs_two_threads()
    model, x = _big_model_and_input()
    _parallel._reset_max_team()
    with cylstm.threads(2):
        y, _ = model(x)
    assert _threads.max_team() == 2, "the parent did not form a team: the test proves nothing"
    got, again, caught, n_threads = _run_forked(model, x)
    assert np.array_equal(got, y) and np.array_equal(again, y)   # thread count changes no bit
    assert n_threads == 1
    assert len(caught) == 1 and caught[0][0] == "RuntimeWarning", caught
    assert "fork" in caught[0][1] and "spawn" in caught[0][1] and "forkserver" in caught[0][1]
    # the parent itself keeps its threads
    assert cylstm.get_num_threads() == min(_parallel.openmp_max_threads(), _threads.N_PARTS)
    assert not _parallel.serial_only()


def _pool_task(args):
    model, x = args
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return model(x)[0]


def test_fork_pool_after_a_team():
    _needs_two_threads()
    model, x = _big_model_and_input()
    _parallel._reset_max_team()
    y, _ = model(x)
    assert _threads.max_team() == 2
    with mp.get_context("fork").Pool(2) as pool:
        result = pool.map_async(_pool_task, [(model, x)] * 4)
        try:
            outs = result.get(timeout=TIMEOUT)
        except mp.TimeoutError:
            pool.terminate()
            pytest.fail("a forked pool worker hung")
    for out in outs:
        assert np.array_equal(out, y)


def test_locks_held_by_another_thread_at_fork_do_not_deadlock_the_child():
    """A thread in the middle of a call holds the model's workspace lock (and possibly
    the BLAS pin's): the child must not wait for a thread that does not exist in it."""
    model, x = _big_model_and_input()
    y, _ = model(x)
    held, release = threading.Event(), threading.Event()

    def holder():
        with model._workspaces_lock:
            if isinstance(_threads.blas_single_threaded, _threads._GlobalBlasPin):
                with _threads.blas_single_threaded._lock:
                    held.set()
                    release.wait(TIMEOUT)
            else:
                held.set()
                release.wait(TIMEOUT)

    th = threading.Thread(target=holder)
    th.start()
    try:
        assert held.wait(TIMEOUT)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)   # fork with threads
            got, _, _, _ = _run_forked(model, x)
    finally:
        release.set()
        th.join()
    assert np.array_equal(got, y)
