"""Ingest under bad input and faults (issue 13: the store is a database; no narrowing; headers do
not decide memory). Every row of the tables builds its own tiny input and states the outcome: a
reject / error naming the file, line and field, or the correct stored result read back and compared.
Then the store-integrity tests with real subprocesses: kill -9 at many points, two concurrent
ingests, a second writer waiting for the lock, bounded memory under RLIMIT_AS, the progress bar.
"""

import gzip
import json
import os
import pathlib
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest

import conftest_data as cd
from radfm_jax.data.ingest import ingest
from radfm_jax.data.readers import DEFAULT_MAX_SCAN_BYTES, RejectedScan, read_scan
from radfm_jax.data.store import StoreLocked, VolumeStore, to_storable
from radfm_jax.errors import InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = open(os.devnull, 'w')
pytestmark = pytest.mark.filterwarnings('ignore::PIL.Image.DecompressionBombWarning')
HUGE = (1000, 1000, 800)                 # int16: 1.6 GB claimed by a header of a tiny file


def _sample(sid, *paths, **fields):
  return dict({'id': sid, 'question': 'What is shown?', 'answer': 'A nodule.',
               'images': [{'path': p} for p in paths]}, **fields)


def _cli(*args, env=None, **kw):
  """The real `radfm-jax` in a subprocess (PYTHONPATH: this checkout)."""
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu', **(env or {}))
  return subprocess.run([sys.executable, '-m', 'radfm_jax.cli', *args], capture_output=True,
                        text=True, env=env, timeout=120, **kw)


# ------------------------------------------------------------------------------------------------
# Builders of bad scans (each writes into `d` and returns the file name)


def _nifti_bytes(data, sform=True, pixdim=None, srow_x=None):
  """An uncompressed NIfTI-1 with raw header fields patched after nibabel wrote it."""
  import nibabel as nib
  img = nib.Nifti1Image(data, cd.ras_affine((1.0, 1.0, 2.0)))
  raw = bytearray(img.to_bytes())
  if not sform:
    struct.pack_into('<hh', raw, 252, 1, 0)           # qform_code 1, sform_code 0: from pixdim
  if pixdim is not None:
    struct.pack_into('<3f', raw, 80, *pixdim)
  if srow_x is not None:
    struct.pack_into('<4f', raw, 280, *srow_x)
  return bytes(raw)


def _write(d, name, data: bytes):
  with open(os.path.join(d, name), 'wb') as f:
    f.write(data)
  return name


def _huge_nifti_header():
  import nibabel as nib
  h = nib.Nifti1Header()
  h.set_data_shape(HUGE)
  h.set_data_dtype(np.int16)
  return h.binaryblock + b'\0' * 4 + b'\1' * 600          # ~1 KB: header, extension gap, a little


def _npy(d, name, array):
  np.save(os.path.join(d, name), array)
  return name


def _huge_npy(d):
  header = {'descr': '<i2', 'fortran_order': False, 'shape': HUGE}
  text = repr(header).encode().ljust(117) + b'\n'
  return _write(d, 'huge.npy', b'\x93NUMPY\x01\x00' + struct.pack('<H', len(text)) + text
                + b'\0' * 512)


def _huge_png(d, side=60000):
  raw = bytearray(open(cd.write_png(os.path.join(d, 'small.png'),
                                    np.arange(64, dtype=np.uint8).reshape(8, 8)), 'rb').read())
  struct.pack_into('>II', raw, 16, side, side)            # IHDR width / height
  struct.pack_into('>I', raw, 29, zlib.crc32(bytes(raw[12:29])))
  return _write(d, f'huge{side}.png', bytes(raw))


def _dicom(d, name, **tags):
  """One axial CT slice series folder; `tags` edit the first file (e.g. Rows=60000)."""
  import pydicom
  folder = cd.write_dicom_series(os.path.join(d, name), cd.ct_volume((6, 5, 3)).astype(np.uint16),
                                 shuffle_files=False)
  first = os.path.join(folder, 'slice_000.dcm')
  ds = pydicom.dcmread(first)
  for k, v in tags.items():
    setattr(ds, k, v)
  ds.save_as(first)
  return name


def _dicom_field_bytes(d, name, field, text):
  """A series folder whose first file holds `text` (ASCII, as many bytes as the field written)
  as the value of `field`: values pydicom would refuse to write."""
  import pydicom
  folder = os.path.join(d, _dicom(d, name))
  first = os.path.join(folder, 'slice_000.dcm')
  element = pydicom.dcmread(first)[field]
  raw = open(first, 'rb').read()
  tag = struct.pack('<HH', element.tag.group, element.tag.element) + element.VR.encode()
  at = raw.index(tag) + 8                                  # explicit VR: tag, VR, 2-byte length
  length = struct.unpack('<H', raw[at - 2:at])[0]
  assert len(text) == length, (len(text), length)
  _write(folder, 'slice_000.dcm', raw[:at] + text.encode() + raw[at + length:])
  return name


def _dicom_duplicate_position(d):
  import pydicom
  name = _dicom(d, 'dup')
  second = pydicom.dcmread(os.path.join(d, name, 'slice_001.dcm'))
  second.ImagePositionPatient = [0.0, 0.0, 0.0]           # the position of slice_000
  second.save_as(os.path.join(d, name, 'slice_001.dcm'))
  return name


def _dicom_without_position(d):
  import pydicom
  name = _dicom(d, 'nopos')
  first = os.path.join(d, name, 'slice_000.dcm')
  ds = pydicom.dcmread(first)
  del ds.ImagePositionPatient
  ds.save_as(first)
  return name


def _dicom_scout_in_the_series(d):
  """A series folder holding one slice of another size (a scout / localizer image)."""
  import pydicom
  name = _dicom(d, 'scout')
  path = os.path.join(d, name, 'slice_002.dcm')
  ds = pydicom.dcmread(path)
  ds.Rows, ds.Columns = 4, 5
  ds.PixelData = np.arange(20, dtype=np.uint16).tobytes()
  ds.save_as(path)
  return name


def _dicom_enhanced(d):
  """A series whose first file carries functional groups (an enhanced multi-frame's geometry and
  rescale live there, which the reader does not apply)."""
  from pydicom.dataset import Dataset
  return _dicom(d, 'enhanced', SharedFunctionalGroupsSequence=[Dataset()])


def _dicom_colour_frames(d, frames=2):
  """One file of `frames` RGB frames (a colour cine)."""
  import pydicom
  from pydicom.dataset import FileDataset, FileMetaDataset
  from pydicom.uid import ExplicitVRLittleEndian, generate_uid
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = pydicom.uid.UltrasoundMultiFrameImageStorage
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = FileDataset(None, {}, file_meta=meta, preamble=b'\0' * 128)
  ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
  ds.Modality, ds.SeriesInstanceUID = 'US', generate_uid()
  ds.Rows, ds.Columns, ds.NumberOfFrames = 4, 5, frames
  ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, 'RGB', 0
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
  ds.PixelData = (np.arange(frames * 4 * 5 * 3) % 251).astype(np.uint8).tobytes()
  ds.save_as(os.path.join(d, 'cine.dcm'), enforce_file_format=True)
  return 'cine.dcm'


