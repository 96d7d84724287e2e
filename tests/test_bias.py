"""Label bias (SPEC section 3): who flips, how many, and determinism."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.stats

from ncjax import bias
from ncjax.errors import ConfigError


def _population(n=20000, seed=0):
  rng = np.random.default_rng(seed)
  groups = rng.integers(0, 2, n)
  labels = (rng.random(n) < 0.3).astype(np.int32)
  return labels, groups


def test_only_positives_of_group_1_flip_to_negative():
  labels, groups = _population()
  spec = bias.BiasSpec(rate=0.25)
  for split in ("train", "validation"):
    biased, mask = bias.apply(labels, groups, spec, seed=3, split=split)
    assert mask.any()
    assert np.all(labels[mask] == 1) and np.all(groups[mask] == 1)
    assert np.all(biased[mask] == 0)
    np.testing.assert_array_equal(biased[~mask], labels[~mask])


def test_flip_rate_matches_within_binomial_interval():
  labels, groups = _population()
  eligible = (labels == 1) & (groups == 1)
  for rate in (0.1, 0.25, 0.5):
    _, mask = bias.apply(labels, groups, bias.BiasSpec(rate=rate), seed=0, split="train")
    k, n = int(mask.sum()), int(eligible.sum())
    assert scipy.stats.binomtest(k, n, rate).pvalue > 0.001, (rate, k, n)


def test_test_split_is_never_changed():
  labels, groups = _population()
  biased, mask = bias.apply(labels, groups, bias.BiasSpec(rate=1.0), seed=0, split="test")
  assert not mask.any()
  np.testing.assert_array_equal(biased, labels)


def test_deterministic_in_seed_and_split():
  labels, groups = _population()
  spec = bias.BiasSpec(rate=0.25)
  a = bias.flip_mask(labels, groups, spec, seed=7, split="train")
  b = bias.flip_mask(labels, groups, spec, seed=7, split="train")
  c = bias.flip_mask(labels, groups, spec, seed=8, split="train")
  d = bias.flip_mask(labels, groups, spec, seed=7, split="validation")
  np.testing.assert_array_equal(a, b)
  assert (a != c).any() and (a != d).any()


def test_flips_are_nested_across_rates():
  labels, groups = _population()
  low = bias.flip_mask(labels, groups, bias.BiasSpec(rate=0.1), seed=1, split="train")
  high = bias.flip_mask(labels, groups, bias.BiasSpec(rate=0.4), seed=1, split="train")
  assert np.all(high[low]) and high.sum() > low.sum()


def test_exact_mode_flips_round_rate_times_n():
  labels, groups = _population(n=1001)
  n = int(((labels == 1) & (groups == 1)).sum())
  for rate in (0.0, 0.25, 0.33, 1.0):
    spec = bias.BiasSpec(rate=rate, mode="exact")
    mask = bias.flip_mask(labels, groups, spec, seed=2, split="train")
    assert mask.sum() == round(rate * n)


def test_over_diagnosis_flips_negatives_of_the_chosen_group():
  labels, groups = _population()
  spec = bias.BiasSpec(rate=0.5, group=0, direction="over")
  biased, mask = bias.apply(labels, groups, spec, seed=0, split="train")
  assert mask.any()
  assert np.all(labels[mask] == 0) and np.all(groups[mask] == 0)
  assert np.all(biased[mask] == 1)


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_rate_outside_unit_interval_is_a_config_error(rate):
  with pytest.raises(ConfigError, match=r"bias rate must be in \[0, 1\]"):
    bias.flip_mask(np.ones(4), np.ones(4), bias.BiasSpec(rate=rate), seed=0, split="train")


def test_empty_eligible_group_warns_and_flips_nothing(caplog):
  labels = np.array([1, 1, 0, 0])
  groups = np.array([0, 0, 0, 1])  # no positive in group 1
  with caplog.at_level(logging.WARNING):
    mask = bias.flip_mask(labels, groups, bias.BiasSpec(rate=0.5), seed=0, split="train")
  assert not mask.any()
  assert "0 flips" in caplog.text
