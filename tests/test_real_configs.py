"""The paper's dataset configs train end to end on fixture downloads.

A PAPILA fixture in its published layout is prepared at a tiny size and
trained with `configs/papila.py` shrunk (narrow model, two epochs) with the
on-device augmentation on; the stage evaluation then reads it back.
"""

from __future__ import annotations

import json
import os

import dataset_fixtures as fx
import numpy as np
import pytest

from configs import chexpert as chexpert_config
from configs import ham10000 as ham_config
from configs import paper as paper_config
from configs import papila as papila_config
from ncjax import evaluate, metric_writers, prepare, study, train


@pytest.fixture(scope="module")
def papila_run(tmp_path_factory):
  manual = str(tmp_path_factory.mktemp("papila_manual"))
  fx.write_papila(manual, num_patients=24)
  data_dir = str(tmp_path_factory.mktemp("papila_data"))
  prepare.prepare("papila", manual, data_dir, image_size=(24, 32), num_workers=1)
  config = papila_config.get_config("attribute=age")
  config.dataset.data_dir = data_dir
  config.dataset.image_size = (24, 32)
  config.model.name = "resnet10"
  config.model.width = 4
  config.model.stem = "cifar"
  config.model.stage_sizes = (1, 1)
  config.augment.out_size = 16
  config.augment.resize = 20
  config.seeds = (0,)
  config.batch_size = 8
  config.eval_batch_size = 32
  config.epochs = 2
  config.early_stopping.patience = 1
  config.progress = False
  workdir = str(tmp_path_factory.mktemp("papila_run"))
  summary = train.train_and_evaluate(config, workdir)
  return config, workdir, summary


def test_papila_config_trains_with_augmentation(papila_run):
  config, workdir, _ = papila_run
  records = metric_writers.read_records(os.path.join(workdir, "metrics.jsonl"))
  keys = {(r["epoch"], r["member"], r["split"]) for r in records}
  assert len(keys) == 2 * 2 * 3  # epochs x members x splits
  assert all("nc1" in r and r["loss"] is not None for r in records)
  with open(os.path.join(workdir, "run.json")) as f:
    assert json.load(f)["image_shape"] == [24, 32, 3]
  evaluated = evaluate.run(workdir)
  assert {(r["member"], r["stage"]) for r in evaluated} == {
      (m, s) for m in ("seed0_bias0", "seed0_bias0.25") for s in ("early", "final")
  }
  assert all(0.0 <= r["accuracy"] <= 1.0 for r in evaluated)


def test_augmentation_changes_the_training_batches(papila_run, tmp_path):
  """Same run without augmentation: different batch losses, same data."""
  config, workdir, _ = papila_run
  config = config.copy_and_resolve_references()
  config.augment.enabled = False
  config.augment.out_size = 24  # unused without augmentation
  plain = str(tmp_path / "plain")
  train.train_and_evaluate(config, plain)
  a = metric_writers.read_records(os.path.join(workdir, "metrics.jsonl"))
  b = metric_writers.read_records(os.path.join(plain, "metrics.jsonl"))
  loss_a = [r["batch_loss"] for r in a if r["split"] == "train"]
  loss_b = [r["batch_loss"] for r in b if r["split"] == "train"]
  assert loss_a != loss_b


def test_paper_study_expands_to_the_six_combinations():
  config = paper_config.get_config()
  config.seeds = (3, 4)
  pairs = study.combos(config)
  assert pairs == [
      ("papila", "sex"), ("papila", "age"), ("ham10000", "sex"),
      ("ham10000", "age"), ("chexpert", "sex"), ("chexpert", "race"),
  ]  # fmt: skip
  for dataset, attribute in pairs:
    c = study.disease_config(config, dataset, attribute)
    assert (c.dataset.name, c.dataset.attribute, c.seeds) == (dataset, attribute, (3, 4))
    s = study.separability_config(config, dataset, attribute)
    assert s.target == attribute and tuple(s.bias.rates) == (0.0,)
  assert study.disease_config(config, "papila", "sex").batch_size == 32
  assert study.disease_config(config, "ham10000", "sex").batch_size == 256
  assert ham_config.get_config().batch_size == 256
  assert chexpert_config.get_config().dataset.mean == (0.449,)


def _torchvision_state_dict(variables, num_classes=1000, seed=0):
  """Flax ResNet variables -> torchvision names and layouts (written out
  independently of the converter), with a random 1000-class head."""
  rng = np.random.default_rng(seed)
  out = {}

  def bn(prefix, p, s):
    out[f"{prefix}.weight"], out[f"{prefix}.bias"] = p["scale"], p["bias"]
    out[f"{prefix}.running_mean"], out[f"{prefix}.running_var"] = s["mean"], s["var"]

  params, stats = variables["params"], variables["batch_stats"]
  for name, p in params.items():
    if name == "conv1":
      out["conv1.weight"] = np.transpose(p["kernel"], (3, 2, 0, 1))
    elif name == "bn1":
      bn("bn1", p, stats["bn1"])
    elif name.startswith("layer"):
      layer, block = name[len("layer") :].split("_")
      prefix = f"layer{layer}.{block}"
      for sub, q in p.items():
        if "conv" in sub:
          torch_sub = "downsample.0" if sub == "downsample_conv" else sub
          out[f"{prefix}.{torch_sub}.weight"] = np.transpose(q["kernel"], (3, 2, 0, 1))
        else:
          torch_sub = "downsample.1" if sub == "downsample_bn" else sub
          bn(f"{prefix}.{torch_sub}", q, stats[name][sub])
  d = params["fc"]["kernel"].shape[0]
  out["fc.weight"] = rng.normal(size=(num_classes, d)).astype(np.float32)
  out["fc.bias"] = rng.normal(size=(num_classes,)).astype(np.float32)
  return {k: np.asarray(v, np.float32) for k, v in out.items()}


def test_init_from_starts_training_from_the_given_weights(tmp_path):
  """With learning rate 0 the final model is the converted checkpoint: every
  weight from the file, and a fresh 2-class head."""
  import jax  # pylint: disable=import-outside-toplevel

  from configs import synthetic  # pylint: disable=import-outside-toplevel
  from ncjax import checkpoints, resnet  # pylint: disable=import-outside-toplevel

  config = synthetic.get_config("tiny")
  config.dataset.data_dir = str(tmp_path / "tfds")
  config.model.name, config.model.width, config.model.stage_sizes = "resnet18", 4, ()
  config.seeds, config.bias.rates, config.epochs = (0,), (0.0,), 1
  config.optimizer.learning_rate = 0.0
  source = resnet.create("resnet18", width=4, stem="cifar", num_classes=1000)
  x = jax.numpy.zeros((1, 16, 16, 1))
  variables = jax.jit(source.init)(jax.random.key(7), x)
  variables = jax.tree.map(lambda v: v + np.float32(0.5), variables)  # not an init
  state_dict = _torchvision_state_dict(jax.device_get(variables))
  path = str(tmp_path / "weights.npz")
  np.savez(path, **state_dict)
  config.model.init_from = path
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  final = checkpoints.restore_stage(workdir, "seed0_bias0", "final")
  np.testing.assert_array_equal(
      np.transpose(final["params"]["conv1"]["kernel"], (3, 2, 0, 1)), state_dict["conv1.weight"]
  )
  np.testing.assert_array_equal(
      final["params"]["layer4_0"]["downsample_bn"]["scale"],
      state_dict["layer4.0.downsample.1.weight"],
  )
  assert final["params"]["fc"]["kernel"].shape == (32, 2)  # fresh 2-class head
