"""The fp32 decoding product (matvec_forward, femtogpt/kernels/matvec_f32.h)
against float64, across thread counts and batch sizes, in every build of the
core this CPU runs (x86-64, -v3, -v4: the summation order may differ between
builds, never within one).

out (B, C_out) = inp (B, C_in) @ weight (C_out, C_in)^T + bias. Outputs are
pre-filled with NaN, so an element the kernel never writes shows.
"""
import glob
import importlib
import importlib.util
import os

import numpy as np
import pytest

import femtogpt
from femtogpt import _cpu
from femtogpt._dispatch import LEVELS, MODULES


def _builds():
    """(name, module) of every build of the core this CPU runs. femtogpt._core
    is the dispatched build, so the baseline is loaded from its own file."""
    if len(_cpu.BUILT) == 1:
        return [_cpu.BUILT[0]]
    return [t for t in _cpu.BUILT if LEVELS.get(t, 99) <= _cpu.cpu_level()]


def _load(target):
    if len(_cpu.BUILT) == 1:
        return femtogpt._core
    if target in _BASELINE:
        return _BASELINE[target]
    if MODULES[target] != "_core":
        return importlib.import_module("femtogpt." + MODULES[target])
    path = glob.glob(os.path.join(os.path.dirname(femtogpt.__file__), "_core.*.so"))[0]
    spec = importlib.util.spec_from_file_location("femtogpt._core", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.TARGET == target
    _BASELINE[target] = module
    return module


_BASELINE = {}


@pytest.fixture(scope="module", params=_builds())
def core(request):
    return _load(request.param)


def matvec(core, inp, weight, bias):
    B, C_in = inp.shape
    C_out = weight.shape[0]
    out = np.full(B * C_out, np.nan, np.float32)
    core.py_matvec_forward(out, inp.ravel(), weight.ravel(), bias, B, C_in, C_out)
    return out.reshape(B, C_out)


def operands(B, C_in, C_out, with_bias, seed=0):
    rng = np.random.default_rng(seed)
    inp = rng.standard_normal((B, C_in)).astype(np.float32)
    weight = rng.standard_normal((C_out, C_in)).astype(np.float32)
    bias = rng.standard_normal(C_out).astype(np.float32) if with_bias else None
    return inp, weight, bias


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("C_out", [1, 15, 17, 100, 2304])
@pytest.mark.parametrize("C_in", [1, 7, 17, 33, 100, 768, 3072])
def test_matches_float64(core, C_in, C_out, with_bias):
    # Each element is a float32 sum of C_in products: its error is bounded by
    # a small multiple of C_in * 2^-24 * sum |x w| (a fixed-order blocked sum
    # does far better). tol 1e-5 of that scale is 20x above what is observed
    # at C_in = 3072, and a wrong or missing term is off by O(1) of it.
    for B in range(1, 6):
        inp, weight, bias = operands(B, C_in, C_out, with_bias, seed=B)
        got = matvec(core, inp, weight, bias)
        x, w = inp.astype(np.float64), weight.astype(np.float64)
        want = x @ w.T
        scale = np.abs(x) @ np.abs(w).T
        if bias is not None:
            want += bias
            scale += np.abs(bias)
        assert not np.isnan(got).any(), f"B={B}: an output was not written"
        err = np.abs(got - want)
        assert (err <= 1e-5 * scale + 1e-30).all(), \
            f"B={B}: max error {err.max():.3g} at scale {scale.max():.3g}"


@pytest.mark.parametrize("B,C_in,C_out", [(1, 768, 2304), (1, 768, 50257 // 8),
                                          (3, 333, 1001), (4, 3072, 768), (5, 100, 2305)])
def test_one_and_two_threads_agree_bit_for_bit(core, threads, B, C_in, C_out):
    # Large enough to be split over the threads (B C_in C_out >= 262144).
    # Each output is one thread's sum in a fixed order, whichever thread.
    assert B * C_in * C_out >= 262144
    inp, weight, bias = operands(B, C_in, C_out, True, seed=7)
    threads(1)
    one = matvec(core, inp, weight, bias)
    threads(2)
    two = matvec(core, inp, weight, bias)
    assert not np.isnan(one).any()
    np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize("C_in,C_out", [(7, 17), (33, 100), (768, 2304), (100, 1003)])
def test_row_of_a_batch_equals_the_one_row_call(core, threads, C_in, C_out):
    # Row b of a B-row product is the 1-row product of inp[b], bit for bit,
    # whatever rows it was grouped with (B up to 9 crosses the kernel's groups
    # of rows) and at 1 or 2 threads.
    inp, weight, bias = operands(9, C_in, C_out, True, seed=3)
    for n_threads in (1, 2):
        threads(n_threads)
        single = np.concatenate([matvec(core, inp[b:b + 1], weight, bias) for b in range(9)])
        for B in range(1, 10):
            np.testing.assert_array_equal(matvec(core, inp[:B], weight, bias), single[:B],
                                          err_msg=f"B={B}, {n_threads} thread(s)")


@pytest.mark.skipif(not {"x86-64-v3", "x86-64-v4"} <= set(_builds()),
                    reason="needs the -v3 and -v4 builds and a CPU that runs both")
def test_v3_and_v4_builds_give_the_same_bits():
    # Both sum 8 wide with fused multiply-adds (the tail too: it is a
    # zero-padded vector), so the AVX2 and the AVX-512 build agree.
    v3, v4 = _load("x86-64-v3"), _load("x86-64-v4")
    for B, C_in, C_out in [(3, 7, 17), (5, 100, 1003), (4, 768, 2304), (2, 3071, 33)]:
        inp, weight, bias = operands(B, C_in, C_out, True, seed=C_in)
        np.testing.assert_array_equal(matvec(v3, inp, weight, bias),
                                      matvec(v4, inp, weight, bias))


def test_rejects_wrong_sizes(core):
    z = lambda n: np.zeros(n, np.float32)  # noqa: E731
    with pytest.raises(ValueError):
        core.py_matvec_forward(z(5), z(6), z(15), None, 2, 3, 3)     # out holds 6
    with pytest.raises(ValueError):
        core.py_matvec_forward(z(6), z(6), z(15), z(3), 2, 3, 3)     # weight holds 9
    with pytest.raises(ValueError):
        core.py_matvec_forward(z(6), z(6), z(9), z(2), 2, 3, 3)      # bias holds 3
