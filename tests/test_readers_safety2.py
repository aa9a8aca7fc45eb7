"""Readers under bad input, second probe (DESIGN section 10: one line naming the file, field and
what was expected; nothing lost, narrowed or silently replaced). Each test builds its own tiny
input, ingests it (or reads it) and compares the values, the attributes and the exact lines.

  * DICOM MONOCHROME1 is stored inverted (min + max - x) with a recorded repair; a PALETTE COLOR
    image is stored as RGB through its tables; a one-sample series of another photometric
    interpretation, or a palette series, is a reject.
  * float64 sources: the float32 cast is warned about when it changes values by more than the
    scan's range / 2**17; a source that collapses to one float32 value says so.
  * NIfTI: an infinite scl_slope, a non-finite scl_inter, a size < 1 are rejects in our words;
    what nibabel fixes on load (sizeof_hdr, pixdim) is a recorded repair, not a bare stderr line.
  * A DICOM folder holding a folder, or a file that is not DICOM: our words, not an exception's.
  * Non-native byte order ('>i2') is stored in the native dtype of the same width.
"""

import json
import logging
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

import conftest_data as cd
from radfm_jax.data.readers import RejectedScan, read_scan


_ingest, _stored, _reason = cd.ingest_paths, cd.stored_scan, cd.reject_reason


# ------------------------------------------------------------------------------------------------
# 1. DICOM photometric interpretation


def _series(folder, volume, photometric=None, **kw):
  """cd.write_dicom_series, then every file's PhotometricInterpretation set to `photometric`
  (or deleted when it is '')."""
  import pydicom
  cd.write_dicom_series(folder, volume, shuffle_files=False, **kw)
  for name in sorted(os.listdir(folder)):
    ds = pydicom.dcmread(os.path.join(folder, name))
    if photometric == '':
      del ds.PhotometricInterpretation
    elif photometric is not None:
      ds.PhotometricInterpretation = photometric
    ds.save_as(os.path.join(folder, name))
  return folder


def test_monochrome1_series_is_stored_as_the_inverse_of_the_same_monochrome2_series(tmp_path):
  rng = np.random.default_rng(3)
  volume = rng.integers(0, 3000, (6, 5, 4)).astype(np.uint16)
  m2 = _series(tmp_path / 'm2', volume, 'MONOCHROME2')
  m1 = _series(tmp_path / 'm1', volume, 'MONOCHROME1')
  report, store, log = _ingest(tmp_path, 'm2', 'm1')
  a2, attrs2, _ = _stored(report, store, m2)
  a1, attrs1, sid1 = _stored(report, store, m1)
  assert a2.dtype == a1.dtype == np.int16               # HU: 0..2999 - 1024, as MONOCHROME2
  lo, hi = int(a2.min()), int(a2.max())
  np.testing.assert_array_equal(a1, (lo + hi - a2.astype(np.int64)).astype(np.int16))
  assert a1.min() == lo and a1.max() == hi              # within the data's own range
  assert attrs2['photometric_interpretation'] == 'MONOCHROME2'
  assert 'monochrome1_inverted' not in attrs2
  assert attrs1['photometric_interpretation'] == 'MONOCHROME1'
  assert attrs1['monochrome1_inverted'] == [lo, hi]
  text = (f'MONOCHROME1 inverted: stored values are {lo} + {hi} - x (min + max - x) so that '
          'higher values are brighter, as MONOCHROME2')
  row = {'path': str(m1), 'scan_id': sid1, 'warning': text, 'repaired': True}
  assert store.warnings() == report.warnings == [row]
  assert f'ingest: repaired {m1}: {text}\n' in log
  assert '2 scans stored (0 changed on disk), 0 already stored, 0 rejected, 1 repaired;' in log


