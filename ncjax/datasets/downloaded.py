"""What the builders of the downloaded datasets (PAPILA, HAM10000, CheXpert) share.

Each dataset module only turns its published tables into one cohort table
(`_read_cohort`: split, path, label, id, one column per attribute); this base
builder checks the files, decodes and resizes every image once (in a process
pool), accounts for images that cannot be read, and writes TF-free
array_record files through TFDS.

Hostile input, and what happens to it (every error is one `DataError` line
naming the file, the row or image and what was expected):
- Tables: a missing, empty (0 bytes) or unreadable file is an error; extra
  columns are ignored and columns may come in any order (they are found by
  name); a column the dataset uses that is missing, or appears twice, is an
  error (`check_columns`). A csv line with values in more fields than the
  header is an error (on the first data line pandas would silently shift
  every column by one); empty trailing fields are ignored. Row-level values
  outside their valid set are errors raised by the dataset module
  ("<file> <row>: <column> <value>, expected <valid values>", `bad_value`).
- Image files that are missing or empty (0 bytes) are found before anything
  is decoded and fail the build at once, all of them listed.
- Images that fail to decode (truncated, not an image, 16-bit or float
  pixels, which 8-bit conversion would clip) are collected over all splits
  and reported in one `DataError` at the end of the last split (so the user
  sees every bad file in one run).
- With `skip_bad_images` both kinds are left out instead and listed, with the
  reason, in the dataset's `metadata.json` under `skipped_images` (and in
  `ncjax.prepare`'s summary).
- A split none of whose images can be read fails the build either way (TFDS
  cannot write an empty split), listing the bad images found so far.
- Images in another 8-bit colour mode than the dataset's (grayscale in an RGB
  dataset, colour in a grayscale one, palette, alpha, CMYK) are converted as
  PIL converts them: gray is copied into R, G and B; colour becomes gray as
  L = 0.299 R + 0.587 G + 0.114 B (ITU-R 601-2); alpha is dropped, not
  composited. They are counted by their mode in the file under
  `converted_images_by_mode`. The file format is read from the content, so a
  PNG named `.jpg` is accepted.
- An image listed twice in the cohort is an error (TFDS keys examples by path).
- Paths may hold any unicode characters.

A failed build leaves nothing half-written: TFDS deletes its `incomplete.*`
directory and `ncjax.prepare` the empty config folder, while datasets and
image sizes prepared before in the same data_dir are untouched.
"""

from __future__ import annotations

import abc
import collections
import csv
import dataclasses
import functools
import math
import multiprocessing
import os
import re
import stat
import warnings
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

# Modes whose pixels are not 8-bit (I, I;16, I;16B, F): PIL's conversion to L
# or RGB clips them to 255 instead of scaling, so they are refused.
_NOT_8_BIT = ("I", "F")


def decode_image(path: str, shape: tuple[int, int, int], fit: str) -> tuple[np.ndarray, str]:
  """Decodes an image file into a uint8 H x W x C array of exactly `shape`.

  Args:
    path: the image file, in any format PIL reads (found from the content).
    shape: (height, width, channels), channels 1 (grayscale) or 3 (RGB).
    fit: "cover": scale (keeping aspect) until the image covers height x width,
      then center crop; "stretch": resize to height x width, aspect not kept.

  Returns:
    The resized image, and the file's PIL colour mode (converted if it is not
    "L" for 1 channel or "RGB" for 3). Images of any size are accepted.

  Raises:
    OSError, ValueError, SyntaxError: the file is not a whole 8-bit image.
  """
  height, width, channels = shape
  mode = "L" if channels == 1 else "RGB"
  with Image.open(path) as image:
    source_mode = image.mode
    if source_mode.startswith(_NOT_8_BIT):
      raise ValueError(
          f"mode {source_mode} (16-bit or float pixels), expected 8-bit grayscale or colour"
      )
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
  return (array[..., None] if channels == 1 else array), source_mode


def load_image(path: str, shape: tuple[int, int, int], fit: str) -> np.ndarray:
  """The image of `decode_image`, without its mode."""
  return decode_image(path, shape, fit)[0]


