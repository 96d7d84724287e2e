"""The synthetic benchmark: determinism, shapes, and its group statistics."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from configs import synthetic as synthetic_config
from ncjax import datasets
from ncjax.datasets import synthetic
from ncjax.errors import ConfigError


def _params(**overrides) -> synthetic.SyntheticParams:
  cfg = synthetic_config.get_config("tiny").dataset.synthetic
  return dataclasses.replace(synthetic.SyntheticParams.from_config(cfg), **overrides)


def test_generation_is_deterministic_and_seeded():
  p = _params()
  a, b = synthetic.generate(p, "train"), synthetic.generate(p, "train")
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  c = synthetic.generate(dataclasses.replace(p, seed=1), "train")
  assert (a["image"] != c["image"]).any()
  v = synthetic.generate(p, "validation")
  assert (a["image"][: len(v["image"])] != v["image"]).any()


def test_fields_and_shapes():
  p = _params()
  out = synthetic.generate(p, "test")
  n, s = p.num_test, p.image_size
  assert out["image"].shape == (n, s, s, 1) and out["image"].dtype == np.uint8
  assert set(out) == {"image", "label", "id", "low", "medium", "high"}
  for key in ("label", "low", "medium", "high"):
    assert set(np.unique(out[key])) <= {0, 1}
  assert len(set(out["id"])) == n


def test_group_share_and_prevalence_follow_the_config():
  p = _params(num_train=40000, image_size=8)
  out = synthetic.generate(p, "train")
  y = out["label"]
  assert abs(y.mean() - p.prevalence) < 0.01
  for name, spec in p.attributes:
    a = out[name]
    assert abs(a.mean() - spec.share) < 0.01, name
    assert abs(y[a == 1].mean() - spec.prevalence) < 0.015, name
    assert abs(y[a == 0].mean() - p.group0_prevalence(spec)) < 0.015, name


def test_disease_and_strong_cue_are_visible_in_pixels():
  """Lesions brighten a spot; the strongest cue adds grating energy."""
  p = _params(num_train=4000)
  out = synthetic.generate(p, "train")
  img = out["image"][..., 0].astype(np.float64)
  peak = (img - img.mean(axis=(1, 2), keepdims=True)).max(axis=(1, 2))
  assert peak[out["label"] == 1].mean() > peak[out["label"] == 0].mean() + 5
  # Energy at the high cue's spatial frequency, with orientation jitter.
  spec = dict(p.attributes)["high"]
  f = np.abs(np.fft.fft2(img - img.mean(axis=(1, 2), keepdims=True))) ** 2
  freqs = np.fft.fftfreq(p.image_size)
  r = np.hypot(*np.meshgrid(freqs, freqs, indexing="ij"))
  band = np.abs(r - 1 / spec.period) < 0.04
  energy = f[:, band].mean(axis=1)
  assert energy[out["high"] == 1].mean() > 1.5 * energy[out["high"] == 0].mean()


def test_builder_writes_the_generated_examples(data_dir):
  p = _params()
  split = datasets.load_split("synthetic", "validation", data_dir=data_dir, params=p)
  again = datasets.load_split("synthetic", "validation", data_dir=data_dir, params=p)
  ref = synthetic.generate(p, "validation")
  order = np.argsort(ref["id"])
  np.testing.assert_array_equal(split.ids, ref["id"][order])
  np.testing.assert_array_equal(split.images, ref["image"][order])
  np.testing.assert_array_equal(split.labels, ref["label"][order])
  for name in ("low", "medium", "high"):
    np.testing.assert_array_equal(split.attributes[name], ref[name][order])
  np.testing.assert_array_equal(again.images, split.images)


def test_impossible_prevalence_is_a_config_error():
  p = _params()
  name, spec = p.attributes[0]
  bad = dataclasses.replace(spec, share=0.9, prevalence=0.01)  # group 0 > 1
  with pytest.raises(ConfigError, match="impossible"):
    dataclasses.replace(p, prevalence=0.95, attributes=((name, bad),)).validate()
