# The GEMM front's bf16 half: gemm_bf16.h (bf16 operands rounded to nearest
# even, fp32 accumulation, a fixed summation order) cut into per-thread slices
# the way gemm_parallel cuts sgemm, plus what the graph needs around it: the
# weights packed once per optimizer step, an activation operand packed once
# per product and shared by the threads, and per-thread scratch allocated once
# by the graph (bf16_workspace), so that nothing is allocated in a kernel.
#
# Every element of C is one sum in the header's fixed order, whatever slice it
# falls in, so a bf16 product is bit-identical at any thread count (sgemm is
# not: see _core.pyx's contract), and the portable path gives the same bits
# as the AVX512_BF16 one.

cimport openmp
from cython.parallel cimport prange
from libc.stdint cimport uint16_t


cdef extern from "kernels/gemm_bf16.h" nogil:
    void gemm_bf16(int trans_a, int trans_b, int M, int N, int K, float alpha,
                   const float* A, int lda, const float* B, int ldb,
                   float beta, float* C, int ldc, void* scratch)
    void gemm_bf16_pack_b(uint16_t* packed, int trans_b, int N, int K,
                          const float* B, int ldb)
    void gemm_bf16_packed(int trans_a, int M, int N, int K, float alpha,
                          const float* A, int lda, const uint16_t* Bp,
                          float beta, float* C, int ldc, void* scratch)
    size_t gemm_bf16_packed_b_size(int N, int K)
    size_t gemm_bf16_scratch_size(int M, int N, int K, int b_packed)
    int gemm_bf16_kpad(int K)
    int gemm_bf16_force(int path)
    int gemm_bf16_path()
    int gemm_bf16_available(int path)


DEF BF16_NR = 32     # columns of a packed B panel (GEMM_BF16_NR)

BF16_PATHS = {"auto": 0, "portable": 1, "avx512bf16": 2, "amx": 3}


cdef struct Bf16Work:
    # The graph's bf16 workspace; a NULL Bf16Work* means the product is fp32.
    uint16_t* bpack      # an activation operand of a weight gradient, packed once
    char* scratch        # per-thread A blocks: thread t's at scratch + t * stride
    size_t stride        # bytes per thread
    int n_slots          # threads with a slice of scratch


cdef struct PackedWeight:
    # One weight W (C_out, C_in) in both layouts its products read (packed once
    # per optimizer step): W^T for the forward x @ W^T, W for dx = dout @ W.
    uint16_t* wt         # op(B) = W^T: N = C_out, K = C_in
    uint16_t* w          # op(B) = W:   N = C_in,  K = C_out


cdef inline char* bf16_thread_scratch(Bf16Work* bw) noexcept nogil:
    return bw.scratch + <size_t>openmp.omp_get_thread_num() * bw.stride


cdef inline int bf16_threads(Bf16Work* bw) noexcept nogil:
    cdef int n = openmp.omp_get_max_threads()
    return n if n < bw.n_slots else bw.n_slots


cdef inline int panel_range(int part, int n_parts, int N, int* start) noexcept nogil:
    # Slice `part` of columns 0..N in whole 32-column panels: a packed B's
    # panels are independent, so a slice starting on a panel reads only its own.
    cdef int panels = (N + BF16_NR - 1) // BF16_NR
    cdef int chunk = (panels + n_parts - 1) // n_parts
    cdef int count
    start[0] = part * chunk * BF16_NR
    count = N - start[0]
    if count > chunk * BF16_NR:
        count = chunk * BF16_NR
    return count


cdef inline void pack_b_slice(int part, int n_parts, uint16_t* packed, bint trans_b,
                              int N, int K, const float* B, int ldb) noexcept nogil:
    # Slice `part` of gemm_bf16_pack_b: whole panels of op(B)'s columns.
    cdef int start = 0
    cdef int count = panel_range(part, n_parts, N, &start)
    if count > 0:
        gemm_bf16_pack_b(packed + <Py_ssize_t>start * gemm_bf16_kpad(K), trans_b, count, K,
                         B + (<Py_ssize_t>start * ldb if trans_b else start), ldb)


