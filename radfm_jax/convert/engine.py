"""The conversion engine: lazy tensor readers, key checks, and the table-driven converters.

    reader = open_reader('pytorch_model.bin')          # or model.safetensors / an HF shard folder
    check_keys(keymap.radfm_table(), reader, shapes, layers, skip=keymap.RADFM_SKIP)
    for path, layer, region, array in torch_to_ours(table, reader, shapes, layers): ...  # slab by slab
    for key, array in ours_to_torch(table, get_leaf, layers): ...                  # the inverse

Readers hand out one tensor at a time as numpy: `.bin` files through
`torch.load(mmap=True, weights_only=True)` (the zip archive stays on disk; only the tensor being
converted is paged in, and its pages are dropped once it is written), safetensors by positioned
reads at the offsets of the file's JSON header. Nothing here unpickles arbitrary code.
"""

from __future__ import annotations

import ctypes
import glob
import json
import mmap
import os
import struct
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from radfm_jax.checkpoint import tree
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

  def get_rows(self, key: str, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the tensor (memory-mapped sources page in only those)."""
    return self.get(key)[start:stop]

  def release(self, key: str):
    """Called once a tensor has been consumed (lets file-backed readers drop its pages)."""


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
    self._mapped = _file_mappings(path)

  def get_rows(self, key: str, start: int, stop: int) -> np.ndarray:
    """A private copy of rows [start, stop); the mapping's pages behind them are dropped at once."""
    view = self.get(key)[start:stop]
    rows = np.array(view)
    self._drop_pages(view)
    return rows

  def release(self, key: str):
    self._drop_pages(self.get(key))

  def _drop_pages(self, view: np.ndarray):
    """Drops the pages behind a view of the memory-mapped file from the resident set. They are
    clean, so the kernel just forgets them (a later access re-reads the file); without this every
    page read stays resident and converting a .bin shows the whole file as resident. Only ranges
    inside this file's own mappings are touched: on anonymous memory MADV_DONTNEED would zero it."""
    if view.nbytes == 0:
      return
    page = mmap.PAGESIZE
    ptr = view.__array_interface__['data'][0]
    start, end = ptr & ~(page - 1), (ptr + view.nbytes + page - 1) & ~(page - 1)
    if any(lo <= start and end <= hi for lo, hi in self._mapped):
      tree.libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED


def _file_mappings(path: str) -> list[tuple[int, int]]:
  """Address ranges where `path` is memory-mapped in this process (Linux; else none)."""
  real = os.path.realpath(path)
  ranges = []
  try:
    with open('/proc/self/maps') as f:
      for line in f:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].strip() == real:
          lo, hi = parts[0].split('-')
          ranges.append((int(lo, 16), int(hi, 16)))
  except OSError:
    pass
  return ranges


_ST_DTYPES = {'F64': 'float64', 'F32': 'float32', 'F16': 'float16', 'BF16': 'bfloat16',
              'I64': 'int64', 'I32': 'int32', 'I16': 'int16', 'I8': 'int8', 'U8': 'uint8',
              'BOOL': 'bool'}


class SafetensorsReader:
  """One or several safetensors files (HF shards). The header is parsed once; each tensor is read
  with a plain positioned read into a fresh array. (`safe_open` memory-maps the whole file, and every
  page it touches stays in the process's resident set until the handle closes; reading into our own
  buffer keeps the resident set at one tensor.)"""

  def __init__(self, paths: Sequence[str]):
    self._where = {}
    for path in paths:
      with open(path, 'rb') as f:
        size = struct.unpack('<Q', f.read(8))[0]
        header = json.loads(f.read(size))
      header.pop('__metadata__', None)
      for key, info in header.items():
        if info['dtype'] not in _ST_DTYPES:
          raise ValueError(f'{path}: {key} has unsupported dtype {info["dtype"]}')
        self._where[key] = (path, 8 + size + info['data_offsets'][0], tuple(info['shape']),
                            info['dtype'])

  def keys(self) -> list[str]:
    return list(self._where)

  def shape(self, key: str) -> tuple[int, ...]:
    return self._where[key][2]

  def get(self, key: str) -> np.ndarray:
    shape = self._where[key][2]
    return self.get_rows(key, 0, shape[0] if shape else 1).reshape(shape)

  def get_rows(self, key: str, start: int, stop: int) -> np.ndarray:
    import ml_dtypes
    path, offset, shape, dtype = self._where[key]
    dtype = np.dtype(ml_dtypes.bfloat16) if dtype == 'BF16' else np.dtype(_ST_DTYPES[dtype])
    row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    out = np.empty((stop - start,) + tuple(shape[1:]), dtype)
    with open(path, 'rb') as f:
      f.seek(offset + start * row)
      if f.readinto(memoryview(out.reshape(-1)).cast('B')) != out.nbytes:
        raise ValueError(f'{path}: truncated data for {key}')
    return out

  def release(self, key: str):
    pass


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


BLOCK_BYTES = 8 << 20    # slab of torch rows converted at once (a few copies of it are live)


