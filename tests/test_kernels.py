"""The compiled kernels (femtogpt._core) against the float64 numpy reference.

Every kernel runs in float32 on inputs that are already float32, and the
reference runs in float64 on the very same (float32-rounded) values, so the
only differences left are the kernels' own float32 rounding. How large that
can be sets the tolerances:

  * elementwise kernels that do one float32 operation (embedding add,
    residual add, dropout scaling) are compared to the exact float32 result or
    to the reference within one ulp (rtol 1.2e-7 = 2**-23);
  * kernels that accumulate (matmul, LayerNorm, attention, cross-entropy) or
    use the fast vectorised exp (relative error ~2e-7) are compared with
    |kernel - ref| <= tol * (max|ref| + |ref|), tol = 1e-5 (2e-5 for the
    attention backward, which chains three products and a softmax). The
    observed errors are 10x-100x smaller, while every plausible bug (a wrong
    index, a missing term, = instead of +=) is off by O(1) of the scale.

Accumulate (+=) versus write (=) semantics are tested by pre-filling outputs:
accumulating outputs with random values (the result must be prefill + grad),
written outputs with NaN (any NaN left over, or read, shows in the result).
"""
import math

import numpy as np
import pytest

import reference as ref
from femtogpt import _core as core

TOL = 1e-5
ULP = 2.0 ** -23


# ---------------------------------------------------------------- helpers

def f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def i32(a):
    return np.ascontiguousarray(a, dtype=np.int32)


def nans(shape):
    return np.full(shape, np.nan, dtype=np.float32)


