"""Prompts from files and paths: what `radfm-jax generate` runs, as functions.

    items = read_prompts('prompts.jsonl')
    check_items(items, tok, model.cfg, sampling)          # every prompt, before generating any
    for item, text, ids in generate_items(model, tok, data_cfg, items, sampling, batch_size=4):
      ...

Input JSONL, one prompt per line (image paths relative to the file's folder; an image may also be
an object {"path": ..., "modality": "CT", "frame": N, "index": N}: `frame` picks a volume of a 4D
NIfTI, `index` an image of a 5D .npy stack [S, C, H, W, D], as in an ingest manifest):
    {"id": "q1", "prompt": "Compare <image> with <image>.", "images": ["a.nii.gz", "b.png"]}

An item is {'id', 'prompt', 'paths', 'modalities', 'picks', 'images', 'where', 'labels'}: `picks[i]`
holds image i's `frame` / `index` (what the reader takes), `images` the line's image list as given
(echoed in the output), `where` names the prompt in messages ('prompts.jsonl line 3', '--prompt')
and `labels[i]` its image i ('prompts.jsonl line 3 field images[0]', '--image #1'). Every problem
with an input is an `InputError` naming them; each `<image>` takes one image, so a 5D stack of
several images without `index` is one too (it is never cut to its first image).
"""

from __future__ import annotations

import json
import os

from radfm_jax.errors import InputError, not_a_file, where


PROMPT_FIELDS = ('id', 'prompt', 'images')
# What each answer line adds to its prompt's fields (`radfm-jax generate --output`).
ANSWER_FIELDS = ('prediction', 'new_tokens')
PROMPT_IMAGE_FIELDS = ('path', 'modality', 'frame', 'index')


def _image_entry(entry, base: str, label: str) -> tuple[str, str, dict]:
  """(path, modality, picks {frame, index}) of one image of a prompts line; its fields are checked
  as the manifest's image fields (`manifest.check_image_field`), and one the reader would not use
  is an error, not ignored."""
  if isinstance(entry, dict):
    from radfm_jax.data.manifest import FieldError, check_image_field
    if not isinstance(entry.get('path'), str) or not entry['path']:
      raise InputError(f'{label}.path: expected a file path, got {entry.get("path")!r}')
    for key, value in entry.items():
      if key not in PROMPT_IMAGE_FIELDS:
        raise InputError(f'{label}.{key}: unknown field; expected one of '
                         f'{", ".join(PROMPT_IMAGE_FIELDS)}')
      try:
        check_image_field(key, value)
      except FieldError as e:
        raise InputError(f'{label}.{key}: {e.problem}') from None
    picks = {k: entry[k] for k in ('frame', 'index') if k in entry}
    return os.path.join(base, entry['path']), str(entry.get('modality') or ''), picks
  if not isinstance(entry, str) or not entry:
    raise InputError(f'{label}: expected a file path or {{"path": ..., "modality": ...}}, '
                     f'got {entry!r}')
  return os.path.join(base, entry), '', {}


def make_item(item_id: str, prompt: str, paths, modalities, place: str, labels, picks=None,
              images=None, own=None) -> dict:
  """An item (module doc); `picks` default: none (each file is one image), `images`: `paths`;
  `own`: the line's fields of its own, echoed in its answer."""
  paths = list(paths)
  return {'id': item_id, 'prompt': prompt, 'paths': paths, 'modalities': list(modalities),
          'picks': list(picks) if picks is not None else [{} for _ in paths],
          'images': list(images) if images is not None else paths,
          'where': place, 'labels': list(labels), 'own': dict(own or {})}


def read_prompts(path: str) -> list[dict]:
  """Input JSONL -> items (paths resolved against the file's folder). InputError names the file,
  line and field of a line that is not a JSON object with a string "prompt" and a list "images"."""
  if not os.path.isfile(path):
    raise InputError(f'prompts file {path}: {not_a_file(path)} (expected JSONL, one '
                     '{"id", "prompt", "images"} object per line)')
  from radfm_jax.data.store import iter_jsonl   # here: `generate --help` imports no TensorStore
  base = os.path.dirname(os.path.abspath(path))
  items, seen = [], {}
  from radfm_jax.data.manifest import _unknown
  for n, rec in iter_jsonl(path):                # InputError on a line that is not one object
    for key in rec:                              # own fields pass; a near-miss is a typo
      near = _unknown(key, PROMPT_FIELDS) if key not in PROMPT_FIELDS else None
      if near is not None:
        raise InputError(f'{where(path, n, key)}: unknown field (did you mean {near}?); expected '
                         f'{", ".join(PROMPT_FIELDS)}, or a field of your own whose name is not '
                         'a near-miss of one')
      if key in ANSWER_FIELDS:      # its answer line would replace the value
        raise InputError(f'{where(path, n, key)}: a field each answer line writes; expected '
                         f'another name for a field of your own (answers add '
                         f'{", ".join(ANSWER_FIELDS)})')
    if not isinstance(rec.get('prompt'), str):
      raise InputError(f'{where(path, n, "prompt")}: expected a string, got '
                       f'{rec.get("prompt")!r}')
    images = rec.get('images', [])
    if not isinstance(images, list):
      raise InputError(f'{where(path, n, "images")}: expected a list, got {images!r}')
    item_id = rec.get('id', n)
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)) or item_id == '':
      raise InputError(f'{where(path, n, "id")}: got {json.dumps(item_id)}; expected a string or '
                       'an integer (default: the line number)')
    if str(item_id) in seen:      # answers are matched to prompts by id
      raise InputError(f'{where(path, n, "id")}: {json.dumps(str(item_id))} is already used '
                       f'({where(path, seen[str(item_id)])}); expected a unique id')
    seen[str(item_id)] = n
    labels = [where(path, n, f'images[{i}]') for i in range(len(images))]
    entries = [_image_entry(e, base, label) for e, label in zip(images, labels)]
    items.append(make_item(str(item_id), rec['prompt'], [p for p, _, _ in entries],
                           [m for _, m, _ in entries], where(path, n), labels,
                           [k for _, _, k in entries], images,
                           {k: v for k, v in rec.items() if k not in PROMPT_FIELDS}))
  if not items:             # answering nothing would look like success
    raise InputError(f'prompts file {path}: no prompts (no JSON line in the file); expected JSONL, '
                     'one {"id", "prompt", "images"} object per line')
  return items


