"""cylstm's one thread policy: the Python half (the compiled half is ``_parallel.pyx``).

* ``n_threads`` means one thing everywhere: how many OpenMP threads a kernel call may
  use. ``None`` (the default) means all usable cores, honouring ``OMP_NUM_THREADS``;
  0 or a negative number is an error. ``set_num_threads(n)`` sets it for the process,
  ``threads(n)`` overrides it for the calling Python thread inside a ``with`` block.
* The work is cut into ``N_PARTS`` fixed parts (the usable cores of the machine, read
  once at import). Part boundaries never depend on the thread setting, so results are
  bitwise identical for 1, 2 or any number of threads. More threads than parts would
  only idle, so the effective count is capped at ``N_PARTS``. Below a work size named
  in ``_parallel.pxd`` (``MIN_PARALLEL_*``) a call runs on one thread whatever the
  setting; ``force_parallel()`` lowers those sizes to zero (for tests).
* BLAS never adds threads of its own inside cylstm's: every BLAS call a kernel makes is
  single-threaded (``_parallel.pyx``, "BLAS threads"), so cores are never oversubscribed.
* A child forked after the kernels ran a thread team runs every kernel on one thread
  (GNU OpenMP's thread pool does not survive fork) and warns once; start children with
  "spawn" or "forkserver" to use every core in them.

See docs/architecture.md, "Thread policy".
"""

import contextlib
import ctypes
import operator
import os
import threading
import warnings

from . import _isa, _parallel

__all__ = ["set_num_threads", "get_num_threads", "threads", "openmp_enabled"]


def _usable_cores():
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


#: Fixed number of work parts (batch chunks, GEMM row blocks) per kernel call.
N_PARTS = _usable_cores()

#: Fewest time steps for which a float32 sequence call packs its recurrent weights.
PACK_MIN_STEPS = _parallel.thresholds()["PACK_MIN_STEPS"]


