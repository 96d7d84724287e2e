"""Streaming input: batches read from array_record files, prefetched to device.

For splits that do not fit in device memory (CheXpert at 224 x 224, any
dataset at full resolution); `train.py` uses it with
`config.input.streaming=True`. `input_pipeline` keeps a whole split resident
on the device; this module instead reads each batch from the prepared TFDS
dataset's array_record files
(`<data_dir>/<name>/<config>/<version>/<name>-<split>.array_record-*`) with
grain's random-access `ArrayRecordDataSource`, decodes the TFDS examples with
numpy (TensorFlow is never imported), and puts batches on the device a couple
of steps ahead of the train step:

  split = streaming.StreamingSplit.from_config(
      config, "train", batch_size=256, seed=0, sharding=batch_sharding)
  for epoch in range(start_epoch, epochs):
    for batch in split.batches(epoch):  # {'image', 'label', ..., 'index', 'valid'}
      state, metrics = step_fn(state, batch)

Rows: row i of a `StreamingSplit` is row i of `input_pipeline.load(config)`
(both sort the stored examples by id), and `batch['index']` holds the row
numbers, so per-member labels and bias flips computed on the host split are
gathered by it. Small fields (labels, attributes, ids) are read once when the
split is opened and kept in host memory; only images are streamed. `view()`
reads an opened split with another batch size or order without reading the
files again (train.py: one view per member in its own order, one in row
order, `row_order`, for evaluation).

Order: the rows of epoch e are `permutation(e)`, a pure function of
(seed, epoch) (or of the train step's data key, with `jax_order`), so a run
resumed at (epoch, step) with `batches(epoch, start_step=step)` reads exactly
the batches an uninterrupted run would.

Last partial batch: with `drop_remainder=True` (the default, as the resident
path's `steps_per_epoch = N // B`) the N % B rows at the end of each epoch's
permutation are skipped (different rows every epoch). With
`drop_remainder=False` the last batch is padded to the full batch size, so
every batch has one static shape and the step compiles once: padding rows
have zero images and fields, index 0, and `valid` False; mask with `valid`.

Parallelism: grain decodes `num_threads` batches at once (`ReadOptions`;
zlib inflation, which dominates decoding, and the file reads release the
GIL, so threads scale), optionally in `num_workers` processes
(`MultiprocessingOptions`). Worker processes start anew with every
`batches()` call and re-import the main module (seconds), so they only pay
for epochs much longer than that. One background thread puts `prefetch`
batches on the device with `jax.device_put(batch, sharding)`. With several
JAX processes each reads its contiguous slice of every global batch and the
global array is assembled with `jax.make_array_from_process_local_data`,
which needs the sharding to place process p's slice on process p's devices
(checked when the split is opened: every process fails alike, none waits).

Opening a split reads every record once to learn its ids, labels and
attributes (images are read but not decoded): the files' read time, once
per `StreamingSplit`.
"""

from __future__ import annotations

import concurrent.futures
import copy
import functools
import queue
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import flags as absl_flags

from ncjax import datasets, input_pipeline
from ncjax.errors import ConfigError, DataError

PREFETCH_THREAD_NAME = "ncjax-prefetch"
_SCAN_CHUNK = 1024  # records per read while indexing a split


# ------------------------------------------------------------------- ordering


def numpy_order(seed: int, num_rows: int) -> Callable[[int], np.ndarray]:
  """epoch -> permutation of the rows, a pure function of (seed, epoch)."""

  def order(epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_rows)

  return order


def jax_order(data_key: jax.Array, num_rows: int) -> Callable[[int], np.ndarray]:
  """The order of `train.epoch_permutation`: the resident path's batches.

  Computed on this process's CPU device (threefry and the sort are the same
  on every backend), so the streaming and the device-resident inputs of one
  member read the same rows in the same order.
  """
  # A local device: in a multi-process CPU run jax.devices("cpu") lists every
  # process's devices, and [0] is process 0's.
  cpu = jax.local_devices(backend="cpu")[0]
  key = jax.device_put(data_key, cpu)

  @functools.lru_cache(maxsize=2)
  def order(epoch: int) -> np.ndarray:
    with jax.default_device(cpu):
      perm = jax.random.permutation(jax.random.fold_in(key, epoch), num_rows)
    return np.asarray(perm)

  return order


def row_order(num_rows: int) -> Callable[[int], np.ndarray]:
  """epoch -> the rows in stored order, every epoch (evaluation)."""
  rows = np.arange(num_rows)
  return lambda epoch: rows


