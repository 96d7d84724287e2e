"""Hostile input for the PAPILA, HAM10000 and CheXpert builders (issue #9).

Every case runs for every builder on a copy of its tiny published layout
(`dataset_fixtures`), damaged the way real downloads go wrong: truncated,
empty or 16-bit images; images in another colour mode; ids listed twice;
values outside their valid set; tables that are empty, truncated, or have
extra, reordered or repeated columns; unicode paths. An error must be exactly
one `DataError` line naming the file, the row or image and what was expected,
and leave nothing prepared (nor undo an earlier build). Documented handling
(conversion, skipping, dropping, ignoring) is checked against the clean build
of the same files, itself checked against the reference preprocessing in
test_datasets_real.py, and its count in the metadata and in
`ncjax.prepare`'s summary.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import shutil
from collections.abc import Callable
from typing import Any

import dataset_fixtures as fx
import numpy as np
import pandas as pd
import pytest

from ncjax import datasets, prepare
from ncjax.errors import DataError

NAMES = ("papila", "ham10000", "chexpert")
SIZES = {"papila": (6, 8), "ham10000": (6, 8), "chexpert": (6, 6)}
WRITERS = {
    "papila": fx.write_papila,
    "ham10000": fx.write_ham10000,
    "chexpert": fx.write_chexpert,
}
UNICODE = "données_ü_日本"
OD = "ClinicalData/patient_data_od.xlsx"
OS = "ClinicalData/patient_data_os.xlsx"
HAM_CSV = "HAM10000_metadata.csv"
TRAIN_CSV = "CheXpert-v1.0-small/train.csv"
DEMO = "CHEXPERT DEMO.xlsx"
SPLIT_CSV = "chexpert_split_2021_08_20.csv"
YEARS = "expected an age in years, 0 to 120"
DX = "['akiec', 'bcc', 'bkl', 'df', 'mel', 'nv', 'vasc']"
COLOUR = (200, 40, 90)  # of rewritten images: unlike any fixture colour


# --- building and reading back --------------------------------------------------


def _build(name: str, manual: str, data_dir: str, **kwargs: Any):
  kwargs.setdefault("num_workers", 1)
  kwargs.setdefault("image_size", SIZES[name])
  return prepare.prepare(name, manual, data_dir, **kwargs)


def _text(value: Any) -> Any:
  return value.decode() if isinstance(value, bytes) else value


def _stored(builder) -> dict[str, dict[str, Any]]:
  """path -> the stored example, with its split, over all splits."""
  out = {}
  for split in datasets.SPLITS:
    source = builder.as_data_source(split)
    for r in source.__getitems__(list(range(len(source)))):
      record = {k: _text(v) for k, v in r.items()}
      out[record["path"]] = {**record, "split": split}
  return out


def _assert_same(stored: dict, expected: dict) -> None:
  """The same examples, field by field, images included."""
  assert sorted(stored) == sorted(expected)
  for path, record in stored.items():
    assert record.keys() == expected[path].keys()
    for key, value in record.items():
      np.testing.assert_array_equal(value, expected[path][key], err_msg=f"{path} {key}")


def _summary(name: str, data_dir: str, **kwargs: Any) -> tuple[dict, str]:
  """The prepared dataset's summary, read back from disk, and its text."""
  kwargs.setdefault("image_size", SIZES[name])
  summary = prepare.summarize(name, data_dir, **kwargs)
  return summary, prepare.format_summary(summary)


def _nothing_prepared(data_dir: str) -> bool:
  found = []
  for _, dirs, files in os.walk(data_dir):
    found += [d for d in dirs if d.startswith("incomplete")]
    found += [f for f in files if f == "dataset_info.json" or "array_record" in f]
  return not found


