/* The LSTM cell update and its gate derivatives, per batch row, as numbered in
 * docs/math.md and in _lstm.pyx / reference.py:
 *
 *   forward   (3) c_t = f * c_{t-1} + i * g      (4) m_t = o * tanh(c_t)
 *   backward  (4') do = dm * tanh(c_t);  dc += dm * o * (1 - tanh(c_t)^2)
 *             (3') di = dc * g;  dg = dc * i;  df = dc * c_{t-1};  dc_{t-1} = dc * f
 *             (2') dz = [di i(1-i), df f(1-f), dg (1-g^2), do o(1-o)]
 *
 * In C with restrict so that they vectorise: in Cython, gcc could not rule out aliasing
 * and ran these loops scalar (SSE2 at best). tanh is _activations.h's in both dtypes
 * (libm's tanh does not vectorise). One version per instruction-set level
 * (_isa.h), chosen at run time through cy_cell_select. */
#ifndef CYLSTM_CELL_H
#define CYLSTM_CELL_H

#include <math.h>
#include <stddef.h>
#include <string.h>

#include "_isa.h"
#include "_activations.h"

/* (3) (4) for one batch row. z: the activated gates [i|f|g|o], each block H long and
 * the blocks gs apart (gs = H for a whole row; the streaming step passes a slice of
 * units); c (H,) INOUT; m (H,) OUT; tc (H,) OUT tanh(c_t), or NULL. */
#define CY_CELL_BODY(T, TANH)                                                       \
    const T *zi = z, *zf = z + gs, *zg = z + 2 * (size_t) gs, *zo = z + 3 * (size_t) gs;  \
    for (int j = 0; j < H; j++)                                                     \
        c[j] = zf[j] * c[j] + zi[j] * zg[j];                        /* (3) */       \
    for (int j = 0; j < H; j++)                                                     \
        m[j] = TANH(c[j]);                                                          \
    if (tc != NULL)                                                                 \
        memcpy(tc, m, (size_t) H * sizeof(T));                                      \
    for (int j = 0; j < H; j++)                                                     \
        m[j] = zo[j] * m[j];                                        /* (4) */

CY_PER_LEVEL(void, cy_cell_f32, (float *restrict c, float *restrict m, float *restrict tc,
                                 const float *restrict z, int H, int gs),
    CY_CELL_BODY(float, cy_tanh_f32))

CY_PER_LEVEL(void, cy_cell_f64, (double *restrict c, double *restrict m,
                                 double *restrict tc, const double *restrict z, int H,
                                 int gs),
    CY_CELL_BODY(double, cy_tanh_f64))

/* (4') (3') (2') for one batch row: dc (H,) INOUT dL/dc_t in, dL/dc_{t-1} out; dz (4H,)
 * OUT; z (4H,) the activated gates [i|f|g|o]; tc (H,) tanh(c_t); cprev (H,) c_{t-1};
 * dm (H,) dL/dm_t. */
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

CY_PER_LEVEL(void, cy_gate_grads_f32, (float *restrict dz, float *restrict dc,
                                       const float *restrict z, const float *restrict tc,
                                       const float *restrict cprev,
                                       const float *restrict dm, int H),
    CY_GATE_GRADS_BODY(float))

CY_PER_LEVEL(void, cy_gate_grads_f64, (double *restrict dz, double *restrict dc,
                                       const double *restrict z, const double *restrict tc,
                                       const double *restrict cprev,
                                       const double *restrict dm, int H),
    CY_GATE_GRADS_BODY(double))

typedef struct {
    void (*cell_f32)(float *restrict, float *restrict, float *restrict,
                     const float *restrict, int, int);
    void (*cell_f64)(double *restrict, double *restrict, double *restrict,
                     const double *restrict, int, int);
    void (*gate_grads_f32)(float *restrict, float *restrict, const float *restrict,
                           const float *restrict, const float *restrict,
                           const float *restrict, int);
    void (*gate_grads_f64)(double *restrict, double *restrict, const double *restrict,
                           const double *restrict, const double *restrict,
                           const double *restrict, int);
} cy_cell_fns;

static inline cy_cell_fns cy_cell_select(int level)
{
    cy_cell_fns t = {cy_cell_f32_by_level[level], cy_cell_f64_by_level[level],
                     cy_gate_grads_f32_by_level[level], cy_gate_grads_f64_by_level[level]};
    return t;
}

#endif
