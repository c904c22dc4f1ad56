# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""femtogpt's compiled core: float32 storage and every forward/backward kernel.

Reading order
  1. Buffer           aligned float32 storage that numpy views without copying
  2. threads, BLAS    one thread pool (OpenMP); sgemm from scipy's OpenBLAS, pinned
                      to one thread and called on per-thread slices of the product
  3. kernels          <op>_forward / <op>_backward pairs over flat float* buffers,
                      `noexcept nogil`, llm.c's argument order:
                      outputs and caches, then inputs, then parameters, then sizes
  4. def wrappers     the same kernels callable from Python (tests, readers)
  5. Graph            the GPT's fixed compute graph: forward, backward, AdamW,
                      over one parameter block, one gradient block and one
                      activation block laid out once per (B, T)

Conventions
  * Row-major everywhere. A "row" is one (batch, time) position: N = B*T rows.
  * Linear weights are stored as PyTorch does, (out, in): y = x @ W^T + b.
  * Backward passes ACCUMULATE (+=) into parameter gradients, so zeroing the
    gradients is one memset and gradient accumulation is free. Gradients with
    respect to activations are WRITTEN (=), except where a kernel says otherwise
    (layernorm_backward adds into the residual stream's gradient).
  * Kernels trust their arguments. Everything they index is validated in Python
    before the GIL is released (model.py, and the def wrappers below).
  * Reductions over rows (weight and bias gradients, norms) are done in a fixed
    order that does not depend on the number of threads. Matrix products are
    split into per-thread slices, and sgemm may round a slice differently from
    the whole, so 1 and 2 threads agree to about 1e-6, not bit for bit; a
    fixed thread count is bitwise reproducible.
"""

from cython.parallel cimport prange
cimport openmp
from libc.math cimport sqrtf, logf, fabsf, pow
from libc.stdint cimport uint32_t, uint64_t, int32_t
from libc.stdlib cimport free, malloc, qsort
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from libc.string cimport memset, memcpy
from posix.mman cimport mmap, munmap, PROT_READ, PROT_WRITE, MAP_PRIVATE, MAP_ANONYMOUS, MAP_FAILED
from scipy.linalg.cython_blas cimport sgemm
import numpy as np

cdef extern from "stdlib.h":
    int posix_memalign(void **memptr, size_t alignment, size_t size) nogil

cdef extern from *:
    """
    #ifndef FEMTOGPT_TARGET
    #define FEMTOGPT_TARGET "unknown"
    #endif
    """
    const char* FEMTOGPT_TARGET

# The code path this module was compiled for (setup.py): "x86-64", "x86-64-v3" or
# "x86-64-v4" in a portable build (femtogpt/_dispatch.py picks one), "native" or
# "plain" in a single build. The same source is compiled once per target.
TARGET = FEMTOGPT_TARGET.decode()


# ---------------------------------------------------------------------------
# 1. Buffer: aligned float32 storage
# ---------------------------------------------------------------------------

DEF ALIGN_BYTES = 64      # one cache line, and one AVX-512 register
DEF ALIGN_FLOATS = 16     # the same in float32 elements


# Buffers at least this large are mapped from the kernel rather than taken
# from malloc: their pages are zero already and cost memory only once
# written. A model that only samples never writes its gradient block, so it
# pays for its weights alone (GPT-2 XL: 6.2 GB of gradients not spent).
DEF MAP_MIN_BYTES = 1 << 20


cdef class Buffer:
    """`size` float32 values, 64-byte aligned, zero-filled, owned by the core.

    `np.asarray(buffer)` is a writable 1-D view of the same memory (no copy);
    the view keeps the Buffer alive.
    """
    cdef float* data
    cdef readonly Py_ssize_t size
    cdef Py_ssize_t shape[1]
    cdef Py_ssize_t strides[1]
    cdef size_t mapped      # bytes mapped with mmap, 0 if from posix_memalign

    def __cinit__(self, Py_ssize_t size):
        cdef void* ptr = NULL
        cdef size_t nbytes
        self.mapped = 0
        if size < 0:
            raise ValueError(f"Buffer size must be >= 0, got {size}")
        # Round up to whole cache lines; allocate at least one so data is never NULL.
        nbytes = ((<size_t>size * 4 + ALIGN_BYTES - 1) // ALIGN_BYTES) * ALIGN_BYTES
        if nbytes == 0:
            nbytes = ALIGN_BYTES
        if nbytes >= MAP_MIN_BYTES:
            # Page-aligned, so 64-byte aligned too.
            ptr = mmap(NULL, nbytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
            if ptr == MAP_FAILED:
                raise MemoryError(f"could not allocate {nbytes} bytes")
            self.mapped = nbytes
        else:
            if posix_memalign(&ptr, ALIGN_BYTES, nbytes) != 0:
                raise MemoryError(f"could not allocate {nbytes} bytes")
            memset(ptr, 0, nbytes)
        self.data = <float*>ptr
        self.size = size
        self.shape[0] = size
        self.strides[0] = 4

    def __dealloc__(self):
        if self.mapped:
            munmap(self.data, self.mapped)
        else:
            free(self.data)

    def __getbuffer__(self, Py_buffer* view, int flags):
        view.buf = <void*>self.data
        view.obj = self
        view.len = self.size * 4
        view.itemsize = 4
        view.readonly = 0
        view.ndim = 1
        view.format = b"f"
        view.shape = self.shape
        view.strides = self.strides
        view.suboffsets = NULL
        view.internal = NULL

    def __releasebuffer__(self, Py_buffer* view):
        """Nothing to release: the memory belongs to the Buffer, which the view keeps alive."""

    def address(self):
        """The address of the first element (tests check the alignment)."""
        return <size_t>self.data


# ---------------------------------------------------------------------------
# 2. Threads and BLAS
# ---------------------------------------------------------------------------

def get_num_threads():
    """Threads the kernels use (OMP_NUM_THREADS, or the number of cores)."""
    return openmp.omp_get_max_threads()


def set_num_threads(int n):
    if n < 1:
        raise ValueError(f"number of threads must be >= 1, got {n}")
    openmp.omp_set_num_threads(n)


cdef inline void gemm(bint trans_a, bint trans_b, int M, int N, int K,
                      float alpha, const float* A, int lda,
                      const float* B, int ldb,
                      float beta, float* C, int ldc) noexcept nogil:
    """Row-major C (M x N) = alpha * op(A) @ op(B) + beta * C, op(A) is M x K.

    BLAS is column-major; a row-major matrix is the column-major view of its
    transpose, so C^T = op(B)^T op(A)^T is computed by swapping the operands.
    """
    cdef char ta = b"T" if trans_b else b"N"
    cdef char tb = b"T" if trans_a else b"N"
    if M <= 0 or N <= 0:
        return
    sgemm(&ta, &tb, &N, &M, &K, &alpha, <float*>B, &ldb, <float*>A, &lda,
          &beta, C, &ldc)


cdef inline void gemm_slice(int part, int n_parts, bint trans_a, bint trans_b,
                            int M, int N, int K, float alpha, const float* A, int lda,
                            const float* B, int ldb, float beta, float* C,
                            int ldc) noexcept nogil:
    """Slice `part` of `n_parts` of gemm(): rows of C (or columns, if N > M).

    Slice edges fall on multiples of 16, so each slice starts cache-line aligned.
    """
    cdef bint split_rows = M >= N
    cdef int extent = M if split_rows else N
    cdef int chunk, start, count
    if n_parts <= 1:
        gemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)
        return
    chunk = (extent + n_parts - 1) // n_parts
    chunk = ((chunk + 15) // 16) * 16
    start = part * chunk
    count = extent - start
    if count > chunk:
        count = chunk
    if count <= 0:
        return
    if split_rows:
        # Rows start..start+count of op(A): A's rows, or A's columns if transposed.
        gemm(trans_a, trans_b, count, N, K, alpha,
             A + (<Py_ssize_t>start if trans_a else <Py_ssize_t>start * lda), lda,
             B, ldb, beta, C + <Py_ssize_t>start * ldc, ldc)
    else:
        gemm(trans_a, trans_b, M, count, K, alpha, A, lda,
             B + (<Py_ssize_t>start * ldb if trans_b else <Py_ssize_t>start), ldb,
             beta, C + start, ldc)


cdef inline int gemm_parts(int M, int N, int n_threads) noexcept nogil:
    # Slices narrower than 32 cost more in BLAS overhead than they gain.
    cdef int extent = M if M >= N else N
    if n_threads > extent // 32:
        n_threads = extent // 32
    return n_threads if n_threads > 1 else 1


cdef void gemm_parallel(bint trans_a, bint trans_b, int M, int N, int K,
                        float alpha, const float* A, int lda,
                        const float* B, int ldb,
                        float beta, float* C, int ldc) noexcept nogil:
    """gemm() split over threads along the larger of M and N.

    BLAS runs single-threaded (see femtogpt/_threads.py) so that OpenMP is the
    only thread pool: each thread multiplies its own slice of rows (or columns)
    of C, and no slice is written by two threads.
    """
    cdef int n_parts = gemm_parts(M, N, openmp.omp_get_max_threads())
    cdef int part
    if n_parts <= 1:
        gemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)
        return
    for part in prange(n_parts, schedule="static", num_threads=n_parts):
        gemm_slice(part, n_parts, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb,
                   beta, C, ldc)


# ---------------------------------------------------------------------------
# Vectorisable exp and tanh
#
# glibc's expf/tanhf are scalar calls that gcc cannot vectorise without
# -ffast-math (which we avoid: it changes NaN/inf handling everywhere). These
# are plain arithmetic that gcc turns into AVX2/AVX-512 code inside a loop.
# ---------------------------------------------------------------------------

cdef inline float exp_from_reduced(float r, float t) noexcept nogil:
    # 2^n * exp(r), |r| <= ln(2)/2, where t = x / ln 2 + 1.5 * 2^23 holds
    # n = round(x / ln 2) in its low mantissa bits. exp(r) by its degree-6
    # Taylor polynomial (relative error < 2e-7 on that interval).
    cdef float poly, scale
    cdef int32_t bits
    poly = <float>1.0 + r * (<float>1.0 + r * (<float>0.5 + r * (<float>0.16666667 + r * (
        <float>0.041666668 + r * (<float>0.008333334 + r * <float>0.0013888889)))))
    # 2^n from its IEEE-754 bits (memcpy is C's bit cast; it compiles to nothing).
    memcpy(&bits, &t, 4)
    bits = (bits - 0x4B400000 + 127) << 23
    memcpy(&scale, &bits, 4)
    return poly * scale


cdef inline float fast_expf(float x) noexcept nogil:
    # exp(x) = 2^n * exp(r), n = round(x / ln 2). Written so that gcc
    # vectorises it (with -fno-trapping-math): selects instead of branches, and
    # rounding by adding 1.5 * 2^23, which leaves round(x / ln 2) in the low
    # mantissa bits of the sum.
    #
    # Below -70 the result is exactly 0 and above 70 it is exp(70) ~ 2.5e30: no
    # result (and no product of softmax probabilities or sigmoids with ordinary
    # numbers downstream) is a denormal float. Denormals make every multiply
    # that touches them, in our loops and in sgemm, many times slower, and a
    # trained model's softmax has probabilities far below 1e-38 otherwise.
    # Terms below e^-70 ~ 4e-31 cannot change a float32 sum of O(1) terms.
    cdef float t, n, r, clamped
    clamped = <float>-70.0 if x < <float>-70.0 else x
    clamped = <float>70.0 if clamped > <float>70.0 else clamped
    t = clamped * <float>1.4426950408889634 + <float>12582912.0
    n = t - <float>12582912.0
    r = clamped - n * <float>0.693145751953125  # ln 2 in two parts: r stays exact
    r = r - n * <float>1.428606765330187e-06
    return <float>0.0 if x < <float>-70.0 else exp_from_reduced(r, t)


cdef inline float fast_exp_sum(float hi, float lo) noexcept nogil:
    # exp(hi + lo) for a sum that float32 cannot hold exactly (|lo| < 1, hi
    # <= 0): lo joins the reduced argument, where it is small, instead of
    # being rounded into hi first (an exponent of -50 has an ulp of 4e-6, a
    # relative error of 4e-6 in the result). 0 below hi = -70, as fast_expf.
    cdef float t, n, r, clamped
    clamped = <float>-70.0 if hi < <float>-70.0 else hi
    t = (clamped + lo) * <float>1.4426950408889634 + <float>12582912.0
    n = t - <float>12582912.0
    r = clamped - n * <float>0.693145751953125
    r = r - n * <float>1.428606765330187e-06
    r = r + lo
    return <float>0.0 if hi < <float>-70.0 else exp_from_reduced(r, t)


cdef inline float fast_sigmoidf(float x) noexcept nogil:
    return <float>1.0 / (<float>1.0 + fast_expf(-x))


# Elementwise kernels run a plain loop (which gcc vectorises) over chunks of
# this many elements, one chunk per prange iteration.
DEF ELEM_CHUNK = 4096


cdef inline Py_ssize_t min_size(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return a if a < b else b


# Column-chunk width for weight-gradient reductions over rows: each thread owns
# whole chunks of channels, so no two threads add into the same gradient entry.
DEF COL_CHUNK = 16


# ---------------------------------------------------------------------------
# 3. Kernels
# ---------------------------------------------------------------------------

# --- token + position embedding ---------------------------------------------

cdef void encoder_forward(float* out,
                          const int32_t* idx, const float* wte, const float* wpe,
                          int B, int T, int C) noexcept nogil:
    # out (B,T,C) = wte[idx[b,t]] + wpe[t];  idx (B,T), wte (V,C), wpe (maxT,C)
    cdef Py_ssize_t n, c
    cdef const float* tok_row
    cdef const float* pos_row
    cdef float* out_row
    for n in prange(<Py_ssize_t>B * T, schedule="static"):
        tok_row = wte + <Py_ssize_t>idx[n] * C
        pos_row = wpe + (n % T) * C
        out_row = out + n * C
        for c in range(C):
            out_row[c] = tok_row[c] + pos_row[c]


cdef void encoder_backward(float* dwte, float* dwpe,
                           const float* dout, const int32_t* idx,
                           int B, int T, int C) noexcept nogil:
    # dwte (V,C) += scatter of dout rows by token; dwpe (maxT,C) += sum over b.
    # The same token appears in many rows, so threads split channels, not rows.
    cdef Py_ssize_t n_chunks = (C + COL_CHUNK - 1) // COL_CHUNK
    cdef Py_ssize_t chunk, n, c, c0, c1
    cdef const float* dout_row
    cdef float* dwte_row
    cdef float* dwpe_row
    for chunk in prange(n_chunks, schedule="static"):
        c0 = chunk * COL_CHUNK
        c1 = c0 + COL_CHUNK
        if c1 > C:
            c1 = C
        for n in range(<Py_ssize_t>B * T):
            dout_row = dout + n * C
            dwte_row = dwte + <Py_ssize_t>idx[n] * C
            dwpe_row = dwpe + (n % T) * C
            for c in range(c0, c1):
                dwte_row[c] += dout_row[c]
                dwpe_row[c] += dout_row[c]


# --- LayerNorm ----------------------------------------------------------------

DEF LN_EPS = 1e-5


cdef inline void layernorm_row(float* out, float* mean, float* rstd,
                               const float* x, const float* w, const float* b,
                               int C) noexcept nogil:
    cdef int c
    cdef float m = 0.0, v = 0.0, d, s
    for c in range(C):
        m += x[c]
    m = m / C
    for c in range(C):
        d = x[c] - m
        v += d * d
    s = 1.0 / sqrtf(v / C + LN_EPS)
    if b != NULL:
        for c in range(C):
            out[c] = (x[c] - m) * s * w[c] + b[c]
    else:
        for c in range(C):
            out[c] = (x[c] - m) * s * w[c]
    mean[0] = m
    rstd[0] = s


cdef void layernorm_forward(float* out, float* mean, float* rstd,
                            const float* inp, const float* weight, const float* bias,
                            Py_ssize_t N, int C) noexcept nogil:
    # out (N,C), mean (N), rstd (N) = 1/sqrt(var + eps); inp (N,C); weight, bias (C)
    # bias may be NULL: a LayerNorm without bias (nanoGPT's bias=False)
    cdef Py_ssize_t n
    for n in prange(N, schedule="static"):
        layernorm_row(out + n * C, mean + n, rstd + n, inp + n * C, weight, bias, C)


cdef inline void layernorm_backward_row(float* dx, const float* dout, const float* x,
                                        const float* w, float m, float s,
                                        int C) noexcept nogil:
    # dx += s * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dout * w
    cdef int c
    cdef float dxhat, xhat, mean_dxhat = 0.0, mean_dxhat_xhat = 0.0
    for c in range(C):
        dxhat = dout[c] * w[c]
        mean_dxhat += dxhat
        mean_dxhat_xhat += dxhat * (x[c] - m) * s
    mean_dxhat = mean_dxhat / C
    mean_dxhat_xhat = mean_dxhat_xhat / C
    for c in range(C):
        xhat = (x[c] - m) * s
        dx[c] += s * (dout[c] * w[c] - mean_dxhat - xhat * mean_dxhat_xhat)


cdef void layernorm_backward(float* dinp, float* dweight, float* dbias,
                             const float* dout, const float* inp, const float* weight,
                             const float* mean, const float* rstd,
                             Py_ssize_t N, int C) noexcept nogil:
    # dinp (N,C) += ...  (it is the residual stream's gradient: accumulate)
    # dweight, dbias (C) += sums over rows, split by channel chunks; dbias may
    # be NULL (no bias).
    cdef Py_ssize_t n, c, chunk, c0, c1
    cdef Py_ssize_t n_chunks = (C + COL_CHUNK - 1) // COL_CHUNK
    cdef const float* x_row
    cdef const float* dout_row
    cdef float s, m
    for n in prange(N, schedule="static"):
        layernorm_backward_row(dinp + n * C, dout + n * C, inp + n * C, weight,
                               mean[n], rstd[n], C)
    for chunk in prange(n_chunks, schedule="static"):
        c0 = chunk * COL_CHUNK
        c1 = c0 + COL_CHUNK
        if c1 > C:
            c1 = C
        for n in range(N):
            x_row = inp + n * C
            dout_row = dout + n * C
            m = mean[n]
            s = rstd[n]
            for c in range(c0, c1):
                dweight[c] += dout_row[c] * (x_row[c] - m) * s
            if dbias != NULL:
                for c in range(c0, c1):
                    dbias[c] += dout_row[c]


# --- linear layer (matmul + bias) --------------------------------------------

cdef void fill_rows(float* out, const float* row, Py_ssize_t N, int C) noexcept nogil:
    # out (N,C): every row a copy of row (C)
    cdef Py_ssize_t n
    for n in prange(N, schedule="static"):
        memcpy(out + n * C, row, C * sizeof(float))


cdef void matmul_forward(float* out,
                         const float* inp, const float* weight, const float* bias,
                         Py_ssize_t N, int C_in, int C_out) noexcept nogil:
    # out (N,C_out) = inp (N,C_in) @ weight (C_out,C_in)^T + bias (C_out, or NULL)
    if bias != NULL:
        fill_rows(out, bias, N, C_out)
    gemm_parallel(False, True, <int>N, C_out, C_in, 1.0, inp, C_in, weight, C_in,
                  1.0 if bias != NULL else 0.0, out, C_out)


cdef void bias_backward(float* dbias, const float* dout, Py_ssize_t N, int C) noexcept nogil:
    # dbias (C) += column sums of dout (N,C)
    cdef Py_ssize_t n, c, chunk, c0, c1
    cdef Py_ssize_t n_chunks = (C + COL_CHUNK - 1) // COL_CHUNK
    cdef const float* dout_row
    for chunk in prange(n_chunks, schedule="static"):
        c0 = chunk * COL_CHUNK
        c1 = c0 + COL_CHUNK
        if c1 > C:
            c1 = C
        for n in range(N):
            dout_row = dout + n * C
            for c in range(c0, c1):
                dbias[c] += dout_row[c]


cdef void matmul_backward(float* dinp, float* dweight, float* dbias,
                          const float* dout, const float* inp, const float* weight,
                          Py_ssize_t N, int C_in, int C_out) noexcept nogil:
    # dinp (N,C_in) = dout (N,C_out) @ weight (C_out,C_in)      (written)
    # dweight (C_out,C_in) += dout^T @ inp;  dbias (C_out) += column sums of dout
    # dinp may be NULL when the input needs no gradient; dbias NULL when no bias.
    # The two products are independent and equally large: half the threads take
    # each, so each shared operand is packed by BLAS once per half, not once per
    # thread (at 2 threads: one whole product per thread).
    cdef int n_threads = openmp.omp_get_max_threads()
    cdef int half = n_threads // 2, item
    if dinp != NULL and half >= 1:
        for item in prange(2 * half, schedule="static", num_threads=2 * half):
            if item < half:
                gemm_slice(item, half, False, False, <int>N, C_in, C_out, 1.0, dout, C_out,
                           weight, C_in, 0.0, dinp, C_in)
            else:
                gemm_slice(item - half, half, True, False, C_out, C_in, <int>N, 1.0, dout,
                           C_out, inp, C_in, 1.0, dweight, C_in)
    else:
        if dinp != NULL:
            gemm_parallel(False, False, <int>N, C_in, C_out, 1.0, dout, C_out, weight, C_in,
                          0.0, dinp, C_in)
        gemm_parallel(True, False, C_out, C_in, <int>N, 1.0, dout, C_out, inp, C_in,
                      1.0, dweight, C_in)
    if dbias != NULL:
        bias_backward(dbias, dout, N, C_out)


# --- dropout (inverted, seeded) ------------------------------------------------

cdef inline uint32_t hash_u32(uint64_t seed, uint64_t i) noexcept nogil:
    # splitmix64's finaliser on (seed, i): a counter-based random stream, so the
    # mask does not depend on thread scheduling and backward can recompute it
    # instead of storing it.
    cdef uint64_t z = seed + (i + 1) * <uint64_t>0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * <uint64_t>0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * <uint64_t>0x94D049BB133111EB
    z = z ^ (z >> 31)
    return <uint32_t>(z >> 32)


cdef inline float dropout_scale(uint64_t seed, uint64_t i, uint32_t threshold,
                                float keep_scale) noexcept nogil:
    # 0 with probability p (hash below threshold = p * 2^32), else 1/(1-p)
    return keep_scale if hash_u32(seed, i) >= threshold else 0.0


cdef inline uint32_t dropout_threshold(float p) noexcept nogil:
    return <uint32_t>(<double>p * 4294967296.0)


cdef void dropout_forward(float* out, const float* inp, Py_ssize_t n, float p,
                          uint64_t seed) noexcept nogil:
    # out (n) = inp * mask / (1 - p); out may be inp (in place)
    cdef Py_ssize_t i
    cdef uint32_t threshold = dropout_threshold(p)
    cdef float keep_scale = 1.0 / (1.0 - p)
    for i in prange(n, schedule="static"):
        out[i] = inp[i] * dropout_scale(seed, i, threshold, keep_scale)


cdef void dropout_backward(float* dinp, const float* dout, Py_ssize_t n, float p,
                           uint64_t seed) noexcept nogil:
    # dinp (n) = dout * mask / (1 - p), the same mask recomputed from the seed
    dropout_forward(dinp, dout, n, p, seed)


# --- residual add ---------------------------------------------------------------

cdef void residual_forward(float* out, const float* a, const float* b,
                           Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in prange(n, schedule="static"):
        out[i] = a[i] + b[i]


cdef void residual_backward(float* da, float* db, const float* dout,
                            Py_ssize_t n) noexcept nogil:
    # da, db (n) += dout. The graph keeps the residual stream's gradient in one
    # buffer (da is dout itself), so it only needs this for the branch side.
    cdef Py_ssize_t i
    for i in prange(n, schedule="static"):
        da[i] += dout[i]
        db[i] += dout[i]


# --- GELU, tanh approximation (GPT-2) ------------------------------------------
#
# gelu(x) = 0.5 x (1 + tanh(y)), y = sqrt(2/pi) (x + 0.044715 x^3). Since
# 0.5 (1 + tanh(y)) = sigmoid(2y), we compute x * sigmoid(2y): the same function
# without the cancellation of 1 + tanh(y) for large negative x.

cdef inline void gelu_tanh_forward_span(float* out, const float* inp, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef float x, y
    cdef float k2 = 2.0 * 0.7978845608028654, c = 0.044715
    for i in range(n):
        x = inp[i]
        y = k2 * (x + c * x * x * x)
        out[i] = x * fast_sigmoidf(y)


cdef inline void gelu_tanh_backward_span(float* dinp, const float* inp, const float* dout,
                                    Py_ssize_t n) noexcept nogil:
    # d/dx [x s(2y)] = s + x s (1 - s) * 2 dy/dx
    cdef Py_ssize_t i
    cdef float x, s, dy
    cdef float k2 = 2.0 * 0.7978845608028654, c = 0.044715, c3 = 3.0 * 0.044715
    for i in range(n):
        x = inp[i]
        s = fast_sigmoidf(k2 * (x + c * x * x * x))
        dy = k2 * (<float>1.0 + c3 * x * x)
        dinp[i] = dout[i] * (s + x * s * (<float>1.0 - s) * dy)


cdef void gelu_tanh_forward(float* out, const float* inp, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t chunk, start
    for chunk in prange((n + ELEM_CHUNK - 1) // ELEM_CHUNK, schedule="static"):
        start = chunk * ELEM_CHUNK
        gelu_tanh_forward_span(out + start, inp + start, min_size(ELEM_CHUNK, n - start))


cdef void gelu_tanh_backward(float* dinp, const float* inp, const float* dout,
                        Py_ssize_t n) noexcept nogil:
    # dinp (n) = gelu'(inp) * dout; dinp may be dout (in place)
    cdef Py_ssize_t chunk, start
    for chunk in prange((n + ELEM_CHUNK - 1) // ELEM_CHUNK, schedule="static"):
        start = chunk * ELEM_CHUNK
        gelu_tanh_backward_span(dinp + start, inp + start, dout + start,
                           min_size(ELEM_CHUNK, n - start))


# --- GELU, exact form (nanoGPT's nn.GELU()) --------------------------------------
#
# gelu(x) = x Phi(x), Phi the standard normal CDF, 0.5 (1 + erf(x / sqrt 2)).
# In that form it loses its precision for negative x, where erf is close to
# -1 (Phi(-3) = 0.00135 would keep four significant digits), so the tail is
# computed directly: Phi(-|x|) = exp(-x^2 / 2) Q(t), t = 1 / (1 + K |x|), and
# Phi(|x|) = 1 - Phi(-|x|); near 0, Phi(x) = 0.5 + x S(x^2). Q and S are
# polynomials fitted by scripts/fit_gelu_exact.py. gelu' = Phi(x) + x phi(x),
# phi(x) = exp(-x^2 / 2) / sqrt(2 pi), shares the exponential.

DEF GELU_SPLIT = 0.7      # |x| below it: the series around 0
DEF GELU_K = 0.45


cdef inline float gauss_exp(float x) noexcept nogil:
    # exp(-x^2 / 2) to float32 accuracy. x^2 / 2 is up to 70 here, and rounding
    # it would cost its own relative error times 70 in the result, so it goes
    # in two parts: x = xh + xl, xh holding x's top 12 bits (xh^2 is exact),
    # x^2 / 2 = xh^2 / 2 + xl (xh + xl / 2).
    cdef float xh, xl
    cdef int32_t bits
    memcpy(&bits, &x, 4)
    bits = bits & <int32_t>0xFFFFF000
    memcpy(&xh, &bits, 4)
    xl = x - xh
    return fast_exp_sum(-(xh * xh) * <float>0.5, -(xl * (xh + <float>0.5 * xl)))


cdef inline float normal_cdf(float x, float e) noexcept nogil:
    # Phi(x), given e = gauss_exp(x). Both branches are computed and one is
    # selected, so that the loops calling this vectorise.
    cdef float ax = fabsf(x)
    cdef float t = <float>1.0 / (<float>1.0 + <float>GELU_K * ax)
    cdef float x2 = x * x
    cdef float q, s, tail, far, near
    q = <float>2.022277819e-02
    q = q * t + <float>-1.573855595e-01
    q = q * t + <float>4.276087897e-01
    q = q * t + <float>-5.129497440e-01
    q = q * t + <float>2.098147373e-01
    q = q * t + <float>-3.122036393e-03
    q = q * t + <float>1.585825510e-01
    q = q * t + <float>1.775050758e-01
    q = q * t + <float>1.796744638e-01
    q = q * t + <float>-4.861372510e-06
    tail = e * q                                  # Phi(-|x|)
    far = tail if x < <float>0.0 else <float>1.0 - tail
    s = <float>6.012866565e-07
    s = s * x2 + <float>-9.403416706e-06
    s = s * x2 + <float>1.154215718e-04
    s = s * x2 + <float>-1.187326075e-03
    s = s * x2 + <float>9.973556844e-03
    s = s * x2 + <float>-6.649038006e-02
    s = s * x2 + <float>3.989422804e-01
    near = <float>0.5 + x * s
    return near if ax < <float>GELU_SPLIT else far


cdef inline void gelu_exact_forward_span(float* out, const float* inp,
                                         Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef float x
    for i in range(n):
        x = inp[i]
        out[i] = x * normal_cdf(x, gauss_exp(x))


cdef inline void gelu_exact_backward_span(float* dinp, const float* inp, const float* dout,
                                          Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef float x, e
    for i in range(n):
        x = inp[i]
        e = gauss_exp(x)
        dinp[i] = dout[i] * (normal_cdf(x, e) + x * e * <float>0.3989422804014327)


cdef void gelu_exact_forward(float* out, const float* inp, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t chunk, start
    for chunk in prange((n + ELEM_CHUNK - 1) // ELEM_CHUNK, schedule="static"):
        start = chunk * ELEM_CHUNK
        gelu_exact_forward_span(out + start, inp + start, min_size(ELEM_CHUNK, n - start))


cdef void gelu_exact_backward(float* dinp, const float* inp, const float* dout,
                              Py_ssize_t n) noexcept nogil:
    # dinp (n) = gelu'(inp) * dout; dinp may be dout (in place)
    cdef Py_ssize_t chunk, start
    for chunk in prange((n + ELEM_CHUNK - 1) // ELEM_CHUNK, schedule="static"):
        start = chunk * ELEM_CHUNK
        gelu_exact_backward_span(dinp + start, inp + start, dout + start,
                                 min_size(ELEM_CHUNK, n - start))


cdef inline void gelu_span(float* out, const float* inp, Py_ssize_t n,
                           bint exact) noexcept nogil:
    # One thread's GELU of either form (decoding works on one row at a time).
    if exact:
        gelu_exact_forward_span(out, inp, n)
    else:
        gelu_tanh_forward_span(out, inp, n)


# --- causal multi-head self-attention -------------------------------------------

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
                                 int hs) noexcept nogil:
    # att (T,T) = softmax over the causal past of scale * q @ k^T, for one
    # (batch, head) whose q, k are column blocks of qkv (T, 3C). Forward and
    # backward both call this on the same inputs with the same single-threaded
    # sgemm, so backward recomputes exactly the probabilities forward used.
    gemm(False, True, T, T, hs, 1.0 / sqrtf(hs), qkv, 3 * C, qkv + C, 3 * C, 0.0, att, T)
    causal_softmax_rows(att, T)


cdef inline void attention_head_forward(float* out, float* att, float* scratch,
                                        const float* qkv, int T, int C, int hs,
                                        float p, uint64_t seed,
                                        uint64_t first) noexcept nogil:
    # One (batch, head). q, k, v are column blocks of qkv (T, 3C): row stride 3C.
    # out: this head's columns of (T, C), row stride C. att (T,T): where the
    # probabilities go (the thread's scratch in training: nothing T x T is kept).
    # scratch (T,T): the dropped-out probabilities.
    cdef const float* v = qkv + 2 * C
    cdef const float* att_used = att
    attention_probs(att, qkv, T, C, hs)
    if p > 0.0:
        apply_dropout_tt(scratch, att, T, p, seed, first)
        att_used = scratch
    # out = att @ v
    gemm(False, False, T, hs, T, 1.0, att_used, T, v, 3 * C, 0.0, out, C)


cdef void attention_forward(float* out, float* att, float* scratch,
                            const float* qkv,
                            int B, int T, int C, int NH,
                            float p, uint64_t seed, int n_slots) noexcept nogil:
    # out (B,T,C): heads side by side; qkv (B,T,3C). att (B,NH,T,T) receives the
    # probabilities, or NULL: training keeps none (backward recomputes them, so
    # memory does not grow with L * B * NH * T * T), each head's go to its
    # thread's scratch. scratch: n_slots * ATT_SLOT * T*T floats, one slot per thread.
    cdef int hs = C // NH
    cdef Py_ssize_t bh, b, h, tt = <Py_ssize_t>T * T
    cdef float* slot
    cdef int nthreads = openmp.omp_get_max_threads()
    if nthreads > n_slots:
        nthreads = n_slots
    for bh in prange(<Py_ssize_t>B * NH, schedule="dynamic", num_threads=nthreads):
        b = bh // NH
        h = bh % NH
        slot = scratch + openmp.omp_get_thread_num() * ATT_SLOT * tt
        attention_head_forward(out + b * T * C + h * hs,
                               att + bh * tt if att != NULL else slot + tt, slot,
                               qkv + b * T * 3 * C + h * hs, T, C, hs,
                               p, seed, <uint64_t>(bh * tt))


cdef inline void attention_head_backward(float* dqkv, float* scratch,
                                         const float* dout, const float* qkv,
                                         const float* saved_att, int T, int C, int hs,
                                         float p, uint64_t seed,
                                         uint64_t first) noexcept nogil:
    # One (batch, head): dq, dk, dv are written into this head's columns of dqkv.
    # saved_att (T,T): the probabilities forward kept, or NULL: then they are
    # recomputed into scratch (flash attention's trade: a q @ k^T more, instead
    # of keeping every layer's T x T). scratch (ATT_SLOT, T, T): their gradient,
    # the dropped-out probabilities, the recomputed probabilities.
    cdef const float* q = qkv
    cdef const float* k = qkv + C
    cdef const float* v = qkv + 2 * C
    cdef float* dq = dqkv
    cdef float* dk = dqkv + C
    cdef float* dv = dqkv + 2 * C
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
        attention_probs(scratch + 2 * tt, qkv, T, C, hs)
        att = scratch + 2 * tt
    att_used = att
    if p > 0.0:
        keep_scale = 1.0 / (1.0 - p)
        apply_dropout_tt(att_dropped, att, T, p, seed, first)
        att_used = att_dropped
    # dv = att_used^T @ dout;  datt = dout @ v^T
    gemm(True, False, T, hs, T, 1.0, att_used, T, dout, C, 0.0, dv, 3 * C)
    gemm(False, True, T, T, hs, 1.0, dout, C, v, 3 * C, 0.0, datt, T)
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
    gemm(False, False, T, hs, T, scale, datt, T, k, 3 * C, 0.0, dq, 3 * C)
    gemm(True, False, T, hs, T, scale, datt, T, q, 3 * C, 0.0, dk, 3 * C)


cdef void attention_backward(float* dqkv, float* scratch,
                             const float* dout, const float* qkv, const float* att,
                             int B, int T, int C, int NH,
                             float p, uint64_t seed, int n_slots) noexcept nogil:
    # dqkv (B,T,3C) written; dout (B,T,C); qkv as saved by forward; att
    # (B,NH,T,T) the probabilities forward kept, or NULL to recompute them;
    # scratch: n_slots * ATT_SLOT * T*T floats
    cdef int hs = C // NH
    cdef Py_ssize_t bh, b, h, tt = <Py_ssize_t>T * T
    cdef int nthreads = openmp.omp_get_max_threads()
    if nthreads > n_slots:
        nthreads = n_slots
    for bh in prange(<Py_ssize_t>B * NH, schedule="dynamic", num_threads=nthreads):
        b = bh // NH
        h = bh % NH
        attention_head_backward(dqkv + b * T * 3 * C + h * hs,
                                scratch + openmp.omp_get_thread_num() * ATT_SLOT * tt,
                                dout + b * T * C + h * hs, qkv + b * T * 3 * C + h * hs,
                                att + bh * tt if att != NULL else NULL,
                                T, C, hs, p, seed, <uint64_t>(bh * tt))


# --- fused softmax + cross-entropy ------------------------------------------------

cdef inline float crossentropy_row(float* lse, const float* logits, int target,
                                   int V) noexcept nogil:
    cdef int v
    cdef float mx = logits[0], total = 0.0, l
    for v in range(1, V):
        if logits[v] > mx:
            mx = logits[v]
    for v in range(V):
        total = total + fast_expf(logits[v] - mx)
    l = mx + logf(total)
    lse[0] = l
    return l - logits[target]


cdef void crossentropy_forward(float* losses, float* lse,
                               const float* logits, const int32_t* targets,
                               Py_ssize_t N, int V) noexcept nogil:
    # losses (N) = logsumexp(logits[n]) - logits[n, targets[n]];  lse (N) saved
    cdef Py_ssize_t n
    for n in prange(N, schedule="static"):
        losses[n] = crossentropy_row(lse + n, logits + n * V, targets[n], V)


cdef void crossentropy_backward(float* dlogits,
                                const float* logits, const float* lse,
                                const int32_t* targets, float dloss,
                                Py_ssize_t N, int V) noexcept nogil:
    # dlogits (N,V) = dloss * (softmax(logits) - onehot(targets)); written.
    # dloss is d(total loss)/d(each row's loss): 1/N for the mean.
    cdef Py_ssize_t n, v
    cdef const float* row
    cdef float* drow
    cdef float l
    for n in prange(N, schedule="static"):
        row = logits + n * V
        drow = dlogits + n * V
        l = lse[n]
        for v in range(V):
            drow[v] = fast_expf(row[v] - l) * dloss
        drow[targets[n]] -= dloss


# --- AdamW and gradient norm ---------------------------------------------------------

DEF REDUCE_CHUNK = 8192


cdef inline double sum_of_squares_span(const float* x, Py_ssize_t n) noexcept nogil:
    # Eight running sums in double, updated by look-alike statements that gcc packs
    # into two 4-wide vectors: a single running sum is one chain of dependent adds
    # (it made the gradient norm 1% of a baby training step). The order is fixed
    # by n alone, so the result does not depend on the thread count.
    cdef double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0
    cdef double s4 = 0.0, s5 = 0.0, s6 = 0.0, s7 = 0.0
    cdef double v
    cdef Py_ssize_t block, i
    cdef const float* p
    for block in range(n // 8):
        p = x + block * 8
        s0 = s0 + <double>p[0] * p[0]
        s1 = s1 + <double>p[1] * p[1]
        s2 = s2 + <double>p[2] * p[2]
        s3 = s3 + <double>p[3] * p[3]
        s4 = s4 + <double>p[4] * p[4]
        s5 = s5 + <double>p[5] * p[5]
        s6 = s6 + <double>p[6] * p[6]
        s7 = s7 + <double>p[7] * p[7]
    for i in range((n // 8) * 8, n):
        v = x[i]
        s0 = s0 + v * v
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


cdef double sum_of_squares(const float* x, Py_ssize_t n) noexcept nogil:
    # Fixed chunks summed in a fixed order: the same bits with any thread count.
    cdef Py_ssize_t n_chunks = (n + REDUCE_CHUNK - 1) // REDUCE_CHUNK
    cdef Py_ssize_t chunk, i, i0, i1
    cdef double total = 0.0
    cdef double stack_partial[1024]
    cdef double* partial = stack_partial
    if n_chunks > 1024:
        # More than 8M elements: partial sums on the heap (malloc is safe
        # without the GIL); if even that fails, sum in one thread.
        partial = <double*>malloc(n_chunks * sizeof(double))
        if partial == NULL:
            for i in range(n):
                total += <double>x[i] * x[i]
            return total
    for chunk in prange(n_chunks, schedule="static"):
        i0 = chunk * REDUCE_CHUNK
        i1 = i0 + REDUCE_CHUNK
        if i1 > n:
            i1 = n
        partial[chunk] = sum_of_squares_span(x + i0, i1 - i0)
    for chunk in range(n_chunks):
        total += partial[chunk]
    if partial != stack_partial:
        free(partial)
    return total


cdef void adamw_update(float* params, float* m, float* v,
                       const float* grads,
                       Py_ssize_t n, Py_ssize_t n_decay,
                       float lr, float beta1, float beta2, float eps,
                       float weight_decay, float grad_scale, int step) noexcept nogil:
    # PyTorch's AdamW on flat buffers (n). Elements [0, n_decay) get weight
    # decay, the rest (biases, LayerNorm) do not. grad_scale folds gradient
    # clipping into this pass. step counts from 1.
    cdef Py_ssize_t i
    cdef float g, m_hat, v_hat
    cdef float bias1 = 1.0 - <float>pow(beta1, step)
    cdef float bias2 = 1.0 - <float>pow(beta2, step)
    cdef float decay
    for i in prange(n, schedule="static"):
        g = grads[i] * grad_scale
        m[i] = beta1 * m[i] + (1.0 - beta1) * g
        v[i] = beta2 * v[i] + (1.0 - beta2) * g * g
        m_hat = m[i] / bias1
        v_hat = v[i] / bias2
        decay = weight_decay if i < n_decay else 0.0
        params[i] = params[i] - lr * decay * params[i] - lr * m_hat / (sqrtf(v_hat) + eps)


# ---------------------------------------------------------------------------
# 4. Python entry points to single kernels
#
# The same kernels, callable on numpy arrays, for tests and for reading. Each
# takes C-contiguous 1-D float32 arrays (pass `a.ravel()` of a contiguous array)
# in the kernel's argument order and checks every length before running.
# ---------------------------------------------------------------------------

cdef _need(name, Py_ssize_t got, Py_ssize_t want):
    if got != want:
        raise ValueError(f"{name}: expected {want} elements, got {got}")


def _need_positive(**sizes):
    for name, value in sizes.items():
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")


cdef _need_ids(const int32_t[::1] ids, Py_ssize_t n, int limit, name):
    cdef Py_ssize_t i
    _need(name, ids.shape[0], n)
    for i in range(n):
        if ids[i] < 0 or ids[i] >= limit:
            raise ValueError(f"{name}[{i}] = {ids[i]} is outside [0, {limit})")


def py_encoder_forward(float[::1] out, const int32_t[::1] idx, const float[::1] wte,
                       const float[::1] wpe, int B, int T, int C):
    _need_positive(B=B, T=T, C=C)
    _need("out", out.shape[0], <Py_ssize_t>B * T * C)
    _need_ids(idx, <Py_ssize_t>B * T, wte.shape[0] // C, "idx")
    if wpe.shape[0] < <Py_ssize_t>T * C or wte.shape[0] % C:
        raise ValueError("wte must be (V, C) and wpe at least (T, C)")
    with nogil:
        encoder_forward(&out[0], &idx[0], &wte[0], &wpe[0], B, T, C)


def py_encoder_backward(float[::1] dwte, float[::1] dwpe, const float[::1] dout,
                        const int32_t[::1] idx, int B, int T, int C):
    _need_positive(B=B, T=T, C=C)
    _need("dout", dout.shape[0], <Py_ssize_t>B * T * C)
    _need_ids(idx, <Py_ssize_t>B * T, dwte.shape[0] // C, "idx")
    if dwpe.shape[0] < <Py_ssize_t>T * C or dwte.shape[0] % C:
        raise ValueError("dwte must be (V, C) and dwpe at least (T, C)")
    with nogil:
        encoder_backward(&dwte[0], &dwpe[0], &dout[0], &idx[0], B, T, C)


def py_layernorm_forward(float[::1] out, float[::1] mean, float[::1] rstd,
                         const float[::1] inp, const float[::1] weight,
                         const float[::1] bias, Py_ssize_t N, int C):
    # bias None: no bias
    cdef const float* bias_ptr = NULL
    _need_positive(N=N, C=C)
    for name, arr, size in (("out", out, N * C), ("mean", mean, N), ("rstd", rstd, N),
                            ("inp", inp, N * C), ("weight", weight, C)):
        _need(name, arr.shape[0], size)
    if bias is not None:
        _need("bias", bias.shape[0], C)
        bias_ptr = &bias[0]
    with nogil:
        layernorm_forward(&out[0], &mean[0], &rstd[0], &inp[0], &weight[0], bias_ptr, N, C)


def py_layernorm_backward(float[::1] dinp, float[::1] dweight, float[::1] dbias,
                          const float[::1] dout, const float[::1] inp,
                          const float[::1] weight, const float[::1] mean,
                          const float[::1] rstd, Py_ssize_t N, int C):
    # dbias None: no bias
    cdef float* dbias_ptr = NULL
    _need_positive(N=N, C=C)
    for name, arr, size in (("dinp", dinp, N * C), ("dweight", dweight, C),
                            ("dout", dout, N * C), ("inp", inp, N * C),
                            ("weight", weight, C), ("mean", mean, N), ("rstd", rstd, N)):
        _need(name, arr.shape[0], size)
    if dbias is not None:
        _need("dbias", dbias.shape[0], C)
        dbias_ptr = &dbias[0]
    with nogil:
        layernorm_backward(&dinp[0], &dweight[0], dbias_ptr, &dout[0], &inp[0],
                           &weight[0], &mean[0], &rstd[0], N, C)


def py_matmul_forward(float[::1] out, const float[::1] inp, const float[::1] weight,
                      bias, Py_ssize_t N, int C_in, int C_out):
    cdef const float[::1] bias_view
    cdef const float* bias_ptr = NULL
    _need_positive(N=N, C_in=C_in, C_out=C_out)
    for name, arr, size in (("out", out, N * C_out), ("inp", inp, N * C_in),
                            ("weight", weight, <Py_ssize_t>C_out * C_in)):
        _need(name, arr.shape[0], size)
    if bias is not None:
        bias_view = bias
        _need("bias", bias_view.shape[0], C_out)
        bias_ptr = &bias_view[0]
    with nogil:
        matmul_forward(&out[0], &inp[0], &weight[0], bias_ptr, N, C_in, C_out)


def py_matmul_backward(float[::1] dinp, float[::1] dweight, dbias,
                       const float[::1] dout, const float[::1] inp,
                       const float[::1] weight, Py_ssize_t N, int C_in, int C_out):
    cdef float[::1] dbias_view
    cdef float* dbias_ptr = NULL
    _need_positive(N=N, C_in=C_in, C_out=C_out)
    for name, arr, size in (("dinp", dinp, N * C_in),
                            ("dweight", dweight, <Py_ssize_t>C_out * C_in),
                            ("dout", dout, N * C_out), ("inp", inp, N * C_in),
                            ("weight", weight, <Py_ssize_t>C_out * C_in)):
        _need(name, arr.shape[0], size)
    if dbias is not None:
        dbias_view = dbias
        _need("dbias", dbias_view.shape[0], C_out)
        dbias_ptr = &dbias_view[0]
    with nogil:
        matmul_backward(&dinp[0], &dweight[0], dbias_ptr, &dout[0], &inp[0], &weight[0],
                        N, C_in, C_out)


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
                          p, seed, <int>n_slots)


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
                           B, T, C, NH, p, seed, <int>n_slots)


def py_gelu_tanh_forward(float[::1] out, const float[::1] inp):
    _need("out", out.shape[0], inp.shape[0])
    if inp.shape[0] == 0:
        return
    with nogil:
        gelu_tanh_forward(&out[0], &inp[0], inp.shape[0])


def py_gelu_tanh_backward(float[::1] dinp, const float[::1] inp, const float[::1] dout):
    _need("dinp", dinp.shape[0], inp.shape[0])
    _need("dout", dout.shape[0], inp.shape[0])
    if inp.shape[0] == 0:
        return
    with nogil:
        gelu_tanh_backward(&dinp[0], &inp[0], &dout[0], inp.shape[0])


def py_gelu_exact_forward(float[::1] out, const float[::1] inp):
    _need("out", out.shape[0], inp.shape[0])
    if inp.shape[0] == 0:
        return
    with nogil:
        gelu_exact_forward(&out[0], &inp[0], inp.shape[0])


def py_gelu_exact_backward(float[::1] dinp, const float[::1] inp, const float[::1] dout):
    _need("dinp", dinp.shape[0], inp.shape[0])
    _need("dout", dout.shape[0], inp.shape[0])
    if inp.shape[0] == 0:
        return
    with nogil:
        gelu_exact_backward(&dinp[0], &inp[0], &dout[0], inp.shape[0])


def py_residual_forward(float[::1] out, const float[::1] a, const float[::1] b):
    _need("a", a.shape[0], out.shape[0])
    _need("b", b.shape[0], out.shape[0])
    if out.shape[0] == 0:
        return
    with nogil:
        residual_forward(&out[0], &a[0], &b[0], out.shape[0])


def py_residual_backward(float[::1] da, float[::1] db, const float[::1] dout):
    _need("da", da.shape[0], dout.shape[0])
    _need("db", db.shape[0], dout.shape[0])
    if dout.shape[0] == 0:
        return
    with nogil:
        residual_backward(&da[0], &db[0], &dout[0], dout.shape[0])


def _check_dropout(float p):
    if not (0.0 <= p < 1.0):
        raise ValueError(f"dropout must be in [0, 1), got {p}")


def py_dropout_forward(float[::1] out, const float[::1] inp, float p, uint64_t seed):
    _check_dropout(p)
    _need("out", out.shape[0], inp.shape[0])
    if inp.shape[0] == 0:
        return
    with nogil:
        dropout_forward(&out[0], &inp[0], inp.shape[0], p, seed)


def py_dropout_backward(float[::1] dinp, const float[::1] dout, float p, uint64_t seed):
    _check_dropout(p)
    _need("dinp", dinp.shape[0], dout.shape[0])
    if dout.shape[0] == 0:
        return
    with nogil:
        dropout_backward(&dinp[0], &dout[0], dout.shape[0], p, seed)


def py_crossentropy_forward(float[::1] losses, float[::1] lse, const float[::1] logits,
                            const int32_t[::1] targets, Py_ssize_t N, int V):
    _need_positive(N=N, V=V)
    _need("losses", losses.shape[0], N)
    _need("lse", lse.shape[0], N)
    _need("logits", logits.shape[0], N * V)
    _need_ids(targets, N, V, "targets")
    with nogil:
        crossentropy_forward(&losses[0], &lse[0], &logits[0], &targets[0], N, V)


def py_crossentropy_backward(float[::1] dlogits, const float[::1] logits,
                             const float[::1] lse, const int32_t[::1] targets,
                             float dloss, Py_ssize_t N, int V):
    _need_positive(N=N, V=V)
    _need("dlogits", dlogits.shape[0], N * V)
    _need("logits", logits.shape[0], N * V)
    _need("lse", lse.shape[0], N)
    _need_ids(targets, N, V, "targets")
    with nogil:
        crossentropy_backward(&dlogits[0], &logits[0], &lse[0], &targets[0], dloss, N, V)


def py_sum_of_squares(const float[::1] x):
    if x.shape[0] == 0:
        return 0.0
    cdef double total
    with nogil:
        total = sum_of_squares(&x[0], x.shape[0])
    return total


def py_adamw_update(float[::1] params, float[::1] m, float[::1] v, const float[::1] grads,
                    Py_ssize_t n_decay, float lr, float beta1, float beta2, float eps,
                    float weight_decay, float grad_scale, int step):
    cdef Py_ssize_t n = params.shape[0]
    for name, arr in (("m", m), ("v", v), ("grads", grads)):
        _need(name, arr.shape[0], n)
    if not 0 <= n_decay <= n:
        raise ValueError(f"n_decay={n_decay} is outside [0, {n}]")
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    if n == 0:
        return
    with nogil:
        adamw_update(&params[0], &m[0], &v[0], &grads[0], n, n_decay, lr, beta1, beta2,
                     eps, weight_decay, grad_scale, step)


# ---------------------------------------------------------------------------
# Sampling helpers (generation)
# ---------------------------------------------------------------------------

cdef struct SortItem:
    float value
    int index


cdef int _by_value_descending(const void* a, const void* b) noexcept nogil:
    cdef float va = (<const SortItem*>a).value, vb = (<const SortItem*>b).value
    if va > vb:
        return -1
    if va < vb:
        return 1
    return (<const SortItem*>a).index - (<const SortItem*>b).index


cdef inline double uniform01(uint64_t seed, uint64_t i) noexcept nogil:
    # A uniform draw in [0, 1) from the same counter-based hash as dropout.
    return (<double>hash_u32(seed ^ <uint64_t>0xA5A5A5A5A5A5A5A5, i)) / 4294967296.0


cdef int sample_token(const float* logits, float* probs, SortItem* order, int V,
                      float temperature, int top_k, float top_p,
                      double u) noexcept nogil:
    # nanoGPT's sampling: logits / temperature, keep the top_k largest, softmax;
    # then nucleus (top_p): the smallest prefix by probability whose mass
    # reaches top_p. temperature 0 is argmax. u is a uniform draw in [0, 1).
    cdef int v, n_keep = V, best = 0
    cdef float mx = logits[0]
    cdef double total = 0.0, mass, target
    for v in range(1, V):
        if logits[v] > mx:
            mx = logits[v]
            best = v
    if temperature == 0.0:
        return best
    for v in range(V):
        probs[v] = fast_expf((logits[v] - mx) / temperature)
    if (top_k > 0 and top_k < V) or top_p < 1.0:
        for v in range(V):
            order[v].value = probs[v]
            order[v].index = v
        qsort(order, V, sizeof(SortItem), _by_value_descending)
        if top_k > 0 and top_k < V:
            n_keep = top_k
        for v in range(n_keep):
            total += order[v].value
        if top_p < 1.0:
            mass = 0.0
            for v in range(n_keep):
                mass += order[v].value
                if mass >= top_p * total:
                    n_keep = v + 1
                    break
            total = 0.0
            for v in range(n_keep):
                total += order[v].value
        target = u * total
        mass = 0.0
        for v in range(n_keep):
            mass += order[v].value
            if mass > target:
                return order[v].index
        return order[n_keep - 1].index
    for v in range(V):
        total += probs[v]
    target = u * total
    mass = 0.0
    for v in range(V):
        mass += probs[v]
        if mass > target:
            return v
    return best


cdef inline void add_into(float* x, const float* y, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        x[i] = x[i] + y[i]


cdef float dot(const float* a, const float* b, int n) noexcept nogil:
    # Sixteen running sums updated by look-alike statements: gcc packs them into
    # two 8-wide vectors, two independent chains of fused multiply-adds, so the
    # adds' latency is hidden. (gcc will not vectorise a single running sum
    # without -ffast-math, and an accumulator array got shuffled through memory.)
    cdef float s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0
    cdef float s4 = 0.0, s5 = 0.0, s6 = 0.0, s7 = 0.0
    cdef float t0 = 0.0, t1 = 0.0, t2 = 0.0, t3 = 0.0
    cdef float t4 = 0.0, t5 = 0.0, t6 = 0.0, t7 = 0.0
    cdef float total
    cdef int block, i
    # A counted loop: gcc cannot count Cython's `while` (it becomes while(1)/break).
    for block in range(n // 16):
        i = block * 16
        s0 = s0 + a[i] * b[i]
        s1 = s1 + a[i + 1] * b[i + 1]
        s2 = s2 + a[i + 2] * b[i + 2]
        s3 = s3 + a[i + 3] * b[i + 3]
        s4 = s4 + a[i + 4] * b[i + 4]
        s5 = s5 + a[i + 5] * b[i + 5]
        s6 = s6 + a[i + 6] * b[i + 6]
        s7 = s7 + a[i + 7] * b[i + 7]
        t0 = t0 + a[i + 8] * b[i + 8]
        t1 = t1 + a[i + 9] * b[i + 9]
        t2 = t2 + a[i + 10] * b[i + 10]
        t3 = t3 + a[i + 11] * b[i + 11]
        t4 = t4 + a[i + 12] * b[i + 12]
        t5 = t5 + a[i + 13] * b[i + 13]
        t6 = t6 + a[i + 14] * b[i + 14]
        t7 = t7 + a[i + 15] * b[i + 15]
    total = (((s0 + t0) + (s1 + t1)) + ((s2 + t2) + (s3 + t3))) + \
            (((s4 + t4) + (s5 + t5)) + ((s6 + t6) + (s7 + t7)))
    for i in range((n // 16) * 16, n):
        total = total + a[i] * b[i]
    return total


DEF MATVEC_PARALLEL_MIN = 262144  # multiply-adds below which one thread beats a fork

cdef void matvec_forward(float* out, const float* inp, const float* weight,
                         const float* bias, int B, int C_in, int C_out) noexcept nogil:
    # matmul_forward for a handful of rows (decoding): out (B,C_out) =
    # inp (B,C_in) @ weight^T + bias. sgemm's fixed cost per call is larger than
    # this much work, so it is a dot product per output. At batch 1 decoding
    # reads every weight once per token, so it is bound by memory bandwidth:
    # the outputs are split over the threads in contiguous blocks, each thread
    # streaming its own rows of the weight. Each output is one thread's dot
    # product, so the result does not depend on the thread count.
    cdef Py_ssize_t b, o
    cdef bint parallel = <Py_ssize_t>C_out * C_in >= MATVEC_PARALLEL_MIN
    for b in range(B):
        if parallel:
            for o in prange(C_out, schedule="static"):
                out[b * C_out + o] = dot(inp + b * C_in, weight + o * C_in, C_in)
        else:
            for o in range(C_out):
                out[b * C_out + o] = dot(inp + b * C_in, weight + o * C_in, C_in)
        if bias != NULL:
            add_into(out + b * C_out, bias, C_out)


def py_sample_token(const float[::1] logits not None, float temperature, int top_k,
                    float top_p, double u):
    """One draw of the sampler on a logits vector (tests)."""
    cdef int V = logits.shape[0]
    cdef Buffer probs
    cdef SortItem* order
    cdef int token
    if V < 1:
        raise ValueError("logits must not be empty")
    if not 0.0 <= u < 1.0:
        raise ValueError("u must be in [0, 1)")
    probs = Buffer(V)
    order = <SortItem*>PyMem_Malloc(V * sizeof(SortItem))
    if order == NULL:
        raise MemoryError()
    token = sample_token(&logits[0], probs.data, order, V, temperature, top_k, top_p, u)
    PyMem_Free(order)
    return token


# ---------------------------------------------------------------------------
# 5. Graph: the GPT's forward and backward over flat buffers
# ---------------------------------------------------------------------------

# The parameter tensors, by the short names model.py's layout table uses. Each
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


cdef inline uint64_t site_seed(uint64_t seed, uint64_t site) noexcept nogil:
    # A separate dropout stream for each place dropout is applied in one step.
    return (<uint64_t>hash_u32(seed, 2 * site) << 32) | hash_u32(seed, 2 * site + 1)


cdef class Graph:
    """Forward and backward of the GPT, one call each, without the GIL.

    params and grads are Buffers laid out by model.py (offsets by PARAM_KEYS);
    the Graph owns the activation Buffer, sized for the largest (B, T) seen.
    """
    cdef readonly int V, max_T, L, NH, C
    cdef readonly bint bias             # Linear and LayerNorm layers have biases
    cdef readonly bint gelu_exact       # GELU's exact (erf) form, else tanh
    cdef readonly int B, T              # shape of the last forward
    cdef readonly bint has_targets      # last forward had targets: backward is allowed
    cdef readonly bint logits_are_gradient  # backward ran: the logits block holds dlogits
    cdef readonly double loss
    cdef Buffer params_buf, grads_buf, acts_buf
    cdef Params p, g
    cdef Activations a
    cdef int n_slots
    cdef float dropout
    cdef uint64_t seed
    cdef int32_t[::1] idx, targets
    # generation
    cdef Buffer kv_buf, dec_buf
    cdef int gen_B
    cdef readonly int cache_len
    cdef bint busy            # a call is running (see _acquire)
    cdef float* k_cache       # (L, B, maxT, C)
    cdef float* v_cache       # (L, B, maxT, C)
    cdef float* dec_x         # (B, C) residual stream of the new position
    cdef float* dec_ln        # (B, C)
    cdef float* dec_qkv       # (B, 3C)
    cdef float* dec_atty      # (B, C)
    cdef float* dec_branch    # (B, C)
    cdef float* dec_fch       # (B, 4C)
    cdef float* dec_logits    # (B, V)
    cdef float* dec_scores    # (maxT)

    def __init__(self, int V, int max_T, int L, int NH, int C,
                 Buffer params not None, Buffer grads not None, dict offsets not None,
                 bint bias=True, bint gelu_exact=False):
        _need_positive(V=V, max_T=max_T, L=L, NH=NH, C=C)
        if C % NH:
            raise ValueError(f"C={C} is not divisible by NH={NH}")
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
        self.V, self.max_T, self.L, self.NH, self.C = V, max_T, L, NH, C
        self.bias, self.gelu_exact = bias, gelu_exact
        self.params_buf, self.grads_buf = params, grads
        self.p = _param_pointers(params.data, offsets)
        self.g = _param_pointers(grads.data, offsets)
        self.acts_buf = None
        self.B = self.T = 0
        self.has_targets = False
        self.gen_B = 0
        self.cache_len = 0
        self.busy = False

    # -- activation layout -------------------------------------------------------

    cdef Py_ssize_t _layout(self, float* base, int B, int T, int n_slots):
        """Assign activation pointers from base (or only count, if base is NULL).

        Returns the number of floats needed. Every array starts on a cache line.
        """
        cdef Py_ssize_t used = 0
        cdef Py_ssize_t N = <Py_ssize_t>B * T, C = self.C, L = self.L, V = self.V
        cdef Py_ssize_t TT = <Py_ssize_t>T * T
        cdef Activations* a = &self.a
        _take(&a.encoded, N * C, base, &used)
        _take(&a.ln1, L * N * C, base, &used)
        _take(&a.ln1_mean, L * N, base, &used)
        _take(&a.ln1_rstd, L * N, base, &used)
        _take(&a.qkv, L * N * 3 * C, base, &used)
        if L * B * self.NH * TT <= ATT_KEEP_MAX_FLOATS:
            _take(&a.att, L * B * self.NH * TT, base, &used)
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

    cdef _prepare(self, int B, int T):
        # Grow the activation block when (B, T) needs more room, then lay it out.
        cdef int n_slots = openmp.omp_get_max_threads()
        cdef Py_ssize_t need = self._layout(NULL, B, T, n_slots)
        if self.acts_buf is None or self.acts_buf.size < need:
            self.acts_buf = None    # free the old block before allocating the new one
            self.acts_buf = Buffer(need)
        self._layout(self.acts_buf.data, B, T, n_slots)
        self.n_slots = n_slots
        self.B, self.T = B, T

    @property
    def activation_bytes(self):
        return 0 if self.acts_buf is None else self.acts_buf.size * 4

    def logits_view(self):
        """The last forward's logits, (B*T*V,) as a view into the activation block."""
        if self.acts_buf is None:
            raise RuntimeError("no forward() has run yet")
        cdef Py_ssize_t off = self.a.logits - self.acts_buf.data
        with nogil:
            self._restore_logits()
        return np.asarray(self.acts_buf)[off:off + <Py_ssize_t>self.B * self.T * self.V]

    def attention_view(self):
        """The last forward's attention probabilities, (L*B*NH*T*T,) as a view
        into the activation block ((L, B, NH, T, T) in that order), or None when
        the batch was too large to keep them (backward recomputes them then)."""
        if self.acts_buf is None:
            raise RuntimeError("no forward() has run yet")
        if self.a.att == NULL:
            return None
        cdef Py_ssize_t off = self.a.att - self.acts_buf.data
        cdef Py_ssize_t n = <Py_ssize_t>self.L * self.B * self.NH * self.T * self.T
        return np.asarray(self.acts_buf)[off:off + n]

    # -- forward ------------------------------------------------------------------

    cdef _acquire(self):
        # The buffers are shared by every call: a second call while one runs (from
        # a generate() callback, or another thread: each call releases the GIL)
        # could swap them under the first. Checked and set under the GIL.
        if self.busy:
            raise RuntimeError("this model is already running a call (re-entered from a "
                               "callback, or used by two threads at once: give each "
                               "thread its own model)")
        self.busy = True

    def forward(self, const int32_t[:, ::1] idx not None, targets=None,
                float dropout=0.0, uint64_t seed=0):
        """Run the model on idx (B, T) int32; with targets (B, T) also the mean loss.

        Returns the loss (float) or None. Ids are checked here as well as in
        model.py: the kernels index embedding rows with them.
        """
        self._acquire()
        try:
            return self._forward_checked(idx, targets, dropout, seed)
        finally:
            self.busy = False

    def _forward_checked(self, const int32_t[:, ::1] idx not None, targets,
                         float dropout, uint64_t seed):
        cdef int B = idx.shape[0], T = idx.shape[1]
        cdef const int32_t[:, ::1] targets_view
        cdef int32_t[::1] new_idx, new_targets = None
        # Until this forward has fully succeeded, backward() is not allowed: a
        # rejected call must not leave the previous call's state half replaced.
        self.has_targets = False
        if B < 1 or T < 1 or T > self.max_T:
            raise ValueError(f"idx must be (B, T) with B >= 1 and 1 <= T <= {self.max_T}")
        _check_dropout(dropout)
        # Own copies, checked before they are kept: backward() reads them later,
        # whatever the caller does with its arrays in between (and they may be
        # read-only).
        new_idx = np.array(idx, dtype=np.int32, copy=True).reshape(-1)
        _need_ids(new_idx, <Py_ssize_t>B * T, self.V, "idx")
        if targets is not None:
            targets_view = targets
            if targets_view.shape[0] != B or targets_view.shape[1] != T:
                raise ValueError("targets must have the same shape as idx")
            new_targets = np.array(targets_view, dtype=np.int32, copy=True).reshape(-1)
            _need_ids(new_targets, <Py_ssize_t>B * T, self.V, "targets")
        self.idx = new_idx
        if new_targets is not None:
            self.targets = new_targets
        self._prepare(B, T)
        self.dropout, self.seed = dropout, seed
        with nogil:
            self._forward(targets is not None)
        self.has_targets = targets is not None
        self.logits_are_gradient = False
        return self.loss if targets is not None else None

    cdef void _restore_logits(self) noexcept nogil:
        # backward() overwrites the logits with their gradient; read again (a
        # second backward, logits_view), they are recomputed from the final
        # LayerNorm's output, which forward kept: the same sgemm on the same
        # inputs, so the same numbers bit for bit.
        if self.logits_are_gradient:
            matmul_forward(self.a.logits, self.a.lnf, self.p.wte, NULL,
                           <Py_ssize_t>self.B * self.T, self.C, self.V)
            self.logits_are_gradient = False

    cdef void _forward(self, bint with_targets) noexcept nogil:
        cdef int B = self.B, T = self.T, C = self.C, NH = self.NH, V = self.V
        cdef Py_ssize_t N = <Py_ssize_t>B * T, l
        cdef Py_ssize_t NC = N * C
        cdef float p = self.dropout
        cdef Params* w = &self.p
        cdef Activations* a = &self.a
        cdef LayerParams lw
        cdef LayerActs la
        cdef double total = 0.0
        cdef Py_ssize_t n
        encoder_forward(a.encoded, &self.idx[0], w.wte, w.wpe, B, T, C)
        if p > 0.0:
            dropout_forward(a.encoded, a.encoded, NC, p, site_seed(self.seed, 0))
        for l in range(self.L):
            lw = layer_params(w, l, C)
            la = layer_acts(a, l, N, C, B * NH * <Py_ssize_t>T * T)
            # x = x + dropout(c_proj(attention(ln_1(x))))
            layernorm_forward(la.ln1, la.ln1_mean, la.ln1_rstd, la.res_in, lw.ln1w, lw.ln1b,
                              N, C)
            matmul_forward(la.qkv, la.ln1, lw.qkvw, lw.qkvb, N, C, 3 * C)
            attention_forward(la.atty, la.att, a.att_scratch, la.qkv, B, T, C, NH,
                              p, site_seed(self.seed, 4 * l + 1), self.n_slots)
            matmul_forward(a.branch, la.atty, lw.attprojw, lw.attprojb, N, C, C)
            if p > 0.0:
                dropout_forward(a.branch, a.branch, NC, p, site_seed(self.seed, 4 * l + 2))
            residual_forward(la.res2, la.res_in, a.branch, NC)
            # x = x + dropout(c_proj(gelu(c_fc(ln_2(x)))))
            layernorm_forward(la.ln2, la.ln2_mean, la.ln2_rstd, la.res2, lw.ln2w, lw.ln2b,
                              N, C)
            matmul_forward(la.fch, la.ln2, lw.fcw, lw.fcb, N, C, 4 * C)
            if self.gelu_exact:
                gelu_exact_forward(la.fch_gelu, la.fch, 4 * NC)
            else:
                gelu_tanh_forward(la.fch_gelu, la.fch, 4 * NC)
            matmul_forward(a.branch, la.fch_gelu, lw.fcprojw, lw.fcprojb, N, 4 * C, C)
            if p > 0.0:
                dropout_forward(a.branch, a.branch, NC, p, site_seed(self.seed, 4 * l + 3))
            residual_forward(la.res3, la.res2, a.branch, NC)
        layernorm_forward(a.lnf, a.lnf_mean, a.lnf_rstd, a.res3 + (self.L - 1) * NC,
                          w.lnfw, w.lnfb, N, C)
        matmul_forward(a.logits, a.lnf, w.wte, NULL, N, C, V)     # lm_head tied to wte
        if with_targets:
            crossentropy_forward(a.losses, a.lse, a.logits, &self.targets[0], N, V)
            for n in range(N):
                total += a.losses[n]
            self.loss = total / N

    # -- backward -------------------------------------------------------------------

    def backward(self, double loss_scale=1.0):
        """Add the last forward's gradients of loss_scale x the mean loss into the
        grads buffer (a data-parallel rank passes its share of the global batch)."""
        if not self.has_targets:
            raise RuntimeError("backward() needs a forward() with targets first")
        if not (loss_scale > 0.0 and loss_scale < float("inf")):
            raise ValueError(f"loss_scale must be positive and finite, got {loss_scale}")
        # d(scaled mean loss)/d(each row's loss), rounded once to float32.
        cdef float dloss = <float>(loss_scale / (<double>self.B * self.T))
        self._acquire()
        try:
            with nogil:
                self._restore_logits()
                self.logits_are_gradient = True
                self._backward(dloss)
        finally:
            self.busy = False

    cdef void _backward(self, float dloss) noexcept nogil:
        # forward() in reverse, line by line. The residual stream's gradient lives
        # in one buffer (dres): the identity path of each residual add costs
        # nothing, and each LayerNorm backward adds its branch's share into it.
        cdef int B = self.B, T = self.T, C = self.C, NH = self.NH, V = self.V
        cdef Py_ssize_t N = <Py_ssize_t>B * T, l
        cdef Py_ssize_t NC = N * C
        cdef float p = self.dropout
        cdef Params* w = &self.p
        cdef Params* g = &self.g
        cdef Activations* a = &self.a
        cdef LayerParams lw, lg
        cdef LayerActs la
        cdef float* dbranch
        # In place: the logits become their gradient (the row's lse is all that
        # softmax needs), so the (N, V) block is held once, not twice.
        crossentropy_backward(a.logits, a.logits, a.lse, &self.targets[0], dloss, N, V)
        matmul_backward(a.dln, g.wte, NULL, a.logits, a.lnf, w.wte, N, C, V)
        memset(a.dres, 0, NC * sizeof(float))
        layernorm_backward(a.dres, g.lnfw, g.lnfb, a.dln, a.res3 + (self.L - 1) * NC,
                           w.lnfw, a.lnf_mean, a.lnf_rstd, N, C)
        for l in range(self.L - 1, -1, -1):
            lw = layer_params(w, l, C)
            lg = layer_params(g, l, C)
            la = layer_acts(a, l, N, C, B * NH * <Py_ssize_t>T * T)
            # mlp branch
            dbranch = a.dres
            if p > 0.0:
                dropout_backward(a.dbranch, a.dres, NC, p, site_seed(self.seed, 4 * l + 3))
                dbranch = a.dbranch
            matmul_backward(a.dfch, lg.fcprojw, lg.fcprojb, dbranch, la.fch_gelu, lw.fcprojw,
                            N, 4 * C, C)
            if self.gelu_exact:
                gelu_exact_backward(a.dfch, la.fch, a.dfch, 4 * NC)
            else:
                gelu_tanh_backward(a.dfch, la.fch, a.dfch, 4 * NC)
            matmul_backward(a.dln, lg.fcw, lg.fcb, a.dfch, la.ln2, lw.fcw, N, C, 4 * C)
            layernorm_backward(a.dres, lg.ln2w, lg.ln2b, a.dln, la.res2, lw.ln2w,
                               la.ln2_mean, la.ln2_rstd, N, C)
            # attention branch
            dbranch = a.dres
            if p > 0.0:
                dropout_backward(a.dbranch, a.dres, NC, p, site_seed(self.seed, 4 * l + 2))
                dbranch = a.dbranch
            matmul_backward(a.dln, lg.attprojw, lg.attprojb, dbranch, la.atty, lw.attprojw,
                            N, C, C)
            attention_backward(a.dqkv, a.att_scratch, a.dln, la.qkv, la.att, B, T, C, NH,
                               p, site_seed(self.seed, 4 * l + 1), self.n_slots)
            matmul_backward(a.dln, lg.qkvw, lg.qkvb, a.dqkv, la.ln1, lw.qkvw, N, C, 3 * C)
            layernorm_backward(a.dres, lg.ln1w, lg.ln1b, a.dln, la.res_in, lw.ln1w,
                               la.ln1_mean, la.ln1_rstd, N, C)
        if p > 0.0:
            dropout_backward(a.dres, a.dres, NC, p, site_seed(self.seed, 0))
        encoder_backward(g.wte, g.wpe, a.dres, &self.idx[0], B, T, C)

    # -- generation: KV cache, one position at a time --------------------------------
    #
    # prefill() runs the ordinary batched forward over the prompt and copies
    # each layer's k and v into the cache; decode_one() then costs one position's
    # work per new token. Both are serial per row (no OpenMP regions): at batch 1
    # the matrices are vectors and thread start-up would cost more than the work.

    cdef _prepare_generation(self, int B):
        cdef Py_ssize_t C = self.C, L = self.L, T = self.max_T
        cdef Py_ssize_t need = 0
        if self.gen_B != B:
            self.kv_buf = Buffer(2 * L * B * T * C)
            self.dec_buf = None
            # per-row scratch: x, ln, qkv, atty, branch, fch (4C), logits (V), scores (T)
            self.dec_buf = Buffer(B * (C + C + 3 * C + C + C + 4 * C + self.V) + T + 64)
            self.gen_B = B
        self.k_cache = self.kv_buf.data
        self.v_cache = self.kv_buf.data + L * B * T * C
        d = self.dec_buf.data
        self.dec_x = d
        self.dec_ln = d + B * C
        self.dec_qkv = d + 2 * B * C
        self.dec_atty = d + 5 * B * C
        self.dec_branch = d + 6 * B * C
        self.dec_fch = d + 7 * B * C
        self.dec_logits = d + 11 * B * C
        self.dec_scores = d + 11 * B * C + B * self.V

    cdef void _prefill_cache(self) noexcept nogil:
        # After _forward on (B, T): copy every layer's k, v rows into the cache.
        cdef Py_ssize_t l, b, t, C = self.C, T = self.T, B = self.B, maxT = self.max_T
        cdef Py_ssize_t N = B * T
        cdef const float* row
        for l in range(self.L):
            for b in range(B):
                for t in range(T):
                    row = self.a.qkv + l * N * 3 * C + (b * T + t) * 3 * C
                    memcpy(self.k_cache + ((l * B + b) * maxT + t) * C, row + C, C * 4)
                    memcpy(self.v_cache + ((l * B + b) * maxT + t) * C, row + 2 * C, C * 4)

    cdef void _decode_one(self, const int32_t* tokens, int pos) noexcept nogil:
        # tokens (B): one new token per row at position pos; fills dec_logits (B, V).
        cdef int B = self.gen_B, C = self.C, NH = self.NH, V = self.V, hs = C // NH
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
            x = self.dec_x + b * C
            for c in range(C):
                x[c] = w.wte[<Py_ssize_t>tokens[b] * C + c] + w.wpe[pos * C + c]
        for l in range(self.L):
            lw = layer_params(w, l, C)
            for b in range(B):
                layernorm_row(self.dec_ln + b * C, &mean, &rstd, self.dec_x + b * C,
                              lw.ln1w, lw.ln1b, C)
            matvec_forward(self.dec_qkv, self.dec_ln, lw.qkvw, lw.qkvb, B, C, 3 * C)
            for b in range(B):
                kc = self.k_cache + (l * B + b) * maxT * C
                vc = self.v_cache + (l * B + b) * maxT * C
                memcpy(<float*>kc + pos * C, self.dec_qkv + b * 3 * C + C, C * 4)
                memcpy(<float*>vc + pos * C, self.dec_qkv + b * 3 * C + 2 * C, C * 4)
                for h in range(NH):
                    q = self.dec_qkv + b * 3 * C + h * hs
                    y = self.dec_atty + b * C + h * hs
                    # scores over the cached past 0..pos, softmax, weighted sum of v
                    mx = -3.0e38
                    for j in range(pos + 1):
                        s = dot(q, kc + j * C + h * hs, hs) * scale
                        self.dec_scores[j] = s
                        if s > mx:
                            mx = s
                    total = 0.0
                    for j in range(pos + 1):
                        self.dec_scores[j] = fast_expf(self.dec_scores[j] - mx)
                        total = total + self.dec_scores[j]
                    for c in range(hs):
                        y[c] = 0.0
                    for j in range(pos + 1):
                        s = self.dec_scores[j] / total
                        for c in range(hs):
                            y[c] = y[c] + s * vc[j * C + h * hs + c]
            matvec_forward(self.dec_branch, self.dec_atty, lw.attprojw, lw.attprojb, B, C, C)
            add_into(self.dec_x, self.dec_branch, <Py_ssize_t>B * C)
            for b in range(B):
                layernorm_row(self.dec_ln + b * C, &mean, &rstd, self.dec_x + b * C,
                              lw.ln2w, lw.ln2b, C)
            matvec_forward(self.dec_fch, self.dec_ln, lw.fcw, lw.fcb, B, C, 4 * C)
            gelu_span(self.dec_fch, self.dec_fch, <Py_ssize_t>B * 4 * C, self.gelu_exact)
            matvec_forward(self.dec_branch, self.dec_fch, lw.fcprojw, lw.fcprojb, B, 4 * C, C)
            add_into(self.dec_x, self.dec_branch, <Py_ssize_t>B * C)
        for b in range(B):
            layernorm_row(self.dec_ln + b * C, &mean, &rstd, self.dec_x + b * C,
                          w.lnfw, w.lnfb, C)
        matvec_forward(self.dec_logits, self.dec_ln, w.wte, NULL, B, C, V)

    def decode_logits(self, const int32_t[::1] tokens not None, int pos):
        """One decode step (for tests): tokens (B,) at position pos -> logits (B, V).

        The cache must hold positions 0..pos-1 (from prefill_logits and earlier calls).
        """
        if self.gen_B == 0 or tokens.shape[0] != self.gen_B:
            raise ValueError("decode_logits needs prefill_logits with the same batch first")
        if not 1 <= pos < self.max_T or pos > self.cache_len:
            raise ValueError(f"pos {pos} is outside the filled cache (length {self.cache_len})")
        _need_ids(tokens, self.gen_B, self.V, "tokens")
        self._acquire()
        try:
            with nogil:
                self._decode_one(&tokens[0], pos)
        finally:
            self.busy = False
        self.cache_len = pos + 1
        cdef Py_ssize_t off = self.dec_logits - self.dec_buf.data
        return np.asarray(self.dec_buf)[off:off + self.gen_B * self.V].reshape(
            self.gen_B, self.V).copy()

    def prefill_logits(self, const int32_t[:, ::1] idx not None):
        """Fill the KV cache from idx (B, T); returns the logits of the last position."""
        self._acquire()
        try:
            return self._prefill(idx)
        finally:
            self.busy = False

    def _prefill(self, const int32_t[:, ::1] idx not None):
        self._forward_checked(idx, None, 0.0, 0)
        self._prepare_generation(self.B)
        with nogil:
            self._prefill_cache()
        self.cache_len = self.T
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
        cdef int B = idx.shape[0], T0 = idx.shape[1], step, pos, b, V = self.V
        cdef uint64_t draw = 0
        if max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if not 1 <= keep <= self.max_T:
            raise ValueError(f"keep must be in [1, block_size], got {keep}")
        if not (temperature >= 0.0):
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not (0.0 < top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
        out = np.zeros((B, max_new_tokens), dtype=np.int32)
        cdef int32_t[:, ::1] out_view = out
        # Context: everything generated so far, to rebuild the cache when it is full.
        history = np.zeros((B, min(T0, self.max_T) + max_new_tokens), dtype=np.int32)
        history[:, :min(T0, self.max_T)] = np.asarray(idx)[:, -self.max_T:]
        cdef int n_hist = min(T0, self.max_T)
        cdef int32_t[::1] tokens = np.zeros(B, dtype=np.int32)
        cdef Buffer scratch = Buffer(2 * V + 8)
        cdef SortItem* order = NULL
        cdef float* logits
        if max_new_tokens == 0:
            return out
        self._acquire()
        order = <SortItem*>PyMem_Malloc(V * sizeof(SortItem))
        if order == NULL:
            self.busy = False
            raise MemoryError()
        try:
            self._prefill(np.ascontiguousarray(history[:, :n_hist]))
            logits = self._copy_last_logits()
            pos = n_hist
            for step in range(max_new_tokens):
                with nogil:
                    for b in range(B):
                        tokens[b] = sample_token(logits + b * V, scratch.data, order, V,
                                                 temperature, top_k, top_p,
                                                 uniform01(seed, draw))
                        draw += 1
                        out_view[b, step] = tokens[b]
                history[:, n_hist] = tokens
                n_hist += 1
                if callback is not None:
                    callback(np.asarray(tokens).copy())
                if step == max_new_tokens - 1:
                    break
                if pos == self.max_T:
                    # Window full: rebuild the cache from the last `keep` tokens.
                    self._prefill(np.ascontiguousarray(history[:, n_hist - keep:n_hist]))
                    logits = self._copy_last_logits()
                    pos = keep
                else:
                    with nogil:
                        self._decode_one(&tokens[0], pos)
                    logits = self.dec_logits
                    pos += 1
                    self.cache_len = pos
        finally:
            PyMem_Free(order)
            self.busy = False
        return out

    cdef float* _copy_last_logits(self):
        # After prefill: copy each row's last-position logits into dec_logits.
        cdef Py_ssize_t b, T = self.T, V = self.V
        for b in range(self.B):
            memcpy(self.dec_logits + b * V, self.a.logits + (b * T + T - 1) * V, V * 4)
        return self.dec_logits


cdef inline void _take(float** slot, Py_ssize_t size, float* base,
                       Py_ssize_t* used) noexcept:
    # Bump allocation inside the activation block, rounded to whole cache lines.
    if base != NULL:
        slot[0] = base + used[0]
    used[0] += ((size + ALIGN_FLOATS - 1) // ALIGN_FLOATS) * ALIGN_FLOATS


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
