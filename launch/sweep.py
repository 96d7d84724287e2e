"""Sweeps: a config file's `get_sweep()` expanded into runs of `ncjax.main`.

Beside `get_config(arg)`, a config file may define `get_sweep(arg)` (or
`get_sweep()`) returning a list of override dicts, one per run, a *sweep
point*:

  def get_sweep(arg=None):
    return [{"study.combos": (c,), "seeds": (s,)} for c in COMBOS for s in range(10)]

Keys are config field paths (a leading `config.` is allowed); values are what
the field holds. A config without `get_sweep` is a sweep of one point with no
overrides. Point i becomes

  python -m ncjax.main --config=FILE[:ARG] --workdir=ROOT/NAME --config.k=v ...

with NAME readable from its overrides (`combos=papila-sex,seeds=0`), then
the flags shared by every point (`--config.dataset.data_dir=...` given to the
launcher). Before anything runs, every point is parsed exactly as
`ncjax.main` parses it (ml-collections config flags on the locked config), so
an unknown key or a mistyped value fails at once, in one line.

`local.py`, `slurm.py` and `tpu.py` only turn the points into processes,
an sbatch array or gcloud commands; `state` tells which points are new,
unfinished (they resume) or finished (they are skipped).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import importlib.util
import inspect
import json
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from absl import flags as absl_flags
from ml_collections import config_dict, config_flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)  # config files import `configs.base`

FLAG_PREFIX = "--config."
MAIN_MODULE = "ncjax.main"
_MAX_NAME = 120  # longer workdir names are cut and end in a hash


class SweepError(Exception):
  """A config file, its sweep or a launcher flag is wrong (one line)."""


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of a sweep.

  Attributes:
    index: position in the config's `get_sweep()` list (SLURM task id).
    name: the workdir name under the sweep root, readable from `overrides`.
    overrides: field path -> value, as `get_sweep()` gave them.
    flags: `--config.k=v` flags, the point's then those shared by all points.
  """

  index: int
  name: str
  overrides: dict[str, Any]
  flags: tuple[str, ...]

  def workdir(self, root: str) -> str:
    return os.path.join(root, self.name)

  def command(self, config: str, root: str, python: str = "python") -> list[str]:
    """The `ncjax.main` command line of this point, as a list of tokens."""
    return [
        python,
        "-m",
        MAIN_MODULE,
        f"--config={config}",
        f"--workdir={self.workdir(root)}",
        *self.flags,
    ]


def shell(tokens: Sequence[str]) -> str:
  """One shell-quoted command line."""
  return shlex.join(tokens)


# ------------------------------------------------------------------ loading


def split_spec(spec: str) -> tuple[str, str | None]:
  """'configs/x.py:a=1' -> ('configs/x.py', 'a=1'), as ml-collections splits it."""
  path, sep, arg = spec.partition(":")
  return path, (arg if sep else None)


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text}" if not isinstance(e, SweepError) else text


def _load_module(path: str):
  if not os.path.isfile(path):
    raise SweepError(f"config file {path} not found")
  name = "ncjax_sweep_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except  # the user's file
    raise SweepError(f"{path}: {_one_line(e)}") from None
  if not callable(getattr(module, "get_config", None)):
    raise SweepError(f"{path} has no get_config()")
  return module


def _call(fn, arg: str | None, what: str):
  """fn(arg), or fn() if it takes no argument (as ml-collections calls it)."""
  takes_arg = bool(inspect.signature(fn).parameters)
  try:
    return fn(arg) if takes_arg else fn()
  except Exception as e:  # pylint: disable=broad-except  # the user's file
    raise SweepError(f"{what}: {_one_line(e)}") from None


def load_sweep(spec: str) -> list[dict[str, Any]]:
  """The override dicts of `spec`'s `get_sweep`, or [{}] if it has none."""
  path, arg = split_spec(spec)
  module = _load_module(path)
  get_sweep = getattr(module, "get_sweep", None)
  if get_sweep is None:
    return [{}]
  sweep = _call(get_sweep, arg, f"{path} get_sweep()")
  if isinstance(sweep, Mapping) or not isinstance(sweep, Iterable):
    raise SweepError(f"{path} get_sweep() must return a list of dicts, not {type(sweep).__name__}")
  sweep = list(sweep)
  for i, point in enumerate(sweep):
    if not isinstance(point, Mapping):
      raise SweepError(f"{path} get_sweep() point {i} is a {type(point).__name__}, not a dict")
  if not sweep:
    raise SweepError(f"{path} get_sweep() returned no points")
  return [dict(p) for p in sweep]


def _field_paths(config, prefix: str = "") -> list[str]:
  """Every path of a config: leaves and sub-dicts ('bias', 'bias.rates')."""
  out = []
  for key, value in config.items():
    out.append(prefix + key)
    if isinstance(value, config_dict.ConfigDict):
      out += _field_paths(value, f"{prefix}{key}.")
  return out


