"""Forward + backward (training mode) of the `bench` model on this machine, as the train loop
computes it: the model config, the XLA compiler options (`mesh.xla_options`) and the host
allocator (`mesh.host_allocator`) of the `cpu` preset (radfm_jax/presets.py) and the training loss
(`train.step.cross_entropy_loss`).

Prints model FLOPs per step (analytic), achieved FLOP/s, the FLOP/s of a 2048^3 fp32 matmul
measured in the same run, and their ratio (goal >= 0.6), for each `--dtypes` variant (by default
fp32, fp32 with JAX's own backward of the dense projections (`model.dense_backward='autodiff'`,
the lever the preset's 'transposed' is measured against), fp32 compiled with `--xla-options`, and
bf16, timed interleaved so all see the same machine load, their order rotated per round so none
keeps the same slot), with its page faults and kernel CPU time per step; then the cost of the
gather splice against the original's one-hot matmul at the official sizes.

    .venv/bin/python benchmarks/train_step.py [--size bench] [--repeats 5] [--profile]
        [--dtypes float32,bfloat16,float32:unrolled,float32:autodiff,float32:xla]
        [--xla-options JSON]
        [--demo-step] [--host-allocator system|hugepages|keep]

The process runs with the `cpu` preset's host allocator (`mesh.host_allocator`, 'hugepages': glibc
gives XLA's buffers transparent huge pages; radfm_jax/hostmem.py), as `radfm-jax train` does: the
script restarts itself with its glibc settings. `--host-allocator system` measures glibc's
defaults (each step faults its buffers in afresh, 4 KiB at a time).

--xla-options: the XLA compiler options a `:xla` variant is compiled with (by default YNNPACK's
elementwise fusions beside its dots, the lever measured for the `cpu` preset); the other variants
use the preset's own `mesh.xla_options`. --demo-step also times the training loop's whole step
(AdamW and metrics included) of `configs/demo.py` on its batch shape, with the preset's options
and with --xla-options, interleaved: what `make demo` would gain or lose; and that step's AdamW
update alone, both ways.

--profile adds where the step's time goes: an XLA:CPU trace of the step parsed per HLO op and
summed per category (matmul/conv, elementwise, reductions/norms, softmax, copies/transposes,
collectives, loop control; benchmarks/xla_profile.py), for the first of `--dtypes`.
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import xla_profile  # noqa: E402
from common import machine, matmul_flops_per_second, rotated, time_fn  # noqa: E402
from radfm_jax import hostmem  # noqa: E402
from radfm_jax.config import load_config, model_config  # noqa: E402
from radfm_jax.models.flops import batch_flops, one_hot_splice_flops  # noqa: E402
from radfm_jax.models.radfm import create_model, splice_image_tokens  # noqa: E402
from radfm_jax.train.step import cross_entropy_loss  # noqa: E402


# The lever `--xla-options` measures by default: XLA:CPU's elementwise fusions given to YNNPACK.
YNN_ELTWISE = {'xla_cpu_experimental_ynn_fusion_type':
               'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_ELTWISE'}


def make_batch(cfg, batch=2, images=1, shape=(256, 256, 16), length=256, seed=0):
  rng = np.random.default_rng(seed)
  vocab = cfg.llama.vocab_size
  tokens = rng.integers(3, vocab, (batch, length)).astype(np.int32)
  for s in range(images):
    start = 1 + s * 34
    tokens[:, start] = vocab
    tokens[:, start + 1:start + 33] = vocab + 2 + s * 32 + np.arange(32)
    tokens[:, start + 33] = vocab + 1
  labels = np.where(tokens >= vocab, -100, tokens).astype(np.int32)
  labels[:, :40] = -100
  return dict(tokens=jnp.asarray(tokens), labels=jnp.asarray(labels),
              attention_mask=jnp.ones((batch, length), jnp.int32),
              images=jnp.asarray(rng.random((batch, images, 3) + shape, np.float32)),
              image_mask=jnp.ones((batch, images), bool))


def loss_fn(params, graphdef, rest, batch, rng):
  model = nnx.merge(graphdef, params, rest)
  logits = model(batch['tokens'], batch['images'], batch['attention_mask'], batch['image_mask'],
                 rng=rng)
  return cross_entropy_loss(logits, batch['labels'])


def splice_comparison(repeats):
  """Gather vs one-hot splice at the official table (32000 + 2 + 32 rows, width 5120)."""
  cfg = model_config('radfm_13b')
  length = 512
  rng = np.random.default_rng(0)
  text = jnp.asarray(rng.normal(size=(32000, 5120)).astype(np.float32))
  figure = jnp.asarray(rng.normal(size=(2, 5120)).astype(np.float32))
  images = jnp.asarray(rng.normal(size=(1, 32, 5120)).astype(np.float32))
  tokens = jnp.asarray(rng.integers(0, 32034, (1, length)).astype(np.int32))
  gather = jax.jit(splice_image_tokens)

  def one_hot(tokens, text, figure, images):
    table = jnp.concatenate([text, figure, images[0]])
    return jax.nn.one_hot(tokens, table.shape[0], dtype=table.dtype) @ table

  one_hot = jax.jit(one_hot)
  np.testing.assert_array_equal(np.asarray(gather(tokens, text, figure, images)),
                                np.asarray(one_hot(tokens, text, figure, images)))
  t_gather = time_fn(gather, tokens, text, figure, images, repeats=repeats)
  t_onehot = time_fn(one_hot, tokens, text, figure, images, repeats=max(2, repeats // 2))
  step_flops = 3 * one_hot_splice_flops(cfg, 1, 1, 2048)
  return t_gather, t_onehot, step_flops


def demo_step_comparison(xla_options, repeats):
  """The training loop's whole step (train/step.py: forward, backward, AdamW, metrics) of
  configs/demo.py on its batch (8 x one 3x64x64x16 image + 80 tokens, synthetic values), compiled
  as the loop compiles it (`loop._jitted_steps`) with the `cpu` preset's options and with
  `xla_options`, timed interleaved (best of 3 per round); and its optimizer update alone (the
  loop's AdamW on the trainable parameters, no metrics) compiled both ways, which is where the
  options have cost the demo's step (docs/performance.md)."""
  import optax
  from radfm_jax.train import loop, optim
  from radfm_jax.train.synthetic import SyntheticBatches
  runs, updates = {}, {}
  for name, options in (('preset options', None), ('--xla-options', xla_options)):
    cfg = load_config('configs/demo.py', ['data.store=synthetic'] + (
        [] if options is None else [f'mesh.xla_options={list(map(list, options.items()))}']))
    options = dict(cfg.mesh.xla_options)
    mesh, rules, graphdef, tx, _, shardings = loop.build(cfg)
    state = loop.init_state(cfg, mesh, rules, tx, shardings)
    batch = loop.global_batch(next(iter(SyntheticBatches(cfg))), mesh, rules)
    trainable, _ = optim.split_trainable(state.params, optim.trainable_spec(cfg))
    trainable = jax.tree.map(jnp.copy, trainable)        # the step below donates the state's
    update_args = (trainable, tx.init(trainable), jax.tree.map(lambda x: x * 1e-3, trainable))

    def update(params, opt_state, grads, tx=tx):
      deltas, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, deltas), opt_state

    updates[name] = (jax.jit(update, compiler_options=options or None), update_args)
    fn, _ = loop._jitted_steps(cfg, mesh, rules, graphdef, tx, shardings)
    state, metrics = fn(state, batch)
    print(f'demo step, {name} {options or "(none)"}: first loss {float(metrics["loss"]):.6f}')
    runs[name] = [fn, state, batch]
  best = dict.fromkeys(runs, float('inf'))
  for round_index in range(repeats):
    for name in rotated(runs, round_index):
      run = runs[name]
      fn, state, batch = run
      for _ in range(3):
        start = time.perf_counter()
        state, _ = fn(state, batch)
        jax.block_until_ready(state)
        best[name] = min(best[name], time.perf_counter() - start)
      run[1] = state
  alone = {name: float('inf') for name in updates}
  for round_index in range(repeats):
    for name in rotated(updates, round_index):
      fn, update_args = updates[name]
      alone[name] = min(alone[name], time_fn(fn, *update_args, repeats=3))
  count = sum(x.size for x in jax.tree.leaves(updates['preset options'][1][0]))
  for name, seconds in best.items():
    print(f'demo step ({name}) {seconds * 1e3:8.1f} ms  '
          f'({seconds / best["preset options"] - 1:+.1%} vs the preset); its AdamW update alone '
          f'({count / 1e6:.1f}M parameters) {alone[name] * 1e3:6.1f} ms '
          f'({alone[name] / alone["preset options"] - 1:+.1%})')


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--size', default='bench')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--dtypes', default='float32,float32:autodiff,float32:xla,bfloat16',
                      help='compute dtypes (model.compute_dtype) to time, interleaved, in one run; '
                           'DTYPE:unrolled times that dtype with model.scan_layers=False, '
                           "DTYPE:autodiff with model.dense_backward='autodiff' (the preset's "
                           "is 'transposed'), DTYPE:xla compiled with --xla-options")
  parser.add_argument('--xla-options', type=json.loads, default=YNN_ELTWISE,
                      help='JSON object of XLA compiler options for the :xla variants')
  parser.add_argument('--demo-step', action='store_true',
                      help="also time the loop's whole train step of configs/demo.py with the "
                           'preset options and with --xla-options')
  parser.add_argument('--host-allocator', default=None, choices=sorted(hostmem.POLICIES),
                      help="glibc's policy for the step's buffers (radfm_jax/hostmem.py; default: "
                           "the `cpu` preset's mesh.host_allocator); the script restarts with it")
  parser.add_argument('--profile', action='store_true',
                      help='also print where the step time goes (XLA:CPU trace per HLO op)')
  args = parser.parse_args()
  spec = f'radfm:model={args.size},mesh=cpu'    # the `cpu` hardware preset, as `radfm-jax train`
  allocator = args.host_allocator or load_config(spec).mesh.host_allocator
  hostmem.restart_with(allocator)       # the train loop's process gets it from `radfm-jax train`
  print(f'machine: {machine()}; load average {os.getloadavg()[0]:.1f}')
  print(hostmem.describe(allocator))

  steps = {}
  for variant in args.dtypes.split(','):
    dtype, *flags = variant.split(':')
    # The model and compiler options of the `cpu` hardware preset, as `radfm-jax train` gets them.
    preset = load_config(spec, [f'model.compute_dtype={dtype!r}'] +
                         (['model.scan_layers=False'] if 'unrolled' in flags else []) +
                         (["model.dense_backward='autodiff'"] if 'autodiff' in flags else []))
    options = args.xla_options if 'xla' in flags else dict(preset.mesh.xla_options)
    cfg = preset.model
    # The bench image (256x256x16); smaller configs get their vision tower's own size.
    side = min(256, cfg.vision.image_size)
    batch = make_batch(cfg, shape=(side, side, min(16, cfg.vision.frames)))
    graphdef, params, rest = nnx.split(create_model(cfg, seed=0), nnx.Param, ...)
    step = jax.jit(jax.value_and_grad(loss_fn), static_argnums=1,
                   compiler_options=options or None)
    args_ = (params, graphdef, rest, batch, jax.random.key(0))
    start = time.perf_counter()
    loss = float(jax.block_until_ready(step(*args_))[0])
    print(f'{variant}: remat {cfg.remat_policy}, scan_layers {cfg.scan_layers}, dense backward '
          f'{cfg.dense_backward}, xla options '
          f'{options or "none"}, compile + '
          f'first step {time.perf_counter() - start:.1f} s, loss {loss:.6f}')
    steps[variant] = (step, args_, cfg)
  # Interleaved: the matmul reference and each dtype's step once per round (the steps' order
  # rotated per round), best of the rounds, so a burst of load hits every figure alike.
  best = dict.fromkeys(steps, float('inf'))
  # Per step: minor page faults (the buffers XLA:CPU's allocator maps afresh) and kernel CPU time.
  faults = {variant: [] for variant in steps}
  matmul = 0.0
  for round_index in range(args.repeats):
    matmul = max(matmul, matmul_flops_per_second(repeats=2))
    for dtype in rotated(steps, round_index):
      step, args_, _ = steps[dtype]
      before = resource.getrusage(resource.RUSAGE_SELF)
      best[dtype] = min(best[dtype], time_fn(step, *args_, repeats=1, warmup=0))
      after = resource.getrusage(resource.RUSAGE_SELF)
      faults[dtype].append(((after.ru_minflt - before.ru_minflt) * resource.getpagesize(),
                            after.ru_stime - before.ru_stime))
  image = 'x'.join(map(str, batch['images'].shape[2:]))
  flops = batch_flops(cfg, batch).train_step
  print(f'config: {args.size}  batch 2 x (1 image {image}, 256 tokens)  devices: '
        f'{jax.devices()[0].platform} x{jax.device_count()}; load average '
        f'{os.getloadavg()[0]:.1f}')
  print(f'model FLOPs / step        {flops / 1e9:10.1f} GFLOP')
  print(f'2048^3 fp32 matmul        {matmul / 1e9:10.1f} GFLOP/s')
  for dtype, seconds in best.items():
    achieved = flops / seconds
    print(f'{dtype:<24} step time {seconds * 1e3:10.1f} ms   {achieved / 1e9:7.1f} GFLOP/s   '
          f'ratio to the fp32 matmul {achieved / matmul:.2f} (goal >= 0.6)')
    paged, kernel = min(faults[dtype])
    print(f'{"":<24} page faults {paged / 1e6:.0f} MB / step, kernel CPU time '
          f'{kernel * 1e3:.0f} ms / step (the fewest of the rounds)')
  if args.profile:
    step, args_, _ = next(iter(steps.values()))
    with tempfile.TemporaryDirectory() as trace:
      times, wall, hlo = xla_profile.profile(step, args_, trace,
                                             steps=max(1, min(3, args.repeats)))
    print(xla_profile.report(xla_profile.by_category(times, hlo), wall, 'step', times, hlo))

  if args.demo_step:
    demo_step_comparison(args.xla_options, args.repeats)

  t_gather, t_onehot, onehot_flops = splice_comparison(args.repeats)
  print(f'splice at official sizes (512 tokens, 1 image): gather {t_gather * 1e3:.2f} ms, one-hot '
        f'matmul {t_onehot * 1e3:.1f} ms, ratio {t_onehot / t_gather:.0f}x; the one-hot form costs '
        f'{onehot_flops / 1e12:.2f} TFLOP per 2048-token sample per training step')


if __name__ == '__main__':
  main()
