"""Sharded stores (data/shards.py, `ingest --runner beam`): the same store as single-process ingest,
an interrupted run indexes nothing, a retried shard skips what it committed, extension by new
shards, reading through kvstore URLs, and training / eval / the demo / the image-token cache
reading a sharded store exactly as a single one."""

import os
import subprocess
import sys

import numpy as np
import pytest

import conftest_data as cd
from radfm_jax.data.ingest import ingest
from radfm_jax.data.shards import (IncompleteShards, ShardStore, plan, run_in_process,
                                   store_scans_sharded)
from radfm_jax.data.store import VolumeStore, read_index

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = open(os.devnull, 'w')


def _sample(sid, *paths, **fields):
  return dict({'id': sid, 'task': 'vqa', 'question': f'What is in {sid}?', 'answer': 'A nodule.',
               'images': [{'path': p, 'position': {'question': 0}} for p in paths]}, **fields)


def mixed_inputs(folder) -> str:
  """A manifest of every input kind with bad files among them: PNG (grey, colour), NIfTI (one with
  a zero pixdim: a recorded repair), a DICOM series, a 5D case .npy (two images), a file that is
  not a PNG, a missing file, a truncated NIfTI. Returns the manifest path."""
  import nibabel as nib
  rng = np.random.default_rng(0)
  cd.write_png(folder / 'grey.png', rng.integers(0, 255, (40, 36), dtype=np.uint8))
  cd.write_png(folder / 'rgb.png', rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))
  cd.write_nifti(folder / 'ct.nii.gz', cd.ct_volume((12, 10, 6)),
                 cd.ras_affine((0.5, 0.7, 2.0), flip_xy=True))
  zero = nib.Nifti1Image(np.arange(48, dtype=np.int16).reshape(4, 4, 3), None)
  zero.header['pixdim'][1:4] = [0.0, 1.0, 2.0]
  nib.save(zero, str(folder / 'zeropix.nii'))
  cd.write_dicom_series(folder / 'series', rng.integers(0, 3000, (7, 6, 5)).astype(np.uint16),
                        slope=1.0, intercept=-1024.0)
  np.save(folder / 'case.npy', rng.normal(0, 1, (2, 1, 8, 8, 4)).astype(np.float32))
  (folder / 'bad.png').write_bytes(b'not a png')
  (folder / 'trunc.nii').write_bytes((folder / 'zeropix.nii').read_bytes()[:400])
  records = [_sample('grey', 'grey.png'), _sample('rgb', 'rgb.png', split='heldout'),
             _sample('ct', 'ct.nii.gz'), _sample('bad', 'bad.png'),
             _sample('zero', 'zeropix.nii'), _sample('two', 'series', 'grey.png'),
             _sample('missing', 'nothere.nii.gz'), _sample('case', 'case.npy'),
             _sample('trunc', 'ct.nii.gz', 'trunc.nii')]
  return cd.write_manifest(folder / 'samples.jsonl', records)


def assert_same_store(a: VolumeStore, b: VolumeStore):
  """The same samples, rejects, warnings and scans: every array bit-identical in value and
  dtype, the same attributes (index and zarr metadata)."""
  assert b.manifest() == a.manifest() and b.rejects() == a.rejects()
  assert b.warnings() == a.warnings()
  assert sorted(b.index()) == sorted(a.index())
  for i in a.index():
    x, y = a.read(i), b.read(i)
    assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), i
    assert b.info(i)['attributes'] == a.info(i)['attributes'] == b.attributes(i)
    assert (b.info(i)['shape'], b.info(i)['dtype']) == (a.info(i)['shape'], a.info(i)['dtype'])


@pytest.fixture(scope='module')
def stores(tmp_path_factory):
  """The mixed manifest ingested in one process and into in-process shards of 3 scans."""
  root = tmp_path_factory.mktemp('shards')
  manifest = mixed_inputs(root)
  single = ingest(manifest, str(root / 'single'), log=QUIET)
  sharded = ingest(manifest, str(root / 'sharded'), log=QUIET,
                   store_scans=store_scans_sharded(scans_per_shard=3))
  return root, manifest, single, sharded


