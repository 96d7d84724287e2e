"""Input: a run's splits in host memory, member labels, and device residency.

Small datasets (the synthetic benchmark, PAPILA, HAM10000 at moderate
resolution) live on the device for the whole run: each split is uploaded
once, replicated over the mesh, padded to a multiple of the evaluation chunk.
Training batches are then gathered on device from a permutation that is a
pure function of (member data key, step), so a step copies nothing from the
host and a resumed run sees exactly the batches an uninterrupted one would.

Larger datasets are streamed instead (`config.input.streaming`,
`ncjax.streaming`): the host then keeps only each split's small fields
(labels, groups, ids, from `host_split`) and the device its groups and
padding mask, with no images (`DeviceSplit.images` is None).
"""

from __future__ import annotations

import dataclasses
import os

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ncjax import bias as bias_lib
from ncjax import datasets
from ncjax.errors import ConfigError
from ncjax.members import Member


@dataclasses.dataclass(frozen=True)
class HostSplit:
  """One split as the run sees it: target labels and the studied groups."""

  images: np.ndarray | None  # N x H x W x C uint8; None when streamed
  labels: np.ndarray  # N int32, clean target (disease or attribute)
  groups: np.ndarray  # N int32, the studied attribute
  ids: np.ndarray  # N str

  def __len__(self) -> int:
    return len(self.labels)


def data_dir(config) -> str:
  return config.dataset.data_dir or os.environ.get(
      "TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets")
  )


def _builder_kwargs(config) -> dict:
  if config.dataset.name == "synthetic":
    from ncjax.datasets import synthetic  # pylint: disable=import-outside-toplevel

    return {"params": synthetic.SyntheticParams.from_config(config.dataset.synthetic)}
  size = tuple(config.dataset.get("image_size", ()))
  return {"image_size": size} if size else {}


def ensure_prepared(config):
  """The configured dataset's TFDS builder, generated first if it is
  procedural and missing (a real dataset that is not prepared raises)."""
  return datasets.ensure_prepared(
      config.dataset.name, data_dir=data_dir(config), **_builder_kwargs(config)
  )


def check_attribute(config) -> None:
  """Fails if the studied attribute or the target is not the dataset's."""
  name, attribute = config.dataset.name, config.dataset.attribute
  if name == "synthetic":
    valid = sorted(config.dataset.synthetic.attributes)
    if attribute not in valid:
      raise ConfigError(
          f"dataset.attribute {attribute!r} is not an attribute of the synthetic "
          f"dataset; valid: {valid}"
      )
  else:
    datasets.check_attribute(name, attribute)
  if config.target != "label" and config.target != attribute:
    raise ConfigError(
        f"target must be 'label' or the studied attribute {attribute!r}, got {config.target!r}"
    )


def load(config) -> dict[str, HostSplit]:
  """The train, validation and test splits of the configured dataset."""
  check_attribute(config)
  out = {}
  for split in datasets.SPLITS:
    s = datasets.load_split(
        config.dataset.name, split, data_dir=data_dir(config), **_builder_kwargs(config)
    )
    out[split] = host_split(config, {"label": s.labels, **s.attributes}, s.ids, s.images)
  return out


def host_split(config, columns, ids: np.ndarray, images: np.ndarray | None = None) -> HostSplit:
  """A split as the run sees it, from its stored fields (`columns`: 'label'
  and one int column per attribute, rows sorted by id): the configured
  target as labels, the studied attribute as groups. `load` and the
  streamed splits (`StreamingSplit.columns`, no images) both go through it."""
  labels = columns["label"] if config.target == "label" else columns[config.target]
  groups = columns[config.dataset.attribute]
  return HostSplit(
      images, np.asarray(labels, np.int32), np.asarray(groups, np.int32), np.asarray(ids)
  )


def member_labels(
    splits: dict[str, HostSplit], member: Member, config
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{split: (labels the member trains/validates on, flipped mask)}."""
  spec = bias_lib.BiasSpec(
      rate=member.bias_rate,
      group=config.bias.group,
      mode=config.bias.mode,
      direction=config.bias.direction,
  )
  return {
      name: bias_lib.apply(s.labels, s.groups, spec, seed=member.seed, split=name)
      for name, s in splits.items()
  }


@flax.struct.dataclass
class DeviceSplit:
  """A split resident on the mesh, padded to a multiple of `chunk` rows."""

  images: jax.Array | None  # N_pad x H x W x C uint8; None when streamed
  groups: jax.Array  # N_pad int32
  valid: jax.Array  # N_pad bool, False on padding rows
  size: int = flax.struct.field(pytree_node=False)
  chunk: int = flax.struct.field(pytree_node=False)


def pad_rows(x: np.ndarray, multiple: int, value=0) -> np.ndarray:
  n = len(x)
  pad = (-n) % multiple
  if not pad:
    return x
  return np.concatenate([x, np.full((pad,) + x.shape[1:], value, x.dtype)])


def chunk_size(n: int, max_chunk: int, multiple: int = 1) -> int:
  """Evaluation chunk for n rows: the fewest chunks of at most `max_chunk`,
  evened out (1536 rows at 1024 -> 2 x 768, not 2 x 1024 with 512 of
  padding), rounded up to a multiple of the device count."""
  n_chunks = -(-n // max_chunk)
  chunk = -(-n // n_chunks)
  return -(-chunk // multiple) * multiple


def to_device(split: HostSplit, chunk: int, replicated) -> DeviceSplit:
  """Uploads a split once, replicated over the mesh (`replicated` sharding).

  In a multi-process run the images are instead sharded by rows over the
  mesh: each process uploads only the rows its devices hold, and a step's
  gather of random rows (or an evaluation chunk) fetches what it needs from
  the other processes' devices. Labels, groups and masks stay replicated.
  A streamed split (`split.images` None) uploads no images.
  """
  chunk = chunk_size(len(split), chunk, jax.device_count())
  put = lambda x: jax.device_put(pad_rows(x, chunk), replicated)
  if split.images is None:
    images = None
  elif jax.process_count() == 1:
    images = put(split.images)
  else:
    images = _row_sharded(pad_rows(split.images, chunk), replicated.mesh)
  return DeviceSplit(
      images=images,
      groups=put(split.groups.astype(np.int32)),
      valid=put(np.ones(len(split), bool)),
      size=len(split),
      chunk=chunk,
  )


def _row_sharded(rows: np.ndarray, mesh: jax.sharding.Mesh) -> jax.Array:
  """`rows` as a global array sharded by rows, from this process's slice."""
  sharding = jax.NamedSharding(mesh, jax.P("data"))
  slices = sharding.addressable_devices_indices_map(rows.shape).values()
  start = min(s[0].start or 0 for s in slices)
  stop = max(s[0].stop or len(rows) for s in slices)
  return jax.make_array_from_process_local_data(sharding, rows[start:stop], rows.shape)


def labels_to_device(labels: np.ndarray, chunk: int, replicated) -> jax.Array:
  chunk = chunk_size(len(labels), chunk, jax.device_count())
  return jax.device_put(pad_rows(labels.astype(np.int32), chunk), replicated)


def normalize(images: jax.Array, mean, std) -> jax.Array:
  """uint8 -> float32, (x / 255 - mean) / std per channel."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images.astype(jnp.float32) / 255.0 - mean) / std
