"""Filling and checking the image-token cache (format: data/image_cache.py).

    stats = cache_images('run/', 'STORE')              # `radfm-jax cache-images --checkpoint ...`
    cache = open_for_run(cfg, state.params, 'run/')    # the training loop, data.image_cache=True

`cache_images` loads the checkpoint's parameters, prepares every scan of the store's manifest
exactly as the training pipeline does (the same shape bucket, slots, intensity policy:
`batch.image_shape`, `batch.image_slots`, `transforms.prepare_images`), runs
`RadFM.encode_images` without dropout (one jitted call per sample) and writes each image's
[num_latents, embed] rows. A scan that two samples prepare differently is refused (see the
exactness condition in data/image_cache.py).
"""

from __future__ import annotations

import hashlib
import sys

import jax
import numpy as np
from flax import nnx

from radfm_jax import checkpoint
from radfm_jax.checkpoint.meta import checked_record
from radfm_jax.checkpoint.tree import flat_params
from radfm_jax.config import ConfigError
from radfm_jax.data import batch as batch_lib
from radfm_jax.data import transforms
from radfm_jax.data.image_cache import VISION_GROUPS, ImageTokenCache, fingerprint
from radfm_jax.data.manifest import read_manifest
from radfm_jax.data.store import VolumeStore
from radfm_jax.errors import InputError


def _host(x) -> np.ndarray:
  if getattr(x, 'is_fully_addressable', True):
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def vision_fingerprint(params: nnx.State) -> str:
  """The fingerprint (data/image_cache.py) of the vision tower in a model's parameter State."""
  flat = flat_params(nnx.to_pure_dict(params))
  return fingerprint((p, _host(a)) for p, a in flat.items() if p.split('/')[0] in VISION_GROUPS)


def open_for_run(cfg, params: nnx.State, source: str) -> ImageTokenCache:
  """The cache of this run's (frozen) vision tower in `cfg.data.store`; ConfigError when the
  store holds none for these weights (a stale cache) or was made with other data settings."""
  if not cfg.data.store:
    raise ConfigError('config field data.image_cache=True: expected data.store (the store that '
                      '`radfm-jax cache-images` filled), got none')
  return ImageTokenCache.open(cfg.data.store, vision_fingerprint(params), source=source,
                              data_cfg=cfg.data, model_cfg=cfg.model)


@nnx.jit
def _encode(model, images, mask):
  """[B, S, C, H, W, D] images, [B, S] mask -> [B, S * num_latents, embed] tokens. One jitted
  function for every call: another store (or call) with the same model reuses compiled buckets."""
  return model.encode_images(images, mask)          # no rng: no dropout


