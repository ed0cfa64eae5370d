"""Training-step speed against torch's idiomatic loop, and where one fit update goes.

    python bench/step_profile.py                    # updates/s, chars/s, rows/s vs torch
    python bench/step_profile.py --profile          # one fit update by piece: in fit vs alone
    python bench/step_profile.py --builds A ''      # interleave cylstm builds in one run
                                                    # (PYTHONPATH dirs, '' = installed)
    python bench/step_profile.py --stream           # LSTM.step, B=1, I=H=256 (us per call)
    python bench/step_profile.py --stream --busy 1  # the same next to a busy process on CPU 1

Cases (2 threads unless --threads): the character LM of ``python -m cylstm train``
(Embedding 81->64, LSTM 64->256, Linear 256->81, Adam 2e-3, clip_norm 1.0, batches of
32 windows of 100 characters) and a variable-length classifier (12 features, lengths
uniform 7-29, LSTM 64, last step, Linear 64->9; torch packs the batch). Every cell is
measured in a fresh process, builds and peers interleaved round by round; medians.
On a shared machine compare only columns of one run.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

V, E, H, BATCH, SEQ = 81, 64, 256, 32, 100
F_IN, H_CLS, CLASSES, T_MIN, T_MAX = 12, 64, 9, 7, 29


def _char_data(n_batches, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, size=(n_batches * BATCH, SEQ + 1))
    return ids[:, :-1].copy(), ids[:, 1:].copy()


def _cls_data(n, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    lengths = rng.integers(T_MIN, T_MAX + 1, size=n)
    x = rng.standard_normal((n, T_MAX, F_IN)).astype(np.float32)
    x[np.arange(T_MAX)[None, :] >= lengths[:, None]] = 0
    return x, rng.integers(0, CLASSES, size=n), lengths


def _cy_char():
    import cylstm
    m = cylstm.text.char_model(V, E, H, seed=0)
    m.compile(loss="cross_entropy", optimizer="adam", lr=2e-3, clip_norm=1.0)
    return m


def _cy_cls():
    import cylstm
    m = cylstm.Sequential([cylstm.LSTM(F_IN, H_CLS, batch_first=True), cylstm.LastStep(),
                           cylstm.Linear(H_CLS, CLASSES)], seed=0)
    m.compile(loss="cross_entropy", optimizer="adam", lr=2e-3, clip_norm=1.0)
    return m


ONLY = ""
USER_CASE = "char fit + user np.dot per batch (updates/s)"


class _UserBlas:
    """User code between updates that calls NumPy's BLAS (a 256x256 float64 product)."""

    def __init__(self):
        import numpy as np
        self.a = np.random.default_rng(1).standard_normal((256, 256))

    def __call__(self):
        self.a.dot(self.a)


def _measure(res, name, fn, count):
    if ONLY in name:
        res[name] = _rate(fn, count)


def _rate(fn, count, repeats=3):
    """Best-of-`repeats` rate: count / seconds of fn()."""
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = max(best, count / (time.perf_counter() - t))
    return best


def worker_cylstm(args):
    import numpy as np
    import cylstm
    cylstm.set_num_threads(args.threads)
    if os.environ.get("STEP_PROFILE_HOLD") == "0":      # a variant: NumPy's BLAS not held
        cylstm._threads._OtherBlasHold.enabled = False
    res = {}
    x, y = _char_data(args.updates)
    m = _cy_char()
    m.fit(x[:BATCH * 3], y[:BATCH * 3], batch_size=BATCH, verbose=0)          # warm up
    _measure(res, "char fit (updates/s)",
             lambda: m.fit(x, y, batch_size=BATCH, verbose=0, shuffle=False), args.updates)
    user = _UserBlas()

    class UserWork(cylstm.callbacks.Callback):
        def on_batch_end(self, batch, logs):
            user()

    _measure(res, USER_CASE, lambda: m.fit(x, y, batch_size=BATCH, verbose=0, shuffle=False,
                                           callbacks=[UserWork()]), args.updates)
    xc, yc, lc = _cls_data(BATCH * args.updates)
    c = _cy_cls()
    c.fit(xc[:BATCH * 3], yc[:BATCH * 3], lengths=lc[:BATCH * 3], batch_size=BATCH, verbose=0)
    _measure(res, "classifier fit (updates/s)",
             lambda: c.fit(xc, yc, lengths=lc, batch_size=BATCH, verbose=0), args.updates)
    _measure(res, "classifier predict (rows/s)",
             lambda: c.predict(xc, lengths=lc, batch_size=256), len(xc))
    _measure(res, "char predict (rows/s)", lambda: m.predict(x[:256], batch_size=BATCH), 256)
    vocab = cylstm.text.CharVocab("".join(chr(32 + i) for i in range(V - 1)) + "\n")
    n = args.chars
    _measure(res, "sample (chars/s)",
             lambda: cylstm.text.sample(m, vocab, prime="hello", length=n, seed=0), n)
    return res