def assert_close(actual, expected, tol=TOL):
    """|actual - expected| <= tol * (max|expected| + |expected|) elementwise:
    the error is measured against the tensor's own scale, so tiny entries of a
    large tensor are not held to an impossible relative bound."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale)


def run_encoder_forward(idx, wte, wpe, out=None):
    B, T = idx.shape
    C = wte.shape[1]
    out = nans((B, T, C)) if out is None else out
    core.py_encoder_forward(out.ravel(), i32(idx).ravel(), wte.ravel(), wpe.ravel(), B, T, C)
    return out


def run_encoder_backward(dwte, dwpe, dout, idx):
    B, T, C = dout.shape
    core.py_encoder_backward(dwte.ravel(), dwpe.ravel(), dout.ravel(), i32(idx).ravel(),
                             B, T, C)


def run_layernorm_forward(x, w, b):
    N, C = x.shape
    out, mean, rstd = nans((N, C)), nans(N), nans(N)
    core.py_layernorm_forward(out.ravel(), mean, rstd, x.ravel(), w, b, N, C)
    return out, mean, rstd


def run_layernorm_backward(dx, dw, db, dout, x, w, mean, rstd):
    N, C = x.shape
    core.py_layernorm_backward(dx.ravel(), dw, db, dout.ravel(), x.ravel(), w, mean, rstd,
                               N, C)


def run_matmul_forward(x, w, b, out=None):
    N, C_in = x.shape
    C_out = w.shape[0]
    out = nans((N, C_out)) if out is None else out
    core.py_matmul_forward(out.ravel(), x.ravel(), w.ravel(), b, N, C_in, C_out)
    return out


def run_matmul_backward(dx, dw, db, dout, x, w):
    N, C_in = x.shape
    C_out = w.shape[0]
    core.py_matmul_backward(dx.ravel(), dw.ravel(), db, dout.ravel(), x.ravel(), w.ravel(),
                            N, C_in, C_out)


def run_attention_forward(qkv, NH, p=0.0, seed=0):
    B, T, C3 = qkv.shape
    C = C3 // 3
    out, att = nans((B, T, C)), nans((B, NH, T, T))
    core.py_attention_forward(out.ravel(), att.ravel(), qkv.ravel(), B, T, C, NH, p, seed)
    return out, att


def run_attention_backward(dout, qkv, NH, p=0.0, seed=0):
    # The probabilities are not passed: backward recomputes them from qkv.
    B, T, C3 = qkv.shape
    dqkv = nans(qkv.shape)
    core.py_attention_backward(dqkv.ravel(), dout.ravel(), qkv.ravel(),
                               B, T, C3 // 3, NH, p, seed)
    return dqkv


def run_crossentropy_forward(logits, targets):
    N, V = logits.shape
    losses, lse = nans(N), nans(N)
    core.py_crossentropy_forward(losses, lse, logits.ravel(), i32(targets), N, V)
    return losses, lse


def run_crossentropy_backward(logits, lse, targets, dloss):
    N, V = logits.shape
    dlogits = nans((N, V))
    core.py_crossentropy_backward(dlogits.ravel(), logits.ravel(), lse, i32(targets),
                                  dloss, N, V)
    return dlogits


def dropout(x, p, seed):
    out = nans(x.shape)
    core.py_dropout_forward(out, x, p, seed)
    return out


def keep_scale(p):
    # The kernel's 1/(1-p) for a float32 p, rounded to float32 once.
    return np.float32(1.0 / (1.0 - float(np.float32(p))))


# ---------------------------------------------------------------- embedding

ENCODER_SHAPES = [  # B, T, C, V, block_size
    (1, 1, 16, 5, 1),
    (2, 7, 48, 67, 9),     # T < block_size, odd vocabulary
    (4, 5, 3, 2, 5),       # C smaller than one channel chunk, tiny vocabulary
    (3, 64, 128, 65, 64),
    (2, 9, 37, 11, 12),    # C = 37: a partial last channel chunk
]


@pytest.mark.parametrize("B,T,C,V,block", ENCODER_SHAPES)
def test_encoder_forward(B, T, C, V, block):
    rng = np.random.default_rng(B * 1000 + T)
    wte, wpe = f32(rng.normal(size=(V, C))), f32(rng.normal(size=(block, C)))
    idx = rng.integers(0, V, (B, T))
    out = run_encoder_forward(idx, wte, wpe)
    # One float32 addition per element: exactly numpy's float32 sum...
    np.testing.assert_array_equal(out, wte[idx] + wpe[:T])
    # ...and within half an ulp of the float64 reference.
    np.testing.assert_allclose(out, ref.embedding_forward(idx, wte, wpe), rtol=ULP, atol=0)


@pytest.mark.parametrize("B,T,C,V,block", ENCODER_SHAPES)
def test_encoder_backward_accumulates(B, T, C, V, block):
    rng = np.random.default_rng(7 + B * T)
    idx = rng.integers(0, V, (B, T))
    idx.flat[: min(3, idx.size)] = idx.flat[0]     # a token repeated: its rows must sum
    dout = f32(rng.normal(size=(B, T, C)))
    dwte0, dwpe0 = f32(rng.normal(size=(V, C))), f32(rng.normal(size=(block, C)))
    dwte, dwpe = dwte0.copy(), dwpe0.copy()
    run_encoder_backward(dwte, dwpe, dout, idx)
    gwte, gwpe = ref.embedding_backward(dout, idx, V, block)
    # += : the result is the prefill plus the gradient (sums of at most B*T
    # float32 terms, hence the 1e-6-scale tolerance on top of the prefill)
    assert_close(dwte - dwte0.astype(np.float64), gwte, 1e-5)
    assert_close(dwpe - dwpe0.astype(np.float64), gwpe, 1e-5)
    np.testing.assert_allclose(dwte, dwte0 + gwte, rtol=1e-6, atol=1e-6 * B)
    # rows that get no gradient are left bit for bit alone
    unused = np.setdiff1d(np.arange(V), idx)
    np.testing.assert_array_equal(dwte[unused], dwte0[unused])
    np.testing.assert_array_equal(dwpe[T:], dwpe0[T:])


# ---------------------------------------------------------------- LayerNorm

LN_SHAPES = [(1, 16), (7, 48), (37, 3), (300, 128), (5, 1), (33, 67), (20, 32)]


def ln_inputs(rng, N, C):
    # non-zero mean: the mean must be removed. The (20, 32) case has a variance
    # near eps = 1e-5, so a wrong eps (or eps outside the sqrt) is caught (its
    # mean is small too: x - mean in float32 would otherwise lose digits).
    mean, std = (0.01, 3e-3) if (N, C) == (20, 32) else (0.7, 1.5)
    x = f32(rng.normal(mean, std, (N, C)))
    w = f32(1 + rng.normal(0, 0.3, C))
    b = f32(rng.normal(0, 0.3, C))
    return x, w, b


@pytest.mark.parametrize("N,C", LN_SHAPES)
def test_layernorm_forward(N, C):
    rng = np.random.default_rng(N * 100 + C)
    x, w, b = ln_inputs(rng, N, C)
    saved = x.copy()
    out, mean, rstd = run_layernorm_forward(x, w, b)
    r_out, cache = ref.layernorm_forward(x, w, b)
    assert_close(out, r_out)
    assert_close(mean, cache["mean"])
    assert_close(rstd, cache["rstd"])
    np.testing.assert_array_equal(x, saved)      # the input is read-only


def test_layernorm_without_bias_is_layernorm_with_zero_bias():
    rng = np.random.default_rng(5)
    N, C = 37, 48
    x, w, _ = ln_inputs(rng, N, C)
    zero = np.zeros(C, np.float32)
    out0, mean0, rstd0 = run_layernorm_forward(x, w, zero)
    out, mean, rstd = nans((N, C)), nans(N), nans(N)
    core.py_layernorm_forward(out.ravel(), mean, rstd, x.ravel(), w, None, N, C)
    np.testing.assert_array_equal(out, out0)
    np.testing.assert_array_equal(rstd, rstd0)
    dout = f32(rng.normal(size=(N, C)))
    dx0, dw0, db0 = np.zeros((N, C), np.float32), np.zeros(C, np.float32), np.zeros(C, np.float32)
    run_layernorm_backward(dx0, dw0, db0, dout, x, w, mean, rstd)
    dx, dw = np.zeros((N, C), np.float32), np.zeros(C, np.float32)
    core.py_layernorm_backward(dx.ravel(), dw, None, dout.ravel(), x.ravel(), w, mean, rstd,
                               N, C)
    np.testing.assert_array_equal(dx, dx0)
    np.testing.assert_array_equal(dw, dw0)


@pytest.mark.parametrize("N,C", LN_SHAPES)
def test_layernorm_backward_accumulates(N, C):
    rng = np.random.default_rng(N * 100 + C + 1)
    x, w, b = ln_inputs(rng, N, C)
    dout = f32(rng.normal(size=(N, C)))
    _, mean, rstd = run_layernorm_forward(x, w, b)
    _, cache = ref.layernorm_forward(x, w, b)
    r_dx, r_dw, r_db = ref.layernorm_backward(dout, cache)
    dx0, dw0, db0 = f32(rng.normal(size=(N, C))), f32(rng.normal(size=C)), f32(rng.normal(size=C))
    dx, dw, db = dx0.copy(), dw0.copy(), db0.copy()
    run_layernorm_backward(dx, dw, db, dout, x, w, mean, rstd)
    # All three accumulate: compare the increments (computed in float64 from
    # float32 results, so the prefill's rounding adds at most an ulp of it).
    # dx is a difference of terms of size rstd * |dout * w| that may cancel
    # (exactly, when C = 1), so its error is measured against that size.
    dx_scale = max(np.abs(r_dx).max(), (np.abs(dout * w) * rstd[:, None]).max())
    for got, prefill, want, scale in ((dx, dx0, r_dx, dx_scale),
                                      (dw, dw0, r_dw, np.abs(r_dw).max()),
                                      (db, db0, r_db, np.abs(r_db).max())):
        inc = got.astype(np.float64) - prefill
        np.testing.assert_allclose(inc, want, rtol=TOL,
                                   atol=TOL * scale + 2 * ULP * np.abs(prefill).max())


# ---------------------------------------------------------------- matmul

MATMUL_SHAPES = [  # N, C_in, C_out
    (1, 1, 1),
    (7, 48, 144),
    (37, 48, 67),      # N and C_out not multiples of 16
    (300, 64, 200),    # large enough that the product is split by rows across threads
    (20, 8, 300),      # split by columns (C_out > N), weight transposed
    (40, 300, 16),     # dinp's product split by columns, weight not transposed
    (64, 256, 64),
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("N,C_in,C_out", MATMUL_SHAPES)
def test_matmul_forward(N, C_in, C_out, bias):
    rng = np.random.default_rng(N + C_in + C_out)
    x, w = f32(rng.normal(size=(N, C_in))), f32(rng.normal(size=(C_out, C_in)))
    b = f32(rng.normal(size=C_out)) if bias else None
    saved = (x.copy(), w.copy())
    out = run_matmul_forward(x, w, b)           # out starts as NaN: it must be written
    assert_close(out, ref.linear_forward(x, w, b))
    np.testing.assert_array_equal(x, saved[0])
    np.testing.assert_array_equal(w, saved[1])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("N,C_in,C_out", MATMUL_SHAPES)
def test_matmul_backward_write_and_accumulate(N, C_in, C_out, bias):
    rng = np.random.default_rng(N * C_in + C_out)
    x, w = f32(rng.normal(size=(N, C_in))), f32(rng.normal(size=(C_out, C_in)))
    dout = f32(rng.normal(size=(N, C_out)))
    r_dx, r_dw, r_db = ref.linear_backward(dout, x, w)
    dx = nans((N, C_in))                                    # written (=)
    dw0, db0 = f32(rng.normal(size=(C_out, C_in))), f32(rng.normal(size=C_out))
    dw, db = dw0.copy(), db0.copy()                         # accumulated (+=)
    run_matmul_backward(dx, dw, db if bias else None, dout, x, w)
    assert_close(dx, r_dx)
    np.testing.assert_allclose(dw - dw0.astype(np.float64), r_dw, rtol=TOL,
                               atol=TOL * np.abs(r_dw).max() + 2 * ULP * np.abs(dw0).max())
    if bias:
        np.testing.assert_allclose(db - db0.astype(np.float64), r_db, rtol=TOL,
                                   atol=TOL * np.abs(r_db).max() + 2 * ULP * np.abs(db0).max())
    else:
        np.testing.assert_array_equal(db, db0)             # untouched: it was not passed


# ---------------------------------------------------------------- attention

ATTENTION_SHAPES = [  # B, T, C, NH
    (1, 1, 16, 2),     # a single position attends only to itself
    (2, 7, 48, 3),
    (1, 7, 12, 4),     # head size 3
    (2, 33, 24, 1),    # one head
    (3, 64, 128, 4),
]


@pytest.mark.parametrize("B,T,C,NH", ATTENTION_SHAPES)
def test_attention_forward(B, T, C, NH):
    rng = np.random.default_rng(B * T * C + NH)
    qkv = f32(rng.normal(size=(B, T, 3 * C)))
    out, att = run_attention_forward(qkv, NH)
    r_out, r_att = ref.attention_forward(qkv, NH)
    assert_close(out, r_out)
    assert_close(att, r_att)
    # the causal mask is exact: no probability on the future at all
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    assert np.all(att[..., future] == 0.0)


@pytest.mark.parametrize("B,T,C,NH", ATTENTION_SHAPES)
def test_attention_backward(B, T, C, NH):
    rng = np.random.default_rng(B * T * C + NH + 1)
    qkv = f32(rng.normal(size=(B, T, 3 * C)))
    dout = f32(rng.normal(size=(B, T, C)))
    _, att = run_attention_forward(qkv, NH)
    _, r_att = ref.attention_forward(qkv, NH)
    dqkv = run_attention_backward(dout, qkv, NH)     # starts NaN: must be written
    # q, k, v parts have different scales: check each against its own scale
    r_dqkv = ref.attention_backward(dout, qkv, r_att, NH)
    for part in range(3):
        cols = slice(part * C, (part + 1) * C)
        assert_close(dqkv[..., cols], r_dqkv[..., cols], 2e-5)


# -- attention with dropout on the probabilities
#
# The dropout mask is hidden inside the kernel, so we read it back: with the
# value vectors set to one-hot rows (v[s] = e_s within each head, possible
# when head size >= T), the output IS the dropped, rescaled probability
# matrix. The mask depends only on (seed, position), so the same seed then
# gives the same mask with any q, k, v.

DROP_B, DROP_T, DROP_C, DROP_NH = 2, 7, 16, 2     # head size 8 >= T = 7


def one_hot_values(qkv, NH):
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // NH
    probe = qkv.copy()
    probe[..., 2 * C:] = 0.0
    for h in range(NH):
        for s in range(T):
            probe[:, s, 2 * C + h * hs + s] = 1.0
    return probe


def recover_mask(qkv, NH, p, seed):
    """The kernel's dropout multiplier for each causal (b, h, t, s): the ratio
    dropped / att, which is 0 or 1/(1-p) up to the rounding of one multiply."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // NH
    out, att = run_attention_forward(one_hot_values(qkv, NH), NH, p, seed)
    dropped = out.reshape(B, T, NH, hs)[..., :T].transpose(0, 2, 1, 3)   # (B, NH, T, T)
    causal = np.tril(np.ones((T, T), dtype=bool))
    assert np.all(att[..., causal] > 0)
    scale = np.where(causal, dropped / np.where(causal, att, 1.0), 0.0)
    return scale, causal


