"""Inference speed of RepVGG in both structures, in JAX and (optionally) PyTorch/timm:
the library behind ``benchmark.py``.

Each measurement is one record (a dict, see ``Record``): throughput, latency, compile
time, size and the achieved share of the device's measured dense matmul rate. The
methodology is the same for every framework: warm-up calls first, every call waited for
(``block_until_ready`` / ``torch.cuda.synchronize``), a rotation of distinct input
batches, and the median (p50) and p90 of the per-batch latencies of all timed calls.

``achieved_tflops`` counts ``2 * rv.deploy_macs`` per image, the FLOPs of the direct
convolution of the deploy model, for every structure: it is a speed, comparable across
structures and algorithms (Winograd performs fewer multiplies than it is credited with).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from repvgg_jax import convolution, onnx_export, quantization, winograd
from repvgg_jax.equivalence import TOLERANCE, random_variables, relative_error
from repvgg_jax.models import DTYPES, count_params, create_model, deploy_macs, exact_forward
from repvgg_jax.reparam import reparameterize
from repvgg_jax.torch_io import timm_model_name, to_torch_state_dict
from repvgg_jax.variants import MIN_IMAGE_SIZE, get_variant

# Deploy-time structures of the JAX model: 'deploy' uses XLA's convolution everywhere,
# 'deploy-<impl>' Winograd implementation <impl> for the stride-1 3x3 convs (e.g.
# 'deploy-winograd4', 'deploy-winograd4-native'); 'deploy-int8' is its int8 model
# (quantization.quantized_model, qwix's int8 convolutions; default keep_float) of the same
# variables, calibrated on random images (``_int8_variables``).
INT8_STRUCTURE = 'deploy-int8'
JAX_STRUCTURES = (('train', 'deploy') + tuple(f'deploy-{impl}' for impl in winograd.IMPLS)
                  + (INT8_STRUCTURE,))
# The int8 model's calibration: absmax ranges of the layer inputs on this many batches of
# two random normal images of the measured size (the inputs it is timed on are such too).
CALIBRATION_BATCHES = 2

# PyTorch/timm measurements: (structure, reparameterized, channels_last, torch.compile).
TORCH_VARIANTS = {
    'torch-train-channels_last': (False, True, False),
    'torch-eager': (True, False, False),
    'torch-channels_last': (True, True, False),
    'torch-compile': (True, True, True),
}


def conv_impl_of(structure: str) -> str:
  """The ``conv_impl`` a deploy structure of ``JAX_STRUCTURES`` names ('deploy' -> 'xla')."""
  return structure.partition('-')[2] or 'xla'


def default_structures(dtype: str) -> tuple[str, ...]:
  """The training-time graph, XLA's deploy graph, and the fastest deploy graph of the
  default backend when that is another (Winograd on CPU at float32: the native kernel
  where it builds, and XLA's graph of it)."""
  fastest = convolution.default_conv_impl(jax.default_backend(), DTYPES[dtype])
  fast = dict.fromkeys((winograd.portable(fastest), fastest)) if fastest != 'xla' else {}
  return ('train', 'deploy') + tuple(f'deploy-{impl}' for impl in fast)


@dataclasses.dataclass
class Record:
  """One measurement: a model in one structure at one batch size."""
  model: str
  structure: str
  batch_size: int
  dtype: str
  image_size: int
  images_per_second: float
  latency_ms_p50: float
  latency_ms_p90: float
  compile_seconds: float
  params: int
  gmacs: float
  achieved_tflops: float
  matmul_fraction: Optional[float]  # achieved_tflops / the measured matmul rate
  peak_memory_bytes: Optional[int]
  timed_calls: int
  device: str
  framework: str
  top1: Optional[float]


def device_description() -> str:
  """The JAX device, with the CPU model and core count on CPU."""
  device = jax.devices()[0]
  if device.platform == 'cpu':
    return f'cpu ({_cpu_model()}, {os.cpu_count()} cores)'
  return f'{device.platform} ({device.device_kind})'


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown CPU'


def matmul_tflops(dtype: Any, size: Optional[int] = None, min_seconds: float = 1.0) -> float:
  """Measured dense ``size x size`` matmul rate of the default JAX device (TFLOP/s), from
  the fastest call: the device's capability, as free of other load as can be had."""
  if size is None:
    size = 2048 if jax.devices()[0].platform == 'cpu' else 8192
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  a, b = (jax.random.normal(k, (size, size), dtype) for k in keys)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))
  times: list[float] = []
  start = time.perf_counter()
  while len(times) < 3 or time.perf_counter() - start < min_seconds:
    t0 = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    times.append(time.perf_counter() - t0)
  return 2 * size ** 3 / min(times) / 1e12


