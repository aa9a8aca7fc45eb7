"""The data side under faults of the machine, not of the input (tests/test_bad_inputs_ingest.py
has the malformed inputs, the kill -9 points and the concurrent ingests): a disk that is full, a
file-size limit (ulimit -f), a read-only store, a store damaged after ingest. Each case states the
rule it checks (DESIGN section 10): one line naming what could not be written or read and what was
expected, exit code 2, the store holding complete items only, and the same command finishing the
job once the fault is gone.

Faults are real where a test can make them without root or mounts: RLIMIT_FSIZE in a subprocess
(EFBIG, from TensorStore's C++ writes too); elsewhere an OSError(ENOSPC / EROFS) at the Python
call that writes.
"""

import errno
import io
import json
import os
import resource
import subprocess
import sys

import numpy as np
import pytest

import conftest_data as cd
from radfm_jax.data.ingest import ingest
from radfm_jax.data.store import ScanNotFound, VolumeStore
from radfm_jax.errors import WriteError
from radfm_jax.errors import InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = open(os.devnull, 'w')
EXPECTED = 'expected free space, a file-size limit (ulimit -f) above the file and write permission'


def _file_limit(limit: int):
  """preexec_fn of a subprocess whose files may not grow past `limit` bytes (a write past it is
  EFBIG: Python ignores SIGXFSZ)."""
  return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def _run(args, limit=None, script=None):
  """The real `radfm-jax ARGS` (or `python -c SCRIPT ARGS`) in a subprocess, optionally under a
  file-size limit."""
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  cmd = [sys.executable, '-c', script] if script else [sys.executable, '-m', 'radfm_jax.cli']
  return subprocess.run(cmd + list(args), capture_output=True, text=True, env=env, timeout=120,
                        preexec_fn=None if limit is None else _file_limit(limit))


def _sample(sid, path):
  return {'id': sid, 'question': 'What is shown?', 'answer': 'A nodule.',
          'images': [{'path': path}]}


def _scans(tmp_path, sizes):
  """One .npy per entry of `sizes` ('small': 4 x 4 x 2, 'big': 128 x 128 x 8 of random int16,
  256 KiB that blosc cannot shrink) and a manifest of one sample each."""
  rng = np.random.default_rng(0)
  records = []
  for i, size in enumerate(sizes):
    shape = (4, 4, 2) if size == 'small' else (128, 128, 8)
    np.save(tmp_path / f'v{i}.npy', rng.integers(-32768, 32767, shape, dtype=np.int16))
    records.append(_sample(f's{i}', f'v{i}.npy'))
  return cd.write_manifest(tmp_path / 'm.jsonl', records)


def _verify(store_dir):
  """Every indexed array equals its source file, every manifest image is indexed, no temporary
  file is left. -> the manifest's sample ids."""
  store = VolumeStore(store_dir)
  for sid, row in store.index().items():
    np.testing.assert_array_equal(store.read(sid)[0], np.load(row['attributes']['source']))
  rows = store.manifest()
  assert all(im['id'] in store for r in rows for im in r['images'])
  assert not [f for f in os.listdir(store_dir) if f.endswith('.tmp')]
  return [r['id'] for r in rows]


def _fail_fsync(monkeypatch, code=errno.ENOSPC):
  """Every os.fsync of this process raises OSError(code): a full disk seen at the first Python
  write that is made durable (the index append, a JSONL file, the tokenizer)."""
  def fsync(fd):
    raise OSError(code, os.strerror(code))
  monkeypatch.setattr(os, 'fsync', fsync)


# ------------------------------------------------------------------------------------------------
# ingest


def test_file_size_limit_stops_ingest_with_one_line_and_the_rerun_completes(tmp_path):
  """Batches of 2: the two small batches fit under the 64 KiB limit, the big scans' data file does
  not. Was: every later scan a 'store write failed' reject, then an OSError traceback from the
  manifest write (exit 1), or with room for the manifest exit 0 and the samples dropped."""
  manifest = _scans(tmp_path, ['small'] * 4 + ['big'] * 2)
  store_dir = str(tmp_path / 'store')
  args = ['ingest', '--manifest', manifest, '--out', store_dir, '--batch-size', '2',
          '--no-progress']
  r = _run(args, limit=64 << 10)
  assert r.returncode == 2, r.stderr
  assert r.stderr == (f'radfm-jax ingest: {store_dir}/volumes/: could not write (File too large); '
                      f'{EXPECTED} there; ingest stopped: 4 scans of this run were stored before '
                      'it, the store holds complete scans only and its last complete '
                      'manifest.jsonl; run the same ingest again once there is room to finish '
                      'it\n')
  assert _verify(store_dir) == [] and len(VolumeStore(store_dir)) == 4   # complete scans only
  assert not os.path.exists(os.path.join(store_dir, 'rejects.jsonl'))   # nothing blamed on a scan
  r = _run(args)
  assert r.returncode == 0, r.stderr
  assert '2 scans stored (0 changed on disk), 4 already stored, 0 rejected' in r.stderr
  assert _verify(store_dir) == [f's{i}' for i in range(6)]


