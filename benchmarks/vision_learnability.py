"""How fast can the demo's vision path learn the real scans on its own? (issue 16, item 1)

The demo's decoder never reads the real scans (docs/performance.md). This separates the two halves
of that problem: it trains the image encoder of the demo model (ViT -> Perceiver -> fc, exactly as
`RadFM.encode_images`) with a *direct* classification loss, a linear head on the mean of the 32
image tokens predicting which of the ~19 source scans an augmented copy comes from, and reports
the held-out accuracy (other augmentations of the same scans) every --every steps. Beside it, in
the same run, the leave-one-out-free pixel baseline: 1-nearest-neighbour of each held-out model
input (flattened, standardised) among the training copies, for the source and the modality.

If the encoder cannot reach the pixel baseline with a direct loss in the demo's budget, no
decoder-side recipe can make the demo answer the real-scan questions from the tokens.

`--task side` asks the same of the phantoms' lesion side (left / right, a position rather than a
content): the head predicts the side of each lesion phantom from the mean of its 32 tokens. With
the original's uniform(0, 1) position tables the loss sits at ln 2 for ~250 steps;
`--set model.vision.pos_init_scale=3` makes it learnable from the first ~150 (docs/performance.md).

    python benchmarks/vision_learnability.py --out /tmp/vd [--task source|side] [--steps 300] \\
        [--lr 1e-3] [--set model.perceiver.latent_init_std=0.02]

--out is a demo output folder (its data, store and tokenizer are built there when missing, as
`radfm-jax demo` and benchmarks/vision_diagnostics.py do).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from common import machine  # noqa: E402


def pixel_nearest_neighbour(train_x, train_y, test_x, test_y) -> float:
  """Accuracy of the training label of each test row's nearest training row (L2, standardised)."""
  def norm(x):
    x = x.reshape(len(x), -1).astype(np.float64)
    return (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1e-6)
  a, b = norm(train_x), norm(test_x)
  d = (b * b).sum(1)[:, None] + (a * a).sum(1)[None] - 2 * b @ a.T
  return float(np.mean(np.asarray(train_y)[d.argmin(1)] == np.asarray(test_y)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='/tmp/vision_learnability')
  parser.add_argument('--task', choices=('source', 'side'), default='source',
                      help="source: which real scan (and its modality); side: the phantom "
                      "lesion's side")
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--every', type=int, default=50)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--lr', type=float, default=1e-3)
  parser.add_argument('--set', action='append', default=[], metavar='a.b=value',
                      help='config override of the demo config (repeatable)')
  args = parser.parse_args()

  from radfm_jax import demo
  run = demo.setup(os.path.abspath(args.out), overrides=args.set)
  cfg = run.cfg

  import jax.numpy as jnp
  import optax
  from flax import nnx
  from radfm_jax.eval.vision import probe_set
  from radfm_jax.models.radfm import create_model

  if args.task == 'source':
    def pick(records):
      return [r for r in records if r['family'] == 'real' and r['task'] == 'modality']

    def target(r):
      return r['source']
  else:
    def pick(records):
      return [r for r in records if r['family'] == 'phantom' and r['id'].endswith('_side')]

    def target(r):
      return r['answer']
  train, heldout = probe_set(run.store, pick(run.train), cfg.data), probe_set(
      run.store, pick(run.heldout), cfg.data)
  sources = sorted({target(r) for r in pick(run.train)})   # the classes: sources, or sides
  index = {s: i for i, s in enumerate(sources)}
  y_train = np.array([index[target(r)] for r in pick(run.train)])
  y_held = np.array([index[target(r)] for r in pick(run.heldout)])
  modality = {target(r): r['answer'] for r in pick(run.train)}   # source -> modality
  load = os.getloadavg()[0]
  print(f'machine: {machine()}; load {load:.1f}', flush=True)
  print(json.dumps({
      'train_copies': len(y_train), 'heldout_copies': len(y_held), 'sources': len(sources),
      f'pixel_1nn_{args.task}': pixel_nearest_neighbour(train.images, y_train, heldout.images,
                                                        y_held),
      **({} if args.task == 'side' else {'pixel_1nn_modality': pixel_nearest_neighbour(
          train.images, [modality[sources[i]] for i in y_train], heldout.images,
          [modality[sources[i]] for i in y_held])}),
      f'majority_{args.task}': float(np.bincount(y_held).max() / len(y_held))}), flush=True)

  model = create_model(cfg.model, seed=cfg.seed)
  head = nnx.Linear(cfg.model.llama.hidden_size, len(sources), rngs=nnx.Rngs(cfg.seed + 1))
  pair = nnx.Dict(model=model, head=head)
  opt = nnx.Optimizer(pair, optax.adamw(args.lr, weight_decay=cfg.train.weight_decay),
                      wrt=nnx.Param)

  def logits(pair, images):
    return pair['head'](pair['model'].encode_images(images).mean(axis=1))

  @nnx.jit
  def step(pair, opt, images, labels):
    def loss_fn(pair):
      return optax.softmax_cross_entropy_with_integer_labels(logits(pair, images), labels).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(pair)
    opt.update(pair, grads)
    return loss

  predict = nnx.jit(lambda pair, images: logits(pair, images).argmax(-1))
  rng = np.random.default_rng(cfg.seed)
  start, losses = time.perf_counter(), []
  for s in range(1, args.steps + 1):
    idx = rng.choice(len(y_train), args.batch, replace=False)
    losses.append(float(step(pair, opt, jnp.asarray(train.images[idx]),
                             jnp.asarray(y_train[idx]))))
    if s % args.every == 0 or s == args.steps:
      pred = np.concatenate([np.asarray(predict(pair, jnp.asarray(heldout.images[i:i + 16])))
                             for i in range(0, len(y_held), 16)])
      held_mod = np.mean([modality[sources[p]] == modality[sources[y]]
                          for p, y in zip(pred, y_held)])
      print(json.dumps({'step': s, 'task': args.task, 'overrides': args.set, 'lr': args.lr,
                        'loss_last': float(np.mean(losses[-args.every:])),
                        f'heldout_{args.task}': float(np.mean(pred == y_held)),
                        **({} if args.task == 'side' else
                           {'heldout_modality_via_source': float(held_mod)}),
                        'seconds': round(time.perf_counter() - start),
                        'load': round(os.getloadavg()[0], 1)}), flush=True)


if __name__ == '__main__':
  main()
