# Sampling one token from a row of logits: temperature, top-k, nucleus (top-p).
# The loop that calls it per new token is generate.pxi.

from cpython.mem cimport PyMem_Malloc, PyMem_Free
from libc.stdint cimport uint64_t
from libc.stdlib cimport qsort


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
