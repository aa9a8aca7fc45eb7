"""Image-token cache: a cached run's losses equal the uncached frozen-vision run's exactly; a cache
made by other weights is refused naming both; the exactness conditions are enforced."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import conftest_data as cd
from radfm_jax.config import ConfigError, load_config
from radfm_jax.data.image_cache import ImageTokenCache
from radfm_jax.data.store import VolumeStore
from radfm_jax.errors import InputError
from radfm_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One worker: the step-0 run and its cache (`run0`) are made once, not once per xdist worker.
pytestmark = pytest.mark.xdist_group('image_cache')

SPEC = 'configs/radfm.py:model=tiny,mesh=cpu'


_overrides = cd.frozen_vision_overrides


@pytest.fixture(scope='module')
def store(tmp_path_factory):
  """8 samples of 3D scans (.npy, depths 6-12; two samples hold two scans) + a tokenizer."""
  from radfm_jax.data.ingest import ingest
  root = tmp_path_factory.mktemp('cache')
  records = cd.volume_records(root, np.random.default_rng(0))
  ingest(cd.write_manifest(root / 'samples.jsonl', records), str(root / 'store'),
         log=open(os.devnull, 'w'))
  tok = root / 'tok.model'
  tok.write_bytes(cd.spm_proto())
  return str(root / 'store'), str(tok)


def _cli(*argv):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, '-m', 'radfm_jax.cli', *argv], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.fixture(scope='module')
def run0(store, tmp_path_factory):
  """A frozen-vision run saved at step 0 (what `cache-images` reads) and its cache, made in
  process: (workdir, cache-images' stats)."""
  from radfm_jax.train.image_cache import cache_images
  run = str(tmp_path_factory.mktemp('run0'))
  first = loop.train(load_config(SPEC, _overrides(*store)), run, max_steps=0, progress=False)
  assert first.last_checkpoint == 0
  return run, cache_images(run, store[0], progress=False)


@pytest.mark.slow
def test_cached_run_has_the_uncached_losses_exactly(store, run0, tmp_path):
  """3 steps reading volumes vs 3 steps, from the same step-0 checkpoint, reading the tokens
  `radfm-jax cache-images` (a CLI subprocess) wrote: the same losses, bit for bit."""
  store_dir, tok = str(tmp_path / 'store'), store[1]
  shutil.copytree(store[0], store_dir)          # the cache of run0 stays as the other tests expect
  plain = loop.train(load_config(SPEC, _overrides(store_dir, tok)), str(tmp_path / 'plain'),
                     progress=False)
  run = str(tmp_path / 'cached')
  shutil.copytree(run0[0], run)
  out = _cli('cache-images', '--checkpoint', run, '--data', store_dir, '--no-progress')
  assert out.returncode == 0, out.stderr
  stats = json.loads(out.stdout.strip().splitlines()[-1])
  assert stats['fingerprint'] == run0[1]['fingerprint']        # the same weights, another folder
  assert stats['scans'] == 10 and stats['samples'] == 8 and stats['bytes'] > 0
  cached = loop.train(load_config(SPEC, _overrides(store_dir, tok, 'data.image_cache=True')), run,
                      progress=False)
  assert sorted(plain.losses) == sorted(cached.losses) == [1, 2, 3]
  assert [cached.losses[s] for s in (1, 2, 3)] == [plain.losses[s] for s in (1, 2, 3)]


def test_cache_is_keyed_by_checkpoint_and_scan(store, run0):
  run, stats = run0
  assert stats['scans'] == 10 and stats['samples'] == 8
  assert os.path.isdir(os.path.join(store[0], 'image_tokens', stats['fingerprint']))
  cache = ImageTokenCache.open(store[0], stats['fingerprint'], source='test')
  assert cache.meta['checkpoint'] == run and len(cache.meta['scans']) == 10
  tokens = cache.read('v2_1')                  # the second scan of a two-scan sample
  assert tokens.shape == (32, 64) and tokens.dtype == np.float32 and np.abs(tokens).sum() > 0
  assert not np.array_equal(tokens, cache.read('v2_0'))


@pytest.mark.slow
def test_stale_cache_is_refused_naming_both(store, run0, tmp_path):
  run, stats = run0
  cfg = load_config(SPEC, _overrides(*store, 'data.image_cache=True', 'seed=1'))
  with pytest.raises(ConfigError) as e:
    loop.train(cfg, str(tmp_path / 'other'), progress=False)
  message = str(e.value)
  assert '\n' not in message
  assert f'checkpoint {run} (vision fingerprint {stats["fingerprint"]})' in message
  assert f'run {tmp_path / "other"} initialised from seed 1' in message


def test_a_changed_preparation_field_or_unknown_scan_is_refused(store, run0):
  _, stats = run0
  cfg = load_config(SPEC, _overrides(*store, 'data.image_cache=True', 'data.intensity=percentile'))
  with pytest.raises(ConfigError, match=r"config field data.intensity='percentile': the "
                     r"image-token cache .*\.json was made with 'radfm'"):
    ImageTokenCache.open(store[0], stats['fingerprint'], source='x', data_cfg=cfg.data)
  with pytest.raises(ConfigError, match=r"the image-token cache in .*image_tokens was made by "
                     r"checkpoint .* \(vision fingerprint [0-9a-f]{16}\), not by this run's "
                     r"vision tower \(run R, vision fingerprint 0123\)"):
    ImageTokenCache.open(store[0], '0123', source='run R')
  cache = ImageTokenCache.open(store[0], stats['fingerprint'], source='x')
  with pytest.raises(InputError, match="scan 'nope' is not in the image-token cache"):
    cache.read('nope')
  with pytest.raises(InputError, match=r"scan 'v0_0' was cached resized to \[64, 64, 4\], this "
                     r"batch resizes it to \[32, 32, 4\]"):
    cache.read('v0_0', (32, 32, 4))
  # A scan re-ingested with other content gets a new store key: its cached tokens are refused.
  key = VolumeStore(store[0]).key('v0_0')
  assert cache.meta['keys']['v0_0'] == key == 'scans/v0_0/'
  assert cache.read('v0_0', (64, 64, 4), key=key).shape == (32, 64)
  with pytest.raises(InputError, match=r"scan 'v0_0' changed in the store since its image tokens "
                     r"were cached \(store key scans/v0_0@v1/, cached from scans/v0_0/\); run "
                     r"`radfm-jax cache-images` again"):
    cache.read('v0_0', (64, 64, 4), key='scans/v0_0@v1/')


def test_random_image_path_or_unfrozen_tower_is_refused():
  base = ['data.image_cache=True', "train.freeze=['vision_tower']"]
  with pytest.raises(ConfigError, match=r"config field model.vision.dropout=0.1: expected 0.0 "
                     r"when data.image_cache=True"):
    load_config(SPEC, base)
  with pytest.raises(ConfigError, match=r"config field train.freeze=\['vision', 'fc'\]: expected "
                     r"the vision tower frozen \(add \['perceiver'\]"):
    load_config(SPEC, ['data.image_cache=True', "train.freeze=['vision','fc']",
                       'model.vision.dropout=0.0', 'data.random_crop_2d=False'])
  with pytest.raises(ConfigError, match=r"config field data.random_crop_2d=True: expected False "
                     r"when data.image_cache=True \(cached image tokens are exact only for a "
                     r"deterministic image path\)"):
    load_config(SPEC, base + ['model.vision.dropout=0.0'])


def test_scan_prepared_differently_in_two_samples_is_refused(run0, tmp_path):
  """`radfm` intensity scales a sample's images together: a scan shared by two samples with
  different companions has two prepared forms and no single cached token."""
  from radfm_jax.data.ingest import ingest
  from radfm_jax.train.image_cache import cache_images
  run, _ = run0
  rng = np.random.default_rng(1)
  for name, scale in (('a', 1.0), ('b', 50.0), ('c', 0.1)):
    np.save(tmp_path / f'{name}.npy', (rng.normal(0, 100, (20, 20, 8)) * scale).astype(np.float32))
  records = [{'id': 'one', 'question': 'q?', 'answer': 'a', 'images': [
                 {'path': 'a.npy', 'id': 'a', 'position': {'question': 0}},
                 {'path': 'b.npy', 'id': 'b', 'position': {'question': 0}}]},
             {'id': 'two', 'question': 'q?', 'answer': 'a', 'images': [
                 {'path': 'a.npy', 'id': 'a', 'position': {'question': 0}},
                 {'path': 'c.npy', 'id': 'c', 'position': {'question': 0}}]}]
  ingest(cd.write_manifest(tmp_path / 'm.jsonl', records), str(tmp_path / 'store'),
         log=open(os.devnull, 'w'))
  with pytest.raises(InputError, match=r"scan 'a' is prepared differently in samples 'one' and "
                     r"'two' \(data.intensity='radfm'"):
    cache_images(run, str(tmp_path / 'store'), progress=False)


def test_tokens_made_with_other_companions_are_refused(run0, tmp_path):
  """`radfm` intensity scales a sample's images together, so a scan's tokens depend on the other
  scans of its sample: a sample re-ingested with another companion read the old tokens (made
  under the old joint range) without a word. Each cached scan records the contexts it was
  prepared in (ImageTokenCache.contexts) and a read from another context is refused."""
  from radfm_jax.data.ingest import ingest
  from radfm_jax.train.image_cache import cache_images
  run, _ = run0
  rng = np.random.default_rng(2)
  for name, scale in (('a', 1.0), ('b', 50.0), ('c', 0.1)):
    np.save(tmp_path / f'{name}.npy', (rng.normal(0, 100, (20, 20, 8)) * scale).astype(np.float32))

  def sample(*names):
    return {'id': 'one', 'question': 'q?', 'answer': 'a', 'images': [
        {'path': f'{n}.npy', 'id': n, 'position': {'question': 0}} for n in names]}

  store_dir = str(tmp_path / 'store')
  ingest(cd.write_manifest(tmp_path / 'm1.jsonl', [sample('a', 'b')]), store_dir,
         log=open(os.devnull, 'w'))
  stats = cache_images(run, store_dir, progress=False)
  ingest(cd.write_manifest(tmp_path / 'm2.jsonl', [sample('a', 'c')]), store_dir, replace=True,
         log=open(os.devnull, 'w'))
  store = VolumeStore(store_dir)
  cache = ImageTokenCache.open(store_dir, stats['fingerprint'], source='x')
  hwd = cache.meta['scans']['a']
  (now,) = store.manifest()
  contexts = ImageTokenCache.contexts(now['images'], store, 'radfm')
  with pytest.raises(InputError, match=r"scan 'a' was cached as prepared in another sample "
                     r"context than sample 'one' now gives it"):
    cache.read('a', hwd, key=store.key('a'), context=contexts[0], sample='one')
  before = ImageTokenCache.contexts(sample('a', 'b')['images'], store, 'radfm')
  assert cache.read('a', hwd, key=store.key('a'), context=before[0]).shape == (32, 64)
  # Policies that map each image alone depend on the scan's own modality only.
  alone = ImageTokenCache.contexts(now['images'], store, 'ct_window')
  assert alone[0] == ImageTokenCache.contexts([now['images'][0]], store, 'ct_window')[0]


def test_scan_ids_with_slashes_keep_their_own_tokens(tmp_path):
  """Scan ids may hold '/' (the store percent-encodes them); the cache writes each scan's tokens
  with delete_existing, so a raw `tokens/a/` took `tokens/a/b/` (another scan's) with it."""
  from radfm_jax.config import DataConfig
  cache = ImageTokenCache.create(str(tmp_path), 'fp', checkpoint='ck', data_cfg=DataConfig(),
                                 dtype='float32', num_latents=2, embed=3)
  tokens = {sid: np.full((2, 3), k, np.float32) for k, sid in enumerate(['a/b', 'a', 'a/c/0'])}
  cache.write({'a/b': (tokens['a/b'], (4, 4, 4)), 'a/c/0': (tokens['a/c/0'], (4, 4, 4))})
  cache.write({'a': (tokens['a'], (4, 4, 4))})
  for sid, want in tokens.items():
    np.testing.assert_array_equal(cache.read(sid), want)
  cache.meta['scans']['lost'] = [4, 4, 4]         # listed, never written: one line, not a trace
  with pytest.raises(InputError) as err:
    cache.read('lost')
  assert str(err.value).startswith(f'{cache.meta_path(str(tmp_path), "fp")}: the tokens of scan '
                                   "'lost' cannot be read (NOT_FOUND: ")
  assert str(err.value).endswith('; run `radfm-jax cache-images` again')
  assert 'tensorstore_spec' not in str(err.value)


def test_a_cache_of_an_older_preparation_is_refused(tmp_path):
  """Tokens made before the preparation changed (data/transforms.py; `PREP_VERSION`) stand for
  images this code no longer makes (e.g. a uint8 3D scan was x / 255, now min-max): refused at
  open, although every data field is the same."""
  from radfm_jax.config import DataConfig
  from radfm_jax.data.image_cache import PREP_VERSION
  cache = ImageTokenCache.create(str(tmp_path), 'fp', checkpoint='ck', data_cfg=DataConfig(),
                                 dtype='float32', num_latents=2, embed=3)
  cache.write({'a': (np.ones((2, 3), np.float32), (4, 4, 4))})
  assert ImageTokenCache.open(str(tmp_path), 'fp', source='x', data_cfg=DataConfig()).meta[
      'data']['prep_version'] == PREP_VERSION
  path = cache.meta_path(str(tmp_path), 'fp')
  with open(path) as f:
    meta = json.load(f)
  del meta['data']['prep_version']                    # as written before versions were kept
  with open(path, 'w') as f:
    json.dump(meta, f)
  with pytest.raises(ConfigError, match=rf"the image-token cache .*fp\.json was made by image "
                     rf"preparation version 1, this code prepares images as version "
                     rf"{PREP_VERSION} .*; run `radfm-jax cache-images` again"):
    ImageTokenCache.open(str(tmp_path), 'fp', source='x', data_cfg=DataConfig())


def test_a_cache_is_never_replaced_by_other_settings_and_made_anew_record_first(tmp_path):
  """`cache-images` over a cache of the same tower made with other data settings (another run's:
  a batch size, an intensity policy) replaced it silently (that run's training then refused its
  cache), and a kill while the new tokens were written left the old record naming them: now a
  ConfigError naming the field, the cache as it was. A cache of another preparation version is
  still made anew, its old record removed before any token is written."""
  from radfm_jax.config import DataConfig
  root = str(tmp_path)
  cache = ImageTokenCache.create(root, 'fp', checkpoint='ck', data_cfg=DataConfig(),
                                 dtype='float32', num_latents=2, embed=3)
  cache.write({'a': (np.ones((2, 3), np.float32), (4, 4, 4))})
  path = cache.meta_path(root, 'fp')
  before = open(path).read()
  with pytest.raises(ConfigError) as e:
    ImageTokenCache.create(root, 'fp', checkpoint='ck', data_cfg=DataConfig(batch_size_2d=2),
                           dtype='float32', num_latents=2, embed=3)
  assert str(e.value) == (f'config field data.batch_size_2d=2: the image-token cache {path} of '
                          f'this vision tower was made with {DataConfig().batch_size_2d!r}; '
                          "expected the same data settings (its run's), or remove "
                          f'{path} and {tmp_path}/image_tokens/fp/ to make it anew')
  assert open(path).read() == before
  np.testing.assert_array_equal(cache.read('a'), np.ones((2, 3), np.float32))
  # same settings: kept and added to
  again = ImageTokenCache.create(root, 'fp', checkpoint='ck', data_cfg=DataConfig(),
                                 dtype='float32', num_latents=2, embed=3)
  assert again.meta['scans'] == {'a': [4, 4, 4]}
  # another preparation version: made anew, the old record gone before the first write
  meta = json.loads(before)
  meta['data']['prep_version'] = 0
  with open(path, 'w') as f:
    json.dump(meta, f)
  fresh = ImageTokenCache.create(root, 'fp', checkpoint='ck', data_cfg=DataConfig(),
                                 dtype='float32', num_latents=2, embed=3)
  assert fresh.meta['scans'] == {} and not os.path.exists(path)


def test_a_depth_1_case_stack_caches_the_tokens_its_volume_gives(run0, tmp_path):
  """A RadFM case .npy of depth 1 ([S, 3, H, W, 1], scan attribute `case_index`) is a volume
  whatever its depth (data/transforms.py: `stacked`): min-max over the case, no bicubic step, not
  / 255 when 8-bit. `cache-images` on such cases (two 8-bit images; one float32 image) writes the
  tokens the uncached pipeline's images give the same vision tower in the same batch shapes, bit
  for bit, and not those of the same pixels taken as 2D images."""
  import dataclasses

  import jax

  from radfm_jax import checkpoint, sharding
  from radfm_jax.config import MeshConfig
  from radfm_jax.data import batch as batch_lib
  from radfm_jax.data import pipeline, transforms
  from radfm_jax.data.ingest import ingest
  from radfm_jax.data.tokenizer import Tokenizer
  from radfm_jax.train.image_cache import _encode, cache_images
  run, _ = run0
  rng = np.random.default_rng(5)
  np.save(tmp_path / 'pair.npy', rng.integers(20, 201, (2, 3, 40, 36, 1)).astype(np.uint8))
  np.save(tmp_path / 'one.npy', rng.normal(0, 100, (1, 3, 40, 36, 1)).astype(np.float32))
  records = [{'id': name, 'question': 'What?', 'answer': 'A case.', 'split': 'train',
              'images': [{'path': f'{name}.npy', 'position': {'question': 0}}]}
             for name in ('pair', 'one')]
  store_dir = str(tmp_path / 'store')
  ingest(cd.write_manifest(tmp_path / 'm.jsonl', records), store_dir, log=open(os.devnull, 'w'))
  store = VolumeStore(store_dir)
  entries = {r['id']: r['images'] for r in store.manifest()}
  assert {k: [e['shape'] for e in v] for k, v in entries.items()} == {
      'pair': [[3, 40, 36, 1]] * 2, 'one': [[3, 40, 36, 1]]}
  assert all(store.case_image(e['id']) for v in entries.values() for e in v)

  stats = cache_images(run, store_dir, progress=False)
  assert stats['scans'] == 3 and stats['samples'] == 2
  data_cfg = dataclasses.replace(checkpoint.read_data_config(run), store=store_dir, shuffle=False)
  cache = ImageTokenCache.open(store_dir, stats['fingerprint'], source='x', data_cfg=data_cfg)

  # The tokens without the cache: the pipeline's images through the vision tower, in the
  # pipeline's batches, sharded as cache_images (and training) shard them.
  mesh_cfg = MeshConfig()
  mesh, rules = sharding.make_mesh(mesh_cfg), sharding.rules_for(mesh_cfg)
  model, model_cfg = checkpoint.load(run, mesh=mesh, rules=rules)
  tok = Tokenizer(data_cfg.tokenizer, max_images=data_cfg.max_images,
                  num_latents=model_cfg.perceiver.num_latents)
  n = model_cfg.perceiver.num_latents
  kw = dict(process_index=0, process_count=1, num_epochs=1, records=store.manifest())
  plain = [cd.model_inputs(b) for b in pipeline.make_dataset(data_cfg, model_cfg, store, tok, **kw)]
  cached = list(pipeline.make_dataset(data_cfg, model_cfg, store, tok, image_cache=cache, **kw))
  assert [b['tokens'].tobytes() for b in plain] == [b['tokens'].tobytes() for b in cached]
  put = lambda x: jax.device_put(x, batch_lib.batch_sharding(mesh, rules))  # noqa: E731
  checked = 0
  for p, c in zip(plain, cached):
    assert p['images'].shape[-1] == 4 and p['images'].shape[-3:-1] == (64, 64)   # the 2D bucket
    with sharding.use_mesh(mesh, rules):
      want = np.asarray(jax.device_get(_encode(model, put(p['images']), put(p['image_mask']))))
    for r in range(len(p['images'])):
      for s in np.flatnonzero(p['image_mask'][r]):
        got = c['image_tokens'][r, s * n:(s + 1) * n]
        assert np.abs(got).sum() > 0 and got.tobytes() == want[r, s * n:(s + 1) * n].tobytes()
        checked += 1
  assert checked == 3

  # ... which are the tokens of the volume, not of the same pixels prepared as 2D images
  pair = [store.read(e['id']) for e in entries['pair']]
  shape = (64, 64, 4)
  as_volume = transforms.prepare_images(pair, ['', ''], shape, data_cfg, stacked=[True, True])
  as_2d = transforms.prepare_images(pair, ['', ''], shape, data_cfg)
  assert not np.array_equal(as_volume, as_2d)
  row = next(p['images'][r] for p in plain for r in range(len(p['images']))
             if p['image_mask'][r].sum() == 2)
  assert row.tobytes() == as_volume.tobytes()
