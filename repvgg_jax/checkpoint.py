"""Orbax checkpoints: training runs and standalone variables directories.

Two layouts, both plain orbax, both readable without tensorflow:

* a training run ``WORKDIR`` holds ``run.json`` (the run's model metadata, see
  ``model_metadata``) and ``checkpoints/<step>/`` written by an orbax
  ``CheckpointManager`` with one item, ``state``, a pytree holding at least ``params``
  and ``batch_stats`` (train.py adds ``step``, ``opt_state`` and, with EMA, ``ema``);
* a variables directory (what ``convert.py`` writes and ``train.py --config.init_from``
  reads) holds ``model.json`` (the same metadata plus ``structure``: ``'train'`` or
  ``'deploy'``), ``variables/``, a StandardCheckpointer tree, and any extra files of the
  writer (``convert.py``'s exports).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from repvgg_jax.variants import IMAGENET_MEAN, IMAGENET_STD

RUN_METADATA = 'run.json'
MODEL_METADATA = 'model.json'
CHECKPOINTS = 'checkpoints'
STATE_ITEM = 'state'


class CheckpointError(ValueError):
  """A checkpoint that is missing, unreadable or of another model."""


def model_metadata(model: str, num_classes: int, image_size: int,
                   mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD,
                   crop_fraction: Optional[float] = None, **extra: Any) -> dict[str, Any]:
  """What a user of a checkpoint needs: model name, classes, input size and normalization
  (``(pixel - mean) / std`` on RGB pixels in [0, 255]); where known, the evaluation's
  centre crop (``crop_fraction``; readers fall back on the variant's published one)."""
  crop = {} if crop_fraction is None else {'crop_fraction': float(crop_fraction)}
  return {'model': model, 'num_classes': int(num_classes), 'image_size': int(image_size),
          'mean': [float(m) for m in mean], 'std': [float(s) for s in std], **crop, **extra}


def write_json(path: str, obj: Any) -> None:
  """Write JSON atomically (a temporary file renamed over ``path``)."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-', suffix='.json')
  with os.fdopen(fd, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write('\n')
  os.replace(tmp, path)


def read_json(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f'{path}: not found') from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f'{path}: not valid JSON ({e})') from None


def refuse_existing(path: str, overwrite: bool) -> None:
  """Raise CheckpointError if ``path`` exists and may not be replaced: called before any
  work that would be lost, and again just before writing."""
  if os.path.exists(path) and not overwrite:
    raise CheckpointError(f'{path}: already exists (pass --overwrite to replace it)')


def save_variables(directory: str, variables: Any, metadata: dict[str, Any],
                   overwrite: bool = False, extra_files: Mapping[str, bytes] = (),
                   this_process_only: bool = False) -> None:
  """Write ``variables``, ``metadata`` and ``extra_files`` (name -> contents) to a new
  variables directory.

  Everything is written into a temporary sibling directory first and renamed into place,
  so a failure leaves nothing behind. An existing ``directory`` is an error unless
  ``overwrite``; it is replaced only once the new one is complete. Orbax synchronizes
  all processes of a multi-process run in every save; ``this_process_only`` writes from
  the calling process alone (e.g. process 0 exporting the deploy model).
  """
  import jax
  import orbax.checkpoint as ocp

  directory = os.path.abspath(directory)
  refuse_existing(directory, overwrite)
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(directory)}.tmp-')
  try:
    processes = ocp.options.MultiprocessingOptions(
        primary_host=jax.process_index(), active_processes={jax.process_index()}
    ) if this_process_only and jax.process_count() > 1 else ocp.options.MultiprocessingOptions()
    checkpointer = ocp.StandardCheckpointer(multiprocessing_options=processes)
    checkpointer.save(os.path.join(tmp, 'variables'), _to_numpy(variables))
    checkpointer.wait_until_finished()
    write_json(os.path.join(tmp, MODEL_METADATA), metadata)
    for name, contents in dict(extra_files).items():
      with open(os.path.join(tmp, name), 'wb') as f:
        f.write(contents)
    refuse_existing(directory, overwrite)
    if os.path.exists(directory):
      shutil.rmtree(directory)
    os.replace(tmp, directory)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)


def load_variables(directory: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """``(variables, metadata)`` of a variables directory written by ``save_variables``."""
  import orbax.checkpoint as ocp

  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise CheckpointError(f'{directory}: no such checkpoint directory')
  metadata = read_json(os.path.join(directory, MODEL_METADATA))
  try:
    variables = ocp.StandardCheckpointer().restore(os.path.join(directory, 'variables'))
  except Exception as e:  # orbax raises many types for unreadable data
    raise CheckpointError(f'{directory}: cannot read the variables ({type(e).__name__}: '
                          f'{str(e).splitlines()[0] if str(e) else ""})') from None
  return _to_dicts(variables), metadata


def checkpoint_manager(workdir: str, max_to_keep: Optional[int] = 3,
                       save_interval_steps: int = 1, read_only: bool = False):
  """The orbax CheckpointManager of a training run."""
  import orbax.checkpoint as ocp

  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
      create=not read_only, read_only=read_only)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), CHECKPOINTS),
                               item_names=(STATE_ITEM,), options=options)


def save_train_state(manager: Any, step: int, state: Any) -> None:
  """Save the training state (numpy pytree) as checkpoint ``step`` of a run's manager."""
  import orbax.checkpoint as ocp
  manager.save(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state)}))


