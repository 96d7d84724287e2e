"""End-to-end training on the tiny synthetic config.

One tiny run (conftest `tiny_run`) is shared; other runs reuse its dataset.
Values in metrics.jsonl are checked against numbers recomputed here from the
restored checkpoints with numpy.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ncjax import checkpoints, input_pipeline, members, metric_writers, train
from ncjax.errors import ConfigError, DataError, WorkdirError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLITS = ("train", "validation", "test")


def _records(workdir):
  return metric_writers.read_records(os.path.join(workdir, "metrics.jsonl"))


def _by_key(records):
  return {(r["epoch"], r["member"], r["split"]): r for r in records}


def test_metrics_cover_every_epoch_member_and_split(tiny_run):
  config, workdir, _ = tiny_run
  records = _records(workdir)
  names = [m.name for m in members.from_config(config)]
  keys = {(r["epoch"], r["member"], r["split"]) for r in records}
  expected = {(e, n, s) for e in range(1, config.epochs + 1) for n in names for s in SPLITS}
  assert keys == expected and len(records) == len(expected)
  for r in records:
    assert {"loss", "accuracy", "accuracy/g0", "accuracy/g1", "seed", "bias_rate"} <= set(r)
    assert np.isfinite(r["loss"]) and 0.0 <= r["accuracy"] <= 1.0


def _host_logits(workdir, config, member, stage, split):
  variables = checkpoints.restore_stage(workdir, member, stage)
  model = train.create_model(config)
  data = input_pipeline.load(config)[split]
  x = input_pipeline.normalize(data.images, config.dataset.mean, config.dataset.std)
  logits, _ = jax.jit(model.apply)(variables, x)
  return np.asarray(logits, np.float64), data


def _ce(logits, labels):
  logits = logits - logits.max(axis=1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  return -logp[np.arange(len(labels)), labels].mean()


def test_final_checkpoint_reproduces_the_logged_test_loss(tiny_run):
  config, workdir, _ = tiny_run
  member = "seed1_bias0.25"
  logits, data = _host_logits(workdir, config, member, "final", "test")
  logged = _by_key(_records(workdir))[(config.epochs, member, "test")]
  assert _ce(logits, data.labels) == pytest.approx(logged["loss"], rel=1e-4)
  g1 = data.groups == 1
  acc_g1 = (logits.argmax(1) == data.labels)[g1].mean()
  assert acc_g1 == pytest.approx(logged["accuracy/g1"], abs=1e-6)


def test_early_checkpoint_is_the_best_validation_epoch(tiny_run):
  """Early = lowest biased-validation loss before patience ran out."""
  config, workdir, summary = tiny_run
  member = "seed1_bias0.25"
  records = [r for r in _records(workdir) if r["member"] == member and r["split"] == "validation"]
  losses = [r["loss"] for r in sorted(records, key=lambda r: r["epoch"])]
  best = summary["members"][member]["best_epoch"]
  # Independent replay of patience-based early stopping.
  best_ref, best_loss, bad = 0, np.inf, 0
  for epoch, loss in enumerate(losses, start=1):
    if loss < best_loss:
      best_ref, best_loss, bad = epoch, loss, 0
    else:
      bad += 1
      if bad >= config.early_stopping.patience:
        break
  assert best == best_ref
  # Its validation loss, with the member's flipped labels, is the logged one.
  logits, data = _host_logits(workdir, config, member, "early", "validation")
  with open(os.path.join(workdir, "bias", f"{member}.json")) as f:
    flipped = set(json.load(f)["flipped_ids"]["validation"])
  labels = np.where(np.isin(data.ids, list(flipped)), 1 - data.labels, data.labels)
  assert _ce(logits, labels) == pytest.approx(losses[best - 1], rel=1e-4)


def test_flipped_ids_are_positives_of_group_1(tiny_run):
  config, workdir, _ = tiny_run
  splits = input_pipeline.load(config)
  with open(os.path.join(workdir, "bias", "seed0_bias0.25.json")) as f:
    flipped = json.load(f)["flipped_ids"]
  assert flipped["test"] == [] and flipped["train"]
  for split in ("train", "validation"):
    s = splits[split]
    sel = np.isin(s.ids, flipped[split])
    assert np.all(s.labels[sel] == 1) and np.all(s.groups[sel] == 1)
  with open(os.path.join(workdir, "bias", "seed0_bias0.json")) as f:
    assert json.load(f)["flipped_ids"] == {"train": [], "validation": [], "test": []}


def _run(config, workdir):
  train.train_and_evaluate(config, workdir)
  return _by_key(_records(workdir))


def _assert_member_equal(a, b, member, *, rtol):
  keys = [k for k in a if k[1] == member]
  assert keys and all(k in b for k in keys)
  for k in keys:
    for field in ("loss", "accuracy", "batch_loss"):
      if field in a[k]:
        assert b[k][field] == pytest.approx(a[k][field], rel=rtol, abs=1e-6), (k, field)


def test_member_strategies_equal_training_each_member_alone(tiny_run, tiny_config, tmp_path):
  """loop (shared run), vmap, and a run holding only one member agree."""
  _, workdir, _ = tiny_run
  shared = _by_key(_records(workdir))
  tiny_config.members.strategy = "vmap"
  tiny_config.members.per_step = 3  # 4 members: a vmapped step of 3, then of 1
  vmapped = _run(tiny_config, str(tmp_path / "vmap"))
  tiny_config.members.per_step = 0
  tiny_config.members.strategy = "loop"
  tiny_config.seeds = (1,)
  tiny_config.bias.rates = (0.25,)
  alone = _run(tiny_config, str(tmp_path / "alone"))
  for member in ("seed0_bias0", "seed1_bias0.25"):
    _assert_member_equal(shared, vmapped, member, rtol=1e-4)
  _assert_member_equal(shared, alone, "seed1_bias0.25", rtol=1e-6)


def _tiny_main(config, workdir, *flags: str) -> list[str]:
  """`python -m ncjax.main` for one run of the tiny config in `workdir`."""
  return [
      sys.executable,
      "-m",
      "ncjax.main",
      "--config=configs/synthetic.py:tiny",
      f"--config.dataset.data_dir={config.dataset.data_dir}",
      f"--workdir={workdir}",
      "--config.study.combos=()",
      *flags,
  ]


def test_four_fake_devices_give_the_same_losses(tiny_run, tmp_path):
  """Also: config.xla_flags reaches XLA (it makes the four devices)."""
  config, workdir, _ = tiny_run
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = tmp_path / "four"
  proc = subprocess.run(
      _tiny_main(config, out, "--config.xla_flags=--xla_force_host_platform_device_count=4"),
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(out / "train_summary.json") as f:
    assert json.load(f)["devices"] == 4
  one, four = _by_key(_records(workdir)), _by_key(_records(str(out)))
  assert one.keys() == four.keys()
  for member in {k[1] for k in one}:
    _assert_member_equal(one, four, member, rtol=1e-4)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one(tiny_run, tmp_path):
  """jax.distributed on localhost: two CPU processes (one device each) give
  the single-process run's metrics and stage checkpoints."""
  config, workdir, _ = tiny_run
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = tmp_path / "two"
  port = _free_port()
  procs = [
      subprocess.Popen(
          _tiny_main(
              config,
              out,
              f"--coordinator_address=localhost:{port}",
              "--num_processes=2",
              f"--process_id={i}",
          ),
          cwd=ROOT,
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
      )
      for i in range(2)
  ]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-2000:]
  with open(out / "train_summary.json") as f:
    assert json.load(f)["devices"] == 2
  one, two = _by_key(_records(workdir)), _by_key(_records(str(out)))
  assert one.keys() == two.keys()  # written once (process 0), nothing missing
  for key, record in one.items():  # losses, accuracies, every NC metric
    assert record.keys() == two[key].keys()
    for field, value in record.items():
      if isinstance(value, float):
        assert two[key][field] == pytest.approx(value, rel=1e-3, abs=1e-5), (key, field)
  for member in {k[1] for k in one}:
    _assert_member_equal(one, two, member, rtol=1e-4)
    for stage in checkpoints.STAGES:
      a = checkpoints.restore_stage(workdir, member, stage)
      b = checkpoints.restore_stage(str(out), member, stage)
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3, atol=1e-5)


