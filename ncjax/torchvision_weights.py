"""torchvision ResNet state dicts -> Flax variables for `ncjax.resnet`.

`ncjax.resnet` copies torchvision's topology and layer names, so conversion
is a renaming plus layout changes:

  torchvision key                        Flax leaf
  conv1.weight            (O, I, H, W)   params/conv1/kernel        (H, W, I, O)
  bn1.weight / bias                      params/bn1/scale / bias
  bn1.running_mean / var                 batch_stats/bn1/mean / var
  layer2.0.conv1.weight                  params/layer2_0/conv1/kernel
  layer2.0.downsample.0.weight           params/layer2_0/downsample_conv/kernel
  layer2.0.downsample.1.*                .../layer2_0/downsample_bn/*
  fc.weight               (K, D)         params/fc/kernel           (D, K)
  fc.bias                                params/fc/bias

`*.num_batches_tracked` has no Flax counterpart and is ignored. Matching is
strict: the Flax tree of the target model is walked leaf by leaf, each leaf
takes exactly one torch entry of exactly the right shape, and every torch
entry must be used (bar the head when it is dropped), else a one-line
`ConfigError` names the key and the shapes.

Two adaptations for the paper's setting:
  * Head: ImageNet weights end in a 1000-class `fc`; `head_from` (or
    `init_from`'s default when the class counts differ) drops it and keeps
    the freshly initialised head of the target model instead.
  * Grayscale: with `in_channels=1`, a 3-channel `conv1` is summed over its
    input channels. A gray image replicated to RGB then gives exactly the
    activations of the original network, so pretrained features carry over
    (the usual adaptation, e.g. timm's `adapt_input_conv`). Input
    normalisation stays the pipeline's business: ImageNet weights expect
    ImageNet mean/std, which for one channel means their RGB averages.

Files: `.pth`/`.pt` via `torch.load` (torch is imported only there) and
`.npz` via numpy. Convert once where torch exists, train anywhere:

  python -m ncjax.torchvision_weights --input=resnet18-f37072fd.pth \\
      --output=resnet18.npz
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ncjax import resnet
from ncjax.errors import ConfigError, DataError

StateDict = dict[str, np.ndarray]

# Flax leaf name -> torchvision parameter / buffer name.
_LEAF_TO_TORCH = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}
_IGNORED_SUFFIX = ".num_batches_tracked"
_LAYER = re.compile(r"^layer(\d+)_(\d+)$")


def _to_numpy(value: Any) -> np.ndarray:
  # torch tensors need detaching (and moving to host) before numpy sees them.
  if hasattr(value, "detach"):
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def _normalise_keys(state_dict: Mapping[str, Any]) -> StateDict:
  """numpy values; a DataParallel `module.` prefix dropped."""
  out = {}
  for key, value in state_dict.items():
    if not isinstance(key, str):
      raise DataError(f"state dict keys must be strings, got {key!r}")
    out[key.removeprefix("module.")] = _to_numpy(value)
  return out


def load_state_dict(path: str) -> StateDict:
  """Reads a torchvision state dict from `.pth`/`.pt` (needs torch) or `.npz`."""
  if not os.path.isfile(path):
    raise DataError(f"torchvision weights {path!r} do not exist")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".npz":
    try:
      with np.load(path, allow_pickle=False) as data:
        return _normalise_keys({k: data[k] for k in data.files})
    except (OSError, ValueError) as e:
      raise DataError(f"cannot read {path!r} as .npz: {e}") from e
  if ext in (".pth", ".pt", ".bin"):
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise DataError(
          f"reading {path!r} needs PyTorch, which is not installed; convert it once "
          f"where torch is: python -m ncjax.torchvision_weights --input={path} "
          "--output=weights.npz, then use the .npz"
      ) from e
    try:
      loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(f"torch.load cannot read {path!r}: {e}") from e
    # Training checkpoints often wrap the weights; torchvision's do not.
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
      loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
      raise DataError(f"{path!r} holds a {type(loaded).__name__}, not a state dict")
    return _normalise_keys(loaded)
  raise DataError(f"torchvision weights {path!r}: expected a .pth, .pt or .npz file")


def save_npz(state_dict: Mapping[str, Any], path: str) -> None:
  """Writes a state dict (torchvision names) as `.npz`, readable without torch."""
  arrays = _normalise_keys(state_dict)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez(path, **arrays)


def infer_model_name(state_dict: Mapping[str, Any]) -> str:
  """resnet18/34/50 (or resnet10) from the blocks present in `state_dict`."""
  blocks: dict[int, set[int]] = {}
  bottleneck = False
  for key in state_dict:
    m = re.match(r"^(?:module\.)?layer(\d+)\.(\d+)\.(\w+)", key)
    if m:
      blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
      bottleneck |= m.group(3) in ("conv3", "bn3")
  sizes = tuple(len(blocks[i]) for i in sorted(blocks))
  kind = "bottleneck" if bottleneck else "basic"
  for name in resnet.MODELS:
    model = resnet.create(name)
    if (tuple(model.stage_sizes), model.block) == (sizes, kind):
      return name
  raise ConfigError(
      f"state dict is no torchvision ResNet ({kind} blocks per stage {sizes}); "
      f"expected one of {list(resnet.MODELS)}"
  )


def _torch_key(collection: str, path: tuple[str, ...]) -> str:
  """The torchvision name of one Flax leaf, e.g. layer2_0/downsample_bn/var."""
  *modules, leaf = path
  parts = []
  for module in modules:
    m = _LAYER.match(module)
    if m:
      parts += [f"layer{m.group(1)}", m.group(2)]
    elif module == "downsample_conv":
      parts += ["downsample", "0"]
    elif module == "downsample_bn":
      parts += ["downsample", "1"]
    else:
      parts.append(module)
  if leaf not in _LEAF_TO_TORCH or collection not in ("params", "batch_stats"):
    raise ConfigError(f"no torchvision counterpart for Flax {collection}/{'/'.join(path)}")
  return ".".join([*parts, _LEAF_TO_TORCH[leaf]])


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, (*prefix, key)))
    else:
      out[(*prefix, key)] = value
  return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def _to_flax(key: str, value: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
  """One torch array in Flax layout, adapting conv1's input channels."""
  if value.ndim == 4:
    # OIHW -> HWIO.
    value = value.transpose(2, 3, 1, 0)
    if key == "conv1.weight" and value.shape[2] == 3 and target_shape[2:3] == (1,):
      # Grayscale: conv(W, [g, g, g]) == conv(sum_c W_c, g).
      value = value.sum(axis=2, keepdims=True)
  elif value.ndim == 2:
    # Linear (K, D) -> Dense (D, K).
    value = value.T
  return value


