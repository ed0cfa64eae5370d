/* The per-step products of the LSTM time loop, float32, on weights packed once per call.
 *
 *   C (M, N) = A (M, K) @ W (K, N),   W packed by cy_pack_f32 into panels of 16 columns
 *
 * Why not BLAS: OpenBLAS packs its operands on every call, so a per-step GEMM re-packs
 * the whole recurrent matrix T times per sequence (perf: 20-23% of a medium training step
 * in sgemm_*copy). Here W is packed once per kernel call and read by every step from
 * the calling thread's cache. M (the thread's batch rows) is small, so the kernel keeps
 * a block of C in registers (AVX-512: up to 6 rows x 64 columns or 8 rows x 32) and
 * streams the packed panels.
 *
 * Packed layout: panel p (columns 16p .. 16p+15) holds K rows of 16 floats, row k being
 * W[k, 16p .. 16p+15], zero-padded past N. Panels follow each other.
 *
 * Determinism: every element of C is one FMA chain over k = 0..K-1 in order, whatever M
 * and however the rows are grouped, so results never depend on the thread count. The
 * AVX-512 and AVX2 versions compute the same chains with different blockings (AVX-512:
 * blocks of up to 8 rows x 1-4 panels; AVX2: 1-2 rows x 2-4 panels, or up to 6 rows x
 * one panel); the ISA level (_isa.h) chooses one. Level 0 (and non-x86 CPUs) gets NULL
 * from cy_rgemm_select, and the kernels use BLAS.
 *
 * The medium config's step alone (M=16 N=1024 K=256, 1 thread, AVX-512) runs at about
 * 137 GFLOP/s. */
#ifndef CYLSTM_RGEMM_H
#define CYLSTM_RGEMM_H

#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "_isa.h"

#define CY_NR 16

/* ---- Packing ------------------------------------------------------------------------
 *
 * The forward packs W^T from PyTorch's (N, K) layout at every call, one panel element
 * per weight: element by element, each read strided by a row of W, it cost about as
 * much as 8 of the tiny config's 50 steps (N = 256, K = 96: 9.7 us; the medium config's
 * [W_ih | W_hh], N = 1024, K = 512: 204 us). At ISA level 1 and up (_isa.h) the bulk
 * goes through AVX2 register transposes (8 x 8 floats, 4 x 4 doubles: rows of W, each
 * read as one vector); the edges, and everything at level 0, are copied element by
 * element. Packing only copies, so every path gives the same bits. */

/* The ISA level the transposing packs follow, set by the including module's level hook
 * (never above the CPU's level, so level >= 1 means AVX2 is there). */
static int cy_pack_level = 0;

#ifdef CY_HAVE_X86_LEVELS
#include <immintrin.h>
#define CY_HAVE_X86_PACK 1

/* dst[k * ds + i] = w[i * ldw + k] for i, k in 0..7. */
__attribute__((target("avx2"))) static inline void
cy_transpose8_f32(float *dst, size_t ds, const float *w, size_t ldw)
{
    __m256 r0 = _mm256_loadu_ps(w), r1 = _mm256_loadu_ps(w + ldw);
    __m256 r2 = _mm256_loadu_ps(w + 2 * ldw), r3 = _mm256_loadu_ps(w + 3 * ldw);
    __m256 r4 = _mm256_loadu_ps(w + 4 * ldw), r5 = _mm256_loadu_ps(w + 5 * ldw);
    __m256 r6 = _mm256_loadu_ps(w + 6 * ldw), r7 = _mm256_loadu_ps(w + 7 * ldw);
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
    _mm256_storeu_ps(dst, _mm256_permute2f128_ps(s0, s4, 0x20));
    _mm256_storeu_ps(dst + ds, _mm256_permute2f128_ps(s1, s5, 0x20));
    _mm256_storeu_ps(dst + 2 * ds, _mm256_permute2f128_ps(s2, s6, 0x20));
    _mm256_storeu_ps(dst + 3 * ds, _mm256_permute2f128_ps(s3, s7, 0x20));
    _mm256_storeu_ps(dst + 4 * ds, _mm256_permute2f128_ps(s0, s4, 0x31));
    _mm256_storeu_ps(dst + 5 * ds, _mm256_permute2f128_ps(s1, s5, 0x31));
    _mm256_storeu_ps(dst + 6 * ds, _mm256_permute2f128_ps(s2, s6, 0x31));
    _mm256_storeu_ps(dst + 7 * ds, _mm256_permute2f128_ps(s3, s7, 0x31));
}

/* dst[k * ds + i] = w[i * ldw + k] for i, k in 0..3. */
__attribute__((target("avx2"))) static inline void
cy_transpose4_f64(double *dst, size_t ds, const double *w, size_t ldw)
{
    __m256d r0 = _mm256_loadu_pd(w), r1 = _mm256_loadu_pd(w + ldw);
    __m256d r2 = _mm256_loadu_pd(w + 2 * ldw), r3 = _mm256_loadu_pd(w + 3 * ldw);
    __m256d t0 = _mm256_unpacklo_pd(r0, r1), t1 = _mm256_unpackhi_pd(r0, r1);
    __m256d t2 = _mm256_unpacklo_pd(r2, r3), t3 = _mm256_unpackhi_pd(r2, r3);
    _mm256_storeu_pd(dst, _mm256_permute2f128_pd(t0, t2, 0x20));
    _mm256_storeu_pd(dst + ds, _mm256_permute2f128_pd(t1, t3, 0x20));
    _mm256_storeu_pd(dst + 2 * ds, _mm256_permute2f128_pd(t0, t2, 0x31));
    _mm256_storeu_pd(dst + 3 * ds, _mm256_permute2f128_pd(t1, t3, 0x31));
}

/* Transpose one panel's block [0, jv) x [0, kv) of W^T (rows n0.. of W, jv and kv
 * multiples of the transpose's size) into the panel dst of width NR. */
__attribute__((target("avx2"))) static void
cy_pack_block_f32(float *dst, const float *w, int jv, int kv, int ldw, int NR)
{
    for (int j0 = 0; j0 < jv; j0 += 8)
        for (int k = 0; k < kv; k += 8)
            cy_transpose8_f32(dst + (size_t) k * NR + j0, NR, w + (size_t) j0 * ldw + k, ldw);
}

__attribute__((target("avx2"))) static void
cy_pack_block_f64(double *dst, const double *w, int jv, int kv, int ldw, int NR)
{
    for (int j0 = 0; j0 < jv; j0 += 4)
        for (int k = 0; k < kv; k += 4)
            cy_transpose4_f64(dst + (size_t) k * NR + j0, NR, w + (size_t) j0 * ldw + k, ldw);
}
#endif

/* Floats needed to pack a (K, N) matrix. */
static inline size_t cy_packed_size(int K, int N)
{
    return (size_t) ((N + CY_NR - 1) / CY_NR) * (size_t) K * CY_NR;
}

