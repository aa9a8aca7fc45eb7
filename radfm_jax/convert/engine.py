"""The conversion engine: lazy tensor readers, key checks, and the table-driven converters.

    reader = open_reader('pytorch_model.bin')          # or model.safetensors / an HF shard folder
    check_keys(keymap.radfm_table(), reader, shapes, layers, skip=keymap.RADFM_SKIP)
    for path, layer, region, array in torch_to_ours(table, reader, shapes, layers): ...  # slab by slab
    for key, array in ours_to_torch(table, get_leaf, layers): ...                  # the inverse

Readers hand out one tensor at a time as numpy: `.bin` files through
`torch.load(mmap=True, weights_only=True)` (the zip archive stays on disk; only the tensor being
converted is paged in, and its pages are dropped once it is written), safetensors by positioned
reads at the offsets of the file's JSON header. Nothing here unpickles arbitrary code.

Nothing is trusted: each reader validates its file when opened (`SafetensorsReader`,
`TorchReader` say which checks are the library's and which ours), `check_keys` checks keys,
shapes, dtypes (`ACCEPTED_DTYPES`, others only with `cast`) and that no two read keys share bytes
before anything is written, and every value is range-checked as it is cast. Every failure is an
`InputError` naming the file and the key.
"""

from __future__ import annotations

import ctypes
import glob
import json
import math
import mmap
import os
import struct
import zipfile
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from radfm_jax import casting as cast_lib
from radfm_jax.checkpoint import tree
from radfm_jax.convert import keymap
from radfm_jax.convert.keymap import Entry
from radfm_jax.errors import InputError


def _listed(items: list, shown: int = 20, join=str) -> str:
  """The first `shown` items, and how many more (a state dict nested one level down misses all
  ~900 keys, a config of another size gets every shape wrong: the line stays readable; the
  exception keeps every item in `.missing`, `.unexpected`, `.wrong_shape`). `join`: how the shown
  items are written (default: as a Python list)."""
  more = f' ... and {len(items) - shown} more' if len(items) > shown else ''
  return f'{join(items[:shown])}{more}'


def _shapes(wrong: list) -> str:
  return ', '.join(f'({k}, {tuple(f)}, {tuple(e)})' for k, f, e in wrong)


class CheckpointMismatchError(InputError):
  """The checkpoint's keys do not match the key map: lists the missing, unexpected and
  wrong-shaped keys, the first 20 of each and how many more (one line: the CLI prints it as
  is); the attributes hold them all."""

  def __init__(self, missing=(), unexpected=(), wrong_shape=(), note: str = ''):
    self.missing = sorted(missing)
    self.unexpected = sorted(unexpected)
    self.wrong_shape = sorted(wrong_shape)   # (key, found, expected)
    parts = [f'{note + ": " if note else ""}checkpoint does not match the key map']
    if self.missing:
      parts.append(f'missing keys ({len(self.missing)}): {_listed(self.missing)}')
    if self.unexpected:
      parts.append(f'unexpected keys ({len(self.unexpected)}): {_listed(self.unexpected)}')
    if self.wrong_shape:
      parts.append(f'wrong shapes (key, found, expected) of {len(self.wrong_shape)} keys: '
                   f'{_listed(self.wrong_shape, join=_shapes)}')
    super().__init__('; '.join(parts))


class UnsafeCheckpointError(InputError):
  """A `.bin` checkpoint holds pickled objects other than tensors and plain containers."""


# The dtypes a converted tensor may have without `cast=True`: the official checkpoint is float32
# (all 906 parameters; its two int64 buffers sit in the dead branch, never read), HF shards are
# float16 / bfloat16; float64 is accepted too, each value checked against the target's range.
ACCEPTED_DTYPES = cast_lib.FLOAT_NAMES


# ------------------------------------------------------------------------------------------------
# Readers: keys(), shape(key), dtype(key), extent(key), get(key), get_rows(key, start, stop),
# release(key)


def torch_to_numpy(t) -> np.ndarray:
  """A CPU torch tensor -> numpy, bit-exact (bfloat16 goes through an int16 view)."""
  import torch
  t = t.detach()
  if t.dtype == torch.bfloat16:
    import ml_dtypes
    return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


