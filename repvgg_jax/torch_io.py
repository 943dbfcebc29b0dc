"""PyTorch RepVGG weights in and out: the official and the timm state dicts.

Two PyTorch namings of the same networks are understood:

* ``'official'``: DingXiaoH/RepVGG (``repvgg.py``, ``repvggplus.py``), the files the
  authors publish (``RepVGG-A0-train.pth``, ``RepVGGplus-L2pse-train256-acc84.06.pth``):
  ``stage0.rbr_dense.conv.weight``, ``stage2.3.rbr_1x1.bn.running_mean``,
  ``stage3.0.rbr_identity.weight``, deploy ``rbr_reparam``, SE ``se.down``/``se.up``
  (RepVGGplus: ``post_se``), classifier ``linear``; RepVGGplus stages hold ``blocks``
  (``stage3_first.blocks.5.``) and its auxiliary heads are ``Sequential``s
  (``stage1_aux.0.conv``, ``stage1_aux.0.bn``, ``stage1_aux.3``).
* ``'timm'``: ``timm.models.byobnet`` (``repvgg_a0`` ... ``repvgg_d2se``):
  ``stem.conv_kxk.conv.weight``, ``stages.1.3.conv_1x1.bn.weight``, ``identity``,
  deploy ``reparam_conv``, SE ``attn.fc1``/``attn.fc2``, classifier ``head.fc``.

The key table is derived from the Flax model itself (``jax.eval_shape`` of its
``init`` and ``variants.layer_specs``): every Flax leaf is named by translating each
module name of its path, so any variant in ``variants.py`` is covered without a
per-variant table. Layouts: a PyTorch conv weight ``(O, I/g, kH, kW)`` is a Flax
``(kH, kW, I/g, O)`` kernel, a Linear weight ``(out, in)`` a Dense ``(in, out)`` kernel,
the SE 1x1 convs ``(out, in, 1, 1)`` are Dense kernels too, and BatchNorm
``weight/bias/running_mean/running_var`` are ``scale/bias`` (params) and
``mean/var`` (batch_stats).

torch is imported only to read or write ``.pth`` files and only with
``weights_only=True``: a pickle that would run code is refused unread.
``.safetensors`` files are read and written without torch.
"""

from __future__ import annotations

import functools
import os
import pickle
import tempfile
from collections.abc import Mapping
from typing import Any, NamedTuple, Optional, Union

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from repvgg_jax.models import create_model, num_classes_of, variable_shapes
from repvgg_jax.variants import AUX_STAGES, VARIANTS, Variant, get_variant, layer_specs

NAMINGS = ('official', 'timm')
TORCH_SUFFIXES = ('.pth', '.pt')
SAFETENSORS_SUFFIX = '.safetensors'
DEFAULT_CACHE_DIR = os.path.join('~', '.cache', 'repvgg_jax')

PathLike = Union[str, os.PathLike]
StateDict = Mapping[str, Any]

# Flax module names inside a block (and its SE and conv-BN children) -> PyTorch names.
_MODULE_NAMES = {
    'official': {'conv3x3': 'rbr_dense', 'conv1x1': 'rbr_1x1', 'identity': 'rbr_identity',
                 'reparam_conv': 'rbr_reparam', 'down': 'down', 'up': 'up',
                 'conv': 'conv', 'bn': 'bn',
                 # RepVGGplus aux heads: Sequential(conv_bn_relu, pool, flatten, linear).
                 'downsample': '0', 'fc': '3'},
    'timm': {'conv3x3': 'conv_kxk', 'conv1x1': 'conv_1x1', 'identity': 'identity',
             'reparam_conv': 'reparam_conv', 'se': 'attn', 'down': 'fc1', 'up': 'fc2',
             'conv': 'conv', 'bn': 'bn'},
}
# The official code calls the SE block 'se' where it precedes the ReLU (RepVGG-D2se)
# and 'post_se' where it follows it (RepVGGplus).
_OFFICIAL_SE_NAMES = {'pre': 'se', 'post': 'post_se'}
_LEAF_NAMES = {('params', 'kernel'): 'weight', ('params', 'bias'): 'bias',
               ('params', 'scale'): 'weight', ('batch_stats', 'mean'): 'running_mean',
               ('batch_stats', 'var'): 'running_var'}
