"""RepVGG on a GPU: exactness, inference speed beside PyTorch, and the portable export.

    python tools/gpu_check.py OUT_DIR            # the full check, ~8 minutes on an H100
    python tools/gpu_check.py OUT_DIR --quick    # the same steps, tiny (CPU smoke test)

1. Exactness: for a plain, a grouped, an SE and the RepVGGplus variant (A0, B1g4, D2se,
   L2pse), random weights and far-from-default BatchNorm statistics; the deploy model of
   ``jax.jit(rv.reparameterize)`` (run on the device) against the training-time model's eval
   output at ``precision='highest'`` (the 1e-5 bar) and, for information, at the default
   precision (TF32 on NVIDIA GPUs); and the same weights in timm, in PyTorch on the GPU
   (TF32 off), against JAX.
2. ``benchmark.py``: A0 and B1 at 224x224, batch 1 and 256, bfloat16 (and B1 batch 256 in
   float32): the training-time graph, the XLA deploy graph and timm's reparameterized model
   in PyTorch (channels_last, autocast; torch.compile for B1 at batch 256), round-robin in
   one process; JSON and PNG into OUT_DIR.
3. ``convert.py deploy --export stablehlo`` of a training run on the GPU, and a process
   with nothing but jax that deserializes the export and runs it at two batch sizes.
4. A summary table (stdout and OUT_DIR/summary.md; everything in OUT_DIR/summary.json).

Each step's failure is reported in the summary and the next step still runs; the exit
status is 1 if any step failed.
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

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import repvgg_jax as rv  # noqa: E402
from repvgg_jax import benchmarking, checkpoint, cli, torch_io  # noqa: E402
from repvgg_jax.equivalence import TOLERANCE, random_variables, relative_error  # noqa: E402

EXACTNESS_MODELS = ('RepVGG-A0', 'RepVGG-B1g4', 'RepVGG-D2se', 'RepVGGplus-L2pse')


def exactness(models, shape) -> list[dict[str, Any]]:
  """Deploy vs training-time eval output on the default device, per model."""
  rows = []
  x = jax.random.normal(jax.random.PRNGKey(1), shape, jnp.float32)
  reparameterize = jax.jit(rv.reparameterize)
  for name in models:
    start = time.perf_counter()
    variables = jax.device_put(random_variables(rv.create_model(name), x[:1]))
    deploy_variables = reparameterize(variables)  # on the device
    row = {'model': name, 'input': list(shape), 'reparameterize_device': str(
        jax.tree_util.tree_leaves(deploy_variables)[0].devices())}
    for precision in ('highest', None) if jax.default_backend() != 'cpu' else ('highest',):
      train = jax.jit(rv.create_model(name, precision=precision).apply)
      deploy = jax.jit(rv.create_model(name, deploy=True, precision=precision).apply)
      reference = train(variables, x)
      row[f'error_{precision or "default"}'] = relative_error(deploy(deploy_variables, x),
                                                              reference)
      if precision == 'highest':
        row['timm_error'] = _timm_error(name, variables, x, reference)
    row.setdefault('error_default', row['error_highest'])  # the CPU has one precision
    row['seconds'] = time.perf_counter() - start
    rows.append(row)
    print(f'exactness {name}: {row}', flush=True)
  return rows


def _timm_error(name: str, variables: Any, x: jax.Array, reference: jax.Array):
  """timm's model with the same weights, in PyTorch on the GPU (TF32 off), against JAX."""
  timm_name = torch_io.timm_model_name(name)
  try:
    import timm
    import torch
  except ImportError:
    return None
  if timm_name is None:
    return None
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  state = torch_io.to_torch_state_dict(jax.device_get(variables), name, 'timm', 'torch')
  with torch.device('meta'):
    model = timm.create_model(timm_name, pretrained=False)
  model.load_state_dict(state, strict=True, assign=True)
  model = model.eval().to(device)
  with torch.no_grad():
    logits = model(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2)).to(device))
  return relative_error(logits.cpu().numpy(), reference)


def benchmark_commands(out: str, quick: bool, torch: bool) -> list[tuple[list[str], str]]:
  """The benchmark.py command lines, each with the JSON file it writes."""
  if quick:  # the first run, small and fast
    size, batches, big = '32', '1,2', 'RepVGG-A0'
    timing = ['--min-calls', '1', '--min-seconds', '0']
  else:
    size, batches, big = '224', '1,256', 'RepVGG-B1'
    timing = ['--min-seconds', '2']
  runs = [('bfloat16', ','.join(dict.fromkeys(['RepVGG-A0', big])), batches,
           'torch-channels_last'),
          ('float32', big, batches.split(',')[-1], 'torch-channels_last'),
          ('bfloat16', big, '256', 'torch-compile')]
  commands = []
  for i, (dtype, models, batch_sizes, torch_variants) in enumerate(runs[:1] if quick else runs):
    path = os.path.join(out, f'benchmark_{i}_{dtype}')
    command = [sys.executable, 'benchmark.py', '--models', models, '--batch-sizes',
               batch_sizes, '--dtype', dtype, '--image-size', size, '--structures',
               'train,deploy', '--json', path + '.json', '--plot', path + '.png', *timing]
    if torch:
      command += ['--torch', '--torch-variants', torch_variants]
    commands.append((command, path + '.json'))
  return commands


