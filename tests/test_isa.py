"""The ISA switch of the kernels' own SIMD code (cylstm._isa): every level the CPU runs
is compiled in, the switch moves every per-level kernel at once (rgemm and activations
in both dtypes, the step's dot kernel, cell math, softmax rows), and on a machine with
AVX2 (AVX-512) the AVX2 (AVX-512) level is really available to the tests that run each
level."""
import platform

import numpy as np
import pytest

import cylstm
from cylstm import _isa, _lstm, _ops, _step


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _expected_level():
    flags = _cpu_flags()
    if flags is None or platform.machine() not in ("x86_64", "AMD64"):
        return None
    if "avx512f" in flags:
        return 2
    if "avx2" in flags and "fma" in flags:
        return 1
    return 0


def test_cpu_level_is_what_the_cpu_reports():
    want = _expected_level()
    if want is None:
        assert _isa.cpu_level() == 0 or platform.machine() in ("x86_64", "AMD64")
        return
    assert _isa.cpu_level() == want
    assert _isa.get_level() == want                  # the widest is the default


def test_avx2_and_avx512_levels_are_exercised_where_the_cpu_has_them():
    """Not parametrised, so never skipped: on an AVX2 machine the AVX2 kernels really
    run when level 1 is chosen (and likewise AVX-512), every one of them."""
    want = _expected_level() or 0
    for lvl in range(want + 1):
        with _isa.use_level(lvl):
            # the backward's own products exist at level 2 only (BLAS below)
            assert _lstm._kernel_levels() == {"activations": lvl, "activations_f64": lvl,
                                              "cell": lvl, "rgemm": lvl, "rgemm_f64": lvl,
                                              "bgemm": lvl if lvl == 2 else 0}
            assert _step._kernel_levels() == {"activations": lvl, "cell": lvl, "dot": lvl}
            assert _ops._kernel_levels() == {"softmax": lvl,
                                             "bgemm": lvl if lvl == 2 else 0}
            assert _lstm.rgemm_level() == lvl
    assert _isa.get_level() == _isa.cpu_level()


def test_levels_above_the_cpu_are_refused():
    with pytest.raises(ValueError):
        _isa.set_level(_isa.cpu_level() + 1)
    with pytest.raises(ValueError):
        _isa.set_level(-1)


def test_each_level_computes_a_model_to_rounding(kernel_level):
    """A float32 model at this level against float64 at the widest: forward and
    gradients to float32 tolerance (docs/math.md)."""
    m = cylstm.LSTM(12, 20, num_layers=2, seed=3)
    x = np.random.default_rng(4).standard_normal((9, 5, 12)).astype(np.float32)
    y, _ = m(x)
    dx, _ = m.backward(np.ones_like(y))
    m64 = cylstm.LSTM(12, 20, num_layers=2, seed=3, dtype="float64")
    with _isa.use_level(_isa.cpu_level()):
        y64, _ = m64(x.astype(np.float64))
        dx64, _ = m64.backward(np.ones_like(y64))
    assert np.abs(y - y64).max() <= 1e-5 * np.abs(y64).max()
    assert np.abs(dx - dx64).max() <= 1e-5 * np.abs(dx64).max()