def test_sharded_ingest_is_the_single_process_store(stores):
  root, _, single, sharded = stores
  a, b = VolumeStore(str(root / 'single')), VolumeStore(str(root / 'sharded'))
  assert_same_store(a, b)
  assert single.summary() == sharded.summary() == (
      '7 scans stored (0 changed on disk), 0 already stored, 3 rejected, 1 repaired; 6 samples '
      'kept, 3 dropped, 0 replaced; 6 samples in the store')
  assert [r['id'] for r in b.manifest()] == ['grey', 'rgb', 'ct', 'zero', 'two', 'case']
  assert [os.path.basename(r['path']) for r in b.rejects()] == [
      'bad.png', 'nothere.nii.gz', 'trunc.nii', 'bad.png', 'nothere.nii.gz', 'trunc.nii']
  # 9 image entries (one repeated) -> 3 shards of 3 entries, each its own database and index.
  dbs = sorted({row['db'] for row in b.index().values()})
  assert dbs == ['shards/run0001-00000', 'shards/run0001-00001', 'shards/run0001-00002']
  assert sorted(os.listdir(root / 'sharded' / 'shards')) == [d.split('/')[1] for d in dbs]
  assert not os.path.exists(root / 'sharded' / 'volumes')
  for db in dbs:
    own = read_index(str(root / 'sharded' / db / 'scans.jsonl'))
    assert {i: dict(r, db=db) for i, r in own.items()} == {
        i: r for i, r in b.index().items() if r['db'] == db}
  assert len({b.key(i) for i in b.index()}) == len(b.index())     # one identity per array


def test_interrupted_run_indexes_nothing_and_the_next_run_completes(stores, tmp_path):
  _, manifest, _, _ = stores
  out = str(tmp_path / 'store')

  def first_shard_only(tasks):      # a job that died after its first shard
    tasks[0].run()

  with pytest.raises(IncompleteShards, match=r'2 of 3 shards did not finish \(run0001-00001, '
                     r'run0001-00002\) and nothing was indexed; expected every worker to write '
                     r'its shard under the store, at a path all workers see'):
    ingest(manifest, out, log=QUIET, store_scans=store_scans_sharded(first_shard_only, 3))
  assert sorted(os.listdir(out)) == ['.lock', 'shards']          # no index, no manifest
  assert len(read_index(os.path.join(out, 'shards', 'run0001-00000', 'scans.jsonl'))) == 3
  report = ingest(manifest, out, log=QUIET, store_scans=store_scans_sharded(scans_per_shard=3))
  assert len(report.stored) == 7 and report.skipped == []       # the dead run's shard: unused
  store = VolumeStore(out)
  assert {r['db'] for r in store.index().values()} == {
      'shards/run0002-00000', 'shards/run0002-00001', 'shards/run0002-00002'}
  assert_same_store(VolumeStore(str(stores[0] / 'single')), store)


