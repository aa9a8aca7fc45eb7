"""Checkpoint conversion, the Python face of `radfm-jax convert`.

    cfg = from_torch('pytorch_model.bin', 'ckpt/')               # official RadFM -> Orbax (+ config.json)
    to_torch('ckpt/', 'model.safetensors')                       # Orbax -> official key names
    cfg = from_hf_llama('llama-13b-hf/', 'ckpt/', model_config('radfm_13b'))   # HF LLaMA as the decoder
    model, cfg = checkpoint.load('ckpt/')                        # radfm_jax.checkpoint: on devices

Every converter streams. On the way in, one slab of rows of one tensor (`engine.BLOCK_BYTES`, 8 MiB)
is converted and written at a time, and the pages read from a memory-mapped `.bin` are dropped
again, so peak host memory is the fixed cost of the imports plus a few slabs, whatever the
checkpoint size (`benchmarks/convert_memory.py`). On the way out, one layer of one leaf is read at a
time and written incrementally, to `.safetensors` or to a `torch.save` `.bin` (its zip layout is
written first with unallocated placeholder storages, then each tensor's bytes are written in place).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import zipfile
from typing import Sequence

import numpy as np

from radfm_jax.checkpoint import params as params_ckpt
from radfm_jax.checkpoint import tree
from radfm_jax.casting import checked_cast
from radfm_jax.checkpoint.read import LeafReader
from radfm_jax.config import ModelConfig
from radfm_jax.convert import engine, infer, keymap
from radfm_jax.errors import whole_file


def abstract_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Our parameter paths -> (shape, dtype) for `cfg`, without allocating."""
  from flax import nnx

  from radfm_jax.models.radfm import abstract_model
  _, state = abstract_model(cfg)
  return {p: (tuple(v.shape), np.dtype(v.dtype))
          for p, v in tree.flat_params(nnx.to_pure_dict(state)).items()}


def _check_coverage(table: Sequence[keymap.Entry], paths, extra=()):
  covered = {p for e in table for p in e.ours} | set(extra)
  if covered != set(paths):
    raise engine.CheckpointMismatchError(note=(
        f'key map and model disagree: parameters without an entry {sorted(set(paths) - covered)}, '
        f'entries without a parameter {sorted(covered - set(paths))}'))


def _check_keys(table, reader, leaves, checkpoint: str, cast: bool) -> dict[str, int]:
  """`engine.check_keys` of the official checkpoint `reader` against the parameters `leaves` of a
  config; returns the stacked layers' counts."""
  shapes = {p: s for p, (s, _) in leaves.items()}
  _check_coverage(table, leaves)
  layers = engine.stacked_layers(table, shapes)
  engine.check_keys(table, reader, shapes, layers, skip=keymap.RADFM_SKIP, note=checkpoint,
                    cast=cast)
  return layers


def _with_dtype(cfg: ModelConfig, dtype: str | None) -> ModelConfig:
  return cfg if dtype is None else dataclasses.replace(cfg, param_dtype=dtype)


def from_torch(checkpoint: str, out: str, cfg: ModelConfig | None = None, *, dtype: str | None = None,
               llama_heads: int | None = None, cast: bool = False,
               block_bytes: int = engine.BLOCK_BYTES) -> ModelConfig:
  """Official RadFM `pytorch_model.bin` / `.safetensors` -> Orbax checkpoint in `out`.

  Sizes are inferred from the checkpoint (see `infer`); a given `cfg` must agree with them. Keys,
  shapes, dtypes and shared bytes are checked before anything is written (dead-branch keys
  skipped, anything else unknown is an error; a tensor that is not float16 / bfloat16 / float32 /
  float64 is refused unless `cast`). Every value is checked as it is cast to the parameter dtype:
  one beyond its range is an `InputError` naming the key, and nothing is left in `out`.
  Tensors move in slabs of about `block_bytes`.
  """
  reader = engine.open_reader(checkpoint)
  table = keymap.radfm_table()
  if cfg is not None:
    # A given config first: a key the checkpoint lacks or a tensor of another shape is then named
    # (the sizes inferred below would only say which config field disagrees).
    _check_keys(table, reader, abstract_shapes(cfg), checkpoint, cast)
  try:
    inferred = infer.infer_model_config(reader, cfg, llama_heads=llama_heads)
  except KeyError as e:            # a key the sizes are read from: not an official state dict
    keys = sorted(reader.keys())
    raise engine.CheckpointMismatchError(missing=[e.args[0]], note=(
        f'{checkpoint} (it holds {len(keys)} keys, e.g. {keys[:3]}; expected the official '
        "RadFM state dict: keys 'embedding_layer.*' and 'lang_model.*' at the top level)")) from None
  cfg = _with_dtype(inferred, dtype)
  leaves = abstract_shapes(cfg)
  shapes = {p: s for p, (s, _) in leaves.items()}
  layers = _check_keys(table, reader, leaves, checkpoint, cast)
  engine.check_aliases(reader, table)      # an alias key it holds: embed_tokens' own tensor
  writer = params_ckpt.IncrementalWriter(
      os.path.join(out, params_ckpt.PARAMS_DIR), leaves, stacked=set(layers),
      plans=engine.split_plans(table, shapes, block_bytes))
  dtypes = {p: d for p, (_, d) in leaves.items()}
  with writer:
    for path, i, region, array in engine.torch_to_ours(table, reader, shapes, layers, dtypes,
                                                       block_bytes=block_bytes):
      writer.write(path, i, array, region)
  params_ckpt.write_config(out, cfg, converted_from=os.path.abspath(checkpoint), format='official')
  return cfg


