"""Train step: golden loss/metrics vs numpy, exact gradient accumulation, freezing, optimizer."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from radfm_jax.config import ConfigError, load_config
from radfm_jax.models.radfm import abstract_model
from radfm_jax.train.loop import init_params
from radfm_jax.train import optim
from radfm_jax.train import step as step_lib
from radfm_jax.train.synthetic import SyntheticBatches

BASE = ['model.vision.dropout=0.0', 'data.batch_size_2d=4', 'train.synthetic_length=48',
        'train.steps=10', 'train.warmup_steps=2']


def _cfg(*extra):
  return load_config('configs/radfm.py:model=tiny,mesh=cpu', BASE + list(extra))


_PARAMS = {}


def _model(model_cfg):
  """(graphdef, params), created once per model config in this process (creation is slow)."""
  key = dataclasses.replace(model_cfg, compute_dtype='float32')   # same parameters
  if key not in _PARAMS:
    _PARAMS[key] = init_params(key, seed=0)
  graphdef, _ = abstract_model(model_cfg)
  return graphdef, jax.tree.map(jnp.copy, _PARAMS[key])


# ------------------------------------------------------------------------------------------------
# Loss and metrics against numpy


def _numpy_terms(logits, labels, weights):
  lg = logits[:, :-1].astype(np.float64)
  tg = labels[:, 1:]
  valid = tg != -100
  lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
  picked = np.take_along_axis(lg, np.where(valid, tg, 0)[..., None], -1)[..., 0]
  ce = np.where(valid, lse - picked, 0.0)
  w = np.where(valid, weights[:, 1:], 0.0)
  hit = (lg.argmax(-1) == tg) & valid
  rows = valid.any(1)
  seq = (np.all(hit | ~valid, 1) & rows).sum() / rows.sum()
  return ce.sum() / valid.sum(), (ce * w).sum() / w.sum(), hit.sum() / valid.sum(), seq


def test_loss_and_metrics_match_numpy():
  rng = np.random.default_rng(0)
  b, l, v = 3, 12, 17
  logits = rng.normal(size=(b, l, v)).astype(np.float32) * 3
  labels = rng.integers(0, v, (b, l)).astype(np.int32)
  labels[:, :4] = -100
  labels[1, 8:] = -100
  labels[2, :] = -100                      # an empty (padding) row: excluded from seq accuracy
  weights = np.where(labels != -100, rng.choice([1.0, 3.0], (b, l)), 0.0).astype(np.float32)
  # Row 0: make every prediction right, so sequence accuracy is exactly 1/2.
  for t in range(4, l):
    logits[0, t - 1, labels[0, t]] = 50.0
  mean_np, weighted_np, tok_np, seq_np = _numpy_terms(logits, labels, weights)
  assert seq_np == 0.5
  mean = step_lib.cross_entropy_loss(jnp.asarray(logits), jnp.asarray(labels),
                                     jnp.asarray(weights), 'mean')
  weighted = step_lib.cross_entropy_loss(jnp.asarray(logits), jnp.asarray(labels),
                                         jnp.asarray(weights), 'weighted')
  np.testing.assert_allclose(float(mean), mean_np, rtol=1e-6)
  np.testing.assert_allclose(float(weighted), weighted_np, rtol=1e-6)
  terms = step_lib.loss_terms(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights))
  m = step_lib.summarize(terms, step_lib.loss_denominator(jnp.asarray(labels), None, 'mean'))
  np.testing.assert_allclose(float(m['token_accuracy']), tok_np, rtol=1e-6)
  assert float(m['sequence_accuracy']) == 0.5
  assert float(m['tokens']) == (labels[:, 1:] != -100).sum()


def test_loss_shift_uses_next_label():
  # Position t's logits predict label t+1: a one-hot at logits[:, t] on labels[:, t+1] gives ~0.
  labels = jnp.array([[-100, 3, 1, 2]])
  logits = jax.nn.one_hot(jnp.array([[3, 1, 2, 0]]), 5) * 100.0
  assert float(step_lib.cross_entropy_loss(logits, labels)) < 1e-6
  # All labels ignored: loss 0, not NaN.
  assert float(step_lib.cross_entropy_loss(logits, jnp.full((1, 4), -100))) == 0.0


# ------------------------------------------------------------------------------------------------
# Optimizer pieces


def _flat(tree) -> dict:
  return {'.'.join(optim.path_names(p)): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_decay_mask_and_schedule():
  cfg = _cfg('train.learning_rate=1.0', 'train.min_lr_ratio=0.1')
  _, params = abstract_model(cfg.model)
  mask = optim.decay_mask(params)
  flat = _flat(mask)
  assert flat['llama.layers.q.kernel'] and flat['llama.lm_head.kernel'] and flat['fc.kernel']
  assert not flat['llama.embed_tokens'] and not flat['llama.norm.scale']
  assert not flat['fc.bias'] and not flat['vision.pos_row'] and not flat['perceiver.latents']
  assert not flat['vision.blocks.attn_norm.scale'] and not flat['figure_tokens']
  schedule = optim.make_schedule(cfg.train)
  np.testing.assert_allclose([float(schedule(s)) for s in (0, 1, 2, 10)], [0.0, 0.5, 1.0, 0.1],
                             rtol=1e-6)


def test_train_config_validation():
  with pytest.raises(ConfigError, match='train.freeze'):
    _cfg('train.freeze=ears')
  with pytest.raises(ConfigError, match='train.loss'):
    _cfg('train.loss=median')
  with pytest.raises(ConfigError, match='train.warmup_steps'):
    _cfg('train.warmup_steps=10')
  assert _cfg('train.freeze=vision_tower,llama').train.freeze == ('vision_tower', 'llama')
  assert optim.frozen_prefixes(('vision_tower', 'decoder')) == ('vision', 'perceiver', 'fc',
                                                                 'llama')


# ------------------------------------------------------------------------------------------------
# Gradient accumulation and freezing (one device, no mesh: the step is mesh-agnostic)


def _batch(cfg, seed=0):
  return {k: jnp.asarray(v) for k, v in SyntheticBatches(cfg, seed=seed).make_global(0).items()}


def test_accumulated_gradient_equals_big_batch(kind='mean'):
  big = _cfg(f'train.loss={kind}')
  acc = _cfg(f'train.loss={kind}', 'train.grad_accum=2')
  graphdef, params = _model(big.model)
  trainable, frozen = optim.split_trainable(params, ())
  batch = _batch(big)
  # Different token counts per microbatch (rows 0,2 vs 1,3) make a mean-of-means differ.
  g1, t1, d1 = jax.jit(step_lib.make_grad_fn(graphdef, big))(trainable, frozen, batch, None)
  g2, t2, d2 = jax.jit(step_lib.make_grad_fn(graphdef, acc))(trainable, frozen, batch, None)
  assert float(d1) == float(d2)
  np.testing.assert_allclose(float(t1['numerator'] / d1), float(t2['numerator'] / d2), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-7)


def _one_step(cfg):
  graphdef, params = _model(cfg.model)
  before = jax.tree.map(np.asarray, params)
  trainable, _ = optim.split_trainable(params, cfg.train.freeze)
  tx = optim.make_optimizer(cfg.train, trainable)
  state = step_lib.init_train_state(params, tx, cfg.train.freeze)
  step = jax.jit(step_lib.make_train_step(graphdef, tx, cfg), donate_argnums=(0,))
  state, metrics = step(state, _batch(cfg))
  state, metrics = step(state, _batch(cfg, seed=1))
  after = jax.tree.map(np.asarray, state.params)
  changed = {}
  for (name, a), b in zip(_flat(before).items(), jax.tree.leaves(after)):
    top = name.split('.')[0]
    changed[top] = changed.get(top, False) or not np.array_equal(a, b)
  return changed, metrics, state


def test_freeze_vision_tower_keeps_it_unchanged():
  cfg = _cfg('train.freeze=vision_tower', 'train.weight_decay=0.1')
  changed, metrics, state = _one_step(cfg)
  assert not changed['vision'] and not changed['perceiver'] and not changed['fc']
  assert changed['llama'] and changed['figure_tokens']
  assert int(state.step) == 2 and np.isfinite(float(metrics['loss']))
  # No optimizer moments are kept for frozen parameters.
  mu_paths = {name.split('.')[0] for name in _flat(state.opt_state[1][0].mu)}
  assert mu_paths == {'llama', 'figure_tokens'}
  # Per-tower metrics: only the training towers, and their gradient norms add up (in squares) to
  # the global one.
  towers = {k.split('/')[1] for k in metrics if k.startswith('grad_norm/')}
  assert towers == {'llama', 'figure_tokens'}
  np.testing.assert_allclose(
      sum(float(metrics[f'grad_norm/{t}']) ** 2 for t in towers), float(metrics['grad_norm']) ** 2,
      rtol=1e-5)
  assert all(0 < float(metrics[f'update_ratio/{t}']) < 1 for t in towers)


def test_tower_norms_by_top_level_module():
  tree = {'vision': {'a': jnp.full((2, 2), 3.0), 'b': jnp.ones((1,))},
          'fc': {'kernel': jnp.array([[3.0, 4.0]])}}
  norms = step_lib.tower_norms(tree)
  assert set(norms) == {'vision', 'fc'}
  np.testing.assert_allclose(float(norms['vision']), np.sqrt(4 * 9 + 1))
  np.testing.assert_allclose(float(norms['fc']), 5.0)


def test_freeze_decoder_and_bf16_compute():
  cfg = _cfg('train.freeze=decoder', 'model.compute_dtype=bfloat16')
  changed, metrics, state = _one_step(cfg)
  assert not changed['llama']
  assert changed['vision'] and changed['perceiver'] and changed['fc']
  assert np.isfinite(float(metrics['loss'])) and float(metrics['grad_norm']) > 0
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))


def test_clipping_bounds_the_update():
  cfg = _cfg('train.max_grad_norm=1e-6', 'train.learning_rate=1e-3', 'train.warmup_steps=0',
             'train.b1=0.0', 'train.b2=0.0', 'train.eps=1.0')
  # b1 = b2 = 0 and eps = 1: Adam's update is -lr * g / (|g| + 1) ~ -lr * g for the clipped, tiny
  # g, so the update's global norm is lr * max_grad_norm.
  params = {'a': {'kernel': jnp.ones((3, 4))}, 'b': {'bias': jnp.ones((5,))}}
  grads = jax.tree.map(lambda x: 100.0 * x, params)
  tx = optim.make_optimizer(cfg.train, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(float(optax.tree.norm(updates)), 1e-3 * 1e-6, rtol=1e-4)


def test_a_batch_with_nothing_to_learn_moves_no_weight():
  """Every row empty (its samples' scans unreadable, data.drop_unreadable): no gradient, but Adam's
  moments and weight decay moved the weights anyway, and the step was saved as the run's state
  (a store that turned unreadable mid-run left drifted checkpoints). The update is skipped; the
  step still counts; a batch with one supervised token still updates."""
  cfg = _cfg('train.weight_decay=0.1', 'train.warmup_steps=0')
  graphdef, params = _model(cfg.model)
  trainable, _ = optim.split_trainable(params, cfg.train.freeze)
  tx = optim.make_optimizer(cfg.train, trainable)
  state = step_lib.init_train_state(params, tx, cfg.train.freeze)
  step = jax.jit(step_lib.make_train_step(graphdef, tx, cfg))
  state, metrics = step(state, _batch(cfg))                     # moments now non-zero
  assert float(metrics['updated']) == 1.0
  empty = dict(_batch(cfg, seed=1))
  empty['labels'] = np.full_like(empty['labels'], -100)
  empty['loss_weights'] = np.zeros_like(empty['loss_weights'])
  after, metrics = step(state, empty)
  assert float(metrics['updated']) == 0.0 and int(after.step) == int(state.step) + 1
  for a, b in zip(jax.tree.leaves((state.params, state.opt_state)),
                  jax.tree.leaves((after.params, after.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  one = dict(empty, labels=empty['labels'].copy(), loss_weights=empty['loss_weights'].copy())
  one['labels'][0, 5] = 7
  one['loss_weights'][0, 5] = 1.0
  moved, metrics = step(state, one)
  assert float(metrics['updated']) == 1.0
  assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
      jax.tree.leaves(state.params), jax.tree.leaves(moved.params)))
