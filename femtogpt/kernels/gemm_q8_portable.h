/* q8 GEMM: the portable kernel (plain C), the same float32 operations in
 * the same order as the VNNI kernels, so the two give the same bits.
 * Part of gemm_q8.h (which includes it after its constants and system headers; not for use alone).
 */
#ifndef FEMTOGPT_GEMM_Q8_PORTABLE_H
#define FEMTOGPT_GEMM_Q8_PORTABLE_H

/* Rows 0 .. M-1 of out (row stride ldo), the columns of panels p0 .. p1-1,
 * one row and one 16-column panel at a time. The integer sums are exact, so
 * their order is free (here k in order); the float32 steps per block are the
 * contract's: s = dw * dx, t = (float)isum * s, acc = acc + t, and
 * out = acc (+ bias). The loops over the 16 columns are the lanes of the
 * VNNI kernel's registers, and gcc vectorises them in the -v3/-v4 builds. */
static void gemm_q8_panels_portable(float* out, ptrdiff_t ldo, const float* bias, ptrdiff_t M,
                                    int N, int K, const uint8_t* W, const uint8_t* act,
                                    int p0, int p1)
{
    int nb = gemm_q8_blocks(K);
    size_t pbytes = gemm_q8_panel_bytes(K), rb = gemm_q8_row_bytes(K);
    for (ptrdiff_t m = 0; m < M; m++) {
        const int8_t* xq = (const int8_t*)(act + (size_t)m * rb);
        const float* dx = (const float*)(xq + (size_t)nb * GEMM_Q8_QK);
        const int32_t* cx = (const int32_t*)(dx + nb);
        for (int p = p0; p < p1; p++) {
            const uint8_t* panel = W + (size_t)p * pbytes;
            float acc[GEMM_Q8_NR];
            for (int c = 0; c < GEMM_Q8_NR; c++)
                acc[c] = 0.0f;
            for (int b = 0; b < nb; b++) {
                const uint8_t* wq = gemm_q8_block_q(panel, b);
                const uint16_t* dh = gemm_q8_block_d(panel, b);
                const int8_t* aq = xq + (size_t)b * GEMM_Q8_QK;
                int32_t isum[GEMM_Q8_NR];
                for (int c = 0; c < GEMM_Q8_NR; c++)
                    isum[c] = cx[b];
                for (int g = 0; g < GEMM_Q8_QK / 4; g++)
                    for (int c = 0; c < GEMM_Q8_NR; c++)
                        for (int i = 0; i < 4; i++)
                            isum[c] += (int32_t)wq[g * 4 * GEMM_Q8_NR + 4 * c + i] * (int32_t)aq[4 * g + i];
                for (int c = 0; c < GEMM_Q8_NR; c++) {
                    float s = gemm_q8_f32_from_f16(dh[c]) * dx[b];
                    float t = (float)isum[c] * s;
                    acc[c] = acc[c] + t;
                }
            }
            int n0 = p * GEMM_Q8_NR;
            int cols = N - n0 < GEMM_Q8_NR ? N - n0 : GEMM_Q8_NR;
            float* o = out + (ptrdiff_t)m * ldo + n0;
            if (bias)
                for (int c = 0; c < cols; c++)
                    o[c] = acc[c] + bias[n0 + c];
            else
                for (int c = 0; c < cols; c++)
                    o[c] = acc[c];
        }
    }
}

#endif /* FEMTOGPT_GEMM_Q8_PORTABLE_H */