def check_paths(items):
  """InputError naming the first image (label and path) that does not exist, or that is a 5D
  .npy stack of several images without `index` (headers only, nothing is read: run it before
  loading a model)."""
  from radfm_jax.data.readers import RejectedScan, check_one_image
  for it in items:
    for path, label, picks in zip(it['paths'], it['labels'], it['picks']):
      if not os.path.exists(path):
        raise InputError(f'{label}: image file not found: {path}')
      try:
        check_one_image(path, picks)
      except RejectedScan as e:
        raise InputError(f'{label}: cannot use image {path}: {e.reason}') from None


def check_items(items, tokenizer, model_cfg, sampling=None):
  """Every item's images exist (`check_paths`), its `<image>` markers match them and its tokens
  plus `sampling.max_new_tokens` fit the model's positions; InputError naming the first that does
  not. Cheap (no image is read), so a long prompts file fails before anything is generated."""
  from radfm_jax.infer.text import prompt_token_count
  check_paths(items)
  for it in items:
    prompt_token_count(tokenizer, it['prompt'], len(it['paths']), model_cfg, sampling,
                       it['where'])


def read_images(paths, modalities, labels=None, picks=None):
  """Paths -> arrays [C, H, W, D] (the ingest readers, one image each: `readers.read_one`), their
  modalities (given or from the file) and whether each is an image of a RadFM case stack (a 5D
  .npy: a volume whatever its depth, `store.case_image`); `picks[i]`: image i's {"frame",
  "index"}. An unreadable image is an InputError naming its label and path."""
  from radfm_jax.data.readers import read_one
  from radfm_jax.data.store import case_image
  arrays, mods, stacked = [], [], []
  labels = labels or [where(p) for p in paths]
  picks = picks or [{} for _ in paths]
  for path, given, label, pick in zip(paths, modalities, labels, picks):
    try:
      array, attrs = read_one(path, dict(pick, modality=given) if given else pick)
    except Exception as e:     # RejectedScan, a reader's own error, OSError: the file's fault
      reason = str(e)
      if isinstance(e, InputError) and reason.startswith(f'{path}: '):
        if label == where(path):
          raise                  # the reader's message already names the file
        reason = reason[len(f'{path}: '):]
      raise InputError(f'{label}: cannot read image {path}: {reason}') from e
    arrays.append(array)
    mods.append(given or attrs.get('modality', ''))
    stacked.append(case_image(attrs))
  return arrays, mods, stacked


def generate_items(model, tokenizer, data_cfg, items, sampling, batch_size: int, seed: int = 0,
                   progress: bool = True):
  """Yields (item, prediction, new ids) for items (see the module doc) in order, after
  `check_items`; a tqdm bar on stderr counts prompts unless `progress` is False.

  sampling: a `GenerateConfig`. Every batch is padded to `batch_size` (one compiled program per
  prompt bucket for the whole run); batch i samples with seed `seed + i * batch_size`.
  """
  from tqdm import tqdm

  from radfm_jax.infer.text import generate_batch
  check_items(items, tokenizer, model.cfg, sampling)
  with tqdm(total=len(items), desc='generate', unit='prompt', disable=not progress,
            dynamic_ncols=True) as bar:
    for first in range(0, len(items), batch_size):
      chunk = items[first:first + batch_size]
      # Pad the last batch by repeating its final item: one compiled program for the whole run.
      padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
      loaded = [read_images(it['paths'], it['modalities'], it['labels'], it['picks'])
                for it in padded]
      texts, ids = generate_batch(model, tokenizer, [it['prompt'] for it in padded],
                                  [a for a, _, _ in loaded], modalities=[m for _, m, _ in loaded],
                                  stacked=[s for _, _, s in loaded],
                                  sampling=sampling, data_cfg=data_cfg, seed=seed + first,
                                  names=[it['where'] for it in padded], return_ids=True)
      for it, text, row in zip(chunk, texts, ids):
        yield it, text, row
      bar.update(len(chunk))
