"""Run logs: one JSON record per (epoch, member, split), and TensorBoard.

`metrics.jsonl` is the source of truth that reports and colabs read.
TensorBoard files are written with tensorboardX (no TensorFlow), one run per
member so that TensorBoard overlays the members. Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import jax

METRICS_FILE = "metrics.jsonl"


def _jsonable(value: Any) -> Any:
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None  # JSON has no NaN; readers take None as NaN
  return value


class MetricWriter:
  """Appends metric records to metrics.jsonl and TensorBoard."""

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self._active = jax.process_index() == 0
    self._path = os.path.join(workdir, METRICS_FILE)
    self._tb_dir = os.path.join(workdir, "tensorboard")
    self._tensorboard = tensorboard and self._active
    self._tb_writers: dict[str, Any] = {}

  def truncate_after(self, epoch: int) -> None:
    """Drops records of epochs after `epoch` (they are recomputed on resume)."""
    if not self._active or not os.path.exists(self._path):
      return
    kept = [r for r in read_records(self._path) if r["epoch"] <= epoch]
    tmp = self._path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, self._path)

  def write(self, records: Iterable[Mapping[str, Any]]) -> None:
    if not self._active:
      return
    records = [{k: _jsonable(v) for k, v in r.items()} for r in records]
    with open(self._path, "a") as f:
      f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in records)
      f.flush()
      os.fsync(f.fileno())
    if self._tensorboard:
      for r in records:
        self._scalars(r)

  def _scalars(self, record: Mapping[str, Any]) -> None:
    from tensorboardX import SummaryWriter  # imported late: heavy

    member = record["member"]
    if member not in self._tb_writers:
      self._tb_writers[member] = SummaryWriter(os.path.join(self._tb_dir, member))
    writer = self._tb_writers[member]
    for key, value in record.items():
      if isinstance(value, (int, float)) and key not in _INDEX_FIELDS:
        writer.add_scalar(f"{record['split']}/{key}", value, record["epoch"])

  def close(self) -> None:
    for writer in self._tb_writers.values():
      writer.close()
    self._tb_writers.clear()


_INDEX_FIELDS = {"epoch", "seed", "bias_rate", "member", "split"}


def read_records(path: str) -> list[dict[str, Any]]:
  """All records of a metrics.jsonl file (None stands for NaN).

  A last line cut short (a run killed while appending) is left out: its
  epoch has no checkpoint yet, so a resumed run writes it again. A broken
  line anywhere else is an error.
  """
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  records = []
  for i, line in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if i == len(lines) - 1 and not line.endswith("\n"):
        break
      raise ValueError(f"{path} line {i + 1} is not a JSON record") from None
  return records
