"""RepVGG training on a GPU: throughput beside timm, the make-train recipe in float32 and
bfloat16, and the data-parallel and resume tests.

    python tools/gpu_train_check.py OUT_DIR            # ~8 minutes on an H100
    python tools/gpu_train_check.py OUT_DIR --quick    # the same steps, tiny (CPU smoke test)

1. ``benchmark_train.py``: RepVGG-A0 and B1 at 224x224, batch 256, bfloat16 (and B1 in
   float32), this repo's pmapped train step vs timm's in PyTorch (channels_last, autocast),
   alternating in one process; images/s and the share of the measured matmul rate.
2. ``train.py`` with ``make train``'s recipe (configs/fashion_mnist.py, RepVGG-A0 on
   Fashion-MNIST; XLA's convolutions: ``patches`` is a CPU work-around) in float32 and in
   bfloat16: accuracy of both structures and wall time. The IDX files come from
   ``--fashion-mnist-dir`` (default: .gpu_carry/fashion-mnist, see ``make gpu-carry``).
3. tests/test_train.py's one-device-vs-four and kill-and-resume tests with
   ``REPVGG_TRAIN_TEST_PLATFORM=cuda``: one-device runs (and the reference) on the GPU,
   four-device runs on the CPU's virtual devices.
4. A summary table (stdout and OUT_DIR/summary.md; everything in OUT_DIR/summary.json).

A failed step is reported and the next one still runs; the exit status is 1 if any failed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, Callable

import check_steps  # noqa: E402  (tools/, the script's own folder)
from check_steps import ROOT, run  # noqa: E402

sys.path.insert(0, ROOT)

from repvgg_jax import cli  # noqa: E402


def throughput_commands(out: str, quick: bool) -> list[tuple[list[str], str]]:
  """The benchmark_train.py command lines, each with the JSON file it writes."""
  if quick:
    runs, common = [('RepVGG-A0', 'bfloat16')], ['--batch-size', '4', '--image-size', '32',
                                                  '--steps', '1', '--rounds', '1']
  else:
    runs = [('RepVGG-A0', 'bfloat16'), ('RepVGG-B1', 'bfloat16'), ('RepVGG-B1', 'float32')]
    common = ['--batch-size', '256', '--image-size', '224', '--steps', '5', '--rounds', '3']
  commands = []
  for model, dtype in runs:
    path = os.path.join(out, f'train_step_{model}_{dtype}.json')
    commands.append(([sys.executable, 'benchmark_train.py', '--model', model, '--dtype', dtype,
                      '--channels', '3', '--num-classes', '1000', '--conv-impl', 'xla',
                      '--channels-last', '--threads', '2', '--json', path, *common], path))
  return commands


def step_throughput(out: str, quick: bool) -> list[dict[str, Any]]:
  records = []
  for command, path in throughput_commands(out, quick):
    run(command, timeout=120 if quick else 300)
    with open(path) as f:
      records += json.load(f)
  return records


def recipe_commands(out: str, quick: bool, fashion_mnist_dir: str
                    ) -> list[tuple[list[str], str, str]]:
  """The train.py command lines of make train's recipe: (command, dtype, workdir)."""
  steps = ['--config.num_train_steps=3'] if quick else []
  commands = []
  for dtype in ('float32', 'bfloat16'):
    workdir = os.path.join(out, f'fashion_mnist_{dtype}')
    commands.append(([sys.executable, 'train.py', '--config', 'configs/fashion_mnist.py',
                      '--workdir', workdir, f'--config.dtype={dtype}', '--config.conv_impl=xla',
                      f'--config.data_dir={fashion_mnist_dir}', *steps], dtype, workdir))
  return commands


def make_train_recipe(out: str, quick: bool, fashion_mnist_dir: str) -> list[dict[str, Any]]:
  results = []
  for command, dtype, workdir in recipe_commands(out, quick, fashion_mnist_dir):
    start = time.perf_counter()
    run(command, timeout=200 if quick else 420)
    wall = time.perf_counter() - start
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      lines = [json.loads(line) for line in f]
    final = [m for m in lines if 'deploy_eval_accuracy' in m][-1]
    speeds = [m['images_per_second'] for m in lines if 'images_per_second' in m]
    results.append({'dtype': dtype, 'wall_seconds': wall, 'step': final['step'],
                    'eval_accuracy': final['eval_accuracy'],
                    'deploy_eval_accuracy': final['deploy_eval_accuracy'],
                    'images_per_second': speeds[-1] if speeds else None})
    print(f'make-train recipe {dtype}: {results[-1]}', flush=True)
  return results


def train_tests(quick: bool) -> str:
  """pytest's last line (``--quick``: only collects the tests, which test_train.py runs on
  the CPU anyway)."""
  command = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
             'tests/test_train.py', '-k', 'one_device or killed']
  if quick:
    out = run(command + ['--collect-only'], timeout=120)
  else:
    out = run(command, timeout=400, env={'REPVGG_TRAIN_TEST_PLATFORM': 'cuda'})
  return out.strip().splitlines()[-1]


def summary_markdown(summary: dict[str, Any]) -> str:
  lines = ['# GPU training check', '', f'{summary["date"]} UTC', '']
  if summary.get('throughput'):
    lines += ['| framework | model | dtype | batch | images/s | TFLOP/s | % of matmul |',
              '|---|---|---|---|---|---|---|']
    for r in summary['throughput']:
      lines.append(f'| {r["framework"]} | {r["model"]} | {r["dtype"]} | {r["batch_size"]} | '
                   f'{r["images_per_second"]:.1f} | {r["achieved_tflops"]:.1f} | '
                   f'{100 * r["matmul_fraction"]:.0f} |')
    lines += ['', f'device: {summary["throughput"][0]["device"]}', '']
  if summary.get('recipe'):
    lines += ['| make-train recipe | steps | training-time acc | deploy acc | images/s | wall s |',
              '|---|---|---|---|---|---|']
    for r in summary['recipe']:
      lines.append(f'| {r["dtype"]} | {r["step"]} | {100 * r["eval_accuracy"]:.2f}% | '
                   f'{100 * r["deploy_eval_accuracy"]:.2f}% | {r["images_per_second"] or 0:.0f} | '
                   f'{r["wall_seconds"]:.0f} |')
    lines.append('')
  if summary.get('tests'):
    lines += [f'tests/test_train.py (one device vs four, kill and resume): {summary["tests"]}',
              '']
  return '\n'.join(lines)


def main() -> int:
  parser = cli.ArgumentParser(__doc__, prog='gpu_train_check.py')
  parser.add_argument('out', metavar='OUT_DIR', help='directory for the results (created)')
  parser.add_argument('--quick', action='store_true',
                      help='tiny sizes, a few steps, on the CPU (a smoke test of the script)')
  parser.add_argument('--fashion-mnist-dir', metavar='DIR',
                      default=os.path.join(ROOT, '.gpu_carry', 'fashion-mnist'),
                      help='the Fashion-MNIST IDX files (default: %(default)s)')
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  summary: dict[str, Any] = {}
  steps: dict[str, Callable[[], Any]] = {
      'throughput': lambda: step_throughput(args.out, args.quick),
      'recipe': lambda: make_train_recipe(args.out, args.quick, args.fashion_mnist_dir),
      'tests': lambda: train_tests(args.quick),
  }
  return check_steps.run_steps(args.out, steps, summary, summary_markdown)


if __name__ == '__main__':
  sys.exit(main())