def test_monochrome1_single_image_is_inverted_too(tmp_path):
  """One 2D file without patient geometry (an X-ray): the same inversion."""
  import pydicom
  pixels = (np.arange(30).reshape(6, 5) * 7).astype(np.uint16)
  folder = _series(tmp_path / 'x', pixels[:, :, None], 'MONOCHROME1', slope=1.0, intercept=0.0)
  path = os.path.join(folder, 'slice_000.dcm')
  ds = pydicom.dcmread(path)
  del ds.ImagePositionPatient, ds.ImageOrientationPatient
  ds.save_as(path)
  array, attrs = read_scan(path)[0]
  np.testing.assert_array_equal(array, (0 + 203 - pixels)[None, :, :, None])
  assert array.dtype == np.uint16 and attrs['monochrome1_inverted'] == [0, 203]


@pytest.mark.parametrize('photometric', ['RGB', 'YBR_FULL'])
def test_one_sample_series_that_is_not_monochrome_is_a_reject(tmp_path, photometric):
  folder = _series(tmp_path / 'c', np.arange(60, dtype=np.uint16).reshape(4, 5, 3), photometric)
  with pytest.raises(RejectedScan) as e:
    read_scan(str(folder))
  assert e.value.reason == (f'slice_000.dcm: PhotometricInterpretation {photometric} with '
                            'SamplesPerPixel 1; expected MONOCHROME1, MONOCHROME2 or PALETTE '
                            'COLOR (another colour model is not read as grey values)')


def test_palette_series_is_a_reject(tmp_path):
  folder = _series(tmp_path / 'p', np.arange(60, dtype=np.uint16).reshape(4, 5, 3),
                   'PALETTE COLOR')
  with pytest.raises(RejectedScan) as e:
    read_scan(str(folder))
  assert e.value.reason == ('a PALETTE COLOR series of 3 files; expected one palette image per '
                            'file')


def test_palette_image_is_stored_as_rgb_through_its_lookup_tables(tmp_path):
  """pydicom's own palette example (an ultrasound image): its indices through the red, green
  and blue tables, read back from the store equal the tables looked up here in NumPy."""
  import pydicom
  from pydicom.data import get_testdata_file
  path = get_testdata_file('examples_palette.dcm')
  ds = pydicom.dcmread(path)
  index = ds.pixel_array
  tables = []
  for colour in ('Red', 'Green', 'Blue'):
    first = int(getattr(ds, f'{colour}PaletteColorLookupTableDescriptor')[1])
    table = np.frombuffer(getattr(ds, f'{colour}PaletteColorLookupTableData'), '<u2')
    tables.append(table[np.clip(index.astype(np.int64) - first, 0, len(table) - 1)])
  expected = np.stack(tables)[..., None]
  report, store, log = _ingest(tmp_path, path)
  assert not report.rejects and not report.warnings
  assert log.startswith('ingest: 1 scans stored') and log.count('\n') == 1
  row = json.loads(open(os.path.join(store.root, 'scans.jsonl')).readline())
  array = store.read(row['id'])
  assert array.shape == (3,) + index.shape + (1,) and array.dtype == np.uint16
  np.testing.assert_array_equal(array, expected)
  assert row['attributes']['photometric_interpretation'] == 'PALETTE COLOR'
  assert row['attributes']['palette_applied'] is True


def test_missing_or_mixed_photometric_interpretation_is_a_reject(tmp_path):
  import pydicom
  volume = np.arange(60, dtype=np.uint16).reshape(4, 5, 3)
  folder = _series(tmp_path / 'none', volume, '')
  with pytest.raises(RejectedScan) as e:
    read_scan(str(folder))
  assert e.value.reason == ('slice_000.dcm: no PhotometricInterpretation; expected MONOCHROME1 '
                            'or MONOCHROME2 (or RGB with 3 samples per pixel)')
  folder = _series(tmp_path / 'mixed', volume)
  ds = pydicom.dcmread(os.path.join(folder, 'slice_001.dcm'))
  ds.PhotometricInterpretation = 'MONOCHROME1'
  ds.save_as(os.path.join(folder, 'slice_001.dcm'))
  with pytest.raises(RejectedScan) as e:
    read_scan(str(folder))
  assert e.value.reason == ('slice_001.dcm: PhotometricInterpretation MONOCHROME1 where '
                            'slice_000.dcm has MONOCHROME2; expected one for the series')


# ------------------------------------------------------------------------------------------------
# 2. float64 -> float32: warned when it matters


