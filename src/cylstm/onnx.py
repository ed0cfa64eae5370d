"""ONNX in and out: ``export(model, path)`` writes an ONNX graph, ``load(path)`` reads one.

    import cylstm.onnx
    cylstm.onnx.export(model, "model.onnx")          # an LSTM or a Sequential
    model = cylstm.onnx.load("model.onnx")           # ours, or torch.onnx.export's nn.LSTM

Needs the ``onnx`` package (``pip install "cylstm[onnx]"``); ``import cylstm`` never
imports it. This module is ``cylstm.onnx``: the ``import onnx`` inside its functions
is an absolute import and gets the onnx package, never this file.

The graph (opset 17; T and B/N are symbolic, so any batch and any length run):

* An ``LSTM``'s inputs: ``x`` (T, B, I), or (B, T, I) when ``batch_first``; with
  ``lengths=True`` ``lengths`` (B,) int64 (PyTorch's packed semantics); with
  ``initial_state=True`` ``h0`` (L*D, B, Hp) and ``c0`` (L*D, B, H). Outputs ``y`` (as
  cylstm's, zeros past each length), ``h_n`` (L*D, B, Hp) and ``c_n`` (L*D, B, H).
* A ``Sequential`` takes ``x`` (N, T, F) floats, or (N, T) int64 token ids when it starts
  with an Embedding, and ``lengths`` (N,) int64 (unless ``lengths=False``); its one
  output ``y`` is what ``predict`` returns: (N, K) after a LastStep, else (N, T, K)
  with zeros past each length. Embedding is a ``Gather``, Linear ``MatMul`` + ``Add``,
  Dropout an ONNX ``Dropout`` (the identity at inference; its ratio is kept so the
  graph loads back as the same layer), LastStep a ``GatherElements`` at ``lengths - 1``
  (step T - 1 without lengths; step 0 for a bidirectional LSTM's reverse features).

Each LSTM layer is written in one of two forms (``export``'s ``lstm_op``):

* ONNX's ``LSTM`` operator, one node per layer, both directions in it, ``lengths`` as
  its ``sequence_lens``: the form other tools read, and the default for float32 LSTMs
  without projection. ONNX orders the gates i, o, f, c where PyTorch (and cylstm) use
  i, f, g, o, so the rows of every weight and bias are permuted on the way out and back
  on the way in; W (D, 4H, I), R (D, 4H, H), B (D, 8H) = [b_ih, b_hh]. With
  ``sequence_lens``, ONNX Runtime's reverse direction starts at each sequence's last
  valid step and the padded outputs are zero, as in PyTorch (the tests check this).
* ``Scan`` loops of basic operators (MatMul, Add, Split, Sigmoid, Tanh, Mul, Where), one
  per direction, holding the weights under their PyTorch names: the default for float64
  (ONNX Runtime runs its LSTM operator in float32 only) and for ``proj_size`` (the
  operator has no projection; ``lstm_op=True`` with one is refused, naming the layer).

An LSTM's inter-layer ``dropout``, ``recurrent_dropout`` and ``weight_dropout`` act in
training only and are not written.
"""

import os

import numpy as np

from .embedding import Embedding
from .layers import LSTM, Dropout, LastStep, Linear

__all__ = ["export", "load", "OPSET"]

OPSET = 17

# ONNX gate order [i o f c] from PyTorch's [i f g o] (row blocks of H), and back
_TO_ONNX = (0, 3, 1, 2)
_FROM_ONNX = (0, 2, 3, 1)


def _require_onnx():
    try:
        import onnx
    except ImportError:
        raise ImportError("cylstm.onnx needs the onnx package: pip install \"cylstm[onnx]\""
                          ) from None
    return onnx


def _gates(w, H, order):
    return np.concatenate([w[k * H:(k + 1) * H] for k in order])


class _Graph:
    """Nodes, initializers and unique names for one graph being built."""

    def __init__(self, dtype):
        from onnx import helper, numpy_helper, TensorProto
        self.helper, self.numpy_helper = helper, numpy_helper
        self.elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.DOUBLE
        self.dtype = dtype
        self.nodes, self.inits, self._n = [], [], 0
        self.scope = ""           # a prefix for node names: load skips a Scan layer's nodes

    def name(self, base):
        self._n += 1
        return f"{base}_{self._n}"

    def const(self, value, base, dtype=None):
        a = np.asarray(value, dtype=dtype)
        name = self.name(base)
        self.inits.append(self.numpy_helper.from_array(np.array(a, order="C"), name))
        return name

    def raw_const(self, value, name):
        """An initializer under exactly ``name`` (a parameter's own name)."""
        self.inits.append(self.numpy_helper.from_array(np.array(value, order="C"), name))
        return name

    def node(self, op, inputs, base, n_out=1, name=None, **attrs):
        outs = [self.name(f"{base}_out{k}" if n_out > 1 else base) for k in range(n_out)]
        self.nodes.append(self.helper.make_node(op, list(inputs), outs,
                                                name=name or self.scope + self.name(op),
                                                **attrs))
        return outs if n_out > 1 else outs[0]


def _lstm_nodes(g, lstm, x, lengths32, h0, c0, prefix, lstm_op):
    """Every layer of ``lstm`` on time-major x (T, B, I); returns (y (T, B, D*Hp),
    [h_n of each layer and direction (1, B, Hp)], [c_n ... (1, B, H)])."""
    name = prefix.rstrip(".")
    where = f"layers[{name}] " if name else ""
    if lstm_op is None:
        lstm_op = lstm.dtype == np.float32 and not lstm.proj_size
    if lstm_op and lstm.proj_size:
        raise ValueError(f"{where}{lstm!r}: ONNX's LSTM operator has no projection "
                         f"(proj_size={lstm.proj_size}); export it with lstm_op=False (a "
                         "Scan of basic operators) instead")
    build = _lstm_op_layer if lstm_op else _scan_layer
    inp, hs, cs = x, [], []
    for layer in range(lstm.num_layers):
        inp, h, c = build(g, lstm, layer, inp, lengths32, h0, c0, prefix)
        hs += h
        cs += c
    return inp, hs, cs


