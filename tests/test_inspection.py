"""ncjax.inspection and feature_geometry: what the colabs show, checked.

The geometry (projection plane, decision line, class-axis position) and the
per-group confusion matrices are checked against independent numpy / sklearn
computations on random data; the workdir readers against files written
here; features re-extracted from a tiny run's saved stages against the
metrics that run logged while training; and the report views of the tiny
study (`study_results.select_combos`, `add_curves`) against pandas.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.metrics import confusion_matrix

from ncjax import feature_geometry as geo
from ncjax import input_pipeline, inspection, neural_collapse, study_results
from ncjax.errors import WorkdirError
from ncjax.members import Member


def two_classes(seed=0, n=400, d=6, separation=3.0):
  """Features of two anisotropic Gaussian classes, labels and groups."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, n)
  groups = rng.integers(0, 2, n)
  mu = rng.normal(size=(2, d)) * separation
  shift = rng.normal(size=d)  # what group 1 adds
  scale = np.linspace(2.0, 0.2, d)
  feats = mu[labels] + groups[:, None] * shift + rng.normal(size=(n, d)) * scale
  return feats, labels, groups


def means_of(feats, labels, k=2):
  return np.stack([feats[labels == c].mean(axis=0) for c in range(k)])


# ---------------------------------------------------------------- geometry


def test_within_plane_is_class_axis_and_top_residual_pc():
  feats, labels, groups = two_classes()
  means = means_of(feats, labels)
  plane = geo.class_plane(means, feats, labels, groups, second_axis="within")
  np.testing.assert_allclose(plane.basis.T @ plane.basis, np.eye(2), atol=1e-12)
  d = means[1] - means[0]
  np.testing.assert_allclose(plane.basis[:, 0], d / np.linalg.norm(d), atol=1e-12)
  # sklearn's top PC of the residuals with the class axis projected out.
  e1 = plane.basis[:, 0]
  resid = feats - means[labels]
  resid -= np.outer(resid @ e1, e1)
  pc = PCA(n_components=1).fit(resid).components_[0]
  assert abs(pc @ plane.basis[:, 1]) == pytest.approx(1.0, abs=1e-9)
  np.testing.assert_allclose(plane.origin, means.mean(axis=0))
  # Around the midpoint the class means sit on the first axis at -+|d|/2.
  np.testing.assert_allclose(
      geo.project(means, plane), [[-np.linalg.norm(d) / 2, 0], [np.linalg.norm(d) / 2, 0]],
      atol=1e-9,
  )  # fmt: skip


def test_group_plane_follows_the_group_mean_difference():
  feats, labels, groups = two_classes(seed=1)
  means = means_of(feats, labels)
  plane = geo.class_plane(means, feats, labels, groups, second_axis="group")
  diff = np.mean(
      [feats[(labels == c) & (groups == 1)].mean(0) - feats[(labels == c) & (groups == 0)].mean(0)
       for c in (0, 1)], axis=0,
  )  # fmt: skip
  e1 = plane.basis[:, 0]
  expected = diff - (diff @ e1) * e1
  np.testing.assert_allclose(plane.basis[:, 1], expected / np.linalg.norm(expected), atol=1e-12)
  with pytest.raises(ValueError, match="needs groups"):
    geo.class_plane(means, feats, labels, second_axis="group")
  with pytest.raises(ValueError, match="second_axis"):
    geo.class_plane(means, feats, labels, groups, second_axis="pca")


def test_plane_of_three_classes_is_the_class_mean_pca_plane():
  rng = np.random.default_rng(2)
  means = rng.normal(size=(3, 5))
  plane = geo.class_plane(means, rng.normal(size=(10, 5)), rng.integers(0, 3, 10))
  pcs = PCA(n_components=2).fit(means).components_.T
  np.testing.assert_allclose(plane.basis @ plane.basis.T, pcs @ pcs.T, atol=1e-9)


def test_decision_line_gives_the_logit_difference_in_the_plane():
  feats, labels, groups = two_classes(seed=3)
  means = means_of(feats, labels)
  plane = geo.class_plane(means, feats, labels, groups)
  rng = np.random.default_rng(3)
  w, b = rng.normal(size=(2, feats.shape[1])), rng.normal(size=2)
  a, c = geo.decision_line(w, b, plane)
  p = rng.normal(size=(50, 2)) * 3
  logits = (plane.origin + p @ plane.basis.T) @ w.T + b
  np.testing.assert_allclose(p @ a + c, logits[:, 1] - logits[:, 0], atol=1e-9)
  # Points on the line are ties.
  on = -c * a / (a @ a) + np.outer(np.linspace(-5, 5, 7), [-a[1], a[0]])
  tie = (plane.origin + on @ plane.basis.T) @ w.T + b
  np.testing.assert_allclose(tie[:, 1], tie[:, 0], atol=1e-9)


