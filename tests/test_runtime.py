"""Process setup: XLA flags from the config, and what the default flag does."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from configs import base as base_config
from ncjax import runtime

# A 3x3 convolution's weight gradient at ResNet-18's first stage (compiled,
# never run): whether XLA:CPU puts it in a YNNPACK fusion.
_PROBE = """
import jax, jax.numpy as jnp
x = jax.ShapeDtypeStruct((32, 56, 56, 64), jnp.float32)
w = jax.ShapeDtypeStruct((3, 3, 64, 64), jnp.float32)
conv = lambda w, x: jax.lax.conv_general_dilated(
    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
grad = jax.jit(jax.grad(lambda w, x: jnp.sum(conv(w, x) ** 2)))
hlo = grad.lower(w, x).compile().as_text()
assert "convolution(" in hlo
print("ynn" if "__ynn_fusion" in hlo else "eigen")
"""


def test_add_xla_flags_keeps_what_the_environment_sets(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_a=1 --xla_b")
  runtime.add_xla_flags("--xla_a=2 --xla_c=3 --xla_b")
  assert os.environ["XLA_FLAGS"].split() == ["--xla_a=1", "--xla_b", "--xla_c=3"]
  runtime.add_xla_flags("")
  assert os.environ["XLA_FLAGS"].split() == ["--xla_a=1", "--xla_b", "--xla_c=3"]
  monkeypatch.delenv("XLA_FLAGS")
  runtime.add_xla_flags("--xla_c=3")
  assert os.environ["XLA_FLAGS"] == "--xla_c=3"


def _probe(xla_flags: str) -> str:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if xla_flags:
    env["XLA_FLAGS"] = xla_flags
  proc = subprocess.run(
      [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc.stdout.split()[-1]


@pytest.mark.parametrize("flags,backend", [("", "ynn"), (base_config.CPU_XLA_FLAGS, "eigen")])
def test_default_cpu_flags_move_convolutions_from_ynnpack_to_eigen(flags, backend):
  """The installed XLA knows the config's default flag (an unknown one
  aborts the process) and it does what configs/base.py says: without it the
  convolution gradient is a YNNPACK fusion, with it a plain (Eigen) one."""
  assert base_config.base_config().xla_flags == base_config.CPU_XLA_FLAGS
  assert _probe(flags) == backend
