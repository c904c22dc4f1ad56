# The GEMM front's int8 half, for sampling: a weight W (N, K) quantized once
# to q8 (int8 in blocks of 32 along K, an fp16 scale per block: gemm_q8.h),
# and out = x @ W^T (+ bias) with x's rows quantized the same way on the fly
# into a workspace the caller allocated once (q8_work_bytes), so that nothing
# is allocated in a kernel.
#
# The threads split the product by whole 16-column panels of W (or, when W
# has too few panels to go round and there are many rows, by rows). Every
# element is one sum in the header's fixed float32 order over its own row
# of x and of W, whatever slice it falls in: the result is bit-identical at
# any thread count, row m of an M-row product equals the 1-row product of
# that row (the decoder's token equals the prompt pass's), and the portable
# path gives the same bits as the VNNI one.

cimport openmp
from cython.parallel cimport prange
from libc.stdint cimport int8_t, uint8_t, uintptr_t
import numpy as np


cdef extern from "kernels/gemm_q8.h" nogil:
    size_t gemm_q8_weight_bytes(int N, int K)
    size_t gemm_q8_row_bytes(int K)
    void gemm_q8_pack_panels(uint8_t* data, const float* W, int N, int K, int p0, int p1)
    void gemm_q8_dequantize(float* W, const uint8_t* data, int N, int K)
    void gemm_q8_quantize_rows(uint8_t* act, const float* x, int K, Py_ssize_t m0, Py_ssize_t m1)
    void gemm_q8_gemm_panels(float* out, Py_ssize_t ldo, const float* bias, Py_ssize_t M,
                             int N, int K, const uint8_t* W, const uint8_t* act, int p0, int p1)
    int gemm_q8_force(int path)
    int gemm_q8_path()
    int gemm_q8_available(int path)


DEF Q8_NR = 16              # columns of a packed panel (GEMM_Q8_NR)
DEF Q8_QK = 32              # k per block (GEMM_Q8_QK)
DEF Q8_MR = 6               # rows of a prompt tile (GEMM_Q8_MR)
# Below this many multiply-adds one thread does it all: waking the second
# costs more than it saves.
DEF Q8_MIN_PARALLEL_MACS = 262144

INT8_PATHS = {"auto": 0, "portable": 1, "vnni": 2}


cdef struct Q8Weight:
    # One weight W (N, K) quantized for out = x @ W^T: panels of 16 columns,
    # int8 + 128 and fp16 scales (the layout: gemm_q8.h). data is caller-owned.
    uint8_t* data
    int N, K


cdef inline uint8_t* q8_align64(uint8_t* p) noexcept nogil:
    return <uint8_t*>((<uintptr_t>p + 63) & ~(<uintptr_t>63))


cdef size_t q8_weight_bytes(int N, int K) noexcept nogil:
    return gemm_q8_weight_bytes(N, K)


cdef size_t q8_work_bytes(int M, int K, int n_threads) noexcept nogil:
    # M quantized rows, plus 64 to align them (no per-thread scratch: the
    # threads share the rows and write only their own slice of out).
    return <size_t>(M if M > 0 else 0) * gemm_q8_row_bytes(K) + 64


cdef inline int q8_range(int part, int n_parts, int units, int unit, int* start) noexcept nogil:
    # Slice `part` of `n_parts` of 0..units*unit in whole units: sets start, returns the count.
    cdef int chunk = (units + n_parts - 1) // n_parts
    start[0] = part * chunk
    cdef int count = units - start[0]
    if count > chunk:
        count = chunk
    start[0] *= unit
    return count * unit


cdef inline void q8_pack_part(int part, int n_parts, uint8_t* mem, const float* W,
                              int N, int K) noexcept nogil:
    cdef int panels = (N + Q8_NR - 1) // Q8_NR
    cdef int start = 0
    cdef int count = q8_range(part, n_parts, panels, 1, &start)
    if count > 0:
        gemm_q8_pack_panels(mem, W, N, K, start, start + count)