def _check_process_rows(sharding, batch_size: int, process_count: int) -> None:
  """Process p reads rows [p B / P, (p + 1) B / P) of every global batch, and
  `jax.make_array_from_process_local_data` puts them where `sharding` holds
  process p's rows: both must be the same rows. Computed from the global
  device map, so every process reaches the same verdict."""
  local = batch_size // process_count
  for device, index in sharding.devices_indices_map((batch_size,)).items():
    rows, p = index[0], device.process_index
    start = rows.start or 0
    stop = batch_size if rows.stop is None else rows.stop
    if not p * local <= start <= stop <= (p + 1) * local:
      raise ConfigError(
          f"streaming over {process_count} processes needs a batch sharding that "
          f"holds process p's {local} rows [p * {local}, (p + 1) * {local}) on process "
          f"p's devices; device {device} (process {p}) holds rows [{start}, {stop})"
      )


# ------------------------------------------------------------- reading, decoding


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _is_array_feature(feature) -> bool:
  """Streamed per batch (images), as opposed to scalars kept on the host."""
  return len(getattr(feature, "shape", ())) > 0


def _is_text(feature) -> bool:
  return np.dtype(feature.np_dtype).kind in "OSU"


def _skip(features, names) -> dict[str, Any]:
  return {k: tfds.decode.SkipDecoding() for k in names if k in features}


def _scan(source, features, num_threads: int) -> tuple[np.ndarray, dict, np.ndarray]:
  """Reads every record's scalar fields once, in parallel chunks.

  Returns (record keys in canonical order, {field: column}, ids): canonical
  order sorts by (id, path) as `datasets.load_split` does.
  """
  n = len(source)
  arrays = [k for k, f in features.items() if _is_array_feature(f)]
  decoders = _skip(features, arrays)

  def read(start: int) -> list[dict[str, Any]]:
    keys = list(range(start, min(n, start + _SCAN_CHUNK)))
    out = []
    for r in source.__getitems__(keys):
      example = features.deserialize_example_np(r, decoders=decoders)
      out.append({k: v for k, v in example.items() if k not in arrays})  # no image bytes
    return out

  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    records = [r for chunk in pool.map(read, range(0, n, _SCAN_CHUNK)) for r in chunk]
  if not records:
    raise DataError("the split to stream is empty")
  if "id" in features:
    sort_key = [(_text(r["id"]), _text(r.get("path", ""))) for r in records]
    keys = np.asarray(sorted(range(n), key=sort_key.__getitem__), np.int64)
    ids = np.asarray([sort_key[k][0] for k in keys])
  else:
    keys, ids = np.arange(n, dtype=np.int64), np.arange(n).astype(str)
  columns = {}
  for name, feature in features.items():
    if name in arrays or _is_text(feature):
      continue
    column = np.asarray([records[k][name] for k in keys])
    columns[name] = column.astype(np.int32) if column.dtype.kind in "iu" else column
  return keys, columns, ids


class _BatchReader:
  """step -> this process's rows of global batch `step`, as numpy.

  A plain picklable object, so grain can run it in worker processes.
  """

  def __init__(self, source, features, record_keys, columns, arrays, perm, *,
               batch_size: int, process_index: int, process_count: int):  # fmt: skip
    self.source, self.features = source, features
    self.record_keys, self.columns, self.arrays = record_keys, columns, arrays
    self.perm, self.batch_size = perm, batch_size
    self.process_index, self.process_count = process_index, process_count
    self.decoders = _skip(features, [k for k in features.keys() if k not in arrays])

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    b = self.batch_size
    rows = self.perm[step * b : (step + 1) * b]
    valid = np.zeros(b, bool)
    valid[: len(rows)] = True
    rows = np.concatenate([rows, np.zeros(b - len(rows), rows.dtype)])
    local = b // self.process_count
    part = slice(self.process_index * local, (self.process_index + 1) * local)
    rows, valid = rows[part], valid[part]
    out = {"index": rows.astype(np.int32), "valid": valid}
    for name, column in self.columns.items():
      out[name] = np.where(valid, column[rows], np.zeros((), column.dtype))
    for name in self.arrays:
      f = self.features[name]
      out[name] = np.zeros((local, *f.shape), f.np_dtype)
    live = np.flatnonzero(valid)
    keys = self.record_keys[rows[live]].tolist()
    records = self.source.__getitems__(keys) if keys else []
    for i, record in zip(live, records, strict=True):
      example = self.features.deserialize_example_np(record, decoders=self.decoders)
      for name in self.arrays:
        out[name][i] = example[name]
    return out


# ------------------------------------------------------------- device prefetch


_END = object()


class _Failure:

  def __init__(self, error: BaseException):
    self.error = error