@dataclasses.dataclass
class Candidate:
  """A compiled forward pass, ready to be timed: ``call(i)`` runs on input ``i``."""
  model: str
  structure: str
  framework: str
  device: str
  params: int
  compile_seconds: float
  call: Callable[[int], Any]
  wait: Callable[[Any], Any]
  peak_memory: Callable[[], Optional[int]]


def measure(candidates: Sequence[Candidate], batch_size: int, dtype: str, image_size: int,
            min_calls: int = 5, min_seconds: float = 2.0, warmup: int = 2) -> list[Record]:
  """Time the candidates round-robin, one call each per round, so that other load on
  the machine slows all of them alike; at least ``min_calls`` calls each and
  ``min_seconds`` per candidate in all."""
  for c in candidates:
    for i in range(warmup):
      c.wait(c.call(i))
  times: list[list[float]] = [[] for _ in candidates]
  start = time.perf_counter()
  while (len(times[0]) < min_calls
         or time.perf_counter() - start < min_seconds * len(candidates)):
    for c, t in zip(candidates, times):
      t0 = time.perf_counter()
      c.wait(c.call(len(t)))
      t.append(time.perf_counter() - t0)
  records = []
  for c, t in zip(candidates, times):
    p50 = statistics.median(t)
    macs = deploy_macs(c.model, image_size)
    achieved = 2 * macs * batch_size / p50 / 1e12
    records.append(Record(
        model=c.model, structure=c.structure, batch_size=batch_size, dtype=dtype,
        image_size=image_size, images_per_second=batch_size / p50,
        latency_ms_p50=p50 * 1e3, latency_ms_p90=float(np.percentile(t, 90)) * 1e3,
        compile_seconds=c.compile_seconds, params=c.params, gmacs=macs / 1e9,
        achieved_tflops=achieved, matmul_fraction=None, peak_memory_bytes=c.peak_memory(),
        timed_calls=len(t), device=c.device, framework=c.framework,
        top1=get_variant(c.model).top1))
    _progress(f'{c.model} {c.structure} batch {batch_size} {dtype}: '
              f'{batch_size / p50:.1f} images/s, p50 {p50 * 1e3:.1f} ms')
  return records