def from_hf_llama(hf_dir: str, out: str, cfg: ModelConfig | None = None, *, dtype: str | None = None,
                  llama_heads: int | None = None, seed: int = 0, cast: bool = False) -> ModelConfig:
  """HF `LlamaForCausalLM` safetensors shards as the decoder of a new RadFM; the vision towers, fc
  and figure tokens are freshly initialised (as `create_model(cfg, seed=seed)` would make them).

  The decoder sizes come from the shards (+ their config.json); the rest from `cfg`. The same
  checks as `from_torch` (dtypes, shared bytes, every cast).
  """
  from flax import nnx

  from radfm_jax.models.radfm import create_model
  reader = engine.open_reader(hf_dir)
  base = cfg or ModelConfig()
  hf_path = os.path.join(hf_dir, 'config.json')
  hf_config = engine.read_json(hf_path) if os.path.isdir(hf_dir) else None
  llama = infer.infer_llama(reader, '', base.llama, heads=llama_heads, hf_config=hf_config,
                            hf_path=hf_path)
  cfg = _with_dtype(dataclasses.replace(base, llama=llama), dtype)
  leaves = abstract_shapes(cfg)
  shapes = {p: s for p, (s, _) in leaves.items()}
  table = keymap.llama_table('llama/', '')
  fresh_paths = [p for p in leaves if not p.startswith('llama/')]
  _check_coverage(table, leaves, extra=fresh_paths)
  layers = engine.stacked_layers(table, shapes)
  engine.check_keys(table, reader, shapes, layers, skip=keymap.LLAMA_SKIP, note=hf_dir, cast=cast)
  writer = params_ckpt.IncrementalWriter(
      os.path.join(out, params_ckpt.PARAMS_DIR), leaves, stacked=set(layers),
      plans=engine.split_plans(table, shapes))
  dtypes = {p: d for p, (_, d) in leaves.items()}
  # The decoder is built last in RadFM.__init__, so a model with a 1-layer, tiny-vocab decoder draws
  # exactly the tower weights the full-size model would, at a fraction of the memory.
  small = dataclasses.replace(cfg, llama=dataclasses.replace(
      cfg.llama, num_layers=1, vocab_size=8, intermediate_size=8))
  fresh = tree.flat_params(nnx.to_pure_dict(nnx.state(create_model(small, seed=seed), nnx.Param)))
  with writer:
    for path in fresh_paths:
      writer.write(path, None, np.asarray(fresh[path]))
    del fresh
    for path, i, region, array in engine.torch_to_ours(table, reader, shapes, layers, dtypes):
      writer.write(path, i, array, region)
  params_ckpt.write_config(out, cfg, converted_from=os.path.abspath(hf_dir), format='hf_llama',
                           fresh_towers_seed=seed)
  return cfg


# ------------------------------------------------------------------------------------------------
# Export


_ST_DTYPES = {'float32': 'F32', 'bfloat16': 'BF16', 'float16': 'F16', 'float64': 'F64',
              'int64': 'I64', 'int32': 'I32'}


def _write_safetensors(path: str, header: dict[str, tuple[tuple[int, ...], np.dtype]], tensors):
  """Streams a safetensors file: the header is known up front (shapes from the key map), then the
  tensors are appended in the same order as they arrive."""
  meta, offset = {}, 0
  for key, (shape, dtype) in header.items():
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    meta[key] = {'dtype': _ST_DTYPES[dtype.name], 'shape': list(shape),
                 'data_offsets': [offset, offset + nbytes]}
    offset += nbytes
  meta['__metadata__'] = {'format': 'pt'}
  blob = json.dumps(meta, separators=(',', ':')).encode()
  blob += b' ' * (-len(blob) % 8)
  with whole_file(path, '.partial') as tmp, open(tmp, 'wb') as f:
    f.write(struct.pack('<Q', len(blob)))
    f.write(blob)
    for (key, (shape, dtype)), (key2, array) in zip(header.items(), tensors, strict=True):
      if key != key2 or tuple(array.shape) != tuple(shape):
        raise RuntimeError(f'stream out of order: {key2} {array.shape} where {key} {shape} expected')
      f.write(np.ascontiguousarray(checked_cast(array, dtype, f'{path} key {key}')).tobytes())