@dataclasses.dataclass
class Original:
  """A clean tiny layout of one dataset, and what its build stored."""

  name: str
  manual: str
  tables: Any  # what the fixture writer returned
  data_dir: str
  metadata: dict[str, Any]
  stored: dict[str, dict[str, Any]]

  def paths(self, split: str) -> list[str]:
    return sorted(p for p, r in self.stored.items() if r["split"] == split)


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Callable[[str], Original]:
  """name -> its clean layout, built once per module when first asked for."""
  built = {}

  def get(name: str) -> Original:
    if name not in built:
      manual = str(tmp_path_factory.mktemp(f"{name}_manual"))
      tables = WRITERS[name](manual)
      data_dir = str(tmp_path_factory.mktemp(f"{name}_data"))
      builder = _build(name, manual, data_dir)
      built[name] = Original(
          name, manual, tables, data_dir, dict(builder.info.metadata), _stored(builder)
      )
    return built[name]

  return get


def _copy(orig: Original, tmp_path, folder: str = "manual") -> str:
  target = os.path.join(str(tmp_path), folder)
  shutil.copytree(orig.manual, target)
  return target


def _fails(name: str, manual: str, tmp_path, **kwargs: Any) -> str:
  """The message of the `DataError` that building `manual` raises.

  Checks the class is exactly `DataError`, the message one line, and that
  nothing prepared was left behind.
  """
  data_dir = str(tmp_path / "data")
  with pytest.raises(DataError) as e:
    _build(name, manual, data_dir, **kwargs)
  assert type(e.value) is DataError
  message = str(e.value)
  assert "\n" not in message and message == message.strip()
  assert _nothing_prepared(data_dir)
  return message


# --- editing tables -------------------------------------------------------------


def _set_csv(path: str, row: int, column: str, value: Any, index_col=None) -> None:
  table = pd.read_csv(path, index_col=index_col)
  table[column] = table[column].astype(object)
  table.loc[row, column] = value
  table.to_csv(path, index=index_col is not None)


def _set_papila(manual: str, file: str, patient: str, column: str, value: Any) -> None:
  """One cell of a PAPILA clinical table (rows: groups, ID, names, data)."""
  path = os.path.join(manual, file)
  rows = fx.read_sheet(path)
  column_index = rows[2].index(column)
  (row,) = [r for r in rows[3:] if r[0] == patient]
  row[column_index] = value
  fx.write_sheet(path, rows)


def _rename_in_header(path: str, old: str, new: str, header_row: int = 0) -> None:
  """Renames column `old` in a csv's first line or an xlsx's `header_row`."""
  if path.endswith(".xlsx"):
    rows = fx.read_sheet(path)
    names = rows[header_row]
    names[names.index(old)] = new
    fx.write_sheet(path, rows)
    return
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  names = lines[0].split(",")
  names[names.index(old)] = new
  lines[0] = ",".join(names)
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines))


def _chexpert_row(orig: Original, path: str) -> int:
  """The train.csv row (0 = first data line) of an image path."""
  train = orig.tables[0]
  return int(train.index[train.Path == path][0])


def _ham_row(orig: Original, path: str) -> int:
  meta = orig.tables
  image_id = os.path.basename(path)[: -len(".jpg")]
  return int(meta.index[meta.image_id == image_id][0])


def _papila_patient(path: str) -> str:
  """'#123' of FundusImages/RET123OD.jpg."""
  return "#" + re.fullmatch(r"FundusImages/RET(\d+)O[DS]\.jpg", path)[1]


# --- truncated, empty and 16-bit images -------------------------------------------


def _damage(kind: str, path: str) -> str:
  """Damages the image file `path`; returns a regex of the reason given."""
  if kind == "truncated":
    fx.truncate(path, keep=0.5)
    return r"OSError: .*[Tt]runcated.*"
  if kind == "empty":
    open(path, "wb").close()
    return re.escape("empty file, 0 bytes")
  if kind == "16-bit":
    fx.write_image_as(path, "I;16", COLOUR)
    return re.escape(
        "ValueError: mode I;16 (16-bit or float pixels), expected 8-bit grayscale or colour"
    )
  raise ValueError(kind)


DAMAGES = ("truncated", "empty", "16-bit")


