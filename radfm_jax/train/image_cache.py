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


def cache_images(checkpoint_dir: str, store_dir: str, *, data_cfg=None, step: int | None = None,
                 progress: bool = True) -> dict:
  """Writes the image tokens of every scan in `store_dir`'s manifest made by the checkpoint's
  vision tower. data_cfg: the preparation settings (default: the run's own, from the checkpoint's
  config.json). Returns {'fingerprint', 'scans', 'samples', 'bytes', 'directory'}."""
  model, model_cfg = checkpoint.load(checkpoint_dir, step=step)
  if data_cfg is None:
    data_cfg = checkpoint.read_data_config(checkpoint_dir)
  if data_cfg is None:
    raise ConfigError(f'{checkpoint_dir}: a parameter-only checkpoint records no data settings; '
                      'pass --config with the data section the training run will use')
  store = VolumeStore(store_dir)
  records = read_manifest(data_cfg.manifest or store.manifest_path, None)
  fp = vision_fingerprint(nnx.state(model))
  cache = ImageTokenCache.create(store_dir, fp, checkpoint=checkpoint_dir, data_cfg=data_cfg,
                                 dtype=model_cfg.compute_dtype,
                                 num_latents=model_cfg.perceiver.num_latents,
                                 embed=model_cfg.llama.hidden_size)

  @nnx.jit
  def encode(model, images, mask):
    return model.encode_images(images, mask)          # no rng: no dropout

  made: dict[str, tuple[str, str]] = {}               # scan id -> (prepared-input hash, sample)
  pending: dict[str, tuple[np.ndarray, tuple]] = {}
  it = records
  if progress:
    from tqdm import tqdm
    it = tqdm(records, desc='cache-images', unit='sample', file=sys.stderr, dynamic_ncols=True)
  for rec in it:
    entries = rec.get('images', [])[:data_cfg.max_images]
    if not entries:
      continue
    depths = [int(e['shape'][3]) for e in entries]
    hwd = batch_lib.image_shape(depths, data_cfg)
    slots = batch_lib.image_slots(len(entries), data_cfg.max_images)
    try:
      arrays = [store.read(e['id']) for e in entries]
    except Exception as e:     # the pipeline skips such a sample too: nothing to cache
      print(f'radfm-jax cache-images: sample {rec.get("id")!r} skipped: {type(e).__name__}: '
            f'{str(e).split(" [tensorstore_spec=")[0]}', file=sys.stderr)
      continue
    images = np.zeros((1, slots, 3) + hwd, np.float32)
    transforms.prepare_images(arrays, [str(e.get('modality') or '') for e in entries], hwd,
                              data_cfg, out=images[0])
    mask = np.zeros((1, slots), bool)
    mask[0, :len(entries)] = True
    fresh = []
    for s, e in enumerate(entries):
      digest = hashlib.sha256(images[0, s].tobytes()).hexdigest()
      if e['id'] in made:
        if made[e['id']][0] != digest:
          raise InputError(
              f'{store.manifest_path}: scan {e["id"]!r} is prepared differently in samples '
              f'{made[e["id"]][1]!r} and {rec.get("id")!r} (data.intensity={data_cfg.intensity!r} '
              'scales a sample\'s images together); its image tokens cannot be cached')
      else:
        made[e['id']] = (digest, rec.get('id'))
        fresh.append(s)
    if not fresh:
      continue
    tokens = np.asarray(jax.device_get(encode(model, images, mask)))[0]   # [S*N, E]
    n = model_cfg.perceiver.num_latents
    for s in fresh:
      pending[entries[s]['id']] = (tokens[s * n:(s + 1) * n], hwd)
    if len(pending) >= 64:
      cache.write(pending)
      pending = {}
  cache.write(pending)
  return {'fingerprint': fp, 'scans': len(made), 'samples': len(records),
          'bytes': cache.nbytes_on_disk(), 'directory': cache.directory}


__all__ = ['cache_images', 'open_for_run', 'vision_fingerprint']
