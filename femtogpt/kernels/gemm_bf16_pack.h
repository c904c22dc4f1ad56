/* bf16 GEMM: rounding float32 to bf16, the sizes of packed operands, and
 * the packers, shared by every path so that all of them see the same bf16.
 * Part of gemm_bf16.h (which includes it after its constants and system headers; not for use alone).
 */
#ifndef FEMTOGPT_GEMM_BF16_PACK_H
#define FEMTOGPT_GEMM_BF16_PACK_H

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


#endif /* FEMTOGPT_GEMM_BF16_PACK_H */
