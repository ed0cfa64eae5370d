"""Keras 3 LSTM weights into cylstm: ``load_lstm_weights``, ``from_keras``, ``state_dict``.

    import cylstm.keras
    lstm = cylstm.keras.from_keras(keras_lstm_layer)          # a new cylstm.LSTM
    lstm.load_keras_weights(keras_lstm_layer, layer=0)        # or into an existing one

A Keras LSTM layer holds ``kernel`` (I, 4H), ``recurrent_kernel`` (H, 4H) and ``bias``
(4H,), in ``get_weights()`` order, with the gates in the order i, f, c, o: PyTorch's
i, f, g, o, so no rows move. cylstm's weights are the transposes, ``weight_ih`` (4H, I)
and ``weight_hh`` (4H, H). Keras has one bias where PyTorch has two that are added: it
goes into ``bias_ih`` and ``bias_hh`` is zero, which computes the same gates.
``unit_forget_bias`` only sets the initial bias, so it changes nothing here. Keras's
``activation`` must be tanh and ``recurrent_activation`` sigmoid (what cylstm computes);
any other is refused. A ``keras.layers.Bidirectional`` around an LSTM with
``merge_mode="concat"`` becomes a bidirectional cylstm LSTM (forward features first,
as both concatenate them).

What maps (Keras data is batch-first, so the cylstm LSTM is ``batch_first=True``):
* ``return_sequences=True``: cylstm's ``y``; ``return_state=True``: its ``h_n``/``c_n``.
* ``return_sequences=False``: ``y[:, -1]``, which equals ``h_n[-1]`` (a bidirectional
  layer: ``concatenate([h_n[-2], h_n[-1]], -1)``, i.e. ``cylstm.LastStep`` after it).
* ``go_backwards=True``: Keras reads the sequence from its end and returns the outputs
  in that order: cylstm on ``x[:, ::-1]`` gives the same ``y`` and states.
* A Keras mask (``Embedding(mask_zero=True)``, ``Masking``) over right padding: pass
  cylstm the lengths; the states and ``return_sequences=False`` outputs agree, while
  Keras repeats the last output on masked steps where cylstm writes zeros.
* ``dropout`` / ``recurrent_dropout`` act in training only and are not carried over;
  ``stateful`` has no counterpart (pass the state to cylstm yourself).

This module never imports keras: it reads a layer through ``get_config()`` and
``get_weights()``, or takes the arrays themselves.
"""

import numpy as np

from .layers import LSTM, _positive_int

__all__ = ["state_dict", "load_lstm_weights", "from_keras"]


def _config(layer):
    try:
        return layer.get_config()
    except Exception as e:
        raise TypeError(f"weights: cannot read the Keras layer's config: {e}") from None


def _is_layer(obj):
    return hasattr(obj, "get_weights") and hasattr(obj, "get_config")


def _check_activations(cfg, what):
    act, rec = cfg.get("activation", "tanh"), cfg.get("recurrent_activation", "sigmoid")
    if act != "tanh" or rec != "sigmoid":
        raise ValueError(f"{what}: activation={act!r}, recurrent_activation={rec!r}; cylstm "
                         "computes PyTorch's LSTM, which needs tanh and sigmoid")


