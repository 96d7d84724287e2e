"""A procedural medical-imaging benchmark that contains the paper's mechanism.

Each image is a patch of smooth "tissue" texture with per-image gain,
brightness and pixel noise. Diseased images (label 1) carry a small Gaussian
lesion of random size, contrast and position: learnable, but not trivially
(clean test AUC well below 1). Every binary attribute adds its own cosine
grating (own orientation and period) to the images of group 1, with an
amplitude (`strength`) that sets how separable the group is from the image
alone, from barely (low) to almost perfectly (high) - the paper's subgroup
separability axis.

Group sizes and per-group prevalence follow a label-first model: the label is
drawn with the overall prevalence, then every attribute independently given
the label with P(a = 1 | y) chosen by Bayes' rule so that the group share and
the group-1 prevalence are exactly the configured ones (the group-0 prevalence
follows). Attributes are independent given the label, so each attribute
combination of the study sees the same images.

Generation is vectorised numpy, deterministic in (params, split): a few
thousand images take well under a second.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import scipy.ndimage
import tensorflow_datasets as tfds

from ncjax import datasets
from ncjax.errors import ConfigError

_SPLIT_INDEX = {"train": 0, "validation": 1, "test": 2}
# uint8 storage: value = 128 + _SCALE * intensity, clipped.
_SCALE = 24.0


@dataclasses.dataclass(frozen=True)
class AttributeSpec:
  """One binary attribute: its image cue and its group statistics."""

  strength: float  # grating amplitude (0: invisible in the image)
  share: float  # P(a = 1)
  prevalence: float  # P(y = 1 | a = 1)
  period: float  # grating period in pixels
  orientation: float  # grating orientation in radians


@dataclasses.dataclass(frozen=True)
class SyntheticParams:
  """Everything that determines the generated dataset."""

  image_size: int = 24
  num_train: int = 1536
  num_validation: int = 512
  num_test: int = 4096
  prevalence: float = 0.25  # P(y = 1) overall
  seed: int = 0
  texture_sigma: float = 3.0
  texture_amplitude: float = 0.4
  noise_sd: float = 0.25
  lesion_radius: tuple[float, float] = (1.0, 2.2)
  lesion_contrast: tuple[float, float] = (0.6, 3.0)
  attributes: tuple[tuple[str, AttributeSpec], ...] = ()

  def validate(self) -> None:
    if not 0.0 < self.prevalence < 1.0:
      raise ConfigError(f"dataset.synthetic.prevalence must be in (0, 1), got {self.prevalence}")
    for name, spec in self.attributes:
      if not 0.0 < spec.share < 1.0:
        raise ConfigError(
            f"dataset.synthetic.attributes.{name}.share must be in (0, 1), got {spec.share}"
        )
      p0 = self.group0_prevalence(spec)
      if not (0.0 <= spec.prevalence <= 1.0 and 0.0 <= p0 <= 1.0):
        raise ConfigError(
            f"dataset.synthetic.attributes.{name}: prevalence {spec.prevalence} "
            f"in a group of share {spec.share} is impossible with overall "
            f"prevalence {self.prevalence} (group 0 would need {p0:.3f})"
        )
    for split in _SPLIT_INDEX:
      if self.num_examples(split) < 1:
        raise ConfigError(f"dataset.synthetic.num_{split} must be >= 1")

  def group0_prevalence(self, spec: AttributeSpec) -> float:
    return (self.prevalence - spec.share * spec.prevalence) / (1.0 - spec.share)

  def num_examples(self, split: str) -> int:
    return {
        "train": self.num_train,
        "validation": self.num_validation,
        "test": self.num_test,
    }[split]

  def fingerprint(self) -> str:
    blob = json.dumps(dataclasses.asdict(self), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any]) -> SyntheticParams:
    """From the `config.dataset.synthetic` section (a ConfigDict or dict)."""
    attrs = tuple(
        (name, AttributeSpec(**dict(spec)))
        for name, spec in sorted(dict(cfg["attributes"]).items())
    )
    fields = {k: v for k, v in dict(cfg).items() if k != "attributes"}
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return cls(attributes=attrs, **fields)


def generate(params: SyntheticParams, split: str) -> dict[str, np.ndarray]:
  """All examples of one split as arrays (images uint8 N x S x S x 1)."""
  n, s = params.num_examples(split), params.image_size
  rng = np.random.default_rng([params.seed, _SPLIT_INDEX[split]])

  label = rng.random(n) < params.prevalence
  attrs = {}
  for name, spec in params.attributes:
    # Bayes: P(a=1 | y) from share, group-1 prevalence and overall prevalence.
    p_pos = spec.share * spec.prevalence / params.prevalence
    p_neg = spec.share * (1 - spec.prevalence) / (1 - params.prevalence)
    attrs[name] = rng.random(n) < np.where(label, p_pos, p_neg)

  # Smooth tissue texture, normalised per image.
  noise = rng.standard_normal((n, s, s))
  tissue = scipy.ndimage.gaussian_filter(
      noise, sigma=(0, params.texture_sigma, params.texture_sigma), mode="wrap"
  )
  tissue -= tissue.mean(axis=(1, 2), keepdims=True)
  tissue /= tissue.std(axis=(1, 2), keepdims=True) + 1e-8
  image = params.texture_amplitude * tissue

  yy, xx = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")

  # Lesion: an isotropic Gaussian blob away from the border.
  margin = 3.0
  cy, cx = rng.uniform(margin, s - 1 - margin, size=(2, n))
  radius = rng.uniform(*params.lesion_radius, size=n)
  contrast = rng.uniform(*params.lesion_contrast, size=n)
  d2 = (yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2
  blob = contrast[:, None, None] * np.exp(-d2 / (2 * radius[:, None, None] ** 2))
  image += label[:, None, None] * blob

  # Group cues: one grating per attribute, random phase and jittered angle.
  for name, spec in params.attributes:
    theta = spec.orientation + rng.uniform(-0.35, 0.35, size=n)
    phase = rng.uniform(0, 2 * np.pi, size=n)
    amp = spec.strength * rng.uniform(0.5, 1.5, size=n)
    proj = np.cos(theta)[:, None, None] * xx[None] + np.sin(theta)[:, None, None] * yy[None]
    grating = amp[:, None, None] * np.cos(2 * np.pi * proj / spec.period + phase[:, None, None])
    image += attrs[name][:, None, None] * grating

  gain = rng.uniform(0.8, 1.2, size=n)
  offset = rng.normal(0.0, 0.3, size=n)
  image = offset[:, None, None] + gain[:, None, None] * image
  image += params.noise_sd * rng.standard_normal((n, s, s))
  pixels = np.clip(np.round(128 + _SCALE * image), 0, 255).astype(np.uint8)

  out = {
      "image": pixels[..., None],
      "label": label.astype(np.int64),
      "id": np.asarray([f"{split}-{i:06d}" for i in range(n)]),
  }
  out.update({k: v.astype(np.int64) for k, v in attrs.items()})
  return out


class SyntheticConfig(tfds.core.BuilderConfig):
  """A builder config named by the fingerprint of its parameters."""

  def __init__(self, params: SyntheticParams):
    super().__init__(
        name=f"p{params.fingerprint()}",
        description=json.dumps(dataclasses.asdict(params), sort_keys=True),
    )
    self.params = params


class Synthetic(tfds.core.GeneratorBasedBuilder):
  """The ncjax synthetic benchmark (procedural, deterministic)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Lesion blob on smooth texture, grating group cues."}
  # Configs made by `make_builder`, so TFDS knows them and does not warn
  # about a "custom data configuration" on every load.
  _CONFIGS: dict[str, SyntheticConfig] = {}

  @classmethod
  def get_builder_config(cls, name, version=None):
    return cls._CONFIGS.get(name) or super().get_builder_config(name, version)

  # Nothing is downloaded: keep TFDS's download lines off stdout.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def _info(self) -> tfds.core.DatasetInfo:
    p = self.builder_config.params
    features = {
        "image": tfds.features.Tensor(
            shape=(p.image_size, p.image_size, 1),
            dtype=np.uint8,
            encoding=tfds.features.Encoding.ZLIB,
        ),
        "label": tfds.features.Scalar(dtype=np.int64),
        "id": tfds.features.Text(),
    }
    for name, _ in p.attributes:
      features[name] = tfds.features.Scalar(dtype=np.int64)
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict(features),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split) for split in _SPLIT_INDEX}

  def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
    arrays = generate(self.builder_config.params, split)
    for i, example_id in enumerate(arrays["id"]):
      yield str(example_id), {k: v[i] for k, v in arrays.items()}


def make_builder(*, data_dir: str, params: SyntheticParams) -> Synthetic:
  params.validate()
  config = SyntheticConfig(params)
  Synthetic._CONFIGS[config.name] = config  # pylint: disable=protected-access
  return Synthetic(config=config, data_dir=data_dir, file_format="array_record")


datasets.register(
    "synthetic",
    datasets.DatasetEntry(
        make_builder=make_builder,
        attributes=("low", "medium", "high"),
        how_to_prepare="it is generated on first use",
        auto_prepare=True,
    ),
)