def _lstm_op_layer(g, lstm, layer, inp, lengths32, h0, c0, prefix):
    """One ONNX LSTM node for both directions of ``layer``."""
    D, H, p = lstm.num_directions, lstm.hidden_size, lstm.params
    sfx = [lstm._suffix(layer, d) for d in range(D)]
    W = np.stack([_gates(p["weight_ih" + s], H, _TO_ONNX) for s in sfx])
    R = np.stack([_gates(p["weight_hh" + s], H, _TO_ONNX) for s in sfx])
    ins = [inp, g.const(W, f"{prefix}W_l{layer}"), g.const(R, f"{prefix}R_l{layer}")]
    if lstm.bias:
        B = np.stack([np.concatenate([_gates(p["bias_ih" + s], H, _TO_ONNX),
                                      _gates(p["bias_hh" + s], H, _TO_ONNX)]) for s in sfx])
        ins.append(g.const(B, f"{prefix}B_l{layer}"))
    else:
        ins.append("")
    ins.append(lengths32 or "")
    if h0 is not None:
        rows = [g.const([layer * D], "start", np.int64),
                g.const([(layer + 1) * D], "end", np.int64)]
        ins += [g.node("Slice", [h0] + rows, "h0_l"), g.node("Slice", [c0] + rows, "c0_l")]
    while ins[-1] == "":
        ins.pop()
    Y, Yh, Yc = g.node("LSTM", ins, f"{prefix}lstm_l{layer}", n_out=3,
                       name=f"{prefix}lstm_l{layer}", hidden_size=H,
                       direction="bidirectional" if D == 2 else "forward")
    # Y (T, D, B, H) -> (T, B, D*H), the directions side by side as torch has them
    Yt = g.node("Transpose", [Y], "Yt", perm=[0, 2, 1, 3])
    y = g.node("Reshape", [Yt, g.const([0, 0, -1], "shape", np.int64)], "y")
    return y, [Yh], [Yc]


def _scan_layer(g, lstm, layer, inp, lengths32, h0, c0, prefix):
    """Both directions of ``layer`` as Scan loops of basic operators (MatMul, Add,
    Sigmoid, Tanh, Mul, Where), which ONNX Runtime runs in float64 too and which can
    project h. The weights are initializers under their PyTorch names (prefixed in a
    Sequential), so ``load`` reads them back by name."""
    from onnx import helper
    D, H, Hp, p = lstm.num_directions, lstm.hidden_size, lstm.state_size, lstm.params
    if lengths32 is not None and not hasattr(g, "step_mask"):
        # (T, B, 1) bool: step t of sequence b is valid; made once per graph
        T = g.node("Gather", [g.node("Shape", [inp], "xshape"),
                              g.const(np.array(0, np.int64), "zero")], "T", axis=0)
        steps = g.node("Range", [g.const(np.array(0, np.int32), "zero"),
                                 g.node("Cast", [T], "T32", to=6),
                                 g.const(np.array(1, np.int32), "one")], "steps")
        valid = g.node("Less", [g.node("Unsqueeze", [steps, g.const([1], "ax", np.int64)],
                                       "steps_t1"),
                                g.node("Unsqueeze", [lengths32, g.const([0], "ax", np.int64)],
                                       "lengths_1b")], "valid")
        g.step_mask = g.node("Unsqueeze", [valid, g.const([2], "ax", np.int64)], "step_mask")
    mask = g.step_mask if lengths32 is not None else None
    ys, hs, cs = [], [], []
    for d in range(D):
        sfx = lstm._suffix(layer, d)
        k = layer * D + d
        g.scope = f"{prefix}lstm{sfx}/"
        names = {n: f"{prefix}{n}{sfx}" for n in ("weight_ih", "weight_hh", "bias_ih",
                                                   "bias_hh", "weight_hr")}
        w_ih = g.raw_const(p["weight_ih" + sfx], names["weight_ih"])
        w_hh = g.raw_const(p["weight_hh" + sfx], names["weight_hh"])
        xw = g.node("MatMul", [inp, g.node("Transpose", [w_ih], "w_ih_t", perm=[1, 0])], "xw")
        if lstm.bias:
            b = g.node("Add", [g.raw_const(p["bias_ih" + sfx], names["bias_ih"]),
                               g.raw_const(p["bias_hh" + sfx], names["bias_hh"])], "b")
            xw = g.node("Add", [xw, b], "xwb")
        w_hh_t = g.node("Transpose", [w_hh], "w_hh_t", perm=[1, 0])
        w_hr_t = None
        if lstm.proj_size:
            w_hr_t = g.node("Transpose", [g.raw_const(p["weight_hr" + sfx],
                                                      names["weight_hr"])], "w_hr_t",
                            perm=[1, 0])
        if h0 is not None:
            kk = g.const(np.array(k, np.int64), "k")
            hk = g.node("Gather", [h0, kk], "h0_k", axis=0)
            ck = g.node("Gather", [c0, kk], "c0_k", axis=0)
        else:
            B1 = g.node("Slice", [g.node("Shape", [inp], "xshape"), g.const([1], "s", np.int64),
                                  g.const([2], "e", np.int64)], "B1")
            hk = g.node("Expand", [g.const(np.zeros((1, Hp), g.dtype), "zeros"),
                                   g.node("Concat", [B1, g.const([Hp], "Hp", np.int64)],
                                          "BHp", axis=0)], "h0_k")
            ck = g.node("Expand", [g.const(np.zeros((1, H), g.dtype), "zeros"),
                                   g.node("Concat", [B1, g.const([H], "H", np.int64)],
                                          "BH", axis=0)], "c0_k")
        body = _scan_body(g, H, Hp, w_hh_t, w_hr_t, mask is not None, f"{prefix}l{k}")
        scan_in = [xw] + ([mask] if mask is not None else [])
        hN, cN, Y = g.node("Scan", [hk, ck] + scan_in, f"{prefix}lstm{sfx}", n_out=3,
                           name=f"{prefix}lstm{sfx}",
                           body=body, num_scan_inputs=len(scan_in),
                           scan_input_directions=[d] * len(scan_in),
                           scan_output_directions=[d])
        g.scope = ""
        ys.append(Y)
        hs.append(g.node("Unsqueeze", [hN, g.const([0], "ax", np.int64)], "h_n"))
        cs.append(g.node("Unsqueeze", [cN, g.const([0], "ax", np.int64)], "c_n"))
    y = ys[0] if D == 1 else g.node("Concat", ys, "y", axis=2)
    return y, hs, cs


