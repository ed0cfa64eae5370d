"""cylstm.onnx: exported graphs pass onnx.checker and ONNX Runtime computes what cylstm
does (float32 within 1e-5 relative, float64 within 1e-12) over a grid of LSTM and
Sequential options, ragged lengths and bidirectional layers included; export -> load
gives back bitwise the same parameters and outputs; torch.onnx.export's nn.LSTM graphs
load and agree with torch; what cannot be written or read is refused by name.

Without onnx/onnxruntime (the ``onnx`` extra) these tests skip; CYLSTM_REQUIRE_INTEROP=1
makes a missing package a failure instead (CI sets it). The torch tests also need torch
(required there by CYLSTM_REQUIRE_TORCH or CYLSTM_REQUIRE_INTEROP)."""
import itertools
import os
import warnings

import numpy as np
import pytest

REQUIRE = os.environ.get("CYLSTM_REQUIRE_INTEROP", "") not in ("", "0")
if REQUIRE:
    import onnx  # noqa: E402  (must be importable: no skip in CI)
    import onnxruntime as ort
else:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")

import cylstm
import cylstm.onnx as connx

from conftest import rel_err

TOL = {"float32": 1e-5, "float64": 1e-12}
LENGTHS = np.array([6, 2, 5, 1, 4])          # unsorted, one of length 1
T, B, I, H = 6, 5, 3, 4


def _torch():
    if REQUIRE or os.environ.get("CYLSTM_REQUIRE_TORCH", "") not in ("", "0"):
        import torch
        return torch
    return pytest.importorskip("torch")


def session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1             # the machine is shared: one thread is enough
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def same_params(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and np.array_equal(sa[k], sb[k]) for k in sa)


# ---- LSTM -------------------------------------------------------------------------------

LSTM_GRID = list(itertools.product(
    ["float32", "float64"], [False, True], [False, True], [False, True], [0, 2]))


@pytest.mark.parametrize("dtype,bidirectional,ragged,with_state,proj", LSTM_GRID)
def test_lstm_export_matches_onnxruntime(tmp_path, dtype, bidirectional, ragged, with_state,
                                         proj):
    k = LSTM_GRID.index((dtype, bidirectional, ragged, with_state, proj))
    num_layers, batch_first, bias = 1 + k % 2, bool(k // 2 % 2), k % 3 != 2
    m = cylstm.LSTM(I, H, num_layers=num_layers, bias=bias, batch_first=batch_first,
                    bidirectional=bidirectional, proj_size=proj, dtype=dtype, seed=k).eval()
    path = tmp_path / "lstm.onnx"
    connx.export(m, path, lengths=ragged, initial_state=with_state)
    onnx.checker.check_model(str(path))
    proto = onnx.load(str(path))
    used = {n.op_type for n in proto.graph.node}
    # the LSTM operator where ONNX Runtime runs it (float32, no projection), else Scan
    assert ("LSTM" in used) == (dtype == "float32" and not proj)
    sess = session(path)
    D, Hp = 2 if bidirectional else 1, proj or H
    rng = np.random.default_rng(k)
    for T_, B_ in ((T, B), (3, 2)):                    # T and B are symbolic
        x = rng.standard_normal((B_, T_, I) if batch_first else (T_, B_, I)).astype(dtype)
        feed, state, lengths = {"x": x}, None, None
        if ragged:
            lengths = np.minimum(LENGTHS[:B_], T_)
            feed["lengths"] = lengths
        if with_state:
            state = (rng.standard_normal((num_layers * D, B_, Hp)).astype(dtype),
                     rng.standard_normal((num_layers * D, B_, H)).astype(dtype))
            feed["h0"], feed["c0"] = state
        y, (h_n, c_n) = m(x, state, lengths)
        oy, oh, oc = sess.run(None, feed)
        for ours, theirs in ((y, oy), (h_n, oh), (c_n, oc)):
            assert theirs.dtype == ours.dtype and theirs.shape == ours.shape
            assert rel_err(ours, theirs) < TOL[dtype]
        if ragged:                                     # zeros past each length
            t = np.arange(T_)[:, None] >= lengths[None, :]
            assert not np.any((oy if not batch_first else oy.transpose(1, 0, 2))[t])


@pytest.mark.parametrize("bidirectional", [False, True])
def test_lstm_float32_both_forms_agree(tmp_path, bidirectional):
    """The LSTM operator and the Scan loops compute the same thing."""
    m = cylstm.LSTM(I, H, num_layers=2, bidirectional=bidirectional, seed=3).eval()
    x = np.random.default_rng(0).standard_normal((T, B, I)).astype(np.float32)
    outs = []
    for lstm_op in (True, False):
        connx.export(m, tmp_path / "m.onnx", lengths=True, lstm_op=lstm_op)
        outs.append(session(tmp_path / "m.onnx").run(None, {"x": x, "lengths": LENGTHS}))
    ref = m(x, lengths=LENGTHS)
    for a, b, r in zip(*outs, (ref[0], *ref[1])):
        assert rel_err(a, r) < 1e-5 and rel_err(b, r) < 1e-5


def test_lstm_graph_interface(tmp_path):
    m = cylstm.LSTM(I, H, num_layers=2, bidirectional=True, batch_first=True, seed=0)
    proto = connx.export(m, tmp_path / "m.onnx", lengths=True, initial_state=True)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(proto.graph.input) + list(proto.graph.output)}
    assert dims == {"x": ["B", "T", I], "lengths": ["B"], "h0": [4, "B", H],
                    "c0": [4, "B", H], "y": ["B", "T", 2 * H], "h_n": [4, "B", H],
                    "c_n": [4, "B", H]}
    assert proto.opset_import[0].version == connx.OPSET == 17
    node = next(n for n in proto.graph.node if n.op_type == "LSTM")
    assert onnx.helper.get_attribute_value(node.attribute[0]) in (b"bidirectional", H)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("proj", [0, 2])