def _rounding_text(source):
  stored = source.astype(np.float32)
  change = float(np.abs(stored.astype(np.float64) - source).max())
  return (f'float64 values rounded to float32: max absolute change {change:g} over a source range '
          f'of {float(source.min())} to {float(source.max())}; {np.unique(source).size} distinct '
          f'values before, {np.unique(stored).size} after')


def test_float64_npy_that_float32_resolves_coarsely_is_stored_with_a_warning(tmp_path):
  rng = np.random.default_rng(0)
  source = 1e8 + 10 * rng.normal(size=(16, 16, 4))
  np.save(tmp_path / 'c.npy', source)
  report, store, log = _ingest(tmp_path, 'c.npy', workers=2)
  array, attrs, sid = _stored(report, store, tmp_path / 'c.npy')
  assert array.dtype == np.float32                       # the store's dtype, as documented
  np.testing.assert_array_equal(array, source.astype(np.float32)[None])
  stored = source.astype(np.float32)
  assert attrs['float32_rounding'] == {
      'max_abs_change': float(np.abs(stored.astype(np.float64) - source).max()),
      'distinct_values': [1024, int(np.unique(stored).size)],
      'source_range': [float(source.min()), float(source.max())]}
  assert attrs['float32_rounding']['max_abs_change'] > 1     # float32 steps of 8 near 1e8
  text = _rounding_text(source)
  row = {'path': str(tmp_path / 'c.npy'), 'scan_id': sid, 'warning': text,
         'repaired': False}
  assert store.warnings() == report.warnings == [row]
  assert f'ingest: warning {tmp_path / "c.npy"}: {text}\n' in log
  assert '0 rejected, 0 repaired, 1 stored with a warning; 1 samples kept' in log


def test_float64_nifti_rounded_coarsely_is_warned_too(tmp_path):
  rng = np.random.default_rng(1)
  source = 1e8 + 100 * rng.normal(size=(6, 5, 4))
  cd.write_nifti(tmp_path / 'f.nii.gz', source)            # float64 on disk (datatype 64)
  array, attrs = read_scan(str(tmp_path / 'f.nii.gz'))[0]
  assert attrs['source_dtype'] == 'float64' and array.dtype == np.float32
  np.testing.assert_array_equal(array, source.astype(np.float32)[None])
  assert attrs['float32_rounding']['distinct_values'] == [
      120, int(np.unique(source.astype(np.float32)).size)]


def test_dicom_rescale_that_float32_resolves_coarsely_is_warned(tmp_path):
  """RescaleSlope / RescaleIntercept values go through the float64 rounding check as a float64
  scan does: an intercept of 1e9 leaves float32 steps of 64-128 over a spread of ~1e6."""
  raw = (np.random.default_rng(3).integers(0, 1000, (6, 5, 3)) + 30000).astype(np.uint16)
  folder = cd.write_dicom_series(tmp_path / 'pet', raw, slope=1000.125, intercept=1e9,
                                 shuffle_files=False)
  rescaled = raw.astype(np.float64) * 1000.125 + 1e9
  source = np.transpose(rescaled, (1, 0, 2))[::-1, ::-1, :]        # LPS -> RAS, as stored
  report, store, log = _ingest(tmp_path, 'pet', workers=2)
  array, attrs, sid = _stored(report, store, tmp_path / 'pet')
  assert array.dtype == np.float32
  np.testing.assert_array_equal(array, source.astype(np.float32)[None])
  stored = source.astype(np.float32)
  assert attrs['float32_rounding'] == {
      'max_abs_change': float(np.abs(stored.astype(np.float64) - source).max()),
      'distinct_values': [int(np.unique(source).size), int(np.unique(stored).size)],
      'source_range': [float(source.min()), float(source.max())]}
  assert attrs['float32_rounding']['max_abs_change'] > 8
  text = _rounding_text(source)
  assert store.warnings() == [{'path': str(tmp_path / 'pet'), 'scan_id': sid, 'warning': text,
                               'repaired': False}]
  assert f'ingest: warning {tmp_path / "pet"}: {text}\n' in log


