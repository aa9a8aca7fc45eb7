"""Parameter-only checkpoints (layout "params"), written one slice at a time.

    DIR/config.json   {"layout": "params", "layout_version": 1, "model": {...}, + its origin}
    DIR/params/       an Orbax PyTree checkpoint of `nnx.to_pure_dict(nnx.state(model, nnx.Param))`

`save(model, DIR)` writes one from a model in memory; `radfm-jax convert` streams one from a
PyTorch checkpoint with `IncrementalWriter` + `write_config`. `read.load` / `read.LeafReader` read
it.

Bounded memory. Orbax saves whole leaves, and the stacked LLaMA leaves are large (13B: the
[40, 5120, 13824] gate kernel is 11 GB in float32), so `IncrementalWriter` lets Orbax write the
checkpoint's tree metadata for a skeleton of 1-element arrays (non-OCDBT, zarr v2: one TensorStore
array per leaf), then re-creates each leaf's array at its real shape with the same dtype and
compressor and fills it slice by slice (one layer of one tensor at a time) through TensorStore. The
result is an ordinary Orbax checkpoint: `ocp.StandardCheckpointer().restore` / `read.load` read it
as one tree, onto any mesh.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Mapping

import numpy as np

from radfm_jax.checkpoint import meta
from radfm_jax.casting import checked_cast
from radfm_jax.config import ModelConfig
from radfm_jax.checkpoint.tree import flat_params, trim_memory, unflatten
from radfm_jax.errors import writing

PARAMS_DIR = 'params'
CHUNK_BYTES = 64 << 20   # zarr chunk target: restores read whole chunks, keep them modest


def _chunks(shape: tuple[int, ...], itemsize: int, stacked: bool) -> list[int]:
  """Chunk shape: one layer per chunk for stacked leaves, then halve the largest dim to fit."""
  chunks = list(shape)
  if stacked and chunks:
    chunks[0] = 1
  while math.prod(chunks) * itemsize > CHUNK_BYTES:
    j = int(np.argmax(chunks))
    if chunks[j] == 1:
      break
    chunks[j] = (chunks[j] + 1) // 2
  return [max(c, 1) for c in chunks]


class IncrementalWriter:
  """Writes an Orbax PyTree checkpoint leaf slice by leaf slice.

      w = IncrementalWriter('out/params', {'llama/layers/q/kernel': ((L, E, H, D), np.float32)},
                            stacked={'llama/layers/q/kernel'})
      w.write('llama/layers/q/kernel', 3, layer3)   # index None writes the whole leaf
      w.write('llama/embed_tokens', None, rows, (slice(0, 512),))   # a region of it
      w.close()                                     # checks every element was written, then commits
      with IncrementalWriter(...) as w: ...         # close on success; on an error, abort

  `plans` (path -> (axis, block) of the per-layer leaf, from `engine.split_plans`) makes each zarr
  chunk exactly one written block, so no chunk is ever read back, merged and recompressed.

  Data goes to `<directory>.partial` and is renamed into place by `close`, so an interrupted
  conversion never leaves a directory that looks like a checkpoint; `abort` (an error inside the
  `with` block) removes it. Every value is cast to its leaf's dtype with `checked_cast`. A write
  the filesystem refuses (full, read-only) is a WriteError naming `directory`.
  """

  def __init__(self, directory: str, leaves: Mapping[str, tuple[tuple[int, ...], np.dtype]],
               stacked=(), plans: Mapping[str, tuple[int, int] | None] | None = None):
    import orbax.checkpoint as ocp
    import tensorstore as ts

    self.directory = os.path.abspath(directory)
    self.tmp = self.directory + '.partial'
    self.arrays, self.todo = {}, {}
    with writing(self.directory):
      parent, name = os.path.split(self.tmp)
      for left in sorted(os.listdir(parent)) if os.path.isdir(parent) else ():
        if left.startswith(name):         # a killed run's (and Orbax's) temporary: never read
          shutil.rmtree(os.path.join(parent, left))
      try:
        self._create(leaves, stacked, plans, ocp, ts)
      except BaseException:
        self.abort()
        raise

  def _create(self, leaves, stacked, plans, ocp, ts):
    """The skeleton tree, then each leaf's array at its real shape (see the class doc)."""
    import logging
    self.leaves = {p: (tuple(s), np.dtype(d)) for p, (s, d) in leaves.items()}
    skeleton = {p: np.zeros((1,) * len(s), d) for p, (s, d) in self.leaves.items()}
    absl = logging.getLogger('absl')
    level = absl.level
    absl.setLevel(logging.ERROR)      # Orbax warns 'Skipping merge of OCDBT checkpoints' (none)
    try:
      ocp.PyTreeCheckpointer(use_ocdbt=False, use_zarr3=False).save(
          self.tmp, args=ocp.args.PyTreeSave(unflatten(skeleton)))
    finally:
      absl.setLevel(level)
    for path, (shape, dtype) in self.leaves.items():
      leaf_dir = os.path.join(self.tmp, '.'.join(path.split('/')))
      meta_file = os.path.join(leaf_dir, '.zarray')
      if not os.path.exists(meta_file):
        raise RuntimeError(f'Orbax wrote no zarr array at {leaf_dir}: the on-disk layout this '
                           'writer relies on (non-OCDBT zarr v2, one array per leaf) has changed')
      with open(meta_file) as f:
        zarray = json.load(f)
      shutil.rmtree(leaf_dir)
      spec = {'driver': 'zarr', 'kvstore': {'driver': 'file', 'path': leaf_dir},
              'metadata': {'shape': list(shape), 'dtype': zarray['dtype'],
                           'compressor': zarray['compressor'],
                           'fill_value': zarray['fill_value'],
                           'chunks': self._chunk_shape(path, shape, dtype, path in stacked, plans),
                           'order': 'C',
                           'dimension_separator': zarray.get('dimension_separator', '.')}}
      self.arrays[path] = ts.open(spec, create=True, delete_existing=True).result()
      self.todo[path] = math.prod(shape)    # elements still to write (blocks never overlap)

  @staticmethod
  def _chunk_shape(path, shape, dtype, stacked, plans):
    plan = (plans or {}).get(path)
    if plan is None:
      return _chunks(shape, dtype.itemsize, stacked)
    axis, block = plan
    per_layer = list(shape[1:] if stacked else shape)
    per_layer[axis] = block
    return ([1] if stacked else []) + per_layer

  def write(self, path: str, index: int | None, array: np.ndarray,
            region: tuple[slice, ...] | None = None):
    """Writes `array` at leaf[index][region] (index None: the leaf itself; region None: all)."""
    shape, dtype = self.leaves[path]
    target = self.arrays[path] if index is None else self.arrays[path][index]
    if region is not None:
      target = target[region]
    if tuple(array.shape) != tuple(target.shape):
      raise ValueError(f'{path}[{index}][{region}]: shape {array.shape}, expected {target.shape}')
    value = checked_cast(array, dtype, f'parameter {path}')
    with writing(self.directory):
      target.write(value).result()
    self.todo[path] -= array.size
    if array.nbytes > (8 << 20):
      trim_memory()

  def __enter__(self):
    return self

  def __exit__(self, kind, value, traceback):
    if kind is None:
      self.close()
    else:
      self.abort()

  def abort(self):
    """Drops what was written (the `.partial` folder); an existing checkpoint stays as it was."""
    self.arrays.clear()
    shutil.rmtree(self.tmp, ignore_errors=True)

  def close(self):
    unwritten = {p: n for p, n in self.todo.items() if n}
    if unwritten:
      raise RuntimeError(f'checkpoint incomplete, elements never written: {unwritten}')
    self.arrays.clear()
    with writing(self.directory):
      if os.path.exists(self.directory):
        # The config.json beside the old tree names it: removed first, so a kill from here on
        # leaves a folder with no config.json (an unfinished write, `meta.unfinished_write`),
        # never an old record over new parameters of another shape.
        config = os.path.join(os.path.dirname(self.directory), meta.CONFIG_FILE)
        if os.path.basename(self.directory) == PARAMS_DIR and os.path.exists(config):
          os.remove(config)
        shutil.rmtree(self.directory)
      os.replace(self.tmp, self.directory)