def _produce(source: Iterator, put: Callable, q: queue.Queue, stop: threading.Event):
  """The prefetch thread: source items -> put(item) -> q, until stopped."""

  def offer(item) -> bool:
    while not stop.is_set():
      try:
        q.put(item, timeout=0.05)
        return True
      except queue.Full:
        continue
    return False

  try:
    for item in source:
      if stop.is_set() or not offer(put(item)):
        return
    offer(_END)
  except BaseException as e:  # pylint: disable=broad-except
    offer(_Failure(e))
  finally:
    close = getattr(source, "close", None)
    if close is not None:
      close()


def _shutdown(stop: threading.Event, q: queue.Queue, thread: threading.Thread) -> None:
  stop.set()
  while True:  # unblock a producer waiting on a full queue
    try:
      q.get_nowait()
    except queue.Empty:
      break
  if thread is not threading.current_thread():
    thread.join(timeout=30)


class DevicePrefetcher:
  """Iterates `put(item) for item in source` from a background thread.

  Keeps up to `size` transformed items ready. The thread stops when the
  source ends, on `close()`, on leaving a `with` block, or when the iterator
  is garbage collected (abandoned mid-epoch); the thread holds no reference
  to this object, so dropping the last reference is enough.
  """

  def __init__(self, source: Iterator, put: Callable[[Any], Any], size: int = 2):
    self._queue: queue.Queue = queue.Queue(maxsize=max(1, size))
    self._stop = threading.Event()
    self.thread = threading.Thread(
        target=_produce,
        args=(source, put, self._queue, self._stop),
        name=PREFETCH_THREAD_NAME,
        daemon=True,
    )
    self._done = False
    self.thread.start()
    self._finalizer = weakref.finalize(self, _shutdown, self._stop, self._queue, self.thread)

  def __iter__(self) -> DevicePrefetcher:
    return self

  def __next__(self):
    if self._done:
      raise StopIteration
    while True:
      try:
        item = self._queue.get(timeout=0.5)
        break
      except queue.Empty:
        if not self.thread.is_alive() and self._queue.empty():
          item = _END  # stopped by close() from another thread
          break
    if item is _END or isinstance(item, _Failure):
      self.close()
      if isinstance(item, _Failure):
        raise item.error
      raise StopIteration
    return item

  def close(self) -> None:
    """Stops the thread and frees the prefetched batches (idempotent)."""
    self._done = True
    self._finalizer()

  def __enter__(self) -> DevicePrefetcher:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ------------------------------------------------------------------ the split


