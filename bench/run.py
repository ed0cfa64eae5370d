"""Verify, then time cylstm against its NumPy reference, torch.nn.LSTM and ONNX Runtime.

    pip install .                  # from the repository root: the benchmark runs the
    python bench/run.py --quick    # INSTALLED cylstm; ~2 min on 2 idle cores
    python bench/run.py            # every case

docs/benchmarking.md says what is measured, how, and what every column means.

1. Cases: the configurations in bench/cases.py in float32, plus variants (float64,
   variable lengths, bidirectional, projection); tasks: inference, and a training step
   (forward + backward of a fixed dy, gradients accumulated, no optimiser); ``step`` is
   one streaming step with the state carried from call to call.
2. Implementations (bench/peer_*.py): cylstm, the NumPy reference, and, when installed,
   torch's default path (oneDNN for float32 on x86), torch's native path and ONNX
   Runtime's LSTM operator. An absent peer is skipped with a note.
3. Verify before timing, against a float64 run of the reference on the same weights;
   what fails is not timed and the exit status is 1.
4. Time interleaved in one run, at each thread count, in blocks A B C ... C B A so that
   drift cancels in the ratios; median, p25-p75, GFLOP/s and its fraction of the run's
   sgemm peak (the best over several sizes, both BLAS routes and every rep).
5. Peak memory of a training step, each in a fresh process (bench/memprobe.py).
6. Report: markdown (stdout and <out>/latest.md), JSON lines (<out>/latest.jsonl), a PNG
   chart (<out>/latest.png, needs matplotlib), and the targets, each MET or MISSED.
   <out> is --out, by default bench/results/ next to this script, whatever the
   current folder.
"""

import argparse
import importlib.util
import os
import sys
import time

import numpy as np

import cases
from cases import Case, flops
from machine import LoadMeter, all_threads, make_header
from memprobe import measure_memory
from peers import IMPLS, PEERS, build_impls, verify_case
from problem import make_problem
from report import Sink, chart, fmt, log, markdown
from targets import evaluate_targets
from timing import gemm_peak, measure, summarize

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results")


def add_arguments(p, default_json="", default_out=DEFAULT_OUT):
    """The options. default_json: where JSON lines go unless --json says ('' or '-':
    <out>/latest.jsonl, and '-' also prints them after the report)."""
    p.add_argument("--quick", action="store_true",
                   help="~0.3 s of timed reps per implementation and cell instead of ~1 s, "
                        f"configurations {','.join(cases.QUICK.configs)} and the variants on "
                        f"{','.join(cases.QUICK.variant_configs)} at the largest thread count "
                        "(about 2 minutes on 2 idle cores)")
    p.add_argument("--configs", default=None,
                   help=f"comma-separated subset of {','.join(cases.CONFIGS)} run in float32 "
                        "(default: all; --quick: " + ",".join(cases.QUICK.configs) + ")")
    p.add_argument("--variants", default=",".join(cases.VARIANTS),
                   help=f"comma-separated subset of {','.join(cases.VARIANTS)}, or 'none' "
                        "(default: all)")
    p.add_argument("--variant-configs", default=None,
                   help="configurations the variants run on (default: "
                        f"{','.join(cases.FULL.variant_configs)}; --quick: "
                        f"{','.join(cases.QUICK.variant_configs)})")
    p.add_argument("--threads", default="1,2",
                   help="comma-separated thread counts (default: 1,2)")
    p.add_argument("--tasks", default=",".join(cases.TASKS),
                   help="comma-separated subset of inference,training (default: both)")
    p.add_argument("--peers", default=",".join(PEERS),
                   help=f"comma-separated subset of {','.join(PEERS)}, or 'none' "
                        "(default: all; absent ones are skipped with a note)")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the peak-memory measurement (subprocesses)")
    p.add_argument("--no-chart", dest="chart", action="store_false", help="no PNG chart")
    p.add_argument("--out", default=default_out, metavar="DIR",
                   help="directory for latest.md, latest.jsonl, latest.png "
                        f"(default: {default_out}); '' writes no files")
    p.add_argument("--json", default=default_json, metavar="PATH",
                   help="JSON lines to PATH instead of <out>/latest.jsonl; '-' also prints "
                        "them to stdout after the report")
    return p


def parse_list(text, allowed, what, empty_ok=False):
    if empty_ok and text.strip() == "none":
        return []
    items = list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise SystemExit(f"--{what}: unknown {bad or text!r}; choose from {','.join(allowed)}")
    return items


def parse_threads(text):
    try:
        out = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise SystemExit(f"--threads: expected positive integers like 1,2, got {text!r}")
    return out


