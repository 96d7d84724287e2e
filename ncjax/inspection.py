"""Inspecting workdirs: what the colabs compute, importable and tested.

The colabs (`colabs/*.ipynb`) only set knobs and call this module,
`ncjax.feature_geometry` and `ncjax.inspection_figures`:

  training_workdirs(path)    {name: training workdir} of a study or of one run
  load_metrics(workdir)      metrics.jsonl as a DataFrame (NaN for null)
  load_stage_eval(workdir)   stage_eval.jsonl as a DataFrame
  stage_features(...)        one member at one saved stage: eval-mode features
                             and logits of train and test, clean and trained
                             labels, groups, flipped samples, classifier
  flipped_table(...)         flipped samples nearer their true class per
                             stage, recomputed and as logged
  group_confusion            the confusion matrix of each group

Features come from the saved Orbax stages (`checkpoints.restore_stage`)
through the same eval-mode apply as the stage evaluation
(`evaluate.features_and_logits`), so they are the features the NC metrics
of that epoch were computed from.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from ncjax import checkpoints, evaluate, fairness, input_pipeline, train
from ncjax.errors import WorkdirError
from ncjax.feature_geometry import class_axis_position, nearer_true_class
from ncjax.metric_writers import METRICS_FILE, read_records

# ----------------------------------------------------------------- workdirs


def is_training_workdir(path: str) -> bool:
  """True if `path` holds one training run (`run.json`, written at its start)."""
  return os.path.isfile(os.path.join(path, train.RUN_FILE))


def find_workdir(path: str, roots: Sequence[str] = ()) -> str:
  """`path` if it exists, else the first `root/path` that does.

  Lets a notebook opened in `colabs/` name `runs/synthetic` relative to the
  repository root, as `make run` writes it.
  """
  if os.path.exists(path) or os.path.isabs(path):
    return path
  for root in roots:
    candidate = os.path.join(root, path)
    if os.path.exists(candidate):
      return candidate
  return path


def training_workdirs(path: str, *, separability: bool = False) -> dict[str, str]:
  """{name: training workdir} found at `path`.

  A study directory (`combos/<dataset>-<attribute>/`, as `ncjax.study`
  writes it) gives its combinations by name, and with `separability` also
  `separability/<name>`; a training workdir gives itself under its folder
  name.

  Raises:
    WorkdirError: `path` is neither, or holds no finished-or-running run.
  """
  if not os.path.isdir(path):
    raise WorkdirError(f"{path} does not exist (a study: `make run WORKDIR={path}`)")
  if is_training_workdir(path):
    return {os.path.basename(os.path.abspath(path)): path}
  kinds = ("combos", "separability") if separability else ("combos",)
  found = {}
  for kind in kinds:
    root = os.path.join(path, kind)
    if not os.path.isdir(root):
      continue
    for name in sorted(os.listdir(root)):
      if is_training_workdir(os.path.join(root, name)):
        found[name if kind == "combos" else f"{kind}/{name}"] = os.path.join(root, name)
  if not found:
    raise WorkdirError(
        f"{path} is neither a training workdir (no {train.RUN_FILE}) nor a study "
        "directory with runs under combos/"
    )
  return found


def members(workdir: str) -> list[dict]:
  """The members of a run as `run.json` lists them: name, seed, bias_rate."""
  with open(os.path.join(workdir, train.RUN_FILE)) as f:
    return json.load(f)["members"]


def default_member(workdir: str) -> str:
  """The first member with flipped train samples, else the first member."""
  names = [m["name"] for m in members(workdir)]
  for name in names:
    if flipped_ids(workdir, name).get("train"):
      return name
  return names[0]


def flipped_ids(workdir: str, member: str) -> dict[str, list[str]]:
  """{split: example ids whose label the member trained on was flipped}."""
  path = os.path.join(workdir, "bias", f"{member}.json")
  if not os.path.exists(path):
    raise WorkdirError(f"{path} not found: is {member!r} a member of {workdir}?")
  with open(path) as f:
    return json.load(f)["flipped_ids"]


def stage_epochs(workdir: str, *, missing_ok: bool = False) -> dict[str, dict[str, int]]:
  """{member: {'early': best epoch, 'final': last epoch}} of a finished run.

  An unfinished run raises WorkdirError, or gives {} with `missing_ok`.
  """
  path = os.path.join(workdir, "train_summary.json")
  if not os.path.exists(path):
    if missing_ok:
      return {}
    raise WorkdirError(f"{path} not found: has the run in {workdir} finished?")
  with open(path) as f:
    best = json.load(f)["members"]
  last = int(evaluate.load_config(workdir).epochs)
  return {m: {"early": int(v["best_epoch"]), "final": last} for m, v in best.items()}


def _frame(records: list[dict], index: Sequence[str]) -> pd.DataFrame:
  """Records -> DataFrame; numeric columns float64 with None -> NaN (a column
  that is all None, or a metric missing from some records, included)."""
  df = pd.DataFrame.from_records(records)
  for col in df.columns:
    if col not in index:
      try:
        df[col] = pd.to_numeric(df[col]).astype(np.float64)
      except (TypeError, ValueError):
        pass  # a text column stays as it is
  return df


def load_metrics(workdir: str) -> pd.DataFrame:
  """metrics.jsonl: one row per (epoch, member, split), sorted; NaN for null.

  A metric absent at an epoch (NC metrics are measured every `nc.every`
  epochs) is NaN in that row.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    raise WorkdirError(f"{path} not found: has the run in {workdir} started?")
  df = _frame(read_records(path), ("member", "split"))
  df["epoch"] = df["epoch"].astype(int)
  df["seed"] = df["seed"].astype(int)
  return df.sort_values(["member", "split", "epoch"], ignore_index=True)