class DictReader:
  """An in-memory {key: tensor or ndarray} (tests, and state dicts built in Python). `source`
  names it in messages."""

  def __init__(self, tensors: Mapping, source: str = 'state dict'):
    self._tensors = tensors
    self.source = source

  def keys(self) -> list[str]:
    return list(self._tensors)

  def where(self, key: str) -> str:
    return f'{self.source} key {key}'

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._tensors[key].shape)

  def dtype(self, key: str) -> np.dtype:
    """The numpy dtype the tensor reads as (a torch dtype numpy has no match for is an error)."""
    value = self._tensors[key]
    if isinstance(value, np.ndarray):
      return value.dtype
    import torch
    try:
      return torch_to_numpy(torch.empty(0, dtype=value.dtype)).dtype
    except (TypeError, RuntimeError):
      raise InputError(f'{self.where(key)}: dtype {value.dtype} has no numpy '
                       f'equivalent; expected one of {", ".join(ACCEPTED_DTYPES)}') from None

  def extent(self, key: str) -> tuple[int, int] | None:
    """[first, last) byte address of the tensor's elements in memory (None when empty): two keys
    whose extents overlap share bytes."""
    value = self._tensors[key]
    if isinstance(value, np.ndarray):
      ptr, item, strides, count = (value.__array_interface__['data'][0], value.dtype.itemsize,
                                   value.strides, value.size)
    else:
      item = value.element_size()
      ptr, strides, count = value.data_ptr(), [s * item for s in value.stride()], value.numel()
    if count == 0:
      return None
    low = ptr + sum((n - 1) * st for n, st in zip(value.shape, strides) if st < 0)
    high = ptr + sum((n - 1) * st for n, st in zip(value.shape, strides) if st > 0) + item
    return low, high

  def get(self, key: str) -> np.ndarray:
    value = self._tensors[key]
    return value if isinstance(value, np.ndarray) else torch_to_numpy(value)

  def get_rows(self, key: str, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the tensor (memory-mapped sources page in only those)."""
    return self.get(key)[start:stop]

  def release(self, key: str):
    """Called once a tensor has been consumed (lets file-backed readers drop its pages)."""


class TorchReader(DictReader):
  """A `torch.save` file, memory-mapped: tensors are read from disk when `get` asks for them.

  Checks. torch's own (`torch.load(mmap=True, weights_only=True)`): only tensors and plain
  containers are unpickled (anything else: `UnsafeCheckpointError`), the zip archive must be whole
  (its central directory is at the end, so a truncated file fails), a tensor must fit its storage
  as the pickle declares it. Ours: every storage must match its archive record byte for byte
  (offset and size: torch trusts the pickle's element count, so a record shorter than its storage
  would read the next record's bytes), checked from the zip's directory and local headers only;
  keys that share bytes are caught by `check_distinct` (the official `embedding_layer.weight`
  shares embed_tokens' storage, as an alias the converter never reads).
  """

  def __init__(self, path: str):
    import pickle

    import torch
    try:
      state = torch.load(path, mmap=True, weights_only=True, map_location='cpu')
    except pickle.UnpicklingError as e:
      raise UnsafeCheckpointError(
          f'{path}: refused to unpickle it. Only tensors and plain containers are accepted '
          f'(torch.load(weights_only=True)); this file references other Python objects, which '
          f'could run arbitrary code. Details: {_one_line(e)}') from None
    except RuntimeError as e:
      if 'mmap' in str(e):
        raise InputError(f'{path}: not a zip-format torch checkpoint, which memory-mapping needs; '
                         f're-save it with torch.save (torch >= 1.6) or convert it to '
                         f'safetensors ({_one_line(e)})') from None
      raise InputError(f'{path}: not a readable torch checkpoint (truncated or corrupt zip '
                       f'archive?): {_one_line(e)}') from None
    except (EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
      raise InputError(f'{path}: not a readable torch checkpoint: {_one_line(e)}') from None
    if isinstance(state, Mapping) and 'state_dict' in state and isinstance(state['state_dict'], Mapping):
      # Lightning / trainer wrappers (beside it: optimizer state, counters); a tensor beside it
      # would be lost with them
      beside = [k for k, v in state.items() if k != 'state_dict' and isinstance(v, torch.Tensor)]
      if beside:
        raise InputError(f'{path}: holds a "state_dict" and, beside it, the tensor {beside[0]!r}; '
                         'expected one state dict')
      state = state['state_dict']
    if not isinstance(state, Mapping):
      raise InputError(f'{path}: expected a state dict, got {type(state).__name__}')
    for key, value in state.items():
      if not isinstance(key, str):
        raise InputError(f'{path}: key {key!r} is a {type(key).__name__}; expected the string '
                         'keys of a state dict')
      if not isinstance(value, (torch.Tensor, Mapping)):   # a Mapping: told by the key map
        raise InputError(f'{path}: key {key}: got a {type(value).__name__}; expected a tensor')
    super().__init__(state, source=path)
    self._mapped = _file_mappings(path)
    self._check_storages(path)

  def _check_storages(self, path: str):
    """Each tensor's storage lies exactly on one `data/<n>` record of the archive."""
    import torch
    if not self._mapped:
      return   # no /proc/self/maps (non-Linux): torch's own checks only
    records = zip_records(path)
    for key, value in self._tensors.items():
      if not isinstance(value, torch.Tensor):
        continue
      storage = value.untyped_storage()
      if storage.nbytes() == 0:
        continue
      ptr = storage.data_ptr()
      offset = next((ptr - lo + off for lo, hi, off in self._mapped if lo <= ptr < hi), None)
      if offset is None:
        continue   # not in this file's mapping (torch copied it): nothing to compare against
      size = records.get(offset)
      if size != storage.nbytes():
        raise InputError(
            f'{path}: key {key}: its storage of {storage.nbytes()} bytes at file offset {offset} '
            f'does not match the archive record there '
            f'({"none" if size is None else f"{size} bytes"}); the file is corrupt')

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
    if any(lo <= start and end <= hi for lo, hi, _ in self._mapped):
      tree.libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED


def _one_line(e: BaseException, limit: int = 300) -> str:
  """An exception's message on one line, cut to `limit` characters."""
  text = ' '.join(str(e).split())
  return text if len(text) <= limit else text[:limit] + '...'


def zip_data_offset(f, info: zipfile.ZipInfo) -> int:
  """File offset of a stored zip member's bytes: after its local header (30 bytes + name + extra
  field, whose lengths are at bytes 26..29 and may differ from the central directory's)."""
  f.seek(info.header_offset)
  name_len, extra_len = struct.unpack('<HH', f.read(30)[26:30])
  return info.header_offset + 30 + name_len + extra_len


def zip_records(path: str) -> dict[int, int]:
  """{file offset of a stored member's bytes: its size} for the `data/<n>` records of a
  `torch.save` archive (reads the central directory and one local header per record)."""
  out = {}
  with zipfile.ZipFile(path) as archive, open(path, 'rb') as f:
    for info in archive.infolist():
      parts = info.filename.split('/')
      if len(parts) >= 2 and parts[-2] == 'data' and info.compress_type == zipfile.ZIP_STORED:
        out[zip_data_offset(f, info)] = info.file_size
  return out


def _file_mappings(path: str) -> list[tuple[int, int, int]]:
  """(first, last address, file offset) of each range where `path` is memory-mapped in this
  process (Linux; else none)."""
  real = os.path.realpath(path)
  ranges = []
  try:
    with open('/proc/self/maps') as f:
      for line in f:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].strip() == real:
          lo, hi = parts[0].split('-')
          ranges.append((int(lo, 16), int(hi, 16), int(parts[2], 16)))
  except OSError:
    pass
  return ranges


# safetensors dtype -> numpy dtype name; any other dtype of the format (F8_*, F4, F6_*) is refused
_ST_DTYPES = {'F64': 'float64', 'F32': 'float32', 'F16': 'float16', 'BF16': 'bfloat16',
              'I64': 'int64', 'I32': 'int32', 'I16': 'int16', 'I8': 'int8', 'U64': 'uint64',
              'U32': 'uint32', 'U16': 'uint16', 'U8': 'uint8', 'BOOL': 'bool', 'C64': 'complex64'}


def _np_dtype(name: str) -> np.dtype:
  if name == 'bfloat16':
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


class SafetensorsReader:
  """One or several safetensors files (HF shards), validated when opened; tensors are then read
  with plain positioned reads into fresh arrays, one slab at a time.

  Validation, the `safetensors` library's own (`safe_open` parses and checks the header; it maps
  the file but touches only the header's pages): the header length is at least 2 bytes and at most
  100 MB and within the file; the header is JSON with dtype / shape / data_offsets for every
  tensor, shapes non-negative; sorted by offset, the tensors tile the data area exactly (each
  starts where the previous one ends: no overlap, no gap, no reversed offsets); end - start ==
  prod(shape) x itemsize(dtype); the last end is the end of the file (not truncated, nothing
  trailing). Ours: each failure as an `InputError` naming the file (and the key: the library names
  it for offset errors but not for a size mismatch, so we find that key in the header ourselves);
  a dtype outside `_ST_DTYPES` (F8_*, F4, F6_*) refused naming the key; a key in two shards
  refused naming both files.

  Why not read through `safe_open` too: it memory-maps the whole file, and every page it touches
  stays in the process's resident set until the handle closes; reading into our own buffer keeps
  the resident set at one slab (`benchmarks/convert_memory.py`).
  """

  def __init__(self, paths: Sequence[str]):
    self._where = {}
    for path in paths:
      header_size, header = _validated_header(path)
      for key, info in header.items():
        if key == '__metadata__':
          continue
        if info['dtype'] not in _ST_DTYPES:
          raise InputError(f'{path}: key {key} has dtype {info["dtype"]}; this reader takes '
                           f'{", ".join(_ST_DTYPES)}')
        if key in self._where:
          raise InputError(f'{path}: key {key} is also in {self._where[key][0]}; each tensor '
                           f'must be in one shard')
        self._where[key] = (path, 8 + header_size + info['data_offsets'][0], tuple(info['shape']),
                            info['dtype'])

  def keys(self) -> list[str]:
    return list(self._where)

  def where(self, key: str) -> str:
    return f'{self._where[key][0]} key {key}'

  def shape(self, key: str) -> tuple[int, ...]:
    return self._where[key][2]

  def dtype(self, key: str) -> np.dtype:
    return _np_dtype(_ST_DTYPES[self._where[key][3]])

  def extent(self, key: str) -> None:
    """None: overlapping tensors are refused when the file is opened (by the library)."""
    return None

  def get(self, key: str) -> np.ndarray:
    shape = self._where[key][2]
    return self.get_rows(key, 0, shape[0] if shape else 1).reshape(shape)

  def get_rows(self, key: str, start: int, stop: int) -> np.ndarray:
    path, offset, shape, _ = self._where[key]
    dtype = self.dtype(key)
    row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    out = np.empty((stop - start,) + tuple(shape[1:]), dtype)
    with open(path, 'rb') as f:
      f.seek(offset + start * row)
      if f.readinto(memoryview(out.reshape(-1)).cast('B')) != out.nbytes:
        raise InputError(f'{path}: key {key}: the file ends inside its data (changed since it '
                         f'was opened?)')
    return out

  def release(self, key: str):
    pass


def _validated_header(path: str) -> tuple[int, dict]:
  """(header length, header dict) of a safetensors file that `safetensors.safe_open` accepts."""
  from safetensors import SafetensorError, safe_open
  try:
    with safe_open(path, framework='numpy'):
      pass
  except SafetensorError as e:
    reason = _one_line(e)
    if 'invalid shape, data type, or offset' in reason:
      reason = _size_mismatch(path) or reason
    raise InputError(f'{path}: not a valid safetensors file: {reason}') from None
  except OSError as e:
    raise InputError(f'{path}: cannot read it: {_one_line(e)}') from None
  from radfm_jax.data.store import loads_unique
  with open(path, 'rb') as f:   # accepted: the length is bounded and the JSON parses
    size = struct.unpack('<Q', f.read(8))[0]
    # a tensor named twice: json.loads would keep the last one, silently
    return size, loads_unique(f.read(size).decode('utf-8'), f'{path} header')


def _size_mismatch(path: str) -> str | None:
  """The key whose byte range disagrees with its shape and dtype (the library says only that one
  does). Called on a header the library has already parsed, so its length is bounded."""
  with open(path, 'rb') as f:
    size = struct.unpack('<Q', f.read(8))[0]
    header = json.loads(f.read(size))
  for key, info in header.items():
    if key == '__metadata__' or info.get('dtype') not in _ST_DTYPES:
      continue
    start, end = info['data_offsets']
    want = int(np.prod(info['shape'], dtype=np.int64)) * _np_dtype(_ST_DTYPES[info['dtype']]).itemsize
    if end - start != want:
      return (f'key {key}: data_offsets [{start}, {end}) hold {end - start} bytes, but shape '
              f'{info["shape"]} x {info["dtype"]} needs {want}')
  return None


def _check_shard_index(folder: str, files: Sequence[str], reader: 'SafetensorsReader'):
  """A folder's `*.safetensors.index.json` (HF `save_pretrained`'s `weight_map`: key -> shard
  file), when there is one, must agree with the shards: every shard it names present, none it
  does not name, each key in the shard it names. Without this a deleted shard would convert into
  a smaller model (the sizes are read from the keys present)."""
  from radfm_jax.data.store import loads_unique
  indexes = sorted(glob.glob(os.path.join(folder, '*.safetensors.index.json')))
  if not indexes:
    return
  if len(indexes) > 1:
    raise InputError(f'{folder}: {len(indexes)} *.safetensors.index.json files; expected one')
  index = indexes[0]
  try:
    with open(index, encoding='utf-8') as f:
      data = loads_unique(f.read(), index)
  except (OSError, ValueError) as e:      # JSONDecodeError, UnicodeDecodeError are ValueErrors
    if isinstance(e, InputError):
      raise
    raise InputError(f'{index}: not a readable JSON file ({_one_line(e)})') from None
  weight_map = data.get('weight_map') if isinstance(data, dict) else None
  if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
    raise InputError(f'{index} field weight_map: missing or not an object of key -> shard file '
                     'names')
  present = {os.path.basename(f) for f in files}
  for name in sorted(set(weight_map.values()) - present):
    raise InputError(f'{index} field weight_map: names shard {name}, which is not in {folder}; '
                     'expected every shard it lists (a download cut short?)')
  for name in sorted(present - set(weight_map.values())):
    raise InputError(f'{folder}: shard {name} is not in {os.path.basename(index)}\'s weight_map; '
                     'expected the shards of one checkpoint')
  for key, name in weight_map.items():
    if key not in reader._where:
      raise InputError(f'{index} field weight_map.{key}: not in shard {name}; expected each '
                       'listed key in its shard')
    if os.path.basename(reader._where[key][0]) != name:
      raise InputError(f'{index} field weight_map.{key}: names shard {name}, but it is in '
                       f'{os.path.basename(reader._where[key][0])}')
  for key in reader.keys():
    if key not in weight_map:
      raise InputError(f'{reader.where(key)}: not in {os.path.basename(index)}\'s weight_map; '
                       'expected every key listed there')


def open_reader(path: str):
  """A reader for a `.bin`/`.pt`/`.pth` file, a `.safetensors` file, or a folder of safetensors
  shards (HF `save_pretrained` output)."""
  if path.endswith('.safetensors.index.json') and os.path.isfile(path):
    path = os.path.dirname(os.path.abspath(path))      # the index names the shards beside it
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, '*.safetensors')))
    if not files:
      bins = sorted(glob.glob(os.path.join(path, '*.bin')))
      if len(bins) == 1:
        return TorchReader(bins[0])
      raise InputError(f'{path}: no *.safetensors shards (or single .bin) in this folder')
    reader = SafetensorsReader(files)
    _check_shard_index(path, files, reader)
    return reader
  if not os.path.exists(path):
    raise InputError(f'{path}: checkpoint file not found')
  if path.endswith('.safetensors'):
    return SafetensorsReader([path])
  return TorchReader(path)