def _scan_body(g, H, Hp, w_hh_t, w_hr_t, masked, tag):
    """The step of one direction: (h, c, xw_t[, valid_t]) -> (h', c', y_t), gates in
    PyTorch's order i, f, g, o. Past a sequence's length the state is carried as it is
    and y_t is zero (Where picks, so nothing is rounded on the way)."""
    from onnx import helper
    h = helper
    n = lambda base: f"{tag}.{base}"                       # noqa: E731 (names in this body)
    vi = lambda name, shape, elem=g.elem: h.make_tensor_value_info(name, elem, shape)  # noqa
    inputs = [vi(n("h"), ["B", Hp]), vi(n("c"), ["B", H]), vi(n("xw"), ["B", 4 * H])]
    nodes = [h.make_node("MatMul", [n("h"), w_hh_t], [n("hr")]),
             h.make_node("Add", [n("xw"), n("hr")], [n("gates")]),
             h.make_node("Split", [n("gates"), n("split")], [n(k) for k in "ifgo"], axis=1),
             h.make_node("Sigmoid", [n("i")], [n("si")]),
             h.make_node("Sigmoid", [n("f")], [n("sf")]),
             h.make_node("Tanh", [n("g")], [n("tg")]),
             h.make_node("Sigmoid", [n("o")], [n("so")]),
             h.make_node("Mul", [n("sf"), n("c")], [n("fc")]),
             h.make_node("Mul", [n("si"), n("tg")], [n("ig")]),
             h.make_node("Add", [n("fc"), n("ig")], [n("c1")]),
             h.make_node("Tanh", [n("c1")], [n("tc")]),
             h.make_node("Mul", [n("so"), n("tc")], [n("h1") if w_hr_t is None else n("hh")])]
    if w_hr_t is not None:
        nodes.append(h.make_node("MatMul", [n("hh"), w_hr_t], [n("h1")]))
    inits = [g.numpy_helper.from_array(np.array([H] * 4, np.int64), n("split"))]
    if masked:
        from onnx import TensorProto
        inputs.append(vi(n("valid"), ["B", 1], TensorProto.BOOL))
        inits.append(g.numpy_helper.from_array(np.zeros((), g.dtype), n("zero")))
        nodes += [h.make_node("Where", [n("valid"), n("h1"), n("h")], [n("h_out")]),
                  h.make_node("Where", [n("valid"), n("c1"), n("c")], [n("c_out")]),
                  h.make_node("Where", [n("valid"), n("h1"), n("zero")], [n("y")])]
    else:
        nodes += [h.make_node("Identity", [n("h1")], [n("h_out")]),
                  h.make_node("Identity", [n("c1")], [n("c_out")]),
                  h.make_node("Identity", [n("h1")], [n("y")])]
    outputs = [vi(n("h_out"), ["B", Hp]), vi(n("c_out"), ["B", H]), vi(n("y"), ["B", Hp])]
    return h.make_graph(nodes, f"{tag}.step", inputs, outputs, initializer=inits)


