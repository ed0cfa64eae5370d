"""Shared helpers for cylstm's tests (imported as ``from conftest import ...``).

Sizes are small on purpose: the whole suite must run in well under a minute or two on
two cores. Every random array comes from a fixed seed.
"""
import numpy as np
import pytest

import cylstm

# Tolerances of docs/math.md, relative to the largest magnitude.
KERNEL_TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


def rel_err(a, b):
    """max |a - b| relative to the largest magnitude of either (0 when both are 0)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.size == 0:
        return 0.0
    scale = max(np.abs(a).max(), np.abs(b).max())
    return 0.0 if scale == 0 else float(np.abs(a - b).max() / scale)


def assert_close(got, want, tol, what=""):
    """rel_err(got, want) < tol, with a readable message; NaNs never pass."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    err = rel_err(got, want)
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.1e}"


def make_layer_problem(T, B, I, H, *, seed, dtype=np.float64, bias=True, state=True,
                       scale=1.0, proj_size=None):
    """Random single-layer problem: x (T, B, I), PyTorch-like weights, optional biases
    and initial state (B, H). Returns a dict of lstm_layer_forward keyword arguments.

    With proj_size=P (PyTorch's proj_size): w_hh is (4H, P), h0 is (B, P) and a
    w_hr (P, H) is drawn last, so the other draws are those of the same call without it."""
    rng = np.random.default_rng(seed)
    k = 1 / np.sqrt(H)
    Hp = proj_size or H
    p = dict(
        x=scale * rng.standard_normal((T, B, I)),
        w_ih=rng.uniform(-k, k, (4 * H, I)),
        w_hh=rng.uniform(-k, k, (4 * H, Hp)),
        b_ih=rng.uniform(-k, k, 4 * H) if bias else None,
        b_hh=rng.uniform(-k, k, 4 * H) if bias else None,
        h0=rng.standard_normal((B, Hp)) if state else None,
        c0=rng.standard_normal((B, H)) if state else None,
    )
    if proj_size:
        p["w_hr"] = rng.uniform(-k, k, (proj_size, H))
    return {n: (None if v is None else v.astype(dtype)) for n, v in p.items()}


def as_dtype(p, dtype):
    """p with every array converted to dtype (None stays None)."""
    return {n: (None if v is None else np.asarray(v).astype(dtype)) for n, v in p.items()}


def grad_buffers(p):
    """Zeroed gradient buffers matching the weights in p (dw_hr too when p has a w_hr)."""
    g = dict(
        dw_ih=np.zeros_like(p["w_ih"]),
        dw_hh=np.zeros_like(p["w_hh"]),
        db_ih=None if p["b_ih"] is None else np.zeros_like(p["b_ih"]),
        db_hh=None if p["b_hh"] is None else np.zeros_like(p["b_hh"]),
    )
    if p.get("w_hr") is not None:
        g["dw_hr"] = np.zeros_like(p["w_hr"])
    return g


def output_grads(T, B, H, *, seed, dtype=np.float64, proj_size=None):
    """Random dL/dy (T, B, H), dL/dh_n, dL/dc_n (B, H): the linear loss
    sum(y R1) + sum(h_n R2) + sum(c_n R3). With proj_size=P, dL/dy is (T, B, P) and
    dL/dh_n (B, P); dL/dc_n stays (B, H)."""
    rng = np.random.default_rng(seed)
    Hp = proj_size or H
    return (rng.standard_normal((T, B, Hp)).astype(dtype),
            rng.standard_normal((B, Hp)).astype(dtype),
            rng.standard_normal((B, H)).astype(dtype))


def padded_mask(T, lengths):
    """(T, B) bool: True where t >= lengths[b] (padding)."""
    return np.arange(T)[:, None] >= np.asarray(lengths)[None, :]


def torch_names(num_layers, bidirectional, bias=True, proj=False):
    """torch.nn.LSTM's parameter names, in its order (from PyTorch's documentation);
    with proj (proj_size > 0) each direction ends with its weight_hr."""
    names = []
    for layer in range(num_layers):
        for sfx in ([f"_l{layer}", f"_l{layer}_reverse"] if bidirectional else [f"_l{layer}"]):
            names += [f"weight_ih{sfx}", f"weight_hh{sfx}"]
            if bias:
                names += [f"bias_ih{sfx}", f"bias_hh{sfx}"]
            if proj:
                names += [f"weight_hr{sfx}"]
    return names


# ---------------------------------------------------------------- the module

def module_inputs(lstm, T, B, *, seed):
    """x (T, B, I), state (h0 (L*D, B, Hp), c0 (L*D, B, H)), dy, dstate for `lstm`
    (its dtype and sizes; Hp is its state_size, P with a projection, else H)."""
    LD, H, Hp = lstm.num_layers * lstm.num_directions, lstm.hidden_size, lstm.state_size
    rng = np.random.default_rng(seed)
    dt = lstm.dtype
    x = rng.standard_normal((T, B, lstm.input_size)).astype(dt)
    st = (rng.standard_normal((LD, B, Hp)).astype(dt), rng.standard_normal((LD, B, H)).astype(dt))
    dy = rng.standard_normal((T, B, lstm.num_directions * Hp)).astype(dt)
    dst = (rng.standard_normal((LD, B, Hp)).astype(dt), rng.standard_normal((LD, B, H)).astype(dt))
    return x, st, dy, dst


