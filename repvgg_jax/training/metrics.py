"""What a run reports: metrics.jsonl and TensorBoard events (written by process 0, with no
TensorFlow needed), the training throughput, a progress bar and the final summary."""

from __future__ import annotations

import itertools
import json
import math
import os
import socket
import sys
import time
from typing import Any

METRICS_FILE = 'metrics.jsonl'
_EVENT_FILE_IDS = itertools.count()


class MetricsWriter:
  """Appends ``{'step': s, **metrics}`` lines to ``metrics.jsonl`` and scalars to TensorBoard
  event files, on the lead process only (``enabled``).

  The events are written with the ``tensorboard`` package's record writer into a plain
  file: its ``EventFileWriter`` imports TensorFlow whenever it is installed (for
  ``tf.io.gfile``: 3.6 s of start-up), and GPU images often have none. Without
  ``tensorboard`` installed, metrics.jsonl alone is written and a one-line note says so.
  """

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self._events = None
    if not enabled:
      return
    try:
      from tensorboard.compat.proto import event_pb2, summary_pb2
      from tensorboard.summary.writer.record_writer import RecordWriter
    except ImportError:
      print(f'note: tensorboard is not installed; metrics go to {self.path} only',
            file=sys.stderr, flush=True)
      return
    self._event, self._summary = event_pb2.Event, summary_pb2.Summary
    self._session_log = event_pb2.SessionLog
    # TensorBoard's file naming; a resumed run starts a new file beside the old ones (the
    # counter keeps two writers of one process in one second apart).
    name = (f'events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.'
            f'{os.getpid()}.{next(_EVENT_FILE_IDS)}')
    self._events = RecordWriter(open(os.path.join(workdir, name), 'wb'))
    self._add_event(self._event(wall_time=time.time(), file_version='brain.Event:2'))

  def _add_event(self, event: Any) -> None:
    self._events.write(event.SerializeToString())
    self._events.flush()

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': step, **metrics}, sort_keys=True) + '\n')
    if self._events is not None:
      values = [self._summary.Value(tag=name, simple_value=float(value))
                for name, value in metrics.items()]
      self._add_event(self._event(wall_time=time.time(), step=step,
                                  summary=self._summary(value=values)))

  def truncate_after(self, step: int) -> None:
    """Forget what was logged beyond ``step``, after the checkpoint a run resumes from:
    the lines of metrics.jsonl, and the events of earlier files, which TensorBoard drops
    from ``step + 1`` on when it reads a session start there."""
    if not self.enabled:
      return
    if self._events is not None and step > 0:
      self._add_event(self._event(wall_time=time.time(), step=step + 1,
                                  session_log=self._session_log(
                                      status=self._session_log.START)))
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [line for line in f if line.strip() and json.loads(line)['step'] <= step]
    with open(self.path, 'w') as f:
      f.writelines(lines)

  def close(self) -> None:
    if self._events is not None:
      self._events.close()


class Throughput:
  """Training images per second: over the steps since the last ``window()`` (for the log),
  and over the whole run (``run()``). The first step, which compiles, is not timed;
  ``restart_window()`` leaves out time spent elsewhere (an evaluation)."""

  def __init__(self, batch_size: int):
    self.batch_size = batch_size
    self.last = math.nan
    self._run_start = self._window_start = None
    self._run_steps = self._window_steps = 0

  def step_done(self) -> None:
    if self._run_start is None:
      self._run_start = self._window_start = time.perf_counter()
      return
    self._run_steps += 1
    self._window_steps += 1

  def window(self) -> float:
    """Images/s of the steps since the last window (NaN before any timed step)."""
    if self._window_steps:
      self.last = self._window_steps * self.batch_size / (
          time.perf_counter() - self._window_start)
    self.restart_window()
    return self.last

  def restart_window(self) -> None:
    self._window_start, self._window_steps = time.perf_counter(), 0

  def run(self) -> float:
    """Images/s over every timed step so far, evaluations and checkpoints included."""
    if not self._run_steps:
      return self.last
    return self._run_steps * self.batch_size / (time.perf_counter() - self._run_start)


def progress_bar(total: int, initial: int, enabled: bool):
  """A tqdm bar of the steps, on stdout, shown by the lead process only."""
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, disable=not enabled, unit='step',
              dynamic_ncols=True, file=sys.stdout)


def summary_table(summary: dict[str, Any]) -> str:
  """The run's result as a short Markdown table."""
  rows = [('training-time model: eval accuracy', f'{100 * summary["eval_accuracy"]:.2f}%'),
          ('deploy model: eval accuracy', f'{100 * summary["deploy_eval_accuracy"]:.2f}%')]
  if 'ema_eval_accuracy' in summary:
    rows.append(('EMA weights: eval accuracy', f'{100 * summary["ema_eval_accuracy"]:.2f}%'))
  if 'skipped_images' in summary:
    rows.append(('unreadable images skipped', str(summary['skipped_images'])))
  rows += [('training images/s (after compilation)', f'{summary["images_per_second"]:.0f}'),
           ('steps', str(summary['step'])),
           ('checkpoints', summary['checkpoints']),
           ('deploy variables', summary['deploy_variables'])]
  width = max(len(r[0]) for r in rows)
  value_width = max(len(r[1]) for r in rows)
  lines = [f'| {name:<{width}} | {value:<{value_width}} |' for name, value in rows]
  rule = f'|{"-" * (width + 2)}|{"-" * (value_width + 2)}|'
  return '\n'.join([f'| {"result":<{width}} | {"":<{value_width}} |', rule] + lines)
