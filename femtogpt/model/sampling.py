"""The GPT's sampling side: generation with the KV cache, the cache's own
calls, and the type sampling reads the weights in (convert_weights).

A mixin of GPT (gpt.py), which owns the memory and the training passes; this
half only reads the weights, through the core's inference pass (_core's
decoding.pxi, over linear_weights.pxi at fp32, bf16 or int8).
"""
import numpy as np

from .. import _core
from .inputs import check_tokens


class Sampling:
    """generate(), prefill_logits(), decode_logits(), and the weights' sampling
    type. Expects self.config and self._graph (GPT sets both)."""

    @property
    def weights_dtype(self):
        """The type sampling and forward() read the linear layers in (WEIGHT_DTYPES)."""
        return self._graph.weights_dtype

    @property
    def weights_bytes(self):
        """Bytes of the weights as sampling reads them: the linear layers at
        weights_dtype, the embeddings, LayerNorms and biases in fp32."""
        cfg = self.config
        fp32_blocks = 4 * cfg.n_layer * 12 * cfg.n_embd ** 2
        return 4 * self._params_flat.size - fp32_blocks + self._graph.linear_bytes

    def convert_weights(self, dtype):
        """Sample and score with the linear layers in dtype ("fp32", "bf16",
        "int8": int8 is symmetric per block of 32 inputs, activations quantized
        on the fly). bf16 and int8 give the fp32 matrices' memory back: the
        model then samples and scores only (load it again to train or save)."""
        from .config import WEIGHT_DTYPES
        if dtype not in WEIGHT_DTYPES:
            from ..errors import ConfigError
            raise ConfigError(f"dtype must be one of {', '.join(WEIGHT_DTYPES)}, "
                              f"got {dtype!r}")
        self._graph.set_weights_dtype(dtype)
        if dtype != "fp32":
            self.training = False
        return self

    def _need_fp32(self, what):
        if self._graph.fp32_released:
            raise RuntimeError(f"{what}: this model keeps only its {self.weights_dtype} "
                               f"sampling weights (convert_weights); load it again "
                               f"without a dtype to train, save or export it")

    def _scored(self, idx, targets):
        # forward() of a model converted for sampling: the inference pass at the
        # weights' type, every position's logits, the loss from them.
        cfg = self.config
        idx32 = check_tokens("idx", idx, cfg)
        logits = self._graph.infer_logits(idx32)
        loss = None
        if targets is not None:
            targets32 = check_tokens("targets", targets, cfg, shape=idx32.shape).ravel()
            n = targets32.size
            losses, lse = np.empty(n, np.float32), np.empty(n, np.float32)
            _core.py_crossentropy_forward(losses, lse, logits.ravel(), targets32, n,
                                          cfg.vocab_size)
            loss = float(losses.astype(np.float64).mean())
        return logits.reshape(*idx32.shape, cfg.vocab_size), loss

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 seed=None, callback=None):
        """Continue each row of idx (B, T0) by max_new_tokens sampled tokens.

        Returns the whole sequences, (B, T0 + max_new_tokens) int64, as nanoGPT.
        temperature 0 picks the most likely token; top_k keeps the k most likely;
        top_p keeps the smallest set of most likely tokens whose probability
        reaches p. A prompt longer than block_size is cropped to its last
        block_size tokens. Uses a KV cache: each new token costs one position.
        When the block_size window is full the cache is rebuilt from the last
        block_size // 2 tokens (nanoGPT instead recomputes the full window for
        every token past block_size, block_size times the work).
        callback(tokens), if given, gets each step's new tokens, shape (B,).
        """
        cfg = self.config
        idx = np.asarray(idx)
        if idx.ndim == 2 and idx.shape[1] > cfg.block_size:
            idx_cond = idx[:, -cfg.block_size:]
        else:
            idx_cond = idx
        idx32 = check_tokens("idx", idx_cond, cfg)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
                or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        temperature = float(temperature)
        if not temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
        if top_p is not None and not 0.0 < np.float32(top_p) <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (as a float32), got {top_p}")
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % 2**64)
        keep = max(1, cfg.block_size // 2)
        new = self._graph.generate(idx32, int(max_new_tokens), temperature,
                                   int(top_k or 0), float(top_p or 1.0), int(seed) % 2**64,
                                   keep, callback)
        return np.concatenate([idx.astype(np.int64), new.astype(np.int64)], axis=1)

    @property
    def last_generate_stats(self):
        """The last generate()'s clock: prompt_tokens, prompt_seconds (the prompt
        pass), decode_tokens, decode_seconds (sampling and decoding the rest)."""
        return self._graph.last_generate_stats

    def prefill_logits(self, idx):
        """Fill the KV cache from idx (B, T); logits of the last position (B, V)."""
        return self._graph.prefill_logits(check_tokens("idx", idx, self.config))

    def decode_logits(self, tokens, pos):
        """One KV-cache step: tokens (B,) at position pos -> logits (B, V)."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError("tokens must be 1-D, one per row")
        return self._graph.decode_logits(check_tokens("tokens", tokens[:, None],
                                                       self.config).ravel(), int(pos))
