"""Shared helpers for cylstm's tests (imported as ``from conftest import ...``).

Sizes are small on purpose: the whole suite must run in well under a minute or two on
two cores. Every random array comes from a fixed seed.
"""
import numpy as np
import pytest

import cylstm

# Tolerances of LSTM_MATH.md ("What checks it"), relative to the largest magnitude.
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
                       scale=1.0):
    """Random single-layer problem: x (T, B, I), PyTorch-like weights, optional biases
    and initial state (B, H). Returns a dict of lstm_layer_forward keyword arguments."""
    rng = np.random.default_rng(seed)
    k = 1 / np.sqrt(H)
    p = dict(
        x=scale * rng.standard_normal((T, B, I)),
        w_ih=rng.uniform(-k, k, (4 * H, I)),
        w_hh=rng.uniform(-k, k, (4 * H, H)),
        b_ih=rng.uniform(-k, k, 4 * H) if bias else None,
        b_hh=rng.uniform(-k, k, 4 * H) if bias else None,
        h0=rng.standard_normal((B, H)) if state else None,
        c0=rng.standard_normal((B, H)) if state else None,
    )
    return {n: (None if v is None else v.astype(dtype)) for n, v in p.items()}


def as_dtype(p, dtype):
    """p with every array converted to dtype (None stays None)."""
    return {n: (None if v is None else np.asarray(v).astype(dtype)) for n, v in p.items()}


def grad_buffers(p):
    """Zeroed gradient buffers matching the weights in p."""
    return dict(
        dw_ih=np.zeros_like(p["w_ih"]),
        dw_hh=np.zeros_like(p["w_hh"]),
        db_ih=None if p["b_ih"] is None else np.zeros_like(p["b_ih"]),
        db_hh=None if p["b_hh"] is None else np.zeros_like(p["b_hh"]),
    )


def output_grads(T, B, H, *, seed, dtype=np.float64):
    """Random dL/dy (T, B, H), dL/dh_n, dL/dc_n (B, H): the linear loss
    sum(y R1) + sum(h_n R2) + sum(c_n R3)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((T, B, H)).astype(dtype),
            rng.standard_normal((B, H)).astype(dtype),
            rng.standard_normal((B, H)).astype(dtype))


def padded_mask(T, lengths):
    """(T, B) bool: True where t >= lengths[b] (padding)."""
    return np.arange(T)[:, None] >= np.asarray(lengths)[None, :]


@pytest.fixture(autouse=True)
def _restore_thread_setting():
    """No test leaks a process-wide thread setting into the next one."""
    yield
    cylstm.set_num_threads(None)
