"""launch/: sweep expansion, the dry runs of every script, and the local runner.

Expected commands are written out here by hand (the override dicts a sweep
should produce, the paper's six combinations x ten seeds) and compared with
what each script prints, parsed back with `shlex`; nothing is computed with
the code under test. The runner test trains two tiny points, finishes one
and cuts the other short, and checks that a rerun skips the first and
resumes the second from its checkpoint.
"""

from __future__ import annotations

import ast
import itertools
import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR_FLAG = "--config.dataset.data_dir=/tmp/data dir"  # a space: quoting matters

SWEEP_CONFIG = '''
"""A small sweep over the tiny synthetic config."""
from configs import synthetic


def get_config(arg=None):
  config = synthetic.get_config("tiny")
  config.study.combos = ()
  config.seeds = (0,)
  config.epochs = 2
  return config


def get_sweep(arg=None):
  if arg == "typo":
    return [{"seeds": (0,)}, {"bias.rate": (0.0, 0.5)}]
  if arg == "run":
    return [{"seeds": (0,)}, {"seeds": (1,)}]
  return [
      {"seeds": (0,), "bias.rates": (0.0, 0.125), "optimizer.learning_rate": 0.003},
      {"config.seeds": [1, 2], "study.combos": ("synthetic:low", "high"), "model.stem": "imagenet"},
      {"progress": True, "dataset.attribute": "medium"},
  ]
'''
# What the three points must set, flag by flag (besides the shared data_dir).
EXPECTED = [
    {"seeds": (0,), "bias.rates": (0.0, 0.125), "optimizer.learning_rate": 0.003},
    {"seeds": (1, 2), "study.combos": ("synthetic:low", "high"), "model.stem": "imagenet"},
    {"progress": True, "dataset.attribute": "medium"},
]
EXPECTED_NAMES = [
    "seeds=0,rates=0_0.125,learning_rate=0.003",
    "seeds=1_2,combos=synthetic-low_high,stem=imagenet",
    "progress=true,attribute=medium",
]
PAPER_COMBOS = (
    "papila:sex",
    "papila:age",
    "ham10000:sex",
    "ham10000:age",
    "chexpert:sex",
    "chexpert:race",
)


@pytest.fixture(scope="module")
def sweep_config(tmp_path_factory) -> str:
  path = tmp_path_factory.mktemp("configs") / "small_sweep.py"
  path.write_text(textwrap.dedent(SWEEP_CONFIG))
  return str(path)


def _launch(script: str, *args: str, env: dict[str, str] | None = None, check: bool = True):
  result = subprocess.run(
      [sys.executable, "-m", f"launch.{script}", *args],
      cwd=ROOT,
      capture_output=True,
      text=True,
      env=env,
      timeout=300,
      check=False,
  )
  if check:
    assert result.returncode == 0, result.stderr
  return result


def _commands(stdout: str) -> list[list[str]]:
  return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


def _value(text: str):
  if text in ("true", "false"):
    return text == "true"
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a string field takes the text as it is


def _main_call(tokens: list[str], python: str) -> tuple[str, str, dict]:
  """(config, workdir, overrides) of a `python -m ncjax.main ...` command."""
  assert tokens[:3] == [python, "-m", "ncjax.main"], tokens
  config = [t.split("=", 1)[1] for t in tokens if t.startswith("--config=")]
  workdir = [t.split("=", 1)[1] for t in tokens if t.startswith("--workdir=")]
  overrides = {}
  for t in tokens[3:]:
    if t.startswith("--config."):
      key, value = t[len("--config.") :].split("=", 1)
      assert key not in overrides, f"{key} twice in {tokens}"
      overrides[key] = _value(value)
    else:
      assert t.startswith(("--config=", "--workdir=")), t
  assert len(config) == 1 and len(workdir) == 1, tokens
  return config[0], workdir[0], overrides


def _check_points(calls, spec: str, root: str, data_dir: str = "/tmp/data dir") -> None:
  assert len(calls) == len(EXPECTED)
  for (config, workdir, overrides), expected, name in zip(
      calls, EXPECTED, EXPECTED_NAMES, strict=True
  ):
    assert config == spec
    assert workdir == os.path.join(root, name)
    assert overrides == {**expected, "dataset.data_dir": data_dir}


# ------------------------------------------------------------------ dry runs


def test_local_dry_run_prints_one_command_per_point(sweep_config, tmp_path):
  root = str(tmp_path / "runs")
  out = _launch(
      "local", f"--config={sweep_config}", f"--workdir_root={root}", "--dry_run", DATA_DIR_FLAG
  ).stdout
  _check_points([_main_call(c, sys.executable) for c in _commands(out)], sweep_config, root)
  assert not os.path.exists(root)  # a dry run writes nothing


