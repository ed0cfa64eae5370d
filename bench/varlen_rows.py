"""What bounds variable lengths: a time-loop step's cost against the rows it runs.

    python bench/varlen_rows.py                  # medium: T=100, B=32, I=128, H=256
    python bench/varlen_rows.py --shape 100 16 64 128

With lengths uniform in 1..T about half of the row-steps are valid, but a step's product
does not cost in proportion to its rows: the packed kernel (_rgemm.h) streams all of the
step's weights from L2 once per block of up to 8 rows, so one running row costs about a
third of what 8 do. This script measures the time per step of inference on 2 threads,
each running a chunk of m = 1 .. B/2 rows (on the varlen batch's path), then predicts
from that curve the time of the varlen batch that bench/run.py times (each thread's
rows as cylstm.layers._ragged_order deals them, the slower thread setting the pace) as
a share of the full-length time, and measures that share on 2 threads in the same run.
Minimum over repetitions of each cell (a shared machine's noise only adds time), then
the median over rounds.
"""

import argparse
import statistics
import time

import numpy as np

import cylstm
import cylstm.functional as F
import timing     # bench/timing.py
from cylstm.layers import _ragged_order


def best(f, reps):
    """The fastest of reps timed calls, after one untimed (a shared machine's noise only
    adds time)."""
    f()
    ts = []
    timing.timed(f, reps, ts)
    return min(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", nargs=4, type=int, default=(100, 32, 128, 256),
                    metavar=("T", "B", "I", "H"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args(argv)
    T, B, I, H = a.shape
    rng = np.random.default_rng(0)
    lstm = cylstm.LSTM(I, H, seed=0)
    lstm.eval()
    lengths = np.random.default_rng(2).integers(1, T + 1, B)   # as bench/run.py's varlen
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    x2 = np.concatenate([x, x], axis=1)     # 2m rows for m up to (B + 1) // 2
    rows = range(1, (B + 1) // 2 + 1)
    per_step = {m: [] for m in rows}
    ratio = []
    # The varlen batch runs one path for all of its steps, the one its B picks (the
    # input's product inside the step or before the loop); the curve is forced onto it.
    path = F.input_in_step(I, H, H, np.float32, B)
    for _ in range(a.rounds):
        F._FORCE_INPUT_IN_STEP = path
        try:
            for m in rows:                # 2 threads, each a chunk of m rows
                xm = np.ascontiguousarray(x2[:, :2 * m])
                per_step[m].append(best(lambda: lstm(xm), a.reps) / T)
        finally:
            F._FORCE_INPUT_IN_STEP = None
        full = best(lambda: lstm(x), a.reps)
        var = best(lambda: lstm(x, lengths=lengths), a.reps)
        ratio.append(var / full)
    cost = {m: statistics.median(v) for m, v in per_step.items()}
    cost[0] = 0.0

    order = _ragged_order(lengths.astype(np.int32))
    L = lengths[order] if order is not None else lengths
    chunks = [L[:B // 2], L[B // 2:]]     # the kernels' split(B, 2, p) = B * p // 2

    def loop_time(ls):
        return sum(cost[int((ls > s).sum())] for s in range(T))

    full_loop = max(loop_time(np.full(len(c), T)) for c in chunks)
    var_loop = max(loop_time(c) for c in chunks)
    print(f"shape T={T} B={B} I={I} H={H}, float32, input product "
          f"{'inside the step' if path else 'before the loop'}; per step, 2 threads of m rows each:")
    print("| m | us per step | us per row |")
    print("| --- | --- | --- |")
    for m in rows:
        print(f"| {m} | {1e6 * cost[m]:.1f} | {1e6 * cost[m] / m:.2f} |")
    print(f"valid share of the row-steps: {lengths.mean() / T:.1%}")
    print(f"varlen / full predicted from the curve (time loop alone): "
          f"{var_loop / full_loop:.1%}")
    print(f"varlen / full measured, 2 threads, inference: {statistics.median(ratio):.1%} "
          f"(rounds: {', '.join(f'{r:.0%}' for r in ratio)})")


if __name__ == "__main__":
    main()
