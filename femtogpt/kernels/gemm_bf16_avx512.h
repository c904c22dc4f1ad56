/* bf16 GEMM: the AVX512_BF16 micro-kernel (vdpbf16ps), compiled with a
 * target attribute so that it exists in every build and runs where cpuid says.
 * Part of gemm_bf16.h (which includes it after its constants and system headers; not for use alone).
 */
#ifndef FEMTOGPT_GEMM_BF16_AVX512_H
#define FEMTOGPT_GEMM_BF16_AVX512_H

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

#endif /* __x86_64__ */

#endif /* FEMTOGPT_GEMM_BF16_AVX512_H */
