# LayerNorm (ln_1, ln_2, ln_f): per row, normalise over C, then scale and shift.

from cython.parallel cimport prange
from libc.math cimport sqrtf


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
