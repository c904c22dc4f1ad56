"""Sampling: the token sampler, generate() with its KV cache, and streaming text.

The sampler is checked directly (femtogpt._core.py_sample_token) over an even
grid of uniform draws, so frequencies are exact up to the grid's resolution.
generate() is checked against a teacher-forced full forward pass of the
context the README documents (the last block_size // 2 tokens after the
window fills), on a model with perturbed weights so that logits are far apart.
"""
import codecs
import io

import numpy as np
import pytest

import femtogpt
from femtogpt import GPT, GPTConfig, _core
from femtogpt.errors import DataError, TokenizerError
from femtogpt.app.sample import stream_sample
from femtogpt.text import ByteTokenizer, CharTokenizer

V, BLOCK = 11, 8
CHARS = "\nabcdefghij"          # 11 characters, sorted: a CharTokenizer vocabulary


@pytest.fixture(autouse=True)
def _one_thread():
    saved = femtogpt.get_num_threads()
    femtogpt.set_num_threads(1)
    yield
    femtogpt.set_num_threads(saved)


def perturbed_model(vocab_size=V, block_size=BLOCK, n_layer=2, n_head=2, n_embd=16, seed=1,
                    **options):
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer,
                          n_head=n_head, n_embd=n_embd, **options), seed=0)
    rng = np.random.default_rng(seed)
    model.load_state_dict({
        name: value + rng.standard_normal(value.shape).astype(np.float32)
        * (0.3 if value.ndim >= 2 else 0.1)
        for name, value in model.state_dict().items()})
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return perturbed_model()


def contexts(T0, n_new, block):
    """(start, end) of the context each generated token was sampled from.

    The cache holds the whole sequence until the window is full; after a token
    is sampled from a full window, the cache restarts from the last
    block // 2 tokens (the new one included).
    """
    keep = max(1, block // 2)
    start, end = max(0, T0 - block), T0
    spans = []
    for _ in range(n_new):
        spans.append((start, end))
        full = end - start == block
        end += 1
        if full:
            start = end - keep
    return spans


def reference_logits(model, seq, T0, n_new):
    """Full-forward logits behind each generated token: (n_new, B, V) float64."""
    block = model.config.block_size
    return np.stack([model.forward(seq[:, s:e])[0][:, -1].astype(np.float64)
                     for s, e in contexts(T0, n_new, block)])


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_contexts_helper_describes_the_documented_window():
    # block 8: prompt of 3 grows to 8, then restarts from the last 4 tokens.
    assert contexts(3, 8, 8) == [(0, 3), (0, 4), (0, 5), (0, 6), (0, 7), (0, 8), (5, 9),
                                 (5, 10)]
    assert contexts(10, 2, 8) == [(2, 10), (7, 11)]


# --------------------------------------------------------------------------- the sampler


def frequencies(logits, temperature=1.0, top_k=0, top_p=1.0, n=4000):
    """How often each token is drawn over the grid u = (i + 1/2) / n."""
    logits = np.asarray(logits, dtype=np.float32)
    counts = np.zeros(len(logits))
    for i in range(n):
        counts[_core.py_sample_token(logits, temperature, top_k, top_p, (i + 0.5) / n)] += 1
    return counts / n


PROBS = np.array([0.1, 0.5, 0.15, 0.25])
LOGITS = np.log(PROBS) + 3.0           # softmax(LOGITS) == PROBS


def renormalised(p, keep):
    q = np.zeros_like(p)
    q[keep] = p[keep]
    return q / q.sum()


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_sampler_frequencies_follow_softmax_of_logits_over_temperature(temperature):
    expected = PROBS ** (1.0 / temperature)
    expected /= expected.sum()
    np.testing.assert_allclose(frequencies(LOGITS, temperature), expected, atol=1e-3)


def test_sampler_handles_huge_logits():
    np.testing.assert_allclose(frequencies([1000.0, 999.0, -1000.0]),
                               [np.e / (np.e + 1), 1 / (np.e + 1), 0.0], atol=1e-3)


def test_temperature_zero_is_argmax_whatever_the_draw():
    for u in (0.0, 0.3, 0.999):
        assert _core.py_sample_token(LOGITS.astype(np.float32), 0.0, 0, 1.0, u) == 1
        assert _core.py_sample_token(LOGITS.astype(np.float32), 0.0, 3, 0.2, u) == 1
    # ties go to the first maximum, as argmax
    assert _core.py_sample_token(np.array([1, 3, 3, 0], np.float32), 0.0, 0, 1.0, 0.5) == 1


@pytest.mark.parametrize("temperature", [0.3, 1.0, 7.0])
def test_top_k_1_is_greedy_at_any_temperature(temperature):
    np.testing.assert_array_equal(frequencies(LOGITS, temperature, top_k=1, n=500),
                                  [0, 1, 0, 0])


def test_top_k_keeps_the_k_most_likely_renormalised():
    np.testing.assert_allclose(frequencies(LOGITS, top_k=2), renormalised(PROBS, [1, 3]),
                               atol=1e-3)
    np.testing.assert_allclose(frequencies(LOGITS, top_k=3), renormalised(PROBS, [1, 3, 2]),
                               atol=1e-3)
    np.testing.assert_allclose(frequencies(LOGITS, top_k=4), PROBS, atol=1e-3)
    np.testing.assert_allclose(frequencies(LOGITS, top_k=99), PROBS, atol=1e-3)


def test_top_k_support_on_random_logits():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(50) * 0.5).astype(np.float32)
    top5 = set(np.argsort(logits)[-5:].tolist())
    freq = frequencies(logits, temperature=1.3, top_k=5, n=3000)
    assert set(np.flatnonzero(freq).tolist()) == top5
    expected = np.zeros(50)
    expected[list(top5)] = softmax(logits[list(top5)] / 1.3)
    np.testing.assert_allclose(freq, expected, atol=1e-3)