def load_stage_eval(workdir: str) -> pd.DataFrame:
  """stage_eval.jsonl (`ncjax.evaluate.run`): one row per (member, stage)."""
  path = os.path.join(workdir, evaluate.EVAL_FILE)
  if not os.path.exists(path):
    raise WorkdirError(f"{path} not found: run ncjax.evaluate.run({workdir!r}) first")
  df = _frame(read_records(path), ("member", "stage"))
  df["seed"] = df["seed"].astype(int)
  return df.sort_values(["bias_rate", "seed", "stage"], ignore_index=True)


# ------------------------------------------------------------ stage features


@dataclasses.dataclass(frozen=True)
class SplitFeatures:
  """Eval-mode outputs of one member on (a sample of) one split."""

  feats: np.ndarray  # N x D, the configured NC layer
  logits: np.ndarray  # N x K
  labels: np.ndarray  # N clean labels
  trained: np.ndarray  # N labels the member trained on (flips applied)
  groups: np.ndarray  # N attribute values
  flipped: np.ndarray  # N bool: trained label != clean label
  ids: np.ndarray  # N example ids

  @property
  def predictions(self) -> np.ndarray:
    """The model's decisions (argmax of the logits; ties go to class 0)."""
    return fairness.predictions_from_logits(self.logits)[0]


@dataclasses.dataclass(frozen=True)
class StageFeatures:
  """One member at one saved stage: its classifier and its split outputs."""

  member: str
  stage: str  # 'early' | 'final'
  epoch: int  # the training epoch whose parameters the stage holds
  w: np.ndarray  # K x D classifier
  b: np.ndarray  # K bias
  means: np.ndarray  # K x D train class means of the trained labels
  splits: dict[str, SplitFeatures]


def load_splits(workdir: str, data_dir: str | None = None) -> dict[str, input_pipeline.HostSplit]:
  """The run's train, validation and test splits as its config reads them.

  `data_dir` replaces the run's `dataset.data_dir` (e.g. a workdir copied
  from another machine); procedural datasets are generated if missing.
  """
  config = evaluate.load_config(workdir)
  if data_dir is not None:
    config.dataset.data_dir = data_dir
  return input_pipeline.load(config)


def sample_rows(n: int, max_rows: int | None, seed: int = 0) -> np.ndarray:
  """Sorted indices of at most `max_rows` of n rows, uniformly at random."""
  if max_rows is None or n <= max_rows:
    return np.arange(n)
  return np.sort(np.random.default_rng(seed).choice(n, max_rows, replace=False))


