"""Data-parallel training on one machine: 1 process x T threads against N MPI ranks x
1 thread, in the same run (so both see the same machine load).

    python bench/scaling.py                  # needs the mpi extra: pip install "cylstm[mpi]"
    python bench/scaling.py --ranks 2 --steps 12 --large-steps 3

For each model it times full training steps (forward, backward, all-reduce, Adam) of
the same global batch and reports updates/s and, for the MPI run, the share of the
step's wall time spent inside ``Allreduce`` (that time includes waiting for the slower
rank, so on a busy machine it also measures imbalance, not only bytes moved).

Models (float32):
  char   Embedding 81->64, LSTM 64->256, Linear 256->81 on every step; batches 32 x 100
  large  LSTM 512->512, last step, Linear 512->10; batches 64 x 100

The script launches itself under ``mpiexec -n N`` for the MPI half (``--worker``).
Timings are wall-clock on whatever else the machine is doing; they are never asserted
by a test. docs/distributed.md turns the bytes per step into network time.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

import cylstm
import cylstm.distributed


class _TimedComm:
    """A communicator that adds up the seconds spent in Allreduce (the gradients')."""

    def __init__(self, comm):
        self._comm, self.seconds = comm, 0.0

    def Allreduce(self, *a, **kw):
        t0 = time.perf_counter()
        self._comm.Allreduce(*a, **kw)
        self.seconds += time.perf_counter() - t0

    def __getattr__(self, name):
        return getattr(self._comm, name)


def build(name):
    if name == "char":
        model = cylstm.text.char_model(81, embedding_dim=64, hidden_size=256, seed=0)
        model.compile(loss="cross_entropy", optimizer="adam", lr=1e-3)
        B, T = 32, 100
        rng = np.random.default_rng(0)
        make = lambda n: (rng.integers(0, 81, (n, T)), rng.integers(0, 81, (n, T)))  # noqa
    else:
        model = cylstm.Sequential([cylstm.LSTM(512, 512, batch_first=True),
                                   cylstm.LastStep(), cylstm.Linear(512, 10)], seed=0)
        model.compile(loss="cross_entropy", optimizer="adam", lr=1e-3)
        B, T = 64, 100
        rng = np.random.default_rng(0)
        make = lambda n: (rng.standard_normal((n, T, 512)).astype(np.float32),  # noqa
                          rng.integers(0, 10, n))
    return model, B, make


def measure(name, steps, comm=None):
    """(seconds per update, seconds in Allreduce per update) for ``steps`` updates."""
    model, B, make = build(name)
    x, y = make(B * (steps + 1))
    kw = dict(batch_size=B, shuffle=False, verbose=0)
    timed = None
    if comm is not None:
        timed = _TimedComm(comm)
        kw["distributed"] = cylstm.distributed.MPI(timed)
    model.fit(x[:B], y[:B], epochs=1, **kw)                       # warm-up step
    if timed is not None:
        timed.seconds = 0.0
        comm.Barrier()
    t0 = time.perf_counter()
    model.fit(x[B:], y[B:], epochs=1, **kw)
    took = time.perf_counter() - t0
    return took / steps, (timed.seconds / steps if timed else 0.0), model.num_parameters


def worker(args):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    out = {}
    with cylstm.threads(1):
        for name, steps in (("char", args.steps), ("large", args.large_steps)):
            step, ar, n_params = measure(name, steps, comm)
            # The slowest rank sets the pace: report its figures.
            step = comm.allreduce(step, op=MPI.MAX)
            ar = comm.allreduce(ar, op=MPI.MAX)
            out[name] = {"step": step, "allreduce": ar, "params": n_params}
    if comm.Get_rank() == 0:
        print(json.dumps(out))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2, help="MPI ranks, 1 thread each")
    p.add_argument("--threads", type=int, default=2, help="threads of the one process")
    p.add_argument("--steps", type=int, default=12, help="timed updates, char model")
    p.add_argument("--large-steps", type=int, default=3, help="timed updates, large model")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    mpiexec = shutil.which("mpiexec") or shutil.which(
        "mpiexec", path=os.path.dirname(sys.executable))
    if mpiexec is None:
        sys.exit("bench/scaling.py needs mpiexec: pip install \"cylstm[mpi]\"")
    single = {}
    with cylstm.threads(args.threads):
        for name, steps in (("char", args.steps), ("large", args.large_steps)):
            single[name] = measure(name, steps)
    p2 = subprocess.run([mpiexec, "-n", str(args.ranks), sys.executable,
                         os.path.abspath(__file__), "--worker", "--steps", str(args.steps),
                         "--large-steps", str(args.large_steps)],
                        capture_output=True, text=True, timeout=1800)
    if p2.returncode != 0:
        sys.exit(f"the MPI run failed:\n{p2.stdout}{p2.stderr}")
    multi = json.loads(p2.stdout.strip().splitlines()[-1])
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} "
          f"logical CPUs (shared: timings are noisy)")
    print(f"| model | params | grad bytes/step | 1 proc x {args.threads} thr: updates/s "
          f"| {args.ranks} ranks x 1 thr: updates/s | all-reduce share | speed-up |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in ("char", "large"):
        s1, _, n = single[name]
        m = multi[name]
        print(f"| {name} | {n:,} | {4 * n / 1e6:.2f} MB | {1 / s1:.2f} | "
              f"{1 / m['step']:.2f} | {m['allreduce'] / m['step']:.1%} | "
              f"{s1 / m['step']:.2f}x |")


if __name__ == "__main__":
    main()