@pytest.mark.parametrize("top_p, keep", [
    (0.45, [1]),            # 0.5 alone reaches 0.45
    (0.7, [1, 3]),          # 0.5 + 0.25 = 0.75 reaches 0.7; 0.5 does not
    (0.74, [1, 3]),
    (0.8, [1, 3, 2]),       # 0.75 < 0.8 <= 0.9
    (0.95, [1, 3, 2, 0]),
    (1.0, [1, 3, 2, 0]),
])
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, keep):
    np.testing.assert_allclose(frequencies(LOGITS, top_p=top_p), renormalised(PROBS, keep),
                               atol=1e-3)


def test_top_p_applies_after_temperature_and_top_k():
    # temperature 2: probabilities become sqrt(p) / sum = .165, .370, .203, .262; the
    # prefix reaching 0.7 is three tokens (0.5 + 0.25 would have reached it untempered).
    tempered = np.sqrt(PROBS) / np.sqrt(PROBS).sum()
    np.testing.assert_allclose(frequencies(LOGITS, temperature=2.0, top_p=0.7),
                               renormalised(tempered, [1, 3, 2]), atol=1e-3)
    # top_k 3 first (0.5, 0.25, 0.15 renormalised to .556, .278, .167), then top_p 0.8
    # of that: two tokens (.833). Over the unfiltered distribution it would be three.
    np.testing.assert_allclose(frequencies(LOGITS, top_k=3, top_p=0.8),
                               renormalised(PROBS, [1, 3]), atol=1e-3)


# --------------------------------------------------------------------------- generate


def prompt(B=3, T0=3, seed=0):
    return np.random.default_rng(seed).integers(0, V, size=(B, T0))


def test_generate_shape_dtype_and_prompt(model):
    idx = prompt()
    out = model.generate(idx, 5, temperature=1.0, seed=1)
    assert out.shape == (3, 8) and out.dtype == np.int64
    np.testing.assert_array_equal(out[:, :3], idx)
    assert out.min() >= 0 and out.max() < V
    same = model.generate(idx, 0, seed=1)
    assert same.dtype == np.int64
    np.testing.assert_array_equal(same, idx)


def test_generate_is_reproducible_with_a_seed(model):
    idx = prompt()
    a = model.generate(idx, 20, temperature=1.0, seed=123)
    b = model.generate(idx, 20, temperature=1.0, seed=123)
    c = model.generate(idx, 20, temperature=1.0, seed=124)
    np.testing.assert_array_equal(a, b)
    assert np.count_nonzero(a[:, 3:] != c[:, 3:]) > 10
    # rows of one batch are independent draws, not copies
    same_prompt = np.repeat(idx[:1], 3, axis=0)
    rows = model.generate(same_prompt, 20, temperature=1.0, seed=5)
    assert not np.array_equal(rows[0], rows[1]) and not np.array_equal(rows[1], rows[2])


def test_callback_sees_every_step(model):
    seen = []
    out = model.generate(prompt(), 12, temperature=1.0, seed=9, callback=seen.append)
    assert len(seen) == 12
    np.testing.assert_array_equal(np.stack(seen, axis=1), out[:, 3:])


@pytest.mark.parametrize("n_new", [5, 30])     # within one window, and past block_size
def test_temperature_zero_is_greedy_over_full_forward(model, n_new):
    idx = prompt(T0=3)
    out = model.generate(idx, n_new, temperature=0.0, seed=1)
    ref = reference_logits(model, out, 3, n_new)
    np.testing.assert_array_equal(out[:, 3:].T, ref.argmax(axis=-1))
    # and top_k=1 is greedy whatever the temperature
    np.testing.assert_array_equal(model.generate(idx, n_new, temperature=3.0, top_k=1, seed=7),
                                  out)


