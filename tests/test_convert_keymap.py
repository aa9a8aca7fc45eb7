"""The official RadFM key map against the vendored key list, size inference, key checks, safety."""

import dataclasses
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip('torch')
sys.path.insert(0, os.path.dirname(__file__))

from convert_fixtures import official_keys, official_state_dict  # noqa: E402
from radfm_jax.config import ConfigError, model_config  # noqa: E402
from radfm_jax.convert import api, engine, infer, keymap  # noqa: E402


class ShapeReader:
  """Keys, shapes and dtypes only (the real-size official list; nothing is allocated)."""

  def __init__(self, shapes, dtypes=None):
    self._shapes = shapes
    self._dtypes = dtypes or {}

  def keys(self):
    return list(self._shapes)

  def shape(self, key):
    return self._shapes[key]

  def dtype(self, key):
    return np.dtype(self._dtypes.get(key, 'float32'))

  def extent(self, key):
    return None

  def where(self, key):
    return f'official key list key {key}'


@pytest.fixture(scope='module')
def official():
  return {k: s for k, s, _ in official_keys()}


def test_table_covers_official_13b_exactly(official):
  cfg = model_config('radfm_13b')
  shapes = {p: s for p, (s, _) in api.abstract_shapes(cfg).items()}
  table = keymap.radfm_table()
  expected = keymap.expected_keys(table, shapes, engine.stacked_layers(table, shapes))
  kept = {k: s for k, s in official.items() if not keymap.is_skipped(k, keymap.RADFM_SKIP)}
  assert len(official) == 908
  assert expected == kept                      # same names, same shapes, alias included
  assert len(kept) == 403 - 40 + 141 + 69 + 2 + 1 + 1   # LLM minus inv_freq, ViT, perceiver, fc...
  skipped = set(official) - set(kept)
  assert len(skipped) == 40 + 200 + 74 + 9 + 4 + 2 + 2
  # with the official dtypes: float32 everywhere but the two int64 buffers of the dead branch
  dtypes = {k: d for k, _, d in official_keys()}
  assert sorted(k for k, d in dtypes.items() if d != 'float32') == [
      'embedding_layer.bert_model.embeddings.position_ids',
      'embedding_layer.output_upscaling.1.num_batches_tracked']
  engine.check_keys(table, ShapeReader(official, dtypes), shapes,
                    engine.stacked_layers(table, shapes), skip=keymap.RADFM_SKIP)
  # every parameter of the model is reached by exactly one entry
  covered = [p for e in table if e.kind != 'alias' for p in e.ours]
  assert sorted(covered) == sorted(shapes)


def test_infer_official_13b(official):
  cfg = infer.infer_model_config(ShapeReader(official))
  ref = model_config('radfm_13b')
  for section, names in infer.SHAPE_FIELDS.items():
    for name in names:
      assert getattr(getattr(cfg, section), name) == getattr(getattr(ref, section), name), name
  assert (cfg.vision.channels, cfg.vision.frame_patch_size) == (3, 4)


def _custom_cfg():
  """A small model whose sizes are all recoverable from shapes (head dims 64 / 128)."""
  base = model_config('tiny')
  return dataclasses.replace(
      base, vision=dataclasses.replace(base.vision, heads=1, head_dim=64, dim=48, depth=3),
      perceiver=dataclasses.replace(base.perceiver, heads=2, head_dim=64, depth=1, num_latents=8),
      llama=dataclasses.replace(base.llama, hidden_size=256, num_heads=2, num_layers=3,
                                intermediate_size=96, vocab_size=100))


def test_infer_small_checkpoint_without_config():
  cfg = _custom_cfg()
  reader = engine.DictReader(official_state_dict(cfg))
  got = infer.infer_model_config(reader)
  for section, names in infer.SHAPE_FIELDS.items():
    for name in names:
      assert getattr(getattr(got, section), name) == getattr(getattr(cfg, section), name), name
  assert got.vision.image_size == 64 and got.vision.frames == 16 and got.vision.patch_size == 16
  # heads cannot be read from LLaMA shapes: an explicit count wins over the hidden/128 default
  assert infer.infer_model_config(reader, llama_heads=4).llama.num_heads == 4