def convert_to(
    state_dict: Mapping[str, Any],
    template: Mapping[str, Any],
    *,
    head_from: Mapping[str, Any] | None = None,
    model_name: str = "the model",
) -> dict[str, Any]:
  """Fills `template` ({'params', 'batch_stats'} with shapes) from `state_dict`.

  Args:
    state_dict: torchvision names -> arrays (torch tensors or numpy).
    template: variables or their `jax.eval_shape`; only shapes and dtypes are read.
    head_from: variables whose `fc` replaces torchvision's, which is then
      dropped unchecked; None converts torchvision's `fc`.
    model_name: for error messages.

  Returns:
    {'params', 'batch_stats'} as float32 numpy arrays, the template's structure.
  """
  state = _normalise_keys(state_dict)
  used: set[str] = set()
  filled: dict[str, dict[tuple[str, ...], np.ndarray]] = {}
  head = _flatten(head_from["params"]["fc"]) if head_from is not None else None
  for collection in ("params", "batch_stats"):
    if collection not in template:
      raise ConfigError(f"Flax template lacks the {collection!r} collection")
    filled[collection] = {}
    for path, leaf in _flatten(template[collection]).items():
      shape = tuple(leaf.shape)
      if head is not None and path[0] == "fc":
        value = np.asarray(head[path[1:]])
        if value.shape != shape:
          raise ConfigError(
              f"head_from fc/{'/'.join(path[1:])} has shape {value.shape}, "
              f"{model_name} needs {shape}"
          )
        filled[collection][path] = value
        continue
      key = _torch_key(collection, path)
      if key not in state:
        raise ConfigError(
            f"torchvision state dict lacks {key!r} for Flax {collection}/{'/'.join(path)} "
            f"{shape} of {model_name}"
        )
      if key in used:  # The mapping is one to one; guard it anyway.
        raise ConfigError(f"torchvision key {key!r} would fill two Flax leaves")
      value = _to_flax(key, state[key], shape)
      if value.shape != shape:
        raise ConfigError(
            f"torchvision {key!r} has shape {tuple(state[key].shape)} -> Flax "
            f"{collection}/{'/'.join(path)} {value.shape}, but {model_name} needs {shape}"
        )
      used.add(key)
      filled[collection][path] = value.astype(np.float32)
  unused = sorted(
      k
      for k in state
      if k not in used
      and not k.endswith(_IGNORED_SUFFIX)
      and not (head is not None and k.split(".")[0] == "fc")
  )
  if unused:
    more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
    raise ConfigError(
        f"torchvision key {unused[0]!r} {tuple(state[unused[0]].shape)} has no place "
        f"in {model_name}{more}"
    )
  return {c: _unflatten(flat) for c, flat in filled.items()}


