"""VolumeStore: one zarr3 array per scan inside an OCDBT kvstore, plus JSONL indexes beside it.

On-disk layout of a store directory `STORE/`:

    STORE/volumes/        OCDBT database (a handful of files however many scans); a scan is the
                          zarr3 array at the `key` of its index row (`scans/<id>/`, a rewritten
                          scan `scans/<id>@v<N>/`; the id percent-encoded).
    STORE/scans.jsonl     the index, append-only: one line per stored scan version (id, key,
                          version, shape, dtype, attributes; `copies`: its training-resolution
                          copies, arrays under `copies/` in volumes/, data/train_copies.py); the
                          last line of an id wins. No array read is needed to plan batches.
    STORE/manifest.jsonl  one line per training sample (written by `ingest`, merged run after run).
    STORE/rejects.jsonl   one line per rejected input of the last ingest run: path, reason.
    STORE/warnings.jsonl  one line per scan stored with a recorded repair or warning in the last
                          ingest run (spacing, NIfTI header fields, MONOCHROME1, float64 rounding).
    STORE/.lock           the writers' lock (`fcntl.flock`): one writer at a time.
    STORE/shards/<name>/  a sharded store (`ingest --runner beam`, data/shards.py): one more OCDBT
                          database per shard at `volumes/` under it; an index row with `db`
                          ('shards/<name>') names its array in that database.

Store guarantees (DESIGN section 10):
  * Data first, index last: a batch of arrays is written in one *atomic* OCDBT transaction, then
    its rows are appended to scans.jsonl in one write and fsynced. A scan is in the store iff its
    row is in the index, and an indexed array is always complete: after a kill -9 at any moment
    the index holds exactly the fully written scans (a torn last index line is ignored on read and
    cut off by the next writer; an array committed but not yet indexed is invisible and is
    rewritten by the next run).
  * A rewrite never touches the indexed array: it goes to a new key and the index line switches
    to it (the old bytes stay in the database, unreferenced).
  * One writer at a time: `write_batch` and `ingest` hold `lock()`, an OS file lock on
    STORE/.lock; a second writer waits (saying who holds it) or fails after `timeout`.
  * No narrowing: `to_storable` refuses values that do not fit the stored dtype.

Stored axis layout is **[C, H, W, D]** (channels first, depth last, as RadFM's vision input):
  * NIfTI / DICOM volumes are reoriented to RAS first, then H = array axis 0 (x; the index grows towards
    patient Right), W = axis 1 (y; grows towards Anterior), D = axis 2 (z; grows towards
    Superior, the slice axis of an axial acquisition). C = 1.
  * 2D images (PNG/JPEG, single DICOM frames without position): H = pixel rows, W = pixel columns,
    D = 1; C = 1 for grayscale, 3 for colour.
  * .npy arrays are taken as already in RadFM layout ([H, W], [H, W, D], [C, H, W, D]).
Values keep the source's integer type where that is lossless (int16 CT in HU, uint8 images);
int64 / uint64 are stored as int32 / uint32 and float64 as float32 when every value fits (else
`to_storable` refuses: no wrap, no inf). Attributes of every array (zarr `attributes`, copied in
scans.jsonl): axes 'CHWD', spacing [H, W, D] in mm (1.0 when unknown), orientation ('RAS';
'image' for 2D pixel rows/columns; 'as_stored' for .npy), source_orientation (axis codes before
reorientation), modality, source (absolute path), source_sha256, source_dtype, DICOM's
photometric_interpretation and, when a repair was made or a warning given (readers.py),
spacing_repaired, header_repaired, header_warnings, dicom_warnings, monochrome1_inverted,
geometry_assumed, image_warnings, float32_rounding;
palette_applied for a PALETTE COLOR DICOM stored as RGB.

Every array uses one shard (`sharding_indexed`) holding blosc-zstd inner chunks; the shard shape
is rounded up to a multiple of the inner chunk (TensorStore rejects anything else), while the
array shape stays the true ragged shape.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import math
import os
import signal
import sys
import threading
import time
import urllib.parse
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import tensorstore as ts

from radfm_jax.casting import checked_cast
from radfm_jax.errors import InputError, UserError, not_text, where, whole_file, writing

AXES = 'CHWD'
_STORABLE = {np.dtype(t) for t in ('uint8', 'int8', 'uint16', 'int16', 'int32', 'uint32', 'float32')}


def storable_dtype(dtype) -> np.dtype:
  """The dtype a source array is stored as (lossless where possible, float64 -> float32)."""
  dtype = np.dtype(dtype)
  if dtype in _STORABLE:
    return dtype
  if dtype == np.bool_:
    return np.dtype('uint8')
  if dtype.kind == 'f':
    return np.dtype('float32')
  if dtype.kind in 'iu':
    return np.dtype('int32') if dtype.kind == 'i' else np.dtype('uint32')
  raise ValueError(f'unsupported array dtype {dtype}')


def to_storable(array: np.ndarray, where: str = 'voxels') -> np.ndarray:
  """`array` in its storable dtype (`storable_dtype`) through `casting.checked_cast`: a value that
  does not fit (int64 / uint64 beyond int32 / uint32, float64 beyond the float32 range) is an
  InputError naming `where`, never a wrap or an inf."""
  return checked_cast(array, storable_dtype(array.dtype), where)


def chunk_layout(shape: tuple[int, ...]) -> tuple[list[int], list[int]]:
  """(inner chunk, shard shape) for a [C, H, W, D] array.

  Inner chunks of 1 x 64 x 64 x 32 voxels (about 128-256 KiB) keep sub-block reads cheap; the
  single shard covers the whole array, rounded up to whole inner chunks.
  """
  c, h, w, d = shape
  inner = [1, min(64, h), min(64, w), min(32, d)]
  shard = [c] + [math.ceil(n / k) * k for n, k in zip((h, w, d), inner[1:])]
  return inner, shard


def slice_layout(shape: tuple[int, ...]) -> tuple[list[int], list[int]]:
  """(inner chunk, shard shape) of a training-resolution copy [C, h, w, D]: one inner chunk per
  channel and slice (256 x 256 int16: 128 KiB), so a reader takes only the slices it keeps."""
  return [1, shape[1], shape[2], 1], list(shape)


def _array_spec(kvstore: dict, key: str, shape, dtype: np.dtype, attributes: dict,
                layout=chunk_layout) -> dict:
  inner, shard = layout(tuple(shape))
  return {
      'driver': 'zarr3',
      'kvstore': kvstore,
      'path': key,
      'metadata': {
          'shape': list(shape),
          'data_type': dtype.name,
          'chunk_grid': {'name': 'regular', 'configuration': {'chunk_shape': shard}},
          'codecs': [{
              'name': 'sharding_indexed',
              'configuration': {
                  'chunk_shape': inner,
                  'codecs': [
                      {'name': 'bytes', 'configuration': {'endian': 'little'}},
                      {'name': 'blosc', 'configuration': {
                          'cname': 'zstd', 'clevel': 5, 'shuffle': 'shuffle',
                          'typesize': dtype.itemsize}},
                  ],
                  'index_codecs': [{'name': 'bytes', 'configuration': {'endian': 'little'}},
                                   {'name': 'crc32c'}],
              },
          }],
          'attributes': attributes,
      },
  }


# The scan attribute readers.read_npy gives each image of a 5D RadFM case .npy [S, C, H, W, D]
# (which image of the case it is): the mark of an image that is a volume whatever its depth.
CASE_INDEX = 'case_index'


def case_image(attributes: dict) -> bool:
  """Whether a scan with these attributes (a reader's, or a stored scan's `info()['attributes']`)
  is an image of a RadFM case stack: the original's 3D datasets read a case as a volume, also a
  case of depth 1 (its conversion of JPEG-only cases), so it is never prepared as a 2D image
  (data/transforms.py: `stacked`)."""
  return CASE_INDEX in (attributes or {})


def is_url(path) -> bool:
  """Whether `path` is a kvstore URL (`gs://bucket/store`, `s3://...`, `file:///...`)."""
  return isinstance(path, str) and '://' in path


def database(root: str, db: str | None = None) -> dict:
  """The OCDBT kvstore spec of a store's database: `ROOT/volumes/`, or `ROOT/<db>/volumes/` for
  a shard; `root` a local folder or a kvstore URL (TensorStore parses `gs://...` into its gcs
  driver)."""
  base = root if is_url(root) else f'file://{root}'
  return {'driver': 'ocdbt', 'base': f'{base}/{db + "/" if db else ""}volumes/'}


def _url_value(path: str) -> bytes | None:
  """The bytes of the object at a kvstore URL (None when there is none)."""
  folder, name = path.rsplit('/', 1)
  result = ts.KvStore.open(folder + '/').result().read(name).result()
  return result.value if result.state == 'value' else None


def exists(path: str) -> bool:
  """Whether the file (local path or kvstore URL) exists."""
  return _url_value(path) is not None if is_url(path) else os.path.exists(path)


def open_bytes(path: str):
  """A binary reader of a local file or of the object at a kvstore URL (read whole: the index
  and manifests are small next to the arrays)."""
  if not is_url(path):
    return open(path, 'rb')
  value = _url_value(path)
  if value is None:
    raise FileNotFoundError(path)
  return io.BytesIO(value)


JSON_TYPES = {dict: 'object', list: 'array', str: 'string', int: 'number', float: 'number',
              bool: 'boolean', type(None): 'null'}


class DuplicateKey(ValueError):
  """A JSON object names `key` twice (`unique_keys`)."""

  def __init__(self, key: str):
    super().__init__(f'key {json.dumps(key, ensure_ascii=False)} appears twice in one object')
    self.key = key


def unique_keys(pairs: list[tuple[str, Any]]) -> dict:
  """`object_pairs_hook` of the JSON readers of user files: json keeps the last of two equal keys,
  silently dropping the first value, so a repeated key is a DuplicateKey instead."""
  out = {}
  for key, value in pairs:
    if key in out:
      raise DuplicateKey(key)
    out[key] = value
  return out


def loads_unique(text: str, path: str):
  """`json.loads` of a user file's whole text (`path` names it in errors), a key repeated in one
  object an InputError naming the file and the field; JSONDecodeError passes to the caller."""
  try:
    return json.loads(text, object_pairs_hook=unique_keys)
  except DuplicateKey as e:
    field = duplicate_field(text) or e.key
    raise InputError(f'{where(path, field=field)}: the key appears twice in one object (JSON '
                     'keeps the last value, losing the first); expected each key once') from None


class _Repeated(dict):
  """A parsed object that names `key` twice (`duplicate_field`)."""
  key: str | None = None


def duplicate_field(text: str) -> str | None:
  """Where the first repeated key of a JSON text is, as a field name ('answer',
  'images[0].path'), or None. Parsed again keeping every object, on the error path only: the hook
  that refuses a repeat sees one object, not where it sits."""
  def keep(pairs):
    out = _Repeated()
    for key, value in pairs:
      if key in out and out.key is None:
        out.key = key
      out[key] = value
    return out

  def find(value, field: str) -> str | None:
    if isinstance(value, _Repeated) and value.key is not None:
      return f'{field}.{value.key}' if field else value.key
    if isinstance(value, dict):
      children = [(f'{field}.{k}' if field else k, v) for k, v in value.items()]
    elif isinstance(value, list):
      children = [(f'{field}[{i}]', v) for i, v in enumerate(value)]
    else:
      return None
    for name, child in children:
      found = find(child, name)
      if found is not None:
        return found
    return None

  return find(json.loads(text, object_pairs_hook=keep), '')


def iter_jsonl(path: str) -> Iterator[tuple[int, dict]]:
  """(line number, object) for every non-blank line of a JSONL file; line numbers are 1-based and
  count blank lines too (what an editor shows). A line that is not one UTF-8 JSON object, whose
  objects name a key twice, or whose text holds a lone surrogate (a "\\ud800" escape:
  `errors.not_text`) is an InputError naming the file and line (and the key)."""
  with open_bytes(path) as f:
    for n, raw in enumerate(f, 1):
      try:
        text = raw.decode('utf-8')
      except UnicodeDecodeError as e:
        raise InputError(f'{where(path, n)}: not UTF-8 text ({e.reason}, column {e.start + 1}); '
                         'expected a UTF-8 JSONL file') from None
      if not text.strip():
        continue
      try:
        value = json.loads(text.rstrip('\r\n'),   # so the column is the one on this line
                           object_pairs_hook=unique_keys)
      except json.JSONDecodeError as e:
        raise InputError(f'{where(path, n)}: not valid JSON ({e.msg}, column {e.colno}); '
                         'expected one JSON object per line') from None
      except DuplicateKey as e:
        field = duplicate_field(text) or e.key
        raise InputError(f'{where(path, n, field)}: the key appears twice in one object; '
                         'expected each key once (JSON would keep only the last value)') from None
      if not isinstance(value, dict):
        raise InputError(f'{where(path, n)}: got a JSON {JSON_TYPES.get(type(value), "value")}; '
                         'expected one JSON object per line')
      found = not_text(value)       # a "\ud800" escape: valid JSON, but not text
      if found is not None:
        raise InputError(f'{where(path, n, found[0])}: {found[1]}')
      yield n, value


def read_jsonl(path: str) -> list[dict]:
  """The objects of a JSONL file ([] when it does not exist); errors name the file and line."""
  if not exists(path):
    return []
  return [value for _, value in iter_jsonl(path)]


def cut_torn_tail(f) -> int:
  """Cuts a last line without its newline off the JSONL file open as `f` (binary, readable and
  writable) and returns the bytes cut (0: none); `f` is then at its end. Such a line is a write
  a kill or a full disk cut short: the next append would run into it and leave a line no reader
  parses in the middle of the file. Used before every append to a JSONL log (the index here,
  the training run's metrics.jsonl and skipped.jsonl)."""
  size = f.seek(0, os.SEEK_END)
  keep = size
  while keep > 0:                       # back to the last newline, a block at a time
    start = max(0, keep - 65536)
    f.seek(start)
    i = f.read(keep - start).rfind(b'\n')
    if i >= 0:
      keep = start + i + 1
      break
    keep = start
  if keep < size:
    f.truncate(keep)
  f.seek(0, os.SEEK_END)
  return size - keep


def write_bytes(path: str, data: bytes):
  """Writes `path` whole or not at all (`errors.whole_file`), fsynced before the rename."""
  with whole_file(path) as tmp, open(tmp, 'wb') as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def write_jsonl(path: str, records: Iterable[dict]):
  write_bytes(path, ''.join(json.dumps(r) + '\n' for r in records).encode())


CRASH_ENV = 'RADFM_JAX_CRASH_AT'


_crash_hits: dict[str, int] = {}


def crash_point(name: str) -> bool:
  """Fault injection for the kill tests: `RADFM_JAX_CRASH_AT=<name>[:N]` kills this process with
  SIGKILL the N-th time (default 1st) it reaches the point `name`, as a real kill -9 would (nothing
  flushed). Returns whether the point is armed for this hit (`index-torn` writes half a line
  first)."""
  spec = os.environ.get(CRASH_ENV)
  if not spec:
    return False
  target, _, count = spec.partition(':')
  if target != name:
    return False
  _crash_hits[name] = _crash_hits.get(name, 0) + 1
  return _crash_hits[name] == int(count or 1)


def kill_point(name: str):
  """SIGKILLs this process when `crash_point(name)` is armed for this hit."""
  if crash_point(name):
    os.kill(os.getpid(), signal.SIGKILL)


class StoreLocked(UserError):
  """Another writer holds the store's lock and `timeout` ran out."""


@contextlib.contextmanager
def file_lock(path: str, held: Callable[[str], None], *, remove: bool = False):
  """Holds an OS lock (`fcntl.flock`) on the file `path` for the block, its text 'pid N since T'
  saying who holds it. The one lock of every writer: a store's (`VolumeStore.lock`) and a
  training run's (`train.rundir.lock_workdir`). While another process holds it, `held(its text)`
  is called every 0.1 s: it raises to give up (at once, or after a timeout) or returns to wait.
  `remove`: the file is removed at the end, while still held (a waiter that then gets the removed
  file's lock takes the new file instead), so a finished writer leaves none; a killed writer's file
  is taken over. A folder or file that cannot be written is a WriteError naming it."""
  while True:
    with writing(path):
      os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      while True:
        try:
          fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
          break
        except BlockingIOError:
          held(os.pread(fd, 200, 0).decode(errors='replace').strip() or 'pid unknown')
          time.sleep(0.1)
      try:
        current = os.fstat(fd).st_ino == os.stat(path).st_ino
      except FileNotFoundError:
        current = False
    except BaseException:
      os.close(fd)
      raise
    if current:
      break
    os.close(fd)                        # the file a finishing writer just removed
  try:
    with writing(path):
      os.ftruncate(fd, 0)
      os.pwrite(fd, f'pid {os.getpid()} since {time.strftime("%Y-%m-%d %H:%M:%S")}\n'.encode(), 0)
    yield
  finally:
    if remove:
      with contextlib.suppress(OSError):
        os.remove(path)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


class ScanNotFound(InputError, KeyError):
  """A scan id the store's index has no row for (a KeyError too, for callers that look ids up)."""
  __str__ = Exception.__str__         # KeyError's would put the message in quotes


class StoreDamaged(InputError):
  """An indexed array that cannot be read: the store was changed or damaged after ingest."""


def read_index(path: str) -> dict[str, dict]:
  """scans.jsonl -> {scan id: its last row}. A last line without its newline is a write torn by a
  kill and is ignored (`VolumeStore` cuts it off before the next append); any other bad line is an
  error naming the file and line."""
  if not exists(path):
    return {}
  with open_bytes(path) as f:
    lines = f.read().split(b'\n')
  lines.pop()                       # b'' after the final newline, or a torn last line
  index = {}
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      index[row['id']] = row
    except (ValueError, KeyError, TypeError) as e:
      raise InputError(f'{where(path, n)}: not a store index row ({type(e).__name__}: {e}); '
                       'expected {"id": ..., "key": ..., "shape": ...}') from None
  return index


class VolumeStore:
  """Scans as [C, H, W, D] zarr3 arrays in an OCDBT kvstore; picklable (handles open lazily).

      store = VolumeStore('STORE')
      vol = store.read('scan_id')          # np.ndarray [C, H, W, D], stored dtype
      store.info('scan_id')['shape']       # [C, H, W, D] without reading the array
  """

  def __init__(self, root: str):
    # A URL (gs://bucket/store, s3://..., file:///...) is any TensorStore kvstore the arrays live
    # on; a plain path is a local folder.
    self.root = root.rstrip('/') if is_url(root) else os.path.abspath(root)
    self._local = None
    self._index: dict[str, dict] | None = None
    self._thread_lock = threading.RLock()
    self._lock_depth = 0

  # Grain worker processes receive a pickled copy: send only the path, reopen there.
  def __getstate__(self):
    return {'root': self.root}

  def __setstate__(self, state):
    self.__init__(state['root'])

  @property
  def kvstore(self) -> dict:
    """The OCDBT database of arrays written by single-process ingest (`STORE/volumes/`)."""
    return database(self.root)

  def database(self, scan_id: str) -> dict:
    """The kvstore spec of the database holding `scan_id` (its index row's `db`, a shard of a
    sharded store, else `volumes/`)."""
    return database(self.root, self.row(scan_id).get('db'))

  @property
  def manifest_path(self) -> str:
    return os.path.join(self.root, 'manifest.jsonl')

  @property
  def scans_path(self) -> str:
    return os.path.join(self.root, 'scans.jsonl')

  @property
  def rejects_path(self) -> str:
    return os.path.join(self.root, 'rejects.jsonl')

  @property
  def warnings_path(self) -> str:
    return os.path.join(self.root, 'warnings.jsonl')

  @property
  def lock_path(self) -> str:
    return os.path.join(self.root, '.lock')

  def _context(self) -> ts.Context:
    # One context per thread-local: shares the OCDBT cache among reads; tensorstore's own chunk
    # cache stays off since each scan is read once per epoch.
    if self._local is None:
      self._local = threading.local()
    if not hasattr(self._local, 'ctx'):
      self._local.ctx = ts.Context({'cache_pool': {'total_bytes_limit': 0}})
    return self._local.ctx

  # ---------------------------------------------------------------------------------------------
  # The writers' lock

  @contextlib.contextmanager
  def lock(self, timeout: float | None = None, log=None):
    """Holds the store's OS file lock (`fcntl.flock` on STORE/.lock) for the block; re-entrant
    within this object and thread. A second writer (another process or another VolumeStore object) waits,
    printing once who holds the lock, or raises StoreLocked after `timeout` seconds. The index is
    re-read after the lock is taken, so a writer always extends what the last one committed."""
    with self._thread_lock:             # threads sharing this object take turns too
      if self._lock_depth:
        self._lock_depth += 1
        try:
          yield self
        finally:
          self._lock_depth -= 1
        return
      if os.path.exists(self.root) and not os.path.isdir(self.root):
        raise InputError(f'{self.root}: exists and is not a directory; expected a store '
                         'directory to extend, or a new path to create one at')
      with file_lock(self.lock_path, self._waiting(timeout, log)):
        self._lock_depth, self._index = 1, None
        try:
          yield self
        finally:
          self._lock_depth, self._index = 0, None

  def _waiting(self, timeout: float | None, log) -> Callable[[str], None]:
    """`file_lock`'s `held` for a writer that waits: says once who holds the lock, raises
    StoreLocked after `timeout` seconds (None: waits for ever)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    said = []

    def held(holder: str):
      if deadline is not None and time.monotonic() >= deadline:
        raise StoreLocked(f'{self.root}: still locked by another writer ({holder}) after '
                          f'{timeout:g} s; expected no other ingest into this store (or a longer '
                          '--lock-timeout)')
      if not said:
        print(f'store {self.root} is locked by another writer ({holder}); waiting for it',
              file=log or sys.stderr, flush=True)
        said.append(True)
    return held

  # ---------------------------------------------------------------------------------------------
  # Index

  def index(self) -> dict[str, dict]:
    """scan id -> {'id', 'key', 'version', 'shape', 'dtype', 'attributes'} (cached; `read_index`)."""
    if self._index is None:
      self._index = read_index(self.scans_path)
    return self._index

  def __contains__(self, scan_id: str) -> bool:
    return scan_id in self.index()

  def __len__(self) -> int:
    return len(self.index())

  def row(self, scan_id: str) -> dict:
    """The index row of `scan_id`; ScanNotFound naming scans.jsonl when it has none (a manifest
    of another store, or an index cut or deleted after ingest), never a bare KeyError."""
    row = self.index().get(scan_id)
    if row is None:
      raise ScanNotFound(f'{self.scans_path}: no row for scan {scan_id!r}; expected a row for '
                         'every scan the manifest names (the index was cut or deleted after '
                         'ingest, or the manifest belongs to another store)')
    return row

  def info(self, scan_id: str) -> dict:
    return self.row(scan_id)

  def case_image(self, scan_id: str) -> bool:
    """Whether scan `scan_id` is an image of a RadFM case stack (`case_image`)."""
    return case_image(self.row(scan_id).get('attributes'))

  def manifest(self) -> list[dict]:
    return read_jsonl(self.manifest_path)

  def rejects(self) -> list[dict]:
    return read_jsonl(self.rejects_path)

  def warnings(self) -> list[dict]:
    return read_jsonl(self.warnings_path)

  def key(self, scan_id: str) -> str:
    """The identity of the stored array: its key in the database (rows written before keys
    existed: `scans/<id>/`), after its shard's `db` when it has one ('shards/<name>/scans/<id>/'),
    so that no two stored arrays share one."""
    row = self.row(scan_id)
    key = row.get('key', f'scans/{scan_id}/')
    return f"{row['db']}/{key}" if row.get('db') else key

  def _new_key(self, scan_id: str) -> tuple[str, int]:
    # The id percent-encoded: an id holding '/' cannot reach into another scan's keys.
    name = urllib.parse.quote(scan_id, safe='')
    row = self.index().get(scan_id)
    if row is None:
      return f'scans/{name}/', 0
    version = row.get('version', 0) + 1
    return f'scans/{name}@v{version}/', version   # '@' is never in a quoted id

  def _append_index(self, rows: list[dict]):
    """Appends rows in one write and fsyncs; first cuts off a torn last line of a killed writer."""
    data = ''.join(json.dumps(r, allow_nan=False) + '\n' for r in rows).encode()
    with open(self.scans_path, 'ab+') as f:
      cut_torn_tail(f)
      if crash_point('index-torn'):      # a write torn by a kill: half a line, then death
        f.write(data[:-20])             # rows are longer than 20 bytes: the last one is torn
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
      end = f.tell()
      with writing(self.scans_path):
        try:
          f.write(data)
          f.flush()
          os.fsync(f.fileno())
        except OSError:
          # A refused write may have put some of the rows there, the last one cut: take them all
          # back (cutting frees space, so it works on a full disk), so that the batch is indexed
          # whole or not at all, as a kill leaves it; the next run writes it again.
          with contextlib.suppress(OSError):
            f.truncate(end)
          raise

  # ---------------------------------------------------------------------------------------------
  # Writing

  def write_batch(self, items: list[tuple[str, np.ndarray, dict]]) -> list[dict]:
    """Writes [(scan id, array [C, H, W, D], attributes)] in one atomic transaction, then indexes
    them (data first, index last; under `lock()`). An id already in the index gets a new key, so
    the indexed array is never touched until its new row is appended. Values that do not fit the
    stored dtype raise InputError (`to_storable`) before anything is written.
    """
    if not items:
      return []
    with self.lock():
      plan = []
      for scan_id, array, attributes in items:
        if array.ndim != 4:
          raise TypeError(f'scan {scan_id}: expected [C, H, W, D], got shape {array.shape}')
        try:
          stored = to_storable(array)
        except ValueError as e:
          raise ValueError(f'scan {scan_id}: {e}') from None
        key, version = self._new_key(scan_id)
        plan.append((scan_id, key, version, stored, dict(attributes, axes=AXES)))
      self._commit([(key, array, attrs, chunk_layout) for _, key, _, array, attrs in plan])
      rows = [{'id': scan_id, 'key': key, 'version': version, 'shape': list(array.shape),
               'dtype': array.dtype.name, 'attributes': attrs}
              for scan_id, key, version, array, attrs in plan]
      kill_point('after-data')
      self._append_index(rows)
      index = self.index()
      for row in rows:
        index[row['id']] = row
      kill_point('after-index')
    return rows

  def _commit(self, writes):
    """Writes [(key, array, attributes, layout)] into `volumes/` in one atomic transaction; a
    write the filesystem refuses (full, read-only, ...) is a WriteError naming `volumes/`
    (the transaction commits whole or not at all, so the database keeps what it had)."""
    with writing(os.path.join(self.root, 'volumes') + '/'):
      try:
        self._write_transaction(writes, overwrite=False)
      except ValueError as e:
        if 'already exists' not in str(e) and 'ALREADY_EXISTS' not in str(e):
          raise
        # A key already in the database but not in the index (a run killed between commit and
        # index append): nothing refers to it, so it is replaced. Kept off the normal path
        # because `delete_existing` makes OCDBT write one data file per array.
        self._write_transaction(writes, overwrite=True)

  def _write_transaction(self, writes, overwrite: bool):
    txn = ts.Transaction(atomic=True)      # the whole batch commits, or none of it
    futures = []
    for key, array, attrs, layout in writes:
      spec = _array_spec(self.kvstore, key, array.shape, array.dtype, attrs, layout)
      arr = ts.open(spec, create=True, delete_existing=overwrite, context=self._context(),
                    transaction=txn).result()
      futures.append(arr.write(np.ascontiguousarray(array)))
    for f in futures:
      f.result()
    txn.commit_async().result()

  def write_copies(self, items: list[tuple[str, np.ndarray, dict]]) -> list[dict]:
    """Writes training-resolution copies [(scan id, array [C, h, w, D], entry)] in one atomic
    transaction (data/train_copies.py makes them), then appends each scan's index row again with
    the entry added to its `copies` (replacing one of the same in-plane size); under `lock()`.
    The copy goes to `copies/<the scan's key, quoted>/<h>x<w>/` of `volumes/`; `entry` gets `key`,
    `shape`, `dtype` and `of` (the scan's `key()`: a copy made from another version is stale).
    The scan's own array and key are untouched."""
    if not items:
      return []
    with self.lock():
      index = self.index()
      writes, rows = [], []
      for scan_id, array, entry in items:
        row, of = index[scan_id], self.key(scan_id)
        # named after the scan's array (unique per stored version, shards included)
        key = f'copies/{urllib.parse.quote(of, safe="")}/{array.shape[1]}x{array.shape[2]}/'
        entry = dict(entry, key=key, shape=list(array.shape), dtype=array.dtype.name, of=of)
        writes.append((key, array, {'copy_of': entry['of']}, slice_layout))
        kept = [c for c in row.get('copies', []) if c['shape'][1:3] != entry['shape'][1:3]]
        rows.append(dict(row, copies=kept + [entry]))
      self._commit(writes)
      self._append_index(rows)
      for row in rows:
        index[row['id']] = row
    return rows

  # ---------------------------------------------------------------------------------------------
  # Reading

  def _damaged(self, what: str, db: str | None, key: str, err: Exception) -> StoreDamaged:
    """The one-line StoreDamaged of an indexed array TensorStore cannot open or read."""
    folder = os.path.join(self.root, db or '', 'volumes') + '/'
    reason = str(err).split(' [tensorstore_spec=')[0]       # drop the spec dump
    return StoreDamaged(f'{folder} key {key}: {what} cannot be read ({reason}); expected the '
                        f'complete array that {self.scans_path} indexes (the store was changed '
                        'or damaged after ingest)')

  def holder(self, scan_id: str) -> 'VolumeStore':
    """The store whose databases hold the array of `scan_id` (this one; a shard of a sharded
    ingest sees rows of its parent store, data/shards.py)."""
    return self

  def open(self, scan_id: str) -> ts.TensorStore:
    row = self.row(scan_id)
    key = row.get('key', f'scans/{scan_id}/')
    try:
      return ts.open({'driver': 'zarr3', 'kvstore': self.database(scan_id), 'path': key},
                     open=True, context=self._context()).result()
    except ValueError as e:
      raise self._damaged(f'the array of scan {scan_id!r}', row.get('db'), key, e) from None

  def read(self, scan_id: str) -> np.ndarray:
    """The stored array [C, H, W, D] in its stored dtype (StoreDamaged naming the database, key
    and index when it cannot be read, ScanNotFound when the index has no row for it)."""
    arr = self.open(scan_id)
    try:
      return arr.read().result()
    except ValueError as e:
      row = self.row(scan_id)
      raise self._damaged(f'the array of scan {scan_id!r}', row.get('db'),
                          row.get('key', f'scans/{scan_id}/'), e) from None

  def read_copy(self, entry: dict, depth: np.ndarray | None = None) -> np.ndarray:
    """A training-resolution copy (an entry of an index row's `copies`) [C, h, w, D], or only
    its slices `depth` (indices along D, repeats allowed) [C, h, w, len(depth)]: one chunk per
    slice, so only those are read."""
    arr = self.open_copy(entry)
    try:
      if depth is None:
        return arr.read().result()
      keep, where_ = np.unique(np.asarray(depth), return_inverse=True)
      return np.take(arr[:, :, :, keep].read().result(), where_.reshape(-1), axis=3)
    except ValueError as e:
      raise self._damaged('the training-resolution copy', None, entry['key'], e) from None

  def open_copy(self, entry: dict) -> ts.TensorStore:
    """The array of a training-resolution copy, opened without reading it (StoreDamaged naming
    `volumes/` and its key when it cannot be)."""
    try:
      return ts.open({'driver': 'zarr3', 'kvstore': self.kvstore, 'path': entry['key']},
                     open=True, context=self._context()).result()
    except ValueError as e:
      raise self._damaged('the training-resolution copy', None, entry['key'], e) from None

  def attributes(self, scan_id: str) -> dict[str, Any]:
    """Attributes as stored in the zarr metadata (the index holds the same copy)."""
    return dict(self.open(scan_id).spec().to_json()['metadata'].get('attributes', {}))

  def stored_keys(self) -> Iterator[str]:
    """Keys of arrays physically present in the OCDBT database, indexed or not (lists keys; for
    checks, not training)."""
    kv = ts.KvStore.open(self.kvstore, context=self._context()).result()
    seen = set()
    for key in kv.list().result():
      parts = key.decode().split('/')
      if len(parts) >= 3 and parts[0] == 'scans' and parts[2] == 'zarr.json':
        seen.add(f'scans/{parts[1]}/')
    return iter(sorted(seen))
