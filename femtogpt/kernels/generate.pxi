# The sampling loop: the prompt pass, then per new token sample one id per
# row (sampling.pxi) and decode one position (decoding.pxi), rebuilding the
# cache from the last `keep` tokens whenever the window is full. The decoder
# keeps the clock of each part for `femtogpt sample --stats`.

cimport openmp
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from libc.stdint cimport int32_t, uint64_t
import numpy as np


cdef object generate_tokens(Graph graph, const int32_t[:, ::1] idx, int max_new_tokens,
                            float temperature, int top_k, float top_p, uint64_t seed,
                            int keep, callback):
    # Graph.generate's body (its docstring says what the arguments mean).
    cdef int B = idx.shape[0], T0 = idx.shape[1], step, pos, b, V = graph.V
    cdef Decoder dec = graph.decoder
    cdef uint64_t draw = 0
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    if not 1 <= keep <= graph.max_T:
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
    history = np.zeros((B, min(T0, graph.max_T) + max_new_tokens), dtype=np.int32)
    history[:, :min(T0, graph.max_T)] = np.asarray(idx)[:, -graph.max_T:]
    cdef int n_hist = min(T0, graph.max_T)
    cdef int32_t[::1] tokens = np.zeros(B, dtype=np.int32)
    cdef Buffer scratch = Buffer(2 * V + 8)
    cdef SortItem* order = NULL
    cdef float* logits
    if max_new_tokens == 0:
        return out
    graph._acquire()
    order = <SortItem*>PyMem_Malloc(V * sizeof(SortItem))
    if order == NULL:
        graph.busy = False
        raise MemoryError()
    dec.prompt_tokens = dec.decode_tokens = 0
    dec.prompt_seconds = dec.decode_seconds = 0.0
    cdef double t0
    try:
        t0 = openmp.omp_get_wtime()
        graph._pass(np.ascontiguousarray(history[:, :n_hist]), 0, False)
        dec.prompt_seconds = openmp.omp_get_wtime() - t0
        dec.prompt_tokens = B * n_hist
        logits = dec.logits
        pos = n_hist
        for step in range(max_new_tokens):
            t0 = openmp.omp_get_wtime()
            with nogil:
                for b in range(B):
                    tokens[b] = sample_token(logits + b * V, scratch.data, order, V,
                                             temperature, top_k, top_p,
                                             uniform01(seed, draw))
                    draw += 1
                    out_view[b, step] = tokens[b]
            dec.decode_seconds += openmp.omp_get_wtime() - t0
            dec.decode_tokens += B
            history[:, n_hist] = tokens
            n_hist += 1
            if callback is not None:
                callback(np.asarray(tokens).copy())
            if step == max_new_tokens - 1:
                break
            t0 = openmp.omp_get_wtime()
            if pos == graph.max_T:
                # Window full: rebuild the cache from the last `keep` tokens.
                graph._pass(np.ascontiguousarray(history[:, n_hist - keep:n_hist]), 0, False)
                pos = keep
            else:
                with nogil:
                    dec.forward(&tokens[0], 1, pos, False)
                pos += 1
            logits = dec.logits
            dec.decode_seconds += openmp.omp_get_wtime() - t0
    finally:
        PyMem_Free(order)
        graph.busy = False
    return out
