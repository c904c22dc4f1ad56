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

/* ------------------------------------------------------------------------
 * Rounding
 * ------------------------------------------------------------------------ */

static inline uint32_t gemm_bf16_bits(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
static inline float gemm_bf16_float(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

/* float32 -> bf16, round to nearest, ties to even. Adding 0x7fff plus the
 * lowest kept bit carries into the kept half exactly when the dropped half
 * is above the tie, or at the tie with an odd kept half. NaN would carry
 * into the exponent (a NaN with a small payload could become inf), so it
 * keeps its top bits and gets the quiet bit instead, as vcvtneps2bf16 does.
 * Denormals are kept (PyTorch's conversion keeps them too). */
static inline uint16_t gemm_bf16_round(float x)
{
    uint32_t u = gemm_bf16_bits(x);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* The rounding the packers use: as above, then a bf16 denormal becomes a
 * zero of its sign, which is how the bf16 units read it anyway. Written
 * branch-free so that gcc vectorises the packing loops. */
static inline uint32_t gemm_bf16_round_daz(float x)
{
    uint32_t u = gemm_bf16_bits(x);
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = (u >> 16) | 0x40u;
    r = ((u & 0x7fffffffu) > 0x7f800000u) ? nan : r;
    r = ((r & 0x7f80u) == 0) ? (r & 0x8000u) : r;
    return r & 0xffffu;
}

/* out[i] = bf16(inp[i]), round to nearest even, NaN stays NaN, denormals kept. */
GEMM_BF16_API void bf16_from_f32(uint16_t* out, const float* inp, size_t n)
{
    for (size_t i = 0; i < n; i++)
        out[i] = gemm_bf16_round(inp[i]);
}

/* out[i] = float32 value of bf16 inp[i] (exact). */
GEMM_BF16_API void bf16_to_f32(float* out, const uint16_t* inp, size_t n)
{
    for (size_t i = 0; i < n; i++)
        out[i] = gemm_bf16_float((uint32_t)inp[i] << 16);
}

/* ------------------------------------------------------------------------
 * Sizes
 * ------------------------------------------------------------------------ */

static inline int gemm_bf16_kpad(int K) { return (K + GEMM_BF16_KPAD - 1) / GEMM_BF16_KPAD * GEMM_BF16_KPAD; }
static inline int gemm_bf16_round_up(int x, int m) { return (x + m - 1) / m * m; }

/* Elements (uint16_t) of a packed op(B) of K x N. */
GEMM_BF16_API size_t gemm_bf16_packed_b_size(int N, int K)
{
    if (N <= 0 || K <= 0)
        return 0;
    return (size_t)gemm_bf16_round_up(N, GEMM_BF16_NR) * (size_t)gemm_bf16_kpad(K);
}

/* Rows of A packed at a time for this K. */
static inline int gemm_bf16_mc(int K)
{
    size_t row = (size_t)gemm_bf16_kpad(K) * 2;
    size_t mc = GEMM_BF16_L2_BUDGET / row / GEMM_BF16_MC_STEP * GEMM_BF16_MC_STEP;
    if (mc < GEMM_BF16_MC_STEP)
        mc = GEMM_BF16_MC_STEP;
    if (mc > GEMM_BF16_MC_MAX)
        mc = GEMM_BF16_MC_MAX;
    return (int)mc;
}

/* Bytes of scratch one call needs: the packed A block, plus the packed B
 * when B is not pre-packed (b_packed == 0), plus 64 for alignment. The same
 * size serves every path and any M up to the one given. */
GEMM_BF16_API size_t gemm_bf16_scratch_size(int M, int N, int K, int b_packed)
{
    if (M <= 0 || N <= 0 || K <= 0)
        return 64;
    int mc = gemm_bf16_mc(K);
    int rows = M < mc ? gemm_bf16_round_up(M, GEMM_BF16_MC_STEP) : mc;
    size_t bytes = (size_t)rows * (size_t)gemm_bf16_kpad(K) * 2 + 64;
    if (!b_packed)
        bytes += gemm_bf16_packed_b_size(N, K) * 2 + 64;
    return bytes;
}

static inline void* gemm_bf16_align64(void* p)
{
    return (void*)(((uintptr_t)p + 63) & ~(uintptr_t)63);
}

/* ------------------------------------------------------------------------
 * Packing (plain C, shared by every path so that all see the same bf16)
 * ------------------------------------------------------------------------ */

/* dst[p*width + w] = pair(src[w][2p], src[w][2p+1]) for w < valid, zero for
 * valid <= w < width and for pairs past K, up to npairs. `src` rows (stride
 * ld) run along k: A when !trans_a, B when trans_b (the weight of x @ W^T).
 * Rows are converted 32 k at a time into a small buffer (vectorised) and
 * then transposed into the panel. */
static void gemm_bf16_pack_rows(uint32_t* dst, int width, int valid, const float* src,
                                ptrdiff_t ld, int K, int npairs)
{
    enum { KB = 32 };
    uint32_t buf[GEMM_BF16_NR > GEMM_BF16_MR ? GEMM_BF16_NR : GEMM_BF16_MR][KB / 2];
    int kp_full = K / KB;
    for (int kb = 0; kb < kp_full; kb++) {
        for (int w = 0; w < valid; w++) {
            const float* s = src + (ptrdiff_t)w * ld + (ptrdiff_t)kb * KB;
            for (int q = 0; q < KB / 2; q++)
                buf[w][q] = gemm_bf16_round_daz(s[2 * q]) | (gemm_bf16_round_daz(s[2 * q + 1]) << 16);
        }
        uint32_t* d = dst + (ptrdiff_t)kb * (KB / 2) * width;
        for (int q = 0; q < KB / 2; q++) {
            for (int w = 0; w < valid; w++)
                d[q * width + w] = buf[w][q];
            for (int w = valid; w < width; w++)
                d[q * width + w] = 0;
        }
    }
    /* the k tail: pairs from kp_full*KB/2 on, with zeros past K */
    for (int p = kp_full * (KB / 2); p < npairs; p++) {
        int k = 2 * p;
        for (int w = 0; w < width; w++) {
            uint32_t lo = 0, hi = 0;
            if (w < valid) {
                const float* s = src + (ptrdiff_t)w * ld;
                if (k < K) lo = gemm_bf16_round_daz(s[k]);
                if (k + 1 < K) hi = gemm_bf16_round_daz(s[k + 1]);
            }
            dst[(ptrdiff_t)p * width + w] = lo | (hi << 16);
        }
    }
}

/* dst[p*width + w] = pair(src[2p][w], src[2p+1][w]): `src` rows (stride ld)
 * run along the panel's width, so two rows interleave into one k-pair row
 * with no transpose: A when trans_a (dout^T of a weight gradient), B when
 * !trans_b. */
static void gemm_bf16_pack_cols(uint32_t* dst, int width, int valid, const float* src,
                                ptrdiff_t ld, int K, int npairs)
{
    for (int p = 0; p < npairs; p++) {
        int k = 2 * p;
        uint32_t* d = dst + (ptrdiff_t)p * width;
        if (k + 1 < K) {
            const float* s0 = src + (ptrdiff_t)k * ld;
            const float* s1 = s0 + ld;
            for (int w = 0; w < valid; w++)
                d[w] = gemm_bf16_round_daz(s0[w]) | (gemm_bf16_round_daz(s1[w]) << 16);
        } else if (k < K) {
            const float* s0 = src + (ptrdiff_t)k * ld;
            for (int w = 0; w < valid; w++)
                d[w] = gemm_bf16_round_daz(s0[w]);
        } else {
            for (int w = 0; w < valid; w++)
                d[w] = 0;
        }
        for (int w = valid; w < width; w++)
            d[w] = 0;
    }
}

/* Pack op(B) (K x N) once, in the layout described at the top, into
 * `packed` of gemm_bf16_packed_b_size(N, K) elements. The core does this
 * for each weight once per optimizer step (after AdamW has updated it):
 * trans_b = 1 for the forward x @ W^T, trans_b = 0 for dout @ W. */
GEMM_BF16_API void gemm_bf16_pack_b(uint16_t* packed, int trans_b, int N, int K,
                                    const float* B, int ldb)
{
    if (N <= 0 || K <= 0)
        return;
    int Kp = gemm_bf16_kpad(K);
    for (int j0 = 0; j0 < N; j0 += GEMM_BF16_NR) {
        int valid = N - j0 < GEMM_BF16_NR ? N - j0 : GEMM_BF16_NR;
        uint32_t* dst = (uint32_t*)(packed + (size_t)j0 * Kp);
        if (trans_b)
            gemm_bf16_pack_rows(dst, GEMM_BF16_NR, valid, B + (ptrdiff_t)j0 * ldb, ldb, K, Kp / 2);
        else
            gemm_bf16_pack_cols(dst, GEMM_BF16_NR, valid, B + j0, ldb, K, Kp / 2);
    }
}

/* Pack rows i0 .. i0+rows-1 of op(A) into MR-row micro-panels of `npairs`
 * k-pairs each ([p][MR] pairs, the order the micro-kernel broadcasts them),
 * zero rows up to a multiple of MR. */
static void gemm_bf16_pack_a(uint32_t* dst, int trans_a, int rows, int K, int npairs,
                             const float* A, int lda, int i0)
{
    for (int r0 = 0; r0 < rows; r0 += GEMM_BF16_MR) {
        int valid = rows - r0 < GEMM_BF16_MR ? rows - r0 : GEMM_BF16_MR;
        uint32_t* d = dst + (ptrdiff_t)(r0 / GEMM_BF16_MR) * npairs * GEMM_BF16_MR;
        if (trans_a)
            gemm_bf16_pack_cols(d, GEMM_BF16_MR, valid, A + i0 + r0, lda, K, npairs);
        else
            gemm_bf16_pack_rows(d, GEMM_BF16_MR, valid, A + (ptrdiff_t)(i0 + r0) * lda, lda, K, npairs);
    }
}

/* AMX's A tiles are row-major bf16: row r of the block at dst + r * Kp,
 * zeros past K and for rows up to a multiple of 32. */
static void gemm_bf16_pack_a_rowmajor(uint16_t* dst, int trans_a, int rows, int rows_pad,
                                      int K, int Kp, const float* A, int lda, int i0)
{
    for (int r = 0; r < rows_pad; r++) {
        uint16_t* d = dst + (ptrdiff_t)r * Kp;
        if (r >= rows) {
            memset(d, 0, (size_t)Kp * 2);
            continue;
        }
        if (trans_a)
            for (int k = 0; k < K; k++)
                d[k] = (uint16_t)gemm_bf16_round_daz(A[(ptrdiff_t)k * lda + i0 + r]);
        else
            for (int k = 0; k < K; k++)
                d[k] = (uint16_t)gemm_bf16_round_daz(A[(ptrdiff_t)(i0 + r) * lda + k]);
        for (int k = K; k < Kp; k++)
            d[k] = 0;
    }
}

/* ------------------------------------------------------------------------
 * Micro-kernels: one MR x NR tile of C from an A micro-panel and a B panel
 * over `npairs` k-pairs, then the alpha/beta epilogue on mr x nr of it.
 * ------------------------------------------------------------------------ */

/* (b) Portable C. The same per-element order as vdpbf16ps, so the result is
 * bit-identical to (a). Written with GCC's vector extensions (gcc and clang
 * lower them to the build's SIMD, or to scalars where there is none) because
 * gcc does not vectorise the plain loops of this tile on its own (it kept
 * them scalar: 10 GFLOP/s). The tile is walked as 4 rows x 16
 * columns, so the accumulators fit in AVX2/SSE registers (any walk gives the
 * same bits: each element's sum still runs over p in order). Where the build
 * has FMA, gcc contracts the multiply-adds: the product of two bf16 is exact
 * in float32, so an FMA rounds exactly like the separate add. */
#if defined(__AVX512F__)
#define GEMM_BF16_VL 16
#elif defined(__AVX__)
#define GEMM_BF16_VL 8
#else
#define GEMM_BF16_VL 4
#endif
/* one native vector of the build (a vector wider than the build's registers
 * makes gcc go through memory: 10 GFLOP/s on x86-64-v3) */
typedef float gemm_bf16_vf __attribute__((vector_size(GEMM_BF16_VL * 4)));
typedef uint32_t gemm_bf16_vu __attribute__((vector_size(GEMM_BF16_VL * 4)));

static void gemm_bf16_tile_portable(int npairs, const uint32_t* a, const uint32_t* b,
                                    int mr, int nr, float alpha, float beta,
                                    float* C, ptrdiff_t ldc)
{
    enum { RB = 4, CB = 16, NV = CB / GEMM_BF16_VL };
    for (int r0 = 0; r0 < mr; r0 += RB) {
        for (int j0 = 0; j0 < nr; j0 += CB) {
            gemm_bf16_vf acc[RB][NV];
#pragma GCC unroll 4
            for (int r = 0; r < RB; r++)
#pragma GCC unroll 4
                for (int v = 0; v < NV; v++)
                    acc[r][v] = (gemm_bf16_vf){0};
            for (int p = 0; p < npairs; p++) {
                gemm_bf16_vf b0[NV], b1[NV];
                const uint32_t* bp = b + (ptrdiff_t)p * GEMM_BF16_NR + j0;
#pragma GCC unroll 4
                for (int v = 0; v < NV; v++) {
                    gemm_bf16_vu bw;
                    memcpy(&bw, bp + v * GEMM_BF16_VL, sizeof bw);
                    b0[v] = (gemm_bf16_vf)(bw << 16);
                    b1[v] = (gemm_bf16_vf)(bw & 0xffff0000u);
                }
                const uint32_t* ap = a + (ptrdiff_t)p * GEMM_BF16_MR + r0;
#pragma GCC unroll 4
                for (int r = 0; r < RB; r++) {
                    float a0 = gemm_bf16_float(ap[r] << 16);
                    float a1 = gemm_bf16_float(ap[r] & 0xffff0000u);
#pragma GCC unroll 4
                    for (int v = 0; v < NV; v++) {
                        gemm_bf16_vf t = acc[r][v] + a1 * b1[v];
                        acc[r][v] = t + a0 * b0[v];
                    }
                }
            }
            int rows = mr - r0 < RB ? mr - r0 : RB;
            int cols = nr - j0 < CB ? nr - j0 : CB;
            for (int r = 0; r < rows; r++) {
                float out[CB];
                float* c = C + (ptrdiff_t)(r0 + r) * ldc + j0;
                memcpy(out, acc[r], sizeof out);
                if (beta == 0.0f)
                    for (int j = 0; j < cols; j++)
                        c[j] = alpha * out[j];
                else
                    for (int j = 0; j < cols; j++)
                        c[j] = fmaf(alpha, out[j], beta * c[j]);
            }
        }
    }
}

#if defined(__x86_64__)
#define GEMM_BF16_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

/* (a) AVX512_BF16: 12 rows x 32 columns of C in 24 zmm accumulators. Per
 * k-pair: two 64-byte loads of B (32 columns x 2 k), and per row one 32-bit
 * broadcast of A's pair (gcc folds it into vdpbf16ps's {1to16} memory
 * operand) feeding two vdpbf16ps. 24 independent chains hide vdpbf16ps's
 * latency at one instruction per cycle (Zen 4 runs one zmm vdpbf16ps per
 * cycle: 64 FLOP/cycle, twice its fp32 FMA rate). */
GEMM_BF16_AVX512_TARGET
static void gemm_bf16_tile_avx512(int npairs, const uint32_t* a, const uint32_t* b,
                                  int mr, int nr, float alpha, float beta,
                                  float* C, ptrdiff_t ldc)
{
    __m512 acc[GEMM_BF16_MR][2];
#pragma GCC unroll 12
    for (int r = 0; r < GEMM_BF16_MR; r++) {
        acc[r][0] = _mm512_setzero_ps();
        acc[r][1] = _mm512_setzero_ps();
    }
    for (int p = 0; p < npairs; p++) {
        __m512bh b0 = (__m512bh)_mm512_loadu_si512((const void*)(b + (ptrdiff_t)p * GEMM_BF16_NR));
        __m512bh b1 = (__m512bh)_mm512_loadu_si512((const void*)(b + (ptrdiff_t)p * GEMM_BF16_NR + 16));
        const uint32_t* ap = a + (ptrdiff_t)p * GEMM_BF16_MR;
#pragma GCC unroll 12
        for (int r = 0; r < GEMM_BF16_MR; r++) {
            __m512bh ar = (__m512bh)_mm512_set1_epi32((int)ap[r]);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], ar, b0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], ar, b1);
        }
    }
    __mmask16 m0 = nr >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << nr) - 1);
    __mmask16 m1 = nr >= 32 ? (__mmask16)0xffff : nr <= 16 ? (__mmask16)0 : (__mmask16)((1u << (nr - 16)) - 1);
    __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
