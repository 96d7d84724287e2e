"""torchvision state dict conversion, checked against a numpy torchvision.

torch is not installed here, so the reference is torchvision's ResNet
written out again in numpy from `torchvision/models/resnet.py`: NCHW, OIHW
weights, eval-mode BatchNorm, max-pool padded with -inf, downsample on the
first block of a stage whenever stride or width change. It runs in float64
on random state dicts with torchvision's key names; the converted Flax
model, in float32, must give the same logits to 1e-4.
(`benchmarks/check_torchvision_conversion.py` does the same against torch.)
"""

from __future__ import annotations

import importlib.util
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ncjax import resnet
from ncjax import torchvision_weights as tw
from ncjax.errors import ConfigError, DataError

_LAYERS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3)}
# Parameters (not buffers) of torchvision's 1000-class models.
_TORCH_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032}


def _torchvision_state_dict(name: str, seed: int = 0, num_classes: int = 1000):
  """A random state dict with torchvision's names, shapes and dtypes."""
  rng = np.random.default_rng(seed)
  bottleneck = name == "resnet50"
  sd = {}

  def conv(key, out_c, in_c, k):
    # Kaiming fan_out as torchvision, so activations keep their scale.
    sd[f"{key}.weight"] = rng.normal(0, math.sqrt(2 / (out_c * k * k)), (out_c, in_c, k, k))

  def bn(key, c):
    # Random affine and running stats, so a swapped mean/var or scale/bias shows.
    sd[f"{key}.weight"] = rng.uniform(0.5, 1.5, c)
    sd[f"{key}.bias"] = rng.normal(0, 0.1, c)
    sd[f"{key}.running_mean"] = rng.normal(0, 0.1, c)
    sd[f"{key}.running_var"] = rng.uniform(0.5, 2.0, c)
    sd[f"{key}.num_batches_tracked"] = np.array(0, np.int64)

  conv("conv1", 64, 3, 7)
  bn("bn1", 64)
  inplanes = 64
  for i, n in enumerate(_LAYERS[name]):
    planes = 64 * 2**i
    out = planes * 4 if bottleneck else planes
    for j in range(n):
      p = f"layer{i + 1}.{j}"
      stride = 2 if i > 0 and j == 0 else 1
      if bottleneck:
        conv(f"{p}.conv1", planes, inplanes, 1)
        bn(f"{p}.bn1", planes)
        conv(f"{p}.conv2", planes, planes, 3)
        bn(f"{p}.bn2", planes)
        conv(f"{p}.conv3", out, planes, 1)
        bn(f"{p}.bn3", out)
      else:
        conv(f"{p}.conv1", planes, inplanes, 3)
        bn(f"{p}.bn1", planes)
        conv(f"{p}.conv2", planes, planes, 3)
        bn(f"{p}.bn2", planes)
      if stride != 1 or inplanes != out:
        conv(f"{p}.downsample.0", out, inplanes, 1)
        bn(f"{p}.downsample.1", out)
      inplanes = out
  bound = 1 / math.sqrt(inplanes)
  sd["fc.weight"] = rng.uniform(-bound, bound, (num_classes, inplanes))
  sd["fc.bias"] = rng.uniform(-bound, bound, num_classes)
  return {k: v if v.dtype == np.int64 else v.astype(np.float32) for k, v in sd.items()}


# --- torchvision's ResNet-18 forward (eval mode) in numpy, NCHW. ---


def _conv2d(x, w, stride, padding):
  x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
  k = w.shape[2]
  # im2col: (N, C, H', W', k, k) windows, strided, contracted with OIHW.
  cols = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))
  cols = cols[:, :, ::stride, ::stride]
  return np.einsum("nchwij,ocij->nohw", cols, w, optimize=True)


def _batch_norm(x, sd, key, eps=1e-5):
  shape = (1, -1, 1, 1)
  inv = sd[f"{key}.weight"] / np.sqrt(sd[f"{key}.running_var"] + eps)
  return (x - sd[f"{key}.running_mean"].reshape(shape)) * inv.reshape(shape) + sd[
      f"{key}.bias"
  ].reshape(shape)


def _max_pool_3x3_s2_p1(x):
  x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
  windows = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(2, 3))
  return windows[:, :, ::2, ::2].max(axis=(-2, -1))


def _relu(x):
  return np.maximum(x, 0)