def test_local_dry_run_with_gpu_slots(sweep_config, tmp_path):
  out = _launch(
      "local",
      f"--config={sweep_config}",
      f"--workdir_root={tmp_path}",
      "--dry_run",
      "--parallel=2",
      "--gpus=0,1,2,3",
      DATA_DIR_FLAG,
  ).stdout
  assert "slot 0: CUDA_VISIBLE_DEVICES=0,1; slot 1: CUDA_VISIBLE_DEVICES=2,3" in out
  assert len(_commands(out)) == 3


@pytest.mark.parametrize("nodes", [1, 2])
def test_slurm_dry_run_is_an_array_of_the_points(sweep_config, tmp_path, nodes):
  root = str(tmp_path / "runs")
  out = _launch(
      "slurm",
      f"--config={sweep_config}",
      f"--workdir_root={root}",
      "--dry_run",
      f"--nodes={nodes}",
      "--gpus_per_node=8",
      "--max_parallel=2",
      "--time=1:00:00",
      DATA_DIR_FLAG,
  ).stdout
  sbatch = [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("#SBATCH ")]
  assert "--array=0-2%2" in sbatch
  assert f"--nodes={nodes}" in sbatch and "--ntasks-per-node=1" in sbatch
  assert "--gpus-per-node=8" in sbatch and "--time=1:00:00" in sbatch
  commands = _commands(out)
  assert all(c[0] == "srun" for c in commands)
  # Multi-node: JAX's distributed runtime reads SLURM's environment.
  assert not any(
      t.startswith(("--coordinator", "--num_processes", "--process_id"))
      for c in commands
      for t in c
  )
  _check_points([_main_call(c[1:], "python") for c in commands], sweep_config, root)
  assert not os.path.exists(root)


