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


def test_bfloat16_compute_keeps_float32_params_features_and_gradients():
  """config.model.dtype='bfloat16' (for GPU/TPU): convolutions and BatchNorm
  compute in bfloat16; parameters, BatchNorm statistics, the pooled features,
  the logits and the gradients stay float32 and agree with float32 compute
  to bfloat16 accuracy."""
  f32 = resnet.create("resnet10", width=8, stem="cifar", stage_sizes=(1, 1))
  bf16 = resnet.create("resnet10", width=8, stem="cifar", stage_sizes=(1, 1), dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(1), (16, 16, 16, 1))
  y = jnp.arange(16) % 2
  variables = jax.jit(f32.init)(jax.random.key(0), x)
  assert jax.tree.map(lambda a: a.dtype, jax.jit(bf16.init)(jax.random.key(0), x)) == jax.tree.map(
      lambda a: a.dtype, variables
  )

  def loss(params, model):
    (logits, feats), mutated = model.apply(
        {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
    )
    ce = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(16), y])
    return ce, (logits, feats, mutated["batch_stats"])

  grad_fn = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
  g32, (l32, f32_feats, s32) = grad_fn(variables["params"], f32)
  g16, (l16, f16_feats, s16) = grad_fn(variables["params"], bf16)
  assert f16_feats["stage2"].dtype == jnp.bfloat16 and f32_feats["stage2"].dtype == jnp.float32
  assert f16_feats["pre_logits"].dtype == jnp.float32 and l16.dtype == jnp.float32
  for tree in (g16, s16):
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(tree))
  scale = float(jnp.max(jnp.abs(l32)))
  assert float(jnp.max(jnp.abs(l16 - l32))) < 0.02 * scale + 0.01
  a = jnp.concatenate([v.ravel() for v in jax.tree.leaves(g32)])
  b = jnp.concatenate([v.ravel() for v in jax.tree.leaves(g16)])
  cosine = float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))
  assert cosine > 0.98, cosine
  # The same model in float32 with different params gives a far lower
  # cosine: the check can fail.
  other = jax.jit(f32.init)(jax.random.key(7), x)["params"]
  c = jnp.concatenate([v.ravel() for v in jax.tree.leaves(grad_fn(other, f32)[0])])
  assert float(a @ c / (jnp.linalg.norm(a) * jnp.linalg.norm(c))) < 0.9
