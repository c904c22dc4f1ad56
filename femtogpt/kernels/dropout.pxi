# Inverted dropout with counter-based masks: the mask of element i is a hash of
# (seed, i), so it does not depend on thread scheduling, is never stored, and
# backward recomputes it from the same seed. (The seeds of the graph's dropout
# sites are named in layout.pxi.)

from cython.parallel cimport prange
from libc.stdint cimport uint32_t, uint64_t


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
