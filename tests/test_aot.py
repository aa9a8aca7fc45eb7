"""AOT fit check: compile the tiny train step for a TPU v5p 2x2x2 topology from this CPU host."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from radfm_jax.config import load_config
from radfm_jax.train import aot
from radfm_jax.train.metrics import train_step_flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_accelerator_type_and_batch_shapes():
  assert aot.accelerator_type('v5p:2x2x1') == 'v5p-8'
  assert aot.accelerator_type('v5p:4x4x4') == 'v5p-128'
  assert aot.accelerator_type('v6e:16x16') == 'v6e-256'
  cfg = load_config('configs/radfm.py:model=radfm_13b,mesh=tpu_v5p_128')
  assert aot.batch_shapes(cfg, '2d', 128) == ((128, 4, 3, 512, 512, 4), 2048)
  assert aot.batch_shapes(cfg, '3d', 64) == ((64, 1, 3, 256, 256, 64), 2048)


def _run_aot(tmp_path, *args):
  """`radfm-jax aot *args` in a subprocess (the TPU_* variables and libtpu flags must be set
  before JAX is imported); returns (process, first JSON report)."""
  tmp_path.mkdir(parents=True, exist_ok=True)
  out = tmp_path / 'report.jsonl'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run([sys.executable, '-m', 'radfm_jax.cli.main', 'aot', *args, '--json', str(out)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=560)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc, json.loads(out.read_text().splitlines()[0])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None, reason='needs libtpu (tpu extra)')
def test_aot_compiles_tiny_for_v5p_2x2x2(tmp_path):
  proc, report = _run_aot(tmp_path, '--config', 'configs/radfm.py:model=tiny,mesh=tpu_v5p_16',
                          '--batch-2d', '8', '--text-len', '64')
  assert report['devices'] == 8 and report['device_kind'].startswith('TPU v5')
  assert report['mesh'] == {'data': 1, 'fsdp': 8, 'tensor': 1}
  assert report['fits'] is True and report['kind'] == '2d'
  assert report['argument_bytes'] > 0 and report['temp_bytes'] > 0
  assert 0 < report['peak_bytes'] < 95.74 * 2 ** 30
  cfg = load_config('configs/radfm.py:model=tiny,mesh=tpu_v5p_16')
  assert report['flops_per_step'] == train_step_flops(cfg.model, 8, 4, (64, 64, 4), 64)
  assert 'FITS' in proc.stdout


def test_set_tpu_env_raises_libtpu_thread_stacks(monkeypatch):
  for name in ('TPU_ACCELERATOR_TYPE', 'TPU_SKIP_MDS_QUERY', 'TPU_WORKER_HOSTNAMES',
               'ALLOW_MULTIPLE_LIBTPU_LOAD'):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv('LIBTPU_INIT_ARGS', '--default_thread_stack_size=1 --xla_foo=2')
  aot.set_tpu_env('v6e:4x4')
  args = os.environ['LIBTPU_INIT_ARGS'].split()
  assert os.environ['TPU_ACCELERATOR_TYPE'] == 'v6e-16'
  # The user's own value wins; the missing stack flags are added in front of their flags.
  assert '--default_thread_stack_size=1' in args and '--xla_foo=2' in args
  assert f'--fibers_default_thread_stack_size={aot.COMPILE_THREAD_STACK_BYTES}' in args
  assert sum(a.startswith('--default_thread_stack_size=') for a in args) == 1


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None, reason='needs libtpu (tpu extra)')
def test_aot_compiles_tiny_splash_for_v6e_2x4(tmp_path):
  """The splash kernel lowers through Mosaic for a v6e topology inside the sharded train step."""
  _, report = _run_aot(tmp_path, '--config', 'configs/radfm.py:model=tiny,mesh=tpu_v6e_8',
                       '--config.model.attention=splash', '--batch-2d', '8', '--text-len', '128')
  assert report['device_kind'].startswith('TPU v6') and report['fits'] is True
  assert report['attention'] == 'splash'


def test_needed_bytes_from_libtpu_refusal():
  message = ('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO '
             'temporaries (31.49G) exceeds available HBM (31.25G).')
  assert aot.needed_bytes(message) == 31.49 * 2 ** 30


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None, reason='needs libtpu (tpu extra)')
def test_aot_compiles_tiny_qlora_for_one_v6e_chip(tmp_path):
  """A single-chip topology (libtpu's default host bounds do not divide 1x1) and the QLoRA step."""
  proc, report = _run_aot(tmp_path, '--config', 'radfm:model=tiny,mesh=tpu_v6e_1,finetune=qlora',
                          '--batch-2d', '1', '--text-len', '128', '--kinds', '2d')
  assert report['devices'] == 1 and report['device_kind'] == 'TPU v6 lite'
  assert (report['finetune'], report['quant'], report['topology']) == ('qlora', 'int8', 'v6e:1x1')
  assert report['fits'] is True and 0 < report['peak_bytes'] < 31.25 * 2 ** 30
  assert 'qlora int8' in proc.stdout and 'FITS' in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None, reason='needs libtpu (tpu extra)')