def test_lstm_round_trip_bitwise(tmp_path, dtype, proj):
    for bidirectional, batch_first, bias, with_state in itertools.product([False, True],
                                                                           repeat=4):
        m = cylstm.LSTM(I, H, num_layers=2, bias=bias, batch_first=batch_first,
                        bidirectional=bidirectional, proj_size=proj, dtype=dtype,
                        seed=7).eval()
        connx.export(m, tmp_path / "m.onnx", lengths=True, initial_state=with_state)
        back = connx.load(tmp_path / "m.onnx")
        assert isinstance(back, cylstm.LSTM)
        assert back.get_config() == m.get_config()
        assert same_params(m, back)
        x = np.random.default_rng(1).standard_normal(
            (B, T, I) if batch_first else (T, B, I)).astype(dtype)
        y1, (h1, c1) = m(x, lengths=LENGTHS)
        y2, (h2, c2) = back(x, lengths=LENGTHS)
        assert np.array_equal(y1, y2) and np.array_equal(h1, h2) and np.array_equal(c1, c2)
    # a ModelProto loads as well as a file
    assert same_params(connx.load(onnx.load(str(tmp_path / "m.onnx"))), m)


# ---- Sequential -------------------------------------------------------------------------

SEQ_GRID = list(itertools.product(["float32", "float64"], [False, True], [False, True],
                                  [False, True]))


def make_sequential(dtype, tokens, last, bidirectional, seed=1):
    layers = [cylstm.Embedding(11, I, dtype=dtype)] if tokens else []
    out = 2 * 5 if bidirectional else 5
    layers += [cylstm.LSTM(I, H, bidirectional=True, dtype=dtype), cylstm.Dropout(0.3),
               cylstm.LSTM(2 * H, 5, num_layers=2, bidirectional=bidirectional, dtype=dtype)]
    if last:
        layers.append(cylstm.LastStep())
    layers += [cylstm.Linear(out, 3, dtype=dtype), cylstm.Dropout(0.1),
               cylstm.Linear(3, 2, bias=False, dtype=dtype)]
    return cylstm.Sequential(layers, seed=seed).eval()


