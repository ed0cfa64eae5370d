"""cylstm.optim: SGD, Adam, AdamW, RMSprop and clip_grad_norm over a parameter arena.

Each optimiser against a hand computation written out in NumPy (the textbook equations,
float64, several steps, momentum / Nesterov / weight-decay variants), float32 and
float64; against torch.optim (float64 within 1e-12 relative; skipped without torch
unless CYLSTM_REQUIRE_TORCH=1); clipping against torch and by hand; bitwise the same for
1 and 2 threads; no NumPy allocation per step; validation; state_dict round trips; and
driving a real cylstm.LSTM."""
import math
import os
import tracemalloc

import numpy as np
import pytest

import cylstm
from cylstm import optim
from cylstm._threads import N_PARTS

from conftest import rel_err

DTYPES = [np.float32, np.float64]
# float64 matches to rounding (the same operation order); float32 to its precision.
TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
N = 1003          # odd, so the parts of the arena have unequal sizes
STEPS = 5


def _torch():
    if os.environ.get("CYLSTM_REQUIRE_TORCH", "") not in ("", "0"):
        import torch     # must be importable: no skip in CI
        return torch
    return pytest.importorskip("torch")


def _problem(n, dtype, steps, seed):
    """params (n,) and `steps` gradients (n,), all of dtype."""
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n).astype(dtype)
    grads = [rng.standard_normal(n).astype(dtype) for _ in range(steps)]
    return p, grads


def _run(cls, p0, grads, **kw):
    """Our optimiser over a copy of p0, fed the gradients in turn; returns (params,
    state_dict) after the last step."""
    p = p0.copy()
    g = np.zeros_like(p)
    opt = cls(p, g, **kw)
    for gi in grads:
        g[...] = gi
        opt.step()
    return p, opt.state_dict()


# ---------------------------------------------------------------------------------------
# Hand computations: the textbook equations in float64 NumPy
# ---------------------------------------------------------------------------------------