def module_run(lstm, x, state=None, lengths=None, dy=None, dstate=None):
    """Forward, zero_grad, backward. Returns y, h_n, c_n, dx, dh0, dc0, grads (copies)."""
    y, (h_n, c_n) = lstm(x, state, lengths)
    lstm.zero_grad()
    dx, (dh0, dc0) = lstm.backward(dy, dstate)
    return dict(y=y, h_n=h_n, c_n=c_n, dx=dx, dh0=dh0, dc0=dc0,
                **{k: v.copy() for k, v in lstm.grads.items()})


# ---------------------------------------------------------------- finite differences

FD_EPS = 1e-6
FD_TOL = 1e-6


def _assert_matches_numeric(name, grad, num):
    assert np.abs(num).max() > 0, name  # the check is not vacuous
    err = rel_err(grad, num)
    assert err < FD_TOL, f"{name}: relative error {err:.2e}"


def check_layer_finite_differences(loss, q, analytic):
    """Every element of every analytic[name] against central differences of loss(q)
    with respect to q[name]; each perturbation goes into a copy of q[name]
    (the layer-level checks: loss takes the keyword arguments of lstm_layer_forward)."""
    for name, grad in analytic.items():
        assert grad.shape == q[name].shape and np.all(np.isfinite(grad)), name
        num = np.zeros_like(grad)
        for k in np.ndindex(*grad.shape):
            v = q[name].copy()
            v[k] += FD_EPS
            lp = loss({**q, name: v})
            v[k] -= 2 * FD_EPS
            lm = loss({**q, name: v})
            num[k] = (lp - lm) / (2 * FD_EPS)
        _assert_matches_numeric(name, grad, num)


def check_in_place_finite_differences(loss, targets, got):
    """Every element of got[name] against central differences of loss() with respect to
    targets[name], an array that loss() reads and that is perturbed in place and
    restored (the module-level checks: inputs, states and lstm.params)."""
    for name, arr in targets.items():
        grad = got[name]
        assert grad.shape == arr.shape, name
        num = np.zeros_like(grad)
        for k in np.ndindex(*arr.shape):
            v = arr[k]
            arr[k] = v + FD_EPS
            lp = loss()
            arr[k] = v - FD_EPS
            lm = loss()
            arr[k] = v
            num[k] = (lp - lm) / (2 * FD_EPS)
        _assert_matches_numeric(name, grad, num)


def module_finite_differences(lstm, x, state, lengths, dy, dstate):
    """Every element of dx, dh0, dc0 and of every parameter gradient (lstm.grads by name)
    against central differences of sum(y dy) + sum(h_n dh) + sum(c_n dc), in eval mode;
    float64. state None runs the analytic pass without a state and differentiates with
    respect to the explicit zeros it means. Returns the analytic results (module_run)."""
    got = module_run(lstm, x, state, lengths, dy, dstate)
    if state is None:
        LD, B = lstm.num_layers * lstm.num_directions, x.shape[1]
        state = (np.zeros((LD, B, lstm.state_size)), np.zeros((LD, B, lstm.hidden_size)))

    def loss():
        y, (h_n, c_n) = lstm(x, state, lengths)
        return np.sum(y * dy) + np.sum(h_n * dstate[0]) + np.sum(c_n * dstate[1])

    targets = {"dx": x, "dh0": state[0], "dc0": state[1], **lstm.params}
    assert set(targets) == set(got) - {"y", "h_n", "c_n"}
    lstm.eval()
    try:
        check_in_place_finite_differences(loss, targets, got)
    finally:
        lstm.train()
    return got


@pytest.fixture(autouse=True)
def _restore_thread_setting():
    """No test leaks a process-wide thread setting into the next one."""
    yield
    cylstm.set_num_threads(None)


@pytest.fixture
def two_thread_teams():
    """For thread-count invariance tests: inside the test every kernel call forms a real
    OpenMP team of min(threads, N_PARTS) (cylstm._threads.force_parallel), and the test
    fails unless a team of two actually ran. Skipped (reported, not passed) where two
    threads cannot run: a serial build or a single usable core."""
    from cylstm import _parallel, _threads
    if not cylstm.openmp_enabled() or _threads.N_PARTS < 2:
        pytest.skip("a team of two needs an OpenMP build and two usable cores")
    _parallel._reset_max_team()
    with _threads.force_parallel():
        yield
    assert _threads.max_team() >= 2, "no kernel call ran on a team of two threads"


@pytest.fixture(params=[True, False], ids=["in-step", "hoisted"])
def input_path(request, monkeypatch):
    """Run the test with the forward's input product inside each step (True) or as GEMMs
    before the loop (False), whatever the shapes (cylstm.functional.input_in_step)."""
    from cylstm import functional as F
    monkeypatch.setattr(F, "_FORCE_INPUT_IN_STEP", request.param)
    assert F.input_in_step(3, 4, 4, np.float32, 1) is request.param
    yield request.param


@pytest.fixture(params=[0, 1, 2], ids=["baseline", "avx2", "avx512"])
def kernel_level(request):
    """Run the test at one ISA level of the kernels (cylstm._isa: 0 baseline, with BLAS
    for the per-step products; 1 AVX2+FMA; 2 AVX-512), restored afterwards; skipped
    (reported) where the CPU lacks the instruction set."""
    from cylstm import _isa
    if request.param > _isa.cpu_level():
        pytest.skip(f"this CPU lacks {_isa.NAMES[request.param]}")
    with _isa.use_level(request.param):
        yield request.param
