"""HAM10000 (dermoscopy), built from its published files.

MANUAL_DIR is the unpacked download (Harvard Dataverse or Kaggle):
  HAM10000_metadata.csv
  HAM10000_images_part_1/ISIC_0024306.jpg, ...
  HAM10000_images_part_2/ISIC_0029306.jpg, ...
Images are looked up by `image_id` in MANUAL_DIR itself and in every folder
directly under it named `HAM10000_images*` (any case) or `images`; when one
id is in several folders (Kaggle ships upper and lower case copies), the
first folder in sorted order wins.

The cohort follows SPEC section 2 (the subgroup-separability / MEDFAIR
preprocessing): rows without age or sex are dropped (10015 -> 9958); label = 1
for mel and akiec (bcc is 0); sex = 0 for `male`, else 1 (`unknown` counts as
1, as in SS; the count is kept in the metadata); age = 1 if int(age) > 60 (SS
puts 60 in group 0). Split by lesion: the sorted unique lesion ids go through
sklearn's train_test_split(test_size=0.2, random_state=0), the held-out part
again with test_size=0.5 into validation and test. Expected: 9958 images,
1438 positive; 7967 / 989 / 1002.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from etils import epath
from sklearn import model_selection

from ncjax import datasets
from ncjax.datasets import downloaded
from ncjax.errors import DataError

_METADATA = "HAM10000_metadata.csv"
_COLUMNS = ("lesion_id", "image_id", "dx", "age", "sex")
_DX = {"akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"}
_MALIGNANT = {"mel", "akiec"}


def image_folders(manual_dir: epath.Path) -> list[epath.Path]:
  """The folders that may hold the images, in lookup order."""
  folders = [manual_dir]
  for child in sorted(manual_dir.iterdir(), key=lambda p: p.name):
    name = child.name.lower()
    if child.is_dir() and (name.startswith("ham10000_images") or name == "images"):
      folders.append(child)
  return folders


def split_lesions(lesion_ids: np.ndarray) -> dict[str, str]:
  """lesion id -> split, as SS: np.unique, then train_test_split twice."""
  unique = np.unique(np.asarray(lesion_ids, dtype=object))
  train, rest = model_selection.train_test_split(
      unique, test_size=0.2, random_state=0
  )
  validation, test = model_selection.train_test_split(
      rest, test_size=0.5, random_state=0
  )
  split_of = {}
  for split, ids in (("train", train), ("validation", validation), ("test", test)):
    split_of.update(dict.fromkeys(ids, split))
  return split_of


class Ham10000(downloaded.DownloadedImageBuilder, skip_registration=True):
  """HAM10000 dermoscopy images: malignant (mel, akiec) vs rest, sex and age."""

  name = "ham10000"
  BUILDER_CONFIGS = [downloaded.image_config(256, 341, 3)]
  LABEL_NAMES = ("benign", "malignant")
  ATTRIBUTES = {"sex": ("male", "female"), "age": ("<=60", ">60")}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download HAM10000 from https://doi.org/10.7910/DVN/DBW86T and unpack "
      "it: MANUAL_DIR holds HAM10000_metadata.csv, HAM10000_images_part_1/ "
      "and HAM10000_images_part_2/."
  )
  DESCRIPTION = "HAM10000 dermoscopy images of pigmented skin lesions."
  HOMEPAGE = "https://doi.org/10.7910/DVN/DBW86T"
  CITATION = (
      "Tschandl, Rosendahl, Kittler. The HAM10000 dataset, a large collection "
      "of multi-source dermatoscopic images of common pigmented skin lesions. "
      "Scientific Data 5, 180161 (2018)."
  )

  def _read_cohort(self, manual_dir: epath.Path) -> pd.DataFrame:
    csv = downloaded.require_file(manual_dir, _METADATA, "HAM10000's metadata")
    meta = downloaded.read_csv(csv, _COLUMNS)
    meta = meta[meta["age"].notna() & meta["sex"].notna()]
    line = lambda i: f"{_METADATA} line {i + 2}"  # noqa: E731 (header = line 1)
    age = downloaded.to_numbers(meta["age"], line)
    dx = meta["dx"].to_numpy(dtype=object)
    bad_dx = [i for i, d in zip(meta.index, dx) if d not in _DX]
    if bad_dx:
      raise DataError(
          f"{line(bad_dx[0])}: dx {meta['dx'][bad_dx[0]]!r}, expected one of "
          f"{sorted(_DX)}"
      )
    sex = meta["sex"].to_numpy(dtype=object)
    self.info.metadata["sex_unknown_counted_as_female"] = int(
        np.sum((sex != "male") & (sex != "female"))
    )

    folders = image_folders(manual_dir)
    found: dict[str, str] = {}
    for folder in folders:
      for image in sorted(folder.glob("*.jpg"), key=lambda p: p.name):
        found.setdefault(image.stem, image.relative_to(manual_dir).as_posix())
    if not found:
      raise DataError(
          f"{manual_dir}: no ISIC_*.jpg images; expected them in "
          "HAM10000_images_part_1/ and HAM10000_images_part_2/"
      )
    searched = ", ".join(
        f"{f.relative_to(manual_dir).as_posix() or '.'}/" for f in folders
    )

    split_of = split_lesions(meta["lesion_id"].to_numpy(dtype=object))
    image_ids = meta["image_id"].astype(str)
    return pd.DataFrame({
        "split": [split_of[lesion] for lesion in meta["lesion_id"]],
        "path": [found.get(i, f"{i}.jpg") for i in image_ids],
        "problem": [None if i in found else f"not in {searched}" for i in image_ids],
        "label": np.isin(dx, list(_MALIGNANT)).astype(int),
        "id": meta["lesion_id"].astype(str).to_numpy(),
        "sex": (sex != "male").astype(int),
        # SS: age.astype(int), 0 for 0..60, 1 above.
        "age": (age.astype(int) > 60).astype(int),
    })


datasets.register(
    "ham10000",
    datasets.DatasetEntry(
        make_builder=Ham10000,
        attributes=tuple(Ham10000.ATTRIBUTES),
        how_to_prepare=(
            "download HAM10000 (https://doi.org/10.7910/DVN/DBW86T), unpack it "
            "to DIR (HAM10000_metadata.csv, HAM10000_images_part_1/, "
            "HAM10000_images_part_2/) and run: python -m ncjax.prepare "
            "--dataset=ham10000 --manual_dir=DIR --data_dir=<data_dir>"
        ),
    ),
)
