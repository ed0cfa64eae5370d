"""Build the compiled kernels of cylstm.

Environment switches:
  CYLSTM_REQUIRE_OPENMP=1  a compiler without OpenMP is a build error (CI sets it);
                           otherwise cylstm builds serial kernels with a loud warning.
  CYLSTM_DEBUG=1           Cython bounds/wraparound/initialisation checks on, -O0 -g.
  CYLSTM_NO_OPENMP=1       build the serial kernels even if the compiler has OpenMP
                           (what a compiler without it gets; for testing that path).
"""
import os
import sys
import tempfile
import textwrap

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from Cython.Build import cythonize

DEBUG = os.environ.get("CYLSTM_DEBUG", "") not in ("", "0")
REQUIRE_OPENMP = os.environ.get("CYLSTM_REQUIRE_OPENMP", "") not in ("", "0")
NO_OPENMP = os.environ.get("CYLSTM_NO_OPENMP", "") not in ("", "0")

OPENMP_PROBE = textwrap.dedent(
    """
    #include <omp.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        return n > 0 ? 0 : 1;
    }
    """
)


def _openmp_flags(compiler_type):
    if compiler_type == "msvc":
        return ["/openmp"], []
    if sys.platform == "darwin":
        # Apple clang needs the preprocessor route plus Homebrew's/conda's libomp.
        return ["-Xpreprocessor", "-fopenmp"], ["-lomp"]
    return ["-fopenmp"], ["-fopenmp"]


class BuildExtOpenMP(build_ext):
    """build_ext that probes the compiler for OpenMP before building."""

    def _probe_openmp(self, cflags, ldflags):
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "probe.c")
            with open(src, "w") as f:
                f.write(OPENMP_PROBE)
            try:
                objs = self.compiler.compile([src], output_dir=tmp, extra_postargs=cflags)
                self.compiler.link_executable(
                    objs, os.path.join(tmp, "probe"), extra_postargs=ldflags
                )
            except Exception:  # any compiler/linker failure means "no OpenMP"
                return False
        return True

    def build_extensions(self):
        cflags, ldflags = _openmp_flags(self.compiler.compiler_type)
        has_openmp = not NO_OPENMP and self._probe_openmp(cflags, ldflags)
        if not has_openmp:
            msg = (
                "\n" + "*" * 72 + "\n"
                "cylstm: this compiler has no usable OpenMP. Building SERIAL kernels:\n"
                "results are correct, but only one core is used. Install a compiler\n"
                "with OpenMP (gcc, or clang with libomp) and rebuild for multicore.\n"
                + "*" * 72
            )
            if REQUIRE_OPENMP:
                raise RuntimeError("CYLSTM_REQUIRE_OPENMP is set but " + msg)
            print(msg, file=sys.stderr)
        for ext in self.extensions:
            if self.compiler.compiler_type == "msvc":
                ext.extra_compile_args += ["/O2"]
            else:
                # No fast-math flags (they break NaN/Inf semantics in the gates) and no
                # -march=native (wheels must run on any x86-64 / arm64 CPU).
                # -fno-trapping-math changes no result (it only stops treating FP
                # exception flags as observable) and lets the activation loops vectorise.
                ext.extra_compile_args += ["-O0", "-g"] if DEBUG else ["-O3"]
                ext.extra_compile_args += ["-fno-trapping-math"]
                if ext.name == "cylstm._optim":
                    # sqrt is correctly rounded either way; without errno to set, the
                    # Adam and RMSprop loops vectorise (see _optim.pyx)
                    ext.extra_compile_args += ["-fno-math-errno"]
            if has_openmp:
                ext.extra_compile_args += cflags
                ext.extra_link_args += ldflags
        super().build_extensions()


directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": not DEBUG,
    "nonecheck": DEBUG,
}

extensions = [
    Extension(
        f"cylstm.{name}",
        [f"src/cylstm/{name}.pyx"],
        include_dirs=["src", "src/cylstm"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
    for name in ("_parallel", "_isa", "_lstm", "_step", "_optim", "_ops")
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        include_path=["src"],
    ),
    cmdclass={"build_ext": BuildExtOpenMP},
)