#pragma GCC unroll 12
    for (int r = 0; r < GEMM_BF16_MR; r++) {
        if (r >= mr)
            break;
        float* c = C + (ptrdiff_t)r * ldc;
        if (beta == 0.0f) {
            _mm512_mask_storeu_ps(c, m0, _mm512_mul_ps(va, acc[r][0]));
            _mm512_mask_storeu_ps(c + 16, m1, _mm512_mul_ps(va, acc[r][1]));
        } else {
            __m512 c0 = _mm512_mul_ps(vb, _mm512_maskz_loadu_ps(m0, c));
            __m512 c1 = _mm512_mul_ps(vb, _mm512_maskz_loadu_ps(m1, c + 16));
            _mm512_mask_storeu_ps(c, m0, _mm512_fmadd_ps(va, acc[r][0], c0));
            _mm512_mask_storeu_ps(c + 16, m1, _mm512_fmadd_ps(va, acc[r][1], c1));
        }
    }
}

/* (c) AMX-BF16: 32 x 32 of C per step in tiles 0-3 (2 x 2 of 16 x 16 fp32),
 * A in tiles 4-5 (16 rows x 32 k, row-major bf16), B in tiles 6-7 (16
 * k-pairs x 16 columns, read straight from the packed B panel with its
 * 128-byte row stride). UNTESTED: this machine (Zen 4) has no AMX; it is
 * only reached after cpuid and arch_prctl both say yes. */
