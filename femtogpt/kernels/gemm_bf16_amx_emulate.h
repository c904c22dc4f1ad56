/* bf16 GEMM, test builds only: the AMX tile instructions that
 * gemm_bf16_amx.h uses, emulated in plain C, so that the AMX path's code
 * runs, and is checked, on an x86-64 CPU without AMX.
 * Included by gemm_bf16_amx.h, and only when FEMTOGPT_AMX_EMULATE is
 * defined: scripts/gemm_bf16_lib.py's "amx-emulated" builds define it, the
 * Cython core never does (setup.py has no such macro).
 *
 * What it replaces
 * ----------------
 * Exactly the six intrinsics gemm_bf16_tile_amx calls: _tile_loadconfig,
 * _tile_zero, _tile_loadd, _tile_dpbf16ps, _tile_stored, _tile_release.
 * immintrin.h defines them (as macros over inline asm, _tile_loadconfig and
 * _tile_release as inline functions in gcc), so they are #undef'd and
 * redefined here as calls into the functions below; and GEMM_BF16_AMX_TARGET
 * is defined empty, so the kernel is compiled for the build's own -march
 * (no amx-*, no avx512* target) and runs on any x86-64. Everything else the
 * AMX path runs (the driver's blocking, gemm_bf16_pack_a_rowmajor, the packed
 * B panel, the epilogue) is the production code, unchanged.
 *
 * The emulated machine (Intel SDM vol. 2, LDTILECFG .. TDPBF16PS)
 * ----------------------------------------------------------------
 * One per thread, as the real tile state: 8 tiles of 16 rows x 64 bytes, and
 * the loaded config (palette, start_row, rows and colsb of each tile).
 *   ldtilecfg   reads all 64 bytes. Palette 0: back to the INIT state (no
 *               tile configured). Palette 1: checks what the SDM's #GP
 *               checks (reserved bytes 2-15, 32-47, 56-63 zero; rows <= 16,
 *               colsb <= 64; rows and colsb both zero or both not), then
 *               takes rows/colsb of tiles 0-7 and zeroes all tile data.
 *   tilezero    zeroes the tile.
 *   tileloadd   rows start_row .. rows-1 from base + r * stride, colsb bytes
 *               each; the bytes past colsb and the rows past `rows` zeroed.
 *   tilestored  rows start_row .. rows-1, colsb bytes each, to base + r *
 *               stride; nothing else of memory is written.
 *   tdpbf16ps   dst = m x n fp32, src1 = m x k bf16 pairs, src2 = k x n bf16
 *               pairs with m = dst.rows, n = dst.colsb / 4, k = src2.rows;
 *               #UD checks of the SDM: the three tiles distinct, m ==
 *               src1.rows, src1.colsb / 4 == k, src2.colsb == dst.colsb.
 *               Past n columns and m rows, dst is zeroed (write_row_and_zero,
 *               zero_upper_rows).
 *   tilerelease back to the INIT state.
 * start_row is honoured (and zeroed by each instruction) as the SDM says,
 * though the kernel always loads 0.
 *
 * Faults: where the hardware would raise #UD or #GP (a tile not configured
 * by the loaded config, no config loaded or released already, tile number
 * past 7, tile shapes that do not fit, a bad config), the instruction does
 * nothing and is counted in gemm_bf16_emu.faults, the first one described
 * in gemm_bf16_emu.fault. No abort(): the probe library reads the count
 * after every call and the test fails with that description. So a kernel
 * whose config does not match how it uses the tiles fails its tests here,
 * and one whose rows/colsb are wrong but consistent gives wrong numbers,
 * which the tests see too (the emulator reads and computes only what the
 * config says).
 *
 * Summation order of tdpbf16ps (what is emulated, exactly)
 * --------------------------------------------------------
 * For each element (m, n) of dst, with a = fp32(src1.row[m].bf16[.]) and
 * b = fp32(src2.row[k].bf16[.]), FEMTOGPT_AMX_EMULATE_ORDER selects:
 *   0 (default) the SDM's pseudocode: two fp32 partial sums from +0, over
 *       k = 0 .. K-1 in order, each step one FMA rounded to fp32:
 *           even = fma(a[2k], b[2n], even);  odd = fma(a[2k+1], b[2n+1], odd)
 *       then  dst = dst + (even + odd)   (two more roundings, in that order).
 *   1 the Intrinsics Guide's pseudocode (_tile_dpbf16ps): dst accumulated
 *       in place, over k in order, even element first:
 *           dst = fma(a[2k], b[2n], dst);  dst = fma(a[2k+1], b[2n+1], dst)
 * The two documents disagree, and real hardware may well follow neither
 * (its internal adder tree is not documented), so the tests hold the AMX
 * path to float64 within a float32 summation bound, and to the other paths
 * within float32 summation error; bit for bit only to a numpy model of the
 * order emulated, which checks the emulation and the kernel's data flow, not
 * the hardware. Both orders are built and tested.
 * Arithmetic: bf16 inputs with a zero exponent (denormals) are read as zeros
 * of their sign (DAZ), fp32 results that are denormal are flushed to zeros of
 * their sign (FTZ), round to nearest even; MXCSR is neither consulted nor
 * updated (it is set to RNE + FTZ + DAZ inside the emulated instruction and
 * restored, flags included). A product of two bf16 is exact in fp32, so the
 * FMA differs from a multiply then add only where that product overflows.
 *
 * Not emulated: the real instructions' encodings, gcc's asm constraints for
 * them, the speed, the tile permission (XFD) and arch_prctl, TSX aborts, the
 * other palettes and tile instructions.
 *
 * In an emulation build path 3 is always available, and the default. The
 * few-row kernels of gemm_bf16_rows.h have no AMX code: on path 3 they run
 * the AVX512_BF16 one, so on a CPU without AVX512_BF16 an emulation build
 * must force another path before calling them (the probe library does not
 * export them).
 */
