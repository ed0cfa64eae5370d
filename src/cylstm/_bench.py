"""Benchmark cylstm against its NumPy reference, torch.nn.LSTM and ONNX Runtime:
``python -m cylstm bench [--quick]`` or, from a checkout, ``python bench/run.py``.

It follows the project's measuring rules (BENCH.md, "How"):

1. Cases: BENCH.md's configurations (tiny, small, medium, large, charrnn, step) in
   float32, plus variants of some of them: float64, variable lengths (uniform in 1..T),
   bidirectional, projection (proj_size = H/2). Tasks: inference, and a training step
   (forward + backward of a fixed dy, gradients accumulated, no optimiser). ``step`` is
   streaming inference: cylstm ``lstm.step(x_t, state)``, torch ``nn.LSTMCell``, ONNX
   Runtime a one-step graph, each with the state carried from call to call.
2. Implementations: cylstm (``cylstm.LSTM``), the NumPy reference (``cylstm.reference``
   per layer and direction), and, when installed, torch's default path (oneDNN for
   float32 on x86), torch's native path (oneDNN disabled) and ONNX Runtime's LSTM
   operator (a graph of LSTM nodes built with onnx.helper; inference, float32, no
   projection). A peer that is absent or cannot run a case is skipped with a note;
   torch and onnxruntime are imported only when installed and asked for.
3. Verify before timing: every implementation, on the same weights, against a float64
   run of the reference (the oracle): max |a - b| / max magnitude per array, 1e-4 for
   float32, 1e-9 for float64; cylstm at every thread count, the others at the smallest.
   What fails is not timed, and the exit status is 1. Each
   torch call of the verification is also profiled, to record whether its default path
   really ran oneDNN (``aten::mkldnn_rnn_layer``); where it did not (float64, packed
   inputs, projection), "torch native" would time the same code and is skipped.
4. Time interleaved in one run, at each thread count (cylstm.threads(n), the BLAS pools
   through threadpoolctl, torch.set_num_threads(n), ONNX Runtime's intra_op_num_threads):
   blocks of individually timed reps in the order A B C ... C B A, so drift cancels in
   the ratios. Median, p25-p75, GFLOP/s and its fraction of a same-run sgemm peak.
5. Peak memory of a training step: the first training step of a fresh model, in a fresh
   subprocess per implementation, as the peak RSS during the step (VmHWM, reset through
   /proc/self/clear_refs just before it) minus the RSS before it.
6. Report: a markdown report (stdout and <out>/latest.md), JSON lines
   (<out>/latest.jsonl), a PNG chart of the ratios (<out>/latest.png, needs matplotlib),
   and the BENCH.md targets it can evaluate, each MET or MISSED with the figure.

Dimensions: T steps, B batch, I input, H hidden, L layers, D directions, P projection.
"""

import argparse
import contextlib
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from typing import NamedTuple

import numpy as np

import cylstm
from cylstm import reference as ref
from cylstm._threads import BLAS_THREAD_LOCAL, N_PARTS

__all__ = ["CONFIGS", "VARIANTS", "IMPLS", "Case", "add_arguments", "main", "run"]


# ---- what is measured -----------------------------------------------------------------------

class Config(NamedTuple):
    B: int
    T: int
    I: int
    H: int
    L: int
    what: str
    state: bool = False       # streaming: one step, (h, c) carried from call to call


# BENCH.md's configurations, in its order.
CONFIGS = {
    "tiny": Config(1, 50, 32, 64, 1, "latency: one small sequence"),
    "small": Config(16, 100, 64, 128, 1, "small models, small batches"),
    "medium": Config(32, 100, 128, 256, 1, "the everyday case"),
    "large": Config(64, 100, 512, 512, 1, "compute-bound"),
    "charrnn": Config(32, 128, 96, 512, 2, "character LM training step"),
    "step": Config(1, 1, 256, 256, 1, "one streaming step, state carried in", state=True),
}
# BENCH.md: "the cases no peer handles well".
VARIANTS = {
    "float64": "float64 weights and data",
    "varlen": "lengths uniform in 1..T (torch: pack_padded_sequence)",
    "bidir": "bidirectional",
    "proj": "projection, proj_size = H/2",
}
TASKS = ("inference", "training")
TOLERANCE = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-9}
PARAM_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")


class Case(NamedTuple):
    """One configuration in one variant ("" = float32, fixed lengths, one direction)."""
    config: str
    variant: str = ""

    @property
    def name(self):
        return self.config + (f"/{self.variant}" if self.variant else "")

    @property
    def cfg(self):
        return CONFIGS[self.config]

    @property
    def dtype(self):
        return np.dtype(np.float64 if self.variant == "float64" else np.float32)

    @property
    def D(self):
        return 2 if self.variant == "bidir" else 1

    @property
    def P(self):
        return self.cfg.H // 2 if self.variant == "proj" else 0

    @property
    def tasks(self):
        return ("inference",) if self.cfg.state else TASKS


def flops(case, task, lengths=None):
    """FLOPs of one call: 2*(valid steps)*4H*(I_l + Hp) per layer and direction, plus
    2*(valid steps)*H*P for a projection; a training step counts ~3x the forward."""
    cfg, D, Hp = case.cfg, case.D, case.P or case.cfg.H
    steps = cfg.B * cfg.T if lengths is None else int(np.sum(lengths))
    f = 0
    for layer in range(cfg.L):
        i_l = cfg.I if layer == 0 else D * Hp
        f += D * 2 * steps * (4 * cfg.H * (i_l + Hp) + cfg.H * case.P)
    return 3 * f if task == "training" else f


class _Mode(NamedTuple):
    target: float        # seconds of timed reps per implementation and cell
    warm: float          # seconds of warm-up per implementation and cell (>= 1 call)
    rounds: int          # blocks per implementation (A B C, C B A, ...)
    settle: float        # seconds slept before each block when threads > 1
    gemm_reps: int       # timed GEMM-peak reps, at the start and at the end
    verify_T: int        # configurations above verify_flops are verified on T[:verify_T]
    verify_flops: float  # forward FLOPs above which only the first verify_T steps are
    max_call: float      # s; an implementation whose calls take longer is not timed
    configs: tuple       # configurations run in float32 by default
    variant_configs: tuple   # configurations the variants run on by default
    variants_all_threads: bool   # variants at every thread count, or only the largest
    memory_configs: tuple    # configurations whose training-step memory is measured
    min_reps: int = 3
    max_reps: int = 20000


# --quick (all peers, < 2 min on 2 cores): large and charrnn (seconds per reference
# call) are left out, the variants run on medium at 2 threads only, memory on medium.
QUICK = _Mode(target=0.3, warm=0.05, rounds=2, settle=0.15, gemm_reps=4, verify_T=20,
              verify_flops=0, max_call=1.0, configs=("tiny", "small", "medium", "step"),
              variant_configs=("medium",), variants_all_threads=False,
              memory_configs=("medium",))
FULL = _Mode(target=1.0, warm=0.2, rounds=4, settle=0.15, gemm_reps=10, verify_T=10,
             verify_flops=1e10, max_call=5.0, configs=tuple(CONFIGS), variant_configs=("small", "medium"),
             variants_all_threads=True,
             memory_configs=("tiny", "small", "medium", "large", "charrnn"))
