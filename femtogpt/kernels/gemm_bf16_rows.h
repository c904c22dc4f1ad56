/* bf16 GEMM for a handful of rows (batch-1 decoding): gemm_bf16_packed's
 * contract for trans_a = 0, over the SAME packed B, without padding M up to
 * a micro-tile's 12 rows.
 * Part of gemm_bf16.h (which includes it after its entry points; not for use alone).
 *
 * Why a second kernel: at M = 1 the GEMM multiplies a 12-row micro-panel of
 * which 11 rows are zeros, and the product is bound by reading B once (two
 * bytes a weight) anyway. Here each k-pair row of a B panel (64 bf16, 128
 * bytes) is loaded once and fed to the M rows' vdpbf16ps, and several panels
 * are walked at once so that enough independent sums are in flight to keep
 * the loads streaming.
 *
 * Same bits as the GEMM. Every element of C is computed exactly as the
 * contract at the top of gemm_bf16.h says, which is what gemm_bf16_packed
 * does too: A rounded by the same packer rounding (gemm_bf16_round_daz),
 * acc = +0 then, for p = 0 .. ceil(K/2)-1 in order, one vdpbf16ps step (odd
 * pair element first) on the AVX512_BF16 path, the same two rounded adds in
 * the same C expression as gemm_bf16_tile_portable on the portable path; no
 * K blocking (the whole sum stays in one register in both kernels), then the
 * same epilogue (beta == 0: alpha * acc; else fma(alpha, acc, beta * C)),
 * all under MXCSR's FTZ and DAZ. Only which elements are summed side by side
 * differs, and that changes no element's order. On the AMX path the GEMM
 * sums in tdpbf16ps's own order, so there this kernel (which then runs the
 * AVX512_BF16 code) agrees with the GEMM within float32 summation error only.
 *
 * A is packed row-major (row r's k-pairs at a + r * npairs, one uint32 =
 * bf16(A[r][2p]) | bf16(A[r][2p+1]) << 16, zero past K), so a row's pair is
 * one 32-bit broadcast. Rows are taken GEMM_BF16_ROWS_MAX at a time; more
 * rows are allowed (each block of rows reads B again), but past that the
 * GEMM is faster (gemm_bf16.pxi picks by M).
 */
#ifndef FEMTOGPT_GEMM_BF16_ROWS_H
#define FEMTOGPT_GEMM_BF16_ROWS_H

/* Rows per pass over B, and the front's threshold. Measured on Zen 4, one
 * thread, weights from memory (scripts/bf16_rows_probe.py --sweep): up to 8
 * rows this kernel takes 230-330 us for qkv (768 x 2304) where the GEMM takes
 * 350-430 at any M up to 12; from 9 rows it passes over B twice and the two
 * are even; from 13 the GEMM is faster. */
#define GEMM_BF16_ROWS_MAX 8

/* Software prefetch distance in k-pairs (128-byte rows of a panel), 0 = off:
 * off, because 4, 8 and 16 ahead measured no faster on Zen 4 (the hardware
 * prefetcher already follows the G panel streams; within this shared VM's
 * noise of +-20%, 16 was slower). scripts/bf16_rows_probe.py --sweep --define
 * GEMM_BF16_ROWS_PREFETCH=n times it again. */
#ifndef GEMM_BF16_ROWS_PREFETCH
#define GEMM_BF16_ROWS_PREFETCH 0
#endif

/* Bytes of scratch gemm_bf16_rows needs for M rows of K (the packed A, plus 64 for alignment). */
GEMM_BF16_API size_t gemm_bf16_rows_scratch_size(int M, int K)
{
    if (M <= 0 || K <= 0)
        return 64;
    return (size_t)M * (size_t)((K + 1) / 2) * 4 + 64;
}

/* ap[r * npairs + p] = bf16(A[r][2p]) | bf16(A[r][2p+1]) << 16, zero past K. */
GEMM_BF16_API void gemm_bf16_rows_pack_a(uint32_t* ap, int M, int K, const float* A, int lda)
{
    int npairs = (K + 1) / 2, full = K / 2;
    for (int r = 0; r < M; r++) {
        const float* s = A + (ptrdiff_t)r * lda;
        uint32_t* d = ap + (ptrdiff_t)r * npairs;
        for (int p = 0; p < full; p++)
            d[p] = gemm_bf16_round_daz(s[2 * p]) | (gemm_bf16_round_daz(s[2 * p + 1]) << 16);
        if (full < npairs)
            d[full] = gemm_bf16_round_daz(s[2 * full]);
    }
}