def test_a_killed_runs_shard_names_are_not_taken_again(stores, tmp_path):
  """A driver SIGKILLed after planning, before its workers made any shard folder: its job may
  still be running (a Dataflow job outlives its driver). The next run took the same names
  (run0001-*), so that job's writes landed in the new run's shards: its scan indexed with them,
  its result.json read in place of theirs (their samples dropped). Now a run's folders are made
  when it is planned, under the lock, and the next run takes run0002."""
  root, manifest, _, _ = stores
  from radfm_jax.data.ingest import _collect, _load_records
  from radfm_jax.data.shards import ShardTask
  out = str(tmp_path / 'store')
  code = ('import sys; from radfm_jax.data.ingest import ingest; '
          'from radfm_jax.data.shards import store_scans_sharded; '
          'ingest(sys.argv[1], sys.argv[2], store_scans=store_scans_sharded(scans_per_shard=3))')
  killed = subprocess.run([sys.executable, '-c', code, manifest, out], cwd=ROOT, timeout=120,
                          capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT,
                                   RADFM_JAX_CRASH_AT='shards-planned'))
  assert killed.returncode == -9, killed.stderr
  assert not os.path.exists(os.path.join(out, 'scans.jsonl'))
  # The killed job's worker of its first shard, still running: another scan, written when the
  # next run has written its own shards.
  cd.write_png(tmp_path / 'late.png', np.arange(64, dtype=np.uint8).reshape(8, 8))
  other = cd.write_manifest(tmp_path / 'late.jsonl', [_sample('late', str(tmp_path / 'late.png'))])
  late = ShardTask(out, 'run0001-00000', list(_collect(*_load_records(other)).values()), {})

  def then_the_late_worker(tasks):
    run_in_process(tasks)
    late.run()

  ingest(manifest, out, log=QUIET, store_scans=store_scans_sharded(then_the_late_worker, 3))
  store = VolumeStore(out)
  assert {r['db'] for r in store.index().values()} == {
      'shards/run0002-00000', 'shards/run0002-00001', 'shards/run0002-00002'}
  assert_same_store(VolumeStore(str(root / 'single')), store)


def test_retried_shard_skips_what_it_committed(stores, tmp_path):
  """Beam re-runs a failed bundle: the shard's committed scans are found in its own index (same
  sha256) and not written twice."""
  _, manifest, _, _ = stores
  from radfm_jax.data.ingest import _collect, _load_records
  records, base, place = _load_records(manifest)
  store = VolumeStore(str(tmp_path / 'store'))
  (task,) = plan(store, _collect(records, base, place), 100, 16, 1, 1 << 30)
  task.run()
  first = ShardStore(task.path).own_rows()
  os.remove(os.path.join(task.path, 'result.json'))             # died before its result
  task.run()
  assert ShardStore(task.path).own_rows() == first              # no second version of anything
  assert all(row['version'] == 0 for row in first.values()) and len(first) == 7


def test_sharded_ingest_says_what_single_process_ingest_says(stores, tmp_path):
  """The same lines on stderr (in another order: a shard's are said when the run is collected).
  Was: a repair was recorded in warnings.jsonl but not said."""
  import io
  _, manifest, _, _ = stores
  logs = {'single': io.StringIO(), 'sharded': io.StringIO()}
  ingest(manifest, str(tmp_path / 'single'), log=logs['single'])
  ingest(manifest, str(tmp_path / 'sharded'), log=logs['sharded'],
         store_scans=store_scans_sharded(scans_per_shard=3))
  single = logs['single'].getvalue().splitlines()
  plan_line, *sharded = logs['sharded'].getvalue().replace(
      str(tmp_path / 'sharded'), str(tmp_path / 'single')).splitlines()
  assert plan_line == 'ingest: 9 scans in 3 shards (run0001-00000 .. run0001-00002)'
  assert sorted(sharded) == sorted(single)
  assert sum(line.startswith('ingest: repaired ') for line in single) == 1
  assert sum(line.startswith('ingest: rejected ') for line in single) == 3


def test_database_moved_aside_in_a_retried_shard_is_said(stores, tmp_path):
  """A shard re-run after its database was lost moves it aside; the line it said went to the
  worker's discarded log. Now the run says it when collected, as single-process ingest does."""
  import io
  root, manifest, _, _ = stores
  out = str(tmp_path / 'store')

  def retried_after_damage(tasks):
    run_in_process(tasks)
    os.remove(os.path.join(tasks[0].path, 'volumes', 'manifest.ocdbt'))
    os.remove(os.path.join(tasks[0].path, 'result.json'))
    tasks[0].run()

  log = io.StringIO()
  report = ingest(manifest, out, log=log, store_scans=store_scans_sharded(retried_after_damage, 3))
  shard = os.path.join(out, 'shards', 'run0001-00000')
  moved = (f'ingest: {shard}/volumes/: the database cannot be read (NOT_FOUND: manifest.ocdbt is '
           f'missing, although {shard}/scans.jsonl indexes 3 arrays in it); moved to '
           f'{shard}/volumes.damaged-1/ and a new one started: every scan whose array it held is '
           'read from its file again (one not in this manifest when its manifest is ingested '
           'again)')
  assert log.getvalue().splitlines().count(moved) == 1 and report.moved_aside == [moved]
  assert len(report.restored) == 3
  assert_same_store(VolumeStore(str(root / 'single')), VolumeStore(out))


