#!/usr/bin/env python
"""Fit the polynomials of the exact GELU's normal CDF in femtogpt/_core.pyx.

gelu(x) = x * Phi(x), Phi the standard normal CDF. The core evaluates Phi
without the cancellation of 0.5 * (1 + erf(x / sqrt 2)) for negative x:

  |x| <  SPLIT:  Phi(x) = 0.5 + x * S(x^2)                      (S even series)
  |x| >= SPLIT:  Phi(-|x|) = exp(-x^2 / 2) * Q(t),  t = 1 / (1 + K |x|)
                 Phi(|x|) = 1 - Phi(-|x|)

Q(t) is a smooth function of t (the Mills ratio of the normal distribution,
~ 1 / (|x| sqrt(2 pi)) for large |x|). Both are least-squares fits weighted for
relative error, against scipy's float64 ndtr. Run it to print the coefficients
and their float64 errors; the core's float32 evaluation is tested in
tests/test_kernels.py.
"""
import numpy as np
from numpy.polynomial import polynomial as P
from scipy.special import ndtr

SPLIT = 0.7
K = 0.45
TAIL_END = 12.0       # beyond it exp(-x^2/2) < e^-70, which the core's exp flushes to 0
S_DEGREE = 6          # in x^2
Q_DEGREE = 9          # in t


def fit():
    x = np.linspace(1e-6, SPLIT * 1.001, 200_001)
    s_target = (ndtr(x) - 0.5) / x
    s = P.polyfit(x * x, s_target, S_DEGREE, w=1.0 / s_target)
    a = np.linspace(SPLIT * 0.999, TAIL_END, 400_001)
    q_target = ndtr(-a) * np.exp(a * a / 2)
    t = 1.0 / (1.0 + K * a)
    q = P.polyfit(t, q_target, Q_DEGREE, w=1.0 / q_target)
    s_err = np.max(np.abs(P.polyval(x * x, s) / s_target - 1))
    q_err = np.max(np.abs(P.polyval(t, q) / q_target - 1))
    return s, q, s_err, q_err


if __name__ == "__main__":
    s, q, s_err, q_err = fit()
    print(f"S (|x| < {SPLIT}), max relative error {s_err:.2e}:")
    print("  " + ", ".join(f"{c:.9e}" for c in s))
    print(f"Q (t = 1/(1 + {K}|x|)), max relative error {q_err:.2e}:")
    print("  " + ", ".join(f"{c:.9e}" for c in q))