@pytest.mark.parametrize("kind", DAMAGES)
@pytest.mark.parametrize("name", NAMES)
def test_damaged_images_fail_the_build_naming_each(name, kind, original, tmp_path):
  orig = original(name)
  manual = _copy(orig, tmp_path)
  damaged = [orig.paths("train")[0], orig.paths("test")[-1]]
  reasons = [_damage(kind, os.path.join(manual, p)) for p in damaged]
  message = _fails(name, manual, tmp_path)
  if kind == "empty":  # found before decoding anything
    assert message.startswith(f"2 image(s) missing or empty under {manual}: ")
  else:
    assert message.startswith("2 image(s) could not be read: ")
    assert f"expected whole 8-bit images under {manual}; " in message
  for path, reason in zip(damaged, reasons, strict=True):
    assert re.search(re.escape(path) + r" \(" + reason + r"\)[,;]", message), message
  assert message.endswith("pass --skip_bad_images to leave them out")


@pytest.mark.parametrize("kind", DAMAGES)
@pytest.mark.parametrize("name", NAMES)
def test_damaged_images_are_skipped_and_counted(name, kind, original, tmp_path):
  orig = original(name)
  manual = _copy(orig, tmp_path)
  damaged = [orig.paths("train")[0], orig.paths("test")[-1]]
  reasons = {p: _damage(kind, os.path.join(manual, p)) for p in damaged}
  data_dir = str(tmp_path / "data")
  built = _build(name, manual, data_dir, skip_bad_images=True)

  expected = {p: r for p, r in orig.stored.items() if p not in damaged}
  _assert_same(_stored(built), expected)
  summary, text = _summary(name, data_dir)
  skipped = summary["metadata"]["skipped_images"]
  assert sorted(s["path"] for s in skipped) == sorted(damaged)
  for s in skipped:
    assert s["split"] == orig.stored[s["path"]]["split"]
    assert re.fullmatch(reasons[s["path"]], s["reason"])
    assert f"    {s['split']}: {s['path']} ({s['reason']})" in text
  assert "skipped unreadable images: 2" in text
  assert summary["samples"] == len(orig.stored) - 2


@pytest.mark.parametrize("skip", [False, True], ids=["fails", "skipping"])
@pytest.mark.parametrize("name", NAMES)
def test_split_without_a_readable_image_is_an_error(name, skip, original, tmp_path):
  # TFDS cannot write an empty split: the build stops at the first one.
  orig = original(name)
  manual = _copy(orig, tmp_path)
  damaged = orig.paths("validation")
  for path in damaged:
    fx.truncate(os.path.join(manual, path))
  message = _fails(name, manual, tmp_path, skip_bad_images=skip)
  if skip:
    assert message.startswith(f"{name}: no image of split 'validation' could be read (skipped: ")
    assert message.endswith("; expected at least one readable image per split")
  else:
    assert message.startswith(
        f"{len(damaged)} image(s) could not be read (split 'validation' has no "
        "readable image, later splits are unchecked): "
    )
  for path in damaged:
    assert f"{path} (OSError: " in message


# --- grayscale where colour is expected and vice versa ------------------------------

# Per dataset: the modes written in place of its JPEGs (RGB datasets get
# gray, gray + alpha, palette, RGBA and CMYK; the grayscale one colour).
MODES = {
    "papila": ("L", "LA", "P", "RGBA", "CMYK"),
    "ham10000": ("L", "LA", "P", "RGBA", "CMYK"),
    "chexpert": ("RGB", "RGBA", "LA", "P", "CMYK"),
}


