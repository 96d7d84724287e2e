"""ResNet topology: torchvision parameter counts and named features."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from ncjax import resnet

# torchvision's ImageNet models (1000 classes), from its model cards.
_TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032}
_FEATURES = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}


def _count(model, shape):
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))
  return sum(x.size for x in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("name", sorted(_TORCHVISION_PARAMS))
def test_parameter_count_matches_torchvision_with_a_2_class_head(name):
  d = _FEATURES[name]
  expected = _TORCHVISION_PARAMS[name] - (d * 1000 + 1000) + (d * 2 + 2)
  assert _count(resnet.create(name), (1, 224, 224, 3)) == expected


def test_resnet18_two_class_count_is_the_published_number():
  assert _count(resnet.create("resnet18"), (1, 224, 224, 3)) == 11_177_538


def test_features_are_named_and_pre_logits_feeds_the_head():
  model = resnet.create("resnet10", width=4, stem="cifar", stage_sizes=(1, 1))
  x = jax.random.normal(jax.random.key(1), (3, 16, 16, 1))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  logits, feats = jax.jit(model.apply)(variables, x)
  assert logits.shape == (3, 2)
  assert set(feats) == {"stem", "stage1", "stage2", "pre_logits"}
  assert feats["stage2"].shape == (3, 8, 8, 8)
  w, b = variables["params"]["fc"]["kernel"], variables["params"]["fc"]["bias"]
  assert jnp.allclose(feats["pre_logits"] @ w + b, logits, atol=1e-5)
  assert jnp.allclose(feats["pre_logits"], feats["stage2"].mean(axis=(1, 2)), atol=1e-6)


def test_imagenet_stem_downsamples_by_four():
  model = resnet.create("resnet18", width=8)
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  _, feats = jax.eval_shape(model.apply, variables, x)
  assert feats["stem"].shape == (1, 16, 16, 8)
  assert feats["stage4"].shape == (1, 2, 2, 64)
