"""Streaming input (`ncjax.streaming`) against the in-memory split."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from ncjax import input_pipeline, streaming, train
from ncjax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def host(data_dir):
  """The tiny train split in host memory, the reference for every row."""
  from configs import synthetic as synthetic_config  # pylint: disable=import-outside-toplevel

  config = synthetic_config.get_config("tiny")
  config.dataset.data_dir = data_dir
  input_pipeline.ensure_prepared(config)
  return input_pipeline.load(config)["train"]


def _numpy(batch) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in batch.items()}


def _epoch(split, epoch, start_step=0) -> list[dict[str, np.ndarray]]:
  with split.batches(epoch, start_step) as it:
    return [_numpy(b) for b in it]


def test_an_epoch_is_the_in_memory_rows_in_the_permuted_order(tiny_config, host):
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.NamedSharding(mesh, jax.P("data"))
  split = streaming.StreamingSplit.from_config(
      tiny_config, "train", batch_size=32, seed=3, sharding=sharding
  )
  assert len(split) == len(host) == 128 and split.steps_per_epoch == 4
  np.testing.assert_array_equal(split.ids, host.ids)
  perm = split.permutation(0)
  assert sorted(perm.tolist()) == list(range(128))
  with split.batches(0) as it:
    batches = list(it)
  assert len(batches) == 4
  assert batches[0]["image"].sharding == sharding
  attribute = tiny_config.dataset.attribute
  for i, b in enumerate(map(_numpy, batches)):
    rows = perm[i * 32 : (i + 1) * 32]
    np.testing.assert_array_equal(b["image"], host.images[rows])
    np.testing.assert_array_equal(b["label"], host.labels[rows])
    np.testing.assert_array_equal(b[attribute], host.groups[rows])
    np.testing.assert_array_equal(b["index"], rows)
    assert b["valid"].all() and b["image"].dtype == np.uint8


def test_the_order_is_a_pure_function_of_seed_and_epoch(tiny_config):
  make = lambda seed: streaming.StreamingSplit.from_config(  # noqa: E731
      tiny_config, "train", batch_size=32, seed=seed, num_threads=2
  )
  a, b = make(7), make(7)
  first, again = _epoch(a, 1), _epoch(b, 1)
  for x, y in zip(first, again, strict=True):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  # Resuming mid-epoch reads exactly the rest of the epoch.
  resumed = _epoch(b, 1, start_step=2)
  for x, y in zip(first[2:], resumed, strict=True):
    np.testing.assert_array_equal(x["image"], y["image"])
  # Other epochs and other seeds read other orders.
  second = _epoch(a, 2)
  assert not np.array_equal(first[0]["index"], second[0]["index"])
  assert not np.array_equal(first[0]["image"], second[0]["image"])
  assert not np.array_equal(a.permutation(1), make(8).permutation(1))


def test_jax_order_reads_the_resident_paths_batches(tiny_config):
  key = jax.random.key(5)
  split = streaming.StreamingSplit.from_config(
      tiny_config, "train", batch_size=32, order=streaming.jax_order(key, 128)
  )
  state = train.TrainState(step=jax.numpy.int32(2 * 4), params=None, batch_stats=None,
                           opt_state=None)  # fmt: skip
  want = train.epoch_permutation(state, key, steps_per_epoch=4, num_train=128)
  np.testing.assert_array_equal(split.permutation(2), np.asarray(want))


def test_last_partial_batch_is_dropped_or_padded_and_masked(tiny_config, host):
  # 128 rows in batches of 48: two full batches and 32 rows left over.
  dropped = streaming.StreamingSplit.from_config(tiny_config, "train", batch_size=48, seed=1)
  assert dropped.steps_per_epoch == 2
  batches = _epoch(dropped, 0)
  assert [len(b["index"]) for b in batches] == [48, 48]
  np.testing.assert_array_equal(
      np.concatenate([b["index"] for b in batches]), dropped.permutation(0)[:96]
  )

  padded = streaming.StreamingSplit.from_config(
      tiny_config, "train", batch_size=48, seed=1, drop_remainder=False
  )
  assert padded.steps_per_epoch == 3
  batches = _epoch(padded, 0)
  last = batches[-1]
  assert last["image"].shape[0] == 48 and last["valid"].sum() == 32
  assert not last["valid"][32:].any()
  assert (last["image"][32:] == 0).all() and (last["index"][32:] == 0).all()
  np.testing.assert_array_equal(last["image"][:32], host.images[padded.permutation(0)[96:]])
  seen = np.concatenate([b["index"][b["valid"]] for b in batches])
  assert sorted(seen.tolist()) == list(range(128))


def test_processes_read_contiguous_slices_of_every_global_batch(tiny_config):
  whole = streaming.StreamingSplit.from_config(tiny_config, "train", batch_size=32, seed=2)
  parts = [
      streaming.StreamingSplit.from_config(
          tiny_config, "train", batch_size=32, seed=2, process_index=p, process_count=2
      )
      for p in (0, 1)
  ]
  got = [list(p.host_batches(0)) for p in parts]
  for i, full in enumerate(whole.host_batches(0)):
    for k in full:
      np.testing.assert_array_equal(np.concatenate([got[0][i][k], got[1][i][k]]), full[k])


def test_abandoned_or_closed_iterators_stop_their_threads(tiny_config):
  split = streaming.StreamingSplit.from_config(tiny_config, "train", batch_size=32, prefetch=1)
  it = split.batches(0)
  next(it)
  thread = it.thread
  del it  # abandoned mid-epoch, with the producer blocked on a full queue
  gc.collect()
  thread.join(timeout=10)
  assert not thread.is_alive()

  with split.batches(1) as it:
    next(it)
    thread = it.thread
  assert not thread.is_alive()
  with pytest.raises(StopIteration):
    next(it)


def test_errors_in_the_producer_reach_the_consumer():
  def source():
    yield 1
    raise ValueError("bad record")

  it = streaming.DevicePrefetcher(source(), put=lambda x: x * 10)
  assert next(it) == 10
  with pytest.raises(ValueError, match="bad record"):
    next(it)
  it.thread.join(timeout=10)
  assert not it.thread.is_alive()


def test_a_process_that_abandons_an_iterator_exits(data_dir):
  script = textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {ROOT!r})
      from configs import synthetic
      from ncjax import streaming
      config = synthetic.get_config("tiny")
      config.dataset.data_dir = {data_dir!r}
      split = streaming.StreamingSplit.from_config(config, "train", batch_size=32, prefetch=1)
      it = split.batches(0)
      next(it)
      print("abandoned")
      """)
  out = subprocess.run(
      [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert "abandoned" in out.stdout


def test_worker_processes_read_the_same_batches(tiny_config):
  threads = streaming.StreamingSplit.from_config(tiny_config, "train", batch_size=32, seed=4)
  workers = streaming.StreamingSplit.from_config(
      tiny_config, "train", batch_size=32, seed=4, num_workers=2
  )
  for x, y in zip(_epoch(threads, 0), _epoch(workers, 0), strict=True):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_views_share_the_opened_split(tiny_config):
  """A view reads the same rows with its own batch size and order, without
  opening the files again; the split it came from is unchanged."""
  split = streaming.StreamingSplit.from_config(tiny_config, "train", batch_size=32, seed=1)
  view = split.view(batch_size=48, order=streaming.row_order(len(split)), drop_remainder=False)
  assert view._source is split._source  # pylint: disable=protected-access
  assert (view.steps_per_epoch, split.steps_per_epoch) == (3, 4)
  rows = np.concatenate([b["index"][b["valid"]] for b in view.host_batches(5)])
  np.testing.assert_array_equal(rows, np.arange(128))
  assert not np.array_equal(split.permutation(5), np.arange(128))
  with pytest.raises(ConfigError, match="larger than the split"):
    split.view(batch_size=256)


class _Device:

  def __init__(self, process_index: int):
    self.process_index = process_index

  def __repr__(self) -> str:
    return f"dev(p{self.process_index})"


class _Sharding:
  """devices_indices_map of a 1-D batch sharding over one device a process."""

  def __init__(self, processes_in_mesh_order):
    self.order = processes_in_mesh_order

  def devices_indices_map(self, shape):
    local = shape[0] // len(self.order)
    return {_Device(p): (slice(i * local, (i + 1) * local),) for i, p in enumerate(self.order)}


def test_process_slices_must_match_the_sharding():
  """Process p reads block p of each batch; a mesh that puts another
  process's devices there is refused (alike on every process)."""
  streaming._check_process_rows(_Sharding([0, 1]), 8, 2)  # pylint: disable=protected-access
  with pytest.raises(ConfigError, match=r"process 1\) holds rows \[0, 4\)"):
    streaming._check_process_rows(_Sharding([1, 0]), 8, 2)  # pylint: disable=protected-access
