"""The bf16 product of a handful of rows (femtogpt/kernels/gemm_bf16_rows.h),
and the core's front over it, bf16_matmul_packed (kernels/gemm_bf16.pxi).

Decoding multiplies one row (or a few) by each packed weight W^T; the prompt
pass multiplies many rows through the GEMM. A token's logits must not depend
on which of the two computed them, so every element the rows kernel writes is
compared with the GEMM's bit for bit: first the header alone, built with gcc
at each x86-64 level (scripts/bf16_rows_probe.py, as tests/test_gemm_bf16.py
builds the GEMM), then the compiled core's front with and without a bias, on
each path this CPU runs, at 1 and 2 threads. AMX (whose GEMM sums in its own
order) is not compared: no machine that ran these tests has it.
"""
import importlib.util
import os

import numpy as np
import pytest

from femtogpt import _core as core

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location(
    "bf16_rows_probe", os.path.join(HERE, "..", "scripts", "bf16_rows_probe.py"))
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)

HAS_AVX512BF16 = "avx512bf16" in core.bf16_paths_available()
ROWS_MAX = core.BF16_ROWS_MAX
NS, KS = probe.NS, probe.KS   # N = 1, 31, 33, 50, 100; K = 1, 7, 33, 100, 768


# ---------------------------------------------------------------------------
# The header alone
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module", params=probe.LEVELS, ids=lambda lv: lv or "plain")
def lib(request, tmp_path_factory):
    if probe.find_cc() is None:
        pytest.skip("no C compiler (gcc or cc) to build gemm_bf16.h")
    lib = probe.build(str(tmp_path_factory.mktemp("bf16_rows")), request.param)
    yield lib
    lib.force(0)


def runs(lib, path):
    if not lib.available(path):
        pytest.skip(f"this CPU does not run the {probe.PATH_NAMES[path]} path")


@pytest.mark.parametrize("path", [probe.PORTABLE, probe.AVX512BF16], ids=lambda p: probe.PATH_NAMES[p])
def test_rows_give_the_gemms_bits(lib, path):
    # M = 1 .. ROWS_MAX + 2 and several row blocks (12, 13, 17), N x K over
    # NS x KS (tails of both), beta 0 and 1, general alpha and beta, padded
    # lda/ldc: every element bit for bit gemm_bf16_packed's, within the float64
    # bound, the ldc padding untouched
    runs(lib, path)
    assert lib.rows_max == ROWS_MAX
    assert probe.check_rows(lib, path) > 300


@pytest.mark.parametrize("path", [probe.PORTABLE, probe.AVX512BF16], ids=lambda p: probe.PATH_NAMES[p])
def test_rows_edge_cases(lib, path):
    # NaN and inf reach exactly their row and column, bf16 denormals read as
    # zero, alpha == 0 reads neither A nor B, MXCSR restored
    runs(lib, path)
    probe.check_rows_edges(lib, path)


def test_portable_and_avx512bf16_rows_give_the_same_bits(lib):
    runs(lib, probe.AVX512BF16)
    probe.check_rows_same_bits(lib, [probe.PORTABLE, probe.AVX512BF16])


def test_rows_stay_inside_the_scratch_they_asked_for(lib):
    path = probe.AVX512BF16 if lib.available(probe.AVX512BF16) else probe.PORTABLE
    lib.force(path)
    try:
        rng = np.random.default_rng(4)
        for M, N, K in [(1, 70, 3071), (8, 33, 65), (13, 3, 1)]:
            A = rng.standard_normal((M, K)).astype(np.float32)
            Bp = lib.pack_b(rng.standard_normal((N, K)).astype(np.float32), 1, N, K)
            size = lib.so.probe_rows_scratch_size(M, K)
            buf = np.full(size + 4096, 0xA5, np.uint8)
            C = np.zeros((M, N), np.float32)
            lib.so.probe_rows(M, N, K, 1.0, A.ctypes.data_as(probe.F32P), K,
                              Bp.ctypes.data_as(probe.U16P), 0.0, C.ctypes.data_as(probe.F32P), N,
                              buf.ctypes.data + 3)   # unaligned: the header aligns inside
            assert (buf[size + 3:] == 0xA5).all(), f"wrote past the scratch for {(M, N, K)}"
    finally:
        lib.force(0)


