"""Training, NC, input and XLA-flag throughput of ncjax, in one table and JSON.

  .venv/bin/python benchmarks/benchmark.py --json bench.json     # CPU: ~15 min
  .venv/bin/python benchmarks/benchmark.py --quick --models synthetic   # smoke
  PYTHONPATH=/tmp/torch_site .venv/bin/python benchmarks/benchmark.py  # + torch

The same command runs on a GPU or TPU (`--dtypes float32,bfloat16` adds the
bfloat16 rows). Sections (`--sections`, comma separated; default all):

  machine    cores, CPU model, jax/jaxlib, backend, device kind, XLA_FLAGS
  train      samples/s summed over members of the real `ncjax.train.train_step`
             (jitted with donated state as train.py does), for the synthetic
             default (ResNet-10 width 8, stages (1,1,1), cifar stem, 24x24x1,
             batch 32, Adam 1e-3) and ResNet-18 at 224x224x3 (batch 32, no
             augmentation), with --members members as a loop of per-member
             calls and vmapped into one step; compile time (first call minus
             a steady call, and jax's backend-compile event), XLA's flop count
             and achieved TFLOP/s. A vmap whose estimated memory (members x
             one member's compiled footprint) exceeds the host or device is
             skipped with the estimate in the table.
  breakdown  where a step's time goes: forward, forward+backward and the whole
             step (jax, and torch if importable).
  convs      every convolution of the model alone, forward and forward+backward
             (jax, and torch), summed with their multiplicities: the share of
             the step that convolutions take.
  profile    a jax.profiler trace of a few steps of one member: XLA:CPU thread
             time per step by phase (forward, backward, optimizer) and kind of
             op (convolution, max-pool, reductions, elementwise, layout
             copies), from the compiled HLO's op names.
  nc         `benchmarks/nc_benchmark.py` at 10k x 512 features.
  input      device-resident batches (gather by a permutation, as train.py
             does) vs `ncjax.streaming` from array_record with grain, for the
             synthetic dataset and a temporary dataset of 224x224x3 images,
             against the samples/s the ResNet-18 step consumes.
  torch      optional (skipped with a note when `import torch` fails): the
             same ResNet-18 step and the synthetic epoch as a plain PyTorch
             loop over the members (float32, on CUDA if torch has it), each
             round interleaved with the same JAX measurement (default member
             strategy), and the median JAX/PyTorch ratio of --torch-repeats
             rounds.
  xla_flags  XLA:CPU only: the ResNet-18 and synthetic steps in a subprocess
             per XLA_FLAGS setting, interleaved over --xla-repeats rounds.
  compile    the main job (`ncjax.main`, synthetic default study) run twice
             with one persistent compilation cache, empty before the first:
             seconds spent compiling in each (the second loads from the cache).

Every section records the process's peak resident memory after it (maxrss).
Timings are wall clock after compilation; the machine's load shows in them
(the machine section records the load average): compare ratios of one run.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from configs import base as base_config  # noqa: E402  pylint: disable=wrong-import-position
from configs import synthetic as synthetic_config  # noqa: E402  pylint: disable=wrong-import-position
from ncjax import input_pipeline, runtime, streaming, train  # noqa: E402  pylint: disable=wrong-import-position

SECTIONS = (
    "machine",
    "train",
    "breakdown",
    "convs",
    "profile",
    "nc",
    "input",
    "torch",
    "xla_flags",
    "compile",
)
MODELS = ("synthetic", "resnet18")
XLA_FLAGSETS = {
    "none": "",
    # jaxlib 0.10's XLA:CPU runs convolutions in YNNPACK fusions; this sends
    # them to Eigen instead.
    "ynn_off": "--xla_cpu_experimental_ynn_fusion_type=",
    # YNNPACK for reductions only, convolutions in Eigen: ncjax's default
    # (configs/base.py CPU_XLA_FLAGS).
    "ynn_reduce": base_config.CPU_XLA_FLAGS,
    "ynn_reduce_eltwise": "--xla_cpu_experimental_ynn_fusion_type="
    "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_ELTWISE",
    "onednn_conv": "--xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
    "xnn_conv": "--xla_cpu_experimental_xnn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
    "eigen_single_thread": "--xla_cpu_multi_thread_eigen=false",
}
_WORKER_TAG = "XLA_WORKER_RESULT "


# ------------------------------------------------------------------ helpers


def _maxrss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _available_bytes() -> tuple[int, str]:
  """Memory a step may use: the device's limit, else the host's available."""
  stats = jax.devices()[0].memory_stats() or {}
  if jax.default_backend() != "cpu" and "bytes_limit" in stats:
    return int(stats["bytes_limit"]), "device"
  with open("/proc/meminfo") as f:
    for line in f:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024, "host"
  return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "host"


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def _flops(compiled) -> float | None:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list | tuple):
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def _footprint(compiled) -> int | None:
  """Bytes a compiled step holds while it runs (arguments, outputs, temps)."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return int(
      m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
      + m.temp_size_in_bytes
  )  # fmt: skip


def _import_torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel

    return torch, None
  except Exception as e:  # pylint: disable=broad-except
    return None, f"torch not importable ({type(e).__name__}: {e})"


def _torch_device(torch) -> str:
  """Where the torch rows run: the GPU when torch has one, else the CPU."""
  return "cuda" if torch.cuda.is_available() else "cpu"


def _torch_sync(torch, result=None):
  if torch.cuda.is_available():
    torch.cuda.synchronize()
  return result


def _default_strategy() -> str:
  """What `members.strategy='auto'` picks on this backend (train.py)."""
  return "loop" if jax.default_backend() == "cpu" else "vmap"


# ---------------------------------------------------------------- workloads


def model_config(model: str, dtype: str = "float32", image_size: int = 224):
  """(config, image shape, resident rows) of a benchmarked model."""
  config = synthetic_config.get_config()  # the synthetic default, locked
  config.model.dtype = dtype
  if model == "synthetic":
    s = config.dataset.synthetic.image_size
    return config, (s, s, 1), config.dataset.synthetic.num_train
  if model != "resnet18":
    raise ValueError(f"unknown model {model!r}; expected one of {MODELS}")
  config.model.name = "resnet18"
  config.model.width = 64
  config.model.stem = "imagenet"
  config.model.stage_sizes = ()
  config.dataset.mean = base_config.IMAGENET_MEAN
  config.dataset.std = base_config.IMAGENET_STD
  return config, (image_size, image_size, 3), 2 * config.batch_size