def test_dicom_fractional_rescale_within_the_scans_resolution_is_not_warned(tmp_path):
  raw = np.random.default_rng(4).integers(0, 3000, (6, 5, 3)).astype(np.uint16)
  folder = cd.write_dicom_series(tmp_path / 'mr', raw, slope=0.37, intercept=-12.5,
                                 shuffle_files=False)
  (array, attrs), = read_scan(folder)
  source = np.transpose(raw * 0.37 - 12.5, (1, 0, 2))[::-1, ::-1, :]
  assert not np.array_equal(source.astype(np.float32).astype(np.float64), source)   # not exact
  np.testing.assert_array_equal(array, source.astype(np.float32)[None])
  assert 'float32_rounding' not in attrs


@pytest.mark.parametrize('source', [
    np.linspace(0, 1, 48).reshape(4, 4, 3),                 # 1/47 is not exact in float32
    np.array([[-3e38, 0.5, 3e38]]),                         # rounding of 1e-7 of the magnitude
    np.arange(48).reshape(4, 4, 3) * 0.1 - 100.0,
], ids=['unit_range', 'float32_extremes', 'offset_100_step_0.1'])
def test_float64_rounding_within_the_scans_resolution_is_not_warned(tmp_path, source):
  assert not np.array_equal(source.astype(np.float32).astype(np.float64), source)   # not exact
  np.save(tmp_path / 'ok.npy', source)
  report, store, log = _ingest(tmp_path, 'ok.npy')
  array, attrs, _ = _stored(report, store, tmp_path / 'ok.npy')
  np.testing.assert_array_equal(array.reshape(source.shape), source.astype(np.float32))
  assert 'float32_rounding' not in attrs and store.warnings() == [] and 'warning' not in log


# ------------------------------------------------------------------------------------------------
# 3. constant after the cast: the reason says so


@pytest.mark.parametrize('scale,offset', [(1.0, 1e10), (1e-300, 0.0)], ids=['1e10', '1e-300'])
def test_float64_source_that_collapses_to_one_float32_value_says_so(tmp_path, scale, offset):
  source = offset + scale * np.random.default_rng(2).normal(size=(16, 16, 4))
  np.save(tmp_path / 'd.npy', source)
  report, store, log = _ingest(tmp_path, 'd.npy')
  value = np.float32(offset) if offset else '0.0'
  reason = (f'float64 values collapse to a single float32 value {value} (source range '
            f'{source.min()} to {source.max()}); expected values that float32 can tell apart')
  assert _reason(report, tmp_path / 'd.npy') == reason
  assert f'ingest: rejected {tmp_path / "d.npy"}: {reason}\n' in log
  assert 'np.float' not in log and report.stored == []
  assert reason.startswith('float64 values collapse to a single float32 value '
                           + ('10000000000.0 (' if offset else '0.0 ('))


@pytest.mark.parametrize('array,text', [
    (np.full((4, 4, 4), 7, np.int16), '7'),
    (np.full((4, 4, 4), 0.5, np.float32), '0.5'),
    (np.full((4, 4, 4), 1e10), '10000000000.0'),           # constant in float64 as well
])
def test_constant_volume_reason_is_a_plain_number(tmp_path, array, text):
  np.save(tmp_path / 'k.npy', array)
  with pytest.raises(RejectedScan) as e:
    read_scan(str(tmp_path / 'k.npy'))
  assert e.value.reason == f'constant volume (every value {text})'


# ------------------------------------------------------------------------------------------------
# 4.-5. NIfTI header fields


def _nii(tmp_path, name, data=None, **patches):
  """An uncompressed NIfTI-1 written by nibabel with raw header fields patched: name ->
  (struct format, offset, values)."""
  import nibabel as nib
  data = np.arange(48, dtype=np.int16).reshape(4, 4, 3) if data is None else data
  raw = bytearray(nib.Nifti1Image(data, cd.ras_affine((1.0, 1.0, 2.0))).to_bytes())
  for fmt, offset, values in patches.values():
    struct.pack_into(fmt, raw, offset, *values)
  path = tmp_path / name
  path.write_bytes(bytes(raw))
  return path


