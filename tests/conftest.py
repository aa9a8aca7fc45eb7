"""Test setup: 8 fake CPU devices (set before JAX is imported), fp32 matmuls everywhere, and one
persistent compilation cache for the whole test session."""

import os
import shutil
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Many tests compile the same program more than once: a run and its resume, a cached and an
# uncached run of one config, the commands the tests start as subprocesses. A `tiny` train step
# takes 20-30 s to compile on 2 cores and a few ms to load, so the session keeps one persistent
# compilation cache (radfm_jax/train/compile_cache.py), shared by the xdist workers (they inherit
# the variable from the process that made the folder) and every command they run, in a fresh
# temporary folder (never the user's ~/.cache) removed when that process ends. A loaded executable
# is the compiled one, so no result changes. tests/test_train_run.py points its commands at
# folders of its own to check the cache itself.
_OWN_CACHE = None
if 'RADFM_COMPILATION_CACHE' not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix='radfm-jax-test-compile-cache-')
  os.environ['RADFM_COMPILATION_CACHE'] = _OWN_CACHE

import jax  # noqa: E402
import pytest  # noqa: E402

from radfm_jax.train import compile_cache  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')
compile_cache.enable()          # the in-process compiles too ($RADFM_COMPILATION_CACHE=off: none)


def pytest_unconfigure(config):
  if _OWN_CACHE is not None:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(scope='session')
def tiny_cfg():
  from radfm_jax.config import model_config
  return model_config('tiny')
