"""Sharded stores: ingest's scans written by many workers, each into its own shard database.

A sharded store is a VolumeStore (store.py) whose index rows may name a shard:

    STORE/scans.jsonl                    the one index (row `db`: 'shards/<name>', else volumes/)
    STORE/manifest.jsonl, rejects.jsonl  as for any store
    STORE/volumes/                       the database of single-process ingest (may be absent)
    STORE/shards/<run>-<k>/volumes/      shard k of ingest run <run>: its own OCDBT database
    STORE/shards/<run>-<k>/scans.jsonl   the shard's own index (data first, index last, as any
                                         VolumeStore), then result.json once the shard is done

Why one database per shard: several processes may commit to one OCDBT database, but every commit
then goes through its one manifest by optimistic concurrency (a conditional write, retried when
another writer got there first), or through a coordinator server (`ocdbt_coordinator`: one more
service every worker must reach); with hundreds of workers committing batches, that one manifest
is the bottleneck, and the per-store lock and appended index of store.py assume one writer
anyway. A shard has one writer, so a worker needs nothing but the filesystem and contends with
nobody, and a retried worker (Beam re-runs a failed bundle) finds its shard's committed scans in
the shard index and skips them (same sha256, as for any re-ingest). (Shared-database writing was
not tried here.)

`store_scans_sharded(run_tasks)` is ingest's scan writer (`ingest(store_scans=...)`): it splits
the entries into `ShardTask`s of `scans_per_shard` scans in manifest order, hands them to
`run_tasks` (Beam: data/beam_ingest.py; a plain loop: `run_in_process`), and only when every
shard has written its result.json appends the shards' rows to STORE/scans.jsonl in one write.
A job interrupted before that leaves the index as it was: its shards are unreferenced (as an
array committed but not indexed is), and the next run writes new shards. Everything else
(manifest checks, merge, rejects, warnings, the lock on STORE) is `ingest` itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Callable

from radfm_jax.data.ingest import (IngestReport, _Entry, _store_scans, _stored_ids,
                                   repair_warning, repaired_line, restored_line)
from radfm_jax.data.store import VolumeStore, kill_point, read_index
from radfm_jax.errors import UserError, writing

SHARDS = 'shards'
RESULT = 'result.json'


class IncompleteShards(UserError):
  """A sharded ingest ended with shards that wrote no result: nothing was indexed."""


class ShardStore(VolumeStore):
  """One shard: a VolumeStore at STORE/shards/<name>/ whose index is seen over the parent's rows
  of its scans, so that ingest skips a scan stored anywhere in the store with the same content
  and numbers a new version after the parent's."""

  def __init__(self, root: str, parent: dict[str, dict] | None = None):
    super().__init__(root)
    self.parent = dict(parent or {})
    self._own: set[str] = set()
    self._parent_view: VolumeStore | None = None

  def __getstate__(self):
    return {'root': self.root, 'parent': self.parent}

  def __setstate__(self, state):
    self.__init__(state['root'], state['parent'])

  def own_rows(self) -> dict[str, dict]:
    """The rows this shard has written (its own scans.jsonl)."""
    return read_index(self.scans_path)

  def index(self) -> dict[str, dict]:
    if self._index is None:
      self._index = {**self.parent, **self.own_rows()}
    return self._index

  def holder(self, scan_id: str) -> VolumeStore:
    """A row seen from the parent store (not written by this shard) has its array in the
    parent's databases: its `db` is relative to STORE, not to STORE/shards/<name>/."""
    if self._parent_view is None:
      self._own = set(self.own_rows())
      self._parent_view = _Rows(os.path.dirname(os.path.dirname(self.root)), self.parent)
    return self if scan_id in self._own or scan_id not in self.parent else self._parent_view


class _Rows(VolumeStore):
  """The store at `root` seen through `rows` only (its own index is not read)."""

  def __init__(self, root: str, rows: dict[str, dict]):
    super().__init__(root)
    self.rows = rows

  def index(self) -> dict[str, dict]:
    return self.rows


@dataclasses.dataclass
class ShardTask:
  """What one worker does: read `entries` and store them into shard `name` of the store at
  `root`; picklable (Beam ships it to its workers)."""
  root: str
  name: str
  entries: list[_Entry]
  parent: dict[str, dict]            # the store's index rows of these entries' scans
  batch_size: int = 16
  workers: int | None = None
  max_scan_bytes: int | None = None

  @property
  def path(self) -> str:
    return os.path.join(self.root, SHARDS, self.name)

  def run(self) -> str:
    """Stores the shard's scans (ingest's own readers, checks and rejects: `_store_scans`), then
    writes result.json (resolved ids, rejects, skipped scans, restorations, seconds taken): the
    shard is done. Returns the name."""
    import io
    import time
    start = time.perf_counter()
    shard = ShardStore(self.path, self.parent)
    report = IngestReport()
    entries = {e.sid: e for e in self.entries}
    log = io.StringIO()
    with shard.lock():
      resolved = _store_scans(shard, entries, report, self.batch_size, self.workers, log,
                              self.max_scan_bytes, False)
    # `log` is not seen (a worker's stderr may be on another machine): `collect` says the
    # rejects again, in manifest order, the restorations, repairs and databases moved aside
    result = {'resolved': resolved, 'rejects': report.rejects, 'skipped': report.skipped,
              'restorations': report.restorations, 'moved_aside': report.moved_aside,
              'seconds': time.perf_counter() - start}      # the worker's busy time (benchmarks)
    tmp = os.path.join(self.path, RESULT + '.tmp')
    with open(tmp, 'w') as f:
      json.dump(result, f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, os.path.join(self.path, RESULT))      # last: the shard is complete
    return self.name


