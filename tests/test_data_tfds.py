"""TFDS ArrayRecord publishing of a manifest: lossless rows, splits, the training pipeline reading
it through Grain with the same batches as from the JSONL, and clear errors."""

import json
import os
import re
import tempfile

import numpy as np
import pytest

import conftest_data as cd
from radfm_jax.cli import main as cli
from radfm_jax.data import pipeline, publish, tfds_manifest
from radfm_jax.data.ingest import ingest
from radfm_jax.data.manifest import read_manifest
from radfm_jax.data.store import VolumeStore
from radfm_jax.errors import InputError


@pytest.fixture(scope='module')
def store(tmp_path_factory):
  d = tmp_path_factory.mktemp('tfds')
  rng = np.random.default_rng(0)
  records = []
  for i in range(6):
    cd.write_png(d / f'x{i}.png', rng.integers(0, 255, (40 + i, 36), dtype=np.uint8))
    records.append({'id': f's{i}', 'task': 'vqa', 'question': f'What is in image {i}? é',
                    'answer': f'Finding {i}.', 'split': 'val' if i % 3 == 0 else 'train',
                    'extra': {'nested': [i, 'x']},
                    'images': [{'path': f'x{i}.png', 'position': {'question': 0}}]})
  ingest(cd.write_manifest(d / 'samples.jsonl', records), str(d / 'store'),
         log=open(os.devnull, 'w'))
  return VolumeStore(str(d / 'store'))


def test_publish_keeps_every_row_and_split(store, tmp_path, monkeypatch):
  # Nothing is left in the temporary folder (TFDS's GCS lookup, skipped, would leave one folder).
  temp = tmp_path / 'temp'
  temp.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(temp))
  path = publish.publish_manifest(store.root, str(tmp_path / 'tfds'))
  assert path == str(tmp_path / 'tfds' / 'radfm_samples' / '1.0.0')
  rows = store.manifest()
  train = [r for r in rows if r['split'] == 'train']
  assert tfds_manifest.read_tfds_manifest(path, 'train') == train
  assert tfds_manifest.read_tfds_manifest(path, 'val') == [r for r in rows if r['split'] == 'val']
  everything = tfds_manifest.read_tfds_manifest(path)
  assert sorted(everything, key=lambda r: r['id']) == sorted(rows, key=lambda r: r['id'])
  assert read_manifest(path, 'val') == tfds_manifest.read_tfds_manifest(path, 'val')
  info = json.load(open(os.path.join(path, 'dataset_info.json')))
  assert {s['name']: int(s['shardLengths'][0]) for s in info['splits']} == {'train': 4, 'val': 2}
  # Publishing again refuses to overwrite silently, and replaces with overwrite=True.
  with pytest.raises(FileExistsError, match='overwrite'):
    publish.publish_manifest(store.root, str(tmp_path / 'tfds'))
  fewer = [r for r in rows if r['split'] == 'train']
  publish.publish_manifest(fewer, str(tmp_path / 'tfds'), overwrite=True)
  assert tfds_manifest.read_tfds_manifest(path) == fewer
  assert list(temp.iterdir()) == []


def test_pipeline_reads_the_published_manifest(store, tmp_path):
  path = publish.publish_manifest(store.manifest_path, str(tmp_path / 'tfds'))
  tok = tmp_path / 'tok.model'
  tok.write_bytes(cd.spm_proto())
  batches = {}
  for name, manifest in (('jsonl', store.manifest_path), ('tfds', path)):
    cfg = cd.data_config(store=store.root, tokenizer=str(tok), manifest=manifest)
    ds = pipeline.make_dataset(cfg, cd.tiny_model(), split='train', seed=3, process_index=0,
                               process_count=1, num_epochs=1)
    batches[name] = list(ds)
  assert len(batches['tfds']) == len(batches['jsonl']) > 0
  assert sum(int(b['attention_mask'].any(1).sum()) for b in batches['tfds']) == 4
  for a, b in zip(batches['jsonl'], batches['tfds']):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_errors_name_the_path_and_the_problem(store, tmp_path):
  with pytest.raises(InputError, match='not a TFDS dataset directory'):
    tfds_manifest.read_tfds_manifest(str(tmp_path))
  with pytest.raises(InputError, match='missing.jsonl: no such file'):
    read_manifest(str(tmp_path / 'missing.jsonl'))
  bad = [dict(store.manifest()[0], split='val-2')]
  with pytest.raises(InputError, match='field split: got "val-2"'):
    publish.publish_manifest(bad, str(tmp_path / 'out'))
  path = publish.publish_manifest(store.root, str(tmp_path / 'ok'))
  with pytest.raises(ValueError, match="no split 'test'"):
    tfds_manifest.read_tfds_manifest(path, 'test')


