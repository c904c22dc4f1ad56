# The linear layer, y = x @ W^T + b (weights stored (out, in), as PyTorch
# does): batched through the GEMM front (gemm.pxi) in training and prefill,
# and for the handful of rows of decoding by matvec_f32.h (each weight read
# once for all rows).
# A bf16 graph passes the weight's packed layouts and its workspace (pw, bw:
# gemm_bf16.pxi); NULL is the fp32 product, sgemm.

cimport openmp
from cython.parallel cimport prange
from libc.string cimport memcpy


cdef extern from "kernels/matvec_f32.h" nogil:
    void matvec_f32(float* out, const float* x, const float* W, const float* bias,
                    int B, int K, int N, int n0, int n1)


cdef void fill_rows(float* out, const float* row, Py_ssize_t N, int C) noexcept nogil:
    # out (N,C): every row a copy of row (C)
    cdef Py_ssize_t n
    for n in prange(N, schedule="static"):
        memcpy(out + n * C, row, C * sizeof(float))


cdef void matmul_forward(float* out,
                         const float* inp, const float* weight, const float* bias,
                         Py_ssize_t N, int C_in, int C_out,
                         const PackedWeight* pw, Bf16Work* bw) noexcept nogil:
    # out (N,C_out) = inp (N,C_in) @ weight (C_out,C_in)^T + bias (C_out, or NULL)
    # pw NULL: fp32; else bf16 from pw.wt (weight^T packed) with workspace bw.
    if bias != NULL:
        fill_rows(out, bias, N, C_out)
    if pw != NULL:
        gemm_bf16_parallel(False, <int>N, C_out, C_in, 1.0, inp, C_in, pw.wt,
                           1.0 if bias != NULL else 0.0, out, C_out, bw)
        return
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
                          Py_ssize_t N, int C_in, int C_out,
                          const PackedWeight* pw, Bf16Work* bw) noexcept nogil:
    # dinp (N,C_in) = dout (N,C_out) @ weight (C_out,C_in)      (written)
    # dweight (C_out,C_in) += dout^T @ inp;  dbias (C_out) += column sums of dout
    # dinp may be NULL when the input needs no gradient; dbias NULL when no bias.
    # pw NULL: fp32; else bf16, dinp from pw.w (weight packed), dweight with inp
    # packed once into bw.bpack.
    # The two products are independent and equally large: half the threads take
    # each, so each shared operand is packed by BLAS once per half, not once per
    # thread (at 2 threads: one whole product per thread).
    cdef int n_threads = openmp.omp_get_max_threads()
    cdef int half = n_threads // 2, item
    if pw != NULL:
        if dinp != NULL:
            gemm_bf16_parallel(False, <int>N, C_in, C_out, 1.0, dout, C_out, pw.w,
                               0.0, dinp, C_in, bw)
        gemm_bf16_parallel_b(True, False, C_out, C_in, <int>N, 1.0, dout, C_out, inp, C_in,
                             1.0, dweight, C_in, bw)
    elif dinp != NULL and half >= 1:
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


DEF MATVEC_PARALLEL_MIN = 262144  # multiply-adds below which one thread beats a fork


cdef inline void matvec_part(int part, int parts, float* out, const float* inp,
                             const float* weight, const float* bias,
                             int B, int C_in, int C_out) noexcept nogil:
    # Thread `part` of `parts`: its contiguous block of the outputs.
    cdef int chunk = (C_out + parts - 1) // parts
    cdef int n0 = part * chunk
    cdef int n1 = n0 + chunk if n0 + chunk < C_out else C_out
    if n0 < n1:
        matvec_f32(out, inp, weight, bias, B, C_in, C_out, n0, n1)


cdef void matvec_forward(float* out, const float* inp, const float* weight,
                         const float* bias, int B, int C_in, int C_out) noexcept nogil:
    # matmul_forward for a handful of rows (decoding): out (B,C_out) =
    # inp (B,C_in) @ weight^T + bias. sgemm's fixed cost per call is larger than
    # this much work. Decoding reads every weight once per step, so it is bound
    # by memory bandwidth: matvec_f32.h reads each weight row once for all B
    # rows, and the outputs are split over the threads in contiguous blocks,
    # each thread streaming its own rows of the weight. Each output is one
    # thread's sum in matvec_f32.h's fixed order, so the result does not depend
    # on the thread count, and row b equals the 1-row product of that row.
    cdef int parts = 1, part
    if <Py_ssize_t>C_out * C_in * B >= MATVEC_PARALLEL_MIN:
        parts = openmp.omp_get_max_threads()
        if parts > C_out:
            parts = C_out
    if parts <= 1:
        matvec_f32(out, inp, weight, bias, B, C_in, C_out, 0, C_out)
        return
    for part in prange(parts, schedule="static", num_threads=parts):
        matvec_part(part, parts, out, inp, weight, bias, B, C_in, C_out)


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
        matmul_forward(&out[0], &inp[0], &weight[0], bias_ptr, N, C_in, C_out, NULL, NULL)


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
                        N, C_in, C_out, NULL, NULL)


def py_matvec_forward(float[::1] out, const float[::1] inp, const float[::1] weight, bias,
                      int B, int C_in, int C_out):
    # The fp32 decoding product, matvec_forward (scripts/bf16_rows_probe.py
    # times it beside the bf16 one).
    # out (B*C_out)  # OUT;  inp (B*C_in)  # IN;  weight (C_out*C_in)  # IN;  bias (C_out) or None  # IN
    cdef const float[::1] bias_view
    cdef const float* bias_ptr = NULL
    _need_positive(B=B, C_in=C_in, C_out=C_out)
    _need("out", out.shape[0], <Py_ssize_t>B * C_out)
    _need("inp", inp.shape[0], <Py_ssize_t>B * C_in)
    _need("weight", weight.shape[0], <Py_ssize_t>C_out * C_in)
    if bias is not None:
        bias_view = bias
        _need("bias", bias_view.shape[0], C_out)
        bias_ptr = &bias_view[0]
    with nogil:
        matvec_forward(&out[0], &inp[0], &weight[0], bias_ptr, B, C_in, C_out)