def test_full_disk_at_the_index_append_takes_the_batch_back(tmp_path, monkeypatch):
  """ENOSPC when the index rows are made durable: the rows already in the file are cut off again
  (the batch indexed whole or not at all), and the error names scans.jsonl."""
  manifest = _scans(tmp_path, ['small'] * 3)
  store_dir = str(tmp_path / 'store')
  with monkeypatch.context() as m:
    _fail_fsync(m)
    with pytest.raises(WriteError) as e:
      ingest(manifest, store_dir, log=QUIET)
  assert str(e.value).startswith(f'{store_dir}/scans.jsonl: could not write (No space left on '
                                 f'device); {EXPECTED} there; ingest stopped: 0 scans')
  assert os.path.getsize(os.path.join(store_dir, 'scans.jsonl')) == 0
  assert _verify(store_dir) == []
  report = ingest(manifest, store_dir, log=QUIET)       # the room is back: the rerun completes
  assert (len(report.stored), report.samples) == (3, 3)
  assert _verify(store_dir) == ['s0', 's1', 's2']


def test_full_disk_at_the_manifest_keeps_the_old_manifest_and_no_tmp(tmp_path, monkeypatch):
  """The second manifest adds a sample over a stored scan (no scan write): the first durable
  write is the store manifest's. Was: an OSError traceback and manifest.jsonl.tmp left behind."""
  manifest = _scans(tmp_path, ['small'] * 2)
  store_dir = str(tmp_path / 'store')
  ingest(manifest, store_dir, log=QUIET)
  more = cd.write_manifest(tmp_path / 'more.jsonl', [_sample('s9', 'v0.npy')])
  with monkeypatch.context() as m:
    _fail_fsync(m)
    with pytest.raises(WriteError, match=f'^{store_dir}/manifest.jsonl: could not write '
                       r'\(No space left on device\).*; ingest stopped: 0 scans'):
      ingest(more, store_dir, log=QUIET)
  assert _verify(store_dir) == ['s0', 's1']             # the old manifest, no manifest.jsonl.tmp
  ingest(more, store_dir, log=QUIET)
  assert _verify(store_dir) == ['s0', 's1', 's9']


def test_read_only_store_is_one_line(tmp_path, monkeypatch, capsys):
  """A store on a read-only filesystem (os.open of its lock file refused with EROFS; a mount in
  real life). Was: the OSError's traceback."""
  from radfm_jax.cli.main import main
  manifest = _scans(tmp_path, ['small'])
  store_dir = str(tmp_path / 'store')
  ingest(manifest, store_dir, log=QUIET)
  real_open = os.open

  def read_only(path, flags, *args, **kwargs):
    if str(path).endswith('.lock'):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
    return real_open(path, flags, *args, **kwargs)
  monkeypatch.setattr(os, 'open', read_only)
  assert main(['ingest', '--manifest', manifest, '--out', store_dir, '--no-progress']) == 2
  assert capsys.readouterr().err == (f'radfm-jax ingest: {store_dir}/.lock: could not write '
                                     f'(Read-only file system); {EXPECTED} there\n')


# ------------------------------------------------------------------------------------------------
# A store damaged after ingest, read by the training pipeline


