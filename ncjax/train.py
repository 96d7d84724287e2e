"""Training: members sharing one compiled step, data parallel on a device mesh.

A run trains every member (seed x bias rate) of one dataset-attribute
combination. The train step is one pure function `(state, order, labels,
aug_key, images) -> (state, metrics)`, jit-compiled once with donated state:

  * data parallel: `jax.jit` over a 1-D `Mesh` named 'data' (the supported
    successor of `pmap`); the batch is sharded on 'data', parameters are
    replicated, XLA inserts the gradient all-reduce, and BatchNorm sees the
    global batch. The same code runs on 1 CPU, 8 GPUs or a TPU slice.
  * members: `members.strategy='loop'` calls the compiled step once per
    member; 'vmap' runs all members in one step over stacked states. Both
    apply the same step function, so they compute the same numbers.
  * input: by default splits stay resident on the mesh; a batch is gathered
    inside the step from a permutation derived from (member data key, epoch),
    so a step copies nothing from the host and a resumed run replays the
    same batches. With `config.input.streaming` (data larger than the
    device) the images stay in the array_record files: `ncjax.streaming`
    reads each member's batches in that same permutation, decodes them in
    host threads and prefetches them to the device, and `streamed_train_step`
    gathers the member's labels by the batch's row numbers. Both steps share
    `update_step`, so both inputs give the same numbers (tested); only the
    loop strategy streams (vmapped members would each need their own batch).
    Evaluation streams every split in row order through the same forward.

After every epoch each member is evaluated in eval mode on train (with its
own, possibly biased, labels), validation (biased) and test (clean):
loss, accuracy per group, and the neural-collapse metrics of the configured
feature layer. Early stopping on the validation loss is tracked per member
without stopping training: its snapshot becomes the 'early' stage.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ncjax import bias as bias_lib
from ncjax import (
    checkpoints,
    datasets,
    input_pipeline,
    metric_writers,
    neural_collapse,
    resnet,
    runtime,
    streaming,
)
from ncjax import members as members_lib
from ncjax import workdir as workdir_lib
from ncjax.errors import ConfigError, NcjaxError

RUN_FILE = "run.json"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class NonFiniteError(NcjaxError):
  """A loss or metric became NaN or infinite."""


# ---------------------------------------------------------------- model, state


def create_model(config) -> resnet.ResNet:
  if config.model.dtype not in DTYPES:
    raise ConfigError(f"model.dtype must be one of {sorted(DTYPES)}, got {config.model.dtype!r}")
  if config.model.name not in resnet.MODELS:
    raise ConfigError(
        f"model.name must be one of {list(resnet.MODELS)}, got {config.model.name!r}"
        + workdir_lib.closest(config.model.name, resnet.MODELS)
    )
  return resnet.create(
      config.model.name,
      num_classes=2,
      width=config.model.width,
      stem=config.model.stem,
      stage_sizes=tuple(config.model.stage_sizes) or None,
      dtype=DTYPES[config.model.dtype],
  )


def create_optimizer(config) -> optax.GradientTransformation:
  opt = config.optimizer
  if opt.name == "adam":
    if opt.weight_decay:
      # Adam with L2 in the loss gradient, as torch.optim.Adam(weight_decay).
      return optax.chain(optax.add_decayed_weights(opt.weight_decay), optax.adam(opt.learning_rate))
    return optax.adam(opt.learning_rate)
  if opt.name == "adamw":
    return optax.adamw(opt.learning_rate, weight_decay=opt.weight_decay)
  if opt.name == "sgd":
    return optax.chain(
        optax.add_decayed_weights(opt.weight_decay),
        optax.sgd(opt.learning_rate, momentum=opt.momentum),
    )
  raise ConfigError(
      f"optimizer.name must be adam, adamw or sgd, got {opt.name!r}"
      + workdir_lib.closest(opt.name, ("adam", "adamw", "sgd"))
  )


def make_preprocess(config):
  """(train fn(images, key), eval fn(images)): uint8 batches -> model input.

  With `augment.enabled` the train transform is SPEC section 4's random
  resized crop + rotation and eval resizes and centre-crops (`ncjax.augment`,
  on device); otherwise both only normalise. The same config gives the same
  function objects, so jitted users compile once per process.
  """
  aug = config.augment
  return _preprocess_fns(
      tuple(config.dataset.mean), tuple(config.dataset.std), bool(aug.enabled),
      int(aug.out_size), int(aug.resize), tuple(aug.scale), tuple(aug.ratio),
      float(aug.degrees),
  )  # fmt: skip


@functools.lru_cache(maxsize=16)
def _preprocess_fns(mean, std, enabled, out_size, resize, scale, ratio, degrees):
  if not enabled:
    normalize = functools.partial(input_pipeline.normalize, mean=mean, std=std)
    return (lambda images, key: normalize(images)), normalize
  from ncjax import augment  # pylint: disable=import-outside-toplevel

  transform = augment.Augmentation(
      enabled=True, out_size=out_size, resize=resize, scale=scale, ratio=ratio,
      degrees=degrees, mean=mean, std=std,
  )  # fmt: skip
  return transform.train, transform.eval


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self) -> dict[str, Any]:
    return {"params": self.params, "batch_stats": self.batch_stats}


def make_init_fn(model, tx, image_shape) -> Callable[[jax.Array], TrainState]:
  """key -> a member's initial state, jitted (eager Flax init takes seconds)."""

  @jax.jit
  def init(key):
    variables = model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(params),
    )

  return init


