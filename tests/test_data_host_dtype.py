"""data.host_dtype='stored': 3D batches leave the host as stored voxels + intensity maps, and
`batch.device_inputs` makes of them, on the device, exactly (bit for bit) the images the
'float32' host path writes, on a real tiny store, for every intensity policy."""

import dataclasses
import os

import jax
import numpy as np
import pytest

import conftest_data as cd
from radfm_jax.config import ConfigError, load_config
from radfm_jax.data import batch as batch_lib
from radfm_jax.data import pipeline
from radfm_jax.data.ingest import ingest
from radfm_jax.data.store import VolumeStore


@pytest.fixture(scope='module')
def store(tmp_path_factory):
  d = tmp_path_factory.mktemp('hostdtype')
  rng = np.random.default_rng(0)
  records = []
  for i in range(3):       # 2D samples: stay float32 on the host in both modes
    cd.write_png(d / f'x{i}.png', rng.integers(0, 255, (40, 36), dtype=np.uint8))
    records.append({'id': f'2d{i}', 'task': 'vqa', 'question': f'What is in image {i}?',
                    'answer': f'Finding {i}.',
                    'images': [{'path': f'x{i}.png', 'position': {'question': 0}}]})
  # CT int16 of different depths (two samples with two scans), MR float32 (carried as float32).
  scans = [(f'ct{i}', 'CT', cd.ct_volume((20, 18, 6 + 3 * i), seed=i)) for i in range(5)]
  # MR of depth 9 (a bucket of its own) and 6 (shares ct0's bucket: a mixed bucket).
  scans += [(f'mr{i}', 'MR', (rng.random((16, 14, d)) * 900).astype(np.float32))
            for i, d in enumerate((9, 6))]
  for i, (name, modality, volume) in enumerate(scans):
    cd.write_nifti(d / f'{name}.nii.gz', volume)
    images = [{'path': f'{name}.nii.gz', 'position': {'question': 0}, 'modality': modality}]
    if modality == 'CT' and i % 2:
      images.append(dict(images[0], path=f'ct{i - 1}.nii.gz'))
    records.append({'id': name, 'task': 'report', 'question': '', 'findings': f'Lesion {i}.',
                    'impression': 'Stable.', 'images': images})
  manifest = cd.write_manifest(d / 'samples.jsonl', records)
  ingest(manifest, str(d / 'store'), log=open(os.devnull, 'w'))
  return VolumeStore(str(d / 'store'))


def _batches(store, plan=False, **cfg):
  ds = pipeline.make_dataset(cd.data_config(batch_size_3d=2, **cfg), cd.tiny_model(), store,
                             cd.tokenizer(), seed=3, process_index=0, process_count=1,
                             num_epochs=1)
  return (list(ds), ds.plan) if plan else list(ds)


