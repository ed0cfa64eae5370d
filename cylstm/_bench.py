"""Benchmark cylstm against its NumPy reference: ``python -m cylstm bench [--quick]``.

It follows /work/shared/BENCH.md ("How") and STYLE.md point 17:

1. Verify before timing. Each configuration's exact shapes (with --quick, only the
   first 10 steps of large and charrnn) are run through a float64 NumPy reference (the
   oracle); the cylstm forward (inference and training), every gradient, and the timed
   NumPy reference itself must agree with it to a relative tolerance (max |a - b| / max
   magnitude: 1e-4 for float32, 1e-9 for float64). What fails is not timed, and the
   exit status is 1.
2. Time two tasks: inference (``lstm.eval()``; reference ``training=False``) and a
   training step (forward ``training=True`` + backward; gradient buffers zeroed once).
   cylstm runs through ``cylstm.LSTM`` (it reuses its workspaces across calls), the
   reference through ``cylstm.reference``'s functions, once per layer.
3. Interleave in one run, at each thread count (``cylstm.threads(n)`` for cylstm;
   ``threadpoolctl.threadpool_limits(n)`` for the BLAS both use): blocks of reps in the
   order cylstm, reference, reference, cylstm, ... so that drift cancels in the ratio.
   Before each block at more than one thread the run sleeps ``settle`` seconds: an
   idle OpenBLAS keeps its worker threads spinning for about 2**28 cycles after a
   call (~0.13 s at 2.1 GHz), and measured on this 2-core machine (medium inference,
   2 threads) that made a cylstm call that directly followed a reference call take
   40-60 ms instead of 21 ms, for about 0.15 s. A block starts with one untimed call
   when a call takes < 50 ms (warm caches after the other implementation).
   A cell whose calls take longer than ``max_call`` (3 s quick, 30 s full: only seen on
   a busy machine) is reported as skipped rather than timed with fewer than 3 reps.
4. Time every rep on its own (``time.perf_counter``, GC off); quote the median and
   p25-p75, GFLOP/s at the median, and its fraction of a large square GEMM through
   scipy's BLAS at the same thread count, measured in the same run (start and end).
5. Record everything as JSON lines: a header (versions, thread settings, the BLAS and
   OpenMP pools seen by threadpoolctl, the CPU), one line per GEMM-peak measurement,
   per verification and per timing, and the CPU time other processes used meanwhile.

Dimensions: T steps, B batch, I input, H hidden, L layers. Only numpy, scipy and
threadpoolctl are needed (no torch: peers are a separate benchmark).
"""

import argparse
import datetime
import gc
import json
import math
import os
import platform
import sys
import time
from typing import NamedTuple

import numpy as np

import cylstm
from cylstm import reference as ref
from cylstm._threads import BLAS_THREAD_LOCAL, N_PARTS

__all__ = ["CONFIGS", "add_arguments", "main", "run"]


class Config(NamedTuple):
    B: int
    T: int
    I: int
    H: int
    L: int
    what: str
    state: bool = False       # carry (h, c) in and out of every call (streaming)


# BENCH.md's configurations, in its order.
CONFIGS = {
    "tiny": Config(1, 50, 32, 64, 1, "latency: one small sequence"),
    "small": Config(16, 100, 64, 128, 1, "small models, small batches"),
    "medium": Config(32, 100, 128, 256, 1, "the everyday case"),
    "large": Config(64, 100, 512, 512, 1, "compute-bound"),
    "charrnn": Config(32, 128, 96, 512, 2, "character LM training step"),
    "step": Config(1, 1, 256, 256, 1, "one streaming step, state carried in", state=True),
}
TASKS = ("inference", "training")
IMPLS = ("cylstm", "reference")
TOLERANCE = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-9}


class _Mode(NamedTuple):
    target: float        # seconds of timed reps per implementation and cell
    warm: float          # seconds of warm-up per implementation and cell (>= 1 call)
    rounds: int          # alternations cylstm/reference (each round = 2 blocks)
    settle: float        # seconds slept before each block when threads > 1
    gemm_reps: int       # timed GEMM-peak reps, at the start and at the end
    verify_T: int        # configurations above VERIFY_FLOPS are verified on T[:verify_T]
    max_call: float      # s; an implementation whose calls take longer is not timed
    min_reps: int = 3
    max_reps: int = 20000


