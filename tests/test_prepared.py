"""Prepared eval-mode forwards (cylstm.layers._Prepared): a second eval-mode call of the
same input layout runs the kernel calls the first one prepared, without functional's
checks. These tests hold it to the general path's results bit for bit, and check that
every change the recorded arguments depend on sends the call the general way again.
"""
import gc
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import cylstm
from cylstm import _isa, _threads, layers
from cylstm import functional as F


class _Calls:
    """The functional.lstm_layer_forward calls the LSTM module made, by weights."""

    def __init__(self):
        self.w_ih = []

    def of(self, lstm):
        """How many of them ran lstm's layers (0 for calls that ran prepared)."""
        mine = {id(a) for a in lstm.params.values()}
        return sum(id(w) in mine for w in self.w_ih)


@pytest.fixture
def general_calls(monkeypatch):
    calls = _Calls()
    real = F.lstm_layer_forward

    def counting(x, w_ih, *args, **kwargs):
        calls.w_ih.append(w_ih)
        return real(x, w_ih, *args, **kwargs)

    monkeypatch.setattr(layers.F, "lstm_layer_forward", counting)
    return calls


def _x(lstm, T, B, seed, dtype=None):
    rng = np.random.default_rng(seed)
    shape = (B, T, lstm.input_size) if lstm.batch_first else (T, B, lstm.input_size)
    return rng.standard_normal(shape).astype(dtype or lstm.dtype)


def _state(lstm, B, seed):
    rng = np.random.default_rng(seed)
    LD = lstm.num_layers * lstm.num_directions
    return (rng.standard_normal((LD, B, lstm.state_size)).astype(lstm.dtype),
            rng.standard_normal((LD, B, lstm.hidden_size)).astype(lstm.dtype))


def _general(lstm, x, state=None):
    """The general path's result on a copy of the model (no prepared calls there)."""
    twin = lstm.__class__(**lstm.get_config())
    twin.load_state_dict(lstm.state_dict())
    return twin.eval()(x, state)


def _same(a, b):
    (y, (h, c)), (y2, (h2, c2)) = a, b
    assert y.shape == y2.shape and y.dtype == y2.dtype
    assert np.array_equal(y, y2) and np.array_equal(h, h2) and np.array_equal(c, c2)


CONFIGS = [
    dict(),
    dict(num_layers=2),
    dict(bidirectional=True),
    dict(num_layers=2, bidirectional=True, batch_first=True),
    dict(proj_size=4),
    dict(num_layers=2, proj_size=4, bidirectional=True),
    dict(bias=False),
    dict(dtype="float64", num_layers=2),
    dict(checkpoint_every=2),
]


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "plain")
@pytest.mark.parametrize("T,B", [(1, 1), (9, 1), (12, 5)])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_prepared_calls_give_the_general_paths_bits(kw, T, B, n_threads, general_calls):
    lstm = cylstm.LSTM(6, 8, seed=3, **kw).eval()
    with cylstm.threads(n_threads):
        first = lstm(_x(lstm, T, B, 1))
        n = general_calls.of(lstm)
        assert n == lstm.num_layers * lstm.num_directions
        for seed in (2, 3):
            x, state = _x(lstm, T, B, seed), _state(lstm, B, seed)
            got = lstm(x, state)
            _same(got, _general(lstm, x, state))
        _same(lstm(_x(lstm, T, B, 1)), first)
    # a checkpointed inference of more than one segment has no single call to prepare;
    # every other config ran its later calls prepared
    segments = F.segment_steps(kw.get("checkpoint_every"), T, B) is not None
    assert (general_calls.of(lstm) > n) == segments


def test_batch_first_view_and_strided_rows(general_calls):
    """x read in place through its strides: a transposed batch-first view, and rows of
    a wider array (every other feature block). Each layout prepares its own calls."""
    lstm = cylstm.LSTM(5, 7, seed=4, num_layers=2).eval()
    base = _x(lstm, 6, 3, 5)
    wide = np.repeat(_x(lstm, 6, 3, 6), 2, axis=1)[:, ::2]       # B axis strided
    for x in (base, base.transpose(1, 0, 2).copy().transpose(1, 0, 2), wide):
        want = _general(lstm, x)
        _same(lstm(x), want)
        before = general_calls.of(lstm)
        _same(lstm(x), want)
        assert general_calls.of(lstm) == before          # the second call ran prepared