@pytest.mark.parametrize('policy', ['radfm', 'ct_windows3', 'percentile'])
def test_stored_host_batches_give_the_same_model_input_on_device(store, policy):
  host = _batches(store, intensity=policy, host_dtype='float32')
  stored, plan = _batches(store, plan=True, intensity=policy, host_dtype='stored')
  # The same batches, rows and order as the float32 mode: the carrier never splits a bucket; a
  # bucket mixing int16 CT and float32 MR carries float32.
  assert [b['tokens'].tobytes() for b in host] == [b['tokens'].tobytes() for b in stored]
  carrier = {k.carrier for k in plan.buckets}
  assert plan.keys[3].carrier == plan.keys[9].carrier == ('float32', 1)      # ct0 with mr1
  assert plan.keys[4].carrier == ('int16', 1) and plan.keys[0].carrier is None
  assert carrier == {None, ('int16', 1), ('float32', 1)}
  # Stored mode buckets 3D samples by carrier too (CT int16 and MR float32 never share a
  # batch), so compare per sample id: the rows' tokens identify them.
  def rows(batches, expand):
    out = {}
    for b in batches:
      if expand:
        assert set(b) == set(batch_lib.host_keys(b))
        b = {k: np.asarray(v) for k, v in
             batch_lib.device_inputs({k: jax.numpy.asarray(v) for k, v in b.items()}).items()}
      assert set(b) == set(batch_lib.KEYS) and b['images'].dtype == np.float32
      for r in range(b['tokens'].shape[0]):
        if b['attention_mask'][r].any():
          out[b['tokens'][r].tobytes()] = {k: v[r] for k, v in b.items()}
    return out

  carriers = {(str(b['images'].dtype), b['images'].shape[2]) for b in stored if 'image_maps' in b}
  assert carriers == {('int16', 1), ('float32', 1)}        # CT and MR; 2D batches unchanged
  assert all(b['images'].dtype == np.float32 and b['images'].shape[2] == 3
             for b in stored if 'image_maps' not in b)
  want, got = rows(host, False), rows(stored, True)
  assert len(want) == 10 and set(got) == set(want)      # 3 PNG + 5 CT + 2 MR samples
  for key, row in want.items():
    for k in batch_lib.KEYS:
      a, b = row[k], got[key][k]
      assert a.shape == b.shape and a.dtype == b.dtype, k
      assert a.tobytes() == b.tobytes(), (k, float(np.abs(a.astype(float) - b).max()))
  # Not trivially zero: the CT rows carry real intensities in [0, 1].
  ct = [r['images'] for r in want.values() if r['images'].shape[-1] > 4]
  assert max(float(x.max()) for x in ct) > 0.5


def test_stored_mode_shrinks_the_host_batch(store):
  host = {b['tokens'].tobytes(): b for b in _batches(store, host_dtype='float32')}
  stored = [b for b in _batches(store, host_dtype='stored') if 'image_maps' in b]
  ct = [b for b in stored if b['images'].dtype == np.int16]
  assert ct and all(b['images'].nbytes * 6 == b['images'].size * 3 * 4 for b in ct)
  assert len(host) > 0


def test_host_dtype_is_validated():
  with pytest.raises(ConfigError) as e:
    load_config('configs/radfm.py:model=tiny,mesh=cpu', ['data.host_dtype=int16'])
  assert str(e.value) == ("config field data.host_dtype='int16': expected 'float32' or "
                          "'stored'")
  cfg = load_config('configs/radfm.py:model=tiny,mesh=cpu', ['data.host_dtype=stored'])
  assert cfg.data.host_dtype == 'stored'
  assert dataclasses.replace(cfg.data, host_dtype='float32') != cfg.data


def test_train_loop_global_batch_expands_stored_batches(store):
  """The train loop's host -> device step (loop.global_batch, batch axis sharded on a 2-device
  mesh) gives the float32 images of the host path from a stored batch, sharding kept."""
  from radfm_jax import sharding
  from radfm_jax.train.loop import global_batch
  if jax.device_count() < 2:
    pytest.skip('needs 2 devices (XLA_FLAGS=--xla_force_host_platform_device_count)')
  cfg = load_config('configs/radfm.py:model=tiny,mesh=cpu', [])
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:2])
  rules = sharding.rules_for(cfg.mesh)
  host = {b['tokens'].tobytes(): b for b in _batches(store, intensity='ct_windows3',
                                                    host_dtype='float32')}
  stored = [b for b in _batches(store, intensity='ct_windows3', host_dtype='stored')
            if b['images'].dtype == np.int16 and b['images'].shape[0] == 2]
  assert stored
  for b in stored:
    out = global_batch(b, mesh, rules)
    assert set(out) == set(batch_lib.KEYS)
    assert out['images'].sharding.spec == out['tokens'].sharding.spec
    images = np.asarray(out['images'])
    for r in range(2):
      if not b['attention_mask'][r].any():
        assert not images[r].any()                       # an empty row stays all zeros
        continue
      want = next(h['images'][i] for h in host.values() for i in range(h['tokens'].shape[0])
                  if h['tokens'][i].tobytes() == b['tokens'][r].tobytes())
      assert want.tobytes() == images[r].tobytes()


