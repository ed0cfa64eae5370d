"""The report: JSON lines as they come, the markdown report, and the PNG chart."""

import importlib.util
import json
import math
import os
import sys

import numpy as np

import cases
from peers import IMPLS, PEERS
from targets import Results


def blas_line(header):
    """Which BLAS kernel family each library picked (threadpoolctl's 'architecture')."""
    kernels = header.get("blas_kernels") or []
    if not kernels:
        return "BLAS kernels: threadpoolctl sees no BLAS library"
    env = header.get("env", {})
    forced = ", ".join(f"{k}={env[k]}" for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
                       if k in env) or "OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE unset"
    return "BLAS kernels: " + "; ".join(
        f"{k['owner']} {k['internal_api']} {k.get('version') or ''} "
        f"{k.get('architecture') or '?'}" for k in kernels) + f" ({forced})"


class Sink:
    """JSON lines to a file (written as they come); kept for printing with --json -."""

    def __init__(self, path):
        self.lines = []
        self._f = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._f = open(path, "w")

    def write(self, record):
        line = json.dumps(record, default=_json_default)
        self.lines.append(line)
        if self._f:
            self._f.write(line + "\n")
            self._f.flush()

    def close(self):
        if self._f:
            self._f.close()


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def fmt(v):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    if v >= 0.1:
        return f"{v:.3f}"
    return f"{v:.4f}"


def fmt_ms(s):
    return f"{fmt(s['median_ms'])} [{fmt(s['p25_ms'])}-{fmt(s['p75_ms'])}]"


def fmt_ratio(v):
    """A ratio peer/cylstm, bold when cylstm is the slower one."""
    return "-" if v is None else (f"**{v:.2f}x**" if v < 1 else f"{v:.2f}x")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def table(head, rows):
    """Markdown table lines."""
    return ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)] + \
        ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


# ---- the report -----------------------------------------------------------------------------

def markdown(args, header, mode, peers, peak, peak_end, best, verification, rows, skipped_impls,
            torch_paths, memory, targets, elapsed, files):
    """The markdown report, as lines."""
    v = header["versions"]
    lines = [f"# cylstm {v['cylstm']} benchmark{' (quick)' if args.quick else ''}, "
             f"{header['time'][:10]}", ""]
    lines += [f"- command: `{header['command']}`",
              f"- CPU: {header['cpu_model']} ({', '.join(header['cpu_flags'])}), "
              f"{header['usable_cores']} usable cores; OpenMP "
              f"{'on' if header['openmp_enabled'] else 'OFF'}, N_PARTS {header['N_PARTS']}",
              "- versions: Python " + header["python"] + ", " + ", ".join(
                  f"{k} {x or 'absent'}" for k, x in v.items()),
              "- thread pools (threadpoolctl): " + "; ".join(
                  f"{i['internal_api']} {i.get('version') or ''} "
                  f"({os.path.basename(i['filepath'])}, {i['num_threads']} threads)"
                  for i in header["threadpool_info"]),
              "- " + blas_line(header),
              "- sgemm peak (best GFLOP/s over sizes "
              + "/".join(str(s) for s in cases.GEMM_SIZES) + ", SciPy's and NumPy's BLAS, "
              "every rep; start / end): " + "; ".join(
                  f"{n} thread{'s' if n > 1 else ''} {peak[n]:.0f} / {peak_end[n]:.0f} GFLOP/s"
                  for n in peak) + "; % of peak below uses the larger",
              f"- took {elapsed:.0f} s"]
    if any(abs(peak_end[n] - peak[n]) > 0.1 * peak[n] for n in peak):
        lines.append("- WARNING: the sgemm peak moved by more than 10% during the run: "
                     "the machine was busy")
    lines += _notes(peers, skipped_impls, torch_paths)
    lines += _verification_lines(verification, peers)
    lines += _timing_lines(rows, peers, best)
    lines += _memory_lines(memory, peers, max(args.threads))
    lines += _target_lines(targets)
    return lines


