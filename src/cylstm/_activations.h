/* Gate activations for cylstm, over contiguous rows, written so that GCC/Clang
 * auto-vectorise them at -O3 (no calls, no branches: selects only).
 *
 * float32: glibc's scalar expf/tanhf (tanhf goes through expm1f) took more than half of
 * a medium forward pass (perf). Here exp is the Cephes polynomial with a 2^n scale built
 * in the exponent bits, and tanh is Cephes' minimax polynomial for |x| < 0.625 and
 * 1 - 2/(e^{2|x|} + 1) above: both within a few float32 ulps of the exact value
 * (tests/test_kernels.py checks them against float64 over a dense grid). No input, however
 * large or small, gives NaN or Inf; NaN propagates as NaN.
 * float64 (below) has its own exp and tanh, as accurate as libm's to an ulp or two. */
#ifndef CYLSTM_ACTIVATIONS_H
#define CYLSTM_ACTIVATIONS_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "_isa.h"

/* e^x for x in [-87.3, 0] (clamped below, so the result stays a normal float).
 * Rounding x/ln2 to an integer by adding 1.5*2^23 keeps the loop free of float->int
 * conversions, which GCC 12 will not vectorise for AVX targets after a select. */
CY_INLINE float cy_exp_nonpos_f32(float x)
{
    const float magic = 12582912.0f;    /* 1.5 * 2^23 */
    float t, n, r, p, scale;
    int32_t t_bits, magic_bits, bits;
    x = x < -87.3f ? -87.3f : x;
    t = x * 1.44269504088896341f + magic;
    n = t - magic;                      /* nearest integer to x / ln2, in [-126, 0] */
    r = x - n * 0.693359375f - n * -2.12194440e-4f;     /* |r| <= ln2/2 (Cody-Waite) */
    p = 1.9875691500e-4f;               /* Cephes expf polynomial */
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    memcpy(&t_bits, &t, sizeof t);
    memcpy(&magic_bits, &magic, sizeof magic);
    bits = (t_bits - magic_bits + 127) << 23;           /* 2^n from its exponent bits */
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

CY_INLINE float cy_sigmoid_f32(float x)
{
    float e = cy_exp_nonpos_f32(-fabsf(x));       /* never overflows */
    float r = 1.0f / (1.0f + e);
    float s = x >= 0.0f ? r : e * r;
    return x != x ? x : s;                        /* NaN in, NaN out */
}

CY_INLINE float cy_tanh_f32(float x)
{
    float a = fabsf(x), z = x * x, small, large, e, t;
    /* |x| < 0.625: Cephes tanhf polynomial, x + x^3 P(x^2) */
    small = ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z
              + 1.33314422036e-1f) * z - 3.33332819422e-1f) * z * a + a;
    /* otherwise 1 - 2/(e^{2a} + 1) = (1 - e)/(1 + e), e = e^{-2a} */
    e = cy_exp_nonpos_f32(-2.0f * a);
    large = (1.0f - e) / (1.0f + e);
    t = a < 0.625f ? small : large;
    t = x < 0.0f ? -t : t;
    return x != x ? x : t;
}

/* The row functions, one version per instruction-set level (_isa.h); the kernels call
 * them through pointers chosen by the level (cy_act_select). */

/* z[j] = sigmoid(z[j] + hz[j]), j < n */
CY_PER_LEVEL(void, cy_sigmoid_add_f32, (float *restrict z, const float *restrict hz, int n),
    for (int j = 0; j < n; j++) z[j] = cy_sigmoid_f32(z[j] + hz[j]);)

/* z[j] = tanh(z[j] + hz[j]), j < n */
CY_PER_LEVEL(void, cy_tanh_add_f32, (float *restrict z, const float *restrict hz, int n),
    for (int j = 0; j < n; j++) z[j] = cy_tanh_f32(z[j] + hz[j]);)

