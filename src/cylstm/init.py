"""Initialisers: set a layer's (or a whole model's) parameters in place, seeded.

    init.pytorch_default(obj, seed=None)   torch.nn's defaults
    init.keras(obj, seed=None)             Keras's LSTM / Dense / Embedding defaults
    init.normal(obj, std=0.1, seed=None)   N(0, std) weights, zero biases
    init.apply(obj, scheme, seed=None)     by name: "pytorch", "keras", "normal",
                                           or ("normal", std)

``obj`` is a layer (LSTM, Linear, Embedding) or anything with ``.layers`` (a Sequential);
layers without parameters are skipped. A model's layers each get their own random stream
spawned from ``seed``, so the same seed gives the same parameters whatever the dtype
(numbers are drawn in float64 and rounded once).

The schemes, per layer:

    pytorch  LSTM: every weight and bias U(-k, k), k = 1/sqrt(hidden_size)
             Linear: weight and bias U(-k, k), k = 1/sqrt(in_features)
             Embedding: N(0, 1)
    keras    LSTM: W_ih Glorot-uniform over the whole (4H, I) matrix, W_hh orthogonal
             (4H, Hp), W_hr Glorot-uniform; b_ih 1 on the forget gate and 0 elsewhere,
             b_hh 0 (their sum, the effective bias, is Keras's unit_forget_bias)
             Linear: Glorot-uniform weight, zero bias
             Embedding: U(-0.05, 0.05)
    normal   every weight (and embedding table) N(0, std), every bias 0
"""

import math
import numbers

import numpy as np

from .embedding import Embedding
from .layers import LSTM, Linear

__all__ = ["pytorch_default", "keras", "normal", "apply", "glorot_uniform", "orthogonal"]


def glorot_uniform(rng, shape):
    """U(-a, a), a = sqrt(6 / (fan_in + fan_out)), for a (fan_out, fan_in) weight."""
    fan_out, fan_in = shape
    a = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-a, a, size=shape)


def orthogonal(rng, shape):
    """A (rows, cols) matrix with orthonormal columns (rows >= cols) or rows (rows < cols),
    from the QR decomposition of a Gaussian matrix with the signs fixed (Saxe et al.)."""
    rows, cols = shape
    a = rng.standard_normal((max(rows, cols), min(rows, cols)))
    q, r = np.linalg.qr(a)
    q *= np.sign(np.diag(r))           # a uniform draw over orthogonal matrices
    return q if rows >= cols else q.T


def _layers(obj):
    return list(obj.layers) if hasattr(obj, "layers") else [obj]


def _each(obj, seed, fill):
    """Call fill(layer, rng) for every layer with parameters, one stream per layer."""
    layers = _layers(obj)
    for layer, ss in zip(layers, np.random.SeedSequence(seed).spawn(len(layers))):
        if isinstance(layer, (LSTM, Linear, Embedding)):
            fill(layer, np.random.default_rng(ss))
        elif getattr(layer, "params", None):
            raise TypeError(f"no initialiser for {type(layer).__name__}")
    return obj


def _is_bias(name):
    return name.startswith("bias")


def pytorch_default(obj, seed=None):
    """torch.nn's default initialisation (see the module docstring). Returns obj."""
    def fill(layer, rng):
        if isinstance(layer, Embedding):
            layer.weight[...] = rng.standard_normal(layer.weight.shape)
            if layer.padding_idx is not None:
                layer.weight[layer.padding_idx] = 0
            return
        size = layer.hidden_size if isinstance(layer, LSTM) else layer.in_features
        k = 1.0 / math.sqrt(size)
        for name, shape in layer._layout:
            layer.params[name][...] = rng.uniform(-k, k, size=shape)
    return _each(obj, seed, fill)


def keras(obj, seed=None):
    """Keras's defaults (see the module docstring). Returns obj."""
    def fill(layer, rng):
        if isinstance(layer, Embedding):
            layer.weight[...] = rng.uniform(-0.05, 0.05, size=layer.weight.shape)
            if layer.padding_idx is not None:
                layer.weight[layer.padding_idx] = 0
            return
        for name, shape in layer._layout:
            p = layer.params[name]
            if name.startswith("weight_hh"):
                p[...] = orthogonal(rng, shape)
            elif name.startswith("weight"):
                p[...] = glorot_uniform(rng, shape)
            elif name.startswith("bias_ih"):          # forget gate (order i, f, g, o) = 1
                H = shape[0] // 4
                p[...] = 0
                p[H:2 * H] = 1
            else:
                p[...] = 0
    return _each(obj, seed, fill)


def normal(obj, std=0.1, seed=None):
    """Weights N(0, std), biases 0. Returns obj."""
    if isinstance(std, bool) or not isinstance(std, numbers.Real) or not std >= 0 \
            or not math.isfinite(std):
        raise ValueError(f"std must be a finite number >= 0, got {std!r}")

    def fill(layer, rng):
        if isinstance(layer, Embedding):
            layer.weight[...] = rng.normal(0.0, std, size=layer.weight.shape)
            if layer.padding_idx is not None:
                layer.weight[layer.padding_idx] = 0
            return
        for name, shape in layer._layout:
            layer.params[name][...] = 0 if _is_bias(name) else rng.normal(0.0, std, size=shape)
    return _each(obj, seed, fill)


def apply(obj, scheme, seed=None):
    """Initialise by name: "pytorch", "keras", "normal" (std 0.1) or ("normal", std)."""
    if isinstance(scheme, (tuple, list)) and len(scheme) == 2 and scheme[0] == "normal":
        return normal(obj, scheme[1], seed)
    if scheme == "pytorch":
        return pytorch_default(obj, seed)
    if scheme == "keras":
        return keras(obj, seed)
    if scheme == "normal":
        return normal(obj, seed=seed)
    raise ValueError(f"init must be 'pytorch', 'keras', 'normal' or ('normal', std), "
                     f"got {scheme!r}")