def select_cases(args, mode):
    """Cases in run order: the float32 configurations, then each variant per config."""
    configs = parse_list(args.configs or ",".join(mode.configs), list(cases.CONFIGS), "configs")
    variants = parse_list(args.variants, list(cases.VARIANTS), "variants", empty_ok=True)
    vconfigs = parse_list(args.variant_configs or ",".join(mode.variant_configs),
                           [k for k, c in cases.CONFIGS.items() if not c.state], "variant-configs")
    return [Case(c) for c in configs] + [Case(c, v) for c in vconfigs for v in variants]


def time_cell(case, task, n, impls, data, mode, sink, peak, verified):
    """Time every verified implementation of one (case, task, threads) cell."""
    names = [k for k, impl in impls.items() if (task == "inference" or impl.training)
             and verified.get((impl.verified_by or k, task), False)]
    skipped = {k: "failed verification" for k, impl in impls.items()
               if k not in names and (task == "inference" or impl.training)}
    torch_impl = impls.get("torch")
    if "torch-native" in names and torch_impl and not torch_impl.uses_onednn.get(task, True):
        names.remove("torch-native")        # the default path is already the native one
        skipped["torch-native"] = "same code as torch here (the profiler saw no oneDNN)"
    meter, t0 = LoadMeter(), time.perf_counter()
    with all_threads(n):
        fns = {k: impls[k].call(task, n, data) for k in names}
        times, rounds, slow = measure(fns, n, mode)
    load = meter.cores()
    skipped.update({k: f"one call took {t:.1f} s > {mode.max_call:g} s" for k, t in slow.items()})
    stats = {k: summarize(v) for k, v in times.items()}
    fl = flops(case, task, data.lengths)
    cyl = stats.get("cylstm")
    for k, s in stats.items():
        gf = fl / (s["median_ms"] * 1e-3) / 1e9
        rec = {"type": "timing", "case": case.name, "config": case.config,
               "variant": case.variant, "task": task, "impl": k, "threads": n,
               "dtype": str(case.dtype), **s, "flops": fl, "gflops": gf,
               "gemm_peak_gflops": peak[n], "fraction_of_peak": gf / peak[n],
               "rounds": rounds, "foreign_load_cores": load}
        if cyl and k != "cylstm":
            rec["ratio_peer_over_cylstm"] = s["median_ms"] / cyl["median_ms"]
        sink.write(rec)
    for k, why in skipped.items():
        sink.write({"type": "timing", "case": case.name, "task": task, "impl": k,
                    "threads": n, "skipped": why})
    row = {"case": case.name, "task": task, "threads": n, "stats": stats, "load": load,
           "skipped": skipped, "flops": fl}
    log(f"[{case.name} {task} {n}t] " + ", ".join(
        f"{k} {fmt(s['median_ms'])} ms" for k, s in stats.items())
        + ("" if load is None else f" (other load {load:.2f} cores)")
        + f" [{time.perf_counter() - t0:.1f} s]")
    return row


def run(args):
    """Run the benchmark described by parsed ``args``; returns the exit status."""
    mode = cases.QUICK if args.quick else cases.FULL
    case_list = select_cases(args, mode)
    args.tasks = parse_list(args.tasks, cases.TASKS, "tasks")
    args.threads = parse_threads(args.threads)
    peers = parse_list(args.peers, list(PEERS), "peers", empty_ok=True)
    out = args.out or ""
    files = {k: os.path.join(out, "latest." + k) for k in ("md", "jsonl", "png")} if out else {}
    if out:
        os.makedirs(out, exist_ok=True)
    json_path = args.json if args.json not in ("", "-") else files.get("jsonl")
    t_start = time.perf_counter()

    for m in ("torch", "onnxruntime"):             # import the peers before the header
        if any(IMPLS[p].needs == m for p in peers) and importlib.util.find_spec(m):
            __import__(m)
    sink = Sink(json_path)
    header = make_header(args, mode)
    sink.write(header)
    log(f"cylstm bench ({'quick' if args.quick else 'full'}): {len(case_list)} cases, "
         f"threads {args.threads}, peers {peers or 'none'}; CPU {header['cpu_model']}, "
         f"{header['usable_cores']} usable cores")

    peak = gemm_peaks(args.threads, mode, sink, "start")
    verification, rows, skipped_impls, torch_paths, failed = [], [], {}, {}, False
    for case in case_list:
        prob = make_problem(case)
        impls, skipped_impls[case.name] = build_impls(case, prob, peers, sink)
        verified = verify_recorded(case, impls, prob.data, args, mode, sink, verification)
        failed |= not all(verified.values())
        if "torch" in impls and impls["torch"].uses_onednn:
            torch_paths[case.name] = dict(impls["torch"].uses_onednn)
            sink.write({"type": "torch_path", "case": case.name,
                        "default_uses_onednn": torch_paths[case.name]})
        counts = args.threads if (not case.variant or mode.variants_all_threads) \
            else [max(args.threads)]
        for n in counts:
            for task in (t for t in case.tasks if t in args.tasks):
                rows.append(time_cell(case, task, n, impls, prob.data, mode, sink, peak,
                                       verified))
        del prob, impls

    memory = memory_table(args, mode, case_list, peers, sink) if args.memory else []
    peak_end = gemm_peaks(args.threads, mode, sink, "end")
    elapsed = time.perf_counter() - t_start
    best = {n: max(peak[n], peak_end[n]) for n in peak}    # the least disturbed figure
    targets = evaluate_targets(rows, best, case_list, args.threads)
    for t in targets:
        sink.write({"type": "target", **t})
    sink.write({"type": "end", "elapsed_s": elapsed, "verification_failed": failed})
    sink.close()

    report = markdown(args, header, mode, peers, peak, peak_end, best, verification, rows,
                     skipped_impls, torch_paths, memory, targets, elapsed, files)
    emit(args, report, rows, peers, sink, files, json_path)
    return 1 if failed else 0