def _check_key(key: str, fields: Sequence[str], where: str) -> None:
  if key not in fields:
    match = difflib.get_close_matches(key, fields, n=1)
    hint = f" (did you mean {match[0]!r}?)" if match else ""
    raise SweepError(f"{where}: unknown config field {key!r}{hint}")


# ------------------------------------------------------------------ flags


def _literal(value: Any) -> str:
  """A Python literal that `ast.literal_eval` reads back as `value`."""
  if isinstance(value, str):
    return json.dumps(value)  # double quotes: no nested single quotes in the shell
  if isinstance(value, (list, tuple)):
    items = ",".join(_literal(v) for v in value)
    return f"({items},)" if len(value) == 1 else f"({items})"
  if isinstance(value, Mapping):
    return "{" + ",".join(f"{_literal(k)}:{_literal(v)}" for k, v in value.items()) + "}"
  if value is None or isinstance(value, (bool, int, float)):
    return repr(value)
  raise SweepError(f"cannot pass a {type(value).__name__} ({value!r}) as a config flag")


def flag_value(value: Any) -> str:
  """The text after `--config.k=` that sets the field to `value`."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, str):
    return value  # string fields take the text as it is
  return _literal(value)


def split_config_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.k=v` flags (passed on to every point) from argv."""
  rest, extras = [], []
  for arg in argv:
    if arg.startswith(FLAG_PREFIX):
      if "=" not in arg:
        raise SweepError(f"{arg}: write config overrides as {arg}=VALUE")
      extras.append(arg)
    else:
      rest.append(arg)
  return rest, extras


def resolve(spec: str, flags: Sequence[str]) -> config_dict.ConfigDict:
  """The config `ncjax.main --config=spec *flags` runs, parsed the same way."""
  argv = [MAIN_MODULE, f"--config={spec}", *flags]
  values = absl_flags.FlagValues()
  holder = config_flags.DEFINE_config_file(
      "config", None, flag_values=values, lock_config=True, sys_argv=argv
  )
  values(argv)
  return holder.value


# ------------------------------------------------------------------ names


def _name_part(value: Any) -> str:
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, float):
    return f"{value:g}"
  if isinstance(value, (list, tuple)):
    return "_".join(_name_part(v) for v in value) or "none"
  if isinstance(value, Mapping):
    return "_".join(f"{k}-{_name_part(v)}" for k, v in value.items()) or "none"
  return str(value)


def _labels(keys: Iterable[str]) -> dict[str, str]:
  """Field path -> its label in names: the last part, unless two share it."""
  keys = list(dict.fromkeys(keys))
  leaves = [k.rsplit(".", 1)[-1] for k in keys]
  return {k: (leaf if leaves.count(leaf) == 1 else k) for k, leaf in zip(keys, leaves, strict=True)}


def workdir_name(overrides: Mapping[str, Any], labels: Mapping[str, str] | None = None) -> str:
  """'combos=papila-sex,seeds=0' for {'study.combos': ('papila:sex',), 'seeds': (0,)}."""
  if not overrides:
    return "default"
  labels = labels or _labels(overrides)
  text = ",".join(f"{labels[k]}={_name_part(v)}" for k, v in overrides.items())
  text = re.sub(r"[^A-Za-z0-9._=,+-]", "_", text.replace(":", "-").replace("/", "-"))
  if len(text) > _MAX_NAME:
    digest = hashlib.sha1(text.encode()).hexdigest()[:8]
    text = f"{text[:_MAX_NAME - 9]}-{digest}"
  return text


# ------------------------------------------------------------------ expand


def expand(spec: str, extra_flags: Sequence[str] = ()) -> list[Point]:
  """The validated points of `spec`'s sweep, each with `extra_flags` appended.

  Args:
    spec: `path/to/config.py` or `path/to/config.py:arg`, as `--config` takes.
    extra_flags: `--config.k=v` flags for every point (not swept keys).

  Returns:
    One `Point` per override dict of `get_sweep`, in its order.

  Raises:
    SweepError: the file, a key, a value or a name clash is wrong.
  """
  path, arg = split_spec(spec)
  module = _load_module(path)
  config = _call(module.get_config, arg, f"{path} get_config()")
  if not isinstance(config, config_dict.ConfigDict):
    raise SweepError(f"{path} get_config() returned {type(config).__name__}, not a ConfigDict")
  fields = _field_paths(config)
  extra_keys = []
  for flag in extra_flags:
    key = flag[len(FLAG_PREFIX) :].split("=", 1)[0]
    _check_key(key, fields, flag)
    extra_keys.append(key)
  try:
    resolve(spec, extra_flags)
  except Exception as e:  # pylint: disable=broad-except  # flag parsing errors
    raise SweepError(f"{' '.join(extra_flags)}: {_one_line(e)}") from None
  sweep = [
      {k.removeprefix("config."): tuple(v) if isinstance(v, list) else v for k, v in p.items()}
      for p in load_sweep(spec)
  ]
  labels = _labels(k for p in sweep for k in p)
  points, seen = [], {}
  for i, overrides in enumerate(sweep):
    where = f"{path} get_sweep() point {i}"
    for key in overrides:
      _check_key(key, fields, where)
      if key in extra_keys:
        raise SweepError(f"{where} sets {key!r}: drop --config.{key} from the command line")
    flags = tuple(f"{FLAG_PREFIX}{k}={flag_value(v)}" for k, v in overrides.items())
    _check_round_trip(spec, config, overrides, flags, where)
    flags += tuple(extra_flags)
    name = workdir_name(overrides, labels)
    if name in seen:
      raise SweepError(f"{path} get_sweep() points {seen[name]} and {i} are both {name!r}")
    seen[name] = i
    points.append(Point(i, name, overrides, flags))
  return points


