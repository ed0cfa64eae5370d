"""Inference on one model from several Python threads: the kernels release the GIL.

    python bench/concurrency.py

Times 16 eval-mode calls of one 2-layer float32 LSTM (T=100, B=8, I=64, H=128):
one after another with 1 OpenMP thread, from 2 Python threads with 1 OpenMP thread
each, and one after another with 2 OpenMP threads. The results of the concurrent calls
are checked bitwise against the sequential ones (tests/test_concurrency.py does the same
as a test; this script only adds the time).
"""

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import cylstm


def main():
    model = cylstm.LSTM(64, 128, num_layers=2, seed=0).eval()
    xs = [np.random.default_rng(i).standard_normal((100, 8, 64)).astype(np.float32)
          for i in range(16)]

    def run(x, n):
        with cylstm.threads(n):
            return model(x)[0]

    want = [run(x, 1) for x in xs]
    results = {}
    for workers, n in ((1, 1), (2, 1), (1, 2)):
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            if workers == 1:
                got = [run(x, n) for x in xs]
            else:
                with ThreadPoolExecutor(workers) as ex:
                    got = list(ex.map(lambda x: run(x, n), xs))
            best = min(best, time.perf_counter() - t0)
        assert all(np.array_equal(a, b) for a, b in zip(got, want)), "results differ"
        results[(workers, n)] = best
        print(f"{workers} Python thread(s) x {n} OpenMP thread(s): {best * 1e3:6.1f} ms "
              f"for 16 calls ({results[(1, 1)] / best:.2f}x one thread)")


if __name__ == "__main__":
    main()
