"""Checks `ncjax.torchvision_weights` against torchvision itself.

  PYTHON_WITH_TORCH benchmarks/check_torchvision_conversion.py [--model resnet18]

Needs a Python with torch and torchvision besides jax and flax; ncjax's
training never needs torch. One way without touching .venv:

  python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch torchvision
  PYTHONPATH=.:/tmp/torchvenv/lib/python3.11/site-packages \\
      .venv/bin/python benchmarks/check_torchvision_conversion.py

Builds torchvision's model with random weights in eval mode, randomises the
BatchNorm affine parameters and running statistics as well (at their init
values 1/0/0/1 a swapped scale/bias or mean/var would go unseen), saves the
state dict as a .pth, converts it with `load_state_dict` + `convert`, and
prints the largest absolute logit difference on the same 224x224 input. A
second check feeds a grayscale image: torch sees it replicated to RGB, Flax
sees one channel through the summed conv1. Exits 1 if either difference is
1e-4 or more.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import types

import jax
import numpy as np

from ncjax import resnet
from ncjax import torchvision_weights as tw

_TOLERANCE = 1e-4


def _import_torchvision():
  """torchvision, even where its C ops do not match the installed torch.

  PyPI's Linux torchvision is built against CUDA torch; beside a CPU-only
  torch its `_C` extension fails to load and importing torchvision dies
  registering fake kernels for ops that do not exist. The models are plain
  Python and need none of those ops, so the registrations are skipped.
  """
  try:
    import torchvision  # pylint: disable=import-outside-toplevel

    return torchvision
  except RuntimeError as e:
    if "torchvision::" not in str(e):
      raise
  for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
    del sys.modules[name]
  sys.modules["torchvision._meta_registrations"] = types.ModuleType(
      "torchvision._meta_registrations"
  )
  import torchvision  # pylint: disable=import-outside-toplevel

  print("note: torchvision's C ops do not load with this torch; models work without them")
  return torchvision


def _max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="resnet18", choices=["resnet18", "resnet34", "resnet50"])
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  import torch  # pylint: disable=import-outside-toplevel

  torchvision = _import_torchvision()
  torch.manual_seed(args.seed)
  torch.set_num_threads(os.cpu_count() or 1)
  net = getattr(torchvision.models, args.model)(weights=None).eval()
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.1)
        m.running_mean.normal_(0, 0.1)
        m.running_var.uniform_(0.5, 2.0)

  rng = np.random.default_rng(args.seed)
  x = rng.normal(size=(args.batch, 3, args.size, args.size)).astype(np.float32)
  gray = x[:, :1]
  with torch.no_grad():
    want = net(torch.from_numpy(x)).numpy()
    want_gray = net(torch.from_numpy(np.repeat(gray, 3, axis=1))).numpy()

  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, f"{args.model}.pth")
    torch.save(net.state_dict(), path)
    state = tw.load_state_dict(path)

  model = resnet.create(args.model, num_classes=1000)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
  got = apply(tw.convert(state, model_name=args.model), x.transpose(0, 2, 3, 1))
  got_gray = apply(tw.convert(state, in_channels=1), gray.transpose(0, 2, 3, 1))

  diff, diff_gray = _max_diff(got, want), _max_diff(got_gray, want_gray)
  print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, jax {jax.__version__}")
  print(
      f"{args.model}, {args.batch}x3x{args.size}x{args.size} float32, "
      f"|logits| max {np.abs(want).max():.3f}"
  )
  print(f"max abs logit difference, RGB:       {diff:.3e}")
  print(f"max abs logit difference, grayscale: {diff_gray:.3e}")
  ok = diff < _TOLERANCE and diff_gray < _TOLERANCE
  print("OK" if ok else f"FAIL: tolerance {_TOLERANCE}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