#ifndef FEMTOGPT_GEMM_BF16_AMX_EMULATE_H
#define FEMTOGPT_GEMM_BF16_AMX_EMULATE_H

#if !defined(FEMTOGPT_AMX_EMULATE)
#error "gemm_bf16_amx_emulate.h is for test builds (-DFEMTOGPT_AMX_EMULATE) only"
#endif

#include <stdio.h>

#ifndef FEMTOGPT_AMX_EMULATE_ORDER
#define FEMTOGPT_AMX_EMULATE_ORDER 0
#endif
#if FEMTOGPT_AMX_EMULATE_ORDER != 0 && FEMTOGPT_AMX_EMULATE_ORDER != 1
#error "FEMTOGPT_AMX_EMULATE_ORDER: 0 (the SDM's order) or 1 (the Intrinsics Guide's)"
#endif

/* Palette 1: 8 tiles of at most 16 rows x 64 bytes; tdpbf16ps takes k and n up to 16. */
enum { GEMM_BF16_EMU_TILES = 8, GEMM_BF16_EMU_ROWS = 16, GEMM_BF16_EMU_COLSB = 64 };

/* Instructions run, by kind (the tests count them: Kp stepped by 32, one
 * config and one release per 32 x 32 of C). Faulting ones count too. */
enum {
    GEMM_BF16_EMU_LDTILECFG, GEMM_BF16_EMU_TILEZERO, GEMM_BF16_EMU_TILELOADD,
    GEMM_BF16_EMU_TDPBF16PS, GEMM_BF16_EMU_TILESTORED, GEMM_BF16_EMU_TILERELEASE,
    GEMM_BF16_EMU_KINDS
};