# ------------------------------------------------------------------------------------------------
# Checks and conversion


def check_keys(table: Sequence[Entry], reader, our_shapes: dict[str, tuple[int, ...]],
               num_layers: dict[str, int], skip: Sequence[str] = (), note: str = '',
               cast: bool = False):
  """Raises `CheckpointMismatchError` unless the reader holds exactly the table's keys (aliases
  optional, `skip` patterns ignored) with the expected shapes; then `check_dtypes` and
  `check_distinct` on the keys the conversion reads. Nothing has been written yet."""
  expected = keymap.expected_keys(table, our_shapes, num_layers)
  optional = {e.key() for e in table if e.kind == 'alias'}
  present = set(reader.keys())
  missing = [k for k in expected if k not in present and k not in optional]
  unexpected = [k for k in present if k not in expected and not keymap.is_skipped(k, skip)]
  wrong = [(k, reader.shape(k), expected[k]) for k in expected
           if k in present and reader.shape(k) != tuple(expected[k])]
  if missing or unexpected or wrong:
    raise CheckpointMismatchError(missing, unexpected, wrong, note)
  read = [k for k in expected if k not in optional]
  check_dtypes(reader, read, cast)
  check_distinct(reader, read)


def check_aliases(reader, table: Sequence[Entry]):
  """An alias key the file holds (the original's `embedding_layer.weight`, which shares
  embed_tokens' storage) is never read; it must then be the same tensor as the key it aliases,
  else its values would be dropped without a word: the same bytes (one storage), or equal values
  and dtype, compared a slab of rows at a time."""
  present = set(reader.keys())
  for entry in table:
    alias = entry.key()
    if entry.kind != 'alias' or alias not in present:
      continue
    target = next(t.key() for t in table if t.kind != 'alias' and t.ours == entry.ours)
    span = reader.extent(alias)
    if span is not None and span == reader.extent(target):
      continue
    expected = f'expected the same tensor as {target} (the original saves it as its alias)'
    if reader.dtype(alias) != reader.dtype(target):
      raise InputError(f'{reader.where(alias)}: dtype {reader.dtype(alias)} but {target} is '
                       f'{reader.dtype(target)}; {expected}')
    rows = reader.shape(target)[0] if reader.shape(target) else 1
    row_bytes = max(1, math.prod(reader.shape(target)[1:]) * reader.dtype(target).itemsize)
    step = max(1, BLOCK_BYTES // row_bytes)
    for start in range(0, rows, step):
      stop = min(start + step, rows)
      a, b = reader.get_rows(alias, start, stop), reader.get_rows(target, start, stop)
      if not np.array_equal(a, b, equal_nan=True):
        row = start + int(np.flatnonzero((a != b).reshape(stop - start, -1).any(1))[0])
        raise InputError(f'{reader.where(alias)}: row {row} differs from {target}\'s; '
                         f'{expected}')


def check_dtypes(reader, keys: Sequence[str], cast: bool = False):
  """Every key has a dtype of `ACCEPTED_DTYPES`, or `cast` is set (then each value is checked as
  it is cast: `casting.checked_cast`). An `InputError` names the first other key and
  counts the rest."""
  bad = [(k, reader.dtype(k)) for k in keys]
  bad = [(k, d) for k, d in bad if d.name not in ACCEPTED_DTYPES]
  if bad and not cast:
    key, dtype = bad[0]
    more = f' (and {len(bad) - 1} more keys)' if len(bad) > 1 else ''
    raise InputError(f'{reader.where(key)}: dtype {dtype}{more}; expected a float dtype '
                     f'({", ".join(ACCEPTED_DTYPES)}: the official checkpoint is float32). '
                     f'Pass --cast (cast=True) to convert it, every value checked')


def check_distinct(reader, keys: Sequence[str]):
  """No two of `keys` share bytes (a file that points two tensors at the same data would make
  lm_head a copy of embed_tokens). Readers whose format cannot overlap return no extents."""
  spans = sorted((span, key) for key in keys if (span := reader.extent(key)) is not None)
  for (a, key_a), (b, key_b) in zip(spans, spans[1:]):
    if b[0] < a[1]:
      raise InputError(f'{reader.where(key_b)}: shares bytes with key {key_a}; every tensor '
                       f'the conversion reads must have its own data')


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
  writer never holds a whole tensor, let alone a whole stacked leaf. `dtypes` casts per path,
  every value checked (`checked_cast`: out of range is an `InputError` naming the key).
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
        where = reader.where(key)
        cast = ((lambda a: a) if dtypes is None else
                (lambda a: cast_lib.checked_cast(a, dtypes[path], where)))
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
  check_aliases(reader, table)
  dtypes = {p: np.dtype(v.dtype) for p, v in flat.items()}
  new = {p: np.empty(shapes[p], np.dtype(flat[p].dtype)) for e in table if e.kind != 'alias'
         for p in e.ours}
  for path, i, region, array in torch_to_ours(table, reader, shapes, layers, dtypes,
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
  """The JSON object in `path` (an HF config.json), None if there is no such file."""
  if not os.path.exists(path):
    return None
  from radfm_jax.data.store import loads_unique
  try:
    with open(path, encoding='utf-8') as f:
      return loads_unique(f.read(), path)
  except InputError:
    raise                                 # a key twice in one object
  except ValueError as e:
    raise InputError(f'{path}: not valid JSON ({_one_line(e)})') from None
