# The loss: softmax and cross-entropy fused, over the lm_head's logits.

from cython.parallel cimport prange
from libc.math cimport logf
from libc.stdint cimport int32_t


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