def _png_chunk(kind: bytes, data: bytes) -> bytes:
  return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))


def _png_rgb16(d):
  """A 48-bit RGB PNG (Pillow writes none; it reads one as 8 bits per channel)."""
  rows = np.arange(4 * 5 * 3, dtype='>u2').reshape(4, 5, 3) * 1000
  raw = b''.join(b'\0' + row.tobytes() for row in rows)
  return _write(d, 'rgb16.png', b'\x89PNG\r\n\x1a\n'
                + _png_chunk(b'IHDR', struct.pack('>IIBBBBB', 5, 4, 16, 2, 0, 0, 0))
                + _png_chunk(b'IDAT', zlib.compress(raw)) + _png_chunk(b'IEND', b''))


def _apng(d):
  from PIL import Image
  frames = [Image.fromarray((np.arange(20).reshape(4, 5) * k).astype(np.uint8)) for k in (3, 5)]
  frames[0].save(os.path.join(d, 'cine.png'), save_all=True, append_images=frames[1:])
  return 'cine.png'


def _gzip_bit_flip(d):
  """A .nii.gz whose deflate data (stored blocks: level 0) has one voxel byte flipped: it still
  decompresses, only the gzip CRC-32 tells (64 KB of voxels: nibabel's own look at the file
  stops before the end; of a smaller file it reads to the end and refuses it itself)."""
  gz = bytearray(gzip.compress(_nifti_bytes(cd.ct_volume((64, 64, 8))), compresslevel=0))
  gz[len(gz) - 60] ^= 0x01
  return _write(d, 'flipped.nii.gz', bytes(gz))


BIG_INT = np.array([[[1, 2], [3, 5_000_000_000]]], np.int64)

# (row id, builder(d) -> file name, expected reason: substrings, all of which must appear)
REJECTS = [
    # was: each library's own words (pydicom: "Use force=True to force reading.")
    ('zero_byte_dicom', lambda d: _write(d, 'empty.dcm', b''),
     ["empty file (0 bytes); expected the scan's data (a copy cut short?)"]),
    ('int64_beyond_int32', lambda d: _npy(d, 'i64.npy', BIG_INT),
     ['voxels: value 5000000000 (int64) does not fit int32']),
    ('uint64_beyond_uint32', lambda d: _npy(d, 'u64.npy', BIG_INT.astype(np.uint64)),
     ['voxels: value 5000000000 (uint64) does not fit uint32']),
    ('float64_beyond_float32', lambda d: _npy(d, 'f64.npy', np.array([[1.0, 1e300]])),
     ['voxels: value 1e+300 (float64) is beyond the range of float32 (largest 3.40282e+38)']),
    ('nan_voxel', lambda d: _npy(d, 'nan.npy', np.array([[1.0, np.nan], [2.0, 3.0]], np.float32)),
     ['1 NaN/inf values']),
    ('inf_voxel', lambda d: _npy(d, 'inf.npy', np.array([[1.0, np.inf], [2.0, 3.0]])),
     ['1 NaN/inf values']),
    ('nifti_nan_pixdim', lambda d: _write(d, 'nanpix.nii', _nifti_bytes(
        cd.ct_volume((4, 4, 3)), sform=False, pixdim=(np.nan, 1.0, 2.0))),
     ['affine', 'is not finite']),
    ('nifti_nan_sform', lambda d: _write(d, 'nansform.nii', _nifti_bytes(
        cd.ct_volume((4, 4, 3)), srow_x=(np.nan, 0, 0, 0))), ['affine', 'is not finite']),
    ('nifti_singular_sform', lambda d: _write(d, 'zerosform.nii', _nifti_bytes(
        cd.ct_volume((4, 4, 3)), srow_x=(0, 0, 0, 0))), ['cannot be reoriented to RAS']),
    ('dicom_zero_pixel_spacing', lambda d: _dicom(d, 'zerosp', PixelSpacing=[0.0, 0.7]),
     ['spacing', 'is not finite and positive']),
    ('dicom_negative_pixel_spacing', lambda d: _dicom(d, 'negsp', PixelSpacing=[-0.8, 0.7]),
     ['spacing', 'is not finite and positive']),
    ('dicom_duplicate_positions', _dicom_duplicate_position, ['two slices at one position']),
    # was: 'slices differ in shape or are not 2D', naming no file
    ('dicom_slice_of_another_size', _dicom_scout_in_the_series,
     ['slice_002.dcm: a 4 x 5 slice where slice_000.dcm is 6 x 5; expected slices of one '
      'size (one series per folder)']),
    ('nii_gz_claims_1_6_gb', lambda d: _write(d, 'huge.nii.gz', gzip.compress(_huge_nifti_header())),
     ['NIfTI shape [1000, 1000, 800] int16', 'claims 1,600,000,000 bytes', 'DEFLATE']),
    ('nii_claims_1_6_gb', lambda d: _write(d, 'huge.nii', _huge_nifti_header()),
     ['claims 1,600,000,000 bytes of pixel data but the file holds 952']),
    ('npy_claims_1_6_gb', _huge_npy, ['.npy shape [1000, 1000, 800] int16',
                                      'claims 1,600,000,000 bytes of pixel data but the file holds 512']),
    ('png_claims_100_mb', lambda d: _huge_png(d, 10000),     # under Pillow's own limit
     ['PNG 10000 x 10000 L: the header claims 100,000,000 bytes from', 'DEFLATE']),
    ('png_claims_3_6_gb', _huge_png, ['header claims too many pixels', '3600000000 pixels']),
    ('dicom_claims_7_2_gb', lambda d: _dicom(d, 'bigdcm', Rows=60000, Columns=60000),
     ['DICOM slice_000.dcm (60000 x 60000', 'claims 7,200,000,000 bytes', 'holds 60']),
    ('nii_gz_crc_mismatch', _gzip_bit_flip, ['cannot read voxel data: BadGzipFile: CRC check '
                                             'failed', 'expected an intact gzip file']),
    ('png_16bit_colour', _png_rgb16, ['a 16-bit colour (or grey + alpha) PNG, which Pillow reads '
                                      'as 8 bits per channel']),
    ('png_animated', _apng, ['an animated PNG of 2 frames; expected one image']),
    ('npy_stack_of_no_images', lambda d: _npy(d, 'none.npy', np.zeros((0, 1, 4, 4, 2), np.int16)),
     ['the [S, C, H, W, D] stack [0, 1, 4, 4, 2] holds no images']),
    ('npy_bytes_after_the_array', lambda d: _write(d, 'long.npy', open(os.path.join(
        d, _npy(d, 'short.npy', np.arange(12, dtype=np.int16).reshape(3, 4))), 'rb').read()
        + b'\0' * 8),
     ['.npy shape [3, 4] int16: the file holds 8 bytes after the array its header describes']),
    ('dicom_colour_frames', _dicom_colour_frames, ['a multi-frame colour DICOM (2 frames)']),
    ('dicom_functional_groups', _dicom_enhanced, ['an enhanced multi-frame DICOM']),
    ('dicom_missing_slice', lambda d: _dicom(d, 'gap', ImagePositionPatient=[0.0, 0.0, -2.5]),
     ['uneven slice gaps (2.5 to 5 mm along the slice normal: a missing slice?)']),
    ('dicom_other_orientation', lambda d: _dicom(
        d, 'orient', ImageOrientationPatient=[0.0, 1.0, 0.0, 0.0, 0.0, -1.0]),
     ["slice_001.dcm: ImageOrientationPatient ['1.0', '0.0', '0.0', '0.0', '1.0', '0.0'] differs "
      "from slice_000.dcm's [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]; expected one orientation"]),
    ('dicom_position_on_some_slices', _dicom_without_position,
     ['slice_000.dcm has no ImagePositionPatient / ImageOrientationPatient while other slices do']),
    # was: "ValueError: could not convert string to float: '0.7x'", naming no field
    ('dicom_pixel_spacing_not_a_number', lambda d: _dicom_field_bytes(
        d, 'badsp', 'PixelSpacing', '0.8\\0.7x'),
     ['slice_000.dcm: PixelSpacing "0.8\\0.7x": expected 2 finite numbers separated by \\']),
    ('dicom_orientation_of_5_values', lambda d: _dicom(
        d, 'iop5', ImageOrientationPatient=[1.0, 0.0, 0.0, 0.0, 1.0]),
     ['slice_000.dcm: ImageOrientationPatient "1.0\\0.0\\0.0\\0.0\\1.0": expected 6 finite '
      'numbers']),
    ('dicom_position_inf', lambda d: _dicom_field_bytes(
        d, 'ippinf', 'ImagePositionPatient', '0.0\\0.0\\inf '),
     ['slice_000.dcm: ImagePositionPatient "0.0\\0.0\\inf": expected 3 finite numbers']),
    ('dicom_instance_number_not_an_integer', lambda d: _dicom_field_bytes(
        d, 'badin', 'InstanceNumber', '3x'),
     ['slice_000.dcm: InstanceNumber "3x": expected 1 finite number']),
    ('dicom_rescale_slope_0', lambda d: _dicom(d, 'slope0', RescaleSlope=0),
     ['RescaleSlope 0 would make every value the intercept']),
    ('truncated_nifti', lambda d: _write(d, 'trunc.nii', _nifti_bytes(
        cd.ct_volume((8, 8, 4)))[:400]),
     ['NIfTI shape [8, 8, 4] int16: the header claims 512 bytes of pixel data but the file holds 48']),
]