struct gemm_bf16_emu {
    int palette;   /* 0: INIT, no tile configured; 1: palette 1 loaded */
    int start_row;
    int rows[GEMM_BF16_EMU_TILES], colsb[GEMM_BF16_EMU_TILES];
    uint8_t tile[GEMM_BF16_EMU_TILES][GEMM_BF16_EMU_ROWS][GEMM_BF16_EMU_COLSB];
    unsigned long faults;  /* instructions the hardware would have faulted on */
    char fault[160];       /* the first of them */
    unsigned long count[GEMM_BF16_EMU_KINDS];
};

/* Thread-local like the real tile state (each thread of the core would have its own). */
static __thread struct gemm_bf16_emu gemm_bf16_emu;

static int gemm_bf16_emu_fault(const char* insn, int tile, const char* why)
{
    struct gemm_bf16_emu* e = &gemm_bf16_emu;
    if (e->faults++ == 0)
        snprintf(e->fault, sizeof e->fault, "%s tmm%d: %s", insn, tile, why);
    return 0;
}

/* The #UD checks every tile instruction makes on its tile operands. */
static int gemm_bf16_emu_usable(const char* insn, int t)
{
    struct gemm_bf16_emu* e = &gemm_bf16_emu;
    if (t < 0 || t >= GEMM_BF16_EMU_TILES)
        return gemm_bf16_emu_fault(insn, t, "no such tile (palette 1 has tmm0-tmm7)");
    if (e->palette == 0)
        return gemm_bf16_emu_fault(insn, t, "tiles not configured (no ldtilecfg, or after tilerelease)");
    if (e->rows[t] == 0)
        return gemm_bf16_emu_fault(insn, t, "the loaded config leaves this tile unconfigured");
    if (e->colsb[t] % 4 != 0)
        return gemm_bf16_emu_fault(insn, t, "colsb not a multiple of 4");
    return 1;
}

static void gemm_bf16_emu_init_state(void)
{
    struct gemm_bf16_emu* e = &gemm_bf16_emu;
    e->palette = 0;
    e->start_row = 0;
    memset(e->rows, 0, sizeof e->rows);
    memset(e->colsb, 0, sizeof e->colsb);
    memset(e->tile, 0, sizeof e->tile);
}

static void gemm_bf16_emu_loadconfig(const void* config)
{
    struct gemm_bf16_emu* e = &gemm_bf16_emu;
    uint8_t c[64];
    memcpy(c, config, 64);
    e->count[GEMM_BF16_EMU_LDTILECFG]++;
    if (c[0] == 0) {
        gemm_bf16_emu_init_state();
        return;
    }
    if (c[0] != 1) {
        gemm_bf16_emu_fault("ldtilecfg", -1, "#GP: palette not supported (only 0 and 1)");
        return;
    }
    for (int i = 2; i < 64; i++) {
        int reserved = i < 16 || (i >= 32 && i < 48) || i >= 56;  /* tiles 8-15 do not exist in palette 1 */
        if (reserved && c[i] != 0) {
            gemm_bf16_emu_fault("ldtilecfg", -1, "#GP: a reserved byte is not zero");
            return;
        }
    }
    int rows[GEMM_BF16_EMU_TILES], colsb[GEMM_BF16_EMU_TILES];
    for (int t = 0; t < GEMM_BF16_EMU_TILES; t++) {
        colsb[t] = c[16 + 2 * t] | (c[17 + 2 * t] << 8);
        rows[t] = c[48 + t];
        if (rows[t] > GEMM_BF16_EMU_ROWS || colsb[t] > GEMM_BF16_EMU_COLSB) {
            gemm_bf16_emu_fault("ldtilecfg", t, "#GP: more than 16 rows or 64 bytes a row");
            return;
        }
        if ((rows[t] == 0) != (colsb[t] == 0)) {
            gemm_bf16_emu_fault("ldtilecfg", t, "#GP: rows and colsb must be both zero or both set");
            return;
        }
    }
    gemm_bf16_emu_init_state();
    e->palette = 1;
    e->start_row = c[1];
    memcpy(e->rows, rows, sizeof rows);
    memcpy(e->colsb, colsb, sizeof colsb);
}

