"""The study driver: combinations, separability models, resume, failures."""

from __future__ import annotations

import json
import os

import pytest

from ncjax import study
from ncjax.errors import ConfigError, NcjaxError

# `tiny_study` (conftest.py) is the session's tiny study, shared with the colab tests.


def test_study_trains_every_combination_and_separability_model(tiny_study):
  config, workdir, result = tiny_study
  for attr in config.study.combos:
    for kind in ("combos", "separability"):
      run = os.path.join(workdir, kind, f"synthetic-{attr}")
      assert os.path.exists(os.path.join(run, "stage_eval.jsonl")), run
    with open(os.path.join(workdir, "separability", f"synthetic-{attr}", "config.json")) as f:
      sep = json.load(f)["config"]
    assert sep["target"] == attr and sep["bias"]["rates"] == [0.0]
    assert sep["epochs"] == config.study.separability_epochs
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert set(summary["combos"]) == {f"synthetic-{a}" for a in config.study.combos}
  assert os.path.exists(result["report"])


def test_rerun_redoes_nothing(tiny_study):
  config, workdir, _ = tiny_study
  paths = [
      os.path.join(workdir, kind, f"synthetic-{a}", f)
      for kind in ("combos", "separability")
      for a in config.study.combos
      for f in ("metrics.jsonl", "stage_eval.jsonl")
  ]
  before = {p: os.path.getmtime(p) for p in paths}
  study.run(config, workdir)
  assert {p: os.path.getmtime(p) for p in paths} == before


def test_a_failing_combination_is_named_and_the_others_finish(tiny_study, tmp_path):
  config, _, _ = tiny_study
  config = config.copy_and_resolve_references()
  # PAPILA is not prepared in the test's data_dir: that job fails on its own.
  config.study.combos = ("high", "papila:sex")
  config.study.separability = False
  with pytest.raises(NcjaxError, match=r"1 of 2 runs failed: combos/papila-sex: .*not prepared"):
    study.run(config, str(tmp_path))
  assert os.path.exists(tmp_path / "combos" / "synthetic-high" / "stage_eval.jsonl")


def test_a_combination_naming_an_unknown_attribute_fails_before_anything_runs(tiny_study, tmp_path):
  config, _, _ = tiny_study
  config = config.copy_and_resolve_references()
  config.study.combos = ("high", "hihg")
  with pytest.raises(ConfigError, match=r"'hihg' is not an attribute .*valid: \['high', 'low'"):
    study.run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
