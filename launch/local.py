"""Runs a config's sweep on this machine, one point or N at a time.

  python -m launch.local --config=configs/paper.py --workdir_root=runs/paper \\
    [--parallel=N] [--gpus=0,1,2,3] [--dry_run] [--config.k=v ...]

Each sweep point (`launch/sweep.py`) runs `python -m ncjax.main` in its own
workdir, WORKDIR_ROOT/NAME. A finished point is skipped, an unfinished one
resumes from its latest checkpoint (ncjax.main does that by itself), and a
workdir written by a different config stops the launcher before anything
runs. `--config.k=v` flags given here go to every point.

With `--parallel=N`, N points run at once, each writing its output to
WORKDIR_ROOT/logs/NAME.log. On a GPU box give each its own devices with
`--gpus`: the list is cut into N equal slots (CUDA_VISIBLE_DEVICES). Without
`--gpus` the points share the machine; on a CPU each then runs XLA on one
thread per op, as `ncjax.study` does for its workers.

`--dry_run` prints the commands that would run, one a line, and `#` lines
saying what is skipped; the output is itself a shell script.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time

if __package__ in (None, ""):  # `python launch/local.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from launch import sweep

_CONFIG = flags.DEFINE_string("config", None, "Config file, optionally `path.py:arg`.")
_WORKDIR_ROOT = flags.DEFINE_string("workdir_root", None, "One workdir per point in here.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Points run at once.", lower_bound=1)
_GPUS = flags.DEFINE_list("gpus", [], "Device ids shared out among the --parallel slots.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands instead of running them.")
flags.mark_flags_as_required(["config", "workdir_root"])

_CPU_PARALLEL_FLAG = "--xla_cpu_multi_thread_eigen=false"


def device_slots(gpus: list[str], parallel: int) -> list[str | None]:
  """CUDA_VISIBLE_DEVICES of each slot (None: leave the environment alone)."""
  if not gpus:
    return [None] * parallel
  if len(gpus) % parallel:
    raise sweep.SweepError(
        f"--gpus has {len(gpus)} devices, not a multiple of --parallel={parallel}"
    )
  per = len(gpus) // parallel
  return [",".join(gpus[i * per : (i + 1) * per]) for i in range(parallel)]


def _environment(devices: str | None, parallel: int) -> dict[str, str]:
  env = dict(os.environ)
  path = env.get("PYTHONPATH")
  env["PYTHONPATH"] = sweep.REPO_ROOT + (os.pathsep + path if path else "")
  if devices is not None:
    env["CUDA_VISIBLE_DEVICES"] = devices
  elif parallel > 1:
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {_CPU_PARALLEL_FLAG}".strip()
  return env


def plan(config: str, root: str, extras: list[str]) -> tuple[list[sweep.Point], list[str]]:
  """The points of the sweep and the state of each (see `sweep.state`)."""
  points = sweep.expand(config, extras)
  return points, sweep.states(config, points, root)


def _run(jobs: list[tuple[sweep.Point, list[str]]], root: str, slots: list[str | None]) -> list:
  """Runs the commands, len(slots) at a time; the failed points."""
  parallel = len(slots)
  queue = collections.deque(jobs)
  running: dict[int, tuple[subprocess.Popen, sweep.Point, float, object]] = {}
  failed = []
  log_dir = os.path.join(root, "logs")
  try:
    while queue or running:
      for slot in range(parallel):
        if slot in running or not queue:
          continue
        point, command = queue.popleft()
        log = None
        if parallel > 1:
          os.makedirs(log_dir, exist_ok=True)
          # Closed when the run ends, below.
          log = open(os.path.join(log_dir, f"{point.name}.log"), "a")  # pylint: disable=R1732
        devices = f" on devices {slots[slot]}" if slots[slot] is not None else ""
        print(f"start: {point.name}{devices}", file=sys.stderr, flush=True)
        proc = subprocess.Popen(  # pylint: disable=consider-using-with
            command,
            env=_environment(slots[slot], parallel),
            stdout=log,
            stderr=subprocess.STDOUT if log else None,
        )
        running[slot] = (proc, point, time.perf_counter(), log)
      time.sleep(0.2)
      for slot, (proc, point, t0, log) in list(running.items()):
        if proc.poll() is None:
          continue
        del running[slot]
        if log:
          log.close()
        seconds = time.perf_counter() - t0
        if proc.returncode:
          failed.append(point)
          where = f"; see {log.name}" if log else ""
          print(f"failed: {point.name} (exit status {proc.returncode}{where})", file=sys.stderr)
        else:
          print(f"done: {point.name} ({seconds:.0f} s)", file=sys.stderr, flush=True)
  except KeyboardInterrupt:
    for proc, _, _, _ in running.values():
      proc.terminate()
    for proc, point, _, _ in running.values():
      proc.wait()
      print(f"stopped: {point.name} (rerun to resume it)", file=sys.stderr)
    raise
  return failed


def main(argv: list[str], extras: list[str]) -> int:
  """Runs (or, with --dry_run, prints) the unfinished points; the exit status."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config, root = _CONFIG.value, _WORKDIR_ROOT.value
  slots = device_slots(_GPUS.value, _PARALLEL.value)
  points, states = plan(config, root, extras)
  dry = _DRY_RUN.value
  if dry and _PARALLEL.value > 1:
    print(
        f"# {_PARALLEL.value} at a time"
        + "".join(
            f"; slot {i}: CUDA_VISIBLE_DEVICES={d}" for i, d in enumerate(slots) if d is not None
        )
    )
  # A dry run's notes are shell comments beside its commands.
  note = (lambda text: print(f"# {text}")) if dry else (lambda text: print(text, file=sys.stderr))
  jobs = []
  for point, state in zip(points, states, strict=True):
    workdir = point.workdir(root)
    if state == "finished":
      note(f"skip (finished): {workdir}")
      continue
    command = point.command(config, root, python=sys.executable)
    if state == "unfinished":
      note(f"resume: {workdir}")
    if dry:
      print(sweep.shell(command))
    jobs.append((point, command))
  if dry:
    return 0
  if len(slots) > 1:
    sweep.prepare_datasets(config, [p for p, _ in jobs])
  try:
    failed = _run(jobs, root, slots)
  except KeyboardInterrupt:
    print("interrupted: rerun the same command to resume", file=sys.stderr)
    return 130
  skipped = len(points) - len(jobs)
  print(
      f"{len(jobs) - len(failed)} of {len(jobs)} runs done, {skipped} skipped (finished)"
      + (f"; failed: {', '.join(p.name for p in failed)}" if failed else ""),
      file=sys.stderr,
  )
  return 1 if failed else 0


def run() -> None:
  """The command-line entry point: `--config.k=v` flags go to every point."""
  sweep.run_launcher(main)


if __name__ == "__main__":
  run()