# PyTorch's module and tensor order (both codebases define the identity branch first),
# so that exported state dicts and error messages list tensors as PyTorch does.
_ORDER = {name: i for i, name in enumerate(
    ('identity', 'conv3x3', 'conv1x1', 'reparam_conv', 'se', 'down', 'up', 'downsample',
     'conv', 'bn', 'fc', 'kernel', 'scale', 'bias', 'mean', 'var'))}
_DEPLOY_MARKERS = ('.rbr_reparam.weight', '.reparam_conv.weight')
_SHOWN = 3  # offending keys named per kind of mismatch


class _Leaf(NamedTuple):
  """One tensor: where it lives in Flax and in PyTorch, and its shape in each."""
  collection: str              # 'params' or 'batch_stats'
  path: tuple[str, ...]        # Flax path inside the collection
  key: str                     # PyTorch state-dict key
  shape: tuple[int, ...]       # Flax shape
  torch_shape: tuple[int, ...]


def _torch_shape(shape: tuple[int, ...], is_se: bool) -> tuple[int, ...]:
  if len(shape) == 4:   # HWIO -> OIHW
    return (shape[3], shape[2], shape[0], shape[1])
  if len(shape) == 2:   # Dense (in, out) -> Linear (out, in), or a 1x1 conv for SE
    return (shape[1], shape[0]) + ((1, 1) if is_se else ())
  return shape


def _to_flax(array: np.ndarray, leaf: _Leaf) -> np.ndarray:
  if len(leaf.shape) == 4:
    return array.transpose(2, 3, 1, 0)
  if len(leaf.shape) == 2:
    return array.reshape(array.shape[:2]).T
  return array


def _to_torch(array: np.ndarray, leaf: _Leaf) -> np.ndarray:
  if len(leaf.shape) == 4:
    return array.transpose(3, 2, 0, 1)
  if len(leaf.shape) == 2:
    return array.T.reshape(leaf.torch_shape)
  return array


def _top_level_names(variant: Variant, naming: str) -> dict[str, str]:
  """Flax top-level module names -> PyTorch prefixes, from ``layer_specs``."""
  if naming == 'timm' and variant.plus:
    raise ValueError(f'{variant.name}: timm has no RepVGGplus; use naming=\'official\'')
  names = {}
  for spec in layer_specs(variant):
    flax_name = spec.module_name
    if naming == 'timm':
      names[flax_name] = ('stem' if spec.stage == 'stage0'
                          else f'stages.{int(spec.stage[len("stage"):]) - 1}.{spec.index}')
    elif spec.stage == 'stage0':
      names[flax_name] = 'stage0'
    else:
      names[flax_name] = f'{spec.stage}.blocks.{spec.index}' if variant.plus else (
          f'{spec.stage}.{spec.index}')
  names['linear'] = 'head.fc' if naming == 'timm' else 'linear'
  names.update({f'{stage}_aux': f'{stage}_aux' for stage in AUX_STAGES})
  return names


@functools.lru_cache(maxsize=32)
def _leaves(name: str, naming: str, deploy: bool, num_classes: int) -> tuple[_Leaf, ...]:
  """Every tensor of ``create_model(name, num_classes, deploy)``, with its PyTorch key."""
  if naming not in NAMINGS:
    raise ValueError(f'naming {naming!r}: accepted are {", ".join(NAMINGS)}')
  variant = get_variant(name)
  top_names = _top_level_names(variant, naming)
  module_names = dict(_MODULE_NAMES[naming])
  if naming == 'official' and variant.se:
    module_names['se'] = _OFFICIAL_SE_NAMES[variant.se]
  shapes = variable_shapes(create_model(name, num_classes=num_classes, deploy=deploy))
  tops = list(top_names)
  flat = sorted(traverse_util.flatten_dict(dict(shapes)).items(), key=lambda item: (
      tops.index(item[0][1]), [_ORDER[part] for part in item[0][2:]]))
  leaves = []
  for (collection, top, *modules, leaf_name), struct in flat:
    key = '.'.join([top_names[top]] + [module_names[m] for m in modules]
                   + [_LEAF_NAMES[collection, leaf_name]])
    is_se = bool(modules) and modules[-1] in ('down', 'up')
    leaves.append(_Leaf(collection, (top, *modules, leaf_name), key, tuple(struct.shape),
                        _torch_shape(tuple(struct.shape), is_se)))
  return tuple(leaves)