@pytest.mark.parametrize('slope', [np.inf, -np.inf])
def test_infinite_scl_slope_is_a_reject_naming_it(tmp_path, slope):
  path = _nii(tmp_path, 's.nii', scl=('<ff', 112, (slope, 0.0)))
  report, store, log = _ingest(tmp_path, 's.nii')
  assert _reason(report, path) == (f'scl_slope {float(slope)} in the NIfTI header; expected a '
                                   'finite scale factor (0 or NaN: no scaling)')
  assert report.stored == []


def test_non_finite_scl_inter_is_a_reject_in_our_words(tmp_path):
  path = _nii(tmp_path, 'i.nii', scl=('<ff', 112, (2.0, np.inf)))
  with pytest.raises(RejectedScan) as e:
    read_scan(str(path))
  assert e.value.reason == ('scl_inter inf in the NIfTI header (scl_slope 2); expected a finite '
                            'intercept')


@pytest.mark.parametrize('slope,inter,factor,offset', [
    (np.nan, 5.0, 1, 0),                                  # nibabel's own "unset": no scaling
    (0.0, 0.0, 1, 0),                                     # NIfTI's "no scaling"
    (2.0, -3.0, 2, -3),
])
def test_scl_slope_that_is_valid_is_applied_as_nibabel_reads_it(tmp_path, slope, inter, factor,
                                                                offset):
  path = _nii(tmp_path, 'v.nii', scl=('<ff', 112, (slope, inter)))
  array, _ = read_scan(str(path))[0]
  np.testing.assert_array_equal(array[0], np.arange(48).reshape(4, 4, 3) * factor + offset)


@pytest.mark.parametrize('dim', [-4, 0])
def test_nifti_size_below_one_is_a_reject_naming_the_dim(tmp_path, dim):
  path = _nii(tmp_path, 'n.nii', dim=('<h', 44, (dim,)))      # dim[2]
  report, store, log = _ingest(tmp_path, 'n.nii')
  assert _reason(report, path) == (f'dim[2] = {dim} in the NIfTI header (dim [4, {dim}, 3]); '
                                   'expected positive sizes')


@pytest.fixture
def nibabel_records():
  """What reaches the handlers of nibabel's logger (which prints them on stderr)."""
  records = []

  class Keep(logging.Handler):
    def emit(self, record):
      records.append(record.getMessage())

  logger = logging.getLogger('nibabel.global')
  handler = Keep()
  logger.addHandler(handler)
  yield records
  logger.removeHandler(handler)


def test_header_nibabel_fixes_on_load_is_a_recorded_repair_not_a_stderr_line(tmp_path,
                                                                            nibabel_records):
  sizeof = _nii(tmp_path, 'sizeof.nii', sizeof_hdr=('<i', 0, (0,)))
  pixdim = _nii(tmp_path, 'pixdim.nii', pixdim=('<f', 84, (0.0,)))   # pixdim[2]; sform geometry
  report, store, log = _ingest(tmp_path, 'sizeof.nii', 'pixdim.nii', workers=2)
  assert nibabel_records == []                       # nothing printed by nibabel itself
  texts = {
      sizeof: 'sizeof_hdr 0 -> 348 (nibabel: sizeof_hdr should be 348; set sizeof_hdr to 348)',
      pixdim: 'pixdim[2] 0.0 -> 1.0 (nibabel: pixdim[1,2,3] should be non-zero; setting 0 dims '
              'to 1)'}
  for path, text in texts.items():
    array, attrs, _ = _stored(report, store, path)
    np.testing.assert_array_equal(array[0], np.arange(48).reshape(4, 4, 3))
    assert attrs['header_repaired'] == [text]
    assert attrs['spacing'] == [1.0, 1.0, 2.0]        # the sform's, not the repaired pixdim's
    line = f'ingest: repaired {path}: NIfTI header field repaired on load: {text}\n'
    assert line in log
  assert [w['warning'] for w in store.warnings()] == [
      f'NIfTI header field repaired on load: {texts[sizeof]}',
      f'NIfTI header field repaired on load: {texts[pixdim]}']
  for line in log.splitlines():
    assert line.startswith('ingest: '), line


