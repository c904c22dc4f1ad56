# Causal multi-head self-attention: from qkv (c_attn's output) to the heads'
# outputs side by side (c_proj's input), one (batch, head) per thread.
# A bf16 graph passes its workspace (bw, gemm_bf16.pxi): then q @ k^T, att @ v
# and their backward run in bf16 on each thread's scratch (gemm_head); the
# softmax and its backward stay fp32.

cimport openmp
from cython.parallel cimport prange
from libc.math cimport sqrtf
from libc.stdint cimport uint32_t, uint64_t


# One row of qkv (N, 3C) is c_attn's output: q, k and v side by side, C columns
# each, head h at columns h*hs of each. Every kernel that splits qkv (here, and
# the KV cache of decoding.pxi) uses these instead of writing +C / +2*C.
cdef inline int qkv_width(int C) noexcept nogil:
    return 3 * C


cdef inline int k_col(int C) noexcept nogil:
    return C


cdef inline int v_col(int C) noexcept nogil:
    return 2 * C


cdef inline void causal_softmax_rows(float* att, int T) noexcept nogil:
    # att (T,T): row i keeps columns 0..i (softmax over them), the rest become 0
    cdef int i, j
    cdef float mx, total, inv
    cdef float* row
    for i in range(T):
        row = att + <Py_ssize_t>i * T
        mx = row[0]
        for j in range(1, i + 1):
            if row[j] > mx:
                mx = row[j]
        total = 0.0
        for j in range(i + 1):
            row[j] = fast_expf(row[j] - mx)
            total = total + row[j]
        inv = 1.0 / total
        for j in range(i + 1):
            row[j] = row[j] * inv
        for j in range(i + 1, T):
            row[j] = 0.0


cdef inline void apply_dropout_tt(float* out, const float* att, int T, float p,
                                  uint64_t seed, uint64_t first) noexcept nogil:
    # out (T,T) = att * mask / (1-p); mask drawn for elements first..first+T*T
    cdef Py_ssize_t i
    cdef uint32_t threshold = dropout_threshold(p)
    cdef float keep_scale = 1.0 / (1.0 - p)
    for i in range(<Py_ssize_t>T * T):
        out[i] = att[i] * dropout_scale(seed, first + i, threshold, keep_scale)


DEF ATT_SLOT = 3     # T x T arrays in one thread's attention scratch
# Attention probabilities are kept for backward while all layers' take at most
# this many floats (1 GiB: femto 8 MB, baby 3 MB, small 604 MB, GPT-2 124M at
# B=4, T=256 151 MB): recomputing them costs one more q @ k^T per head, which
# for small heads is mostly call overhead (femto measured 10-20% slower).
# Above it (GPT-2 124M at B=4, T=1024: 2.4 GB) they are recomputed, and memory
# no longer grows with L * B * NH * T * T.
DEF ATT_KEEP_MAX_FLOATS = 268435456


cdef inline void attention_probs(float* att, const float* qkv, int T, int C,
                                 int hs, char* bf16) noexcept nogil:
    # att (T,T) = softmax over the causal past of scale * q @ k^T, for one
    # (batch, head) whose q, k are column blocks of qkv (T, 3C). Forward and
    # backward both call this on the same inputs with the same single-threaded
    # sgemm (or bf16 product: bf16 is this thread's bf16 scratch, or NULL), so
    # backward recomputes exactly the probabilities forward used.
    cdef int ld = qkv_width(C)
    gemm_head(False, True, T, T, hs, 1.0 / sqrtf(hs), qkv, ld, qkv + k_col(C), ld, 0.0, att, T,
              bf16)
    causal_softmax_rows(att, T)


cdef inline void attention_head_forward(float* out, float* att, float* scratch,
                                        const float* qkv, int T, int C, int hs,
                                        float p, uint64_t seed,
                                        uint64_t first, char* bf16) noexcept nogil:
    # One (batch, head). q, k, v are column blocks of qkv (T, 3C): row stride 3C.
    # out: this head's columns of (T, C), row stride C. att (T,T): where the
    # probabilities go (the thread's scratch in training: nothing T x T is kept).
    # scratch (T,T): the dropped-out probabilities.
    cdef const float* v = qkv + v_col(C)
    cdef const float* att_used = att
    attention_probs(att, qkv, T, C, hs, bf16)
    if p > 0.0:
        apply_dropout_tt(scratch, att, T, p, seed, first)
        att_used = scratch
    # out = att @ v
    gemm_head(False, False, T, hs, T, 1.0, att_used, T, v, qkv_width(C), 0.0, out, C, bf16)


