"""The conversion engine: lazy tensor readers, key checks, and the table-driven converters.

    reader = open_reader('pytorch_model.bin')          # or model.safetensors / an HF shard folder
    check_keys(keymap.radfm_table(), reader, shapes, layers, skip=keymap.RADFM_SKIP)
    for path, layer, array in torch_to_ours(table, reader, shapes, layers): ...   # one layer at a time
    for key, array in ours_to_torch(table, get_leaf, layers): ...                  # the inverse

Readers hand out one tensor at a time as numpy: `.bin` files through
`torch.load(mmap=True, weights_only=True)` (the zip archive stays on disk; only the tensor being
converted is paged in), safetensors through `safe_open`. Nothing here unpickles arbitrary code.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from radfm_jax.convert import keymap
from radfm_jax.convert.keymap import Entry


class CheckpointMismatchError(ValueError):
  """The checkpoint's keys do not match the key map: lists every missing, unexpected and
  wrong-shaped key."""

  def __init__(self, missing=(), unexpected=(), wrong_shape=(), note: str = ''):
    self.missing = sorted(missing)
    self.unexpected = sorted(unexpected)
    self.wrong_shape = sorted(wrong_shape)   # (key, found, expected)
    lines = [f'checkpoint does not match the key map{": " + note if note else ""}']
    if self.missing:
      lines.append(f'missing keys ({len(self.missing)}): {self.missing}')
    if self.unexpected:
      lines.append(f'unexpected keys ({len(self.unexpected)}): {self.unexpected}')
    if self.wrong_shape:
      lines.append('wrong shapes (key, found, expected): ' + ', '.join(
          f'({k}, {tuple(f)}, {tuple(e)})' for k, f, e in self.wrong_shape))
    super().__init__('\n'.join(lines))


class UnsafeCheckpointError(ValueError):
  """A `.bin` checkpoint holds pickled objects other than tensors and plain containers."""


# ------------------------------------------------------------------------------------------------
# Readers


def torch_to_numpy(t) -> np.ndarray:
  """A CPU torch tensor -> numpy, bit-exact (bfloat16 goes through an int16 view)."""
  import torch
  t = t.detach()
  if t.dtype == torch.bfloat16:
    import ml_dtypes
    return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


class DictReader:
  """An in-memory {key: tensor or ndarray} (tests, and state dicts built in Python)."""

  def __init__(self, tensors: Mapping):
    self._tensors = tensors

  def keys(self) -> list[str]:
    return list(self._tensors)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._tensors[key].shape)

  def get(self, key: str) -> np.ndarray:
    value = self._tensors[key]
    return value if isinstance(value, np.ndarray) else torch_to_numpy(value)


class TorchReader(DictReader):
  """A `torch.save` file, memory-mapped: tensors are read from disk when `get` asks for them."""

  def __init__(self, path: str):
    import pickle

    import torch
    try:
      state = torch.load(path, mmap=True, weights_only=True, map_location='cpu')
    except pickle.UnpicklingError as e:
      raise UnsafeCheckpointError(
          f'{path}: refused to unpickle it. Only tensors and plain containers are accepted '
          f'(torch.load(weights_only=True)); this file references other Python objects, which '
          f'could run arbitrary code. Details: {e}') from None
    except RuntimeError as e:
      if 'mmap' not in str(e):
        raise
      raise ValueError(f'{path}: not a zip-format torch checkpoint, which memory-mapping needs; '
                       f're-save it with torch.save (torch >= 1.6) or convert it to safetensors '
                       f'({e})') from None
    if isinstance(state, Mapping) and 'state_dict' in state and isinstance(state['state_dict'], Mapping):
      state = state['state_dict']   # Lightning / trainer wrappers
    if not isinstance(state, Mapping):
      raise ValueError(f'{path}: expected a state dict, got {type(state).__name__}')
    super().__init__(state)


class SafetensorsReader:
  """One or several safetensors files (HF shards), opened lazily with `safe_open`."""

  def __init__(self, paths: Sequence[str]):
    from safetensors import safe_open
    self._files = [safe_open(p, framework='pt') for p in paths]
    self._where = {}
    for f in self._files:
      for key in f.keys():
        self._where[key] = f

  def keys(self) -> list[str]:
    return list(self._where)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._where[key].get_slice(key).get_shape())

  def get(self, key: str) -> np.ndarray:
    return torch_to_numpy(self._where[key].get_tensor(key))


def open_reader(path: str):
  """A reader for a `.bin`/`.pt`/`.pth` file, a `.safetensors` file, or a folder of safetensors
  shards (HF `save_pretrained` output)."""
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, '*.safetensors')))
    if not files:
      bins = sorted(glob.glob(os.path.join(path, '*.bin')))
      if len(bins) == 1:
        return TorchReader(bins[0])
      raise FileNotFoundError(f'{path}: no *.safetensors shards (or single .bin) in this folder')
    return SafetensorsReader(files)
  if not os.path.exists(path):
    raise FileNotFoundError(path)
  if path.endswith('.safetensors'):
    return SafetensorsReader([path])
  return TorchReader(path)


# ------------------------------------------------------------------------------------------------
# Checks and conversion


def check_keys(table: Sequence[Entry], reader, our_shapes: dict[str, tuple[int, ...]],
               num_layers: dict[str, int], skip: Sequence[str] = (), note: str = ''):
  """Raises `CheckpointMismatchError` unless the reader holds exactly the table's keys (aliases
  optional, `skip` patterns ignored) with the expected shapes."""
  expected = keymap.expected_keys(table, our_shapes, num_layers)
  optional = {e.key() for e in table if e.kind == 'alias'}
  present = set(reader.keys())
  missing = [k for k in expected if k not in present and k not in optional]
  unexpected = [k for k in present if k not in expected and not keymap.is_skipped(k, skip)]
  wrong = [(k, reader.shape(k), expected[k]) for k in expected
           if k in present and reader.shape(k) != tuple(expected[k])]
  if missing or unexpected or wrong:
    raise CheckpointMismatchError(missing, unexpected, wrong, note)


def torch_to_ours(table: Sequence[Entry], reader, our_shapes: dict[str, tuple[int, ...]],
                  num_layers: dict[str, int], dtypes: dict[str, np.dtype] | None = None,
                  ) -> Iterator[tuple[str, int | None, np.ndarray]]:
  """Yields (our path, layer index or None, array) one torch tensor at a time.

  Stacked leaves come as per-layer slices (index i of the leading `layers` axis), so a writer can
  store them without ever holding a whole stacked leaf. `dtypes` casts per path (default: keep).
  """
  for entry in table:
    if entry.kind == 'alias':
      continue
    layers = range(num_layers[entry.ours[0]]) if entry.stacked else [None]
    for i in layers:
      shapes = [our_shapes[p][1:] if entry.stacked else our_shapes[p] for p in entry.ours]
      tensor = reader.get(entry.key(i))
      for path, array in zip(entry.ours, keymap.to_ours(entry, tensor, shapes)):
        if dtypes is not None:
          array = array.astype(dtypes[path], copy=False)
        yield path, i, array
      del tensor


def ours_to_torch(table: Sequence[Entry], get_leaf: Callable[[str], np.ndarray],
                  num_layers: dict[str, int], include_aliases: bool = True,
                  ) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (torch key, array) in table order. `get_leaf(path)` returns one whole (stacked) leaf;
  leaves are fetched per entry and dropped once its layers are out."""
  for entry in table:
    if entry.kind == 'alias' and not include_aliases:
      continue
    leaves = [get_leaf(p) for p in entry.ours]
    if entry.stacked:
      for i in range(num_layers[entry.ours[0]]):
        yield entry.key(i), keymap.to_torch(entry, [leaf[i] for leaf in leaves])
    else:
      yield entry.key(), keymap.to_torch(entry, leaves)
    del leaves


