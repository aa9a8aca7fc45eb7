"""The full training step, as the loop runs it: host batch -> device arrays -> jitted, donated
step (forward, backward, accumulation, clipping, AdamW) -> metrics back on the host.

    python benchmarks/train_loop.py [--config configs/radfm.py:model=small,mesh=cpu] [--steps 5]
        [--grad-accum 1] [--batch 4] [--length 256]

Prints tokens/s, step time and MFU = analytic step FLOPs / step time over the dense-matmul FLOP/s
of a 2048^3 fp32 matmul measured in the same run on the same device(s). A ratio, not an assert.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks.common import matmul_flops_per_second  # noqa: E402
from radfm_jax.config import load_config  # noqa: E402
from radfm_jax.models.radfm import count_params  # noqa: E402
from radfm_jax.train import loop  # noqa: E402
from radfm_jax.train import metrics as metrics_lib  # noqa: E402
from radfm_jax.train.synthetic import SyntheticBatches  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/radfm.py:model=small,mesh=cpu')
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--grad-accum', type=int, default=1)
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--length', type=int, default=256)
  parser.add_argument('--images', type=int, default=1)
  args = parser.parse_args()
  cfg = load_config(args.config, [f'train.grad_accum={args.grad_accum}',
                                  f'data.batch_size_2d={args.batch}',
                                  f'train.synthetic_length={args.length}',
                                  f'train.synthetic_images={args.images}',
                                  'train.warmup_steps=1', 'train.tensorboard=False'])
  matmul = matmul_flops_per_second(2048)
  mesh, rules, graphdef, tx, abs_state, shardings = loop.build(cfg)
  state = loop.init_state(cfg, mesh, rules, tx, shardings)
  train_step, _ = loop._jitted_steps(cfg, mesh, rules, graphdef, tx, shardings)
  data = SyntheticBatches(cfg)
  first = next(data)
  flops = metrics_lib.batch_flops(cfg.model, first)
  tokens = first['tokens'].size
  t0 = time.perf_counter()
  state, m = train_step(state, loop.global_batch(first, mesh, rules))
  jax.block_until_ready(m['loss'])
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(args.warmup + args.steps):
    start = time.perf_counter()
    host = next(data)                                   # host batch (numpy) ...
    batch = loop.global_batch(host, mesh, rules)        # ... -> device arrays
    state, m = train_step(state, batch)
    loss = float(jax.device_get(m['loss']))             # metrics back on the host
    if i >= args.warmup:
      times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  n_dev = mesh.devices.size
  print(f'config {args.config}  devices {n_dev} x {jax.devices()[0].device_kind}  '
        f'params {count_params(state.params) / 1e6:.1f}M  batch {args.batch} x {args.length} tokens, '
        f'{args.images} image(s) {list(first["images"].shape[3:])}  grad_accum {args.grad_accum}')
  print(f'first step (compile + run) {compile_s:.1f} s; last loss {loss:.4f}')
  print(f'step time (median of {args.steps}) {step_s * 1e3:.1f} ms  '
        f'[min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}]')
  print(f'tokens/s {tokens / step_s:,.0f}')
  print(f'step FLOPs (analytic, 3x forward) {flops:.3e}  ->  {flops / step_s / 1e9:.2f} GFLOP/s')
  print(f'2048^3 fp32 matmul {matmul / 1e9:.2f} GFLOP/s per device')
  print(f'MFU vs measured matmul: {flops / step_s / (matmul * n_dev):.1%}')


if __name__ == '__main__':
  main()