@pytest.mark.parametrize('name,build,reasons', REJECTS, ids=[r[0] for r in REJECTS])
def test_bad_scan_is_a_reject_naming_the_file_and_the_batch_goes_on(tmp_path, name, build,
                                                                     reasons):
  d = str(tmp_path)
  bad = build(d)
  good_vol = cd.ct_volume((6, 5, 4))
  cd.write_nifti(tmp_path / 'good.nii.gz', good_vol)
  records = [_sample('good0', 'good.nii.gz'), _sample('bad', bad), _sample('good1', 'good.nii.gz')]
  manifest = cd.write_manifest(tmp_path / 'm.jsonl', records)
  report = ingest(manifest, str(tmp_path / 'store'), log=QUIET, batch_size=2)
  store = VolumeStore(str(tmp_path / 'store'))
  (reject,) = [r for r in store.rejects() if 'scan_id' in r]
  assert reject['path'] == os.path.join(d, bad)
  for text in reasons:
    assert text in reject['reason'], reject['reason']
  assert [r['id'] for r in store.manifest()] == ['good0', 'good1'] and report.dropped_samples == 1
  (sid,) = report.stored                                      # the rest of the batch is stored
  np.testing.assert_array_equal(store.read(sid)[0], good_vol)
  assert list(store.stored_keys()) == [store.key(sid)]        # nothing of the bad scan
  with pytest.raises(RejectedScan) as e:                      # generate / eval read the same way
    read_scan(os.path.join(d, bad))
  assert str(e.value).startswith(os.path.join(d, bad) + ': ') and isinstance(e.value, InputError)


# (row id, builder(d) -> file name, the array expected in the store, its dtype, spacing_repaired)
STORED = [
    ('int64_within_int32', lambda d: _npy(d, 'i64ok.npy', np.array([[-7, 2**31 - 1]], np.int64)),
     np.array([[-7, 2**31 - 1]])[None, :, :, None], 'int32', None),
    ('uint64_within_uint32', lambda d: _npy(d, 'u64ok.npy', np.array([[0, 2**32 - 1]], np.uint64)),
     np.array([[0, 2**32 - 1]])[None, :, :, None], 'uint32', None),
    ('float64_within_float32', lambda d: _npy(d, 'f64ok.npy', np.array([[-3e38, 0.5, 3e38]])),
     np.array([[-3e38, 0.5, 3e38]], np.float32)[None, :, :, None], 'float32', None),
    ('nifti_zero_pixdim_repaired', lambda d: _write(d, 'zeropix.nii', _nifti_bytes(
        np.arange(48, dtype=np.int16).reshape(4, 4, 3), sform=False, pixdim=(0.0, 1.0, 2.0))),
     np.arange(48).reshape(1, 4, 4, 3), 'int16', ['0.0', '1.0', '2.0']),
    ('nifti_negative_pixdim_repaired', lambda d: _write(d, 'negpix.nii', _nifti_bytes(
        np.arange(48, dtype=np.int16).reshape(4, 4, 3), sform=False, pixdim=(-3.0, 1.0, 2.0))),
     np.arange(48).reshape(1, 4, 4, 3), 'int16', ['-3.0', '1.0', '2.0']),
]


@pytest.mark.parametrize('name,build,expected,dtype,repaired', STORED, ids=[r[0] for r in STORED])
def test_value_that_fits_is_stored_exactly_and_repairs_are_recorded(tmp_path, name, build,
                                                                    expected, dtype, repaired):
  path = build(str(tmp_path))
  manifest = cd.write_manifest(tmp_path / 'm.jsonl', [_sample('s', path)])
  report = ingest(manifest, str(tmp_path / 'store'), log=QUIET)
  store = VolumeStore(str(tmp_path / 'store'))
  (sid,) = report.stored
  got = store.read(sid)
  assert got.dtype == np.dtype(dtype)
  np.testing.assert_array_equal(got, expected.astype(dtype))
  attrs = store.attributes(sid)
  assert attrs.get('spacing_repaired') == repaired and store.info(sid)['attributes'] == attrs
  if repaired:
    assert attrs['spacing'] == [abs(float(repaired[0])) or 1.0, 1.0, 2.0]
    (warning,) = store.warnings()
    assert warning['path'] == str(tmp_path / path) and warning['scan_id'] == sid
    assert f'header pixdim {repaired}' in warning['warning'] and report.warnings == [warning]
  else:
    assert store.warnings() == []


