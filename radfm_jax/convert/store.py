"""Orbax checkpoints written one slice at a time, read one leaf at a time, restored onto a mesh.

Layout of a converted checkpoint directory:

    DIR/config.json     the resolved config ({'model': {...}}, plus where it came from)
    DIR/params/         an Orbax PyTree checkpoint of `nnx.to_pure_dict(nnx.state(model, nnx.Param))`

Bounded memory. Orbax saves whole leaves, and the stacked LLaMA leaves are large (13B: the
[40, 5120, 13824] gate kernel is 11 GB in float32), so `IncrementalWriter` lets Orbax write the
checkpoint's tree metadata for a skeleton of 1-element arrays (non-OCDBT, zarr v2: one TensorStore
array per leaf), then re-creates each leaf's array at its real shape with the same dtype and
compressor and fills it slice by slice (one layer of one tensor at a time) through TensorStore. The
result is an ordinary Orbax checkpoint: `ocp.StandardCheckpointer().restore` / `load_checkpoint`
read it as one tree, onto any mesh.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from typing import Mapping

import numpy as np

from radfm_jax.config import LlamaConfig, ModelConfig, PerceiverConfig, VisionConfig, _validate_model
from radfm_jax.convert.engine import flat_params, trim_memory, unflatten

PARAMS_DIR = 'params'
CONFIG_FILE = 'config.json'
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

  `plans` (path -> (axis, block) of the per-layer leaf, from `engine.split_plans`) makes each zarr
  chunk exactly one written block, so no chunk is ever read back, merged and recompressed.

  Data goes to `<directory>.partial` and is renamed into place by `close`, so an interrupted
  conversion never leaves a directory that looks like a checkpoint.
  """

  def __init__(self, directory: str, leaves: Mapping[str, tuple[tuple[int, ...], np.dtype]],
               stacked=(), plans: Mapping[str, tuple[int, int] | None] | None = None):
    import orbax.checkpoint as ocp
    import tensorstore as ts

    self.directory = os.path.abspath(directory)
    self.tmp = self.directory + '.partial'
    if os.path.exists(self.tmp):
      shutil.rmtree(self.tmp)
    self.leaves = {p: (tuple(s), np.dtype(d)) for p, (s, d) in leaves.items()}
    skeleton = {p: np.zeros((1,) * len(s), d) for p, (s, d) in self.leaves.items()}
    ocp.PyTreeCheckpointer(use_ocdbt=False, use_zarr3=False).save(
        self.tmp, args=ocp.args.PyTreeSave(unflatten(skeleton)))
    self.arrays, self.todo = {}, {}
    for path, (shape, dtype) in self.leaves.items():
      leaf_dir = os.path.join(self.tmp, '.'.join(path.split('/')))
      meta_file = os.path.join(leaf_dir, '.zarray')
      if not os.path.exists(meta_file):
        raise RuntimeError(f'Orbax wrote no zarr array at {leaf_dir}: the on-disk layout this '
                           'writer relies on (non-OCDBT zarr v2, one array per leaf) has changed')
      with open(meta_file) as f:
        meta = json.load(f)
      shutil.rmtree(leaf_dir)
      spec = {'driver': 'zarr', 'kvstore': {'driver': 'file', 'path': leaf_dir},
              'metadata': {'shape': list(shape), 'dtype': meta['dtype'],
                           'compressor': meta['compressor'], 'fill_value': meta['fill_value'],
                           'chunks': self._chunk_shape(path, shape, dtype, path in stacked, plans),
                           'order': 'C', 'dimension_separator': meta.get('dimension_separator', '.')}}
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
    target.write(np.asarray(array, dtype)).result()
    self.todo[path] -= array.size
    if array.nbytes > (8 << 20):
      trim_memory()

  def close(self):
    unwritten = {p: n for p, n in self.todo.items() if n}
    if unwritten:
      raise RuntimeError(f'checkpoint incomplete, elements never written: {unwritten}')
    self.arrays.clear()
    if os.path.exists(self.directory):
      shutil.rmtree(self.directory)
    os.replace(self.tmp, self.directory)