def _progress(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def jax_candidates(name: str, structures: Sequence[str], batch_size: int,
                   dtype: str = 'float32', image_size: int = 224,
                   rotate: int = 3) -> list[Candidate]:
  """Jit-compiled eval-mode forward passes of ``name`` in each of ``structures``
  (from ``JAX_STRUCTURES``); the deploy variables are ``reparameterize`` of the same
  random training-time variables."""
  unknown = [s for s in structures if s not in JAX_STRUCTURES]
  if unknown:
    raise ValueError(f'unknown structure(s) {unknown}; accepted: {", ".join(JAX_STRUCTURES)}')
  if dtype not in DTYPES:
    raise ValueError(f'unknown dtype {dtype!r}; accepted: {", ".join(DTYPES)}')
  device = device_description()
  train_model = create_model(name, dtype=DTYPES[dtype])
  train_vars, deploy_vars = _random_states(name)
  inputs = [jax.random.normal(jax.random.PRNGKey(i), (batch_size, image_size, image_size, 3),
                              DTYPES[dtype]) for i in range(rotate)]
  candidates = []
  for structure in structures:
    if structure == 'train':
      model, variables = train_model, train_vars
    elif structure == INT8_STRUCTURE:
      model = quantization.quantized_model(create_model(name, deploy=True, dtype=DTYPES[dtype]))
      variables = _int8_variables(name, image_size)
    else:
      conv_impl = conv_impl_of(structure)
      model = create_model(name, deploy=True, dtype=DTYPES[dtype], conv_impl=conv_impl)
      variables = convolution.transform_kernels(deploy_vars, name, conv_impl)
    variables = jax.device_put(variables)
    _progress(f'{name} {structure} batch {batch_size} {dtype}: compiling ...')
    start = time.perf_counter()
    compiled = jax.jit(model.apply).lower(variables, inputs[0]).compile()
    compile_seconds = time.perf_counter() - start
    candidates.append(Candidate(
        name, structure, 'jax', device, count_params(variables['params']), compile_seconds,
        call=lambda i, f=compiled, v=variables: f(v, inputs[i % rotate]),
        wait=jax.block_until_ready,
        peak_memory=lambda f=compiled: _peak_memory(f)))
  return candidates


@functools.lru_cache(maxsize=1)
def _random_states(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """``(training-time, deploy)`` variables of ``name`` from the same random draw (the
  parameters are float32 whatever the compute dtype): drawn once per model, for every batch
  size and framework measured."""
  train_vars = random_variables(
      create_model(name), jax.ShapeDtypeStruct((1, MIN_IMAGE_SIZE, MIN_IMAGE_SIZE, 3),
                                               jnp.float32))
  return train_vars, jax.device_get(reparameterize(train_vars))


@functools.lru_cache(maxsize=1)
def _int8_variables(name: str, image_size: int) -> dict[str, Any]:
  """The variables of the int8 model (``quantization.quantize``, default ``keep_float``)
  of ``_random_states``' deploy variables, calibrated on ``CALIBRATION_BATCHES`` random
  normal batches of ``image_size``: made once per model for every batch size, for the
  JAX int8 structure and the int8 ONNX graph alike."""
  _, deploy_vars = _random_states(name)
  model = create_model(name, deploy=True)
  batches = [jax.random.normal(jax.random.PRNGKey(1000 + i), (2, image_size, image_size, 3))
             for i in range(CALIBRATION_BATCHES)]
  return quantization.quantize(model, deploy_vars,
                               quantization.calibrate(model, deploy_vars, batches))


def _peak_memory(compiled: Any) -> Optional[int]:
  """Peak device memory in bytes where the backend reports it (GPU/TPU), else the
  compiled program's own footprint (arguments, outputs and temporaries)."""
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use'])
  try:
    analysis = compiled.memory_analysis()
    return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
               + analysis.temp_size_in_bytes)
  except (AttributeError, NotImplementedError, TypeError):
    return None


def torch_candidates(name: str, structures: Sequence[str], batch_size: int,
                     dtype: str = 'float32', image_size: int = 224, rotate: int = 3,
                     threads: Optional[int] = None) -> list[Candidate]:
  """timm's RepVGG in PyTorch, one candidate per variant in ``structures`` (keys of
  ``TORCH_VARIANTS``). bfloat16 runs under ``torch.autocast``. A variant whose first call
  fails (torch.compile without a working compiler, say) is reported and left out."""
  import timm  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from timm.utils.model import reparameterize_model  # pylint: disable=import-outside-toplevel

  unknown = [s for s in structures if s not in TORCH_VARIANTS]
  if unknown:
    raise ValueError(f'unknown torch variant(s) {unknown}; accepted: '
                     f'{", ".join(TORCH_VARIANTS)}')
  timm_name = timm_model_name(name)
  if timm_name is None:
    _progress(f'{name}: not in timm, no PyTorch measurement')
    return []
  if threads:
    torch.set_num_threads(threads)
  cuda = torch.cuda.is_available()
  device_type = 'cuda' if cuda else 'cpu'
  device = (f'cuda ({torch.cuda.get_device_name()})' if cuda else
            f'cpu ({_cpu_model()}, {torch.get_num_threads()} threads)')
  wait = (lambda _: torch.cuda.synchronize()) if cuda else (lambda _: None)
  candidates = []
  for structure in structures:
    reparameterized, channels_last, compile_model = TORCH_VARIANTS[structure]
    model = timm.create_model(timm_name, pretrained=False).eval()
    if reparameterized:
      model = reparameterize_model(model)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device_type, memory_format=memory_format)
    runner = torch.compile(model) if compile_model else model
    inputs = [torch.randn(batch_size, 3, image_size, image_size, device=device_type
                          ).contiguous(memory_format=memory_format) for _ in range(rotate)]

    def call(i: int, runner: Any = runner, inputs: list[Any] = inputs) -> Any:
      with torch.inference_mode(), torch.autocast(device_type, torch.bfloat16,
                                                  enabled=dtype == 'bfloat16'):
        return runner(inputs[i % rotate])

    _progress(f'{name} {structure} batch {batch_size} {dtype}: first call ...')
    try:
      start = time.perf_counter()
      wait(call(0))
      first_call = time.perf_counter() - start
    except Exception as e:  # torch.compile raises many types when no compiler works
      _progress(f'{name} {structure}: failed ({type(e).__name__}: '
                f'{(str(e).splitlines() or [""])[0]}), left out')
      continue
    candidates.append(Candidate(
        name, structure, 'torch', device, sum(p.numel() for p in model.parameters()),
        first_call, call, wait,
        peak_memory=(lambda: int(torch.cuda.max_memory_allocated())) if cuda else
        (lambda: None)))
  return candidates