static void gemm_bf16_emu_zero(int t)
{
    struct gemm_bf16_emu* e = &gemm_bf16_emu;
    e->count[GEMM_BF16_EMU_TILEZERO]++;
    if (!gemm_bf16_emu_usable("tilezero", t))
        return;
    memset(e->tile[t], 0, sizeof e->tile[t]);
    e->start_row = 0;
}

static void gemm_bf16_emu_loadd(int t, const void* base, ptrdiff_t stride)
{
    struct gemm_bf16_emu* e = &gemm_bf16_emu;
    e->count[GEMM_BF16_EMU_TILELOADD]++;
    if (!gemm_bf16_emu_usable("tileloadd", t))
        return;
    if (e->start_row >= e->rows[t]) {
        gemm_bf16_emu_fault("tileloadd", t, "start_row past the tile's rows");
        return;
    }
    if (e->start_row == 0)
        memset(e->tile[t], 0, sizeof e->tile[t]);
    for (int r = e->start_row; r < e->rows[t]; r++) {
        memcpy(e->tile[t][r], (const uint8_t*)base + (ptrdiff_t)r * stride, (size_t)e->colsb[t]);
        memset(e->tile[t][r] + e->colsb[t], 0, (size_t)(GEMM_BF16_EMU_COLSB - e->colsb[t]));
    }
    e->start_row = 0;
}

static void gemm_bf16_emu_stored(int t, void* base, ptrdiff_t stride)
{
    struct gemm_bf16_emu* e = &gemm_bf16_emu;
    e->count[GEMM_BF16_EMU_TILESTORED]++;
    if (!gemm_bf16_emu_usable("tilestored", t))
        return;
    if (e->start_row >= e->rows[t]) {
        gemm_bf16_emu_fault("tilestored", t, "start_row past the tile's rows");
        return;
    }
    for (int r = e->start_row; r < e->rows[t]; r++)
        memcpy((uint8_t*)base + (ptrdiff_t)r * stride, e->tile[t][r], (size_t)e->colsb[t]);
    e->start_row = 0;
}

static void gemm_bf16_emu_release(void)
{
    gemm_bf16_emu.count[GEMM_BF16_EMU_TILERELEASE]++;
    gemm_bf16_emu_init_state();
}

/* A denormal (zero exponent) fp32 becomes a zero of its sign: DAZ on the
 * inputs, FTZ on the results. */
static inline float gemm_bf16_emu_flush(float x)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7f800000u) == 0)
        u &= 0x80000000u;
    memcpy(&x, &u, 4);
    return x;
}

/* bf16 element i of a tile row, as fp32, DAZ. */
static inline float gemm_bf16_emu_bf16(const uint8_t* row, int i)
{
    uint16_t h;
    memcpy(&h, row + 2 * i, 2);
    uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, 4);
    return gemm_bf16_emu_flush(x);
}

