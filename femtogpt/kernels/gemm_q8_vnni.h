/* q8 GEMM: the AVX512_VNNI kernels (vpdpbusd), compiled only in the -v4
 * build (AVX-512 F/BW/VL there; VNNI by a target attribute, since x86-64-v4
 * does not include it) and run where cpuid says the CPU has VNNI.
 * Part of gemm_q8.h (which includes it after its constants and system headers; not for use alone).
 */
#ifndef FEMTOGPT_GEMM_Q8_VNNI_H
#define FEMTOGPT_GEMM_Q8_VNNI_H

#if GEMM_Q8_HAVE_VNNI
#define GEMM_Q8_VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

/* R rows x P panels (16 columns each) of out over all blocks. Per block and
 * row, each panel's int32 lanes start at the row's correction -128 * sum(q)
 * and take 8 vpdpbusd: the 64 bytes of one group of 4 k (u8 = q + 128, one
 * 32-bit lane per column) times the row's 4 int8 of that group broadcast.
 * Then the contract's float32 steps, lane by lane as the portable kernel:
 * s = dw * dx, t = (float)isum * s, acc = acc + t (separate mul and add, and
 * the header turns fp-contract off, so gcc cannot fuse them into an FMA).
 * R and P are constants at each call below, so the arrays live in registers:
 * 6 x 2 is 12 int32 + 12 float32 accumulators + 2 weights + 2 scales. */
GEMM_Q8_VNNI_TARGET
static inline __attribute__((always_inline)) void gemm_q8_tile_vnni(
    const int R, const int P, int nb, const uint8_t* panel, size_t pbytes,
    const uint8_t* act, size_t rb, float* out, ptrdiff_t ldo, const float* bias, int ncols)
{
    __m512 acc[GEMM_Q8_MR][GEMM_Q8_NP];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int p = 0; p < P; p++)
            acc[r][p] = _mm512_setzero_ps();
    const float* dx = (const float*)(act + (size_t)nb * GEMM_Q8_QK);
    const int32_t* cx = (const int32_t*)(dx + nb);
    for (int b = 0; b < nb; b++) {
        const uint8_t* wq = gemm_q8_block_q(panel, b);
        const int8_t* aq = (const int8_t*)act + (size_t)b * GEMM_Q8_QK;
        __m512i is[GEMM_Q8_MR][GEMM_Q8_NP];
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            __m512i c0 = _mm512_set1_epi32(((const int32_t*)((const uint8_t*)cx + (size_t)r * rb))[b]);
#pragma GCC unroll 8
            for (int p = 0; p < P; p++)
                is[r][p] = c0;
        }
#pragma GCC unroll 8
        for (int g = 0; g < GEMM_Q8_QK / 4; g++) {
            __m512i w[GEMM_Q8_NP];
#pragma GCC unroll 8
            for (int p = 0; p < P; p++)
                w[p] = _mm512_loadu_si512((const void*)(wq + (size_t)p * pbytes + g * 4 * GEMM_Q8_NR));
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                int32_t a4;
                memcpy(&a4, aq + (size_t)r * rb + 4 * g, 4);
                __m512i a = _mm512_set1_epi32(a4);
#pragma GCC unroll 8
                for (int p = 0; p < P; p++)
                    is[r][p] = _mm512_dpbusd_epi32(is[r][p], w[p], a);
            }
        }
        __m512 dw[GEMM_Q8_NP];
#pragma GCC unroll 8
        for (int p = 0; p < P; p++)
            dw[p] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)gemm_q8_block_d(panel + (size_t)p * pbytes, b)));
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            __m512 x = _mm512_set1_ps(((const float*)((const uint8_t*)dx + (size_t)r * rb))[b]);
#pragma GCC unroll 8
            for (int p = 0; p < P; p++) {
                __m512 s = _mm512_mul_ps(dw[p], x);
                __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(is[r][p]), s);
                acc[r][p] = _mm512_add_ps(acc[r][p], t);
            }
        }
    }
#pragma GCC unroll 8
    for (int p = 0; p < P; p++) {
        int cols = ncols - p * GEMM_Q8_NR;
        __mmask16 mk = cols >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << cols) - 1);
        __m512 bv = bias ? _mm512_maskz_loadu_ps(mk, bias + p * GEMM_Q8_NR) : _mm512_setzero_ps();
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            __m512 v = bias ? _mm512_add_ps(acc[r][p], bv) : acc[r][p];
            _mm512_mask_storeu_ps(out + (ptrdiff_t)r * ldo + p * GEMM_Q8_NR, mk, v);
        }
    }
}

/* The tile shapes the driver uses, each its own function (R, P constant). */
#define GEMM_Q8_VNNI_TILE(R, P)                                                             \
    GEMM_Q8_VNNI_TARGET static __attribute__((noinline)) void gemm_q8_tile_vnni_##R##x##P(  \
        int nb, const uint8_t* panel, size_t pbytes, const uint8_t* act, size_t rb,         \
        float* out, ptrdiff_t ldo, const float* bias, int ncols)                            \
    {                                                                                       \
        gemm_q8_tile_vnni(R, P, nb, panel, pbytes, act, rb, out, ldo, bias, ncols);         \
    }
