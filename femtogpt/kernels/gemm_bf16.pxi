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
from libc.stdint cimport uint16_t, uint32_t
from libc.string cimport memcpy


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
    void* gemm_bf16_align64(void* p)
    # gemm_bf16_rows.h: the same product for a handful of rows (decoding)
    enum: GEMM_BF16_ROWS_MAX
    size_t gemm_bf16_rows_scratch_size(int M, int K)
    void gemm_bf16_rows_pack_a(uint32_t* ap, int M, int K, const float* A, int lda)
    void gemm_bf16_rows_packed(int M, int N, int K, float alpha, const uint32_t* ap,
                               const uint16_t* Bp, float beta, float* C, int ldc)


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


# ---------------------------------------------------------------------------
# The linear layer over a packed W^T for any number of rows: decoding's one
# row (or a handful) through gemm_bf16_rows.h, the prompt's many through the
# GEMM, with the same bits for a row either way (both sum each element in the
# header's one order; the AMX path's GEMM excepted, see gemm_bf16_rows.h).
# ---------------------------------------------------------------------------

DEF BF16_ROWS_PARALLEL_MIN = 262144  # weights (N x K) below which one thread beats a fork


cdef inline void bf16_rows_slice(int part, int n_parts, float* out, const float* bias, int M,
                                 int K, int N, const uint32_t* ap,
                                 const uint16_t* wt_packed) noexcept nogil:
    # Slice `part` of the rows product: whole 32-column panels of out, the bias
    # copied in first and added by beta = 1 (as matmul_forward does for the GEMM).
    cdef int start = 0, i
    cdef int count = panel_range(part, n_parts, N, &start)
    if count <= 0:
        return
    if bias != NULL:
        for i in range(M):
            memcpy(out + <Py_ssize_t>i * N + start, bias + start, count * sizeof(float))
    gemm_bf16_rows_packed(M, count, K, 1.0, ap, wt_packed + <Py_ssize_t>start * gemm_bf16_kpad(K),
                          1.0 if bias != NULL else 0.0, out + start, N)


cdef void bf16_matmul_packed_by(float* out, const float* inp, const float* bias, Py_ssize_t M,
                                int K, int N, const uint16_t* wt_packed, Bf16Work* bw,
                                Py_ssize_t rows_max) noexcept nogil:
    # bf16_matmul_packed with the threshold given: M <= rows_max takes the rows
    # kernel (tests force either kernel with 0 or a large rows_max; the rows
    # kernel then needs bw.scratch of gemm_bf16_rows_scratch_size(M, K) bytes).
    cdef int parts, part, panels
    cdef uint32_t* ap
    if M <= 0 or N <= 0:
        return
    if M > rows_max:
        if bias != NULL:
            for part in prange(<int>M, schedule="static"):
                memcpy(out + <Py_ssize_t>part * N, bias, N * sizeof(float))
        gemm_bf16_parallel(False, <int>M, N, K, 1.0, inp, K, wt_packed,
                           1.0 if bias != NULL else 0.0, out, N, bw)
        return
    # A (M rows, a few KB) is packed once by this thread, then shared: the
    # threads split the column panels, each streaming its own block of W^T.
    ap = <uint32_t*>gemm_bf16_align64(bw.scratch)
    gemm_bf16_rows_pack_a(ap, <int>M, K, inp, K)
    panels = (N + BF16_NR - 1) // BF16_NR
    parts = openmp.omp_get_max_threads()
    if parts > panels:
        parts = panels
    if <Py_ssize_t>N * K < BF16_ROWS_PARALLEL_MIN or parts <= 1:
        bf16_rows_slice(0, 1, out, bias, <int>M, K, N, ap, wt_packed)
        return
    for part in prange(parts, schedule="static", num_threads=parts):
        bf16_rows_slice(part, parts, out, bias, <int>M, K, N, ap, wt_packed)


cdef void bf16_matmul_packed(float* out, const float* inp, const float* bias, Py_ssize_t M,
                             int K, int N, const uint16_t* wt_packed, Bf16Work* bw) noexcept nogil:
    """out (M,N) = inp (M,K) @ W^T (+ bias (N), or NULL); W^T packed by
    gemm_bf16_pack_b(trans_b=1) from W (N,K) row-major (PackedWeight.wt,
    bf16_pack_wt). Writes out; bw from bf16_matmul_work_layout for M or more rows.

    Up to GEMM_BF16_ROWS_MAX rows: gemm_bf16_rows.h, all OpenMP threads
    splitting W^T's column panels in contiguous blocks (one thread below
    BF16_ROWS_PARALLEL_MIN weights); more rows: gemm_bf16_parallel (bw.n_slots
    threads at most). Each element is one sum in the header's order, so the
    result does not depend on the thread count nor on which kernel ran."""
    bf16_matmul_packed_by(out, inp, bias, M, K, N, wt_packed, bw, GEMM_BF16_ROWS_MAX)


