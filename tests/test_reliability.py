"""Reliability: kill -9 and rerun, determinism, non-finite guards, hostile
configs, an unusable workdir.

The reference everywhere is the session's uninterrupted tiny run
(`tiny_run`); a rerun must reproduce it bit for bit on CPU.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ncjax import checkpoints, metric_writers, train
from ncjax import workdir as workdir_lib
from ncjax.errors import ConfigError, WorkdirError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(config, workdir, *extra) -> list[str]:
  return [
      sys.executable,
      "-m",
      "ncjax.main",
      "--config=configs/synthetic.py:tiny",
      f"--config.dataset.data_dir={config.dataset.data_dir}",
      f"--workdir={workdir}",
      "--config.study.combos=()",
      *extra,
  ]


def _env() -> dict[str, str]:
  return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def _read(path) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _assert_same_run(reference: str, other: str, member_names) -> None:
  """metrics.jsonl byte for byte, flips, early-stopping epochs, and every
  array of both stage checkpoints exactly."""
  assert _read(os.path.join(other, "metrics.jsonl")) == _read(
      os.path.join(reference, "metrics.jsonl")
  )
  for name in member_names:
    assert _read(os.path.join(other, "bias", f"{name}.json")) == _read(
        os.path.join(reference, "bias", f"{name}.json")
    )
    for stage in checkpoints.STAGES:
      want = checkpoints.restore_stage(reference, name, stage)
      got = checkpoints.restore_stage(other, name, stage)
      assert jax.tree.structure(got) == jax.tree.structure(want)
      for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with (
      open(os.path.join(reference, "train_summary.json")) as f,
      open(os.path.join(other, "train_summary.json")) as g,
  ):
    assert json.load(f)["members"] == json.load(g)["members"]


def _lines(path) -> int:
  try:
    with open(path) as f:
      return sum(1 for _ in f)
  except FileNotFoundError:
    return 0


def _saving(workdir) -> bool:
  """An Orbax checkpoint is being written (its temporary directory exists)."""
  latest = os.path.join(workdir, "checkpoints", "latest")
  try:
    return any("tmp" in name for name in os.listdir(latest))
  except FileNotFoundError:
    return False


def test_killed_anywhere_then_rerun_equals_an_uninterrupted_run(tiny_run, tmp_path):
  """SIGKILL while an epoch trains, right after an epoch's records (during
  evaluation of the next members or the checkpoint save) and while Orbax
  writes a checkpoint; the same command then finishes the run."""
  config, reference, _ = tiny_run
  work = tmp_path / "killed"
  metrics = work / "metrics.jsonl"
  per_epoch = _lines(os.path.join(reference, "metrics.jsonl")) // config.epochs
  rng = np.random.default_rng(0)
  triggers = [
      ("first records", lambda: _lines(metrics) >= 1, 0.0),
      ("mid-save", lambda: _saving(work), 0.0),
      ("after an epoch", lambda: _lines(metrics) >= 2 * per_epoch, rng.uniform(0, 0.3)),
  ]
  killed = []
  for name, fired, delay in triggers:
    proc = subprocess.Popen(
        _command(config, work),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while proc.poll() is None and not fired() and time.monotonic() < deadline:
      time.sleep(0.002)
    time.sleep(delay)
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
      killed.append(name)
    proc.wait(timeout=60)
  assert len(killed) >= 2, killed  # most kills landed before the run finished
  proc = subprocess.run(
      _command(config, work),
      cwd=ROOT,
      env=_env(),
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  names = [m["name"] for m in json.load(open(os.path.join(reference, train.RUN_FILE)))["members"]]
  _assert_same_run(reference, str(work), names)


def test_torn_checkpoint_and_torn_log_line_are_never_loaded(tiny_run, tmp_path):
  """A half-written Orbax directory of the last epoch and a metrics line cut
  short: the rerun ignores both and redoes the epoch identically."""
  config, reference, _ = tiny_run
  work = str(tmp_path / "torn")
  shutil.copytree(reference, work)
  latest = os.path.join(work, "checkpoints", "latest")
  last = os.path.join(latest, str(config.epochs))
  shutil.rmtree(last)
  os.makedirs(f"{last}.orbax-checkpoint-tmp-1")
  with open(os.path.join(f"{last}.orbax-checkpoint-tmp-1", "garbage"), "wb") as f:
    f.write(os.urandom(64))
  os.remove(os.path.join(work, "train_summary.json"))
  for name in os.listdir(os.path.join(work, "checkpoints")):
    if name != "latest":
      shutil.rmtree(os.path.join(work, "checkpoints", name))
  with open(os.path.join(work, "metrics.jsonl"), "a") as f:
    f.write('{"epoch": 4, "member": "seed0_bi')  # killed mid-append
  assert checkpoints.LatestCheckpoint(work).latest_epoch() == config.epochs - 1
  train.train_and_evaluate(config, work)
  names = [m["name"] for m in json.load(open(os.path.join(reference, train.RUN_FILE)))["members"]]
  _assert_same_run(reference, work, names)


def test_a_broken_log_line_before_the_end_is_an_error(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"epoch": 1}\n{"epoch": 2, "loss\n{"epoch": 3}\n')
  with pytest.raises(ValueError, match="metrics.jsonl line 2 is not a JSON record"):
    metric_writers.read_records(str(path))


def test_seed_order_does_not_change_any_members_results(tiny_run, tiny_config, tmp_path):
  config, reference, _ = tiny_run
  tiny_config.seeds = tuple(reversed(config.seeds))
  tiny_config.bias.rates = tuple(reversed(config.bias.rates))
  work = str(tmp_path / "reordered")
  train.train_and_evaluate(tiny_config, work)
  key = lambda r: (r["epoch"], r["member"], r["split"])
  want = {key(r): r for r in metric_writers.read_records(os.path.join(reference, "metrics.jsonl"))}
  got = {key(r): r for r in metric_writers.read_records(os.path.join(work, "metrics.jsonl"))}
  assert got == want  # every value exactly
  for m in ("seed0_bias0.25", "seed1_bias0"):
    for x, y in zip(
        jax.tree.leaves(checkpoints.restore_stage(reference, m, "final")),
        jax.tree.leaves(checkpoints.restore_stage(work, m, "final")),
        strict=True,
    ):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_non_finite_nc_metric_stops_naming_member_epoch_and_quantity(
    tiny_config, tmp_path, monkeypatch
):
  """NC3 of the first member turns NaN in epoch 2: the run stops naming it,
  epoch 1 stays logged and resumable, epoch 2 is neither."""
  real = train._nc_fns  # pylint: disable=protected-access
  per_epoch = 3 * len(tiny_config.seeds) * len(tiny_config.bias.rates)
  calls = [0]

  def poisoned_fns(num_groups):
    nc_fn, means_fn = real(num_groups)

    def nc(*args):
      out = dict(nc_fn(*args))
      calls[0] += 1
      if calls[0] == per_epoch + 1:  # epoch 2, first member, train split
        out["nc3"] = out["nc3"] * np.nan
      return out

    return nc, means_fn

  monkeypatch.setattr(train, "_nc_fns", poisoned_fns)
  work = str(tmp_path / "w")
  with pytest.raises(
      train.NonFiniteError, match=r"non-finite train nc3 \(nan\) for member seed0_bias0 at epoch 2"
  ):
    train.train_and_evaluate(tiny_config, work)
  assert checkpoints.LatestCheckpoint(work).latest_epoch() == 1
  assert {r["epoch"] for r in metric_writers.read_records(os.path.join(work, "metrics.jsonl"))} == {
      1
  }


def test_batch_not_divisible_by_the_devices_is_one_line(tiny_run, tmp_path):
  config, _, _ = tiny_run
  env = dict(_env(), XLA_FLAGS="--xla_force_host_platform_device_count=4")
  proc = subprocess.run(
      _command(config, tmp_path / "w", "--config.batch_size=30"),
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: batch_size 30 is not divisible by the 4 devices"
  )
  assert not (tmp_path / "w").exists()


def test_zero_epochs_is_a_config_error(tiny_config, tmp_path):
  tiny_config.epochs = 0
  with pytest.raises(ConfigError, match="epochs must be >= 1, got 0"):
    train.train_and_evaluate(tiny_config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_patience_longer_than_the_run_keeps_the_best_epoch(tiny_config, tmp_path):
  """Documented: early stopping never triggers; the early stage is still the
  lowest-validation-loss epoch."""
  tiny_config.early_stopping.patience = 10
  tiny_config.seeds = (0,)
  work = str(tmp_path / "w")
  summary = train.train_and_evaluate(tiny_config, work)
  records = metric_writers.read_records(os.path.join(work, "metrics.jsonl"))
  for name, es in summary["members"].items():
    val = [r["loss"] for r in records if r["member"] == name and r["split"] == "validation"]
    assert not es["stopped"]
    assert es["best_epoch"] == 1 + int(np.argmin(val))


def test_bias_for_a_group_without_positives_warns_and_flips_nothing(tiny_config, tmp_path, caplog):
  tiny_config.bias.group = 7  # no such group: nobody is eligible
  tiny_config.seeds = (0,)
  tiny_config.bias.rates = (0.25,)
  work = str(tmp_path / "w")
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(tiny_config, work)
  assert any("group 7" in r.getMessage() for r in caplog.records), caplog.text
  with open(os.path.join(work, "bias", "seed0_bias0.25.json")) as f:
    assert all(not ids for ids in json.load(f)["flipped_ids"].values())


def test_full_disk_fails_before_anything_is_written(tiny_config, tmp_path, monkeypatch):
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(workdir_lib.shutil, "disk_usage", lambda _: usage._replace(free=1 << 20))
  with pytest.raises(WorkdirError, match=r"has 1 MiB free on its disk; .* need about \d+ MiB"):
    train.train_and_evaluate(tiny_config, str(tmp_path / "w"))
  assert os.listdir(tmp_path / "w") == []


def test_unwritable_workdir_fails_before_training(tiny_config, tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(WorkdirError, match=r"workdir .*file/w is not writable"):
    train.train_and_evaluate(tiny_config, str(blocker / "w"))


def _children(pid: int) -> list[int]:
  out = []
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry))
      except (OSError, IndexError, ValueError):
        pass
  return out


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


def test_study_workers_exit_when_the_study_is_killed(tiny_run, tmp_path):
  """kill -9 of the study process must not leave workers writing into the
  workdirs a rerun would use."""
  config, _, _ = tiny_run
  proc = subprocess.Popen(
      [
          sys.executable,
          "-m",
          "ncjax.main",
          "--config=configs/synthetic.py:tiny",
          f"--config.dataset.data_dir={config.dataset.data_dir}",
          f"--workdir={tmp_path / 'study'}",
          "--config.study.workers=2",
          "--config.epochs=2000",  # jobs far longer than the wait below
      ],
      cwd=ROOT,
      env=_env(),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
  )
  deadline = time.monotonic() + 120
  started = lambda: any(
      os.path.exists(tmp_path / "study" / kind / "synthetic-low" / "metrics.jsonl")
      for kind in ("combos", "separability")
  )
  while time.monotonic() < deadline and not started():
    time.sleep(0.2)
  workers = _children(proc.pid)  # the pool's workers (and its resource tracker)
  assert proc.poll() is None and len(workers) >= 2
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  deadline = time.monotonic() + 20  # the workers check for their parent every second
  while time.monotonic() < deadline and any(_alive(p) for p in workers):
    time.sleep(0.2)
  assert not any(_alive(p) for p in workers)
