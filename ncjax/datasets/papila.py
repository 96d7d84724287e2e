"""PAPILA (fundus photographs, glaucoma), built from its published files.

MANUAL_DIR is the unpacked PAPILA download:
  ClinicalData/patient_data_od.xlsx   right eyes
  ClinicalData/patient_data_os.xlsx   left eyes
  FundusImages/RET002OD.jpg, RET002OS.jpg, ...

The cohort follows SPEC section 2 (the subgroup-separability preprocessing):
patients are split 70/10/20 *before* suspects are dropped, by shuffling the OD
file's patient ids with numpy's legacy generator seeded 42, so both eyes of a
patient share a split; then suspects (Diagnosis 2) are dropped. Label =
Diagnosis (1 = glaucoma); sex = Gender (1 = female); age = 1 if Age >= 60.
Expected: 420 images, 87 positive; 288 / 44 / 88.

Validation (a one-line `DataError` naming the file, the patient, the column
and the valid values; nothing is dropped silently): both files must hold the
same patients, each once; Gender must be 0 or 1, Diagnosis 0, 1 or 2, Age a
number of years in 0..120 (an empty Age is an error: the reference would put
it in group 0 without a word). Columns are found by name in the names row
after `ID`: extra ones are ignored and the order is free, but a used column
written twice is an error. Images: see `downloaded` (missing, empty or
undecodable files fail the build or, with --skip_bad_images, are skipped and
listed; grayscale or other colour modes are converted to RGB and counted).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from etils import epath

from ncjax import datasets
from ncjax.datasets import downloaded
from ncjax.errors import DataError

_CLINICAL = {
    "OD": "ClinicalData/patient_data_od.xlsx",
    "OS": "ClinicalData/patient_data_os.xlsx",
}
_COLUMNS = ("Age", "Gender", "Diagnosis")
_SEED = 42


def read_clinical_table(path: epath.Path) -> pd.DataFrame:
  """One clinical xlsx, read as the dataset's own helper (`_fix_df`) reads it.

  The sheet has extra header rows: read with the first column as the index,
  drop the row labelled `ID`, take the first remaining row as the column
  names, drop the rows without an index (that names row). Data rows are
  indexed by patient id (`#002`).
  """
  raw = downloaded.read_excel(path, index_col=0)
  if "ID" not in raw.index:
    raise DataError(
        f"{path}: no row labelled 'ID' in the first column; expected PAPILA's "
        "header rows (a row 'ID', then a row of column names)"
    )
  table = raw.drop(["ID"], axis=0)
  if table.empty:
    raise DataError(f"{path}: no rows after the 'ID' row")
  names = list(table.iloc[0, :])
  downloaded.check_columns(table, _COLUMNS, f"{path} (names row after 'ID')", names=names)
  table.columns = names
  table = table[table.index.notna()]
  duplicated = table.index[table.index.duplicated()]
  if len(duplicated):
    raise DataError(
        f"{path}: patient {duplicated[0]!r} appears twice; expected one row per patient"
    )
  return table


def split_patients(patient_ids: list[str]) -> dict[str, str]:
  """patient id -> split: SS's seeded shuffle of the OD file's ids, 70/10/20."""
  # A plain numpy object array: shuffling a pandas (Arrow) string array takes
  # another code path and gives another order. RandomState(42).shuffle is
  # np.random.seed(42); np.random.shuffle(ids), without touching global state.
  ids = np.array(list(patient_ids), dtype=object)
  np.random.RandomState(_SEED).shuffle(ids)
  n = len(ids)
  train_end, val_end = int(n * 0.7), int(n * 0.8)
  split_of = {}
  for i, patient in enumerate(ids):
    if i < train_end:
      split_of[patient] = "train"
    elif i < val_end:
      split_of[patient] = "validation"
    else:
      split_of[patient] = "test"
  return split_of


def _values(
    table: pd.DataFrame, column: str, file: str, valid: tuple[int, ...] | None
) -> np.ndarray:
  """Column `column` of `table` as numbers, each in `valid` (None: an age)."""
  where = lambda patient: f"{file} patient {patient}"  # noqa: E731
  if valid is None:
    expected = f"an age in years, 0 to {downloaded.MAX_AGE}"
  else:
    expected = f"one of {list(valid)}"
  values = downloaded.to_numbers(table[column], where, expected)
  if valid is None:
    downloaded.check_ages(values, list(table.index), where, column)
    return values
  bad = np.flatnonzero(~np.isin(values, valid))  # NaN (empty) is never valid
  if len(bad):
    i = bad[0]
    raise downloaded.bad_value(where(table.index[i]), column, table[column].iloc[i], expected)
  return values


class Papila(downloaded.DownloadedImageBuilder, skip_registration=True):
  """PAPILA fundus images with glaucoma labels, sex and age group."""

  name = "papila"
  BUILDER_CONFIGS = [downloaded.image_config(256, 341, 3)]
  LABEL_NAMES = ("healthy", "glaucoma")
  ATTRIBUTES = {"sex": ("male", "female"), "age": ("<60", ">=60")}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download PAPILA from https://figshare.com/articles/dataset/PAPILA/"
      "14798004 and unpack it: MANUAL_DIR holds ClinicalData/ and "
      "FundusImages/."
  )
  DESCRIPTION = "PAPILA fundus images, both eyes of 244 patients."
  HOMEPAGE = "https://figshare.com/articles/dataset/PAPILA/14798004"
  CITATION = (
      "Kovalyk et al. PAPILA: Dataset with fundus images and clinical data of "
      "both eyes of the same patient for glaucoma assessment. Scientific Data "
      "9, 291 (2022)."
  )

  def _read_cohort(self, manual_dir: epath.Path) -> pd.DataFrame:
    tables = {
        eye: read_clinical_table(
            downloaded.require_file(manual_dir, file, "PAPILA's clinical data")
        )
        for eye, file in _CLINICAL.items()
    }
    od_ids = list(tables["OD"].index)
    for eye, other in (("OS", "OD"), ("OD", "OS")):
      missing = [p for p in tables[other].index if p not in tables[eye].index]
      if missing:
        raise DataError(
            f"{_CLINICAL[eye]}: patient {missing[0]!r} of {_CLINICAL[other]} "
            "is missing; expected the same patients in both files"
        )
    split_of = split_patients(od_ids)
    rows = []
    for eye, file in _CLINICAL.items():
      table = tables[eye].loc[od_ids]
      age = _values(table, "Age", file, None)
      gender = _values(table, "Gender", file, (0, 1))
      diagnosis = _values(table, "Diagnosis", file, (0, 1, 2))
      for i, patient in enumerate(od_ids):
        if diagnosis[i] == 2:  # glaucoma suspect
          continue
        plain_id = str(patient).replace("#", "")
        rows.append(
            {
                "split": split_of[patient],
                "path": f"FundusImages/RET{plain_id}{eye}.jpg",
                "label": int(diagnosis[i]),
                "id": plain_id,
                "sex": int(gender[i]),
                "age": int(age[i] >= 60),
            }
        )
    return pd.DataFrame(rows)


datasets.register(
    "papila",
    datasets.DatasetEntry(
        make_builder=Papila,
        attributes=tuple(Papila.ATTRIBUTES),
        how_to_prepare=(
            "download PAPILA (https://figshare.com/articles/dataset/PAPILA/"
            "14798004), unpack it to DIR (ClinicalData/, FundusImages/) and "
            "run: python -m ncjax.prepare --dataset=papila --manual_dir=DIR "
            "--data_dir=<data_dir>"
        ),
    ),
)