def export(model, path, *, lengths=None, initial_state=False, lstm_op=None, opset=OPSET):
    """Write ``model`` (a ``cylstm.LSTM`` or a ``cylstm.Sequential`` of Embedding, LSTM,
    Dropout, LastStep and Linear layers) to ``path`` as an ONNX graph; returns the
    ``onnx.ModelProto`` (checked with ``onnx.checker.check_model``).

    ``lengths``: give the graph a ``lengths`` input (default: yes for a Sequential, no
    for an LSTM). ``initial_state``: give an LSTM's graph ``h0`` / ``c0`` inputs (an
    LSTM only). ``lstm_op``: True writes each LSTM layer as ONNX's LSTM operator (the
    form other tools read; no projection), False as Scan loops of basic operators (any
    dtype and proj_size, run by ONNX Runtime in float64 too); None (default) picks the
    operator for float32 LSTMs without projection, since ONNX Runtime runs its LSTM
    operator in float32 only. ``opset``: 14 or later.
    See the module docstring for the inputs and outputs.
    """
    onnx = _require_onnx()
    from .model import Sequential
    from onnx import TensorProto, helper

    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 14:
        raise ValueError(f"opset must be an int >= 14, got {opset!r}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file name (str or os.PathLike), got "
                        f"{type(path).__name__}")
    if lstm_op not in (None, True, False):
        raise TypeError(f"lstm_op must be None, True or False, got {lstm_op!r}")
    if isinstance(model, LSTM):
        layers, is_lstm = [model], True
    elif isinstance(model, Sequential):
        layers, is_lstm = list(model.layers), False
    else:
        raise TypeError(f"model must be a cylstm.LSTM or a cylstm.Sequential, got "
                        f"{type(model).__name__}")
    if lengths is None:
        lengths = not is_lstm
    lengths, initial_state = bool(lengths), bool(initial_state)
    if initial_state and not is_lstm:
        raise ValueError("initial_state=True is for an LSTM; a Sequential's graph starts "
                         "from zero states, as its predict does")
    dtype = np.dtype(model.dtype)
    g = _Graph(dtype)
    inputs = []
    sym_b, sym_t = ("N", "T") if not is_lstm else ("B", "T")

    if is_lstm:
        m = model
        D, H, L = m.num_directions, m.hidden_size, m.num_layers
        xshape = [sym_b, sym_t, m.input_size] if m.batch_first else [sym_t, sym_b, m.input_size]
        inputs.append(helper.make_tensor_value_info("x", g.elem, xshape))
    elif isinstance(layers[0], Embedding):
        inputs.append(helper.make_tensor_value_info("x", TensorProto.INT64, [sym_b, sym_t]))
    else:
        first = next((l for l in layers if isinstance(l, (LSTM, Linear))), None)
        feats = None if first is None else (
            first.input_size if isinstance(first, LSTM) else first.in_features)
        inputs.append(helper.make_tensor_value_info("x", g.elem, [sym_b, sym_t, feats]))
    lengths32 = None
    if lengths:
        inputs.append(helper.make_tensor_value_info("lengths", TensorProto.INT64, [sym_b]))
        lengths32 = g.node("Cast", ["lengths"], "lengths_int32", to=TensorProto.INT32)
    h0 = c0 = None
    if initial_state:
        h0, c0 = "h0", "c0"
        inputs += [helper.make_tensor_value_info("h0", g.elem, [L * D, sym_b, m.state_size]),
                   helper.make_tensor_value_info("c0", g.elem, [L * D, sym_b, H])]

    outputs = []
    if is_lstm:
        x = "x" if not m.batch_first else g.node("Transpose", ["x"], "x_tbi", perm=[1, 0, 2])
        y, hs, cs = _lstm_nodes(g, m, x, lengths32, h0, c0, "", lstm_op)
        if m.batch_first:
            y = g.node("Transpose", [y], "y_bti", perm=[1, 0, 2])
        g.nodes.append(helper.make_node("Identity", [y], ["y"], name="y"))
        for s, parts in (("h_n", hs), ("c_n", cs)):
            g.nodes.append(helper.make_node("Concat", parts, [s], name=s, axis=0)
                           if len(parts) > 1 else helper.make_node("Identity", parts, [s],
                                                                   name=s))
        outputs = [helper.make_tensor_value_info("y", g.elem, [
            *([sym_b, sym_t] if m.batch_first else [sym_t, sym_b]), D * m.state_size]),
                   helper.make_tensor_value_info("h_n", g.elem, [L * D, sym_b, m.state_size]),
                   helper.make_tensor_value_info("c_n", g.elem, [L * D, sym_b, H])]
    else:
        out, features, per_step = "x", None, True   # out is batch-first (N, T, F)
        for i, layer in enumerate(layers):
            prefix = f"{i}."
            if isinstance(layer, Embedding):
                out = g.node("Gather", [g.const(layer.weight, f"{i}.weight"), out],
                             f"{i}.embedded", name=f"{i}.embedding", axis=0)
                features = layer.embedding_dim
            elif isinstance(layer, LSTM):
                xt = g.node("Transpose", [out], f"{i}.x_tbf", perm=[1, 0, 2])
                y, _, _ = _lstm_nodes(g, layer, xt, lengths32, None, None, prefix, lstm_op)
                out = g.node("Transpose", [y], f"{i}.y_btf", perm=[1, 0, 2])
                features = layer.num_directions * layer.state_size
            elif isinstance(layer, Linear):
                out = g.node("MatMul", [out, g.const(layer.params["weight"].T,
                                                     f"{i}.weight_t")],
                             f"{i}.matmul", name=f"{i}.linear")
                if layer.bias:
                    out = g.node("Add", [out, g.const(layer.params["bias"], f"{i}.bias")],
                                 f"{i}.linear_bias", name=f"{i}.linear_bias")
                features = layer.out_features
            elif isinstance(layer, Dropout):
                # the ratio in float64 (any float type is allowed) so p loads back exactly
                ratio = g.const(np.array(layer.p, np.float64), f"{i}.ratio")
                out = g.node("Dropout", [out, ratio], f"{i}.dropout", name=f"{i}.dropout")
            elif isinstance(layer, LastStep):
                out = _last_step_nodes(g, layer, out, features, i)
                per_step = False
            else:   # pragma: no cover - Sequential admits only the types above
                raise TypeError(f"layers[{i}]: cannot export a {type(layer).__name__}")
        if per_step and lengths:
            out = _mask_nodes(g, out, "lengths")
        g.nodes.append(helper.make_node("Identity", [out], ["y"], name="y"))
        shape = [sym_b, sym_t, features] if per_step else [sym_b, features]
        outputs = [helper.make_tensor_value_info("y", g.elem, shape)]

    graph = helper.make_graph(g.nodes, "cylstm", inputs, outputs, initializer=g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="cylstm")
    # the oldest IR version that has this opset, so older runtimes read the file too
    proto.ir_version = helper.find_min_ir_version_for(list(proto.opset_import))
    onnx.checker.check_model(proto)
    onnx.save(proto, path)
    return proto


def _last_step_nodes(g, layer, x, features, i):
    """LastStep on batch-first x (N, T, F): the step lengths - 1 of each row (the last,
    T - 1, without a lengths input), and step 0 for the last r (reverse) features."""
    from onnx import TensorProto
    r = layer.reverse_features or 0
    if features is None:
        raise ValueError(f"layers[{i}]: LastStep needs a layer with a known feature count "
                         "before it to be exported")
    if _has_lengths(g):
        last = g.node("Sub", ["lengths", g.const(np.array(1, np.int64), "one")], f"{i}.last")
    else:
        shape = g.node("Shape", [x], f"{i}.shape")
        t = g.node("Gather", [shape, g.const(np.array(1, np.int64), "one")], f"{i}.T", axis=0)
        n = g.node("Gather", [shape, g.const(np.array(0, np.int64), "zero")], f"{i}.N", axis=0)
        t1 = g.node("Sub", [t, g.const(np.array(1, np.int64), "one")], f"{i}.T1")
        last = g.node("Expand", [t1, g.node("Unsqueeze", [n, g.const([0], "ax", np.int64)],
                                             f"{i}.N1")], f"{i}.last")
    idx = g.node("Unsqueeze", [last, g.const([1, 2], "axes", np.int64)], f"{i}.idx")
    shape = g.node("Shape", [x], f"{i}.xshape")
    n1f = g.node("Concat", [g.node("Slice", [shape, g.const([0], "s", np.int64),
                                              g.const([1], "e", np.int64)], f"{i}.n"),
                            g.const([1, features], "1f", np.int64)], f"{i}.n1f", axis=0)
    idx = g.node("Expand", [idx, n1f], f"{i}.idx_nf")
    picked = g.node("GatherElements", [x, idx], f"{i}.picked", name=f"{i}.laststep", axis=1)
    y = g.node("Squeeze", [picked, g.const([1], "ax", np.int64)], f"{i}.laststep_y")
    if r:
        first = g.node("Gather", [x, g.const(np.array(0, np.int64), "zero")], f"{i}.first",
                       name=f"{i}.laststep_reverse", axis=1)
        fwd = g.node("Slice", [y, g.const([0], "s", np.int64), g.const([features - r], "e",
                                                                       np.int64),
                               g.const([1], "ax", np.int64)], f"{i}.fwd")
        rev = g.node("Slice", [first, g.const([features - r], "s", np.int64),
                               g.const([features], "e", np.int64),
                               g.const([1], "ax", np.int64)], f"{i}.rev")
        y = g.node("Concat", [fwd, rev], f"{i}.laststep_both", axis=1)
    return y


