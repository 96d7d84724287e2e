"""Tests for ncjax.augment against independent numpy / scipy / PIL references."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.ndimage
from PIL import Image

from ncjax import augment
from ncjax.errors import ConfigError

MEAN = np.array(augment.IMAGENET_MEAN, np.float32)
STD = np.array(augment.IMAGENET_STD, np.float32)


def _images(shape, seed=0, smooth=False):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 256, shape).astype(np.float64)
  if smooth:
    # Smooth content keeps interpolation differences small and meaningful.
    x = scipy.ndimage.gaussian_filter(x, sigma=(0, 2, 2, 0))
    x = (x - x.min()) / (x.max() - x.min()) * 255
  return np.round(x).astype(np.uint8)


def _params(n, top, left, h, w, angle):
  return augment.AugParams(
      *(np.full((n,), v) for v in (top, left, h, w)), np.full((n,), angle, np.float32)
  )


def _torch_bilinear(img, out_h, out_w):
  """numpy float64 bilinear resize of H x W x C with PyTorch's
  align_corners=False, antialias=False convention (negative source indices
  clamp to 0, the upper tap clamps to the last pixel)."""
  h, w = img.shape[:2]

  def taps(n_in, n_out):
    src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0

  y0, y1, wy = taps(h, out_h)
  x0, x1, wx = taps(w, out_w)
  img = img.astype(np.float64)
  rows = img[y0] * (1 - wy)[:, None, None] + img[y1] * wy[:, None, None]
  return rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]


def test_identity_parameters_are_plain_normalisation():
  x = _images((3, 20, 20, 3))
  out = augment.train_transform(
      jnp.asarray(x),
      jax.random.key(0),
      out_size=20,
      scale=(1.0, 1.0),
      ratio=(1.0, 1.0),
      degrees=0.0,
  )
  expected = (x / 255.0 - MEAN) / STD
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=0)
  np.testing.assert_allclose(
      np.asarray(augment.normalize(jnp.asarray(x))), expected, atol=1e-5, rtol=0
  )


@pytest.mark.parametrize("angle", [9.0, -13.7])
def test_rotation_matches_scipy_on_interior(angle):
  size = 33
  x = _images((1, size, size, 3), seed=1, smooth=True)
  out = augment.apply_params(
      jnp.asarray(x), _params(1, 0, 0, size, size, angle), out_size=size, mean=0.0, std=1.0
  )
  out = np.asarray(out)[0] * 255
  # scipy's positive angle is counter-clockwise as displayed, as torchvision's.
  ref = scipy.ndimage.rotate(
      x[0].astype(np.float64), angle, axes=(1, 0), order=1, reshape=False, mode="constant"
  )
  c = (size - 1) / 2
  yy, xx = np.mgrid[:size, :size]
  interior = np.hypot(yy - c, xx - c) < c - 1.5
  # Same bilinear taps and pixel-centre convention; only float32 coordinate
  # rounding (~1e-5 px) separates them.
  np.testing.assert_allclose(out[interior], ref[interior], atol=2e-3, rtol=0)
  assert np.abs(out[interior] - ref[interior]).max() < 2e-3
  # The rotation really moved things (a wrong sign would fail above).
  assert np.abs(ref[interior] - x[0][interior]).mean() > 5


def test_rotation_by_90_is_rot90_and_fill_is_zero():
  x = _images((1, 15, 15, 1), seed=2)
  out = augment.apply_params(
      jnp.asarray(x), _params(1, 0, 0, 15, 15, 90.0), out_size=15, mean=0.0, std=1.0
  )
  # np.rot90 turns counter-clockwise as displayed, torchvision's convention.
  np.testing.assert_allclose(np.asarray(out)[0] * 255, np.rot90(x[0]), atol=1e-3, rtol=0)
  # At 45 degrees the corners come from outside the frame: fill 0 before
  # normalisation, so -mean/std after.
  x3 = _images((1, 15, 15, 3), seed=2)
  out = augment.apply_params(jnp.asarray(x3), _params(1, 0, 0, 15, 15, 45.0), out_size=15)
  np.testing.assert_allclose(np.asarray(out)[0, 0, 0], -MEAN / STD, atol=1e-6)


@pytest.mark.parametrize("box", [(5, 7, 11, 17), (0, 3, 40, 29)])
def test_crop_resize_matches_torch_bilinear_reference(box):
  # (5, 7, 11, 17) upscales a small crop, (0, 3, 40, 29) downscales.
  top, left, h, w = box
  x = _images((1, 40, 50, 3), seed=3)
  out = augment.apply_params(
      jnp.asarray(x), _params(1, top, left, h, w, 0.0), out_size=24, mean=0.0, std=1.0
  )
  ref = _torch_bilinear(x[0, top : top + h, left : left + w], 24, 24)
  np.testing.assert_allclose(np.asarray(out)[0] * 255, ref, atol=2e-3, rtol=0)


def _torchvision_loop(fracs, log_ratios, height, width, ratio):
  """RandomResizedCrop.get_params's size logic in plain Python floats."""
  area = height * width
  for frac, log_r in zip(fracs, log_ratios, strict=True):
    target = area * float(frac)
    aspect = math.exp(float(log_r))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return h, w, True
  in_ratio = width / height
  if in_ratio < min(ratio):
    return int(round(width / min(ratio))), width, False
  if in_ratio > max(ratio):
    return height, int(round(height * max(ratio))), False
  return height, width, False


