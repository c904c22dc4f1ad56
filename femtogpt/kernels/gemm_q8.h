/* q8 GEMM: out = x @ W^T (+ bias) with both operands quantized to int8 in
 * blocks of 32 along K (llama.cpp's q8_0, on both sides), for sampling: the
 * batch-1 decode and the prompt pass.
 *
 * Included by the Cython core (`cdef extern from "kernels/gemm_q8.h"`, see
 * gemm_q8.pxi, which also cuts the work over threads). Every function is
 * static: each including file gets its own copy.
 *
 * Contract
 * --------
 * Weight W (N x K, row-major, (out, in) as PyTorch stores it): per row n
 * and block b of 32 k (K padded with zeros to Kb = ceil(K/32) blocks),
 *     d = fp16(min(amax / 127, 65504))       amax = max |w| over the block
 *     q = clamp(rne(w / float(d)), -127, 127)  (0 when d == 0)
 * rne is round to nearest, ties to even; the quotient is taken with the
 * fp16-rounded scale, the one the sums use, so |w - q*d| <= d/2 (up to the
 * clamp when fp16 rounded d down: then still < d/2). fp16 rounds scales
 * below 2^-24 * 127 / 2 (amax < ~3.8e-6) to 0, and their blocks to 0.
 * Activation rows x (M x K), quantized per call the same way into the
 * caller's workspace, but with the scale kept in float32 (d = amax / 127).
 * Then, in float32, for every element:
 *     acc = +0
 *     for b = 0 .. Kb-1:   s = dw[n][b] * dx[m][b]
 *                          t = (float)isum_b * s
 *                          acc = acc + t
 *     out[m][n] = acc (+ bias[n])
 * isum_b = the exact int32 dot product of the block's q (|isum| < 2^24, so
 * (float) is exact). Each step is one rounded float32 operation, never
 * fused: the header turns gcc's fp-contract off for everything in it, so
 * the portable path (whichever -march compiles it) and the VNNI path give
 * the same bits. The result of an element depends only on its row of x and
 * its row of W: not on M, on the tile it falls in, or on the thread count.
 * Inputs are assumed finite (NaN and inf give some value; no crash).
 *
 * Packed W layout (gemm_q8_pack_panels)
 * -------------------------------------
 * Columns (rows of W) in panels of GEMM_Q8_NR = 16; panel j holds columns
 * 16j .. 16j+15 and is gemm_q8_panel_bytes(K) = ceil(Kb/2) * 1088 bytes,
 * panel after panel. Blocks go in pairs, each pair 1088 bytes (17 cache
 * lines, one sequential stream for the decode kernel):
 *     [512 quants of block 2i][512 quants of block 2i+1][16 fp16 scales of 2i][16 of 2i+1]
 * (the second half of the last pair is zeros when Kb is odd). A block's 512
 * quants are 8 groups of 4 k, 64 bytes each: byte g*64 + 4c + i is
 * q(column 16j+c, k = 32b + 4g + i) + 128, the u8 operand of vpdpbusd, one
 * 32-bit lane per column. Columns past N have q = 0 (stored 128) and scale 0.
 * About 1.0625 bytes per weight, as q8_0.
 *
 * Quantized activation layout (gemm_q8_quantize_rows)
 * ---------------------------------------------------
 * Row m at act + m * gemm_q8_row_bytes(K): Kb*32 int8 q, Kb float32 d,
 * Kb int32 -128 * sum(q) (the correction for the weights' +128 offset,
 * which starts each block's int32 sum), padded to 64 bytes.
 *
 * No allocation and no threads inside: gemm_q8.pxi splits the packing by
 * panels and the product by panels or rows over OpenMP threads.
 *
 * Paths (gemm_q8_force): 0 auto, 1 portable C, 2 AVX512_VNNI (only in a
 * build with AVX-512 BW, i.e. the -v4 target, and only where cpuid shows
 * avx512_vnni).
 */
#ifndef FEMTOGPT_GEMM_Q8_H
#define FEMTOGPT_GEMM_Q8_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#endif

#if defined(__x86_64__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define GEMM_Q8_HAVE_VNNI 1
#else
#define GEMM_Q8_HAVE_VNNI 0
#endif

/* The contract's float32 order holds only if no a * b + c below becomes an
 * FMA: gcc contracts by default (-ffp-contract=fast) wherever the target has
 * FMA, in plain C and in the AVX-512 intrinsics alike (they are vector ops
 * to gcc), and it would do it in the -v3/-v4 builds but not the baseline. */
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif

#define GEMM_Q8_API static __attribute__((unused))

enum {
    GEMM_Q8_AUTO = 0,
    GEMM_Q8_PORTABLE = 1,
    GEMM_Q8_VNNI = 2,
};

