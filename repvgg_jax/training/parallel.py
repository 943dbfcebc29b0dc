"""Processes and devices: ``jax.distributed``, batches split over the local devices,
state replicated on them, and a stop request that every process agrees on."""

from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from repvgg_jax import xla_backend
from repvgg_jax.training.steps import AXIS

Tree = Any


class DistributedSetupError(ValueError):
  """Flags for ``jax.distributed`` that do not go together."""


def initialize_distributed(coordinator_address: Optional[str], num_processes: Optional[int],
                           process_id: Optional[int]) -> None:
  """``jax.distributed.initialize`` from explicit flags, or from the cluster environment
  where one is detected (SLURM, Open MPI, TPU pods...); nothing for a single process."""
  given = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if any(given) and not all(given):
    raise DistributedSetupError('--coordinator-address, --num-processes and --process-id go '
                                'together: give all three or none')
  if all(given):
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return
  if xla_backend.backends_are_initialized():
    return  # JAX already runs here (a caller's own process): it is a single process
  # jax has no public "is a cluster detected?"; initialize() without arguments detects
  # one, and where none is it refuses with this ValueError before changing anything.
  try:
    jax.distributed.initialize()
  except ValueError as e:
    if 'coordinator_address' not in str(e):
      raise


def shard(batch: dict[str, np.ndarray], devices: int) -> dict[str, np.ndarray]:
  """A host batch as ``[devices, rows per device, ...]`` arrays."""
  return {k: v.reshape(devices, v.shape[0] // devices, *v.shape[1:]) for k, v in batch.items()}


def replicate(tree: Tree) -> Tree:
  """A copy of ``tree`` on every local device, placed by a pmap over ``AXIS``: the steps'
  outputs carry that axis in their sharding, and an input placed otherwise (as by
  ``flax.jax_utils.replicate``) would make the train step compile a second time."""
  stacked = jax.tree_util.tree_map(
      lambda x: np.broadcast_to(np.asarray(x), (jax.local_device_count(), *np.shape(x))), tree)
  return jax.pmap(lambda x: x, axis_name=AXIS)(stacked)


def unreplicate(tree: Tree) -> Tree:
  """The first local replica as numpy arrays."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x[0]), tree)


def replicated_shapes(tree: Tree, devices: int) -> Tree:
  """Shapes and dtypes of ``tree`` with a leading axis of ``devices`` replicas."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct((devices, *x.shape), x.dtype), tree)


class StopRequest:
  """A signal handler (SIGTERM): the loop saves a checkpoint and ends at the next step
  boundary; every process stops at the same step."""

  def __init__(self):
    self.requested = False

  def __call__(self, signum, frame):
    self.requested = True

  def agreed(self) -> bool:
    """Whether any process was asked to stop (all must stop at the same step)."""
    if jax.process_count() == 1:
      return self.requested
    return bool(np.max(multihost_utils.process_allgather(np.int32(self.requested))))