def _arrays(weights, what):
    """(kernel, recurrent_kernel, bias or None) from a list or a dict of arrays."""
    if isinstance(weights, dict):
        unknown = set(weights) - {"kernel", "recurrent_kernel", "bias"}
        if unknown or "kernel" not in weights or "recurrent_kernel" not in weights:
            raise ValueError(f"{what}: a dict needs the keys 'kernel', 'recurrent_kernel' "
                             f"and optionally 'bias', got {sorted(weights)}")
        parts = [weights["kernel"], weights["recurrent_kernel"], weights.get("bias")]
    elif isinstance(weights, (list, tuple)):
        if len(weights) not in (2, 3):
            raise ValueError(f"{what}: expected [kernel, recurrent_kernel, bias] (a Keras "
                             f"LSTM's get_weights()), got a list of {len(weights)} arrays")
        parts = list(weights) + [None] * (3 - len(weights))
    else:
        raise TypeError(f"{what} must be a Keras LSTM or Bidirectional layer, a list "
                        f"[kernel, recurrent_kernel, bias] or a dict of them, got "
                        f"{type(weights).__name__}")
    out = []
    for name, a in zip(("kernel", "recurrent_kernel", "bias"), parts):
        if a is None:
            out.append(None)
            continue
        a = np.asarray(a)
        if a.dtype.kind not in "biuf":
            raise TypeError(f"{what}: {name} must be real numbers, got {a.dtype}")
        out.append(a)
    k, r, b = out
    if r.ndim != 2 or r.shape[1] != 4 * r.shape[0]:
        raise ValueError(f"{what}: recurrent_kernel must be (H, 4H), got {r.shape}")
    H = r.shape[0]
    if k.ndim != 2 or k.shape[1] != 4 * H:
        raise ValueError(f"{what}: kernel must be (input_size, {4 * H}), got {k.shape}")
    if b is not None and b.shape != (4 * H,):
        raise ValueError(f"{what}: bias must be ({4 * H},), got {b.shape}")
    return k, r, b


def _directions(weights, what="weights", allow_backwards=False):
    """[(kernel, recurrent_kernel, bias), ...] for one or two directions, from a Keras
    layer or arrays (a pair of lists/dicts for the two directions of a Bidirectional)."""
    if _is_layer(weights):
        cfg = _config(weights)
        if "layer" in cfg and "merge_mode" in cfg:               # Bidirectional
            mode = cfg["merge_mode"]
            if mode != "concat":
                raise ValueError(f"{what}: Bidirectional merge_mode={mode!r}; only 'concat' "
                                 "is a bidirectional cylstm LSTM's output")
            fwd = getattr(weights, "forward_layer", None)
            bwd = getattr(weights, "backward_layer", None)
            if fwd is None or bwd is None:
                raise TypeError(f"{what}: this Bidirectional has no forward_layer / "
                                "backward_layer to read")
            # the backward layer reads the sequence from its end (go_backwards) and the
            # wrapper turns its outputs back: a cylstm reverse direction
            return _directions(fwd, f"{what}.forward_layer", allow_backwards) + \
                _directions(bwd, f"{what}.backward_layer", True)
        # by class: a GRU or SimpleRNN has the same config keys but other weights
        if not any(c.__name__ == "LSTM" for c in type(weights).__mro__) or "units" not in cfg:
            raise TypeError(f"{what}: {type(weights).__name__} is not a Keras LSTM layer")
        _check_activations(cfg, what)
        if cfg.get("go_backwards") and not allow_backwards:
            raise ValueError(f"{what}: go_backwards=True reads the sequence from its end; "
                             "load it and run cylstm on x[:, ::-1] (pass "
                             "ignore_go_backwards=True to load the weights anyway)")
        w = weights.get_weights()
        if not w:
            raise ValueError(f"{what}: the Keras layer has no weights yet (call it on an "
                             "input or build it first)")
        return [_arrays(list(w), what)]
    if isinstance(weights, tuple) and len(weights) == 2 and \
            all(isinstance(p, (list, tuple, dict)) for p in weights):
        return [_arrays(weights[0], f"{what}[0]"), _arrays(weights[1], f"{what}[1]")]
    return [_arrays(weights, what)]


def state_dict(weights, layer=0, ignore_go_backwards=False):
    """PyTorch-named arrays (``weight_ih_l{layer}``, ``weight_hh_...``, ``bias_ih_...``,
    ``bias_hh_...``, and ``..._reverse`` for a Bidirectional) from a Keras LSTM layer,
    a Bidirectional layer, ``get_weights()``'s list [kernel, recurrent_kernel, bias], a
    dict of those names, or a tuple of two such lists (forward, backward).
    A layer with ``go_backwards=True`` is refused unless ``ignore_go_backwards``: its
    weights are ordinary, but it computes cylstm's LSTM on the reversed input."""
    layer = _positive_int(layer, "layer", minimum=0)
    dirs = _directions(weights, "weights", bool(ignore_go_backwards))
    out = {}
    for d, (k, r, b) in enumerate(dirs):
        sfx = f"_l{layer}" + ("_reverse" if d else "")
        out[f"weight_ih{sfx}"] = np.ascontiguousarray(k.T)
        out[f"weight_hh{sfx}"] = np.ascontiguousarray(r.T)
        if b is not None:
            out[f"bias_ih{sfx}"] = b.copy()
            out[f"bias_hh{sfx}"] = np.zeros_like(b)
    return out


