"""On-device image augmentation: the SS train and eval transforms, in JAX.

SPEC section 4 (after SS `models/transforms.py`, torchvision 0.14 on tensors):
  train: RandomResizedCrop(out, scale=(0.08, 1), ratio=(3/4, 4/3), bilinear)
         -> RandomRotation(+-15 deg, fill 0) -> normalise (no flip).
  eval:  Resize(short side 256, bilinear) -> CenterCrop(224) -> normalise.

Everything here is pure, shape-static and jit-compiled, so it runs on the
accelerator next to the model and can be vmapped over ensemble members (a
leading member axis on the key). Deliberate differences from SS, all chosen for
cost or per-example randomness:
  * Parameters are drawn per example (SS draws one crop/angle per batch,
    because torchvision's transforms see the batch as one tensor).
  * Crop, resize and rotation are one bilinear sampling pass per image: the
    rotation's sample points are mapped through the crop+resize affine map and
    the source is interpolated once. SS interpolates twice (bilinear resize,
    then nearest-neighbour rotation), so pixel values differ slightly; the
    geometry (which source point lands on which output pixel) is the same.
  * The rotation's fill is a soft bilinear mask applied once; torchvision's
    tensor path zero-pads and also multiplies by that mask, so its edge pixels
    are attenuated twice. Only the one-pixel border of the rotated frame
    differs.
The crop parameters follow `RandomResizedCrop.get_params` exactly (10 attempts,
then torchvision's centre-crop fallback); the attempts are drawn at once and the
first valid one is taken, which has the same distribution as the loop.

Inputs are N x H x W x C (C = 1 or 3), uint8 (divided by 255, like
`ConvertImageDtype`) or floating in [0, 1]. Outputs are N x S x S x C.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ncjax.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# For 1-channel images when nothing is configured: the channel averages of the
# ImageNet statistics, i.e. what a grey image replicated to RGB would see.
GRAY_MEAN = (0.449,)
GRAY_STD = (0.226,)
CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop.get_params

Stats = float | Sequence[float] | None


class AugParams(NamedTuple):
  """Per-example geometry of one train transform; each field has shape (N,).

  The crop is rows [top, top + height) x columns [left, left + width) of the
  source image; `angle` is in degrees, counter-clockwise as displayed (the
  torchvision convention).
  """

  top: jax.Array
  left: jax.Array
  height: jax.Array
  width: jax.Array
  angle: jax.Array


# ----------------------------------------------------------------------------
# Normalisation


def resolve_stats(
    mean: Stats, std: Stats, channels: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel (mean, std) tuples for `channels`, with the defaults filled in.

  None means ImageNet for 3 channels and `GRAY_MEAN`/`GRAY_STD` for 1; a scalar
  applies to every channel. Raises ConfigError for a length mismatch or a
  non-positive std, since these come from the user's config.
  """

  def one(
      value: Stats, default3: tuple[float, ...], default1: tuple[float, ...], name: str
  ) -> tuple[float, ...]:
    if value is None:
      if channels == 3:
        return default3
      if channels == 1:
        return default1
      raise ConfigError(f"augment: no default {name} for {channels}-channel images; set it")
    if isinstance(value, (int, float)):
      return (float(value),) * channels
    values = tuple(float(v) for v in value)
    if len(values) != channels:
      raise ConfigError(
          f"augment: {name} has {len(values)} values but the images have {channels} channels"
      )
    return values

  mean_t = one(mean, IMAGENET_MEAN, GRAY_MEAN, "mean")
  std_t = one(std, IMAGENET_STD, GRAY_STD, "std")
  if any(not s > 0 for s in std_t):
    raise ConfigError(f"augment: std must be positive, got {std_t}")
  return mean_t, std_t


