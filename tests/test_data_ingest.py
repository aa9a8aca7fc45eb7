"""Ingest: every input kind, orientation/rescale rules, rejects, strict mode, re-runs, CLI."""

import json
import os

import numpy as np
import pytest

import conftest_data as cd
from radfm_jax.data.ingest import IngestError, ingest
from radfm_jax.data.readers import read_scan
from radfm_jax.data.store import VolumeStore


def _sample(sid, path, **image):
  return {'id': sid, 'task': 'vqa', 'question': 'What is shown?', 'answer': 'A nodule.',
          'images': [dict(path=path, position={'question': 0}, **image)]}


def _ingest_one(tmp_path, path, **image):
  store_dir = str(tmp_path / 'store')
  report = ingest([_sample('s0', path, **image)], store_dir, log=open(os.devnull, 'w'))
  return report, VolumeStore(store_dir)


def test_nifti_is_reoriented_to_ras(tmp_path):
  vol = cd.ct_volume((6, 5, 4))
  path = cd.write_nifti(tmp_path / 'lps.nii.gz', vol, cd.ras_affine((0.5, 0.7, 2.0), flip_xy=True))
  report, store = _ingest_one(tmp_path, path, modality='CT')
  (sid,) = report.stored
  stored = store.read(sid)
  assert stored.shape == (1, 6, 5, 4) and stored.dtype == np.int16
  np.testing.assert_array_equal(stored[0], vol[::-1, ::-1, :])      # LPS -> RAS flips x and y
  attrs = store.info(sid)['attributes']
  assert attrs['orientation'] == 'RAS' and attrs['source_orientation'] == 'LPS'
  assert attrs['spacing'] == pytest.approx([0.5, 0.7, 2.0]) and attrs['modality'] == 'CT'
  assert attrs['source'] == os.path.abspath(path) and attrs['source_dtype'] == 'int16'
  manifest = store.manifest()
  assert manifest[0]['images'] == [{'id': sid, 'position': {'question': 0}, 'shape': [1, 6, 5, 4],
                                    'modality': 'CT'}]
  assert manifest[0]['question'] == 'What is shown?' and manifest[0]['task'] == 'vqa'


def test_nifti_4d_policy(tmp_path):
  vol = cd.ct_volume((5, 4, 3))
  single = cd.write_nifti(tmp_path / 'single.nii', vol[..., None])
  (arr, _), = read_scan(single)
  np.testing.assert_array_equal(arr[0], vol)                         # trailing singleton squeezed
  multi = cd.write_nifti(tmp_path / 'multi.nii.gz', np.stack([vol, vol + 1], -1))
  with pytest.raises(ValueError, match='4D volume with 2 frames'):
    read_scan(multi)
  (arr, _), = read_scan(multi, {'frame': 1})
  np.testing.assert_array_equal(arr[0], vol + 1)


def test_dicom_series_sorted_rescaled_and_ras(tmp_path):
  raw = np.random.default_rng(0).integers(0, 3000, (7, 6, 5)).astype(np.uint16)  # rows, cols, slices
  folder = cd.write_dicom_series(tmp_path / 'series', raw, spacing=(0.8, 0.7), thickness=2.5,
                                 slope=1.0, intercept=-1024.0)
  report, store = _ingest_one(tmp_path, folder)
  (sid,) = report.stored
  stored = store.read(sid)[0]
  hu = raw.astype(np.int32) - 1024
  # LPS axial: rows run P, cols run L, slices run S -> RAS = (cols reversed, rows reversed, slices).
  expected = np.transpose(hu, (1, 0, 2))[::-1, ::-1, :]
  np.testing.assert_array_equal(stored, expected)
  assert stored.dtype == np.int16
  attrs = store.info(sid)['attributes']
  assert attrs['spacing'] == pytest.approx([0.7, 0.8, 2.5])
  assert attrs['source_orientation'] == 'PLS' and attrs['modality'] == 'CT'


def test_dicom_float_rescale_and_pydicom_test_file(tmp_path):
  raw = np.random.default_rng(1).integers(0, 100, (4, 4, 2)).astype(np.uint16)
  folder = cd.write_dicom_series(tmp_path / 's', raw, slope=0.5, intercept=1.25)
  (arr, _), = read_scan(folder)
  assert arr.dtype == np.float32
  np.testing.assert_allclose(np.sort(arr.ravel()), np.sort(raw.ravel() * 0.5 + 1.25))
  from pydicom.data import get_testdata_file
  ct_small = get_testdata_file('CT_small.dcm')
  if ct_small is None:
    pytest.skip('pydicom test data not available offline')
  (arr, attrs), = read_scan(ct_small)
  assert arr.shape == (1, 128, 128, 1) and attrs['modality'] == 'CT'


