"""The PAPILA, HAM10000 and CheXpert builders on tiny copies of their layouts.

The expected cohorts are computed here from the fixture tables, plainly with
pandas / numpy / sklearn as the reference preprocessing does (SPEC section
2), never through the builders' helpers.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import dataset_fixtures as fx
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.model_selection import train_test_split

from ncjax import datasets, prepare
from ncjax.datasets import downloaded
from ncjax.errors import DataError

SIZES = {"papila": (6, 8), "ham10000": (6, 8), "chexpert": (6, 6)}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _build(name, manual_dir, data_dir, **kwargs):
  kwargs.setdefault("num_workers", 1)
  return prepare.prepare(name, manual_dir, data_dir, image_size=SIZES[name], **kwargs)


def _records(builder, split):
  source = builder.as_data_source(split)
  return source.__getitems__(list(range(len(source))))


def _text(value):
  return value.decode() if isinstance(value, bytes) else value


def _rows(builder, attributes):
  """split -> sorted (path, label, id, *attributes) of the stored examples."""
  out = {}
  for split in datasets.SPLITS:
    out[split] = sorted(
        (_text(r["path"]), int(r["label"]), _text(r["id"])) + tuple(int(r[a]) for a in attributes)
        for r in _records(builder, split)
    )
  return out


def _expected_rows(table, attributes):
  return {
      split: sorted(
          (p, int(y), str(i)) + tuple(int(a) for a in attrs)
          for p, y, i, *attrs in table[table.split == split][
              ["path", "label", "id", *attributes]
          ].itertuples(index=False)
      )
      for split in datasets.SPLITS
  }


def _assert_images_match_files(builder, name):
  """Every stored image has its shape and its source file's colour."""
  height, width = SIZES[name]
  channels = 1 if name == "chexpert" else 3
  for split in datasets.SPLITS:
    for r in _records(builder, split):
      image = r["image"]
      assert image.shape == (height, width, channels)
      colour = fx.colour_of(_text(r["path"]))[:channels]
      np.testing.assert_allclose(image.mean(axis=(0, 1)), colour, atol=4)


def _nothing_prepared(data_dir):
  found = []
  for _root, dirs, files in os.walk(data_dir):
    found += [d for d in dirs if d.startswith("incomplete")]
    found += [f for f in files if f in ("dataset_info.json",) or "array_record" in f]
  return not found


# --- fixtures (built once per module) ----------------------------------------


@pytest.fixture(scope="module")
def papila(tmp_path_factory):
  manual = str(tmp_path_factory.mktemp("papila_manual"))
  patients = fx.write_papila(manual)
  data_dir = str(tmp_path_factory.mktemp("papila_data"))
  return manual, patients, _build("papila", manual, data_dir), data_dir


@pytest.fixture(scope="module")
def ham(tmp_path_factory):
  manual = str(tmp_path_factory.mktemp("ham_manual"))
  meta = fx.write_ham10000(manual)
  data_dir = str(tmp_path_factory.mktemp("ham_data"))
  return manual, meta, _build("ham10000", manual, data_dir), data_dir


@pytest.fixture(scope="module")
def chexpert(tmp_path_factory):
  manual = str(tmp_path_factory.mktemp("chexpert_manual"))
  tables = fx.write_chexpert(manual)
  data_dir = str(tmp_path_factory.mktemp("chexpert_data"))
  return manual, tables, _build("chexpert", manual, data_dir), data_dir


# --- expected cohorts, computed from the fixture tables -------------------------


def papila_expected(patients: pd.DataFrame) -> pd.DataFrame:
  # SS: np.random.seed(42); np.random.shuffle(OD ids as an object array).
  # permutation(n) shuffles arange(n) with the same draws, so it indexes the
  # same order.
  ids = patients["ID"].to_numpy(dtype=object)
  shuffled = ids[np.random.RandomState(42).permutation(len(ids))]
  n = len(ids)
  split_of = {p: "train" for p in shuffled[: int(n * 0.7)]}
  split_of.update({p: "validation" for p in shuffled[int(n * 0.7) : int(n * 0.8)]})
  split_of.update({p: "test" for p in shuffled[int(n * 0.8) :]})
  rows = []
  for eye in ("OD", "OS"):
    for _, p in patients.iterrows():
      if p[f"Diagnosis_{eye}"] == 2:
        continue
      rows.append(
          {
              "split": split_of[p["ID"]],
              "path": f"FundusImages/RET{p['ID'][1:]}{eye}.jpg",
              "label": p[f"Diagnosis_{eye}"],
              "id": p["ID"][1:],
              "sex": p["Gender"],
              "age": int(p["Age"] >= 60),
          }
      )
  return pd.DataFrame(rows)