def _input_scale(dtype: Any) -> float:
  """The factor that takes input pixel values to [0, 1] (ConvertImageDtype)."""
  dtype = np.dtype(dtype)
  if dtype == np.uint8:
    return 1.0 / 255.0
  if jnp.issubdtype(dtype, jnp.floating):
    return 1.0
  raise TypeError(f"augment: images must be uint8 or floating, got {dtype}")


def _normalise(
    values: jax.Array, in_dtype: Any, mean: tuple[float, ...], std: tuple[float, ...], dtype: Any
) -> jax.Array:
  """(values * input scale - mean) / std over the last axis, cast to `dtype`."""
  scale = _input_scale(in_dtype)
  mean_a = jnp.asarray(mean, jnp.float32)
  std_a = jnp.asarray(std, jnp.float32)
  out = (values.astype(jnp.float32) * scale - mean_a) / std_a
  return out.astype(dtype)


@functools.partial(jax.jit, static_argnames=("mean", "std", "dtype"))
def _normalize_jit(images, mean, std, dtype):
  return _normalise(images, images.dtype, mean, std, dtype)


def normalize(
    images: jax.Array, *, mean: Stats = None, std: Stats = None, dtype: Any = jnp.float32
) -> jax.Array:
  """Only the normalisation: (images / 255 - mean) / std, shape unchanged."""
  _check_images(images)
  mean_t, std_t = resolve_stats(mean, std, images.shape[-1])
  return _normalize_jit(images, mean_t, std_t, jnp.dtype(dtype))


def _check_images(images: jax.Array) -> None:
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"augment: images must be N x H x W x C with C in (1, 3), got {images.shape}")
  _input_scale(images.dtype)


# ----------------------------------------------------------------------------
# Parameter sampling (RandomResizedCrop.get_params, RandomRotation.get_params)