def worker_torch(args):
    import numpy as np
    import torch
    from torch import nn
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    res = {}

    from e2e import torch_modules             # the same torch twins as bench/e2e.py
    char, cls = torch_modules(nn, V, E, H, F_IN, H_CLS, CLASSES)

    def train(model, batches, loss_of, after=None):
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        model.train()
        for b in batches:
            opt.zero_grad()
            loss = loss_of(model, *b)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if after is not None:
                after()

    x, y = _char_data(args.updates)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    char_batches = [(xt[i:i + BATCH], yt[i:i + BATCH]) for i in range(0, len(xt), BATCH)]

    def char_loss(model, xb, yb):
        return nn.functional.cross_entropy(model(xb)[0].reshape(-1, V), yb.reshape(-1))

    train(char, char_batches[:3], char_loss)
    _measure(res, "char fit (updates/s)",
             lambda: train(char, char_batches, char_loss), args.updates)
    user = _UserBlas()
    _measure(res, USER_CASE, lambda: train(char, char_batches, char_loss, user), args.updates)

    xc, yc, lc = _cls_data(BATCH * args.updates)
    xct, yct, lct = torch.from_numpy(xc), torch.from_numpy(yc), torch.from_numpy(lc)
    cls_batches = [(xct[i:i + BATCH], yct[i:i + BATCH], lct[i:i + BATCH])
                   for i in range(0, len(xct), BATCH)]

    def cls_loss(model, xb, yb, lb):
        return nn.functional.cross_entropy(model(xb, lb), yb)

    train(cls, cls_batches[:3], cls_loss)
    _measure(res, "classifier fit (updates/s)",
             lambda: train(cls, cls_batches, cls_loss), args.updates)

    def predict(model, batches):
        model.eval()
        with torch.no_grad():
            return [model(*b) for b in batches]

    _measure(res, "classifier predict (rows/s)", lambda: predict(cls, [
        (xct[i:i + 256], lct[i:i + 256]) for i in range(0, len(xct), 256)]), len(xct))
    _measure(res, "char predict (rows/s)", lambda: predict(char, [
        (xt[i:i + BATCH],) for i in range(0, 256, BATCH)]), 256)

    def sample(n):
        char.eval()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            state, tok = None, torch.tensor([[1]])
            for c in [5, 6, 7, 8]:
                _, state = char(torch.tensor([[c]]), state)
            out = []
            for _ in range(n):
                logits, state = char(tok, state)
                tok = torch.multinomial(torch.softmax(logits[0, -1], -1), 1, generator=g)[None]
                out.append(int(tok))
        return out

    _measure(res, "sample (chars/s)", lambda: sample(args.chars), args.chars)
    return res


# ---- the streaming step (bench/cases.py "step": B=1, T=1, I=H=256, one layer) ----------------

STREAM_I, STREAM_H = 256, 256


