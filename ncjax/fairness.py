"""Per-group and overall classification metrics of a binary disease model.

The model has two logits; its decision is their argmax and its score is the
softmax probability of class 1 (`predictions_from_logits`). `group_metrics`
returns a flat dict, e.g. ``{"f1": .., "f1/g0": .., "f1/g1": .., "auc": ..}``,
with, for the whole set and for each group:

  f1        F1 of the positive class (1 = disease) at the model's decision.
  auc       ROC AUC of the positive-class score.
  tpr       true positive rate (sensitivity, recall of class 1).
  fpr       false positive rate (1 - specificity).
  accuracy  fraction of correct decisions.
  ppr       positive prediction rate: fraction predicted positive.
  n, n_pos  number of samples and of positive labels (so a NaN can be read).

Undefined values are NaN, never a stand-in 0 or 1, so that means over seeds
are not silently biased and a NaN is visible in the report:

  f1   NaN iff TP + FP + FN == 0 (no positive label and no positive decision).
       When only precision or only recall is undefined, F1 = 2TP / (2TP + FP
       + FN) is still defined (and 0). This is exactly sklearn's
       `f1_score(..., zero_division=np.nan)`.
  tpr  NaN iff the set has no positive label; as `recall_score(...,
       zero_division=np.nan)`.
  fpr  NaN iff the set has no negative label.
  auc  NaN iff the set lacks either class (sklearn warns and returns NaN).
  accuracy, ppr  NaN iff the set is empty.

An empty group therefore has every metric NaN and n = n_pos = 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from sklearn import metrics as skmetrics

METRICS = ("f1", "auc", "tpr", "fpr", "accuracy", "ppr")
COUNTS = ("n", "n_pos")


def predictions_from_logits(logits: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
  """The decision (argmax; ties go to class 0) and P(class 1) of N x 2 logits.

  The probability is computed from the logit difference, which is the
  softmax of class 1 without overflow for large logits.
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or logits.shape[1] != 2:
    raise ValueError(f"expected N x 2 logits, got shape {logits.shape}")
  predictions = np.argmax(logits, axis=1).astype(np.int32)
  margin = logits[:, 1] - logits[:, 0]
  scores = np.exp(-np.logaddexp(0.0, -margin))  # sigmoid(margin), stably
  return predictions, scores


def _binary(name: str, values: ArrayLike) -> np.ndarray:
  values = np.asarray(values)
  if values.ndim != 1:
    raise ValueError(f"{name} must be 1-D, got shape {values.shape}")
  if not np.isin(values, (0, 1)).all():
    raise ValueError(f"{name} must be 0/1, got values {np.unique(values)}")
  return values.astype(np.int64)


def _ratio(numerator: int, denominator: int) -> float:
  return numerator / denominator if denominator else float("nan")


def classification_metrics(
    labels: ArrayLike, predictions: ArrayLike, scores: ArrayLike
) -> dict[str, float]:
  """The `METRICS` and `COUNTS` of one set of samples; see the module doc."""
  labels = _binary("labels", labels)
  predictions = _binary("predictions", predictions)
  scores = np.asarray(scores, np.float64)
  if not labels.shape == predictions.shape == scores.shape:
    raise ValueError(
        "labels, predictions and scores differ in shape: "
        f"{labels.shape}, {predictions.shape}, {scores.shape}"
    )
  if not np.isfinite(scores).all():
    # A diverged model must not pass as a chance-level AUC.
    raise ValueError("scores contain NaN or infinite values")
  tp = int(np.sum((labels == 1) & (predictions == 1)))
  fp = int(np.sum((labels == 0) & (predictions == 1)))
  fn = int(np.sum((labels == 1) & (predictions == 0)))
  tn = int(np.sum((labels == 0) & (predictions == 0)))
  n, n_pos = labels.size, tp + fn
  if 0 < n_pos < n:
    auc = float(skmetrics.roc_auc_score(labels, scores))
  else:
    auc = float("nan")
  return {
      "f1": _ratio(2 * tp, 2 * tp + fp + fn),
      "auc": auc,
      "tpr": _ratio(tp, tp + fn),
      "fpr": _ratio(fp, fp + tn),
      "accuracy": _ratio(tp + tn, n),
      "ppr": _ratio(tp + fp, n),
      "n": float(n),
      "n_pos": float(n_pos),
  }


def group_metrics(
    labels: ArrayLike,
    predictions: ArrayLike,
    scores: ArrayLike,
    groups: ArrayLike,
    *,
    group_ids: Sequence[int] = (0, 1),
) -> dict[str, float]:
  """Overall metrics under their names and per-group ones as ``name/g<id>``.

  Args:
    labels: N true labels, 0/1.
    predictions: N decisions, 0/1 (argmax of the two logits).
    scores: N positive-class scores (softmax probability of class 1).
    groups: N group ids of the sensitive attribute.
    group_ids: the groups to report. Every id gets its keys even when it has
      no sample (all NaN), so dicts from different seeds have the same keys.

  Returns:
    A flat dict of floats with the `METRICS` and `COUNTS` keys, overall and
    per group; see the module docstring for when a value is NaN.

  Raises:
    ValueError: on shape mismatches, non-binary labels or predictions,
      non-finite scores, or a group id outside `group_ids`.
  """
  labels = np.asarray(labels)
  predictions = np.asarray(predictions)
  scores = np.asarray(scores)
  groups = np.asarray(groups)
  if groups.shape != labels.shape:
    raise ValueError(f"groups has shape {groups.shape}, labels {labels.shape}")
  unknown = np.setdiff1d(np.unique(groups), np.asarray(group_ids))
  if unknown.size:
    # A sample outside every reported group would count overall but in no
    # group, which would make the per-group numbers silently inconsistent.
    raise ValueError(f"group ids {unknown} are not in group_ids={group_ids}")
  result = classification_metrics(labels, predictions, scores)
  for g in group_ids:
    mask = groups == g
    per_group = classification_metrics(labels[mask], predictions[mask], scores[mask])
    result.update({f"{k}/g{g}": v for k, v in per_group.items()})
  return result