#define GEMM_Q8_QK 32          /* k per block: one scale per block of 32 */
#define GEMM_Q8_NR 16          /* columns per panel: one zmm of int32 lanes */
#define GEMM_Q8_BLOCK_Q (GEMM_Q8_QK * GEMM_Q8_NR)           /* 512 quant bytes per panel block */
#define GEMM_Q8_PAIR_BYTES (2 * GEMM_Q8_BLOCK_Q + 4 * GEMM_Q8_NR) /* 1088: two blocks + scales */
#define GEMM_Q8_MR 6           /* rows of a prompt tile: 6 x 2 panels, 24 accumulators */
#define GEMM_Q8_NP 2           /* panels of a prompt tile */
#define GEMM_Q8_RUNS 4         /* streams of panels for one row (decode): gemm_q8_row_panels_vnni */
/* Quantized rows of one chunk, reused by every panel pair: to stay in L2
 * (1 MB per core on Zen 4) beside the weights. */
#define GEMM_Q8_ACT_BUDGET (256 * 1024)

/* The parts, one idea per file:
 *   gemm_q8_quant.h     fp16 scales, sizes, packing W, quantizing x
 *   gemm_q8_portable.h  the portable kernel
 *   gemm_q8_vnni.h      the AVX512_VNNI kernels
 * and below: which path the CPU runs, and the entry point. */
#include "gemm_q8_quant.h"
#include "gemm_q8_portable.h"
#include "gemm_q8_vnni.h"

/* cpuid (as gemm_bf16.h): AVX-512 F/BW/VL + VNNI, and the OS saving zmm state. */
static int gemm_q8_cpu_has(int path)
{
    if (path == GEMM_Q8_PORTABLE)
        return 1;
#if GEMM_Q8_HAVE_VNNI
    unsigned a, b, c, d;
    if (path != GEMM_Q8_VNNI)
        return 0;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27)))  /* OSXSAVE */
        return 0;
    unsigned xlo, xhi;
    __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
    if ((xlo & 0xe6u) != 0xe6u)  /* SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM state */
        return 0;
    if (__get_cpuid_max(0, NULL) < 7)
        return 0;
    __cpuid_count(7, 0, a, b, c, d);
    return (b & (1u << 16)) && (b & (1u << 30)) && (b & (1u << 31))  /* F, BW, VL */
           && (c & (1u << 11));                                        /* AVX512_VNNI */
#else
    return 0;
#endif
}

/* 1 if `path` runs here (in this build, on this CPU). */
GEMM_Q8_API int gemm_q8_available(int path)
{
    return path == GEMM_Q8_PORTABLE || path == GEMM_Q8_VNNI ? gemm_q8_cpu_has(path) : 0;
}

static int gemm_q8_forced = GEMM_Q8_AUTO;

/* The path that calls take now: the forced one, or the best available. */
GEMM_Q8_API int gemm_q8_path(void)
{
    static int best = 0;
    int f = __atomic_load_n(&gemm_q8_forced, __ATOMIC_RELAXED);
    if (f != GEMM_Q8_AUTO)
        return f;
    int b = __atomic_load_n(&best, __ATOMIC_RELAXED);
    if (b == 0) {
        b = gemm_q8_available(GEMM_Q8_VNNI) ? GEMM_Q8_VNNI : GEMM_Q8_PORTABLE;
        __atomic_store_n(&best, b, __ATOMIC_RELAXED);
    }
    return b;
}

/* Force a path for every later call in this process: 0 auto, 1 portable,
 * 2 VNNI. Returns the path calls take now, or -1 (changing nothing) if
 * `path` does not run here. */
GEMM_Q8_API int gemm_q8_force(int path)
{
    if (path < GEMM_Q8_AUTO || path > GEMM_Q8_VNNI)
        return -1;
    if (path != GEMM_Q8_AUTO && !gemm_q8_available(path))
        return -1;
    __atomic_store_n(&gemm_q8_forced, path, __ATOMIC_RELAXED);
    return gemm_q8_path();
}

/* out rows 0 .. M-1 (row stride ldo), columns of panels p0 .. p1-1 (the
 * columns 16 p0 .. min(16 p1, N) - 1) = x @ W^T (+ bias), with x's rows
 * quantized into `act` by gemm_q8_quantize_rows and W packed by
 * gemm_q8_pack_panels. Writes out; reads nothing of it. */
GEMM_Q8_API void gemm_q8_gemm_panels(float* out, ptrdiff_t ldo, const float* bias, ptrdiff_t M,
                                     int N, int K, const uint8_t* W, const uint8_t* act,
                                     int p0, int p1)
{
    if (M <= 0 || p1 <= p0 || K <= 0)
        return;
#if GEMM_Q8_HAVE_VNNI
    if (gemm_q8_path() == GEMM_Q8_VNNI) {
        gemm_q8_panels_vnni(out, ldo, bias, M, N, K, W, act, p0, p1);
        return;
    }
#endif
    gemm_q8_panels_portable(out, ldo, bias, M, N, K, W, act, p0, p1);
}

#if defined(__clang__)
#pragma clang fp contract(on)
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

#endif /* FEMTOGPT_GEMM_Q8_H */
