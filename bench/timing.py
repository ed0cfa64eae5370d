"""Timing: statistics, the GEMM peak, and interleaved blocks of individually timed reps."""

import contextlib
import gc
import math
import time

import numpy as np

import cases

def summarize(times):
    t = np.asarray(times) * 1e3
    p25, med, p75 = np.percentile(t, [25, 50, 75])
    return {"reps": len(t), "median_ms": float(med), "p25_ms": float(p25),
            "p75_ms": float(p75), "min_ms": float(t.min()), "max_ms": float(t.max())}


def timed(fn, k, out, deadline=math.inf):
    """Time k calls of fn one by one into `out`; stop early (after >= 1) at `deadline`."""
    pc = time.perf_counter
    for _ in range(k):
        t0 = pc()
        fn()
        out.append(pc() - t0)
        if t0 > deadline:
            break


def split(n, parts):
    """n reps over `parts` blocks, as evenly as possible."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


@contextlib.contextmanager
def no_gc():
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


# ---- GEMM peak ------------------------------------------------------------------------------

def _gemm_routes(dtype):
    """{route: (make operands for a size, one product)}: SciPy's BLAS (the library
    cylstm's kernels call) on Fortran-order arrays, and NumPy's matmul (NumPy's own
    BLAS, which may be a different build picking a different kernel)."""
    from scipy.linalg import blas

    gemm = blas.sgemm if dtype == np.float32 else blas.dgemm

    def operands(size, order):
        rng = np.random.default_rng(0)
        a, b = (np.asarray(rng.standard_normal((size, size)), dtype=dtype, order=order)
                for _ in range(2))
        return a, b, np.zeros((size, size), dtype=dtype, order=order)

    def scipy_route(size):
        a, b, c = operands(size, "F")
        return lambda: gemm(1.0, a, b, beta=0.0, c=c, overwrite_c=1)

    def numpy_route(size):
        a, b, c = operands(size, "C")
        return lambda: np.matmul(a, b, out=c)

    return {"scipy": scipy_route, "numpy": numpy_route}


def gemm_peak(dtype, n_threads, reps, sizes=None, seconds=1.0):
    """The best GFLOP/s of C = A @ B over square sizes, both BLAS routes and every rep:
    an upper bound of what a GEMM reaches on this machine now (on a shared machine the
    best rep is the least disturbed one). Up to `reps` timed reps per size and route,
    fewer when they would take more than `seconds`, at least 2.
    Returns {"gflops": best, "size", "route" of the best, "runs": [per size and route]}."""
    from threadpoolctl import threadpool_limits

    sizes = sizes or cases.GEMM_SIZES
    runs = []
    with threadpool_limits(limits=n_threads, user_api="blas"), no_gc():
        for size in sizes:
            for route, make in _gemm_routes(dtype).items():
                fn = make(size)
                t0 = time.perf_counter()
                fn()                                                  # warm-up
                est = time.perf_counter() - t0
                times = []
                timed(fn, max(2, min(reps, int(seconds / max(est, 1e-9)))), times)
                s = summarize(times)
                s.update(size=size, route=route,
                         gflops=2.0 * size ** 3 / (s["min_ms"] * 1e-3) / 1e9,
                         gflops_median=2.0 * size ** 3 / (s["median_ms"] * 1e-3) / 1e9)
                runs.append(s)
    best = max(runs, key=lambda r: r["gflops"])
    return {"gflops": best["gflops"], "size": best["size"], "route": best["route"],
            "runs": runs}


# ---- interleaved timing ---------------------------------------------------------------------

def warm(fn, seconds):
    """Call fn until `seconds` have passed (at least once); estimate one call's time."""
    times = []
    t_end = time.perf_counter() + seconds
    while True:
        timed(fn, 1, times)
        if time.perf_counter() >= t_end or len(times) >= 1000:
            break
    return float(np.median(times[1:])) if len(times) > 1 else times[0]


def measure(fns, n_threads, mode):
    """Interleaved blocks of individually timed reps of every callable in `fns`.

    Between blocks at more than one thread the run sleeps `settle` seconds: an idle
    OpenBLAS keeps its workers spinning for about 2**28 cycles after a call (~0.13 s at
    2.1 GHz); on this 2-core machine that made a cylstm call right after a reference call
    take 40-60 ms instead of 21 ms (medium inference, 2 threads). ONNX Runtime's and
    torch's OpenMP workers spin too. A block whose calls take < SLOW_CALL starts with
    one untimed call (warm caches after the other implementation). A block stops after
    BLOCK_BUDGET times its planned duration (both in cases.py): on a busy machine a
    2-thread call estimated at 0.1 ms during warm-up went on to take ~1 s per call (a descheduled OpenMP worker at
    each of T barriers), and its 3000 planned reps took 45 s. An implementation one of
    whose timed calls took longer than max_call gets no further blocks (a 51 s cell of
    --quick was 2-thread torch and NumPy calls of 1-4 s each under load).

    Returns ({impl: [seconds, ...]}, rounds, {skipped impl: its warm-up call time})."""
    settle = mode.settle if n_threads > 1 else 0.0
    est, skipped = {}, {}
    for impl, fn in fns.items():
        time.sleep(settle)
        est[impl] = warm(fn, mode.warm)
        if est[impl] > mode.max_call:
            skipped[impl] = est[impl]
    impls = tuple(i for i in fns if i not in skipped)
    reps = {i: int(min(mode.max_reps, max(mode.min_reps, math.ceil(mode.target / est[i]))))
            for i in impls}
    rounds = max(1, min([mode.rounds] + list(reps.values())))
    plan = {i: split(reps[i], rounds) for i in impls}
    times = {i: [] for i in impls}
    with no_gc():
        for r in range(rounds):
            for impl in (impls if r % 2 == 0 else impls[::-1]):   # ABC CBA: drift cancels
                if max(times[impl], default=0.0) > mode.max_call:
                    continue            # one call blew the limit: keep its reps, add none
                time.sleep(settle)
                if est[impl] < cases.SLOW_CALL:
                    fns[impl]()                                   # warm caches, untimed
                budget = cases.BLOCK_BUDGET * plan[impl][r] * est[impl]
                timed(fns[impl], plan[impl][r], times[impl], time.perf_counter() + budget)
    return times, rounds, skipped