def split_plans(table: Sequence[Entry], our_shapes: dict[str, tuple[int, ...]],
                block_bytes: int = BLOCK_BYTES) -> dict[str, tuple[int, int] | None]:
  """path -> (axis of the per-layer leaf, block length) as `torch_to_ours` will write it (writers
  align their chunks with it, so no chunk is ever read back and rewritten)."""
  plans = {}
  for entry in table:
    if entry.kind == 'alias':
      continue
    for p in entry.ours:
      shape = our_shapes[p][1:] if entry.stacked else our_shapes[p]
      plans[p] = keymap.split_plan(entry, shape, block_bytes)
  return plans


def torch_to_ours(table: Sequence[Entry], reader, our_shapes: dict[str, tuple[int, ...]],
                  num_layers: dict[str, int], dtypes: dict[str, np.dtype] | None = None,
                  block_bytes: int = BLOCK_BYTES,
                  ) -> Iterator[tuple[str, int | None, tuple[slice, ...] | None, np.ndarray]]:
  """Yields (our path, layer index or None, region or None, array), one slab at a time.

  Stacked leaves come per layer (index i of the leading `layers` axis); tensors of 2+ dims come in
  slabs of at most ~`block_bytes` (`region`: slices of the per-layer leaf; None = all of it), so a
  writer never holds a whole tensor, let alone a whole stacked leaf. `dtypes` casts per path.
  """
  plans = split_plans(table, our_shapes, block_bytes)
  for entry in table:
    if entry.kind == 'alias':
      continue
    layers = range(num_layers[entry.ours[0]]) if entry.stacked else [None]
    for i in layers:
      key = entry.key(i)
      shapes = [our_shapes[p][1:] if entry.stacked else our_shapes[p] for p in entry.ours]
      for j, (path, shape) in enumerate(zip(entry.ours, shapes)):
        plan = plans[path]
        cast = (lambda a: a) if dtypes is None else (lambda a: a.astype(dtypes[path], copy=False))
        if plan is None:
          (array,) = keymap.to_ours(entry, reader.get(key), [shape])
          yield path, i, None, cast(array)
          continue
        axis, step = plan
        unit = keymap.torch_rows_per_unit(entry, shape)
        base = j * shape[axis] * unit          # fused: part j's first torch row
        for start in range(0, shape[axis], step):
          stop = min(start + step, shape[axis])
          rows = reader.get_rows(key, base + start * unit, base + stop * unit)
          region, array = keymap.block_to_ours(entry, rows, shape, axis, start, stop)
          yield path, i, region, cast(array)
          del rows, array
      reader.release(key)


def ours_to_torch(table: Sequence[Entry], get_leaf: Callable[[str, int | None], np.ndarray],
                  num_layers: dict[str, int], include_aliases: bool = True,
                  ) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (torch key, array) in table order (the order of `keymap.expected_keys`).

  `get_leaf(path, i)` returns layer i of a stacked leaf, or the whole leaf for i None, so one layer
  of one parameter kind is in memory at a time.
  """
  for entry in table:
    if entry.kind == 'alias' and not include_aliases:
      continue
    layers = range(num_layers[entry.ours[0]]) if entry.stacked else [None]
    for i in layers:
      yield entry.key(i), keymap.to_torch(entry, [get_leaf(p, i) for p in entry.ours])


def stacked_layers(table: Sequence[Entry], our_shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
  """path -> layer count (leading axis) for every path of a stacked entry."""
  return {p: our_shapes[p][0] for e in table if e.stacked for p in e.ours}


def load_state_dict(module, table: Sequence[Entry], state_dict: Mapping, skip: Sequence[str] = (),
                    block_bytes: int = BLOCK_BYTES):
  """Loads a torch state dict (tensors or ndarrays) into an NNX module in place through `table`.

  Every leaf the table names must be covered; shapes and keys are checked first.
  """
  import jax.numpy as jnp
  from flax import nnx

  state = nnx.state(module, nnx.Param)
  flat = tree.flat_params(nnx.to_pure_dict(state))
  shapes = {p: tuple(v.shape) for p, v in flat.items()}
  layers = stacked_layers(table, shapes)
  reader = DictReader(state_dict)
  check_keys(table, reader, shapes, layers, skip)
  new = {p: np.empty(shapes[p], np.dtype(flat[p].dtype)) for e in table if e.kind != 'alias'
         for p in e.ours}
  for path, i, region, array in torch_to_ours(table, reader, shapes, layers,
                                              block_bytes=block_bytes):
    target = new[path] if i is None else new[path][i]
    target[region if region is not None else ...] = array
  missing = sorted(set(flat) - set(new))
  if missing:
    raise CheckpointMismatchError(note=f'the table leaves parameters unset: {missing}')
  nnx.replace_by_pure_dict(state, tree.unflatten({p: jnp.asarray(v) for p, v in new.items()}))
  nnx.update(module, state)
  return module


def state_dict_of(module, table: Sequence[Entry]) -> dict[str, np.ndarray]:
  """The inverse of `load_state_dict`: {torch key: ndarray} for an NNX module."""
  from flax import nnx
  flat = tree.flat_params(nnx.to_pure_dict(nnx.state(module, nnx.Param)))
  layers = stacked_layers(table, {p: tuple(v.shape) for p, v in flat.items()})
  return dict(ours_to_torch(
      table, lambda p, i: np.asarray(flat[p] if i is None else flat[p][i]), layers))


def read_json(path: str) -> dict | None:
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return None
