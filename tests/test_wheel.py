"""A non-editable wheel install has the built-in sizes and experiments: from an empty directory it
loads `model_config('tiny')` and `radfm-jax train` runs the built-in `tiny` config for 2 steps."""

import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

import conftest_data as cd

from radfm_jax.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd, **kwargs):
  proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
  assert proc.returncode == 0, f'{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
  return proc.stdout


def _install_wheel(tmp_path):
  """A fresh venv holding the wheel (non-editable); the test venv's packages are reachable
  through a plain .pth line, which makes Python add the directory but not run the .pth files in
  it, so the test venv's editable radfm_jax finder stays inactive."""
  src = tmp_path / 'src'     # build from a copy: no build/ or egg-info left in the repository
  shutil.copytree(os.path.join(ROOT, 'radfm_jax'), src / 'radfm_jax',
                  ignore=shutil.ignore_patterns('__pycache__'))
  for name in ('pyproject.toml', 'README.md'):
    shutil.copy(os.path.join(ROOT, name), src / name)
  _run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q',
        '-w', str(tmp_path / 'dist'), str(src)])
  (wheel,) = os.listdir(tmp_path / 'dist')
  venv = tmp_path / 'venv'
  _run([sys.executable, '-m', 'venv', '--without-pip', str(venv)])
  python = str(venv / 'bin' / 'python')
  # Installed before the .pth exists, so pip sees no radfm_jax in this environment.
  _run([sys.executable, '-m', 'pip', '--python', python, 'install', '--no-deps', '--no-index',
        '-q', str(tmp_path / 'dist' / wheel)])
  site = _run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])']).strip()
  with open(os.path.join(site, 'test_venv_packages.pth'), 'w') as f:
    f.write(sysconfig.get_paths()['purelib'] + '\n')
  return venv, site


@pytest.mark.slow
def test_wheel_install_loads_sizes_and_trains_from_an_empty_directory(tmp_path):
  venv, site = _install_wheel(tmp_path)
  empty = tmp_path / 'empty'
  empty.mkdir()
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  env.update(JAX_PLATFORMS='cpu', XLA_FLAGS=cd.xla_flags(8),
             RADFM_KERNEL_CACHE=str(tmp_path / 'kernels'))

  probe = ('import json, sys, radfm_jax; from radfm_jax.config import model_config; '
           'from radfm_jax.infer import panel_kernel; '
           "m = model_config('tiny'); print(json.dumps({'file': radfm_jax.__file__, "
           "'editable': [n for n in sys.modules if 'editable' in n], 'size': m.size, "
           "'hidden': m.llama.hidden_size, 'vocab': m.llama.vocab_size, "
           "'image': m.vision.image_size, 'remat': m.remat_policy, "
           "'kernel': [panel_kernel.SOURCE, panel_kernel.compiler() and panel_kernel.load()]}))")
  got = json.loads(_run([str(venv / 'bin' / 'python'), '-c', probe], cwd=empty, env=env))
  assert got['file'] == os.path.join(site, 'radfm_jax', '__init__.py')
  assert got['editable'] == []
  # The decode's C++ kernel ships in the wheel and builds from there (where a compiler is).
  assert got['kernel'][0] == os.path.join(site, 'radfm_jax', 'infer', 'panel_product.cc')
  if got['kernel'][1] is not None:
    # the panel width: two vectors of 8 (AVX2) or 16 (AVX-512) floats
    assert got['kernel'][1] in (16, 32) and len(os.listdir(tmp_path / 'kernels')) == 1
  assert {k: got[k] for k in ('size', 'hidden', 'vocab', 'image', 'remat')} == {
      'size': 'tiny', 'hidden': 64, 'vocab': 512, 'image': 64, 'remat': 'none'}

  out = _run([str(venv / 'bin' / 'radfm-jax'), 'train', '--config',
              'configs/radfm.py:model=tiny,mesh=cpu', '--workdir', 'run', '--no-progress',
              '--config.train.steps=2', '--config.train.warmup_steps=0',
              '--config.train.log_every=1',
              '--config.data.store=synthetic', '--config.data.batch_size_2d=8',
              '--config.train.synthetic_length=48'],
             cwd=empty, env=env)
  summary = json.loads(out.strip().splitlines()[-1])
  assert (summary['status'], summary['step'], summary['checkpoint']) == ('done', 2, 2)
  assert math.isfinite(summary['last_loss'])
  workdir = empty / 'run'
  assert os.path.isdir(workdir / 'checkpoints' / '2')
  rows = read_metrics(str(workdir), 'train')
  assert [r['step'] for r in rows] == [1, 2] and all(math.isfinite(r['loss']) for r in rows)
  assert rows[-1]['loss'] == summary['last_loss']
  with open(workdir / 'checkpoints' / 'config.json') as f:
    saved = json.load(f)
  assert saved['train']['steps'] == 2 and saved['train']['b2'] == 0.999    # full, resolved
  assert saved['model']['size'] == 'tiny' and saved['mesh']['preset'] == 'cpu'
