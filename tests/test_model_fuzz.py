"""Hostile input to the model layer: fit / predict / evaluate and load either work or
raise ValueError / TypeError; nothing crashes (pytest runs under faulthandler)."""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import cylstm

# CI runs a fixed set of cases (derandomized); CYLSTM_FUZZ_EXAMPLES=N runs N random ones
# per property (as tests/test_fuzz.py), for a longer hunt by hand.
_N = int(os.environ.get("CYLSTM_FUZZ_EXAMPLES", "0"))
SETTINGS = dict(max_examples=_N or 150, deadline=None, derandomize=not _N,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

_DTYPES = st.sampled_from([np.float32, np.float64, np.float16, np.int8, np.int64, np.uint8,
                           np.bool_, np.complex64, object, "U3"])


def _array(dtype, shape):
    a = np.zeros(shape, dtype=dtype)
    if a.dtype.kind in "fc":
        a[...] = 0.5
    return a


@st.composite
def _hostile(draw):
    ndim = draw(st.integers(0, 4))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=ndim, max_size=ndim)))
    a = _array(draw(_DTYPES), shape)
    if draw(st.booleans()) and a.ndim >= 1:
        a = a[::-1]
    if draw(st.booleans()) and a.ndim >= 2:
        a = np.asfortranarray(a)
    if draw(st.booleans()):
        a.flags.writeable = False
    return a


_MODEL = cylstm.Sequential([cylstm.LSTM(3, 4, batch_first=True), cylstm.LastStep(),
                            cylstm.Linear(4, 2)], seed=0, loss="cross_entropy",
                           optimizer="sgd", lr=0.1, metrics=["accuracy"])
_TOKENS = cylstm.Sequential([cylstm.Embedding(5, 3), cylstm.LSTM(3, 4, batch_first=True),
                             cylstm.Linear(4, 5)], seed=0, loss="cross_entropy",
                            optimizer="adam", metrics=["bpc"])


def _ok_or_clean_error(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except (ValueError, TypeError) as e:
        assert str(e)                                  # says what was wrong


@settings(**SETTINGS)
@given(x=_hostile(), y=_hostile(),
       lengths=st.one_of(st.none(), hnp.arrays(np.int64, st.integers(0, 6),
                                               elements=st.integers(-2, 8))))
def test_fit_predict_evaluate_never_crash(x, y, lengths):
    for model in (_MODEL, _TOKENS):
        _ok_or_clean_error(model.predict, x, lengths=lengths)
        _ok_or_clean_error(model.evaluate, x, y, lengths=lengths)
        _ok_or_clean_error(model.fit, x, y, lengths=lengths, epochs=1, verbose=0)
        assert np.all(np.isfinite(model.flat_params))


@settings(**SETTINGS)
@given(labels=hnp.arrays(np.int64, 4, elements=st.integers(-200, 200)))
def test_labels_outside_the_classes_are_refused(labels):
    x = np.zeros((4, 3, 3), np.float32)
    before = _MODEL.flat_params.copy()
    if np.all((labels == 0) | (labels == 1) | (labels == -100)):   # -100: ignored
        _MODEL.fit(x, labels, epochs=1, verbose=0)
        return
    with pytest.raises(ValueError, match="targets must be class indices in 0..1"):
        _MODEL.fit(x, labels, epochs=1, verbose=0)
    np.testing.assert_array_equal(_MODEL.flat_params, before)


_SAVED = {}


def _model_bytes(tmp_path_factory):
    if "b" not in _SAVED:
        path = tmp_path_factory.mktemp("fuzz") / "m.npz"
        _TOKENS.save(path)
        _SAVED["b"] = path.read_bytes()
    return _SAVED["b"]


@settings(**SETTINGS)
@given(data=st.data())
def test_load_of_mutated_files_gives_a_clean_error_or_the_model(tmp_path_factory, data):
    good = bytearray(_model_bytes(tmp_path_factory))
    kind = data.draw(st.sampled_from(["flip", "cut", "splice", "random"]))
    if kind == "flip":
        for pos in data.draw(st.lists(st.integers(0, len(good) - 1), min_size=1, max_size=4)):
            good[pos] ^= data.draw(st.integers(1, 255))
    elif kind == "cut":
        good = good[:data.draw(st.integers(0, len(good) - 1))]
    elif kind == "splice":
        pos = data.draw(st.integers(0, len(good)))
        good[pos:pos] = data.draw(st.binary(min_size=1, max_size=64))
    else:
        good = bytearray(data.draw(st.binary(max_size=512)))
    path = tmp_path_factory.mktemp("bad") / "m.npz"
    path.write_bytes(bytes(good))
    try:
        model = cylstm.load(path)
    except ValueError as e:
        assert os.fspath(path) in str(e)
        return
    # a mutation the checks let through must have left every array intact
    np.testing.assert_array_equal(model.flat_params, _TOKENS.flat_params)
