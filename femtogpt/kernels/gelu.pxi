# GELU, the MLP's nonlinearity, in both of its forms: GPT-2's tanh
# approximation and nanoGPT's exact nn.GELU(). Both are computed through
# fast_expf (vecmath.pxi), so each span loop vectorises.

from cython.parallel cimport prange
from libc.math cimport fabsf
from libc.stdint cimport int32_t
from libc.string cimport memcpy

# --- GELU, tanh approximation (GPT-2) ------------------------------------------
#
# gelu(x) = 0.5 x (1 + tanh(y)), y = sqrt(2/pi) (x + 0.044715 x^3). Since
# 0.5 (1 + tanh(y)) = sigmoid(2y), we compute x * sigmoid(2y): the same function
# without the cancellation of 1 + tanh(y) for large negative x.

cdef inline void gelu_tanh_forward_span(float* out, const float* inp, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef float x, y
    cdef float k2 = 2.0 * 0.7978845608028654, c = 0.044715
    for i in range(n):
        x = inp[i]
        y = k2 * (x + c * x * x * x)
        out[i] = x * fast_sigmoidf(y)


cdef inline void gelu_tanh_backward_span(float* dinp, const float* inp, const float* dout,
                                    Py_ssize_t n) noexcept nogil:
    # d/dx [x s(2y)] = s + x s (1 - s) * 2 dy/dx
    cdef Py_ssize_t i
    cdef float x, s, dy
    cdef float k2 = 2.0 * 0.7978845608028654, c = 0.044715, c3 = 3.0 * 0.044715
    for i in range(n):
        x = inp[i]
        s = fast_sigmoidf(k2 * (x + c * x * x * x))
        dy = k2 * (<float>1.0 + c3 * x * x)
        dinp[i] = dout[i] * (s + x * s * (<float>1.0 - s) * dy)


cdef void gelu_tanh_forward(float* out, const float* inp, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t chunk, start
    for chunk in prange((n + ELEM_CHUNK - 1) // ELEM_CHUNK, schedule="static"):
        start = chunk * ELEM_CHUNK
        gelu_tanh_forward_span(out + start, inp + start, min_size(ELEM_CHUNK, n - start))


cdef void gelu_tanh_backward(float* dinp, const float* inp, const float* dout,
                        Py_ssize_t n) noexcept nogil:
    # dinp (n) = gelu'(inp) * dout; dinp may be dout (in place)
    cdef Py_ssize_t chunk, start
    for chunk in prange((n + ELEM_CHUNK - 1) // ELEM_CHUNK, schedule="static"):
        start = chunk * ELEM_CHUNK
        gelu_tanh_backward_span(dinp + start, inp + start, dout + start,
                           min_size(ELEM_CHUNK, n - start))


# --- GELU, exact form (nanoGPT's nn.GELU()) --------------------------------------
#
# gelu(x) = x Phi(x), Phi the standard normal CDF, 0.5 (1 + erf(x / sqrt 2)).
# In that form it loses its precision for negative x, where erf is close to
# -1 (Phi(-3) = 0.00135 would keep four significant digits), so the tail is
# computed directly: Phi(-|x|) = exp(-x^2 / 2) Q(t), t = 1 / (1 + K |x|), and
# Phi(|x|) = 1 - Phi(-|x|); near 0, Phi(x) = 0.5 + x S(x^2). Q and S are
# polynomials fitted by scripts/fit_gelu_exact.py. gelu' = Phi(x) + x phi(x),
# phi(x) = exp(-x^2 / 2) / sqrt(2 pi), shares the exponential.

DEF GELU_SPLIT = 0.7      # |x| below it: the series around 0
DEF GELU_K = 0.45


cdef inline float gauss_exp(float x) noexcept nogil:
    # exp(-x^2 / 2) to float32 accuracy. x^2 / 2 is up to 70 here, and rounding
    # it would cost its own relative error times 70 in the result, so it goes
    # in two parts: x = xh + xl, xh holding x's top 12 bits (xh^2 is exact),
    # x^2 / 2 = xh^2 / 2 + xl (xh + xl / 2).
    cdef float xh, xl
    cdef int32_t bits
    memcpy(&bits, &x, 4)
    bits = bits & <int32_t>0xFFFFF000
    memcpy(&xh, &bits, 4)
    xl = x - xh
    return fast_exp_sum(-(xh * xh) * <float>0.5, -(xl * (xh + <float>0.5 * xl)))


cdef inline float normal_cdf(float x, float e) noexcept nogil:
    # Phi(x), given e = gauss_exp(x). Both branches are computed and one is
    # selected, so that the loops calling this vectorise.
    cdef float ax = fabsf(x)
    cdef float t = <float>1.0 / (<float>1.0 + <float>GELU_K * ax)
    cdef float x2 = x * x
    cdef float q, s, tail, far, near
    q = <float>2.022277819e-02
    q = q * t + <float>-1.573855595e-01
    q = q * t + <float>4.276087897e-01
    q = q * t + <float>-5.129497440e-01
    q = q * t + <float>2.098147373e-01
    q = q * t + <float>-3.122036393e-03
    q = q * t + <float>1.585825510e-01
    q = q * t + <float>1.775050758e-01
    q = q * t + <float>1.796744638e-01
    q = q * t + <float>-4.861372510e-06
    tail = e * q                                  # Phi(-|x|)
    far = tail if x < <float>0.0 else <float>1.0 - tail
    s = <float>6.012866565e-07
    s = s * x2 + <float>-9.403416706e-06
    s = s * x2 + <float>1.154215718e-04
    s = s * x2 + <float>-1.187326075e-03
    s = s * x2 + <float>9.973556844e-03
    s = s * x2 + <float>-6.649038006e-02
    s = s * x2 + <float>3.989422804e-01
    near = <float>0.5 + x * s
    return near if ax < <float>GELU_SPLIT else far


cdef inline void gelu_exact_forward_span(float* out, const float* inp,
                                         Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef float x
    for i in range(n):
        x = inp[i]
        out[i] = x * normal_cdf(x, gauss_exp(x))


cdef inline void gelu_exact_backward_span(float* dinp, const float* inp, const float* dout,
                                          Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef float x, e
    for i in range(n):
        x = inp[i]
        e = gauss_exp(x)
        dinp[i] = dout[i] * (normal_cdf(x, e) + x * e * <float>0.3989422804014327)


cdef void gelu_exact_forward(float* out, const float* inp, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t chunk, start
    for chunk in prange((n + ELEM_CHUNK - 1) // ELEM_CHUNK, schedule="static"):
        start = chunk * ELEM_CHUNK
        gelu_exact_forward_span(out + start, inp + start, min_size(ELEM_CHUNK, n - start))


cdef void gelu_exact_backward(float* dinp, const float* inp, const float* dout,
                              Py_ssize_t n) noexcept nogil:
    # dinp (n) = gelu'(inp) * dout; dinp may be dout (in place)
    cdef Py_ssize_t chunk, start
    for chunk in prange((n + ELEM_CHUNK - 1) // ELEM_CHUNK, schedule="static"):
        start = chunk * ELEM_CHUNK
        gelu_exact_backward_span(dinp + start, inp + start, dout + start,
                                 min_size(ELEM_CHUNK, n - start))


cdef inline void gelu_span(float* out, const float* inp, Py_ssize_t n,
                           bint exact) noexcept nogil:
    # One thread's GELU of either form (decoding works on one row at a time).
    if exact:
        gelu_exact_forward_span(out, inp, n)
    else:
        gelu_tanh_forward_span(out, inp, n)


def py_gelu_tanh_forward(float[::1] out, const float[::1] inp):
    _need("out", out.shape[0], inp.shape[0])
    if inp.shape[0] == 0:
        return
    with nogil:
        gelu_tanh_forward(&out[0], &inp[0], inp.shape[0])


def py_gelu_tanh_backward(float[::1] dinp, const float[::1] inp, const float[::1] dout):
    _need("dinp", dinp.shape[0], inp.shape[0])
    _need("dout", dout.shape[0], inp.shape[0])
    if inp.shape[0] == 0:
        return
    with nogil:
        gelu_tanh_backward(&dinp[0], &inp[0], &dout[0], inp.shape[0])


def py_gelu_exact_forward(float[::1] out, const float[::1] inp):
    _need("out", out.shape[0], inp.shape[0])
    if inp.shape[0] == 0:
        return
    with nogil:
        gelu_exact_forward(&out[0], &inp[0], inp.shape[0])


def py_gelu_exact_backward(float[::1] dinp, const float[::1] inp, const float[::1] dout):
    _need("dinp", dinp.shape[0], inp.shape[0])
    _need("dout", dout.shape[0], inp.shape[0])
    if inp.shape[0] == 0:
        return
    with nogil:
        gelu_exact_backward(&dinp[0], &inp[0], &dout[0], inp.shape[0])