class Workload:
  """The step, its inputs and member states, built as train.py builds them."""

  def __init__(self, model: str, dtype: str, image_size: int):
    self.model_name, self.dtype = model, dtype
    config, self.image_shape, self.num_train = model_config(model, dtype, image_size)
    self.config, self.batch_size = config, config.batch_size
    self.model = train.create_model(config)
    self.tx = train.create_optimizer(config)
    preprocess, _ = train.make_preprocess(config)
    self.steps_per_epoch = self.num_train // self.batch_size
    self.step = functools.partial(
        train.train_step, model=self.model, tx=self.tx, batch_size=self.batch_size,
        steps_per_epoch=self.steps_per_epoch, preprocess=preprocess, batch_sharding=None,
    )  # fmt: skip
    self.perm = functools.partial(
        train.epoch_permutation, steps_per_epoch=self.steps_per_epoch, num_train=self.num_train
    )
    self.init = train.make_init_fn(self.model, self.tx, self.image_shape)
    rng = np.random.default_rng(0)
    self.images = jnp.asarray(
        rng.integers(0, 256, (self.num_train, *self.image_shape), dtype=np.uint8)
    )
    self.labels = jnp.asarray(rng.integers(0, 2, self.num_train, dtype=np.int32))

  def member_inputs(self, m: int):
    """(states, perms, labels, aug keys) of m members, as lists."""
    keys = [jax.random.split(jax.random.key(i), 3) for i in range(m)]
    states = [self.init(k[0]) for k in keys]
    perm_fn = jax.jit(self.perm)
    perms = [perm_fn(s, k[1]) for s, k in zip(states, keys, strict=True)]
    return states, perms, [self.labels] * m, [k[2] for k in keys]

  def one_member_footprint(self) -> int | None:
    """Compiled bytes of one member's step (from jit's cache if it ran)."""
    states, perms, labels, augs = self.member_inputs(1)
    fn = jax.jit(self.step, donate_argnums=0)
    return _footprint(fn.lower(states[0], perms[0], labels[0], augs[0], self.images).compile())


def _accumulate(total, metrics):
  return metrics if total is None else jax.tree.map(jnp.add, total, metrics)


def measure_train(w: Workload, members: int, strategy: str, steps: int,
                  max_seconds: float) -> dict[str, Any]:  # fmt: skip
  """samples/s of `members` members for `steps` steps each (train.py's loop)."""
  row: dict[str, Any] = {"model": w.model_name, "dtype": w.dtype, "members": members,
                         "strategy": strategy, "batch": w.batch_size,
                         "image": "x".join(map(str, w.image_shape))}  # fmt: skip
  if strategy == "vmap" and members > 1:
    one = w.one_member_footprint()
    limit, where = _available_bytes()
    if one is not None:
      row["memory_estimate_gb"] = round(members * one / 2**30, 2)
      if members * one > 0.8 * limit:
        row["skipped"] = (
            f"est. {members * one / 2**30:.1f} GiB > 80% of {where} memory "
            f"available ({limit / 2**30:.1f} GiB)"
        )
        return row
  states, perms, labels, augs = w.member_inputs(members)
  if strategy == "loop":
    fn = jax.jit(w.step, donate_argnums=0)
    args = lambda i: (perms[i], labels[i], augs[i], w.images)  # noqa: E731
  else:
    fn = jax.jit(jax.vmap(w.step, in_axes=(0, 0, 0, 0, None)), donate_argnums=0)
    states = [jax.tree.map(lambda *xs: jnp.stack(xs), *states)]
    stacked = (jnp.stack(perms), jnp.stack(labels), jnp.stack(augs), w.images)
    args = lambda i: stacked  # noqa: E731

  # First call (trace, compile, run), then one steady call of the same member.
  compile_before = runtime.compile_seconds()
  t0 = time.perf_counter()
  states[0], metrics = fn(states[0], *args(0))
  jax.block_until_ready(metrics)
  first = time.perf_counter() - t0
  backend_compile = runtime.compile_seconds() - compile_before
  t0 = time.perf_counter()
  states[0], metrics = fn(states[0], *args(0))
  jax.block_until_ready(metrics)
  steady = time.perf_counter() - t0
  compiled = fn.lower(states[0], *args(0)).compile()  # jit's cached executable

  # Timed: every member's steps in turn (train.py's loop), metrics summed.
  done_steps, t0 = 0, time.perf_counter()
  for i in range(len(states)):
    total = None
    for _ in range(steps):
      states[i], metrics = fn(states[i], *args(i))
      total = _accumulate(total, metrics)
      if strategy == "vmap":
        jax.block_until_ready(total)
        done_steps += 1
        if time.perf_counter() - t0 > max_seconds:
          break
    jax.block_until_ready((states[i], total))
    if strategy == "loop":
      done_steps += steps
      if time.perf_counter() - t0 > max_seconds:
        break
  seconds = time.perf_counter() - t0
  per_step_samples = w.batch_size * (members if strategy == "vmap" else 1)
  samples = done_steps * per_step_samples
  flops = _flops(compiled)
  row.update({
      "steps_timed": done_steps,
      "seconds": seconds,
      "samples_per_s": samples / seconds,
      "step_ms": 1e3 * seconds / done_steps,
      "compile_s": max(first - steady, 0.0),
      "backend_compile_s": backend_compile,
      "first_call_s": first,
      "gflop_per_step": flops / 1e9 if flops else None,
      "tflops": flops * done_steps / seconds / 1e12 if flops else None,
  })  # fmt: skip
  footprint = _footprint(compiled)
  if footprint is not None:
    row["memory_estimate_gb"] = round(footprint / 2**30, 3)
  return row


def measure_breakdown(w: Workload, steps: int) -> dict[str, Any]:
  """Milliseconds of forward, forward+backward and the whole step (1 member)."""
  states, perms, labels, augs = w.member_inputs(1)
  state = states[0]
  preprocess, _ = train.make_preprocess(w.config)
  x = preprocess(w.images[: w.batch_size], augs[0])
  y = w.labels[: w.batch_size]

  def loss(params, batch_stats):
    (logits, _), mutated = w.model.apply(
        {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y]), mutated

  fns = {
      "forward_ms": jax.jit(loss),
      "fwd_bwd_ms": jax.jit(jax.value_and_grad(loss, has_aux=True)),
  }
  out: dict[str, Any] = {"model": w.model_name, "dtype": w.dtype, "framework": "jax"}
  for name, fn in fns.items():
    jax.block_until_ready(fn(state.params, state.batch_stats))
    t0 = time.perf_counter()
    for _ in range(steps):
      r = fn(state.params, state.batch_stats)
    jax.block_until_ready(r)
    out[name] = 1e3 * (time.perf_counter() - t0) / steps
  step = jax.jit(w.step, donate_argnums=0)
  state, m = step(state, perms[0], labels[0], augs[0], w.images)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, perms[0], labels[0], augs[0], w.images)
  jax.block_until_ready(state)
  out["step_ms"] = 1e3 * (time.perf_counter() - t0) / steps
  return out


def conv_layers(model: str, image_size: int) -> list[tuple[int, int, int, int, int, int]]:
  """(input size, in channels, out channels, kernel, stride, count) of every
  convolution of a benchmarked model, as `ncjax.resnet` builds it."""
  config, shape, _ = model_config(model, "float32", image_size)
  width, stem = config.model.width, config.model.stem
  stages = tuple(config.model.stage_sizes) or (2, 2, 2, 2)
  size = shape[0]
  layers = {}

  def add(h, cin, cout, k, stride):
    key = (h, cin, cout, k, stride)
    layers[key] = layers.get(key, 0) + 1

  if stem == "imagenet":
    add(size, shape[-1], width, 7, 2)
    size = (size + 1) // 2
    size = (size + 1) // 2  # max-pool
  else:
    add(size, shape[-1], width, 3, 1)
  cin = width
  for i, n in enumerate(stages):
    for j in range(n):
      cout, stride = width * 2**i, 2 if i > 0 and j == 0 else 1
      add(size, cin, cout, 3, stride)
      out = (size + 1) // 2 if stride == 2 else size
      add(out, cout, cout, 3, 1)
      if stride != 1 or cin != cout:
        add(size, cin, cout, 1, stride)
      size, cin = out, cout
  return [(*k, n) for k, n in layers.items()]


