"""Peak memory of a training step: the first training step of a fresh model, in a fresh
process, as the peak RSS during the step (VmHWM, reset through /proc/self/clear_refs just
before it) minus the RSS before it. Linux only.

The parent calls measure_memory(); the child is this file run as a script:
``python bench/memprobe.py IMPL CONFIG VARIANT THREADS`` (VARIANT may be '').
"""

import gc
import json
import os
import subprocess
import sys

import peers
from cases import Case
from machine import all_threads
from problem import make_problem


def proc_status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def memory_child(impl_name, config, variant, n):
    """In a fresh process: RSS growth during the first training step of a fresh model.
    Prints one JSON object. Linux only (/proc/self/clear_refs and status)."""
    case = Case(config, variant)
    prob = make_problem(case)
    impl = peers.IMPLS[impl_name](case, prob)
    with all_threads(n):
        fn = impl.call("training", n, prob.data)
        gc.collect()
        rss0 = proc_status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                          # reset the high-water mark to the RSS
        fn()
        hwm = proc_status_kib("VmHWM")
    print(json.dumps({"rss_before_kib": rss0, "peak_kib": hwm,
                      "step_peak_bytes": (hwm - rss0) * 1024}))


def measure_memory(impl_name, case, n, timeout=300):
    """Peak RSS growth (bytes) of the first training step, or a string saying why not."""
    argv = [sys.executable, os.path.abspath(__file__), impl_name, case.config,
            case.variant, str(n)]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout} s"
    if p.returncode != 0:
        return "failed: " + (p.stderr.strip().splitlines() or ["?"])[-1]
    return json.loads(p.stdout.strip().splitlines()[-1])["step_peak_bytes"]


if __name__ == "__main__":
    memory_child(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
