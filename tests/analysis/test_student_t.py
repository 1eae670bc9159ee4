"""Student-t quantiles against printed tables, and the paired tie test that uses them."""

import math

import pytest

from gohgraph.analysis.student_t import regularized_incomplete_beta, student_t_cdf, student_t_quantile
from gohgraph.experiments.report import is_tie

# two-sided 95% critical values (the 0.975 quantile), as printed in every statistics table
TABLE_975 = {1: 12.706, 2: 4.303, 3: 3.182, 5: 2.571, 10: 2.228, 11: 2.201, 12: 2.179, 20: 2.086, 30: 2.042,
             60: 2.000, 120: 1.980}


@pytest.mark.parametrize("dof,expected", sorted(TABLE_975.items()))
def test_quantiles_match_the_table(dof, expected):
    assert student_t_quantile(0.975, dof) == pytest.approx(expected, abs=5e-4)


def test_cdf_and_quantile_are_inverse_and_symmetric():
    for dof in (1, 4, 11, 50):
        for p in (0.6, 0.9, 0.995):
            t = student_t_quantile(p, dof)
            assert student_t_cdf(t, dof) == pytest.approx(p, abs=1e-12)
            assert student_t_quantile(1 - p, dof) == pytest.approx(-t, abs=1e-12)
    assert student_t_cdf(0.0, 3) == 0.5
    # one degree of freedom is the Cauchy distribution: F(t) = 1/2 + atan(t)/pi
    assert student_t_cdf(1.7, 1) == pytest.approx(0.5 + math.atan(1.7) / math.pi, abs=1e-12)
    # I_x(1, 1) = x and I_x(a, b) = 1 - I_{1-x}(b, a)
    assert regularized_incomplete_beta(1.0, 1.0, 0.3) == pytest.approx(0.3, abs=1e-14)
    assert regularized_incomplete_beta(2.5, 0.5, 0.7) == pytest.approx(1 - regularized_incomplete_beta(0.5, 2.5, 0.3))


def test_tie_test_uses_the_exact_quantile_beyond_eleven_seeds():
    """13 seeds (12 dof): the 97.5% quantile is 2.179; the old fixed 2.0 called t = 2.1 significant."""
    differences = [0.1 + (0.05 if i % 2 else -0.05) * (1 + i / 20) for i in range(13)]
    mean = sum(differences) / 13
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / 12)
    scale = 2.1 / (mean / (sd / math.sqrt(13)))  # rescale the mean so that t = 2.1 exactly
    a = [mean * scale + (d - mean) for d in differences]
    b = [0.0] * 13
    t = (sum(a) / 13) / (sd / math.sqrt(13))
    assert t == pytest.approx(2.1)
    assert is_tie(a, b)  # |t| = 2.1 < 2.179
    shifted = [x + 0.1 * sd for x in a]
    assert not is_tie(shifted, b)  # t grows past 2.179
