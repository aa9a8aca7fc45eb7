"""Training-resolution copies: a 3D scan kept a second time at the in-plane size training reads.

RadFM trains a 3D sample at 256 x 256 x D' (`data.image_size_3d_single`, D' <= 64 the depth
bucket, torch-legacy `nearest`), yet the store holds each CT at 512 x 512 x D: every sample would
read and decompress 4x the voxels it keeps. `radfm-jax ingest --train-resolution 256` (`make` here)
keeps, beside every 3D scan (D > 1) larger than 256 x 256 in-plane, a copy resized **in-plane
only**, full depth, in the stored dtype:

    copy [C, 256, 256, D] = scan[:, idx_H, idx_W, :]     idx = transforms.nearest_indices

stored one chunk per slice (store.slice_layout), with the full scan's (min, max). The scan itself
stays the source of truth, untouched; the copy is an entry of its index row's `copies`
({key, shape, dtype, of, resize, min, max}; store.VolumeStore.write_copies).

Why the model input is bit-identical: `nearest` resizing is a gather along each axis, so resizing
the copy's depth afterwards, copy[..., nearest_indices(D, D')], is scan[:, idx_H, idx_W, idx_D],
exactly `transforms.resize(scan, (256, 256, D'))`; the reader takes only those D' slices (D' the
sample's stack depth, transforms.stack_depth, from which the batch's depth is taken). The
min-max intensity statistics come from the full scan (kept with the copy: a gather may miss the
extreme voxels); the CT windows need none. What cannot commute is not used: `percentile` needs
the full scan's values, `trilinear` interpolates the full grid.

When the pipeline reads a copy (`choose`, at plan time): `data.train_copies` is on, `data.resize`
is 'nearest', `data.intensity` is not 'percentile', the sample's batch bucket has the copy's
in-plane size, and the copy is current: made from the array the index names now (`of` ==
store.key(id)) with the scan's channels, depth and dtype. Anything else reads the full scan, and
`make_dataset` prints one line per reason (a copy of another size, a stale copy, ...): never a
silently different input.
"""

from __future__ import annotations

import collections
import concurrent.futures
import sys
from typing import Iterable

import numpy as np

from radfm_jax.data import transforms
from radfm_jax.data.store import StoreDamaged, VolumeStore


def wants_copy(row: dict, size: int) -> bool:
  """Whether ingest keeps a copy of the scan of index row `row` at `size` x `size`: a 3D scan
  (D > 1) with more in-plane voxels than the copy (smaller ones are read as they are)."""
  _, h, w, d = row['shape']
  return d > 1 and h * w > size * size


def is_current(row: dict, entry: dict, key: str) -> bool:
  """Whether copy `entry` of index row `row` was made from the array `key` the index names now,
  with its channels, depth and dtype, by the nearest resize."""
  return (entry.get('of') == key and entry.get('resize') == 'nearest'
          and entry['shape'][0] == row['shape'][0] and entry['shape'][3] == row['shape'][3]
          and entry.get('dtype') == row['dtype'])


def current_copy(store: VolumeStore, scan_id: str, h: int, w: int) -> dict | None:
  """The current copy of `scan_id` at h x w in-plane (None: there is none)."""
  row = store.info(scan_id)
  key = store.key(scan_id)
  return next((c for c in row.get('copies', []) if list(c['shape'][1:3]) == [h, w]
               and is_current(row, c, key)), None)


def _unreadable(store: VolumeStore, entry: dict) -> str | None:
  """Why the array of copy `entry` cannot be opened (one line naming `volumes/` and its key), or
  None when it opens (opened only, as ingest checks its scans)."""
  try:
    store.open_copy(entry)
    return None
  except StoreDamaged as e:
    return str(e).split('; expected the complete array')[0]


def make_copy(volume: np.ndarray, size: int) -> tuple[np.ndarray, dict]:
  """A scan [C, H, W, D] -> (its copy [C, size, size, D] in its dtype, the entry fields
  `resize`, `min`, `max`: the full scan's transforms.value_range)."""
  copy = transforms.resize(volume, (size, size, volume.shape[3]), 'nearest')
  lo, hi = transforms.value_range(volume)
  return copy, {'resize': 'nearest', 'min': lo, 'max': hi}


