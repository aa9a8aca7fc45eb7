"""Grain pipeline: batch contract, buckets, host sharding, determinism, resume, unreadable scans."""

import dataclasses
import os

import numpy as np
import pytest

import conftest_data as cd
from radfm_jax.config import ConfigError
from radfm_jax.data import batch as batch_lib
from radfm_jax.data import pipeline, transforms
from radfm_jax.data.ingest import ingest
from radfm_jax.data.store import VolumeStore

DTYPES = {'images': np.float32, 'image_mask': np.bool_, 'tokens': np.int32,
          'attention_mask': np.int32, 'labels': np.int32, 'loss_weights': np.float32}


@pytest.fixture(scope='module')
def store(tmp_path_factory):
  d = tmp_path_factory.mktemp('pipe')
  rng = np.random.default_rng(0)
  records = []
  for i in range(7):       # 2D samples: PNGs, one or two images
    cd.write_png(d / f'x{i}.png', rng.integers(0, 255, (40 + i, 36), dtype=np.uint8))
    images = [{'path': f'x{i}.png', 'position': {'question': 0}}]
    if i % 3 == 0:
      images.append({'path': f'x{(i + 1) % 7}.png', 'position': {'answer': 3}})
    records.append({'id': f'2d{i}', 'task': 'vqa', 'question': f'What is in image {i}?',
                    'answer': f'Finding number {i}.', 'images': images})
  for i in range(5):       # 3D samples: CT volumes of different depths
    cd.write_nifti(d / f'ct{i}.nii.gz', cd.ct_volume((20, 18, 6 + 5 * i), seed=i))
    records.append({'id': f'3d{i}', 'task': 'report', 'question': '',
                    'findings': f'Lesion {i}.' + ' More text.' * (30 * (i == 4)),
                    'impression': 'Stable.',
                    'images': [{'path': f'ct{i}.nii.gz', 'position': {'question': 0},
                                'modality': 'CT'}]})
  manifest = cd.write_manifest(d / 'samples.jsonl', records)
  ingest(manifest, str(d / 'store'), log=open(os.devnull, 'w'))
  return VolumeStore(str(d / 'store'))


def _make(store, seed=0, process_index=0, process_count=1, num_epochs=1, augment=False, **cfg):
  return pipeline.make_dataset(cd.data_config(**cfg), cd.tiny_model(), store, cd.tokenizer(),
                               seed=seed, process_index=process_index,
                               process_count=process_count, num_epochs=num_epochs,
                               augment=augment)


def test_batch_contract_and_buckets(store):
  ds = _make(store)
  batches = list(ds)
  assert len(batches) == ds.plan.num_batches
  plan = ds.plan.epoch(0)
  seen = []
  # the default host_dtype='stored': 3D batches leave the host as int16 voxels + maps
  assert {str(b['images'].dtype) for b in batches if 'image_maps' in b} == {'int16'}
  for batch, (key, rows) in zip(batches, plan):
    batch = cd.model_inputs(batch)
    assert set(batch) == set(batch_lib.KEYS)
    assert {k: v.dtype.type for k, v in batch.items()} == DTYPES == batch_lib.DTYPES
    b = len(rows)
    assert b == (1 if key.kind == '3d' else 2)
    assert batch['images'].shape == (b, key.images, 3, key.height, key.width, key.depth)
    assert batch['tokens'].shape == batch['labels'].shape == (b, key.length)
    assert batch['image_mask'].shape == (b, key.images)
    # every sample in the batch really belongs to this bucket
    assert all(ds.plan.keys[r] == key for r in rows if r >= 0)
    imgs = batch['images']
    assert imgs.min() >= 0.0 and imgs.max() <= 1.0
    for r, sample in enumerate(rows):
      if sample < 0:                          # padding row: all empty
        assert not batch['attention_mask'][r].any() and not batch['image_mask'][r].any()
        assert (batch['labels'][r] == -100).all() and not batch['loss_weights'][r].any()
        continue
      seen.append(sample)
      n_img = len(store.manifest()[sample]['images'])
      np.testing.assert_array_equal(batch['image_mask'][r], np.arange(key.images) < n_img)
      assert (imgs[r][~batch['image_mask'][r]] == 0).all()
      assert imgs[r][batch['image_mask'][r]].max() > 0.5
      n = int(batch['attention_mask'][r].sum())
      assert batch['tokens'][r, 0] == 1 and (n == key.length or batch['tokens'][r, n] == 2)
      np.testing.assert_array_equal(batch['loss_weights'][r], batch['labels'][r] != -100)
      assert not (batch['labels'][r] >= 512).any()
  assert sorted(seen) == list(range(12))       # each sample exactly once per epoch
  kinds = {k.kind: (k.height, k.depth) for k in ds.plan.buckets}
  assert kinds['2d'] == (32, 4)
  depths = sorted({k.depth for k in ds.plan.buckets if k.kind == '3d'})
  assert depths == [4, 12, 16]  # depths 6, 11, 16, 21, 26 -> buckets 4, 12, 16, 16 (max), 16
  lengths = sorted({k.length for k in ds.plan.buckets})
  assert len(lengths) == 2 and lengths[0] == 128   # the long report goes to a longer text bucket
  tok = cd.tokenizer()
  for key, (q, a) in zip(ds.plan.keys, ds.plan.texts):
    assert key.length == min(n for n in (128, 256, 512) if n >= tok.example_length(q, a))