def worker_stream(args):
    """Per-call times of LSTM.step on one (1, 256) input: the median over blocks of
    back-to-back calls (wall and this thread's CPU time), and the spread of single calls
    (p50 / p99 / max), so that stalls show (a median hides them)."""
    import numpy as np
    import cylstm
    from cylstm import _step
    res = {}
    x = np.random.default_rng(0).standard_normal((1, STREAM_I))
    cases = [("f32", np.float32, args.threads), ("f32 1 thread", np.float32, 1),
             ("f64", np.float64, args.threads)]
    for name, dtype, threads in cases:
        if ONLY not in name:
            continue
        cylstm.set_num_threads(threads)
        lstm = cylstm.LSTM(STREAM_I, STREAM_H, dtype=dtype, seed=0).eval()
        state = lstm.initial_state(1)
        xt = x.astype(dtype)
        step = lstm.step
        for _ in range(3000):                       # warm: the runner, caches, the helper
            step(xt, state)
        n, blocks = args.calls, []
        stats = getattr(_step, "_helper_stats", dict)()     # builds without a helper: {}
        for _ in range(args.blocks):
            w, c = time.perf_counter_ns(), time.thread_time_ns()
            a = time.process_time_ns()
            for _ in range(n):
                step(xt, state)
            blocks.append(((time.perf_counter_ns() - w) / n / 1e3,
                           (time.thread_time_ns() - c) / n / 1e3,
                           (time.process_time_ns() - a) / n / 1e3))
        single = np.empty(args.calls * 4)
        clock = time.perf_counter_ns
        for i in range(len(single)):
            t = clock()
            step(xt, state)
            single[i] = clock() - t
        single /= 1e3
        after = getattr(_step, "_helper_stats", dict)()
        parts = {k: after[k] - stats[k] for k in ("helped", "taken_back") if k in stats}
        res[name] = {"helper": parts,
                     "wall": statistics.median(b[0] for b in blocks),
                     "cpu": statistics.median(b[1] for b in blocks),
                     "cpu_all": statistics.median(b[2] for b in blocks),
                     "p50": float(np.percentile(single, 50)),
                     "p99": float(np.percentile(single, 99)),
                     "max": float(single.max())}
    res["_kernels"] = _stream_kernels(_step)
    return res


def _stream_kernels(_step):
    """What ran: the step's per-level kernels (level 0 = BLAS for the products) and the
    BLAS behind scipy (threadpoolctl's internal_api / architecture)."""
    out = {"step levels": _step._kernel_levels()}
    try:
        from threadpoolctl import threadpool_info
        import scipy.linalg  # noqa: F401  (loads the BLAS threadpoolctl reports)
        out["blas"] = sorted({f"{i.get('internal_api')} {i.get('architecture')}"
                              for i in threadpool_info() if i.get("user_api") == "blas"})
    except ImportError:
        out["blas"] = ["threadpoolctl not installed"]
    return out


def _busy(cpu):
    """A competing busy process (`while True: pass`) pinned to `cpu`; the caller kills it."""
    code = f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"
    return subprocess.Popen([sys.executable, "-c", code])


def stream_main(args):
    names = [f"cylstm{'' if b == '' else ' ' + b}" for b in args.builds]
    results = {name: [] for name in names}
    base = [sys.executable, __file__, "--worker", "stream", "--threads", str(args.threads),
            "--calls", str(args.calls), "--blocks", str(args.blocks), "--only", args.only]
    busy = _busy(args.busy) if args.busy is not None else None
    try:
        time.sleep(0.2 if busy else 0)
        for r in range(args.rounds):
            for name, path in zip(names, args.builds):
                env = dict(os.environ)
                if path:
                    env["PYTHONPATH"] = path
                out = subprocess.run(base, env=env, check=True, capture_output=True,
                                     text=True).stdout
                results[name].append(json.loads(out.strip().splitlines()[-1]))
                print(f"round {r + 1}/{args.rounds} {name}: done", file=sys.stderr)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    forced = ", ".join(f"{k}={os.environ[k]}" for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
                       if k in os.environ) or "OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE unset"
    print(f"LSTM.step, B=1, I=H={STREAM_H}, {args.threads} threads unless named, "
          f"{'a busy process on CPU ' + str(args.busy) if busy else 'no competing process'}; "
          f"{forced}; medians of {args.rounds} processes")
    print("us per call: wall, CPU (the calling thread) and all CPU (every thread of the "
          "process: the step's helper, OpenMP, BLAS) = medians of blocks of back-to-back "
          "calls; p50 / p99 / max of single calls")
    print("helper: parts the step's helper thread computed / took back from it, per call")
    print("| case | build | wall | CPU | all CPU | p50 | p99 | max | helper |")
    print("|---|---|---|---|---|---|---|---|---|")
    cases = [k for k in results[names[0]][0] if not k.startswith("_")]
    for case in cases:
        for name in names:
            runs = [run[case] for run in results[name]]
            med = {k: statistics.median(run[k] for run in runs) for k in runs[0]
                   if k != "helper"}
            calls = args.calls * (args.blocks + 4)
            hp = runs[0].get("helper") or {}
            helper = (f"{hp['helped'] / calls:.2f} / {hp['taken_back'] / calls:.3f}"
                      if hp else "-")
            print(f"| {case} | {name} | {med['wall']:.1f} | {med['cpu']:.1f} | "
                  f"{med.get('cpu_all', float('nan')):.1f} | "
                  f"{med['p50']:.1f} | {med['p99']:.1f} | {med['max']:.0f} | {helper} |")
    for name in names:
        print(f"{name}: {results[name][0]['_kernels']}")