@pytest.mark.parametrize("name", NAMES)
def test_other_colour_modes_are_converted_and_counted(name, original, tmp_path):
  orig = original(name)
  manual = _copy(orig, tmp_path)
  channels = 1 if name == "chexpert" else 3
  by_split = itertools.zip_longest(*(orig.paths(s) for s in datasets.SPLITS))
  paths = [p for group in by_split for p in group if p][: len(MODES[name])]
  expected = {}
  for mode, path in zip(MODES[name], paths, strict=False):
    seen = fx.write_image_as(os.path.join(manual, path), mode, COLOUR)
    # Independently: gray is copied to R, G, B; colour becomes ITU-R 601-2
    # luma; alpha is dropped.
    colour = [fx.luma(seen)] if channels == 1 else list(seen)
    tolerance = 4 if fx.IMAGE_FORMATS[mode] == "JPEG" else 1
    expected[path] = (colour, tolerance)
  data_dir = str(tmp_path / "data")
  stored = _stored(_build(name, manual, data_dir))

  for path, (colour, tolerance) in expected.items():
    image = stored[path].pop("image")
    assert image.shape == (*SIZES[name], channels) and image.dtype == np.uint8
    np.testing.assert_allclose(
        image.reshape(-1, channels).astype(float),
        np.broadcast_to(colour, (image.size // channels, channels)),
        atol=tolerance,
        err_msg=path,
    )
  unchanged = {
      p: {k: v for k, v in r.items() if not (p in expected and k == "image")}
      for p, r in orig.stored.items()
  }
  _assert_same(stored, unchanged)
  summary, text = _summary(name, data_dir)
  counts = {m: 1 for m in MODES[name]}
  assert summary["metadata"]["converted_images_by_mode"] == counts
  listed = ", ".join(f"{m} 1" for m in sorted(counts))
  assert f"  converted images by mode: {listed}" in text.splitlines()
  assert summary["metadata"]["skipped_images"] == []
  # The clean build converted nothing, and says so.
  assert orig.metadata["converted_images_by_mode"] == {}
  assert "  converted images by mode: none" in _summary(name, orig.data_dir)[1]


# --- duplicate ids --------------------------------------------------------------------


def _papila_patient_twice(file: str):
  def edit(manual: str, orig: Original) -> str:
    path = os.path.join(manual, file)
    rows = fx.read_sheet(path)
    rows.append(list(rows[5]))  # the third patient's row again, at the end
    fx.write_sheet(path, rows)
    return f"{path}: patient {rows[5][0]!r} appears twice; expected one row per patient"

  return edit


def _ham_image_twice(manual: str, orig: Original) -> str:
  first, again = 2, 9
  image_id = orig.tables.image_id[first]
  _set_csv(os.path.join(manual, HAM_CSV), again, "image_id", image_id)
  return (
      f"{HAM_CSV} line {again + 2}: image_id {image_id!r} again (first on line "
      f"{first + 2}); expected one row per image"
  )


def _chexpert_path_twice(manual: str, orig: Original) -> str:
  train, _, split = orig.tables
  first, again = sorted(split["index"])[1:3]
  path = train.Path[first]
  _set_csv(os.path.join(manual, TRAIN_CSV), again, "Path", path)
  return (
      f"{TRAIN_CSV} line {again + 2}: Path {path!r} again (first on line "
      f"{first + 2}); expected each image once"
  )


def _chexpert_patient_twice(manual: str, orig: Original) -> str:
  path = os.path.join(manual, DEMO)
  rows = fx.read_sheet(path)
  assert rows[0][0] == "PATIENT"
  rows.append(list(rows[3]))
  fx.write_sheet(path, rows)
  return f"{DEMO}: patient {rows[3][0]!r} appears twice; expected one row per patient"


def _chexpert_index_twice(manual: str, orig: Original) -> str:
  _, _, split = orig.tables
  first, again = 1, 5
  index = int(split["index"][first])
  _set_csv(os.path.join(manual, SPLIT_CSV), again, "index", index, index_col=0)
  return (
      f"{SPLIT_CSV} line {again + 2}: index {index} again (first on line "
      f"{first + 2}); expected each row of {TRAIN_CSV} at most once"
  )


@pytest.mark.parametrize(
    "name, edit",
    [
        ("papila", _papila_patient_twice(OD)),
        ("papila", _papila_patient_twice(OS)),
        ("ham10000", _ham_image_twice),
        ("chexpert", _chexpert_path_twice),
        ("chexpert", _chexpert_patient_twice),
        ("chexpert", _chexpert_index_twice),
    ],
    ids=["papila-od", "papila-os", "ham10000-image_id", "chexpert-Path",
         "chexpert-PATIENT", "chexpert-index"],
)  # fmt: skip
def test_duplicate_id_is_an_error(name, edit, original, tmp_path):
  orig = original(name)
  manual = _copy(orig, tmp_path)
  expected = edit(manual, orig)
  assert _fails(name, manual, tmp_path) == expected


@pytest.mark.parametrize("file, other", [(OD, OS), (OS, OD)], ids=["od", "os"])
def test_papila_patient_in_one_file_only_is_an_error(file, other, original, tmp_path):
  orig = original("papila")
  manual = _copy(orig, tmp_path)
  path = os.path.join(manual, file)
  rows = fx.read_sheet(path)
  patient = rows.pop(6)[0]
  fx.write_sheet(path, rows)
  expected = (
      f"{file}: patient {patient!r} of {other} is missing; expected the same "
      "patients in both files"
  )
  assert _fails("papila", manual, tmp_path) == expected


def test_ham10000_image_in_two_folders_first_folder_wins_and_counted(original, tmp_path):
  orig = original("ham10000")
  manual = _copy(orig, tmp_path)
  part_1 = [p for p in orig.paths("train") if p.startswith("HAM10000_images_part_1/")]
  part_2 = [p for p in orig.paths("train") if p.startswith("HAM10000_images_part_2/")]
  # A copy in a later folder is ignored; one in an earlier folder is used.
  ignored = part_1[0].replace("part_1", "part_2")
  fx.write_image_as(os.path.join(manual, ignored), "RGB", COLOUR)
  used = part_2[0].replace("part_2", "part_1")
  fx.write_image_as(os.path.join(manual, used), "RGB", COLOUR)
  data_dir = str(tmp_path / "data")
  stored = _stored(_build("ham10000", manual, data_dir))

  expected = dict(orig.stored)
  expected[used] = dict(expected.pop(part_2[0]), path=used)
  moved = stored[used].pop("image")
  expected[used].pop("image")
  np.testing.assert_allclose(moved.mean(axis=(0, 1)), COLOUR, atol=4)
  _assert_same(stored, expected)
  summary, text = _summary("ham10000", data_dir)
  assert summary["metadata"]["images_in_several_folders"] == 2
  assert "  images in several folders: 2" in text.splitlines()
  assert orig.metadata["images_in_several_folders"] == 0


# --- labels and attributes outside their valid set ------------------------------------


def _papila_value(file: str, column: str, value: Any, shown: str, expected: str):
  def edit(manual: str, orig: Original) -> str:
    patient = orig.tables.ID.iloc[3]
    _set_papila(manual, file, patient, column, value)
    return f"{file} patient {patient}: {column} {shown}, {expected}"

  return edit


def _ham_value(column: str, value: Any, shown: str, expected: str):
  def edit(manual: str, orig: Original) -> str:
    row = _ham_row(orig, orig.paths("validation")[0])  # a row with age and sex
    _set_csv(os.path.join(manual, HAM_CSV), row, column, value)
    return f"{HAM_CSV} line {row + 2}: {column} {shown}, {expected}"

  return edit


def _chexpert_value(column: str, value: Any, shown: str, expected: str):
  def edit(manual: str, orig: Original) -> str:
    row = _chexpert_row(orig, orig.paths("train")[0])  # a row in the cohort
    _set_csv(os.path.join(manual, TRAIN_CSV), row, column, value)
    return f"{TRAIN_CSV} line {row + 2}: {column} {shown}, {expected}"

  return edit


def _split_value(column: str, value: Any, shown: str, expected: str | None):
  """An edit of the split file; `expected` None: a row number of train.csv."""

  def edit(manual: str, orig: Original) -> str:
    line = 3
    _set_csv(os.path.join(manual, SPLIT_CSV), line, column, value, index_col=0)
    rows = len(orig.tables[0])
    valid = expected or f"expected a row number of {TRAIN_CSV}, 0 to {rows - 1}"
    return f"{SPLIT_CSV} line {line + 2}: {column} {shown}, {valid}"

  return edit


_VALUE_CASES = [
    ("papila", "Diagnosis=7", _papila_value(OD, "Diagnosis", 7, "7", "expected one of [0, 1, 2]")),
    ("papila", "Diagnosis=empty", _papila_value(OS, "Diagnosis", None, "empty", "expected one of [0, 1, 2]")),
    ("papila", "Gender=2", _papila_value(OS, "Gender", 2, "2", "expected one of [0, 1]")),
    ("papila", "Gender=0.5", _papila_value(OD, "Gender", 0.5, "0.5", "expected one of [0, 1]")),
    ("papila", "Age=-3", _papila_value(OD, "Age", -3, "-3", YEARS)),
    ("papila", "Age=empty", _papila_value(OS, "Age", None, "empty", YEARS)),
    ("papila", "Age=old", _papila_value(OD, "Age", "old", "'old'", YEARS)),
    ("ham10000", "dx=cancer", _ham_value("dx", "cancer", "'cancer'", f"expected one of {DX}")),
    ("ham10000", "dx=empty", _ham_value("dx", None, "empty", f"expected one of {DX}")),
    ("ham10000", "sex=X", _ham_value("sex", "X", "'X'", "expected one of ['female', 'male', 'unknown']")),
    ("ham10000", "age=-5", _ham_value("age", -5.0, "-5", YEARS)),
    ("ham10000", "age=200", _ham_value("age", 200.0, "200", YEARS)),
    ("ham10000", "age=abc", _ham_value("age", "abc", "'abc'", YEARS)),
    ("ham10000", "lesion_id=empty", _ham_value("lesion_id", None, "empty", "expected an id like HAM_0000118")),
    ("ham10000", "image_id=empty", _ham_value("image_id", None, "empty", "expected an id like ISIC_0027419")),
    ("chexpert", "No Finding=7", _chexpert_value("No Finding", 7, "7", "expected 1, 0, -1 or empty")),
    ("chexpert", "No Finding=yes", _chexpert_value("No Finding", "yes", "'yes'", "expected 1, 0, -1 or empty")),
    ("chexpert", "Sex=X", _chexpert_value("Sex", "X", "'X'", "expected Male or Female")),
    ("chexpert", "Age=-1", _chexpert_value("Age", -1, "-1", YEARS)),
    ("chexpert", "Age=empty", _chexpert_value("Age", None, "empty", YEARS)),
    ("chexpert", "Age=abc", _chexpert_value("Age", "abc", "'abc'", YEARS)),
    ("chexpert", "Frontal/Lateral=Oblique", _chexpert_value("Frontal/Lateral", "Oblique", "'Oblique'", "expected Frontal or Lateral")),
    ("chexpert", "split=holdout", _split_value("split", "holdout", "'holdout'", "expected one of ['train', 'validate', 'test']")),
    ("chexpert", "index=99999", _split_value("index", 99999, "99999", None)),
    ("chexpert", "index=2.5", _split_value("index", 2.5, "2.5", None)),
]  # fmt: skip


@pytest.mark.parametrize(
    "name, edit", [c[::2] for c in _VALUE_CASES], ids=[f"{c[0]}-{c[1]}" for c in _VALUE_CASES]
)
def test_value_outside_its_valid_set_is_an_error(name, edit, original, tmp_path):
  orig = original(name)
  manual = _copy(orig, tmp_path)
  expected = edit(manual, orig)
  assert _fails(name, manual, tmp_path) == expected


def test_ham10000_rows_without_age_or_sex_are_dropped_and_counted(original):
  # The reference drops them (10015 -> 9958); the fixture has five.
  orig = original("ham10000")
  meta = orig.tables
  dropped = meta.age.isna() | meta.sex.isna()
  assert orig.metadata["rows_without_age_or_sex_dropped"] == dropped.sum() == 5
  stored_ids = {os.path.basename(p)[: -len(".jpg")] for p in orig.stored}
  assert stored_ids == set(meta.image_id[~dropped])
  text = _summary("ham10000", orig.data_dir)[1]
  assert "  rows without age or sex dropped: 5" in text.splitlines()


# --- tables: extra, reordered, repeated columns; empty and truncated files --------------


def _shuffle_papila(manual: str) -> None:
  for file in (OD, OS):
    path = os.path.join(manual, file)
    rows = fx.read_sheet(path)
    extra = {0: [None, None, None], 1: [None, None, None], 2: ["Diagnosis_notes", "age", None]}
    rows = [
        [row[0], *reversed(row[1:]), *extra.get(i, ["suspect?", 999, "no name"])]
        for i, row in enumerate(rows)
    ]
    fx.write_sheet(path, rows)


def _shuffle_ham(manual: str) -> None:
  path = os.path.join(manual, HAM_CSV)
  meta = pd.read_csv(path)
  meta = meta[list(reversed(meta.columns))]
  meta = meta.assign(split="test", path="x.jpg", label=1, Age=999, id="HAM_0")
  meta.to_csv(path, index=False)


def _shuffle_chexpert(manual: str) -> None:
  path = os.path.join(manual, TRAIN_CSV)
  train = pd.read_csv(path)
  train = train[list(reversed(train.columns))].assign(
      ETHNICITY="Hispanic/Latino", PRIMARY_RACE="Other", patient="patient99999",
      split="test", row=-1, race="Other", PATIENT="patient99999",
  )  # fmt: skip
  train.to_csv(path, index=False)
  path = os.path.join(manual, DEMO)
  rows = fx.read_sheet(path)
  extra = ["Path", "Sex", "Age", "patient", "split"]
  fx.write_sheet(
      path,
      [list(reversed(r)) + (extra if i == 0 else ["x", "Male", 1, "p", "test"])
       for i, r in enumerate(rows)],
  )  # fmt: skip
  path = os.path.join(manual, SPLIT_CSV)
  split = pd.read_csv(path, index_col=0)
  split[["split", "index"]].assign(Path="x.jpg").to_csv(path)


SHUFFLES = {"papila": _shuffle_papila, "ham10000": _shuffle_ham, "chexpert": _shuffle_chexpert}


@pytest.mark.parametrize("name", NAMES)
def test_extra_and_reordered_columns_change_nothing(name, original, tmp_path):
  orig = original(name)
  manual = _copy(orig, tmp_path)
  SHUFFLES[name](manual)
  built = _build(name, manual, str(tmp_path / "data"))
  _assert_same(_stored(built), orig.stored)
  assert dict(built.info.metadata) == orig.metadata


@pytest.mark.parametrize(
    "name, file, old, new, header_row",
    [
        ("papila", OD, "Pachymetry", "Diagnosis", 2),
        ("papila", OS, "VF_MD", "Age", 2),
        ("ham10000", HAM_CSV, "localization", "age", 0),
        ("chexpert", TRAIN_CSV, "AP/PA", "Sex", 0),
        ("chexpert", DEMO, "GENDER", "ETHNICITY", 0),
        ("chexpert", SPLIT_CSV, "", "split", 0),
    ],
    ids=["papila-od", "papila-os", "ham10000", "chexpert-train", "chexpert-demo",
         "chexpert-split"],
)  # fmt: skip
def test_repeated_column_is_an_error(name, file, old, new, header_row, original, tmp_path):
  orig = original(name)
  manual = _copy(orig, tmp_path)
  path = os.path.join(manual, file)
  _rename_in_header(path, old, new, header_row)
  where = f"{path} (names row after 'ID')" if name == "papila" else path
  expected = f"{where}: column {new!r} appears 2 times; expected it once"
  assert _fails(name, manual, tmp_path) == expected


@pytest.mark.parametrize(
    "name, file, line",
    [("ham10000", HAM_CSV, 2), ("ham10000", HAM_CSV, 9), ("chexpert", TRAIN_CSV, 2),
     ("chexpert", SPLIT_CSV, 6)],
    ids=["ham10000-first_row", "ham10000-later_row", "chexpert-train", "chexpert-split"],
)  # fmt: skip
def test_csv_line_with_more_fields_than_columns_is_an_error(name, file, line, original, tmp_path):
  # On the first data line pandas would silently shift every column by one.
  orig = original(name)
  manual = _copy(orig, tmp_path)
  path = os.path.join(manual, file)
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  width = len(lines[0].split(","))
  lines[line - 1] += ",surplus"
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines))
  expected = (
      f"{path} line {line}: {width + 1} fields, expected at most {width}, one per "
      "column of the header line"
  )
  assert _fails(name, manual, tmp_path) == expected