def test_image_values_match_the_transforms(store):
  ds = _make(store, seed=1)
  (key, rows), batch = ds.plan.epoch(0)[0], cd.model_inputs(next(iter(ds)))
  rec = store.manifest()[rows[0]]
  arrays = [store.read(im['id']) for im in rec['images']]
  want = transforms.prepare_images(arrays, [im['modality'] for im in rec['images']],
                                   (key.height, key.width, key.depth), cd.data_config())
  np.testing.assert_array_equal(batch['images'][0, :len(arrays)], want)


def test_host_shards_are_disjoint_and_in_step(store):
  plans = [_make(store, seed=5, process_index=p, process_count=2).plan for p in range(2)]
  assert plans[0].num_batches == plans[1].num_batches
  rows = [[], []]
  for (k0, r0), (k1, r1) in zip(plans[0].epoch(0), plans[1].epoch(0)):
    assert k0 == k1                            # hosts agree on the bucket at every step
    rows[0] += [r for r in r0 if r >= 0]
    rows[1] += [r for r in r1 if r >= 0]
  assert not set(rows[0]) & set(rows[1])
  assert sorted(rows[0] + rows[1]) == list(range(12))


def test_seeded_shuffle_is_deterministic(store):
  def order(seed, epoch=0):
    return [tuple(r) for _, r in _make(store, seed=seed).plan.epoch(epoch)]
  assert order(3) == order(3)
  assert order(3) != order(4)
  assert order(3, epoch=0) != order(3, epoch=1)
  a = [b['tokens'] for b in _make(store, seed=3)]
  b = [b['tokens'] for b in _make(store, seed=3)]
  assert all((x.shape == y.shape) and (x == y).all() for x, y in zip(a, b))


def _assert_same(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert set(x) == set(y) == set(batch_lib.host_keys(x))
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize('num_workers', [0, 2])
def test_iterator_state_resumes_exactly(store, num_workers):
  def run():
    return _make(store, seed=7, num_epochs=None, num_workers=num_workers)
  it = iter(run())
  for _ in range(9):                           # past the first epoch boundary (8 batches/epoch)
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(6)]
  if num_workers:
    it.close()
  it2 = iter(run())
  it2.set_state(state)
  resumed = [next(it2) for _ in range(6)]
  if num_workers:
    it2.close()
  _assert_same(expected, resumed)
  if num_workers:                              # worker processes give the same stream as threads
    ref = iter(_make(store, seed=7, num_epochs=None))
    for _ in range(9):
      next(ref)
    _assert_same(expected, [next(ref) for _ in range(6)])