def test_resume_from_latest_checkpoint_replays_identically(tiny_run, tmp_path):
  config, workdir, _ = tiny_run
  resumed = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed)
  latest = os.path.join(resumed, "checkpoints", "latest")
  shutil.rmtree(os.path.join(latest, str(config.epochs)))
  for m in members.from_config(config):
    shutil.rmtree(os.path.join(resumed, "checkpoints", m.name))
  assert checkpoints.LatestCheckpoint(resumed).latest_epoch() == config.epochs - 1
  train.train_and_evaluate(config, resumed)
  with (
      open(os.path.join(workdir, "metrics.jsonl")) as f,
      open(os.path.join(resumed, "metrics.jsonl")) as g,
  ):
    assert f.read() == g.read()
  for m in ("seed0_bias0", "seed1_bias0.25"):
    a = checkpoints.restore_stage(workdir, m, "final")
    b = checkpoints.restore_stage(resumed, m, "final")
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_workdir_of_another_config_is_refused_untouched(tiny_run, tiny_config):
  _, workdir, _ = tiny_run
  path = os.path.join(workdir, "config.json")
  before = open(path).read()
  tiny_config.optimizer.learning_rate = 0.5
  with pytest.raises(WorkdirError, match=r"different config \(optimizer.learning_rate"):
    train.train_and_evaluate(tiny_config, workdir)
  assert open(path).read() == before


