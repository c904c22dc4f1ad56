# The GEMM front: every matrix product of the batched passes comes through here.
#
# Today there is one element type, fp32: gemm() calls sgemm from scipy's
# cython_blas (OpenBLAS), which is single-threaded (femtogpt/_threads.py), and
# gemm_slice()/gemm_parallel() cut a product into per-thread slices of C so
# that OpenMP is the only thread pool.
#
# bf16 (gemm_bf16.pxi) plugs in beside it: gemm_bf16.h's products with the
# same row-major argument order, cut by the same slice_range / gemm_parts
# (column slices on whole 32-column panels), and matmul_forward/_backward
# (matmul.pxi) and attention (gemm_head) take the bf16 product when the graph
# hands them packed weights and a workspace, sgemm when it hands them NULL.
# An int8 type would follow the same pattern.
# Each compiled target (setup.py: x86-64, -v3, -v4) includes this file, so a
# kernel that needs AVX-512 is compiled only where -march allows it, and
# femtogpt/_dispatch.py already loads the build the CPU runs.

cimport openmp
from cython.parallel cimport prange
from scipy.linalg.cython_blas cimport sgemm


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


cdef inline int slice_range(int part, int n_parts, int extent, int* start) noexcept nogil:
    """Slice `part` of `n_parts` of 0..extent: sets start, returns the count (<= 0: empty).

    Slice edges fall on multiples of 16, so each slice starts cache-line aligned.
    """
    cdef int chunk, count
    chunk = (extent + n_parts - 1) // n_parts
    chunk = ((chunk + 15) // 16) * 16
    start[0] = part * chunk
    count = extent - start[0]
    if count > chunk:
        count = chunk
    return count


cdef inline int gemm_parts(int M, int N, int n_threads) noexcept nogil:
    # Slices narrower than 32 cost more in BLAS overhead than they gain.
    cdef int extent = M if M >= N else N
    if n_threads > extent // 32:
        n_threads = extent // 32
    return n_threads if n_threads > 1 else 1


cdef inline void gemm_slice(int part, int n_parts, bint trans_a, bint trans_b,
                            int M, int N, int K, float alpha, const float* A, int lda,
                            const float* B, int ldb, float beta, float* C,
                            int ldc) noexcept nogil:
    """Slice `part` of `n_parts` of gemm(): rows of C (or columns, if N > M)."""
    cdef bint split_rows = M >= N
    cdef int start = 0, count
    if n_parts <= 1:
        gemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)
        return
    count = slice_range(part, n_parts, M if split_rows else N, &start)
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


cdef void gemm_parallel(bint trans_a, bint trans_b, int M, int N, int K,
                        float alpha, const float* A, int lda,
                        const float* B, int ldb,
                        float beta, float* C, int ldc) noexcept nogil:
    """gemm() split over threads along the larger of M and N.

    Each thread multiplies its own slice of rows (or columns) of C, and no
    slice is written by two threads.
    """
    cdef int n_parts = gemm_parts(M, N, openmp.omp_get_max_threads())
    cdef int part
    if n_parts <= 1:
        gemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)
        return
    for part in prange(n_parts, schedule="static", num_threads=n_parts):
        gemm_slice(part, n_parts, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb,
                   beta, C, ldc)