def test_unreadable_scan_is_skipped_and_counted(store):
  records = store.manifest()
  broken = dict(records[0], id='broken',
                images=[dict(records[0]['images'][0], id='no_such_scan')])
  stats = pipeline.PipelineStats()
  ds = pipeline.make_dataset(cd.data_config(shuffle=False), cd.tiny_model(), store,
                             cd.tokenizer(), process_index=0, process_count=1, num_epochs=1,
                             stats=stats, records=[records[1], broken])
  (batch,) = list(ds)
  assert [s['sample_id'] for s in stats.skipped] == ['broken']
  assert stats.skipped[0]['scan_id'] == 'no_such_scan' and stats.skipped[0]['reason']
  assert stats.samples == 1 and stats.empty_rows == 1 and stats.batches == 1
  empty = int(np.flatnonzero(~batch['attention_mask'].any(1))[0])
  assert (batch['images'][empty] == 0).all() and not batch['loss_weights'][empty].any()
  strict = pipeline.make_dataset(cd.data_config(drop_unreadable=False), cd.tiny_model(), store,
                                 cd.tokenizer(), process_index=0, process_count=1, num_epochs=1,
                                 records=[broken])
  with pytest.raises(Exception, match='no_such_scan|NOT_FOUND|not found'):
    list(strict)


def test_vocab_mismatch_is_refused(store):
  model = cd.tiny_model()
  model = dataclasses.replace(model, llama=dataclasses.replace(model.llama, vocab_size=1000))
  with pytest.raises(ConfigError) as err:
    pipeline.make_dataset(cd.data_config(), model, store, cd.tokenizer(), process_index=0,
                          process_count=1)
  pieces = cd.tokenizer().vocab_size
  assert str(err.value) == (
      f'config field model.llama.vocab_size=1000: the tokenizer has {pieces} pieces; expected the '
      f'same number (--config.model.llama.vocab_size={pieces})')


def test_paths_from_the_config_and_split_filter(store, tmp_path):
  tok_path = tmp_path / 'tok.model'
  tok_path.write_bytes(cd.spm_proto())
  records = store.manifest()
  manifest = cd.write_manifest(tmp_path / 'm.jsonl', [dict(r, split='val' if i < 3 else 'train')
                                                      for i, r in enumerate(records)])
  cfg = cd.data_config(store=store.root, tokenizer=str(tok_path), manifest=manifest)
  ds = pipeline.make_dataset(cfg, cd.tiny_model(), split='val', process_index=0,
                             process_count=1, num_epochs=1)
  assert sorted(r for _, rows in ds.plan.epoch(0) for r in rows if r >= 0) == [0, 1, 2]
  assert sum(int(b['attention_mask'].any(1).sum()) for b in ds) == 3


def test_texts_longer_than_the_largest_length_are_cut_and_said(store):
  """A sample needing more positions than the largest data.text_lengths entry is cut to it, as
  the original cuts at its max_length (2048), but no longer silently: the plan lists it and
  make_dataset says how many, and which needs the most."""
  import io
  records = store.manifest()
  tok = cd.tokenizer()
  long = dict(records[1], id='long', answer='nodule ' * 300)
  q, a, _ = batch_lib.record_text(long, cd.tiny_model().perceiver.num_latents, 4)
  needed = tok.example_length(q, a)
  assert needed > 256
  log = io.StringIO()
  ds = pipeline.make_dataset(cd.data_config(text_lengths=(64, 256)), cd.tiny_model(), store, tok,
                             process_index=0, process_count=1, num_epochs=1, log=log,
                             records=[records[1], long])
  assert ds.plan.cut == [(1, needed)]
  assert log.getvalue() == (
      'data: 1 of 2 samples need more positions than the largest data.text_lengths entry (256) '
      'and are cut to it, as the original cuts at its max length (their answers lose their '
      f"ends); the longest, sample 'long', needs {needed}: a larger entry keeps them whole\n")
  rows = [row for b in ds for row in b['attention_mask']]
  assert max(int(r.sum()) for r in rows) == 256                    # cut, and the batch is 256