cdef void attention_forward(float* out, float* att, float* scratch,
                            const float* qkv,
                            int B, int T, int C, int NH,
                            float p, uint64_t seed, int n_slots,
                            Bf16Work* bw) noexcept nogil:
    # out (B,T,C): heads side by side; qkv (B,T,3C). att (B,NH,T,T) receives the
    # probabilities, or NULL: training keeps none (backward recomputes them, so
    # memory does not grow with L * B * NH * T * T), each head's go to its
    # thread's scratch. scratch: n_slots * ATT_SLOT * T*T floats, one slot per thread.
    cdef int hs = C // NH
    cdef Py_ssize_t bh, b, h, tt = <Py_ssize_t>T * T
    cdef float* slot
    cdef char* bf16
    cdef int nthreads = openmp.omp_get_max_threads()
    if nthreads > n_slots:
        nthreads = n_slots
    for bh in prange(<Py_ssize_t>B * NH, schedule="dynamic", num_threads=nthreads):
        b = bh // NH
        h = bh % NH
        slot = scratch + openmp.omp_get_thread_num() * ATT_SLOT * tt
        bf16 = bf16_thread_scratch(bw) if bw != NULL else NULL
        attention_head_forward(out + b * T * C + h * hs,
                               att + bh * tt if att != NULL else slot + tt, slot,
                               qkv + b * T * qkv_width(C) + h * hs, T, C, hs,
                               p, seed, <uint64_t>(bh * tt), bf16)


cdef inline void attention_head_backward(float* dqkv, float* scratch,
                                         const float* dout, const float* qkv,
                                         const float* saved_att, int T, int C, int hs,
                                         float p, uint64_t seed,
                                         uint64_t first, char* bf16) noexcept nogil:
    # One (batch, head): dq, dk, dv are written into this head's columns of dqkv.
    # saved_att (T,T): the probabilities forward kept, or NULL: then they are
    # recomputed into scratch (flash attention's trade: a q @ k^T more, instead
    # of keeping every layer's T x T). scratch (ATT_SLOT, T, T): their gradient,
    # the dropped-out probabilities, the recomputed probabilities.
    cdef int ld = qkv_width(C)
    cdef const float* q = qkv
    cdef const float* k = qkv + k_col(C)
    cdef const float* v = qkv + v_col(C)
    cdef float* dq = dqkv
    cdef float* dk = dqkv + k_col(C)
    cdef float* dv = dqkv + v_col(C)
    cdef float scale = 1.0 / sqrtf(hs)
    cdef Py_ssize_t tt = <Py_ssize_t>T * T
    cdef float* datt = scratch            # (T,T): d(att), then d(scores)
    cdef float* att_dropped = scratch + tt
    cdef const float* att = saved_att
    cdef const float* att_used
    cdef uint32_t threshold = dropout_threshold(p)
    cdef float keep_scale = 1.0
    cdef Py_ssize_t i, j
    cdef float dot
    cdef float* drow
    cdef const float* arow
    if att == NULL:
        attention_probs(scratch + 2 * tt, qkv, T, C, hs, bf16)
        att = scratch + 2 * tt
    att_used = att
    if p > 0.0:
        keep_scale = 1.0 / (1.0 - p)
        apply_dropout_tt(att_dropped, att, T, p, seed, first)
        att_used = att_dropped
    # dv = att_used^T @ dout;  datt = dout @ v^T
    gemm_head(True, False, T, hs, T, 1.0, att_used, T, dout, C, 0.0, dv, ld, bf16)
    gemm_head(False, True, T, T, hs, 1.0, dout, C, v, ld, 0.0, datt, T, bf16)
    # through dropout, then softmax: dscore = att * (datt - sum_j att * datt)
    for i in range(T):
        drow = datt + i * T
        arow = att + i * T
        if p > 0.0:
            for j in range(i + 1):
                drow[j] = drow[j] * dropout_scale(seed, first + i * T + j, threshold,
                                                  keep_scale)
        dot = 0.0
        for j in range(i + 1):
            dot = dot + arow[j] * drow[j]
        for j in range(i + 1):
            drow[j] = arow[j] * (drow[j] - dot)
        for j in range(i + 1, T):
            drow[j] = 0.0
    # dq = scale * dscore @ k;  dk = scale * dscore^T @ q
    gemm_head(False, False, T, hs, T, scale, datt, T, k, ld, 0.0, dq, ld, bf16)
    gemm_head(True, False, T, hs, T, scale, datt, T, q, ld, 0.0, dk, ld, bf16)