def split_heads(a, NH):
    B, T, C = a.shape
    return a.reshape(B, T, NH, C // NH).transpose(0, 2, 1, 3)


def merge_heads(a):
    B, NH, T, hs = a.shape
    return a.transpose(0, 2, 1, 3).reshape(B, T, NH * hs)


def masked_attention_forward(qkv, NH, M):
    """float64 attention with the probabilities multiplied by M after softmax."""
    C = qkv.shape[-1] // 3
    _, att = ref.attention_forward(qkv, NH)
    v = split_heads(np.asarray(qkv, np.float64)[..., 2 * C:], NH)
    return merge_heads((att * M) @ v), att


def masked_attention_backward(dout, qkv, att, NH, M):
    """Backward of masked_attention_forward, written out (checked by
    finite differences in test_masked_attention_helper_is_right)."""
    qkv = np.asarray(qkv, np.float64)
    C = qkv.shape[-1] // 3
    hs = C // NH
    q, k, v = (split_heads(qkv[..., i * C:(i + 1) * C], NH) for i in range(3))
    dy = split_heads(np.asarray(dout, np.float64), NH)
    dv = np.swapaxes(att * M, -1, -2) @ dy
    datt = (dy @ np.swapaxes(v, -1, -2)) * M                 # through the dropout
    dscores = att * (datt - (att * datt).sum(-1, keepdims=True))
    dq = dscores @ k / math.sqrt(hs)
    dk = np.swapaxes(dscores, -1, -2) @ q / math.sqrt(hs)
    return np.concatenate([merge_heads(dq), merge_heads(dk), merge_heads(dv)], axis=-1)


def test_masked_attention_helper_is_right():
    # The helper above is itself a reference: check it in float64, against
    # ref.attention_backward for an all-ones mask and against central
    # differences for a random 0 / 2 mask.
    rng = np.random.default_rng(5)
    B, T, C, NH = 1, 4, 6, 2
    qkv = rng.normal(size=(B, T, 3 * C))
    R = rng.normal(size=(B, T, C))
    ones = np.ones((B, NH, T, T))
    _, att = masked_attention_forward(qkv, NH, ones)
    np.testing.assert_allclose(masked_attention_backward(R, qkv, att, NH, ones),
                               ref.attention_backward(R, qkv, att, NH), rtol=1e-12, atol=1e-12)
    M = 2.0 * (rng.random((B, NH, T, T)) > 0.5)
    grad = masked_attention_backward(R, qkv, att, NH, M)
    eps, numeric = 1e-6, np.zeros_like(qkv)
    for i in np.ndindex(qkv.shape):
        saved = qkv[i]
        qkv[i] = saved + eps
        fp = np.sum(masked_attention_forward(qkv, NH, M)[0] * R)
        qkv[i] = saved - eps
        fm = np.sum(masked_attention_forward(qkv, NH, M)[0] * R)
        qkv[i] = saved
        numeric[i] = (fp - fm) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


def drop_qkv(seed):
    rng = np.random.default_rng(seed)
    return f32(rng.normal(0, 1.0, (DROP_B, DROP_T, 3 * DROP_C)))


def test_attention_dropout_mask_is_binary_and_seeded():
    p, NH = 0.3, DROP_NH
    qkv = drop_qkv(1)
    M, causal = recover_mask(qkv, NH, p, seed=11)
    entries = M[..., causal]
    # every kept probability is scaled by exactly 1/(1-p) (float32), the rest are 0
    is_kept = entries != 0
    np.testing.assert_allclose(entries[is_kept], keep_scale(p), rtol=2 * ULP)
    assert 0.1 < 1 - is_kept.mean() < 0.5       # 112 entries, p = 0.3: ~4 sigma band
    # the mask is a function of the seed (and position) only: repeatable with
    # other q, k, v, and a new seed changes it
    np.testing.assert_array_equal(recover_mask(drop_qkv(2), NH, p, seed=11)[0] != 0, M != 0)
    assert not np.array_equal(recover_mask(qkv, NH, p, seed=12)[0] != 0, M != 0)
    # the returned att is the probabilities BEFORE dropout, identical to p = 0
    _, att_p = run_attention_forward(qkv, NH, p, 11)
    _, att_0 = run_attention_forward(qkv, NH)
    np.testing.assert_array_equal(att_p, att_0)


def test_attention_dropout_forward_and_backward_match_masked_reference():
    p, seed, NH = 0.25, 99, DROP_NH
    qkv = drop_qkv(3)
    M, causal = recover_mask(qkv, NH, p, seed)
    M = np.where(M != 0, float(keep_scale(p)), 0.0)
    assert 0 < np.mean(M[..., causal] == 0)                     # something was dropped
    out, att = run_attention_forward(qkv, NH, p, seed)
    r_out, r_att = masked_attention_forward(qkv, NH, M)
    assert_close(out, r_out)
    dout = f32(np.random.default_rng(4).normal(size=out.shape))
    dqkv = run_attention_backward(dout, qkv, NH, p, seed)
    r_dqkv = masked_attention_backward(dout, qkv, r_att, NH, M)
    for part in range(3):
        cols = slice(part * DROP_C, (part + 1) * DROP_C)
        assert_close(dqkv[..., cols], r_dqkv[..., cols], 2e-5)
    # and this is not the no-dropout gradient (the mask really is applied)
    plain = ref.attention_backward(dout, qkv, r_att, NH)
    assert np.abs(plain - r_dqkv).max() > 100 * 2e-5 * np.abs(r_dqkv).max()


def test_attention_dropout_backward_matches_finite_differences_of_kernel():
    # Directional derivative of L = sum(R * out(qkv)) along a random D, taken
    # by central differences of the compiled forward itself (same seed, hence
    # the same mask). Float32 forward: with h = 1e-2 round-off (~1e-6 / h)
    # and truncation (~h^2) leave an error ~1.5e-5 of |dqkv|; we allow 2e-4.
    # (A backward that ignored the mask would be off by ~1e-2 of |dqkv|.)
    p, seed, NH = 0.2, 5, DROP_NH
    rng = np.random.default_rng(6)
    qkv = drop_qkv(7).astype(np.float64)
    R = rng.normal(size=(DROP_B, DROP_T, DROP_C))
    _, att = run_attention_forward(f32(qkv), NH, p, seed)
    dqkv = run_attention_backward(f32(R), f32(qkv), NH, p, seed).astype(np.float64)
    h = 1e-2
    for _ in range(3):
        D = rng.normal(size=qkv.shape)
        D /= np.linalg.norm(D)
        fp = np.sum(run_attention_forward(f32(qkv + h * D), NH, p, seed)[0] * R)
        fm = np.sum(run_attention_forward(f32(qkv - h * D), NH, p, seed)[0] * R)
        numeric = (fp - fm) / (2 * h)
        analytic = np.sum(dqkv * D)
        assert abs(analytic - numeric) <= 2e-4 * np.linalg.norm(dqkv), (analytic, numeric)


def test_attention_dropout_is_unbiased_over_seeds():
    # Inverted dropout keeps the expectation: averaged over S seeds the output
    # approaches the no-dropout output. With E[m] = 1 and Var[m] = p/(1-p),
    # out[t, j] has variance p/(1-p) * sum_s att[t,s]^2 v[s,j]^2, so the
    # standardised error z of the S-sample mean must look like N(0, 1).
    p, NH, S = 0.3, DROP_NH, 400
    qkv = drop_qkv(8)
    out0, att = run_attention_forward(qkv, NH)
    total = np.zeros(out0.shape)
    for seed in range(S):
        total += run_attention_forward(qkv, NH, p, 1000 + seed)[0]
    v = split_heads(qkv[..., 2 * DROP_C:].astype(np.float64), NH)
    var = merge_heads((att.astype(np.float64) ** 2) @ v ** 2) * p / (1 - p)
    z = (total / S - out0) / np.sqrt(var / S)
    assert np.abs(z).max() < 5.0
    assert 0.6 < np.mean(z ** 2) < 1.5      # a wrong 1/(1-p) scale biases every z


def test_attention_dropout_zero_is_no_dropout():
    qkv = drop_qkv(9)
    out, att = run_attention_forward(qkv, DROP_NH, 0.0, seed=123)
    out0, att0 = run_attention_forward(qkv, DROP_NH)
    np.testing.assert_array_equal(out, out0)
    np.testing.assert_array_equal(att, att0)


# ---------------------------------------------------------------- GELU

def gelu_inputs(n, seed):
    rng = np.random.default_rng(seed)
    special = [0.0, 1e-3, -1e-3, 1.0, -1.0, 3.5, -3.5, 8.0, -8.0, 20.0, -20.0, 100.0, -100.0]
    return f32(np.concatenate([rng.normal(0, 3, n), special]))


# GELU uses the fast exp on an argument 2y ~ 1.6 x^3 / 20 that is itself
# rounded to float32: in the far negative tail (x < -5) the value is tiny
# and only good to ~|2y| * 1e-7 relative, so the absolute floor is 1e-6 of
# the tensor's scale; near zero and positive it is good to ~1e-7 relative.
@pytest.mark.parametrize("n", [1, 100, 5000, 20000])
def test_gelu_forward(n):
    x = gelu_inputs(n, n)
    out = nans(x.shape)
    core.py_gelu_tanh_forward(out, x)
    expected = ref.gelu_forward(x)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert out[x == 0.0][0] == 0.0


@pytest.mark.parametrize("n", [1, 100, 5000, 20000])
def test_gelu_backward_written_and_in_place(n):
    x = gelu_inputs(n, n + 1)
    dout = f32(np.random.default_rng(n).normal(size=x.shape))
    expected = ref.gelu_backward(dout, x)
    dinp = nans(x.shape)
    core.py_gelu_tanh_backward(dinp, x, dout)
    np.testing.assert_allclose(dinp, expected, rtol=1e-5, atol=1e-6)
    # in place (dinp is dout), as the model uses it
    buf = dout.copy()
    core.py_gelu_tanh_backward(buf, x, buf)
    np.testing.assert_array_equal(buf, dinp)


# ---------------------------------------------------------------- GELU, exact form

# The exact form computes the normal CDF's tail directly (no 1 + erf
# cancellation), so it is held to float32 rounding of its own value: a few
# ulp, everywhere the result is a normal float (|x| < 11.8: below, x Phi(x)
# is under 1e-30 and the core's exp flushes it to 0, an absolute error that
# small). Measured: at most 6.7 ulp, median 0.34 (forward and backward).
EXACT_ULPS = 10


def exact_gelu_inputs(seed):
    rng = np.random.default_rng(seed)
    dense = np.linspace(-11.8, 11.8, 200_001)
    special = [0.0, -0.0, 1e-30, -1e-30, 0.7, -0.7, 0.69999, -0.70001, 5.0, -5.0]
    return f32(np.concatenate([np.clip(rng.normal(0, 3, 50_000), -11.8, 11.8), dense, special]))


def ulps(actual, expected, scale=None):
    scale = np.abs(expected) if scale is None else scale
    return np.abs(actual.astype(np.float64) - expected) / np.spacing(f32(scale)).astype(np.float64)


def test_gelu_exact_forward_to_float32_rounding():
    x = exact_gelu_inputs(0)
    out = nans(x.shape)
    core.py_gelu_exact_forward(out, x)
    assert ulps(out, ref.gelu_exact_forward(x)).max() <= EXACT_ULPS
    # the far tail: 0, or a value below 1e-30, never a sign flip or a NaN
    far = f32([-12.0, -20.0, -100.0, -3e38, 12.0, 100.0])
    out = nans(far.shape)
    core.py_gelu_exact_forward(out, far)
    np.testing.assert_allclose(out, ref.gelu_exact_forward(far), rtol=ULP, atol=1e-30)
    assert np.all(out[:4] <= 0.0)


def test_gelu_exact_backward_to_float32_rounding_and_in_place():
    x = exact_gelu_inputs(1)
    dout = np.ones_like(x)
    dinp = nans(x.shape)
    core.py_gelu_exact_backward(dinp, x, dout)
    want = ref.gelu_exact_backward(dout, x)
    # gelu' = Phi + x phi crosses 0 near x = -0.75: the error is measured
    # against the larger of its two terms there.
    scale = np.maximum(np.abs(want), ref.gelu_exact_forward(np.abs(x)) / np.maximum(np.abs(x), 1))
    assert ulps(dinp, want, scale).max() <= EXACT_ULPS
    g = f32(np.random.default_rng(2).normal(size=x.shape))
    expected = nans(x.shape)
    core.py_gelu_exact_backward(expected, x, g)
    buf = g.copy()
    core.py_gelu_exact_backward(buf, x, buf)
    np.testing.assert_array_equal(buf, expected)


def test_gelu_exact_is_not_the_tanh_form():
    # The two forms differ by up to ~5e-4 (near |x| = 2): a model built with
    # one must not silently run the other.
    x = f32(np.linspace(-4, 4, 801))
    exact, tanh = nans(x.shape), nans(x.shape)
    core.py_gelu_exact_forward(exact, x)
    core.py_gelu_tanh_forward(tanh, x)
    assert np.abs(exact - tanh).max() > 1e-4
    np.testing.assert_allclose(tanh, ref.gelu_forward(x), rtol=1e-5, atol=1e-6)


def test_gelu_exact_propagates_nan():
    x = f32([np.nan, 1.0, np.inf])
    out = nans(3)
    core.py_gelu_exact_forward(out, x)
    assert np.isnan(out[0]) and out[1] == pytest.approx(0.8413447, rel=1e-6) and out[2] == np.inf


# ---------------------------------------------------------------- residual

def test_residual_forward_and_backward():
    rng = np.random.default_rng(10)
    a, b = f32(rng.normal(size=1001)), f32(rng.normal(size=1001))
    out = nans(1001)
    core.py_residual_forward(out, a, b)
    np.testing.assert_array_equal(out, a + b)                 # written, exact float32 sum
    dout = f32(rng.normal(size=1001))
    da0, db0 = f32(rng.normal(size=1001)), f32(rng.normal(size=1001))
    da, db = da0.copy(), db0.copy()
    core.py_residual_backward(da, db, dout)
    np.testing.assert_array_equal(da, da0 + dout)             # both accumulate
    np.testing.assert_array_equal(db, db0 + dout)


# ---------------------------------------------------------------- dropout

def dropout_inputs(n, seed=0):
    # Values bounded away from 0, so a dropped (0) entry is never ambiguous.
    rng = np.random.default_rng(seed)
    return f32(rng.uniform(0.5, 2.0, n) * rng.choice([-1.0, 1.0], n))


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_dropout_forward_statistics_and_scale(p):
    n = 1_000_000
    x = dropout_inputs(n)
    out = dropout(x, p, seed=42)
    dropped = out == 0
    # binomial: the dropped fraction is p within 5 standard deviations
    assert abs(dropped.mean() - p) < 5 * math.sqrt(p * (1 - p) / n)
    # kept values are scaled by exactly 1/(1-p) (one float32 multiply)
    np.testing.assert_allclose(out[~dropped], x[~dropped] * keep_scale(p), rtol=ULP, atol=0)
    # neighbouring elements are independent: both dropped with probability p^2
    both = np.mean(dropped[1:] & dropped[:-1])
    assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / n) + 1e-3 * p