def test_in_place_weight_changes_are_seen(general_calls):
    lstm = cylstm.LSTM(4, 6, seed=5).eval()
    x = _x(lstm, 7, 2, 6)
    lstm(x)
    lstm.params["bias_hh_l0"][...] += 0.25        # the bias sum is recomputed per call
    lstm.params["weight_hh_l0"][...] *= 0.5       # weights are read in place
    n = general_calls.of(lstm)
    got = lstm(x)
    assert general_calls.of(lstm) == n                   # prepared
    _same(got, _general(lstm, x))
    lstm.load_state_dict({k: v * 1.5 for k, v in lstm.state_dict().items()})
    _same(lstm(x), _general(lstm, x))
    assert general_calls.of(lstm) == n


def test_replaced_parameter_arrays_go_the_general_way(general_calls):
    """A model moved into a Sequential gets new parameter arrays (views of the model's
    arena): its prepared calls read the old ones, so they must not run."""
    lstm = cylstm.LSTM(4, 6, seed=6).eval()
    x = _x(lstm, 5, 2, 7)
    want = lstm(x)
    old = lstm.params["weight_hh_l0"]
    model = cylstm.Sequential([lstm, cylstm.Linear(6, 3, seed=1)])
    assert lstm.params["weight_hh_l0"] is not old
    lstm.params["weight_hh_l0"][...] *= 2
    old[...] = 0                                   # the prepared calls would read this
    n = general_calls.of(lstm)
    got = lstm(x)
    assert general_calls.of(lstm) == n + 1
    _same(got, _general(lstm, x))
    assert not np.array_equal(got[0], want[0])


def test_settings_the_policies_read_go_the_general_way(general_calls, monkeypatch):
    lstm = cylstm.LSTM(6, 8, seed=7).eval()
    x = _x(lstm, 9, 3, 8)
    with cylstm.threads(2):
        lstm(x)
        two = F.get_num_threads()                  # 1 on a 1-core machine or serial build
    with cylstm.threads(1):                        # the thread count
        n = general_calls.of(lstm)
        lstm(x)
        assert general_calls.of(lstm) == n + (two != 1)
        lstm(x)
        assert general_calls.of(lstm) == n + (two != 1)
    lstm(x)                                        # the step-weight budget
    n = general_calls.of(lstm)
    budget = _threads.STEP_WEIGHT_BYTES
    monkeypatch.setattr(_threads, "STEP_WEIGHT_BYTES", 0)
    got = lstm(x)
    assert general_calls.of(lstm) == n + 1
    _same(got, _general(lstm, x))
    monkeypatch.setattr(_threads, "STEP_WEIGHT_BYTES", budget)
    for forced in (True, False):                   # functional's input-path hook
        monkeypatch.setattr(F, "_FORCE_INPUT_IN_STEP", forced)
        n = general_calls.of(lstm)
        got = lstm(x)
        assert general_calls.of(lstm) == n + 1
        _same(got, _general(lstm, x))
    monkeypatch.setattr(F, "_FORCE_INPUT_IN_STEP", None)
    if _isa.cpu_level() > 0:                      # the ISA level (BLAS at level 0)
        lstm(x)
        with _isa.use_level(0):
            n = general_calls.of(lstm)
            got = lstm(x)
            assert general_calls.of(lstm) == n + 1
            _same(got, _general(lstm, x))
    lstm.checkpoint_every = 3                      # inference segments
    n = general_calls.of(lstm)
    got = lstm(x)
    assert general_calls.of(lstm) > n
    _same(got, _general(lstm, x))


def test_other_inputs_take_the_general_path(general_calls):
    """Lengths, unbatched x, another dtype, another T: the general path (which checks
    and converts), and the prepared calls of the first layout still give its bits."""
    lstm = cylstm.LSTM(3, 5, seed=8).eval()
    x = _x(lstm, 6, 2, 9)
    first = lstm(x)
    for args in ((x, None, [6, 3]), (x[:, 0], None, None), (x.astype(np.float64), None, None),
                 (x[:4], None, None), (x.tolist(), None, None)):
        n = general_calls.of(lstm)
        lstm(*args)
        assert general_calls.of(lstm) == n + 1
    n = general_calls.of(lstm)
    _same(lstm(x), first)
    # x.tolist(), converted to a C-contiguous float32 array, prepared x's layout again
    assert general_calls.of(lstm) == n


