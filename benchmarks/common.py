"""Shared measurement helpers for the benchmarks: timing, the machine's dense-matmul FLOP/s and
its matrix-vector streaming bandwidth."""

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


def rotated(names, round_index: int) -> list:
  """`names` in the order a round of an interleaved comparison times them: rotated by one place
  per round, so that every variant runs in every slot. Identical programs timed in three fixed
  slots of one process came out up to 3% apart by slot (docs/performance.md), which a fixed
  order would credit to the variants."""
  names = list(names)
  k = round_index % len(names) if names else 0
  return names[k:] + names[:k]


def matmul_flops_per_second(n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
  """FLOP/s of one n x n x n matmul on the default device (the roofline for MFU ratios)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  seconds = time_fn(jax.jit(jnp.matmul), a, b, repeats=repeats)
  return 2 * n ** 3 / seconds


class GemvBandwidth:
  """Bytes/s at which one jitted program streams `count` fp32 [rows, cols] matrices through
  matrix-vector products: the floor of a memory-bound decode step is its weight bytes over this.

  Made once (the matrices, the compiled program), called as often as wanted: a benchmark can
  re-measure between its timed calls, so that its floor and its steps see the same host."""

  def __init__(self, rows: int = 8192, cols: int = 2048, count: int = 8):
    self.mats = [jax.random.normal(jax.random.key(i), (rows, cols), jnp.float32)
                 for i in range(count)]
    self.x = jnp.ones((cols,), jnp.float32)
    self.bytes = count * rows * cols * 4
    self.stream = jax.jit(lambda mats, x: sum(m @ x for m in mats))

  def __call__(self, repeats: int = 5) -> float:
    return self.bytes / time_fn(self.stream, self.mats, self.x, repeats=repeats)


def machine() -> str:
  """`lscpu`'s model name and the SIMD flags that matter to XLA:CPU (one line)."""
  import subprocess
  info = {}
  for line in subprocess.run(['lscpu'], capture_output=True, text=True).stdout.splitlines():
    key, _, value = line.partition(':')
    info[key.strip()] = value.strip()
  flags = sorted(f for f in info.get('Flags', '').split()
                 if f.startswith(('avx', 'fma', 'amx', 'sse4')))
  return f"{info.get('Model name', '?')}; {info.get('CPU(s)', '?')} CPUs; flags {' '.join(flags)}"