# ---- profile of one fit update -----------------------------------------------------------

def profile(args):
    import cProfile
    import pstats
    import cylstm
    from cylstm import optim as _optim
    cylstm.set_num_threads(args.threads)
    x, y = _char_data(args.updates)
    m = _cy_char()
    m.fit(x[:BATCH * 3], y[:BATCH * 3], batch_size=BATCH, verbose=0)
    pr = cProfile.Profile()
    t = time.perf_counter()
    pr.enable()
    m.fit(x, y, batch_size=BATCH, verbose=0, shuffle=False)
    pr.disable()
    per_update = (time.perf_counter() - t) / args.updates * 1e3
    st = pstats.Stats(pr)
    emb, lstm, lin = m.layers

    def owner(file, line):
        """The class whose body holds `line` of `file` (Python source)."""
        src = open(file).read().splitlines()
        for i in range(line - 1, -1, -1):
            if src[i].startswith("class "):
                return re.split(r"[(:]", src[i][6:])[0]
        return ""

    inside = {}
    wanted = {("Embedding", "forward"): "Embedding fwd",
              ("Embedding", "backward"): "Embedding bwd",
              ("LSTM", "forward"): "LSTM fwd", ("LSTM", "backward"): "LSTM bwd",
              ("Linear", "forward"): "Linear fwd", ("Linear", "backward"): "Linear bwd",
              ("Sequential", "_loss"): "loss", ("", "_norm"): "norm",
              ("Optimizer", "step"): "optimizer step (incl. clip)",   # older builds' fit
              ("Optimizer", "_step_with_norm"): "optimizer step (incl. clip)",
              ("Parametrised", "zero_grad"): "zero_grad"}
    for (file, line, name), (_, _, _, ct, _) in st.stats.items():
        if not file.endswith(".py") or "cylstm" not in file:
            continue
        key = wanted.get((owner(file, line), name))
        if key:
            inside[key] = inside.get(key, 0.0) + ct / args.updates * 1e3

    # each piece alone, on the inputs of the last batch
    xb, yb = x[:BATCH], y[:BATCH]
    m.train()

    def t_ms(fn, n=20):
        fn()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    e_out = emb.forward_batch(xb)[0]
    l_out = lstm.forward_batch(e_out)[0]
    z = lin.forward_batch(l_out)[0]
    _, dz, *_ = m._loss(z, yb, None)
    alone = {}
    alone["Embedding fwd"] = t_ms(lambda: emb.forward_batch(xb))
    alone["LSTM fwd"] = t_ms(lambda: lstm.forward_batch(e_out))
    alone["Linear fwd"] = t_ms(lambda: lin.forward_batch(l_out))
    alone["loss"] = t_ms(lambda: m._loss(z, yb, None))
    d_lin = lin.backward_batch(dz)
    alone["Linear bwd"] = t_ms(lambda: lin.backward_batch(dz))

    def lstm_pair():
        lstm.forward_batch(e_out)
        return lstm.backward_batch(d_lin)
    alone["LSTM bwd"] = t_ms(lstm_pair) - alone["LSTM fwd"]
    d_emb = lstm_pair()
    alone["Embedding bwd"] = t_ms(lambda: (emb.forward_batch(xb), emb.backward_batch(d_emb))) \
        - alone["Embedding fwd"]
    alone["norm"] = t_ms(lambda: _optim._norm(m.flat_grads))
    alone["optimizer step (incl. clip)"] = t_ms(lambda: m.optimizer.step())
    alone["zero_grad"] = t_ms(lambda: m.zero_grad())
    print(f"one fit update of the character LM, {args.threads} threads, cProfile over "
          f"{args.updates} updates: {per_update:.1f} ms per update (profiled)")
    print(f"{'piece':30s} {'in fit (ms)':>12s} {'alone (ms)':>11s}")
    for k in ["Embedding fwd", "LSTM fwd", "Linear fwd", "loss", "Linear bwd", "LSTM bwd",
              "Embedding bwd", "norm", "optimizer step (incl. clip)", "zero_grad"]:
        nan = float("nan")
        print(f"{k:30s} {inside.get(k, nan):12.2f} {alone.get(k, nan):11.2f}")
    print("(norm: every call; the optimiser step includes its clipping norm if it computes one)")