def torch_state_dict_shapes(name: str, naming: str = 'official', deploy: bool = False,
                            num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
  """The keys and shapes of the PyTorch state dict of a variant (``num_batches_tracked``
  left out), e.g. to check a file before loading it."""
  return {leaf.key: leaf.torch_shape for leaf in _leaves(name, naming, deploy, num_classes)}


# ---------------------------------------------------------------------------- reading

def _read_torch_file(path: str) -> Any:
  import torch  # Only .pth/.pt files need torch.
  try:
    return torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    # weights_only refuses any global outside tensors and plain containers, before
    # calling it: such a pickle would run code when loaded the unsafe way.
    reason = str(e).split('\n')
    detail = next((line.strip() for line in reason if 'Unsupported global' in line
                   or 'GLOBAL' in line), reason[0].strip())
    raise ValueError(
        f'{path}: refused: the pickle references code that loading would run ({detail}); '
        'only plain state dicts of tensors are accepted (torch.load with weights_only=True). '
        'Re-save it with torch.save(model.state_dict(), ...) or as .safetensors') from None
  except (RuntimeError, EOFError, OSError, ValueError) as e:
    raise ValueError(f'{path}: not a readable PyTorch checkpoint (truncated or corrupt?): '
                     f'{str(e).splitlines()[0] if str(e) else type(e).__name__}') from None


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  try:
    return load_file(path)
  except (SafetensorError, OSError, ValueError) as e:
    raise ValueError(f'{path}: not a readable safetensors file (truncated or corrupt?): '
                     f'{e}') from None


def _as_numpy(value: Any) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch.Tensor, possibly half or bfloat16
    value = value.detach().cpu()
    return (value.float() if value.is_floating_point() else value).numpy()
  return np.asarray(value)


def read_state_dict(source: Union[PathLike, StateDict]) -> dict[str, np.ndarray]:
  """A flat ``{key: numpy array}`` from a file or an in-memory state dict.

  Unwraps ``{'model': ...}`` and ``{'state_dict': ...}`` (training checkpoints), strips
  the ``module.`` prefix of (Distributed)DataParallel and drops ``num_batches_tracked``.
  """
  where = 'the state dict'
  if isinstance(source, (str, os.PathLike)):
    where = path = os.fspath(source)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path}: no such file')
    suffix = os.path.splitext(path)[1].lower()
    if suffix == SAFETENSORS_SUFFIX:
      source = _read_safetensors(path)
    elif suffix in TORCH_SUFFIXES:
      source = _read_torch_file(path)
    else:
      raise ValueError(f'{path}: unknown file type {suffix!r}; accepted are '
                       f'{", ".join(TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,))}')
  while isinstance(source, Mapping):
    wrapped = next((source[k] for k in ('model', 'state_dict')
                    if isinstance(source.get(k), Mapping)), None)
    if wrapped is None:
      break
    source = wrapped
  if not isinstance(source, Mapping):
    raise ValueError(f'{where}: expected a state dict (a mapping of names to tensors), '
                     f'got {type(source).__name__}')
  state = {}
  for key, value in source.items():
    if not isinstance(key, str) or not (hasattr(value, 'shape') or np.isscalar(value)):
      raise ValueError(f'{where}: expected a state dict of tensors; entry {key!r} holds '
                       f'{type(value).__name__}')
    key = key[len('module.'):] if key.startswith('module.') else key
    if not key.endswith('num_batches_tracked'):
      state[key] = _as_numpy(value)
  return state


