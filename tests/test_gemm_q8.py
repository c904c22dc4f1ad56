"""The q8 GEMM (femtogpt/kernels/gemm_q8.h, gemm_q8.pxi) through the core:
weights quantized to int8 per row and block of 32 along K with fp16 scales,
activation rows quantized the same way per call (fp32 scales), out = x @ W^T.

The float32 order of the sums is fixed by the header's contract, so the
portable and VNNI paths agree bit for bit, the thread count changes nothing,
and one row multiplied alone equals the same row in a many-row product.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from femtogpt import _core

QK = 32
VNNI = "vnni" in _core.int8_paths_available()
needs_vnni = pytest.mark.skipif(not VNNI, reason="this build or CPU has no AVX512_VNNI path "
                                "(it needs the x86-64-v4 build and a CPU with avx512_vnni)")
PATHS = ["portable"] + (["vnni"] if VNNI else [])


@pytest.fixture
def path():
    """path(name) forces the int8 path; auto is restored after the test."""
    yield _core.set_int8_path
    _core.set_int8_path("auto")


def blocks_of(W):
    """W (N, K) -> (N, Kb, 32) zero-padded."""
    N, K = W.shape
    kb = -(-K // QK)
    pad = np.zeros((N, kb * QK), W.dtype)
    pad[:, :K] = W
    return pad.reshape(N, kb, QK)


def weight_scales(W):
    """The fp16-rounded scale of every (row, block), as float32: fp16(amax / 127)."""
    amax = np.abs(blocks_of(W)).max(axis=2)
    return (amax / np.float32(127)).astype(np.float32).astype(np.float16).astype(np.float32)


def q8(W):
    N, K = W.shape
    return _core.py_q8_quantize_dequantize(np.ascontiguousarray(W, np.float32).ravel(), N, K).reshape(N, K)


def matmul(x, W, bias=None):
    M, K = x.shape
    N = W.shape[0]
    out = np.full(M * N, np.nan, np.float32)
    _core.py_q8_matmul(out, np.ascontiguousarray(x).ravel(), np.ascontiguousarray(W).ravel(),
                       bias, M, K, N)
    return out.reshape(M, N)


def reference(x, W, bias=None):
    """float64 product of the operands as the kernel quantized them: the
    dequantized weight (exact) and the quantized rows' q * d (exact in float64)."""
    M, K = x.shape
    N = W.shape[0]
    q, d = _core.py_q8_quantize_rows(np.ascontiguousarray(x).ravel(), M, K)
    xq = (q.reshape(M, -1, QK).astype(np.float64) * d.astype(np.float64)[:, :, None]).reshape(M, -1)[:, :K]
    out = xq @ q8(W).astype(np.float64).T
    return out if bias is None else out + bias


