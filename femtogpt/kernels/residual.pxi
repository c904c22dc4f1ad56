# The residual add, x = x + branch.

from cython.parallel cimport prange


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