def _detect_naming(keys: list[str], where: str) -> str:
  if any(k.startswith(('stem.', 'stages.')) for k in keys):
    return 'timm'
  if any(k.startswith('stage0.') for k in keys):
    return 'official'
  raise ValueError(f'{where}: not a RepVGG state dict: no official (stage0.*) or timm '
                   f'(stem.*, stages.*) keys; its first keys are {keys[:_SHOWN]}')


def _num_classes(state: Mapping[str, np.ndarray], naming: str) -> int:
  weight = state.get('head.fc.weight' if naming == 'timm' else 'linear.weight')
  return 0 if weight is None else int(weight.shape[0])


def _mismatches(leaves: tuple[_Leaf, ...], shapes: Mapping[str, tuple]) -> list[str]:
  """Human-readable differences between the expected keys/shapes and ``shapes``."""
  expected = {leaf.key: leaf.torch_shape for leaf in leaves}
  missing = [k for k in expected if k not in shapes]
  unexpected = [k for k in shapes if k not in expected]
  wrong = [f'{k} (expected {expected[k]}, found {tuple(shapes[k])})'
           for k in shapes if k in expected and tuple(shapes[k]) != expected[k]]
  problems = []
  for what, items in (('wrong shapes', wrong), ('missing keys', missing),
                      ('unexpected keys', unexpected)):
    if items:
      more = f' and {len(items) - _SHOWN} more' if len(items) > _SHOWN else ''
      problems.append(f'{len(items)} {what}: {", ".join(items[:_SHOWN])}{more}')
  return problems


def _matching_variants(shapes: Mapping[str, tuple], naming: str, deploy: bool,
                       num_classes: int) -> list[str]:
  """The variants whose every key and shape ``shapes`` has, in this naming/structure."""
  blocks = sum(k.endswith(('rbr_dense.conv.weight', 'conv_kxk.conv.weight') + _DEPLOY_MARKERS)
               for k in shapes)
  found = []
  for name, variant in VARIANTS.items():
    if len(list(layer_specs(variant))) != blocks or (variant.plus and naming == 'timm'):
      continue  # cheap filter before building the candidate's key table
    if not _mismatches(_leaves(name, naming, deploy, num_classes), shapes):
      found.append(name)
  return found


def load_torch_weights(source: Union[PathLike, StateDict], name: str) -> dict[str, Any]:
  """Flax variables of ``create_model(name, ...)`` from a PyTorch RepVGG state dict.

  Args:
    source: a ``.pth``/``.pt`` file (read with ``weights_only=True``), a
      ``.safetensors`` file (read without torch), or an in-memory state dict of torch
      tensors or numpy arrays; official or timm naming, detected from the keys.
    name: the variant, e.g. ``'RepVGG-A0'`` (see ``list_models()``).

  Returns:
    For a training-time checkpoint ``{'params', 'batch_stats'}`` of the training-time
    model; for a deploy checkpoint (``rbr_reparam``/``reparam_conv`` keys)
    ``{'params'}`` of ``create_model(name, deploy=True)``. float32; ``num_classes`` is
    that of the file's classifier (0 without one).

  Raises:
    ValueError: unreadable or refused file, or a state dict that does not fit ``name``
      (naming the first offending keys with expected and found shapes, and the
      variants the file does fit, if any). FileNotFoundError: no such file.
  """
  get_variant(name)
  where = os.fspath(source) if isinstance(source, (str, os.PathLike)) else 'the state dict'
  state = read_state_dict(source)
  naming = _detect_naming(list(state), where)
  deploy = any(k.endswith(_DEPLOY_MARKERS) for k in state)
  num_classes = _num_classes(state, naming)
  if naming == 'timm' and get_variant(name).plus:
    raise ValueError(f'{where}: timm-named weights cannot be {name}: timm has no '
                     'RepVGGplus (official naming only)')
  leaves = _leaves(name, naming, deploy, num_classes)
  shapes = {k: v.shape for k, v in state.items()}
  problems = _mismatches(leaves, shapes)
  if problems:
    matches = [m for m in _matching_variants(shapes, naming, deploy, num_classes)
               if m != name]
    guess = (f'the file looks like {" or ".join(matches)}' if matches
             else 'it matches no known variant')
    structure = 'deploy' if deploy else 'training-time'
    raise ValueError(f'{where} does not fit {name} ({structure}, {naming} naming, '
                     f'{num_classes} classes): {"; ".join(problems)}; {guess}')
  flat = {(leaf.collection, *leaf.path): jnp.asarray(_to_flax(state[leaf.key], leaf),
                                                     jnp.float32)
          for leaf in leaves}
  return traverse_util.unflatten_dict(flat)