def _notes(peers, skipped_impls, torch_paths):
    """Peers that did not run, by reason, and which path torch's default took."""
    why = {}
    for case, skipped in skipped_impls.items():
        for impl, reason in skipped.items():
            why.setdefault((impl, reason), []).append(case)
    lines = ["", "Skipped:" if why else "No implementation was skipped."]
    lines += [f"- {impl} on {', '.join(cases)}: {reason}" for (impl, reason), cases in why.items()]
    missing = [p for p in PEERS if p not in peers]
    if missing:
        lines.append(f"- not asked for (--peers): {', '.join(missing)}")
    if torch_paths:
        on = [c for c, t in torch_paths.items() if all(t.values())]
        off = [c for c, t in torch_paths.items() if not any(t.values())]
        lines.append(f"\ntorch's default path, seen by torch.profiler (aten::mkldnn_rnn_layer):"
                     f" oneDNN on {', '.join(on) or 'none'}; native on {', '.join(off) or 'none'}"
                     " (there 'torch native' is not timed separately).")
    return lines


def _verification_lines(verification, peers):
    """One row per case: each implementation's worst error over tasks and threads."""
    impls = ["cylstm"] + peers
    worst = {}
    for case, Tv, impl, n, task, r in verification:
        w = worst.setdefault((case, Tv), {})
        prev = w.get(impl)            # the first failure, else the largest error
        if prev is None or (prev["ok"] and (not r["ok"] or r["max_rel_err"] > prev["max_rel_err"])):
            w[impl] = dict(r, task=task)

    def cell(r):
        if r is None:
            return "-"
        e = f"{r['max_rel_err']:.1e}"
        return e if r["ok"] else f"**FAILED {r['worst']} {e} ({r['task']})**"
    rows = [[case, Tv] + [cell(w.get(i)) for i in impls] for (case, Tv), w in worst.items()]
    return ["", "## Verification", "",
            "Worst max|a - b| / max magnitude over every output and gradient, tasks and "
            "thread counts, against the float64 NumPy reference on the same weights "
            "(tolerance 1e-4 float32, 1e-9 float64; what fails is not timed).", ""] + \
        table(["case", "T checked"] + [IMPLS[i].label for i in impls], rows)


def _timing_lines(rows, peers, peak):
    head = ["case", "task", "thr", "cylstm ms [p25-p75]", "GFLOP/s", "% peak"]
    for p in peers:
        head += [f"{IMPLS[p].label} ms", f"x {IMPLS[p].label}"]
    head.append("load")
    body = []
    for r in rows:
        c = r["stats"].get("cylstm")
        gf = None if c is None else r["flops"] / (c["median_ms"] * 1e-3) / 1e9
        line = [r["case"], r["task"], r["threads"], fmt_ms(c) if c else _short(
                    r["skipped"].get("cylstm", "not timed")),
                fmt(gf), "-" if gf is None else f"{100 * gf / peak[r['threads']]:.0f}%"]
        for p in peers:
            s = r["stats"].get(p)
            line += [fmt_ms(s) if s else _short(r["skipped"].get(p)),
                     fmt_ratio(s["median_ms"] / c["median_ms"]) if s and c else "-"]
        line.append("-" if r["load"] is None else f"{r['load']:.2f}")
        body.append(line)
    over = any(r["stats"].get("cylstm") and r["flops"] / r["stats"]["cylstm"]["median_ms"]
               / 1e6 > peak[r["threads"]] for r in rows)
    return ["", "## Timings", "",
            "Median ms [p25-p75] of individually timed calls, interleaved in one run. "
            "'x peer' = peer median / cylstm median: above 1 cylstm is faster; **bold** "
            "where it is slower. GFLOP/s at cylstm's median (valid steps only), % of the "
            "same-thread sgemm peak. 'load': cores' worth of CPU other processes used "
            "during the cell (above ~0.2 the cell is disturbed). '-': not run (see Skipped); "
            "'= torch path': torch's default path is the native one here; 'not timed': one "
            "warm-up call took longer than the limit (a busy machine).",
            ""] + table(head, body) + (
        ["", "Some cells exceed 100% of the sgemm peak, which is the best of several sizes, "
         "both BLAS routes and every rep of this run: read those cells as disturbed "
         "measurements (see their load), not as speed above the machine's."] if over else [])