def test_choose_crop_size_matches_torchvision_attempt_loop():
  rng = np.random.default_rng(4)
  ratio = (3 / 4, 4 / 3)
  choose = jax.jit(augment.choose_crop_size, static_argnums=(2, 3, 4))
  n_found = n_fallback = 0
  for height, width, lo in [(64, 96, 0.08), (50, 50, 0.6), (30, 90, 0.3)]:
    for _ in range(100):
      fracs = rng.uniform(lo, 1.0, 10).astype(np.float32)
      logs = rng.uniform(math.log(0.5), math.log(2.0), 10).astype(np.float32)
      expected = _torchvision_loop(fracs, logs, height, width, ratio)
      h, w, found = choose(fracs, logs, height, width, ratio)
      assert (int(h), int(w), bool(found)) == expected
      n_found += expected[2]
      n_fallback += not expected[2]
  assert n_found > 50 and n_fallback > 5  # both branches exercised


@pytest.mark.parametrize(
    "height,width,expected",
    [
        (10, 1000, (0, 493, 10, 13)),  # too wide: h = H, w = round(H * 4/3)
        (1000, 10, (493, 0, 13, 10)),  # too tall: w = W, h = round(W / (3/4))
    ],
)
def test_fallback_is_torchvision_centre_crop(height, width, expected):
  p = augment.sample_params(jax.random.key(5), 4, height, width, scale=(0.9, 1.0))
  for field, value in zip(p[:4], expected, strict=True):
    np.testing.assert_array_equal(np.asarray(field), value)


def _expected_area_fraction(lo=0.08, hi=1.0, ratio=(3 / 4, 4 / 3), attempts=10):
  """E[area fraction] on a square image (rounding ignored): each attempt is
  valid iff frac <= exp(-|log r|); the first valid attempt is a draw from the
  conditional law; if all fail the fallback is the whole image."""
  a, b = math.log(ratio[0]), math.log(ratio[1])

  def avg(f):
    return scipy.integrate.quad(f, a, b)[0] / (b - a)

  def bound(t):
    return min(math.exp(-abs(t)), hi)

  p_valid = avg(lambda t: (bound(t) - lo) / (hi - lo))
  mean_valid = avg(lambda t: (bound(t) ** 2 - lo**2) / (2 * (hi - lo))) / p_valid
  q = (1 - p_valid) ** attempts
  return (1 - q) * mean_valid + q * 1.0