def test_slurm_script_runs_point_i_in_task_i(sweep_config, tmp_path, data_dir):
  """The generated sbatch script, run by bash with a fake sbatch and srun."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  calls = tmp_path / "srun_calls.jsonl"
  (bin_dir / "sbatch").write_text("#!/bin/sh\necho Submitted batch job 42\n")
  (bin_dir / "srun").write_text(
      f"#!{sys.executable}\nimport json, sys\n"
      f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
  )
  for f in ("sbatch", "srun"):
    (bin_dir / f).chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  root = str(tmp_path / "runs")
  # Submitting generates the synthetic dataset once, before the tasks start.
  out = _launch(
      "slurm",
      f"--config={sweep_config}",
      f"--workdir_root={root}",
      f"--config.dataset.data_dir={data_dir}",
      env=env,
  ).stdout
  assert "Submitted batch job 42" in out
  assert os.path.isdir(os.path.join(data_dir, "synthetic"))
  script = os.path.join(root, "slurm", "ncjax-small_sweep.sbatch")
  for task in (2, 0, 1):
    subprocess.run(["bash", script], env=dict(env, SLURM_ARRAY_TASK_ID=str(task)), check=True)
  runs = [json.loads(line) for line in calls.read_text().splitlines()]
  calls_in_task_order = [runs[1], runs[2], runs[0]]
  _check_points(
      [_main_call(c, "python") for c in calls_in_task_order], sweep_config, root, data_dir
  )
  bad = subprocess.run(["bash", script], env=dict(env, SLURM_ARRAY_TASK_ID="3"), check=False)
  assert bad.returncode == 2


def test_tpu_dry_run_is_one_gcloud_command_per_point(sweep_config, tmp_path):
  root = "/mnt/shared/runs"
  out = _launch(
      "tpu",
      "--tpu=my-v4-32",
      "--zone=us-central2-b",
      "--project=proj",
      f"--config={sweep_config}",
      f"--workdir_root={root}",
      "--repo_dir=src/ncjax",
      "--setup=source .venv/bin/activate",
      "--dry_run",
      DATA_DIR_FLAG,
  ).stdout
  calls = []
  for c in _commands(out):
    assert c[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v4-32"]
    assert set(c[6:-1]) == {"--zone=us-central2-b", "--project=proj", "--worker=all"}
    assert c[-1].startswith("--command=")
    remote = shlex.split(c[-1][len("--command=") :])
    assert remote[:7] == ["cd", "src/ncjax", "&&", "source", ".venv/bin/activate", "&&", "python3"]
    calls.append(_main_call(remote[6:], "python3"))
  _check_points(calls, sweep_config, root)


def test_paper_sweep_is_six_combinations_times_ten_seeds(tmp_path):
  out = _launch(
      "local", "--config=configs/paper.py", f"--workdir_root={tmp_path}", "--dry_run"
  ).stdout
  points = [_main_call(c, sys.executable)[2] for c in _commands(out)]
  expected = [
      {"study.combos": (combo,), "seeds": (seed,)}
      for combo, seed in itertools.product(PAPER_COMBOS, range(10))
  ]
  assert points == expected


def test_bias_sweep_config_has_the_five_rates(tmp_path):
  from configs import bias_sweep  # pylint: disable=import-outside-toplevel

  for arg in (None, "tiny", "paper"):
    assert tuple(bias_sweep.get_config(arg).bias.rates) == (0.0, 0.125, 0.25, 0.375, 0.5)
  out = _launch(
      "local", "--config=configs/bias_sweep.py:paper", f"--workdir_root={tmp_path}", "--dry_run"
  ).stdout
  assert len(_commands(out)) == 60
  out = _launch(
      "local", "--config=configs/bias_sweep.py", f"--workdir_root={tmp_path}", "--dry_run"
  ).stdout
  assert [_main_call(c, sys.executable)[1:] for c in _commands(out)] == [
      (os.path.join(str(tmp_path), "default"), {})
  ]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--config={cfg}:typo"],
            "get_sweep() point 1: unknown config field 'bias.rate' (did you mean 'bias.rates'?)",
        ),
        (
            ["--config={cfg}", "--config.modle.width=3"],
            "unknown config field 'modle.width' (did you mean 'model.width'?)",
        ),
        (["--config={cfg}", "--config.epochs=many"], "--config.epochs=many"),
        (["--config={cfg}", "--config.seeds=(3,)"], "sets 'seeds': drop --config.seeds"),
        (["--config=configs/nosuch.py"], "config file configs/nosuch.py not found"),
    ],
)
def test_errors_are_one_line(sweep_config, tmp_path, args, message):
  for script, more in (("local", []), ("slurm", []), ("tpu", ["--tpu=t", "--zone=z"])):
    result = _launch(
        script,
        *[a.format(cfg=sweep_config) for a in args],
        *more,
        f"--workdir_root={tmp_path}",
        "--dry_run",
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert message in result.stderr


# ------------------------------------------------------------------ local runs


def _mtimes(paths):
  return {p: os.stat(p).st_mtime_ns for p in paths}


def test_local_runner_skips_finished_and_resumes_unfinished(sweep_config, tmp_path, data_dir):
  root = str(tmp_path / "runs")
  args = [
      f"--config={sweep_config}:run",
      f"--workdir_root={root}",
      f"--config.dataset.data_dir={data_dir}",
  ]
  first = _launch("local", *args, "--parallel=2")
  done, cut = os.path.join(root, "seeds=0"), os.path.join(root, "seeds=1")
  for w in (done, cut):
    assert os.path.exists(os.path.join(w, "train_summary.json")), first.stderr
    assert os.path.exists(os.path.join(root, "logs", f"{os.path.basename(w)}.log"))

  # Cut seeds=1 short: as if killed after epoch 1 of 2.
  os.remove(os.path.join(cut, "train_summary.json"))
  shutil.rmtree(os.path.join(cut, "checkpoints", "latest", "2"))
  for member in ("seed1_bias0", "seed1_bias0.25"):
    shutil.rmtree(os.path.join(cut, "checkpoints", member))
  kept = os.path.join(cut, "checkpoints", "latest", "1")
  finished_files = [os.path.join(done, f) for f in ("metrics.jsonl", "train_summary.json")]
  before = _mtimes(finished_files + [kept])

  plan = _launch("local", *args, "--dry_run").stdout
  assert f"# skip (finished): {done}" in plan and f"# resume: {cut}" in plan
  assert [_main_call(c, sys.executable)[1] for c in _commands(plan)] == [cut]

  second = _launch("local", *args)
  assert f"skip (finished): {done}" in second.stderr and f"resume: {cut}" in second.stderr
  assert _mtimes(finished_files + [kept]) == before  # resumed from epoch 1, not redone
  assert os.path.exists(os.path.join(cut, "train_summary.json"))
  with open(os.path.join(cut, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  keys = [(r["epoch"], r["member"], r["split"]) for r in records]
  assert len(keys) == len(set(keys)) and {r["epoch"] for r in records} == {1, 2}

  # The same workdirs with another config: refused before anything runs.
  other = _launch("local", *args, "--config.optimizer.learning_rate=0.5", check=False)
  assert other.returncode == 2 and "written by a different config" in other.stderr
  assert other.stderr.count("\n") == 1
