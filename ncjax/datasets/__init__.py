"""Datasets as TensorFlow-free TFDS builders, loaded into host memory as numpy.

Every dataset (the procedural `synthetic` benchmark and the real `papila`,
`ham10000` and `chexpert`) is a TFDS `GeneratorBasedBuilder` that writes
array_record files; reading goes through `as_data_source`, so TensorFlow is
never imported. Builders register themselves in `BUILDERS` by name.

All builders share one record layout:
  image: uint8 H x W x C (fixed per dataset and builder config)
  label: int, 0/1 (1 = disease)
  one int field per binary attribute (e.g. `sex`, `age`)
  id:    str, a stable example id (patient / lesion id for real data)
  path:  str, real datasets only: the image path relative to MANUAL_DIR
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ncjax.errors import DataError

SPLITS = ("train", "validation", "test")
_NON_ATTRIBUTE_FIELDS = {"image", "label", "id", "path"}

# name -> (make_builder(data_dir, **kwargs) -> tfds builder, attribute names,
#          how to prepare it: a sentence for the error when it is missing)
BUILDERS: dict[str, DatasetEntry] = {}


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
  make_builder: Callable[..., Any]
  attributes: tuple[str, ...]
  how_to_prepare: str
  auto_prepare: bool = False  # procedurally generated: built on first use


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of a dataset in host memory, in the builder's stored order."""

  images: np.ndarray  # N x H x W x C uint8
  labels: np.ndarray  # N int32
  attributes: Mapping[str, np.ndarray]  # name -> N int32
  ids: np.ndarray  # N str

  def __len__(self) -> int:
    return len(self.labels)


def register(name: str, entry: DatasetEntry) -> None:
  BUILDERS[name] = entry


def _entry(name: str) -> DatasetEntry:
  _import_builders()
  if name not in BUILDERS:
    raise DataError(f"unknown dataset {name!r}; expected one of {sorted(BUILDERS)}")
  return BUILDERS[name]


def attributes(name: str) -> tuple[str, ...]:
  return _entry(name).attributes


def check_attribute(name: str, attribute: str) -> None:
  valid = attributes(name)
  if attribute not in valid:
    raise DataError(f"dataset {name!r} has no attribute {attribute!r}; valid: {list(valid)}")


def builder(name: str, data_dir: str, **kwargs: Any):
  """The TFDS builder of dataset `name` under `data_dir`."""
  return _entry(name).make_builder(data_dir=data_dir, **kwargs)


def ensure_prepared(name: str, *, data_dir: str, **builder_kwargs: Any):
  """The prepared builder: generated now if procedural, else DataError.

  Call it once before starting parallel readers: two processes generating
  the same dataset at once would race on its folder.
  """
  entry = _entry(name)
  b = entry.make_builder(data_dir=data_dir, **builder_kwargs)
  if not b.is_prepared():
    if not entry.auto_prepare:
      raise DataError(f"dataset {name!r} is not prepared in {data_dir}; " + entry.how_to_prepare)
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    tfds.disable_progress_bar()
    b.download_and_prepare(file_format="array_record")
  return b


def load_split(name: str, split: str, *, data_dir: str, **builder_kwargs: Any) -> Split:
  """Reads a whole split into host memory, sorted by example id.

  Procedurally generated datasets are prepared on first use; a real dataset
  that is not prepared raises `DataError` saying how to prepare it.
  """
  b = ensure_prepared(name, data_dir=data_dir, **builder_kwargs)
  source = b.as_data_source(split)
  records = source.__getitems__(list(range(len(source))))
  if not records:
    raise DataError(f"split {split!r} of dataset {name!r} is empty")
  # TFDS stores examples in a hash order; sort by id for a canonical order
  # that every later step (bias draws, batching) can rely on.
  records.sort(key=lambda r: (_text(r["id"]), _text(r.get("path", ""))))
  attr_names = sorted(set(records[0]) - _NON_ATTRIBUTE_FIELDS)
  attrs = {a: np.asarray([r[a] for r in records], np.int32) for a in attr_names}
  return Split(
      images=np.stack([r["image"] for r in records]),
      labels=np.asarray([r["label"] for r in records], np.int32),
      attributes=attrs,
      ids=np.asarray([_text(r["id"]) for r in records]),
  )


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _import_builders() -> None:
  """Imports the builder modules so that they register themselves."""
  # pylint: disable=import-outside-toplevel,unused-import
  from ncjax.datasets import chexpert, ham10000, papila, synthetic  # noqa: F401
