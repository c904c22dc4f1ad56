# Graph: the GPT's compute graph as femtogpt/model uses it: the training
# graph (training_graph.pxi) and the inference pass (decoding.pxi's Decoder)
# over the same parameter block, with the linear layers' sampling type
# (linear_weights.pxi). The sampling loop is generate.pxi.

from libc.stdint cimport int32_t, uint64_t
import numpy as np


cdef class Graph(TrainingGraph):
    """The GPT's compute graph as femtogpt.model uses it: the training graph
    (training_graph.pxi) and the inference pass (Decoder) over the same
    weights, for sampling and scoring.

    The linear layers' type for the inference pass is set_weights_dtype()'s:
    fp32 reads the parameter block; bf16 and int8 convert it once and give the
    fp32 matrices' memory back, after which the model only samples and scores
    (training needs the fp32 weights: load the model again).
    Every call takes the TrainingGraph's busy flag.
    """
    cdef Decoder decoder
    cdef LinearWeights lin
    cdef dict offsets

    def __init__(self, int V, int max_T, int L, int NH, int C,
                 Buffer params not None, Buffer grads not None, dict offsets not None,
                 bint bias=True, bint gelu_exact=False):
        TrainingGraph.__init__(self, V, max_T, L, NH, C, params, grads, offsets, bias,
                               gelu_exact)
        self.offsets = dict(offsets)
        self.lin = LinearWeights()
        self.lin.setup("fp32", &self.p, L, C, V)
        self.decoder = Decoder()
        self.decoder.bind(params, &self.p, V, max_T, L, NH, C, gelu_exact, self.lin)

    @property
    def weights_dtype(self):
        return self.lin.dtype

    @property
    def linear_bytes(self):
        """Bytes of the linear layers at their sampling type (fp32: the blocks'
        matrices, the lm_head being wte; else the converted copies, lm_head too)."""
        return self.lin.nbytes

    def set_weights_dtype(self, str dtype, bint release=True):
        """Convert the linear layers to dtype ("fp32", "bf16", "int8") for the
        inference pass. With release, the fp32 matrices of the blocks are given
        back to the kernel (wte stays: it is the embedding too); from then on
        forward(), backward() and a change of type refuse."""
        if dtype not in LINEAR_KINDS:
            raise ValueError(f"dtype must be one of {', '.join(LINEAR_KINDS)}, got {dtype!r}")
        if self.busy:
            raise RuntimeError("set_weights_dtype() while this model is running a call")
        if self.fp32_released:
            if dtype == self.lin.dtype:
                return
            raise RuntimeError(f"this model's fp32 weights were given back after converting "
                               f"to {self.lin.dtype}: load it again for {dtype}")
        if dtype == self.lin.dtype and dtype == "fp32":
            return
        lin = LinearWeights()
        lin.setup(dtype, &self.p, self.L, self.C, self.V,
                  self.params_buf if release else None, self.offsets)
        self.lin = lin
        self.decoder.set_weights(lin)
        if release and dtype != "fp32":
            self.fp32_released = True

    @property
    def cache_len(self):
        return self.decoder.cache_len

    def _pass(self, const int32_t[:, ::1] idx not None, int pos, bint all_logits):
        # One inference pass (the busy flag held by the caller); returns the rows
        # of logits it made.
        self.decoder.check_pass(idx, pos)
        cdef int B = idx.shape[0], T = idx.shape[1]
        if pos == 0:
            self.decoder.reserve(B, T, all_logits)
        elif all_logits:
            raise ValueError("every position's logits come from a pass from position 0")
        with nogil:
            self.decoder.forward(&idx[0, 0], T, pos, all_logits)
        return B * T if all_logits else B

    def decode_logits(self, const int32_t[::1] tokens not None, int pos):
        """One decode step: tokens (B,) at position pos -> logits (B, V).

        The cache must hold positions 0..pos-1 (from prefill_logits and earlier calls).
        """
        self._acquire()
        try:
            n = self._pass(np.asarray(tokens).reshape(-1, 1), pos, False)
            return self.decoder.logits_array(n)
        finally:
            self.busy = False

    def prefill_logits(self, const int32_t[:, ::1] idx not None):
        """Fill the KV cache from idx (B, T); returns the logits of the last position."""
        self._acquire()
        try:
            n = self._pass(idx, 0, False)
            return self.decoder.logits_array(n)
        finally:
            self.busy = False

    def infer_logits(self, const int32_t[:, ::1] idx not None):
        """Every position's logits of idx (B, T), (B*T, V), through the inference
        pass at the weights' type (no dropout, no gradients; fills the cache)."""
        self._acquire()
        try:
            n = self._pass(idx, 0, True)
            return self.decoder.logits_array(n)
        finally:
            self.busy = False

    @property
    def last_generate_stats(self):
        d = self.decoder
        return {"prompt_tokens": d.prompt_tokens, "prompt_seconds": d.prompt_seconds,
                "decode_tokens": d.decode_tokens, "decode_seconds": d.decode_seconds}

    def generate(self, const int32_t[:, ::1] idx not None, int max_new_tokens,
                 float temperature, int top_k, float top_p, uint64_t seed,
                 int keep, callback=None):
        """Sample max_new_tokens after idx (B, T0); returns (B, max_new_tokens) int32.

        temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off.
        When the window is full (block_size positions) the cache is rebuilt from
        the last `keep` tokens. callback(tokens) gets each step's (B,) tokens.
        """
        return generate_tokens(self, idx, max_new_tokens, temperature, top_k, top_p, seed,
                               keep, callback)
