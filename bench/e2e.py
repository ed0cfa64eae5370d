"""End-to-end throughput: what users run, cylstm and torch side by side in one run.

    python bench/e2e.py --quick          # ~1-2 min on 2 idle cores
    python bench/e2e.py                  # the figures to quote (a few minutes)
    python bench/e2e.py --profile        # where ~100 fit updates of the char model go
    python bench/e2e.py --profile predict   # where predict's time goes (or: evaluate)
    python bench/e2e.py --blas-env as-is,unset,haswell   # each in a child process

Measured, at --threads (default 2) for cylstm, its BLAS and torch alike:

- fit: updates/s of ``cylstm.Sequential.fit`` against torch's idiomatic loop on the same
  data (nn.Embedding/nn.LSTM/nn.Linear, torch.optim.Adam, clip_grad_norm_):
  (1) the character model ``python -m cylstm train`` builds (Embedding V->64,
  LSTM 64->256, Linear 256->V; Adam lr 2e-3, clip norm 1.0) on batches of 32 windows of
  100 characters of cylstm.text.default_text(), V its distinct characters;
  (2) a sequence classifier (12 features, lengths uniform in 7..29, 9 classes,
  LSTM 64, LastStep, Linear; torch: pack_padded_sequence), batches of 16.
- predict and evaluate: sequences/s of ``predict`` / ``evaluate`` (batches of 256)
  against torch under inference_mode, on both models (the classifier: 10,000 sequences).
- sample: characters/s of ``cylstm.text.sample`` against a torch loop feeding one
  character at a time (state carried, softmax with temperature, torch.multinomial).
- train: characters/s of ``python -m cylstm train`` run as a subprocess (its defaults,
  one epoch on the first --train-chars characters, validation included).
- the BLAS kernel each library runs (threadpoolctl's 'architecture').

Each figure is the median of several reps, cylstm and torch alternating (A B A B ...)
so that drift on a shared machine hits both. Ratios above 1: cylstm is faster. The
targets (defined at 2 threads) are printed MET or MISSED; docs/benchmarking.md says more.
The report goes to stdout and <out>/e2e.md, records to <out>/e2e.jsonl (<out>: --out,
default bench/results/ next to this script); --profile writes <out>/e2e_profile.md,
--profile predict <out>/e2e_profile_predict.md (evaluate likewise).
"""

import argparse
import contextlib
import cProfile
import datetime
import importlib.util
import json
import math
import os
import platform
import pstats
import re
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import numpy as np

import cylstm
from cylstm import optim as cy_optim
from cylstm import text as cy_text
from cylstm._threads import loop_hold

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results")

# The OpenBLAS environment a child process runs under. 'as-is' keeps this process's;
# 'unset' removes both variables (OpenBLAS then picks its kernels from the CPU it
# detects); 'haswell' forces the Haswell kernels and a 512 KiB L2, what some machines
# set to avoid a slower autodetected kernel.
BLAS_ENVS = {
    "as-is": None,
    "unset": {"OPENBLAS_CORETYPE": None, "OPENBLAS_L2_SIZE": None},
    "haswell": {"OPENBLAS_CORETYPE": "Haswell", "OPENBLAS_L2_SIZE": "512"},
}

# (what, ratio key, at least): the targets, at 2 threads, ratios within one run.
TARGETS = (
    ("fit, char model: updates/s vs torch", "fit_char", 1.5),
    ("fit, classifier: updates/s vs torch", "fit_cls", 1.5),
    ("sample: characters/s vs torch", "sample", 3.0),
    ("predict, classifier: sequences/s vs torch", "predict_cls", 1.2),
    ("predict, char model: windows/s vs torch", "predict_char", 1.2),
)


class Sizes(NamedTuple):
    reps: int                # timed reps per implementation (after one untimed)
    char_updates: int        # fit updates per rep, char model
    cls_updates: int         # fit updates per rep, classifier
    predict_seqs: int        # sequences per predict/evaluate rep, classifier
    predict_windows: int     # windows per predict/evaluate rep, char model
    sample_chars: int        # characters per sample rep
    train_chars: int         # --max-chars of the `python -m cylstm train` run
    profile_updates: int     # fit updates under cProfile (--profile)
    # the models (the smoke sizes shrink them; the figures use the real ones)
    embed: int = 64
    hidden: int = 256
    window: int = 100
    batch: int = 32          # char model: windows per batch
    cls_batch: int = 16      # classifier: sequences per batch
    cls_hidden: int = 64
    cls_features: int = 12
    cls_classes: int = 9
    cls_lengths: tuple = (7, 29)


FULL = Sizes(reps=5, char_updates=12, cls_updates=120, predict_seqs=10_000,
             predict_windows=512, sample_chars=600, train_chars=200_000,
             profile_updates=100)
QUICK = Sizes(reps=3, char_updates=8, cls_updates=80, predict_seqs=2048,
              predict_windows=256, sample_chars=300, train_chars=60_000,
              profile_updates=100)
# For the tests: every code path on tiny models; the figures mean nothing.
SMOKE = Sizes(reps=1, char_updates=2, cls_updates=2, predict_seqs=16, predict_windows=8,
              sample_chars=5, train_chars=3_000, profile_updates=3, embed=4, hidden=8,
              window=12, batch=4, cls_batch=4, cls_hidden=5, cls_features=3, cls_classes=4,
              cls_lengths=(2, 6))


# ---- data -----------------------------------------------------------------------------------

def char_data(sz, n_windows, seed=0):
    """(vocab, x (N, window) int64, y (N, window) int64): windows of the default text
    from random places, y shifted by one character."""
    text = cy_text.default_text()
    vocab = cy_text.CharVocab.from_text(text)
    ids = vocab.encode(text).astype(np.int64)
    starts = np.random.default_rng(seed).integers(0, ids.size - sz.window - 1, n_windows)
    w = np.stack([ids[s:s + sz.window + 1] for s in starts])
    return vocab, np.ascontiguousarray(w[:, :-1]), np.ascontiguousarray(w[:, 1:])


def cls_data(sz, n, seed=1):
    """(x (N, Tmax, F) float32 zero-padded, lengths (N,) int64, y (N,) int64): the class
    is where the mean of the first features peaks, so the task is learnable."""
    rng = np.random.default_rng(seed)
    lo, hi = sz.cls_lengths
    lengths = rng.integers(lo, hi + 1, n)
    x = rng.standard_normal((n, hi, sz.cls_features)).astype(np.float32)
    x[np.arange(hi)[None, :] >= lengths[:, None]] = 0
    k = min(sz.cls_classes, sz.cls_features)
    y = (x[:, :, :k].sum(1) / lengths[:, None]).argmax(1) % sz.cls_classes
    return x, lengths.astype(np.int64), y.astype(np.int64)


# ---- the models -----------------------------------------------------------------------------

def cy_char_model(sz, V):
    m = cy_text.char_model(V, sz.embed, sz.hidden, seed=0)
    m.compile(loss="cross_entropy", optimizer="adam", lr=2e-3, metrics=["bpc"], clip_norm=1.0)
    return m


