# The KV cache, and the forward of one new position per row against it (decoding).
#
# Graph.prefill_logits runs the ordinary batched forward over the prompt and
# hands its activations to Decoder.fill(), which copies each layer's k and v
# into the cache; decode_one() then costs one position's work per new token.
# Both are serial per row (no OpenMP regions but matvec_forward's split of a
# large weight): at batch 1 the matrices are vectors and thread start-up would
# cost more than the work. The loop that samples with it is generate.pxi.

cimport cython
from libc.math cimport sqrtf
from libc.stdint cimport int32_t, uint64_t
from libc.string cimport memcpy
import numpy as np


cdef inline Py_ssize_t cache_row(Py_ssize_t l, Py_ssize_t b, Py_ssize_t t, Py_ssize_t B,
                                 Py_ssize_t maxT, Py_ssize_t C) noexcept nogil:
    # Offset of layer l, batch row b, position t in a cache laid out (L, B, maxT, C).
    return ((l * B + b) * maxT + t) * C


@cython.final
cdef class Decoder:
    """A Graph's KV cache and its one-position forward (made by Graph, not by users).

    It reads the Graph's weights through the same parameter pointers and owns
    one Buffer: the cache and the per-row scratch, laid out by _take.
    """
    cdef int V, max_T, L, NH, C
    cdef bint gelu_exact
    cdef Params p             # the Graph's parameters (params_buf keeps them alive)
    cdef Buffer params_buf, buf
    cdef int B                # rows the cache is laid out for; 0 before the first prefill
    cdef int cache_len        # positions 0..cache_len-1 of every row are cached
    cdef float* k_cache       # (L, B, maxT, C)
    cdef float* v_cache       # (L, B, maxT, C)
    cdef float* x             # (B, C) residual stream of the new position
    cdef float* ln            # (B, C)
    cdef float* qkv           # (B, 3C)
    cdef float* atty          # (B, C)
    cdef float* branch        # (B, C)
    cdef float* fch           # (B, 4C)
    cdef float* logits        # (B, V)
    cdef float* scores        # (maxT) one head's attention over the cached past

    cdef void bind(self, Buffer params, Params* p, int V, int max_T, int L, int NH, int C,
                   bint gelu_exact):
        self.params_buf = params
        self.p = p[0]
        self.V, self.max_T, self.L, self.NH, self.C = V, max_T, L, NH, C
        self.gelu_exact = gelu_exact
        self.B = 0
        self.cache_len = 0

    cdef Py_ssize_t _layout(self, float* base, int B):
        # The block's arrays, from base (or only counted, if base is NULL).
        cdef Py_ssize_t used = 0, C = self.C
        cdef Py_ssize_t kv = <Py_ssize_t>self.L * B * self.max_T * C
        _take(&self.k_cache, kv, base, &used)
        _take(&self.v_cache, kv, base, &used)
        _take(&self.x, B * C, base, &used)
        _take(&self.ln, B * C, base, &used)
        _take(&self.qkv, B * 3 * C, base, &used)
        _take(&self.atty, B * C, base, &used)
        _take(&self.branch, B * C, base, &used)
        _take(&self.fch, B * 4 * C, base, &used)
        _take(&self.logits, <Py_ssize_t>B * self.V, base, &used)
        _take(&self.scores, self.max_T, base, &used)
        return used

    cdef reserve(self, int B):
        # Lay the block out for B rows (a new block only when B changes).
        if self.B != B:
            self.buf = None     # free the old block before allocating the new one
            self.buf = Buffer(self._layout(NULL, B))
            self.B = B
        self._layout(self.buf.data, B)

    cdef void fill(self, Activations* a, int T) noexcept nogil:
        # After the Graph's forward on (self.B, T): copy every layer's k, v rows
        # into the cache.
        cdef Py_ssize_t l, b, t, C = self.C, B = self.B, maxT = self.max_T
        cdef Py_ssize_t N = B * T, width = qkv_width(self.C)
        cdef const float* qkv
        cdef const float* row
        for l in range(self.L):
            qkv = layer_acts(a, l, N, C, B * self.NH * <Py_ssize_t>T * T).qkv
            for b in range(B):
                for t in range(T):
                    row = qkv + (b * T + t) * width
                    memcpy(self.k_cache + cache_row(l, b, t, B, maxT, C), row + k_col(self.C),
                           C * 4)
                    memcpy(self.v_cache + cache_row(l, b, t, B, maxT, C), row + v_col(self.C),
                           C * 4)
        self.cache_len = T

    cdef float* copy_last_logits(self, const float* logits, int T):
        # After the Graph's forward on (self.B, T): each row's last-position logits.
        cdef Py_ssize_t b, V = self.V
        for b in range(self.B):
            memcpy(self.logits + b * V, logits + (b * T + T - 1) * V, V * 4)
        return self.logits

    cdef check_step(self, const int32_t[::1] tokens, int pos):
        # A decode_logits call's arguments, before the GIL is released.
        if self.B == 0 or tokens.shape[0] != self.B:
            raise ValueError("decode_logits needs prefill_logits with the same batch first")
        if not 1 <= pos < self.max_T or pos > self.cache_len:
            raise ValueError(f"pos {pos} is outside the filled cache (length {self.cache_len})")
        _need_ids(tokens, self.B, self.V, "tokens")

    cdef logits_array(self):
        # A copy of the last decode step's logits, (B, V).
        cdef Py_ssize_t off = self.logits - self.buf.data
        return np.asarray(self.buf)[off:off + <Py_ssize_t>self.B * self.V].reshape(
            self.B, self.V).copy()

    cdef void decode_one(self, const int32_t* tokens, int pos) noexcept nogil:
        # tokens (B): one new token per row at position pos; fills logits (B, V).
        cdef int B = self.B, C = self.C, NH = self.NH, V = self.V, hs = C // NH
        cdef int width = qkv_width(C)
        cdef Py_ssize_t maxT = self.max_T, l, b, h, j, c
        cdef Params* w = &self.p
        cdef LayerParams lw
        cdef float mean, rstd, scale = 1.0 / sqrtf(hs), mx, total, s
        cdef float* x
        cdef const float* q
        cdef const float* kc
        cdef const float* vc
        cdef float* y
        for b in range(B):
            x = self.x + b * C
            for c in range(C):
                x[c] = w.wte[<Py_ssize_t>tokens[b] * C + c] + w.wpe[pos * C + c]
        for l in range(self.L):
            lw = layer_params(w, l, C)
            for b in range(B):
                layernorm_row(self.ln + b * C, &mean, &rstd, self.x + b * C,
                              lw.ln1w, lw.ln1b, C)
            matvec_forward(self.qkv, self.ln, lw.qkvw, lw.qkvb, B, C, width)
            for b in range(B):
                kc = self.k_cache + cache_row(l, b, 0, B, maxT, C)
                vc = self.v_cache + cache_row(l, b, 0, B, maxT, C)
                memcpy(<float*>kc + pos * C, self.qkv + b * width + k_col(C), C * 4)
                memcpy(<float*>vc + pos * C, self.qkv + b * width + v_col(C), C * 4)
                for h in range(NH):
                    q = self.qkv + b * width + h * hs
                    y = self.atty + b * C + h * hs
                    # scores over the cached past 0..pos, softmax, weighted sum of v
                    mx = -3.0e38
                    for j in range(pos + 1):
                        s = dot(q, kc + j * C + h * hs, hs) * scale
                        self.scores[j] = s
                        if s > mx:
                            mx = s
                    total = 0.0
                    for j in range(pos + 1):
                        self.scores[j] = fast_expf(self.scores[j] - mx)
                        total = total + self.scores[j]
                    for c in range(hs):
                        y[c] = 0.0
                    for j in range(pos + 1):
                        s = self.scores[j] / total
                        for c in range(hs):
                            y[c] = y[c] + s * vc[j * C + h * hs + c]
            matvec_forward(self.branch, self.atty, lw.attprojw, lw.attprojb, B, C, C)
            add_into(self.x, self.branch, <Py_ssize_t>B * C)
            for b in range(B):
                layernorm_row(self.ln + b * C, &mean, &rstd, self.x + b * C,
                              lw.ln2w, lw.ln2b, C)
            matvec_forward(self.fch, self.ln, lw.fcw, lw.fcb, B, C, 4 * C)
            gelu_span(self.fch, self.fch, <Py_ssize_t>B * 4 * C, self.gelu_exact)
            matvec_forward(self.branch, self.fch, lw.fcprojw, lw.fcprojb, B, 4 * C, C)
            add_into(self.x, self.branch, <Py_ssize_t>B * C)
        for b in range(B):
            layernorm_row(self.ln + b * C, &mean, &rstd, self.x + b * C,
                          w.lnfw, w.lnfb, C)
        matvec_forward(self.logits, self.ln, w.wte, NULL, B, C, V)


