/* fp32 product for a handful of rows (decoding): out (B x N) = x (B x K) @ W^T
 * (+ bias), W (N x K) row-major, (out, in) as PyTorch stores it.
 *
 * Included by the Cython core (`cdef extern from "kernels/matvec_f32.h"`,
 * matmul.pxi's matvec_forward, which cuts the outputs over the threads). No
 * allocation and no threads inside; every function is static.
 *
 * Why its own kernel: a decode step reads every weight once for two flops
 * per 4 bytes, so it is bound by memory bandwidth. A dot product per output
 * (vecmath.pxi's dot) reads W once per row of x: B rows cost B passes over
 * W. Here each vector of W is loaded once and multiplied into every row of x
 * (the rows taken MATVEC_F32_RB at a time; the next RB re-read W's few rows
 * from L1, not from memory), with one accumulator vector per (row of x, row
 * of W), so W comes from memory once for all B rows.
 *
 * How W is walked, as measured on Zen 4 at one thread, weights from memory
 * (GPT-2's shapes, each layout timed alone in C, medians of 15-21 calls):
 *   - a block of MATVEC_F32_RO rows side by side (rows n..n+3) ran at 12-18
 *     GB/s where one row after another ran at 25-30: rows of K = 768 are 3 KB,
 *     and four interleaved 3 KB streams are too short for the hardware
 *     prefetcher (software prefetch 512-2048 bytes ahead did not help). So a
 *     thread's range of rows is cut into MATVEC_F32_RO long runs, one run per
 *     accumulator column: each block takes row j of every run, and each run
 *     is one long sequential stream.
 *   - 256-bit vectors streamed 15-25% faster than 512-bit ones, so the
 *     AVX-512 build also uses 8-wide vectors (its 32 registers hold more
 *     sums: RB = 4 rows of x against AVX2's 2). The baseline build's SSE2
 *     ran as fast at 8 wide (two xmm a vector) as at 4 for one row, faster
 *     for four; there one row is ~25% slower than the dot product was, four
 *     rows faster (-v3 and -v4 are faster at every B).
 *
 * Summation order (it is not dot's). For one element out[b][n], VL = 8 the
 * vector width, rows of x and W read as zero past K:
 *     acc[l] = +0 (l = 0 .. VL-1)
 *     for k = 0, VL, 2VL, .. < K:  acc[l] = acc[l] + x[b][k+l] * W[n][k+l]
 *     s = acc folded by halves: acc[l] + acc[l + VL/2] for l < VL/2, and again
 *         down to one value (a fixed tree)
 *     out[b][n] = s (+ bias[n])
 * all in float32, the multiply-add fused where the build has FMA (-v3 and
 * -v4, which then give the same bits; gcc contracts every such expression in
 * this file alike), a rounded multiply then add in the baseline build. The
 * result of an element depends only on its row of x, its row of W and K:
 * not on B, on the block or run it falls in, or on the range of outputs a
 * thread was given. So the product is bit-identical at
 * any thread count, and row b of a B-row call equals the 1-row call on it.
 */
#ifndef FEMTOGPT_MATVEC_F32_H
#define FEMTOGPT_MATVEC_F32_H

#include <stddef.h>
#include <string.h>

/* VL: floats per vector (8 in every x86-64 build: SSE2 does each as two).
 * RB: rows of x per pass. The sums in registers are RB x RO vectors, plus RO
 * of W and one of x: 21 of AVX-512's 32 registers at RB = 4, 13 of AVX2's
 * 16 at RB = 2 (the baseline build spills some; still faster than VL = 4). */
#define MATVEC_F32_VL 8
#if defined(__AVX512F__)
#define MATVEC_F32_RB 4
#else
#define MATVEC_F32_RB 2
#endif

/* Runs of rows of W walked at once (2 or more). */
#define MATVEC_F32_RO 4

typedef float matvec_f32_v __attribute__((vector_size(MATVEC_F32_VL * 4)));

/* The fold by halves of the top comment: a fixed tree, whatever gcc makes of it. */
static inline float matvec_f32_hsum(const matvec_f32_v* acc)
{
    float s[MATVEC_F32_VL];
    memcpy(s, acc, sizeof s);
#pragma GCC unroll 4
    for (int h = MATVEC_F32_VL / 2; h >= 1; h /= 2)
#pragma GCC unroll 8
        for (int l = 0; l < h; l++)
            s[l] = s[l] + s[l + h];
    return s[0];
}

/* out[b * ldo + r rs] for RB rows b of x and RO rows r of W, rs rows of W
 * apart (RB, RO constants at each call site, so gcc unrolls the loops and
 * keeps the RB x RO sums in registers). */
