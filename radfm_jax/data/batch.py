"""THE batch contract: the keys, dtypes and shapes the model and the steps take, and the one way a
manifest record becomes model inputs.

A training / eval batch is one dict with exactly `KEYS`:

    images          float32 [B, S, 3, H, W, D]  values in [0, 1]; zeros where image_mask is False
    image_mask      bool    [B, S]              True on real images
    tokens          int32   [B, L]              BOS + text, EOS after the last real token, pad 0
    attention_mask  int32   [B, L]              1 on real tokens (0 on the EOS and on padding)
    labels          int32   [B, L]              IGNORE (-100) on question, pad and image ids
    loss_weights    float32 [B, L]              1.0 where labels != IGNORE

With `data.image_cache` (data/image_cache.py) the batch holds, instead of `images`,

    image_tokens    float   [B, S*N, E]         the vision path's output (N = 32 latents, E = the
                                                decoder width; image s = rows [s*N, (s+1)*N)),
                                                zeros on padding images; dtype model.compute_dtype

and the model skips the vision tower (`keys(image_cache)` is the key tuple of either kind).

With `data.host_dtype='stored'` a 3D batch leaves the host as

    images          uint8 / int16 / float32 [B, S, C, H, W, D]   the resized stored voxels
    image_maps      float32 [B, S, 3, 4]        per output channel (source channel, low, range,
                                                clip): transforms.map_coefficients

and `device_inputs` (on the device, after the transfer) turns it into the float32 `images`
above, bit for bit what the host would have written (`host_keys(batch)`: the keys to transfer).

B = rows, S = image slots, (H, W, D) = the RadFM shape bucket, L = text length. A generation batch
holds the same images / image_mask and left-padded prompt tokens / attention_mask (no labels).

    q, a, n = record_text(record, num_latents, max_images)          # text with image blocks
    row = record_inputs(record, arrays, tokenizer, data_cfg)        # one row of the batch above
    row = record_inputs(record, arrays, tokenizer, data_cfg, generation=True)   # a prompt row

`record_inputs` is the record -> inputs function of the training pipeline (data/pipeline.py), the
demo's held-out generation and the eval harness (through `record_text` + infer/text.py, whose
free-text prompts go through the same `encode_sample`). The batch is sharded over its leading axis
by the `act_batch` rule of the logical rule table (`batch_spec`), so the mesh preset decides it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from radfm_jax.data import prompts, transforms

IGNORE = -100
KEYS = ('images', 'image_mask', 'tokens', 'attention_mask', 'labels', 'loss_weights')
TEXT_KEYS = ('tokens', 'attention_mask', 'labels', 'loss_weights')
CACHED_KEYS = ('image_tokens', 'image_mask') + TEXT_KEYS


def keys(image_cache: bool = False) -> tuple[str, ...]:
  """The keys of a batch: `CACHED_KEYS` when it carries cached image tokens, else `KEYS`."""
  return CACHED_KEYS if image_cache else KEYS


def host_keys(batch: dict) -> tuple[str, ...]:
  """The keys a host batch sends to the device: `keys(...)`, plus `image_maps` when its images
  are stored voxels (data.host_dtype='stored'; `device_inputs` applies them there)."""
  return keys('image_tokens' in batch) + (('image_maps',) if 'image_maps' in batch else ())


def _expand(images, maps):
  import jax.numpy as jnp
  from jax import lax
  src = maps[..., 0].astype(jnp.int32)[..., None, None, None]        # [B, S, 3, 1, 1, 1]
  lo, width, clip = (maps[..., i][..., None, None, None] for i in (1, 2, 3))
  x = jnp.take_along_axis(images, src, axis=2).astype(jnp.float32)  # [B, S, 3, H, W, D]
  # A division, as the host and the original: a product by 1 / width is 1 ulp off for some
  # voxels, and XLA's algebraic simplifier makes exactly that of A / broadcast(B), so the
  # divisor is broadcast behind an optimization barrier (one float32 array of the images' shape,
  # once per batch). An empty range (and an empty slot's zero map) is 0, where 0 / 0 is NaN.
  divisor = lax.optimization_barrier(jnp.broadcast_to(jnp.where(width > 0, width, 1.0), x.shape))
  y = jnp.where(width > 0, (x - lo) / divisor, 0.0)
  return jnp.where(clip > 0, jnp.clip(y, 0.0, 1.0), y)


_EXPAND = None


def device_inputs(batch: dict) -> dict:
  """A batch on the device -> the model's inputs: stored voxels + `image_maps` become float32
  images [B, S, 3, H, W, D] in [0, 1] (transforms.map_coefficients: (x - low) / range, clipped
  where the policy clips; the batch-axis sharding is kept); any other batch is returned as is."""
  if 'image_maps' not in batch:
    return batch
  global _EXPAND
  if _EXPAND is None:
    import jax
    _EXPAND = jax.jit(_expand)
  out = {k: v for k, v in batch.items() if k != 'image_maps'}
  out['images'] = _EXPAND(batch['images'], batch['image_maps'])
  return out
DTYPES = {'images': np.float32, 'image_mask': np.bool_, 'tokens': np.int32,
          'attention_mask': np.int32, 'labels': np.int32, 'loss_weights': np.float32}


# ------------------------------------------------------------------------------------------------
# Sharding (imports JAX lazily: Grain worker processes import this module for the constants)


def batch_spec(rules):
  """PartitionSpec of every batch array: the leading (batch) axis by the `act_batch` rule of
  `rules` (a table of sharding.LOGICAL_RULES), the other axes replicated."""
  from radfm_jax import sharding
  return sharding.logical_to_spec(('act_batch',), rules)


def batch_sharding(mesh, rules):
  """NamedSharding of every batch array on `mesh` (see `batch_spec`)."""
  from jax.sharding import NamedSharding
  return NamedSharding(mesh, batch_spec(rules))


def batch_shards(mesh, rules) -> int:
  """How many ways the batch axis is split on `mesh` (global batches must be a multiple)."""
  axes = batch_spec(rules)[0]
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64))


# ------------------------------------------------------------------------------------------------
# Shapes


def empty_batch(rows: int, slots: int, image_shape: Sequence[int], length: int,
                token_shape: tuple[int, int, str] | None = None,
                carrier: tuple[str, int] | None = None) -> dict:
  """A batch of `rows` empty rows (all-zero images, masks, tokens and weights; labels IGNORE):
  images [rows, slots, 3, H, W, D], the text arrays [rows, length]. With `token_shape` =
  (latents N, embed E, dtype): image_tokens [rows, slots * N, E] instead of images. With
  `carrier` = (dtype, channels C) (data.host_dtype='stored'): images [rows, slots, C, H, W, D] in
  that dtype and image_maps [rows, slots, 3, 4] (zero maps: empty slots become zeros)."""
  h, w, d = (int(v) for v in image_shape)
  if carrier is not None:
    batch = {'images': np.zeros((rows, slots, carrier[1], h, w, d), np.dtype(carrier[0])),
             'image_maps': np.zeros((rows, slots, 3, 4), np.float32)}
  elif token_shape is None:
    batch = {'images': np.zeros((rows, slots, 3, h, w, d), np.float32)}
  else:
    n, e, dtype = token_shape
    import ml_dtypes                        # bfloat16 for numpy
    batch = {'image_tokens': np.zeros((rows, slots * n, e),
                                      np.dtype(getattr(ml_dtypes, dtype, dtype)))}
  batch['image_mask'] = np.zeros((rows, slots), bool)
  for key in TEXT_KEYS:
    batch[key] = np.zeros((rows, length), DTYPES[key])
  batch['labels'][:] = IGNORE
  return batch


def sample_kind(depths: Sequence[int]) -> str:
  """'3d' when any image has depth > 1 (batched `batch_size_3d` per host), else '2d'."""
  return '3d' if any(int(d) > 1 for d in depths) else '2d'


def kind_batch_size(kind: str, data_cfg) -> int:
  return data_cfg.batch_size_3d if kind == '3d' else data_cfg.batch_size_2d


def image_shape(depths: Sequence[int], data_cfg) -> tuple[int, int, int]:
  """The (H, W, D) bucket of a sample whose images have `depths`, batched as its kind is."""
  return transforms.sample_shape(depths, data_cfg, kind_batch_size(sample_kind(depths), data_cfg))


def generation_shape(depths: Sequence[int], data_cfg, mode: str = 'original') -> tuple[int, int, int]:
  """The (H, W, D) bucket of generation prompts whose images have `depths` (`generate.image_shape`).

  'original': the original's test script and demo stack each sample (docs/original.md section
  11.2) and skip the training collator, so a 3D scan goes in at data.image_size_2d in-plane (512)
  with the full depth buckets, whatever the number of prompts; 'train': `image_shape`, the bucket
  training gives the sample's kind (a lone 3D scan at data.image_size_3d_single, 256).
  """
  if mode == 'train':
    return image_shape(depths, data_cfg)
  if mode != 'original':
    raise ValueError(f"generate.image_shape {mode!r}: expected 'original' or 'train'")
  return transforms.sample_shape(depths, data_cfg, batch_size=0)   # no single-sample rule


def image_slots(n: int, max_images: int) -> int:
  """S for a sample of n images: n rounded up to a power of two, at most max_images."""
  s = 1
  while s < n:
    s *= 2
  return min(s, max_images)


def text_length(n: int, lengths: Sequence[int]) -> int:
  """L for a text of n positions: the smallest of `lengths` holding it, else the largest."""
  for length in sorted(lengths):
    if n <= length:
      return length
  return max(lengths)


# ------------------------------------------------------------------------------------------------
# Record -> inputs


def record_text(record: dict, num_latents: int, max_images: int,
                generation: bool = False) -> tuple[str, str, int]:
  """(question with image blocks, answer, images used) of a manifest record (prompts.format_sample).

  With `generation` the answer is what the model writes, so an image the manifest places in the
  answer moves to the end of the question instead (and the answer carries no image block).
  """
  if generation:
    images = []
    for entry in record.get('images', []):
      pos = dict(entry.get('position') or {'question': 0})
      if 'answer' in pos:
        pos = {'question': 1 << 30}                    # clamps to the end of the question
      images.append(dict(entry, position=pos))
    record = dict(record, images=images)
  return prompts.format_sample(record, num_latents, max_images)


def encode_sample(question: str, answer: str | None, images: Sequence[np.ndarray],
                  modalities: Sequence[str], tokenizer, data_cfg, *, shape: Sequence[int],
                  slots: int, length: int | None = None, out: dict | None = None,
                  image_tokens: Sequence[np.ndarray] | None = None, ranges=None,
                  crop_rng: np.random.Generator | None = None,
                  stacked: Sequence[bool] | None = None,
                  stacked_depth: int | None = None) -> dict:
  """Formatted text + raw scans [C, h, w, d] -> one row of model inputs.

  `ranges` (transforms.channel_maps): per image, the full-resolution scan's (min, max) when the
  image is given already resized (a training-resolution copy, data/train_copies.py), else None.
  `crop_rng`: the draws of the training crop of 2D images (`data.random_crop_2d`,
  transforms.prepare_2d); None: each 2D image whole. `stacked`: per image, whether it is an image
  of a RadFM case stack (store.case_image), a volume whatever its depth (data/transforms.py);
  None: none is. `stacked_depth`: the original's stack depth of the sample (transforms.
  stack_depth of its full scans' depths), given when some images come already resized.

  With `image_tokens` (one cached [N, E] array per image, `images` then the same count of
  anything, unread) the row gets image_tokens [S*N, E] instead of images.

  images float32 [S, 3, H, W, D] (transforms.prepare_images: intensity policy + resize to
  `shape`; zero past the real images) and image_mask bool [S], then
    * answer given: tokens, attention_mask, labels int32 [L] and loss_weights float32 [L] as
      `Tokenizer.build_example(question, answer, length)`;
    * answer None (a generation prompt): tokens int32 [n] = BOS + encode(question), unpadded,
      and attention_mask int32 [n] of ones.
  `out` (row views of a batch, e.g. `{k: batch[k][r]}`) is filled in place and returned.
  """
  if len(images) > slots:
    raise ValueError(f'{len(images)} images do not fit {slots} image slots')
  row = out if out is not None else {}
  if image_tokens is not None:                 # cached: tokens [N, E] per image, no volumes
    n = image_tokens[0].shape[0] if len(image_tokens) else 0
    if 'image_tokens' not in row:
      e = image_tokens[0].shape[1]
      row['image_tokens'] = np.zeros((slots * n, e), image_tokens[0].dtype)
      row['image_mask'] = np.zeros(slots, bool)
    for s, tokens in enumerate(image_tokens):
      row['image_tokens'][s * n:(s + 1) * n] = tokens
    row['image_mask'][:len(image_tokens)] = True
  else:
    if 'images' not in row:
      row['images'] = np.zeros((slots, 3) + tuple(int(v) for v in shape), np.float32)
      row['image_mask'] = np.zeros(slots, bool)
    if len(images) and 'image_maps' in row:      # stored voxels; the device maps them
      transforms.prepare_stored(list(images), list(modalities), shape, data_cfg,
                                out=row['images'], maps=row['image_maps'], ranges=ranges,
                                crop_rng=crop_rng, stacked=stacked, stacked_depth=stacked_depth)
      row['image_mask'][:len(images)] = True
    elif len(images):
      transforms.prepare_images(list(images), list(modalities), shape, data_cfg, out=row['images'],
                                ranges=ranges, crop_rng=crop_rng, stacked=stacked,
                                stacked_depth=stacked_depth)
      row['image_mask'][:len(images)] = True
  if answer is None:
    ids = np.asarray(tokenizer.encode(question), np.int32)
    row['tokens'], row['attention_mask'] = ids, np.ones_like(ids)
    return row
  example = tokenizer.build_example(question, answer, length)
  for key in TEXT_KEYS:
    if out is not None:
      row[key][...] = example[key]
    else:
      row[key] = example[key]
  return row


def record_inputs(record: dict, images: Sequence[np.ndarray], tokenizer, data_cfg, *,
                  generation: bool = False, text: tuple[str, str] | None = None,
                  modalities: Sequence[str] | None = None, shape: Sequence[int] | None = None,
                  slots: int | None = None, length: int | None = None,
                  out: dict | None = None, image_tokens: Sequence[np.ndarray] | None = None,
                  ranges=None, crop_rng: np.random.Generator | None = None,
                  stacked: Sequence[bool] | None = None, stacked_depth: int | None = None) -> dict:
  """A manifest record and its read scans -> one row of model inputs (see `encode_sample`;
  `image_tokens`: the cached tokens of those images, data/image_cache.py; `ranges`: the
  full-resolution (min, max) of images given as training-resolution copies; `crop_rng`: the
  training crop's draws for 2D images; `stacked`: which images are of a case stack, from the
  store, `store.case_image`: the record's entries do not say; `stacked_depth`: see
  `encode_sample`).

  images: the arrays [C, h, w, d] of the record's first n = min(len(images entries),
  data_cfg.max_images) image entries, in manifest order. Defaults: the text from `record_text`
  (`text` = a (question, answer) pair already made by it), modalities from the entries, shape
  from the images' depths (`image_shape`), slots `image_slots(n)`, length the `text_lengths`
  bucket of the example. The caller's batch bucket passes shape / slots / length explicitly.
  """
  entries = record.get('images', [])[:data_cfg.max_images]
  if text is None:
    question, answer, _ = record_text(record, tokenizer.num_latents, data_cfg.max_images,
                                      generation)
  else:
    question, answer = text
  if len(images) != len(entries):
    raise ValueError(f'record {record.get("id")!r}: {len(images)} image arrays for '
                     f'{len(entries)} manifest images')
  if modalities is None:
    modalities = [str(e.get('modality') or '') for e in entries]
  if shape is None:
    shape = image_shape([x.shape[3] for x in images], data_cfg)
  if slots is None:
    slots = image_slots(max(len(images), 1), data_cfg.max_images)
  if generation:
    answer = None
  elif length is None:
    length = text_length(tokenizer.example_length(question, answer), data_cfg.text_lengths)
  return encode_sample(question, answer, images, modalities, tokenizer, data_cfg, shape=shape,
                       slots=slots, length=length, out=out, image_tokens=image_tokens,
                       ranges=ranges, crop_rng=crop_rng, stacked=stacked,
                       stacked_depth=stacked_depth)


__all__ = ['CACHED_KEYS', 'DTYPES', 'IGNORE', 'KEYS', 'TEXT_KEYS', 'keys', 'batch_shards', 'batch_sharding',
           'batch_spec', 'device_inputs', 'empty_batch', 'host_keys', 'encode_sample', 'generation_shape', 'image_shape', 'image_slots',
           'kind_batch_size', 'record_inputs', 'record_text', 'sample_kind', 'text_length']