def test_to_storable_refuses_what_does_not_fit():
  assert to_storable(np.array([2**31 - 1], np.int64)).dtype == np.int32
  for bad in (np.array([2**31], np.int64), np.array([2**32], np.uint64),
              np.array([3.5e38])):
    with pytest.raises(InputError, match='does not fit|beyond the range'):
      to_storable(bad)


def test_max_scan_bytes_limits_every_format(tmp_path):
  vol = cd.ct_volume((16, 16, 8))                           # 4 KiB of int16
  path = cd.write_nifti(tmp_path / 'a.nii.gz', vol)
  with pytest.raises(RejectedScan, match=r'needs 4,096 bytes in memory, over the limit of 1,000'):
    read_scan(path, max_bytes=1000)
  (arr, _), = read_scan(path, max_bytes=4096)
  np.testing.assert_array_equal(arr[0], vol)
  from radfm_jax.cli.ingest import byte_size
  assert byte_size('2G') == DEFAULT_MAX_SCAN_BYTES and byte_size('512M') == 512 << 20
  r = _cli('ingest', '--manifest', cd.write_manifest(tmp_path / 'm.jsonl', [_sample('s', 'a.nii.gz')]),
           '--out', str(tmp_path / 'st'), '--max-scan-bytes', '1K', '--no-progress')
  assert f'rejected {path}: NIfTI shape [16, 16, 8] int16: needs 4,096 bytes' in r.stderr, r.stderr
  # Not one sample kept: exit 1 without --strict too (a script must not go on to train on it).
  assert r.returncode == 1 and r.stderr.splitlines()[-1] == (
      'radfm-jax ingest: no sample of the input was kept (1 scans rejected, 1 samples dropped; '
      f'see {tmp_path}/st/rejects.jsonl); expected at least one readable sample'), r.stderr
  np.save(tmp_path / 'small.npy', np.arange(6, dtype=np.int16).reshape(2, 3))
  r = _cli('ingest', '--manifest', cd.write_manifest(tmp_path / 'm2.jsonl', [
      _sample('s', 'a.nii.gz'), _sample('t', 'small.npy')]), '--out', str(tmp_path / 'st'),
      '--max-scan-bytes', '1K', '--no-progress')
  assert r.returncode == 0 and '1 samples kept, 1 dropped' in r.stderr, r.stderr   # one kept


def test_max_scan_bytes_counts_the_float64_values_of_a_fractional_rescale(tmp_path):
  """A fractional RescaleSlope keeps 8 bytes per pixel until the scan is cast; an integral one
  (CT's -1024) gives int16 and counts the file's 2."""
  raw = np.random.default_rng(0).integers(0, 3000, (6, 5, 3)).astype(np.uint16)   # 60 B a file
  ct = cd.write_dicom_series(tmp_path / 'ct', raw, intercept=-1024.0)
  mr = cd.write_dicom_series(tmp_path / 'mr', raw, slope=0.37, intercept=-12.5)
  (arr, _), = read_scan(ct, max_bytes=180)
  assert arr.dtype == np.int16
  with pytest.raises(RejectedScan, match=r'needs 300 bytes in memory, over the limit of 299'):
    read_scan(mr, max_bytes=299)          # the first file: 60 + 240 bytes
  (arr, _), = read_scan(mr, max_bytes=900)
  assert arr.dtype == np.float32


# ------------------------------------------------------------------------------------------------
# The store as a database: errors before anything is touched, merges, content identity


def _store_files(store_dir):
  out = {}
  for dirpath, _, files in os.walk(store_dir):
    for f in files:
      if f != '.lock':
        p = os.path.join(dirpath, f)
        out[os.path.relpath(p, store_dir)] = open(p, 'rb').read()
  return out


@pytest.fixture
def filled(tmp_path):
  """A store holding samples s0 (a.npy), s1 (b.npy); returns (tmp_path, store dir)."""
  np.save(tmp_path / 'a.npy', np.arange(24, dtype=np.int16).reshape(2, 3, 4))
  np.save(tmp_path / 'b.npy', np.arange(24, dtype=np.int16).reshape(4, 3, 2) * 3)
  m = cd.write_manifest(tmp_path / 'first.jsonl',
                        [_sample('s0', 'a.npy'), _sample('s1', 'b.npy')])
  ingest(m, str(tmp_path / 'store'), log=QUIET)
  return tmp_path, str(tmp_path / 'store')


def _line(tmp, name, *lines):
  with open(tmp / name, 'w') as f:
    f.write(''.join(json.dumps(x) + '\n' if not isinstance(x, str) else x + '\n' for x in lines))
  return str(tmp / name)


# (row id, builder(tmp) -> manifest path, the one-line error, formatted with {m} = manifest path)
ERRORS = [
    ('manifest_missing', lambda t: str(t / 'misspelled.jsonl'),
     '{m}: manifest not found; expected a JSONL file, one sample per line (nothing was written)'),
    ('duplicate_sample_id', lambda t: _line(t, 'dup.jsonl', _sample('x', 'a.npy'), '',
                                            _sample('x', 'b.npy')),
     '{m} line 3 field id: "x" is already used ({m} line 1); expected a unique id'),
    ('default_id_collides', lambda t: _line(t, 'dflt.jsonl', _sample('1', 'a.npy'),
                                            {'images': [{'path': 'b.npy'}]}),
     '{m} line 2 field id: "1" (its default id: the record number, from 0) is already used '
     '({m} line 1); expected a unique id'),
    ('scan_id_names_two_files', lambda t: _line(
        t, 'two.jsonl', {'id': 'p', 'images': [{'path': 'a.npy', 'id': 'scan'}]},
        {'id': 'q', 'images': [{'path': 'b.npy', 'id': 'scan'}]}),
     '{m} line 2 field images[0].id: "scan" already names "a.npy" ({m} line 1); expected one id '
     'per scan (path, frame, index)'),
    ('sample_id_in_store_with_other_answer', lambda t: _line(
        t, 'other.jsonl', _sample('s1', 'b.npy', answer='Two nodules.')),
     "{m} line 1 field answer: sample id 's1' is already in the store ({t}/store/manifest.jsonl) "
     'with another answer; expected the same sample, another id, or --replace to replace it'),
    ('sample_id_in_store_with_other_image', lambda t: _line(t, 'img.jsonl', _sample('s1', 'a.npy')),
     "{m} line 1 field images: sample id 's1' is already in the store"),
    ('bad_json_line', lambda t: _line(t, 'json.jsonl', _sample('n', 'a.npy'), '{"id": "m",'),
     '{m} line 2: not valid JSON'),
    ('stack_id_meets_another_scan_id', lambda t: (
        np.save(t / 'case.npy', np.zeros((2, 1, 4, 4, 2), np.int16) + 7),
        _line(t, 'stack.jsonl', {'id': 'p', 'images': [{'path': 'case.npy', 'id': 'c'}]},
              {'id': 'q', 'images': [{'path': 'a.npy', 'id': 'c_0'}]}))[1],
     "{m} line 2 field images[0].id: stored scan id 'c_0' would hold {t}/a.npy ({m} line 2 field "
     "images[0]) and image 0 of the 5D stack {t}/case.npy ({m} line 1 field images[0])"),
    ('manifest_is_the_stores_own', lambda t: str(t / 'store' / 'manifest.jsonl'),
     "--manifest {m}: the store's own manifest.jsonl, which ingest rewrites"),
    ('image_without_path', lambda t: _line(t, 'nopath.jsonl', {'id': 'n', 'images': [{'id': 'z'}]}),
     '{m} line 1 field images[0].path: missing; expected non-empty string (an input manifest '
     'names each scan by its path)'),
]


