"""A paper model of how one cylstm LSTM layer's time scales with threads, for today's
parallel decomposition and for the designed one (docs/scaling.md explains both and
every assumption below).

    python bench/scaling_model.py                  # calibrate per-core figures here, print
    python bench/scaling_model.py --no-calibrate   # the stated defaults only (no timing)
    python bench/scaling_model.py --check          # also time cylstm here at 1 and 2 threads
    python bench/scaling_model.py --check --check-threads 8,16,64 --check-large   # big machine
    python bench/scaling_model.py --hop-ns 300     # what-if: a slower barrier

The model is a roofline per thread and per phase: a phase takes the longer of its
flops at one core's GEMM rate and its bytes at the bandwidth of the level they come
from (the thread's own L2 when its working set fits, else the shared L3, else DRAM,
each shared by the threads that use it), plus the elementwise gate math, plus the
synchronisation the decomposition needs. It predicts ratios (speed-ups), not
milliseconds to quote; `--check` shows how far it is from a measurement on this
machine. Nothing here is asserted by a test except the model's own invariants
(tests/test_scaling_model.py).
"""

import argparse
import dataclasses
import math
import os
import sys
import time

MiB = 1 << 20
F32 = 4                       # bytes per float32
MIN_UNITS = 16                # fewest hidden units per unit part: one 16-float panel
                              # of the per-step kernel per gate (_rgemm.h, CY_NR)
L2_SHARE = 0.5                # share of its L2 a thread's weight slice may use: the
                              # gates, states and (training) caches stream through it too


@dataclasses.dataclass(frozen=True)
class Machine:
    """Per-core figures (calibrated here when possible) and machine-wide ones (assumed)."""
    cores: int = 64
    flops: float = 150e9          # one core's float32 GEMM FLOP/s (sgemm, 1 thread)
    l2_bytes: int = 2 * MiB       # per core
    bw_l2: float = 120e9          # one core reading its own L2 (B/s)
    bw_l3: float = 28e9           # one core reading the shared L3 (B/s)
    l3_per_core: int = 2 * MiB    # L3 capacity per core of the machine
    bw_dram_core: float = 10e9    # one core reading DRAM (B/s)
    bw_dram: float = 250e9        # the whole socket's DRAM bandwidth (B/s)
    elem_ns: float = 2.0          # forward gate math per (batch row, hidden unit) per step
    hop_s: float = 0.15e-6        # one cache-line hand-off between two cores

    def l3_bytes(self):
        return self.l3_per_core * self.cores

    def barrier(self, n):
        """A tree barrier among n threads: arrive up and release down, log2 n hops each."""
        return 0.0 if n <= 1 else 2 * math.ceil(math.log2(n)) * self.hop_s

    def region(self, n):
        """Waking a team of n for one OpenMP region and joining it: two barriers."""
        return 2 * self.barrier(n)

    def shared_bw(self, total_bytes, active):
        """Per-thread bandwidth of the shared level that holds `total_bytes`, with
        `active` threads reading it at once."""
        if total_bytes <= self.l3_bytes():
            return min(self.bw_l3, self.bw_l3 * self.cores / max(active, 1))
        return min(self.bw_dram_core, self.bw_dram / max(active, 1))


# Where each default comes from, printed with the table (docs/scaling.md, "Assumptions").
SOURCES = {
    "flops": "calibrated: best 1-thread sgemm (scipy) over n = 1024, 2048",
    "l2_bytes": "this machine's L2 per core (sysfs); 2 MiB on current Xeon server cores",
    "bw_l2": "calibrated: 1-thread sgemv (scipy) on a matrix of half the L2",
    "bw_l3": "calibrated: 1-thread sgemv on a matrix of 4x the L2",
    "l3_per_core": "assumed: server parts ship 1.875-4 MiB of L3 per core",
    "bw_dram_core": "assumed: one core's DRAM stream rate (~10 GB/s, limited by its misses in flight)",
    "bw_dram": "assumed: one socket, 8 DDR5-4800 channels (307 GB/s peak), ~80% reachable",
    "elem_ns": "calibrated: 2.5x (sigmoid + tanh) per element of cylstm's float32 rows",
    "hop_s": "calibrated: a 2-thread cylstm region (fork + join) measured here = 4 hops",
}


@dataclasses.dataclass(frozen=True)
class Shape:
    H: int
    B: int
    T: int = 100
    I: int = 0                    # 0: I = H
    training: bool = False

    @property
    def In(self):
        return self.I or self.H

    @property
    def G(self):
        return 4 * self.H