def _template(model: resnet.ResNet, in_channels: int) -> dict[str, Any]:
  # Parameter shapes do not depend on the image size; 32x32 keeps every
  # stage at least 1x1 for the ImageNet stem.
  x = jax.ShapeDtypeStruct((1, 32, 32, in_channels), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def convert(
    state_dict: Mapping[str, Any],
    *,
    model_name: str | None = None,
    num_classes: int | None = None,
    in_channels: int = 3,
    head_from: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """A torchvision ResNet state dict as variables of `resnet.create(model_name)`.

  Args:
    state_dict: torchvision names -> arrays (torch tensors or numpy), e.g.
      `torch.load("resnet18-f37072fd.pth")`, `model.state_dict()` or
      `load_state_dict(path)`.
    model_name: resnet18/34/50; None infers it from the keys.
    num_classes: classes of the target head; None takes them from
      `head_from`, else from torchvision's `fc`.
    in_channels: input channels of the target; 1 with 3-channel weights sums
      conv1 over its input channels (see the module docstring).
    head_from: variables (e.g. a fresh `model.init`) whose `fc` is kept
      instead of torchvision's, which is dropped: ImageNet's 1000-class head
      is no use for a 2-class task.

  Returns:
    {'params', 'batch_stats'} of float32 numpy arrays for
    `resnet.create(model_name, num_classes=num_classes)`.
  """
  state = _normalise_keys(state_dict)
  model_name = model_name or infer_model_name(state)
  if num_classes is None:
    if head_from is not None:
      num_classes = int(np.shape(head_from["params"]["fc"]["bias"])[0])
    elif "fc.bias" in state:
      num_classes = int(state["fc.bias"].shape[0])
    else:
      raise ConfigError("torchvision state dict lacks 'fc.bias'; pass num_classes or head_from")
  if in_channels not in (1, 3):
    raise ConfigError(f"in_channels must be 1 or 3, got {in_channels}")
  model = resnet.create(model_name, num_classes=num_classes)
  return convert_to(
      state, _template(model, in_channels), head_from=head_from, model_name=model_name
  )


def _describe(model: resnet.ResNet) -> str:
  """'resnet18' for a named depth, else the fields that set the shapes."""
  for name in resnet.MODELS:
    ref = resnet.create(name)
    if (tuple(ref.stage_sizes), ref.block, ref.width, ref.stem) == (
        tuple(model.stage_sizes),
        model.block,
        model.width,
        model.stem,
    ):
      return name
  return (
      f"ResNet(stage_sizes={tuple(model.stage_sizes)}, block={model.block!r}, "
      f"width={model.width}, stem={model.stem!r})"
  )


def init_from(
    path: str | Mapping[str, Any],
    model: resnet.ResNet,
    variables: Mapping[str, Any],
    *,
    keep_head: bool | None = None,
) -> dict[str, Any]:
  """Freshly initialised `variables` with torchvision weights put in.

  For `config.model.init_from`. The target's shapes (channels, classes) are
  read off `variables` itself, so any `resnet.create(...)` whose topology is
  torchvision's fits.

  Args:
    path: a .pth/.pt/.npz file, or a state dict.
    model: the target model (named in errors).
    variables: its freshly initialised variables; collections other than
      'params' and 'batch_stats' pass through unchanged.
    keep_head: True converts torchvision's `fc`, False keeps the fresh head;
      None keeps the fresh one exactly when the class counts differ (the
      ImageNet -> K classes case).

  Returns:
    `variables` with every 'params'/'batch_stats' leaf replaced, as jax arrays.
  """
  state = load_state_dict(path) if isinstance(path, str) else _normalise_keys(path)
  fresh_classes = int(np.shape(variables["params"]["fc"]["bias"])[0])
  if keep_head is None:
    keep_head = "fc.bias" in state and state["fc.bias"].shape == (fresh_classes,)
  name = _describe(model)
  converted = convert_to(
      state, variables, head_from=None if keep_head else variables, model_name=name
  )
  out = dict(variables)
  for collection, tree in converted.items():
    dtypes = jax.tree.map(lambda x: x.dtype, variables[collection])
    out[collection] = jax.tree.map(lambda v, d: jnp.asarray(v, d), tree, dtypes)
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m ncjax.torchvision_weights",
      description="Converts a torchvision ResNet .pth to an .npz that needs no torch.",
  )
  parser.add_argument("--input", required=True, help="torchvision .pth (or .npz)")
  parser.add_argument("--output", required=True, help=".npz to write")
  parser.add_argument(
      "--model", default=None, help="resnet18/34/50 to check against; default: inferred"
  )
  args = parser.parse_args(argv)
  try:
    if not args.output.endswith(".npz"):
      raise ConfigError(f"--output must end in .npz, got {args.output!r}")
    state = load_state_dict(args.input)
    # Check the weights convert before writing anything.
    variables = convert(state, model_name=args.model)
    model_name = args.model or infer_model_name(state)
    kept = {k: v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIX)}
    save_npz(kept, args.output)
  except (ConfigError, DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  n = sum(x.size for x in jax.tree.leaves(variables["params"]))
  print(f"wrote {args.output}: {model_name}, {len(kept)} arrays, {n:,} parameters")
  return 0


if __name__ == "__main__":
  sys.exit(main())
