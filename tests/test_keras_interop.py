"""cylstm.keras: Keras 3 LSTM weights (random, set on real Keras layers) give cylstm the
outputs and states Keras computes, within float32 rounding (float64: 1e-12 relative),
for one and two directions, with and without bias, stacked, go_backwards, masks over
right padding; what cylstm cannot compute is refused by name.

Keras runs here on its torch backend (KERAS_BACKEND, unless set already): its numpy
backend imports jax, which is not installed. Without keras (the ``keras`` extra) or a
backend these tests skip; CYLSTM_REQUIRE_INTEROP=1 makes that a failure (CI sets it)."""
import itertools
import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")       # before keras is imported

REQUIRE = os.environ.get("CYLSTM_REQUIRE_INTEROP", "") not in ("", "0")
if REQUIRE:
    import keras  # noqa: E402  (must be importable: no skip in CI)
else:
    keras = pytest.importorskip("keras")

import cylstm
import cylstm.keras as ckeras

from conftest import rel_err

TOL = {"float32": 1e-5, "float64": 1e-12}
B, T, I, H = 4, 7, 5, 6

# Keras's torch backend converts its tensors with numpy's pre-2.0 __array__ protocol
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def np_(a):
    return np.asarray(keras.ops.convert_to_numpy(a))


def randomise(layer, rng, dtype):
    """Weights U(-0.5, 0.5): a freshly built Keras layer has a zero bias (and the forget
    gate's at one), which would not test where the bias goes."""
    layer.set_weights([rng.uniform(-0.5, 0.5, w.shape).astype(dtype)
                       for w in layer.get_weights()])
    return layer


def keras_lstm(rng, dtype, bidirectional=False, **kw):
    inner = keras.layers.LSTM(H, dtype=dtype, **kw)
    layer = keras.layers.Bidirectional(inner, dtype=dtype) if bidirectional else inner
    layer.build((None, T, I))
    return randomise(layer, rng, dtype)


GRID = list(itertools.product(["float32", "float64"], [False, True], [True, False]))


@pytest.mark.parametrize("dtype,bidirectional,use_bias", GRID)
def test_outputs_match_keras(dtype, bidirectional, use_bias):
    rng = np.random.default_rng(GRID.index((dtype, bidirectional, use_bias)))
    x = rng.standard_normal((B, T, I)).astype(dtype)
    layer = keras_lstm(rng, dtype, bidirectional, use_bias=use_bias, return_sequences=True,
                       return_state=True)
    outs = [np_(o) for o in layer(x)]
    m = ckeras.from_keras(layer)
    assert (m.batch_first, m.bidirectional, m.bias, m.dtype) == \
        (True, bidirectional, use_bias, np.dtype(dtype))
    y, (h_n, c_n) = m(x)
    assert rel_err(y, outs[0]) < TOL[dtype]
    # Keras's states: [h, c], or [h_fwd, c_fwd, h_bwd, c_bwd] for a Bidirectional
    states = outs[1:]
    for d in range(m.num_directions):
        assert rel_err(h_n[d], states[2 * d]) < TOL[dtype]
        assert rel_err(c_n[d], states[2 * d + 1]) < TOL[dtype]
    if use_bias:          # Keras's one bias is in bias_ih, bias_hh is zero
        assert not np.any(m.params["bias_hh_l0"])
        assert np.array_equal(m.params["bias_ih_l0"],
                              (layer.forward_layer if bidirectional else layer)
                              .get_weights()[2].astype(dtype))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_return_sequences_false_is_the_last_step(bidirectional):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((B, T, I)).astype(np.float32)
    layer = keras_lstm(rng, "float32", bidirectional)
    ref = np_(layer(x))
    m = ckeras.from_keras(layer)
    y, (h_n, _) = m(x)
    last = cylstm.LastStep(m.state_size if bidirectional else 0).forward(y)
    assert rel_err(last, ref) < 1e-5
    assert rel_err(np.concatenate(list(h_n), axis=-1), ref) < 1e-5


def test_stacked_layers_and_load_into_an_existing_lstm():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((B, T, I)).astype(np.float32)
    first = keras_lstm(rng, "float32", True, return_sequences=True)
    second = keras.layers.Bidirectional(keras.layers.LSTM(H, return_sequences=True))
    second.build((None, T, 2 * H))
    randomise(second, rng, "float32")
    ref = np_(second(first(x)))
    m = ckeras.from_keras([first, second])
    assert m.num_layers == 2
    assert rel_err(m(x)[0], ref) < 1e-5
    # the method on LSTM, layer by layer, with arrays (get_weights lists) for layer 1
    other = cylstm.LSTM(I, H, num_layers=2, bidirectional=True, batch_first=True).eval()
    assert other.load_keras_weights(first, layer=0) is other
    other.load_keras_weights((second.forward_layer.get_weights(),
                              second.backward_layer.get_weights()), layer=1)
    assert all(np.array_equal(a, other.params[k]) for k, a in m.params.items())


