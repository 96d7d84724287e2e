"""Members: the models one run trains together (seeds x bias rates).

A member is one (seed, bias rate) pair. The seed alone sets the member's
initialisation, data order and bias draw, so a clean and a biased member of
the same seed start from the same weights and see the same batches: the
comparison isolates the label bias. Nothing about a member depends on which
other members share its run, or in which order they are listed.
"""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True, order=True)
class Member:
  seed: int
  bias_rate: float

  @property
  def name(self) -> str:
    return f"seed{self.seed}_bias{self.bias_rate:g}"

  def keys(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(init, data-order, augmentation) keys, independent of the bias rate."""
    init_key, data_key, aug_key = jax.random.split(jax.random.key(self.seed), 3)
    return init_key, data_key, aug_key


def from_config(config) -> list[Member]:
  """All members of a run, biased rates outermost, in config order."""
  members = [Member(int(s), float(r)) for r in config.bias.rates for s in config.seeds]
  if len(set(members)) != len(members):
    raise ValueError(f"duplicate members in seeds {config.seeds} x rates {config.bias.rates}")
  return members