def benchmarks(out: str, quick: bool) -> list[dict[str, Any]]:
  """benchmark.py runs; their records."""
  records = []
  for command, path in benchmark_commands(out, quick, _has_torch()):
    run(command, timeout=120 if quick else 400)
    with open(path) as f:
      records += json.load(f)
  return records


def _has_torch() -> bool:
  try:
    import timm  # noqa: F401
    import torch  # noqa: F401
  except ImportError:
    return False
  return True


def portable_export(out: str, quick: bool) -> dict[str, Any]:
  """A training run (random weights) -> convert.py deploy --export stablehlo -> a
  jax-only process that runs the export at two batch sizes."""
  name, classes, size = 'RepVGG-A0', 10, 32 if quick else 224
  workdir, deploy_dir = os.path.join(out, 'run'), os.path.join(out, 'deploy')
  model = rv.create_model(name, classes)
  variables = random_variables(model, jnp.zeros((1, size, size, 3)))
  os.makedirs(workdir, exist_ok=True)
  checkpoint.write_json(os.path.join(workdir, checkpoint.RUN_METADATA),
                        checkpoint.model_metadata(name, classes, size))
  with checkpoint.checkpoint_manager(workdir) as manager:
    checkpoint.save_train_state(manager, 1, {**jax.device_get(variables), 'step': np.int64(1)})
  platform = jax.default_backend()
  run([sys.executable, 'convert.py', 'deploy', '--workdir', workdir, '--output', deploy_dir,
       '--export', 'stablehlo', '--platforms', platform, '--overwrite'], timeout=300)
  script = ('import sys, jax, numpy as np\n'
            'exported = jax.export.deserialize(open(sys.argv[1], "rb").read())\n'
            'for n in (1, 5):\n'
            f'  x = np.random.default_rng(n).normal(size=(n, {size}, {size}, 3))\n'
            '  np.save(f"{sys.argv[2]}/export_out{n}.npy",\n'
            '          np.asarray(exported.call(x.astype(np.float32))))\n'
            'print(jax.devices()[0].platform)\n')
  # -I: not this project's path; only jax is importable from the export's side.
  ran_on = subprocess.run([sys.executable, '-I', '-c', script,
                           os.path.join(deploy_dir, 'model.jax_export'), out],
                          check=True, capture_output=True, text=True, timeout=300).stdout
  train = jax.jit(rv.create_model(name, classes, precision='highest').apply)
  errors = {}
  for n in (1, 5):
    x = np.random.default_rng(n).normal(size=(n, size, size, 3)).astype(np.float32)
    errors[n] = relative_error(np.load(os.path.join(out, f'export_out{n}.npy')),
                               train(variables, x))
  metadata = checkpoint.read_json(os.path.join(deploy_dir, checkpoint.MODEL_METADATA))
  return {'platform': platform, 'ran_on': ran_on.strip(), 'errors_by_batch': errors,
          'conv_impl': metadata['export']['conv_impl'],
          'conversion_relative_error': metadata['conversion_relative_error']}


def summary_markdown(summary: dict[str, Any]) -> str:
  lines = [f'# GPU check: {summary["device"]}', '',
           f'jax {summary["jax"]}, {summary["date"]} UTC', '']
  if summary.get('exactness'):
    lines += ['| model | deploy vs train, highest | default precision | timm (PyTorch) vs JAX |',
              '|---|---|---|---|']
    for r in summary['exactness']:
      timm = f'{r["timm_error"]:.1e}' if r.get('timm_error') is not None else '-'
      lines.append(f'| {r["model"]} | {r["error_highest"]:.1e} | {r["error_default"]:.1e} | '
                   f'{timm} |')
    worst = max(r['error_highest'] for r in summary['exactness'])
    lines += ['', f'worst at precision=highest: {worst:.1e} '
              f'({"within" if worst <= TOLERANCE else "OVER"} the {TOLERANCE:.0e} bar)', '']
  if summary.get('benchmark'):
    lines += [benchmarking.markdown_table([benchmarking.Record(**{
        k: v for k, v in r.items() if k in benchmarking.Record.__dataclass_fields__})
        for r in summary['benchmark']]), '']
  if summary.get('export'):
    e = summary['export']
    errors = ', '.join(f'{error:.1e} at batch {n}' for n, error in e['errors_by_batch'].items())
    lines += [f'export ({e["conv_impl"]}, lowered for {e["platform"]}, run on {e["ran_on"]} '
              f'in a jax-only process) vs the training-time model: {errors}', '']
  return '\n'.join(lines)


def main() -> int:
  parser = cli.ArgumentParser(__doc__, prog='gpu_check.py')
  parser.add_argument('out', metavar='OUT_DIR', help='directory for the results (created)')
  parser.add_argument('--quick', action='store_true',
                      help='tiny sizes and RepVGG-A0 only (a CPU smoke test of the script)')
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  summary: dict[str, Any] = {'device': benchmarking.device_description(), 'jax': jax.__version__}
  steps: dict[str, Callable[[], Any]] = {
      'exactness': lambda: exactness(
          EXACTNESS_MODELS[:1] if args.quick else EXACTNESS_MODELS,
          (2, 32, 48, 3) if args.quick else (2, 96, 128, 3)),
      'benchmark': lambda: benchmarks(args.out, args.quick),
      'export': lambda: portable_export(args.out, args.quick),
  }
  return check_steps.run_steps(args.out, steps, summary, summary_markdown)


if __name__ == '__main__':
  sys.exit(main())