GEMM_Q8_VNNI_TILE(1, 1) GEMM_Q8_VNNI_TILE(1, 2)
GEMM_Q8_VNNI_TILE(2, 1) GEMM_Q8_VNNI_TILE(2, 2) GEMM_Q8_VNNI_TILE(3, 1) GEMM_Q8_VNNI_TILE(3, 2)
GEMM_Q8_VNNI_TILE(4, 1) GEMM_Q8_VNNI_TILE(4, 2) GEMM_Q8_VNNI_TILE(5, 1) GEMM_Q8_VNNI_TILE(5, 2)
GEMM_Q8_VNNI_TILE(6, 1) GEMM_Q8_VNNI_TILE(6, 2)

typedef void (*gemm_q8_tile_fn)(int, const uint8_t*, size_t, const uint8_t*, size_t,
                                float*, ptrdiff_t, const float*, int);

/* One row (a decode step) against S panels that lie anywhere in W: S
 * independent streams of weights, each panel read in order, pair after pair
 * of blocks. Per block and panel the 8 groups of 4 k go to two int32 chains
 * (even and odd groups, summed after: integers, so the order is free) so
 * that 2 S vpdpbusd are in flight, not S. The float32 steps are
 * gemm_q8_tile_vnni's, lane by lane: the same bits. */
GEMM_Q8_VNNI_TARGET
static inline __attribute__((always_inline)) void gemm_q8_row_vnni(
    const int S, int nb, const uint8_t* const* panels, const uint8_t* act,
    float* const* outs, const float* const* biases, const int* ncols)
{
    __m512 acc[GEMM_Q8_RUNS];
    const uint8_t* w[GEMM_Q8_RUNS];
#pragma GCC unroll 8
    for (int s = 0; s < S; s++) {
        acc[s] = _mm512_setzero_ps();
        w[s] = panels[s];
    }
    const int8_t* aq = (const int8_t*)act;
    const float* dx = (const float*)(act + (size_t)nb * GEMM_Q8_QK);
    const int32_t* cx = (const int32_t*)(dx + nb);
    for (int b = 0; b < nb; b++) {
        int half = b & 1;   /* which block of the pair: its quants and scales */
        __m512i even[GEMM_Q8_RUNS], odd[GEMM_Q8_RUNS];
        __m512i c0 = _mm512_set1_epi32(cx[b]);
#pragma GCC unroll 8
        for (int s = 0; s < S; s++) {
            even[s] = c0;
            odd[s] = _mm512_setzero_si512();
        }
#pragma GCC unroll 8
        for (int g = 0; g < GEMM_Q8_QK / 4; g += 2) {
            int32_t a0, a1;
            memcpy(&a0, aq + (size_t)b * GEMM_Q8_QK + 4 * g, 4);
            memcpy(&a1, aq + (size_t)b * GEMM_Q8_QK + 4 * g + 4, 4);
            __m512i x0 = _mm512_set1_epi32(a0), x1 = _mm512_set1_epi32(a1);
#pragma GCC unroll 8
            for (int s = 0; s < S; s++) {
                const uint8_t* q = w[s] + half * GEMM_Q8_BLOCK_Q + g * 4 * GEMM_Q8_NR;
                even[s] = _mm512_dpbusd_epi32(even[s], _mm512_loadu_si512((const void*)q), x0);
                odd[s] = _mm512_dpbusd_epi32(odd[s], _mm512_loadu_si512((const void*)(q + 4 * GEMM_Q8_NR)), x1);
            }
        }
        __m512 x = _mm512_set1_ps(dx[b]);
#pragma GCC unroll 8
        for (int s = 0; s < S; s++) {
            const void* d = w[s] + 2 * GEMM_Q8_BLOCK_Q + half * GEMM_Q8_NR * 2;
            __m512 sc = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)d)), x);
            __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(even[s], odd[s])), sc);
            acc[s] = _mm512_add_ps(acc[s], t);
        }
        if (half)
#pragma GCC unroll 8
            for (int s = 0; s < S; s++)
                w[s] += GEMM_Q8_PAIR_BYTES;
    }
#pragma GCC unroll 8
    for (int s = 0; s < S; s++) {
        int cols = ncols[s];
        __mmask16 mk = cols >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << cols) - 1);
        __m512 v = acc[s];
        if (biases[s])
            v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, biases[s]));
        _mm512_mask_storeu_ps(outs[s], mk, v);
    }
}

GEMM_Q8_VNNI_TARGET static __attribute__((noinline)) void gemm_q8_row_vnni_runs(
    int nb, const uint8_t* const* panels, const uint8_t* act, float* const* outs,
    const float* const* biases, const int* ncols)
{
    gemm_q8_row_vnni(GEMM_Q8_RUNS, nb, panels, act, outs, biases, ncols);
}

GEMM_Q8_VNNI_TARGET static __attribute__((noinline)) void gemm_q8_row_vnni_one(
    int nb, const uint8_t* const* panels, const uint8_t* act, float* const* outs,
    const float* const* biases, const int* ncols)
{
    gemm_q8_row_vnni(1, nb, panels, act, outs, biases, ncols);
}

