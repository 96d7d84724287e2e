"""Orbax checkpoints: the resumable latest state and the two study stages.

  checkpoints/latest/<epoch>/    every member's train state, its early-stopping
                                 snapshot and counters (auto-resume)
  checkpoints/<member>/early/    what early stopping on the (biased) validation
                                 loss would have returned
  checkpoints/<member>/final/    the model after the last epoch

Orbax writes each checkpoint into a temporary directory and renames it when
complete, so a run killed mid-save never leaves a checkpoint that loads.
Restores go through abstract trees with shardings, never through the
sharding file stored with the checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from ncjax.errors import WorkdirError

STAGES = ("early", "final")


def _abstract(tree: Any) -> Any:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class LatestCheckpoint:
  """The newest complete training state of a run (keeps the last two)."""

  def __init__(self, workdir: str):
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.LatestN(2),
        create=True,
    )
    self._manager = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints", "latest"),
        options=options,
    )

  def latest_epoch(self) -> int | None:
    return self._manager.latest_step()

  def save(self, epoch: int, state: Any, meta: Mapping[str, Any]) -> None:
    self._manager.save(
        epoch,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))
        ),
        force=True,
    )

  def restore(self, epoch: int, template: Any) -> tuple[Any, dict[str, Any]]:
    """(state shaped and sharded like `template`, meta) of `epoch`."""
    restored = self._manager.restore(
        epoch,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(template)),
            meta=ocp.args.JsonRestore(),
        ),
    )
    return restored["state"], dict(restored["meta"])

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def stage_path(workdir: str, member: str, stage: str) -> str:
  if stage not in STAGES:
    raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
  return os.path.join(os.path.abspath(workdir), "checkpoints", member, stage)


def save_stages(workdir: str, stages: Mapping[str, Mapping[str, Any]]) -> None:
  """Writes {member: {stage: variables}} and waits until all are on disk."""
  checkpointer = ocp.StandardCheckpointer()
  for member, by_stage in stages.items():
    for stage, variables in by_stage.items():
      checkpointer.save(stage_path(workdir, member, stage), variables, force=True)
  checkpointer.wait_until_finished()
  checkpointer.close()


def stages_complete(workdir: str, members: list[str]) -> bool:
  return all(os.path.isdir(stage_path(workdir, m, s)) for m in members for s in STAGES)


def restore_stage(workdir: str, member: str, stage: str) -> dict[str, Any]:
  """The variables ({'params', 'batch_stats'}) of one member at one stage.

  Builds the model from the workdir's config.json, so it needs nothing but
  the workdir: `restore_stage('/tmp/run', 'seed0_bias0.25', 'early')`.
  """
  from ncjax import train  # pylint: disable=import-outside-toplevel
  from ncjax import workdir as workdir_lib

  path = stage_path(workdir, member, stage)
  if not os.path.isdir(path):
    raise WorkdirError(
        f"no {stage} checkpoint for member {member!r} in {workdir} "
        f"(expected {path}); has the run finished?"
    )
  config = ml_collections.ConfigDict(workdir_lib.read_config(workdir)["config"])
  with open(os.path.join(workdir, train.RUN_FILE)) as f:
    image_shape = tuple(json.load(f)["image_shape"])
  template = train.abstract_variables(config, image_shape)
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  template = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), template
  )
  checkpointer = ocp.StandardCheckpointer()
  try:
    return checkpointer.restore(path, template)
  finally:
    checkpointer.close()
