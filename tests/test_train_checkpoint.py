"""Checkpointer with a Grain iterator, and the loop's data wiring to the Grain pipeline."""

import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np

import conftest_data as cd
from radfm_jax.config import load_config
from radfm_jax.train import loop
from radfm_jax.checkpoint import Checkpointer, read_step_config


def _iterator():
  ds = grain.MapDataset.range(100).seed(3).shuffle().map(lambda x: {'x': np.int64(x)})
  return iter(ds.to_iter_dataset())


def test_grain_iterator_state_round_trips(tmp_path):
  it = _iterator()
  for _ in range(5):
    next(it)
  state = {'w': jnp.arange(8.0), 'step': jnp.int32(5)}
  ckpt = Checkpointer(str(tmp_path / 'ck'), async_save=True)
  ckpt.save(5, state, it, {'name': 'test'})
  expected = [int(next(it)['x']) for _ in range(3)]
  ckpt.wait()
  fresh = _iterator()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  restored, config = ckpt.restore(5, abstract, fresh)
  ckpt.close()
  assert [int(next(fresh)['x']) for _ in range(3)] == expected
  np.testing.assert_array_equal(np.asarray(restored['w']), np.arange(8.0))
  assert config == {'name': 'test'} == read_step_config(str(tmp_path / 'ck'))
  # Beside the steps: config.json with the layout record (and the latest config).
  with open(tmp_path / 'ck' / 'config.json') as f:
    assert json.load(f) == {'name': 'test', 'layout': 'train_state', 'layout_version': 1}
  # A resumed run (a new Checkpointer on the folder) rewrites it with its own config.
  again = Checkpointer(str(tmp_path / 'ck'), async_save=False)
  again.save(6, state, config={'name': 'resumed'})
  again.close()
  with open(tmp_path / 'ck' / 'config.json') as f:
    assert json.load(f) == {'name': 'resumed', 'layout': 'train_state', 'layout_version': 1}
  assert read_step_config(str(tmp_path / 'ck'), 5) == {'name': 'test'}
  # One JSON per process for the iterator, written by grain.checkpoint.CheckpointSave.
  assert any(name.startswith('process_') for name in os.listdir(tmp_path / 'ck' / '5' / 'data'))


def test_make_data_uses_the_grain_pipeline(tmp_path):
  store = cd.png_store(tmp_path)
  cfg = load_config('configs/radfm.py:model=tiny,mesh=cpu', [
      f'data.store={store}', f'data.tokenizer={tmp_path / "tok.model"}', 'data.batch_size_2d=8',
      'data.text_lengths=[128]'])
  data = loop.make_data(cfg)
  assert isinstance(data, grain.DatasetIterator)
  batch = next(data)
  assert set(batch) >= {'images', 'image_mask', 'tokens', 'attention_mask', 'labels',
                        'loss_weights'}
  assert batch['tokens'].shape == (8, 128) and batch['images'].shape[:3] == (8, 1, 3)   # 8 devices
  assert (batch['labels'] != -100).any()