cdef void q8_pack_weight(Q8Weight* qw, uint8_t* mem, const float* W, int N, int K,
                         int n_threads) noexcept nogil:
    # Quantize W (N, K) row-major into mem (q8_weight_bytes(N, K) bytes,
    # 64-byte aligned for speed); the threads split the panels.
    cdef int parts = (N + Q8_NR - 1) // Q8_NR
    cdef int part
    qw.data = mem
    qw.N = N
    qw.K = K
    if parts > n_threads:
        parts = n_threads
    if parts <= 1:
        gemm_q8_pack_panels(mem, W, N, K, 0, (N + Q8_NR - 1) // Q8_NR)
        return
    for part in prange(parts, schedule="static", num_threads=parts):
        q8_pack_part(part, parts, mem, W, N, K)


cdef void q8_dequantize_weight(float* W, const Q8Weight* qw) noexcept nogil:
    # W (N, K) fp32 = the quantized values q * scale (exact), for tests and checks.
    gemm_q8_dequantize(W, qw.data, qw.N, qw.K)


cdef inline void q8_quantize_part(int part, int n_parts, uint8_t* act, const float* inp,
                                  Py_ssize_t M, int K) noexcept nogil:
    cdef Py_ssize_t chunk = (M + n_parts - 1) // n_parts
    cdef Py_ssize_t m0 = part * chunk
    cdef Py_ssize_t m1 = m0 + chunk if m0 + chunk < M else M
    if m0 < m1:
        gemm_q8_quantize_rows(act, inp, K, m0, m1)


cdef inline void q8_matmul_part(int part, int n_parts, bint by_rows, float* out,
                                const float* bias, Py_ssize_t M, int K, int N,
                                const uint8_t* W, const uint8_t* act) noexcept nogil:
    # Slice `part`: whole panels (pairs of them when the tiles are 2 wide), or
    # whole 6-row tiles of all the columns.
    cdef int panels = (N + Q8_NR - 1) // Q8_NR
    cdef int unit = 1 if M == 1 else 2
    cdef int start = 0, count, tiles
    cdef size_t rb = gemm_q8_row_bytes(K)
    if by_rows:
        tiles = <int>((M + Q8_MR - 1) // Q8_MR)
        count = q8_range(part, n_parts, tiles, Q8_MR, &start)
        if start + count > M:
            count = <int>(M - start)
        if count > 0:
            gemm_q8_gemm_panels(out + <Py_ssize_t>start * N, N, bias, count, N, K, W,
                                act + <size_t>start * rb, 0, panels)
    else:
        count = q8_range(part, n_parts, (panels + unit - 1) // unit, unit, &start)
        if start + count > panels:
            count = panels - start
        if count > 0:
            gemm_q8_gemm_panels(out, N, bias, M, N, K, W, act, start, start + count)


cdef void q8_matmul(float* out, const float* inp, const float* bias, Py_ssize_t M, int K, int N,
                    const Q8Weight* qw, uint8_t* work) noexcept nogil:
    """out (M, N) = inp (M, K) @ W^T (+ bias (N), or NULL), W quantized in qw
    (qw.N == N, qw.K == K); work: q8_work_bytes(M, K, threads) bytes. Writes out."""
    cdef uint8_t* act = q8_align64(work)
    cdef int n_threads = openmp.omp_get_max_threads()
    cdef int panels = (N + Q8_NR - 1) // Q8_NR
    cdef int units = panels if M == 1 else (panels + 1) // 2
    cdef int parts, part
    cdef bint by_rows = False
    if M <= 0 or N <= 0 or K <= 0:
        return
    if <double>M * N * K < Q8_MIN_PARALLEL_MACS:
        n_threads = 1
    # The rows are quantized once, shared by every slice of the product.
    parts = n_threads if M >= 16 * n_threads else 1
    if parts <= 1:
        gemm_q8_quantize_rows(act, inp, K, 0, M)
    else:
        for part in prange(parts, schedule="static", num_threads=parts):
            q8_quantize_part(part, parts, act, inp, M, K)
    # Panels when there are enough to go round, else rows when there are.
    if units < 2 * n_threads and M >= 2 * Q8_MR * n_threads:
        by_rows = True
        units = <int>((M + Q8_MR - 1) // Q8_MR)
    parts = n_threads if n_threads < units else units
    if parts <= 1:
        gemm_q8_gemm_panels(out, N, bias, M, N, K, qw.data, act, 0, panels)
        return
    for part in prange(parts, schedule="static", num_threads=parts):
        q8_matmul_part(part, parts, by_rows, out, bias, M, K, N, qw.data, act)


# ---------------------------------------------------------------------------
# Python: the path, and wrappers for tests and the probe
# ---------------------------------------------------------------------------

def set_int8_path(str name):
    """Force the int8 GEMM path for every later product in this process: "auto"
    (the best this CPU and build run), "portable" or "vnni". Returns the path
    products take now; ValueError if this build or CPU cannot run the one asked."""
    if name not in INT8_PATHS:
        raise ValueError(f"int8 path must be one of {', '.join(INT8_PATHS)}, got {name!r}")
    if gemm_q8_force(INT8_PATHS[name]) < 0:
        raise ValueError(f"int8 path {name} does not run here (this build on this CPU "
                         f"runs: {', '.join(int8_paths_available())})")
    return int8_path()


def int8_path():
    """The int8 GEMM path products take now: portable or vnni."""
    cdef int p = gemm_q8_path()
    return {v: k for k, v in INT8_PATHS.items()}[p]


def int8_paths_available():
    return [name for name, p in INT8_PATHS.items() if p and gemm_q8_available(p)]


def _q8_sizes(Py_ssize_t M, Py_ssize_t K, Py_ssize_t N):
    _need_positive(M=M, K=K, N=N)
    if M > (1 << 30) or K > (1 << 30) or N > (1 << 30):
        raise ValueError(f"M, K and N must be at most 2**30, got M={M}, K={K}, N={N}")


def _q8_aligned_bytes(size_t nbytes):
    # A zeroed uint8 array of nbytes whose data is 64-byte aligned.
    raw = np.zeros(nbytes + 64, np.uint8)
    off = (-raw.ctypes.data) % 64
    return raw[off:off + nbytes]


def py_q8_weight_bytes(int N, int K):
    _q8_sizes(1, K, N)
    return q8_weight_bytes(N, K)


def py_q8_work_bytes(int M, int K, int n_threads):
    _q8_sizes(M, K, 1)
    return q8_work_bytes(M, K, n_threads)


def py_q8_pack(const float[::1] W, int N, int K):
    """W (N*K,) fp32 -> its packed q8 bytes (a 64-byte aligned uint8 array)."""
    cdef Q8Weight qw
    cdef uint8_t[::1] mem_view
    _q8_sizes(1, K, N)
    _need("W", W.shape[0], <Py_ssize_t>N * K)
    mem = _q8_aligned_bytes(q8_weight_bytes(N, K))
    mem_view = mem
    with nogil:
        q8_pack_weight(&qw, &mem_view[0], &W[0], N, K, openmp.omp_get_max_threads())
    return mem


def py_q8_dequantize(const uint8_t[::1] packed, int N, int K):
    """Packed q8 bytes of W (N, K) -> the (N*K,) fp32 values they hold."""
    cdef Q8Weight qw
    cdef float[::1] out_view
    _q8_sizes(1, K, N)
    _need("packed", packed.shape[0], <Py_ssize_t>q8_weight_bytes(N, K))
    out = np.empty(<Py_ssize_t>N * K, np.float32)
    out_view = out
    qw.data = <uint8_t*>&packed[0]
    qw.N = N
    qw.K = K
    with nogil:
        q8_dequantize_weight(&out_view[0], &qw)
    return out


def py_q8_quantize_dequantize(const float[::1] W, int N, int K):
    """W (N*K,) fp32 -> the fp32 values its q8 form holds (q * fp16 scale)."""
    return py_q8_dequantize(py_q8_pack(W, N, K), N, K)


def py_q8_quantize_rows(const float[::1] x, Py_ssize_t M, int K):
    """Activation rows x (M*K,) -> (q, d): int8 q (M, Kb*32) and float32 d
    (M, Kb), as the product sees them (value = q * d, per block of 32)."""
    cdef uint8_t[::1] act_view
    cdef size_t rb
    cdef int kb = (K + Q8_QK - 1) // Q8_QK
    _q8_sizes(M, K, 1)
    _need("x", x.shape[0], M * K)
    rb = gemm_q8_row_bytes(K)
    act = _q8_aligned_bytes(<size_t>M * rb)
    act_view = act
    with nogil:
        gemm_q8_quantize_rows(&act_view[0], &x[0], K, 0, M)
    rows = act.reshape(M, rb)
    q = rows[:, :kb * Q8_QK].view(np.int8).copy()
    d = rows[:, kb * Q8_QK:kb * Q8_QK + 4 * kb].copy().view(np.float32)
    return q, d


def py_q8_matmul_packed(float[::1] out, const float[::1] inp, const uint8_t[::1] packed,
                        bias, Py_ssize_t M, int K, int N):
    """out (M*N,) = inp (M*K,) @ W^T (+ bias (N,)), W packed by py_q8_pack."""
    cdef const float[::1] bias_view
    cdef const float* bias_ptr = NULL
    cdef uint8_t[::1] work_view
    cdef Q8Weight qw
    _q8_sizes(M, K, N)
    for name, size, want in (("out", out.shape[0], M * N), ("inp", inp.shape[0], M * K),
                             ("packed", packed.shape[0], <Py_ssize_t>q8_weight_bytes(N, K))):
        _need(name, size, want)
    if bias is not None:
        bias_view = bias
        _need("bias", bias_view.shape[0], N)
        bias_ptr = &bias_view[0]
    work = np.empty(q8_work_bytes(<int>M, K, openmp.omp_get_max_threads()), np.uint8)
    work_view = work
    qw.data = <uint8_t*>&packed[0]
    qw.N = N
    qw.K = K
    with nogil:
        q8_matmul(&out[0], &inp[0], bias_ptr, M, K, N, &qw, &work_view[0])


def py_q8_matmul(float[::1] out, const float[::1] inp, const float[::1] W, bias,
                 Py_ssize_t M, int K, int N):
    """out (M*N,) = inp (M*K,) @ q8(W)^T (+ bias): W (N*K,) packed, then multiplied."""
    _q8_sizes(M, K, N)
    _need("W", W.shape[0], <Py_ssize_t>N * K)
    py_q8_matmul_packed(out, inp, py_q8_pack(W, N, K), bias, M, K, N)


def py_q8_matmul_copies(float[::1] out, const float[::1] inp, const uint8_t[::1] packed,
                        int n_copies, Py_ssize_t M, int K, int N):
    """For the probe: out = inp @ W_i^T for each of n_copies packed weights laid
    end to end in `packed` (n_copies * q8_weight_bytes(N, K) bytes), one after
    the other without the GIL, as a decode steps through its layers (the
    weights stream from memory, not cache, once they outgrow L3)."""
    cdef uint8_t[::1] work_view
    cdef Q8Weight qw
    cdef size_t wbytes
    cdef int i
    _q8_sizes(M, K, N)
    _need_positive(n_copies=n_copies)
    wbytes = q8_weight_bytes(N, K)
    for name, size, want in (("out", out.shape[0], M * N), ("inp", inp.shape[0], M * K),
                             ("packed", packed.shape[0], <Py_ssize_t>(wbytes * n_copies))):
        _need(name, size, want)
    work = np.empty(q8_work_bytes(<int>M, K, openmp.omp_get_max_threads()), np.uint8)
    work_view = work
    qw.N = N
    qw.K = K
    with nogil:
        for i in range(n_copies):
            qw.data = <uint8_t*>&packed[0] + <size_t>i * wbytes
            q8_matmul(&out[0], &inp[0], NULL, M, K, N, &qw, &work_view[0])