def _try_load(
    path: str, shape: tuple[int, int, int], fit: str
) -> tuple[np.ndarray | None, str | None, str | None]:
  """`decode_image` as (image, None, mode), or (None, why, None) if it fails."""
  try:
    image, mode = decode_image(path, shape, fit)
    return image, None, mode
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    # PIL signals unreadable files with OSError (truncated, unidentified),
    # ValueError or SyntaxError (broken headers).
    return None, one_line(f"{type(e).__name__}: {e}"), None


def file_problem(path: str) -> str | None:
  """Why the file `path` cannot be an image, seen without decoding it; or None."""
  try:
    status = os.stat(path)
  except OSError:
    return "file not found"
  if not stat.S_ISREG(status.st_mode):
    return "not a file"
  if status.st_size == 0:
    return "empty file, 0 bytes"
  return None


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

# Ages outside 0..MAX_AGE years are errors, not an age group.
MAX_AGE = 120


def one_line(text: str) -> str:
  """`text` with its line breaks (e.g. of a parser's message) as spaces."""
  return " ".join(str(text).split())


def show(value: Any) -> str:
  """A table cell as an error message shows it: 7, 'X', or empty."""
  if value is None or (isinstance(value, float | np.floating) and math.isnan(value)):
    return "empty"
  if isinstance(value, float | np.floating) and float(value).is_integer():
    return str(int(value))
  return repr(value) if isinstance(value, str) else str(value)


def bad_value(where: str, column: str, value: Any, expected: str) -> DataError:
  """The error for one cell: "<where>: <column> <value>, expected <expected>"."""
  return DataError(f"{where}: {column} {show(value)}, expected {expected}")


def require_file(manual_dir: epath.Path, relative: str, what: str) -> epath.Path:
  """The file `relative` under `manual_dir`, or a `DataError` saying what it is."""
  path = manual_dir / relative
  problem = file_problem(os.fspath(path))
  if problem is not None:
    raise DataError(f"{path}: {problem}; expected {what}")
  return path


def check_columns(
    table: pd.DataFrame,
    columns: Sequence[str],
    source: os.PathLike | str,
    names: Sequence[Any] | None = None,
) -> None:
  """A `DataError` naming `source` unless `table` has each of `columns` once.

  Other columns, and the order of all of them, do not matter.

  Args:
    table: the table read.
    columns: the column names the dataset uses.
    source: the file (and where in it the names are), for the message.
    names: the column names as written in the file, when the reader renamed
      repeated ones (pandas reads a second `Age` as `Age.1`); default: the
      table's.
  """
  names = list(table.columns if names is None else names)
  missing = [c for c in columns if c not in names]
  if missing:
    raise DataError(f"{source}: missing column(s) {missing}; found {names}")
  for column in columns:
    if names.count(column) > 1:
      raise DataError(
          f"{source}: column {column!r} appears {names.count(column)} times; expected it once"
      )


def _csv_header(path: epath.Path) -> list[str]:
  """The column names in the first line of a csv file, as written."""
  with open(os.fspath(path), newline="", encoding="utf-8-sig") as f:
    return next(csv.reader(f), [])


def _long_line(path: epath.Path, width: int) -> str | None:
  """Where the first csv record with a value beyond field `width` is, or None.

  Empty surplus fields (trailing commas) are ignored.
  """
  with open(os.fspath(path), newline="", encoding="utf-8-sig") as f:
    reader = csv.reader(f)
    for fields in reader:
      if any(field.strip() for field in fields[width:]):
        return f"line {reader.line_num}: {len(fields)} fields"
  return None