#define GEMM_BF16_AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))

struct gemm_bf16_tilecfg {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

GEMM_BF16_AMX_TARGET
static void gemm_bf16_tile_amx(int Kp, const uint16_t* a, const uint16_t* b,
                               int mr, int nr, float alpha, float beta,
                               float* C, ptrdiff_t ldc)
{
    struct gemm_bf16_tilecfg cfg;
    float out[GEMM_BF16_AMX_MR][GEMM_BF16_NR] __attribute__((aligned(64)));
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    size_t astride = (size_t)Kp * 2, bstride = GEMM_BF16_NR * 4;
    for (int k = 0; k < Kp; k += 32) {
        _tile_loadd(4, a + k, astride);
        _tile_loadd(5, a + 16 * (ptrdiff_t)Kp + k, astride);
        _tile_loadd(6, b + (ptrdiff_t)(k / 2) * 2 * GEMM_BF16_NR, bstride);
        _tile_loadd(7, b + (ptrdiff_t)(k / 2) * 2 * GEMM_BF16_NR + 32, bstride);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, &out[0][0], GEMM_BF16_NR * 4);
    _tile_stored(1, &out[0][16], GEMM_BF16_NR * 4);
    _tile_stored(2, &out[16][0], GEMM_BF16_NR * 4);
    _tile_stored(3, &out[16][16], GEMM_BF16_NR * 4);
    _tile_release();
    for (int r = 0; r < mr; r++) {
        float* c = C + (ptrdiff_t)r * ldc;
        if (beta == 0.0f)
            for (int j = 0; j < nr; j++)
                c[j] = alpha * out[r][j];
        else
            for (int j = 0; j < nr; j++)
                c[j] = fmaf(alpha, out[r][j], beta * c[j]);
    }
}
#endif /* __x86_64__ */

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
 * once; a refusal (old kernel, seccomp) means AMX is not used. */
static int gemm_bf16_amx_granted(void)
{
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

#endif /* FEMTOGPT_GEMM_BF16_H */
