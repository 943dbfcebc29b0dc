"""Batches computed ahead in a background thread, so that the trainer's thread only waits
when the input pipeline is slower than the step."""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from typing import Iterator

from repvgg_jax.data.info import Batch


class Prefetcher:
  """Iterates ``batches`` in a background thread, up to ``size`` batches ahead, from the
  moment it is created (so the first batches are ready when the trainer has compiled).
  ``close()``, or dropping the iterator, stops the thread."""

  _END = object()

  def __init__(self, batches: Iterator[Batch], size: int = 3):
    self._ready: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._done = False
    self._thread = threading.Thread(target=self._work, args=(batches, self._ready, self._stop),
                                    daemon=True, name='input-pipeline')
    self._thread.start()
    _LIVE_PREFETCHERS.add(self)

  @classmethod
  def _work(cls, batches: Iterator[Batch], ready: queue.Queue, stop: threading.Event):
    # A classmethod: the thread must not hold the iterator, or dropping it would not stop it.
    def put(item) -> bool:
      while not stop.is_set():
        try:
          ready.put(item, timeout=0.1)
          return True
        except queue.Full:
          continue
      return False

    try:
      for batch in batches:
        if not put(batch):
          return
      put(cls._END)
    except BaseException as error:  # handed to the consumer, who re-raises it
      put(error)
    finally:
      # Generators release what they hold (worker processes) here, not at garbage collection.
      close = getattr(batches, 'close', None)
      if close is not None:
        close()

  def __iter__(self) -> 'Prefetcher':
    return self

  def __next__(self) -> Batch:
    if self._done:
      raise StopIteration
    item = self._ready.get()
    if item is self._END or isinstance(item, BaseException):
      self.close()
      if item is self._END:
        raise StopIteration
      raise item
    return item

  def close(self) -> None:
    """Stops the background thread (after the batch it is computing)."""
    self._done = True
    self._stop.set()

  def join(self, timeout: float) -> None:
    """Waits up to ``timeout`` seconds for the background thread to end."""
    self._thread.join(timeout)

  def __del__(self):
    self._stop.set()


_LIVE_PREFETCHERS: 'weakref.WeakSet[Prefetcher]' = weakref.WeakSet()


@atexit.register
def _stop_prefetchers() -> None:
  """Lets the batch threads finish their batch before the interpreter tears down: a daemon
  thread still inside numpy or TensorFlow at exit can abort the process."""
  for prefetcher in list(_LIVE_PREFETCHERS):
    prefetcher.close()
    prefetcher.join(timeout=10)
