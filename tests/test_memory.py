"""Memory: flat resident memory over 10,000 calls of varying shapes; workspaces and caches
freed with the model; a training step keeps exactly what the formula says.

The formula (README, "Reliability"), one layer and direction without projection, for
T steps, B sequences, I inputs, H hidden units, itemsize s (4 or 8):

    after a training forward (the cache, in the layer's workspace):
        s * [T*B*(4H gates + H c + H tanh(c) + H h_{t-1} + I x) + B*4H (hz) + B*H (c0)
             + B*(I + H) (xh: a step's rows [x_t | h_{t-1}])]
    added by backward (its scratch, kept in the same workspace for the next step):
        s * [T*B*4H (dz) + B*4H + B*H + 4H*I + 4H*H + 4H]
    T >= functional.PACK_MIN_STEPS also keeps the packed recurrent weights, in one scratch
    of the weights' dtype per workspace sized for the larger of forward's and backward's
    packing (_lstm.forward_pack_size(I, H, 4H, dtype) and pack_size(4H, H, dtype) elements). Layer
    k > 0 reads layer k-1's output as its x (already counted as that layer's y, or the
    concatenation of both directions' y); a projection adds T*B*H (m) in forward and
    T*B*P (dhp) in backward.
"""
import gc
import os
import tracemalloc
import weakref

import numpy as np
import pytest

import cylstm
from cylstm import functional as F

NUMPY_DOMAIN = tracemalloc.DomainFilter(True, np.lib.tracemalloc_domain)


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def numpy_bytes():
    """Bytes of NumPy data buffers alive now (tracemalloc's NumPy domain)."""
    snap = tracemalloc.take_snapshot().filter_traces([NUMPY_DOMAIN])
    return sum(stat.size for stat in snap.statistics("filename"))


@pytest.fixture
def traced():
    gc.collect()
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
def test_resident_memory_stays_flat_over_10000_calls():
    """10,000 forward (+ backward in training) calls, shapes T 1..8, B 1..5, models
    uni- and bidirectional, with projection, float32 and float64, in train and eval
    mode, plus losses and an optimiser step: RSS after warm-up vs the end grows < 20 MB
    (the workspaces of the largest shape are a few kB; a leak of one array per call
    would be > 20 MB)."""
    rng = np.random.default_rng(0)
    models = [cylstm.LSTM(4, 8, seed=1), cylstm.LSTM(4, 8, bidirectional=True, seed=2),
              cylstm.LSTM(4, 8, num_layers=2, proj_size=3, dtype="float64", seed=3)]
    opts = [cylstm.optim.Adam(m, lr=1e-3) for m in models]
    emb = cylstm.Embedding(10, 4, seed=4)
    xs = {(T, B): rng.integers(0, 10, (T, B)) for T in range(1, 9) for B in range(1, 6)}
    shapes = list(xs)

    def run(n):
        for k in range(n):
            m, opt = models[k % 3], opts[k % 3]
            T, B = shapes[(k * 7) % len(shapes)]
            x = emb(xs[(T, B)])
            if k % 4 == 3:
                m.eval()
                m(x)
                m.train()
                continue
            y, _ = m(x, None, rng.integers(1, T + 1, B))
            loss, dy = cylstm.losses.mse(y, np.zeros_like(y))
            opt.zero_grad()
            m.backward(dy)
            opt.step()

    run(1000)                                   # warm-up: every shape and mode seen
    gc.collect()
    before = rss_bytes()
    run(10_000)
    gc.collect()
    growth = rss_bytes() - before
    print(f"RSS growth over 10,000 calls: {growth / 2**20:.2f} MB")
    assert growth < 20 * 2**20, f"RSS grew {growth / 2**20:.1f} MB"


@pytest.mark.parametrize("kw", [dict(), dict(bidirectional=True, num_layers=2),
                                dict(proj_size=3)], ids=["plain", "bidi-stacked", "proj"])
def test_workspaces_and_caches_are_freed_with_the_model(kw, traced):
    """Deleting the model frees its workspaces (training and the inference pool) and its
    cache by reference counting alone (no cycle: gc is off), back to the NumPy bytes
    that were alive before it was made."""
    x = np.random.default_rng(5).standard_normal((7, 3, 4)).astype(np.float32)
    gc.collect()
    gc.disable()
    try:
        base = numpy_bytes()
        lstm = cylstm.LSTM(4, 8, seed=6, **kw)
        y, _ = lstm(x)
        lstm.backward(np.ones_like(y))
        lstm.eval()
        lstm(x)
        refs = [weakref.ref(ws) for ws in lstm._workspaces.values()]
        refs += [weakref.ref(ws) for s in lstm._spare_workspaces for ws in s.values()]
        held = numpy_bytes() - base
        assert len(refs) >= 2 and held > 4000
        del lstm, y
        assert all(r() is None for r in refs)
        # (NumPy keeps a few hundred bytes of its own small-array caches)
        assert numpy_bytes() - base < 1024, (numpy_bytes() - base, held)
    finally:
        gc.enable()