/* ------------------------------------------------------------------------
 * AVX512_BF16: MR rows x G panels (2 x G zmm per row) of C per pass over
 * those panels' k-pairs. MR and G are constants at each call site below, so
 * gcc unrolls the loops and keeps the MR x G x 2 sums in registers.
 * ------------------------------------------------------------------------ */
#if defined(__x86_64__)
GEMM_BF16_AVX512_TARGET
static inline __attribute__((always_inline)) void gemm_bf16_rows_block_avx512(
    const int MR, const int G, int npairs, const uint32_t* a, const uint32_t* b,
    ptrdiff_t pstride, ptrdiff_t cstride, int ncols, float alpha, float beta, float* C, ptrdiff_t ldc)
{
    __m512 acc[GEMM_BF16_ROWS_MAX][8][2];  /* [MR][G]: fixed bounds, so no VLA */
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 8
        for (int g = 0; g < G; g++)
            acc[r][g][0] = acc[r][g][1] = _mm512_setzero_ps();
    for (int p = 0; p < npairs; p++) {
        __m512bh b0[8], b1[8];
#pragma GCC unroll 8
        for (int g = 0; g < G; g++) {
            const uint32_t* bp = b + g * pstride + (ptrdiff_t)p * GEMM_BF16_NR;
#if GEMM_BF16_ROWS_PREFETCH > 0
            _mm_prefetch((const char*)(bp + GEMM_BF16_ROWS_PREFETCH * GEMM_BF16_NR), _MM_HINT_T0);
            _mm_prefetch((const char*)(bp + GEMM_BF16_ROWS_PREFETCH * GEMM_BF16_NR + 16), _MM_HINT_T0);
#endif
            b0[g] = (__m512bh)_mm512_loadu_si512((const void*)bp);
            b1[g] = (__m512bh)_mm512_loadu_si512((const void*)(bp + 16));
        }
#pragma GCC unroll 8
        for (int r = 0; r < MR; r++) {
            __m512bh ar = (__m512bh)_mm512_set1_epi32((int)a[(ptrdiff_t)r * npairs + p]);
#pragma GCC unroll 8
            for (int g = 0; g < G; g++) {
                acc[r][g][0] = _mm512_dpbf16_ps(acc[r][g][0], ar, b0[g]);
                acc[r][g][1] = _mm512_dpbf16_ps(acc[r][g][1], ar, b1[g]);
            }
        }
    }
    /* the epilogue of gemm_bf16_tile_avx512, on the ncols valid columns */
    __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
#pragma GCC unroll 8
    for (int g = 0; g < G; g++) {
        int n = ncols - g * GEMM_BF16_NR;
        __mmask16 m0 = n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1);
        __mmask16 m1 = n >= 32 ? (__mmask16)0xffff : n <= 16 ? (__mmask16)0 : (__mmask16)((1u << (n - 16)) - 1);
#pragma GCC unroll 8
        for (int r = 0; r < MR; r++) {
            float* c = C + (ptrdiff_t)r * ldc + g * cstride;
            if (beta == 0.0f) {
                _mm512_mask_storeu_ps(c, m0, _mm512_mul_ps(va, acc[r][g][0]));
                _mm512_mask_storeu_ps(c + 16, m1, _mm512_mul_ps(va, acc[r][g][1]));
            } else {
                __m512 c0 = _mm512_mul_ps(vb, _mm512_maskz_loadu_ps(m0, c));
                __m512 c1 = _mm512_mul_ps(vb, _mm512_maskz_loadu_ps(m1, c + 16));
                _mm512_mask_storeu_ps(c, m0, _mm512_fmadd_ps(va, acc[r][g][0], c0));
                _mm512_mask_storeu_ps(c + 16, m1, _mm512_fmadd_ps(va, acc[r][g][1], c1));
            }
        }
    }
}

/* Panels walked at once for MR rows, each from its own run of panels: for 2
 * rows and more, about 16-24 zmm of sums (of 32), the rest for B and the
 * broadcast. One row (a decode step) is bound by reading B, and there the
 * number of streams is what counts. On Zen 4, GPT-2 124M-shaped bf16 decode,
 * alternated runs of the whole decode: 2 runs per thread 97-110 tok/s at one
 * thread where 4 gave 89-122 (3 of 4 pairs to 2 runs), and at two threads
 * (4 streams in all, not 8) 111-189 where 4 gave 106-182 (4 of 6 pairs, one
 * even); in a C probe of the product alone (one thread, one shape at a time)
 * 4 runs read 26-30 GB/s, 2 within 3% of it, where 8 neighbouring panels
 * (8 streams of 48-192 KB, then a jump) read 20-26. */