def test_arrays_and_dicts():
    rng = np.random.default_rng(7)
    layer = keras_lstm(rng, "float32")
    k, r, b = layer.get_weights()
    sd = ckeras.state_dict([k, r, b], layer=2)
    assert set(sd) == {"weight_ih_l2", "weight_hh_l2", "bias_ih_l2", "bias_hh_l2"}
    assert np.array_equal(sd["weight_ih_l2"], k.T) and np.array_equal(sd["weight_hh_l2"], r.T)
    sd2 = ckeras.state_dict({"kernel": k, "recurrent_kernel": r})
    assert set(sd2) == {"weight_ih_l0", "weight_hh_l0"}


def test_go_backwards_is_the_reversed_input():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((B, T, I)).astype(np.float32)
    layer = keras_lstm(rng, "float32", go_backwards=True, return_sequences=True,
                       return_state=True)
    y_ref, h_ref, c_ref = (np_(o) for o in layer(x))
    with pytest.raises(ValueError, match="go_backwards"):
        ckeras.from_keras(layer)
    m = ckeras.from_keras(layer, ignore_go_backwards=True)
    y, (h_n, c_n) = m(x[:, ::-1])
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(h_n[0], h_ref) < 1e-5 and rel_err(c_n[0], c_ref) < 1e-5


def test_mask_over_right_padding_matches_lengths():
    """A Keras mask over right padding: cylstm with lengths gives Keras's final states
    and its return_sequences=False output (Keras repeats the last output on masked steps
    where cylstm writes zeros)."""
    rng = np.random.default_rng(9)
    lengths = np.array([7, 3, 1, 5])
    x = rng.standard_normal((B, T, I)).astype(np.float32)
    mask = np.arange(T)[None, :] < lengths[:, None]
    layer = keras_lstm(rng, "float32", return_sequences=True, return_state=True)
    y_ref, h_ref, c_ref = (np_(o) for o in layer(x, mask=mask))
    m = ckeras.from_keras(layer)
    y, (h_n, c_n) = m(x, lengths=lengths)
    assert rel_err(h_n[0], h_ref) < 1e-5 and rel_err(c_n[0], c_ref) < 1e-5
    assert rel_err(y[mask], y_ref[mask]) < 1e-5


@pytest.mark.parametrize("kw,message", [
    (dict(activation="relu"), "activation='relu'"),
    (dict(recurrent_activation="hard_sigmoid"), "recurrent_activation='hard_sigmoid'"),
])
def test_refuses_other_activations(kw, message):
    layer = keras_lstm(np.random.default_rng(0), "float32", **kw)
    with pytest.raises(ValueError, match=message):
        ckeras.from_keras(layer)


def test_refusals():
    rng = np.random.default_rng(1)
    layer = keras_lstm(rng, "float32")
    summed = keras.layers.Bidirectional(keras.layers.LSTM(H), merge_mode="sum")
    summed.build((None, T, I))
    with pytest.raises(ValueError, match="merge_mode='sum'"):
        ckeras.from_keras(summed)
    with pytest.raises(ValueError, match="hidden_size|has \\(24, 5\\)"):
        cylstm.LSTM(I, 8).load_keras_weights(layer)
    with pytest.raises(ValueError, match="use_bias=True"):
        cylstm.LSTM(I, H, bias=False).load_keras_weights(layer)
    with pytest.raises(ValueError, match="one-directional Keras weights"):
        cylstm.LSTM(I, H, bidirectional=True).load_keras_weights(layer)
    with pytest.raises(ValueError, match="proj_size"):
        cylstm.LSTM(I, H, proj_size=2).load_keras_weights(layer)
    with pytest.raises(ValueError, match="layer must be in 0..0"):
        cylstm.LSTM(I, H).load_keras_weights(layer, layer=1)
    with pytest.raises(TypeError, match="Keras LSTM or Bidirectional layer"):
        cylstm.LSTM(I, H).load_keras_weights("kernel")
    with pytest.raises(TypeError, match="Dense is not a Keras LSTM"):
        ckeras.from_keras(keras.layers.Dense(3))
    gru = keras.layers.GRU(H)
    gru.build((None, T, I))
    with pytest.raises(TypeError, match="GRU is not a Keras LSTM"):
        ckeras.from_keras(gru)
    with pytest.raises(ValueError, match="recurrent_kernel must be"):
        ckeras.state_dict([np.zeros((I, 4 * H)), np.zeros((H, 3 * H))])
    unbuilt = keras.layers.LSTM(H)
    with pytest.raises(ValueError, match="no weights yet"):
        ckeras.from_keras(unbuilt)
    # a refused load leaves the model as it was
    m = cylstm.LSTM(I, 8, seed=0)
    before = m.flat_params.copy()
    with pytest.raises(ValueError):
        m.load_keras_weights(layer)
    assert np.array_equal(m.flat_params, before)
