"""The machine and the run's context: CPU, cores, versions, thread pools, BLAS kernels,
the other load on the machine, and one context that sets every thread pool at once."""

import contextlib
import datetime
import importlib.util
import os
import platform
import sys
import time

import numpy as np

import cylstm
from cylstm._threads import BLAS_THREAD_LOCAL, N_PARTS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def blas_kernels(info=None):
    """Each BLAS library threadpoolctl sees, with the kernel family it picked
    ('architecture', e.g. Haswell or SkylakeX for OpenBLAS) and who loaded it, by the
    path of its file (numpy.libs, scipy.libs, torch/lib)."""
    if info is None:
        from threadpoolctl import threadpool_info
        info = threadpool_info()
    out = []
    for i in info:
        if i.get("user_api") != "blas":
            continue
        path = i.get("filepath", "")
        owner = next((m for m in ("numpy", "scipy", "torch", "onnxruntime")
                      if f"{os.sep}{m}" in path), "?")
        out.append({"owner": owner, "internal_api": i.get("internal_api"),
                    "version": i.get("version"), "architecture": i.get("architecture"),
                    "threading_layer": i.get("threading_layer"),
                    "num_threads": i.get("num_threads"), "filepath": path})
    return out


def cpu_info():
    """The CPU's model name and its SIMD flags that matter here (Linux; else best effort)."""
    model, flags = None, []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key == "flags" and not flags:
                    have = set(value.split())
                    flags = [x for x in ("avx", "avx2", "fma", "avx512f", "avx512bw",
                                         "avx512vl", "avx512_vnni", "amx_tile") if x in have]
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags


def usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def git_commit():
    """The commit of the checkout holding this bench/ folder, read from .git (no git
    process), or None if not a checkout.
    In a worktree .git is a file naming the real git directory."""
    git = os.path.join(REPO, ".git")
    try:
        if os.path.isfile(git):
            with open(git) as f:
                git = f.read().split("gitdir:", 1)[1].strip()
        with open(os.path.join(git, "HEAD")) as f:
            head = f.read().strip()
        if not head.startswith("ref:"):
            return head
        name = head[4:].strip()
        common = git
        if os.path.exists(os.path.join(git, "commondir")):
            with open(os.path.join(git, "commondir")) as f:
                common = os.path.normpath(os.path.join(git, f.read().strip()))
        for base in (git, common):
            path = os.path.join(base, *name.split("/"))
            if os.path.exists(path):
                with open(path) as f:
                    return f.read().strip()
        with open(os.path.join(common, "packed-refs")) as f:
            for line in f:
                if line.rstrip().endswith(" " + name):
                    return line.split()[0]
    except (OSError, IndexError):
        pass
    return None


def version_of(module):
    """A module's version if it is installed, without importing it when it is not."""
    if importlib.util.find_spec(module) is None:
        return None
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:
        return "installed"


def make_header(args, mode):
    import scipy
    import threadpoolctl
    from threadpoolctl import threadpool_info

    model, flags = cpu_info()
    pools = threadpool_info()
    from cylstm import _lstm
    ext = _lstm.__file__
    env = {k: os.environ[k] for k in (
        "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY",
        "OMP_PROC_BIND", "GOMP_SPINCOUNT", "OPENBLAS_THREAD_TIMEOUT",
        "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ}
    return {
        "type": "header",
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "options": {k: v for k, v in vars(args).items() if k != "run"},
        "mode": mode._asdict(),
        "python": platform.python_version(),
        "versions": {"cylstm": cylstm.__version__, "numpy": np.__version__,
                     "scipy": scipy.__version__, "threadpoolctl": threadpoolctl.__version__,
                     **{m: version_of(m) for m in ("torch", "onnx", "onnxruntime",
                                                 "matplotlib")}},
        "cylstm_path": os.path.dirname(os.path.abspath(cylstm.__file__)),
        "cylstm_extension": ext,
        "cylstm_extension_mtime": datetime.datetime.fromtimestamp(
            os.path.getmtime(ext), datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "openmp_enabled": cylstm.openmp_enabled(),
        "N_PARTS": N_PARTS,
        "blas_thread_local": BLAS_THREAD_LOCAL,
        "cylstm_default_threads": cylstm.get_num_threads(),
        "cpu_model": model,
        "cpu_flags": flags,
        "usable_cores": usable_cores(),
        "os_cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "env": env,
        # taken after the peers are imported, so that their pools (torch's OpenMP) show
        "threadpool_info": pools,
        "blas_kernels": blas_kernels(pools),
    }


class LoadMeter:
    """CPU time that *other* processes (and the hypervisor: steal) used while we ran,
    in cores: busy time from /proc/stat minus this process's own CPU time, over wall
    time. None where /proc/stat is missing. Jiffy resolution (10 ms)."""

    def __init__(self):
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._t0 = self._read()

    @staticmethod
    def _busy_jiffies():
        try:
            with open("/proc/stat") as f:
                v = [int(a) for a in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal
        return sum(v[:3]) + sum(v[5:8])

    def _read(self):
        t = os.times()
        return self._busy_jiffies(), t.user + t.system, time.perf_counter()

    def cores(self):
        (b0, own0, w0), (b1, own1, w1) = self._t0, self._read()
        if b0 is None or b1 is None or w1 <= w0:
            return None
        return max(0.0, ((b1 - b0) / self._hz - (own1 - own0)) / (w1 - w0))


@contextlib.contextmanager
def all_threads(n):
    """Every pool at n threads: cylstm's, the BLAS ones threadpoolctl sees (NumPy's runs
    the reference) and, if it is loaded, torch's. ONNX Runtime's is per session."""
    from threadpoolctl import threadpool_limits

    torch = sys.modules.get("torch")
    old = torch.get_num_threads() if torch else None
    with cylstm.threads(n), threadpool_limits(limits=n, user_api="blas"):
        if torch:
            torch.set_num_threads(n)
        try:
            yield
        finally:
            if torch:
                torch.set_num_threads(old)