static inline int gemm_bf16_rows_group(int mr)
{
    static const int group[GEMM_BF16_ROWS_MAX + 1] = {0, 2, 6, 4, 3, 2, 2, 1, 1};
    return group[mr];
}

#define GEMM_BF16_ROWS_CASE(mr, g)                                                      \
    case (mr) * 16 + (g):                                                               \
        gemm_bf16_rows_block_avx512(mr, g, npairs, a, b, pstride, cstride, ncols, alpha, beta, C, ldc); \
        break;

/* One block of mr <= GEMM_BF16_ROWS_MAX rows x g <= gemm_bf16_rows_group(mr) panels. */
GEMM_BF16_AVX512_TARGET
static void gemm_bf16_rows_avx512(int mr, int g, int npairs, const uint32_t* a, const uint32_t* b,
                                  ptrdiff_t pstride, ptrdiff_t cstride, int ncols, float alpha,
                                  float beta, float* C, ptrdiff_t ldc)
{
    switch (mr * 16 + g) {
        GEMM_BF16_ROWS_CASE(1, 1) GEMM_BF16_ROWS_CASE(1, 2) GEMM_BF16_ROWS_CASE(1, 3)
        GEMM_BF16_ROWS_CASE(1, 4) GEMM_BF16_ROWS_CASE(1, 5) GEMM_BF16_ROWS_CASE(1, 6)
        GEMM_BF16_ROWS_CASE(1, 7) GEMM_BF16_ROWS_CASE(1, 8)
        GEMM_BF16_ROWS_CASE(2, 1) GEMM_BF16_ROWS_CASE(2, 2) GEMM_BF16_ROWS_CASE(2, 3)
        GEMM_BF16_ROWS_CASE(2, 4) GEMM_BF16_ROWS_CASE(2, 5) GEMM_BF16_ROWS_CASE(2, 6)
        GEMM_BF16_ROWS_CASE(3, 1) GEMM_BF16_ROWS_CASE(3, 2) GEMM_BF16_ROWS_CASE(3, 3)
        GEMM_BF16_ROWS_CASE(3, 4)
        GEMM_BF16_ROWS_CASE(4, 1) GEMM_BF16_ROWS_CASE(4, 2) GEMM_BF16_ROWS_CASE(4, 3)
        GEMM_BF16_ROWS_CASE(5, 1) GEMM_BF16_ROWS_CASE(5, 2)
        GEMM_BF16_ROWS_CASE(6, 1) GEMM_BF16_ROWS_CASE(6, 2)
        GEMM_BF16_ROWS_CASE(7, 1)
        GEMM_BF16_ROWS_CASE(8, 1)
    }
}
#undef GEMM_BF16_ROWS_CASE
#endif /* __x86_64__ */

/* ------------------------------------------------------------------------
 * Portable: one panel, one row at a time (the panel stays in L1/L2 for the
 * next row), its 32 columns in vectors of the build's width. The sum is
 * gemm_bf16_tile_portable's expression, so gcc rounds it the same way.
 * ------------------------------------------------------------------------ */
static void gemm_bf16_rows_portable(int mr, int npairs, const uint32_t* a, const uint32_t* b,
                                    int nr, float alpha, float beta, float* C, ptrdiff_t ldc)
{
    enum { NV = GEMM_BF16_NR / GEMM_BF16_VL };
    for (int r = 0; r < mr; r++) {
        gemm_bf16_vf acc[NV];
#pragma GCC unroll 8
        for (int v = 0; v < NV; v++)
            acc[v] = (gemm_bf16_vf){0};
        const uint32_t* ar = a + (ptrdiff_t)r * npairs;
        for (int p = 0; p < npairs; p++) {
            const uint32_t* bp = b + (ptrdiff_t)p * GEMM_BF16_NR;
            float a0 = gemm_bf16_float(ar[p] << 16);
            float a1 = gemm_bf16_float(ar[p] & 0xffff0000u);
#pragma GCC unroll 8
            for (int v = 0; v < NV; v++) {
                gemm_bf16_vu bw;
                memcpy(&bw, bp + v * GEMM_BF16_VL, sizeof bw);
                gemm_bf16_vf b0 = (gemm_bf16_vf)(bw << 16);
                gemm_bf16_vf b1 = (gemm_bf16_vf)(bw & 0xffff0000u);
                gemm_bf16_vf t = acc[v] + a1 * b1;
                acc[v] = t + a0 * b0;
            }
        }
        float out[GEMM_BF16_NR];
        float* c = C + (ptrdiff_t)r * ldc;
        memcpy(out, acc, sizeof out);
        if (beta == 0.0f)
            for (int j = 0; j < nr; j++)
                c[j] = alpha * out[j];
        else
            for (int j = 0; j < nr; j++)
                c[j] = fmaf(alpha, out[j], beta * c[j]);
    }
}