def hand_sgd(p, grads, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
    p = p.astype(np.float64)
    buf = None
    for g in grads:
        g = g.astype(np.float64) + weight_decay * p
        if momentum:
            buf = g.copy() if buf is None else momentum * buf + g
            g = g + momentum * buf if nesterov else buf
        p = p - lr * g
    return p, {"momentum_buffer": buf} if momentum else {}


def hand_adam(p, grads, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
              decoupled=False):
    b1, b2 = betas
    p = p.astype(np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, 1):
        g = g.astype(np.float64)
        if decoupled:
            p = p * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1 ** t)
        v_hat = v / (1 - b2 ** t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p, {"exp_avg": m, "exp_avg_sq": v}


def hand_adamw(p, grads, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
    return hand_adam(p, grads, lr, betas, eps, weight_decay, decoupled=True)


def hand_rmsprop(p, grads, lr=1e-2, alpha=0.99, eps=1e-8, momentum=0.0, weight_decay=0.0):
    p = p.astype(np.float64)
    v = np.zeros_like(p)
    buf = np.zeros_like(p)
    for g in grads:
        g = g.astype(np.float64) + weight_decay * p
        v = alpha * v + (1 - alpha) * g * g
        if momentum > 0:
            buf = momentum * buf + g / (np.sqrt(v) + eps)
            p = p - lr * buf
        else:
            p = p - lr * g / (np.sqrt(v) + eps)
    state = {"square_avg": v}
    if momentum > 0:
        state["momentum_buffer"] = buf
    return p, state


# (name, our class, hand computation, torch class name, keyword arguments)
CASES = [
    ("sgd", optim.SGD, hand_sgd, "SGD", dict(lr=0.1)),
    ("sgd-wd", optim.SGD, hand_sgd, "SGD", dict(lr=0.1, weight_decay=0.05)),
    ("sgd-momentum", optim.SGD, hand_sgd, "SGD", dict(lr=0.1, momentum=0.9)),
    ("sgd-momentum-wd", optim.SGD, hand_sgd, "SGD",
     dict(lr=0.05, momentum=0.8, weight_decay=0.1)),
    ("sgd-nesterov-wd", optim.SGD, hand_sgd, "SGD",
     dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("adam", optim.Adam, hand_adam, "Adam", dict(lr=1e-2)),
    ("adam-wd", optim.Adam, hand_adam, "Adam",
     dict(lr=3e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    ("adamw", optim.AdamW, hand_adamw, "AdamW", dict(lr=1e-2)),
    ("adamw-wd", optim.AdamW, hand_adamw, "AdamW",
     dict(lr=3e-2, betas=(0.5, 0.9), eps=1e-6, weight_decay=0.3)),
    ("rmsprop", optim.RMSprop, hand_rmsprop, "RMSprop", dict()),
    ("rmsprop-momentum-wd", optim.RMSprop, hand_rmsprop, "RMSprop",
     dict(lr=1e-3, alpha=0.9, eps=1e-6, momentum=0.9, weight_decay=0.1)),
]
CASE_IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, cls, hand, tname, kw", CASES, ids=CASE_IDS)
def test_against_hand_computation(name, cls, hand, tname, kw, dtype):
    p0, grads = _problem(N, dtype, STEPS, seed=1)
    got, state = _run(cls, p0, grads, **kw)
    want, want_state = hand(p0, grads, **kw)
    tol = TOL[np.dtype(dtype)]
    assert got.dtype == dtype
    assert rel_err(got - p0, want - p0) < tol * 10, "update"
    assert rel_err(got, want) < tol, "params"
    assert state["step"] == STEPS
    for key, buf in want_state.items():
        assert state[key].dtype == dtype
        assert rel_err(state[key], buf) < tol, key


def test_sgd_first_step_and_plain_lr_step():
    """Step 1 of momentum SGD is plain SGD (the buffer starts as a copy of g); a step
    with lr = 0 changes nothing."""
    p = np.array([1.0, -2.0, 3.0])
    g = np.array([0.5, 0.25, -1.0])
    opt = optim.SGD(p, g, lr=0.1, momentum=0.9)
    opt.step()
    np.testing.assert_array_equal(p, [1.0 - 0.05, -2.0 - 0.025, 3.0 + 0.1])
    np.testing.assert_array_equal(opt.state_dict()["momentum_buffer"], g)
    opt.step()                       # buf = 0.9 g + g
    np.testing.assert_allclose(p, [1.0 - 0.05 - 0.1 * 1.9 * 0.5, -2.0 - 0.025 - 0.1 * 1.9 * 0.25,
                                   3.0 + 0.1 + 0.1 * 1.9], rtol=1e-15)
    before = p.copy()
    opt.lr = 0.0
    opt.step()
    np.testing.assert_array_equal(p, before)
    assert not np.array_equal(opt.state_dict()["momentum_buffer"], 1.9 * g)   # state moved on


def test_adam_first_step_is_lr_times_sign():
    """With bias correction the first Adam step is lr * g / (|g| + eps) = ~lr * sign(g)."""
    p = np.zeros(4)
    g = np.array([3.0, -0.5, 1e-3, -7.0])
    optim.Adam(p, g, lr=0.01, eps=1e-12).step()
    np.testing.assert_allclose(p, -0.01 * np.sign(g), rtol=1e-8)


# ---------------------------------------------------------------------------------------
# Against torch.optim
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, cls, hand, tname, kw", CASES, ids=CASE_IDS)
def test_against_torch(name, cls, hand, tname, kw, dtype):
    torch = _torch()
    p0, grads = _problem(N, dtype, STEPS, seed=2)
    got, state = _run(cls, p0, grads, **kw)
    tp = torch.tensor(p0.copy(), requires_grad=True)
    topt = getattr(torch.optim, tname)([tp], foreach=False, **kw)
    for g in grads:
        tp.grad = torch.tensor(g)
        topt.step()
    tol = TOL[np.dtype(dtype)]
    want = tp.detach().numpy()
    assert rel_err(got - p0, want - p0) < tol * 10, "update"
    assert rel_err(got, want) < tol, "params"
    tstate = topt.state[tp]
    for key in ("exp_avg", "exp_avg_sq", "square_avg", "momentum_buffer"):
        if key in state:
            assert rel_err(state[key], tstate[key].numpy()) < tol, key


@pytest.mark.parametrize("dtype", DTYPES)
def test_step_with_clip_norm_against_torch(dtype):
    """clip_norm: clip_grad_norm_ then step, the pre-clip norm returned; torch scales by
    max_norm / (norm + 1e-6) too."""
    torch = _torch()
    p0, grads = _problem(N, dtype, STEPS, seed=3)
    grads = [g * s for g, s in zip(grads, [10.0, 0.01, 5.0, 0.02, 40.0])]   # some clip
    p, g = p0.copy(), np.zeros_like(p0)
    opt = optim.Adam(p, g, lr=1e-2, weight_decay=0.1, clip_norm=3.0)
    tp = torch.tensor(p0.copy(), requires_grad=True)
    topt = torch.optim.Adam([tp], lr=1e-2, weight_decay=0.1, foreach=False)
    tol = TOL[np.dtype(dtype)]
    for gi in grads:
        g[...] = gi
        norm = opt.step()
        tp.grad = torch.tensor(gi)
        tnorm = torch.nn.utils.clip_grad_norm_([tp], 3.0, foreach=False)
        topt.step()
        assert isinstance(norm, float)
        assert abs(norm - float(tnorm)) <= tol * norm
        assert rel_err(g, tp.grad.numpy()) < tol
    assert rel_err(p, tp.detach().numpy()) < tol


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_grad_norm_against_torch_and_by_hand(dtype, max_norm):
    torch = _torch()
    rng = np.random.default_rng(4)
    g0 = (3 * rng.standard_normal(N)).astype(dtype)
    g = g0.copy()
    norm = optim.clip_grad_norm(g, max_norm)
    hand = math.sqrt(np.sum(g0.astype(np.float64) ** 2))
    tol = TOL[np.dtype(dtype)]
    assert isinstance(norm, float)
    assert abs(norm - hand) <= 1e-14 * hand     # float64 accumulation, also for float32
    if max_norm < hand:
        want = g0.astype(np.float64) * (max_norm / (hand + 1e-6))
        assert rel_err(g, want) < tol
        assert abs(math.sqrt(np.sum(g.astype(np.float64) ** 2)) - max_norm) < 1e-5 * max_norm
    else:
        np.testing.assert_array_equal(g, g0)
    tg = torch.tensor(g0.copy())
    tp = torch.zeros(N, dtype=tg.dtype, requires_grad=True)
    tp.grad = tg
    tnorm = float(torch.nn.utils.clip_grad_norm_([tp], max_norm, foreach=False))
    assert abs(norm - tnorm) <= tol * norm
    assert rel_err(g, tp.grad.numpy()) < tol


# ---------------------------------------------------------------------------------------
# clip_grad_norm without torch
# ---------------------------------------------------------------------------------------

def test_clip_grad_norm_small_cases():
    g = np.array([3.0, 4.0])
    assert optim.clip_grad_norm(g, 10.0) == 5.0
    np.testing.assert_array_equal(g, [3.0, 4.0])          # below: untouched
    assert optim.clip_grad_norm(g, 1.0) == 5.0
    np.testing.assert_allclose(g, np.array([3.0, 4.0]) / (5.0 + 1e-6), rtol=1e-15)
    assert optim.clip_grad_norm(np.zeros(0), 1.0) == 0.0
    z = np.zeros(7, np.float32)
    assert optim.clip_grad_norm(z, 1.0) == 0.0
    g2 = np.array([[3.0], [4.0]])                          # any C-contiguous shape
    optim.clip_grad_norm(g2, 2.5)
    np.testing.assert_allclose(g2.ravel(), [1.5, 2.0], rtol=1e-6)
    big = np.full(10, 1e30, np.float32)                    # float32 overflow avoided
    assert math.isclose(optim.clip_grad_norm(big, np.inf), 1e30 * math.sqrt(10), rel_tol=1e-7)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_clip_grad_norm_non_finite_returns_norm_and_scales_nothing(bad):
    g = np.arange(1.0, 101.0)
    g[37] = bad
    before = g.copy()
    norm = optim.clip_grad_norm(g, 1.0)
    assert not math.isfinite(norm)
    assert (math.isnan(norm)) == bool(np.isnan(bad))
    np.testing.assert_array_equal(g, before)


def test_clip_grad_norm_accepts_a_model():
    lstm = cylstm.LSTM(2, 3, seed=0)
    lstm.flat_grads[...] = 1.0
    norm = optim.clip_grad_norm(lstm, 1.0)
    assert math.isclose(norm, math.sqrt(lstm.flat_grads.size))
    assert math.isclose(float(np.linalg.norm(lstm.flat_grads.astype(np.float64))), 1.0,
                        rel_tol=1e-5)


# ---------------------------------------------------------------------------------------
# Threads, allocations
# ---------------------------------------------------------------------------------------

ALL = [
    (optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (optim.Adam, dict(lr=1e-2, weight_decay=0.1)),
    (optim.AdamW, dict(lr=1e-2)),
    (optim.RMSprop, dict(momentum=0.5, weight_decay=0.1)),
]


@pytest.mark.parametrize("dtype", DTYPES)
def test_bitwise_identical_for_any_thread_count(dtype, two_thread_teams):
    n = 100_003           # several parts (N_PARTS), well above the one-thread cut-off
    p0, grads = _problem(n, dtype, 3, seed=5)
    grads = [g * 100 for g in grads]
    for cls, kw in ALL:
        results = []
        for n_threads in (1, 2, None):
            with cylstm.threads(n_threads):
                p, g = p0.copy(), np.zeros_like(p0)
                opt = cls(p, g, clip_norm=50.0, **kw)
                norms = []
                for gi in grads:
                    g[...] = gi
                    norms.append(opt.step())
                results.append((p, opt.state_dict(), norms))
        (p1, s1, n1), *others = results
        assert np.all(np.isfinite(p1)) and not np.array_equal(p1, p0)
        for p2, s2, n2 in others:
            assert n1 == n2, cls.__name__
            assert np.array_equal(p1, p2), cls.__name__
            for key in s1:
                if isinstance(s1[key], np.ndarray):
                    assert np.array_equal(s1[key], s2[key]), (cls.__name__, key)


def test_parts_cover_the_arena_exactly():
    """Every element is updated exactly once whatever the part sizes (n below, at and
    around multiples of N_PARTS)."""
    for n in sorted({1, 2, N_PARTS, N_PARTS + 1, 7 * N_PARTS - 1, 40_001}):
        p = np.zeros(n)
        g = np.ones(n)
        optim.SGD(p, g, lr=1.0).step()
        np.testing.assert_array_equal(p, -1.0)
        assert optim.clip_grad_norm(g, np.inf) == math.sqrt(n)


@pytest.mark.parametrize("cls, kw", ALL, ids=[c.__name__ for c, _ in ALL])
def test_step_allocates_no_arrays(cls, kw):
    n = 100_003
    p, g = _problem(n, np.float64, 1, seed=6)
    g = g[0]
    opt = cls(p, g, clip_norm=1.0, **kw)
    opt.step()
    domain = tracemalloc.DomainFilter(True, np.lib.tracemalloc_domain)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot().filter_traces([domain])
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        for i in range(50):
            g *= 1.5          # in place: a clip every step
            opt.lr = 1e-3 * (i + 1)
            opt.step()
        current, peak = tracemalloc.get_traced_memory()
        after = tracemalloc.take_snapshot().filter_traces([domain])
    finally:
        tracemalloc.stop()
    grown = [s for s in after.compare_to(before, "lineno") if s.size_diff > 0 or s.count_diff > 0]
    assert not grown, grown
    assert peak - base < n * 8 // 4, (peak - base)      # no array-sized temporary either


# ---------------------------------------------------------------------------------------
# Construction, attributes, validation
# ---------------------------------------------------------------------------------------

def test_model_argument_and_in_place_updates():
    lstm = cylstm.LSTM(3, 4, num_layers=2, seed=0)
    view = lstm.params["weight_hh_l1"]
    before = view.copy()
    lstm.flat_grads[...] = 1.0
    for cls in (optim.SGD, optim.Adam, optim.AdamW, optim.RMSprop):
        opt = cls(lstm, lr=0.01)
        assert opt.params is lstm.flat_params and opt.grads is lstm.flat_grads
        opt.step()
    assert view.base is not None and np.all(view < before)   # the views moved
    opt.zero_grad()
    assert not lstm.flat_grads.any()


def test_hyper_parameters_lr_settable_others_read_only():
    p, g = np.zeros(3), np.ones(3)
    opt = optim.Adam(p, g, lr=0.5, betas=(0.8, 0.9))
    assert opt.lr == 0.5 and opt.betas == (0.8, 0.9) and opt.eps == 1e-8
    assert opt.weight_decay == 0.0 and opt.clip_norm is None
    assert optim.AdamW(p, g).weight_decay == 1e-2
    opt.lr = 0.25
    assert opt.lr == 0.25 and opt.hyper_parameters["lr"] == 0.25
    with pytest.raises(AttributeError, match="read-only"):
        opt.betas = (0.5, 0.5)
    with pytest.raises(ValueError, match="lr"):
        opt.lr = -1.0
    with pytest.raises(ValueError, match="lr"):
        opt.lr = float("nan")
    with pytest.raises(TypeError, match="lr"):
        opt.lr = "0.1"
    assert opt.lr == 0.25
    with pytest.raises(AttributeError):
        opt.no_such_thing
    assert "Adam(" in repr(opt)


def test_empty_arena():
    p, g = np.zeros(0, np.float32), np.zeros(0, np.float32)
    for cls, kw in ALL:
        opt = cls(p, g, clip_norm=1.0, **kw)
        assert opt.step() == 0.0


def test_multidimensional_arrays_are_updated_in_place():
    p = np.ones((3, 4))
    g = np.full((3, 4), 2.0)
    optim.SGD(p, g, lr=0.5).step()
    np.testing.assert_array_equal(p, 0.0)


def _bad_arrays():
    a = np.zeros(6)
    ro = np.zeros(6)
    ro.flags.writeable = False
    return a, ro


@pytest.mark.parametrize("cls", [optim.SGD, optim.Adam, optim.AdamW, optim.RMSprop])
def test_array_validation(cls):
    a, ro = _bad_arrays()
    g = np.zeros(6)
    kw = {"lr": 0.1}
    with pytest.raises(TypeError, match="params"):
        cls([0.0] * 6, g, **kw)
    with pytest.raises(TypeError, match="grads"):
        cls(a, [0.0] * 6, **kw)
    with pytest.raises(TypeError, match="params.*float32 or float64"):
        cls(np.zeros(6, np.int64), g, **kw)
    with pytest.raises(ValueError, match="params.*C-contiguous"):
        cls(np.zeros(12)[::2], g, **kw)
    with pytest.raises(ValueError, match="grads.*C-contiguous"):
        cls(a, np.zeros((6, 2)).T[0], **kw)
    with pytest.raises(ValueError, match="params.*writeable"):
        cls(ro, g, **kw)
    with pytest.raises(ValueError, match=r"same shape.*\(6,\).*\(5,\)"):
        cls(a, np.zeros(5), **kw)
    with pytest.raises(TypeError, match="same dtype.*float64.*float32"):
        cls(a, np.zeros(6, np.float32), **kw)
    with pytest.raises(ValueError, match="share memory"):
        cls(a, a, **kw)
    with pytest.raises(TypeError, match="grads is required"):
        cls(a, **kw)
    with pytest.raises(TypeError, match="by keyword"):
        cls(cylstm.LSTM(2, 2), 0.1)


@pytest.mark.parametrize("cls, kw, match, exc", [
    (optim.SGD, dict(), "lr is required", TypeError),
    (optim.SGD, dict(lr=-0.1), "lr", ValueError),
    (optim.SGD, dict(lr=np.inf), "lr", ValueError),
    (optim.SGD, dict(lr=True), "lr", TypeError),
    (optim.SGD, dict(lr=0.1, momentum=-0.5), "momentum", ValueError),
    (optim.SGD, dict(lr=0.1, nesterov=True), "nesterov", ValueError),
    (optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=1), "nesterov", TypeError),
    (optim.SGD, dict(lr=0.1, weight_decay=-1.0), "weight_decay", ValueError),
    (optim.SGD, dict(lr=0.1, clip_norm=0.0), "clip_norm", ValueError),
    (optim.SGD, dict(lr=0.1, clip_norm="1"), "clip_norm", TypeError),
    (optim.Adam, dict(lr=-1e-3), "lr", ValueError),
    (optim.Adam, dict(betas=(1.0, 0.999)), r"betas\[0\]", ValueError),
    (optim.Adam, dict(betas=(0.9, -0.1)), r"betas\[1\]", ValueError),
    (optim.Adam, dict(betas=(0.9,)), "betas", TypeError),
    (optim.Adam, dict(eps=0.0), "eps", ValueError),
    (optim.Adam, dict(eps=float("nan")), "eps", ValueError),
    (optim.AdamW, dict(weight_decay=-1e-2), "weight_decay", ValueError),
    (optim.AdamW, dict(clip_norm=-1.0), "clip_norm", ValueError),
    (optim.RMSprop, dict(alpha=1.5), "alpha", ValueError),
    (optim.RMSprop, dict(eps=-1e-8), "eps", ValueError),
    (optim.RMSprop, dict(momentum=-0.1), "momentum", ValueError),
    (optim.RMSprop, dict(lr=None), "lr", TypeError),
])
def test_hyper_parameter_validation(cls, kw, match, exc):
    with pytest.raises(exc, match=match):
        cls(np.zeros(3), np.zeros(3), **kw)


def test_clip_grad_norm_validation():
    with pytest.raises(TypeError, match="grads"):
        optim.clip_grad_norm([1.0, 2.0], 1.0)
    with pytest.raises(ValueError, match="max_norm"):
        optim.clip_grad_norm(np.ones(3), 0.0)
    with pytest.raises(ValueError, match="max_norm"):
        optim.clip_grad_norm(np.ones(3), float("nan"))
    with pytest.raises(TypeError, match="max_norm"):
        optim.clip_grad_norm(np.ones(3), None)
    with pytest.raises(ValueError, match="C-contiguous"):
        optim.clip_grad_norm(np.ones(6)[::2], 1.0)


# ---------------------------------------------------------------------------------------
# state_dict / load_state_dict
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls, kw", ALL, ids=[c.__name__ for c, _ in ALL])
def test_state_dict_round_trip_continues_identically(cls, kw, dtype):
    p0, grads = _problem(257, dtype, 6, seed=7)
    p, g = p0.copy(), np.zeros_like(p0)
    opt = cls(p, g, **kw)
    for gi in grads[:3]:
        g[...] = gi
        opt.step()
    sd = opt.state_dict()
    assert sd["optimizer"] == cls.__name__ and sd["step"] == 3
    buffers = [k for k, v in sd.items() if isinstance(v, np.ndarray)]
    assert buffers and all(sd[k].shape == (257,) for k in buffers)
    sd_before = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in sd.items()}
    # A fresh optimiser with other hyper-parameters, restored from the checkpoint (as
    # 0-d / 1-d arrays, as np.load gives them), on a copy of the parameters.
    q, h = p.copy(), np.zeros_like(p)
    other = cls(q, h, lr=0.5)
    other.load_state_dict({k: (v if v is None else np.asarray(v)) for k, v in sd.items()})
    assert other.hyper_parameters == opt.hyper_parameters and other.step_count == 3
    for gi in grads[3:]:
        g[...] = gi
        h[...] = gi
        opt.step()
        other.step()
    assert np.array_equal(p, q)
    for k in buffers:                  # the checkpoint is a copy, not a view of the state
        assert np.array_equal(sd[k], sd_before[k])
        assert np.array_equal(opt.state_dict()[k], other.state_dict()[k])


def test_load_state_dict_checks_before_changing_anything():
    p, g = np.zeros(5), np.ones(5)
    opt = optim.Adam(p, g, lr=0.1)
    opt.step()
    good = opt.state_dict()
    before = opt.state_dict()
    bad_cases = [
        ({**good, "exp_avg": np.zeros(4)}, ValueError, r"exp_avg.*\(4,\).*\(5,\)"),
        ({**good, "optimizer": "SGD"}, ValueError, "SGD"),
        ({k: v for k, v in good.items() if k != "exp_avg_sq"}, ValueError, "exp_avg_sq"),
        ({k: v for k, v in good.items() if k != "eps"}, ValueError, "eps"),
        ({**good, "momentum_buffer": np.zeros(5)}, ValueError, "unexpected"),
        ({**good, "step": -1}, ValueError, "step"),
        ({**good, "lr": -1.0}, ValueError, "lr"),
        ({**good, "exp_avg": np.zeros(5, np.int32)}, TypeError, "exp_avg"),
        ([1, 2], TypeError, "dict"),
    ]
    for bad, exc, match in bad_cases:
        with pytest.raises(exc, match=match):
            opt.load_state_dict(bad)
    after = opt.state_dict()
    for k, v in before.items():
        assert np.array_equal(after[k], v) if isinstance(v, np.ndarray) else after[k] == v


def test_sgd_state_dict_momentum_buffer_follows_momentum():
    """Loading a momentum checkpoint into a plain SGD allocates the buffer (at load time,
    never in step), and the other way round drops it."""
    p, g = np.zeros(4), np.ones(4)
    plain = optim.SGD(p, g, lr=0.1)
    assert "momentum_buffer" not in plain.state_dict()
    heavy = optim.SGD(p.copy(), g.copy(), lr=0.1, momentum=0.9)
    heavy.step()
    plain.load_state_dict(heavy.state_dict())
    assert plain.momentum == 0.9 and "momentum_buffer" in plain.state_dict()
    plain.step()                  # continues with buf = 0.9 * g + g, not a copy of g
    np.testing.assert_allclose(p, -0.1 * 1.9)
    heavy.load_state_dict(optim.SGD(p, g, lr=0.1).state_dict())
    assert "momentum_buffer" not in heavy.state_dict()


# ---------------------------------------------------------------------------------------
# A real model
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls, kw", [(optim.Adam, dict(lr=1e-2)),
                                     (optim.SGD, dict(lr=0.5, momentum=0.9)),
                                     (optim.RMSprop, dict(lr=3e-3))])
def test_training_a_model_decreases_the_loss(cls, kw):
    """Drive a cylstm.LSTM's arena: loss = mean(y^2) falls."""
    lstm = cylstm.LSTM(3, 8, num_layers=2, seed=0)
    x = np.random.default_rng(8).standard_normal((6, 4, 3)).astype(np.float32)
    opt = cls(lstm, clip_norm=5.0, **kw)
    losses = []
    for _ in range(15):
        y, _ = lstm(x)
        losses.append(float(np.mean(y.astype(np.float64) ** 2)))
        opt.zero_grad()
        lstm.backward(2 * y / y.size)
        opt.step()
    assert losses[-1] < 0.5 * losses[0], losses
    assert opt.step_count == 15