def test_damaged_store_names_the_index_or_the_array_it_cannot_read(tmp_path):
  """What a training run (data.drop_unreadable) lists for each skipped sample. Was: `KeyError:
  '60056585c33b0254206f'` for a row the index lost, naming neither scans.jsonl nor what was
  expected; TensorStore's message without the index it was expected from for a lost array."""
  import shutil

  from radfm_jax.data.pipeline import make_dataset
  store_dir = cd.png_store(tmp_path, n=4)
  index = os.path.join(store_dir, 'scans.jsonl')
  ids = list(VolumeStore(store_dir).index())
  with open(index, 'rb') as f:
    lines = f.read().splitlines(keepends=True)
  with open(index, 'wb') as f:                      # the last row lost (e.g. a restore cut it)
    f.writelines(lines[:-1])

  def skipped(store):
    ds = make_dataset(cd.data_config(), cd.tiny_model(), store, cd.tokenizer(), num_epochs=1,
                      process_index=0, process_count=1)
    assert sum(1 for _ in ds) == 2
    return {s['scan_id']: s['reason'] for s in ds.stats.skipped}

  assert skipped(store_dir) == {ids[-1]: f'ScanNotFound: {index}: no row for scan {ids[-1]!r}; '
                                'expected a row for every scan the manifest names (the index was '
                                'cut or deleted after ingest, or the manifest belongs to another '
                                'store)'}
  with pytest.raises(KeyError):              # still a KeyError for callers that look ids up
    VolumeStore(store_dir).info(ids[-1])
  with pytest.raises(InputError):
    VolumeStore(store_dir).read(ids[-1])
  with open(index, 'wb') as f:
    f.writelines(lines)
  shutil.rmtree(os.path.join(store_dir, 'volumes', 'd'))      # the arrays' data files lost
  reasons = skipped(store_dir)
  assert sorted(reasons) == sorted(ids)
  for sid, reason in reasons.items():
    assert reason.startswith(f'StoreDamaged: {store_dir}/volumes/ key scans/{sid}/: the array of '
                             f'scan {sid!r} cannot be read ('), reason
    assert reason.endswith(f'); expected the complete array that {index} indexes (the store was '
                           'changed or damaged after ingest)'), reason
    assert 'tensorstore_spec' not in reason


def _read_all(store_dir) -> dict:
  store = VolumeStore(store_dir)
  return {sid: store.read(sid) for sid in store.index()}


def _pipeline_skips(store_dir) -> list:
  """What the training pipeline skips over the store (every sample, one epoch)."""
  from radfm_jax.data.pipeline import make_dataset
  ds = make_dataset(cd.data_config(), cd.tiny_model(), store_dir, cd.tokenizer(), num_epochs=1,
                    process_index=0, process_count=1)
  for _ in ds:
    pass
  return ds.stats.skipped


def test_rerun_restores_a_store_whose_database_was_lost(tmp_path, capsys):
  """volumes/d/ deleted after ingest: its one data file held every array and the B-tree root
  that manifest.ocdbt points at, so nothing in the database can be read and nothing can be
  written to it. Was: the re-run skipped every scan (files unchanged) and the store stayed
  unreadable short of deleting it. Now the database is moved aside, each scan is read from its
  file again (a line each), and the store reads as the first ingest wrote it."""
  import shutil

  from radfm_jax.cli.main import main
  store_dir = cd.png_store(tmp_path, n=4)
  manifest = str(tmp_path / 'samples.jsonl')
  first = _read_all(store_dir)
  paths = {sid: row['attributes']['source'] for sid, row in VolumeStore(store_dir).index().items()}
  shutil.rmtree(os.path.join(store_dir, 'volumes', 'd'))
  assert len(_pipeline_skips(store_dir)) == 4

  args = ['ingest', '--manifest', manifest, '--out', store_dir, '--no-progress']
  assert main(args) == 0
  lines = capsys.readouterr().err.splitlines()
  aside = f'{store_dir}/volumes.damaged-1'
  assert lines[0].startswith(f'ingest: {store_dir}/volumes/: the database cannot be read '
                             '(NOT_FOUND: '), lines[0]
  assert lines[0].endswith(f'moved to {aside}/ and a new one started: every scan whose array it '
                           'held is read from its file again (one not in this manifest when its '
                           'manifest is ingested again)'), lines[0]
  assert sorted(lines[1:5]) == sorted(
      f'ingest: restored {paths[sid]}: {store_dir}/volumes/ key scans/{sid}/: the array of scan '
      f'{sid!r} cannot be read (its database could not be read: moved to {aside}/); stored again '
      'from the file' for sid in first)
  assert lines[5] == (f'ingest: 4 scans stored (0 changed on disk, 4 restored: unreadable in the '
                      'store), 0 already stored, 0 rejected, 0 repaired; 4 samples kept, 0 '
                      f'dropped, 0 replaced; 4 samples in the store -> {store_dir}')
  assert len(lines) == 6 and 'tensorstore_spec' not in '\n'.join(lines)
  assert os.path.isfile(os.path.join(aside, 'manifest.ocdbt'))      # kept, not deleted
  restored = _read_all(store_dir)
  assert sorted(restored) == sorted(first)
  for sid, array in first.items():
    assert restored[sid].dtype == array.dtype
    np.testing.assert_array_equal(restored[sid], array)
  assert _pipeline_skips(store_dir) == []

  report = ingest(manifest, store_dir, log=QUIET)          # nothing left to restore
  assert report.restored == [] and report.stored == [] and sorted(report.skipped) == sorted(first)
  assert report.summary().startswith('0 scans stored (0 changed on disk), 4 already stored')
  assert sorted(os.listdir(store_dir)).count('volumes.damaged-1') == 1
  assert not os.path.exists(f'{aside[:-2]}-2')


