"""The per-step product alone: time per call against the rows it runs, per ISA level.

    python bench/rgemm_rows.py                     # N = 4H = 1024, K = I + H = 384 (medium)
    python bench/rgemm_rows.py --shape 256 96 --rows 1-8 --dtype float64

Every step of the time loop multiplies the m rows a thread runs, [x_t | h_{t-1}] (m, K),
by the packed step weights (K, N) (src/cylstm/_rgemm.h). The weights are packed once
per call and stream from the core's cache at every step, so a step's cost is not in
proportion to m: one row reads all of the weights for little arithmetic. This script
times that kernel alone on one thread (weights packed once, A and C in cache, as inside
the loop) for m = the --rows, at each ISA level this CPU runs (docs/architecture.md),
and prints us per call, us per row and GFLOP/s. Each cell is the fastest of --rounds
rounds of back-to-back calls (a shared machine's noise only adds time); rounds of the
levels and row counts are interleaved so that drift hits them alike.
bench/varlen_rows.py measures the same curve inside the time loop, where the gate math,
copies and a second thread add to it.
"""

import argparse

import numpy as np

import cylstm
from cylstm import _isa, _lstm


def parse_rows(text):
    """'1-8,12,16' -> [1, ..., 8, 12, 16]."""
    rows = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            rows += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise SystemExit(f"--rows: counts and ranges like 1-8,12,16, got {text!r}") from None
    if not rows or min(rows) < 1:
        raise SystemExit(f"--rows: row counts >= 1, got {text!r}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", nargs=2, type=int, default=(1024, 384), metavar=("N", "K"))
    ap.add_argument("--rows", default="1-20", help="row counts m, e.g. 1-8,12,16")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.02,
                    help="timed calls per cell and round: about this long")
    a = ap.parse_args(argv)
    N, K = a.shape
    if a.rounds < 1 or a.seconds <= 0 or N < 1 or K < 1:
        raise SystemExit("--rounds, --seconds and the --shape must be positive")
    rows = parse_rows(a.rows)
    levels = [lvl for lvl in range(1, _isa.cpu_level() + 1)]
    if not levels:
        raise SystemExit("this CPU has no packed kernel (ISA level 0): BLAS runs the step")
    dtype = np.dtype(a.dtype)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((N, K)).astype(dtype)      # (N, K): PyTorch's layout, trans
    x = rng.standard_normal((max(rows), K)).astype(dtype)
    best = {}
    with cylstm.threads(1):
        for _ in range(a.rounds):
            for lvl in levels:
                with _isa.use_level(lvl):
                    for m in rows:
                        am = x[:m]
                        once = _lstm._packed_product(am, w, True, 1)[1]
                        reps = max(1, int(a.seconds / max(once, 1e-7)))
                        t = _lstm._packed_product(am, w, True, reps)[1]
                        best[lvl, m] = min(best.get((lvl, m), np.inf), t)
    print(f"packed per-step product, {a.dtype}, N={N} K={K}, 1 thread, fastest of "
          f"{a.rounds} rounds:")
    for lvl in levels:
        print(f"\n{_isa.NAMES[lvl]} (level {lvl}):\n")
        print("| m | us per call | us per row | GFLOP/s |")
        print("| --- | --- | --- | --- |")
        for m in rows:
            t = best[lvl, m]
            print(f"| {m} | {t * 1e6:.4g} | {t * 1e6 / m:.4g} | {2 * m * N * K / t / 1e9:.4g} |")


if __name__ == "__main__":
    main()