def test_bias_rate_outside_unit_interval_fails_before_writing(tiny_config, tmp_path):
  tiny_config.bias.rates = (0.0, 1.5)
  with pytest.raises(ConfigError, match=r"bias rate must be in \[0, 1\], got 1.5"):
    train.train_and_evaluate(tiny_config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_unprepared_dataset_says_how_to_prepare(tiny_config, tmp_path):
  tiny_config.dataset.name = "papila"
  tiny_config.dataset.attribute = "sex"
  tiny_config.dataset.data_dir = str(tmp_path / "empty")
  with pytest.raises(DataError, match="not prepared.*python -m ncjax.prepare"):
    train.train_and_evaluate(tiny_config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_batch_larger_than_split_is_a_config_error(tiny_config, tmp_path):
  tiny_config.batch_size = 4096
  with pytest.raises(ConfigError, match="larger than the train split"):
    train.train_and_evaluate(tiny_config, str(tmp_path / "w"))


def test_cli_unknown_field_is_one_line_with_a_hint(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "ncjax.main", f"--workdir={tmp_path}/w", "--config.modle.width=3"],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "error: unknown config field 'modle' in --config.modle.width=3 (did you mean 'model'?)"
  ]
  assert not (tmp_path / "w").exists()


def test_no_tensorflow_is_imported():
  code = (
      "import sys, ncjax.train, ncjax.prepare, ncjax.datasets as d; d._import_builders(); "
      "assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
  )
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-1000:]