def test_rerun_moves_aside_a_database_whose_manifest_was_deleted(tmp_path, capsys):
  """volumes/manifest.ocdbt deleted after ingest, its data files kept: without its manifest an
  OCDBT database reads as an empty one, so it was not moved aside (docs/data.md, Store
  guarantees 3), and the re-run wrote a new manifest over the orphaned data files. Now it is
  moved aside as a database whose root was lost, and the store reads as the first ingest wrote
  it."""
  from radfm_jax.cli.main import main
  store_dir = cd.png_store(tmp_path, n=3)
  manifest = str(tmp_path / 'samples.jsonl')
  first = _read_all(store_dir)
  data = sorted(os.listdir(os.path.join(store_dir, 'volumes', 'd')))
  os.remove(os.path.join(store_dir, 'volumes', 'manifest.ocdbt'))

  assert main(['ingest', '--manifest', manifest, '--out', store_dir, '--no-progress']) == 0
  lines = capsys.readouterr().err.splitlines()
  aside = f'{store_dir}/volumes.damaged-1'
  assert lines[0] == (f'ingest: {store_dir}/volumes/: the database cannot be read (NOT_FOUND: '
                      f'manifest.ocdbt is missing, although {store_dir}/scans.jsonl indexes 3 '
                      f'arrays in it); moved to {aside}/ and a new one started: every scan whose '
                      'array it held is read from its file again (one not in this manifest when '
                      'its manifest is ingested again)')
  assert len(lines) == 5 and lines[4].startswith('ingest: 3 scans stored (0 changed on disk, 3 '
                                                 'restored: unreadable in the store)')
  assert sorted(os.listdir(os.path.join(aside, 'd'))) == data       # kept, not deleted
  restored = _read_all(store_dir)
  assert sorted(restored) == sorted(first)
  for sid, array in first.items():
    np.testing.assert_array_equal(restored[sid], array)
  report = ingest(manifest, store_dir, log=QUIET)          # nothing left to restore
  assert report.restored == [] and sorted(report.skipped) == sorted(first)
  assert not os.path.exists(f'{aside[:-2]}-2')