def test_extending_a_sharded_store(stores, tmp_path):
  """A second sharded run adds new shards (run0002); unchanged scans are skipped, a changed file
  becomes a new version in the new shard; a local ingest adds to volumes/ of the same store."""
  root, manifest, _, _ = stores
  out = str(tmp_path / 'store')
  sharded = store_scans_sharded(scans_per_shard=4)
  ingest(manifest, out, log=QUIET, store_scans=sharded)
  store = VolumeStore(out)
  grey = next(i for i, r in store.index().items() if r['attributes']['source'].endswith('grey.png'))
  cd.write_png(root / 'more.png', np.arange(64, dtype=np.uint8).reshape(8, 8))
  more = cd.write_manifest(tmp_path / 'more.jsonl', [
      _sample('more', str(root / 'more.png')), _sample('grey', str(root / 'grey.png'))])
  report = ingest(more, out, log=QUIET, store_scans=sharded)
  assert report.rejects == [] and report.skipped == [grey] and len(report.stored) == 1
  store = VolumeStore(out)
  (new,) = report.stored
  assert store.info(new)['db'] == 'shards/run0002-00000'
  np.testing.assert_array_equal(store.read(new)[0, :, :, 0], np.arange(64).reshape(8, 8))
  assert [r['id'] for r in store.manifest()] == ['grey', 'rgb', 'ct', 'zero', 'two', 'case', 'more']
  cd.write_png(root / 'changed.png', np.eye(5, dtype=np.uint8))
  changed = cd.write_manifest(tmp_path / 'changed.jsonl', [
      _sample('more2', str(root / 'changed.png'))])
  ingest(changed, out, log=QUIET)                               # single-process, same store
  cd.write_png(root / 'changed.png', 2 * np.eye(5, dtype=np.uint8))
  report = ingest(changed, out, log=QUIET, store_scans=sharded)
  (sid,) = report.updated
  store = VolumeStore(out)
  assert (store.info(sid)['db'], store.info(sid)['version']) == ('shards/run0003-00000', 1)
  assert store.key(sid).startswith('shards/run0003-00000/scans/') and store.read(sid).max() == 2
  assert os.path.isdir(os.path.join(out, 'volumes'))            # the version-0 array stays there


def test_store_on_a_kvstore_url(stores):
  """A store named by URL: arrays, index and manifest read through TensorStore's kvstore (file://
  here; gs://bucket/path parses into TensorStore's gcs driver)."""
  import tensorstore as ts
  from radfm_jax.data.manifest import read_manifest
  root = stores[0]
  local = VolumeStore(str(root / 'sharded'))
  url = VolumeStore(f'file://{root}/sharded')
  assert url.index() == local.index()
  assert read_manifest(url.manifest_path) == local.manifest()
  for i in local.index():
    assert url.read(i).tobytes() == local.read(i).tobytes()
  gs = VolumeStore('gs://bucket/radfm/store/')
  assert (gs.root, gs.manifest_path) == ('gs://bucket/radfm/store',
                                         'gs://bucket/radfm/store/manifest.jsonl')
  assert ts.KvStore.Spec(gs.kvstore).to_json() == {
      'driver': 'ocdbt', 'base': {'driver': 'gcs', 'bucket': 'bucket', 'path': 'radfm/store/volumes/'}}