def test_config_disagreeing_with_checkpoint_is_listed():
  cfg = _custom_cfg()
  reader = engine.DictReader(official_state_dict(cfg))
  wrong = dataclasses.replace(cfg, llama=dataclasses.replace(cfg.llama, num_layers=5),
                              vision=dataclasses.replace(cfg.vision, mlp_dim=7))
  with pytest.raises(ConfigError) as err:
    infer.infer_model_config(reader, wrong)
  assert 'model.llama.num_layers: config 5, checkpoint 3' in str(err.value)
  assert 'model.vision.mlp_dim: config 7, checkpoint 96' in str(err.value)


def test_bad_keys_fail_with_lists(tmp_path, tiny_cfg):
  sd = official_state_dict(tiny_cfg)
  del sd['embedding_layer.perceiver.layers.1.0.to_kv.weight']
  sd['embedding_layer.mystery.weight'] = torch.zeros(2)
  sd['embedding_layer.fc.bias'] = torch.zeros(3)
  assert 'embedding_layer.bert_model.pooler.dense.bias' in sd     # dead branch: silently skipped
  with pytest.raises(engine.CheckpointMismatchError) as err:
    engine.check_keys(keymap.radfm_table(), engine.DictReader(sd),
                      *_shapes_and_layers(tiny_cfg), skip=keymap.RADFM_SKIP)
  e = err.value
  assert e.missing == ['embedding_layer.perceiver.layers.1.0.to_kv.weight']
  assert e.unexpected == ['embedding_layer.mystery.weight']
  assert e.wrong_shape == [('embedding_layer.fc.bias', (3,), (64,))]
  # the CLI path refuses before writing anything
  torch.save(sd, tmp_path / 'bad.bin')
  with pytest.raises(engine.CheckpointMismatchError):
    api.from_torch(str(tmp_path / 'bad.bin'), str(tmp_path / 'out'), tiny_cfg)
  assert not (tmp_path / 'out').exists()


def _shapes_and_layers(cfg):
  shapes = {p: s for p, (s, _) in api.abstract_shapes(cfg).items()}
  return shapes, engine.stacked_layers(keymap.radfm_table(), shapes)


class _Evil:
  def __reduce__(self):
    return (os.system, (f'touch {_Evil.marker}',))


def test_malicious_pickle_is_refused(tmp_path):
  _Evil.marker = str(tmp_path / 'pwned')
  path = tmp_path / 'evil.bin'
  torch.save({'lang_model.lm_head.weight': torch.zeros(2, 2), 'payload': _Evil()}, path)
  with pytest.raises(engine.UnsafeCheckpointError) as err:
    engine.open_reader(str(path))
  assert 'refused to unpickle' in str(err.value)
  assert not os.path.exists(_Evil.marker)


def test_fused_split_and_transforms_invert():
  rng = np.random.default_rng(0)
  entry = keymap.Entry(('q', 'k', 'v'), 'x.{i}.to_qkv.weight', 'fused')
  w = rng.standard_normal((3 * 4 * 8, 48)).astype(np.float32)
  q, k, v = keymap.to_ours(entry, w, [(48, 4, 8)] * 3)
  np.testing.assert_array_equal(k.reshape(48, 32), w[32:64].T)      # rows 32..63 are k
  np.testing.assert_array_equal(v[:, 3, 5], w[64 + 3 * 8 + 5])       # head outer, dim inner
  np.testing.assert_array_equal(keymap.to_torch(entry, [q, k, v]), w)
  out = keymap.Entry(('o',), 'o.weight', 'linear', n_in=2)
  wo = rng.standard_normal((48, 32)).astype(np.float32)
  (o,) = keymap.to_ours(out, wo, [(4, 8, 48)])
  np.testing.assert_array_equal(o[2, 1], wo[:, 17])
  np.testing.assert_array_equal(keymap.to_torch(out, [o]), wo)