cdef void pack_b_parallel(uint16_t* packed, bint trans_b, int N, int K,
                          const float* B, int ldb, int n_threads) noexcept nogil:
    # gemm_bf16_pack_b with the threads splitting op(B)'s columns by panels.
    cdef int parts = (N + BF16_NR - 1) // BF16_NR
    cdef int part
    if parts > n_threads:
        parts = n_threads
    if parts <= 1:
        gemm_bf16_pack_b(packed, trans_b, N, K, B, ldb)
        return
    for part in prange(parts, schedule="static", num_threads=parts):
        pack_b_slice(part, parts, packed, trans_b, N, K, B, ldb)


cdef inline void gemm_bf16_slice(int part, int n_parts, bint trans_a, int M, int N, int K,
                                 float alpha, const float* A, int lda, const uint16_t* Bp,
                                 float beta, float* C, int ldc, char* scratch) noexcept nogil:
    # Slice `part` of gemm_bf16_packed: rows of C, or column panels if N > M.
    cdef int start = 0, count
    if M >= N:
        count = slice_range(part, n_parts, M, &start)
        if count > 0:
            gemm_bf16_packed(trans_a, count, N, K, alpha,
                             A + (<Py_ssize_t>start if trans_a else <Py_ssize_t>start * lda),
                             lda, Bp, beta, C + <Py_ssize_t>start * ldc, ldc, scratch)
    else:
        count = panel_range(part, n_parts, N, &start)
        if count > 0:
            gemm_bf16_packed(trans_a, M, count, K, alpha, A, lda,
                             Bp + <Py_ssize_t>start * gemm_bf16_kpad(K), beta, C + start,
                             ldc, scratch)


cdef void gemm_bf16_parallel(bint trans_a, int M, int N, int K, float alpha,
                             const float* A, int lda, const uint16_t* Bp,
                             float beta, float* C, int ldc, Bf16Work* bw) noexcept nogil:
    """C = alpha * op(A) @ op(B) + beta * C, op(B) packed by gemm_bf16_pack_b;
    each thread its own slice of C, as gemm_parallel."""
    cdef int n_parts = gemm_parts(M, N, bf16_threads(bw))
    cdef int part
    if n_parts <= 1:
        gemm_bf16_packed(trans_a, M, N, K, alpha, A, lda, Bp, beta, C, ldc, bw.scratch)
        return
    for part in prange(n_parts, schedule="static", num_threads=n_parts):
        gemm_bf16_slice(part, n_parts, trans_a, M, N, K, alpha, A, lda, Bp, beta, C, ldc,
                        bf16_thread_scratch(bw))


cdef void gemm_bf16_parallel_b(bint trans_a, bint trans_b, int M, int N, int K, float alpha,
                               const float* A, int lda, const float* B, int ldb,
                               float beta, float* C, int ldc, Bf16Work* bw) noexcept nogil:
    # The same with op(B) an activation (a weight gradient's dout^T @ x): packed
    # once into the shared bw.bpack by all threads, then multiplied by slices.
    pack_b_parallel(bw.bpack, trans_b, N, K, B, ldb, bf16_threads(bw))
    gemm_bf16_parallel(trans_a, M, N, K, alpha, A, lda, bw.bpack, beta, C, ldc, bw)


cdef inline void gemm_head(bint trans_a, bint trans_b, int M, int N, int K, float alpha,
                           const float* A, int lda, const float* B, int ldb, float beta,
                           float* C, int ldc, char* bf16_scratch) noexcept nogil:
    # One attention head's product on the calling thread: sgemm, or bf16 when
    # the graph gave this thread bf16 scratch.
    if bf16_scratch != NULL:
        gemm_bf16(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc,
                  bf16_scratch)
    else:
        gemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)


def set_bf16_path(str name):
    """Force the bf16 GEMM path for every later product in this process: "auto"
    (the best this CPU runs), "portable", "avx512bf16" or "amx". Returns the
    path products take now; ValueError if this CPU cannot run the one asked."""
    if name not in BF16_PATHS:
        raise ValueError(f"bf16 path must be one of {', '.join(BF16_PATHS)}, got {name!r}")
    if gemm_bf16_force(BF16_PATHS[name]) < 0:
        raise ValueError(f"bf16 path {name} does not run on this CPU "
                         f"(it runs: {', '.join(bf16_paths_available())})")
    return bf16_path()


def bf16_path():
    """The bf16 GEMM path products take now: portable, avx512bf16 or amx."""
    cdef int p = gemm_bf16_path()
    return {v: k for k, v in BF16_PATHS.items()}[p]


def bf16_paths_available():
    return [name for name, p in BF16_PATHS.items() if p and gemm_bf16_available(p)]
