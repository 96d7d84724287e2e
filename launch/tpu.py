"""Runs a config's sweep on a Cloud TPU VM slice, one point after another.

  python -m launch.tpu --tpu=NAME --zone=ZONE [--project=P] \\
    --config=configs/paper.py --workdir_root=/mnt/shared/runs/paper \\
    [--repo_dir=ncjax] [--setup='source .venv/bin/activate'] [--dry_run] \\
    [--config.k=v ...]

Each sweep point is one command for all workers of the slice:

  gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all \\
    --command='cd ncjax && python3 -m ncjax.main --config=... --workdir=...'

Every worker starts the same `ncjax.main`; JAX finds the slice's other hosts
by itself (`jax.distributed.initialize()` on a TPU VM needs no arguments),
so no coordinator flags are passed. The repository must be at `--repo_dir`
(relative to the home directory) on every worker, and WORKDIR_ROOT on
storage that every worker sees (NFS/Filestore or a gcsfuse mount), since
only process 0 writes logs but every process writes its checkpoint shards.
Points run in order; a point that fails is reported and the next one runs.
Rerunning resumes unfinished points and leaves finished ones unchanged
(`ncjax.main` checks its workdir; the workdirs are not visible from here).

`--dry_run` prints the gcloud commands, one a line.
"""

from __future__ import annotations

import os
import subprocess
import sys

if __package__ in (None, ""):  # `python launch/tpu.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from launch import sweep

_CONFIG = flags.DEFINE_string("config", None, "Config file `path.py[:arg]`, also in --repo_dir.")
_WORKDIR_ROOT = flags.DEFINE_string("workdir_root", None, "Shared folder, one workdir per point.")
_TPU = flags.DEFINE_string("tpu", None, "TPU VM name.")
_ZONE = flags.DEFINE_string("zone", None, "Its zone, e.g. us-central2-b.")
_PROJECT = flags.DEFINE_string("project", "", "Google Cloud project; '' = gcloud's default.")
_REPO_DIR = flags.DEFINE_string("repo_dir", "ncjax", "The repository on every worker.")
_SETUP = flags.DEFINE_string("setup", "", "Shell line run first on every worker (venv).")
_PYTHON = flags.DEFINE_string("python", "python3", "Python on the workers.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands instead of running them.")
flags.mark_flags_as_required(["config", "workdir_root", "tpu", "zone"])


def remote_command(point: sweep.Point, config: str, root: str) -> str:
  """What every worker runs for `point`."""
  steps = [f"cd {sweep.shell([_REPO_DIR.value])}"]
  if _SETUP.value:
    steps.append(_SETUP.value)
  steps.append(sweep.shell(point.command(config, root, python=_PYTHON.value)))
  return " && ".join(steps)


def gcloud_command(point: sweep.Point, config: str, root: str) -> list[str]:
  """The gcloud command that runs `point` on all workers of the slice."""
  command = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", _TPU.value, f"--zone={_ZONE.value}"]
  if _PROJECT.value:
    command.append(f"--project={_PROJECT.value}")
  return command + ["--worker=all", f"--command={remote_command(point, config, root)}"]


def main(argv: list[str], extras: list[str]) -> int:
  """Runs (or prints) one gcloud command per point, in order; the exit status."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config, root = _CONFIG.value, _WORKDIR_ROOT.value
  # The config is read here to expand the sweep; the workers read their copy.
  commands = [(p, gcloud_command(p, config, root)) for p in sweep.expand(config, extras)]
  if _DRY_RUN.value:
    print("\n".join(sweep.shell(c) for _, c in commands))
    return 0
  failed = []
  for point, command in commands:
    print(f"start: {point.name} on {_TPU.value} (all workers)", file=sys.stderr, flush=True)
    try:
      returncode = subprocess.run(command, check=False).returncode
    except FileNotFoundError:
      raise sweep.SweepError("gcloud not found: install the Google Cloud CLI") from None
    if returncode:
      failed.append(point.name)
      print(f"failed: {point.name} (exit status {returncode})", file=sys.stderr)
  print(
      f"{len(commands) - len(failed)} of {len(commands)} points done"
      + (f"; failed: {', '.join(failed)}" if failed else ""),
      file=sys.stderr,
  )
  return 1 if failed else 0


def run() -> None:
  """The command-line entry point: `--config.k=v` flags go to every point."""
  sweep.run_launcher(main)


if __name__ == "__main__":
  run()