# max_call: the slowest call on an idle 2-core machine is ~1.3 s (charrnn training at 1
# thread). With the other core busy, a 2-thread OpenBLAS call can be 10-30x slower (each
# per-step GEMM waits for a descheduled worker): 15 s for one reference training step
# on large was seen, 12 s on medium/varlen. Such cells are reported as skipped rather than
# timed with < 3 reps: after 5 s (full), or 1 s (--quick: no call above ~0.3 s idle).
# Verifying large and charrnn (~27 GFLOP per forward) over their full T=100/128 costs
# ~5 s per implementation on 2 cores, so they are checked on their first 10 steps: same
# B, I, H, L, same code paths (cylstm packs its weights from 4 steps on). --quick checks
# every case on its first 20 steps (on a busy machine full-T checks took 4 of 10 minutes).
GEMM_SIZE = 2048
SLOW_CALL = 0.05         # s; a call at least this long needs no untimed call per block
BLOCK_BUDGET = 3.0       # a block stops after this many times its planned duration


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
    """The checkout's commit, read from .git (no git process), or None if not a checkout.
    In a worktree .git is a file naming the real git directory."""
    git = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(cylstm.__file__))), ".git")
    try:
        if os.path.isfile(git):
            with open(git) as f:
                git = f.read().split("gitdir:", 1)[1].strip()
        with open(os.path.join(git, "HEAD")) as f:
            head = f.read().strip()
        if not head.startswith("ref:"):
            return head
        name = head[4:].strip()
        common = git
        if os.path.exists(os.path.join(git, "commondir")):
            with open(os.path.join(git, "commondir")) as f:
                common = os.path.normpath(os.path.join(git, f.read().strip()))
        for base in (git, common):
            path = os.path.join(base, *name.split("/"))
            if os.path.exists(path):
                with open(path) as f:
                    return f.read().strip()
        with open(os.path.join(common, "packed-refs")) as f:
            for line in f:
                if line.rstrip().endswith(" " + name):
                    return line.split()[0]
    except (OSError, IndexError):
        pass
    return None


def _version(module):
    """A module's version if it is installed, without importing it when it is not."""
    if importlib.util.find_spec(module) is None:
        return None
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:
        return "installed"