def test_png_and_jpeg_and_npy(tmp_path):
  rng = np.random.default_rng(0)
  gray = rng.integers(0, 255, (9, 7), dtype=np.uint8)
  (arr, _), = read_scan(cd.write_png(tmp_path / 'g.png', gray))
  np.testing.assert_array_equal(arr, gray[None, :, :, None])
  rgb = rng.integers(0, 255, (9, 7, 3), dtype=np.uint8)
  (arr, _), = read_scan(cd.write_png(tmp_path / 'c.png', rgb))
  np.testing.assert_array_equal(arr, np.moveaxis(rgb, -1, 0)[..., None])
  (arr, _), = read_scan(cd.write_png(tmp_path / 'c.jpg', rgb))
  assert arr.shape == (3, 9, 7, 1) and arr.dtype == np.uint8
  case = rng.normal(size=(2, 3, 8, 8, 5)).astype(np.float32)
  np.save(tmp_path / 'case.npy', case)
  out = read_scan(str(tmp_path / 'case.npy'))
  assert len(out) == 2
  np.testing.assert_array_equal(out[1][0], case[1])
  (arr, _), = read_scan(str(tmp_path / 'case.npy'), {'index': 0})
  np.testing.assert_array_equal(arr, case[0])
  np.save(tmp_path / 'hwd.npy', case[0, 0])
  (arr, _), = read_scan(str(tmp_path / 'hwd.npy'))
  assert arr.shape == (1, 8, 8, 5)


def _bad_inputs(tmp_path):
  good = cd.write_nifti(tmp_path / 'good.nii.gz', cd.ct_volume((8, 8, 4)))
  full = open(cd.write_nifti(tmp_path / 'full.nii.gz', cd.ct_volume((32, 32, 16), 3)), 'rb').read()
  with open(tmp_path / 'trunc.nii.gz', 'wb') as f:
    f.write(full[:len(full) // 2])
  with open(tmp_path / 'notes.txt', 'w') as f:
    f.write('not an image')
  with open(tmp_path / 'fake.nii.gz', 'w') as f:
    f.write('not an image either')
  np.save(tmp_path / 'rank1.npy', np.arange(10.0))
  np.save(tmp_path / 'nan.npy', np.full((4, 4, 4), np.nan, np.float32))
  np.save(tmp_path / 'const.npy', np.full((4, 4, 4), 7, np.int16))
  with open(tmp_path / 'broken.dcm', 'wb') as f:
    f.write(b'\0' * 128 + b'DICM' + b'\x02\x00garbage')
  bad = {'trunc.nii.gz': 'cannot read voxel data', 'notes.txt': 'unsupported file type',
         'fake.nii.gz': 'not a readable NIfTI', 'rank1.npy': 'wrong rank',
         'nan.npy': 'all values are NaN', 'const.npy': 'constant volume',
         'broken.dcm': 'unreadable DICOM'}
  records = [_sample('good', 'good.nii.gz')] + [_sample(f'bad{i}', name)
                                                 for i, name in enumerate(bad)]
  return good, bad, cd.write_manifest(tmp_path / 'samples.jsonl', records)


@pytest.mark.filterwarnings('ignore::UserWarning')  # pydicom warns on the garbage file
def test_bad_inputs_are_rejected_reported_and_not_stored(tmp_path, capsys):
  _, bad, manifest = _bad_inputs(tmp_path)
  import sys
  report = ingest(manifest, str(tmp_path / 'store'), log=sys.stderr)
  store = VolumeStore(str(tmp_path / 'store'))
  scan_rejects = [r for r in store.rejects() if 'scan_id' in r]
  by_name = {os.path.basename(r['path']): r['reason'] for r in scan_rejects}
  assert set(by_name) == set(bad)
  for name, reason in bad.items():
    assert reason in by_name[name], (name, by_name[name])
  err = capsys.readouterr().err
  assert all(f'rejected {tmp_path / name}' in err for name in bad)
  assert len(report.stored) == 1
  assert list(store.stored_keys()) == [store.key(i) for i in report.stored]   # no partial arrays
  assert [r['id'] for r in store.manifest()] == ['good'] and report.dropped_samples == len(bad)
  expected = f'^{len(bad)} scans rejected, {len(bad)} samples dropped \\(see '
  with pytest.raises(IngestError, match=expected):
    ingest(manifest, str(tmp_path / 'store2'), strict=True, log=open(os.devnull, 'w'))
  # strict still stores what was readable, and the CLI turns the failure into exit code 1
  assert len(VolumeStore(str(tmp_path / 'store2'))) == 1
  from radfm_jax.cli import main as cli
  assert cli.main(['ingest', '--manifest', manifest, '--out', str(tmp_path / 'store3'),
                   '--strict']) == 1
  assert cli.main(['ingest', '--manifest', manifest, '--out', str(tmp_path / 'store3')]) == 0


def test_rerun_skips_stored_scans_and_shares_repeated_scans(tmp_path):
  path = cd.write_nifti(tmp_path / 'a.nii.gz', cd.ct_volume((8, 8, 4)))
  records = [_sample('s0', 'a.nii.gz'), _sample('s1', 'a.nii.gz')]
  manifest = cd.write_manifest(tmp_path / 'm.jsonl', records)
  devnull = open(os.devnull, 'w')
  first = ingest(manifest, str(tmp_path / 'st'), log=devnull)
  assert len(first.stored) == 1 and first.samples == 2
  second = ingest(manifest, str(tmp_path / 'st'), log=devnull)
  assert second.stored == [] and second.skipped == first.stored
  store = VolumeStore(str(tmp_path / 'st'))
  assert [im['id'] for r in store.manifest() for im in r['images']] == first.stored * 2
  lines = open(tmp_path / 'st' / 'manifest.jsonl').read().splitlines()
  assert [json.loads(line)['id'] for line in lines] == ['s0', 's1']
  assert os.path.exists(path)
