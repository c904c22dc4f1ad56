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


cdef inline Py_ssize_t cache_head(Py_ssize_t b, Py_ssize_t h, Py_ssize_t NH, Py_ssize_t maxT,
                                  Py_ssize_t hs) noexcept nogil:
    # Offset of batch row b, head h in one layer's cache, laid out (B, NH, maxT, hs):
    # a head's keys (and values) one after another, so a decode step's attention
    # reads each head's past as one sequential stream. (With (B, maxT, C) it read
    # hs floats every C: 11% of an int8 decode step at 128 positions on Zen 4,
    # GPT-2's shape, since the weights streamed in between have evicted the cache.)
    return ((b * NH + h) * maxT) * hs


cdef inline void cached_head_attention(float* y, float* scores, const float* q,
                                       const float* kc, const float* vc, int n_past,
                                       int C, int hs) noexcept nogil:
    # One head of one new position: softmax over its n_past cached keys of
    # q . k / sqrt(hs), then the weighted sum of the cached values into y (hs).
    # kc, vc: this head's cached keys and values (row stride C, = hs in the cache).
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
    cdef float* k_cache       # (L, B, NH, maxT, hs): cache_head
    cdef float* v_cache       # (L, B, NH, maxT, hs)
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
                    self.k_layer + cache_head(b, h, NH, self.max_T, hs),
                    self.v_layer + cache_head(b, h, NH, self.max_T, hs), pos + 1, hs, hs)
        else:
            for bh in range(<Py_ssize_t>B * NH):
                b = bh // NH
                h = bh % NH
                cached_head_attention(
                    self.atty + b * C + h * hs, self.scores,
                    self.qkv + b * width + h * hs,
                    self.k_layer + cache_head(b, h, NH, self.max_T, hs),
                    self.v_layer + cache_head(b, h, NH, self.max_T, hs), pos + 1, hs, hs)

    cdef void forward(self, const int32_t* tokens, int T, int pos,
                      bint all_logits) noexcept nogil:
        # tokens (B, T): new positions pos..pos+T-1 of every row (the prompt pass
        # when T > 1, from pos 0; a decode step when T == 1). Writes their k, v
        # into the cache and the logits: every position's (B*T, V) if all_logits,
        # else each row's last (B, V).
        cdef int B = self.B, C = self.C, V = self.V, width = qkv_width(C)
        cdef Py_ssize_t N = <Py_ssize_t>B * T, maxT = self.max_T, l, b, t, r, c, h
        cdef Py_ssize_t hs = C // self.NH
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
            self.k_layer = self.k_cache + l * B * maxT * C
            self.v_layer = self.v_cache + l * B * maxT * C
            # x = x + c_proj(attention(ln_1(x)))
            self._rows_layernorm(self.x, lw.ln1w, lw.ln1b, N)
            linear_rows(self.qkv, self.ln, lw.qkvb, N, &lk.qkvw, work, decode)
            for r in range(N):
                b, t = r // T, r % T
                for h in range(self.NH):
                    memcpy(self.k_layer + cache_head(b, h, self.NH, maxT, hs) + (pos + t) * hs,
                           self.qkv + r * width + k_col(C) + h * hs, hs * 4)
                    memcpy(self.v_layer + cache_head(b, h, self.NH, maxT, hs) + (pos + t) * hs,
                           self.qkv + r * width + v_col(C) + h * hs, hs * 4)
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