def _has_lengths(g):
    return any(n.op_type == "Cast" and list(n.input) == ["lengths"] for n in g.nodes)


def _mask_nodes(g, y, lengths):
    """Zeros at steps t >= lengths[n] of batch-first y (N, T, K), as predict returns."""
    shape = g.node("Shape", [y], "yshape")
    t = g.node("Gather", [shape, g.const(np.array(1, np.int64), "one")], "T", axis=0)
    steps = g.node("Range", [g.const(np.array(0, np.int64), "zero"), t,
                             g.const(np.array(1, np.int64), "one")], "steps")
    valid = g.node("Less", [g.node("Unsqueeze", [steps, g.const([0], "ax", np.int64)], "s1t"),
                            g.node("Unsqueeze", [lengths, g.const([1], "ax", np.int64)],
                                   "ln1")], "valid")
    valid = g.node("Unsqueeze", [valid, g.const([2], "ax", np.int64)], "valid3")
    zero = g.const(np.array(0, g.dtype), "zero")
    return g.node("Where", [valid, y, zero], "masked", name="mask")


# ---- load -------------------------------------------------------------------------------

# Operators that only move, reshape, cast or pick data around the layers (torch's exporter
# adds them for batch_first, for the zero initial states and to merge directions), and
# the shape arithmetic feeding them. A graph with any other operator on its data path is
# refused, naming the node.
_GLUE = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Cast", "Concat",
         "Shape", "Constant", "ConstantOfShape", "Expand", "Slice", "Gather", "Range",
         "Less", "Sub", "Add", "Mul", "Div", "Equal", "Where", "Size"}
# ... of which these keep every value as it is (they select, repeat or reshape)
_KEEPS_VALUES = {"Slice", "Gather", "Expand", "Reshape", "Squeeze", "Unsqueeze", "Transpose",
                 "Identity", "Cast", "Concat"}
_OURS = __import__("re").compile(r"^(?:(\d+)\.)?lstm_l(\d+)(_reverse)?$")


def _node_label(node):
    return f"node {node.name or '(unnamed)'!r} (op {node.op_type})"