# ------------------------------------------------------------------------------------------------
# Config beside the checkpoint


def config_to_dict(cfg: ModelConfig) -> dict:
  return dataclasses.asdict(cfg)


def config_from_dict(d: Mapping) -> ModelConfig:
  d = dict(d)
  cfg = ModelConfig(vision=VisionConfig(**d.pop('vision')),
                    perceiver=PerceiverConfig(**d.pop('perceiver')),
                    llama=LlamaConfig(**d.pop('llama')), **d)
  _validate_model(cfg)
  return cfg


def write_config(directory: str, cfg: ModelConfig, **info):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, CONFIG_FILE), 'w') as f:
    json.dump({'model': config_to_dict(cfg), **info}, f, indent=2, sort_keys=True)


def read_config(directory: str) -> ModelConfig:
  path = os.path.join(directory, CONFIG_FILE)
  probe = os.path.abspath(directory)
  while not os.path.exists(path):      # a step folder inside a run: look upwards
    parent = os.path.dirname(probe)
    if parent == probe:
      raise FileNotFoundError(f'no {CONFIG_FILE} in {directory} or its parents')
    probe = parent
    path = os.path.join(probe, CONFIG_FILE)
  with open(path) as f:
    data = json.load(f)
  return config_from_dict(data['model'])


# ------------------------------------------------------------------------------------------------
# Reading


_ITEMS = ('params', 'state', 'model', 'default')


def params_dir(directory: str) -> str:
  """The Orbax PyTree folder holding the parameters under `directory`: a converted checkpoint's
  `params/`, a PyTree checkpoint itself, a step folder's item (`state`, ...), or the latest step of a
  CheckpointManager run (also under `checkpoints/`, the training workdir layout)."""
  directory = os.path.abspath(directory)

  def has_tree(d):
    return os.path.exists(os.path.join(d, '_METADATA'))

  for root in (directory, os.path.join(directory, 'checkpoints')):
    if not os.path.isdir(root):
      continue
    if has_tree(root):
      return root
    for item in _ITEMS:
      if has_tree(os.path.join(root, item)):
        return os.path.join(root, item)
    steps = sorted((int(n) for n in os.listdir(root) if n.isdigit()), reverse=True)
    for step in steps:
      for item in _ITEMS:
        if has_tree(os.path.join(root, str(step), item)):
          return os.path.join(root, str(step), item)
  raise FileNotFoundError(f'{directory}: no Orbax parameter checkpoint found (expected params/, a '
                          'PyTree checkpoint, a step item or numbered steps)')


