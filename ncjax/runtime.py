"""Process-wide JAX setup: distributed init, the compilation cache, a compile clock.

`initialize_distributed` joins a multi-process run (several hosts, or
several processes on one host) before anything touches a device: with an
explicit coordinator address, or detected from the environment on SLURM
(`srun`, one task per host) and on multi-host TPU VMs.

Every entry point (`ncjax.main`, a study worker process, a colab calling
`train.train_and_evaluate`) calls `setup(config)` before it compiles
anything. With `config.compilation_cache_dir` set, XLA executables are
written there and loaded on the next run of the same program, so a rerun of
the main job (and the second and later runs of one study, whose combinations
share their shapes) skips almost all compilation. The cache is keyed by the
program, the jax/jaxlib version, the backend and its flags, so one directory
serves every config and machine kind.

`compile_seconds()` is the time this process has spent in XLA compilation
(or fetching from the cache), measured by jax's own monitoring events; runs
record it in `train_summary.json` and the benchmark prints it.
"""

from __future__ import annotations

import os
import threading

import jax
from jax import monitoring

# The event jax records around every backend compilation, including a
# persistent-cache lookup that replaces one.
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

_lock = threading.Lock()
_compile_seconds = 0.0
_listening = False
_cache_dir: str | None = None


def _on_duration(event: str, seconds: float, **_) -> None:
  global _compile_seconds
  if event == _COMPILE_EVENT:
    with _lock:
      _compile_seconds += seconds


def compile_seconds() -> float:
  """Seconds spent compiling (or loading from the cache) in this process."""
  _listen()
  return _compile_seconds


def _listen() -> None:
  global _listening
  with _lock:
    if not _listening:
      monitoring.register_event_duration_secs_listener(_on_duration)
      _listening = True


def enable_compilation_cache(directory: str) -> str | None:
  """Caches compiled executables in `directory` ('' leaves caching off).

  Returns the directory in use. Every executable is cached, however quick
  to compile: a run compiles a few dozen small functions whose compile
  times add up. The first directory set in a process stays in force (jax
  opens its cache once), so a later, different one is ignored.
  """
  global _cache_dir
  _listen()
  if not directory or _cache_dir is not None:
    return _cache_dir
  path = os.path.abspath(os.path.expanduser(directory))
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  _cache_dir = path
  return path


def _cluster_detected() -> bool:
  """Whether this process was started as one task of a multi-process job."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
    return True
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
  """Joins a multi-process JAX run; returns whether this is one.

  With `coordinator_address` ('host:port' of process 0) the run is set up
  from the three arguments; without it, from a SLURM allocation of several
  tasks or a multi-host TPU slice (jax's own cluster detection); otherwise
  this stays a single-process run. Must run before any JAX computation.
  """
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id too")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id {process_id} is not in [0, {num_processes})")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
  if num_processes not in (None, 1) or process_id not in (None, 0):
    raise ValueError("--num_processes/--process_id need --coordinator_address")
  if _cluster_detected():
    jax.distributed.initialize()
    return True
  return False


def sync(name: str) -> None:
  """Waits until every process of a multi-process run gets here."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    multihost_utils.sync_global_devices(name)


def add_xla_flags(flags: str) -> None:
  """Adds `flags` to $XLA_FLAGS, except a flag whose name $XLA_FLAGS already
  sets: the environment wins over the config. Only takes effect before JAX's
  backend starts (so `ncjax.main` calls it first), and in processes started
  later (study workers inherit it)."""
  current = os.environ.get("XLA_FLAGS", "").split()
  names = {f.split("=", 1)[0] for f in current}
  new = [f for f in flags.split() if f.split("=", 1)[0] not in names]
  if new:
    os.environ["XLA_FLAGS"] = " ".join(current + new)


def setup(config) -> None:
  """What every process does before compiling for `config`."""
  enable_compilation_cache(config.compilation_cache_dir)
