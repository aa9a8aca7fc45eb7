"""The image-token cache: each scan's image tokens (the vision path's output), stored beside the
volumes so a run whose vision tower is frozen reads tokens instead of volumes and skips it.

    cache = ImageTokenCache.create('STORE', fingerprint, checkpoint='run/', data_cfg=cfg.data,
                                   dtype='float32', num_latents=32, embed=5120)
    cache.write({'scan1': (tokens [32, embed], (H, W, D)), ...})     # one transaction
    cache = ImageTokenCache.open('STORE', fingerprint)               # ConfigError if none / stale
    cache.read('scan1')                                              # [32, embed]

What is cached is `RadFM.encode_images` of one image, before the rows of one sample are
concatenated and spliced into the text embedding (models/radfm.py: `encode_images` ->
`splice_image_tokens`): image s of a sample gives rows [s*32, (s+1)*32) of its `image_tokens`.

On disk (keyed by checkpoint identity, then scan):

    STORE/image_tokens/<fingerprint>.json   checkpoint, fingerprint, dtype, sizes, the data fields
                                            the image path depends on, and per scan the (H, W, D)
                                            it was resized to and the store key of the scan
                                            version it was made from (`keys`)
    STORE/image_tokens/<fingerprint>/       OCDBT kvstore; scan <id> is the zarr3 array
                                            `tokens/<id, percent-encoded>/` [num_latents, embed]

The fingerprint is the SHA-256 of the vision tower's parameters (vision, perceiver, fc: paths,
dtypes, shapes, bytes), so a cache belongs to the weights that made it, whatever folder they sit
in; a run whose frozen tower hashes differently finds no cache and is told which checkpoints the
store holds caches of.

Exactness condition: a cached token equals the one the run would compute only if the image path
is deterministic. That means (1) no randomness in the vision forward: `model.vision.dropout` = 0
(config validation refuses `data.image_cache` otherwise; no random augmentation exists in the
pipeline, and any future augmentation field must join `config.IMAGE_CACHE_DETERMINISTIC`),
(2) the same preparation: the data fields in `PREP_FIELDS` equal the cache's (checked at open),
each scan resized to the same (H, W, D) and still the version the tokens were made from (a
re-ingested, changed scan has a new store key: data/store.py; both checked per read), and every
sample preparing a scan the same way (checked while caching: `radfm` intensity scales a sample's
images together, so a scan shared by samples with different companions cannot be cached; and per
read: each scan records the `contexts` it was prepared in, the versions and modalities of the
scans its image depends on, so a sample whose other images or modality changed since is
refused); (3) bit-exactness also needs the
encoder run on the training step's per-device shapes: `train.image_cache.cache_images` encodes in
the pipeline's buckets and batch sizes, sharded over the run's mesh (`--config`), since XLA may
sum a matmul in another order for another number of rows (a 1-ulp loss difference when it did
not). A different mesh or batch size at training time stays within rounding, not bit-exact.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.parse
from typing import Iterable

import numpy as np
import tensorstore as ts

from radfm_jax.config import ConfigError
from radfm_jax.data.store import write_bytes
from radfm_jax.errors import writing
from radfm_jax.errors import InputError

CACHE_DIR = 'image_tokens'
# The data fields the prepared image of a scan depends on (data/transforms.py, data/batch.py).
PREP_FIELDS = ('intensity', 'resize', 'resize_2d', 'image_size_2d', 'image_size_3d_single',
               'depth_buckets', 'batch_size_2d', 'batch_size_3d', 'max_images', 'ct_windows',
               'percentiles')
VISION_GROUPS = ('vision', 'perceiver', 'fc')
# The preparation code's version (data/transforms.py), kept with the `PREP_FIELDS`: raised when
# the same fields come to prepare a scan differently, so tokens of the old images are refused at
# open instead of silently standing for the new ones. 1 (none recorded): before 2. 2: uint8 3D
# scans min-max scaled under data.intensity='radfm' (were x / 255), 8-bit 2D images divided by
# 255 exactly as ToTensor (were 1 ulp off). 3: an image of a case stack of depth 1 prepared as a
# volume (min-max, no bicubic step; was a 2D image). Whether a scan is one comes from its stored
# attributes (store.case_image), fixed for its store key, so the `contexts` (which hold the key)
# need not name it. 4: the min-max / window / percentile map divides by (high - low) as the
# original does (was a product by its float32 reciprocal: 1 ulp off for some voxels).
PREP_VERSION = 4


def fingerprint(flat_params: Iterable[tuple[str, np.ndarray]]) -> str:
  """SHA-256 (hex, 16 chars) of the vision tower's (path, array) pairs: paths under
  `VISION_GROUPS`, sorted; each hashed with its dtype, shape and bytes."""
  h = hashlib.sha256()
  for path, array in sorted((p, a) for p, a in flat_params if p.split('/')[0] in VISION_GROUPS):
    array = np.ascontiguousarray(array)
    h.update(f'{path}|{array.dtype.name}|{list(array.shape)}\n'.encode())
    h.update(array.tobytes())
  return h.hexdigest()[:16]


def prep_settings(data_cfg) -> dict:
  """The `PREP_FIELDS` of a DataConfig as JSON data, with the `PREP_VERSION` they hold for."""
  settings = {f: json.loads(json.dumps(getattr(data_cfg, f))) for f in PREP_FIELDS}
  return dict(settings, prep_version=PREP_VERSION)


def _spec(kvstore: dict, scan_id: str, shape=None, dtype: str | None = None) -> dict:
  # The id percent-encoded, as the store's keys (store.VolumeStore._new_key): written raw, the
  # tokens of scan 'a' (created with delete_existing) would delete those of scan 'a/b'.
  name = urllib.parse.quote(scan_id, safe='')
  spec = {'driver': 'zarr3', 'kvstore': kvstore, 'path': f'tokens/{name}/'}
  if shape is not None:
    spec['metadata'] = {
        'shape': list(shape), 'data_type': dtype,
        'chunk_grid': {'name': 'regular', 'configuration': {'chunk_shape': list(shape)}},
        'codecs': [{'name': 'bytes', 'configuration': {'endian': 'little'}},
                   {'name': 'zstd', 'configuration': {'level': 3}}]}
  return spec


class ImageTokenCache:
  """One checkpoint's tokens in one store (picklable: Grain workers reopen the handles)."""

  def __init__(self, store_root: str, meta: dict):
    self.root = os.path.abspath(store_root)
    self.meta = meta
    self._ctx = None

  def __getstate__(self):
    return {'root': self.root, 'meta': self.meta}

  def __setstate__(self, state):
    self.__init__(state['root'], state['meta'])

  @property
  def fingerprint(self) -> str:
    return self.meta['fingerprint']

  @property
  def directory(self) -> str:
    return os.path.join(self.root, CACHE_DIR, self.fingerprint)

  @property
  def kvstore(self) -> dict:
    return {'driver': 'ocdbt', 'base': f'file://{self.directory}/'}

  @staticmethod
  def contexts(entries: list[dict], store, intensity: str) -> list[str]:
    """The preparation context of each of a sample's scans: a sha256 of the (scan id, store key,
    modality) its prepared image depends on. `radfm` intensity scales a sample's images together
    (transforms.channel_maps), so there it is every entry's, in order; the other policies map
    each image alone, by its own modality. A scan's tokens hold only for the context they were
    made in: recorded at write, compared at read."""
    items = [(e['id'], store.key(e['id']), str(e.get('modality') or '')) for e in entries]
    if intensity == 'radfm':
      joint = hashlib.sha256(json.dumps(items).encode()).hexdigest()
      return [joint] * len(items)
    return [hashlib.sha256(json.dumps([item]).encode()).hexdigest() for item in items]

  @staticmethod
  def meta_path(store_root: str, fp: str) -> str:
    return os.path.join(os.path.abspath(store_root), CACHE_DIR, f'{fp}.json')

  @classmethod
  def create(cls, store_root: str, fp: str, *, checkpoint: str, data_cfg, dtype: str,
             num_latents: int, embed: int) -> 'ImageTokenCache':
    meta = {'fingerprint': fp, 'checkpoint': checkpoint, 'dtype': dtype,
            'num_latents': num_latents, 'embed': embed, 'data': prep_settings(data_cfg),
            'scans': {}}
    previous = cls.meta_path(store_root, fp)
    if os.path.exists(previous):       # the same weights: keep what is there, add to it
      with open(previous) as f:
        old = json.load(f)
      old_data = old.get('data') if isinstance(old.get('data'), dict) else {}
      for field in PREP_FIELDS:
        # Another run's settings: replacing its tokens would leave that run without its cache
        # (its training refuses the new settings), and mixing them would feed it others' tokens.
        if field in old_data and old_data[field] != meta['data'][field]:
          raise ConfigError(
              f'config field data.{field}={meta["data"][field]!r}: the image-token cache '
              f'{previous} of this vision tower was made with {old_data[field]!r}; expected the '
              f'same data settings (its run\'s), or remove {previous} and '
              f'{os.path.join(os.path.dirname(previous), fp)}/ to make it anew')
      if {k: old.get(k) for k in ('dtype', 'num_latents', 'embed', 'data')} == \
         {k: meta[k] for k in ('dtype', 'num_latents', 'embed', 'data')}:
        for field in ('scans', 'keys', 'contexts'):    # (keys were dropped here: a later
          if field in old:                              # read named no version at all)
            meta[field] = old[field]
      else:
        # Made anew (another preparation version, another compute dtype): the old record goes
        # first, so that a run killed while the new tokens replace the old ones leaves no
        # record naming tokens it does not describe (no cache: `open` says so).
        with writing(previous):
          os.remove(previous)
    return cls(store_root, meta)

  @classmethod
  def caches(cls, store_root: str) -> dict[str, dict]:
    """fingerprint -> metadata of every cache in the store."""
    folder = os.path.join(os.path.abspath(store_root), CACHE_DIR)
    out = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
      if name.endswith('.json'):
        with open(os.path.join(folder, name)) as f:
          out[name[:-5]] = json.load(f)
    return out

  @classmethod
  def open(cls, store_root: str, fp: str, *, source: str, data_cfg=None,
           model_cfg=None) -> 'ImageTokenCache':
    """The cache of the vision tower with fingerprint `fp` (`source` names that tower in errors:
    a checkpoint or a run). A store without one (a stale cache: made by other weights) is a
    one-line ConfigError naming both; so is a data field the cached preparation differs in."""
    path = cls.meta_path(store_root, fp)
    if not os.path.exists(path):
      others = cls.caches(store_root)
      made = '; '.join(f'checkpoint {m["checkpoint"]} (vision fingerprint {k})'
                       for k, m in others.items()) or 'no checkpoint'
      raise ConfigError(
          f'config field data.image_cache=True: the image-token cache in '
          f'{os.path.join(os.path.abspath(store_root), CACHE_DIR)} was made by {made}, not by '
          f'this run\'s vision tower ({source}, vision fingerprint {fp}); run `radfm-jax '
          f'cache-images --checkpoint <this run> --data {store_root}`')
    with open(path) as f:
      cache = cls(store_root, json.load(f))
    if data_cfg is not None:
      now = prep_settings(data_cfg)
      for field in PREP_FIELDS:
        if now[field] != cache.meta['data'][field]:
          raise ConfigError(f'config field data.{field}={now[field]!r}: the image-token cache '
                            f'{path} was made with {cache.meta["data"][field]!r}')
    made = cache.meta['data'].get('prep_version', 1)
    if made != PREP_VERSION:
      raise ConfigError(f'config field data.image_cache=True: the image-token cache {path} was '
                        f'made by image preparation version {made}, this code prepares images '
                        f'as version {PREP_VERSION} (data/transforms.py changed); run '
                        f'`radfm-jax cache-images` again')
    if model_cfg is not None:
      n = model_cfg.perceiver.num_latents
      e = model_cfg.llama.hidden_size
      if (n, e, model_cfg.compute_dtype) != (cache.meta['num_latents'], cache.meta['embed'],
                                             cache.meta['dtype']):
        raise ConfigError(f'config field model: tokens [{n}, {e}] {model_cfg.compute_dtype} '
                          f'but the image-token cache {path} holds [{cache.meta["num_latents"]}, '
                          f'{cache.meta["embed"]}] {cache.meta["dtype"]}')
    return cache

  def _context(self) -> ts.Context:
    if self._ctx is None:
      self._ctx = ts.Context({'cache_pool': {'total_bytes_limit': 0}})
    return self._ctx

  # ---------------------------------------------------------------------------------------------

  def write(self, items: dict[str, tuple[np.ndarray, tuple[int, int, int]]],
            keys: dict[str, str] | None = None, contexts: dict[str, str] | None = None):
    """{scan id: (tokens [num_latents, embed], resized (H, W, D))} in one transaction, then the
    metadata (written last, atomically: a crash leaves the previous metadata). `keys`: {scan id:
    the store key (VolumeStore.key) of the scan version the tokens were made from}. A write the
    filesystem refuses (full, read-only) is a one-line WriteError naming the folder or file;
    the metadata then still lists only the scans whose tokens were committed before.
    `contexts`: {scan id: the `contexts` it was prepared in, each giving these tokens}."""
    if not items:
      return
    shape = (self.meta['num_latents'], self.meta['embed'])
    for scan_id, (tokens, _) in items.items():
      if tuple(tokens.shape) != shape:
        raise ValueError(f'scan {scan_id}: tokens {tokens.shape}, expected {shape}')
    with writing(self.directory + '/'):
      os.makedirs(self.directory, exist_ok=True)
      txn = ts.Transaction()
      futures = []
      for scan_id, (tokens, _) in items.items():
        arr = ts.open(_spec(self.kvstore, scan_id, shape, self.meta['dtype']), create=True,
                      delete_existing=True, context=self._context(), transaction=txn).result()
        futures.append(arr.write(np.asarray(tokens)))
      for f in futures:
        f.result()
      txn.commit_async().result()
    meta = json.loads(json.dumps(self.meta))       # the listed scans change only once written
    for scan_id, (_, hwd) in items.items():
      meta['scans'][scan_id] = [int(v) for v in hwd]
      if keys is not None:
        meta.setdefault('keys', {})[scan_id] = keys[scan_id]
      if contexts is not None:
        meta.setdefault('contexts', {})[scan_id] = sorted(contexts[scan_id])
    write_bytes(self.meta_path(self.root, self.fingerprint), json.dumps(meta).encode())
    self.meta.update(meta)

  def add_contexts(self, contexts: dict[str, set[str]]):
    """Adds contexts of scans already cached (a scan shared by samples that prepare it the same
    way, e.g. 8-bit images, which `radfm` scales by 0..255 whatever the sample): metadata only."""
    if not contexts:
      return
    meta = json.loads(json.dumps(self.meta))
    known = meta.setdefault('contexts', {})
    for scan_id, found in contexts.items():
      if scan_id in meta['scans']:
        known[scan_id] = sorted(set(known.get(scan_id, [])) | set(found))
    with writing(self.meta_path(self.root, self.fingerprint)):
      write_bytes(self.meta_path(self.root, self.fingerprint), json.dumps(meta).encode())
    self.meta.update(meta)

  def read(self, scan_id: str, hwd=None, key: str | None = None, context: str | None = None,
           sample=None) -> np.ndarray:
    """[num_latents, embed] tokens of `scan_id`; `hwd`, when given, must be the (H, W, D) the scan
    was cached at, `key` the store key of the version it was cached from, and `context` (of the
    reading `sample`) the one it was prepared in (InputError otherwise, as for a scan not in the
    cache; a cache written before contexts were recorded is not checked for them)."""
    cached = self.meta['scans'].get(scan_id)
    where = self.meta_path(self.root, self.fingerprint)
    if cached is None:
      raise InputError(f'{where}: scan {scan_id!r} is not in the image-token cache; run '
                       f'`radfm-jax cache-images` again after ingesting it')
    if hwd is not None and list(cached) != [int(v) for v in hwd]:
      raise InputError(f'{where}: scan {scan_id!r} was cached resized to {cached}, this batch '
                       f'resizes it to {[int(v) for v in hwd]}')
    made_from = self.meta.get('keys', {}).get(scan_id)
    if key is not None and made_from != key:
      raise InputError(f'{where}: scan {scan_id!r} changed in the store since its image tokens '
                       f'were cached (store key {key}, cached from {made_from}); run '
                       f'`radfm-jax cache-images` again')
    made_in = self.meta.get('contexts', {}).get(scan_id)
    if context is not None and made_in is not None and context not in made_in:
      raise InputError(f'{where}: scan {scan_id!r} was cached as prepared in another sample '
                       f'context than sample {sample!r} now gives it (its other images, their '
                       'versions or its modality changed: data.intensity prepares them '
                       'together); run `radfm-jax cache-images` again')
    try:
      return ts.open(_spec(self.kvstore, scan_id), open=True,
                     context=self._context()).result().read().result()
    except ValueError as e:         # listed but not readable (lost, or written by an older layout)
      reason = str(e).split(' [tensorstore_spec=')[0]
      raise InputError(f'{where}: the tokens of scan {scan_id!r} cannot be read ({reason}); run '
                       '`radfm-jax cache-images` again') from None

  def nbytes_on_disk(self) -> int:
    total = os.path.getsize(self.meta_path(self.root, self.fingerprint))
    for folder, _, files in os.walk(self.directory):
      total += sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    return total


__all__ = ['CACHE_DIR', 'ImageTokenCache', 'PREP_FIELDS', 'PREP_VERSION', 'VISION_GROUPS',
           'fingerprint', 'prep_settings']