def test_class_axis_position_and_flipped_near_true():
  feats, labels, _ = two_classes(seed=4, separation=0.5)  # classes overlap
  rng = np.random.default_rng(4)
  flipped = (labels == 1) & (rng.random(labels.size) < 0.3)
  trained = np.where(flipped, 0, labels)
  means = means_of(feats, trained)
  t = geo.class_axis_position(np.concatenate([means, feats]), means)
  np.testing.assert_allclose(t[:2], [0.0, 1.0], atol=1e-12)
  t = t[2:]
  nearer_1 = np.linalg.norm(feats - means[1], axis=1) < np.linalg.norm(feats - means[0], axis=1)
  np.testing.assert_array_equal(t > 0.5, nearer_1)
  near = geo.nearer_true_class(t[flipped], labels[flipped])
  # The per-epoch metric, computed by neural_collapse's own kernel.
  expected = neural_collapse.flipped_near_true(feats, trained, flipped)
  assert 0 < expected < 1
  assert near.mean() == pytest.approx(expected, abs=1e-12)
  # A sample of class 0 is nearer its class when t < 1/2.
  np.testing.assert_array_equal(geo.nearer_true_class(t, labels), np.where(
      labels == 1, nearer_1, ~nearer_1))  # fmt: skip


def test_group_confusion_matches_sklearn():
  rng = np.random.default_rng(5)
  labels, preds = rng.integers(0, 2, 300), rng.integers(0, 2, 300)
  groups = rng.choice([0, 1, 3], 300)
  labels[groups == 3] = 0  # a group without positives still gets a 2 x 2 matrix
  conf = inspection.group_confusion(labels, preds, groups)
  assert sorted(conf) == [0, 1, 3]
  for g, m in conf.items():
    sel = groups == g
    np.testing.assert_array_equal(m, confusion_matrix(labels[sel], preds[sel], labels=[0, 1]))
  with pytest.raises(ValueError, match="must lie in"):
    inspection.group_confusion(labels + 1, preds, groups)


def test_sample_rows():
  np.testing.assert_array_equal(inspection.sample_rows(5, None), np.arange(5))
  np.testing.assert_array_equal(inspection.sample_rows(5, 10), np.arange(5))
  rows = inspection.sample_rows(1000, 100, seed=1)
  assert rows.size == 100 and np.unique(rows).size == 100
  assert np.all(np.diff(rows) > 0) and rows.min() >= 0 and rows.max() < 1000
  np.testing.assert_array_equal(rows, inspection.sample_rows(1000, 100, seed=1))


# ---------------------------------------------------------------- workdirs


def _touch_run(path):
  os.makedirs(path)
  with open(os.path.join(path, "run.json"), "w") as f:
    json.dump({"members": [{"name": "seed0_bias0", "seed": 0, "bias_rate": 0.0}]}, f)


def test_training_workdirs_of_a_study_and_of_a_run(tmp_path):
  study = tmp_path / "study"
  for kind, name in (("combos", "ds-b"), ("combos", "ds-a"), ("separability", "ds-a")):
    _touch_run(study / kind / name)
  os.makedirs(study / "combos" / "ds-unstarted")  # no run.json yet
  os.makedirs(study / "report")
  runs = inspection.training_workdirs(str(study))
  assert list(runs) == ["ds-a", "ds-b"]
  assert runs["ds-a"] == str(study / "combos" / "ds-a")
  with_sep = inspection.training_workdirs(str(study), separability=True)
  assert list(with_sep) == ["ds-a", "ds-b", "separability/ds-a"]
  one = str(study / "combos" / "ds-a")
  assert inspection.training_workdirs(one) == {"ds-a": one}
  with pytest.raises(WorkdirError, match="neither a training workdir"):
    inspection.training_workdirs(str(study / "report"))
  with pytest.raises(WorkdirError, match="does not exist"):
    inspection.training_workdirs(str(tmp_path / "missing"))


def test_find_workdir(tmp_path):
  os.makedirs(tmp_path / "runs" / "x")
  assert inspection.find_workdir("runs/x", roots=[str(tmp_path)]) == str(tmp_path / "runs" / "x")
  assert inspection.find_workdir(str(tmp_path)) == str(tmp_path)
  assert inspection.find_workdir("nowhere", roots=[str(tmp_path)]) == "nowhere"