cdef void attention_backward(float* dqkv, float* scratch,
                             const float* dout, const float* qkv, const float* att,
                             int B, int T, int C, int NH,
                             float p, uint64_t seed, int n_slots,
                             Bf16Work* bw) noexcept nogil:
    # dqkv (B,T,3C) written; dout (B,T,C); qkv as saved by forward; att
    # (B,NH,T,T) the probabilities forward kept, or NULL to recompute them;
    # scratch: n_slots * ATT_SLOT * T*T floats
    cdef int hs = C // NH
    cdef Py_ssize_t bh, b, h, tt = <Py_ssize_t>T * T
    cdef char* bf16
    cdef int nthreads = openmp.omp_get_max_threads()
    if nthreads > n_slots:
        nthreads = n_slots
    for bh in prange(<Py_ssize_t>B * NH, schedule="dynamic", num_threads=nthreads):
        b = bh // NH
        h = bh % NH
        bf16 = bf16_thread_scratch(bw) if bw != NULL else NULL
        attention_head_backward(dqkv + b * T * qkv_width(C) + h * hs,
                                scratch + openmp.omp_get_thread_num() * ATT_SLOT * tt,
                                dout + b * T * C + h * hs,
                                qkv + b * T * qkv_width(C) + h * hs,
                                att + bh * tt if att != NULL else NULL,
                                T, C, hs, p, seed, <uint64_t>(bh * tt), bf16)


def _check_attention_sizes(int B, int T, int C, int NH):
    _need_positive(B=B, T=T, C=C, NH=NH)
    if C % NH:
        raise ValueError(f"C={C} is not divisible by NH={NH}")


def py_attention_forward(float[::1] out, float[::1] att, const float[::1] qkv,
                         int B, int T, int C, int NH, float p=0.0, uint64_t seed=0):
    cdef Py_ssize_t n_slots = openmp.omp_get_max_threads()
    cdef Buffer scratch
    _check_attention_sizes(B, T, C, NH)
    _check_dropout(p)
    for name, arr, size in (("out", out, <Py_ssize_t>B * T * C),
                            ("att", att, <Py_ssize_t>B * NH * T * T),
                            ("qkv", qkv, <Py_ssize_t>B * T * 3 * C)):
        _need(name, arr.shape[0], size)
    scratch = Buffer(n_slots * ATT_SLOT * <Py_ssize_t>T * T)
    with nogil:
        attention_forward(&out[0], &att[0], scratch.data, &qkv[0], B, T, C, NH,
                          p, seed, <int>n_slots, NULL)


def py_attention_backward(float[::1] dqkv, const float[::1] dout, const float[::1] qkv,
                          int B, int T, int C, int NH, float p=0.0, uint64_t seed=0,
                          const float[::1] att=None):
    """att: the probabilities forward wrote (kept), or None: recomputed from qkv."""
    cdef Py_ssize_t n_slots = openmp.omp_get_max_threads()
    cdef Buffer scratch
    _check_attention_sizes(B, T, C, NH)
    _check_dropout(p)
    for name, arr, size in (("dqkv", dqkv, <Py_ssize_t>B * T * 3 * C),
                            ("dout", dout, <Py_ssize_t>B * T * C),
                            ("qkv", qkv, <Py_ssize_t>B * T * 3 * C)):
        _need(name, arr.shape[0], size)
    if att is not None:
        _need("att", att.shape[0], <Py_ssize_t>B * NH * T * T)
    cdef const float* att_ptr = &att[0] if att is not None else NULL
    scratch = Buffer(n_slots * ATT_SLOT * <Py_ssize_t>T * T)
    with nogil:
        attention_backward(&dqkv[0], scratch.data, &dout[0], &qkv[0], att_ptr,
                           B, T, C, NH, p, seed, <int>n_slots, NULL)