def _l2_bytes(default=1 << 20):
    """The L2 cache of one core in bytes, from Linux's sysfs; `default` (1 MiB, as on
    most server cores since 2017) where it cannot be read."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in sorted(os.listdir(base)):
            path = os.path.join(base, entry)
            with open(os.path.join(path, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(path, "type")) as f:
                kind = f.read().strip()
            if level == "2" and kind in ("Unified", "Data"):
                with open(os.path.join(path, "size")) as f:
                    size = f.read().strip().upper()
                scale = {"K": 1 << 10, "M": 1 << 20}.get(size[-1:], 1)
                return int(size.rstrip("KM")) * scale
    except (OSError, ValueError):
        pass
    return default


#: One core's L2 in bytes, read once at import. Like N_PARTS it depends on the machine,
#: never on the thread count.
L2_BYTES = _l2_bytes()


def _cpu_id(path="/proc/cpuinfo"):
    """(vendor, family) of the first CPU from Linux's /proc/cpuinfo, e.g.
    ("AuthenticAMD", 26); ("", 0) where it cannot be read."""
    vendor, family = "", 0
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "vendor_id" and not vendor:
                    vendor = value.strip()
                elif key == "cpu family" and not family:
                    family = int(value)
                if vendor and family or not line.strip():
                    break
    except (OSError, ValueError):
        pass
    return vendor, family


def _step_weight_bytes(l2, cpu, level):
    """The most bytes of [W_ih | W_hh] the forward streams through each step's product
    before it projects the input with GEMMs ahead of the loop instead
    (cylstm._lstm.input_in_step): one core's L2 (`l2`), except where the core reads
    weights from L3 fast enough for the step's 8-row blocks to stay near its peak.
    `cpu` is (vendor, family) (_cpu_id), `level` the CPU's ISA level (_isa.cpu_level).

    Measured (bench: inference, T = 100, 2 threads, fused vs hoisted ms). A 2-core Intel
    Xeon, 2 MiB L2: B=32 I=128 H=384 (3 MiB of weights) 22.6 vs 16.9, and H=256 float64
    (3 MiB) 28.9 vs 19.5: from L3 the fused step loses. An AMD EPYC Zen 5 (family 26),
    1 MiB L2, 32 MiB L3: B=32 I=128 H=256 (1.5 MiB) 6.84 vs 7.61, I=256 H=256 (2 MiB)
    8.75 vs 9.51, B=64 I=512 H=512 (8 MiB) 68.4 vs 71.1, I=512 H=640 (11 MiB) 90.9 vs
    92.6, but I=H=768 (18 MiB) 157.7 vs 150.7 and I=H=1024 (32 MiB) 220 vs 138; float64
    B=32 I=128 H=256 (3 MiB) 16.7 vs 19.3: there the step may stream up to 8 L2s'
    worth. An AMD EPYC Zen 4 (family 25 with AVX-512; 1 MiB L2, 32 MiB L3), interleaved
    in one process (bench-style, 2026-12-03): 1.5 MiB 13.05 vs 14.62, 2 MiB 17.22 vs
    20.20, 8 MiB 137.9 vs 145.3, the char model's 2 layers (4.8 MiB) 141.6 vs 155.5,
    1.5 MiB bidirectional 28.0 vs 33.1, float64 3 MiB 32.5 vs 34.6, but I=512 H=768
    (15 MiB) 201.6 vs 165.1; a training step 2-4% faster fused up to 4.8 MiB, 8 MiB
    even (506 vs 495). Family 25 without AVX-512 is Zen 3 (a 512 KiB L2), not measured.
    Other CPUs keep the L2 until measured."""
    vendor, family = cpu
    if vendor == "AuthenticAMD" and (family == 26 or (family == 25 and level >= 2)):
        return 8 * l2
    return l2


#: Bytes of [W_ih | W_hh] up to which the forward computes the input's product inside
#: each step (cylstm._lstm.input_in_step); read once at import, from the machine.
STEP_WEIGHT_BYTES = _step_weight_bytes(L2_BYTES, _cpu_id(), _isa.cpu_level())

_global_setting = None          # set_num_threads(); None = default
_SERIAL = not _parallel.openmp_enabled()     # serial build, or a forked child (below)
_fork_warning_due = False       # a forked child runs serially and has not said so yet


class _Local(threading.local):
    n = None                    # a class default, so reading it never raises: a
                                # getattr(..., None) would cost ~1 us per kernel call


_local = _Local()               # threads() overrides, per Python thread


def openmp_enabled():
    """True if the compiled kernels use OpenMP; False for a serial build."""
    return _parallel.openmp_enabled()


def _validate(n, name="n"):
    if n is None:
        return None
    try:
        if isinstance(n, bool):
            raise TypeError
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"{name} must be a positive int or None, got {type(n).__name__}") from None
    if n < 1:
        raise ValueError(f"{name} must be >= 1 (or None for all usable cores), got {n}")
    return n


def _default_threads():
    return max(1, _parallel.openmp_max_threads())


def set_num_threads(n):
    """Set how many threads cylstm kernels use in this process (None: all usable cores)."""
    global _global_setting
    _global_setting = _validate(n)


def get_num_threads():
    """The number of threads the next kernel call from this Python thread will use."""
    if _fork_warning_due:
        _warn_serial_after_fork()
    n = _local.n
    if n is None:
        n = _global_setting
    if n is None:
        n = _default_threads()
    if _SERIAL:
        return 1
    return min(n, N_PARTS)


@contextlib.contextmanager
def threads(n):
    """Use ``n`` threads for cylstm calls made from this Python thread inside the block.

    Restores the previous setting on exit, also on error. ``None`` means all usable cores.
    """
    n = _validate(n)
    previous = _local.n
    _local.n = n
    try:
        yield
    finally:
        _local.n = previous


@contextlib.contextmanager
def force_parallel():
    """Inside the block every kernel call forms a team of ``min(get_num_threads(),
    N_PARTS)`` threads, however small its work (the ``MIN_PARALLEL_*`` sizes are
    scaled to 0). For tests: thread-count invariance is only tested when a team of two
    really runs. Process-wide; results are the same as without it."""
    previous = _parallel.set_min_work_scale(0.0)
    try:
        yield
    finally:
        _parallel.set_min_work_scale(previous)


def max_team():
    """The largest OpenMP team any kernel region has run with in this process."""
    return _parallel.max_team()


# ---- fork ----------------------------------------------------------------------------------

def _warn_serial_after_fork():
    global _fork_warning_due
    _fork_warning_due = False
    warnings.warn(
        "cylstm: this process was forked after cylstm ran an OpenMP thread team, and "
        "GNU OpenMP's thread pool does not survive fork, so cylstm runs on one thread "
        "here. Start worker processes with multiprocessing's 'spawn' or 'forkserver' "
        "method to use every core in them.", RuntimeWarning, stacklevel=3)


def _after_fork_in_child():
    # Only the forking thread exists in the child: locks other threads held at fork
    # would never be released, so the pins get fresh ones.
    global _SERIAL, _fork_warning_due
    _parallel._after_fork_in_child()
    if isinstance(blas_single_threaded, _GlobalBlasPin):
        blas_single_threaded._after_fork_in_child()
    other_blas_single_threaded._after_fork_in_child()
    numpy_hugepage_hint_off._after_fork_in_child()
    if _parallel.max_team() > 1 and not _SERIAL:
        _SERIAL = True
        _parallel._set_serial_only(True)
        _fork_warning_due = True


# ---- BLAS: single-threaded inside cylstm's OpenMP threads ---------------------------------

def _scipy_blas_libraries():
    """threadpoolctl's records of the BLAS libraries scipy.linalg.cython_blas may use."""
    import scipy.linalg.cython_blas  # noqa: F401  (loads scipy's BLAS)
    from threadpoolctl import threadpool_info

    blas = [lib for lib in threadpool_info() if lib.get("user_api") == "blas"]
    scipy_dir = os.path.dirname(os.path.dirname(os.path.abspath(scipy.linalg.__file__)))
    own = [
        lib for lib in blas
        if os.path.basename(os.path.dirname(lib["filepath"])).startswith("scipy")
        or os.path.abspath(lib["filepath"]).startswith(scipy_dir + os.sep)
    ]
    return own or blas