typedef struct {
    void (*sigmoid_add)(float *restrict, const float *restrict, int);
    void (*tanh_add)(float *restrict, const float *restrict, int);
} cy_act_f32;

static inline cy_act_f32 cy_act_select(int level)
{
    cy_act_f32 t = {cy_sigmoid_add_f32_by_level[level], cy_tanh_add_f32_by_level[level]};
    return t;
}

/* ---- float64 ------------------------------------------------------------------------
 *
 * glibc's scalar exp and tanh (tanh through expm1) took about 14% of a medium float64
 * training step (perf), and they do not vectorise. These are as accurate (within 2 ulps
 * of the exact value over tests/test_kernels.py's dense grid, where libm is within 1)
 * and auto-vectorise: e^x is a degree-13 Taylor polynomial after reducing x by
 * multiples of ln 2 (truncation error below 1e-17 relative, far under an ulp), and tanh
 * is Cephes' rational x + x^3 P(x^2)/Q(x^2) for |x| < 0.625 and (1 - e)/(1 + e),
 * e = e^{-2|x|}, above: no float32-grade shortcuts.
 *
 * Why "exact" arithmetic (no FMA contraction, CY_FP_EXACT): the same function must give
 * the same bits at every ISA level and in the streaming step (_step.pyx calls
 * cy_sigmoid_add_f64 / cy_tanh_add_f64, the baseline versions, whatever the level),
 * because a stream of steps must equal the sequence forward bit for bit
 * (tests/test_step.py). Additions, multiplications and divisions are correctly rounded
 * whatever the vector width, so without contraction every level computes the same
 * value; an FMA would round once instead of twice. */

#if defined(__clang__)
/* clang contracts within an expression unless told not to, per compound statement */
#define CY_FP_EXACT _Pragma("clang fp contract(off)")
#define CY_NO_CONTRACT
#elif defined(__GNUC__)
/* gcc contracts across statements at -O3 (-ffp-contract=fast) once FMA is enabled, as it
 * is for levels 1 and 2; the attribute turns that off for the function and for the
 * helpers inlined into it. */
#define CY_FP_EXACT
#define CY_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define CY_FP_EXACT
#define CY_NO_CONTRACT
#endif

/* e^x for x <= 0, down to the subnormals (x < -745.2 gives 0, as libm does).
 * n = round(x / ln2) through the 1.5*2^52 trick (no float->int conversion, which would
 * not vectorise), r = x - n ln2 in two parts (Cody-Waite; n * C1 is exact), |r| <= ln2/2,
 * e^r = 1 + r + r^2 (1/2! + r/3! + ... + r^11/13!), then 2^n as two factors 2^n1 2^n2,
 * each a normal double built in the exponent bits, so that results below 2^-1022 round
 * once, into the subnormals, like libm's. */
CY_INLINE double cy_exp_nonpos_f64(double x)
{
    CY_FP_EXACT
    const double magic = 6755399441055744.0;            /* 1.5 * 2^52 */
    double t, t1, n, r, p, s1, s2;
    int64_t t_bits, t1_bits, magic_bits, n_int, n1_int, b1, b2;
    x = x < -746.0 ? -746.0 : x;
    t = x * 1.4426950408889634074 + magic;
    n = t - magic;                                      /* in [-1076, 0] */
    r = x - n * 6.93145751953125e-1;                    /* C1: 15 bits, exact product */
    r = r - n * 1.42860682030941723212e-6;              /* C2 = ln2 - C1 */
    p = 1.0 / 6227020800.0;                             /* 1/13! */
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = 1.0 + (r + r * r * p);
    t1 = n * 0.5 + magic;                               /* n1 = round(n/2) in [-538, 0] */
    memcpy(&t_bits, &t, sizeof t);
    memcpy(&t1_bits, &t1, sizeof t1);
    memcpy(&magic_bits, &magic, sizeof magic);
    n_int = t_bits - magic_bits;
    n1_int = t1_bits - magic_bits;
    b1 = (n1_int + 1023) << 52;
    b2 = (n_int - n1_int + 1023) << 52;                 /* n2 = n - n1 in [-538, 0] */
    memcpy(&s1, &b1, sizeof s1);
    memcpy(&s2, &b2, sizeof s2);
    return p * s1 * s2;
}