def cache_images(checkpoint_dir: str, store_dir: str, *, data_cfg=None, mesh_cfg=None,
                 step: int | None = None, progress: bool = True) -> dict:
  """Writes the image tokens of every scan in `store_dir`'s manifest made by the checkpoint's
  vision tower. data_cfg: the preparation settings (default: the run's own, from the checkpoint's
  config.json); mesh_cfg: the training run's mesh (default: one fsdp axis over every device, as
  the `cpu` preset). Returns {'fingerprint', 'scans', 'samples', 'bytes', 'directory'}.

  Samples are encoded in the training pipeline's buckets and batch sizes (`batch.kind_batch_size`
  rows, padded with empty rows), sharded over the mesh as training shards a batch, so each device
  runs the vision tower on the same shapes as in the training step: XLA then computes each row's
  tokens with the same operations, bit for bit.
  """
  from radfm_jax import sharding
  from radfm_jax.config import MeshConfig
  checked_record(checkpoint_dir)          # a checkpoint at all, before its data section
  if data_cfg is None:
    data_cfg = checkpoint.read_data_config(checkpoint_dir)
  if data_cfg is None:
    raise ConfigError(f'{checkpoint_dir}: a parameter-only checkpoint records no data settings; '
                      'pass --config with the data section the training run will use')
  mesh_cfg = mesh_cfg or MeshConfig()
  mesh, rules = sharding.make_mesh(mesh_cfg), sharding.rules_for(mesh_cfg)
  model, model_cfg = checkpoint.load(checkpoint_dir, step=step, mesh=mesh, rules=rules)
  store = VolumeStore(store_dir)
  records = read_manifest(data_cfg.manifest or store.manifest_path, None)
  fp = vision_fingerprint(nnx.state(model))
  cache = ImageTokenCache.create(store_dir, fp, checkpoint=checkpoint_dir, data_cfg=data_cfg,
                                 dtype=model_cfg.compute_dtype,
                                 num_latents=model_cfg.perceiver.num_latents,
                                 embed=model_cfg.llama.hidden_size)
  n = model_cfg.perceiver.num_latents
  shards = batch_lib.batch_shards(mesh, rules)

  # The pipeline's buckets (data/pipeline.py BatchPlan), from the manifest's shapes alone.
  buckets: dict[tuple, list[dict]] = {}
  for rec in records:
    entries = rec.get('images', [])[:data_cfg.max_images]
    if entries:
      depths = [int(e['shape'][3]) for e in entries]
      key = (batch_lib.sample_kind(depths), batch_lib.image_shape(depths, data_cfg),
             batch_lib.image_slots(len(entries), data_cfg.max_images))
      buckets.setdefault(key, []).append(rec)
  made: dict[str, tuple[str, str]] = {}               # scan id -> (prepared-input hash, sample)
  seen: dict[str, set[str]] = {}                      # scan id -> contexts it was prepared in
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=len(records), desc='cache-images', unit='sample', file=sys.stderr,
               dynamic_ncols=True)
  for (kind, hwd, slots), recs in sorted(buckets.items()):
    rows = batch_lib.kind_batch_size(kind, data_cfg)
    for start in range(0, len(recs), rows):
      chunk = recs[start:start + rows]
      images = np.zeros((rows, slots, 3) + hwd, np.float32)
      mask = np.zeros((rows, slots), bool)
      fresh = []                                       # (row, slot, scan id, context)
      for r, rec in enumerate(chunk):
        fresh += _prepare(rec, store, data_cfg, hwd, images[r], mask[r], made, r, seen)
      if bar is not None:
        bar.update(len(chunk))
      if not fresh:
        continue
      put = lambda x: jax.device_put(x, batch_lib.batch_sharding(mesh, rules) if rows % shards  # noqa: E731
                                     == 0 else None)
      with sharding.use_mesh(mesh, rules):
        tokens = np.asarray(jax.device_get(_encode(model, put(images), put(mask))))
      cache.write({scan: (tokens[r, s * n:(s + 1) * n], hwd) for r, s, scan, _ in fresh},
                  keys={scan: store.key(scan) for _, _, scan, _ in fresh},
                  contexts={scan: seen[scan] for _, _, scan, _ in fresh})
  if bar is not None:
    bar.close()
  cache.add_contexts(seen)          # the contexts met after a scan's tokens were written
  return {'fingerprint': fp, 'scans': len(made), 'samples': len(records),
          'bytes': cache.nbytes_on_disk(), 'directory': cache.directory}


def _prepare(rec, store, data_cfg, hwd, images, mask, made, row, seen) -> list[tuple]:
  """Reads and prepares one sample's scans into `images` [S, 3, H, W, D] / `mask` [S] as the
  pipeline does; returns (row, slot, scan id, its `ImageTokenCache.contexts` entry) of the
  scans not cached yet, and adds each scan's context to `seen`. A scan prepared
  differently by an earlier sample is an InputError; an unreadable one skips the sample, as the
  pipeline skips it."""
  entries = rec.get('images', [])[:data_cfg.max_images]
  try:
    arrays = [store.read(e['id']) for e in entries]
  except Exception as e:
    print(f'radfm-jax cache-images: sample {rec.get("id")!r} skipped: {type(e).__name__}: '
          f'{str(e).split(" [tensorstore_spec=")[0]}', file=sys.stderr)
    return []
  transforms.prepare_images(arrays, [str(e.get('modality') or '') for e in entries], hwd,
                            data_cfg, out=images,
                            stacked=[store.case_image(e['id']) for e in entries])
  mask[:len(entries)] = True
  contexts = ImageTokenCache.contexts(entries, store, data_cfg.intensity)
  fresh = []
  for s, e in enumerate(entries):
    seen.setdefault(e['id'], set()).add(contexts[s])
    digest = hashlib.sha256(images[s].tobytes()).hexdigest()
    if e['id'] not in made:
      made[e['id']] = (digest, rec.get('id'))
      fresh.append((row, s, e['id'], contexts[s]))
    elif made[e['id']][0] != digest:
      raise InputError(
          f'{store.manifest_path}: scan {e["id"]!r} is prepared differently in samples '
          f'{made[e["id"]][1]!r} and {rec.get("id")!r} (data.intensity={data_cfg.intensity!r} '
          "scales a sample's images together); its image tokens cannot be cached")
  return fresh


__all__ = ['cache_images', 'open_for_run', 'vision_fingerprint']
