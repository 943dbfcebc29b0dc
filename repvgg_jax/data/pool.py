"""Worker processes that compute the rows of batches into shared memory: the trainer's
process only plans the batches (which files, which random draws) and copies each finished
batch out, so per-example Python (decoding, cropping) never runs under its GIL.

Each batch is cut into one chunk of rows per worker; a chunk's rows depend only on its
task, so the number of workers changes nothing in the batches. A worker that raises hands
its error to the consumer (a file's ``UnreadableImageError`` names the file); a worker that
dies (killed, or crashed in a decoder) breaks the pool, and the consumer gets that
``BrokenProcessPool`` error rather than a hang; workers end with the process they work
for.

The workers are forked from multiprocessing's fork server (started once per process, with
this package imported), never from the trainer's process, whose JAX and TensorFlow threads
make ``fork`` unsafe. Like any multiprocessing start method other than fork, the fork server
imports the main script again: a script that streams a folder must start its work under
``if __name__ == '__main__':`` (train.py and the benchmarks do).
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import contextlib
import multiprocessing
import os
import threading
import time
from multiprocessing import shared_memory
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

# Decoding processes: every core (the trainer's thread mostly waits on the accelerator).
WORKERS = max(1, min(16, os.cpu_count() or 1))
# Batches computed ahead: enough that the workers always have a queued chunk.
DEPTH = 3

# In a worker: the batch slots in shared memory and the context of the tasks (set by _attach).
_slots = None
_task_context = None


def _attach(name: str, shape: tuple[int, ...], parent: int, context: Any) -> None:
  global _slots, _task_context
  _task_context = context
  # Mapped as a file, not as SharedMemory(name): in Python < 3.13 that would register the
  # segment with the resource tracker once more, which then warns of a leak at exit.
  _slots = np.memmap(os.path.join('/dev/shm', name), np.float32, 'r+', shape=shape)
  threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: int) -> None:
  """Ends this worker when the process it works for is gone (killed, or ended without
  shutting the pool down): the workers hold their own task queue open, they would wait for
  tasks forever."""
  while _alive(parent):
    time.sleep(1)
  os._exit(1)  # pylint: disable=protected-access


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  # A process that was killed but not yet reaped is a zombie: it still answers kill(pid, 0),
  # and whoever will reap it may first read its output pipes to their end, which the
  # workers hold open (a deadlock, seen with subprocess.communicate).
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except OSError:  # no /proc (not Linux): kill(pid, 0) is all there is
    return True


def _compute(slot: int, start: int, function: Callable[..., Any], rows: Sequence) -> Any:
  return function(_task_context, *rows, out=_slots[slot, start:start + len(rows[0])])


def _context() -> multiprocessing.context.BaseContext:
  # The fork server imports this package (and OpenCV, when installed) once, so each worker
  # starts in milliseconds.
  context = multiprocessing.get_context('forkserver')
  context.set_forkserver_preload(['repvgg_jax.data.folders', 'cv2'])
  return context


def map_batches(tasks: Iterator[tuple[Callable[..., Any], Sequence[Sequence]]],
                *, rows: int, row_shape: tuple[int, ...], context: Any = None,
                workers: Optional[int] = None) -> Iterator[tuple[np.ndarray, list]]:
  """``(batch, results)`` for each ``(function, columns)`` of ``tasks``, in order:
  ``function(context, *column_chunks, out=rows)`` fills the float32 ``[rows, *row_shape]``
  batch chunk by chunk in worker processes (``workers``, default WORKERS) and returns what
  the consumer needs of its chunk (labels, masks, the files it skipped): ``results``, one
  per chunk in row order. ``context`` (a file index) is sent to each worker once, the
  columns (example numbers, draws) with each chunk; ``function`` must be picklable (a
  module-level function or a ``functools.partial`` of one)."""
  workers = workers or WORKERS
  shape = (DEPTH, rows) + tuple(row_shape)
  shared = shared_memory.SharedMemory(create=True, size=int(np.prod(shape)) * 4)
  slots = np.ndarray(shape, np.float32, buffer=shared.buf)
  executor = concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=_context(), initializer=_attach,
      initargs=(shared.name, shape, os.getpid(), context))
  bounds = np.linspace(0, rows, min(workers, rows) + 1).astype(int)
  pending: collections.deque = collections.deque()

  def unlink() -> None:
    with contextlib.suppress(FileNotFoundError):  # by the other of release() and finally
      shared.unlink()

  def release() -> None:
    # At exit, if the consumer's thread has not ended this generator (the interpreter's
    # shutdown stops the executor's threads first): the segment must not outlive us.
    executor.shutdown(wait=False, cancel_futures=True)
    unlink()

  atexit.register(release)
  try:
    tasks = iter(tasks)
    free_slots = list(range(DEPTH))
    while True:
      while free_slots:
        task = next(tasks, None)
        if task is None:
          break
        function, columns = task
        slot = free_slots.pop()
        futures = [executor.submit(_compute, slot, lo, function, [c[lo:hi] for c in columns])
                   for lo, hi in zip(bounds[:-1], bounds[1:])]
        pending.append((slot, futures))
      if not pending:
        return
      slot, futures = pending.popleft()
      results = [future.result() for future in futures]
      batch = slots[slot].copy()
      free_slots.append(slot)
      yield batch, results
  finally:
    # Unlinked first (the mappings stay valid): when this runs at interpreter exit, the
    # shutdown below may never return.
    unlink()
    atexit.unregister(release)
    executor.shutdown(wait=True, cancel_futures=True)
    del slots
    shared.close()
