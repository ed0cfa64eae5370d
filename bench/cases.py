"""What the benchmark measures: configurations, variants, tasks, FLOP counts, run modes.

Dimensions: T steps, B batch, I input, H hidden, L layers, D directions, P projection.
"""

from typing import NamedTuple

import numpy as np

class Config(NamedTuple):
    B: int
    T: int
    I: int
    H: int
    L: int
    what: str
    state: bool = False       # streaming: one step, (h, c) carried from call to call


# The project's benchmark configurations (docs/benchmarking.md), smallest to largest.
CONFIGS = {
    "tiny": Config(1, 50, 32, 64, 1, "latency: one small sequence"),
    "small": Config(16, 100, 64, 128, 1, "small models, small batches"),
    "medium": Config(32, 100, 128, 256, 1, "the everyday case"),
    "large": Config(64, 100, 512, 512, 1, "compute-bound"),
    "charrnn": Config(32, 128, 96, 512, 2, "character LM training step"),
    "step": Config(1, 1, 256, 256, 1, "one streaming step, state carried in", state=True),
}
# Variants: the cases no peer handles well.
VARIANTS = {
    "float64": "float64 weights and data",
    "varlen": "lengths uniform in 1..T (torch: pack_padded_sequence)",
    "bidir": "bidirectional",
    "proj": "projection, proj_size = H/2",
}
TASKS = ("inference", "training")
TOLERANCE = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-9}
PARAM_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")


class Case(NamedTuple):
    """One configuration in one variant ("" = float32, fixed lengths, one direction)."""
    config: str
    variant: str = ""

    @property
    def name(self):
        return self.config + (f"/{self.variant}" if self.variant else "")

    @property
    def cfg(self):
        return CONFIGS[self.config]

    @property
    def dtype(self):
        return np.dtype(np.float64 if self.variant == "float64" else np.float32)

    @property
    def D(self):
        return 2 if self.variant == "bidir" else 1

    @property
    def P(self):
        return self.cfg.H // 2 if self.variant == "proj" else 0

    @property
    def tasks(self):
        return ("inference",) if self.cfg.state else TASKS


def flops(case, task, lengths=None):
    """FLOPs of one call: 2*(valid steps)*4H*(I_l + Hp) per layer and direction, plus
    2*(valid steps)*H*P for a projection; a training step counts ~3x the forward."""
    cfg, D, Hp = case.cfg, case.D, case.P or case.cfg.H
    steps = cfg.B * cfg.T if lengths is None else int(np.sum(lengths))
    f = 0
    for layer in range(cfg.L):
        i_l = cfg.I if layer == 0 else D * Hp
        f += D * 2 * steps * (4 * cfg.H * (i_l + Hp) + cfg.H * case.P)
    return 3 * f if task == "training" else f


class Mode(NamedTuple):
    target: float        # seconds of timed reps per implementation and cell
    warm: float          # seconds of warm-up per implementation and cell (>= 1 call)
    rounds: int          # blocks per implementation (A B C, C B A, ...)
    settle: float        # seconds slept before each block when threads > 1
    gemm_reps: int       # timed reps per GEMM-peak size, at the start and at the end
    verify_T: int        # configurations above verify_flops are verified on T[:verify_T]
    verify_flops: float  # forward FLOPs above which only the first verify_T steps are
    max_call: float      # s; an implementation whose calls take longer is not timed
    configs: tuple       # configurations run in float32 by default
    variant_configs: tuple   # configurations the variants run on by default
    variants_all_threads: bool   # variants at every thread count, or only the largest
    memory_configs: tuple    # configurations whose training-step memory is measured
    gemm_seconds: float = 1.0   # at most this long timing one GEMM-peak size (>= 2 reps)
    min_reps: int = 3
    max_reps: int = 20000


# --quick (all peers, < 2 min on 2 cores): large and charrnn (seconds per reference
# call) are left out, the variants run on medium at 2 threads only, memory on medium.
QUICK = Mode(target=0.3, warm=0.05, rounds=2, settle=0.15, gemm_reps=4, verify_T=20,
             gemm_seconds=0.4, verify_flops=0, max_call=1.0,
             configs=("tiny", "small", "medium", "step"),
             variant_configs=("medium",), variants_all_threads=False,
             memory_configs=("medium",))
FULL = Mode(target=1.0, warm=0.2, rounds=4, settle=0.15, gemm_reps=10, verify_T=10,
            verify_flops=1e10, max_call=5.0, configs=tuple(CONFIGS),
            variant_configs=("small", "medium"), variants_all_threads=True,
            memory_configs=("tiny", "small", "medium", "large", "charrnn"))
# max_call: the slowest call on an idle 2-core machine is ~1.3 s (charrnn training at 1
# thread). With the other core busy, a 2-thread OpenBLAS call can be 10-30x slower (each
# per-step GEMM waits for a descheduled worker): 15 s for one reference training step
# on large was seen, 12 s on medium/varlen. Such cells are reported as skipped rather than
# timed with < 3 reps: after 5 s (full), or 1 s (--quick: no call above ~0.3 s idle).
# Verifying large and charrnn (~27 GFLOP per forward) over their full T=100/128 costs
# ~5 s per implementation on 2 cores, so they are checked on their first 10 steps: same
# B, I, H, L, same code paths (cylstm packs its weights from 4 steps on). --quick checks
# every case on its first 20 steps (on a busy machine full-T checks took 4 of 10 minutes).
# The sgemm peak is the best GFLOP/s over these square sizes, every rep and both BLAS
# routes, at the start and at the end of the run: it is the denominator of "% of peak",
# so it must be an upper bound, and on a shared machine one size at a few reps is not.
GEMM_SIZES = (1024, 2048, 3072)
SLOW_CALL = 0.05         # s; a call at least this long needs no untimed call per block
BLOCK_BUDGET = 3.0       # a block stops after this many times its planned duration