/* ------------------------------------------------------------------------
 * Entry points
 * ------------------------------------------------------------------------ */

/* C (M x N) = alpha * A @ packed op(B) + beta * C with A already packed by
 * gemm_bf16_rows_pack_a (M rows, the same K). Threads may call this on
 * disjoint column ranges that start on a panel (Bp + n0 * Kp, C + n0) with
 * one shared packed A. */
GEMM_BF16_API void gemm_bf16_rows_packed(int M, int N, int K, float alpha, const uint32_t* ap,
                                         const uint16_t* Bp, float beta, float* C, int ldc)
{
    if (M <= 0 || N <= 0)
        return;
    if (alpha == 0.0f || K <= 0) {
        gemm_bf16_scale(M, N, beta, C, ldc);
        return;
    }
    int path = gemm_bf16_path();
    int npairs = (K + 1) / 2, Kp = gemm_bf16_kpad(K);
    ptrdiff_t pstride = (ptrdiff_t)Kp * GEMM_BF16_NR / 2;  /* uint32 pairs per panel */
#if defined(__x86_64__)
    unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040u);  /* FTZ and DAZ, as gemm_bf16_packed */
#endif
    for (int i0 = 0; i0 < M; i0 += GEMM_BF16_ROWS_MAX) {
        int mr = M - i0 < GEMM_BF16_ROWS_MAX ? M - i0 : GEMM_BF16_ROWS_MAX;
        const uint32_t* a = ap + (ptrdiff_t)i0 * npairs;
        float* c = C + (ptrdiff_t)i0 * ldc;
#if defined(__x86_64__)
        if (path != GEMM_BF16_PORTABLE) {
            /* G runs of consecutive whole panels, the next panel of every run
             * at each step: panels lie end to end, so each run is one long
             * sequential stream (see gemm_bf16_rows_group); then the panels
             * left over, G neighbours at a time. */
            int group = gemm_bf16_rows_group(mr);
            int len = N / GEMM_BF16_NR / group, j0;
            for (int j = 0; j < len; j++)
                gemm_bf16_rows_avx512(mr, group, npairs, a,
                                      (const uint32_t*)(Bp + (size_t)j * GEMM_BF16_NR * Kp),
                                      pstride * len, (ptrdiff_t)len * GEMM_BF16_NR,
                                      group * GEMM_BF16_NR, alpha, beta,
                                      c + (ptrdiff_t)j * GEMM_BF16_NR, ldc);
            for (j0 = len * group * GEMM_BF16_NR; j0 < N; j0 += group * GEMM_BF16_NR) {
                int ncols = N - j0 < group * GEMM_BF16_NR ? N - j0 : group * GEMM_BF16_NR;
                int g = (ncols + GEMM_BF16_NR - 1) / GEMM_BF16_NR;
                gemm_bf16_rows_avx512(mr, g, npairs, a, (const uint32_t*)(Bp + (size_t)j0 * Kp),
                                      pstride, GEMM_BF16_NR, ncols, alpha, beta, c + j0, ldc);
            }
            continue;
        }
#endif
        for (int j0 = 0; j0 < N; j0 += GEMM_BF16_NR) {
            int nr = N - j0 < GEMM_BF16_NR ? N - j0 : GEMM_BF16_NR;
            gemm_bf16_rows_portable(mr, npairs, a, (const uint32_t*)(Bp + (size_t)j0 * Kp),
                                    nr, alpha, beta, c + j0, ldc);
        }
    }
#if defined(__x86_64__)
    _mm_setcsr(csr);
#endif
}

/* gemm_bf16_packed(0, M, N, K, ...) for few rows: the same arguments, the
 * same bits (AMX aside, see the top), with `scratch` of
 * gemm_bf16_rows_scratch_size(M, K) bytes (any alignment). */
GEMM_BF16_API void gemm_bf16_rows(int M, int N, int K, float alpha, const float* A, int lda,
                                  const uint16_t* Bp, float beta, float* C, int ldc, void* scratch)
{
    if (M <= 0 || N <= 0)
        return;
    if (alpha == 0.0f || K <= 0) {
        gemm_bf16_scale(M, N, beta, C, ldc);
        return;
    }
    uint32_t* ap = (uint32_t*)gemm_bf16_align64(scratch);
    gemm_bf16_rows_pack_a(ap, M, K, A, lda);
    gemm_bf16_rows_packed(M, N, K, alpha, ap, Bp, beta, C, ldc);
}

#endif /* FEMTOGPT_GEMM_BF16_ROWS_H */