def _write_torch_bin(path: str, header: dict[str, tuple[tuple[int, ...], np.dtype]],
                     aliases: dict[str, str], tensors):
  """Streams a `torch.save` file (the zip format `torch.load(weights_only=True)` reads).

  `torch.save` under `torch.serialization.skip_data()` writes the pickle and reserves every
  storage's bytes without reading them, so the placeholders are `torch.empty` tensors whose pages
  are never touched (no host memory). Storage records are numbered in the order the pickle meets
  them, i.e. `header` order; each arriving tensor's bytes are then written at its record's offset.
  `aliases` maps an extra key to the key whose storage it shares (one record, as in the original).
  """
  import torch
  placeholders = {key: torch.empty(shape, dtype=_torch_dtype(dtype))
                  for key, (shape, dtype) in header.items()}
  for alias, target in aliases.items():
    placeholders[alias] = placeholders[target]
  with whole_file(path, '.partial') as tmp:
    # through a Python file: a refused write is then an OSError (EFBIG, ENOSPC), not torch's
    # 'iostream error' that names no reason
    with open(tmp, 'wb') as f, torch.serialization.skip_data():
      torch.save(placeholders, f)
    del placeholders
    with zipfile.ZipFile(tmp) as archive:
      records = {info.filename.split('/', 1)[1]: info for info in archive.infolist()}
    with open(tmp, 'r+b') as f:
      for number, ((key, (shape, dtype)), (key2, array)) in enumerate(
          zip(header.items(), tensors, strict=True)):
        if key != key2 or tuple(array.shape) != tuple(shape):
          raise RuntimeError(f'stream out of order: {key2} {array.shape} where {key} {shape} '
                             'expected')
        data = np.ascontiguousarray(checked_cast(array, dtype, f'{path} key {key}')).tobytes()
        record = records[f'data/{number}']
        if record.file_size != len(data) or record.compress_type != zipfile.ZIP_STORED:
          raise RuntimeError(f'{path}: torch.save laid out storage {number} ({key}) as '
                             f'{record.file_size} bytes, {len(data)} expected')
        f.seek(engine.zip_data_offset(f, record))
        f.write(data)


def to_torch(checkpoint: str, out: str, *, include_alias: bool = True) -> list[str]:
  """Orbax checkpoint -> official state dict (`.bin` in the `torch.save` format, or
  `.safetensors`), with the official key names: `embedding_layer.weight` included (sharing
  embed_tokens' storage in `.bin`), dead-branch keys and `inv_freq` buffers not. Returns the keys
  written. Both formats are streamed: one layer of one tensor in host memory at a time.
  """
  leaf = LeafReader(checkpoint)
  shapes = leaf.shapes()
  dtypes = {p: np.dtype(v.dtype) for p, v in leaf.abstract.items()}
  table = keymap.radfm_table()
  layers = engine.stacked_layers(table, shapes)
  key_dtype = {e.key(i): dtypes[e.ours[0]] for e in table
               for i in (range(layers[e.ours[0]]) if e.stacked else [None])}
  if out.endswith('.safetensors'):
    expected = keymap.expected_keys([e for e in table if include_alias or e.kind != 'alias'],
                                    shapes, layers)
    stream = engine.ours_to_torch(table, leaf, layers, include_aliases=include_alias)
    _write_safetensors(out, {k: (s, key_dtype[k]) for k, s in expected.items()}, stream)
    return list(expected)
  kept = keymap.expected_keys([e for e in table if e.kind != 'alias'], shapes, layers)
  # alias key -> the kept key of the same tensor
  aliases = {e.key(): next(t.key() for t in table if t.kind != 'alias' and t.ours == e.ours)
             for e in table if e.kind == 'alias' and include_alias}
  stream = engine.ours_to_torch(table, leaf, layers, include_aliases=False)
  _write_torch_bin(out, {k: (s, key_dtype[k]) for k, s in kept.items()}, aliases, stream)
  return list(kept) + list(aliases)


def _torch_dtype(dtype: np.dtype):
  import torch
  return {'bfloat16': torch.bfloat16, 'float16': torch.float16, 'float32': torch.float32,
          'float64': torch.float64, 'int32': torch.int32, 'int64': torch.int64}[np.dtype(dtype).name]
