"""The bf16 GEMM kernels (femtogpt/kernels/gemm_bf16.h), built alone with gcc.

The header is compiled as setup.py compiles the core, at each x86-64 level
it builds (x86-64, -v3, -v4), by scripts/gemm_bf16_probe.py (whose checks these
tests run). The portable path runs everywhere; the AVX512_BF16 path where the
CPU has it; AMX is skipped on a CPU without it (none of the machines that ran
these tests so far has AMX: that path is untested).
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
    # bit the float32 order the header's contract states
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


@pytest.mark.parametrize("b_packed", [False, True])
def test_kernels_stay_inside_the_scratch_they_asked_for(lib, b_packed):
    path = probe.AVX512BF16 if lib.available(probe.AVX512BF16) else probe.PORTABLE
    lib.force(path)
    try:
        rng = np.random.default_rng(2)
        for ta, tb, M, N, K in [(0, 1, 97, 70, 3072), (1, 0, 400, 33, 65), (0, 0, 5, 3, 1)]:
            A, B = probe.operands(rng, ta, tb, M, N, K)
            size = lib.so.probe_scratch_size(M, N, K, int(b_packed))
            buf = np.full(size + 4096, 0xA5, np.uint8)  # the scratch, then a guard
            C = np.zeros((M, N), np.float32)
            ptr = buf.ctypes.data + 1  # unaligned on purpose: the header aligns inside
            if b_packed:
                Bp = lib.pack_b(B, tb, N, K)
                lib.so.probe_gemm_packed(ta, M, N, K, 1.0, A.ctypes.data_as(probe.F32P), A.shape[1],
                                         Bp.ctypes.data_as(probe.U16P), 0.0,
                                         C.ctypes.data_as(probe.F32P), N, ptr)
            else:
                lib.so.probe_gemm(ta, tb, M, N, K, 1.0, A.ctypes.data_as(probe.F32P), A.shape[1],
                                  B.ctypes.data_as(probe.F32P), B.shape[1], 0.0,
                                  C.ctypes.data_as(probe.F32P), N, ptr)
            assert (buf[size + 1:] == 0xA5).all(), f"wrote past the scratch for {(ta, tb, M, N, K)}"
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
