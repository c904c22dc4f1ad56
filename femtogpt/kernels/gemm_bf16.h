/* bf16 GEMM: C = alpha * op(A) @ op(B) + beta * C with bf16 inputs and fp32
 * accumulation, the way PyTorch's CPU autocast multiplies.
 *
 * Included by the Cython core (`cdef extern from "kernels/gemm_bf16.h"`), and
 * by scripts/gemm_bf16_probe.py, which builds it alone to test and time it.
 * Every function is static: each including file gets its own copy, and the
 * functions it does not call cost nothing.
 *
 * Contract
 * --------
 * Same semantics and argument order as the core's fp32 front, gemm() in
 * kernels/gemm.pxi: row-major C (M x N) = alpha * op(A) @ op(B) + beta * C,
 * op(A) is M x K, op(B) is K x N; op(X) = X^T when trans_x; lda/ldb/ldc are
 * the row strides of A, B, C as stored (so A is stored K x M when trans_a).
 * A and B are float32 in memory; each element is rounded to bf16 (round to
 * nearest, ties to even) while it is packed into scratch memory, and bf16
 * denormals are then read as zero (what vdpbf16ps and the AMX tiles do in
 * hardware, so every path treats them alike). Products of two bf16 are exact
 * in float32; they are summed in float32.
 *
 * The order of the sum is part of the contract, so that the portable path and
 * the AVX512_BF16 path give bit-identical results: for every element of C,
 *     acc = +0;  for p = 0 .. ceil(K/2)-1:
 *         acc = acc + a[2p+1] * b[2p+1];  acc = acc + a[2p] * b[2p];
 * (a[K] = b[K] = 0 when K is odd), each + rounded to float32, with denormal
 * results flushed to zero and denormal operands read as zero. That is
 * vdpbf16ps's documented order (odd pair element first), and this Zen 4 does
 * exactly that: 2,000,000 random cases bit-identical to two rounded adds,
 * and 0 to any other order. Then
 *     beta == 0:  C = alpha * acc           (C is not read: NaN there is ignored, as in BLAS)
 *     beta != 0:  C = fma(alpha, acc, beta * C)
 * alpha == 0 (or K == 0) gives C = beta * C without reading A or B (BLAS's rule).
 * The whole call runs with MXCSR's FTZ and DAZ set (restored on return), so
 * the epilogue flushes denormals too, on every path.
 * AMX's tdpbf16ps sums in its own order: that path agrees with the others
 * within float32 summation error, not bit for bit.
 *
 * No allocation and no threads inside: the caller gives `scratch` of
 * gemm_bf16_scratch_size() bytes (any alignment; the kernels align inside
 * it), one per thread, and splits big products over threads itself (the
 * core's gemm_slice does that with rows or columns of C).
 *
 * Paths (gemm_bf16_force): 0 auto, 1 portable C, 2 AVX512_BF16, 3 AMX-BF16.
 * Auto takes AMX if the CPU has it and Linux grants the tile state, else
 * AVX512_BF16 if the CPU has it, else portable. The AVX-512 and AMX code is
 * compiled with per-function target attributes, so it exists in every build
 * of the core (even the baseline x86-64 one) and runs only where cpuid says.
 * Built with -DFEMTOGPT_AMX_EMULATE (scripts/gemm_bf16_lib.py's test builds;
 * never the core), the AMX path runs on any x86-64 over emulated tiles and
 * is always available (see gemm_bf16_amx.h for what that tests).
 *
 * Packed B layout (gemm_bf16_pack_b, shared by all paths)
 * -------------------------------------------------------
 * op(B) (K x N) is cut into panels of GEMM_BF16_NR = 32 columns; K is padded
 * with zeros to Kp = round_up(K, 32) (AMX takes k in steps of 32). Panel j
 * (columns 32j .. 32j+31) starts at element j * Kp * 32 and holds, for each
 * k-pair p = 0 .. Kp/2-1, for each column n = 0..31, two bf16:
 *     packed[j*Kp*32 + p*64 + 2n + 0] = bf16(op(B)[2p][32j+n])
 *     packed[j*Kp*32 + p*64 + 2n + 1] = bf16(op(B)[2p+1][32j+n])
 * i.e. each k-pair row is 64 bf16 = 128 bytes, the operand order of
 * vdpbf16ps (one 32-bit lane = one column, two k) and of an AMX B tile (rows
 * of k-pairs, tileloadd with a 128-byte stride). Columns past N and k past K
 * are zero. Panels are independent: packing columns n0 .. n0+n-1 (n0 a
 * multiple of 32) of B into packed + n0 * Kp gives the same bytes, so
 * threads may pack disjoint column ranges of one weight in parallel.
 */
