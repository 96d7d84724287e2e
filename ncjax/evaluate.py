"""Stage evaluation: every member at its early and final stage (SPEC section 6).

For each member and stage, restored from its Orbax checkpoint:
  * test predictions (clean labels) -> F1, AUC, TPR, FPR, accuracy and
    positive rate, overall and per group (`ncjax.fairness`);
  * test NC1 per group, measured around the train class means of the labels
    the member trained on (`ncjax.neural_collapse`);
  * SPLIT: a linear probe on frozen train features predicting the attribute,
    its test AUC (`ncjax.split_probe`).
Results go to `stage_eval.jsonl` in the workdir, one record per (member,
stage); `run()` skips a workdir whose evaluation is complete.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from ncjax import checkpoints, fairness, input_pipeline, neural_collapse, split_probe, train
from ncjax import workdir as workdir_lib
from ncjax.members import Member

EVAL_FILE = "stage_eval.jsonl"


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's config as written to its workdir (lists where tuples were)."""
  return ml_collections.ConfigDict(workdir_lib.read_config(workdir)["config"])


def _member_info(workdir: str) -> dict[str, Any]:
  with open(os.path.join(workdir, train.RUN_FILE)) as f:
    return json.load(f)


def features_and_logits(config, variables, images: np.ndarray, *, chunk: int = 1024):
  """Eval-mode (logits N x 2, features N x D of `config.nc.layer`) on host."""
  model = train.create_model(config)
  apply = _apply_fn(model, config.nc.layer, train.make_preprocess(config)[1])
  logits, feats = [], []
  for start in range(0, len(images), chunk):
    lo, fe = apply(variables, images[start : start + chunk])
    logits.append(np.asarray(lo))
    feats.append(np.asarray(fe))
  return np.concatenate(logits), np.concatenate(feats)


@functools.lru_cache(maxsize=8)
def _apply_fn(model, layer, preprocess):
  """One jitted eval apply per (model, layer, preprocessing)."""

  @jax.jit
  def apply(variables, images):
    x = preprocess(images)
    logits, feats = model.apply(variables, x, train=False)
    return logits, feats[layer].reshape(x.shape[0], -1)

  return apply


def evaluate_member(
    config, workdir: str, member: dict[str, Any], stage: str, splits, train_labels
) -> dict[str, Any]:
  """One member at one stage: fairness, test NC1 per group, SPLIT."""
  variables = checkpoints.restore_stage(workdir, member["name"], stage)
  train_logits, train_feats = features_and_logits(config, variables, splits["train"].images)
  test = splits["test"]
  test_logits, test_feats = features_and_logits(config, variables, test.images)
  del train_logits

  pred, score = fairness.predictions_from_logits(test_logits)
  record = {
      "member": member["name"],
      "seed": member["seed"],
      "bias_rate": member["bias_rate"],
      "stage": stage,
  }
  record.update(fairness.group_metrics(test.labels, pred, score, test.groups))

  w = np.asarray(variables["params"]["fc"]["kernel"]).T  # K x D
  b = np.asarray(variables["params"]["fc"]["bias"])
  k = w.shape[0]
  f64 = train_feats.astype(np.float64)
  centers = np.stack([f64[train_labels == c].mean(axis=0) for c in range(k)])
  nc = neural_collapse.compute(test_feats, test.labels, w, b, test.groups, centers=centers)
  record.update({f"test_{key}": value for key, value in nc.items()})

  probe = split_probe.split_probe(train_feats, splits["train"].groups, test_feats, test.groups)
  record["split_auc"] = probe.auc
  record["split_accuracy"] = probe.accuracy
  return record


def run(workdir: str) -> list[dict[str, Any]]:
  """Evaluates every member of a finished run at both stages (resumable)."""
  path = os.path.join(workdir, EVAL_FILE)
  info = _member_info(workdir)
  if os.path.exists(path):
    with open(path) as f:
      done = [json.loads(line) for line in f if line.strip()]
    if len(done) == len(info["members"]) * len(checkpoints.STAGES):
      return done
  config = load_config(workdir)
  splits = input_pipeline.load(config)
  records = []
  for member in info["members"]:
    m = _as_member(member)
    train_labels = input_pipeline.member_labels(splits, m, config)["train"][0]
    for stage in checkpoints.STAGES:
      records.append(evaluate_member(config, workdir, member, stage, splits, train_labels))
  if jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(_jsonable(r)) + "\n" for r in records)
    os.replace(tmp, path)
  return records


def _as_member(member: dict[str, Any]) -> Member:
  return Member(int(member["seed"]), float(member["bias_rate"]))


def _jsonable(record: dict[str, Any]) -> dict[str, Any]:
  out = {}
  for k, v in record.items():
    if isinstance(v, (np.floating, float)):
      v = float(v)
      out[k] = v if np.isfinite(v) else None
    elif isinstance(v, np.integer):
      out[k] = int(v)
    else:
      out[k] = v
  return out
