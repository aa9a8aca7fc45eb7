"""VolumeStore: zarr3 sharded arrays in OCDBT, round trips, layout rules, pickling."""

import json
import os
import pickle

import numpy as np
import pytest

from radfm_jax.data.store import VolumeStore, chunk_layout, storable_dtype


def test_round_trip_keeps_values_dtype_and_attributes(tmp_path):
  store = VolumeStore(str(tmp_path / 'store'))
  rng = np.random.default_rng(0)
  ct = rng.integers(-1024, 3000, (1, 70, 40, 9)).astype(np.int16)
  rgb = rng.integers(0, 255, (3, 10, 12, 1)).astype(np.uint8)
  f64 = rng.normal(size=(1, 5, 6, 7))
  store.write_batch([('ct', ct, {'spacing': [0.5, 0.5, 2.0], 'modality': 'CT'}),
                     ('rgb', rgb, {}), ('f64', f64, {})])
  again = VolumeStore(str(tmp_path / 'store'))      # fresh handle: reads the index from disk
  np.testing.assert_array_equal(again.read('ct'), ct)
  np.testing.assert_array_equal(again.read('rgb'), rgb)
  assert again.read('ct').dtype == np.int16 and again.read('rgb').dtype == np.uint8
  np.testing.assert_allclose(again.read('f64'), f64.astype(np.float32))
  assert again.read('f64').dtype == np.float32
  assert again.info('ct') == {'id': 'ct', 'key': 'scans/ct/', 'version': 0,
                              'shape': [1, 70, 40, 9], 'dtype': 'int16', 'attributes': {'spacing': [0.5, 0.5, 2.0], 'modality': 'CT',
                                             'axes': 'CHWD'}}
  assert again.attributes('ct') == again.info('ct')['attributes']
  assert list(again.stored_keys()) == ['scans/ct/', 'scans/f64/', 'scans/rgb/']
  assert len(again) == 3 and 'ct' in again and 'nope' not in again


def test_ocdbt_keeps_file_count_small(tmp_path):
  store = VolumeStore(str(tmp_path / 's'))
  items = [(f'scan{i}', np.full((1, 8, 8, 3 + i), i, np.int16) + np.arange(3 + i, dtype=np.int16),
            {}) for i in range(30)]
  store.write_batch(items)
  files = [f for _, _, fs in os.walk(tmp_path / 's' / 'volumes') for f in fs]
  assert len(files) < 10, files   # 30 arrays, a handful of OCDBT files
  np.testing.assert_array_equal(store.read('scan7'), items[7][1])


@pytest.mark.parametrize('shape', [(1, 70, 40, 9), (3, 512, 512, 1), (1, 5, 300, 64), (1, 1, 1, 1)])
def test_shard_is_a_multiple_of_the_inner_chunk(shape):
  inner, shard = chunk_layout(shape)
  assert all(s % i == 0 for s, i in zip(shard, inner))
  assert all(s >= n for s, n in zip(shard, shape))
  assert inner[1] <= 64 and inner[3] <= 32


def test_rewrite_goes_to_a_new_key_and_wrong_rank_is_refused(tmp_path):
  store = VolumeStore(str(tmp_path / 's'))
  store.write_batch([('a', np.zeros((1, 4, 4, 4), np.int16) + 1, {})])
  store.write_batch([('a', np.zeros((1, 4, 4, 2), np.int16) + 2, {})])
  assert store.read('a').shape == (1, 4, 4, 2) and store.read('a').max() == 2
  again = VolumeStore(str(tmp_path / 's'))           # the last index line of an id wins
  assert again.key('a') == 'scans/a@v1/' and again.info('a')['version'] == 1
  np.testing.assert_array_equal(again.read('a'), np.zeros((1, 4, 4, 2), np.int16) + 2)
  assert len(open(again.scans_path).read().splitlines()) == 2      # appended, not rewritten
  with pytest.raises(TypeError, match='expected \\[C, H, W, D\\]'):
    store.write_batch([('b', np.zeros((4, 4, 4)), {})])
  assert 'b' not in store and list(store.stored_keys()) == ['scans/a/', 'scans/a@v1/']


def test_pickle_sends_only_the_path(tmp_path):
  store = VolumeStore(str(tmp_path / 's'))
  store.write_batch([('a', np.arange(24, dtype=np.int16).reshape(1, 2, 3, 4), {})])
  store.read('a')                                   # opens a context and the index cache
  clone = pickle.loads(pickle.dumps(store))
  assert clone.root == store.root
  np.testing.assert_array_equal(clone.read('a'), store.read('a'))


def test_storable_dtype():
  assert storable_dtype(np.float64) == np.float32
  assert storable_dtype(np.bool_) == np.uint8
  assert storable_dtype(np.int16) == np.int16
  assert storable_dtype(np.int64) == np.int32


def test_ids_cannot_reach_into_other_keys(tmp_path):
  store = VolumeStore(str(tmp_path / 's'))
  one = np.arange(8, dtype=np.int16).reshape(1, 2, 2, 2)
  ids = ['a', 'a/c/0/0/0', 'a@v1', '..', 'a.v1']
  store.write_batch([(sid, one + k, {}) for k, sid in enumerate(ids)])
  store.write_batch([('a', one * 10, {})])                  # the rewrite of 'a' takes a new key
  again = VolumeStore(str(tmp_path / 's'))
  for k, sid in enumerate(ids[1:], 1):
    np.testing.assert_array_equal(again.read(sid), one + k)
  np.testing.assert_array_equal(again.read('a'), one * 10)
  assert again.key('a/c/0/0/0') == 'scans/a%2Fc%2F0%2F0%2F0/' and again.key('a') == 'scans/a@v1/'
  assert again.key('a@v1') == 'scans/a%40v1/'


def test_to_storable_checks_the_range_and_index_ignores_a_torn_last_line(tmp_path):
  from radfm_jax.data.store import to_storable
  np.testing.assert_array_equal(to_storable(np.array([-2**31, 2**31 - 1])), [-2**31, 2**31 - 1])
  with pytest.raises(ValueError, match=r'voxels: value 2147483648 \(int64\) does not fit int32'):
    to_storable(np.array([0, 2**31]))
  store = VolumeStore(str(tmp_path / 's'))
  store.write_batch([('a', np.arange(8, dtype=np.int16).reshape(1, 2, 2, 2), {})])
  with open(store.scans_path, 'a') as f:
    f.write('{"id": "b", "key": "sca')                      # a writer killed mid-line
  assert list(VolumeStore(store.root).index()) == ['a']
  store = VolumeStore(store.root)
  store.write_batch([('c', np.arange(8, dtype=np.int16).reshape(1, 2, 2, 2) * 2, {})])
  lines = open(store.scans_path).read().splitlines()
  assert [json.loads(line)['id'] for line in lines] == ['a', 'c']    # the torn line cut off
  with open(store.scans_path, 'a') as f:
    f.write('not json\n{"id": "d"}\n')
  with pytest.raises(ValueError, match=f'{store.scans_path} line 3: not a store index row'):
    VolumeStore(store.root).index()