def test_percentile_of_a_sparse_scan_keeps_the_lesion_on_host_and_device():
  """data.intensity='percentile' on a scan that is 99.9% air and a 4-voxel lesion: its 0.5 and
  99.5 percentiles are both -1000, which once mapped every voxel to 0 (scale 0). The channel's
  min-max is taken instead: the lesion is 1, the air 0, and the host's float32 images and the
  device's expansion of the stored voxels (data.host_dtype='stored') are equal bit for bit."""
  from radfm_jax.data import transforms
  vol = np.full((1, 20, 18, 8), -1000, np.int16)
  vol[0, 5:7, 5:7, 3] = 40                                   # 4 of 2880 voxels
  cfg = cd.data_config(intensity='percentile')
  assert transforms.channel_maps([vol], ['CT'], 'percentile') == [[(0, -1000.0, 40.0, True)] * 3]
  host = transforms.prepare_images([vol], ['CT'], (20, 18, 8), cfg)
  carried = np.zeros((1, 1, 20, 18, 8), np.int16)
  maps = np.zeros((1, 3, 4), np.float32)
  transforms.prepare_stored([vol], ['CT'], (20, 18, 8), cfg, carried, maps)
  device = batch_lib.device_inputs({'images': jax.numpy.asarray(carried[None]),
                                    'image_maps': jax.numpy.asarray(maps[None])})['images']
  device = np.asarray(device)[0]
  assert host.shape == device.shape == (1, 3, 20, 18, 8) and device.dtype == np.float32
  assert host.tobytes() == device.tobytes()
  lesion = np.zeros(host.shape, bool)
  lesion[:, :, 5:7, 5:7, 3] = True
  assert (host[lesion] == 1.0).all() and (host[~lesion] == 0.0).all()
  # a scan with a real percentile range keeps its percentiles (and its clipping)
  vol[0, :10] = 0
  assert transforms.channel_maps([vol], ['CT'], 'percentile') == [[(0, -1000.0, 0.0, True)] * 3]


@pytest.mark.parametrize('seed', [0, 1])
@pytest.mark.parametrize('dtype', ['int16', 'uint8', 'float32'])
def test_device_min_max_is_the_originals_division_bit_for_bit(dtype, seed):
  """The device's expansion of stored voxels (data.host_dtype='stored') divides as the original
  and the host do: equal bit for bit to the NumPy transcription of the original's min-max
  (conftest_data.original_min_max) and to the host's float32 images, for int16, uint8 and float32
  cases; an empty slot (zero map) is zeros, not the NaN of 0 / 0."""
  from radfm_jax.data import transforms
  case = cd.random_cases(seed)[dtype]
  cfg = cd.data_config(intensity='radfm')
  shape = (12, 10, 8)
  carrier = transforms.carrier_dtype([x.dtype.name for x in case])
  carried = np.zeros((len(case) + 1, 3) + shape, carrier)        # + an empty slot
  maps = np.zeros((len(case) + 1, 3, 4), np.float32)
  transforms.prepare_stored(case, [''] * len(case), shape, cfg, carried, maps)
  device = np.asarray(batch_lib.device_inputs({'images': jax.numpy.asarray(carried[None]),
                                               'image_maps': jax.numpy.asarray(maps[None])}
                                              )['images'])[0]
  host = transforms.prepare_images(case, [''] * len(case), shape, cfg)
  want = cd.original_min_max(case)
  for s, (x, w) in enumerate(zip(case, want)):
    for c in range(3):
      assert device[s, c].tobytes() == w[c if x.shape[0] == 3 else 0].tobytes(), (s, c)
  assert device[:len(case)].tobytes() == host.tobytes()
  assert device[len(case)].tobytes() == np.zeros((3,) + shape, np.float32).tobytes()
  # the reciprocal product the device once applied is 1 ulp off somewhere in this case
  lo, width = maps[0, 0, 1], maps[0, 0, 2]
  old = [(x.astype(np.float32) - lo) * np.float32(1.0 / float(width)) for x in case]
  assert not all(np.array_equal(o, w) for o, w in zip(old, want))