def test_training_mode_never_runs_prepared(general_calls):
    lstm = cylstm.LSTM(3, 5, seed=9)
    x = _x(lstm, 6, 2, 10)
    lstm.eval()(x)
    lstm.train()
    n = general_calls.of(lstm)
    y, _ = lstm(x)
    assert general_calls.of(lstm) == n + 1
    dx, _ = lstm.backward(np.ones_like(y))          # the cache is the general path's
    assert dx.shape == x.shape
    lstm.eval()
    _same(lstm(x), _general(lstm, x))


def test_bad_state_in_a_prepared_call_is_a_clear_error():
    lstm = cylstm.LSTM(3, 5, seed=10).eval()
    x = _x(lstm, 4, 2, 11)
    lstm(x)
    lstm(x)
    with pytest.raises(ValueError, match=r"state\[0\] \(h\) must have shape \(1, 2, 5\)"):
        lstm(x, (np.zeros((1, 3, 5), np.float32), np.zeros((1, 2, 5), np.float32)))
    with pytest.raises(TypeError, match="state must be a pair"):
        lstm(x, np.zeros((1, 2, 5), np.float32))
    _same(lstm(x), _general(lstm, x))              # and the model is fine after


@pytest.mark.parametrize("prepared", [False, True], ids=["recording", "prepared"])
def test_calls_hold_no_caller_arrays(prepared):
    """Neither the call that records the kernel arguments nor one that runs them keeps
    the caller's x, the result or a layer's output alive."""
    lstm = cylstm.LSTM(3, 5, seed=11, num_layers=2).eval()
    if prepared:
        lstm(_x(lstm, 4, 2, 12))
    x = _x(lstm, 4, 2, 13)
    y, (h, c) = lstm(x)
    refs = [weakref.ref(a) for a in (x, y, h, c)]
    del x, y, h, c
    gc.collect()
    assert all(r() is None for r in refs)


def test_concurrent_prepared_calls_from_threads():
    lstm = cylstm.LSTM(6, 16, seed=12, num_layers=2, bidirectional=True).eval()
    xs = [_x(lstm, 20, 3, s) for s in range(8)]
    want = [_general(lstm, x) for x in xs]
    barrier = threading.Barrier(4)

    def work(k):
        barrier.wait()
        return [lstm(xs[(k + i) % len(xs)]) for i in range(3 * len(xs))]

    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(work, range(4)))
    for k, got in enumerate(results):
        for i, r in enumerate(got):
            _same(r, want[(k + i) % len(xs)])


def test_parameters_the_kernels_did_not_read_in_place_are_never_prepared(general_calls):
    """A parameter rebound to an array the general path must convert (Fortran order: a
    C-contiguous copy; float64 biases in a float32 model: converted, then added) gives
    a plan nothing could vouch for: such calls keep taking the general path, which sees
    in-place changes of the parameter."""
    lstm = cylstm.LSTM(4, 6, seed=13).eval()
    x = _x(lstm, 5, 2, 14)
    lstm.params["weight_hh_l0"] = np.asfortranarray(lstm.params["weight_hh_l0"])
    lstm(x)
    lstm.params["weight_hh_l0"][...] *= 2
    n = general_calls.of(lstm)
    got = lstm(x)
    assert general_calls.of(lstm) == n + 1
    _same(got, _general(lstm, x))
    lstm = cylstm.LSTM(4, 6, seed=13).eval()
    for name in ("bias_ih_l0", "bias_hh_l0"):
        lstm.params[name] = lstm.params[name].astype(np.float64) + 1e-3
    first = lstm(x)
    n = general_calls.of(lstm)
    _same(lstm(x), first)
    assert general_calls.of(lstm) == n + 1


def test_a_checkpointed_inference_of_several_segments_is_never_prepared(general_calls):
    """Inference with checkpoint_every runs segment by segment (T = 5 at B = 1024: two
    steps a segment); no single kernel call stands for it, so nothing is recorded."""
    lstm = cylstm.LSTM(3, 4, seed=15, checkpoint_every=2).eval()
    assert F.segment_steps(2, 5, 1024) is not None
    x = _x(lstm, 5, 1024, 16)
    first = lstm(x)
    n = general_calls.of(lstm)
    _same(lstm(x), first)
    assert general_calls.of(lstm) == n + 1
    _same(first, _general(lstm, x))
