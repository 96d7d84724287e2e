"""Defaults shared by every config: the paper's settings (SPEC section 4).

Dataset configs (`synthetic.py`, `papila.py`, `ham10000.py`, `chexpert.py`)
start from `base_config()` and override what differs; every field any of
them uses is declared here, so the locked config rejects typos everywhere.
"""

from __future__ import annotations

import ml_collections

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# XLA:CPU runs convolutions, reductions and elementwise fusions in YNNPACK by
# default; YNNPACK's convolution gradients are 2-4x slower than Eigen's here.
# Keeping YNNPACK for reductions only (BatchNorm statistics) and leaving
# convolutions to Eigen trains ResNet-18 at 224 x 224 1.6-1.9x and the
# synthetic default 1.1-1.2x faster on CPU, with jaxlib 0.10 and 0.12 alike
# (benchmarks/README.md, section xla_flags).
CPU_XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE"


def parse_arg(arg: str | None, **defaults):
  """'a=1,flag' -> ConfigDict(a='1', flag=True), over typed defaults."""
  out = ml_collections.ConfigDict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, _, value = part.partition("=")
    if key not in out:
      raise ValueError(f"unknown config argument {key!r}; expected one of {sorted(out)}")
    kind = type(defaults[key])
    out[key] = (value.lower() in ("1", "true", "")) if kind is bool else kind(value)
  return out


def base_config() -> ml_collections.ConfigDict:
  """The paper's training setup (unlocked: dataset configs override it)."""
  config = ml_collections.ConfigDict()

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = ""
  config.dataset.attribute = ""  # whose group 1 is biased and reported
  config.dataset.data_dir = ""  # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
  # Stored (H, W) of a real dataset, as prepared (`--image_size=HxW`);
  # () = the builder's default (256 x 341, CheXpert 224 x 224).
  config.dataset.image_size = ()
  # Pixel normalisation (uint8 -> (x / 255 - mean) / std), per channel.
  config.dataset.mean = IMAGENET_MEAN
  config.dataset.std = IMAGENET_STD

  # On-device augmentation (SPEC section 4): random resized crop + rotation
  # for training, resize + centre crop for evaluation.
  config.augment = ml_collections.ConfigDict()
  config.augment.enabled = True
  config.augment.out_size = 224  # random-resized-crop / centre-crop size
  config.augment.resize = 256  # eval: short side before the centre crop
  config.augment.scale = (0.08, 1.0)
  config.augment.ratio = (3 / 4, 4 / 3)
  config.augment.degrees = 15.0

  # What the model predicts: 'label' (disease) or an attribute name (the
  # subgroup-separability models).
  config.target = "label"

  # Members: every (seed, bias rate) pair is one model, trained together.
  config.seeds = tuple(range(10))
  config.bias = ml_collections.ConfigDict()
  config.bias.rates = (0.0, 0.25)
  config.bias.group = 1  # attribute value whose labels are flipped
  config.bias.mode = "independent"  # or 'exact' (round(rate * n) flips)
  config.bias.direction = "under"  # 1 -> 0; 'over' flips 0 -> 1

  config.model = ml_collections.ConfigDict()
  config.model.name = "resnet18"
  config.model.width = 64
  config.model.stem = "imagenet"  # 7x7/2 + max-pool; 'cifar' = 3x3/1
  config.model.stage_sizes = ()  # () = the named depth
  config.model.dtype = "float32"  # compute dtype; params stay float32
  # torchvision weights to start from (.pth or .npz made by
  # `python -m ncjax.torchvision_weights`); '' = random init.
  config.model.init_from = ""

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adam"  # adam | adamw | sgd
  config.optimizer.learning_rate = 2e-4
  config.optimizer.weight_decay = 0.0
  config.optimizer.momentum = 0.9  # sgd only

  config.batch_size = 256  # global, over all devices
  config.eval_batch_size = 512
  config.epochs = 200
  config.early_stopping = ml_collections.ConfigDict()
  config.early_stopping.patience = 5  # epochs without val-loss improvement

  # 'loop' calls one compiled step per member, 'vmap' runs all members in one
  # step; 'auto' picks per backend (loop on CPU, where vmapped convolutions
  # are slow; vmap on GPU/TPU).
  config.members = ml_collections.ConfigDict()
  config.members.strategy = "auto"
  # vmap only: members stacked into one step at a time (0 = all), to bound
  # accelerator memory with many large members.
  config.members.per_step = 0

  config.nc = ml_collections.ConfigDict()
  config.nc.every = 1  # epochs between NC measurements
  config.nc.layer = "pre_logits"  # feature name returned by the model

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every = 1  # epochs between resumable saves

  # Input: where the images of every split live during a run. Both read the
  # same batches in the same order, so the results are the same and a run
  # may resume with the other setting.
  config.input = ml_collections.ConfigDict()
  # False: every split resident on the device (fastest; it must fit). True:
  # images read from the prepared array_record files batch by batch, decoded
  # on the host and prefetched to the device (`ncjax.streaming`), for data
  # larger than device memory; needs members.strategy loop (or auto).
  config.input.streaming = False
  config.input.threads = 4  # streaming: batches decoded at once (host threads)
  config.input.prefetch = 2  # streaming: batches kept ready on the device

  config.progress = True  # progress bar over epochs
  # Persistent XLA compilation cache shared by all runs ('' = off): a rerun,
  # and every study run after the first, loads its executables from here.
  config.compilation_cache_dir = "~/.cache/ncjax/xla"
  # XLA flags for this run's processes, added to $XLA_FLAGS by `ncjax.main`
  # before JAX starts its backend (a flag that $XLA_FLAGS sets already keeps
  # its value there); '' = none. The default is for XLA:CPU and ignored by
  # other backends: see CPU_XLA_FLAGS.
  config.xla_flags = CPU_XLA_FLAGS

  # The study: dataset-attribute combinations ('attr' of this dataset, or
  # 'dataset:attr' with that dataset's config); empty = one run of
  # dataset.attribute.
  config.study = ml_collections.ConfigDict()
  config.study.combos = ()
  config.study.separability = True  # train attribute models too
  config.study.separability_epochs = 200
  # Runs trained at once in separate processes (CPU: up to the core count;
  # one accelerator: 1).
  config.study.workers = 1
  return config
