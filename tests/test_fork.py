"""A forked child process (multiprocessing's default start method on Linux) can use a
model whose parent already ran it: the kernels' OpenMP threads and the helper thread
that runs the reverse direction of a bidirectional layer must not deadlock the child."""
import multiprocessing as mp
import sys

import numpy as np
import pytest

import cylstm

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="fork start method")


def _child(model, x, queue):
    y, _ = model(x)
    queue.put(y)


def test_forked_child_runs_a_bidirectional_model():
    model = cylstm.LSTM(8, 16, num_layers=2, bidirectional=True, seed=0).eval()
    x = np.random.default_rng(0).standard_normal((12, 4, 8)).astype(np.float32)
    with cylstm.threads(2):
        y, _ = model(x)                     # the parent uses threads and the helper pool
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(model, x, queue))
    proc.start()
    try:
        got = queue.get(timeout=60)         # read before join: a child with queued data
    except Exception:                       # waits for it to be read before exiting
        proc.kill()
        pytest.fail("the forked child hung or failed")
    proc.join(30)
    assert proc.exitcode == 0
    assert np.array_equal(got, y)