# ---------------------------------------------------------------------------- writing

def _is_deploy_tree(variables: Mapping[str, Any]) -> bool:
  stem = variables.get('params', {}).get('stage0', {})
  return isinstance(stem, Mapping) and 'reparam_conv' in stem


def _is_qarepvgg_tree(variables: Mapping[str, Any]) -> bool:
  stem = variables.get('params', {}).get('stage0', {})
  return isinstance(stem, Mapping) and 'conv3x3' in stem and 'bn' in stem


def to_torch_state_dict(variables: Mapping[str, Any], name: str, naming: str = 'official',
                        framework: str = 'numpy') -> dict[str, Any]:
  """The PyTorch state dict of Flax ``variables`` of ``name``, the inverse of
  ``load_torch_weights``.

  A training-time tree gives the training-time state dict (with
  ``num_batches_tracked = 0`` for every BatchNorm), a deploy tree the deploy one, so
  that ``load_state_dict(..., strict=True)`` of the official (``repvgg.py``,
  ``repvggplus.py``) or timm (``timm.create_model('repvgg_a0')``) class accepts it.

  Args:
    variables: ``{'params'[, 'batch_stats']}`` of ``create_model(name, num_classes,
      deploy)`` (XLA convs: Winograd-transformed kernels have other shapes).
    name: the variant.
    naming: ``'official'`` or ``'timm'`` (not for RepVGGplus, which timm lacks).
    framework: ``'numpy'`` (arrays; no torch needed) or ``'torch'`` (tensors).

  A training-time QARepVGG tree is refused: no public PyTorch classifier names its
  blocks (YOLOv6 uses them inside detectors only); its deploy tree is a plain RepVGG
  deploy tree and exports as one.
  """
  if framework not in ('numpy', 'torch'):
    raise ValueError(f"framework {framework!r}: accepted are 'numpy', 'torch'")
  if not isinstance(variables, Mapping) or 'params' not in variables:
    raise ValueError("expected Flax variables {'params'[, 'batch_stats']}, got "
                     f'{type(variables).__name__}')
  if _is_qarepvgg_tree(variables):
    raise ValueError('QARepVGG training-time weights have no PyTorch naming mapped; export '
                     'rv.reparameterize(variables), a plain RepVGG deploy tree, instead')
  deploy = _is_deploy_tree(variables)
  num_classes = num_classes_of(variables)
  leaves = _leaves(name, naming, deploy, num_classes)
  flat = traverse_util.flatten_dict(dict(variables))
  expected = {(leaf.collection, *leaf.path): leaf for leaf in leaves}
  for path in list(expected) + [p for p in flat if p not in expected]:
    if path not in flat or path not in expected:
      raise ValueError(
          f'variables do not fit {name} ({"deploy" if deploy else "training-time"}, '
          f'{num_classes} classes): {"/".join(path)} is '
          f'{"missing" if path not in flat else "unexpected"}')
    if tuple(np.shape(flat[path])) != expected[path].shape:
      raise ValueError(f'variables do not fit {name}: {"/".join(path)} has shape '
                       f'{tuple(np.shape(flat[path]))}, expected {expected[path].shape}')
  state = {}
  for leaf in leaves:
    state[leaf.key] = np.array(_to_torch(
        np.asarray(flat[(leaf.collection, *leaf.path)], np.float32), leaf), order='C')
    if leaf.key.endswith('.running_var'):
      state[leaf.key[:-len('running_var')] + 'num_batches_tracked'] = np.zeros((), np.int64)
  if framework == 'torch':
    import torch
    return {k: torch.from_numpy(v) for k, v in state.items()}
  return state