def _find_local_setter(libs):
    """Address of a thread-local 'set BLAS threads' function, or 0 if there is none."""
    names = {
        "openblas": ("openblas_set_num_threads_local", "scipy_openblas_set_num_threads_local"),
        "mkl": ("MKL_Set_Num_Threads_Local", "mkl_set_num_threads_local"),
    }
    if len(libs) != 1:
        return 0
    lib = libs[0]
    try:
        handle = ctypes.CDLL(lib["filepath"])
    except OSError:
        return 0
    for name in names.get(lib.get("internal_api"), ()):
        fn = getattr(handle, name, None)
        if fn is not None:
            return ctypes.cast(fn, ctypes.c_void_p).value or 0
    return 0


class _Hold:
    """A process-wide setting changed while any caller is inside ``with hold:`` and
    restored when the last one leaves: reference counted under a lock, so concurrent
    calls from several Python threads change it once and restore it once. Subclasses
    give ``_apply()`` (change it; return what ``_restore`` needs, or None for nothing
    to restore) and ``_restore(saved)``. ``enabled = False`` (on the class) leaves the
    setting alone."""

    enabled = True

    def __init__(self):
        self._lock = threading.Lock()
        self._count = 0
        self._saved = None

    def __enter__(self):
        with self._lock:
            if self._count == 0 and self.enabled:
                self._saved = self._apply()
            self._count += 1
        return self

    def __exit__(self, *exc):
        with self._lock:
            self._count -= 1
            if self._count == 0 and self._saved is not None:
                self._restore(self._saved)
                self._saved = None
        return False

    def _after_fork_in_child(self):
        # a lock another thread held at fork is never released in the child; the count
        # stays, so a hold taken then is simply kept (a setting, never a value)
        self._lock = threading.Lock()


class _GlobalBlasPin(_Hold):
    """Fallback: pin scipy's BLAS to one thread while any cylstm kernel runs (a _Hold:
    concurrent Python threads pin once and restore once). Used only when the BLAS has
    no thread-local setter.
    """

    def _apply(self):
        from threadpoolctl import threadpool_limits
        return threadpool_limits(limits=1, user_api="blas")

    def _restore(self, limiter):
        limiter.restore_original_limits()

    def _after_fork_in_child(self):
        self._lock = threading.Lock()
        if self._count:                 # other threads' calls do not go on in the child
            self._count = 0
            if self._saved is not None:
                self._restore(self._saved)
                self._saved = None


# OpenBLAS cores with AVX-512 kernels (threadpoolctl's "architecture"). Environments that
# set OPENBLAS_CORETYPE=Haswell get AVX2 ones on the same CPU.
_AVX512_OPENBLAS_CORES = {"skylakex", "cooperlake", "sapphirerapids"}


def _blas_runs_avx512(libs):
    """Whether scipy's BLAS runs AVX-512 kernels: OpenBLAS on one of the cores above, or
    MKL (which picks the CPU's widest itself) on a CPU that has AVX-512."""
    if len(libs) != 1:
        return False
    lib = libs[0]
    if lib.get("internal_api") == "mkl":
        return _isa.cpu_level() >= 2
    return str(lib.get("architecture", "")).lower() in _AVX512_OPENBLAS_CORES


def _setup_blas():
    """The BLAS pin, and whether the backward runs its own kernel on every large product
    (BACKWARD_OWN_WIDE below)."""
    try:
        libs = _scipy_blas_libraries()
        address = _find_local_setter(libs)
        avx512 = _blas_runs_avx512(libs)
    except Exception:  # threadpoolctl cannot inspect this BLAS: use the global pin
        address, avx512 = 0, False
    _parallel._register_blas_set_local(address)
    pin = contextlib.nullcontext() if address else _GlobalBlasPin()
    _parallel._register_fallback_pin(None if address else pin)
    return pin, not avx512