@pytest.mark.parametrize('name,build,message', ERRORS, ids=[r[0] for r in ERRORS])
def test_bad_manifest_is_an_error_before_anything_is_touched(filled, name, build, message):
  tmp, store_dir = filled
  before = _store_files(store_dir)
  manifest = build(tmp)
  expected = message.format(m=manifest, t=tmp)
  with pytest.raises(InputError) as e:
    ingest(manifest, store_dir, log=QUIET)
  assert str(e.value).startswith(expected), str(e.value)
  r = _cli('ingest', '--manifest', manifest, '--out', store_dir)
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(
      f'radfm-jax ingest: {expected}'), r.stderr
  assert _store_files(store_dir) == before                  # nothing touched, byte for byte


def test_scan_id_held_for_another_file_is_an_error_unless_replace(filled):
  tmp, store_dir = filled
  m1 = _line(tmp, 'u1.jsonl', {'id': 'u', 'images': [{'path': 'a.npy', 'id': 'mine'}]})
  ingest(m1, store_dir, log=QUIET)
  m2 = _line(tmp, 'u2.jsonl', {'id': 'v', 'images': [{'path': 'b.npy', 'id': 'mine'}]})
  with pytest.raises(InputError, match=f"^{m2} line 1 field images\\[0\\].id: scan id 'mine' names "
                     f"{tmp}/b.npy but the store holds it for {tmp}/a.npy"):
    ingest(m2, store_dir, log=QUIET)
  ingest(m2, store_dir, log=QUIET, replace=True)
  store = VolumeStore(store_dir)
  np.testing.assert_array_equal(store.read('mine')[0], np.load(tmp / 'b.npy'))
  assert store.info('mine')['attributes']['source'] == str(tmp / 'b.npy')


def test_5d_stack_whose_stored_ids_meet_another_files_scan_is_an_error(filled):
  """A 5D stack 'x' is stored as x_0, x_1: an x_1 the store holds for another file (no x_0 there)
  was silently replaced by the stack's second image, its sample pointing at that image."""
  tmp, store_dir = filled
  ingest(_line(tmp, 'x1.jsonl', {'id': 'u', 'images': [{'path': 'a.npy', 'id': 'x_1'}]}),
         store_dir, log=QUIET)
  np.save(tmp / 'case.npy', np.random.default_rng(0).normal(size=(2, 1, 4, 4, 2)).astype('f4'))
  m = _line(tmp, 'stack.jsonl', {'id': 'v', 'images': [{'path': 'case.npy', 'id': 'x'}]})
  before = _store_files(store_dir)
  with pytest.raises(InputError, match=f"^{m} line 1 field images\\[0\\].id: scan id 'x' names "
                     f"{tmp}/case.npy but the store holds 'x_1' \\(an id it is stored as\\) for "
                     f"{tmp}/a.npy \\(frame None, index None\\); expected the same file"):
    ingest(m, store_dir, log=QUIET)
  assert _store_files(store_dir) == before
  store = VolumeStore(store_dir)
  np.testing.assert_array_equal(store.read('x_1')[0], np.load(tmp / 'a.npy'))
  ingest(m, store_dir, log=QUIET, replace=True)               # replaced only when asked
  assert VolumeStore(store_dir).info('x_1')['attributes']['source'] == str(tmp / 'case.npy')


def test_second_manifest_extends_and_same_manifest_twice_changes_nothing(filled):
  tmp, store_dir = filled
  store = VolumeStore(store_dir)
  first_rows = store.manifest()
  np.save(tmp / 'c.npy', np.arange(8, dtype=np.uint8).reshape(2, 4))
  m2 = cd.write_manifest(tmp / 'second.jsonl', [_sample('s2', 'c.npy'), _sample('s0', 'a.npy')])
  report = ingest(m2, store_dir, log=QUIET)
  assert report.skipped == [first_rows[0]['images'][0]['id']] and len(report.stored) == 1
  rows = VolumeStore(store_dir).manifest()
  assert [r['id'] for r in rows] == ['s0', 's1', 's2'] and rows[:2] == first_rows
  again = ingest(m2, store_dir, log=QUIET)
  assert again.stored == [] and VolumeStore(store_dir).manifest() == rows
  assert report.manifest_rows == 3 and again.replaced_samples == 0


def test_changed_file_at_the_same_path_is_read_again(filled):
  tmp, store_dir = filled
  old = VolumeStore(store_dir).manifest()[0]['images'][0]
  new = (np.arange(30, dtype=np.int16) * 7).reshape(5, 6)      # new content and shape
  np.save(tmp / 'a.npy', new)
  report = ingest(str(tmp / 'first.jsonl'), store_dir, log=QUIET)
  assert report.stored == [old['id']] and report.updated == [old['id']]
  store = VolumeStore(store_dir)
  np.testing.assert_array_equal(store.read(old['id']), new[None, :, :, None])
  row = store.manifest()[0]['images'][0]
  assert row['id'] == old['id'] and row['shape'] == [1, 5, 6, 1] != old['shape']
  import hashlib
  assert store.info(old['id'])['attributes']['source_sha256'] == hashlib.sha256(
      open(tmp / 'a.npy', 'rb').read()).hexdigest()


