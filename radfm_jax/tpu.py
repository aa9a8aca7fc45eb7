"""TPU topologies for ahead-of-time compiles from a CPU host (libtpu, no TPU): the environment
libtpu needs, the devices of a topology, the fit-table batch shapes and the per-chip memory report
of a compiled program. Used by the train-step fit check (train/aot.py) and the serving fit check
(infer/aot.py). Imports radfm_jax (errors, config) and JAX only inside functions (set_tpu_env
must run before JAX loads libtpu).
"""

from __future__ import annotations

import os
import re
import time

GIB = 1024 ** 3

# TPU_ACCELERATOR_TYPE counts TensorCores on v4 / v5p (2 per chip) and chips on v5e / v6e.
_CORES_PER_CHIP = {'v4': 2, 'v5p': 2, 'v5': 2, 'v5e': 1, 'v5litepod': 1, 'v6e': 1}


def chip_count(topology: str) -> int:
  """'v5p:4x4x4' -> 64 chips."""
  chips = 1
  for d in topology.partition(':')[2].split('x'):
    chips *= int(d)
  return chips


def accelerator_type(topology: str) -> str:
  """'v5p:4x4x4' -> 'v5p-128'; 'v6e:4x4' -> 'v6e-16'."""
  gen = topology.partition(':')[0]
  return f'{gen}-{chip_count(topology) * _CORES_PER_CHIP.get(gen, 1)}'


# Stack size for libtpu's compiler threads (see set_tpu_env); only reserved, not committed.
COMPILE_THREAD_STACK_BYTES = 16 * 2 ** 20
_STACK_FLAGS = ('fibers_default_thread_stack_size', 'default_thread_stack_size',
                'xla_internal_thread_stack_size_bytes')


def set_tpu_env(topology: str):
  """TPU_* variables and libtpu flags for compiling without a TPU; set before JAX loads libtpu."""
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', accelerator_type(topology))
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  # Compiling needs no TPU: let several fit checks (or a test beside a sweep) load libtpu at once
  # instead of failing on /tmp/libtpu_lockfile.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  # libtpu 0.0.42.1 costs the 13B matmuls for v6e (SpatialMajorConvolution window configs) with a
  # recursion that overflows the default stack of its fiber threads: SIGSEGV on v6e:4x4 (gdb: fault
  # at the stack pointer in CalculateClassicWindowCost). `ulimit -s` and a big-stack Python thread
  # do not reach those threads; these libtpu flags do (the v6e:4x4 compile then succeeds). Users'
  # own LIBTPU_INIT_ARGS are kept, and win on a repeated flag.
  args = os.environ.get('LIBTPU_INIT_ARGS', '')
  extra = [f'--{flag}={COMPILE_THREAD_STACK_BYTES}' for flag in _STACK_FLAGS
           if f'--{flag}=' not in args]
  os.environ['LIBTPU_INIT_ARGS'] = ' '.join(extra + ([args] if args else []))


def topology_devices(topology: str):
  """The TPU devices of `topology` for compiling (no TPU needed). A single chip ('v6e:1x1') is
  described with one chip per host: libtpu's default host bounds (2x2x1) reject it.

  Without libtpu (the `tpu` extra), or for a name libtpu does not know ('v9:2x2', 'v5p:3x3x3'),
  a one-line UserError: JAX's RuntimeError / INVALID_ARGUMENT came with a traceback."""
  import jax
  from jax.experimental import topologies

  from radfm_jax.config import ConfigError
  from radfm_jax.errors import UserError
  extra = {'chips_per_host_bounds': [1, 1, 1]} if chip_count(topology) == 1 else {}
  try:
    return topologies.get_topology_desc(platform='tpu', topology_name=topology, **extra).devices
  except jax.errors.JaxRuntimeError as e:
    if 'INVALID_ARGUMENT' not in str(e):
      raise
    reason = str(e).partition('INVALID_ARGUMENT: ')[2].splitlines()[0]
    raise ConfigError(f'config field mesh.topology={topology!r}: libtpu rejects it ({reason}); '
                      "expected a TPU generation and shape it knows, e.g. 'v5p:2x2x1' or "
                      "'v6e:4x4'") from e
  except RuntimeError as e:          # jax's text when neither libtpu nor TPU_LIBRARY_PATH is found
    if 'TPU support not installed' not in str(e):
      raise
    raise UserError('compiling for a TPU topology needs libtpu, which is not installed; expected '
                    "it installed (pip install 'radfm-jax[tpu]')") from None


