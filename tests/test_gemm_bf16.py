"""The bf16 GEMM kernels (femtogpt/kernels/gemm_bf16.h), built alone with gcc.

The header is compiled as setup.py compiles the core, at each x86-64 level
it builds (x86-64, -v3, -v4), by scripts/gemm_bf16_probe.py (whose checks these
tests run). The portable path runs everywhere; the AVX512_BF16 path where the
CPU has it; AMX on real tiles only where the CPU has them (none of the
machines that ran these tests so far has AMX, so those tests skip).

The AMX path's code also runs on every x86-64 CPU over emulated tiles: the
test-only "amx-emulated" builds (-DFEMTOGPT_AMX_EMULATE, gemm_bf16_amx_emulate.h,
in the SDM's summation order and, -guide, the Intrinsics Guide's), which the
tests named test_emulated_* use. That checks the kernel's logic and data
flow, not the hardware (see gemm_bf16_amx.h).
"""
import importlib.util
import os

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location(
    "gemm_bf16_probe", os.path.join(HERE, "..", "scripts", "gemm_bf16_probe.py"))
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)

PATHS = [probe.PORTABLE, probe.AVX512BF16, probe.AMX]


@pytest.fixture(scope="module", params=probe.LEVELS, ids=lambda lv: lv or "plain")
def lib(request, tmp_path_factory):
    if probe.find_cc() is None:
        pytest.skip("no C compiler (gcc or cc) to build gemm_bf16.h")
    lib = probe.build(str(tmp_path_factory.mktemp("gemm_bf16")), request.param)
    yield lib
    lib.force(0)


def runs(lib, path):
    if not lib.available(path):
        pytest.skip(f"this CPU does not run the {probe.PATH_NAMES[path]} path")


def test_rounding_is_round_to_nearest_even(lib):
    # ties, NaN (signalling ones too), inf, FLT_MAX rounding to inf, denormals, -0,
    # and 2^20 random bit patterns, against numpy's RNE bit for bit
    probe.check_rounding(lib)
    x = np.array([-0.0, 2.0 ** -149, np.finfo(np.float32).max, np.nan], np.float32)
    h = lib.from_f32(x)
    assert list(h) == [0x8000, 0x0000, 0x7F80, 0x7FC0]


@pytest.mark.parametrize("path", PATHS, ids=lambda p: probe.PATH_NAMES[p])
def test_products_match_float64_and_the_contract_order(lib, path):
    # NN, NT, TN (and TT), odd sizes 1..3072, padded lda/ldb/ldc, alpha/beta,
    # B packed per call and pre-packed: within the float64 bound, and bit for
    # bit the float32 order the header's contract states (AMX on real tiles:
    # the bound only, tdpbf16ps sums in its own order)
    runs(lib, path)
    assert probe.check_path(lib, path) > 100


@pytest.mark.parametrize("path", PATHS, ids=lambda p: probe.PATH_NAMES[p])
def test_edge_cases(lib, path):
    # inputs rounded (a tie and just above a tie), NaN and inf reach exactly
    # their row and column, bf16 denormals count as zero, alpha == 0 reads
    # neither A nor B, beta == 0 ignores NaN in C, beta != 0 keeps it, MXCSR
    # is restored
    runs(lib, path)
    probe.check_edges(lib, path)


def test_portable_and_avx512bf16_give_the_same_bits(lib):
    runs(lib, probe.AVX512BF16)
    probe.check_same_bits(lib, [probe.PORTABLE, probe.AVX512BF16])


def test_the_float64_bound_rejects_unrounded_inputs(lib):
    # The bound of check_product is tight enough to see a kernel that skipped
    # the bf16 rounding: float32 products of the raw inputs fall outside it.
    rng = np.random.default_rng(5)
    M, N, K = 33, 65, 127
    A, B = probe.operands(rng, 0, 1, M, N, K)
    ref, tol = probe.reference_f64(0, 1, M, N, K, 1.0, A, B, 0.0, None)
    unrounded = A.astype(np.float64) @ B.T.astype(np.float64)
    assert (np.abs(unrounded - ref) > tol).mean() > 0.5