# ------------------------------------------------------------------------------------------------
# The checkpoint around the tree


def write_config(directory: str, cfg: ModelConfig, **info) -> str:
  """DIR/config.json for the parameters in DIR/params/: the layout record, the model config and
  `info` (where they came from). Written after the tree, so a config.json names a whole tree."""
  return meta.write_config(directory, meta.PARAMS, {'model': meta.config_to_dict(cfg), **info})


# config.json keys that `save(**info)` may not set: the layout record and the run sections that
# readers of a checkpoint take as its own (`meta.read_section`); `model` is save's own argument.
_RESERVED = frozenset({'layout', 'layout_version', 'data', 'generate', 'train', 'mesh', 'seed',
                       'run'})


def save(model, directory: str, **info) -> str:
  """Writes `model`'s parameters as a parameter-only checkpoint (`DIR/params/` + `DIR/config.json`)
  with the converter's own writer, so `load` and `radfm-jax convert to-torch` read it back.
  `directory`: a new folder, an empty one or a parameter-only checkpoint (replaced); anything
  else is an InputError naming it (`meta.check_output_folder`), before anything is written."""
  from flax import nnx

  from radfm_jax.config import ModelConfig
  from radfm_jax.errors import InputError
  if not isinstance(getattr(model, 'cfg', None), ModelConfig):   # before anything is written
    raise InputError(f'model: got {type(model).__name__}; expected a RadFM model (radfm_jax.load, '
                     'create_model)')
  if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
    raise InputError(f'directory: got {directory!r}; expected the path of a folder for the '
                     'checkpoint')
  directory = os.fspath(directory)
  if directory.startswith('~'):     # a folder named '~' would be made in the working directory
    raise InputError(f'{directory}: starts with ~, which a path in Python does not expand; '
                     f'expected os.path.expanduser({directory!r})')
  reserved = sorted(set(info) & _RESERVED)
  if reserved:        # a config.json section `load` or `load_for_generation` reads
    raise InputError(f'save({reserved[0]}=...): {reserved[0]!r} is a section the checkpoint\'s '
                     f'config.json holds for the model or its readers; expected other names for '
                     f'where the parameters came from (e.g. merged_from=...)')
  try:
    json.dumps(info)
  except (TypeError, ValueError) as e:
    raise InputError(f'save(**info): {e}; expected values JSON can hold (strings, numbers, '
                     'lists, dicts)') from None
  if os.path.isfile(directory):
    raise InputError(f'{directory}: a file; expected a folder for the checkpoint')
  if os.path.isdir(os.path.join(directory, 'checkpoints')):
    # its config.json would name this checkpoint, and `load` would read it instead of the run
    raise InputError(f'{directory}: holds a training run (checkpoints/); expected a new folder '
                     'or a parameter-only checkpoint to replace')
  # another folder's files (its own config.json) would be mixed with, or written over by, ours
  meta.check_output_folder(directory, directory, overwrite=True)
  flat = flat_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  leaves = {p: (tuple(v.shape), np.dtype(v.dtype)) for p, v in flat.items()}
  with IncrementalWriter(os.path.join(directory, PARAMS_DIR), leaves) as writer:
    for path, value in flat.items():    # an error (a full disk) removes params.partial
      writer.write(path, None, np.asarray(value))
  write_config(directory, model.cfg, **info)
  return os.path.abspath(directory)
