"""Label bias: under-diagnosis of one patient group (SPEC section 3).

A biased training set flips positive labels of group 1 to negative, in the
train and validation splits only; the test split is never changed. Each
eligible sample flips independently with probability `rate` (the mode of
Jones et al., "exact" flips exactly round(rate * n) of them).

Draws are a pure function of (seed, split): one uniform number per sample of
the split, from a generator seeded with (seed, split). A sample flips when its
number is below the rate, so the flipped sets of one seed are nested across
rates, and nothing else a run does (other members, data order, init) can
change them.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib

import numpy as np

from ncjax.errors import ConfigError

BIASED_SPLITS = ("train", "validation")
MODES = ("independent", "exact")
DIRECTIONS = ("under", "over")


@dataclasses.dataclass(frozen=True)
class BiasSpec:
  """What to flip: `direction` 'under' flips 1 -> 0, 'over' flips 0 -> 1."""

  rate: float
  group: int = 1
  mode: str = "independent"
  direction: str = "under"

  def validate(self) -> None:
    if not 0.0 <= self.rate <= 1.0:
      raise ConfigError(f"bias rate must be in [0, 1], got {self.rate}")
    if self.mode not in MODES:
      raise ConfigError(f"bias.mode must be one of {MODES}, got {self.mode!r}")
    if self.direction not in DIRECTIONS:
      raise ConfigError(f"bias.direction must be one of {DIRECTIONS}, got {self.direction!r}")


def _rng(seed: int, split: str) -> np.random.Generator:
  return np.random.default_rng([seed, zlib.crc32(split.encode())])


def flip_mask(
    labels: np.ndarray, groups: np.ndarray, spec: BiasSpec, *, seed: int, split: str
) -> np.ndarray:
  """Boolean mask (N) of the samples whose label is flipped."""
  spec.validate()
  labels, groups = np.asarray(labels), np.asarray(groups)
  if labels.shape != groups.shape:
    raise ValueError(f"labels {labels.shape} and groups {groups.shape} differ")
  if split not in BIASED_SPLITS or spec.rate == 0.0:
    return np.zeros(labels.shape, bool)
  source_label = 1 if spec.direction == "under" else 0
  eligible = (labels == source_label) & (groups == spec.group)
  if not eligible.any():
    logging.warning(
        "bias: no samples with label %d in group %d of split %r; 0 flips",
        source_label,
        spec.group,
        split,
    )
    return np.zeros(labels.shape, bool)
  u = _rng(seed, split).random(labels.shape[0])
  if spec.mode == "independent":
    return eligible & (u < spec.rate)
  # exact: the round(rate * n) eligible samples with the smallest draws.
  idx = np.flatnonzero(eligible)
  k = int(round(spec.rate * idx.size))
  mask = np.zeros(labels.shape, bool)
  mask[idx[np.argsort(u[idx], kind="stable")[:k]]] = True
  return mask


def apply(
    labels: np.ndarray, groups: np.ndarray, spec: BiasSpec, *, seed: int, split: str
) -> tuple[np.ndarray, np.ndarray]:
  """(biased labels, flip mask) for one member's view of one split."""
  mask = flip_mask(labels, groups, spec, seed=seed, split=split)
  biased = np.where(mask, 1 - np.asarray(labels), labels).astype(np.int32)
  return biased, mask
