"""Initialisers: set a layer's (or a whole model's) parameters in place, seeded.

    init.pytorch_default(obj, seed=None)   torch.nn's defaults
    init.keras(obj, seed=None)             Keras's LSTM / Dense / Embedding defaults
    init.normal(obj, std=0.1, seed=None)   N(0, std) weights, zero biases
    init.apply(obj, scheme, seed=None)     by name: "pytorch", "keras", "normal",
                                           or ("normal", std)

``obj`` is a layer or anything with ``.layers`` (a Sequential); layers without parameters
are skipped. A scheme fills each parameter by the role its layer gives it
(``Layer.init_roles``: "table", "weight", "recurrent", "bias", "forget_bias"), so a new
layer is initialised by every scheme without a change here. A model's layers each get their own random stream
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
    """fill(role, shape, rng, layer) -> values for every parameter of every layer, one
    random stream per layer (spawned from ``seed``), in the layer's arena order."""
    layers = _layers(obj)
    for layer, ss in zip(layers, np.random.SeedSequence(seed).spawn(len(layers))):
        roles = layer.init_roles() if hasattr(layer, "init_roles") else []
        if not roles:
            if getattr(layer, "_layout", None):
                raise TypeError(f"{type(layer).__name__} has parameters but no init_roles()")
            continue
        rng = np.random.default_rng(ss)
        for name, role in roles:
            p = layer.params[name]
            p[...] = fill(role, p.shape, rng, layer)
        layer.after_init()
    return obj


def pytorch_default(obj, seed=None):
    """torch.nn's default initialisation (see the module docstring). Returns obj."""
    def fill(role, shape, rng, layer):
        if role == "table":
            return rng.standard_normal(shape)
        k = 1.0 / math.sqrt(layer.init_fan)
        return rng.uniform(-k, k, size=shape)
    return _each(obj, seed, fill)


def keras(obj, seed=None):
    """Keras's defaults (see the module docstring). Returns obj."""
    def fill(role, shape, rng, layer):
        if role == "table":
            return rng.uniform(-0.05, 0.05, size=shape)
        if role == "recurrent":
            return orthogonal(rng, shape)
        if role == "weight":
            return glorot_uniform(rng, shape)
        out = np.zeros(shape)
        if role == "forget_bias":                     # gates i, f, g, o: f starts at 1
            H = shape[0] // 4
            out[H:2 * H] = 1
        return out
    return _each(obj, seed, fill)


def normal(obj, std=0.1, seed=None):
    """Weights N(0, std), biases 0. Returns obj."""
    if isinstance(std, bool) or not isinstance(std, numbers.Real) or not std >= 0 \
            or not math.isfinite(std):
        raise ValueError(f"std must be a finite number >= 0, got {std!r}")

    def fill(role, shape, rng, layer):
        if role in ("bias", "forget_bias"):
            return np.zeros(shape)
        return rng.normal(0.0, std, size=shape)
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
