"""What the builders of the downloaded datasets (PAPILA, HAM10000, CheXpert) share.

Each dataset module only turns its published tables into one cohort table
(`_read_cohort`: split, path, label, id, one column per attribute); this base
builder checks the files, decodes and resizes every image once (in a process
pool), accounts for images that cannot be read, and writes TF-free
array_record files through TFDS.

Images that fail to decode are collected over all splits and reported in one
`DataError` at the end of the last split (so the user sees every bad file in
one run); TFDS then deletes its `incomplete.*` directory, so a failed build
leaves no prepared dataset. With `skip_bad_images` they are left out and listed
in the dataset's `metadata.json` under `skipped_images`.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import multiprocessing
import os
import re
import zipfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import tensorflow_datasets as tfds
import tqdm
from absl import logging
from etils import epath
from PIL import Image

from ncjax import datasets
from ncjax.errors import DataError

# Bad images named in one error message; the rest are counted.
_MAX_LISTED = 10


# --- images -----------------------------------------------------------------


def load_image(path: str, shape: tuple[int, int, int], fit: str) -> np.ndarray:
  """Decodes an image file into a uint8 H x W x C array of exactly `shape`.

  Args:
    path: the image file.
    shape: (height, width, channels), channels 1 (grayscale) or 3 (RGB).
    fit: "cover": scale (keeping aspect) until the image covers height x width,
      then center crop; "stretch": resize to height x width, aspect not kept.

  Returns:
    The resized image. Images of any size are accepted.
  """
  height, width, channels = shape
  mode = "L" if channels == 1 else "RGB"
  with Image.open(path) as image:
    # JPEG decoders can downscale by 1/2..1/8 while decoding: much faster, and
    # the result stays at least as large as requested.
    image.draft(mode, (width, height))
    image = image.convert(mode)
  w, h = image.size
  if fit == "cover":
    scale = max(height / h, width / w)
    size = (max(width, round(w * scale)), max(height, round(h * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    image = image.crop((left, top, left + width, top + height))
  elif fit == "stretch":
    image = image.resize((width, height), Image.Resampling.BILINEAR)
  else:
    raise ValueError(f"unknown fit {fit!r}")
  array = np.asarray(image, dtype=np.uint8)
  return array[..., None] if channels == 1 else array


def _try_load(
    path: str, shape: tuple[int, int, int], fit: str
) -> tuple[np.ndarray | None, str | None]:
  """`load_image`, returning the error as text instead of raising it."""
  try:
    return load_image(path, shape, fit), None
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    # PIL signals unreadable files with OSError (truncated, unidentified),
    # ValueError or SyntaxError (broken headers).
    return None, f"{type(e).__name__}: {e}".splitlines()[0]


def _load_all(
    paths: Sequence[str], load: Any, pool: Any
) -> Iterator[tuple[np.ndarray | None, str | None]]:
  """`load(path)` for every path, in order, in `pool` (or here if None)."""
  if pool is None:
    yield from map(load, paths)
    return
  # Chunks keep memory bounded when writing is slower than decoding; the next
  # chunk decodes while the current one is written.
  chunk = 512
  pending = pool.map_async(load, paths[:chunk], chunksize=8)
  for start in range(0, len(paths), chunk):
    results = pending.get()
    following = paths[start + chunk : start + 2 * chunk]
    if following:
      pending = pool.map_async(load, following, chunksize=8)
    yield from results


# --- tables -----------------------------------------------------------------


def require_file(manual_dir: epath.Path, relative: str, what: str) -> epath.Path:
  """The file `relative` under `manual_dir`, or a `DataError` saying what it is."""
  path = manual_dir / relative
  if not path.is_file():
    raise DataError(f"{path}: file not found; expected {what}")
  return path


def check_columns(
    table: pd.DataFrame, columns: Sequence[str], source: os.PathLike | str
) -> None:
  """A `DataError` naming `source` unless `table` has all `columns`."""
  missing = [c for c in columns if c not in table.columns]
  if missing:
    raise DataError(
        f"{source}: missing column(s) {missing}; found {list(table.columns)}"
    )


def read_csv(
    path: epath.Path, columns: Sequence[str], **kwargs: Any
) -> pd.DataFrame:
  """A csv table that must have `columns`."""
  try:
    table = pd.read_csv(path, **kwargs)
  except (ValueError, OSError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: not a readable csv table ({e})") from e
  check_columns(table, columns, path)
  return table


def read_excel(path: epath.Path, **kwargs: Any) -> pd.DataFrame:
  """The first sheet of an xlsx file."""
  try:
    return pd.read_excel(path, engine="openpyxl", **kwargs)
  except (ValueError, OSError, KeyError, zipfile.BadZipFile) as e:
    raise DataError(f"{path}: not a readable xlsx table ({e})") from e


def to_numbers(values: pd.Series, what: Callable[[Any], str]) -> np.ndarray:
  """float64 values; `what(label)` names a row whose value is not a number."""
  numbers = pd.to_numeric(values, errors="coerce").to_numpy(np.float64)
  bad = np.flatnonzero(np.isnan(numbers) & values.notna().to_numpy())
  if len(bad):
    label = values.index[bad[0]]
    raise DataError(f"{what(label)}: {values.iloc[bad[0]]!r} is not a number")
  return numbers


# --- the builder --------------------------------------------------------------


@dataclasses.dataclass
class ImageConfig(tfds.core.BuilderConfig):
  """A stored image size; the config name is "HxW"."""

  image_shape: tuple[int, int, int] = (256, 341, 3)


def image_config(height: int, width: int, channels: int) -> ImageConfig:
  return ImageConfig(
      name=f"{height}x{width}",
      description=f"images resized to {height}x{width}x{channels}",
      image_shape=(height, width, channels),
  )


class DownloadedImageBuilder(
    tfds.core.GeneratorBasedBuilder, skip_registration=True
):
  """A dataset read from its published files in MANUAL_DIR.

  Subclasses set the class attributes and implement `_read_cohort`.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First version."}
  CHANNELS: ClassVar[int] = 3
  FIT: ClassVar[str] = "cover"  # see `load_image`
  LABEL_NAMES: ClassVar[tuple[str, str]] = ("healthy", "disease")
  # attribute -> names of groups 0 and 1
  ATTRIBUTES: ClassVar[dict[str, tuple[str, str]]] = {}
  DESCRIPTION: ClassVar[str] = ""
  HOMEPAGE: ClassVar[str] = ""
  CITATION: ClassVar[str] = ""

  def __init__(
      self,
      *,
      image_size: tuple[int, int] | None = None,
      skip_bad_images: bool = False,
      num_workers: int | None = None,
      show_progress: bool = False,
      **kwargs: Any,
  ):
    """Args beyond TFDS's (`data_dir`, ...):

    Args:
      image_size: (height, width) of the stored images (default: the
        default config's); each size is stored as its own config "HxW".
      skip_bad_images: leave out images that fail to decode (listed in the
        metadata) instead of failing the build.
      num_workers: processes decoding images (default: all cores).
      show_progress: a progress bar per split while building.
    """
    if image_size is not None:
      height, width = (int(v) for v in image_size)
      if height < 1 or width < 1:
        raise DataError(f"image_size must be positive, got {image_size}")
      kwargs["config"] = f"{height}x{width}"
    self._skip_bad_images = skip_bad_images
    self._num_workers = num_workers or _usable_cpus()
    self._show_progress = show_progress
    self._bad_images: list[dict[str, str]] = []
    self._pool = None
    super().__init__(**kwargs)

  @classmethod
  def get_builder_config(
      cls, name: str, version: str | tfds.core.Version | None = None
  ) -> tfds.core.BuilderConfig | None:
    # Any "HxW" is a valid config: each stored size lives in its own folder.
    config = super().get_builder_config(name, version)
    if config is None and re.fullmatch(r"[1-9]\d*x[1-9]\d*", name):
      height, width = (int(v) for v in name.split("x"))
      config = image_config(height, width, cls.CHANNELS)
    return config

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return self.builder_config.image_shape

  def _info(self) -> tfds.core.DatasetInfo:
    features = {
        "image": tfds.features.Tensor(
            shape=self.image_shape,
            dtype=np.uint8,
            encoding=tfds.features.Encoding.ZLIB,
        ),
        "label": tfds.features.ClassLabel(names=list(self.LABEL_NAMES)),
        "id": tfds.features.Text(),
        "path": tfds.features.Text(),
    }
    for attribute, groups in self.ATTRIBUTES.items():
      features[attribute] = tfds.features.ClassLabel(names=list(groups))
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict(features),
        homepage=self.HOMEPAGE,
        citation=self.CITATION,
        metadata=tfds.core.MetadataDict(),
    )

  @abc.abstractmethod
  def _read_cohort(self, manual_dir: epath.Path) -> pd.DataFrame:
    """The cohort: one row per image, after the dataset's filters.

    Columns: `split` (one of `datasets.SPLITS`), `path` (relative to
    `manual_dir`, posix), `label`, `id`, one int column per attribute, and
    optionally `problem` (why the image cannot be read, or None).
    """

  # TFDS prints download sizes and a "downloaded" line to stdout; nothing is
  # downloaded here and `ncjax.prepare` reports for itself.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def _download_and_prepare(
      self,
      dl_manager: tfds.download.DownloadManager,
      download_config: tfds.download.DownloadConfig,
  ) -> None:
    # One decoding pool for all splits, gone when generation ends or fails.
    # spawn, not fork: the parent may hold threads (JAX, TFDS) a fork copies.
    self._bad_images = []
    if self._num_workers <= 1:
      return super()._download_and_prepare(dl_manager, download_config)
    context = multiprocessing.get_context("spawn")
    with context.Pool(self._num_workers) as self._pool:
      try:
        return super()._download_and_prepare(dl_manager, download_config)
      finally:
        self._pool = None

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    try:
      manual_dir = dl_manager.manual_dir
    except AssertionError as e:  # TFDS's way to say it is missing or empty
      raise DataError(str(e).splitlines()[0]) from e
    cohort = self._read_cohort(manual_dir).reset_index(drop=True)
    check_columns(
        cohort,
        ["split", "path", "label", "id", *self.ATTRIBUTES],
        f"{self.name} cohort",
    )
    repeated = cohort["path"][cohort["path"].duplicated()]
    if len(repeated):  # TFDS keys examples by path
      raise DataError(f"{self.name}: image {repeated.iloc[0]} listed twice")
    if "problem" not in cohort:
      cohort["problem"] = None
    unreadable = {}
    for path, problem in zip(cohort["path"], cohort["problem"]):
      if not isinstance(problem, str) and not (manual_dir / path).is_file():
        problem = "file not found"
      if isinstance(problem, str):
        unreadable[path] = problem
    if unreadable and not self._skip_bad_images:
      raise DataError(
          f"{len(unreadable)} image(s) missing under {manual_dir}: "
          + _list(list(unreadable.items()))
          + "; pass --skip_bad_images to leave them out"
      )
    generators = {}
    for split in datasets.SPLITS:
      rows = cohort[cohort["split"] == split]
      if rows.empty:
        raise DataError(f"{self.name}: split {split!r} has no images")
      generators[split] = self._generate_examples(
          rows, manual_dir, unreadable, split
      )
    return generators

  def _generate_examples(
      self,
      rows: pd.DataFrame,
      manual_dir: epath.Path,
      unreadable: dict[str, str],
      split: str,
  ) -> Iterator[tuple[str, dict[str, Any]]]:
    skipped = rows["path"].isin(list(unreadable))
    for path in rows["path"][skipped]:
      self._bad_images.append(
          {"split": split, "path": path, "reason": unreadable[path]}
      )
    rows = rows[~skipped]
    load = functools.partial(_try_load, shape=self.image_shape, fit=self.FIT)
    files = [os.fspath(manual_dir / p) for p in rows["path"]]
    attributes = list(self.ATTRIBUTES)
    records = rows[["path", "label", "id", *attributes]].to_dict("records")
    progress = tqdm.tqdm(
        total=len(files),
        desc=f"{self.name} {split}",
        unit=" images",
        disable=not self._show_progress,
    )
    with progress:
      images = _load_all(files, load, self._pool)
      for record, (image, error) in zip(records, images):
        progress.update()
        if error is not None:
          self._bad_images.append(
              {"split": split, "path": record["path"], "reason": error}
          )
          continue
        example = {
            "image": image,
            "label": int(record["label"]),
            "id": str(record["id"]),
            "path": record["path"],
        }
        example.update({a: int(record[a]) for a in attributes})
        yield record["path"], example
    # TFDS generates the splits one after the other, in order: after the last
    # one every bad image is known.
    if split == datasets.SPLITS[-1]:
      self._finish()

  def _finish(self) -> None:
    """Fails the build on bad images, or records the skipped ones."""
    bad = self._bad_images
    if bad and not self._skip_bad_images:
      raise DataError(
          f"{len(bad)} image(s) could not be read: "
          + _list([(b["path"], b["reason"]) for b in bad])
          + "; fix or remove them, or pass --skip_bad_images to leave them out"
      )
    self.info.metadata["skipped_images"] = list(bad)
    if bad:
      logging.warning("%s: skipped %d unreadable image(s)", self.name, len(bad))


def _usable_cpus() -> int:
  if hasattr(os, "sched_getaffinity"):  # Linux: the cores this process may use
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def _list(items: Sequence[tuple[str, str]]) -> str:
  listed = ", ".join(f"{path} ({why})" for path, why in items[:_MAX_LISTED])
  more = len(items) - _MAX_LISTED
  return listed + (f" and {more} more" if more > 0 else "")