/* Pack W (K, N) into rows [k0, k0 + K) of panels that hold Kt rows (packed for a (Kt, N)
 * matrix): stacking two matrices along K packs [W1; W2] for one product over both.
 * trans = 0: w is W, row-major (K, N), row stride ldw. trans = 1: w is W^T, row-major
 * (N, K), row stride ldw (PyTorch's weight layout). */
static inline void cy_pack_rows_f32(float *packed, const float *w, int K, int N, int ldw,
                                    int trans, int k0, int Kt)
{
    int np = (N + CY_NR - 1) / CY_NR, fast = 0;
#ifdef CY_HAVE_X86_PACK
    fast = trans && cy_pack_level >= 1;
#endif
    for (int p = 0; p < np; p++) {
        float *dst = packed + ((size_t) p * Kt + k0) * CY_NR;
        int n0 = p * CY_NR, nv = N - n0 < CY_NR ? N - n0 : CY_NR;
        int jv = fast ? nv / 8 * 8 : 0, kv = fast ? K / 8 * 8 : 0;   /* done by transposes */
#ifdef CY_HAVE_X86_PACK
        if (fast)
            cy_pack_block_f32(dst, w + (size_t) n0 * ldw, jv, kv, ldw, CY_NR);
#endif
        for (int k = 0; k < K; k++) {
            float *row = dst + (size_t) k * CY_NR;
            for (int j = k < kv ? jv : 0; j < nv; j++)
                row[j] = trans ? w[(size_t) (n0 + j) * ldw + k] : w[(size_t) k * ldw + n0 + j];
            for (int j = nv; j < CY_NR; j++)
                row[j] = 0.0f;
        }
    }
}

/* Pack W (K, N) for cy_gemm_packed_f32 (trans and ldw as in cy_pack_rows_f32). */
static inline void cy_pack_f32(float *packed, const float *w, int K, int N, int ldw, int trans)
{
    cy_pack_rows_f32(packed, w, K, N, ldw, trans, 0, K);
}

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#include <immintrin.h>
#define CY_HAVE_X86_KERNELS 1

/* With fewer than 4 rows GCC folds each panel load into every row's FMA as a memory
 * operand, so a block of 3 rows loads each panel vector 3 times and runs slower than a
 * block of 4 (M = 3, N = 1024, K = 384, 1 thread: 31.5 us against 23.8 for M = 4). An
 * empty asm that takes the loaded vectors as register operands keeps one load per
 * vector (M = 3: 19.9 us; M = 2: 23.3 -> 17.1; M = 1: 17.8 -> 14.6); it changes the
 * instructions' operands, never the arithmetic or its order. With 4 rows or more GCC
 * already keeps them in registers. */
#define CY_KEEP_IN_REGISTERS(MR, NP, b)                                                   \
    do {                                                                                   \
        if ((MR) < 4)                                                                      \
            for (int q_ = 0; q_ < (NP); q_++)                                              \
                __asm__("" : "+v"((b)[q_]));                                               \
    } while (0)

/* AVX-512: MR rows x NP panels (16*NP columns) in MR*NP zmm accumulators. Few rows get
 * more panels, so that enough independent FMA chains hide the FMA latency (one row and
 * two panels would wait on each FMA, and B = 1 would run slower than BLAS). */
__attribute__((target("avx512f"))) static inline __attribute__((always_inline)) void
cy_block_avx512(const int MR, const int NP, int K, const float *A, int lda,
                const float *panel, size_t pstride, float *C, int ldc, const __mmask16 *mask)
{
    __m512 acc[8][4];
    for (int r = 0; r < MR; r++)
        for (int q = 0; q < NP; q++)
            acc[r][q] = _mm512_setzero_ps();
    for (int k = 0; k < K; k++) {
        __m512 b[4];
        for (int q = 0; q < NP; q++)
            b[q] = _mm512_loadu_ps(panel + q * pstride + (size_t) k * CY_NR);
        CY_KEEP_IN_REGISTERS(MR, NP, b);
        for (int r = 0; r < MR; r++) {
            __m512 a = _mm512_set1_ps(A[(size_t) r * lda + k]);
            for (int q = 0; q < NP; q++)
                acc[r][q] = _mm512_fmadd_ps(a, b[q], acc[r][q]);
        }
    }
    for (int r = 0; r < MR; r++)
        for (int q = 0; q < NP; q++)
            _mm512_mask_storeu_ps(C + (size_t) r * ldc + q * CY_NR, mask[q], acc[r][q]);
}

#define CY_B512(MR, NP) cy_block_avx512(MR, NP, K, a, lda, panel, pstride, c, ldc, mask)

/* One row block of MR (1..8) rows against npan (1..4) consecutive panels. Up to 6 rows
 * take all npan panels at once (at most 24 accumulators and 4 panel vectors of the 32
 * zmm registers): each panel vector loaded serves more rows, and a block of 4-6 rows
 * ran 5-13% faster than with 2 panels at a time (N = 1024, K = 384: M = 6 35.6 -> 31.1
 * us, M = 12 = 8 + 4 rows 65.4 -> 58.7). 7 and 8 rows take 2 panels at a time. */
__attribute__((target("avx512f"))) static void
cy_rows_avx512(int MR, int npan, int K, const float *a, int lda, const float *panel,
               size_t pstride, float *c, int ldc, const __mmask16 *mask)
{
    if (MR >= 7) {                      /* 2 panels at a time: up to 16 accumulators */
        for (int q = 0; q < npan; q += 2) {
            int two = q + 1 < npan;
            const float *pn = panel + q * pstride;
            const __mmask16 *mk = mask + q;
            float *cq = c + q * CY_NR;
#define CY_B512Q(M) (two ? cy_block_avx512(M, 2, K, a, lda, pn, pstride, cq, ldc, mk) \
                         : cy_block_avx512(M, 1, K, a, lda, pn, pstride, cq, ldc, mk))
            if (MR == 8)
                CY_B512Q(8);
            else
                CY_B512Q(7);
#undef CY_B512Q
        }
        return;
    }
    switch (MR * 4 + npan) {            /* 1-6 rows: all npan panels at once */
    case 25: CY_B512(6, 1); break;
    case 26: CY_B512(6, 2); break;
    case 27: CY_B512(6, 3); break;
    case 28: CY_B512(6, 4); break;
    case 21: CY_B512(5, 1); break;
    case 22: CY_B512(5, 2); break;
    case 23: CY_B512(5, 3); break;
    case 24: CY_B512(5, 4); break;
    case 17: CY_B512(4, 1); break;
    case 18: CY_B512(4, 2); break;
    case 19: CY_B512(4, 3); break;
    case 20: CY_B512(4, 4); break;
    case 13: CY_B512(3, 1); break;
    case 14: CY_B512(3, 2); break;
    case 15: CY_B512(3, 3); break;
    case 16: CY_B512(3, 4); break;
    case 9: CY_B512(2, 1); break;
    case 10: CY_B512(2, 2); break;
    case 11: CY_B512(2, 3); break;
    case 12: CY_B512(2, 4); break;
    case 5: CY_B512(1, 1); break;
    case 6: CY_B512(1, 2); break;
    case 7: CY_B512(1, 3); break;
    case 8: CY_B512(1, 4); break;
    default: break;
    }
}
#undef CY_B512

