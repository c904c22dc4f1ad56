# The optimizer: AdamW as one loop over the flat parameter block, and the
# gradient norm (for clipping) as one reduction over the flat gradient block.

from cython.parallel cimport prange
from libc.math cimport sqrtf, pow
from libc.stdlib cimport free, malloc


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