def _header(args, mode):
    import scipy
    import threadpoolctl
    from threadpoolctl import threadpool_info

    model, flags = _cpu_info()
    ext = cylstm._lstm.__file__
    env = {k: os.environ[k] for k in (
        "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY",
        "OMP_PROC_BIND", "GOMP_SPINCOUNT", "OPENBLAS_THREAD_TIMEOUT") if k in os.environ}
    return {
        "type": "header",
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "options": {k: v for k, v in vars(args).items() if k != "run"},
        "mode": mode._asdict(),
        "python": platform.python_version(),
        "versions": {"cylstm": cylstm.__version__, "numpy": np.__version__,
                     "scipy": scipy.__version__, "threadpoolctl": threadpoolctl.__version__,
                     **{m: _version(m) for m in ("torch", "onnx", "onnxruntime",
                                                 "matplotlib")}},
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
        # taken after the peers are imported, so that their pools (torch's OpenMP) show
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


@contextlib.contextmanager
def _threads(n):
    """Every pool at n threads: cylstm's, the BLAS ones threadpoolctl sees (NumPy's runs
    the reference) and, if it is loaded, torch's. ONNX Runtime's is per session."""
    from threadpoolctl import threadpool_limits

    torch = sys.modules.get("torch")
    old = torch.get_num_threads() if torch else None
    with cylstm.threads(n), threadpool_limits(limits=n, user_api="blas"):
        if torch:
            torch.set_num_threads(n)
        try:
            yield
        finally:
            if torch:
                torch.set_num_threads(old)


# ---- statistics -----------------------------------------------------------------------------

def _stats(times):
    t = np.asarray(times) * 1e3
    p25, med, p75 = np.percentile(t, [25, 50, 75])
    return {"reps": len(t), "median_ms": float(med), "p25_ms": float(p25),
            "p75_ms": float(p75), "min_ms": float(t.min()), "max_ms": float(t.max())}


def _timed(fn, k, out, deadline=math.inf):
    """Time k calls of fn one by one into `out`; stop early (after >= 1) at `deadline`."""
    pc = time.perf_counter
    for _ in range(k):
        t0 = pc()
        fn()
        out.append(pc() - t0)
        if t0 > deadline:
            break


def _split(n, parts):
    """n reps over `parts` blocks, as evenly as possible."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


@contextlib.contextmanager
def _no_gc():
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


# ---- GEMM peak ------------------------------------------------------------------------------

def gemm_peak(dtype, n_threads, reps, size=None):
    """Time C = A @ B, (size x size) Fortran-order, through scipy.linalg.blas.?gemm."""
    size = size or GEMM_SIZE
    from scipy.linalg import blas
    from threadpoolctl import threadpool_limits

    gemm = blas.sgemm if dtype == np.float32 else blas.dgemm
    rng = np.random.default_rng(0)
    a = np.asfortranarray(rng.standard_normal((size, size)), dtype=dtype)
    b = np.asfortranarray(rng.standard_normal((size, size)), dtype=dtype)
    c = np.zeros((size, size), dtype=dtype, order="F")
    times = []
    with threadpool_limits(limits=n_threads, user_api="blas"), _no_gc():
        gemm(1.0, a, b, beta=0.0, c=c, overwrite_c=1)         # warm-up
        _timed(lambda: gemm(1.0, a, b, beta=0.0, c=c, overwrite_c=1), reps, times)
    s = _stats(times)
    # the peak is the machine's capacity: the best rep, which on a shared machine is the
    # one least disturbed by other jobs (the median is kept too)
    s["gflops"] = 2.0 * size ** 3 / (s["min_ms"] * 1e-3) / 1e9
    s["gflops_median"] = 2.0 * size ** 3 / (s["median_ms"] * 1e-3) / 1e9
    return s


# ---- the problem and the oracle -------------------------------------------------------------

class Data(NamedTuple):
    x: np.ndarray               # (T, B, I)
    dy: np.ndarray              # (T, B, D*Hp) the training step's output gradient
    state: object               # (h0 (L*D, B, Hp), c0 (L*D, B, H)) or None (zeros)
    lengths: object             # (B,) int in 1..T, or None (every sequence has T steps)

    def first(self, T):
        """The first T steps (lengths clipped to T)."""
        lengths = None if self.lengths is None else np.minimum(self.lengths, T)
        return Data(self.x[:T], self.dy[:T], self.state, lengths)


class Problem(NamedTuple):
    lstm: object                # cylstm.LSTM with PyTorch's init
    params: dict                # copies of its parameters, by torch's names
    data: Data


def _problem(case, seed=0):
    """cylstm.LSTM for the case, copies of its weights for the peers, and the data."""
    cfg = case.cfg
    lstm = cylstm.LSTM(cfg.I, cfg.H, num_layers=cfg.L, bidirectional=case.D == 2,
                       proj_size=case.P, dtype=case.dtype, seed=seed)
    rng = np.random.default_rng(seed + 1)
    dt, Hp = case.dtype, case.P or cfg.H
    x = rng.standard_normal((cfg.T, cfg.B, cfg.I)).astype(dt)
    dy = rng.standard_normal((cfg.T, cfg.B, case.D * Hp)).astype(dt)
    state = None
    if cfg.state:
        state = tuple(0.5 * rng.standard_normal((cfg.L * case.D, cfg.B, size)).astype(dt)
                      for size in (Hp, cfg.H))
    return Problem(lstm, lstm.state_dict(), Data(x, dy, state, _lengths(case, seed)))


def _lengths(case, seed=0):
    """(B,) lengths uniform in 1..T for the varlen variant (their own stream), else None."""
    if case.variant != "varlen":
        return None
    return np.random.default_rng(seed + 2).integers(1, case.cfg.T + 1, case.cfg.B)


class _Reference:
    """The NumPy reference as a model: cylstm.reference's layer functions per layer and
    direction, on copies of the weights (torch's names), in `dtype`."""

    def __init__(self, params, L, D, dtype):
        self.L, self.D = L, D
        self.params = {k: v.astype(dtype) for k, v in params.items()}
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}

    def zero_grad(self):
        for g in self.grads.values():
            g[...] = 0

    def _of(self, store, layer, d):
        sfx = f"_l{layer}" + ("_reverse" if d else "")
        return [store.get(n + sfx) for n in PARAM_NAMES]

    def forward(self, x, state=None, lengths=None, training=False):
        """x (T, B, I) -> y (T, B, D*Hp), (h_n, c_n) each (L*D, B, .), caches."""
        caches, hs, cs = [], [], []
        inp = x
        for layer in range(self.L):
            outs = []
            for d in range(self.D):
                k = layer * self.D + d
                w_ih, w_hh, b_ih, b_hh, w_hr = self._of(self.params, layer, d)
                h0, c0 = (None, None) if state is None else (state[0][k], state[1][k])
                y, h, c, cache = ref.lstm_layer_forward(
                    inp, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths=lengths, reverse=bool(d),
                    training=training, w_hr=w_hr)
                outs.append(y)
                caches.append(cache)
                hs.append(h)
                cs.append(c)
            inp = outs[0] if self.D == 1 else np.concatenate(outs, axis=2)
        return inp, (np.stack(hs), np.stack(cs)), caches

    def backward(self, caches, dy):
        """dy (T, B, D*Hp) -> dx (T, B, I), (dh0, dc0); += into self.grads."""
        dh0, dc0 = [None] * len(caches), [None] * len(caches)
        for layer in reversed(range(self.L)):
            Hp = dy.shape[2] // self.D
            dx = 0
            for d in range(self.D):
                k = layer * self.D + d
                dw_ih, dw_hh, db_ih, db_hh, dw_hr = self._of(self.grads, layer, d)
                dxd, dh0[k], dc0[k] = ref.lstm_layer_backward(
                    caches[k], np.ascontiguousarray(dy[:, :, d * Hp:(d + 1) * Hp]),
                    dw_ih=dw_ih, dw_hh=dw_hh, db_ih=db_ih, db_hh=db_hh, dw_hr=dw_hr)
                dx = dx + dxd
            dy = dx
        return dy, (np.stack(dh0), np.stack(dc0))


def _outputs(y, h, c, dx=None, dh0=None, dc0=None, grads=None):
    """The dict verification compares; grads by torch's parameter names."""
    out = {"y": y, "h_n": h, "c_n": c}
    for k, v in (("dx", dx), ("dh0", dh0), ("dc0", dc0)):
        if v is not None:
            out[k] = v
    out.update({"d" + k: g for k, g in (grads or {}).items()})
    return out


def _oracle(case, params, data):
    """Everything verification compares, from the reference in float64."""
    f64 = lambda a: None if a is None else a.astype(np.float64)      # noqa: E731
    m = _Reference(params, case.cfg.L, case.D, np.float64)
    st = None if data.state is None else tuple(map(f64, data.state))
    y, (h, c), caches = m.forward(f64(data.x), st, data.lengths, training=True)
    dx, (dh0, dc0) = m.backward(caches, f64(data.dy))
    return _outputs(y, h, c, dx, dh0, dc0, m.grads)


def _rel_err(a, b):
    """max |a - b| relative to the largest magnitude of either (tests' definition)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return math.inf
    scale = max(np.abs(a).max(), np.abs(b).max())
    return 0.0 if scale == 0 else float(np.abs(a - b).max() / scale)


def _compare(got, want, tol):
    """Every array an implementation returned against the oracle's."""
    errs = {k: _rel_err(got[k], want[k]) for k in got}
    worst = max(errs, key=errs.get)
    return {"max_rel_err": errs[worst], "worst": worst, "ok": errs[worst] <= tol,
            "errors": errs}


# ---- the implementations --------------------------------------------------------------------
#
# Each is built once per case and gives, per task and thread count, a zero-argument
# callable that makes one call (carrying the streaming state); the same callable's result
# turns into the dict verification compares (`outputs`), so what is timed is what is
# verified.

class _Impl:
    name = label = ""
    needs = None              # module that must be installed
    training = True           # can it run a training step?
    verified_by = None        # another implementation whose verification covers this one

    def __init__(self, case, prob):
        self.case, self.prob = case, prob

    @classmethod
    def unsupported(cls, case):
        """Why this implementation cannot run `case`, or None."""
        if cls.needs and importlib.util.find_spec(cls.needs) is None:
            return f"{cls.needs} is not installed"
        return None

    def call(self, task, n, data):
        raise NotImplementedError

    def outputs(self, task, result):
        raise NotImplementedError


class _Cylstm(_Impl):
    name, label = "cylstm", "cylstm"

    def call(self, task, n, data):
        lstm = self.prob.lstm
        if task == "training":
            lstm.train()
            lstm.zero_grad()

            def step():
                y, st = lstm(data.x, data.state, data.lengths)
                return y, st, lstm.backward(data.dy)
            return step
        lstm.eval()
        if self.case.cfg.state:                       # streaming: the step API
            state = lstm.initial_state(data.x.shape[1], data.state)
            x_t = data.x[0]
            return lambda: (lstm.step(x_t, state)[None], (state.h, state.c))
        return lambda: lstm(data.x, data.state, data.lengths)

    def outputs(self, task, res):
        if task == "inference":
            return _outputs(res[0], *res[1])
        y, (h, c), (dx, (dh0, dc0)) = res
        return _outputs(y, h, c, dx, dh0, dc0, self.prob.lstm.grads)


class _CylstmFull(_Cylstm):
    """cylstm on a varlen case's data at full length (lengths=None), timed in the same
    cell as cylstm, interleaved, for the "variable lengths cost" target. It runs the code
    the base case verifies; it is not a column of the report."""
    name, label = "cylstm-full", "cylstm, full length"
    verified_by = "cylstm"

    def call(self, task, n, data):
        return super().call(task, n, data._replace(lengths=None))


class _NumpyRef(_Impl):
    name, label = "reference", "NumPy ref"

    def __init__(self, case, prob):
        super().__init__(case, prob)
        self.model = _Reference(prob.params, case.cfg.L, case.D, case.dtype)

    def call(self, task, n, data):
        m = self.model
        if task == "training":
            m.zero_grad()

            def step():
                y, st, caches = m.forward(data.x, data.state, data.lengths, training=True)
                return y, st, m.backward(caches, data.dy)
            return step
        box = [data.state]

        def infer():
            y, st, _ = m.forward(data.x, box[0], data.lengths, training=False)
            if self.case.cfg.state:
                box[0] = st
            return y, st
        return infer

    def outputs(self, task, res):
        if task == "inference":
            return _outputs(res[0], *res[1])
        y, (h, c), (dx, (dh0, dc0)) = res
        return _outputs(y, h, c, dx, dh0, dc0, self.model.grads)


class _OneDnnOff:
    """torch's native path: oneDNN disabled around a call. Through the flag's C setter,
    which costs well under a microsecond, where torch.backends.mkldnn.flags() also resets
    TF32 settings and warns."""

    def __init__(self, torch):
        self._c = torch._C

    def __enter__(self):
        self._was = self._c._get_mkldnn_enabled()
        self._c._set_mkldnn_enabled(False)

    def __exit__(self, *exc):
        self._c._set_mkldnn_enabled(self._was)


class _Torch(_Impl):
    """torch.nn.LSTM (packed when lengths are given), or nn.LSTMCell for a streaming step.
    Inference under inference_mode; a training step is forward, backward of sum(y*dy)
    with x.requires_grad (cylstm computes dx too), gradients accumulated, no optimiser."""
    name, label = "torch", "torch"
    needs = "torch"
    native = False

    def __init__(self, case, prob):
        super().__init__(case, prob)
        import torch

        # torch says so once per process; the profiler check records the path anyway
        warnings.filterwarnings("ignore", message="LSTM with projections is not supported")
        self.torch = torch
        cfg = case.cfg
        dt = torch.float64 if case.dtype == np.float64 else torch.float32
        sd = {k: torch.from_numpy(v.copy()) for k, v in prob.params.items()}
        if cfg.state:
            self.model = torch.nn.LSTMCell(cfg.I, cfg.H, dtype=dt)
            sd = {k[:-3]: v for k, v in sd.items()}          # weight_ih_l0 -> weight_ih
        else:
            self.model = torch.nn.LSTM(cfg.I, cfg.H, num_layers=cfg.L, dtype=dt,
                                       bidirectional=case.D == 2, proj_size=case.P)
        self.model.load_state_dict(sd)
        self.path = _OneDnnOff(torch) if self.native else contextlib.nullcontext()
        self.uses_onednn = {}          # task -> bool, from the profiler (verification)

    def _forward(self, x, state, lengths):
        if lengths is None:
            return self.model(x, state)
        pack = self.torch.nn.utils.rnn
        y, st = self.model(pack.pack_padded_sequence(x, lengths, enforce_sorted=False), state)
        return pack.pad_packed_sequence(y, total_length=x.shape[0])[0], st

    def call(self, task, n, data):
        torch, path = self.torch, self.path
        x = torch.from_numpy(data.x)
        lengths = None if data.lengths is None else torch.from_numpy(data.lengths)
        if task == "training":
            x = x.clone().requires_grad_(True)
            dy = torch.from_numpy(data.dy)
            self.model.zero_grad()

            def step():
                x.grad = None
                with path:
                    y, st = self._forward(x, None, lengths)
                    (y * dy).sum().backward()
                return y, st, x
            return step
        if self.case.cfg.state:                       # LSTMCell: (B, I), (h, c) (B, H)
            box = [tuple(torch.from_numpy(s[0].copy()) for s in data.state)]
            x_t = x[0]

            def cell():
                with torch.inference_mode():
                    box[0] = h, c = self.model(x_t, box[0])
                return h[None], (h[None], c[None])
            return cell

        def infer():
            with torch.inference_mode(), path:
                return self._forward(x, None, lengths)
        return infer

    def outputs(self, task, res):
        np_ = lambda t: t.detach().numpy()          # noqa: E731
        y, (h, c) = res[0], res[1]
        if task == "inference":
            return _outputs(np_(y), np_(h), np_(c))
        grads = {k: np_(p.grad) for k, p in self.model.named_parameters()}
        return _outputs(np_(y), np_(h), np_(c), dx=np_(res[2].grad), grads=grads)


class _TorchNative(_Torch):
    name, label = "torch-native", "torch native"
    native = True

    @classmethod
    def unsupported(cls, case):
        if case.cfg.state:
            return "nn.LSTMCell has one path (no oneDNN), timed as torch"
        return super().unsupported(case)


def _onnx_gates(w, H):
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
        w = {k: np.stack([_onnx_gates(params[k + s], H) for s in sfx])
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


class _Ort(_Impl):
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
        return _outputs(res[0], *res[1])


IMPLS = {c.name: c for c in (_Cylstm, _CylstmFull, _NumpyRef, _Torch, _TorchNative, _Ort)}
PEERS = ("reference", "torch", "torch-native", "onnxruntime")


# ---- verification ---------------------------------------------------------------------------

def _profile_onednn(torch, fn):
    """Run fn once under torch's profiler: did a oneDNN RNN kernel run?"""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return any("mkldnn_rnn" in e.key for e in prof.key_averages())


def _verify_case(case, impls, data, thread_counts, tasks, tol):
    """Every implementation and task against the float64 oracle, on `data`.
    cylstm at every thread count (its kernels split work by thread count), the others
    (and the oracle) at the smallest: their threading only reorders sums, and on a busy
    machine a multithreaded OpenBLAS call can take 10-30x longer.
    Returns [(impl, threads, task, result)]."""
    with _threads(min(thread_counts)):
        want = _oracle(case, impls["cylstm"].prob.params, data)
    out = []
    for name, impl in impls.items():
        if impl.verified_by:
            continue
        counts = thread_counts if name == "cylstm" else [min(thread_counts)]
        for n in counts:
            for task in case.tasks:
                if task not in tasks or (task == "training" and not impl.training):
                    continue
                with _threads(n):
                    fn = impl.call(task, n, data)
                    if isinstance(impl, _Torch) and not case.cfg.state:
                        impl.uses_onednn[task] = _profile_onednn(impl.torch, fn)
                        fn = impl.call(task, n, data)        # fresh gradients
                    got = impl.outputs(task, fn())
                out.append((name, n, task, _compare(got, want, tol)))
    return out


# ---- timing ---------------------------------------------------------------------------------

def _warm(fn, seconds):
    """Call fn until `seconds` have passed (at least once); estimate one call's time."""
    times = []
    t_end = time.perf_counter() + seconds
    while True:
        _timed(fn, 1, times)
        if time.perf_counter() >= t_end or len(times) >= 1000:
            break
    return float(np.median(times[1:])) if len(times) > 1 else times[0]


def _measure(fns, n_threads, mode):
    """Interleaved blocks of individually timed reps of every callable in `fns`.

    Between blocks at more than one thread the run sleeps `settle` seconds: an idle
    OpenBLAS keeps its workers spinning for about 2**28 cycles after a call (~0.13 s at
    2.1 GHz); on this 2-core machine that made a cylstm call right after a reference call
    take 40-60 ms instead of 21 ms (medium inference, 2 threads). ONNX Runtime's and
    torch's OpenMP workers spin too. A block whose calls take < SLOW_CALL starts with one
    untimed call (warm caches after the other implementation). A block stops after
    BLOCK_BUDGET times its planned duration: on a busy machine a 2-thread call estimated at
    0.1 ms during warm-up went on to take ~1 s per call (a descheduled OpenMP worker at
    each of T barriers), and its 3000 planned reps took 45 s. An implementation one of
    whose timed calls took longer than max_call gets no further blocks (a 51 s cell of
    --quick was 2-thread torch and NumPy calls of 1-4 s each under load).

    Returns ({impl: [seconds, ...]}, rounds, {skipped impl: its warm-up call time})."""
    settle = mode.settle if n_threads > 1 else 0.0
    est, skipped = {}, {}
    for impl, fn in fns.items():
        time.sleep(settle)
        est[impl] = _warm(fn, mode.warm)
        if est[impl] > mode.max_call:
            skipped[impl] = est[impl]
    impls = tuple(i for i in fns if i not in skipped)
    reps = {i: int(min(mode.max_reps, max(mode.min_reps, math.ceil(mode.target / est[i]))))
            for i in impls}
    rounds = max(1, min([mode.rounds] + list(reps.values())))
    plan = {i: _split(reps[i], rounds) for i in impls}
    times = {i: [] for i in impls}
    with _no_gc():
        for r in range(rounds):
            for impl in (impls if r % 2 == 0 else impls[::-1]):   # ABC CBA: drift cancels
                if max(times[impl], default=0.0) > mode.max_call:
                    continue            # one call blew the limit: keep its reps, add none
                time.sleep(settle)
                if est[impl] < SLOW_CALL:
                    fns[impl]()                                   # warm caches, untimed
                budget = BLOCK_BUDGET * plan[impl][r] * est[impl]
                _timed(fns[impl], plan[impl][r], times[impl], time.perf_counter() + budget)
    return times, rounds, skipped


# ---- peak memory of a training step ---------------------------------------------------------

def _proc_status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _memory_child(impl_name, config, variant, n):
    """In a fresh process: RSS growth during the first training step of a fresh model.
    Prints one JSON object. Linux only (/proc/self/clear_refs and status)."""
    case = Case(config, variant)
    prob = _problem(case)
    impl = IMPLS[impl_name](case, prob)
    with _threads(n):
        fn = impl.call("training", n, prob.data)
        gc.collect()
        rss0 = _proc_status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                          # reset the high-water mark to the RSS
        fn()
        hwm = _proc_status_kib("VmHWM")
    print(json.dumps({"rss_before_kib": rss0, "peak_kib": hwm,
                      "step_peak_bytes": (hwm - rss0) * 1024}))


def measure_memory(impl_name, case, n, timeout=300):
    """Peak RSS growth (bytes) of the first training step, or a string saying why not."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(cylstm.__file__)))
    code = (f"import sys; sys.path.insert(0, {repo!r}); from cylstm import _bench; "
            f"_bench._memory_child({impl_name!r}, {case.config!r}, {case.variant!r}, {n})")
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout} s"
    if p.returncode != 0:
        return "failed: " + (p.stderr.strip().splitlines() or ["?"])[-1]
    return json.loads(p.stdout.strip().splitlines()[-1])["step_peak_bytes"]


# ---- output ---------------------------------------------------------------------------------

class _Sink:
    """JSON lines to a file (written as they come); kept for printing with --json -."""

    def __init__(self, path):
        self.lines = []
        self._f = None
        if path:
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
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
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


def _ratio(v):
    """A ratio peer/cylstm, bold when cylstm is the slower one."""
    return "-" if v is None else (f"**{v:.2f}x**" if v < 1 else f"{v:.2f}x")


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def _table(head, rows):
    """Markdown table lines."""
    return ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)] + \
        ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


# ---- the run --------------------------------------------------------------------------------

def add_arguments(p, default_json="-", default_out=os.path.join("bench", "results")):
    """The options. default_json: where JSON lines go unless --json says ('' or '-':
    <out>/latest.jsonl, and '-' also prints them after the report)."""
    p.add_argument("--quick", action="store_true",
                   help="~0.3 s of timed reps per implementation and cell instead of ~1 s, "
                        f"configurations {','.join(QUICK.configs)} and the variants on "
                        f"{','.join(QUICK.variant_configs)} at the largest thread count "
                        "(< 2 minutes on 2 cores)")
    p.add_argument("--configs", default=None,
                   help=f"comma-separated subset of {','.join(CONFIGS)} run in float32 "
                        "(default: all; --quick: " + ",".join(QUICK.configs) + ")")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)}, or 'none' "
                        "(default: all)")
    p.add_argument("--variant-configs", default=None,
                   help="configurations the variants run on (default: "
                        f"{','.join(FULL.variant_configs)}; --quick: "
                        f"{','.join(QUICK.variant_configs)})")
    p.add_argument("--threads", default="1,2",
                   help="comma-separated thread counts (default: 1,2)")
    p.add_argument("--tasks", default=",".join(TASKS),
                   help="comma-separated subset of inference,training (default: both)")
    p.add_argument("--peers", default=",".join(PEERS),
                   help=f"comma-separated subset of {','.join(PEERS)}, or 'none' "
                        "(default: all; absent ones are skipped with a note)")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the peak-memory measurement (subprocesses)")
    p.add_argument("--no-chart", dest="chart", action="store_false", help="no PNG chart")
    p.add_argument("--out", default=default_out, metavar="DIR",
                   help="directory for latest.md, latest.jsonl, latest.png "
                        f"(default: {default_out}); '' writes no files")
    p.add_argument("--json", default=default_json, metavar="PATH",
                   help="JSON lines to PATH instead of <out>/latest.jsonl; '-' also prints "
                        "them to stdout after the report")
    return p


def _parse_list(text, allowed, what, empty_ok=False):
    if empty_ok and text.strip() == "none":
        return []
    items = list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
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


def _cases(args, mode):
    """Cases in run order: the float32 configurations, then each variant per config."""
    configs = _parse_list(args.configs or ",".join(mode.configs), list(CONFIGS), "configs")
    variants = _parse_list(args.variants, list(VARIANTS), "variants", empty_ok=True)
    vconfigs = _parse_list(args.variant_configs or ",".join(mode.variant_configs),
                           [k for k, c in CONFIGS.items() if not c.state], "variant-configs")
    return [Case(c) for c in configs] + [Case(c, v) for c in vconfigs for v in variants]


def _build_impls(case, prob, peers, sink):
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
        impls["cylstm-full"] = _CylstmFull(case, prob)
    return impls, skipped


def _time_cell(case, task, n, impls, data, mode, sink, peak, verified):
    """Time every verified implementation of one (case, task, threads) cell."""
    names = [k for k, impl in impls.items() if (task == "inference" or impl.training)
             and verified.get((impl.verified_by or k, task), False)]
    skipped = {k: "failed verification" for k, impl in impls.items()
               if k not in names and (task == "inference" or impl.training)}
    torch_impl = impls.get("torch")
    if "torch-native" in names and torch_impl and not torch_impl.uses_onednn.get(task, True):
        names.remove("torch-native")        # the default path is already the native one
        skipped["torch-native"] = "same code as torch here (the profiler saw no oneDNN)"
    meter, t0 = _LoadMeter(), time.perf_counter()
    with _threads(n):
        fns = {k: impls[k].call(task, n, data) for k in names}
        times, rounds, slow = _measure(fns, n, mode)
    load = meter.cores()
    skipped.update({k: f"one call took {t:.1f} s > {mode.max_call:g} s" for k, t in slow.items()})
    stats = {k: _stats(v) for k, v in times.items()}
    fl = flops(case, task, data.lengths)
    cyl = stats.get("cylstm")
    for k, s in stats.items():
        gf = fl / (s["median_ms"] * 1e-3) / 1e9
        rec = {"type": "timing", "case": case.name, "config": case.config,
               "variant": case.variant, "task": task, "impl": k, "threads": n,
               "dtype": str(case.dtype), **s, "flops": fl, "gflops": gf,
               "gemm_peak_gflops": peak[n], "fraction_of_peak": gf / peak[n],
               "rounds": rounds, "foreign_load_cores": load}
        if cyl and k != "cylstm":
            rec["ratio_peer_over_cylstm"] = s["median_ms"] / cyl["median_ms"]
        sink.write(rec)
    for k, why in skipped.items():
        sink.write({"type": "timing", "case": case.name, "task": task, "impl": k,
                    "threads": n, "skipped": why})
    row = {"case": case.name, "task": task, "threads": n, "stats": stats, "load": load,
           "skipped": skipped, "flops": fl}
    _log(f"[{case.name} {task} {n}t] " + ", ".join(
        f"{k} {_fmt(s['median_ms'])} ms" for k, s in stats.items())
        + ("" if load is None else f" (other load {load:.2f} cores)")
        + f" [{time.perf_counter() - t0:.1f} s]")
    return row


def run(args):
    """Run the benchmark described by parsed ``args``; returns the exit status."""
    mode = QUICK if args.quick else FULL
    cases = _cases(args, mode)
    args.tasks = _parse_list(args.tasks, TASKS, "tasks")
    args.threads = _parse_threads(args.threads)
    peers = _parse_list(args.peers, list(PEERS), "peers", empty_ok=True)
    out = args.out or ""
    files = {k: os.path.join(out, "latest." + k) for k in ("md", "jsonl", "png")} if out else {}
    json_path = args.json if args.json not in ("", "-") else files.get("jsonl")
    t_start = time.perf_counter()

    for m in ("torch", "onnxruntime"):             # import the peers before the header
        if any(IMPLS[p].needs == m for p in peers) and importlib.util.find_spec(m):
            __import__(m)
    sink = _Sink(json_path)
    header = _header(args, mode)
    sink.write(header)
    _log(f"cylstm bench ({'quick' if args.quick else 'full'}): {len(cases)} cases, "
         f"threads {args.threads}, peers {peers or 'none'}; CPU {header['cpu_model']}, "
         f"{header['usable_cores']} usable cores")

    peak = _gemm_peaks(args.threads, mode, sink, "start")
    verification, rows, skipped_impls, torch_paths, failed = [], [], {}, {}, False
    for case in cases:
        prob = _problem(case)
        impls, skipped_impls[case.name] = _build_impls(case, prob, peers, sink)
        verified = _verify_recorded(case, impls, prob.data, args, mode, sink, verification)
        failed |= not all(verified.values())
        if "torch" in impls and impls["torch"].uses_onednn:
            torch_paths[case.name] = dict(impls["torch"].uses_onednn)
            sink.write({"type": "torch_path", "case": case.name,
                        "default_uses_onednn": torch_paths[case.name]})
        counts = args.threads if (not case.variant or mode.variants_all_threads) \
            else [max(args.threads)]
        for n in counts:
            for task in (t for t in case.tasks if t in args.tasks):
                rows.append(_time_cell(case, task, n, impls, prob.data, mode, sink, peak,
                                       verified))
        del prob, impls

    memory = _memory_table(args, mode, cases, peers, sink) if args.memory else []
    peak_end = _gemm_peaks(args.threads, mode, sink, "end")
    elapsed = time.perf_counter() - t_start
    best = {n: max(peak[n], peak_end[n]) for n in peak}    # the least disturbed figure
    targets = evaluate_targets(rows, best, cases, args.threads)
    for t in targets:
        sink.write({"type": "target", **t})
    sink.write({"type": "end", "elapsed_s": elapsed, "verification_failed": failed})
    sink.close()

    report = _report(args, header, mode, peers, peak, peak_end, best, verification, rows,
                     skipped_impls, torch_paths, memory, targets, elapsed, files)
    _emit(args, report, rows, peers, sink, files, json_path)
    return 1 if failed else 0


def _emit(args, report, rows, peers, sink, files, json_path):
    """The report to stdout and latest.md, the chart, where the JSON lines went."""
    print("\n".join(report))
    if files:
        with open(files["md"], "w") as f:
            f.write("\n".join(report) + "\n")
    if args.chart and files:
        why = chart(rows, [p for p in PEERS if p in peers], files["png"])
        print(f"\nChart: {files['png'] if why is None else 'not drawn: ' + why}")
    if args.json == "-":
        print("\n## JSON lines\n")
        print("\n".join(sink.lines))
    elif json_path:
        print(f"JSON lines: {json_path}")


def _verify_recorded(case, impls, data, args, mode, sink, verification):
    """_verify_case on the case's first Tv steps, recorded in the sink and appended to
    `verification`; returns {(impl, task): all checks passed}."""
    cfg = case.cfg
    Tv = cfg.T if flops(case, "inference") <= mode.verify_flops else min(cfg.T, mode.verify_T)
    t0 = time.perf_counter()
    verified = {}
    for name, n, task, r in _verify_case(case, impls, data.first(Tv), args.threads,
                                         args.tasks, TOLERANCE[case.dtype]):
        verification.append((case.name, Tv, name, n, task, r))
        verified[name, task] = verified.get((name, task), True) and r["ok"]
        sink.write({"type": "verification", "case": case.name, "impl": name, "threads": n,
                    "task": task, "T_checked": Tv, "tolerance": TOLERANCE[case.dtype],
                    "oracle": "reference float64", **r})
    _log(f"[{case.name}] verified in {time.perf_counter() - t0:.1f} s (T={Tv}): "
         + ", ".join(f"{i} {t} {'ok' if v else 'FAILED'}" for (i, t), v in verified.items()))
    return verified


def _gemm_peaks(thread_counts, mode, sink, when):
    """sgemm GFLOP/s per thread count (float32: the efficiency targets are float32)."""
    peak = {}
    for n in thread_counts:
        time.sleep(mode.settle if n > 1 else 0)
        s = gemm_peak(np.float32, n, mode.gemm_reps)
        peak[n] = s["gflops"]
        sink.write({"type": "gemm_peak", "when": when, "gemm": "sgemm", "size": GEMM_SIZE,
                    "threads": n, **s})
        _log(f"sgemm {GEMM_SIZE}^3 peak ({when}), {n} thread(s): {s['gflops']:.0f} GFLOP/s")
    return peak


def _memory_table(args, mode, cases, peers, sink):
    """Training-step memory of each implementation on the memory configurations."""
    n = max(args.threads)
    out = []
    for case in cases:
        if case.variant or case.config not in mode.memory_configs \
                or "training" not in args.tasks:
            continue
        res = {}
        for name in ["cylstm"] + peers:
            impl = IMPLS[name]
            if impl.training and impl.unsupported(case) is None:
                res[name] = measure_memory(name, case, n)
                sink.write({"type": "memory", "case": case.name, "impl": name, "threads": n,
                            "method": "first training step in a fresh process: VmHWM "
                                      "(reset via /proc/self/clear_refs) - VmRSS before",
                            "step_peak_bytes": res[name]})
        _log(f"[{case.name}] training-step memory: " + ", ".join(
            f"{k} {v / 2**20:.1f} MiB" if isinstance(v, int) else f"{k} {v}"
            for k, v in res.items()))
        out.append((case.name, res))
    return out


# ---- targets --------------------------------------------------------------------------------

class _Results:
    """Medians by (case, task, threads, impl), and ratios peer / cylstm."""

    def __init__(self, rows):
        self.rows = {(r["case"], r["task"], r["threads"]): r for r in rows}
        self.read = set()        # cells read since the last take_load()

    def ms(self, case, task, n, impl="cylstm"):
        self.read.add((case, task, n))
        s = self.rows.get((case, task, n), {"stats": {}})["stats"].get(impl)
        return None if s is None else s["median_ms"]

    def ratio(self, case, task, n, peer):
        """peer median / cylstm median (> 1: cylstm faster); peer 'torch' is the faster
        of torch's two paths."""
        paths = ("torch", "torch-native") if peer == "torch" else (peer,)
        times = [t for t in (self.ms(case, task, n, p) for p in paths) if t]
        c = self.ms(case, task, n)
        return min(times) / c if times and c else None

    def take_load(self):
        """The largest other load of the cells read since the last call (None: unknown)."""
        loads = [self.rows[k]["load"] for k in self.read if k in self.rows]
        self.read = set()
        return max((x for x in loads if x is not None), default=None)


def evaluate_targets(rows, peak, cases, thread_counts):
    """BENCH.md's targets that this run's cells can evaluate: [{what, wanted, measured,
    met}], met None when a cell it needs was not measured."""
    res = _Results(rows)
    n = 2 if 2 in thread_counts else max(thread_counts)
    out = []

    def add(what, wanted, value, ok, fmt="{:.2f}x"):
        out.append({"what": what, "wanted": wanted, "threads": n, "load": res.take_load(),
                    "measured": None if value is None else fmt.format(value),
                    "value": value, "met": None if value is None else bool(ok(value))})

    def at_least(what, need, value):
        add(what, f">= {need:g}x", value, lambda v: v >= need)

    for cfg, need in (("tiny", 3), ("small", 1.25), ("medium", 1.25), ("large", 1.1),
                      ("charrnn", 1.25)):
        at_least(f"training vs torch, {cfg}", need, res.ratio(cfg, "training", n, "torch"))
    for cfg in CONFIGS:
        need = 1.2 if cfg == "small" else 1.0
        at_least(f"inference vs ONNX Runtime, {cfg}", need,
                 res.ratio(cfg, "inference", n, "onnxruntime"))
    for cfg, need in (("tiny", 3), ("medium", 1.2), ("large", 1.2), ("charrnn", 1.2)):
        at_least(f"inference vs torch, {cfg}", need, res.ratio(cfg, "inference", n, "torch"))
    step = res.ms("step", "inference", n)
    add("streaming step (B=1, H=256)", "<= 10 us", None if step is None else step * 1e3,
        lambda v: v <= 10, "{:.1f} us")
    for cfg, need in (("tiny", 5), ("small", 5), ("medium", 2), ("large", 2)):
        for task in TASKS:
            at_least(f"vs NumPy reference, {cfg} {task}", need,
                     res.ratio(cfg, task, n, "reference"))
    for task, need in (("inference", 0.85), ("training", 0.75)):
        c = res.ms("large", task, n)
        v = None if c is None or n not in peak else \
            flops(Case("large"), task) / (c * 1e-3) / 1e9 / peak[n]
        add(f"efficiency, large {task}", f">= {need:.0%} of sgemm peak", v,
            lambda v, need=need: v >= need, "{:.0%}")
    for case in (c for c in cases if c.variant == "float64"):
        at_least(f"float64 training vs torch, {case.config}", 2,
                 res.ratio(case.name, "training", n, "torch"))
    for case in (c for c in cases if c.variant == "varlen"):
        _varlen_targets(res, case, n, add, at_least)
    if 1 in thread_counts and 2 in thread_counts:
        for cfg in ("medium", "large"):
            c1, c2 = res.ms(cfg, "training", 1), res.ms(cfg, "training", 2)
            at_least(f"2 threads vs 1, {cfg} training", 1.8, c1 / c2 if c1 and c2 else None)
    for case in (c for c in cases if c.variant in ("bidir", "proj")):
        for task in TASKS:
            at_least(f"{case.variant} {task} vs torch, {case.config}", 1.25,
                     res.ratio(case.name, task, n, "torch"))
    return out


def _varlen_targets(res, case, n, add, at_least):
    """Variable lengths cost at most the valid steps' share of the full-length time, plus
    10% (read as: t_varlen / t_full <= share * 1.1; t_full from the same cell, the same
    data at lengths=None, interleaved), and beat torch's packed path 3x."""
    lengths = _lengths(case)                     # same seed: the lengths that were timed
    share = float(np.sum(lengths)) / (case.cfg.B * case.cfg.T)
    for task in TASKS:
        full, var = res.ms(case.name, task, n, "cylstm-full"), res.ms(case.name, task, n)
        add(f"varlen {task} cost vs full length, {case.config} (valid share {share:.0%})",
            f"<= {share * 1.1:.0%} of full", var / full if var and full else None,
            lambda v: v <= share * 1.1, "{:.0%}")
        at_least(f"varlen {task} vs torch packed, {case.config}", 3,
                 res.ratio(case.name, task, n, "torch"))


# ---- the report -----------------------------------------------------------------------------

def _report(args, header, mode, peers, peak, peak_end, best, verification, rows, skipped_impls,
            torch_paths, memory, targets, elapsed, files):
    """The markdown report, as lines."""
    v = header["versions"]
    lines = [f"# cylstm {v['cylstm']} benchmark{' (quick)' if args.quick else ''}, "
             f"{header['time'][:10]}", ""]
    lines += [f"- command: `{header['command']}`",
              f"- CPU: {header['cpu_model']} ({', '.join(header['cpu_flags'])}), "
              f"{header['usable_cores']} usable cores; OpenMP "
              f"{'on' if header['openmp_enabled'] else 'OFF'}, N_PARTS {header['N_PARTS']}",
              "- versions: Python " + header["python"] + ", " + ", ".join(
                  f"{k} {x or 'absent'}" for k, x in v.items()),
              "- thread pools (threadpoolctl): " + "; ".join(
                  f"{i['internal_api']} {i.get('version') or ''} "
                  f"({os.path.basename(i['filepath'])}, {i['num_threads']} threads)"
                  for i in header["threadpool_info"]),
              f"- sgemm {GEMM_SIZE}^3 peak (scipy BLAS, best rep, start / end): " + "; ".join(
                  f"{n} thread{'s' if n > 1 else ''} {peak[n]:.0f} / {peak_end[n]:.0f} GFLOP/s"
                  for n in peak) + "; % of peak below uses the larger",
              f"- took {elapsed:.0f} s"]
    if any(abs(peak_end[n] - peak[n]) > 0.1 * peak[n] for n in peak):
        lines.append("- WARNING: the sgemm peak moved by more than 10% during the run: "
                     "the machine was busy")
    lines += _notes(peers, skipped_impls, torch_paths)
    lines += _verification_lines(verification, peers)
    lines += _timing_lines(rows, peers, best)
    lines += _memory_lines(memory, peers, max(args.threads))
    lines += _target_lines(targets)
    return lines


def _notes(peers, skipped_impls, torch_paths):
    """Peers that did not run, by reason, and which path torch's default took."""
    why = {}
    for case, skipped in skipped_impls.items():
        for impl, reason in skipped.items():
            why.setdefault((impl, reason), []).append(case)
    lines = ["", "Skipped:" if why else "No implementation was skipped."]
    lines += [f"- {impl} on {', '.join(cases)}: {reason}" for (impl, reason), cases in why.items()]
    missing = [p for p in PEERS if p not in peers]
    if missing:
        lines.append(f"- not asked for (--peers): {', '.join(missing)}")
    if torch_paths:
        on = [c for c, t in torch_paths.items() if all(t.values())]
        off = [c for c, t in torch_paths.items() if not any(t.values())]
        lines.append(f"\ntorch's default path, seen by torch.profiler (aten::mkldnn_rnn_layer):"
                     f" oneDNN on {', '.join(on) or 'none'}; native on {', '.join(off) or 'none'}"
                     " (there 'torch native' is not timed separately).")
    return lines


def _verification_lines(verification, peers):
    """One row per case: each implementation's worst error over tasks and threads."""
    impls = ["cylstm"] + peers
    worst = {}
    for case, Tv, impl, n, task, r in verification:
        w = worst.setdefault((case, Tv), {})
        prev = w.get(impl)            # the first failure, else the largest error
        if prev is None or (prev["ok"] and (not r["ok"] or r["max_rel_err"] > prev["max_rel_err"])):
            w[impl] = dict(r, task=task)

    def cell(r):
        if r is None:
            return "-"
        e = f"{r['max_rel_err']:.1e}"
        return e if r["ok"] else f"**FAILED {r['worst']} {e} ({r['task']})**"
    rows = [[case, Tv] + [cell(w.get(i)) for i in impls] for (case, Tv), w in worst.items()]
    return ["", "## Verification", "",
            "Worst max|a - b| / max magnitude over every output and gradient, tasks and "
            "thread counts, against the float64 NumPy reference on the same weights "
            "(tolerance 1e-4 float32, 1e-9 float64; what fails is not timed).", ""] + \
        _table(["case", "T checked"] + [IMPLS[i].label for i in impls], rows)


def _timing_lines(rows, peers, peak):
    head = ["case", "task", "thr", "cylstm ms [p25-p75]", "GFLOP/s", "% peak"]
    for p in peers:
        head += [f"{IMPLS[p].label} ms", f"x {IMPLS[p].label}"]
    head.append("load")
    body = []
    for r in rows:
        c = r["stats"].get("cylstm")
        gf = None if c is None else r["flops"] / (c["median_ms"] * 1e-3) / 1e9
        line = [r["case"], r["task"], r["threads"], _ms(c) if c else _short(
                    r["skipped"].get("cylstm", "not timed")),
                _fmt(gf), "-" if gf is None else f"{100 * gf / peak[r['threads']]:.0f}%"]
        for p in peers:
            s = r["stats"].get(p)
            line += [_ms(s) if s else _short(r["skipped"].get(p)),
                     _ratio(s["median_ms"] / c["median_ms"]) if s and c else "-"]
        line.append("-" if r["load"] is None else f"{r['load']:.2f}")
        body.append(line)
    over = any(r["stats"].get("cylstm") and r["flops"] / r["stats"]["cylstm"]["median_ms"]
               / 1e6 > peak[r["threads"]] for r in rows)
    return ["", "## Timings", "",
            "Median ms [p25-p75] of individually timed calls, interleaved in one run. "
            "'x peer' = peer median / cylstm median: above 1 cylstm is faster; **bold** "
            "where it is slower. GFLOP/s at cylstm's median (valid steps only), % of the "
            "same-thread sgemm peak. 'load': cores' worth of CPU other processes used "
            "during the cell (above ~0.2 the cell is disturbed). '-': not run (see Skipped); "
            "'= torch path': torch's default path is the native one here; 'not timed': one "
            "warm-up call took longer than the limit (a busy machine).",
            ""] + _table(head, body) + (
        ["", "Some cells exceed 100% of the sgemm peak: the peak was measured while other "
         "jobs loaded the machine more than during those cells."] if over else [])


def _short(why):
    """A table cell for a peer not timed in a cell ('-': not run in this case at all)."""
    if why is None:
        return "-"
    if why.startswith("one call took"):
        return "not timed: " + why[len("one call took "):].split(" >")[0] + "/call"
    if why.startswith("same code as torch"):
        return "= torch path"
    return "**" + why + "**"


def _memory_lines(memory, peers, n):
    if not memory:
        return []
    impls = ["cylstm"] + [p for p in peers if IMPLS[p].training]
    body = []
    for case, res in memory:
        c = res.get("cylstm")
        line = [case]
        for i in impls:
            v = res.get(i)
            if not isinstance(v, int):
                line.append("-" if v is None else v)
                continue
            line.append(f"{v / 2**20:.1f}" + (f" ({v / c:.2f}x)" if isinstance(c, int) and
                                                c > 0 and i != "cylstm" else ""))
        body.append(line)
    return ["", "## Peak memory of a training step (MiB)", "",
            f"First training step of a fresh model, each in a fresh process, {n} threads: "
            "peak RSS during the step (VmHWM, reset through /proc/self/clear_refs) minus "
            "RSS before it; includes workspaces and gradient buffers first touched by the "
            "step (inputs and weights are not counted). In brackets: peer / cylstm.",
            ""] + _table(["case"] + [IMPLS[i].label for i in impls], body)


def _target_lines(targets):
    done = [t for t in targets if t["met"] is not None]
    missing = [t["what"] for t in targets if t["met"] is None]
    met = sum(t["met"] for t in done)
    lines = ["", f"## Targets (BENCH.md; {done[0]['threads'] if done else 2} threads; "
             f"{met} of {len(done)} met)", "",
             "'vs torch' is against the faster of torch's two paths. Ratios > 1: cylstm "
             "faster. 'load': the largest other load of the cells the figure comes from "
             "(above ~0.2 a verdict says little).", ""]
    lines += _table(["target", "wanted", "measured", "result", "load"],
                    [[t["what"], t["wanted"], t["measured"], "MET" if t["met"] else
                      "**MISSED**", "-" if t["load"] is None else f"{t['load']:.2f}"]
                     for t in done])
    if missing:
        lines += ["", "Not measured in this run: " + "; ".join(missing) + "."]
    return lines


def chart(rows, peers, path):
    """Grouped bars of peer time / cylstm time per (case, task), log scale, one panel per
    thread count. Returns None, or why no chart was drawn."""
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib is not installed"
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({r["threads"] for r in rows})
    if not rows or not peers:
        return "nothing to compare"
    per_panel = {n: list(dict.fromkeys((r["case"], r["task"]) for r in rows
                                       if r["threads"] == n)) for n in counts}
    res = _Results(rows)
    most = max(len(c) for c in per_panel.values())
    fig, axes = plt.subplots(len(counts), 1, figsize=(max(8, 0.55 * most + 2),
                                                      4.2 * len(counts)), squeeze=False)
    width = 0.8 / len(peers)
    for ax, n in zip(axes[:, 0], counts):
        cells = per_panel[n]
        for k, p in enumerate(peers):
            xs, ys = [], []
            for j, (case, task) in enumerate(cells):
                s, c = res.ms(case, task, n, p), res.ms(case, task, n)
                if s and c:
                    xs.append(j + (k - (len(peers) - 1) / 2) * width)
                    ys.append(s / c)
            ax.bar(xs, ys, width, label=IMPLS[p].label)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylabel("peer time / cylstm time")
        ax.set_title(f"{n} thread{'s' if n > 1 else ''}: above 1, cylstm is faster")
        ax.set_xticks(range(len(cells)))
        ax.set_xticklabels([f"{c}\n{'train' if t == 'training' else 'infer'}"
                            for c, t in cells], fontsize=7, rotation=60)
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main(argv=None, default_json="-", prog=None, default_out=os.path.join("bench", "results")):
    """``python -m cylstm bench`` without the subcommand: parse argv and run."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, default_json, default_out)
    return run(p.parse_args(argv))