# The runtimes that run an ONNX graph of the deploy model on the CPU.
ONNX_RUNTIMES = ('onnxruntime', 'openvino')

# Where that graph comes from: 'jax', this project's export (``onnx_export.to_onnx`` of the
# deploy variables); 'torch', timm's reparameterized model exported by ``torch.onnx``;
# 'int8', this project's QDQ export of the int8 model of INT8_STRUCTURE (the same
# variables, quantized).
ONNX_EXPORTERS = ('jax', 'torch', 'int8')


def onnx_structure(runtime: str, exporter: str) -> str:
  """The ``structure`` of a record of ``runtime`` running ``exporter``'s graph: the bare
  runtime name for this project's export (the name earlier tables used),
  ``'<runtime> int8'`` for its int8 model, else ``'<runtime> (<exporter> export)'``."""
  if exporter in ('jax', 'int8'):
    return runtime + (' int8' if exporter == 'int8' else '')
  return f'{runtime} ({exporter} export)'


def ort_session_options(threads: Optional[int] = None) -> Any:
  """onnxruntime's session options for a round-robin timing: ``threads`` intra-op threads
  (its own choice when None), and those threads sleeping, not spinning, once a run ends.

  By default they spin-wait after every run, on the cores the next candidate of the
  round needs: on the 2-core VM that made the JAX graph timed after onnxruntime 25%
  slower (RepVGG-A0, batch 1: 31.8 instead of 25.4 ms) and, beside other load,
  onnxruntime itself up to 3x slower; without spinning onnxruntime ran as fast as with
  it alone (14.9-15.5 ms).
  """
  import onnxruntime as ort  # pylint: disable=import-outside-toplevel
  options = ort.SessionOptions()
  if threads:
    options.intra_op_num_threads = threads
  options.add_session_config_entry('session.intra_op.allow_spinning', '0')
  return options


def onnx_candidates(name: str, runtimes: Sequence[str], batch_size: int,
                    image_size: int = 224, rotate: int = 3, threads: Optional[int] = None,
                    exporters: Sequence[str] = ('jax',)) -> list[Candidate]:
  """ONNX graphs of ``name``'s deploy model from each of ``exporters`` (the same random
  variables as ``jax_candidates``'), float32 NCHW, in each of ``runtimes``
  (``onnx_session``), grouped by runtime. Each output is checked before it is timed
  against the JAX deploy model (``onnx_export.verify_onnx``'s bar), the int8 graph's
  against the JAX int8 model (``INT8_STRUCTURE``, within ``onnx_export.INT8_TOLERANCE``); a
  runtime or exporter that is not installed, or a model timm lacks, is reported and left
  out."""
  for kind, values, accepted in (('ONNX runtime', runtimes, ONNX_RUNTIMES),
                                 ('ONNX exporter', exporters, ONNX_EXPORTERS)):
    unknown = [v for v in values if v not in accepted]
    if unknown:
      raise ValueError(f'unknown {kind}(s) {unknown}; accepted: {", ".join(accepted)}')
  _, deploy_vars = _random_states(name)
  graphs = {}
  for exporter in exporters:
    start = time.perf_counter()
    try:
      graph = _onnx_graph(name, exporter, image_size)
    except ImportError as e:
      _progress(f'{name} {exporter} export: not installed ({e}), left out')
      continue
    if graph is None:
      _progress(f'{name}: not in timm, no torch export')
      continue
    graphs[exporter] = graph
    _progress(f'{name} {exporter} export: {len(graph) / 2**20:.0f} MiB in '
              f'{time.perf_counter() - start:.1f} s')
  params = count_params(deploy_vars['params'])
  nhwc = [np.asarray(jax.random.normal(jax.random.PRNGKey(i),
                                       (batch_size, image_size, image_size, 3)))
          for i in range(rotate)]
  nchw = [np.ascontiguousarray(x.transpose(0, 3, 1, 2)) for x in nhwc]
  # What each graph must reproduce on the first input: the float JAX deploy model, or the
  # JAX int8 model for the int8 graph.
  expected = {}
  if graphs.keys() - {'int8'}:
    expected['float'] = np.asarray(exact_forward(name, create_model(name).num_classes,
                                                 deploy=True)(deploy_vars, nhwc[0]))
  if 'int8' in graphs:
    int8_model = quantization.quantized_model(create_model(name, deploy=True))
    expected['int8'] = np.asarray(jax.jit(int8_model.apply)(
        _int8_variables(name, image_size), nhwc[0]))
  device = f'cpu ({_cpu_model()}, {threads or os.cpu_count()} threads)'
  candidates = []
  for runtime in runtimes:
    for exporter, graph in graphs.items():
      structure = onnx_structure(runtime, exporter)
      start = time.perf_counter()
      try:
        run = onnx_session(graph, runtime, threads)
      except ImportError as e:
        _progress(f'{name} {runtime}: not installed ({e}), left out')
        break
      seconds = time.perf_counter() - start
      call = lambda i, run=run: run(nchw[i % rotate])
      kind, tolerance = (('int8', onnx_export.INT8_TOLERANCE) if exporter == 'int8' else
                         ('float', TOLERANCE))
      error = relative_error(call(0), expected[kind])
      _progress(f'{name} {structure}: ready in {seconds:.1f} s, error vs JAX {error:.1e}'
                + (' (the int8 model)' if kind == 'int8' else ''))
      if not error <= tolerance:
        raise ValueError(f'{name} in {structure} differs from the JAX '
                         f'{"int8" if kind == "int8" else "deploy"} model by {error:.2e} > '
                         f'{tolerance:.0e}')
      candidates.append(Candidate(name, structure, runtime, device, params, seconds, call,
                                  wait=lambda y: y, peak_memory=lambda: None))
  return candidates