/* One row, panels p0 .. p1-1: cut into GEMM_Q8_RUNS runs of consecutive
 * panels, and each step takes the next panel of every run. Panels lie end
 * to end, so each run is one sequential stream of weights over its whole
 * range. Measured on Zen 4, one thread, weights from memory (GPT-2's
 * shapes): 24-27 GB/s, where 4 neighbouring panels at a time (4 streams of
 * 13-52 KB, then a jump) read 16-19; 2 runs were as fast on some shapes,
 * 6 and 8 slower on all. The panels left over go one at a time. */
static void gemm_q8_row_panels_vnni(float* out, const float* bias, int N, int K,
                                    const uint8_t* W, const uint8_t* act, int p0, int p1)
{
    int nb = gemm_q8_blocks(K);
    size_t pbytes = gemm_q8_panel_bytes(K);
    int len = (p1 - p0) / GEMM_Q8_RUNS;
    const uint8_t* panels[GEMM_Q8_RUNS];
    float* outs[GEMM_Q8_RUNS];
    const float* biases[GEMM_Q8_RUNS];
    int ncols[GEMM_Q8_RUNS];
    for (int j = 0; j < len; j++) {
        for (int s = 0; s < GEMM_Q8_RUNS; s++) {
            int p = p0 + s * len + j;
            panels[s] = W + (size_t)p * pbytes;
            outs[s] = out + p * GEMM_Q8_NR;
            biases[s] = bias ? bias + p * GEMM_Q8_NR : NULL;
            ncols[s] = N - p * GEMM_Q8_NR;
        }
        gemm_q8_row_vnni_runs(nb, panels, act, outs, biases, ncols);
    }
    for (int p = p0 + GEMM_Q8_RUNS * len; p < p1; p++) {
        panels[0] = W + (size_t)p * pbytes;
        outs[0] = out + p * GEMM_Q8_NR;
        biases[0] = bias ? bias + p * GEMM_Q8_NR : NULL;
        ncols[0] = N - p * GEMM_Q8_NR;
        gemm_q8_row_vnni_one(nb, panels, act, outs, biases, ncols);
    }
}

/* Rows 0 .. M-1, panels p0 .. p1-1, as gemm_q8_panels_portable. One row
 * (decode: memory-bound) goes to gemm_q8_row_panels_vnni; more rows take
 * tiles of 6 rows x 2 panels, the weights of 2 panels reused by every row
 * of an L2-sized chunk of the quantized rows. */
static void gemm_q8_panels_vnni(float* out, ptrdiff_t ldo, const float* bias, ptrdiff_t M,
                                int N, int K, const uint8_t* W, const uint8_t* act,
                                int p0, int p1)
{
    static const gemm_q8_tile_fn tiles[GEMM_Q8_MR][2] = {
        {gemm_q8_tile_vnni_1x1, gemm_q8_tile_vnni_1x2}, {gemm_q8_tile_vnni_2x1, gemm_q8_tile_vnni_2x2},
        {gemm_q8_tile_vnni_3x1, gemm_q8_tile_vnni_3x2}, {gemm_q8_tile_vnni_4x1, gemm_q8_tile_vnni_4x2},
        {gemm_q8_tile_vnni_5x1, gemm_q8_tile_vnni_5x2}, {gemm_q8_tile_vnni_6x1, gemm_q8_tile_vnni_6x2}};
    size_t pbytes = gemm_q8_panel_bytes(K), rb = gemm_q8_row_bytes(K);
    int nb = gemm_q8_blocks(K);
    if (M == 1) {
        gemm_q8_row_panels_vnni(out, bias, N, K, W, act, p0, p1);
        return;
    }
    ptrdiff_t mc = (ptrdiff_t)(GEMM_Q8_ACT_BUDGET / rb) / GEMM_Q8_MR * GEMM_Q8_MR;
    if (mc < GEMM_Q8_MR)
        mc = GEMM_Q8_MR;
    for (ptrdiff_t i0 = 0; i0 < M; i0 += mc) {
        ptrdiff_t mb = M - i0 < mc ? M - i0 : mc;
        for (int p = p0; p < p1; p += 2) {
            int np = p1 - p < 2 ? p1 - p : 2;
            for (ptrdiff_t r0 = 0; r0 < mb; r0 += GEMM_Q8_MR) {
                int rows = mb - r0 < GEMM_Q8_MR ? (int)(mb - r0) : GEMM_Q8_MR;
                tiles[rows - 1][np - 1](nb, W + (size_t)p * pbytes, pbytes,
                                        act + (size_t)(i0 + r0) * rb, rb,
                                        out + (i0 + r0) * ldo + p * GEMM_Q8_NR, ldo,
                                        bias ? bias + p * GEMM_Q8_NR : NULL, N - p * GEMM_Q8_NR);
            }
        }
    }
}

#endif /* GEMM_Q8_HAVE_VNNI */

#endif /* FEMTOGPT_GEMM_Q8_VNNI_H */