@pytest.mark.parametrize("dtype,tokens,last,bidirectional", SEQ_GRID)
def test_sequential_export_matches_onnxruntime(tmp_path, dtype, tokens, last, bidirectional):
    m = make_sequential(dtype, tokens, last, bidirectional)
    rng = np.random.default_rng(2)
    x = rng.integers(0, 11, (B, T)) if tokens else rng.standard_normal((B, T, I)).astype(dtype)
    for with_lengths in (True, False):
        path = tmp_path / f"s{with_lengths}.onnx"
        connx.export(m, path, lengths=with_lengths)
        onnx.checker.check_model(str(path))
        lengths = LENGTHS if with_lengths else None
        feed = {"x": x, **({"lengths": LENGTHS} if with_lengths else {})}
        (out,) = session(path).run(None, feed)
        ref = m.predict(x, lengths=lengths)
        assert out.shape == ref.shape and out.dtype == ref.dtype
        assert rel_err(out, ref) < TOL[dtype]
        back = connx.load(path)
        assert [type(l) for l in back.layers] == [type(l) for l in m.layers]
        assert [l.get_config() for l in back.layers if not isinstance(l, cylstm.LSTM)] == \
            [l.get_config() for l in m.layers if not isinstance(l, cylstm.LSTM)]
        assert same_params(m, back)
        assert np.array_equal(back.predict(x, lengths=lengths), ref)


# ---- torch.onnx.export's graphs ---------------------------------------------------------

def torch_export(torch, module, x, path, names):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the TorchScript-based exporter (dynamo=False) runs offline
        torch.onnx.export(module, (x,), str(path), dynamo=False, input_names=["x"],
                          output_names=names, dynamic_axes={"x": {0: "a", 1: "b"}},
                          opset_version=17)


TORCH_GRID = list(itertools.product(["float32", "float64"], [1, 2], [False, True],
                                    [False, True], [True, False]))


@pytest.mark.parametrize("dtype,num_layers,bidirectional,batch_first,bias", TORCH_GRID)
def test_load_torch_onnx_export(tmp_path, dtype, num_layers, bidirectional, batch_first,
                                bias):
    torch = _torch()
    torch.manual_seed(num_layers + 2 * bidirectional)
    tdt = getattr(torch, dtype)
    tm = torch.nn.LSTM(I, H, num_layers=num_layers, bias=bias, batch_first=batch_first,
                       bidirectional=bidirectional, dtype=tdt).eval()
    x = torch.randn(B, T, I, dtype=tdt)
    torch_export(torch, tm, x, tmp_path / "t.onnx", ["y", "h_n", "c_n"])
    m = connx.load(tmp_path / "t.onnx")
    assert isinstance(m, cylstm.LSTM) and m.dtype == np.dtype(dtype)
    assert (m.num_layers, m.bidirectional, m.batch_first, m.bias) == \
        (num_layers, bidirectional, batch_first, bias)
    # the parameters are torch's, bitwise (torch's exporter reorders the gates too)
    sd = tm.state_dict()
    assert set(sd) == set(m.params)
    assert all(np.array_equal(v.numpy(), m.params[k]) for k, v in sd.items())
    with torch.no_grad():
        ty, (th, tc) = tm(x)
    cy, (ch, cc) = m(x.numpy())
    for a, b in ((ty, cy), (th, ch), (tc, cc)):
        assert rel_err(a.numpy(), b) < TOL[dtype]


@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, True)])
def test_load_torch_export_with_initial_state(tmp_path, num_layers, bidirectional):
    torch = _torch()
    torch.manual_seed(4)
    tm = torch.nn.LSTM(I, H, num_layers=num_layers, bidirectional=bidirectional).eval()
    LD = num_layers * (2 if bidirectional else 1)
    x, h0, c0 = torch.randn(T, B, I), torch.randn(LD, B, H), torch.randn(LD, B, H)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(tm, (x, (h0, c0)), str(tmp_path / "s.onnx"), dynamo=False,
                          input_names=["x", "h0", "c0"], output_names=["y", "h_n", "c_n"],
                          dynamic_axes={"x": {0: "T", 1: "B"}, "h0": {1: "B"},
                                        "c0": {1: "B"}}, opset_version=17)
    m = connx.load(tmp_path / "s.onnx")
    with torch.no_grad():
        ty, (th, tc) = tm(x, (h0, c0))
    cy, (ch, cc) = m(x.numpy(), (h0.numpy(), c0.numpy()))
    for a, b in ((ty, cy), (th, ch), (tc, cc)):
        assert rel_err(a.numpy(), b) < 1e-5


