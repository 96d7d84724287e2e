"""SPLIT: how much of a binary attribute a frozen model's features encode.

A linear probe (L2 logistic regression on features standardised with the train
statistics) is fitted to predict the attribute from train features; its test
AUC is the SPLIT score. This differs from the SS reference, which fine-tunes the
disease head with Adam under early stopping (see
notes/datasets-and-methods.md section 4): a convex fit with lbfgs has one
optimum, so the score depends on the features only, not on an optimiser
schedule, and is deterministic.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
from numpy.typing import ArrayLike
from sklearn import exceptions as skexceptions
from sklearn import linear_model, metrics, preprocessing

from ncjax.errors import DataError


@dataclasses.dataclass(frozen=True)
class SplitResult:
  """The probe's test scores.

  Attributes:
    auc: test ROC AUC of P(attribute = 1); NaN when the test attribute has a
      single class (AUC undefined).
    accuracy: test accuracy at probability 0.5 (sklearn's `predict`).
    converged: False when lbfgs stopped at `max_iter` before its tolerance.
    n_iter: lbfgs iterations used.
  """

  auc: float
  accuracy: float
  converged: bool
  n_iter: int


def _check(name: str, features: ArrayLike, attribute: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
  features = np.asarray(features, np.float64)
  attribute = np.asarray(attribute)
  if features.ndim != 2:
    raise ValueError(f"{name} features must be N x D, got {features.shape}")
  if attribute.shape != (features.shape[0],):
    raise ValueError(
        f"{name} attribute has shape {attribute.shape}, expected ({features.shape[0]},)"
    )
  if not np.isin(attribute, (0, 1)).all():
    raise ValueError(f"{name} attribute must be 0/1, got values {np.unique(attribute)}")
  if not np.isfinite(features).all():
    raise ValueError(f"{name} features contain NaN or infinite values")
  return features, attribute.astype(np.int64)


def split_probe(
    train_features: ArrayLike,
    train_attribute: ArrayLike,
    test_features: ArrayLike,
    test_attribute: ArrayLike,
    *,
    c: float = 1.0,
    max_iter: int = 1000,
) -> SplitResult:
  """Fits the linear attribute probe on train and scores it on test.

  Args:
    train_features: N x D frozen features of the train split.
    train_attribute: N binary (0/1) attribute values of the train split.
    test_features: M x D features of the test split, same extractor.
    test_attribute: M binary attribute values of the test split.
    c: inverse L2 strength of the logistic regression (sklearn's `C`).
    max_iter: lbfgs iteration limit; hitting it sets `converged=False`
      instead of emitting a warning.

  Returns:
    A `SplitResult` with the test AUC and accuracy.

  Raises:
    DataError: if the train attribute has a single class (nothing to learn).
    ValueError: on malformed inputs (shapes, non-binary attributes,
      non-finite features, mismatched feature widths).
  """
  x_train, a_train = _check("train", train_features, train_attribute)
  x_test, a_test = _check("test", test_features, test_attribute)
  if x_train.shape[1] != x_test.shape[1]:
    raise ValueError(f"train features have {x_train.shape[1]} dims, test {x_test.shape[1]}")
  present = np.unique(a_train)
  if present.size < 2:
    raise DataError(
        f"SPLIT probe: the train attribute has the single value "
        f"{present.tolist()}; a probe needs both groups in train"
    )
  if x_test.shape[0] == 0:
    raise ValueError("test features are empty")
  # Standardise on train only, so test statistics do not leak into the probe;
  # constant features get scale 1 from sklearn and stay harmless zeros.
  scaler = preprocessing.StandardScaler().fit(x_train)
  # lbfgs is deterministic; random_state only pins anything sklearn might
  # randomise in future versions.
  probe = linear_model.LogisticRegression(
      C=c, l1_ratio=0.0, solver="lbfgs", max_iter=max_iter, random_state=0
  )
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", skexceptions.ConvergenceWarning)
    probe.fit(scaler.transform(x_train), a_train)
  converged = not any(issubclass(w.category, skexceptions.ConvergenceWarning) for w in caught)
  # Re-emit anything that was not the expected convergence warning.
  for w in caught:
    if not issubclass(w.category, skexceptions.ConvergenceWarning):
      warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
  z_test = scaler.transform(x_test)
  probability = probe.predict_proba(z_test)[:, list(probe.classes_).index(1)]
  if np.unique(a_test).size == 2:
    auc = float(metrics.roc_auc_score(a_test, probability))
  else:
    auc = float("nan")
  accuracy = float(np.mean(probe.predict(z_test) == a_test))
  return SplitResult(
      auc=auc,
      accuracy=accuracy,
      converged=converged,
      n_iter=int(probe.n_iter_[0]),
  )
