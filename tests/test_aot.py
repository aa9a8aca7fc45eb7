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


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None, reason='needs libtpu (tpu extra)')
def test_aot_compiles_tiny_for_v5p_2x2x2(tmp_path):
  out = tmp_path / 'report.jsonl'
  # A subprocess: the TPU_* variables must be set before JAX is imported.
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run(
      [sys.executable, '-m', 'radfm_jax.cli', 'aot', '--config',
       'configs/radfm.py:model=tiny,mesh=tpu_v5p_16', '--batch_2d', '8', '--text_len', '64',
       '--json', str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=560)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text().splitlines()[0])
  assert report['devices'] == 8 and report['device_kind'].startswith('TPU v5')
  assert report['mesh'] == {'data': 1, 'fsdp': 8, 'tensor': 1}
  assert report['fits'] is True and report['kind'] == '2d'
  assert report['argument_bytes'] > 0 and report['temp_bytes'] > 0
  assert 0 < report['peak_bytes'] < 95.74 * 2 ** 30
  cfg = load_config('configs/radfm.py:model=tiny,mesh=tpu_v5p_16')
  assert report['flops_per_step'] == train_step_flops(cfg.model, 8, 4, (64, 64, 4), 64)
  assert 'FITS' in proc.stdout