def test_images_past_max_images_are_left_out_and_said(store):
  """data.max_images bounds the images a sample uses (docs/data.md); the ones after were left out
  without a word. The plan lists such samples and make_dataset says how many."""
  import io
  records = store.manifest()
  two = [r for r in records if len(r['images']) == 2]
  assert two
  log = io.StringIO()
  ds = pipeline.make_dataset(cd.data_config(max_images=1), cd.tiny_model(), store, cd.tokenizer(),
                             process_index=0, process_count=1, num_epochs=1, log=log,
                             records=[records[1], two[0]])
  assert ds.plan.left_out == [(1, 2)]
  assert log.getvalue() == (
      'data: 1 of 2 samples name more than data.max_images=1 images; the first 1 are used, the '
      f"rest left out (sample {two[0]['id']!r} names 2)\n")
  assert all(int(b['image_mask'].sum(1).max()) <= 1 for b in ds)


def _nan_inf_store(tmp_path, modality=''):
  """A store of three float32 scans, 'ok', 'nan' (one NaN voxel) and 'inf' (one -inf and one
  +inf), and one record per scan."""
  store = VolumeStore(str(tmp_path / 'store'))
  good = np.random.default_rng(0).normal(0, 100, (1, 20, 18, 9)).astype(np.float32)
  arrays = {'ok': good, 'nan': good.copy(), 'inf': good.copy()}
  arrays['nan'][0, 3, 4, 5] = np.nan
  arrays['inf'][0, 0, 0, 0] = -np.inf
  arrays['inf'][0, 19, 17, 8] = np.inf
  store.write_batch([(sid, a, {}) for sid, a in arrays.items()])
  records = [{'id': f's_{sid}', 'question': 'What?', 'answer': 'A nodule.',
              'images': [{'id': sid, 'shape': [1, 20, 18, 9], 'position': {'question': 0},
                          'modality': modality}]}
             for sid in arrays]
  return store, records, good


@pytest.mark.parametrize('host_dtype,intensity,modality', [
    ('float32', 'radfm', ''), ('stored', 'radfm', ''), ('float32', 'percentile', 'CT'),
    ('stored', 'ct_window', 'CT'), ('float32', 'ct_window', 'MR')])
def test_a_stored_scan_with_nan_or_inf_is_an_unreadable_sample(tmp_path, host_dtype, intensity,
                                                               modality):
  """Ingest rejects NaN / inf voxels; a store holding them anyway (written since by other means)
  gave NaN images (the min-max takes the sample's range from them), so the run stopped on a NaN
  loss naming no scan. Such a scan is an unreadable sample: skipped, named, counted; under every
  policy, also those that take no min-max of the scan (percentile, a CT window)."""
  store, records, good = _nan_inf_store(tmp_path, modality)
  stats = pipeline.PipelineStats()
  cfg = cd.data_config(shuffle=False, host_dtype=host_dtype, intensity=intensity)
  ds = pipeline.make_dataset(cfg, cd.tiny_model(), store, cd.tokenizer(), process_index=0,
                             process_count=1, num_epochs=1, stats=stats, records=records)
  batches = [cd.model_inputs(b) for b in ds]
  reason = ('ValueError: {} NaN/inf voxels in the stored array; expected finite voxels, as '
            'ingest stores them')
  assert stats.skipped == [{'sample_id': 's_nan', 'scan_id': 'nan', 'reason': reason.format(1)},
                           {'sample_id': 's_inf', 'scan_id': 'inf', 'reason': reason.format(2)}]
  assert stats.samples == 1 and stats.empty_rows == 2
  assert all(np.isfinite(b['images']).all() for b in batches)
  want = transforms.prepare_images([good], [modality], (16, 16, 8), cfg)
  np.testing.assert_array_equal(batches[0]['images'][0, :1], want)
  # the same line when the sample is not dropped
  ds = pipeline.make_dataset(dataclasses.replace(cfg, drop_unreadable=False), cd.tiny_model(),
                             store, cd.tokenizer(), process_index=0, process_count=1,
                             num_epochs=1, records=records[1:2])
  with pytest.raises(ValueError, match='^1 NaN/inf voxels in the stored array; expected finite'):
    list(ds)