cdef class Graph(TrainingGraph):
    """The GPT's compute graph as femtogpt.model uses it: the training graph
    (training_graph.pxi) and a Decoder over the same weights, for sampling.

    Every call takes the TrainingGraph's busy flag: the decoder's prefill is the
    training graph's forward, so the two share the activation block.
    """
    cdef Decoder decoder      # the KV cache, for prefill_logits, decode_logits, generate

    def __init__(self, int V, int max_T, int L, int NH, int C,
                 Buffer params not None, Buffer grads not None, dict offsets not None,
                 bint bias=True, bint gelu_exact=False):
        TrainingGraph.__init__(self, V, max_T, L, NH, C, params, grads, offsets, bias,
                               gelu_exact)
        self.decoder = Decoder()
        self.decoder.bind(params, &self.p, V, max_T, L, NH, C, gelu_exact)

    @property
    def cache_len(self):
        return self.decoder.cache_len

    def decode_logits(self, const int32_t[::1] tokens not None, int pos):
        """One decode step (for tests): tokens (B,) at position pos -> logits (B, V).

        The cache must hold positions 0..pos-1 (from prefill_logits and earlier calls).
        """
        self.decoder.check_step(tokens, pos)
        self._acquire()
        try:
            with nogil:
                self.decoder.decode_one(&tokens[0], pos)
        finally:
            self.busy = False
        self.decoder.cache_len = pos + 1
        return self.decoder.logits_array()

    def prefill_logits(self, const int32_t[:, ::1] idx not None):
        """Fill the KV cache from idx (B, T); returns the logits of the last position."""
        self._acquire()
        try:
            return self._prefill(idx)
        finally:
            self.busy = False

    def _prefill(self, const int32_t[:, ::1] idx not None):
        # fp32 products even in a bf16 graph: the decoder that continues from
        # this cache is fp32 (sampling in bf16 is another change).
        self._forward_checked(idx, None, 0.0, 0, False)
        self.decoder.reserve(self.B)
        with nogil:
            self.decoder.fill(&self.a, self.T)
        logits = self.logits_view().reshape(self.B, self.T, self.V)
        return logits[:, -1, :].copy()

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
