"""What the command lines (train.py, convert.py, benchmark.py, benchmark_train.py) share:
one flag name per concept, hyphenated (``--image-size``), the underscore spelling accepted
too (``--image_size``, as absl spelled them), and one-line errors.

``train.py``'s configuration keeps ml_collections' syntax, ``--config FILE[:ARG]`` and
``--config.<field>=value``, whose field names are the config's own.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Optional, Sequence

from repvgg_jax.convolution import CONV_IMPLS
from repvgg_jax.models import DTYPES
from repvgg_jax.quantization import KEEP_FLOAT
from repvgg_jax.variants import MIN_IMAGE_SIZE, get_variant, list_models


class ArgumentParser(argparse.ArgumentParser):
  """``argparse`` with the project's conventions: description and epilog from a module
  docstring (first paragraph, rest), and ``--flag_name`` read as ``--flag-name``."""

  def __init__(self, doc: Optional[str] = None, **kwargs: Any):
    if doc is not None:
      first, _, rest = doc.partition('\n\n')
      kwargs.setdefault('description', first)
      kwargs.setdefault('epilog', rest or None)
      kwargs.setdefault('formatter_class', argparse.RawDescriptionHelpFormatter)
    kwargs.setdefault('allow_abbrev', False)
    super().__init__(**kwargs)

  def parse_known_args(self, args: Optional[Sequence[str]] = None, namespace: Any = None):
    args = sys.argv[1:] if args is None else list(args)
    return super().parse_known_args([_hyphenated(a) for a in args], namespace)


def _hyphenated(arg: str) -> str:
  """``--flag_name[=value]`` -> ``--flag-name[=value]``; config overrides, short flags,
  values and positionals unchanged."""
  if not arg.startswith('--') or arg.startswith('--config'):
    return arg
  name, sep, value = arg.partition('=')
  return name.replace('_', '-') + sep + value


# ------------------------------------------------------------------------------------------
# Values: parsers that turn a bad value into a usage error naming what is accepted.


def model_name(text: str) -> str:
  try:
    get_variant(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None
  return text


def model_names(text: str) -> list[str]:
  return [model_name(name) for name in text.split(',') if name]


def positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f'{text!r}: expected a positive integer')
  return value


def positive_ints(text: str) -> list[int]:
  try:
    values = [int(v) for v in text.split(',') if v]
  except ValueError:
    values = []
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f'{text!r}: expected comma-separated positive '
                                     'integers, e.g. 1,8,32')
  return values


def image_size(text: str) -> int:
  size = positive_int(text)
  if size < MIN_IMAGE_SIZE:
    raise argparse.ArgumentTypeError(f'{size}: RepVGG downsamples 32x, use at least '
                                     f'{MIN_IMAGE_SIZE}')
  return size


def names(text: str) -> list[str]:
  """A comma-separated list of names, possibly empty."""
  return [v for v in text.split(',') if v]


def choices(accepted: Sequence[str]) -> Callable[[str], list[str]]:
  """A comma-separated list of values from ``accepted``."""
  def parse(text: str) -> list[str]:
    values = [v for v in text.split(',') if v]
    unknown = [v for v in values if v not in accepted]
    if unknown or not values:
      raise argparse.ArgumentTypeError(f'{text!r}: accepted are {", ".join(accepted)}')
    return values
  return parse


# ------------------------------------------------------------------------------------------
# Flags: the same concept has the same name (and help) in every command line.


def add_model(parser: argparse.ArgumentParser, **kwargs: Any) -> None:
  kwargs.setdefault('help', f'the model, one of: {", ".join(list_models())}')
  parser.add_argument('--model', type=model_name, metavar='NAME', **kwargs)


def add_image_size(parser: argparse.ArgumentParser, default: int = 224, **kwargs: Any) -> None:
  kwargs.setdefault('help', f'square input size in pixels (default: {default})')
  parser.add_argument('--image-size', type=image_size, default=default, **kwargs)


def add_dtype(parser: argparse.ArgumentParser, **kwargs: Any) -> None:
  kwargs.setdefault('help', 'compute dtype (parameters stay float32; default: float32)')
  parser.add_argument('--dtype', choices=tuple(DTYPES), default='float32', **kwargs)


def add_conv_impl(parser: argparse.ArgumentParser, accepted: Sequence[str] = CONV_IMPLS,
                  default: str = 'xla', extra_names: Sequence[str] = (),
                  **kwargs: Any) -> None:
  kwargs.setdefault('help', 'how convolutions are computed (repvgg_jax.convolution; '
                    f'default: {default})')
  parser.add_argument('--conv-impl', *extra_names, choices=tuple(accepted), default=default,
                      **kwargs)


def add_workdir(parser: argparse.ArgumentParser, **kwargs: Any) -> None:
  kwargs.setdefault('help', 'a training run of train.py (run.json, checkpoints/)')
  parser.add_argument('--workdir', metavar='DIR', **kwargs)


def add_step(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--step', type=int, help='checkpoint step of --workdir (default: latest)')


def add_keep_float(parser: Any) -> None:
  """``--keep-float``: the top-level modules an int8 model keeps in float."""
  parser.add_argument('--keep-float', type=names, default=list(KEEP_FLOAT),
                      help='comma-separated top-level modules kept in float by int8 '
                      f'quantization (default: {",".join(KEEP_FLOAT)}; "" for none)')


def add_overwrite(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--overwrite', action='store_true', help='replace an existing output')


def fail(prog: Optional[str], error: Any) -> int:
  """Print ``prog: error: ...`` (``error: ...`` without a ``prog``: a run's own messages
  around it say which program) as one line to stderr; the exit status 1."""
  message = str(error).strip().splitlines() or [type(error).__name__]
  print(f'{prog + ": " if prog else ""}error: {message[0]}', file=sys.stderr, flush=True)
  return 1
