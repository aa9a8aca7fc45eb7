"""Official-layout state dicts for the convert tests, built from the official key list at tiny
shapes (kept keys get the shapes our key map expects; dead-branch keys get small arbitrary ones)."""

from __future__ import annotations

import csv
import os
import re

import numpy as np

# the official checkpoint's keys, shapes and dtypes (docs/original.md section 10), vendored as data
TSV = os.path.join(os.path.dirname(__file__), 'data', 'radfm_state_dict_keys.tsv')

_LAYER = (
    (re.compile(r'lang_model\.model\.layers\.(\d+)\.'), lambda c: c.llama.num_layers),
    (re.compile(r'vision_encoder\.transformer\.layers\.(\d+)\.'), lambda c: c.vision.depth),
    (re.compile(r'perceiver\.layers\.(\d+)\.'), lambda c: c.perceiver.depth),
    (re.compile(r'bert_model\.encoder\.layer\.(\d+)\.'), lambda c: 2),
    (re.compile(r'transformer_decoder\.layers\.(\d+)\.'), lambda c: 2),
)


def official_keys():
  """[(key, shape, dtype)] of the real-size official state dict (908 entries)."""
  with open(TSV) as f:
    rows = list(csv.DictReader(f, delimiter='\t'))
  return [(r['key'], tuple(int(x) for x in re.findall(r'\d+', r['shape'])), r['dtype'])
          for r in rows]


def official_state_dict(cfg, seed: int = 0, keep_dead: bool = True):
  """{key: torch.Tensor} with the official names at `cfg`'s sizes; `embedding_layer.weight` shares
  storage with the LLaMA input embedding, as in the original model."""
  import torch

  from radfm_jax.convert import api, engine, keymap
  shapes = {p: s for p, (s, _) in api.abstract_shapes(cfg).items()}
  table = keymap.radfm_table()
  expected = keymap.expected_keys(table, shapes, engine.stacked_layers(table, shapes))
  gen = torch.Generator().manual_seed(seed)
  out = {}
  for key, shape, dtype in official_keys():
    if any(m and int(m.group(1)) >= limit(cfg) for m, limit in
           ((p.search(key), f) for p, f in _LAYER)):
      continue
    if key in expected:
      shape = expected[key]
    elif not keep_dead and keymap.is_skipped(key, keymap.RADFM_SKIP):
      continue
    else:
      shape = tuple(min(d, 3) for d in shape)
    if dtype == 'int64':
      out[key] = torch.arange(int(np.prod(shape)), dtype=torch.int64).reshape(shape)
    else:
      out[key] = torch.randn(shape, generator=gen)
  out['embedding_layer.weight'] = out['lang_model.model.embed_tokens.weight']
  return out