def test_packed_b_has_the_documented_layout(lib):
    # packed[j*Kp*32 + p*64 + 2n + i] = bf16(op(B)[2p+i][32j+n]), zeros past N and K,
    # bf16 denormals as zeros of their sign
    rng = np.random.default_rng(1)
    N, K = 45, 37
    Kp = 64
    for trans_b in (0, 1):
        B = rng.standard_normal((N, K) if trans_b else (K, N)).astype(np.float32)
        B[1, 2] = 2.0 ** -130  # a denormal: packed as zero (the bf16 units read it so)
        B[2, 1] = -(2.0 ** -140)  # packed as -0
        opb = B.T if trans_b else B
        packed = lib.pack_b(B, trans_b, N, K)
        assert packed.size == 64 * Kp
        want = np.zeros((2, Kp // 2, 32, 2), np.uint16)  # panel, pair, column, k in pair
        full = np.zeros((Kp, 64), np.float32)
        full[:K, :N] = opb
        bits = probe.bf16_value(full).view(np.uint32) >> 16
        for j in range(2):
            for i in range(2):
                want[j, :, :, i] = bits[i::2, 32 * j:32 * j + 32]
        assert np.array_equal(packed, want.ravel())
        # a column range packed on its own lands at packed + n0 * Kp
        part = lib.pack_b(np.ascontiguousarray(B[32:] if trans_b else B[:, 32:]), trans_b, N - 32, K)
        assert np.array_equal(part, packed[32 * Kp:])


def gemm_in_guarded_scratch(lib, ta, tb, M, N, K, A, B, b_packed):
    """(C, guard): C = op(A) @ op(B) through lib's gemm (B packed first when
    b_packed) with exactly the scratch it asks for, unaligned on purpose (the
    header aligns inside), followed by 4 KB of 0xA5 that must come back as is."""
    size = lib.so.probe_scratch_size(M, N, K, int(b_packed))
    buf = np.full(size + 4096, 0xA5, np.uint8)  # the scratch, then a guard
    C = np.zeros((M, N), np.float32)
    ptr = buf.ctypes.data + 1
    if b_packed:
        Bp = lib.pack_b(B, tb, N, K)
        lib.so.probe_gemm_packed(ta, M, N, K, 1.0, A.ctypes.data_as(probe.F32P), A.shape[1],
                                 Bp.ctypes.data_as(probe.U16P), 0.0,
                                 C.ctypes.data_as(probe.F32P), N, ptr)
    else:
        lib.so.probe_gemm(ta, tb, M, N, K, 1.0, A.ctypes.data_as(probe.F32P), A.shape[1],
                          B.ctypes.data_as(probe.F32P), B.shape[1], 0.0,
                          C.ctypes.data_as(probe.F32P), N, ptr)
    return C, buf[size + 1:]


@pytest.mark.parametrize("b_packed", [False, True])
def test_kernels_stay_inside_the_scratch_they_asked_for(lib, b_packed):
    path = probe.AVX512BF16 if lib.available(probe.AVX512BF16) else probe.PORTABLE
    lib.force(path)
    try:
        rng = np.random.default_rng(2)
        for ta, tb, M, N, K in [(0, 1, 97, 70, 3072), (1, 0, 400, 33, 65), (0, 0, 5, 3, 1)]:
            A, B = probe.operands(rng, ta, tb, M, N, K)
            C, guard = gemm_in_guarded_scratch(lib, ta, tb, M, N, K, A, B, b_packed)
            assert (guard == 0xA5).all(), f"wrote past the scratch for {(ta, tb, M, N, K)}"
            ref, tol = probe.reference_f64(ta, tb, M, N, K, 1.0, A, B, 0.0, None)
            assert (np.abs(C - ref) <= tol).all()
    finally:
        lib.force(0)


def test_force_refuses_a_path_the_cpu_lacks(lib):
    assert lib.so.probe_force(7) == -1
    assert lib.so.probe_force(probe.PORTABLE) == probe.PORTABLE
    assert lib.so.probe_path() == probe.PORTABLE
    if not lib.available(probe.AMX):
        assert lib.so.probe_force(probe.AMX) == -1
        assert lib.so.probe_path() == probe.PORTABLE  # a refusal changes nothing
    auto = lib.force(0)
    best = next(p for p in (probe.AMX, probe.AVX512BF16, probe.PORTABLE) if lib.available(p))
    assert auto == best


def test_amx_tile_shapes_and_agreement_on_real_tiles(lib):
    # on a CPU with AMX: the tile-sized shapes within the float64 bound, and
    # AMX within float32 summation error of the other paths (its order is its own)
    runs(lib, probe.AMX)
    assert probe.check_tile_shapes(lib, probe.AMX) > 50
    probe.check_amx_agrees(lib, [p for p in (probe.PORTABLE, probe.AVX512BF16) if lib.available(p)])


# ---------------------------------------------------------------------------
# The AMX path over emulated tiles, on any x86-64
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module", params=probe.EMULATED or ["none"])
def emulated(request, tmp_path_factory):
    if not probe.EMULATED:
        pytest.skip("the AMX code (and so its emulation) is x86-64 only")
    if probe.find_cc() is None:
        pytest.skip("no C compiler (gcc or cc) to build gemm_bf16.h")
    lib = probe.build(str(tmp_path_factory.mktemp("gemm_bf16_emu")), probe.LEVELS[0], variant=request.param)
    yield lib
    lib.force(0)


def test_emulated_amx_is_available_and_forced(emulated):
    # the emulation build says AMX is there (no cpuid AMX bits, no arch_prctl
    # needed) and takes it by default
    assert emulated.available(probe.AMX)
    assert emulated.force(probe.AMX) == probe.AMX
    assert emulated.so.probe_path() == probe.AMX
    assert emulated.force(probe.PORTABLE) == probe.PORTABLE
    assert emulated.force(0) == probe.AMX


def test_emulated_tdpbf16ps_follows_the_documented_semantics(emulated):
    # one instruction on tiles of shapes 1x1x1 .. 16x16x16 with padded strides:
    # bit for bit the build's documented order, DAZ, FTZ, nothing read or
    # written past rows x colsb
    probe.check_emulated_dp(emulated)


def test_emulator_faults_where_the_hardware_would(emulated):
    # no config, after release, unconfigured tile, tmm8, shapes that do not
    # fit (m, k, n), one tile twice, bad configs (rows, colsb, reserved bytes,
    # palette), colsb not a multiple of 4, start_row: each counted as a fault
    probe.check_emulator_faults(emulated)


def test_emulated_amx_products(emulated):
    # the products of test_products_match_float64_and_the_contract_order on
    # the AMX path: float64 bound, bit for bit the emulated order, and the
    # count of each tile instruction (Kp in steps of 32, one config and
    # release per 32 x 32 of C); every call releases the tiles and faults nothing
    assert probe.check_path(emulated, probe.AMX) > 100


def test_emulated_amx_tile_shapes(emulated):
    # M and N below, at and above one tile (16) and one step (32), K off and on
    # multiples of 32, M past one MC block of A, NN/NT/TN/TT, alpha/beta (beta
    # == 0 with NaN in C), pre-packed B and padded strides
    assert probe.check_tile_shapes(emulated, probe.AMX) == 4 * len(probe.TILE_SIZES)


def test_emulated_amx_edge_cases(emulated):
    probe.check_edges(emulated, probe.AMX)


@pytest.mark.parametrize("other", [probe.PORTABLE, probe.AVX512BF16], ids=lambda p: probe.PATH_NAMES[p])
def test_emulated_amx_agrees_with_the_other_paths(emulated, other):
    # within float32 summation error, not bit for bit (the contract says so)
    runs(emulated, other)
    frac = probe.check_amx_agrees(emulated, [other])
    assert frac[other] > 0.1  # the orders do differ: AMX really ran its own


def test_emulated_build_keeps_the_other_paths_bit_identical(emulated):
    runs(emulated, probe.AVX512BF16)
    probe.check_same_bits(emulated, [probe.PORTABLE, probe.AVX512BF16])


@pytest.mark.parametrize("b_packed", [False, True])
def test_emulated_amx_stays_inside_the_scratch_it_asked_for(emulated, b_packed):
    emulated.force(probe.AMX)
    try:
        rng = np.random.default_rng(2)
        # M past one MC block (288 rows at K = 768), M and K off 32, tiny
        for ta, tb, M, N, K in [(0, 1, 97, 70, 3072), (1, 0, 400, 33, 65), (0, 0, 5, 3, 1),
                                (0, 1, 300, 40, 768), (1, 1, 31, 33, 33)]:
            A, B = probe.operands(rng, ta, tb, M, N, K)
            emulated.so.probe_emu_reset()
            C, guard = gemm_in_guarded_scratch(emulated, ta, tb, M, N, K, A, B, b_packed)
            emulated.emu_check()
            assert emulated.emu_count(probe.EMU_TDPBF16PS) > 0
            assert (guard == 0xA5).all(), f"wrote past the scratch for {(ta, tb, M, N, K)}"
            ref, tol = probe.reference_f64(ta, tb, M, N, K, 1.0, A, B, 0.0, None)
            assert (np.abs(C - ref) <= tol).all()
    finally:
        emulated.force(0)
