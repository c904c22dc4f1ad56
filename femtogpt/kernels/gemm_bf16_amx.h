/* bf16 GEMM: the AMX-BF16 tile micro-kernel (tdpbf16ps). UNTESTED on
 * hardware: written on a Zen 4, which has no AMX.
 * Part of gemm_bf16.h (which includes it after its constants and system headers; not for use alone).
 */
#ifndef FEMTOGPT_GEMM_BF16_AMX_H
#define FEMTOGPT_GEMM_BF16_AMX_H

#if defined(__x86_64__)
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

#endif /* FEMTOGPT_GEMM_BF16_AMX_H */
