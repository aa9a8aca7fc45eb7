"""Training-resolution copies (`ingest --train-resolution`, data/train_copies.py) on real tiny
stores through the real Grain pipeline: the model inputs read from the copies equal, bit for bit,
the full-resolution path's; the copies round-trip through the store beside the untouched scans;
copies of another size, stale copies and the policies that cannot use them are bypassed with one
line, reading the full scans."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import conftest_data as cd
from radfm_jax.config import ConfigError, load_config
from radfm_jax.data import pipeline, transforms
from radfm_jax.data.ingest import ingest
from radfm_jax.data.store import VolumeStore

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = open(os.devnull, 'w')
SIZE = 16                                    # cd.data_config's image_size_3d_single


def _ct0():
  """40 x 36 x 10 int16 whose extremes sit where the 40 -> 16 / 36 -> 16 nearest gather never
  looks (rows 38-39, columns 34-35): the copy's own min / max differ from the scan's."""
  v = cd.ct_volume((40, 36, 10), seed=0)
  v[39, 35, 3], v[38, 34, 2] = 4000, -3000
  return v


def _sample(sid, *scans, modality='CT'):
  return {'id': sid, 'task': 'report', 'question': '', 'findings': f'Lesion {sid}.',
          'impression': 'Stable.',
          'images': [{'path': f'{s}.nii.gz', 'id': s, 'modality': modality,
                      'position': {'question': 0}} for s in scans]}


@pytest.fixture(scope='module')
def store(tmp_path_factory):
  d = tmp_path_factory.mktemp('copies')
  rng = np.random.default_rng(1)
  cd.write_nifti(d / 'ct0.nii.gz', _ct0())
  cd.write_nifti(d / 'ct1.nii.gz', cd.ct_volume((40, 36, 23), seed=1))     # depth bucket 16
  cd.write_nifti(d / 'ct2.nii.gz', cd.ct_volume((40, 36, 14), seed=2))
  cd.write_nifti(d / 'mr0.nii.gz', (rng.random((40, 40, 9)) * 900).astype(np.float32))
  cd.write_nifti(d / 'small.nii.gz', cd.ct_volume((12, 12, 8), seed=3))    # below 16 x 16
  cd.write_png(d / 'x0.png', rng.integers(0, 255, (40, 36), dtype=np.uint8))
  records = [_sample('s0', 'ct0'), _sample('s1', 'ct1'), _sample('s2', 'ct1', 'ct2'),
             _sample('s3', 'mr0', modality='MR'), _sample('s4', 'small'),
             {'id': 's5', 'question': 'What is shown?', 'answer': 'A hand.',
              'images': [{'path': 'x0.png', 'id': 'x0'}]}]
  manifest = cd.write_manifest(d / 'samples.jsonl', records)
  report = ingest(manifest, str(d / 'store'), log=QUIET, train_resolution=SIZE)
  assert (report.copies, report.copies_current) == (4, 0)       # ct0, ct1, ct2, mr0
  return VolumeStore(str(d / 'store'))


class _Counting(VolumeStore):
  """The real store, counting the full-resolution scans read (threads only: num_workers=0)."""

  def __init__(self, root):
    super().__init__(root)
    self.reads = []

  def read(self, scan_id):
    self.reads.append(scan_id)
    return super().read(scan_id)


def _run(root, **cfg):
  """(batches of one epoch, full scans read, lines printed) of the pipeline over store `root`."""
  counting, log = _Counting(root), io.StringIO()
  ds = pipeline.make_dataset(cd.data_config(**cfg), cd.tiny_model(), counting, cd.tokenizer(),
                             seed=0, process_index=0, process_count=1, num_epochs=1, log=log)
  return list(ds), set(counting.reads), log.getvalue().splitlines()


def _same(a, b):
  """Two epochs give the same batches, every array bit for bit."""
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, k
      assert x[k].tobytes() == y[k].tobytes(), k


@pytest.mark.parametrize('host_dtype', ['float32', 'stored'])
@pytest.mark.parametrize('policy', ['radfm', 'ct_windows3'])
def test_copies_give_the_full_scans_inputs_bit_for_bit(store, policy, host_dtype):
  full, full_reads, full_log = _run(store.root, intensity=policy, host_dtype=host_dtype,
                                    train_copies=False)
  fast, fast_reads, fast_log = _run(store.root, intensity=policy, host_dtype=host_dtype)
  _same(full, fast)
  assert full_reads == {'ct0', 'ct1', 'ct2', 'mr0', 'small', 'x0'}
  assert fast_reads == {'small', 'x0'}                 # every scan with a copy read from it
  assert fast_log == []
  assert full_log == ['data: the store has training-resolution copies; not read because of '
                      'data.train_copies=False: reading the full-resolution scans']
  images = [b['images'] for b in fast if b['images'].shape[-1] == 16]
  assert images and max(float(np.abs(x).max()) for x in images) > 0     # real voxels


def test_copies_round_trip_beside_the_untouched_scans(store):
  fresh = VolumeStore(store.root)                      # the index as written on disk
  assert np.array_equal(fresh.read('ct0')[0], _ct0())  # the scan itself, unchanged
  for sid, depth in (('ct0', 10), ('ct1', 23), ('ct2', 14), ('mr0', 9)):
    row = fresh.info(sid)
    (entry,) = row['copies']
    full = fresh.read(sid)
    copy = fresh.read_copy(entry)
    assert entry['shape'] == [1, SIZE, SIZE, depth] and entry['dtype'] == row['dtype']
    assert entry['of'] == fresh.key(sid) == row['key'] and entry['resize'] == 'nearest'
    assert copy.dtype == full.dtype and copy.shape == (1, SIZE, SIZE, depth)
    assert np.array_equal(copy, transforms.resize(full, (SIZE, SIZE, depth)))
    assert (entry['min'], entry['max']) == transforms.value_range(full)
    idx = transforms.nearest_indices(depth, 4)
    assert np.array_equal(fresh.read_copy(entry, idx), full[np.ix_(
        [0], transforms.nearest_indices(40, SIZE),
        transforms.nearest_indices(full.shape[2], SIZE), idx)])
  c0 = fresh.read_copy(fresh.info('ct0')['copies'][0])
  assert (c0.min(), c0.max()) != (-3000, 4000)         # the gather misses the extremes
  assert fresh.info('ct0')['copies'][0]['max'] == 4000.0
  assert all('copies' not in fresh.info(s) for s in ('small', 'x0'))
  # The same ingest again: nothing made, nothing appended to the index.
  lines = open(fresh.scans_path).read().count('\n')
  manifest = os.path.join(os.path.dirname(store.root), 'samples.jsonl')
  report = ingest(manifest, store.root, log=QUIET, train_resolution=SIZE)
  assert (report.copies, report.copies_current) == (0, 4)
  assert open(fresh.scans_path).read().count('\n') == lines


def test_copies_of_another_size_are_bypassed_with_one_line(store):
  full, _, _ = _run(store.root, image_size_3d_single=8, train_copies=False)
  fast, reads, log = _run(store.root, image_size_3d_single=8)
  _same(full, fast)
  assert reads == {'ct0', 'ct1', 'ct2', 'mr0', 'small', 'x0'}
  assert log == ["data: 5 image(s) have training-resolution copies of another size than their "
                 "batch (e.g. scan 'ct0': copy 16x16, batch 8x8; data.image_size_3d_single=8, "
                 "data.image_size_2d=32): reading their full-resolution scans (ingest "
                 "--train-resolution 8 makes matching copies)"]


@pytest.mark.parametrize('cfg,why', [
    (dict(resize='trilinear'), "data.resize='trilinear' (the copies are nearest-resized; only "
                               "'nearest' commutes with them)"),
    (dict(intensity='percentile'), "data.intensity='percentile' (it needs every voxel of the "
                                   'full scan)')])
def test_policies_that_do_not_commute_read_the_full_scans(store, cfg, why):
  full, _, _ = _run(store.root, train_copies=False, **cfg)
  fast, reads, log = _run(store.root, **cfg)
  _same(full, fast)
  assert reads == {'ct0', 'ct1', 'ct2', 'mr0', 'small', 'x0'}
  assert log == [f'data: the store has training-resolution copies; not read because of {why}: '
                 'reading the full-resolution scans']


def test_stale_copy_is_refused_and_remade(tmp_path):
  d = tmp_path
  cd.write_nifti(d / 'ct0.nii.gz', _ct0())
  manifest = cd.write_manifest(d / 'samples.jsonl', [_sample('s0', 'ct0')])
  root = str(d / 'store')
  ingest(manifest, root, log=QUIET, train_resolution=SIZE)
  old = VolumeStore(root).info('ct0')
  # The file changes; ingest stores its new version (no copy asked for): the new row has none.
  cd.write_nifti(d / 'ct0.nii.gz', _ct0()[::-1].copy())
  ingest(manifest, root, log=QUIET)
  new = VolumeStore(root).info('ct0')
  assert new['version'] == 1 and 'copies' not in new
  want, _, log = _run(root)
  assert log == []
  # An index row carrying the old version's copy forward (e.g. merged by hand): refused.
  with open(os.path.join(root, 'scans.jsonl'), 'a') as f:
    f.write(json.dumps(dict(new, copies=old['copies'])) + '\n')
  got, reads, log = _run(root)
  _same(want, got)
  assert reads == {'ct0'}
  assert log == ["data: 1 training-resolution copies are stale (made from another version of "
                 "the scan than the store indexes now, e.g. scan 'ct0'): reading the "
                 "full-resolution scans (ingest --train-resolution again remakes them)"]
  # The real CLI remakes it; then it is read, with the same inputs.
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  cli = [sys.executable, '-m', 'radfm_jax.cli', 'ingest', '--manifest', manifest, '--out', root,
         '--no-progress', '--train-resolution']
  bad = subprocess.run(cli + ['0'], capture_output=True, text=True, env=env)
  assert (bad.returncode, bad.stderr.strip().splitlines()[-1]) == (
      2, 'radfm-jax ingest: --train-resolution 0: expected a positive in-plane size (e.g. 256, '
      'data.image_size_3d_single)')
  ok = subprocess.run(cli + [str(SIZE)], capture_output=True, text=True, env=env)
  assert ok.returncode == 0, ok.stderr
  assert '1 training-resolution copies made at 16x16 (0 already current)' in ok.stderr
  (entry,) = VolumeStore(root).info('ct0')['copies']
  assert entry['of'] == new['key'] != old['copies'][0]['of']
  again, reads, log = _run(root)
  _same(want, again)
  assert (reads, log) == (set(), [])


def test_train_copies_is_a_checked_bool():
  with pytest.raises(ConfigError) as e:
    load_config('configs/radfm.py:model=tiny,mesh=cpu', ['data.train_copies=1'])
  assert 'data.train_copies' in str(e.value)
  cfg = load_config('configs/radfm.py:model=tiny,mesh=cpu', [])
  assert cfg.data.train_copies is True and cfg.data.host_dtype == 'stored'


def test_sharded_store_gets_copies_in_its_main_database(tmp_path):
  """A store written in shards (the `--runner beam` writer, run in this process): the copies of
  the shard rows go to the store's own volumes/, named after the shard's array, and read back
  to the same inputs."""
  from radfm_jax.data.shards import store_scans_sharded
  d = tmp_path
  cd.write_nifti(d / 'ct0.nii.gz', _ct0())
  cd.write_nifti(d / 'ct1.nii.gz', cd.ct_volume((40, 36, 23), seed=1))
  manifest = cd.write_manifest(d / 'samples.jsonl', [_sample('s0', 'ct0'), _sample('s1', 'ct1')])
  root = str(d / 'store')
  report = ingest(manifest, root, log=QUIET, train_resolution=SIZE,
                  store_scans=store_scans_sharded(scans_per_shard=1))
  assert (report.copies, report.copies_current) == (2, 0)
  vs = VolumeStore(root)
  for sid in ('ct0', 'ct1'):
    (entry,) = vs.info(sid)['copies']
    assert vs.key(sid).startswith('shards/') and entry['of'] == vs.key(sid)
    assert entry['key'].startswith('copies/shards%2F')
  full, _, _ = _run(root, train_copies=False)
  fast, reads, log = _run(root)
  _same(full, fast)
  assert (reads, log) == (set(), [])


def test_rerun_remakes_copies_whose_arrays_were_lost(tmp_path):
  """The copies of a sharded store live in its own volumes/, the scans in their shards: with
  volumes/d/ deleted, the real CLI's re-run moved the database aside and counted both copies
  'already current' (their rows unchanged), so training skipped both samples while their scans
  read fine. Now an unopenable copy is made again, with a line, and training reads it."""
  import shutil

  from radfm_jax.data.shards import store_scans_sharded
  d = tmp_path
  cd.write_nifti(d / 'ct0.nii.gz', _ct0())
  cd.write_nifti(d / 'ct1.nii.gz', cd.ct_volume((40, 36, 23), seed=1))
  manifest = cd.write_manifest(d / 'samples.jsonl', [_sample('s0', 'ct0'), _sample('s1', 'ct1')])
  root = str(d / 'store')
  ingest(manifest, root, log=QUIET, train_resolution=SIZE,
         store_scans=store_scans_sharded(scans_per_shard=1))
  want, _, _ = _run(root)
  rows = VolumeStore(root).index()
  shutil.rmtree(os.path.join(root, 'volumes', 'd'))            # every copy's array lost
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  ok = subprocess.run([sys.executable, '-m', 'radfm_jax.cli', 'ingest', '--manifest', manifest,
                       '--out', root, '--no-progress', '--train-resolution', str(SIZE)],
                      capture_output=True, text=True, env=env)
  assert ok.returncode == 0, ok.stderr
  key = rows['ct0']['copies'][0]['key']
  lines = ok.stderr.splitlines()
  assert lines[1].startswith(f"ingest: 2 training-resolution copies at 16x16 cannot be read (e.g. "
                             f"scan 'ct0': {root}/volumes/ key {key}: the training-resolution "
                             "copy cannot be read (NOT_FOUND: "), lines
  assert lines[1].endswith('); made again from their scans'), lines
  assert lines[2].endswith('2 training-resolution copies made at 16x16 (0 already current) -> '
                           f'{root}'), lines
  store = VolumeStore(root)
  assert {i: r['copies'] for i, r in store.index().items()} == {
      i: r['copies'] for i, r in rows.items()}                 # same entries, arrays back
  got, reads, log = _run(root)
  _same(want, got)
  assert (reads, log) == (set(), [])