def stage_features(
    workdir: str,
    member: str,
    stage: str,
    splits: Mapping[str, input_pipeline.HostSplit],
    *,
    split_names: Sequence[str] = ("train", "test"),
    max_samples: int | None = None,
    seed: int = 0,
) -> StageFeatures:
  """Restores `member` at `stage` and extracts its features of `split_names`.

  Args:
    workdir: a finished training workdir.
    member: e.g. 'seed0_bias0.25' (see `members`).
    stage: 'early' or 'final'.
    splits: from `load_splits(workdir)`.
    split_names: which splits to run; must include 'train' (class means).
    max_samples: at most this many rows per split, drawn uniformly with
      `seed` (the same rows for every stage); None = all. The class means
      are then those of the sampled train rows.
    seed: of the row sample.

  Returns:
    The member's classifier, train class means (trained labels, as the NC
    metrics use them) and the outputs of every requested split.
  """
  if "train" not in split_names:
    raise ValueError(f"split_names must include 'train' (class means), got {split_names}")
  config = evaluate.load_config(workdir)
  variables = checkpoints.restore_stage(workdir, member, stage)
  flips = flipped_ids(workdir, member)
  out = {}
  for name in split_names:
    host = splits[name]
    idx = sample_rows(len(host), max_samples, seed)
    logits, feats = evaluate.features_and_logits(config, variables, host.images[idx])
    flipped = np.isin(host.ids[idx], list(flips.get(name, [])))
    labels = np.asarray(host.labels[idx])
    out[name] = SplitFeatures(
        feats=feats, logits=logits, labels=labels,
        trained=np.where(flipped, 1 - labels, labels).astype(np.int32),
        groups=np.asarray(host.groups[idx]), flipped=flipped, ids=host.ids[idx],
    )  # fmt: skip
  w = np.asarray(variables["params"]["fc"]["kernel"]).T
  b = np.asarray(variables["params"]["fc"]["bias"])
  tr = out["train"]
  return StageFeatures(
      member=member, stage=stage, epoch=stage_epochs(workdir)[member][stage], w=w, b=b,
      means=class_means(tr.feats, tr.trained, w.shape[0]), splits=out,
  )  # fmt: skip


def class_means(feats_NxD: np.ndarray, labels_N: np.ndarray, num_classes: int) -> np.ndarray:
  """K x D float64 means of the features per label; NaN rows for empty classes."""
  feats = np.asarray(feats_NxD, np.float64)
  labels = np.asarray(labels_N)
  out = np.full((num_classes, feats.shape[1]), np.nan)
  for c in range(num_classes):
    if np.any(labels == c):
      out[c] = feats[labels == c].mean(axis=0)
  return out


def group_confusion(
    labels_N: np.ndarray, predictions_N: np.ndarray, groups_N: np.ndarray, num_classes: int = 2
) -> dict[int, np.ndarray]:
  """{group: K x K counts}, rows the true label, columns the prediction."""
  labels = np.asarray(labels_N).astype(np.int64)
  preds = np.asarray(predictions_N).astype(np.int64)
  groups = np.asarray(groups_N)
  if not labels.shape == preds.shape == groups.shape or labels.ndim != 1:
    raise ValueError(
        f"labels {labels.shape}, predictions {preds.shape}, groups {groups.shape} differ"
    )
  for name, v in (("labels", labels), ("predictions", preds)):
    if v.size and (v.min() < 0 or v.max() >= num_classes):
      raise ValueError(f"{name} must lie in [0, {num_classes})")
  out = {}
  for g in np.unique(groups).tolist():
    cell = labels[groups == g] * num_classes + preds[groups == g]
    out[g] = np.bincount(cell, minlength=num_classes**2).reshape(num_classes, num_classes)
  return out


def flipped_table(views: Sequence[StageFeatures], metrics: pd.DataFrame) -> pd.DataFrame:
  """Flipped train samples nearer their true-class mean, per stage.

  `nearer_true` is recomputed from the stage's features (`nearer_true_class`
  of the flipped samples); `logged` is `flipped_near_true` of the same member
  and epoch in metrics.jsonl. They agree when the features cover the whole
  train split (no `max_samples` sampling).
  """
  rows = []
  for v in views:
    sf = v.splits["train"]
    near = nearer_true_class(class_axis_position(sf.feats[sf.flipped], v.means),
                             sf.labels[sf.flipped])  # fmt: skip
    logged = metrics[
        (metrics["member"] == v.member) & (metrics["split"] == "train")
        & (metrics["epoch"] == v.epoch)
    ]  # fmt: skip
    key = "flipped_near_true"
    rows.append({
        "member": v.member, "stage": v.stage, "epoch": v.epoch, "flipped": int(sf.flipped.sum()),
        "nearer_true": float(np.mean(near)) if near.size else np.nan,
        "logged": float(logged[key].iloc[0]) if key in logged and len(logged) else np.nan,
    })  # fmt: skip
  return pd.DataFrame(rows)
