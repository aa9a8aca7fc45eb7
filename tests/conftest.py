"""Test setup: 8 fake CPU devices (set before JAX is imported), fp32 matmuls everywhere."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Commands run by the tests (in-process or as subprocesses) keep no persistent compilation cache in
# the user's ~/.cache; tests/test_train_run.py turns it on in folders of its own.
os.environ.setdefault('RADFM_COMPILATION_CACHE', 'off')

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')


@pytest.fixture(scope='session')
def tiny_cfg():
  from radfm_jax.config import model_config
  return model_config('tiny')
