"""Forward + backward (training mode, fp32) of the `bench` model on this machine.

Prints model FLOPs per step (analytic), achieved FLOP/s, the FLOP/s of a 2048^3 fp32 matmul
measured in the same run, and their ratio (goal >= 0.6); then the cost of the gather splice
against the original's one-hot matmul at the official sizes.

    .venv/bin/python benchmarks/train_step.py [--size bench] [--repeats 5] [--profile]

--profile adds where the step's time goes: an XLA:CPU trace of the step parsed per HLO op and
summed per category (matmul/conv, elementwise, reductions/norms, softmax, copies/transposes,
collectives, loop control; benchmarks/xla_profile.py).
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import xla_profile  # noqa: E402
from common import machine, matmul_flops_per_second, time_fn  # noqa: E402
from radfm_jax.config import model_config  # noqa: E402
from radfm_jax.models.flops import batch_flops, one_hot_splice_flops  # noqa: E402
from radfm_jax.models.radfm import create_model, splice_image_tokens  # noqa: E402


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
  labels = batch['labels'][:, 1:]
  valid = labels != -100
  logp = jax.nn.log_softmax(logits[:, :-1])
  nll = -jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], -1)[..., 0]
  return jnp.sum(nll * valid) / jnp.sum(valid)


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


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--size', default='bench')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--profile', action='store_true',
                      help='also print where the step time goes (XLA:CPU trace per HLO op)')
  args = parser.parse_args()
  print(f'machine: {machine()}; load average {os.getloadavg()[0]:.1f}')

  cfg = model_config(args.size, remat_policy='none', compute_dtype='float32')
  # The bench image (256x256x16); smaller configs get their vision tower's own size.
  side = min(256, cfg.vision.image_size)
  batch = make_batch(cfg, shape=(side, side, min(16, cfg.vision.frames)))
  model = create_model(cfg, seed=0)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  step = jax.jit(jax.value_and_grad(loss_fn), static_argnums=1)
  rng = jax.random.key(0)
  seconds = time_fn(lambda p, b: step(p, graphdef, rest, b, rng), params, batch,
                    repeats=args.repeats)
  flops = batch_flops(cfg, batch).train_step
  matmul = matmul_flops_per_second()
  achieved = flops / seconds
  image = 'x'.join(map(str, batch['images'].shape[2:]))
  print(f'config: {args.size}  batch 2 x (1 image {image}, 256 tokens)  devices: '
        f'{jax.devices()[0].platform} x{jax.device_count()}')
  print(f'model FLOPs / step        {flops / 1e9:10.1f} GFLOP')
  print(f'step time                 {seconds * 1e3:10.1f} ms')
  print(f'achieved                  {achieved / 1e9:10.1f} GFLOP/s')
  print(f'2048^3 fp32 matmul        {matmul / 1e9:10.1f} GFLOP/s')
  print(f'ratio (goal >= 0.6)       {achieved / matmul:10.2f}')
  if args.profile:
    with tempfile.TemporaryDirectory() as trace:
      times, wall, hlo = xla_profile.profile(step, (params, graphdef, rest, batch, rng), trace,
                                             steps=max(1, min(3, args.repeats)))
    print(xla_profile.report(xla_profile.by_category(times, hlo), wall, 'step', times, hlo))

  t_gather, t_onehot, onehot_flops = splice_comparison(args.repeats)
  print(f'splice at official sizes (512 tokens, 1 image): gather {t_gather * 1e3:.2f} ms, one-hot '
        f'matmul {t_onehot * 1e3:.1f} ms, ratio {t_onehot / t_gather:.0f}x; the one-hot form costs '
        f'{onehot_flops / 1e12:.2f} TFLOP per 2048-token sample per training step')


if __name__ == '__main__':
  main()