def test_rerun_restores_only_the_scan_whose_array_was_lost(tmp_path):
  """The first of two ingests stored one scan, the second the other three: two data files, the
  newer one holding the B-tree root. The older one deleted loses that scan's array only; the
  re-run reads that one file again (a new version of the scan in the same database) and skips
  the rest."""
  import shutil

  store_dir = cd.png_store(tmp_path, n=4)
  manifest = str(tmp_path / 'samples.jsonl')
  first = _read_all(store_dir)
  shutil.rmtree(store_dir)                                  # rebuilt in two ingests
  with open(manifest) as f:
    records = [json.loads(line) for line in f]
  ingest(cd.write_manifest(tmp_path / 'one.jsonl', records[:1]), store_dir, log=QUIET)
  data = os.path.join(store_dir, 'volumes', 'd')
  [older] = os.listdir(data)                                # that scan's data file
  ingest(manifest, store_dir, log=QUIET)
  lost = next(sid for sid, row in VolumeStore(store_dir).index().items()
              if row['attributes']['source'].endswith('x0.png'))
  assert _read_all(store_dir).keys() == first.keys()
  os.remove(os.path.join(data, older))
  assert [s['scan_id'] for s in _pipeline_skips(store_dir)] == [lost]

  log = tmp_path / 'log.txt'
  with open(log, 'w') as f:
    report = ingest(manifest, store_dir, log=f)
  assert report.restored == report.stored == [lost] and report.updated == []
  assert [(r['path'], r['scan_ids']) for r in report.restorations] == [(f'{tmp_path}/x0.png',
                                                                         [lost])]
  assert sorted(report.skipped) == sorted(set(first) - {lost})
  text = log.read_text()
  line, summary = text.splitlines()
  assert line.startswith(f'ingest: restored {tmp_path}/x0.png: {store_dir}/volumes/ key '
                         f'scans/{lost}/: the array of scan {lost!r} cannot be read ('), line
  assert line.endswith('); stored again from the file') and 'tensorstore_spec' not in line
  assert summary.startswith('ingest: 1 scans stored (0 changed on disk, 1 restored: unreadable '
                            'in the store), 3 already stored, 0 rejected')
  assert VolumeStore(store_dir).key(lost) == f'scans/{lost}@v1/'        # a new version
  assert not [n for n in os.listdir(store_dir) if n.startswith('volumes.damaged')]
  restored = _read_all(store_dir)
  for sid, array in first.items():
    np.testing.assert_array_equal(restored[sid], array)
  assert _pipeline_skips(store_dir) == []
  report = ingest(manifest, store_dir, log=QUIET)
  assert report.restored == report.stored == [] and len(report.skipped) == 4


def test_sharded_rerun_restores_lost_arrays_into_new_shards(tmp_path):
  """`ingest --runner beam`'s writer (data/shards.py): each shard checks the rows it sees from
  the store (in STORE/volumes/ or another shard's database) and stores the unreadable ones again
  in itself; a shard's database lost later is restored the same way."""
  import shutil

  from radfm_jax.data import shards
  store_dir = cd.png_store(tmp_path, n=4)
  manifest = str(tmp_path / 'samples.jsonl')
  first = _read_all(store_dir)
  sharded = shards.store_scans_sharded(scans_per_shard=2)
  shutil.rmtree(os.path.join(store_dir, 'volumes', 'd'))
  log = io.StringIO()
  report = ingest(manifest, store_dir, log=log, store_scans=sharded)
  assert sorted(report.stored) == sorted(first) and report.skipped == []
  # counted and said as restored (the shards' own lines), not as changed on disk
  assert sorted(report.restored) == sorted(first) and report.updated == []
  said = [line for line in log.getvalue().splitlines() if line.startswith('ingest: restored ')]
  assert len(said) == 4 and all("cannot be read (" in line for line in said), said
  # carried from the shards as data (IngestReport.restorations), each said in ingest's words
  assert sorted(i for r in report.restorations for i in r['scan_ids']) == sorted(first)
  assert said == [shards.restored_line(r) for r in report.restorations]
  index = VolumeStore(store_dir).index()
  assert sorted(row['db'] for row in index.values()) == ['shards/run0001-00000'] * 2 + \
      ['shards/run0001-00001'] * 2
  shutil.rmtree(os.path.join(store_dir, 'shards', 'run0001-00000', 'volumes', 'd'))
  report = ingest(manifest, store_dir, log=QUIET, store_scans=sharded)
  assert sorted(report.stored) == sorted(i for i, row in index.items()
                                         if row['db'] == 'shards/run0001-00000')
  assert len(report.skipped) == 2 and sorted(report.restored) == sorted(report.stored)
  restored = _read_all(store_dir)
  for sid, array in first.items():
    np.testing.assert_array_equal(restored[sid], array)
  report = ingest(manifest, store_dir, log=QUIET, store_scans=sharded)
  assert report.stored == [] and len(report.skipped) == 4