def test_the_bit_comparison_sees_another_summation_order(lib):
    # What the bit-for-bit tests rule out: a kernel that summed the same bf16
    # products in another order (even pair element first, or two partial
    # sums) lands within the float64 bound but not on the GEMM's bits.
    rng = np.random.default_rng(6)
    M, N, K = 2, 100, 768
    A = rng.standard_normal((M, K)).astype(np.float32)
    W = rng.standard_normal((N, K)).astype(np.float32)
    C = np.zeros((M, N), np.float32)
    lib.gemm_packed(0, M, N, K, 1.0, A, lib.pack_b(W, 1, N, K), 0.0, C)
    a, b = probe.bf16_value(A), probe.bf16_value(W).T
    even_first = np.zeros((M, N), np.float32)
    halves = [np.zeros((M, N), np.float32), np.zeros((M, N), np.float32)]
    for p in range(K // 2):
        even_first = even_first + np.outer(a[:, 2 * p], b[2 * p])
        even_first = even_first + np.outer(a[:, 2 * p + 1], b[2 * p + 1])
        h = halves[p % 2]
        h += np.outer(a[:, 2 * p + 1], b[2 * p + 1])
        h += np.outer(a[:, 2 * p], b[2 * p])
    for other in (even_first, halves[0] + halves[1]):
        assert (other.view(np.uint32) != C.view(np.uint32)).mean() > 0.2


# ---------------------------------------------------------------------------
# The core's front: bf16_matmul_packed
# ---------------------------------------------------------------------------

def packed(W):
    N, K = W.shape
    wt = np.empty(core.py_bf16_packed_size(N, K), np.uint16)
    core.py_bf16_pack_wt(wt, np.ascontiguousarray(W, np.float32).ravel(), N, K)
    return wt


def matmul(x, wt, bias, N, kernel="auto"):
    M, K = x.shape
    out = np.full(M * N, np.nan, np.float32)   # the product writes every element
    core.py_bf16_matmul_packed(out, x.ravel(), bias, M, K, N, wt, kernel=kernel)
    return out.reshape(M, N)


def operands(seed, M, N, K):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((M, K)).astype(np.float32),
            rng.standard_normal((N, K)).astype(np.float32),
            rng.standard_normal(N).astype(np.float32))


def same_bits(x, y):
    return np.array_equal(x.view(np.uint32), y.view(np.uint32))


def reference(x, W, bias):
    """float64 on the bf16 inputs (the bias is added in float32 as given), and
    the float32 summation bound (K + 4) u (|x||W^T| + |bias|)."""
    a, w = probe.bf16_value(x).astype(np.float64), probe.bf16_value(W).astype(np.float64)
    ref, mag = a @ w.T, np.abs(a) @ np.abs(w.T)
    if bias is not None:
        ref, mag = ref + bias, mag + np.abs(bias)
    return ref, (x.shape[1] + 4) * 2.0 ** -24 * mag + 1e-30


def test_pack_wt_is_the_headers_trans_b_layout(tmp_path):
    # bf16_pack_wt (threads splitting panels) gives gemm_bf16_pack_b(trans_b=1)'s bytes
    if probe.find_cc() is None:
        pytest.skip("no C compiler (gcc or cc) to build gemm_bf16.h")
    lib = probe.build(str(tmp_path))
    for N, K in [(1, 1), (33, 7), (1000, 100)]:
        W = np.random.default_rng(N).standard_normal((N, K)).astype(np.float32)
        assert np.array_equal(packed(W), lib.pack_b(W, 1, N, K))


@pytest.mark.parametrize("with_bias", [False, True], ids=["no bias", "bias"])
def test_front_rows_equal_the_gemm_bit_for_bit(with_bias):
    # M = 1 .. ROWS_MAX + 1 over NS x KS: the rows kernel, the GEMM and the
    # front's own choice ("auto") give the same bits, within the float64 bound
    for M in range(1, ROWS_MAX + 2):
        for N in NS:
            for K in KS:
                x, W, bias = operands(M * 1000 + N * 10 + K, M, N, K)
                bias = bias if with_bias else None
                wt = packed(W)
                rows, gemm, auto = (matmul(x, wt, bias, N, k) for k in ("rows", "gemm", "auto"))
                where = f"M={M} N={N} K={K} bias={with_bias}"
                assert same_bits(rows, gemm), where
                assert same_bits(auto, gemm), where
                ref, tol = reference(x, W, bias)
                assert (np.abs(rows - ref) <= tol).all(), where