def test_dropout_seed_determines_mask():
    x = dropout_inputs(200_000, 1)
    p = 0.3
    a, b, c = dropout(x, p, 7), dropout(x, p, 7), dropout(x, p, 8)
    np.testing.assert_array_equal(a, b)                       # same seed, same mask
    ma, mc = a == 0, c == 0
    assert not np.array_equal(ma, mc)
    # a different seed gives an independent mask, not a shifted copy of it
    assert abs(np.mean(ma & mc) - p * p) < 0.01
    # counter-based: the mask of element i does not depend on the array length
    np.testing.assert_array_equal(dropout(x[:1000], p, 7) == 0, ma[:1000])
    # a 64-bit seed is used whole (seeds differing only in the high bits differ)
    assert not np.array_equal(dropout(x, p, 7 + 2**40) == 0, ma)


def test_dropout_backward_uses_the_forward_mask():
    n, p, seed = 100_000, 0.4, 1234
    x = dropout_inputs(n, 2)
    out = dropout(x, p, seed)
    dout = f32(np.random.default_rng(3).normal(size=n))
    dinp = nans(n)
    core.py_dropout_backward(dinp, dout, p, seed)
    kept = out != 0
    assert np.all(dinp[~kept] == 0)
    np.testing.assert_allclose(dinp[kept], dout[kept] * keep_scale(p), rtol=ULP, atol=0)
    # in place (out is inp) gives the same result
    buf = x.copy()
    core.py_dropout_forward(buf, buf, p, seed)
    np.testing.assert_array_equal(buf, out)


