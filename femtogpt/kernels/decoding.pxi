# The inference pass: the KV cache, and the forward of new positions against it.
#
# One pass serves sampling: the prompt pass (all of a prompt's positions at
# once, from position 0) and each decode step (one position per row) run the
# same layers over the same weights, whose type (fp32, bf16, int8) is the
# LinearWeights' (linear_weights.pxi). The pass keeps one layer's activations
# at a time, for the rows at hand, and writes each layer's k and v into the
# cache: a long prompt costs the cache and a few rows of scratch, not the
# training graph's activation block. Every kernel uses every thread: the
# linear layers split their outputs, the prompt's attention its heads (the
# training kernel, attention.pxi), a decode step's attention its heads when
# the past is long enough to pay for starting the threads.
# The loop that samples with it is generate.pxi.

cimport cython
cimport openmp
from cython.parallel cimport prange
from libc.math cimport sqrtf
from libc.stdint cimport int32_t, uint64_t
from libc.string cimport memcpy
import numpy as np


DEF ATTN_PARALLEL_MIN = 65536   # multiply-adds of a step's attention worth a fork
DEF ROWS_PARALLEL_MIN = 65536   # elements of a row-wise kernel worth a fork


cdef inline Py_ssize_t cache_row(Py_ssize_t l, Py_ssize_t b, Py_ssize_t t, Py_ssize_t B,
                                 Py_ssize_t maxT, Py_ssize_t C) noexcept nogil:
    # Offset of layer l, batch row b, position t in a cache laid out (L, B, maxT, C).
    return ((l * B + b) * maxT + t) * C


cdef inline void cached_head_attention(float* y, float* scores, const float* q,
                                       const float* kc, const float* vc, int n_past,
                                       int C, int hs) noexcept nogil:
    # One head of one new position: softmax over its n_past cached keys of
    # q . k / sqrt(hs), then the weighted sum of the cached values into y (hs).
    # kc, vc: this row's cache at this head's columns (row stride C).
    cdef Py_ssize_t j, c
    cdef float mx = -3.0e38, total = 0.0, s, scale = 1.0 / sqrtf(hs)
    for j in range(n_past):
        s = dot(q, kc + j * C, hs) * scale
        scores[j] = s
        if s > mx:
            mx = s
    for j in range(n_past):
        scores[j] = fast_expf(scores[j] - mx)
        total = total + scores[j]
    for c in range(hs):
        y[c] = 0.0
    for j in range(n_past):
        s = scores[j] / total
        for c in range(hs):
            y[c] = y[c] + s * vc[j * C + c]