#ifndef FEMTOGPT_GEMM_BF16_H
#define FEMTOGPT_GEMM_BF16_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#endif
#if defined(__x86_64__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define GEMM_BF16_API static __attribute__((unused))

enum {
    GEMM_BF16_AUTO = 0,
    GEMM_BF16_PORTABLE = 1,
    GEMM_BF16_AVX512BF16 = 2,
    GEMM_BF16_AMX = 3,
};

#define GEMM_BF16_NR 32   /* columns of a B panel: 2 zmm of fp32 accumulators */
#define GEMM_BF16_MR 12   /* rows of an A micro-panel: 12 x 2 = 24 zmm accumulators */
#define GEMM_BF16_KPAD 32 /* K is padded to this in packed B: one AMX tile of k */
#define GEMM_BF16_AMX_MR 32 /* AMX computes 32 x 32 of C at a time (2 x 2 tiles) */
/* The A block (MC rows x Kp) is packed once and then multiplied by every
 * panel of B, so it should stay in L2 (1 MB per core on Zen 4, 2 MB on
 * Sapphire Rapids) beside one B panel. MC is a multiple of both MRs. */
#define GEMM_BF16_MC_STEP 96
#define GEMM_BF16_MC_MAX 384
#define GEMM_BF16_L2_BUDGET (512 * 1024)

/* The parts, one idea per file (each is included once, here):
 *   gemm_bf16_pack.h      rounding, sizes, packing of A and B
 *   gemm_bf16_portable.h  the portable micro-kernel
 *   gemm_bf16_avx512.h    the AVX512_BF16 micro-kernel
 *   gemm_bf16_amx.h       the AMX-BF16 micro-kernel (and, in test builds
 *                         only, gemm_bf16_amx_emulate.h: its tile
 *                         instructions in plain C)
 * and below: which path the CPU runs, the driver, the entry points; then
 *   gemm_bf16_rows.h      the same product for a handful of rows (decoding)
 * which uses them. */
#include "gemm_bf16_pack.h"
#include "gemm_bf16_portable.h"
#include "gemm_bf16_avx512.h"
#include "gemm_bf16_amx.h"

/* ------------------------------------------------------------------------
 * Which path the CPU runs
 * ------------------------------------------------------------------------ */

/* cpuid, not __builtin_cpu_supports: older compilers do not know the
 * avx512bf16 / amx names, and the OS must also save the zmm state (XCR0). */
static int gemm_bf16_cpu_has(int path)
{
#if defined(__x86_64__)
    unsigned a, b, c, d;
    if (path == GEMM_BF16_PORTABLE)
        return 1;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27)))  /* OSXSAVE */
        return 0;
    unsigned xlo, xhi;
    __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
    if ((xlo & 0xe6u) != 0xe6u)  /* SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM state */
        return 0;
    if (__get_cpuid_max(0, NULL) < 7)
        return 0;
    __cpuid_count(7, 0, a, b, c, d);
    int avx512 = (b & (1u << 16)) && (b & (1u << 30)) && (b & (1u << 31));  /* F, BW, VL */
    unsigned edx7 = d;
    __cpuid_count(7, 1, a, b, c, d);
    int bf16 = avx512 && (a & (1u << 5));
    if (path == GEMM_BF16_AVX512BF16)
        return bf16;
    if (path == GEMM_BF16_AMX)  /* AMX-BF16 (bit 22), AMX-TILE (bit 24), OS tile state (XCR0 17, 18) */
        return bf16 && (edx7 & (1u << 22)) && (edx7 & (1u << 24)) && (xlo & 0x60000u) == 0x60000u;
    return 0;
#else
    return path == GEMM_BF16_PORTABLE;
#endif
}