def _fallback_crop(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
  """torchvision's crop (h, w) when no attempt fits: a central crop clamped
  to the ratio range. Static, because it depends only on the image shape."""
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return h, w


def choose_crop_size(
    area_fraction: jax.Array,
    log_ratio: jax.Array,
    height: int,
    width: int,
    ratio: tuple[float, float],
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(h, w, found) from candidate draws, as torchvision's attempt loop would.

  `area_fraction` and `log_ratio` hold the attempts in order (shape (A,));
  the first attempt whose rounded crop fits in the image wins, else
  `found` is False and (h, w) is torchvision's fallback.
  """
  target = (height * width) * area_fraction
  aspect = jnp.exp(log_ratio)
  # jnp.round rounds half to even, like Python's round() in torchvision.
  w = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
  h = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
  valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = jnp.argmax(valid)  # index of the first True (0 if none)
  found = jnp.any(valid)
  fb_h, fb_w = _fallback_crop(height, width, ratio)
  return (jnp.where(found, h[first], fb_h), jnp.where(found, w[first], fb_w), found)


def _sample_one(
    key: jax.Array,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    degrees: float,
) -> tuple[jax.Array, ...]:
  # One uniform draw feeds every parameter: each PRNG call inlines a threefry
  # kernel, and a handful of them made this the bulk of the compile time.
  u = jax.random.uniform(key, (2 * CROP_ATTEMPTS + 3,))
  area_u, ratio_u = u[:CROP_ATTEMPTS], u[CROP_ATTEMPTS : 2 * CROP_ATTEMPTS]
  top_u, left_u, angle_u = u[2 * CROP_ATTEMPTS :]
  area_fraction = scale[0] + (scale[1] - scale[0]) * area_u
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  log_ratio = log_lo + (log_hi - log_lo) * ratio_u
  h, w, found = choose_crop_size(area_fraction, log_ratio, height, width, ratio)

  def offset(u_pos, free):
    # Uniform integer in [0, free]; the clip guards float rounding at u -> 1.
    return jnp.minimum(jnp.floor(u_pos * (free + 1)).astype(jnp.int32), free)

  top = jnp.where(found, offset(top_u, height - h), (height - h) // 2)
  left = jnp.where(found, offset(left_u, width - w), (width - w) // 2)
  angle = -degrees + 2 * degrees * angle_u
  return top, left, h, w, angle


def sample_params(
    key: jax.Array,
    num: int,
    height: int,
    width: int,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    degrees: float = 15.0,
) -> AugParams:
  """Independent crop and angle draws for `num` images of height x width.

  The key is split into `num` per-example keys (so the same key with another
  batch size gives other draws).
  """
  keys = jax.random.split(key, num)
  out = jax.vmap(
      lambda k: _sample_one(k, height, width, tuple(scale), tuple(ratio), float(degrees))
  )(keys)
  return AugParams(*out)


# ----------------------------------------------------------------------------
# Sampling the source image


def _bilinear(image: jax.Array, ys: jax.Array, xs: jax.Array) -> jax.Array:
  """image (H, W, C) bilinearly sampled at (ys, xs), edge-clamped: float32
  array of shape ys.shape + (C,). Coordinates are pixel indices (pixel
  centres at integers)."""
  height, width, channels = image.shape
  flat = image.reshape(height * width, channels)
  y0 = jnp.floor(ys)
  x0 = jnp.floor(xs)
  wy = (ys - y0)[..., None]
  wx = (xs - x0)[..., None]
  y0 = y0.astype(jnp.int32)
  x0 = x0.astype(jnp.int32)
  y0c = jnp.clip(y0, 0, height - 1) * width
  y1c = jnp.clip(y0 + 1, 0, height - 1) * width
  x0c = jnp.clip(x0, 0, width - 1)
  x1c = jnp.clip(x0 + 1, 0, width - 1)

  def tap(row, col):
    # Indices are clamped above, so skip the gather's own bounds handling.
    return flat.at[row + col].get(mode="promise_in_bounds").astype(jnp.float32)

  top = tap(y0c, x0c) * (1 - wx) + tap(y0c, x1c) * wx
  bottom = tap(y1c, x0c) * (1 - wx) + tap(y1c, x1c) * wx
  return top * (1 - wy) + bottom * wy


def _warp_one(
    image: jax.Array,
    top: jax.Array,
    left: jax.Array,
    h: jax.Array,
    w: jax.Array,
    angle: jax.Array,
    out_size: int,
) -> jax.Array:
  """Crop (top, left, h, w) resized to out_size, then rotated by `angle`
  degrees about the centre, in one bilinear pass; float32 raw pixel values
  with the rotation's fill region set to 0."""
  size = out_size
  centre = (size - 1) / 2  # torchvision rotates about the pixel-grid centre
  grid = jnp.arange(size, dtype=jnp.float32) - centre
  dy = grid[:, None]
  dx = grid[None, :]
  theta = jnp.deg2rad(angle.astype(jnp.float32))
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  # Inverse rotation (output -> resized-crop frame), as torchvision's
  # _get_inverse_affine_matrix(center, -angle, ...) for F.rotate.
  u = cos * dx - sin * dy + centre
  v = sin * dx + cos * dy + centre
  # Bilinear interpolation of an all-ones frame with zero padding: 1 inside,
  # ramping to 0 over the one pixel outside, as torchvision's fill mask.
  mask = jnp.clip(jnp.minimum(u + 1, size - u), 0, 1) * jnp.clip(jnp.minimum(v + 1, size - v), 0, 1)
  # Resized-crop frame -> source, with PyTorch's align_corners=False
  # convention; the clamp to the crop box reproduces its edge handling.
  hf = h.astype(jnp.float32)
  wf = w.astype(jnp.float32)
  ys = top.astype(jnp.float32) + jnp.clip((v + 0.5) * (hf / size) - 0.5, 0, hf - 1)
  xs = left.astype(jnp.float32) + jnp.clip((u + 0.5) * (wf / size) - 0.5, 0, wf - 1)
  return _bilinear(image, ys, xs) * mask[..., None]


@functools.partial(jax.jit, static_argnames=("out_size", "mean", "std", "dtype"))
def _apply_jit(images, params, out_size, mean, std, dtype):
  warped = jax.vmap(_warp_one, in_axes=(0, 0, 0, 0, 0, 0, None))(
      images, params.top, params.left, params.height, params.width, params.angle, out_size
  )
  return _normalise(warped, images.dtype, mean, std, dtype)


def apply_params(
    images: jax.Array,
    params: AugParams,
    *,
    out_size: int,
    mean: Stats = None,
    std: Stats = None,
    dtype: Any = jnp.float32,
) -> jax.Array:
  """The deterministic half of `train_transform`: warp with given params."""
  _check_images(images)
  mean_t, std_t = resolve_stats(mean, std, images.shape[-1])
  params = AugParams(*(jnp.asarray(p) for p in params))
  return _apply_jit(images, params, int(out_size), mean_t, std_t, jnp.dtype(dtype))


@functools.partial(
    jax.jit, static_argnames=("out_size", "scale", "ratio", "degrees", "mean", "std", "dtype")
)
def _train_jit(images, key, out_size, scale, ratio, degrees, mean, std, dtype):
  num, height, width, _ = images.shape
  params = sample_params(key, num, height, width, scale=scale, ratio=ratio, degrees=degrees)
  return _apply_jit(images, params, out_size, mean, std, dtype)


def train_transform(
    images: jax.Array,
    key: jax.Array,
    *,
    out_size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    degrees: float = 15.0,
    mean: Stats = None,
    std: Stats = None,
    dtype: Any = jnp.float32,
) -> jax.Array:
  """Random resized crop + random rotation + normalisation, per example.

  Args:
    images: N x H x W x C, uint8 or floating in [0, 1].
    key: one PRNG key for the batch; it is split per example inside. Vmap over
      a leading key axis for ensemble members.
    out_size: side of the square output.
    scale, ratio: RandomResizedCrop's area-fraction and aspect-ratio ranges.
    degrees: angles are uniform in [-degrees, degrees].
    mean, std: per-channel normalisation (see `resolve_stats`).
    dtype: output dtype.

  Returns:
    N x out_size x out_size x C of `dtype`.
  """
  _check_images(images)
  _check_ranges(scale, ratio, degrees)
  mean_t, std_t = resolve_stats(mean, std, images.shape[-1])
  return _train_jit(
      images,
      key,
      int(out_size),
      tuple(float(s) for s in scale),
      tuple(float(r) for r in ratio),
      float(degrees),
      mean_t,
      std_t,
      jnp.dtype(dtype),
  )


def _check_ranges(scale: Sequence[float], ratio: Sequence[float], degrees: float) -> None:
  if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
    raise ConfigError(f"augment: scale must be (lo, hi) with 0 < lo <= hi, got {scale}")
  if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
    raise ConfigError(f"augment: ratio must be (lo, hi) with 0 < lo <= hi, got {ratio}")
  if not degrees >= 0:
    raise ConfigError(f"augment: degrees must be >= 0, got {degrees}")


# ----------------------------------------------------------------------------
# Eval: resize short side, centre crop


def eval_geometry(height: int, width: int, resize: int, out_size: int) -> tuple[int, int, int, int]:
  """(resized_h, resized_w, crop_top, crop_left), as torchvision's
  Resize(resize) (short side, long side truncated) and CenterCrop(out_size)."""
  if width <= height:
    new_w, new_h = resize, int(resize * height / width)
  else:
    new_h, new_w = resize, int(resize * width / height)
  # Python round (half to even), as torchvision's center_crop.
  return (new_h, new_w, int(round((new_h - out_size) / 2.0)), int(round((new_w - out_size) / 2.0)))


def _axis_taps(
    in_len: int, resized_len: int, offset: int, out_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Source taps (i0, i1, weight of i1) for output positions offset ..
  offset + out_len - 1 of a bilinear resize in_len -> resized_len, with
  PyTorch's align_corners=False, antialias=False convention."""
  dst = np.arange(offset, offset + out_len, dtype=np.float64)
  src = np.clip((dst + 0.5) * (in_len / resized_len) - 0.5, 0, in_len - 1)
  i0 = np.floor(src).astype(np.int32)
  i1 = np.minimum(i0 + 1, in_len - 1).astype(np.int32)
  return i0, i1, (src - i0).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("resize", "out_size", "mean", "std", "dtype"))
def _eval_jit(images, resize, out_size, mean, std, dtype):
  _, height, width, _ = images.shape
  new_h, new_w, top, left = eval_geometry(height, width, resize, out_size)
  # The resize is separable, so interpolate rows then columns with static
  # taps: two cheap gathers instead of a 2-D one.
  y0, y1, wy = _axis_taps(height, new_h, top, out_size)
  x0, x1, wx = _axis_taps(width, new_w, left, out_size)
  wy = wy[None, :, None, None]
  wx = wx[None, None, :, None]
  rows = (
      jnp.take(images, y0, axis=1).astype(jnp.float32) * (1 - wy)
      + jnp.take(images, y1, axis=1).astype(jnp.float32) * wy
  )
  out = jnp.take(rows, x0, axis=2) * (1 - wx) + jnp.take(rows, x1, axis=2) * wx
  return _normalise(out, images.dtype, mean, std, dtype)


def eval_transform(
    images: jax.Array,
    *,
    resize: int = 256,
    out_size: int = 224,
    mean: Stats = None,
    std: Stats = None,
    dtype: Any = jnp.float32,
    passthrough_at_out_size: bool = True,
) -> jax.Array:
  """Resize the short side to `resize`, centre-crop `out_size`, normalise.

  With `passthrough_at_out_size` (the default), images that are already
  out_size x out_size are only normalised. torchvision would still upscale
  them to `resize` and crop (a zoom of resize / out_size); set it False for
  that.
  """
  _check_images(images)
  if resize < out_size:
    raise ConfigError(f"augment: resize ({resize}) must be >= out_size ({out_size})")
  mean_t, std_t = resolve_stats(mean, std, images.shape[-1])
  if passthrough_at_out_size and images.shape[1:3] == (out_size, out_size):
    return _normalize_jit(images, mean_t, std_t, jnp.dtype(dtype))
  return _eval_jit(images, int(resize), int(out_size), mean_t, std_t, jnp.dtype(dtype))


# ----------------------------------------------------------------------------
# Config-friendly bundle


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """The train/eval transform pair, built once from config fields.

  With `enabled=False` the train transform is the deterministic eval
  transform (for images already out_size x out_size: a pure normalisation).
  """

  enabled: bool = True
  out_size: int = 224
  resize: int = 256
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  degrees: float = 15.0
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None
  dtype: Any = jnp.float32

  def __post_init__(self):
    _check_ranges(self.scale, self.ratio, self.degrees)
    if self.out_size <= 0 or self.resize < self.out_size:
      raise ConfigError(
          f"augment: need 0 < out_size <= resize, got "
          f"out_size={self.out_size}, resize={self.resize}"
      )

  def train(self, images: jax.Array, key: jax.Array) -> jax.Array:
    if not self.enabled:
      return self.eval(images)
    return train_transform(
        images,
        key,
        out_size=self.out_size,
        scale=self.scale,
        ratio=self.ratio,
        degrees=self.degrees,
        mean=self.mean,
        std=self.std,
        dtype=self.dtype,
    )

  def eval(self, images: jax.Array) -> jax.Array:
    return eval_transform(
        images,
        resize=self.resize,
        out_size=self.out_size,
        mean=self.mean,
        std=self.std,
        dtype=self.dtype,
    )