@cython.final
cdef class Decoder:
    """A Graph's inference pass and KV cache (made by Graph, not by users).

    It reads fp32 embeddings and LayerNorms through the Graph's parameter
    pointers and the linear layers through its LinearWeights; it owns one
    Buffer: the cache and the scratch, laid out by _take for the rows at hand.
    """
    cdef int V, max_T, L, NH, C, n_slots
    cdef bint gelu_exact
    cdef Params p             # the Graph's parameters (params_buf keeps them alive)
    cdef Buffer params_buf, buf
    cdef LinearWeights lin
    cdef LinearWork work
    cdef int B                # rows the cache is laid out for; 0 before the first prompt pass
    cdef Py_ssize_t rows      # rows of scratch laid out (B * positions of one pass)
    cdef Py_ssize_t logit_rows  # rows of logits laid out
    cdef int att_T            # positions the prompt attention's scratch holds
    cdef int cache_len        # positions 0..cache_len-1 of every row are cached
    cdef float* k_cache       # (L, B, maxT, C)
    cdef float* v_cache       # (L, B, maxT, C)
    cdef float* k_layer       # the layer being run's part of each cache
    cdef float* v_layer
    cdef float* x             # (rows, C) residual stream of the new positions
    cdef float* ln            # (rows, C)
    cdef float* mean          # (rows) LayerNorm statistics (unused, the kernel writes them)
    cdef float* rstd          # (rows)
    cdef float* qkv           # (rows, 3C)
    cdef float* atty          # (rows, C)
    cdef float* branch        # (rows, C)
    cdef float* fch           # (rows, 4C)
    cdef float* logits        # (logit_rows, V)
    cdef float* scores        # (n_slots, maxT) a decode step's attention, per thread
    cdef float* att_scratch   # (n_slots, ATT_SLOT, att_T, att_T) the prompt's attention
    cdef float* lin_work      # the linear layers' workspace (bytes, in floats)
    # the last generate()'s clock (omp_get_wtime), for --stats
    cdef public int prompt_tokens, decode_tokens
    cdef public double prompt_seconds, decode_seconds

    cdef void bind(self, Buffer params, Params* p, int V, int max_T, int L, int NH, int C,
                   bint gelu_exact, LinearWeights lin):
        self.params_buf = params
        self.p = p[0]
        self.V, self.max_T, self.L, self.NH, self.C = V, max_T, L, NH, C
        self.gelu_exact = gelu_exact
        self.lin = lin
        self.buf = None
        self.B = 0
        self.rows = self.logit_rows = 0
        self.att_T = self.n_slots = 0
        self.cache_len = 0

    cdef set_weights(self, LinearWeights lin):
        # New weights: the old cache and scratch (sized for the old type) go.
        self.lin = lin
        self.buf = None
        self.B = 0
        self.rows = self.logit_rows = 0
        self.cache_len = 0

    cdef Py_ssize_t _layout(self, float* base, int B, Py_ssize_t rows, Py_ssize_t logit_rows,
                            int att_T, int n_slots):
        # The block's arrays, from base (or only counted, if base is NULL).
        cdef Py_ssize_t used = 0, C = self.C
        cdef Py_ssize_t kv = <Py_ssize_t>self.L * B * self.max_T * C
        cdef size_t work = linear_work_bytes(self.lin.kind, rows, 4 * self.C, n_slots)
        _take(&self.k_cache, kv, base, &used)
        _take(&self.v_cache, kv, base, &used)
        _take(&self.x, rows * C, base, &used)
        _take(&self.ln, rows * C, base, &used)
        _take(&self.mean, rows, base, &used)
        _take(&self.rstd, rows, base, &used)
        _take(&self.qkv, rows * 3 * C, base, &used)
        _take(&self.atty, rows * C, base, &used)
        _take(&self.branch, rows * C, base, &used)
        _take(&self.fch, rows * 4 * C, base, &used)
        _take(&self.logits, logit_rows * self.V, base, &used)
        _take(&self.scores, <Py_ssize_t>n_slots * self.max_T, base, &used)
        _take(&self.att_scratch, <Py_ssize_t>n_slots * ATT_SLOT * att_T * att_T, base, &used)
        _take(&self.lin_work, <Py_ssize_t>((work + 3) // 4), base, &used)
        return used

    cdef reserve(self, int B, int T, bint all_logits):
        # Room for a prompt pass over (B, T) new positions, before it runs: the
        # block only grows (or is laid out anew for another batch size), and a
        # new layout empties the cache, which the prompt pass fills from 0.
        # Decode steps need no more room than their prompt pass had.
        cdef Py_ssize_t rows = <Py_ssize_t>B * T
        cdef Py_ssize_t logit_rows = rows if all_logits else B
        cdef int att_T = T if T > 1 else 0
        cdef int n_slots = openmp.omp_get_max_threads()
        if (self.buf is not None and self.B == B and rows <= self.rows
                and logit_rows <= self.logit_rows and att_T <= self.att_T
                and n_slots <= self.n_slots):
            return
        if self.buf is not None and self.B == B:
            rows, logit_rows = max(rows, self.rows), max(logit_rows, self.logit_rows)
            att_T, n_slots = max(att_T, self.att_T), max(n_slots, self.n_slots)
        self.cache_len = 0
        self.buf = None     # free the old block before allocating the new one
        self.buf = Buffer(self._layout(NULL, B, rows, logit_rows, att_T, n_slots))
        self.B, self.rows, self.logit_rows, self.att_T, self.n_slots = (
            B, rows, logit_rows, att_T, n_slots)
        self._layout(self.buf.data, B, rows, logit_rows, att_T, n_slots)
        linear_work_layout(&self.work, self.lin.kind, <char*>self.lin_work, rows,
                           4 * self.C, n_slots)

    cdef check_pass(self, const int32_t[:, ::1] tokens, int pos):
        # A pass's arguments, before the GIL is released: new positions
        # pos..pos+T-1 after a cache holding 0..pos-1 (a prompt starts at 0).
        cdef int B = tokens.shape[0], T = tokens.shape[1]
        if B < 1 or T < 1:
            raise ValueError(f"need at least one row and one position, got ({B}, {T})")
        if pos < 0 or pos + T > self.max_T:
            raise ValueError(f"positions {pos}..{pos + T - 1} are outside the block "
                             f"(block_size {self.max_T})")
        if pos > 0:
            if self.B == 0 or B != self.B:
                raise ValueError("decode_logits needs prefill_logits with the same batch first")
            if pos > self.cache_len:
                raise ValueError(f"pos {pos} is outside the filled cache "
                                 f"(length {self.cache_len})")
            if T != 1:
                raise ValueError("after the prompt, positions are decoded one at a time")
        _need_ids(np.asarray(tokens).ravel(), B * T, self.V, "tokens")

    cdef logits_array(self, Py_ssize_t n_rows):
        # A copy of the last pass's logits, (n_rows, V).
        cdef Py_ssize_t off = self.logits - self.buf.data
        return np.asarray(self.buf)[off:off + n_rows * self.V].reshape(
            n_rows, self.V).copy()

    cdef void _rows_layernorm(self, const float* x, const float* w, const float* b,
                              Py_ssize_t n) noexcept nogil:
        # ln = LayerNorm(x) over n rows: the threads share the rows when there are
        # enough of them (each row is one thread's, so the result is the same).
        cdef Py_ssize_t r
        if n * self.C >= ROWS_PARALLEL_MIN:
            layernorm_forward(self.ln, self.mean, self.rstd, x, w, b, n, self.C)
        else:
            for r in range(n):
                layernorm_row(self.ln + r * self.C, self.mean + r, self.rstd + r,
                              x + r * self.C, w, b, self.C)

    cdef void _step_attention(self, int pos, int B) noexcept nogil:
        # One new position per row at pos, against the cache (which holds it too).
        cdef int C = self.C, NH = self.NH, hs = self.C // self.NH
        cdef Py_ssize_t bh, b, h, l_off
        cdef int width = qkv_width(C)
        cdef bint parallel = <Py_ssize_t>B * (pos + 1) * C >= ATTN_PARALLEL_MIN
        # at most the threads the scores were laid out for (a caller may have
        # raised the thread count since the prompt pass)
        cdef int n_threads = openmp.omp_get_max_threads()
        if n_threads > self.n_slots:
            n_threads = self.n_slots
        if parallel and n_threads > 1:
            for bh in prange(<Py_ssize_t>B * NH, schedule="static", num_threads=n_threads):
                b = bh // NH
                h = bh % NH
                cached_head_attention(
                    self.atty + b * C + h * hs,
                    self.scores + openmp.omp_get_thread_num() * self.max_T,
                    self.qkv + b * width + h * hs,
                    self.k_layer + b * self.max_T * C + h * hs,
                    self.v_layer + b * self.max_T * C + h * hs, pos + 1, C, hs)
        else:
            for bh in range(<Py_ssize_t>B * NH):
                b = bh // NH
                h = bh % NH
                cached_head_attention(
                    self.atty + b * C + h * hs, self.scores,
                    self.qkv + b * width + h * hs,
                    self.k_layer + b * self.max_T * C + h * hs,
                    self.v_layer + b * self.max_T * C + h * hs, pos + 1, C, hs)

    cdef void forward(self, const int32_t* tokens, int T, int pos,
                      bint all_logits) noexcept nogil:
        # tokens (B, T): new positions pos..pos+T-1 of every row (the prompt pass
        # when T > 1, from pos 0; a decode step when T == 1). Writes their k, v
        # into the cache and the logits: every position's (B*T, V) if all_logits,
        # else each row's last (B, V).
        cdef int B = self.B, C = self.C, V = self.V, width = qkv_width(C)
        cdef Py_ssize_t N = <Py_ssize_t>B * T, maxT = self.max_T, l, b, t, r, c
        cdef bint decode = T == 1 and pos > 0
        cdef Params* w = &self.p
        cdef LayerParams lw
        cdef LayerLinear* lk
        cdef LinearWork* work = &self.work
        cdef const float* row
        for r in range(N):
            b, t = r // T, r % T
            row = w.wte + <Py_ssize_t>tokens[r] * C
            for c in range(C):
                self.x[r * C + c] = row[c] + w.wpe[(pos + t) * C + c]
        for l in range(self.L):
            lw = layer_params(w, l, C)
            lk = &self.lin.layers[l]
            self.k_layer = self.k_cache + cache_row(l, 0, 0, B, maxT, C)
            self.v_layer = self.v_cache + cache_row(l, 0, 0, B, maxT, C)
            # x = x + c_proj(attention(ln_1(x)))
            self._rows_layernorm(self.x, lw.ln1w, lw.ln1b, N)
            linear_rows(self.qkv, self.ln, lw.qkvb, N, &lk.qkvw, work, decode)
            for r in range(N):
                b, t = r // T, r % T
                memcpy(self.k_layer + (b * maxT + pos + t) * C, self.qkv + r * width + k_col(C),
                       C * 4)
                memcpy(self.v_layer + (b * maxT + pos + t) * C, self.qkv + r * width + v_col(C),
                       C * 4)
            if T > 1:
                attention_forward(self.atty, NULL, self.att_scratch, self.qkv, B, T, C,
                                  self.NH, 0.0, 0, self.n_slots, NULL)
            else:
                self._step_attention(pos, B)
            linear_rows(self.branch, self.atty, lw.attprojb, N, &lk.attprojw, work, decode)
            add_rows(self.x, self.branch, N * C)
            # x = x + c_proj(gelu(c_fc(ln_2(x))))
            self._rows_layernorm(self.x, lw.ln2w, lw.ln2b, N)
            linear_rows(self.fch, self.ln, lw.fcb, N, &lk.fcw, work, decode)
            gelu_rows(self.fch, N * 4 * C, self.gelu_exact)
            linear_rows(self.branch, self.fch, lw.fcprojb, N, &lk.fcprojw, work, decode)
            add_rows(self.x, self.branch, N * C)
        if all_logits:
            self._rows_layernorm(self.x, w.lnfw, w.lnfb, N)
            linear_rows(self.logits, self.ln, NULL, N, &self.lin.lm_head, work, decode)
        else:
            # only each row's last position is sampled from
            for b in range(B):
                layernorm_row(self.ln + b * C, self.mean + b, self.rstd + b,
                              self.x + (b * T + T - 1) * C, w.lnfw, w.lnfb, C)
            linear_rows(self.logits, self.ln, NULL, B, &self.lin.lm_head, work, decode)
        self.cache_len = pos + T


cdef inline void add_rows(float* x, const float* y, Py_ssize_t n) noexcept nogil:
    # x += y: the residual add, in place (residual_forward's threads when large).
    if n >= ROWS_PARALLEL_MIN:
        residual_forward(x, x, y, n)
    else:
        add_into(x, y, n)


cdef inline void gelu_rows(float* x, Py_ssize_t n, bint exact) noexcept nogil:
    # GELU in place, either form (the training kernels' threads when large).
    if n < ROWS_PARALLEL_MIN:
        gelu_span(x, x, n, exact)
    elif exact:
        gelu_exact_forward(x, x, n)
    else:
        gelu_tanh_forward(x, x, n)


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
