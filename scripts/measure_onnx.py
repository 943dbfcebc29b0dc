"""Inference speed of the ONNX export (onnxruntime, OpenVINO) against the JAX deploy model.

  python scripts/measure_onnx.py [--models RepVGG-A0,RepVGG-B0] [--batch-sizes 1,8] \\
      [--threads 2] [--image-size 224]

On CPU, float32, in one process: for each model and batch size, JAX's deploy model
(conv_impl 'xla' and 'winograd4'), ``onnx_export.to_onnx`` of the same deploy variables
in onnxruntime at each graph optimization level (CPUExecutionProvider,
``intra_op_num_threads=--threads``) and, when it is installed, in OpenVINO (CPU,
``INFERENCE_NUM_THREADS=--threads``, f32 inference precision: it would pick bfloat16 on
CPUs that have it). They are timed round-robin with ``bench.measure`` (warm-up, rotated
inputs, p50/p90 of all timed calls), so that other load on the machine slows all alike.
Each runtime's output is first checked against JAX's (relative L2 error, printed).
Prints a markdown table on stdout, progress on stderr. JAX starts with
``bench.CPU_FAST_FLAGS`` (YNNPACK fusions off), as benchmark.py does.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from repvgg_jax import bench

bench.set_cpu_flags()  # Before JAX computes anything: XLA reads its flags once.

import jax  # noqa: E402
import numpy as np  # noqa: E402

import repvgg_jax as rv  # noqa: E402
from repvgg_jax import onnx_export, winograd  # noqa: E402

ORT_LEVELS = ('all', 'extended', 'basic', 'disable')


def _progress(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _relative_error(output: Any, reference: Any) -> float:
  output, reference = np.asarray(output, np.float64), np.asarray(reference, np.float64)
  return float(np.linalg.norm(output - reference) / np.linalg.norm(reference))


def candidates(name: str, batch_size: int, image_size: int, threads: int,
               ort_levels: list[str]) -> list[bench.Candidate]:
  """The JAX, onnxruntime and OpenVINO forward passes of ``name``, compiled and checked
  against JAX's 'xla' deploy output on the first input."""
  import onnxruntime as ort

  device = bench.device_description()
  train = rv.create_model(name)
  deploy_vars = rv.reparameterize(bench.random_variables(train, image_size))
  params = rv.count_params(deploy_vars['params'])
  nhwc = [np.asarray(jax.random.normal(jax.random.PRNGKey(i),
                                       (batch_size, image_size, image_size, 3)))
          for i in range(3)]
  nchw = [np.ascontiguousarray(x.transpose(0, 3, 1, 2)) for x in nhwc]
  result = []

  def add(structure: str, framework: str, compile_seconds: float, call: Any,
          wait: Any = lambda y: y) -> None:
    result.append(bench.Candidate(name, structure, framework, device, params,
                                  compile_seconds, call, wait, lambda: None))

  reference = None
  for conv_impl in ('xla', 'winograd4'):
    model = rv.create_model(name, deploy=True, conv_impl=conv_impl)
    variables = jax.device_put(winograd.transform_kernels(deploy_vars, name, conv_impl))
    start = time.perf_counter()
    compiled = jax.jit(model.apply).lower(variables, nhwc[0]).compile()
    seconds = time.perf_counter() - start
    output = np.asarray(compiled(variables, nhwc[0]))
    reference = output if reference is None else reference
    _progress(f'{name} jax deploy-{conv_impl}: compiled in {seconds:.1f} s, '
                    f'error vs xla {_relative_error(output, reference):.2g}')
    add(f'deploy-{conv_impl}', 'jax', seconds,
        lambda i, f=compiled, v=variables: f(v, nhwc[i % 3]), jax.block_until_ready)

  serialized = onnx_export.to_onnx(name, deploy_vars)
  levels = {'all': ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            'extended': ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            'basic': ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            'disable': ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
  for level in ort_levels:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = levels[level]
    start = time.perf_counter()
    session = ort.InferenceSession(serialized, options, providers=['CPUExecutionProvider'])
    seconds = time.perf_counter() - start
    output, = session.run(None, {'images': nchw[0]})
    _progress(f'{name} onnxruntime opt {level}: session in {seconds:.1f} s, '
                    f'error vs jax {_relative_error(output, reference):.2g}')
    add(f'onnxruntime-{level}', 'onnxruntime', seconds,
        lambda i, s=session: s.run(None, {'images': nchw[i % 3]}))

  try:
    import openvino as ov
  except ImportError:
    _progress('openvino not installed: skipped')
    return result
  core = ov.Core()
  start = time.perf_counter()
  compiled = core.compile_model(core.read_model(serialized), 'CPU', {
      'INFERENCE_NUM_THREADS': threads, 'INFERENCE_PRECISION_HINT': 'f32',
      'PERFORMANCE_HINT': 'LATENCY'})
  seconds = time.perf_counter() - start
  request = compiled.create_infer_request()
  output = request.infer({'images': nchw[0]})[compiled.output(0)]
  _progress(f'{name} openvino {ov.__version__}: compiled in {seconds:.1f} s, '
                  f'error vs jax {_relative_error(output, reference):.2g}')
  add('openvino', 'openvino', seconds, lambda i: request.infer({'images': nchw[i % 3]}))
  return result


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='RepVGG-A0,RepVGG-B0')
  parser.add_argument('--batch-sizes', default='1,8')
  parser.add_argument('--image-size', type=int, default=224)
  parser.add_argument('--threads', type=int, default=2,
                      help='onnxruntime and OpenVINO threads (XLA:CPU uses every core)')
  parser.add_argument('--ort-levels', default=','.join(ORT_LEVELS),
                      help=f'onnxruntime graph optimization levels, of {ORT_LEVELS}')
  parser.add_argument('--min-seconds', type=float, default=2.0,
                      help='timed seconds per candidate and batch size, at least')
  args = parser.parse_args(argv)
  _progress(f'{bench.device_description()}, XLA_FLAGS={os.environ.get("XLA_FLAGS")}')
  records = []
  for name in args.models.split(','):
    for batch_size in (int(b) for b in args.batch_sizes.split(',')):
      found = candidates(name, batch_size, args.image_size, args.threads,
                         args.ort_levels.split(','))
      records += bench.measure(found, batch_size, 'float32', args.image_size,
                               min_seconds=args.min_seconds)
  print(bench.markdown_table(records))


if __name__ == '__main__':
  main(sys.argv[1:])
