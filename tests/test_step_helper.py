"""LSTM.step's helper thread (_helper.h, _step.pyx): a small float32 step shares its parts
with one helper thread that the caller never waits for (it takes a late part back).

Checked here, never timed (bench/step_profile.py --stream times it, on an idle and on a
busy machine):
* the same bits as the step computed by the caller alone, for every layer count,
  projection, bias and odd sizes, with 2 and 3 parts;
* a helper that the OS does not run (it sleeps inside its part: the test hook) loses its
  part to the caller; its late result is thrown away, even when it finishes during a
  later step, after the weights changed in place, or after the runner is freed;
* two Python threads stepping their own models at once, and a forked child.
"""
import gc
import multiprocessing
import threading
import time

import numpy as np
import pytest

import cylstm
from cylstm import _step

pytestmark = pytest.mark.skipif(
    "dot" not in _step._kernel_levels(),
    reason="the helper serves the float32 dot kernel, which this CPU has not (BLAS steps)")

# (I, H, L, P, bias, B)
CASES = {
    "one layer": (256, 256, 1, 0, True, 1),
    "odd": (37, 45, 2, 0, True, 2),
    "projection": (20, 33, 3, 7, True, 3),
    "no bias": (9, 17, 1, 0, False, 1),
}


@pytest.fixture
def helper_mode():
    """Set the step's helper mode for the test (0 never, 2 always), restored after; the
    helper's delay is always reset."""
    previous = _step._set_helper_mode(1)
    try:
        yield _step._set_helper_mode
    finally:
        _step._set_helper_delay(0)
        _step._set_helper_mode(previous)


def run_steps(lstm, xs, n_parts, h0=None, between=None):
    """Step through xs (T, B, I) with a fresh state, calling the runner directly with
    n_parts parts and 2 threads; returns ys (T, B, Hp) and the final (h, c)."""
    state = lstm.initial_state(xs.shape[1], state=h0)
    lstm.step(xs[0], state)                     # builds the runner
    runner = state._runner
    ys = [state.h[-1].copy()]
    for t in range(1, xs.shape[0]):
        if between is not None:
            between(t)
        y = runner.run(xs[t], lstm.params, state.h, state.c, n_parts, 2)
        assert y is not None and y is not NotImplemented
        ys.append(y.copy())
    return np.stack(ys), state.h.copy(), state.c.copy()


def model(case, seed=0):
    I, H, L, P, bias, B = CASES[case]
    lstm = cylstm.LSTM(I, H, num_layers=L, proj_size=P, bias=bias, seed=seed)
    xs = np.random.default_rng(seed).standard_normal((12, B, I)).astype(np.float32)
    return lstm, xs


