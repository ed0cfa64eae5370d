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

/* The row loops are compiled for AVX-512 and AVX2+FMA as well as the baseline, and the
 * best one the CPU has is chosen at load time (GCC function multi-versioning, x86-64
 * ELF only), so a wheel built for any x86-64 still runs the wide vectors. The clones may
 * round differently from each other (FMA), never from one run to the next. */
#if defined(__GNUC__) || defined(__clang__)
#define CY_INLINE static inline __attribute__((always_inline))
#else
#define CY_INLINE static inline
#endif
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__ELF__)
#define CY_ROWS __attribute__((target_clones("avx512f", "arch=haswell", "default"))) static
#else
#define CY_ROWS static inline
#endif

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

/* z[j] = sigmoid(z[j] + hz[j]), j < n */
CY_ROWS void cy_sigmoid_add_f32(float *restrict z, const float *restrict hz, int n)
{
    for (int j = 0; j < n; j++) z[j] = cy_sigmoid_f32(z[j] + hz[j]);
}

/* z[j] = tanh(z[j] + hz[j]), j < n */
CY_ROWS void cy_tanh_add_f32(float *restrict z, const float *restrict hz, int n)
{
    for (int j = 0; j < n; j++) z[j] = cy_tanh_f32(z[j] + hz[j]);
}

/* out[j] = tanh(in[j]), j < n */
CY_ROWS void cy_tanh_f32_array(float *restrict out, const float *restrict in, int n)
{
    for (int j = 0; j < n; j++) out[j] = cy_tanh_f32(in[j]);
}

/* (3) (4) of the forward for one batch row: c = f * c + i * g; tc = tanh(c); m = o * tc.
 * z: the activated gates [i|f|g|o], each block H long, blocks gs apart (gs = H for a
 * whole row; the streaming step passes a slice of units); c (H,) INOUT; m (H,) OUT;
 * tc (H,) OUT or NULL.
 * In C for the same reasons as cy_gate_grads below: in Cython these loops ran scalar. */
#define CY_CELL_BODY(T, TANH)                                                       \
    const T *zi = z, *zf = z + gs, *zg = z + 2 * (size_t) gs, *zo = z + 3 * (size_t) gs;  \
    for (int j = 0; j < H; j++)                                                     \
        c[j] = zf[j] * c[j] + zi[j] * zg[j];                                        \
    for (int j = 0; j < H; j++)                                                     \
        m[j] = TANH(c[j]);                                                          \
    if (tc != NULL)                                                                 \
        memcpy(tc, m, (size_t) H * sizeof(T));                                      \
    for (int j = 0; j < H; j++)                                                     \
        m[j] = zo[j] * m[j];

CY_ROWS void cy_cell_f32(float *restrict c, float *restrict m, float *restrict tc,
                         const float *restrict z, int H, int gs)
{
    CY_CELL_BODY(float, cy_tanh_f32)
}

CY_ROWS void cy_cell_f64(double *restrict c, double *restrict m, double *restrict tc,
                         const double *restrict z, int H, int gs)
{
    CY_CELL_BODY(double, tanh)
}

/* The backward's gate derivatives for one batch row (_lstm.pyx, (4') (3') (2')):
 * dc (H,) INOUT dL/dc_t in, dL/dc_{t-1} out; dz (4H,) OUT; z (4H,) the activated gates
 * [i|f|g|o]; tc (H,) tanh(c_t); cprev (H,) c_{t-1}; dm (H,) dL/dm_t. In C with restrict
 * so that it vectorises (clones for AVX-512 / AVX2): in Cython, gcc could not rule out
 * aliasing and ran it scalar, SSE2 at best. */
#define CY_GATE_GRADS_BODY(T)                                                       \
    /* gate blocks as pointers: with -fwrapv (Python's flags) an index H + j may    \
     * wrap, and gcc would not vectorise the loop */                                \
    const T *zi = z, *zf = z + H, *zg = z + 2 * (size_t) H, *zo = z + 3 * (size_t) H;  \
    T *dzi = dz, *dzf = dz + H, *dzg = dz + 2 * (size_t) H, *dzo = dz + 3 * (size_t) H;  \
    for (int j = 0; j < H; j++) {                                                   \
        T ig = zi[j], fg = zf[j], gg = zg[j], og = zo[j], t = tc[j], dh = dm[j];    \
        T dcj = dc[j] + dh * og * (1 - t * t);                          /* (4') */  \
        dzi[j] = dcj * gg * ig * (1 - ig);                         /* (3') (2') */  \
        dzf[j] = dcj * cprev[j] * fg * (1 - fg);                                    \
        dzg[j] = dcj * ig * (1 - gg * gg);                                          \
        dzo[j] = dh * t * og * (1 - og);                                            \
        dc[j] = dcj * fg;                                                           \
    }

CY_ROWS void cy_gate_grads_f32(float *restrict dz, float *restrict dc, const float *restrict z,
                               const float *restrict tc, const float *restrict cprev,
                               const float *restrict dm, int H)
{
    CY_GATE_GRADS_BODY(float)
}

CY_ROWS void cy_gate_grads_f64(double *restrict dz, double *restrict dc,
                               const double *restrict z, const double *restrict tc,
                               const double *restrict cprev, const double *restrict dm, int H)
{
    CY_GATE_GRADS_BODY(double)
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

static inline void cy_tanh_f64_array(double *out, const double *in, int n)
{
    for (int j = 0; j < n; j++) out[j] = tanh(in[j]);
}

#endif
