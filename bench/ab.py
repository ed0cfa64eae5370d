"""A/B: time two installed builds of cylstm against each other, interleaved in one run.

    python bench/ab.py --a /path/to/old-venv/bin/python --b .venv/bin/python [--rounds 5]
    python bench/ab.py ... --isa-level 1     # both builds on their AVX2 kernels

Each round starts one fresh process per build, alternating A and B, and each process
times every case (median of its repetitions); the table shows, per case, the median over
rounds of each build and the speed-up of B over A (above 1: B is faster). Interleaving spreads
whatever else the machine does over both builds alike. Only the public API is used, so
any two versions can be compared. Cases: the LSTM layer's inference forward and
training step (forward + backward) at the benchmark's configurations (float32, and
medium in float64), the streaming step, and Sequential.fit updates/s of a character
model and a ragged classifier; `--cases` keeps some layer cases and drops the others.
Each process also reports the BLAS kernel family it ran (threadpoolctl), printed once
per build.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

CASES = {   # name: (T, B, I, H, layers[, dtype[, variant]]); float32 unless a dtype is given
    "tiny": (50, 1, 32, 64, 1),
    "single": (100, 1, 256, 256, 1),    # one sequence, weights past 256 kB: projected
    "small": (100, 16, 64, 128, 1),
    "medium": (100, 32, 128, 256, 1),
    "large": (100, 64, 512, 512, 1),
    "charrnn": (128, 32, 96, 512, 2),
    "medium/float64": (100, 32, 128, 256, 1, "float64"),
    "small/varlen": (100, 16, 64, 128, 1, "float32", "varlen"),
    "medium/varlen": (100, 32, 128, 256, 1, "float32", "varlen"),
    "small/bidir": (100, 16, 64, 128, 1, "float32", "bidir"),
    "medium/bidir": (100, 32, 128, 256, 1, "float32", "bidir"),
}   # variants as bench/run.py's: "varlen", lengths uniform in 1..T; "bidir", bidirectional

WORKER = r'''
import json, sys, time
import numpy as np
import cylstm

def med(fn, reps, warm=2):
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return float(np.median(ts))

cases, quick, others = json.loads(sys.argv[1]), sys.argv[2] == "1", sys.argv[3] == "1"
if int(sys.argv[4]) >= 0:       # --isa-level: the kernels' SIMD level (cylstm._isa)
    from cylstm import _isa
    _isa.set_level(min(int(sys.argv[4]), _isa.cpu_level()))
rng = np.random.default_rng(0)
out = {}
for name, (T, B, I, H, L, *dt) in cases.items():
    dtype = dt[0] if dt else "float32"
    lengths = (np.random.default_rng(2).integers(1, T + 1, B)
               if dt[1:] == ["varlen"] else None)
    D = 2 if dt[1:] == ["bidir"] else 1
    lstm = cylstm.LSTM(I, H, num_layers=L, seed=0, dtype=dtype, bidirectional=D == 2)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    dy = rng.standard_normal((T, B, D * H)).astype(dtype)
    reps = 5 if quick else (30 if T * B * H < 10**6 else 10)
    lstm.eval()
    out[f"{name} inference ms"] = 1e3 * med(lambda: lstm(x, lengths=lengths), reps)
    lstm.train()
    def train():
        lstm.zero_grad(); lstm(x, lengths=lengths); lstm.backward(dy)
    out[f"{name} training step ms"] = 1e3 * med(train, reps)
from threadpoolctl import threadpool_info
from cylstm import _isa
out["ISA"] = _isa.NAMES[_isa.get_level()]
out["BLAS"] = "; ".join(sorted(f"{i.get('internal_api')} {i.get('version')} "
                               f"{i.get('architecture')}"
                               for i in threadpool_info() if i.get("user_api") == "blas"))
if not others:
    print(json.dumps(out))
    sys.exit()
lstm = cylstm.LSTM(256, 256, seed=0).eval()
state = lstm.initial_state(1)
xt = rng.standard_normal((1, 256)).astype(np.float32)
out["step B=1 H=256 us"] = 1e6 * med(lambda: lstm.step(xt, state), 200 if not quick else 50, 20)

# Sequential.fit, updates/s: a character model as `python -m cylstm train` builds, and a
# ragged classifier.
text = cylstm.text.default_text()[:200_000]
vocab = cylstm.text.CharVocab.from_text(text)
ids = vocab.encode(text)
n = (len(ids) - 1) // 100
xw = ids[:n * 100].reshape(n, 100)[: 32 * (6 if quick else 20)]
yw = ids[1:n * 100 + 1].reshape(n, 100)[: len(xw)]
model = cylstm.text.char_model(vocab.size, 64, 256, seed=0)
model.compile(loss="cross_entropy", optimizer="adam", lr=2e-3, clip_norm=1.0)
model.fit(xw[:32], yw[:32], batch_size=32, epochs=1, verbose=0)
t0 = time.perf_counter()
model.fit(xw, yw, batch_size=32, epochs=1, verbose=0, shuffle=False)
out["fit char model updates/s"] = (len(xw) // 32) / (time.perf_counter() - t0)
lens = rng.integers(7, 30, size=2048 if not quick else 512)
seqs = [rng.standard_normal((int(l), 12)).astype(np.float32) for l in lens]
labels = rng.integers(0, 9, size=len(seqs))
clf = cylstm.Sequential([cylstm.LSTM(12, 64, batch_first=True), cylstm.LastStep(),
                         cylstm.Linear(64, 9)], seed=0)
clf.compile(loss="cross_entropy", optimizer="adam", lr=1e-3)
clf.fit(seqs[:64], labels[:64], batch_size=32, epochs=1, verbose=0)
t0 = time.perf_counter()
clf.fit(seqs, labels, batch_size=32, epochs=1, verbose=0)
out["fit classifier updates/s"] = (len(seqs) // 32) / (time.perf_counter() - t0)
print(json.dumps(out))
'''


def run(python, quick, env, cases, others, isa_level):
    res = subprocess.run([python, "-c", WORKER, json.dumps(cases), "1" if quick else "0",
                          "1" if others else "0", str(isa_level)],
                         capture_output=True, text=True, cwd="/", env=env, timeout=1800)
    if res.returncode:
        sys.exit(f"{python} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", required=True, help="python of build A (the baseline)")
    p.add_argument("--b", required=True, help="python of build B")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    p.add_argument("--cases", default=None,
                   help=f"comma-separated layer cases of {','.join(CASES)} (default: all); "
                        "given, the streaming step and fit cases are not run")
    p.add_argument("--isa-level", type=int, default=-1,
                   help="run both builds' kernels at this SIMD level (1 AVX2, 2 AVX-512; "
                        "at most the CPU's) instead of the widest: an AVX2 machine's "
                        "kernels timed on an AVX-512 one")
    args = p.parse_args(argv)
    cases = CASES
    if args.cases:
        names = args.cases.split(",")
        unknown = [n for n in names if n not in CASES]
        if unknown:
            p.error(f"unknown cases {unknown}; choose from {','.join(CASES)}")
        cases = {n: CASES[n] for n in names}
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    results = {"A": [], "B": []}
    for r in range(args.rounds):
        for build, python in (("A", args.a), ("B", args.b)) if r % 2 == 0 else \
                (("B", args.b), ("A", args.a)):
            results[build].append(run(python, args.quick, env, cases, not args.cases,
                                      args.isa_level))
            print(f"round {r + 1}/{args.rounds}: {build} done", file=sys.stderr)
    print("| case | A median | B median | B speed-up |")
    print("| --- | --- | --- | --- |")
    for key in results["A"][0]:
        if key in ("BLAS", "ISA"):
            continue
        a = statistics.median(x[key] for x in results["A"])
        b = statistics.median(x[key] for x in results["B"])
        ratio = b / a if "/s" in key else a / b      # above 1: B is faster
        print(f"| {key} | {a:.4g} | {b:.4g} | {ratio:.2f}x |")
    for build in "AB":
        print(f"\nBLAS of {build}: " + " / ".join(sorted({x["BLAS"] for x in results[build]}))
              + "; kernels: " + " / ".join(sorted({x["ISA"] for x in results[build]})))


if __name__ == "__main__":
    main()