def test_generation_past_block_size_restarts_from_the_last_half_window(model):
    # 30 tokens after a 3-token prompt with block_size 8: the window fills and is
    # rebuilt from the last 4 tokens five times. Greedy decoding must match a full
    # forward over exactly those contexts; over the last 8 tokens (nanoGPT's
    # sliding window) it would not.
    idx = prompt(T0=3)
    out = model.generate(idx, 30, temperature=0.0, seed=1)
    assert out.shape == (3, 33)
    np.testing.assert_array_equal(out[:, 3:].T, reference_logits(model, out, 3, 30).argmax(-1))
    sliding = np.stack([model.forward(out[:, max(0, e - BLOCK):e])[0][:, -1]
                        for e in range(3, 33)]).argmax(axis=-1)
    assert np.any(sliding != out[:, 3:].T)   # so the check above is not vacuous


def test_top_k_samples_only_among_the_k_most_likely(model):
    idx = prompt(B=8, T0=2, seed=3)
    out = model.generate(idx, 20, temperature=2.0, top_k=3, seed=11)
    ref = reference_logits(model, out, 2, 20)            # (20, 8, V)
    top3 = np.argsort(ref, axis=-1)[..., -3:]
    chosen = out[:, 2:].T[..., None]
    assert np.all(np.any(top3 == chosen, axis=-1))
    # at temperature 2 the sampler does use more than the top token
    assert np.mean(chosen[..., 0] != ref.argmax(axis=-1)) > 0.2


def test_top_p_samples_only_within_the_nucleus(model):
    idx = prompt(B=8, T0=2, seed=4)
    top_p = 0.6
    out = model.generate(idx, 20, temperature=1.0, top_p=top_p, seed=12)
    ref = reference_logits(model, out, 2, 20)
    probs = softmax(ref)
    order = np.argsort(-probs, axis=-1)
    sorted_p = np.take_along_axis(probs, order, axis=-1)
    # the nucleus: the smallest prefix whose mass reaches p (1e-4 of slack for rounding)
    before = np.cumsum(sorted_p, axis=-1) - sorted_p
    in_nucleus = before < top_p + 1e-4
    chosen = out[:, 2:].T
    rank = np.argmax(order == chosen[..., None], axis=-1)
    assert np.all(np.take_along_axis(in_nucleus, rank[..., None], axis=-1))
    assert np.any(rank > 0)


def test_prompt_longer_than_block_size_is_cropped(model):
    long = prompt(B=2, T0=13, seed=5)
    out = model.generate(long, 6, temperature=1.0, seed=21)
    assert out.shape == (2, 19)
    np.testing.assert_array_equal(out[:, :13], long)
    cropped = model.generate(long[:, -BLOCK:], 6, temperature=1.0, seed=21)
    np.testing.assert_array_equal(out[:, 13:], cropped[:, BLOCK:])