def split(n, parts, p):
    """Start of part p of n items in `parts` near-equal parts (_parallel.pxd's split)."""
    return (n * p) // parts


def sizes(n, parts):
    return [split(n, parts, p + 1) - split(n, parts, p) for p in range(parts)]


def owners(parts, threads):
    """Which parts each thread computes: OpenMP's schedule(static), contiguous ranges."""
    t = min(threads, parts)
    return [list(range(split(parts, t, k), split(parts, t, k + 1))) for k in range(t)]


# ---- the plan: how each phase is cut into parts -----------------------------------------

@dataclasses.dataclass(frozen=True)
class Plan:
    n_b: int                      # batch groups of the time loop
    n_u: int                      # hidden-unit parts per batch group (1: no per-step barrier)
    proj: tuple                   # (row blocks, column blocks) of x W_ih^T
    wgrad: tuple                  # (gate-row blocks, column blocks) of dW_ih, dW_hh
    dx: tuple                     # (row blocks, column blocks) of dz W_ih


def today_plan(s, n_parts):
    """What _lstm.pyx does: batch chunks, GEMM row blocks, all from n_parts."""
    return Plan(min(s.B, n_parts), 1, (n_parts, 1), (n_parts, 1), (n_parts, 1))


def _grid(rows, cols, n_parts, min_cols=MIN_UNITS):
    """(row blocks, column blocks), product <= n_parts, that minimise the bytes one block
    reads (rows/r + cols/c, the two operands of a GEMM); fewer column blocks on a tie."""
    best = None
    for c in range(1, n_parts + 1):
        if n_parts % c or (c > 1 and cols // c < min_cols):
            continue
        r = min(n_parts // c, rows)
        key = (math.ceil(rows / r) + math.ceil(cols / c), c)
        if best is None or key < best[0]:
            best = (key, (r, c))
    return best[1]


def design_plan(s, n_parts, m):
    """The designed decomposition: the (batch groups x unit parts) of the time loop with
    the smallest modelled step time, and 2D grids for the hoisted GEMMs. A function of
    the shapes, n_parts and the machine's fixed constants only, never of the thread
    count (in the kernels the constants would be fixed per process, like n_parts)."""
    proj = _grid(s.T * s.B, s.G, n_parts)
    wgrad = _grid(s.G, s.In + s.H, n_parts)
    dx = _grid(s.T * s.B, s.In, n_parts)
    best = None
    n_u = 1
    while n_u <= n_parts and s.H // n_u >= (MIN_UNITS if n_u > 1 else 1):
        n_b = min(s.B, n_parts // n_u)
        plan = Plan(n_b, n_u, proj, wgrad, dx)
        # n_parts threads: what the plan is for; the choice never sees the real count
        t = sum(_loop(s, plan, m, n_parts, back)[0] for back in
                ((False, True) if s.training else (False,)))
        if best is None or t < best[0] * 0.999:
            best = (t, plan)
        n_u *= 2
    return best[1]


# ---- per-phase models ---------------------------------------------------------------------

def _loop(s, plan, m, n_threads, back=False):
    """The time loop (forward, or BPTT if back): (seconds, per-part flops per step,
    per-part W_hh bytes per step, team). Part (g, u): batch group g, unit part u."""
    rows = sizes(s.B, plan.n_b)
    units = sizes(s.H, plan.n_u)
    parts = [(g, u) for g in range(plan.n_b) for u in range(plan.n_u)]
    w_total = s.G * s.H * F32                    # W_hh (G, Hp), Hp = H
    flops = [2 * rows[g] * 4 * units[u] * s.H for g, u in parts]
    wbytes = [4 * units[u] * s.H * F32 for g, u in parts]
    teams = owners(len(parts), n_threads)
    team = len(teams)
    # bytes per (row, unit, step) streamed from the shared level: gates in (and out in
    # training, as the cache), c and tanh(c) caches, y; backward: gates, c_{t-1},
    # tanh(c), dy in, dz out
    stream = 44 if back or s.training else 20
    stream_total = s.T * s.B * s.H * stream
    elem = m.elem_ns * 1e-9      # BPTT's gate derivatives assumed to cost the same
    worst = 0.0
    for mine in teams:
        slices = {parts[p][1] for p in mine}        # distinct W_hh slices it reads
        working = sum(4 * units[u] * s.H * F32 for u in slices)
        if working <= L2_SHARE * m.l2_bytes:
            bw_w = m.bw_l2
        else:
            bw_w = m.shared_bw(w_total, team)
        t = 0.0
        for p in mine:
            g, u = parts[p]
            t += max(flops[p] / m.flops, wbytes[p] / bw_w)
            t += rows[g] * units[u] * elem
            t += rows[g] * units[u] * stream / m.shared_bw(stream_total, team)
            if plan.n_u > 1:
                # the whole h_{t-1} (forward) or dz (backward) of its batch group, written
                # by the other parts' threads: cache-to-cache at about L3 speed
                t += rows[g] * (s.G if back else s.H) * F32 / m.bw_l3
        worst = max(worst, t)
    step = worst + (m.barrier(team) if plan.n_u > 1 else 0.0)
    return s.T * step + m.region(team), flops, wbytes, team


def _gemm_blocks(M, N, K, grid, m, n_threads):
    """C (M, N) = A (M, K) @ B (K, N) over a (row blocks, column blocks) grid, every
    block one single-threaded GEMM with its whole K (no block adds into another's
    output): (seconds, per-block flops, per-block bytes). Each operand comes from the
    shared level its own size fits in (an operand many blocks read stays in L3 when
    it fits there)."""
    rb, cb = grid
    rs, cs = sizes(M, rb), sizes(N, cb)
    blocks = [(i, j) for i in range(rb) for j in range(cb)]
    flops = [2 * rs[i] * cs[j] * K for i, j in blocks]
    byts = [(rs[i] * K + K * cs[j] + rs[i] * cs[j]) * F32 for i, j in blocks]
    teams = owners(len(blocks), n_threads)
    team = len(teams)
    bw_a = m.shared_bw(M * K * F32, team)
    bw_b = m.shared_bw(K * N * F32, team)
    bw_c = m.shared_bw(M * N * F32, team)

    def block(i, j):
        moved = rs[i] * K * F32 / bw_a + K * cs[j] * F32 / bw_b + rs[i] * cs[j] * F32 / bw_c
        return max(2 * rs[i] * cs[j] * K / m.flops, moved)

    worst = max(sum(block(*blocks[p]) for p in mine) for mine in teams)
    return worst + m.region(team), flops, byts


def predict(s, m, n_threads, n_parts, plan):
    """Modelled seconds of one call (inference: forward; training: forward + backward)
    of one layer, one direction, with its phases and per-part accounting."""
    TB = s.T * s.B
    ph = {}
    ph["input projection"] = _gemm_blocks(TB, s.G, s.In, plan.proj, m, n_threads)
    ph["forward loop"] = _loop(s, plan, m, n_threads)
    if s.training:
        ph["backward loop"] = _loop(s, plan, m, n_threads, back=True)
        # dW_ih, dW_hh = dz^T [x | h_{t-1}]: (G, I + H), K = T*B; db rides along
        ph["weight gradients"] = _gemm_blocks(s.G, s.In + s.H, TB, plan.wgrad, m, n_threads)
        ph["dx"] = _gemm_blocks(TB, s.In, s.G, plan.dx, m, n_threads)
    return sum(v[0] for v in ph.values()), ph


def speedups(s, m, threads=(8, 16, 64)):
    """{(design, n): speed-up} on an n-core machine (n_parts = threads = n) over one
    thread of the same machine running one part (n_parts = 1, as a 1-core process
    would); and that 1-thread time on the largest machine."""
    out = {}
    for n in threads:
        mn = dataclasses.replace(m, cores=n)
        # the baseline runs on the same machine (same L3), one thread, one part
        one = predict(s, mn, 1, 1, today_plan(s, 1))[0]
        for name, plan in (("today", today_plan(s, n)), ("design", design_plan(s, n, mn))):
            out[name, n] = one / predict(s, mn, n, n, plan)[0]
            if name == "design":
                out["plan", n] = plan
    return one, out


# ---- calibration on this machine ------------------------------------------------------

def _best(f, reps, inner=1):
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            f()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def _l2_bytes():
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index2/size") as f:
            text = f.read().strip()
        return int(text[:-1]) * 1024 if text.endswith("K") else int(text)
    except (OSError, ValueError):
        return None


def calibrate(m):
    """Measure the per-core figures here (best of several reps: a busy machine only
    makes a rep slower). Returns the machine and {name: measured value}."""
    import numpy as np
    from scipy.linalg import blas
    from threadpoolctl import threadpool_limits
    got = {}
    l2 = _l2_bytes() or m.l2_bytes
    got["l2_bytes"] = l2
    with threadpool_limits(1):
        f = 0.0
        for n in (1024, 2048):
            a = np.ones((n, n), np.float32, order="F")
            f = max(f, 2 * n ** 3 / _best(lambda: blas.sgemm(1.0, a, a), 10))
        got["flops"] = f
        x = np.ones(1024, np.float32)
        for name, nbytes in (("bw_l2", l2 // 2), ("bw_l3", 4 * l2)):
            w = np.ones((nbytes // (1024 * F32), 1024), np.float32, order="F")
            got[name] = w.nbytes / _best(lambda: blas.sgemv(1.0, w, x), 30, 5)
    try:   # cylstm's own float32 activation rows (a test hook; may not exist)
        from cylstm import _lstm
        z = np.random.default_rng(0).standard_normal(16384).astype(np.float32)
        t = _best(lambda: _lstm._activations_f32(z), 200)
        t0 = _best(lambda: (np.zeros(z.size, np.float32), np.array(z), np.array(z)), 200)
        got["elem_ns"] = 2.5 * max(t - t0, 0.0) / z.size * 1e9
    except Exception:
        pass
    try:   # a 2-thread region around almost no work, minus the same on one thread
        from cylstm import _optim, _threads
        if _threads.N_PARTS >= 2 and _threads.openmp_enabled():
            a = np.ones(64, np.float32)
            with _threads.force_parallel():
                t1 = _best(lambda: _optim.scale(a, 1.0, 2, 1), 3000)
                t2 = _best(lambda: _optim.scale(a, 1.0, 2, 2), 3000)
            if t2 > t1:
                got["hop_s"] = (t2 - t1) / 4
    except Exception:
        pass
    fields = {k: v for k, v in got.items() if k in SOURCES}
    return dataclasses.replace(m, **fields), got


# ---- a check against cylstm on this machine --------------------------------------------

def check(m, shapes, threads):
    """Time cylstm.LSTM here at 1 thread and at each of `threads` beside the model's
    figures for this machine (n_parts = its usable cores, today's decomposition)."""
    import numpy as np
    import cylstm
    from cylstm import _threads
    n_parts = _threads.N_PARTS
    mh = dataclasses.replace(m, cores=n_parts)
    print(f"\n## Model against cylstm here (n_parts = {n_parts}, today's decomposition)\n")
    print("| H | B | task | 1 thr ms: measured | model | "
          + " | ".join(f"x{n}: measured | model" for n in threads) + " |")
    print("| ---: | ---: | --- | ---: | ---: |" + " ---: | ---: |" * len(threads))
    for s in shapes:
        rng = np.random.default_rng(0)
        lstm = cylstm.LSTM(s.In, s.H, batch_first=False)
        x = rng.standard_normal((s.T, s.B, s.In)).astype(np.float32)
        dy = rng.standard_normal((s.T, s.B, s.H)).astype(np.float32)
        if s.training:
            lstm.train()

            def call():
                lstm(x)
                lstm.backward(dy)
        else:
            lstm.eval()

            def call():
                lstm(x)
        times = {}
        for _ in range(2):            # two rounds, best of each: drift hits both alike
            for n in (1, *threads):
                with cylstm.threads(n):
                    call()
                    t = _best(call, 3)
                times[n] = min(times.get(n, t), t)
        plan = today_plan(s, n_parts)
        t1 = predict(s, mh, 1, n_parts, plan)[0]
        cells = [f"{times[1] / times[n]:.2f} | {t1 / predict(s, mh, n, n_parts, plan)[0]:.2f}"
                 for n in threads]
        print(f"| {s.H} | {s.B} | {'training' if s.training else 'inference'} | "
              f"{times[1] * 1e3:.2f} | {t1 * 1e3:.2f} | " + " | ".join(cells) + " |")


# ---- the table ------------------------------------------------------------------------

SHAPES = [Shape(H, B, training=tr) for H in (256, 1024) for B in (1, 8, 64, 256)
          for tr in (False, True)]


def table(m, shapes=SHAPES, threads=(8, 16, 64)):
    lines = [f"| H | B | task | 1 thr ms ({threads[-1]} cores) | " + " | ".join(f"today x{n}" for n in threads)
             + " | " + " | ".join(f"design x{n}" for n in threads)
             + f" | design plan at {threads[-1]} |",
             "| ---: | ---: | --- | ---: | " + " | ".join("---:" for _ in threads) * 1
             + " | " + " | ".join("---:" for _ in threads) + " | --- |"]
    for s in shapes:
        one, sp = speedups(s, m, threads)
        plan = sp["plan", threads[-1]]
        cells = [f"{sp['today', n]:.1f}" for n in threads]
        cells += [f"{sp['design', n]:.1f}" + ("*" if sp["design", n] > n else "")
                  for n in threads]
        lines.append(f"| {s.H} | {s.B} | {'training' if s.training else 'inference'} | "
                     f"{one * 1e3:.2f} | " + " | ".join(cells)
                     + f" | {plan.n_b} x {plan.n_u} |")
    return "\n".join(lines)


def fewer_threads(m, cores=64, threads=(1, 8)):
    """Today's n_parts is the machine's core count: on a `cores`-core machine a call
    limited to fewer threads still cuts the batch into min(B, cores) chunks. Modelled
    seconds with n_parts = cores against n_parts = threads (what a per-call n_parts
    from the team size would give, at the price of results that change with it)."""
    mc = dataclasses.replace(m, cores=cores)
    lines = [f"| H | B | task | threads | n_parts = {cores} ms | n_parts = threads ms |",
             "| ---: | ---: | --- | ---: | ---: | ---: |"]
    for s in (Shape(256, 64), Shape(1024, 64), Shape(1024, 64, training=True)):
        for n in threads:
            a = predict(s, mc, n, cores, today_plan(s, cores))[0]
            b = predict(s, mc, n, n, today_plan(s, n))[0]
            lines.append(f"| {s.H} | {s.B} | {'training' if s.training else 'inference'} "
                         f"| {n} | {a * 1e3:.1f} | {b * 1e3:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-calibrate", action="store_true", help="use the defaults only")
    p.add_argument("--check", action="store_true",
                   help="also time cylstm here beside the model (today's decomposition)")
    p.add_argument("--check-threads", default="2",
                   help="thread counts --check times besides 1 (default: 2; e.g. 8,16,64)")
    p.add_argument("--check-large", action="store_true",
                   help="--check also H = 1024 shapes (seconds per call at 1 thread)")
    p.add_argument("--hop-ns", type=float, help="override the cache-line hand-off (ns)")
    p.add_argument("--l2-mib", type=float, help="override the L2 per core (MiB)")
    args = p.parse_args(argv)
    m, got = Machine(), {}
    if not args.no_calibrate:
        m, got = calibrate(m)
    if args.hop_ns is not None:
        m = dataclasses.replace(m, hop_s=args.hop_ns * 1e-9)
    if args.l2_mib is not None:
        m = dataclasses.replace(m, l2_bytes=int(args.l2_mib * MiB))
    print(f"# cylstm thread-scaling model (float32, T = 100, I = H, one layer)\n")
    print(f"{os.cpu_count()} logical CPUs here; "
          + ("calibrated where marked" if got else "defaults, not calibrated") + "\n")
    print("| parameter | value | source |\n| --- | ---: | --- |")
    units = {"flops": (1e-9, "GFLOP/s"), "bw_l2": (1e-9, "GB/s"), "bw_l3": (1e-9, "GB/s"),
             "bw_dram_core": (1e-9, "GB/s"), "bw_dram": (1e-9, "GB/s"),
             "l2_bytes": (1 / MiB, "MiB"), "l3_per_core": (1 / MiB, "MiB"),
             "elem_ns": (1, "ns"), "hop_s": (1e9, "ns")}
    for f in dataclasses.fields(Machine):
        if f.name == "cores":
            continue
        k, u = units[f.name]
        src = SOURCES[f.name]
        if src.startswith("calibrated") and f.name not in got:
            src = "default (not measured): " + src
        print(f"| {f.name} | {getattr(m, f.name) * k:.3g} {u} | {src} |")
    print("\nSpeed-up at n threads on a machine of n cores (n_parts = n) over one thread "
          "of the same machine running one part (as a 1-core process would). '*': above "
          "n (the per-thread working set moved from L3 into L2). Plan: batch groups x "
          "hidden-unit parts of the time loop.\n")
    print(table(m))
    print("\nToday's decomposition on a 64-core machine with fewer threads than cores "
          "(modelled ms):\n")
    print(fewer_threads(m))
    if args.check:
        shapes = [Shape(256, 8), Shape(256, 64), Shape(256, 64, training=True)]
        if args.check_large:
            shapes += [Shape(1024, 8), Shape(1024, 64, training=True)]
        check(m, shapes, [int(n) for n in args.check_threads.split(",")])


if __name__ == "__main__":
    sys.exit(main())