def _numpy_resnet18(sd, x):
  """(logits, pre_logits) of torchvision's resnet18 in eval mode, float64."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  x = np.asarray(x, np.float64)
  x = _relu(_batch_norm(_conv2d(x, sd["conv1.weight"], 2, 3), sd, "bn1"))
  x = _max_pool_3x3_s2_p1(x)
  for i, n in enumerate(_LAYERS["resnet18"]):
    for j in range(n):
      p = f"layer{i + 1}.{j}"
      stride = 2 if i > 0 and j == 0 else 1
      out = _relu(_batch_norm(_conv2d(x, sd[f"{p}.conv1.weight"], stride, 1), sd, f"{p}.bn1"))
      out = _batch_norm(_conv2d(out, sd[f"{p}.conv2.weight"], 1, 1), sd, f"{p}.bn2")
      identity = x
      if f"{p}.downsample.0.weight" in sd:
        identity = _batch_norm(
            _conv2d(x, sd[f"{p}.downsample.0.weight"], stride, 0), sd, f"{p}.downsample.1"
        )
      x = _relu(out + identity)
  pre_logits = x.mean(axis=(2, 3))  # AdaptiveAvgPool2d((1, 1)) + flatten
  return pre_logits @ sd["fc.weight"].T + sd["fc.bias"], pre_logits


def _apply(model, variables, x_nhwc):
  return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x_nhwc)


@pytest.fixture(scope="module")
def sd18():
  return _torchvision_state_dict("resnet18")


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)


def test_numpy_reference_conv_matches_a_direct_loop():
  # The reference's im2col, checked once against the definition of conv2d.
  rng = np.random.default_rng(0)
  x, w = rng.normal(size=(1, 2, 7, 7)), rng.normal(size=(3, 2, 3, 3))
  got = _conv2d(x, w, 2, 1)
  xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
  want = np.zeros((1, 3, 4, 4))
  for o in range(3):
    for h in range(4):
      for v in range(4):
        want[0, o, h, v] = np.sum(xp[0, :, 2 * h : 2 * h + 3, 2 * v : 2 * v + 3] * w[o])
  np.testing.assert_allclose(got, want, atol=1e-12)


def test_resnet18_logits_match_torchvision_reference(sd18, images):
  want, _ = _numpy_resnet18(sd18, images)
  variables = tw.convert(sd18)  # model and 1000 classes inferred
  logits, _ = _apply(
      resnet.create("resnet18", num_classes=1000), variables, images.transpose(0, 2, 3, 1)
  )
  diff = float(np.max(np.abs(np.asarray(logits, np.float64) - want)))
  assert np.abs(want).max() > 0.1  # a real signal, not everything ~0
  assert diff < 1e-4, diff


def test_imagenet_init_for_grayscale_two_classes(sd18, images):
  # The paper's case: ImageNet weights, 1-channel images, a fresh 2-class head.
  gray = images[:, :1]
  _, want_pre = _numpy_resnet18(sd18, np.repeat(gray, 3, axis=1))
  model = resnet.create("resnet18", num_classes=2)
  fresh = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 1)), train=False))(
      jax.random.key(0)
  )
  variables = tw.init_from(sd18, model, fresh)  # class counts differ: head dropped
  np.testing.assert_array_equal(
      variables["params"]["fc"]["kernel"], fresh["params"]["fc"]["kernel"]
  )
  assert variables["params"]["conv1"]["kernel"].shape == (7, 7, 1, 64)
  logits, feats = _apply(model, variables, gray.transpose(0, 2, 3, 1))
  pre = np.asarray(feats["pre_logits"], np.float64)
  assert np.max(np.abs(pre - want_pre)) < 1e-4
  fc = variables["params"]["fc"]
  np.testing.assert_allclose(logits, pre @ fc["kernel"] + fc["bias"], atol=1e-5)


def test_leaves_map_one_to_one_with_layout_changes(sd18):
  variables = tw.convert(sd18, num_classes=1000)
  p, s = variables["params"], variables["batch_stats"]
  np.testing.assert_array_equal(
      p["layer2_0"]["downsample_conv"]["kernel"],
      sd18["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(s["layer3_1"]["bn2"]["var"], sd18["layer3.1.bn2.running_var"])
  np.testing.assert_array_equal(
      p["layer4_0"]["downsample_bn"]["scale"], sd18["layer4.0.downsample.1.weight"]
  )
  np.testing.assert_array_equal(p["fc"]["kernel"], sd18["fc.weight"].T)
  # Every torch float array went to exactly one leaf.
  n_leaves = len(jax.tree.leaves(variables))
  assert n_leaves == sum(not k.endswith("num_batches_tracked") for k in sd18)


@pytest.mark.parametrize("name", ["resnet34", "resnet50"])
def test_deeper_models_convert_completely(name):
  sd = _torchvision_state_dict(name, num_classes=10)
  assert tw.infer_model_name(sd) == name
  fresh = jax.eval_shape(
      lambda: resnet.create(name, num_classes=2).init(
          jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False
      )
  )
  head = {
      "params": {"fc": jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), fresh["params"]["fc"])}
  }
  variables = tw.convert(sd, head_from=head)
  assert jax.tree.map(np.shape, variables) == jax.tree.map(lambda x: x.shape, fresh)
  d = 2048 if name == "resnet50" else 512
  n = sum(x.size for x in jax.tree.leaves(variables["params"]))
  assert n == _TORCH_PARAMS[name] - 1000 * (d + 1) + 2 * (d + 1)
  if name == "resnet50":
    np.testing.assert_array_equal(
        variables["params"]["layer1_0"]["conv3"]["kernel"],
        sd["layer1.0.conv3.weight"].transpose(2, 3, 1, 0),
    )


def test_accepts_tensor_like_values(sd18):
  # torch tensors are read through .detach().cpu().numpy().
  class FakeTensor:

    def __init__(self, a):
      self.a = a

    def detach(self):
      return self

    def cpu(self):
      return self

    def numpy(self):
      return self.a

  wrapped = {f"module.{k}": FakeTensor(v) for k, v in sd18.items()}
  got = tw.convert(wrapped)
  np.testing.assert_array_equal(got["params"]["bn1"]["bias"], sd18["bn1.bias"])


def test_missing_key_is_named(sd18):
  sd = dict(sd18)
  del sd["layer3.1.bn2.running_var"]
  with pytest.raises(ConfigError, match=r"lacks 'layer3\.1\.bn2\.running_var'.*\(256,\)"):
    tw.convert(sd, model_name="resnet18")


def test_extra_key_is_named(sd18):
  sd = dict(sd18, **{"layer4.2.conv1.weight": np.zeros((512, 512, 3, 3), np.float32)})
  with pytest.raises(
      ConfigError, match=r"'layer4\.2\.conv1\.weight' \(512, 512, 3, 3\) has no place"
  ):
    tw.convert(sd, model_name="resnet18")


def test_wrong_shape_is_named(sd18):
  sd = dict(sd18, **{"layer1.0.conv2.weight": np.zeros((64, 32, 3, 3), np.float32)})
  with pytest.raises(ConfigError) as e:
    tw.convert(sd)
  msg = str(e.value)
  assert "\n" not in msg
  assert "'layer1.0.conv2.weight' has shape (64, 32, 3, 3)" in msg
  assert "needs (3, 3, 64, 64)" in msg


def test_head_with_wrong_class_count_is_refused(sd18):
  model = resnet.create("resnet18", num_classes=2)
  fresh = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  with pytest.raises(ConfigError, match=r"'fc\.(weight|bias)' has shape \(1000,.*resnet18 needs"):
    tw.init_from(sd18, model, fresh, keep_head=True)


def test_resnet50_weights_do_not_fit_resnet18():
  with pytest.raises(ConfigError, match="lacks|has shape|no place"):
    tw.convert(_torchvision_state_dict("resnet50"), model_name="resnet18")


def test_npz_round_trip_and_cli(sd18, tmp_path, capsys):
  path = str(tmp_path / "w.npz")
  tw.save_npz(sd18, path)
  loaded = tw.load_state_dict(path)
  assert loaded.keys() == sd18.keys()
  for k, v in sd18.items():
    np.testing.assert_array_equal(loaded[k], v)
  out = str(tmp_path / "out" / "r18.npz")
  assert tw.main([f"--input={path}", f"--output={out}"]) == 0
  assert "resnet18" in capsys.readouterr().out
  again = tw.load_state_dict(out)
  assert not any(k.endswith("num_batches_tracked") for k in again)
  np.testing.assert_array_equal(again["fc.weight"], sd18["fc.weight"])
  # A bad file is one line on stderr and status 2.
  bad = tmp_path / "bad.npz"
  bad.write_bytes(b"not a zip")
  assert tw.main([f"--input={bad}", f"--output={out}"]) == 2
  assert "cannot read" in capsys.readouterr().err


def test_file_errors(tmp_path):
  with pytest.raises(DataError, match="do not exist"):
    tw.load_state_dict(str(tmp_path / "missing.pth"))
  (tmp_path / "w.txt").write_text("x")
  with pytest.raises(DataError, match=r"expected a \.pth"):
    tw.load_state_dict(str(tmp_path / "w.txt"))


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")
def test_pth_without_torch_says_how_to_convert(tmp_path):
  (tmp_path / "w.pth").write_bytes(b"")
  with pytest.raises(DataError, match="needs PyTorch.*python -m ncjax.torchvision_weights"):
    tw.load_state_dict(str(tmp_path / "w.pth"))