def test_lost_database_that_cannot_be_moved_aside_is_one_line(tmp_path, monkeypatch, capsys):
  """A database that is not a local folder (a kvstore URL: nothing to rename) stops the re-run
  with one line naming it before anything is written; the same holds for a local one that cannot
  be read for a reason other than lost data (a permission, the network)."""
  import shutil

  from radfm_jax.cli.main import main
  from radfm_jax.data import ingest as ingest_module
  store_dir = cd.png_store(tmp_path, n=2)
  shutil.rmtree(os.path.join(store_dir, 'volumes', 'd'))
  index = os.path.join(store_dir, 'scans.jsonl')
  with open(index, 'rb') as f:
    rows = f.read()
  monkeypatch.setattr(ingest_module, 'is_url', lambda path: True)
  args = ['ingest', '--manifest', str(tmp_path / 'samples.jsonl'), '--out', store_dir,
          '--no-progress']
  assert main(args) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'radfm-jax ingest: {store_dir}/volumes/: the database cannot be read '
                        '(NOT_FOUND: '), err
  assert err.endswith('); expected a readable OCDBT database (move it away and run the same '
                      'ingest again: its scans are then stored anew); nothing was written\n'), err
  assert err.count('\n') == 1
  with open(index, 'rb') as f:
    assert f.read() == rows
  assert sorted(os.listdir(os.path.join(store_dir, 'volumes'))) == ['manifest.ocdbt']


def test_missing_scan_message_is_not_quoted():
  e = ScanNotFound('STORE/scans.jsonl: no row for scan \'a\'')
  assert str(e) == "STORE/scans.jsonl: no row for scan 'a'" and isinstance(e, KeyError)


# ------------------------------------------------------------------------------------------------
# tokenizer, image-token cache, publish


def test_tokenizer_cut_by_the_file_size_limit_leaves_no_file_and_the_rerun_works(tmp_path):
  """The 7.6 KB model under a 4 KiB file-size limit. Was: a cut 4 KiB tokenizer.model (which the
  rerun then refused: `--out exists`) and an OSError traceback."""
  text = tmp_path / 'corpus.txt'
  text.write_text('\n'.join(cd.CORPUS) + '\n')
  out = tmp_path / 'tok.model'
  args = ['tokenizer', 'train', '--text', str(text), '--out', str(out), '--vocab-size', '512']
  r = _run(args, limit=4096)
  assert r.returncode == 2
  assert r.stderr == f'radfm-jax tokenizer: {out}: could not write (File too large); {EXPECTED} ' \
                     'there\n'
  assert os.listdir(tmp_path) == ['corpus.txt']          # no cut model, no .tmp
  assert _run(args).returncode == 0
  assert out.read_bytes() == cd.spm_proto()


CACHE_WRITE = r'''
import os, sys
import numpy as np
sys.path.insert(0, os.path.join(os.environ['PYTHONPATH'], 'tests'))
import conftest_data as cd
from radfm_jax.data.image_cache import ImageTokenCache
from radfm_jax.errors import WriteError
store, small = sys.argv[1], sys.argv[2] == 'small'
cache = ImageTokenCache.create(store, 'f' * 16, checkpoint='run', data_cfg=cd.data_config(),
                               dtype='float32', num_latents=32, embed=4096)
tokens = np.random.default_rng(0).normal(size=(32, 4096)).astype(np.float32)
tokens = tokens * 0 if small else tokens          # zeros: zstd makes them a few bytes
try:
  cache.write({sys.argv[3]: (tokens, (4, 4, 2))}, keys={sys.argv[3]: 'scans/x/'})
  print('WROTE', sorted(cache.meta['scans']))
except WriteError as e:
  print('REFUSED', e, sorted(cache.meta['scans']))
'''


def test_image_token_cache_write_refused_is_one_line_and_lists_only_written_scans(tmp_path):
  """cache-images' writer under a 64 KiB file-size limit: zero tokens fit, 512 KiB of random ones
  do not.
  Was: TensorStore's ValueError with its traceback. The metadata lists only the committed scans
  (a kill between the two writes leaves the same; the rerun writes the rest)."""
  store = str(tmp_path / 'store')
  os.makedirs(store)
  first = _run([store, 'small', 'a'], limit=64 << 10, script=CACHE_WRITE)
  assert first.stdout == "WROTE ['a']\n", first.stderr
  refused = _run([store, 'big', 'b'], limit=64 << 10, script=CACHE_WRITE)
  folder = os.path.join(store, 'image_tokens', 'f' * 16)
  assert refused.stdout == (f'REFUSED {folder}/: could not write (File too large); {EXPECTED} '
                            "there ['a']\n"), refused.stderr
  with open(os.path.join(store, 'image_tokens', 'f' * 16 + '.json')) as f:
    assert list(json.load(f)['scans']) == ['a']
  assert sorted(os.listdir(os.path.join(store, 'image_tokens'))) == ['f' * 16, 'f' * 16 + '.json']