/* Linux hands out the AMX tile state (8 KB per thread) only to a process
 * that asks: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA). Asked
 * once; a refusal (old kernel, seccomp) means AMX is not used. In an
 * emulation build (tests only) the tiles are plain C and always there. */
static int gemm_bf16_amx_granted(void)
{
#if defined(FEMTOGPT_AMX_EMULATE) && defined(__x86_64__)
    return 1;
#else
    static int granted = -1; /* -1 not asked yet; racing threads ask twice, harmlessly */
    int g = __atomic_load_n(&granted, __ATOMIC_ACQUIRE);
    if (g < 0) {
#if defined(__x86_64__) && defined(__linux__)
        g = gemm_bf16_cpu_has(GEMM_BF16_AMX) && syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                                        18 /* XFEATURE_XTILEDATA */) == 0;
#else
        g = 0;
#endif
        __atomic_store_n(&granted, g, __ATOMIC_RELEASE);
    }
    return g;
#endif
}

/* 1 if `path` runs here (for AMX: the CPU has it and Linux granted the tiles). */
GEMM_BF16_API int gemm_bf16_available(int path)
{
    if (path == GEMM_BF16_AMX)
        return gemm_bf16_amx_granted();
    if (path == GEMM_BF16_PORTABLE || path == GEMM_BF16_AVX512BF16)
        return gemm_bf16_cpu_has(path);
    return 0;
}

static int gemm_bf16_forced = GEMM_BF16_AUTO;

/* The path that calls take now: the forced one, or the best available. */
GEMM_BF16_API int gemm_bf16_path(void)
{
    static int best = 0;
    int f = __atomic_load_n(&gemm_bf16_forced, __ATOMIC_RELAXED);
    if (f != GEMM_BF16_AUTO)
        return f;
    int b = __atomic_load_n(&best, __ATOMIC_RELAXED);
    if (b == 0) {
        b = gemm_bf16_available(GEMM_BF16_AMX) ? GEMM_BF16_AMX
            : gemm_bf16_available(GEMM_BF16_AVX512BF16) ? GEMM_BF16_AVX512BF16
            : GEMM_BF16_PORTABLE;
        __atomic_store_n(&best, b, __ATOMIC_RELAXED);
    }
    return b;
}

/* Force a path for every later call in this process (tests, benchmarks):
 * 0 auto, 1 portable, 2 AVX512_BF16, 3 AMX. Returns the path calls take
 * now, or -1 (and changes nothing) if `path` does not run on this CPU. */
GEMM_BF16_API int gemm_bf16_force(int path)
{
    if (path < GEMM_BF16_AUTO || path > GEMM_BF16_AMX)
        return -1;
    if (path != GEMM_BF16_AUTO && !gemm_bf16_available(path))
        return -1;
    __atomic_store_n(&gemm_bf16_forced, path, __ATOMIC_RELAXED);
    return gemm_bf16_path();
}

/* ------------------------------------------------------------------------
 * The driver
 * ------------------------------------------------------------------------ */

/* C = beta * C, for alpha == 0 or K == 0: A and B are not read (BLAS's rule). */
static void gemm_bf16_scale(int M, int N, float beta, float* C, int ldc)
{
    for (int i = 0; i < M; i++) {
        float* c = C + (ptrdiff_t)i * ldc;
        if (beta == 0.0f)
            memset(c, 0, (size_t)N * sizeof(float));
        else if (beta != 1.0f)
            for (int j = 0; j < N; j++)
                c[j] = beta * c[j];
    }
}

/* Blocks of MC rows of op(A) are packed once and multiplied by every B panel
 * (the A block stays in L2, each B panel is read once per block); inside, a
 * B panel is reused by all micro-panels of the block. K is not blocked: each
 * element's whole sum stays in one register, which keeps the order of the
 * contract and lets beta use the caller's C as it was. */