def ham_expected(meta: pd.DataFrame, manual: str) -> pd.DataFrame:
  meta = meta[meta.age.notna() & meta.sex.notna()].copy()
  lesions = np.unique(meta.lesion_id)
  train, rest = train_test_split(lesions, test_size=0.2, random_state=0)
  val, test = train_test_split(rest, test_size=0.5, random_state=0)
  meta["split"] = np.select(
      [meta.lesion_id.isin(ids) for ids in (train, val, test)],
      ["train", "validation", "test"],
      default="",
  )
  folder = {
      f[: -len(".jpg")]: d
      for d in ("HAM10000_images_part_1", "HAM10000_images_part_2")
      for f in os.listdir(os.path.join(manual, d))
  }
  meta["path"] = [f"{folder[i]}/{i}.jpg" for i in meta.image_id]
  meta["label"] = meta.dx.isin(["mel", "akiec"]).astype(int)
  meta["id"] = meta.lesion_id
  meta["sex"] = np.where(meta.sex == "male", 0, 1)
  meta["age"] = np.where(meta.age.astype(int) > 60, 1, 0)
  return meta


def chexpert_expected(train, demo, split_file) -> pd.DataFrame:
  # As chexploration's sample notebook, then SS's relabelling.
  df = pd.concat([train, split_file.set_index("index")], axis=1)
  df = df[~df.split.isna()]
  df["patient_id"] = df.Path.str.split("/", expand=True)[2]
  demo = demo.rename(columns={"PATIENT": "patient_id", "PRIMARY_RACE": "race",
                              "ETHNICITY": "ethnicity"})  # fmt: skip
  df = demo.drop(columns=["GENDER", "AGE_AT_CXR"]).merge(df, on="patient_id")
  race = df.race.astype(object)
  for name in ("Black", "White", "Asian"):
    race = race.where(~race.str.contains(name, na=False), name)
  df = df.assign(race=race)
  df = df[df.race.isin(["Asian", "Black", "White"])]
  df = df[df.ethnicity.isin(["Non-Hispanic/Non-Latino", "Not Hispanic"])]
  df = df[df["Frontal/Lateral"] == "Frontal"]
  splits = {"train": "train", "validate": "validation", "test": "test"}
  return pd.DataFrame(
      {
          "split": df.split.map(splits),
          "path": df.Path,
          "label": np.where(df["No Finding"] == 1, 0, 1),
          "id": df.patient_id,
          "sex": np.where(df.Sex == "Female", 1, 0),
          "age": np.where(df.Age >= 60, 1, 0),
          "race": np.where(df.race == "White", 0, 1),
      }
  )


# --- cohorts, labels, attributes, splits ------------------------------------------


def test_papila_matches_the_reference_cohort(papila):
  manual, patients, builder, _ = papila
  expected = papila_expected(patients)
  assert _rows(builder, ("sex", "age")) == _expected_rows(expected, ("sex", "age"))
  assert 0 < (expected.label == 1).sum() < len(expected)
  _assert_images_match_files(builder, "papila")


def test_ham10000_matches_the_reference_cohort(ham):
  manual, meta, builder, _ = ham
  expected = ham_expected(meta, manual)
  assert _rows(builder, ("sex", "age")) == _expected_rows(expected, ("sex", "age"))
  unknown = meta.age.notna() & (meta.sex == "unknown")
  assert builder.info.metadata["sex_unknown_counted_as_female"] == unknown.sum() > 0
  assert set(meta.age[meta.age.notna()]) >= {60.0, 65.0}  # the boundary is tested
  _assert_images_match_files(builder, "ham10000")


def test_chexpert_matches_the_reference_cohort(chexpert):
  manual, (train, demo, split_file), builder, _ = chexpert
  expected = chexpert_expected(train, demo, split_file)
  attributes = ("sex", "age", "race")
  assert _rows(builder, attributes) == _expected_rows(expected, attributes)
  assert set(expected.race) == {0, 1}
  _assert_images_match_files(builder, "chexpert")


@pytest.mark.parametrize("name", ["papila", "ham", "chexpert"])
def test_no_patient_or_lesion_in_two_splits(name, request):
  builder = request.getfixturevalue(name)[2]
  ids = {s: {_text(r["id"]) for r in _records(builder, s)} for s in datasets.SPLITS}
  assert all(ids.values())
  assert not ids["train"] & ids["validation"]
  assert not ids["train"] & ids["test"]
  assert not ids["validation"] & ids["test"]


def test_same_files_build_identically(ham, tmp_path):
  manual, _, first, _ = ham
  # Another data dir, and decoding in a pool of 2 processes instead of here.
  second = _build("ham10000", manual, str(tmp_path), num_workers=2)
  for split in datasets.SPLITS:
    a, b = _records(first, split), _records(second, split)
    assert [_text(r["path"]) for r in a] == [_text(r["path"]) for r in b]
    for ra, rb in zip(a, b, strict=True):
      assert ra.keys() == rb.keys()
      for key in ra:
        np.testing.assert_array_equal(ra[key], rb[key])