# ---- driver --------------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--updates", type=int, default=40, help="fit updates per timing")
    p.add_argument("--chars", type=int, default=300, help="characters per sample timing")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--builds", nargs="*", default=[""],
                   help="cylstm builds to interleave: PYTHONPATH dirs ('' = installed)")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--cell", nargs=3, action="append", default=[],
                   metavar=("LABEL", "PYTHONPATH", "ENV"),
                   help="one more cylstm column: a build ('' = installed) and NAME=VALUE,... "
                        "for its workers; STEP_PROFILE_HOLD=0 leaves NumPy's BLAS unheld")
    p.add_argument("--only", default="",
                   help="only the cases whose name contains this ('fit', 'char', ...)")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--stream", action="store_true",
                   help="time LSTM.step (B=1, I=H=256) instead of the training cases")
    p.add_argument("--busy", type=int, default=None, metavar="CPU",
                   help="--stream: run a busy process pinned to this CPU meanwhile")
    p.add_argument("--calls", type=int, default=2000, help="--stream: calls per block")
    p.add_argument("--blocks", type=int, default=15, help="--stream: blocks per process")
    p.add_argument("--worker", choices=["cylstm", "torch", "stream"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.profile:
        return profile(args)
    global ONLY
    ONLY = args.only
    if args.worker == "stream":
        print(json.dumps(worker_stream(args)))
        return
    if args.stream:
        return stream_main(args)
    if args.worker:
        print(json.dumps((worker_cylstm if args.worker == "cylstm" else worker_torch)(args)))
        return
    cells = [(f"cylstm{'' if b == '' else ' ' + b}", "cylstm", b, {}) for b in args.builds]
    for label, path, envs in args.cell:
        env = dict(kv.split("=", 1) for kv in envs.split(",") if kv)
        cells.append((label, "cylstm", path, env))
    if not args.no_torch:
        cells.append(("torch", "torch", "", {}))
    results = {name: [] for name, *_ in cells}
    base = [sys.executable, __file__, "--threads", str(args.threads), "--updates",
            str(args.updates), "--chars", str(args.chars), "--only", args.only]
    for r in range(args.rounds):
        for name, kind, path, extra in cells:
            env = dict(os.environ)
            if path:
                env["PYTHONPATH"] = path
            env.update(extra)
            out = subprocess.run(base + ["--worker", kind], env=env, check=True,
                                 capture_output=True, text=True).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r + 1}/{args.rounds} {name}: done", file=sys.stderr)
    keys = list(results[cells[0][0]][0])
    names = [c[0] for c in cells]
    print(f"{args.threads} threads, medians of {args.rounds} rounds (each the best of 3)")
    print("| case | " + " | ".join(names) + (" | " + " | ".join(
        f"{n} / torch" for n in names[:-1]) if not args.no_torch else "") + " |")
    print("|---" * (len(names) * 2 - (0 if args.no_torch else 1) + 1) + "|")
    for k in keys:
        med = [statistics.median(run[k] for run in results[n]) for n in names]
        row = f"| {k} | " + " | ".join(f"{v:.1f}" for v in med)
        if not args.no_torch:
            row += " | " + " | ".join(f"{v / med[-1]:.2f}x" for v in med[:-1])
        print(row + " |")


if __name__ == "__main__":
    main()