class _Reader:
    """What a graph's nodes compute, as a list of cylstm layer records."""

    def __init__(self, proto):
        from onnx import numpy_helper
        self.graph = g = proto.graph
        self.consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        for n in g.node:
            if n.op_type == "Constant":
                self.consts[n.output[0]] = self._constant_value(n)
        self.inputs = [i for i in g.input if i.name not in self.consts]
        if not self.inputs:
            raise ValueError("the graph has no input")
        # kind of every tensor: "data" (from x), "lengths", "state", "zeros", "const"
        self.kind = {name: "const" for name in self.consts}
        self.x = self.inputs[0].name
        self.kind[self.x] = "data"
        self.lengths = self.states = None
        states = []
        for i in self.inputs[1:]:
            elem = i.type.tensor_type.elem_type
            if elem in (6, 7):                            # INT32, INT64
                if self.lengths is not None:
                    raise ValueError(f"graph input {i.name!r}: a second integer input "
                                     f"(after {self.lengths!r}) is not understood")
                self.lengths = i.name
                self.kind[i.name] = "lengths"
            else:
                states.append(i.name)
                self.kind[i.name] = "state"
        if states and len(states) != 2:
            raise ValueError(f"graph inputs {states}: expected none, or h0 and c0")
        self.states = states or None
        self.scan_scopes = tuple(f"{n.name}/" for n in g.node if n.op_type == "Scan")

    @staticmethod
    def _constant_value(n):
        from onnx import numpy_helper
        for a in n.attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t)
            if a.name in ("value_float", "value_int"):
                return np.array(a.f if a.name == "value_float" else a.i)
            if a.name in ("value_floats", "value_ints"):
                return np.array(list(a.floats if a.name == "value_floats" else a.ints))
        raise ValueError(f"{_node_label(n)}: a Constant of a kind not understood")

    def const(self, name, node, what):
        if name not in self.consts:
            raise ValueError(f"{_node_label(node)}: its {what} ({name!r}) must be a constant "
                             f"(an initializer), not computed in the graph")
        return self.consts[name]

    def read(self):
        """The layer records in order, checking that they form one chain: each layer reads
        the output of the one before it (x for the first). Every data tensor carries the
        key of the layer that made it (``stamp``); a branch, a skip connection or a
        layer reading a final state breaks the chain and is refused, naming the node."""
        records = []
        self.stamp = {self.x: "input"}
        heads = ["input"]                      # the chain's layer keys so far
        scan_inputs = {}                       # a Scan's scope -> the stamp of its x

        def chain(node, t, want=None):
            want = heads[-1] if want is None else want
            if self.stamp.get(t) != want:
                raise ValueError(f"{_node_label(node)} reads {t!r}, which is not the output "
                                 "of the layer before it: branches, skip connections and "
                                 "layers reading a final state are not a cylstm model")

        def new_layer(record, node, key=None, states=()):
            key = key or f"{record[0]}#{len(records)}"
            records.append(record)
            heads.append(key)
            for k, t in enumerate(node.output):
                self.stamp[t] = ("state", key) if k in states else key
            self._set(node, "data")

        for node in self.graph.node:
            kinds = [self.kind.get(t, "const") for t in node.input if t]
            op = node.op_type
            data_in = [t for t in node.input if t and self.kind.get(t) == "data"]
            if node.name.startswith(self.scan_scopes):
                self._set(node, "skip")                   # a cylstm Scan layer's own nodes
                if op == "MatMul" and node.input[0] in self.stamp:
                    scan_inputs[node.name.split("/")[0]] = self.stamp[node.input[0]]
                continue
            if op == "LSTM":
                chain(node, node.input[0])
                new_layer(("lstm", node), node, states=(1, 2))
            elif op == "Scan":
                m = _OURS.match(node.name)
                if not m:
                    raise ValueError(f"{_node_label(node)}: only the Scan loops that "
                                     "cylstm.onnx.export writes for an LSTM are understood")
                key = "scan#" + node.name[:-len("_reverse")] if m.group(3) else \
                    "scan#" + node.name
                reverse_of_head = m.group(3) and heads[-1] == key
                want = heads[-2] if reverse_of_head else heads[-1]
                if scan_inputs.get(node.name) != want:
                    raise ValueError(f"{_node_label(node)}: its input is not the output of "
                                     "the layer before it")
                if reverse_of_head:
                    records.append(("scan", node))
                    for k, t in enumerate(node.output):
                        self.stamp[t] = ("state", key) if k < 2 else key
                    self._set(node, "data")
                else:
                    new_layer(("scan", node), node, key, states=(0, 1))
            elif op in ("Shape", "Size"):
                self._set(node, "const")                   # sizes only, not values
            elif not data_in:
                self._set(node, self._quiet_kind(node, kinds))
            elif op == "Gather" and node.input[0] in self.consts:
                chain(node, node.input[1])
                new_layer(("embedding", node), node)
            elif op in ("MatMul", "Gemm") and node.input[1] in self.consts:
                chain(node, node.input[0])
                new_layer(("linear" if op == "MatMul" else "gemm", node), node)
            elif op == "Add" and records and records[-1][0] == "linear" \
                    and len(records[-1]) == 2 and records[-1][1].output[0] in node.input \
                    and any(t in self.consts for t in node.input):
                records[-1] = ("linear", records[-1][1], node)
                self.stamp[node.output[0]] = heads[-1]
                self._set(node, "data")
            elif op == "Dropout":
                chain(node, node.input[0])
                new_layer(("dropout", node), node)
            elif op == "GatherElements" and node.name.endswith(".laststep"):
                chain(node, node.input[0])
                new_layer(("laststep", node), node)
            elif op == "Gather" and node.name.endswith(".laststep_reverse") and records \
                    and records[-1][0] == "laststep":
                chain(node, node.input[0], heads[-2])
                records[-1] = records[-1] + (node,)
                self.stamp[node.output[0]] = heads[-1]
                self._set(node, "data")
            elif op in ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Cast",
                        "Concat", "Where") or (op == "Slice" and records and
                                               records[-1][0] == "laststep"):
                if op == "Where" and not (node.input[2] in self.consts and not np.any(
                        self.consts[node.input[2]]) and node.input[1] in data_in
                        and self.kind.get(node.input[0]) != "data"):
                    raise ValueError(f"{_node_label(node)} is not supported: a Where on the "
                                     "data is read only as zeroing the steps past lengths")
                stamps = {self.stamp.get(t) for t in data_in}
                if len(stamps) == 1:
                    stamp = stamps.pop()
                elif op == "Concat" and all(isinstance(x, tuple) for x in stamps):
                    stamp = ("state", "stacked")           # final states of several layers
                else:
                    raise ValueError(f"{_node_label(node)} joins the outputs of different "
                                     "layers, which a cylstm model does not do")
                for t in node.output:
                    self.stamp[t] = stamp
                self._set(node, "data")
            else:
                raise ValueError(f"{_node_label(node)} is not supported: cylstm.onnx.load "
                                 "reads LSTM layers (ONNX's LSTM operator or cylstm's Scan "
                                 "loops), Embedding (Gather), Linear (MatMul + Add, Gemm), "
                                 "Dropout and cylstm's LastStep, joined by reshaping nodes")
        return records

    def _quiet_kind(self, node, kinds):
        """The kind of a node's outputs that do not come from x: "zeros" and "state" (a
        graph's h0/c0) pass only through nodes that keep every value as it is (so a
        state computed from h0 is not mistaken for h0's rows), "lengths" only through
        casts and reshapes (so sequence_lens is the lengths input itself); anything else
        is "const" or, from the lengths, "derived" (which only cylstm's own LastStep
        and padding mask read)."""
        op = node.op_type
        if op not in _GLUE:
            raise ValueError(f"{_node_label(node)} is not supported (outside the data path: "
                             "only shape arithmetic and the initial states are understood)")
        if op == "ConstantOfShape":
            value = [a.t for a in node.attribute if a.name == "value"]
            from onnx import numpy_helper
            v = numpy_helper.to_array(value[0]) if value else np.zeros(1)
            return "zeros" if not np.any(v) else "const"
        first = node.input[0] if node.input else ""
        kind = self.kind.get(first, "const")
        if kind == "const" and first in self.consts and not np.any(self.consts[first]) \
                and op == "Expand":
            kind = "zeros"
        if kind in ("zeros", "state") and op in _KEEPS_VALUES:
            if op != "Concat" or all(self.kind.get(t) == kind for t in node.input if t):
                return kind
        if kind == "lengths" and op in ("Cast", "Identity", "Reshape", "Squeeze",
                                        "Unsqueeze"):
            return "lengths"
        if any(k in ("lengths", "derived") for k in kinds):
            return "derived"
        return "const"

    def _set(self, node, kind):
        for t in node.output:
            self.kind[t] = kind


