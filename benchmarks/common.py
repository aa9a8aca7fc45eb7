"""Shared measurement helpers for the benchmarks: timing and the machine's dense-matmul FLOP/s."""

import time

import jax
import jax.numpy as jnp


def time_fn(fn, *args, repeats: int = 5, warmup: int = 1) -> float:
  """Best wall time (s) of `fn(*args)` over `repeats` runs, outputs blocked on."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def matmul_flops_per_second(n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
  """FLOP/s of one n x n x n matmul on the default device (the roofline for MFU ratios)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  seconds = time_fn(jax.jit(jnp.matmul), a, b, repeats=repeats)
  return 2 * n ** 3 / seconds