static __attribute__((noinline)) void gemm_bf16_drive(
    int path, int trans_a, int M, int N, int K, float alpha, const float* A, int lda,
    const uint16_t* Bp, float beta, float* C, int ldc, void* apack)
{
    int Kp = gemm_bf16_kpad(K), npairs = (K + 1) / 2;
    int mc = gemm_bf16_mc(K);
    int mr = path == GEMM_BF16_AMX ? GEMM_BF16_AMX_MR : GEMM_BF16_MR;
    for (int ic = 0; ic < M; ic += mc) {
        int mb = M - ic < mc ? M - ic : mc;
        int mb_pad = gemm_bf16_round_up(mb, mr);
        if (path == GEMM_BF16_AMX)
            gemm_bf16_pack_a_rowmajor((uint16_t*)apack, trans_a, mb, mb_pad, K, Kp, A, lda, ic);
        else
            gemm_bf16_pack_a((uint32_t*)apack, trans_a, mb, K, npairs, A, lda, ic);
        for (int j0 = 0; j0 < N; j0 += GEMM_BF16_NR) {
            int nr = N - j0 < GEMM_BF16_NR ? N - j0 : GEMM_BF16_NR;
            const uint16_t* panel = Bp + (size_t)j0 * Kp;
            for (int r0 = 0; r0 < mb; r0 += mr) {
                int rows = mb - r0 < mr ? mb - r0 : mr;
                float* c = C + (ptrdiff_t)(ic + r0) * ldc + j0;
#if defined(__x86_64__)
                if (path == GEMM_BF16_AVX512BF16) {
                    gemm_bf16_tile_avx512(npairs, (const uint32_t*)apack + (ptrdiff_t)r0 * npairs,
                                          (const uint32_t*)panel, rows, nr, alpha, beta, c, ldc);
                    continue;
                }
                if (path == GEMM_BF16_AMX) {
                    gemm_bf16_tile_amx(Kp, (const uint16_t*)apack + (ptrdiff_t)r0 * Kp, panel,
                                       rows, nr, alpha, beta, c, ldc);
                    continue;
                }
#endif
                gemm_bf16_tile_portable(npairs, (const uint32_t*)apack + (ptrdiff_t)r0 * npairs,
                                        (const uint32_t*)panel, rows, nr, alpha, beta, c, ldc);
            }
        }
    }
}

/* C = alpha * op(A) @ packed op(B) + beta * C, with B packed beforehand by
 * gemm_bf16_pack_b (same N, K and the trans_b it was packed with). `scratch`:
 * gemm_bf16_scratch_size(M, N, K, 1) bytes or more. */
GEMM_BF16_API void gemm_bf16_packed(int trans_a, int M, int N, int K, float alpha,
                                    const float* A, int lda, const uint16_t* Bp,
                                    float beta, float* C, int ldc, void* scratch)
{
    if (M <= 0 || N <= 0)
        return;
    if (alpha == 0.0f || K <= 0) {
        gemm_bf16_scale(M, N, beta, C, ldc);
        return;
    }
    int path = gemm_bf16_path();
#if defined(__x86_64__)
    /* FTZ and DAZ: vdpbf16ps and AMX flush denormals whatever MXCSR says;
     * the portable path gets the same by asking MXCSR, and every path's
     * epilogue runs under the same setting. */
    unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040u);
#endif
    gemm_bf16_drive(path, trans_a, M, N, K, alpha, A, lda, Bp, beta, C, ldc,
                    gemm_bf16_align64(scratch));
#if defined(__x86_64__)
    _mm_setcsr(csr);
#endif
}

/* C (M x N) = alpha * op(A) @ op(B) + beta * C: the fp32 front's signature
 * plus `scratch` of gemm_bf16_scratch_size(M, N, K, 0) bytes. B is packed
 * into the scratch first (once per call), then multiplied as above. */
GEMM_BF16_API void gemm_bf16(int trans_a, int trans_b, int M, int N, int K, float alpha,
                             const float* A, int lda, const float* B, int ldb,
                             float beta, float* C, int ldc, void* scratch)
{
    if (M <= 0 || N <= 0)
        return;
    if (alpha == 0.0f || K <= 0) {
        gemm_bf16_scale(M, N, beta, C, ldc);
        return;
    }
    uint16_t* bp = (uint16_t*)gemm_bf16_align64(scratch);
    size_t bbytes = gemm_bf16_packed_b_size(N, K) * 2;
    gemm_bf16_pack_b(bp, trans_b, N, K, B, ldb);
    gemm_bf16_packed(trans_a, M, N, K, alpha, A, lda, bp, beta, C, ldc, (char*)bp + bbytes);
}

#include "gemm_bf16_rows.h"

#endif /* FEMTOGPT_GEMM_BF16_H */
