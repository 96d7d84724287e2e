"""The study driver: combinations, separability models, resume, failures."""

from __future__ import annotations

import json
import os

import pytest

from ncjax import study
from ncjax.errors import NcjaxError


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, data_dir):
  from configs import synthetic  # pylint: disable=import-outside-toplevel

  config = synthetic.get_config("tiny")
  config.dataset.data_dir = data_dir
  config.study.workers = 1
  workdir = str(tmp_path_factory.mktemp("study"))
  result = study.run(config, workdir)
  return config, workdir, result


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
  config.study.combos = ("high", "nosuchattribute")
  config.study.separability = False
  with pytest.raises(NcjaxError, match=r"1 of 2 runs failed: combos/synthetic-nosuchattribute"):
    study.run(config, str(tmp_path))
  assert os.path.exists(tmp_path / "combos" / "synthetic-high" / "stage_eval.jsonl")
