# The linear layers' weights as sampling reads them: fp32 straight from the
# parameter block, or converted once, at load, to bf16 (packed for
# gemm_bf16.pxi) or int8 (q8 blocks for gemm_q8.pxi). The decoder (decoding.pxi)
# multiplies through linear_rows() and never asks which type it holds.
#
# Embedding (wte as a table, wpe) and LayerNorm stay fp32: they are read one
# row per token, so converting them saves no time, and the embedding is where
# rounding would hurt every token. The lm_head is wte again, converted like the
# other matrices.

from libc.stdint cimport uint8_t, uint16_t


DEF LINEAR_FP32 = 0
DEF LINEAR_BF16 = 1
DEF LINEAR_INT8 = 2

LINEAR_KINDS = {"fp32": LINEAR_FP32, "bf16": LINEAR_BF16, "int8": LINEAR_INT8}


cdef struct LinearWeight:
    # One weight W (N, K) for out (M, N) = x (M, K) @ W^T (+ bias).
    int kind
    int N, K
    const float* w32          # fp32: W itself, in the parameter block
    uint16_t* wt              # bf16: W^T packed by gemm_bf16_pack_b
    Q8Weight q8               # int8: gemm_q8's blocks


cdef struct LayerLinear:
    LinearWeight qkvw
    LinearWeight attprojw
    LinearWeight fcw
    LinearWeight fcprojw


cdef struct LinearWork:
    # The products' workspace for up to `rows` rows (the decoder's, allocated once).
    Bf16Work bw
    uint8_t* q8
    Py_ssize_t rows


cdef void linear_rows(float* out, const float* inp, const float* bias, Py_ssize_t M,
                      const LinearWeight* lw, LinearWork* work,
                      bint decode) noexcept nogil:
    # out (M, N) = inp (M, K) @ W^T + bias (N, or NULL), every thread.
    # decode: M is the batch of one decode step. In fp32 that takes matvec_forward
    # (a dot product per output) and the prompt pass sgemm, as before types
    # existed; bf16 and int8 pick their own kernel by M and give the same bits
    # either way, so a token's logits do not depend on which pass made them.
    if lw.kind == LINEAR_BF16:
        bf16_matmul_packed(out, inp, bias, M, lw.K, lw.N, lw.wt, &work.bw)
    elif lw.kind == LINEAR_INT8:
        q8_matmul(out, inp, bias, M, lw.K, lw.N, &lw.q8, work.q8)
    elif decode:
        matvec_forward(out, inp, lw.w32, bias, <int>M, lw.K, lw.N)
    else:
        matmul_forward(out, inp, lw.w32, bias, M, lw.K, lw.N, NULL, NULL)


cdef size_t linear_bytes(int kind, int N, int K) noexcept nogil:
    # Bytes of one converted weight, rounded to whole cache lines.
    cdef size_t n = 0
    if kind == LINEAR_BF16:
        n = gemm_bf16_packed_b_size(N, K) * 2
    elif kind == LINEAR_INT8:
        n = q8_weight_bytes(N, K)
    return (n + 63) // 64 * 64


cdef void linear_convert(LinearWeight* lw, int kind, const float* W, int N, int K,
                         char* mem, int n_threads) noexcept nogil:
    # lw = W (N, K) as `kind`; mem: linear_bytes(kind, N, K) bytes (unused for fp32).
    lw.kind, lw.N, lw.K = kind, N, K
    lw.w32 = W
    lw.wt = NULL
    if kind == LINEAR_BF16:
        lw.wt = <uint16_t*>mem
        bf16_pack_wt(lw.wt, W, N, K, n_threads)
    elif kind == LINEAR_INT8:
        q8_pack_weight(&lw.q8, <uint8_t*>mem, W, N, K, n_threads)
    if kind != LINEAR_FP32:
        lw.w32 = NULL     # the fp32 matrix may be released after this


