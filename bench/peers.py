"""Every implementation by name, building them for a case, and verifying them all."""

import peer_cylstm
import peer_numpy
import peer_onnxruntime
import peer_torch
from machine import all_threads
from problem import compare, oracle

IMPLS = {c.name: c for c in (peer_cylstm.Cylstm, peer_cylstm.CylstmFull, peer_numpy.NumpyRef,
                             peer_torch.Torch, peer_torch.TorchNative, peer_onnxruntime.Ort)}
PEERS = ("reference", "torch", "torch-native", "onnxruntime")


def build_impls(case, prob, peers, sink):
    """{name: implementation} for the case; skipped peers noted in the sink."""
    impls, skipped = {}, {}
    for name in ["cylstm"] + peers:
        why = IMPLS[name].unsupported(case)
        if why is None:
            try:
                impls[name] = IMPLS[name](case, prob)
            except Exception as e:            # a broken peer must not stop the run
                why = f"could not be set up: {type(e).__name__}: {e}"
        if why is not None:
            skipped[name] = why
            sink.write({"type": "skipped", "case": case.name, "impl": name, "why": why})
    if case.variant == "varlen":
        impls["cylstm-full"] = peer_cylstm.CylstmFull(case, prob)
    return impls, skipped


def verify_case(case, impls, data, thread_counts, tasks, tol):
    """Every implementation and task against the float64 oracle, on `data`.
    cylstm at every thread count (its kernels split work by thread count), the others
    (and the oracle) at the smallest: their threading only reorders sums, and on a busy
    machine a multithreaded OpenBLAS call can take 10-30x longer.
    Returns [(impl, threads, task, result)]."""
    with all_threads(min(thread_counts)):
        want = oracle(case, impls["cylstm"].prob.params, data)
    out = []
    for name, impl in impls.items():
        if impl.verified_by:
            continue
        counts = thread_counts if name == "cylstm" else [min(thread_counts)]
        for n in counts:
            for task in case.tasks:
                if task not in tasks or (task == "training" and not impl.training):
                    continue
                with all_threads(n):
                    fn = impl.call(task, n, data)
                    if isinstance(impl, peer_torch.Torch) and not case.cfg.state:
                        impl.uses_onednn[task] = peer_torch.profile_onednn(impl.torch, fn)
                        fn = impl.call(task, n, data)        # fresh gradients
                    got = impl.outputs(task, fn())
                out.append((name, n, task, compare(got, want, tol)))
    return out
