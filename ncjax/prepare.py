"""Prepares a downloaded dataset once: `python -m ncjax.prepare --dataset=NAME --manual_dir=DIR`.

Reads the dataset's published files from MANUAL_DIR, applies the cohort,
labels, attributes and splits of SPEC section 2, resizes every image once (on
all cores) and writes TF-free array_record files under --data_dir (default:
TFDS's, $TFDS_DATA_DIR or ~/tensorflow_datasets). Then prints the dataset in
the shape of the paper's Table 1. Errors in what was asked for print one line
and exit with status 2; a failed build leaves no prepared dataset behind.

  python -m ncjax.prepare --dataset=ham10000 --manual_dir=~/data/HAM10000
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from typing import Any

from absl import app, flags
from absl import logging as absl_logging

_DATASETS = ("papila", "ham10000", "chexpert")
_DATASET = flags.DEFINE_enum("dataset", None, _DATASETS, "Dataset to prepare.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Folder holding the dataset as downloaded.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where prepared datasets live (default: TFDS's).")
_SKIP_BAD_IMAGES = flags.DEFINE_bool(
    "skip_bad_images", False, "Leave out unreadable images instead of failing."
)
_IMAGE_SIZE = flags.DEFINE_string(
    "image_size", None, "Stored image size HxW (default: the dataset's)."
)
_NUM_WORKERS = flags.DEFINE_integer(
    "num_workers", None, "Processes decoding images (default: all cores)."
)
flags.mark_flags_as_required(["dataset", "manual_dir"])

_BATCH = 1024  # records read at a time by `summarize`


def default_data_dir() -> str:
  """TFDS's default data dir: $TFDS_DATA_DIR or ~/tensorflow_datasets."""
  return os.environ.get(
      "TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
  )


def prepare(
    name: str,
    manual_dir: str,
    data_dir: str | None = None,
    **builder_kwargs: Any,
):
  """Builds dataset `name` from `manual_dir`; returns its TFDS builder.

  `builder_kwargs` go to the builder (`image_size`, `skip_bad_images`,
  `num_workers`, `show_progress`). A dataset already prepared is kept. On any
  failure nothing prepared is left (TFDS removes its `incomplete.*` folder;
  the empty config folder around it is removed here).
  """
  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds

  from ncjax import datasets
  from ncjax.errors import DataError

  if name not in _DATASETS:
    raise DataError(f"cannot prepare {name!r}; expected one of {list(_DATASETS)}")
  manual = os.path.abspath(os.path.expanduser(manual_dir))
  if not os.path.isdir(manual):
    raise DataError(
        f"manual_dir {manual}: folder not found; expected the downloaded {name} files there"
    )
  data_dir = os.path.expanduser(data_dir or default_data_dir())
  builder = datasets.builder(name, data_dir, **builder_kwargs)
  if builder.is_prepared():
    absl_logging.info("%s is already prepared in %s", name, builder.data_dir)
    return builder
  try:
    # Nothing is downloaded; a temporary download_dir keeps TFDS's empty
    # downloads/ folder out of data_dir.
    with tempfile.TemporaryDirectory() as download_dir:
      builder.download_and_prepare(
          download_dir=download_dir,
          file_format="array_record",
          download_config=tfds.download.DownloadConfig(manual_dir=manual),
      )
  except BaseException:
    config_dir = builder.data_path.parent
    if config_dir.is_dir() and not any(config_dir.iterdir()):
      config_dir.rmdir()
    raise
  return builder