def _time_ms(fn, repeats: int, sync=lambda r: r) -> float:
  sync(fn())
  best = math.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    sync(fn())
    best = min(best, time.perf_counter() - t0)
  return 1e3 * best


def measure_convs(model: str, image_size: int, repeats: int, torch=None) -> list[dict[str, Any]]:
  """Each convolution alone (batch 32, float32): forward and forward+backward
  (the first layer's input needs no gradient, as in training)."""
  rows = []
  first = True
  for h, cin, cout, k, stride, count in conv_layers(model, image_size):
    pad = (k - 1) // 2
    x = jnp.ones((32, h, h, cin))
    w = jnp.full((k, k, cin, cout), 0.01)
    conv = lambda x, w, s=stride, p=pad: jax.lax.conv_general_dilated(  # noqa: E731
        x, w, (s, s), ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    fwd = jax.jit(conv)
    # value_and_grad: the gradient of a sum needs no forward output, so
    # without the value XLA would drop the forward.
    bwd = jax.jit(
        jax.value_and_grad(lambda x, w, c=conv: c(x, w).sum(), argnums=1 if first else (0, 1))
    )
    row = {"model": model, "input": f"{h}x{h}x{cin}", "out_channels": cout, "kernel": k,
           "stride": stride, "count": count,
           "gflop": 2 * 32 * (-(-h // stride)) ** 2 * k * k * cin * cout / 1e9,
           "jax_fwd_ms": _time_ms(functools.partial(fwd, x, w), repeats, jax.block_until_ready),
           "jax_fwd_bwd_ms": _time_ms(functools.partial(bwd, x, w), repeats, jax.block_until_ready)}  # fmt: skip
    if torch is not None:
      dev = _torch_device(torch)
      tx = torch.ones(32, cin, h, h, device=dev, requires_grad=not first)
      tw = torch.full((cout, cin, k, k), 0.01, device=dev, requires_grad=True)
      tconv = lambda tx=tx, tw=tw, s=stride, p=pad: torch.nn.functional.conv2d(  # noqa: E731
          tx, tw, stride=s, padding=p
      )

      def tfb(tconv=tconv):
        tconv().sum().backward()

      sync = functools.partial(_torch_sync, torch)
      with torch.no_grad():
        row["torch_fwd_ms"] = _time_ms(tconv, repeats, sync)
      row["torch_fwd_bwd_ms"] = _time_ms(tfb, repeats, sync)
    rows.append(row)
    first = False
  return rows


_OP_NAME = re.compile(r'%([\w.\-]+) = [^\n]*?metadata=\{op_name="([^"]+)"')


def _op_kind(op_name: str) -> str:
  last = op_name.rsplit("/", 1)[-1]
  if "conv_general_dilated" in last:
    return "convolution"
  if "reduce_window" in last or "select_and_scatter" in last or "max_pool" in op_name:
    return "max-pool"
  if last.startswith(("reduce", "argmax", "argmin")) or last in ("mean", "var"):
    return "reductions"
  if last.startswith(("transpose", "copy")):
    return "layout copies"
  if last.startswith(("gather", "dynamic_slice", "convert_element_type")) and "jvp(" not in op_name:
    return "input"
  return "elementwise"


def _op_phase(op_name: str) -> str:
  if "transpose(" in op_name:
    return "backward"
  if "jvp(" in op_name:
    return "forward"
  return "optimizer/other"


def measure_profile(w: Workload, steps: int, directory: str) -> dict[str, Any]:
  """XLA:CPU thread time per step by (phase, kind), from a profiler trace."""
  states, perms, labels, augs = w.member_inputs(1)
  fn = jax.jit(w.step, donate_argnums=0)
  state = states[0]
  args = (perms[0], labels[0], augs[0], w.images)
  for _ in range(2):
    state, m = fn(state, *args)
    jax.block_until_ready(m)
  op_names = dict(_OP_NAME.findall(fn.lower(state, *args).compile().as_text()))
  t0 = time.perf_counter()
  with jax.profiler.trace(directory):
    for _ in range(steps):
      state, m = fn(state, *args)
    jax.block_until_ready(state)
  wall = (time.perf_counter() - t0) / steps
  (path,) = sorted(glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True))[-1:]
  by: dict[tuple[str, str], float] = {}
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    for line in plane.lines:
      for event in line.events:
        op = op_names.get(event.name)
        if op is not None:
          key = (_op_phase(op), _op_kind(op))
          by[key] = by.get(key, 0.0) + event.duration_ns / 1e6 / steps
  total = sum(by.values())
  rows = [{"model": w.model_name, "phase": p, "kind": k, "thread_ms": v, "share": v / total}
          for (p, k), v in sorted(by.items(), key=lambda kv: -kv[1])]  # fmt: skip
  return {"rows": rows, "thread_ms_per_step": total, "wall_ms_per_step": 1e3 * wall}


# --------------------------------------------------------------------- torch


def torch_resnet(torch, *, stage_sizes, width: int, stem: str, in_channels: int):
  """torchvision's ResNet with BasicBlocks, in plain torch (2 classes)."""
  nn = torch.nn

  class Block(nn.Module):

    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.down = None
      if stride != 1 or cin != cout:
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      return torch.relu(y + (x if self.down is None else self.down(x)))

  layers = (
      [nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)]
      if stem == "imagenet"
      else [nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)]
  )
  layers += [nn.BatchNorm2d(width), nn.ReLU()]
  if stem == "imagenet":
    layers.append(nn.MaxPool2d(3, 2, 1))
  cin = width
  for i, n in enumerate(stage_sizes):
    for j in range(n):
      cout = width * 2**i
      layers.append(Block(cin, cout, 2 if i > 0 and j == 0 else 1))
      cin = cout
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 2)]
  return nn.Sequential(*layers)


def _torch_setup(torch, model: str, image_size: int, members: int):
  config, shape, n = model_config(model, "float32", image_size)
  stages = tuple(config.model.stage_sizes) or (2, 2, 2, 2)
  make = lambda: torch_resnet(  # noqa: E731
      torch, stage_sizes=stages, width=config.model.width, stem=config.model.stem,
      in_channels=shape[-1],
  )  # fmt: skip
  dev = _torch_device(torch)
  gen = torch.Generator().manual_seed(0)
  images = torch.randint(
      0, 256, (n, shape[2], shape[0], shape[1]), dtype=torch.uint8, generator=gen
  )
  labels = torch.randint(0, 2, (n,), generator=gen)
  mean = torch.tensor(config.dataset.mean).view(1, -1, 1, 1)
  std = torch.tensor(config.dataset.std).view(1, -1, 1, 1)
  images, labels, mean, std = (t.to(dev) for t in (images, labels, mean, std))
  lr = config.optimizer.learning_rate
  models = []
  for i in range(members):
    torch.manual_seed(i)
    m = make().to(dev).train()
    models.append((m, torch.optim.Adam(m.parameters(), lr=lr)))
  return config.batch_size, images, labels, mean, std, models