def test_replace_replaces_a_sample_in_place(filled):
  tmp, store_dir = filled
  m = _line(tmp, 'other.jsonl', _sample('s0', 'a.npy', answer='Changed.'))
  report = ingest(m, store_dir, log=QUIET, replace=True)
  rows = VolumeStore(store_dir).manifest()
  assert [r['id'] for r in rows] == ['s0', 's1'] and rows[0]['answer'] == 'Changed.'
  assert report.replaced_samples == 1


# ------------------------------------------------------------------------------------------------
# Faults: kill -9, concurrency, the lock, memory


def _kill_inputs(tmp_path, n=8, offset=0):
  """n tiny distinct .npy scans and a manifest of one sample each."""
  rng = np.random.default_rng(offset)
  records = []
  for i in range(offset, offset + n):
    np.save(tmp_path / f'v{i}.npy', rng.integers(-500, 500, (6, 5, 3 + i % 3)).astype(np.int16))
    records.append(_sample(f's{i}', f'v{i}.npy'))
  return cd.write_manifest(tmp_path / f'm{offset}.jsonl', records)


def _verify(store_dir, tmp_path):
  """Every indexed array equals its source file; every manifest image is indexed. -> sample ids."""
  store = VolumeStore(store_dir)
  for sid, row in store.index().items():
    np.testing.assert_array_equal(store.read(sid)[0], np.load(row['attributes']['source']),
                                  err_msg=sid)
    assert list(store.read(sid).shape) == row['shape']
  rows = store.manifest()
  assert all(im['id'] in store for r in rows for im in r['images'])
  return [r['id'] for r in rows]