def test_aot_generate_compiles_tiny_int8_for_one_v5e_chip(tmp_path):
  """`aot --generate` lowers prefill + decode for a single chip (v5e:1x1); with --quantize int8
  (or w8a8) the program's parameter arguments are the int8 kernels (about a third of the fp32
  bytes)."""
  common = ['--generate', '--config', 'configs/radfm.py:model=tiny,mesh=tpu_v5e_1',
            '--context', '256', '--max-new', '64']
  proc, q8 = _run_aot(tmp_path / 'q8', *common, '--quantize', 'int8')
  _, full = _run_aot(tmp_path / 'full', *common)
  assert (q8['devices'], q8['topology'], q8['program']) == (1, 'v5e:1x1', 'generate')
  assert q8['device_kind'].startswith('TPU v5') and q8['fits'] is True and 'FITS' in proc.stdout
  assert (q8['quantize'], full['quantize']) == ('int8', 'none')
  assert (q8['prompt_len'], q8['max_new_tokens']) == (192, 64)
  assert q8['param_bytes_total'] < 0.4 * full['param_bytes_total']
  assert q8['argument_bytes'] < full['argument_bytes'] and 0 < q8['peak_bytes'] < 15.75 * 2 ** 30
  # w8a8: the same int8 parameters, activations quantized in the program.
  _, w8 = _run_aot(tmp_path / 'w8', *common, '--quantize', 'w8a8')
  assert w8['quantize'] == 'w8a8' and w8['fits'] is True
  assert w8['param_bytes_total'] == q8['param_bytes_total']


def _run_aot_program(args, prelude='', drop=()):
  """`radfm-jax aot ARGS` in a subprocess, after `prelude` (Python), without the variables
  `drop`."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  for key in ('XLA_FLAGS',) + tuple(drop):
    env.pop(key, None)
  script = (f'import sys; {prelude}from radfm_jax.cli.main import main; '
            'sys.exit(main(sys.argv[1:]))')
  return subprocess.run([sys.executable, '-c', script, 'aot', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


AOT_TINY = ['--config', 'radfm:model=tiny,mesh=tpu_v5p_8', '--kinds', '2d']


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None, reason='needs libtpu (tpu extra)')
def test_aot_topology_libtpu_rejects_is_one_line():
  """A mesh.topology of the right form that libtpu does not know was JAX's INVALID_ARGUMENT with
  a traceback (exit 1); now one line naming the field and libtpu's reason (exit 2)."""
  proc = _run_aot_program(AOT_TINY + ['--config.mesh.topology=v5p:3x3x3'])
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.splitlines()[-1] == (
      "radfm-jax aot: config field mesh.topology='v5p:3x3x3': libtpu rejects it (Topology layout "
      '"v5p:3x3x3" is not divisible by the given (or default) chips_per_host_bounds "2x2x1"); '
      "expected a TPU generation and shape it knows, e.g. 'v5p:2x2x1' or 'v6e:4x4'")
  assert 'Traceback' not in proc.stderr


@pytest.mark.parametrize('mode', [[], ['--generate', '--context', '512', '--max-new', '16']])
def test_aot_without_libtpu_is_one_line(mode):
  """libtpu is the `tpu` extra: without it JAX's 'TPU support not installed' RuntimeError came
  with a traceback (exit 1); now one line saying what to install (exit 2)."""
  # As if not installed: no libtpu module, and no TPU_LIBRARY_PATH (JAX sets it in this process
  # when it finds libtpu, and a subprocess would inherit it).
  proc = _run_aot_program(AOT_TINY + mode, prelude="sys.modules['libtpu'] = None; ",
                          drop=('TPU_LIBRARY_PATH',))
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr == ('radfm-jax aot: compiling for a TPU topology needs libtpu, which is not '
                         "installed; expected it installed (pip install 'radfm-jax[tpu]')\n")