def emit(args, report, rows, peers, sink, files, json_path):
    """The report to stdout and latest.md, the chart, where the JSON lines went."""
    print("\n".join(report))
    if files:
        with open(files["md"], "w") as f:
            f.write("\n".join(report) + "\n")
        print(f"\nReport: {files['md']}")
    if args.chart and files:
        why = chart(rows, [p for p in PEERS if p in peers], files["png"])
        print(f"\nChart: {files['png'] if why is None else 'not drawn: ' + why}")
    if args.json == "-":
        print("\n## JSON lines\n")
        print("\n".join(sink.lines))
    elif json_path:
        print(f"JSON lines: {json_path}")


def verify_recorded(case, impls, data, args, mode, sink, verification):
    """verify_case on the case's first Tv steps, recorded in the sink and appended to
    `verification`; returns {(impl, task): all checks passed}."""
    cfg = case.cfg
    Tv = cfg.T if flops(case, "inference") <= mode.verify_flops else min(cfg.T, mode.verify_T)
    t0 = time.perf_counter()
    verified = {}
    for name, n, task, r in verify_case(case, impls, data.first(Tv), args.threads,
                                         args.tasks, cases.TOLERANCE[case.dtype]):
        verification.append((case.name, Tv, name, n, task, r))
        verified[name, task] = verified.get((name, task), True) and r["ok"]
        sink.write({"type": "verification", "case": case.name, "impl": name, "threads": n,
                    "task": task, "T_checked": Tv, "tolerance": cases.TOLERANCE[case.dtype],
                    "oracle": "reference float64", **r})
    log(f"[{case.name}] verified in {time.perf_counter() - t0:.1f} s (T={Tv}): "
         + ", ".join(f"{i} {t} {'ok' if v else 'FAILED'}" for (i, t), v in verified.items()))
    return verified


def gemm_peaks(thread_counts, mode, sink, when):
    """sgemm GFLOP/s per thread count (float32: the efficiency targets are float32)."""
    peak = {}
    for n in thread_counts:
        time.sleep(mode.settle if n > 1 else 0)
        s = gemm_peak(np.float32, n, mode.gemm_reps, seconds=mode.gemm_seconds)
        peak[n] = s["gflops"]
        sink.write({"type": "gemm_peak", "when": when, "gemm": "sgemm", "threads": n, **s})
        log(f"sgemm peak ({when}), {n} thread(s): {s['gflops']:.0f} GFLOP/s "
            f"({s['route']} BLAS, {s['size']}^3)")
    return peak


def memory_table(args, mode, case_list, peers, sink):
    """Training-step memory of each implementation on the memory configurations."""
    n = max(args.threads)
    out = []
    for case in case_list:
        if case.variant or case.config not in mode.memory_configs \
                or "training" not in args.tasks:
            continue
        res = {}
        for name in ["cylstm"] + peers:
            impl = IMPLS[name]
            if impl.training and impl.unsupported(case) is None:
                res[name] = measure_memory(name, case, n)
                sink.write({"type": "memory", "case": case.name, "impl": name, "threads": n,
                            "method": "first training step in a fresh process: VmHWM "
                                      "(reset via /proc/self/clear_refs) - VmRSS before",
                            "step_peak_bytes": res[name]})
        log(f"[{case.name}] training-step memory: " + ", ".join(
            f"{k} {v / 2**20:.1f} MiB" if isinstance(v, int) else f"{k} {v}"
            for k, v in res.items()))
        out.append((case.name, res))
    return out


def main(argv=None):
    """Parse argv (default: sys.argv[1:]) and run; returns the exit status."""
    p = argparse.ArgumentParser(prog="python bench/run.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