def fp32_error_bound(x, W):
    """|out - reference| the float32 steps may add: each of Kb rounded block
    terms (two multiplies) and Kb rounded adds, against the sum of |terms|."""
    M, K = x.shape
    kb = -(-K // QK)
    mag = np.abs(reference(np.abs(x), np.abs(W)))  # >= sum of |block terms|
    return 4 * (kb + 2) * np.finfo(np.float32).eps * (mag + 1e-30)


# ---------------------------------------------------------------------------
# quantization
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("N,K", [(1, 1), (15, 31), (17, 33), (33, 65), (50, 100), (3, 768)])
def test_round_trip_error_is_at_most_half_a_step(N, K):
    rng = np.random.default_rng(N * 1000 + K)
    W = (rng.standard_normal((N, K)) * rng.uniform(0.01, 10, (N, 1))).astype(np.float32)
    back = q8(W)
    d = np.repeat(weight_scales(W), QK, axis=1)[:, :K]
    err = np.abs(back.astype(np.float64) - W)
    assert (err <= d / 2 * (1 + 1e-6)).all()
    # and the error is there: the round trip is not the identity
    assert (err > 0).mean() > 0.9 or K == 1
    # the largest |w| of each block lands on +-127 steps (to its fp16 scale's rounding)
    q = back / np.where(d == 0, 1, d)
    assert np.array_equal(q, np.round(q))
    assert np.abs(q).max() == 127


def test_values_on_the_grid_come_back_exactly():
    rng = np.random.default_rng(1)
    N, K = 17, 100
    d = np.float16(rng.uniform(1e-3, 2, (N, 4))).astype(np.float32)  # fp16 scales
    q = rng.integers(-127, 128, (N, 4, QK)).astype(np.float32)
    q[:, :, 0] = 127 * np.sign(rng.standard_normal((N, 4)))  # each block's amax is 127 d
    W = (q * d[:, :, None]).reshape(N, -1)[:, :K]
    W[:, 96] = 127 * d[:, 3]  # the short last block (4 values) keeps its amax too
    W = np.ascontiguousarray(W, np.float32)
    assert np.array_equal(q8(W), W)


def test_zero_blocks_stay_zero_and_leave_the_others_alone():
    rng = np.random.default_rng(2)
    W = rng.standard_normal((5, 96)).astype(np.float32)
    W[:, 32:64] = 0       # a zero block in every row
    W[3] = 0              # a zero row
    back = q8(W)
    assert (back[:, 32:64] == 0).all() and (back[3] == 0).all()
    assert np.array_equal(back[:, :32], q8(np.ascontiguousarray(W[:, :32])))
    x = rng.standard_normal((2, 96)).astype(np.float32)
    x[:, :32] = 0         # a zero activation block
    assert np.isfinite(matmul(x, W)).all()
    assert (matmul(x, W)[:, 3] == 0).all()


def test_activation_rows_are_quantized_per_block_with_float32_scales():
    rng = np.random.default_rng(3)
    M, K = 3, 70
    x = rng.standard_normal((M, K)).astype(np.float32)
    q, d = _core.py_q8_quantize_rows(x.ravel(), M, K)
    assert q.shape == (M, 96) and d.shape == (M, 3)
    amax = np.abs(blocks_of(x)).max(axis=2)
    assert np.array_equal(d, amax / np.float32(127))
    assert (q[:, K:] == 0).all()
    qq = q.reshape(M, 3, QK)
    assert np.abs(qq).max(axis=2).tolist() == [[127] * 3] * M
    err = np.abs(qq * d[:, :, None].astype(np.float64) - blocks_of(x))
    assert (err <= d[:, :, None] / 2 * (1 + 1e-6)).all()


def test_scales_are_rounded_to_fp16():
    # One block with amax / 127 not an fp16 value: the round trip uses the fp16 one.
    W = np.linspace(-1, 0.7, 32, dtype=np.float32)[None, :] * np.float32(1.2345)
    d32 = np.float32(np.abs(W).max()) / np.float32(127)
    d16 = np.float32(np.float16(d32))
    assert d16 != d32
    back = q8(W)
    assert np.array_equal(back, np.clip(np.round(W / d16), -127, 127) * d16)


# ---------------------------------------------------------------------------
# the product
# ---------------------------------------------------------------------------

# One row walks the panels in 4 runs (gemm_q8_row_panels_vnni): N = 123 has 8
# panels, 2 per run, the last partial; 141 has 9, one left over, partial.
SIZES = [(1, 1, 1), (1, 31, 15), (2, 33, 17), (7, 65, 33), (5, 100, 50), (13, 64, 16),
         (1, 768, 100), (19, 300, 45), (1, 100, 123), (1, 64, 141), (1, 33, 64)]


@pytest.mark.parametrize("name", PATHS)
@pytest.mark.parametrize("M,K,N", SIZES)
def test_product_matches_float64_on_the_quantized_operands(path, name, M, K, N):
    path(name)
    rng = np.random.default_rng(M * 7 + K * 3 + N)
    x = rng.standard_normal((M, K)).astype(np.float32)
    W = rng.standard_normal((N, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    out = matmul(x, W, bias)
    ref = reference(x, W, bias)
    bound = fp32_error_bound(x, W) + 4 * np.finfo(np.float32).eps * np.abs(ref)
    assert (np.abs(out - ref) <= bound).all()
    # against the float32 product of the unquantized operands, much looser: each
    # operand moves by up to half a step (d = amax/127 of its block), so
    # |error| <= sum over k of (|x| dW/2 + |W| dx/2 + dx dW / 4)
    dW = np.repeat(weight_scales(W), QK, axis=1)[:, :K]
    dx = np.repeat(np.abs(blocks_of(x)).max(axis=2) / 127, QK, axis=1)[:, :K]
    loose = np.abs(x) @ dW.T / 2 + dx @ np.abs(W).T / 2 + dx @ dW.T / 4 + 1e-5
    exact = x.astype(np.float64) @ W.T.astype(np.float64) + bias
    assert (np.abs(out - exact) <= loose).all()


def test_the_float64_check_sees_a_wrong_product():
    # The tight reference rejects a kernel that skipped quantizing the activations.
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 200)).astype(np.float32)
    W = rng.standard_normal((20, 200)).astype(np.float32)
    unquantized = x.astype(np.float64) @ q8(W).astype(np.float64).T
    assert (np.abs(unquantized - reference(x, W)) > fp32_error_bound(x, W)).mean() > 0.9


@needs_vnni
@pytest.mark.parametrize("M,K,N", SIZES + [(256, 768, 96), (1, 768, 2304), (6, 3072, 64),
                                          (300, 96, 20)])
def test_portable_and_vnni_give_the_same_bits(path, M, K, N):
    rng = np.random.default_rng(5 + M + N)
    x = (rng.standard_normal((M, K)) * np.exp(rng.standard_normal((M, 1)))).astype(np.float32)
    W = (rng.standard_normal((N, K)) * 0.05).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    path("portable")
    a = matmul(x, W, bias)
    path("vnni")
    b = matmul(x, W, bias)
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("name", PATHS)
@pytest.mark.parametrize("M,K,N", [(1, 768, 2304), (256, 200, 300), (200, 96, 20), (37, 64, 1000)])
def test_the_thread_count_changes_nothing(path, threads, name, M, K, N):
    # (200, 96, 20): two panels for many rows, so the threads split the rows;
    # the others split panels (1 row: single panels, more rows: panel pairs)
    path(name)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((M, K)).astype(np.float32)
    W = rng.standard_normal((N, K)).astype(np.float32)
    results = []
    for n in (1, 2, 3):
        threads(n)
        results.append(matmul(x, W))
    assert all(np.array_equal(results[0], r) for r in results[1:])


@pytest.mark.parametrize("name", PATHS)
def test_a_row_alone_equals_the_row_in_a_prompt_pass(path, name):
    path(name)
    rng = np.random.default_rng(7)
    M, K, N = 23, 160, 70
    x = rng.standard_normal((M, K)).astype(np.float32)
    W = rng.standard_normal((N, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    packed = _core.py_q8_pack(W.ravel(), N, K)
    full = np.empty(M * N, np.float32)
    _core.py_q8_matmul_packed(full, x.ravel(), packed, bias, M, K, N)
    full = full.reshape(M, N)
    for m in range(M):
        one = np.empty(N, np.float32)
        _core.py_q8_matmul_packed(one, x[m].copy(), packed, bias, 1, K, N)
        assert np.array_equal(one, full[m]), m
    # and the first rows alone, as a shorter prompt
    part = np.empty(7 * N, np.float32)
    _core.py_q8_matmul_packed(part, x[:7].ravel(), packed, bias, 7, K, N)
    assert np.array_equal(part.reshape(7, N), full[:7])


def test_bias_is_added_once_per_column():
    rng = np.random.default_rng(8)
    M, K, N = 3, 64, 33
    x = rng.standard_normal((M, K)).astype(np.float32)
    W = rng.standard_normal((N, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    assert np.array_equal(matmul(x, W, bias), matmul(x, W) + bias)
    assert not np.array_equal(matmul(x, W, bias), matmul(x, W))


def test_out_is_written_not_accumulated_and_nothing_past_it():
    rng = np.random.default_rng(9)
    M, K, N = 5, 40, 19
    x = rng.standard_normal((M, K)).astype(np.float32)
    W = rng.standard_normal((N, K)).astype(np.float32)
    buf = np.full(M * N + 64, 123.0, np.float32)
    _core.py_q8_matmul(buf[:M * N], x.ravel(), W.ravel(), None, M, K, N)
    assert np.array_equal(buf[:M * N].reshape(M, N), matmul(x, W))
    assert (buf[M * N:] == 123.0).all()


def test_packed_weight_has_the_documented_size():
    for N, K in [(1, 1), (16, 32), (17, 33), (2304, 768), (50257, 768)]:
        panels, blocks = -(-N // 16), -(-K // 32)
        assert _core.py_q8_weight_bytes(N, K) == panels * -(-blocks // 2) * 1088
    assert _core.py_q8_weight_bytes(2304, 768) / (2304 * 768) == 1.0625


def test_bad_sizes_raise_before_any_kernel_runs():
    x = np.ones(4 * 32, np.float32)
    W = np.ones(8 * 32, np.float32)
    out = np.zeros(4 * 8, np.float32)
    with pytest.raises(ValueError, match="out"):
        _core.py_q8_matmul(out[:-1], x, W, None, 4, 32, 8)
    with pytest.raises(ValueError, match="inp"):
        _core.py_q8_matmul(out, x[:-1], W, None, 4, 32, 8)
    with pytest.raises(ValueError, match="W"):
        _core.py_q8_matmul(out, x, W[:-1], None, 4, 32, 8)
    with pytest.raises(ValueError, match="bias"):
        _core.py_q8_matmul(out, x, W, np.zeros(7, np.float32), 4, 32, 8)
    with pytest.raises(ValueError, match="must be positive"):
        _core.py_q8_matmul(out, x, W, None, 0, 32, 8)
    with pytest.raises(ValueError, match="must be positive"):
        _core.py_q8_matmul(out, x, W, None, 4, -32, 8)
    packed = _core.py_q8_pack(W, 8, 32)
    with pytest.raises(ValueError, match="packed"):
        _core.py_q8_matmul_packed(out, x, packed[:-1], None, 4, 32, 8)
    with pytest.raises(ValueError, match="packed"):  # packed for another shape (2 panels, not 1)
        _core.py_q8_matmul_packed(np.zeros(4 * 20, np.float32), x, packed, None, 4, 32, 20)
    with pytest.raises(ValueError, match="W"):
        _core.py_q8_quantize_dequantize(W[:-1], 8, 32)
    with pytest.raises(ValueError):
        _core.py_q8_quantize_rows(x, 5, 32)
    assert (out == 0).all()  # no rejected call wrote anything


# ---------------------------------------------------------------------------
# the path
# ---------------------------------------------------------------------------

def test_set_int8_path_refuses_what_does_not_run(path):
    with pytest.raises(ValueError, match="must be one of"):
        path("fast")
    assert path("portable") == "portable" and _core.int8_path() == "portable"
    if not VNNI:
        with pytest.raises(ValueError, match="does not run"):
            path("vnni")
        assert _core.int8_path() == "portable"
    assert path("auto") == ("vnni" if VNNI else "portable")


def test_int8_path_can_be_forced_by_the_environment():
    code = "import femtogpt, json; print(json.dumps(femtogpt.build_info()))"
    env = {**os.environ, "FEMTOGPT_INT8_PATH": "portable"}
    # From the installed package's parent (the imported femtogpt's), where the
    # compiled modules are, whatever folder the tests run from.
    import femtogpt
    where = os.path.dirname(os.path.dirname(os.path.abspath(femtogpt.__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True, cwd=where).stdout
    info = json.loads(out)
    assert info["int8"] == "portable" and "portable" in info["int8_available"]
    env.pop("FEMTOGPT_INT8_PATH")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True, cwd=where).stdout
    assert json.loads(out)["int8"] == ("vnni" if VNNI else "portable")
    env["FEMTOGPT_INT8_PATH"] = "fast"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, cwd=where)
    assert proc.returncode != 0 and "FEMTOGPT_INT8_PATH=fast" in proc.stderr