def restore_train_state(manager: Any, step: int, like: Any) -> Any:
  """Checkpoint ``step`` of a run's manager, as numpy arrays with the structure, shapes
  and dtypes of ``like`` (a state of the same run)."""
  import jax
  import orbax.checkpoint as ocp
  restored = manager.restore(step, args=ocp.args.Composite(
      **{STATE_ITEM: ocp.args.StandardRestore(like)}))
  return jax.tree_util.tree_map(np.asarray, restored[STATE_ITEM])


def restore_training_variables(workdir: str, step: Optional[int] = None
                               ) -> tuple[dict[str, Any], int, dict[str, Any]]:
  """``(variables, step, run_metadata)`` of a training run's checkpoint (latest by default).

  ``variables`` is ``{'params', 'batch_stats'}`` as numpy arrays; the optimizer state is
  not needed and is read only as far as orbax must.
  """
  import orbax.checkpoint as ocp

  workdir = os.path.abspath(workdir)
  if not os.path.isdir(os.path.join(workdir, CHECKPOINTS)):
    raise CheckpointError(f'{workdir}: no training checkpoints (expected {CHECKPOINTS}/ '
                          'written by train.py)')
  metadata = read_json(os.path.join(workdir, RUN_METADATA))
  manager = checkpoint_manager(workdir, read_only=True)
  steps = manager.all_steps()
  if not steps:
    raise CheckpointError(f'{workdir}: {CHECKPOINTS}/ holds no complete checkpoint')
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise CheckpointError(f'{workdir}: no checkpoint at step {step}; available: '
                          f'{sorted(steps)}')
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        **{STATE_ITEM: ocp.args.StandardRestore()}))
  except Exception as e:
    raise CheckpointError(f'{workdir}: checkpoint at step {step} is unreadable '
                          f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})'
                          ) from None
  state = _to_dicts(restored[STATE_ITEM])
  missing = [k for k in ('params', 'batch_stats') if k not in state]
  if missing:
    raise CheckpointError(f'{workdir}: checkpoint at step {step} lacks {missing}')
  return {'params': state['params'], 'batch_stats': state['batch_stats']}, step, metadata


def _to_numpy(tree: Any) -> Any:
  import jax
  return jax.tree_util.tree_map(np.asarray, _to_dicts(tree))


def _to_dicts(tree: Any) -> Any:
  """Plain nested dicts (orbax and Flax may hand back FrozenDicts or other mappings)."""
  if hasattr(tree, 'items'):
    return {k: _to_dicts(v) for k, v in tree.items()}
  return tree