def test_papila_value_in_an_unnamed_column_is_ignored(original, tmp_path):
  # PAPILA's sheets have no line length; cells beyond the names are extra
  # columns (covered by the shuffle above), here alone.
  orig = original("papila")
  manual = _copy(orig, tmp_path)
  path = os.path.join(manual, OD)
  rows = fx.read_sheet(path)
  fx.write_sheet(path, [r + ([7] if i > 2 else [None]) for i, r in enumerate(rows)])
  _assert_same(_stored(_build("papila", manual, str(tmp_path / "data"))), orig.stored)


@pytest.mark.parametrize(
    "name, file, damage, what",
    [
        ("papila", OD, "empty", "PAPILA's clinical data"),
        ("papila", OS, "truncated", None),
        ("ham10000", HAM_CSV, "empty", "HAM10000's metadata"),
        ("chexpert", TRAIN_CSV, "empty", "CheXpert's train.csv"),
        ("chexpert", DEMO, "truncated", None),
        ("chexpert", SPLIT_CSV, "empty", "the split file of biomedia-mira/chexploration"),
    ],
    ids=["papila-od-empty", "papila-os-truncated", "ham10000-empty", "chexpert-train-empty",
         "chexpert-demo-truncated", "chexpert-split-empty"],
)  # fmt: skip
def test_empty_or_truncated_table_is_an_error(name, file, damage, what, original, tmp_path):
  orig = original(name)
  manual = _copy(orig, tmp_path)
  path = os.path.join(manual, file)
  if damage == "empty":
    open(path, "wb").close()
  else:
    fx.truncate(path, keep=0.5)
  message = _fails(name, manual, tmp_path)
  if damage == "empty":
    assert message == f"{path}: empty file, 0 bytes; expected {what}"
  else:  # an xlsx is a zip archive: a cut one has no directory
    assert re.fullmatch(
        re.escape(f"{path}: not a readable xlsx table (")
        + r"File is not a zip file"
        + re.escape("); expected an Excel workbook"),
        message,
    ), message


