r"""Exact quantiles of Student's t distribution, for the paired significance tests of the comparison.

The CDF of :math:`t` with :math:`\nu` degrees of freedom is, for :math:`t \ge 0`,

.. math::
    F(t) = 1 - \tfrac12 I_{\nu / (\nu + t^2)}\big(\tfrac{\nu}{2}, \tfrac12\big)

with :math:`I_x(a, b)` the regularized incomplete beta function, evaluated here by its continued
fraction (modified Lentz). The quantile inverts :math:`F` by bisection, to double precision.
Python's standard library has no t distribution, and the comparison should not pull in SciPy.
"""

from __future__ import annotations

import math

_CONTINUED_FRACTION_TERMS = 300
_TINY = 1e-300
_EPS = 1e-15
_BISECTION_STEPS = 200


def student_t_cdf(t: float, dof: float) -> float:
    """``P(T <= t)`` for ``T`` Student-t distributed with ``dof > 0`` degrees of freedom."""
    if dof <= 0:
        raise ValueError(f"dof={dof} must be > 0")
    tail = 0.5 * regularized_incomplete_beta(dof / 2, 0.5, dof / (dof + t * t))
    return 1.0 - tail if t >= 0 else tail


def student_t_quantile(p: float, dof: float) -> float:
    """The ``t`` with ``P(T <= t) = p``; e.g. ``student_t_quantile(0.975, 11) = 2.2010``."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p={p} must be in (0, 1)")
    if p < 0.5:
        return -student_t_quantile(1.0 - p, dof)
    low, high = 0.0, 1.0
    while student_t_cdf(high, dof) < p:
        high *= 2.0
    for _ in range(_BISECTION_STEPS):
        middle = 0.5 * (low + high)
        if student_t_cdf(middle, dof) < p:
            low = middle
        else:
            high = middle
        if high - low <= _EPS * high:
            break
    return 0.5 * (low + high)


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """:math:`I_x(a, b) = B(x; a, b) / B(a, b)` for ``a, b > 0`` and ``0 <= x <= 1``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    # the continued fraction converges fast for x < (a + 1) / (a + b + 2); use symmetry otherwise
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz's method)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    result = d
    for m in range(1, _CONTINUED_FRACTION_TERMS + 1):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                          -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + numerator / c
            c = c if abs(c) > _TINY else _TINY
            result *= d * c
        if abs(d * c - 1.0) < _EPS:
            break
    return result
