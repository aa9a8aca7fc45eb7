"""VolumeStore: one zarr3 array per scan inside an OCDBT kvstore, plus JSONL indexes beside it.

On-disk layout of a store directory `STORE/`:

    STORE/volumes/        OCDBT database (a handful of files however many scans); scan `<id>` is
                          the zarr3 array at path `scans/<id>/` inside it.
    STORE/scans.jsonl     one line per stored scan: id, shape, dtype, attributes (no array reads
                          are needed to plan batches).
    STORE/manifest.jsonl  one line per training sample (written by `ingest`).
    STORE/rejects.jsonl   one line per rejected input of the last ingest run: path, reason.

Stored axis layout is **[C, H, W, D]** (channels first, depth last, as RadFM's vision input):
  * NIfTI / DICOM volumes are reoriented to RAS first, then H = array axis 0 (x; the index grows towards
    patient Right), W = axis 1 (y; grows towards Anterior), D = axis 2 (z; grows towards
    Superior, the slice axis of an axial acquisition). C = 1.
  * 2D images (PNG/JPEG, single DICOM frames without position): H = pixel rows, W = pixel columns,
    D = 1; C = 1 for grayscale, 3 for colour.
  * .npy arrays are taken as already in RadFM layout ([H, W], [H, W, D], [C, H, W, D]).
Values keep the source's integer type where that is lossless (int16 CT in HU, uint8 images);
float64 is stored as float32. Attributes of every array (zarr `attributes`, copied in
scans.jsonl): axes 'CHWD', spacing [H, W, D] in mm (1.0 when unknown), orientation ('RAS';
'image' for 2D pixel rows/columns; 'as_stored' for .npy), source_orientation (axis codes before
reorientation), modality, source (absolute path) and source_dtype.

Every array uses one shard (`sharding_indexed`) holding blosc-zstd inner chunks; the shard shape
is rounded up to a multiple of the inner chunk (TensorStore rejects anything else), while the
array shape stays the true ragged shape.
"""

from __future__ import annotations

import json
import math
import os
import threading
from typing import Any, Iterable, Iterator

import numpy as np
import tensorstore as ts

from radfm_jax.errors import InputError, where

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


def chunk_layout(shape: tuple[int, ...]) -> tuple[list[int], list[int]]:
  """(inner chunk, shard shape) for a [C, H, W, D] array.

  Inner chunks of 1 x 64 x 64 x 32 voxels (about 128-256 KiB) keep sub-block reads cheap; the
  single shard covers the whole array, rounded up to whole inner chunks.
  """
  c, h, w, d = shape
  inner = [1, min(64, h), min(64, w), min(32, d)]
  shard = [c] + [math.ceil(n / k) * k for n, k in zip((h, w, d), inner[1:])]
  return inner, shard


