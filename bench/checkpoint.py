"""Checkpointed BPTT: time and memory of one LSTM training step (zero_grad, forward,
backward) with the full cache and with checkpoint_every, interleaved in one run.

    python bench/checkpoint.py [--threads 2] [--rounds 9] [--reps 3] [--long]

Time: for each shape, each round times the full-cache step and every checkpointed
variant in turn (``--reps`` steps each after one untimed warm step), so the machine's
load falls on all alike; the table gives each variant's median step and its time over
the full cache's (median of the per-round ratios). Memory: the peak that tracemalloc
sees during one step, beyond the caller's x, y, dy and dx, measured in a child process
per variant so that no workspace of another variant is alive. ``--long`` adds the
T = 100,000, B = 8, I = 32, H = 256 step (checkpointed only: the full cache would need
about 9 GiB), memory and time.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

import cylstm
from cylstm import functional as F

SHAPES = {   # name: (T, B, I, H)
    "char model": (100, 32, 64, 256),
    "long, small batch": (2000, 8, 32, 256),
}
VARIANTS = [None, "auto", 4]      # checkpoint_every; k is rounded up to whole time blocks


def _data(T, B, I, H):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((T, B, I), dtype=np.float32),
            np.full((T, B, H), 1e-3, np.float32))


def _step(m, x, dy):
    m.zero_grad()
    y, _ = m(x)
    dx, _ = m.backward(dy)
    return y, dx


def peak_bytes(T, B, I, H, ck):
    """tracemalloc's peak during one training step beyond x, y, dy and dx."""
    import tracemalloc
    x, dy = _data(T, B, I, H)
    m = cylstm.LSTM(I, H, seed=0, checkpoint_every=ck)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    y, dx = _step(m, x, dy)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] - base - y.nbytes - dx.nbytes
    return peak, seconds


def _peak_in_child(shape, ck, threads):
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys, json; sys.path.insert(0, {here!r}); "
            f"import cylstm; cylstm.set_num_threads({threads}); "
            f"from checkpoint import peak_bytes; "
            f"print(json.dumps(peak_bytes(*{tuple(shape)!r}, {ck!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--long", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one round (tests)")
    args = ap.parse_args(argv)
    shapes = {"smoke": (40, 64, 3, 5)} if args.smoke else SHAPES
    if args.smoke:
        args.rounds = args.reps = 1
    cylstm.set_num_threads(args.threads)
    print(f"float32, {args.threads} threads, {args.rounds} rounds x {args.reps} reps, "
          f"interleaved; memory: tracemalloc peak beyond x, y, dy, dx")
    print(f"| shape (T, B, I, H) | checkpoint_every | k | median ms | p25 ms | p75 ms | "
          f"vs full cache | peak MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    pc = time.perf_counter
    for shape_name, (T, B, I, H) in shapes.items():
        x, dy = _data(T, B, I, H)
        models = {ck: cylstm.LSTM(I, H, seed=0, checkpoint_every=ck) for ck in VARIANTS}
        times = {ck: [] for ck in VARIANTS}
        ratios = {ck: [] for ck in VARIANTS}
        for _ in range(args.rounds):
            med = {}
            for ck, m in models.items():
                _step(m, x, dy)
                ts = []
                for _ in range(args.reps):
                    t0 = pc()
                    _step(m, x, dy)
                    ts.append(pc() - t0)
                times[ck] += ts
                med[ck] = statistics.median(ts)
            for ck in VARIANTS:
                ratios[ck].append(med[ck] / med[None])
        for ck in VARIANTS:
            k = F.segment_steps(ck, T, B)
            t = np.asarray(times[ck]) * 1e3
            p25, m50, p75 = np.percentile(t, [25, 50, 75])
            peak, _ = _peak_in_child((T, B, I, H), ck, args.threads)
            print(f"| {shape_name} ({T}, {B}, {I}, {H}) | {ck} | {k or T} | {m50:.1f} | "
                  f"{p25:.1f} | {p75:.1f} | {statistics.median(ratios[ck]):.2f}x | "
                  f"{peak / 2**20:.1f} |", flush=True)
    if args.long:
        T, B, I, H = 100_000, 8, 32, 256
        peak, seconds = _peak_in_child((T, B, I, H), "auto", args.threads)
        full = 4 * T * B * (4 * H + 3 * H + I) + 4 * T * B * 4 * H
        print(f"| long ({T}, {B}, {I}, {H}) | auto | {F.segment_steps('auto', T, B)} | "
              f"{seconds * 1e3:.0f} (one step) | | | full cache would need "
              f"{full / 2**30:.1f} GiB | {peak / 2**20:.1f} |")


if __name__ == "__main__":
    main()