QUICK = _Mode(target=0.3, warm=0.05, rounds=2, settle=0.15, gemm_reps=4, verify_T=10,
              max_call=3.0)
FULL = _Mode(target=2.0, warm=0.3, rounds=4, settle=0.25, gemm_reps=10, verify_T=10**9,
             max_call=30.0)
# max_call: the slowest call on an idle 2-core machine is ~1.3 s (charrnn training at 1
# thread). With the other core busy, a 2-thread OpenBLAS call can be 10-30x slower (each
# per-step GEMM waits for a descheduled worker): 15 s for one reference training step
# on large was seen. Such cells would blow --quick's 2 minutes and say nothing about
# cylstm, so they are reported as skipped rather than timed with fewer than 3 reps.
# large and charrnn (~27 GFLOP per forward): verifying their full T=100/128 costs ~5 s
# each on 2 cores (the float64 oracle, the float32 reference, cylstm at 1 and 2 threads),
# so --quick checks their first 10 steps: same B, I, H, L, same code paths.
VERIFY_FLOPS = 1e10
GEMM_SIZE = 2048
SLOW_CALL = 0.05         # s; a call at least this long needs no untimed call per block


def flops(cfg, task):
    """FLOPs of one call: 2*B*T*4H*(I_l + H) per layer forward; training ~3x."""
    f = sum(2 * cfg.B * cfg.T * 4 * cfg.H * ((cfg.I if l == 0 else cfg.H) + cfg.H)
            for l in range(cfg.L))
    return 3 * f if task == "training" else f


# ---- the machine ----------------------------------------------------------------------------

def _cpu_info():
    """The CPU's model name and its SIMD flags that matter here (Linux; else best effort)."""
    model, flags = None, []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key == "flags" and not flags:
                    have = set(value.split())
                    flags = [x for x in ("avx", "avx2", "fma", "avx512f", "avx512bw",
                                         "avx512vl", "avx512_vnni", "amx_tile") if x in have]
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags


def _usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def _git_commit():
    """The checkout's commit, read from .git (no git process), or None if not a checkout."""
    git = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(cylstm.__file__))), ".git")
    try:
        with open(os.path.join(git, "HEAD")) as f:
            head = f.read().strip()
        if not head.startswith("ref:"):
            return head
        name = head[4:].strip()
        path = os.path.join(git, *name.split("/"))
        if os.path.exists(path):
            with open(path) as f:
                return f.read().strip()
        with open(os.path.join(git, "packed-refs")) as f:
            for line in f:
                if line.rstrip().endswith(" " + name):
                    return line.split()[0]
    except OSError:
        pass
    return None


