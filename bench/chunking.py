"""Forward time loop: per-thread batch chunks (the kernel's design) vs one shared,
multithreaded GEMM per step followed by a prange over the gates.

    python bench/chunking.py            # BENCH.md's single-layer configurations, float32

Interleaved repetitions, median ms; the figures are recorded in src/cylstm/_lstm.pyx.
"""
import time

import numpy as np

import cylstm
from cylstm import _lstm
from cylstm._threads import N_PARTS

CONFIGS = {"tiny": (50, 1, 32, 64), "small": (100, 16, 64, 128),
           "medium": (100, 32, 128, 256), "large": (100, 64, 512, 512)}


def main(reps=15):
    rng = np.random.default_rng(0)
    f = np.float32
    print(f"{'config':8} {'threads':>7} {'chunked ms':>11} {'shared ms':>10} {'shared/chunked':>15}")
    for name, (T, B, I, H) in CONFIGS.items():
        x = rng.standard_normal((T, B, I)).astype(f)
        w_ih = rng.uniform(-0.1, 0.1, (4 * H, I)).astype(f)
        w_hh = rng.uniform(-0.1, 0.1, (4 * H, H)).astype(f)
        bias = np.zeros(4 * H, f)
        lengths = np.full(B, T, np.int32)
        y, gates, hz = np.empty((T, B, H), f), np.empty((T, B, 4 * H), f), np.empty((B, 4 * H), f)
        for nt in (1, 2):
            times = {False: [], True: []}
            outs = {}
            for rep in range(reps + 2):
                for shared in (False, True):
                    h, c = np.zeros((B, H), f), np.zeros((B, H), f)
                    t0 = time.perf_counter()
                    with cylstm._threads.blas_single_threaded:
                        _lstm.lstm_forward(y=y, h=h, c=c, gates=gates, c_cache=None, tc_cache=None,
                                           hz=hz, x=x, w_ih=w_ih, w_hh=w_hh, bias=bias,
                                           lengths=lengths, reverse=False, n_parts=N_PARTS,
                                           n_threads=nt, shared_gemm=shared)
                    if rep >= 2:
                        times[shared].append(time.perf_counter() - t0)
                    outs[shared] = y.copy()
            err = np.max(np.abs(outs[True] - outs[False]))
            a, b = np.median(times[False]) * 1e3, np.median(times[True]) * 1e3
            print(f"{name:8} {nt:7d} {a:11.3f} {b:10.3f} {b / a:15.2f}   (max |diff| {err:.1e})")


if __name__ == "__main__":
    main()
