"""The project's speed targets, each evaluated as MET or MISSED from one run's cells."""

import numpy as np

from cases import CONFIGS, TASKS, Case, flops
from problem import lengths_for


class Results:
    """Medians by (case, task, threads, impl), and ratios peer / cylstm."""

    def __init__(self, rows):
        self.rows = {(r["case"], r["task"], r["threads"]): r for r in rows}
        self.read = set()        # cells read since the last take_load()

    def ms(self, case, task, n, impl="cylstm"):
        self.read.add((case, task, n))
        s = self.rows.get((case, task, n), {"stats": {}})["stats"].get(impl)
        return None if s is None else s["median_ms"]

    def ratio(self, case, task, n, peer):
        """peer median / cylstm median (> 1: cylstm faster); peer 'torch' is the faster
        of torch's two paths."""
        paths = ("torch", "torch-native") if peer == "torch" else (peer,)
        times = [t for t in (self.ms(case, task, n, p) for p in paths) if t]
        c = self.ms(case, task, n)
        return min(times) / c if times and c else None

    def take_load(self):
        """The largest other load of the cells read since the last call (None: unknown)."""
        loads = [self.rows[k]["load"] for k in self.read if k in self.rows]
        self.read = set()
        return max((x for x in loads if x is not None), default=None)


def evaluate_targets(rows, peak, cases, thread_counts):
    """The targets (docs/benchmarking.md) that this run's cells can evaluate:
    [{what, wanted, measured, met}], met None when a cell it needs was not measured."""
    res = Results(rows)
    n = 2 if 2 in thread_counts else max(thread_counts)
    out = []

    def add(what, wanted, value, ok, fmt="{:.2f}x"):
        out.append({"what": what, "wanted": wanted, "threads": n, "load": res.take_load(),
                    "measured": None if value is None else fmt.format(value),
                    "value": value, "met": None if value is None else bool(ok(value))})

    def at_least(what, need, value):
        add(what, f">= {need:g}x", value, lambda v: v >= need)

    for cfg, need in (("tiny", 3), ("small", 1.25), ("medium", 1.25), ("large", 1.1),
                      ("charrnn", 1.25)):
        at_least(f"training vs torch, {cfg}", need, res.ratio(cfg, "training", n, "torch"))
    for cfg in CONFIGS:
        need = 1.2 if cfg == "small" else 1.0
        at_least(f"inference vs ONNX Runtime, {cfg}", need,
                 res.ratio(cfg, "inference", n, "onnxruntime"))
    for cfg, need in (("tiny", 3), ("medium", 1.2), ("large", 1.2), ("charrnn", 1.2)):
        at_least(f"inference vs torch, {cfg}", need, res.ratio(cfg, "inference", n, "torch"))
    step = res.ms("step", "inference", n)
    add("streaming step (B=1, H=256)", "<= 10 us", None if step is None else step * 1e3,
        lambda v: v <= 10, "{:.1f} us")
    for cfg, need in (("tiny", 5), ("small", 5), ("medium", 2), ("large", 2)):
        for task in TASKS:
            at_least(f"vs NumPy reference, {cfg} {task}", need,
                     res.ratio(cfg, task, n, "reference"))
    for task, need in (("inference", 0.85), ("training", 0.75)):
        c = res.ms("large", task, n)
        v = None if c is None or n not in peak else \
            flops(Case("large"), task) / (c * 1e-3) / 1e9 / peak[n]
        add(f"efficiency, large {task}", f">= {need:.0%} of sgemm peak", v,
            lambda v, need=need: v >= need, "{:.0%}")
    for case in (c for c in cases if c.variant == "float64"):
        at_least(f"float64 training vs torch, {case.config}", 2,
                 res.ratio(case.name, "training", n, "torch"))
    for case in (c for c in cases if c.variant == "varlen"):
        _varlen_targets(res, case, n, add, at_least)
    if 1 in thread_counts and 2 in thread_counts:
        for cfg in ("medium", "large"):
            c1, c2 = res.ms(cfg, "training", 1), res.ms(cfg, "training", 2)
            at_least(f"2 threads vs 1, {cfg} training", 1.8, c1 / c2 if c1 and c2 else None)
    for case in (c for c in cases if c.variant in ("bidir", "proj")):
        for task in TASKS:
            at_least(f"{case.variant} {task} vs torch, {case.config}", 1.25,
                     res.ratio(case.name, task, n, "torch"))
    return out


def _varlen_targets(res, case, n, add, at_least):
    """Variable lengths cost at most the valid steps' share of the full-length time, plus
    10% (read as: t_varlen / t_full <= share * 1.1; t_full from the same cell, the same
    data at lengths=None, interleaved), and beat torch's packed path 3x."""
    lengths = lengths_for(case)                     # same seed: the lengths that were timed
    share = float(np.sum(lengths)) / (case.cfg.B * case.cfg.T)
    for task in TASKS:
        full, var = res.ms(case.name, task, n, "cylstm-full"), res.ms(case.name, task, n)
        add(f"varlen {task} cost vs full length, {case.config} (valid share {share:.0%})",
            f"<= {share * 1.1:.0%} of full", var / full if var and full else None,
            lambda v: v <= share * 1.1, "{:.0%}")
        at_least(f"varlen {task} vs torch packed, {case.config}", 3,
                 res.ratio(case.name, task, n, "torch"))


