"""Which examples and random draws make each batch of each process, and the checks of the
batching arguments. Every source that reads examples by index (in memory, image folders)
follows these plans, so its batches obey the determinism contract of the package."""

from __future__ import annotations

import concurrent.futures
import functools
import operator
import os
from typing import Any, Callable, Iterator

import numpy as np

from repvgg_jax.data import randomness


def integer(name: str, value: Any, minimum: int) -> int:
  """``value`` as a Python int (numpy and JAX integers included), at least ``minimum``."""
  try:
    number = operator.index(value)
  except TypeError:
    number = None
  if number is None or number < minimum:
    raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}')
  return number


def check_batching(global_batch_size: Any, process_index: Any, process_count: Any,
                   image_size: Any) -> tuple[int, int, int, int, int]:
  """Validated ``(global_batch_size, local_batch_size, process_index, process_count,
  image_size)``."""
  process_count = integer('process_count', process_count, 1)
  process_index = integer('process_index', process_index, 0)
  if process_index >= process_count:
    raise ValueError(f'process_index must be in [0, {process_count}), got {process_index}')
  global_batch_size = integer('global_batch_size', global_batch_size, 1)
  if global_batch_size % process_count:
    raise ValueError(f'global_batch_size {global_batch_size} is not divisible by the number '
                     f'of processes {process_count}')
  image_size = integer('image_size', image_size, 1)
  return (global_batch_size, global_batch_size // process_count, process_index,
          process_count, image_size)


def train_plan(num_examples: int, *, global_batch_size: int, local_batch_size: int, seed: int,
               start_step: int, process_index: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Endless ``(examples, draws)`` of this process's rows of the global batches from step
  ``start_step`` on: the epochs walk seeded permutations, process ``p`` gets rows
  ``[p*B/P, (p+1)*B/P)``, and the draws of each row are keyed by (seed, step, row)."""
  order = randomness.EpochPermutations(seed, num_examples)
  positions = process_index * local_batch_size + np.arange(local_batch_size)
  step = start_step
  while True:
    yield (order.examples(step * global_batch_size + positions),
           randomness.train_draws(seed, step, positions))
    step += 1


def eval_plan(num_examples: int, *, global_batch_size: int, local_batch_size: int,
              process_index: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """``(examples, mask)`` of this process's rows of each evaluation batch: the split in
  order, once; rows past its end read example 0 and are masked out. Every process gets the
  same number of batches."""
  rows = process_index * local_batch_size + np.arange(local_batch_size)
  for start in range(0, num_examples, global_batch_size):
    positions = start + rows
    mask = positions < num_examples
    yield np.where(mask, positions, 0), mask


# Threads that augment the rows of an in-memory batch in parallel (numpy releases the GIL in
# its loops); half the cores at most, the rest are the trainer's (and tf.data's).
AUGMENT_THREADS = max(1, min(8, (os.cpu_count() or 2) // 2))


@functools.lru_cache(maxsize=1)
def augment_pool() -> concurrent.futures.ThreadPoolExecutor:
  """The threads of ``in_chunks`` (created once; ``cache_clear()`` after changing
  AUGMENT_THREADS)."""
  return concurrent.futures.ThreadPoolExecutor(AUGMENT_THREADS,
                                               thread_name_prefix='input-pipeline-rows')


def in_chunks(function: Callable[..., np.ndarray], *arrays: np.ndarray) -> np.ndarray:
  """``function(*arrays)`` for row-wise functions, computed on AUGMENT_THREADS slices of the
  rows in parallel and concatenated (the same result as one call)."""
  chunks = min(AUGMENT_THREADS, len(arrays[0]))
  if chunks <= 1:
    return function(*arrays)
  bounds = np.linspace(0, len(arrays[0]), chunks + 1).astype(int)
  parts = augment_pool().map(lambda lo, hi: function(*(a[lo:hi] for a in arrays)),
                             bounds[:-1], bounds[1:])
  return np.concatenate(list(parts))