def onnx_session(serialized: bytes, runtime: str,
                 threads: Optional[int] = None) -> Callable[[np.ndarray], np.ndarray]:
  """A function from a float32 NCHW batch (the graph's input ``images``) to the graph's
  first output, run by ``runtime`` on the CPU: onnxruntime's CPUExecutionProvider with
  every graph optimization (the fastest level measured), or OpenVINO's CPU plugin at f32
  precision (it would pick bfloat16 where the CPU has it). ``threads`` sets the runtime's
  intra-op threads; onnxruntime's do not spin between runs (``ort_session_options``).
  Raises ImportError where the runtime is not installed."""
  if runtime == 'onnxruntime':
    import onnxruntime as ort  # pylint: disable=import-outside-toplevel
    session = ort.InferenceSession(serialized, ort_session_options(threads),
                                   providers=['CPUExecutionProvider'])
    return lambda x: session.run(None, {'images': x})[0]
  if runtime == 'openvino':
    import openvino as ov  # pylint: disable=import-outside-toplevel
    core = ov.Core()
    config = {'INFERENCE_PRECISION_HINT': 'f32', 'PERFORMANCE_HINT': 'LATENCY'}
    if threads:
      config['INFERENCE_NUM_THREADS'] = threads
    compiled = core.compile_model(core.read_model(serialized), 'CPU', config)
    request = compiled.create_infer_request()
    return lambda x: request.infer({'images': x})[compiled.output(0)]
  raise ValueError(f'unknown ONNX runtime {runtime!r}; accepted: {", ".join(ONNX_RUNTIMES)}')


@functools.lru_cache(maxsize=len(ONNX_EXPORTERS))
def _onnx_graph(name: str, exporter: str, image_size: int) -> Optional[bytes]:
  """The serialized ONNX graph of ``name``'s deploy model from ``exporter``, of
  ``_random_states``' variables (the int8 one: of ``_int8_variables(name, image_size)``;
  None where timm lacks the model): made once per model for every batch size."""
  train_vars, deploy_vars = _random_states(name)
  if exporter == 'jax':
    return onnx_export.to_onnx(name, deploy_vars)
  if exporter == 'int8':
    return onnx_export.to_onnx(name, deploy_vars, int8_layers=quantization.int8_layers(
        _int8_variables(name, image_size)))
  return _torch_onnx(name, train_vars)