def _tree_layout(directory: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(prefix, suffix) of the parameter keys in a PyTree checkpoint: () / () for a bare parameter
  dict, ('params',) / ('value',) for a TrainState holding an `nnx.State` (whose Variables flatten
  to a trailing 'value'), ('model',) / () for {'model': params, ...}."""
  with open(os.path.join(directory, '_METADATA')) as f:
    tree = json.load(f)['tree_metadata']
  for entry in tree.values():
    keys = tuple(str(k['key']) for k in entry['key_metadata'])
    if 'llama' in keys:
      start = keys.index('llama')
      return keys[:start], (('value',) if keys[-1] == 'value' else ())
  raise ValueError(f'{directory}: no RadFM parameters in this checkpoint (no llama/... keys)')


def _nest(prefix: tuple[str, ...], tree):
  for name in reversed(prefix):
    tree = {name: tree}
  return tree


def _restore(directory: str, target: dict, as_numpy: bool):
  """Partial Orbax restore of the (nested) `target` of ShapeDtypeStructs; returns that structure."""
  import jax
  import orbax.checkpoint as ocp

  prefix, suffix = _tree_layout(directory)
  flat = flat_params(target)
  item = _nest(prefix, unflatten({p + ''.join('/' + s for s in suffix): v for p, v in flat.items()}))

  def args_for(sds):
    if as_numpy:
      return ocp.RestoreArgs(restore_type=np.ndarray, dtype=sds.dtype)
    return ocp.ArrayRestoreArgs(sharding=sds.sharding, global_shape=sds.shape, dtype=sds.dtype)

  restore_args = jax.tree.map(args_for, item)
  out = ocp.PyTreeCheckpointer().restore(directory, args=ocp.args.PyTreeRestore(
      item=item, restore_args=restore_args, partial_restore=True))
  for name in prefix:
    out = out[name]
  out = flat_params(out)
  return unflatten({p: out[p + ''.join('/' + s for s in suffix)] for p in flat})


class LeafReader:
  """Reads parameters from an Orbax checkpoint as numpy, one layer of one leaf at a time.

      leaf = LeafReader('ckpt/', cfg); leaf('llama/layers/gate/kernel', 3)   # [hidden, mlp]

  Leaves are opened with TensorStore at the spec Orbax wrote them with (zarr or zarr3, plain files
  or OCDBT, from the checkpoint's `_METADATA`), which allows reading a slice; if that fails, the
  whole leaf is restored through Orbax.
  """

  def __init__(self, directory: str, cfg: ModelConfig):
    from flax import nnx

    from radfm_jax.models.radfm import abstract_model
    self.directory = params_dir(directory)
    _, state = abstract_model(cfg)
    self.abstract = flat_params(nnx.to_pure_dict(state))
    self._prefix, self._suffix = _tree_layout(self.directory)
    with open(os.path.join(self.directory, '_METADATA')) as f:
      meta = json.load(f)
    self._ocdbt, self._zarr3 = meta.get('use_ocdbt', True), meta.get('use_zarr3', False)
    self._open = {}

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {p: tuple(v.shape) for p, v in self.abstract.items()}

  def _tensorstore(self, path: str):
    import tensorstore as ts
    if path not in self._open:
      name = '.'.join(self._prefix + tuple(path.split('/')) + self._suffix)
      if self._ocdbt:
        kv = {'driver': 'ocdbt', 'base': f'file://{self.directory}', 'path': name}
      else:
        kv = {'driver': 'file', 'path': os.path.join(self.directory, name)}
      try:
        self._open[path] = ts.open({'driver': 'zarr3' if self._zarr3 else 'zarr', 'kvstore': kv},
                                   open=True, read=True).result()
      except Exception:   # noqa: BLE001  (any layout we cannot open directly: use Orbax)
        self._open[path] = None
    return self._open[path]

  def __call__(self, path: str, index: int | None = None) -> np.ndarray:
    import jax
    sds = self.abstract[path]
    array = self._tensorstore(path)
    if array is not None and tuple(array.shape) == tuple(sds.shape):
      out = (array if index is None else array[index]).read().result()
    else:
      whole = _restore(self.directory, unflatten({path: jax.ShapeDtypeStruct(sds.shape, sds.dtype)}),
                       as_numpy=True)
      out = flat_params(whole)[path]
      out = out if index is None else out[index]
    return np.asarray(out).astype(sds.dtype, copy=False)


def load_checkpoint(directory: str, mesh=None, rules=None):
  """Restores a converted or trained checkpoint onto the available devices: (model, ModelConfig).

  mesh: a `jax.sharding.Mesh` with axes (data, fsdp, tensor); default one `fsdp` axis over every
  device. rules: logical rules (default `LOGICAL_RULES['fsdp']`). Parameters are read straight into
  their NamedShardings; nothing is initialised randomly first.
  """
  from flax import nnx

  from radfm_jax import sharding
  from radfm_jax.config import MeshConfig
  from radfm_jax.models.radfm import abstract_model

  cfg = read_config(directory)
  if mesh is None:
    mesh = sharding.make_mesh(MeshConfig())
  rules = rules or sharding.LOGICAL_RULES['fsdp']
  graphdef, state = abstract_model(cfg, mesh, rules)
  target = nnx.to_pure_dict(state)
  restored = _restore(params_dir(directory), target, as_numpy=False)
  nnx.replace_by_pure_dict(state, restored)
  return nnx.merge(graphdef, state), cfg