def _pretrained(init_fn, model, tx, path: str):
  """init_fn with torchvision weights (ImageNet) put in; fresh 2-class head."""
  from ncjax import torchvision_weights  # pylint: disable=import-outside-toplevel

  state_dict = torchvision_weights.load_state_dict(path)

  def init(key):
    state = init_fn(key)
    v = torchvision_weights.init_from(state_dict, model, state.variables)
    return state.replace(
        params=v["params"], batch_stats=v["batch_stats"], opt_state=tx.init(v["params"])
    )

  return init


def init_state(model, tx, key, image_shape) -> TrainState:
  return make_init_fn(model, tx, image_shape)(key)


def abstract_variables(config, image_shape) -> dict[str, Any]:
  """Shapes of {'params', 'batch_stats'} of the configured model."""
  model = create_model(config)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape)), train=False)
  )
  return {"params": shapes["params"], "batch_stats": shapes["batch_stats"]}


def checkpoint_bytes(config, image_shape, num_members: int) -> int:
  """Disk a run's checkpoints take at most: per member, three latest states
  (two kept, one being written; each params + optimizer moments + batch
  statistics, and the early-stopping copy) and the two stage variables."""
  variables = abstract_variables(config, image_shape)
  size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(variables))
  moments = 2 if config.optimizer.name in ("adam", "adamw") else 1
  per_member = 3 * (size * (2 + moments)) + 2 * size
  return num_members * per_member + (16 << 20)  # + logs, metadata


# ------------------------------------------------------------------ the steps


def make_mesh() -> jax.sharding.Mesh:
  # Auto axes: a vmapped conv ensemble on Explicit axes fails to shard.
  return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def epoch_permutation(
    state: TrainState, data_key: jax.Array, *, steps_per_epoch: int, num_train: int
) -> jax.Array:
  """The order of the current epoch: a pure function of (data key, epoch)."""
  epoch = state.step // steps_per_epoch
  return jax.random.permutation(jax.random.fold_in(data_key, epoch), num_train)


