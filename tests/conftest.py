"""Shared fixtures: the tiny synthetic config and one tiny run per session.

Tests shrink the real config (`configs/synthetic.py:tiny`) rather than
building toy ones, and share one trained workdir where they only read it.
"""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "configs"))  # `import synthetic` works too

from configs import synthetic as synthetic_config  # noqa: E402  pylint: disable=wrong-import-position
from ncjax import runtime  # noqa: E402  pylint: disable=wrong-import-position

# Tests run under the XLA flags a run gets from `ncjax.main`, set before any
# test starts JAX's backend.
runtime.add_xla_flags(synthetic_config.get_config().xla_flags)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture
def tiny_config(data_dir):
  """A fresh, unlocked-for-nothing copy of the tiny config (still locked)."""
  config = synthetic_config.get_config("tiny")
  config.dataset.data_dir = data_dir
  return config


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, data_dir):
  """(config, workdir, summary) of one finished tiny run, shared read-only."""
  from ncjax import train  # pylint: disable=import-outside-toplevel

  config = synthetic_config.get_config("tiny")
  config.dataset.data_dir = data_dir
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  summary = train.train_and_evaluate(config, workdir)
  return config, workdir, summary


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory, data_dir):
  """(config, study dir, result) of the tiny study (`ncjax.study.run`: two
  attributes with separability models), shared read-only."""
  from ncjax import study  # pylint: disable=import-outside-toplevel

  config = synthetic_config.get_config("tiny")
  config.dataset.data_dir = data_dir
  config.study.workers = 1
  workdir = str(tmp_path_factory.mktemp("study"))
  result = study.run(config, workdir)
  return config, workdir, result
