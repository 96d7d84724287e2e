"""Statistics over seeds: biased - clean deltas, Mann-Whitney U, Holm, Kendall.

Per-seed inputs are 1-D sequences with one value per seed (e.g. the group-1
test F1 of each seed's model). NaN values (a metric undefined for that seed,
see `ncjax.fairness`) are dropped before any statistic; `n`, `n_*` fields say
how many values were used.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

Alternative = Literal["two-sided", "less", "greater"]
MWMethod = Literal["auto", "exact", "asymptotic"]


def _finite(name: str, values: ArrayLike) -> np.ndarray:
  values = np.asarray(values, np.float64)
  if values.ndim != 1:
    raise ValueError(f"{name} must be 1-D, got shape {values.shape}")
  if np.isinf(values).any():
    raise ValueError(f"{name} contains infinite values")
  return values[~np.isnan(values)]


def _sd(values: np.ndarray) -> float:
  # ddof=1: the seeds are a sample of the seed distribution.
  return float(np.std(values, ddof=1)) if values.size >= 2 else math.nan


@dataclasses.dataclass(frozen=True)
class Delta:
  """biased - clean over seeds, treating the two sets of seeds as independent.

  Attributes:
    mean: mean(biased) - mean(clean).
    sd: sqrt(sd_biased^2 + sd_clean^2), the sd of a difference of two
      independent draws (as in the SS analysis); NaN unless both sides have
      at least 2 values.
    biased_mean, biased_sd, clean_mean, clean_sd: per side; sds use ddof=1
      and are NaN with fewer than 2 values; means are NaN with none.
    n_biased, n_clean: non-NaN values used on each side.
  """

  mean: float
  sd: float
  biased_mean: float
  biased_sd: float
  clean_mean: float
  clean_sd: float
  n_biased: int
  n_clean: int


def delta(biased: ArrayLike, clean: ArrayLike) -> Delta:
  """The biased - clean difference of a per-seed quantity; see `Delta`.

  Seeds are not paired: seed s of the biased and of the clean model share no
  more than their initialisation, and the Mann-Whitney test beside the delta
  is unpaired too, so the delta is a difference of means, not a mean of
  per-seed differences, and the two sides may have different seed counts.
  """
  b = _finite("biased", biased)
  c = _finite("clean", clean)
  b_mean = float(np.mean(b)) if b.size else math.nan
  c_mean = float(np.mean(c)) if c.size else math.nan
  b_sd, c_sd = _sd(b), _sd(c)
  return Delta(
      mean=b_mean - c_mean,
      sd=math.sqrt(b_sd**2 + c_sd**2),
      biased_mean=b_mean,
      biased_sd=b_sd,
      clean_mean=c_mean,
      clean_sd=c_sd,
      n_biased=int(b.size),
      n_clean=int(c.size),
  )


@dataclasses.dataclass(frozen=True)
class TestResult:
  """A test's statistic and p-value, or NaN for both and the reason why.

  Attributes:
    statistic: Mann-Whitney U of the first sample (biased), or Kendall's tau.
    pvalue: the p-value.
    method: the p-value method actually used ('exact' or 'asymptotic'); ''
      when no test was run.
    n: the sample sizes used, after dropping NaN.
    reason: why statistic and pvalue are NaN; '' when they are not.
  """

  __test__ = False  # not a pytest test class despite the name

  statistic: float
  pvalue: float
  method: str
  n: tuple[int, ...]
  reason: str = ""


def mwu_method(n_biased: int, n_clean: int, has_ties: bool) -> str:
  """The method scipy's `mannwhitneyu(method='auto')` picks (scipy 1.17).

  'exact' when at least one sample has 8 or fewer values and the pooled
  values have no ties; 'asymptotic' (normal approximation with tie and
  continuity correction) otherwise. With 10 seeds per side the paper's test is
  therefore asymptotic.
  """
  if n_biased > 8 and n_clean > 8:
    return "asymptotic"
  return "asymptotic" if has_ties else "exact"


def mann_whitney(
    biased: ArrayLike,
    clean: ArrayLike,
    *,
    alternative: Alternative = "two-sided",
    method: MWMethod = "auto",
) -> TestResult:
  """Mann-Whitney U test of per-seed values of biased against clean models.

  Args:
    biased: per-seed values of the biased models (the test's first sample).
    clean: per-seed values of the clean models.
    alternative: 'two-sided' (the default), 'less' (biased tends to be
      smaller, e.g. a lower F1) or 'greater'. SS's `mannwhitneyu(unbiased,
      biased, alternative='greater')` is `alternative='less'` here.
    method: passed to scipy; 'auto' resolves as in `mwu_method`, and the
      result reports the resolved method.

  Returns:
    A `TestResult` with U of the biased sample; NaN with a reason when either
    side has no value left after dropping NaN.
  """
  b = _finite("biased", biased)
  c = _finite("clean", clean)
  n = (int(b.size), int(c.size))
  if not b.size or not c.size:
    return TestResult(math.nan, math.nan, "", n, "a sample has no non-NaN value")
  if method == "auto":
    pooled = np.concatenate([b, c])
    method = mwu_method(b.size, c.size, np.unique(pooled).size < pooled.size)
  result = stats.mannwhitneyu(b, c, alternative=alternative, method=method)
  return TestResult(float(result.statistic), float(result.pvalue), method, n)


def holm(pvalues: ArrayLike) -> np.ndarray:
  """Holm-Bonferroni adjusted p-values, in the input order.

  With the m non-NaN p-values sorted ascending, p_(1) <= ... <= p_(m), the
  adjusted value is max_{j <= i} min(1, (m - j + 1) p_(j)). NaN p-values (tests
  that could not be run) are not part of the family: they do not count in m
  and stay NaN. Unlike the SS notebook's version this has the running maximum
  and the cap at 1, so it equals statsmodels' `multipletests(method='holm')`.
  """
  p = np.asarray(pvalues, np.float64)
  if p.ndim != 1:
    raise ValueError(f"pvalues must be 1-D, got shape {p.shape}")
  valid = ~np.isnan(p)
  if ((p[valid] < 0) | (p[valid] > 1)).any():
    raise ValueError(f"p-values must lie in [0, 1], got {p[valid]}")
  adjusted = np.full_like(p, math.nan)
  family = p[valid]
  m = family.size
  if m == 0:
    return adjusted
  order = np.argsort(family, kind="stable")
  scaled = np.minimum(1.0, (m - np.arange(m)) * family[order])
  out = np.empty(m)
  out[order] = np.maximum.accumulate(scaled)
  adjusted[valid] = out
  return adjusted


def _kendall_method(x: np.ndarray, y: np.ndarray, tau: float) -> str:
  """The method scipy 1.17's `kendalltau(method='auto')` picks.

  'exact' when neither vector has ties and either n <= 33 or at most one
  pair is discordant (or concordant); 'asymptotic' otherwise.
  """
  if np.unique(x).size < x.size or np.unique(y).size < y.size:
    return "asymptotic"
  if x.size <= 33:
    return "exact"
  # Without ties tau = (concordant - discordant) / pairs.
  pairs = x.size * (x.size - 1) // 2
  discordant = round((1.0 - tau) * pairs / 2)
  return "exact" if min(discordant, pairs - discordant) <= 1 else "asymptotic"


def kendall_tau(x: ArrayLike, y: ArrayLike) -> TestResult:
  """Kendall's tau-b between two vectors with scipy's p-value.

  Pairs where either value is NaN are dropped. scipy's `kendalltau` (method
  'auto') uses the exact null distribution for small samples without ties
  and the normal approximation otherwise; `method` reports which.

  Returns:
    A `TestResult`; NaN with a reason when fewer than 3 pairs remain (with 2
    points tau is always +-1 and says nothing) or when x or y is constant
    (tau undefined).
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if x.ndim != 1 or x.shape != y.shape:
    raise ValueError(f"x and y must be 1-D of one length: {x.shape}, {y.shape}")
  keep = ~(np.isnan(x) | np.isnan(y))
  x, y = x[keep], y[keep]
  n = (int(x.size),)
  if x.size < 3:
    return TestResult(math.nan, math.nan, "", n, f"{x.size} complete pairs; need at least 3")
  if np.unique(x).size == 1 or np.unique(y).size == 1:
    return TestResult(math.nan, math.nan, "", n, "constant input")
  result = stats.kendalltau(x, y)
  return TestResult(
      float(result.statistic),
      float(result.pvalue),
      _kendall_method(x, y, float(result.statistic)),
      n,
  )


def significance_marker(pvalue: float, alpha: float = 0.05) -> str:
  """'*' when pvalue < alpha, '' otherwise (including a NaN p-value)."""
  return "*" if pvalue < alpha else ""


def markers(pvalues: Sequence[float], alpha: float = 0.05) -> list[str]:
  """`significance_marker` of each p-value."""
  return [significance_marker(p, alpha) for p in pvalues]
