# Vectorisable exp and sigmoid, and the dot product and add of decoding.
#
# glibc's expf/tanhf are scalar calls that gcc cannot vectorise without
# -ffast-math (which we avoid: it changes NaN/inf handling everywhere). These
# are plain arithmetic that gcc turns into AVX2/AVX-512 code inside a loop:
# they are `cdef inline`, and every kernel file is in the same C file as this
# one (see _core.pyx), so each loop that calls them is vectorised whole.

from libc.stdint cimport int32_t
from libc.string cimport memcpy


cdef inline float exp_from_reduced(float r, float t) noexcept nogil:
    # 2^n * exp(r), |r| <= ln(2)/2, where t = x / ln 2 + 1.5 * 2^23 holds
    # n = round(x / ln 2) in its low mantissa bits. exp(r) by its degree-6
    # Taylor polynomial (relative error < 2e-7 on that interval).
    cdef float poly, scale
    cdef int32_t bits
    poly = <float>1.0 + r * (<float>1.0 + r * (<float>0.5 + r * (<float>0.16666667 + r * (
        <float>0.041666668 + r * (<float>0.008333334 + r * <float>0.0013888889)))))
    # 2^n from its IEEE-754 bits (memcpy is C's bit cast; it compiles to nothing).
    memcpy(&bits, &t, 4)
    bits = (bits - 0x4B400000 + 127) << 23
    memcpy(&scale, &bits, 4)
    return poly * scale


cdef inline float fast_expf(float x) noexcept nogil:
    # exp(x) = 2^n * exp(r), n = round(x / ln 2). Written so that gcc
    # vectorises it (with -fno-trapping-math): selects instead of branches, and
    # rounding by adding 1.5 * 2^23, which leaves round(x / ln 2) in the low
    # mantissa bits of the sum.
    #
    # Below -70 the result is exactly 0 and above 70 it is exp(70) ~ 2.5e30: no
    # result (and no product of softmax probabilities or sigmoids with ordinary
    # numbers downstream) is a denormal float. Denormals make every multiply
    # that touches them, in our loops and in sgemm, many times slower, and a
    # trained model's softmax has probabilities far below 1e-38 otherwise.
    # Terms below e^-70 ~ 4e-31 cannot change a float32 sum of O(1) terms.
    cdef float t, n, r, clamped
    clamped = <float>-70.0 if x < <float>-70.0 else x
    clamped = <float>70.0 if clamped > <float>70.0 else clamped
    t = clamped * <float>1.4426950408889634 + <float>12582912.0
    n = t - <float>12582912.0
    r = clamped - n * <float>0.693145751953125  # ln 2 in two parts: r stays exact
    r = r - n * <float>1.428606765330187e-06
    return <float>0.0 if x < <float>-70.0 else exp_from_reduced(r, t)


cdef inline float fast_exp_sum(float hi, float lo) noexcept nogil:
    # exp(hi + lo) for a sum that float32 cannot hold exactly (|lo| < 1, hi
    # <= 0): lo joins the reduced argument, where it is small, instead of
    # being rounded into hi first (an exponent of -50 has an ulp of 4e-6, a
    # relative error of 4e-6 in the result). 0 below hi = -70, as fast_expf.
    cdef float t, n, r, clamped
    clamped = <float>-70.0 if hi < <float>-70.0 else hi
    t = (clamped + lo) * <float>1.4426950408889634 + <float>12582912.0
    n = t - <float>12582912.0
    r = clamped - n * <float>0.693145751953125
    r = r - n * <float>1.428606765330187e-06
    r = r + lo
    return <float>0.0 if hi < <float>-70.0 else exp_from_reduced(r, t)


cdef inline float fast_sigmoidf(float x) noexcept nogil:
    return <float>1.0 / (<float>1.0 + fast_expf(-x))



cdef inline void add_into(float* x, const float* y, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        x[i] = x[i] + y[i]


cdef float dot(const float* a, const float* b, int n) noexcept nogil:
    # Sixteen running sums updated by look-alike statements: gcc packs them into
    # two 8-wide vectors, two independent chains of fused multiply-adds, so the
    # adds' latency is hidden. (gcc will not vectorise a single running sum
    # without -ffast-math, and an accumulator array got shuffled through memory.)
    cdef float s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0
    cdef float s4 = 0.0, s5 = 0.0, s6 = 0.0, s7 = 0.0
    cdef float t0 = 0.0, t1 = 0.0, t2 = 0.0, t3 = 0.0
    cdef float t4 = 0.0, t5 = 0.0, t6 = 0.0, t7 = 0.0
    cdef float total
    cdef int block, i
    # A counted loop: gcc cannot count Cython's `while` (it becomes while(1)/break).
    for block in range(n // 16):
        i = block * 16
        s0 = s0 + a[i] * b[i]
        s1 = s1 + a[i + 1] * b[i + 1]
        s2 = s2 + a[i + 2] * b[i + 2]
        s3 = s3 + a[i + 3] * b[i + 3]
        s4 = s4 + a[i + 4] * b[i + 4]
        s5 = s5 + a[i + 5] * b[i + 5]
        s6 = s6 + a[i + 6] * b[i + 6]
        s7 = s7 + a[i + 7] * b[i + 7]
        t0 = t0 + a[i + 8] * b[i + 8]
        t1 = t1 + a[i + 9] * b[i + 9]
        t2 = t2 + a[i + 10] * b[i + 10]
        t3 = t3 + a[i + 11] * b[i + 11]
        t4 = t4 + a[i + 12] * b[i + 12]
        t5 = t5 + a[i + 13] * b[i + 13]
        t6 = t6 + a[i + 14] * b[i + 14]
        t7 = t7 + a[i + 15] * b[i + 15]
    total = (((s0 + t0) + (s1 + t1)) + ((s2 + t2) + (s3 + t3))) + \
            (((s4 + t4) + (s5 + t5)) + ((s6 + t6) + (s7 + t7)))
    for i in range((n // 16) * 16, n):
        total = total + a[i] * b[i]
    return total
