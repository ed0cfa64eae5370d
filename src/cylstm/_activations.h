/* Gate activations for cylstm, over contiguous rows, written so that GCC/Clang
 * auto-vectorise them at -O3 (no calls, no branches: selects only).
 *
 * float32: glibc's scalar expf/tanhf (tanhf goes through expm1f) took more than half of
 * a medium forward pass (perf). Here exp is the Cephes polynomial with a 2^n scale built
 * in the exponent bits, and tanh is Cephes' minimax polynomial for |x| < 0.625 and
 * 1 - 2/(e^{2|x|} + 1) above: both within a few float32 ulps of the exact value
 * (tests/test_kernels.py checks them against float64 over a dense grid). No input, however
 * large or small, gives NaN or Inf; NaN propagates as NaN.
 * float64 keeps libm's exp and tanh: exact to double rounding, and float64 users asked
 * for precision. */
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

static inline double cy_sigmoid_f64(double x)
{
    double e = exp(-fabs(x));
    double r = 1.0 / (1.0 + e);
    return x >= 0.0 ? r : e * r;
}

static inline void cy_sigmoid_add_f64(double *z, const double *hz, int n)
{
    for (int j = 0; j < n; j++) z[j] = cy_sigmoid_f64(z[j] + hz[j]);
}

static inline void cy_tanh_add_f64(double *z, const double *hz, int n)
{
    for (int j = 0; j < n; j++) z[j] = tanh(z[j] + hz[j]);
}

#endif