def train_step(
    state: TrainState,
    perm_N: jax.Array,
    labels_N: jax.Array,
    aug_key: jax.Array,
    images_N: jax.Array,
    *,
    model,
    tx,
    batch_size: int,
    steps_per_epoch: int,
    preprocess: Callable[[jax.Array, jax.Array], jax.Array],
    batch_sharding,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step of one member on a resident split; pure, so it jits
  and vmaps.

  The batch is rows `perm_N[i * B:(i + 1) * B]` of the resident split, with i
  the step within the epoch, augmented with a key derived from the step.
  """
  i = state.step % steps_per_epoch
  idx = jax.lax.dynamic_slice_in_dim(perm_N, i * batch_size, batch_size)
  key = jax.random.fold_in(aug_key, state.step)
  return update_step(
      state, preprocess(images_N[idx], key), labels_N[idx], model=model, tx=tx,
      batch_sharding=batch_sharding,
  )  # fmt: skip


def streamed_train_step(
    state: TrainState,
    labels_N: jax.Array,
    aug_key: jax.Array,
    images_B: jax.Array,
    index_B: jax.Array,
    *,
    model,
    tx,
    preprocess: Callable[[jax.Array, jax.Array], jax.Array],
    batch_sharding,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """`train_step` on a streamed batch: `images_B` are rows `index_B` of the
  split, read in the order of `epoch_permutation` (`streaming.jax_order`),
  so they are the rows the resident step would gather at this step. The
  member's labels are gathered on the device by `index_B`, and the
  augmentation key is the resident step's."""
  key = jax.random.fold_in(aug_key, state.step)
  return update_step(
      state, preprocess(images_B, key), labels_N[index_B], model=model, tx=tx,
      batch_sharding=batch_sharding,
  )  # fmt: skip


def update_step(
    state: TrainState, x: jax.Array, y: jax.Array, *, model, tx, batch_sharding
) -> tuple[TrainState, dict[str, jax.Array]]:
  """The optimizer step on a preprocessed batch `x` with labels `y`: the body
  both input paths share (forward in train mode, softmax cross-entropy,
  gradient, update, BatchNorm statistics)."""
  if batch_sharding is not None:
    x = jax.lax.with_sharding_constraint(x, batch_sharding)
  # Without the barrier XLA:CPU fuses the resident step's gather into the
  # first convolution and the step runs 1.5x slower; both inputs keep it, so
  # both compute the same from here on.
  x = jax.lax.optimization_barrier(x)

  def loss_fn(params):
    (logits, _), mutated = model.apply(
        {"params": params, "batch_stats": state.batch_stats},
        x,
        train=True,
        mutable=["batch_stats"],
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (logits, mutated["batch_stats"])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(
      step=state.step + 1,
      params=optax.apply_updates(state.params, updates),
      batch_stats=batch_stats,
      opt_state=opt_state,
  )
  accuracy = jnp.mean(jnp.argmax(logits, -1) == y)
  return new_state, {"loss": loss, "accuracy": accuracy}


def eval_chunk(variables, images, start, *, model, chunk, preprocess, layer, batch_sharding):
  """Eval-mode logits and features of rows [start, start + chunk)."""
  x = preprocess(jax.lax.dynamic_slice_in_dim(images, start, chunk))
  if batch_sharding is not None:
    x = jax.lax.with_sharding_constraint(x, batch_sharding)
  logits, feats = model.apply(variables, x, train=False)
  if layer not in feats:
    raise ConfigError(f"nc.layer {layer!r} is not a feature of the model; valid: {sorted(feats)}")
  return logits.astype(jnp.float32), feats[layer].reshape(chunk, -1).astype(jnp.float32)


def split_metrics(logits, labels, groups, valid, *, num_groups: int) -> dict[str, jax.Array]:
  """Eval loss and accuracy, overall and per group (padding rows masked)."""
  w = valid.astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  out = {
      "loss": jnp.sum(loss * w) / jnp.sum(w),
      "accuracy": jnp.sum(correct * w) / jnp.sum(w),
  }
  for g in range(num_groups):
    wg = w * (groups == g)
    out[f"accuracy/g{g}"] = jnp.sum(correct * wg) / jnp.sum(wg)  # NaN if empty
  return out


def class_means(feats, labels, valid, *, num_classes: int = 2) -> jax.Array:
  """K x D means of the valid rows per label (the train centres)."""
  onehot = jax.nn.one_hot(jnp.where(valid, labels, -1), num_classes, dtype=feats.dtype)
  sums = jnp.einsum("nk,nd->kd", onehot, feats, precision=jax.lax.Precision.HIGHEST)
  return sums / jnp.sum(onehot, axis=0)[:, None]


def nc_metrics(
    feats, labels, groups, valid, w, b, centers, flipped, *, num_groups: int
) -> dict[str, jax.Array]:
  """NC1-4 (SPEC section 5) of one split around `centers`, and the fraction
  of `flipped` samples nearer the positive class mean (NaN if none).

  Every split goes through this one signature (train passes its own class
  means and its flip mask, val/test the train means and no flips), so XLA
  compiles it once per split size.
  """
  labels = jnp.where(valid, labels, -1)  # padding rows are ignored
  fn = neural_collapse.make_metrics_fn(num_classes=w.shape[0], num_groups=num_groups)
  out = fn(feats, labels, groups, w, b, centers)
  out["flipped_near_true"] = neural_collapse.flipped_near_true_kernel(
      feats, labels, flipped & valid
  )
  return out


@functools.lru_cache(maxsize=8)
def _nc_fns(num_groups: int):
  """Jitted NC functions, shared by every run of a process (one compile)."""
  return (
      jax.jit(functools.partial(nc_metrics, num_groups=num_groups)),
      jax.jit(class_means),
  )


# ------------------------------------------------------------------- the loop


@flax.struct.dataclass
class EarlyStopping:
  """Per-member early-stopping bookkeeping (host side)."""

  best_loss: float = math.inf
  best_epoch: int = 0
  bad_epochs: int = 0
  stopped: bool = False


def _resolve_strategy(config) -> str:
  """'loop' or 'vmap'; streaming loops (see `_check_input`)."""
  strategy = config.members.strategy
  if strategy not in ("auto", "loop", "vmap"):
    raise ConfigError(
        f"members.strategy must be auto, loop or vmap, got {strategy!r}"
        + workdir_lib.closest(strategy, ("auto", "loop", "vmap"))
    )
  _check_input(config, strategy)
  if strategy == "auto":
    if config.input.streaming:
      return "loop"
    return "loop" if jax.default_backend() == "cpu" else "vmap"
  return strategy


def _check_input(config, strategy: str) -> None:
  """The `input` settings, checked before anything is read or written.

  Streaming supports the loop strategy only: vmapped members train on
  different permutations, so each step would need M batches read, decoded
  and copied for M members, against the one resident split they share.
  """
  inp = config.input
  if inp.streaming and strategy == "vmap":
    raise ConfigError(
        "input.streaming needs members.strategy loop or auto (each member streams "
        "its own batches in turn), got 'vmap'"
    )
  if inp.threads < 1 or inp.prefetch < 1:
    raise ConfigError(
        f"input.threads and input.prefetch must be >= 1, got {inp.threads} and {inp.prefetch}"
    )


def validate(config, num_train: int) -> None:
  """Checks what can only be checked once the data is known."""
  n_dev = jax.device_count()
  if config.epochs < 1:
    raise ConfigError(f"epochs must be >= 1, got {config.epochs}")
  if config.batch_size > num_train:
    raise ConfigError(
        f"batch_size {config.batch_size} is larger than the train split ({num_train} examples)"
    )
  if config.batch_size % n_dev:
    raise ConfigError(f"batch_size {config.batch_size} is not divisible by the {n_dev} devices")
  if config.eval_batch_size % n_dev:
    raise ConfigError(
        f"eval_batch_size {config.eval_batch_size} is not divisible by the {n_dev} devices"
    )
  if config.early_stopping.patience < 1:
    raise ConfigError(f"early_stopping.patience must be >= 1, got {config.early_stopping.patience}")
  if config.members.per_step < 0:
    raise ConfigError(f"members.per_step must be >= 0 (0 = all), got {config.members.per_step}")
  if config.nc.every < 1 or config.checkpoint.every < 1:
    raise ConfigError("nc.every and checkpoint.every must be >= 1")


def _must_be_finite(key: str) -> bool:
  """Losses and the NC metrics of the whole split. Per-group values may be
  undefined (NaN) when a group lacks a class, so they are not checked."""
  return key in ("loss", "batch_loss") or (key.startswith("nc") and "/" not in key)


def _check_finite(records, epoch: int) -> None:
  for r in records:
    for key, value in r.items():
      if _must_be_finite(key) and not math.isfinite(value):
        raise NonFiniteError(
            f"non-finite {r['split']} {key} ({value}) for member {r['member']} "
            f"at epoch {epoch}; the last good checkpoint is kept"
        )


def train_and_evaluate(
    config, workdir: str, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
  """Trains all members of `config` in `workdir`, resuming if possible.

  `overrides` (the command-line `--config.*` values) are recorded with the
  config in the workdir.

  Returns a summary: per member the early-stopping epoch, and timings.
  """
  t_start = time.perf_counter()
  runtime.setup(config)
  compile_start = runtime.compile_seconds()
  members = members_lib.from_config(config)
  for m in members:
    bias_lib.BiasSpec(
        m.bias_rate, config.bias.group, config.bias.mode, config.bias.direction
    ).validate()
  strategy = _resolve_strategy(config)
  model = create_model(config)
  tx = create_optimizer(config)

  # ---- input (a procedural dataset is generated by process 0 alone)
  not_prepared = None
  if jax.process_index() == 0:
    try:
      input_pipeline.ensure_prepared(config)
    except NcjaxError as e:
      not_prepared = e  # raised after the barrier, so no process waits forever
  runtime.sync("ncjax_dataset_prepared")
  if not_prepared is not None:
    raise not_prepared
  mesh = make_mesh()
  # Streamed: every split opened once (its small fields read; images stay in
  # the files) and read in row order by evaluation chunks; host splits
  # without images, from the same fields in the same row order as `load`.
  streams = _open_streams(config, mesh) if config.input.streaming else None
  if streams is None:
    splits = input_pipeline.load(config)
    image_shape = splits["train"].images.shape[1:]
  else:
    splits = {k: input_pipeline.host_split(config, s.columns, s.ids) for k, s in streams.items()}
    image_shape = tuple(streams["train"].features["image"].shape)
  num_train = len(splits["train"])
  validate(config, num_train)
  resumed = workdir_lib.check_config(workdir, config)
  workdir_lib.check_writable(workdir)
  workdir_lib.check_free_space(workdir, checkpoint_bytes(config, image_shape, len(members)))
  workdir_lib.write_config(workdir, config, overrides)
  runtime.sync("ncjax_config_written")

  replicated = jax.NamedSharding(mesh, jax.P())
  # On one device the constraint is a no-op that XLA:CPU still pays for
  # (measured 4x slower steps), so it is only set when there is a mesh.
  batch_sharding = jax.NamedSharding(mesh, jax.P("data")) if mesh.size > 1 else None
  chunk = config.eval_batch_size
  # Streamed splits upload their groups and padding mask only (no images).
  dev = {k: input_pipeline.to_device(s, chunk, replicated) for k, s in splits.items()}
  num_groups = int(max(int(s.groups.max()) for s in splits.values())) + 1

  labels, flipped = {}, {}
  for m in members:
    per_split = input_pipeline.member_labels(splits, m, config)
    labels[m.name] = {
        k: input_pipeline.labels_to_device(y, chunk, replicated) for k, (y, _) in per_split.items()
    }
    flipped[m.name] = {k: mask for k, (_, mask) in per_split.items()}
  _write_run_info(workdir, config, members, splits, flipped, image_shape, num_groups)

  # ---- model, compiled steps
  train_preprocess, preprocess = make_preprocess(config)
  steps_per_epoch = num_train // config.batch_size
  step = functools.partial(
      train_step,
      model=model,
      tx=tx,
      batch_size=config.batch_size,
      steps_per_epoch=steps_per_epoch,
      preprocess=train_preprocess,
      batch_sharding=batch_sharding,
  )
  perm = functools.partial(epoch_permutation, steps_per_epoch=steps_per_epoch, num_train=num_train)
  if streams is not None:  # loop only (`_check_input`)
    step_fn = jax.jit(
        functools.partial(
            streamed_train_step,
            model=model,
            tx=tx,
            preprocess=train_preprocess,
            batch_sharding=batch_sharding,
        ),
        donate_argnums=0,
    )
    perm_fn = None  # the order is read on the host (`streaming.jax_order`)
  elif strategy == "loop":
    step_fn = jax.jit(step, donate_argnums=0)
    perm_fn = jax.jit(perm)
  else:
    step_fn = jax.jit(jax.vmap(step, in_axes=(0, 0, 0, 0, None)), donate_argnums=0)
    perm_fn = jax.jit(jax.vmap(perm))
  eval_fn = jax.jit(
      functools.partial(
          eval_chunk,
          model=model,
          preprocess=preprocess,
          layer=config.nc.layer,
          batch_sharding=batch_sharding,
      ),
      static_argnames=("chunk",),
  )
  metrics_fn = jax.jit(functools.partial(split_metrics, num_groups=num_groups))
  nc_fn, means_fn = _nc_fns(num_groups)
  flipped_dev = {
      m.name: {
          k: jax.device_put(input_pipeline.pad_rows(mask, dev[k].chunk), replicated)
          for k, mask in flipped[m.name].items()
      }
      for m in members
  }

  # ---- state: fresh, or restored from the latest checkpoint
  init_fn = make_init_fn(model, tx, image_shape)
  if config.model.init_from:
    init_fn = _pretrained(init_fn, model, tx, config.model.init_from)
  states = {m.name: jax.device_put(init_fn(m.keys()[0]), replicated) for m in members}
  data_keys = {m.name: m.keys()[1] for m in members}
  aug_keys = {m.name: m.keys()[2] for m in members}
  if streams is None:
    predict = functools.partial(_predict, eval_fn, dev=dev)
  else:
    # Each member reads the train split in its own order, the resident
    # path's `epoch_permutation` of its data key; evaluation in row order.
    train_streams = {
        m.name: streams["train"].view(
            batch_size=config.batch_size,
            drop_remainder=True,
            order=streaming.jax_order(data_keys[m.name], num_train),
        )
        for m in members
    }
    predict = functools.partial(_predict_streamed, eval_fn, streams=streams)
  early = {m.name: EarlyStopping() for m in members}
  early_vars = {m.name: _copy(states[m.name].variables) for m in members}

  latest = checkpoints.LatestCheckpoint(workdir)
  last = latest.latest_epoch() if resumed else None
  summary_path = os.path.join(workdir, "train_summary.json")
  if (
      last == config.epochs
      and os.path.exists(summary_path)
      and checkpoints.stages_complete(workdir, [m.name for m in members])
  ):
    latest.close()
    with open(summary_path) as f:
      return json.load(f)  # finished earlier: nothing to redo
  writer = metric_writers.MetricWriter(workdir)
  start_epoch = 0
  if last is not None:
    restored, meta = latest.restore(last, {"states": states, "early": early_vars})
    states, early_vars = restored["states"], restored["early"]
    early = {k: EarlyStopping(**v) for k, v in meta["early_stopping"].items()}
    start_epoch = int(meta["epoch"])
    logging.info("resuming %s from epoch %d", workdir, start_epoch)
  writer.truncate_after(start_epoch)

  # ---- epoch loop
  timings = {"train": 0.0, "eval": 0.0, "nc": 0.0, "checkpoint": 0.0}
  progress = _progress(config, start_epoch)
  # An error (e.g. a non-finite loss) still finishes the pending checkpoint
  # save, so the last good epoch stays resumable.
  try:
    for epoch in range(start_epoch + 1, config.epochs + 1):
      t0 = time.perf_counter()
      if streams is None:
        states, batch_metrics = _train_epoch(
            step_fn, perm_fn, strategy, config.members.per_step, states, data_keys, aug_keys,
            labels, dev["train"].images, steps_per_epoch,
        )  # fmt: skip
      else:
        states, batch_metrics = _train_epoch_streamed(
            step_fn, train_streams, epoch - 1, states, aug_keys, labels, steps_per_epoch
        )
      jax.block_until_ready(states)
      t1 = time.perf_counter()
      # Validation every epoch (early stopping); train and test with the NC
      # metrics, every nc.every epochs and at the last.
      with_nc = epoch % config.nc.every == 0 or epoch == config.epochs
      splits_now = dev if with_nc else {"validation": dev["validation"]}
      records = []
      for m in members:
        records += _evaluate_member(
            m,
            epoch,
            states[m.name].variables,
            splits_now,
            labels[m.name],
            predict,
            metrics_fn,
            (nc_fn, means_fn, flipped_dev[m.name]) if with_nc else None,
            timings,
        )
      if not with_nc:  # the training loss is logged every epoch all the same
        records += [
            {**_index(m, epoch, "train"), "batch_loss": batch_metrics[m.name]["loss"]}
            for m in members
        ]
      for r in records:
        if r["split"] == "train":
          r["batch_loss"] = batch_metrics[r["member"]]["loss"]
      _check_finite(records, epoch)
      for m in members:
        val = next(r for r in records if r["member"] == m.name and r["split"] == "validation")
        early[m.name] = _early_update(early[m.name], val["loss"], epoch, config)
        if early[m.name].best_epoch == epoch:
          early_vars[m.name] = _copy(states[m.name].variables)
      t2 = time.perf_counter()
      writer.write(records)
      if epoch % config.checkpoint.every == 0 or epoch == config.epochs:
        latest.save(
            epoch,
            {"states": states, "early": early_vars},
            {"epoch": epoch, "early_stopping": {k: _es_dict(v) for k, v in early.items()}},
        )
      t3 = time.perf_counter()
      timings["train"] += t1 - t0
      timings["eval"] += t2 - t1
      timings["checkpoint"] += t3 - t2
      if progress is not None:
        val_loss = np.mean([r["loss"] for r in records if r["split"] == "validation"])
        progress.set_postfix(val_loss=f"{val_loss:.3f}")
        progress.update(1)
  finally:
    if progress is not None:
      progress.close()
    latest.close()
    writer.close()

  # ---- stages
  checkpoints.save_stages(
      workdir,
      {m.name: {"early": early_vars[m.name], "final": states[m.name].variables} for m in members},
  )
  summary = {
      "members": {m.name: _es_dict(early[m.name]) for m in members},
      "strategy": strategy,
      "input": "streaming" if streams is not None else "resident",
      "devices": jax.device_count(),
      "seconds": {k: round(v, 3) for k, v in timings.items()},
      # Compilation (or loading from the persistent cache), inside the above.
      "compile_seconds": round(runtime.compile_seconds() - compile_start, 3),
      "wall_seconds": round(time.perf_counter() - t_start, 3),
  }
  if jax.process_index() == 0:
    with open(summary_path, "w") as f:
      json.dump(summary, f, indent=2)
  return summary


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def _es_dict(es: EarlyStopping) -> dict[str, Any]:
  return {
      "best_loss": float(es.best_loss),
      "best_epoch": int(es.best_epoch),
      "bad_epochs": int(es.bad_epochs),
      "stopped": bool(es.stopped),
  }


def _early_update(es: EarlyStopping, val_loss: float, epoch: int, config) -> EarlyStopping:
  """Patience-based early stopping that records instead of stopping."""
  if es.stopped:
    return es
  if val_loss < es.best_loss:
    return EarlyStopping(val_loss, epoch, 0, False)
  bad = es.bad_epochs + 1
  return es.replace(bad_epochs=bad, stopped=bad >= config.early_stopping.patience)


def _train_epoch(
    step_fn, perm_fn, strategy, per_step, states, data_keys, aug_keys, labels, images, steps
):
  """One epoch of every member; returns states and mean batch metrics.

  The steps run under a host-to-device transfer guard: every input of every
  step is already on the device, and a change that copied from the host each
  step fails here instead of silently slowing training down.
  """
  names = list(states)
  if strategy == "loop":
    return _train_epoch_loop(step_fn, perm_fn, states, data_keys, aug_keys, labels, images, steps)
  out_states, out_metrics = {}, {}
  for i in range(0, len(names), per_step or len(names)):
    chunk = names[i : i + (per_step or len(names))]
    s, m = _train_epoch_vmap(
        step_fn,
        perm_fn,
        {n: states[n] for n in chunk},
        data_keys,
        aug_keys,
        labels,
        images,
        steps,
    )
    out_states.update(s)
    out_metrics.update(m)
  return out_states, out_metrics


def _train_epoch_loop(step_fn, perm_fn, states, data_keys, aug_keys, labels, images, steps):
  """Each member in turn through the epoch's steps."""
  states, sums = dict(states), {}
  for name, state in states.items():
    labels_N, aug_key = labels[name]["train"], aug_keys[name]
    perm_N = perm_fn(state, data_keys[name])
    total = None
    with jax.transfer_guard_host_to_device("disallow"):
      for _ in range(steps):
        state, metrics = step_fn(state, perm_N, labels_N, aug_key, images)
        total = metrics if total is None else jax.tree.map(jnp.add, total, metrics)
    states[name] = state
    sums[name] = total
  return states, _mean_metrics(sums, steps)


def _train_epoch_vmap(step_fn, perm_fn, states, data_keys, aug_keys, labels, images, steps):
  """All members of `states` stacked through one vmapped step."""
  names = list(states)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(states[n] for n in names))
  perm_MN = perm_fn(stacked, jnp.stack([data_keys[n] for n in names]))
  labels_MN = jnp.stack([labels[n]["train"] for n in names])
  aug_M = jnp.stack([aug_keys[n] for n in names])
  total = None
  with jax.transfer_guard_host_to_device("disallow"):
    for _ in range(steps):
      stacked, metrics = step_fn(stacked, perm_MN, labels_MN, aug_M, images)
      total = metrics if total is None else jax.tree.map(jnp.add, total, metrics)
  states = {n: jax.tree.map(lambda x, i=i: x[i], stacked) for i, n in enumerate(names)}
  sums = {n: jax.tree.map(lambda x, i=i: x[i], total) for i, n in enumerate(names)}
  return states, _mean_metrics(sums, steps)


def _train_epoch_streamed(step_fn, streams, epoch, states, aug_keys, labels, steps):
  """Each member in turn through its own stream of epoch `epoch` (from 0).

  `streams[name]` reads the rows of the member's `epoch_permutation`, so a
  member sees the resident path's batches in the same order. The steps run
  under the resident loop's transfer guard, which is per thread and covers
  what this thread hands the step: state, labels and key live on the
  device, and so does the batch, copied there ahead of the step by the
  prefetch thread's explicit `jax.device_put` (the one copy a step of this
  input makes, by design). A change that made a step copy anything else
  from the host still fails here.
  """
  states, sums = dict(states), {}
  for name, state in states.items():
    labels_N, aug_key, total, count = labels[name]["train"], aug_keys[name], None, 0
    with streams[name].batches(epoch) as batches, jax.transfer_guard_host_to_device("disallow"):
      for batch in batches:
        state, metrics = step_fn(state, labels_N, aug_key, batch["image"], batch["index"])
        total = metrics if total is None else jax.tree.map(jnp.add, total, metrics)
        count += 1
    if count != steps:
      raise NcjaxError(f"the train stream of {name} gave {count} batches, expected {steps}")
    states[name] = state
    sums[name] = total
  return states, _mean_metrics(sums, steps)


def _mean_metrics(sums, steps: int) -> dict[str, dict[str, float]]:
  sums = jax.device_get(sums)
  return {n: {k: float(v) / steps for k, v in s.items()} for n, s in sums.items()}


def _evaluate_member(member, epoch, variables, dev, labels, predict, metrics_fn, nc, timings):
  """Records of one member at one epoch; NC metrics if `nc` is given.

  `predict(variables, split)` gives (logits, features, valid) of every
  padded row of the split in row order (resident or streamed alike).
  """
  outputs = {split: predict(variables, split) for split in dev}
  records, results = [], {}
  for split, d in dev.items():
    logits, _, valid = outputs[split]
    results[split] = metrics_fn(logits, labels[split], d.groups, valid)
  if nc is not None:
    jax.block_until_ready((outputs, results))  # time NC alone, not the forwards
    t0 = time.perf_counter()
    nc_fn, means_fn, flipped = nc
    w = variables["params"]["fc"]["kernel"].T  # K x D
    b = variables["params"]["fc"]["bias"]
    _, train_feats, train_valid = outputs["train"]
    centers = means_fn(train_feats, labels["train"], train_valid)
    for split, d in dev.items():
      _, feats, valid = outputs[split]
      # Flips are only measured on train (validation has flips too, but the
      # paper's Fig. 1 follows the samples the model is fitted to).
      mask = flipped["train"] if split == "train" else jnp.zeros_like(valid)
      results[split].update(nc_fn(feats, labels[split], d.groups, valid, w, b, centers, mask))
    jax.block_until_ready(results)
    timings["nc"] += time.perf_counter() - t0
  results = jax.device_get(results)
  for split in dev:
    if split != "train" or not member.bias_rate:
      results[split].pop("flipped_near_true", None)
    record = _index(member, epoch, split)
    record.update({k: float(v) for k, v in results[split].items()})
    records.append(record)
  return records


def _index(member, epoch: int, split: str) -> dict[str, Any]:
  """The fields that identify a metrics record."""
  return {
      "epoch": epoch,
      "member": member.name,
      "seed": member.seed,
      "bias_rate": member.bias_rate,
      "split": split,
  }


def _predict(eval_fn, variables, split: str, *, dev: dict[str, input_pipeline.DeviceSplit]):
  """Logits, features and padding mask of every (padded) row of a resident
  split."""
  d = dev[split]
  outs = [
      eval_fn(variables, d.images, np.int32(start), chunk=d.chunk)
      for start in range(0, d.images.shape[0], d.chunk)
  ]
  logits = jnp.concatenate([o[0] for o in outs])
  feats = jnp.concatenate([o[1] for o in outs])
  return logits, feats, d.valid


def _predict_streamed(eval_fn, variables, split: str, *, streams):
  """`_predict` of a streamed split: its batches, in row order and of the
  resident evaluation chunk (the last one padded, `valid` False), go through
  the same `eval_fn` and line up with the resident path's padded rows."""
  stream = streams[split]
  outs, valid = [], []
  with stream.batches(0) as batches:
    for batch in batches:  # a whole chunk: the slice from row 0 is the batch
      outs.append(eval_fn(variables, batch["image"], np.int32(0), chunk=stream.batch_size))
      valid.append(batch["valid"])
  logits = jnp.concatenate([o[0] for o in outs])
  feats = jnp.concatenate([o[1] for o in outs])
  return logits, feats, jnp.concatenate(valid)


def _open_streams(config, mesh) -> dict[str, streaming.StreamingSplit]:
  """Every split of the configured dataset opened once for the run (reading
  its small fields), in row order, in batches of its evaluation chunk;
  training reads views of the train split (`StreamingSplit.view`)."""
  input_pipeline.check_attribute(config)
  out = {}
  for split in datasets.SPLITS:
    s = streaming.StreamingSplit.from_config(
        config, split,
        batch_size=jax.device_count(),  # a valid size until the split's is known
        drop_remainder=False,
        sharding=jax.NamedSharding(mesh, jax.P("data")),
        num_threads=config.input.threads,
        prefetch=config.input.prefetch,
    )  # fmt: skip
    chunk = input_pipeline.chunk_size(len(s), config.eval_batch_size, jax.device_count())
    out[split] = s.view(batch_size=chunk, order=streaming.row_order(len(s)))
  return out


def _write_run_info(workdir, config, members, splits, flipped, image_shape, num_groups):
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.join(workdir, "bias"), exist_ok=True)
  for m in members:
    ids = {k: splits[k].ids[mask].tolist() for k, mask in flipped[m.name].items()}
    with open(os.path.join(workdir, "bias", f"{m.name}.json"), "w") as f:
      json.dump({"seed": m.seed, "bias_rate": m.bias_rate, "flipped_ids": ids}, f)
  info = {
      "members": [{"name": m.name, "seed": m.seed, "bias_rate": m.bias_rate} for m in members],
      "image_shape": list(image_shape),
      "num_groups": num_groups,
      "split_sizes": {k: len(s) for k, s in splits.items()},
  }
  with open(os.path.join(workdir, RUN_FILE), "w") as f:
    json.dump(info, f, indent=2)


def _progress(config, start_epoch):
  if not config.progress or jax.process_index() != 0:
    return None
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  return tqdm(
      total=config.epochs, initial=start_epoch, desc="epochs", unit="epoch", dynamic_ncols=True
  )