def cy_cls_model(sz):
    m = cylstm.Sequential([cylstm.LSTM(sz.cls_features, sz.cls_hidden, batch_first=True),
                           cylstm.LastStep(), cylstm.Linear(sz.cls_hidden, sz.cls_classes)],
                          seed=0)
    m.compile(loss="cross_entropy", optimizer="adam", lr=2e-3, metrics=["accuracy"],
              clip_norm=1.0)
    return m


def _copy_weights(torch, cy_model, modules):
    """cylstm's initial weights into the torch modules (the same starting point)."""
    with torch.no_grad():
        for layer, mod in zip(cy_model.layers, modules):
            if mod is None:
                continue
            for k, v in layer.params.items():
                getattr(mod, k).copy_(torch.from_numpy(np.array(v)))


def torch_modules(nn, V, E, H, F, H_cls, C):
    """torch's idiomatic twins of cylstm's two end-to-end models, untrained:
    char(x, state) -> (logits, state): Embedding(V, E) -> LSTM(E, H) -> Linear(H, V);
    cls(x, lengths) -> logits: packed LSTM(F, H_cls) -> last state -> Linear(H_cls, C)."""

    class Char(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(V, E)
            self.lstm = nn.LSTM(E, H, batch_first=True)
            self.lin = nn.Linear(H, V)

        def forward(self, x, state=None):
            y, state = self.lstm(self.emb(x), state)
            return self.lin(y), state

    class Cls(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(F, H_cls, batch_first=True)
            self.lin = nn.Linear(H_cls, C)

        def forward(self, x, lengths):
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                       enforce_sorted=False)
            _, (h, _) = self.lstm(packed)
            return self.lin(h[-1])

    return Char(), Cls()


def torch_models(torch, sz, V, cy_char, cy_cls):
    """torch_modules at sz's sizes, starting from the cylstm models' weights."""
    char, cls = torch_modules(torch.nn, V, sz.embed, sz.hidden, sz.cls_features,
                              sz.cls_hidden, sz.cls_classes)
    _copy_weights(torch, cy_char, [char.emb, char.lstm, char.lin])
    _copy_weights(torch, cy_cls, [cls.lstm, None, cls.lin])
    return char, cls


def torch_fit(torch, model, opt, batches_of, x, y, lengths, n_rows, batch, gen):
    """One epoch of torch's idiomatic loop; returns the mean loss."""
    F = torch.nn.functional
    model.train()
    perm = torch.randperm(n_rows, generator=gen)
    total, n = 0.0, 0
    for i in range(0, n_rows, batch):
        idx = perm[i:i + batch]
        out = batches_of(model, x, lengths, idx)
        yb = y[idx]
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), yb.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        total += loss.item()
        n += 1
    return total / max(n, 1)


def _char_out(model, x, lengths, idx):
    return model(x[idx])[0]


def _cls_out(model, x, lengths, idx):
    return model(x[idx], lengths[idx])


def torch_predict(torch, model, x, lengths, batch=256):
    model.eval()
    outs = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            if lengths is None:
                outs.append(model(x[i:i + batch])[0])
            else:
                outs.append(model(x[i:i + batch], lengths[i:i + batch]))
    return torch.cat(outs).numpy()


def torch_evaluate(torch, model, x, y, lengths, batch=256):
    F = torch.nn.functional
    model.eval()
    total, n = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            if lengths is None:
                out = model(x[i:i + batch])[0]
            else:
                out = model(x[i:i + batch], lengths[i:i + batch])
            yb = y[i:i + batch]
            total += F.cross_entropy(out.reshape(-1, out.shape[-1]), yb.reshape(-1),
                                     reduction="sum").item()
            n += yb.numel()
    return total / n


def torch_sample(torch, model, prime_ids, length, temperature, gen):
    """Feed the prime, then one character at a time: what a torch user writes."""
    model.eval()
    out = []
    with torch.inference_mode():
        state = None
        tok = torch.empty((1, 1), dtype=torch.long)
        for i in prime_ids[:-1]:
            tok[0, 0] = int(i)
            _, state = model(tok, state)
        last = int(prime_ids[-1])
        for _ in range(length):
            tok[0, 0] = last
            logits, state = model(tok, state)
            p = torch.softmax(logits[0, -1] / temperature, dim=-1)
            last = int(torch.multinomial(p, 1, generator=gen))
            out.append(last)
    return out


# ---- timing ---------------------------------------------------------------------------------

LOADS = {}      # figure -> cores' worth of CPU other processes used while it was timed


def alternate(fns, reps, figure=None):
    """{name: [seconds of each timed rep]}: one untimed call each, then `reps` rounds
    in which every fn runs once, the order reversed every other round. The other load
    meanwhile goes to LOADS[figure]."""
    t0 = _load()
    names = list(fns)
    for k in names:
        fns[k]()
    times = {k: [] for k in names}
    for r in range(reps):
        for k in (names if r % 2 == 0 else names[::-1]):
            t1 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t1)
    if figure:
        LOADS[figure] = _other_load(t0, _load())
    return times


def rate(times, work):
    """{median, lo, hi} of work/second over the reps (lo/hi: slowest/fastest rep)."""
    r = [work / t for t in times]
    return {"median": float(np.median(r)), "lo": float(min(r)), "hi": float(max(r)),
            "reps": len(r)}


# ---- what is measured -----------------------------------------------------------------------

def blas_kernels():
    """Each BLAS in the process with the kernel family it picked; torch's own BLAS
    (usually MKL, linked into libtorch) is invisible to threadpoolctl, so its build
    information and CPU capability are reported instead."""
    import scipy.linalg  # noqa: F401  (loads SciPy's OpenBLAS, which cylstm's kernels call)
    from threadpoolctl import threadpool_info

    from machine import blas_kernels as seen
    out = seen(threadpool_info())
    torch = sys.modules.get("torch")
    if torch is not None and not any(k["owner"] == "torch" for k in out):
        cfg = torch.__config__.show()
        blas = re.search(r"BLAS_INFO=([^,\s]+)", cfg)
        out.append({"owner": "torch", "internal_api": blas.group(1) if blas else "?",
                    "version": None,
                    "architecture": "CPU capability " + torch.backends.cpu.get_cpu_capability(),
                    "num_threads": torch.get_num_threads(), "filepath": "(linked into libtorch)"})
    return out