def next_run(root: str) -> int:
  """The number of the next ingest run into a store (1 + the highest run among its shards)."""
  folder = os.path.join(root, SHARDS)
  runs = [int(m.group(1)) for name in (os.listdir(folder) if os.path.isdir(folder) else [])
          if (m := re.fullmatch(r'run(\d+)-\d+', name))]
  return max(runs, default=0) + 1


def plan(store: VolumeStore, entries: dict[str, _Entry], scans_per_shard: int | None,
         batch_size: int, workers: int | None, max_scan_bytes: int) -> list[ShardTask]:
  """The shards of one run: entries in manifest order, `scans_per_shard` to a shard (None: 256,
  or for fewer than 16k scans about 64 shards, so that small jobs still spread over the
  workers)."""
  run, index, order = next_run(store.root), store.index(), list(entries.values())
  scans_per_shard = scans_per_shard or min(256, max(1, -(-len(order) // 64)))
  tasks = []
  for k, start in enumerate(range(0, len(order), scans_per_shard)):
    chunk = order[start:start + scans_per_shard]
    parent = {i: index[i] for e in chunk for i in _stored_ids(index, e.sid)}
    tasks.append(ShardTask(store.root, f'run{run:04d}-{k:05d}', chunk, parent, batch_size,
                           workers, max_scan_bytes))
  # The run's folders now, under the store's lock: a driver killed before its workers made them
  # may leave a job still running (a Dataflow job outlives its driver); the next run must not
  # take the same names, or that job's rows and result.json would mix into its shards.
  for task in tasks:
    with writing(task.path):
      os.makedirs(task.path)
  return tasks


def collect(store: VolumeStore, tasks: list[ShardTask], entries: dict[str, _Entry],
            report: IngestReport, log) -> dict[str, list[str] | None]:
  """After every task ran: appends the shards' rows to the store's index (one write, `db` naming
  each shard) and fills `report` as single-process ingest would (rejects in manifest order).
  Returns entry id -> stored ids (None: rejected). IncompleteShards, with nothing indexed, when a
  shard has no result.json."""
  missing = [t.name for t in tasks if not os.path.isfile(os.path.join(t.path, RESULT))]
  if missing:
    raise IncompleteShards(f'{store.root}: {len(missing)} of {len(tasks)} shards did not finish '
                           f'({", ".join(missing[:5])}{" ..." if len(missing) > 5 else ""}) and '
                           'nothing was indexed; expected every worker to write its shard under '
                           'the store, at a path all workers see (run the ingest again)')
  before = store.index()
  resolved, rows, rejects, order = {}, [], [], {sid: n for n, sid in enumerate(entries)}
  for task in tasks:
    with open(os.path.join(task.path, RESULT)) as f:
      result = json.load(f)
    resolved.update(result['resolved'])
    rejects.extend(result['rejects'])
    own = ShardStore(task.path).own_rows()
    report.skipped.extend(i for i in result['skipped'] if i not in own)
    for line in result['moved_aside']:
      print(line, file=log)
      report.moved_aside.append(line)
    for restoration in result['restorations']:
      print(restored_line(restoration), file=log)
      report.restorations.append(restoration)
    restored = {i for r in result['restorations'] for i in r['scan_ids']}
    by_id = {}
    for e in task.entries:
      for i in result['resolved'].get(e.sid) or []:
        by_id[i] = e
    for i, row in own.items():
      rows.append(dict(row, db=f'{SHARDS}/{task.name}'))
      report.stored.append(i)
      if i in before and i not in restored:                  # restored: same content
        report.updated.append(i)
      warning = repair_warning(by_id[i].path, i, row['attributes']) if i in by_id else None
      if warning:
        report.warnings.append(warning)
        print(repaired_line(warning), file=log)
  rejects.sort(key=lambda r: order[r['scan_id']])            # as one process meets them
  report.rejects.extend(rejects)                   # after any the caller listed already
  for r in rejects:
    print(f'ingest: rejected {r["path"]}: {r["reason"]}', file=log)
  if rows:
    store._append_index(rows)
    index = store.index()
    for row in rows:
      index[row['id']] = row
  return resolved


def run_in_process(tasks: list[ShardTask]):
  """Runs the shard tasks one after the other in this process (tests, small stores)."""
  for task in tasks:
    task.run()


def store_scans_sharded(run_tasks: Callable[[list[ShardTask]], None] = run_in_process,
                        scans_per_shard: int | None = None) -> Callable:
  """An `ingest(store_scans=...)` writer that stores the scans into new shards through
  `run_tasks` (module docstring), then indexes them."""

  def store_scans(store, entries, report, batch_size, workers, log, max_scan_bytes, progress):
    tasks = plan(store, entries, scans_per_shard, batch_size, workers, max_scan_bytes)
    if tasks:
      print(f'ingest: {len(entries)} scans in {len(tasks)} shard{"s" * (len(tasks) > 1)} '
            f'({tasks[0].name} .. {tasks[-1].name})', file=log)
      kill_point('shards-planned')
      run_tasks(tasks)
    return collect(store, tasks, entries, report, log)

  return store_scans
