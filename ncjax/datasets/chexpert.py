"""CheXpert (chest X-ray), built from its published files.

MANUAL_DIR holds:
  CheXpert-v1.0-small/ or CheXpert-v1.0/   the unpacked release: train.csv and
                                           the images; the csv's `Path`
                                           column is relative to MANUAL_DIR
  CHEXPERT DEMO.xlsx                       the demographics (Stanford AIMI)
  chexpert_split_2021_08_20.csv            the 60/10/30 split of Glocker et
                                           al. (biomedia-mira/chexploration)
When both releases are there, the full-resolution CheXpert-v1.0 is used.

The cohort follows SPEC section 2 (the chexploration sample + the
subgroup-separability relabelling): rows of train.csv that the split file
assigns (its `index` column = train.csv row number); patient = third
component of `Path`; inner join with the demographics on the patient; race
"Black" if it contains Black, else "White" if it contains White, else "Asian"
if it contains Asian, others dropped; ethnicity non-Hispanic only; frontal
views only. Label = 0 if `No Finding` == 1 else 1 (any finding); sex from
train.csv (Female = 1); age = 1 if Age >= 60; race = 0 White, 1 Asian or
Black. Images are grayscale, resized to 224 x 224 (aspect not kept). Expected:
127118 images, 116202 positive; 76205 / 12673 / 38240.

Validation (one-line `DataError`s naming the file, the line, the column and
the valid values; a line is the csv's, header = line 1):
- split file: `index` must be a row of train.csv, each at most once; `split`
  one of train, validate, test (empty: not in the cohort, as the reference);
- train.csv rows with a split: a Path at most once, of the form
  <release>/<split>/patientXXXXX/...; Frontal/Lateral Frontal or Lateral;
- cohort rows (after the demographic filters): Sex Male or Female, Age a
  number of years in 0..120 (empty is an error), No Finding 1, 0, -1 or
  empty;
- demographics: a PATIENT at most once; race and ethnicity are free text
  filtered as above (other values leave the cohort, as in the reference);
- columns are found by name in every table: extra ones (whatever their name)
  are ignored and the order is free, but a used column written twice, or a
  csv line with more fields than the header, is an error.
Images: see `downloaded` (missing, empty or undecodable files fail the build
or, with --skip_bad_images, are skipped and listed; colour images, RGBA or
palette files are converted to grayscale and counted).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from absl import logging
from etils import epath

from ncjax import datasets
from ncjax.datasets import downloaded
from ncjax.errors import DataError

_RELEASES = ("CheXpert-v1.0", "CheXpert-v1.0-small")  # in order of preference
_DEMO = "CHEXPERT DEMO.xlsx"
_SPLIT_FILE = "chexpert_split_2021_08_20.csv"
_TRAIN_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "No Finding")
_DEMO_COLUMNS = ("PATIENT", "PRIMARY_RACE", "ETHNICITY")
_NON_HISPANIC = ("Non-Hispanic/Non-Latino", "Not Hispanic")
_SPLITS = {"train": "train", "validate": "validation", "test": "test"}


def normalise_race(race: pd.Series) -> pd.Series:
  """Black, White or Asian by substring, in that precedence; else None."""
  text = race.astype(object).where(race.notna(), "").astype(str)
  out = pd.Series(None, index=race.index, dtype=object)
  # Assigned in reverse precedence, so Black beats White beats Asian.
  for name in ("Asian", "White", "Black"):
    out[text.str.contains(name)] = name
  return out


def _release(manual_dir: epath.Path) -> epath.Path:
  for release in _RELEASES:
    if (manual_dir / release / "train.csv").is_file():
      return downloaded.require_file(manual_dir, f"{release}/train.csv", "CheXpert's train.csv")
  raise DataError(
      f"{manual_dir}: no {_RELEASES[1]}/train.csv or {_RELEASES[0]}/train.csv;"
      " expected the unpacked CheXpert release there"
  )


class Chexpert(downloaded.DownloadedImageBuilder, skip_registration=True):
  """CheXpert frontal chest X-rays: any finding vs none, sex, age and race."""

  name = "chexpert"
  BUILDER_CONFIGS = [downloaded.image_config(224, 224, 1)]
  CHANNELS = 1
  FIT = "stretch"
  LABEL_NAMES = ("no_finding", "finding")
  ATTRIBUTES = {
      "sex": ("male", "female"),
      "age": ("<60", ">=60"),
      "race": ("White", "Asian or Black"),
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download CheXpert (train.csv and images) and CHEXPERT DEMO.xlsx from "
      "https://stanfordaimi.azurewebsites.net/ and chexpert_split_2021_08_20"
      ".csv from https://github.com/biomedia-mira/chexploration; MANUAL_DIR "
      "holds CheXpert-v1.0-small/ (or CheXpert-v1.0/) and the two files."
  )
  DESCRIPTION = "CheXpert chest radiographs, Glocker et al.'s cohort."
  HOMEPAGE = "https://stanfordmlgroup.github.io/competitions/chexpert/"
  CITATION = (
      "Irvin et al. CheXpert: a large chest radiograph dataset with "
      "uncertainty labels and expert comparison. AAAI 2019."
  )

  def _read_cohort(self, manual_dir: epath.Path) -> pd.DataFrame:
    train_csv = _release(manual_dir)
    where = train_csv.relative_to(manual_dir).as_posix()
    # Only the used columns: extra ones cannot clash with the merged names.
    images = downloaded.read_csv(train_csv, _TRAIN_COLUMNS)[list(_TRAIN_COLUMNS)]
    split_csv = downloaded.require_file(
        manual_dir, _SPLIT_FILE, "the split file of biomedia-mira/chexploration"
    )
    split = downloaded.read_csv(split_csv, ("index", "split"))[["index", "split"]]
    demo_xlsx = downloaded.require_file(manual_dir, _DEMO, "CheXpert's demographics")
    demo = downloaded.header_from_first_row(
        downloaded.read_excel(demo_xlsx, header=None), _DEMO_COLUMNS, demo_xlsx
    )

    # Align the split file with train.csv rows by row number; rows without
    # a split are not in the cohort.
    split = split[split["split"].notna()]
    index = pd.to_numeric(split["index"], errors="coerce")
    line_of = lambda label: f"{_SPLIT_FILE} line {label + 2}"  # noqa: E731
    outside = ~index.between(0, len(images) - 1) | (index % 1 != 0)
    if outside.any():
      label = outside.idxmax()
      raise downloaded.bad_value(
          line_of(label), "index", split["index"][label],
          f"a row number of {where}, 0 to {len(images) - 1}",
      )  # fmt: skip
    if index.duplicated().any():
      label = index.duplicated().idxmax()
      first = index.index[index == index[label]][0]
      raise DataError(
          f"{line_of(label)}: index {int(index[label])} again (first on line "
          f"{first + 2}); expected each row of {where} at most once"
      )
    unknown = ~split["split"].isin(list(_SPLITS))
    if unknown.any():
      label = unknown.idxmax()
      raise downloaded.bad_value(
          line_of(label), "split", split["split"][label], f"one of {list(_SPLITS)}"
      )
    cohort = images.iloc[index.astype(int).to_numpy()].copy()
    cohort["split"] = split["split"].map(_SPLITS).to_numpy()
    cohort["row"] = index.astype(int).to_numpy()
    line = lambda row: f"{where} line {row + 2}"  # noqa: E731
    parts = cohort["Path"].astype(str).str.split("/")
    if (parts.str.len() < 4).any():
      row = cohort["row"][parts.str.len() < 4].iloc[0]
      raise downloaded.bad_value(
          line(row), "Path", images["Path"][row], "<release>/<split>/patientXXXXX/..."
      )
    cohort["patient"] = parts.str[2]
    repeated = cohort["Path"].duplicated()
    if repeated.any():
      path = cohort["Path"][repeated].iloc[0]
      rows = sorted(cohort["row"][cohort["Path"] == path])
      raise DataError(
          f"{line(rows[1])}: Path {path!r} again (first on line {rows[0] + 2}); "
          "expected each image once"
      )
    view = ~cohort["Frontal/Lateral"].isin(["Frontal", "Lateral"])
    if view.any():
      row = cohort["row"][view].iloc[0]
      raise downloaded.bad_value(
          line(row), "Frontal/Lateral", images["Frontal/Lateral"][row],
          "Frontal or Lateral",
      )  # fmt: skip

    demo = demo[list(_DEMO_COLUMNS)].rename(columns={"PATIENT": "patient"})
    demo = demo[demo["patient"].notna()]
    repeated = demo["patient"][demo["patient"].duplicated()]
    if len(repeated):
      raise DataError(
          f"{_DEMO}: patient {repeated.iloc[0]!r} appears twice; expected one row per patient"
      )
    cohort = cohort.merge(demo, on="patient", how="inner")
    cohort["race"] = normalise_race(cohort["PRIMARY_RACE"])
    cohort = cohort[
        cohort["race"].notna()
        & cohort["ETHNICITY"].isin(_NON_HISPANIC)
        & (cohort["Frontal/Lateral"] == "Frontal")
    ]

    sex = cohort["Sex"].to_numpy(dtype=object)
    not_binary = ~np.isin(sex, ["Male", "Female"])
    if not_binary.any():
      row = cohort["row"].to_numpy()[np.flatnonzero(not_binary)[0]]
      raise downloaded.bad_value(line(row), "Sex", images["Sex"][row], "Male or Female")
    years = f"an age in years, 0 to {downloaded.MAX_AGE}"
    age = downloaded.to_numbers(cohort["Age"].set_axis(cohort["row"]), line, years)
    downloaded.check_ages(age, list(cohort["row"]), line, "Age")
    finding = downloaded.to_numbers(
        cohort["No Finding"].set_axis(cohort["row"]), line, "1, 0, -1 or empty"
    )
    odd = ~np.isin(finding, [1.0, 0.0, -1.0]) & ~np.isnan(finding)
    if odd.any():
      row = cohort["row"].to_numpy()[np.flatnonzero(odd)[0]]
      raise downloaded.bad_value(
          line(row), "No Finding", images["No Finding"][row], "1, 0, -1 or empty"
      )
    no_finding = finding == 1

    # The split is published as patient-disjoint; say so if it is not.
    shared = int((cohort.groupby("patient")["split"].nunique() > 1).sum())
    if shared:
      logging.warning("chexpert: %d patients are in several splits", shared)
    self.info.metadata["patients_in_several_splits"] = shared
    return pd.DataFrame(
        {
            "split": cohort["split"].to_numpy(),
            "path": cohort["Path"].astype(str).to_numpy(),
            "label": (~no_finding).astype(int),
            "id": cohort["patient"].to_numpy(),
            "sex": (sex == "Female").astype(int),
            "age": (age >= 60).astype(int),
            "race": (cohort["race"] != "White").astype(int).to_numpy(),
        }
    )


datasets.register(
    "chexpert",
    datasets.DatasetEntry(
        make_builder=Chexpert,
        attributes=tuple(Chexpert.ATTRIBUTES),
        how_to_prepare=(
            "put the unpacked CheXpert release (CheXpert-v1.0-small/), "
            f"'{_DEMO}' and {_SPLIT_FILE} in DIR and run: python -m "
            "ncjax.prepare --dataset=chexpert --manual_dir=DIR "
            "--data_dir=<data_dir>"
        ),
    ),
)