def measure_fit(sz, torch, n, log):
    """updates/s of fit for both models, cylstm and torch alternating."""
    res = {}
    V_vocab, cx, cy = char_data(sz, sz.char_updates * sz.batch)
    V = V_vocab.size
    cm, clm = cy_char_model(sz, V), cy_cls_model(sz)
    x, lengths, y = cls_data(sz, sz.cls_updates * sz.cls_batch)
    tm = None
    if torch is not None:
        tchar, tcls = torch_models(torch, sz, V, cm, clm)
        topt = {k: torch.optim.Adam(m.parameters(), lr=2e-3) for k, m in
                (("char", tchar), ("cls", tcls))}
        gen = torch.Generator().manual_seed(0)
        tcx, tcy = torch.from_numpy(cx), torch.from_numpy(cy)
        tx, tl, ty = torch.from_numpy(x), torch.from_numpy(lengths), torch.from_numpy(y)
        tm = (tchar, tcls)
    losses = {}
    for key, model, data, updates, bs in (
            ("fit_char", cm, (cx, cy, None), sz.char_updates, sz.batch),
            ("fit_cls", clm, (x, y, lengths), sz.cls_updates, sz.cls_batch)):
        xa, ya, la = data
        fns = {"cylstm": lambda m=model, xa=xa, ya=ya, la=la, bs=bs, key=key:
               losses.__setitem__(("cylstm", key), m.fit(
                   xa, ya, batch_size=bs, epochs=1, verbose=0,
                   lengths=la).history["loss"][-1])}
        if torch is not None:
            if key == "fit_char":
                args = (tchar, topt["char"], _char_out, tcx, tcy, None)
            else:
                args = (tcls, topt["cls"], _cls_out, tx, ty, tl)
            fns["torch"] = lambda a=args, bs=bs, key=key: losses.__setitem__(
                ("torch", key), torch_fit(torch, *a, len(a[3]), bs, gen))
        times = alternate(fns, sz.reps, key)
        res[key] = {k: dict(rate(t, updates), unit="updates/s",
                            last_loss=losses.get((k, key))) for k, t in times.items()}
        log(f"[{key}] " + ", ".join(f"{k} {v['median']:.1f} updates/s" for k, v in
                                    res[key].items()))
    return res, (cm, clm, V_vocab, tm)


def measure_inference(sz, torch, models, log):
    """sequences/s of predict and evaluate on both models; characters/s of sample."""
    cm, clm, vocab, tm = models
    res = {}
    _, cx, cy = char_data(sz, sz.predict_windows, seed=2)
    x, lengths, y = cls_data(sz, sz.predict_seqs, seed=3)
    T = None
    if torch is not None:
        tchar, tcls = tm
        T = dict(cx=torch.from_numpy(cx), cy=torch.from_numpy(cy), x=torch.from_numpy(x),
                 l=torch.from_numpy(lengths), y=torch.from_numpy(y))
    jobs = (
        ("predict_char", len(cx), lambda: cm.predict(cx, batch_size=256),
         lambda: torch_predict(torch, tchar, T["cx"], None)),
        ("predict_cls", len(x), lambda: clm.predict(x, batch_size=256, lengths=lengths),
         lambda: torch_predict(torch, tcls, T["x"], T["l"])),
        ("evaluate_char", len(cx), lambda: cm.evaluate(cx, cy, batch_size=256),
         lambda: torch_evaluate(torch, tchar, T["cx"], T["cy"], None)),
        ("evaluate_cls", len(x), lambda: clm.evaluate(x, y, batch_size=256, lengths=lengths),
         lambda: torch_evaluate(torch, tcls, T["x"], T["y"], T["l"])),
    )
    for key, work, cy_fn, t_fn in jobs:
        fns = {"cylstm": cy_fn}
        if torch is not None:
            fns["torch"] = t_fn
        res[key] = {k: dict(rate(t, work), unit="sequences/s")
                    for k, t in alternate(fns, sz.reps, key).items()}
        log(f"[{key}] " + ", ".join(f"{k} {v['median']:.0f} sequences/s" for k, v in
                                    res[key].items()))
    prime = "The "
    fns = {"cylstm": lambda: cy_text.sample(cm, vocab, prime=prime, length=sz.sample_chars,
                                            temperature=0.8, seed=0)}
    if torch is not None:
        gen = torch.Generator().manual_seed(0)
        pids = vocab.encode(prime)
        fns["torch"] = lambda: torch_sample(torch, tchar, pids, sz.sample_chars, 0.8, gen)
    res["sample"] = {k: dict(rate(t, sz.sample_chars), unit="characters/s")
                     for k, t in alternate(fns, sz.reps, "sample").items()}
    log("[sample] " + ", ".join(f"{k} {v['median']:.0f} characters/s" for k, v in
                                res["sample"].items()))
    return res