def batch_shapes(cfg, kind: str, batch: int, images_2d: int = 4, text_len: int | None = None):
  """(images shape, text length) of a global batch of `kind` '2d' or '3d'."""
  d = cfg.data
  length = text_len or max(d.text_lengths)
  if kind == '2d':
    return (batch, images_2d, 3, d.image_size_2d, d.image_size_2d, 4), length
  return (batch, 1, 3, d.image_size_3d_single, d.image_size_3d_single, max(d.depth_buckets)), length


def needed_bytes(message: str) -> float | None:
  m = (re.search(r'[Uu]sed\s+([\d.]+)([KMGT])\b', message)
       or re.search(r'([\d.]+)([KMGT])i?B? of [\d.]+[KMGT]i?B? hbm', message)
       # libtpu 0.0.42: "... required for HLO temporaries (31.49G) exceeds available HBM (31.25G)"
       or re.search(r'required for [^(]*\(([\d.]+)([KMGT])\)', message))
  if not m:
    return None
  return float(m.group(1)) * {'K': 2 ** 10, 'M': 2 ** 20, 'G': 2 ** 30, 'T': 2 ** 40}[m.group(2)]


def memory_report(compiled, hbm_gib: float) -> dict:
  """Per-chip bytes of a compiled executable (`memory_analysis`) and whether its peak (else the
  sum of arguments, outputs and temporaries less aliased bytes) fits in `hbm_gib`."""
  mem = compiled.memory_analysis()
  fields = {'argument_bytes': 'argument_size_in_bytes', 'output_bytes': 'output_size_in_bytes',
            'temp_bytes': 'temp_size_in_bytes', 'alias_bytes': 'alias_size_in_bytes',
            'code_bytes': 'generated_code_size_in_bytes', 'peak_bytes': 'peak_memory_in_bytes'}
  report = {key: int(getattr(mem, attr, 0) or 0) if mem is not None else 0
            for key, attr in fields.items()}
  total = report['argument_bytes'] + report['output_bytes'] + report['temp_bytes'] - report[
      'alias_bytes']
  report['sum_bytes'] = total
  peak = report['peak_bytes'] or total
  report['fits'] = bool(hbm_gib <= 0 or peak <= hbm_gib * GIB)
  return report


def compile_report(compile_fn, hbm_gib: float) -> dict:
  """Runs `compile_fn()` (lower + compile of one program) and reports: `compile_s` and the
  `memory_report`, or, when libtpu refuses with RESOURCE_EXHAUSTED, fits=False with the error and
  the bytes it says were needed. Any other compile error propagates."""
  start = time.perf_counter()
  try:
    compiled = compile_fn()
  except Exception as e:   # libtpu: RESOURCE_EXHAUSTED = does not fit
    text = str(e)
    if 'RESOURCE_EXHAUSTED' not in text and 'memory' not in text.lower():
      raise
    return {'compile_s': time.perf_counter() - start, 'fits': False, 'error': text[:2000],
            'needed_bytes': needed_bytes(text)}
  report = {'compile_s': time.perf_counter() - start}
  report.update(memory_report(compiled, hbm_gib))
  return report


__all__ = ['COMPILE_THREAD_STACK_BYTES', 'GIB', 'accelerator_type', 'batch_shapes', 'chip_count',
           'compile_report', 'memory_report', 'needed_bytes', 'set_tpu_env', 'topology_devices']