def test_kill_9_at_any_moment_leaves_exactly_the_complete_scans(tmp_path):
  manifest = _kill_inputs(tmp_path, 12)
  store_dir = str(tmp_path / 'store')
  args = ('ingest', '--manifest', manifest, '--out', store_dir, '--batch-size', '2',
          '--no-progress')
  kills = 0
  # Deterministic points: after a batch's data commit (before its index line), half an index line
  # written, after an index append, before the manifest; then timed SIGKILLs.
  # 12 scans in batches of 2 (s0 s1 | s2 s3 | ...); each run goes on from what the last one left.
  for point, indexed in (('after-data:1', 0), ('index-torn:1', 1), ('after-index:2', 4),
                         ('after-data:2', 6), ('index-torn:1', 7), ('before-manifest', 12)):
    r = _cli(*args, env={'RADFM_JAX_CRASH_AT': point})
    assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stderr)
    kills += 1
    assert _verify(store_dir, tmp_path) == []                 # no manifest before the end
    assert len(VolumeStore(store_dir)) == indexed
    if point == 'index-torn:1':
      assert not open(os.path.join(store_dir, 'scans.jsonl'), 'rb').read().endswith(b'\n')
  done = _cli(*args)
  assert done.returncode == 0, done.stderr
  assert _verify(store_dir, tmp_path) == [f's{i}' for i in range(12)]
  # Timed kills of fresh ingests at increasing delays (startup, reading, commit, index, manifest).
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  for k, delay in enumerate((0.6, 1.0, 1.4, 1.8, 2.2, 2.6, 3.0)):
    store_k = str(tmp_path / f'timed{k}')
    p = subprocess.Popen([sys.executable, '-m', 'radfm_jax.cli', 'ingest', '--manifest', manifest,
                          '--out', store_k, '--batch-size', '1', '--no-progress'], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    p.wait()
    if os.path.isdir(store_k):
      _verify(store_k, tmp_path)
    kills += 1
    if k % 3 == 2:                     # and the rerun completes the store
      assert _cli('ingest', '--manifest', manifest, '--out', store_k, '--no-progress'
                  ).returncode == 0
      assert _verify(store_k, tmp_path) == [f's{i}' for i in range(12)]
  assert kills == 13


def test_two_concurrent_ingests_lose_no_rows(tmp_path):
  m1, m2 = _kill_inputs(tmp_path, 6, 0), _kill_inputs(tmp_path, 6, 100)
  store_dir = str(tmp_path / 'store')
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  procs = [subprocess.Popen([sys.executable, '-m', 'radfm_jax.cli', 'ingest', '--manifest', m,
                             '--out', store_dir, '--batch-size', '1', '--no-progress'], env=env,
                            stderr=subprocess.PIPE, text=True) for m in (m1, m2)]
  errs = [p.communicate(timeout=120)[1] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], errs
  ids = _verify(store_dir, tmp_path)
  assert sorted(ids) == sorted([f's{i}' for i in range(6)] + [f's{i}' for i in range(100, 106)])
  assert len(VolumeStore(store_dir)) == 12


def test_second_writer_waits_for_the_lock_or_fails_clearly(filled):
  tmp, store_dir = filled
  np.save(tmp / 'c.npy', np.arange(8, dtype=np.uint8).reshape(2, 4))
  m = cd.write_manifest(tmp / 'more.jsonl', [_sample('s2', 'c.npy')])
  holder = VolumeStore(store_dir)
  with holder.lock():
    r = _cli('ingest', '--manifest', m, '--out', store_dir, '--lock-timeout', '0.5')
    assert r.returncode == 2 and f'radfm-jax ingest: {store_dir}: still locked by another writer ' \
        f'(pid {os.getpid()} since' in r.stderr, r.stderr
    with pytest.raises(StoreLocked, match='still locked by another writer .pid .* after 0 s'):
      with VolumeStore(store_dir).lock(timeout=0):            # another object in this process
        pass
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
    p = subprocess.Popen([sys.executable, '-m', 'radfm_jax.cli', 'ingest', '--manifest', m,
                          '--out', store_dir, '--no-progress'], env=env, stderr=subprocess.PIPE,
                         text=True)
    line = ''
    while 'waiting' not in line and p.poll() is None:       # blocks until it says it waits
      line = p.stderr.readline()
    assert f'store {store_dir} is locked by another writer (pid {os.getpid()}' in line
    assert 'waiting' in line and p.poll() is None
    assert [r['id'] for r in VolumeStore(store_dir).manifest()] == ['s0', 's1']
  assert p.wait(timeout=60) == 0, p.stderr.read()
  assert [r['id'] for r in VolumeStore(store_dir).manifest()] == ['s0', 's1', 's2']


MEMORY_PROBE = r'''
import os, resource, sys
from radfm_jax.data.readers import read_scan, RejectedScan
vm = int([l for l in open('/proc/self/status') if l.startswith('VmSize')][0].split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (300 << 20), resource.RLIM_INFINITY))
for path in sys.argv[1:]:
  try:
    read_scan(path)
    print('READ', path)
  except RejectedScan as e:
    print('REJECTED', e)
  except MemoryError as e:
    print('MEMORYERROR', path)
'''


def test_header_lies_are_refused_under_a_300_mb_address_space_limit(tmp_path):
  d = str(tmp_path)
  files = [_write(d, 'huge.nii.gz', gzip.compress(_huge_nifti_header())),
           _write(d, 'huge.nii', _huge_nifti_header()), _huge_npy(d), _huge_png(d),
           _dicom(d, 'bigdcm', Rows=60000, Columns=60000)]
  paths = [os.path.join(d, f) for f in files]
  assert all(os.path.getsize(p) < 4096 for p in paths[:4])
  env = dict(os.environ, PYTHONPATH=REPO, OPENBLAS_NUM_THREADS='1', OMP_NUM_THREADS='1')
  r = subprocess.run([sys.executable, '-c', MEMORY_PROBE, *paths], capture_output=True, text=True,
                     env=env, timeout=120)
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  assert len(lines) == len(paths) and all(line.startswith('REJECTED ') for line in lines), lines
  for line, path in zip(lines, paths):
    assert line.startswith(f'REJECTED {path}: ') and 'claims' in line, line


def test_generate_reads_images_through_the_same_guard(tmp_path):
  from radfm_jax.infer.prompt_files import read_images
  path = os.path.join(str(tmp_path), _write(str(tmp_path), 'huge.nii.gz',
                                            gzip.compress(_huge_nifti_header())))
  with pytest.raises(InputError, match=f'^{path}: NIfTI shape \\[1000, 1000, 800\\] int16: the '
                     'header claims 1,600,000,000 bytes'):
    read_images([path], [None])


def test_progress_bar_counts_scans_and_rejects(tmp_path):
  np.save(tmp_path / 'a.npy', np.arange(6, dtype=np.int16).reshape(2, 3))
  np.save(tmp_path / 'c.npy', np.zeros((2, 3), np.int16))           # constant: a reject
  m = cd.write_manifest(tmp_path / 'm.jsonl', [_sample('a', 'a.npy'), _sample('c', 'c.npy')])
  r = _cli('ingest', '--manifest', m, '--out', str(tmp_path / 's'))
  assert r.returncode == 0 and 'ingest: 100%' in r.stderr and '2/2' in r.stderr
  assert 'rejected=1' in r.stderr, r.stderr
  r = _cli('ingest', '--manifest', m, '--out', str(tmp_path / 's2'), '--no-progress')
  assert r.returncode == 0 and '%|' not in r.stderr and '2/2' not in r.stderr
  assert f'rejected {tmp_path}/c.npy: constant volume' in r.stderr


def test_a_store_that_refuses_writes_rejects_each_scan_and_the_run_ends(tmp_path):
  """A real write fault (the database folder replaced by a file): the batch is retried scan by
  scan, each scan is a reject naming the store error, and the run still writes its reports."""
  np.save(tmp_path / 'a.npy', np.arange(6, dtype=np.int16).reshape(2, 3))
  np.save(tmp_path / 'b.npy', np.arange(6, dtype=np.int16).reshape(3, 2))
  m = cd.write_manifest(tmp_path / 'm.jsonl', [_sample('a', 'a.npy'), _sample('b', 'b.npy')])
  os.makedirs(tmp_path / 'store')
  _write(str(tmp_path / 'store'), 'volumes', b'not a folder')
  report = ingest(m, str(tmp_path / 'store'), log=QUIET)
  assert report.stored == [] and report.dropped_samples == 2
  rejects = [r for r in VolumeStore(str(tmp_path / 'store')).rejects() if 'scan_id' in r]
  assert [os.path.basename(r['path']) for r in rejects] == ['a.npy', 'b.npy']
  assert all(r['reason'].startswith('store write failed: ') for r in rejects), rejects
  assert VolumeStore(str(tmp_path / 'store')).manifest() == [] and len(VolumeStore(
      str(tmp_path / 'store'))) == 0


# ------------------------------------------------------------------------------------------------
# Options, --out, and `frame` / `index` where they pick nothing


def _two_scans(tmp_path):
  np.save(tmp_path / 'a.npy', np.arange(24, dtype=np.int16).reshape(2, 3, 4))
  np.save(tmp_path / 'b.npy', np.arange(24, dtype=np.int16).reshape(4, 3, 2) * 3)
  return cd.write_manifest(tmp_path / 'm.jsonl', [_sample('s0', 'a.npy'), _sample('s1', 'b.npy')])


SIZE = 'a positive size such as 2G, 512M or 1048576 (whole bytes)'


@pytest.mark.parametrize('flag,value,expected', [
    ('--batch-size', '0', 'a positive integer'),        # was: range() step 0, a traceback
    ('--batch-size', '-1', 'a positive integer'),       # was: exit 0, every sample dropped
    ('--workers', '-3', 'a positive integer'),          # was: ThreadPoolExecutor's traceback
    ('--workers', 'two', 'a positive integer'),
    ('--lock-timeout', 'nan', 'a number of seconds >= 0'),   # was: waits forever
    ('--lock-timeout', '-1', 'a number of seconds >= 0'),
    ('--max-scan-bytes', '0.5', SIZE),           # was: 0 bytes, every scan rejected, exit 0
    ('--max-scan-bytes', '1.5', SIZE)])
def test_bad_option_is_a_usage_error_before_the_store_exists(tmp_path, capsys, flag, value,
                                                             expected):
  from radfm_jax.cli.main import main
  manifest, out = _two_scans(tmp_path), tmp_path / 'store'
  with pytest.raises(SystemExit) as e:
    main(['ingest', '--manifest', manifest, '--out', str(out), '--no-progress', flag, value])
  assert e.value.code == 2
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      f"radfm-jax ingest: error: argument {flag}: '{value}': expected {expected}")
  assert not out.exists()                                   # no store, no lock file


def test_library_options_are_checked_before_the_store_and_batch_size_1_keeps_all(tmp_path):
  manifest, out = _two_scans(tmp_path), tmp_path / 'store'
  for options, message in [
      ({'batch_size': 0}, '--batch-size 0: expected a positive integer (scans per write '
       'transaction)'),
      ({'batch_size': -1}, '--batch-size -1: expected a positive integer'),
      ({'workers': 0}, '--workers 0: expected a positive integer (reader threads)'),
      ({'train_resolution': 0}, '--train-resolution 0: expected a positive in-plane size'),
      ({'lock_timeout': float('nan')}, '--lock-timeout nan: expected a number of seconds >= 0')]:
    with pytest.raises(InputError) as e:
      ingest(manifest, str(out), log=QUIET, **options)
    assert str(e.value).startswith(message), str(e.value)
    assert not out.exists()
  report = ingest(manifest, str(out), log=QUIET, batch_size=1, workers=1)
  assert (len(report.stored), report.samples, report.dropped_samples) == (2, 2, 0)


