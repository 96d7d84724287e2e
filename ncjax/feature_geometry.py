"""The 2-D view of feature space the colabs draw, and positions along it.

  class_plane          the plane through the global mean mu_G spanned by the
                       class-mean axis and a second direction: the top
                       within-class spread, or the group-mean difference
  project              features -> plane coordinates
  decision_line        the classifier's boundary restricted to the plane
  class_axis_position  t = 0 at mu_0, 1 at mu_1 (the paper's Fig. 1 axis)
  nearer_true_class    from t: is a sample nearer its own class mean?

Everything is float64 numpy on features already on the host
(`ncjax.inspection.stage_features`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ncjax.errors import DataError

SECOND_AXES = ("within", "group")


@dataclasses.dataclass(frozen=True)
class Plane:
  """A 2-D affine view of feature space: p = (h - origin) @ basis."""

  origin: np.ndarray  # D, the unweighted mean of the class means (mu_G)
  basis: np.ndarray  # D x 2, orthonormal columns
  labels: tuple[str, str]  # axis labels for plots


def _unit(v: np.ndarray, what: str) -> np.ndarray:
  norm = np.linalg.norm(v)
  if not np.isfinite(norm) or norm < 1e-12:
    raise DataError(f"cannot build the projection: {what} is zero or undefined")
  return v / norm


def _orthogonal_top_direction(x_NxD: np.ndarray, e1: np.ndarray) -> np.ndarray:
  """The top principal direction of the rows of x with their e1 part removed."""
  x = x_NxD - np.outer(x_NxD @ e1, e1)
  x = x - x.mean(axis=0)
  _, _, vt = np.linalg.svd(x, full_matrices=False)
  v = vt[0] - (vt[0] @ e1) * e1
  v = _unit(v, "the within-class spread orthogonal to the class axis")
  return v if v[np.argmax(np.abs(v))] > 0 else -v  # a fixed sign, as sklearn's svd_flip


def class_plane(
    means_KxD: np.ndarray,
    feats_NxD: np.ndarray,
    labels_N: np.ndarray,
    groups_N: np.ndarray | None = None,
    *,
    second_axis: str = "within",
) -> Plane:
  """The plane through mu_G spanned by the class means and one more direction.

  For K = 2 the first axis is the unit vector from mu_0 to mu_1 (the only
  direction NC1 measures), the second is orthogonal to it:
    'within': the top principal direction of the within-class residuals
      h_i - mu_{y_i} (where the spread NC1 averages over lies);
    'group': the difference of the group-1 and group-0 means, averaged over
      the classes (where a linear probe would find the attribute).
  For K > 2 the plane is spanned by the top two principal directions of the
  centred class means and `second_axis` is not used.

  Args:
    means_KxD: class means (e.g. `StageFeatures.means`).
    feats_NxD: features the residual or group directions are taken from.
    labels_N: their labels (the ones `means_KxD` were taken with).
    groups_N: their groups; needed for `second_axis='group'`.
    second_axis: 'within' or 'group'.
  """
  if second_axis not in SECOND_AXES:
    raise ValueError(f"second_axis must be one of {SECOND_AXES}, got {second_axis!r}")
  means = np.asarray(means_KxD, np.float64)
  feats = np.asarray(feats_NxD, np.float64)
  labels = np.asarray(labels_N)
  origin = means.mean(axis=0)
  if means.shape[0] > 2:
    _, _, vt = np.linalg.svd(means - origin, full_matrices=False)
    return Plane(origin, vt[:2].T, ("class-mean PC 1", "class-mean PC 2"))
  e1 = _unit(means[1] - means[0], "the class-mean difference mu_1 - mu_0")
  if second_axis == "within":
    e2 = _orthogonal_top_direction(feats - means[labels], e1)
    names = ("class axis ($\\mu_0 \\to \\mu_1$)", "top within-class direction (⊥)")
  else:
    if groups_N is None:
      raise ValueError("second_axis='group' needs groups_N")
    groups = np.asarray(groups_N)
    diffs = [
        feats[(labels == c) & (groups == 1)].mean(axis=0)
        - feats[(labels == c) & (groups == 0)].mean(axis=0)
        for c in range(2)
        if np.any((labels == c) & (groups == 1)) and np.any((labels == c) & (groups == 0))
    ]
    if not diffs:
      raise DataError("second_axis='group' needs both groups within some class")
    d = np.mean(diffs, axis=0)
    e2 = _unit(d - (d @ e1) * e1, "the group-mean difference orthogonal to the class axis")
    names = ("class axis ($\\mu_0 \\to \\mu_1$)", "group axis (⊥; group 0 $\\to$ 1)")
  return Plane(origin, np.stack([e1, e2], axis=1), names)


def project(feats_NxD: np.ndarray, plane: Plane) -> np.ndarray:
  """N x 2 coordinates of the features in the plane."""
  return (np.asarray(feats_NxD, np.float64) - plane.origin) @ plane.basis


def decision_line(w_KxD: np.ndarray, b_K: np.ndarray, plane: Plane) -> tuple[np.ndarray, float]:
  """(a, c) with a . p + c = logit_1 - logit_0 for the point p of the plane.

  The boundary a . p + c = 0 is exact for points in the plane; a feature off
  the plane is classified by its full coordinates.
  """
  w = np.asarray(w_KxD, np.float64)
  b = np.asarray(b_K, np.float64)
  if w.shape[0] != 2:
    raise ValueError(f"decision_line is for 2 classes, got K = {w.shape[0]}")
  dw = w[1] - w[0]
  return plane.basis.T @ dw, float(dw @ plane.origin + b[1] - b[0])


def class_axis_position(feats_NxD: np.ndarray, means_KxD: np.ndarray) -> np.ndarray:
  """t_i = (h_i - mu_0) . (mu_1 - mu_0) / |mu_1 - mu_0|^2: 0 at mu_0, 1 at mu_1.

  A feature is nearer mu_1 than mu_0 exactly when t > 1/2, so the fraction of
  flipped positives with t > 1/2 is `flipped_near_true` (SPEC section 5).
  """
  means = np.asarray(means_KxD, np.float64)
  if means.shape[0] != 2:
    raise ValueError(f"class_axis_position is for 2 classes, got K = {means.shape[0]}")
  d = means[1] - means[0]
  norm2 = float(d @ d)
  if not np.isfinite(norm2) or norm2 == 0:
    raise DataError("the class means coincide or are undefined")
  return (np.asarray(feats_NxD, np.float64) - means[0]) @ d / norm2


def nearer_true_class(t_N: np.ndarray, labels_N: np.ndarray) -> np.ndarray:
  """Whether each sample at class-axis position t is nearer its clean class mean.

  Nearer mu_1 exactly when t > 1/2 (see `class_axis_position`); a sample
  exactly halfway counts as nearer mu_0, as in `flipped_near_true`.
  """
  return (np.asarray(t_N) > 0.5) == (np.asarray(labels_N) == 1)
