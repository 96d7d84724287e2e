"""Training with streamed input (`config.input.streaming`) against resident.

The reference is the session's resident tiny run (`tiny_run`: two seeds x
two bias rates, three epochs); the same config streamed must write the same
records, flips and stage checkpoints, resume like it, and resume it.
"""

from __future__ import annotations

import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ncjax import checkpoints, input_pipeline, members, metric_writers, streaming, train
from ncjax.errors import ConfigError

RTOL, ATOL = 1e-5, 1e-6


def _records(workdir):
  records = metric_writers.read_records(os.path.join(workdir, "metrics.jsonl"))
  return {(r["epoch"], r["member"], r["split"]): r for r in records}


def _assert_same_records(want, got):
  """Every key of every record; floats to RTOL / ATOL (NaN matches NaN)."""
  assert got.keys() == want.keys()
  for key, record in want.items():
    assert got[key].keys() == record.keys(), key
    for field, value in record.items():
      if isinstance(value, float) and math.isnan(value):
        assert math.isnan(got[key][field]), (key, field)
      elif isinstance(value, float):
        assert got[key][field] == pytest.approx(value, rel=RTOL, abs=ATOL), (key, field)
      else:
        assert got[key][field] == value, (key, field)


def _assert_same_stages(reference, other, names):
  for name in names:
    for stage in checkpoints.STAGES:
      want = checkpoints.restore_stage(reference, name, stage)
      got = checkpoints.restore_stage(other, name, stage)
      assert jax.tree.structure(got) == jax.tree.structure(want)
      for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=ATOL)


def _read(path) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _streaming(config):
  config = config.copy_and_resolve_references()
  config.input.streaming = True
  config.input.threads = 2
  return config


@pytest.fixture(scope="module")
def streamed_run(tiny_run, tmp_path_factory):
  """(config, workdir, summary) of the tiny run with streamed input."""
  config = _streaming(tiny_run[0])
  workdir = str(tmp_path_factory.mktemp("streamed_run"))
  return config, workdir, train.train_and_evaluate(config, workdir)


def test_streamed_splits_hold_the_rows_of_load(tiny_config):
  """Host fields of the opened streams == `input_pipeline.load`, row for row,
  for the disease target and for an attribute target (separability)."""
  mesh = train.make_mesh()
  for target in ("label", tiny_config.dataset.attribute):
    tiny_config.target = target
    streams = train._open_streams(tiny_config, mesh)  # pylint: disable=protected-access
    loaded = input_pipeline.load(tiny_config)
    for split, s in streams.items():
      host = input_pipeline.host_split(tiny_config, s.columns, s.ids)
      want = loaded[split]
      assert host.images is None and len(host) == len(want) == len(s)
      for field in ("labels", "groups", "ids"):
        np.testing.assert_array_equal(getattr(host, field), getattr(want, field))
      chunk = input_pipeline.chunk_size(len(s), tiny_config.eval_batch_size, jax.device_count())
      assert s.batch_size == chunk and not s.drop_remainder
      np.testing.assert_array_equal(s.permutation(0), np.arange(len(s)))


def test_a_streamed_run_writes_the_resident_runs_results(tiny_run, streamed_run):
  """metrics.jsonl (every record and key), the flipped ids, run.json, the
  early-stopping epochs and both stage checkpoints of every member."""
  config, reference, resident_summary = tiny_run
  _, workdir, summary = streamed_run
  assert summary["input"] == "streaming" and summary["strategy"] == "loop"
  assert resident_summary["input"] == "resident"
  _assert_same_records(_records(reference), _records(workdir))
  names = [m.name for m in members.from_config(config)]
  assert any(m.bias_rate for m in members.from_config(config))
  for name in names:
    path = os.path.join("bias", f"{name}.json")
    assert _read(os.path.join(workdir, path)) == _read(os.path.join(reference, path))
  assert _read(os.path.join(workdir, train.RUN_FILE)) == _read(
      os.path.join(reference, train.RUN_FILE)
  )
  assert summary["members"] == resident_summary["members"]
  _assert_same_stages(reference, workdir, names)


def _stop_after(workdir, epoch, names):
  """The workdir as a run killed after `epoch`'s checkpoint left it."""
  latest = os.path.join(workdir, "checkpoints", "latest")
  for name in os.listdir(latest):
    if name.isdigit() and int(name) > epoch:
      shutil.rmtree(os.path.join(latest, name))
  for name in names:
    shutil.rmtree(os.path.join(workdir, "checkpoints", name))
  os.remove(os.path.join(workdir, "train_summary.json"))
  assert checkpoints.LatestCheckpoint(workdir).latest_epoch() == epoch


class _Stop(Exception):
  pass


