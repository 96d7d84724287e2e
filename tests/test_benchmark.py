"""`benchmarks/benchmark.py --quick` still runs and reports sane numbers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("machine", "train", "nc", "input", "torch", "xla_flags", "compile")


def _numbers(tree, path=""):
  """(path, value) of every number in a JSON tree."""
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _numbers(v, f"{path}.{k}")
  elif isinstance(tree, list):
    for i, v in enumerate(tree):
      yield from _numbers(v, f"{path}[{i}]")
  elif isinstance(tree, int | float) and not isinstance(tree, bool):
    yield path, tree


def test_quick_benchmark_writes_every_section(tmp_path):
  out = tmp_path / "bench.json"
  cmd = [
      sys.executable, os.path.join(ROOT, "benchmarks", "benchmark.py"), "--quick",
      "--sections", ",".join(SECTIONS), "--models", "synthetic", "--members", "2",
      "--xla-flagsets", "none", "--data-dir", str(tmp_path / "tfds"), "--json", str(out),
  ]  # fmt: skip
  # Without torch on the path the torch section must skip, not fail.
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  for name in SECTIONS:
    assert name in result and name in result["memory"], name

  train = {(r["strategy"], r["members"]): r for r in result["train"]["rows"]}
  assert set(train) == {("loop", 2), ("vmap", 2)}
  for row in train.values():
    for key in ("samples_per_s", "step_ms", "compile_s", "tflops"):
      assert math.isfinite(row[key]) and row[key] >= 0, (key, row)
    assert row["samples_per_s"] > 0 and row["gflop_per_step"] > 0
  assert result["nc"]["compute_s"] > 0 and result["nc"]["in_training_s"] > 0
  paths = {(r["data"].split()[-1], r["path"]) for r in result["input"]["rows"]}
  assert len(paths) == 4  # resident and streaming, synthetic and 224 x 224 x 3
  assert all(r["samples_per_s"] > 0 for r in result["input"]["rows"])
  assert "skipped" in result["torch"] or result["torch"]["rows"]
  (xla,) = result["xla_flags"]["rows"]
  assert xla["flags"] == "none" and xla["samples_per_s"] > 0
  assert result["machine"]["backend"] == "cpu" and result["machine"]["cores"] >= 1
  # The second run of the main job loads what the first compiled from the
  # persistent cache.
  first, second = result["compile"]["rows"]
  assert first["jobs"] == second["jobs"] == 1
  assert first["compile_s"] > 1.0 and second["compile_s"] < 0.5 * first["compile_s"]
  for path, value in _numbers(result):
    assert math.isfinite(value), path
  assert "samples/s" in proc.stdout  # the table