def _torch_onnx(name: str, train_vars: Any) -> Optional[bytes]:
  """timm's model of ``name`` with the training-time ``train_vars``, reparameterized by
  timm and exported by ``torch.onnx``: opset, input and output names and symbolic axes
  as ``onnx_export.to_onnx``'s graph, so that both run alike. None where timm lacks
  the model."""
  import timm  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from timm.utils.model import reparameterize_model  # pylint: disable=import-outside-toplevel

  timm_name = timm_model_name(name)
  if timm_name is None:
    return None
  # On the meta device and filled with assign=True: timm's own random init is skipped.
  with torch.device('meta'):
    model = timm.create_model(timm_name, pretrained=False)
  model.load_state_dict(to_torch_state_dict(train_vars, name, 'timm', framework='torch'),
                        strict=True, assign=True)
  model = reparameterize_model(model.eval(), inplace=True)
  axes = {'images': {0: 'batch', 2: 'height', 3: 'width'}, 'logits': {0: 'batch'}}
  buffer = io.BytesIO()
  # The TorchScript exporter: the dynamo one needs onnxscript, which the project does
  # not install; its deprecation notice is expected.
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', DeprecationWarning)
    torch.onnx.export(model, (torch.zeros(1, 3, MIN_IMAGE_SIZE, MIN_IMAGE_SIZE),), buffer,
                      dynamo=False, opset_version=onnx_export.DEFAULT_OPSET,
                      input_names=['images'], output_names=['logits'], dynamic_axes=axes)
  return buffer.getvalue()


def markdown_table(records: Sequence[Record]) -> str:
  """The records as a markdown table, with each record's speed-up over the training-time
  JAX graph of the same model, dtype and batch size."""
  base = {(r.model, r.dtype, r.batch_size): r.images_per_second
          for r in records if r.structure == 'train'}
  lines = ['| model | structure | batch | dtype | images/s | vs train | p50 ms | p90 ms | '
           'compile s | params (M) | GMACs | TFLOP/s | % matmul | peak MiB |',
           '|' + '---|' * 14]
  for r in records:
    speedup = base.get((r.model, r.dtype, r.batch_size))
    lines.append(
        f'| {r.model} | {r.structure} | {r.batch_size} | {r.dtype} | '
        f'{r.images_per_second:.1f} | '
        f'{f"{r.images_per_second / speedup:.2f}x" if speedup else "-"} | '
        f'{r.latency_ms_p50:.1f} | {r.latency_ms_p90:.1f} | {r.compile_seconds:.1f} | '
        f'{r.params / 1e6:.2f} | {r.gmacs:.2f} | {r.achieved_tflops:.3f} | '
        f'{f"{100 * r.matmul_fraction:.0f}" if r.matmul_fraction else "-"} | '
        f'{f"{r.peak_memory_bytes / 2**20:.0f}" if r.peak_memory_bytes else "-"} |')
  return '\n'.join(lines)


def plot(records: Sequence[Record], path: str) -> None:
  """A PNG: throughput per batch size (one line per model and structure) and, at the
  largest batch size, throughput against the published ImageNet top-1."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, (left, right) = plt.subplots(1, 2, figsize=(16, 6))
  series: dict[tuple[str, str], list[Record]] = {}
  for r in records:
    series.setdefault((r.model, r.structure), []).append(r)
  # One colour per structure, one line style and marker per model.
  structures = list(dict.fromkeys(r.structure for r in records))
  models = list(dict.fromkeys(r.model for r in records))
  colors = {s: plt.get_cmap('tab10')(i % 10) for i, s in enumerate(structures)}
  styles = {m: ('-o', '--s', ':^', '-.D')[i % 4] for i, m in enumerate(models)}
  for (model, structure), rs in series.items():
    rs = sorted(rs, key=lambda r: r.batch_size)
    left.plot([r.batch_size for r in rs], [r.images_per_second for r in rs], styles[model],
              color=colors[structure], label=f'{model} {structure}')
  batch_sizes = sorted({r.batch_size for r in records})
  left.set(xscale='log', xlabel='batch size', ylabel='images/s',
           title=f'throughput ({records[0].dtype}, {records[0].image_size}px)')
  left.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
  left.minorticks_off()
  left.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.0, 1.0))
  largest = max(r.batch_size for r in records)
  for structure in structures:
    points = [r for r in records if r.structure == structure and r.batch_size == largest
              and r.top1 is not None]
    if points:
      right.scatter([r.images_per_second for r in points], [r.top1 for r in points],
                    color=colors[structure], label=structure)
  for model in models:
    points = [r for r in records if r.model == model and r.batch_size == largest
              and r.top1 is not None]
    if points:
      right.annotate(model, (min(r.images_per_second for r in points), points[0].top1),
                     textcoords='offset points', xytext=(0, 6), fontsize=8)
  right.set(xlabel=f'images/s at batch {largest}', ylabel='ImageNet top-1 (%, published)',
            title='speed vs accuracy')
  right.legend(fontsize=7)
  fig.suptitle(records[0].device, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