def measure_train_cli(sz, n, log, timeout=1800):
    """characters/s of `python -m cylstm train` (one epoch, its defaults otherwise),
    from its own 'trained in' line; the wall time of the whole command too."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "cylstm", "train", "--max-chars", str(sz.train_chars),
               "--epochs", "1", "--model", os.path.join(tmp, "model.npz"),
               "--threads", str(n), "--length", "20",
               "--batch-size", str(sz.batch)]
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout} s", "command": cmd}
        wall = time.perf_counter() - t0
    out = p.stdout
    m_chars = re.search(r"([\d,]+) to train on", out)
    m_time = re.search(r"trained in ([\d.]+) s", out)
    if p.returncode != 0 or not (m_chars and m_time):
        return {"error": f"exit {p.returncode}: " + (p.stderr.strip().splitlines() or
                                                     out.strip().splitlines() or ["?"])[-1],
                "command": cmd}
    chars = int(m_chars.group(1).replace(",", ""))
    trained = float(m_time.group(1))
    res = {"command": " ".join(["python"] + cmd[1:]), "train_chars": chars,
           "trained_s": trained, "wall_s": wall, "chars_per_s": chars / trained}
    log(f"[train] {res['chars_per_s']:.0f} characters/s ({chars:,} characters in "
        f"{trained:.1f} s, validation included; command {wall:.1f} s)")
    return res


# ---- the profile ----------------------------------------------------------------------------

def _key(fn):
    c = fn.__code__
    return (c.co_filename, c.co_firstlineno, c.co_name)


def profile_fit(sz, n, log):
    """cProfile of sz.profile_updates fit updates of the char model, grouped by piece,
    beside each piece's cost called alone (no profiler) on the same shapes."""
    from cylstm.embedding import Embedding
    from cylstm.layers import LSTM, Linear

    U = sz.profile_updates
    vocab, x, y = char_data(sz, U * sz.batch)
    m = cy_char_model(sz, vocab.size)
    with cylstm.threads(n):
        m.fit(x[:3 * sz.batch], y[:3 * sz.batch], batch_size=sz.batch, verbose=0)  # warm
        t0 = time.perf_counter()
        m.fit(x, y, batch_size=sz.batch, verbose=0)
        plain = (time.perf_counter() - t0) / U
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        m.fit(x, y, batch_size=sz.batch, verbose=0)
        prof.disable()
        profiled = (time.perf_counter() - t0) / U
    st = pstats.Stats(prof).stats             # key -> (cc, nc, tt, ct, callers)

    def ct(fn, caller=None):
        k = _key(fn)
        if k not in st:
            return 0.0, 0
        if caller is None:
            return st[k][3], st[k][1]
        c = st[k][4].get(_key(caller))
        return (c[3], c[1]) if c else (0.0, 0)

    opt = m.optimizer
    # fit hands the norm it checked to the optimiser (_step_with_norm); a bare step()
    # computes its own.
    step_fn = getattr(type(opt), "_step_with_norm", type(opt).step)
    fit_ct, _ = ct(type(m).fit)
    # The Embedding hands its ids to the LSTM (token input: the LSTM projects the
    # Embedding's table, and its backward fills the Embedding's gradient), so the two are
    # one piece: the LSTM's batch calls, plus the Embedding's own calls for a batch where
    # the table would not pay (then forward_batch calls Embedding.forward inside it).
    inside = {
        "Embedding + LSTM forward + backward": [ct(LSTM.forward_batch),
                                                ct(LSTM.backward_batch),
                                                ct(Embedding.backward)],
        "gradient norm (NaN/Inf check)": [ct(cy_optim._norm, type(m).train_step)],
        "optimiser step (clip + Adam)": [ct(step_fn)],
        "Linear forward + backward": [ct(Linear.forward), ct(Linear.backward)],
        "loss (cross-entropy + its gradient)": [ct(type(m)._loss)],
    }
    # the same calls alone, on one batch's shapes, no profiler
    emb, lstm, lin = m.layers
    xb, yb = x[:sz.batch], y[:sz.batch]
    rng = np.random.default_rng(0)
    m.train()
    h, _ = lstm.forward_batch(emb.token_batch(xb))     # as Sequential runs the pair
    out = lin.forward(h)
    _, dout, *_ = m._loss(out, yb, None)
    dh = rng.standard_normal(h.shape).astype(h.dtype)

    def lstm_fb():
        lstm.forward_batch(emb.token_batch(xb))
        de = lstm.backward_batch(dh)
        if de is not None:                 # the table did not pay: the Embedding's own
            emb.backward(de)

    def lin_fb():
        lin.forward(h)
        lin.backward(dout)

    alone_fns = {
        "Embedding + LSTM forward + backward": lstm_fb,
        "gradient norm (NaN/Inf check)": lambda: cy_optim._norm(m.flat_grads),
        "optimiser step (clip + Adam)": opt.step,
        "Linear forward + backward": lin_fb,
        "loss (cross-entropy + its gradient)": lambda: m._loss(out, yb, None),
    }
    reps = max(3, min(50, U // 2))
    alone, after = {}, {}
    # "After the LSTM": each call timed right after the LSTM's forward + backward on the
    # same batch (the LSTM's own after the Linear's), untimed: the caches and the thread
    # team as the piece finds them inside fit, with no other Python code around it.
    # Inside near that and well above alone: the piece pays for what the LSTM left in
    # the caches, not for the loop around it or a second thread pool.
    before = {k: lin_fb if k == "Embedding + LSTM forward + backward" else lstm_fb
              for k in alone_fns}
    with cylstm.threads(n):
        for k, fn in alone_fns.items():
            fn()
            ts, ta = [], []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            for _ in range(reps):
                before[k]()
                t0 = time.perf_counter()
                fn()
                ta.append(time.perf_counter() - t0)
            alone[k], after[k] = float(np.median(ts)), float(np.median(ta))
    rows = []
    for k, parts in inside.items():
        t = sum(p[0] for p in parts)
        calls = max((p[1] for p in parts), default=0)
        rows.append({"piece": k, "calls_per_update": calls / U, "inside_ms": 1e3 * t / U,
                     "share": t / fit_ct if fit_ct else None,
                     "alone_ms": 1e3 * alone[k] * (calls / U),
                     "after_lstm_ms": 1e3 * after[k] * (calls / U)})
    rest = fit_ct - sum(sum(p[0] for p in parts) for parts in inside.values())
    res = {"updates": U, "fit_ms_per_update": 1e3 * plain,
           "profiled_ms_per_update": 1e3 * profiled, "fit_ct_ms_per_update": 1e3 * fit_ct / U,
           "rest_ms": 1e3 * rest / U, "rows": rows,
           "top": _top_functions(st, fit_ct, U)}
    log(f"[profile] fit {res['fit_ms_per_update']:.1f} ms/update "
        f"({res['profiled_ms_per_update']:.1f} under cProfile)")
    return res


def _hold_once():
    with loop_hold:
        pass


def profile_inference(sz, n, log, torch, what):
    """Where ``predict`` (what="predict") or ``evaluate`` (what="evaluate") of the char
    model goes, per batch of 256 windows: cProfile of a few calls grouped by piece,
    beside each piece called alone (no profiler) on one batch's shapes, and beside
    torch's module doing the same piece at the same shapes (when torch is there)."""
    from cylstm import functional as cy_F
    from cylstm.embedding import Embedding
    from cylstm.layers import LSTM, Linear

    bs = min(256, sz.predict_windows)
    vocab, cx, cy = char_data(sz, sz.predict_windows, seed=2)
    m = cy_char_model(sz, vocab.size)
    n_batches = -(-len(cx) // bs)
    if what == "predict":
        call = lambda: m.predict(cx, batch_size=bs)
        top_fn = type(m).predict
    else:
        call = lambda: m.evaluate(cx, cy, batch_size=bs)
        top_fn = type(m).evaluate
    tm = None
    if torch is not None:
        tm, _ = torch_models(torch, sz, vocab.size, m, cy_cls_model(sz))
        tcx, tcy = torch.from_numpy(cx), torch.from_numpy(cy)
        t_call = (lambda: torch_predict(torch, tm, tcx, None, bs)) if what == "predict" \
            else (lambda: torch_evaluate(torch, tm, tcx, tcy, None, bs))
    reps = max(3, sz.reps)
    calls = max(1, sz.profile_updates // 25)           # predict/evaluate calls profiled
    with cylstm.threads(n):
        fns = {"cylstm": call}
        if tm is not None:
            fns["torch"] = t_call
        whole = {k: float(np.median(v)) / n_batches for k, v in alternate(fns, reps).items()}
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        for _ in range(calls):
            call()
        prof.disable()
        profiled = (time.perf_counter() - t0) / (calls * n_batches)
    st = pstats.Stats(prof).stats
    nb = calls * n_batches                             # batches under the profiler

    def ct(fn):
        k = _key(fn) if fn is not None else None
        return (st[k][3], st[k][1]) if k in st else (0.0, 0)

    kernel = getattr(cy_F, "lstm_layer_forward", None)
    top_ct, _ = ct(top_fn)
    k_ct, k_n = ct(kernel)
    # an eval-mode forward of a layout seen before runs the kernels through the calls
    # the first one prepared (cylstm.layers._Prepared), not through functional
    prepared = getattr(getattr(cylstm, "layers", None), "_Prepared", None)
    p_ct, p_n = ct(getattr(prepared, "run", None))
    k_ct, k_n = k_ct + p_ct, k_n + p_n
    e_ct, _ = ct(Embedding.forward)            # only where the table does not pay
    l_ct, l_n = ct(LSTM.forward_batch)
    # The Embedding hands its ids to the LSTM, whose kernel call projects the
    # Embedding's table (token input): the lookup is inside the kernel's piece.
    inside = {
        "Embedding + LSTM kernel (functional.lstm_layer_forward or a prepared call)": (k_ct + e_ct, k_n),
        "LSTM.forward_batch around the kernel (layout copies, checks)":
            (l_ct - k_ct - e_ct, l_n),
        "Linear forward": ct(Linear.forward),
    }
    if what == "evaluate":
        inside["loss and metrics (softmax cross-entropy)"] = ct(type(m)._loss)
    # predict/evaluate hold NumPy's BLAS to one thread and its huge-page hint off for
    # the call (cylstm._threads.loop_hold); top_fn is that wrapper, so the hold is
    # inside the total
    hold = type(loop_hold)
    (a, na), (b, _) = ct(hold.__enter__), ct(hold.__exit__)
    inside["holding NumPy's BLAS to one thread and its huge-page hint off (enter + exit)"] = \
        (a + b, na)

    # each piece alone, on one batch's shapes, eval mode; torch's piece beside it
    emb, lstm, lin = m.layers
    m.eval()
    xb, yb = np.ascontiguousarray(cx[:bs]), np.ascontiguousarray(cy[:bs])
    h, _ = lstm.forward_batch(emb.token_batch(xb))     # as Sequential runs the pair
    out = lin.forward(h)
    (w_ih, w_hh, b_ih, b_hh, _), _ = lstm._weights(0, 0)
    ws = cy_F.Workspace()           # scratch kept across calls, as LSTM.forward keeps it
    if cy_F.token_table(emb.num_embeddings, xb.shape[1], xb.shape[0], emb.embedding_dim):
        tok = cy_F.Tokens(np.ascontiguousarray(xb.T, dtype=np.int32), emb.weight, emb.grad)

        def emb_lstm_kernel():
            return kernel(None, w_ih, w_hh, b_ih, b_hh, training=False, workspace=ws,
                          tokens=tok)
    else:
        def emb_lstm_kernel():
            et = np.ascontiguousarray(emb.forward(xb).transpose(1, 0, 2))
            return kernel(et, w_ih, w_hh, b_ih, b_hh, training=False, workspace=ws)
    alone_fns = {
        "Embedding + LSTM kernel (functional.lstm_layer_forward or a prepared call)": emb_lstm_kernel,
        "LSTM.forward_batch around the kernel (layout copies, checks)": None,
        "Linear forward": lambda: lin.forward(h),
        "loss and metrics (softmax cross-entropy)": lambda: m._loss(out, yb, None),
        "holding NumPy's BLAS to one thread and its huge-page hint off (enter + exit)": _hold_once,
    }
    torch_fns = {}
    if tm is not None:
        F = torch.nn.functional
        txb, tyb = torch.from_numpy(xb), torch.from_numpy(yb)
        with torch.inference_mode():
            te = tm.emb(txb)
            th = tm.lstm(te)[0]
            tout = tm.lin(th)
        torch_fns = {
            "Embedding + LSTM kernel (functional.lstm_layer_forward or a prepared call)":
                lambda: tm.lstm(tm.emb(txb)),
            "Linear forward": lambda: tm.lin(th),
            "loss and metrics (softmax cross-entropy)": lambda: F.cross_entropy(
                tout.reshape(-1, tout.shape[-1]), tyb.reshape(-1), reduction="sum").item(),
        }
    alone, t_alone = {}, {}
    ctx = torch.inference_mode() if tm is not None else contextlib.nullcontext()
    with cylstm.threads(n), ctx:
        for k in inside:
            fns = {"cylstm": alone_fns[k]} if alone_fns.get(k) else {}
            if k in torch_fns:
                fns["torch"] = torch_fns[k]
            if not fns:
                continue
            res = alternate(fns, max(5, 2 * reps))
            alone[k] = float(np.median(res["cylstm"])) if "cylstm" in res else None
            t_alone[k] = float(np.median(res["torch"])) if "torch" in res else None
    lstm_alone = None
    kpiece = "Embedding + LSTM kernel (functional.lstm_layer_forward or a prepared call)"
    with cylstm.threads(n), ctx:
        fns = {"cylstm": lambda: lstm.forward_batch(emb.token_batch(xb))}
        if tm is not None:
            fns["torch"] = torch_fns[kpiece]
        res = alternate(fns, max(5, 2 * reps))
        lstm_alone = {k: 1e3 * float(np.median(v)) for k, v in res.items()}
    if kpiece in alone:
        alone["LSTM.forward_batch around the kernel (layout copies, checks)"] = \
            lstm_alone["cylstm"] / 1e3 - alone[kpiece]
    rows = []
    for k, (t, c) in inside.items():
        a, ta = alone.get(k), t_alone.get(k)
        rows.append({"piece": k, "calls_per_batch": c / nb, "inside_ms": 1e3 * t / nb,
                     "share": t / top_ct if top_ct else None,
                     "alone_ms": None if a is None else 1e3 * a * c / nb,
                     "torch_ms": None if ta is None else 1e3 * ta})
    rest = top_ct - sum(t for t, _ in inside.values())
    res = {"what": what, "batch": bs, "windows": len(cx), "batches": nb,
           "ms_per_batch": 1e3 * whole["cylstm"],
           "torch_ms_per_batch": 1e3 * whole["torch"] if "torch" in whole else None,
           "profiled_ms_per_batch": 1e3 * profiled, "top_ct_ms_per_batch": 1e3 * top_ct / nb,
           "rest_ms": 1e3 * rest / nb, "rows": rows, "lstm_alone": lstm_alone,
           "top": _top_functions(st, top_ct, nb)}
    log(f"[profile {what}] {res['ms_per_batch']:.1f} ms per batch of {bs}"
        + (f", torch {res['torch_ms_per_batch']:.1f}" if tm is not None else "")
        + f" ({res['profiled_ms_per_batch']:.1f} under cProfile)")
    return res


def _top_functions(st, fit_ct, U, k=12):
    """The k functions with the most own time (tottime), per update."""
    items = sorted(st.items(), key=lambda kv: -kv[1][2])[:k]
    return [{"function": f"{os.path.basename(f)}:{line}({name})" if line else name,
             "own_ms": 1e3 * v[2] / U, "cum_ms": 1e3 * v[3] / U, "calls_per_update": v[1] / U}
            for (f, line, name), v in items]


# ---- report ---------------------------------------------------------------------------------

def table(head, rows):
    return ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)] + \
        ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def _f(v):
    if v is None:
        return "-"
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


LABELS = {
    "fit_char": "fit, char model (updates/s)",
    "fit_cls": "fit, classifier (updates/s)",
    "predict_char": "predict, char model (windows/s)",
    "predict_cls": "predict, classifier (sequences/s)",
    "evaluate_char": "evaluate, char model (windows/s)",
    "evaluate_cls": "evaluate, classifier (sequences/s)",
    "sample": "sample (characters/s)",
}


def ratios(res):
    return {k: v["cylstm"]["median"] / v["torch"]["median"]
            for k, v in res.items() if isinstance(v, dict) and "torch" in v and "cylstm" in v}


DISTURBED = 0.3     # cores of other load above which a verdict is marked disturbed


def evaluate_targets(res, n):
    r, loads = ratios(res), res.get("load", {})
    return [{"what": what, "wanted": f">= {need:g}x", "value": r.get(key),
             "met": None if r.get(key) is None or n != 2 else r[key] >= need,
             "load": loads.get(key)}
            for what, key, need in TARGETS]


def _verdict(t):
    if t["met"] is None:
        return "-"
    v = "MET" if t["met"] else "**MISSED**"
    if t.get("load") is not None and t["load"] > DISTURBED:
        v += " (disturbed: do not quote)"
    return v


def blas_lines(kernels, env):
    forced = ", ".join(f"{k}={env[k]}" for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
                       if env.get(k) is not None) or "OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE unset"
    return [f"- BLAS kernels ({forced}): " + "; ".join(
        f"{k['owner']}: {k['internal_api']} {k.get('version') or ''} "
        f"{k.get('architecture') or '?'}".replace("  ", " ") for k in kernels)]


def markdown(run):
    h = run["header"]
    res = run["results"]
    lines = [f"# cylstm end-to-end benchmark{' (quick)' if h['quick'] else ''}, "
             f"{h['time'][:10]}", "",
             f"- command: `{h['command']}`",
             f"- CPU: {h['cpu']}, {h['cores']} usable cores; {h['threads']} "
             f"thread{'s' if h['threads'] > 1 else ''} for "
             f"cylstm, its BLAS and torch ("
             + ("pools limited to that through cylstm.threads and threadpoolctl"
                if h.get("pools_limited") else "their defaults: nothing limited") + ")",
             f"- versions: Python {h['python']}, cylstm {h['cylstm']}, numpy {h['numpy']}, "
             f"torch {h['torch'] or 'absent'}"]
    lines += blas_lines(h["blas_kernels"], h["env"])
    lines += [f"- transparent huge pages: {h.get('thp') or 'unknown'}; NumPy's huge-page "
              f"hint: {h.get('numpy_hugepage_hint', 'on')}"]
    lines += [f"- char model: Embedding({h['vocab']}, {h['sizes']['embed']}) -> "
              f"LSTM({h['sizes']['embed']}, {h['sizes']['hidden']}) -> "
              f"Linear({h['sizes']['hidden']}, {h['vocab']}), Adam lr 2e-3, clip norm 1.0, "
              f"batches of {h['sizes']['batch']} windows of {h['sizes']['window']} "
              "characters of cylstm.text.default_text()",
              f"- classifier: LSTM({h['sizes']['cls_features']}, {h['sizes']['cls_hidden']}) "
              f"-> LastStep -> Linear({h['sizes']['cls_hidden']}, {h['sizes']['cls_classes']}),"
              f" lengths uniform in {h['sizes']['cls_lengths'][0]}.."
              f"{h['sizes']['cls_lengths'][1]}, batches of {h['sizes']['cls_batch']}; "
              "torch packs them (pack_padded_sequence)",
              f"- {h['sizes']['reps']} timed reps per figure after one untimed, cylstm and "
              "torch alternating; median [slowest-fastest rep]",
              f"- other load on the machine during the run: "
              f"{'unknown' if h.get('load') is None else format(h['load'], '.2f') + ' cores'}",
              f"- took {h.get('elapsed_s', 0):.0f} s", "", "## Throughput", ""]
    body = []
    for key, label in LABELS.items():
        v = res.get(key)
        if not v:
            continue
        c, t = v.get("cylstm"), v.get("torch")
        cell = lambda s: f"{_f(s['median'])} [{_f(s['lo'])}-{_f(s['hi'])}]" if s else "-"
        ratio = c["median"] / t["median"] if c and t else None
        load = res.get("load", {}).get(key)
        body.append([label, cell(c), cell(t), "-" if ratio is None else
                     (f"**{ratio:.2f}x**" if ratio < 1 else f"{ratio:.2f}x"),
                     "-" if load is None else f"{load:.2f}"])
    lines += table(["what", "cylstm", "torch", "cylstm / torch", "load"], body)
    lines += ["", "Ratios above 1: cylstm is faster (**bold**: slower). 'load': cores' worth "
              "of CPU other processes used while the figure was timed."]
    worst = max((v for v in res.get("load", {}).values() if v is not None), default=None)
    if worst is not None and worst > DISTURBED:
        lines += ["", f"**WARNING: other processes used up to {worst:.2f} cores during "
                  "this run.** With a second core taken, every 2-thread barrier (OpenMP, "
                  "OpenBLAS) waits for a descheduled worker, and libraries with many small "
                  "parallel regions per step (torch's per-operator OpenMP) lose far more "
                  "than the others: these ratios say little about an idle machine. Rerun "
                  "when the load column reads below ~0.2."]
    fl = {k: (res[k]["cylstm"].get("last_loss"), res[k].get("torch", {}).get("last_loss"))
          for k in ("fit_char", "fit_cls") if k in res}
    if fl:
        lines += ["", "Mean training loss of the last timed epoch (the same data and "
                     "starting weights; similar values say the loops do the same work): "
                     + "; ".join(f"{k} cylstm {_f(a)} torch {_f(b)}" for k, (a, b) in
                                 fl.items()) + "."]
    tr = res.get("train")
    if tr:
        lines += ["", "## python -m cylstm train", ""]
        if "error" in tr:
            lines.append(f"Did not run: {tr['error']}")
        else:
            lines += [f"`{tr['command']}`: **{tr['chars_per_s']:.0f} characters/s** "
                      f"({tr['train_chars']:,} training characters in {tr['trained_s']:.1f} s"
                      f" by its own 'trained in' line, which includes the validation pass; "
                      f"the whole command, imports and sample included, took "
                      f"{tr['wall_s']:.1f} s)."]
    tg = run.get("targets") or []
    if tg:
        n_met = sum(1 for t in tg if t["met"])
        done = [t for t in tg if t["met"] is not None]
        lines += ["", f"## Targets ({h['threads']} thread{'s' if h['threads'] > 1 else ''}; "
                  f"{n_met} of {len(done)} met)", ""]
        if h["threads"] != 2:
            lines += ["The targets are defined at 2 threads: not evaluated here.", ""]
        lines += table(["target", "wanted", "measured", "result", "load"],
                       [[t["what"], t["wanted"], "-" if t["value"] is None else
                         f"{t['value']:.2f}x", _verdict(t), "-" if t.get("load") is None
                         else f"{t['load']:.2f}"] for t in tg])
    return lines


def profile_markdown(p, h):
    lines = [f"# cylstm fit profile, {h['time'][:10]}", "",
             f"- command: `{h['command']}`",
             f"- {p['updates']} updates of the char model through `Sequential.fit`, "
             f"{h['threads']} threads; CPU {h['cpu']}"]
    lines += blas_lines(h["blas_kernels"], h["env"])
    lines += [f"- fit: **{p['fit_ms_per_update']:.1f} ms per update** without the profiler,"
              f" {p['profiled_ms_per_update']:.1f} ms under cProfile", "",
              "Inside fit: cProfile's cumulative time of the piece's calls, per update "
              "(the profiler adds a little per Python call). Alone: the same calls on one "
              "batch's shapes, timed without the profiler (median), times the calls per "
              "update. Inside well above alone means fit pays for something around the "
              "call (cold caches, a thread pool waking up, extra copies). After the "
              "LSTM: the same calls, each right after an untimed LSTM forward + backward "
              "on the batch (the LSTM's after the Linear's), the caches and thread team "
              "as inside fit: inside near that and well above alone is the price of what "
              "the LSTM leaves in the caches, not of the loop or a second thread pool.", ""]
    rows = [[r["piece"], f"{r['calls_per_update']:.0f}", f"{r['inside_ms']:.2f}",
             "-" if r["share"] is None else f"{100 * r['share']:.0f}%",
             f"{r['alone_ms']:.2f}",
             f"{r['inside_ms'] / r['alone_ms']:.2f}x" if r["alone_ms"] else "-",
             f"{r['after_lstm_ms']:.2f}" if "after_lstm_ms" in r else "-",
             f"{r['inside_ms'] / r['after_lstm_ms']:.2f}x" if r.get("after_lstm_ms") else "-"]
            for r in p["rows"]]
    rows.append(["everything else in fit (batching, copies, checks, metrics)", "",
                 f"{p['rest_ms']:.2f}", f"{100 * p['rest_ms'] / p['fit_ct_ms_per_update']:.0f}%"
                 if p["fit_ct_ms_per_update"] else "-", "", "", "", ""])
    lines += table(["piece", "calls/update", "inside fit ms", "% of fit", "alone ms",
                    "inside / alone", "after the LSTM ms", "inside / after"], rows)
    lines += ["", "Functions with the most own time (ms per update):", ""]
    lines += table(["function", "own ms", "cumulative ms", "calls/update"],
                   [[t["function"], f"{t['own_ms']:.2f}", f"{t['cum_ms']:.2f}",
                     f"{t['calls_per_update']:.1f}"] for t in p["top"]])
    return lines


def inference_profile_markdown(p, h):
    w = p["what"]
    lines = [f"# cylstm {w} profile, {h['time'][:10]}", "",
             f"- command: `{h['command']}`",
             f"- `Sequential.{w}` of the char model on {p['windows']} windows of "
             f"{h['sizes']['window']} characters, batches of {p['batch']}, {h['threads']} "
             f"threads; CPU {h['cpu']}; other load {_f(h.get('load'))} cores"]
    lines += blas_lines(h["blas_kernels"], h["env"])
    t = p["torch_ms_per_batch"]
    lines += [f"- {w}: **{p['ms_per_batch']:.1f} ms per batch** without the profiler"
              + (f"; torch's loop {t:.1f} ms (cylstm / torch speed "
                 f"{t / p['ms_per_batch']:.2f}x)" if t else "")
              + f"; {p['profiled_ms_per_batch']:.1f} ms under cProfile"]
    la = p.get("lstm_alone") or {}
    if la:
        lines += [f"- the Embedding and the LSTM alone at these shapes (LSTM.forward_batch "
                  f"on the ids, eval mode): cylstm {la['cylstm']:.1f} ms"
                  + (f", torch nn.Embedding + nn.LSTM {la['torch']:.1f} ms (cylstm / torch speed "
                     f"{la['torch'] / la['cylstm']:.2f}x)" if "torch" in la else "")]
    lines += ["", f"Per batch. Inside: cProfile's cumulative time of the piece's calls in "
              f"{w}. Alone: the same calls on one batch's shapes without the profiler "
              "(median). torch: its module doing the same piece at the same shapes under "
              "inference_mode (nn.LSTM for both LSTM rows).", ""]
    rows = [[r["piece"], f"{r['calls_per_batch']:.3g}", f"{r['inside_ms']:.2f}",
             "-" if r["share"] is None else f"{100 * r['share']:.0f}%",
             "-" if r["alone_ms"] is None else f"{r['alone_ms']:.2f}",
             f"{r['inside_ms'] / r['alone_ms']:.2f}x" if r["alone_ms"] else "-",
             "-" if r["torch_ms"] is None else f"{r['torch_ms']:.2f}"]
            for r in p["rows"]]
    rows.append([f"everything else in {w} (batching, output assembly, copies, checks)", "",
                 f"{p['rest_ms']:.2f}", f"{100 * p['rest_ms'] / p['top_ct_ms_per_batch']:.0f}%"
                 if p["top_ct_ms_per_batch"] else "-", "", "", ""])
    lines += table(["piece", "calls/batch", f"inside {w} ms", f"% of {w}", "alone ms",
                    "inside / alone", "torch alone ms"], rows)
    lines += ["", "Functions with the most own time (ms per batch):", ""]
    lines += table(["function", "own ms", "cumulative ms", "calls/batch"],
                   [[t["function"], f"{t['own_ms']:.2f}", f"{t['cum_ms']:.2f}",
                     f"{t['calls_per_update']:.1f}"] for t in p["top"]])
    return lines


def any_profile_markdown(r):
    if "profile" in r:
        return profile_markdown(r["profile"], r["header"])
    return inference_profile_markdown(r["inference_profile"], r["header"])


# ---- the run --------------------------------------------------------------------------------

def _load():
    try:
        with open("/proc/stat") as f:
            v = [int(a) for a in f.readline().split()[1:]]
        return sum(v[:3]) + sum(v[5:8]), os.times(), time.perf_counter()
    except (OSError, ValueError):
        return None


def _other_load(t0, t1):
    """Cores' worth of CPU that other processes used between two _load() readings."""
    if t0 is None or t1 is None:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    own = (t1[1].user + t1[1].system + t1[1].children_user + t1[1].children_system) - \
        (t0[1].user + t0[1].system + t0[1].children_user + t0[1].children_system)
    return max(0.0, ((t1[0] - t0[0]) / hz - own) / (t1[2] - t0[2]))


def header(args, sz, torch):
    from machine import cpu_info, usable_cores
    model, flags = cpu_info()
    return {"type": "header",
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python"] + sys.argv), "quick": args.quick,
            "smoke": args.smoke, "threads": args.threads,
            "cpu": f"{model} ({', '.join(flags)})", "cores": usable_cores(),
            "python": platform.python_version(), "cylstm": cylstm.__version__,
            "cylstm_path": os.path.dirname(cylstm.__file__), "numpy": np.__version__,
            "torch": torch.__version__ if torch else None, "sizes": sz._asdict(),
            "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                                   "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
            "blas_kernels": blas_kernels(), "thp": _thp_mode(),
            "numpy_hugepage_hint": "on" if args.numpy_hugepages else
            "off during cylstm's loops (cylstm._threads.loop_hold)"}


def _thp_mode():
    """The kernel's transparent huge page mode (the bracketed word), or None."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
        return text[text.index("[") + 1:text.index("]")]
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def pools_at(n):
    """cylstm's and the BLAS libraries' thread pools at n threads. Where they already
    are (n = the usable cores, the defaults) nothing is touched, so the run is what a
    user's is; yields whether any pool had to be limited."""
    from threadpoolctl import threadpool_info, threadpool_limits

    blas = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    if cylstm.get_num_threads() == n and all(k == n for k in blas):
        yield False
        return
    with cylstm.threads(n), threadpool_limits(n, user_api="blas"):
        yield True


def run_here(args, log):
    """Every measurement in this process; returns the run's record."""
    sz = SMOKE if args.smoke else QUICK if args.quick else FULL
    torch = None
    if not args.no_torch and importlib.util.find_spec("torch"):
        import torch
        torch.set_num_threads(args.threads)
    h = header(args, sz, torch)
    t0, w0 = _load(), time.perf_counter()
    results = {}
    with pools_at(args.threads) as limited:
        h["pools_limited"] = limited
        if args.profile:
            key, p = ("profile", profile_fit(sz, args.threads, log)) if args.profile == "fit" \
                else ("inference_profile",
                      profile_inference(sz, args.threads, log, torch, args.profile))
            h.update(elapsed_s=time.perf_counter() - w0, load=_other_load(t0, _load()),
                     vocab=None)
            return {"header": h, key: p}
        fit, models = measure_fit(sz, torch, args.threads, log)
        results.update(fit)
        results.update(measure_inference(sz, torch, models, log))
    if not args.no_train:
        results["train"] = measure_train_cli(sz, args.threads, log)
    results["load"] = dict(LOADS)
    h.update(elapsed_s=time.perf_counter() - w0, load=_other_load(t0, _load()),
             vocab=models[2].size)
    return {"header": h, "results": results,
            "targets": evaluate_targets(results, args.threads) if torch else []}


def child_env(name):
    env = dict(os.environ)
    for k, v in (BLAS_ENVS[name] or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def run_children(argv, envs, log):
    """This script once per BLAS environment, each in a child process given the same
    options but --blas-env; their records."""
    runs = {}
    passed, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--blas-env":
            skip = True                               # and its value
        elif not a.startswith("--blas-env="):
            passed.append(a)
    for name in envs:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "run.json")
            cmd = [sys.executable, os.path.abspath(__file__)] + passed + \
                ["--out", "", "--record", path]
            log(f"--- BLAS environment '{name}': {BLAS_ENVS[name] or 'as this process has'}")
            p = subprocess.run(cmd, env=child_env(name), stdout=subprocess.DEVNULL)
            if p.returncode != 0 or not os.path.exists(path):
                runs[name] = {"error": f"child exited with {p.returncode}"}
                continue
            with open(path) as f:
                runs[name] = json.load(f)
    return runs


def compare_markdown(runs):
    """One table: each figure's cylstm and torch value and ratio per BLAS environment."""
    names = list(runs)
    lines = ["", "# BLAS environments compared", ""]
    for name, r in runs.items():
        if "error" in r:
            lines.append(f"- {name}: {r['error']}")
        else:
            lines += [f"- {name}:"] + ["  " + s for s in blas_lines(
                r["header"]["blas_kernels"], r["header"]["env"])]
    head = ["what"] + [f"{n}: cylstm / torch (ratio)" for n in names]
    body = []
    for key, label in LABELS.items():
        row = [label]
        for n in names:
            v = runs[n].get("results", {}).get(key)
            if not v:
                row.append("-")
                continue
            c, t = v.get("cylstm"), v.get("torch")
            row.append(f"{_f(c['median'])} / {_f(t['median'])} ({c['median'] / t['median']:.2f}x)"
                       if c and t else _f(c["median"]) if c else "-")
        body.append(row)
    row = ["python -m cylstm train (characters/s)"]
    for n in names:
        tr = runs[n].get("results", {}).get("train") or {}
        row.append(_f(tr.get("chars_per_s")) if "chars_per_s" in tr else "-")
    body.append(row)
    return lines + [""] + table(head, body)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python bench/e2e.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer and shorter reps (~1-2 min)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny models and data: every code path in seconds, figures "
                        "meaningless (for the tests)")
    p.add_argument("--threads", type=int, default=2,
                   help="threads for cylstm, the BLAS libraries and torch (default 2; the "
                        "targets are defined at 2)")
    p.add_argument("--profile", nargs="?", const="fit", default=None,
                   choices=("fit", "predict", "evaluate"),
                   help="only a profile of the char model, by piece: ~100 fit updates "
                        "(fit, the default), or predict / evaluate (batches of 256, each "
                        "piece also alone and beside torch's)")
    p.add_argument("--blas-env", default="as-is", metavar="LIST",
                   help="comma-separated OpenBLAS environments, each run in a child "
                        f"process: {', '.join(BLAS_ENVS)} (haswell: OPENBLAS_CORETYPE="
                        "Haswell OPENBLAS_L2_SIZE=512; unset: neither variable), or 'all'. "
                        "Default: as-is, in this process")
    p.add_argument("--numpy-hugepages", action="store_true",
                   help="leave NumPy's huge-page hint on during cylstm's fit/predict/... "
                        "(cylstm._threads.numpy_hugepage_hint_off disabled), to compare")
    p.add_argument("--no-torch", action="store_true", help="cylstm only")
    p.add_argument("--no-train", action="store_true",
                   help="skip the `python -m cylstm train` subprocess")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help=f"where e2e.md and e2e.jsonl go (default: {DEFAULT_OUT}); '' for "
                        "nowhere")
    p.add_argument("--record", default="", help=argparse.SUPPRESS)   # a child's record
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    if args.numpy_hugepages:
        cylstm._threads._HugePageHintHold.enabled = False
    if args.threads < 1:
        p.error("--threads must be >= 1")
    envs = list(BLAS_ENVS) if args.blas_env == "all" else \
        [s.strip() for s in args.blas_env.split(",") if s.strip()]
    bad = [e for e in envs if e not in BLAS_ENVS]
    if bad or not envs:
        p.error(f"--blas-env: unknown {bad or args.blas_env!r}; choose from "
                f"{', '.join(BLAS_ENVS)} or all")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    if envs != ["as-is"]:
        runs = run_children(argv, envs, log)
        lines = []
        for name, r in runs.items():
            if "error" not in r:
                lines += ["", f"## BLAS environment '{name}'", ""] + \
                    (any_profile_markdown(r) if args.profile else markdown(r))
        if not args.profile:
            lines += compare_markdown(runs)
        records = [dict(r, type="run", blas_env=k) for k, r in runs.items()]
        failed = any("error" in r for r in runs.values())
    else:
        run = run_here(args, log)
        if args.record:
            with open(args.record, "w") as f:
                json.dump(run, f)
        lines = any_profile_markdown(run) if args.profile else markdown(run)
        records = [dict(run, type="run", blas_env="as-is")]
        failed = False
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = "e2e" if not args.profile else "e2e_profile" if args.profile == "fit" \
            else f"e2e_profile_{args.profile}"
        with open(os.path.join(args.out, stem + ".md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(os.path.join(args.out, stem + ".jsonl"), "w") as f:
            for r in records:
                f.write(json.dumps(r, default=str) + "\n")
        print(f"\nReport: {os.path.join(args.out, stem + '.md')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