def read_csv(path: epath.Path, columns: Sequence[str], **kwargs: Any) -> pd.DataFrame:
  """A csv table that must have each of `columns` once (more are ignored).

  A line with values in more fields than the header has is an error: pandas
  would drop them or, when it is the first data line, silently take the first
  column as the index and shift every other column by one. Empty surplus
  fields (trailing commas) are ignored.
  """
  expected = "expected a header line of column names, then one line per row"
  too_long = None
  try:
    header = _csv_header(path)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always", pd.errors.ParserWarning)
      table = pd.read_csv(path, index_col=False, **kwargs)
    if any(issubclass(w.category, pd.errors.ParserWarning) for w in caught):
      too_long = _long_line(path, len(header))
  except pd.errors.ParserError as e:
    too_long = _long_line(path, len(header))
    if too_long is None:
      raise DataError(f"{path}: not a readable csv table ({one_line(e)}); {expected}") from e
  except (ValueError, OSError, UnicodeDecodeError, csv.Error) as e:
    raise DataError(f"{path}: not a readable csv table ({one_line(e)}); {expected}") from e
  if too_long is not None:
    raise DataError(
        f"{path} {too_long}, expected at most {len(header)}, one per column of the header line"
    )
  check_columns(table, columns, path, names=header)
  return table


def read_excel(path: epath.Path, **kwargs: Any) -> pd.DataFrame:
  """The first sheet of an xlsx file."""
  try:
    return pd.read_excel(path, engine="openpyxl", **kwargs)
  except (ValueError, OSError, KeyError, zipfile.BadZipFile) as e:
    raise DataError(
        f"{path}: not a readable xlsx table ({one_line(e)}); expected an Excel workbook"
    ) from e


def header_from_first_row(
    raw: pd.DataFrame, columns: Sequence[str], source: os.PathLike | str
) -> pd.DataFrame:
  """`raw` (read without a header) with its first row as the column names.

  Unlike pandas' own header, repeated names are kept as written, so
  `check_columns` can report them.
  """
  if raw.empty:
    raise DataError(f"{source}: no rows; expected a row of column names")
  names = list(raw.iloc[0])
  check_columns(raw, columns, source, names=names)
  table = raw.iloc[1:].copy()
  table.columns = names
  return table.infer_objects()


def to_numbers(
    values: pd.Series, where: Callable[[Any], str], expected: str = "a number"
) -> np.ndarray:
  """float64 values of column `values.name` (NaN where empty).

  Args:
    values: the column, indexed by what `where` turns into a row's name.
    where: index label -> where the row is (file and row), for the message.
    expected: what the values should be, for the message.

  Raises:
    DataError: a value is not a number.
  """
  numbers = pd.to_numeric(values, errors="coerce").to_numpy(np.float64)
  bad = np.flatnonzero(np.isnan(numbers) & values.notna().to_numpy())
  if len(bad):
    label = values.index[bad[0]]
    raise bad_value(where(label), str(values.name), values.iloc[bad[0]], expected)
  return numbers


def check_ages(
    ages: np.ndarray,
    labels: Sequence[Any],
    where: Callable[[Any], str],
    column: str,
    allow_empty: bool = False,
) -> None:
  """A `DataError` for the first age that is empty or outside 0..MAX_AGE.

  Args:
    ages: ages in years (NaN for empty cells).
    labels: the row of each age, as `where` takes it.
    where: row -> where the row is (file and row), for the message.
    column: the age column's name.
    allow_empty: whether NaN is accepted (rows dropped elsewhere).
  """
  expected = f"an age in years, 0 to {MAX_AGE}"
  empty = np.isnan(ages)
  bad = (ages < 0) | (ages > MAX_AGE) | (empty & (not allow_empty))
  if bad.any():
    i = int(np.flatnonzero(bad)[0])
    raise bad_value(where(labels[i]), column, ages[i], expected)


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


class DownloadedImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
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
    self._converted: collections.Counter[str] = collections.Counter()
    self._manual_dir: epath.Path | None = None
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

  @property
  def _mode(self) -> str:
    """The PIL mode of the stored images."""
    return "L" if self.image_shape[2] == 1 else "RGB"

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
    self._converted = collections.Counter()
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
    self._manual_dir = manual_dir
    cohort = self._read_cohort(manual_dir).reset_index(drop=True)
    check_columns(
        cohort,
        ["split", "path", "label", "id", *self.ATTRIBUTES],
        f"{self.name} cohort",
    )
    repeated = cohort["path"][cohort["path"].duplicated()]
    if len(repeated):  # TFDS keys examples by path
      raise DataError(
          f"{self.name}: image {repeated.iloc[0]} is listed twice; expected each image once"
      )
    if "problem" not in cohort:
      cohort["problem"] = None
    # Missing and empty files fail the build before anything is decoded.
    unreadable = {}
    for path, problem in zip(cohort["path"], cohort["problem"], strict=True):
      if not isinstance(problem, str):
        problem = file_problem(os.fspath(manual_dir / path))
      if isinstance(problem, str):
        unreadable[path] = problem
    if unreadable and not self._skip_bad_images:
      raise DataError(
          f"{len(unreadable)} image(s) missing or empty under {manual_dir}: "
          + _list(list(unreadable.items()))
          + "; expected the image files of the published layout; pass "
          "--skip_bad_images to leave them out"
      )
    generators = {}
    for split in datasets.SPLITS:
      rows = cohort[cohort["split"] == split]
      if rows.empty:
        raise DataError(f"{self.name}: split {split!r} has no images")
      generators[split] = self._generate_examples(rows, manual_dir, unreadable, split)
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
      self._bad_images.append({"split": split, "path": path, "reason": unreadable[path]})
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
    yielded = 0
    with progress:
      images = _load_all(files, load, self._pool)
      for record, (image, error, mode) in zip(records, images, strict=True):
        progress.update()
        if error is not None:
          self._bad_images.append({"split": split, "path": record["path"], "reason": error})
          continue
        if mode != self._mode:
          self._converted[mode] += 1
        example = {
            "image": image,
            "label": int(record["label"]),
            "id": str(record["id"]),
            "path": record["path"],
        }
        example.update({a: int(record[a]) for a in attributes})
        yielded += 1
        yield record["path"], example
    # TFDS generates the splits one after the other, in order: after the last
    # one every bad image is known. A split left empty stops here (TFDS cannot
    # write it), with the bad images found so far.
    if not yielded:
      self._finish(empty_split=split)
    if split == datasets.SPLITS[-1]:
      self._finish()

  def _finish(self, empty_split: str | None = None) -> None:
    """Fails the build on bad images, or records skipped and converted ones.

    Args:
      empty_split: a split none of whose images could be read: the build
        fails either way.
    """
    bad = self._bad_images
    if bad and not self._skip_bad_images:
      stopped = ""
      if empty_split is not None:
        stopped = f" (split {empty_split!r} has no readable image, later splits are unchecked)"
      raise DataError(
          f"{len(bad)} image(s) could not be read{stopped}: "
          + _list([(b["path"], b["reason"]) for b in bad])
          + f"; expected whole 8-bit images under {self._manual_dir}; fix or "
          "remove them, or pass --skip_bad_images to leave them out"
      )
    if empty_split is not None:
      raise DataError(
          f"{self.name}: no image of split {empty_split!r} could be read "
          f"(skipped: {_list([(b['path'], b['reason']) for b in bad])}); "
          "expected at least one readable image per split"
      )
    self.info.metadata["skipped_images"] = list(bad)
    if bad:
      logging.warning("%s: skipped %d unreadable image(s)", self.name, len(bad))
    converted = dict(sorted(self._converted.items()))
    self.info.metadata["converted_images_by_mode"] = converted
    if converted:
      logging.warning(
          "%s: converted %d image(s) to %s: %s",
          self.name,
          sum(converted.values()),
          self._mode,
          ", ".join(f"{n} from {m}" for m, n in converted.items()),
      )


def _usable_cpus() -> int:
  if hasattr(os, "sched_getaffinity"):  # Linux: the cores this process may use
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def _list(items: Sequence[tuple[str, str]]) -> str:
  listed = ", ".join(f"{path} ({why})" for path, why in items[:_MAX_LISTED])
  more = len(items) - _MAX_LISTED
  return listed + (f" and {more} more" if more > 0 else "")
