"""Tiny copies of PAPILA, HAM10000 and CheXpert in their published layouts.

Every image is one solid colour (`colour_of(path)`), so a test can tell which
file a stored example came from after resizing. Sizes vary, some images have
an unexpected size, and the tables carry the real column names and quirks
(PAPILA's extra header rows, HAM10000's missing ages and `unknown` sex,
CheXpert's lateral views, race strings and rows without a split). The
helpers at the end damage such a copy the way real downloads go wrong.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import openpyxl
import pandas as pd
from PIL import Image

CHEXPERT_LABELS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)


def colour_of(path: str) -> tuple[int, int, int]:
  """A colour derived from the image path (relative to MANUAL_DIR)."""
  digest = hashlib.sha256(path.encode()).digest()
  return tuple(int(20 + b % 216) for b in digest[:3])


def _write_image(root: str, path: str, size_wh: tuple[int, int], gray: bool) -> None:
  full = os.path.join(root, path)
  os.makedirs(os.path.dirname(full), exist_ok=True)
  colour = colour_of(path)
  if gray:
    Image.new("L", size_wh, colour[0]).save(full, quality=95)
  else:
    Image.new("RGB", size_wh, colour).save(full, quality=95)


# --- PAPILA -------------------------------------------------------------------

_PAPILA_GROUP_ROW = [
    None, "Age", "Gender", "Diagnosis", "Refractive_error", None, None,
    "Phakic/Pseudophakic", "IOP", None, "Pachymetry", "Axial_Length", "VF_MD",
]  # fmt: skip
_PAPILA_ID_ROW = ["ID", None, None, None, "dioptre", None, "axis", None,
                  "mmHg", None, None, None, None]  # fmt: skip
_PAPILA_NAMES = [
    "Age", "Gender", "Diagnosis", "dioptre_1", "dioptre_2", "astigmatism",
    "Phakic/Pseudophakic", "Pneumatic", "Perkins", "Pachymetry",
    "Axial_Length", "VF_MD",
]  # fmt: skip


def write_papila_table(path: str, patients: pd.DataFrame, eye: str) -> None:
  """One clinical xlsx: a group header row, an 'ID' row, a names row, data."""
  workbook = openpyxl.Workbook()
  sheet = workbook.active
  sheet.append(_PAPILA_GROUP_ROW)
  sheet.append(_PAPILA_ID_ROW)
  sheet.append([None, *_PAPILA_NAMES])
  for _, p in patients.iterrows():
    sheet.append([
        p["ID"], int(p["Age"]), int(p["Gender"]), int(p[f"Diagnosis_{eye}"]),
        0.75, -1.5, 90, 0, 17, None, 540, 23.5, None,
    ])  # fmt: skip
  workbook.save(path)


def write_papila(root: str, num_patients: int = 20, seed: int = 0) -> pd.DataFrame:
  """PAPILA under `root`; returns the patients (OD file order) as written."""
  rng = np.random.default_rng(seed)
  numbers = rng.choice(np.arange(1, 300), num_patients, replace=False)
  patients = pd.DataFrame(
      {
          "ID": [f"#{n:03d}" for n in numbers],  # file order, not sorted
          "Age": rng.choice([23, 45, 59, 60, 61, 75, 88], num_patients),
          "Gender": rng.integers(0, 2, num_patients),
          "Diagnosis_OD": rng.choice([0, 1, 2], num_patients, p=[0.6, 0.25, 0.15]),
          "Diagnosis_OS": rng.choice([0, 1, 2], num_patients, p=[0.6, 0.25, 0.15]),
      }
  )
  os.makedirs(os.path.join(root, "ClinicalData"), exist_ok=True)
  write_papila_table(os.path.join(root, "ClinicalData", "patient_data_od.xlsx"), patients, "OD")
  # The OS file lists the patients in another order: rows align by id.
  write_papila_table(
      os.path.join(root, "ClinicalData", "patient_data_os.xlsx"),
      patients.iloc[::-1],
      "OS",
  )
  for i, patient_id in enumerate(patients["ID"]):
    for eye in ("OD", "OS"):
      # Mostly the real aspect (4:3); every fifth image an unexpected size.
      size = (32, 10) if i % 5 == 0 else (16, 12)
      path = f"FundusImages/RET{patient_id[1:]}{eye}.jpg"
      _write_image(root, path, size, gray=False)
  return patients


# --- HAM10000 -----------------------------------------------------------------


def write_ham10000(root: str, num_lesions: int = 30, seed: int = 1) -> pd.DataFrame:
  """HAM10000 under `root` (two image folders); returns the metadata table."""
  os.makedirs(root, exist_ok=True)
  rng = np.random.default_rng(seed)
  lesions = [f"HAM_{n:07d}" for n in rng.choice(10**6, num_lesions, replace=False)]
  rows = []
  for lesion in lesions:
    dx = rng.choice(["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"])
    age = float(rng.choice([0, 15, 35, 55, 60, 65, 80, 85]))
    sex = rng.choice(["male", "female", "male", "female", "unknown"])
    for _ in range(rng.integers(1, 4)):
      rows.append({"lesion_id": lesion, "dx": dx, "age": age, "sex": sex})
  meta = pd.DataFrame(rows)
  meta.insert(1, "image_id", [
      f"ISIC_{n:07d}" for n in rng.choice(10**6, len(meta), replace=False)
  ])  # fmt: skip
  meta.loc[[3, 4, 11], "age"] = np.nan  # dropped rows
  meta.loc[[7, 20], "sex"] = np.nan
  meta.insert(3, "dx_type", "histo")
  meta["localization"] = "back"
  meta["dataset"] = "vidir_modern"
  meta.to_csv(os.path.join(root, "HAM10000_metadata.csv"), index=False)
  for i, image_id in enumerate(meta["image_id"]):
    folder = "HAM10000_images_part_1" if i % 2 else "HAM10000_images_part_2"
    size = (12, 20) if i % 7 == 0 else (16, 12)
    _write_image(root, f"{folder}/{image_id}.jpg", size, gray=False)
  return meta


# --- CheXpert -----------------------------------------------------------------

_RACES = [
    "White", "White, non-Hispanic", "Black or African American", "Asian",
    "Asian, Hispanic", "Other", "Unknown", "White or Caucasian",
    "Black, Hispanic", None, "Native Hawaiian or Other Pacific Islander",
    "White, Asian", "Asian - Historical Conv",
]  # fmt: skip
_ETHNICITIES = [
    "Non-Hispanic/Non-Latino", "Not Hispanic", "Non-Hispanic/Non-Latino",
    "Not Hispanic", "Hispanic/Latino", "Unknown",
]  # fmt: skip


def write_chexpert(
    root: str, num_patients: int = 24, seed: int = 2
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
  """CheXpert under `root`; returns (train.csv, demographics, split file)."""
  rng = np.random.default_rng(seed)
  release = "CheXpert-v1.0-small"
  rows = []
  for p in range(1, num_patients + 1):
    sex = rng.choice(["Male", "Female"])
    for study in range(1, rng.integers(2, 4)):
      age = int(rng.choice([19, 45, 59, 60, 61, 77, 90]))
      views = [("view1_frontal", "Frontal", rng.choice(["AP", "PA"]))]
      if rng.random() < 0.4:
        views.append(("view2_lateral", "Lateral", None))
      for view, frontal_lateral, ap_pa in views:
        row = {
            "Path": f"{release}/train/patient{p:05d}/study{study}/{view}.jpg",
            "Sex": sex, "Age": age, "Frontal/Lateral": frontal_lateral,
            "AP/PA": ap_pa,
        }  # fmt: skip
        for label in CHEXPERT_LABELS:
          row[label] = rng.choice([1.0, 0.0, -1.0, np.nan, np.nan, np.nan])
        row["No Finding"] = rng.choice([1.0, np.nan, np.nan, 0.0])
        rows.append(row)
  train = pd.DataFrame(rows)
  os.makedirs(os.path.join(root, release), exist_ok=True)
  train.to_csv(os.path.join(root, release, "train.csv"), index=False)
  for i, path in enumerate(train["Path"]):
    size = (10, 12) if i % 6 == 0 else (12, 12)
    _write_image(root, path, size, gray=True)

  patients = [f"patient{p:05d}" for p in range(1, num_patients + 1)]
  demo = pd.DataFrame(
      {
          "PATIENT": patients,
          "GENDER": "Male",  # deliberately not train.csv's: the builder ignores it
          "AGE_AT_CXR": 50,
          "PRIMARY_RACE": [_RACES[i % len(_RACES)] for i in range(num_patients)],
          "ETHNICITY": [_ETHNICITIES[(i // 2) % len(_ETHNICITIES)] for i in range(num_patients)],
      }
  ).drop(
      index=[5]
  )  # one patient without demographics
  demo.to_excel(os.path.join(root, "CHEXPERT DEMO.xlsx"), index=False)

  # Split by patient, 60/10/30; some rows get no split.
  split_of = dict(zip(patients, np.resize(
      ["train"] * 6 + ["validate"] + ["test"] * 3, num_patients
  ), strict=True))  # fmt: skip
  chosen = [i for i in range(len(train)) if i % 9 != 4]
  split = pd.DataFrame(
      {
          "index": chosen,
          "split": [split_of[train["Path"][i].split("/")[2]] for i in chosen],
      }
  ).sample(frac=1.0, random_state=0)
  split = split.reset_index(drop=True)
  split.to_csv(os.path.join(root, "chexpert_split_2021_08_20.csv"))
  return train, demo, split


# --- hostile edits --------------------------------------------------------------

# File format per PIL colour mode written by `write_image_as` (PNG content in
# a `.jpg` file where JPEG cannot hold the mode).
IMAGE_FORMATS = {
    "L": "JPEG", "RGB": "JPEG", "CMYK": "JPEG",
    "LA": "PNG", "P": "PNG", "RGBA": "PNG", "I;16": "PNG",
}  # fmt: skip


def luma(rgb: tuple[int, int, int]) -> float:
  """Gray value of an RGB colour, ITU-R 601-2: 0.299 R + 0.587 G + 0.114 B."""
  r, g, b = rgb
  return 0.299 * r + 0.587 * g + 0.114 * b


def write_image_as(
    path: str, mode: str, rgb: tuple[int, int, int], size_wh: tuple[int, int] = (16, 12)
) -> tuple[int, int, int]:
  """Overwrites `path` with a solid image stored in PIL mode `mode`.

  Gray modes (L, LA) hold `rgb[0]`; RGBA has alpha 128; P holds `rgb` in a
  one-colour palette; CMYK holds (255 - R, 255 - G, 255 - B, 0). I;16 holds
  `rgb[0] * 256`.

  Returns:
    The colour a reader should see: (g, g, g) for the gray modes, else `rgb`.
  """
  gray = rgb[0]
  if mode == "L":
    image = Image.new("L", size_wh, gray)
  elif mode == "LA":
    image = Image.new("LA", size_wh, (gray, 128))
  elif mode == "RGB":
    image = Image.new("RGB", size_wh, rgb)
  elif mode == "RGBA":
    image = Image.new("RGBA", size_wh, (*rgb, 128))
  elif mode == "P":
    image = Image.new("P", size_wh, 0)
    image.putpalette(list(rgb) + [0] * 765)
  elif mode == "CMYK":
    image = Image.new("CMYK", size_wh, tuple(255 - v for v in rgb) + (0,))
  elif mode == "I;16":
    image = Image.new("I;16", size_wh, gray * 256)
  else:
    raise ValueError(f"no writer for mode {mode}")
  with open(path, "wb") as f:  # the format from the mode, not the name
    image.save(f, format=IMAGE_FORMATS[mode], quality=95)
  return (gray, gray, gray) if mode in ("L", "LA", "I;16") else tuple(rgb)


def truncate(path: str, keep: float = 0.5) -> None:
  """Cuts a file to the first `keep` of its bytes (an interrupted download)."""
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[: int(len(data) * keep)])


def read_sheet(path: str) -> list[list]:
  """The cells of an xlsx file's first sheet, row by row."""
  workbook = openpyxl.load_workbook(path)
  return [list(row) for row in workbook.active.iter_rows(values_only=True)]


def write_sheet(path: str, rows: list[list]) -> None:
  """An xlsx file whose first sheet holds `rows`."""
  workbook = openpyxl.Workbook()
  for row in rows:
    workbook.active.append(list(row))
  workbook.save(path)