def _array_spec(kvstore: dict, scan_id: str, shape, dtype: np.dtype, attributes: dict) -> dict:
  inner, shard = chunk_layout(tuple(shape))
  return {
      'driver': 'zarr3',
      'kvstore': kvstore,
      'path': f'scans/{scan_id}/',
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


_JSON_TYPES = {list: 'array', str: 'string', int: 'number', float: 'number', bool: 'boolean',
               type(None): 'null'}


def iter_jsonl(path: str) -> Iterator[tuple[int, dict]]:
  """(line number, object) for every non-blank line of a JSONL file; line numbers are 1-based and
  count blank lines too (what an editor shows). A line that is not one UTF-8 JSON object is an
  InputError naming the file and line."""
  with open(path, 'rb') as f:
    for n, raw in enumerate(f, 1):
      try:
        text = raw.decode('utf-8')
      except UnicodeDecodeError as e:
        raise InputError(f'{where(path, n)}: not UTF-8 text ({e.reason}, column {e.start + 1}); '
                         'expected a UTF-8 JSONL file') from None
      if not text.strip():
        continue
      try:
        value = json.loads(text.rstrip('\r\n'))   # so the column is the one on this line
      except json.JSONDecodeError as e:
        raise InputError(f'{where(path, n)}: not valid JSON ({e.msg}, column {e.colno}); '
                         'expected one JSON object per line') from None
      if not isinstance(value, dict):
        raise InputError(f'{where(path, n)}: got a JSON {_JSON_TYPES.get(type(value), "value")}; '
                         'expected one JSON object per line')
      yield n, value


def read_jsonl(path: str) -> list[dict]:
  """The objects of a JSONL file ([] when it does not exist); errors name the file and line."""
  if not os.path.exists(path):
    return []
  return [value for _, value in iter_jsonl(path)]


def write_jsonl(path: str, records: Iterable[dict]):
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    for r in records:
      f.write(json.dumps(r) + '\n')
  os.replace(tmp, path)  # atomic: a crash never leaves a half-written index


class VolumeStore:
  """Scans as [C, H, W, D] zarr3 arrays in an OCDBT kvstore; picklable (handles open lazily).

      store = VolumeStore('STORE')
      vol = store.read('scan_id')          # np.ndarray [C, H, W, D], stored dtype
      store.info('scan_id')['shape']       # [C, H, W, D] without reading the array
  """

  def __init__(self, root: str):
    self.root = os.path.abspath(root)
    self._local = None
    self._index: dict[str, dict] | None = None

  # Grain worker processes receive a pickled copy: send only the path, reopen there.
  def __getstate__(self):
    return {'root': self.root}

  def __setstate__(self, state):
    self.__init__(state['root'])

  @property
  def kvstore(self) -> dict:
    return {'driver': 'ocdbt', 'base': f'file://{self.root}/volumes/'}

  @property
  def manifest_path(self) -> str:
    return os.path.join(self.root, 'manifest.jsonl')

  @property
  def scans_path(self) -> str:
    return os.path.join(self.root, 'scans.jsonl')

  @property
  def rejects_path(self) -> str:
    return os.path.join(self.root, 'rejects.jsonl')

  def _context(self) -> ts.Context:
    # One context per thread-local: shares the OCDBT cache among reads; tensorstore's own chunk
    # cache stays off since each scan is read once per epoch.
    if self._local is None:
      self._local = threading.local()
    if not hasattr(self._local, 'ctx'):
      self._local.ctx = ts.Context({'cache_pool': {'total_bytes_limit': 0}})
    return self._local.ctx

  # ---------------------------------------------------------------------------------------------
  # Index

  def index(self) -> dict[str, dict]:
    """scan id -> {'id', 'shape', 'dtype', 'attributes'} from scans.jsonl (cached)."""
    if self._index is None:
      self._index = {r['id']: r for r in read_jsonl(self.scans_path)}
    return self._index

  def __contains__(self, scan_id: str) -> bool:
    return scan_id in self.index()

  def __len__(self) -> int:
    return len(self.index())

  def info(self, scan_id: str) -> dict:
    return self.index()[scan_id]

  def manifest(self) -> list[dict]:
    return read_jsonl(self.manifest_path)

  def rejects(self) -> list[dict]:
    return read_jsonl(self.rejects_path)

  # ---------------------------------------------------------------------------------------------
  # Writing

  def write_batch(self, items: list[tuple[str, np.ndarray, dict]]) -> list[dict]:
    """Writes [(scan id, array [C, H, W, D], attributes)] in one transaction, then indexes them.

    The arrays become visible only when the transaction commits, so an interrupted batch leaves
    no partial array; an id already present is overwritten, which makes a re-run after a crash
    between commit and index update idempotent.
    """
    if not items:
      return []
    os.makedirs(self.root, exist_ok=True)
    try:
      rows = self._write_transaction(items, overwrite=False)
    except ValueError as e:
      if 'already exists' not in str(e) and 'ALREADY_EXISTS' not in str(e):
        raise
      # An id already in the database (a re-run after a crash between commit and index update,
      # or a deliberate rewrite): redo the batch replacing old arrays. Kept off the normal path
      # because `delete_existing` makes OCDBT write one data file per array.
      rows = self._write_transaction(items, overwrite=True)
    index = self.index()
    for row in rows:
      index[row['id']] = row
    write_jsonl(self.scans_path, index.values())
    return rows

  def _write_transaction(self, items, overwrite: bool) -> list[dict]:
    txn = ts.Transaction()
    futures, rows = [], []
    for scan_id, array, attributes in items:
      if array.ndim != 4:
        raise TypeError(f'scan {scan_id}: expected [C, H, W, D], got shape {array.shape}')
      dtype = storable_dtype(array.dtype)
      attrs = dict(attributes, axes=AXES)
      spec = _array_spec(self.kvstore, scan_id, array.shape, dtype, attrs)
      arr = ts.open(spec, create=True, delete_existing=overwrite, context=self._context(),
                    transaction=txn).result()
      futures.append(arr.write(np.ascontiguousarray(array, dtype=dtype)))
      rows.append({'id': scan_id, 'shape': list(array.shape), 'dtype': dtype.name,
                   'attributes': attrs})
    for f in futures:
      f.result()
    txn.commit_async().result()
    return rows

  # ---------------------------------------------------------------------------------------------
  # Reading

  def open(self, scan_id: str) -> ts.TensorStore:
    return ts.open({'driver': 'zarr3', 'kvstore': self.kvstore, 'path': f'scans/{scan_id}/'},
                   open=True, context=self._context()).result()

  def read(self, scan_id: str) -> np.ndarray:
    """The stored array [C, H, W, D] in its stored dtype."""
    return self.open(scan_id).read().result()

  def attributes(self, scan_id: str) -> dict[str, Any]:
    """Attributes as stored in the zarr metadata (the index holds the same copy)."""
    return dict(self.open(scan_id).spec().to_json()['metadata'].get('attributes', {}))

  def stored_ids(self) -> Iterator[str]:
    """Ids of arrays physically present in the OCDBT store (lists keys; for checks, not training)."""
    kv = ts.KvStore.open(self.kvstore, context=self._context()).result()
    seen = set()
    for key in kv.list().result():
      parts = key.decode().split('/')
      if len(parts) >= 3 and parts[0] == 'scans' and parts[2] == 'zarr.json':
        seen.add(parts[1])
    return iter(sorted(seen))