def measure_torch(torch, model: str, members: int, steps: int, image_size: int,
                  max_seconds: float) -> dict[str, Any]:  # fmt: skip
  """samples/s of the same training loop in plain PyTorch (float32)."""
  b, images, labels, mean, std, models = _torch_setup(torch, model, image_size, members)
  n = len(labels)
  loss_fn = torch.nn.CrossEntropyLoss()

  def run(m, opt, i, perm, total):
    idx = perm[(i % (n // b)) * b : (i % (n // b) + 1) * b]
    x = (images[idx].float() / 255.0 - mean) / std
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(m(x), labels[idx])
    loss.backward()
    opt.step()
    return total + loss.detach()

  dev = _torch_device(torch)
  new_epoch = lambda: (torch.randperm(n, device=dev), torch.zeros((), device=dev))  # noqa: E731
  float(run(*models[0], 0, *new_epoch()))  # warm-up
  done, t0 = 0, time.perf_counter()
  for m, opt in models:
    perm, total = new_epoch()
    for i in range(steps):
      total = run(m, opt, i, perm, total)
    float(total)  # waits for the member's steps
    done += steps
    if time.perf_counter() - t0 > max_seconds:
      break
  seconds = time.perf_counter() - t0
  return {
      "model": model, "members": members, "strategy": "torch loop", "steps_timed": done,
      "seconds": seconds, "samples_per_s": done * b / seconds, "step_ms": 1e3 * seconds / done,
      "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
      "device": dev,
  }  # fmt: skip


def measure_torch_breakdown(torch, model: str, image_size: int, steps: int) -> dict[str, Any]:
  b, images, labels, mean, std, models = _torch_setup(torch, model, image_size, 1)
  m, opt = models[0]
  x = (images[:b].float() / 255.0 - mean) / std
  y = labels[:b]
  loss_fn = torch.nn.CrossEntropyLoss()

  def forward():
    return loss_fn(m(x), y)

  def fwd_bwd():
    opt.zero_grad(set_to_none=True)
    forward().backward()

  def step():
    fwd_bwd()
    opt.step()

  out: dict[str, Any] = {"model": model, "dtype": "float32", "framework": "torch"}
  for name, fn in (("forward_ms", forward), ("fwd_bwd_ms", fwd_bwd), ("step_ms", step)):
    _torch_sync(torch, fn())
    t0 = time.perf_counter()
    for _ in range(steps):
      fn()
    _torch_sync(torch)
    out[name] = 1e3 * (time.perf_counter() - t0) / steps
  return out


# --------------------------------------------------------------------- input


def _resident_rate(images: jax.Array, batch: int, epochs: int) -> float:
  """samples/s of gathering batches by a permutation from a device array."""
  n = images.shape[0]
  gather = jax.jit(
      lambda images, perm, i: images[jax.lax.dynamic_slice_in_dim(perm, i * batch, batch)]
  )
  perm = jax.random.permutation(jax.random.key(0), n)
  steps = n // batch
  jax.block_until_ready(gather(images, perm, 0))
  best = math.inf
  for _ in range(epochs):
    t0 = time.perf_counter()
    for i in range(steps):
      out = gather(images, perm, i)
    jax.block_until_ready(out)
    best = min(best, time.perf_counter() - t0)
  return steps * batch / best


def _streaming_rate(split: streaming.StreamingSplit, epochs: int) -> float:
  """samples/s of streaming epochs to the device (best epoch)."""
  best = math.inf
  for epoch in range(epochs):
    t0 = time.perf_counter()
    with split.batches(epoch) as it:
      for batch in it:
        jax.block_until_ready(batch)
    best = min(best, time.perf_counter() - t0)
  return split.steps_per_epoch * split.batch_size / best


def write_image_dataset(directory: str, n: int, size: int, shards: int = 2):
  """array_record files of n uint8 size x size x 3 images, serialized as TFDS
  does (tf.train.Example protos, zlib-encoded tensors), and their features.

  Images are 8x8-pixel blocks plus noise, so zlib has work to do (random
  bytes would be stored uncompressed)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel

  features = tfds.features.FeaturesDict({
      "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8,
                                    encoding=tfds.features.Encoding.ZLIB),
      "label": tfds.features.Scalar(dtype=np.int64),
      "id": tfds.features.Text(),
  })  # fmt: skip
  rng = np.random.default_rng(0)
  paths = [os.path.join(directory, f"images-train.array_record-{s:05d}-of-{shards:05d}")
           for s in range(shards)]  # fmt: skip
  writers = [array_record_module.ArrayRecordWriter(p, "group_size:1") for p in paths]
  for i in range(n):
    blocks = rng.integers(0, 256, (size // 8, size // 8, 3))
    image = np.repeat(np.repeat(blocks, 8, 0), 8, 1) + rng.integers(-8, 9, (size, size, 3))
    example = {"image": np.clip(image, 0, 255).astype(np.uint8),
               "label": int(rng.integers(0, 2)), "id": f"img-{i:06d}"}  # fmt: skip
    writers[i % shards].write(features.serialize_example(example))
  for w in writers:
    w.close()
  return paths, features


# -------------------------------------------------------------------- tables


def print_table(title: str, rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]):
  """columns: (key, header, format)."""
  if not rows:
    return
  print(f"\n== {title}")

  def cell(row, key, fmt):
    v = row.get(key)
    if v is None:
      return "-"
    if isinstance(v, float) and not math.isfinite(v):
      return str(v)
    return format(v, fmt) if fmt else str(v)

  cells = [[cell(r, k, f) for k, _, f in columns] for r in rows]
  widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h, _) in enumerate(columns)]
  print("  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths, strict=True)))
  for c, r in zip(cells, rows, strict=True):
    line = "  ".join(v.rjust(w) for v, w in zip(c, widths, strict=True))
    print(line + (f"  [{r['skipped']}]" if r.get("skipped") else ""))


TRAIN_COLUMNS = [
    ("model", "model", ""), ("dtype", "dtype", ""), ("members", "M", ""),
    ("strategy", "strategy", ""), ("steps_timed", "steps", ""),
    ("samples_per_s", "samples/s", ".1f"), ("step_ms", "ms/step", ".1f"),
    ("compile_s", "compile s", ".2f"), ("backend_compile_s", "backend s", ".2f"),
    ("gflop_per_step", "GFLOP/step", ".2f"), ("tflops", "TFLOP/s", ".3f"),
    ("memory_estimate_gb", "mem GiB", ".2f"),
]  # fmt: skip


# ------------------------------------------------------------------ sections


def section_machine(args) -> dict[str, Any]:
  import jaxlib  # pylint: disable=import-outside-toplevel

  dev = jax.devices()[0]
  out = {
      "cores": os.cpu_count(),
      "cores_usable": len(os.sched_getaffinity(0)),
      "cpu_model": _cpu_model(),
      "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
      "backend": jax.default_backend(),
      "device_kind": dev.device_kind,
      "device_count": jax.device_count(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "load_average": list(os.getloadavg()),
      "python": platform.python_version(),
  }
  torch, _ = _import_torch()
  if torch is not None:
    out["torch"] = torch.__version__
    out["torch_threads"] = torch.get_num_threads()
  print("\n== machine")
  for k, v in out.items():
    print(f"  {k:>14}: {v}")
  return out


def section_train(args) -> dict[str, Any]:
  rows = []
  for model in args.models:
    members = args.resnet_members if model == "resnet18" else args.members
    steps = args.resnet_steps if model == "resnet18" else args.steps
    for dtype in args.dtypes:
      w = Workload(model, dtype, args.resnet_image_size)
      for strategy in args.strategies:
        for m in members:
          row = measure_train(w, m, strategy, steps, args.max_seconds)
          rows.append(row)
          print_table(f"train {model} {dtype} {strategy} M={m}", [row], TRAIN_COLUMNS)
  print_table("train (all)", rows, TRAIN_COLUMNS)
  return {"rows": rows, "default_strategy": _default_strategy()}


def section_breakdown(args) -> dict[str, Any]:
  rows = []
  torch, note = _import_torch()
  steps = {"synthetic": max(3, args.steps // 4), "resnet18": max(1, args.resnet_steps)}
  for model in args.models:
    rows.append(measure_breakdown(Workload(model, "float32", args.resnet_image_size), steps[model]))
    if torch is not None:
      rows.append(measure_torch_breakdown(torch, model, args.resnet_image_size, steps[model]))
  for r in rows:
    r["backward_ms"] = r["fwd_bwd_ms"] - r["forward_ms"]
    r["optimizer_ms"] = r["step_ms"] - r["fwd_bwd_ms"]
  print_table("breakdown (1 member, float32, ms)", rows, [
      ("model", "model", ""), ("framework", "framework", ""),
      ("forward_ms", "forward", ".2f"), ("backward_ms", "backward", ".2f"),
      ("optimizer_ms", "rest of step", ".2f"), ("step_ms", "step", ".2f"),
  ])  # fmt: skip
  return {"rows": rows, "note": note}


def section_convs(args, results) -> dict[str, Any]:
  torch, note = _import_torch()
  rows, totals = [], []
  for model in args.models:
    repeats = 2 if model == "resnet18" else 5
    model_rows = measure_convs(model, args.resnet_image_size, repeats, torch)
    rows += model_rows
    total = {"model": model}
    for key in ("jax_fwd_ms", "jax_fwd_bwd_ms", "torch_fwd_ms", "torch_fwd_bwd_ms"):
      if key in model_rows[0]:
        total[key] = sum(r[key] * r["count"] for r in model_rows)
    steps = {(r["model"], r["framework"]): r["step_ms"]
             for r in results.get("breakdown", {}).get("rows", [])}  # fmt: skip
    for fw in ("jax", "torch"):
      if (model, fw) in steps and f"{fw}_fwd_bwd_ms" in total:
        total[f"{fw}_step_ms"] = steps[(model, fw)]
        total[f"{fw}_conv_share"] = total[f"{fw}_fwd_bwd_ms"] / steps[(model, fw)]
    totals.append(total)
  print_table("convs (each alone, batch 32, float32; ms, best of repeats)", rows, [
      ("model", "model", ""), ("input", "input", ""), ("out_channels", "out", ""),
      ("kernel", "k", ""), ("stride", "s", ""), ("count", "x", ""), ("gflop", "GFLOP", ".2f"),
      ("jax_fwd_ms", "jax fwd", ".1f"), ("jax_fwd_bwd_ms", "jax fwd+bwd", ".1f"),
      ("torch_fwd_ms", "torch fwd", ".1f"), ("torch_fwd_bwd_ms", "torch fwd+bwd", ".1f"),
  ])  # fmt: skip
  print_table("convs summed over the model (ms) and their share of the step", totals, [
      ("model", "model", ""), ("jax_fwd_ms", "jax fwd", ".1f"),
      ("jax_fwd_bwd_ms", "jax fwd+bwd", ".1f"), ("jax_step_ms", "jax step", ".1f"),
      ("jax_conv_share", "jax share", ".2f"), ("torch_fwd_ms", "torch fwd", ".1f"),
      ("torch_fwd_bwd_ms", "torch fwd+bwd", ".1f"), ("torch_step_ms", "torch step", ".1f"),
      ("torch_conv_share", "torch share", ".2f"),
  ])  # fmt: skip
  return {"rows": rows, "totals": totals, "note": note}


def section_profile(args) -> dict[str, Any]:
  out, rows = {}, []
  steps = {"synthetic": max(5, args.steps // 4), "resnet18": max(1, args.resnet_steps - 1)}
  for model in args.models:
    with tempfile.TemporaryDirectory() as tmp:
      directory = args.profile_dir and os.path.join(args.profile_dir, model) or tmp
      result = measure_profile(Workload(model, "float32", args.resnet_image_size),
                               steps[model], directory)  # fmt: skip
    out[model] = result
    rows += [r for r in result["rows"] if r["share"] >= 0.01]
    print(
        f"  {model}: {result['wall_ms_per_step']:.1f} ms/step wall, "
        f"{result['thread_ms_per_step']:.1f} ms/step XLA thread time"
    )
  # Convolutions that XLA:CPU hands to Eigen (ncjax's default CPU flags) run
  # in Eigen's thread pool and are not in the trace: the `convs` section
  # times them.
  print_table("profile (XLA:CPU thread time per step, ops with >= 1%; Eigen "
              "convolutions are not traced)", rows, [
      ("model", "model", ""), ("phase", "phase", ""), ("kind", "kind", ""),
      ("thread_ms", "ms", ".1f"), ("share", "share", ".2f"),
  ])  # fmt: skip
  return out


def section_nc(args) -> dict[str, Any]:
  """`ncjax.neural_collapse` on N x 512 features (nc_benchmark.py's workload):
  `compute` (all keys, float64-accurate) and the in-training f32 kernel, and
  unless --quick the numpy/scipy reference and the largest relative error."""
  import nc_benchmark  # pylint: disable=import-outside-toplevel

  from ncjax import neural_collapse as nc  # pylint: disable=import-outside-toplevel

  feats, labels, groups, w, b = nc_benchmark.make_problem(args.nc_rows, 512)
  with jax.enable_x64(True):
    on_device = jax.device_put(feats)
  compute = lambda: nc.compute(on_device, labels, w, b, groups)  # noqa: E731
  compute()
  row: dict[str, Any] = {"n": args.nc_rows, "d": 512}
  row["compute_s"], got = nc_benchmark.best_time(compute, args.nc_repeats)
  kernel = jax.jit(nc.make_metrics_fn(num_classes=2, num_groups=2))
  dev_args = [jax.device_put(a) for a in (feats, labels, groups, w, b)]
  in_training = lambda: jax.block_until_ready(kernel(*dev_args))  # noqa: E731
  in_training()
  row["in_training_s"], _ = nc_benchmark.best_time(in_training, args.nc_repeats)
  if not args.quick:
    row["reference_s"], ref = nc_benchmark.best_time(
        lambda: nc_benchmark.reference(feats, labels, w, b, groups), 1
    )
    row["max_rel_err"], row["matches"] = nc_benchmark.max_rel_error(got, ref)
    row["speedup_vs_reference"] = row["reference_s"] / row["compute_s"]
  print_table(f"nc ({args.nc_rows} x 512, 2 classes, 2 groups; seconds, best of "
              f"{args.nc_repeats})", [row], [
      ("compute_s", "compute", ".4f"), ("in_training_s", "in-training f32", ".4f"),
      ("reference_s", "numpy/scipy", ".3f"), ("speedup_vs_reference", "x ref", ".1f"),
      ("max_rel_err", "max rel err", ".1e"),
  ])  # fmt: skip
  return row


def section_input(args, results) -> dict[str, Any]:
  rows = []
  b = 32
  # The synthetic default's train split (generated on first use; --quick:
  # the tests' tiny one, quicker to generate).
  config = synthetic_config.get_config("tiny" if args.quick else None)
  if args.data_dir:
    config.dataset.data_dir = args.data_dir
  host = input_pipeline.load(config)["train"]
  name = "synthetic " + "x".join(map(str, host.images.shape[1:]))
  rows.append({"data": name, "path": "device-resident gather",
               "samples_per_s": _resident_rate(jnp.asarray(host.images), b, args.input_epochs)})  # fmt: skip
  for threads, workers in args.stream_settings:
    t0 = time.perf_counter()
    split = streaming.StreamingSplit.from_config(
        config, "train", batch_size=b, num_threads=threads, num_workers=workers
    )
    rows.append({"data": name, "path": "streaming array_record",
                 "threads": threads, "workers": workers, "open_s": time.perf_counter() - t0,
                 "samples_per_s": _streaming_rate(split, args.input_epochs)})  # fmt: skip
  s = args.resnet_image_size
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    paths, features = write_image_dataset(tmp, args.input_images, s)
    write_s = time.perf_counter() - t0
    mb = sum(os.path.getsize(p) for p in paths) / 2**20
    images = jnp.asarray(np.stack([
        features.deserialize_example_np(r)["image"]
        for r in grain.sources.ArrayRecordDataSource(paths)
    ]))  # fmt: skip
    rows.append({"data": f"{args.input_images} x {s}x{s}x3", "path": "device-resident gather",
                 "samples_per_s": _resident_rate(images, b, args.input_epochs)})  # fmt: skip
    del images
    for threads, workers in args.stream_settings:
      t0 = time.perf_counter()
      split = streaming.StreamingSplit(
          paths, features, batch_size=b, num_threads=threads, num_workers=workers
      )
      rows.append({"data": f"{args.input_images} x {s}x{s}x3", "path": "streaming array_record",
                   "threads": threads, "workers": workers, "open_s": time.perf_counter() - t0,
                   "file_mb": mb, "write_s": write_s,
                   "samples_per_s": _streaming_rate(split, args.input_epochs)})  # fmt: skip
  consumed = _resnet_consumption(results)
  for r in rows:
    if consumed and r["data"].endswith("x3"):
      r["x_resnet18_step"] = r["samples_per_s"] / consumed
  print_table(f"input (batch {b}; samples/s, best of {args.input_epochs} epochs)", rows, [
      ("data", "data", ""), ("path", "path", ""), ("threads", "threads", ""),
      ("workers", "workers", ""), ("open_s", "open s", ".2f"),
      ("samples_per_s", "samples/s", ".0f"), ("x_resnet18_step", "x ResNet-18 step", ".1f"),
  ])  # fmt: skip
  if consumed:
    print(f"  ResNet-18 step consumes {consumed:.1f} samples/s (fastest float32 loop row)")
  return {"rows": rows, "resnet18_step_samples_per_s": consumed}


def _resnet_consumption(results) -> float | None:
  """Samples/s one member's ResNet-18 step consumes: the fastest float32 loop
  row of `train` (the most demanding, so the input ratio is conservative;
  short rows of a few steps can come out slow), else of `xla_flags`."""
  rates = [
      r["samples_per_s"]
      for r in results.get("train", {}).get("rows", [])
      if (r["model"], r["dtype"], r["strategy"]) == ("resnet18", "float32", "loop")
      and r.get("samples_per_s")
  ]
  rates = rates or [
      r["samples_per_s"]
      for r in results.get("xla_flags", {}).get("rows", [])
      if r["model"] == "resnet18" and r.get("samples_per_s")
  ]
  return max(rates) if rates else None


def section_torch(args) -> dict[str, Any]:
  """PyTorch against JAX's default member strategy, interleaved: each of
  --torch-repeats rounds times the JAX loop and then the torch loop, so load
  from other processes falls on both; the ratio is the median of the rounds'."""
  torch, note = _import_torch()
  if torch is None:
    print(f"\n== torch: skipped, {note}")
    return {"skipped": note}
  default = _default_strategy()
  rows = []
  for model in args.models:
    # ResNet-18: one member's step is the comparison; a loop only repeats it.
    members = [1] if model == "resnet18" else args.members
    steps = args.resnet_steps if model == "resnet18" else args.steps
    w = Workload(model, "float32", args.resnet_image_size)
    for m in members:
      rounds = []
      for _ in range(args.torch_repeats):
        j = measure_train(w, m, default, steps, args.max_seconds)
        t = measure_torch(torch, model, m, steps, args.resnet_image_size, args.max_seconds)
        rounds.append((j.get("samples_per_s"), t))
      t = rounds[-1][1]
      torch_rates = [r[1]["samples_per_s"] for r in rounds]
      row = {**t, "samples_per_s": float(np.median(torch_rates)),
             "torch_rounds": [round(x, 1) for x in torch_rates]}  # fmt: skip
      row["step_ms"] = 1e3 * w.batch_size / row["samples_per_s"]
      jax_rates = [r[0] for r in rounds]
      if all(x is not None for x in jax_rates):
        row["jax_samples_per_s"] = float(np.median(jax_rates))
        row["jax_rounds"] = [round(x, 1) for x in jax_rates]
        ratios = [a / b for a, b in zip(jax_rates, torch_rates, strict=True)]
        row["jax_over_torch"] = float(np.median(ratios))
        row["ratio_rounds"] = [round(x, 2) for x in ratios]
      rows.append(row)
  print_table(
      f"torch {torch.__version__} on {_torch_device(torch)} (float32, "
      f"{torch.get_num_threads()} threads) vs JAX '{default}', median of "
      f"{args.torch_repeats} interleaved rounds", rows, [
          ("model", "model", ""), ("members", "M", ""), ("steps_timed", "steps", ""),
          ("samples_per_s", "torch samples/s", ".1f"), ("step_ms", "ms/step", ".1f"),
          ("jax_samples_per_s", "jax samples/s", ".1f"), ("jax_over_torch", "jax/torch", ".2f"),
          ("ratio_rounds", "rounds", ""),
      ])  # fmt: skip
  return {"rows": rows, "torch": torch.__version__, "threads": torch.get_num_threads(),
          "interop_threads": torch.get_num_interop_threads(), "jax_strategy": default}  # fmt: skip


def section_xla_flags(args) -> dict[str, Any]:
  if jax.default_backend() != "cpu":
    note = "skipped: the flag sets are XLA:CPU flags"
    print(f"\n== xla_flags: {note}")
    return {"skipped": note}
  names = args.xla_flagsets
  runs: dict[tuple[str, str], list[float]] = {}
  errors, worker_rss = [], 0.0
  for r in range(args.xla_repeats):
    # Interleaved, alternating direction: drift in the machine's load falls
    # on every setting alike.
    for name in names if r % 2 == 0 else names[::-1]:
      env = dict(os.environ, XLA_FLAGS=XLA_FLAGSETS[name])
      cmd = [sys.executable, os.path.abspath(__file__), "--xla-worker",
             "--models", ",".join(args.models), "--steps", str(args.steps),
             "--resnet-steps", str(args.xla_resnet_steps),
             "--resnet-image-size", str(args.resnet_image_size)]  # fmt: skip
      proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
      lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_WORKER_TAG)]
      if proc.returncode or not lines:
        errors.append({"flags": name, "rc": proc.returncode, "stderr": proc.stderr[-1500:]})
        continue
      for row in json.loads(lines[-1][len(_WORKER_TAG) :]):
        runs.setdefault((name, row["model"]), []).append(row["samples_per_s"])
        worker_rss = max(worker_rss, row.get("maxrss_mb", 0.0))
  rows = []
  for (name, model), rates in runs.items():
    rows.append({"flags": name, "model": model, "repeats": len(rates),
                 "samples_per_s": float(np.median(rates)), "all": [round(x, 2) for x in rates],
                 "xla_flags": XLA_FLAGSETS[name]})  # fmt: skip
  for r in rows:
    base = [b for b in rows if b["model"] == r["model"] and b["flags"] == "none"]
    if base:
      r["x_none"] = r["samples_per_s"] / base[0]["samples_per_s"]
  rows.sort(key=lambda r: (r["model"], names.index(r["flags"])))
  print_table(f"xla_flags (1 member, loop; median of {args.xla_repeats} interleaved runs)", rows, [
      ("model", "model", ""), ("flags", "XLA_FLAGS", ""), ("samples_per_s", "samples/s", ".1f"),
      ("x_none", "x none", ".2f"), ("all", "runs", ""),
  ])  # fmt: skip
  for e in errors:
    print(f"  {e['flags']}: failed (rc {e['rc']}): {e['stderr'][-300:]}")
  return {"rows": rows, "errors": errors, "worker_maxrss_mb": worker_rss}


def section_compile(args) -> dict[str, Any]:
  """The main job (`ncjax.main` with the synthetic default study; --quick: one
  run of its tiny variant) run twice in fresh processes and workdirs sharing one
  compilation cache that is empty before the first run: the seconds every
  training job of each run spent compiling (jax's backend-compile events,
  which include loading from the cache; from the jobs' train_summary.json).
  Epochs are cut to --compile-epochs: the compiled programs are the same."""
  config = "configs/synthetic.py" + (":tiny" if args.quick else "")
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    cache = os.path.join(tmp, "xla_cache")
    for run in (1, 2):
      workdir = os.path.join(tmp, f"run{run}")
      cmd = [sys.executable, "-m", "ncjax.main", f"--workdir={workdir}", f"--config={config}",
             f"--config.compilation_cache_dir={cache}", "--config.progress=False",
             f"--config.epochs={args.compile_epochs}",
             f"--config.study.separability_epochs={args.compile_epochs}"]  # fmt: skip
      if args.data_dir:
        cmd.append(f"--config.dataset.data_dir={args.data_dir}")
      if args.quick:
        cmd.append("--config.study.combos=()")  # one training job
      t0 = time.perf_counter()
      proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
      wall = time.perf_counter() - t0
      if proc.returncode:
        raise RuntimeError(f"compile section: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
      jobs = []
      for path in sorted(glob.glob(os.path.join(workdir, "**", "train_summary.json"),
                                   recursive=True)):  # fmt: skip
        with open(path) as f:
          summary = json.load(f)
        jobs.append({"job": os.path.relpath(os.path.dirname(path), workdir),
                     "compile_s": summary["compile_seconds"],
                     "wall_s": summary["wall_seconds"]})  # fmt: skip
      rows.append({"run": run, "jobs": len(jobs), "wall_s": wall,
                   "compile_s": sum(j["compile_s"] for j in jobs), "per_job": jobs})  # fmt: skip
  first, second = rows[0]["compile_s"], rows[1]["compile_s"]
  for r in rows:
    r["x_first"] = r["compile_s"] / first if first else None
  print_table(f"compile (the main job twice, {config}, {args.compile_epochs} epochs, one "
              "cache empty before run 1)", rows, [
      ("run", "run", ""), ("jobs", "training jobs", ""), ("compile_s", "compile s", ".2f"),
      ("x_first", "x run 1", ".3f"), ("wall_s", "wall s", ".1f"),
  ])  # fmt: skip
  return {"rows": rows, "config": config, "second_over_first": second / first if first else None}


def xla_worker(args) -> int:
  """One process's measurements under its XLA_FLAGS (section xla_flags)."""
  rows = []
  for model in args.models:
    steps = args.resnet_steps if model == "resnet18" else args.steps
    w = Workload(model, "float32", args.resnet_image_size)
    rows.append(measure_train(w, 1, "loop", steps, args.max_seconds))
  for row in rows:
    row["maxrss_mb"] = _maxrss_mb()
  print(_WORKER_TAG + json.dumps(rows))
  return 0


# ---------------------------------------------------------------------- main


def targets(results) -> list[dict[str, Any]]:
  """The issue's targets: measured ratio vs wanted."""
  out = []
  torch_rows = results.get("torch", {}).get("rows", [])
  default = _default_strategy()
  for r in torch_rows:
    if "jax_over_torch" not in r:
      continue
    if r["model"] == "synthetic" and r["members"] == max(x["members"] for x in torch_rows
                                                         if x["model"] == "synthetic"):  # fmt: skip
      out.append({"target": f"synthetic {r['members']} members, JAX '{default}' vs torch loop",
                  "ratio": r["jax_over_torch"], "wanted": 1.0})  # fmt: skip
    if r["model"] == "resnet18" and r["members"] == 1:
      out.append({"target": "ResNet-18 step, JAX vs torch", "ratio": r["jax_over_torch"],
                  "wanted": 1.0})  # fmt: skip
  stream = [r for r in results.get("input", {}).get("rows", [])
            if "x_resnet18_step" in r and r["path"].startswith("streaming")]  # fmt: skip
  if stream:
    best = max(stream, key=lambda r: r["x_resnet18_step"])
    out.append({"target": "streaming 224x224x3 vs ResNet-18 step consumption",
                "ratio": best["x_resnet18_step"], "wanted": 3.0})  # fmt: skip
  ratio = results.get("compile", {}).get("second_over_first")
  if ratio is not None:
    out.append({"target": "compile time, second run of the main job / first (at most)",
                "ratio": ratio, "wanted": 0.1, "at_most": True})  # fmt: skip
  for t in out:
    t["met"] = t["ratio"] <= t["wanted"] if t.get("at_most") else t["ratio"] >= t["wanted"]
  return out


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
  strs = lambda s: [x for x in s.split(",") if x]  # noqa: E731
  p.add_argument("--sections", type=strs, default=list(SECTIONS), help=",".join(SECTIONS))
  p.add_argument("--models", type=strs, default=list(MODELS), help=",".join(MODELS))
  p.add_argument("--members", type=ints, default=[1, 20], help="member counts, e.g. 1,20")
  p.add_argument("--resnet-members", type=ints, default=None, help="default: --members")
  p.add_argument(
      "--steps", type=int, default=None, help="synthetic steps per member (default one epoch, 48)"
  )
  p.add_argument(
      "--resnet-steps",
      type=int,
      default=None,
      help="ResNet-18 steps per member (default 3 on CPU, 20 otherwise)",
  )
  p.add_argument(
      "--resnet-image-size", type=int, default=224, help="ResNet-18 input and streamed image size"
  )
  p.add_argument("--strategies", type=strs, default=["loop", "vmap"], help="loop,vmap")
  p.add_argument(
      "--dtypes",
      type=strs,
      default=["float32"],
      help="compute dtypes of the train rows, e.g. float32,bfloat16",
  )
  p.add_argument(
      "--max-seconds",
      type=float,
      default=120.0,
      help="cap on one measurement's timed loop (at least one step runs)",
  )
  p.add_argument("--nc-rows", type=int, default=10_000, help="features of the NC pass")
  p.add_argument("--nc-repeats", type=int, default=5)
  p.add_argument(
      "--input-images",
      type=int,
      default=384,
      help="images of the temporary 224x224x3 array_record dataset",
  )
  p.add_argument("--input-epochs", type=int, default=3)
  p.add_argument(
      "--stream",
      type=strs,
      default=None,
      help="streaming settings THREADSxWORKERS, e.g. 1x0,4x0,2x2",
  )
  p.add_argument(
      "--torch-repeats",
      type=int,
      default=None,
      help="interleaved JAX/torch rounds of the torch comparison (default 3)",
  )
  p.add_argument("--data-dir", default="", help="TFDS data dir of the synthetic dataset")
  p.add_argument("--profile-dir", default="", help="keep the profiler traces here")
  p.add_argument(
      "--xla-flagsets", type=strs, default=list(XLA_FLAGSETS), help=",".join(XLA_FLAGSETS)
  )
  p.add_argument("--xla-repeats", type=int, default=2)
  p.add_argument("--xla-resnet-steps", type=int, default=None)
  p.add_argument(
      "--compile-epochs",
      type=int,
      default=2,
      help="epochs of each run of the main job in section compile",
  )
  p.add_argument("--quick", action="store_true", help="a few steps of everything (CI smoke)")
  p.add_argument("--json", default=None, help="write the results here")
  p.add_argument(
      "--xla-flags",
      default=synthetic_config.get_config().xla_flags,
      help="added to $XLA_FLAGS as ncjax.main adds config.xla_flags "
      "(default: the config's default); '' = XLA's own defaults",
  )
  p.add_argument("--xla-worker", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if not args.xla_worker:  # a worker runs with exactly its flag set's XLA_FLAGS
    runtime.add_xla_flags(args.xla_flags)  # before the backend starts, below
  cpu = jax.default_backend() == "cpu"
  if args.quick:
    args.steps = args.steps or 3
    args.resnet_steps = args.resnet_steps or 1
    args.nc_rows, args.nc_repeats = min(args.nc_rows, 2000), 2
    args.input_images, args.input_epochs = min(args.input_images, 64), 1
    args.xla_repeats = 1
    args.torch_repeats = args.torch_repeats or 1
    args.stream = args.stream or ["2x0"]
    args.compile_epochs = 1
  args.steps = args.steps or 48
  args.torch_repeats = args.torch_repeats or 3
  args.resnet_steps = args.resnet_steps or (3 if cpu else 20)
  args.xla_resnet_steps = args.xla_resnet_steps or (2 if cpu else args.resnet_steps)
  args.resnet_members = args.resnet_members or args.members
  settings = args.stream or ["1x0", "4x0", "2x2"]
  args.stream_settings = [tuple(int(v) for v in s.split("x")) for s in settings]
  for name in args.sections:
    if name not in SECTIONS:
      p.error(f"unknown section {name!r}; expected some of {SECTIONS}")
  for name in args.strategies:
    if name not in ("loop", "vmap"):
      p.error(f"unknown strategy {name!r}; expected loop and/or vmap")
  for name in args.models:
    if name not in MODELS:
      p.error(f"unknown model {name!r}; expected some of {MODELS}")
  for name in args.xla_flagsets:
    if name not in XLA_FLAGSETS:
      p.error(f"unknown XLA flag set {name!r}; expected some of {list(XLA_FLAGSETS)}")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.xla_worker:
    return xla_worker(args)
  results: dict[str, Any] = {
      "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
      "args": {k: v for k, v in vars(args).items() if k != "xla_worker"},
  }
  memory = {}
  t_start = time.perf_counter()
  order = [s for s in SECTIONS if s in args.sections]
  # Later sections read earlier results (convs and input: train's rows).
  sections = {
      "machine": lambda: section_machine(args),
      "train": lambda: section_train(args),
      "breakdown": lambda: section_breakdown(args),
      "convs": lambda: section_convs(args, results),
      "profile": lambda: section_profile(args),
      "nc": lambda: section_nc(args),
      "input": lambda: section_input(args, results),
      "torch": lambda: section_torch(args),
      "xla_flags": lambda: section_xla_flags(args),
      "compile": lambda: section_compile(args),
  }
  for name in order:
    t0 = time.perf_counter()
    results[name] = sections[name]()
    memory[name] = {
        "maxrss_mb": round(_maxrss_mb(), 1),
        "seconds": round(time.perf_counter() - t0, 1),
    }
  results["memory"] = memory
  results["targets"] = targets(results)
  results["seconds"] = time.perf_counter() - t_start
  print_table("peak host memory after each section (maxrss, this process)",
              [{"section": k, **v} for k, v in memory.items()],
              [("section", "section", ""), ("maxrss_mb", "MiB", ".0f"), ("seconds", "s", ".1f")])  # fmt: skip
  print_table("targets", results["targets"], [
      ("target", "target", ""), ("ratio", "measured", ".2f"), ("wanted", "wanted", ".1f"),
      ("met", "met", ""),
  ])  # fmt: skip
  print(f"\ntotal {results['seconds']:.0f} s")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2, default=float)
  return 0


if __name__ == "__main__":
  sys.exit(main())