def _attrs(node):
    from onnx import helper
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _lstm_op_params(r, node):
    """(directions, hidden size, input size, [per direction: {"weight_ih": ..., ...} in
    PyTorch's layout], reads the lengths, starts from the h0/c0 inputs, proj size 0)
    of one ONNX LSTM node."""
    a = _attrs(node)
    label = _node_label(node)
    direction = a.get("direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    if direction not in ("forward", "bidirectional"):
        raise ValueError(f"{label}: direction {direction!r} is not supported (a cylstm LSTM "
                         "runs forward, or both ways when bidirectional)")
    acts = [x.decode() if isinstance(x, bytes) else x for x in a.get("activations", [])]
    if acts and [x.lower() for x in acts] != ["sigmoid", "tanh", "tanh"] * (len(acts) // 3):
        raise ValueError(f"{label}: activations {acts} are not supported (only Sigmoid, "
                         "Tanh, Tanh, as in PyTorch)")
    for key in ("clip", "activation_alpha", "activation_beta"):
        if key in a:
            raise ValueError(f"{label}: the attribute {key!r} is not supported")
    if a.get("input_forget", 0):
        raise ValueError(f"{label}: input_forget=1 (coupled gates) is not supported")
    if a.get("layout", 0):
        raise ValueError(f"{label}: layout=1 (batch-major) is not supported; time-major "
                         "graphs (layout 0, what torch.onnx.export writes) are")
    ins = list(node.input) + [""] * (8 - len(node.input))
    if ins[7] and np.any(r.const(ins[7], node, "peephole weights P")):
        raise ValueError(f"{label}: peephole weights (input P) are not supported")
    W = r.const(ins[1], node, "W")
    R = r.const(ins[2], node, "R")
    D = W.shape[0]
    H = int(a.get("hidden_size", R.shape[-1]))
    if W.ndim != 3 or R.shape != (D, 4 * H, H) or W.shape[1] != 4 * H:
        raise ValueError(f"{label}: W {W.shape} / R {R.shape} do not fit hidden_size {H}")
    per_dir = []
    for d in range(D):
        p = {"weight_ih": _gates(W[d], H, _FROM_ONNX), "weight_hh": _gates(R[d], H, _FROM_ONNX)}
        if ins[3]:
            B = r.const(ins[3], node, "B")
            p["bias_ih"] = _gates(B[d, :4 * H], H, _FROM_ONNX)
            p["bias_hh"] = _gates(B[d, 4 * H:], H, _FROM_ONNX)
        per_dir.append(p)
    lengths = bool(ins[4]) and r.kind.get(ins[4]) == "lengths"
    if ins[4] and not lengths:
        raise ValueError(f"{label}: its sequence_lens must come from an integer graph input")
    state = []
    for t in ins[5:7]:
        kind = r.kind.get(t, "const") if t else "zeros"
        if kind not in ("zeros", "state"):
            raise ValueError(f"{label}: its initial state must be zeros or a graph input")
        state.append(kind)
    if len(set(state)) != 1:
        raise ValueError(f"{label}: give both initial_h and initial_c, or neither")
    return D, H, W.shape[2], per_dir, lengths, state[0] == "state", 0


def _scan_params(r, node):
    """The same for one direction of a cylstm Scan layer, read by parameter name."""
    prefix, layer, rev = _OURS.match(node.name).groups()
    prefix = f"{prefix}." if prefix is not None else ""
    sfx = f"_l{layer}" + (rev or "")
    p = {}
    for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"):
        if prefix + n + sfx in r.consts:
            p[n] = r.consts[prefix + n + sfx]
    if "weight_ih" not in p or "weight_hh" not in p:
        raise ValueError(f"{_node_label(node)}: the initializers {prefix}weight_ih{sfx} and "
                         f"{prefix}weight_hh{sfx} it needs are missing")
    H = p["weight_ih"].shape[0] // 4
    P = p["weight_hr"].shape[0] if "weight_hr" in p else 0
    lengths = len(node.input) > 3
    state = _source(r, node.input[0])
    return 2 if rev else 1, H, p["weight_ih"].shape[1], [p], lengths, state == "state", P


def _source(r, tensor):
    """'state' if ``tensor`` is computed from a graph input h0/c0, else 'zeros'."""
    producers = {o: n for n in r.graph.node for o in n.output}
    seen, todo = set(), [tensor]
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        if r.kind.get(t) == "state":
            return "state"
        if t in producers:
            todo += [i for i in producers[t].input if i]
    return "zeros"


def _check_state_rows(r, nodes, D):
    """Each layer's initial state must be its own rows of h0/c0 (L*D, B, H), in
    PyTorch's order (layer by layer, forward then reverse), as cylstm takes them."""
    producers = {o: n for n in r.graph.node for o in n.output}
    k = 0                                          # the first row the next node should get
    for kind, node in nodes:
        n_dirs = D if kind == "lstm" else 1
        for t in (node.input[5:7] if kind == "lstm" else node.input[:2]):
            rows = None
            src = producers.get(t)
            if r.kind.get(t) == "state" and src is None:
                rows = (0, None)                   # the whole input: one node, all rows
            elif src is not None and src.op_type == "Slice" and len(src.input) >= 3 and \
                    all(i in r.consts for i in src.input[1:]):
                starts, ends = r.consts[src.input[1]], r.consts[src.input[2]]
                axes = r.consts[src.input[3]] if len(src.input) > 3 and src.input[3] else [0]
                if list(np.ravel(axes)) == [0] and len(np.ravel(starts)) == 1:
                    rows = (int(np.ravel(starts)[0]), int(np.ravel(ends)[0]))
            elif src is not None and src.op_type == "Gather" and src.input[1] in r.consts \
                    and _attrs(src).get("axis", 0) == 0 and r.consts[src.input[1]].ndim == 0:
                rows = (int(r.consts[src.input[1]]), int(r.consts[src.input[1]]) + 1)
            if rows is None or rows[0] != k or (rows[1] is not None and
                                                rows[1] != k + n_dirs) \
                    or (rows[1] is None and len(nodes) * n_dirs != n_dirs):
                raise ValueError(f"{_node_label(node)}: its initial state is not rows "
                                 f"{k}..{k + n_dirs - 1} of the h0/c0 inputs, as a cylstm "
                                 "(and PyTorch) LSTM takes them")
        k += n_dirs


def _group_key(node):
    m = _OURS.match(node.name)
    if m:
        return ("cylstm", m.group(1))
    return ("other", node.name.rsplit("/", 1)[0] if "/" in node.name else "")


def _build_lstm(r, nodes, dtype, batch_first):
    """One cylstm LSTM from consecutive LSTM/Scan records (its layers, in order)."""
    layers = []                              # [(D, H, I, [per direction], lengths, state, P)]
    for kind, node in nodes:
        info = (_lstm_op_params if kind == "lstm" else _scan_params)(r, node)
        if kind == "scan" and info[0] == 2:             # the reverse half of a layer
            if not layers or layers[-1][0] != 1 or len(layers[-1][3]) != 1:
                raise ValueError(f"{_node_label(node)}: a reverse Scan without its forward")
            prev = layers[-1]
            layers[-1] = (2, prev[1], prev[2], prev[3] + info[3], prev[4], prev[5], prev[6])
        else:
            layers.append(info)
    first = layers[0]
    D, H, I, P = first[0], first[1], first[2], first[6]
    for k, (d, h, i, _, ln, st, p) in enumerate(layers):
        if (d, h, p) != (D, H, P) or (k and i != D * (P or H)) or ln != first[4] \
                or st != first[5]:
            raise ValueError(f"{_node_label(nodes[0][1])} and the LSTM layers after it "
                             "differ in size, direction, lengths or initial state, so "
                             "they cannot be one cylstm LSTM")
    if first[5]:
        _check_state_rows(r, nodes, D)
    bias = any("bias_ih" in p for lay in layers for p in lay[3])
    lstm = LSTM(I, H, num_layers=len(layers), bias=bias, batch_first=batch_first,
                bidirectional=D == 2, proj_size=P, dtype=dtype)
    sd = {}
    for k, lay in enumerate(layers):
        for d, p in enumerate(lay[3]):
            sfx = lstm._suffix(k, d)
            for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"):
                if f"{n}{sfx}" in lstm.params:
                    sd[f"{n}{sfx}"] = p.get(n, np.zeros(lstm.params[f"{n}{sfx}"].shape))
    lstm.load_state_dict(sd)
    return lstm, first[4], first[5]


def load(path, dtype=None):
    """Read an ONNX graph into a cylstm model: a ``cylstm.LSTM`` when the graph is LSTM
    layers only, else a ``cylstm.Sequential`` (Embedding, LSTM, Dropout, LastStep,
    Linear). Reads what ``export`` writes (parameters come back bitwise) and what
    ``torch.onnx.export`` (``dynamo=False``) writes for a ``torch.nn.LSTM``, with
    initial states or Linear layers after it. ``path``: a file name or an
    ``onnx.ModelProto``. ``dtype``: float32 or float64 (default: the graph's).
    Anything else is a ValueError naming the node: an operator that is not one of
    these layers or reshaping between them, layers that do not form one chain (a skip
    connection, two heads, a head on h_n), initial states other than zeros or the
    h0/c0 inputs' own rows.

    A loaded Sequential takes batch-first input and lengths, as ``predict`` always does;
    a loaded LSTM is batch-first if the graph's input is (B, T, I). The layers are left
    in eval mode (as the graph computes).
    """
    onnx = _require_onnx()
    from .model import Sequential
    if isinstance(path, onnx.ModelProto):
        proto = path
    elif isinstance(path, (str, os.PathLike)):
        proto = onnx.load(path)
    else:
        raise TypeError(f"path must be a file name or an onnx.ModelProto, got "
                        f"{type(path).__name__}")
    r = _Reader(proto)
    records = r.read()
    if not records:
        raise ValueError("the graph has no layer that cylstm.onnx.load understands")
    floats = [a.dtype for a in r.consts.values() if a.dtype.kind == "f" and a.size > 1]
    if dtype is None:
        dtype = floats[0] if floats else np.float32
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype} (the graph's "
                        "parameters are converted to it)")
    batch_first = any(n.op_type == "Transpose" and list(n.input) == [r.x]
                      and list(_attrs(n).get("perm", [])) == [1, 0, 2] for n in r.graph.node)

    # consecutive LSTM records of one group make one LSTM
    groups = []
    for rec in records:
        if rec[0] in ("lstm", "scan") and groups and groups[-1][0] == "lstm_group" and \
                _group_key(groups[-1][1][-1][1]) == _group_key(rec[1]):
            groups[-1][1].append(rec)
        elif rec[0] in ("lstm", "scan"):
            groups.append(("lstm_group", [rec]))
        else:
            groups.append(rec)
    only_lstm = len(groups) == 1 and groups[0][0] == "lstm_group"
    layers, features, with_lengths, with_state = [], None, False, False
    for i, rec in enumerate(groups):
        kind = rec[0]
        if kind == "lstm_group":
            layer, ln, st = _build_lstm(r, rec[1], dtype, batch_first if only_lstm else True)
            with_lengths |= ln
            with_state |= st
            features = layer.num_directions * layer.state_size
        elif kind == "embedding":
            w = r.consts[rec[1].input[0]]
            if w.ndim != 2 or _attrs(rec[1]).get("axis", 0) != 0 or i:
                raise ValueError(f"{_node_label(rec[1])}: an embedding lookup must be the "
                                 "first layer and gather rows of a (V, D) table")
            layer = Embedding(w.shape[0], w.shape[1], dtype=dtype)
            layer.load_state_dict({"weight": w})
            features = w.shape[1]
        elif kind in ("linear", "gemm"):
            node = rec[1]
            w = r.consts[node.input[1]]
            b = None
            if kind == "gemm":
                a = _attrs(node)
                if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
                    raise ValueError(f"{_node_label(node)}: only Gemm(x, W, b) with "
                                     "transA=0, alpha=beta=1 is a Linear")
                w = w if a.get("transB", 0) else w.T
                if len(node.input) > 2 and node.input[2]:
                    b = r.const(node.input[2], node, "C (the bias)")
            else:
                w = w.T
                if len(rec) > 2:
                    b = next(r.consts[t] for t in rec[2].input if t in r.consts)
            if w.ndim != 2 or (b is not None and b.shape != (w.shape[0],)):
                raise ValueError(f"{_node_label(node)}: weight {w.shape} / bias "
                                 f"{None if b is None else b.shape} are not a Linear's")
            layer = Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=dtype)
            layer.load_state_dict({"weight": w, **({"bias": b} if b is not None else {})})
            features = w.shape[0]
        elif kind == "dropout":
            node = rec[1]
            p = float(r.const(node.input[1], node, "ratio")) if len(node.input) > 1 \
                and node.input[1] else 0.5
            layer = Dropout(p)
        else:                                               # laststep
            rev = 0
            if len(rec) > 2 and features is not None:
                rev_node = rec[2]
                sl = [n for n in r.graph.node if n.op_type == "Slice"
                      and list(n.input)[:1] == [rev_node.output[0]]]
                rev = features - int(r.const(sl[0].input[1], sl[0], "starts")[0]) if sl else 0
            layer = LastStep(reverse_features=rev)
        layer.eval()
        layers.append(layer)
    if only_lstm:
        return layers[0]
    if with_state:
        raise ValueError("the graph has initial-state inputs and layers besides the LSTM; "
                         "a cylstm Sequential starts from zero states")
    return Sequential(layers).eval()