def _cli(*argv, prelude=''):
  code = f'import sys; {prelude}from radfm_jax.cli.main import main; sys.exit(main(sys.argv[1:]))'
  return subprocess.run([sys.executable, '-c', code, *argv], cwd=ROOT, capture_output=True,
                        text=True, timeout=600, env=dict(os.environ, PYTHONPATH=ROOT))


def test_cli_beam_without_apache_beam_or_options_without_beam(stores, tmp_path):
  _, manifest, _, _ = stores
  out = _cli('ingest', '--runner', 'beam', '--manifest', manifest, '--out', str(tmp_path / 's'),
             prelude="sys.modules['apache_beam'] = None; ")        # as if not installed
  assert out.returncode == 2 and out.stderr == (
      "radfm-jax ingest: --runner beam needs Apache Beam, which is not installed; expected it "
      "installed (pip install 'radfm-jax[beam]')\n")
  assert not os.path.exists(tmp_path / 's')
  out = _cli('ingest', '--manifest', manifest, '--out', str(tmp_path / 's'), '--',
             '--direct_num_workers=2')
  assert out.returncode == 2 and out.stderr.endswith(
      'radfm-jax ingest: error: Beam options (--direct_num_workers=2) need --runner beam\n')


def test_beam_pipeline_in_process_is_the_single_process_store(stores, tmp_path):
  """The Beam pipeline itself (Create | Reshuffle | Map over the shard tasks) on the DirectRunner
  in this process: the same store as single-process ingest."""
  from radfm_jax.data.beam_ingest import ingest_beam
  root, manifest, single, _ = stores
  report = ingest_beam(manifest, str(tmp_path / 'beam'), ['--direct_running_mode=in_memory'],
                       scans_per_shard=4, log=QUIET)
  assert report.summary() == single.summary()
  store = VolumeStore(str(tmp_path / 'beam'))
  assert sorted(os.listdir(tmp_path / 'beam' / 'shards')) == ['run0001-00000', 'run0001-00001',
                                                              'run0001-00002']
  assert_same_store(VolumeStore(str(root / 'single')), store)


@pytest.mark.slow
def test_beam_multiprocess_ingest_is_the_single_process_store(stores, tmp_path):
  """`radfm-jax ingest --runner beam` on the DirectRunner with 2 worker processes: the same store
  as single-process ingest (bad files included)."""
  root, manifest, _, _ = stores
  out = tmp_path / 'beam'
  run = _cli('ingest', '--runner', 'beam', '--manifest', manifest, '--out', str(out),
             '--no-progress', '--', '--direct_running_mode=multi_processing',
             '--direct_num_workers=2')
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'ingest: 9 scans in 9 shards (run0001-00000 .. run0001-00008)' in run.stderr
  assert_same_store(VolumeStore(str(root / 'single')), VolumeStore(str(out)))


# ------------------------------------------------------------------------------------------------
# One pipeline over shards: what reads a store reads a sharded one the same

SPEC = 'configs/radfm.py:model=tiny,mesh=cpu'
_overrides = cd.frozen_vision_overrides


@pytest.fixture(scope='module')
def volumes(tmp_path_factory):
  """8 samples of 3D scans (.npy; two samples hold two) and 4 of PNGs, ingested in one process
  and into shards of 3 scans; the test tokenizer. (single store, sharded store, tokenizer)."""
  root = tmp_path_factory.mktemp('volumes')
  rng = np.random.default_rng(0)
  records = cd.volume_records(root, rng)
  for i in range(4):
    cd.write_png(root / f'x{i}.png', rng.integers(0, 255, (40, 36), dtype=np.uint8))
    records.append(_sample(f'p{i}', f'x{i}.png', split='heldout' if i == 3 else 'train'))
  manifest = cd.write_manifest(root / 'samples.jsonl', records)
  ingest(manifest, str(root / 'single'), log=QUIET)
  ingest(manifest, str(root / 'sharded'), log=QUIET,
         store_scans=store_scans_sharded(scans_per_shard=3))
  (root / 'tok.model').write_bytes(cd.spm_proto())
  return str(root / 'single'), str(root / 'sharded'), str(root / 'tok.model')


