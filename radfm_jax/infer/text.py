"""Text in, text out: prompts with `<image>` markers + scans -> generated answers.

    text = generate(model, tok, prompt='Is there a lesion? <image>', images=[vol])
    texts = generate_batch(model, tok, prompts=[p1, p2], images=[[vol1], [vol2, vol3]])

Each bare `<image>` marker in a prompt is replaced by the block of image i (in marker order):
`<image>` + `<image{n*i}>`..`<image{n*i+n-1}>` + `</image>` (n = model.cfg.perceiver.num_latents).
A prompt without markers gets its images at the front (the original's position 0). A prompt that
already holds full blocks (e.g. from `prompts.format_sample`) is used as is. Images are
preprocessed and tokenized by the batch contract's own code (`batch.encode_sample`: intensity
policy + nearest resize to the RadFM shape bucket), then the batch is left-padded
(`collate_prompts`) and decoded on device by `generate_ids`; the new tokens are decoded skipping
special ids.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import re
from typing import Sequence

import numpy as np

from radfm_jax.config import (DataConfig, GenerateConfig, ModelConfig, is_seed,
                              validate_generate, validate_preprocessing)
from radfm_jax.data import batch as batch_lib
from radfm_jax.data import prompts as prompts_lib
from radfm_jax.errors import InputError
from radfm_jax.infer.generate import generate_ids, left_pad

_MARKER = '<image>'
_LATENT = re.compile(r'<image\d+>')
# What a user may have meant for the marker: other case, spaces, a closing slash.
_NEAR_MARKER = re.compile(r'<\s*image\s*/?\s*>', re.IGNORECASE)


def data_config_for(model_cfg: ModelConfig, base: DataConfig | None = None) -> DataConfig:
  """The DataConfig defaults clamped to what the model's vision tower takes (its position tables
  cover image_size x image_size x frames), so small models get small buckets."""
  base = base or DataConfig()
  v = model_cfg.vision
  buckets = tuple(b for b in base.depth_buckets if b <= v.frames) or (v.frame_patch_size,)
  return dataclasses.replace(base, image_size_2d=min(base.image_size_2d, v.image_size),
                             image_size_3d_single=min(base.image_size_3d_single, v.image_size),
                             depth_buckets=buckets)


def place_image_markers(prompt: str, num_images: int, num_latents: int = 32) -> str:
  """Expands the `<image>` markers of `prompt` into image blocks (see module doc).

  Raises InputError when the marker count and `num_images` disagree, or when the prompt holds
  image tokens (`<imageK>`, `</image>`) that are not whole blocks of its images.
  """
  markers = prompt.count(_MARKER)
  if _LATENT.search(prompt) or '</image>' in prompt:      # already formatted blocks
    rest, whole = prompt, 0
    for i in range(num_images):
      block = prompts_lib.image_block(i, num_latents)
      if block in rest:
        rest, whole = rest.replace(block, '', 1), whole + 1
    token = prompts_lib.image_token_in(rest)
    if token is None and whole != num_images:
      raise InputError(f'prompt holds {whole} image blocks but {num_images} images were given')
    if token is not None:
      raise InputError(f'prompt holds {token!r} outside whole image blocks (<image><image0>..'
                       f'<image{num_latents - 1}></image> for the first of its {num_images} '
                       'images); expected one <image> marker per image, or the blocks '
                       'prompts.format_sample writes')
    return prompt
  near = [m for m in _NEAR_MARKER.findall(prompt) if m != _MARKER]
  if near:                                 # would stay text, the image put first instead
    raise InputError(f'prompt holds {near[0]!r}, not an image marker; expected {_MARKER!r} '
                     '(lower case, no spaces) where an image goes')
  if markers == 0:
    return ''.join(prompts_lib.image_block(i, num_latents) for i in range(num_images)) + prompt
  if markers != num_images:
    raise InputError(f'prompt has {markers} <image> markers but {num_images} images were given; '
                     'put one <image> where each image goes (or none: images go first)')
  pieces = prompt.split(_MARKER)
  out = [pieces[0]]
  for i, piece in enumerate(pieces[1:]):
    out.append(prompts_lib.image_block(i, num_latents))
    out.append(piece)
  return ''.join(out)


def check_prompt_fits(num_tokens: int, model_cfg: ModelConfig, max_new_tokens: int, name: str):
  """InputError naming the prompt `name` when its tokens plus the new ones need more positions
  than the model has (`model.llama.max_position_embeddings`): decoding past them would run on
  positions the model never saw, silently."""
  limit = model_cfg.llama.max_position_embeddings
  if num_tokens + max_new_tokens > limit:
    raise InputError(f'{name}: prompt of {num_tokens} tokens (image blocks included) + '
                     f'generate.max_new_tokens={max_new_tokens} exceeds the model\'s '
                     f'{limit} positions (model.llama.max_position_embeddings): shorten the prompt '
                     'or lower generate.max_new_tokens')


def image_limit(tokenizer, model_cfg: ModelConfig) -> int:
  """The most images one prompt may hold: the model's and the tokenizer's `max_images`."""
  return min(model_cfg.max_images, getattr(tokenizer, 'max_images', model_cfg.max_images))


def _check_image_count(num_images: int, limit: int, name: str):
  if num_images > limit:
    raise InputError(f'{name}: {num_images} images; the model and tokenizer take at most {limit} '
                     '(model.max_images)')


def prompt_token_count(tokenizer, prompt: str, num_images: int, model_cfg: ModelConfig,
                       sampling: GenerateConfig | None = None, name: str = 'prompt') -> int:
  """Tokens of `prompt` with its image blocks placed, as `prepare_batch` encodes it; InputError
  naming `name` when the markers do not match `num_images` or it does not fit
  (`check_prompt_fits` with `sampling.max_new_tokens`)."""
  _check_image_count(num_images, image_limit(tokenizer, model_cfg), name)
  try:
    text = place_image_markers(prompt, num_images, model_cfg.perceiver.num_latents)
  except ValueError as e:
    raise InputError(f'{name}: {e}') from None
  n = len(tokenizer.encode(text))
  check_prompt_fits(n, model_cfg, (sampling or GenerateConfig()).max_new_tokens, name)
  return n


def as_chw_d(image, name: str = 'image') -> np.ndarray:
  """A scan as [C, H, W, D]: accepts [H, W] (2D), [H, W, D] (volume) or [C, H, W, D] (C in 1, 3);
  a path is read with `readers.read_one` (NIfTI, DICOM, PNG/JPEG, .npy): one image, so a 5D
  stack of several is an error (pick one with `index`, or pass its array), none is dropped. An
  array's values are checked as ingest checks a scan's (`readers.checked_values`: finite real
  numbers that fit float32 / int32): an InputError naming `name` otherwise, never a NaN image.
  Refused as ambiguous, each an InputError saying how to pass it: a uint8 [H, W, 3 or 4] array
  (a PIL RGB(A) picture, not a 3-slice volume), a [C, H, W] array with C in 1, 3, 4 and H, W >= 8
  (a channels-first picture, not a volume of C rows), a list of arrays (slices: np.stack them on
  the last axis), a masked array with masked voxels (their hidden values would be read)."""
  return _scan(image, name)[0]


def _is_path(image) -> bool:
  return isinstance(image, (str, bytes)) or hasattr(image, '__fspath__')


def _scan(image, name: str) -> tuple[np.ndarray, bool]:
  """`as_chw_d`, and whether the scan is an image of a RadFM case stack (a path to a 5D .npy of
  one image: store.case_image of its attributes; an array: not known, so no)."""
  from radfm_jax.data.readers import RejectedScan, checked_values, read_one
  from radfm_jax.data.store import case_image
  if _is_path(image):
    array, attrs = read_one(os.fsdecode(image))
    return array, case_image(attrs)
  if isinstance(image, np.ma.MaskedArray):
    masked = int(np.ma.count_masked(image))
    if masked:                             # np.asarray would keep the hidden values
      raise InputError(f'{name}: a masked array with {masked} masked voxels; expected a plain '
                       'array (fill them first: image.filled(value))')
    image = image.data
  if isinstance(image, (list, tuple)) and any(isinstance(a, np.ndarray) for a in image):
    # [[slice0, slice1]] would stack the slices on the H axis, not D
    raise InputError(f'{name}: a list of {len(image)} arrays; expected one array per scan '
                     '(slices of a volume: np.stack(slices, axis=-1) -> [H, W, D])')
  try:
    x = np.asarray(image)
  except (ValueError, TypeError) as e:     # a ragged list, a tensor numpy cannot take
    raise InputError(f'{name}: not an array ({type(e).__name__}: {e}); expected [H, W], '
                     '[H, W, D] or [C, H, W, D] numbers') from None
  if x.dtype == object:                    # None, a dict, an object numpy wraps as one
    raise InputError(f'{name}: got {type(image).__name__}; expected an array ([H, W], [H, W, D] '
                     'or [C, H, W, D] numbers) or a path')
  if x.ndim == 2:
    x = x[None, :, :, None]
  elif x.ndim == 3:
    # The two layouts of a picture that [H, W, D] would take for a volume, silently: an 8-bit
    # RGB(A) array as PIL gives it, a channels-first [C, H, W] one as torch keeps it.
    if x.dtype == np.uint8 and x.shape[2] in (3, 4):
      raise InputError(f'{name}: a uint8 array {x.shape}, an RGB(A) picture as PIL gives it?; '
                       'expected [C, H, W, D]: np.moveaxis(image[..., :3], -1, 0)[..., None] '
                       f'for a picture, image[None] for a volume of {x.shape[2]} slices')
    if x.shape[0] in (1, 3, 4) and min(x.shape[1:]) >= 8:
      raise InputError(f'{name}: an array {x.shape}, channels first [C, H, W]?; expected '
                       f'[C, H, W, D]: image[..., None] for a picture, image[None] for a volume '
                       f'of {x.shape[0]} rows')
    x = x[None]
  elif not (x.ndim == 4 and x.shape[0] in (1, 3)):
    raise InputError(f'{name}: shape {x.shape}; expected [H, W], [H, W, D] or [C, H, W, D] '
                     '(C in 1, 3)')
  try:
    return checked_values(x), False
  except RejectedScan as e:
    raise InputError(f'{name}: {e.reason}') from None


def check_tokenizer(tokenizer, model_cfg: ModelConfig):
  """The tokenizer's id layout must be the model's: same text vocabulary (so `<image>` is the
  same id) and the same latents per image."""
  if not hasattr(tokenizer, 'vocab_size'):
    raise InputError(f'tokenizer: got {type(tokenizer).__name__}; expected a radfm_jax Tokenizer '
                     '(radfm_jax.Tokenizer(path), or load_for_generation)')
  if tokenizer.vocab_size != model_cfg.llama.vocab_size:
    raise InputError(f'tokenizer has {tokenizer.vocab_size} SentencePiece pieces but the model '
                     f'vocabulary is {model_cfg.llama.vocab_size}: <image> ids would differ; use '
                     'the tokenizer the checkpoint was trained with')
  if getattr(tokenizer, 'num_latents', model_cfg.perceiver.num_latents) != \
      model_cfg.perceiver.num_latents:
    raise InputError(f'tokenizer num_latents={tokenizer.num_latents}, model '
                     f'{model_cfg.perceiver.num_latents}')


def _is_list(value) -> bool:
  """A list of things (a list, tuple or array), not a string, which is a sequence of letters."""
  return isinstance(value, (list, tuple, np.ndarray)) and not isinstance(value, (str, bytes))


def _checked_inputs(prompts, images, modalities):
  """(prompts, images, modalities) as lists, or an InputError naming the argument: prompts a
  non-empty list of strings (a string would be taken letter by letter), images and modalities
  one list per prompt, one modality string per image."""
  if not _is_list(prompts) or not len(prompts):
    raise InputError(f'prompts: got {type(prompts).__name__} {str(prompts)[:40]!r}; expected a '
                     'non-empty list of prompt strings, one per answer')
  prompts = list(prompts)
  for b, p in enumerate(prompts):
    if not isinstance(p, str):
      raise InputError(f'prompt {b}: got {type(p).__name__}; expected a string')
  if images is None:
    images = [[] for _ in prompts]
  if isinstance(images, np.ndarray) or not _is_list(images) or not all(
      _is_list(row) for row in images):
    raise InputError('images: expected one list of scans per prompt (images[b]: the scans of '
                     'prompt b; generate() takes one list for its one prompt)')
  for b, row in enumerate(images):
    if isinstance(row, np.ndarray):      # its first axis would be taken as that many images
      raise InputError(f'images[{b}]: got an array {row.shape}; expected a list of scans (one '
                       f'scan: [images[{b}]])')
  images = [list(row) for row in images]
  if len(images) != len(prompts):
    raise InputError(f'{len(prompts)} prompts but {len(images)} image lists; expected one list '
                     'per prompt')
  if modalities is not None:
    if not _is_list(modalities) or len(modalities) != len(prompts) or not all(
        _is_list(m) and len(m) == len(row) and all(isinstance(x, str) for x in m)
        for m, row in zip(modalities, images)):
      raise InputError('modalities: expected one list per prompt holding one string per image '
                       f'(image counts {[len(row) for row in images]}), got {modalities!r}')
    modalities = [list(m) for m in modalities]
  return prompts, images, modalities


def prepare_batch(tokenizer, prompts: Sequence[str], images: Sequence[Sequence] | None,
                  model_cfg: ModelConfig, data_cfg: DataConfig | None = None,
                  modalities: Sequence[Sequence[str]] | None = None, multiple: int = 64,
                  stacked: Sequence[Sequence[bool]] | None = None,
                  image_shape: str = 'original') -> dict:
  """Prompts + per-prompt scans -> the arrays `generate_ids` takes.

  `stacked` (one list per prompt, one bool per image): which images are of a RadFM case stack,
  prepared as volumes whatever their depth (data/transforms.py; the callers that read them know:
  `store.case_image`); a path to a 5D .npy is one by itself.

  Returns {'tokens', 'attention_mask': int32 [B, L] (left padded to a multiple of `multiple`),
  'images': float32 [B, S, 3, H, W, D] or None, 'image_mask': bool [B, S] or None}. S is the
  largest image count in the batch; (H, W, D) is one RadFM bucket for the whole batch, from the
  deepest scan (`batch.generation_shape`; `image_shape`: `generate.image_shape`, 'original' = the
  original's test-time stacking, data.image_size_2d in-plane, not the batch size's).
  """
  if data_cfg is None:
    data_cfg = data_config_for(model_cfg)
  elif not isinstance(data_cfg, DataConfig):
    raise InputError(f'data_cfg: got {type(data_cfg).__name__}; expected a radfm_jax.config.'
                     'DataConfig (load_for_generation returns the checkpoint\'s), or None')
  else:
    validate_preprocessing(data_cfg, model_cfg)
  check_tokenizer(tokenizer, model_cfg)
  prompts, images, modalities = _checked_inputs(prompts, images, modalities)
  limit = image_limit(tokenizer, model_cfg)
  if stacked is not None and (not _is_list(stacked) or len(stacked) != len(images) or not all(
      _is_list(s) and len(s) == len(row) and all(isinstance(x, (bool, np.bool_)) for x in s)
      for s, row in zip(stacked, images))):
    raise InputError('stacked: expected one list per prompt holding one bool per image (image '
                     f'counts {[len(row) for row in images]}), got {stacked!r}')
  for b, row in enumerate(images):          # before any scan is read
    _check_image_count(len(row), limit, f'prompt {b}')
  read = [[_scan(x, f'prompt {b} image {i}') for i, x in enumerate(row)]
          for b, row in enumerate(images)]
  scans = [[x for x, _ in row] for row in read]
  cases = [[case or bool(stacked is not None and stacked[b][i]) for i, (_, case) in enumerate(row)]
           for b, row in enumerate(read)]
  n = model_cfg.perceiver.num_latents
  texts = []
  for b, (p, row) in enumerate(zip(prompts, scans)):
    try:
      texts.append(place_image_markers(p, len(row), n))
    except InputError as e:                # which prompt of the batch
      raise InputError(f'prompt {b}: {e}') from None
  slots = max(len(row) for row in scans)
  shape = batch_lib.generation_shape([x.shape[3] for row in scans for x in row], data_cfg,
                                     image_shape)
  rows = []
  for b, (prompt, row) in enumerate(zip(texts, scans)):
    mods = list(modalities[b]) if modalities is not None else [''] * len(row)
    rows.append(batch_lib.encode_sample(prompt, None, row, mods, tokenizer, data_cfg,
                                        shape=shape, slots=slots, stacked=cases[b]))
  return collate_prompts(rows, multiple)


def collate_prompts(rows: Sequence[dict], multiple: int = 64) -> dict:
  """Prompt rows (`batch.record_inputs(..., generation=True)` / `batch.encode_sample` without an
  answer) -> the arrays `generate_ids` takes: tokens, attention_mask int32 [B, L] left padded to
  a multiple of `multiple`; images float32 [B, S, 3, H, W, D] and image_mask bool [B, S], both
  None when S == 0. Every row must have the same S and (H, W, D)."""
  tokens, mask = left_pad([r['tokens'] for r in rows], multiple=multiple)
  batch = {'tokens': tokens, 'attention_mask': mask, 'images': None, 'image_mask': None}
  if rows[0]['images'].shape[0]:
    batch.update(images=np.stack([r['images'] for r in rows]),
                 image_mask=np.stack([r['image_mask'] for r in rows]))
  return batch


def _python_numbers(value):
  """NumPy scalars as the Python numbers they hold (a GenerateConfig is saved as JSON, which
  takes Python numbers only), in a list or tuple too; anything else as it is (validated later)."""
  if isinstance(value, np.generic) and isinstance(value.item(), (int, float)):
    return value.item()
  if isinstance(value, (list, tuple)):
    return type(value)(_python_numbers(v) for v in value)
  return value


def generate_batch(model, tokenizer, prompts: Sequence[str],
                   images: Sequence[Sequence] | None = None, *, max_new_tokens: int | None = None,
                   temperature: float | None = None, top_k: int | None = None,
                   top_p: float | None = None, stop_ids: Sequence[int] | None = None,
                   sampling: GenerateConfig | None = None, data_cfg: DataConfig | None = None,
                   modalities: Sequence[Sequence[str]] | None = None, seed: int = 0,
                   names: Sequence[str] | None = None, return_ids: bool = False,
                   stacked: Sequence[Sequence[bool]] | None = None):
  """Generates one answer per prompt; images[b] is the list of scans of prompt b (`stacked`:
  which are of a RadFM case stack, `prepare_batch`).

  Sampling defaults are `GenerateConfig()` (greedy, 200 new tokens, stop on </s> or <s>); the
  keyword arguments override it. A prompt whose tokens plus the new ones exceed the model's
  positions is an InputError naming it (`names[b]`, default 'prompt b'). Returns a list of
  strings (and the new ids per row, stop id included, with return_ids).
  """
  import jax
  if sampling is not None and not isinstance(sampling, GenerateConfig):
    raise InputError(f'sampling: got {type(sampling).__name__}; expected a radfm_jax.config.'
                     'GenerateConfig (radfm_jax.generate_config), or None and keyword arguments')
  given = {k: _python_numbers(v) for k, v in dict(
      max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
      stop_ids=stop_ids).items()}
  if not isinstance(return_ids, bool):     # any truthy value would count
    raise InputError(f'return_ids: got {return_ids!r}; expected True or False')
  sampling = dataclasses.replace(sampling or GenerateConfig(),
                                 **{k: v for k, v in given.items() if v is not None})
  validate_generate(sampling)              # before anything is prepared or compiled
  if not is_seed(seed):
    raise InputError(f'seed {seed!r}: expected an integer in [0, 2^32) (a JAX key takes 32 bits)')
  if not isinstance(getattr(model, 'cfg', None), ModelConfig):
    raise InputError(f'model: got {type(model).__name__}; expected a RadFM model (radfm_jax.load '
                     'or load_for_generation)')
  batch = prepare_batch(tokenizer, prompts, images, model.cfg, data_cfg, modalities,
                        stacked=stacked, image_shape=sampling.image_shape)
  if names is not None and (not _is_list(names) or len(names) != len(prompts)):
    raise InputError(f'names: expected one name per prompt ({len(prompts)}), got {names!r}')
  for b, n in enumerate(np.asarray(batch['attention_mask']).sum(axis=1)):
    check_prompt_fits(int(n), model.cfg, sampling.max_new_tokens,
                      names[b] if names else f'prompt {b}')
  out = generate_ids(model, batch['tokens'], batch['attention_mask'], batch['images'],
                     batch['image_mask'], sampling=sampling, rng=jax.random.key(seed))
  ids = out.sequences()
  texts = [tokenizer.decode(row).strip() for row in ids]
  return (texts, ids) if return_ids else texts


def generate(model, tokenizer, prompt: str, images: Sequence | None = None, *,
             max_new_tokens: int | None = None, modalities: Sequence[str] | None = None,
             **kwargs) -> str:
  """One prompt with its scans -> the generated text.

  images: arrays ([H, W], [H, W, D] or [C, H, W, D]) or paths; modalities: one per image ('CT'
  matters for the CT-window intensity policies). Other options as `generate_batch`.
  """
  if images is not None and not isinstance(images, (list, tuple)):
    # (an array would be taken as a list of its slices)
    raise InputError(f'images: got {type(images).__name__}; expected a list of the prompt\'s '
                     'scans (arrays or paths), e.g. [volume]')
  if modalities is not None and not _is_list(modalities):
    raise InputError(f'modalities: got {modalities!r}; expected a list, one string per image')
  options = set(inspect.signature(generate_batch).parameters) - {
      'model', 'tokenizer', 'prompts', 'images', 'modalities', 'max_new_tokens'}
  for key in kwargs:                       # named here, not as generate_batch's
    if key not in options:
      close = difflib.get_close_matches(key, sorted(options), n=1)
      raise TypeError(f'generate() got an unexpected keyword argument {key!r}'
                      + (f' (did you mean {close[0]!r}?)' if close else ''))
  out = generate_batch(model, tokenizer, [prompt], [list(images or [])],
                       max_new_tokens=max_new_tokens,
                       modalities=None if modalities is None else [list(modalities)], **kwargs)
  if kwargs.get('return_ids'):          # (text, ids), not the batch's ([text], ids)
    return out[0][0], out[1][0]
  return out[0]