/* sigmoid: 1/(1 + e) for x >= 0, e/(1 + e) below, e = e^{-|x|} (never overflows). */
CY_INLINE double cy_sigmoid_f64(double x)
{
    CY_FP_EXACT
    double e = cy_exp_nonpos_f64(-fabs(x));
    double r = 1.0 / (1.0 + e);
    double s = x >= 0.0 ? r : e * r;
    return x != x ? x : s;                              /* NaN in, NaN out */
}

/* tanh, one division for both branches: |x| < 0.625 a + (a s P(s)) / Q(s), s = x^2
 * (Cephes tanh.c, 2.5e-16 relative there); otherwise 0 + (1 - e)/(1 + e). */
CY_INLINE double cy_tanh_f64(double x)
{
    CY_FP_EXACT
    double a = fabs(x), s = x * x, e, num, den, base, t;
    double P = (-9.64399179425052238628e-1 * s - 9.92877231001918586564e1) * s
               - 1.61468768441708447952e3;
    double Q = ((s + 1.12811678491632931402e2) * s + 2.23548839060100448583e3) * s
               + 4.84406305325125486048e3;
    int small = a < 0.625;
    e = cy_exp_nonpos_f64(-2.0 * a);
    num = small ? a * s * P : 1.0 - e;
    den = small ? Q : 1.0 + e;
    base = small ? a : 0.0;
    t = copysign(base + num / den, x);                  /* tanh(-0) = -0, as libm */
    return x != x ? x : t;
}

/* z[j] = sigmoid(z[j] + hz[j]), j < n; the same bits at every level (see above) */
#define CY_PER_LEVEL_EXACT(RET, NAME, PARAMS, ...)                                        \
    CY_NO_CONTRACT static RET NAME##_l0 PARAMS { __VA_ARGS__ }                           \
    CY_NO_CONTRACT CY_TARGET_L1 static RET NAME##_l1 PARAMS { __VA_ARGS__ }              \
    CY_NO_CONTRACT CY_TARGET_L2 static RET NAME##_l2 PARAMS { __VA_ARGS__ }              \
    static RET (*const NAME##_by_level[CY_LEVELS]) PARAMS = {NAME##_l0, NAME##_l1, NAME##_l2};

CY_PER_LEVEL_EXACT(void, cy_sigmoid_add_f64_lv,
                   (double *restrict z, const double *restrict hz, int n),
    for (int j = 0; j < n; j++) z[j] = cy_sigmoid_f64(z[j] + hz[j]);)

/* z[j] = tanh(z[j] + hz[j]), j < n */
CY_PER_LEVEL_EXACT(void, cy_tanh_add_f64_lv,
                   (double *restrict z, const double *restrict hz, int n),
    for (int j = 0; j < n; j++) z[j] = cy_tanh_f64(z[j] + hz[j]);)

typedef struct {
    void (*sigmoid_add)(double *restrict, const double *restrict, int);
    void (*tanh_add)(double *restrict, const double *restrict, int);
} cy_act_f64;

static inline cy_act_f64 cy_act_select_f64(int level)
{
    cy_act_f64 t = {cy_sigmoid_add_f64_lv_by_level[level], cy_tanh_add_f64_lv_by_level[level]};
    return t;
}

/* The level-independent names the streaming step calls: the baseline versions, which
 * give the same bits as every level's. */
static inline void cy_sigmoid_add_f64(double *z, const double *hz, int n)
{
    cy_sigmoid_add_f64_lv_l0(z, hz, n);
}

static inline void cy_tanh_add_f64(double *z, const double *hz, int n)
{
    cy_tanh_add_f64_lv_l0(z, hz, n);
}

#endif
