"""Tests that the numpy reference (tests/reference.py) is itself right.

Backward passes are checked against central finite differences in float64;
forward passes against facts with known exact values.
"""
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402

FD_EPS = 1e-6
# Central differences in float64 with eps=1e-6 are accurate to ~1e-9 here
# (truncation ~eps^2, round-off ~1e-16 * |loss| / eps), so these bounds leave
# room for noise while still catching a gradient that is off by 1e-4 relative.
RTOL = 1e-6
ATOL = 1e-8


# ---------------------------------------------------------------- helpers

def numerical_grad(f, x, indices=None, eps=FD_EPS):
    """Central-difference gradient of the scalar f() w.r.t. array x (which f
    reads and which is perturbed in place and restored). Returns the full
    gradient, or only the listed entries if `indices` is given."""
    full = indices is None
    if full:
        indices = list(np.ndindex(x.shape))
    out = []
    for i in indices:
        saved = x[i]
        x[i] = saved + eps
        fp = f()
        x[i] = saved - eps
        fm = f()
        x[i] = saved
        out.append((fp - fm) / (2 * eps))
    out = np.array(out)
    return out.reshape(x.shape) if full else out


def assert_grad_close(analytic, numeric, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(analytic, numeric, rtol=rtol, atol=atol)


def random_entries(rng, shape, n):
    flat = rng.choice(int(np.prod(shape)), size=min(n, int(np.prod(shape))), replace=False)
    return [np.unravel_index(int(j), shape) for j in flat]


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ---------------------------------------------------------------- kernel gradients
# For a kernel y = f(x) we use the scalar loss L = sum(y * R) with a fixed
# random R, so dL/dy = R and backward(R) must equal the numerical dL/dx.

def test_layernorm_backward(rng):
    x = rng.normal(0, 1.5, (2, 3, 5)) + 0.7
    w = 1 + rng.normal(0, 0.3, 5)
    b = rng.normal(0, 0.3, 5)
    R = rng.normal(size=(2, 3, 5))
    f = lambda: np.sum(ref.layernorm_forward(x, w, b)[0] * R)
    _, cache = ref.layernorm_forward(x, w, b)
    dx, dw, db = ref.layernorm_backward(R, cache)
    assert_grad_close(dx, numerical_grad(f, x))
    assert_grad_close(dw, numerical_grad(f, w))
    assert_grad_close(db, numerical_grad(f, b))


def test_linear_backward(rng):
    x = rng.normal(size=(2, 3, 4))
    w = rng.normal(size=(5, 4))
    b = rng.normal(size=5)
    R = rng.normal(size=(2, 3, 5))
    f = lambda: np.sum(ref.linear_forward(x, w, b) * R)
    dx, dw, db = ref.linear_backward(R, x, w)
    assert dx.shape == x.shape and dw.shape == w.shape and db.shape == b.shape
    assert_grad_close(dx, numerical_grad(f, x))
    assert_grad_close(dw, numerical_grad(f, w))
    assert_grad_close(db, numerical_grad(f, b))


def test_linear_without_bias_and_2d(rng):
    x = rng.normal(size=(3, 4))
    w = rng.normal(size=(5, 4))
    np.testing.assert_allclose(ref.linear_forward(x, w), x @ w.T)
    np.testing.assert_allclose(ref.linear_forward(x, w, np.ones(5)), x @ w.T + 1)
    R = rng.normal(size=(3, 5))
    f = lambda: np.sum(ref.linear_forward(x, w) * R)
    dx, dw, _ = ref.linear_backward(R, x, w)
    assert_grad_close(dx, numerical_grad(f, x))
    assert_grad_close(dw, numerical_grad(f, w))


@pytest.mark.parametrize("B,T,H,C", [(2, 4, 2, 6), (1, 5, 1, 4), (2, 1, 3, 6), (1, 3, 3, 3)])
def test_attention_backward(rng, B, T, H, C):
    qkv = rng.normal(0, 1.0, (B, T, 3 * C))
    R = rng.normal(size=(B, T, C))
    f = lambda: np.sum(ref.attention_forward(qkv, H)[0] * R)
    _, att = ref.attention_forward(qkv, H)
    dqkv = ref.attention_backward(R, qkv, att, H)
    assert dqkv.shape == qkv.shape
    assert_grad_close(dqkv, numerical_grad(f, qkv))


def test_gelu_backward(rng):
    x = np.concatenate([rng.normal(0, 2, 20), [0.0, 1.0, -1.0, 3.5, -3.5, 8.0, -8.0]])
    R = rng.normal(size=x.shape)
    f = lambda: np.sum(ref.gelu_forward(x) * R)
    assert_grad_close(ref.gelu_backward(R, x), numerical_grad(f, x))


def test_gelu_exact_backward(rng):
    x = np.concatenate([rng.normal(0, 2, 20), [0.0, 1.0, -1.0, 3.5, -3.5, 8.0, -8.0]])
    R = rng.normal(size=x.shape)
    f = lambda: np.sum(ref.gelu_exact_forward(x) * R)
    assert_grad_close(ref.gelu_exact_backward(R, x), numerical_grad(f, x))


def test_gelu_exact_hand_values():
    # Phi(1) = 0.841344746068543, Phi(-3) = 0.001349898031630095 (tables of the
    # normal distribution); the tanh form differs from both in the 4th digit.
    got = ref.gelu_exact_forward(np.array([1.0, -3.0, 0.0]))
    np.testing.assert_allclose(got, [0.841344746068543, -3 * 0.001349898031630095, 0.0],
                               rtol=1e-14)
    assert abs(ref.gelu_forward(np.array([-3.0]))[0] - got[1]) > 1e-4


@pytest.mark.parametrize("shape", [(2, 3, 7), (5, 4), (1, 1, 3)])
def test_crossentropy_backward(rng, shape):
    logits = rng.normal(0, 2, shape)
    targets = rng.integers(0, shape[-1], shape[:-1])
    f = lambda: ref.crossentropy_forward(logits, targets)[0]
    _, probs = ref.crossentropy_forward(logits, targets)
    dlogits = ref.crossentropy_backward(probs, targets)
    assert dlogits.shape == logits.shape
    assert_grad_close(dlogits, numerical_grad(f, logits))


def test_embedding_backward(rng):
    V, block, C, B, T = 5, 6, 3, 2, 4
    wte = rng.normal(size=(V, C))
    wpe = rng.normal(size=(block, C))
    idx = np.array([[1, 3, 1, 1], [0, 3, 2, 1]])  # repeated tokens; token 4 unused
    R = rng.normal(size=(B, T, C))
    f = lambda: np.sum(ref.embedding_forward(idx, wte, wpe) * R)
    dwte, dwpe = ref.embedding_backward(R, idx, V, block)
    assert dwte.shape == (V, C) and dwpe.shape == (block, C)
    assert_grad_close(dwte, numerical_grad(f, wte))
    assert_grad_close(dwpe, numerical_grad(f, wpe))
    assert np.all(dwte[4] == 0) and np.all(dwpe[T:] == 0)


# ---------------------------------------------------------------- the checker can fail
# If the finite-difference check could not tell a wrong gradient from a right
# one, every test above would be worthless. Feed it plausible wrong answers.

def test_checker_rejects_wrong_gradients(rng):
    x = rng.normal(0, 1.5, 10)
    R = rng.normal(size=10)
    num = numerical_grad(lambda: np.sum(ref.gelu_forward(x) * R), x)
    right = ref.gelu_backward(R, x)
    assert_grad_close(right, num)
    with pytest.raises(AssertionError):
        assert_grad_close(right * (1 + 1e-4), num)  # tiny relative error
    # a classic slip: forgetting the chain rule through the cubic term
    u = ref.GELU_SCALE * (x + ref.GELU_CUBIC * x ** 3)
    wrong = R * (0.5 * (1 + np.tanh(u)) + 0.5 * x * (1 - np.tanh(u) ** 2) * ref.GELU_SCALE)
    with pytest.raises(AssertionError):
        assert_grad_close(wrong, num)

    # attention: dropping the "- sum(att * datt)" term of the softmax backward
    B, T, H, C = 1, 4, 2, 4
    qkv = rng.normal(size=(B, T, 3 * C))
    R = rng.normal(size=(B, T, C))
    num = numerical_grad(lambda: np.sum(ref.attention_forward(qkv, H)[0] * R), qkv)
    out, att = ref.attention_forward(qkv, H)
    q, k, v = (ref._split_heads(a, H) for a in np.split(qkv, 3, axis=-1))
    dy = ref._split_heads(R, H)
    dscores_wrong = att * (dy @ v.transpose(0, 1, 3, 2)) / math.sqrt(C // H)
    dq_wrong = ref._merge_heads(dscores_wrong @ k)
    with pytest.raises(AssertionError):
        assert_grad_close(dq_wrong, num[..., :C])


# ---------------------------------------------------------------- whole model gradients

def _check_model_grads(V, block, L, H, C, B, T, seed, per_tensor=5, bias=True, gelu="tanh"):
    rng = np.random.default_rng(seed)
    params = ref.init_params(V, block, L, H, C, rng, bias=bias)
    idx = rng.integers(0, V, (B, T))
    targets = rng.integers(0, V, (B, T))
    _, loss, cache = ref.gpt_forward(params, idx, targets, n_head=H, gelu=gelu)
    grads = ref.gpt_backward(params, cache, n_head=H)

    expected = ref.param_shapes(V, block, L, C, bias)
    assert list(grads) == list(expected)
    assert {k: g.shape for k, g in grads.items()} == expected

    f = lambda: ref.gpt_forward(params, idx, targets, n_head=H, gelu=gelu)[1]
    for name, p in params.items():
        entries = random_entries(rng, p.shape, per_tensor)
        if name == "transformer.wte.weight":
            entries += [(int(idx[0, 0]), 0)]  # a used token, for sure
        num = numerical_grad(f, p, entries)
        ana = np.array([grads[name][e] for e in entries])
        np.testing.assert_allclose(ana, num, rtol=RTOL, atol=ATOL, err_msg=name)
    return params, idx, grads


def test_model_grads_tiny():
    _check_model_grads(V=7, block=5, L=2, H=2, C=6, B=2, T=4, seed=0)


@pytest.mark.parametrize("bias,gelu", [(False, "exact"), (False, "tanh"), (True, "exact")])
def test_model_grads_nanogpt_variants(bias, gelu):
    params, _, grads = _check_model_grads(V=7, block=5, L=2, H=2, C=6, B=2, T=4, seed=7,
                                          bias=bias, gelu=gelu)
    assert any(k.endswith(".bias") for k in params) == bias


def test_no_bias_model_is_the_biased_model_with_zero_biases(rng):
    V, block, L, H, C = 7, 5, 2, 2, 6
    params = ref.init_params(V, block, L, H, C, rng)
    zeroed = {k: (np.zeros_like(v) if k.endswith(".bias") else v) for k, v in params.items()}
    bare = {k: v for k, v in params.items() if not k.endswith(".bias")}
    idx, tgt = rng.integers(0, V, (2, 4)), rng.integers(0, V, (2, 4))
    for gelu in ("tanh", "exact"):
        logits0, loss0, cache0 = ref.gpt_forward(zeroed, idx, tgt, n_head=H, gelu=gelu)
        logits1, loss1, cache1 = ref.gpt_forward(bare, idx, tgt, n_head=H, gelu=gelu)
        np.testing.assert_array_equal(logits0, logits1)
        g0 = ref.gpt_backward(zeroed, cache0, n_head=H)
        g1 = ref.gpt_backward(bare, cache1, n_head=H)
        assert set(g1) == set(bare)
        for name in g1:
            np.testing.assert_array_equal(g0[name], g1[name])


def test_model_grads_full_block():
    _check_model_grads(V=7, block=5, L=2, H=2, C=6, B=2, T=5, seed=1)


def test_model_grads_single_token():
    params, idx, grads = _check_model_grads(V=7, block=5, L=2, H=2, C=6, B=3, T=1, seed=2)
    assert np.all(grads["transformer.wpe.weight"][1:] == 0)


def test_model_grads_one_layer_three_heads():
    _check_model_grads(V=11, block=6, L=1, H=3, C=9, B=1, T=6, seed=3, per_tensor=8)


def test_model_grads_whole_small_tensors():
    # every entry of every tensor, on a very small model
    _check_model_grads(V=3, block=3, L=1, H=1, C=2, B=2, T=3, seed=4, per_tensor=10_000)


def test_wte_grad_includes_both_uses():
    # If lm_head were not tied, the gradient of an unused token's embedding
    # row would be zero; tied, it is not (it still gets a softmax gradient).
    rng = np.random.default_rng(5)
    params = ref.init_params(7, 5, 1, 2, 6, rng)
    idx = np.array([[0, 1, 2, 0]])
    _, _, cache = ref.gpt_forward(params, idx, np.array([[1, 2, 0, 1]]), n_head=2)
    g = ref.gpt_backward(params, cache, n_head=2)["transformer.wte.weight"]
    assert np.all(np.abs(g[6]) > 0)


def test_lm_head_alias_ignored():
    rng = np.random.default_rng(6)
    params = ref.init_params(7, 5, 2, 2, 6, rng)
    idx = rng.integers(0, 7, (2, 4))
    tgt = rng.integers(0, 7, (2, 4))
    logits, loss, cache = ref.gpt_forward(params, idx, tgt, n_head=2)
    grads = ref.gpt_backward(params, cache, n_head=2)
    aliased = dict(params, **{"lm_head.weight": rng.normal(size=(7, 6))})
    logits2, loss2, cache2 = ref.gpt_forward(aliased, idx, tgt, n_head=2)
    grads2 = ref.gpt_backward(aliased, cache2, n_head=2)
    np.testing.assert_array_equal(logits, logits2)
    assert loss == loss2 and "lm_head.weight" not in grads2
    for k in grads:
        np.testing.assert_array_equal(grads[k], grads2[k])


# ---------------------------------------------------------------- forward facts

def test_gelu_values():
    assert ref.gelu_forward(0.0) == 0.0
    assert abs(ref.gelu_forward(1.0) - 0.8411919906) < 1e-9
    assert abs(ref.gelu_forward(-1.0) - (0.8411919906 - 1.0)) < 1e-9  # gelu(x)-gelu(-x)=x
    np.testing.assert_allclose(ref.gelu_forward([10.0, -10.0]), [10.0, 0.0], atol=1e-12)


def test_layernorm_statistics(rng):
    x = rng.normal(3.0, 2.0, (4, 5, 16))
    out, cache = ref.layernorm_forward(x, np.ones(16), np.zeros(16))
    var_in = x.var(axis=-1)
    np.testing.assert_allclose(out.mean(axis=-1), 0, atol=1e-12)
    # biased variance of the output is var / (var + eps), i.e. ~1
    np.testing.assert_allclose(out.var(axis=-1), var_in / (var_in + 1e-5), rtol=1e-12)
    np.testing.assert_allclose(out.var(axis=-1), 1, atol=1e-5)
    np.testing.assert_allclose(cache["mean"], x.mean(axis=-1), rtol=1e-12)
    np.testing.assert_allclose(cache["rstd"], 1 / np.sqrt(var_in + 1e-5), rtol=1e-12)
    assert cache["mean"].shape == cache["rstd"].shape == (4, 5)


def test_layernorm_hand_values():
    # row [1, 3]: mean 2, biased var 1, so xhat = [-1, 1] / sqrt(1 + 1e-5)
    out, cache = ref.layernorm_forward([[1.0, 3.0], [5.0, 5.0]], [2.0, 1.0], [0.5, -0.5])
    s = 1 / math.sqrt(1 + 1e-5)
    np.testing.assert_allclose(out[0], [-2 * s + 0.5, s - 0.5], rtol=1e-14)
    np.testing.assert_allclose(out[1], [0.5, -0.5])  # constant row -> bias
    np.testing.assert_allclose(cache["rstd"], [s, 1 / math.sqrt(1e-5)])


def test_attention_probabilities(rng):
    B, T, H, C = 3, 6, 2, 8
    qkv = rng.normal(0, 2, (B, T, 3 * C))
    out, att = ref.attention_forward(qkv, H)
    assert out.shape == (B, T, C) and att.shape == (B, H, T, T)
    np.testing.assert_allclose(att.sum(axis=-1), 1, rtol=1e-14)
    future = np.triu(np.ones((T, T), dtype=bool), k=1)  # s > t
    assert np.all(att[..., future] == 0)
    assert np.all(att[..., ~future] > 0)
    # position 0 can only look at itself: its output is its own v
    np.testing.assert_allclose(out[:, 0], qkv[:, 0, 2 * C:], rtol=1e-14)


def test_attention_uniform_when_q_is_zero(rng):
    # q = 0 makes every score 0, so position t averages v over 0..t.
    # This also pins the q, k, v order inside qkv.
    B, T, H, C = 2, 5, 2, 4
    qkv = rng.normal(size=(B, T, 3 * C))
    qkv[..., :C] = 0
    out, att = ref.attention_forward(qkv, H)
    v = qkv[..., 2 * C:]
    expected = np.cumsum(v, axis=1) / np.arange(1, T + 1)[None, :, None]
    np.testing.assert_allclose(out, expected, rtol=1e-13)


def test_attention_matches_explicit_loops(rng):
    # A plain per-(batch, head, t) loop, written independently of the
    # vectorised code, pinning head order and the 1/sqrt(hs) scale.
    B, T, H, C = 2, 4, 2, 6
    hs = C // H
    qkv = rng.normal(size=(B, T, 3 * C))
    out, att = ref.attention_forward(qkv, H)
    for b in range(B):
        for h in range(H):
            cols = slice(h * hs, (h + 1) * hs)
            q = qkv[b, :, 0 * C:1 * C][:, cols]
            k = qkv[b, :, 1 * C:2 * C][:, cols]
            v = qkv[b, :, 2 * C:3 * C][:, cols]
            for t in range(T):
                s = np.array([q[t] @ k[u] / math.sqrt(hs) for u in range(t + 1)])
                p = np.exp(s - s.max())
                p /= p.sum()
                np.testing.assert_allclose(att[b, h, t, :t + 1], p, rtol=1e-12)
                np.testing.assert_allclose(out[b, t, cols], p @ v[:t + 1], rtol=1e-12)


def test_crossentropy_values():
    V = 9
    loss, probs = ref.crossentropy_forward(np.full((2, 3, V), 1.7), np.zeros((2, 3), int))
    assert abs(loss - math.log(V)) < 1e-14
    np.testing.assert_allclose(probs, 1 / V)
    # logits [0, ln 3]: p = [1/4, 3/4]; target 0 -> ln 4, target 1 -> ln(4/3)
    loss, _ = ref.crossentropy_forward([[0.0, math.log(3)], [0.0, math.log(3)]], [0, 1])
    assert abs(loss - (math.log(4) + math.log(4 / 3)) / 2) < 1e-14
    # huge logits stay finite
    loss, _ = ref.crossentropy_forward([[1000.0, 0.0]], [1])
    assert abs(loss - 1000.0) < 1e-9


def test_model_causality():
    rng = np.random.default_rng(7)
    V, block, L, H, C, B, T = 7, 6, 2, 2, 6, 2, 6
    params = ref.init_params(V, block, L, H, C, rng)
    idx = rng.integers(0, V, (B, T))
    base, _, _ = ref.gpt_forward(params, idx, n_head=H)
    for t in range(T):
        idx2 = idx.copy()
        idx2[:, t] = (idx2[:, t] + 1) % V
        changed, _, _ = ref.gpt_forward(params, idx2, n_head=H)
        np.testing.assert_array_equal(changed[:, :t], base[:, :t])
        assert np.all(np.abs(changed[:, t] - base[:, t]).max(axis=-1) > 1e-6)


def test_model_hand_computable():
    # Every block weight/bias zero: both residual branches add exactly 0
    # (ln outputs 0 -> qkv 0 -> uniform attention of v=0 -> 0; mlp: gelu(0)=0).
    # So logits = ln_f(wte[idx] + wpe[t]) @ wte.T with ln_f weight 1, bias 0.
    V, block, L, H, C = 3, 2, 2, 1, 2
    params = {k: np.zeros(s) for k, s in ref.param_shapes(V, block, L, C).items()}
    params["transformer.wte.weight"] = np.array([[1.0, -1.0], [-1.0, 1.0], [0.0, 0.0]])
    params["transformer.wpe.weight"] = np.array([[0.0, 0.0], [2.0, 0.0]])
    params["transformer.ln_f.weight"] = np.ones(2)
    # token 0 at t=0: x = [1, -1] -> xhat = s*[1, -1], logits = s*[2, -2, 0]
    # token 2 at t=1: x = [2, 0]  -> xhat = s*[1, -1] as well (mean 1, var 1)
    s = 1 / math.sqrt(1 + 1e-5)
    logits, loss, _ = ref.gpt_forward(params, [[0, 2]], [[2, 0]], n_head=H)
    np.testing.assert_allclose(logits[0], [[2 * s, -2 * s, 0], [2 * s, -2 * s, 0]], rtol=1e-14)
    lse = math.log(math.exp(2 * s) + math.exp(-2 * s) + 1)
    assert abs(loss - ((lse - 0) + (lse - 2 * s)) / 2) < 1e-14


def test_forward_without_targets_and_too_long():
    rng = np.random.default_rng(8)
    params = ref.init_params(5, 3, 1, 1, 4, rng)
    logits, loss, _ = ref.gpt_forward(params, [[1, 2]], n_head=1)
    assert logits.shape == (1, 2, 5) and loss is None
    with pytest.raises(ValueError):
        ref.gpt_forward(params, [[1, 2, 3, 4]], n_head=1)


def test_init_params_shapes_and_dtype():
    params = ref.init_params(65, 64, 4, 4, 128, np.random.default_rng(0))
    assert {k: v.shape for k, v in params.items()} == ref.param_shapes(65, 64, 4, 128)
    assert len(params) == 2 + 12 * 4 + 2
    assert all(v.dtype == np.float64 for v in params.values())


# ---------------------------------------------------------------- AdamW

def test_adamw_first_step_by_hand():
    # p=1, g=0.5, m=v=0, t=1, lr=0.1, b1=0.9, b2=0.999, eps=1e-8, wd=0.1
    #   decay:  p = 1 - 0.1*0.1*1          = 0.99
    #   m = 0.1 * 0.5 = 0.05                 mhat = 0.05 / (1 - 0.9)      = 0.5
    #   v = 0.001 * 0.25 = 0.00025           vhat = 0.00025 / (1 - 0.999) = 0.25
    #   p = 0.99 - 0.1 * 0.5 / (0.5 + 1e-8) = 0.99 - 0.1/(1 + 2e-8)
    #     = 0.99 - (0.1 - 2e-9) = 0.890000002 (to ~1e-16)
    # (decaying *after* the update would give 0.891..., so the order is pinned)
    p, m, v = ref.adamw_step(1.0, 0.5, 0.0, 0.0, 1, 0.1, 0.9, 0.999, 1e-8, 0.1)
    assert abs(m - 0.05) < 1e-15 and abs(v - 0.00025) < 1e-18
    assert abs(p - 0.890000002) < 1e-13


def test_adamw_second_step_by_hand():
    # continue with g = 0.5 at t = 2:
    #   decay: p = 0.890000002 * (1 - 0.01) = 0.88110000198
    #   m = 0.9*0.05 + 0.1*0.5 = 0.095          mhat = 0.095 / 0.19 = 0.5
    #   v = 0.999*0.00025 + 0.001*0.25 = 0.00049975
    #                                           vhat = 0.00049975 / 0.001999 = 0.25
    #   p = 0.88110000198 - 0.1 * 0.5 / (0.5 + 1e-8)
    #     = 0.88110000198 - 0.099999998 = 0.78110000398
    p, m, v = ref.adamw_step(1.0, 0.5, 0.0, 0.0, 1, 0.1, 0.9, 0.999, 1e-8, 0.1)
    p, m, v = ref.adamw_step(p, 0.5, m, v, 2, 0.1, 0.9, 0.999, 1e-8, 0.1)
    assert abs(m - 0.095) < 1e-15 and abs(v - 0.00049975) < 1e-17
    assert abs(p - 0.78110000398) < 1e-12


def test_adamw_weight_decay_on_pre_update_param():
    # zero gradient: the Adam update is exactly 0, only decay acts: p*(1-lr*wd)
    p0 = np.array([2.0, -4.0, 0.0])
    z = np.zeros(3)
    p, m, v = ref.adamw_step(p0, z, z, z, 3, 0.01, 0.9, 0.95, 1e-8, 0.5)
    np.testing.assert_allclose(p, [1.99, -3.98, 0.0], rtol=1e-15)
    assert np.all(p0 == [2.0, -4.0, 0.0])  # input untouched
    # wd=0: plain Adam; first step moves every entry by ~lr against sign(g)
    p, _, _ = ref.adamw_step(p0, np.array([3.0, -0.2, 1e-3]), z, z, 1, 0.01, 0.9, 0.95, 1e-8, 0.0)
    np.testing.assert_allclose(p - p0, [-0.01, 0.01, -0.01], rtol=1e-4)