__attribute__((target("avx512f"))) static void
cy_gemm_packed_avx512(int M, int N, int K, const float *A, int lda, const float *Bp,
                      float *C, int ldc)
{
    int np = (N + CY_NR - 1) / CY_NR;
    size_t pstride = (size_t) K * CY_NR;
    for (int p = 0; p < np; p += 4) {   /* groups of up to 4 panels, all rows each */
        int npan = np - p < 4 ? np - p : 4;
        __mmask16 mask[4];
        for (int q = 0; q < npan; q++) {
            int nv = N - (p + q) * CY_NR < CY_NR ? N - (p + q) * CY_NR : CY_NR;
            mask[q] = (__mmask16) ((1u << nv) - 1u);
        }
        const float *panel = Bp + (size_t) p * pstride;
        for (int i = 0, mr; i < M; i += mr) {
            /* blocks of 8 rows; 9-11 rows left are cut 5+4, 5+5 or 6+5 rather than
             * 8 + 1-3: a block of 1-3 rows reads all the panels for little work
             * (N = 1024, K = 384: M = 9 58.0 -> 46.8 us, M = 17 95.1 -> 81.6) */
            mr = M - i <= 8 ? M - i : M - i < 12 ? (M - i + 1) / 2 : 8;
            cy_rows_avx512(mr, npan, K, A + (size_t) i * lda, lda, panel, pstride,
                           C + (size_t) i * ldc + p * CY_NR, ldc, mask);
        }
    }
}

/* AVX2 + FMA: MR rows x one panel (16 columns) in 2*MR ymm accumulators. */
__attribute__((target("avx2,fma"))) static inline __attribute__((always_inline)) void
cy_block_avx2(const int MR, int K, const float *A, int lda, const float *panel, float *C,
              int ldc, int nv)
{
    __m256 lo[6], hi[6];
    for (int r = 0; r < MR; r++) {
        lo[r] = _mm256_setzero_ps();
        hi[r] = _mm256_setzero_ps();
    }
    for (int k = 0; k < K; k++) {
        __m256 b0 = _mm256_loadu_ps(panel + (size_t) k * CY_NR);
        __m256 b1 = _mm256_loadu_ps(panel + (size_t) k * CY_NR + 8);
        for (int r = 0; r < MR; r++) {
            __m256 a = _mm256_broadcast_ss(A + (size_t) r * lda + k);
            lo[r] = _mm256_fmadd_ps(a, b0, lo[r]);
            hi[r] = _mm256_fmadd_ps(a, b1, hi[r]);
        }
    }
    for (int r = 0; r < MR; r++) {
        if (nv == CY_NR) {
            _mm256_storeu_ps(C + (size_t) r * ldc, lo[r]);
            _mm256_storeu_ps(C + (size_t) r * ldc + 8, hi[r]);
        } else {
            float tmp[CY_NR];
            _mm256_storeu_ps(tmp, lo[r]);
            _mm256_storeu_ps(tmp + 8, hi[r]);
            memcpy(C + (size_t) r * ldc, tmp, (size_t) nv * sizeof(float));
        }
    }
}

/* AVX2, 1 or 2 rows: MR rows x NP full panels in 2*MR*NP ymm accumulators, so that one
 * row still has 8 independent FMA chains; one panel at a time (cy_block_avx2) would give
 * it 2, each waiting on the FMA before (M = 1, N = 1024, K = 384: 36.8 us -> 19.2). */
__attribute__((target("avx2,fma"))) static inline __attribute__((always_inline)) void
cy_few_avx2(const int MR, const int NP, int K, const float *A, int lda, const float *panel,
            size_t pstride, float *C, int ldc)
{
    __m256 lo[2][4], hi[2][4];
    for (int r = 0; r < MR; r++)
        for (int q = 0; q < NP; q++)
            lo[r][q] = hi[r][q] = _mm256_setzero_ps();
    for (int k = 0; k < K; k++) {
        __m256 a[2];
        for (int r = 0; r < MR; r++)
            a[r] = _mm256_broadcast_ss(A + (size_t) r * lda + k);
        for (int q = 0; q < NP; q++) {
            __m256 b0 = _mm256_loadu_ps(panel + q * pstride + (size_t) k * CY_NR);
            __m256 b1 = _mm256_loadu_ps(panel + q * pstride + (size_t) k * CY_NR + 8);
            for (int r = 0; r < MR; r++) {
                lo[r][q] = _mm256_fmadd_ps(a[r], b0, lo[r][q]);
                hi[r][q] = _mm256_fmadd_ps(a[r], b1, hi[r][q]);
            }
        }
    }
    for (int r = 0; r < MR; r++)
        for (int q = 0; q < NP; q++) {
            _mm256_storeu_ps(C + (size_t) r * ldc + q * CY_NR, lo[r][q]);
            _mm256_storeu_ps(C + (size_t) r * ldc + q * CY_NR + 8, hi[r][q]);
        }
}

/* Every row against one panel at a time, 6-row blocks. (cy_gemm_packed_avx2 gives a
 * remainder of 1-2 rows to cy_few_avx2 instead: M = 7, N = 1024, K = 384 took 94.6 us
 * against 58.6 for M = 6, the lone row running 2 FMA chains per panel.) */
__attribute__((target("avx2,fma"))) static void
cy_panels_avx2(int M, int N, int K, const float *A, int lda, const float *Bp, float *C,
               int ldc)
{
    int np = (N + CY_NR - 1) / CY_NR;
    for (int p = 0; p < np; p++) {
        const float *panel = Bp + (size_t) p * K * CY_NR;
        int nv = N - p * CY_NR < CY_NR ? N - p * CY_NR : CY_NR;
        float *c = C + p * CY_NR;
        int i = 0;
        for (; i + 6 <= M; i += 6)
            cy_block_avx2(6, K, A + (size_t) i * lda, lda, panel, c + (size_t) i * ldc, ldc, nv);
        switch (M - i) {
        case 5: cy_block_avx2(5, K, A + (size_t) i * lda, lda, panel, c + (size_t) i * ldc, ldc, nv); break;
        case 4: cy_block_avx2(4, K, A + (size_t) i * lda, lda, panel, c + (size_t) i * ldc, ldc, nv); break;
        case 3: cy_block_avx2(3, K, A + (size_t) i * lda, lda, panel, c + (size_t) i * ldc, ldc, nv); break;
        case 2: cy_block_avx2(2, K, A + (size_t) i * lda, lda, panel, c + (size_t) i * ldc, ldc, nv); break;
        case 1: cy_block_avx2(1, K, A + (size_t) i * lda, lda, panel, c + (size_t) i * ldc, ldc, nv); break;
        default: break;
        }
    }
}