# ------------------------------------------------------------------------------------------------
# Flat views of NNX parameter trees


def flat_params(tree) -> dict[str, object]:
  """Nested pure dict -> {'a/b/c': leaf}."""
  out = {}

  def walk(node, prefix):
    if isinstance(node, Mapping):
      for k, v in node.items():
        walk(v, f'{prefix}{k}/')
    else:
      out[prefix[:-1]] = node
  walk(tree, '')
  return out


def unflatten(flat: Mapping[str, object]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    *parents, leaf = path.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def stacked_layers(table: Sequence[Entry], our_shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
  """path -> layer count (leading axis) for every path of a stacked entry."""
  return {p: our_shapes[p][0] for e in table if e.stacked for p in e.ours}


def load_state_dict(module, table: Sequence[Entry], state_dict: Mapping, skip: Sequence[str] = ()):
  """Loads a torch state dict (tensors or ndarrays) into an NNX module in place through `table`.

  Every leaf the table names must be covered; shapes and keys are checked first.
  """
  import jax.numpy as jnp
  from flax import nnx

  state = nnx.state(module, nnx.Param)
  flat = flat_params(nnx.to_pure_dict(state))
  shapes = {p: tuple(v.shape) for p, v in flat.items()}
  layers = stacked_layers(table, shapes)
  reader = DictReader(state_dict)
  check_keys(table, reader, shapes, layers, skip)
  new = {p: np.empty(shapes[p], np.dtype(flat[p].dtype)) for e in table if e.kind != 'alias'
         for p in e.ours}
  for path, i, array in torch_to_ours(table, reader, shapes, layers):
    if i is None:
      new[path][...] = array
    else:
      new[path][i] = array
  missing = sorted(set(flat) - set(new))
  if missing:
    raise CheckpointMismatchError(note=f'the table leaves parameters unset: {missing}')
  nnx.replace_by_pure_dict(state, unflatten({p: jnp.asarray(v) for p, v in new.items()}))
  nnx.update(module, state)
  return module


def state_dict_of(module, table: Sequence[Entry]) -> dict[str, np.ndarray]:
  """The inverse of `load_state_dict`: {torch key: ndarray} for an NNX module."""
  from flax import nnx
  flat = flat_params(nnx.to_pure_dict(nnx.state(module, nnx.Param)))
  layers = stacked_layers(table, {p: tuple(v.shape) for p, v in flat.items()})
  return dict(ours_to_torch(table, lambda p: np.asarray(flat[p]), layers))


def read_json(path: str) -> dict | None:
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return None
