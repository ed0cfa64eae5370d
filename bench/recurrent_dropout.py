"""Cost of recurrent dropout and weight dropout: one LSTM training step (zero_grad,
forward, backward) with and without each option, interleaved in one run.

    python bench/recurrent_dropout.py [--size medium] [--threads 2] [--rounds 15] [--reps 5]

Each round times every variant in turn (``--reps`` steps each, after one untimed warm
step per variant per round), so whatever else the machine does falls on all of them
alike; the table shows each variant's median step over all timed steps and its cost
over the plain step (median over rounds of the per-round ratio, which cancels slow
drifts in the machine's load). The variants share weights and inputs; only the
options differ (p = 0.25 each).
"""

import argparse
import statistics
import time

import numpy as np

import cylstm

SIZES = {   # name: (T, B, I, H)
    "small": (100, 16, 64, 128),
    "medium": (100, 32, 128, 256),
}

VARIANTS = {
    "plain": {},
    "recurrent_dropout=0.25": {"recurrent_dropout": 0.25},
    "weight_dropout=0.25": {"weight_dropout": 0.25},
    "both": {"recurrent_dropout": 0.25, "weight_dropout": 0.25},
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="medium")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = ap.parse_args(argv)
    T, B, I, H = SIZES[args.size]
    cylstm.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, B, I)).astype(args.dtype)
    dy = rng.standard_normal((T, B, H)).astype(args.dtype)
    models = {}
    for name, kw in VARIANTS.items():
        m = cylstm.LSTM(I, H, dtype=args.dtype, seed=0, **kw)
        m.train()
        models[name] = m

    def step(m):
        m.zero_grad()
        m(x)
        m.backward(dy)

    times = {name: [] for name in models}
    ratios = {name: [] for name in models}
    pc = time.perf_counter
    for _ in range(args.rounds):
        round_med = {}
        for name, m in models.items():
            step(m)                                  # warm: workspaces, caches
            ts = []
            for _ in range(args.reps):
                t0 = pc()
                step(m)
                ts.append(pc() - t0)
            times[name] += ts
            round_med[name] = statistics.median(ts)
        for name in models:
            ratios[name].append(round_med[name] / round_med["plain"])

    print(f"training step, T={T} B={B} I={I} H={H} {args.dtype}, {args.threads} threads, "
          f"{args.rounds} rounds x {args.reps} reps, interleaved")
    print(f"{'variant':<26} {'median ms':>10} {'p25 ms':>8} {'p75 ms':>8} {'vs plain':>9}")
    for name in models:
        t = np.asarray(times[name]) * 1e3
        p25, med, p75 = np.percentile(t, [25, 50, 75])
        cost = 100 * (statistics.median(ratios[name]) - 1)
        print(f"{name:<26} {med:>10.2f} {p25:>8.2f} {p75:>8.2f} {cost:>+8.1f}%")


if __name__ == "__main__":
    main()