def test_load_metrics_null_and_missing_are_nan(tmp_path):
  records = [
      {"epoch": 2, "member": "m", "seed": 0, "bias_rate": 0.25, "split": "train", "nc1": None},
      {"epoch": 1, "member": "m", "seed": 0, "bias_rate": 0.25, "split": "train", "nc1": 0.5},
      {"epoch": 1, "member": "m", "seed": 0, "bias_rate": 0.25, "split": "validation",
       "loss": 1.0},
  ]  # fmt: skip
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  df = inspection.load_metrics(str(tmp_path))
  assert list(zip(df["split"], df["epoch"], strict=True)) == [
      ("train", 1),
      ("train", 2),
      ("validation", 1),
  ]
  assert df["nc1"].dtype == np.float64
  assert df["nc1"].iloc[0] == 0.5 and math.isnan(df["nc1"].iloc[1])
  assert math.isnan(df["nc1"].iloc[2]) and math.isnan(df["loss"].iloc[0])
  with pytest.raises(WorkdirError):
    inspection.load_metrics(str(tmp_path / "missing"))


# ------------------------------------------------- a tiny run's saved stages


@pytest.fixture(scope="module")
def tiny_views(tiny_run):
  config, workdir, _ = tiny_run
  member = inspection.default_member(workdir)
  splits = inspection.load_splits(workdir)
  views = [inspection.stage_features(workdir, member, s, splits) for s in ("early", "final")]
  return config, workdir, member, splits, views


def test_stage_features_labels_and_flips_are_the_members(tiny_views):
  config, workdir, member, splits, views = tiny_views
  m = next(x for x in inspection.members(workdir) if x["name"] == member)
  assert m["bias_rate"] > 0
  expected = input_pipeline.member_labels(splits, Member(m["seed"], m["bias_rate"]), config)
  for view in views:
    for split in ("train", "test"):
      sf = view.splits[split]
      trained, mask = expected[split]
      np.testing.assert_array_equal(sf.trained, trained)
      np.testing.assert_array_equal(sf.flipped, mask)
      np.testing.assert_array_equal(sf.labels, splits[split].labels)
      np.testing.assert_array_equal(sf.predictions, np.argmax(sf.logits, axis=1))
    assert view.splits["train"].flipped.any() and not view.splits["test"].flipped.any()
  assert [v.epoch for v in views] == [
      inspection.stage_epochs(workdir)[member]["early"],
      config.epochs,
  ]


def test_stage_features_reproduce_the_logged_metrics(tiny_views):
  """Re-extracted features of each stage give the NC1 and flipped fraction
  that training logged at that stage's epoch."""
  _, workdir, member, _, views = tiny_views
  metrics = inspection.load_metrics(workdir)
  table = inspection.flipped_table(views, metrics)
  assert table["flipped"].gt(0).all()
  np.testing.assert_allclose(table["nearer_true"], table["logged"], atol=1e-9)
  for view in views:
    tr = view.splits["train"]
    nc1 = neural_collapse.compute(tr.feats, tr.trained, view.w, view.b)["nc1"]
    logged = metrics[(metrics["member"] == member) & (metrics["split"] == "train")
                     & (metrics["epoch"] == view.epoch)]["nc1"].item()  # fmt: skip
    assert nc1 == pytest.approx(logged, rel=1e-4)


# ------------------------------------------- report views (colabs/report)


def _floats(values):
  return np.asarray([np.nan if v is None else v for v in values], np.float64)


def test_report_views_select_combos_and_add_curves(tiny_study):
  _, study_dir, _ = tiny_study
  summary = study_results.load_summary(study_dir)
  name = sorted(summary["combos"])[-1]
  key = "nc1_own/g1"  # logged, but not kept in summary.json
  assert key not in study_results.CURVE_KEYS
  view = study_results.select_combos(summary, [name])
  view = study_results.add_curves(view, study_dir, [("train", key), ("train", "nc1")])
  assert list(view["combos"]) == [name] and view["kendall_tau"]["final"]["n"] == 1
  c = view["combos"][name]
  assert c["curves"]["train"]["nc1"] == summary["combos"][name]["curves"]["train"]["nc1"]
  assert key not in summary["combos"][name]["curves"]["train"]  # not modified in place
  df = inspection.load_metrics(os.path.join(study_dir, "combos", name))
  for side, rate in (("clean", 0.0), ("biased", c["main_rate"])):
    per_epoch = df[(df["split"] == "train") & (df["bias_rate"] == rate)].groupby("epoch")[key]
    assert c["curves"]["train"][key]["epochs"] == list(per_epoch.groups)
    np.testing.assert_allclose(_floats(c["curves"]["train"][key][side]["mean"]), per_epoch.mean())
    np.testing.assert_allclose(
        _floats(c["curves"]["train"][key][side]["sd"]), per_epoch.std(ddof=1)
    )
  with pytest.raises(KeyError, match="no combination"):
    study_results.select_combos(summary, ["nosuch-combo"])
