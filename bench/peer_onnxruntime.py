"""ONNX Runtime's LSTM operator as a peer, with the builder of its graph (onnx.helper)."""

import importlib.util

import numpy as np

from impl import Impl
from problem import as_outputs


def onnx_gates(w, H):
    """(4H, ...) rows from PyTorch's gate order [i f g o] to ONNX's [i o f c]."""
    return np.concatenate([w[0:H], w[3 * H:4 * H], w[H:2 * H], w[2 * H:3 * H]])


def onnx_lstm_model(case, params):
    """A graph of ONNX LSTM nodes (one per layer, both directions in one node) computing
    what cylstm.LSTM does: x (T, B, I) [, lengths (B,) int32] [, h0, c0 (D, B, H)] ->
    y (T, B, D*H), h_n, c_n (L*D, B, H). T and B are symbolic. Serialised bytes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    cfg, D, H = case.cfg, case.D, case.cfg.H
    fp = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("x", fp, ["T", "B", cfg.I])]
    seq = init = ""
    if case.variant == "varlen":
        seq = "lengths"
        inputs.append(helper.make_tensor_value_info(seq, TensorProto.INT32, ["B"]))
    if cfg.state:
        if cfg.L > 1:
            raise ValueError("a carried state is wired for one layer only")
        init = ("h0", "c0")
        inputs += [helper.make_tensor_value_info(s, fp, [D, "B", H]) for s in init]
    inits = [numpy_helper.from_array(np.array([1], np.int64), "axis1"),
             numpy_helper.from_array(np.array([0, 0, -1], np.int64), "merge_dirs")]
    nodes, inp = [], "x"
    for layer in range(cfg.L):
        sfx = [f"_l{layer}" + ("_reverse" if d else "") for d in range(D)]
        w = {k: np.stack([onnx_gates(params[k + s], H) for s in sfx])
             for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
        inits += [numpy_helper.from_array(w["weight_ih"], f"W{layer}"),      # (D, 4H, I_l)
                  numpy_helper.from_array(w["weight_hh"], f"R{layer}"),      # (D, 4H, H)
                  numpy_helper.from_array(np.concatenate(                    # (D, 8H)
                      [w["bias_ih"], w["bias_hh"]], axis=1), f"B{layer}")]
        ins = [inp, f"W{layer}", f"R{layer}", f"B{layer}", seq, *(init or ())]
        while ins[-1] == "":
            ins.pop()                                  # trailing optional inputs omitted
        nodes.append(helper.make_node(
            "LSTM", ins, [f"Y{layer}", f"Yh{layer}", f"Yc{layer}"], hidden_size=H,
            direction="bidirectional" if D == 2 else "forward"))
        # Y (T, D, B, H) -> (T, B, D*H): the next layer's input, as torch concatenates
        out = "y" if layer == cfg.L - 1 else f"x{layer + 1}"
        if D == 1:
            nodes.append(helper.make_node("Squeeze", [f"Y{layer}", "axis1"], [out]))
        else:
            nodes += [helper.make_node("Transpose", [f"Y{layer}"], [f"Yt{layer}"],
                                       perm=[0, 2, 1, 3]),
                      helper.make_node("Reshape", [f"Yt{layer}", "merge_dirs"], [out])]
        inp = out
    for s in "hc":
        nodes.append(helper.make_node("Concat", [f"Y{s}{k}" for k in range(cfg.L)],
                                      [f"{s}_n"], axis=0))
    outputs = [helper.make_tensor_value_info("y", fp, ["T", "B", D * H])] + \
        [helper.make_tensor_value_info(s, fp, [cfg.L * D, "B", H]) for s in ("h_n", "c_n")]
    graph = helper.make_graph(nodes, f"lstm_{case.name}", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)        # readable by older runtimes too
    onnx.checker.check_model(model)
    return model.SerializeToString()


class Ort(Impl):
    """ONNX Runtime's LSTM operator, inference only: one session per thread count
    (intra_op_num_threads = n, sequential execution), default graph optimisations."""
    name, label = "onnxruntime", "ONNX Runtime"
    needs = "onnxruntime"
    training = False

    @classmethod
    def unsupported(cls, case):
        if case.dtype == np.float64:
            return "ONNX Runtime's LSTM kernel is float32 only ('does not support double yet')"
        if case.P:
            return "ONNX's LSTM operator has no projection"
        if importlib.util.find_spec("onnx") is None:
            return "onnx (to build the graph) is not installed"
        return super().unsupported(case)

    def __init__(self, case, prob):
        super().__init__(case, prob)
        self.model = onnx_lstm_model(case, prob.params)
        self.sessions = {}

    def _session(self, n):
        if n not in self.sessions:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = n
            so.inter_op_num_threads = 1
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            so.log_severity_level = 3
            self.sessions[n] = ort.InferenceSession(self.model, so,
                                                    providers=["CPUExecutionProvider"])
        return self.sessions[n]

    def call(self, task, n, data):
        if task != "inference":
            raise ValueError("ONNX Runtime runs inference only")
        run, names = self._session(n).run, ["y", "h_n", "c_n"]
        feeds = {"x": data.x}
        if data.lengths is not None:
            feeds["lengths"] = data.lengths.astype(np.int32)
        if data.state is None:
            return lambda: (lambda y, h, c: (y, (h, c)))(*run(names, feeds))
        feeds["h0"], feeds["c0"] = (s.copy() for s in data.state)

        def step():
            y, feeds["h0"], feeds["c0"] = run(names, feeds)
            return y, (feeds["h0"], feeds["c0"])
        return step

    def outputs(self, task, res):
        return as_outputs(res[0], *res[1])