def test_load_split_and_summary(papila):
  manual, patients, builder, data_dir = papila
  expected = papila_expected(patients)
  split = datasets.load_split("papila", "train", data_dir=data_dir, image_size=SIZES["papila"])
  assert split.images.shape == ((expected.split == "train").sum(), 6, 8, 3)
  assert set(split.attributes) == {"sex", "age"}

  summary = prepare.summarize("papila", data_dir, image_size=SIZES["papila"])
  assert summary["samples"] == len(expected)
  assert summary["positives"] == expected.label.sum()
  assert summary["splits"] == {
      s: ((expected.split == s).sum(), expected.label[expected.split == s].sum())
      for s in datasets.SPLITS
  }
  for attribute in ("sex", "age"):
    group = expected[attribute]
    assert [(n, p) for _, n, p in summary["groups"][attribute]] == [
        ((group == g).sum(), expected.label[group == g].sum()) for g in (0, 1)
    ]
  table = prepare.format_summary(summary)
  positives = expected.label.sum()
  assert re.search(rf"^ +samples +{len(expected)} +100% +{positives} ", table, re.M)
  assert "G1 age: >=60" in table and "skipped unreadable images: 0" in table


def test_percent_has_three_significant_digits():
  assert prepare._percent(87, 420) == "20.7%"
  assert prepare._percent(11, 170) == "6.47%"
  assert prepare._percent(76, 250) == "30.4%"
  assert prepare._percent(1, 1) == "100%"


# --- image resizing -----------------------------------------------------------


def test_cover_resize_keeps_aspect_and_center_crops(tmp_path):
  # 32 x 12, red | green | blue thirds (8, 16, 8 columns). Covering 6 x 8
  # scales by 1/2 to 16 x 6; the central 8 columns are the green part.
  pixels = np.zeros((12, 32, 3), np.uint8)
  pixels[:, :8, 0] = pixels[:, 8:24, 1] = pixels[:, 24:, 2] = 255
  Image.fromarray(pixels).save(tmp_path / "wide.png")
  image = downloaded.load_image(str(tmp_path / "wide.png"), (6, 8, 3), "cover")
  assert image.shape == (6, 8, 3)
  np.testing.assert_allclose(image[:, 1:-1].mean(axis=(0, 1)), [0, 255, 0], atol=2)


def test_stretch_resize_ignores_aspect_and_makes_grayscale(tmp_path):
  Image.new("RGB", (30, 10), (200, 200, 200)).save(tmp_path / "x.png")
  image = downloaded.load_image(str(tmp_path / "x.png"), (6, 6, 1), "stretch")
  assert image.shape == (6, 6, 1) and image.dtype == np.uint8
  assert abs(int(image.mean()) - 200) <= 1


# --- bad input ----------------------------------------------------------------


def _copy(manual, tmp_path):
  target = str(tmp_path / "manual")
  shutil.copytree(manual, target)
  return target


def test_missing_manual_dir(tmp_path):
  with pytest.raises(DataError, match=r"manual_dir .*nowhere: folder not found"):
    prepare.prepare("papila", str(tmp_path / "nowhere"), str(tmp_path / "data"))


@pytest.mark.parametrize(
    "name, remove, message",
    [
        ("ham", "HAM10000_metadata.csv", r"HAM10000_metadata.csv: file not found"),
        ("papila", "ClinicalData/patient_data_os.xlsx", r"patient_data_os.xlsx: file not found"),
        ("chexpert", "CHEXPERT DEMO.xlsx", r"CHEXPERT DEMO.xlsx: file not found"),
        ("chexpert", "CheXpert-v1.0-small", r"no CheXpert-v1.0-small/train.csv"),
        ("ham", "HAM10000_images_part_2", r"image\(s\) missing .*ISIC_\d+.jpg \(not in \./, HAM10000_images_part_1/\)"),
    ],
)  # fmt: skip
def test_missing_file_or_folder(name, remove, message, request, tmp_path):
  manual = _copy(request.getfixturevalue(name)[0], tmp_path)
  target = os.path.join(manual, remove)
  shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
  data_dir = str(tmp_path / "data")
  dataset = {"ham": "ham10000"}.get(name, name)
  with pytest.raises(DataError, match=message):
    _build(dataset, manual, data_dir)
  assert _nothing_prepared(data_dir)