cdef size_t bf16_matmul_work_bytes(Py_ssize_t M, int K, int n_threads) noexcept nogil:
    # Bytes of caller memory for bf16_matmul_work_layout: n_threads slots of the
    # GEMM's scratch (its A blocks) when M is above the rows kernel's threshold;
    # else one packed A, laid out as n_threads slots of it all the same.
    cdef size_t stride
    cdef int rows = <int>(M if M < GEMM_BF16_ROWS_MAX else GEMM_BF16_ROWS_MAX)
    stride = gemm_bf16_rows_scratch_size(rows, K)
    if M > GEMM_BF16_ROWS_MAX and gemm_bf16_scratch_size(<int>M, 1, K, 1) > stride:
        stride = gemm_bf16_scratch_size(<int>M, 1, K, 1)
    stride = (stride + 63) // 64 * 64
    return stride * <size_t>(n_threads if n_threads > 1 else 1)


cdef void bf16_matmul_work_layout(Bf16Work* bw, char* mem, Py_ssize_t M, int K,
                                  int n_threads) noexcept nogil:
    # A Bf16Work over mem (bf16_matmul_work_bytes(M, K, n_threads) bytes, any
    # alignment) for bf16_matmul_packed with up to M rows and this K; no bpack.
    bw.bpack = NULL
    bw.scratch = mem
    bw.n_slots = n_threads if n_threads > 1 else 1
    bw.stride = bf16_matmul_work_bytes(M, K, n_threads) // <size_t>bw.n_slots


cdef void bf16_pack_wt(uint16_t* packed, const float* W, int N, int K, int n_threads) noexcept nogil:
    # W (N,K) row-major -> W^T packed (the PackedWeight.wt layout) into packed
    # of gemm_bf16_packed_b_size(N, K) uint16s, the threads splitting the panels.
    pack_b_parallel(packed, True, N, K, W, K, n_threads)


def py_bf16_packed_size(int N, int K):
    """uint16s of a packed W^T for W (N, K): gemm_bf16_packed_b_size."""
    _need_positive(N=N, K=K)
    return gemm_bf16_packed_b_size(N, K)


def py_bf16_pack_wt(uint16_t[::1] packed, const float[::1] W, int N, int K):
    # packed (gemm_bf16_packed_b_size(N, K))   # OUT
    # W (N*K): W (N, K) row-major              # IN
    _need_positive(N=N, K=K)
    _need("packed", packed.shape[0], gemm_bf16_packed_b_size(N, K))
    _need("W", W.shape[0], <Py_ssize_t>N * K)
    with nogil:
        bf16_pack_wt(&packed[0], &W[0], N, K, openmp.omp_get_max_threads())


BF16_MATMUL_KERNELS = ("auto", "rows", "gemm")
BF16_ROWS_MAX = GEMM_BF16_ROWS_MAX    # the most rows bf16_matmul_packed gives the rows kernel


def py_bf16_matmul_packed(float[::1] out, const float[::1] inp, bias, Py_ssize_t M, int K, int N,
                          const uint16_t[::1] wt_packed, str kernel="auto"):
    # out (M*N)                                   # OUT
    # inp (M*K)                                   # IN
    # bias (N) or None                            # IN
    # wt_packed (gemm_bf16_packed_b_size(N, K))   # IN, from py_bf16_pack_wt
    # kernel: "auto" as bf16_matmul_packed; "rows" or "gemm" forces one (tests)
    cdef const float[::1] bias_view
    cdef const float* bias_ptr = NULL
    cdef unsigned char[::1] mem
    cdef Bf16Work bw
    cdef Py_ssize_t rows_max
    cdef int n_threads = openmp.omp_get_max_threads()
    cdef size_t stride
    _need_positive(M=M, K=K, N=N)
    if kernel not in BF16_MATMUL_KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(BF16_MATMUL_KERNELS)}, got {kernel!r}")
    if M > 2 ** 31 - 1:
        raise ValueError(f"M must be below 2^31, got {M}")
    _need("out", out.shape[0], M * N)
    _need("inp", inp.shape[0], M * K)
    _need("wt_packed", wt_packed.shape[0], gemm_bf16_packed_b_size(N, K))
    if bias is not None:
        bias_view = bias
        _need("bias", bias_view.shape[0], N)
        bias_ptr = &bias_view[0]
    if kernel == "auto":   # the workspace as a caller lays it out
        rows_max = GEMM_BF16_ROWS_MAX
        mem = bytearray(bf16_matmul_work_bytes(M, K, n_threads))
        bf16_matmul_work_layout(&bw, <char*>&mem[0], M, K, n_threads)
    else:                  # one kernel forced, whatever M: its own scratch
        rows_max = M if kernel == "rows" else 0
        if kernel == "rows":
            stride = gemm_bf16_rows_scratch_size(<int>M, K)
        else:
            stride = (gemm_bf16_scratch_size(<int>M, 1, K, 1) + 63) // 64 * 64
        mem = bytearray(stride * n_threads)
        bw.bpack = NULL
        bw.scratch = <char*>&mem[0]
        bw.stride = stride
        bw.n_slots = n_threads
    with nogil:
        bf16_matmul_packed_by(&out[0], &inp[0], bias_ptr, M, K, N, &wt_packed[0], &bw, rows_max)


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