def test_grain_eval_and_demo_read_a_sharded_store_as_a_single_one(volumes):
  from radfm_jax.config import load_config
  from radfm_jax.data import pipeline
  from radfm_jax.data.tokenizer import Tokenizer
  from radfm_jax.demo import _batch_for_generation
  from radfm_jax.eval.harness import load_samples, read_sample_images
  single, sharded, tok = volumes
  assert len({VolumeStore(sharded).info(i)['db'] for i in VolumeStore(sharded).index()}) == 5
  cfg = load_config(SPEC, _overrides(single, tok))
  batches = []
  for store in (single, sharded, f'file://{sharded}'):        # the last: through kvstore URLs
    ds = pipeline.make_dataset(cfg.data, cfg.model, store, tok, seed=3, split='train',
                               process_index=0, process_count=1, num_epochs=1)
    batches.append(list(ds))
  assert len(batches[0]) == len(batches[1]) == len(batches[2]) >= 2
  for a, b, c in zip(*batches):
    assert sorted(a) == sorted(b) == sorted(c) and 'images' in a
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
      np.testing.assert_array_equal(a[key], c[key])
  samples = [load_samples(s, split=None) for s in (single, sharded)]
  assert [s.record for s in samples[0]] == [s.record for s in samples[1]] and len(samples[0]) == 12
  for a, b in zip(*samples):
    (xa, ma, ea, _), (xb, mb, eb, _) = read_sample_images(a), read_sample_images(b)
    assert (ma, ea) == (mb, eb) and [x.tobytes() for x in xa] == [x.tobytes() for x in xb]
  tokenizer = Tokenizer(tok, max_images=cfg.model.max_images,
                        num_latents=cfg.model.perceiver.num_latents)
  records = VolumeStore(single).manifest()[-4:]
  demo = [_batch_for_generation(records, VolumeStore(s), tokenizer, cfg, 4)
          for s in (single, sharded)]
  assert sorted(demo[0]) == sorted(demo[1])
  for key in demo[0]:
    np.testing.assert_array_equal(demo[0][key], demo[1][key])


@pytest.mark.slow
def test_training_and_the_image_cache_on_a_sharded_store(volumes, tmp_path):
  """3 training steps from the same seed on the single and the sharded store: the same losses,
  bit for bit; `cache-images` of the trained tower over each store: the same tokens per scan.
  One device (the data path does not depend on the mesh; a cheaper compile), and the sharded run
  reuses the single run's compiled steps (the loop's cache ignores where the data lives)."""
  import jax

  from radfm_jax import sharding
  from radfm_jax.config import load_config
  from radfm_jax.data.image_cache import ImageTokenCache
  from radfm_jax.train import loop
  from radfm_jax.train.image_cache import cache_images
  single, sharded, tok = volumes
  losses = []
  for name, store in (('single', single), ('sharded', sharded)):
    cfg = load_config(SPEC, _overrides(store, tok))
    run = loop.train(cfg, str(tmp_path / name), progress=False,
                     mesh=sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
    assert sorted(run.losses) == [1, 2, 3]
    losses.append([run.losses[s] for s in (1, 2, 3)])
  assert losses[0] == losses[1]
  stats = [cache_images(str(tmp_path / 'single'), s, progress=False) for s in (single, sharded)]
  assert stats[0]['fingerprint'] == stats[1]['fingerprint'] and stats[0]['scans'] == 14
  caches = [ImageTokenCache.caches(s)[stats[0]['fingerprint']] for s in (single, sharded)]
  assert caches[0]['scans'] == caches[1]['scans'] and len(caches[0]['scans']) == 14
  for scan in caches[0]['scans']:
    a, b = (ImageTokenCache(s, c).read(scan) for s, c in zip((single, sharded), caches))
    assert a.tobytes() == b.tobytes(), scan