__attribute__((target("avx2,fma"))) static void
cy_gemm_packed_avx2(int M, int N, int K, const float *A, int lda, const float *Bp,
                    float *C, int ldc)
{
    int p = 0, r = M % 6;
    if (M > 6 && (r == 1 || r == 2)) {  /* 6-row blocks, then the last 1-2 rows as below */
        cy_panels_avx2(M - r, N, K, A, lda, Bp, C, ldc);
        cy_gemm_packed_avx2(r, N, K, A + (size_t) (M - r) * lda, lda, Bp,
                            C + (size_t) (M - r) * ldc, ldc);
        return;
    }
    if (M == 1 || M == 2) {             /* full panels in groups: see cy_few_avx2 */
        size_t pstride = (size_t) K * CY_NR;
        int NP = M == 1 ? 4 : 2;
        for (; p + NP <= N / CY_NR; p += NP) {
            if (M == 1)
                cy_few_avx2(1, 4, K, A, lda, Bp + p * pstride, pstride, C + p * CY_NR, ldc);
            else
                cy_few_avx2(2, 2, K, A, lda, Bp + p * pstride, pstride, C + p * CY_NR, ldc);
        }
    }
    if (p * CY_NR < N)
        cy_panels_avx2(M, N - p * CY_NR, K, A, lda, Bp + (size_t) p * K * CY_NR,
                       C + p * CY_NR, ldc);
}
#endif

/* ---- Few rows on unpacked weights (the streaming step) ----------------------------
 *
 *   C (M, N) = A (M, K) @ W^T,   W (N, K) row-major, PyTorch's layout, read in place
 *
 * A streaming step (T = 1, B small) reads every weight once, so packing would copy the
 * whole matrix to use it once (a packed T = 1 step is several times slower than BLAS
 * at H = 256), and a copy packed once and kept could go stale when the weights change. This
 * kernel dots rows of W with rows of A: W streams from memory contiguously, once per
 * two rows of A. Each C element is the same computation whatever M and N and however
 * rows are grouped (two accumulators, even and odd 16-float blocks of k, then a fixed
 * reduction), so splitting N across threads never changes a bit.
 * Alone (1 thread, M = 1, N = 1024, K = 256 = 1 MiB in L2) it streams about 128 GB/s,
 * nearly three times OpenBLAS's sgemv on the same. */
#ifdef CY_HAVE_X86_KERNELS
__attribute__((target("avx512f"))) static inline __attribute__((always_inline)) void
cy_dot_block_avx512(const int MR, const int NR, int K, const float *A, int lda,
                    const float *W, int ldw, float *C, int ldc)
{
    __m512 e[2][4], o[2][4];
    int k = 0;
    for (int m = 0; m < MR; m++)
        for (int n = 0; n < NR; n++)
            e[m][n] = o[m][n] = _mm512_setzero_ps();
    for (; k + 32 <= K; k += 32) {
        __m512 a0[2], a1[2];
        for (int m = 0; m < MR; m++) {
            a0[m] = _mm512_loadu_ps(A + (size_t) m * lda + k);
            a1[m] = _mm512_loadu_ps(A + (size_t) m * lda + k + 16);
        }
        for (int n = 0; n < NR; n++) {
            __m512 w0 = _mm512_loadu_ps(W + (size_t) n * ldw + k);
            __m512 w1 = _mm512_loadu_ps(W + (size_t) n * ldw + k + 16);
            for (int m = 0; m < MR; m++) {
                e[m][n] = _mm512_fmadd_ps(a0[m], w0, e[m][n]);
                o[m][n] = _mm512_fmadd_ps(a1[m], w1, o[m][n]);
            }
        }
    }
    for (int half = 0; k < K; k += 16, half ^= 1) {     /* tail: up to two masked blocks */
        int nv = K - k < 16 ? K - k : 16;
        __mmask16 mk = (__mmask16) ((1u << nv) - 1u);
        for (int n = 0; n < NR; n++) {
            __m512 w = _mm512_maskz_loadu_ps(mk, W + (size_t) n * ldw + k);
            for (int m = 0; m < MR; m++) {
                __m512 a = _mm512_maskz_loadu_ps(mk, A + (size_t) m * lda + k);
                if (half)
                    o[m][n] = _mm512_fmadd_ps(a, w, o[m][n]);
                else
                    e[m][n] = _mm512_fmadd_ps(a, w, e[m][n]);
            }
        }
    }
    for (int m = 0; m < MR; m++)
        for (int n = 0; n < NR; n++)
            C[(size_t) m * ldc + n] = _mm512_reduce_add_ps(_mm512_add_ps(e[m][n], o[m][n]));
}

/* The same block for 4 weight rows none of which starts on a 64-byte boundary (NumPy's
 * large arrays start 16 bytes past a page, so PyTorch-layout weights in flat_params
 * usually do): every 16-float vector would straddle two cache lines. Here each line is
 * loaded once, aligned, and the vector is put together from two lines with a permute:
 * the same values as the unaligned load, so the same bits. The first load holds the
 * row's first float and the last one its last float of the main loop, so nothing is
 * read from a line without data of the row.
 * On weights 16 bytes past a boundary this makes the M = 1, N = 1024, K = 256 product
 * about a quarter faster than unaligned loads; on aligned weights it changes nothing.
 * Software prefetching of the next rows is left out: it made the kernel slower. */
__attribute__((target("avx512f"))) static inline __attribute__((always_inline)) void
cy_dot_block_avx512_shifted(const int MR, int K, const float *A, int lda, const float *W,
                            int ldw, float *C, int ldc)
{
    const int NR = 4;
    __m512 e[2][4], o[2][4], lo[4];
    __m512i idx[4];
    const float *base[4];
    int k = 0;
    for (int n = 0; n < NR; n++) {
        int s = (int) (((size_t) (W + (size_t) n * ldw) & 63u) >> 2);
        base[n] = W + (size_t) n * ldw - s;
        idx[n] = _mm512_add_epi32(_mm512_set1_epi32(s),
                                  _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
                                                    12, 13, 14, 15));
        lo[n] = _mm512_load_ps(base[n]);
        for (int m = 0; m < MR; m++)
            e[m][n] = o[m][n] = _mm512_setzero_ps();
    }
    for (; k + 32 <= K; k += 32) {
        __m512 a0[2], a1[2];
        for (int m = 0; m < MR; m++) {
            a0[m] = _mm512_loadu_ps(A + (size_t) m * lda + k);
            a1[m] = _mm512_loadu_ps(A + (size_t) m * lda + k + 16);
        }
        for (int n = 0; n < NR; n++) {
            __m512 mid = _mm512_load_ps(base[n] + k + 16);
            __m512 hi = _mm512_load_ps(base[n] + k + 32);
            __m512 w0 = _mm512_permutex2var_ps(lo[n], idx[n], mid);
            __m512 w1 = _mm512_permutex2var_ps(mid, idx[n], hi);
            lo[n] = hi;
            for (int m = 0; m < MR; m++) {
                e[m][n] = _mm512_fmadd_ps(a0[m], w0, e[m][n]);
                o[m][n] = _mm512_fmadd_ps(a1[m], w1, o[m][n]);
            }
        }
    }
    for (int half = 0; k < K; k += 16, half ^= 1) {     /* tail as cy_dot_block_avx512 */
        int nv = K - k < 16 ? K - k : 16;
        __mmask16 mk = (__mmask16) ((1u << nv) - 1u);
        for (int n = 0; n < NR; n++) {
            __m512 w = _mm512_maskz_loadu_ps(mk, W + (size_t) n * ldw + k);
            for (int m = 0; m < MR; m++) {
                __m512 a = _mm512_maskz_loadu_ps(mk, A + (size_t) m * lda + k);
                if (half)
                    o[m][n] = _mm512_fmadd_ps(a, w, o[m][n]);
                else
                    e[m][n] = _mm512_fmadd_ps(a, w, e[m][n]);
            }
        }
    }
    for (int m = 0; m < MR; m++)
        for (int n = 0; n < NR; n++)
            C[(size_t) m * ldc + n] = _mm512_reduce_add_ps(_mm512_add_ps(e[m][n], o[m][n]));
}