# --- unicode paths ------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_unicode_paths_build_the_same(name, original, tmp_path):
  orig = original(name)
  manual = _copy(orig, tmp_path, os.path.join(UNICODE, "téléchargé"))
  data_dir = str(tmp_path / "数据_ø")
  # Decoded in a pool of 2 processes: the paths cross a process boundary.
  built = _build(name, manual, data_dir, num_workers=2)
  _assert_same(_stored(built), orig.stored)
  assert _summary(name, data_dir)[0]["samples"] == len(orig.stored)

  missing = orig.paths("validation")[0]
  os.remove(os.path.join(manual, missing))
  message = _fails(name, manual, tmp_path / "autre_数据")
  assert message.startswith(f"1 image(s) missing or empty under {manual}: ")
  assert os.path.basename(missing) in message  # HAM10000 names only the file
  assert UNICODE in message


# --- a failed build loses no work already done ----------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_failed_build_keeps_what_was_prepared(name, original, tmp_path):
  orig = original(name)
  data_dir = str(tmp_path / "data")
  shutil.copytree(orig.data_dir, data_dir)  # prepared at SIZES[name]
  manual = _copy(orig, tmp_path)
  damaged = os.path.join(manual, orig.paths("train")[0])
  with open(damaged, "rb") as f:
    intact = f.read()
  fx.truncate(damaged)

  with pytest.raises(DataError, match=r"^1 image\(s\) could not be read: "):
    _build(name, manual, data_dir, image_size=(4, 4))
  assert not os.path.exists(os.path.join(data_dir, name, "4x4"))
  kept = datasets.builder(name, data_dir, image_size=SIZES[name])
  assert kept.is_prepared()
  _assert_same(_stored(kept), orig.stored)

  # Fixing the file is all it takes: nothing of the failed build is in the way.
  with open(damaged, "wb") as f:
    f.write(intact)
  rebuilt = _build(name, manual, data_dir, image_size=(4, 4))
  assert sorted(_stored(rebuilt)) == sorted(orig.stored)