def test_load_refuses_initial_state_rows_out_of_order(tmp_path):
    m = cylstm.LSTM(I, H, num_layers=2, seed=0)
    proto = connx.export(m, tmp_path / "m.onnx", initial_state=True)
    lstm1 = next(n for n in proto.graph.node if n.name == "lstm_l1")
    h_slice = next(n for n in proto.graph.node if n.output[0] == lstm1.input[5])
    start = next(t for t in proto.graph.initializer if t.name == h_slice.input[1])
    start.CopyFrom(onnx.numpy_helper.from_array(np.array([0], np.int64), start.name))
    with pytest.raises(ValueError, match="node 'lstm_l1'.*rows 1..1 of the h0/c0"):
        connx.load(proto)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_load_torch_lstm_then_linear(tmp_path, bidirectional):
    torch = _torch()
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(I, H, num_layers=2, batch_first=True,
                                      bidirectional=bidirectional)
            self.fc = torch.nn.Linear(H * (2 if bidirectional else 1), 3)

        def forward(self, x):
            return self.fc(self.lstm(x)[0])

    net = Net().eval()
    x = torch.randn(B, T, I)
    torch_export(torch, net, x, tmp_path / "n.onnx", ["y"])
    m = connx.load(tmp_path / "n.onnx")
    assert isinstance(m, cylstm.Sequential)
    assert [type(l) for l in m.layers] == [cylstm.LSTM, cylstm.Linear]
    with torch.no_grad():
        ref = net(x).numpy()
    assert rel_err(m.predict(x.numpy()), ref) < 1e-5


def test_load_refuses_torch_graph_that_selects_a_step(tmp_path):
    """out[:, -1] is a Gather on the data: loading it as anything would be wrong."""
    torch = _torch()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(I, H, batch_first=True)

        def forward(self, x):
            return torch.relu(self.lstm(x)[0][:, -1])

    torch_export(torch, Net().eval(), torch.randn(B, T, I), tmp_path / "n.onnx", ["y"])
    with pytest.raises(ValueError, match=r"node '.*' \(op (Gather|Relu)\) is not supported"):
        connx.load(tmp_path / "n.onnx")


@pytest.mark.parametrize("variant", ["skip", "two_heads", "final_state"])
def test_load_refuses_graphs_that_are_not_a_chain(tmp_path, variant):
    """A skip connection, two heads on one output or a head on h_n: the layers are all
    known, but no cylstm model computes these graphs, so loading must refuse them."""
    torch = _torch()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(I, H, batch_first=True)
            self.fc = torch.nn.Linear(H + I if variant == "skip" else H, 2)
            self.fc2 = torch.nn.Linear(H, 2)

        def forward(self, x):
            y, (h_n, _) = self.lstm(x)
            if variant == "skip":
                return self.fc(torch.cat([y, x], dim=-1))
            if variant == "two_heads":
                return self.fc(y) + self.fc2(y)
            return self.fc(h_n[-1])

    torch_export(torch, Net().eval(), torch.randn(B, T, I), tmp_path / "n.onnx", ["y"])
    with pytest.raises(ValueError, match=r"node '.*' \(op \w+\)"):
        connx.load(tmp_path / "n.onnx")


# ---- refusals ---------------------------------------------------------------------------