/* Whether none of the 4 rows W, W + ldw, ... starts on a 64-byte boundary. */
static inline int cy_rows_unaligned(const float *W, int ldw)
{
    for (int n = 0; n < 4; n++)
        if ((((size_t) (W + (size_t) n * ldw)) & 63u) == 0)
            return 0;
    return 1;
}

__attribute__((target("avx512f"))) static void
cy_dot_rows_avx512(int M, int N, int K, const float *A, int lda, const float *W, int ldw,
                   float *C, int ldc)
{
    for (int i = 0; i < M; i += 2) {
        const float *a = A + (size_t) i * lda;
        float *c = C + (size_t) i * ldc;
        int n = 0;
        if (M - i >= 2) {
            for (; n + 4 <= N; n += 4) {
                const float *w = W + (size_t) n * ldw;
                if (K >= 32 && cy_rows_unaligned(w, ldw))
                    cy_dot_block_avx512_shifted(2, K, a, lda, w, ldw, c + n, ldc);
                else
                    cy_dot_block_avx512(2, 4, K, a, lda, w, ldw, c + n, ldc);
            }
            for (; n < N; n++)
                cy_dot_block_avx512(2, 1, K, a, lda, W + (size_t) n * ldw, ldw, c + n, ldc);
        } else {
            for (; n + 4 <= N; n += 4) {
                const float *w = W + (size_t) n * ldw;
                if (K >= 32 && cy_rows_unaligned(w, ldw))
                    cy_dot_block_avx512_shifted(1, K, a, lda, w, ldw, c + n, ldc);
                else
                    cy_dot_block_avx512(1, 4, K, a, lda, w, ldw, c + n, ldc);
            }
            for (; n < N; n++)
                cy_dot_block_avx512(1, 1, K, a, lda, W + (size_t) n * ldw, ldw, c + n, ldc);
        }
    }
}