def test_crop_and_angle_distribution():
  height = width = 256
  n = 20000
  p = jax.jit(augment.sample_params, static_argnums=(1, 2, 3))(jax.random.key(6), n, height, width)
  top, left, h, w, angle = (np.asarray(v) for v in p)
  frac = h * w / (height * width)
  # Rounding h and w (>= ~60 px) moves the area and log-ratio by ~1-2 %.
  assert frac.min() >= 0.08 * 0.97 and frac.max() <= 1.0
  log_r = np.log(w / h)
  assert log_r.min() >= math.log(3 / 4) - 0.02
  assert log_r.max() <= math.log(4 / 3) + 0.02
  assert (top >= 0).all() and (top + h <= height).all()
  assert (left >= 0).all() and (left + w <= width).all()
  # Standard error of the mean is ~0.002; rounding bias is far smaller.
  assert abs(frac.mean() - _expected_area_fraction()) < 0.01
  assert frac.mean() < 0.6  # rejection really cut the high areas
  assert len(set(zip(h.tolist(), w.tolist(), strict=True))) > 1000
  assert np.abs(angle).max() <= 15.0
  assert abs(angle.mean()) < 0.3 and abs(angle.std() - 15 / math.sqrt(3)) < 0.2
  # Positions are uniform over the free range: mean relative offset ~ 1/2.
  assert abs((top / np.maximum(height - h, 1))[h < height].mean() - 0.5) < 0.02


def test_examples_in_a_batch_get_different_parameters():
  x = np.repeat(_images((1, 32, 40, 3), seed=7), 8, axis=0)
  key = jax.random.key(8)
  p = augment.sample_params(key, 8, 32, 40)
  boxes = set(zip(*(np.asarray(v).tolist() for v in p[:4]), strict=True))
  assert len(boxes) == 8
  assert len(set(np.asarray(p.angle).tolist())) == 8
  out = np.asarray(augment.train_transform(jnp.asarray(x), key, out_size=16))
  for i in range(8):
    for j in range(i):
      assert np.abs(out[i] - out[j]).max() > 0.1


def test_deterministic_in_the_key():
  x = jnp.asarray(_images((4, 32, 40, 3), seed=9))
  a = augment.train_transform(x, jax.random.key(10), out_size=16)
  b = augment.train_transform(x, jax.random.key(10), out_size=16)
  c = augment.train_transform(x, jax.random.key(11), out_size=16)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 0.1


def test_eval_geometry_rounds_like_torchvision():
  # 400 * 256 / 300 = 341.33 truncates to 341; (341 - 224) / 2 = 58.5 rounds
  # half to even -> 58.
  assert augment.eval_geometry(300, 400, 256, 224) == (256, 341, 16, 58)
  assert augment.eval_geometry(450, 600, 256, 224) == (256, 341, 16, 58)
  assert augment.eval_geometry(500, 300, 256, 224) == (426, 256, 101, 16)


def test_eval_downscale_matches_torch_bilinear_reference():
  x = _images((2, 60, 80, 3), seed=12)
  out = augment.eval_transform(jnp.asarray(x), resize=32, out_size=24, mean=0.0, std=1.0)
  new_h, new_w, top, left = 32, 42, 4, 9  # 80*32/60 = 42.67 -> 42
  assert augment.eval_geometry(60, 80, 32, 24) == (new_h, new_w, top, left)
  for i in range(2):
    ref = _torch_bilinear(x[i], new_h, new_w)[top : top + 24, left : left + 24]
    np.testing.assert_allclose(np.asarray(out)[i] * 255, ref, atol=2e-3, rtol=0)


def test_eval_upscale_matches_pil():
  # Upscaling, PIL's bilinear filter has support 1 and the same half-pixel
  # centres as PyTorch's antialias=False, and renormalising at the edges
  # equals clamping; mode "F" avoids PIL's uint8 rounding, leaving only float
  # error (observed ~1e-4 grey levels; 2e-3 allowed).
  x = _images((1, 20, 30, 3), seed=13)
  out = np.asarray(
      augment.eval_transform(jnp.asarray(x), resize=48, out_size=40, mean=0.0, std=1.0)
  )[0]
  new_h, new_w, top, left = augment.eval_geometry(20, 30, 48, 40)
  assert (new_h, new_w) == (48, 72)
  for c in range(3):
    pil = Image.fromarray(x[0, ..., c].astype(np.float32), mode="F").resize(
        (new_w, new_h), Image.BILINEAR
    )
    ref = np.asarray(pil)[top : top + 40, left : left + 40]
    np.testing.assert_allclose(out[..., c] * 255, ref, atol=2e-3, rtol=0)