def _short(why):
    """A table cell for a peer not timed in a cell ('-': not run in this case at all)."""
    if why is None:
        return "-"
    if why.startswith("one call took"):
        return "not timed: " + why[len("one call took "):].split(" >")[0] + "/call"
    if why.startswith("same code as torch"):
        return "= torch path"
    return "**" + why + "**"


def _memory_lines(memory, peers, n):
    if not memory:
        return []
    impls = ["cylstm"] + [p for p in peers if IMPLS[p].training]
    body = []
    for case, res in memory:
        c = res.get("cylstm")
        line = [case]
        for i in impls:
            v = res.get(i)
            if not isinstance(v, int):
                line.append("-" if v is None else v)
                continue
            line.append(f"{v / 2**20:.1f}" + (f" ({v / c:.2f}x)" if isinstance(c, int) and
                                                c > 0 and i != "cylstm" else ""))
        body.append(line)
    return ["", "## Peak memory of a training step (MiB)", "",
            f"First training step of a fresh model, each in a fresh process, {n} threads: "
            "peak RSS during the step (VmHWM, reset through /proc/self/clear_refs) minus "
            "RSS before it; includes workspaces and gradient buffers first touched by the "
            "step (inputs and weights are not counted). In brackets: peer / cylstm.",
            ""] + table(["case"] + [IMPLS[i].label for i in impls], body)


def _target_lines(targets):
    done = [t for t in targets if t["met"] is not None]
    missing = [t["what"] for t in targets if t["met"] is None]
    met = sum(t["met"] for t in done)
    lines = ["", f"## Targets (docs/benchmarking.md; {done[0]['threads'] if done else 2} threads; "
             f"{met} of {len(done)} met)", "",
             "'vs torch' is against the faster of torch's two paths. Ratios > 1: cylstm "
             "faster. 'load': the largest other load of the cells the figure comes from "
             "(above ~0.2 a verdict says little).", ""]
    lines += table(["target", "wanted", "measured", "result", "load"],
                    [[t["what"], t["wanted"], t["measured"], "MET" if t["met"] else
                      "**MISSED**", "-" if t["load"] is None else f"{t['load']:.2f}"]
                     for t in done])
    if missing:
        lines += ["", "Not measured in this run: " + "; ".join(missing) + "."]
    return lines


def chart(rows, peers, path):
    """Grouped bars of peer time / cylstm time per (case, task), log scale, one panel per
    thread count. Returns None, or why no chart was drawn."""
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib is not installed"
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({r["threads"] for r in rows})
    if not rows or not peers:
        return "nothing to compare"
    per_panel = {n: list(dict.fromkeys((r["case"], r["task"]) for r in rows
                                       if r["threads"] == n)) for n in counts}
    res = Results(rows)
    most = max(len(c) for c in per_panel.values())
    fig, axes = plt.subplots(len(counts), 1, figsize=(max(8, 0.55 * most + 2),
                                                      4.2 * len(counts)), squeeze=False)
    width = 0.8 / len(peers)
    for ax, n in zip(axes[:, 0], counts):
        cells = per_panel[n]
        for k, p in enumerate(peers):
            xs, ys = [], []
            for j, (case, task) in enumerate(cells):
                s, c = res.ms(case, task, n, p), res.ms(case, task, n)
                if s and c:
                    xs.append(j + (k - (len(peers) - 1) / 2) * width)
                    ys.append(s / c)
            ax.bar(xs, ys, width, label=IMPLS[p].label)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylabel("peer time / cylstm time")
        ax.set_title(f"{n} thread{'s' if n > 1 else ''}: above 1, cylstm is faster")
        ax.set_xticks(range(len(cells)))
        ax.set_xticklabels([f"{c}\n{'train' if t == 'training' else 'infer'}"
                            for c, t in cells], fontsize=7, rotation=60)
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