/* AVX2: the same with 8-float blocks and a fixed horizontal sum. */
__attribute__((target("avx2,fma"))) static inline float cy_hsum_avx2(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) static inline __attribute__((always_inline)) void
cy_dot_block_avx2(const int MR, const int NR, int K, const float *A, int lda,
                  const float *W, int ldw, float *C, int ldc)
{
    __m256 e[2][4], o[2][4];
    int k = 0;
    for (int m = 0; m < MR; m++)
        for (int n = 0; n < NR; n++)
            e[m][n] = o[m][n] = _mm256_setzero_ps();
    for (; k + 16 <= K; k += 16) {
        for (int n = 0; n < NR; n++) {
            __m256 w0 = _mm256_loadu_ps(W + (size_t) n * ldw + k);
            __m256 w1 = _mm256_loadu_ps(W + (size_t) n * ldw + k + 8);
            for (int m = 0; m < MR; m++) {
                e[m][n] = _mm256_fmadd_ps(_mm256_loadu_ps(A + (size_t) m * lda + k), w0, e[m][n]);
                o[m][n] = _mm256_fmadd_ps(_mm256_loadu_ps(A + (size_t) m * lda + k + 8), w1,
                                          o[m][n]);
            }
        }
    }
    for (int half = 0; k < K; k += 8, half ^= 1) {
        int nv = K - k < 8 ? K - k : 8;
        __m256i mk = _mm256_cmpgt_epi32(_mm256_set1_epi32(nv),
                                        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        for (int n = 0; n < NR; n++) {
            __m256 w = _mm256_maskload_ps(W + (size_t) n * ldw + k, mk);
            for (int m = 0; m < MR; m++) {
                __m256 a = _mm256_maskload_ps(A + (size_t) m * lda + k, mk);
                if (half)
                    o[m][n] = _mm256_fmadd_ps(a, w, o[m][n]);
                else
                    e[m][n] = _mm256_fmadd_ps(a, w, e[m][n]);
            }
        }
    }
    for (int m = 0; m < MR; m++)
        for (int n = 0; n < NR; n++)
            C[(size_t) m * ldc + n] = cy_hsum_avx2(_mm256_add_ps(e[m][n], o[m][n]));
}

__attribute__((target("avx2,fma"))) static void
cy_dot_rows_avx2(int M, int N, int K, const float *A, int lda, const float *W, int ldw,
                 float *C, int ldc)
{
    for (int i = 0; i < M; i += 2) {
        const float *a = A + (size_t) i * lda;
        float *c = C + (size_t) i * ldc;
        int n = 0;
        if (M - i >= 2) {
            for (; n + 4 <= N; n += 4)
                cy_dot_block_avx2(2, 4, K, a, lda, W + (size_t) n * ldw, ldw, c + n, ldc);
            for (; n < N; n++)
                cy_dot_block_avx2(2, 1, K, a, lda, W + (size_t) n * ldw, ldw, c + n, ldc);
        } else {
            for (; n + 4 <= N; n += 4)
                cy_dot_block_avx2(1, 4, K, a, lda, W + (size_t) n * ldw, ldw, c + n, ldc);
            for (; n < N; n++)
                cy_dot_block_avx2(1, 1, K, a, lda, W + (size_t) n * ldw, ldw, c + n, ldc);
        }
    }
}
#endif

typedef void (*cy_dot_rows_fn)(int, int, int, const float *, int, const float *, int,
                               float *, int);

/* The dot kernel of a level (NULL for 0: use BLAS). */
static inline cy_dot_rows_fn cy_dot_select(int level)
{
#ifdef CY_HAVE_X86_KERNELS
    if (level >= 2)
        return cy_dot_rows_avx512;
    if (level == 1)
        return cy_dot_rows_avx2;
#endif
    (void) level;
    return NULL;
}

typedef void (*cy_gemm_packed_fn)(int, int, int, const float *, int, const float *, float *, int);

/* The kernel of a level (NULL for 0: use BLAS). */
static inline cy_gemm_packed_fn cy_rgemm_select(int level)
{
#ifdef CY_HAVE_X86_KERNELS
    if (level >= 2)
        return cy_gemm_packed_avx512;
    if (level == 1)
        return cy_gemm_packed_avx2;
#endif
    (void) level;
    return NULL;
}

/* ---- The backward's large products, float32, on unpacked operands --------------------
 *
 *   C (M, N) = [C +] op(A) @ B,   op(A)[m, k] = A[m * lda + k] (ta = 0) or A[k * lda + m]
 *                                 (ta = 1),   B (K, N) row-major, row stride ldb
 *
 * Two products of each backward time block (docs/math.md (1')): the weight gradients'
 * dW += dz^T @ x and dz^T @ h_{t-1} (ta = 1, A = a thread's gate columns of dz, rows
 * 4H floats apart; accumulating over the blocks) and dx = dz @ W_ih (ta = 0). They are a large share of a training step (the char model: 2.5 of its 6.3
 * GFLOP), and through OpenBLAS they ride on whatever kernel it picks: with
 * OPENBLAS_CORETYPE=Haswell (AVX2) the char model's training step took 24.2 ms against
 * 19.2 on its SkylakeX kernels. This kernel keeps AVX-512 whatever OpenBLAS does.
 *
 * Each column group of B (64 floats wide, CY_BG_KC rows at a time) stays in L2 while
 * every row block of A passes over it. It is copied into a contiguous buffer first
 * when B's rows are wider (x or h_{t-1} of more than 64 features, W_ih): rows kilobytes
 * apart put a group's lines in a few of the L2's sets, where they evict each other. The
 * copy moves values, so it changes no bit. Rows of A are broadcast one float at a time,
 * so op(A) is read in place whichever way it is stored.
 *
 * Determinism: every element of C is one FMA chain over k = 0..K-1 in order, starting
 * from 0 or from C's own value (accumulate); a chain cut at a K chunk is stored to C and
 * reloaded, exactly (float32 in, float32 out). So results never depend on how M and N
 * are split (threads) and a product accumulated over blocks equals the same blocks in
 * one sequence (checkpointed segments). AVX-512 only: at level 1 the backward keeps
 * BLAS (cy_bgemm_select gives NULL). */
#ifdef CY_HAVE_X86_KERNELS
#define CY_BG_MR 6          /* rows of C per register block */
#define CY_BG_NP 4          /* panels of 16 columns per register block */
#define CY_BG_KC 256        /* rows of B per pass (a 64-column group: 64 KB) */

__attribute__((target("avx512f"))) static inline __attribute__((always_inline)) void
cy_bblock_avx512(const int MR, const int NP, const int TA, const int TAIL, int K,
                 const float *A, int lda, const float *B, int ldb, float *C, int ldc,
                 const __mmask16 *mask, int acc0)
{
    __m512 acc[CY_BG_MR][CY_BG_NP];
    for (int r = 0; r < MR; r++)
        for (int q = 0; q < NP; q++)
            acc[r][q] = acc0 ? _mm512_maskz_loadu_ps(mask[q], C + (size_t) r * ldc + q * CY_NR)
                             : _mm512_setzero_ps();
    for (int k = 0; k < K; k++) {
        __m512 b[CY_BG_NP];
        for (int q = 0; q < NP; q++)    /* masked only where it must be: on Zen 5 a masked
                                           load in this loop cost two thirds of the speed */
            b[q] = TAIL && q == NP - 1
                       ? _mm512_maskz_loadu_ps(mask[q], B + (size_t) k * ldb + q * CY_NR)
                       : _mm512_loadu_ps(B + (size_t) k * ldb + q * CY_NR);
        CY_KEEP_IN_REGISTERS(MR, NP, b);
        for (int r = 0; r < MR; r++) {
            __m512 a = _mm512_set1_ps(TA ? A[(size_t) k * lda + r] : A[(size_t) r * lda + k]);
            for (int q = 0; q < NP; q++)
                acc[r][q] = _mm512_fmadd_ps(a, b[q], acc[r][q]);
        }
    }
    for (int r = 0; r < MR; r++)
        for (int q = 0; q < NP; q++)
            _mm512_mask_storeu_ps(C + (size_t) r * ldc + q * CY_NR, mask[q], acc[r][q]);
}

/* A block of MR (1..6) rows of C against np (1..4) panels, the last one partial if tail;
 * a is row m of op(A). */
#define CY_BG_CASE(MR, NP, TA)                                                            \
    (tail ? cy_bblock_avx512(MR, NP, TA, 1, K, a, lda, B, ldb, C, ldc, mask, acc0)       \
          : cy_bblock_avx512(MR, NP, TA, 0, K, a, lda, B, ldb, C, ldc, mask, acc0))
#define CY_BG_ROWS(TA)                                                                      \
    switch (MR * 4 + np) {                                                                  \
    case 25: CY_BG_CASE(6, 1, TA); break;  case 26: CY_BG_CASE(6, 2, TA); break;          \
    case 27: CY_BG_CASE(6, 3, TA); break;  case 28: CY_BG_CASE(6, 4, TA); break;          \
    case 21: CY_BG_CASE(5, 1, TA); break;  case 22: CY_BG_CASE(5, 2, TA); break;          \
    case 23: CY_BG_CASE(5, 3, TA); break;  case 24: CY_BG_CASE(5, 4, TA); break;          \
    case 17: CY_BG_CASE(4, 1, TA); break;  case 18: CY_BG_CASE(4, 2, TA); break;          \
    case 19: CY_BG_CASE(4, 3, TA); break;  case 20: CY_BG_CASE(4, 4, TA); break;          \
    case 13: CY_BG_CASE(3, 1, TA); break;  case 14: CY_BG_CASE(3, 2, TA); break;          \
    case 15: CY_BG_CASE(3, 3, TA); break;  case 16: CY_BG_CASE(3, 4, TA); break;          \
    case 9: CY_BG_CASE(2, 1, TA); break;   case 10: CY_BG_CASE(2, 2, TA); break;          \
    case 11: CY_BG_CASE(2, 3, TA); break;  case 12: CY_BG_CASE(2, 4, TA); break;          \
    case 5: CY_BG_CASE(1, 1, TA); break;   case 6: CY_BG_CASE(1, 2, TA); break;           \
    case 7: CY_BG_CASE(1, 3, TA); break;   case 8: CY_BG_CASE(1, 4, TA); break;           \
    default: break;                                                                         \
    }

__attribute__((target("avx512f"))) static void
cy_brows_avx512(int ta, int MR, int np, int K, const float *a, int lda, const float *B,
                int ldb, float *C, int ldc, const __mmask16 *mask, int acc0)
{
    int tail = mask[np - 1] != (__mmask16) 0xFFFF;
    if (ta)
        CY_BG_ROWS(1)
    else
        CY_BG_ROWS(0)
}
#undef CY_BG_ROWS
#undef CY_BG_CASE

__attribute__((target("avx512f"))) static void
cy_bgemm_avx512(int ta, int M, int N, int K, const float *A, int lda, const float *B, int ldb,
                float *C, int ldc, int accumulate)
{
    if (M <= 0 || N <= 0)
        return;
    if (K <= 0) {                       /* an empty sum: C stays, or becomes 0 */
        if (!accumulate)
            for (int i = 0; i < M; i++)
                memset(C + (size_t) i * ldc, 0, (size_t) N * sizeof(float));
        return;
    }
    const int GW = CY_BG_NP * CY_NR;    /* a column group's width */
    /* without a buffer (none needed, or malloc failed) B is read in place: same bits */
    float *buf = ldb > GW && M >= 2 * CY_BG_MR
                     ? (float *) aligned_alloc(64, (size_t) CY_BG_KC * GW * sizeof(float))
                     : NULL;
    for (int k0 = 0; k0 < K; k0 += CY_BG_KC) {
        int kc = K - k0 < CY_BG_KC ? K - k0 : CY_BG_KC;
        int acc0 = accumulate || k0 > 0;
        const float *Ak = ta ? A + (size_t) k0 * lda : A + k0;
        const float *Bk = B + (size_t) k0 * ldb;
        for (int n0 = 0; n0 < N; n0 += GW) {
            int nc = N - n0 < GW ? N - n0 : GW;
            int np = (nc + CY_NR - 1) / CY_NR;
            __mmask16 mask[CY_BG_NP];
            for (int q = 0; q < np; q++) {
                int nv = nc - q * CY_NR < CY_NR ? nc - q * CY_NR : CY_NR;
                mask[q] = (__mmask16) ((1u << nv) - 1u);
            }
            const float *Bg = Bk + n0;
            int ldg = ldb;
            if (buf != NULL) {
                for (int k = 0; k < kc; k++)
                    memcpy(buf + (size_t) k * GW, Bk + (size_t) k * ldb + n0,
                           (size_t) nc * sizeof(float));
                Bg = buf;
                ldg = GW;
            }
            for (int m0 = 0, mr; m0 < M; m0 += mr) {
                /* 7-11 rows left are cut in two near-equal blocks rather than 6 + 1-5 */
                mr = M - m0 <= CY_BG_MR ? M - m0 : M - m0 < 12 ? (M - m0 + 1) / 2 : CY_BG_MR;
                const float *a = ta ? Ak + m0 : Ak + (size_t) m0 * lda;
                cy_brows_avx512(ta, mr, np, kc, a, lda, Bg, ldg,
                                C + (size_t) m0 * ldc + n0, ldc, mask, acc0);
            }
        }
    }
    free(buf);
}
#endif

typedef void (*cy_bgemm_fn)(int, int, int, int, const float *, int, const float *, int,
                            float *, int, int);

/* The backward's product kernel of a level (NULL below 2: use BLAS). */
static inline cy_bgemm_fn cy_bgemm_select(int level)
{
#ifdef CY_HAVE_X86_KERNELS
    if (level >= 2)
        return cy_bgemm_avx512;
#endif
    (void) level;
    return NULL;
}

/* ---- float64: the same per-step product on doubles -----------------------------------
 *
 *   C (M, N) = A (M, K) @ W (K, N),   W packed by cy_pack_f64 into panels of 8 columns
 *
 * float64 ran these products through OpenBLAS's dgemm, which re-packs W every step as
 * sgemm did (perf, medium float64 training at 1 thread: dgemm's copy routines 24% of
 * the time; 7% with this kernel, that of the large GEMMs). A panel row is 8
 * doubles, one 64-byte line, as a float32 panel row is 16 floats, so the layout and the
 * blocks are the float32 ones with twice as many panels. The order of the loops and
 * the blocking differ (4 rows or more take 2 panels at a time, and rows come in blocks
 * of 8 and a remainder; AVX2 takes one panel at a time whatever the rows): a pair of panels (K x 16 doubles, 32 kB at K = 256) is taken through every
 * row block before the next pair, so that the second block of rows reads it from L1;
 * the double-precision W_hh of the medium config (2 MB) no longer fits in L2 next to
 * everything else, and streaming it once per row block would read it from L3.
 * Determinism as for float32: one FMA chain over k in order per element.
 * The medium config's step alone (M=16 N=1024 K=256, 1 thread) runs at about 79 GFLOP/s
 * with AVX-512 and 55 with AVX2, half the float32 kernel's, as the vector width says. */
#define CY_NR64 8

/* Doubles needed to pack a (K, N) matrix. */
static inline size_t cy_packed_size_f64(int K, int N)
{
    return (size_t) ((N + CY_NR64 - 1) / CY_NR64) * (size_t) K * CY_NR64;
}

/* Pack W (K, N) into rows [k0, k0 + K) of float64 panels of Kt rows; as cy_pack_rows_f32. */
static inline void cy_pack_rows_f64(double *packed, const double *w, int K, int N, int ldw,
                                    int trans, int k0, int Kt)
{
    int np = (N + CY_NR64 - 1) / CY_NR64, fast = 0;
#ifdef CY_HAVE_X86_PACK
    fast = trans && cy_pack_level >= 1;
#endif
    for (int p = 0; p < np; p++) {
        double *dst = packed + ((size_t) p * Kt + k0) * CY_NR64;
        int n0 = p * CY_NR64, nv = N - n0 < CY_NR64 ? N - n0 : CY_NR64;
        int jv = fast ? nv / 4 * 4 : 0, kv = fast ? K / 4 * 4 : 0;   /* done by transposes */
#ifdef CY_HAVE_X86_PACK
        if (fast)
            cy_pack_block_f64(dst, w + (size_t) n0 * ldw, jv, kv, ldw, CY_NR64);
#endif
        for (int k = 0; k < K; k++) {
            double *row = dst + (size_t) k * CY_NR64;
            for (int j = k < kv ? jv : 0; j < nv; j++)
                row[j] = trans ? w[(size_t) (n0 + j) * ldw + k] : w[(size_t) k * ldw + n0 + j];
            for (int j = nv; j < CY_NR64; j++)
                row[j] = 0.0;
        }
    }
}

/* Pack W (K, N) for the float64 kernels; trans and ldw as in cy_pack_rows_f32. */
static inline void cy_pack_f64(double *packed, const double *w, int K, int N, int ldw, int trans)
{
    cy_pack_rows_f64(packed, w, K, N, ldw, trans, 0, K);
}

#ifdef CY_HAVE_X86_KERNELS
/* AVX-512: MR rows x NP panels (8*NP columns) in MR*NP zmm accumulators. */
__attribute__((target("avx512f"))) static inline __attribute__((always_inline)) void
cy_block64_avx512(const int MR, const int NP, int K, const double *A, int lda,
                  const double *panel, size_t pstride, double *C, int ldc,
                  const __mmask8 *mask)
{
    __m512d acc[8][4];
    for (int r = 0; r < MR; r++)
        for (int q = 0; q < NP; q++)
            acc[r][q] = _mm512_setzero_pd();
    for (int k = 0; k < K; k++) {
        __m512d b[4];
        for (int q = 0; q < NP; q++)
            b[q] = _mm512_loadu_pd(panel + q * pstride + (size_t) k * CY_NR64);
        CY_KEEP_IN_REGISTERS(MR, NP, b);
        for (int r = 0; r < MR; r++) {
            __m512d a = _mm512_set1_pd(A[(size_t) r * lda + k]);
            for (int q = 0; q < NP; q++)
                acc[r][q] = _mm512_fmadd_pd(a, b[q], acc[r][q]);
        }
    }
    for (int r = 0; r < MR; r++)
        for (int q = 0; q < NP; q++)
            _mm512_mask_storeu_pd(C + (size_t) r * ldc + q * CY_NR64, mask[q], acc[r][q]);
}

#define CY_B64(MR, NP) cy_block64_avx512(MR, NP, K, a, lda, panel, pstride, c, ldc, mask)

/* One block of MR (1..8) rows against npan (1..4) consecutive panels. With 4 or more
 * rows two panels (up to 16 accumulators), with fewer all npan at once. */
__attribute__((target("avx512f"))) static void
cy_rows64_avx512(int MR, int npan, int K, const double *a, int lda, const double *panel,
                 size_t pstride, double *c, int ldc, const __mmask8 *mask)
{
    switch (MR * 4 + npan) {
    case 33: CY_B64(8, 1); break;
    case 34: CY_B64(8, 2); break;
    case 29: CY_B64(7, 1); break;
    case 30: CY_B64(7, 2); break;
    case 25: CY_B64(6, 1); break;
    case 26: CY_B64(6, 2); break;
    case 21: CY_B64(5, 1); break;
    case 22: CY_B64(5, 2); break;
    case 17: CY_B64(4, 1); break;
    case 18: CY_B64(4, 2); break;
    case 13: CY_B64(3, 1); break;
    case 14: CY_B64(3, 2); break;
    case 15: CY_B64(3, 3); break;
    case 16: CY_B64(3, 4); break;
    case 9: CY_B64(2, 1); break;
    case 10: CY_B64(2, 2); break;
    case 11: CY_B64(2, 3); break;
    case 12: CY_B64(2, 4); break;
    case 5: CY_B64(1, 1); break;
    case 6: CY_B64(1, 2); break;
    case 7: CY_B64(1, 3); break;
    case 8: CY_B64(1, 4); break;
    default: break;
    }
}
#undef CY_B64

__attribute__((target("avx512f"))) static void
cy_gemm_packed64_avx512(int M, int N, int K, const double *A, int lda, const double *Bp,
                        double *C, int ldc)
{
    int np = (N + CY_NR64 - 1) / CY_NR64;
    int step = M >= 4 ? 2 : 4;          /* panels per block: see cy_rows64_avx512 */
    size_t pstride = (size_t) K * CY_NR64;
    for (int p = 0; p < np; p += step) {
        int npan = np - p < step ? np - p : step;
        __mmask8 mask[4];
        for (int q = 0; q < npan; q++) {
            int nv = N - (p + q) * CY_NR64 < CY_NR64 ? N - (p + q) * CY_NR64 : CY_NR64;
            mask[q] = (__mmask8) ((1u << nv) - 1u);
        }
        const double *panel = Bp + (size_t) p * pstride;
        for (int i = 0; i < M; i += 8) {        /* every row block on these panels */
            int mr = M - i < 8 ? M - i : 8;
            cy_rows64_avx512(mr, npan, K, A + (size_t) i * lda, lda, panel, pstride,
                             C + (size_t) i * ldc + p * CY_NR64, ldc, mask);
        }
    }
}

/* AVX2 + FMA: MR rows x one panel (8 columns) in 2*MR ymm accumulators. */
__attribute__((target("avx2,fma"))) static inline __attribute__((always_inline)) void
cy_block64_avx2(const int MR, int K, const double *A, int lda, const double *panel,
                double *C, int ldc, int nv)
{
    __m256d lo[6], hi[6];
    for (int r = 0; r < MR; r++) {
        lo[r] = _mm256_setzero_pd();
        hi[r] = _mm256_setzero_pd();
    }
    for (int k = 0; k < K; k++) {
        __m256d b0 = _mm256_loadu_pd(panel + (size_t) k * CY_NR64);
        __m256d b1 = _mm256_loadu_pd(panel + (size_t) k * CY_NR64 + 4);
        for (int r = 0; r < MR; r++) {
            __m256d a = _mm256_broadcast_sd(A + (size_t) r * lda + k);
            lo[r] = _mm256_fmadd_pd(a, b0, lo[r]);
            hi[r] = _mm256_fmadd_pd(a, b1, hi[r]);
        }
    }
    for (int r = 0; r < MR; r++) {
        if (nv == CY_NR64) {
            _mm256_storeu_pd(C + (size_t) r * ldc, lo[r]);
            _mm256_storeu_pd(C + (size_t) r * ldc + 4, hi[r]);
        } else {
            double tmp[CY_NR64];
            _mm256_storeu_pd(tmp, lo[r]);
            _mm256_storeu_pd(tmp + 4, hi[r]);
            memcpy(C + (size_t) r * ldc, tmp, (size_t) nv * sizeof(double));
        }
    }
}

__attribute__((target("avx2,fma"))) static void
cy_gemm_packed64_avx2(int M, int N, int K, const double *A, int lda, const double *Bp,
                      double *C, int ldc)
{
    int np = (N + CY_NR64 - 1) / CY_NR64;
    for (int p = 0; p < np; p++) {
        const double *panel = Bp + (size_t) p * K * CY_NR64;
        int nv = N - p * CY_NR64 < CY_NR64 ? N - p * CY_NR64 : CY_NR64;
        double *c = C + p * CY_NR64;
        int i = 0;
#define CY_B64_AVX2(MR) cy_block64_avx2(MR, K, A + (size_t) i * lda, lda, panel, \
                                        c + (size_t) i * ldc, ldc, nv)
        for (; i + 6 <= M; i += 6)
            CY_B64_AVX2(6);
        switch (M - i) {
        case 5: CY_B64_AVX2(5); break;
        case 4: CY_B64_AVX2(4); break;
        case 3: CY_B64_AVX2(3); break;
        case 2: CY_B64_AVX2(2); break;
        case 1: CY_B64_AVX2(1); break;
        default: break;
        }
#undef CY_B64_AVX2
    }
}
#endif

typedef void (*cy_gemm_packed64_fn)(int, int, int, const double *, int, const double *,
                                    double *, int);

/* The float64 kernel of a level (NULL for 0: use BLAS). */
static inline cy_gemm_packed64_fn cy_rgemm64_select(int level)
{
#ifdef CY_HAVE_X86_KERNELS
    if (level >= 2)
        return cy_gemm_packed64_avx512;
    if (level == 1)
        return cy_gemm_packed64_avx2;
#endif
    (void) level;
    return NULL;
}

#endif
