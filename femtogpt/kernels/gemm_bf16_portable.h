/* bf16 GEMM: the portable micro-kernel (plain C with vector extensions),
 * bit-identical to the AVX512_BF16 one by the contract's summation order.
 * Part of gemm_bf16.h (which includes it after its constants and system headers; not for use alone).
 */
#ifndef FEMTOGPT_GEMM_BF16_PORTABLE_H
#define FEMTOGPT_GEMM_BF16_PORTABLE_H

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


#endif /* FEMTOGPT_GEMM_BF16_PORTABLE_H */
