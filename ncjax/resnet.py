"""ResNets with torchvision's topology, in Flax Linen.

`resnet18/34/50` match torchvision layer for layer (7x7 stride-2 stem with
symmetric padding, 3x3 max-pool, BasicBlock / Bottleneck stages, global
average pool, one Dense head), so a torchvision state dict converts one to
one. Narrow variants (`width`, `stage_sizes`, a 3x3 "cifar" stem without
max-pool) train in seconds on a CPU at small resolutions.

Every model returns `(logits, features)` where `features` names the
intermediate activations the neural-collapse code can measure: `stem`,
`stage1`...`stageN` (spatial maps) and `pre_logits` (the pooled penultimate
layer, the paper's feature space).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

# torchvision: BatchNorm2d(momentum=0.1, eps=1e-5) == Flax momentum 0.9.
_BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)
_he_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(features: int, kernel: int, stride: int = 1, **kw) -> nn.Conv:
  # Symmetric padding as torchvision; 'SAME' would pad asymmetrically at
  # stride 2 and break weight conversion.
  pad = (kernel - 1) // 2
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      use_bias=False,
      kernel_init=_he_init,
      **kw,
  )


class BasicBlock(nn.Module):
  features: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(_BatchNorm, use_running_average=not train, dtype=self.dtype)
    residual = x
    y = _conv(self.features, 3, self.stride, dtype=self.dtype, name="conv1")(x)
    y = nn.relu(norm(name="bn1")(y))
    y = _conv(self.features, 3, dtype=self.dtype, name="conv2")(y)
    y = norm(name="bn2")(y)
    if residual.shape != y.shape:
      residual = _conv(self.features, 1, self.stride, dtype=self.dtype, name="downsample_conv")(x)
      residual = norm(name="downsample_bn")(residual)
    return nn.relu(y + residual)


class Bottleneck(nn.Module):
  features: int
  stride: int = 1
  dtype: Any = jnp.float32
  expansion: int = 4

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(_BatchNorm, use_running_average=not train, dtype=self.dtype)
    residual = x
    y = _conv(self.features, 1, dtype=self.dtype, name="conv1")(x)
    y = nn.relu(norm(name="bn1")(y))
    # torchvision v1.5: the stride sits on the 3x3 conv.
    y = _conv(self.features, 3, self.stride, dtype=self.dtype, name="conv2")(y)
    y = nn.relu(norm(name="bn2")(y))
    y = _conv(self.features * self.expansion, 1, dtype=self.dtype, name="conv3")(y)
    y = norm(name="bn3")(y)
    if residual.shape != y.shape:
      residual = _conv(
          self.features * self.expansion,
          1,
          self.stride,
          dtype=self.dtype,
          name="downsample_conv",
      )(x)
      residual = norm(name="downsample_bn")(residual)
    return nn.relu(y + residual)


class ResNet(nn.Module):
  """A ResNet returning (logits, named features)."""

  stage_sizes: Sequence[int]
  block: str = "basic"  # 'basic' or 'bottleneck'
  width: int = 64
  num_classes: int = 2
  stem: str = "imagenet"  # 'imagenet' (7x7/2 + max-pool) or 'cifar' (3x3/1)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[self.block]
    feats = {}
    x = x.astype(self.dtype)
    if self.stem == "imagenet":
      x = _conv(self.width, 7, 2, dtype=self.dtype, name="conv1")(x)
    else:
      x = _conv(self.width, 3, 1, dtype=self.dtype, name="conv1")(x)
    x = _BatchNorm(use_running_average=not train, dtype=self.dtype, name="bn1")(x)
    x = nn.relu(x)
    if self.stem == "imagenet":
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    feats["stem"] = x
    for i, n_blocks in enumerate(self.stage_sizes):
      for j in range(n_blocks):
        stride = 2 if i > 0 and j == 0 else 1
        x = block_cls(self.width * 2**i, stride, dtype=self.dtype, name=f"layer{i + 1}_{j}")(
            x, train
        )
      feats[f"stage{i + 1}"] = x
    x = jnp.mean(x, axis=(1, 2))
    # Features and logits in float32 whatever the compute dtype: the NC
    # metrics and the loss need the precision.
    x = x.astype(jnp.float32)
    feats["pre_logits"] = x
    logits = nn.Dense(self.num_classes, dtype=jnp.float32, name="fc")(x)
    return logits, feats


_STAGES = {
    "resnet10": ((1, 1, 1, 1), "basic"),
    "resnet18": ((2, 2, 2, 2), "basic"),
    "resnet34": ((3, 4, 6, 3), "basic"),
    "resnet50": ((3, 4, 6, 3), "bottleneck"),
}


def create(
    name: str,
    *,
    num_classes: int = 2,
    width: int = 64,
    stem: str = "imagenet",
    stage_sizes: Sequence[int] | None = None,
    dtype: Any = jnp.float32,
) -> ResNet:
  """A ResNet by name: resnet10/18/34/50; `stage_sizes` overrides the depth."""
  if name not in _STAGES:
    raise ValueError(f"unknown model {name!r}; expected one of {sorted(_STAGES)}")
  stages, block = _STAGES[name]
  return ResNet(
      stage_sizes=tuple(stage_sizes) if stage_sizes else stages,
      block=block,
      width=width,
      num_classes=num_classes,
      stem=stem,
      dtype=dtype,
  )


MODELS = tuple(_STAGES)
