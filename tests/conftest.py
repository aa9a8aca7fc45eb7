"""Test setup: 8 fake CPU devices (set before JAX is imported), fp32 matmuls everywhere, and one
persistent compilation cache for the whole test session."""

import os
import shutil
import tempfile

from conftest_data import XLA_TEST_OPTIONS  # imports no JAX: the flags below still apply

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
# XLA:CPU compiles with LLVM at -O0 in the suite (XLA_TEST_OPTIONS; the commands the tests start
# get it from conftest_data.xla_flags): compiling is most of the suite's time, and this roughly
# halves it (test_train_step.py + test_sharding.py: 217 -> 119 s on 2 cores). The HLO passes and
# fusions are XLA's usual ones (the compiled HLO of a tiny train step is the same text); only the
# machine code differs, so a value may move by an ulp (that step's loss is bit-identical, its
# gradients within 4.5e-8). One program run twice still gives the same bits; two programs of the
# same math (a product over 1 row and over n rows) are compared with tolerances. Benchmarks, the
# demo and every command a user runs keep XLA's defaults.
if XLA_TEST_OPTIONS and XLA_TEST_OPTIONS not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' ' + XLA_TEST_OPTIONS
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