#: ``with blas_single_threaded:`` around every kernel call (a no-op when the kernels
#: hold BLAS to one thread themselves, thread-locally).
blas_single_threaded, _own_wide = _setup_blas()
#: The backward's weight-gradient and dx products on cylstm's own AVX-512 kernel for
#: every shape (True), or only for the thin ones, input or state of at most 64 features,
#: with OpenBLAS's for the rest (False): False where scipy's BLAS runs AVX-512 kernels
#: itself, which were as fast or faster on the large products (Zen 5, 2 threads: the
#: I = H = 512 training step 244.1 ms on the own kernel, 235.2 on OpenBLAS's); True where
#: it runs AVX2 ones (OPENBLAS_CORETYPE=Haswell: the same step 304.7 -> 224.0 ms).
#: Read by cylstm.functional; the choice changes results by rounding only.
BACKWARD_OWN_WIDE = _own_wide
#: True when the kernels hold BLAS to one thread themselves (thread-locally).
BLAS_THREAD_LOCAL = _parallel.blas_set_local_registered()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# ---- NumPy's BLAS: one thread while cylstm trains or infers ------------------------------

class _OtherBlasHold(_Hold):
    """``with other_blas_single_threaded:`` holds every BLAS other than the kernels' own
    (NumPy's OpenBLAS, ...) to one thread for the duration of a fit, evaluate, predict or
    sample call, and restores it after.

    Why: cylstm's steps run on its one OpenMP team, but user code between them
    (callbacks, metrics, data preparation) may call NumPy's BLAS, whose thread pool keeps
    spinning after each call while the team wants the same cores. The kernels' own BLAS
    (scipy's) is left to their thread-local pin (_parallel.pyx), and a
    library NumPy and scipy share is left alone, so the two never save and restore one
    setting over each other. Reference counted under a lock: concurrent calls from
    several Python threads limit once and restore once. While it holds, NumPy's BLAS
    runs on one thread in every thread of the process. ``enabled = False`` turns it off
    (bench/step_profile.py measures both).
    """

    def __init__(self):
        super().__init__()
        self._others = None          # threadpoolctl's selection, found once

    def _select(self):
        if self._others is None:
            try:
                from threadpoolctl import ThreadpoolController
                own = {lib["filepath"] for lib in _scipy_blas_libraries()}
                ctl = ThreadpoolController()
                paths = [lc.filepath for lc in ctl.lib_controllers
                         if lc.user_api == "blas" and lc.filepath not in own]
                self._others = ctl.select(filepath=paths) if paths else False
            except Exception:        # threadpoolctl cannot inspect this BLAS: no hold
                self._others = False
        return self._others

    def _apply(self):
        others = self._select()
        return others.limit(limits=1) if others else None

    def _restore(self, limiter):
        limiter.restore_original_limits()


other_blas_single_threaded = _OtherBlasHold()


# ---- NumPy's huge-page hint: off while cylstm trains or infers ---------------------------

def _madvise_setter():
    """NumPy's switch for madvise(MADV_HUGEPAGE) on new large arrays (a private
    function; None where this NumPy has none)."""
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return getattr(__import__(mod, fromlist=["_"]), "_set_madvise_hugepage")
        except (ImportError, AttributeError):
            continue
    return None


class _HugePageHintHold(_Hold):
    """``with numpy_hugepage_hint_off:`` stops NumPy from asking the kernel for
    transparent huge pages (madvise(MADV_HUGEPAGE)) on the large arrays it allocates,
    for the duration of a fit, evaluate, predict or sample call, and restores the
    setting after.

    Why: a batch's activations and gradients are fresh arrays of megabytes. Where
    transparent huge pages are "madvise" (many distributions and VMs), NumPy's hint makes
    the kernel find (and, with memory fragmented, compact) a 2 MiB page at each first
    touch, synchronously. On a 2-core VM that turned predict of the char model
    (batches of 256 windows, 26 MB of LSTM output each) from 55 ms per batch into
    56-152 ms, with up to 100 ms of system time per batch while the page faults
    themselves were few (NUMPY_MADVISE_HUGEPAGE=0: 55-59 ms, 4-11 ms system time).
    Only a hint changes: no value, no semantics. Reference counted under a lock, as
    the BLAS hold; ``enabled = False`` turns it off (bench/e2e.py --numpy-hugepages).
    """

    def __init__(self):
        super().__init__()
        self._setter = _madvise_setter()

    def _apply(self):
        return None if self._setter is None else self._setter(False)

    def _restore(self, saved):
        self._setter(saved)


numpy_hugepage_hint_off = _HugePageHintHold()


class _LoopHold:
    """``with loop_hold:`` both holds above, around each of cylstm's loops (fit,
    evaluate, predict, sample)."""

    def __enter__(self):
        other_blas_single_threaded.__enter__()
        try:
            numpy_hugepage_hint_off.__enter__()
        except BaseException:
            other_blas_single_threaded.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        numpy_hugepage_hint_off.__exit__(*exc)
        other_blas_single_threaded.__exit__(*exc)
        return False


loop_hold = _LoopHold()
