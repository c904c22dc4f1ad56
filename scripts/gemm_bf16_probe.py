"""Test and time femtogpt/kernels/gemm_bf16.h on its own, before the core uses it.

    python scripts/gemm_bf16_probe.py            # checks, then timings (about a minute)
    python scripts/gemm_bf16_probe.py --check    # checks only
    python scripts/gemm_bf16_probe.py --time     # timings only
    python scripts/gemm_bf16_probe.py --time --reps 7 --shapes fwd

It compiles the header into a small shared library with gcc (flags as
setup.py gives the core, once per x86-64 level), calls it through ctypes on
numpy arrays, and
  - checks every path this CPU runs against numpy: the bf16 rounding bit for
    bit; each product against the contract's summation order emulated in
    numpy float32 (bit for bit), and against float64 on the bf16 inputs
    (within a float32 summation bound), for NN/NT/TN, odd sizes, strides,
    alpha and beta;
  - checks the AMX path on any x86-64 over emulated tiles (the test-only
    "amx-emulated" builds, gemm_bf16_amx_emulate.h): the same products plus
    tile-sized shapes, bit for bit against a numpy model of the emulated
    order, and against the other paths within float32 summation error
    (on real AMX hardware: the bound and that agreement, no bits);
  - times, on one thread, the GPT-2 124M products at B*T = 4*256 rows
    against scipy's float32 sgemm (OpenBLAS, the core's fp32 front) and
    against the CPU's bf16 roof, medians of --reps runs.
tests/test_gemm_bf16.py imports this file for the same checks under pytest.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import cpu_name, median_time  # noqa: E402
from gemm_bf16_lib import (AMX, AVX512BF16, EMU_LDTILECFG, EMU_TDPBF16PS, EMU_TILELOADD,  # noqa: E402,F401 (the tests use them through this module)
                           EMU_TILERELEASE, EMU_TILESTORED, EMU_TILEZERO, EMULATED, F32P, LEVELS,
                           PATH_NAMES, PORTABLE, U16P, bf16_round_ref, bf16_value, build, find_cc,
                           operands, reference_f64, reference_order, run)

# ---------------------------------------------------------------------------
# Checks (each raises AssertionError with what differs)
# ---------------------------------------------------------------------------

SPECIAL = np.array([
    0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, -np.nan,
    1.0 + 2.0 ** -8,                  # a tie below: rounds down to the even 1.0
    1.0 + 3 * 2.0 ** -8,              # a tie above an odd kept half: rounds up to 1 + 2^-6
    1.0 + 2.0 ** -8 + 2.0 ** -23,     # just above a tie: rounds up
    np.finfo(np.float32).max,         # rounds up to inf
    np.finfo(np.float32).tiny,        # smallest normal
    2.0 ** -149, 2.0 ** -130,         # denormals (kept by the rounding)
    np.float32(0x007FFFFF * 2.0 ** -149),  # largest denormal: rounds up to the smallest normal
    3.0e38, -2.5, 65504.0, 1e-20,
], np.float32)
SPECIAL_BITS = np.array([0x7F800001, 0xFF800001, 0x7FBFFFFF, 0x7FFFFFFF, 0xFFFFFFFF,
                         0x7F7F8000, 0x3F808000, 0x3F818000, 0x00008000, 0x80018000],
                        np.uint32).view(np.float32)


def check_rounding(lib):
    """bf16_from_f32 against the numpy RNE on special values and 2^20 random bit patterns."""
    rng = np.random.default_rng(0)
    x = np.concatenate([SPECIAL, SPECIAL_BITS,
                        rng.integers(0, 2 ** 32, 1 << 20, dtype=np.uint64).astype(np.uint32).view(np.float32)])
    got, want = lib.from_f32(x), bf16_round_ref(x)
    bad = np.nonzero(got != want)[0]
    assert bad.size == 0, (f"{bad.size} roundings differ, first: {x.view(np.uint32)[bad[0]]:#010x} "
                           f"-> {got[bad[0]]:#06x}, want {want[bad[0]]:#06x}")
    nan = np.isnan(x)
    assert np.isnan(lib.to_f32(got)[nan]).all(), "a NaN rounded to a non-NaN"
    back = lib.to_f32(got)
    assert (back.view(np.uint32) == got.astype(np.uint32) << 16).all(), "bf16_to_f32 is not the top half"
    # the values a wrong rounding (truncation, ties away) would get wrong
    r = lib.to_f32(lib.from_f32(np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8)], np.float32)))
    assert list(r) == [1.0, 1 + 2 ** -6, -1.0], r
    return x.size


def path_order(lib, path):
    """The summation order a path's results follow bit for bit (reference_order's
    name), or None where it is not known: AMX on real hardware."""
    return lib.amx_order if path == AMX else "contract"


def amx_counts(M, N, K):
    """Tile instructions one AMX product runs: per 32 x 32 of C (ceil(M/32) of
    them down, since MC blocks are multiples of 32, by ceil(N/32) across) one
    config, 4 tilezero, per 32 of Kp 4 tileloadd and 4 tdpbf16ps, 4 stores, 1 release."""
    tiles, ksteps = -(-M // 32) * -(-N // 32), -(-K // 32)
    return {EMU_LDTILECFG: tiles, EMU_TILEZERO: 4 * tiles, EMU_TILELOADD: 4 * ksteps * tiles,
            EMU_TDPBF16PS: 4 * ksteps * tiles, EMU_TILESTORED: 4 * tiles, EMU_TILERELEASE: tiles}


def check_product(lib, ta, tb, M, N, K, alpha=1.0, beta=0.0, pad=0, packed=False, seed=0,
                  exact=None, order="contract"):
    """One product against float64 (bound) and, where alpha is a power of two,
    `order` (reference_order's; None: no bit check) in float32 bit for bit. C
    starts as NaN when beta == 0 (BLAS does not read it then) and has a padded
    stride. On an emulated AMX build running the AMX path, also the number of
    each tile instruction (amx_counts)."""
    rng = np.random.default_rng(seed)
    A, B = operands(rng, ta, tb, M, N, K, pad)
    ldc = N + pad + 3
    C0 = rng.standard_normal((M, ldc)).astype(np.float32)
    if beta == 0:
        C0[:, :N] = np.nan
    C = C0.copy()
    run(lib, ta, tb, M, N, K, alpha, A, B, beta, C, packed=packed, ldc=ldc)
    where = f"{'NT'[ta]}{'NT'[tb]} M={M} N={N} K={K} alpha={alpha} beta={beta} pad={pad} packed={packed}"
    assert np.array_equal(C[:, N:], C0[:, N:]), f"{where}: wrote past N (into ldc padding)"
    got = C[:, :N]
    assert np.isfinite(got).all(), f"{where}: non-finite output"
    ref, tol = reference_f64(ta, tb, M, N, K, alpha, A, B, beta, C0)
    err = np.abs(got - ref)
    assert (err <= tol).all(), f"{where}: max error {err.max():.3g}, bound {tol.ravel()[err.argmax()]:.3g}"
    if lib.emulated and lib.so.probe_path() == AMX:
        counts = {k: lib.emu_count(k) for k in amx_counts(M, N, K)}
        assert counts == amx_counts(M, N, K), f"{where}: tile instructions {counts}, want {amx_counts(M, N, K)}"
    if exact is None:
        exact = alpha != 0 and np.log2(abs(alpha)) == int(np.log2(abs(alpha))) and M * N * K <= 2 ** 27
    if exact and order is not None:
        want = reference_order(ta, tb, M, N, K, alpha, A, B, beta, C0, order=order)
        diff = np.nonzero(got.view(np.uint32) != want.view(np.uint32))
        assert diff[0].size == 0, (f"{where}: {diff[0].size} elements differ from the {order} order, "
                                   f"first {got[diff[0][0], diff[1][0]]!r} vs {want[diff[0][0], diff[1][0]]!r}")
    return float(err.max())


SIZES = [(1, 1, 1), (7, 33, 65), (33, 7, 127), (65, 127, 33), (127, 65, 7), (1, 768, 65),
         (13, 31, 768), (25, 97, 3072), (96, 64, 2), (12, 32, 32), (97, 33, 129)]


def check_path(lib, path, quick=False):
    """All checks for one path; returns how many products were checked. Bit
    for bit against path_order(lib, path): the contract's order, or for AMX
    the emulated one (real AMX hardware: the float64 bound only)."""
    lib.force(path)
    order = path_order(lib, path)
    n = 0
    try:
        for ta, tb in [(0, 1), (0, 0), (1, 0), (1, 1)]:
            for i, (M, N, K) in enumerate(SIZES[:5] if quick else SIZES):
                for packed in (False, True):
                    check_product(lib, ta, tb, M, N, K, pad=i % 3 * 5, packed=packed, seed=i, order=order)
                    n += 1
            check_product(lib, ta, tb, 37, 45, 51, alpha=-0.5, beta=1.0, pad=3, seed=7, order=order)
            check_product(lib, ta, tb, 37, 45, 51, alpha=2.0, beta=-0.75, seed=8, order=order)
            check_product(lib, ta, tb, 37, 45, 51, alpha=0.7, beta=0.3, seed=9, order=order)
            n += 3
        if not quick:
            # the big GPT-2 shapes, sliced: K of 768 and 3072 in full
            check_product(lib, 0, 1, 100, 70, 3072, seed=11, order=order)
            check_product(lib, 0, 0, 70, 100, 768, beta=1.0, seed=12, order=order)
            check_product(lib, 1, 0, 130, 40, 1024, beta=1.0, seed=13, order=order)
            n += 3
    finally:
        lib.force(0)
    return n


# Shapes around the AMX kernel's own sizes: a tile is 16 rows x 32 k (A), 32
# k x 16 columns (B); a step of C is 32 x 32 (2 x 2 tiles); K is padded to
# 32; MC blocks of A are 288 rows for K = 768 and 96 for K = 3072.
TILE_SIZES = [(16, 16, 32), (32, 32, 32), (17, 15, 31), (15, 17, 33), (31, 33, 63), (33, 31, 64),
              (1, 32, 65), (32, 1, 96), (48, 48, 2), (64, 64, 100), (65, 63, 127), (3, 100, 320),
              (100, 3, 33), (97, 129, 64), (400, 40, 768), (200, 33, 3072)]
ALPHA_BETA = [(1.0, 0.0), (-0.5, 1.0), (2.0, -0.75), (0.7, 0.3), (0.25, 0.0)]


def check_tile_shapes(lib, path):
    """TILE_SIZES in all four trans combinations, alpha/beta, pre-packed B or
    not and padded strides taking turns; returns how many products."""
    lib.force(path)
    order = path_order(lib, path)
    n = 0
    try:
        for i, (M, N, K) in enumerate(TILE_SIZES):
            for t, (ta, tb) in enumerate([(0, 1), (0, 0), (1, 0), (1, 1)]):
                alpha, beta = ALPHA_BETA[(i + t) % len(ALPHA_BETA)]
                check_product(lib, ta, tb, M, N, K, alpha=alpha, beta=beta, pad=(i + t) % 3 * 5,
                              packed=bool((i + t) % 2), seed=100 + 4 * i + t, order=order)
                n += 1
    finally:
        lib.force(0)
    return n


def check_amx_agrees(lib, others, seed=4):
    """The AMX path against each of `others` on the same operands: within float32
    summation error (twice the float64 bound, which each is within), not bit
    for bit (the contract's own words for AMX). Returns, per other path, the
    fraction of elements whose bits differ."""
    shapes = [(0, 1, 61, 77, 3072), (0, 0, 50, 90, 333), (1, 0, 45, 64, 1024), (1, 1, 33, 17, 31),
              (0, 1, 400, 40, 768)]
    differ = {p: [0, 0] for p in others}
    for ta, tb, M, N, K in shapes:
        r = np.random.default_rng(seed + M)
        A, B = operands(r, ta, tb, M, N, K)
        C0 = r.standard_normal((M, N)).astype(np.float32)
        out = {}
        for path in [AMX, *others]:
            lib.force(path)
            try:
                out[path] = run(lib, ta, tb, M, N, K, 0.37, A, B, 1.25, C0.copy())
            finally:
                lib.force(0)
        ref, tol = reference_f64(ta, tb, M, N, K, 0.37, A, B, 1.25, C0)
        for p in others:
            d = np.abs(out[AMX] - out[p])
            where = f"{'NT'[ta]}{'NT'[tb]} M={M} N={N} K={K}"
            assert (d <= 2 * tol).all(), (f"{where}: AMX and {PATH_NAMES[p]} differ by {d.max():.3g}, "
                                          f"more than float32 summation error {2 * tol.ravel()[d.argmax()]:.3g}")
            differ[p][0] += int((out[AMX].view(np.uint32) != out[p].view(np.uint32)).sum())
            differ[p][1] += d.size
    return {p: a / b for p, (a, b) in differ.items()}


def check_same_bits(lib, paths, seed=3):
    """Every path that this build runs gives the same bits (AMX excepted: own order)."""
    outs = {}
    for path in paths:
        lib.force(path)
        try:
            res = []
            for ta, tb, M, N, K in [(0, 1, 61, 77, 3072), (0, 0, 50, 90, 333), (1, 0, 45, 64, 1024)]:
                r = np.random.default_rng(seed + M)
                A, B = operands(r, ta, tb, M, N, K)
                C = r.standard_normal((M, N)).astype(np.float32)
                res.append(run(lib, ta, tb, M, N, K, 0.37, A, B, 1.25, C))
            outs[path] = res
        finally:
            lib.force(0)
    base = outs[paths[0]]
    for path in paths[1:]:
        for x, y in zip(base, outs[path]):
            assert np.array_equal(x.view(np.uint32), y.view(np.uint32)), \
                f"{PATH_NAMES[path]} differs from {PATH_NAMES[paths[0]]} in bits"


def check_edges(lib, path):
    """NaN/inf propagate, inputs are rounded (ties included), denormals read as zero,
    alpha == 0 reads neither A nor B, MXCSR is restored."""
    lib.force(path)
    try:
        csr = lib.so.probe_mxcsr()
        M, N, K = 5, 40, 9
        A = np.full((M, K), 1 + 2 ** -8, np.float32)          # tie: bf16 1.0
        B = np.full((K, N), 1 + 2 ** -8 + 2 ** -20, np.float32)  # above tie: bf16 1 + 2^-7
        C = np.full((M, N), np.nan, np.float32)
        run(lib, 0, 0, M, N, K, 1.0, A, B, 0.0, C)
        assert (C == K * (1 + 2 ** -7)).all(), f"inputs not rounded to bf16: {C[0, 0]!r}"
        assert lib.so.probe_mxcsr() == csr, "MXCSR not restored"
        # NaN in A row 2 and inf in B column 3 reach exactly their row and column
        A = np.ones((M, K), np.float32)
        B = np.ones((K, N), np.float32)
        A[2, 4] = np.nan
        B[6, 3] = np.inf
        C = np.zeros((M, N), np.float32)
        run(lib, 0, 0, M, N, K, 1.0, A, B, 0.0, C, packed=True)
        assert np.isnan(C[2]).all() and np.isinf(np.delete(C[:, 3], 2)).all()
        mask = np.ones((M, N), bool)
        mask[2] = False
        mask[:, 3] = False
        assert (C[mask] == K).all()
        # denormal inputs count as zero: 2^-130 * 2^100 would be 2^-30 otherwise
        A = np.full((M, K), 2.0 ** -130, np.float32)
        B = np.full((K, N), 2.0 ** 100, np.float32)
        C = np.ones((M, N), np.float32)
        run(lib, 0, 0, M, N, K, 1.0, A, B, 0.0, C)
        assert (C == 0).all(), f"bf16 denormal not read as zero: {C[0, 0]!r}"
        # alpha == 0: C = beta C, A and B not read (NaN there would show)
        A[:] = np.nan
        C = np.full((M, N), 3.0, np.float32)
        run(lib, 0, 0, M, N, K, 0.0, A, B, 0.5, C)
        assert (C == 1.5).all()
        run(lib, 0, 0, M, N, K, 0.0, A, B, 0.0, C)
        assert (C == 0).all()
        # beta != 0 reads C: a NaN there stays
        A[:] = 1
        C = np.zeros((M, N), np.float32)
        C[1, 1] = np.nan
        run(lib, 0, 0, M, N, K, 1.0, A, np.ones_like(B), 1.0, C)
        assert np.isnan(C[1, 1]) and (np.delete(C.ravel(), N + 1) == K).all()
    finally:
        lib.force(0)


def runnable_paths(lib):
    return [p for p in (PORTABLE, AVX512BF16, AMX) if lib.available(p)]


def check_emulated_dp(lib, seed=6):
    """One emulated tdpbf16ps at a time, on tiles of several shapes with padded
    strides, against numpy's float32 in the build's order bit for bit: rows,
    colsb and strides honoured (memory past them neither read into the sum
    nor written), bf16 denormals read as zero, denormal results flushed."""
    rng = np.random.default_rng(seed)
    for m, k, n in [(16, 16, 16), (5, 3, 7), (1, 1, 1), (16, 1, 16), (9, 16, 2)]:
        pad = 3  # elements of padding after each row, NaN: a read past colsb would show
        A = np.full((16, 2 * k + pad), 0x7FC0, np.uint16)
        B = np.full((16, 2 * n + pad), 0x7FC0, np.uint16)
        A[:m, :2 * k] = bf16_round_ref(rng.standard_normal((m, 2 * k)))
        B[:k, :2 * n] = bf16_round_ref(rng.standard_normal((k, 2 * n)))
        A[0, 0] = 0x0001  # a bf16 denormal (2^-133): read as +0
        B[0, 1] = 0x8040  # -denormal: read as -0
        C = np.full((16, n + pad), np.nan, np.float32)
        C[:m, :n] = rng.standard_normal((m, n)).astype(np.float32)
        C[m - 1, n - 1] = np.float32(2.0 ** -140)  # a denormal accumulator: read as zero
        C0 = C.copy()
        lib.so.probe_emu_reset()
        lib.so.probe_emu_dp(m, k, n, C.ctypes.data_as(F32P), C.strides[0], A.ctypes.data_as(U16P), A.strides[0],
                            B.ctypes.data_as(U16P), B.strides[0])
        lib.emu_check()
        assert np.array_equal(C[:, n:], C0[:, n:], equal_nan=True) and np.array_equal(C[m:], C0[m:], equal_nan=True), \
            f"m={m} k={k} n={n}: tilestored wrote outside rows x colsb"
        a = bf16_value((A[:m, :2 * k].astype(np.uint32) << 16).view(np.float32))
        b = bf16_value((B[:k, :2 * n].astype(np.uint32) << 16).view(np.float32))
        acc = C0[:m, :n].copy()
        acc[m - 1, n - 1] = 0
        if lib.amx_order == "amx-sdm":
            even = np.zeros((m, n), np.float32)
            odd = np.zeros((m, n), np.float32)
            for p in range(k):
                even = even + np.outer(a[:, 2 * p], b[p, 0::2])
                odd = odd + np.outer(a[:, 2 * p + 1], b[p, 1::2])
            acc = acc + (even + odd)
        else:
            for p in range(k):
                acc = acc + np.outer(a[:, 2 * p], b[p, 0::2])
                acc = acc + np.outer(a[:, 2 * p + 1], b[p, 1::2])
        got = C[:m, :n]
        assert np.array_equal(got.view(np.uint32), acc.view(np.uint32)), \
            f"m={m} k={k} n={n}: tdpbf16ps differs from the {lib.amx_order} order"
    # FTZ: a product of 2^-70 * 2^-70 = 2^-140 is a denormal result, flushed to +0
    A = np.zeros((1, 2), np.uint16)
    B = np.zeros((1, 2), np.uint16)
    A[0, 0] = B[0, 0] = bf16_round_ref(np.array([2.0 ** -70], np.float32))[0]
    C = np.zeros((1, 1), np.float32)
    lib.so.probe_emu_reset()
    lib.so.probe_emu_dp(1, 1, 1, C.ctypes.data_as(F32P), 4, A.ctypes.data_as(U16P), 4, B.ctypes.data_as(U16P), 4)
    lib.emu_check()
    assert C[0, 0] == 0 and not np.signbit(C[0, 0]), f"denormal result not flushed: {C[0, 0]!r}"


# What each misuse (probe_emu_misuse in gemm_bf16_lib.py) must report.
EMU_MISUSES = {1: "not configured", 2: "not configured", 3: "leaves this tile unconfigured",
               4: "src1 colsb / 4 != src2 rows", 5: "src2 colsb != dst colsb", 6: "src1 rows != dst rows",
               7: "three different tiles", 8: "more than 16 rows", 9: "64 bytes a row",
               10: "both zero or both set", 11: "reserved byte", 12: "reserved byte", 13: "palette",
               14: "no such tile", 15: "multiple of 4", 16: "start_row"}


def check_emulator_faults(lib):
    """Each misuse the hardware faults on is counted (the instruction has no effect), the correct use is not."""
    assert lib.so.probe_emu_misuses() == len(EMU_MISUSES) + 1
    assert lib.so.probe_emu_misuse(0) == 0, lib.so.probe_emu_fault().decode()
    for which, what in EMU_MISUSES.items():
        assert lib.so.probe_emu_misuse(which) == 1, f"misuse {which} ({what}) not caught"
        msg = lib.so.probe_emu_fault().decode()
        assert what in msg, f"misuse {which}: {msg!r}, want {what!r}"
    lib.so.probe_emu_reset()


def run_checks(libs, out=print):
    for lib in libs:
        n = check_rounding(lib)
        out(f"[{lib.name}] rounding: {n} values bit-identical to numpy RNE")
        paths = runnable_paths(lib)
        if lib.emulated:
            check_emulated_dp(lib)
            check_emulator_faults(lib)
            out(f"[{lib.name}] emulated tdpbf16ps bit-identical to the {lib.amx_order} order; misuses fault")
        for path in paths:
            t = time.perf_counter()
            n = check_path(lib, path)
            check_edges(lib, path)
            order = path_order(lib, path)
            if path == AMX:
                n += check_tile_shapes(lib, path)
            out(f"[{lib.name}] {PATH_NAMES[path]}: {n} products within the float64 bound and "
                + (f"bit-identical to the {order} order" if order else "(no known order)")
                + f"; edge cases ok ({time.perf_counter() - t:.1f} s)")
        same = [p for p in paths if p != AMX]
        if len(same) > 1:
            check_same_bits(lib, same)
            out(f"[{lib.name}] {' = '.join(PATH_NAMES[p] for p in same)}: bit-identical")
        if AMX in paths:
            frac = check_amx_agrees(lib, same)
            out(f"[{lib.name}] amx vs " + ", ".join(f"{PATH_NAMES[p]}: {100 * f:.0f}% of elements differ in bits"
                                                    for p, f in frac.items())
                + ", all within float32 summation error")
        for path in (AVX512BF16, AMX):
            if path not in paths:
                out(f"[{lib.name}] {PATH_NAMES[path]}: not run, this CPU does not have it")


# ---------------------------------------------------------------------------
# Timings
# ---------------------------------------------------------------------------

C_, N_ROWS = 768, 4 * 256
SHAPES = {  # name: (trans_a, trans_b, M, N, K)
    "fwd": [("qkv   x@W^T", 0, 1, N_ROWS, 3 * C_, C_), ("proj  x@W^T", 0, 1, N_ROWS, C_, C_),
            ("fc    x@W^T", 0, 1, N_ROWS, 4 * C_, C_), ("fcprj x@W^T", 0, 1, N_ROWS, C_, 4 * C_)],
    "dx": [("qkv   dy@W", 0, 0, N_ROWS, C_, 3 * C_), ("fc    dy@W", 0, 0, N_ROWS, C_, 4 * C_),
           ("fcprj dy@W", 0, 0, N_ROWS, 4 * C_, C_)],
    "dw": [("qkv   dy^T@x", 1, 0, 3 * C_, C_, N_ROWS), ("proj  dy^T@x", 1, 0, C_, C_, N_ROWS),
           ("fc    dy^T@x", 1, 0, 4 * C_, C_, N_ROWS), ("fcprj dy^T@x", 1, 0, C_, 4 * C_, N_ROWS)],
}


def clock_ghz(lib, n=10_000_000):
    """Median over 5 runs of a chain of dependent adds (1 cycle each): the clock
    this core runs at under load, turbo included, which cpuinfo's MHz is not.
    It moves (a shared VM: 2.5-3.6 GHz seen here), so it is taken per shape."""
    lib.so.probe_clock_chain(n)  # wake the core up
    return float(np.median([4 * n / lib.so.probe_clock_chain(n) / 1e9 for _ in range(5)]))


def run_timings(lib, groups, reps, portable, out=print):
    from scipy.linalg import blas
    from threadpoolctl import threadpool_limits

    ghz = clock_ghz(lib)
    peak_t = lib.so.probe_peak_dpbf16(10_000_000) if lib.available(AVX512BF16) else -1
    out(f"CPU: {cpu_name()}; one thread; build -march={lib.level}")
    out(f"clock {ghz:.2f} GHz now (median of 5 chains of dependent adds, taken again per shape); "
        f"bf16 roof = 64 FLOP/cycle (one zmm vdpbf16ps per cycle) x clock = {64 * ghz:.0f} GFLOP/s; "
        f"fp32 FMA roof = 32 FLOP/cycle x clock = {32 * ghz:.0f} GFLOP/s")
    if peak_t > 0:
        out(f"measured vdpbf16ps peak (24 register chains): {10_000_000 * 24 * 64 / peak_t / 1e9:.0f} GFLOP/s")
    out(f"GFLOP/s, median of {reps}. bf16 = gemm_bf16 (packs A and B each call), "
        f"bf16 pk = gemm_bf16_packed (B packed beforehand, as the core will do for weights); "
        f"x sgemm = bf16 / sgemm; % roof = bf16 pk / (64 FLOP x the shape's GHz)")
    hdr = f"{'shape':14s} {'M':>5s} {'N':>5s} {'K':>5s} {'sgemm':>7s} {'bf16':>7s} {'bf16 pk':>7s} {'x sgemm':>7s} {'GHz':>5s} {'% roof':>6s}"
    if portable:
        hdr += f" {'portable':>8s}"
    out(hdr)
    rng = np.random.default_rng(0)
    rows = []
    with threadpool_limits(limits=1, user_api="blas"):
        for g in groups:
            for name, ta, tb, M, N, K in SHAPES[g]:
                A, B = operands(rng, ta, tb, M, N, K)
                C = np.zeros((M, N), np.float32)
                flop = 2.0 * M * N * K
                ghz = clock_ghz(lib, 2_000_000)
                Ct = np.zeros((N, M), np.float32, order="F")
                # row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T
                t_s = median_time(lambda: blas.sgemm(1.0, B.T, A.T, beta=0.0, c=Ct, trans_a=tb,
                                                     trans_b=ta, overwrite_c=1), reps)
                res = [flop / t_s / 1e9]
                lib.force(AVX512BF16 if lib.available(AVX512BF16) else PORTABLE)
                res.append(flop / median_time(lambda: lib.gemm(ta, tb, M, N, K, 1.0, A, B, 0.0, C), reps) / 1e9)
                Bp = lib.pack_b(B, tb, N, K)
                res.append(flop / median_time(lambda: lib.gemm_packed(ta, M, N, K, 1.0, A, Bp, 0.0, C), reps) / 1e9)
                line = (f"{name:14s} {M:5d} {N:5d} {K:5d} {res[0]:7.1f} {res[1]:7.1f} {res[2]:7.1f} "
                        f"{res[1] / res[0]:7.2f} {ghz:5.2f} {100 * res[2] / (64 * ghz):6.0f}")
                if portable:
                    lib.force(PORTABLE)
                    res.append(flop / median_time(lambda: lib.gemm(ta, tb, M, N, K, 1.0, A, B, 0.0, C), 1) / 1e9)
                    line += f" {res[3]:8.1f}"
                lib.force(0)
                out(line)
                rows.append((name, M, N, K, ghz, *res))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="run the checks only")
    ap.add_argument("--time", action="store_true", help="run the timings only")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--shapes", default="fwd,dx,dw", help="comma list of: fwd, dx, dw")
    ap.add_argument("--portable", action="store_true", help="also time the portable path (slow)")
    ap.add_argument("--level", default="x86-64-v4", help="-march of the timed build (the core's v4 build runs on this CPU)")
    args = ap.parse_args(argv)
    both = not args.check and not args.time
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        if args.check or both:
            run_checks([build(tmp, level) for level in LEVELS]
                       + [build(tmp, LEVELS[0], variant=v) for v in EMULATED])
        if args.time or both:
            level = args.level if LEVELS != [None] else None
            run_timings(build(tmp, level), args.shapes.split(","), args.reps, args.portable)
    return 0


if __name__ == "__main__":
    sys.exit(main())