@pytest.mark.parametrize("n_parts", [2, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_helper_gives_the_bits_of_the_caller_alone(case, n_parts, helper_mode):
    """Streams of 12 steps, repeated until the helper has computed parts of them (it
    may first be napping); every stream gives the bits of the caller alone."""
    lstm, xs = model(case)
    helper_mode(0)
    want = run_steps(lstm, xs, n_parts)
    helper_mode(2)
    before = _step._helper_stats()["helped"]
    for _ in range(200):
        got = run_steps(lstm, xs, n_parts)
        for g, w in zip(got, want):
            assert np.array_equal(g, w)
        if _step._helper_stats()["helped"] > before:
            break
    after = _step._helper_stats()
    assert after["available"] and after["started"] == 1
    assert after["helped"] > before


def test_the_helper_takes_parts_in_a_long_stream(helper_mode):
    """On two cores the helper computes parts (not just the caller): within a bounded
    number of steps, at least one part comes from it."""
    lstm, xs = model("one layer")
    helper_mode(2)
    state = lstm.initial_state(1)
    before = _step._helper_stats()["helped"]
    for i in range(20000):
        lstm.step(xs[i % len(xs)], state)
        if i % 500 == 499 and _step._helper_stats()["helped"] > before:
            break
    assert _step._helper_stats()["helped"] > before


@pytest.mark.parametrize("case", ["one layer", "projection"])
def test_a_helper_that_does_not_run_loses_its_part_and_its_late_result(case, helper_mode):
    """The helper sleeps 3 ms inside every part it takes (as when the OS runs another
    process on its core): the caller takes each such part back and computes it, and the
    helper's result, finished during a later step, is thrown away."""
    lstm, xs = model(case)
    helper_mode(0)
    want = run_steps(lstm, xs, 2)
    helper_mode(2)
    _step._set_helper_delay(3_000_000)
    before = _step._helper_stats()["taken_back"]
    for _ in range(50):                        # until the helper has lost a part
        got = run_steps(lstm, xs, 2)
        for g, w in zip(got, want):
            assert np.array_equal(g, w)
        if _step._helper_stats()["taken_back"] > before:
            break
    _step._set_helper_delay(0)
    assert _step._helper_stats()["taken_back"] > before


def test_late_helper_with_weights_changed_in_place(helper_mode):
    """Between steps the weights change in place (an optimiser would): every step uses
    the weights of its own call, whatever a late helper read."""
    lstm, xs = model("one layer")
    w = lstm.params["weight_hh_l0"]

    def nudge(t):
        np.multiply(w, np.float32(0.99), out=w)

    original = w.copy()
    helper_mode(0)
    want = run_steps(lstm, xs, 2, between=nudge)
    w[...] = original
    helper_mode(2)
    _step._set_helper_delay(1_000_000)
    got = run_steps(lstm, xs, 2, between=nudge)
    _step._set_helper_delay(0)
    for g, wnt in zip(got, want):
        assert np.array_equal(g, wnt)


def test_freeing_a_runner_waits_for_a_late_helper(helper_mode):
    """A state (and its runner, whose buffers a late part reads) dropped while the
    helper is still inside that part: freeing waits for it; nothing is corrupted."""
    lstm, xs = model("one layer")
    helper_mode(0)
    want = run_steps(lstm, xs, 2)
    helper_mode(2)
    _step._set_helper_delay(20_000_000)
    for _ in range(3):
        state = lstm.initial_state(1)
        lstm.step(xs[0], state)
        state._runner.run(xs[1], lstm.params, state.h, state.c, 2, 2)
        del state                              # the helper still sleeps in its part
        gc.collect()
        # reuse the freed memory; a late part writing into it would show here
        junk = [np.full(n, np.nan, np.float32) for n in (256, 1024, 4096) * 16]
        time.sleep(0.03)                       # past the helper's sleep
        assert all(np.isnan(j).all() for j in junk)
        del junk
    _step._set_helper_delay(0)
    got = run_steps(lstm, xs, 2)
    for g, w in zip(got, want):
        assert np.array_equal(g, w)


def test_two_python_threads_step_at_once(helper_mode):
    """Only one job holds the helper at a time; the other caller runs its parts alone.
    Each stream gives the bits it gives alone."""
    models = [model("one layer", seed=s) for s in (1, 2)]
    helper_mode(0)
    wants = [run_steps(lstm, xs, 2) for lstm, xs in models]
    helper_mode(2)
    results = [None, None]
    errors = []

    def work(k):
        try:
            lstm, xs = models[k]
            out = []
            for _ in range(30):
                out.append(run_steps(lstm, xs, 2))
            results[k] = out
        except Exception as e:                 # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and all(not t.is_alive() for t in threads)
    for k in range(2):
        for got in results[k]:
            for g, w in zip(got, wants[k]):
                assert np.array_equal(g, w)


def _child(conn):
    lstm, xs = model("odd")
    _step._set_helper_mode(2)
    ys, h, c = run_steps(lstm, xs, 2)
    conn.send((ys, h, c))
    conn.close()


def test_a_forked_child_steps_with_the_same_bits(helper_mode):
    """After the helper ran in the parent, a forked child (where that thread does not
    exist) steps without hanging and gets the parent's bits."""
    lstm, xs = model("odd")
    helper_mode(2)
    want = run_steps(lstm, xs, 2)              # the parent's helper is running now
    assert _step._helper_stats()["started"] == 1
    ctx = multiprocessing.get_context("fork")
    a, b = ctx.Pipe()
    p = ctx.Process(target=_child, args=(b,))
    p.start()
    assert a.poll(120), "the forked child did not answer"
    got = a.recv()
    p.join(60)
    assert p.exitcode == 0
    for g, w in zip(got, want):
        assert np.array_equal(g, w)


def test_helper_mode_is_validated():
    with pytest.raises(ValueError, match="mode"):
        _step._set_helper_mode(3)