def load_lstm_weights(lstm, weights, layer=0, ignore_go_backwards=False):
    """Copy a Keras LSTM's weights (see ``state_dict`` for what ``weights`` may be) into
    layer ``layer`` of the cylstm ``lstm``; the other layers are left as they are.
    Shapes, bias and direction must match; nothing is copied if anything is wrong.
    Returns ``lstm``."""
    if not isinstance(lstm, LSTM):
        raise TypeError(f"lstm must be a cylstm.LSTM, got {type(lstm).__name__}")
    layer = _positive_int(layer, "layer", minimum=0)
    if layer >= lstm.num_layers:
        raise ValueError(f"layer must be in 0..{lstm.num_layers - 1} (num_layers="
                         f"{lstm.num_layers}), got {layer}")
    if lstm.proj_size:
        raise ValueError(f"{lstm!r} has proj_size={lstm.proj_size}; a Keras LSTM has no "
                         "projection")
    sd = state_dict(weights, layer, ignore_go_backwards)
    D = 2 if any(k.endswith("_reverse") for k in sd) else 1
    if D != lstm.num_directions:
        kinds = ("one-directional", "bidirectional")
        raise ValueError(f"weights: {kinds[D - 1]} Keras weights for a "
                         f"{kinds[lstm.num_directions - 1]} cylstm LSTM")
    has_bias = any(k.startswith("bias") for k in sd)
    if has_bias != lstm.bias:
        raise ValueError(f"weights: use_bias={has_bias} in Keras but bias={lstm.bias} in "
                         f"{lstm!r}")
    for name, a in sd.items():
        want = lstm.params[name].shape
        if a.shape != want:
            raise ValueError(f"weights: {name} would be {a.shape} but layer {layer} of "
                             f"{lstm!r} has {want} (Keras units = hidden_size, the kernel's "
                             f"rows = input size)")
    lstm.load_state_dict(sd, strict=False)
    return lstm


def from_keras(layers, dtype=None, ignore_go_backwards=False):
    """A new batch-first cylstm LSTM holding the weights of a Keras LSTM (or
    Bidirectional LSTM) layer, or of a list of such layers stacked in order (one cylstm
    layer each; all the same units and direction). ``dtype``: float32 or float64
    (default: the Keras weights')."""
    stack = list(layers) if isinstance(layers, (list, tuple)) and layers and \
        all(_is_layer(l) for l in layers) else [layers]
    dirs = [_directions(l, f"layers[{i}]", ignore_go_backwards)
            for i, l in enumerate(stack)]
    H = dirs[0][0][1].shape[0]
    D = len(dirs[0])
    bias = dirs[0][0][2] is not None
    for i, ds in enumerate(dirs):
        if len(ds) != D or ds[0][1].shape[0] != H or (ds[0][2] is not None) != bias:
            raise ValueError(f"layers[{i}]: every stacked layer needs the same units "
                             f"({H}), direction and use_bias as layers[0]")
    if dtype is None:
        dtype = np.result_type(*[a for ds in dirs for t in ds for a in t if a is not None])
        dtype = dtype if dtype in (np.float32, np.float64) else np.float32
    lstm = LSTM(dirs[0][0][0].shape[0], H, num_layers=len(stack), bias=bias,
                batch_first=True, bidirectional=D == 2, dtype=dtype)
    for i, l in enumerate(stack):
        load_lstm_weights(lstm, l, layer=i, ignore_go_backwards=ignore_go_backwards)
    return lstm.eval()
