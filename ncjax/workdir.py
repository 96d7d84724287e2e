"""The workdir: what a run writes, and the guard against mixing two runs.

Layout:
  config.json        resolved config and command-line overrides
  metrics.jsonl      one record per (epoch, member, split)
  tensorboard/       one TensorBoard run per member
  bias/              flipped example ids per member and split
  checkpoints/       Orbax: latest/ (resume), <member>/early, <member>/final
  train_summary.json early-stopping epoch per member, timings; written last

A workdir belongs to one config: starting a run in a workdir written by a
different config fails before anything is written, naming the fields that
differ. Only fields that cannot change results may differ (`_RUNTIME_FIELDS`).
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import jax

from ncjax.errors import WorkdirError

CONFIG_FILE = "config.json"
TRAIN_SUMMARY_FILE = "train_summary.json"  # the last file train_and_evaluate writes
# Fields that do not change what a run computes (a run started with one value
# may resume with another). `input.*`: resident and streamed splits feed the
# same batches in the same order.
_RUNTIME_FIELDS = (
    "dataset.data_dir",
    "progress",
    "members.strategy",
    "members.per_step",
    "checkpoint.every",
    "study.workers",
    "compilation_cache_dir",
    "xla_flags",
    "input.streaming",
    "input.threads",
    "input.prefetch",
)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def config_to_dict(config) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def check_writable(workdir: str) -> None:
  """Fails now, not after an hour of training, if `workdir` is unusable."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test"):
      pass
  except OSError as e:
    raise WorkdirError(f"workdir {workdir} is not writable: {e.strerror}") from None


def check_free_space(workdir: str, needed_bytes: int) -> None:
  """Fails now if the disk under `workdir` cannot hold the run's checkpoints."""
  free = shutil.disk_usage(workdir).free
  if free < needed_bytes:
    raise WorkdirError(
        f"workdir {workdir} has {free / 2**20:.0f} MiB free on its disk; this run's "
        f"checkpoints need about {needed_bytes / 2**20:.0f} MiB"
    )


def check_config(workdir: str, config) -> bool:
  """True if `workdir` holds a run of this config, False if it is new.

  Raises WorkdirError if it holds a run of a different config.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return False
  with open(path) as f:
    old = _flatten(json.load(f)["config"])
  new = _flatten(config_to_dict(config))
  diff = sorted(
      k for k in old.keys() | new.keys() if k not in _RUNTIME_FIELDS and old.get(k) != new.get(k)
  )
  if diff:
    shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:3])
    more = f" (+{len(diff) - 3} more)" if len(diff) > 3 else ""
    raise WorkdirError(
        f"workdir {workdir} was written by a different config ({shown}{more}); "
        "use a new --workdir"
    )
  return True


def write_config(workdir: str, config, overrides: Mapping[str, Any] | None = None) -> None:
  if jax.process_index() != 0:
    return
  payload = {"config": config_to_dict(config), "overrides": dict(overrides or {})}
  tmp = os.path.join(workdir, CONFIG_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, os.path.join(workdir, CONFIG_FILE))


def finished(workdir: str) -> bool:
  """Whether `workdir` holds a finished run: rerunning it would change nothing.

  A training workdir is finished once `train.train_and_evaluate` has written
  train_summary.json, its last file (after the final epoch and the stage
  checkpoints); a study workdir (`study.combos` set) once `study.run` has
  written summary.json and the report, which it does only after every job
  trained and was evaluated.
  """
  config = read_config(workdir)["config"]
  if (config.get("study") or {}).get("combos"):
    # Imported here: only studies need the report's file names.
    from ncjax import report, study_results  # pylint: disable=import-outside-toplevel

    return os.path.exists(os.path.join(workdir, study_results.SUMMARY_FILE)) and os.path.exists(
        os.path.join(workdir, report.REPORT_DIR, report.REPORT_FILE)
    )
  return os.path.exists(os.path.join(workdir, TRAIN_SUMMARY_FILE))


def read_config(workdir: str) -> dict[str, Any]:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise WorkdirError(f"{path} not found: is {workdir} an ncjax workdir?")
  with open(path) as f:
    return json.load(f)


def closest(name: str, options) -> str:
  """' (did you mean X?)' for a near miss, else ''."""
  match = difflib.get_close_matches(name, list(options), n=1)
  return f" (did you mean {match[0]!r}?)" if match else ""
