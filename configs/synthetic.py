"""The built-in synthetic benchmark: the default run, on a laptop CPU.

Trains clean and label-biased disease models (seeds x bias rates, one set of
members sharing one compiled step) on the procedural benchmark of
`ncjax.datasets.synthetic`, whose three binary attributes `low`, `medium` and
`high` differ in how visible they are in the images (subgroup separability).

  python -m ncjax.main --workdir=/tmp/ncjax_synthetic
  python -m ncjax.main --config=configs/synthetic.py:attribute=low --workdir=...
  python -m ncjax.main --config=configs/synthetic.py:tiny --workdir=...   # tests

Arguments (comma separated after the colon): `attribute=NAME` picks the
attribute whose group 1 is biased and reported; `tiny` shrinks everything for
tests (a few seconds). The default run takes a few minutes on 2 CPU cores;
the run log prints the measured time.
"""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults):
  """'a=1,flag' -> ConfigDict(a='1', flag=True), over typed defaults."""
  out = ml_collections.ConfigDict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, _, value = part.partition("=")
    if key not in out:
      raise ValueError(
          f"unknown config argument {key!r}; expected one of {sorted(out)}"
      )
    kind = type(defaults[key])
    out[key] = (value.lower() in ("1", "true", "")) if kind is bool else kind(value)
  return out


def synthetic_dataset() -> ml_collections.ConfigDict:
  """Generator parameters of the benchmark (shaped like the paper's Table 1)."""

  def attribute(strength, share, prevalence, period, orientation):
    return dict(
        strength=strength,
        share=share,
        prevalence=prevalence,
        period=period,
        orientation=orientation,
    )

  return ml_collections.ConfigDict(
      dict(
          image_size=24,
          num_train=1536,
          num_validation=512,
          num_test=2048,
          prevalence=0.25,
          seed=0,
          texture_sigma=3.0,
          texture_amplitude=0.4,
          noise_sd=0.25,
          lesion_radius=(1.0, 2.2),
          lesion_contrast=(0.6, 3.0),
          # Three group cues of increasing visibility (grating amplitude);
          # share = P(group 1), prevalence = P(disease | group 1).
          attributes=dict(
              low=attribute(0.07, 0.50, 0.30, 6.0, 0.0),
              medium=attribute(0.10, 0.55, 0.30, 5.0, 1.05),
              high=attribute(0.30, 0.60, 0.28, 4.0, 2.09),
          ),
      )
  )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The synthetic default (see the module docstring for arguments)."""
  arg = parse_arg(arg, attribute="high", tiny=False)
  config = ml_collections.ConfigDict()

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = "synthetic"
  config.dataset.attribute = arg.attribute  # whose group 1 is biased
  config.dataset.data_dir = ""  # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
  config.dataset.synthetic = synthetic_dataset()
  # Pixel normalisation (uint8 -> (x / 255 - mean) / std), per channel.
  config.dataset.mean = (0.5,)
  config.dataset.std = (0.06,)

  # On-device augmentation (SPEC section 4); the synthetic benchmark has none.
  config.augment = ml_collections.ConfigDict()
  config.augment.enabled = False
  config.augment.out_size = 224  # random-resized-crop / centre-crop size
  config.augment.resize = 256  # eval: short side before the centre crop
  config.augment.scale = (0.08, 1.0)
  config.augment.ratio = (3 / 4, 4 / 3)
  config.augment.degrees = 15.0

  # What the model predicts: 'label' (disease) or an attribute name (the
  # subgroup-separability models).
  config.target = "label"

  # Members: every (seed, bias rate) pair is one model, trained together.
  config.seeds = (0, 1, 2)
  config.bias = ml_collections.ConfigDict()
  config.bias.rates = (0.0, 0.25)
  config.bias.group = 1  # attribute value whose labels are flipped
  config.bias.mode = "independent"  # or 'exact' (round(rate * n) flips)
  config.bias.direction = "under"  # 1 -> 0; 'over' flips 0 -> 1

  config.model = ml_collections.ConfigDict()
  config.model.name = "resnet10"
  config.model.width = 8
  config.model.stem = "cifar"  # 3x3 stride-1 stem for small images
  config.model.stage_sizes = (1, 1, 1)  # () = the named depth
  config.model.dtype = "float32"  # compute dtype; params stay float32

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adam"  # adam | adamw | sgd
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 0.0
  config.optimizer.momentum = 0.9  # sgd only

  config.batch_size = 32  # global, over all devices
  config.eval_batch_size = 1024
  config.epochs = 30
  config.early_stopping = ml_collections.ConfigDict()
  config.early_stopping.patience = 5  # epochs without val-loss improvement

  # 'loop' calls one compiled step per member, 'vmap' runs all members in one
  # step; 'auto' picks per backend (loop on CPU, where vmapped convolutions
  # are slow; vmap on GPU/TPU).
  config.members = ml_collections.ConfigDict()
  config.members.strategy = "auto"

  config.nc = ml_collections.ConfigDict()
  config.nc.every = 1  # epochs between NC measurements
  config.nc.layer = "pre_logits"  # feature name returned by the model

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every = 1  # epochs between resumable saves

  config.progress = True  # progress bar over epochs

  if arg.tiny:
    config.dataset.synthetic.num_train = 128
    config.dataset.synthetic.num_validation = 64
    config.dataset.synthetic.num_test = 128
    config.dataset.synthetic.image_size = 16
    config.model.width = 4
    config.model.stage_sizes = (1, 1)
    config.seeds = (0, 1)
    config.batch_size = 32
    config.eval_batch_size = 128
    config.epochs = 3
    config.early_stopping.patience = 1
    config.progress = False

  config.lock()
  return config

