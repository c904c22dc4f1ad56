# The memory layout of the graph: which tensors the parameter block holds, what
# forward saves in the activation block, and each layer's slices of both,
# named once here (llm.c's style) so that the passes never compute an offset.

from libc.stdint cimport uint16_t, uint64_t


# The parameter tensors, by the keys femtogpt/model/params.py's table uses. Each
# per-layer tensor is stacked over layers: (L, ...). A model without biases
# (nanoGPT's bias=False) has no BIAS_KEYS tensors: their pointers are NULL.
PARAM_KEYS = ("wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw",
              "ln1w", "ln1b", "qkvb", "attprojb", "ln2w", "ln2b", "fcb", "fcprojb",
              "lnfw", "lnfb")
BIAS_KEYS = ("ln1b", "qkvb", "attprojb", "ln2b", "fcb", "fcprojb", "lnfb")

cdef struct Params:
    float* wte        # (V, C)       token embedding, also the lm_head
    float* wpe        # (maxT, C)    position embedding
    float* qkvw       # (L, 3C, C)   attn.c_attn.weight: q, k, v stacked on the output axis
    float* attprojw   # (L, C, C)    attn.c_proj.weight
    float* fcw        # (L, 4C, C)   mlp.c_fc.weight
    float* fcprojw    # (L, C, 4C)   mlp.c_proj.weight
    float* ln1w       # (L, C)
    float* ln1b       # (L, C)
    float* qkvb       # (L, 3C)
    float* attprojb   # (L, C)
    float* ln2w       # (L, C)
    float* ln2b       # (L, C)
    float* fcb        # (L, 4C)
    float* fcprojb    # (L, C)
    float* lnfw       # (C)
    float* lnfb       # (C)


cdef struct Activations:
    # Saved by forward for backward, stacked over layers where per layer.
    float* encoded    # (N, C)       embeddings: the residual stream entering layer 0
    float* ln1        # (L, N, C)
    float* ln1_mean   # (L, N)
    float* ln1_rstd   # (L, N)
    float* qkv        # (L, N, 3C)
    float* atty       # (L, N, C)    attention output, heads side by side, before c_proj
    float* res2       # (L, N, C)    residual stream after the attention branch
    float* ln2        # (L, N, C)
    float* ln2_mean   # (L, N)
    float* ln2_rstd   # (L, N)
    float* fch        # (L, N, 4C)   mlp.c_fc output
    float* fch_gelu   # (L, N, 4C)
    float* res3       # (L, N, C)    residual stream leaving the layer
    float* lnf        # (N, C)
    float* lnf_mean   # (N)
    float* lnf_rstd   # (N)
    float* logits     # (N, V)
    float* lse        # (N)          logsumexp of each row of logits
    float* losses     # (N)
    # Scratch, reused by every layer and not needed after the step:
    float* branch     # (N, C)       a branch's c_proj output before the residual add
    float* dres       # (N, C)       gradient of the residual stream
    float* dbranch    # (N, C)       gradient of a branch output through dropout
    float* dln        # (N, C)       gradient of a LayerNorm output / attention output
    float* dqkv       # (N, 3C)
    float* dfch       # (N, 4C)      gradient of the mlp hidden layer (before/after GELU)
    float* att        # (L, B, NH, T, T) attention probabilities, kept when they take
                      # at most ATT_KEEP_MAX_FLOATS (else NULL: backward recomputes them)
    float* att_scratch  # (n_slots, ATT_SLOT, T, T) per-thread attention workspace


cdef struct LayerParams:
    # One layer's slices of the stacked parameters (or of their gradients).
    float* ln1w       # (C)
    float* ln1b       # (C) or NULL
    float* qkvw       # (3C, C)
    float* qkvb       # (3C) or NULL
    float* attprojw   # (C, C)
    float* attprojb   # (C) or NULL
    float* ln2w       # (C)
    float* ln2b       # (C) or NULL
    float* fcw        # (4C, C)
    float* fcb        # (4C) or NULL
    float* fcprojw    # (C, 4C)
    float* fcprojb    # (C) or NULL


cdef inline float* layer_slice(float* stacked, Py_ssize_t l, Py_ssize_t size) noexcept nogil:
    # Layer l's slice of a tensor stacked over layers; NULL stays NULL (no bias).
    return NULL if stacked == NULL else stacked + l * size


