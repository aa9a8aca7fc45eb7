"""Vision-path diagnostics (radfm_jax/eval/vision.py) and the demo's summary fields built on them:
values checked against hand computations on a tiny model and tiny arrays."""

import numpy as np
import pytest

from radfm_jax.eval import vision


def test_token_spread_by_hand():
  base = np.arange(2 * 3, dtype=np.float64).reshape(2, 3)            # [latents, embed]
  same = np.stack([base] * 4)                                          # 4 identical scans
  s = vision.token_spread(same)
  assert s['across'] == 0.0 and s['ratio'] == 0.0
  # within: each feature's variance over the 2 latents is (3/2)^2 = 2.25
  np.testing.assert_allclose(s['within'], 1.5)
  shifted = np.stack([base, base + 2.0])            # scans differ by 2 everywhere: std over 2 = 1
  s = vision.token_spread(shifted)
  np.testing.assert_allclose([s['across'], s['within'], s['ratio']], [1.0, 1.5, 1 / 1.5])


def test_nearest_neighbour_accuracy_by_hand():
  x = np.array([[0.0], [0.1], [5.0], [5.1], [10.0]])
  labels = ['a', 'a', 'b', 'b', None]                # the None row is left out
  r = vision.nearest_neighbour_accuracy(x, labels)
  assert r == {'n': 4, 'accuracy': 1.0, 'majority': 0.5}
  r = vision.nearest_neighbour_accuracy(x, ['a', 'b', 'a', 'b', 'a'])
  # neighbours: 0<->1, 2<->3, 4->3: every one has the other label
  assert r['accuracy'] == 0.0 and r['majority'] == 0.6


@pytest.fixture(scope='module')
def tiny_model():
  from radfm_jax.config import load_config
  from radfm_jax.models.radfm import create_model
  cfg = load_config('configs/radfm.py:model=tiny,mesh=cpu', ['model.vision.dropout=0.0'])
  return create_model(cfg.model, seed=0)


def _probe(images, **labels):
  return vision.ProbeSet(images=images, labels=labels, ids=[str(i) for i in range(len(images))])


def test_identical_scans_have_zero_spread_and_distinct_ones_do_not(tiny_model):
  rng = np.random.default_rng(0)
  one = rng.random((1, 1, 3, 32, 32, 4), dtype=np.float32)
  report = vision.vision_report(tiny_model, _probe(np.repeat(one, 3, 0), kind=['x'] * 3),
                                batch_rows=2)        # 3 probes in batches of 2: padding is cut
  assert report['n'] == 3
  assert report['spread']['across'] < 1e-6 and report['spread']['within'] > 0.1
  distinct = rng.random((4, 1, 3, 32, 32, 4), dtype=np.float32)
  report = vision.vision_report(tiny_model, _probe(distinct, kind=['a', 'a', 'b', 'b']))
  assert report['spread']['across'] > 1e-3
  assert report['separability']['kind']['majority'] == 0.5
  layers = report['perceiver_attention']
  assert len(layers) == 2                      # tiny: perceiver depth 2
  for layer in layers:
    assert 0.0 < layer['media_mass'] < 1.0 and 0.0 < layer['patch_entropy'] <= 1.0 + 1e-6


def test_attention_over_identical_patches_is_uniform(tiny_model):
  import jax.numpy as jnp
  media = jnp.ones((2, 8, tiny_model.cfg.vision.dim)) * jnp.arange(tiny_model.cfg.vision.dim)
  for layer in vision.perceiver_attention(tiny_model.perceiver, media):
    np.testing.assert_allclose(layer['patch_entropy'], 1.0, rtol=1e-5)


def test_score_baselines_by_hand():
  from radfm_jax.demo import score
  recs = [dict(family='real', task='modality', kind='closed', options=['CT', 'MRI', 'X-ray'],
               answer=a) for a in ('CT', 'CT', 'MRI', 'X-ray')]
  m = score(recs, ['CT', 'MRI', 'MRI', 'CT'])
  v = m['closed']['real/modality:CT/MRI/X-ray']
  assert v['n'] == 4 and v['accuracy'] == 0.5
  np.testing.assert_allclose(v['chance'], 1 / 3)
  assert v['majority_baseline'] == 0.5


def test_tower_log_means_first_and_last_steps():
  from radfm_jax.demo import TowerLog
  log = TowerLog(window=2)
  for step, g in enumerate([1.0, 3.0, 5.0, 7.0], 1):
    log(step, {'loss': 9.0, 'grad_norm/vision': g, 'update_ratio/vision': g / 4})
  s = log.summary()
  assert s == {'vision': {'grad_norm_first': 2.0, 'grad_norm_last': 6.0,
                          'update_ratio_first': 0.5, 'update_ratio_last': 1.5}}
