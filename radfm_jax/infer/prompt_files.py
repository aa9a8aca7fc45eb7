"""Prompts from files and paths: what `radfm-jax generate` runs, as functions.

    items = read_prompts('prompts.jsonl')
    for item, text, ids in generate_items(model, tok, data_cfg, items, sampling, batch_size=4):
      ...

Input JSONL, one prompt per line (image paths relative to the file's folder; an image may also be
{"path": ..., "modality": "CT"}):
    {"id": "q1", "prompt": "Compare <image> with <image>.", "images": ["a.nii.gz", "b.png"]}
"""

from __future__ import annotations

import json
import os
import sys
import time


def _image_entry(entry, base: str) -> tuple[str, str]:
  if isinstance(entry, dict):
    return os.path.join(base, entry['path']), str(entry.get('modality') or '')
  return os.path.join(base, str(entry)), ''


def read_prompts(path: str) -> list[dict]:
  """Input JSONL -> [{'id', 'prompt', 'paths', 'modalities'}] (paths resolved)."""
  base = os.path.dirname(os.path.abspath(path))
  items = []
  with open(path) as f:
    for n, line in enumerate(f):
      if not line.strip():
        continue
      rec = json.loads(line)
      if 'prompt' not in rec:
        raise ValueError(f'{path}:{n + 1}: no "prompt" field')
      entries = [_image_entry(e, base) for e in rec.get('images', [])]
      items.append({'id': rec.get('id', str(n)), 'prompt': rec['prompt'],
                    'paths': [p for p, _ in entries], 'modalities': [m for _, m in entries]})
  return items


def read_images(paths, modalities):
  """Paths -> arrays [C, H, W, D] (ingest readers) and their modalities (given or from the file)."""
  from radfm_jax.data.readers import read_scan
  arrays, mods = [], []
  for path, given in zip(paths, modalities):
    array, attrs = read_scan(path, {'modality': given} if given else None)[0]
    arrays.append(array)
    mods.append(given or attrs.get('modality', ''))
  return arrays, mods


def generate_items(model, tokenizer, data_cfg, items, sampling, batch_size: int, seed: int = 0,
                   log=None):
  """Yields (item, prediction, new ids) for items {'prompt', 'paths', 'modalities'} in order.

  sampling: a `GenerateConfig`. Every batch is padded to `batch_size` (one compiled program per
  prompt bucket for the whole run); batch i samples with seed `seed + i * batch_size`.
  """
  from radfm_jax.infer.text import generate_batch
  start, done = time.perf_counter(), 0
  for first in range(0, len(items), batch_size):
    chunk = items[first:first + batch_size]
    # Pad the last batch by repeating its final item: one compiled program for the whole run.
    padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
    loaded = [read_images(it['paths'], it['modalities']) for it in padded]
    texts, ids = generate_batch(model, tokenizer, [it['prompt'] for it in padded],
                                [a for a, _ in loaded], modalities=[m for _, m in loaded],
                                sampling=sampling, data_cfg=data_cfg, seed=seed + first,
                                return_ids=True)
    for it, text, row in zip(chunk, texts, ids):
      yield it, text, row
    done += len(chunk)
    rate = done / (time.perf_counter() - start)
    print(f'generate: {done}/{len(items)} ({rate:.2f} samples/s)', file=log or sys.stderr)