def test_missing_column(ham, chexpert, tmp_path):
  manual = _copy(ham[0], tmp_path / "ham")
  csv = os.path.join(manual, "HAM10000_metadata.csv")
  pd.read_csv(csv).drop(columns=["dx"]).to_csv(csv, index=False)
  message = r"HAM10000_metadata.csv: missing column\(s\) \['dx'\]"
  with pytest.raises(DataError, match=message):
    _build("ham10000", manual, str(tmp_path / "data"))

  manual = _copy(chexpert[0], tmp_path / "chexpert")
  csv = os.path.join(manual, "chexpert_split_2021_08_20.csv")
  pd.read_csv(csv).drop(columns=["split"]).to_csv(csv, index=False)
  message = r"chexpert_split_2021_08_20.csv: missing column\(s\) \['split'\]"
  with pytest.raises(DataError, match=message):
    _build("chexpert", manual, str(tmp_path / "data"))
  assert _nothing_prepared(str(tmp_path / "data"))


def test_papila_without_its_header_rows(papila, tmp_path):
  manual = _copy(papila[0], tmp_path)
  path = os.path.join(manual, "ClinicalData", "patient_data_od.xlsx")
  pd.DataFrame({"Age": [50], "Gender": [0], "Diagnosis": [0]}).to_excel(path)
  with pytest.raises(DataError, match=r"patient_data_od.xlsx: no row labelled 'ID'"):
    _build("papila", manual, str(tmp_path / "data"))


def test_undecodable_image_fails_or_is_skipped(papila, tmp_path):
  manual_dir, patients, _, _ = papila
  manual = _copy(manual_dir, tmp_path)
  expected = papila_expected(patients)
  broken = expected.path.iloc[0]
  with open(os.path.join(manual, broken), "wb") as f:
    f.write(b"not a jpeg")
  data_dir = str(tmp_path / "data")
  message = rf"^1 image\(s\) could not be read: {broken} \("
  with pytest.raises(DataError, match=message) as e:
    _build("papila", manual, data_dir)
  assert "--skip_bad_images" in str(e.value) and "\n" not in str(e.value)
  assert _nothing_prepared(data_dir)
  assert not os.path.exists(os.path.join(data_dir, "papila", "6x8"))

  builder = _build("papila", manual, data_dir, skip_bad_images=True)
  counts = {s: builder.info.splits[s].num_examples for s in datasets.SPLITS}
  assert sum(counts.values()) == len(expected) - 1
  summary = prepare.summarize("papila", data_dir, image_size=SIZES["papila"])
  assert [s["path"] for s in summary["metadata"]["skipped_images"]] == [broken]
  assert "skipped unreadable images: 1" in prepare.format_summary(summary)


def test_missing_image_is_skipped_when_asked(ham, tmp_path):
  manual_dir, meta, builder, _ = ham
  manual = _copy(manual_dir, tmp_path)
  path = _text(_records(builder, "test")[0]["path"])
  os.remove(os.path.join(manual, path))
  with pytest.raises(DataError, match=rf"1 image\(s\) missing .*{path[-16:]}"):
    _build("ham10000", manual, str(tmp_path / "data"))
  built = _build("ham10000", manual, str(tmp_path / "data"), skip_bad_images=True)
  before = builder.info.splits["test"].num_examples
  assert built.info.splits["test"].num_examples == before - 1


def test_unknown_attribute_lists_the_valid_ones():
  with pytest.raises(DataError, match=r"no attribute 'race'; valid: \['sex', 'age'\]"):
    datasets.check_attribute("papila", "race")
  datasets.check_attribute("chexpert", "race")


def test_unprepared_dataset_says_how_to_prepare(tmp_path):
  message = r"not prepared .*python -m ncjax.prepare --dataset=ham10000"
  with pytest.raises(DataError, match=message):
    datasets.load_split("ham10000", "train", data_dir=str(tmp_path))


# --- the command line ---------------------------------------------------------


def _cli(*args):
  return subprocess.run(
      [sys.executable, "-m", "ncjax.prepare", *args],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
  )  # fmt: skip


def test_cli_prints_one_line_error_and_exits_2(tmp_path):
  result = _cli("--dataset=papila", f"--manual_dir={tmp_path / 'absent'}",
                f"--data_dir={tmp_path / 'data'}")  # fmt: skip
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith("error: manual_dir ")
  assert "Traceback" not in result.stderr


def test_cli_builds_and_prints_table_1(ham, tmp_path):
  manual, meta, _, _ = ham
  expected = ham_expected(meta, manual)
  result = _cli("--dataset=ham10000", f"--manual_dir={manual}", "--image_size=6x8",
                f"--data_dir={tmp_path}", "--num_workers=1")  # fmt: skip
  assert result.returncode == 0, result.stderr
  assert f"ham10000: {len(expected)} images of 6x8x3" in result.stdout
  assert "G1 sex: female" in result.stdout
