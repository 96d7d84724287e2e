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

Validation and counted handling (errors are one-line `DataError`s naming the
csv line, the column and the valid values):
- rows without age or sex are dropped, as in the reference, and counted
  (`rows_without_age_or_sex_dropped` in the metadata);
- sex must be male, female or unknown (unknown counts as female, counted in
  `sex_unknown_counted_as_female`); dx one of the seven diagnoses; age a
  number of years in 0..120; lesion_id and image_id non-empty;
- an image_id listed twice is an error (naming both lines); an image found in
  several image folders is taken from the first (the Kaggle copy ships every
  image twice) and counted in `images_in_several_folders`;
- columns are found by name: extra ones are ignored and the order is free,
  but a used column written twice, or a line with more fields than the
  header, is an error.
Images: see `downloaded` (missing, empty or undecodable files fail the build
or, with --skip_bad_images, are skipped and listed; grayscale or other colour
modes are converted to RGB and counted).
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
_SEX = {"male", "female", "unknown"}


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
  train, rest = model_selection.train_test_split(unique, test_size=0.2, random_state=0)
  validation, test = model_selection.train_test_split(rest, test_size=0.5, random_state=0)
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
    meta = downloaded.read_csv(csv, _COLUMNS)[list(_COLUMNS)]
    line = lambda i: f"{_METADATA} line {i + 2}"  # noqa: E731 (header = line 1)
    examples = {"lesion_id": "HAM_0000118", "image_id": "ISIC_0027419"}
    for column, example in examples.items():
      empty = meta[column].isna() | (meta[column].astype(str).str.strip() == "")
      if empty.any():
        raise downloaded.bad_value(line(empty.idxmax()), column, None, f"an id like {example}")
    repeated = meta["image_id"].duplicated()
    if repeated.any():
      i = repeated.idxmax()
      first = meta.index[meta["image_id"] == meta["image_id"][i]][0]
      raise DataError(
          f"{line(i)}: image_id {meta['image_id'][i]!r} again (first on line "
          f"{first + 2}); expected one row per image"
      )

    # The reference drops rows without age or sex (10015 -> 9958).
    kept = meta["age"].notna() & meta["sex"].notna()
    self.info.metadata["rows_without_age_or_sex_dropped"] = int((~kept).sum())
    meta = meta[kept]
    years = f"an age in years, 0 to {downloaded.MAX_AGE}"
    age = downloaded.to_numbers(meta["age"], line, years)
    downloaded.check_ages(age, list(meta.index), line, "age")
    for column, valid in (("dx", _DX), ("sex", _SEX)):
      bad = ~meta[column].isin(list(valid))
      if bad.any():
        i = bad.idxmax()
        raise downloaded.bad_value(line(i), column, meta[column][i], f"one of {sorted(valid)}")
    dx = meta["dx"].to_numpy(dtype=object)
    sex = meta["sex"].to_numpy(dtype=object)
    self.info.metadata["sex_unknown_counted_as_female"] = int(np.sum(sex == "unknown"))

    folders = image_folders(manual_dir)
    found: dict[str, str] = {}
    in_several = set()
    for folder in folders:
      for image in sorted(folder.glob("*.jpg"), key=lambda p: p.name):
        if image.stem in found:
          in_several.add(image.stem)
        found.setdefault(image.stem, image.relative_to(manual_dir).as_posix())
    if not found:
      raise DataError(
          f"{manual_dir}: no ISIC_*.jpg images; expected them in "
          "HAM10000_images_part_1/ and HAM10000_images_part_2/"
      )
    self.info.metadata["images_in_several_folders"] = len(in_several)
    searched = ", ".join(f"{f.relative_to(manual_dir).as_posix() or '.'}/" for f in folders)

    split_of = split_lesions(meta["lesion_id"].to_numpy(dtype=object))
    image_ids = meta["image_id"].astype(str)
    return pd.DataFrame(
        {
            "split": [split_of[lesion] for lesion in meta["lesion_id"]],
            "path": [found.get(i, f"{i}.jpg") for i in image_ids],
            "problem": [None if i in found else f"not in {searched}" for i in image_ids],
            "label": np.isin(dx, list(_MALIGNANT)).astype(int),
            "id": meta["lesion_id"].astype(str).to_numpy(),
            "sex": (sex != "male").astype(int),
            # SS: age.astype(int), 0 for 0..60, 1 above.
            "age": (age.astype(int) > 60).astype(int),
        }
    )


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