def test_logged_nc_metrics_equal_compute_on_restored_features(tiny_run):
  """Final-epoch train/test NC in metrics.jsonl == float64 `compute` on the
  eval-mode features of the final checkpoint (train centres for test)."""
  from ncjax import evaluate, neural_collapse  # pylint: disable=import-outside-toplevel

  config, workdir, _ = tiny_run
  member = "seed1_bias0.25"
  variables = checkpoints.restore_stage(workdir, member, "final")
  splits = input_pipeline.load(config)
  m = members.Member(1, 0.25)
  train_labels, flipped = input_pipeline.member_labels(splits, m, config)["train"]
  feats = {
      s: evaluate.features_and_logits(config, variables, splits[s].images)[1].astype(np.float64)
      for s in ("train", "test")
  }
  w = np.asarray(variables["params"]["fc"]["kernel"], np.float64).T
  b = np.asarray(variables["params"]["fc"]["bias"], np.float64)
  logged = _by_key(_records(workdir))
  want_train = neural_collapse.compute(feats["train"], train_labels, w, b, splits["train"].groups)
  centers = np.stack([feats["train"][train_labels == c].mean(0) for c in (0, 1)])
  want_test = neural_collapse.compute(
      feats["test"], splits["test"].labels, w, b, splits["test"].groups, centers=centers
  )
  for split, want in (("train", want_train), ("test", want_test)):
    got = logged[(config.epochs, member, split)]
    for key in ("nc1", "nc1_trace", "nc1_dist", "nc2_etf_w", "nc3", "nc4", "nc1/g1", "nc1_own/g0"):
      assert got[key] == pytest.approx(want[key], rel=2e-3, abs=1e-5), (split, key)
  # flipped_near_true, recomputed plainly in numpy.
  f = feats["train"]
  mu0, mu1 = (f[train_labels == c].mean(0) for c in (0, 1))
  near = np.linalg.norm(f - mu1, axis=1) < np.linalg.norm(f - mu0, axis=1)
  assert flipped.any()
  assert logged[(config.epochs, member, "train")]["flipped_near_true"] == pytest.approx(
      near[flipped].mean(), abs=1e-6
  )


def test_non_finite_loss_stops_naming_member_and_epoch(tiny_config, tmp_path):
  tiny_config.optimizer.name = "sgd"
  tiny_config.optimizer.learning_rate = 1e38  # weights overflow in one step
  with pytest.raises(train.NonFiniteError, match=r"train loss .* member seed0_bias0 at epoch 1"):
    train.train_and_evaluate(tiny_config, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "metrics.jsonl")


def test_train_and_test_are_evaluated_on_nc_epochs_only(tiny_config, tmp_path):
  """nc.every = 2 over 3 epochs: validation every epoch (early stopping),
  train and test with NC at epochs 2 and 3, the batch loss every epoch."""
  tiny_config.nc.every = 2
  tiny_config.seeds = (0,)
  train.train_and_evaluate(tiny_config, str(tmp_path / "w"))
  records = _records(str(tmp_path / "w"))
  for epoch in (1, 2, 3):
    got = {r["split"]: r for r in records if r["epoch"] == epoch and r["member"] == "seed0_bias0"}
    assert "loss" in got["validation"] and "batch_loss" in got["train"]
    if epoch == 1:
      assert "test" not in got and set(got["train"]) >= {"batch_loss"} and "nc1" not in got["train"]
    else:
      assert "nc1" in got["train"] and "nc1" in got["test"] and "loss" in got["test"]


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_steps_refuse_host_to_device_copies(strategy):
  """A step input left on the host fails loudly instead of being copied
  every step; device-resident inputs pass the same guard."""
  step = lambda state, perm, labels, key, images: (state + 1, {"loss": images.sum() + 0.0})
  perm = lambda state, key: jnp.arange(4)
  if strategy == "vmap":
    step = jax.vmap(step, in_axes=(0, 0, 0, 0, None))
    perm = jax.vmap(perm)
  step_fn, perm_fn = jax.jit(step), jax.jit(perm)
  states = {"a": jnp.zeros(()), "b": jnp.zeros(())}
  keys = {n: jax.random.key(0) for n in states}
  labels = {n: {"train": jnp.zeros(4, jnp.int32)} for n in states}
  run = lambda images: train._train_epoch(  # pylint: disable=protected-access
      step_fn, perm_fn, strategy, 0, dict(states), keys, keys, labels, images, 2
  )
  new_states, metrics = run(jnp.ones((4, 2)))
  assert float(new_states["b"]) == 2 and metrics["a"]["loss"] == 8.0
  with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
    run(np.ones((4, 2), np.float32))