cdef size_t linear_work_bytes(int kind, Py_ssize_t rows, int K_max, int n_threads) noexcept nogil:
    if kind == LINEAR_BF16:
        return bf16_matmul_work_bytes(rows, K_max, n_threads)
    if kind == LINEAR_INT8:
        return q8_work_bytes(<int>rows, K_max, n_threads)
    return 0


cdef void linear_work_layout(LinearWork* work, int kind, char* mem, Py_ssize_t rows,
                             int K_max, int n_threads) noexcept nogil:
    work.rows = rows
    work.q8 = NULL
    if kind == LINEAR_BF16:
        bf16_matmul_work_layout(&work.bw, mem, rows, K_max, n_threads)
    elif kind == LINEAR_INT8:
        work.q8 = <uint8_t*>mem


cdef class LinearWeights:
    """A model's linear layers (four per block, and the lm_head) at one type:
    fp32 views of the parameter block, or converted copies in one Buffer."""
    cdef readonly str dtype
    cdef int kind, L, C, V
    cdef LayerLinear* layers      # (L)
    cdef LinearWeight lm_head     # wte (V, C)
    cdef Buffer mem               # the converted copies; None for fp32
    cdef readonly Py_ssize_t nbytes   # bytes of the copies (fp32: of the blocks' matrices)

    def __dealloc__(self):
        PyMem_Free(self.layers)

    cdef setup(self, str dtype, Params* p, int L, int C, int V, Buffer release_from=None,
               dict offsets=None):
        # Convert from the fp32 parameters. With release_from (the parameter
        # Buffer) and its offsets, each stacked matrix's fp32 pages are given
        # back as soon as its L layers are converted, so the process never holds
        # both whole copies (peak: the fp32 model + one converted matrix).
        cdef int l, n = openmp.omp_get_max_threads(), which
        cdef size_t total = 0, used = 0
        cdef int kind = LINEAR_KINDS[dtype]
        cdef char* base
        cdef LayerParams lw
        cdef LinearWeight* dst
        cdef const float* src
        cdef int N, K
        self.dtype, self.kind, self.L, self.C, self.V = dtype, kind, L, C, V
        self.layers = <LayerLinear*>PyMem_Malloc(L * sizeof(LayerLinear))
        if self.layers == NULL:
            raise MemoryError()
        # (key, N, K) of the four matrices of a block, in the parameter table's names
        shapes = (("qkvw", qkv_width(C), C), ("attprojw", C, C), ("fcw", 4 * C, C),
                  ("fcprojw", C, 4 * C))
        for key, N, K in shapes:
            total += L * linear_bytes(kind, N, K)
        total += linear_bytes(kind, V, C)
        self.mem = Buffer((total + 3) // 4) if kind != LINEAR_FP32 else None
        if self.mem is not None:
            self.mem.prefer_huge_pages()
        base = <char*>self.mem.data if self.mem is not None else NULL
        for which, (key, N, K) in enumerate(shapes):
            with nogil:
                for l in range(L):
                    lw = layer_params(p, l, C)
                    if which == 0:
                        dst, src = &self.layers[l].qkvw, lw.qkvw
                    elif which == 1:
                        dst, src = &self.layers[l].attprojw, lw.attprojw
                    elif which == 2:
                        dst, src = &self.layers[l].fcw, lw.fcw
                    else:
                        dst, src = &self.layers[l].fcprojw, lw.fcprojw
                    linear_convert(dst, kind, src, N, K, base + used, n)
                    used += linear_bytes(kind, N, K)
            if release_from is not None and kind != LINEAR_FP32:
                release_from.release(offsets[key], <Py_ssize_t>L * N * K)
        with nogil:
            # the lm_head: wte stays fp32 (it is the embedding too)
            linear_convert(&self.lm_head, kind, p.wte, V, C, base + used, n)
        if kind == LINEAR_FP32:
            # the blocks' matrices; the lm_head is wte itself, counted with the
            # embeddings by the caller
            self.nbytes = 4 * <Py_ssize_t>L * 12 * C * C
        else:
            self.nbytes = <Py_ssize_t>total
