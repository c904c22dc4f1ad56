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
    __m512 acc[GEMM_Q8_MR][GEMM_Q8_P1];
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
        __m512i is[GEMM_Q8_MR][GEMM_Q8_P1];
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            __m512i c0 = _mm512_set1_epi32(((const int32_t*)((const uint8_t*)cx + (size_t)r * rb))[b]);
#pragma GCC unroll 8
            for (int p = 0; p < P; p++)
                is[r][p] = c0;
        }
#pragma GCC unroll 8
        for (int g = 0; g < GEMM_Q8_QK / 4; g++) {
            __m512i w[GEMM_Q8_P1];
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
        __m512 dw[GEMM_Q8_P1];
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
GEMM_Q8_VNNI_TILE(1, 1) GEMM_Q8_VNNI_TILE(1, 2) GEMM_Q8_VNNI_TILE(1, 3) GEMM_Q8_VNNI_TILE(1, 4)
GEMM_Q8_VNNI_TILE(2, 1) GEMM_Q8_VNNI_TILE(2, 2) GEMM_Q8_VNNI_TILE(3, 1) GEMM_Q8_VNNI_TILE(3, 2)
GEMM_Q8_VNNI_TILE(4, 1) GEMM_Q8_VNNI_TILE(4, 2) GEMM_Q8_VNNI_TILE(5, 1) GEMM_Q8_VNNI_TILE(5, 2)
GEMM_Q8_VNNI_TILE(6, 1) GEMM_Q8_VNNI_TILE(6, 2)

typedef void (*gemm_q8_tile_fn)(int, const uint8_t*, size_t, const uint8_t*, size_t,
                                float*, ptrdiff_t, const float*, int);

/* Rows 0 .. M-1, panels p0 .. p1-1, as gemm_q8_panels_portable. One row
 * (decode: memory-bound) takes 4 panels at a time, 4 independent chains of
 * vpdpbusd over 4 streams of weights; more rows take tiles of 6 rows x 2
 * panels, the weights of 2 panels reused by every row of an L2-sized chunk
 * of the quantized rows. */
static void gemm_q8_panels_vnni(float* out, ptrdiff_t ldo, const float* bias, ptrdiff_t M,
                                int N, int K, const uint8_t* W, const uint8_t* act,
                                int p0, int p1)
{
    static const gemm_q8_tile_fn one_row[GEMM_Q8_P1] = {
        gemm_q8_tile_vnni_1x1, gemm_q8_tile_vnni_1x2, gemm_q8_tile_vnni_1x3, gemm_q8_tile_vnni_1x4};
    static const gemm_q8_tile_fn tiles[GEMM_Q8_MR][2] = {
        {gemm_q8_tile_vnni_1x1, gemm_q8_tile_vnni_1x2}, {gemm_q8_tile_vnni_2x1, gemm_q8_tile_vnni_2x2},
        {gemm_q8_tile_vnni_3x1, gemm_q8_tile_vnni_3x2}, {gemm_q8_tile_vnni_4x1, gemm_q8_tile_vnni_4x2},
        {gemm_q8_tile_vnni_5x1, gemm_q8_tile_vnni_5x2}, {gemm_q8_tile_vnni_6x1, gemm_q8_tile_vnni_6x2}};
    int nb = gemm_q8_blocks(K);
    size_t pbytes = gemm_q8_panel_bytes(K), rb = gemm_q8_row_bytes(K);
    if (M == 1) {
        for (int p = p0; p < p1; p += GEMM_Q8_P1) {
            int np = p1 - p < GEMM_Q8_P1 ? p1 - p : GEMM_Q8_P1;
            one_row[np - 1](nb, W + (size_t)p * pbytes, pbytes, act, rb, out + p * GEMM_Q8_NR, ldo,
                            bias ? bias + p * GEMM_Q8_NR : NULL, N - p * GEMM_Q8_NR);
        }
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