cdef inline LayerParams layer_params(Params* p, Py_ssize_t l, Py_ssize_t C) noexcept nogil:
    cdef LayerParams lp
    lp.ln1w = layer_slice(p.ln1w, l, C)
    lp.ln1b = layer_slice(p.ln1b, l, C)
    lp.qkvw = layer_slice(p.qkvw, l, 3 * C * C)
    lp.qkvb = layer_slice(p.qkvb, l, 3 * C)
    lp.attprojw = layer_slice(p.attprojw, l, C * C)
    lp.attprojb = layer_slice(p.attprojb, l, C)
    lp.ln2w = layer_slice(p.ln2w, l, C)
    lp.ln2b = layer_slice(p.ln2b, l, C)
    lp.fcw = layer_slice(p.fcw, l, 4 * C * C)
    lp.fcb = layer_slice(p.fcb, l, 4 * C)
    lp.fcprojw = layer_slice(p.fcprojw, l, 4 * C * C)
    lp.fcprojb = layer_slice(p.fcprojb, l, C)
    return lp


cdef struct LayerActs:
    # One layer's slices of the stacked activations (N = B*T rows).
    float* res_in     # (N, C)       residual stream entering the layer
    float* ln1        # (N, C)
    float* ln1_mean   # (N)
    float* ln1_rstd   # (N)
    float* qkv        # (N, 3C)
    float* att        # (B, NH, T, T), or NULL
    float* atty       # (N, C)
    float* res2       # (N, C)
    float* ln2        # (N, C)
    float* ln2_mean   # (N)
    float* ln2_rstd   # (N)
    float* fch        # (N, 4C)
    float* fch_gelu   # (N, 4C)
    float* res3       # (N, C)       residual stream leaving the layer


cdef inline LayerActs layer_acts(Activations* a, Py_ssize_t l, Py_ssize_t N,
                                 Py_ssize_t C, Py_ssize_t att_size) noexcept nogil:
    cdef LayerActs la
    cdef Py_ssize_t NC = N * C
    la.res_in = a.encoded if l == 0 else a.res3 + (l - 1) * NC
    la.ln1 = a.ln1 + l * NC
    la.ln1_mean = a.ln1_mean + l * N
    la.ln1_rstd = a.ln1_rstd + l * N
    la.qkv = a.qkv + l * 3 * NC
    la.att = a.att + l * att_size if a.att != NULL else NULL
    la.atty = a.atty + l * NC
    la.res2 = a.res2 + l * NC
    la.ln2 = a.ln2 + l * NC
    la.ln2_mean = a.ln2_mean + l * N
    la.ln2_rstd = a.ln2_rstd + l * N
    la.fch = a.fch + l * 4 * NC
    la.fch_gelu = a.fch_gelu + l * 4 * NC
    la.res3 = a.res3 + l * NC
    return la


# Dropout sites: one random stream per place dropout is applied in a step, so
# that forward and backward draw the same masks. Both passes take their seeds
# from these two functions, never from site numbers of their own.
DEF SITES_PER_LAYER = 4    # site 0 is the embeddings'; block l has 4l+1 .. 4l+3


cdef struct LayerDropout:
    uint64_t att         # the attention probabilities
    uint64_t att_proj    # the attention branch's output (after c_proj)
    uint64_t mlp_proj    # the MLP branch's output (after c_proj)


cdef inline uint64_t site_seed(uint64_t seed, uint64_t site) noexcept nogil:
    # A separate dropout stream for each place dropout is applied in one step.
    return (<uint64_t>hash_u32(seed, 2 * site) << 32) | hash_u32(seed, 2 * site + 1)


cdef inline uint64_t embedding_dropout_seed(uint64_t seed) noexcept nogil:
    return site_seed(seed, 0)


cdef inline LayerDropout layer_dropout(uint64_t seed, Py_ssize_t l) noexcept nogil:
    cdef LayerDropout d
    cdef uint64_t first = <uint64_t>(SITES_PER_LAYER * l)
    d.att = site_seed(seed, first + 1)
    d.att_proj = site_seed(seed, first + 2)
    d.mlp_proj = site_seed(seed, first + 3)
    return d