def test_out_that_is_a_file_is_one_line_and_the_file_is_untouched(tmp_path, capsys):
  from radfm_jax.cli.main import main
  manifest = _two_scans(tmp_path)
  before = open(manifest, 'rb').read()
  expected = (f'{manifest}: exists and is not a directory; expected a store directory to extend, '
              'or a new path to create one at')
  with pytest.raises(InputError) as e:
    ingest(manifest, manifest, log=QUIET)
  assert str(e.value) == expected
  assert main(['ingest', '--manifest', manifest, '--out', manifest, '--no-progress']) == 2
  assert capsys.readouterr().err == f'radfm-jax ingest: {expected}\n'
  assert open(manifest, 'rb').read() == before
  below = os.path.join(manifest, 'store')                  # was: NotADirectoryError's traceback
  assert main(['ingest', '--manifest', manifest, '--out', below, '--no-progress']) == 2
  assert capsys.readouterr().err == (f'radfm-jax ingest: --out {below}: {manifest} is not a '
                                     'directory; expected a folder for the store (nothing was '
                                     'written)\n')


def test_frame_or_index_that_picks_nothing_is_a_reject_naming_the_field(tmp_path):
  """`frame` picks a volume of a 4D NIfTI, `index` an image of a 5D .npy stack; elsewhere a scan
  is one volume / one image, which only 0 names (README: `'frame': 0` on a 3D NIfTI). Any other
  value was silently ignored (the whole scan stored): now the scan's reject reason."""
  vol = cd.ct_volume((6, 5, 4))
  cd.write_nifti(tmp_path / 'v3.nii.gz', vol)
  cd.write_nifti(tmp_path / 'v4.nii.gz', np.stack([vol, vol + 1, vol + 2], -1))
  np.save(tmp_path / 'v.npy', vol)
  np.save(tmp_path / 'case.npy', np.stack([vol[None], vol[None] + 5]))      # [2, 1, 6, 5, 4]
  cd.write_png(tmp_path / 'p.png', (np.arange(20).reshape(4, 5) * 9).astype(np.uint8))
  bad = [('v3.nii.gz', {'frame': 5}, 'field frame: got 5; expected no value or 0 (NIfTI shape '
          '[6, 5, 4] is one volume; frame picks one of a 4D NIfTI)'),
         ('v3.nii.gz', {'index': 3}, 'field index: got 3; expected no value or 0 (a NIfTI is one '
          'image; index picks one of a 5D .npy stack [S, C, H, W, D])'),
         ('v4.nii.gz', {'frame': 3}, 'field frame: got 3; expected 0..2 (the 4D volume has 3 '
          'frames)'),
         ('v.npy', {'frame': 2}, 'field frame: got 2; expected no value or 0 (a .npy is one '
          'volume; frame picks one of a 4D NIfTI)'),
         ('v.npy', {'index': 7}, 'field index: got 7; expected no value or 0 (.npy shape [6, 5, '
          '4] is one image; index picks one of a 5D stack [S, C, H, W, D])'),
         ('case.npy', {'index': 2}, 'field index: got 2; expected 0..1 (the [S, C, H, W, D] stack '
          '[2, 1, 6, 5, 4] holds 2 images)'),
         ('p.png', {'frame': 1}, 'field frame: got 1; expected no value or 0 (a PNG/JPEG image '
          'is one volume; frame picks one of a 4D NIfTI)')]
  good = [('v3.nii.gz', {'frame': 0}, vol), ('v.npy', {'frame': 0, 'index': 0}, vol),
          ('v4.nii.gz', {'frame': 2}, vol + 2), ('case.npy', {'index': 1}, vol + 5)]
  records = [{'id': f'{kind}{i}', 'question': 'Q?', 'images': [dict(path=p, **picks)]}
             for kind, rows in (('bad', bad), ('good', good)) for i, (p, picks, _) in
             enumerate(rows)]
  report = ingest(cd.write_manifest(tmp_path / 'm.jsonl', records), str(tmp_path / 'store'),
                  log=QUIET)
  assert [r['reason'] for r in report.rejects if 'scan_id' in r] == [why for _, _, why in bad]
  assert report.dropped_samples == len(bad)
  store = VolumeStore(str(tmp_path / 'store'))
  rows = {r['id']: r for r in store.manifest()}
  assert sorted(rows) == [f'good{i}' for i in range(len(good))]
  for i, (_, _, want) in enumerate(good):
    (image,) = rows[f'good{i}']['images']
    np.testing.assert_array_equal(store.read(image['id'])[0], want)


@pytest.mark.parametrize('path,entry,message', [
    (None, None, 'path: got NoneType None; expected the path of a scan (str)'),
    ('{d}/p.png', ['x'], '{d}/p.png: image entry: got list; expected a dict such as {{"frame": 0, '
     '"index": 1, "modality": "CT"}} (or None)'),
    ('{d}/p.png', {'frame': '0'}, "{d}/p.png: field frame: got str '0'; expected an integer (a "
     'PNG/JPEG image is one volume; frame picks one of a 4D NIfTI)'),
    ('{d}/p.png', {'index': True}, '{d}/p.png: field index: got bool True; expected an integer '
     '(a PNG/JPEG image is one image; index picks one of a 5D .npy stack [S, C, H, W, D])'),
])
def test_read_scan_of_the_wrong_type_is_one_line(tmp_path, path, entry, message):
  """The Python entry point (notebooks) with a path or entry of the wrong type: an InputError
  naming it (was: a TypeError / AttributeError from deep inside, or True taken as index 1)."""
  cd.write_png(tmp_path / 'p.png', (np.arange(20).reshape(4, 5) * 9).astype(np.uint8))
  path = path.format(d=tmp_path) if path else path
  with pytest.raises(InputError) as e:
    read_scan(path, entry)
  assert str(e.value) == message.format(d=tmp_path)
  (array, _), = read_scan(pathlib.Path(tmp_path / 'p.png'), {'index': np.int64(0)})   # still read
  assert array.shape == (1, 4, 5, 1)


def test_empty_manifest_or_missing_root_is_one_line_and_writes_nothing(tmp_path, capsys):
  """An empty manifest would ingest nothing and exit 0, a --root that does not exist would reject
  every scan as 'file not found' and exit 0: both look like success. Each is one line, exit 2,
  and no store is made."""
  from radfm_jax.cli.main import main
  empty, out = tmp_path / 'empty.jsonl', tmp_path / 'store'
  empty.write_text('\n\n')
  assert main(['ingest', '--manifest', str(empty), '--out', str(out), '--no-progress']) == 2
  assert capsys.readouterr().err == (
      f'radfm-jax ingest: {empty}: no samples (no JSON line in the file); expected a JSONL file, '
      'one sample per line (nothing was written)\n')
  manifest, nowhere = _two_scans(tmp_path), tmp_path / 'nowhere'
  assert main(['ingest', '--manifest', manifest, '--out', str(out), '--no-progress', '--root',
               str(nowhere)]) == 2
  assert capsys.readouterr().err == (
      f'radfm-jax ingest: --root {nowhere}: no such folder; expected the folder that relative '
      'image paths start from (nothing was written)\n')
  assert not out.exists()