def test_pixdim_repair_used_as_spacing_is_recorded_once(tmp_path, nibabel_records):
  """Without an sform the repaired pixdim is the spacing: the existing `spacing_repaired` row,
  not a second one for the same field."""
  path = _nii(tmp_path, 'q.nii', qform=('<hh', 252, (1, 0)), pixdim=('<f', 84, (0.0,)))
  report, store, log = _ingest(tmp_path, 'q.nii')
  _, attrs, _ = _stored(report, store, path)
  assert attrs['spacing_repaired'] == ['1.0', '0.0', '2.0'] and 'header_repaired' not in attrs
  (row,) = store.warnings()
  assert row['warning'] == ("spacing repaired: header pixdim ['1.0', '0.0', '2.0'] -> spacing "
                            '[1.0, 1.0, 2.0] mm (nibabel replaces 0 by 1 and negatives by their '
                            'absolute value)')
  assert nibabel_records == []


def test_header_problem_nibabel_leaves_is_a_recorded_warning(tmp_path, nibabel_records):
  """vox_offset 360 (not a multiple of 16): nibabel logs it and reads the file as it is."""
  import nibabel as nib
  raw = bytearray(nib.Nifti1Image(np.arange(48, dtype=np.int16).reshape(4, 4, 3),
                                  cd.ras_affine()).to_bytes())
  struct.pack_into('<f', raw, 108, 360.0)
  (tmp_path / 'o.nii').write_bytes(bytes(raw[:352]) + b'\0' * 8 + bytes(raw[352:]))
  report, store, log = _ingest(tmp_path, 'o.nii')
  array, attrs, sid = _stored(report, store, tmp_path / 'o.nii')
  np.testing.assert_array_equal(array[0], np.arange(48).reshape(4, 4, 3))
  said = 'vox offset (=360) not divisible by 16, not SPM compatible; leaving at current value'
  assert attrs['header_warnings'] == [said] and 'header_repaired' not in attrs
  text = f'NIfTI header: {said} (nibabel; left as it is)'
  assert store.warnings() == [{'path': str(tmp_path / 'o.nii'), 'scan_id': sid, 'warning': text,
                               'repaired': False}]
  assert f'ingest: warning {tmp_path / "o.nii"}: {text}\n' in log
  assert nibabel_records == []


def _padded_dicom_series(folder):
  """A 3-slice series whose files each hold 8 bytes of padding after their pixel data."""
  import pydicom
  raw = cd.ct_volume((6, 5, 3)).astype(np.uint16)
  cd.write_dicom_series(folder, raw, shuffle_files=False)
  for name in sorted(os.listdir(folder)):
    ds = pydicom.dcmread(os.path.join(folder, name))
    ds.PixelData = ds.PixelData + b'\0' * 8
    ds.save_as(os.path.join(folder, name))
  return raw


def test_what_pydicom_warns_of_is_a_recorded_warning_not_a_stderr_line(tmp_path):
  raw = _padded_dicom_series(tmp_path / 'pad')
  report, store, log = _ingest(tmp_path, 'pad', workers=2)
  array, attrs, sid = _stored(report, store, tmp_path / 'pad')
  hu = raw.astype(np.int32) - 1024                              # the series' intercept
  np.testing.assert_array_equal(array[0], np.transpose(hu, (1, 0, 2))[::-1, ::-1, :])
  said = ('The pixel data is 68 bytes long, which indicates it contains 8 bytes of excess '
          'padding to be removed')
  assert attrs['dicom_warnings'] == [said]                      # once, not once per file
  text = f'DICOM: {said} (pydicom, which read the file as it says)'
  assert store.warnings() == [{'path': str(tmp_path / 'pad'), 'scan_id': sid, 'warning': text,
                               'repaired': False}]
  assert f'ingest: warning {tmp_path / "pad"}: {text}\n' in log