def test_generate_rejects_bad_arguments(model):
    idx = prompt()
    for kwargs in (dict(temperature=-0.1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            model.generate(idx, 3, seed=0, **kwargs)
    with pytest.raises(ValueError):
        model.generate(idx, -1, seed=0)
    with pytest.raises(ValueError, match="outside"):
        model.generate(np.array([[0, V]]), 3, seed=0)


# --------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("options", [{}, dict(bias=False, gelu="exact")],
                         ids=["gpt2", "nanogpt"])
def test_kv_cache_logits_equal_full_forward(options):
    model = perturbed_model(**options)
    idx = np.random.default_rng(8).integers(0, V, size=(2, BLOCK))
    full = model.forward(idx)[0]
    for t0 in (1, 3):
        np.testing.assert_allclose(model.prefill_logits(idx[:, :t0]), full[:, t0 - 1],
                                   atol=1e-5, rtol=1e-5)
        for t in range(t0, BLOCK):
            np.testing.assert_allclose(model.decode_logits(idx[:, t], t), full[:, t],
                                       atol=1e-5, rtol=1e-5, err_msg=f"t0={t0} t={t}")
    np.testing.assert_allclose(model.prefill_logits(idx), full[:, -1], atol=1e-5, rtol=1e-5)


def test_wide_model_decodes_on_every_thread_with_the_same_logits():
    # 256 wide: the MLP's and the classifier's matrix-vector products are large
    # enough to be split over the threads (matvec_forward). Each output is one
    # thread's dot product, so 1 and 2 threads agree bit for bit, and the cache
    # still equals the full forward pass.
    model = GPT(GPTConfig(vocab_size=1200, block_size=8, n_layer=1, n_head=4, n_embd=256),
                seed=2)
    idx = np.random.default_rng(3).integers(0, 1200, size=(2, 8))
    full = model.forward(idx)[0]
    saved = femtogpt.get_num_threads()
    decoded = {}
    try:
        for threads in (1, 2):
            femtogpt.set_num_threads(threads)
            model.prefill_logits(idx[:, :2])
            decoded[threads] = np.stack([model.decode_logits(idx[:, t], t)
                                         for t in range(2, 8)], axis=1)
    finally:
        femtogpt.set_num_threads(saved)
    np.testing.assert_array_equal(decoded[1], decoded[2])
    np.testing.assert_allclose(decoded[2], full[:, 2:], atol=1e-5, rtol=1e-5)


def test_kv_cache_refuses_positions_it_does_not_hold(model):
    idx = np.zeros((1, 3), dtype=np.int64)
    model.prefill_logits(idx)
    with pytest.raises(ValueError):
        model.decode_logits(np.array([1]), 5)          # positions 3, 4 never filled
    with pytest.raises(ValueError):
        model.decode_logits(np.array([1]), BLOCK)      # past the window
    with pytest.raises(ValueError):
        model.decode_logits(np.array([1, 2]), 3)       # another batch size


# --------------------------------------------------------------------------- streaming


def test_stream_sample_writes_and_returns_prompt_plus_continuation(model):
    tokenizer = CharTokenizer(CHARS)
    for top_k, expect_top_k in ((200, None), (3, 3)):
        buf = io.StringIO()
        text = stream_sample(model, tokenizer, "abc", 25, temperature=0.9, top_k=top_k,
                             top_p=None, seed=4, out=buf)
        ids = model.generate(np.array([tokenizer.encode("abc")]), 25, temperature=0.9,
                             top_k=expect_top_k, seed=4)
        assert text == "abc" + tokenizer.decode(ids[0, 3:].tolist())
        assert len(text) == 28
        assert buf.getvalue() == text + "\n"


def test_stream_sample_rejects_unknown_prompt_characters(model):
    buf = io.StringIO()
    with pytest.raises(TokenizerError) as info:
        stream_sample(model, CharTokenizer(CHARS), "abXcY", 5, seed=0, out=buf)
    assert str(info.value) == ("prompt has characters the tokenizer does not know: "
                               "'X', 'Y'")
    assert buf.getvalue() == ""
    with pytest.raises(DataError, match="empty"):
        stream_sample(model, CharTokenizer(CHARS), "", 5, seed=0, out=buf)


class ScriptedModel:
    """Stands in for GPT: generate() emits a fixed byte sequence through the callback."""

    def __init__(self, script):
        self.script = script
        self.config = GPTConfig(vocab_size=256, block_size=8, n_layer=1, n_head=1, n_embd=4)

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 seed=None, callback=None):
        for byte in self.script[:max_new_tokens]:
            callback(np.array([byte]))
        return np.concatenate([idx, [self.script[:max_new_tokens]]], axis=1)


class Recorder(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, text):
        self.writes.append(text)
        return super().write(text)


def test_byte_stream_prints_whole_characters_and_survives_cut_ones():
    # "é" (2 bytes), "€" (3 bytes), an invalid byte, then 2 of an emoji's 4 bytes
    script = list("é€".encode()) + [0xFF] + list("😀".encode()[:2])
    out = Recorder()
    text = stream_sample(ScriptedModel(script), ByteTokenizer(), "x", len(script), out=out)
    assert text == "xé€\ufffd\ufffd"
    assert text == "x" + bytes(script).decode("utf-8", errors="replace")
    assert [w for w in out.writes if w] == ["x", "é", "€", "\ufffd", "\ufffd", "\n"]


def test_byte_model_streams_random_bytes_without_error():
    model = perturbed_model(vocab_size=256, block_size=8, n_layer=1, n_embd=16, seed=2)
    buf = io.StringIO()
    text = stream_sample(model, ByteTokenizer(), "é", 40, temperature=1.5, top_k=None,
                         seed=3, out=buf)
    ids = model.generate(np.array([list("é".encode())]), 40, temperature=1.5, seed=3)
    generated = bytes(ids[0, 2:].tolist())
    assert text == "é" + generated.decode("utf-8", errors="replace")
    assert buf.getvalue() == text + "\n"
    # the random bytes are not valid UTF-8: the replacement path was exercised
    assert "\ufffd" in text
    decoder = codecs.getincrementaldecoder("utf-8")()
    with pytest.raises(UnicodeDecodeError):
        decoder.decode(generated, final=True)