def save_torch_state_dict(state_dict: StateDict, path: PathLike) -> None:
  """Write a state dict atomically: ``.pth``/``.pt`` with ``torch.save``,
  ``.safetensors`` with ``safetensors.numpy`` (no torch needed)."""
  path = os.fspath(path)
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,):
    raise ValueError(f'{path}: unknown file type {suffix!r}; accepted are '
                     f'{", ".join(TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,))}')
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-', suffix=suffix)
  os.close(fd)
  try:
    arrays = {k: np.ascontiguousarray(_as_numpy(v)) for k, v in state_dict.items()}
    if suffix == SAFETENSORS_SUFFIX:
      from safetensors.numpy import save_file
      save_file(arrays, tmp)
    else:
      import torch
      torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


# ---------------------------------------------------------------------------- pretrained

def timm_model_name(name: str) -> Optional[str]:
  """timm's name of variant ``name`` (``'repvgg_b1g4'``), None where timm lacks it
  (the g2 variants and RepVGGplus)."""
  variant = get_variant(name)
  if variant.plus or variant.groups == 2:
    return None
  return 'repvgg_' + variant.name.split('-', 1)[1].lower()


def _hub_repo(name: str) -> Optional[str]:
  model = timm_model_name(name)
  return model and f'timm/{model}.rvgg_in1k'


def _with_num_classes(variables: dict[str, Any], name: str, num_classes: int) -> dict[str, Any]:
  """``variables`` for a model with ``num_classes`` outputs: classifiers whose shape
  changes are zero-initialized (``num_classes=0`` drops the main one)."""
  deploy = 'batch_stats' not in variables
  target = variable_shapes(create_model(name, num_classes=num_classes, deploy=deploy))
  loaded = traverse_util.flatten_dict(variables)
  flat = {path: (loaded[path] if path in loaded and loaded[path].shape == struct.shape
                 else jnp.zeros(struct.shape, struct.dtype))
          for path, struct in traverse_util.flatten_dict(dict(target)).items()}
  return traverse_util.unflatten_dict(flat)


def pretrained(name: str, path: Optional[PathLike] = None, num_classes: int = 1000,
               cache_dir: PathLike = DEFAULT_CACHE_DIR) -> dict[str, Any]:
  """Variables of the published ImageNet weights of ``name``.

  Looks, in order, at ``path`` (a ``.pth``/``.pt``/``.safetensors`` file, e.g. the
  authors' ``RepVGG-B2-train.pth``), at ``<cache_dir>/<timm repo>.safetensors``, and
  on a connected machine fetches timm's ``model.safetensors`` through huggingface_hub.
  Offline, the error says which file to download and where to put it.

  Args:
    name: the variant.
    path: a local weights file; official or timm naming, training-time or deploy.
    num_classes: classifier outputs; a value other than the file's (1000) gives a
      zero-initialized classifier to fine-tune, 0 none.
    cache_dir: where downloaded timm weights are looked for.
  """
  get_variant(name)
  repo = _hub_repo(name)
  if path is None:
    if repo is None:
      raise FileNotFoundError(
          f'no downloadable weights for {name} (timm publishes none); download the '
          f"authors' {name} file (e.g. {name}-train.pth) from the links in "
          'https://github.com/DingXiaoH/RepVGG#readme and pass path=<that file>')
    cached = os.path.join(os.path.expanduser(os.fspath(cache_dir)),
                          f'{repo.split("/")[1]}.safetensors')
    path = cached if os.path.isfile(cached) else _download(repo, cached)
  variables = load_torch_weights(path, name)
  return _with_num_classes(variables, name, num_classes)


def _download(repo: str, cached: str) -> str:
  url = f'https://huggingface.co/{repo}/resolve/main/model.safetensors'
  try:
    from huggingface_hub import hf_hub_download
    return hf_hub_download(repo_id=repo, filename='model.safetensors')
  except Exception as e:  # noqa: BLE001 -- no hub, no network, no such file: same advice
    raise FileNotFoundError(
        f'could not fetch {repo} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}); '
        f'download {url} and save it as {cached}, or pass path=<a local .pth/.safetensors '
        'file>') from None