def _predicted(T, B, I, H, s, fused=True):
    """The README's formula; the step's rows are [x_t | h_{t-1}] when the input's product
    is in the step (fused), else h_{t-1} alone."""
    forward = s * (T * B * (4 * H + H + H + H + I) + B * 4 * H + B * H
                   + B * ((I if fused else 0) + H))
    backward = s * (T * B * 4 * H + B * 4 * H + B * H + 4 * H * I + 4 * H * H + 4 * H)
    return forward, backward


@pytest.mark.parametrize("T,B,I,H,ragged", [(50, 8, 16, 32, False), (3, 64, 8, 100, False),
                                             (200, 1, 5, 12, False), (50, 8, 16, 32, True),
                                             (40, 64, 8, 20, True)])
def test_training_step_keeps_what_the_formula_says(T, B, I, H, ragged, traced, input_path):
    """tracemalloc (NumPy's domain) of a training step of one float64 layer, fresh model:
    the bytes the model holds after forward (caller's y, h_n, c_n excluded) and what
    backward adds (caller's dx, dh0, dc0 excluded) equal the formula within 2% + 4 kB.
    Ragged lengths add backward's active rows (x and h_{t-1}, their places) and the dx
    scratch of one time block."""
    from cylstm import _lstm
    from cylstm._threads import N_PARTS
    x = np.random.default_rng(7).standard_normal((T, B, I))
    lengths = np.random.default_rng(9).integers(1, T + 1, B) if ragged else None
    if ragged:
        lengths[0] = T
    lstm = cylstm.LSTM(I, H, dtype="float64", seed=8)
    want_fwd, want_bwd = _predicted(T, B, I, H, 8, input_path)
    if ragged:
        part_rows = -(-F.block_steps(B) * B // N_PARTS)
        want_bwd += 8 * T * B * (I + H) + 4 * (2 * T * B + T + 1) + 8 * N_PARTS * part_rows * I
    if T >= F.PACK_MIN_STEPS:          # the packed weights, one slot for both passes
        pack_f = 8 * _lstm.forward_pack_size(I, H, 4 * H, np.float64, input_path)
        pack_b = 8 * _lstm.pack_size(4 * H, H, np.float64)
        want_fwd, want_bwd = want_fwd + pack_f, want_bwd + max(pack_b - pack_f, 0)
    base = numpy_bytes()
    y, (h, c) = lstm(x, lengths=lengths)
    fwd = numpy_bytes() - base - y.nbytes - h.nbytes - c.nbytes
    base = numpy_bytes()
    dx, (dh0, dc0) = lstm.backward(np.ones_like(y))
    bwd = numpy_bytes() - base - dx.nbytes - dh0.nbytes - dc0.nbytes
    print(f"T={T} B={B} I={I} H={H}: forward keeps {fwd} B (formula {want_fwd}), "
          f"backward adds {bwd} B (formula {want_bwd})")
    for got, want in ((fwd, want_fwd), (bwd, want_bwd)):
        assert abs(got - want) <= 0.02 * want + 4096, (got, want)
    # the next step of the same shape allocates nothing more for the model
    base = numpy_bytes()
    y, (h, c) = lstm(x, lengths=lengths)
    dx, (dh0, dc0) = lstm.backward(np.ones_like(y))
    assert numpy_bytes() - base <= 4096 + y.nbytes + x.nbytes


def test_float32_packed_weights_are_part_of_the_workspace(traced):
    """float32 with T >= PACK_MIN_STEPS: the packed recurrent weights are workspace too
    (pack_floats(H, 4H) in forward, pack_floats(4H, H) in backward)."""
    from cylstm import _lstm
    T, B, I, H = max(8, F.PACK_MIN_STEPS), 4, 6, 24
    x = np.random.default_rng(9).standard_normal((T, B, I)).astype(np.float32)
    lstm = cylstm.LSTM(I, H, seed=10)
    want_fwd, want_bwd = _predicted(T, B, I, H, 4)
    pack_f, pack_b = 4 * _lstm.pack_floats(H, 4 * H), 4 * _lstm.pack_floats(4 * H, H)
    base = numpy_bytes()
    y, (h, c) = lstm(x)
    fwd = numpy_bytes() - base - y.nbytes - h.nbytes - c.nbytes
    base = numpy_bytes()
    dx, _ = lstm.backward(np.ones_like(y))
    bwd = numpy_bytes() - base - dx.nbytes - 2 * B * H * 4
    # one "wpack" slot per workspace, resized to the larger of the two packings
    assert abs(fwd - (want_fwd + pack_f)) <= 0.02 * want_fwd + 4096, (fwd, want_fwd, pack_f)
    assert abs(bwd - (want_bwd + max(pack_b - pack_f, 0))) <= 0.02 * want_bwd + 4096 + pack_b, \
        (bwd, want_bwd, pack_b)