def test_eval_at_eval_size_is_pure_normalisation():
  x = _images((2, 24, 24, 3), seed=14)
  out = augment.eval_transform(jnp.asarray(x), resize=28, out_size=24)
  np.testing.assert_allclose(np.asarray(out), (x / 255.0 - MEAN) / STD, atol=1e-5, rtol=0)
  # torchvision semantics on request: upscale to 28, then crop = a zoom.
  zoomed = augment.eval_transform(
      jnp.asarray(x), resize=28, out_size=24, passthrough_at_out_size=False
  )
  assert np.abs(np.asarray(zoomed) - np.asarray(out)).max() > 0.1
  # Short side already `resize`: no resampling, only the centre crop.
  y = _images((1, 28, 31, 3), seed=15)
  out = augment.eval_transform(jnp.asarray(y), resize=28, out_size=24)
  np.testing.assert_allclose(
      np.asarray(out), (y[:, 2:26, 4:28] / 255.0 - MEAN) / STD, atol=1e-5, rtol=0
  )


def test_one_channel_uint8_and_float_inputs():
  gray = _images((3, 30, 36, 1), seed=16)
  rgb = np.repeat(gray, 3, axis=-1)
  key = jax.random.key(17)
  kw = dict(out_size=16, mean=0.3, std=0.2)
  out1 = np.asarray(augment.train_transform(jnp.asarray(gray), key, **kw))
  out3 = np.asarray(augment.train_transform(jnp.asarray(rgb), key, **kw))
  assert out1.shape == (3, 16, 16, 1) and out1.dtype == np.float32
  for c in range(3):
    np.testing.assert_allclose(out3[..., c], out1[..., 0], atol=1e-6)
  # Float input in [0, 1] is the same image as uint8 / 255.
  outf = np.asarray(augment.train_transform(jnp.asarray(gray / np.float32(255)), key, **kw))
  np.testing.assert_allclose(outf, out1, atol=1e-5)
  # Default 1-channel statistics.
  norm = np.asarray(augment.normalize(jnp.asarray(gray)))
  np.testing.assert_allclose(norm, (gray / 255.0 - 0.449) / 0.226, atol=1e-5)
  bf16 = augment.train_transform(jnp.asarray(gray), key, dtype=jnp.bfloat16, **kw)
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(bf16, np.float32), out1, atol=0.05)


def test_jit_and_vmap_over_members():
  x = jnp.asarray(_images((3, 30, 36, 3), seed=18))
  keys = jax.random.split(jax.random.key(19), 2)

  def f(images, key):
    return augment.train_transform(images, key, out_size=16)

  separate = np.stack([np.asarray(f(x, k)) for k in keys])
  jitted = jax.jit(jax.vmap(f, in_axes=(None, 0)))(x, keys)
  np.testing.assert_allclose(np.asarray(jitted), separate, atol=1e-6)
  assert np.abs(separate[0] - separate[1]).max() > 0.1
  # Per-member images too (leading member axis on both), un-jitted, with raw
  # uint32 keys.
  raw = jax.random.split(jax.random.PRNGKey(19), 2)
  xs = jnp.stack([x, x[::-1]])
  both = jax.vmap(f)(xs, raw)
  np.testing.assert_allclose(np.asarray(both[1]), np.asarray(f(xs[1], raw[1])), atol=1e-6)


def test_config_errors_and_disabled_augmentation():
  x = jnp.asarray(_images((2, 24, 24, 3), seed=20))
  with pytest.raises(ConfigError):
    augment.normalize(x, mean=(0.5, 0.5), std=(0.2, 0.2))
  with pytest.raises(ConfigError):
    augment.normalize(x, std=0.0)
  with pytest.raises(ConfigError):
    augment.Augmentation(out_size=224, resize=200)
  with pytest.raises(ConfigError):
    augment.Augmentation(scale=(0.5, 0.1))
  off = augment.Augmentation(enabled=False, out_size=24, resize=28)
  np.testing.assert_array_equal(
      np.asarray(off.train(x, jax.random.key(0))), np.asarray(augment.normalize(x))
  )
  on = augment.Augmentation(out_size=16, resize=20)
  assert on.train(x, jax.random.key(0)).shape == (2, 16, 16, 3)
  assert on.eval(x).shape == (2, 16, 16, 3)
