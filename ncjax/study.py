"""The study driver: every combination trained, evaluated, then reported.

A study config lists dataset-attribute combinations in `study.combos`. For
each one the driver trains the disease members (seeds x bias rates) and, if
`study.separability`, the subgroup-separability models (the same
architecture trained on clean labels to predict the attribute), evaluates
both at their early and final stages, then writes `summary.json` and the
report:

  WORKDIR/config.json
  WORKDIR/combos/<dataset>-<attribute>/        a training workdir
  WORKDIR/separability/<dataset>-<attribute>/  a training workdir
  WORKDIR/summary.json, WORKDIR/report/

Finished parts are not redone: a complete training run is skipped, an
unfinished one resumes from its latest checkpoint, a complete evaluation is
read back. A combination that fails (e.g. a non-finite loss) is reported and
the others still run; the driver then fails naming it.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import multiprocessing
import os
import threading
import time
from typing import Any

import jax

from ncjax import evaluate, input_pipeline, metric_writers, runtime, train
from ncjax import workdir as workdir_lib
from ncjax.errors import ConfigError, NcjaxError

_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


class StudyError(NcjaxError):
  """Some combinations of a study failed; the others finished."""


def combos(config) -> list[tuple[str, str]]:
  """(dataset, attribute) pairs of the study; one pair for a plain run."""
  out = []
  for entry in config.study.combos or (config.dataset.attribute,):
    dataset, _, attribute = entry.rpartition(":")
    out.append((dataset or config.dataset.name, attribute))
  if len(set(out)) != len(out):
    raise ConfigError(f"study.combos has duplicates: {list(config.study.combos)}")
  return out


def combo_name(dataset: str, attribute: str) -> str:
  return f"{dataset}-{attribute}"


# Study-level fields that apply to combinations of other datasets too.
_SHARED_FIELDS = ("seeds", "bias", "model.init_from", "dataset.data_dir", "progress", "input")


def _dataset_config(config, dataset: str):
  """`config` itself for its own dataset, else configs/<dataset>.py with the
  study's shared fields."""
  if dataset == config.dataset.name:
    return copy.deepcopy(config)
  path = os.path.join(_CONFIG_DIR, f"{dataset}.py")
  if not os.path.exists(path):
    raise ConfigError(f"study.combos names dataset {dataset!r} but {path} does not exist")
  spec = importlib.util.spec_from_file_location(f"ncjax_study_config_{dataset}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  for field in _SHARED_FIELDS:
    *parents, leaf = field.split(".")
    src, dst = config, c
    for p in parents:
      src, dst = src[p], dst[p]
    dst[leaf] = copy.deepcopy(src[leaf])
  c.study.combos = ()
  return c


def disease_config(config, dataset: str, attribute: str):
  c = _dataset_config(config, dataset)
  c.dataset.attribute = attribute
  return c


def separability_config(config, dataset: str, attribute: str):
  """Clean models of the same architecture predicting the attribute."""
  c = _dataset_config(config, dataset)
  c.dataset.attribute = attribute
  c.target = attribute
  c.bias.rates = (0.0,)
  c.epochs = config.study.separability_epochs
  c.nc.every = c.epochs  # only the geometry of the last epoch is of interest
  return c


def run(config, workdir: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
  """Runs (or resumes) the whole study in `workdir` and writes the report."""
  from ncjax import report, study_results  # pylint: disable=import-outside-toplevel

  runtime.setup(config)
  pairs = combos(config)
  if config.study.separability and config.study.separability_epochs < 1:
    raise ConfigError("study.separability_epochs must be >= 1")
  jobs = []
  for dataset, attribute in pairs:
    name = combo_name(dataset, attribute)
    jobs.append((os.path.join(workdir, "combos", name), disease_config(config, dataset, attribute)))
    if config.study.separability:
      jobs.append((
          os.path.join(workdir, "separability", name),
          separability_config(config, dataset, attribute),
      ))  # fmt: skip
  for _, job_config in jobs:  # a typo in a combination fails before anything is written
    input_pipeline.check_attribute(job_config)
  workdir_lib.check_config(workdir, config)
  workdir_lib.check_writable(workdir)
  workdir_lib.write_config(workdir, config, overrides)
  # Longest first, so that parallel workers finish together.
  jobs.sort(key=lambda job: -_member_epochs(job[1]))
  failures, timings = {}, {}
  # A multi-process run trains each job with all processes together.
  workers = min(config.study.workers, len(jobs)) if jax.process_count() == 1 else 1
  for _, job_config in jobs:
    try:
      if jax.process_index() == 0:
        input_pipeline.ensure_prepared(job_config)  # once, before parallel jobs
    except NcjaxError:
      pass  # reported by the job itself, with the others still running
  runtime.sync("ncjax_study_prepared")
  if workers > 1:
    for _, job_config in jobs:
      job_config.progress = False  # the parent draws one bar for all jobs
  outcomes = _run_jobs(jobs, workers, progress=config.progress)
  for (job_dir, _), outcome in zip(jobs, outcomes, strict=True):
    label = os.path.relpath(job_dir, workdir)
    if isinstance(outcome, str):
      logging.error("%s failed: %s", label, outcome)
      failures[label] = outcome
    else:
      timings[label] = outcome
  if failures:
    raise StudyError(
        f"{len(failures)} of {len(jobs)} runs failed: "
        + "; ".join(f"{k}: {v}" for k, v in failures.items())
    )
  if jax.process_index() != 0:
    return {"summary": None, "report": None, "seconds": timings}
  summary = study_results.write_summary(workdir)
  print(f"summary: {os.path.join(workdir, 'summary.json')}", flush=True)
  report_path = report.write_report(workdir)
  return {"summary": summary, "report": report_path, "seconds": timings}


def _job(job_dir: str, job_config) -> float | str:
  """Train + evaluate one workdir; its wall seconds, or the error message."""
  try:
    summary = train.train_and_evaluate(job_config, job_dir)
    # Stage evaluation is small: process 0 does it on its own devices.
    if jax.process_index() == 0:
      evaluate.run(job_dir)
    runtime.sync(f"ncjax_evaluated_{job_dir}")
  except NcjaxError as e:
    return str(e)
  t = summary["seconds"]
  if jax.process_index() == 0:
    print(
        f"done: {job_dir} ({summary['wall_seconds']:.0f} s, compiling "
        f"{summary['compile_seconds']:.0f} s; NC metrics "
        f"{100 * t['nc'] / max(t['train'], 1e-9):.0f}% of the training time)",
        flush=True,
    )
  return float(summary["wall_seconds"])


def _run_jobs(jobs, workers: int, *, progress: bool) -> list[float | str]:
  """Runs jobs in order, or `workers` at a time in spawned processes.

  XLA:CPU runs these small models on about one core, so on a CPU several
  processes, each pinned to one intra-op thread, use the machine; on an
  accelerator keep one worker (processes would compete for its memory).
  Parallel jobs draw no bars of their own: the parent shows one bar over
  all member-epochs, counted from the jobs' metrics.jsonl files.
  """
  if workers <= 1:
    return [_job(d, c) for d, c in jobs]
  flags = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()
  try:
    context = multiprocessing.get_context("spawn")
    # A fixed set of workers, each pinned to its own core when there are
    # enough: XLA:CPU then sizes its thread pool to one core, and two
    # processes no longer trade cores and caches (training 15% faster here).
    counter = context.Value("i", 0)
    with context.Pool(
        workers, initializer=_init_worker, initargs=(os.getpid(), counter, workers)
    ) as pool:
      pending = pool.starmap_async(_job, jobs, chunksize=1)
      if progress:
        _follow(pending, jobs)
      return pending.get()
  finally:
    os.environ["XLA_FLAGS"] = flags


def _init_worker(parent: int, counter, workers: int) -> None:
  """Pins this worker to a core of its own, and ends it if the study process
  dies (kill -9 leaves pool workers running, and a rerun would then share
  their workdirs)."""
  with counter.get_lock():
    index = counter.value
    counter.value += 1
  cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
  if len(cores) >= workers:
    os.sched_setaffinity(0, {cores[index % len(cores)]})

  def watch():
    while os.getppid() == parent:
      time.sleep(1)
    os._exit(1)  # pylint: disable=protected-access

  threading.Thread(target=watch, daemon=True).start()


def _follow(pending, jobs) -> None:
  """A progress bar (with ETA) over the member-epochs of all jobs."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  total = sum(_member_epochs(c) for _, c in jobs)
  with tqdm(total=total, desc="study", unit="member-epoch", dynamic_ncols=True) as bar:
    while not pending.ready():
      pending.wait(5)
      done = sum(_validation_records(d) for d, _ in jobs)
      bar.update(min(done, total) - bar.n)


def _member_epochs(config) -> int:
  return len(config.seeds) * len(config.bias.rates) * config.epochs


def _validation_records(workdir: str) -> int:
  """Member-epochs a job has logged (one validation record each)."""
  path = os.path.join(workdir, metric_writers.METRICS_FILE)
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return sum('"split": "validation"' in line for line in f)