def make(store: VolumeStore, scan_ids: Iterable[str], size: int, batch_size: int = 16,
         workers: int = 2, log=None, progress: bool = False) -> tuple[int, int]:
  """Writes the missing or stale copies at `size` of the scans `scan_ids` that want one
  (`wants_copy`), `batch_size` per atomic transaction (each scan read back from the store, so
  scans stored earlier, by a Beam job or by another run get theirs too). Returns (made, already
  current). Call it holding the store's lock (ingest does)."""
  from tqdm import tqdm
  if size < 1:
    raise ValueError(f'training resolution {size}: expected a positive in-plane size')
  todo, current, lost = [], 0, []
  for sid in dict.fromkeys(scan_ids):
    if not wants_copy(store.info(sid), size):
      continue
    entry = current_copy(store, sid, size, size)
    if entry is not None:
      # Current by its row, but its array may be lost (a `volumes/` moved aside, a data file
      # deleted): made again, or training would skip the sample while its scan reads fine.
      why = _unreadable(store, entry)
      if why is None:
        current += 1
        continue
      lost.append((sid, why))
    todo.append(sid)
  if lost:
    print(f'ingest: {len(lost)} training-resolution copies at {size}x{size} cannot be read (e.g. '
          f'scan {lost[0][0]!r}: {lost[0][1]}); made again from their scans',
          file=log or sys.stderr)

  def one(sid):
    copy, entry = make_copy(store.read(sid), size)
    return sid, copy, entry

  bar = tqdm(total=len(todo), desc=f'copies {size}x{size}', unit='scan', file=log or sys.stderr,
             disable=not progress or not todo, dynamic_ncols=True)
  with bar, concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    for start in range(0, len(todo), batch_size):
      items = list(pool.map(one, todo[start:start + batch_size]))
      store.write_copies(items)
      bar.update(len(items))
  return len(todo), current


def choose(store: VolumeStore, records: list[dict], keys: list, data_cfg
           ) -> tuple[list[list[dict | None]] | None, list[str]]:
  """Per record, per image (its first `data.max_images`), the copy the loader reads instead of
  the full scan (None: the full scan), from the records' plan `keys` (pipeline.BucketKey: the
  in-plane size of each sample's batch); and the one-line notes of every reason a copy the store
  holds is not used. (None, []) when no scan has a copy."""
  rows = store.index()
  if not any(rows[im['id']].get('copies') for rec in records for im in rec.get('images', [])
             if im['id'] in rows):
    return None, []
  off = (not getattr(data_cfg, 'train_copies', True) and 'data.train_copies=False'
         or data_cfg.resize != 'nearest' and f'data.resize={data_cfg.resize!r} (the copies are '
         "nearest-resized; only 'nearest' commutes with them)"
         or data_cfg.intensity == 'percentile' and "data.intensity='percentile' (it needs every "
         'voxel of the full scan)')
  if off:
    return None, [f'data: the store has training-resolution copies; not read because of {off}: '
                  'reading the full-resolution scans']
  choices: list[list[dict | None]] = []
  why = collections.defaultdict(list)          # reason -> [(scan id, detail)]
  used = 0
  for rec, key in zip(records, keys):
    row_choice = []
    for im in rec.get('images', [])[:data_cfg.max_images]:
      row = rows.get(im['id'])
      if row is None:                        # not stored: the loader's read says so
        row_choice.append(None)
        continue
      copies = row.get('copies', [])
      match = [c for c in copies if list(c['shape'][1:3]) == [key.height, key.width]]
      chosen = next((c for c in match if is_current(row, c, store.key(im['id']))), None)
      if chosen is not None:
        used += 1
      elif match:
        why['stale'].append((im['id'], None))
      elif copies:
        why['size'].append((im['id'], (copies[0]['shape'][1], copies[0]['shape'][2],
                                       key.height, key.width)))
      elif key.kind == '3d' and row['shape'][1] * row['shape'][2] > key.height * key.width:
        why['missing'].append((im['id'], (key.height, key.width)))
      row_choice.append(chosen)
    choices.append(row_choice)
  notes = []
  if why['size']:
    (ch, cw, h, w), _ = collections.Counter(d for _, d in why['size']).most_common(1)[0]
    sid = next(s for s, d in why['size'] if d == (ch, cw, h, w))
    notes.append(f'data: {len(why["size"])} image(s) have training-resolution copies of another '
                 f'size than their batch (e.g. scan {sid!r}: copy {ch}x{cw}, batch {h}x{w}; '
                 f'data.image_size_3d_single={data_cfg.image_size_3d_single}, '
                 f'data.image_size_2d={data_cfg.image_size_2d}): reading their full-resolution '
                 f'scans (ingest --train-resolution {h} makes matching copies)')
  if why['stale']:
    notes.append(f'data: {len(why["stale"])} training-resolution copies are stale (made from '
                 f'another version of the scan than the store indexes now, e.g. scan '
                 f'{why["stale"][0][0]!r}): reading the full-resolution scans (ingest '
                 '--train-resolution again remakes them)')
  if why['missing'] and used:
    h, w = why['missing'][0][1]
    notes.append(f'data: {len(why["missing"])} 3D image(s) have no training-resolution copy at '
                 f'{h}x{w} (e.g. scan {why["missing"][0][0]!r}): reading their full-resolution '
                 f'scans (ingest --train-resolution {h} adds them)')
  return choices, notes