cdef inline void _take(float** slot, Py_ssize_t size, float* base,
                       Py_ssize_t* used) noexcept:
    # Bump allocation inside a block, rounded to whole cache lines: base NULL
    # only counts (a first pass sizes the block, a second assigns the pointers).
    if base != NULL:
        slot[0] = base + used[0]
    used[0] += ((size + ALIGN_FLOATS - 1) // ALIGN_FLOATS) * ALIGN_FLOATS


cdef Py_ssize_t activation_layout(Activations* a, float* base, int B, int T, int n_slots,
                                  Py_ssize_t C, Py_ssize_t L, Py_ssize_t V, Py_ssize_t NH):
    """Assign activation pointers from base (or only count, if base is NULL).

    Returns the number of floats needed. Every array starts on a cache line.
    """
    cdef Py_ssize_t used = 0
    cdef Py_ssize_t N = <Py_ssize_t>B * T
    cdef Py_ssize_t TT = <Py_ssize_t>T * T
    _take(&a.encoded, N * C, base, &used)
    _take(&a.ln1, L * N * C, base, &used)
    _take(&a.ln1_mean, L * N, base, &used)
    _take(&a.ln1_rstd, L * N, base, &used)
    _take(&a.qkv, L * N * 3 * C, base, &used)
    if L * B * NH * TT <= ATT_KEEP_MAX_FLOATS:
        _take(&a.att, L * B * NH * TT, base, &used)
    else:
        a.att = NULL
    _take(&a.atty, L * N * C, base, &used)
    _take(&a.res2, L * N * C, base, &used)
    _take(&a.ln2, L * N * C, base, &used)
    _take(&a.ln2_mean, L * N, base, &used)
    _take(&a.ln2_rstd, L * N, base, &used)
    _take(&a.fch, L * N * 4 * C, base, &used)
    _take(&a.fch_gelu, L * N * 4 * C, base, &used)
    _take(&a.res3, L * N * C, base, &used)
    _take(&a.lnf, N * C, base, &used)
    _take(&a.lnf_mean, N, base, &used)
    _take(&a.lnf_rstd, N, base, &used)
    _take(&a.logits, N * V, base, &used)
    _take(&a.lse, N, base, &used)
    _take(&a.losses, N, base, &used)
    _take(&a.branch, N * C, base, &used)
    _take(&a.dres, N * C, base, &used)
    _take(&a.dbranch, N * C, base, &used)
    _take(&a.dln, N * C, base, &used)
    _take(&a.dqkv, N * 3 * C, base, &used)
    _take(&a.dfch, N * 4 * C, base, &used)
    _take(&a.att_scratch, n_slots * ATT_SLOT * TT, base, &used)
    return used


cdef float* _tensor_at(float* base, dict offsets, key):
    # A tensor missing from offsets (a bias, in a model without them) is NULL.
    return base + <Py_ssize_t>offsets[key] if key in offsets else NULL


cdef Params _param_pointers(float* base, dict offsets):
    cdef Params p
    p.wte = _tensor_at(base, offsets, "wte")
    p.wpe = _tensor_at(base, offsets, "wpe")
    p.qkvw = _tensor_at(base, offsets, "qkvw")
    p.attprojw = _tensor_at(base, offsets, "attprojw")
    p.fcw = _tensor_at(base, offsets, "fcw")
    p.fcprojw = _tensor_at(base, offsets, "fcprojw")
    p.ln1w = _tensor_at(base, offsets, "ln1w")
    p.ln1b = _tensor_at(base, offsets, "ln1b")
    p.qkvb = _tensor_at(base, offsets, "qkvb")
    p.attprojb = _tensor_at(base, offsets, "attprojb")
    p.ln2w = _tensor_at(base, offsets, "ln2w")
    p.ln2b = _tensor_at(base, offsets, "ln2b")
    p.fcb = _tensor_at(base, offsets, "fcb")
    p.fcprojb = _tensor_at(base, offsets, "fcprojb")
    p.lnfw = _tensor_at(base, offsets, "lnfw")
    p.lnfb = _tensor_at(base, offsets, "lnfb")
    return p


cdef _check_param_offsets(int V, int max_T, int L, int C, bint bias, dict offsets,
                          Buffer params, Buffer grads):
    # The offsets femtogpt/model laid the parameters out at: exactly the tensors of
    # this model, each inside both buffers.
    # Python integers: no C int overflow for absurd sizes.
    V_, T_, L_, C_ = int(V), int(max_T), int(L), int(C)
    sizes = {
        "wte": V_ * C_, "wpe": T_ * C_, "qkvw": L_ * 3 * C_ * C_,
        "attprojw": L_ * C_ * C_, "fcw": L_ * 4 * C_ * C_, "fcprojw": L_ * 4 * C_ * C_,
        "ln1w": L_ * C_, "ln1b": L_ * C_, "qkvb": L_ * 3 * C_, "attprojb": L_ * C_,
        "ln2w": L_ * C_, "ln2b": L_ * C_, "fcb": L_ * 4 * C_, "fcprojb": L_ * C_,
        "lnfw": C_, "lnfb": C_,
    }
    keys = [k for k in PARAM_KEYS if bias or k not in BIAS_KEYS]
    if set(offsets) != set(keys):
        raise ValueError(f"offsets must name exactly the {'' if bias else 'bias-free '}"
                         f"parameters {keys}, got {sorted(offsets)}")
    for key in keys:
        off = offsets[key]
        if off < 0 or off + sizes[key] > params.size or off + sizes[key] > grads.size:
            raise ValueError(f"parameter {key} at offset {off} does not fit the buffers")
    if params.size != grads.size:
        raise ValueError("params and grads buffers differ in size")


# The bf16 graph's packed weights (gemm_bf16.pxi: PackedWeight, both layouts
# of each matrix), refreshed from the fp32 parameters once per optimizer step.
cdef struct LayerPacks:
    PackedWeight qkvw
    PackedWeight attprojw
    PackedWeight fcw
    PackedWeight fcprojw


cdef struct LayerPackPtrs:
    # One layer's packed weights for the products, all NULL in an fp32 pass.
    const PackedWeight* qkvw
    const PackedWeight* attprojw
    const PackedWeight* fcw
    const PackedWeight* fcprojw


cdef inline LayerPackPtrs layer_packs(LayerPacks* packs, Py_ssize_t l) noexcept nogil:
    cdef LayerPackPtrs k
    if packs == NULL:
        k.qkvw = k.attprojw = k.fcw = k.fcprojw = NULL
    else:
        k.qkvw = &packs[l].qkvw
        k.attprojw = &packs[l].attprojw
        k.fcw = &packs[l].fcw
        k.fcprojw = &packs[l].fcprojw
    return k


cdef inline void _take16(uint16_t** slot, size_t size, uint16_t* base,
                         size_t* used) noexcept:
    # _take for bf16 elements: 32 to a cache line.
    if base != NULL:
        slot[0] = base + used[0]
    used[0] += (size + 31) // 32 * 32


cdef inline void _take_weight(PackedWeight* pw, int C_out, int C_in, uint16_t* base,
                              size_t* used) noexcept:
    _take16(&pw.wt, gemm_bf16_packed_b_size(C_out, C_in), base, used)
    _take16(&pw.w, gemm_bf16_packed_b_size(C_in, C_out), base, used)


cdef size_t pack_layout(LayerPacks* packs, PackedWeight* lm_head, uint16_t* base,
                        int L, int C, int V):
    """Assign the packed weights' pointers from base (or only count): bf16 elements."""
    cdef size_t used = 0
    cdef int l
    for l in range(L):
        _take_weight(&packs[l].qkvw, qkv_width(C), C, base, &used)
        _take_weight(&packs[l].attprojw, C, C, base, &used)
        _take_weight(&packs[l].fcw, 4 * C, C, base, &used)
        _take_weight(&packs[l].fcprojw, C, 4 * C, base, &used)
    _take_weight(lm_head, V, C, base, &used)      # the lm_head is wte, (V, C)
    return used


cdef void pack_weight(PackedWeight* pw, const float* W, int C_out, int C_in,
                      int n_threads) noexcept nogil:
    # Both layouts of W (C_out, C_in), the threads splitting each one's columns.
    pack_b_parallel(pw.wt, True, C_out, C_in, W, C_in, n_threads)
    pack_b_parallel(pw.w, False, C_in, C_out, W, C_in, n_threads)


cdef size_t bf16_work_layout(Bf16Work* bw, char* base, int B, int T, int n_slots,
                             int C, int V, int NH):
    """Lay out a bf16 workspace for (B, T) from base (or only count): bytes.

    bpack holds the largest activation operand of a weight gradient (fc_proj's
    input, N x 4C); each thread's scratch the largest A block of any product
    (the header sizes them), or a whole attention head's operands."""
    cdef int N = B * T, hs = C // NH
    cdef size_t stride = 64, s, bpack
    # (M, K) of every product with a packed B: forward, dx, dweight (the size
    # does not depend on N when B is packed; a thread's slice has M or fewer rows)
    for M, K in ((N, C), (N, 4 * C), (N, qkv_width(C)), (N, V),
                 (qkv_width(C), N), (C, N), (4 * C, N), (V, N)):
        s = gemm_bf16_scratch_size(M, 1, K, 1)
        if s > stride:
            stride = s
    for s in (gemm_bf16_scratch_size(T, T, hs, 0), gemm_bf16_scratch_size(T, hs, T, 0)):
        if s > stride:
            stride = s
    stride = (stride + 63) // 64 * 64
    bpack = gemm_bf16_packed_b_size(4 * C, N)
    if gemm_bf16_packed_b_size(C, N) > bpack:
        bpack = gemm_bf16_packed_b_size(C, N)
    bpack = (bpack * 2 + 63) // 64 * 64
    if base != NULL:
        bw.bpack = <uint16_t*>base
        bw.scratch = base + bpack
        bw.stride = stride
        bw.n_slots = n_slots
    return bpack + <size_t>n_slots * stride