def test_dropout_p0_is_identity():
    x = dropout_inputs(10_001, 4)
    np.testing.assert_array_equal(dropout(x, 0.0, 5), x)
    dinp = nans(x.size)
    core.py_dropout_backward(dinp, x, 0.0, 5)
    np.testing.assert_array_equal(dinp, x)


# ---------------------------------------------------------------- cross-entropy

CE_SHAPES = [(1, 67), (37, 67), (300, 65), (5, 1), (4, 2)]


def ce_inputs(N, V, scale=3.0, seed=0):
    rng = np.random.default_rng(seed + N * V)
    return f32(rng.normal(0, scale, (N, V))), rng.integers(0, V, N)


def lse64(logits):
    z = np.asarray(logits, np.float64)
    mx = z.max(axis=1)
    return mx + np.log(np.exp(z - mx[:, None]).sum(axis=1))


@pytest.mark.parametrize("scale", [3.0, 30.0])
@pytest.mark.parametrize("N,V", CE_SHAPES)
def test_crossentropy_forward(N, V, scale):
    logits, targets = ce_inputs(N, V, scale)
    losses, lse = run_crossentropy_forward(logits, targets)
    r_lse = lse64(logits)
    r_losses = r_lse - logits[np.arange(N), targets]
    # lse is good to ~1e-7 relative; a loss is a difference lse - logit, so its
    # error is relative to the size of lse, not of the (possibly tiny) loss
    np.testing.assert_allclose(lse, r_lse, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(losses, r_losses, rtol=0, atol=1e-6 * max(1.0, np.abs(r_lse).max()))
    # and the mean equals the reference's mean cross-entropy
    r_mean, _ = ref.crossentropy_forward(logits, targets)
    assert abs(losses.astype(np.float64).mean() - r_mean) <= 1e-6 * max(1.0, np.abs(r_lse).max())
    if V == 1:
        assert np.all(losses == 0.0)


@pytest.mark.parametrize("scale", [3.0, 30.0])
@pytest.mark.parametrize("N,V", CE_SHAPES)
def test_crossentropy_backward(N, V, scale):
    logits, targets = ce_inputs(N, V, scale, seed=1)
    _, lse = run_crossentropy_forward(logits, targets)
    _, probs = ref.crossentropy_forward(logits, targets)
    mean_grad = ref.crossentropy_backward(probs, targets)   # (probs - onehot) / N
    for dloss in (1.0 / N, 0.37):
        dlogits = run_crossentropy_backward(logits, lse, targets, dloss)   # written
        # probabilities carry the fast exp's ~2e-7 plus lse's rounding (~1e-7 * |lse|)
        assert_close(dlogits, mean_grad * N * dloss, 1e-5)
        # each row sums to 0 (softmax sums to 1, minus the one-hot)
        np.testing.assert_allclose(dlogits.sum(axis=1), 0, atol=1e-5 * dloss * max(1, V))


# ---------------------------------------------------------------- sum of squares

@pytest.mark.parametrize("n", [0, 1, 8191, 8193, 100_000])
def test_sum_of_squares(n):
    x = f32(np.random.default_rng(n).normal(size=n))
    # double accumulation of float32 values: agrees with numpy float64 to
    # ~n * 1e-16 relative
    expected = float(np.sum(x.astype(np.float64) ** 2))
    got = core.py_sum_of_squares(x)
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-12, abs=0)