static inline __attribute__((always_inline)) void matvec_f32_block(
    const int RB, const int RO, int K, const float* x, const float* w, ptrdiff_t rs,
    const float* bias, float* out, ptrdiff_t ldo)
{
    matvec_f32_v acc[MATVEC_F32_RB][MATVEC_F32_RO];
#pragma GCC unroll 8
    for (int b = 0; b < RB; b++)
#pragma GCC unroll 8
        for (int r = 0; r < RO; r++)
            acc[b][r] = (matvec_f32_v){0};
    int K0 = K / MATVEC_F32_VL * MATVEC_F32_VL;   /* whole vectors */
    for (int k = 0; k < K0; k += MATVEC_F32_VL) {
        matvec_f32_v wv[MATVEC_F32_RO];
#pragma GCC unroll 8
        for (int r = 0; r < RO; r++)
            memcpy(&wv[r], w + (ptrdiff_t)r * rs * K + k, sizeof wv[r]);
#pragma GCC unroll 8
        for (int b = 0; b < RB; b++) {
            matvec_f32_v xv;
            memcpy(&xv, x + (ptrdiff_t)b * K + k, sizeof xv);
#pragma GCC unroll 8
            for (int r = 0; r < RO; r++)
                acc[b][r] = acc[b][r] + xv * wv[r];
        }
    }
    if (K0 < K) {   /* the last K - K0 < VL of each row, zero-padded to a vector */
        matvec_f32_v wv[MATVEC_F32_RO];
#pragma GCC unroll 8
        for (int r = 0; r < RO; r++) {
            wv[r] = (matvec_f32_v){0};
            memcpy(&wv[r], w + (ptrdiff_t)r * rs * K + K0, (size_t)(K - K0) * sizeof(float));
        }
#pragma GCC unroll 8
        for (int b = 0; b < RB; b++) {
            matvec_f32_v xv = {0};
            memcpy(&xv, x + (ptrdiff_t)b * K + K0, (size_t)(K - K0) * sizeof(float));
#pragma GCC unroll 8
            for (int r = 0; r < RO; r++)
                acc[b][r] = acc[b][r] + xv * wv[r];
        }
    }
#pragma GCC unroll 8
    for (int b = 0; b < RB; b++)
#pragma GCC unroll 8
        for (int r = 0; r < RO; r++) {
            float s = matvec_f32_hsum(&acc[b][r]);
            if (bias != NULL)
                s = s + bias[r * rs];
            out[(ptrdiff_t)b * ldo + r * rs] = s;
        }
}

#define MATVEC_F32_CASE(rb, ro) \
    case (rb) * 16 + ((ro) == 1): matvec_f32_block(rb, ro, K, x, w, rs, bias, out, ldo); break;

/* One block of rb <= MATVEC_F32_RB rows of x by ro rows of W, ro = 1 or
 * MATVEC_F32_RO (the remainder rows of a range go one at a time). */
static void matvec_f32_tile(int rb, int ro, int K, const float* x, const float* w, ptrdiff_t rs,
                            const float* bias, float* out, ptrdiff_t ldo)
{
    switch (rb * 16 + (ro == 1 ? 1 : 0)) {
        MATVEC_F32_CASE(1, 1) MATVEC_F32_CASE(2, 1)
        MATVEC_F32_CASE(1, MATVEC_F32_RO) MATVEC_F32_CASE(2, MATVEC_F32_RO)
#if MATVEC_F32_RB >= 4
        MATVEC_F32_CASE(3, 1) MATVEC_F32_CASE(4, 1)
        MATVEC_F32_CASE(3, MATVEC_F32_RO) MATVEC_F32_CASE(4, MATVEC_F32_RO)
#endif
    }
}
#undef MATVEC_F32_CASE

/* Outputs n0 .. n1-1 of every row: out[b * N + n] = x[b] . W[n] (+ bias[n])
 * for b < B, x (B x K), W (N x K), bias (N) or NULL. Threads may call it on
 * disjoint ranges of n; each element's bits do not depend on the range. */
static void matvec_f32(float* out, const float* x, const float* W, const float* bias,
                       int B, int K, int N, int n0, int n1)
{
    /* RO streams, each over len consecutive rows of W: stream r from row n0 + r len */
    int len = (n1 - n0) / MATVEC_F32_RO;
    for (int j = 0; j < len; j++) {
        int n = n0 + j;
        for (int b = 0; b < B; b += MATVEC_F32_RB) {
            int rb = B - b < MATVEC_F32_RB ? B - b : MATVEC_F32_RB;
            matvec_f32_tile(rb, MATVEC_F32_RO, K, x + (ptrdiff_t)b * K, W + (ptrdiff_t)n * K, len,
                            bias != NULL ? bias + n : NULL, out + (ptrdiff_t)b * N + n, N);
        }
    }
    for (int n = n0 + MATVEC_F32_RO * len; n < n1; n++)
        for (int b = 0; b < B; b += MATVEC_F32_RB) {
            int rb = B - b < MATVEC_F32_RB ? B - b : MATVEC_F32_RB;
            matvec_f32_tile(rb, 1, K, x + (ptrdiff_t)b * K, W + (ptrdiff_t)n * K, 1,
                            bias != NULL ? bias + n : NULL, out + (ptrdiff_t)b * N + n, N);
        }
}

#endif /* FEMTOGPT_MATVEC_F32_H */
