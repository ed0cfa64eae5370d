/* The instruction-set levels of cylstm's own SIMD kernels, and how a kernel is compiled
 * once per level.
 *
 *   level 0  baseline x86-64 (SSE2) or any other CPU; the per-step products use BLAS
 *   level 1  AVX2 + FMA
 *   level 2  AVX-512F
 *
 * Every kernel that has per-level code (_rgemm.h, _activations.h, _cell.h, the softmax
 * rows of _ops.pyx) is compiled for all three with target attributes, so a build for
 * any x86-64 runs the widest vectors the CPU has, and the level is a run-time switch
 * (cylstm._isa.set_level) rather than the loader's choice: tests run every level the
 * CPU supports. Levels may round differently from each other (FMA contraction, vector
 * width), never one call from the next; within a level, results do not depend on the
 * thread count. */
#ifndef CYLSTM_ISA_H
#define CYLSTM_ISA_H

#define CY_LEVELS 3

#if defined(__GNUC__) || defined(__clang__)
#define CY_INLINE static inline __attribute__((always_inline))
#else
#define CY_INLINE static inline
#endif

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define CY_HAVE_X86_LEVELS 1
#define CY_TARGET_L1 __attribute__((target("avx2,fma")))
#define CY_TARGET_L2 __attribute__((target("avx512f")))
#else
#define CY_TARGET_L1
#define CY_TARGET_L2
#endif

/* Defines NAME_l0, NAME_l1 and NAME_l2, one body compiled for each level (the body's
 * inline helpers are inlined into each and vectorised for its instruction set), and
 * NAME_by_level[level]. On CPUs other than x86-64 the three are the same code. */
#define CY_PER_LEVEL(RET, NAME, PARAMS, ...)                                             \
    static RET NAME##_l0 PARAMS { __VA_ARGS__ }                                         \
    CY_TARGET_L1 static RET NAME##_l1 PARAMS { __VA_ARGS__ }                            \
    CY_TARGET_L2 static RET NAME##_l2 PARAMS { __VA_ARGS__ }                            \
    static RET (*const NAME##_by_level[CY_LEVELS]) PARAMS = {NAME##_l0, NAME##_l1, NAME##_l2};

/* The widest level this CPU runs. */
static inline int cy_cpu_level(void)
{
#ifdef CY_HAVE_X86_LEVELS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f"))
        return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return 1;
#endif
    return 0;
}

#endif