def test_export_refusals(tmp_path):
    proj = cylstm.LSTM(I, H, proj_size=2)
    with pytest.raises(ValueError, match="no projection"):
        connx.export(proj, tmp_path / "p.onnx", lstm_op=True)
    seq = cylstm.Sequential([cylstm.Linear(I, 4), cylstm.LSTM(4, H, proj_size=3)])
    with pytest.raises(ValueError, match=r"layers\[1\].*proj_size=3"):
        connx.export(seq, tmp_path / "s.onnx", lstm_op=True)
    with pytest.raises(TypeError, match="cylstm.LSTM or a cylstm.Sequential"):
        connx.export(cylstm.Linear(3, 2), tmp_path / "l.onnx")
    with pytest.raises(ValueError, match="initial_state"):
        connx.export(seq, tmp_path / "s.onnx", initial_state=True)
    with pytest.raises(ValueError, match="opset"):
        connx.export(proj, tmp_path / "p.onnx", opset=9)
    with pytest.raises(TypeError, match="path must be a file name"):
        connx.export(cylstm.LSTM(I, H), 3)
    with pytest.raises(TypeError, match="lstm_op"):
        connx.export(cylstm.LSTM(I, H), tmp_path / "m.onnx", lstm_op="yes")
    with pytest.raises(TypeError, match="path must be a file name or an onnx.ModelProto"):
        connx.load(b"bytes")
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        connx.export(cylstm.LSTM(I, H), tmp_path / "m.onnx")
        connx.load(tmp_path / "m.onnx", dtype="float16")


def _one_lstm_graph(tmp_path, **attrs):
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((1, 4 * H, I)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((1, 4 * H, H)).astype(np.float32), "R")]
    node = helper.make_node("LSTM", ["x", "W", "R"], ["Y", "Yh", "Yc"], name="the_lstm",
                            hidden_size=H, **attrs)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "B", I])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return proto


@pytest.mark.parametrize("attrs,message", [
    (dict(direction="reverse"), "direction 'reverse'"),
    (dict(clip=3.0), "'clip'"),
    (dict(input_forget=1), "input_forget"),
    (dict(activations=["Relu", "Tanh", "Tanh"]), "activations"),
    (dict(layout=1), "layout=1"),
])
def test_load_refuses_lstm_variants(tmp_path, attrs, message):
    proto = _one_lstm_graph(tmp_path, **attrs)
    with pytest.raises(ValueError, match=f"node 'the_lstm' \\(op LSTM\\).*{message}"):
        connx.load(proto)


def test_load_reads_a_plain_lstm_node_and_refuses_other_ops(tmp_path):
    from onnx import helper
    proto = _one_lstm_graph(tmp_path)
    m = connx.load(proto)
    assert isinstance(m, cylstm.LSTM) and not m.bias
    proto.graph.node.append(helper.make_node("Relu", ["Y"], ["Z"], name="act"))
    with pytest.raises(ValueError, match=r"node 'act' \(op Relu\) is not supported"):
        connx.load(proto)


def test_load_refuses_a_state_computed_from_h0(tmp_path):
    """initial_h = h0 + 1 is neither h0's rows nor zeros: refused, not read as h0."""
    from onnx import TensorProto, helper, numpy_helper
    proto = _one_lstm_graph(tmp_path)
    g = proto.graph
    g.input.extend([helper.make_tensor_value_info(s, TensorProto.FLOAT, [1, "B", H])
                    for s in ("h0", "c0")])
    g.initializer.append(numpy_helper.from_array(np.ones((), np.float32), "one"))
    g.node.insert(0, helper.make_node("Add", ["h0", "one"], ["h0_plus"], name="shift"))
    g.node[1].input.extend(["", "", "h0_plus", "c0"])
    with pytest.raises(ValueError, match="initial state must be zeros or a graph input"):
        connx.load(proto)
    g.node[1].input[5] = "h0"                    # h0 itself is fine
    m = connx.load(proto)
    assert isinstance(m, cylstm.LSTM)


@pytest.mark.parametrize("opset", [14, 17, 18, 20])
def test_opsets(tmp_path, opset):
    m = cylstm.LSTM(I, H, bidirectional=True, seed=0).eval()
    x = np.random.default_rng(0).standard_normal((T, B, I)).astype(np.float32)
    ref = m(x, lengths=LENGTHS)[0]
    for lstm_op in (True, False):
        proto = connx.export(m, tmp_path / "m.onnx", lengths=True, lstm_op=lstm_op,
                             opset=opset)
        assert proto.opset_import[0].version == opset
        out = session(tmp_path / "m.onnx").run(None, {"x": x, "lengths": LENGTHS})[0]
        assert rel_err(out, ref) < 1e-5
