"""Random inputs at the public API: only results or Python exceptions, never a crash.

The compiled core trusts what it is given, so every public entry point must
check ids, shapes, dtypes and sizes before a kernel runs. hypothesis throws
random configs, arrays and options at them; each call must either return a
result of the documented shape or raise one of the exception types below.
(scripts/asan_check.sh runs these under AddressSanitizer, where an
out-of-bounds access that happens to survive here would be reported.)
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from femtogpt import GPT, GPTConfig, _core
from femtogpt.errors import FemtoGPTError

ALLOWED = (ValueError, TypeError, KeyError, RuntimeError, OverflowError, FemtoGPTError)

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

DTYPES = [np.int8, np.uint8, np.int16, np.int32, np.int64, np.uint64, np.float32,
          np.float64, np.bool_]

sizes = st.integers(min_value=-2, max_value=6)


@st.composite
def token_arrays(draw, max_value=80):
    ndim = draw(st.integers(0, 3))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from(DTYPES))
    n = int(np.prod(shape)) if shape else 1
    values = draw(st.lists(st.integers(-3, max_value), min_size=n, max_size=n))
    arr = np.array(values, dtype=np.int64).reshape(shape)
    if dtype == np.uint64:
        arr = np.abs(arr)          # a negative id as uint64 is a huge id: also tested
    return arr.astype(dtype)


@pytest.fixture(scope="module")
def model():
    return GPT(GPTConfig(vocab_size=11, block_size=6, n_layer=1, n_head=2, n_embd=8), seed=0)


@SETTINGS
@given(vocab=sizes, block=sizes, layers=sizes, heads=sizes, width=st.integers(-2, 12),
       dropout=st.one_of(st.floats(-1, 2), st.just(float("nan")), st.integers(-1, 2)))
def test_random_configs_build_or_refuse(vocab, block, layers, heads, width, dropout):
    try:
        cfg = GPTConfig(vocab_size=vocab, block_size=block, n_layer=layers, n_head=heads,
                        n_embd=width, dropout=dropout)
    except ALLOWED:
        return
    # Accepted: then it is usable, and the forward pass works on valid input.
    assert cfg.n_embd % cfg.n_head == 0 and 0 <= cfg.dropout < 1
    model = GPT(cfg, seed=1)
    logits, loss = model.forward(np.zeros((1, cfg.block_size), dtype=np.int64),
                                 np.zeros((1, cfg.block_size), dtype=np.int64))
    assert logits.shape == (1, cfg.block_size, cfg.vocab_size)
    assert np.isfinite(loss)


@SETTINGS
@given(idx=token_arrays(), targets=st.one_of(st.none(), token_arrays()),
       backward=st.booleans())
def test_random_arrays_at_forward_and_backward(model, idx, targets, backward):
    try:
        logits, loss = model.forward(idx, targets)
    except ALLOWED:
        return
    B, T = idx.shape
    assert logits.shape == (B, T, 11) and logits.dtype == np.float32
    assert np.all(np.isfinite(logits))
    assert (loss is None) == (targets is None)
    if backward:
        try:
            grads = model.backward()
        except ALLOWED:
            assert targets is None
            return
        assert grads["transformer.wte.weight"].shape == (11, 8)


@SETTINGS
@given(idx=token_arrays(), n=st.integers(-2, 9), temperature=st.one_of(st.floats(-1, 3), st.just(float("nan"))),
       top_k=st.one_of(st.none(), st.integers(-1, 15)),
       top_p=st.one_of(st.none(), st.floats(-0.5, 1.5), st.just(float("nan"))),
       seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_random_generation_requests(model, idx, n, temperature, top_k, top_p, seed):
    try:
        out = model.generate(idx, n, temperature=temperature, top_k=top_k, top_p=top_p,
                             seed=seed)
    except ALLOWED:
        return
    assert out.shape == (idx.shape[0], idx.shape[1] + n)
    assert out.min() >= 0 and out.max() < 11
    np.testing.assert_array_equal(out[:, :idx.shape[1]], idx)


@SETTINGS
@given(name=st.sampled_from(["transformer.wte.weight", "transformer.h.0.attn.c_attn.bias",
                             "transformer.ln_f.weight", "lm_head.weight", "bogus"]),
       shape=st.lists(st.integers(0, 12), min_size=0, max_size=3),
       drop=st.booleans(), dtype=st.sampled_from([np.float32, np.float64, np.int32, object]))
def test_random_state_dicts_load_or_change_nothing(model, name, shape, drop, dtype):
    before = model.state_dict()
    sd = model.state_dict()
    if drop:
        sd.pop(name, None)
    else:
        sd[name] = np.zeros(shape, dtype=dtype) if dtype is not object else "x"
    try:
        model.load_state_dict(sd)
    except ALLOWED:
        after = model.state_dict()
        for key in before:                  # a refused load changes nothing
            np.testing.assert_array_equal(after[key], before[key])
        return
    model.load_state_dict(before)


@SETTINGS
@given(n=st.integers(-1, 40), N=st.integers(-1, 6), C=st.integers(-1, 6),
       ids=st.lists(st.integers(-5, 10), max_size=40))
def test_random_sizes_at_the_kernel_wrappers(n, N, C, ids):
    # The single-kernel entry points check every length they will index.
    buf = lambda k: np.zeros(max(k, 0), dtype=np.float32)
    calls = [
        lambda: _core.py_layernorm_forward(buf(n), buf(N), buf(N), buf(n), buf(C), buf(C), N, C),
        lambda: _core.py_matmul_forward(buf(n), buf(n), buf(n), None, N, C, C),
        lambda: _core.py_attention_forward(buf(n), buf(n), buf(n), N, C, C, 1),
        lambda: _core.py_encoder_forward(buf(n), np.array(ids, dtype=np.int32), buf(n),
                                         buf(n), 1, N, C),
        lambda: _core.py_crossentropy_forward(buf(N), buf(N), buf(n),
                                              np.array(ids, dtype=np.int32), N, C),
        lambda: _core.py_adamw_update(buf(n), buf(n), buf(n), buf(n), N, 1e-3, 0.9, 0.99,
                                      1e-8, 0.1, 1.0, C),
        lambda: _core.py_gelu_tanh_forward(buf(n), buf(N)),
    ]
    for call in calls:
        try:
            call()
        except ALLOWED:
            pass


def test_a_callback_that_reenters_the_model_is_refused_not_a_crash():
    # generate() runs the callback between steps; a second call into the same
    # model from there would swap its buffers under the running one.
    model = GPT(GPTConfig(vocab_size=11, block_size=6, n_layer=1, n_head=2, n_embd=8), seed=0)
    seen = []

    def reenter(tokens):
        with pytest.raises(RuntimeError, match="already running"):
            model.generate(np.zeros((3, 2), dtype=np.int64), 4)
        with pytest.raises(RuntimeError, match="already running"):
            model.forward(np.zeros((1, 2), dtype=np.int64))
        seen.append(int(tokens[0]))

    out = model.generate(np.zeros((1, 1), dtype=np.int64), 10, seed=3, callback=reenter)
    assert len(seen) == 10 and out[0, 1:].tolist() == seen
    # ...and the model is usable again afterwards, with the same result.
    again = model.generate(np.zeros((1, 1), dtype=np.int64), 10, seed=3)
    np.testing.assert_array_equal(again, out)


def test_a_model_with_block_size_1_generates():
    model = GPT(GPTConfig(vocab_size=7, block_size=1, n_layer=1, n_head=1, n_embd=8), seed=0)
    out = model.generate(np.array([[3]]), 5, temperature=0.0)
    # With one position of context, greedy decoding is a fixed function of the last token.
    for t in range(1, 6):
        logits, _ = model.forward(out[:, t - 1:t])
        assert out[0, t] == logits[0, -1].argmax()


def test_matmul_sizes_that_overflow_int_are_refused():
    # C_out * C_in = 65536 * 65537 wraps to 65536 in 32-bit arithmetic.
    small = np.zeros(65536, dtype=np.float32)
    with pytest.raises(ValueError, match="weight"):
        _core.py_matmul_forward(np.zeros(65536, np.float32), np.zeros(65537, np.float32),
                                small, None, 1, 65537, 65536)
