"""What a run reports: metrics.jsonl and TensorBoard events, each step once, a resumed
run's values replacing those logged after the checkpoint it resumes from."""

import glob
import json
import os

import pytest

from repvgg_jax.training import metrics


def test_a_resumed_run_replaces_the_steps_logged_after_its_checkpoint(tmp_path, monkeypatch):
  event_accumulator = pytest.importorskip(
      'tensorboard.backend.event_processing.event_accumulator')
  monkeypatch.setattr(metrics.time, 'time', lambda: 1795000000.0)  # both in one second
  interrupted = metrics.MetricsWriter(str(tmp_path), enabled=True)
  for step in (1, 2, 3, 4):  # steps 3 and 4 come after the checkpoint at step 2
    interrupted.write(step, {'train_loss': float(step)})
  interrupted.close()
  resumed = metrics.MetricsWriter(str(tmp_path), enabled=True)
  resumed.truncate_after(2)
  for step in (3, 4):
    resumed.write(step, {'train_loss': 10.0 * step})
  resumed.close()

  expected = [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
  assert len(glob.glob(os.path.join(tmp_path, 'events.out.tfevents.*'))) == 2
  events = event_accumulator.EventAccumulator(str(tmp_path))
  events.Reload()
  assert [(e.step, e.value) for e in events.Scalars('train_loss')] == expected
  with open(tmp_path / metrics.METRICS_FILE) as f:
    assert [(m['step'], m['train_loss']) for m in map(json.loads, f)] == expected


def test_only_the_lead_process_writes(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path), enabled=False)
  writer.write(1, {'train_loss': 1.0})
  writer.truncate_after(0)
  writer.close()
  assert os.listdir(tmp_path) == []