def summarize(name: str, data_dir: str, **builder_kwargs: Any) -> dict[str, Any]:
  """Counts of a prepared dataset in the shape of the paper's Table 1.

  Returns a dict: `dataset`, `data_dir`, `image_shape`, `samples`,
  `positives`, `splits` (split -> (images, positives)), `groups` (attribute ->
  [(group name, images, positives)] for groups 0 and 1), and the dataset's
  metadata (e.g. `skipped_images`).
  """
  # pylint: disable=import-outside-toplevel
  import numpy as np

  from ncjax import datasets
  from ncjax.errors import DataError

  builder = datasets.builder(name, data_dir, **builder_kwargs)
  if not builder.is_prepared():
    raise DataError(f"dataset {name!r} is not prepared in {data_dir}")
  features = builder.info.features
  attributes = datasets.attributes(name)
  columns = {"label": [], **{a: [] for a in attributes}}
  splits = {}
  for split in datasets.SPLITS:
    source = builder.as_data_source(split)
    labels = []
    for start in range(0, len(source), _BATCH):
      records = source.__getitems__(list(range(start, min(start + _BATCH, len(source)))))
      for key in columns:
        values = [int(r[key]) for r in records]
        columns[key].extend(values)
        if key == "label":
          labels.extend(values)
    splits[split] = (len(labels), int(np.sum(labels)))
  label = np.asarray(columns["label"])
  groups = {}
  for attribute in attributes:
    values = np.asarray(columns[attribute])
    names = features[attribute].names
    groups[attribute] = [
        (names[g], int(np.sum(values == g)), int(np.sum(label[values == g]))) for g in (0, 1)
    ]
  return {
      "dataset": name,
      "data_dir": os.fspath(builder.data_dir),
      "image_shape": tuple(features["image"].shape),
      "samples": int(label.size),
      "positives": int(label.sum()),
      "splits": splits,
      "groups": groups,
      "metadata": dict(builder.info.metadata or {}),
  }


def _percent(part: int, whole: int) -> str:
  """Three significant digits, as in the paper's Table 1 (6.47%, 30.4%)."""
  if whole == 0:
    return "-"
  x = 100.0 * part / whole
  decimals = 1 if x == 0 else max(0, 2 - int(math.floor(math.log10(x))))
  return f"{x:.{decimals}f}%"


def format_summary(summary: dict[str, Any]) -> str:
  """The summary as a text table: images, share and positive rate per row."""
  n = summary["samples"]
  shape = "x".join(str(v) for v in summary["image_shape"])
  lines = [
      f"{summary['dataset']}: {n} images of {shape} in {summary['data_dir']}",
      f"  {'':24s} {'images':>8s} {'share':>7s} {'positive':>9s} {'rate':>7s}",
  ]

  def row(title: str, count: int, positives: int) -> None:
    lines.append(
        f"  {title:24s} {count:8d} {_percent(count, n):>7s} "
        f"{positives:9d} {_percent(positives, count):>7s}"
    )

  row("samples", n, summary["positives"])
  for split, (count, positives) in summary["splits"].items():
    row(f"split {split}", count, positives)
  for attribute, groups in summary["groups"].items():
    for g, (group, count, positives) in enumerate(groups):
      row(f"G{g} {attribute}: {group}", count, positives)
  metadata = summary["metadata"]
  skipped = metadata.get("skipped_images", [])
  lines.append(f"  skipped unreadable images: {len(skipped)}")
  lines.extend(f"    {s['split']}: {s['path']} ({s['reason']})" for s in skipped)
  for key, value in sorted(metadata.items()):
    if key == "skipped_images":
      continue
    if isinstance(value, dict):  # counts by kind, e.g. by colour mode
      value = ", ".join(f"{k} {v}" for k, v in value.items()) or "none"
    lines.append(f"  {key.replace('_', ' ')}: {value}")
  return "\n".join(lines)


def _image_size(text: str | None) -> tuple[int, int] | None:
  from ncjax.errors import DataError  # pylint: disable=import-outside-toplevel

  if not text:
    return None
  try:
    height, width = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise DataError(f"--image_size={text!r}: expected HxW, e.g. 256x341") from None
  return height, width


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from ncjax.errors import NcjaxError  # pylint: disable=import-outside-toplevel

  # TFDS warns about custom configs and logs every file it writes; our own
  # bars show progress and the summary lists what was skipped.
  absl_logging.set_verbosity(absl_logging.ERROR)
  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds

  from ncjax import datasets

  tfds.disable_progress_bar()
  try:
    kwargs = dict(
        image_size=_image_size(_IMAGE_SIZE.value),
        skip_bad_images=_SKIP_BAD_IMAGES.value,
        num_workers=_NUM_WORKERS.value,
        show_progress=True,
    )
    data_dir = os.path.expanduser(_DATA_DIR.value or default_data_dir())
    existing = datasets.builder(_DATASET.value, data_dir, image_size=kwargs["image_size"])
    if existing.is_prepared():
      print(f"already prepared in {existing.data_dir}; delete it to rebuild")
    else:
      print(f"preparing {_DATASET.value} into {existing.data_dir}")
    prepare(_DATASET.value, _MANUAL_DIR.value, data_dir, **kwargs)
    summary = summarize(_DATASET.value, data_dir, image_size=kwargs["image_size"])
  except NcjaxError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(format_summary(summary))
  return 0


def run() -> None:
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()
