"""The instruction-set level of cylstm's own SIMD kernels: 0 baseline (SSE2; BLAS for
the per-step products), 1 AVX2+FMA, 2 AVX-512F (see _isa.h). Every level the CPU runs
is compiled in; the widest is used unless set_level() chooses another (tests run each).
Results of different levels agree to rounding; within a level they are bitwise the same
for any number of threads."""

import contextlib

cdef extern from "_isa.h" nogil:
    int cy_cpu_level()

#: Names of the levels, by number.
NAMES = ("baseline", "avx2", "avx512")

cdef int _cpu = cy_cpu_level()
cdef int _level = _cpu
cdef level_hook _hooks[16]
cdef int _n_hooks = 0


cdef void on_level_change(level_hook hook) noexcept:
    global _n_hooks
    if _n_hooks < 16:                # one per kernel module
        _hooks[_n_hooks] = hook
        _n_hooks += 1
    hook(_level)


def cpu_level():
    """The widest level this CPU runs."""
    return _cpu


def get_level():
    """The level the kernels run now."""
    return _level


def set_level(int level):
    """Run the kernels at `level` (at most cpu_level(); ValueError above it or below 0).
    Process-wide; returns the previous level."""
    global _level
    cdef int k
    if level < 0 or level > _cpu:
        raise ValueError(f"ISA level must be in 0..{_cpu} on this CPU, got {level}")
    previous = _level
    _level = level
    for k in range(_n_hooks):
        _hooks[k](level)
    return previous


@contextlib.contextmanager
def use_level(int level):
    """Run the kernels at `level` inside the block."""
    previous = set_level(level)
    try:
        yield
    finally:
        set_level(previous)