def _header(args, mode):
    import scipy
    import threadpoolctl
    from threadpoolctl import threadpool_info

    model, flags = _cpu_info()
    ext = cylstm._threads._lstm.__file__
    env = {k: os.environ[k] for k in (
        "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY",
        "OMP_PROC_BIND", "GOMP_SPINCOUNT", "OPENBLAS_THREAD_TIMEOUT") if k in os.environ}
    return {
        "type": "header",
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "options": {"quick": args.quick, "configs": args.configs, "threads": args.threads,
                    "tasks": args.tasks, "dtype": args.dtype, "mode": mode._asdict()},
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "threadpoolctl": threadpoolctl.__version__,
        "cylstm": cylstm.__version__,
        "cylstm_path": os.path.dirname(os.path.abspath(cylstm.__file__)),
        "cylstm_extension": ext,
        "cylstm_extension_mtime": datetime.datetime.fromtimestamp(
            os.path.getmtime(ext), datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "openmp_enabled": cylstm.openmp_enabled(),
        "N_PARTS": N_PARTS,
        "blas_thread_local": BLAS_THREAD_LOCAL,
        "cylstm_default_threads": cylstm.get_num_threads(),
        "cpu_model": model,
        "cpu_flags": flags,
        "usable_cores": _usable_cores(),
        "os_cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "env": env,
        "threadpool_info": threadpool_info(),
    }


class _LoadMeter:
    """CPU time that *other* processes (and the hypervisor: steal) used while we ran,
    in cores: busy time from /proc/stat minus this process's own CPU time, over wall
    time. None where /proc/stat is missing. Jiffy resolution (10 ms)."""

    def __init__(self):
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._t0 = self._read()

    @staticmethod
    def _busy_jiffies():
        try:
            with open("/proc/stat") as f:
                v = [int(a) for a in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal
        return sum(v[:3]) + sum(v[5:8])

    def _read(self):
        t = os.times()
        return self._busy_jiffies(), t.user + t.system, time.perf_counter()

    def cores(self):
        (b0, own0, w0), (b1, own1, w1) = self._t0, self._read()
        if b0 is None or b1 is None or w1 <= w0:
            return None
        return max(0.0, ((b1 - b0) / self._hz - (own1 - own0)) / (w1 - w0))


# ---- statistics -----------------------------------------------------------------------------

def _stats(times):
    t = np.asarray(times) * 1e3
    p25, med, p75 = np.percentile(t, [25, 50, 75])
    return {"reps": len(t), "median_ms": float(med), "p25_ms": float(p25),
            "p75_ms": float(p75), "min_ms": float(t.min()), "max_ms": float(t.max())}


def _timed(fn, k, out):
    pc = time.perf_counter
    for _ in range(k):
        t0 = pc()
        fn()
        out.append(pc() - t0)


def _split(n, parts):
    """n reps over `parts` blocks, as evenly as possible."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


# ---- GEMM peak ------------------------------------------------------------------------------

def gemm_peak(dtype, n_threads, reps, size=GEMM_SIZE):
    """Time C = A @ B, (size x size) Fortran-order, through scipy.linalg.blas.?gemm."""
    from scipy.linalg import blas
    from threadpoolctl import threadpool_limits

    gemm = blas.sgemm if dtype == np.float32 else blas.dgemm
    rng = np.random.default_rng(0)
    a = np.asfortranarray(rng.standard_normal((size, size)), dtype=dtype)
    b = np.asfortranarray(rng.standard_normal((size, size)), dtype=dtype)
    c = np.zeros((size, size), dtype=dtype, order="F")
    times = []
    with threadpool_limits(limits=n_threads, user_api="blas"):
        gemm(1.0, a, b, beta=0.0, c=c, overwrite_c=1)         # warm-up
        gc_was = gc.isenabled()
        gc.disable()
        try:
            _timed(lambda: gemm(1.0, a, b, beta=0.0, c=c, overwrite_c=1), reps, times)
        finally:
            if gc_was:
                gc.enable()
    s = _stats(times)
    s["gflops"] = 2.0 * size ** 3 / (s["median_ms"] * 1e-3) / 1e9
    return s


# ---- the two implementations ----------------------------------------------------------------

class _Reference:
    """The NumPy reference as a stacked model: cylstm.reference's functions per layer."""

    def __init__(self, layers):
        self.layers = layers                      # [(w_ih, w_hh, b_ih, b_hh)] per layer
        self.grads = [tuple(np.zeros_like(w) for w in lw) for lw in layers]

    def zero_grad(self):
        for g in self.grads:
            for a in g:
                a[...] = 0

    def forward(self, x, state=None, training=False):
        """x (T, B, I); state (h0, c0) each (L, B, H) or None -> y, (h_n, c_n), caches."""
        caches, hs, cs = [], [], []
        inp = x
        for k, (w_ih, w_hh, b_ih, b_hh) in enumerate(self.layers):
            h0, c0 = (None, None) if state is None else (state[0][k], state[1][k])
            inp, h, c, cache = ref.lstm_layer_forward(inp, w_ih, w_hh, b_ih, b_hh, h0, c0,
                                                      training=training)
            caches.append(cache)
            hs.append(h)
            cs.append(c)
        return inp, (np.stack(hs), np.stack(cs)), caches

    def backward(self, caches, dy):
        """dy (T, B, H) -> dx (T, B, I), (dh0, dc0) each (L, B, H); += into self.grads."""
        dh0, dc0 = [None] * len(caches), [None] * len(caches)
        for k in reversed(range(len(caches))):
            dw_ih, dw_hh, db_ih, db_hh = self.grads[k]
            dy, dh0[k], dc0[k] = ref.lstm_layer_backward(caches[k], dy, dw_ih=dw_ih,
                                                         dw_hh=dw_hh, db_ih=db_ih, db_hh=db_hh)
        return dy, (np.stack(dh0), np.stack(dc0))


def _problem(cfg, dtype, seed=0):
    """cylstm.LSTM with PyTorch's init, a reference twin with copies of its weights,
    x (T, B, I), dy (T, B, H) and the initial state (streaming configs only)."""
    lstm = cylstm.LSTM(cfg.I, cfg.H, num_layers=cfg.L, dtype=dtype, seed=seed)
    layers = [tuple(lstm.params[f"{n}_l{k}"].copy()
                    for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
              for k in range(cfg.L)]
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((cfg.T, cfg.B, cfg.I)).astype(dtype)
    dy = rng.standard_normal((cfg.T, cfg.B, cfg.H)).astype(dtype)
    state = None
    if cfg.state:
        state = tuple(0.5 * rng.standard_normal((cfg.L, cfg.B, cfg.H)).astype(dtype)
                      for _ in range(2))
    return lstm, _Reference(layers), x, dy, state


# ---- verification ---------------------------------------------------------------------------

def _rel_err(a, b):
    """max |a - b| relative to the largest magnitude of either (tests' definition)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return math.inf
    scale = max(np.abs(a).max(), np.abs(b).max())
    return 0.0 if scale == 0 else float(np.abs(a - b).max() / scale)


def _oracle(twin, x, dy, state):
    """Everything verification compares, from the reference in float64."""
    f64 = _Reference([tuple(w.astype(np.float64) for w in lw) for lw in twin.layers])
    st = None if state is None else tuple(s.astype(np.float64) for s in state)
    y, (h, c), caches = f64.forward(x.astype(np.float64), st, training=True)
    dx, (dh0, dc0) = f64.backward(caches, dy.astype(np.float64))
    return _outputs(y, h, c, dx, dh0, dc0, f64.grads)


def _outputs(y, h, c, dx, dh0, dc0, grads):
    out = {"y": y, "h_n": h, "c_n": c, "dx": dx, "dh0": dh0, "dc0": dc0}
    for k, g in enumerate(grads):
        for name, a in zip(("weight_ih", "weight_hh", "bias_ih", "bias_hh"), g):
            out[f"d{name}_l{k}"] = a
    return out


def _compare(got, want, tol):
    errs = {k: _rel_err(got[k], want[k]) for k in got}
    worst = max(errs, key=errs.get)
    return {"max_rel_err": errs[worst], "worst": worst, "ok": errs[worst] <= tol,
            "errors": errs}


def _verify_cylstm(lstm, x, dy, state, want, tol):
    """cylstm inference forward and training step against the oracle."""
    lstm.eval()
    y, (h, c) = lstm(x, state)
    inf = _compare({"y": y, "h_n": h, "c_n": c}, {k: want[k] for k in ("y", "h_n", "c_n")}, tol)
    lstm.train()
    lstm.zero_grad()
    y, (h, c) = lstm(x, state)
    dx, (dh0, dc0) = lstm.backward(dy)
    L = lstm.num_layers
    names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    grads = [tuple(lstm.grads[f"{n}_l{k}"] for n in names) for k in range(L)]
    tr = _compare(_outputs(y, h, c, dx, dh0, dc0, grads), want, tol)
    lstm.zero_grad()
    return {"inference": inf, "training": tr}


def _verify_reference(twin, x, dy, state, want, tol):
    """The timed reference (in the bench dtype): inference forward and training step."""
    y, (h, c), _ = twin.forward(x, state, training=False)
    inf = _compare({"y": y, "h_n": h, "c_n": c}, {k: want[k] for k in ("y", "h_n", "c_n")}, tol)
    twin.zero_grad()
    y, (h, c), caches = twin.forward(x, state, training=True)
    dx, (dh0, dc0) = twin.backward(caches, dy)
    tr = _compare(_outputs(y, h, c, dx, dh0, dc0, twin.grads), want, tol)
    twin.zero_grad()
    return {"inference": inf, "training": tr}


def _verify_config(lstm, twin, x, dy, state, thread_counts, tol):
    """Verify both implementations on x (T, B, I); [(impl, threads, task, result)]."""
    from threadpoolctl import threadpool_limits

    out = []
    with threadpool_limits(limits=max(thread_counts), user_api="blas"):
        want = _oracle(twin, x, dy, state)
        if x.dtype != np.float64:                 # in float64 the reference is the oracle
            res = _verify_reference(twin, x, dy, state, want, tol)
            out += [("reference", None, task, res[task]) for task in TASKS]
    for n in thread_counts:
        with cylstm.threads(n), threadpool_limits(limits=n, user_api="blas"):
            res = _verify_cylstm(lstm, x, dy, state, want, tol)
        out += [("cylstm", n, task, res[task]) for task in TASKS]
    return out


# ---- timing ---------------------------------------------------------------------------------

def _callables(task, lstm, twin, x, dy, state):
    """Zero-argument callables for one call of each implementation (state carried)."""
    if task == "inference":
        lstm.eval()
        cs = [state]
        rs = [state]

        def cyl():
            _, st = lstm(x, cs[0])
            if state is not None:
                cs[0] = st

        def refc():
            _, st, _ = twin.forward(x, rs[0], training=False)
            if state is not None:
                rs[0] = st
    else:
        lstm.train()
        lstm.zero_grad()
        twin.zero_grad()

        def cyl():
            lstm(x, state)
            lstm.backward(dy)

        def refc():
            _, _, caches = twin.forward(x, state, training=True)
            twin.backward(caches, dy)
    return {"cylstm": cyl, "reference": refc}


def _warm(fn, seconds):
    """Call fn until `seconds` have passed (at least once); estimate one call's time."""
    times = []
    t_end = time.perf_counter() + seconds
    while True:
        _timed(fn, 1, times)
        if time.perf_counter() >= t_end or len(times) >= 1000:
            break
    return float(np.median(times[1:])) if len(times) > 1 else times[0]


def _measure(fns, n_threads, mode, impls):
    """Interleaved blocks of individually timed reps.

    Returns ({impl: [seconds, ...]}, rounds, {skipped impl: its warm-up call time})."""
    settle = mode.settle if n_threads > 1 else 0.0
    est, skipped = {}, {}
    for impl in impls:
        if settle:
            time.sleep(settle)
        est[impl] = _warm(fns[impl], mode.warm)
        if est[impl] > mode.max_call:
            skipped[impl] = est[impl]
    impls = tuple(i for i in impls if i not in skipped)
    reps = {i: int(min(mode.max_reps, max(mode.min_reps, math.ceil(mode.target / est[i]))))
            for i in impls}
    rounds = max(1, min([mode.rounds] + list(reps.values())))
    plan = {i: _split(reps[i], rounds) for i in impls}
    times = {i: [] for i in impls}
    if not impls:
        return times, 0, skipped
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            order = impls if r % 2 == 0 else impls[::-1]      # ABBA: linear drift cancels
            for impl in order:
                if settle:
                    time.sleep(settle)
                if est[impl] < SLOW_CALL:
                    fns[impl]()                               # warm caches, untimed
                _timed(fns[impl], plan[impl][r], times[impl])
    finally:
        if gc_was:
            gc.enable()
    return times, rounds, skipped


# ---- output ---------------------------------------------------------------------------------

class _Sink:
    """JSON lines to a file (written as they come) or, for '-', to stdout at the end."""

    def __init__(self, path):
        self.path = path
        self.lines = []
        self._f = None
        if path and path != "-":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._f = open(path, "w")

    def write(self, record):
        line = json.dumps(record, default=_json_default)
        self.lines.append(line)
        if self._f:
            self._f.write(line + "\n")
            self._f.flush()

    def close(self):
        if self._f:
            self._f.close()


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _fmt(v):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    if v >= 0.1:
        return f"{v:.3f}"
    return f"{v:.4f}"


def _ms(s):
    return f"{_fmt(s['median_ms'])} [{_fmt(s['p25_ms'])}-{_fmt(s['p75_ms'])}]"


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---- the run --------------------------------------------------------------------------------

def add_arguments(p, default_json="-"):
    p.add_argument("--quick", action="store_true",
                   help="~0.3 s of timed reps per implementation and cell instead of ~2 s "
                        "(all configurations; finishes in about 1-2 minutes on 2 cores)")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma-separated subset of {','.join(CONFIGS)} (default: all)")
    p.add_argument("--threads", default="1,2",
                   help="comma-separated thread counts (default: 1,2)")
    p.add_argument("--tasks", default=",".join(TASKS),
                   help="comma-separated subset of inference,training (default: both)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--json", default=default_json, metavar="PATH",
                   help="write one JSON line per measurement to PATH ('-': print them to "
                        f"stdout after the tables; default: {default_json or 'none'})")
    return p


def _parse_list(text, allowed, what):
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise SystemExit(f"--{what}: unknown {bad or text!r}; choose from {','.join(allowed)}")
    return items


def _parse_threads(text):
    try:
        out = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise SystemExit(f"--threads: expected positive integers like 1,2, got {text!r}")
    return out


def run(args):
    """Run the benchmark described by parsed ``args``; returns the exit status."""
    from threadpoolctl import threadpool_limits

    args.configs = list(dict.fromkeys(_parse_list(args.configs, list(CONFIGS), "configs")))
    args.tasks = _parse_list(args.tasks, TASKS, "tasks")
    args.threads = _parse_threads(args.threads)
    dtype = np.dtype(args.dtype)
    tol = TOLERANCE[dtype]
    mode = QUICK if args.quick else FULL
    gemm_name = "sgemm" if dtype == np.float32 else "dgemm"
    t_start = time.perf_counter()
    sink = _Sink(args.json)
    header = _header(args, mode)
    sink.write(header)
    usable = header["usable_cores"]
    _log(f"cylstm {cylstm.__version__} bench, {args.dtype}, threads {args.threads}, "
         f"{'quick' if args.quick else 'full'}; CPU {header['cpu_model']}, {usable} usable "
         f"cores, OpenMP {'on' if header['openmp_enabled'] else 'OFF'}, N_PARTS {N_PARTS}")
    if max(args.threads) > (usable or 1):
        _log(f"warning: more threads than the {usable} usable cores requested")

    peak = {}
    for n in args.threads:
        if n > 1:
            time.sleep(mode.settle)
        s = gemm_peak(dtype, n, mode.gemm_reps)
        peak[n] = s["gflops"]
        sink.write({"type": "gemm_peak", "when": "start", "gemm": gemm_name, "size": GEMM_SIZE,
                    "dtype": args.dtype, "threads": n, **s})
        _log(f"{gemm_name} {GEMM_SIZE}^3 peak, {n} thread(s): {s['gflops']:.0f} GFLOP/s")

    verification, rows, failed = [], [], False
    for name in args.configs:
        cfg = CONFIGS[name]
        lstm, twin, x, dy, state = _problem(cfg, dtype)
        shape = {k: getattr(cfg, k) for k in ("T", "B", "I", "H", "L")}
        t0 = time.perf_counter()
        Tv = cfg.T if flops(cfg, "inference") <= VERIFY_FLOPS else min(cfg.T, mode.verify_T)
        checks = _verify_config(lstm, twin, x[:Tv], dy[:Tv], state, args.threads, tol)
        ok = {(impl, task): True for impl in IMPLS for task in args.tasks}
        for impl, n, task, r in checks:
            if task not in args.tasks:
                continue
            r = dict(r, T_checked=Tv)
            verification.append((impl, name, n, task, r))
            ok[impl, task] &= r["ok"]
            sink.write({"type": "verification", "config": name, "impl": impl,
                        "threads": n, "task": task, "dtype": args.dtype, "shape": shape,
                        "oracle": "reference float64", "tolerance": tol, **r})
        failed |= not all(ok.values())
        _log(f"[{name}] verified in {time.perf_counter() - t0:.1f} s (T={Tv}): "
             + ", ".join(f"{i} {t} {'ok' if v else 'FAILED'}" for (i, t), v in ok.items()))

        for n in args.threads:
            for task in args.tasks:
                impls = tuple(i for i in IMPLS if ok[i, task])
                if not impls:
                    rows.append({"config": name, "task": task, "threads": n, "stats": {},
                                 "load": None, "rounds": 0})
                    continue
                fns = _callables(task, lstm, twin, x, dy, state)
                meter = _LoadMeter()
                with cylstm.threads(n), threadpool_limits(limits=n, user_api="blas"):
                    eff = cylstm.get_num_threads()
                    times, rounds, skipped = _measure(fns, n, mode, impls)
                load = meter.cores()
                fl = flops(cfg, task)
                for impl, est in skipped.items():
                    sink.write({"type": "timing", "config": name, "task": task, "impl": impl,
                                "threads": n, "dtype": args.dtype, "shape": shape,
                                "skipped": f"one call took {est:.1f} s > {mode.max_call} s",
                                "warmup_call_ms": est * 1e3, "foreign_load_cores": load,
                                "quick": args.quick})
                impls = tuple(i for i in impls if i not in skipped)
                stats = {i: _stats(times[i]) for i in impls}
                row = {"config": name, "task": task, "threads": n, "stats": stats,
                       "load": load, "rounds": rounds, "skipped": skipped}
                for impl in impls:
                    s = stats[impl]
                    gf = fl / (s["median_ms"] * 1e-3) / 1e9
                    rec = {"type": "timing", "config": name, "task": task, "impl": impl,
                           "threads": n, "dtype": args.dtype, "shape": shape, **s,
                           "flops": fl, "gflops": gf, "gemm": gemm_name,
                           "gemm_peak_gflops": peak[n], "fraction_of_peak": gf / peak[n],
                           "rounds": rounds, "foreign_load_cores": load,
                           "quick": args.quick}
                    if impl == "cylstm":
                        rec["cylstm_threads_effective"] = eff
                    if len(impls) == 2:
                        rec["speedup_vs_reference"] = (stats["reference"]["median_ms"]
                                                       / stats["cylstm"]["median_ms"])
                    sink.write(rec)
                rows.append(row)
                c, r = stats.get("cylstm"), stats.get("reference")
                _log(f"[{name} {task} {n}t] "
                     + (f"cylstm {_ms(c)} ms " if c else "")
                     + (f"reference {_ms(r)} ms " if r else "")
                     + "".join(f"{i} SKIPPED (one call {e:.1f} s) " for i, e in skipped.items())
                     + (f"speedup {r['median_ms'] / c['median_ms']:.2f}x" if c and r else "")
                     + ("" if load is None else f" (other load {load:.2f} cores)"))
        del lstm, twin

    peak_end = {}
    for n in args.threads:
        if n > 1:
            time.sleep(mode.settle)
        s = gemm_peak(dtype, n, mode.gemm_reps)
        peak_end[n] = s["gflops"]
        sink.write({"type": "gemm_peak", "when": "end", "gemm": gemm_name, "size": GEMM_SIZE,
                    "dtype": args.dtype, "threads": n, **s})
    elapsed = time.perf_counter() - t_start
    sink.write({"type": "end", "elapsed_s": elapsed, "verification_failed": failed})
    sink.close()

    _print_report(args, header, mode, gemm_name, peak, peak_end, verification, rows,
                  elapsed, tol)
    if args.json == "-":
        print("\n## JSON lines\n")
        for line in sink.lines:
            print(line)
    elif args.json:
        print(f"\nJSON lines: {args.json}")
    return 1 if failed else 0


# ---- the report -----------------------------------------------------------------------------

def _print_report(args, header, mode, gemm_name, peak, peak_end, verification, rows,
                  elapsed, tol):
    p = print
    p(f"# cylstm {header['cylstm']} vs NumPy reference, {args.dtype}"
      f"{' (quick)' if args.quick else ''}\n")
    p(f"CPU {header['cpu_model']} ({', '.join(header['cpu_flags'])}), "
      f"{header['usable_cores']} usable cores; OpenMP "
      f"{'on' if header['openmp_enabled'] else 'OFF'}, N_PARTS {header['N_PARTS']}; "
      f"Python {header['python']}, NumPy {header['numpy']}, SciPy {header['scipy']}; "
      + "; ".join(f"{i['internal_api']} {i.get('version')} ({os.path.basename(i['filepath'])}, "
                  f"{i.get('architecture', '?')})" for i in header["threadpool_info"]
                  if i.get("user_api") == "blas")
      + f". Took {elapsed:.0f} s.\n")
    p(f"{gemm_name} {GEMM_SIZE}^3 peak (scipy BLAS, GFLOP/s at the median, start / end): "
      + "; ".join(f"{n} thread{'s' if n > 1 else ''}: {peak[n]:.0f} / {peak_end[n]:.0f}"
                  for n in peak) + ". Fractions below use the start figure.")
    drift = [n for n in peak if abs(peak_end[n] - peak[n]) > 0.1 * peak[n]]
    if drift:
        p(f"WARNING: the GEMM peak moved by more than 10% during the run "
          f"(threads {drift}): the machine was busy; treat absolute figures with care.")

    p(f"\n## Verification (against the reference in float64; tolerance {tol:g} of the "
      f"largest magnitude)\n")
    p("| config | T checked | implementation | threads | task | max rel err | worst array "
      "| result |")
    p("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for impl, name, n, task, r in verification:
        p(f"| {name} | {r['T_checked']} | {impl} | {'-' if n is None else n} | {task} "
          f"| {r['max_rel_err']:.1e} "
          f"| {r['worst']} | {'ok' if r['ok'] else '**FAILED: not timed**'} |")

    p("\n## Timings (median ms [p25-p75]; speedup = reference / cylstm; "
      "GFLOP/s at the median, % of the same-thread GEMM peak)\n")
    p("| config | task | threads | cylstm ms | reference ms | speedup | cylstm GFLOP/s "
      "| % peak | reference GFLOP/s | % peak | reps cyl/ref | other load |")
    p("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        cfg = CONFIGS[row["config"]]
        fl = flops(cfg, row["task"])
        c, r = row["stats"].get("cylstm"), row["stats"].get("reference")
        n = row["threads"]

        def gf(s):
            if s is None:
                return "-", "-"
            g = fl / (s["median_ms"] * 1e-3) / 1e9
            return _fmt(g), f"{100 * g / peak[n]:.0f}%"

        def cell(impl):
            s = row["stats"].get(impl)
            if s is not None:
                return _ms(s)
            if impl in row.get("skipped", {}):
                return f"skipped: 1 call {row['skipped'][impl]:.1f} s"
            return "not timed"

        sp = "-"
        if c and r:
            v = r["median_ms"] / c["median_ms"]
            sp = f"**{v:.2f}x**" if v < 1 else f"{v:.2f}x"
        load = row["load"]
        p(f"| {row['config']} | {row['task']} | {n} | {cell('cylstm')} "
          f"| {cell('reference')} | {sp} | {gf(c)[0]} | {gf(c)[1]} | {gf(r)[0]} "
          f"| {gf(r)[1]} | {c['reps'] if c else 0}/{r['reps'] if r else 0} "
          f"| {'-' if load is None else f'{load:.2f}'} |")
    p("\nBold speedup: cylstm slower than the reference. 'other load': cores' worth of CPU "
      "other processes used during the cell (>0.2 means the figures are disturbed). "
      "'not timed': failed verification; 'skipped': one call took longer than "
      f"{mode.max_call:g} s (a busy machine), so it was not timed.")
    if args.dtype == "float32":
        _print_targets(rows, peak)


def _print_targets(rows, peak):
    """The BENCH.md targets that need no peer (float32, 2 threads unless said)."""
    by = {(r["config"], r["task"], r["threads"]): r["stats"] for r in rows}

    def med(cfg, task, n, impl="cylstm"):
        s = by.get((cfg, task, n), {}).get(impl)
        return None if s is None else s["median_ms"]

    lines = []
    for cfg, need in (("tiny", 5), ("small", 5), ("medium", 2), ("large", 2)):
        for task in TASKS:
            c, r = med(cfg, task, 2), med(cfg, task, 2, "reference")
            if c and r:
                v = r / c
                lines.append((f"vs NumPy reference, {cfg} {task}", f">= {need}x",
                              f"{v:.2f}x", v >= need))
    for task, need in (("inference", 0.85), ("training", 0.75)):
        c = med("large", task, 2)
        if c:
            v = flops(CONFIGS["large"], task) / (c * 1e-3) / 1e9 / peak[2]
            lines.append((f"efficiency, large {task}", f">= {need:.0%} of sgemm peak",
                          f"{v:.0%}", v >= need))
    for cfg in ("medium", "large"):
        c1, c2 = med(cfg, "training", 1), med(cfg, "training", 2)
        if c1 and c2:
            v = c1 / c2
            lines.append((f"2 threads vs 1, {cfg} training", ">= 1.8x", f"{v:.2f}x", v >= 1.8))
    c = med("step", "inference", 2)
    if c:
        lines.append(("streaming step (inference, B=1, H=256)", "<= 10 us",
                      f"{c * 1e3:.1f} us", c * 1e3 <= 10))
    if not lines:
        return
    print("\n## BENCH.md targets that need no peer (2 threads)\n")
    print("| target | wanted | measured | |")
    print("| --- | --- | --- | --- |")
    for what, want, got, ok in lines:
        print(f"| {what} | {want} | {got} | {'met' if ok else '**missed**'} |")


def main(argv=None, default_json="-", prog=None):
    """``python -m cylstm bench`` without the subcommand: parse argv and run."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, default_json)
    return run(p.parse_args(argv))
