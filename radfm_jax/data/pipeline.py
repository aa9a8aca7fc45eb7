"""Grain pipeline: manifest -> shape buckets -> host-sharded static-shape batches.

    stats = PipelineStats()
    ds = make_dataset(cfg.data, cfg.model, VolumeStore('STORE'), Tokenizer('tok.model'), seed=0,
                      stats=stats)
    it = iter(ds); batch = next(it)          # it.get_state() / it.set_state(state) to resume

Every batch is one dict with exactly the keys of the batch contract (data/batch.py: `KEYS`,
images float32 [B, S, 3, H, W, D], image_mask bool [B, S], tokens / attention_mask / labels int32
[B, L], loss_weights float32 [B, L]); each row is made by `batch.record_inputs`.

B is the per-host batch size of the bucket (`batch_size_2d` for samples whose images are all 2D,
`batch_size_3d` otherwise). A row can be *empty* (all-zero tokens, masks and weights): the last
batch of a bucket is padded this way, and a sample whose scan cannot be read is dropped to an
empty row (counted in `PipelineStats.skipped`, never replaced by noise). Empty rows keep shapes
static and keep every host on the same step, so the loss must divide by max(sum(weights), 1).

Bucketing. A sample's bucket (kind, H, W, D, S, L) is computed from the manifest alone (image
shapes are recorded at ingest) and the tokenized text length: (H, W, D) by the RadFM rules
(transforms.sample_shape), S = image count rounded up to a power of two (capped at
`max_images`), L = the smallest `text_lengths` entry holding the text + EOS (longer texts are
truncated to the largest). Per epoch, with a seeded RNG, each bucket's samples are shuffled and
cut into *global* batches of B * process_count, the global batch order is shuffled, and host p
takes rows [p*B, (p+1)*B) of each: hosts read disjoint samples yet always agree on the bucket,
so `jax.make_array_from_process_local_data` can assemble the global batch. The dataset is a
`MapDataset` over global batch indices, so Grain's iterator state (one integer) resumes exactly.

Mixture (`mixture=`, from `data.mixture` for the train split). Default (None): every sample once
per epoch, so each dataset (the records' `dataset` field) is drawn in proportion to its size, as
the original's concatenated datasets are. With weights {dataset: w}, an epoch still draws N =
len(records) samples: dataset d gets n_d = N * w_d / sum(w) of them and spreads them over its
shape buckets in proportion to its samples there (both rounded by largest remainder, so n_d is
exact to one sample and every epoch has the same number of batches per bucket); each (dataset,
bucket) pool is drawn as successive seeded permutations (no sample twice before every sample of
the pool once; `shuffle=False`: in order, from a rotating start). The drawn samples of a bucket
are shuffled together and cut into batches as above, so a batch mixes datasets but never 2D and
3D. Why not `grain.MapDataset.mix`: it interleaves one flat element stream, while batches here
are cut per shape bucket; sampling indices in the plan keeps a fixed number of batches per epoch
and Grain's one-integer state. `PipelineStats.datasets` counts the samples actually yielded per
dataset; `BatchPlan.targets` holds the intended shares.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import sys
import threading
from typing import Any

import grain
import numpy as np

from radfm_jax.config import ConfigError
from radfm_jax.data import batch as batch_lib
from radfm_jax.data import train_copies, transforms
from radfm_jax.data.image_cache import ImageTokenCache
from radfm_jax.data.manifest import (check_default_groups, dataset_of, read_manifest,
                                     record_place)
from radfm_jax.data.store import VolumeStore, is_url
from radfm_jax.errors import InputError
from radfm_jax.data.tokenizer import Tokenizer

_SKIPPED = '_skipped'   # carried from the workers to the main process, removed before yielding
_DATASETS = '_datasets'   # the dataset of each filled row (likewise)


@dataclasses.dataclass
class PipelineStats:
  """Counts kept in the main process (also with worker processes)."""
  batches: int = 0
  samples: int = 0
  empty_rows: int = 0
  skipped: list[dict] = dataclasses.field(default_factory=list)   # {'sample_id','scan_id','reason'}
  datasets: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def as_dict(self) -> dict:
    return {'batches': self.batches, 'samples': self.samples, 'empty_rows': self.empty_rows,
            'skipped': len(self.skipped), 'datasets': dict(sorted(self.datasets.items()))}

  def shares(self) -> dict[str, float]:
    """{dataset: fraction of the samples yielded so far}."""
    total = sum(self.datasets.values())
    return {k: n / total for k, n in sorted(self.datasets.items())} if total else {}


@dataclasses.dataclass(frozen=True)
class BucketKey:
  kind: str        # '2d' (every image has depth 1) or '3d'
  height: int
  width: int
  depth: int
  images: int      # S
  length: int      # L
  # data.host_dtype='stored', 3D: (carrier dtype, channels) of the bucket's host images, from all
  # its scans (else None); it never splits a bucket.
  carrier: tuple[str, int] | None = None


def plan_notes(plan: 'BatchPlan', records: list[dict], data_cfg) -> list[str]:
  """The lines that say what a BatchPlan leaves out of its samples: texts cut to the largest
  text length (as the original cuts at its max_length), images past data.max_images."""
  notes = []
  if plan.cut:
    index, needed = max(plan.cut, key=lambda c: c[1])
    notes.append(f'data: {len(plan.cut)} of {len(records)} samples need more positions than the '
                 f'largest data.text_lengths entry ({max(data_cfg.text_lengths)}) and are cut to '
                 'it, as the original cuts at its max length (their answers lose their ends); '
                 f'the longest, sample {records[index].get("id")!r}, needs {needed}: a larger '
                 'entry keeps them whole')
  if plan.left_out:
    index, most = max(plan.left_out, key=lambda c: c[1])
    notes.append(f'data: {len(plan.left_out)} of {len(records)} samples name more than '
                 f'data.max_images={data_cfg.max_images} images; the first {data_cfg.max_images} '
                 f'are used, the rest left out (sample {records[index].get("id")!r} names {most})')
  return notes


class BatchPlan:
  """Deterministic per-epoch batch lists; the same on every host, in every worker process."""

  def __init__(self, records: list[dict], data_cfg, tokenizer: Tokenizer, num_latents: int,
               seed: int, process_index: int, process_count: int,
               mixture: dict[str, float] | None = None, dtypes: dict[str, str] | None = None,
               cases: frozenset[str] = frozenset()):
    """`dtypes` ({scan id: stored dtype}, from the store's index): with it, 3D batches carry
    their stored voxels (data.host_dtype='stored') in their bucket's carrier (dtype, channels).
    `cases`: the ids of images of a case stack among them (store.case_image: volumes, never
    resized as 2D images)."""
    self.data_cfg = data_cfg
    self.seed = seed
    self.process_index, self.process_count = process_index, process_count
    self.keys: list[BucketKey] = []
    self.texts: list[tuple[str, str]] = []
    # (record index, positions it needs) of the samples longer than the largest text length:
    # cut to it, as the original cuts at its max_length (make_dataset says so: `plan_notes`)
    self.cut: list[tuple[int, int]] = []
    # (record index, images it names) of the samples with more than data.max_images images: the
    # first max_images are used (docs/data.md), and make_dataset says so (`plan_notes`)
    self.left_out: list[tuple[int, int]] = []
    for i, rec in enumerate(records):
      q, a, n_img = batch_lib.record_text(rec, num_latents, data_cfg.max_images)
      self.texts.append((q, a))
      if len(rec.get('images', [])) > n_img:
        self.left_out.append((i, len(rec['images'])))
      depths = [int(im['shape'][3]) for im in rec.get('images', [])[:n_img]]
      kind = batch_lib.sample_kind(depths)
      h, w, d = batch_lib.image_shape(depths, data_cfg)
      needed = tokenizer.example_length(q, a, source=f'sample {rec.get("id", i)!r}')
      if needed > max(data_cfg.text_lengths):
        self.cut.append((i, needed))
      length = batch_lib.text_length(needed, data_cfg.text_lengths)
      self.keys.append(BucketKey(kind, h, w, d,
                                 batch_lib.image_slots(max(n_img, 1), data_cfg.max_images),
                                 length))
    if dtypes is not None:
      self.keys = self._with_carriers(records, dtypes, cases)
    self.buckets: dict[BucketKey, list[int]] = collections.defaultdict(list)
    for i, key in enumerate(self.keys):
      self.buckets[key].append(i)
    self.datasets = [dataset_of(rec) for rec in records]
    self.sizes = collections.Counter(self.datasets)
    self.mixture = mixture or None
    # draws per epoch of each bucket's datasets: {bucket: {dataset: n}} (None: every sample once)
    self.quota = None if self.mixture is None else self._quotas(self.mixture)
    per_dataset = (self.sizes if self.quota is None else
                   {d: sum(q.get(d, 0) for q in self.quota.values()) for d in self.sizes})
    self.targets = {d: per_dataset[d] / len(records) for d in sorted(self.sizes)}  # intended
    self.num_batches = sum(math.ceil(self._draws(k) / (self.batch_size(k.kind) * process_count))
                           for k in self.buckets)
    self._cache: collections.OrderedDict[int, list] = collections.OrderedDict()
    self._lock = threading.Lock()

  def _with_carriers(self, records, dtypes, cases) -> list[BucketKey]:
    """The 3D keys with the carrier of their bucket: the dtype holding every stored dtype of the
    bucket's scans and their largest channel count (from the manifest and the store index, so
    every host agrees), leaving the bucketing itself unchanged."""
    found = collections.defaultdict(lambda: (set(), 1))
    for rec, key in zip(records, self.keys):
      if key.kind == '3d':
        names, channels = found[key]
        for im in rec['images'][:self.data_cfg.max_images]:
          if im['id'] in dtypes:               # a scan not stored: its row stays empty
            stored = dtypes[im['id']]          # a 2D image: as transforms.prepare_2d gives it
            names.add(transforms.resized_2d_dtype(stored, self.data_cfg, im['id'] in cases).name
                      if int(im['shape'][3]) == 1 else stored)
          channels = max(channels, int(im['shape'][0]))
        found[key] = (names, channels)
    carriers = {k: (transforms.carrier_dtype(sorted(n), self.data_cfg.resize).name, c)
                for k, (n, c) in found.items()}
    return [dataclasses.replace(k, carrier=carriers[k]) if k in carriers else k
            for k in self.keys]

  # Worker processes get a pickled copy: drop the lock and the epoch cache, rebuild them there.
  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k not in ('_cache', '_lock')}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._cache = collections.OrderedDict()
    self._lock = threading.Lock()

  def batch_size(self, kind: str) -> int:
    return batch_lib.kind_batch_size(kind, self.data_cfg)

  def _quotas(self, mixture: dict[str, float]) -> dict:
    """{bucket: {dataset: draws per epoch}}; a ConfigError for a weight the split cannot use."""
    from radfm_jax.config import ConfigError
    here = ', '.join(f'{d} ({n})' for d, n in sorted(self.sizes.items()))
    for name in mixture:
      if name not in self.sizes:
        raise ConfigError(f'config field data.mixture: dataset {name!r} has no samples in this '
                          f'split; expected datasets of the split: {here}')
    for name in sorted(self.sizes):
      if name not in mixture:
        raise ConfigError(f'config field data.mixture: no weight for dataset {name!r} '
                          f'({self.sizes[name]} samples); expected a weight for every dataset '
                          f'of the split ({here}; 0 leaves one out)')
    names = sorted(self.sizes)
    per_dataset = dict(zip(names, largest_remainder(len(self.datasets),
                                                    [mixture[d] for d in names])))
    cells: dict = collections.defaultdict(list)          # (dataset, bucket) -> sample indices
    for i, (d, key) in enumerate(zip(self.datasets, self.keys)):
      cells[d, key].append(i)
    quota: dict = {k: {} for k in self.buckets}
    for d in names:
      keys = sorted((k for dd, k in cells if dd == d), key=dataclasses.astuple)
      for key, n in zip(keys, largest_remainder(per_dataset[d],
                                                [len(cells[d, k]) for k in keys])):
        quota[key][d] = n
    self._cells = {c: np.asarray(v) for c, v in cells.items()}
    return quota

  def _draws(self, key: BucketKey) -> int:
    """Samples drawn from bucket `key` per epoch."""
    return len(self.buckets[key]) if self.quota is None else sum(self.quota[key].values())

  def _bucket_samples(self, key: BucketKey, rng, epoch: int) -> np.ndarray:
    """This epoch's samples of one bucket, in batch order."""
    shuffle = self.data_cfg.shuffle
    if self.quota is None:
      idx = np.asarray(self.buckets[key])
      return rng.permutation(idx) if shuffle else idx
    parts = []
    for d in sorted(self.quota[key]):
      pool, n = self._cells[d, key], self.quota[key][d]
      if n == 0:
        continue
      if shuffle:     # successive permutations: each sample once before any twice
        passes = np.concatenate([rng.permutation(pool) for _ in range(-(-n // len(pool)))])
        parts.append(passes[:n])
      else:           # in order, from a start that moves on each epoch
        parts.append(pool[(epoch * n + np.arange(n)) % len(pool)])
    idx = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return rng.permutation(idx) if shuffle else idx

  def describe(self) -> str:
    """One line: each dataset's samples and intended share (and weight)."""
    if self.mixture is None:
      parts = [f'{d} {self.sizes[d]} ({self.targets[d]:.1%})' for d in sorted(self.sizes)]
      return 'mixture proportional to size (data.mixture empty): ' + ', '.join(parts)
    parts = [f'{d} {self.sizes[d]} weight {self.mixture[d]:g} -> {self.targets[d]:.1%}'
             for d in sorted(self.sizes)]
    return 'mixture (data.mixture): ' + ', '.join(parts)

  def epoch(self, epoch: int) -> list[tuple[BucketKey, list[int]]]:
    """This host's batches of `epoch`: (bucket, sample indices; -1 = empty row)."""
    with self._lock:
      if epoch in self._cache:
        return self._cache[epoch]
    rng = np.random.default_rng([self.seed, epoch])
    shuffle = self.data_cfg.shuffle
    global_batches = []
    for key in sorted(self.buckets, key=dataclasses.astuple):
      idx = self._bucket_samples(key, rng, epoch)
      bs = self.batch_size(key.kind)
      g = bs * self.process_count
      padded = np.full(math.ceil(len(idx) / g) * g, -1)
      padded[:len(idx)] = idx
      for start in range(0, len(padded), g):
        rows = padded[start + self.process_index * bs: start + (self.process_index + 1) * bs]
        global_batches.append((key, [int(r) for r in rows]))
    if shuffle:
      global_batches = [global_batches[i] for i in rng.permutation(len(global_batches))]
    with self._lock:
      self._cache[epoch] = global_batches
      while len(self._cache) > 2:
        self._cache.popitem(last=False)
    return global_batches


def _checked_range(array: np.ndarray) -> tuple[float, float] | None:
  """A float array's transforms.value_range, or a ValueError (the sample is unreadable) when it
  holds NaN / inf: ingest rejects such scans, yet a store changed since would reach the model as
  NaN images (the min-max scales the whole sample by them) and stop the run on a NaN loss naming
  no scan. np.min / np.max propagate NaN and show an inf, so this is the min-max the intensity
  policy needs anyway (`BatchLoader._read` hands it on), not a pass of its own. None for an
  integer (always finite; the policy takes its range itself) or empty array."""
  if array.dtype.kind != 'f' or not array.size:
    return None
  lo, hi = transforms.value_range(array)
  if not (math.isfinite(lo) and math.isfinite(hi)):
    raise ValueError(f'{int((~np.isfinite(array)).sum())} NaN/inf voxels in the stored array; '
                     'expected finite voxels, as ingest stores them')
  return lo, hi


class BatchLoader:
  """Global batch index -> batch dict (runs in Grain threads / worker processes; picklable)."""

  def __init__(self, plan: BatchPlan, records: list[dict], store: VolumeStore,
               tokenizer: Tokenizer, data_cfg, image_cache: ImageTokenCache | None = None,
               copies: list[list[dict | None]] | None = None, augment: bool = False):
    """`copies` (train_copies.choose): per record, per image, the training-resolution copy to
    read instead of the full scan (None: the scan). `augment`: the training crop of 2D images
    (with `data_cfg.random_crop_2d`), drawn from (seed, batch index, row): a resumed iterator
    draws the same crops."""
    self.plan, self.records, self.store = plan, records, store
    self.augment = bool(augment and getattr(data_cfg, 'random_crop_2d', False))
    self.copies = copies
    self.tokenizer, self.data_cfg = tokenizer, data_cfg
    self.image_cache = image_cache
    self.keys = batch_lib.keys(image_cache is not None)
    self.stored_keys = self.keys + ('image_maps',)     # a stored-voxel bucket's row views
    self.token_shape = None if image_cache is None else (
        image_cache.meta['num_latents'], image_cache.meta['embed'], image_cache.meta['dtype'])

  def _read(self, image: dict, copy: dict | None = None, depth: int = 0
            ) -> tuple[np.ndarray, tuple[float, float] | None]:
    """(the scan [C, H, W, D], its range), or with `copy` (its slices of the sample's stack
    depth `depth` [C, h, w, depth]: transforms.resize(scan, (h, w, depth)) bit for bit,
    data/train_copies.py; the full scan's range, stored with it). The range (transforms.
    channel_maps: `ranges`) is the checked min-max of a float scan the policy scales by it
    (`_checked_range`, transforms.takes_range), else None: the policy computes what it needs.
    A float array with NaN / inf voxels is a ValueError."""
    if copy is not None:
      c, _, _, d = (int(v) for v in image['shape'])
      if [copy['shape'][0], copy['shape'][3]] != [c, d]:
        raise ValueError(f'training-resolution copy shape {copy["shape"]} != manifest '
                         f'{image["shape"]} in channels or depth')
      array = self.store.read_copy(copy, transforms.nearest_indices(d, depth))
      _checked_range(array)     # the policy takes the recorded range: the check's own pass
      return array, (copy['min'], copy['max'])
    array = self.store.read(image['id'])
    if list(array.shape) != list(image['shape']):
      raise ValueError(f'stored shape {list(array.shape)} != manifest {image["shape"]}')
    found = _checked_range(array)
    stacked = found is not None and self.store.case_image(image['id'])
    if found is not None and transforms.takes_range(array, str(image.get('modality') or ''),
                                                    self.data_cfg, stacked):
      return array, found
    return array, None

  def __call__(self, index: int, _=None) -> dict[str, Any]:
    epoch, j = divmod(int(index), self.plan.num_batches)
    key, rows = self.plan.epoch(epoch)[j]
    hwd = (key.height, key.width, key.depth)
    batch = batch_lib.empty_batch(len(rows), key.images, hwd, key.length, self.token_shape,
                                  key.carrier)
    row_keys = self.keys if key.carrier is None else self.stored_keys
    batch[_SKIPPED] = []
    batch[_DATASETS] = []
    for r, sample in enumerate(rows):
      if sample < 0:
        continue
      rec = self.records[sample]
      images = rec.get('images', [])[:self.data_cfg.max_images]
      if self.image_cache is not None:       # tokens instead of volumes (a missing one: an error)
        contexts = self.image_cache.contexts(images, self.store, self.data_cfg.intensity)
        tokens = [self.image_cache.read(im['id'], hwd, key=self.store.key(im['id']),
                                        context=context, sample=rec.get('id'))
                  for im, context in zip(images, contexts)]
        batch_lib.record_inputs(rec, [None] * len(images), self.tokenizer, self.data_cfg,
                                text=self.plan.texts[sample], shape=hwd, slots=key.images,
                                length=key.length, out={k: batch[k][r] for k in self.keys},
                                image_tokens=tokens)
        batch[_DATASETS].append(self.plan.datasets[sample])
        continue
      copies = self.copies[sample] if self.copies is not None else [None] * len(images)
      # The original's stack depth (transforms.stack_depth, of the full scans): a copy's slices
      # are read at it, and the resize to the batch's depth goes through it, as the original's.
      stacked_depth = transforms.stack_depth([int(im['shape'][3]) for im in images],
                                             self.data_cfg)
      try:
        read = [self._read(im, c, stacked_depth) for im, c in zip(images, copies)]
      except Exception as e:  # unreadable at train time: count it, leave the row empty
        if not self.data_cfg.drop_unreadable:
          raise
        bad = next((im['id'] for im, c in zip(images, copies)
                    if not self._readable(im, c, stacked_depth)), None)
        reason = f'{type(e).__name__}: {e}'.split(' [tensorstore_spec=')[0]   # drop the spec dump
        batch[_SKIPPED].append({'sample_id': rec.get('id', sample), 'scan_id': bad,
                                'reason': reason})
        continue
      arrays = [array for array, _ in read]
      ranges = [found for _, found in read]     # the min-max `_read` checked: not taken twice
      ranges = ranges if any(r is not None for r in ranges) else None
      crop_rng = (np.random.default_rng([self.plan.seed, int(index), r]) if self.augment
                  else None)
      # (the scans were read, so the index has their rows: a case image is a volume)
      stacked = [self.store.case_image(im['id']) for im in images]
      batch_lib.record_inputs(rec, arrays, self.tokenizer, self.data_cfg,
                              text=self.plan.texts[sample],
                              shape=hwd, slots=key.images, ranges=ranges, crop_rng=crop_rng,
                              length=key.length, out={k: batch[k][r] for k in row_keys},
                              stacked=stacked, stacked_depth=stacked_depth)
      batch[_DATASETS].append(self.plan.datasets[sample])
    return batch

  def _readable(self, image: dict, copy: dict | None, depth: int) -> bool:
    try:
      self._read(image, copy, depth)
      return True
    except Exception:
      return False


class _StatsSink:
  """Main-process map: moves the skip records into PipelineStats and drops the private key."""

  def __init__(self, stats: PipelineStats):
    self.stats = stats

  def __call__(self, batch: dict) -> dict:
    skipped = batch.pop(_SKIPPED, [])
    self.stats.skipped.extend(skipped)
    self.stats.datasets.update(batch.pop(_DATASETS, []))
    self.stats.batches += 1
    real = int(batch['attention_mask'].any(axis=1).sum())
    self.stats.samples += real
    self.stats.empty_rows += batch['tokens'].shape[0] - real
    return batch


def largest_remainder(total: int, weights: list[float]) -> list[int]:
  """`total` split in proportion to `weights` (sum > 0) into integers summing to `total`: the
  floors of the exact quotas, one more for the largest remainders (ties: the earlier weight)."""
  s = float(sum(weights))
  exact = [total * w / s for w in weights]
  out = [math.floor(x) for x in exact]
  for i in sorted(range(len(out)), key=lambda i: (out[i] - exact[i], i))[:total - sum(out)]:
    out[i] += 1
  return out


def _mark_flags_parsed():
  # grain<=0.2.18 workers read absl flags and die with UnparsedFlagAccessError when the host
  # program never called absl.app.run (google/grain#1355).
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_dataset(data_cfg, model_cfg, store: VolumeStore | str | None = None,
                 tokenizer: Tokenizer | str | None = None, *,
                 seed: int = 0, split: str | None = None, process_index: int | None = None,
                 process_count: int | None = None, num_epochs: int | None = None,
                 stats: PipelineStats | None = None, num_threads: int = 2,
                 prefetch: int = 2, records: list[dict] | None = None,
                 image_cache: ImageTokenCache | None = None,
                 mixture: dict[str, float] | None = None, log=None,
                 augment: bool = False) -> grain.IterDataset:
  """The training IterDataset over `store`'s manifest (records with `split`, if given).

  `store` / `tokenizer` default to `data_cfg.store` / `data_cfg.tokenizer` (paths), the manifest to
  `data_cfg.manifest` when set (a JSONL file or a TFDS dataset directory from `radfm-jax
  publish`), else STORE/manifest.jsonl; `records` overrides both.

  `image_cache` (data/image_cache.py; with `data_cfg.image_cache`): batches carry each image's
  cached tokens (`image_tokens`) instead of its volume, which is never read.

  `mixture` ({dataset: weight}; `config.mixture_weights(data_cfg)` for training): each epoch draws
  the datasets in these proportions (module doc); None: every sample once per epoch. A weight for
  a dataset the records lack, or a dataset without a weight, is a ConfigError naming it.

  `data_cfg.host_dtype='stored'`: 3D batches carry the resized stored voxels + `image_maps`
  (data/batch.py); `batch.device_inputs` makes the model's images of them on the device.

  Training-resolution copies (`ingest --train-resolution`, data/train_copies.py; with
  `data_cfg.train_copies`): an image whose batch has a current copy's in-plane size is read
  from that copy (the same inputs bit for bit); a line on `log` (default stderr) says why any
  copy the store holds is not read.

  `augment` (the train split): 2D images are cut by the original's random crop when
  `data_cfg.random_crop_2d` (transforms.prepare_2d); else each is taken whole.

  `num_epochs=None` repeats forever (reshuffled each epoch). Worker processes:
  `data_cfg.num_workers` (0 = threads only). Host shard: jax.process_index()/process_count()
  unless given. The returned dataset has `.stats` (the PipelineStats) and `.plan` attributes.
  """
  store = store if store is not None else data_cfg.store
  if isinstance(store, str):
    if not store:
      raise ConfigError('config field data.store: empty; expected the folder `radfm-jax ingest` '
                        'wrote')
    store = VolumeStore(store)
  tokenizer = tokenizer if tokenizer is not None else data_cfg.tokenizer
  tokenizer_name = (f'the tokenizer data.tokenizer={tokenizer}' if isinstance(tokenizer, str)
                    else 'the tokenizer')
  if isinstance(tokenizer, str):          # '' or a missing file: an InputError naming the field
    tokenizer = Tokenizer(tokenizer, max_images=model_cfg.max_images,
                          num_latents=model_cfg.perceiver.num_latents,
                          source='config field data.tokenizer')
  # The image-marker ids sit right after the tokenizer's pieces (docs/architecture.md), so a
  # model of another vocabulary would read them as other words: a config mistake, told as one.
  if tokenizer.vocab_size != model_cfg.llama.vocab_size:
    raise ConfigError(f'config field model.llama.vocab_size={model_cfg.llama.vocab_size}: '
                      f'{tokenizer_name} has {tokenizer.vocab_size} pieces; expected the same '
                      f'number (--config.model.llama.vocab_size={tokenizer.vocab_size})')
  num_latents = model_cfg.perceiver.num_latents
  if tokenizer.num_latents != num_latents:
    raise ConfigError(f'config field model.perceiver.num_latents={num_latents}: '
                      f'{tokenizer_name} writes {tokenizer.num_latents} image tokens per image; '
                      'expected the same')
  if process_index is None or process_count is None:
    import jax
    process_index, process_count = jax.process_index(), jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} outside [0, {process_count})')
  if not is_url(store.root) and not os.path.isfile(store.scans_path):
    # (read as an empty index, every sample would be skipped as a scan the store lacks)
    raise InputError(f'{store.scans_path}: missing; expected the scan index of a store that '
                     '`radfm-jax ingest` wrote (its folder holds manifest.jsonl and scans.jsonl)')
  manifest = data_cfg.manifest or store.manifest_path
  place = record_place                          # `records` given: 'manifest record N'
  if records is None:
    records = read_manifest(manifest, split)
    in_split = f' of split {split}' if split is not None else ''
    def place(n, field=None):
      return f'{manifest} record {n}{in_split}' + (f' field {field}' if field else '')
  if not records:
    raise ValueError(f'no samples in {manifest} (split={split!r})')
  # A JSONL manifest was checked whole when read; a TFDS directory or `records` is checked here:
  # a dataset named 'default' would share the weight and share/ metrics of those without one.
  check_default_groups(enumerate(records, 1), place, ('dataset',))
  stats = stats if stats is not None else PipelineStats()
  dtypes, cases = None, frozenset()
  if getattr(data_cfg, 'host_dtype', 'float32') == 'stored' and image_cache is None:
    stored = {im['id'] for rec in records for im in rec.get('images', []) if im['id'] in store}
    dtypes = {i: store.info(i)['dtype'] for i in stored}
    cases = frozenset(i for i in stored if store.case_image(i))
  plan = BatchPlan(records, data_cfg, tokenizer, num_latents, seed, process_index, process_count,
                   mixture, dtypes, cases)
  copies, notes = (None, []) if image_cache is not None else train_copies.choose(
      store, records, plan.keys, data_cfg)
  for note in notes + plan_notes(plan, records, data_cfg):
    print(note, file=log or sys.stderr, flush=True)
  loader = BatchLoader(plan, records, store, tokenizer, data_cfg, image_cache, copies, augment)
  ds = grain.MapDataset.range(plan.num_batches).repeat(num_epochs).map_with_index(loader)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                               prefetch_buffer_size=prefetch))
  if data_cfg.num_workers > 0:
    _mark_flags_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers))
  it_ds = it_ds.map(_StatsSink(stats))
  it_ds.stats = stats
  it_ds.plan = plan
  return it_ds