static void gemm_bf16_emu_dpbf16ps(int d, int a, int b)
{
    struct gemm_bf16_emu* e = &gemm_bf16_emu;
    e->count[GEMM_BF16_EMU_TDPBF16PS]++;
    if (d == a || d == b || a == b) {
        gemm_bf16_emu_fault("tdpbf16ps", d, "#UD: dst, src1 and src2 must be three different tiles");
        return;
    }
    if (!gemm_bf16_emu_usable("tdpbf16ps", d) || !gemm_bf16_emu_usable("tdpbf16ps", a)
        || !gemm_bf16_emu_usable("tdpbf16ps", b))
        return;
    int M = e->rows[d], N = e->colsb[d] / 4, K = e->rows[b];
    if (e->rows[a] != M) {
        gemm_bf16_emu_fault("tdpbf16ps", a, "#UD: src1 rows != dst rows (m)");
        return;
    }
    if (e->colsb[a] / 4 != K) {
        gemm_bf16_emu_fault("tdpbf16ps", a, "#UD: src1 colsb / 4 != src2 rows (k)");
        return;
    }
    if (e->colsb[b] != e->colsb[d]) {
        gemm_bf16_emu_fault("tdpbf16ps", b, "#UD: src2 colsb != dst colsb (n)");
        return;
    }
#if defined(__x86_64__)
    unsigned int csr = _mm_getcsr();
    _mm_setcsr(0x9fc0u);  /* all exceptions masked, RNE, FTZ, DAZ */
#endif
    for (int m = 0; m < M; m++) {
        float acc[16];
        const uint8_t* ar = e->tile[a][m];
        memcpy(acc, e->tile[d][m], sizeof acc);
        for (int n = 0; n < N; n++)
            acc[n] = gemm_bf16_emu_flush(acc[n]);
#if FEMTOGPT_AMX_EMULATE_ORDER == 0
        float even[16] = {0}, odd[16] = {0};
        for (int k = 0; k < K; k++) {
            const uint8_t* br = e->tile[b][k];
            float a0 = gemm_bf16_emu_bf16(ar, 2 * k), a1 = gemm_bf16_emu_bf16(ar, 2 * k + 1);
            for (int n = 0; n < N; n++) {
                even[n] = gemm_bf16_emu_flush(fmaf(a0, gemm_bf16_emu_bf16(br, 2 * n), even[n]));
                odd[n] = gemm_bf16_emu_flush(fmaf(a1, gemm_bf16_emu_bf16(br, 2 * n + 1), odd[n]));
            }
        }
        for (int n = 0; n < N; n++)
            acc[n] = gemm_bf16_emu_flush(acc[n] + gemm_bf16_emu_flush(even[n] + odd[n]));
#else
        for (int k = 0; k < K; k++) {
            const uint8_t* br = e->tile[b][k];
            float a0 = gemm_bf16_emu_bf16(ar, 2 * k), a1 = gemm_bf16_emu_bf16(ar, 2 * k + 1);
            for (int n = 0; n < N; n++) {
                acc[n] = gemm_bf16_emu_flush(fmaf(a0, gemm_bf16_emu_bf16(br, 2 * n), acc[n]));
                acc[n] = gemm_bf16_emu_flush(fmaf(a1, gemm_bf16_emu_bf16(br, 2 * n + 1), acc[n]));
            }
        }
#endif
        /* write_row_and_zero: n fp32, then zeros to the end of the row */
        memset(e->tile[d][m], 0, GEMM_BF16_EMU_COLSB);
        memcpy(e->tile[d][m], acc, (size_t)N * 4);
    }
    for (int m = M; m < GEMM_BF16_EMU_ROWS; m++)  /* zero_upper_rows */
        memset(e->tile[d][m], 0, GEMM_BF16_EMU_COLSB);
    e->start_row = 0;
#if defined(__x86_64__)
    _mm_setcsr(csr);
#endif
}

/* The intrinsics, redirected. The tile numbers stay arguments (immediates on
 * the hardware), checked at run time. */
#undef _tile_loadconfig
#undef _tile_zero
#undef _tile_loadd
#undef _tile_dpbf16ps
#undef _tile_stored
#undef _tile_release
#define _tile_loadconfig(config) gemm_bf16_emu_loadconfig(config)
#define _tile_zero(t) gemm_bf16_emu_zero(t)
#define _tile_loadd(t, base, stride) gemm_bf16_emu_loadd((t), (base), (ptrdiff_t)(stride))
#define _tile_dpbf16ps(d, a, b) gemm_bf16_emu_dpbf16ps((d), (a), (b))
#define _tile_stored(t, base, stride) gemm_bf16_emu_stored((t), (base), (ptrdiff_t)(stride))
#define _tile_release() gemm_bf16_emu_release()

/* Plain C for the build's -march: no amx-* or avx512* target features. */
#define GEMM_BF16_AMX_TARGET

#endif /* FEMTOGPT_GEMM_BF16_AMX_EMULATE_H */