class StreamingSplit:
  """One split of a prepared TFDS array_record dataset, streamed by batch."""

  def __init__(
      self,
      paths: Sequence[Any],
      features: tfds.features.FeaturesDict,
      *,
      batch_size: int,
      seed: int = 0,
      order: Callable[[int], np.ndarray] | None = None,
      drop_remainder: bool = True,
      sharding: jax.sharding.Sharding | None = None,
      num_threads: int = 4,
      num_workers: int = 0,
      prefetch: int = 2,
      process_index: int | None = None,
      process_count: int | None = None,
  ):
    """Opens the files and reads the small fields of every record once.

    Args:
      paths: array_record files (or TFDS `FileInstruction`s) of the split.
      features: the dataset's TFDS `FeaturesDict` (decodes its examples).
      batch_size: global rows per batch (over all processes).
      seed: seeds the default order, `numpy_order(seed, len(self))`.
      order: epoch -> permutation of range(len(self)), replacing the default
        (e.g. `jax_order(data_key, n)`, the resident path's order).
      drop_remainder: skip the last partial batch of an epoch (True) or pad
        it to `batch_size` rows with `valid` False (False).
      sharding: where batches go (`jax.device_put`), a batch-dimension
        sharding such as `NamedSharding(mesh, P("data"))`; None = the default
        device.
      num_threads: batches decoded at once (grain `ReadOptions`).
      num_workers: grain worker processes (0 = decode in this process).
      prefetch: batches kept ready on the device ahead of the consumer.
      process_index, process_count: this process's slice of every batch;
        default jax's.
    """
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    self.paths = list(paths)
    self.features = features
    self.batch_size = batch_size
    self.drop_remainder = drop_remainder
    self.sharding = sharding
    self.num_threads, self.num_workers, self.prefetch = num_threads, num_workers, prefetch
    self._check_batch_size(None)  # before reading the files
    self._source = grain.sources.ArrayRecordDataSource(self.paths)
    self._record_keys, self.columns, self.ids = _scan(self._source, features, num_threads)
    self.arrays = tuple(k for k, f in features.items() if _is_array_feature(f))
    self._check_batch_size(len(self))
    self._order = order or numpy_order(seed, len(self))

  def _check_batch_size(self, num_rows: int | None) -> None:
    b, processes = self.batch_size, self.process_count
    if b < 1 or b % processes:
      raise ConfigError(f"batch_size {b} must be a positive multiple of the {processes} processes")
    if self.sharding is not None and processes > 1 and jax.process_count() > 1:
      _check_process_rows(self.sharding, b, processes)
    if num_rows is not None and b > num_rows and self.drop_remainder:
      raise ConfigError(f"batch_size {b} is larger than the split ({num_rows} rows)")

  def view(
      self,
      *,
      batch_size: int | None = None,
      order: Callable[[int], np.ndarray] | None = None,
      drop_remainder: bool | None = None,
  ) -> StreamingSplit:
    """This split read with another batch size, order or last-batch rule.

    Shares the opened files and the fields read when the split was opened,
    so a view costs nothing (no second scan of the records); what is not
    given stays as it is.
    """
    out = copy.copy(self)
    if batch_size is not None:
      out.batch_size = batch_size
    if drop_remainder is not None:
      out.drop_remainder = drop_remainder
    if order is not None:
      out._order = order  # pylint: disable=protected-access
    out._check_batch_size(len(out))  # pylint: disable=protected-access
    return out

  @classmethod
  def from_builder(cls, builder, split: str, **kwargs) -> StreamingSplit:
    """A split (or TFDS sub-split, e.g. 'train[:10%]') of a prepared builder."""
    info = builder.info
    return cls(info.splits[split].file_instructions, info.features, **kwargs)

  @classmethod
  def from_config(cls, config, split: str, **kwargs) -> StreamingSplit:
    """A split of the configured dataset (generated first if procedural)."""
    if split not in datasets.SPLITS:
      raise ConfigError(f"split must be one of {datasets.SPLITS}, got {split!r}")
    return cls.from_builder(input_pipeline.ensure_prepared(config), split, **kwargs)

  def __len__(self) -> int:
    return len(self._record_keys)

  @property
  def steps_per_epoch(self) -> int:
    n, b = len(self), self.batch_size
    return n // b if self.drop_remainder else -(-n // b)

  def permutation(self, epoch: int) -> np.ndarray:
    """The rows of `epoch` in the order they are read."""
    perm = np.asarray(self._order(epoch))
    if perm.shape != (len(self),):
      raise ConfigError(f"order({epoch}) has shape {perm.shape}, expected ({len(self)},)")
    return perm

  def host_batches(self, epoch: int, start_step: int = 0) -> grain.IterDataset:
    """This process's numpy batches of `epoch` from `start_step`, unprefetched.

    An iterable of dicts: every array field (`image`), every numeric scalar
    field (`label`, attributes) as int32, `index` (rows of the split) and
    `valid` (False on padding).
    """
    if not 0 <= start_step <= self.steps_per_epoch:
      raise ConfigError(f"start_step {start_step} outside [0, {self.steps_per_epoch}]")
    reader = _BatchReader(
        self._source, self.features, self._record_keys, self.columns, self.arrays,
        self.permutation(epoch), batch_size=self.batch_size,
        process_index=self.process_index, process_count=self.process_count,
    )  # fmt: skip
    ds = grain.MapDataset.range(start_step, self.steps_per_epoch).map(reader)
    read = grain.ReadOptions(
        num_threads=max(1, self.num_threads),
        prefetch_buffer_size=max(1, self.num_threads) + self.prefetch,
    )
    out = ds.to_iter_dataset(read)
    if self.num_workers > 0:
      # grain's worker pool reads absl flags, which only `app.run` parses.
      if not absl_flags.FLAGS.is_parsed():
        absl_flags.FLAGS.mark_as_parsed()
      out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers))
    return out

  def batches(self, epoch: int, start_step: int = 0) -> DevicePrefetcher:
    """Device batches of `epoch` from `start_step`: an iterator of
    {name: jax.Array}, `prefetch` ahead; `close()` it (or leave its `with`
    block, or drop it) to stop reading early."""
    return DevicePrefetcher(
        iter(self.host_batches(epoch, start_step)), self._put, size=self.prefetch
    )

  def _put(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    if self.process_count > 1 and jax.process_count() > 1:
      if self.sharding is None:
        raise ConfigError("streaming over several processes needs a batch sharding")
      make = jax.make_array_from_process_local_data
      return {k: make(self.sharding, v) for k, v in batch.items()}
    return jax.device_put(batch, self.sharding)
