# Token + position embedding (nanoGPT's wte, wpe): the residual stream's start.

from cython.parallel cimport prange
from libc.stdint cimport int32_t


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