def test_a_streamed_run_stopped_after_epoch_1_resumes_identically(
    streamed_run, tmp_path, monkeypatch
):
  """Stopped as the second epoch starts streaming (epoch 1 logged and saved),
  then rerun: the same records, byte for byte, and the same stages."""
  config, workdir, _ = streamed_run
  names = [m.name for m in members.from_config(config)]
  real = train._train_epoch_streamed  # pylint: disable=protected-access

  def stop_in_epoch_2(step_fn, streams, epoch, *args):
    if epoch == 1:  # counted from 0
      raise _Stop
    return real(step_fn, streams, epoch, *args)

  stopped = str(tmp_path / "stopped")
  monkeypatch.setattr(train, "_train_epoch_streamed", stop_in_epoch_2)
  with pytest.raises(_Stop):
    train.train_and_evaluate(config, stopped)
  monkeypatch.undo()
  assert checkpoints.LatestCheckpoint(stopped).latest_epoch() == 1
  assert {k[0] for k in _records(stopped)} == {1}
  train.train_and_evaluate(config, stopped)
  assert _read(os.path.join(stopped, "metrics.jsonl")) == _read(
      os.path.join(workdir, "metrics.jsonl")
  )
  for name in names:
    for stage in checkpoints.STAGES:
      jax.tree.map(
          np.testing.assert_array_equal,
          checkpoints.restore_stage(workdir, name, stage),
          checkpoints.restore_stage(stopped, name, stage),
      )


def test_a_resident_run_resumes_streamed(tiny_run, tmp_path):
  """input.* may change on resume: the workdir accepts the streamed config."""
  config, reference, _ = tiny_run
  names = [m.name for m in members.from_config(config)]
  resumed = str(tmp_path / "resumed")
  shutil.copytree(reference, resumed)
  _stop_after(resumed, config.epochs - 1, names)
  summary = train.train_and_evaluate(_streaming(config), resumed)
  assert summary["input"] == "streaming"
  _assert_same_records(_records(reference), _records(resumed))
  _assert_same_stages(reference, resumed, names)


def test_streamed_steps_equal_resident_steps_with_augmentation(tiny_config):
  """The step alone, augmentation on, a biased member: `streamed_train_step`
  on the member's stream (rows of `epoch_permutation`, labels gathered by
  `index`, augmentation key folded with the step) == `train_step` gathering
  from the resident split, over two epochs."""
  tiny_config.augment.enabled = True
  tiny_config.augment.out_size = 12
  tiny_config.augment.resize = 14
  member = members.Member(1, 0.25)
  splits = input_pipeline.load(tiny_config)
  n, b = len(splits["train"]), tiny_config.batch_size
  labels, flipped = input_pipeline.member_labels(splits, member, tiny_config)["train"]
  assert flipped.any()
  labels_N = jnp.asarray(labels)
  init_key, data_key, aug_key = member.keys()
  model, tx = train.create_model(tiny_config), train.create_optimizer(tiny_config)
  preprocess = train.make_preprocess(tiny_config)[0]
  state = train.init_state(model, tx, init_key, splits["train"].images.shape[1:])
  common = dict(model=model, tx=tx, preprocess=preprocess, batch_sharding=None)
  resident = jax.jit(
      lambda s, perm, images: train.train_step(
          s, perm, labels_N, aug_key, images, batch_size=b, steps_per_epoch=n // b, **common
      )
  )
  streamed = jax.jit(
      lambda s, images, index: train.streamed_train_step(
          s, labels_N, aug_key, images, index, **common
      )
  )
  stream = streaming.StreamingSplit.from_config(
      tiny_config, "train", batch_size=b, order=streaming.jax_order(data_key, n), num_threads=2
  )
  images_N = jnp.asarray(splits["train"].images)
  a = s = state
  for epoch in range(2):
    perm = train.epoch_permutation(a, data_key, steps_per_epoch=n // b, num_train=n)
    with stream.batches(epoch) as batches:
      for batch in batches:
        a, loss_a = resident(a, perm, images_N)
        s, loss_s = streamed(s, batch["image"], batch["index"])
        assert float(loss_s["loss"]) == pytest.approx(float(loss_a["loss"]), rel=RTOL)
  assert int(s.step) == 2 * (n // b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(s), strict=True):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("members.strategy", "vmap", "input.streaming needs members.strategy loop or auto"),
        ("input.threads", 0, "input.threads and input.prefetch must be >= 1"),
    ],
)
def test_a_bad_streaming_setting_is_one_line_before_writing(
    tiny_config, tmp_path, field, value, message
):
  tiny_config.input.streaming = True
  section, leaf = field.split(".")
  tiny_config[section][leaf] = value
  with pytest.raises(ConfigError, match=message) as error:
    train.train_and_evaluate(tiny_config, str(tmp_path / "w"))
  assert "\n" not in str(error.value)
  assert not (tmp_path / "w").exists()


def test_auto_strategy_loops_when_streaming(tiny_config):
  tiny_config.input.streaming = True
  assert train._resolve_strategy(tiny_config) == "loop"  # pylint: disable=protected-access