def test_cli_publish(store, tmp_path, capsys):
  assert cli.main(['publish', '--data', store.root, '--out', str(tmp_path / 't')]) == 0
  # Only the path: not TFDS's download chatter, which names the staging folder (gone by now).
  path = str(tmp_path / 't' / 'radfm_samples' / '1.0.0')
  assert capsys.readouterr().out == f'published {path}\n'
  assert tfds_manifest.read_tfds_manifest(path) == tfds_manifest.read_tfds_manifest(
      publish.publish_manifest(store.root, str(tmp_path / 'u')))
  assert cli.main(['publish', '--data', store.root, '--out', str(tmp_path / 't')]) == 2
  assert 'exists' in capsys.readouterr().err


def test_publish_refuses_rows_training_would_refuse(store, tmp_path):
  """Rows are checked against the manifest schema before anything is written: a split of null or
  5 was published as the split 'None' / '5', TFDS's reserved 'all' failed inside TFDS, duplicate
  ids were published."""
  row = store.manifest()[0]
  for rows, message in [([dict(row, split=None)], 'manifest record 1 field split: got null'),
                        ([dict(row, split=5)], 'manifest record 1 field split: got 5'),
                        ([dict(row, split='all')], "manifest record 1 field split: 'all' (id "
                         f"{row['id']!r}) is not a TFDS split name; expected letters, digits, "
                         "underscore, not 'all' (which TFDS reserves)"),
                        ([row, dict(row)], 'manifest record 2 field id')]:
    with pytest.raises(InputError) as e:
      publish.publish_manifest(rows, str(tmp_path / 'out'))
    assert str(e.value).startswith(message), str(e.value)
  # in a file: its line (a blank line counted), not the row's index from 0
  lines = [json.dumps(row), '', json.dumps(dict(row, id='b', split='all'))]
  (tmp_path / 'm.jsonl').write_text('\n'.join(lines) + '\n')
  with pytest.raises(InputError, match=re.escape(
      f"{tmp_path / 'm.jsonl'} line 3 field split: 'all' (id 'b') is not a TFDS split name")):
    publish.publish_manifest(str(tmp_path / 'm.jsonl'), str(tmp_path / 'out'))
  assert not (tmp_path / 'out').exists()


def test_publish_without_the_tfds_extra_is_one_line(tmp_path):
  """Without tensorflow-datasets, publish was a ModuleNotFoundError traceback (exit 1); now the
  one line saying what to install (exit 2), and nothing is written."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  manifest = cd.write_manifest(tmp_path / 'm.jsonl', [{'id': 'a', 'question': 'q', 'answer': 'a',
                                                      'images': []}])
  script = ("import sys; sys.modules['tensorflow_datasets'] = None; "
            'from radfm_jax.cli.main import main; sys.exit(main(sys.argv[1:]))')
  proc = subprocess.run([sys.executable, '-c', script, 'publish', '--data', manifest, '--out',
                         str(tmp_path / 'out')], env=dict(os.environ, PYTHONPATH=root),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr == ('radfm-jax publish: TFDS datasets need the `tfds` extra: pip install '
                         '"radfm-jax[tfds]" (tensorflow-datasets, no TensorFlow)\n')
  assert not (tmp_path / 'out').exists()


def test_in_memory_rows_json_would_change_are_refused(store, tmp_path):
  """Rows are published as JSON: a tuple came back as a list and an int key as a string without
  a word, and a numpy scalar or bytes was a TypeError traceback. Now one line names the record
  (from 1, as the schema's errors) and the field."""
  expected = ('expected JSON values (a dict with string keys, a list, a string, an int, a float, '
              'a bool or None): rows are published as JSON, which would give it back changed or '
              'cannot hold it')
  row = store.manifest()[0]
  cases = [({'extra': (1, 2)}, 'field extra: (1, 2) (type tuple)'),
           ({'extra': {1: 'a'}}, 'field extra: key 1 (type int)'),
           ({'extra': [0, np.float32(0.5)]},
            'field extra[1]: np.float32(0.5) (type numpy.float32)'),
           ({'extra': {'k': b'xy'}}, "field extra.k: b'xy' (type bytes)")]
  for fields, said in cases:
    with pytest.raises(InputError) as e:
      publish.publish_manifest([row, dict(row, id='other', **fields)], str(tmp_path / 'out'))
    assert str(e.value) == f'manifest record 2 {said}; {expected}'
  assert not os.path.exists(tmp_path / 'out')
