"""`radfm-jax ingest`: scans (readers.py) + a sample manifest -> a VolumeStore (store.py).

    radfm-jax ingest --manifest samples.jsonl --out STORE [--strict] [--replace]
    report = ingest('samples.jsonl', 'STORE')            # or a list of record dicts

Input manifest (JSONL, one training sample per line; every field: docs/data.md and
data/manifest.py, which validates each line before anything is read):

    {"id": "s1", "task": "vqa", "question": "What is shown?", "answer": "A nodule.",
     "images": [{"path": "ct/case1.nii.gz", "position": {"question": 0}, "modality": "CT"}]}

Image entries take `path` (relative paths resolve against the manifest's folder or `root`) and
optional `id` (scan id; default a hash of path/frame/index), `modality`, `frame` (which volume of
a 4D NIfTI), `index` (which image of a 5D RadFM case .npy [S, C, H, W, D]; without it all S
images are used, each at the entry's position). Other sample keys pass through unchanged.

The store is a database (store.py holds its guarantees). Ingest takes the store's lock (a second
ingest waits, saying so) and merges:
  * Before anything is touched: a manifest that does not exist, two samples with one id, or one
    scan id naming two files are errors naming both lines; a sample id already in the store with
    other content (text fields, or its images' scan ids / positions) is an error unless
    `replace`; so is a scan id the store holds for another file.
  * A scan is identified by its id and its content (sha256 of the file, or of a DICOM folder's
    files, kept as the `source_sha256` attribute): a stored scan whose file is unchanged is
    skipped, a changed file is read again and its new version replaces the old one in the index
    (the samples naming it get its new shape); a new version of another number of images (a 5D
    case's) is a reject, the old one kept whole.
  * A stored scan whose file is unchanged but whose array the store can no longer open (lost or
    damaged after ingest) is read again and stored as a new version, as a changed one is
    (`restored`). A database that cannot be read at all (its manifest or root node lost: no
    array in it can be read, nothing can be written to it) is moved aside first
    (`volumes.damaged-N/`), so that a new one takes the restored scans.
  * The new samples extend STORE/manifest.jsonl (same id and content: kept once; `replace`:
    replaced in place); rejects.jsonl and warnings.jsonl describe this run.
Rejected scans (readers.py says when) go to rejects.jsonl and stderr with path and reason; a
sample with any rejected image is left out of the manifest. One bad scan never stops the run: a
batch the store refuses is written again scan by scan and only the failing scan is rejected.
Readers run in `workers` threads, `batch_size` scans at a time, so peak memory is about
min(workers, batch_size) x max_scan_bytes at worst.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import math
import numbers
import os
import sys
from typing import Callable, Iterable

from radfm_jax.data.readers import (DEFAULT_MAX_SCAN_BYTES, RejectedScan, npy_header,
                                    read_scan, source_digest)
from radfm_jax.data.store import StoreDamaged, VolumeStore, is_url, kill_point, write_jsonl
from radfm_jax.errors import InputError, WriteError, check_parent_folder, where, writing


class IngestError(RuntimeError):
  """Raised by `ingest(..., strict=True)` when any input was rejected."""


@dataclasses.dataclass
class IngestReport:
  stored: list[str] = dataclasses.field(default_factory=list)     # scan ids written this run
  updated: list[str] = dataclasses.field(default_factory=list)    # of those: new content, old id
  restorations: list[dict] = dataclasses.field(default_factory=list)  # of those: same content,
  # array unreadable in the store: {'path', 'scan_ids', 'reason'} per file (restored_line)
  skipped: list[str] = dataclasses.field(default_factory=list)    # already in the store
  rejects: list[dict] = dataclasses.field(default_factory=list)   # {'path', 'reason', ...}
  warnings: list[dict] = dataclasses.field(default_factory=list)  # {'path', 'warning', ...}:
  # a scan stored with repairs or warnings (`repair_warning`)
  moved_aside: list[str] = dataclasses.field(default_factory=list)  # the line said of each
  # database that could not be read and was moved aside (`_database_lost`)
  samples: int = 0                                                # samples of this manifest kept
  dropped_samples: int = 0
  replaced_samples: int = 0                                       # with `replace`
  manifest_rows: int = 0                                          # rows in the store manifest
  train_resolution: int | None = None                             # copies made at this size:
  copies: int = 0                                                 # written this run
  copies_current: int = 0                                         # already there

  @property
  def restored(self) -> list[str]:
    """The scan ids of `restorations`."""
    return [i for r in self.restorations for i in r['scan_ids']]

  @property
  def rejected_scans(self) -> int:
    """Scans that could not be stored (`rejects` also lists each sample dropped for them)."""
    return sum('scan_id' in r for r in self.rejects)

  def rejected_text(self) -> str:
    """What `rejects` holds, counted by kind: scans, samples dropped for them, and inputs the
    caller refused before ingest (`ingest(rejects=...)`, e.g. a recipe's unusable rows)."""
    refused = len(self.rejects) - self.rejected_scans - self.dropped_samples
    return (f'{self.rejected_scans} scans rejected, {self.dropped_samples} samples dropped'
            + (f', {refused} input rows refused' if refused else ''))

  def summary(self) -> str:
    copies = ('' if self.train_resolution is None else
              f'; {self.copies} training-resolution copies made at {self.train_resolution}x'
              f'{self.train_resolution} ({self.copies_current} already current)')
    restored = (f', {len(self.restored)} restored: unreadable in the store' if self.restored
                else '')
    repaired = sum(w.get('repaired', True) for w in self.warnings)
    warned = (f', {len(self.warnings) - repaired} stored with a warning'
              if len(self.warnings) > repaired else '')
    return (f'{len(self.stored)} scans stored ({len(self.updated)} changed on disk{restored}), '
            f'{len(self.skipped)} already stored, {self.rejected_scans} rejected, '
            f'{repaired} repaired{warned}; {self.samples} samples kept, {self.dropped_samples} '
            f'dropped, {self.replaced_samples} replaced; {self.manifest_rows} samples in the '
            f'store{copies}')


# ------------------------------------------------------------------------------------------------
# Driver


def scan_id_for(path: str, entry: dict) -> str:
  if entry.get('id'):
    return str(entry['id'])
  key = json.dumps([os.path.abspath(path), entry.get('frame'), entry.get('index')])
  return hashlib.sha1(key.encode()).hexdigest()[:20]


def _load_records(manifest) -> tuple[list[tuple[int, dict]], str, Callable]:
  """([(line, record)], base folder of relative paths, place(line, field) -> 'FILE line N field F').

  Every record is validated against the manifest schema (data/manifest.py: unique sample ids, each
  field's type) before the store is touched; a missing manifest is an InputError here too. A list
  of records is numbered 1, 2, ... ('manifest record N')."""
  from radfm_jax.data.manifest import check_records, record_place
  from radfm_jax.data.store import iter_jsonl
  if not isinstance(manifest, (str, os.PathLike)):
    numbered, base = list(enumerate(manifest, 1)), os.getcwd()

    def place(n, field=None):
      # a recipe's record says where it came from ('vqarad_test.csv line 2'): named instead
      source = numbered[n - 1][1].get('source') if 0 < n <= len(numbered) and isinstance(
          numbered[n - 1][1], dict) else None
      if isinstance(source, str) and source:
        return f'{source} ({record_place(n, field)})'
      return record_place(n, field)
  else:
    path = os.fspath(manifest)
    if not os.path.isfile(path):
      raise InputError(f'{where(path)}: manifest not found; expected a JSONL file, one sample per '
                       'line (nothing was written)')
    def place(n, field=None):
      return where(path, n, field)
    numbered, base = list(iter_jsonl(path)), os.path.dirname(os.path.abspath(path))
    if not numbered:          # an empty or cut file: ingesting nothing would look like success
      raise InputError(f'{where(path)}: no samples (no JSON line in the file); expected a JSONL '
                       'file, one sample per line (nothing was written)')
  check_records(numbered, place, form='input')
  return numbered, base, place


def _expand_ids(scan_id: str, n: int) -> list[str]:
  return [scan_id] if n == 1 else [f'{scan_id}_{s}' for s in range(n)]


def _stored_ids(index: dict, sid: str) -> list[str]:
  """The ids under which entry id `sid` is stored ([sid], or sid_0, sid_1, ... of a 5D case)."""
  if sid in index:
    return [sid]
  ids = []
  while f'{sid}_{len(ids)}' in index:
    ids.append(f'{sid}_{len(ids)}')
  return ids


def _sample_row(rec: dict, n: int, images: list[dict]) -> dict:
  out = {k: v for k, v in rec.items() if k != 'images'}
  out.setdefault('id', str(n))
  out.setdefault('question', '')
  out.setdefault('answer', '')
  out.setdefault('task', '')
  out['images'] = images
  return out


def _difference(old: dict, new: dict) -> str | None:
  """The first field in which two sample rows differ (images: by scan id and position), or None."""
  for key in sorted(set(old) | set(new)):
    if key == 'images':
      a = [(im.get('id'), im.get('position')) for im in old.get('images', [])]
      b = [(im.get('id'), im.get('position')) for im in new.get('images', [])]
      if a != b:
        return 'images'
    elif old.get(key) != new.get(key):
      return key
  return None


@dataclasses.dataclass
class _Entry:
  sid: str                 # scan id of the entry (5D cases are stored as sid_0, sid_1, ...)
  path: str                # absolute path
  entry: dict              # the manifest image entry
  place: str               # where it was first named ('FILE line N field images[k]')

  @property
  def source_key(self) -> list:
    return [self.path, self.entry.get('frame'), self.entry.get('index')]

  @functools.cached_property
  def stack_size(self) -> int:
    """How many scans the entry is stored as: S for a 5D .npy stack [S, C, H, W, D] read without
    "index" (stored as sid_0 .. sid_{S-1}, `_expand_ids`), else 1. From the header only, read
    once (the id checks both ask); an unreadable header counts 1 (reading it rejects the entry
    with its own reason)."""
    if self.entry.get('index') is not None or not self.path.lower().endswith('.npy'):
      return 1
    try:
      shape = npy_header(self.path)[0]
    except Exception:  # numpy raises several types for a bad header; a missing file too
      return 1
    return shape[0] if len(shape) == 5 and shape[0] > 1 else 1


def _collect(records, base, place) -> dict[str, _Entry]:
  """Unique image entries in first-seen order; a scan id (given, or the hash of path, frame and
  index) naming two files is an InputError naming both lines. (Duplicate sample ids were refused
  by the schema check of `_load_records`.)"""
  entries: dict[str, _Entry] = {}
  for n, rec in records:
    images = rec.get('images', [])
    if not isinstance(images, list):
      raise InputError(f'{place(n, "images")}: got {images!r}; expected a list of image objects')
    for k, entry in enumerate(images):
      if not isinstance(entry, dict) or not isinstance(entry.get('path'), str):
        raise InputError(f'{place(n, f"images[{k}].path")}: missing; expected the scan\'s file')
      path = os.path.abspath(os.path.join(base, entry['path']))
      e = _Entry(scan_id_for(path, entry), path, entry, place(n, f'images[{k}]'))
      seen = entries.setdefault(e.sid, e)
      if seen.source_key != e.source_key:
        raise InputError(f'{place(n, f"images[{k}].id")}: scan id {e.sid!r} names {e.path} '
                         f'(frame {e.entry.get("frame")}, index {e.entry.get("index")}) but '
                         f'{seen.place} names {seen.path} (frame {seen.entry.get("frame")}, index '
                         f'{seen.entry.get("index")}) with it; expected one file per scan id')
  _check_stack_ids(entries)
  return entries


def _check_stack_ids(entries: dict[str, _Entry]):
  """A 5D stack's scans are stored as sid_0, sid_1, ...: such an id that is also another entry's
  (or another stack's) scan id would store two images under one id, the later replacing the
  earlier. An InputError naming both, before anything is written."""
  def what(e: _Entry, i: str) -> str:
    if i == e.sid:
      return f'{e.path} ({e.place})'
    return f'image {i[len(e.sid) + 1:]} of the 5D stack {e.path} ({e.place})'

  owner: dict[str, _Entry] = {}
  for e in entries.values():
    for i in _expand_ids(e.sid, e.stack_size):
      seen = owner.setdefault(i, e)
      if seen is not e:
        raise InputError(f'{e.place}.id: stored scan id {i!r} would hold {what(e, i)} and '
                         f'{what(seen, i)}; a 5D stack is stored as ID_0, ID_1, ...: expected ids '
                         'that do not meet (nothing was written)')


def ingest(manifest: str | Iterable[dict], out_dir: str, strict: bool = False,
           root: str | None = None, batch_size: int = 16, workers: int | None = None,
           log=None, replace: bool = False, max_scan_bytes: int = DEFAULT_MAX_SCAN_BYTES,
           progress: bool = False, lock_timeout: float | None = None,
           rejects: Iterable[dict] = (),
           store_scans: Callable | None = None,
           train_resolution: int | None = None) -> IngestReport:
  """Reads every image of every sample into the store `out_dir` and merges the samples into its
  manifest (module docstring: the rules; store.py: the guarantees).

  Returns an IngestReport; with `strict`, raises IngestError after writing everything that was
  readable (rejects.jsonl lists all failures, so one run shows every problem). Bad manifests and
  conflicts with the store raise InputError before anything is written. `replace`: a sample id
  (or a scan id) the store holds with other content is replaced instead of refused.
  `progress`: a tqdm bar (scans done / total, rejects) on `log`. Messages go to `log` (default:
  sys.stderr as it is at call time, not at import). `lock_timeout`: seconds to wait for another
  writer (None: wait as long as it takes). `rejects`: inputs a caller already refused (e.g. the
  split-file rows a recipe could not use), listed first in rejects.jsonl and counted with the rest.
  `store_scans`: what reads and stores the scans, with `_store_scans`'s signature and result
  (default: `_store_scans`, in this process; data/shards.py: into shard databases, e.g. on Beam).
  `train_resolution` (N): every 3D scan of the manifest larger than N x N in-plane also gets a
  training-resolution copy [C, N, N, D] (data/train_copies.py), which training reads when its
  3D batches are N x N (data.image_size_3d_single), with bit-identical model inputs.
  """
  log = log or sys.stderr
  _check_options(batch_size, workers, train_resolution, lock_timeout)
  if not is_url(out_dir):
    # (--out itself a file: VolumeStore's own error below)
    check_parent_folder(out_dir, f'--out {out_dir}',
                        'expected a folder for the store (nothing was written)')
    if isinstance(manifest, (str, os.PathLike)) and os.path.abspath(manifest) == os.path.join(
        os.path.abspath(out_dir), 'manifest.jsonl'):
      raise InputError(f'--manifest {manifest}: the store\'s own manifest.jsonl, which ingest '
                       'rewrites; expected a manifest outside the --out folder (nothing was '
                       'written)')
  records, base, place = _load_records(manifest)
  if root and not os.path.isdir(root):   # else every scan would be rejected as not found
    raise InputError(f'--root {root}: no such folder; expected the folder that relative image '
                     'paths start from (nothing was written)')
  base = os.path.abspath(root) if root else base
  entries = _collect(records, base, place)
  store = VolumeStore(out_dir)
  report = IngestReport(rejects=list(rejects), train_resolution=train_resolution)
  locked = False
  try:
    with store.lock(lock_timeout, log):
      locked = True
      index = store.index()
      _check_scan_ids(entries, index, replace)
      old_rows = store.manifest()
      old_at = {str(r.get('id')): i for i, r in enumerate(old_rows)}
      _check_samples(records, base, index, old_rows, old_at, place, replace, store.manifest_path)
      resolved = (store_scans or _store_scans)(store, entries, report, batch_size, workers, log,
                                               max_scan_bytes, progress)
      if train_resolution is not None:
        from radfm_jax.data import train_copies
        ids = [i for v in resolved.values() if v for i in v]
        report.copies, report.copies_current = train_copies.make(
            store, ids, int(train_resolution), batch_size, workers or os.cpu_count() or 1, log,
            progress)
      rows = _merge_samples(records, base, resolved, old_rows, old_at, store.index(), report)
      kill_point('before-manifest')
      write_jsonl(store.manifest_path, rows)
      write_jsonl(store.rejects_path, report.rejects)
      write_jsonl(store.warnings_path, report.warnings)
  except WriteError as e:
    # The filesystem refused a write: stopped as a kill would stop it (store.py), so say what the
    # store still holds and that the same command finishes the job.
    if not locked:              # the store folder or its lock file: nothing was started
      raise
    raise WriteError(f'{e}; ingest stopped: {len(report.stored)} scans of this run were '
                          'stored before it, the store holds complete scans only and its last '
                          'complete manifest.jsonl; run the same ingest again once there is room '
                          'to finish it') from None
  report.manifest_rows = len(rows)
  print(f'ingest: {report.summary()} -> {store.root}', file=log)
  if strict and report.rejects:
    raise IngestError(f'{report.rejected_text()} (see {store.rejects_path})')
  return report


def _positive_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _check_options(batch_size, workers, train_resolution, lock_timeout):
  """The options, before the store is touched (a bad one must not leave a new store directory
  with only its lock file): batch_size 0 would stop the run and a negative one would skip every
  scan (range() with that step), so each must be a positive integer; workers, train_resolution
  too unless None; lock_timeout a finite number >= 0 or None. The CLI checks them as it parses
  the flags (cli/ingest.py); this is the library's own check."""
  for flag, value, what in (('--batch-size', batch_size, 'a positive integer (scans per write '
                             'transaction)'),
                            ('--workers', workers, 'a positive integer (reader threads)'),
                            ('--train-resolution', train_resolution, 'a positive in-plane size '
                             '(e.g. 256, data.image_size_3d_single)')):
    if (value is not None or flag == '--batch-size') and not _positive_int(value):
      raise InputError(f'{flag} {value!r}: expected {what}')
  if lock_timeout is not None and not (isinstance(lock_timeout, numbers.Real)
                                       and math.isfinite(lock_timeout) and lock_timeout >= 0):
    raise InputError(f'--lock-timeout {lock_timeout!r}: expected a number of seconds >= 0')


def _check_scan_ids(entries: dict[str, _Entry], index: dict, replace: bool):
  """A scan id the store holds for another file is an error unless `replace`."""
  if replace:
    return
  for e in entries.values():
    # The ids it is stored under now, and those it will be stored as: a 5D stack 'x' is written
    # as x_0, x_1, ..., and an x_1 the store holds for another file (x_0 absent, so
    # `_stored_ids` finds nothing) would be replaced by the stack's second image.
    ids = dict.fromkeys(_stored_ids(index, e.sid) + _expand_ids(e.sid, e.stack_size))
    for i in (i for i in ids if i in index):
      key = index[i]['attributes'].get('source_key')
      if key is not None and key != e.source_key:
        held = 'it' if i == e.sid else f'{i!r} (an id it is stored as)'
        raise InputError(f'{e.place}.id: scan id {e.sid!r} names {e.path} but the store holds '
                         f'{held} for {key[0]} (frame {key[1]}, index {key[2]}); expected the '
                         'same file, another id, or --replace')


def _sids(rec: dict, base: str) -> list[str]:
  """The entry scan ids of a record's images, in order."""
  return [scan_id_for(os.path.abspath(os.path.join(base, e['path'])), e)
          for e in rec.get('images', [])]


def _check_samples(records, base, index, old_rows, old_at, place, replace, manifest_path):
  """A sample id the store holds with other content (text fields, image scan ids or positions)
  is an error unless `replace`. A scan whose file changed keeps its id: not a conflict."""
  if replace:
    return
  for i, (n, rec) in enumerate(records):
    row_id = str(rec.get('id', i))
    if row_id not in old_at:
      continue
    images = [{'id': j, 'position': entry.get('position', {'question': 0})}
              for entry, sid in zip(rec.get('images', []), _sids(rec, base))
              for j in (_stored_ids(index, sid) or [sid])]
    field = _difference(old_rows[old_at[row_id]], _sample_row(rec, i, images))
    if field is not None:
      raise InputError(f'{place(n, field)}: sample id {row_id!r} is already in the store '
                       f'({manifest_path}) with another {field}; expected the same sample, another '
                       'id, or --replace to replace it')


def _store_scans(store: VolumeStore, entries: dict[str, _Entry], report: IngestReport,
                 batch_size: int, workers: int | None, log, max_scan_bytes: int,
                 progress: bool) -> dict[str, list[str] | None]:
  """Reads and stores every entry whose content is not stored yet, or whose stored array cannot
  be opened any more (restored); entry id -> stored ids (None: rejected). `batch_size` scans are
  read at a time (threads: gzip/zstd/pydicom release the GIL) and written in one transaction:
  memory stays bounded by one batch of decoded volumes."""
  from tqdm import tqdm
  lost = _database_lost(store, log, report)     # before anything opens it: then moved aside
  index = store.index()
  unreadable = _unreadable(store, lost)

  def load(sid):
    e = entries[sid]
    try:
      digest = source_digest(e.path) if os.path.exists(e.path) else None
      have = _stored_ids(index, sid)
      why = None
      if digest and have and all(index[i]['attributes'].get('source_sha256') == digest
                                 and index[i]['attributes'].get('source_key') in (None, e.source_key)
                                 for i in have):
        why = next(filter(None, map(unreadable, have)), None)
        if why is None:
          return sid, 'same', have
      scans = read_scan(e.path, e.entry, max_scan_bytes)
      for _, attrs in scans:
        attrs.update(source_sha256=digest, source_key=e.source_key)
      return sid, 'read', (scans, why)
    except RejectedScan as err:
      return sid, 'reject', err.reason
    except Exception as err:  # any reader bug still must not stop the run
      return sid, 'reject', f'{type(err).__name__}: {err}'

  resolved: dict[str, list[str] | None] = {}
  bar = tqdm(total=len(entries), desc='ingest', unit='scan', file=log, disable=not progress,
             dynamic_ncols=True)
  todo = list(entries)
  with bar, concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
    for start in range(0, len(todo), batch_size):
      pending, restoring = [], {}
      for sid, kind, value in pool.map(load, todo[start:start + batch_size]):
        if kind == 'same':
          resolved[sid] = value
          report.skipped.extend(value)
        elif kind == 'reject':
          _reject(report, resolved, entries[sid], value, log, bar)
        else:
          scans, why = value
          if why is not None:
            restoring[sid] = why
          ids, have = _expand_ids(sid, len(scans)), _stored_ids(index, sid)
          if have and ids != have:
            # A changed file keeps its ids; with another count of images its new version would
            # replace some of the old ones and leave the rest, and the samples naming them would
            # mix the two versions.
            _reject(report, resolved, entries[sid],
                    f'the file now holds {len(scans)} image(s) where the store holds {len(have)} '
                    f'of its earlier version under this id ({", ".join(have)}), which stored '
                    'samples name; expected the same number of images (a changed file keeps its '
                    'ids), or another id (images[].id) for the new file', log, bar)
            continue
          pending.append((sid, [(i, a, attrs) for i, (a, attrs) in zip(ids, scans)]))
      _write(store, pending, restoring, report, resolved, entries, log, bar)
      bar.update(min(batch_size, len(todo) - start))
      bar.set_postfix(rejected=len(report.rejects), refresh=False)
  return resolved


# What TensorStore says of a file that is gone, cut short or corrupt: data lost for good, unlike
# a permission or a network error, which may read the next time.
_LOST = ('NOT_FOUND', 'DATA_LOSS', 'OUT_OF_RANGE')


def _database_lost(store: VolumeStore, log, report: IngestReport) -> str | None:
  """Whether the database this run writes into (`store.kvstore`) can be read at all: None when
  it can (or does not exist yet), else what became of it ('... moved to FOLDER/'). Its manifest
  (manifest.ocdbt) and root node lead to every key, and every commit rewrites the root: when they
  are lost (the data file holding the root deleted, the manifest deleted, cut or corrupt: a
  deleted one, `_manifest_missing`), no array in it can be read and nothing can be written to
  it, so a local one is moved aside to
  `volumes.damaged-N/` (kept, not deleted) and the run writes into a new one. Another reason (a
  permission, the network), or a database that is not a local folder, is a StoreDamaged before
  anything is written."""
  import tensorstore as ts
  folder = os.path.join(store.root, 'volumes') + '/'
  try:
    kv = ts.KvStore.open(store.kvstore, context=ts.Context()).result()
    kv.read('zarr.json').result()       # a key no array has: reads the manifest and the root
    reason = _manifest_missing(store, folder)
  except ValueError as e:
    reason = str(e).split(' [tensorstore_spec=')[0]        # drop the spec dump
  if reason is None:
    return None
  if is_url(store.root) or not reason.startswith(_LOST):
    move = (' (move it away and run the same ingest again: its scans are then stored anew)'
            if reason.startswith(_LOST) else '')
    raise StoreDamaged(f'{folder}: the database cannot be read ({reason}); expected a readable '
                       f'OCDBT database{move}; nothing was written')
  n = 1
  while os.path.exists(os.path.join(store.root, f'volumes.damaged-{n}')):
    n += 1
  aside = os.path.join(store.root, f'volumes.damaged-{n}')
  with writing(folder):
    os.rename(folder, aside)
  report.moved_aside.append(
      f'ingest: {folder}: the database cannot be read ({reason}); moved to {aside}/ and a new '
      'one started: every scan whose array it held is read from its file again (one not in '
      'this manifest when its manifest is ingested again)')
  print(report.moved_aside[-1], file=log)
  return f'its database could not be read: moved to {aside}/'


def _manifest_missing(store: VolumeStore, folder: str) -> str | None:
  """Why a local database that reads has lost its manifest, or None. Without manifest.ocdbt an
  OCDBT database reads as an empty one, so TensorStore says nothing: it is lost when the folder
  is still there and the index names arrays in it (rows without `db`, this store's own). A first
  commit killed before its manifest was written indexed nothing, so that is no loss. A folder
  deleted whole has nothing to move aside (its scans are restored one by one, `_unreadable`);
  a URL has no folder to tell apart from an empty database."""
  if is_url(store.root) or not os.path.isdir(folder):
    return None
  if os.path.exists(os.path.join(folder, 'manifest.ocdbt')):
    return None
  held = sum(store.holder(i) is store and not row.get('db') for i, row in store.index().items())
  if not held:
    return None
  return (f'NOT_FOUND: manifest.ocdbt is missing, although {store.scans_path} indexes {held} '
          f'array{"s" * (held > 1)} in it')


def _unreadable(store: VolumeStore, lost: str | None) -> Callable[[str], str | None]:
  """unreadable(scan id): why its stored array cannot be opened, one line naming the database,
  key and scan (StoreDamaged's, without what it expected), or None when it opens. Opened only:
  reading every array would make a re-run over a large store read all of it. `lost`: `store`'s
  own database, which held the arrays of its rows without `db`, was moved aside
  (`_database_lost`)."""
  index = store.index()

  def unreadable(scan_id: str) -> str | None:
    row = index[scan_id]
    home = store.holder(scan_id)
    if lost is not None and home is store and not row.get('db'):
      return (f'{os.path.join(store.root, "volumes")}/ key {row.get("key", f"scans/{scan_id}/")}: '
              f'the array of scan {scan_id!r} cannot be read ({lost})')
    try:
      home.open(scan_id)
      return None
    except StoreDamaged as e:
      return str(e).split('; expected the complete array')[0]
  return unreadable


def _reject(report, resolved, e: _Entry, reason: str, log, bar):
  resolved[e.sid] = None
  report.rejects.append({'path': e.path, 'scan_id': e.sid, 'reason': reason})
  bar.write(f'ingest: rejected {e.path}: {reason}', file=log)


def _write(store, pending, restoring, report, resolved, entries, log, bar):
  """Writes one batch [(entry id, [(scan id, array, attrs)])] in one transaction; if the store
  refuses it, each entry is written alone so that only the failing one is rejected. `restoring`:
  entry id -> why its stored array could not be opened (its file is unchanged)."""
  if not pending:
    return
  before = set(store.index())
  try:
    store.write_batch([item for _, scans in pending for item in scans])
    done = pending
  except WriteError:  # the disk, not a scan: every scan would be refused, so stop (ingest)
    raise
  except Exception:  # retried one entry at a time below, which names the failing scan
    done = []
    for sid, scans in pending:
      try:
        store.write_batch(scans)
        done.append((sid, scans))
      except WriteError:
        raise
      except Exception as err:
        _reject(report, resolved, entries[sid], f'store write failed: {type(err).__name__}: '
                f'{err}', log, bar)
  for sid, scans in done:
    ids = [i for i, _, _ in scans]
    resolved[sid] = ids
    report.stored.extend(ids)
    if sid in restoring:
      restoration = {'path': entries[sid].path, 'scan_ids': ids, 'reason': restoring[sid]}
      report.restorations.append(restoration)
      bar.write(restored_line(restoration), file=log)
    else:
      report.updated.extend(i for i in ids if i in before)
    for i, _, attrs in scans:
      warning = repair_warning(entries[sid].path, i, attrs)
      if warning:
        report.warnings.append(warning)
        bar.write(repaired_line(warning), file=log)


def restored_line(restoration: dict) -> str:
  """The log line of an `IngestReport.restorations` entry (said by ingest, and again by a sharded
  run's `collect` for each shard's)."""
  return (f'ingest: restored {restoration["path"]}: {restoration["reason"]}; stored again from '
          'the file')


def repaired_line(warning: dict) -> str:
  """The log line of a `repair_warning` row (said by ingest, and by a sharded run's `collect`
  for each shard's: a worker's own log is not seen): 'ingest: repaired FILE: ...' when the reader
  made a repair, else 'ingest: warning FILE: ...'."""
  verb = 'repaired' if warning.get('repaired', True) else 'warning'
  return f'ingest: {verb} {warning["path"]}: {warning["warning"]}'


def scan_notes(attrs: dict) -> tuple[list[str], list[str]]:
  """(repairs, warnings) the reader recorded in a stored scan's attributes, as sentences: the
  one place that turns those attributes into words (readers.py sets them)."""
  repairs, warnings = [], []
  if 'spacing_repaired' in attrs:
    repairs.append(f'spacing repaired: header pixdim {attrs["spacing_repaired"]} -> spacing '
                   f'{attrs["spacing"]} mm (nibabel replaces 0 by 1 and negatives by their '
                   'absolute value)')
  repairs += [f'NIfTI header field repaired on load: {text}'
              for text in attrs.get('header_repaired', [])]
  repairs += [f'geometry assumed: {text}' for text in attrs.get('geometry_assumed', [])]
  if 'monochrome1_inverted' in attrs:
    lo, hi = attrs['monochrome1_inverted']
    repairs.append(f'MONOCHROME1 inverted: stored values are {lo} + {hi} - x (min + max - x) so '
                   'that higher values are brighter, as MONOCHROME2')
  warnings += [f'NIfTI header: {text} (nibabel; left as it is)'
               for text in attrs.get('header_warnings', [])]
  warnings += [f'DICOM: {text} (pydicom, which read the file as it says)'
               for text in attrs.get('dicom_warnings', [])]
  warnings += [f'image: {text}'
               for text in attrs.get('image_warnings', [])]
  if 'float32_rounding' in attrs:
    r = attrs['float32_rounding']
    before, after = r['distinct_values']
    warnings.append(f'float64 values rounded to float32: max absolute change '
                    f'{r["max_abs_change"]:g} over a source range of {r["source_range"][0]} to '
                    f'{r["source_range"][1]}; {before} distinct values before, {after} after')
  return repairs, warnings


def repair_warning(path: str, scan_id: str, attrs: dict) -> dict | None:
  """The warnings.jsonl row of a stored scan whose reader made repairs or has warnings (None:
  neither): `warning` says each (`scan_notes`, '; ' between them), `repaired` whether any was a
  repair."""
  repairs, warnings = scan_notes(attrs)
  if not repairs and not warnings:
    return None
  return {'path': path, 'scan_id': scan_id, 'warning': '; '.join(repairs + warnings),
          'repaired': bool(repairs)}


def _merge_samples(records, base, resolved, old_rows, old_at, index, report) -> list[dict]:
  """The store manifest after this run: the old rows in order (a sample of this manifest with the
  same id replaces its row), then the new samples; every image's shape and modality from the
  index (a changed file may have changed them)."""
  rows = list(old_rows)
  for i, (n, rec) in enumerate(records):
    images, bad = [], None
    for entry, sid in zip(rec.get('images', []), _sids(rec, base)):
      ids = resolved.get(sid)
      if ids is None:
        bad = os.path.abspath(os.path.join(base, entry['path']))
        break
      images += [{'id': j, 'position': entry.get('position', {'question': 0})} for j in ids]
    if bad is not None:
      report.dropped_samples += 1
      report.rejects.append({'path': bad, 'sample_id': rec.get('id', i),
                             'reason': 'sample dropped: one of its images was rejected'})
      continue
    row = _sample_row(rec, i, images)
    report.samples += 1
    at = old_at.get(str(row['id']))
    if at is None:
      old_at[str(row['id'])] = len(rows)
      rows.append(row)
    else:
      report.replaced_samples += _difference(rows[at], row) is not None
      rows[at] = row
  for row in rows:
    for im in row.get('images', []):
      if im.get('id') in index:
        info = index[im['id']]
        im.update(shape=info['shape'], modality=info['attributes'].get('modality', ''))
  return rows