def test_the_nan_check_is_the_min_max_the_policy_takes(tmp_path, monkeypatch):
  """The NaN / inf check of a float scan is the (min, max) the radfm policy scales the sample by,
  handed on as its range: each scan's value_range is taken once per batch, not once to check and
  again to scale (a pass over the volume each: 18-38 ms per 16M voxels)."""
  store, records, good = _nan_inf_store(tmp_path)
  taken = []
  value_range = transforms.value_range
  monkeypatch.setattr(transforms, 'value_range',
                      lambda x: taken.append(x.shape) or value_range(x))
  cfg = cd.data_config(shuffle=False)
  ds = pipeline.make_dataset(cfg, cd.tiny_model(), store, cd.tokenizer(), process_index=0,
                             process_count=1, num_epochs=1, records=records[:1] * 3,
                             num_threads=1)
  batches = [cd.model_inputs(b) for b in ds]
  assert taken == [(1, 20, 18, 9)] * 3                        # three samples of one scan
  want = transforms.prepare_images([good], [''], (16, 16, 8), cfg)
  rows = [b['images'][r, :1] for b in batches for r in range(len(b['images']))
          if b['image_mask'][r, 0]]
  assert len(rows) == 3 and all(row.tobytes() == want.tobytes() for row in rows)


def test_training_crops_2d_images_as_the_original_and_resumes_them(store):
  """data.resize_2d='bicubic' with the train split's random crop: each 2D image of row r of
  global batch i is `prepare_images` with the crop drawn from rng (seed, i, r); a held-out split
  (no augment) takes each image whole; the crops differ between epochs and resume exactly."""
  records = store.manifest()
  def expected(batch, key, rows, cfg, rng_of):
    for r, sample in enumerate(rows):
      if sample < 0:
        continue
      entries = records[sample]['images']
      arrays = [store.read(e['id']) for e in entries]
      want = transforms.prepare_images(arrays, [''] * len(arrays),
                                       (key.height, key.width, key.depth), cfg, crop_rng=rng_of(r))
      np.testing.assert_array_equal(batch['images'][r][:len(arrays)], want)

  cfg = cd.data_config(resize_2d='bicubic')
  for augment in (True, False):
    ds = _make(store, seed=3, num_epochs=2, augment=augment, resize_2d='bicubic')
    batches = list(ds)
    per_epoch = ds.plan.num_batches
    crops = {}
    for i, batch in enumerate(batches):
      key, rows = ds.plan.epoch(i // per_epoch)[i % per_epoch]
      if key.kind != '2d':
        continue
      expected(batch, key, rows, cfg,
               lambda r, i=i: np.random.default_rng([3, i, r]) if augment else None)
      for r, sample in enumerate(rows):
        if sample >= 0:
          crops.setdefault(sample, []).append(batch['images'][r].copy())
    assert all(len(v) == 2 for v in crops.values()) and len(crops) == 7
    differ = [not np.array_equal(a, b) for a, b in crops.values()]
    assert all(differ) if augment else not any(differ)
  it = iter(_make(store, seed=3, num_epochs=None, augment=True, resize_2d='bicubic'))
  for _ in range(9):
    next(it)
  state = it.get_state()
  after = [next(it) for _ in range(4)]
  again = iter(_make(store, seed=3, num_epochs=None, augment=True, resize_2d='bicubic'))
  again.set_state(state)
  _assert_same(after, [next(again) for _ in range(4)])


def test_a_non_8bit_2d_image_in_a_3d_bucket_is_carried_as_float32(tmp_path):
  """host_dtype='stored': a 16-bit 2D image resized bicubic is float32, so its 3D bucket's
  carrier is float32 (never the int16 of the stored voxels) and the device inputs equal the
  float32 host path's."""
  rng = np.random.default_rng(5)
  cd.write_nifti(tmp_path / 'ct.nii.gz', cd.ct_volume((20, 18, 9), seed=1))
  np.save(tmp_path / 'xray.npy', rng.integers(0, 4000, (1, 30, 26, 1)).astype(np.int16))
  manifest = cd.write_manifest(tmp_path / 'm.jsonl', [{
      'id': 'mixed', 'task': 'vqa', 'question': 'Compare.', 'answer': 'Same.',
      'images': [{'path': 'ct.nii.gz', 'position': {'question': 0}, 'modality': 'CT'},
                 {'path': 'xray.npy', 'position': {'question': 0}}]}])
  ingest(manifest, str(tmp_path / 'store'), log=open(os.devnull, 'w'))
  volumes = VolumeStore(str(tmp_path / 'store'))
  stored, = list(_make(volumes, resize_2d='bicubic', host_dtype='stored'))
  host, = list(_make(volumes, resize_2d='bicubic', host_dtype='float32'))
  assert stored['images'].dtype == np.float32 and 'image_maps' in stored
  a, b = cd.model_inputs(stored), cd.model_inputs(host)
  np.testing.assert_array_equal(a['images'], b['images'])


def test_a_depth_1_case_stack_is_a_volume_as_the_original_reads_it(tmp_path):
  """A RadFM case .npy [S, 3, H, W, 1] (the original's conversion of a case that has only JPEG
  images) is read by the original's 3D datasets as a case: min-max over the whole case, resized
  nearest to the bucket, never cropped, even when 8-bit. So on the train split with the random
  crop on, each of its images (all of them, or one picked by `index`) is exactly that, while a
  PNG of the same pixels still takes the 2D path (crop, bicubic, / 255)."""
  rng = np.random.default_rng(11)
  case = rng.integers(20, 201, (2, 3, 40, 36, 1)).astype(np.uint8)
  np.save(tmp_path / 'case.npy', case)
  cd.write_png(tmp_path / 'same.png', np.moveaxis(case[1, :, :, :, 0], 0, -1))
  manifest = cd.write_manifest(tmp_path / 'm.jsonl', [
      {'id': 'whole', 'question': 'What?', 'answer': 'A case.',
       'images': [{'path': 'case.npy', 'position': {'question': 0}}]},
      {'id': 'picked', 'question': 'What?', 'answer': 'A case.',
       'images': [{'path': 'case.npy', 'index': 1, 'position': {'question': 0}}]},
      {'id': 'png', 'question': 'What?', 'answer': 'A case.',
       'images': [{'path': 'same.png', 'position': {'question': 0}}]}])
  ingest(manifest, str(tmp_path / 'store'), log=open(os.devnull, 'w'))
  volumes = VolumeStore(str(tmp_path / 'store'))
  records = {r['id']: r for r in volumes.manifest()}
  assert [volumes.case_image(im['id']) for r in records.values() for im in r['images']] == [
      True, True, True, False]

  def as_the_original(images):       # [S, 3, 40, 36, 1] -> [S, 3, 32, 32, 4]
    lo, hi = float(images.min()), float(images.max())
    rows = np.floor(np.arange(32) * 40 / 32).astype(int)
    cols = np.floor(np.arange(32) * 36 / 32).astype(int)
    x = images[:, :, rows][:, :, :, cols][..., [0, 0, 0, 0]].astype(np.float64)
    return (x - lo) / (hi - lo)

  want = {'whole': as_the_original(case), 'picked': as_the_original(case[1:])}
  cfg = dict(seed=3, num_epochs=2, augment=True, resize_2d='bicubic', random_crop_2d=True)
  ds = _make(volumes, **cfg)
  seen = set()
  for i, batch in enumerate(ds):
    key, rows = ds.plan.epoch(i // ds.plan.num_batches)[i % ds.plan.num_batches]
    assert key.kind == '2d' and (key.height, key.width, key.depth) == (32, 32, 4)
    for r, sample in enumerate(rows):
      if sample < 0:
        continue
      rec = volumes.manifest()[sample]
      got = batch['images'][r][:len(rec['images'])]
      seen.add(rec['id'])
      if rec['id'] == 'png':
        png = volumes.read(rec['images'][0]['id'])
        crop = transforms.prepare_images([png], [''], (32, 32, 4), cd.data_config(
            resize_2d='bicubic'), crop_rng=np.random.default_rng([3, i, r]))
        np.testing.assert_array_equal(got, crop)
        assert np.abs(got - want['picked']).max() > 0.05
      else:
        np.testing.assert_allclose(got, want[rec['id']], rtol=0, atol=1e-6)
  assert seen == {'whole', 'picked', 'png'}