def test_publish_overwrite_that_fails_keeps_the_old_version(tmp_path, monkeypatch, capsys):
  """`publish --overwrite` removed the old version first: a full disk while writing the new one
  (TFDS says so in a RuntimeError) left neither, and a traceback. Now the old one is put back and
  the error is one line (exit 2)."""
  pytest.importorskip('tensorflow_datasets')
  from radfm_jax.cli.main import main
  from radfm_jax.data import publish, tfds_manifest
  rows = [{'id': f's{i}', 'question': 'q', 'answer': 'a', 'images': []} for i in range(3)]
  manifest = cd.write_manifest(tmp_path / 'm.jsonl', rows)
  out = tmp_path / 'tfds'
  target = publish.publish_manifest(manifest, str(out))
  builder = tfds_manifest.builder_class()

  class FullDisk(builder):
    def download_and_prepare(self, *args, **kwargs):
      raise RuntimeError('Failed to finalize writing of split "train": write() failed: No space '
                         'left on device; writing ...')
  monkeypatch.setattr(publish, 'builder_class', lambda: FullDisk)
  assert main(['publish', '--data', manifest, '--out', str(out), '--overwrite']) == 2
  assert capsys.readouterr().err == (f'radfm-jax publish: {target}: could not write (No space '
                                     f'left on device); {EXPECTED} there\n')
  assert [r['id'] for r in tfds_manifest.read_tfds_manifest(target)] == ['s0', 's1', 's2']
  assert not [f for f in os.listdir(out) if f.endswith('.replaced')]


PUBLISH_KILLED = r'''
import os, signal, sys
from radfm_jax.cli.main import main
from radfm_jax.data import publish
base = publish.builder_class()

class Killed(base):
  def _generate_examples(self, rows):
    for n, example in enumerate(super()._generate_examples(rows)):
      if n == 2:                              # mid-write: some rows generated, the files open
        os.kill(os.getpid(), signal.SIGKILL)
      yield example

publish.builder_class = lambda: Killed
main(sys.argv[1:])
'''


def test_publish_overwrite_killed_mid_write_keeps_the_old_version(tmp_path):
  """`publish --overwrite` moved the old version aside before TFDS wrote the new one: a SIGKILL
  meanwhile left no dataset at the published path (reads: 'no such file'), the old one hidden in
  .radfm_samples-1.0.0.replaced. Now the new one is written in a staging folder and moved in
  when complete: the old version stays readable, and the rerun replaces it and leaves no
  staging folder."""
  pytest.importorskip('tensorflow_datasets')
  from radfm_jax.data import publish, tfds_manifest
  rows = [{'id': f's{i}', 'question': 'q', 'answer': 'a', 'images': []} for i in range(6)]
  manifest = cd.write_manifest(tmp_path / 'm.jsonl', rows)
  out = tmp_path / 'tfds'
  target = publish.publish_manifest(rows[:3], str(out))
  args = ['publish', '--data', manifest, '--out', str(out), '--overwrite']
  assert _run(args, script=PUBLISH_KILLED).returncode == -9
  assert [r['id'] for r in tfds_manifest.read_tfds_manifest(target)] == ['s0', 's1', 's2']
  assert _run(args).returncode == 0
  assert tfds_manifest.read_tfds_manifest(target) == rows
  assert sorted(os.listdir(out)) == ['radfm_samples']
  assert os.listdir(out / 'radfm_samples') == ['1.0.0']


def test_publish_restores_a_version_left_aside_by_a_killed_replace(tmp_path):
  """A publish killed between moving the old version aside and moving the new one in: the next
  publish puts the old one back first (so it exists and is not replaced without overwrite)."""
  pytest.importorskip('tensorflow_datasets')
  from radfm_jax.data import publish, tfds_manifest
  rows = [{'id': f's{i}', 'question': 'q', 'answer': 'a', 'images': []} for i in range(3)]
  target = publish.publish_manifest(rows, str(tmp_path))
  os.rename(target, tmp_path / '.radfm_samples-1.0.0.replaced')
  with pytest.raises(FileExistsError, match='overwrite'):
    publish.publish_manifest(rows[:1], str(tmp_path))
  assert tfds_manifest.read_tfds_manifest(target) == rows
  assert publish.publish_manifest(rows[:1], str(tmp_path), overwrite=True) == target
  assert tfds_manifest.read_tfds_manifest(target) == rows[:1]
  assert sorted(os.listdir(tmp_path)) == ['radfm_samples']
