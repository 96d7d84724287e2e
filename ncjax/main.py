"""Entry point: `python -m ncjax.main --config=configs/x.py:arg --workdir=DIR`.

With no --config it runs the built-in synthetic default. Fields are
overridden as `--config.a.b=value`; the resolved config and the overrides are
written to the workdir. Errors in what was asked for (config, data, workdir)
print one line and exit with status 2.
"""

from __future__ import annotations

import os
import re
import sys
import time

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "synthetic.py"
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for logs, checkpoints, report.")
flags.mark_flags_as_required(["workdir"])
# Multi-process runs (every process runs the same command with its own id);
# on SLURM and multi-host TPU VMs they are detected and may be left out.
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 of a multi-process run."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def _define_config_flag():
  """--config; a bad override fails here, when the default config is read."""
  try:
    return config_flags.DEFINE_config_file(
        "config",
        _DEFAULT_CONFIG,
        "Config file, optionally `path.py:arg`.",
        lock_config=True,
    )
  except (KeyError, AttributeError) as e:
    text = str(e).replace("\\n", " ")
    field = re.search(r"'([^'\\]+)", text)
    hint = re.search(r'Did you mean "([^"]+)"', text)
    overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
    print(
        f"error: unknown config field {field.group(1) if field else '?'!r} in "
        f"{' '.join(overrides) or '--config'}"
        + (f" (did you mean {hint.group(1)!r}?)" if hint else ""),
        file=sys.stderr,
    )
    sys.exit(2)


def main(argv, config_flag) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Imported after flag parsing so that --help is fast.
  import jax  # pylint: disable=import-outside-toplevel

  from ncjax import runtime, study, train  # pylint: disable=import-outside-toplevel
  from ncjax.errors import NcjaxError  # pylint: disable=import-outside-toplevel

  runtime.add_xla_flags(config_flag.value.xla_flags)  # before the backend starts
  try:
    runtime.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  # Orbax and TFDS log every file they write at INFO.
  absl_logging.set_verbosity(absl_logging.WARNING)
  t0 = time.perf_counter()
  workdir = os.path.abspath(_WORKDIR.value)
  try:
    config = config_flag.value
    overrides = config_flags.get_override_values(flags.FLAGS["config"])
    if config.study.combos:
      result = study.run(config, workdir, overrides)
    else:
      result = train.train_and_evaluate(config, workdir, overrides)
  except NcjaxError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  minutes, seconds = divmod(time.perf_counter() - t0, 60)
  if jax.process_index() != 0:
    return 0
  if config.study.combos:
    print(f"report: {result['report']}")
    print(f"results in {workdir} (summary.json, report/, combos/, separability/)")
  else:
    t = result["seconds"]
    print(f"results in {workdir} (metrics.jsonl, checkpoints/, tensorboard/)")
    print(
        f"train {t['train']:.1f} s, eval {t['eval']:.1f} s, of which NC metrics "
        f"{t['nc']:.1f} s = {100 * t['nc'] / max(t['train'], 1e-9):.0f}% of the training time"
    )
  print(f"wall time {int(minutes)} min {seconds:.1f} s")
  return 0


def run() -> None:
  config_flag = _define_config_flag()
  app.run(lambda argv: sys.exit(main(argv, config_flag)))


if __name__ == "__main__":
  run()