def _get(config, path: str) -> Any:
  for part in path.split("."):
    config = config[part]
  return config


def _check_round_trip(spec: str, config, overrides: Mapping[str, Any], flags, where: str) -> None:
  """The flags set exactly the values of `overrides`, of the fields' types."""
  direct = copy.deepcopy(config)  # still locked: ml-collections checks the types
  try:
    for key, value in overrides.items():
      parent, _, leaf = key.rpartition(".")
      (_get(direct, parent) if parent else direct)[leaf] = value
  except Exception as e:  # pylint: disable=broad-except  # ml-collections type checks
    raise SweepError(f"{where}: {key}={value!r}: {_one_line(e)}") from None
  try:
    parsed = resolve(spec, flags)
  except Exception as e:  # pylint: disable=broad-except  # flag parsing errors
    raise SweepError(f"{where} ({' '.join(flags)}): {_one_line(e)}") from None
  for key in overrides:
    if _get(parsed, key) != _get(direct, key):
      raise SweepError(
          f"{where}: {key}={_get(direct, key)!r} reads back from the command line as "
          f"{_get(parsed, key)!r}"
      )


def state(spec: str, point: Point, root: str) -> str:
  """'new', 'unfinished' (it resumes) or 'finished' (skip it).

  Raises:
    SweepError: the workdir holds a run of a different config.
  """
  workdir = point.workdir(root)
  if not os.path.isdir(workdir):
    return "new"
  # Imported here: JAX loads only when there is a workdir to look at.
  from ncjax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  from ncjax.errors import NcjaxError  # pylint: disable=import-outside-toplevel

  if not os.path.exists(os.path.join(workdir, workdir_lib.CONFIG_FILE)):
    return "new"
  try:
    workdir_lib.check_config(workdir, resolve(spec, point.flags))
  except NcjaxError as e:
    raise SweepError(str(e)) from None
  return "finished" if workdir_lib.finished(workdir) else "unfinished"


def states(spec: str, points: Sequence[Point], root: str) -> list[str]:
  """`state` of every point; all mismatched workdirs named in one error."""
  out, errors = [], []
  for p in points:
    try:
      out.append(state(spec, p, root))
    except SweepError as e:
      errors.append(f"point {p.index}: {e}")
  if errors:
    raise SweepError("; ".join(errors))
  return out


def prepare_datasets(spec: str, points: Sequence[Point]) -> None:
  """Generates the procedural datasets of `points` once, here and now.

  Runs started together would otherwise all generate a missing dataset at
  once and race on its folder (`ncjax.study` does the same before its
  parallel jobs). A real dataset that is not prepared is left to the run to
  report.
  """
  # Imported here: only launches that start runs need JAX and TFDS.
  from ncjax import input_pipeline, study  # pylint: disable=import-outside-toplevel
  from ncjax.errors import NcjaxError  # pylint: disable=import-outside-toplevel

  for point in points:
    config = resolve(spec, point.flags)
    try:
      for dataset, attribute in study.combos(config):
        input_pipeline.ensure_prepared(study.disease_config(config, dataset, attribute))
    except NcjaxError:
      pass  # reported by the run itself


def array_ranges(indices: Sequence[int]) -> str:
  """[0, 1, 2, 5] -> '0-2,5' (a SLURM --array list)."""
  parts, start = [], None
  for i, x in enumerate(indices):
    if start is None:
      start = x
    if i + 1 == len(indices) or indices[i + 1] != x + 1:
      parts.append(str(x) if x == start else f"{start}-{x}")
      start = None
  return ",".join(parts)


def exit_on_error(fn):
  """Runs fn(); a SweepError is printed as one line and exits with status 2."""
  try:
    return fn()
  except SweepError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except BrokenPipeError:  # `... --dry_run | head`: stop quietly
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(1)


def run_launcher(main: Callable[[list[str], list[str]], int]) -> None:
  """Runs a launcher's `main(argv, config_flags)` under absl: the
  `--config.k=v` flags are split off for every point, errors are one line."""
  from absl import app  # pylint: disable=import-outside-toplevel

  argv, extras = exit_on_error(lambda: split_config_flags(sys.argv))
  app.run(lambda a: sys.exit(exit_on_error(lambda: main(a, extras))), argv=argv)
