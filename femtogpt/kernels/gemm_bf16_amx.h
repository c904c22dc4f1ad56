/* bf16 GEMM: the AMX-BF16 tile micro-kernel (tdpbf16ps).
 * Part of gemm_bf16.h (which includes it after its constants and system headers; not for use alone).
 *
 * What is tested, and what is not
 * -------------------------------
 * No CPU that ran this code so far has AMX (it was written on a Zen 4). Its
 * logic is tested under emulation: built with -DFEMTOGPT_AMX_EMULATE (the
 * "amx-emulated" builds of scripts/gemm_bf16_lib.py, never the core), the
 * six tile intrinsics below become gemm_bf16_amx_emulate.h's plain C, which
 * follows the SDM's semantics, honours the config loaded here and counts any
 * use the hardware would fault on. tests/test_gemm_bf16.py then forces path
 * 3 on any x86-64 and checks, with the driver and packing code unchanged:
 *   - the tile config (rows/colsb of all 8 tiles), the A tiles' row-major
 *     layout and Kp * 2-byte stride (gemm_bf16_pack_a_rowmajor, rows padded
 *     with zeros to a multiple of 32), the B tiles read from the packed panel
 *     with its 128-byte stride, Kp stepped by 32 (the count of each tile
 *     instruction), the 2 x 2 tiles of C stored into `out`, the mr/nr tails,
 *     the alpha/beta epilogue (beta == 0 never reads C), trans_a/trans_b, the
 *     driver's 32-row micro-panels and MC blocks, and the scratch size:
 *     NN/NT/TN/TT products of odd and tail sizes (M and N below, at and above
 *     16 and 32, K below, at and off multiples of 32, M past one MC block)
 *     against float64 within a float32 summation bound, bit for bit against a
 *     numpy model of the emulated summation order, and against the portable
 *     and AVX512_BF16 paths within float32 summation error;
 *   - that every call releases the tiles, and the edge cases of the contract
 *     (rounding, NaN/inf, denormals, alpha == 0, MXCSR restored).
 * Not tested: real hardware at all, so neither its speed, nor its internal
 * summation order of tdpbf16ps (the SDM and the Intrinsics Guide document two
 * different ones; the tests run both and hold the results only to a bound),
 * nor the real instructions as gcc emits them (their asm constraints are
 * not the emulator's: see the config below), nor the CPU/OS check: the
 * emulation build reports AMX available without cpuid's AMX bits or
 * arch_prctl(ARCH_REQ_XCOMP_PERM), so the grant on a real Linux kernel has
 * never run.
 */
#ifndef FEMTOGPT_GEMM_BF16_AMX_H
#define FEMTOGPT_GEMM_BF16_AMX_H

#if defined(__x86_64__)
#if defined(FEMTOGPT_AMX_EMULATE)
#include "gemm_bf16_amx_emulate.h"  /* tests only: the tile intrinsics in plain C */
#endif

/* (c) AMX-BF16: 32 x 32 of C per step in tiles 0-3 (2 x 2 of 16 x 16 fp32),
 * A in tiles 4-5 (16 rows x 32 k, row-major bf16), B in tiles 6-7 (16
 * k-pairs x 16 columns, read straight from the packed B panel with its
 * 128-byte row stride). Only reached after cpuid and arch_prctl both say yes
 * (or in an emulation build). */
#ifndef GEMM_BF16_AMX_TARGET
#define GEMM_BF16_AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))
#endif

/* ldtilecfg's 64-byte operand (palette 1 uses tiles 0-7; the rest stays zero). */
struct gemm_bf16_tilecfg {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};
_Static_assert(sizeof(struct gemm_bf16_tilecfg) == 64, "ldtilecfg reads 64 bytes");

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
    /* gcc's _tile_loadconfig (gcc 12's amxtileintrin.h) tells the compiler
     * that ldtilecfg reads 8 bytes at &cfg (an "m" operand of type void*),
     * so the stores of colsb and rows (bytes 16-63) may be dropped as dead:
     * gcc 12 -O2 drops them in a function that only configures and zeroes a
     * tile. Here they survived (tilestored's "memory" clobber keeps them),
     * by luck of the code around; this empty asm reads all 64 bytes, so
     * they are stored before ldtilecfg whatever the compiler. */
    __asm__ volatile("" : : "m"(cfg));
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