def test_front_matches_float64_on_gpt2_shapes():
    # a decoding row of GPT-2's widths (fc_proj's K = 3072, a width of 50 panels
    # and a tail), with a bias, against float64 on the bf16 inputs
    for M, N, K in [(1, 2304, 768), (4, 768, 3072), (ROWS_MAX, 1590, 768)]:
        x, W, bias = operands(M, M, N, K)
        ref, tol = reference(x, W, bias)
        got = matmul(x, packed(W), bias, N)
        assert (np.abs(got - ref) <= tol).all(), (M, N, K)


def test_front_bound_sees_an_unrounded_input():
    # the bound is tight: a product of the raw float32 inputs falls outside it
    x, W, bias = operands(3, 2, 100, 768)
    ref, tol = reference(x, W, bias)
    raw = x.astype(np.float64) @ W.T.astype(np.float64) + bias
    assert (np.abs(raw - ref) > tol).mean() > 0.5


@pytest.mark.skipif(not HAS_AVX512BF16, reason="this CPU has no AVX512_BF16")
def test_front_portable_equals_avx512bf16_bit_for_bit():
    shapes = [(1, 2304, 768), (3, 100, 33), (ROWS_MAX, 50, 7), (ROWS_MAX + 5, 300, 100)]
    data = [(operands(i, *s), s) for i, s in enumerate(shapes)]
    outs = {}
    try:
        for path in ("avx512bf16", "portable"):
            assert core.set_bf16_path(path) == path
            outs[path] = [matmul(x, packed(W), bias, N) for (x, W, bias), (M, N, K) in data]
    finally:
        core.set_bf16_path("auto")
    for a, b, s in zip(outs["avx512bf16"], outs["portable"], shapes):
        assert same_bits(a, b), s


def test_front_does_not_depend_on_the_thread_count(threads):
    # shapes large enough to be split (N x K >= the front's parallel minimum),
    # on the rows kernel and, past ROWS_MAX rows, the GEMM
    shapes = [(1, 2304, 768), (ROWS_MAX, 1000, 768), (2, 768, 3072), (ROWS_MAX + 3, 1100, 256)]
    results = {}
    for n in (1, 2):
        threads(n)
        results[n] = []
        for i, (M, N, K) in enumerate(shapes):
            x, W, bias = operands(i, M, N, K)
            results[n].append(matmul(x, packed(W), bias, N))
    for a, b, s in zip(results[1], results[2], shapes):
        assert same_bits(a, b), s
        x, W, bias = operands(shapes.index(s), *s)
        ref, tol = reference(x, W, bias)
        assert (np.abs(b - ref) <= tol).all(), s


def test_bad_sizes_are_refused_before_anything_is_written():
    M, N, K = 2, 40, 9
    x, W, bias = operands(0, M, N, K)
    wt = packed(W)
    out = np.full(M * N, 7.0, np.float32)
    good = dict(out=out, inp=x.ravel(), bias=bias, M=M, K=K, N=N, wt_packed=wt)
    bad = [dict(out=out[:-1]), dict(inp=x.ravel()[:-1]), dict(bias=bias[:-1]),
           dict(wt_packed=wt[:-1]), dict(M=0), dict(K=0), dict(N=-1), dict(M=3), dict(K=10),
           dict(N=41)]
    for change in bad:
        args = {**good, **change}
        with pytest.raises(ValueError):
            core.py_bf16_matmul_packed(args["out"], args["inp"], args["bias"], args["M"],
                                       args["K"], args["N"], args["wt_packed"])
    with pytest.raises(ValueError, match="kernel"):
        core.py_bf16_matmul_packed(out, x.ravel(), bias, M, K, N, wt, kernel="fast")
    np.testing.assert_array_equal(out, 7.0)
    for args in [(wt[:-1], W.ravel(), N, K), (wt, W.ravel()[:-1], N, K), (wt, W.ravel(), 0, K),
                 (wt, W.ravel(), N, 0)]:
        with pytest.raises(ValueError):
            core.py_bf16_pack_wt(*args)
    with pytest.raises(ValueError):
        core.py_bf16_packed_size(0, 5)
    with pytest.raises(ValueError):
        core.py_matvec_forward(out[:-1], x.ravel(), W.ravel(), None, M, K, N)