def test_sum_of_squares_beyond_the_chunk_table(threads):
    # More than 1024 chunks of 8192 takes the sequential fallback path.
    n = 8192 * 1024 + 5
    x = f32(np.random.default_rng(0).uniform(-1, 1, n))
    expected = float(np.dot(x.astype(np.float64), x.astype(np.float64)))
    threads(2)
    two = core.py_sum_of_squares(x)
    threads(1)
    one = core.py_sum_of_squares(x)
    assert two == pytest.approx(expected, rel=1e-10)
    assert one == two


# ---------------------------------------------------------------- AdamW

def test_adamw_matches_reference_with_decay_split_and_grad_scale():
    rng = np.random.default_rng(11)
    n, n_decay = 1000, 600
    lr, beta1, beta2, eps, wd, grad_scale = 1e-2, 0.9, 0.95, 1e-8, 0.1, 0.5
    params = f32(rng.normal(size=n))
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    r_p, r_m, r_v = params.astype(np.float64), np.zeros(n), np.zeros(n)
    decay = np.arange(n) < n_decay
    for step in range(1, 6):
        grads = rng.normal(size=n)
        grads[::7] *= 1e-7      # here sqrt(v) ~ eps: eps's placement matters
        grads = f32(grads)
        core.py_adamw_update(params, m, v, grads, n_decay, lr, beta1, beta2, eps, wd,
                             grad_scale, step)
        g = grads.astype(np.float64) * grad_scale
        out_d = ref.adamw_step(r_p[decay], g[decay], r_m[decay], r_v[decay], step,
                               lr, beta1, beta2, eps, wd)
        out_n = ref.adamw_step(r_p[~decay], g[~decay], r_m[~decay], r_v[~decay], step,
                               lr, beta1, beta2, eps, 0.0)
        for arr, i in ((r_p, 0), (r_m, 1), (r_v, 2)):
            arr[decay], arr[~decay] = out_d[i], out_n[i]
        # Over 5 steps the float32 state drifts by a few ulps; the weight decay
        # alone moves a parameter by lr * wd * |p| ~ 1e-3, and grad_scale
        # changes m by 2x and v by 4x, so these bounds see any mix-up.
        np.testing.assert_allclose(params, r_p, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(m, r_m, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(v, r_v, rtol=1e-5, atol=1e-8)


def test_adamw_rejects_bad_arguments():
    a = np.zeros(10, np.float32)
    hyper = (1e-3, 0.9, 0.95, 1e-8, 0.1, 1.0)   # lr, beta1, beta2, eps, weight_decay, grad_scale
    with pytest.raises(ValueError, match="n_decay"):
        core.py_adamw_update(a, a.copy(), a.copy(), a.copy(), 11, *hyper, 1)
    with pytest.raises(ValueError, match="step"):
        core.py_adamw_update(a, a.copy(), a.copy(), a.copy(), 5, *hyper, 0)
    with pytest.raises(ValueError, match="expected 10"):
        core.py_adamw_update(a, a.copy(), a.copy(), np.zeros(9, np.float32), 5, *hyper, 1)


# ---------------------------------------------------------------- Buffer

@pytest.mark.parametrize("n", [0, 1, 17, 1000, 123_457])
def test_buffer_aligned_zeroed_zero_copy(n):
    buf = core.Buffer(n)
    assert buf.address() % 64 == 0
    view = np.asarray(buf)
    assert view.dtype == np.float32 and view.shape == (n,) and view.flags.writeable
    assert np.all(view == 0)
    if n:
        assert view.ctypes.data == buf.address()           # no copy: the same memory
        view[0] = -1.25
        view[-1] = 3.5
        second = np.asarray(buf)
        assert second[-1] == 3.5 and second[0] == (-1.25 if n > 1 else 3.5)


def test_buffer_view_keeps_memory_alive():
    buf = core.Buffer(1000)
    view = np.asarray(buf)
    view[:] = np.arange(1000)
    del buf
    others = [core.Buffer(1000) for _ in range(10)]          # reuse freed memory, if any
    for o in others:
        np.asarray(o)[:] = -1
    np.testing.assert_array_equal(view, np.arange(1000))


def test_buffer_rejects_negative_size():
    with pytest.raises(ValueError):
        core.Buffer(-1)


# ---------------------------------------------------------------- threads

def test_set_num_threads(threads):
    threads(1)
    assert core.get_num_threads() == 1
    threads(2)
    assert core.get_num_threads() == 2
    with pytest.raises(ValueError):
        core.set_num_threads(0)


def _thread_cases():
    """name -> (function returning the kernel's outputs, bitwise?). Sizes are
    large enough that every parallel loop is actually split over 2 threads."""
    rng = np.random.default_rng(12)
    N, C, V, B, T, NH = 300, 48, 67, 3, 100, 3
    x, w, b = ln_inputs(rng, N, C)
    dout = f32(rng.normal(size=(N, C)))
    idx = rng.integers(0, V, (B, T))
    wte, wpe = f32(rng.normal(size=(V, C))), f32(rng.normal(size=(T, C)))
    mw, mb = f32(rng.normal(size=(200, C))), f32(rng.normal(size=200))
    mdout = f32(rng.normal(size=(N, 200)))
    qkv = f32(rng.normal(size=(B, T, 3 * C)))
    adout = f32(rng.normal(size=(B, T, C)))
    logits, targets = ce_inputs(N, V)
    big = f32(rng.normal(size=50_000))
    big2 = f32(rng.normal(size=50_000))

    def encoder():
        dwte, dwpe = np.ones((V, C), np.float32), np.ones((T, C), np.float32)
        run_encoder_backward(dwte, dwpe, f32(rng_fixed(1).normal(size=(B, T, C))), idx)
        return run_encoder_forward(idx, wte, wpe), dwte, dwpe

    def layernorm():
        out, mean, rstd = run_layernorm_forward(x, w, b)
        dx, dw, db = np.ones((N, C), np.float32), np.ones(C, np.float32), np.ones(C, np.float32)
        run_layernorm_backward(dx, dw, db, dout, x, w, mean, rstd)
        return out, mean, rstd, dx, dw, db

    def matmul():
        out = run_matmul_forward(x, mw, mb)
        dx, dw, db = nans((N, C)), np.ones((200, C), np.float32), np.ones(200, np.float32)
        run_matmul_backward(dx, dw, db, mdout, x, mw)
        return out, dx, dw, db

    def attention(p=0.0):
        out, att = run_attention_forward(qkv, NH, p, 3)
        return out, att, run_attention_backward(adout, qkv, NH, p, 3)

    def gelu():
        out, dinp = nans(big.size), nans(big.size)
        core.py_gelu_tanh_forward(out, big)
        core.py_gelu_tanh_backward(dinp, big, big2)
        return out, dinp

    def residual():
        out, da, db = nans(big.size), np.ones(big.size, np.float32), np.ones(big.size, np.float32)
        core.py_residual_forward(out, big, big2)
        core.py_residual_backward(da, db, big2)
        return out, da, db

    def dropout_():
        dinp = nans(big.size)
        core.py_dropout_backward(dinp, big2, 0.3, 9)
        return dropout(big, 0.3, 9), dinp

    def crossentropy():
        losses, lse = run_crossentropy_forward(logits, targets)
        return losses, lse, run_crossentropy_backward(logits, lse, targets, 1.0 / N)

    def sum_of_squares():
        return (np.array([core.py_sum_of_squares(big)]),)

    def adamw():
        p, m, v = big.copy(), np.zeros_like(big), np.zeros_like(big)
        for step in (1, 2):
            core.py_adamw_update(p, m, v, big2, 20_000, 1e-3, 0.9, 0.95, 1e-8, 0.1, 0.7, step)
        return p, m, v

    return {
        "encoder": (encoder, True), "layernorm": (layernorm, True),
        # sgemm on a thread's slice of rows may round differently from sgemm on
        # the whole matrix (OpenBLAS picks kernels by shape), so matmul is
        # compared to 2e-6 of each output's scale instead of bitwise.
        "matmul": (matmul, False),
        "attention": (attention, True),
        "attention_dropout": (lambda: attention(0.2), True),
        "gelu": (gelu, True), "residual": (residual, True), "dropout": (dropout_, True),
        "crossentropy": (crossentropy, True), "sum_of_squares": (sum_of_squares, True),
        "adamw": (adamw, True),
    }


def rng_fixed(seed):
    return np.random.default_rng(seed)


@pytest.mark.parametrize("name", sorted(_thread_cases()))
def test_one_and_two_threads_agree(name, threads):
    fn, bitwise = _thread_cases()[name]
    threads(1)
    one = fn()
    threads(2)
    two = fn()
    for a, b in zip(one, two):
        assert not np.isnan(a).any()
        if bitwise:
            np.testing.assert_array_equal(a, b)
        else:
            assert_close(b, a, 2e-6)


# ---------------------------------------------------------------- argument checks

def _bad_calls():
    """(description, call, substring of the message). Each call has exactly one
    wrong argument; everything else is sized right."""
    z = lambda *s: np.zeros(int(np.prod(s)), np.float32)  # noqa: E731
    ids = lambda *vals: np.array(vals, np.int32)            # noqa: E731
    B, T, C, V, N, NH = 1, 2, 4, 3, 2, 2
    return [
        ("encoder out length", lambda: core.py_encoder_forward(z(7), ids(0, 1), z(V, C), z(T, C), B, T, C), "expected"),
        ("encoder id too big", lambda: core.py_encoder_forward(z(B, T, C), ids(0, V), z(V, C), z(T, C), B, T, C), "outside"),
        ("encoder id negative", lambda: core.py_encoder_forward(z(B, T, C), ids(-1, 0), z(V, C), z(T, C), B, T, C), "outside"),
        ("encoder idx length", lambda: core.py_encoder_forward(z(B, T, C), ids(0), z(V, C), z(T, C), B, T, C), "expected"),
        ("encoder wpe too short", lambda: core.py_encoder_forward(z(B, T, C), ids(0, 1), z(V, C), z(1, C), B, T, C), "wpe"),
        ("encoder_backward id too big", lambda: core.py_encoder_backward(z(V, C), z(T, C), z(B, T, C), ids(0, V), B, T, C), "outside"),
        ("encoder_backward id negative", lambda: core.py_encoder_backward(z(V, C), z(T, C), z(B, T, C), ids(-5, 0), B, T, C), "outside"),
        ("encoder_backward dout length", lambda: core.py_encoder_backward(z(V, C), z(T, C), z(B, T, C + 1), ids(0, 1), B, T, C), "expected"),
        ("encoder zero size", lambda: core.py_encoder_forward(z(B, T, C), ids(0, 1), z(V, C), z(T, C), 0, T, C), "positive"),
        ("layernorm rstd length", lambda: core.py_layernorm_forward(z(N, C), z(N), z(N + 1), z(N, C), z(C), z(C), N, C), "rstd"),
        ("layernorm bias length", lambda: core.py_layernorm_forward(z(N, C), z(N), z(N), z(N, C), z(C), z(C - 1), N, C), "bias"),
        ("layernorm_backward dweight length", lambda: core.py_layernorm_backward(z(N, C), z(C + 1), z(C), z(N, C), z(N, C), z(C), z(N), z(N), N, C), "dweight"),
        ("layernorm negative N", lambda: core.py_layernorm_forward(z(N, C), z(N), z(N), z(N, C), z(C), z(C), -1, C), "positive"),
        ("matmul weight length", lambda: core.py_matmul_forward(z(N, 5), z(N, C), z(5, C + 1), None, N, C, 5), "weight"),
        ("matmul bias length", lambda: core.py_matmul_forward(z(N, 5), z(N, C), z(5, C), z(4), N, C, 5), "bias"),
        ("matmul_backward dinp length", lambda: core.py_matmul_backward(z(N, C - 1), z(5, C), None, z(N, 5), z(N, C), z(5, C), N, C, 5), "dinp"),
        ("matmul_backward dbias length", lambda: core.py_matmul_backward(z(N, C), z(5, C), z(6), z(N, 5), z(N, C), z(5, C), N, C, 5), "dbias"),
        ("attention att length", lambda: core.py_attention_forward(z(B, T, C), z(B, NH, T, T + 1), z(B, T, 3 * C), B, T, C, NH), "att"),
        ("attention C % NH", lambda: core.py_attention_forward(z(B, T, C), z(B, 3, T, T), z(B, T, 3 * C), B, T, C, 3), "divisible"),
        ("attention p = 1", lambda: core.py_attention_forward(z(B, T, C), z(B, NH, T, T), z(B, T, 3 * C), B, T, C, NH, 1.0), "dropout"),
        ("attention_backward qkv length", lambda: core.py_attention_backward(z(B, T, 3 * C), z(B, T, C), z(B, T, 3 * C - 1), B, T, C, NH), "qkv"),
        ("gelu out length", lambda: core.py_gelu_tanh_forward(z(3), z(4)), "expected"),
        ("gelu_backward dout length", lambda: core.py_gelu_tanh_backward(z(4), z(4), z(5)), "dout"),
        ("residual b length", lambda: core.py_residual_forward(z(4), z(4), z(3)), "expected"),
        ("residual_backward db length", lambda: core.py_residual_backward(z(4), z(5), z(4)), "db"),
        ("dropout p negative", lambda: core.py_dropout_forward(z(4), z(4), -0.1, 0), "dropout"),
        ("dropout p = 1", lambda: core.py_dropout_forward(z(4), z(4), 1.0, 0), "dropout"),
        ("dropout out length", lambda: core.py_dropout_forward(z(3), z(4), 0.5, 0), "expected"),
        ("dropout_backward p", lambda: core.py_dropout_backward(z(4), z(4), 1.5, 0), "dropout"),
        ("crossentropy target too big", lambda: core.py_crossentropy_forward(z(N), z(N), z(N, V), ids(0, V), N, V), "outside"),
        ("crossentropy target negative", lambda: core.py_crossentropy_forward(z(N), z(N), z(N, V), ids(-1, 0), N, V), "outside"),
        ("crossentropy logits length", lambda: core.py_crossentropy_forward(z(N), z(N), z(N, V + 1), ids(0, 1), N, V), "logits"),
        ("crossentropy_backward target too big", lambda: core.py_crossentropy_backward(z(N, V), z(N, V), z(N), ids(V, 0), 0.5, N, V), "outside"),
        ("crossentropy_backward lse length", lambda: core.py_crossentropy_backward(z(N, V), z(N, V), z(N + 1), ids(0, 0), 0.5, N, V), "lse"),
    ]


@pytest.mark.parametrize("what,call,word", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_wrappers_reject_bad_arguments(what, call, word):
    with pytest.raises(ValueError, match=word):
        call()


def test_rejected_call_writes_nothing():
    # The ids are checked before the kernel runs: nothing is half-written.
    out = np.full(8, 7.0, np.float32)
    with pytest.raises(ValueError):
        core.py_encoder_forward(out, np.array([0, 9], np.int32), np.ones(12, np.float32),
                                np.ones(8, np.float32), 1, 2, 4)
    np.testing.assert_array_equal(out, 7.0)
    dwte = np.zeros(12, np.float32)
    with pytest.raises(ValueError):
        core.py_encoder_backward(dwte, np.zeros(8, np.float32), np.ones(8, np.float32),
                                 np.array([1, -1], np.int32), 1, 2, 4)
    np.testing.assert_array_equal(dwte, 0.0)


def test_wrappers_reject_wrong_dtype():
    # float64 or non-contiguous arrays cannot be viewed as float[::1]
    with pytest.raises((ValueError, TypeError)):
        core.py_gelu_tanh_forward(np.zeros(4), np.zeros(4))
    with pytest.raises((ValueError, TypeError)):
        core.py_gelu_tanh_forward(np.zeros(4, np.float32), np.zeros(8, np.float32)[::2])


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_attention_backward_from_kept_probabilities_equals_recomputed(p):
    # The graph keeps the probabilities for small models and recomputes them for
    # large ones: both paths must give the same gradient, bit for bit (the same
    # sgemm computes the probabilities either way).
    NH = DROP_NH
    qkv = drop_qkv(11)
    out, att = run_attention_forward(qkv, NH, p, 9)
    dout = f32(np.random.default_rng(12).normal(size=out.shape))
    recomputed = run_attention_backward(dout, qkv, NH, p, 9)
    B, T, C3 = qkv.shape
    kept = nans(qkv.shape)
    core.py_attention_backward(kept.ravel(), dout.ravel(), qkv.ravel(), B, T, C3 // 3, NH,
                               p, 9, att.ravel())
    np.testing.assert_array_equal(kept, recomputed)
    # A wrong kept array changes the result: the kept path really reads it.
    wrong = nans(qkv.shape)
    core.py_attention_backward(wrong.ravel(), dout.ravel(), qkv.ravel(), B, T, C3 // 3, NH,
                               p, 9, np.zeros_like(att).ravel())
    assert not np.allclose(wrong, recomputed)