def test_pydicom_warnings_are_not_printed_while_reading_and_still_are_elsewhere(tmp_path):
  """In a process of its own (pytest swaps `warnings.showwarning` per test): the reading
  thread's pydicom warning is not printed, one raised by pydicom outside a read still is."""
  _padded_dicom_series(tmp_path / 'pad')
  script = ('import json, sys\n'
            'from radfm_jax.data.readers import read_scan\n'
            '(_, attrs), = read_scan(sys.argv[1])\n'
            'print(json.dumps(attrs["dicom_warnings"]))\n'
            'from pydicom.misc import warn_and_log\n'
            'warn_and_log("said outside a read")\n')
  done = subprocess.run([sys.executable, '-c', script, str(tmp_path / 'pad')],
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert 'excess padding' in json.loads(done.stdout)[0]
  assert 'excess padding' not in done.stderr and 'said outside a read' in done.stderr


def test_nibabel_lines_of_other_threads_still_reach_its_logger(nibabel_records):
  """Only the lines of a thread reading a NIfTI are kept from nibabel's handlers."""
  logging.getLogger('nibabel.global').warning('said elsewhere')
  assert nibabel_records == ['said elsewhere']


# ------------------------------------------------------------------------------------------------
# 6. our words, not an exception's


def test_dicom_folder_holding_a_folder_is_a_reject_in_our_words(tmp_path):
  folder = tmp_path / 'scan'
  (folder / 'sub').mkdir(parents=True)
  (folder / 'notes.txt').write_text('not a DICOM file')
  report, store, log = _ingest(tmp_path, 'scan')
  reason = ('sub/ is a folder inside the DICOM series folder; expected only the files of one '
            'series (give each series its own folder)')
  assert _reason(report, folder) == reason
  assert f'ingest: rejected {folder}: {reason}\n' in log and 'Errno' not in log


def test_folder_of_files_that_are_not_dicom_is_a_reject_in_our_words(tmp_path):
  folder = tmp_path / 'scan'
  folder.mkdir()
  (folder / 'notes.txt').write_text('not a DICOM file')
  with pytest.raises(RejectedScan) as e:
    read_scan(str(folder))
  assert e.value.reason == ('unreadable DICOM notes.txt: not a DICOM file (no "DICM" marker '
                            'after a 128-byte preamble); expected the DICOM files of one series')


# ------------------------------------------------------------------------------------------------
# 7. byte order


@pytest.mark.parametrize('dtype', ['>i2', '>u2', '>f4', '>i4', '>u1'])
def test_non_native_byte_order_is_stored_in_the_native_dtype_of_the_same_width(tmp_path, dtype):
  values = (np.arange(48).reshape(4, 4, 3) * 3 - (40 if dtype[1] in 'if' else 0)).astype(dtype)
  np.save(tmp_path / 'be.npy', values)
  report, store, _ = _ingest(tmp_path, 'be.npy')
  array, attrs, _ = _stored(report, store, tmp_path / 'be.npy')
  assert array.dtype == np.dtype(dtype).newbyteorder('=') and array.dtype.isnative
  np.testing.assert_array_equal(array[0], values)
  assert attrs['source_dtype'] == str(np.dtype(dtype))


def test_big_endian_nifti_int16_is_stored_as_int16(tmp_path):
  import nibabel as nib
  header = nib.Nifti1Header(endianness='>')
  header.set_data_dtype(np.int16)
  values = np.arange(-24, 24, dtype=np.int16).reshape(4, 4, 3)
  nib.save(nib.Nifti1Image(values, cd.ras_affine(), header=header), str(tmp_path / 'be.nii'))
  array, attrs = read_scan(str(tmp_path / 'be.nii'))[0]
  assert array.dtype == np.int16 and attrs['source_dtype'] == '>i2'
  np.testing.assert_array_equal(array[0], values)


def test_warnings_rows_are_json_lines(tmp_path):
  """warnings.jsonl is read back as written (the rows above compare equal to it)."""
  np.save(tmp_path / 'c.npy', 1e8 + np.arange(64.0).reshape(4, 4, 4) / 3)
  report, store, _ = _ingest(tmp_path, 'c.npy')
  with open(tmp_path / 'store' / 'warnings.jsonl') as f:
    rows = [json.loads(line) for line in f]
  assert rows == report.warnings and rows[0]['repaired'] is False
